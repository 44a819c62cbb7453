//! A hostile peer, for the tests of the agent's trust boundary: [`FakePeer`] is a `Peer` gRPC
//! server on loopback that answers every subscription with scripted index batches (whatever
//! records a test forges) and every fetch with a scripted content, counting what the real
//! agent pulled. The client helpers call a real agent's `Subscribe` and `Fetch` directly.
//!
//! A real agent takes the fake as a peer through its config ([`FakePeer::peer_config`]).
//! Everything is bounded: the fake's junk streams stop after a byte limit or a deadline, and
//! the client helpers time out.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use artisync::pb::sync as pb;
use pb::peer_client::PeerClient;
use pb::peer_server::{Peer, PeerServer};
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::{ReceiverStream, UnboundedReceiverStream};
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

use super::SYNAPSE;

pub const MIB: u64 = 1024 * 1024;
/// Chunk size of the fake's fetch answers.
pub const CHUNK_BYTES: usize = MIB as usize;
/// Largest content the record helpers send inline (the agent's default is 256 KiB).
pub const INLINE_MAX: usize = 64 * 1024;
/// Largest gRPC message either side of the helpers accepts (as the agent: 64 MiB).
const MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;
/// A junk stream stops after this long whatever the client does.
const JUNK_DEADLINE: Duration = Duration::from_secs(60);
/// Bound of one client call (a fetch read to its end, a subscribe answer).
pub const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// An HLC value for wall time `ms` (the agent keeps 16 logical bits under the milliseconds).
pub fn hlc_at(ms: u64) -> u64 {
    ms << 16
}

/// The HLC value of now.
pub fn hlc_now() -> u64 {
    hlc_at(artisync::now_ms())
}

/// BLAKE3 of `content`, as the wire carries it.
pub fn hash_of(content: &[u8]) -> Vec<u8> {
    blake3::hash(content).as_bytes().to_vec()
}

/// A valid live file record written by `node`: mode 0o644, the content's size and hash, version
/// `{node: counter}`, stamped now; the content travels inline when it is small. `seq` is left
/// 0: [`FakePeer::send`] numbers the records it sends.
pub fn file_record(node: u64, path: &str, content: &[u8], counter: u64) -> pb::Record {
    pb::Record {
        path: path.to_owned(),
        kind: pb::Kind::File as i32,
        deleted: false,
        size: content.len() as u64,
        mode: 0o644,
        hash: hash_of(content),
        version: vec![pb::VersionEntry { node, counter }],
        stamp_hlc: hlc_now(),
        stamp_node: node,
        seq: 0,
        inline_data: (content.len() <= INLINE_MAX).then(|| content.to_vec().into()),
    }
}

/// What the fake's `Fetch` answers for one path.
#[derive(Clone)]
pub enum Serve {
    /// NOT_FOUND.
    Missing,
    /// `bytes` in 1 MiB chunks. `before` runs first (on a blocking thread), then `delay`
    /// passes, then the bytes go out.
    Content {
        bytes: Arc<Vec<u8>>,
        before: Option<Arc<dyn Fn() + Send + Sync>>,
        delay: Duration,
    },
    /// Junk in 1 MiB chunks until `limit` bytes have gone out, the client goes away, or
    /// 60 s have passed.
    Junk { limit: u64 },
}

impl Serve {
    pub fn bytes(content: &[u8]) -> Self {
        Self::Content {
            bytes: Arc::new(content.to_vec()),
            before: None,
            delay: Duration::ZERO,
        }
    }
}

/// What the fetches of one path did.
#[derive(Debug, Default)]
pub struct FetchStats {
    /// `Fetch` calls for the path.
    pub calls: AtomicU64,
    /// Content bytes the client took from the fake's stream (the transport pulls them: this
    /// is bounded by what the client reads plus its HTTP/2 windows and a chunk in a buffer).
    pub pulled: AtomicU64,
    /// Answers finished: everything sent, the limit or deadline reached, or the client gone.
    pub ended: AtomicU64,
    /// Of those, answers the client abandoned before their end.
    pub cut: AtomicU64,
}

impl FetchStats {
    pub fn pulled(&self) -> u64 {
        self.pulled.load(Ordering::SeqCst)
    }
    pub fn calls(&self) -> u64 {
        self.calls.load(Ordering::SeqCst)
    }
    pub fn ended(&self) -> u64 {
        self.ended.load(Ordering::SeqCst)
    }
    pub fn cut(&self) -> u64 {
        self.cut.load(Ordering::SeqCst)
    }
}

type BatchTx = mpsc::UnboundedSender<Result<pb::IndexBatch, Status>>;

/// The fake's state, shared by its service and the test.
struct Script {
    name: String,
    node_id: u64,
    folder: String,
    epoch: u64,
    /// Every batch sent so far, in order: replayed to each new subscriber (after its cursor).
    batches: Mutex<Vec<pb::IndexBatch>>,
    /// Open subscriptions to the scripted folder; later batches are pushed to them.
    live: Mutex<Vec<BatchTx>>,
    /// Open subscriptions to other folders, kept open with nothing more to say.
    idle: Mutex<Vec<BatchTx>>,
    serve: Mutex<HashMap<String, Serve>>,
    stats: Mutex<HashMap<String, Arc<FetchStats>>>,
    /// Version counter last used per path by the record helpers.
    counters: Mutex<HashMap<String, u64>>,
    subscribes: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Script {
    fn stats(&self, path: &str) -> Arc<FetchStats> {
        lock(&self.stats)
            .entry(path.to_owned())
            .or_default()
            .clone()
    }

    fn empty_batch(&self, folder: &str) -> pb::IndexBatch {
        pb::IndexBatch {
            node_id: self.node_id,
            node_name: self.name.clone(),
            folder: folder.to_owned(),
            epoch: self.epoch,
            up_to_seq: 0,
            max_seq: 0,
            records: Vec::new(),
        }
    }
}

#[derive(Clone)]
struct FakeService(Arc<Script>);

type ChunkStream = Pin<Box<dyn tokio_stream::Stream<Item = Result<pb::Chunk, Status>> + Send>>;

#[tonic::async_trait]
impl Peer for FakeService {
    // Unbounded: the fake only ever holds the few batches a test scripts.
    type SubscribeStream = UnboundedReceiverStream<Result<pb::IndexBatch, Status>>;
    type FetchStream = ChunkStream;

    async fn subscribe(
        &self,
        request: Request<pb::SubscribeRequest>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        let script = &self.0;
        script.subscribes.fetch_add(1, Ordering::SeqCst);
        let req = request.into_inner();
        let (tx, rx) = mpsc::unbounded_channel();
        let mut scripted = false;
        for cursor in req.folders {
            if cursor.folder != script.folder {
                // Other folders: announced empty, so the agent counts the fake as connected.
                let _ = tx.send(Ok(script.empty_batch(&cursor.folder)));
                continue;
            }
            let since = if cursor.epoch == script.epoch {
                cursor.since_seq
            } else {
                0
            };
            // Replay and registration under one lock: a batch sent meanwhile is not missed.
            let batches = lock(&script.batches);
            if batches.is_empty() {
                let _ = tx.send(Ok(script.empty_batch(&cursor.folder)));
            }
            for b in batches.iter() {
                let mut b = b.clone();
                b.records.retain(|r| r.seq > since);
                let _ = tx.send(Ok(b));
            }
            lock(&script.live).push(tx.clone());
            scripted = true;
            drop(batches);
        }
        if !scripted {
            lock(&script.idle).push(tx);
        }
        Ok(Response::new(UnboundedReceiverStream::new(rx)))
    }

    async fn fetch(
        &self,
        request: Request<pb::FetchRequest>,
    ) -> Result<Response<Self::FetchStream>, Status> {
        let req = request.into_inner();
        let stats = self.0.stats(&req.path);
        stats.calls.fetch_add(1, Ordering::SeqCst);
        let serve = lock(&self.0.serve)
            .get(&req.path)
            .cloned()
            .unwrap_or(Serve::Missing);
        let (tx, rx) = mpsc::channel::<Result<pb::Chunk, Status>>(1);
        match serve {
            Serve::Missing => {
                stats.ended.fetch_add(1, Ordering::SeqCst);
                return Err(Status::not_found(format!("no {}", req.path)));
            }
            Serve::Content {
                bytes,
                before,
                delay,
            } => {
                tokio::spawn(async move {
                    if let Some(before) = before {
                        let _ = tokio::task::spawn_blocking(move || before()).await;
                    }
                    tokio::time::sleep(delay).await;
                    let mut cut = false;
                    for chunk in bytes.chunks(CHUNK_BYTES) {
                        let data = chunk.to_vec();
                        if tx.send(Ok(pb::Chunk { data })).await.is_err() {
                            cut = true;
                            break;
                        }
                        stats.pulled.fetch_add(chunk.len() as u64, Ordering::SeqCst);
                    }
                    if cut {
                        stats.cut.fetch_add(1, Ordering::SeqCst);
                    }
                    stats.ended.fetch_add(1, Ordering::SeqCst);
                });
            }
            Serve::Junk { limit } => {
                tokio::spawn(async move {
                    let start = Instant::now();
                    let mut sent = 0u64;
                    let mut cut = false;
                    while sent < limit && start.elapsed() < JUNK_DEADLINE {
                        let n = (limit - sent).min(CHUNK_BYTES as u64);
                        let data = vec![b'j'; n as usize];
                        if tx.send(Ok(pb::Chunk { data })).await.is_err() {
                            cut = true;
                            break;
                        }
                        sent += n;
                        stats.pulled.fetch_add(n, Ordering::SeqCst);
                    }
                    if cut {
                        stats.cut.fetch_add(1, Ordering::SeqCst);
                    }
                    stats.ended.fetch_add(1, Ordering::SeqCst);
                });
            }
        }
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// A scripted hostile peer on a loopback port (see the module docs). Stops when dropped.
pub struct FakePeer {
    script: Arc<Script>,
    port: u16,
    running: Option<(oneshot::Sender<()>, JoinHandle<()>)>,
}

impl FakePeer {
    /// Starts a fake peer called `name` (the name the agent's config gives it) that scripts
    /// the `synapse-configs` folder; returns once it listens.
    pub fn start(name: &str) -> Self {
        let script = Arc::new(Script {
            name: name.to_owned(),
            node_id: loop {
                // Any id but 0 (and, with overwhelming odds, not the agent's).
                let id = rand::random::<u64>();
                if id != 0 {
                    break id;
                }
            },
            folder: SYNAPSE.to_owned(),
            epoch: 0x5eed_e41c,
            batches: Mutex::new(Vec::new()),
            live: Mutex::new(Vec::new()),
            idle: Mutex::new(Vec::new()),
            serve: Mutex::new(HashMap::new()),
            stats: Mutex::new(HashMap::new()),
            counters: Mutex::new(HashMap::new()),
            subscribes: AtomicU64::new(0),
        });
        let service = FakeService(script.clone());
        let (bound_tx, bound_rx) = std::sync::mpsc::channel::<Result<u16, String>>();
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let runtime = match tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = bound_tx.send(Err(format!("runtime: {e}")));
                    return;
                }
            };
            runtime.block_on(async move {
                let listener = match tokio::net::TcpListener::bind("127.0.0.1:0").await {
                    Ok(l) => l,
                    Err(e) => {
                        let _ = bound_tx.send(Err(format!("bind: {e}")));
                        return;
                    }
                };
                let port = listener.local_addr().map(|a| a.port()).unwrap_or(0);
                let _ = bound_tx.send(Ok(port));
                let server = PeerServer::new(service)
                    .max_decoding_message_size(MAX_MESSAGE_BYTES)
                    .max_encoding_message_size(MAX_MESSAGE_BYTES);
                let incoming = tonic::transport::server::TcpIncoming::from(listener);
                let _ = tonic::transport::Server::builder()
                    .add_service(server)
                    .serve_with_incoming_shutdown(incoming, async {
                        let _ = stop_rx.await;
                    })
                    .await;
            });
            // Dropping the runtime drops the open streams and their sockets.
            runtime.shutdown_timeout(Duration::from_secs(1));
        });
        let port = match bound_rx.recv_timeout(Duration::from_secs(10)) {
            Ok(Ok(port)) => port,
            other => panic!("fake peer {name} did not start: {other:?}"),
        };
        Self {
            script,
            port,
            running: Some((stop_tx, thread)),
        }
    }

    pub fn name(&self) -> &str {
        &self.script.name
    }

    pub fn node_id(&self) -> u64 {
        self.script.node_id
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The `[[peer]]` entry that makes an agent subscribe to this fake (for `append_config`).
    pub fn peer_config(&self) -> String {
        format!(
            "\n[[peer]]\nname = \"{}\"\naddress = \"http://127.0.0.1:{}\"\n",
            self.script.name, self.port
        )
    }

    /// How many `Subscribe` calls the fake has answered.
    pub fn subscribes(&self) -> u64 {
        self.script.subscribes.load(Ordering::SeqCst)
    }

    /// Sends one index batch of `records` to every open subscription (and to later ones):
    /// the records are numbered after the last batch's, and `up_to_seq` and `max_seq` are
    /// the last of them.
    pub fn send(&self, records: Vec<pb::Record>) {
        let mut batches = lock(&self.script.batches);
        let mut seq = batches.last().map_or(0, |b| b.up_to_seq);
        let records: Vec<pb::Record> = records
            .into_iter()
            .map(|mut r| {
                seq += 1;
                r.seq = seq;
                r
            })
            .collect();
        let batch = pb::IndexBatch {
            up_to_seq: seq,
            max_seq: seq,
            records,
            ..self.script.empty_batch(&self.script.folder)
        };
        batches.push(batch.clone());
        lock(&self.script.live).retain(|tx| tx.send(Ok(batch.clone())).is_ok());
    }

    /// Sets what `Fetch` answers for `path` from now on.
    pub fn serve(&self, path: &str, serve: Serve) {
        lock(&self.script.serve).insert(path.to_owned(), serve);
    }

    /// What the fetches of `path` did so far.
    pub fn stats(&self, path: &str) -> Arc<FetchStats> {
        self.script.stats(path)
    }

    /// The next version counter of this fake for `path` (1, 2, ...).
    fn next_counter(&self, path: &str) -> u64 {
        let mut counters = lock(&self.script.counters);
        let c = counters.entry(path.to_owned()).or_insert(0);
        *c += 1;
        *c
    }

    /// A new version of file `path` written by this fake, its content inline when small
    /// (and served by `Fetch` in any case).
    pub fn file(&self, path: &str, content: &[u8]) -> pb::Record {
        self.serve(path, Serve::bytes(content));
        file_record(self.node_id(), path, content, self.next_counter(path))
    }

    /// A new version of file `path` that travels without its content: the agent must fetch
    /// it (what `Fetch` answers is up to the test: see [`FakePeer::serve`]).
    pub fn fetched(&self, path: &str, content: &[u8]) -> pb::Record {
        pb::Record {
            inline_data: None,
            ..file_record(self.node_id(), path, content, self.next_counter(path))
        }
    }

    /// A new version of directory `path` with `mode`.
    pub fn dir(&self, path: &str, mode: u32) -> pb::Record {
        pb::Record {
            kind: pb::Kind::Dir as i32,
            size: 0,
            mode,
            hash: Vec::new(),
            inline_data: None,
            ..file_record(self.node_id(), path, b"", self.next_counter(path))
        }
    }

    /// A tombstone of file `path`.
    pub fn tombstone(&self, path: &str) -> pb::Record {
        pb::Record {
            deleted: true,
            size: 0,
            mode: 0,
            hash: Vec::new(),
            inline_data: None,
            ..file_record(self.node_id(), path, b"", self.next_counter(path))
        }
    }
}

impl Drop for FakePeer {
    fn drop(&mut self) {
        if let Some((stop, thread)) = self.running.take() {
            let _ = stop.send(());
            let _ = thread.join();
        }
    }
}

// ---------------------------------------------------------------- client side

/// A runtime for the client helpers; its workers keep open streams and connections going
/// while the test thread waits on the harness.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a runtime for the gRPC client")
}

/// A client of the agent listening on `port` (one HTTP/2 connection; clones share it).
pub async fn connect(port: u16) -> PeerClient<Channel> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{port}"))
        .expect("a valid endpoint")
        .connect_timeout(Duration::from_secs(3))
        .connect()
        .await
        .unwrap_or_else(|e| panic!("connect to the agent on port {port}: {e}"));
    PeerClient::new(channel)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES)
}

/// Calls `Fetch` and reads the answer to its end (at most `CALL_TIMEOUT`, and at most 64 MiB):
/// the bytes, or the status the call or the stream ended with.
pub async fn fetch_bytes(
    client: &mut PeerClient<Channel>,
    folder: &str,
    path: &str,
    hash: Vec<u8>,
) -> Result<Vec<u8>, Status> {
    let read = async {
        let mut stream = client
            .fetch(pb::FetchRequest {
                folder: folder.to_owned(),
                path: path.to_owned(),
                hash,
            })
            .await?
            .into_inner();
        let mut bytes = Vec::new();
        while let Some(chunk) = stream.message().await? {
            bytes.extend_from_slice(&chunk.data);
            if bytes.len() as u64 > 64 * MIB {
                break;
            }
        }
        Ok(bytes)
    };
    match tokio::time::timeout(CALL_TIMEOUT, read).await {
        Ok(result) => result,
        Err(_) => Err(Status::deadline_exceeded(format!(
            "fetch {path}: no end within {} s",
            CALL_TIMEOUT.as_secs()
        ))),
    }
}

/// A subscription request from a node `name` with id `node_id` for `cursors`.
pub fn subscribe_request(
    node_id: u64,
    name: &str,
    cursors: Vec<pb::FolderCursor>,
) -> pb::SubscribeRequest {
    pb::SubscribeRequest {
        node_id,
        node_name: name.to_owned(),
        folders: cursors,
    }
}

/// A cursor asking for everything of `folder`.
pub fn cursor_from_start(folder: &str) -> pb::FolderCursor {
    pb::FolderCursor {
        folder: folder.to_owned(),
        epoch: 0,
        since_seq: 0,
        subscriber_epoch: 0,
    }
}

// ---------------------------------------------------------------- agent side

/// Adds `line` (e.g. `ignore = ["*.key"]`) to the `[[folder]]` table of folder `id` in the
/// node's config; call before start.
pub fn set_folder_option(node: &super::Node, id: &str, line: &str) {
    let text = std::fs::read_to_string(node.config()).expect("read the node's config");
    let key = format!("id = \"{id}\"\n");
    assert!(text.contains(&key), "config has no folder {id}:\n{text}");
    std::fs::write(
        node.config(),
        text.replacen(&key, &format!("{key}{line}\n"), 1),
    )
    .expect("write the node's config");
}

/// artisync's temp files (`.artisync.*.tmp`) anywhere below `dir`.
pub fn temp_files(dir: &Path) -> Vec<PathBuf> {
    walkdir::WalkDir::new(dir)
        .into_iter()
        .filter_map(Result::ok)
        .filter(|e| {
            let name = e.file_name().to_string_lossy();
            name.starts_with(".artisync.") && name.ends_with(".tmp")
        })
        .map(|e| e.into_path())
        .collect()
}

/// Every entry (files, directories, links) below `dir`, not `dir` itself.
pub fn entries_below(dir: &Path) -> Vec<PathBuf> {
    walkdir::WalkDir::new(dir)
        .min_depth(1)
        .into_iter()
        .filter_map(Result::ok)
        .map(|e| e.into_path())
        .collect()
}

/// Resident memory of process `pid`, in KiB (`VmRSS` of `/proc/<pid>/status`).
pub fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("read /proc/{pid}/status: {e}"));
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no VmRSS in /proc/{pid}/status"))
}

/// The whole log of the node so far.
pub fn log_text(node: &super::Node) -> String {
    std::fs::read_to_string(node.log_path()).unwrap_or_default()
}
