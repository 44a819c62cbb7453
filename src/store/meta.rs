//! The `meta` table: key/value pairs of the index, today each folder's index epoch
//! (`epoch:<folder>`).

use sqlx::Row;

use super::{Store, StoreError};

impl Store {
    /// The folder's index epoch, created on first use. A new epoch (a lost or reset index)
    /// makes every peer send this node's folder in full again.
    pub async fn epoch(&self, folder: &str, fresh: u64) -> Result<u64, StoreError> {
        let key = format!("epoch:{folder}");
        sqlx::query("INSERT OR IGNORE INTO meta (key, value) VALUES (?, ?)")
            .bind(&key)
            .bind(fresh.to_string())
            .execute(&self.pool)
            .await
            .map_err(|e| self.db_err(e))?;
        let row = sqlx::query("SELECT value FROM meta WHERE key = ?")
            .bind(&key)
            .fetch_one(&self.pool)
            .await
            .map_err(|e| self.db_err(e))?;
        let value: String = row.get(0);
        value.parse().map_err(|_| StoreError::Corrupt {
            path: self.path.clone(),
            what: key,
            problem: format!("epoch {value:?} is not a number"),
        })
    }

    /// Forgets the epoch of every folder: each gets a fresh one on its next [`Store::epoch`], so
    /// peers exchange each folder in full once. For an index that may have lost its last
    /// commits, which an epoch must never do (peers' cursors and the records they leave out
    /// assume it only moves forward). Returns how many epochs were dropped.
    pub async fn new_epochs(&self) -> Result<u64, StoreError> {
        let done = sqlx::query("DELETE FROM meta WHERE key LIKE 'epoch:%'")
            .execute(&self.pool)
            .await
            .map_err(|e| self.db_err(e))?;
        Ok(done.rows_affected())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::testing::rec;
    use crate::store::{Cursor, SkipChanges};

    #[tokio::test]
    async fn new_epochs_replace_every_folder_epoch_and_keep_rows_and_cursors() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).await.expect("open");
        assert_eq!(store.epoch("f", 7).await.expect("epoch"), 7);
        assert_eq!(store.epoch("g", 8).await.expect("epoch"), 8);
        let cursor = Cursor { epoch: 3, seq: 11 };
        store
            .commit(
                "f",
                &[rec("a", 1)],
                Some(("gw2", cursor)),
                &SkipChanges::default(),
            )
            .await
            .expect("commit");
        assert_eq!(store.new_epochs().await.expect("new epochs"), 2);
        assert_eq!(store.epoch("f", 17).await.expect("epoch"), 17);
        assert_eq!(store.epoch("g", 18).await.expect("epoch"), 18);
        assert_eq!(store.load_folder("f").await.expect("load").len(), 1);
        assert_eq!(store.cursor("gw2", "f").await.expect("cursor"), cursor);
        assert!(
            store.checkpoint().await.expect("checkpoint"),
            "nothing reads"
        );
        let wal = std::fs::metadata(dir.path().join("index.db-wal")).expect("wal");
        assert_eq!(
            wal.len(),
            0,
            "the checkpoint moved every commit to the database file"
        );
    }
}
