//! Planning a peer record onto this node's disk, PURE: the record the model decided, and what
//! this node has at its path (its record, whether the file is held back by the XML gate, the
//! stat key the index last saw) give the one disk [`Step`] that makes the path match. No disk,
//! no clock: `remote::stage` acts on the step (keeps copies, fetches, stages the ops).

use crate::fs::apply::Expected;
use crate::model::{FileRecord, Hash, Kind};
use crate::store::StatKey;

/// What the disk must undergo for a decided record. `expect` is the file (stat key and
/// content hash) the local file must still be when it is replaced or removed (checked at that very moment, see
/// `apply::Op::Write`); `new` says no file is expected at the path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(in crate::engine) enum Step {
    /// The disk already matches.
    Nothing,
    Mkdir {
        mode: u32,
    },
    /// Same bytes already here: only the mode differs.
    Chmod {
        mode: u32,
    },
    RemoveDir,
    RemoveFile {
        expect: Option<Expected>,
    },
    /// Write the content that travelled inline.
    Write {
        new: bool,
        expect: Option<Expected>,
    },
    /// Fetch the content from the peer, then write it.
    Fetch {
        hash: Hash,
        new: bool,
        expect: Option<Expected>,
    },
    /// A live file record without a hash: nothing can be written for it.
    NoHash,
}

/// True when `record` replaces the local file's bytes or removes the path: local bytes held
/// back by the XML gate were never shipped, so such a record keeps them as a copy first.
pub(in crate::engine) fn rewrites(record: &FileRecord, local: Option<&FileRecord>) -> bool {
    let local_live = local.filter(|l| !l.deleted);
    record.deleted
        || (record.kind == Kind::File
            && !local_live.is_some_and(|l| l.kind == Kind::File && l.hash == record.hash))
}

/// The step that puts `record` on disk. `local`: this node's record of the path; `held`: the
/// local file is held back and was kept as a copy just now (it is replaced as it is); `stat`:
/// the stat key the index knows for the path; `inline`: the hash of the content that travelled
/// with the record (checked at the edge), if any.
pub(in crate::engine) fn step(
    record: &FileRecord,
    local: Option<&FileRecord>,
    held: bool,
    stat: Option<StatKey>,
    inline: Option<&Hash>,
) -> Step {
    let local_live = local.filter(|l| !l.deleted);
    // What the local file must still be when it is replaced or removed: the file the index
    // knows. A held file was kept just now and is replaced as it is.
    let expect = match local_live {
        Some(l) if l.kind == Kind::File && !held => {
            stat.zip(l.hash).map(|(key, hash)| Expected { key, hash })
        }
        _ => None,
    };
    if record.deleted {
        return match local_live.map(|l| l.kind) {
            Some(Kind::Dir) => Step::RemoveDir,
            Some(Kind::File) => Step::RemoveFile { expect },
            None => Step::Nothing,
        };
    }
    if record.kind == Kind::Dir {
        return match local_live {
            Some(l) if l.kind == Kind::Dir && l.mode == record.mode => Step::Nothing,
            _ => Step::Mkdir { mode: record.mode },
        };
    }
    if local_live.is_some_and(|l| l.kind == Kind::File && l.hash == record.hash) {
        // Same bytes already here: at most the mode differs.
        return match local_live {
            Some(l) if l.mode == record.mode => Step::Nothing,
            _ => Step::Chmod { mode: record.mode },
        };
    }
    let Some(hash) = record.hash else {
        return Step::NoHash;
    };
    let new = local_live.is_none() && !held;
    match inline {
        // Checked against its hash at the edge; a record for other bytes (a newer version of
        // the path) fetches instead.
        Some(h) if *h == hash => Step::Write { new, expect },
        _ => Step::Fetch { hash, new, expect },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{NodeId, RelPath, Stamp, VersionVector};

    fn file(bytes: &[u8], mode: u32) -> FileRecord {
        FileRecord {
            path: RelPath::new("a/b.xml").expect("valid"),
            kind: Kind::File,
            deleted: false,
            size: bytes.len() as u64,
            mode,
            hash: Some(*blake3::hash(bytes).as_bytes()),
            version: VersionVector::new(),
            stamp: Stamp {
                hlc: 1,
                node: NodeId(1),
            },
            seq: 1,
        }
    }

    fn dir(mode: u32) -> FileRecord {
        FileRecord {
            kind: Kind::Dir,
            size: 0,
            hash: None,
            ..file(b"", mode)
        }
    }

    fn deleted(r: FileRecord) -> FileRecord {
        FileRecord { deleted: true, ..r }
    }

    /// What a replacement of `local` expects: the index's stat key and the local content.
    fn indexed(local: &FileRecord) -> Expected {
        Expected {
            key: STAT,
            hash: local.hash.expect("a file"),
        }
    }

    const STAT: StatKey = StatKey {
        size: 3,
        mtime_ns: 42,
        ino: 7,
    };

    #[test]
    fn a_new_file_is_written_from_inline_bytes_or_fetched() {
        let r = file(b"new", 0o644);
        let hash = r.hash.expect("hash");
        let expect = None;
        assert_eq!(
            step(&r, None, false, None, Some(&hash)),
            Step::Write { new: true, expect }
        );
        assert_eq!(
            step(&r, None, false, None, None),
            Step::Fetch {
                hash,
                new: true,
                expect
            }
        );
        // Inline bytes of another version: fetched instead.
        let other = *blake3::hash(b"other").as_bytes();
        assert_eq!(
            step(&r, None, false, None, Some(&other)),
            Step::Fetch {
                hash,
                new: true,
                expect
            }
        );
    }

    #[test]
    fn a_changed_file_expects_the_stat_the_index_knows_unless_it_is_held() {
        let (r, local) = (file(b"new", 0o644), file(b"old", 0o644));
        let hash = r.hash.expect("hash");
        assert_eq!(
            step(&r, Some(&local), false, Some(STAT), Some(&hash)),
            Step::Write {
                new: false,
                expect: Some(indexed(&local))
            }
        );
        // A held file was kept as a copy just now: replaced as it is, and not as new.
        assert_eq!(
            step(&r, Some(&local), true, Some(STAT), Some(&hash)),
            Step::Write {
                new: false,
                expect: None
            }
        );
        assert_eq!(
            step(&r, None, true, None, None),
            Step::Fetch {
                hash,
                new: false,
                expect: None
            }
        );
    }

    #[test]
    fn same_bytes_change_the_mode_at_most() {
        let local = file(b"same", 0o644);
        assert_eq!(
            step(&file(b"same", 0o644), Some(&local), false, Some(STAT), None),
            Step::Nothing
        );
        assert_eq!(
            step(&file(b"same", 0o600), Some(&local), false, Some(STAT), None),
            Step::Chmod { mode: 0o600 }
        );
    }

    #[test]
    fn a_delete_removes_what_is_there() {
        let gone = deleted(file(b"x", 0o644));
        let local = file(b"x", 0o644);
        assert_eq!(
            step(&gone, Some(&local), false, Some(STAT), None),
            Step::RemoveFile {
                expect: Some(indexed(&local))
            }
        );
        assert_eq!(
            step(&gone, Some(&dir(0o755)), false, None, None),
            Step::RemoveDir
        );
        assert_eq!(step(&gone, None, false, None, None), Step::Nothing);
        // A local tombstone is nothing on disk.
        let tomb = deleted(file(b"x", 0o644));
        assert_eq!(
            step(&gone, Some(&tomb), false, Some(STAT), None),
            Step::Nothing
        );
    }

    #[test]
    fn a_directory_is_made_unless_it_is_there_with_its_mode() {
        assert_eq!(
            step(&dir(0o755), Some(&dir(0o755)), false, None, None),
            Step::Nothing
        );
        assert_eq!(
            step(&dir(0o700), Some(&dir(0o755)), false, None, None),
            Step::Mkdir { mode: 0o700 }
        );
        assert_eq!(
            step(&dir(0o755), None, false, None, None),
            Step::Mkdir { mode: 0o755 }
        );
        // A file in the way of a directory: the directory is made (the apply replaces it).
        assert_eq!(
            step(
                &dir(0o755),
                Some(&file(b"x", 0o644)),
                false,
                Some(STAT),
                None
            ),
            Step::Mkdir { mode: 0o755 }
        );
    }

    #[test]
    fn a_live_file_without_a_hash_cannot_be_planned() {
        let r = FileRecord {
            hash: None,
            ..file(b"x", 0o644)
        };
        assert_eq!(step(&r, None, false, None, None), Step::NoHash);
    }

    #[test]
    fn only_other_bytes_or_a_delete_rewrite_a_file() {
        let local = file(b"x", 0o644);
        assert!(!rewrites(&file(b"x", 0o600), Some(&local)));
        assert!(rewrites(&file(b"y", 0o644), Some(&local)));
        assert!(rewrites(&deleted(file(b"x", 0o644)), Some(&local)));
        assert!(rewrites(&file(b"x", 0o644), None));
        assert!(rewrites(&file(b"x", 0o644), Some(&deleted(local))));
        assert!(!rewrites(&dir(0o755), None));
    }
}
