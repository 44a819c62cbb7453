//! Settling a staged peer batch once its disk ops are done: the replica, the skip book, the
//! index commit with the peer cursor, and the session's answer.

use std::collections::{BTreeSet, HashMap};

use tracing::{debug, info, warn};

use crate::engine::skip::node_wide;
use crate::engine::{EngineError, FolderEngine};
use crate::fs::apply;
use crate::model::{FileRecord, Kind, PeerName, RelPath};
use crate::store::{Cursor, Journal, Origin, StoredRecord};

use super::{PreparedRemote, Reply, Settled};

impl FolderEngine {
    /// Second half of a peer batch, once its disk operations are done (`joined`: the finish
    /// task's outcome): commits what landed to the replica and says how far the batch got.
    /// The index commit follows in [`Self::record_remote`]. A batch of a stream that failed
    /// meanwhile records what landed but does not move the peer's cursor.
    ///
    /// Longer than most on purpose: it is the batch's bookkeeping in the order the index
    /// needs (the merges, the ops in op order, the records already on disk, then the skip
    /// book and the cursor), kept in one place so that order stays visible.
    pub(in crate::engine) fn settle_remote(
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
            journal,
            started,
            ..
        } = prepared;
        // Only the exact version the peer sent has come from it (see `Origin`): a new path or
        // a dominating version, not a concurrent merge or a delete-vs-modify rewrite, which
        // the peer has not seen.
        let origin = |as_sent: bool| {
            as_sent.then(|| Origin {
                peer: peer.to_string(),
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
        let now = crate::now_ms();
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
                    self.metrics
                        .applied_remote(crate::model::Hlc::millis(remote.stamp.hlc), now);
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
        let skips = self.skip_failures(&peer, retry, &paths, &mut fails, crate::now_ms());
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
            journal,
            started,
        }
    }

    /// Records a settled batch in the index and answers its session.
    pub(in crate::engine) async fn record_settled(&mut self, settled: Option<(Settled, Reply)>) {
        let Some((done, reply)) = settled else { return };
        let stream = done.stream;
        let started = done.started;
        let t = std::time::Instant::now();
        let r = self.record_remote(done).await;
        if r.is_ok() {
            self.metrics.applied_batch(started.elapsed());
        }
        self.live.progress();
        debug!(folder = %self.id, commit_us = t.elapsed().as_micros() as u64, "batch recorded");
        self.note_outcome(stream, &r);
        // Status shows the batch by the time its session hears back.
        self.publish_status();
        let _ = reply.send(r);
    }

    fn lazy_cursors(&self) -> std::sync::MutexGuard<'_, HashMap<PeerName, Cursor>> {
        self.lazy_cursors
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub(in crate::engine) fn has_lazy_cursors(&self) -> bool {
        !self.lazy_cursors().is_empty()
    }

    /// Writes the cursors of batches that changed nothing (see `LazyCursors`). Each stays
    /// readable by the handle until the index holds it, and one moved meanwhile stays for
    /// the next flush.
    pub(in crate::engine) async fn flush_lazy_cursors(&mut self) {
        let cursors: Vec<(PeerName, Cursor)> = self
            .lazy_cursors()
            .iter()
            .map(|(p, c)| (p.clone(), *c))
            .collect();
        if cursors.is_empty() {
            return;
        }
        match self.store.put_cursors(&self.id, &cursors).await {
            Ok(()) => {
                let mut lazy = self.lazy_cursors();
                for (peer, c) in cursors {
                    if lazy.get(&peer) == Some(&c) {
                        lazy.remove(&peer);
                    }
                }
            }
            Err(e) => {
                // Kept in memory: the peers resend a little more after a restart.
                debug!(folder = %self.id, error = %e, "cannot write peer cursors yet");
            }
        }
    }

    /// Commits index-only decisions to the replica; returns them as rows for the index.
    pub(in crate::engine) fn commit_stores(
        &mut self,
        stores: Vec<FileRecord>,
    ) -> Vec<StoredRecord> {
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

    /// Commits a settled batch to the index (with the peer cursor, in one transaction).
    pub(in crate::engine) async fn record_remote(
        &mut self,
        done: Settled,
    ) -> Result<u64, EngineError> {
        let Settled {
            peer,
            commits,
            cursor,
            applied,
            appeared,
            skips,
            outcome,
            journal,
            ..
        } = done;
        let changed_nothing = commits.is_empty()
            && skips.set.is_empty()
            && skips.cleared.is_empty()
            && journal.is_none()
            && appeared.is_empty();
        match cursor {
            // Every record was known here already: only the cursor moves, and it is written
            // later (see `LazyCursors`), not in a commit of its own.
            Some(c) if changed_nothing => {
                self.lazy_cursors().insert(peer.clone(), c);
                return outcome;
            }
            _ => {}
        }
        self.store
            .commit_journaled(
                &self.id,
                &commits,
                cursor.map(|c| (peer.as_str(), c)),
                &skips,
                journal.map_or(Journal::Keep, Journal::Batch),
            )
            .await?;
        if cursor.is_some() {
            // The index now holds this peer's newest cursor.
            self.lazy_cursors().remove(&peer);
        }
        if !commits.is_empty() {
            self.seq_tx.send_replace(self.replica.seq());
        }
        if applied > 0 {
            info!(folder = %self.id, peer = %peer, count = applied, "applied peer changes");
        }
        if !appeared.is_empty() {
            // The files an apply met changed: once the marks are current, a file a writer
            // is still at is left to the watcher's hand-over at its close (`observe` skips
            // it), never looked at half-written.
            self.sync_marks();
            if let Err(e) = self.observe(appeared).await {
                warn!(folder = %self.id, error = %e, "cannot look at files that appeared meanwhile");
            }
        }
        outcome
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::testing::*;
    use crate::fs::watch::Change;
    use crate::model::Hlc;

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
    /// subscriber has) is answered like any other, but commits nothing: its cursor is one of
    /// the lazy ones, which the handle reads at once and the index gets by the engine's stop.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_empty_batch_moves_the_peer_cursor_without_a_commit_of_its_own() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (handle, store, cancel, task) = engine_on(dir.path()).await;
        let seq = handle.status().seq;
        assert_eq!(
            handle.remote(batch(1, 42, Vec::new())).await.expect("ok"),
            42
        );
        let c = handle.cursor("gw2").await.expect("cursor");
        assert_eq!((c.epoch, c.seq), (5, 42), "a resubscribe starts after it");
        assert_eq!(
            handle.status().seq,
            seq,
            "nothing was committed but the cursor"
        );
        cancel.cancel();
        task.await.expect("engine task");
        let c = store
            .cursor("gw2", "synapse-configs")
            .await
            .expect("cursor");
        assert_eq!((c.epoch, c.seq), (5, 42), "written when the engine stops");
    }

    /// A batch of records this node already has (each change also comes relayed by every
    /// other peer of a full mesh) changes nothing in the index; the next batch that does
    /// change something writes its cursor in its own commit, superseding the lazy one.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn known_records_move_the_cursor_lazily_and_a_real_commit_supersedes_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (handle, store, cancel, task) = engine_on(dir.path()).await;
        let x = remote_file("x.xml", b"<x/>", 1, true);
        assert_eq!(
            handle
                .remote(batch(1, 1, vec![x.clone()]))
                .await
                .expect("ok"),
            1
        );
        let seq = handle.status().seq;
        let mut again = x.clone();
        again.record.seq = 7;
        assert_eq!(
            handle.remote(batch(1, 7, vec![again])).await.expect("ok"),
            7
        );
        assert_eq!(
            handle.status().seq,
            seq,
            "a known record is not recorded again"
        );
        assert_eq!(handle.cursor("gw2").await.expect("cursor").seq, 7);
        let y = remote_file("y.xml", b"<y/>", 8, true);
        assert_eq!(handle.remote(batch(1, 8, vec![y])).await.expect("ok"), 8);
        let c = store
            .cursor("gw2", "synapse-configs")
            .await
            .expect("cursor");
        assert_eq!(c.seq, 8, "committed with the batch that changed something");
        assert_eq!(handle.cursor("gw2").await.expect("cursor").seq, 8);
        cancel.cancel();
        task.await.expect("engine task");
    }
}
