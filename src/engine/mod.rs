//! The folder engine: one task per folder that owns the folder's [`Replica`] and is the only
//! writer of its index and its files. Everything reaches it as a message (local changes from the
//! watcher, index batches from peer sessions, status and resume requests), so local scans and
//! remote applies never race each other.
//!
//! Flow: watcher -> `look` (stat + hash) -> model `observe_local` -> index commit -> subscribers
//! woken. Peer batch -> model `receive` -> re-check the disk -> fetch content -> batched apply
//! -> index commit with the peer cursor -> subscribers woken (relay).
//!
//! Blocking work (hashing, fsync, rename) runs under `block_in_place`: the daemon runs on the
//! multi-threaded runtime.
//!
//! One concern per file, each an `impl FolderEngine` block or the types it owns:
//! - `mod.rs`: the engine, its opening and initial scan, the run loop and message dispatch.
//! - `handle`: [`FolderHandle`], the messages it sends, the engine's errors, what a peer may fetch.
//! - `local`: local changes (watcher hints, rescans) observed and committed.
//! - `remote`: peer batches, chained (`chain`), staged (`stage`) and settled (`settle`).
//! - `plan`: PURE: a decided peer record and the local state give one disk step.
//! - `recover`: peer changes placed before a crash, adopted from the batch journal.
//! - `index`: an index that cannot be written (a full `state_dir`): no change taken until a
//!   reload from it goes through.
//! - `skip`: the strikes/skip/retry book of peer changes that keep failing.
//! - `conflict`: conflict copies and copies of held local files.
//! - `deploy`: artifacts deployed from the database.
//! - `feed`: what a subscriber is sent ([`Feed`]): the batching policy and the inline reads.
//! - `status`: [`FolderStatus`] and what is published after every message.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

mod conflict;
mod deploy;
mod feed;
mod handle;
mod index;
mod local;
mod plan;
mod recover;
mod remote;
mod skip;
mod status;
#[cfg(test)]
mod testing;

pub use feed::{Feed, FeedBatch, PendingBatch};
pub use handle::{
    DeployRequest, EngineError, FetchError, Fetcher, Fetching, FolderHandle, Inbox, Incoming,
    Inline, RemoteBatch, ServeError,
};
pub use skip::SKIP_AFTER_FAILURES;
pub use status::{ClockAhead, FolderStatus, SkippedStatus};

use handle::Msg;
use skip::SkipBook;

use crate::config::{Config, FolderConfig};
use crate::fs::apply;
use crate::fs::ignore::Ignore;
use crate::fs::own::OwnWrites;
use crate::fs::scan;
use crate::fs::watch::Change;
use crate::liveness::{Liveness, StopOnDrop};
use crate::model::{FolderId, Hash, NodeId, PeerName, RelPath, Replica};
use crate::store::{Cursor, SkipChanges, Skipped, StatKey, Store};

/// Names of the nodes seen so far (from peer batches), for naming conflict copies.
pub type NodeNames = Arc<Mutex<HashMap<NodeId, PeerName>>>;

/// Knobs of an engine that come from the config.
#[derive(Debug, Clone)]
pub struct EngineOptions {
    pub node: NodeId,
    pub names: NodeNames,
    pub node_name: PeerName,
    pub conflicts_dir: PathBuf,
    pub tombstone_ttl_ms: u64,
    /// First retry of a skipped peer change, ms; it doubles after each failed retry.
    pub skip_retry_ms: u64,
    /// Names of the configured peers: skipped changes of any other peer are dropped at start.
    pub peers: Vec<PeerName>,
    /// A peer's stamp further ahead of this node's clock than this does not move it, ms.
    pub max_clock_skew_ms: u64,
    /// Where the engines count applied batches and propagation latency.
    pub metrics: crate::metrics::Metrics,
}

pub struct FolderEngine {
    id: FolderId,
    epoch: u64,
    root: PathBuf,
    root_identity: Option<(u64, u64)>,
    opts: EngineOptions,
    ignore: Ignore,
    xml_gate: bool,
    store: Store,
    replica: Replica,
    stats: HashMap<RelPath, StatKey>,
    seq_tx: watch::Sender<u64>,
    status: Arc<Mutex<FolderStatus>>,
    /// Idle or busy, and progress, for the daemon's watchdog (see [`crate::liveness`]).
    live: Arc<Liveness>,
    paused: Option<String>,
    /// Why the index could not be written (see `index`): set, the folder takes no change
    /// until a reload from the index goes through.
    index_error: Option<String>,
    /// Failed reloads of that index, and when the next may run.
    index_reload: index::ReloadBackoff,
    /// The operator confirmed the folder's current state: the next scan may delete.
    confirmed: bool,
    held: BTreeMap<RelPath, String>,
    unreadable: BTreeMap<RelPath, String>,
    unstable: BTreeSet<RelPath>,
    symlinks_logged: BTreeSet<RelPath>,
    /// The latest failure and when it happened (wall time, ms): status shows its age, so an
    /// error of last week is not read as today's.
    last_error: Option<(String, u64)>,
    conflicts: u64,
    /// Streams whose batches are refused (see [`RemoteBatch::stream`]); the newest few.
    failed_streams: VecDeque<u64>,
    /// The files this engine creates, for its watcher (see [`OwnWrites`]).
    own: Arc<OwnWrites>,
    /// Peer changes failing in a row, and those skipped (see [`SkipBook`]).
    skips: SkipBook,
    /// The latest content source of each peer, for retrying its skipped changes.
    fetchers: HashMap<PeerName, Arc<dyn Fetcher>>,
    /// The latest peer record ahead of this node's clock (see [`ClockAhead`]).
    clock_ahead: Option<ClockAhead>,
    /// This folder's metrics (see [`crate::metrics`]).
    metrics: crate::metrics::FolderMetrics,
    /// Cursors of peer batches that changed nothing here, not written to the index yet (see
    /// [`LazyCursors`]).
    lazy_cursors: LazyCursors,
}

/// Peer cursors moved by batches that changed nothing here (every record already known, as
/// in a full mesh, where each change also comes relayed by every other peer): written to the
/// index at most every [`LAZY_CURSOR_FLUSH`], not in a commit of their own per batch. Losing
/// one (a crash) only makes the peer send records this node already has again. The folder's
/// handle reads them too, so a session that resubscribes starts from the newest.
pub(in crate::engine) type LazyCursors = Arc<Mutex<HashMap<PeerName, Cursor>>>;

/// How often the cursors of batches that changed nothing are written.
const LAZY_CURSOR_FLUSH: std::time::Duration = std::time::Duration::from_secs(1);

/// Messages queued to one engine before senders wait.
const ENGINE_QUEUE: usize = 64;

/// The folder's ignore rules, as its engine and its watcher apply them.
pub fn folder_ignore(folder: &FolderConfig) -> Result<Ignore, EngineError> {
    Ignore::new(&folder.ignore).map_err(|e| EngineError::Scan {
        folder: folder.id.clone(),
        source: scan::ScanError::Io {
            path: folder.path.clone(),
            source: std::io::Error::other(e.to_string()),
        },
    })
}

fn block<T>(f: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(f)
}

impl FolderEngine {
    /// Loads the folder's index and prepares the engine (no scan yet).
    pub async fn open(
        folder: &FolderConfig,
        store: Store,
        opts: EngineOptions,
    ) -> Result<(Self, FolderHandle, Inbox), EngineError> {
        Self::open_with(folder, store, opts, Arc::new(OwnWrites::default())).await
    }

    /// [`FolderEngine::open`] with the record of own writes that the folder's watcher was
    /// started with: the watch can then be set up while the index loads.
    pub async fn open_with(
        folder: &FolderConfig,
        store: Store,
        opts: EngineOptions,
        own: Arc<OwnWrites>,
    ) -> Result<(Self, FolderHandle, Inbox), EngineError> {
        let epoch = store.epoch(&folder.id, rand::random::<u64>() | 1).await?;
        let rows = store.load_index(&folder.id).await?;
        let mut stats = HashMap::with_capacity(rows.len());
        let mut records = Vec::with_capacity(rows.len());
        for (record, stat) in rows {
            if let Some(s) = stat {
                stats.insert(record.path.clone(), s);
            }
            records.push(record);
        }
        let replica = Replica::new(opts.node)
            .with_max_skew(opts.max_clock_skew_ms)
            .with_records(records, crate::now_ms());
        let (seq_tx, seq_rx) = watch::channel(replica.seq());
        let (tx, rx) = mpsc::channel(ENGINE_QUEUE);
        let (local_tx, local_rx) = mpsc::channel(ENGINE_QUEUE);
        let status = Arc::new(Mutex::new(FolderStatus::default()));
        let live = Arc::new(Liveness::default());
        let ignore = folder_ignore(folder)?;
        let conflicts = store
            .conflicts()
            .await?
            .iter()
            .filter(|c| c.folder == folder.id)
            .count() as u64;
        // A peer taken out of the config will never send its skipped changes again.
        let (skipped, gone): (Vec<Skipped>, Vec<Skipped>) = store
            .skipped(&folder.id)
            .await?
            .into_iter()
            .partition(|s| opts.peers.iter().any(|p| *p == s.peer));
        if !gone.is_empty() {
            info!(folder = %folder.id, count = gone.len(), "dropping skipped changes of peers no longer configured");
            let cleared = gone.into_iter().map(|s| (s.peer, s.record.path)).collect();
            let changes = SkipChanges {
                set: Vec::new(),
                cleared,
            };
            store.commit(&folder.id, &[], None, &changes).await?;
        }
        let metrics = opts.metrics.folder(&folder.id);
        let skips = SkipBook::new(opts.skip_retry_ms, skipped);
        let engine = Self {
            id: folder.id.clone(),
            epoch,
            root: folder.path.clone(),
            root_identity: scan::root_identity(&folder.path),
            opts,
            ignore,
            xml_gate: folder.xml_gate,
            store: store.clone(),
            replica,
            stats,
            seq_tx,
            status: status.clone(),
            live: live.clone(),
            paused: None,
            index_error: None,
            index_reload: Default::default(),
            confirmed: false,
            held: BTreeMap::new(),
            unreadable: BTreeMap::new(),
            unstable: BTreeSet::new(),
            symlinks_logged: BTreeSet::new(),
            last_error: None,
            conflicts,
            failed_streams: VecDeque::new(),
            own,
            skips,
            fetchers: HashMap::new(),
            metrics,
            clock_ahead: None,
            lazy_cursors: LazyCursors::default(),
        };
        engine.publish_status();
        let handle = FolderHandle {
            id: folder.id.clone(),
            root: folder.path.clone(),
            epoch,
            store,
            tx,
            local_tx,
            seq: seq_rx,
            status,
            live,
            ignore: Arc::new(folder_ignore(folder)?),
            lazy_cursors: engine.lazy_cursors.clone(),
        };
        let inbox = Inbox {
            msgs: rx,
            local: local_rx,
        };
        Ok((engine, handle, inbox))
    }

    /// Removes leftovers of a crash and brings the index up to date with the disk.
    pub async fn initial_scan(&mut self) -> Result<(), EngineError> {
        let removed = block(|| apply::remove_stale_temps(&self.root));
        if removed > 0 {
            info!(folder = %self.id, count = removed, "removed temp files left by an earlier crash");
        }
        self.adopt_placed_before_crash().await?;
        let result = self.on_local(Change::Rescan).await;
        // Status must show the scanned folder at once, not only after the first message.
        self.publish_status();
        result
    }

    /// Runs until cancelled. `rescan_every` is the backstop full scan.
    pub async fn run(
        mut self,
        mut inbox: Inbox,
        rescan_every: std::time::Duration,
        retry_every: std::time::Duration,
        cancel: CancellationToken,
    ) {
        let mut rescan = tokio::time::interval(rescan_every);
        rescan.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        rescan.tick().await;
        let mut retry = tokio::time::interval(retry_every);
        retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut flush = tokio::time::interval(LAZY_CURSOR_FLUSH);
        flush.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // However the task ends (return or panic), the daemon sees the engine stopped.
        let _stopped = StopOnDrop(self.live.clone());
        // Messages taken off the queue by a batch chain (see `remote_chain`), handled next,
        // in the order they came.
        let mut pending: VecDeque<Msg> = VecDeque::new();
        loop {
            if let Some(msg) = pending.pop_front() {
                pending.extend(self.handle(msg, &mut inbox).await);
                self.live.progress();
                self.publish_status();
                continue;
            }
            let skip_wait = self.next_retry_in(crate::now_ms());
            self.live.idle();
            tokio::select! {
                biased;
                _ = cancel.cancelled() => break,
                _ = flush.tick(), if self.has_lazy_cursors() => {
                    self.flush_lazy_cursors().await;
                    continue;
                }
                msg = inbox.recv() => {
                    let Some(msg) = msg else { break };
                    self.live.busy();
                    pending.extend(self.handle(msg, &mut inbox).await);
                }
                _ = rescan.tick() => {
                    self.live.busy();
                    if let Err(e) = self.on_local(Change::Rescan).await {
                        warn!(folder = %self.id, error = %e, "periodic rescan failed");
                        self.note_index_failure(&e);
                    }
                    self.purge_tombstones().await;
                }
                _ = tokio::time::sleep(skip_wait.unwrap_or_default()), if skip_wait.is_some() => {
                    self.live.busy();
                    if let Some(batch) = self.due_retry(crate::now_ms()) {
                        debug!(folder = %self.id, peer = %batch.peer, records = batch.records.len(), "retrying skipped changes");
                        // Nobody waits for the answer: the outcome lands in the skip list.
                        let (reply, _) = oneshot::channel();
                        pending.extend(self.remote_chain(batch, reply, &mut inbox).await);
                    }
                }
                _ = retry.tick(), if self.index_error.is_some() || !self.unstable.is_empty() || !self.held.is_empty() || self.paused.is_some() => {
                    self.live.busy();
                    if self.index_error.is_some() {
                        self.reload_index(crate::liveness::mono_ms(), retry_every).await;
                        self.live.progress();
                        self.publish_status();
                        continue;
                    }
                    // Files looked at again because they were changing: the watcher's marks
                    // first (see `sync_marks`), so a writer still at one is left alone. Held
                    // files are not shipped while they do not parse, and a rescan needs none.
                    if !self.unstable.is_empty() && self.paused.is_none() {
                        self.sync_marks();
                    }
                    let mut paths: Vec<RelPath> = std::mem::take(&mut self.unstable).into_iter().collect();
                    paths.extend(self.held.keys().cloned());
                    let change = if self.paused.is_some() { Change::Rescan } else { Change::Paths(paths) };
                    if let Err(e) = self.on_local(change).await {
                        debug!(folder = %self.id, error = %e, "retry look failed");
                    }
                }
            }
            self.live.progress();
            self.publish_status();
        }
        self.flush_lazy_cursors().await;
        debug!(folder = %self.id, "engine stopped");
    }

    /// Handles one message; returns those it took off the queue and left for the next turn.
    async fn handle(&mut self, msg: Msg, inbox: &mut Inbox) -> Vec<Msg> {
        match msg {
            Msg::Local(change) => {
                if let Err(e) = self.on_local(change).await {
                    warn!(folder = %self.id, error = %e, "local change not recorded");
                    self.note_error(&e);
                    self.note_index_failure(&e);
                }
            }
            Msg::Remote(batch, reply) => return self.remote_chain(batch, reply, inbox).await,
            Msg::Deploy(request, reply) => {
                let r = self.on_deploy(request).await;
                if let Err(e) = &r {
                    self.note_error(e);
                    self.note_index_failure(e);
                }
                let _ = reply.send(r);
            }
            Msg::Resume(reply) => {
                let text = self.resume().await;
                let _ = reply.send(text);
            }
        }
        Vec::new()
    }

    async fn resume(&mut self) -> String {
        match self.paused.take() {
            Some(reason) => {
                info!(folder = %self.id, reason = %reason, "operator confirmed the folder's state; resuming");
                self.confirmed = true;
                self.root_identity = scan::root_identity(&self.root);
                if let Err(e) = self.on_local(Change::Rescan).await {
                    return format!("folder {} resumed, but the rescan failed: {e}", self.id);
                }
                format!("folder {} resumed (was paused: {reason})", self.id)
            }
            None => format!("folder {} was not paused", self.id),
        }
    }

    /// Keeps `e` as the folder's last error, stamped now.
    fn note_error(&mut self, e: &EngineError) {
        self.last_error = Some((e.to_string(), crate::now_ms()));
    }

    fn pause(&mut self, reason: String) {
        if self.paused.as_deref() != Some(reason.as_str()) {
            warn!(folder = %self.id, reason = %reason, "pausing folder: no deletions are sent until the root is back or an operator runs `artisync resume`");
        }
        self.paused = Some(reason);
    }

    /// True when the root holds nothing that would be synced.
    fn root_is_empty(&self) -> bool {
        let Ok(entries) = std::fs::read_dir(&self.root) else {
            return false;
        };
        !entries.filter_map(Result::ok).any(|e| {
            e.file_name()
                .to_str()
                .and_then(|n| RelPath::new(n).ok())
                .is_none_or(|p| !self.ignore.is_ignored(&p))
        })
    }

    fn live_count(&self) -> u64 {
        self.replica.totals().live()
    }

    fn known(&self, path: &RelPath) -> Option<(StatKey, Hash)> {
        let rec = self.replica.get(path)?;
        if rec.deleted {
            return None;
        }
        Some((*self.stats.get(path)?, rec.hash?))
    }

    async fn purge_tombstones(&mut self) {
        let cutoff = crate::now_ms().saturating_sub(self.opts.tombstone_ttl_ms);
        let purged = self.replica.purge_tombstones(cutoff);
        if !purged.is_empty() {
            if let Err(e) = self.store.remove(&self.id, &purged).await {
                warn!(folder = %self.id, error = %e, "cannot purge tombstones");
            } else {
                info!(folder = %self.id, count = purged.len(), "purged old tombstones");
            }
        }
    }
}

/// Everything a running folder needs from the config, bundled for the daemon.
pub fn engine_options(
    config: &Config,
    node: NodeId,
    names: NodeNames,
    metrics: crate::metrics::Metrics,
) -> EngineOptions {
    EngineOptions {
        node,
        names,
        node_name: config.node.clone(),
        conflicts_dir: config.state_dir.join("conflicts"),
        tombstone_ttl_ms: config.tombstone_ttl().as_millis() as u64,
        skip_retry_ms: config.skip_retry_ms,
        peers: config.peers.iter().map(|p| p.name.clone()).collect(),
        max_clock_skew_ms: config.max_clock_skew_ms,
        metrics,
    }
}
