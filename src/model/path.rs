//! `RelPath`: a path inside a synced folder, validated once at the edge.
//!
//! Every path that comes from a peer, a DB row or the file system is turned into a `RelPath`
//! before anything else touches it, so the rest of the code can join it to a folder root
//! without ever leaving that root.

use std::fmt;

/// Why a path was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("path is empty")]
    Empty,
    #[error("path {0:?} is absolute; only paths relative to the folder root are allowed")]
    Absolute(String),
    #[error("path {0:?} contains a NUL byte")]
    Nul(String),
    #[error("path {0:?} has an empty, '.' or '..' component")]
    BadComponent(String),
    #[error("path {0:?} is longer than {MAX_PATH_BYTES} bytes")]
    TooLong(String),
}

/// Longest relative path accepted (Linux PATH_MAX is 4096 for the whole path).
pub const MAX_PATH_BYTES: usize = 3072;

/// A normalized, relative, UTF-8 path with `/` separators: no leading `/`, no empty, `.` or
/// `..` components, no NUL. Ordering is byte order, so a parent sorts before its children.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RelPath(String);

impl RelPath {
    pub fn new(path: &str) -> Result<Self, PathError> {
        if path.is_empty() {
            return Err(PathError::Empty);
        }
        if path.len() > MAX_PATH_BYTES {
            return Err(PathError::TooLong(path.chars().take(64).collect()));
        }
        if path.starts_with('/') {
            return Err(PathError::Absolute(path.to_owned()));
        }
        if path.contains('\0') {
            return Err(PathError::Nul(path.replace('\0', "\\0")));
        }
        if path
            .split('/')
            .any(|c| c.is_empty() || c == "." || c == "..")
        {
            return Err(PathError::BadComponent(path.to_owned()));
        }
        Ok(Self(path.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The last component.
    pub fn file_name(&self) -> &str {
        self.0.rsplit('/').next().unwrap_or(&self.0)
    }

    /// The parent path, `None` for a top-level entry.
    pub fn parent(&self) -> Option<RelPath> {
        self.0.rfind('/').map(|i| RelPath(self.0[..i].to_owned()))
    }

    /// Number of components (a top-level entry has depth 1).
    pub fn depth(&self) -> usize {
        self.0.split('/').count()
    }

    /// True when `self` is `other` or lies below it.
    pub fn starts_with(&self, other: &RelPath) -> bool {
        self.0 == other.0
            || (self.0.len() > other.0.len()
                && self.0.starts_with(&other.0)
                && self.0.as_bytes()[other.0.len()] == b'/')
    }
}

impl fmt::Display for RelPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_normal_relative_paths() {
        for p in ["a", "default/api/x.xml", "a b/c.d", "..hidden", "x..y/z"] {
            assert_eq!(
                RelPath::new(p).map(|r| r.as_str().to_owned()),
                Ok(p.to_owned())
            );
        }
    }

    #[test]
    fn refuses_escapes_and_malformed_paths() {
        assert_eq!(RelPath::new(""), Err(PathError::Empty));
        assert!(matches!(
            RelPath::new("/etc/passwd"),
            Err(PathError::Absolute(_))
        ));
        assert!(matches!(RelPath::new("a/\0b"), Err(PathError::Nul(_))));
        for p in ["..", "../x", "a/../../x", "a//b", "a/./b", "a/", "./a"] {
            assert!(
                matches!(RelPath::new(p), Err(PathError::BadComponent(_))),
                "{p}"
            );
        }
        assert!(matches!(
            RelPath::new(&"a".repeat(5000)),
            Err(PathError::TooLong(_))
        ));
    }

    #[test]
    fn parent_depth_and_prefix() {
        let p = RelPath::new("default/api/x.xml").expect("valid");
        assert_eq!(
            p.parent().map(|p| p.to_string()),
            Some("default/api".into())
        );
        assert_eq!(p.file_name(), "x.xml");
        assert_eq!(p.depth(), 3);
        let d = RelPath::new("default").expect("valid");
        assert!(p.starts_with(&d));
        assert!(!RelPath::new("defaultx/y").expect("valid").starts_with(&d));
        assert_eq!(RelPath::new("top").expect("valid").parent(), None);
    }
}
