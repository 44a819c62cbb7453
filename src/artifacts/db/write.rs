//! Publish and remove: each one transaction that writes the bundle and appends its events,
//! retried when it loses to a concurrent one.

use sqlx::{AssertSqlSafe, Row};

use super::*;
use crate::artifacts::{Bundle, Instruction};

/// Tries of a write transaction that lost to a concurrent one.
const TRANSIENT_RETRIES: u32 = 8;

fn transient_backoff(attempt: u32) -> std::time::Duration {
    // 10, 20, 40 ... ms, with jitter so two losers do not collide again.
    let base = 10u64 << attempt.min(6);
    std::time::Duration::from_millis(base + rand::random::<u64>() % base)
}

/// True for errors a retry of the whole transaction cures: MySQL/MariaDB deadlock (1213) and
/// lock wait timeout (1205), PostgreSQL serialization failure / deadlock (40001, 40P01),
/// SQLite busy / locked.
fn is_transient(e: &DbError) -> bool {
    let DbError::Sql {
        source: sqlx::Error::Database(db),
        ..
    } = e
    else {
        return false;
    };
    let code = db.code().map(|c| c.into_owned()).unwrap_or_default();
    matches!(
        code.as_str(),
        "1213" | "1205" | "40001" | "40P01" | "5" | "6" | "517" | "261" | "262"
    ) || db.message().contains("database is locked")
        || db.message().contains("Deadlock found")
}

/// Runs `once` until it succeeds, fails with an error a retry does not cure, or has been
/// retried [`TRANSIENT_RETRIES`] times, waiting [`transient_backoff`] before each retry.
pub(super) async fn retry_transient<T, F, Fut>(mut once: F) -> Result<T, DbError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, DbError>>,
{
    let mut attempt = 0;
    loop {
        match once().await {
            Err(e) if attempt < TRANSIENT_RETRIES && is_transient(&e) => {
                attempt += 1;
                tokio::time::sleep(transient_backoff(attempt)).await;
            }
            other => return other,
        }
    }
}

impl ArtifactDb {
    /// Saves a bundle as the artifact's next revision, with `publish` events for its labels
    /// (and `remove` events for labels it no longer has), in one transaction. A transaction
    /// that loses to a concurrent one (deadlock, serialization failure, SQLite busy) is rolled
    /// back by the server and tried again.
    pub async fn publish(
        &self,
        meta: &NewArtifact,
        bundle: &Bundle,
        now_ms: u64,
    ) -> Result<i64, DbError> {
        retry_transient(|| self.publish_once(meta, bundle, now_ms)).await
    }

    // Long: one transaction read top to bottom (revision, files, labels, events, commit), so
    // that everything the "event after its bundle" rule depends on is in one place.
    async fn publish_once(
        &self,
        meta: &NewArtifact,
        bundle: &Bundle,
        now_ms: u64,
    ) -> Result<i64, DbError> {
        let size = bundle.size();
        if size > MAX_BUNDLE_BYTES {
            return Err(DbError::Artifact {
                id: meta.id.clone(),
                problem: format!(
                    "bundle is {size} bytes, more than the {MAX_BUNDLE_BYTES} allowed"
                ),
            });
        }
        let digest = bundle.digest();
        let lock = if self.backend == Backend::Sqlite {
            ""
        } else {
            " FOR UPDATE"
        };
        let mut tx = self.pool.begin().await.map_err(|e| self.err(e))?;
        let row = sqlx::query(AssertSqlSafe(self.sql(&format!(
            "SELECT revision FROM artifacts WHERE id = ?{lock}"
        ))))
        .bind(&meta.id)
        .fetch_optional(&mut *tx)
        .await
        .map_err(|e| self.err(e))?;
        let revision = match row {
            Some(r) => {
                let rev: i64 = r.try_get(0).map_err(|e| self.err(e))?;
                sqlx::query(AssertSqlSafe(self.sql(
                    "UPDATE artifacts SET name = ?, version = ?, tenant = ?, folder = ?, revision = ?, \
                     removed = 0, digest = ?, size = ?, updated_ms = ? WHERE id = ?",
                )))
                .bind(&meta.name)
                .bind(&meta.version)
                .bind(&meta.tenant)
                .bind(&meta.folder)
                .bind(rev + 1)
                .bind(digest.to_vec())
                .bind(size as i64)
                .bind(now_ms as i64)
                .bind(&meta.id)
                .execute(&mut *tx)
                .await
                .map_err(|e| self.err(e))?;
                rev + 1
            }
            None => {
                sqlx::query(AssertSqlSafe(self.sql(
                    "INSERT INTO artifacts (id, name, version, tenant, folder, revision, removed, digest, size, updated_ms) \
                     VALUES (?, ?, ?, ?, ?, 1, 0, ?, ?, ?)",
                )))
                .bind(&meta.id)
                .bind(&meta.name)
                .bind(&meta.version)
                .bind(&meta.tenant)
                .bind(&meta.folder)
                .bind(digest.to_vec())
                .bind(size as i64)
                .bind(now_ms as i64)
                .execute(&mut *tx)
                .await
                .map_err(|e| self.err(e))?;
                1
            }
        };
        let old_labels: Vec<String> = sqlx::query(AssertSqlSafe(
            self.sql("SELECT label FROM artifact_labels WHERE artifact_id = ?"),
        ))
        .bind(&meta.id)
        .fetch_all(&mut *tx)
        .await
        .map_err(|e| self.err(e))?
        .iter()
        .filter_map(|r| r.try_get::<String, _>(0).ok())
        .collect();
        sqlx::query(AssertSqlSafe(
            self.sql("DELETE FROM artifact_labels WHERE artifact_id = ?"),
        ))
        .bind(&meta.id)
        .execute(&mut *tx)
        .await
        .map_err(|e| self.err(e))?;
        for label in &meta.labels {
            sqlx::query(AssertSqlSafe(self.sql(
                "INSERT INTO artifact_labels (artifact_id, label) VALUES (?, ?)",
            )))
            .bind(&meta.id)
            .bind(label)
            .execute(&mut *tx)
            .await
            .map_err(|e| self.err(e))?;
        }
        sqlx::query(AssertSqlSafe(
            self.sql("DELETE FROM artifact_files WHERE artifact_id = ?"),
        ))
        .bind(&meta.id)
        .execute(&mut *tx)
        .await
        .map_err(|e| self.err(e))?;
        for (file_no, file) in bundle.files.iter().enumerate() {
            let chunks: Vec<&[u8]> = if file.data.is_empty() {
                vec![&[][..]]
            } else {
                file.data.chunks(CHUNK_BYTES).collect()
            };
            for (chunk_no, chunk) in chunks.into_iter().enumerate() {
                sqlx::query(AssertSqlSafe(self.sql(
                    "INSERT INTO artifact_files (artifact_id, revision, file_no, chunk, path, mode, data) \
                     VALUES (?, ?, ?, ?, ?, ?, ?)",
                )))
                .bind(&meta.id)
                .bind(revision)
                .bind(file_no as i64)
                .bind(chunk_no as i64)
                .bind(file.path.as_str())
                .bind(i64::from(file.mode))
                .bind(chunk.to_vec())
                .execute(&mut *tx)
                .await
                .map_err(|e| self.err(e))?;
            }
        }
        let mut events: Vec<(&str, Instruction)> = meta
            .labels
            .iter()
            .map(|l| (l.as_str(), Instruction::Publish))
            .collect();
        events.extend(
            old_labels
                .iter()
                .filter(|l| !meta.labels.contains(l))
                .map(|l| (l.as_str(), Instruction::Remove)),
        );
        for (label, instruction) in events {
            self.append_event(&mut tx, &meta.id, label, instruction, revision, now_ms)
                .await?;
        }
        tx.commit().await.map_err(|e| self.err(e))?;
        if self.backend == Backend::Postgres {
            // Wake LISTENing retrievers; the event table stays the source of truth.
            let _ = self.exec("NOTIFY artisync_artifacts").await;
        }
        Ok(revision)
    }

    async fn append_event(
        &self,
        tx: &mut sqlx::Transaction<'_, sqlx::Any>,
        id: &str,
        label: &str,
        instruction: Instruction,
        revision: i64,
        now_ms: u64,
    ) -> Result<(), DbError> {
        sqlx::query(AssertSqlSafe(self.sql(
            "INSERT INTO artifact_events (artifact_id, label, instruction, revision, created_ms) VALUES (?, ?, ?, ?, ?)",
        )))
        .bind(id)
        .bind(label)
        .bind(instruction.as_str())
        .bind(revision)
        .bind(now_ms as i64)
        .execute(&mut **tx)
        .await
        .map_err(|e| self.err(e))?;
        Ok(())
    }

    /// Removes an artifact from one label, or from all (then it is marked removed).
    pub async fn remove(
        &self,
        id: &str,
        label: Option<&str>,
        now_ms: u64,
    ) -> Result<Vec<String>, DbError> {
        retry_transient(|| self.remove_once(id, label, now_ms)).await
    }

    async fn remove_once(
        &self,
        id: &str,
        label: Option<&str>,
        now_ms: u64,
    ) -> Result<Vec<String>, DbError> {
        let mut tx = self.pool.begin().await.map_err(|e| self.err(e))?;
        let row = sqlx::query(AssertSqlSafe(
            self.sql("SELECT revision, removed FROM artifacts WHERE id = ?"),
        ))
        .bind(id)
        .fetch_optional(&mut *tx)
        .await
        .map_err(|e| self.err(e))?
        .ok_or_else(|| DbError::NotFound(id.to_owned()))?;
        let revision: i64 = row.try_get(0).map_err(|e| self.err(e))?;
        let labels: Vec<String> = sqlx::query(AssertSqlSafe(
            self.sql("SELECT label FROM artifact_labels WHERE artifact_id = ?"),
        ))
        .bind(id)
        .fetch_all(&mut *tx)
        .await
        .map_err(|e| self.err(e))?
        .iter()
        .filter_map(|r| r.try_get::<String, _>(0).ok())
        .collect();
        let targets: Vec<String> = match label {
            Some(l) if labels.iter().any(|x| x == l) => vec![l.to_owned()],
            Some(l) => {
                return Err(DbError::Artifact {
                    id: id.to_owned(),
                    problem: format!("has no label {l:?} (labels: {labels:?})"),
                });
            }
            None => labels.clone(),
        };
        for l in &targets {
            sqlx::query(AssertSqlSafe(self.sql(
                "DELETE FROM artifact_labels WHERE artifact_id = ? AND label = ?",
            )))
            .bind(id)
            .bind(l)
            .execute(&mut *tx)
            .await
            .map_err(|e| self.err(e))?;
            self.append_event(&mut tx, id, l, Instruction::Remove, revision, now_ms)
                .await?;
        }
        if targets.len() == labels.len() {
            sqlx::query(AssertSqlSafe(self.sql(
                "UPDATE artifacts SET removed = 1, updated_ms = ? WHERE id = ?",
            )))
            .bind(now_ms as i64)
            .bind(id)
            .execute(&mut *tx)
            .await
            .map_err(|e| self.err(e))?;
        }
        tx.commit().await.map_err(|e| self.err(e))?;
        if self.backend == Backend::Postgres {
            let _ = self.exec("NOTIFY artisync_artifacts").await;
        }
        Ok(targets)
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing;
    use super::super::tests::{bundle, meta};
    use super::*;

    /// Publishers saving different artifacts at the same moment all succeed (each in its own
    /// pool, as separate CLI processes would): a transaction that loses a deadlock or finds
    /// SQLite busy is retried, never reported.
    async fn concurrent_publishes(backend: Backend) {
        let dir = tempfile::tempdir().expect("tempdir");
        let Some(url) = testing::fresh_url(backend, dir.path()).await else {
            return;
        };
        ArtifactDb::connect(&url)
            .await
            .expect("migrate")
            .pool
            .close()
            .await;
        let tasks: Vec<_> = (0..12u32)
            .map(|i| {
                let url = url.clone();
                tokio::spawn(async move {
                    let db = ArtifactDb::connect(&url).await?;
                    let id = format!("00000000-0000-4000-8000-{i:012}");
                    let b =
                        bundle(&[("default/api/x.xml", format!("<api n=\"{i}\"/>").as_bytes())]);
                    let r = db.publish(&meta(&id, &["L1", "L2"]), &b, 1).await;
                    db.pool.close().await;
                    r
                })
            })
            .collect();
        for t in tasks {
            t.await
                .expect("task")
                .unwrap_or_else(|e| panic!("{}: concurrent publish: {e}", backend.name()));
        }
        let db = ArtifactDb::connect(&url).await.expect("connect");
        assert_eq!(
            db.list().await.expect("list").len(),
            12,
            "{}",
            backend.name()
        );
        assert_eq!(db.events_after(0, 100).await.expect("events").len(), 24);
        db.pool.close().await;
        testing::drop_db(&url).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_publishes_sqlite() {
        concurrent_publishes(Backend::Sqlite).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_publishes_postgres() {
        concurrent_publishes(Backend::Postgres).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_publishes_mysql() {
        concurrent_publishes(Backend::MySql).await;
    }
}
