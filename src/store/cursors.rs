//! The `peer_cursors` table: how far this node has applied each peer's index of each folder.

use sqlx::Row;

use super::codec::{from_db, to_db};
use super::{Store, StoreError};

/// How far this node has applied a peer's index of one folder.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Cursor {
    pub epoch: u64,
    pub seq: u64,
}

impl Store {
    /// The cursor of `peer` for `folder` (zero when none was written yet).
    pub async fn cursor(&self, peer: &str, folder: &str) -> Result<Cursor, StoreError> {
        let row = sqlx::query("SELECT epoch, seq FROM peer_cursors WHERE peer = ? AND folder = ?")
            .bind(peer)
            .bind(folder)
            .fetch_optional(&self.pool)
            .await
            .map_err(|e| self.db_err(e))?;
        Ok(row
            .map(|r| Cursor {
                epoch: from_db(r.get(0)),
                seq: from_db(r.get(1)),
            })
            .unwrap_or_default())
    }

    /// Writes cursors of `folder` on their own, each in a commit of its own: the cursors of
    /// batches that changed nothing here, which the engine writes late (see
    /// `engine::LazyCursors`).
    pub async fn put_cursors(
        &self,
        folder: &str,
        cursors: &[(crate::model::PeerName, Cursor)],
    ) -> Result<(), StoreError> {
        for (peer, c) in cursors {
            self.commit(folder, &[], Some((peer, *c)), &Default::default())
                .await?;
        }
        Ok(())
    }

    /// Writes a peer's cursor of a folder, in the transaction of the batch that advances it.
    pub(super) async fn put_cursor(
        &self,
        tx: &mut sqlx::SqliteConnection,
        peer: &str,
        folder: &str,
        c: Cursor,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT OR REPLACE INTO peer_cursors (peer, folder, epoch, seq) VALUES (?, ?, ?, ?)",
        )
        .bind(peer)
        .bind(folder)
        .bind(to_db(c.epoch))
        .bind(to_db(c.seq))
        .execute(tx)
        .await
        .map_err(|e| self.db_err(e))?;
        Ok(())
    }
}
