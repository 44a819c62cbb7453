//! The pure core: paths, versions, records and the replica state machine. No I/O, no clock
//! reads; everything that acts on the world lives in `fs`, `store` and `net`.

mod path;
mod record;
mod replica;
mod version;

pub use path::{MAX_PATH_BYTES, PathError, RelPath};
pub use record::{FileRecord, Hash, Kind, Observed};
pub use replica::{DEFAULT_MAX_CLOCK_SKEW_MS, Decision, Replica, Totals};
pub use version::{Causality, Hlc, MAX_CLOCK_VALUE, NodeId, Stamp, VersionVector};

#[cfg(test)]
mod tests;
