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
//! again. No restart is needed, and none would help while the disk is full.

use std::collections::HashMap;

use tracing::{debug, info, warn};

use crate::engine::{EngineError, FolderEngine};
use crate::fs::watch::Change;
use crate::model::Replica;
use crate::store::StoreError;

impl FolderEngine {
    /// Stops the folder taking changes when `e` says the index could not be written.
    pub(in crate::engine) fn note_index_failure(&mut self, e: &EngineError) {
        let EngineError::Store(StoreError::Db { .. }) = e else {
            return;
        };
        if self.index_error.is_none() {
            warn!(folder = %self.id, error = %e, "the index cannot be written; the folder takes no change until it can (free space in state_dir), and resumes by itself");
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
    pub(in crate::engine) async fn reload_index(&mut self) {
        match self.try_reload_index().await {
            Ok(()) => {
                info!(folder = %self.id, seq = self.replica.seq(), "the index can be written again; the folder takes changes again");
                self.seq_tx.send_replace(self.replica.seq());
            }
            Err(e) => {
                debug!(folder = %self.id, error = %e, "the index still cannot be written");
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
