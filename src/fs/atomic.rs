//! Durable whole-file writes outside the synced folders (the daemon's own state files, the
//! kept conflict copies): a temp file in the same directory, written, synced, renamed over the
//! target, then the directory synced. A reader sees the old file or the new one, never a part,
//! and after a power loss the rename is not taken back.

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use super::apply::create_temp;

/// Writes `bytes` to `path` with `mode`, atomically and durably (see the module docs). The
/// directory must exist. On failure the target is left as it was and the temp file is gone.
pub fn write(path: &Path, bytes: &[u8], mode: u32) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let (mut f, tmp) = create_temp(dir, mode)?;
    let written = f
        .write_all(bytes)
        .and_then(|()| f.metadata())
        .and_then(|meta| {
            // The create asked for the mode already; the umask may have taken bits.
            if meta.permissions().mode() & 0o7777 == mode {
                Ok(())
            } else {
                f.set_permissions(std::fs::Permissions::from_mode(mode))
            }
        })
        .and_then(|()| f.sync_all());
    drop(f);
    if let Err(e) = written.and_then(|()| std::fs::rename(&tmp, path)) {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    std::fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_write_replaces_the_whole_file_and_leaves_no_temp() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("state");
        write(&path, b"first\n", 0o600).expect("create");
        assert_eq!(std::fs::read(&path).expect("read"), b"first\n");
        write(&path, b"2\n", 0o640).expect("replace");
        assert_eq!(std::fs::read(&path).expect("read"), b"2\n");
        let meta = std::fs::metadata(&path).expect("stat");
        assert_eq!(meta.permissions().mode() & 0o777, 0o640);
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .expect("list")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("state")]);
        // A directory that is not there: an error, and the target is untouched.
        let missing = dir.path().join("missing/state");
        let e = write(&missing, b"x", 0o600).expect_err("no directory");
        assert_eq!(e.kind(), std::io::ErrorKind::NotFound, "{e}");
        // A target that cannot be replaced (a directory): the temp file does not linger.
        std::fs::create_dir(dir.path().join("busy")).expect("mkdir");
        std::fs::write(dir.path().join("busy/keep"), b"k").expect("write");
        assert!(write(&dir.path().join("busy"), b"x", 0o600).is_err());
        assert_eq!(std::fs::read_dir(dir.path()).expect("list").count(), 2);
    }
}
