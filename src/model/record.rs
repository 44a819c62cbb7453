//! `FileRecord`: what a node knows about one path of a folder.

use super::path::RelPath;
use super::version::{Stamp, VersionVector};

/// BLAKE3 digest of a file's content.
pub type Hash = [u8; 32];

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    File,
    Dir,
}

/// What the file system shows for a path right now (from a scan or a watcher event).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observed {
    pub kind: Kind,
    pub size: u64,
    /// Permission bits (`mode & 0o7777`).
    pub mode: u32,
    /// Content hash; `None` for directories.
    pub hash: Option<Hash>,
}

/// One versioned entry of a folder index. A deleted entry (tombstone) keeps its version so a
/// node back from an outage cannot resurrect it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileRecord {
    pub path: RelPath,
    pub kind: Kind,
    pub deleted: bool,
    pub size: u64,
    pub mode: u32,
    pub hash: Option<Hash>,
    pub version: VersionVector,
    pub stamp: Stamp,
    /// Local sequence number at which this record last changed on this node (not replicated
    /// as part of the record's identity; every node assigns its own).
    pub seq: u64,
}

impl FileRecord {
    /// True when both describe the same bytes on disk: same kind, both deleted or both live
    /// with the same hash. Mode is metadata, not content.
    pub fn same_content(&self, other: &FileRecord) -> bool {
        self.deleted == other.deleted
            && (self.deleted || (self.kind == other.kind && self.hash == other.hash))
    }

    /// True when the record describes exactly what was observed on disk.
    pub fn matches(&self, obs: &Observed) -> bool {
        !self.deleted
            && self.kind == obs.kind
            && self.hash == obs.hash
            && self.mode == obs.mode
            && (self.kind == Kind::Dir || self.size == obs.size)
    }

    /// True for a live regular file (the only kind whose bytes a conflict copy keeps).
    pub fn is_live_file(&self) -> bool {
        !self.deleted && self.kind == Kind::File
    }

    /// Same record apart from the local sequence number.
    pub fn same_version(&self, other: &FileRecord) -> bool {
        self.path == other.path
            && self.kind == other.kind
            && self.deleted == other.deleted
            && self.size == other.size
            && self.mode == other.mode
            && self.hash == other.hash
            && self.version == other.version
            && self.stamp == other.stamp
    }
}
