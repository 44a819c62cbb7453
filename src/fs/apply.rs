//! Writing to a folder without ever exposing a partial file: content goes to a temp file
//! `.artisync.<random>.tmp` in the target's directory, is made durable, renamed into place, and
//! the directory is synced. Batches pay for durability once (`syncfs`) instead of per file.

use std::collections::{BTreeSet, HashMap};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use crate::model::RelPath;
use crate::store::StatKey;

use super::ignore::{TEMP_PREFIX, TEMP_SUFFIX};
use super::own::OwnWrites;
use super::par;
use super::scan::stat_key;

/// Above this many files in a batch, one `syncfs` replaces per-file `fsync`s.
const SYNCFS_THRESHOLD: usize = 8;

/// Where the new bytes of a file come from.
#[derive(Debug)]
pub enum Content {
    Bytes(bytes::Bytes),
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
        /// Nothing is expected at the path (a new file): the write fails instead of replacing
        /// whatever appeared there meanwhile (a local file the index does not know yet).
        new: bool,
        /// The stat key the file being replaced must still have at the moment it is replaced
        /// (the one the index holds): a file written meanwhile is never lost, the write fails
        /// with [`changed_meanwhile`] and the file stays. `None`: replace whatever is there.
        expect: Option<StatKey>,
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
        expect: Option<StatKey>,
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

/// A new temp file in `dir`, never with a deployable extension. The directory must exist:
/// whoever creates it checks the way there first (see [`super::beneath::ensure_dir`]).
pub fn create_temp(dir: &Path, mode: u32) -> std::io::Result<(File, PathBuf)> {
    create_temp_in(dir, mode, false)
}

/// [`create_temp`], creating `dir` when missing (only then: a batch writes thousands of files
/// into directories that exist, and a check per file would cost a `stat` each). Only for a
/// directory whose way from the root was checked.
fn create_temp_in(dir: &Path, mode: u32, create_dir: bool) -> std::io::Result<(File, PathBuf)> {
    let mut created_dir = !create_dir;
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
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !created_dir => {
                std::fs::create_dir_all(dir)?;
                created_dir = true;
            }
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

/// A file's new content, written and waiting to be put in place.
#[derive(Debug)]
enum Staged {
    /// A temp file `.artisync.<random>.tmp` in the target's directory.
    Named(PathBuf),
    /// An unnamed (`O_TMPFILE`) file in the target's directory: it has no name at all until it
    /// is linked at the target, so not even a temp name is seen, and a crash leaves nothing.
    Unnamed(File),
}

impl Staged {
    fn discard(&self) {
        if let Staged::Named(tmp) = self {
            let _ = std::fs::remove_file(tmp);
        }
    }

    fn sync(&self) -> std::io::Result<()> {
        match self {
            Staged::Named(tmp) => File::open(tmp)?.sync_all(),
            Staged::Unnamed(f) => f.sync_all(),
        }
    }
}

/// True when unnamed temp files can be linked into place here: that goes through
/// `/proc/self/fd` (linking by descriptor directly needs CAP_DAC_READ_SEARCH).
fn proc_fd_available() -> bool {
    static AVAILABLE: OnceLock<bool> = OnceLock::new();
    *AVAILABLE.get_or_init(|| Path::new("/proc/self/fd").is_dir())
}

/// Unnamed temp files one batch may hold open (they stay open until the batch is durable):
/// a small share of the descriptor limit, so several folders' batches fit at once.
fn unnamed_budget() -> usize {
    static BUDGET: OnceLock<usize> = OnceLock::new();
    *BUDGET.get_or_init(|| {
        let soft = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
            .map_or(1024, |(soft, _)| soft);
        usize::try_from(soft / 8).unwrap_or(usize::MAX).min(1024)
    })
}

/// Opens an unnamed file in `dir`; `None` when the file system (or kernel) has no `O_TMPFILE`.
fn open_unnamed(dir: &Path, mode: u32) -> std::io::Result<Option<File>> {
    let open = || {
        OpenOptions::new()
            .write(true)
            .custom_flags(nix::libc::O_TMPFILE)
            .mode(mode & 0o777 | 0o600)
            .open(dir)
    };
    let r = match open() {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::create_dir_all(dir)?;
            open()
        }
        r => r,
    };
    match r {
        Ok(f) => Ok(Some(f)),
        Err(e)
            if matches!(
                e.raw_os_error(),
                Some(nix::libc::EOPNOTSUPP | nix::libc::EISDIR | nix::libc::EINVAL)
            ) =>
        {
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

/// Writes one file's new bytes next to its target with `mode`; returns how they are staged and
/// the stat key the target will have once they are in place (a rename or link keeps inode,
/// size and mtime). `unnamed`: may use an unnamed temp file.
fn write_temp(
    dir: &Path,
    content: &Content,
    mode: u32,
    unnamed: bool,
    own: Option<&OwnWrites>,
) -> std::io::Result<(Staged, StatKey)> {
    let fill = |f: &mut File, bytes: &[u8]| -> std::io::Result<StatKey> {
        f.write_all(bytes)?;
        let meta = f.metadata()?;
        // The create asked for the mode already; the umask may have taken bits.
        if meta.permissions().mode() & 0o7777 != mode {
            f.set_permissions(std::fs::Permissions::from_mode(mode))?;
        }
        Ok(stat_key(&meta))
    };
    match content {
        Content::Bytes(bytes) => {
            if unnamed {
                if let Some(mut f) = open_unnamed(dir, mode)? {
                    if let Some(own) = own {
                        use std::os::unix::fs::MetadataExt;
                        own.note_temp(f.metadata()?.ino());
                    }
                    let key = fill(&mut f, bytes)?;
                    return Ok((Staged::Unnamed(f), key));
                }
            }
            // Its directory was checked for symlinks in phase 1 of the batch.
            let (mut f, tmp) = create_temp_in(dir, mode, true)?;
            match fill(&mut f, bytes) {
                Ok(key) => Ok((Staged::Named(tmp), key)),
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
                Ok(meta) => Ok((Staged::Named(tmp.clone()), stat_key(&meta))),
                Err(e) => {
                    let _ = std::fs::remove_file(tmp);
                    Err(e)
                }
            }
        }
    }
}

fn is_symlink(path: &Path) -> bool {
    std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_symlink())
}

fn appeared_meanwhile(target: &Path) -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::AlreadyExists,
        format!(
            "{} appeared while the peer's version was being written; it is looked at first",
            target.display()
        ),
    )
}

/// The error of a replacement or removal whose target changed after the batch was decided:
/// the target is left as it is now, and the engine looks at it before the peer's version
/// comes again (it then meets it as a concurrent change).
pub fn changed_meanwhile(target: &Path) -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::AlreadyExists,
        format!(
            "{} changed while the peer's version was being applied; it is looked at first",
            target.display()
        ),
    )
}

/// A fresh temp name in `target`'s directory.
fn temp_beside(target: &Path) -> PathBuf {
    let dir = target.parent().unwrap_or(Path::new("."));
    dir.join(format!(
        "{TEMP_PREFIX}{:016x}{TEMP_SUFFIX}",
        rand::random::<u64>()
    ))
}

/// True when `meta` is what a replacement or removal may drop: the file the index knows
/// (`expect`), or a symlink (never synced; a peer's file takes its place).
fn is_expected(meta: &std::fs::Metadata, expect: &StatKey) -> bool {
    meta.file_type().is_symlink() || (meta.is_file() && stat_key(meta) == *expect)
}

/// Renames `from` to `to` with `flags`.
fn rename2(from: &Path, to: &Path, flags: nix::fcntl::RenameFlags) -> nix::Result<()> {
    use nix::fcntl::AT_FDCWD;
    nix::fcntl::renameat2(AT_FDCWD, from, AT_FDCWD, to, flags)
}

/// Puts the staged file `tmp` (inode `staged_ino`) at `target` only if `target` still is the
/// file with stat key `expect`, race-free: the two are exchanged atomically
/// (`RENAME_EXCHANGE`), and then what was swapped out is checked. The file the index knows
/// is dropped; anything else (a local write that landed after the batch was decided) is put
/// back and the write fails with [`changed_meanwhile`]. Consumes `tmp` in every case.
///
/// What remains: a program holding the old file open and writing into it in place after the
/// check writes into the dropped file. Writers that replace files by renaming (editors, the
/// gateway's own deployer, artisync) and writes finished before the exchange are never lost.
fn replace_checked(
    tmp: &Path,
    staged_ino: u64,
    target: &Path,
    expect: &StatKey,
) -> std::io::Result<()> {
    use nix::errno::Errno;
    use nix::fcntl::RenameFlags;
    use std::os::unix::fs::MetadataExt;
    let discard = || {
        let _ = std::fs::remove_file(tmp);
    };
    match rename2(tmp, target, RenameFlags::RENAME_EXCHANGE) {
        Ok(()) => {}
        // Removed locally since the batch was decided.
        Err(Errno::ENOENT) => {
            discard();
            return Err(changed_meanwhile(target));
        }
        // A file system without RENAME_EXCHANGE: look, then rename (a write landing between
        // the two is replaced; there is no atomic way here).
        Err(Errno::EINVAL | Errno::ENOSYS | Errno::EOPNOTSUPP) => {
            let r = match std::fs::symlink_metadata(target) {
                Ok(m) if is_expected(&m, expect) => std::fs::rename(tmp, target),
                Ok(_) => Err(changed_meanwhile(target)),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    Err(changed_meanwhile(target))
                }
                Err(e) => Err(e),
            };
            if r.is_err() {
                discard();
            }
            return r;
        }
        Err(e) => {
            discard();
            return Err(e.into());
        }
    }
    // `tmp` now names what `target` was a moment ago.
    match std::fs::symlink_metadata(tmp) {
        Ok(m) if is_expected(&m, expect) => {
            if let Err(e) = std::fs::remove_file(tmp) {
                // Our version is in place; the old file lingers under a temp name until the
                // next start removes it.
                tracing::warn!(path = %tmp.display(), error = %e, "cannot remove a replaced file");
            }
            return Ok(());
        }
        Ok(_) => {}
        Err(e) => {
            tracing::warn!(path = %tmp.display(), error = %e, "cannot look at a replaced file");
        }
    }
    // Changed meanwhile: swap back, then see what came out.
    match rename2(tmp, target, RenameFlags::RENAME_EXCHANGE) {
        Ok(()) => match std::fs::symlink_metadata(tmp) {
            Ok(m) if m.ino() == staged_ino => discard(),
            Ok(_) => {
                // A local program replaced our version in the instant it was there: its file
                // is the newest, it goes back in place.
                if let Err(e) = std::fs::rename(tmp, target) {
                    tracing::error!(path = %target.display(), kept_at = %tmp.display(), error = %e, "cannot put a local file back in place");
                }
            }
            Err(_) => {}
        },
        // Our version was removed locally meanwhile: the local file goes back, unless yet
        // another one took the name.
        Err(_) => match rename2(tmp, target, RenameFlags::RENAME_NOREPLACE) {
            Ok(()) => {}
            Err(Errno::EEXIST) => discard(),
            Err(e) => {
                tracing::error!(path = %target.display(), kept_at = %tmp.display(), error = %e, "cannot put a local file back in place");
            }
        },
    }
    Err(changed_meanwhile(target))
}

/// Removes the file at `target` only if it still is the file with stat key `expect`,
/// race-free: it is first renamed aside, then checked; anything else goes back in place and
/// the removal fails with [`changed_meanwhile`]. A target already gone is fine.
fn remove_checked(target: &Path, expect: &StatKey) -> OpResult {
    use nix::errno::Errno;
    use nix::fcntl::RenameFlags;
    match std::fs::symlink_metadata(target) {
        Ok(m) if m.is_dir() => {
            return Err(std::io::Error::new(
                std::io::ErrorKind::IsADirectory,
                "a directory stands where a file was deleted",
            ));
        }
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    }
    let aside = temp_beside(target);
    match rename2(target, &aside, RenameFlags::RENAME_NOREPLACE) {
        Ok(()) => {}
        Err(Errno::ENOENT) => return Ok(None),
        // No RENAME_NOREPLACE here: the aside name is random, a clash is not a concern.
        Err(Errno::EINVAL) => match std::fs::rename(target, &aside) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        },
        Err(e) => return Err(e.into()),
    }
    match std::fs::symlink_metadata(&aside) {
        Ok(m) if is_expected(&m, expect) => {
            std::fs::remove_file(&aside)?;
            return Ok(None);
        }
        _ => {}
    }
    match rename2(&aside, target, RenameFlags::RENAME_NOREPLACE) {
        Ok(()) => {}
        // A new local file took the name meanwhile: it is the newest local state.
        Err(Errno::EEXIST) => {
            let _ = std::fs::remove_file(&aside);
        }
        Err(_) => {
            if let Err(e) = std::fs::rename(&aside, target) {
                tracing::error!(path = %target.display(), kept_at = %aside.display(), error = %e, "cannot put a local file back in place");
            }
        }
    }
    Err(changed_meanwhile(target))
}

/// Whether `linkat(fd, "", AT_EMPTY_PATH)` works for this process: since Linux 6.10 it does
/// for a file the process opened itself; before, it needs CAP_DAC_READ_SEARCH.
static EMPTY_PATH_LINK: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(true);

/// Gives the unnamed file `f` the name `to` (fails on an existing name). By descriptor where
/// the kernel allows it, else through `/proc/self/fd` (a path walk through procfs per file).
fn link_unnamed(f: &File, to: &Path) -> nix::Result<()> {
    use nix::errno::Errno;
    use nix::fcntl::{AT_FDCWD, AtFlags};
    use std::sync::atomic::Ordering;
    let by_proc = || {
        use std::os::fd::AsRawFd;
        let from = format!("/proc/self/fd/{}", f.as_raw_fd());
        nix::unistd::linkat(
            AT_FDCWD,
            from.as_str(),
            AT_FDCWD,
            to,
            AtFlags::AT_SYMLINK_FOLLOW,
        )
    };
    if !EMPTY_PATH_LINK.load(Ordering::Relaxed) {
        return by_proc();
    }
    match nix::unistd::linkat(f, "", AT_FDCWD, to, AtFlags::AT_EMPTY_PATH) {
        // The kernel's "not allowed" is ENOENT, as is a missing target directory: only a
        // link through /proc that works tells them apart.
        Err(Errno::ENOENT | Errno::EPERM) => {
            let r = by_proc();
            if r != Err(Errno::ENOENT) {
                EMPTY_PATH_LINK.store(false, Ordering::Relaxed);
            }
            r
        }
        r => r,
    }
}

/// Puts staged content at `target`. A `new` file never replaces anything (an unnamed file is
/// linked, which fails on an existing name; a named one is renamed with RENAME_NOREPLACE);
/// a replacement with `expect` only replaces that file (see [`replace_checked`]).
fn place(
    staged: &Staged,
    key: &StatKey,
    target: &Path,
    new: bool,
    expect: Option<&StatKey>,
    own: Option<&OwnWrites>,
) -> std::io::Result<()> {
    use nix::errno::Errno;
    if let (Staged::Named(tmp), false, Some(expect)) = (staged, new, expect) {
        return replace_checked(tmp, key.ino, target, expect);
    }
    let r = match staged {
        Staged::Unnamed(f) => {
            if let Some(own) = own {
                own.expect_create(target);
            }
            let link = |to: &Path| link_unnamed(f, to);
            let r = link(target);
            if r.is_err() {
                if let Some(own) = own {
                    own.forget_create(target);
                }
            }
            match r {
                Err(Errno::EEXIST) if is_symlink(target) => {
                    // Symlinks are never synced; a peer's file takes the place of a local one,
                    // as a replacement would. Linked under a temp name, then renamed over it.
                    let dir = target.parent().unwrap_or(Path::new("."));
                    let tmp = dir.join(format!(
                        "{TEMP_PREFIX}{:016x}{TEMP_SUFFIX}",
                        rand::random::<u64>()
                    ));
                    link(&tmp).map_err(std::io::Error::from).and_then(|_| {
                        std::fs::rename(&tmp, target).inspect_err(|_| {
                            let _ = std::fs::remove_file(&tmp);
                        })
                    })
                }
                Err(Errno::EEXIST) => Err(appeared_meanwhile(target)),
                r => r.map_err(std::io::Error::from),
            }
        }
        Staged::Named(tmp) if new => {
            match nix::fcntl::renameat2(
                nix::fcntl::AT_FDCWD,
                tmp.as_path(),
                nix::fcntl::AT_FDCWD,
                target,
                nix::fcntl::RenameFlags::RENAME_NOREPLACE,
            ) {
                Ok(()) => Ok(()),
                Err(Errno::EEXIST) if is_symlink(target) => std::fs::rename(tmp, target),
                Err(Errno::EEXIST) => Err(appeared_meanwhile(target)),
                // A file system without RENAME_NOREPLACE: check, then rename (a file that
                // appears in between is replaced; there is no atomic way here).
                Err(Errno::EINVAL) => match std::fs::symlink_metadata(target) {
                    Ok(m) if !m.file_type().is_symlink() => Err(appeared_meanwhile(target)),
                    _ => std::fs::rename(tmp, target),
                },
                Err(e) => Err(std::io::Error::from(e)),
            }
        }
        Staged::Named(tmp) => std::fs::rename(tmp, target),
    };
    if r.is_err() {
        staged.discard();
    }
    r
}

/// Carries out `ops` under `root` and returns one result per op, in the order given.
/// Every op either fully happens or leaves the target as it was (temp files are cleaned up).
///
/// `own`: where the engine tells its watcher about the files it creates (see [`OwnWrites`]).
pub fn apply_batch(root: &Path, ops: Vec<Op>, own: Option<&OwnWrites>) -> Vec<OpResult> {
    stage_batch(root, ops, own).finish(own)
}

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

/// Phases 1 and 2 of [`apply_batch`]: directories and chmods, then the new contents written
/// next to their targets.
pub fn stage_batch(root: &Path, ops: Vec<Op>, own: Option<&OwnWrites>) -> StagedBatch {
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
                        Err(_) => std::fs::create_dir_all(&target)?,
                    }
                    // Its entry in the parent is synced with the batch even when the directory
                    // was there already: a write of this batch (or a fetch) may have created
                    // it a moment ago, for a file below it.
                    dirty_dirs.insert(parent_dir(root, ops[i].path()));
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
    // Phase 2: the new contents, written in parallel (not durable yet). New files use unnamed
    // temp files while the batch's share of descriptors lasts.
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
    StagedBatch {
        root: root.to_owned(),
        ops,
        order,
        results,
        dirty_dirs,
        staged,
    }
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
        // Phase 3: make the new contents durable, together.
        let durable = if staged.len() > SYNCFS_THRESHOLD {
            syncfs(root)
        } else {
            staged.iter().try_for_each(|(_, s, _)| s.sync())
        };
        if let Err(e) = durable {
            for (i, s, _) in staged.drain(..) {
                s.discard();
                // The errno is kept: it says the trouble is the node's, not the path's.
                results[i] = Some(Err(match e.raw_os_error() {
                    Some(code) => std::io::Error::from_raw_os_error(code),
                    None => std::io::Error::new(e.kind(), e.to_string()),
                }));
            }
        }
        let t_durable = t0.elapsed();
        // Phase 4: into place; in parallel unless two writes share a target (then their order
        // matters).
        let targets: BTreeSet<&RelPath> = staged.iter().map(|(i, _, _)| ops[*i].path()).collect();
        let threads = if targets.len() == staged.len() {
            par::threads_for(staged.len())
        } else {
            1
        };
        let placed = par::map_grouped(
            &staged,
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
        // Phase 5: removals (files, then directories deepest first: `order` is sorted so).
        for &i in &order {
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
        let t_placed = t0.elapsed();
        // Phase 6: the directory entries themselves.
        let dir_sync = if dirty_dirs.len() > SYNCFS_THRESHOLD {
            syncfs(root)
        } else {
            dirty_dirs
                .iter()
                .filter(|d| d.exists())
                .try_for_each(|d| sync_dir(d))
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
                    *r = Some(Err(match e.raw_os_error() {
                        Some(code) => std::io::Error::from_raw_os_error(code),
                        None => std::io::Error::new(e.kind(), e.to_string()),
                    }));
                }
            }
        }
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

/// What [`keep_copy`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kept {
    /// A new copy, at this path.
    New(PathBuf),
    /// A copy with the same bytes was there already (the same conflict met again).
    Already(PathBuf),
    /// The source no longer exists.
    Gone,
}

/// Keeps the losing side of a conflict: copies `src` to `dest` (outside every synced folder),
/// durably. When `dest` is taken by other bytes, the copy goes to `dest.1`, `dest.2`, ...;
/// when it holds the same bytes, nothing is copied again.
pub fn keep_copy(src: &Path, dest: &Path) -> std::io::Result<Kept> {
    let dir = dest
        .parent()
        .ok_or_else(|| std::io::Error::other("conflict copy has no directory"))?;
    std::fs::create_dir_all(dir)?;
    let bytes = match std::fs::read(src) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Kept::Gone),
        Err(e) => return Err(e),
    };
    let mut target = dest.to_owned();
    for n in 1u32.. {
        match std::fs::read(&target) {
            Ok(there) if there == bytes => return Ok(Kept::Already(target)),
            Ok(_) => {
                let mut name = dest.as_os_str().to_owned();
                name.push(format!(".{n}"));
                target = PathBuf::from(name);
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => break,
            Err(e) => return Err(e),
        }
    }
    let (mut f, tmp) = create_temp(dir, 0o600)?;
    let written = f.write_all(&bytes).and_then(|()| f.sync_all());
    drop(f);
    if let Err(e) = written.and_then(|()| std::fs::rename(&tmp, &target)) {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    sync_dir(dir)?;
    Ok(Kept::New(target))
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

    fn write(path: &str, bytes: &[u8], mode: u32, new: bool) -> Op {
        Op::Write {
            path: p(path),
            content: Content::Bytes(bytes.to_vec().into()),
            mode,
            new,
            expect: None,
        }
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

    /// A new file never replaces something that appeared at its path after the engine
    /// looked (a local file the index does not know yet): the write fails, the local file
    /// stays, and nothing is left behind. Both ways of staging are checked.
    #[test]
    fn a_new_file_never_replaces_one_that_appeared_meanwhile() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path();
        std::fs::write(root.join("local.xml"), b"<mine/>").expect("write");
        let own = OwnWrites::default();
        // Through the batch: unnamed when the file system has O_TMPFILE (this one does).
        let r = apply_batch(
            root,
            vec![write("local.xml", b"<peer/>", 0o644, true)],
            Some(&own),
        );
        let e = r[0].as_ref().expect_err("must not replace");
        assert_eq!(e.kind(), std::io::ErrorKind::AlreadyExists, "{e}");
        assert_eq!(
            std::fs::read(root.join("local.xml")).expect("read"),
            b"<mine/>"
        );
        assert!(
            !own.take_create(&root.join("local.xml")),
            "a failed link is forgotten"
        );
        // A named temp file with RENAME_NOREPLACE.
        let (mut f, tmp) = create_temp(root, 0o644).expect("temp");
        f.write_all(b"<peer/>").expect("write");
        let key = stat_key(&std::fs::metadata(&tmp).expect("temp meta"));
        let e = place(
            &Staged::Named(tmp.clone()),
            &key,
            &root.join("local.xml"),
            true,
            None,
            None,
        )
        .expect_err("must not replace");
        assert_eq!(e.kind(), std::io::ErrorKind::AlreadyExists, "{e}");
        assert!(!tmp.exists(), "the temp file is removed");
        assert_eq!(
            std::fs::read(root.join("local.xml")).expect("read"),
            b"<mine/>"
        );
        // Not new: an ordinary replacement.
        let r = apply_batch(
            root,
            vec![write("local.xml", b"<peer/>", 0o644, false)],
            None,
        );
        assert!(r[0].is_ok(), "{r:?}");
        assert_eq!(
            std::fs::read(root.join("local.xml")).expect("read"),
            b"<peer/>"
        );
        assert_eq!(remove_stale_temps(root), 0);
    }

    /// A local symlink (never synced) where a peer has a file is replaced, as before new files
    /// were linked: a failure there would stop the folder's stream for good.
    #[test]
    fn a_new_file_takes_the_place_of_a_local_symlink() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path();
        std::fs::write(root.join("target.txt"), b"kept").expect("write");
        for name in ["a.xml", "b.xml"] {
            std::os::unix::fs::symlink(root.join("target.txt"), root.join(name)).expect("link");
        }
        let r = apply_batch(root, vec![write("a.xml", b"<peer/>", 0o644, true)], None);
        assert!(r[0].is_ok(), "{r:?}");
        let (mut f, tmp) = create_temp(root, 0o644).expect("temp");
        f.write_all(b"<peer/>").expect("write");
        let key = stat_key(&std::fs::metadata(&tmp).expect("temp meta"));
        place(
            &Staged::Named(tmp),
            &key,
            &root.join("b.xml"),
            true,
            None,
            None,
        )
        .expect("named");
        for name in ["a.xml", "b.xml"] {
            let meta = std::fs::symlink_metadata(root.join(name)).expect("meta");
            assert!(meta.is_file(), "{name} is a file now");
            assert_eq!(std::fs::read(root.join(name)).expect("read"), b"<peer/>");
        }
        assert_eq!(
            std::fs::read(root.join("target.txt")).expect("read"),
            b"kept"
        );
        assert_eq!(remove_stale_temps(root), 0);
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
    fn linking_into_a_missing_directory_fails_without_giving_up_the_fast_path() {
        use std::sync::atomic::Ordering;
        let dir = tempfile::tempdir().expect("tempdir");
        let Some(f) = open_unnamed(dir.path(), 0o644).expect("open") else {
            eprintln!("skipped: no O_TMPFILE on this file system");
            return;
        };
        let before = EMPTY_PATH_LINK.load(Ordering::Relaxed);
        assert_eq!(
            link_unnamed(&f, &dir.path().join("missing/x.xml")),
            Err(nix::errno::Errno::ENOENT)
        );
        assert_eq!(
            EMPTY_PATH_LINK.load(Ordering::Relaxed),
            before,
            "a missing target directory says nothing about linking by descriptor"
        );
        link_unnamed(&f, &dir.path().join("x.xml")).expect("link");
        assert!(dir.path().join("x.xml").is_file());
        assert_eq!(
            link_unnamed(&f, &dir.path().join("x.xml")),
            Err(nix::errno::Errno::EEXIST),
            "an existing name is never replaced"
        );
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
                    content: Content::Bytes(b"x".to_vec().into()),
                    mode: 0o644,
                    new: true,
                    expect: None,
                },
                Op::RemoveFile {
                    path: p("api/victim.xml"),
                    expect: None,
                },
                Op::Chmod {
                    path: p("api"),
                    mode: 0o777,
                },
            ],
            None,
        );
        assert!(r.iter().all(|r| r.is_err()), "{r:?}");
        assert!(!outside.path().join("evil.xml").exists());
        // Many files at once (the parallel path, one check per directory) are refused too.
        let many: Vec<Op> = (0..100)
            .map(|i| Op::Write {
                path: p(&format!("api/evil{i}.xml")),
                content: Content::Bytes(b"x".to_vec().into()),
                mode: 0o644,
                new: true,
                expect: None,
            })
            .chain((0..100).map(|i| Op::Write {
                path: p(&format!("ok/{i}.xml")),
                content: Content::Bytes(b"y".to_vec().into()),
                mode: 0o644,
                new: true,
                expect: None,
            }))
            .collect();
        let r = apply_batch(&root, many, None);
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
        let r = apply_batch(dir.path(), vec![Op::RemoveDir { path: p("d") }], None);
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
        let src = dir.path().join("src");
        let dest = dir.path().join("c/x/y.node.1");
        assert_eq!(
            keep_copy(&src, &dest).expect("copy"),
            Kept::New(dest.clone())
        );
        assert_eq!(std::fs::read(&dest).expect("read"), b"bytes");
        assert_eq!(
            keep_copy(&dir.path().join("gone"), &dest).expect("copy"),
            Kept::Gone
        );
        // The same conflict met again (a batch retried) is not copied twice...
        assert_eq!(
            keep_copy(&src, &dest).expect("copy"),
            Kept::Already(dest.clone())
        );
        // ...but other bytes under the same name never replace a kept copy.
        std::fs::write(&src, b"other bytes").expect("write");
        let second = dir.path().join("c/x/y.node.1.1");
        assert_eq!(
            keep_copy(&src, &dest).expect("copy"),
            Kept::New(second.clone())
        );
        assert_eq!(std::fs::read(&dest).expect("read"), b"bytes");
        assert_eq!(std::fs::read(&second).expect("read"), b"other bytes");
        assert_eq!(keep_copy(&src, &dest).expect("copy"), Kept::Already(second));
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
                expect: Some(key_of(&root.join("old.xml"))),
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

    fn key_of(path: &Path) -> StatKey {
        stat_key(&std::fs::symlink_metadata(path).expect("meta"))
    }

    fn replace(path: &str, bytes: &[u8], expect: StatKey) -> Op {
        Op::Write {
            path: p(path),
            content: Content::Bytes(bytes.to_vec().into()),
            mode: 0o644,
            new: false,
            expect: Some(expect),
        }
    }

    fn temps_in(dir: &Path) -> usize {
        std::fs::read_dir(dir)
            .expect("ls")
            .filter_map(Result::ok)
            .filter(|e| {
                e.file_name()
                    .to_str()
                    .is_some_and(super::super::ignore::Ignore::is_temp)
            })
            .count()
    }

    /// Issue 12, item 0: the target is checked at the moment of the rename, not when the batch
    /// was decided or staged. A write that lands in between stays, by either way of writing.
    #[test]
    fn a_replacement_keeps_a_file_changed_after_the_batch_was_staged() {
        for by_rename in [false, true] {
            let dir = tempfile::tempdir().expect("tempdir");
            let root = dir.path();
            let target = root.join("a.xml");
            std::fs::write(&target, b"<indexed/>").expect("write");
            let indexed = key_of(&target);
            let staged = stage_batch(root, vec![replace("a.xml", b"<peer/>", indexed)], None);
            if by_rename {
                std::fs::write(root.join("edit.new"), b"<local edit/>").expect("write");
                std::fs::rename(root.join("edit.new"), &target).expect("rename");
            } else {
                std::fs::write(&target, b"<local edit/>").expect("write");
            }
            let r = staged.finish(None);
            let e = r[0].as_ref().expect_err("the replacement must not happen");
            assert_eq!(e.kind(), std::io::ErrorKind::AlreadyExists, "{e}");
            assert_eq!(std::fs::read(&target).expect("read"), b"<local edit/>");
            assert_eq!(temps_in(root), 0, "no temp file left behind");
        }
    }

    #[test]
    fn a_replacement_of_the_indexed_file_happens_and_leaves_nothing_behind() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path();
        let target = root.join("a.xml");
        std::fs::write(&target, b"<indexed/>").expect("write");
        let r = apply_batch(
            root,
            vec![replace("a.xml", b"<peer/>", key_of(&target))],
            None,
        );
        let key = r[0].as_ref().expect("replaced").expect("stat key");
        assert_eq!(std::fs::read(&target).expect("read"), b"<peer/>");
        assert_eq!(key, key_of(&target), "the stat key is the new file's");
        assert_eq!(temps_in(root), 0);
        // A file removed meanwhile is not brought back by the peer's replacement.
        let gone = key_of(&target);
        std::fs::remove_file(&target).expect("rm");
        let r = apply_batch(root, vec![replace("a.xml", b"<peer2/>", gone)], None);
        assert!(r[0].is_err(), "a locally removed file is a change too");
        assert!(!target.exists());
        assert_eq!(temps_in(root), 0);
    }

    #[test]
    fn a_removal_keeps_a_file_changed_after_the_batch_was_decided() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path();
        let target = root.join("d.xml");
        std::fs::write(&target, b"<indexed/>").expect("write");
        let indexed = key_of(&target);
        std::fs::write(&target, b"<edited since/>").expect("write");
        let op = Op::RemoveFile {
            path: p("d.xml"),
            expect: Some(indexed),
        };
        let r = apply_batch(root, vec![op], None);
        let e = r[0].as_ref().expect_err("must not remove");
        assert_eq!(e.kind(), std::io::ErrorKind::AlreadyExists, "{e}");
        assert_eq!(std::fs::read(&target).expect("read"), b"<edited since/>");
        assert_eq!(temps_in(root), 0);
        let op = Op::RemoveFile {
            path: p("d.xml"),
            expect: Some(key_of(&target)),
        };
        assert!(apply_batch(root, vec![op], None)[0].is_ok());
        assert!(!target.exists());
        assert_eq!(temps_in(root), 0);
    }

    /// A local writer replaces one file as fast as it can while peer versions replace it,
    /// each decided on the content seen just before. Every peer version says which local
    /// version it was decided against; the writer checks, before each write, that whatever
    /// peer version it finds replaced exactly its own last write. A peer version that
    /// replaced a local write it never saw is a lost write. Bounded: 1,500 rounds per side.
    #[test]
    fn hammering_one_path_from_both_sides_loses_no_local_write() {
        use std::sync::atomic::{AtomicBool, Ordering};
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().to_owned();
        let target = root.join("hot.xml");
        std::fs::write(&target, b"local-0").expect("write");
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let writer = {
            let (target, root, stop) = (target.clone(), root.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut lost = Vec::new();
                let mut last = b"local-0".to_vec();
                for i in 1..1500u32 {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let replaced_unseen = |now: &[u8]| {
                        now.strip_prefix(b"peer-decided-on:")
                            .is_some_and(|seen| seen != last.as_slice())
                    };
                    if replaced_unseen(&std::fs::read(&target).unwrap_or_default()) {
                        // A peer version may stand there for an instant before it is swapped
                        // back out: lost only if it stays.
                        let stays = (0..200).all(|_| {
                            std::thread::sleep(std::time::Duration::from_micros(500));
                            replaced_unseen(&std::fs::read(&target).unwrap_or_default())
                        });
                        if stays {
                            lost.push(String::from_utf8_lossy(&last).into_owned());
                        }
                    }
                    last = format!("local-{i}").into_bytes();
                    let tmp = root.join("writer.part");
                    std::fs::write(&tmp, &last).expect("write");
                    std::fs::rename(&tmp, &target).expect("rename");
                }
                lost
            })
        };
        let mut replaced = 0;
        for _ in 0..1500 {
            // Decide: what the index would hold now.
            let Ok(seen) = std::fs::read(&target) else {
                continue;
            };
            let Ok(meta) = std::fs::symlink_metadata(&target) else {
                continue;
            };
            if std::fs::read(&target).ok().as_deref() != Some(seen.as_slice()) {
                continue; // not a stable look (a scan would retry too)
            }
            let mut bytes = b"peer-decided-on:".to_vec();
            bytes.extend_from_slice(&seen);
            let r = apply_batch(
                &root,
                vec![replace("hot.xml", &bytes, stat_key(&meta))],
                None,
            );
            replaced += usize::from(r[0].is_ok());
        }
        stop.store(true, Ordering::Relaxed);
        let lost = writer.join().expect("writer thread");
        assert!(lost.is_empty(), "local writes replaced unseen: {lost:?}");
        assert!(replaced > 0, "the peer side never got a turn");
        assert_eq!(temps_in(&root), 0);
    }
}
