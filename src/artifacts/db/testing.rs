//! Databases for tests: a fresh, uniquely named database per call on each reachable server.
//! In CI (`CI=true`) an unreachable PostgreSQL or MariaDB is a failure; elsewhere those
//! backends are skipped with a printed reason. Compiled for unit tests and with the `testing`
//! feature only, never into the release binary.

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
