//! The artifact database: SQLite (embedded default), PostgreSQL or MySQL/MariaDB through
//! sqlx's `Any` driver. Queries are written once with `?` placeholders (rewritten to `$n` for
//! PostgreSQL); the schema has one migration per backend because column types differ.
//!
//! Tables: `artifacts` (one row per artifact: metadata, current revision, removed flag, bundle
//! digest), `artifact_labels`, `artifact_files` (the bundle, stored in 1 MiB chunks so no row
//! comes near MariaDB's default 16 MiB `max_allowed_packet`), and `artifact_events` (the change
//! log retrievers follow). Saving is one transaction that writes the bundle and appends the
//! events, so an event is never visible before its bundle.
//!
//! The parts: this file holds the connection ([`ArtifactDb`]), its errors and backends;
//! `sql` the per-backend SQL and migrations; `write` the publish and remove transactions;
//! `read` the current artifacts of some labels, one artifact, bundles and events.

mod read;
mod sql;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
mod write;

pub(crate) use sql::placeholders;

use sqlx::any::AnyPoolOptions;
use sqlx::{AnyPool, AssertSqlSafe};

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::artifacts::{Bundle, BundleFile};
    use crate::model::RelPath;

    pub(super) fn bundle(files: &[(&str, &[u8])]) -> Bundle {
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

    pub(super) fn meta(id: &str, labels: &[&str]) -> NewArtifact {
        NewArtifact {
            id: id.into(),
            name: "PizzaShackAPI".into(),
            version: "1.0.0".into(),
            tenant: "carbon.super".into(),
            folder: "synapse-configs".into(),
            labels: labels.iter().map(|s| s.to_string()).collect(),
        }
    }

    pub(super) const A: &str = "6f1c2a9e-3b1d-4c2e-9a8f-0d1e2f3a4b5c";
    pub(super) const B: &str = "7f1c2a9e-3b1d-4c2e-9a8f-0d1e2f3a4b5c";

    /// One suite, run against every backend.
    async fn suite(db: &ArtifactDb) {
        // Long: one story on one database (publish two artifacts, read them by label,
        // re-publish with fewer labels, remove), each step reading the rows and events the
        // steps before it left.
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
