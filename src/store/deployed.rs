//! The `deployed` table: the artifacts the retriever has deployed on this node, one JSON
//! document each.

use sqlx::Row;

use super::{Store, StoreError};

/// An artifact the retriever has deployed on this node (kept as a JSON document).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DeployedArtifact {
    pub id: String,
    pub name: String,
    pub version: String,
    pub revision: i64,
    pub labels: Vec<String>,
    pub folder: String,
    pub paths: Vec<String>,
    pub deployed_ms: u64,
}

impl Store {
    /// Every deployed artifact, by id.
    pub async fn deployed(&self) -> Result<Vec<DeployedArtifact>, StoreError> {
        let rows = sqlx::query("SELECT artifact_id, doc FROM deployed ORDER BY artifact_id")
            .fetch_all(&self.pool)
            .await
            .map_err(|e| self.db_err(e))?;
        rows.into_iter()
            .map(|r| {
                let id: String = r.get(0);
                let doc: String = r.get(1);
                serde_json::from_str(&doc).map_err(|e| StoreError::Corrupt {
                    path: self.path.clone(),
                    what: format!("deployed artifact {id}"),
                    problem: e.to_string(),
                })
            })
            .collect()
    }

    /// Records deployed artifacts in one transaction.
    pub async fn set_deployed(&self, list: &[DeployedArtifact]) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await.map_err(|e| self.db_err(e))?;
        for d in list {
            let doc = serde_json::to_string(d).map_err(|e| StoreError::Corrupt {
                path: self.path.clone(),
                what: format!("deployed artifact {}", d.id),
                problem: e.to_string(),
            })?;
            sqlx::query("INSERT OR REPLACE INTO deployed (artifact_id, doc) VALUES (?, ?)")
                .bind(&d.id)
                .bind(doc)
                .execute(&mut *tx)
                .await
                .map_err(|e| self.db_err(e))?;
        }
        tx.commit().await.map_err(|e| self.db_err(e))
    }

    pub async fn remove_deployed(&self, id: &str) -> Result<(), StoreError> {
        sqlx::query("DELETE FROM deployed WHERE artifact_id = ?")
            .bind(id)
            .execute(&self.pool)
            .await
            .map_err(|e| self.db_err(e))?;
        Ok(())
    }
}
