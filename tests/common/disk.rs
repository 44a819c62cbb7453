//! Disk trouble on demand: a size-limited tmpfs for one folder or a `state_dir`, read-only
//! bind mounts, and filler files.
//!
//! Mounting needs root. Where it cannot be done, [`Tmpfs::mount`] returns `None` after
//! printing why (the test is then skipped), except under `CI=true`, where it fails the test:
//! CI runs as root and must not pass by skipping. Every mount is undone when its guard is
//! dropped (lazily, `umount -l`, if the plain unmount fails), so a failing test leaves no
//! mount behind.

use std::path::{Path, PathBuf};
use std::process::Command;

/// True when a missing capability must fail the test instead of skipping it.
fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// True when this process runs as root (the owner of `/proc/self` is the effective user).
fn is_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

/// Fails the test in CI, otherwise prints why the test is skipped; returns `None`.
fn cannot<T>(why: String) -> Option<T> {
    assert!(!in_ci(), "CI=true and {why}");
    eprintln!("skipping: {why}");
    None
}

/// Runs `mount ARGS`; the error text when it fails.
fn mount(args: &[&str]) -> Result<(), String> {
    match Command::new("mount").args(args).output() {
        Ok(out) if out.status.success() => Ok(()),
        Ok(out) => Err(format!(
            "`mount {}` failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )),
        Err(e) => Err(format!("cannot run `mount`: {e}")),
    }
}

/// Unmounts `dir`, lazily if a plain unmount fails (a process still has a file open there).
fn unmount(dir: &Path) {
    let plain = Command::new("umount").arg(dir).output();
    if !plain.is_ok_and(|o| o.status.success()) {
        let lazy = Command::new("umount").arg("-l").arg(dir).output();
        if !lazy.as_ref().is_ok_and(|o| o.status.success()) {
            eprintln!("cannot unmount {}: {lazy:?}", dir.display());
        }
    }
}

/// A tmpfs of a fixed size, mounted on a directory of its own temp dir; unmounted on drop.
pub struct Tmpfs {
    /// Field order matters: the mount goes (in `drop`) before its temp dir is removed.
    dir: PathBuf,
    _base: Option<tempfile::TempDir>,
}

impl Tmpfs {
    /// Mounts a tmpfs of `size_kib` KiB; `None` (skipped) where that cannot be done.
    pub fn mount(size_kib: u64) -> Option<Self> {
        let base = tempfile::Builder::new()
            .prefix("artisync-it-tmpfs-")
            .tempdir()
            .expect("temp dir for a mount point");
        let mut fs = Self::mount_on(&base.path().join("mnt"), size_kib)?;
        fs._base = Some(base);
        Some(fs)
    }

    /// Mounts a tmpfs of `size_kib` KiB on `dir` (created if missing); `None` (skipped)
    /// where that cannot be done.
    pub fn mount_on(dir: &Path, size_kib: u64) -> Option<Self> {
        if !is_root() {
            return cannot("mounting a tmpfs needs root".into());
        }
        std::fs::create_dir_all(dir).expect("create the mount point");
        let dir_s = dir.to_str().expect("utf-8 temp path");
        if let Err(why) = mount(&[
            "-t",
            "tmpfs",
            "-o",
            &format!("size={size_kib}k"),
            "tmpfs",
            dir_s,
        ]) {
            return cannot(why);
        }
        Some(Self {
            dir: dir.to_owned(),
            _base: None,
        })
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// Changes the size of the mounted file system (`mount -o remount,size=`).
    pub fn resize(&self, size_kib: u64) {
        let dir_s = self.dir.to_str().expect("utf-8 temp path");
        mount(&["-o", &format!("remount,size={size_kib}k"), dir_s]).expect("resize the tmpfs");
    }

    /// Bytes free for an unprivileged writer... tmpfs has no root reserve, so: bytes free.
    pub fn free(&self) -> u64 {
        free_bytes(&self.dir)
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        unmount(&self.dir);
    }
}

/// Bytes free on the file system holding `dir`.
pub fn free_bytes(dir: &Path) -> u64 {
    let s = nix::sys::statvfs::statvfs(dir)
        .unwrap_or_else(|e| panic!("statvfs {}: {e}", dir.display()));
    s.blocks_available() as u64 * s.fragment_size() as u64
}

/// A directory bind-mounted onto itself, so that it can be remounted read-only and back;
/// unmounted on drop (the directory's content is untouched by all of it).
pub struct BindMount {
    dir: PathBuf,
}

impl BindMount {
    /// `None` (skipped) where it cannot be done.
    pub fn on(dir: &Path) -> Option<Self> {
        if !is_root() {
            return cannot("bind mounts need root".into());
        }
        let dir_s = dir.to_str().expect("utf-8 temp path");
        if let Err(why) = mount(&["--bind", dir_s, dir_s]) {
            return cannot(why);
        }
        Some(Self {
            dir: dir.to_owned(),
        })
    }

    pub fn read_only(&self) {
        let dir_s = self.dir.to_str().expect("utf-8 temp path");
        mount(&["-o", "remount,ro,bind", dir_s]).expect("remount read-only");
    }

    pub fn read_write(&self) {
        let dir_s = self.dir.to_str().expect("utf-8 temp path");
        mount(&["-o", "remount,rw,bind", dir_s]).expect("remount read-write");
    }
}

impl Drop for BindMount {
    fn drop(&mut self) {
        unmount(&self.dir);
    }
}

/// Fills the file system holding `dir` with `dir/name` until at most `leave` bytes are free
/// (ENOSPC ends the writing early, which is fine: the disk is then full). Returns its size.
pub fn fill(dir: &Path, name: &str, leave: u64) -> u64 {
    use std::io::Write;
    let path = dir.join(name);
    let mut f =
        std::fs::File::create(&path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
    let chunk = vec![0x5au8; 64 * 1024];
    let mut written = 0u64;
    // Bounded: a tmpfs of a few MiB takes a few dozen chunks.
    for _ in 0..100_000 {
        let free = free_bytes(dir);
        if free <= leave {
            break;
        }
        let n = (free - leave).min(chunk.len() as u64) as usize;
        match f.write(&chunk[..n]) {
            Ok(0) => break,
            Ok(k) => written += k as u64,
            Err(e) if e.raw_os_error() == Some(nix::libc::ENOSPC) => break,
            Err(e) => panic!("fill {}: {e}", path.display()),
        }
    }
    let _ = f.sync_all();
    written
}

impl super::Node {
    /// Points the node's config at `to` wherever it named `from` (a folder's path, the
    /// `state_dir`); call before start.
    pub fn relocate(&self, from: &Path, to: &Path) {
        let text = std::fs::read_to_string(self.config()).expect("read the node's config");
        let (from, to) = (
            format!("\"{}\"", from.display()),
            format!("\"{}\"", to.display()),
        );
        assert!(text.contains(&from), "config names no {from}:\n{text}");
        std::fs::write(self.config(), text.replace(&from, &to)).expect("write the node's config");
    }

    /// The log so far (all of it).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }
}
