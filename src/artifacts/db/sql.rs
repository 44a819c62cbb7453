//! What differs per backend: `?` placeholders as each wants them, and the schema, one
//! migration per backend because column types differ (plus MariaDB's migration lock).

use std::borrow::Cow;

use sqlx::migrate::{Migration, MigrationType, Migrator};
use sqlx::{AssertSqlSafe, SqlSafeStr};

use super::write::retry_transient;
use super::*;

/// `query` with its `?` placeholders as `backend` wants them: `$1, $2, ...` for PostgreSQL,
/// unchanged for the others (sqlx's `Any` driver does not translate them).
pub(crate) fn placeholders(backend: Backend, query: &str) -> String {
    if backend != Backend::Postgres {
        return query.to_owned();
    }
    let mut out = String::with_capacity(query.len() + 8);
    let mut n = 0;
    for c in query.chars() {
        if c == '?' {
            n += 1;
            out.push_str(&format!("${n}"));
        } else {
            out.push(c);
        }
    }
    out
}

const SQLITE_SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS artifacts (
    id VARCHAR(36) PRIMARY KEY, name VARCHAR(255) NOT NULL, version VARCHAR(64) NOT NULL,
    tenant VARCHAR(255) NOT NULL, folder VARCHAR(64) NOT NULL, revision BIGINT NOT NULL,
    removed BIGINT NOT NULL, digest BLOB NOT NULL, size BIGINT NOT NULL, updated_ms BIGINT NOT NULL);
CREATE TABLE IF NOT EXISTS artifact_labels (
    artifact_id VARCHAR(36) NOT NULL, label VARCHAR(255) NOT NULL, PRIMARY KEY (artifact_id, label));
CREATE INDEX IF NOT EXISTS artifact_labels_by_label ON artifact_labels (label);
CREATE TABLE IF NOT EXISTS artifact_files (
    artifact_id VARCHAR(36) NOT NULL, revision BIGINT NOT NULL, file_no BIGINT NOT NULL,
    chunk BIGINT NOT NULL, path VARCHAR(3072) NOT NULL, mode BIGINT NOT NULL, data BLOB NOT NULL,
    PRIMARY KEY (artifact_id, revision, file_no, chunk));
CREATE TABLE IF NOT EXISTS artifact_events (
    id INTEGER PRIMARY KEY AUTOINCREMENT, artifact_id VARCHAR(36) NOT NULL,
    label VARCHAR(255) NOT NULL, instruction VARCHAR(16) NOT NULL, revision BIGINT NOT NULL,
    created_ms BIGINT NOT NULL);
"#;

const POSTGRES_SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS artifacts (
    id VARCHAR(36) PRIMARY KEY, name VARCHAR(255) NOT NULL, version VARCHAR(64) NOT NULL,
    tenant VARCHAR(255) NOT NULL, folder VARCHAR(64) NOT NULL, revision BIGINT NOT NULL,
    removed BIGINT NOT NULL, digest BYTEA NOT NULL, size BIGINT NOT NULL, updated_ms BIGINT NOT NULL);
CREATE TABLE IF NOT EXISTS artifact_labels (
    artifact_id VARCHAR(36) NOT NULL, label VARCHAR(255) NOT NULL, PRIMARY KEY (artifact_id, label));
CREATE INDEX IF NOT EXISTS artifact_labels_by_label ON artifact_labels (label);
CREATE TABLE IF NOT EXISTS artifact_files (
    artifact_id VARCHAR(36) NOT NULL, revision BIGINT NOT NULL, file_no BIGINT NOT NULL,
    chunk BIGINT NOT NULL, path VARCHAR(3072) NOT NULL, mode BIGINT NOT NULL, data BYTEA NOT NULL,
    PRIMARY KEY (artifact_id, revision, file_no, chunk));
CREATE TABLE IF NOT EXISTS artifact_events (
    id BIGSERIAL PRIMARY KEY, artifact_id VARCHAR(36) NOT NULL, label VARCHAR(255) NOT NULL,
    instruction VARCHAR(16) NOT NULL, revision BIGINT NOT NULL, created_ms BIGINT NOT NULL);
"#;

const MYSQL_SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS artifacts (
    id VARCHAR(36) PRIMARY KEY, name VARCHAR(255) NOT NULL, version VARCHAR(64) NOT NULL,
    tenant VARCHAR(255) NOT NULL, folder VARCHAR(64) NOT NULL, revision BIGINT NOT NULL,
    removed BIGINT NOT NULL, digest VARBINARY(32) NOT NULL, size BIGINT NOT NULL,
    updated_ms BIGINT NOT NULL) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4;
CREATE TABLE IF NOT EXISTS artifact_labels (
    artifact_id VARCHAR(36) NOT NULL, label VARCHAR(255) NOT NULL, PRIMARY KEY (artifact_id, label),
    KEY artifact_labels_by_label (label)) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4;
CREATE TABLE IF NOT EXISTS artifact_files (
    artifact_id VARCHAR(36) NOT NULL, revision BIGINT NOT NULL, file_no BIGINT NOT NULL,
    chunk BIGINT NOT NULL, path TEXT NOT NULL, mode BIGINT NOT NULL, data LONGBLOB NOT NULL,
    PRIMARY KEY (artifact_id, revision, file_no, chunk)) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4;
CREATE TABLE IF NOT EXISTS artifact_events (
    id BIGINT AUTO_INCREMENT PRIMARY KEY, artifact_id VARCHAR(36) NOT NULL,
    label VARCHAR(255) NOT NULL, instruction VARCHAR(16) NOT NULL, revision BIGINT NOT NULL,
    created_ms BIGINT NOT NULL) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4;
"#;

impl ArtifactDb {
    pub(super) async fn migrate(&self) -> Result<(), DbError> {
        if self.backend == Backend::Sqlite {
            // WAL lets retrievers read while a publisher writes. Switching needs the file to
            // itself: two connections switching at once (agents and publishers starting
            // together on a new file) get SQLITE_BUSY without a wait, so try again.
            retry_transient(|| self.exec("PRAGMA journal_mode=WAL")).await?;
        }
        let schema = match self.backend {
            Backend::Sqlite => SQLITE_SCHEMA,
            Backend::Postgres => POSTGRES_SCHEMA,
            Backend::MySql => MYSQL_SCHEMA,
        };
        let migration = Migration::new(
            1,
            Cow::Borrowed("artifact store"),
            MigrationType::Simple,
            AssertSqlSafe(schema).into_sql_str(),
            false,
        );
        let migrator = Migrator {
            migrations: Cow::Owned(vec![migration]),
            table_name: Cow::Borrowed("artisync_migrations"),
            // MySQL/MariaDB: locked below instead.
            locking: self.backend != Backend::MySql,
            ..Migrator::DEFAULT
        };
        let failed = |source| DbError::Migrate {
            backend: self.backend.name(),
            source,
        };
        match self.backend {
            Backend::Postgres => migrator.run(&self.pool).await.map_err(failed),
            Backend::MySql => self.migrate_locked(&migrator).await,
            Backend::Sqlite => {
                // sqlx takes no lock on SQLite: of two processes (an agent and a publisher)
                // migrating a new file at once, the second fails on the first one's row. Its
                // transaction rolled back, nothing is half done, and the schema is there by
                // then: look again.
                let mut attempt = 0u32;
                loop {
                    match migrator.run(&self.pool).await {
                        Ok(()) => return Ok(()),
                        Err(_) if attempt < 3 => {
                            attempt += 1;
                            tokio::time::sleep(std::time::Duration::from_millis(50 << attempt))
                                .await;
                        }
                        Err(source) => return Err(failed(source)),
                    }
                }
            }
        }
    }

    /// MySQL/MariaDB migration under a named lock. sqlx's own lock is `GET_LOCK(name, -1)`,
    /// which MariaDB answers at once with NULL (a negative timeout is not "forever" there), so
    /// agents starting together on a new database migrated concurrently and failed
    /// ("Duplicate entry '1'", "migration 1 is partially applied"). The lock is held by the
    /// connection that migrates, with a real timeout.
    async fn migrate_locked(&self, migrator: &Migrator) -> Result<(), DbError> {
        const LOCK: &str = "CONCAT('artisync_migrate_', SHA1(COALESCE(DATABASE(), '')))";
        let mut conn = self.pool.acquire().await.map_err(|e| self.err(e))?;
        let got: i64 = sqlx::query_scalar(AssertSqlSafe(format!(
            "SELECT CAST(COALESCE(GET_LOCK({LOCK}, 60), 0) AS SIGNED)"
        )))
        .fetch_one(&mut *conn)
        .await
        .map_err(|e| self.err(e))?;
        if got != 1 {
            return Err(self.err(sqlx::Error::Protocol(
                "another process held the schema migration lock for 60 s".into(),
            )));
        }
        // `run_direct` is `run` on one connection (sqlx's way around an `Acquire` lifetime
        // error when the future must be `Send`).
        let result = migrator.run_direct(None, &mut *conn, false).await;
        let _ = sqlx::query(AssertSqlSafe(format!("SELECT RELEASE_LOCK({LOCK})")))
            .execute(&mut *conn)
            .await;
        result.map_err(|source| DbError::Migrate {
            backend: self.backend.name(),
            source,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing;
    use super::*;

    /// Agents (and publishers) starting together on a fresh database all get a migrated
    /// store; none fails because another one is migrating at the same moment.
    async fn concurrent_first_connects(backend: Backend) {
        let dir = tempfile::tempdir().expect("tempdir");
        for _round in 0..3 {
            let Some(url) = testing::fresh_url(backend, dir.path()).await else {
                return;
            };
            let tries: Vec<_> = (0..8)
                .map(|_| {
                    let url = url.clone();
                    tokio::spawn(async move { ArtifactDb::connect(&url).await })
                })
                .collect();
            for t in tries {
                let db = t
                    .await
                    .expect("task")
                    .unwrap_or_else(|e| panic!("{}: concurrent connect: {e}", backend.name()));
                db.pool.close().await;
            }
            testing::drop_db(&url).await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_first_connects_sqlite() {
        concurrent_first_connects(Backend::Sqlite).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_first_connects_postgres() {
        concurrent_first_connects(Backend::Postgres).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_first_connects_mysql() {
        concurrent_first_connects(Backend::MySql).await;
    }
}
