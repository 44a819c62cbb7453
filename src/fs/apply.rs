//! Writing to a folder without ever exposing a partial file: content goes to a temp file
//! `.artisync.<random>.tmp` in the target's directory, is made durable, renamed into place, and
//! the directory is synced. Batches pay for durability once (`syncfs`) instead of per file.

use std::collections::{BTreeSet, HashMap};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::model::RelPath;
use crate::store::StatKey;

use super::ignore::{TEMP_PREFIX, TEMP_SUFFIX};
use super::scan::stat_key;

/// Above this many files in a batch, one `syncfs` replaces per-file `fsync`s.
const SYNCFS_THRESHOLD: usize = 8;

/// Where the new bytes of a file come from.
#[derive(Debug)]
pub enum Content {
    Bytes(Vec<u8>),
    /// A temp file already written (and verified) in the target's directory.
    Temp(PathBuf),
}

/// One change to make on disk.
#[derive(Debug)]
pub enum Op {
    Write {
        path: RelPath,
        content: Content,
        mode: u32,
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
            | Op::RemoveFile { path }
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

/// A new temp file in `dir`, never with a deployable extension.
pub fn create_temp(dir: &Path, mode: u32) -> std::io::Result<(File, PathBuf)> {
    std::fs::create_dir_all(dir)?;
    for _ in 0..16 {
        let name = format!("{TEMP_PREFIX}{:016x}{TEMP_SUFFIX}", rand::random::<u64>());
        let path = dir.join(name);
        match OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode & 0o777 | 0o600)
            .open(&path)
        {
            Ok(f) => return Ok((f, path)),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    }
    Err(std::io::Error::other("could not create a unique temp file"))
}

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

/// Refuses a path that would pass through a symlink (a directory replaced by a link must not
/// let a peer write outside the folder root). Missing components are fine: they get created.
fn check_no_symlink(root: &Path, path: &RelPath, include_self: bool) -> std::io::Result<()> {
    let mut at = root.to_owned();
    let parts: Vec<&str> = path.as_str().split('/').collect();
    let upto = if include_self {
        parts.len()
    } else {
        parts.len() - 1
    };
    for part in &parts[..upto] {
        at.push(part);
        match std::fs::symlink_metadata(&at) {
            Ok(m) if m.file_type().is_symlink() => return Err(symlink_refused(&at)),
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn symlink_refused(at: &Path) -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::PermissionDenied,
        format!(
            "{} is a symlink; artisync never writes through symlinks",
            at.display()
        ),
    )
}

/// [`check_no_symlink`] for many paths in few directories: each directory is checked once per
/// batch (a batch of thousands of files would otherwise pay one `lstat` per file and level).
#[derive(Default)]
struct SymlinkCheck {
    /// Directory (relative) -> `None` when it is safe, the refusal otherwise.
    dirs: HashMap<Option<RelPath>, Option<(std::io::ErrorKind, String)>>,
}

impl SymlinkCheck {
    fn check(&mut self, root: &Path, path: &RelPath, include_self: bool) -> std::io::Result<()> {
        if include_self {
            return check_no_symlink(root, path, true);
        }
        let dir = path.parent();
        let verdict = self.dirs.entry(dir.clone()).or_insert_with(|| match &dir {
            None => None,
            Some(d) => check_no_symlink(root, d, true)
                .err()
                .map(|e| (e.kind(), e.to_string())),
        });
        match verdict {
            None => Ok(()),
            Some((kind, text)) => Err(std::io::Error::new(*kind, text.clone())),
        }
    }
}

/// Writes of a batch above this many are spread over several threads: file creation is
/// mostly kernel time, and creations in one directory still overlap well.
const PARALLEL_MIN_FILES: usize = 64;
const MAX_WRITER_THREADS: usize = 4;

fn writer_threads(files: usize) -> usize {
    if files < PARALLEL_MIN_FILES {
        return 1;
    }
    std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .clamp(1, MAX_WRITER_THREADS)
}

/// Runs `f` on every item, on up to `threads` threads; results come back in item order.
fn map_parallel<T: Sync, R: Send>(
    items: &[T],
    threads: usize,
    f: impl Fn(&T) -> R + Sync,
) -> Vec<R> {
    if threads <= 1 || items.len() < 2 {
        return items.iter().map(f).collect();
    }
    let per = items.len().div_ceil(threads);
    std::thread::scope(|scope| {
        let f = &f;
        let handles: Vec<_> = items
            .chunks(per)
            .map(|chunk| scope.spawn(move || chunk.iter().map(f).collect::<Vec<R>>()))
            .collect();
        // A writer thread can only panic on a bug; the panic is carried on, not swallowed.
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
            .collect()
    })
}

/// Writes one file's new bytes to a temp file next to `target` with `mode`; returns the temp
/// file and the stat key the target will have once the temp file is renamed onto it (a rename
/// keeps inode, size and mtime).
fn write_temp(dir: &Path, content: &Content, mode: u32) -> std::io::Result<(PathBuf, StatKey)> {
    match content {
        Content::Bytes(bytes) => {
            let (mut f, tmp) = create_temp(dir, mode)?;
            let written = (|| {
                f.write_all(bytes)?;
                let meta = f.metadata()?;
                // `create_temp` asked for the mode already; the umask may have taken bits.
                if meta.permissions().mode() & 0o7777 != mode {
                    f.set_permissions(std::fs::Permissions::from_mode(mode))?;
                }
                Ok(stat_key(&meta))
            })();
            match written {
                Ok(key) => Ok((tmp, key)),
                Err(e) => {
                    let _ = std::fs::remove_file(&tmp);
                    Err(e)
                }
            }
        }
        Content::Temp(tmp) => {
            let r = std::fs::set_permissions(tmp, std::fs::Permissions::from_mode(mode))
                .and_then(|_| std::fs::symlink_metadata(tmp));
            match r {
                Ok(meta) => Ok((tmp.clone(), stat_key(&meta))),
                Err(e) => {
                    let _ = std::fs::remove_file(tmp);
                    Err(e)
                }
            }
        }
    }
}

/// Carries out `ops` under `root` and returns one result per op, in the order given.
/// Every op either fully happens or leaves the target as it was (temp files are cleaned up).
pub fn apply_batch(root: &Path, ops: Vec<Op>) -> Vec<OpResult> {
    let n = ops.len();
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by_key(|i| ops[*i].rank());
    let mut results: Vec<Option<OpResult>> = (0..n).map(|_| None).collect();
    let mut dirty_dirs: BTreeSet<PathBuf> = BTreeSet::new();
    let mut links = SymlinkCheck::default();
    // Phase 1: directories and chmods, in order; the writes are collected.
    let mut writes: Vec<usize> = Vec::new();
    for &i in &order {
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
            Op::Mkdir { mode, .. } => {
                let r = (|| {
                    match std::fs::symlink_metadata(&target) {
                        Ok(m) if m.is_dir() => {}
                        Ok(_) => {
                            return Err(std::io::Error::new(
                                std::io::ErrorKind::AlreadyExists,
                                "a file stands where a directory should be",
                            ));
                        }
                        Err(_) => {
                            std::fs::create_dir_all(&target)?;
                            dirty_dirs.insert(parent_dir(root, ops[i].path()));
                        }
                    }
                    std::fs::set_permissions(&target, std::fs::Permissions::from_mode(*mode))?;
                    stat_of(&target)
                })();
                results[i] = Some(r);
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
    // Phase 2: the temp files, written in parallel (not durable yet).
    let threads = writer_threads(writes.len());
    let written = map_parallel(&writes, threads, |&i| match &ops[i] {
        Op::Write {
            path,
            content,
            mode,
        } => write_temp(&parent_dir(root, path), content, *mode),
        _ => Err(std::io::Error::other("not a write")),
    });
    let mut temps: Vec<(usize, PathBuf, StatKey)> = Vec::with_capacity(writes.len());
    for (&i, w) in writes.iter().zip(written) {
        match w {
            Ok((tmp, key)) => temps.push((i, tmp, key)),
            Err(e) => results[i] = Some(Err(e)),
        }
    }
    // Phase 3: make the temp files durable, together.
    let durable = if temps.len() > SYNCFS_THRESHOLD {
        syncfs(root)
    } else {
        temps
            .iter()
            .try_for_each(|(_, tmp, _)| File::open(tmp).and_then(|f| f.sync_all()))
    };
    if let Err(e) = durable {
        for (i, tmp, _) in temps.drain(..) {
            let _ = std::fs::remove_file(&tmp);
            results[i] = Some(Err(std::io::Error::new(e.kind(), e.to_string())));
        }
    }
    // Phase 4: rename into place; in parallel unless two writes share a target (then their
    // order matters).
    let targets: BTreeSet<&RelPath> = temps.iter().map(|(i, _, _)| ops[*i].path()).collect();
    let threads = if targets.len() == temps.len() {
        writer_threads(temps.len())
    } else {
        1
    };
    let renamed = map_parallel(&temps, threads, |(i, tmp, key)| {
        // The stat key is the temp file's, taken before the rename: a local edit or rename
        // landing on the target right after ours must not be taken for our write (nor fail
        // an apply that already happened).
        let r = std::fs::rename(tmp, root.join(ops[*i].path().as_str())).map(|_| Some(*key));
        if r.is_err() {
            let _ = std::fs::remove_file(tmp);
        }
        r
    });
    for ((i, _, _), r) in temps.iter().zip(renamed) {
        if r.is_ok() {
            dirty_dirs.insert(parent_dir(root, ops[*i].path()));
        }
        results[*i] = Some(r);
    }
    // Phase 5: removals (files, then directories deepest first: `order` is sorted so).
    for &i in &order {
        if results[i].is_some() {
            continue;
        }
        let target = root.join(ops[i].path().as_str());
        let r = match &ops[i] {
            Op::RemoveFile { .. } => match std::fs::symlink_metadata(&target) {
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
    // Phase 6: the directory entries themselves.
    let dir_sync = if dirty_dirs.len() > SYNCFS_THRESHOLD {
        syncfs(root)
    } else {
        dirty_dirs
            .iter()
            .filter(|d| d.exists())
            .try_for_each(|d| sync_dir(d))
    };
    if let Err(e) = dir_sync {
        tracing::warn!(root = %root.display(), error = %e, "directory sync failed");
    }
    results
        .into_iter()
        .map(|r| r.unwrap_or_else(|| Err(std::io::Error::other("op not carried out"))))
        .collect()
}

/// Keeps the losing side of a conflict: copies `src` to `dest` (outside every synced folder),
/// durably. Returns `Ok(false)` when `src` no longer exists.
pub fn keep_copy(src: &Path, dest: &Path) -> std::io::Result<bool> {
    let dir = dest
        .parent()
        .ok_or_else(|| std::io::Error::other("conflict copy has no directory"))?;
    std::fs::create_dir_all(dir)?;
    let (f, tmp) = create_temp(dir, 0o600)?;
    drop(f);
    match std::fs::copy(src, &tmp) {
        Ok(_) => {}
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            return if e.kind() == std::io::ErrorKind::NotFound {
                Ok(false)
            } else {
                Err(e)
            };
        }
    }
    File::open(&tmp)?.sync_all()?;
    std::fs::rename(&tmp, dest)?;
    sync_dir(dir)?;
    Ok(true)
}

/// Removes temp files a crash left behind under `root`. Returns how many.
pub fn remove_stale_temps(root: &Path) -> usize {
    walkdir::WalkDir::new(root)
        .follow_links(false)
        .into_iter()
        .filter_map(Result::ok)
        .filter(|e| e.file_type().is_file())
        .filter(|e| {
            e.file_name()
                .to_str()
                .is_some_and(super::ignore::Ignore::is_temp)
        })
        .filter(|e| std::fs::remove_file(e.path()).is_ok())
        .count()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> RelPath {
        RelPath::new(s).expect("valid")
    }

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
            },
            Op::Write {
                path: p("api/sub/b.xml"),
                content: Content::Bytes(b"<b/>".to_vec()),
                mode: 0o640,
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
                content: Content::Bytes(vec![b'a'; i]),
                mode: 0o644,
            });
        }
        let results = apply_batch(root, ops);
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

    #[test]
    fn a_large_batch_lands_whole_and_a_repeated_target_keeps_the_later_write() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path();
        let mut ops: Vec<Op> = (0..300)
            .map(|i| Op::Write {
                path: p(&format!("d{}/{i}.xml", i % 3)),
                content: Content::Bytes(format!("<f n=\"{i}\"/>").into_bytes()),
                mode: 0o640,
            })
            .collect();
        ops.push(Op::Write {
            path: p("d0/0.xml"),
            content: Content::Bytes(b"<later/>".to_vec()),
            mode: 0o600,
        });
        let results = apply_batch(root, ops);
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

    #[test]
    fn nothing_is_written_through_a_symlinked_directory() {
        let dir = tempfile::tempdir().expect("tempdir");
        let outside = tempfile::tempdir().expect("tempdir");
        let root = dir.path().join("root");
        std::fs::create_dir(&root).expect("mkdir");
        std::os::unix::fs::symlink(outside.path(), root.join("api")).expect("symlink");
        std::fs::write(outside.path().join("victim.xml"), b"keep").expect("write");
        let r = apply_batch(
            &root,
            vec![
                Op::Write {
                    path: p("api/evil.xml"),
                    content: Content::Bytes(b"x".to_vec()),
                    mode: 0o644,
                },
                Op::RemoveFile {
                    path: p("api/victim.xml"),
                },
                Op::Chmod {
                    path: p("api"),
                    mode: 0o777,
                },
            ],
        );
        assert!(r.iter().all(|r| r.is_err()), "{r:?}");
        assert!(!outside.path().join("evil.xml").exists());
        // Many files at once (the parallel path, one check per directory) are refused too.
        let many: Vec<Op> = (0..100)
            .map(|i| Op::Write {
                path: p(&format!("api/evil{i}.xml")),
                content: Content::Bytes(b"x".to_vec()),
                mode: 0o644,
            })
            .chain((0..100).map(|i| Op::Write {
                path: p(&format!("ok/{i}.xml")),
                content: Content::Bytes(b"y".to_vec()),
                mode: 0o644,
            }))
            .collect();
        let r = apply_batch(&root, many);
        assert!(r[..100].iter().all(|r| r.is_err()));
        assert!(r[100..].iter().all(|r| r.is_ok()));
        assert_eq!(
            std::fs::read_dir(outside.path()).expect("list").count(),
            1,
            "only the victim is outside"
        );
        assert_eq!(
            std::fs::read(outside.path().join("victim.xml")).expect("read"),
            b"keep"
        );
        assert_eq!(remove_stale_temps(&root), 0);
    }

    #[test]
    fn non_empty_directory_removal_fails_without_touching_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir_all(dir.path().join("d")).expect("mkdir");
        std::fs::write(dir.path().join("d/keep.swp"), b"x").expect("write");
        let r = apply_batch(dir.path(), vec![Op::RemoveDir { path: p("d") }]);
        assert!(r[0].is_err());
        assert!(dir.path().join("d/keep.swp").exists());
    }

    #[test]
    fn stale_temps_are_removed_and_copies_kept() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (_, tmp) = create_temp(dir.path(), 0o644).expect("temp");
        assert!(
            tmp.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(super::super::ignore::Ignore::is_temp)
        );
        assert_eq!(remove_stale_temps(dir.path()), 1);
        std::fs::write(dir.path().join("src"), b"bytes").expect("write");
        let dest = dir.path().join("c/x/y.node.1");
        assert!(keep_copy(&dir.path().join("src"), &dest).expect("copy"));
        assert_eq!(std::fs::read(&dest).expect("read"), b"bytes");
        assert!(!keep_copy(&dir.path().join("gone"), &dest).expect("copy"));
    }
}
