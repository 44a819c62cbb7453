//! Who owns each deployed file. Pure: the retriever's deployed records (and what is on disk)
//! in, the bytes each path must hold out.
//!
//! Every deployed artifact *claims* the paths of its bundle in its folder, each with the BLAKE3
//! hash of the bytes it wants there. A path is a (folder, relative path) pair: `default/api/x.xml`
//! in a tenant's folder is another file than `default/api/x.xml` in the super tenant's. A path is owned with a reference count: it stays while at least one
//! deployed artifact claims it, and is removed only when none does (WSO2's shared
//! `ga-config-key` local entry, global fault sequences, endpoints an API Product shares with its
//! API). Claims that want the same bytes share the file. Claims that want different bytes are a
//! [`PathConflict`], reported, and resolved by [`resolve`] the same way on every node:
//!
//! 1. When the bytes on disk are wanted by one of the claims and every claim that wants other
//!    bytes is a *keep* claim, the disk stays as it is. A keep claim never replaces an existing
//!    file: WSO2's `ga-config-key` local entry (never replaced once deployed), and every
//!    sequence, endpoint and local entry of a `GatewayAPIDTO` whose `override` is `false`.
//! 2. Otherwise the claim of the lowest artifact id (byte order of the lower-case UUID) among
//!    the claims that are not keep claims wins, or among all claims when every one is a keep
//!    claim.
//!
//! Rule 2 depends only on the deployed set, so nodes with the same artifacts pick the same
//! bytes whatever order they deployed them in. Rule 1 depends on the disk; where two nodes hold
//! different bytes for a keep path, the mesh resolves their concurrent change to one version on
//! both, which rule 1 then keeps on both.
//!
//! A claim whose hash is unknown (a record written before claims had hashes) never wins and is
//! never a conflict; while only such claims exist, the file is left as it is.

use std::collections::BTreeMap;

use crate::store::DeployedArtifact;

/// One artifact's claim on one path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Claim<'a> {
    pub artifact: &'a str,
    /// BLAKE3 hex of the bytes wanted; empty when unknown.
    pub hash: &'a str,
    /// Does not replace an existing file (see the module docs).
    pub keep: bool,
}

/// What a path must hold, by [`resolve`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resolution<'a> {
    /// No deployed artifact claims it: the file goes.
    Remove,
    /// Only claims of unknown hash: left as it is.
    Leave,
    /// The bytes of `winner`'s claim; `losers` want other bytes (a conflict when not empty).
    Hold {
        winner: Claim<'a>,
        losers: Vec<Claim<'a>>,
        /// Rule 1 decided: the disk's bytes were kept against keep claims.
        kept_on_disk: bool,
    },
}

/// Decides what one path holds, given every claim on it and the hash of the file on disk
/// (`None`: no file). See the module docs for the rules.
pub fn resolve<'a>(claims: &[Claim<'a>], on_disk: Option<&str>) -> Resolution<'a> {
    if claims.is_empty() {
        return Resolution::Remove;
    }
    let known: Vec<Claim<'a>> = claims
        .iter()
        .copied()
        .filter(|c| !c.hash.is_empty())
        .collect();
    if known.is_empty() {
        return Resolution::Leave;
    }
    let losers_of = |winner: &Claim<'a>| -> Vec<Claim<'a>> {
        let mut l: Vec<Claim<'a>> = known
            .iter()
            .copied()
            .filter(|c| c.hash != winner.hash)
            .collect();
        l.sort_by(|a, b| a.artifact.cmp(b.artifact));
        l
    };
    let lowest =
        |it: &mut dyn Iterator<Item = Claim<'a>>| it.min_by(|a, b| a.artifact.cmp(b.artifact));
    // Rule 1: the disk's bytes stay against claims that never replace a file.
    if let Some(disk) = on_disk {
        let holders = known.iter().copied().filter(|c| c.hash == disk);
        if let Some(holder) = lowest(&mut holders.into_iter()) {
            let others_keep = known.iter().filter(|c| c.hash != disk).all(|c| c.keep);
            if others_keep {
                let losers = losers_of(&holder);
                let kept_on_disk = !losers.is_empty();
                return Resolution::Hold {
                    winner: holder,
                    losers,
                    kept_on_disk,
                };
            }
        }
    }
    // Rule 2: the lowest artifact id among the claims that replace; among all when none does.
    let winner = lowest(&mut known.iter().copied().filter(|c| !c.keep))
        .or_else(|| lowest(&mut known.iter().copied()));
    match winner {
        Some(winner) => Resolution::Hold {
            losers: losers_of(&winner),
            winner,
            kept_on_disk: false,
        },
        None => Resolution::Leave,
    }
}

/// Every claim of a set of deployed artifacts, by folder and path.
#[derive(Debug, Default)]
pub struct Owners<'a> {
    /// Folder -> path -> claims.
    by_path: BTreeMap<&'a str, BTreeMap<&'a str, Vec<Claim<'a>>>>,
}

impl<'a> Owners<'a> {
    pub fn of(deployed: impl IntoIterator<Item = &'a DeployedArtifact>) -> Self {
        let mut by_path: BTreeMap<&'a str, BTreeMap<&'a str, Vec<Claim<'a>>>> = BTreeMap::new();
        for d in deployed {
            if d.files.is_empty() {
                // A record from before claims had hashes: its paths, hash unknown.
                for p in &d.paths {
                    by_path
                        .entry(&d.folder)
                        .or_default()
                        .entry(p)
                        .or_default()
                        .push(Claim {
                            artifact: &d.id,
                            hash: "",
                            keep: false,
                        });
                }
                continue;
            }
            for f in &d.files {
                by_path
                    .entry(&d.folder)
                    .or_default()
                    .entry(&f.path)
                    .or_default()
                    .push(Claim {
                        artifact: &d.id,
                        hash: &f.hash,
                        keep: f.keep,
                    });
            }
        }
        Self { by_path }
    }

    /// The claims on `path` in `folder` (empty: nobody wants it).
    pub fn claims(&self, folder: &str, path: &str) -> &[Claim<'a>] {
        self.by_path
            .get(folder)
            .and_then(|paths| paths.get(path))
            .map_or(&[], Vec::as_slice)
    }

    /// Every claimed (folder, path).
    pub fn paths(&self) -> impl Iterator<Item = (&'a str, &'a str)> + '_ {
        self.by_path
            .iter()
            .flat_map(|(folder, paths)| paths.keys().map(move |p| (*folder, *p)))
    }
}

/// Two or more deployed artifacts want different bytes at one path: shown in `status` and
/// `artifact deployed` until they agree or one goes.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PathConflict {
    /// The folder id the path is in.
    #[serde(default)]
    pub folder: String,
    /// Below that folder's root.
    pub path: String,
    /// The artifact whose bytes the file holds.
    pub winner: String,
    /// The artifacts that want other bytes there.
    pub losers: Vec<String>,
    /// Why the winner won.
    pub rule: String,
}

impl PathConflict {
    /// The conflict a [`Resolution`] of `path` in `folder` describes, if it is one.
    pub fn of(folder: &str, path: &str, resolution: &Resolution<'_>) -> Option<Self> {
        let Resolution::Hold {
            winner,
            losers,
            kept_on_disk,
        } = resolution
        else {
            return None;
        };
        if losers.is_empty() {
            return None;
        }
        let rule = if *kept_on_disk {
            "the file on disk is kept: the other artifacts never replace it (WSO2 ga-config-key, or override=false)"
        } else {
            "the lowest artifact id wins"
        };
        Some(Self {
            folder: folder.to_owned(),
            path: path.to_owned(),
            winner: winner.artifact.to_owned(),
            losers: losers.iter().map(|c| c.artifact.to_owned()).collect(),
            rule: rule.to_owned(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claim<'a>(artifact: &'a str, hash: &'a str, keep: bool) -> Claim<'a> {
        Claim {
            artifact,
            hash,
            keep,
        }
    }

    fn winner(r: &Resolution<'_>) -> Option<(String, String)> {
        match r {
            Resolution::Hold { winner, .. } => {
                Some((winner.artifact.to_owned(), winner.hash.to_owned()))
            }
            _ => None,
        }
    }

    #[test]
    fn a_path_goes_only_when_nobody_claims_it() {
        assert_eq!(resolve(&[], Some("h")), Resolution::Remove);
        let shared = [claim("b", "h", false), claim("a", "h", false)];
        let r = resolve(&shared, None);
        assert_eq!(winner(&r), Some(("a".into(), "h".into())));
        assert!(
            PathConflict::of("f", "p", &r).is_none(),
            "same bytes: shared"
        );
        assert_eq!(
            resolve(&[claim("a", "", false)], Some("x")),
            Resolution::Leave
        );
    }

    #[test]
    fn the_lowest_artifact_id_wins_whatever_the_order_or_the_disk() {
        let claims = [
            claim("c", "hc", false),
            claim("a", "ha", false),
            claim("b", "hb", false),
        ];
        for disk in [None, Some("ha"), Some("hb"), Some("other")] {
            let mut rev = claims;
            rev.reverse();
            for order in [&claims[..], &rev[..]] {
                let r = resolve(order, disk);
                assert_eq!(winner(&r), Some(("a".into(), "ha".into())), "{disk:?}");
                let c = PathConflict::of("f", "p", &r).expect("a conflict");
                assert_eq!(c.losers, vec!["b".to_owned(), "c".to_owned()]);
                assert!(c.rule.contains("lowest"));
            }
        }
        // An unknown hash never wins.
        let r = resolve(&[claim("a", "", false), claim("b", "hb", false)], None);
        assert_eq!(winner(&r), Some(("b".into(), "hb".into())));
    }

    #[test]
    fn keep_claims_never_replace_the_file_on_disk() {
        // ga-config-key: every claim keeps; the disk's bytes stay while someone wants them.
        let claims = [claim("a", "ha", true), claim("b", "hb", true)];
        let r = resolve(&claims, Some("hb"));
        assert_eq!(winner(&r), Some(("b".into(), "hb".into())));
        assert!(
            PathConflict::of("f", "p", &r)
                .expect("reported")
                .rule
                .contains("kept")
        );
        // Nobody wants the disk's bytes (or no file): the lowest id.
        assert_eq!(
            winner(&resolve(&claims, Some("hx"))),
            Some(("a".into(), "ha".into()))
        );
        assert_eq!(
            winner(&resolve(&claims, None)),
            Some(("a".into(), "ha".into()))
        );
        // A claim that replaces wins over keep claims, even of a lower id.
        let claims = [claim("a", "ha", true), claim("z", "hz", false)];
        assert_eq!(
            winner(&resolve(&claims, Some("ha"))),
            Some(("z".into(), "hz".into()))
        );
        assert_eq!(
            winner(&resolve(&claims, Some("hz"))),
            Some(("z".into(), "hz".into()))
        );
    }

    #[test]
    fn old_records_claim_their_paths_with_an_unknown_hash() {
        let old = DeployedArtifact {
            id: "a".into(),
            name: "n".into(),
            version: "v".into(),
            revision: 1,
            labels: vec![],
            folder: "f".into(),
            paths: vec!["p".into()],
            deployed_ms: 0,
            files: vec![],
            warnings: vec![],
        };
        let owners = Owners::of([&old]);
        assert_eq!(owners.claims("f", "p"), &[claim("a", "", false)]);
        assert!(owners.claims("f", "q").is_empty());
        assert_eq!(owners.paths().collect::<Vec<_>>(), vec![("f", "p")]);
    }

    /// A tenant's API and the super tenant's deploy the same relative paths (same API name,
    /// the shared `ga-config-key`) into different folders: different files, no conflict, and
    /// dropping one leaves the other folder's claims whole.
    #[test]
    fn one_path_in_two_folders_is_two_files() {
        let record = |id: &str, folder: &str, hash: &str| DeployedArtifact {
            id: id.into(),
            name: "n".into(),
            version: "v".into(),
            revision: 1,
            labels: vec![],
            folder: folder.into(),
            paths: vec!["default/api/a.xml".into()],
            deployed_ms: 0,
            files: vec![crate::store::DeployedFile {
                path: "default/api/a.xml".into(),
                hash: hash.into(),
                keep: false,
            }],
            warnings: vec![],
        };
        let (sup, tenant) = (
            record("a", "synapse-configs", "h1"),
            record("b", "tenant-1", "h2"),
        );
        let owners = Owners::of([&sup, &tenant]);
        let p = "default/api/a.xml";
        for (folder, id, hash) in [("synapse-configs", "a", "h1"), ("tenant-1", "b", "h2")] {
            let r = resolve(owners.claims(folder, p), None);
            assert_eq!(winner(&r), Some((id.into(), hash.into())), "{folder}");
            assert!(PathConflict::of(folder, p, &r).is_none(), "{folder}");
        }
        assert_eq!(
            owners.paths().collect::<Vec<_>>(),
            vec![("synapse-configs", p), ("tenant-1", p)]
        );
        // The tenant's API goes: its folder's file goes, the super tenant's stays.
        let owners = Owners::of([&sup]);
        assert_eq!(
            resolve(owners.claims("tenant-1", p), Some("h2")),
            Resolution::Remove
        );
        assert_eq!(
            winner(&resolve(owners.claims("synapse-configs", p), Some("h1"))),
            Some(("a".into(), "h1".into()))
        );
    }
}
