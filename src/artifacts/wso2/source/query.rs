//! The queries behind [`Wso2Source`]: the rows (with details) of some labels or API ids, and
//! the scan of every row's fingerprint that feeds the change log. WSO2's columns are compared
//! as stored, so its key serves each lookup.

use sqlx::any::AnyRow;
use sqlx::{AssertSqlSafe, Row};
use tokio::time::Instant;
use tracing::{debug, warn};

use super::{Scanned, Wso2Source};
use crate::artifacts::db::{Backend, placeholders};
use crate::artifacts::retriever::SourceError;
use crate::artifacts::wso2::{ArtifactRow, Fingerprint, RowInstruction, Snapshot, shown};

/// MySQL/MariaDB: rows whose `TIME_STAMP` is this recent are also compared by an MD5 of their
/// `ARTIFACT`, because `TIME_STAMP` has one-second resolution (a second write within the same
/// second leaves it unchanged). Generous, for a WSO2 node whose clock is a little off.
const HOT_ROW_SECS: u32 = 10;

impl Wso2Source {
    /// Rows (with details) of the given labels (empty: every label), or only those of the given
    /// API ids when `by_id` is not empty; nothing when both are empty.
    pub(super) async fn rows(
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
    pub(super) async fn refresh(&self, scanned: &mut Scanned) -> Result<(), SourceError> {
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
}

/// The canonical (lower-case) id of a stored `API_ID`, if it is a UUID as WSO2 writes it (lower
/// case; upper case is taken too). Ids in other spellings are not looked up by id, since that
/// lookup compares the column itself, so the index serves it (see [`rows_query`]).
pub(super) fn stored_id(id: &str) -> Option<String> {
    let canonical = crate::artifacts::parse_id(id).ok()?;
    (id == canonical || id == canonical.to_ascii_uppercase()).then_some(canonical)
}

/// The query of [`Wso2Source::rows`] and its bound values. WSO2's key on
/// `AM_GW_API_ARTIFACTS` is `(GATEWAY_LABEL, API_ID)` (and MySQL indexes `API_ID` alone for
/// its foreign key): the columns are compared as stored, never through a function such as
/// `LOWER(API_ID)`, which no index serves. An id is looked for as WSO2 writes it (lower case)
/// and in upper case; a lookup by id with labels names both key columns.
pub(super) fn rows_query(
    backend: Backend,
    by_label: &[String],
    by_id: &[String],
) -> (String, Vec<String>) {
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
