//! The artifact database: SQLite (embedded default), PostgreSQL or MySQL/MariaDB through
//! sqlx's `Any` driver. Queries are written once with `?` placeholders (rewritten to `$n` for
//! PostgreSQL); the schema has one migration per backend because column types differ.
//!
//! Tables: `artifacts` (one row per artifact: metadata, current revision, removed flag, bundle
//! digest), `artifact_labels`, `artifact_files` (the bundle, stored in 1 MiB chunks so no row
//! comes near MariaDB's default 16 MiB `max_allowed_packet`), and `artifact_events` (the change
//! log retrievers follow). Saving is one transaction that writes the bundle and appends the
//! events, so an event is never visible before its bundle.

use std::borrow::Cow;
use std::collections::BTreeMap;

use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::migrate::{Migration, MigrationType, Migrator};
use sqlx::{AnyPool, AssertSqlSafe, Row, SqlSafeStr};

use super::{ArtifactMeta, Bundle, BundleFile, Event, Instruction};
use crate::model::RelPath;

/// Bundle bytes per `artifact_files` row.
const CHUNK_BYTES: usize = 1024 * 1024;
/// Largest bundle accepted (all files together).
pub const MAX_BUNDLE_BYTES: u64 = 256 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("database URL {url:?}: {problem}")]
    Url { url: String, problem: String },
    #[error("artifact database ({backend}): {source}")]
    Sql {
        backend: &'static str,
        source: sqlx::Error,
    },
    #[error("artifact database ({backend}): migration failed: {source}")]
    Migrate {
        backend: &'static str,
        source: sqlx::migrate::MigrateError,
    },
    #[error("artifact {id}: {problem}")]
    Artifact { id: String, problem: String },
    #[error("artifact {0} does not exist")]
    NotFound(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
    MySql,
}

impl Backend {
    pub fn name(self) -> &'static str {
        match self {
            Backend::Sqlite => "sqlite",
            Backend::Postgres => "postgres",
            Backend::MySql => "mysql",
        }
    }

    /// Which backend a URL is for, or why it is not usable.
    pub fn of_url(url: &str) -> Result<Self, DbError> {
        let scheme = url.split(':').next().unwrap_or_default();
        match scheme {
            "sqlite" => Ok(Backend::Sqlite),
            "postgres" | "postgresql" => Ok(Backend::Postgres),
            "mysql" | "mariadb" => Ok(Backend::MySql),
            _ => Err(DbError::Url {
                url: redact(url),
                problem: "must start with sqlite:, postgres://, postgresql:// or mysql://".into(),
            }),
        }
    }
}

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

/// A URL with its password replaced, for messages and logs.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let userinfo = &url[s + 3..at];
            match userinfo.find(':') {
                Some(c) => format!("{}{}:***{}", &url[..s + 3], &userinfo[..c], &url[at..]),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
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

/// A connection pool to the artifact database.
#[derive(Clone)]
pub struct ArtifactDb {
    pool: AnyPool,
    backend: Backend,
}

impl std::fmt::Debug for ArtifactDb {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ArtifactDb({})", self.backend.name())
    }
}

impl ArtifactDb {
    /// Connects (creating an SQLite file if needed) and migrates the schema.
    pub async fn connect(url: &str) -> Result<Self, DbError> {
        Self::connect_with(url, std::time::Duration::from_secs(5)).await
    }

    pub async fn connect_with(url: &str, timeout: std::time::Duration) -> Result<Self, DbError> {
        sqlx::any::install_default_drivers();
        let backend = Backend::of_url(url)?;
        let mut url = url.to_owned();
        if backend == Backend::Sqlite && !url.contains("mode=") {
            url.push_str(if url.contains('?') {
                "&mode=rwc"
            } else {
                "?mode=rwc"
            });
        }
        let pool = AnyPoolOptions::new()
            .max_connections(if backend == Backend::Sqlite { 4 } else { 8 })
            .acquire_timeout(timeout)
            .connect(&url)
            .await
            .map_err(|source| DbError::Sql {
                backend: backend.name(),
                source,
            })?;
        let db = Self { pool, backend };
        db.migrate().await?;
        Ok(db)
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    async fn migrate(&self) -> Result<(), DbError> {
        if self.backend == Backend::Sqlite {
            // WAL lets retrievers read while a publisher writes. Switching needs the file to
            // itself: two connections switching at once (agents and publishers starting
            // together on a new file) get SQLITE_BUSY without a wait, so try again.
            let mut attempt = 0;
            loop {
                match self.exec("PRAGMA journal_mode=WAL").await {
                    Err(e) if attempt < TRANSIENT_RETRIES && is_transient(&e) => {
                        attempt += 1;
                        tokio::time::sleep(transient_backoff(attempt)).await;
                    }
                    other => break other?,
                }
            }
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

    fn err(&self, source: sqlx::Error) -> DbError {
        DbError::Sql {
            backend: self.backend.name(),
            source,
        }
    }

    /// Rewrites `?` placeholders to `$n` for PostgreSQL.
    fn sql(&self, query: &str) -> String {
        placeholders(self.backend, query)
    }

    async fn exec(&self, query: &str) -> Result<(), DbError> {
        sqlx::query(AssertSqlSafe(self.sql(query)))
            .execute(&self.pool)
            .await
            .map_err(|e| self.err(e))?;
        Ok(())
    }

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
        let mut attempt = 0;
        loop {
            match self.publish_once(meta, bundle, now_ms).await {
                Err(e) if attempt < TRANSIENT_RETRIES && is_transient(&e) => {
                    attempt += 1;
                    tokio::time::sleep(transient_backoff(attempt)).await;
                }
                other => return other,
            }
        }
    }

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
        let mut attempt = 0;
        loop {
            match self.remove_once(id, label, now_ms).await {
                Err(e) if attempt < TRANSIENT_RETRIES && is_transient(&e) => {
                    attempt += 1;
                    tokio::time::sleep(transient_backoff(attempt)).await;
                }
                other => return other,
            }
        }
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

    fn meta_of(&self, rows: Vec<AnyRow>) -> Result<Vec<ArtifactMeta>, DbError> {
        let mut by_id: BTreeMap<String, ArtifactMeta> = BTreeMap::new();
        for r in rows {
            let id: String = r.try_get(0).map_err(|e| self.err(e))?;
            let label: Option<String> = r.try_get(9).map_err(|e| self.err(e))?;
            let entry = match by_id.entry(id.clone()) {
                std::collections::btree_map::Entry::Occupied(o) => o.into_mut(),
                std::collections::btree_map::Entry::Vacant(v) => {
                    let digest: Vec<u8> = r.try_get(7).map_err(|e| self.err(e))?;
                    v.insert(ArtifactMeta {
                        id,
                        name: r.try_get(1).map_err(|e| self.err(e))?,
                        version: r.try_get(2).map_err(|e| self.err(e))?,
                        tenant: r.try_get(3).map_err(|e| self.err(e))?,
                        folder: r.try_get(4).map_err(|e| self.err(e))?,
                        revision: r.try_get(5).map_err(|e| self.err(e))?,
                        removed: r.try_get::<i64, _>(6).map_err(|e| self.err(e))? != 0,
                        digest: digest.try_into().unwrap_or([0; 32]),
                        size: r.try_get::<i64, _>(8).map_err(|e| self.err(e))?.max(0) as u64,
                        labels: Vec::new(),
                    })
                }
            };
            if let Some(l) = label {
                entry.labels.push(l);
            }
        }
        Ok(by_id.into_values().collect())
    }

    const META_COLUMNS: &'static str = "a.id, a.name, a.version, a.tenant, a.folder, a.revision, a.removed, a.digest, a.size, l.label";

    /// Every artifact with its labels (removed ones too).
    pub async fn list(&self) -> Result<Vec<ArtifactMeta>, DbError> {
        let q = format!(
            "SELECT {} FROM artifacts a LEFT JOIN artifact_labels l ON l.artifact_id = a.id ORDER BY a.id, l.label",
            Self::META_COLUMNS
        );
        let rows = sqlx::query(AssertSqlSafe(q))
            .fetch_all(&self.pool)
            .await
            .map_err(|e| self.err(e))?;
        self.meta_of(rows)
    }

    /// Current (not removed) artifacts that carry at least one of `labels`; each artifact once,
    /// with only its matching labels.
    pub async fn current_for_labels(
        &self,
        labels: &[String],
    ) -> Result<Vec<ArtifactMeta>, DbError> {
        if labels.is_empty() {
            return Ok(Vec::new());
        }
        let marks = vec!["?"; labels.len()].join(", ");
        let q = format!(
            "SELECT {} FROM artifacts a JOIN artifact_labels l ON l.artifact_id = a.id \
             WHERE a.removed = 0 AND l.label IN ({marks}) ORDER BY a.id, l.label",
            Self::META_COLUMNS
        );
        let mut query = sqlx::query(AssertSqlSafe(self.sql(&q)));
        for l in labels {
            query = query.bind(l);
        }
        let rows = query.fetch_all(&self.pool).await.map_err(|e| self.err(e))?;
        self.meta_of(rows)
    }

    /// One artifact (with all its labels), if it exists.
    pub async fn get(&self, id: &str) -> Result<Option<ArtifactMeta>, DbError> {
        let q = format!(
            "SELECT {} FROM artifacts a LEFT JOIN artifact_labels l ON l.artifact_id = a.id WHERE a.id = ? ORDER BY l.label",
            Self::META_COLUMNS
        );
        let rows = sqlx::query(AssertSqlSafe(self.sql(&q)))
            .bind(id)
            .fetch_all(&self.pool)
            .await
            .map_err(|e| self.err(e))?;
        Ok(self.meta_of(rows)?.into_iter().next())
    }

    /// The bundle of a revision, verified against the artifact's digest. A bundle that does not
    /// match (corrupt rows, a revision replaced meanwhile) is an error, never a partial result.
    pub async fn bundle(&self, meta: &ArtifactMeta) -> Result<Bundle, DbError> {
        self.bundles(std::slice::from_ref(meta))
            .await?
            .pop()
            .unwrap_or_else(|| Err(DbError::NotFound(meta.id.clone())))
    }

    /// The bundles of several artifacts in one query; one result per artifact, in order. A
    /// bundle that fails its digest is an error for that artifact only.
    pub async fn bundles(
        &self,
        metas: &[ArtifactMeta],
    ) -> Result<Vec<Result<Bundle, DbError>>, DbError> {
        if metas.is_empty() {
            return Ok(Vec::new());
        }
        let marks = vec!["?"; metas.len()].join(", ");
        let q = format!(
            "SELECT artifact_id, revision, file_no, chunk, path, mode, data FROM artifact_files \
             WHERE artifact_id IN ({marks}) ORDER BY artifact_id, revision, file_no, chunk"
        );
        let mut query = sqlx::query(AssertSqlSafe(self.sql(&q)));
        for m in metas {
            query = query.bind(&m.id);
        }
        let rows = query.fetch_all(&self.pool).await.map_err(|e| self.err(e))?;
        let wanted: BTreeMap<&str, i64> =
            metas.iter().map(|m| (m.id.as_str(), m.revision)).collect();
        let mut files: BTreeMap<String, Result<Vec<BundleFile>, String>> = BTreeMap::new();
        let mut current: Option<(String, i64)> = None;
        for r in rows {
            let id: String = r.try_get(0).map_err(|e| self.err(e))?;
            let revision: i64 = r.try_get(1).map_err(|e| self.err(e))?;
            if wanted.get(id.as_str()) != Some(&revision) {
                continue;
            }
            let file_no: i64 = r.try_get(2).map_err(|e| self.err(e))?;
            let path: String = r.try_get(4).map_err(|e| self.err(e))?;
            let mode: i64 = r.try_get(5).map_err(|e| self.err(e))?;
            let data: Vec<u8> = r.try_get(6).map_err(|e| self.err(e))?;
            let entry = files.entry(id.clone()).or_insert_with(|| Ok(Vec::new()));
            let Ok(list) = entry else { continue };
            if current.as_ref() == Some(&(id.clone(), file_no)) {
                if let Some(f) = list.last_mut() {
                    f.data.extend_from_slice(&data);
                }
                continue;
            }
            current = Some((id, file_no));
            let checked = RelPath::new(&path)
                .map_err(|e| format!("bundle path: {e}"))
                .and_then(|p| {
                    u32::try_from(mode)
                        .ok()
                        .filter(|m| *m <= 0o7777)
                        .map(|m| (p, m))
                        .ok_or_else(|| format!("{path}: bad mode {mode}"))
                });
            match checked {
                Ok((path, mode)) => list.push(BundleFile { path, mode, data }),
                Err(problem) => *entry = Err(problem),
            }
        }
        Ok(metas
            .iter()
            .map(|meta| {
                let bad = |problem: String| DbError::Artifact {
                    id: meta.id.clone(),
                    problem,
                };
                let bundle = Bundle {
                    files: files.remove(&meta.id).unwrap_or(Ok(Vec::new())).map_err(bad)?,
                };
                if bundle.digest() != meta.digest {
                    return Err(bad(format!(
                        "revision {} does not match its digest (corrupt, or replaced while being read)",
                        meta.revision
                    )));
                }
                Ok(bundle)
            })
            .collect())
    }

    /// Events with an id above `after`, oldest first.
    pub async fn events_after(&self, after: i64, limit: i64) -> Result<Vec<Event>, DbError> {
        let rows = sqlx::query(AssertSqlSafe(self.sql(
            "SELECT id, artifact_id, label, instruction, revision FROM artifact_events WHERE id > ? ORDER BY id LIMIT ?",
        )))
        .bind(after)
        .bind(limit)
        .fetch_all(&self.pool)
        .await
        .map_err(|e| self.err(e))?;
        rows.into_iter()
            .map(|r| {
                let instruction: String = r.try_get(3).map_err(|e| self.err(e))?;
                Ok(Event {
                    id: r.try_get(0).map_err(|e| self.err(e))?,
                    artifact_id: r.try_get(1).map_err(|e| self.err(e))?,
                    label: r.try_get(2).map_err(|e| self.err(e))?,
                    instruction: Instruction::parse(&instruction).unwrap_or(Instruction::Publish),
                    revision: r.try_get(4).map_err(|e| self.err(e))?,
                })
            })
            .collect()
    }

    /// Highest event id (0 when there is none).
    pub async fn last_event_id(&self) -> Result<i64, DbError> {
        let row = sqlx::query("SELECT MAX(id) FROM artifact_events")
            .fetch_one(&self.pool)
            .await
            .map_err(|e| self.err(e))?;
        Ok(row
            .try_get::<Option<i64>, _>(0)
            .map_err(|e| self.err(e))?
            .unwrap_or(0))
    }
}

/// What a publisher provides for a new revision.
#[derive(Debug, Clone)]
pub struct NewArtifact {
    pub id: String,
    pub name: String,
    pub version: String,
    pub tenant: String,
    pub folder: String,
    pub labels: Vec<String>,
}

/// Databases for tests: a fresh, uniquely named database per call on each reachable server.
/// In CI (`CI=true`) an unreachable PostgreSQL or MariaDB is a failure; elsewhere those
/// backends are skipped with a printed reason.
#[doc(hidden)]
pub mod testing {
    use super::*;

    pub const POSTGRES_ADMIN: &str = "postgres://postgres@127.0.0.1:5432/postgres";
    pub const MYSQL_ADMIN: &str = "mysql://root@127.0.0.1:3306/mysql";

    /// Drops a database made by [`fresh_url`] (best effort; SQLite files go with their dir).
    pub async fn drop_db(url: &str) {
        let (admin, name) = match Backend::of_url(url) {
            Ok(Backend::Postgres) => (POSTGRES_ADMIN, url.rsplit('/').next().unwrap_or_default()),
            Ok(Backend::MySql) => (MYSQL_ADMIN, url.rsplit('/').next().unwrap_or_default()),
            _ => return,
        };
        if !name.starts_with("artisync_t") {
            return;
        }
        if let Ok(pool) = AnyPoolOptions::new()
            .max_connections(1)
            .connect(admin)
            .await
        {
            let force = if url.starts_with("postgres") {
                " WITH (FORCE)"
            } else {
                ""
            };
            let _ = sqlx::query(AssertSqlSafe(format!(
                "DROP DATABASE IF EXISTS {name}{force}"
            )))
            .execute(&pool)
            .await;
            pool.close().await;
        }
    }

    /// A URL for a new empty database on `backend`, or `None` (skipped) off CI.
    pub async fn fresh_url(backend: Backend, sqlite_dir: &std::path::Path) -> Option<String> {
        sqlx::any::install_default_drivers();
        let name = format!("artisync_t{:016x}", rand::random::<u64>());
        let (admin, url) = match backend {
            Backend::Sqlite => return Some(format!("sqlite://{}/{name}.db", sqlite_dir.display())),
            Backend::Postgres => (
                POSTGRES_ADMIN,
                format!("postgres://postgres@127.0.0.1:5432/{name}"),
            ),
            Backend::MySql => (MYSQL_ADMIN, format!("mysql://root@127.0.0.1:3306/{name}")),
        };
        let created = async {
            let pool = AnyPoolOptions::new()
                .max_connections(1)
                .acquire_timeout(std::time::Duration::from_secs(3))
                .connect(admin)
                .await?;
            sqlx::query(AssertSqlSafe(format!("CREATE DATABASE {name}")))
                .execute(&pool)
                .await?;
            pool.close().await;
            Ok::<_, sqlx::Error>(())
        }
        .await;
        match created {
            Ok(()) => Some(url),
            Err(e) if std::env::var("CI").is_ok_and(|v| v == "true") => {
                panic!(
                    "CI=true but the {} test server is unreachable: {e}",
                    backend.name()
                )
            }
            Err(e) => {
                eprintln!("SKIPPED {} tests: server unreachable ({e})", backend.name());
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bundle(files: &[(&str, &[u8])]) -> Bundle {
        Bundle {
            files: files
                .iter()
                .map(|(p, d)| BundleFile {
                    path: RelPath::new(p).expect("valid"),
                    mode: 0o640,
                    data: d.to_vec(),
                })
                .collect(),
        }
    }

    fn meta(id: &str, labels: &[&str]) -> NewArtifact {
        NewArtifact {
            id: id.into(),
            name: "PizzaShackAPI".into(),
            version: "1.0.0".into(),
            tenant: "carbon.super".into(),
            folder: "synapse-configs".into(),
            labels: labels.iter().map(|s| s.to_string()).collect(),
        }
    }

    const A: &str = "6f1c2a9e-3b1d-4c2e-9a8f-0d1e2f3a4b5c";
    const B: &str = "7f1c2a9e-3b1d-4c2e-9a8f-0d1e2f3a4b5c";

    /// One suite, run against every backend.
    async fn suite(db: &ArtifactDb) {
        let name = db.backend().name();
        assert_eq!(db.last_event_id().await.expect("events"), 0, "{name}");
        let b1 = bundle(&[
            ("default/api/a.xml", b"<api name=\"a\"/>"),
            ("default/sequences/s.xml", b"<sequence/>"),
        ]);
        assert_eq!(
            db.publish(&meta(A, &["Production", "Sandbox"]), &b1, 1)
                .await
                .expect("publish"),
            1
        );
        let big = vec![7u8; 3 * CHUNK_BYTES + 17];
        let b2 = bundle(&[("default/api/b.xml", &big)]);
        db.publish(&meta(B, &["Sandbox"]), &b2, 2)
            .await
            .expect("publish big");

        let prod = db
            .current_for_labels(&["Production".into()])
            .await
            .expect("labels");
        assert_eq!(prod.len(), 1, "{name}");
        assert_eq!(prod[0].labels, vec!["Production".to_string()]);
        let both = db
            .current_for_labels(&["Production".into(), "Sandbox".into()])
            .await
            .expect("labels");
        assert_eq!(
            both.len(),
            2,
            "{name}: an artifact with two matching labels is listed once"
        );
        assert!(
            db.current_for_labels(&["Nobody".into()])
                .await
                .expect("labels")
                .is_empty()
        );

        let got = db.bundle(&prod[0]).await.expect("bundle");
        assert_eq!(got, b1, "{name}");
        let meta_b = db.get(B).await.expect("get").expect("exists");
        assert_eq!(
            db.bundle(&meta_b).await.expect("big bundle").files[0].data,
            big,
            "{name}: chunks reassemble"
        );

        // Re-publish with fewer labels: new revision, a remove event for the dropped label.
        let b3 = bundle(&[("default/api/a.xml", b"<api name=\"a2\"/>")]);
        assert_eq!(
            db.publish(&meta(A, &["Sandbox"]), &b3, 3)
                .await
                .expect("republish"),
            2
        );
        let events = db.events_after(0, 100).await.expect("events");
        let summary: Vec<(String, &str, i64)> = events
            .iter()
            .map(|e| (e.label.clone(), e.instruction.as_str(), e.revision))
            .collect();
        assert_eq!(
            summary,
            vec![
                ("Production".into(), "publish", 1),
                ("Sandbox".into(), "publish", 1),
                ("Sandbox".into(), "publish", 1),
                ("Sandbox".into(), "publish", 2),
                ("Production".into(), "remove", 2),
            ],
            "{name}"
        );
        assert!(
            db.events_after(events[2].id, 100)
                .await
                .expect("events")
                .len()
                == 2
        );

        // Remove from one label, then from all.
        assert!(
            db.remove(A, Some("Nope"), 4).await.is_err(),
            "{name}: unknown label is an error"
        );
        assert!(matches!(
            db.remove("00000000-0000-0000-0000-000000000000", None, 4)
                .await,
            Err(DbError::NotFound(_))
        ));
        assert_eq!(
            db.remove(B, None, 5).await.expect("remove"),
            vec!["Sandbox".to_string()]
        );
        assert!(db.get(B).await.expect("get").expect("exists").removed);
        let listed = db.list().await.expect("list");
        assert_eq!(listed.len(), 2);
        assert_eq!(
            db.current_for_labels(&["Sandbox".into()])
                .await
                .expect("labels")
                .len(),
            1
        );
        assert!(db.last_event_id().await.expect("last") >= 6);
    }

    async fn run_for(backend: Backend) {
        let dir = tempfile::tempdir().expect("tempdir");
        let Some(url) = testing::fresh_url(backend, dir.path()).await else {
            return;
        };
        let db = ArtifactDb::connect(&url).await.expect("connect + migrate");
        suite(&db).await;
        // Migrations are idempotent: a second connect finds the schema in place.
        ArtifactDb::connect(&url)
            .await
            .expect("reconnect")
            .pool
            .close()
            .await;
        db.pool.close().await;
        testing::drop_db(&url).await;
    }

    #[tokio::test]
    async fn store_suite_sqlite() {
        run_for(Backend::Sqlite).await;
    }

    #[tokio::test]
    async fn store_suite_postgres() {
        run_for(Backend::Postgres).await;
    }

    #[tokio::test]
    async fn store_suite_mysql() {
        run_for(Backend::MySql).await;
    }

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

    /// A bundle above 64 MiB (where WSO2's own MySQL schema broke at 64 KiB) round-trips
    /// byte for byte on every backend, in 1 MiB rows under MariaDB's packet limit.
    async fn large_bundle(backend: Backend) {
        let dir = tempfile::tempdir().expect("tempdir");
        let Some(url) = testing::fresh_url(backend, dir.path()).await else {
            return;
        };
        let db = ArtifactDb::connect(&url).await.expect("connect");
        let data: Vec<u8> = (0..(65u32 << 20))
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        let b = Bundle {
            files: vec![BundleFile {
                path: RelPath::new("default/api/huge.xml").expect("valid"),
                mode: 0o640,
                data,
            }],
        };
        db.publish(&meta(A, &["L"]), &b, 1)
            .await
            .expect("publish 65 MiB");
        let m = db.get(A).await.expect("get").expect("exists");
        assert_eq!(m.size, 65 << 20);
        let got = db.bundle(&m).await.expect("read 65 MiB");
        assert!(
            got == b,
            "{}: the 65 MiB bundle came back different",
            backend.name()
        );
        db.pool.close().await;
        testing::drop_db(&url).await;
    }

    #[tokio::test]
    async fn large_bundle_sqlite() {
        large_bundle(Backend::Sqlite).await;
    }

    #[tokio::test]
    async fn large_bundle_postgres() {
        large_bundle(Backend::Postgres).await;
    }

    #[tokio::test]
    async fn large_bundle_mysql() {
        large_bundle(Backend::MySql).await;
    }

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

    #[test]
    fn urls_are_recognised_and_redacted() {
        assert_eq!(
            Backend::of_url("postgres://u:p@h/db").expect("pg"),
            Backend::Postgres
        );
        assert_eq!(
            Backend::of_url("mysql://root@h/db").expect("my"),
            Backend::MySql
        );
        assert_eq!(
            Backend::of_url("sqlite:///tmp/x.db").expect("lite"),
            Backend::Sqlite
        );
        assert!(Backend::of_url("oracle://x").is_err());
        assert_eq!(
            redact("postgres://user:secret@host:5432/db"),
            "postgres://user:***@host:5432/db"
        );
        assert_eq!(redact("mysql://root@h/db"), "mysql://root@h/db");
    }
}
