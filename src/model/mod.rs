//! The pure core: paths, versions, records and the replica state machine. No I/O, no clock
//! reads; everything that acts on the world lives in `fs`, `store` and `net`.

mod name;
mod path;
mod record;
mod replica;
mod version;

pub use name::{FolderId, NameError, PeerName, valid_name};
pub use path::{MAX_PATH_BYTES, PathError, RelPath};
pub use record::{FileRecord, Hash, Kind, Observed};
pub use replica::{DEFAULT_MAX_CLOCK_SKEW_MS, Decision, Replica, Totals};
pub use version::{Causality, Hlc, MAX_CLOCK_VALUE, NodeId, Stamp, VersionVector};

#[cfg(test)]
mod tests;

/// A live file record for tests at the edges (conversions, batching): `default/api/a.xml`,
/// `<a/>`, written once by node 3, index sequence 7.
#[cfg(test)]
pub(crate) fn sample_record() -> FileRecord {
    let mut version = VersionVector::new();
    version.bump(NodeId(3));
    FileRecord {
        path: RelPath::new("default/api/a.xml").expect("valid"),
        kind: Kind::File,
        deleted: false,
        size: 4,
        mode: 0o644,
        hash: Some(*blake3::hash(b"<a/>").as_bytes()),
        version,
        stamp: Stamp {
            hlc: 99,
            node: NodeId(3),
        },
        seq: 7,
    }
}
