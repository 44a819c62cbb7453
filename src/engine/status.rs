//! What the engine reports: the [`FolderStatus`] the admin service shows, a peer clock ahead
//! of ours ([`ClockAhead`]), and the status published after every message.

use std::collections::BTreeMap;

use serde::Serialize;
use tracing::warn;

use crate::engine::FolderEngine;
use crate::model::RelPath;

/// Live state of a folder, as `artisync status` shows it.
#[derive(Debug, Clone, Default, Serialize, serde::Deserialize)]
pub struct FolderStatus {
    pub id: String,
    pub path: String,
    pub files: u64,
    pub dirs: u64,
    pub bytes: u64,
    pub tombstones: u64,
    pub seq: u64,
    pub epoch: u64,
    /// Why the folder is paused (mass-delete guard), if it is.
    pub paused: Option<String>,
    /// Why the index cannot be written (a full or read-only `state_dir`), if so: the folder
    /// takes no change until it can, and resumes by itself.
    #[serde(default)]
    pub index_error: Option<String>,
    /// Files held back by the validation gate, with the reason.
    pub held: BTreeMap<String, String>,
    /// Local paths that could not be read on the last look.
    pub unreadable: BTreeMap<String, String>,
    pub last_error: Option<String>,
    /// When `last_error` happened, ms since the epoch.
    #[serde(default)]
    pub last_error_ms: Option<u64>,
    pub conflicts: u64,
    /// Peer changes that failed to apply [`SKIP_AFTER_FAILURES`] times in a row: set aside so
    /// the rest of the peer's changes flow, and retried with backoff.
    #[serde(default)]
    pub skipped: Vec<SkippedStatus>,
    /// The latest peer record stamped further ahead of this node's clock than
    /// `max_clock_skew_ms`: applied, without moving the clock.
    #[serde(default)]
    pub clock_ahead: Option<ClockAhead>,
}

/// A peer record stamped (or versioned) ahead of this node's clock, as status shows it.
#[derive(Debug, Clone, Default, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct ClockAhead {
    pub peer: String,
    pub path: String,
    /// How far the record's stamp or largest version counter is ahead of this node's clock, ms.
    pub ahead_ms: u64,
    /// Wall time the record arrived, ms since the epoch.
    pub at_ms: u64,
}

/// A record ahead of the clock is logged at most this often per folder, ms (status always
/// shows the latest).
pub(in crate::engine) const CLOCK_AHEAD_WARN_EVERY_MS: u64 = 60_000;

/// One skipped peer change, as status shows it.
#[derive(Debug, Clone, Default, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct SkippedStatus {
    pub path: String,
    pub peer: String,
    pub problem: String,
    pub attempts: u32,
    /// Wall time of the next attempt, ms since the epoch.
    pub next_retry_ms: u64,
}

impl FolderEngine {
    /// Remembers a peer record ahead of this node's clock for status, and logs it (at most
    /// every [`CLOCK_AHEAD_WARN_EVERY_MS`]).
    pub(in crate::engine) fn note_clock_ahead(
        &mut self,
        peer: &str,
        path: &RelPath,
        ahead_ms: u64,
        now: u64,
    ) {
        let quiet = self
            .clock_ahead
            .as_ref()
            .is_some_and(|c| now.abs_diff(c.at_ms) < CLOCK_AHEAD_WARN_EVERY_MS);
        if !quiet {
            warn!(folder = %self.id, peer = %peer, path = %path, ahead_ms, "record stamped ahead of this node's clock; applied without moving the clock");
        }
        self.clock_ahead = Some(ClockAhead {
            peer: peer.to_owned(),
            path: path.to_string(),
            ahead_ms,
            at_ms: now,
        });
    }

    pub(in crate::engine) fn publish_status(&self) {
        let mut s = FolderStatus {
            id: self.id.to_string(),
            path: self.root.display().to_string(),
            seq: self.replica.seq(),
            epoch: self.epoch,
            paused: self.paused.clone(),
            index_error: self.index_error.clone(),
            held: self
                .held
                .iter()
                .map(|(k, v)| (k.to_string(), v.clone()))
                .collect(),
            unreadable: self
                .unreadable
                .iter()
                .map(|(k, v)| (k.to_string(), v.clone()))
                .collect(),
            last_error: self.last_error.as_ref().map(|(e, _)| e.clone()),
            last_error_ms: self.last_error.as_ref().map(|(_, at)| *at),
            conflicts: self.conflicts,
            skipped: self
                .skips
                .skipped()
                .map(|s| SkippedStatus {
                    path: s.record.path.to_string(),
                    peer: s.peer.clone(),
                    problem: s.problem.clone(),
                    attempts: s.attempts,
                    next_retry_ms: s.retry_ms,
                })
                .collect(),
            clock_ahead: self.clock_ahead.clone(),
            ..Default::default()
        };
        let totals = self.replica.totals();
        s.files = totals.files;
        s.dirs = totals.dirs;
        s.bytes = totals.bytes;
        s.tombstones = totals.tombstones;
        if let Ok(mut guard) = self.status.lock() {
            *guard = s;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::FetchError;
    use crate::engine::Fetcher;
    use crate::engine::Fetching;
    use crate::engine::testing::*;
    use crate::liveness;
    use crate::model::Hash;
    use std::path::Path;
    use std::sync::Arc;

    /// A peer that serves one file's bytes once the test opens its gate: the engine stays
    /// busy in the fetch until then.
    struct Gated {
        bytes: Vec<u8>,
        gate: tokio::sync::Semaphore,
    }

    impl Fetcher for Gated {
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
                let _open = self
                    .gate
                    .acquire()
                    .await
                    .map_err(|e| FetchError::Peer(e.to_string()))?;
                Serve(self.bytes.clone())
                    .fetch(folder, path, hash, _size, dir, mode)
                    .await
            })
        }
    }

    /// The engine shows busy while it works on a batch (here: a fetch that hangs until the
    /// test lets it go), is judged stalled when that lasts past the limit, and shows progress
    /// and idle once the batch is done.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_engine_is_busy_while_it_works_idle_after_and_progress_moves() {
        use crate::liveness::{Activity, Verdict, judge, mono_ms};
        let dir = tempfile::tempdir().expect("tempdir");
        let (handle, _store, cancel, task) = engine_on(dir.path()).await;
        liveness_until(&handle, |s| s.activity == Activity::Idle).await;

        let bytes = b"<api name=\"big\"/>".to_vec();
        let fetcher = Arc::new(Gated {
            bytes: bytes.clone(),
            gate: tokio::sync::Semaphore::new(0),
        });
        let mut b = batch(3, 1, vec![remote_file("big.xml", &bytes, 1, false)]);
        b.fetcher = fetcher.clone();
        let answer = handle.queue_remote(b).await.expect("queued");
        let stuck = liveness_until(&handle, |s| s.activity == Activity::Busy).await;
        // Let the clock move past the last progress: a 1 ms limit is then exceeded.
        let limit = std::time::Duration::from_millis(1);
        for _ in 0..500 {
            if mono_ms() > stuck.progress_ms + 1 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
        let now = handle.liveness();
        assert_eq!(
            now.progress_ms, stuck.progress_ms,
            "no progress while stuck"
        );
        assert_eq!(judge(&now, mono_ms(), limit), Verdict::Stalled);

        fetcher.gate.add_permits(1);
        assert_eq!(answer.await.expect("applied"), 1);
        let after = liveness_until(&handle, |s| s.activity == Activity::Idle).await;
        assert!(
            after.progress_ms > stuck.progress_ms,
            "the fetch, the settled batch and the handled message count as progress: {stuck:?} -> {after:?}"
        );
        assert_eq!(judge(&after, mono_ms(), limit), Verdict::Idle);

        cancel.cancel();
        task.await.expect("engine task");
        assert_eq!(handle.liveness().activity, Activity::Stopped);
    }

    /// An engine whose task dies (here: aborted, as a panic unwinds it) shows as stopped.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_engine_whose_task_dies_shows_as_stopped() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (handle, _store, _cancel, task) = engine_on(dir.path()).await;
        // Running (an async fn's body, and its guard, exist once it is first polled): it
        // answers a message.
        handle.resume().await.expect("the engine answers");
        task.abort();
        assert!(task.await.is_err_and(|e| e.is_cancelled()));
        let r = handle.engine_report(liveness::mono_ms(), liveness::ENGINE_STALL_LIMIT);
        assert_eq!(r.state, liveness::Verdict::Stopped);
        assert!(r.is_failing());
    }
}
