//! Writing to a folder without ever exposing a partial file: content goes to a temp file
//! `.artisync.<random>.tmp` (or an unnamed `O_TMPFILE` one) in the target's directory, is
//! made durable, put into place, and the directory is synced. Batches pay for durability once
//! (`syncfs`) instead of per file.
//!
//! One module per step:
//! - this one: the ops ([`Op`], [`Content`], [`OpResult`]) and [`apply_batch`];
//! - `temp`: named and unnamed temp files, staging a file's content, stale temp clean-up;
//! - `guard`: the symlink guard (never write through a symlink);
//! - `batch`: [`StagedBatch`] and its phases (stage, then make durable, place, remove, sync);
//! - `place`: into place and removals, race-free against local writes
//!   ([`changed_meanwhile`]);
//! - `keep`: conflict and held copies ([`keep_copy`]).

use std::fs::File;
use std::path::{Path, PathBuf};

use crate::model::RelPath;
use crate::store::StatKey;

use super::own::OwnWrites;
use super::scan::stat_key;

mod batch;
mod guard;
mod keep;
mod place;
mod temp;

pub use batch::{StagedBatch, stage_batch};
pub use keep::{Kept, keep_copy};
pub use place::changed_meanwhile;

pub use temp::{create_temp, remove_stale_temps};

/// Where the new bytes of a file come from.
#[derive(Debug)]
pub enum Content {
    Bytes(bytes::Bytes),
    /// A temp file already written (and verified) in the target's directory.
    Temp(PathBuf),
}

/// The local file a replacement or removal may drop: the one the index knows, by its stat key
/// and, since a stat key can repeat (an inode number reused within one tick of the file
/// system's clock, at the same size), by its content hash when the stat key matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Expected {
    pub key: StatKey,
    pub hash: crate::model::Hash,
}

/// One change to make on disk.
#[derive(Debug)]
pub enum Op {
    Write {
        path: RelPath,
        content: Content,
        mode: u32,
        /// Nothing is expected at the path (a new file): the write fails instead of replacing
        /// whatever appeared there meanwhile (a local file the index does not know yet).
        new: bool,
        /// The file being replaced must still be this one at the moment it is replaced (the
        /// one the index holds): a file written meanwhile is never lost, the write fails with
        /// [`changed_meanwhile`] and the file stays. `None`: replace whatever is there.
        expect: Option<Expected>,
    },
    Chmod {
        path: RelPath,
        mode: u32,
    },
    Mkdir {
        path: RelPath,
        mode: u32,
    },
    RemoveFile {
        path: RelPath,
        /// As for [`Op::Write`]: the file removed must still be the one the index knows.
        expect: Option<Expected>,
    },
    RemoveDir {
        path: RelPath,
    },
}

impl Op {
    pub fn path(&self) -> &RelPath {
        match self {
            Op::Write { path, .. }
            | Op::Chmod { path, .. }
            | Op::Mkdir { path, .. }
            | Op::RemoveFile { path, .. }
            | Op::RemoveDir { path } => path,
        }
    }

    fn rank(&self) -> (u8, usize) {
        // Directories parents-first, then files, then file removals, then directories
        // deepest-first.
        match self {
            Op::Mkdir { path, .. } => (0, path.depth()),
            Op::Write { .. } | Op::Chmod { .. } => (1, 0),
            Op::RemoveFile { .. } => (2, 0),
            Op::RemoveDir { path } => (3, usize::MAX - path.depth()),
        }
    }
}

/// Result of one op: the stat key of what is now at the path (`None` once removed).
pub type OpResult = Result<Option<StatKey>, std::io::Error>;

fn parent_dir(root: &Path, path: &RelPath) -> PathBuf {
    match path.parent() {
        Some(p) => root.join(p.as_str()),
        None => root.to_owned(),
    }
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

fn syncfs(root: &Path) -> std::io::Result<()> {
    let f = File::open(root)?;
    nix::unistd::syncfs(&f).map_err(std::io::Error::from)
}

fn stat_of(path: &Path) -> OpResult {
    Ok(Some(stat_key(&std::fs::symlink_metadata(path)?)))
}

/// Carries out `ops` under `root` and returns one result per op, in the order given.
/// Every op either fully happens or leaves the target as it was (temp files are cleaned up).
///
/// `own`: where the engine tells its watcher about the files it creates (see [`OwnWrites`]).
pub fn apply_batch(root: &Path, ops: Vec<Op>, own: Option<&OwnWrites>) -> Vec<OpResult> {
    stage_batch(root, ops, own).finish(own)
}

/// Helpers shared by the tests of the steps.
#[cfg(test)]
mod testing {
    use std::path::Path;

    use super::{Content, Expected, Op};
    use crate::fs::scan::stat_key;
    use crate::model::RelPath;
    use crate::store::StatKey;

    pub(super) fn p(s: &str) -> RelPath {
        RelPath::new(s).expect("valid")
    }

    pub(super) fn write(path: &str, bytes: &[u8], mode: u32, new: bool) -> Op {
        Op::Write {
            path: p(path),
            content: Content::Bytes(bytes.to_vec().into()),
            mode,
            new,
            expect: None,
        }
    }

    pub(super) fn key_of(path: &Path) -> StatKey {
        stat_key(&std::fs::symlink_metadata(path).expect("meta"))
    }

    /// What the index would expect of the file at `path` now.
    pub(super) fn expected(path: &Path) -> Expected {
        Expected {
            key: key_of(path),
            hash: crate::fs::scan::hash_file(path).expect("hash"),
        }
    }

    pub(super) fn replace(path: &str, bytes: &[u8], expect: Expected) -> Op {
        Op::Write {
            path: p(path),
            content: Content::Bytes(bytes.to_vec().into()),
            mode: 0o644,
            new: false,
            expect: Some(expect),
        }
    }

    pub(super) fn temps_in(dir: &Path) -> usize {
        std::fs::read_dir(dir)
            .expect("ls")
            .filter_map(Result::ok)
            .filter(|e| {
                e.file_name()
                    .to_str()
                    .is_some_and(crate::fs::ignore::Ignore::is_temp)
            })
            .count()
    }
}
