//! The `skipped` table: peers' changes that kept failing to apply, set aside and retried.

use sqlx::Row;

use crate::model::{FileRecord, RelPath};

use super::codec::{bind_record, from_db, record_at, to_db};
use super::{Store, StoreError};

/// A peer's change that kept failing to apply: set aside, so that the rest of the peer's
/// stream flows, and retried with backoff until it applies or the peer moves past it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skipped {
    pub peer: String,
    /// The record as the peer sent it (`seq` is the peer's sequence number).
    pub record: FileRecord,
    pub problem: String,
    /// Failed attempts so far.
    pub attempts: u32,
    /// When it was first skipped, and when it is tried next (wall time, ms).
    pub first_ms: u64,
    pub retry_ms: u64,
}

/// Changes to the skipped list, written in the transaction of the batch that caused them.
#[derive(Debug, Clone, Default)]
pub struct SkipChanges {
    pub set: Vec<Skipped>,
    /// (peer, path) entries that applied or were overtaken.
    pub cleared: Vec<(String, RelPath)>,
}

impl Store {
    /// The skipped peer changes of a folder.
    pub async fn skipped(&self, folder: &str) -> Result<Vec<Skipped>, StoreError> {
        let rows = sqlx::query(
            "SELECT peer, path, kind, deleted, size, mode, hash, version, stamp_hlc, stamp_node, \
             seq, problem, attempts, first_ms, retry_ms FROM skipped WHERE folder = ? \
             ORDER BY peer, path",
        )
        .bind(folder)
        .fetch_all(&self.pool)
        .await
        .map_err(|e| self.db_err(e))?;
        let mut out = Vec::with_capacity(rows.len());
        for row in rows {
            let peer: String = row.get(0);
            let path: String = row.get(1);
            let corrupt = |problem: &str| StoreError::Corrupt {
                path: self.path.clone(),
                what: format!("skipped change {folder}/{path} from {peer}"),
                problem: problem.to_owned(),
            };
            out.push(Skipped {
                record: record_at(&row, 1, corrupt)?,
                problem: row.get(11),
                attempts: u32::try_from(row.get::<i64, _>(12)).unwrap_or(u32::MAX),
                first_ms: from_db(row.get(13)),
                retry_ms: from_db(row.get(14)),
                peer,
            });
        }
        Ok(out)
    }

    /// Applies changes to the skipped list, in the transaction of the batch that caused them.
    pub(super) async fn change_skipped(
        &self,
        tx: &mut sqlx::SqliteConnection,
        folder: &str,
        skips: &SkipChanges,
    ) -> Result<(), StoreError> {
        for (peer, path) in &skips.cleared {
            sqlx::query("DELETE FROM skipped WHERE folder = ? AND peer = ? AND path = ?")
                .bind(folder)
                .bind(peer)
                .bind(path.as_str())
                .execute(&mut *tx)
                .await
                .map_err(|e| self.db_err(e))?;
        }
        for s in &skips.set {
            let q = sqlx::query(
                "INSERT OR REPLACE INTO skipped (folder, peer, path, kind, deleted, size, mode, \
                 hash, version, stamp_hlc, stamp_node, seq, problem, attempts, first_ms, retry_ms) \
                 VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            )
            .bind(folder)
            .bind(&s.peer);
            bind_record(q, &s.record)
                .bind(&s.problem)
                .bind(i64::from(s.attempts))
                .bind(to_db(s.first_ms))
                .bind(to_db(s.retry_ms))
                .execute(&mut *tx)
                .await
                .map_err(|e| self.db_err(e))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::testing::rec;
    use crate::store::{Cursor, SkipChanges};

    #[tokio::test]
    async fn skipped_changes_are_kept_with_their_batch_and_cleared_by_peer_and_path() {
        let dir = tempfile::tempdir().expect("tempdir");
        let skip = |peer: &str, path: &str, attempts: u32| Skipped {
            peer: peer.into(),
            record: rec(path, 40).record,
            problem: "Permission denied (os error 13)".into(),
            attempts,
            first_ms: 1_000,
            retry_ms: 61_000,
        };
        {
            let store = Store::open(dir.path()).await.expect("open");
            let set = SkipChanges {
                set: vec![skip("gw2", "api/a.xml", 3), skip("gw3", "api/a.xml", 3)],
                cleared: Vec::new(),
            };
            store
                .commit(
                    "f",
                    &[rec("c", 2)],
                    Some(("gw2", Cursor { epoch: 3, seq: 50 })),
                    &set,
                )
                .await
                .expect("commit");
        }
        let store = Store::open(dir.path()).await.expect("reopen");
        let kept = store.skipped("f").await.expect("skipped");
        assert_eq!(
            kept,
            vec![skip("gw2", "api/a.xml", 3), skip("gw3", "api/a.xml", 3)]
        );
        assert!(kept[0].record.same_version(&rec("api/a.xml", 40).record));
        assert_eq!(kept[0].record.seq, 40, "the peer's sequence is kept");
        assert!(store.skipped("other").await.expect("skipped").is_empty());
        // A new attempt replaces the entry; clearing one peer's entry leaves the other's.
        let changes = SkipChanges {
            set: vec![skip("gw3", "api/a.xml", 4)],
            cleared: vec![("gw2".into(), RelPath::new("api/a.xml").expect("valid"))],
        };
        store
            .commit("f", &[], None, &changes)
            .await
            .expect("commit");
        assert_eq!(
            store.skipped("f").await.expect("skipped"),
            vec![skip("gw3", "api/a.xml", 4)]
        );
    }
}
