//! What is never synced: artisync's own temp files, editor and Synapse leftovers, and the
//! folder's configured globs.

use globset::{Glob, GlobSet, GlobSetBuilder};

use crate::model::RelPath;

/// Prefix and suffix of artisync's own temp files (never with a deployable extension).
pub const TEMP_PREFIX: &str = ".artisync.";
pub const TEMP_SUFFIX: &str = ".tmp";

/// Ignored in every folder unless nothing else: editor swap/backup files and Synapse's
/// failed-deployment leftovers.
pub const DEFAULT_IGNORES: &[&str] = &["*.swp", "*~", ".#*", "*.back"];

#[derive(Debug, Clone)]
pub struct Ignore {
    /// Matched against the file name alone.
    names: GlobSet,
    /// Patterns with a `/`, matched against the whole relative path.
    paths: GlobSet,
}

impl Ignore {
    /// Builds the matcher from the folder's extra globs (already validated by the config).
    pub fn new(extra: &[String]) -> Result<Self, globset::Error> {
        let mut names = GlobSetBuilder::new();
        let mut paths = GlobSetBuilder::new();
        for p in DEFAULT_IGNORES {
            names.add(Glob::new(p)?);
        }
        for p in extra {
            if p.contains('/') {
                paths.add(Glob::new(p.trim_start_matches('/'))?);
            } else {
                names.add(Glob::new(p)?);
            }
        }
        Ok(Self {
            names: names.build()?,
            paths: paths.build()?,
        })
    }

    /// True for artisync's own temp files.
    pub fn is_temp(name: &str) -> bool {
        name.starts_with(TEMP_PREFIX) && name.ends_with(TEMP_SUFFIX)
    }

    /// True when `path`, or any directory above it, is ignored.
    pub fn is_ignored(&self, path: &RelPath) -> bool {
        let s = path.as_str();
        let mut end = 0;
        for component in s.split('/') {
            end += component.len();
            if Self::is_temp(component)
                || self.names.is_match(component)
                || self.paths.is_match(&s[..end])
            {
                return true;
            }
            end += 1;
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> RelPath {
        RelPath::new(s).expect("valid")
    }

    #[test]
    fn defaults_own_temps_and_globs() {
        let ig = Ignore::new(&["*.bak".into(), "default/tmp/*".into()]).expect("globs");
        for s in [
            "api/x.xml.swp",
            "api/x.xml~",
            "api/.#x.xml",
            "api/x.xml.back",
            "api/.artisync.abc123.tmp",
            "a/b.bak",
            "default/tmp/x.xml",
            "x.swp/inner.xml",
        ] {
            assert!(ig.is_ignored(&p(s)), "{s} should be ignored");
        }
        for s in [
            "api/x.xml",
            "default/api/y.xml",
            "plans/a.siddhiql",
            ".artisync.x",
            "default/tmpx/a",
        ] {
            assert!(!ig.is_ignored(&p(s)), "{s} should not be ignored");
        }
    }
}
