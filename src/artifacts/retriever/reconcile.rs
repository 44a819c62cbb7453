//! Reconciling against the source: what is deployed compared with what is current for this
//! node's labels (at start-up, after every reconnect, and periodically), and the deployed files
//! on disk checked against what the deployed artifacts want.

use std::collections::{BTreeMap, BTreeSet};

use tracing::warn;

use super::settle::SettleError;
use super::{Retriever, SourceError, Unavailable};
use crate::artifacts::ArtifactMeta;
use crate::artifacts::owners::Owners;

/// Artifacts fetched in one query and written in one batch during a reconcile.
const DEPLOY_BATCH: usize = 200;

impl Retriever {
    /// Compares deployed revisions with the source and fixes every difference. Returns how
    /// many artifacts failed.
    pub(super) async fn reconcile(&mut self) -> Result<usize, SourceError> {
        // An event log that went backwards means another (empty, or restored) database now
        // answers: its view would undeploy artifacts the gateway is serving. Keep them.
        let last = self.source.last_event_id().await?;
        if last < self.cursor {
            return Err(Unavailable::EventLogBackwards {
                from: self.cursor,
                to: last,
            }
            .into());
        }
        let current = self.source.current(&self.config.gateway_labels).await?;
        let wanted: BTreeSet<String> = current.iter().map(|m| m.id.clone()).collect();
        let todo: Vec<ArtifactMeta> = current
            .into_iter()
            .filter(|m| self.needs_deploy(m))
            .collect();
        for chunk in todo.chunks(DEPLOY_BATCH) {
            self.deploy_many(chunk.to_vec()).await?;
        }
        let stale: Vec<String> = self
            .deployed
            .keys()
            .filter(|id| !wanted.contains(*id))
            .cloned()
            .collect();
        for id in stale {
            self.undeploy(&id).await;
        }
        self.check_files().await?;
        Ok(self.failures.values().filter(|f| !f.gave_up).count())
    }

    pub(super) fn needs_deploy(&self, m: &ArtifactMeta) -> bool {
        if self.held_off.contains(&m.id) {
            return false;
        }
        if let Some(f) = self.failures.get(&m.id) {
            if f.gave_up && f.revision == m.revision {
                return false;
            }
        }
        self.deployed.get(&m.id).is_none_or(|d| {
            d.revision != m.revision || d.labels != m.labels || d.folder != m.folder
        })
    }

    /// Checks every deployed file on disk against what the deployed artifacts want, and
    /// restores what differs (a shared file deleted by hand, or by a peer that undeployed).
    async fn check_files(&mut self) -> Result<(), SourceError> {
        let paths: BTreeSet<(String, String)> = Owners::of(self.deployed.values())
            .paths()
            .map(|(f, p)| (f.to_owned(), p.to_owned()))
            .collect();
        match self.settle(paths, &BTreeMap::new()).await {
            Ok(()) => Ok(()),
            Err(SettleError::Source(e)) => Err(e),
            Err(SettleError::Engine(e)) => {
                warn!(error = %e, "cannot restore deployed files");
                self.last_error = Some(e.to_string());
                Ok(())
            }
        }
    }
}
