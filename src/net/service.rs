//! The `Peer` service every node serves: subscriptions to its folder indexes (bounded per
//! connection and in total) and the contents peers fetch.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};
use tracing::{debug, info, warn};

use super::{MAX_MESSAGE_BYTES, record_to_pb};
use crate::engine::{Feed, FolderHandle, ServeError};
use crate::model::{FolderId, Hash, NodeId, PeerName, RelPath};
use crate::pb::sync as pb;
use crate::pb::sync::peer_server::Peer;
use crate::store::Origin;

/// Subscription streams one connection may hold open at once (a peer opens one per folder),
/// and all connections together: each stream may pin a few batches in memory while its
/// subscriber does not read (see the README's "Memory" notes).
const MAX_SUBSCRIPTIONS_PER_CONNECTION: usize = 8;
const MAX_SUBSCRIPTIONS: usize = 64;
/// Chunk size of large-file transfers.
const CHUNK_BYTES: usize = 1024 * 1024;

// ---------------------------------------------------------------- server

/// The `Peer` service: streams this node's folder indexes and serves file contents.
#[derive(Clone)]
pub struct PeerService {
    node: NodeId,
    node_name: PeerName,
    folders: Arc<HashMap<FolderId, FolderHandle>>,
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
        node_name: PeerName,
        folders: Arc<HashMap<FolderId, FolderHandle>>,
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
    folder: FolderId,
    epoch: u64,
    tx: mpsc::Sender<Result<pb::IndexBatch, Status>>,
    subscriber: PeerName,
) {
    let link = svc.metrics.link(&subscriber, &folder);
    // Inline bytes of this folder's batch last queued: once a place is free again, the
    // stream took it (see `Feed::taken`).
    let mut queued_inline: Option<u64> = None;
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
        if let Some(wait) = feed.hold_for(&pending) {
            // Only rows relayed from peers: more may come to go with them (the rows are read
            // again then, from memory).
            tokio::select! {
                _ = svc.cancel.cancelled() => return,
                _ = tx.closed() => return,
                _ = tokio::time::sleep(wait) => {}
                // A change of this node's own is not held: look again.
                changed = feed.changed() => if !changed { return },
            }
            continue;
        }
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
        // The queue holds one batch: a place free means the one queued before was taken.
        if let Some(bytes) = queued_inline.take() {
            feed.taken(bytes);
        }
        // Rows read before the wait for a place are a snapshot: under backpressure (a slow
        // subscriber) the wait can be long, and everything committed meanwhile goes too,
        // in this batch, not one small batch per wake.
        let pending = if feed.moved_since(&pending) {
            match feed.next_rows().await {
                Ok(Some(fresh)) => fresh,
                Ok(None) => pending,
                Err(e) => {
                    warn!(folder = %folder, peer = %subscriber, error = %e, "cannot read index for peer");
                    let _ = tx.send(Err(Status::internal(e.to_string()))).await;
                    return;
                }
            }
        } else {
            pending
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
            node_name: svc.node_name.to_string(),
            folder: folder.to_string(),
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
        queued_inline = Some(inline_bytes as u64);
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
        // The name is the subscriber's key here (its origins, its metrics, the logs): a name
        // the cluster could not have configured is refused before anything uses it.
        let subscriber = PeerName::new(request.get_ref().node_name.as_str())
            .map_err(|e| Status::invalid_argument(format!("subscriber: {e}")))?;
        crate::identity::authorize_subscriber(&request, &subscriber)?;
        let connection = request.remote_addr();
        let req = request.into_inner();
        if req.node_id == self.node.0 {
            return Err(Status::failed_precondition(
                "a node cannot subscribe to itself (check peer addresses)",
            ));
        }
        let cursors = merge_cursors(req.folders, |f| self.folders.contains_key(f))?;
        let slot = Slot::take(&self.slots, connection).inspect_err(|e| {
            warn!(peer = %subscriber, remote = ?connection, error = %e.message(), "subscription refused");
        })?;
        info!(peer = %subscriber, folders = cursors.len(), "peer subscribed");
        // One batch queued ahead of the one on the wire (plus one per folder waiting to be
        // queued): batches grow to 16 MiB, and a deeper queue only held more of them in memory
        // while the receiver, the slower side, worked (4 queued: no faster initial sync).
        let (tx, rx) = mpsc::channel(1);
        for cursor in cursors {
            let Some(handle) = self.folders.get(cursor.folder.as_str()) else {
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
                peer: subscriber.to_string(),
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
            .get(req.folder.as_str())
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
