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

use std::path::{Path, PathBuf};
use std::str::FromStr;

use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Row, SqlitePool};
use tracing::info;

use crate::model::{FileRecord, Kind, NodeId, RelPath, Stamp, VersionVector};

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

/// How far this node has applied a peer's index of one folder.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Cursor {
    pub epoch: u64,
    pub seq: u64,
}

/// A peer's change that kept failing to apply: set aside, so that the rest of the peer's
/// stream flows, and retried with backoff until it applies or the peer moves past it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skipped {
    pub peer: String,
    /// The record as the peer sent it (`seq` is the peer's sequence number).
    pub record: FileRecord,
    pub problem: String,
    /// Failed attempts so far.
    pub attempts: u32,
    /// When it was first skipped, and when it is tried next (wall time, ms).
    pub first_ms: u64,
    pub retry_ms: u64,
}

/// Changes to the skipped list, written in the transaction of the batch that caused them.
#[derive(Debug, Clone, Default)]
pub struct SkipChanges {
    pub set: Vec<Skipped>,
    /// (peer, path) entries that applied or were overtaken.
    pub cleared: Vec<(String, RelPath)>,
}

/// One kept losing side of a conflict.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ConflictEntry {
    pub folder: String,
    pub path: String,
    pub copy: String,
    pub winner_node: String,
    pub created_ms: u64,
}

/// An artifact the retriever has deployed on this node (kept as a JSON document).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DeployedArtifact {
    pub id: String,
    pub name: String,
    pub version: String,
    pub revision: i64,
    pub labels: Vec<String>,
    pub folder: String,
    pub paths: Vec<String>,
    pub deployed_ms: u64,
}

#[derive(Clone)]
pub struct Store {
    pool: SqlitePool,
    path: PathBuf,
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

macro_rules! columns {
    () => {
        "path, kind, deleted, size, mode, hash, version, stamp_hlc, stamp_node, seq, \
         stat_size, stat_mtime_ns, stat_ino, origin_peer, origin_epoch"
    };
}

/// Rows per multi-row INSERT at most (16 parameters each, far below SQLite's 32,766).
const MAX_INSERT_ROWS: usize = 256;

/// The largest power of two that is at most `left` and [`MAX_INSERT_ROWS`].
fn chunk_rows(left: usize) -> usize {
    let cap = left.min(MAX_INSERT_ROWS);
    1 << (usize::BITS - 1 - cap.leading_zeros())
}

fn insert_files_sql(rows: usize) -> String {
    let mut sql = String::from(
        "INSERT OR REPLACE INTO files (folder, path, kind, deleted, size, mode, hash, version, \
         stamp_hlc, stamp_node, seq, stat_size, stat_mtime_ns, stat_ino, origin_peer, \
         origin_epoch) VALUES ",
    );
    for i in 0..rows {
        if i > 0 {
            sql.push(',');
        }
        sql.push_str("(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)");
    }
    sql
}

// SQLite integers are signed 64-bit: u64 values are stored by bit pattern.
fn to_db(v: u64) -> i64 {
    v as i64
}
fn from_db(v: i64) -> u64 {
    v as u64
}

fn encode_version(v: &VersionVector) -> Vec<u8> {
    let mut out = Vec::with_capacity(16 * 4);
    for (node, counter) in v.entries() {
        out.extend_from_slice(&node.0.to_le_bytes());
        out.extend_from_slice(&counter.to_le_bytes());
    }
    out
}

type SqliteQuery<'q> = sqlx::query::Query<'q, sqlx::Sqlite, sqlx::sqlite::SqliteArguments>;

/// Binds the replicated part of a record to the columns `path, kind, deleted, size, mode,
/// hash, version, stamp_hlc, stamp_node, seq` (the order [`record_at`] reads them in).
fn bind_record<'q>(q: SqliteQuery<'q>, r: &FileRecord) -> SqliteQuery<'q> {
    q.bind(r.path.as_str())
        .bind(if r.kind == Kind::Dir { 1i64 } else { 0 })
        .bind(i64::from(r.deleted))
        .bind(to_db(r.size))
        .bind(i64::from(r.mode))
        .bind(r.hash.map(|h| h.to_vec()))
        .bind(encode_version(&r.version))
        .bind(to_db(r.stamp.hlc))
        .bind(to_db(r.stamp.node.0))
        .bind(to_db(r.seq))
}

/// The replicated part of a record, from the columns `path, kind, deleted, size, mode, hash,
/// version, stamp_hlc, stamp_node, seq` of `row`, starting at column `at`.
fn record_at(
    row: &sqlx::sqlite::SqliteRow,
    at: usize,
    corrupt: impl Fn(&str) -> StoreError,
) -> Result<FileRecord, StoreError> {
    let path: String = row.get(at);
    let hash = row.get::<Option<Vec<u8>>, _>(at + 5);
    record_from(
        RecordColumns {
            path: &path,
            kind: row.get(at + 1),
            deleted: row.get(at + 2),
            size: row.get(at + 3),
            mode: row.get(at + 4),
            hash: hash.as_deref(),
            version: &row.get::<Vec<u8>, _>(at + 6),
            stamp_hlc: row.get(at + 7),
            stamp_node: row.get(at + 8),
            seq: row.get(at + 9),
        },
        corrupt,
    )
}

/// The columns `path, kind, deleted, size, mode, hash, version, stamp_hlc, stamp_node, seq`
/// of one row, as SQLite holds them.
struct RecordColumns<'a> {
    path: &'a str,
    kind: i64,
    deleted: i64,
    size: i64,
    mode: i64,
    hash: Option<&'a [u8]>,
    version: &'a [u8],
    stamp_hlc: i64,
    stamp_node: i64,
    seq: i64,
}

/// The one decoder of a record's columns, whichever way they were read.
fn record_from(
    c: RecordColumns<'_>,
    corrupt: impl Fn(&str) -> StoreError,
) -> Result<FileRecord, StoreError> {
    let path = RelPath::new(c.path).map_err(|e| corrupt(&e.to_string()))?;
    let hash = match c.hash {
        None => None,
        Some(h) => Some(<[u8; 32]>::try_from(h).map_err(|_| corrupt("hash length"))?),
    };
    let version = decode_version(c.version).ok_or_else(|| corrupt("version vector"))?;
    Ok(FileRecord {
        path,
        kind: if c.kind == 1 { Kind::Dir } else { Kind::File },
        deleted: c.deleted != 0,
        size: from_db(c.size),
        mode: u32::try_from(c.mode).unwrap_or(0o644),
        hash,
        version,
        stamp: Stamp {
            hlc: from_db(c.stamp_hlc),
            node: NodeId(from_db(c.stamp_node)),
        },
        seq: from_db(c.seq),
    })
}

/// The stat key from the columns `stat_size, stat_mtime_ns, stat_ino` (none without a size).
fn stat_from(size: Option<i64>, mtime_ns: Option<i64>, ino: Option<i64>) -> Option<StatKey> {
    size.map(|s| StatKey {
        size: from_db(s),
        mtime_ns: mtime_ns.unwrap_or_default(),
        ino: from_db(ino.unwrap_or_default()),
    })
}

/// Rows of `files` per page of [`Store::load_index`]: bounds the size of one page's JSON
/// text (about 250 bytes a row).
const INDEX_PAGE_ROWS: i64 = 4096;

/// Rows as one JSON array of `[path, kind, deleted, size, mode, hash, version, stamp_hlc,
/// stamp_node, seq, stat_size, stat_mtime_ns, stat_ino, origin_peer, origin_epoch]`, BLOBs in
/// hex (JSON holds no BLOB); `FROM` is the rest of the query (a subquery's rows).
macro_rules! json_rows_sql {
    ($($from:literal),+) => {
        concat!(
            "SELECT json_group_array(json_array(path, kind, deleted, size, mode, \
             CASE WHEN hash IS NULL THEN NULL ELSE hex(hash) END, hex(version), stamp_hlc, \
             stamp_node, seq, stat_size, stat_mtime_ns, stat_ino, origin_peer, origin_epoch))",
            $($from),+
        )
    };
}

/// One page of a folder's rows as a single JSON value (see [`json_rows_sql`]), then the page's
/// row count and last path. `AFTER` is the condition that starts the page.
macro_rules! index_page_sql {
    ($after:literal) => {
        json_rows_sql!(
            ", count(*), max(path) FROM (SELECT * FROM files WHERE folder = ? ",
            $after,
            " ORDER BY path LIMIT ?)"
        )
    };
}

/// A row of [`json_rows_sql`]'s array.
type JsonRow<'a> = (
    String,
    i64,
    i64,
    i64,
    i64,
    Option<&'a str>,
    &'a str,
    i64,
    i64,
    i64,
    Option<i64>,
    Option<i64>,
    Option<i64>,
    Option<String>,
    Option<i64>,
);

/// The bytes of an upper- or lower-case hex string.
fn from_hex(text: &str) -> Option<Vec<u8>> {
    fn nibble(c: u8) -> Option<u8> {
        match c {
            b'0'..=b'9' => Some(c - b'0'),
            b'a'..=b'f' => Some(c - b'a' + 10),
            b'A'..=b'F' => Some(c - b'A' + 10),
            _ => None,
        }
    }
    let text = text.as_bytes();
    if text.len() % 2 != 0 {
        return None;
    }
    let mut out = Vec::with_capacity(text.len() / 2);
    for pair in text.chunks_exact(2) {
        out.push(nibble(pair[0])? << 4 | nibble(pair[1])?);
    }
    Some(out)
}

fn decode_version(bytes: &[u8]) -> Option<VersionVector> {
    if bytes.len() % 16 != 0 {
        return None;
    }
    let entries = bytes.chunks_exact(16).map(|c| {
        let (n, k) = c.split_at(8);
        (
            NodeId(u64::from_le_bytes(n.try_into().unwrap_or_default())),
            u64::from_le_bytes(k.try_into().unwrap_or_default()),
        )
    });
    Some(VersionVector::from_entries(entries))
}

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
            // then gives the folders new epochs (see `daemon::index_may_have_rolled_back`).
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(std::time::Duration::from_secs(10));
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(options)
            .await
            .map_err(err)?;
        sqlx::raw_sql(SCHEMA).execute(&pool).await.map_err(err)?;
        let store = Self { pool, path };
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

    fn db_err(&self, source: sqlx::Error) -> StoreError {
        StoreError::Db {
            path: self.path.clone(),
            source,
        }
    }

    /// The folder's index epoch, created on first use. A new epoch (a lost or reset index)
    /// makes every peer send this node's folder in full again.
    pub async fn epoch(&self, folder: &str, fresh: u64) -> Result<u64, StoreError> {
        let key = format!("epoch:{folder}");
        sqlx::query("INSERT OR IGNORE INTO meta (key, value) VALUES (?, ?)")
            .bind(&key)
            .bind(fresh.to_string())
            .execute(&self.pool)
            .await
            .map_err(|e| self.db_err(e))?;
        let row = sqlx::query("SELECT value FROM meta WHERE key = ?")
            .bind(&key)
            .fetch_one(&self.pool)
            .await
            .map_err(|e| self.db_err(e))?;
        let value: String = row.get(0);
        value.parse().map_err(|_| StoreError::Corrupt {
            path: self.path.clone(),
            what: key,
            problem: format!("epoch {value:?} is not a number"),
        })
    }

    /// Forgets the epoch of every folder: each gets a fresh one on its next [`Store::epoch`], so
    /// peers exchange each folder in full once. For an index that may have lost its last
    /// commits, which an epoch must never do (peers' cursors and the records they leave out
    /// assume it only moves forward). Returns how many epochs were dropped.
    pub async fn new_epochs(&self) -> Result<u64, StoreError> {
        let done = sqlx::query("DELETE FROM meta WHERE key LIKE 'epoch:%'")
            .execute(&self.pool)
            .await
            .map_err(|e| self.db_err(e))?;
        Ok(done.rows_affected())
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

    /// Every stored record of a folder.
    pub async fn load_folder(&self, folder: &str) -> Result<Vec<StoredRecord>, StoreError> {
        let rows = sqlx::query(concat!(
            "SELECT ",
            columns!(),
            " FROM files WHERE folder = ?"
        ))
        .bind(folder)
        .fetch_all(&self.pool)
        .await
        .map_err(|e| self.db_err(e))?;
        self.decode(folder, rows)
    }

    /// The stored record of one path, if any (what the node serves a peer is checked
    /// against it).
    pub async fn get(
        &self,
        folder: &str,
        path: &RelPath,
    ) -> Result<Option<StoredRecord>, StoreError> {
        let rows = sqlx::query(concat!(
            "SELECT ",
            columns!(),
            " FROM files WHERE folder = ? AND path = ?"
        ))
        .bind(folder)
        .bind(path.as_str())
        .fetch_all(&self.pool)
        .await
        .map_err(|e| self.db_err(e))?;
        Ok(self.decode(folder, rows)?.into_iter().next())
    }

    /// Every stored record of a folder with its stat key: what a folder engine starts from
    /// (no origins; see [`Store::load_folder`] for those).
    ///
    /// Read as a few JSON values, one per [`INDEX_PAGE_ROWS`] rows, not row by row: sqlx
    /// copies every value of every row (`sqlite3_value_dup`) and hands each row over from its
    /// worker thread, which costs more than the rest of a restart (measured on 6,300 rows:
    /// 30 to 70 ms row by row, under 10 ms as JSON pages).
    pub async fn load_index(
        &self,
        folder: &str,
    ) -> Result<Vec<(FileRecord, Option<StatKey>)>, StoreError> {
        let mut out = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let query = match &after {
                None => sqlx::query(index_page_sql!("")).bind(folder),
                Some(last) => sqlx::query(index_page_sql!("AND path > ?"))
                    .bind(folder)
                    .bind(last.clone()),
            };
            let row = query
                .bind(INDEX_PAGE_ROWS)
                .fetch_one(&self.pool)
                .await
                .map_err(|e| self.db_err(e))?;
            let page = self.page_text(folder, &row)?;
            let (count, last): (i64, Option<String>) = (row.get(1), row.get(2));
            self.decode_json_rows(folder, &page, &mut |r| out.push((r.record, r.stat)))?;
            match last {
                Some(last) if count >= INDEX_PAGE_ROWS => after = Some(last),
                _ => return Ok(out),
            }
        }
    }

    /// Decodes a [`json_rows_sql`] array, handing each row to `out`.
    fn decode_json_rows(
        &self,
        folder: &str,
        page: &str,
        out: &mut dyn FnMut(StoredRecord),
    ) -> Result<(), StoreError> {
        let corrupt = |what: String, problem: &str| StoreError::Corrupt {
            path: self.path.clone(),
            what,
            problem: problem.to_owned(),
        };
        let rows: Vec<JsonRow<'_>> = serde_json::from_str(page)
            .map_err(|e| corrupt(format!("{folder} (index page)"), &e.to_string()))?;
        for (path, kind, deleted, size, mode, hash, version, hlc, node, seq, ss, sm, si, op, oe) in
            rows
        {
            let corrupt = |problem: &str| corrupt(format!("{folder}/{path}"), problem);
            let hash = match hash {
                None => None,
                Some(h) => Some(from_hex(h).ok_or_else(|| corrupt("hash"))?),
            };
            let version = from_hex(version).ok_or_else(|| corrupt("version vector"))?;
            let record = record_from(
                RecordColumns {
                    path: &path,
                    kind,
                    deleted,
                    size,
                    mode,
                    hash: hash.as_deref(),
                    version: &version,
                    stamp_hlc: hlc,
                    stamp_node: node,
                    seq,
                },
                corrupt,
            )?;
            // Both or neither are written; a half one is read as no origin (always sent).
            let origin = match (op, oe) {
                (Some(peer), Some(epoch)) => Some(Origin {
                    peer,
                    epoch: from_db(epoch),
                }),
                _ => None,
            };
            out(StoredRecord {
                record,
                stat: stat_from(ss, sm, si),
                origin,
            });
        }
        Ok(())
    }

    /// Up to `limit` records of a folder changed after `seq`, in sequence order, leaving out
    /// the rows whose origin is `except` (they are not decoded, nor counted in `limit`).
    pub async fn since(
        &self,
        folder: &str,
        seq: u64,
        limit: u32,
        except: Option<&Origin>,
    ) -> Result<Vec<StoredRecord>, StoreError> {
        // One JSON value for the whole batch, as in `load_index`: row by row, sqlx costs
        // several microseconds a row, and this runs for every batch sent to every peer.
        let query = match except {
            None => sqlx::query(json_rows_sql!(
                " FROM (SELECT * FROM files WHERE folder = ? AND seq > ? ORDER BY seq LIMIT ?)"
            ))
            .bind(folder)
            .bind(to_db(seq)),
            // `IS`, not `=`: a row without origin (NULLs) must compare as "other", not NULL.
            Some(o) => sqlx::query(json_rows_sql!(
                " FROM (SELECT * FROM files WHERE folder = ? AND seq > ? \
                 AND NOT (origin_peer IS ? AND origin_epoch IS ?) ORDER BY seq LIMIT ?)"
            ))
            .bind(folder)
            .bind(to_db(seq))
            .bind(o.peer.as_str())
            .bind(to_db(o.epoch)),
        };
        let row = query
            .bind(i64::from(limit))
            .fetch_one(&self.pool)
            .await
            .map_err(|e| self.db_err(e))?;
        let page = self.page_text(folder, &row)?;
        let mut out = Vec::new();
        self.decode_json_rows(folder, &page, &mut |r| out.push(r))?;
        // The aggregate's order is not the subquery's by contract: put it back.
        out.sort_unstable_by_key(|r| r.record.seq);
        Ok(out)
    }

    /// The JSON text in column 0 of a [`json_rows_sql`] row. A path that is not UTF-8 makes
    /// it invalid: an error, not a panic.
    fn page_text(&self, folder: &str, row: &sqlx::sqlite::SqliteRow) -> Result<String, StoreError> {
        row.try_get(0).map_err(|e| StoreError::Corrupt {
            path: self.path.clone(),
            what: format!("{folder} (index page)"),
            problem: e.to_string(),
        })
    }

    fn decode(
        &self,
        folder: &str,
        rows: Vec<sqlx::sqlite::SqliteRow>,
    ) -> Result<Vec<StoredRecord>, StoreError> {
        let mut out = Vec::with_capacity(rows.len());
        for row in rows {
            let path: String = row.get(0);
            let corrupt = |problem: &str| StoreError::Corrupt {
                path: self.path.clone(),
                what: format!("{folder}/{path}"),
                problem: problem.to_owned(),
            };
            let record = record_at(&row, 0, corrupt)?;
            let stat = stat_from(row.get(10), row.get(11), row.get(12));
            // Both or neither are written; a half one is read as no origin (always sent).
            let origin = match (
                row.get::<Option<String>, _>(13),
                row.get::<Option<i64>, _>(14),
            ) {
                (Some(peer), Some(epoch)) => Some(Origin {
                    peer,
                    epoch: from_db(epoch),
                }),
                _ => None,
            };
            out.push(StoredRecord {
                record,
                stat,
                origin,
            });
        }
        Ok(out)
    }

    /// Writes records, and optionally a peer cursor and changes to the skipped list, in one
    /// transaction.
    pub async fn commit(
        &self,
        folder: &str,
        records: &[StoredRecord],
        cursor: Option<(&str, Cursor)>,
        skips: &SkipChanges,
    ) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await.map_err(|e| self.db_err(e))?;
        // Many rows per statement: one round trip to SQLite's worker thread per chunk, not
        // per record. Chunk sizes are powers of two, so a handful of statements is prepared
        // and cached for any batch size.
        let mut rest = records;
        while !rest.is_empty() {
            let n = chunk_rows(rest.len());
            let (chunk, tail) = rest.split_at(n);
            rest = tail;
            let mut q = sqlx::query(sqlx::AssertSqlSafe(insert_files_sql(n)));
            for StoredRecord {
                record: r,
                stat,
                origin,
            } in chunk
            {
                q = bind_record(q.bind(folder), r)
                    .bind(stat.map(|s| to_db(s.size)))
                    .bind(stat.map(|s| s.mtime_ns))
                    .bind(stat.map(|s| to_db(s.ino)))
                    .bind(origin.as_ref().map(|o| o.peer.as_str()))
                    .bind(origin.as_ref().map(|o| to_db(o.epoch)));
            }
            q.execute(&mut *tx).await.map_err(|e| self.db_err(e))?;
        }
        if let Some((peer, c)) = cursor {
            sqlx::query("INSERT OR REPLACE INTO peer_cursors (peer, folder, epoch, seq) VALUES (?, ?, ?, ?)")
                .bind(peer)
                .bind(folder)
                .bind(to_db(c.epoch))
                .bind(to_db(c.seq))
                .execute(&mut *tx)
                .await
                .map_err(|e| self.db_err(e))?;
        }
        for (peer, path) in &skips.cleared {
            sqlx::query("DELETE FROM skipped WHERE folder = ? AND peer = ? AND path = ?")
                .bind(folder)
                .bind(peer)
                .bind(path.as_str())
                .execute(&mut *tx)
                .await
                .map_err(|e| self.db_err(e))?;
        }
        for s in &skips.set {
            let q = sqlx::query(
                "INSERT OR REPLACE INTO skipped (folder, peer, path, kind, deleted, size, mode, \
                 hash, version, stamp_hlc, stamp_node, seq, problem, attempts, first_ms, retry_ms) \
                 VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            )
            .bind(folder)
            .bind(&s.peer);
            bind_record(q, &s.record)
                .bind(&s.problem)
                .bind(i64::from(s.attempts))
                .bind(to_db(s.first_ms))
                .bind(to_db(s.retry_ms))
                .execute(&mut *tx)
                .await
                .map_err(|e| self.db_err(e))?;
        }
        tx.commit().await.map_err(|e| self.db_err(e))
    }

    /// The skipped peer changes of a folder.
    pub async fn skipped(&self, folder: &str) -> Result<Vec<Skipped>, StoreError> {
        let rows = sqlx::query(
            "SELECT peer, path, kind, deleted, size, mode, hash, version, stamp_hlc, stamp_node, \
             seq, problem, attempts, first_ms, retry_ms FROM skipped WHERE folder = ? \
             ORDER BY peer, path",
        )
        .bind(folder)
        .fetch_all(&self.pool)
        .await
        .map_err(|e| self.db_err(e))?;
        let mut out = Vec::with_capacity(rows.len());
        for row in rows {
            let peer: String = row.get(0);
            let path: String = row.get(1);
            let corrupt = |problem: &str| StoreError::Corrupt {
                path: self.path.clone(),
                what: format!("skipped change {folder}/{path} from {peer}"),
                problem: problem.to_owned(),
            };
            out.push(Skipped {
                record: record_at(&row, 1, corrupt)?,
                problem: row.get(11),
                attempts: u32::try_from(row.get::<i64, _>(12)).unwrap_or(u32::MAX),
                first_ms: from_db(row.get(13)),
                retry_ms: from_db(row.get(14)),
                peer,
            });
        }
        Ok(out)
    }

    /// Updates only the stat keys of records (after a rescan found the same content).
    pub async fn update_stats(
        &self,
        folder: &str,
        stats: &[(RelPath, StatKey)],
    ) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await.map_err(|e| self.db_err(e))?;
        for (path, s) in stats {
            sqlx::query("UPDATE files SET stat_size = ?, stat_mtime_ns = ?, stat_ino = ? WHERE folder = ? AND path = ?")
                .bind(to_db(s.size))
                .bind(s.mtime_ns)
                .bind(to_db(s.ino))
                .bind(folder)
                .bind(path.as_str())
                .execute(&mut *tx)
                .await
                .map_err(|e| self.db_err(e))?;
        }
        tx.commit().await.map_err(|e| self.db_err(e))
    }

    /// Removes rows (purged tombstones).
    pub async fn remove(&self, folder: &str, paths: &[RelPath]) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await.map_err(|e| self.db_err(e))?;
        for p in paths {
            sqlx::query("DELETE FROM files WHERE folder = ? AND path = ?")
                .bind(folder)
                .bind(p.as_str())
                .execute(&mut *tx)
                .await
                .map_err(|e| self.db_err(e))?;
        }
        tx.commit().await.map_err(|e| self.db_err(e))
    }

    pub async fn cursor(&self, peer: &str, folder: &str) -> Result<Cursor, StoreError> {
        let row = sqlx::query("SELECT epoch, seq FROM peer_cursors WHERE peer = ? AND folder = ?")
            .bind(peer)
            .bind(folder)
            .fetch_optional(&self.pool)
            .await
            .map_err(|e| self.db_err(e))?;
        Ok(row
            .map(|r| Cursor {
                epoch: from_db(r.get(0)),
                seq: from_db(r.get(1)),
            })
            .unwrap_or_default())
    }

    pub async fn deployed(&self) -> Result<Vec<DeployedArtifact>, StoreError> {
        let rows = sqlx::query("SELECT artifact_id, doc FROM deployed ORDER BY artifact_id")
            .fetch_all(&self.pool)
            .await
            .map_err(|e| self.db_err(e))?;
        rows.into_iter()
            .map(|r| {
                let id: String = r.get(0);
                let doc: String = r.get(1);
                serde_json::from_str(&doc).map_err(|e| StoreError::Corrupt {
                    path: self.path.clone(),
                    what: format!("deployed artifact {id}"),
                    problem: e.to_string(),
                })
            })
            .collect()
    }

    /// Records deployed artifacts in one transaction.
    pub async fn set_deployed(&self, list: &[DeployedArtifact]) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await.map_err(|e| self.db_err(e))?;
        for d in list {
            let doc = serde_json::to_string(d).map_err(|e| StoreError::Corrupt {
                path: self.path.clone(),
                what: format!("deployed artifact {}", d.id),
                problem: e.to_string(),
            })?;
            sqlx::query("INSERT OR REPLACE INTO deployed (artifact_id, doc) VALUES (?, ?)")
                .bind(&d.id)
                .bind(doc)
                .execute(&mut *tx)
                .await
                .map_err(|e| self.db_err(e))?;
        }
        tx.commit().await.map_err(|e| self.db_err(e))
    }

    pub async fn remove_deployed(&self, id: &str) -> Result<(), StoreError> {
        sqlx::query("DELETE FROM deployed WHERE artifact_id = ?")
            .bind(id)
            .execute(&self.pool)
            .await
            .map_err(|e| self.db_err(e))?;
        Ok(())
    }

    pub async fn add_conflict(&self, entry: &ConflictEntry) -> Result<(), StoreError> {
        sqlx::query("INSERT INTO conflicts (folder, path, copy, winner_node, created_ms) VALUES (?, ?, ?, ?, ?)")
            .bind(&entry.folder)
            .bind(&entry.path)
            .bind(&entry.copy)
            .bind(&entry.winner_node)
            .bind(to_db(entry.created_ms))
            .execute(&self.pool)
            .await
            .map_err(|e| self.db_err(e))?;
        Ok(())
    }

    pub async fn conflicts(&self) -> Result<Vec<ConflictEntry>, StoreError> {
        let rows = sqlx::query(
            "SELECT folder, path, copy, winner_node, created_ms FROM conflicts ORDER BY id",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(|e| self.db_err(e))?;
        Ok(rows
            .into_iter()
            .map(|r| ConflictEntry {
                folder: r.get(0),
                path: r.get(1),
                copy: r.get(2),
                winner_node: r.get(3),
                created_ms: from_db(r.get(4)),
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(path: &str, seq: u64) -> StoredRecord {
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

    fn from_peer(path: &str, seq: u64, peer: &str, epoch: u64) -> StoredRecord {
        StoredRecord {
            origin: Some(Origin {
                peer: peer.into(),
                epoch,
            }),
            ..rec(path, seq)
        }
    }

    fn paths(rows: &[StoredRecord]) -> Vec<&str> {
        rows.iter().map(|r| r.record.path.as_str()).collect()
    }

    #[test]
    fn insert_chunks_are_powers_of_two_that_cover_any_batch() {
        for total in [1usize, 2, 3, 255, 256, 257, 777, 1000] {
            let (mut left, mut sizes) = (total, Vec::new());
            while left > 0 {
                let n = chunk_rows(left);
                assert!(n.is_power_of_two() && n <= MAX_INSERT_ROWS && n <= left);
                sizes.push(n);
                left -= n;
            }
            assert!(
                sizes.len() <= total / MAX_INSERT_ROWS + 9,
                "{total}: {sizes:?}"
            );
        }
    }

    #[tokio::test]
    async fn a_large_batch_commits_every_row_and_replaces_older_ones() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).await.expect("open");
        let batch: Vec<StoredRecord> = (1..=777).map(|i| rec(&format!("d/{i}.xml"), i)).collect();
        store
            .commit("f", &batch, None, &SkipChanges::default())
            .await
            .expect("commit");
        // A later version of some of them, and one path twice in one batch: the later wins.
        let mut update: Vec<StoredRecord> = (1..=300)
            .map(|i| rec(&format!("d/{i}.xml"), 1000 + i))
            .collect();
        update.push(rec("d/1.xml", 5000));
        store
            .commit("f", &update, None, &SkipChanges::default())
            .await
            .expect("commit");
        let rows = store.load_folder("f").await.expect("load");
        assert_eq!(rows.len(), 777);
        let seq_of = |p: &str| {
            rows.iter()
                .find(|r| r.record.path.as_str() == p)
                .map(|r| r.record.seq)
        };
        assert_eq!(seq_of("d/1.xml"), Some(5000));
        assert_eq!(seq_of("d/300.xml"), Some(1300));
        assert_eq!(seq_of("d/301.xml"), Some(301));
        assert_eq!(seq_of("d/777.xml"), Some(777));
        assert_eq!(
            store
                .since("f", 1299, 1000, None)
                .await
                .expect("since")
                .len(),
            2
        );
    }

    /// `load_index` reads JSON pages, not rows: every record and stat key must come back as
    /// `load_folder` reads them, across page ends and for values JSON could get wrong.
    #[tokio::test]
    async fn load_index_reads_every_record_and_stat_key_as_load_folder_does() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).await.expect("open");
        let page = usize::try_from(INDEX_PAGE_ROWS).expect("fits");
        let mut batch: Vec<StoredRecord> = (1..=2 * page)
            .map(|i| rec(&format!("d/{i:05}.xml"), i as u64))
            .collect();
        let mut odd = rec("d/\"quoted\" \\ back\tslash\n é 😀.xml", 90_001);
        odd.record.version.bump(NodeId(7));
        odd.record.version.bump(NodeId(u64::MAX));
        odd.record.size = u64::MAX;
        odd.record.mode = 0o7777;
        odd.stat = Some(StatKey {
            size: u64::MAX,
            mtime_ns: -1_000_000_007,
            ino: u64::MAX - 1,
        });
        let mut dir_row = rec("d", 90_002);
        dir_row.record.kind = Kind::Dir;
        dir_row.record.hash = None;
        dir_row.stat = None;
        let mut tombstone = rec("gone.xml", 90_003);
        tombstone.record.deleted = true;
        tombstone.record.hash = None;
        batch.extend([odd, dir_row, tombstone, from_peer("e", 90_004, "gw2", 3)]);
        store
            .commit("f", &batch, None, &SkipChanges::default())
            .await
            .expect("commit");
        store
            .commit("g", &[rec("d/1.xml", 1)], None, &SkipChanges::default())
            .await
            .expect("commit");

        let mut want = store.load_folder("f").await.expect("load");
        want.sort_by(|a, b| a.record.path.cmp(&b.record.path));
        let got = store.load_index("f").await.expect("load index");
        assert_eq!(got.len(), batch.len());
        assert_eq!(got.len(), want.len());
        for ((record, stat), w) in got.iter().zip(&want) {
            assert_eq!(record, &w.record);
            assert_eq!(stat, &w.stat, "{}", record.path);
        }
        assert_eq!(store.load_index("g").await.expect("load index").len(), 1);
        assert!(store.load_index("h").await.expect("load index").is_empty());

        // `since` reads the same rows, origins included, in sequence order, from any point.
        want.sort_by_key(|w| w.record.seq);
        let same = |got: &[StoredRecord], want: &[StoredRecord]| {
            assert_eq!(got.len(), want.len());
            for (g, w) in got.iter().zip(want) {
                assert_eq!(g.record, w.record);
                assert_eq!(g.stat, w.stat, "{}", g.record.path);
                assert_eq!(g.origin, w.origin, "{}", g.record.path);
            }
        };
        let all = store.since("f", 0, 100_000, None).await.expect("since");
        same(&all, &want);
        assert!(all.iter().any(|r| r.origin.is_some()));
        let from = want[page - 2].record.seq;
        let window = store.since("f", from, 5, None).await.expect("since");
        same(&window, &want[page - 1..page + 4]);
        assert!(
            store
                .since("h", 0, 10, None)
                .await
                .expect("since")
                .is_empty()
        );
    }

    #[tokio::test]
    async fn load_index_reports_a_corrupt_row_instead_of_loading_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).await.expect("open");
        store
            .commit("f", &[rec("a.xml", 1)], None, &SkipChanges::default())
            .await
            .expect("commit");
        sqlx::query("UPDATE files SET hash = x'0102' WHERE path = 'a.xml'")
            .execute(&store.pool)
            .await
            .expect("corrupt the hash");
        match store.load_index("f").await {
            Err(StoreError::Corrupt { what, problem, .. }) => {
                assert_eq!(what, "f/a.xml");
                assert_eq!(problem, "hash length");
            }
            other => panic!("expected a corrupt row, got {other:?}"),
        }
        sqlx::query("UPDATE files SET hash = NULL, path = CAST(x'61ff' AS TEXT)")
            .execute(&store.pool)
            .await
            .expect("a path that is not UTF-8");
        assert!(matches!(
            store.load_index("f").await,
            Err(StoreError::Corrupt { .. })
        ));
    }

    /// Epochs are random 64-bit values: one above `i64::MAX` must survive the bit-pattern
    /// storage, and a later commit of the path without origin must clear it.
    #[tokio::test]
    async fn origin_is_stored_read_back_and_replaced_by_a_later_commit() {
        let dir = tempfile::tempdir().expect("tempdir");
        let big = u64::MAX - 41;
        {
            let store = Store::open(dir.path()).await.expect("open");
            store
                .commit(
                    "f",
                    &[from_peer("a", 1, "gw2", big), rec("b", 2)],
                    None,
                    &SkipChanges::default(),
                )
                .await
                .expect("commit");
        }
        let store = Store::open(dir.path()).await.expect("reopen");
        let mut rows = store.load_folder("f").await.expect("load");
        rows.sort_by(|a, b| a.record.path.cmp(&b.record.path));
        assert_eq!(
            rows[0].origin,
            Some(Origin {
                peer: "gw2".into(),
                epoch: big
            })
        );
        assert_eq!(rows[1].origin, None);
        let since = store.since("f", 0, 10, None).await.expect("since");
        assert_eq!(since[0].origin, rows[0].origin, "since decodes it too");

        store
            .commit("f", &[rec("a", 3)], None, &SkipChanges::default())
            .await
            .expect("commit");
        let rows = store.since("f", 2, 10, None).await.expect("since");
        assert_eq!(paths(&rows), ["a"]);
        assert_eq!(rows[0].origin, None, "the newer row has no origin");
    }

    #[tokio::test]
    async fn since_leaves_out_exactly_the_rows_of_the_excepted_origin() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).await.expect("open");
        let epoch = u64::MAX - 6;
        store
            .commit(
                "f",
                &[
                    from_peer("a", 1, "gw2", epoch),
                    rec("b", 2),
                    from_peer("c", 3, "gw2", epoch - 1),
                    from_peer("d", 4, "gw3", epoch),
                    from_peer("e", 5, "gw2", epoch),
                    rec("f", 6),
                ],
                None,
                &SkipChanges::default(),
            )
            .await
            .expect("commit");
        // The same origin in another folder is not this folder's business.
        store
            .commit(
                "g",
                &[from_peer("a", 1, "gw2", epoch)],
                None,
                &SkipChanges::default(),
            )
            .await
            .expect("commit");
        let except = Origin {
            peer: "gw2".into(),
            epoch,
        };
        let kept = store
            .since("f", 0, 100, Some(&except))
            .await
            .expect("since");
        assert_eq!(paths(&kept), ["b", "c", "d", "f"]);
        // The limit counts the rows returned, not the ones left out.
        let first = store.since("f", 0, 2, Some(&except)).await.expect("since");
        assert_eq!(paths(&first), ["b", "c"]);
        let rest = store.since("f", 3, 2, Some(&except)).await.expect("since");
        assert_eq!(paths(&rest), ["d", "f"]);
        let all = store.since("f", 0, 100, None).await.expect("since");
        assert_eq!(paths(&all), ["a", "b", "c", "d", "e", "f"]);
        assert!(
            store
                .since("g", 0, 100, Some(&except))
                .await
                .expect("since")
                .is_empty()
        );
    }

    #[tokio::test]
    async fn new_epochs_replace_every_folder_epoch_and_keep_rows_and_cursors() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).await.expect("open");
        assert_eq!(store.epoch("f", 7).await.expect("epoch"), 7);
        assert_eq!(store.epoch("g", 8).await.expect("epoch"), 8);
        let cursor = Cursor { epoch: 3, seq: 11 };
        store
            .commit(
                "f",
                &[rec("a", 1)],
                Some(("gw2", cursor)),
                &SkipChanges::default(),
            )
            .await
            .expect("commit");
        assert_eq!(store.new_epochs().await.expect("new epochs"), 2);
        assert_eq!(store.epoch("f", 17).await.expect("epoch"), 17);
        assert_eq!(store.epoch("g", 18).await.expect("epoch"), 18);
        assert_eq!(store.load_folder("f").await.expect("load").len(), 1);
        assert_eq!(store.cursor("gw2", "f").await.expect("cursor"), cursor);
        assert!(
            store.checkpoint().await.expect("checkpoint"),
            "nothing reads"
        );
        let wal = std::fs::metadata(dir.path().join("index.db-wal")).expect("wal");
        assert_eq!(
            wal.len(),
            0,
            "the checkpoint moved every commit to the database file"
        );
    }

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

    #[tokio::test]
    async fn skipped_changes_are_kept_with_their_batch_and_cleared_by_peer_and_path() {
        let dir = tempfile::tempdir().expect("tempdir");
        let skip = |peer: &str, path: &str, attempts: u32| Skipped {
            peer: peer.into(),
            record: rec(path, 40).record,
            problem: "Permission denied (os error 13)".into(),
            attempts,
            first_ms: 1_000,
            retry_ms: 61_000,
        };
        {
            let store = Store::open(dir.path()).await.expect("open");
            let set = SkipChanges {
                set: vec![skip("gw2", "api/a.xml", 3), skip("gw3", "api/a.xml", 3)],
                cleared: Vec::new(),
            };
            store
                .commit(
                    "f",
                    &[rec("c", 2)],
                    Some(("gw2", Cursor { epoch: 3, seq: 50 })),
                    &set,
                )
                .await
                .expect("commit");
        }
        let store = Store::open(dir.path()).await.expect("reopen");
        let kept = store.skipped("f").await.expect("skipped");
        assert_eq!(
            kept,
            vec![skip("gw2", "api/a.xml", 3), skip("gw3", "api/a.xml", 3)]
        );
        assert!(kept[0].record.same_version(&rec("api/a.xml", 40).record));
        assert_eq!(kept[0].record.seq, 40, "the peer's sequence is kept");
        assert!(store.skipped("other").await.expect("skipped").is_empty());
        // A new attempt replaces the entry; clearing one peer's entry leaves the other's.
        let changes = SkipChanges {
            set: vec![skip("gw3", "api/a.xml", 4)],
            cleared: vec![("gw2".into(), RelPath::new("api/a.xml").expect("valid"))],
        };
        store
            .commit("f", &[], None, &changes)
            .await
            .expect("commit");
        assert_eq!(
            store.skipped("f").await.expect("skipped"),
            vec![skip("gw3", "api/a.xml", 4)]
        );
    }
}
