//! [`Wso2Source`]: the retriever's [`Source`] over WSO2's tables, on SQLite, PostgreSQL or
//! MySQL/MariaDB, read only: its connection and its answers to the retriever. The queries
//! behind it are in `query.rs`.
use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use sqlx::AnyPool;
use sqlx::any::AnyPoolOptions;
use tokio::time::Instant;

use super::{ArtifactRow, ChangeLog, Routes, Selected, select, shown};
use crate::artifacts::db::{Backend, redact};
use crate::artifacts::retriever::{Source, SourceError, Unavailable};
use crate::artifacts::{ArtifactMeta, Bundle, Event};

mod query;
#[cfg(test)]
pub(in crate::artifacts::wso2) mod tests;

/// The change log and when the tables were last scanned.
struct Scanned {
    log: ChangeLog,
    at: Option<Instant>,
}

/// WSO2 API-M 3.2's tables as a retriever source (read only). Connects lazily, so a database
/// that is down at start-up is retried like any other failure.
pub struct Wso2Source {
    url: String,
    routes: Routes,
    poll: Duration,
    queries: AtomicU64,
    pool: tokio::sync::Mutex<Option<(AnyPool, Backend)>>,
    scanned: tokio::sync::Mutex<Scanned>,
}

impl Wso2Source {
    /// `routes`: the folder id each tenant's rendered files deploy into (the retriever's
    /// `folder` and `tenants`).
    pub fn new(url: &str, routes: Routes, poll: Duration) -> Self {
        let first_id = i64::try_from(crate::now_ms())
            .unwrap_or(0)
            .saturating_mul(1000);
        Self {
            url: url.to_owned(),
            routes,
            poll,
            queries: AtomicU64::new(0),
            pool: tokio::sync::Mutex::new(None),
            scanned: tokio::sync::Mutex::new(Scanned {
                log: ChangeLog::new(first_id),
                at: None,
            }),
        }
    }

    fn down(&self, backend: Backend, e: sqlx::Error) -> SourceError {
        Unavailable::Wso2 {
            backend: backend.name(),
            source: Arc::new(e),
        }
        .into()
    }

    /// The connection pool (one query is counted per call).
    async fn pool(&self) -> Result<(AnyPool, Backend), SourceError> {
        self.queries.fetch_add(1, Ordering::Relaxed);
        let mut guard = self.pool.lock().await;
        if let Some(p) = guard.as_ref() {
            return Ok(p.clone());
        }
        sqlx::any::install_default_drivers();
        let backend = Backend::of_url(&self.url)
            .map_err(|e| SourceError::Unavailable(Unavailable::Db(Arc::new(e))))?;
        let mut url = self.url.clone();
        // Read only: SQLite opens the file read-only (and never creates it); server sessions
        // run read-only transactions, so even a bug here could not write to WSO2's tables.
        if backend == Backend::Sqlite && !url.contains("mode=") {
            url.push_str(if url.contains('?') {
                "&mode=ro"
            } else {
                "?mode=ro"
            });
        }
        let read_only = match backend {
            Backend::Postgres => Some("SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY"),
            Backend::MySql => Some("SET SESSION TRANSACTION READ ONLY"),
            Backend::Sqlite => None,
        };
        let pool = AnyPoolOptions::new()
            .max_connections(4)
            .acquire_timeout(Duration::from_secs(3))
            .after_connect(move |conn, _| {
                Box::pin(async move {
                    if let Some(q) = read_only {
                        sqlx::query(q).execute(&mut *conn).await?;
                    }
                    Ok(())
                })
            })
            .connect(&url)
            .await
            .map_err(|e| self.down(backend, e))?;
        *guard = Some((pool.clone(), backend));
        Ok((pool, backend))
    }

    /// What a node with `labels` deploys of each API in `rows`.
    fn select_all(&self, rows: &[ArtifactRow], labels: &[String]) -> Vec<Selected> {
        let mut by_api: BTreeMap<&str, Vec<ArtifactRow>> = BTreeMap::new();
        for r in rows {
            by_api.entry(&r.api_id).or_default().push(r.clone());
        }
        by_api
            .into_iter()
            .filter_map(|(id, rows)| select(id, &rows, labels, &self.routes))
            .collect()
    }
}

#[tonic::async_trait]
impl Source for Wso2Source {
    fn describe(&self) -> String {
        format!(
            "{} {}",
            crate::config::Schema::Wso2Apim32,
            redact(&self.url)
        )
    }

    fn queries(&self) -> u64 {
        self.queries.load(Ordering::Relaxed)
    }

    async fn current(&self, labels: &[String]) -> Result<Vec<ArtifactMeta>, SourceError> {
        let rows = self.rows(labels, &[]).await?;
        Ok(self
            .select_all(&rows, labels)
            .into_iter()
            .map(|s| s.meta)
            .collect())
    }

    async fn get(&self, id: &str, labels: &[String]) -> Result<Option<ArtifactMeta>, SourceError> {
        let Ok(id) = crate::artifacts::parse_id(id) else {
            return Ok(None);
        };
        // Only the rows of `labels`: a lookup that names both key columns.
        let rows = self.rows(labels, std::slice::from_ref(&id)).await?;
        let Some(first) = rows.first() else {
            return Ok(None);
        };
        if let Some(s) = self.select_all(&rows, labels).pop() {
            return Ok(Some(s.meta));
        }
        // Every row of those labels says Remove.
        Ok(Some(ArtifactMeta {
            id: id.clone(),
            name: first.name.as_deref().map(shown).unwrap_or_default(),
            version: first.version.as_deref().map(shown).unwrap_or_default(),
            tenant: first.tenant.as_deref().map(shown).unwrap_or_default(),
            folder: self.routes.default_folder().to_owned(),
            revision: 0,
            removed: true,
            labels: Vec::new(),
            digest: [0; 32],
            size: 0,
            keep: Vec::new(),
            warnings: Vec::new(),
        }))
    }

    async fn bundle(&self, meta: &ArtifactMeta) -> Result<Bundle, SourceError> {
        self.bundles(std::slice::from_ref(meta))
            .await?
            .pop()
            .unwrap_or_else(|| {
                Err(SourceError::Artifact {
                    id: meta.id.clone(),
                    problem: "no bundle".into(),
                })
            })
    }

    async fn bundles(
        &self,
        metas: &[ArtifactMeta],
    ) -> Result<Vec<Result<Bundle, SourceError>>, SourceError> {
        let ids: Vec<String> = metas.iter().map(|m| m.id.clone()).collect();
        let mut labels: Vec<String> = metas.iter().flat_map(|m| m.labels.clone()).collect();
        labels.sort();
        labels.dedup();
        // A meta without labels fails below; with none at all, every label is read.
        if metas.iter().any(|m| m.labels.is_empty()) {
            labels.clear();
        }
        let rows = self.rows(&labels, &ids).await?;
        Ok(metas
            .iter()
            .map(|meta| {
                let bad = |problem: String| SourceError::Artifact {
                    id: meta.id.clone(),
                    problem,
                };
                if meta.labels.is_empty() {
                    return Err(bad("has none of this node's labels".into()));
                }
                let selected =
                    select(&meta.id, &rows, &meta.labels, &self.routes).ok_or_else(|| {
                        bad(format!(
                            "is no longer published for labels {:?}",
                            meta.labels
                        ))
                    })?;
                let bundle = selected.bundle.map_err(|e| bad(e.to_string()))?;
                if selected.meta.revision != meta.revision
                    || selected.meta.folder != meta.folder
                    || bundle.digest() != meta.digest
                {
                    return Err(bad(
                        "ARTIFACT changed while being read; the change is deployed next".into(),
                    ));
                }
                Ok(bundle)
            })
            .collect())
    }

    async fn events_after(&self, after: i64, limit: i64) -> Result<Vec<Event>, SourceError> {
        let mut scanned = self.scanned.lock().await;
        self.refresh(&mut scanned).await?;
        Ok(scanned.log.after(after, limit))
    }

    async fn last_event_id(&self) -> Result<i64, SourceError> {
        let mut scanned = self.scanned.lock().await;
        self.refresh(&mut scanned).await?;
        Ok(scanned.log.last_id())
    }

    async fn wait(&self, max: Duration) {
        tokio::time::sleep(self.poll.min(max)).await;
    }
}
