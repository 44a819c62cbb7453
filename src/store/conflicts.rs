//! The `conflicts` table: the log of kept losing sides of conflicts.

use sqlx::Row;

use super::codec::{from_db, to_db};
use super::{Store, StoreError};

/// One kept losing side of a conflict.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ConflictEntry {
    pub folder: String,
    pub path: String,
    pub copy: String,
    pub winner_node: String,
    pub created_ms: u64,
}

impl Store {
    /// Logs one kept losing side.
    pub async fn add_conflict(&self, entry: &ConflictEntry) -> Result<(), StoreError> {
        sqlx::query("INSERT INTO conflicts (folder, path, copy, winner_node, created_ms) VALUES (?, ?, ?, ?, ?)")
            .bind(&entry.folder)
            .bind(&entry.path)
            .bind(&entry.copy)
            .bind(&entry.winner_node)
            .bind(to_db(entry.created_ms))
            .execute(&self.pool)
            .await
            .map_err(|e| self.db_err(e))?;
        Ok(())
    }

    pub async fn conflicts(&self) -> Result<Vec<ConflictEntry>, StoreError> {
        let rows = sqlx::query(
            "SELECT folder, path, copy, winner_node, created_ms FROM conflicts ORDER BY id",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(|e| self.db_err(e))?;
        Ok(rows
            .into_iter()
            .map(|r| ConflictEntry {
                folder: r.get(0),
                path: r.get(1),
                copy: r.get(2),
                winner_node: r.get(3),
                created_ms: from_db(r.get(4)),
            })
            .collect())
    }
}
