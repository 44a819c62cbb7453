//! Names used as keys: folder ids and peer (node) names.
//!
//! Both are 1-64 letters, digits, `-`, `_` or `.`, checked once where the name enters (the
//! config file, a CLI argument) so that a map keyed by folders cannot be indexed by a peer and
//! the other way round. Lookups with a borrowed `&str` (a name read off the wire) need no
//! allocation: both types borrow as `str`.

use std::borrow::Borrow;
use std::fmt;
use std::ops::Deref;
use std::str::FromStr;
use std::sync::Arc;

/// A node, folder or publisher name: 1-64 letters, digits, '-', '_' or '.', and not `.` or
/// `..` (names become path components: a folder's conflict copies, a node's certificate).
pub fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s != "."
        && s != ".."
        && s.len() <= 64
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// A name that breaks the rules of [`valid_name`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{what} {value:?} must be 1-64 characters of letters, digits, '-', '_' or '.' (not . or ..)"
)]
pub struct NameError {
    /// What the name was for: "folder id" or "node name".
    pub what: &'static str,
    /// The rejected name, as given.
    pub value: String,
}

macro_rules! name_type {
    ($(#[$doc:meta])* $name:ident, $what:literal) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(Arc<str>);

        impl $name {
            /// Checks `s` against the naming rules.
            pub fn new(s: impl Into<String>) -> Result<Self, NameError> {
                let s = s.into();
                if valid_name(&s) {
                    Ok(Self(Arc::from(s)))
                } else {
                    Err(NameError {
                        what: $what,
                        value: s,
                    })
                }
            }

            /// A name written in the source: panics if it breaks the rules, which is a bug in
            /// the caller, never a user's or peer's input.
            #[track_caller]
            pub fn literal(s: &'static str) -> Self {
                match Self::new(s) {
                    Ok(name) => name,
                    Err(e) => panic!("{e}"),
                }
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl Deref for $name {
            type Target = str;
            fn deref(&self) -> &str {
                &self.0
            }
        }

        impl Borrow<str> for $name {
            fn borrow(&self) -> &str {
                &self.0
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Debug::fmt(&*self.0, f)
            }
        }

        impl FromStr for $name {
            type Err = NameError;
            fn from_str(s: &str) -> Result<Self, NameError> {
                Self::new(s)
            }
        }

        impl TryFrom<String> for $name {
            type Error = NameError;
            fn try_from(s: String) -> Result<Self, NameError> {
                Self::new(s)
            }
        }

        impl From<$name> for String {
            fn from(name: $name) -> String {
                name.0.to_string()
            }
        }

        impl PartialEq<str> for $name {
            fn eq(&self, other: &str) -> bool {
                &*self.0 == other
            }
        }

        impl PartialEq<&str> for $name {
            fn eq(&self, other: &&str) -> bool {
                &*self.0 == *other
            }
        }

        impl AsRef<std::path::Path> for $name {
            fn as_ref(&self) -> &std::path::Path {
                std::path::Path::new(&*self.0)
            }
        }

        impl PartialEq<$name> for str {
            fn eq(&self, other: &$name) -> bool {
                self == &*other.0
            }
        }

        impl PartialEq<$name> for String {
            fn eq(&self, other: &$name) -> bool {
                self.as_str() == &*other.0
            }
        }

        impl PartialEq<String> for $name {
            fn eq(&self, other: &String) -> bool {
                &*self.0 == other.as_str()
            }
        }
    };
}

name_type!(
    /// A folder's id, the same on every node (e.g. `synapse-configs`): the key of everything kept
    /// per folder.
    FolderId,
    "folder id"
);

name_type!(
    /// A node's name as the cluster knows it (its own `node` key, a peer's `name`): the key of
    /// everything kept per peer.
    PeerName,
    "node name"
);

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn names_follow_the_rules_and_say_what_they_name() {
        assert!(FolderId::new("synapse-configs").is_ok());
        assert!(PeerName::new("gw1.dc-2_a").is_ok());
        let e = FolderId::new("../etc").expect_err("a slash is not a name");
        assert_eq!(e.what, "folder id");
        assert!(e.to_string().contains("\"../etc\""), "{e}");
        assert!(PeerName::new("").is_err());
        assert!(PeerName::new("a".repeat(65)).is_err());
        assert!(PeerName::new("a".repeat(64)).is_ok());
        assert!(PeerName::new("gw 1").is_err());
        assert!(PeerName::new("gw\u{e9}").is_err());
        assert!(FolderId::new("..").is_err(), "a path component that climbs");
        assert!(FolderId::new(".").is_err());
        assert!(FolderId::new("...").is_ok());
    }

    #[test]
    fn a_map_keyed_by_name_is_read_with_a_borrowed_str() {
        let mut m = HashMap::new();
        m.insert(FolderId::literal("a"), 1);
        assert_eq!(m.get("a"), Some(&1));
        assert_eq!(m.get("b"), None);
    }

    #[test]
    fn serde_checks_the_rules() {
        #[derive(serde::Deserialize)]
        struct T {
            id: FolderId,
        }
        let ok: T = serde_json::from_str(r#"{"id":"x-1"}"#).expect("valid");
        assert_eq!(ok.id, "x-1");
        let bad = serde_json::from_str::<T>(r#"{"id":"a/b"}"#)
            .err()
            .expect("a slash is refused");
        assert!(bad.to_string().contains("folder id \"a/b\""), "{bad}");
        assert_eq!(
            serde_json::to_string(&PeerName::literal("gw1")).expect("serializes"),
            "\"gw1\""
        );
    }
}
