//! Helpers shared by the engine's tests: peers that serve or refuse contents, records and
//! batches from a peer, an engine on a temp dir.

use super::*;
use std::path::Path;

use crate::liveness;
use crate::model::{FileRecord, FolderId, Hlc, Kind, PeerName, Stamp, VersionVector};
use crate::store::{Origin, StoredRecord};

/// A peer whose content cannot be fetched.
pub(crate) struct NoFetch;

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
pub(crate) struct Serve(pub(crate) Vec<u8>);

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

pub(crate) const PEER: NodeId = NodeId(77);

pub(crate) fn remote_file(path: &str, bytes: &[u8], seq: u64, inline: bool) -> Incoming {
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

pub(crate) fn batch(stream: u64, up_to_seq: u64, records: Vec<Incoming>) -> RemoteBatch {
    RemoteBatch {
        peer: PeerName::literal("gw2"),
        stream,
        epoch: 5,
        up_to_seq,
        records,
        fetcher: Arc::new(NoFetch),
        retry: false,
    }
}

pub(crate) async fn engine_on(
    dir: &Path,
) -> (
    FolderHandle,
    Store,
    CancellationToken,
    tokio::task::JoinHandle<()>,
) {
    engine_with(dir, 60_000, &["gw2"]).await
}

pub(crate) async fn engine_with(
    dir: &Path,
    skip_retry_ms: u64,
    peers: &[&str],
) -> (
    FolderHandle,
    Store,
    CancellationToken,
    tokio::task::JoinHandle<()>,
) {
    engine_told_by(dir, skip_retry_ms, peers, Arc::new(OwnWrites::default())).await
}

/// [`engine_on`], with the record the folder's watcher would share (to play a local writer
/// the watcher has seen).
pub(crate) async fn engine_watched(
    dir: &Path,
) -> (
    FolderHandle,
    Store,
    CancellationToken,
    tokio::task::JoinHandle<()>,
    Arc<OwnWrites>,
) {
    let own = Arc::new(OwnWrites::default());
    let (handle, store, cancel, task) = engine_told_by(dir, 60_000, &["gw2"], own.clone()).await;
    (handle, store, cancel, task, own)
}

async fn engine_told_by(
    dir: &Path,
    skip_retry_ms: u64,
    peers: &[&str],
    own: Arc<OwnWrites>,
) -> (
    FolderHandle,
    Store,
    CancellationToken,
    tokio::task::JoinHandle<()>,
) {
    let (engine, handle, inbox, store) = engine_opened(dir, skip_retry_ms, peers, own).await;
    let (cancel, task) = run_engine(engine, inbox);
    (handle, store, cancel, task)
}

/// An engine opened and scanned, not running yet: messages sent to its handle wait in its
/// queues until [`run_engine`].
pub(crate) async fn engine_opened(
    dir: &Path,
    skip_retry_ms: u64,
    peers: &[&str],
    own: Arc<OwnWrites>,
) -> (FolderEngine, FolderHandle, Inbox, Store) {
    let root = dir.join("root");
    std::fs::create_dir_all(&root).expect("mkdir");
    let store = Store::open(dir).await.expect("store");
    let folder = FolderConfig {
        id: FolderId::literal("synapse-configs"),
        path: root,
        ignore: Vec::new(),
        xml_gate: true,
    };
    let opts = EngineOptions {
        node: NodeId(1),
        names: NodeNames::default(),
        node_name: PeerName::literal("gw1"),
        conflicts_dir: dir.join("conflicts"),
        tombstone_ttl_ms: 1000,
        skip_retry_ms,
        peers: peers
            .iter()
            .map(|p| PeerName::new(*p).expect("a valid test peer name"))
            .collect(),
        max_clock_skew_ms: crate::model::DEFAULT_MAX_CLOCK_SKEW_MS,
        metrics: Default::default(),
    };
    let (mut engine, handle, inbox) = FolderEngine::open_with(&folder, store.clone(), opts, own)
        .await
        .expect("open");
    engine.initial_scan().await.expect("scan");
    (engine, handle, inbox, store)
}

/// Runs an engine of [`engine_opened`] (no rescans, no retry ticks).
pub(crate) fn run_engine(
    engine: FolderEngine,
    inbox: Inbox,
) -> (CancellationToken, tokio::task::JoinHandle<()>) {
    let cancel = CancellationToken::new();
    let task = tokio::spawn(engine.run(
        inbox,
        std::time::Duration::from_secs(3600),
        std::time::Duration::from_secs(3600),
        cancel.clone(),
    ));
    (cancel, task)
}

/// The index row of `path`, as stored.
pub(crate) async fn row_of(store: &Store, path: &str) -> StoredRecord {
    store
        .load_folder("synapse-configs")
        .await
        .expect("index")
        .into_iter()
        .find(|r| r.record.path.as_str() == path)
        .unwrap_or_else(|| panic!("{path} is not in the index"))
}

/// What `batch` says it came from.
pub(crate) fn gw2_epoch_5() -> Option<Origin> {
    Some(Origin {
        peer: "gw2".into(),
        epoch: 5,
    })
}

pub(crate) fn remote_update(path: &str, bytes: &[u8], seq: u64, writes: u64) -> Incoming {
    let mut inc = remote_file(path, bytes, seq, false);
    for _ in 1..writes {
        inc.record.version.bump(PEER);
    }
    inc
}

/// Feeds the batch that fails at `big.xml` (its content cannot be fetched) on `streams`
/// fresh streams, as a session resubscribing after each failure does; returns the answers.
pub(crate) async fn fail_big_on_streams(
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
pub(crate) async fn status_until(
    handle: &FolderHandle,
    done: impl Fn(&FolderStatus) -> bool,
) -> bool {
    for _ in 0..500 {
        if done(&handle.status()) {
            return true;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    false
}

pub(crate) async fn liveness_until(
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

/// The bytes of every conflict copy under `dir/conflicts`.
pub(crate) fn conflict_copies(dir: &Path) -> Vec<Vec<u8>> {
    walkdir::WalkDir::new(dir.join("conflicts"))
        .into_iter()
        .filter_map(Result::ok)
        .filter(|e| e.file_type().is_file())
        .filter_map(|e| std::fs::read(e.path()).ok())
        .collect()
}
