//! What a subscriber is sent: a folder's index rows after its cursor, in batches that grow
//! while they fill, with the contents of small files read inline. The `net` edge only turns a
//! [`FeedBatch`] into its wire form and streams it; the batching policy and the file reads are
//! the engine's (the protocol layer only encodes).

use std::path::Path;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::model::{FileRecord, Kind, NodeId};
use crate::store::{Origin, StoreError, StoredRecord};

use super::FolderHandle;

/// Records per index batch, and the inline bytes one batch may carry, at first. A stream
/// that keeps filling its batches (an initial sync, a large copy) grows them fourfold per
/// batch, up to `BATCH_GROWTH` times the inline bytes (16 MiB) and `BATCH_GROWTH / 4` times the
/// records, so the receiver pays its per-batch durability (a `syncfs`, the directory syncs, an
/// index commit) fewer times; one that catches up starts small again, so a single change
/// still goes out alone. Starting small also keeps what a subscriber that never reads pins:
/// the batch its transport took last (beyond its HTTP/2 window) and the one queued, at most
/// 4 MiB of contents each, since batches grow past 4 MiB only for a subscriber that has taken
/// [`FULL_GROWTH_TAKEN`] (see [`Feed::taken`]).
const BATCH_RECORDS: u32 = 1000;
const BATCH_INLINE_BYTES: u64 = 1024 * 1024;
const BATCH_GROWTH: u32 = 16;
/// Inline contents a subscriber's stream must have taken before its batches may grow past 4
/// times the base. Before, a subscriber that stopped reading could be handed a third, 16 MiB
/// batch to pin: its transport took the first two within its window, and which batch sat in
/// the queue when the window closed was a matter of timing (1.1-1.3 GiB for 62 stalled
/// subscribers against 0.56 GiB, in the sync bench's (d)). A subscriber that reads takes
/// this within its first five batches; one that never reads takes its window and a batch
/// (about 5 MiB in the bench). 16 MiB kept the bench's initial sync as fast as before (32
/// MiB slowed it by about 8 %: more of the tree went in 4 MiB batches).
const FULL_GROWTH_TAKEN: u64 = 16 * 1024 * 1024;
/// Record metadata one batch may carry, whatever its scale: with the inline budget this keeps
/// a batch far below the largest gRPC message (`net::MAX_MESSAGE_BYTES`) even when every record
/// has the largest path and version vector a peer may send, so a relayed record can never make
/// a batch unsendable.
const BATCH_META_BYTES: u64 = 16 * 1024 * 1024;

/// How long a batch of only relayed rows (each one came from a peer, unchanged) waits after
/// the batch before it, to take more with it. In a mesh every change reaches a node from each
/// of its peers: the node that got it first relays it to the others, who mostly have it
/// already, and a batch per change per subscriber was most of a loaded mesh's work. A row of
/// this node's own (a local change, a merge) is never held, and takes the held ones along.
/// A subscriber that can only get a change relayed (its link to the origin is down) gets it
/// this much later at most.
pub const RELAY_HOLD: Duration = Duration::from_millis(50);

/// One folder's index as one subscriber is fed it: the rows after `since`, then new rows as
/// they are committed. Rows whose origin is `skip` (the subscriber itself, in its current
/// epoch) are left out; the cursor still moves past them, in a batch without records if need
/// be. Made by [`FolderHandle::feed`].
pub struct Feed {
    handle: FolderHandle,
    seq_rx: watch::Receiver<u64>,
    since: u64,
    subscriber: NodeId,
    skip: Option<Origin>,
    inline_max: u64,
    announced: bool,
    /// Rows read but cut off the last batch, with the folder's sequence when they were read:
    /// they make the start of the next batch while nothing has been recorded since (a newer
    /// record would have replaced some of them in the index).
    ahead: Option<(u64, Vec<StoredRecord>)>,
    /// How many times the base batch size the next batch may be (see `BATCH_GROWTH`).
    scale: u32,
    /// Inline bytes of the batches the subscriber's stream has taken (see [`Feed::taken`]).
    taken: u64,
    /// When the last batch was built (see [`RELAY_HOLD`]).
    last_built: Option<Instant>,
}

/// The rows of the next batch, read from the index, contents not read yet (see
/// [`Feed::build`]).
pub struct PendingBatch {
    rows: Vec<StoredRecord>,
    /// The read saw every row committed up to `current`.
    complete: bool,
    /// The folder's sequence when the rows were read.
    current: u64,
    read_at: Instant,
}

/// A batch for one subscriber: records with the contents that travel inline.
pub struct FeedBatch {
    /// The subscriber's cursor once it has this batch.
    pub up_to_seq: u64,
    /// The folder's sequence when the batch was read (at least `up_to_seq`).
    pub max_seq: u64,
    pub records: Vec<(StoredRecord, Option<Vec<u8>>)>,
    /// When its rows were read from the index, and how long reading its contents took.
    pub read_at: Instant,
    pub read: Duration,
}

impl FolderHandle {
    /// Feeds this folder's index to `subscriber` from its cursor `since`, leaving out the rows
    /// of origin `skip`; files up to `inline_max` bytes travel inline.
    pub fn feed(
        &self,
        since: u64,
        subscriber: NodeId,
        skip: Option<Origin>,
        inline_max: u64,
    ) -> Feed {
        Feed {
            handle: self.clone(),
            seq_rx: self.subscribe_seq(),
            since,
            subscriber,
            skip,
            inline_max,
            announced: false,
            ahead: None,
            scale: 1,
            taken: 0,
            last_built: None,
        }
    }
}

impl Feed {
    /// Reads the rows of the next batch: `None` when there is nothing to send until the
    /// folder's sequence moves (see [`Feed::changed`]).
    pub async fn next_rows(&mut self) -> Result<Option<PendingBatch>, StoreError> {
        self.seq_rx.borrow_and_update();
        let current = *self.seq_rx.borrow();
        // The rows kept from the last read, topped up to a full batch's rows.
        let mut rows = match self.ahead.take() {
            Some((read_at, rows)) if read_at == current => rows,
            _ => Vec::new(),
        };
        let from = rows.last().map_or(self.since, |r| r.record.seq);
        let limit = batch_records(self.scale);
        let want = limit.saturating_sub(u32::try_from(rows.len()).unwrap_or(limit));
        let more = if want > 0 {
            let h = &self.handle;
            h.store.since(&h.id, from, want, self.skip.as_ref()).await?
        } else {
            Vec::new()
        };
        // A read that came back short saw every row committed up to `current` (sequence
        // numbers reach the index in order, before the folder's seq announces them).
        let complete = more.len() < want as usize;
        rows.extend(more);
        let read_at = Instant::now();
        if !rows.is_empty() || !self.announced || (complete && current > self.since) {
            Ok(Some(PendingBatch {
                rows,
                complete,
                current,
                read_at,
            }))
        } else {
            Ok(None)
        }
    }

    /// True when the folder has committed more since `pending` was read.
    pub fn moved_since(&self, pending: &PendingBatch) -> bool {
        *self.seq_rx.borrow() != pending.current
    }

    /// How long `pending` should wait before it is read again and sent (see
    /// [`RELAY_HOLD`]); `None` to send it now.
    pub fn hold_for(&self, pending: &PendingBatch) -> Option<Duration> {
        relay_hold(
            &pending.rows,
            pending.complete && self.announced,
            self.last_built.map(|t| t.elapsed()),
        )
    }

    /// Reads the inline contents of a batch's rows (on blocking threads) and cuts the batch
    /// to its budget; the rows cut off start the next batch. `None` when the blocking task
    /// failed.
    pub async fn build(&mut self, pending: PendingBatch) -> Option<FeedBatch> {
        let PendingBatch {
            rows,
            complete,
            current,
            read_at,
        } = pending;
        let root = self.handle.root.clone();
        let (inline_max, subscriber) = (self.inline_max, self.subscriber);
        let budget = BATCH_INLINE_BYTES * u64::from(self.scale);
        let (rows, inline, rest) = tokio::task::spawn_blocking(move || {
            let mut rows = rows;
            let (inline, rest) = read_inline(&root, &mut rows, inline_max, subscriber, budget);
            (rows, inline, rest)
        })
        .await
        .ok()?;
        let read = read_at.elapsed();
        let last = rows.last().map_or(self.since, |r| r.record.seq);
        // Past the rows left out, too, when nothing read is held back for the next batch.
        let up_to = if complete && rest.is_empty() {
            last.max(current)
        } else {
            last
        };
        self.scale = next_batch_scale(self.scale, complete && rest.is_empty(), self.taken);
        self.ahead = Some((current, rest));
        self.announced = true;
        self.last_built = Some(Instant::now());
        self.since = up_to;
        Some(FeedBatch {
            up_to_seq: up_to,
            max_seq: current.max(up_to),
            records: rows.into_iter().zip(inline).collect(),
            read_at,
            read,
        })
    }

    /// Notes that the subscriber's stream took a batch of `inline_bytes` of contents off its
    /// queue (its transport wanted more): what lets batches grow to full size.
    pub fn taken(&mut self, inline_bytes: u64) {
        self.taken = self.taken.saturating_add(inline_bytes);
    }

    /// Waits until the folder's sequence moves; `false` once the engine is gone.
    pub async fn changed(&mut self) -> bool {
        self.seq_rx.changed().await.is_ok()
    }
}

/// How long a caught-up batch (`complete`) of `rows` waits when the last batch was built
/// `since_last` ago: only rows relayed from peers (or none, a batch that only moves the
/// cursor) wait, until [`RELAY_HOLD`] has passed since the last batch.
fn relay_hold(
    rows: &[StoredRecord],
    complete: bool,
    since_last: Option<Duration>,
) -> Option<Duration> {
    let since_last = since_last?;
    let relayed_only = rows.iter().all(|r| r.origin.is_some());
    (complete && relayed_only && since_last < RELAY_HOLD).then(|| RELAY_HOLD - since_last)
}

/// Reads the content of small live files for inline transfer, on a few threads.
/// The batch is cut before the first small file that no longer fits the batch's inline budget,
/// so it travels inline in the next batch instead of costing a fetch round trip; the rows
/// cut off are returned with the contents.
/// A version the subscriber wrote itself travels without content: it has those bytes (and in
/// the rare case it does not any more, it fetches them).
///
/// The bytes are not hashed here: the receiver checks every inline content against the
/// record's hash anyway, and fetches when they differ (a file changed since it was indexed;
/// its newer record follows). Only a file of another size is left out.
fn read_inline(
    root: &Path,
    rows: &mut Vec<StoredRecord>,
    inline_max: u64,
    subscriber: NodeId,
    mut budget: u64,
) -> (Vec<Option<Vec<u8>>>, Vec<StoredRecord>) {
    let mut rest = Vec::new();
    let mut wanted = Vec::with_capacity(rows.len());
    let mut meta_budget = BATCH_META_BYTES;
    for (i, row) in rows.iter().enumerate() {
        let r = &row.record;
        let inline = !r.deleted
            && r.kind == Kind::File
            && r.size <= inline_max
            && r.stamp.node != subscriber;
        let meta = record_meta_bytes(r);
        if i > 0 && ((inline && r.size > budget) || meta > meta_budget) {
            rest = rows.split_off(i);
            break;
        }
        meta_budget = meta_budget.saturating_sub(meta);
        if inline {
            budget = budget.saturating_sub(r.size);
        }
        wanted.push(inline);
    }
    let jobs: Vec<(&StoredRecord, bool)> = rows.iter().zip(wanted).collect();
    let threads = crate::fs::par::threads_for(jobs.len());
    // Never through a symlink: a file replaced by a link since it was indexed is fetched
    // instead (and the fetch is refused).
    let root = crate::fs::beneath::Root::open(root).ok();
    let inline = crate::fs::par::map(&jobs, threads, |(row, inline)| {
        let r = &row.record;
        if !inline {
            return None;
        }
        let mut file = root.as_ref()?.open_file(&r.path).ok()?;
        let mut bytes = Vec::with_capacity(usize::try_from(r.size).ok()? + 1);
        std::io::Read::read_to_end(&mut file, &mut bytes).ok()?;
        (bytes.len() as u64 == r.size).then_some(bytes)
    });
    (inline, rest)
}

/// About what a record's metadata takes on the wire, rounded up (path, version vector,
/// the fixed fields and their tags).
fn record_meta_bytes(r: &FileRecord) -> u64 {
    r.path.as_str().len() as u64 + 24 * r.version.entries().count() as u64 + 128
}

/// The size of the next batch, in base batches: a full batch (cut by rows or by bytes) means
/// more is waiting, so the next one may be four times as large, up to `BATCH_GROWTH` once the
/// subscriber has `taken` [`FULL_GROWTH_TAKEN`] and 4 before; a batch that took everything
/// there was starts the next one small again.
fn next_batch_scale(scale: u32, caught_up: bool, taken: u64) -> u32 {
    let most = if taken >= FULL_GROWTH_TAKEN {
        BATCH_GROWTH
    } else {
        4
    };
    if caught_up {
        1
    } else {
        scale.saturating_mul(4).clamp(1, most)
    }
}

/// Records the next batch may carry at `scale`: the base up to 4 MiB of contents, then more
/// in step with the bytes.
fn batch_records(scale: u32) -> u32 {
    BATCH_RECORDS * (scale / 4).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::RelPath;

    use crate::model::sample_record as sample;

    #[test]
    fn batches_grow_while_they_fill_and_start_small_once_caught_up() {
        let mut scale = 1;
        let mut seen = Vec::new();
        for _ in 0..5 {
            scale = next_batch_scale(scale, false, FULL_GROWTH_TAKEN);
            seen.push(scale);
        }
        assert_eq!(seen, [4, 16, 16, 16, 16]);
        // A subscriber that has not taken enough yet (it may never read) gets 4 MiB at most.
        let mut slow = 1;
        for _ in 0..5 {
            slow = next_batch_scale(slow, false, FULL_GROWTH_TAKEN - 1);
            assert!(slow <= 4, "{slow}");
        }
        assert_eq!(next_batch_scale(slow, false, FULL_GROWTH_TAKEN), 16);
        assert_eq!(
            [1, 4, 16].map(batch_records),
            [1000, 1000, 4000],
            "records grow with the bytes past 4 MiB"
        );
        assert_eq!(next_batch_scale(scale, true, FULL_GROWTH_TAKEN), 1);
        assert_eq!(next_batch_scale(0, false, 0), 1);
    }

    #[test]
    fn a_batch_carries_inline_contents_up_to_its_budget() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut rows = Vec::new();
        for i in 0..4u64 {
            let mut r = sample();
            r.path = RelPath::new(&format!("f{i}.xml")).expect("valid");
            r.size = 100;
            r.seq = i + 1;
            std::fs::write(dir.path().join(r.path.as_str()), [b'x'; 100]).expect("write");
            rows.push(StoredRecord {
                record: r,
                stat: None,
                origin: None,
            });
        }
        let mut small = rows.clone();
        let (inline, rest) = read_inline(dir.path(), &mut small, 1000, NodeId(9), 250);
        assert_eq!((inline.len(), small.len(), rest.len()), (2, 2, 2));
        assert!(
            inline
                .iter()
                .all(|c| c.as_ref().is_some_and(|b| b.len() == 100))
        );
        let mut large = rows;
        let (inline, rest) = read_inline(dir.path(), &mut large, 1000, NodeId(9), 1000);
        assert_eq!((inline.len(), rest.len()), (4, 0));
    }

    /// Only a caught-up batch of relayed rows (or of none) waits, and only until
    /// `RELAY_HOLD` has passed since the last batch; a row of this node's own goes at once.
    #[test]
    fn only_relayed_rows_wait_for_more_and_never_past_the_hold() {
        let row = |origin: Option<&str>| StoredRecord {
            record: sample(),
            stat: None,
            origin: origin.map(|p| Origin {
                peer: p.into(),
                epoch: 1,
            }),
        };
        let relayed = vec![row(Some("gw2")), row(Some("gw3"))];
        let ms = Duration::from_millis;
        assert_eq!(
            relay_hold(&relayed, true, Some(ms(10))),
            Some(RELAY_HOLD - ms(10))
        );
        assert_eq!(
            relay_hold(&[], true, Some(ms(0))),
            Some(RELAY_HOLD),
            "cursor only"
        );
        assert_eq!(
            relay_hold(&relayed, true, Some(RELAY_HOLD)),
            None,
            "held long enough"
        );
        assert_eq!(relay_hold(&relayed, true, None), None, "the first batch");
        assert_eq!(
            relay_hold(&relayed, false, Some(ms(1))),
            None,
            "catching up"
        );
        let mixed = vec![row(Some("gw2")), row(None)];
        assert_eq!(
            relay_hold(&mixed, true, Some(ms(1))),
            None,
            "an own row goes at once"
        );
    }
}
