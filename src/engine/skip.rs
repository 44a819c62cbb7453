//! The strikes/skip/retry book: a peer change failing [`SKIP_AFTER_FAILURES`] times in a row
//! is skipped (kept in the index), and retried later with a doubling delay.

use std::collections::{BTreeMap, HashMap, HashSet};

use tracing::{info, warn};

use crate::engine::{FolderEngine, Incoming, RemoteBatch};
use crate::model::{Causality, FileRecord, RelPath, VersionVector};
use crate::store::{SkipChanges, Skipped};

/// One record of a batch that could not be applied.
#[derive(Debug)]
pub(in crate::engine) struct Failure {
    /// The record as the peer sent it (`seq` is the peer's).
    pub(in crate::engine) record: FileRecord,
    pub(in crate::engine) problem: String,
    /// The trouble is this node's, not the path's (a full or read-only disk, a conflict
    /// copy that cannot be kept): the change waits in the stream, it is never skipped.
    pub(in crate::engine) node_wide: bool,
}

/// The failures of one batch.
#[derive(Debug, Default)]
pub(in crate::engine) struct Failures(pub(in crate::engine) Vec<Failure>);

impl Failures {
    /// `remote`: the record as the peer sent it.
    pub(in crate::engine) fn note(
        &mut self,
        remote: &FileRecord,
        problem: String,
        node_wide: bool,
    ) {
        self.0.push(Failure {
            record: remote.clone(),
            problem,
            node_wide,
        });
    }
}

/// A peer change failing this many times in a row is skipped (see [`FolderStatus::skipped`]).
/// A passing problem (a local write racing the peer's, a file changing on the peer while it
/// is fetched) clears on the session's quick retries before that.
pub const SKIP_AFTER_FAILURES: u32 = 3;

/// Skipped changes retried in one batch at most.
pub(in crate::engine) const RETRY_BATCH_RECORDS: usize = 1000;

/// Skipped changes are retried at most this far apart.
pub(in crate::engine) const SKIP_RETRY_MAX_MS: u64 = 3_600_000;

/// True when an apply error says more about this node than about the path: such a change
/// is never skipped, so it cannot be left behind while the node's trouble lasts.
pub(in crate::engine) fn node_wide(e: &std::io::Error) -> bool {
    use nix::libc;
    use std::io::ErrorKind as K;
    match e.raw_os_error() {
        Some(code) => matches!(
            code,
            libc::ENOSPC
                | libc::EDQUOT
                | libc::EROFS
                | libc::EIO
                | libc::ENOMEM
                | libc::EMFILE
                | libc::ENFILE
        ),
        None => !matches!(
            e.kind(),
            K::PermissionDenied
                | K::AlreadyExists
                | K::NotFound
                | K::IsADirectory
                | K::NotADirectory
                | K::InvalidInput
                | K::InvalidFilename
                | K::DirectoryNotEmpty
        ),
    }
}

/// When a change skipped after `attempts` failures is tried next.
pub(in crate::engine) fn skip_retry_at(now_ms: u64, base_ms: u64, attempts: u32) -> u64 {
    // The first retry after the skip waits `base_ms`, each later one twice the one before.
    let retry = attempts
        .saturating_sub(SKIP_AFTER_FAILURES)
        .saturating_add(1);
    let delay = crate::doubling_delay(
        std::time::Duration::from_millis(base_ms),
        retry,
        std::time::Duration::from_millis(SKIP_RETRY_MAX_MS),
    );
    now_ms.saturating_add(delay.as_millis() as u64)
}

/// The skip book of one folder: the strikes of peer changes failing in a row, and the changes
/// skipped, each with its next retry. Pure: the time comes in as an argument, and the index
/// gets what changed as [`SkipChanges`] (the engine commits them with the batch).
#[derive(Debug, Default)]
pub(in crate::engine) struct SkipBook {
    /// Peer changes failing in a row: (peer, path) -> (the version that fails, how often).
    strikes: HashMap<(String, RelPath), (VersionVector, u32)>,
    /// Skipped peer changes, by (peer, path); kept in the index too.
    skipped: BTreeMap<(String, RelPath), Skipped>,
    /// First retry of a skipped change, ms; it doubles after each failed retry.
    base_ms: u64,
}

impl SkipBook {
    /// A book holding the skipped changes the index kept.
    pub(in crate::engine) fn new(base_ms: u64, skipped: Vec<Skipped>) -> Self {
        Self {
            strikes: HashMap::new(),
            skipped: skipped
                .into_iter()
                .map(|s| ((s.peer.clone(), s.record.path.clone()), s))
                .collect(),
            base_ms,
        }
    }

    /// The skipped changes, by peer and path.
    pub(in crate::engine) fn skipped(&self) -> impl Iterator<Item = &Skipped> {
        self.skipped.values()
    }

    /// Sorts the failures of a settled batch of `folder` from `peer`. A change failing for
    /// the [`SKIP_AFTER_FAILURES`]th time in a row is skipped; one already skipped (a retry,
    /// or the stream meeting it again) stays skipped, tried next after a longer wait. What
    /// remains in `fails` stops the stream. Paths of the batch that went through clear their
    /// strikes and their skip; so does another peer's skipped change that is `overtaken` (the
    /// index holds it, or a newer version). Returns the changes to the skip list, for the
    /// batch's index commit. `now_ms`: wall time, ms since the epoch (a change's first skip
    /// and its next retry).
    #[allow(clippy::too_many_arguments)]
    pub(in crate::engine) fn sort(
        &mut self,
        folder: &str,
        peer: &str,
        retry: bool,
        paths: &HashSet<RelPath>,
        fails: &mut Failures,
        now_ms: u64,
        overtaken: impl Fn(&Skipped) -> bool,
    ) -> SkipChanges {
        let mut changes = SkipChanges::default();
        if !self.strikes.is_empty() || !self.skipped.is_empty() {
            let failed: HashSet<RelPath> = fails.0.iter().map(|f| f.record.path.clone()).collect();
            let went_through = |p: &str, path: &RelPath| {
                p == peer && paths.contains(path) && !failed.contains(path)
            };
            self.strikes.retain(|(p, path), _| !went_through(p, path));
            self.skipped.retain(|(p, path), s| {
                let keep = !(went_through(p, path) || (paths.contains(path) && overtaken(s)));
                if !keep {
                    info!(folder = %folder, path = %path, peer = %p, "skipped change is done");
                    changes.cleared.push((p.clone(), path.clone()));
                }
                keep
            });
        }
        let mut stopping = Vec::new();
        for f in std::mem::take(&mut fails.0) {
            let key = (peer.to_owned(), f.record.path.clone());
            let (attempts, first_ms) = match self.skipped.get(&key) {
                Some(s) => (s.attempts.saturating_add(1), s.first_ms),
                // A retry of a change cleared meanwhile: nothing left to do.
                None if retry => continue,
                None if f.node_wide => {
                    stopping.push(f);
                    continue;
                }
                None => {
                    let strike = self
                        .strikes
                        .entry(key.clone())
                        .or_insert_with(|| (f.record.version.clone(), 0));
                    if strike.0 != f.record.version {
                        *strike = (f.record.version.clone(), 0);
                    }
                    strike.1 += 1;
                    if strike.1 < SKIP_AFTER_FAILURES {
                        stopping.push(f);
                        continue;
                    }
                    self.strikes.remove(&key);
                    (SKIP_AFTER_FAILURES, now_ms)
                }
            };
            let retry_ms = skip_retry_at(now_ms, self.base_ms, attempts);
            let wait_s = retry_ms.saturating_sub(now_ms) / 1000;
            if attempts == SKIP_AFTER_FAILURES {
                warn!(folder = %folder, path = %f.record.path, peer = %peer, problem = %f.problem, attempts, retry_in_s = wait_s, "skipping a peer change that keeps failing; the peer's other changes go on, and status lists it until it applies");
            } else {
                info!(folder = %folder, path = %f.record.path, peer = %peer, problem = %f.problem, attempts, retry_in_s = wait_s, "skipped change failed again");
            }
            let entry = Skipped {
                peer: peer.to_owned(),
                record: f.record,
                problem: f.problem,
                attempts,
                first_ms,
                retry_ms,
            };
            changes.set.push(entry.clone());
            self.skipped.insert(key, entry);
        }
        fails.0 = stopping;
        changes
    }

    /// The skipped changes of one peer due at `now_ms`, of a peer whose content source is
    /// known (`has_source`), at most [`RETRY_BATCH_RECORDS`]. Their next retry is pushed
    /// out at once, in memory, so that a retry that fails before it gets to them (a folder
    /// error) cannot spin; their outcome then sets it for good.
    pub(in crate::engine) fn due(
        &mut self,
        now_ms: u64,
        has_source: impl Fn(&str) -> bool,
    ) -> Option<(String, Vec<FileRecord>)> {
        let due = |s: &Skipped| s.retry_ms <= now_ms && has_source(&s.peer);
        let peer = self.skipped.values().find(|s| due(s))?.peer.clone();
        let base = self.base_ms;
        let records = self
            .skipped
            .values_mut()
            .filter(|s| s.peer == peer && due(s))
            .take(RETRY_BATCH_RECORDS)
            .map(|s| {
                s.retry_ms = skip_retry_at(now_ms, base, s.attempts);
                s.record.clone()
            })
            .collect();
        Some((peer, records))
    }

    /// How long until a skipped change (of a peer with a known source) is due.
    pub(in crate::engine) fn next_in(
        &self,
        now_ms: u64,
        has_source: impl Fn(&str) -> bool,
    ) -> Option<std::time::Duration> {
        self.skipped
            .values()
            .filter(|s| has_source(&s.peer))
            .map(|s| s.retry_ms.saturating_sub(now_ms))
            .min()
            .map(std::time::Duration::from_millis)
    }
}

impl FolderEngine {
    /// [`SkipBook::sort`] for a settled batch; a skipped change is overtaken when the replica
    /// holds its version or a newer one.
    pub(in crate::engine) fn skip_failures(
        &mut self,
        peer: &str,
        retry: bool,
        paths: &HashSet<RelPath>,
        fails: &mut Failures,
        now_ms: u64,
    ) -> SkipChanges {
        let replica = &self.replica;
        let overtaken = |s: &Skipped| {
            replica.get(&s.record.path).is_some_and(|r| {
                matches!(
                    r.version.compare(&s.record.version),
                    Causality::Equal | Causality::After
                )
            })
        };
        self.skips
            .sort(&self.id, peer, retry, paths, fails, now_ms, overtaken)
    }

    /// A batch retrying the skipped changes of one peer that are due at `now_ms` (see
    /// [`SkipBook::due`]), unless the folder is paused or its index cannot be written.
    pub(in crate::engine) fn due_retry(&mut self, now_ms: u64) -> Option<RemoteBatch> {
        if self.paused.is_some() || self.index_error.is_some() {
            return None;
        }
        let fetchers = &self.fetchers;
        let (peer, records) = self.skips.due(now_ms, |p| fetchers.contains_key(p))?;
        let (peer, fetcher) = fetchers.get_key_value(peer.as_str())?;
        Some(RemoteBatch {
            peer: peer.clone(),
            stream: rand::random::<u64>(),
            epoch: 0,
            up_to_seq: 0,
            records: records
                .into_iter()
                .map(|record| Incoming {
                    record,
                    inline: None,
                })
                .collect(),
            fetcher: fetcher.clone(),
            retry: true,
        })
    }

    /// How long until a skipped change is due for a retry (of a peer with a known source).
    pub(in crate::engine) fn next_retry_in(&self, now_ms: u64) -> Option<std::time::Duration> {
        if self.paused.is_some() || self.index_error.is_some() {
            return None;
        }
        self.skips
            .next_in(now_ms, |p| self.fetchers.contains_key(p))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::EngineError;
    use crate::engine::testing::*;
    use std::sync::Arc;

    /// A change that fails three times in a row stops its stream twice, then is skipped: the
    /// cursor moves past it, the rest applies, status and the index list it, and a retry
    /// applies it once its content can be had (the skip is then gone from both).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_change_failing_three_times_is_skipped_and_retried_until_it_applies() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (handle, store, cancel, task) = engine_with(dir.path(), 150, &["gw2"]).await;
        let root = dir.path().join("root");
        let answers = fail_big_on_streams(&handle, 1..4).await;
        assert!(
            matches!(answers[0], Err(EngineError::ApplyFailed { .. }))
                && matches!(answers[1], Err(EngineError::ApplyFailed { .. })),
            "the first two failures stop the stream: {answers:?}"
        );
        assert_eq!(answers[2].as_ref().ok(), Some(&3), "the third is skipped");
        assert_eq!(std::fs::read(root.join("c.xml")).expect("c.xml"), b"<c/>");
        assert!(!root.join("big.xml").exists());
        let cursor = store
            .cursor("gw2", "synapse-configs")
            .await
            .expect("cursor");
        assert_eq!(cursor.seq, 3, "the cursor moved past the skipped change");
        let skipped = handle.status().skipped;
        assert_eq!(skipped.len(), 1, "{skipped:?}");
        assert_eq!(
            (
                skipped[0].path.as_str(),
                skipped[0].peer.as_str(),
                skipped[0].attempts
            ),
            ("big.xml", "gw2", SKIP_AFTER_FAILURES)
        );
        assert!(skipped[0].problem.contains("peer is gone"), "{skipped:?}");
        let kept = store.skipped("synapse-configs").await.expect("skipped");
        assert_eq!(kept.len(), 1);
        assert_eq!(kept[0].record.seq, 2, "kept as the peer sent it");
        // The peer's content source stays broken: the retry fails again, later and later.
        assert!(
            status_until(&handle, |s| s
                .skipped
                .first()
                .is_some_and(|k| k.attempts > 4))
            .await,
            "retries happen and count: {:?}",
            handle.status().skipped
        );
        // A new session of the peer brings a source that has the bytes: the retry applies.
        let mut b = batch(9, 4, vec![remote_file("d.xml", b"<d/>", 4, true)]);
        b.fetcher = Arc::new(Serve(b"<big/>".to_vec()));
        assert_eq!(handle.remote(b).await.expect("applies"), 4);
        assert!(
            status_until(&handle, |s| s.skipped.is_empty()).await,
            "the retry applies: {:?}",
            handle.status().skipped
        );
        assert_eq!(
            std::fs::read(root.join("big.xml")).expect("big.xml"),
            b"<big/>"
        );
        assert!(
            store
                .skipped("synapse-configs")
                .await
                .expect("skipped")
                .is_empty()
        );
        assert_eq!(
            store
                .cursor("gw2", "synapse-configs")
                .await
                .expect("cursor")
                .seq,
            4,
            "a retry moves no cursor"
        );
        cancel.cancel();
        task.await.expect("engine task");
    }

    /// A skipped change survives a restart, and a newer version of the path from the same
    /// peer takes its place: once that applies, nothing is skipped any more.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_skipped_change_survives_a_restart_and_a_newer_version_clears_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().join("root");
        {
            let (handle, _store, cancel, task) = engine_on(dir.path()).await;
            let answers = fail_big_on_streams(&handle, 1..4).await;
            assert_eq!(answers[2].as_ref().ok(), Some(&3), "{answers:?}");
            cancel.cancel();
            task.await.expect("engine task");
        }
        let (handle, store, cancel, task) = engine_on(dir.path()).await;
        assert_eq!(handle.status().skipped.len(), 1, "kept across the restart");
        let mut newer = remote_file("big.xml", b"<big v='2'/>", 5, true);
        newer.record.version.bump(PEER);
        assert_eq!(
            handle
                .remote(batch(4, 5, vec![newer]))
                .await
                .expect("applies"),
            5
        );
        assert!(handle.status().skipped.is_empty());
        assert!(
            store
                .skipped("synapse-configs")
                .await
                .expect("skipped")
                .is_empty()
        );
        assert_eq!(
            std::fs::read(root.join("big.xml")).expect("big.xml"),
            b"<big v='2'/>"
        );
        cancel.cancel();
        task.await.expect("engine task");
    }

    /// A peer taken out of the config never sends its skipped changes again: they are
    /// dropped at start, from status and from the index.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn skipped_changes_of_a_peer_no_longer_configured_are_dropped() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let (handle, _store, cancel, task) = engine_on(dir.path()).await;
            let answers = fail_big_on_streams(&handle, 1..4).await;
            assert_eq!(answers[2].as_ref().ok(), Some(&3), "{answers:?}");
            cancel.cancel();
            task.await.expect("engine task");
        }
        let (handle, store, cancel, task) = engine_with(dir.path(), 60_000, &["gw3"]).await;
        assert!(handle.status().skipped.is_empty());
        assert!(
            store
                .skipped("synapse-configs")
                .await
                .expect("skipped")
                .is_empty()
        );
        cancel.cancel();
        task.await.expect("engine task");
    }

    #[test]
    fn only_trouble_of_the_path_lets_a_change_be_skipped() {
        use nix::libc;
        let os = std::io::Error::from_raw_os_error;
        for code in [libc::ENOSPC, libc::EDQUOT, libc::EROFS, libc::EIO] {
            assert!(node_wide(&os(code)), "errno {code}");
        }
        for code in [
            libc::EACCES,
            libc::EPERM,
            libc::EEXIST,
            libc::ENOTDIR,
            libc::ENAMETOOLONG,
        ] {
            assert!(!node_wide(&os(code)), "errno {code}");
        }
        assert!(!node_wide(&std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            "refusing to write through a symlink"
        )));
        assert!(node_wide(&std::io::Error::other("apply task failed")));
    }

    #[test]
    fn skip_retries_double_from_the_base_and_stop_at_an_hour() {
        let at = |attempts| skip_retry_at(1_000, 60_000, attempts) - 1_000;
        assert_eq!(at(SKIP_AFTER_FAILURES), 60_000);
        assert_eq!(at(SKIP_AFTER_FAILURES + 1), 120_000);
        assert_eq!(at(SKIP_AFTER_FAILURES + 3), 480_000);
        assert_eq!(at(SKIP_AFTER_FAILURES + 6), 3_600_000);
        assert_eq!(at(u32::MAX), 3_600_000);
    }

    /// The book alone, with the time as an input: strikes count one version in a row (a
    /// newer version starts again), the third strike skips, a due retry is pushed out at once
    /// so it cannot spin, and only a peer with a known source is ever due.
    #[test]
    fn the_book_skips_on_the_third_strike_and_retries_when_due() {
        let mut book = SkipBook::new(60_000, Vec::new());
        let x = RelPath::new("x.xml").expect("valid");
        let paths = HashSet::from([x.clone()]);
        let v1 = remote_file("x.xml", b"<x/>", 1, false).record;
        let v2 = remote_update("x.xml", b"<x v=\"2\"/>", 2, 2).record;
        let fail = |r: &FileRecord| {
            let mut f = Failures::default();
            f.note(r, "fetch failed".into(), false);
            f
        };
        let never = |_: &Skipped| false;
        for (record, skipped_now) in [(&v1, false), (&v1, false), (&v2, false), (&v2, false)] {
            let mut fails = fail(record);
            let changes = book.sort("f", "gw2", false, &paths, &mut fails, 1_000, never);
            assert_eq!(changes.set.is_empty(), !skipped_now);
            assert_eq!(fails.0.len(), 1, "a strike stops the stream");
        }
        let mut fails = fail(&v2);
        let changes = book.sort("f", "gw2", false, &paths, &mut fails, 1_000, never);
        assert!(fails.0.is_empty(), "skipped: the stream goes on");
        assert_eq!(changes.set.len(), 1);
        assert_eq!(changes.set[0].retry_ms, 61_000);
        assert_eq!(
            book.next_in(1_000, |_| true),
            Some(std::time::Duration::from_secs(60))
        );
        assert_eq!(book.next_in(1_000, |_| false), None, "no source, never due");
        assert!(book.due(60_999, |_| true).is_none());
        let (peer, records) = book.due(61_000, |_| true).expect("due");
        assert_eq!((peer.as_str(), records.len()), ("gw2", 1));
        assert!(book.due(61_000, |_| true).is_none(), "pushed out at once");
        // The stream brings the path through: the skip is done.
        let mut none = Failures::default();
        let changes = book.sort("f", "gw2", false, &paths, &mut none, 62_000, never);
        assert_eq!(changes.cleared, vec![("gw2".to_owned(), x)]);
        assert_eq!(book.skipped().count(), 0);
    }
}
