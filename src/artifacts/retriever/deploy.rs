//! Deploying and undeploying artifacts: a new revision is staged with its bytes, deployed on
//! its own or in a batch, its claims taken and the paths it had and has settled; undeploying
//! drops its claims.

use std::collections::{BTreeMap, BTreeSet};

use tracing::{info, warn};

use super::settle::SettleError;
use super::{Retriever, SourceError};
use crate::artifacts::{ArtifactMeta, Bundle};
use crate::store::{DeployedArtifact, DeployedFile};

/// An artifact's new revision, ready to deploy: its record (with what it claims) and the
/// bytes it brought, by path.
struct Staged {
    meta: ArtifactMeta,
    record: DeployedArtifact,
    bytes: BTreeMap<String, Vec<u8>>,
}

impl Staged {
    fn new(meta: ArtifactMeta, bundle: Bundle) -> Self {
        let mut files = Vec::with_capacity(bundle.files.len());
        let mut bytes = BTreeMap::new();
        for f in bundle.files {
            let path = f.path.to_string();
            files.push(DeployedFile {
                hash: blake3::hash(&f.data).to_hex().to_string(),
                keep: meta.keep.contains(&path),
                path: path.clone(),
            });
            bytes.insert(path, f.data);
        }
        let record = DeployedArtifact {
            id: meta.id.clone(),
            name: meta.name.clone(),
            version: meta.version.clone(),
            revision: meta.revision,
            labels: meta.labels.clone(),
            folder: meta.folder.clone(),
            paths: bytes.keys().cloned().collect(),
            deployed_ms: crate::now_ms(),
            files,
            warnings: meta.warnings.clone(),
        };
        Self {
            meta,
            record,
            bytes,
        }
    }
}

/// Every (folder, path) a deployed record has.
fn paths_of(d: &DeployedArtifact) -> impl Iterator<Item = (String, String)> + '_ {
    d.paths.iter().map(|p| (d.folder.clone(), p.clone()))
}

impl Retriever {
    /// Fetches and writes one artifact; failures specific to it are recorded, a source outage
    /// is returned.
    pub(super) async fn deploy(&mut self, meta: ArtifactMeta) -> Result<(), SourceError> {
        if self.refuse_folder(&meta) {
            return Ok(());
        }
        let bundle = match self.source.bundle(&meta).await {
            Ok(b) => b,
            Err(SourceError::Artifact { problem, .. }) => {
                self.fail(&meta.id, meta.revision, problem);
                return Ok(());
            }
            Err(e) => return Err(e),
        };
        let (id, revision) = (meta.id.clone(), meta.revision);
        match self.apply(vec![Staged::new(meta, bundle)]).await {
            Ok(()) => Ok(()),
            Err(SettleError::Source(e)) => Err(e),
            Err(SettleError::Engine(e)) => {
                self.fail(&id, revision, e.to_string());
                Ok(())
            }
        }
    }

    /// Deploys many artifacts with one bundle query and one batched write (the start-up path).
    /// If the batched write fails, each artifact is deployed on its own so one bad artifact
    /// cannot block the others.
    pub(super) async fn deploy_many(
        &mut self,
        metas: Vec<ArtifactMeta>,
    ) -> Result<(), SourceError> {
        let mut ours = Vec::with_capacity(metas.len());
        for meta in metas {
            if self.refuse_folder(&meta) {
                continue;
            }
            ours.push(meta);
        }
        let bundles = self.source.bundles(&ours).await?;
        let mut staged: Vec<Staged> = Vec::new();
        for (meta, bundle) in ours.into_iter().zip(bundles) {
            match bundle {
                Ok(b) => staged.push(Staged::new(meta, b)),
                Err(SourceError::Unavailable(e)) => return Err(SourceError::Unavailable(e)),
                Err(SourceError::Artifact { problem, .. }) => {
                    self.fail(&meta.id, meta.revision, problem);
                }
            }
        }
        if staged.is_empty() {
            return Ok(());
        }
        let metas: Vec<ArtifactMeta> = staged.iter().map(|s| s.meta.clone()).collect();
        match self.apply(staged).await {
            Ok(()) => Ok(()),
            Err(SettleError::Source(e)) => Err(e),
            Err(SettleError::Engine(e)) => {
                warn!(error = %e, count = metas.len(), "batched deploy failed; deploying one by one");
                for meta in metas {
                    self.deploy(meta).await?;
                }
                Ok(())
            }
        }
    }

    /// Drops the artifact's claims; its files go unless another deployed artifact claims
    /// them (then they hold what that one wants).
    pub(super) async fn undeploy(&mut self, id: &str) {
        let Some(d) = self.deployed.remove(id) else {
            return;
        };
        let paths: BTreeSet<(String, String)> = paths_of(&d).collect();
        match self.settle(paths, &BTreeMap::new()).await {
            Ok(()) => {
                if let Err(e) = self.store.remove_deployed(id).await {
                    warn!(artifact = %id, error = %e, "undeployed, but cannot record it in the index");
                }
                self.failures.remove(id);
                info!(artifact = %id, name = %d.name, folder = %d.folder, "artifact undeployed");
            }
            Err(e) => {
                warn!(artifact = %id, error = %e, "cannot undeploy artifact");
                self.last_error = Some(e.to_string());
                self.deployed.insert(id.to_owned(), d);
            }
        }
    }

    /// An artifact for a folder this node does not deploy into fails for good (until a new
    /// event).
    fn refuse_folder(&mut self, meta: &ArtifactMeta) -> bool {
        if self.folders.contains_key(meta.folder.as_str()) {
            return false;
        }
        self.fail(
            &meta.id,
            meta.revision,
            format!(
                "targets folder {:?}, but this node deploys into {:?} only",
                meta.folder,
                self.folders.keys().collect::<Vec<_>>()
            ),
        );
        if let Some(f) = self.failures.get_mut(&meta.id) {
            f.gave_up = true;
        }
        true
    }

    /// Takes the staged artifacts' new claims and brings the paths they had and have to what
    /// the deployed set wants; the claims are recorded once the disk has them, and dropped
    /// again if it cannot.
    async fn apply(&mut self, staged: Vec<Staged>) -> Result<(), SettleError> {
        let mut paths: BTreeSet<(String, String)> = BTreeSet::new();
        let mut in_hand: BTreeMap<(String, String), Vec<u8>> = BTreeMap::new();
        let mut before: Vec<(String, Option<DeployedArtifact>)> = Vec::new();
        let mut records = Vec::with_capacity(staged.len());
        for s in staged {
            let old = self.deployed.insert(s.record.id.clone(), s.record.clone());
            if let Some(old) = &old {
                paths.extend(paths_of(old));
            }
            paths.extend(paths_of(&s.record));
            for (path, data) in s.bytes {
                in_hand.insert((s.record.id.clone(), path), data);
            }
            before.push((s.record.id.clone(), old));
            records.push(s.record);
        }
        if let Err(e) = self.settle(paths, &in_hand).await {
            for (id, old) in before {
                match old {
                    Some(old) => self.deployed.insert(id, old),
                    None => self.deployed.remove(&id),
                };
            }
            return Err(e);
        }
        if let Err(e) = self.store.set_deployed(&records).await {
            warn!(count = records.len(), error = %e, "deployed, but cannot record it in the index");
        }
        for record in records {
            info!(artifact = %record.id, name = %record.name, revision = record.revision, folder = %record.folder, files = record.paths.len(), "artifact deployed");
            for warning in &record.warnings {
                warn!(artifact = %record.id, name = %record.name, warning = %warning, "deployed; the operator must provision this");
            }
            self.failures.remove(&record.id);
        }
        Ok(())
    }
}
