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
use crate::fs::par;
use crate::fs::scan::{self, Look};
use crate::fs::watch::Change;
use crate::fs::xml;
use crate::liveness::{self, EngineReport, Liveness, StopOnDrop};
use crate::model::{
    Causality, Decision, FileRecord, Hash, Hlc, Kind, NodeId, RelPath, Replica, VersionVector,
};
use crate::store::{
    ConflictEntry, Cursor, Origin, SkipChanges, Skipped, StatKey, Store, StoreError, StoredRecord,
};

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
    #[error("folder {folder}: {what} did not finish: {reason}")]
    Task {
        folder: String,
        what: &'static str,
        reason: String,
    },
    #[error(
        "folder {folder}: an earlier batch from peer {peer} on this stream failed; resubscribing"
    )]
    StreamFailed { folder: String, peer: String },
}

/// Why a content could not be fetched: this node's trouble (the temp file) or the peer's
/// (gone, unreadable there, changed meanwhile).
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("{0}")]
    Local(#[from] std::io::Error),
    #[error("{0}")]
    Peer(String),
}

/// What [`Fetcher::fetch`] returns: the path of the verified temp file, once fetched.
pub type Fetching<'a> =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<PathBuf, FetchError>> + Send + 'a>>;

/// Fetches the content of a file from the peer that announced it, into a verified temp file.
pub trait Fetcher: Send + Sync {
    fn fetch<'a>(
        &'a self,
        folder: &'a str,
        path: &'a RelPath,
        hash: Hash,
        size: u64,
        dir: &'a Path,
        mode: u32,
    ) -> Fetching<'a>;
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
    bytes: bytes::Bytes,
    hash: Hash,
}

impl Inline {
    /// The bytes, when they hash to `hash`.
    pub fn verified(bytes: impl Into<bytes::Bytes>, hash: &Hash) -> Option<Self> {
        let bytes = bytes.into();
        (blake3::hash(&bytes).as_bytes() == hash).then_some(Self { bytes, hash: *hash })
    }

    /// The hash the bytes were checked against.
    pub fn hash(&self) -> &Hash {
        &self.hash
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }

    pub fn into_bytes(self) -> bytes::Bytes {
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
    /// A retry of skipped changes, made by the engine itself: it moves no cursor.
    pub retry: bool,
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
    /// Peer changes that failed to apply [`SKIP_AFTER_FAILURES`] times in a row: set aside so
    /// the rest of the peer's changes flow, and retried with backoff.
    #[serde(default)]
    pub skipped: Vec<SkippedStatus>,
    /// The latest peer record stamped further ahead of this node's clock than
    /// `max_clock_skew_ms`: applied, without moving the clock.
    #[serde(default)]
    pub clock_ahead: Option<ClockAhead>,
}

/// A peer record stamped (or versioned) ahead of this node's clock, as status shows it.
#[derive(Debug, Clone, Default, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct ClockAhead {
    pub peer: String,
    pub path: String,
    /// How far the record's stamp or largest version counter is ahead of this node's clock, ms.
    pub ahead_ms: u64,
    /// Wall time the record arrived, ms since the epoch.
    pub at_ms: u64,
}

/// A record ahead of the clock is logged at most this often per folder, ms (status always
/// shows the latest).
const CLOCK_AHEAD_WARN_EVERY_MS: u64 = 60_000;

/// One skipped peer change, as status shows it.
#[derive(Debug, Clone, Default, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct SkippedStatus {
    pub path: String,
    pub peer: String,
    pub problem: String,
    pub attempts: u32,
    /// Wall time of the next attempt, ms since the epoch.
    pub next_retry_ms: u64,
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
    live: Arc<Liveness>,
    /// The folder's ignore rules: an ignored path is never served to a peer.
    ignore: Arc<Ignore>,
}

/// Why a peer's `Fetch` gets nothing.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// Not something this node serves (ignored, not indexed, deleted, other content, changed
    /// since it was indexed, reached through a symlink): the peer sees "not found".
    #[error("{path}: {reason}")]
    NotServed { path: RelPath, reason: String },
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl FolderHandle {
    /// Opens the content a peer asks for, and only that: the live file of an indexed record of
    /// this folder whose hash is the one asked for, still as the index last saw it on disk
    /// (its stat key), opened without following a symlink at any component. Ignored and
    /// internal paths are never served, whatever the index says.
    pub async fn open_for_peer(
        &self,
        path: &RelPath,
        hash: &Hash,
    ) -> Result<std::fs::File, ServeError> {
        let refuse = |reason: &str| ServeError::NotServed {
            path: path.clone(),
            reason: reason.to_owned(),
        };
        if self.ignore.is_ignored(path) {
            return Err(refuse("not synced here (ignored)"));
        }
        let Some(row) = self.store.get(&self.id, path).await? else {
            return Err(refuse("not in this node's index"));
        };
        let r = &row.record;
        if !r.is_live_file() {
            return Err(refuse("no live file in this node's index"));
        }
        if r.hash.as_ref() != Some(hash) {
            return Err(refuse("this node holds other content at that path"));
        }
        let (root, rel, expected) = (self.root.clone(), path.clone(), row.stat);
        let opened = tokio::task::spawn_blocking(move || {
            let file = crate::fs::beneath::open_file(&root, &rel)?;
            let key = scan::stat_key(&file.metadata()?);
            Ok::<_, std::io::Error>((file, key))
        })
        .await
        .map_err(|e| refuse(&format!("opening failed: {e}")))?;
        match opened {
            Ok((file, key)) if expected == Some(key) => Ok(file),
            // Changed since it was indexed: its newer record follows (or the file is being
            // written); the peer fetches that one.
            Ok(_) => Err(refuse("changed on disk since it was indexed")),
            Err(e) => Err(refuse(&e.to_string())),
        }
    }

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

    /// The engine's liveness, read without asking the engine (which may be stuck).
    pub fn liveness(&self) -> liveness::Snapshot {
        self.live.snapshot()
    }

    /// The engine's liveness as status shows it, judged at `now_ms` ([`liveness::mono_ms`]).
    pub fn engine_report(&self, now_ms: u64, stall_limit: std::time::Duration) -> EngineReport {
        liveness::report(&self.live.snapshot(), now_ms, stall_limit)
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
    /// First retry of a skipped peer change, ms; it doubles after each failed retry.
    pub skip_retry_ms: u64,
    /// Names of the configured peers: skipped changes of any other peer are dropped at start.
    pub peers: Vec<String>,
    /// A peer's stamp further ahead of this node's clock than this does not move it, ms.
    pub max_clock_skew_ms: u64,
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
    /// Idle or busy, and progress, for the daemon's watchdog (see [`crate::liveness`]).
    live: Arc<Liveness>,
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
    /// Peer changes failing in a row: (peer, path) -> (the version that fails, how often).
    strikes: HashMap<(String, RelPath), (VersionVector, u32)>,
    /// Skipped peer changes, by (peer, path); kept in the index too.
    skipped: BTreeMap<(String, RelPath), Skipped>,
    /// The latest content source of each peer, for retrying its skipped changes.
    fetchers: HashMap<String, Arc<dyn Fetcher>>,
    /// The latest peer record ahead of this node's clock (see [`ClockAhead`]).
    clock_ahead: Option<ClockAhead>,
}

/// One record of a batch that could not be applied.
#[derive(Debug)]
struct Failure {
    /// The record as the peer sent it (`seq` is the peer's).
    record: FileRecord,
    problem: String,
    /// The trouble is this node's, not the path's (a full or read-only disk, a conflict
    /// copy that cannot be kept): the change waits in the stream, it is never skipped.
    node_wide: bool,
}

/// The failures of one batch.
#[derive(Debug, Default)]
struct Failures(Vec<Failure>);

impl Failures {
    /// `remote`: the record as the peer sent it.
    fn note(&mut self, remote: &FileRecord, problem: String, node_wide: bool) {
        self.0.push(Failure {
            record: remote.clone(),
            problem,
            node_wide,
        });
    }
}

/// A peer change failing this many times in a row is skipped (see [`FolderStatus::skipped`]).
/// A passing problem (a local write racing the peer's, a file changing on the peer while it
/// is fetched) clears on the session's quick retries before that.
pub const SKIP_AFTER_FAILURES: u32 = 3;

/// Skipped changes retried in one batch at most.
const RETRY_BATCH_RECORDS: usize = 1000;

/// Skipped changes are retried at most this far apart.
const SKIP_RETRY_MAX_MS: u64 = 3_600_000;

/// True when an apply error says more about this node than about the path: such a change
/// is never skipped, so it cannot be left behind while the node's trouble lasts.
fn node_wide(e: &std::io::Error) -> bool {
    use nix::libc;
    use std::io::ErrorKind as K;
    match e.raw_os_error() {
        Some(code) => matches!(
            code,
            libc::ENOSPC
                | libc::EDQUOT
                | libc::EROFS
                | libc::EIO
                | libc::ENOMEM
                | libc::EMFILE
                | libc::ENFILE
        ),
        None => !matches!(
            e.kind(),
            K::PermissionDenied
                | K::AlreadyExists
                | K::NotFound
                | K::IsADirectory
                | K::NotADirectory
                | K::InvalidInput
                | K::InvalidFilename
                | K::DirectoryNotEmpty
        ),
    }
}

/// When a change skipped after `attempts` failures is tried next.
fn skip_retry_at(now_ms: u64, base_ms: u64, attempts: u32) -> u64 {
    let doublings = attempts.saturating_sub(SKIP_AFTER_FAILURES).min(32);
    let delay = base_ms
        .saturating_mul(1u64 << doublings)
        .min(SKIP_RETRY_MAX_MS);
    now_ms.saturating_add(delay)
}

/// A peer batch decided and staged, waiting for its durability and placement.
struct PreparedRemote {
    peer: String,
    stream: u64,
    epoch: u64,
    up_to_seq: u64,
    retry: bool,
    /// Index-only changes (merged versions), for the replica and the index.
    stores: Vec<FileRecord>,
    /// (record decided, record as the peer sent it) of each disk op, in op order.
    op_meta: Vec<(FileRecord, FileRecord)>,
    /// Records whose disk already matches, each with whether it is the peer's version as
    /// sent (see `Origin`).
    no_op: Vec<(FileRecord, bool)>,
    fails: Failures,
    staged: Option<apply::StagedBatch>,
    /// Every path of the batch (see `remote_chain`).
    paths: HashSet<RelPath>,
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
    skips: SkipChanges,
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

/// Longest a local change waits for a chain of peer batches (see `remote_chain`). Ending a
/// chain costs the overlap of one batch, so this bounds that cost to one batch a second of
/// inflow; a local edit made during a bulk inflow reaches the index (and the peers) at most
/// this much later. The watcher's quiet period is on top, as always.
const LOCAL_DEFER_MAX: std::time::Duration = std::time::Duration::from_secs(1);

/// A local change waits for a chain of peer batches no longer than this: then the chain ends.
fn waited_enough(deferred: &Option<(Change, std::time::Instant)>) -> bool {
    deferred
        .as_ref()
        .is_some_and(|(_, since)| since.elapsed() >= LOCAL_DEFER_MAX)
}

/// One change standing for two that came one after the other: the union of their paths, or
/// a rescan when either is one.
fn merge_changes(a: Change, b: Change) -> Change {
    match (a, b) {
        (Change::Paths(mut a), Change::Paths(b)) => {
            a.extend(b);
            Change::Paths(a)
        }
        _ => Change::Rescan,
    }
}

/// Large contents of one batch fetched from the peer at the same time.
const FETCHES_AT_ONCE: usize = 4;

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
            .partition(|s| opts.peers.contains(&s.peer));
        if !gone.is_empty() {
            info!(folder = %folder.id, count = gone.len(), "dropping skipped changes of peers no longer configured");
            let cleared = gone.into_iter().map(|s| (s.peer, s.record.path)).collect();
            let changes = SkipChanges {
                set: Vec::new(),
                cleared,
            };
            store.commit(&folder.id, &[], None, &changes).await?;
        }
        let skipped = skipped
            .into_iter()
            .map(|s| ((s.peer.clone(), s.record.path.clone()), s))
            .collect();
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
            confirmed: false,
            held: BTreeMap::new(),
            unreadable: BTreeMap::new(),
            unstable: BTreeSet::new(),
            symlinks_logged: BTreeSet::new(),
            last_error: None,
            conflicts,
            failed_streams: VecDeque::new(),
            own,
            strikes: HashMap::new(),
            skipped,
            fetchers: HashMap::new(),
            clock_ahead: None,
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
            live,
            ignore: Arc::new(folder_ignore(folder)?),
        };
        Ok((engine, handle, Inbox(rx)))
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
        // However the task ends (return or panic), the daemon sees the engine stopped.
        let _stopped = StopOnDrop(self.live.clone());
        // Messages taken off the queue by a batch chain (see `remote_chain`), handled next,
        // in the order they came.
        let mut pending: VecDeque<Msg> = VecDeque::new();
        loop {
            if let Some(msg) = pending.pop_front() {
                pending.extend(self.handle(msg, &mut rx).await);
                self.live.progress();
                self.publish_status();
                continue;
            }
            let skip_wait = self.next_retry_in(crate::now_ms());
            self.live.idle();
            tokio::select! {
                biased;
                _ = cancel.cancelled() => break,
                msg = rx.recv() => {
                    let Some(msg) = msg else { break };
                    self.live.busy();
                    pending.extend(self.handle(msg, &mut rx).await);
                }
                _ = rescan.tick() => {
                    self.live.busy();
                    if let Err(e) = self.on_local(Change::Rescan).await {
                        warn!(folder = %self.id, error = %e, "periodic rescan failed");
                    }
                    self.purge_tombstones().await;
                }
                _ = tokio::time::sleep(skip_wait.unwrap_or_default()), if skip_wait.is_some() => {
                    self.live.busy();
                    if let Some(batch) = self.due_retry(crate::now_ms()) {
                        debug!(folder = %self.id, peer = %batch.peer, records = batch.records.len(), "retrying skipped changes");
                        // Nobody waits for the answer: the outcome lands in the skip list.
                        let (reply, _) = oneshot::channel();
                        pending.extend(self.remote_chain(batch, reply, &mut rx).await);
                    }
                }
                _ = retry.tick(), if !self.unstable.is_empty() || !self.held.is_empty() || self.paused.is_some() => {
                    self.live.busy();
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
        debug!(folder = %self.id, "engine stopped");
    }

    /// Handles one message; returns those it took off the queue and left for the next turn.
    async fn handle(&mut self, msg: Msg, rx: &mut mpsc::Receiver<Msg>) -> Vec<Msg> {
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
        Vec::new()
    }

    /// Remembers a peer record ahead of this node's clock for status, and logs it (at most
    /// every [`CLOCK_AHEAD_WARN_EVERY_MS`]).
    fn note_clock_ahead(&mut self, peer: &str, path: &RelPath, ahead_ms: u64, now: u64) {
        let quiet = self
            .clock_ahead
            .as_ref()
            .is_some_and(|c| now.abs_diff(c.at_ms) < CLOCK_AHEAD_WARN_EVERY_MS);
        if !quiet {
            warn!(folder = %self.id, peer = %peer, path = %path, ahead_ms, "record stamped ahead of this node's clock; applied without moving the clock");
        }
        self.clock_ahead = Some(ClockAhead {
            peer: peer.to_owned(),
            path: path.to_string(),
            ahead_ms,
            at_ms: now,
        });
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
            skipped: self
                .skipped
                .values()
                .map(|s| SkippedStatus {
                    path: s.record.path.to_string(),
                    peer: s.peer.clone(),
                    problem: s.problem.clone(),
                    attempts: s.attempts,
                    next_retry_ms: s.retry_ms,
                })
                .collect(),
            clock_ahead: self.clock_ahead.clone(),
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
        let paths: Vec<RelPath> = paths
            .into_iter()
            .filter(|p| !self.ignore.is_ignored(p))
            .collect();
        // A look is an lstat (and a hash when the stat key changed): kernel time, which
        // overlaps on several cores. Each thread takes a run of the sorted paths, so its
        // parent-directory checks are mostly its own.
        let looks: Vec<Result<Look, scan::ScanError>> = block(|| {
            let threads = par::threads_for(paths.len());
            let runs: Vec<&[RelPath]> =
                paths.chunks(paths.len().div_ceil(threads).max(1)).collect();
            par::map(&runs, threads, |run| {
                let mut parents = scan::ParentCheck::default();
                run.iter()
                    .map(|p| {
                        let look = scan::look_checked(&self.root, p, self.known(p), &mut parents);
                        // A scan of a large folder is long but never stuck: every path counts.
                        self.live.progress();
                        look
                    })
                    .collect::<Vec<_>>()
            })
            .into_iter()
            .flatten()
            .collect()
        });
        for (path, look) in paths.into_iter().zip(looks) {
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
            self.store
                .commit(&self.id, &commits, None, &SkipChanges::default())
                .await?;
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
    /// nothing queued) finishes the batch in flight first. A local change that comes
    /// meanwhile (often the watcher reporting the directories a batch created) does not end
    /// the chain: it waits, for at most [`LOCAL_DEFER_MAX`], and is handled right after the
    /// chain, as if the watcher had been that much slower; whatever it finds on disk is
    /// re-checked against the index then, as always. Returns the messages it took off the
    /// queue and did not handle, in the order they came.
    async fn remote_chain(
        &mut self,
        batch: RemoteBatch,
        reply: oneshot::Sender<Result<u64, EngineError>>,
        rx: &mut mpsc::Receiver<Msg>,
    ) -> Vec<Msg> {
        let mut queued = Some((self.prepare_checked(batch).await, reply));
        // A batch on disk and settled in memory, whose index commit waits for the next
        // batch's finish to be under way.
        let mut settled: Option<(Settled, Reply)> = None;
        // Local changes that came during the chain, merged, and since when they wait.
        let mut deferred: Option<(Change, std::time::Instant)> = None;
        // A message taken off the queue that ends the chain.
        let mut leftover: Option<Msg> = None;
        let leftovers = |deferred: Option<(Change, std::time::Instant)>, leftover: Option<Msg>| {
            deferred
                .map(|(c, _)| Msg::Local(c))
                .into_iter()
                .chain(leftover)
                .collect::<Vec<Msg>>()
        };
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
                debug!(
                    folder = %self.id,
                    deferred_local = deferred.is_some(),
                    ended_by = match &leftover {
                        _ if waited_enough(&deferred) => "local change waited long enough",
                        None => "no batch queued",
                        Some(Msg::Local(_)) => "local change",
                        Some(Msg::Remote(..)) => "batch overlapping the one before",
                        Some(Msg::Deploy(..)) => "deploy",
                        Some(Msg::Resume(_)) => "resume",
                    },
                    "batch chain ended"
                );
                return leftovers(deferred, leftover);
            };
            // While this batch finishes, the next one may arrive: stage it meanwhile (its
            // paths must not meet this batch's, and a batch that removes waits, so that a
            // removal never races a write beneath it).
            let joined = loop {
                let arrived = tokio::select! {
                    biased;
                    joined = &mut current.finishing => Err(joined),
                    msg = rx.recv() => Ok(msg),
                };
                match arrived {
                    Err(joined) => break joined,
                    Ok(Some(Msg::Local(change))) if !waited_enough(&deferred) => {
                        deferred = Some(match deferred.take() {
                            None => (change, std::time::Instant::now()),
                            Some((before, since)) => (merge_changes(before, change), since),
                        });
                    }
                    Ok(Some(Msg::Remote(b, reply)))
                        if !current.prepared.removes
                            && !waited_enough(&deferred)
                            && b.records
                                .iter()
                                .all(|r| !current.prepared.paths.contains(&r.record.path)) =>
                    {
                        queued = Some((self.prepare_checked(b).await, reply));
                        break current.finishing.await;
                    }
                    Ok(other) => {
                        leftover = other;
                        break current.finishing.await;
                    }
                }
            };
            let stream = current.prepared.stream;
            let done = self.settle_remote(current.prepared, joined);
            self.live.progress();
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
        self.live.progress();
        debug!(folder = %self.id, commit_us = t.elapsed().as_micros() as u64, "batch recorded");
        self.note_outcome(stream, &r);
        // Status shows the batch by the time its session hears back.
        self.publish_status();
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
            if let Err(e) = self
                .store
                .commit(&self.id, &commits, None, &SkipChanges::default())
                .await
            {
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
        if !batch.retry {
            self.fetchers
                .insert(batch.peer.clone(), batch.fetcher.clone());
        }
        // Every path of the batch, whatever its decision: the ones committed only when the
        // batch completes (index-only merges, disk already right) count as much as disk ops
        // for the next batch's overlap check.
        let paths: HashSet<RelPath> = batch
            .records
            .iter()
            .map(|r| r.record.path.clone())
            .collect();
        let mut stores: Vec<FileRecord> = Vec::new();
        // (record decided, record as the peer sent it, conflict copy, content source)
        let mut applies: Vec<(FileRecord, FileRecord, bool, Option<Inline>)> = Vec::new();
        for Incoming {
            record: remote,
            inline,
        } in batch.records
        {
            if self.ignore.is_ignored(&remote.path) {
                continue;
            }
            if let Some(ahead_ms) = self.replica.ahead_of_clock(&remote, now) {
                self.note_clock_ahead(&batch.peer, &remote.path, ahead_ms, now);
            }
            let mut decision = self.replica.receive(&remote, now);
            // A held file at the path is looked at even for a new file: its bytes must be
            // kept before anything replaces them.
            let look_first =
                !self.placed_without_replacing(&remote) || self.held.contains_key(&remote.path);
            if matches!(decision, Decision::Apply { .. })
                && look_first
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
                    applies.push((record, remote, conflict_copy, inline));
                }
            }
        }
        let mut fails = Failures::default();
        // Build the disk operations; what did not travel inline is fetched below.
        let mut fetches: Vec<(FileRecord, FileRecord, Hash, bool, Option<StatKey>)> = Vec::new();
        let mut ops: Vec<Op> = Vec::new();
        let mut op_meta: Vec<(FileRecord, FileRecord)> = Vec::new();
        let mut no_op: Vec<(FileRecord, bool)> = Vec::new();
        for (record, remote, conflict_copy, inline) in applies {
            let local = self.replica.get(&record.path).cloned();
            if conflict_copy {
                if let Err(e) = self
                    .keep_conflict_copy(&record, local.as_ref(), now, &batch.peer)
                    .await
                {
                    fails.note(&remote, format!("cannot keep conflict copy: {e}"), true);
                    continue;
                }
            }
            let local_live = local.as_ref().filter(|l| !l.deleted);
            // Local bytes held back by the XML gate were never shipped: when the peer's
            // version changes the file, they are kept as a conflict copy first.
            let rewrites = record.deleted
                || (record.kind == Kind::File
                    && !local_live.is_some_and(|l| l.kind == Kind::File && l.hash == record.hash));
            let held = !conflict_copy && rewrites && self.held.contains_key(&record.path);
            if held {
                if let Err(e) = self.keep_held_copy(&record, now, &batch.peer).await {
                    fails.note(
                        &remote,
                        format!("cannot keep the held local file: {e}"),
                        true,
                    );
                    continue;
                }
            }
            // What the local file must still be when it is replaced or removed: the file the
            // index knows (checked at that very moment, see `apply::Op::Write`). A held file
            // was kept just now and is replaced as it is.
            let expect = match local_live {
                Some(l) if l.kind == Kind::File && !held => self.stats.get(&record.path).copied(),
                _ => None,
            };
            let op = if record.deleted {
                match local_live.map(|l| l.kind) {
                    Some(Kind::Dir) => Some(Op::RemoveDir {
                        path: record.path.clone(),
                    }),
                    Some(Kind::File) => Some(Op::RemoveFile {
                        path: record.path.clone(),
                        expect,
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
                    fails.note(&remote, "live file without a hash".into(), false);
                    continue;
                };
                match inline {
                    // Checked against its hash at the edge; a record for other bytes (a
                    // newer version of the path) fetches instead.
                    Some(bytes) if *bytes.hash() == hash => Some(Op::Write {
                        path: record.path.clone(),
                        content: Content::Bytes(bytes.into_bytes()),
                        mode: record.mode,
                        new: local_live.is_none() && !held,
                        expect,
                    }),
                    _ => {
                        let new = local_live.is_none() && !held;
                        fetches.push((record, remote, hash, new, expect));
                        continue;
                    }
                }
            };
            match op {
                Some(op) => {
                    ops.push(op);
                    op_meta.push((record, remote));
                }
                None => {
                    let as_sent = record.version == remote.version;
                    no_op.push((record, as_sent));
                }
            }
        }
        // Contents that did not travel inline are fetched, a few at a time, while the inline
        // ones are staged on a blocking thread (the fetches write their own temp files).
        let t_staging = std::time::Instant::now();
        let removes = ops
            .iter()
            .any(|o| matches!(o, Op::RemoveFile { .. } | Op::RemoveDir { .. }));
        let staging = (!ops.is_empty()).then(|| {
            let (root, own) = (self.root.clone(), self.own.clone());
            tokio::task::spawn_blocking(move || apply::stage_batch(&root, ops, Some(&own)))
        });
        let fetched: Vec<Result<PathBuf, FetchError>> = {
            use futures_util::StreamExt;
            let jobs: Vec<_> = fetches
                .iter()
                .map(|(record, _, hash, _, _)| {
                    let (fetcher, id, path) =
                        (batch.fetcher.clone(), self.id.clone(), record.path.clone());
                    let (hash, size, mode) = (*hash, record.size, record.mode);
                    let (root, live) = (self.root.clone(), self.live.clone());
                    async move {
                        // The directory is checked (no symlink on the way) and created before
                        // a byte of the peer's content is written into it.
                        let parent = path.parent();
                        let dir = tokio::task::spawn_blocking(move || {
                            crate::fs::beneath::ensure_dir(&root, parent.as_ref())
                        })
                        .await
                        .map_err(std::io::Error::other)??;
                        let fetched = fetcher.fetch(&id, &path, hash, size, &dir, mode).await;
                        live.progress();
                        fetched
                    }
                })
                .collect();
            futures_util::stream::iter(jobs)
                .buffered(FETCHES_AT_ONCE)
                .collect()
                .await
        };
        let staged = match staging {
            Some(task) => match task.await {
                Ok(staged) => Some(staged),
                Err(e) => {
                    // A panic while staging: the fetched temp files go now; named temps the
                    // staging left behind are removed at the next start.
                    for tmp in fetched.into_iter().flatten() {
                        let _ = std::fs::remove_file(tmp);
                    }
                    return Err(EngineError::Task {
                        folder: self.id.clone(),
                        what: "staging a batch",
                        reason: e.to_string(),
                    });
                }
            },
            None => None,
        };
        let fetched_count = fetched.len();
        let mut fetched_ops: Vec<Op> = Vec::new();
        for ((record, remote, _, new, expect), r) in fetches.into_iter().zip(fetched) {
            match r {
                Ok(tmp) => {
                    fetched_ops.push(Op::Write {
                        path: record.path.clone(),
                        content: Content::Temp(tmp),
                        mode: record.mode,
                        new,
                        expect,
                    });
                    op_meta.push((record, remote));
                }
                Err(e) => {
                    let local = match &e {
                        FetchError::Local(io) => node_wide(io),
                        FetchError::Peer(_) => false,
                    };
                    fails.note(&remote, format!("fetch failed: {e}"), local);
                }
            }
        }
        let n_ops = op_meta.len();
        // The fetched contents join the staged batch after the inline ones, as `op_meta` has
        // them.
        let staged = if fetched_ops.is_empty() {
            staged
        } else {
            let more = block(|| apply::stage_batch(&self.root, fetched_ops, Some(&self.own)));
            Some(match staged {
                Some(first) => first.merge(more),
                None => more,
            })
        };
        debug!(folder = %self.id, peer = %batch.peer, ops = n_ops, fetched = fetched_count, decide_us = t_staging.duration_since(t_prepare).as_micros() as u64, fetch_and_stage_us = t_staging.elapsed().as_micros() as u64, "batch staged");
        Ok(PreparedRemote {
            peer: batch.peer,
            stream: batch.stream,
            epoch: batch.epoch,
            up_to_seq: batch.up_to_seq,
            retry: batch.retry,
            stores,
            op_meta,
            no_op,
            fails,
            staged,
            paths,
            removes,
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
            retry,
            stores,
            op_meta,
            no_op,
            mut fails,
            paths,
            ..
        } = prepared;
        // Only the exact version the peer sent has come from it (see `Origin`): a new path or
        // a dominating version, not a concurrent merge or a delete-vs-modify rewrite, which
        // the peer has not seen.
        let origin = |as_sent: bool| {
            as_sent.then(|| Origin {
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
        for ((record, remote), result) in op_meta.into_iter().zip(results) {
            match result {
                Ok(stat) => {
                    applied += 1;
                    if self.held.remove(&record.path).is_some() {
                        debug!(folder = %self.id, path = %record.path, "held file replaced by the peer's version");
                    }
                    match stat {
                        Some(s) => {
                            self.stats.insert(record.path.clone(), s);
                        }
                        None => {
                            self.stats.remove(&record.path);
                        }
                    }
                    let origin = origin(record.version == remote.version);
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
                    fails.note(&remote, e.to_string(), node_wide(&e));
                }
            }
        }
        for (record, as_sent) in no_op {
            let stat = self.stats.get(&record.path).copied();
            let origin = origin(as_sent);
            let record = self.replica.commit(record);
            commits.push(StoredRecord {
                record,
                stat,
                origin,
            });
        }
        let skips = self.skip_failures(&peer, retry, &paths, &mut fails);
        // The peer's cursor stops just before the first failure that was not skipped.
        let first = fails.0.iter().min_by_key(|f| f.record.seq);
        let applied_up_to = match first {
            Some(f) => f.record.seq.saturating_sub(1),
            None => up_to_seq,
        };
        let stream_failed = self.failed_streams.contains(&stream);
        let cursor = (!stream_failed && !retry).then_some(Cursor {
            epoch,
            seq: applied_up_to,
        });
        let outcome = match first {
            Some(f) => Err(EngineError::ApplyFailed {
                folder: self.id.clone(),
                failed: fails.0.len(),
                path: f.record.path.to_string(),
                problem: f.problem.clone(),
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
            skips,
            outcome,
        }
    }

    /// Sorts the failures of a settled batch from `peer`. A change failing for the
    /// [`SKIP_AFTER_FAILURES`]th time in a row is skipped; one already skipped (a retry, or
    /// the stream meeting it again) stays skipped, tried next after a longer wait. What
    /// remains in `fails` stops the stream. Paths of the batch that went through clear their
    /// strikes and their skip; so does another peer's skipped change the index now holds (or
    /// has overtaken). Returns the changes to the skip list, for the batch's index commit.
    fn skip_failures(
        &mut self,
        peer: &str,
        retry: bool,
        paths: &HashSet<RelPath>,
        fails: &mut Failures,
    ) -> SkipChanges {
        let mut changes = SkipChanges::default();
        let now = crate::now_ms();
        if !self.strikes.is_empty() || !self.skipped.is_empty() {
            let failed: HashSet<RelPath> = fails.0.iter().map(|f| f.record.path.clone()).collect();
            let went_through = |p: &str, path: &RelPath| {
                p == peer && paths.contains(path) && !failed.contains(path)
            };
            self.strikes.retain(|(p, path), _| !went_through(p, path));
            let replica = &self.replica;
            let overtaken = |s: &Skipped| {
                replica.get(&s.record.path).is_some_and(|r| {
                    matches!(
                        r.version.compare(&s.record.version),
                        Causality::Equal | Causality::After
                    )
                })
            };
            self.skipped.retain(|(p, path), s| {
                let keep = !(went_through(p, path) || (paths.contains(path) && overtaken(s)));
                if !keep {
                    info!(folder = %self.id, path = %path, peer = %p, "skipped change is done");
                    changes.cleared.push((p.clone(), path.clone()));
                }
                keep
            });
        }
        let mut stopping = Vec::new();
        for f in std::mem::take(&mut fails.0) {
            let key = (peer.to_owned(), f.record.path.clone());
            let (attempts, first_ms) = match self.skipped.get(&key) {
                Some(s) => (s.attempts.saturating_add(1), s.first_ms),
                // A retry of a change cleared meanwhile: nothing left to do.
                None if retry => continue,
                None if f.node_wide => {
                    stopping.push(f);
                    continue;
                }
                None => {
                    let strike = self
                        .strikes
                        .entry(key.clone())
                        .or_insert_with(|| (f.record.version.clone(), 0));
                    if strike.0 != f.record.version {
                        *strike = (f.record.version.clone(), 0);
                    }
                    strike.1 += 1;
                    if strike.1 < SKIP_AFTER_FAILURES {
                        stopping.push(f);
                        continue;
                    }
                    self.strikes.remove(&key);
                    (SKIP_AFTER_FAILURES, now)
                }
            };
            let retry_ms = skip_retry_at(now, self.opts.skip_retry_ms, attempts);
            let wait_s = retry_ms.saturating_sub(now) / 1000;
            if attempts == SKIP_AFTER_FAILURES {
                warn!(folder = %self.id, path = %f.record.path, peer = %peer, problem = %f.problem, attempts, retry_in_s = wait_s, "skipping a peer change that keeps failing; the peer's other changes go on, and status lists it until it applies");
            } else {
                info!(folder = %self.id, path = %f.record.path, peer = %peer, problem = %f.problem, attempts, retry_in_s = wait_s, "skipped change failed again");
            }
            let entry = Skipped {
                peer: peer.to_owned(),
                record: f.record,
                problem: f.problem,
                attempts,
                first_ms,
                retry_ms,
            };
            changes.set.push(entry.clone());
            self.skipped.insert(key, entry);
        }
        fails.0 = stopping;
        changes
    }

    /// A batch retrying the skipped changes of one peer that are due at `now_ms`, when that
    /// peer's content source is known (a session of it has delivered since the start) and
    /// the folder is not paused. Their next retry is pushed out at once, in memory, so that a
    /// retry that fails before it gets to them (a folder error) cannot spin; their outcome
    /// then sets it for good.
    fn due_retry(&mut self, now_ms: u64) -> Option<RemoteBatch> {
        if self.paused.is_some() {
            return None;
        }
        let fetchers = &self.fetchers;
        let due = |s: &Skipped| s.retry_ms <= now_ms && fetchers.contains_key(&s.peer);
        let peer = self.skipped.values().find(|s| due(s))?.peer.clone();
        let fetcher = fetchers.get(&peer)?.clone();
        let base = self.opts.skip_retry_ms;
        let records = self
            .skipped
            .values_mut()
            .filter(|s| s.peer == peer && due(s))
            .take(RETRY_BATCH_RECORDS)
            .map(|s| {
                s.retry_ms = skip_retry_at(now_ms, base, s.attempts);
                Incoming {
                    record: s.record.clone(),
                    inline: None,
                }
            })
            .collect();
        Some(RemoteBatch {
            peer,
            stream: rand::random::<u64>(),
            epoch: 0,
            up_to_seq: 0,
            records,
            fetcher,
            retry: true,
        })
    }

    /// How long until a skipped change is due for a retry (of a peer with a known source).
    fn next_retry_in(&self, now_ms: u64) -> Option<std::time::Duration> {
        if self.paused.is_some() {
            return None;
        }
        self.skipped
            .values()
            .filter(|s| self.fetchers.contains_key(&s.peer))
            .map(|s| s.retry_ms.saturating_sub(now_ms))
            .min()
            .map(std::time::Duration::from_millis)
    }

    /// Commits a settled batch to the index (with the peer cursor, in one transaction).
    async fn record_remote(&mut self, done: Settled) -> Result<u64, EngineError> {
        let Settled {
            peer,
            commits,
            cursor,
            applied,
            appeared,
            skips,
            outcome,
            ..
        } = done;
        self.store
            .commit(
                &self.id,
                &commits,
                cursor.map(|c| (peer.as_str(), c)),
                &skips,
            )
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
                content: Content::Bytes(data.into()),
                mode: file_mode,
                new: false,
                // The database is the authority for deployed files: replaced as they are.
                expect: None,
            });
        }
        for path in request.removes {
            paths.insert(path.clone());
            ops.push(Op::RemoveFile { path, expect: None });
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
        let writer = self.name_of(local.stamp.node);
        let winner_name = self.name_of(winner.stamp.node);
        let warning =
            "conflict: concurrent change elsewhere wins; local version kept as a conflict copy";
        let stamp_ms = Hlc::millis(local.stamp.hlc);
        self.keep_copy_of(
            &local.path,
            &writer,
            stamp_ms,
            winner_name,
            now,
            peer,
            warning,
        )
        .await
    }

    /// Keeps the local bytes of a file held back by the XML gate, which a peer's version is
    /// about to replace (or delete), as a conflict copy named after this node and the file's
    /// modification time.
    async fn keep_held_copy(
        &mut self,
        winner: &FileRecord,
        now: u64,
        peer: &str,
    ) -> Result<(), std::io::Error> {
        let writer = self.opts.node_name.clone();
        let winner_name = self.name_of(winner.stamp.node);
        let warning = "a peer's version replaces a local file held back as not well-formed; the local bytes are kept as a conflict copy";
        // Named by the file's mtime: the same bytes met again make the same name.
        let full = self.root.join(winner.path.as_str());
        let mtime_ms = std::fs::symlink_metadata(&full)
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(now, |d| d.as_millis() as u64);
        self.keep_copy_of(
            &winner.path,
            &writer,
            mtime_ms,
            winner_name,
            now,
            peer,
            warning,
        )
        .await
    }

    /// The human name of a node, as far as this node knows it.
    fn name_of(&self, id: NodeId) -> String {
        if id == self.opts.node {
            return self.opts.node_name.clone();
        }
        self.opts
            .names
            .lock()
            .ok()
            .and_then(|m| m.get(&id).cloned())
            .unwrap_or_else(|| id.to_string())
    }

    /// Copies the file at `path` to `conflicts/<folder>/<path>.<writer>.<stamp_ms>` and logs
    /// the copy; nothing when the file is gone, or when the same bytes were kept under that
    /// name before (a batch prepared, abandoned and retried meets its conflict twice).
    #[allow(clippy::too_many_arguments)]
    async fn keep_copy_of(
        &mut self,
        path: &RelPath,
        writer: &str,
        stamp_ms: u64,
        winner_name: String,
        now: u64,
        peer: &str,
        warning: &str,
    ) -> Result<(), std::io::Error> {
        let dest = self
            .opts
            .conflicts_dir
            .join(&self.id)
            .join(format!("{path}.{writer}.{stamp_ms}"));
        let src = self.root.join(path.as_str());
        let dest = match block(|| apply::keep_copy(&src, &dest))? {
            apply::Kept::New(dest) => dest,
            apply::Kept::Already(dest) => {
                debug!(folder = %self.id, path = %path, copy = %dest.display(), "conflict copy kept before");
                return Ok(());
            }
            apply::Kept::Gone => return Ok(()),
        };
        warn!(folder = %self.id, path = %path, peer = %peer, copy = %dest.display(), "{warning}");
        self.conflicts += 1;
        let entry = ConflictEntry {
            folder: self.id.clone(),
            path: path.to_string(),
            copy: dest.display().to_string(),
            winner_node: winner_name,
            created_ms: now,
        };
        if let Err(e) = self.store.add_conflict(&entry).await {
            warn!(folder = %self.id, error = %e, "cannot log conflict in the index");
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
        skip_retry_ms: config.skip_retry_ms,
        peers: config.peers.iter().map(|p| p.name.clone()).collect(),
        max_clock_skew_ms: config.max_clock_skew_ms,
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
            _size: u64,
            _dir: &'a Path,
            _mode: u32,
        ) -> Fetching<'a> {
            Box::pin(async { Err(FetchError::Peer("peer is gone".to_owned())) })
        }
    }

    /// A peer that serves one file's bytes.
    struct Serve(Vec<u8>);

    impl Fetcher for Serve {
        fn fetch<'a>(
            &'a self,
            _folder: &'a str,
            _path: &'a RelPath,
            hash: Hash,
            _size: u64,
            dir: &'a Path,
            mode: u32,
        ) -> Fetching<'a> {
            Box::pin(async move {
                if *blake3::hash(&self.0).as_bytes() != hash {
                    return Err(FetchError::Peer("not the bytes asked for".to_owned()));
                }
                let (mut f, tmp) = apply::create_temp(dir, mode)?;
                std::io::Write::write_all(&mut f, &self.0)?;
                Ok(tmp)
            })
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
            retry: false,
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
        engine_with(dir, 60_000, &["gw2"]).await
    }

    async fn engine_with(
        dir: &Path,
        skip_retry_ms: u64,
        peers: &[&str],
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
            skip_retry_ms,
            peers: peers.iter().map(|p| p.to_string()).collect(),
            max_clock_skew_ms: crate::model::DEFAULT_MAX_CLOCK_SKEW_MS,
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

    #[test]
    fn merged_changes_keep_every_path_and_a_rescan_wins() {
        let p = |s: &str| RelPath::new(s).expect("valid");
        assert_eq!(
            merge_changes(
                Change::Paths(vec![p("a.xml")]),
                Change::Paths(vec![p("b.xml"), p("a.xml")])
            ),
            Change::Paths(vec![p("a.xml"), p("b.xml"), p("a.xml")])
        );
        assert_eq!(
            merge_changes(Change::Paths(vec![p("a.xml")]), Change::Rescan),
            Change::Rescan
        );
        assert_eq!(
            merge_changes(Change::Rescan, Change::Paths(vec![p("a.xml")])),
            Change::Rescan
        );
    }

    #[test]
    fn a_deferred_local_change_ends_the_chain_once_it_waited_long_enough() {
        let now = std::time::Instant::now();
        let change = || Change::Paths(Vec::new());
        assert!(!waited_enough(&None));
        assert!(!waited_enough(&Some((change(), now))));
        let long_ago = now
            .checked_sub(LOCAL_DEFER_MAX)
            .expect("the monotonic clock is past its origin");
        assert!(waited_enough(&Some((change(), long_ago))));
    }

    /// A local change queued between two peer batches waits for the chain, and is recorded
    /// right after it: deferring it must never lose it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_local_change_between_peer_batches_is_recorded_after_them() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (handle, store, cancel, task) = engine_on(dir.path()).await;
        let root = dir.path().join("root");
        let many: Vec<Incoming> = (0..300)
            .map(|i| {
                remote_file(
                    &format!("d/{i}.xml"),
                    format!("<d n=\"{i}\"/>").as_bytes(),
                    1 + i,
                    true,
                )
            })
            .collect();
        let first = handle
            .queue_remote(batch(4, 300, many))
            .await
            .expect("queued");
        std::fs::write(root.join("mine.xml"), b"<mine/>").expect("local write");
        let mine = RelPath::new("mine.xml").expect("valid");
        handle
            .local(Change::Paths(vec![mine.clone()]))
            .await
            .expect("local change queued");
        let second = handle
            .queue_remote(batch(
                4,
                301,
                vec![remote_file("z.xml", b"<z/>", 301, true)],
            ))
            .await
            .expect("queued");
        assert_eq!(first.await.expect("first applied"), 300);
        assert_eq!(second.await.expect("second applied"), 301);
        // A message with an answer is handled after everything a chain left over.
        handle.resume().await.expect("engine answers");
        let rows = store
            .since("synapse-configs", 0, 10_000, None)
            .await
            .expect("since");
        let local = rows
            .iter()
            .find(|r| r.record.path == mine)
            .expect("the local file is in the index");
        assert!(!local.record.deleted);
        assert_eq!(local.origin, None, "recorded as this node's own change");
        assert!(rows.iter().any(|r| r.record.path.as_str() == "z.xml"));
        assert_eq!(
            std::fs::read(root.join("d/299.xml")).expect("d"),
            b"<d n=\"299\"/>"
        );
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

    /// A peer that serves one file's bytes, but first lets a local program write the target:
    /// the write lands after the batch was decided and before the peer's version is put in
    /// place (the window of issue 12's lost writes).
    struct WriteLocallyFirst {
        bytes: Vec<u8>,
        target: PathBuf,
        local: Vec<u8>,
        replace_by_rename: bool,
    }

    impl Fetcher for WriteLocallyFirst {
        fn fetch<'a>(
            &'a self,
            folder: &'a str,
            path: &'a RelPath,
            hash: Hash,
            _size: u64,
            dir: &'a Path,
            mode: u32,
        ) -> Fetching<'a> {
            Box::pin(async move {
                if self.replace_by_rename {
                    let tmp = self.target.with_extension("editor-tmp");
                    std::fs::write(&tmp, &self.local)?;
                    std::fs::rename(&tmp, &self.target)?;
                } else {
                    std::fs::write(&self.target, &self.local)?;
                }
                Serve(self.bytes.clone())
                    .fetch(folder, path, hash, _size, dir, mode)
                    .await
            })
        }
    }

    fn remote_update(path: &str, bytes: &[u8], seq: u64, writes: u64) -> Incoming {
        let mut inc = remote_file(path, bytes, seq, false);
        for _ in 1..writes {
            inc.record.version.bump(PEER);
        }
        inc
    }

    /// Regression (issue 12, item 0): a local write that lands while a peer's version of the
    /// same file is on its way is never replaced: the apply sees the file changed at the very
    /// moment of the rename, puts it back, and the peer's version then meets it as a
    /// concurrent change. Both ways of writing are covered: in place, and by rename.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_local_write_landing_while_a_peer_version_is_fetched_is_not_lost() {
        for replace_by_rename in [false, true] {
            let dir = tempfile::tempdir().expect("tempdir");
            let (handle, store, cancel, task) = engine_on(dir.path()).await;
            let root = dir.path().join("root");
            let target = root.join("x.xml");
            handle
                .remote(batch(1, 1, vec![remote_file("x.xml", b"<v1/>", 1, true)]))
                .await
                .expect("v1 applies");
            assert_eq!(std::fs::read(&target).expect("x.xml"), b"<v1/>");
            let local = b"<local edit made meanwhile/>".to_vec();
            let racing = Arc::new(WriteLocallyFirst {
                bytes: b"<v2 from the peer/>".to_vec(),
                target: target.clone(),
                local: local.clone(),
                replace_by_rename,
            });
            let v2 = || remote_update("x.xml", b"<v2 from the peer/>", 2, 2);
            let mut b = batch(2, 2, vec![v2()]);
            b.fetcher = racing;
            let first = handle.remote(b).await;
            assert!(
                matches!(first, Err(EngineError::ApplyFailed { .. })),
                "the replacement must fail on the changed file, got {first:?}"
            );
            assert_eq!(
                std::fs::read(&target).expect("x.xml"),
                local,
                "the local edit stays in place (rename: {replace_by_rename})"
            );
            // The session comes back on a new stream; the engine looked at the file after the
            // failure, so the peer's version is now concurrent with the local edit.
            let mut again = batch(3, 2, vec![v2()]);
            again.fetcher = Arc::new(Serve(b"<v2 from the peer/>".to_vec()));
            handle.remote(again).await.expect("decided the second time");
            let on_disk = std::fs::read(&target).expect("x.xml");
            let copies: Vec<Vec<u8>> = walkdir::WalkDir::new(dir.path().join("conflicts"))
                .into_iter()
                .filter_map(Result::ok)
                .filter(|e| e.file_type().is_file())
                .filter_map(|e| std::fs::read(e.path()).ok())
                .collect();
            assert!(
                on_disk == local || copies.contains(&local),
                "the local edit is lost: disk has {:?}, conflict copies {:?}",
                String::from_utf8_lossy(&on_disk),
                copies.len()
            );
            let rows = store
                .since("synapse-configs", 0, 10, None)
                .await
                .expect("index");
            let x = rows
                .iter()
                .find(|r| r.record.path.as_str() == "x.xml")
                .expect("indexed");
            assert_eq!(
                x.record.hash,
                Some(*blake3::hash(&on_disk).as_bytes()),
                "the index says what the disk has"
            );
            cancel.cancel();
            task.await.expect("engine task");
        }
    }

    /// The same for a peer's delete: a file edited after the delete was decided is not
    /// removed.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_local_write_landing_before_a_peer_delete_is_not_lost() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().join("root");
        let target = root.join("d.xml");
        // The file to delete is applied, then a batch deletes it and brings a large file
        // whose fetch lets the local edit land before the batch is finished.
        let (handle, _store, cancel, task) = engine_on(dir.path()).await;
        handle
            .remote(batch(1, 1, vec![remote_file("d.xml", b"<d/>", 1, true)]))
            .await
            .expect("applies");
        let mut delete = remote_update("d.xml", b"<d/>", 2, 2);
        delete.record.deleted = true;
        delete.record.hash = None;
        delete.record.size = 0;
        let local = b"<edited before the delete landed/>".to_vec();
        let mut b = batch(
            2,
            3,
            vec![delete, remote_file("big.xml", b"<big/>", 3, false)],
        );
        b.fetcher = Arc::new(WriteLocallyFirst {
            bytes: b"<big/>".to_vec(),
            target: target.clone(),
            local: local.clone(),
            replace_by_rename: false,
        });
        let r = handle.remote(b).await;
        assert!(
            matches!(r, Err(EngineError::ApplyFailed { .. })),
            "the removal must fail on the changed file, got {r:?}"
        );
        assert_eq!(std::fs::read(&target).expect("still there"), local);
        assert!(
            root.join("big.xml").exists(),
            "the rest of the batch landed"
        );
        cancel.cancel();
        task.await.expect("engine task");
    }

    /// Feeds the batch that fails at `big.xml` (its content cannot be fetched) on `streams`
    /// fresh streams, as a session resubscribing after each failure does; returns the answers.
    async fn fail_big_on_streams(
        handle: &FolderHandle,
        streams: std::ops::Range<u64>,
    ) -> Vec<Result<u64, EngineError>> {
        let mut answers = Vec::new();
        for stream in streams {
            answers.push(
                handle
                    .remote(batch(
                        stream,
                        3,
                        vec![
                            remote_file("a.xml", b"<a/>", 1, true),
                            remote_file("big.xml", b"<big/>", 2, false),
                            remote_file("c.xml", b"<c/>", 3, true),
                        ],
                    ))
                    .await,
            );
        }
        answers
    }

    /// Polls the folder's status until `done` holds; bounded, so a missing retry fails.
    async fn status_until(handle: &FolderHandle, done: impl Fn(&FolderStatus) -> bool) -> bool {
        for _ in 0..500 {
            if done(&handle.status()) {
                return true;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        false
    }

    /// A change that fails three times in a row stops its stream twice, then is skipped: the
    /// cursor moves past it, the rest applies, status and the index list it, and a retry
    /// applies it once its content can be had (the skip is then gone from both).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_change_failing_three_times_is_skipped_and_retried_until_it_applies() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (handle, store, cancel, task) = engine_with(dir.path(), 150, &["gw2"]).await;
        let root = dir.path().join("root");
        let answers = fail_big_on_streams(&handle, 1..4).await;
        assert!(
            matches!(answers[0], Err(EngineError::ApplyFailed { .. }))
                && matches!(answers[1], Err(EngineError::ApplyFailed { .. })),
            "the first two failures stop the stream: {answers:?}"
        );
        assert_eq!(answers[2].as_ref().ok(), Some(&3), "the third is skipped");
        assert_eq!(std::fs::read(root.join("c.xml")).expect("c.xml"), b"<c/>");
        assert!(!root.join("big.xml").exists());
        let cursor = store
            .cursor("gw2", "synapse-configs")
            .await
            .expect("cursor");
        assert_eq!(cursor.seq, 3, "the cursor moved past the skipped change");
        let skipped = handle.status().skipped;
        assert_eq!(skipped.len(), 1, "{skipped:?}");
        assert_eq!(
            (
                skipped[0].path.as_str(),
                skipped[0].peer.as_str(),
                skipped[0].attempts
            ),
            ("big.xml", "gw2", SKIP_AFTER_FAILURES)
        );
        assert!(skipped[0].problem.contains("peer is gone"), "{skipped:?}");
        let kept = store.skipped("synapse-configs").await.expect("skipped");
        assert_eq!(kept.len(), 1);
        assert_eq!(kept[0].record.seq, 2, "kept as the peer sent it");
        // The peer's content source stays broken: the retry fails again, later and later.
        assert!(
            status_until(&handle, |s| s
                .skipped
                .first()
                .is_some_and(|k| k.attempts > 4))
            .await,
            "retries happen and count: {:?}",
            handle.status().skipped
        );
        // A new session of the peer brings a source that has the bytes: the retry applies.
        let mut b = batch(9, 4, vec![remote_file("d.xml", b"<d/>", 4, true)]);
        b.fetcher = Arc::new(Serve(b"<big/>".to_vec()));
        assert_eq!(handle.remote(b).await.expect("applies"), 4);
        assert!(
            status_until(&handle, |s| s.skipped.is_empty()).await,
            "the retry applies: {:?}",
            handle.status().skipped
        );
        assert_eq!(
            std::fs::read(root.join("big.xml")).expect("big.xml"),
            b"<big/>"
        );
        assert!(
            store
                .skipped("synapse-configs")
                .await
                .expect("skipped")
                .is_empty()
        );
        assert_eq!(
            store
                .cursor("gw2", "synapse-configs")
                .await
                .expect("cursor")
                .seq,
            4,
            "a retry moves no cursor"
        );
        cancel.cancel();
        task.await.expect("engine task");
    }

    /// A skipped change survives a restart, and a newer version of the path from the same
    /// peer takes its place: once that applies, nothing is skipped any more.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_skipped_change_survives_a_restart_and_a_newer_version_clears_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().join("root");
        {
            let (handle, _store, cancel, task) = engine_on(dir.path()).await;
            let answers = fail_big_on_streams(&handle, 1..4).await;
            assert_eq!(answers[2].as_ref().ok(), Some(&3), "{answers:?}");
            cancel.cancel();
            task.await.expect("engine task");
        }
        let (handle, store, cancel, task) = engine_on(dir.path()).await;
        assert_eq!(handle.status().skipped.len(), 1, "kept across the restart");
        let mut newer = remote_file("big.xml", b"<big v='2'/>", 5, true);
        newer.record.version.bump(PEER);
        assert_eq!(
            handle
                .remote(batch(4, 5, vec![newer]))
                .await
                .expect("applies"),
            5
        );
        assert!(handle.status().skipped.is_empty());
        assert!(
            store
                .skipped("synapse-configs")
                .await
                .expect("skipped")
                .is_empty()
        );
        assert_eq!(
            std::fs::read(root.join("big.xml")).expect("big.xml"),
            b"<big v='2'/>"
        );
        cancel.cancel();
        task.await.expect("engine task");
    }

    /// A peer taken out of the config never sends its skipped changes again: they are
    /// dropped at start, from status and from the index.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn skipped_changes_of_a_peer_no_longer_configured_are_dropped() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let (handle, _store, cancel, task) = engine_on(dir.path()).await;
            let answers = fail_big_on_streams(&handle, 1..4).await;
            assert_eq!(answers[2].as_ref().ok(), Some(&3), "{answers:?}");
            cancel.cancel();
            task.await.expect("engine task");
        }
        let (handle, store, cancel, task) = engine_with(dir.path(), 60_000, &["gw3"]).await;
        assert!(handle.status().skipped.is_empty());
        assert!(
            store
                .skipped("synapse-configs")
                .await
                .expect("skipped")
                .is_empty()
        );
        cancel.cancel();
        task.await.expect("engine task");
    }

    #[test]
    fn only_trouble_of_the_path_lets_a_change_be_skipped() {
        use nix::libc;
        let os = std::io::Error::from_raw_os_error;
        for code in [libc::ENOSPC, libc::EDQUOT, libc::EROFS, libc::EIO] {
            assert!(node_wide(&os(code)), "errno {code}");
        }
        for code in [
            libc::EACCES,
            libc::EPERM,
            libc::EEXIST,
            libc::ENOTDIR,
            libc::ENAMETOOLONG,
        ] {
            assert!(!node_wide(&os(code)), "errno {code}");
        }
        assert!(!node_wide(&std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            "refusing to write through a symlink"
        )));
        assert!(node_wide(&std::io::Error::other("apply task failed")));
    }

    #[test]
    fn skip_retries_double_from_the_base_and_stop_at_an_hour() {
        let at = |attempts| skip_retry_at(1_000, 60_000, attempts) - 1_000;
        assert_eq!(at(SKIP_AFTER_FAILURES), 60_000);
        assert_eq!(at(SKIP_AFTER_FAILURES + 1), 120_000);
        assert_eq!(at(SKIP_AFTER_FAILURES + 3), 480_000);
        assert_eq!(at(SKIP_AFTER_FAILURES + 6), 3_600_000);
        assert_eq!(at(u32::MAX), 3_600_000);
    }

    /// Local bytes held back by the XML gate were never shipped: a peer's version that
    /// replaces them (a new file at that path, or a newer version of a known file) keeps them
    /// as a conflict copy first, and the path is no longer held.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_peer_version_replacing_a_held_file_keeps_the_local_bytes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().join("root");
        std::fs::create_dir_all(&root).expect("mkdir");
        std::fs::write(root.join("new.xml"), b"<api").expect("write");
        let (handle, store, cancel, task) = engine_on(dir.path()).await;
        assert!(handle.status().held.contains_key("new.xml"));
        let applied = handle
            .remote(batch(
                1,
                1,
                vec![remote_file("new.xml", b"<api/>", 1, true)],
            ))
            .await
            .expect("a new file replaces the held one");
        assert_eq!(applied, 1);
        assert_eq!(
            std::fs::read(root.join("new.xml")).expect("new.xml"),
            b"<api/>"
        );

        handle
            .remote(batch(
                1,
                2,
                vec![remote_file("known.xml", b"<v1/>", 2, true)],
            ))
            .await
            .expect("applies");
        std::fs::write(root.join("known.xml"), b"<v1").expect("write");
        handle
            .local(Change::Paths(vec![
                RelPath::new("known.xml").expect("valid"),
            ]))
            .await
            .expect("queued");
        assert!(
            status_until(&handle, |s| s.held.contains_key("known.xml")).await,
            "the broken edit is held"
        );
        let mut v2 = remote_file("known.xml", b"<v2/>", 3, true);
        v2.record.version.bump(PEER);
        handle
            .remote(batch(1, 3, vec![v2]))
            .await
            .expect("the newer version applies");
        assert_eq!(
            std::fs::read(root.join("known.xml")).expect("known.xml"),
            b"<v2/>"
        );

        let mut kept: Vec<(String, Vec<u8>)> = store
            .conflicts()
            .await
            .expect("conflicts")
            .into_iter()
            .map(|c| (c.path, std::fs::read(&c.copy).expect("the copy is there")))
            .collect();
        kept.sort();
        assert_eq!(
            kept,
            vec![
                ("known.xml".to_owned(), b"<v1".to_vec()),
                ("new.xml".to_owned(), b"<api".to_vec()),
            ]
        );
        let status = handle.status();
        assert!(status.held.is_empty(), "{:?}", status.held);
        assert_eq!(status.conflicts, 2);
        cancel.cancel();
        task.await.expect("engine task");
    }

    /// A peer that serves one file's bytes once the test opens its gate: the engine stays
    /// busy in the fetch until then.
    struct Gated {
        bytes: Vec<u8>,
        gate: tokio::sync::Semaphore,
    }

    impl Fetcher for Gated {
        fn fetch<'a>(
            &'a self,
            folder: &'a str,
            path: &'a RelPath,
            hash: Hash,
            _size: u64,
            dir: &'a Path,
            mode: u32,
        ) -> Fetching<'a> {
            Box::pin(async move {
                let _open = self
                    .gate
                    .acquire()
                    .await
                    .map_err(|e| FetchError::Peer(e.to_string()))?;
                Serve(self.bytes.clone())
                    .fetch(folder, path, hash, _size, dir, mode)
                    .await
            })
        }
    }

    async fn liveness_until(
        handle: &FolderHandle,
        done: impl Fn(&liveness::Snapshot) -> bool,
    ) -> liveness::Snapshot {
        for _ in 0..500 {
            let s = handle.liveness();
            if done(&s) {
                return s;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        panic!("liveness never got there; last: {:?}", handle.liveness());
    }

    /// The engine shows busy while it works on a batch (here: a fetch that hangs until the
    /// test lets it go), is judged stalled when that lasts past the limit, and shows progress
    /// and idle once the batch is done.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_engine_is_busy_while_it_works_idle_after_and_progress_moves() {
        use crate::liveness::{Activity, Verdict, judge, mono_ms};
        let dir = tempfile::tempdir().expect("tempdir");
        let (handle, _store, cancel, task) = engine_on(dir.path()).await;
        liveness_until(&handle, |s| s.activity == Activity::Idle).await;

        let bytes = b"<api name=\"big\"/>".to_vec();
        let fetcher = Arc::new(Gated {
            bytes: bytes.clone(),
            gate: tokio::sync::Semaphore::new(0),
        });
        let mut b = batch(3, 1, vec![remote_file("big.xml", &bytes, 1, false)]);
        b.fetcher = fetcher.clone();
        let answer = handle.queue_remote(b).await.expect("queued");
        let stuck = liveness_until(&handle, |s| s.activity == Activity::Busy).await;
        // Let the clock move past the last progress: a 1 ms limit is then exceeded.
        let limit = std::time::Duration::from_millis(1);
        for _ in 0..500 {
            if mono_ms() > stuck.progress_ms + 1 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
        let now = handle.liveness();
        assert_eq!(
            now.progress_ms, stuck.progress_ms,
            "no progress while stuck"
        );
        assert_eq!(judge(&now, mono_ms(), limit), Verdict::Stalled);

        fetcher.gate.add_permits(1);
        assert_eq!(answer.await.expect("applied"), 1);
        let after = liveness_until(&handle, |s| s.activity == Activity::Idle).await;
        assert!(
            after.progress_ms > stuck.progress_ms,
            "the fetch, the settled batch and the handled message count as progress: {stuck:?} -> {after:?}"
        );
        assert_eq!(judge(&after, mono_ms(), limit), Verdict::Idle);

        cancel.cancel();
        task.await.expect("engine task");
        assert_eq!(handle.liveness().activity, Activity::Stopped);
    }

    /// An engine whose task dies (here: aborted, as a panic unwinds it) shows as stopped.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_engine_whose_task_dies_shows_as_stopped() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (handle, _store, _cancel, task) = engine_on(dir.path()).await;
        // Running (an async fn's body, and its guard, exist once it is first polled): it
        // answers a message.
        handle.resume().await.expect("the engine answers");
        task.abort();
        assert!(task.await.is_err_and(|e| e.is_cancelled()));
        let r = handle.engine_report(liveness::mono_ms(), liveness::ENGINE_STALL_LIMIT);
        assert_eq!(r.state, liveness::Verdict::Stopped);
        assert!(r.is_failing());
    }
}
