//! After a crash: the peer changes that were placed on disk but whose batch never reached the
//! index are adopted from the batch journal (see `Store::journal_applying`), before the
//! start-up scan would take them for local writes.

use std::path::Path;

use tracing::info;

use crate::engine::{EngineError, FolderEngine, block};
use crate::fs::scan;
use crate::model::{Causality, FileRecord, Kind};
use crate::store::{Journal, SkipChanges, StatKey, StoredRecord};

impl FolderEngine {
    /// Adopts every journaled record that the disk holds exactly (a live file with its hash,
    /// a directory, or nothing for a deletion) and that is newer than the index's record of
    /// the path; then clears the folder's journal. Returns how many were adopted.
    pub(in crate::engine) async fn adopt_placed_before_crash(
        &mut self,
    ) -> Result<usize, EngineError> {
        let journaled = self.store.applying(&self.id).await?;
        if journaled.is_empty() {
            return Ok(0);
        }
        let mut commits = Vec::new();
        for record in journaled {
            let newer = self
                .replica
                .get(&record.path)
                .is_none_or(|r| record.version.compare(&r.version) == Causality::After);
            if !newer {
                continue;
            }
            let full = self.root.join(record.path.as_str());
            let Some(stat) = block(|| on_disk_as(&full, &record)) else {
                continue;
            };
            match stat {
                Some(s) => self.stats.insert(record.path.clone(), s),
                None => self.stats.remove(&record.path),
            };
            let record = self.replica.commit(record);
            commits.push(StoredRecord {
                record,
                stat,
                origin: None,
            });
        }
        let adopted = commits.len();
        self.store
            .commit_journaled(
                &self.id,
                &commits,
                None,
                &SkipChanges::default(),
                Journal::Folder,
            )
            .await?;
        if adopted > 0 {
            info!(folder = %self.id, count = adopted, "adopted peer changes placed on disk before a crash");
        }
        Ok(adopted)
    }
}

/// `Some(stat)` when the disk at `full` is exactly `record` (`stat` of a live file, `None`
/// otherwise); `None` when it is anything else.
fn on_disk_as(full: &Path, record: &FileRecord) -> Option<Option<StatKey>> {
    let meta = std::fs::symlink_metadata(full);
    match (record.deleted, record.kind, meta) {
        (true, _, Err(e)) if e.kind() == std::io::ErrorKind::NotFound => Some(None),
        (false, Kind::Dir, Ok(m)) if m.is_dir() => Some(None),
        (false, Kind::File, Ok(m)) if m.is_file() => {
            let hash = scan::hash_file(full).ok()?;
            let after = std::fs::symlink_metadata(full).ok()?;
            let key = scan::stat_key(&m);
            (record.hash == Some(hash) && scan::stat_key(&after) == key).then_some(Some(key))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use crate::engine::testing::*;
    use crate::model::NodeId;
    use crate::store::Store;

    /// A crash after a peer's file was placed and before its batch was committed: the next
    /// start adopts the journaled record (the peer's version, not a new local write that
    /// would win over the peer's later writes); a journaled file whose disk holds other bytes
    /// is an ordinary local change; the journal is empty afterwards.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_peer_file_placed_before_a_crash_is_adopted_not_taken_for_a_local_write() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().join("root");
        std::fs::create_dir_all(&root).expect("mkdir");
        let placed = remote_file("placed.xml", b"<peer/>", 1, false).record;
        let overwritten = remote_file("overwritten.xml", b"<peer 2/>", 2, false).record;
        {
            let store = Store::open(dir.path()).await.expect("store");
            store
                .journal_applying("synapse-configs", 9, &[&placed, &overwritten])
                .await
                .expect("journal");
        }
        std::fs::write(root.join("placed.xml"), b"<peer/>").expect("placed");
        std::fs::write(root.join("overwritten.xml"), b"<local/>").expect("local");

        let (_handle, store, cancel, task) = engine_on(dir.path()).await;
        let row = row_of(&store, "placed.xml").await;
        assert_eq!(row.record.version, placed.version, "the peer's version");
        assert_eq!(
            row.record.stamp, placed.stamp,
            "the peer's stamp, not a new one"
        );
        let row = row_of(&store, "overwritten.xml").await;
        assert_eq!(row.record.hash, Some(*blake3::hash(b"<local/>").as_bytes()));
        assert_eq!(row.record.stamp.node, NodeId(1), "a local write");
        assert!(
            store
                .applying("synapse-configs")
                .await
                .expect("journal")
                .is_empty(),
            "the journal is cleared"
        );
        cancel.cancel();
        task.await.expect("engine task");
    }
}
