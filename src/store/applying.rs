//! The `applying` table: the records of a peer batch about to be put on disk, written before
//! the first file of the batch is placed and cleared in the transaction that commits the
//! batch. A crash in between leaves files on disk that the index does not know; at the next
//! start the engine adopts each one whose disk state is exactly the journaled record's,
//! instead of taking it for a new local write (which would win over the peer's newer writes
//! and bring an old version back).

use sqlx::Row;

use crate::model::FileRecord;

use super::codec::{bind_record, record_at, to_db};
use super::files::{chunk_rows, values_sql};
use super::{Store, StoreError};

fn insert_applying_sql(rows: usize) -> String {
    values_sql(
        "INSERT OR REPLACE INTO applying (folder, batch, path, kind, deleted, size, mode, hash, \
         version, stamp_hlc, stamp_node, seq) VALUES ",
        12,
        rows,
    )
}

impl Store {
    /// Journals the records of batch `batch` of `folder` before they are placed: many rows
    /// per statement, each statement its own commit (one round trip to SQLite for a small
    /// batch). A journal cut short by an error is harmless: the batch then fails before
    /// anything is placed, and a journaled record is only ever adopted when the disk holds
    /// exactly it.
    pub async fn journal_applying(
        &self,
        folder: &str,
        batch: u64,
        records: &[&FileRecord],
    ) -> Result<(), StoreError> {
        let mut conn = self.write_conn().await?;
        let result = async {
            let mut rest = records;
            while !rest.is_empty() {
                let n = chunk_rows(rest.len());
                let (chunk, tail) = rest.split_at(n);
                rest = tail;
                let mut q = sqlx::query(sqlx::AssertSqlSafe(insert_applying_sql(n)));
                for r in chunk {
                    q = bind_record(q.bind(folder).bind(to_db(batch)), r);
                }
                q.execute(&mut *conn).await.map_err(|e| self.db_err(e))?;
            }
            Ok(())
        }
        .await;
        self.written(conn, result)
    }

    /// The journaled records of `folder` (left by batches whose commit never came).
    pub async fn applying(&self, folder: &str) -> Result<Vec<FileRecord>, StoreError> {
        let rows = sqlx::query(
            "SELECT path, kind, deleted, size, mode, hash, version, stamp_hlc, stamp_node, seq \
             FROM applying WHERE folder = ? ORDER BY path",
        )
        .bind(folder)
        .fetch_all(&self.pool)
        .await
        .map_err(|e| self.db_err(e))?;
        let mut out = Vec::with_capacity(rows.len());
        for row in rows {
            let path: String = row.get(0);
            let corrupt = |problem: &str| StoreError::Corrupt {
                path: self.path.clone(),
                what: format!("journaled change {folder}/{path}"),
                problem: problem.to_owned(),
            };
            out.push(record_at(&row, 0, corrupt)?);
        }
        Ok(out)
    }

    /// Clears the journal of one batch (`Some`), or of the whole folder, in `tx`.
    pub(super) async fn clear_applying(
        &self,
        tx: &mut sqlx::SqliteConnection,
        folder: &str,
        batch: Option<u64>,
    ) -> Result<(), StoreError> {
        match batch {
            Some(b) => {
                sqlx::query("DELETE FROM applying WHERE folder = ? AND batch = ?")
                    .bind(folder)
                    .bind(to_db(b))
                    .execute(&mut *tx)
                    .await
            }
            None => {
                sqlx::query("DELETE FROM applying WHERE folder = ?")
                    .bind(folder)
                    .execute(&mut *tx)
                    .await
            }
        }
        .map(|_| ())
        .map_err(|e| self.db_err(e))
    }
}

#[cfg(test)]
mod tests {
    use crate::store::testing::rec;
    use crate::store::{Journal, SkipChanges, Store};

    #[tokio::test]
    async fn a_batch_journal_lives_until_its_commit() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).await.expect("open");
        let (a, b) = (rec("a.xml", 1), rec("b.xml", 2));
        store
            .journal_applying("f", 7, &[&a.record])
            .await
            .expect("journal");
        store
            .journal_applying("f", 8, &[&b.record])
            .await
            .expect("journal");
        let journaled = store.applying("f").await.expect("read");
        assert_eq!(journaled, vec![a.record.clone(), b.record.clone()]);
        assert!(store.applying("g").await.expect("read").is_empty());
        // Batch 7 commits: its journal goes in the same transaction; 8's stays.
        store
            .commit_journaled(
                "f",
                std::slice::from_ref(&a),
                None,
                &SkipChanges::default(),
                Journal::Batch(7),
            )
            .await
            .expect("commit");
        assert_eq!(
            store.applying("f").await.expect("read"),
            vec![b.record.clone()]
        );
        store
            .commit_journaled("f", &[], None, &SkipChanges::default(), Journal::Folder)
            .await
            .expect("commit");
        assert!(store.applying("f").await.expect("read").is_empty());
        // A batch larger than one statement's rows is journaled whole.
        let many: Vec<_> = (0..300).map(|i| rec(&format!("d/{i:03}.xml"), i)).collect();
        let refs: Vec<_> = many.iter().map(|r| &r.record).collect();
        store
            .journal_applying("f", 9, &refs)
            .await
            .expect("journal");
        assert_eq!(store.applying("f").await.expect("read").len(), 300);
    }
}
