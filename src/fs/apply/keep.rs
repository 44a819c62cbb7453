//! Conflict and held copies: the losing side of a conflict is kept outside every synced
//! folder, durably, never replacing an earlier copy with other bytes.

use std::path::{Path, PathBuf};

use crate::fs::atomic;

/// What [`keep_copy`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kept {
    /// A new copy, at this path.
    New(PathBuf),
    /// A copy with the same bytes was there already (the same conflict met again).
    Already(PathBuf),
    /// The source no longer exists.
    Gone,
    /// The source does not hold the expected bytes (written since it was last looked at).
    Changed,
}

/// Keeps the losing side of a conflict: copies `src` to `dest` (outside every synced folder),
/// durably. When `dest` is taken by other bytes, the copy goes to `dest.1`, `dest.2`, ...;
/// when it holds the same bytes, nothing is copied again. With `expect`, nothing is copied
/// unless the bytes read have that BLAKE3 hash: a conflict copy is always of a complete
/// version this node recorded, never of a file a local writer has half rewritten.
pub fn keep_copy(src: &Path, dest: &Path, expect: Option<&[u8; 32]>) -> std::io::Result<Kept> {
    let dir = dest
        .parent()
        .ok_or_else(|| std::io::Error::other("conflict copy has no directory"))?;
    std::fs::create_dir_all(dir)?;
    let bytes = match std::fs::read(src) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Kept::Gone),
        Err(e) => return Err(e),
    };
    if expect.is_some_and(|h| blake3::hash(&bytes).as_bytes() != h) {
        return Ok(Kept::Changed);
    }
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
    atomic::write(&target, &bytes, 0o600)?;
    Ok(Kept::New(target))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conflict_copies_are_kept_once_per_content() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("src"), b"bytes").expect("write");
        let src = dir.path().join("src");
        let dest = dir.path().join("c/x/y.node.1");
        assert_eq!(
            keep_copy(&src, &dest, None).expect("copy"),
            Kept::New(dest.clone())
        );
        assert_eq!(std::fs::read(&dest).expect("read"), b"bytes");
        assert_eq!(
            keep_copy(&dir.path().join("gone"), &dest, None).expect("copy"),
            Kept::Gone
        );
        // The same conflict met again (a batch retried) is not copied twice...
        assert_eq!(
            keep_copy(&src, &dest, None).expect("copy"),
            Kept::Already(dest.clone())
        );
        // ...but other bytes under the same name never replace a kept copy.
        std::fs::write(&src, b"other bytes").expect("write");
        let second = dir.path().join("c/x/y.node.1.1");
        assert_eq!(
            keep_copy(&src, &dest, None).expect("copy"),
            Kept::New(second.clone())
        );
        assert_eq!(std::fs::read(&dest).expect("read"), b"bytes");
        assert_eq!(std::fs::read(&second).expect("read"), b"other bytes");
        assert_eq!(
            keep_copy(&src, &dest, None).expect("copy"),
            Kept::Already(second)
        );
    }

    /// A local writer truncated the file the index knows: no copy of the empty (or half
    /// written) file is kept in place of the version that lost.
    #[test]
    fn a_copy_is_kept_only_of_the_expected_bytes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let src = dir.path().join("src");
        std::fs::write(&src, b"").expect("truncate");
        let dest = dir.path().join("c/y.node.1");
        let indexed = *blake3::hash(b"<complete/>").as_bytes();
        assert_eq!(
            keep_copy(&src, &dest, Some(&indexed)).expect("copy"),
            Kept::Changed
        );
        assert!(!dest.exists(), "nothing kept");
        std::fs::write(&src, b"<complete/>").expect("write");
        assert_eq!(
            keep_copy(&src, &dest, Some(&indexed)).expect("copy"),
            Kept::New(dest.clone())
        );
        assert_eq!(std::fs::read(&dest).expect("read"), b"<complete/>");
    }
}
