//! The `deployed` table: the artifacts the retriever has deployed on this node, one JSON
//! document each.
//!
//! Versioning: the document is JSON, so fields are added with `#[serde(default)]` and a
//! document written by an older artisync still reads. `files` (each path's hash, what the
//! artifact claims) came after `paths`: a record without it is redeployed once by the
//! retriever at start-up, which fills it in.

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
    /// What the artifact claims at each of its paths (see `artifacts::owners`). Empty in a
    /// record written before claims were kept.
    #[serde(default)]
    pub files: Vec<DeployedFile>,
    /// What the operator must provision by hand for it (WSO2: endpoint credentials, client
    /// certificates).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
}

/// One path an artifact claims: the bytes it wants there, and whether it replaces a file that
/// another artifact put there (see `artifacts::owners`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DeployedFile {
    pub path: String,
    /// BLAKE3 of the content, hex.
    pub hash: String,
    /// Never replaces an existing file (WSO2's `ga-config-key`, `override: false`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub keep: bool,
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
        let mut conn = self.write_conn().await?;
        let result = async {
            let mut tx = sqlx::Connection::begin(&mut *conn)
                .await
                .map_err(|e| self.db_err(e))?;
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
        .await;
        self.written(conn, result)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_written_before_file_claims_still_reads() {
        let old = r#"{"id":"a","name":"n","version":"1","revision":3,"labels":["L"],"folder":"f","paths":["default/api/a.xml"],"deployed_ms":5}"#;
        let d: DeployedArtifact = serde_json::from_str(old).expect("reads");
        assert_eq!(d.paths, vec!["default/api/a.xml".to_owned()]);
        assert!(d.files.is_empty());
    }
}
