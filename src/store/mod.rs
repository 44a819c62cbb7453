//! The crash-safe local index: one embedded SQLite database (WAL) in `state_dir`.
//!
//! Holds, per folder, one row per path (the replicated record plus the local stat key used to
//! skip rehashing unchanged files), the folder's epoch, the per-peer cursors (how far this node
//! has applied each peer's index) and the conflict log. A batch of records and the cursor that
//! batch advances are written in one transaction, so after a crash the index and the cursor
//! agree; the disk is made durable *before* the transaction (see `fs::apply`), so the index never
//! claims content the disk does not have.
//!
//! A row holding a version exactly as a peer's batch brought it says so ([`Origin`]: that peer
//! and its index epoch), so that the sender does not stream it back to that peer.
//!
//! One file per table: `files` (records), `cursors`, `skipped`, `deployed`, `conflicts`,
//! `meta` (epochs); `codec` is how a record's columns are written and read back, in one place.

use std::path::{Path, PathBuf};
use std::str::FromStr;

use sqlx::pool::PoolConnection;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Row, Sqlite, SqlitePool};
use tracing::info;

use crate::model::FileRecord;

mod applying;
mod codec;
mod conflicts;
mod cursors;
mod deployed;
mod files;
mod meta;
mod recent;
mod skipped;

pub use conflicts::ConflictEntry;
pub use cursors::Cursor;
pub use deployed::{DeployedArtifact, DeployedFile};
pub use skipped::{SkipChanges, Skipped};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("index database {path}: {source}")]
    Db { path: PathBuf, source: sqlx::Error },
    #[error("index database {path}: corrupt row for {what}: {problem}")]
    Corrupt {
        path: PathBuf,
        what: String,
        problem: String,
    },
}

/// What a scan last saw of a file: when all three match, its hash is not recomputed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StatKey {
    pub size: u64,
    pub mtime_ns: i64,
    pub ino: u64,
}

/// A record as stored: the replicated part, this node's stat key for it, and where this exact
/// version came from.
#[derive(Debug, Clone)]
pub struct StoredRecord {
    pub record: FileRecord,
    pub stat: Option<StatKey>,
    /// The peer whose batch this version was committed from, unchanged; `None` for local
    /// observations and for versions made here (merges), which every peer must receive.
    pub origin: Option<Origin>,
}

/// A peer (its configured name, as in `peer_cursors.peer`) and that peer's index epoch of the
/// folder: the version of a row with this origin was in that peer's index in that epoch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    pub peer: String,
    pub epoch: u64,
}

/// Which journaled records (see `applying`) a commit clears.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Journal {
    /// None: the commit is not of a placed batch.
    Keep,
    /// Those of one batch, placed and now committed.
    Batch(u64),
    /// All of the folder's, looked at after a crash.
    Folder,
}

#[derive(Clone)]
pub struct Store {
    pool: SqlitePool,
    path: PathBuf,
    /// The newest rows of each folder, for feeds that have caught up (see `recent`).
    recent: std::sync::Arc<std::sync::Mutex<recent::RecentRows>>,
}

const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS files (
    folder TEXT NOT NULL,
    path TEXT NOT NULL,
    kind INTEGER NOT NULL,
    deleted INTEGER NOT NULL,
    size INTEGER NOT NULL,
    mode INTEGER NOT NULL,
    hash BLOB,
    version BLOB NOT NULL,
    stamp_hlc INTEGER NOT NULL,
    stamp_node INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    stat_size INTEGER,
    stat_mtime_ns INTEGER,
    stat_ino INTEGER,
    origin_peer TEXT,
    origin_epoch INTEGER,
    PRIMARY KEY (folder, path)
);
CREATE INDEX IF NOT EXISTS files_by_seq ON files (folder, seq);
CREATE TABLE IF NOT EXISTS peer_cursors (
    peer TEXT NOT NULL,
    folder TEXT NOT NULL,
    epoch INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    PRIMARY KEY (peer, folder)
);
CREATE TABLE IF NOT EXISTS skipped (
    folder TEXT NOT NULL,
    peer TEXT NOT NULL,
    path TEXT NOT NULL,
    kind INTEGER NOT NULL,
    deleted INTEGER NOT NULL,
    size INTEGER NOT NULL,
    mode INTEGER NOT NULL,
    hash BLOB,
    version BLOB NOT NULL,
    stamp_hlc INTEGER NOT NULL,
    stamp_node INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    problem TEXT NOT NULL,
    attempts INTEGER NOT NULL,
    first_ms INTEGER NOT NULL,
    retry_ms INTEGER NOT NULL,
    PRIMARY KEY (folder, peer, path)
);
CREATE TABLE IF NOT EXISTS applying (
    folder TEXT NOT NULL,
    batch INTEGER NOT NULL,
    path TEXT NOT NULL,
    kind INTEGER NOT NULL,
    deleted INTEGER NOT NULL,
    size INTEGER NOT NULL,
    mode INTEGER NOT NULL,
    hash BLOB,
    version BLOB NOT NULL,
    stamp_hlc INTEGER NOT NULL,
    stamp_node INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    PRIMARY KEY (folder, path)
);
CREATE TABLE IF NOT EXISTS deployed (
    artifact_id TEXT PRIMARY KEY,
    doc TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS conflicts (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    folder TEXT NOT NULL,
    path TEXT NOT NULL,
    copy TEXT NOT NULL,
    winner_node TEXT NOT NULL,
    created_ms INTEGER NOT NULL
);
"#;

/// Columns of `files` added after the first schema, with their types: an index created
/// before them gets them on open (NULL in old rows: no origin, so those rows are always sent).
const ADDED_FILES_COLUMNS: &[(&str, &str)] =
    &[("origin_peer", "TEXT"), ("origin_epoch", "INTEGER")];

impl Store {
    /// Opens (creating if needed) `state_dir/index.db`.
    pub async fn open(state_dir: &Path) -> Result<Self, StoreError> {
        let path = state_dir.join("index.db");
        let err = |source| StoreError::Db {
            path: path.clone(),
            source,
        };
        let options = SqliteConnectOptions::from_str("sqlite://")
            .map_err(err)?
            .filename(&path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            // WAL + NORMAL: a commit survives a process crash; after a power loss the last
            // commits may roll back, which the start-up rescan repairs (disk wins, as a local
            // change whose content then merges with the peers' identical one), and the daemon
            // then gives the folders new epochs (see `daemon::state::index_may_have_rolled_back`).
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(std::time::Duration::from_secs(10));
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(options)
            .await
            .map_err(err)?;
        sqlx::raw_sql(SCHEMA).execute(&pool).await.map_err(err)?;
        let store = Self {
            pool,
            path,
            recent: Default::default(),
        };
        store.migrate().await?;
        Ok(store)
    }

    /// Adds the columns of [`ADDED_FILES_COLUMNS`] an older index lacks.
    async fn migrate(&self) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await.map_err(|e| self.db_err(e))?;
        let present: Vec<String> =
            sqlx::query_scalar("SELECT name FROM pragma_table_info('files')")
                .fetch_all(&mut *tx)
                .await
                .map_err(|e| self.db_err(e))?;
        for (name, kind) in ADDED_FILES_COLUMNS {
            if present.iter().any(|p| p == name) {
                continue;
            }
            let sql = format!("ALTER TABLE files ADD COLUMN {name} {kind}");
            sqlx::query(sqlx::AssertSqlSafe(sql))
                .execute(&mut *tx)
                .await
                .map_err(|e| self.db_err(e))?;
            info!(path = %self.path.display(), column = name, "index database: added a column");
        }
        tx.commit().await.map_err(|e| self.db_err(e))
    }

    /// A connection of the pool for one write transaction; its outcome goes to
    /// [`Store::written`].
    async fn write_conn(&self) -> Result<PoolConnection<Sqlite>, StoreError> {
        self.pool.acquire().await.map_err(|e| self.db_err(e))
    }

    /// Returns `conn` to the pool after a write transaction that went through, and closes it
    /// after one that failed. A write failing with SQLITE_FULL (a full `state_dir`) can leave
    /// sqlx believing the connection is still in its transaction: back in the pool, it then
    /// nests every later "transaction" on it in a savepoint that never commits, and holds
    /// the write lock against the other connections ("database is locked") until the
    /// process ends. Closing it rolls back whatever SQLite still had open.
    fn written<T>(
        &self,
        mut conn: PoolConnection<Sqlite>,
        result: Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        if let Err(e) = &result {
            tracing::debug!(path = %self.path.display(), error = %e, "closing the index connection of a failed write");
            conn.close_on_drop();
        }
        result
    }

    fn recent(&self) -> std::sync::MutexGuard<'_, recent::RecentRows> {
        self.recent
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Keeps the newest rows of `folder` in step with a write of its `files` rows: `apply`
    /// when it went through, dropped when it failed.
    fn wrote_files<T>(
        &self,
        folder: &str,
        result: Result<T, StoreError>,
        apply: impl FnOnce(&mut recent::RecentRows),
    ) -> Result<T, StoreError> {
        let mut recent = self.recent();
        match &result {
            Ok(_) => apply(&mut recent),
            Err(_) => recent.forget(folder),
        }
        result
    }

    fn db_err(&self, source: sqlx::Error) -> StoreError {
        StoreError::Db {
            path: self.path.clone(),
            source,
        }
    }

    fn corrupt(&self, what: String, problem: impl Into<String>) -> StoreError {
        StoreError::Corrupt {
            path: self.path.clone(),
            what,
            problem: problem.into(),
        }
    }

    /// Makes every commit so far durable: a WAL checkpoint, which syncs the log and the
    /// database file (a commit alone does not, with `synchronous = NORMAL`). False when a
    /// reader kept it from completing.
    pub async fn checkpoint(&self) -> Result<bool, StoreError> {
        let row = sqlx::query("PRAGMA wal_checkpoint(TRUNCATE)")
            .fetch_one(&self.pool)
            .await
            .map_err(|e| self.db_err(e))?;
        let (busy, log, done): (i64, i64, i64) = (row.get(0), row.get(1), row.get(2));
        Ok(busy == 0 && log == done)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::RelPath;
    use crate::store::codec::{encode_version, to_db};
    use crate::store::testing::{from_peer, paths, rec};

    /// The `files` table as the first schema made it (before `origin_peer`, `origin_epoch`).
    const OLD_FILES_TABLE: &str = "CREATE TABLE files (
        folder TEXT NOT NULL, path TEXT NOT NULL, kind INTEGER NOT NULL,
        deleted INTEGER NOT NULL, size INTEGER NOT NULL, mode INTEGER NOT NULL, hash BLOB,
        version BLOB NOT NULL, stamp_hlc INTEGER NOT NULL, stamp_node INTEGER NOT NULL,
        seq INTEGER NOT NULL, stat_size INTEGER, stat_mtime_ns INTEGER, stat_ino INTEGER,
        PRIMARY KEY (folder, path));
        CREATE INDEX files_by_seq ON files (folder, seq);";

    #[tokio::test]
    async fn an_index_of_the_old_schema_gains_the_origin_columns_and_keeps_its_rows() {
        let dir = tempfile::tempdir().expect("tempdir");
        let old = rec("a/b.xml", 7);
        {
            let options = SqliteConnectOptions::new()
                .filename(dir.path().join("index.db"))
                .create_if_missing(true);
            let pool = SqlitePool::connect_with(options).await.expect("old db");
            sqlx::raw_sql(OLD_FILES_TABLE)
                .execute(&pool)
                .await
                .expect("old schema");
            let r = &old.record;
            sqlx::query(
                "INSERT INTO files (folder, path, kind, deleted, size, mode, hash, version, \
                 stamp_hlc, stamp_node, seq, stat_size, stat_mtime_ns, stat_ino) \
                 VALUES ('f', ?, 0, 0, ?, ?, ?, ?, ?, ?, ?, NULL, NULL, NULL)",
            )
            .bind(r.path.as_str())
            .bind(to_db(r.size))
            .bind(i64::from(r.mode))
            .bind(r.hash.map(|h| h.to_vec()))
            .bind(encode_version(&r.version))
            .bind(to_db(r.stamp.hlc))
            .bind(to_db(r.stamp.node.0))
            .bind(to_db(r.seq))
            .execute(&pool)
            .await
            .expect("old row");
            pool.close().await;
        }
        for round in 0..2 {
            // The second open finds the columns there already.
            let store = Store::open(dir.path()).await.expect("open migrates");
            let rows = store.load_folder("f").await.expect("load");
            assert_eq!(rows.len(), 1 + round, "round {round}");
            let a = rows
                .iter()
                .find(|r| r.record.path.as_str() == "a/b.xml")
                .expect("the old row");
            assert!(a.record.same_version(&old.record));
            assert_eq!(
                a.origin, None,
                "an old row has no origin: it is always sent"
            );
            let except = Origin {
                peer: "gw2".into(),
                epoch: 9,
            };
            let kept = store.since("f", 0, 10, Some(&except)).await.expect("since");
            assert_eq!(paths(&kept), ["a/b.xml"], "the old row is not left out");
            if round == 0 {
                store
                    .commit(
                        "f",
                        &[from_peer("c", 8, "gw2", 9)],
                        None,
                        &SkipChanges::default(),
                    )
                    .await
                    .expect("commit with origin");
            }
        }
        let store = Store::open(dir.path()).await.expect("open");
        let rows = store.since("f", 7, 10, None).await.expect("since");
        assert_eq!(
            rows[0].origin,
            Some(Origin {
                peer: "gw2".into(),
                epoch: 9
            })
        );
    }

    #[tokio::test]
    async fn records_cursors_and_epoch_survive_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let store = Store::open(dir.path()).await.expect("open");
            assert_eq!(store.epoch("f", 7).await.expect("epoch"), 7);
            store
                .commit(
                    "f",
                    &[rec("a/b.xml", 1), rec("c", 2)],
                    Some(("gw2", Cursor { epoch: 3, seq: 11 })),
                    &SkipChanges::default(),
                )
                .await
                .expect("commit");
        }
        let store = Store::open(dir.path()).await.expect("reopen");
        assert_eq!(
            store.epoch("f", 8).await.expect("epoch"),
            7,
            "epoch is stable"
        );
        let mut rows = store.load_folder("f").await.expect("load");
        rows.sort_by(|a, b| a.record.path.cmp(&b.record.path));
        assert_eq!(rows.len(), 2);
        assert!(rows[0].record.same_version(&rec("a/b.xml", 1).record));
        assert_eq!(rows[0].stat, rec("a/b.xml", 1).stat);
        assert_eq!(
            store.cursor("gw2", "f").await.expect("cursor"),
            Cursor { epoch: 3, seq: 11 }
        );
        assert_eq!(
            store.cursor("gw3", "f").await.expect("cursor"),
            Cursor::default()
        );
        store
            .remove("f", &[RelPath::new("c").expect("valid")])
            .await
            .expect("remove");
        assert_eq!(store.load_folder("f").await.expect("load").len(), 1);
        assert!(store.load_folder("other").await.expect("load").is_empty());
    }
}

/// Records for the tests of the tables.
#[cfg(test)]
mod testing {
    use super::{Origin, StatKey, StoredRecord};
    use crate::model::{FileRecord, Kind, NodeId, RelPath, Stamp, VersionVector};

    pub(super) fn rec(path: &str, seq: u64) -> StoredRecord {
        let mut version = VersionVector::new();
        version.bump(NodeId(u64::MAX - 3));
        StoredRecord {
            record: FileRecord {
                path: RelPath::new(path).expect("valid"),
                kind: Kind::File,
                deleted: false,
                size: 5,
                mode: 0o640,
                hash: Some(*blake3::hash(b"hello").as_bytes()),
                version,
                stamp: Stamp {
                    hlc: u64::MAX - 7,
                    node: NodeId(u64::MAX - 3),
                },
                seq,
            },
            stat: Some(StatKey {
                size: 5,
                mtime_ns: 1_700_000_000_123_456_789,
                ino: 42,
            }),
            origin: None,
        }
    }

    pub(super) fn from_peer(path: &str, seq: u64, peer: &str, epoch: u64) -> StoredRecord {
        StoredRecord {
            origin: Some(Origin {
                peer: peer.into(),
                epoch,
            }),
            ..rec(path, seq)
        }
    }

    pub(super) fn paths(rows: &[StoredRecord]) -> Vec<&str> {
        rows.iter().map(|r| r.record.path.as_str()).collect()
    }
}
