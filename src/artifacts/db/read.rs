//! Reads: the artifacts of some labels, one artifact, its bundle (or many at once), and the
//! event log retrievers follow.

use std::collections::BTreeMap;

use sqlx::any::AnyRow;
use sqlx::{AssertSqlSafe, Row};

use super::*;
use crate::artifacts::{ArtifactMeta, Bundle, BundleFile, Event, Instruction};
use crate::model::RelPath;

impl ArtifactDb {
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
                        keep: Vec::new(),
                        warnings: Vec::new(),
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
        let rows = sqlx::query(AssertSqlSafe(self.sql(events_after_sql(self.backend))))
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

/// [`ArtifactDb::events_after`]'s query (after, limit). On SQLite the limit goes through a
/// CAST: given a bare `LIMIT ?`, SQLite compiles the bound value into the statement and
/// prepares it anew whenever it is bound again, which sqlx does on every call (every poll
/// of every agent; see the same note in `store/files.rs`). MySQL's `LIMIT` takes no
/// expression, so the others keep the bare parameter.
fn events_after_sql(backend: Backend) -> &'static str {
    match backend {
        Backend::Sqlite => {
            "SELECT id, artifact_id, label, instruction, revision FROM artifact_events \
             WHERE id > ? ORDER BY id LIMIT CAST(? AS INTEGER)"
        }
        Backend::Postgres | Backend::MySql => {
            "SELECT id, artifact_id, label, instruction, revision FROM artifact_events \
             WHERE id > ? ORDER BY id LIMIT ?"
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing;
    use super::super::tests::{A, meta};
    use super::*;

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

    /// Regression: SQLite compiled the bound limit of the event poll into its statement (an
    /// `Integer` op holding it, as EXPLAIN shows), so every poll prepared it anew.
    #[tokio::test]
    async fn the_sqlite_event_poll_does_not_compile_its_limit_into_the_statement() {
        let dir = tempfile::tempdir().expect("tempdir");
        let url = format!("sqlite://{}/a.db?mode=rwc", dir.path().display());
        let db = ArtifactDb::connect(&url).await.expect("connect");
        const LIMIT: i64 = 7919;
        let sql = format!("EXPLAIN {}", events_after_sql(Backend::Sqlite));
        let program = sqlx::query(AssertSqlSafe(sql))
            .bind(0_i64)
            .bind(LIMIT)
            .fetch_all(&db.pool)
            .await
            .expect("explain");
        assert!(!program.is_empty());
        // Decoded with expect: a column that failed to decode must not pass as "no such op".
        let bound_into_program = program.iter().any(|op| {
            op.try_get::<String, _>(1).expect("opcode") == "Integer"
                && op.try_get::<i64, _>(2).expect("p2") == LIMIT
        });
        assert!(!bound_into_program);
        // And the poll still answers, limited.
        assert!(db.events_after(0, 10).await.expect("poll").is_empty());
    }
}
