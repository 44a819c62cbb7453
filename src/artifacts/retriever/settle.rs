//! Settling deployed paths: each (folder, path) brought to what the deployed artifacts want,
//! by the ownership rules of [`crate::artifacts::owners`], with the bytes in hand or fetched
//! again from the winning artifact's bundle.

use std::collections::{BTreeMap, BTreeSet};

use tracing::warn;

use super::{Retriever, SourceError};
use crate::artifacts::owners::{Owners, PathConflict, Resolution, resolve};
use crate::engine::{DeployRequest, FolderHandle};
use crate::model::RelPath;

/// Why deployed files could not be brought to what the deployed artifacts want.
#[derive(Debug, thiserror::Error)]
pub(super) enum SettleError {
    /// The source could not give the bytes of a file to restore.
    #[error(transparent)]
    Source(SourceError),
    /// The folder did not take the writes.
    #[error(transparent)]
    Engine(crate::engine::EngineError),
}

impl Retriever {
    /// Brings each of `paths` (folder, path) to what the deployed artifacts want (see
    /// [`crate::artifacts::owners`]): removed when none claims it, left alone when the disk
    /// already holds the winning bytes, written otherwise, with bytes `in_hand` (by artifact
    /// and path) or fetched again from the winner's current bundle. Conflicts found are kept
    /// for status.
    /// Paths in a folder this node no longer deploys into are left as they are.
    pub(super) async fn settle(
        &mut self,
        paths: BTreeSet<(String, String)>,
        in_hand: &BTreeMap<(String, String), Vec<u8>>,
    ) -> Result<(), SettleError> {
        let mut by_folder: BTreeMap<String, Vec<RelPath>> = BTreeMap::new();
        for (folder, path) in paths {
            if let Ok(p) = RelPath::new(&path) {
                by_folder.entry(folder).or_default().push(p);
            }
        }
        let mut requests: Vec<(String, FolderHandle, DeployRequest)> = Vec::new();
        for (folder, rel) in by_folder {
            let Some(handle) = self.folders.get(folder.as_str()).cloned() else {
                warn!(folder = %folder, paths = rel.len(), "deployed files in a folder this node no longer deploys into; left as they are");
                continue;
            };
            let request = self.settle_folder(&folder, &handle, rel, in_hand).await?;
            if !request.writes.is_empty() || !request.removes.is_empty() {
                requests.push((folder, handle, request));
            }
        }
        // Writes first: an artifact that moved folders (its tenant remapped) is in its new
        // folder before it leaves the old one.
        requests.sort_by_key(|(_, _, r)| r.writes.is_empty());
        for (folder, handle, request) in requests {
            let (written, removed) = (request.writes.len(), request.removes.len());
            handle.deploy(request).await.map_err(SettleError::Engine)?;
            tracing::debug!(folder = %folder, written, removed, "deployed files settled");
        }
        Ok(())
    }

    /// What [`Self::settle`] writes and removes in one folder.
    async fn settle_folder(
        &mut self,
        folder: &str,
        handle: &FolderHandle,
        rel: Vec<RelPath>,
        in_hand: &BTreeMap<(String, String), Vec<u8>>,
    ) -> Result<DeployRequest, SettleError> {
        let hashes = handle.disk_hashes(rel.clone()).await;
        let disk: BTreeMap<String, String> = rel
            .iter()
            .zip(hashes)
            .filter_map(|(p, h)| Some((p.to_string(), blake3::Hash::from(h?).to_hex().to_string())))
            .collect();
        let mut request = DeployRequest::default();
        // Paths whose winning bytes are not in hand: by artifact, (path, hash).
        let mut refetch: BTreeMap<String, Vec<(String, String)>> = BTreeMap::new();
        {
            let owners = Owners::of(self.deployed.values());
            for path in &rel {
                let on_disk = disk.get(path.as_str()).map(String::as_str);
                let resolution = resolve(owners.claims(folder, path.as_str()), on_disk);
                let key = (folder.to_owned(), path.to_string());
                match PathConflict::of(folder, path.as_str(), &resolution) {
                    Some(c) => {
                        if self.conflicts.get(&key) != Some(&c) {
                            warn!(folder = %folder, path = %path, winner = %c.winner, losers = ?c.losers, rule = %c.rule, "deployed artifacts want different content at one path");
                        }
                        self.conflicts.insert(key, c);
                    }
                    None => {
                        self.conflicts.remove(&key);
                    }
                }
                match resolution {
                    Resolution::Remove => {
                        if on_disk.is_some() {
                            request.removes.push(path.clone());
                        }
                    }
                    Resolution::Leave => {}
                    Resolution::Hold { winner, .. } => {
                        if on_disk == Some(winner.hash) {
                            continue;
                        }
                        // The winner claims this path in this folder, so its record (and the
                        // bytes in hand for it) is of this folder.
                        let key = (winner.artifact.to_owned(), path.to_string());
                        match in_hand.get(&key) {
                            Some(data) => request.writes.push((path.clone(), data.clone())),
                            None => refetch
                                .entry(key.0)
                                .or_default()
                                .push((key.1, winner.hash.to_owned())),
                        }
                    }
                }
            }
        }
        for (id, wanted) in refetch {
            request.writes.extend(self.refetch(&id, wanted).await?);
        }
        Ok(request)
    }

    /// The bytes `wanted` (path, hash) of deployed artifact `id`, from its current bundle.
    /// An artifact that changed meanwhile gives nothing: its own redeploy settles its paths.
    async fn refetch(
        &mut self,
        id: &str,
        wanted: Vec<(String, String)>,
    ) -> Result<Vec<(RelPath, Vec<u8>)>, SettleError> {
        let revision = self.deployed.get(id).map(|d| d.revision);
        let meta = match self.source.get(id, &self.config.gateway_labels).await {
            Ok(Some(mut m)) if !m.removed && Some(m.revision) == revision => {
                m.labels.retain(|l| self.config.gateway_labels.contains(l));
                m
            }
            Ok(_) | Err(SourceError::Artifact { .. }) => {
                warn!(artifact = %id, "cannot restore its deployed files: it changed at the source; its redeploy follows");
                return Ok(Vec::new());
            }
            Err(e) => return Err(SettleError::Source(e)),
        };
        let bundle = match self.source.bundle(&meta).await {
            Ok(b) => b,
            Err(SourceError::Artifact { problem, .. }) => {
                warn!(artifact = %id, problem = %problem, "cannot restore its deployed files");
                return Ok(Vec::new());
            }
            Err(e) => return Err(SettleError::Source(e)),
        };
        let mut out = Vec::new();
        for f in bundle.files {
            let hash = blake3::hash(&f.data).to_hex().to_string();
            if wanted
                .iter()
                .any(|(p, h)| p == f.path.as_str() && *h == hash)
            {
                out.push((f.path, f.data));
            }
        }
        Ok(out)
    }
}
