//! The symlink guard: nothing is ever written, removed or chmodded through a symlink (a
//! directory replaced by a link must not let a peer write outside the folder root).

use std::collections::HashMap;
use std::path::Path;

use crate::model::RelPath;

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
pub(super) struct SymlinkCheck {
    /// Directory (relative) -> `None` when it is safe, the refusal otherwise.
    dirs: HashMap<Option<RelPath>, Option<(std::io::ErrorKind, String)>>,
}

impl SymlinkCheck {
    pub(super) fn check(
        &mut self,
        root: &Path,
        path: &RelPath,
        include_self: bool,
    ) -> std::io::Result<()> {
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

pub(super) fn is_symlink(path: &Path) -> bool {
    std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_symlink())
}

#[cfg(test)]
mod tests {
    use crate::fs::apply::testing::p;
    use crate::fs::apply::{Content, Op, apply_batch, remove_stale_temps};

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
}
