//! Peer batches: the model's `receive`, a re-check of the disk, fetches, a staged batched apply,
//! and an index commit with the peer cursor. Batches are chained (`chain`): one is staged
//! (`stage`) while the one before is finished and committed (`settle`).

use std::collections::{BTreeSet, HashSet};

use tokio::sync::oneshot;

use crate::engine::skip::Failures;
use crate::engine::{EngineError, FolderEngine, RemoteBatch};
use crate::fs::apply;
use crate::model::{FileRecord, PeerName, RelPath};
use crate::store::{Cursor, SkipChanges, StoredRecord};

mod chain;
mod settle;
mod stage;

/// A peer batch decided and staged, waiting for its durability and placement.
pub(in crate::engine) struct PreparedRemote {
    peer: PeerName,
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
    /// The batch's records are journaled under this id (see `Store::journal_applying`)
    /// until its commit.
    journal: Option<u64>,
    /// When its decisions began (the apply batch duration metric).
    started: std::time::Instant,
}

/// How a batch's session is answered: the peer sequence applied up to.
pub(in crate::engine) type Reply = oneshot::Sender<Result<u64, EngineError>>;

/// A batch on disk and committed to the replica, waiting for its index commit.
pub(in crate::engine) struct Settled {
    peer: PeerName,
    stream: u64,
    commits: Vec<StoredRecord>,
    /// The peer's new cursor; `None` when the stream failed meanwhile.
    cursor: Option<Cursor>,
    applied: usize,
    /// New files that met a local file at their path (looked at after the commit).
    appeared: BTreeSet<RelPath>,
    skips: SkipChanges,
    outcome: Result<u64, EngineError>,
    journal: Option<u64>,
    /// When its decisions began (see [`PreparedRemote`]).
    started: std::time::Instant,
}

/// A prepared batch being finished on a blocking thread.
pub(in crate::engine) struct InFlight {
    prepared: PreparedRemote,
    finishing: tokio::task::JoinHandle<Vec<apply::OpResult>>,
    reply: oneshot::Sender<Result<u64, EngineError>>,
}

/// How many failed streams an engine remembers. A session resubscribes on a new stream id
/// right after a failure, so only streams with batches still queued matter.
pub(in crate::engine) const FAILED_STREAMS_KEPT: usize = 16;

/// Large contents of one batch fetched from the peer at the same time.
pub(in crate::engine) const FETCHES_AT_ONCE: usize = 4;

impl FolderEngine {
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
        if !matches!(
            e,
            EngineError::StreamFailed { .. } | EngineError::IndexUnwritable { .. }
        ) {
            self.note_error(e);
        }
        self.note_index_failure(e);
        if !self.failed_streams.contains(&stream) {
            if self.failed_streams.len() == FAILED_STREAMS_KEPT {
                self.failed_streams.pop_front();
            }
            self.failed_streams.push_back(stream);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::testing::*;

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
}
