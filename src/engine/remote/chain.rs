//! The chain of peer batches: the next batch is staged while the one before it is finished on
//! a blocking thread, and a local change waits for the chain (at most `LOCAL_DEFER_MAX`).

use tokio::sync::oneshot;
use tracing::debug;

use crate::engine::handle::{Inbox, Msg};
use crate::engine::local::{merge_changes, waited_enough};
use crate::engine::{EngineError, FolderEngine, RemoteBatch};
use crate::fs::watch::Change;

use super::{InFlight, Reply, Settled};

impl FolderEngine {
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
    ///
    /// Longer than most on purpose: it is one state machine (the batch queued, the one being
    /// finished, the one settled, the deferred local change), whose transitions read best
    /// in one loop.
    pub(in crate::engine) async fn remote_chain(
        &mut self,
        batch: RemoteBatch,
        reply: oneshot::Sender<Result<u64, EngineError>>,
        inbox: &mut Inbox,
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
                    msg = inbox.recv() => Ok(msg),
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::Incoming;
    use crate::engine::testing::*;
    use crate::fs::apply;
    use crate::model::RelPath;

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

    /// A local change sent after peer batches already waiting in the engine's queue is
    /// recorded before them: it has a queue of its own, read first (see `Inbox`), and does not
    /// wait for the batches queued ahead of it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_local_change_is_recorded_before_the_peer_batches_queued_ahead_of_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let own = std::sync::Arc::new(crate::fs::own::OwnWrites::default());
        let (engine, handle, inbox, store) = engine_opened(dir.path(), 60_000, &["gw2"], own).await;
        let root = dir.path().join("root");
        let mut answers = Vec::new();
        for b in 0..5u64 {
            let records = (0..20)
                .map(|i| {
                    let n = b * 20 + i;
                    remote_file(
                        &format!("p/{n}.xml"),
                        format!("<p n=\"{n}\"/>").as_bytes(),
                        n + 1,
                        true,
                    )
                })
                .collect();
            answers.push(
                handle
                    .queue_remote(batch(9, (b + 1) * 20, records))
                    .await
                    .expect("queued"),
            );
        }
        std::fs::write(root.join("local.xml"), b"<local/>").expect("write");
        handle
            .local(Change::Paths(vec![
                RelPath::new("local.xml").expect("valid"),
            ]))
            .await
            .expect("sent");
        let (cancel, task) = run_engine(engine, inbox);
        for a in answers {
            a.await.expect("applied");
        }
        let local = row_of(&store, "local.xml").await.record.seq;
        let rows = store
            .since("synapse-configs", 0, 10_000, None)
            .await
            .expect("since");
        let peer_seqs: Vec<u64> = rows
            .iter()
            .filter(|r| r.record.path.as_str().starts_with("p/"))
            .map(|r| r.record.seq)
            .collect();
        assert_eq!(peer_seqs.len(), 100);
        assert!(
            peer_seqs.iter().all(|s| *s > local),
            "local.xml got seq {local}, peer records {peer_seqs:?}"
        );
        cancel.cancel();
        task.await.expect("engine task");
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
}
