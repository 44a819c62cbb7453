//! The retriever: deploys every current artifact of this node's gateway labels into its target
//! folders (`retriever.folder`, and with WSO2's tables each tenant's folder), follows publish/remove events, retries failures with capped exponential backoff, keeps what
//! it has while the source is down, and reconciles against the source after every reconnect
//! and periodically, so a lost or reordered event never leaves the node stale.
//!
//! The source is either the database itself ([`DbSource`]) or a hub agent that has the
//! database ([`super::hub::HubSource`]); the retriever does not know which.
//!
//! This file holds the retriever's state, its start-up and its run loop; the rest is one file
//! per concern: `events.rs` (following the event log), `reconcile.rs` (comparing with the
//! source), `deploy.rs` (deploying and undeploying artifacts), `settle.rs` (bringing deployed
//! paths to what their owners want), `retry.rs` (failures and their backoff), `handle.rs`
//! (status, and the admin's commands), `source.rs` (the [`Source`] trait and [`DbSource`]).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::owners::PathConflict;
use crate::config::RetrieverConfig;
use crate::engine::FolderHandle;
use crate::model::FolderId;
use crate::store::{DeployedArtifact, Store};

mod deploy;
mod events;
mod handle;
mod reconcile;
mod retry;
mod settle;
mod source;

pub use handle::{Command, CommandError, Failure, RetrieverHandle, RetrieverStatus};
pub use retry::{MAX_RETRY_DELAY, RetryPlan, STARTUP_RETRY_BASE, retry_delay};
pub use source::{DbSource, Source, SourceError, Unavailable};

/// Reconnect backoff while the source is down.
const RECONNECT_MIN: Duration = Duration::from_millis(500);
const RECONNECT_MAX: Duration = Duration::from_secs(30);

pub struct Retriever {
    config: RetrieverConfig,
    /// The target folders, by id: `retriever.folder` and each tenant's.
    folders: BTreeMap<FolderId, FolderHandle>,
    store: Store,
    source: Arc<dyn Source>,
    deployed: BTreeMap<String, DeployedArtifact>,
    failures: BTreeMap<String, Failure>,
    /// Undeployed by an operator: not brought back by reconcile until redeploy or a new event.
    held_off: BTreeSet<String>,
    /// (folder, path)s where deployed artifacts disagree, as last settled.
    conflicts: BTreeMap<(String, String), PathConflict>,
    status: Arc<Mutex<RetrieverStatus>>,
    commands: mpsc::Receiver<Command>,
    cursor: i64,
    seen: BTreeSet<i64>,
    available: bool,
    startup_done: bool,
    last_error: Option<String>,
}

impl Retriever {
    /// `folders`: a handle on each of `config`'s target folders
    /// ([`RetrieverConfig::target_folders`]).
    pub async fn new(
        config: RetrieverConfig,
        folders: BTreeMap<FolderId, FolderHandle>,
        store: Store,
        source: Arc<dyn Source>,
    ) -> Result<(Self, RetrieverHandle), crate::store::StoreError> {
        let deployed = store
            .deployed()
            .await?
            .into_iter()
            .map(|mut d| {
                if d.files.is_empty() && !d.paths.is_empty() {
                    // Written before claims had hashes: redeployed once to learn them.
                    d.revision = -1;
                }
                (d.id.clone(), d)
            })
            .collect();
        let (tx, rx) = mpsc::channel(8);
        let status = Arc::new(Mutex::new(RetrieverStatus::default()));
        let r = Self {
            config,
            folders,
            store,
            source,
            deployed,
            failures: BTreeMap::new(),
            held_off: BTreeSet::new(),
            conflicts: BTreeMap::new(),
            status: status.clone(),
            commands: rx,
            cursor: 0,
            seen: BTreeSet::new(),
            available: false,
            startup_done: false,
            last_error: None,
        };
        r.publish_status();
        Ok((r, RetrieverHandle { tx, status }))
    }

    fn publish_status(&self) {
        let s = RetrieverStatus {
            mode: self.config.data_retrieval_mode.as_str().to_owned(),
            source: self.source.describe(),
            folder: self.config.folder.clone(),
            tenants: self.config.tenants.clone(),
            labels: self.config.gateway_labels.clone(),
            startup_done: self.startup_done,
            source_available: self.available,
            last_event_id: self.cursor,
            source_queries: self.source.queries(),
            deployed: self.deployed.values().cloned().collect(),
            failing: self
                .failures
                .values()
                .filter_map(|f| serde_json::to_value(f).ok())
                .collect(),
            last_error: self.last_error.clone(),
            conflicts: self.conflicts.values().cloned().collect(),
        };
        if let Ok(mut g) = self.status.lock() {
            *g = s;
        }
    }

    fn retry_base(&self) -> Duration {
        Duration::from_millis(self.config.deployment_retry_duration)
    }

    /// Start-up deploy, then follow events until cancelled. `ready` turns true when the
    /// start-up deploy finished: every artifact that can deploy has, and (sync mode) each
    /// failing one has had its `startup_attempts` (0.5 s, doubling, between passes; about
    /// 1.5 s with the default 3), or the source stayed unreachable through the normal retries.
    /// Failing artifacts stay listed and keep retrying in the background with the normal
    /// backoff, as WSO2's gateway skips a failing API at start-up.
    pub async fn run(mut self, ready: watch::Sender<bool>, cancel: CancellationToken) {
        info!(source = %self.source.describe(), labels = ?self.config.gateway_labels, mode = %self.config.data_retrieval_mode, "artifact retriever starting");
        let mut plan = RetryPlan::new(self.retry_base(), self.config.max_retry_count);
        let mut passes_with_failures: u32 = 0;
        loop {
            let outcome = self.startup_pass().await;
            self.publish_status();
            let delay = match outcome {
                Ok(0) => break,
                Ok(failed) => {
                    self.last_error = Some(format!("{failed} artifacts failed to deploy"));
                    passes_with_failures += 1;
                    if passes_with_failures >= self.config.startup_attempts {
                        warn!(
                            failed,
                            attempts = passes_with_failures,
                            "start-up attempts used; serving without the failing artifacts, which keep retrying"
                        );
                        break;
                    }
                    if !self.config.sync_start() {
                        // Async: nothing waits for the start-up deploy. Each failed artifact
                        // keeps its own retry plan (retried by `follow`); retrying the whole
                        // pass here would hold up every other artifact's events meanwhile.
                        info!(
                            failed,
                            "start-up retrieval done; failed artifacts are retried on their own"
                        );
                        break;
                    }
                    retry_delay(STARTUP_RETRY_BASE, passes_with_failures)
                }
                Err(e) => {
                    warn!(error = %e, "start-up retrieval failed");
                    self.last_error = Some(e.to_string());
                    let Some(delay) = plan.next_delay() else {
                        warn!(
                            retries = plan.retries(),
                            "start-up retrieval retries ran out; running with what is deployed"
                        );
                        for f in self.failures.values_mut() {
                            f.gave_up = true;
                        }
                        break;
                    };
                    delay
                }
            };
            info!(
                retry = plan.retries() + passes_with_failures,
                delay_ms = delay.as_millis() as u64,
                "retrying start-up retrieval"
            );
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(delay) => {}
            }
        }
        self.startup_done = true;
        self.publish_status();
        let _ = ready.send(true);
        info!(
            deployed = self.deployed.len(),
            failing = self.failures.len(),
            "start-up retrieval done"
        );
        self.follow(cancel).await;
    }

    /// Takes the event cursor, then deploys everything current. Returns how many failed.
    async fn startup_pass(&mut self) -> Result<usize, SourceError> {
        if !self.available {
            self.cursor = self.source.last_event_id().await?;
            self.available = true;
        }
        self.reconcile().await
    }

    async fn follow(mut self, cancel: CancellationToken) {
        let reconcile_every = Duration::from_secs(self.config.reconcile_interval.max(1));
        let mut next_reconcile = Instant::now() + reconcile_every;
        let mut reconnect = RECONNECT_MIN;
        loop {
            let next_retry = self
                .failures
                .values()
                .filter(|f| !f.gave_up)
                .filter_map(|f| f.next_at)
                .min()
                .unwrap_or(next_reconcile);
            let wake = next_retry.min(next_reconcile);
            tokio::select! {
                _ = cancel.cancelled() => break,
                cmd = self.commands.recv() => {
                    let Some(cmd) = cmd else { break };
                    self.command(cmd).await;
                }
                _ = self.source.wait(Duration::from_secs(1)) => {
                    match self.poll_events().await {
                        Ok(()) => {
                            reconnect = RECONNECT_MIN;
                        }
                        Err(e) => {
                            if self.available {
                                warn!(error = %e, "artifact source is down; keeping deployed artifacts and retrying");
                            }
                            self.available = false;
                            self.last_error = Some(e.to_string());
                            self.publish_status();
                            tokio::select! {
                                _ = cancel.cancelled() => break,
                                _ = tokio::time::sleep(reconnect) => {}
                            }
                            reconnect = (reconnect * 2).min(RECONNECT_MAX);
                        }
                    }
                }
                _ = tokio::time::sleep_until(wake) => {
                    if Instant::now() >= next_reconcile {
                        next_reconcile = Instant::now() + reconcile_every;
                        if let Err(e) = self.reconcile().await {
                            self.available = false;
                            self.last_error = Some(e.to_string());
                        }
                    } else {
                        self.retry_due().await;
                    }
                }
            }
            self.publish_status();
        }
    }
}
