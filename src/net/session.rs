//! The session this node runs to each peer: subscribe, hand batches to the folder engines,
//! fetch contents, reconnect with backoff; and what `status` shows of it.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::io::AsyncWriteExt;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;
use tracing::{debug, info, warn};

use super::{MAX_MESSAGE_BYTES, NetError, channel, record_from_pb};
use crate::config::{Config, PeerConfig, TlsConfig};
use crate::engine::{FetchError, FolderHandle, Incoming, RemoteBatch};
use crate::model::{FolderId, Hash, NodeId, PeerName, RelPath};
use crate::pb::sync as pb;
use crate::pb::sync::peer_client::PeerClient;

/// Batches of one stream handed to the engine and not answered yet: one being finished, one
/// being staged, one checked and waiting.
const BATCHES_IN_FLIGHT: usize = 3;
/// A batch of at most this many records and inline bytes is checked on the session's task
/// (tens of microseconds); a larger one on a blocking thread.
const SMALL_BATCH_RECORDS: usize = 64;
const SMALL_BATCH_INLINE_BYTES: usize = 64 * 1024;
/// Records of the batches received while `BATCHES_IN_FLIGHT` are with the engine, merged into
/// one batch for it at most. Reading on instead of leaving them in the connection's window
/// (8 MiB, hundreds of small batches under a steady flow of edits) keeps the peer's stream
/// moving and hands the engine one batch, one durability pass, for all of them: with ten
/// nodes, a change waited tens of seconds in that window while its batch's turn came.
const MERGED_RECORDS_MAX: usize = 4000;
/// Inline contents of the merged batches at most (a peer's single batch is bounded by the
/// message size anyway).
const MERGED_INLINE_BYTES_MAX: usize = 16 * 1024 * 1024;
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

/// See [`SMALL_BATCH_RECORDS`].
fn is_small_batch(records: usize, inline_bytes: usize) -> bool {
    records <= SMALL_BATCH_RECORDS && inline_bytes <= SMALL_BATCH_INLINE_BYTES
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
    pub behind: HashMap<FolderId, u64>,
    /// Per folder: the peer's index sequence applied here up to (this node's cursor into it).
    #[serde(default)]
    pub applied_seq: HashMap<FolderId, u64>,
    /// Per folder: what came from the peer since this agent started.
    #[serde(default)]
    pub received: HashMap<FolderId, Received>,
    /// Per folder, while `behind` is above 0: when the oldest change of the peer's that this
    /// node knows of and has not applied arrived here (ms since the epoch). Under a steady
    /// flow that is applied promptly it stays recent; it grows only while the oldest change
    /// waits. A change the peer made while disconnected is not known here until it
    /// reconnects.
    #[serde(default)]
    pub behind_since_ms: HashMap<FolderId, u64>,
    /// Folder streams currently up.
    #[serde(skip)]
    pub streams: usize,
}

impl PeerStatus {
    /// Notes that `behind` of the peer's sequence numbers of `folder` are not applied here,
    /// the oldest of them known since `oldest_ms`. With `arrival` (a batch came in, nothing
    /// was applied), an older time already noted stays: the batch may be the same changes
    /// again, after a session that failed to apply them.
    fn note_behind(&mut self, folder: &FolderId, behind: u64, oldest_ms: u64, arrival: bool) {
        self.behind.insert(folder.clone(), behind);
        if behind == 0 {
            self.behind_since_ms.remove(folder);
        } else if arrival {
            let since = self
                .behind_since_ms
                .entry(folder.clone())
                .or_insert(oldest_ms);
            *since = (*since).min(oldest_ms);
        } else {
            self.behind_since_ms.insert(folder.clone(), oldest_ms);
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
pub type PeerStatuses = Arc<Mutex<HashMap<PeerName, PeerStatus>>>;

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
    pub node_name: PeerName,
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
            peer: name.to_string(),
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
            folder: handle.id.to_string(),
            epoch: c.epoch,
            since_seq: c.seq,
            // The peer leaves out what it took unchanged from this index, in this epoch.
            subscriber_epoch: handle.epoch,
        }];
        let subscribe = client.subscribe(pb::SubscribeRequest {
            node_id: self.node.0,
            node_name: self.node_name.to_string(),
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
                peer: name.to_string(),
                folder,
                reason,
            },
            other => perr(other.to_string()),
        };
        // Batches queued to the engine, oldest first, with the peer's max_seq at the time and
        // when each arrived (ms since the epoch).
        let mut in_flight: std::collections::VecDeque<(EngineAnswer, u64, u64)> =
            std::collections::VecDeque::new();
        // How far this node has applied the peer's index (the cursor it subscribed from, in
        // the same epoch), and the peer's largest sequence number known: what lies between
        // is behind, counted from when a batch arrives, not only once it is applied.
        let mut applied_here: Option<u64> = None;
        let mut known_max: u64 = 0;
        // Batches received while the engine had enough, merged (see `MERGED_RECORDS_MAX`).
        let mut waiting: Option<Merged> = None;
        loop {
            if in_flight.len() < BATCHES_IN_FLIGHT {
                if let Some(m) = waiting.take() {
                    let (max_seq, arrived, up_to_seq) = (m.max_seq, m.arrived, m.up_to_seq);
                    let answer = handle
                        .queue_remote(m.into_batch(name.clone(), stream_id, fetcher.clone()))
                        .await
                        .map_err(engine_err)?;
                    debug!(peer = %name, folder = %handle.id, up_to_seq, since_arrival_ms = crate::now_ms().saturating_sub(arrived), "peer batch queued");
                    in_flight.push_back((Box::pin(answer), max_seq, arrived));
                }
            }
            let reading = waiting.as_ref().is_none_or(|m| {
                m.records.len() < MERGED_RECORDS_MAX && m.inline_bytes < MERGED_INLINE_BYTES_MAX
            });
            let next = tokio::select! {
                biased;
                // Answers first: a failure must stop the stream before more is queued.
                applied = async {
                    match in_flight.front_mut() {
                        Some((answer, _, _)) => Pin::as_mut(answer).await,
                        None => std::future::pending().await,
                    }
                } => {
                    let (max_seq, arrived) = in_flight.pop_front().map_or((0, 0), |(_, m, at)| (m, at));
                    let applied = applied.map_err(engine_err)?;
                    applied_here = Some(applied);
                    let now = crate::now_ms();
                    debug!(peer = %name, folder = %handle.id, applied, since_arrival_ms = now.saturating_sub(arrived), "peer batch applied");
                    // The oldest change still waiting: the next batch in flight, or (more of
                    // the peer's index not received yet) from now.
                    let oldest = in_flight.front().map_or(now, |(_, _, at)| *at);
                    set_status(&self.statuses, &name, |s| {
                        s.last_seen_ms = Some(now);
                        s.note_behind(
                            &handle.id,
                            known_max.max(max_seq).saturating_sub(applied),
                            oldest,
                            false,
                        );
                        s.applied_seq.insert(handle.id.clone(), applied);
                    });
                    continue;
                }
                msg = stream.message(), if reading => msg,
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
                    .or_insert_with(|| name.clone());
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
            let arrived = crate::now_ms();
            let oldest = in_flight.front().map_or(arrived, |(_, _, at)| *at);
            set_status(&self.statuses, &name, |s| {
                let r = s.received.entry(handle.id.clone()).or_default();
                r.batches += 1;
                r.records += batch.records.len() as u64;
                s.note_behind(&handle.id, known_max.saturating_sub(base), oldest, true);
            });
            let pb::IndexBatch {
                epoch,
                up_to_seq,
                max_seq,
                records,
                folder,
                ..
            } = batch;
            let records_len = records.len();
            // Validation and the hash check of inline contents: a small batch (most of them
            // under a steady flow, and every relayed batch of a full mesh, often empty) on
            // this task; a large one on a blocking thread, beside the engine.
            let check = move || {
                records
                    .into_iter()
                    .map(record_from_pb)
                    .collect::<Vec<Result<Incoming, String>>>()
            };
            let checked = if is_small_batch(records_len, inline_bytes) {
                check()
            } else {
                tokio::task::spawn_blocking(check)
                    .await
                    .map_err(|e| perr(format!("checking a batch: {e}")))?
            };
            let mut records = Vec::with_capacity(checked.len());
            for r in checked {
                match r {
                    Ok(inc) => records.push(inc),
                    Err(problem) => {
                        warn!(peer = %name, folder = %folder, problem = %problem, "refusing a record from peer");
                    }
                }
            }
            let received = Merged::new(epoch, up_to_seq, max_seq, records, arrived);
            // Queued at the top of the loop when the engine has room; until then merged with
            // the batches that come meanwhile.
            waiting = Some(match waiting.take() {
                None => received,
                Some(m) => m.merge(received).map_err(perr)?,
            });
        }
    }
}

/// One or more consecutive batches of a stream, checked, for the engine as one.
#[derive(Debug)]
struct Merged {
    epoch: u64,
    up_to_seq: u64,
    max_seq: u64,
    records: Vec<Incoming>,
    /// When the first of them arrived (ms since the epoch).
    arrived: u64,
    /// The inline contents of `records`, in bytes.
    inline_bytes: usize,
}

fn inline_len(r: &Incoming) -> usize {
    r.inline.as_ref().map_or(0, |i| i.as_bytes().len())
}

impl Merged {
    fn new(epoch: u64, up_to_seq: u64, max_seq: u64, records: Vec<Incoming>, arrived: u64) -> Self {
        let inline_bytes = records.iter().map(inline_len).sum();
        Self {
            epoch,
            up_to_seq,
            max_seq,
            records,
            arrived,
            inline_bytes,
        }
    }

    /// `self` followed by `next`, the batch after it on the same stream. A path in both keeps
    /// `next`'s record: the peer's index replaced the earlier one with it (a peer sends one
    /// row per path, its newest). Refused when the epochs differ (a stream has one).
    fn merge(mut self, next: Merged) -> Result<Merged, String> {
        if next.epoch != self.epoch {
            return Err(format!(
                "the peer's epoch changed within one stream ({} then {})",
                self.epoch, next.epoch
            ));
        }
        let newer: HashSet<&RelPath> = next.records.iter().map(|r| &r.record.path).collect();
        let mut inline_bytes = self.inline_bytes + next.inline_bytes;
        self.records.retain(|r| {
            let keep = !newer.contains(&r.record.path);
            if !keep {
                inline_bytes -= inline_len(r);
            }
            keep
        });
        self.records.extend(next.records);
        Ok(Merged {
            epoch: self.epoch,
            up_to_seq: next.up_to_seq.max(self.up_to_seq),
            max_seq: next.max_seq.max(self.max_seq),
            records: self.records,
            arrived: self.arrived,
            inline_bytes,
        })
    }

    fn into_batch(
        self,
        peer: PeerName,
        stream: u64,
        fetcher: Arc<dyn crate::engine::Fetcher>,
    ) -> RemoteBatch {
        RemoteBatch {
            peer,
            stream,
            epoch: self.epoch,
            up_to_seq: self.up_to_seq,
            records: self.records,
            fetcher,
            retry: false,
        }
    }
}

/// Starts one session per configured peer and folder.
pub fn peer_sessions(
    config: &Config,
    node: NodeId,
    folders: Arc<HashMap<FolderId, FolderHandle>>,
    statuses: PeerStatuses,
    names: crate::engine::NodeNames,
    metrics: &crate::metrics::Metrics,
) -> Vec<PeerSession> {
    if let Ok(mut map) = statuses.lock() {
        for p in &config.peers {
            map.insert(
                p.name.clone(),
                PeerStatus {
                    name: p.name.to_string(),
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

    /// The lag is the age of the oldest change known and not applied: a steady flow applied
    /// promptly keeps moving it forward; a batch received again after a failed session keeps
    /// the older time; caught up clears it.
    #[test]
    fn the_lag_runs_from_the_oldest_change_still_waiting() {
        let mut s = PeerStatus::default();
        let f = FolderId::literal("f");
        s.note_behind(&f, 5, 1_000, true);
        s.note_behind(&f, 9, 1_100, true);
        assert_eq!(
            s.behind_since_ms.get("f"),
            Some(&1_000),
            "the older one waits"
        );
        // The first batch applied, the second (arrived at 1,100) is now the oldest.
        s.note_behind(&f, 4, 1_100, false);
        assert_eq!(s.behind_since_ms.get("f"), Some(&1_100));
        // The session failed; the same changes arrive again later: still waiting since 1,100.
        s.note_behind(&f, 4, 5_000, true);
        assert_eq!(s.behind_since_ms.get("f"), Some(&1_100));
        s.note_behind(&f, 0, 6_000, false);
        assert_eq!(s.behind_since_ms.get("f"), None, "caught up");
        assert_eq!(s.behind.get("f"), Some(&0));
    }

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

    /// Batches merged while the engine has enough: a path in both keeps the later record, the
    /// cursor and the peer's max move to the later batch's, the wait counts from the first
    /// arrival, and a batch of another epoch is refused (a stream has one).
    #[test]
    fn merged_batches_keep_the_later_record_of_a_path() {
        // Each record carries `seq` bytes inline.
        let incoming = |path: &str, seq: u64| {
            let mut record = crate::model::sample_record();
            record.path = RelPath::new(path).expect("valid");
            record.seq = seq;
            let bytes = vec![b'x'; seq as usize];
            let hash = *blake3::hash(&bytes).as_bytes();
            record.hash = Some(hash);
            Incoming {
                record,
                inline: crate::engine::Inline::verified(bytes, &hash),
            }
        };
        let batch = |epoch, up_to_seq, arrived, records| {
            Merged::new(epoch, up_to_seq, up_to_seq + 5, records, arrived)
        };
        let first = batch(7, 2, 100, vec![incoming("a.xml", 1), incoming("b.xml", 2)]);
        let second = batch(7, 4, 200, vec![incoming("a.xml", 3), incoming("c.xml", 4)]);
        let merged = first.merge(second).expect("same epoch");
        let rows: Vec<(&str, u64)> = merged
            .records
            .iter()
            .map(|r| (r.record.path.as_str(), r.record.seq))
            .collect();
        assert_eq!(rows, [("b.xml", 2), ("a.xml", 3), ("c.xml", 4)]);
        assert_eq!(
            (merged.up_to_seq, merged.max_seq, merged.arrived),
            (4, 9, 100)
        );
        assert_eq!(
            merged.inline_bytes,
            2 + 3 + 4,
            "the replaced record's bytes are gone"
        );
        let other = batch(8, 5, 300, vec![incoming("d.xml", 5)]);
        assert!(merged.merge(other).is_err(), "another epoch is refused");
    }
}
