//! Temp files: named ones (`.artisync.<random>.tmp`, [`create_temp`]) and unnamed ones
//! (`O_TMPFILE`, linked into place by descriptor or through `/proc/self/fd`), how a file's new
//! content is staged in one of them ([`write_temp`]), and the clean-up of the named ones a
//! crash left behind ([`remove_stale_temps`]).

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use crate::fs::ignore::{TEMP_PREFIX, TEMP_SUFFIX};
use crate::fs::own::OwnWrites;
use crate::fs::scan::stat_key;
use crate::store::StatKey;

use super::Content;

/// A new temp file in `dir`, never with a deployable extension. The directory must exist:
/// whoever creates it checks the way there first (see [`crate::fs::beneath::ensure_dir`]).
pub fn create_temp(dir: &Path, mode: u32) -> std::io::Result<(File, PathBuf)> {
    create_temp_in(dir, mode, false)
}

/// [`create_temp`], creating `dir` when missing (only then: a batch writes thousands of files
/// into directories that exist, and a check per file would cost a `stat` each). Only for a
/// directory whose way from the root was checked.
pub(super) fn create_temp_in(
    dir: &Path,
    mode: u32,
    create_dir: bool,
) -> std::io::Result<(File, PathBuf)> {
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

/// A fresh temp name in `target`'s directory.
pub(super) fn temp_beside(target: &Path) -> PathBuf {
    let dir = target.parent().unwrap_or(Path::new("."));
    dir.join(format!(
        "{TEMP_PREFIX}{:016x}{TEMP_SUFFIX}",
        rand::random::<u64>()
    ))
}

/// A file's new content, written and waiting to be put in place.
#[derive(Debug)]
pub(super) enum Staged {
    /// A temp file `.artisync.<random>.tmp` in the target's directory.
    Named(PathBuf),
    /// An unnamed (`O_TMPFILE`) file in the target's directory: it has no name at all until it
    /// is linked at the target, so not even a temp name is seen, and a crash leaves nothing.
    Unnamed(File),
}

impl Staged {
    pub(super) fn discard(&self) {
        if let Staged::Named(tmp) = self {
            let _ = std::fs::remove_file(tmp);
        }
    }

    pub(super) fn sync(&self) -> std::io::Result<()> {
        match self {
            Staged::Named(tmp) => File::open(tmp)?.sync_all(),
            Staged::Unnamed(f) => f.sync_all(),
        }
    }
}

/// True when unnamed temp files can be linked into place here: that goes through
/// `/proc/self/fd` (linking by descriptor directly needs CAP_DAC_READ_SEARCH).
pub(super) fn proc_fd_available() -> bool {
    static AVAILABLE: OnceLock<bool> = OnceLock::new();
    *AVAILABLE.get_or_init(|| Path::new("/proc/self/fd").is_dir())
}

/// Unnamed temp files one batch may hold open (they stay open until the batch is durable):
/// a small share of the descriptor limit, so several folders' batches fit at once.
pub(super) fn unnamed_budget() -> usize {
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
pub(super) fn write_temp(
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

/// Whether `linkat(fd, "", AT_EMPTY_PATH)` works for this process: since Linux 6.10 it does
/// for a file the process opened itself; before, it needs CAP_DAC_READ_SEARCH.
static EMPTY_PATH_LINK: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(true);

/// Gives the unnamed file `f` the name `to` (fails on an existing name). By descriptor where
/// the kernel allows it, else through `/proc/self/fd` (a path walk through procfs per file).
pub(super) fn link_unnamed(f: &File, to: &Path) -> nix::Result<()> {
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
                .is_some_and(crate::fs::ignore::Ignore::is_temp)
        })
        .filter(|e| std::fs::remove_file(e.path()).is_ok())
        .count()
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn stale_temps_are_removed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (_, tmp) = create_temp(dir.path(), 0o644).expect("temp");
        assert!(
            tmp.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(crate::fs::ignore::Ignore::is_temp)
        );
        assert_eq!(remove_stale_temps(dir.path()), 1);
    }
}
