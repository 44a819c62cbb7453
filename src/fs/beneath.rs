//! Paths below a folder root, opened or created without ever following a symlink: what the
//! node serves to a peer (`Fetch`) and the directories it creates for a peer's content. A
//! peer names the path; the file system decides what it leads to, so every component is
//! checked before a byte is read or written.

use std::fs::File;
use std::io;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{OFlag, OpenHow, ResolveFlag};
use nix::sys::stat::Mode;

use crate::model::RelPath;

fn symlink_refused(at: &Path) -> io::Error {
    io::Error::new(
        io::ErrorKind::PermissionDenied,
        format!(
            "{} is a symlink; artisync never reads or writes through symlinks",
            at.display()
        ),
    )
}

fn open_root(root: &Path) -> io::Result<OwnedFd> {
    nix::fcntl::open(
        root,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(io::Error::from)
}

/// An open folder root: files below it are opened relative to it, never through a symlink.
#[derive(Debug)]
pub struct Root {
    fd: OwnedFd,
    path: PathBuf,
}

impl Root {
    /// Opens the root directory itself (the operator's choice; it may be reached through a
    /// link).
    pub fn open(root: &Path) -> io::Result<Self> {
        Ok(Self {
            fd: open_root(root)?,
            path: root.to_owned(),
        })
    }

    /// Opens the regular file `path` below the root for reading. Fails when any component of
    /// the path (the file itself included) is a symlink, or when it is not a regular file.
    pub fn open_file(&self, path: &RelPath) -> io::Result<File> {
        let how = OpenHow::new()
            .flags(OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC)
            .resolve(ResolveFlag::RESOLVE_NO_SYMLINKS | ResolveFlag::RESOLVE_BENEATH);
        let fd = match nix::fcntl::openat2(&self.fd, path.as_str(), how) {
            Ok(fd) => fd,
            // Kernels before 5.6 (or a seccomp filter) have no openat2: a component at a time.
            Err(Errno::ENOSYS | Errno::EPERM) => open_by_components(self.fd.try_clone()?, path)?,
            Err(Errno::ELOOP | Errno::EXDEV) => {
                return Err(symlink_refused(&self.path.join(path.as_str())));
            }
            Err(e) => return Err(io::Error::from(e)),
        };
        let file = File::from(fd);
        if !file.metadata()?.is_file() {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("{path} is not a regular file"),
            ));
        }
        Ok(file)
    }
}

/// [`Root::open_file`] for one file.
pub fn open_file(root: &Path, path: &RelPath) -> io::Result<File> {
    Root::open(root)?.open_file(path)
}

fn open_by_components(mut dir: OwnedFd, path: &RelPath) -> io::Result<OwnedFd> {
    let parts: Vec<&str> = path.as_str().split('/').collect();
    for (i, part) in parts.iter().enumerate() {
        let last = i + 1 == parts.len();
        let flags = if last {
            OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC
        } else {
            OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC
        };
        dir = match nix::fcntl::openat(&dir, *part, flags, Mode::empty()) {
            Ok(fd) => fd,
            Err(Errno::ELOOP) => return Err(symlink_refused(Path::new(path.as_str()))),
            // O_NOFOLLOW|O_DIRECTORY on a symlink says ENOTDIR.
            Err(e) => return Err(io::Error::from(e)),
        };
    }
    Ok(dir)
}

/// Makes sure the directory `dir` below `root` exists and is reached without a symlink,
/// creating the missing components one by one (each checked first), and returns its full
/// path. Nothing is created below a component that is a symlink or not a directory.
pub fn ensure_dir(root: &Path, dir: Option<&RelPath>) -> io::Result<PathBuf> {
    let mut at = root.to_owned();
    let Some(dir) = dir else { return Ok(at) };
    for part in dir.as_str().split('/') {
        at.push(part);
        let meta = match std::fs::symlink_metadata(&at) {
            Ok(m) => m,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                match std::fs::create_dir(&at) {
                    Ok(()) => continue,
                    // Created meanwhile (another batch, the user): look at what it is.
                    Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                        std::fs::symlink_metadata(&at)?
                    }
                    Err(e) => return Err(e),
                }
            }
            Err(e) => return Err(e),
        };
        if meta.file_type().is_symlink() {
            return Err(symlink_refused(&at));
        }
        if !meta.is_dir() {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{} is a file where a directory should be", at.display()),
            ));
        }
    }
    Ok(at)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> RelPath {
        RelPath::new(s).expect("valid")
    }

    #[test]
    fn a_file_below_the_root_opens_and_a_symlink_anywhere_does_not() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().join("root");
        let outside = dir.path().join("outside");
        std::fs::create_dir_all(root.join("a")).expect("mkdir");
        std::fs::create_dir_all(&outside).expect("mkdir");
        std::fs::write(root.join("a/f.xml"), b"in").expect("write");
        std::fs::write(outside.join("secret.toml"), b"out").expect("write");
        std::os::unix::fs::symlink(&outside, root.join("a/link")).expect("symlink");
        std::os::unix::fs::symlink("..", root.join("up")).expect("symlink");
        std::os::unix::fs::symlink("f.xml", root.join("a/alias.xml")).expect("symlink");

        let mut s = String::new();
        io::Read::read_to_string(&mut open_file(&root, &p("a/f.xml")).expect("open"), &mut s)
            .expect("read");
        assert_eq!(s, "in");
        for refused in [
            "a/link/secret.toml",
            "up/outside/secret.toml",
            "a/alias.xml",
        ] {
            assert!(
                open_file(&root, &p(refused)).is_err(),
                "{refused} was opened through a symlink"
            );
        }
        assert!(open_file(&root, &p("a")).is_err(), "a directory is no file");
        assert!(open_file(&root, &p("a/missing.xml")).is_err());
    }

    #[test]
    fn by_components_refuses_symlinks_too() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path();
        std::fs::create_dir_all(root.join("a")).expect("mkdir");
        std::fs::write(root.join("a/f.xml"), b"in").expect("write");
        std::os::unix::fs::symlink(root.join("a"), root.join("l")).expect("symlink");
        let open = |s: &str| open_by_components(open_root(root).expect("root"), &p(s));
        assert!(open("a/f.xml").is_ok());
        assert!(open("l/f.xml").is_err());
    }

    #[test]
    fn directories_are_created_only_where_no_symlink_leads_away() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().join("root");
        let outside = dir.path().join("outside");
        std::fs::create_dir_all(&root).expect("mkdir");
        std::fs::create_dir_all(&outside).expect("mkdir");
        std::os::unix::fs::symlink(&outside, root.join("out")).expect("symlink");
        std::fs::write(root.join("file"), b"x").expect("write");

        let made = ensure_dir(&root, Some(&p("a/b/c"))).expect("created");
        assert!(made.is_dir() && made == root.join("a/b/c"));
        assert!(ensure_dir(&root, Some(&p("a/b/c"))).is_ok(), "idempotent");
        assert!(ensure_dir(&root, Some(&p("out/sub"))).is_err());
        assert!(ensure_dir(&root, Some(&p("file/sub"))).is_err());
        assert_eq!(
            std::fs::read_dir(&outside).expect("ls").count(),
            0,
            "nothing was created outside the root"
        );
        assert_eq!(ensure_dir(&root, None).expect("root"), root);
    }
}
