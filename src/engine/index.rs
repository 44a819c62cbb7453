//! An index that cannot be written (a full or read-only `state_dir`: SQLITE_FULL, EIO).
//!
//! The engine commits a change to its in-memory replica before the index commit; when that
//! commit fails, memory is ahead of the index (and of what peers are sent, which is read
//! from the index), and a local change recorded only in memory would never ship. So the
//! folder stops taking changes: peer batches and deploys are refused (the sessions retry),
//! local changes are left to the rescan that follows the reload. Every retry tick the
//! engine reloads its replica from the index, as a restart would: peer changes placed on
//! disk whose batch commit failed are adopted from the batch journal (see `recover`), and
//! a rescan records the local changes. Once that goes through, the folder takes changes
//! again. No restart is needed, and none would help while the disk is full. A reload reads
//! the whole index and rescans the folder, so failed ones back off (see [`reload_delay`]).

use std::collections::HashMap;
use std::time::Duration;

use tracing::{debug, info, warn};

use crate::engine::{EngineError, FolderEngine};
use crate::fs::watch::Change;
use crate::model::Replica;
use crate::store::StoreError;

/// The longest wait between two reloads of an index that cannot be written: how long the
/// folder may stay closed after space is freed.
pub(in crate::engine) const RELOAD_MAX: Duration = Duration::from_secs(8);

/// Failed reloads in a row, and when the next may run (monotonic ms).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(in crate::engine) struct ReloadBackoff {
    pub(in crate::engine) failures: u32,
    pub(in crate::engine) next_ms: u64,
}

/// The wait after the `failures`-th failed reload in a row: `first`, doubling, at most
/// [`RELOAD_MAX`].
pub(in crate::engine) fn reload_delay(failures: u32, first: Duration) -> Duration {
    crate::doubling_delay(first, failures, RELOAD_MAX)
}

impl FolderEngine {
    /// Stops the folder taking changes when `e` says the index could not be written.
    pub(in crate::engine) fn note_index_failure(&mut self, e: &EngineError) {
        let EngineError::Store(StoreError::Db { .. }) = e else {
            return;
        };
        if self.index_error.is_none() {
            warn!(folder = %self.id, error = %e, "the index cannot be written; the folder takes no change until it can (free space in state_dir), and resumes by itself");
            self.index_reload = ReloadBackoff::default();
        }
        self.index_error = Some(e.to_string());
    }

    /// `Err` while the index cannot be written.
    pub(in crate::engine) fn index_writable(&self) -> Result<(), EngineError> {
        match &self.index_error {
            Some(reason) => Err(EngineError::IndexUnwritable {
                folder: self.id.clone(),
                reason: reason.clone(),
            }),
            None => Ok(()),
        }
    }

    /// Reloads the replica from the index, adopts the journaled peer changes on disk and
    /// rescans; the folder takes changes again when all of it went through.
    /// Does nothing until the backoff of failed reloads is over (`now_ms` on the monotonic
    /// clock of [`crate::liveness::mono_ms`]).
    pub(in crate::engine) async fn reload_index(&mut self, now_ms: u64, first: Duration) {
        if now_ms < self.index_reload.next_ms {
            return;
        }
        match self.try_reload_index().await {
            Ok(()) => {
                self.index_reload = ReloadBackoff::default();
                info!(folder = %self.id, seq = self.replica.seq(), "the index can be written again; the folder takes changes again");
                self.seq_tx.send_replace(self.replica.seq());
            }
            Err(e) => {
                self.index_reload.failures = self.index_reload.failures.saturating_add(1);
                let wait = reload_delay(self.index_reload.failures, first);
                self.index_reload.next_ms = now_ms.saturating_add(wait.as_millis() as u64);
                debug!(folder = %self.id, error = %e, retry_in_ms = wait.as_millis() as u64, "the index still cannot be written");
                self.index_error = Some(e.to_string());
            }
        }
    }

    async fn try_reload_index(&mut self) -> Result<(), EngineError> {
        let rows = self.store.load_index(&self.id).await?;
        let mut stats = HashMap::with_capacity(rows.len());
        let mut records = Vec::with_capacity(rows.len());
        for (record, stat) in rows {
            if let Some(s) = stat {
                stats.insert(record.path.clone(), s);
            }
            records.push(record);
        }
        self.replica = Replica::new(self.opts.node)
            .with_max_skew(self.opts.max_clock_skew_ms)
            .with_records(records, crate::now_ms());
        self.stats = stats;
        self.adopt_placed_before_crash().await?;
        // The rescan runs with the folder open again; a failure closes it again.
        let reason = self.index_error.take();
        if let Err(e) = self.on_local(Change::Rescan).await {
            self.index_error = reason;
            return Err(e);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failed_reloads_back_off_to_a_bound() {
        let first = Duration::from_millis(500);
        let waits: Vec<u64> = (1..=7)
            .map(|n| reload_delay(n, first).as_millis() as u64)
            .collect();
        assert_eq!(waits, [500, 1000, 2000, 4000, 8000, 8000, 8000]);
        assert_eq!(reload_delay(u32::MAX, first), RELOAD_MAX);
        assert_eq!(reload_delay(1, Duration::from_secs(60)), RELOAD_MAX);
    }
}
