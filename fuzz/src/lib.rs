//! The harnesses of artisync's fuzz targets; see `checks.rs` (shared with the stable
//! regression tests) and `../README.md`.

pub mod checks;
