//! A batch of ops in six phases: (1) directories and chmods, (2) the new contents written
//! next to their targets ([`stage_batch`], which returns a [`StagedBatch`]), then
//! ([`StagedBatch::finish`]) (3) durability for all of them at once, (4) into place,
//! (5) removals, (6) the directory entries synced. The engine finishes one batch while it
//! stages the next, and merges inline contents with fetched ones ([`StagedBatch::merge`]).

use std::collections::BTreeSet;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use crate::fs::own::OwnWrites;
use crate::fs::par;
use crate::model::RelPath;
use crate::store::StatKey;

use super::guard::SymlinkCheck;
use super::place::{place, remove_checked};
use super::temp::{Staged, proc_fd_available, unnamed_budget, write_temp};
use super::{Content, Op, OpResult, parent_dir, stat_of, sync_dir, syncfs};

/// Above this many files in a batch, one `syncfs` replaces per-file `fsync`s.
const SYNCFS_THRESHOLD: usize = 8;

/// A batch whose directories and chmods are done and whose new contents are written, but not
/// durable and not in place yet: nothing of it is visible at a target path. The engine
/// finishes one batch (waits for its durability, puts it in place) while it stages the next.
#[derive(Debug)]
pub struct StagedBatch {
    root: PathBuf,
    ops: Vec<Op>,
    order: Vec<usize>,
    results: Vec<Option<OpResult>>,
    dirty_dirs: BTreeSet<PathBuf>,
    staged: Vec<(usize, Staged, StatKey)>,
}

/// Phases 1 and 2 of [`super::apply_batch`]: directories and chmods, then the new contents
/// written next to their targets.
pub fn stage_batch(root: &Path, ops: Vec<Op>, own: Option<&OwnWrites>) -> StagedBatch {
    let n = ops.len();
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by_key(|i| ops[*i].rank());
    let mut results: Vec<Option<OpResult>> = (0..n).map(|_| None).collect();
    let mut dirty_dirs: BTreeSet<PathBuf> = BTreeSet::new();
    let writes = prepare(root, &ops, &order, &mut results, &mut dirty_dirs);
    let staged = write_contents(root, &ops, &writes, own, &mut results);
    StagedBatch {
        root: root.to_owned(),
        ops,
        order,
        results,
        dirty_dirs,
        staged,
    }
}

/// Phase 1: directories and chmods, in order; returns the writes (indices into `ops`).
fn prepare(
    root: &Path,
    ops: &[Op],
    order: &[usize],
    results: &mut [Option<OpResult>],
    dirty_dirs: &mut BTreeSet<PathBuf>,
) -> Vec<usize> {
    let mut links = SymlinkCheck::default();
    let mut writes: Vec<usize> = Vec::new();
    for &i in order {
        let target = root.join(ops[i].path().as_str());
        // Chmod would follow a link at the target itself; the others act on the link.
        let include_self = matches!(ops[i], Op::Chmod { .. } | Op::Mkdir { .. });
        if let Err(e) = links.check(root, ops[i].path(), include_self) {
            if let Op::Write {
                content: Content::Temp(tmp),
                ..
            } = &ops[i]
            {
                let _ = std::fs::remove_file(tmp);
            }
            results[i] = Some(Err(e));
            continue;
        }
        match &ops[i] {
            Op::Mkdir { path, mode } => {
                results[i] = Some(make_dir(root, path, &target, *mode, dirty_dirs));
            }
            Op::Chmod { mode, .. } => {
                let r = std::fs::set_permissions(&target, std::fs::Permissions::from_mode(*mode))
                    .and_then(|_| stat_of(&target));
                results[i] = Some(r);
            }
            Op::Write { .. } => writes.push(i),
            Op::RemoveFile { .. } | Op::RemoveDir { .. } => {}
        }
    }
    writes
}

/// One `Op::Mkdir` of phase 1.
fn make_dir(
    root: &Path,
    path: &RelPath,
    target: &Path,
    mode: u32,
    dirty_dirs: &mut BTreeSet<PathBuf>,
) -> OpResult {
    match std::fs::symlink_metadata(target) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                "a file stands where a directory should be",
            ));
        }
        Err(_) => std::fs::create_dir_all(target)?,
    }
    // Its entry in the parent is synced with the batch even when the directory was there
    // already: a write of this batch (or a fetch) may have created it a moment ago, for a
    // file below it.
    dirty_dirs.insert(parent_dir(root, path));
    std::fs::set_permissions(target, std::fs::Permissions::from_mode(mode))?;
    stat_of(target)
}

/// Phase 2: the new contents, written in parallel (not durable yet). New files use unnamed
/// temp files while the batch's share of descriptors lasts.
fn write_contents(
    root: &Path,
    ops: &[Op],
    writes: &[usize],
    own: Option<&OwnWrites>,
    results: &mut [Option<OpResult>],
) -> Vec<(usize, Staged, StatKey)> {
    let mut unnamed_left = if proc_fd_available() {
        unnamed_budget()
    } else {
        0
    };
    let jobs: Vec<(usize, bool)> = writes
        .iter()
        .map(|&i| {
            let unnamed = matches!(
                &ops[i],
                Op::Write {
                    new: true,
                    content: Content::Bytes(_),
                    ..
                }
            ) && unnamed_left > 0;
            unnamed_left -= usize::from(unnamed);
            (i, unnamed)
        })
        .collect();
    let threads = par::threads_for(jobs.len());
    let written = par::map(&jobs, threads, |&(i, unnamed)| match &ops[i] {
        Op::Write {
            path,
            content,
            mode,
            ..
        } => write_temp(&parent_dir(root, path), content, *mode, unnamed, own),
        _ => Err(std::io::Error::other("not a write")),
    });
    let mut staged: Vec<(usize, Staged, StatKey)> = Vec::with_capacity(writes.len());
    for (&i, w) in writes.iter().zip(written) {
        match w {
            Ok((s, key)) => staged.push((i, s, key)),
            Err(e) => results[i] = Some(Err(e)),
        }
    }
    staged
}

impl StagedBatch {
    /// One batch of this one's ops followed by `other`'s (results in that order), staged
    /// separately under the same root (the second batch's ops must not need the first one's
    /// directories: a write creates its directory when missing).
    pub fn merge(mut self, other: StagedBatch) -> StagedBatch {
        let offset = self.ops.len();
        self.ops.extend(other.ops);
        self.results.extend(other.results);
        self.order
            .extend(other.order.into_iter().map(|i| i + offset));
        // Stable: within a rank, this batch's ops stay before the other's.
        self.order.sort_by_key(|i| self.ops[*i].rank());
        self.dirty_dirs.extend(other.dirty_dirs);
        self.staged.extend(
            other
                .staged
                .into_iter()
                .map(|(i, s, key)| (i + offset, s, key)),
        );
        self
    }

    /// Throws the staged contents away (a batch that will not be applied after all).
    pub fn discard(self) {
        for (_, s, _) in &self.staged {
            s.discard();
        }
    }

    /// Phases 3 to 6: durability, into place, removals, directory sync.
    pub fn finish(self, own: Option<&OwnWrites>) -> Vec<OpResult> {
        let StagedBatch {
            root,
            ops,
            order,
            mut results,
            mut dirty_dirs,
            mut staged,
        } = self;
        let root = root.as_path();
        let t0 = std::time::Instant::now();
        make_durable(root, &mut staged, &mut results);
        let t_durable = t0.elapsed();
        place_all(root, &ops, &staged, own, &mut results, &mut dirty_dirs);
        remove_all(root, &ops, &order, &mut results, &mut dirty_dirs);
        let t_placed = t0.elapsed();
        sync_dirs(root, &dirty_dirs, &mut results);
        tracing::debug!(
            root = %root.display(),
            files = staged.len(),
            durable_us = t_durable.as_micros() as u64,
            placed_us = (t_placed - t_durable).as_micros() as u64,
            dirs_synced_us = (t0.elapsed() - t_placed).as_micros() as u64,
            "batch finished"
        );
        results
            .into_iter()
            .map(|r| r.unwrap_or_else(|| Err(std::io::Error::other("op not carried out"))))
            .collect()
    }
}

/// `e` as the error of every op it fails: the errno is kept, it says the trouble is the
/// node's, not the path's.
fn node_error(e: &std::io::Error) -> std::io::Error {
    match e.raw_os_error() {
        Some(code) => std::io::Error::from_raw_os_error(code),
        None => std::io::Error::new(e.kind(), e.to_string()),
    }
}

/// Phase 3: make the new contents durable, together. On failure every staged content is
/// discarded and its op fails.
fn make_durable(
    root: &Path,
    staged: &mut Vec<(usize, Staged, StatKey)>,
    results: &mut [Option<OpResult>],
) {
    let durable = if staged.len() > SYNCFS_THRESHOLD {
        syncfs(root)
    } else {
        // At the same time: concurrent fsyncs share the file system's journal commits,
        // where one after another each waits for its own.
        par::map(staged, staged.len(), |(_, s, _)| s.sync())
            .into_iter()
            .collect()
    };
    if let Err(e) = durable {
        for (i, s, _) in staged.drain(..) {
            s.discard();
            results[i] = Some(Err(node_error(&e)));
        }
    }
}

/// Phase 4: into place; in parallel unless two writes share a target (then their order
/// matters).
fn place_all(
    root: &Path,
    ops: &[Op],
    staged: &[(usize, Staged, StatKey)],
    own: Option<&OwnWrites>,
    results: &mut [Option<OpResult>],
    dirty_dirs: &mut BTreeSet<PathBuf>,
) {
    let targets: BTreeSet<&RelPath> = staged.iter().map(|(i, _, _)| ops[*i].path()).collect();
    let threads = if targets.len() == staged.len() {
        par::threads_for(staged.len())
    } else {
        1
    };
    let placed = par::map_grouped(
        staged,
        threads,
        |(i, _, _)| ops[*i].path().parent(),
        |(i, s, key)| {
            let (new, expect) = match &ops[*i] {
                Op::Write { new, expect, .. } => (*new, expect.as_ref()),
                _ => (false, None),
            };
            // The stat key is the temp file's, taken before it was put in place: a local
            // edit landing on the target right after ours must not be taken for our write
            // (nor fail an apply that already happened).
            let target = root.join(ops[*i].path().as_str());
            place(s, key, &target, new, expect, own).map(|_| Some(*key))
        },
    );
    for ((i, _, _), r) in staged.iter().zip(placed) {
        if r.is_ok() {
            dirty_dirs.insert(parent_dir(root, ops[*i].path()));
        }
        results[*i] = Some(r);
    }
}

/// Phase 5: removals (files, then directories deepest first: `order` is sorted so).
fn remove_all(
    root: &Path,
    ops: &[Op],
    order: &[usize],
    results: &mut [Option<OpResult>],
    dirty_dirs: &mut BTreeSet<PathBuf>,
) {
    for &i in order {
        if results[i].is_some() {
            continue;
        }
        let target = root.join(ops[i].path().as_str());
        let r = match &ops[i] {
            Op::RemoveFile {
                expect: Some(expect),
                ..
            } => remove_checked(&target, expect),
            Op::RemoveFile { expect: None, .. } => match std::fs::symlink_metadata(&target) {
                Ok(m) if m.is_dir() => Err(std::io::Error::new(
                    std::io::ErrorKind::IsADirectory,
                    "a directory stands where a file was deleted",
                )),
                Ok(_) => std::fs::remove_file(&target).map(|_| None),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(e),
            },
            Op::RemoveDir { .. } => match std::fs::remove_dir(&target) {
                Ok(()) => Ok(None),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(e),
            },
            _ => continue,
        };
        if r.is_ok() {
            dirty_dirs.insert(parent_dir(root, ops[i].path()));
        }
        results[i] = Some(r);
    }
}

/// Phase 6: the directory entries themselves.
fn sync_dirs(root: &Path, dirty_dirs: &BTreeSet<PathBuf>, results: &mut [Option<OpResult>]) {
    let dir_sync = if dirty_dirs.len() > SYNCFS_THRESHOLD {
        syncfs(root)
    } else {
        // At the same time, as the contents (see `make_durable`).
        let dirs: Vec<&PathBuf> = dirty_dirs.iter().filter(|d| d.exists()).collect();
        par::map(&dirs, dirs.len(), |d| sync_dir(d))
            .into_iter()
            .collect()
    };
    #[cfg(test)]
    let dir_sync = dir_sync.and_then(|()| tests::injected_dir_sync_failure());
    if let Err(e) = dir_sync {
        // The entries are in place but not durable: nothing of the batch may be committed
        // to the index (it would claim what a power loss can take back). Every op fails
        // with the node's error, and the batch is retried as for any node problem.
        tracing::warn!(root = %root.display(), error = %e, "directory sync failed; the batch fails");
        for r in results.iter_mut() {
            if matches!(r, Some(Ok(_))) {
                *r = Some(Err(node_error(&e)));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::os::unix::fs::PermissionsExt;

    use super::*;
    use crate::fs::apply::testing::{expected, p, write};
    use crate::fs::apply::{apply_batch, create_temp, remove_stale_temps};
    use crate::fs::scan::stat_key;

    #[test]
    fn batch_creates_writes_and_removes_in_a_safe_order() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path();
        std::fs::create_dir_all(root.join("old/deep")).expect("mkdir");
        std::fs::write(root.join("old/deep/f"), b"x").expect("write");
        let mut ops = vec![
            Op::RemoveDir { path: p("old") },
            Op::RemoveDir {
                path: p("old/deep"),
            },
            Op::RemoveFile {
                path: p("old/deep/f"),
                expect: None,
            },
            Op::Write {
                path: p("api/sub/b.xml"),
                content: Content::Bytes(b"<b/>".to_vec().into()),
                mode: 0o640,
                new: true,
                expect: None,
            },
            Op::Mkdir {
                path: p("api/sub"),
                mode: 0o750,
            },
            Op::Mkdir {
                path: p("api"),
                mode: 0o755,
            },
        ];
        for i in 0..20 {
            ops.push(Op::Write {
                path: p(&format!("many/{i}.xml")),
                content: Content::Bytes(vec![b'a'; i].into()),
                mode: 0o644,
                new: true,
                expect: None,
            });
        }
        let results = apply_batch(root, ops, None);
        for r in &results {
            assert!(r.is_ok(), "{r:?}");
        }
        assert!(!root.join("old").exists());
        assert_eq!(
            std::fs::read(root.join("api/sub/b.xml")).expect("read"),
            b"<b/>"
        );
        let mode = std::fs::metadata(root.join("api/sub/b.xml"))
            .expect("meta")
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o640);
        let mode = std::fs::metadata(root.join("api/sub"))
            .expect("meta")
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o750);
        assert_eq!(
            std::fs::read(root.join("many/19.xml")).expect("read").len(),
            19
        );
        assert_eq!(remove_stale_temps(root), 0, "no temp file is left behind");
    }

    /// A directory that a fetch (or another write) created just before its Mkdir op still has
    /// its entry synced with the batch.
    #[test]
    fn a_new_directory_found_already_there_still_gets_its_parent_synced() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path();
        std::fs::create_dir_all(root.join("default/api")).expect("made by a fetch");
        let staged = stage_batch(
            root,
            vec![Op::Mkdir {
                path: p("default/api"),
                mode: 0o755,
            }],
            None,
        );
        assert!(
            staged.dirty_dirs.contains(&root.join("default")),
            "{:?}",
            staged.dirty_dirs
        );
        assert!(staged.finish(None).iter().all(Result::is_ok));
    }

    /// Inline contents and fetched ones are staged apart and finished as one batch: results
    /// come back in the merged order, removals still run after the writes, and a temp file
    /// written by a fetch is put in place like any other.
    #[test]
    fn two_staged_batches_merge_into_one() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path();
        std::fs::create_dir_all(root.join("gone")).expect("mkdir");
        std::fs::write(root.join("gone/old.xml"), b"<old/>").expect("write");
        std::fs::write(root.join("d.xml"), b"<d/>").expect("write");
        let first = stage_batch(
            root,
            vec![
                Op::RemoveDir { path: p("gone") },
                write("api/a.xml", b"<a/>", 0o644, true),
                Op::RemoveFile {
                    path: p("gone/old.xml"),
                    expect: None,
                },
                Op::Mkdir {
                    path: p("api"),
                    mode: 0o750,
                },
            ],
            None,
        );
        std::fs::create_dir_all(root.join("big")).expect("mkdir");
        let (mut f, tmp) = create_temp(&root.join("big"), 0o600).expect("fetched temp");
        f.write_all(b"<big/>").expect("fetched bytes");
        drop(f);
        let second = stage_batch(
            root,
            vec![
                Op::Write {
                    path: p("big/b.xml"),
                    content: Content::Temp(tmp),
                    mode: 0o640,
                    new: true,
                    expect: None,
                },
                write("c.xml", b"<c/>", 0o644, false),
                Op::RemoveFile {
                    path: p("d.xml"),
                    expect: None,
                },
            ],
            None,
        );
        let results = first.merge(second).finish(None);
        assert_eq!(results.len(), 7);
        for (i, r) in results.iter().enumerate() {
            assert!(r.is_ok(), "op {i}: {r:?}");
        }
        assert!(
            results[0].as_ref().is_ok_and(|k| k.is_none()),
            "dir removed"
        );
        assert!(
            results[2].as_ref().is_ok_and(|k| k.is_none()),
            "file removed"
        );
        assert!(
            results[4].as_ref().is_ok_and(|k| k.is_some()),
            "fetched file placed"
        );
        assert!(
            results[6].as_ref().is_ok_and(|k| k.is_none()),
            "second batch's removal"
        );
        assert!(!root.join("gone").exists());
        assert!(!root.join("d.xml").exists());
        assert_eq!(std::fs::read(root.join("api/a.xml")).expect("a"), b"<a/>");
        assert_eq!(std::fs::read(root.join("big/b.xml")).expect("b"), b"<big/>");
        assert_eq!(std::fs::read(root.join("c.xml")).expect("c"), b"<c/>");
        let mode = |rel: &str| {
            std::fs::metadata(root.join(rel))
                .expect("stat")
                .permissions()
                .mode()
                & 0o777
        };
        assert_eq!(mode("api"), 0o750);
        assert_eq!(mode("big/b.xml"), 0o640);
        assert_eq!(remove_stale_temps(root), 0, "no temp file left");
    }

    #[test]
    fn a_large_batch_lands_whole_and_a_repeated_target_keeps_the_later_write() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path();
        let mut ops: Vec<Op> = (0..300)
            .map(|i| Op::Write {
                path: p(&format!("d{}/{i}.xml", i % 3)),
                content: Content::Bytes(format!("<f n=\"{i}\"/>").into_bytes().into()),
                mode: 0o640,
                new: true,
                expect: None,
            })
            .collect();
        ops.push(Op::Write {
            path: p("d0/0.xml"),
            content: Content::Bytes(b"<later/>".to_vec().into()),
            mode: 0o600,
            new: false,
            expect: None,
        });
        let results = apply_batch(root, ops, None);
        assert_eq!(results.len(), 301);
        for (i, r) in results.iter().enumerate().take(300) {
            let stat = r.as_ref().expect("applied").expect("a file is there");
            if i == 0 {
                continue;
            }
            let target = root.join(format!("d{}/{i}.xml", i % 3));
            assert_eq!(
                std::fs::read(&target).expect("read"),
                format!("<f n=\"{i}\"/>").into_bytes()
            );
            let meta = std::fs::symlink_metadata(&target).expect("meta");
            assert_eq!(
                stat,
                stat_key(&meta),
                "{i}: the returned stat key is the file's"
            );
            assert_eq!(meta.permissions().mode() & 0o777, 0o640);
        }
        assert_eq!(
            std::fs::read(root.join("d0/0.xml")).expect("read"),
            b"<later/>"
        );
        assert_eq!(remove_stale_temps(root), 0, "no temp file is left behind");
    }

    /// New files go through unnamed temp files: nothing but the finished file is ever seen
    /// in the directory, and the watcher is told which creation and which temp are ours.
    #[test]
    fn new_files_are_staged_unnamed_and_announced_to_the_watcher() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path();
        let own = OwnWrites::default();
        let r = apply_batch(
            root,
            vec![write("api/new.xml", b"<new/>", 0o640, true)],
            Some(&own),
        );
        let stat = r[0].as_ref().expect("applied").expect("a file");
        let meta = std::fs::symlink_metadata(root.join("api/new.xml")).expect("meta");
        assert_eq!(stat, stat_key(&meta));
        assert_eq!(meta.permissions().mode() & 0o777, 0o640);
        let names: Vec<_> = std::fs::read_dir(root.join("api"))
            .expect("list")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("new.xml")]);
        if proc_fd_available() {
            use std::os::unix::fs::MetadataExt;
            assert!(own.take_create(&root.join("api/new.xml")));
            assert!(own.is_own_temp_name(&format!("#{}", meta.ino())));
        }
    }

    #[test]
    fn non_empty_directory_removal_fails_without_touching_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir_all(dir.path().join("d")).expect("mkdir");
        std::fs::write(dir.path().join("d/keep.swp"), b"x").expect("write");
        let r = apply_batch(dir.path(), vec![Op::RemoveDir { path: p("d") }], None);
        assert!(r[0].is_err());
        assert!(dir.path().join("d/keep.swp").exists());
    }

    thread_local! {
        /// Makes the directory sync of batches finished on this thread fail (EIO).
        static FAIL_DIR_SYNC: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    }

    pub(super) fn injected_dir_sync_failure() -> std::io::Result<()> {
        if FAIL_DIR_SYNC.with(|f| f.get()) {
            Err(std::io::Error::from_raw_os_error(nix::libc::EIO))
        } else {
            Ok(())
        }
    }

    /// Issue 12, item 7: a batch whose directories could not be synced must not be committed
    /// (the index would claim entries a power loss can take back): every op that had
    /// succeeded fails with the node's error, so the engine retries it as a node problem.
    #[test]
    fn a_failed_directory_sync_fails_the_batch() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path();
        std::fs::write(root.join("old.xml"), b"<old/>").expect("write");
        let ops = vec![
            write("new.xml", b"<new/>", 0o644, true),
            Op::RemoveFile {
                path: p("old.xml"),
                expect: Some(expected(&root.join("old.xml"))),
            },
        ];
        FAIL_DIR_SYNC.with(|f| f.set(true));
        let results = apply_batch(root, ops, None);
        FAIL_DIR_SYNC.with(|f| f.set(false));
        assert_eq!(results.len(), 2);
        for r in &results {
            let e = r
                .as_ref()
                .expect_err("no op of the batch may count as done");
            assert_eq!(e.raw_os_error(), Some(nix::libc::EIO), "{e}");
        }
    }
}
