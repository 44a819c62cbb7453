//! The gRPC edge between peers: the `Peer` service every node serves, and the session every
//! node runs to each configured peer (subscribe to its index, hand batches to the folder
//! engines, fetch large contents, reconnect with backoff). Generated types stop here: records
//! are converted to and from the model at this boundary, and every path from a peer is
//! validated before anything else sees it.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::{
    Certificate, Channel, ClientTlsConfig, Endpoint, Identity, ServerTlsConfig,
};
use tonic::{Request, Response, Status};
use tracing::{debug, info, warn};

use crate::config::{Config, PeerConfig, TlsConfig};
use crate::engine::{Feed, FetchError, FolderHandle, Incoming, Inline, RemoteBatch, ServeError};
use crate::model::{
    FileRecord, Hash, Kind, MAX_CLOCK_VALUE, NodeId, RelPath, Stamp, VersionVector,
};
use crate::pb::sync as pb;
use crate::pb::sync::peer_client::PeerClient;
use crate::pb::sync::peer_server::Peer;
use crate::store::Origin;

/// Most entries a version vector from a peer may have (one per node that ever wrote the path;
/// a record with more is refused, so it can never make a batch too large to relay).
pub const MAX_VERSION_ENTRIES: usize = 1024;
/// Largest file a peer may announce (1 TiB).
const MAX_FILE_BYTES: u64 = 1 << 40;
/// Largest gRPC message accepted (batches carry inline contents).
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;
/// HTTP/2 receive window of one stream (the client's side of a subscription).
const STREAM_WINDOW_BYTES: u32 = 8 * 1024 * 1024;
/// Batches of one stream handed to the engine and not answered yet: one being finished, one
/// being staged, one checked and waiting.
const BATCHES_IN_FLIGHT: usize = 3;
/// Subscription streams one connection may hold open at once (a peer opens one per folder),
/// and all connections together: each stream may pin a few batches in memory while its
/// subscriber does not read (see the README's "Memory" notes).
const MAX_SUBSCRIPTIONS_PER_CONNECTION: usize = 8;
const MAX_SUBSCRIPTIONS: usize = 64;
/// Chunk size of large-file transfers.
const CHUNK_BYTES: usize = 1024 * 1024;
/// A fetch that receives nothing for this long is abandoned (a hung peer must not block the
/// folder's engine).
const FETCH_STALL: Duration = Duration::from_secs(30);
/// Longest wait between subscription attempts for a folder that is paused here.
const PAUSED_RETRY: Duration = Duration::from_secs(2);
/// Reconnect backoff bounds (see [`Backoff`]).
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(10);
/// Backoff cap for a peer this node had a session with lately: a partition that heals, or a
/// peer that restarts, is reconnected within about this long.
const BACKOFF_RECENT_MAX: Duration = Duration::from_secs(1);
/// How long after its last session a peer counts as lately healthy.
const RECENTLY_CONNECTED: Duration = Duration::from_secs(300);
/// A session that lasted this long starts the backoff over.
const STABLE_SESSION: Duration = Duration::from_secs(10);
/// Longest wait for a peer to answer a subscription (a connection that was accepted but
/// stalls must not hold the session until HTTP/2 keepalive notices).
const SUBSCRIBE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("peer {peer}: {message}")]
    Peer { peer: String, message: String },
    #[error("peer {peer}: folder {folder} is paused here: {reason}")]
    Paused {
        peer: String,
        folder: String,
        reason: String,
    },
    #[error("TLS material {path}: {source}")]
    TlsFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("peer {peer}: {source}")]
    Transport {
        peer: String,
        source: tonic::transport::Error,
    },
}

// ---------------------------------------------------------------- conversions

/// Converts a model record to the wire.
pub fn record_to_pb(r: &FileRecord, inline: Option<Vec<u8>>) -> pb::Record {
    pb::Record {
        path: r.path.to_string(),
        kind: match r.kind {
            Kind::File => pb::Kind::File as i32,
            Kind::Dir => pb::Kind::Dir as i32,
        },
        deleted: r.deleted,
        size: r.size,
        mode: r.mode,
        hash: r.hash.map(|h| h.to_vec()).unwrap_or_default(),
        version: r
            .version
            .entries()
            .map(|(n, c)| pb::VersionEntry {
                node: n.0,
                counter: c,
            })
            .collect(),
        stamp_hlc: r.stamp.hlc,
        stamp_node: r.stamp.node.0,
        seq: r.seq,
        inline_data: inline.map(bytes::Bytes::from),
    }
}

/// Validates and converts a record from a peer. The error says what is wrong with it.
pub fn record_from_pb(p: pb::Record) -> Result<Incoming, String> {
    let path = RelPath::new(&p.path).map_err(|e| e.to_string())?;
    let kind = match pb::Kind::try_from(p.kind) {
        Ok(pb::Kind::File) => Kind::File,
        Ok(pb::Kind::Dir) => Kind::Dir,
        Err(_) => return Err(format!("{path}: unknown kind {}", p.kind)),
    };
    let hash: Option<Hash> = if p.hash.is_empty() {
        None
    } else {
        Some(
            p.hash
                .as_slice()
                .try_into()
                .map_err(|_| format!("{path}: hash is {} bytes, not 32", p.hash.len()))?,
        )
    };
    if !p.deleted && kind == Kind::File && hash.is_none() {
        return Err(format!("{path}: live file without a hash"));
    }
    if p.mode > 0o7777 {
        return Err(format!("{path}: mode {:o} out of range", p.mode));
    }
    // Counters of 0 are no entries: a vector of only those would compare equal to anything
    // new, and the record would be ignored or taken at random.
    if p.version.iter().all(|e| e.counter == 0) {
        return Err(format!("{path}: empty version vector"));
    }
    if p.version.len() > MAX_VERSION_ENTRIES {
        return Err(format!(
            "{path}: version vector of {} entries (at most {MAX_VERSION_ENTRIES})",
            p.version.len()
        ));
    }
    // The largest stamp or counter taken from a peer. One gap remains, by construction: a
    // record crafted just under the cap makes this node's next write of that path (stamped
    // one past it) go over it, and peers refuse that write. No wrong clock gets there (the cap
    // is about the year 4200); only a peer that forges records does, and with `[tls]` such a
    // peer holds a cluster certificate.
    if p.stamp_hlc > MAX_CLOCK_VALUE || p.version.iter().any(|e| e.counter > MAX_CLOCK_VALUE) {
        return Err(format!(
            "{path}: stamp or version counter beyond the clock's range (a hostile or broken peer)"
        ));
    }
    if !p.deleted && kind == Kind::File && p.size > MAX_FILE_BYTES {
        return Err(format!("{path}: declared size {} is absurd", p.size));
    }
    // Only permission bits, and always readable and writable (directories also searchable)
    // by the agent itself: a peer never sets setuid, setgid or sticky bits here, nor locks
    // this node out of its own files. Directories and tombstones carry no size.
    let (mode, size) = match (p.deleted, kind) {
        (true, _) => (0, 0),
        (false, Kind::Dir) => (p.mode & 0o777 | 0o700, 0),
        (false, Kind::File) => (p.mode & 0o777 | 0o600, p.size),
    };
    if let Some(data) = &p.inline_data {
        if data.len() as u64 != p.size {
            return Err(format!(
                "{path}: inline content is {} bytes, record says {}",
                data.len(),
                p.size
            ));
        }
    }
    // Inline bytes that do not hash to the record's hash are dropped: the engine then fetches
    // the content by hash, which fails (and is retried) if the peer no longer has it.
    // Only a live file has content: whatever else a tombstone or a directory carries is
    // dropped.
    let live_file = !p.deleted && kind == Kind::File;
    let hash = hash.filter(|_| live_file);
    let inline = match (p.inline_data, &hash) {
        (Some(data), Some(h)) => Inline::verified(data, h),
        _ => None,
    };
    Ok(Incoming {
        record: FileRecord {
            path,
            kind,
            deleted: p.deleted,
            size,
            mode,
            hash,
            version: VersionVector::from_entries(
                p.version.iter().map(|e| (NodeId(e.node), e.counter)),
            ),
            stamp: Stamp {
                hlc: p.stamp_hlc,
                node: NodeId(p.stamp_node),
            },
            seq: p.seq,
        },
        inline,
    })
}

// ---------------------------------------------------------------- server

/// The `Peer` service: streams this node's folder indexes and serves file contents.
#[derive(Clone)]
pub struct PeerService {
    node: NodeId,
    node_name: String,
    folders: Arc<HashMap<String, FolderHandle>>,
    inline_max: u64,
    cancel: CancellationToken,
    slots: Arc<Mutex<Slots>>,
    metrics: crate::metrics::Metrics,
}

/// Subscription streams open now, per connection and in total (see
/// [`MAX_SUBSCRIPTIONS_PER_CONNECTION`]).
#[derive(Debug, Default)]
struct Slots {
    total: usize,
    per_connection: HashMap<Option<std::net::SocketAddr>, usize>,
}

/// One subscription stream's place in [`Slots`], given back when the stream is dropped
/// (the subscriber hung up or the connection broke).
struct Slot {
    slots: Arc<Mutex<Slots>>,
    connection: Option<std::net::SocketAddr>,
}

impl Slot {
    fn take(
        slots: &Arc<Mutex<Slots>>,
        connection: Option<std::net::SocketAddr>,
    ) -> Result<Slot, Status> {
        let mut s = slots
            .lock()
            .map_err(|_| Status::internal("subscription table poisoned"))?;
        let here = s.per_connection.get(&connection).copied().unwrap_or(0);
        if here >= MAX_SUBSCRIPTIONS_PER_CONNECTION {
            return Err(Status::resource_exhausted(format!(
                "at most {MAX_SUBSCRIPTIONS_PER_CONNECTION} subscriptions per connection"
            )));
        }
        if s.total >= MAX_SUBSCRIPTIONS {
            return Err(Status::resource_exhausted(format!(
                "this node serves at most {MAX_SUBSCRIPTIONS} subscriptions at once"
            )));
        }
        s.total += 1;
        *s.per_connection.entry(connection).or_insert(0) += 1;
        Ok(Slot {
            slots: slots.clone(),
            connection,
        })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Ok(mut s) = self.slots.lock() {
            s.total = s.total.saturating_sub(1);
            if let Some(n) = s.per_connection.get_mut(&self.connection) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    s.per_connection.remove(&self.connection);
                }
            }
        }
    }
}

/// A subscription's stream of batches, holding its `Slot` while it lives.
pub struct SubscriptionStream {
    inner: ReceiverStream<Result<pb::IndexBatch, Status>>,
    _slot: Slot,
}

impl tokio_stream::Stream for SubscriptionStream {
    type Item = Result<pb::IndexBatch, Status>;

    fn poll_next(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        Pin::new(&mut self.inner).poll_next(cx)
    }
}

/// The cursors of a subscription, one per folder: a folder named twice gets one stream, from
/// the earliest of its cursors (any disagreement about the epoch sends everything). A folder
/// this node does not have is refused, naming it.
fn merge_cursors(
    cursors: Vec<pb::FolderCursor>,
    known: impl Fn(&str) -> bool,
) -> Result<Vec<pb::FolderCursor>, Status> {
    if cursors.is_empty() {
        return Err(Status::invalid_argument("a subscription names no folder"));
    }
    let mut merged: std::collections::BTreeMap<String, pb::FolderCursor> = Default::default();
    for c in cursors {
        if !known(&c.folder) {
            return Err(Status::not_found(format!(
                "this node has no folder {:?} (check both nodes' [[folder]] ids)",
                c.folder
            )));
        }
        match merged.get_mut(&c.folder) {
            None => {
                merged.insert(c.folder.clone(), c);
            }
            Some(m) => {
                if m.epoch != c.epoch {
                    m.epoch = 0;
                }
                if m.subscriber_epoch != c.subscriber_epoch {
                    m.subscriber_epoch = 0;
                }
                m.since_seq = m.since_seq.min(c.since_seq);
            }
        }
    }
    Ok(merged.into_values().collect())
}

impl PeerService {
    pub fn new(
        node: NodeId,
        node_name: String,
        folders: Arc<HashMap<String, FolderHandle>>,
        inline_max: u64,
        cancel: CancellationToken,
    ) -> Self {
        Self {
            node,
            node_name,
            folders,
            inline_max,
            cancel,
            slots: Arc::default(),
            metrics: crate::metrics::Metrics::default(),
        }
    }

    /// Counts what is sent to subscribers into `metrics`.
    pub fn with_metrics(mut self, metrics: crate::metrics::Metrics) -> Self {
        self.metrics = metrics;
        self
    }

    pub fn into_server(self) -> pb::peer_server::PeerServer<Self> {
        pb::peer_server::PeerServer::new(self)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES)
    }
}

/// Streams one folder's [`Feed`] to one subscriber, until the subscriber or the node goes.
async fn pump_folder(
    svc: PeerService,
    mut feed: Feed,
    folder: String,
    epoch: u64,
    tx: mpsc::Sender<Result<pb::IndexBatch, Status>>,
    subscriber: String,
) {
    let link = svc.metrics.link(&subscriber, &folder);
    loop {
        let pending = match feed.next_rows().await {
            Ok(Some(pending)) => pending,
            Ok(None) => {
                tokio::select! {
                    _ = svc.cancel.cancelled() => return,
                    _ = tx.closed() => return,
                    changed = feed.changed() => if !changed { return },
                }
                continue;
            }
            Err(e) => {
                warn!(folder = %folder, peer = %subscriber, error = %e, "cannot read index for peer");
                let _ = tx.send(Err(Status::internal(e.to_string()))).await;
                return;
            }
        };
        // A place in the stream's queue first, the contents after: a subscriber that does
        // not read pins the batch on the wire and the one queued, never a third one built
        // and waiting to be queued.
        let permit = tokio::select! {
            _ = svc.cancel.cancelled() => return,
            permit = tx.reserve() => match permit {
                Ok(permit) => permit,
                Err(_) => return,
            },
        };
        let Some(built) = feed.build(pending).await else {
            return;
        };
        let records = built.records.len();
        let inline_bytes: usize = built
            .records
            .iter()
            .filter_map(|(_, data)| data.as_ref().map(|d| d.len()))
            .sum();
        let batch = pb::IndexBatch {
            node_id: svc.node.0,
            node_name: svc.node_name.clone(),
            folder: folder.clone(),
            epoch,
            up_to_seq: built.up_to_seq,
            max_seq: built.max_seq,
            records: built
                .records
                .into_iter()
                .map(|(row, data)| record_to_pb(&row.record, data))
                .collect(),
        };
        permit.send(Ok(batch));
        link.sent(records as u64, inline_bytes as u64);
        debug!(folder = %folder, peer = %subscriber, records, up_to_seq = built.up_to_seq, read_us = built.read.as_micros() as u64, queued_us = built.read_at.elapsed().as_micros() as u64, "batch sent to peer");
    }
}

type ChunkStream = Pin<Box<dyn tokio_stream::Stream<Item = Result<pb::Chunk, Status>> + Send>>;

#[tonic::async_trait]
impl Peer for PeerService {
    type SubscribeStream = SubscriptionStream;
    type FetchStream = ChunkStream;

    async fn subscribe(
        &self,
        request: Request<pb::SubscribeRequest>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        crate::identity::authorize_subscriber(&request, &request.get_ref().node_name)?;
        let connection = request.remote_addr();
        let req = request.into_inner();
        if req.node_id == self.node.0 {
            return Err(Status::failed_precondition(
                "a node cannot subscribe to itself (check peer addresses)",
            ));
        }
        let cursors = merge_cursors(req.folders, |f| self.folders.contains_key(f))?;
        let slot = Slot::take(&self.slots, connection).inspect_err(|e| {
            warn!(peer = %req.node_name, remote = ?connection, error = %e.message(), "subscription refused");
        })?;
        let subscriber = req.node_name.clone();
        info!(peer = %subscriber, folders = cursors.len(), "peer subscribed");
        // One batch queued ahead of the one on the wire (plus one per folder waiting to be
        // queued): batches grow to 16 MiB, and a deeper queue only held more of them in memory
        // while the receiver, the slower side, worked (4 queued: no faster initial sync).
        let (tx, rx) = mpsc::channel(1);
        for cursor in cursors {
            let Some(handle) = self.folders.get(&cursor.folder) else {
                continue;
            };
            let since = if cursor.epoch == handle.epoch {
                cursor.since_seq
            } else {
                0
            };
            // Origins are recorded under the name the receiving node's config gives the peer,
            // and its session refuses batches whose node_name is not that name (see
            // `PeerSession::session_once`): it is the name the subscriber gives here.
            let skip = (cursor.subscriber_epoch != 0).then(|| Origin {
                peer: subscriber.clone(),
                epoch: cursor.subscriber_epoch,
            });
            let feed = handle.feed(since, NodeId(req.node_id), skip, self.inline_max);
            tokio::spawn(pump_folder(
                self.clone(),
                feed,
                handle.id.clone(),
                handle.epoch,
                tx.clone(),
                subscriber.clone(),
            ));
        }
        Ok(Response::new(SubscriptionStream {
            inner: ReceiverStream::new(rx),
            _slot: slot,
        }))
    }

    async fn fetch(
        &self,
        request: Request<pb::FetchRequest>,
    ) -> Result<Response<Self::FetchStream>, Status> {
        crate::identity::authorize_cluster_read(&request, "Peer.Fetch")?;
        // Only a certificate names the fetching node.
        let fetcher = match crate::identity::caller_identity(&request) {
            Ok(crate::identity::Caller::Node(name)) => name,
            _ => "unknown".to_owned(),
        };
        let req = request.into_inner();
        let handle = self
            .folders
            .get(&req.folder)
            .ok_or_else(|| Status::not_found(format!("no folder {:?}", req.folder)))?;
        let path = RelPath::new(&req.path).map_err(|e| Status::invalid_argument(e.to_string()))?;
        let hash: Hash = req.hash.as_slice().try_into().map_err(|_| {
            Status::invalid_argument(format!("hash is {} bytes, not 32", req.hash.len()))
        })?;
        let file = handle
            .open_for_peer(&path, &hash)
            .await
            .map_err(|e| match e {
                ServeError::NotServed { .. } => {
                    debug!(folder = %handle.id, path = %path, reason = %e, "fetch not served");
                    Status::not_found(e.to_string())
                }
                ServeError::Store(e) => Status::internal(e.to_string()),
            })?;
        let file = tokio::fs::File::from_std(file);
        let link = self.metrics.link(&fetcher, &handle.id);
        let (tx, rx) = mpsc::channel(4);
        tokio::spawn(async move {
            use tokio::io::AsyncReadExt;
            let mut file = file;
            loop {
                let mut buf = vec![0u8; CHUNK_BYTES];
                match file.read(&mut buf).await {
                    Ok(0) => return,
                    Ok(n) => {
                        buf.truncate(n);
                        if tx.send(Ok(pb::Chunk { data: buf })).await.is_err() {
                            return;
                        }
                        link.served(n as u64);
                    }
                    Err(e) => {
                        let _ = tx.send(Err(Status::internal(e.to_string()))).await;
                        return;
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

// ---------------------------------------------------------------- TLS

async fn read_pem(path: &Path) -> Result<Vec<u8>, NetError> {
    tokio::fs::read(path)
        .await
        .map_err(|source| NetError::TlsFile {
            path: path.to_owned(),
            source,
        })
}

/// Server side of mutual TLS: this node's identity, and peers must present a cert from the CA.
pub async fn server_tls(tls: &TlsConfig) -> Result<ServerTlsConfig, NetError> {
    let cert = read_pem(&tls.cert).await?;
    let key = read_pem(&tls.key).await?;
    let ca = read_pem(&tls.ca).await?;
    Ok(ServerTlsConfig::new()
        .identity(Identity::from_pem(cert, key))
        .client_ca_root(Certificate::from_pem(ca)))
}

async fn client_tls(tls: &TlsConfig, host: &str) -> Result<ClientTlsConfig, NetError> {
    let cert = read_pem(&tls.cert).await?;
    let key = read_pem(&tls.key).await?;
    let ca = read_pem(&tls.ca).await?;
    Ok(ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca))
        .identity(Identity::from_pem(cert, key))
        .domain_name(host))
}

/// Builds a (lazy) channel to a peer address, with TLS for `https://`.
pub async fn channel(
    address: &str,
    tls: Option<&TlsConfig>,
    peer: &str,
) -> Result<Channel, NetError> {
    let transport = |source| NetError::Transport {
        peer: peer.to_owned(),
        source,
    };
    let mut endpoint = Endpoint::from_shared(address.to_owned())
        .map_err(transport)?
        .connect_timeout(Duration::from_secs(3))
        .tcp_nodelay(true)
        // Room for a whole index batch in flight, so the peer sends the next batch while
        // this node applies the last one.
        .initial_stream_window_size(Some(STREAM_WINDOW_BYTES))
        .initial_connection_window_size(Some(2 * STREAM_WINDOW_BYTES))
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(10))
        .keep_alive_while_idle(true);
    let (secure, host) =
        crate::config::parse_peer_address(address).map_err(|message| NetError::Peer {
            peer: peer.to_owned(),
            message,
        })?;
    if secure {
        let tls = tls.ok_or_else(|| NetError::Peer {
            peer: peer.to_owned(),
            message: "https address but no [tls] configured".into(),
        })?;
        endpoint = endpoint
            .tls_config(client_tls(tls, &host).await?)
            .map_err(transport)?;
    }
    Ok(endpoint.connect_lazy())
}

// ---------------------------------------------------------------- client sessions

/// What `artisync status` shows about one peer.
#[derive(Debug, Clone, Default, Serialize, serde::Deserialize)]
pub struct PeerStatus {
    pub name: String,
    pub address: String,
    pub connected: bool,
    /// Milliseconds since the Unix epoch of the last message from the peer.
    pub last_seen_ms: Option<u64>,
    pub last_error: Option<String>,
    /// Per folder: how many of the peer's index sequence numbers are not applied here yet.
    pub behind: HashMap<String, u64>,
    /// Per folder: the peer's index sequence applied here up to (this node's cursor into it).
    #[serde(default)]
    pub applied_seq: HashMap<String, u64>,
    /// Per folder: what came from the peer since this agent started.
    #[serde(default)]
    pub received: HashMap<String, Received>,
    /// Per folder, while `behind` is above 0: when this node first knew of a change of the
    /// peer's that it has not applied (ms since the epoch). A change the peer made while
    /// disconnected is not known here until it reconnects.
    #[serde(default)]
    pub behind_since_ms: HashMap<String, u64>,
    /// Folder streams currently up.
    #[serde(skip)]
    pub streams: usize,
}

impl PeerStatus {
    /// Notes that `behind` of the peer's sequence numbers of `folder` are not applied here,
    /// at `now_ms`; the lag runs from when that went above 0.
    fn note_behind(&mut self, folder: &str, behind: u64, now_ms: u64) {
        self.behind.insert(folder.to_owned(), behind);
        if behind == 0 {
            self.behind_since_ms.remove(folder);
        } else {
            self.behind_since_ms
                .entry(folder.to_owned())
                .or_insert(now_ms);
        }
    }
}

/// Index batches and records received from a peer for one folder.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Received {
    pub batches: u64,
    pub records: u64,
}

/// Shared status of all peer sessions.
pub type PeerStatuses = Arc<Mutex<HashMap<String, PeerStatus>>>;

fn set_status(statuses: &PeerStatuses, name: &str, f: impl FnOnce(&mut PeerStatus)) {
    if let Ok(mut map) = statuses.lock() {
        if let Some(s) = map.get_mut(name) {
            f(s);
        }
    }
}

/// When a peer session tries again after it ended: exponential from [`BACKOFF_MIN`], capped
/// at [`BACKOFF_RECENT_MAX`] while the peer had a session within [`RECENTLY_CONNECTED`] (a
/// healed partition or a restarted peer is back within a second) and at [`BACKOFF_MAX`]
/// otherwise, jittered so the nodes of a cluster do not retry in step. A session that lasted
/// [`STABLE_SESSION`] starts over from the minimum.
#[derive(Debug, Default)]
struct Backoff {
    /// The next wait before jitter; zero until the first failure.
    next: Duration,
    last_connected: Option<Instant>,
}

impl Backoff {
    /// The wait after a session that ended at `now`; `connected_for` is how long it was
    /// subscribed (`None`: it never got that far). `jitter` in [0, 1) takes up to half off.
    fn next(
        &mut self,
        now: Instant,
        connected_for: Option<Duration>,
        paused: bool,
        jitter: f64,
    ) -> Duration {
        if let Some(lasted) = connected_for {
            self.last_connected = Some(now);
            if lasted >= STABLE_SESSION {
                self.next = Duration::ZERO;
            }
        }
        let recent = self
            .last_connected
            .is_some_and(|t| now.duration_since(t) < RECENTLY_CONNECTED);
        let cap = if paused {
            PAUSED_RETRY
        } else if recent {
            BACKOFF_RECENT_MAX
        } else {
            BACKOFF_MAX
        };
        self.next = (self.next * 2).clamp(BACKOFF_MIN, cap);
        self.next.mul_f64(1.0 - jitter.clamp(0.0, 1.0) / 2.0)
    }
}

/// Fetches contents from one peer into verified temp files.
struct PeerFetcher {
    client: PeerClient<Channel>,
    link: crate::metrics::LinkMetrics,
}

impl crate::engine::Fetcher for PeerFetcher {
    fn fetch<'a>(
        &'a self,
        folder: &'a str,
        path: &'a RelPath,
        hash: Hash,
        size: u64,
        dir: &'a Path,
        mode: u32,
    ) -> crate::engine::Fetching<'a> {
        let peer = |m: String| FetchError::Peer(m);
        Box::pin(async move {
            let mut client = self.client.clone();
            let mut stream = client
                .fetch(pb::FetchRequest {
                    folder: folder.to_owned(),
                    path: path.to_string(),
                    hash: hash.to_vec(),
                })
                .await
                .map_err(|s| peer(s.message().to_owned()))?
                .into_inner();
            let dir_owned = dir.to_owned();
            let (file, tmp) = tokio::task::spawn_blocking(move || {
                crate::fs::apply::create_temp(&dir_owned, mode)
            })
            .await
            .map_err(std::io::Error::other)??;
            let mut file = tokio::fs::File::from_std(file);
            let mut hasher = blake3::Hasher::new();
            let mut received: u64 = 0;
            let result: Result<(), FetchError> = async {
                loop {
                    let next = tokio::time::timeout(FETCH_STALL, stream.message())
                        .await
                        .map_err(|_| peer(format!("no data for {} s", FETCH_STALL.as_secs())))?;
                    let Some(chunk) = next.map_err(|s| peer(s.message().to_owned()))? else {
                        break;
                    };
                    // Never more than the record says: a peer streaming on is cut off before
                    // the extra bytes reach the disk.
                    received = received.saturating_add(chunk.data.len() as u64);
                    if received > size {
                        return Err(peer(format!(
                            "sent more than the {size} bytes its record declares"
                        )));
                    }
                    hasher.update(&chunk.data);
                    file.write_all(&chunk.data).await?;
                }
                if received != size {
                    return Err(peer(format!(
                        "sent {received} bytes, its record declares {size}"
                    )));
                }
                file.flush().await?;
                if *hasher.finalize().as_bytes() != hash {
                    return Err(peer(
                        "content does not match its hash (changed on the peer meanwhile?)".into(),
                    ));
                }
                Ok(())
            }
            .await;
            if let Err(e) = result {
                let _ = tokio::fs::remove_file(&tmp).await;
                return Err(e);
            }
            self.link.fetched(received);
            Ok(tmp)
        })
    }
}

/// The engine's answer to one queued batch: the peer sequence applied up to.
type EngineAnswer =
    Pin<Box<dyn std::future::Future<Output = Result<u64, crate::engine::EngineError>> + Send>>;

/// Keeps the subscription to one folder of one peer alive until cancelled. Each folder has its
/// own stream, so a paused folder (or one whose batch cannot be applied yet) never holds up
/// the others.
pub struct PeerSession {
    pub node: NodeId,
    pub node_name: String,
    pub peer: PeerConfig,
    pub tls: Option<TlsConfig>,
    pub folder: FolderHandle,
    pub statuses: PeerStatuses,
    pub names: crate::engine::NodeNames,
    pub metrics: crate::metrics::Metrics,
}

impl PeerSession {
    pub async fn run(self, cancel: CancellationToken) {
        let mut backoff = Backoff::default();
        loop {
            let started = Instant::now();
            let mut counted = false;
            let result = tokio::select! {
                _ = cancel.cancelled() => return,
                r = self.session_once(&mut counted) => r,
            };
            if counted {
                set_status(&self.statuses, &self.peer.name, |s| {
                    s.streams = s.streams.saturating_sub(1);
                    s.connected = s.streams > 0;
                });
            }
            // A paused folder is retried often, so it resumes promptly once confirmed.
            let paused = matches!(&result, Err(NetError::Paused { .. }));
            let ended = Instant::now();
            let wait = backoff.next(
                ended,
                counted.then(|| ended.duration_since(started)),
                paused,
                rand::random::<f64>(),
            );
            if let Err(e) = &result {
                set_status(&self.statuses, &self.peer.name, |s| {
                    s.last_error = Some(e.to_string())
                });
                if wait >= Duration::from_secs(1) {
                    warn!(peer = %self.peer.name, folder = %self.folder.id, error = %e, retry_in_ms = wait.as_millis() as u64, "peer session failed");
                } else {
                    debug!(peer = %self.peer.name, folder = %self.folder.id, error = %e, retry_in_ms = wait.as_millis() as u64, "peer session failed");
                }
            }
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// One session with the peer: connect, subscribe from this node's cursor, and hand each
    /// batch to the folder's engine (a few in flight) until the stream ends or fails.
    /// Longer than most: the connection's steps and its in-flight bookkeeping read in order.
    async fn session_once(&self, counted: &mut bool) -> Result<(), NetError> {
        let name = self.peer.name.clone();
        let perr = |message: String| NetError::Peer {
            peer: name.clone(),
            message,
        };
        let address = self.peer.address.clone().unwrap_or_default();
        let channel = channel(&address, self.tls.as_ref(), &name).await?;
        let mut client = PeerClient::new(channel)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        let handle = &self.folder;
        let c = handle
            .cursor(&name)
            .await
            .map_err(|e| perr(e.to_string()))?;
        let cursors = vec![pb::FolderCursor {
            folder: handle.id.clone(),
            epoch: c.epoch,
            since_seq: c.seq,
            // The peer leaves out what it took unchanged from this index, in this epoch.
            subscriber_epoch: handle.epoch,
        }];
        let subscribe = client.subscribe(pb::SubscribeRequest {
            node_id: self.node.0,
            node_name: self.node_name.clone(),
            folders: cursors,
        });
        let mut stream = tokio::time::timeout(SUBSCRIBE_TIMEOUT, subscribe)
            .await
            .map_err(|_| {
                perr(format!(
                    "subscribe: no answer within {} s",
                    SUBSCRIBE_TIMEOUT.as_secs()
                ))
            })?
            .map_err(|s| perr(format!("subscribe: {}", s.message())))?
            .into_inner();
        info!(peer = %name, folder = %handle.id, address = %address, "connected to peer");
        *counted = true;
        set_status(&self.statuses, &name, |s| {
            s.streams += 1;
            s.connected = true;
            s.last_error = None;
            s.last_seen_ms = Some(crate::now_ms());
        });
        let link = self.metrics.link(&name, &handle.id);
        let fetcher: Arc<dyn crate::engine::Fetcher> = Arc::new(PeerFetcher {
            client: client.clone(),
            link: link.clone(),
        });
        let stream_id = rand::random::<u64>();
        let engine_err = |e: crate::engine::EngineError| match e {
            crate::engine::EngineError::Paused { folder, reason } => NetError::Paused {
                peer: name.clone(),
                folder,
                reason,
            },
            other => perr(other.to_string()),
        };
        // Batches queued to the engine, oldest first, with the peer's max_seq at the time.
        let mut in_flight: std::collections::VecDeque<(EngineAnswer, u64)> =
            std::collections::VecDeque::new();
        // How far this node has applied the peer's index (the cursor it subscribed from, in
        // the same epoch), and the peer's largest sequence number known: what lies between
        // is behind, counted from when a batch arrives, not only once it is applied.
        let mut applied_here: Option<u64> = None;
        let mut known_max: u64 = 0;
        loop {
            let next = tokio::select! {
                biased;
                // Answers first: a failure must stop the stream before more is queued.
                applied = async {
                    match in_flight.front_mut() {
                        Some((answer, _)) => Pin::as_mut(answer).await,
                        None => std::future::pending().await,
                    }
                } => {
                    let max_seq = in_flight.pop_front().map_or(0, |(_, m)| m);
                    let applied = applied.map_err(engine_err)?;
                    applied_here = Some(applied);
                    let now = crate::now_ms();
                    set_status(&self.statuses, &name, |s| {
                        s.last_seen_ms = Some(now);
                        s.note_behind(&handle.id, known_max.max(max_seq).saturating_sub(applied), now);
                        s.applied_seq.insert(handle.id.clone(), applied);
                    });
                    continue;
                }
                msg = stream.message(), if in_flight.len() < BATCHES_IN_FLIGHT => msg,
            };
            let Some(batch) = next.map_err(|s| perr(format!("stream: {}", s.message())))? else {
                return Err(perr("peer closed the stream".into()));
            };
            // This check also makes origins line up: this node records the peer's records with
            // origin `name`, and the peer knows this node's records by its node_name.
            if batch.node_name != name {
                return Err(perr(format!(
                    "address {address} answers as node {:?}, not {name:?}; fix the peer's address",
                    batch.node_name
                )));
            }
            if let Ok(mut names) = self.names.lock() {
                names
                    .entry(NodeId(batch.node_id))
                    .or_insert_with(|| batch.node_name.clone());
            }
            if batch.folder != handle.id {
                continue;
            }
            let inline_bytes: usize = batch
                .records
                .iter()
                .map(|r| r.inline_data.as_ref().map_or(0, |d| d.len()))
                .sum();
            link.received(batch.records.len() as u64, inline_bytes as u64);
            let base = applied_here.unwrap_or(if batch.epoch == c.epoch { c.seq } else { 0 });
            known_max = known_max.max(batch.max_seq);
            set_status(&self.statuses, &name, |s| {
                let r = s.received.entry(handle.id.clone()).or_default();
                r.batches += 1;
                r.records += batch.records.len() as u64;
                s.note_behind(&handle.id, known_max.saturating_sub(base), crate::now_ms());
            });
            let pb::IndexBatch {
                epoch,
                up_to_seq,
                max_seq,
                records,
                folder,
                ..
            } = batch;
            // Validation and the hash check of inline contents run here, beside the engine.
            let checked = tokio::task::spawn_blocking(move || {
                records
                    .into_iter()
                    .map(record_from_pb)
                    .collect::<Vec<Result<Incoming, String>>>()
            })
            .await
            .map_err(|e| perr(format!("checking a batch: {e}")))?;
            let mut records = Vec::with_capacity(checked.len());
            for r in checked {
                match r {
                    Ok(inc) => records.push(inc),
                    Err(problem) => {
                        warn!(peer = %name, folder = %folder, problem = %problem, "refusing a record from peer");
                    }
                }
            }
            let answer = handle
                .queue_remote(RemoteBatch {
                    peer: name.clone(),
                    stream: stream_id,
                    epoch,
                    up_to_seq,
                    records,
                    fetcher: fetcher.clone(),
                    retry: false,
                })
                .await
                .map_err(engine_err)?;
            in_flight.push_back((Box::pin(answer), max_seq));
        }
    }
}

/// Starts one session per configured peer and folder.
pub fn peer_sessions(
    config: &Config,
    node: NodeId,
    folders: Arc<HashMap<String, FolderHandle>>,
    statuses: PeerStatuses,
    names: crate::engine::NodeNames,
    metrics: &crate::metrics::Metrics,
) -> Vec<PeerSession> {
    if let Ok(mut map) = statuses.lock() {
        for p in &config.peers {
            map.insert(
                p.name.clone(),
                PeerStatus {
                    name: p.name.clone(),
                    address: p.address.clone().unwrap_or_default(),
                    ..Default::default()
                },
            );
        }
    }
    let mut handles: Vec<&FolderHandle> = folders.values().collect();
    handles.sort_by(|a, b| a.id.cmp(&b.id));
    config
        .peers
        .iter()
        .flat_map(|p| {
            handles.iter().map(|h| PeerSession {
                node,
                node_name: config.node.clone(),
                peer: p.clone(),
                tls: config.tls.clone(),
                folder: (*h).clone(),
                statuses: statuses.clone(),
                names: names.clone(),
                metrics: metrics.clone(),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Repeated partitions must not push the reconnect of a peer that was healthy a moment
    /// ago to tens of seconds: while it had a session lately, the wait stays at or under
    /// [`BACKOFF_RECENT_MAX`], however often its sessions fail.
    #[test]
    fn a_lately_connected_peer_is_retried_within_a_second_however_often_it_fails() {
        let t0 = Instant::now();
        let mut b = Backoff::default();
        // Connected for 3 s (not a stable session), then 40 failures in a row.
        let first = b.next(t0, Some(Duration::from_secs(3)), false, 0.0);
        assert_eq!(first, BACKOFF_MIN);
        let mut at = t0;
        let mut waits = Vec::new();
        for _ in 0..40 {
            let w = b.next(at, None, false, 0.0);
            waits.push(w);
            at += w;
        }
        assert!(waits.windows(2).all(|w| w[0] <= w[1]), "grows: {waits:?}");
        assert_eq!(waits.last(), Some(&BACKOFF_RECENT_MAX));
        // The same sequence with every session connecting briefly (the peer accepts, then
        // the partition cuts it): still capped at the recent maximum.
        let mut b = Backoff::default();
        let mut at = t0;
        for _ in 0..40 {
            let w = b.next(at, Some(Duration::from_millis(50)), false, 0.0);
            assert!(w <= BACKOFF_RECENT_MAX, "{w:?}");
            at += w + Duration::from_millis(50);
        }
    }

    /// A peer not seen for [`RECENTLY_CONNECTED`] (or never) backs off to [`BACKOFF_MAX`];
    /// a stable session starts over from the minimum; a paused folder retries within
    /// [`PAUSED_RETRY`]; jitter only ever shortens the wait, by at most half.
    #[test]
    fn backoff_caps_restarts_and_jitters() {
        let t0 = Instant::now();
        let mut never = Backoff::default();
        let waits: Vec<Duration> = (0..20).map(|_| never.next(t0, None, false, 0.0)).collect();
        assert_eq!(waits[0], BACKOFF_MIN);
        assert_eq!(waits.last(), Some(&BACKOFF_MAX));

        let mut long_ago = Backoff::default();
        long_ago.next(t0, Some(Duration::from_secs(1)), false, 0.0);
        let later = t0 + RECENTLY_CONNECTED + Duration::from_secs(1);
        let waits: Vec<Duration> = (0..20)
            .map(|_| long_ago.next(later, None, false, 0.0))
            .collect();
        assert_eq!(waits.last(), Some(&BACKOFF_MAX));
        assert_eq!(
            long_ago.next(later, Some(STABLE_SESSION), false, 0.0),
            BACKOFF_MIN,
            "a stable session starts over"
        );

        let mut paused = Backoff::default();
        let waits: Vec<Duration> = (0..20).map(|_| paused.next(t0, None, true, 0.0)).collect();
        assert_eq!(waits.last(), Some(&PAUSED_RETRY));

        let mut j = Backoff::default();
        for _ in 0..20 {
            j.next(t0, None, false, 0.0);
        }
        let full = j.next(t0, None, false, 0.0);
        let halved = j.next(t0, None, false, 0.999_999);
        assert_eq!(full, BACKOFF_MAX);
        assert!(
            halved >= BACKOFF_MAX / 2 && halved < BACKOFF_MAX,
            "{halved:?}"
        );
    }

    fn sample() -> FileRecord {
        let mut version = VersionVector::new();
        version.bump(NodeId(3));
        FileRecord {
            path: RelPath::new("default/api/a.xml").expect("valid"),
            kind: Kind::File,
            deleted: false,
            size: 4,
            mode: 0o644,
            hash: Some(*blake3::hash(b"<a/>").as_bytes()),
            version,
            stamp: Stamp {
                hlc: 99,
                node: NodeId(3),
            },
            seq: 7,
        }
    }

    #[test]
    fn records_round_trip_through_the_wire() {
        let r = sample();
        let back = record_from_pb(record_to_pb(&r, Some(b"<a/>".to_vec()))).expect("valid");
        assert!(back.record.same_version(&r));
        assert_eq!(back.record.seq, 7);
        assert_eq!(
            back.inline.as_ref().map(Inline::as_bytes),
            Some(&b"<a/>"[..])
        );
        // Bytes of the right size but other content do not travel on as verified.
        let forged = record_from_pb(record_to_pb(&r, Some(b"<b/>".to_vec()))).expect("valid");
        assert!(forged.inline.is_none());
    }

    #[test]
    fn hostile_records_are_refused() {
        let good = record_to_pb(&sample(), None);
        let cases: Vec<(pb::Record, &str)> = vec![
            (
                pb::Record {
                    path: "../../etc/passwd".into(),
                    ..good.clone()
                },
                "component",
            ),
            (
                pb::Record {
                    path: "/etc/passwd".into(),
                    ..good.clone()
                },
                "absolute",
            ),
            (
                pb::Record {
                    path: "a/\0b".into(),
                    ..good.clone()
                },
                "NUL",
            ),
            (
                pb::Record {
                    hash: vec![1, 2, 3],
                    ..good.clone()
                },
                "32",
            ),
            (
                pb::Record {
                    hash: vec![],
                    ..good.clone()
                },
                "without a hash",
            ),
            (
                pb::Record {
                    kind: 9,
                    ..good.clone()
                },
                "kind",
            ),
            (
                pb::Record {
                    mode: 0o100000,
                    ..good.clone()
                },
                "mode",
            ),
            (
                pb::Record {
                    version: vec![],
                    ..good.clone()
                },
                "version",
            ),
            (
                pb::Record {
                    inline_data: Some(vec![0; 10].into()),
                    ..good.clone()
                },
                "inline",
            ),
        ];
        for (rec, expect) in cases {
            let path = rec.path.clone();
            match record_from_pb(rec) {
                Ok(_) => panic!("{path}: accepted, expected refusal mentioning {expect}"),
                Err(e) => assert!(e.contains(expect), "{e} should mention {expect}"),
            }
        }
    }

    mod arbitrary_records {
        use super::*;
        use proptest::prelude::*;

        fn any_path() -> impl Strategy<Value = String> {
            prop_oneof![
                "[a-z./]{0,24}",
                "(\\.\\.|/|[a-z]{1,3}|\\x00|\\.){1,8}",
                Just("a".repeat(4000)),
            ]
        }

        fn any_record() -> impl Strategy<Value = pb::Record> {
            (
                (
                    any_path(),
                    -2i32..4,
                    any::<bool>(),
                    any::<u64>(),
                    any::<u32>(),
                ),
                prop::collection::vec(any::<u8>(), 0..40),
                prop::collection::vec((any::<u64>(), any::<u64>()), 0..6),
                (any::<u64>(), any::<u64>(), any::<u64>()),
                prop::option::of(prop::collection::vec(any::<u8>(), 0..48)),
                any::<bool>(),
            )
                .prop_map(
                    |((path, kind, deleted, size, mode), hash, version, stamps, inline, honest)| {
                        let (stamp_hlc, stamp_node, seq) = stamps;
                        let mut r = pb::Record {
                            path,
                            kind,
                            deleted,
                            size,
                            mode,
                            hash,
                            version: version
                                .into_iter()
                                .map(|(node, counter)| pb::VersionEntry { node, counter })
                                .collect(),
                            stamp_hlc,
                            stamp_node,
                            seq,
                            inline_data: inline.map(bytes::Bytes::from),
                        };
                        // Half the cases are made consistent where it is cheap, so the
                        // accepting side is explored as well as the refusing one.
                        if honest {
                            if let Some(data) = &r.inline_data {
                                r.size = data.len() as u64;
                                r.hash = blake3::hash(data).as_bytes().to_vec();
                            }
                            r.stamp_hlc >>= 3;
                            for e in &mut r.version {
                                e.counter >>= 3;
                            }
                            r.mode &= 0o7777;
                        }
                        r
                    },
                )
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(2000))]

            /// Whatever a peer sends, the conversion never panics, and what it accepts keeps
            /// every rule the rest of the node relies on.
            #[test]
            fn any_record_from_a_peer_is_refused_or_sound(p in any_record()) {
                let sent = p.clone();
                match record_from_pb(p) {
                    Err(e) => prop_assert!(!e.is_empty()),
                    Ok(Incoming { record: r, inline }) => {
                        prop_assert_eq!(r.path.as_str(), sent.path.as_str());
                        prop_assert!(RelPath::new(r.path.as_str()).is_ok());
                        prop_assert!(r.stamp.hlc <= MAX_CLOCK_VALUE);
                        prop_assert!(r.version.entries().count() <= MAX_VERSION_ENTRIES);
                        prop_assert!(r.version.entries().all(|(_, c)| c <= MAX_CLOCK_VALUE));
                        prop_assert!(r.version.entries().count() > 0, "a version to compare");
                        prop_assert_eq!(r.mode & !0o777, 0, "only permission bits");
                        if !r.deleted {
                            let owner = if r.kind == Kind::Dir { 0o700 } else { 0o600 };
                            prop_assert_eq!(r.mode & owner, owner);
                        }
                        if r.is_live_file() {
                            prop_assert!(r.hash.is_some());
                            prop_assert!(r.size <= MAX_FILE_BYTES);
                        } else {
                            prop_assert_eq!(r.size, 0);
                        }
                        if let Some(i) = inline {
                            prop_assert_eq!(Some(*i.hash()), r.hash);
                            prop_assert_eq!(*blake3::hash(i.as_bytes()).as_bytes(), *i.hash());
                            prop_assert_eq!(i.as_bytes().len() as u64, r.size);
                        }
                    }
                }
            }
        }
    }
}
