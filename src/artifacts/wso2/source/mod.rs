//! [`Wso2Source`]: the retriever's [`Source`] over WSO2's tables, on SQLite, PostgreSQL or
//! MySQL/MariaDB, read only; the queries behind it.
use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::{AnyPool, AssertSqlSafe, Row};
use tokio::time::Instant;
use tracing::{debug, warn};

use super::{
    ArtifactRow, ChangeLog, Fingerprint, Routes, RowInstruction, Selected, Snapshot, select, shown,
};
use crate::artifacts::db::{Backend, placeholders, redact};
use crate::artifacts::retriever::{Source, SourceError, Unavailable};
use crate::artifacts::{ArtifactMeta, Bundle, Event};

/// MySQL/MariaDB: rows whose `TIME_STAMP` is this recent are also compared by an MD5 of their
/// `ARTIFACT`, because `TIME_STAMP` has one-second resolution (a second write within the same
/// second leaves it unchanged). Generous, for a WSO2 node whose clock is a little off.
const HOT_ROW_SECS: u32 = 10;
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

    /// Rows (with details) of the given labels (empty: every label), or only those of the given
    /// API ids when `by_id` is not empty; nothing when both are empty.
    async fn rows(
        &self,
        by_label: &[String],
        by_id: &[String],
    ) -> Result<Vec<ArtifactRow>, SourceError> {
        if by_label.is_empty() && by_id.is_empty() {
            return Ok(Vec::new());
        }
        let (pool, backend) = self.pool().await?;
        let (q, binds) = rows_query(backend, by_label, by_id);
        let mut query = sqlx::query(AssertSqlSafe(q));
        for v in binds {
            query = query.bind(v);
        }
        let rows = query
            .fetch_all(&pool)
            .await
            .map_err(|e| self.down(backend, e))?;
        let mut out = Vec::with_capacity(rows.len());
        let mut unusable: Vec<String> = Vec::new();
        for r in rows {
            let text = |i: usize| -> Result<Option<String>, SourceError> {
                r.try_get::<Option<String>, _>(i)
                    .map_err(|e| self.down(backend, e))
            };
            let (Some(id), Some(label)) = (text(0)?, text(1)?) else {
                continue;
            };
            let Some(api_id) = stored_id(&id) else {
                unusable.push(id);
                continue;
            };
            out.push(ArtifactRow {
                api_id,
                label,
                instruction: RowInstruction::parse(text(2)?.as_deref()),
                artifact: r
                    .try_get::<Option<Vec<u8>>, _>(3)
                    .map_err(|e| self.down(backend, e))?,
                name: text(4)?,
                version: text(5)?,
                tenant: text(6)?,
            });
        }
        if let Some(first) = unusable.first() {
            // Ids travel to hub subscribers and into the index as UUIDs (WSO2's are).
            warn!(count = unusable.len(), first = %shown(first), "skipping WSO2 artifact rows whose API_ID is not a UUID in lower (as WSO2 writes it) or upper case");
        }
        Ok(out)
    }

    /// Reads every row's fingerprint (no `ARTIFACT` on PostgreSQL, and on MySQL/MariaDB only
    /// for rows written in the last seconds) and feeds the change log, unless that was done
    /// less than half a poll interval ago (a hub's subscribers all poll: one scan serves them).
    async fn refresh(&self, scanned: &mut Scanned) -> Result<(), SourceError> {
        if scanned
            .at
            .is_some_and(|at| at.elapsed() < self.poll / 2 && scanned.log.known.is_some())
        {
            return Ok(());
        }
        let (pool, backend) = self.pool().await?;
        let q = match backend {
            Backend::Postgres => {
                "SELECT API_ID, GATEWAY_LABEL, GATEWAY_INSTRUCTION, CAST(xmin AS TEXT) \
                 FROM AM_GW_API_ARTIFACTS"
                    .to_owned()
            }
            Backend::MySql => format!(
                "SELECT API_ID, GATEWAY_LABEL, GATEWAY_INSTRUCTION, CAST(TIME_STAMP AS CHAR), \
                 CASE WHEN TIME_STAMP >= NOW() - INTERVAL {HOT_ROW_SECS} SECOND THEN MD5(ARTIFACT) END \
                 FROM AM_GW_API_ARTIFACTS"
            ),
            Backend::Sqlite => "SELECT API_ID, GATEWAY_LABEL, GATEWAY_INSTRUCTION, \
                 CAST(TIME_STAMP AS TEXT), CAST(ARTIFACT AS BLOB) FROM AM_GW_API_ARTIFACTS"
                .to_owned(),
        };
        let rows = sqlx::query(AssertSqlSafe(q))
            .fetch_all(&pool)
            .await
            .map_err(|e| self.down(backend, e))?;
        let snapshot = snapshot_of(&rows, backend).map_err(|e| self.down(backend, e))?;
        for e in scanned.log.observe(snapshot) {
            debug!(api = %e.artifact_id, label = %e.label, instruction = e.instruction.as_str(), event = e.id, "WSO2 artifact row changed");
        }
        scanned.at = Some(Instant::now());
        Ok(())
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

/// The canonical (lower-case) id of a stored `API_ID`, if it is a UUID as WSO2 writes it (lower
/// case; upper case is taken too). Ids in other spellings are not looked up by id, since that
/// lookup compares the column itself, so the index serves it (see [`rows_query`]).
fn stored_id(id: &str) -> Option<String> {
    let canonical = crate::artifacts::parse_id(id).ok()?;
    (id == canonical || id == canonical.to_ascii_uppercase()).then_some(canonical)
}

/// The query of [`Wso2Source::rows`] and its bound values. WSO2's key on
/// `AM_GW_API_ARTIFACTS` is `(GATEWAY_LABEL, API_ID)` (and MySQL indexes `API_ID` alone for
/// its foreign key): the columns are compared as stored, never through a function such as
/// `LOWER(API_ID)`, which no index serves. An id is looked for as WSO2 writes it (lower case)
/// and in upper case; a lookup by id with labels names both key columns.
fn rows_query(backend: Backend, by_label: &[String], by_id: &[String]) -> (String, Vec<String>) {
    let artifact = if backend == Backend::Sqlite {
        "CAST(a.ARTIFACT AS BLOB)"
    } else {
        "a.ARTIFACT"
    };
    let marks = |n: usize| vec!["?"; n].join(", ");
    let mut conditions = Vec::new();
    let mut binds: Vec<String> = Vec::new();
    if !by_label.is_empty() {
        conditions.push(format!("a.GATEWAY_LABEL IN ({})", marks(by_label.len())));
        binds.extend(by_label.iter().cloned());
    }
    if !by_id.is_empty() {
        let mut ids: Vec<String> = by_id
            .iter()
            .flat_map(|id| [id.to_ascii_lowercase(), id.to_ascii_uppercase()])
            .collect();
        ids.sort();
        ids.dedup();
        conditions.push(format!("a.API_ID IN ({})", marks(ids.len())));
        binds.extend(ids);
    }
    let q = format!(
        "SELECT a.API_ID, a.GATEWAY_LABEL, a.GATEWAY_INSTRUCTION, \
         CASE WHEN UPPER(a.GATEWAY_INSTRUCTION) = 'REMOVE' THEN NULL ELSE {artifact} END, \
         d.API_NAME, d.API_VERSION, d.TENANT_DOMAIN \
         FROM AM_GW_API_ARTIFACTS a LEFT JOIN AM_GW_PUBLISHED_API_DETAILS d ON d.API_ID = a.API_ID \
         WHERE {}",
        conditions.join(" AND ")
    );
    (placeholders(backend, &q), binds)
}

fn snapshot_of(rows: &[AnyRow], backend: Backend) -> Result<Snapshot, sqlx::Error> {
    let mut snapshot = Snapshot::new();
    for r in rows {
        let (Some(id), Some(label)) = (
            r.try_get::<Option<String>, _>(0)?,
            r.try_get::<Option<String>, _>(1)?,
        ) else {
            continue;
        };
        let Some(api_id) = stored_id(&id) else {
            continue;
        };
        let hash = match backend {
            Backend::Postgres => None,
            Backend::MySql => r.try_get::<Option<String>, _>(4)?,
            Backend::Sqlite => r
                .try_get::<Option<Vec<u8>>, _>(4)?
                .map(|a| blake3::hash(&a).to_hex().to_string()),
        };
        snapshot.insert(
            (api_id, label),
            Fingerprint {
                instruction: r.try_get::<Option<String>, _>(2)?,
                stamp: r.try_get::<Option<String>, _>(3)?,
                hash,
            },
        );
    }
    Ok(snapshot)
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

#[cfg(test)]
mod tests;
