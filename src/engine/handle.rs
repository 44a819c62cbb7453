//! The engine's edge to the rest of the node: the cloneable [`FolderHandle`], the messages
//! it sends, what a peer batch carries ([`RemoteBatch`], [`Incoming`], [`Inline`]), the content
//! source of a peer ([`Fetcher`]), and what a peer may fetch ([`FolderHandle::open_for_peer`]).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use tokio::sync::{mpsc, oneshot, watch};

use crate::engine::FolderStatus;
use crate::fs::ignore::Ignore;
use crate::fs::scan;
use crate::fs::watch::Change;
use crate::liveness;
use crate::liveness::{EngineReport, Liveness};
use crate::model::{FileRecord, FolderId, Hash, PeerName, RelPath};
use crate::store::{Cursor, Store, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("folder {folder} is paused: {reason}")]
    Paused { folder: FolderId, reason: String },
    #[error(
        "folder {folder}: {failed} of the peer's changes could not be applied yet (first: {path}: {problem})"
    )]
    ApplyFailed {
        folder: FolderId,
        failed: usize,
        path: String,
        problem: String,
    },
    #[error("folder {folder}: {source}")]
    Scan {
        folder: FolderId,
        source: scan::ScanError,
    },
    #[error("folder engine {0} has stopped")]
    Stopped(FolderId),
    #[error("folder {folder}: {what} did not finish: {reason}")]
    Task {
        folder: FolderId,
        what: &'static str,
        reason: String,
    },
    #[error(
        "folder {folder}: the index cannot be written ({reason}); no change is taken until it can"
    )]
    IndexUnwritable { folder: FolderId, reason: String },
    #[error(
        "folder {folder}: an earlier batch from peer {peer} on this stream failed; resubscribing"
    )]
    StreamFailed { folder: FolderId, peer: PeerName },
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
    pub peer: PeerName,
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

/// The engine's message queues, handed from [`FolderEngine::open`] to [`FolderEngine::run`].
/// Local changes have a queue of their own, read first: a change made on this node is seen
/// at once, not behind the peer batches queued before it (in a busy mesh, dozens of them,
/// each up to thousands of records, which had a local edit wait seconds to be recorded).
pub struct Inbox {
    pub(in crate::engine) msgs: mpsc::Receiver<Msg>,
    pub(in crate::engine) local: mpsc::Receiver<Change>,
}

impl Inbox {
    /// The next message: the local changes queued, merged into one, before anything else.
    /// `None` once every handle is gone.
    pub(in crate::engine) async fn recv(&mut self) -> Option<Msg> {
        let change = tokio::select! {
            biased;
            Some(change) = self.local.recv() => change,
            msg = self.msgs.recv() => return msg,
        };
        let mut merged = change;
        while let Ok(more) = self.local.try_recv() {
            merged = super::local::merge_changes(merged, more);
        }
        Some(Msg::Local(merged))
    }
}

pub(in crate::engine) enum Msg {
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

/// Cheap, cloneable access to a running folder engine.
#[derive(Clone)]
pub struct FolderHandle {
    pub id: FolderId,
    pub(in crate::engine) root: PathBuf,
    pub epoch: u64,
    pub(in crate::engine) store: Store,
    pub(in crate::engine) tx: mpsc::Sender<Msg>,
    /// Local changes (see [`Inbox`]).
    pub(in crate::engine) local_tx: mpsc::Sender<Change>,
    pub(in crate::engine) seq: watch::Receiver<u64>,
    pub(in crate::engine) status: Arc<Mutex<FolderStatus>>,
    pub(in crate::engine) live: Arc<Liveness>,
    /// The folder's ignore rules: an ignored path is never served to a peer.
    pub(in crate::engine) ignore: Arc<Ignore>,
    /// Cursors the engine has not written to the index yet (see [`super::LazyCursors`]).
    pub(in crate::engine) lazy_cursors: super::LazyCursors,
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

    /// Where `peer`'s stream of this folder stands here: its epoch and the last sequence
    /// applied from it.
    pub async fn cursor(&self, peer: &str) -> Result<Cursor, StoreError> {
        let lazy = self
            .lazy_cursors
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(peer)
            .copied();
        match lazy {
            // Newer than the index's: the engine drops it once a later commit writes one.
            Some(c) => Ok(c),
            None => self.store.cursor(peer, &self.id).await,
        }
    }

    /// Sends local changes (from the watcher or a timer).
    pub async fn local(&self, change: Change) -> Result<(), EngineError> {
        self.local_tx
            .send(change)
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
