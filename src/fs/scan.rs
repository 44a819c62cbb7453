//! Reading the disk: stat + BLAKE3 of one path, and full walks of a folder. Unchanged files
//! (same size, mtime and inode as the index remembers) are not hashed again.

use std::collections::HashMap;
use std::fs::File;
use std::io::Read;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::model::{Hash, Kind, Observed, RelPath};
use crate::store::StatKey;

use super::ignore::Ignore;

#[derive(Debug, thiserror::Error)]
pub enum ScanError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// What one look at a path found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Look {
    /// Nothing there (or an ignored / unsupported thing such as a symlink).
    Absent,
    Present(Observed, StatKey),
    /// The file changed while it was being hashed: look again later.
    Unstable,
    /// A symlink: never followed, never synced.
    Symlink,
}

pub fn stat_key(meta: &std::fs::Metadata) -> StatKey {
    StatKey {
        size: meta.len(),
        mtime_ns: meta.mtime() * 1_000_000_000 + meta.mtime_nsec(),
        ino: meta.ino(),
    }
}

pub fn hash_file(path: &Path) -> std::io::Result<Hash> {
    let mut file = File::open(path)?;
    let mut hasher = blake3::Hasher::new();
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(*hasher.finalize().as_bytes())
}

/// Looks at `root/rel`. `known` is the index's (stat key, hash) for the path: when the stat key
/// still matches, the known hash is reused instead of reading the file.
pub fn look(root: &Path, rel: &RelPath, known: Option<(StatKey, Hash)>) -> Result<Look, ScanError> {
    look_checked(root, rel, known, &mut ParentCheck::default())
}

/// Remembers, per directory, whether it or one above it is a symlink, so a scan of many
/// files in few directories pays one `lstat` per directory, not one per file and level.
#[derive(Debug, Default)]
pub struct ParentCheck {
    through_link: HashMap<RelPath, bool>,
}

impl ParentCheck {
    /// True when a directory above `rel` (below `root`) is a symlink: what lies behind it is
    /// outside the folder and never synced.
    pub fn parent_is_symlink(&mut self, root: &Path, rel: &RelPath) -> bool {
        match rel.parent() {
            Some(dir) => self.dir_is_or_under_symlink(root, &dir),
            None => false,
        }
    }

    fn dir_is_or_under_symlink(&mut self, root: &Path, dir: &RelPath) -> bool {
        if let Some(v) = self.through_link.get(dir) {
            return *v;
        }
        let above = match dir.parent() {
            Some(p) => self.dir_is_or_under_symlink(root, &p),
            None => false,
        };
        let v = above
            || std::fs::symlink_metadata(root.join(dir.as_str()))
                .is_ok_and(|m| m.file_type().is_symlink());
        self.through_link.insert(dir.clone(), v);
        v
    }
}

/// [`look`] with a shared [`ParentCheck`].
pub fn look_checked(
    root: &Path,
    rel: &RelPath,
    known: Option<(StatKey, Hash)>,
    parents: &mut ParentCheck,
) -> Result<Look, ScanError> {
    let path = root.join(rel.as_str());
    let io = |source| ScanError::Io {
        path: path.clone(),
        source,
    };
    if parents.parent_is_symlink(root, rel) {
        return Ok(Look::Symlink);
    }
    let meta = match std::fs::symlink_metadata(&path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Look::Absent),
        // A parent that became a file, or similar: the path is not there.
        Err(e) if e.raw_os_error() == Some(nix::libc::ENOTDIR) => return Ok(Look::Absent),
        Err(e) => return Err(io(e)),
    };
    let mode = meta.permissions().mode() & 0o7777;
    let ft = meta.file_type();
    if ft.is_symlink() {
        return Ok(Look::Symlink);
    }
    if ft.is_dir() {
        let obs = Observed {
            kind: Kind::Dir,
            size: 0,
            mode,
            hash: None,
        };
        return Ok(Look::Present(obs, stat_key(&meta)));
    }
    if !ft.is_file() {
        // FIFOs, sockets, devices: not artifacts.
        return Ok(Look::Absent);
    }
    let before = stat_key(&meta);
    let hash = match known {
        Some((k, h)) if k == before => h,
        _ => {
            let h = match hash_file(&path) {
                Ok(h) => h,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Look::Absent),
                Err(e) => return Err(io(e)),
            };
            match std::fs::symlink_metadata(&path) {
                Ok(after) if stat_key(&after) == before => h,
                Ok(_) => return Ok(Look::Unstable),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Look::Absent),
                Err(e) => return Err(io(e)),
            }
        }
    };
    Ok(Look::Present(
        Observed {
            kind: Kind::File,
            size: before.size,
            mode,
            hash: Some(hash),
        },
        before,
    ))
}

/// Result of walking a whole folder.
#[derive(Debug, Default)]
pub struct Walk {
    /// Every non-ignored file and directory below the root (root excluded), parents first,
    /// in directory order (not sorted: every caller sorts or sets them anyway).
    pub paths: Vec<RelPath>,
    /// Symlinks found (skipped).
    pub symlinks: Vec<RelPath>,
    /// Entries whose names are not valid UTF-8 or not valid paths (skipped, reported).
    pub bad_names: Vec<PathBuf>,
    /// Entries that could not be read.
    pub errors: Vec<String>,
}

/// Lists the folder (without hashing: each path is then `look`ed at).
pub fn walk(root: &Path, ignore: &Ignore) -> Result<Walk, ScanError> {
    let mut out = Walk::default();
    let meta = std::fs::metadata(root).map_err(|source| ScanError::Io {
        path: root.to_owned(),
        source,
    })?;
    if !meta.is_dir() {
        return Err(ScanError::Io {
            path: root.to_owned(),
            source: std::io::Error::new(
                std::io::ErrorKind::NotADirectory,
                "folder root is not a directory",
            ),
        });
    }
    let mut it = walkdir::WalkDir::new(root)
        .follow_links(false)
        .min_depth(1)
        .into_iter();
    while let Some(entry) = it.next() {
        let entry = match entry {
            Ok(e) => e,
            Err(e) => {
                out.errors.push(e.to_string());
                continue;
            }
        };
        let rel = entry
            .path()
            .strip_prefix(root)
            .ok()
            .and_then(|r| r.to_str())
            .map(RelPath::new);
        let rel = match rel {
            Some(Ok(r)) => r,
            _ => {
                out.bad_names.push(entry.path().to_owned());
                if entry.file_type().is_dir() {
                    it.skip_current_dir();
                }
                continue;
            }
        };
        if ignore.is_ignored(&rel) {
            if entry.file_type().is_dir() {
                it.skip_current_dir();
            }
            continue;
        }
        if entry.file_type().is_symlink() {
            out.symlinks.push(rel);
            continue;
        }
        out.paths.push(rel);
    }
    Ok(out)
}

/// Index knowledge handed to a scan: stat key and hash per path.
pub type Known = HashMap<RelPath, (StatKey, Hash)>;

/// Identity of a folder root, to notice it being replaced or unmounted.
pub fn root_identity(root: &Path) -> Option<(u64, u64)> {
    std::fs::metadata(root)
        .ok()
        .filter(|m| m.is_dir())
        .map(|m| (m.dev(), m.ino()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn look_hashes_and_reuses_known_hash() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("a.xml"), b"<a/>").expect("write");
        let rel = RelPath::new("a.xml").expect("valid");
        let Look::Present(obs, key) = look(dir.path(), &rel, None).expect("look") else {
            panic!("expected a file");
        };
        assert_eq!(obs.hash, Some(*blake3::hash(b"<a/>").as_bytes()));
        assert_eq!(obs.size, 4);
        // With a matching stat key the stored hash is trusted (no read).
        let fake = [7u8; 32];
        let Look::Present(obs2, _) = look(dir.path(), &rel, Some((key, fake))).expect("look")
        else {
            panic!("expected a file");
        };
        assert_eq!(obs2.hash, Some(fake));
        assert_eq!(
            look(dir.path(), &RelPath::new("nope").expect("valid"), None).expect("look"),
            Look::Absent
        );
    }

    #[test]
    fn files_behind_a_symlinked_directory_are_not_looked_at() {
        let dir = tempfile::tempdir().expect("tempdir");
        let outside = tempfile::tempdir().expect("tempdir");
        std::fs::write(outside.path().join("secret.xml"), b"<s/>").expect("write");
        std::os::unix::fs::symlink(outside.path(), dir.path().join("api")).expect("symlink");
        let rel = RelPath::new("api/secret.xml").expect("valid");
        assert_eq!(look(dir.path(), &rel, None).expect("look"), Look::Symlink);
    }

    #[test]
    fn walk_skips_ignored_and_symlinks() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir_all(dir.path().join("api/sub")).expect("mkdir");
        std::fs::write(dir.path().join("api/x.xml"), b"<x/>").expect("write");
        std::fs::write(dir.path().join("api/x.xml.swp"), b"").expect("write");
        std::fs::write(dir.path().join("api/.artisync.zz.tmp"), b"").expect("write");
        std::os::unix::fs::symlink("/etc/passwd", dir.path().join("api/link")).expect("symlink");
        let w = walk(dir.path(), &Ignore::new(&[]).expect("ignore")).expect("walk");
        let mut names: Vec<&str> = w.paths.iter().map(|p| p.as_str()).collect();
        names.sort_unstable();
        assert_eq!(names, vec!["api", "api/sub", "api/x.xml"]);
        assert_eq!(w.symlinks.len(), 1);
    }
}
