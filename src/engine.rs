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

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde::Serialize;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::config::{Config, FolderConfig};
use crate::fs::apply::{self, Content, Op};
use crate::fs::ignore::Ignore;
use crate::fs::own::OwnWrites;
use crate::fs::scan::{self, Look};
use crate::fs::watch::Change;
use crate::fs::xml;
use crate::model::{Decision, FileRecord, Hash, Hlc, Kind, NodeId, RelPath, Replica};
use crate::store::{ConflictEntry, Cursor, Origin, StatKey, Store, StoreError, StoredRecord};

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("folder {folder} is paused: {reason}")]
    Paused { folder: String, reason: String },
    #[error(
        "folder {folder}: {failed} of the peer's changes could not be applied yet (first: {path}: {problem})"
    )]
    ApplyFailed {
        folder: String,
        failed: usize,
        path: String,
        problem: String,
    },
    #[error("folder {folder}: {source}")]
    Scan {
        folder: String,
        source: scan::ScanError,
    },
    #[error("folder engine {0} has stopped")]
    Stopped(String),
    #[error(
        "folder {folder}: an earlier batch from peer {peer} on this stream failed; resubscribing"
    )]
    StreamFailed { folder: String, peer: String },
}

/// Fetches the content of a file from the peer that announced it, into a verified temp file.
pub trait Fetcher: Send + Sync {
    fn fetch<'a>(
        &'a self,
        folder: &'a str,
        path: &'a RelPath,
        hash: Hash,
        dir: &'a Path,
        mode: u32,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<PathBuf, String>> + Send + 'a>>;
}

/// One record from a peer, with its content when it travelled inline.
#[derive(Debug, Clone)]
pub struct Incoming {
    pub record: FileRecord,
    pub inline: Option<Inline>,
}

/// File content that travelled with its record and was checked against the record's BLAKE3
/// hash at the network edge (on the session's thread, while the engine applies the batch
/// before): holding one proves the check was made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inline {
    bytes: Vec<u8>,
    hash: Hash,
}

impl Inline {
    /// The bytes, when they hash to `hash`.
    pub fn verified(bytes: Vec<u8>, hash: &Hash) -> Option<Self> {
        (blake3::hash(&bytes).as_bytes() == hash).then_some(Self { bytes, hash: *hash })
    }

    /// The hash the bytes were checked against.
    pub fn hash(&self) -> &Hash {
        &self.hash
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }

    pub fn into_bytes(self) -> Vec<u8> {
        self.bytes
    }
}

/// A batch of a peer's index.
pub struct RemoteBatch {
    pub peer: String,
    /// The subscription stream the batch came on. Once one of its batches fails, later ones
    /// from the same stream are refused: they would move the peer's cursor past the failure.
    pub stream: u64,
    pub epoch: u64,
    pub up_to_seq: u64,
    pub records: Vec<Incoming>,
    pub fetcher: Arc<dyn Fetcher>,
}

/// The engine's message queue, handed from [`FolderEngine::open`] to [`FolderEngine::run`].
pub struct Inbox(mpsc::Receiver<Msg>);

enum Msg {
    Local(Change),
    Deploy(DeployRequest, oneshot::Sender<Result<(), EngineError>>),
    Remote(RemoteBatch, oneshot::Sender<Result<u64, EngineError>>),
    Resume(oneshot::Sender<String>),
}

/// Files the artifact retriever wants in the folder (and ones it wants gone). They are written
/// with the same safe apply as peer changes and then recorded as local changes, so the mesh
/// spreads them like any edit (and identical deployments on two nodes merge without conflict).
#[derive(Debug, Default)]
pub struct DeployRequest {
    pub writes: Vec<(RelPath, Vec<u8>)>,
    pub removes: Vec<RelPath>,
}

/// Live state of a folder, as `artisync status` shows it.
#[derive(Debug, Clone, Default, Serialize, serde::Deserialize)]
pub struct FolderStatus {
    pub id: String,
    pub path: String,
    pub files: u64,
    pub dirs: u64,
    pub bytes: u64,
    pub tombstones: u64,
    pub seq: u64,
    pub epoch: u64,
    /// Why the folder is paused (mass-delete guard), if it is.
    pub paused: Option<String>,
    /// Files held back by the validation gate, with the reason.
    pub held: BTreeMap<String, String>,
    /// Local paths that could not be read on the last look.
    pub unreadable: BTreeMap<String, String>,
    pub last_error: Option<String>,
    pub conflicts: u64,
}

/// Cheap, cloneable access to a running folder engine.
#[derive(Clone)]
pub struct FolderHandle {
    pub id: String,
    pub root: PathBuf,
    pub epoch: u64,
    pub store: Store,
    tx: mpsc::Sender<Msg>,
    seq: watch::Receiver<u64>,
    status: Arc<Mutex<FolderStatus>>,
}

impl FolderHandle {
    /// Sends local changes (from the watcher or a timer).
    pub async fn local(&self, change: Change) -> Result<(), EngineError> {
        self.tx
            .send(Msg::Local(change))
            .await
            .map_err(|_| EngineError::Stopped(self.id.clone()))
    }

    /// Applies a peer's batch; returns the peer sequence now applied.
    pub async fn remote(&self, batch: RemoteBatch) -> Result<u64, EngineError> {
        self.queue_remote(batch).await?.await
    }

    /// Queues a peer's batch and returns at once with a future of its result, so the session
    /// can receive and check the next batch while the engine applies this one. Batches of one
    /// stream are applied in the order queued.
    pub async fn queue_remote(
        &self,
        batch: RemoteBatch,
    ) -> Result<impl std::future::Future<Output = Result<u64, EngineError>> + use<>, EngineError>
    {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Msg::Remote(batch, tx))
            .await
            .map_err(|_| EngineError::Stopped(self.id.clone()))?;
        let id = self.id.clone();
        Ok(async move { rx.await.map_err(|_| EngineError::Stopped(id))? })
    }

    /// Writes and removes artifact files (see [`DeployRequest`]).
    pub async fn deploy(&self, request: DeployRequest) -> Result<(), EngineError> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Msg::Deploy(request, tx))
            .await
            .map_err(|_| EngineError::Stopped(self.id.clone()))?;
        rx.await
            .map_err(|_| EngineError::Stopped(self.id.clone()))?
    }

    /// Operator confirmation for a paused folder.
    pub async fn resume(&self) -> Result<String, EngineError> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Msg::Resume(tx))
            .await
            .map_err(|_| EngineError::Stopped(self.id.clone()))?;
        rx.await.map_err(|_| EngineError::Stopped(self.id.clone()))
    }

    /// A receiver that changes whenever the folder's index sequence grows.
    pub fn subscribe_seq(&self) -> watch::Receiver<u64> {
        self.seq.clone()
    }

    pub fn status(&self) -> FolderStatus {
        self.status.lock().map(|s| s.clone()).unwrap_or_default()
    }
}

/// Names of the nodes seen so far (from peer batches), for naming conflict copies.
pub type NodeNames = Arc<Mutex<HashMap<NodeId, String>>>;

/// Knobs of an engine that come from the config.
#[derive(Debug, Clone)]
pub struct EngineOptions {
    pub node: NodeId,
    pub names: NodeNames,
    pub node_name: String,
    pub conflicts_dir: PathBuf,
    pub tombstone_ttl_ms: u64,
}

pub struct FolderEngine {
    id: String,
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
    paused: Option<String>,
    /// The operator confirmed the folder's current state: the next scan may delete.
    confirmed: bool,
    held: BTreeMap<RelPath, String>,
    unreadable: BTreeMap<RelPath, String>,
    unstable: BTreeSet<RelPath>,
    symlinks_logged: BTreeSet<RelPath>,
    last_error: Option<String>,
    conflicts: u64,
    /// Streams whose batches are refused (see [`RemoteBatch::stream`]); the newest few.
    failed_streams: VecDeque<u64>,
    /// The files this engine creates, for its watcher (see [`OwnWrites`]).
    own: Arc<OwnWrites>,
}

/// The failures of one batch: how many, and the one with the lowest peer sequence (the
/// peer's cursor stops just before it).
#[derive(Debug, Default)]
struct Failures {
    first: Option<(u64, String, String)>,
    count: usize,
}

impl Failures {
    fn note(&mut self, seq: u64, path: &RelPath, problem: String) {
        self.count += 1;
        if self.first.as_ref().is_none_or(|(s, _, _)| seq < *s) {
            self.first = Some((seq, path.to_string(), problem));
        }
    }
}

/// A peer batch decided and staged, waiting for its durability and placement.
struct PreparedRemote {
    peer: String,
    stream: u64,
    epoch: u64,
    up_to_seq: u64,
    /// Index-only changes (merged versions), for the replica and the index.
    stores: Vec<FileRecord>,
    /// (peer seq, record) of each disk op, in op order.
    op_meta: Vec<(u64, FileRecord)>,
    /// Records whose disk already matches.
    no_op: Vec<FileRecord>,
    fails: Failures,
    staged: Option<apply::StagedBatch>,
    /// Every path of the batch (see `remote_chain`).
    paths: HashSet<RelPath>,
    /// Paths decided to take the peer's record unchanged, with its version: committed as it
    /// is, such a record gets the batch's origin, so it is not sent back to that peer.
    as_sent: HashMap<RelPath, crate::model::VersionVector>,
    /// Some disk op removes a file or directory.
    removes: bool,
}

/// How a batch's session is answered: the peer sequence applied up to.
type Reply = oneshot::Sender<Result<u64, EngineError>>;

/// A batch on disk and committed to the replica, waiting for its index commit.
struct Settled {
    peer: String,
    stream: u64,
    commits: Vec<StoredRecord>,
    /// The peer's new cursor; `None` when the stream failed meanwhile.
    cursor: Option<Cursor>,
    applied: usize,
    /// New files that met a local file at their path (looked at after the commit).
    appeared: BTreeSet<RelPath>,
    outcome: Result<u64, EngineError>,
}

/// A prepared batch being finished on a blocking thread.
struct InFlight {
    prepared: PreparedRemote,
    finishing: tokio::task::JoinHandle<Vec<apply::OpResult>>,
    reply: oneshot::Sender<Result<u64, EngineError>>,
}

/// How many failed streams an engine remembers. A session resubscribes on a new stream id
/// right after a failure, so only streams with batches still queued matter.
const FAILED_STREAMS_KEPT: usize = 16;

/// Large contents of one batch fetched from the peer at the same time.
const FETCHES_AT_ONCE: usize = 4;

/// Messages queued to one engine before senders wait.
const ENGINE_QUEUE: usize = 64;

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
        let epoch = store.epoch(&folder.id, rand::random::<u64>() | 1).await?;
        let rows = store.load_folder(&folder.id).await?;
        let mut stats = HashMap::with_capacity(rows.len());
        let mut records = Vec::with_capacity(rows.len());
        for StoredRecord { record, stat, .. } in rows {
            if let Some(s) = stat {
                stats.insert(record.path.clone(), s);
            }
            records.push(record);
        }
        let replica = Replica::from_records(opts.node, records);
        let (seq_tx, seq_rx) = watch::channel(replica.seq());
        let (tx, rx) = mpsc::channel(ENGINE_QUEUE);
        let status = Arc::new(Mutex::new(FolderStatus::default()));
        let ignore = Ignore::new(&folder.ignore).map_err(|e| EngineError::Scan {
            folder: folder.id.clone(),
            source: scan::ScanError::Io {
                path: folder.path.clone(),
                source: std::io::Error::other(e.to_string()),
            },
        })?;
        let conflicts = store
            .conflicts()
            .await?
            .iter()
            .filter(|c| c.folder == folder.id)
            .count() as u64;
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
            paused: None,
            confirmed: false,
            held: BTreeMap::new(),
            unreadable: BTreeMap::new(),
            unstable: BTreeSet::new(),
            symlinks_logged: BTreeSet::new(),
            last_error: None,
            conflicts,
            failed_streams: VecDeque::new(),
            own: Arc::new(OwnWrites::default()),
        };
        engine.publish_status();
        let handle = FolderHandle {
            id: folder.id.clone(),
            root: folder.path.clone(),
            epoch,
            store,
            tx,
            seq: seq_rx,
            status,
        };
        Ok((engine, handle, Inbox(rx)))
    }

    pub fn ignore(&self) -> &Ignore {
        &self.ignore
    }

    /// What the engine writes itself; the folder's watcher uses it to drop the echo.
    pub fn own_writes(&self) -> Arc<OwnWrites> {
        self.own.clone()
    }

    /// Removes leftovers of a crash and brings the index up to date with the disk.
    pub async fn initial_scan(&mut self) -> Result<(), EngineError> {
        let removed = block(|| apply::remove_stale_temps(&self.root));
        if removed > 0 {
            info!(folder = %self.id, count = removed, "removed temp files left by an earlier crash");
        }
        let result = self.on_local(Change::Rescan).await;
        // Status must show the scanned folder at once, not only after the first message.
        self.publish_status();
        result
    }

    /// Runs until cancelled. `rescan_every` is the backstop full scan.
    pub async fn run(
        mut self,
        Inbox(mut rx): Inbox,
        rescan_every: std::time::Duration,
        retry_every: std::time::Duration,
        cancel: CancellationToken,
    ) {
        let mut rescan = tokio::time::interval(rescan_every);
        rescan.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        rescan.tick().await;
        let mut retry = tokio::time::interval(retry_every);
        retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // A message taken off the queue by a batch chain (see `remote_chain`), handled next.
        let mut pending: Option<Msg> = None;
        loop {
            if let Some(msg) = pending.take() {
                pending = self.handle(msg, &mut rx).await;
                self.publish_status();
                continue;
            }
            tokio::select! {
                biased;
                _ = cancel.cancelled() => break,
                msg = rx.recv() => {
                    let Some(msg) = msg else { break };
                    pending = self.handle(msg, &mut rx).await;
                }
                _ = rescan.tick() => {
                    if let Err(e) = self.on_local(Change::Rescan).await {
                        warn!(folder = %self.id, error = %e, "periodic rescan failed");
                    }
                    self.purge_tombstones().await;
                }
                _ = retry.tick(), if !self.unstable.is_empty() || !self.held.is_empty() || self.paused.is_some() => {
                    let mut paths: Vec<RelPath> = std::mem::take(&mut self.unstable).into_iter().collect();
                    paths.extend(self.held.keys().cloned());
                    let change = if self.paused.is_some() { Change::Rescan } else { Change::Paths(paths) };
                    if let Err(e) = self.on_local(change).await {
                        debug!(folder = %self.id, error = %e, "retry look failed");
                    }
                }
            }
            self.publish_status();
        }
        debug!(folder = %self.id, "engine stopped");
    }

    /// Handles one message; returns one it took off the queue and left for the next turn.
    async fn handle(&mut self, msg: Msg, rx: &mut mpsc::Receiver<Msg>) -> Option<Msg> {
        match msg {
            Msg::Local(change) => {
                if let Err(e) = self.on_local(change).await {
                    warn!(folder = %self.id, error = %e, "local change not recorded");
                    self.last_error = Some(e.to_string());
                }
            }
            Msg::Remote(batch, reply) => return self.remote_chain(batch, reply, rx).await,
            Msg::Deploy(request, reply) => {
                let r = self.on_deploy(request).await;
                if let Err(e) = &r {
                    self.last_error = Some(e.to_string());
                }
                let _ = reply.send(r);
            }
            Msg::Resume(reply) => {
                let text = self.resume().await;
                let _ = reply.send(text);
            }
        }
        None
    }

    fn publish_status(&self) {
        let mut s = FolderStatus {
            id: self.id.clone(),
            path: self.root.display().to_string(),
            seq: self.replica.seq(),
            epoch: self.epoch,
            paused: self.paused.clone(),
            held: self
                .held
                .iter()
                .map(|(k, v)| (k.to_string(), v.clone()))
                .collect(),
            unreadable: self
                .unreadable
                .iter()
                .map(|(k, v)| (k.to_string(), v.clone()))
                .collect(),
            last_error: self.last_error.clone(),
            conflicts: self.conflicts,
            ..Default::default()
        };
        let totals = self.replica.totals();
        s.files = totals.files;
        s.dirs = totals.dirs;
        s.bytes = totals.bytes;
        s.tombstones = totals.tombstones;
        if let Ok(mut guard) = self.status.lock() {
            *guard = s;
        }
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

    /// Looks at local paths (or the whole folder) and records what changed.
    async fn on_local(&mut self, change: Change) -> Result<(), EngineError> {
        // Mass-delete guard, part 1: the root must be there and be the same directory.
        let identity = block(|| scan::root_identity(&self.root));
        match identity {
            None => {
                self.pause(format!(
                    "folder root {} is missing or not a directory",
                    self.root.display()
                ));
                return Ok(());
            }
            Some(id) if self.root_identity.is_some_and(|old| old != id) && !self.confirmed => {
                // Another directory or mount stands at the root: stay paused until the
                // original is back or an operator confirms.
                self.pause(format!(
                    "folder root {} was replaced (another directory or mount)",
                    self.root.display()
                ));
                return Ok(());
            }
            Some(_) => {}
        }
        // Mass-delete guard, part 2: an empty root while the index has content (an unmounted
        // disk, `rm -rf root/*`) pauses the folder instead of deleting on every node.
        if self.live_count() > 0 && !self.confirmed && block(|| self.root_is_empty()) {
            self.pause(format!(
                "folder root {} is empty but the index has {} entries (unmounted disk?)",
                self.root.display(),
                self.live_count()
            ));
            return Ok(());
        }
        let full = matches!(change, Change::Rescan) || self.paused.is_some();
        let mut paths: BTreeSet<RelPath> = BTreeSet::new();
        if full {
            let walk = block(|| scan::walk(&self.root, &self.ignore)).map_err(|source| {
                EngineError::Scan {
                    folder: self.id.clone(),
                    source,
                }
            })?;
            self.log_walk_problems(&walk);
            if self.paused.is_some() {
                info!(folder = %self.id, "folder root is back with content; resuming");
                self.paused = None;
            }
            self.root_identity = identity;
            paths.extend(walk.paths);
            paths.extend(
                self.replica
                    .records()
                    .filter(|r| !r.deleted)
                    .map(|r| r.path.clone()),
            );
        } else if let Change::Paths(list) = change {
            for p in list {
                self.expand(&p, &mut paths);
            }
        }
        self.confirmed = false;
        self.observe(paths).await
    }

    /// A changed directory may hide changes below it (a directory moved in or out, or created
    /// before its watch existed): look at its whole subtree.
    ///
    /// Parents the index has no live record of are looked at too (their own events may still
    /// wait out the quiet period): records then go out parents-first, so a peer never has to
    /// create a directory its index does not know, which it would record as its own change.
    fn expand(&self, path: &RelPath, out: &mut BTreeSet<RelPath>) {
        let mut up = path.parent();
        while let Some(parent) = up {
            if self.replica.get(&parent).is_some_and(|r| !r.deleted) {
                break;
            }
            up = parent.parent();
            out.insert(parent);
        }
        out.insert(path.clone());
        let on_disk = self.root.join(path.as_str());
        let is_dir = std::fs::symlink_metadata(&on_disk)
            .map(|m| m.is_dir())
            .unwrap_or(false);
        if is_dir {
            if let Ok(walk) = scan::walk(&on_disk, &self.ignore) {
                for sub in walk.paths {
                    if let Ok(p) = RelPath::new(&format!("{path}/{sub}")) {
                        out.insert(p);
                    }
                }
            }
        }
        // Whatever the index has below it, too (a directory that went away).
        for r in self.replica.under(path) {
            if !r.deleted {
                out.insert(r.path.clone());
            }
        }
    }

    fn log_walk_problems(&mut self, walk: &scan::Walk) {
        for s in &walk.symlinks {
            if self.symlinks_logged.insert(s.clone()) {
                info!(folder = %self.id, path = %s, "skipping symlink (symlinks are never synced)");
            }
        }
        for b in &walk.bad_names {
            warn!(folder = %self.id, path = %b.display(), "skipping a name that is not valid UTF-8 or not a valid path");
        }
        for e in &walk.errors {
            warn!(folder = %self.id, error = %e, "cannot read part of the folder");
        }
    }

    async fn observe(&mut self, paths: BTreeSet<RelPath>) -> Result<(), EngineError> {
        let now = crate::now_ms();
        let mut commits: Vec<StoredRecord> = Vec::new();
        let mut stat_updates: Vec<(RelPath, StatKey)> = Vec::new();
        let looks: Vec<(RelPath, Result<Look, scan::ScanError>)> = block(|| {
            let mut parents = scan::ParentCheck::default();
            paths
                .into_iter()
                .filter(|p| !self.ignore.is_ignored(p))
                .map(|p| {
                    let known = self.known(&p);
                    let look = scan::look_checked(&self.root, &p, known, &mut parents);
                    (p, look)
                })
                .collect()
        });
        for (path, look) in looks {
            let look = match look {
                Ok(l) => {
                    self.unreadable.remove(&path);
                    l
                }
                Err(e) => {
                    warn!(folder = %self.id, path = %path, error = %e, "cannot read file");
                    self.unreadable.insert(path, e.to_string());
                    continue;
                }
            };
            let observed = match look {
                Look::Unstable => {
                    self.unstable.insert(path);
                    continue;
                }
                Look::Symlink => {
                    if self.symlinks_logged.insert(path.clone()) {
                        info!(folder = %self.id, path = %path, "skipping symlink (symlinks are never synced)");
                    }
                    continue;
                }
                Look::Absent => None,
                Look::Present(obs, stat) => Some((obs, stat)),
            };
            if let Some((obs, _)) = &observed {
                if self.xml_gate && obs.kind == Kind::File && xml::is_gated(path.as_str()) {
                    let unchanged = self.replica.get(&path).is_some_and(|r| r.matches(obs));
                    if !unchanged {
                        let full = self.root.join(path.as_str());
                        let verdict = block(|| std::fs::read(&full))
                            .map_err(|e| e.to_string())
                            .and_then(|bytes| xml::check_well_formed(&bytes));
                        if let Err(problem) = verdict {
                            if self.held.insert(path.clone(), problem.clone()).is_none() {
                                warn!(folder = %self.id, path = %path, problem = %problem, "holding XML that is not well-formed; it is not shipped until it parses");
                            }
                            continue;
                        }
                    }
                }
            }
            if self.held.remove(&path).is_some() {
                info!(folder = %self.id, path = %path, "held file is well-formed now (or gone)");
            }
            let obs = observed.as_ref().map(|(o, _)| o);
            match self.replica.observe_local(&path, obs, now) {
                Some(record) => {
                    debug!(folder = %self.id, path = %path, deleted = record.deleted, seq = record.seq, "local change");
                    let stat = observed.map(|(_, s)| s);
                    match stat {
                        Some(s) => {
                            self.stats.insert(path, s);
                        }
                        None => {
                            self.stats.remove(&path);
                        }
                    }
                    commits.push(StoredRecord {
                        record,
                        stat,
                        origin: None,
                    });
                }
                None => {
                    if let Some((_, s)) = observed {
                        if self.stats.get(&path) != Some(&s) {
                            self.stats.insert(path.clone(), s);
                            stat_updates.push((path, s));
                        }
                    }
                }
            }
        }
        if !stat_updates.is_empty() {
            self.store.update_stats(&self.id, &stat_updates).await?;
        }
        if !commits.is_empty() {
            info!(folder = %self.id, count = commits.len(), "local changes recorded");
            self.store.commit(&self.id, &commits, None).await?;
            self.seq_tx.send_replace(self.replica.seq());
        }
        Ok(())
    }

    /// True when `remote` is a file this node has no live record of: it is written as a new
    /// file, which never replaces anything at its path (see [`apply::Op::Write`]'s `new`), so
    /// a file that appeared there meanwhile fails the write (and is looked at) instead of
    /// being overwritten. The look before the write is not needed then.
    fn placed_without_replacing(&self, remote: &FileRecord) -> bool {
        !remote.deleted
            && remote.kind == Kind::File
            && self.replica.get(&remote.path).is_none_or(|l| l.deleted)
    }

    /// True when the disk at `path` still shows what the index says (so it may be replaced).
    fn disk_matches_index(&self, path: &RelPath) -> bool {
        let meta = std::fs::symlink_metadata(self.root.join(path.as_str()));
        match (self.replica.get(path), meta) {
            (None, Err(_)) => true,
            (Some(r), Err(_)) => r.deleted,
            (None, Ok(_)) => false,
            (Some(r), Ok(m)) => {
                if r.deleted {
                    return false;
                }
                match r.kind {
                    Kind::Dir => m.is_dir(),
                    Kind::File => m.is_file() && self.stats.get(path) == Some(&scan::stat_key(&m)),
                }
            }
        }
    }

    /// Refuses a batch of a stream that failed before (see [`RemoteBatch::stream`]).
    fn refused(&self, batch: &RemoteBatch) -> Option<EngineError> {
        self.failed_streams
            .contains(&batch.stream)
            .then(|| EngineError::StreamFailed {
                folder: self.id.clone(),
                peer: batch.peer.clone(),
            })
    }

    /// Notes how a batch of `stream` ended: a failure stops the stream.
    fn note_outcome<T>(&mut self, stream: u64, result: &Result<T, EngineError>) {
        let Err(e) = result else { return };
        if !matches!(e, EngineError::StreamFailed { .. }) {
            self.last_error = Some(e.to_string());
        }
        if !self.failed_streams.contains(&stream) {
            if self.failed_streams.len() == FAILED_STREAMS_KEPT {
                self.failed_streams.pop_front();
            }
            self.failed_streams.push_back(stream);
        }
    }

    /// Applies a peer batch, and the batches queued right behind it, as a pipeline: while
    /// one batch waits for its durability and is put in place (on a blocking thread), the
    /// next is decided and staged, and once it is on disk its index commit runs while the next
    /// one is being finished. Only a batch that shares no path with the one before, and
    /// follows one without removals, is staged early; anything else (another message, or
    /// nothing queued) finishes the batch in flight first. Returns a message it took off the
    /// queue and did not handle.
    async fn remote_chain(
        &mut self,
        batch: RemoteBatch,
        reply: oneshot::Sender<Result<u64, EngineError>>,
        rx: &mut mpsc::Receiver<Msg>,
    ) -> Option<Msg> {
        let mut queued = Some((self.prepare_checked(batch).await, reply));
        // A batch on disk and settled in memory, whose index commit waits for the next
        // batch's finish to be under way.
        let mut settled: Option<(Settled, Reply)> = None;
        // A message taken off the queue that ends the chain.
        let mut leftover: Option<Msg> = None;
        loop {
            let current = match queued.take() {
                Some(((stream, Ok(mut prepared)), reply))
                    if !self.failed_streams.contains(&stream) =>
                {
                    Some(InFlight {
                        finishing: self.finish_in_background(prepared.staged.take()),
                        prepared,
                        reply,
                    })
                }
                other => {
                    // Nothing to overlap with: the batch before is recorded first, so that
                    // sequence numbers reach the index in order.
                    self.record_settled(settled.take()).await;
                    match other {
                        Some(((_, Ok(p)), reply)) => {
                            // The batch before it failed: drop what was staged, keep the
                            // index-only merges it decided (true whatever the disk holds).
                            let peer = p.peer.clone();
                            self.abandon_remote(p).await;
                            let _ = reply.send(Err(EngineError::StreamFailed {
                                folder: self.id.clone(),
                                peer,
                            }));
                        }
                        Some(((stream, Err(e)), reply)) => {
                            let r = Err(e);
                            self.note_outcome(stream, &r);
                            let _ = reply.send(r);
                        }
                        None => {}
                    }
                    None
                }
            };
            self.record_settled(settled.take()).await;
            let Some(mut current) = current else {
                return leftover;
            };
            // While this batch finishes, the next one may arrive: stage it meanwhile (its
            // paths must not meet this batch's, and a batch that removes waits, so that a
            // removal never races a write beneath it).
            let arrived = tokio::select! {
                biased;
                joined = &mut current.finishing => Err(joined),
                msg = rx.recv() => Ok(msg),
            };
            let joined = match arrived {
                Err(joined) => joined,
                Ok(Some(Msg::Remote(b, reply)))
                    if !current.prepared.removes
                        && b.records
                            .iter()
                            .all(|r| !current.prepared.paths.contains(&r.record.path)) =>
                {
                    queued = Some((self.prepare_checked(b).await, reply));
                    current.finishing.await
                }
                Ok(other) => {
                    leftover = other;
                    current.finishing.await
                }
            };
            let stream = current.prepared.stream;
            let done = self.settle_remote(current.prepared, joined);
            // A failure known now stops the stream before the next batch is finished.
            self.note_outcome(stream, &done.outcome);
            settled = Some((done, current.reply));
        }
    }

    /// Records a settled batch in the index and answers its session.
    async fn record_settled(&mut self, settled: Option<(Settled, Reply)>) {
        let Some((done, reply)) = settled else { return };
        let stream = done.stream;
        let t = std::time::Instant::now();
        let r = self.record_remote(done).await;
        debug!(folder = %self.id, commit_us = t.elapsed().as_micros() as u64, "batch recorded");
        self.note_outcome(stream, &r);
        let _ = reply.send(r);
    }

    /// [`Self::prepare_remote`], unless the batch's stream failed before. Returns the stream
    /// with the outcome.
    async fn prepare_checked(
        &mut self,
        batch: RemoteBatch,
    ) -> (u64, Result<PreparedRemote, EngineError>) {
        let stream = batch.stream;
        match self.refused(&batch) {
            Some(e) => (stream, Err(e)),
            None => (stream, self.prepare_remote(batch).await),
        }
    }

    /// Drops a prepared batch that will not be applied: its staged contents are removed; the
    /// index-only merges it decided are kept (without moving the peer's cursor).
    async fn abandon_remote(&mut self, mut prepared: PreparedRemote) {
        if let Some(staged) = prepared.staged.take() {
            block(|| staged.discard());
        }
        let commits = self.commit_stores(std::mem::take(&mut prepared.stores));
        if !commits.is_empty() {
            if let Err(e) = self.store.commit(&self.id, &commits, None).await {
                warn!(folder = %self.id, error = %e, "cannot record index-only merges");
            }
            self.seq_tx.send_replace(self.replica.seq());
        }
    }

    /// Commits index-only decisions to the replica; returns them as rows for the index.
    fn commit_stores(&mut self, stores: Vec<FileRecord>) -> Vec<StoredRecord> {
        stores
            .into_iter()
            .map(|record| {
                let stat = self.stats.get(&record.path).copied();
                let record = self.replica.commit(record);
                StoredRecord {
                    record,
                    stat,
                    origin: None,
                }
            })
            .collect()
    }

    /// First half of a peer batch: decisions, conflict copies, fetches, and the disk
    /// operations staged (nothing visible at a target path yet).
    async fn prepare_remote(&mut self, batch: RemoteBatch) -> Result<PreparedRemote, EngineError> {
        if let Some(reason) = &self.paused {
            return Err(EngineError::Paused {
                folder: self.id.clone(),
                reason: reason.clone(),
            });
        }
        let now = crate::now_ms();
        let t_prepare = std::time::Instant::now();
        // Every path of the batch, whatever its decision: the ones committed only when the
        // batch completes (index-only merges, disk already right) count as much as disk ops
        // for the next batch's overlap check.
        let paths: HashSet<RelPath> = batch
            .records
            .iter()
            .map(|r| r.record.path.clone())
            .collect();
        let mut stores: Vec<FileRecord> = Vec::new();
        let mut as_sent = HashMap::new();
        // (remote seq, record, conflict copy, content source)
        let mut applies: Vec<(u64, FileRecord, bool, Option<Inline>)> = Vec::new();
        for Incoming {
            record: remote,
            inline,
        } in batch.records
        {
            if self.ignore.is_ignored(&remote.path) {
                continue;
            }
            let remote_seq = remote.seq;
            let mut decision = self.replica.receive(&remote, now);
            if matches!(decision, Decision::Apply { .. })
                && !self.placed_without_replacing(&remote)
                && !block(|| self.disk_matches_index(&remote.path))
            {
                // The file changed under us since the last look: record that first, so the
                // peer's version meets it as a concurrent change instead of overwriting it.
                // (`observe` commits it to the index on its own.)
                self.observe(BTreeSet::from([remote.path.clone()])).await?;
                decision = self.replica.receive(&remote, now);
            }
            match decision {
                Decision::Ignore => {}
                // Committed to the replica only when the batch completes: a sequence number
                // handed out now would reach the index after the ones of the batch still in
                // flight, and a subscriber reading the index in between would skip it.
                Decision::Store(record) => stores.push(record),
                Decision::Apply {
                    record,
                    conflict_copy,
                } => {
                    // A new path or a dominating version; a concurrent merge or a
                    // delete-vs-modify rewrite has a version the peer has not seen.
                    if record.version == remote.version {
                        as_sent.insert(record.path.clone(), record.version.clone());
                    }
                    applies.push((remote_seq, record, conflict_copy, inline));
                }
            }
        }
        let mut fails = Failures::default();
        // Build the disk operations; what did not travel inline is fetched below.
        let mut fetches: Vec<(u64, FileRecord, Hash, bool)> = Vec::new();
        let mut ops: Vec<Op> = Vec::new();
        let mut op_meta: Vec<(u64, FileRecord)> = Vec::new();
        let mut no_op: Vec<FileRecord> = Vec::new();
        for (remote_seq, record, conflict_copy, inline) in applies {
            let local = self.replica.get(&record.path).cloned();
            if conflict_copy {
                if let Err(e) = self
                    .keep_conflict_copy(&record, local.as_ref(), now, &batch.peer)
                    .await
                {
                    fails.note(
                        remote_seq,
                        &record.path,
                        format!("cannot keep conflict copy: {e}"),
                    );
                    continue;
                }
            }
            let local_live = local.as_ref().filter(|l| !l.deleted);
            let op = if record.deleted {
                match local_live.map(|l| l.kind) {
                    Some(Kind::Dir) => Some(Op::RemoveDir {
                        path: record.path.clone(),
                    }),
                    Some(Kind::File) => Some(Op::RemoveFile {
                        path: record.path.clone(),
                    }),
                    None => None,
                }
            } else if record.kind == Kind::Dir {
                match local_live {
                    Some(l) if l.kind == Kind::Dir && l.mode == record.mode => None,
                    _ => Some(Op::Mkdir {
                        path: record.path.clone(),
                        mode: record.mode,
                    }),
                }
            } else if local_live.is_some_and(|l| l.kind == Kind::File && l.hash == record.hash) {
                // Same bytes already here: at most the mode differs.
                match local_live {
                    Some(l) if l.mode == record.mode => None,
                    _ => Some(Op::Chmod {
                        path: record.path.clone(),
                        mode: record.mode,
                    }),
                }
            } else {
                let Some(hash) = record.hash else {
                    fails.note(remote_seq, &record.path, "live file without a hash".into());
                    continue;
                };
                match inline {
                    // Checked against its hash at the edge; a record for other bytes (a
                    // newer version of the path) fetches instead.
                    Some(bytes) if *bytes.hash() == hash => Some(Op::Write {
                        path: record.path.clone(),
                        content: Content::Bytes(bytes.into_bytes()),
                        mode: record.mode,
                        new: local_live.is_none(),
                    }),
                    _ => {
                        fetches.push((remote_seq, record, hash, local_live.is_none()));
                        continue;
                    }
                }
            };
            match op {
                Some(op) => {
                    ops.push(op);
                    op_meta.push((remote_seq, record));
                }
                None => no_op.push(record),
            }
        }
        // Contents that did not travel inline, a few at a time.
        let fetched: Vec<Result<PathBuf, String>> = {
            use futures_util::StreamExt;
            let jobs: Vec<_> = fetches
                .iter()
                .map(|(_, record, hash, _)| {
                    let dir = match record.path.parent() {
                        Some(p) => self.root.join(p.as_str()),
                        None => self.root.clone(),
                    };
                    let (fetcher, id, path) =
                        (batch.fetcher.clone(), self.id.clone(), record.path.clone());
                    let (hash, mode) = (*hash, record.mode);
                    async move { fetcher.fetch(&id, &path, hash, &dir, mode).await }
                })
                .collect();
            futures_util::stream::iter(jobs)
                .buffered(FETCHES_AT_ONCE)
                .collect()
                .await
        };
        let fetched_count = fetched.len();
        for ((remote_seq, record, _, new), r) in fetches.into_iter().zip(fetched) {
            match r {
                Ok(tmp) => {
                    ops.push(Op::Write {
                        path: record.path.clone(),
                        content: Content::Temp(tmp),
                        mode: record.mode,
                        new,
                    });
                    op_meta.push((remote_seq, record));
                }
                Err(e) => fails.note(remote_seq, &record.path, format!("fetch failed: {e}")),
            }
        }
        let removes = ops
            .iter()
            .any(|o| matches!(o, Op::RemoveFile { .. } | Op::RemoveDir { .. }));
        let t_staging = std::time::Instant::now();
        let n_ops = ops.len();
        let staged = if ops.is_empty() {
            None
        } else {
            Some(block(|| {
                apply::stage_batch(&self.root, ops, Some(&self.own))
            }))
        };
        debug!(folder = %self.id, peer = %batch.peer, ops = n_ops, fetched = fetched_count, decide_fetch_us = t_staging.duration_since(t_prepare).as_micros() as u64, stage_us = t_staging.elapsed().as_micros() as u64, "batch staged");
        Ok(PreparedRemote {
            peer: batch.peer,
            stream: batch.stream,
            epoch: batch.epoch,
            up_to_seq: batch.up_to_seq,
            stores,
            op_meta,
            no_op,
            fails,
            staged,
            paths,
            removes,
            as_sent,
        })
    }

    /// Finishes a staged batch (durability, placement) on a blocking thread, so the engine can
    /// stage the next batch meanwhile.
    fn finish_in_background(
        &self,
        staged: Option<apply::StagedBatch>,
    ) -> tokio::task::JoinHandle<Vec<apply::OpResult>> {
        let own = self.own.clone();
        tokio::task::spawn_blocking(move || match staged {
            Some(batch) => batch.finish(Some(&own)),
            None => Vec::new(),
        })
    }

    /// Second half of a peer batch, once its disk operations are done (`joined`: the finish
    /// task's outcome): commits what landed to the replica and says how far the batch got.
    /// The index commit follows in [`Self::record_remote`]. A batch of a stream that failed
    /// meanwhile records what landed but does not move the peer's cursor.
    fn settle_remote(
        &mut self,
        prepared: PreparedRemote,
        joined: Result<Vec<apply::OpResult>, tokio::task::JoinError>,
    ) -> Settled {
        let PreparedRemote {
            peer,
            stream,
            epoch,
            up_to_seq,
            stores,
            op_meta,
            no_op,
            mut fails,
            as_sent,
            ..
        } = prepared;
        // Only the exact version the peer sent has come from it (see `Origin`).
        let origin_of = |record: &FileRecord| {
            (as_sent.get(&record.path) == Some(&record.version)).then(|| Origin {
                peer: peer.clone(),
                epoch,
            })
        };
        let results = match joined {
            Ok(results) => results,
            Err(e) => op_meta
                .iter()
                .map(|_| Err(std::io::Error::other(format!("apply task failed: {e}"))))
                .collect(),
        };
        let mut commits = self.commit_stores(stores);
        let mut applied = 0usize;
        let mut appeared: BTreeSet<RelPath> = BTreeSet::new();
        for ((remote_seq, record), result) in op_meta.into_iter().zip(results) {
            match result {
                Ok(stat) => {
                    applied += 1;
                    match stat {
                        Some(s) => {
                            self.stats.insert(record.path.clone(), s);
                        }
                        None => {
                            self.stats.remove(&record.path);
                        }
                    }
                    let origin = origin_of(&record);
                    let record = self.replica.commit(record);
                    commits.push(StoredRecord {
                        record,
                        stat,
                        origin,
                    });
                }
                Err(e)
                    if record.deleted
                        && record.kind == Kind::Dir
                        && e.raw_os_error() == Some(nix::libc::ENOTEMPTY) =>
                {
                    // Only ignored or unsynced files keep it alive here; it stays, and no
                    // deletion is recorded for it, so nothing is lost.
                    warn!(folder = %self.id, path = %record.path, peer = %peer, "directory deleted on a peer still has local content; keeping it");
                }
                Err(e) => {
                    if e.kind() == std::io::ErrorKind::AlreadyExists {
                        // A local file took the path of a new one: look at it now, so the
                        // peer's version meets it as a concurrent change when it comes again.
                        appeared.insert(record.path.clone());
                    }
                    warn!(folder = %self.id, path = %record.path, peer = %peer, error = %e, "cannot apply change");
                    fails.note(remote_seq, &record.path, e.to_string());
                }
            }
        }
        for record in no_op {
            let stat = self.stats.get(&record.path).copied();
            let origin = origin_of(&record);
            let record = self.replica.commit(record);
            commits.push(StoredRecord {
                record,
                stat,
                origin,
            });
        }
        let applied_up_to = match &fails.first {
            Some((seq, _, _)) => seq.saturating_sub(1),
            None => up_to_seq,
        };
        let stream_failed = self.failed_streams.contains(&stream);
        let cursor = (!stream_failed).then_some(Cursor {
            epoch,
            seq: applied_up_to,
        });
        let outcome = match fails.first {
            Some((_, path, problem)) => Err(EngineError::ApplyFailed {
                folder: self.id.clone(),
                failed: fails.count,
                path,
                problem,
            }),
            None if stream_failed => Err(EngineError::StreamFailed {
                folder: self.id.clone(),
                peer: peer.clone(),
            }),
            None => Ok(applied_up_to),
        };
        Settled {
            peer,
            stream,
            commits,
            cursor,
            applied,
            appeared,
            outcome,
        }
    }

    /// Commits a settled batch to the index (with the peer cursor, in one transaction).
    async fn record_remote(&mut self, done: Settled) -> Result<u64, EngineError> {
        let Settled {
            peer,
            commits,
            cursor,
            applied,
            appeared,
            outcome,
            ..
        } = done;
        self.store
            .commit(&self.id, &commits, cursor.map(|c| (peer.as_str(), c)))
            .await?;
        if !commits.is_empty() {
            self.seq_tx.send_replace(self.replica.seq());
        }
        if applied > 0 {
            info!(folder = %self.id, peer = %peer, count = applied, "applied peer changes");
        }
        if !appeared.is_empty() {
            if let Err(e) = self.observe(appeared).await {
                warn!(folder = %self.id, error = %e, "cannot look at files that appeared meanwhile");
            }
        }
        outcome
    }

    async fn on_deploy(&mut self, request: DeployRequest) -> Result<(), EngineError> {
        if let Some(reason) = &self.paused {
            return Err(EngineError::Paused {
                folder: self.id.clone(),
                reason: reason.clone(),
            });
        }
        // Deployed files get the folder's permissions (without execute bits), never wider.
        let root_mode = block(|| std::fs::metadata(&self.root))
            .map(|m| {
                use std::os::unix::fs::PermissionsExt;
                m.permissions().mode()
            })
            .unwrap_or(0o750);
        let file_mode = root_mode & 0o666;
        let mut paths = BTreeSet::new();
        let mut ops = Vec::new();
        for (path, data) in request.writes {
            if self.ignore.is_ignored(&path) {
                continue;
            }
            paths.insert(path.clone());
            ops.push(Op::Write {
                path,
                content: Content::Bytes(data),
                mode: file_mode,
                new: false,
            });
        }
        for path in request.removes {
            paths.insert(path.clone());
            ops.push(Op::RemoveFile { path });
        }
        let described: Vec<String> = ops.iter().map(|o| o.path().to_string()).collect();
        let results = block(|| apply::apply_batch(&self.root, ops, Some(&self.own)));
        let failure = described
            .into_iter()
            .zip(&results)
            .find_map(|(p, r)| r.as_ref().err().map(|e| (p, e.to_string())));
        let failures = results.iter().filter(|r| r.is_err()).count();
        // Record whatever did land, as local changes.
        self.observe(paths).await?;
        match failure {
            Some((path, problem)) => Err(EngineError::ApplyFailed {
                folder: self.id.clone(),
                failed: failures,
                path,
                problem,
            }),
            None => Ok(()),
        }
    }

    /// Keeps the local bytes that lose a conflict under `state_dir/conflicts/<folder>/<path>.<node>.<stamp>`.
    async fn keep_conflict_copy(
        &mut self,
        winner: &FileRecord,
        local: Option<&FileRecord>,
        now: u64,
        peer: &str,
    ) -> Result<(), std::io::Error> {
        let Some(local) = local else { return Ok(()) };
        let name_of = |id: NodeId| -> String {
            if id == self.opts.node {
                return self.opts.node_name.clone();
            }
            self.opts
                .names
                .lock()
                .ok()
                .and_then(|m| m.get(&id).cloned())
                .unwrap_or_else(|| id.to_string())
        };
        let writer = name_of(local.stamp.node);
        let winner_name = name_of(winner.stamp.node);
        let dest = self.opts.conflicts_dir.join(&self.id).join(format!(
            "{}.{}.{}",
            local.path,
            writer,
            Hlc::millis(local.stamp.hlc)
        ));
        let src = self.root.join(local.path.as_str());
        let kept = block(|| apply::keep_copy(&src, &dest))?;
        if kept {
            warn!(folder = %self.id, path = %local.path, peer = %peer, copy = %dest.display(), "conflict: concurrent change elsewhere wins; local version kept as a conflict copy");
            self.conflicts += 1;
            let entry = ConflictEntry {
                folder: self.id.clone(),
                path: local.path.to_string(),
                copy: dest.display().to_string(),
                winner_node: winner_name,
                created_ms: now,
            };
            if let Err(e) = self.store.add_conflict(&entry).await {
                warn!(folder = %self.id, error = %e, "cannot log conflict in the index");
            }
        }
        Ok(())
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
pub fn engine_options(config: &Config, node: NodeId, names: NodeNames) -> EngineOptions {
    EngineOptions {
        node,
        names,
        node_name: config.node.clone(),
        conflicts_dir: config.state_dir.join("conflicts"),
        tombstone_ttl_ms: config.tombstone_ttl().as_millis() as u64,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Stamp, VersionVector};

    /// A peer whose content cannot be fetched.
    struct NoFetch;

    impl Fetcher for NoFetch {
        fn fetch<'a>(
            &'a self,
            _folder: &'a str,
            _path: &'a RelPath,
            _hash: Hash,
            _dir: &'a Path,
            _mode: u32,
        ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<PathBuf, String>> + Send + 'a>>
        {
            Box::pin(async { Err("peer is gone".to_owned()) })
        }
    }

    const PEER: NodeId = NodeId(77);

    fn remote_file(path: &str, bytes: &[u8], seq: u64, inline: bool) -> Incoming {
        let hash = *blake3::hash(bytes).as_bytes();
        let mut version = VersionVector::new();
        version.bump(PEER);
        Incoming {
            record: FileRecord {
                path: RelPath::new(path).expect("valid"),
                kind: Kind::File,
                deleted: false,
                size: bytes.len() as u64,
                mode: 0o644,
                hash: Some(hash),
                version,
                stamp: Stamp {
                    hlc: Hlc::default().tick(1_700_000_000_000 + seq),
                    node: PEER,
                },
                seq,
            },
            inline: if inline {
                Inline::verified(bytes.to_vec(), &hash)
            } else {
                None
            },
        }
    }

    fn batch(stream: u64, up_to_seq: u64, records: Vec<Incoming>) -> RemoteBatch {
        RemoteBatch {
            peer: "gw2".into(),
            stream,
            epoch: 5,
            up_to_seq,
            records,
            fetcher: Arc::new(NoFetch),
        }
    }

    async fn engine_on(
        dir: &Path,
    ) -> (
        FolderHandle,
        Store,
        CancellationToken,
        tokio::task::JoinHandle<()>,
    ) {
        let root = dir.join("root");
        std::fs::create_dir_all(&root).expect("mkdir");
        let store = Store::open(dir).await.expect("store");
        let folder = FolderConfig {
            id: "synapse-configs".into(),
            path: root,
            ignore: Vec::new(),
            xml_gate: true,
        };
        let opts = EngineOptions {
            node: NodeId(1),
            names: NodeNames::default(),
            node_name: "gw1".into(),
            conflicts_dir: dir.join("conflicts"),
            tombstone_ttl_ms: 1000,
        };
        let (mut engine, handle, inbox) = FolderEngine::open(&folder, store.clone(), opts)
            .await
            .expect("open");
        engine.initial_scan().await.expect("scan");
        let cancel = CancellationToken::new();
        let task = tokio::spawn(engine.run(
            inbox,
            std::time::Duration::from_secs(3600),
            std::time::Duration::from_secs(3600),
            cancel.clone(),
        ));
        (handle, store, cancel, task)
    }

    /// Batches queued back to back are staged while the one before is finished; one that
    /// touches a path of the batch in flight waits for it, so the later version wins, and the
    /// index gets its sequence numbers in the order they were handed out.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn queued_batches_apply_in_order_and_a_shared_path_keeps_the_later_version() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (handle, store, cancel, task) = engine_on(dir.path()).await;
        let root = dir.path().join("root");
        let mut newer = remote_file("x.xml", b"<x v=\"2\"/>", 3, true);
        newer.record.version.bump(PEER);
        let many: Vec<Incoming> = (0..200)
            .map(|i| {
                remote_file(
                    &format!("d/{i}.xml"),
                    format!("<d n=\"{i}\"/>").as_bytes(),
                    10 + i,
                    true,
                )
            })
            .collect();
        let batches = vec![
            batch(
                9,
                2,
                vec![
                    remote_file("x.xml", b"<x v=\"1\"/>", 1, true),
                    remote_file("y.xml", b"<y/>", 2, true),
                ],
            ),
            batch(9, 3, vec![newer]),
            batch(9, 209, many),
            batch(9, 300, vec![remote_file("z.xml", b"<z/>", 300, true)]),
        ];
        let mut answers = Vec::new();
        for b in batches {
            answers.push(handle.queue_remote(b).await.expect("queued"));
        }
        let mut applied = Vec::new();
        for a in answers {
            applied.push(a.await.expect("applied"));
        }
        assert_eq!(applied, vec![2, 3, 209, 300]);
        assert_eq!(
            std::fs::read(root.join("x.xml")).expect("x"),
            b"<x v=\"2\"/>"
        );
        assert_eq!(
            std::fs::read(root.join("d/199.xml")).expect("d"),
            b"<d n=\"199\"/>"
        );
        assert_eq!(std::fs::read(root.join("z.xml")).expect("z"), b"<z/>");
        let cursor = store
            .cursor("gw2", "synapse-configs")
            .await
            .expect("cursor");
        assert_eq!(cursor.seq, 300);
        // Every sequence number the replica handed out is in the index, in order.
        let rows = store
            .since("synapse-configs", 0, 10_000, None)
            .await
            .expect("since");
        let seqs: Vec<u64> = rows.iter().map(|r| r.record.seq).collect();
        assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");
        assert_eq!(
            seqs.last(),
            Some(&handle.status().seq),
            "the newest seq is stored"
        );
        assert_eq!(seqs.len(), 203, "x, y, 200 in d/, z: one row per path");
        assert_eq!(apply::remove_stale_temps(&root), 0);
        cancel.cancel();
        task.await.expect("engine task");
    }

    /// Regression guard for pipelined sessions: once a batch of a stream fails, a batch queued
    /// behind it on the same stream must not apply, or the peer's cursor would move past the
    /// record that failed and it would never be retried.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failed_batch_stops_its_stream_and_keeps_the_cursor_before_the_failure() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (handle, store, cancel, task) = engine_on(dir.path()).await;
        let root = dir.path().join("root");
        // Batch 1: seq 1 lands, seq 2 needs a fetch that fails. Batch 2 is queued behind it.
        let first = handle
            .queue_remote(batch(
                1,
                2,
                vec![
                    remote_file("a.xml", b"<a/>", 1, true),
                    remote_file("big.xml", b"<big/>", 2, false),
                ],
            ))
            .await
            .expect("queued");
        let second = handle
            .queue_remote(batch(1, 3, vec![remote_file("c.xml", b"<c/>", 3, true)]))
            .await
            .expect("queued");
        match first.await {
            Err(EngineError::ApplyFailed { failed, path, .. }) => {
                assert_eq!((failed, path.as_str()), (1, "big.xml"));
            }
            other => panic!("expected the fetch failure, got {other:?}"),
        }
        assert!(
            matches!(second.await, Err(EngineError::StreamFailed { .. })),
            "a batch behind a failed one must be refused"
        );
        assert_eq!(std::fs::read(root.join("a.xml")).expect("a.xml"), b"<a/>");
        assert!(
            !root.join("c.xml").exists(),
            "the refused batch wrote nothing"
        );
        let cursor = store
            .cursor("gw2", "synapse-configs")
            .await
            .expect("cursor");
        assert_eq!(
            (cursor.epoch, cursor.seq),
            (5, 1),
            "cursor stops before the failure"
        );
        // The session resubscribes on a new stream from the cursor: that applies.
        let applied = handle
            .remote(batch(
                2,
                3,
                vec![
                    remote_file("big.xml", b"<big/>", 2, true),
                    remote_file("c.xml", b"<c/>", 3, true),
                ],
            ))
            .await
            .expect("a new stream applies");
        assert_eq!(applied, 3);
        assert_eq!(std::fs::read(root.join("c.xml")).expect("c.xml"), b"<c/>");
        cancel.cancel();
        task.await.expect("engine task");
    }

    /// The index row of `path`, as stored.
    async fn row_of(store: &Store, path: &str) -> StoredRecord {
        store
            .load_folder("synapse-configs")
            .await
            .expect("index")
            .into_iter()
            .find(|r| r.record.path.as_str() == path)
            .unwrap_or_else(|| panic!("{path} is not in the index"))
    }

    /// What `batch` says it came from.
    fn gw2_epoch_5() -> Option<Origin> {
        Some(Origin {
            peer: "gw2".into(),
            epoch: 5,
        })
    }

    /// A version taken exactly as the peer sent it (a new path, a dominating version, a
    /// tombstone with nothing to remove) carries the batch's origin; a local re-observation
    /// of the path drops it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_record_applied_as_the_peer_sent_it_is_stored_with_the_batch_origin() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (handle, store, cancel, task) = engine_on(dir.path()).await;
        let root = dir.path().join("root");
        let first = remote_file("x.xml", b"<x v=\"1\"/>", 1, true);
        let mut newer = remote_file("x.xml", b"<x v=\"2\"/>", 3, true);
        newer.record.version.bump(PEER);
        let mut gone = remote_file("gone.xml", b"", 2, false);
        (gone.record.deleted, gone.record.hash) = (true, None);
        handle
            .remote(batch(1, 2, vec![first, gone]))
            .await
            .expect("applied");
        assert_eq!(row_of(&store, "x.xml").await.origin, gw2_epoch_5(), "new");
        assert_eq!(
            row_of(&store, "gone.xml").await.origin,
            gw2_epoch_5(),
            "no disk op"
        );
        handle
            .remote(batch(1, 3, vec![newer.clone()]))
            .await
            .expect("applied");
        let x = row_of(&store, "x.xml").await;
        assert!(x.record.same_version(&newer.record));
        assert_eq!(x.origin, gw2_epoch_5(), "a dominating version");

        std::fs::write(root.join("x.xml"), b"<x v=\"local\"/>").expect("local edit");
        handle
            .local(Change::Paths(vec![RelPath::new("x.xml").expect("valid")]))
            .await
            .expect("queued");
        handle.resume().await.expect("engine answers"); // the local change is handled by now
        let x = row_of(&store, "x.xml").await;
        assert_eq!(
            x.record.hash,
            Some(*blake3::hash(b"<x v=\"local\"/>").as_bytes())
        );
        assert_eq!(x.origin, None, "a local version has no origin");
        cancel.cancel();
        task.await.expect("engine task");
    }

    /// A concurrent change is merged here into a version the peer has not seen, whether the
    /// peer's side wins (applied with a merged vector and a conflict copy) or only the index
    /// changes (same bytes): the peer must receive it, so it carries no origin.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_merged_version_is_stored_without_origin() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().join("root");
        std::fs::create_dir_all(&root).expect("mkdir");
        std::fs::write(root.join("same.xml"), b"<same/>").expect("write");
        std::fs::write(root.join("mine.xml"), b"<mine/>").expect("write");
        let (handle, store, cancel, task) = engine_on(dir.path()).await;
        // Same bytes, an older stamp: only the vectors merge (`Decision::Store`).
        let same = remote_file("same.xml", b"<same/>", 1, true);
        // Other bytes with a later stamp: the peer's content wins a concurrent conflict.
        let mut theirs = remote_file("mine.xml", b"<theirs/>", 2, true);
        theirs.record.stamp.hlc = Hlc::default().tick(crate::now_ms() + 3_600_000);
        handle
            .remote(batch(1, 2, vec![same.clone(), theirs.clone()]))
            .await
            .expect("applied");
        assert_eq!(
            std::fs::read(root.join("mine.xml")).expect("mine.xml"),
            b"<theirs/>"
        );
        for (path, sent) in [("same.xml", &same), ("mine.xml", &theirs)] {
            let row = row_of(&store, path).await;
            assert_eq!(
                row.record.version.compare(&sent.record.version),
                crate::model::Causality::After,
                "{path}: the merged vector dominates the peer's"
            );
            assert_eq!(row.origin, None, "{path}: a merge has no origin");
        }
        cancel.cancel();
        task.await.expect("engine task");
    }

    /// A batch with no records that moves the cursor (the sender left out rows the
    /// subscriber has) is answered like any other: cursor committed, `up_to_seq` returned.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_empty_batch_moves_the_peer_cursor() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (handle, store, cancel, task) = engine_on(dir.path()).await;
        let seq = handle.status().seq;
        assert_eq!(
            handle.remote(batch(1, 42, Vec::new())).await.expect("ok"),
            42
        );
        let cursor = store
            .cursor("gw2", "synapse-configs")
            .await
            .expect("cursor");
        assert_eq!((cursor.epoch, cursor.seq), (5, 42));
        assert_eq!(
            handle.status().seq,
            seq,
            "nothing was committed but the cursor"
        );
        cancel.cancel();
        task.await.expect("engine task");
    }

    /// A peer's new file never overwrites a local file the index does not know yet: the
    /// write fails, the local file is looked at, and the next attempt meets it as a
    /// concurrent change. Here the local write is the later one (this node had seen the
    /// peer's stamp when it looked), so it stays, and its record does not absorb the peer's
    /// version: the peer keeps its own bytes as a conflict copy when the record reaches it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_new_file_meeting_an_unknown_local_file_keeps_both_versions() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (handle, store, cancel, task) = engine_on(dir.path()).await;
        let root = dir.path().join("root");
        // Written after the engine's scan, with no watcher to tell it.
        std::fs::write(root.join("x.xml"), b"<local/>").expect("local write");
        let peer_file = || remote_file("x.xml", b"<peer/>", 1, true);
        match handle.remote(batch(1, 1, vec![peer_file()])).await {
            Err(EngineError::ApplyFailed { path, .. }) => assert_eq!(path.as_str(), "x.xml"),
            other => panic!("expected the write to fail on the local file, got {other:?}"),
        }
        assert_eq!(
            std::fs::read(root.join("x.xml")).expect("x.xml"),
            b"<local/>",
            "the local file is untouched"
        );
        // The session comes back on a new stream: the engine looked at the local file after
        // the failure (there is no watcher here), so now it is a concurrent change.
        let applied = handle
            .remote(batch(2, 1, vec![peer_file()]))
            .await
            .expect("the second attempt is decided");
        assert_eq!(applied, 1);
        assert_eq!(
            std::fs::read(root.join("x.xml")).expect("x.xml"),
            b"<local/>"
        );
        let rows = store
            .since("synapse-configs", 0, 10, None)
            .await
            .expect("index");
        let x = rows
            .iter()
            .find(|r| r.record.path.as_str() == "x.xml")
            .expect("the local file is in the index");
        assert_eq!(x.record.hash, Some(*blake3::hash(b"<local/>").as_bytes()));
        assert_eq!(
            x.record.version.compare(&peer_file().record.version),
            crate::model::Causality::Concurrent,
            "the local record must not dominate the peer's write it does not hold"
        );
        cancel.cancel();
        task.await.expect("engine task");
    }
}
