//! The retriever: deploys every current artifact of this node's gateway labels into its target
//! folders (`retriever.folder`, and with WSO2's tables each tenant's folder), follows publish/remove events, retries failures with capped exponential backoff, keeps what
//! it has while the source is down, and reconciles against the source after every reconnect
//! and periodically, so a lost or reordered event never leaves the node stale.
//!
//! The source is either the database itself ([`DbSource`]) or a hub agent that has the
//! database ([`super::hub::HubSource`]); the retriever does not know which.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::db::{ArtifactDb, DbError};
use super::owners::{Owners, PathConflict, Resolution, resolve};
use super::{ArtifactMeta, Bundle, Event};
use crate::config::RetrieverConfig;
use crate::engine::{DeployRequest, FolderHandle};
use crate::model::RelPath;
use crate::store::{DeployedArtifact, DeployedFile, Store};

/// Longest delay between two retries of a failed deployment.
pub const MAX_RETRY_DELAY: Duration = Duration::from_secs(3600);
/// Sync start-up: the wait before the second try of the failing artifacts, doubling after
/// (with the default 3 `startup_attempts`: 0.5 s, then 1 s).
pub const STARTUP_RETRY_BASE: Duration = Duration::from_millis(500);
/// Events re-read below the cursor, so an event whose id committed late is still seen.
const EVENT_LOOKBACK: i64 = 64;
const EVENT_BATCH: i64 = 500;
/// Artifacts fetched in one query and written in one batch during a reconcile.
const DEPLOY_BATCH: usize = 200;
/// Reconnect backoff while the source is down.
const RECONNECT_MIN: Duration = Duration::from_millis(500);
const RECONNECT_MAX: Duration = Duration::from_secs(30);

/// Delay before retry number `attempt` (1-based): `base`, doubling, never above one hour.
pub fn retry_delay(base: Duration, attempt: u32) -> Duration {
    let factor = 1u32
        .checked_shl(attempt.saturating_sub(1))
        .unwrap_or(u32::MAX);
    base.checked_mul(factor)
        .unwrap_or(MAX_RETRY_DELAY)
        .min(MAX_RETRY_DELAY)
}

/// The retry plan of one operation: `max_retries` retries after the first try, waiting
/// [`retry_delay`] before each.
#[derive(Debug, Clone)]
pub struct RetryPlan {
    base: Duration,
    max_retries: u32,
    retries: u32,
}

impl RetryPlan {
    pub fn new(base: Duration, max_retries: u32) -> Self {
        Self {
            base,
            max_retries,
            retries: 0,
        }
    }

    /// After a failed try: how long to wait before the next one, or `None` when retries ran out.
    pub fn next_delay(&mut self) -> Option<Duration> {
        if self.retries >= self.max_retries {
            return None;
        }
        self.retries += 1;
        Some(retry_delay(self.base, self.retries))
    }

    pub fn retries(&self) -> u32 {
        self.retries
    }
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum SourceError {
    /// The database (or hub) cannot be reached: retry everything later.
    #[error("artifact source unavailable: {0}")]
    Unavailable(#[from] Unavailable),
    /// One artifact cannot be used (corrupt bundle, bad path, ...): skip it, report it.
    #[error("artifact {id}: {problem}")]
    Artifact { id: String, problem: String },
}

/// Why a source cannot be reached (or trusted) right now. Sources are behind `Arc` so the
/// error stays `Clone`.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Unavailable {
    #[error(transparent)]
    Db(Arc<DbError>),
    #[error("WSO2 database ({backend}): {source}")]
    Wso2 {
        backend: &'static str,
        source: Arc<sqlx::Error>,
    },
    /// The hub's status text: all a gRPC status carries.
    #[error("hub: {0}")]
    Hub(String),
    #[error(
        "the artifact event log went back from id {from} to {to} (database replaced or restored?); keeping deployed artifacts; restart the agent to accept this database"
    )]
    EventLogBackwards { from: i64, to: i64 },
}

impl From<DbError> for SourceError {
    fn from(e: DbError) -> Self {
        match e {
            DbError::Artifact { id, problem } => SourceError::Artifact { id, problem },
            DbError::NotFound(id) => SourceError::Artifact {
                id,
                problem: "does not exist".into(),
            },
            other => Unavailable::Db(Arc::new(other)).into(),
        }
    }
}

/// Where artifacts come from.
#[tonic::async_trait]
pub trait Source: Send + Sync {
    fn describe(&self) -> String;
    async fn current(&self, labels: &[String]) -> Result<Vec<ArtifactMeta>, SourceError>;
    /// One artifact as a node with `labels` sees it (empty: every label). Its `labels` may
    /// still list others; the caller filters. With WSO2's tables the content (so revision and
    /// digest) depends on the labels, since WSO2 renders an API per gateway environment.
    async fn get(&self, id: &str, labels: &[String]) -> Result<Option<ArtifactMeta>, SourceError>;
    /// The files of `meta`'s revision, for `meta.labels`.
    async fn bundle(&self, meta: &ArtifactMeta) -> Result<Bundle, SourceError>;
    /// Several bundles at once (one result each, in order); an outage fails the whole call.
    async fn bundles(
        &self,
        metas: &[ArtifactMeta],
    ) -> Result<Vec<Result<Bundle, SourceError>>, SourceError> {
        let mut out = Vec::with_capacity(metas.len());
        for m in metas {
            match self.bundle(m).await {
                Err(SourceError::Unavailable(e)) => return Err(SourceError::Unavailable(e)),
                other => out.push(other),
            }
        }
        Ok(out)
    }
    async fn events_after(&self, after: i64, limit: i64) -> Result<Vec<Event>, SourceError>;
    async fn last_event_id(&self) -> Result<i64, SourceError>;
    /// Returns when new events may be there (a notification, or `max` elapsed).
    async fn wait(&self, max: Duration);
    /// Queries (or hub calls) issued so far, for status and benchmarks.
    fn queries(&self) -> u64 {
        0
    }
}

/// The database as a source. Connects lazily, so a database that is down at start-up is
/// retried like any other failure.
pub struct DbSource {
    url: String,
    queries: std::sync::atomic::AtomicU64,
    db: tokio::sync::Mutex<Option<ArtifactDb>>,
    listener: tokio::sync::Mutex<Option<sqlx::postgres::PgListener>>,
    poll: Duration,
}

impl DbSource {
    pub fn new(url: &str, poll: Duration) -> Self {
        Self {
            url: url.to_owned(),
            queries: std::sync::atomic::AtomicU64::new(0),
            db: tokio::sync::Mutex::new(None),
            listener: tokio::sync::Mutex::new(None),
            poll,
        }
    }

    /// A shared handle on the connected database (the hub serves from the same pool).
    /// Every call stands for one query issued with it.
    pub async fn db(&self) -> Result<ArtifactDb, SourceError> {
        self.queries
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut guard = self.db.lock().await;
        if let Some(db) = guard.as_ref() {
            return Ok(db.clone());
        }
        let db = ArtifactDb::connect_with(&self.url, Duration::from_secs(3)).await?;
        *guard = Some(db.clone());
        Ok(db)
    }
}

#[tonic::async_trait]
impl Source for DbSource {
    fn describe(&self) -> String {
        super::db::redact(&self.url)
    }

    fn queries(&self) -> u64 {
        self.queries.load(std::sync::atomic::Ordering::Relaxed)
    }

    async fn current(&self, labels: &[String]) -> Result<Vec<ArtifactMeta>, SourceError> {
        Ok(self.db().await?.current_for_labels(labels).await?)
    }

    async fn get(&self, id: &str, _labels: &[String]) -> Result<Option<ArtifactMeta>, SourceError> {
        // A revision is the same for every label here: the caller filters the labels.
        Ok(self.db().await?.get(id).await?)
    }

    async fn bundle(&self, meta: &ArtifactMeta) -> Result<Bundle, SourceError> {
        Ok(self.db().await?.bundle(meta).await?)
    }

    async fn bundles(
        &self,
        metas: &[ArtifactMeta],
    ) -> Result<Vec<Result<Bundle, SourceError>>, SourceError> {
        let results = self.db().await?.bundles(metas).await?;
        Ok(results
            .into_iter()
            .map(|r| r.map_err(SourceError::from))
            .collect())
    }

    async fn events_after(&self, after: i64, limit: i64) -> Result<Vec<Event>, SourceError> {
        Ok(self.db().await?.events_after(after, limit).await?)
    }

    async fn last_event_id(&self) -> Result<i64, SourceError> {
        Ok(self.db().await?.last_event_id().await?)
    }

    async fn wait(&self, max: Duration) {
        let is_pg = self.url.starts_with("postgres");
        if !is_pg {
            tokio::time::sleep(self.poll.min(max)).await;
            return;
        }
        // PostgreSQL: LISTEN wakes us at once; the poll interval stays as the safety net.
        let mut guard = self.listener.lock().await;
        if guard.is_none() {
            // Bounded: a server that is down must not hold up polling (the safety net).
            let connect = tokio::time::timeout(
                Duration::from_secs(3),
                sqlx::postgres::PgListener::connect(&self.url),
            );
            if let Ok(Ok(mut l)) = connect.await {
                if l.listen("artisync_artifacts").await.is_ok() {
                    *guard = Some(l);
                }
            }
        }
        match guard.as_mut() {
            Some(l) => match tokio::time::timeout(self.poll.min(max), l.recv()).await {
                Ok(Ok(_)) | Err(_) => {}
                Ok(Err(_)) => *guard = None,
            },
            None => tokio::time::sleep(self.poll.min(max)).await,
        }
    }
}

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

/// Why deployed files could not be brought to what the deployed artifacts want.
#[derive(Debug, thiserror::Error)]
enum SettleError {
    /// The source could not give the bytes of a file to restore.
    #[error(transparent)]
    Source(SourceError),
    /// The folder did not take the writes.
    #[error(transparent)]
    Engine(crate::engine::EngineError),
}

/// A deployment that failed, and when it is tried again.
#[derive(Debug, Clone, Serialize)]
pub struct Failure {
    pub id: String,
    pub revision: i64,
    pub attempts: u32,
    pub reason: String,
    /// Retries ran out: the node runs without it until a new event or `redeploy`.
    pub gave_up: bool,
    #[serde(skip)]
    next_at: Option<Instant>,
}

/// What `artisync status` shows about the retriever.
#[derive(Debug, Clone, Default, Serialize, serde::Deserialize)]
pub struct RetrieverStatus {
    pub mode: String,
    pub source: String,
    /// The default folder (WSO2: the super tenant's).
    pub folder: String,
    /// Tenant domain -> folder id (`[retriever.tenants]`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub tenants: BTreeMap<String, String>,
    pub labels: Vec<String>,
    pub startup_done: bool,
    pub source_available: bool,
    pub last_event_id: i64,
    /// Queries issued to the database (or calls to the hub) since start.
    pub source_queries: u64,
    pub deployed: Vec<DeployedArtifact>,
    pub failing: Vec<serde_json::Value>,
    pub last_error: Option<String>,
    /// Paths where deployed artifacts want different content, and which one the file holds.
    #[serde(default)]
    pub conflicts: Vec<PathConflict>,
}

/// Local admin actions (this node only). The reply is the text the admin prints.
pub enum Command {
    Redeploy(String, oneshot::Sender<Result<String, CommandError>>),
    Undeploy(String, oneshot::Sender<Result<String, CommandError>>),
}

/// Why a local admin action on one artifact did not do what was asked.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error("artifact {id} failed: {reason}")]
    Failed { id: String, reason: String },
    #[error("artifact {id} is not current for this node's labels")]
    NotCurrent { id: String },
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error("artifact {id} could not be undeployed (see log)")]
    NotUndeployed { id: String },
    #[error("artifact {id} is not deployed on this node")]
    NotDeployed { id: String },
    #[error("retriever has stopped")]
    Stopped,
}

/// Handle for the admin service.
#[derive(Clone)]
pub struct RetrieverHandle {
    tx: mpsc::Sender<Command>,
    status: Arc<Mutex<RetrieverStatus>>,
}

impl RetrieverHandle {
    pub fn status(&self) -> RetrieverStatus {
        self.status.lock().map(|s| s.clone()).unwrap_or_default()
    }

    pub async fn command(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<String, CommandError>>) -> Command,
    ) -> Result<String, CommandError> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(make(tx))
            .await
            .map_err(|_| CommandError::Stopped)?;
        rx.await.map_err(|_| CommandError::Stopped)?
    }
}

pub struct Retriever {
    config: RetrieverConfig,
    /// The target folders, by id: `retriever.folder` and each tenant's.
    folders: BTreeMap<String, FolderHandle>,
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
        folders: BTreeMap<String, FolderHandle>,
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

    async fn poll_events(&mut self) -> Result<(), SourceError> {
        let events = self
            .source
            .events_after((self.cursor - EVENT_LOOKBACK).max(0), EVENT_BATCH)
            .await?;
        if !self.available {
            info!("artifact source is back; reconciling");
            self.available = true;
            self.last_error = None;
            self.reconcile().await?;
        }
        let mine: HashSet<&String> = self.config.gateway_labels.iter().collect();
        let mut ids: Vec<String> = Vec::new();
        for e in events {
            if !self.seen.insert(e.id) {
                continue;
            }
            self.cursor = self.cursor.max(e.id);
            if mine.contains(&e.label) && !ids.contains(&e.artifact_id) {
                ids.push(e.artifact_id);
            }
        }
        let floor = self.cursor - EVENT_LOOKBACK;
        self.seen = self.seen.split_off(&floor);
        if ids.is_empty() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(self.config.event_waiting_time)).await;
        for id in ids {
            // A new event supersedes an operator's undeploy and a given-up retry.
            self.held_off.remove(&id);
            self.failures.remove(&id);
            self.sync_one(&id).await?;
        }
        Ok(())
    }

    /// Brings one artifact to its current state for this node's labels.
    async fn sync_one(&mut self, id: &str) -> Result<(), SourceError> {
        let meta = match self.source.get(id, &self.config.gateway_labels).await {
            Ok(m) => m,
            Err(SourceError::Artifact { problem, .. }) => {
                self.fail(id, 0, problem);
                return Ok(());
            }
            Err(e) => return Err(e),
        };
        let wanted = meta.filter(|m| !m.removed).map(|mut m| {
            m.labels.retain(|l| self.config.gateway_labels.contains(l));
            m
        });
        match wanted {
            Some(m) if !m.labels.is_empty() => {
                if self.needs_deploy(&m) {
                    self.deploy(m).await?;
                }
            }
            _ => {
                if self.deployed.contains_key(id) {
                    self.undeploy(id).await;
                }
            }
        }
        Ok(())
    }

    fn needs_deploy(&self, m: &ArtifactMeta) -> bool {
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

    /// Compares deployed revisions with the source and fixes every difference. Returns how
    /// many artifacts failed.
    async fn reconcile(&mut self) -> Result<usize, SourceError> {
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

    async fn retry_due(&mut self) {
        let now = Instant::now();
        let due: Vec<String> = self
            .failures
            .values()
            .filter(|f| !f.gave_up && f.next_at.is_some_and(|t| t <= now))
            .map(|f| f.id.clone())
            .collect();
        for id in due {
            if let Err(e) = self.sync_one(&id).await {
                self.available = false;
                self.last_error = Some(e.to_string());
                return;
            }
        }
    }

    fn fail(&mut self, id: &str, revision: i64, reason: String) {
        let max = self.config.max_retry_count;
        let base = self.retry_base();
        let f = self
            .failures
            .entry(id.to_owned())
            .or_insert_with(|| Failure {
                id: id.to_owned(),
                revision,
                attempts: 0,
                reason: String::new(),
                gave_up: false,
                next_at: None,
            });
        if f.revision != revision {
            f.attempts = 0;
            f.revision = revision;
        }
        f.attempts += 1;
        f.reason = reason;
        if f.attempts > max {
            f.gave_up = true;
            f.next_at = None;
            warn!(artifact = %id, revision, attempts = f.attempts, reason = %f.reason, "deployment retries ran out; running without this artifact");
        } else {
            let delay = retry_delay(base, f.attempts);
            f.next_at = Some(Instant::now() + delay);
            warn!(artifact = %id, revision, attempt = f.attempts, retry_in_ms = delay.as_millis() as u64, reason = %f.reason, "artifact not deployed");
        }
    }

    /// Deploys many artifacts with one bundle query and one batched write (the start-up path).
    /// If the batched write fails, each artifact is deployed on its own so one bad artifact
    /// cannot block the others.
    async fn deploy_many(&mut self, metas: Vec<ArtifactMeta>) -> Result<(), SourceError> {
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

    /// An artifact for a folder this node does not deploy into fails for good (until a new
    /// event).
    fn refuse_folder(&mut self, meta: &ArtifactMeta) -> bool {
        if self.folders.contains_key(&meta.folder) {
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

    /// Brings each of `paths` (folder, path) to what the deployed artifacts want (see
    /// [`super::owners`]): removed when none claims it, left alone when the disk already holds
    /// the winning bytes, written otherwise, with bytes `in_hand` (by artifact and path) or
    /// fetched again from the winner's current bundle. Conflicts found are kept for status.
    /// Paths in a folder this node no longer deploys into are left as they are.
    async fn settle(
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
            let Some(handle) = self.folders.get(&folder).cloned() else {
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

    /// Fetches and writes one artifact; failures specific to it are recorded, a source outage
    /// is returned.
    async fn deploy(&mut self, meta: ArtifactMeta) -> Result<(), SourceError> {
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

    /// Drops the artifact's claims; its files go unless another deployed artifact claims
    /// them (then they hold what that one wants).
    async fn undeploy(&mut self, id: &str) {
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

    async fn command(&mut self, cmd: Command) {
        match cmd {
            Command::Redeploy(id, reply) => {
                self.held_off.remove(&id);
                self.failures.remove(&id);
                if let Some(d) = self.deployed.get_mut(&id) {
                    d.revision = -1; // fetched again, and its files checked
                }
                let r = match self.sync_one(&id).await {
                    Ok(()) => match (self.deployed.get(&id), self.failures.get(&id)) {
                        (_, Some(f)) => Err(CommandError::Failed {
                            id: id.clone(),
                            reason: f.reason.clone(),
                        }),
                        (Some(d), None) => {
                            Ok(format!("artifact {id} deployed at revision {}", d.revision))
                        }
                        (None, None) => Err(CommandError::NotCurrent { id: id.clone() }),
                    },
                    Err(e) => Err(e.into()),
                };
                let _ = reply.send(r);
            }
            Command::Undeploy(id, reply) => {
                let r = if self.deployed.contains_key(&id) {
                    self.undeploy(&id).await;
                    if self.deployed.contains_key(&id) {
                        Err(CommandError::NotUndeployed { id: id.clone() })
                    } else {
                        self.held_off.insert(id.clone());
                        Ok(format!(
                            "artifact {id} undeployed on this node (until redeploy or a new publish)"
                        ))
                    }
                } else {
                    Err(CommandError::NotDeployed { id: id.clone() })
                };
                let _ = reply.send(r);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_delays_double_and_cap_at_one_hour() {
        let base = Duration::from_millis(15_000);
        let got: Vec<u64> = (1..=10).map(|a| retry_delay(base, a).as_secs()).collect();
        assert_eq!(got, vec![15, 30, 60, 120, 240, 480, 960, 1920, 3600, 3600]);
        assert_eq!(
            retry_delay(base, 200),
            MAX_RETRY_DELAY,
            "no overflow for huge attempt counts"
        );
        assert_eq!(
            retry_delay(Duration::from_millis(1), 1),
            Duration::from_millis(1)
        );
    }
}
