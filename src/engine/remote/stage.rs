//! Staging a peer batch: decide each record with the model, re-check the disk, fetch large
//! contents, and stage the disk ops (nothing placed yet).

use std::collections::{BTreeSet, HashSet};
use std::path::PathBuf;
use std::sync::Arc;

use tracing::{debug, warn};

use crate::engine::plan::{self, Step};
use crate::engine::skip::{Failures, node_wide};
use crate::engine::{
    EngineError, FetchError, Fetcher, FolderEngine, Incoming, Inline, RemoteBatch, block,
};
use crate::fs::apply::{Content, Op};
use crate::fs::{apply, scan};
use crate::model::{Decision, FileRecord, Hash, Kind, RelPath};
use crate::store::SkipChanges;

use super::{FETCHES_AT_ONCE, PreparedRemote};

/// A record to put on disk: (record decided, record as the peer sent it, conflict copy,
/// content that travelled inline).
type Applying = (FileRecord, FileRecord, bool, Option<Inline>);

/// Longest wait for the watcher to confirm the writing marks are current.
const MARKS_SYNC_WAIT: std::time::Duration = std::time::Duration::from_millis(200);

/// A content to fetch: (record decided, record as the peer sent it, its hash, `new`,
/// `expect`; see [`Step::Fetch`]).
type PendingFetch = (
    FileRecord,
    FileRecord,
    Hash,
    bool,
    Option<crate::fs::apply::Expected>,
);

/// The disk side of a batch, planned (see `plan_applies`).
struct Planned {
    /// Ops whose content is here or travelled inline.
    ops: Vec<Op>,
    /// (record decided, record as the peer sent it) of each op, in op order.
    op_meta: Vec<(FileRecord, FileRecord)>,
    /// Records whose disk already matches, each with whether it is the peer's version as sent.
    no_op: Vec<(FileRecord, bool)>,
    fetches: Vec<PendingFetch>,
    fails: Failures,
}

impl FolderEngine {
    /// [`Self::prepare_remote`], unless the batch's stream failed before. Returns the stream
    /// with the outcome.
    pub(in crate::engine) async fn prepare_checked(
        &mut self,
        batch: RemoteBatch,
    ) -> (u64, Result<PreparedRemote, EngineError>) {
        let stream = batch.stream;
        match self.refused(&batch) {
            Some(e) => (stream, Err(e)),
            None => (stream, self.prepare_remote(batch).await),
        }
    }

    /// Drops a prepared batch that will not be applied: its staged contents are removed; the
    /// index-only merges it decided are kept (without moving the peer's cursor).
    pub(in crate::engine) async fn abandon_remote(&mut self, mut prepared: PreparedRemote) {
        if let Some(staged) = prepared.staged.take() {
            block(|| staged.discard());
        }
        let commits = self.commit_stores(std::mem::take(&mut prepared.stores));
        if !commits.is_empty() {
            if let Err(e) = self
                .store
                .commit(&self.id, &commits, None, &SkipChanges::default())
                .await
            {
                warn!(folder = %self.id, error = %e, "cannot record index-only merges");
                self.note_index_failure(&e.into());
            }
            self.seq_tx.send_replace(self.replica.seq());
        }
    }

    /// True when `remote` is a file this node has no live record of: it is written as a new
    /// file, which never replaces anything at its path (see [`apply::Op::Write`]'s `new`), so
    /// a file that appeared there meanwhile fails the write (and is looked at) instead of
    /// being overwritten. The look before the write is not needed then.
    pub(in crate::engine) fn placed_without_replacing(&self, remote: &FileRecord) -> bool {
        !remote.deleted
            && remote.kind == Kind::File
            && self.replica.get(&remote.path).is_none_or(|l| l.deleted)
    }

    /// True while a local program has `path` open for writing (as the watcher saw it).
    pub(in crate::engine) fn being_written(&self, path: &RelPath) -> bool {
        self.own.is_writing(&self.root.join(path.as_str()))
    }

    /// Makes the writing marks current (see [`OwnWrites::sync_with_watcher`]): once per
    /// batch, before the first look at a file the watcher has not handed over.
    pub(in crate::engine) fn sync_marks(&self) {
        if !block(|| self.own.sync_with_watcher(&self.root, MARKS_SYNC_WAIT)) {
            debug!(folder = %self.id, "the watcher did not confirm its marks in time; using them as they are");
        }
    }

    /// True when the disk at `path` still shows what the index says (so it may be replaced).
    pub(in crate::engine) fn disk_matches_index(&self, path: &RelPath) -> bool {
        let meta = std::fs::symlink_metadata(self.root.join(path.as_str()));
        match (self.replica.get(path), meta) {
            (None, Err(_)) => true,
            (Some(r), Err(_)) => r.deleted,
            (None, Ok(_)) => false,
            (Some(r), Ok(m)) => {
                if r.deleted {
                    return false;
                }
                match r.kind {
                    Kind::Dir => m.is_dir(),
                    Kind::File => m.is_file() && self.stats.get(path) == Some(&scan::stat_key(&m)),
                }
            }
        }
    }

    /// First half of a peer batch: decisions, conflict copies, fetches, and the disk
    /// operations staged (nothing visible at a target path yet).
    pub(in crate::engine) async fn prepare_remote(
        &mut self,
        batch: RemoteBatch,
    ) -> Result<PreparedRemote, EngineError> {
        if let Some(reason) = &self.paused {
            return Err(EngineError::Paused {
                folder: self.id.clone(),
                reason: reason.clone(),
            });
        }
        self.index_writable()?;
        let now = crate::now_ms();
        let t_prepare = std::time::Instant::now();
        if !batch.retry {
            self.fetchers
                .insert(batch.peer.clone(), batch.fetcher.clone());
        }
        // Every path of the batch, whatever its decision: the ones committed only when the
        // batch completes (index-only merges, disk already right) count as much as disk ops
        // for the next batch's overlap check.
        let paths: HashSet<RelPath> = batch
            .records
            .iter()
            .map(|r| r.record.path.clone())
            .collect();
        let (stores, applies, waiting) =
            self.decide_records(&batch.peer, batch.records, now).await?;
        let Planned {
            ops,
            mut op_meta,
            no_op,
            fetches,
            mut fails,
        } = self.plan_applies(applies, &batch.peer, now).await;
        fails.0.extend(waiting.0);
        let t_staging = std::time::Instant::now();
        let fetched_count = fetches.len();
        let removes = ops
            .iter()
            .any(|o| matches!(o, Op::RemoveFile { .. } | Op::RemoveDir { .. }));
        let staged = self
            .fetch_and_stage(ops, fetches, &batch.fetcher, &mut op_meta, &mut fails)
            .await?;
        // Before anything is placed: a crash between placing and committing leaves files the
        // index does not know, which the next start adopts from this journal instead of
        // taking them for local writes.
        let journal = if op_meta.is_empty() {
            None
        } else {
            let id = rand::random::<u64>();
            let records: Vec<&FileRecord> = op_meta.iter().map(|(r, _)| r).collect();
            if let Err(e) = self.store.journal_applying(&self.id, id, &records).await {
                // Nothing is placed: the staged temp files go now, not at the next start.
                if let Some(staged) = staged {
                    block(|| staged.discard());
                }
                return Err(e.into());
            }
            Some(id)
        };
        let n_ops = op_meta.len();
        debug!(folder = %self.id, peer = %batch.peer, ops = n_ops, fetched = fetched_count, decide_us = t_staging.duration_since(t_prepare).as_micros() as u64, fetch_and_stage_us = t_staging.elapsed().as_micros() as u64, "batch staged");
        Ok(PreparedRemote {
            peer: batch.peer,
            stream: batch.stream,
            epoch: batch.epoch,
            up_to_seq: batch.up_to_seq,
            retry: batch.retry,
            stores,
            op_meta,
            no_op,
            fails,
            staged,
            paths,
            removes,
            journal,
            started: t_prepare,
        })
    }

    /// The model's decision on each record of a peer batch: index-only changes (merged
    /// versions), records to put on disk, and records that wait for a local writer. A path
    /// whose file changed since the last look is observed first, so the peer's version meets
    /// the change instead of overwriting it; a path a local program is writing is neither
    /// looked at nor replaced: the peer's version fails for now and meets the complete local
    /// version on a retry (a writer that stays longer than the quick retries has it skipped
    /// and retried later, like any change that keeps failing).
    async fn decide_records(
        &mut self,
        peer: &str,
        records: Vec<Incoming>,
        now: u64,
    ) -> Result<(Vec<FileRecord>, Vec<Applying>, Failures), EngineError> {
        let mut stores: Vec<FileRecord> = Vec::new();
        let mut applies: Vec<Applying> = Vec::new();
        let mut waiting = Failures::default();
        let mut synced = false;
        for Incoming {
            record: remote,
            inline,
        } in records
        {
            if self.ignore.is_ignored(&remote.path) {
                continue;
            }
            if let Some(ahead_ms) = self.replica.ahead_of_clock(&remote, now) {
                self.note_clock_ahead(peer, &remote.path, ahead_ms, now);
            }
            let mut decision = self.replica.receive(&remote, now);
            // A held file at the path is looked at even for a new file: its bytes must be
            // kept before anything replaces them.
            let look_first =
                !self.placed_without_replacing(&remote) || self.held.contains_key(&remote.path);
            let looks = matches!(decision, Decision::Apply { .. })
                && look_first
                && !block(|| self.disk_matches_index(&remote.path));
            if looks && !synced {
                // The file changed since the last look: before it is looked at, every event
                // written so far has reached the watcher, so a writer still at it is marked.
                self.sync_marks();
                synced = true;
            }
            if matches!(decision, Decision::Apply { .. }) && self.being_written(&remote.path) {
                // A path failure like any other: retried at once, and skipped after a few
                // tries, so a file a program keeps open never holds up the rest of the stream.
                debug!(folder = %self.id, path = %remote.path, peer = %peer, "a local program is writing the file; the peer's version waits for its close");
                waiting.note(
                    &remote,
                    "a local program is writing the file; the peer's version waits for its close"
                        .into(),
                    false,
                );
                continue;
            }
            if looks {
                // The file changed under us since the last look: record that first, so the
                // peer's version meets it as a concurrent change instead of overwriting it.
                // (`observe` commits it to the index on its own.)
                self.observe(BTreeSet::from([remote.path.clone()])).await?;
                decision = self.replica.receive(&remote, now);
            }
            match decision {
                Decision::Ignore => {}
                // Committed to the replica only when the batch completes: a sequence number
                // handed out now would reach the index after the ones of the batch still in
                // flight, and a subscriber reading the index in between would skip it.
                Decision::Store(record) => stores.push(record),
                Decision::Apply {
                    record,
                    conflict_copy,
                } => {
                    applies.push((record, remote, conflict_copy, inline));
                }
            }
        }
        Ok((stores, applies, waiting))
    }

    /// The disk side of the records to apply (see [`plan::step`]): conflict copies and copies
    /// of held files kept first, then an op for each record whose content is here or
    /// travelled inline, and the contents left to fetch.
    async fn plan_applies(&mut self, applies: Vec<Applying>, peer: &str, now: u64) -> Planned {
        let mut fails = Failures::default();
        // Build the disk operations; what did not travel inline is fetched below.
        let mut fetches: Vec<PendingFetch> = Vec::new();
        let mut ops: Vec<Op> = Vec::new();
        let mut op_meta: Vec<(FileRecord, FileRecord)> = Vec::new();
        let mut no_op: Vec<(FileRecord, bool)> = Vec::new();
        for (record, remote, conflict_copy, inline) in applies {
            let local = self.replica.get(&record.path).cloned();
            if conflict_copy {
                match self
                    .keep_conflict_copy(&record, local.as_ref(), now, peer)
                    .await
                {
                    Ok(true) => {}
                    Ok(false) => {
                        // The bytes on disk are not the version that lost (a local write
                        // since the last look): look at them, and meet the peer's version
                        // again on the next attempt.
                        self.unstable.insert(record.path.clone());
                        fails.note(
                            &remote,
                            "the local file changed since it was last looked at; looked at again before the peer's version applies".into(),
                            false,
                        );
                        continue;
                    }
                    Err(e) => {
                        fails.note(&remote, format!("cannot keep conflict copy: {e}"), true);
                        continue;
                    }
                }
            }
            // Local bytes held back by the XML gate were never shipped: when the peer's
            // version changes the file, they are kept as a conflict copy first.
            let held = !conflict_copy
                && plan::rewrites(&record, local.as_ref())
                && self.held.contains_key(&record.path);
            if held && self.being_written(&record.path) {
                // Held bytes a writer is still adding to (a half-written file fails the gate;
                // the marks were made current when the batch was decided): copied only once
                // the writer is done, so the copy is a whole version.
                fails.note(
                    &remote,
                    "a local program is writing the file held back as not well-formed; the peer's version waits for its close".into(),
                    false,
                );
                continue;
            }
            if held {
                if let Err(e) = self.keep_held_copy(&record, now, peer).await {
                    fails.note(
                        &remote,
                        format!("cannot keep the held local file: {e}"),
                        true,
                    );
                    continue;
                }
            }
            let stat = self.stats.get(&record.path).copied();
            let inline_hash = inline.as_ref().map(Inline::hash);
            let path = record.path.clone();
            let op = match plan::step(&record, local.as_ref(), held, stat, inline_hash) {
                Step::Nothing => None,
                Step::Mkdir { mode } => Some(Op::Mkdir { path, mode }),
                Step::Chmod { mode } => Some(Op::Chmod { path, mode }),
                Step::RemoveDir => Some(Op::RemoveDir { path }),
                Step::RemoveFile { expect } => Some(Op::RemoveFile { path, expect }),
                Step::Write { new, expect } => match inline {
                    Some(bytes) => Some(Op::Write {
                        path,
                        content: Content::Bytes(bytes.into_bytes()),
                        mode: record.mode,
                        new,
                        expect,
                    }),
                    // `step` writes only content that travelled inline.
                    None => {
                        fails.note(&remote, "inline content missing".into(), false);
                        continue;
                    }
                },
                Step::Fetch { hash, new, expect } => {
                    fetches.push((record, remote, hash, new, expect));
                    continue;
                }
                Step::NoHash => {
                    fails.note(&remote, "live file without a hash".into(), false);
                    continue;
                }
            };
            match op {
                Some(op) => {
                    ops.push(op);
                    op_meta.push((record, remote));
                }
                None => {
                    let as_sent = record.version == remote.version;
                    no_op.push((record, as_sent));
                }
            }
        }
        Planned {
            ops,
            op_meta,
            no_op,
            fetches,
            fails,
        }
    }

    /// Stages the ops on a blocking thread while the contents that did not travel inline are
    /// fetched, then stages the fetched ones after them (as `op_meta` has them). A fetch that
    /// fails is noted in `fails`.
    async fn fetch_and_stage(
        &self,
        ops: Vec<Op>,
        fetches: Vec<PendingFetch>,
        fetcher: &Arc<dyn Fetcher>,
        op_meta: &mut Vec<(FileRecord, FileRecord)>,
        fails: &mut Failures,
    ) -> Result<Option<apply::StagedBatch>, EngineError> {
        // Contents that did not travel inline are fetched, a few at a time, while the inline
        // ones are staged on a blocking thread (the fetches write their own temp files).
        let staging = (!ops.is_empty()).then(|| {
            let (root, own) = (self.root.clone(), self.own.clone());
            tokio::task::spawn_blocking(move || apply::stage_batch(&root, ops, Some(&own)))
        });
        let fetched: Vec<Result<PathBuf, FetchError>> = {
            use futures_util::StreamExt;
            let jobs: Vec<_> = fetches
                .iter()
                .map(|(record, _, hash, _, _)| {
                    let (fetcher, id, path) =
                        (fetcher.clone(), self.id.clone(), record.path.clone());
                    let (hash, size, mode) = (*hash, record.size, record.mode);
                    let (root, live) = (self.root.clone(), self.live.clone());
                    async move {
                        // The directory is checked (no symlink on the way) and created before
                        // a byte of the peer's content is written into it.
                        let parent = path.parent();
                        let dir = tokio::task::spawn_blocking(move || {
                            crate::fs::beneath::ensure_dir(&root, parent.as_ref())
                        })
                        .await
                        .map_err(std::io::Error::other)??;
                        let fetched = fetcher.fetch(&id, &path, hash, size, &dir, mode).await;
                        live.progress();
                        fetched
                    }
                })
                .collect();
            futures_util::stream::iter(jobs)
                .buffered(FETCHES_AT_ONCE)
                .collect()
                .await
        };
        let staged = match staging {
            Some(task) => match task.await {
                Ok(staged) => Some(staged),
                Err(e) => {
                    // A panic while staging: the fetched temp files go now; named temps the
                    // staging left behind are removed at the next start.
                    for tmp in fetched.into_iter().flatten() {
                        let _ = std::fs::remove_file(tmp);
                    }
                    return Err(EngineError::Task {
                        folder: self.id.clone(),
                        what: "staging a batch",
                        reason: e.to_string(),
                    });
                }
            },
            None => None,
        };
        let mut fetched_ops: Vec<Op> = Vec::new();
        for ((record, remote, _, new, expect), r) in fetches.into_iter().zip(fetched) {
            match r {
                Ok(tmp) => {
                    fetched_ops.push(Op::Write {
                        path: record.path.clone(),
                        content: Content::Temp(tmp),
                        mode: record.mode,
                        new,
                        expect,
                    });
                    op_meta.push((record, remote));
                }
                Err(e) => {
                    let local = match &e {
                        FetchError::Local(io) => node_wide(io),
                        FetchError::Peer(_) => false,
                    };
                    fails.note(&remote, format!("fetch failed: {e}"), local);
                }
            }
        }
        // The fetched contents join the staged batch after the inline ones, as `op_meta` has
        // them.
        Ok(if fetched_ops.is_empty() {
            staged
        } else {
            let more = block(|| apply::stage_batch(&self.root, fetched_ops, Some(&self.own)));
            Some(match staged {
                Some(first) => first.merge(more),
                None => more,
            })
        })
    }

    /// Finishes a staged batch (durability, placement) on a blocking thread, so the engine can
    /// stage the next batch meanwhile.
    pub(in crate::engine) fn finish_in_background(
        &self,
        staged: Option<apply::StagedBatch>,
    ) -> tokio::task::JoinHandle<Vec<apply::OpResult>> {
        let own = self.own.clone();
        match staged {
            Some(batch) => tokio::task::spawn_blocking(move || batch.finish(Some(&own))),
            // Nothing to place (every record known, or index-only): no blocking thread.
            None => tokio::spawn(async { Vec::new() }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::Fetching;
    use crate::engine::testing::*;
    use std::path::Path;

    /// A peer that serves one file's bytes, but first lets a local program write the target:
    /// the write lands after the batch was decided and before the peer's version is put in
    /// place (the window of issue 12's lost writes).
    struct WriteLocallyFirst {
        bytes: Vec<u8>,
        target: PathBuf,
        local: Vec<u8>,
        replace_by_rename: bool,
    }

    impl Fetcher for WriteLocallyFirst {
        fn fetch<'a>(
            &'a self,
            folder: &'a str,
            path: &'a RelPath,
            hash: Hash,
            _size: u64,
            dir: &'a Path,
            mode: u32,
        ) -> Fetching<'a> {
            Box::pin(async move {
                if self.replace_by_rename {
                    let tmp = self.target.with_extension("editor-tmp");
                    std::fs::write(&tmp, &self.local)?;
                    std::fs::rename(&tmp, &self.target)?;
                } else {
                    std::fs::write(&self.target, &self.local)?;
                }
                Serve(self.bytes.clone())
                    .fetch(folder, path, hash, _size, dir, mode)
                    .await
            })
        }
    }

    /// Regression (issue 12, item 0): a local write that lands while a peer's version of the
    /// same file is on its way is never replaced: the apply sees the file changed at the very
    /// moment of the rename, puts it back, and the peer's version then meets it as a
    /// concurrent change. Both ways of writing are covered: in place, and by rename.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_local_write_landing_while_a_peer_version_is_fetched_is_not_lost() {
        for replace_by_rename in [false, true] {
            let dir = tempfile::tempdir().expect("tempdir");
            let (handle, store, cancel, task) = engine_on(dir.path()).await;
            let root = dir.path().join("root");
            let target = root.join("x.xml");
            handle
                .remote(batch(1, 1, vec![remote_file("x.xml", b"<v1/>", 1, true)]))
                .await
                .expect("v1 applies");
            assert_eq!(std::fs::read(&target).expect("x.xml"), b"<v1/>");
            let local = b"<local edit made meanwhile/>".to_vec();
            let racing = Arc::new(WriteLocallyFirst {
                bytes: b"<v2 from the peer/>".to_vec(),
                target: target.clone(),
                local: local.clone(),
                replace_by_rename,
            });
            let v2 = || remote_update("x.xml", b"<v2 from the peer/>", 2, 2);
            let mut b = batch(2, 2, vec![v2()]);
            b.fetcher = racing;
            let first = handle.remote(b).await;
            assert!(
                matches!(first, Err(EngineError::ApplyFailed { .. })),
                "the replacement must fail on the changed file, got {first:?}"
            );
            assert_eq!(
                std::fs::read(&target).expect("x.xml"),
                local,
                "the local edit stays in place (rename: {replace_by_rename})"
            );
            // The session comes back on a new stream; the engine looked at the file after the
            // failure, so the peer's version is now concurrent with the local edit.
            let mut again = batch(3, 2, vec![v2()]);
            again.fetcher = Arc::new(Serve(b"<v2 from the peer/>".to_vec()));
            handle.remote(again).await.expect("decided the second time");
            let on_disk = std::fs::read(&target).expect("x.xml");
            let copies = conflict_copies(dir.path());
            assert!(
                on_disk == local || copies.contains(&local),
                "the local edit is lost: disk has {:?}, conflict copies {:?}",
                String::from_utf8_lossy(&on_disk),
                copies.len()
            );
            let rows = store
                .since("synapse-configs", 0, 10, None)
                .await
                .expect("index");
            let x = rows
                .iter()
                .find(|r| r.record.path.as_str() == "x.xml")
                .expect("indexed");
            assert_eq!(
                x.record.hash,
                Some(*blake3::hash(&on_disk).as_bytes()),
                "the index says what the disk has"
            );
            cancel.cancel();
            task.await.expect("engine task");
        }
    }

    /// The same for a peer's delete: a file edited after the delete was decided is not
    /// removed.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_local_write_landing_before_a_peer_delete_is_not_lost() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().join("root");
        let target = root.join("d.xml");
        // The file to delete is applied, then a batch deletes it and brings a large file
        // whose fetch lets the local edit land before the batch is finished.
        let (handle, _store, cancel, task) = engine_on(dir.path()).await;
        handle
            .remote(batch(1, 1, vec![remote_file("d.xml", b"<d/>", 1, true)]))
            .await
            .expect("applies");
        let mut delete = remote_update("d.xml", b"<d/>", 2, 2);
        delete.record.deleted = true;
        delete.record.hash = None;
        delete.record.size = 0;
        let local = b"<edited before the delete landed/>".to_vec();
        let mut b = batch(
            2,
            3,
            vec![delete, remote_file("big.xml", b"<big/>", 3, false)],
        );
        b.fetcher = Arc::new(WriteLocallyFirst {
            bytes: b"<big/>".to_vec(),
            target: target.clone(),
            local: local.clone(),
            replace_by_rename: false,
        });
        let r = handle.remote(b).await;
        assert!(
            matches!(r, Err(EngineError::ApplyFailed { .. })),
            "the removal must fail on the changed file, got {r:?}"
        );
        assert_eq!(std::fs::read(&target).expect("still there"), local);
        assert!(
            root.join("big.xml").exists(),
            "the rest of the batch landed"
        );
        cancel.cancel();
        task.await.expect("engine task");
    }
}
