//! The `files` table: one row per path of a folder (the replicated record, the local stat key,
//! the origin), read whole at start (`load_index`, in JSON pages), by path (`get`) and by
//! sequence for the peers (`since`), written in batches (`commit`).

use sqlx::Row;

use crate::model::{FileRecord, RelPath};

use super::codec::{JsonRow, bind_record, stored_at, stored_from_json, to_db};
use super::{Cursor, Journal, Origin, SkipChanges, StatKey, Store, StoreError, StoredRecord};

macro_rules! columns {
    () => {
        "path, kind, deleted, size, mode, hash, version, stamp_hlc, stamp_node, seq, \
         stat_size, stat_mtime_ns, stat_ino, origin_peer, origin_epoch"
    };
}

/// Rows per multi-row INSERT at most (16 parameters each, far below SQLite's 32,766).
const MAX_INSERT_ROWS: usize = 256;

/// The largest power of two that is at most `left` and [`MAX_INSERT_ROWS`].
pub(super) fn chunk_rows(left: usize) -> usize {
    let cap = left.min(MAX_INSERT_ROWS);
    1 << (usize::BITS - 1 - cap.leading_zeros())
}

fn insert_files_sql(rows: usize) -> String {
    values_sql(
        "INSERT OR REPLACE INTO files (folder, path, kind, deleted, size, mode, hash, version, \
         stamp_hlc, stamp_node, seq, stat_size, stat_mtime_ns, stat_ino, origin_peer, \
         origin_epoch) VALUES ",
        16,
        rows,
    )
}

/// `head` followed by `rows` groups of `columns` placeholders: one multi-row insert.
pub(super) fn values_sql(head: &str, columns: usize, rows: usize) -> String {
    let group = format!("({})", vec!["?"; columns].join(", "));
    let mut sql = String::from(head);
    for i in 0..rows {
        if i > 0 {
            sql.push(',');
        }
        sql.push_str(&group);
    }
    sql
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
            " ORDER BY path LIMIT CAST(? AS INTEGER))"
        )
    };
}

// The `LIMIT` of these reads takes its parameter through a CAST, never as a bare `?`. Given a
// bare parameter, SQLite (the bundled 3.51) compiles the bound value into the program and flags
// the parameter, so that binding it again expires the statement; sqlx binds every parameter at
// every execution, so every run of the cached statement compiled it anew at its first step
// (`sqlite3Reprepare`: 16% of an agent's CPU under load). Behind the CAST the limit is read when
// the statement runs; the plan is the same. (Turning the planner's use of bound values off,
// SQLITE_DBCONFIG_ENABLE_QPSG, would do too, but only through unsafe FFI.)

/// The first page of [`Store::load_index`]: folder, limit.
const INDEX_FIRST_PAGE_SQL: &str = index_page_sql!("");
/// A later page of [`Store::load_index`]: folder, last path of the page before, limit.
const INDEX_NEXT_PAGE_SQL: &str = index_page_sql!("AND path > ?");
/// [`Store::since`]: folder, seq, limit.
const SINCE_SQL: &str = json_rows_sql!(
    " FROM (SELECT * FROM files WHERE folder = ? AND seq > ? ORDER BY seq \
     LIMIT CAST(? AS INTEGER))"
);
/// [`Store::since`] leaving out one origin: folder, seq, origin peer, origin epoch, limit.
/// `IS`, not `=`: a row without origin (NULLs) must compare as "other", not NULL.
const SINCE_EXCEPT_SQL: &str = json_rows_sql!(
    " FROM (SELECT * FROM files WHERE folder = ? AND seq > ? \
     AND NOT (origin_peer IS ? AND origin_epoch IS ?) ORDER BY seq LIMIT CAST(? AS INTEGER))"
);

impl Store {
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
    /// Read as a few JSON values, one per `INDEX_PAGE_ROWS` rows, not row by row: sqlx
    /// copies every value of every row (`sqlite3_value_dup`) and hands each row over from its
    /// worker thread, which costs more than the rest of a restart (measured on 6,300 rows:
    /// 30 to 70 ms row by row, under 10 ms as JSON pages).
    pub async fn load_index(
        &self,
        folder: &str,
    ) -> Result<Vec<(FileRecord, Option<StatKey>)>, StoreError> {
        let generation = self.recent().generation();
        let mut out: Vec<(FileRecord, Option<StatKey>)> = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let query = match &after {
                None => sqlx::query(INDEX_FIRST_PAGE_SQL).bind(folder),
                Some(last) => sqlx::query(INDEX_NEXT_PAGE_SQL)
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
                _ => {
                    // The whole index was read: the rows committed from now on are kept.
                    let high = out.iter().map(|(r, _)| r.seq).max().unwrap_or(0);
                    self.recent().anchor(folder, high, generation);
                    return Ok(out);
                }
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
        let rows: Vec<JsonRow<'_>> = serde_json::from_str(page)
            .map_err(|e| self.corrupt(format!("{folder} (index page)"), e.to_string()))?;
        for row in rows {
            out(stored_from_json(row, |path, problem| {
                self.corrupt(format!("{folder}/{path}"), problem)
            })?);
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
        if let Some(rows) = self.recent().since(folder, seq, limit, except) {
            return Ok(rows);
        }
        self.since_in_db(folder, seq, limit, except).await
    }

    /// [`Store::since`], always from the database.
    pub(super) async fn since_in_db(
        &self,
        folder: &str,
        seq: u64,
        limit: u32,
        except: Option<&Origin>,
    ) -> Result<Vec<StoredRecord>, StoreError> {
        // One JSON value for the whole batch, as in `load_index`: row by row, sqlx costs
        // several microseconds a row, and this runs for every batch sent to every peer.
        let query = match except {
            None => sqlx::query(SINCE_SQL).bind(folder).bind(to_db(seq)),
            Some(o) => sqlx::query(SINCE_EXCEPT_SQL)
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

    /// Decodes rows of `files` read in the order of [`columns!`].
    fn decode(
        &self,
        folder: &str,
        rows: Vec<sqlx::sqlite::SqliteRow>,
    ) -> Result<Vec<StoredRecord>, StoreError> {
        rows.iter()
            .map(|row| {
                stored_at(row, |path, problem| {
                    self.corrupt(format!("{folder}/{path}"), problem)
                })
            })
            .collect()
    }

    /// transaction.
    pub async fn commit(
        &self,
        folder: &str,
        records: &[StoredRecord],
        cursor: Option<(&str, Cursor)>,
        skips: &SkipChanges,
    ) -> Result<(), StoreError> {
        self.commit_journaled(folder, records, cursor, skips, Journal::Keep)
            .await
    }

    /// [`Store::commit`], clearing the journaled records of `journal` in the same
    /// transaction.
    pub async fn commit_journaled(
        &self,
        folder: &str,
        records: &[StoredRecord],
        cursor: Option<(&str, Cursor)>,
        skips: &SkipChanges,
        journal: Journal,
    ) -> Result<(), StoreError> {
        let mut conn = self.write_conn().await?;
        let result = async {
            let mut tx = sqlx::Connection::begin(&mut *conn)
                .await
                .map_err(|e| self.db_err(e))?;
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
                self.put_cursor(&mut tx, peer, folder, c).await?;
            }
            self.change_skipped(&mut tx, folder, skips).await?;
            match journal {
                Journal::Keep => {}
                Journal::Batch(b) => self.clear_applying(&mut tx, folder, Some(b)).await?,
                Journal::Folder => self.clear_applying(&mut tx, folder, None).await?,
            }
            tx.commit().await.map_err(|e| self.db_err(e))
        }
        .await;
        let result = self.written(conn, result);
        self.wrote_files(folder, result, |recent| recent.committed(folder, records))
    }

    /// Updates only the stat keys of records (after a rescan found the same content).
    pub async fn update_stats(
        &self,
        folder: &str,
        stats: &[(RelPath, StatKey)],
    ) -> Result<(), StoreError> {
        let mut conn = self.write_conn().await?;
        let result = async {
let mut tx = sqlx::Connection::begin(&mut *conn).await.map_err(|e| self.db_err(e))?;
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
}.await;
        let result = self.written(conn, result);
        self.wrote_files(folder, result, |recent| recent.restated(folder, stats))
    }

    /// Removes rows (purged tombstones).
    pub async fn remove(&self, folder: &str, paths: &[RelPath]) -> Result<(), StoreError> {
        let mut conn = self.write_conn().await?;
        let result = async {
            let mut tx = sqlx::Connection::begin(&mut *conn)
                .await
                .map_err(|e| self.db_err(e))?;
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
        .await;
        let result = self.written(conn, result);
        self.wrote_files(folder, result, |recent| recent.removed(folder, paths))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Kind, NodeId};
    use crate::store::testing::{from_peer, paths, rec};

    /// A tmpfs mounted on a temp dir, unmounted (lazily) when dropped.
    struct SmallDisk(tempfile::TempDir);

    impl SmallDisk {
        /// `None` where this process cannot mount (not root); in CI that fails instead.
        fn mount(size_kib: u64) -> Option<Self> {
            let dir = tempfile::tempdir().expect("tempdir");
            let out = std::process::Command::new("mount")
                .args(["-t", "tmpfs", "-o", &format!("size={size_kib}k"), "tmpfs"])
                .arg(dir.path())
                .output();
            match out {
                Ok(o) if o.status.success() => Some(Self(dir)),
                other => {
                    let why = format!("cannot mount a tmpfs: {other:?}");
                    assert!(
                        std::env::var("CI").is_ok_and(|v| v != "true")
                            || std::env::var("CI").is_err(),
                        "{why}"
                    );
                    eprintln!("skipping: {why}");
                    None
                }
            }
        }
    }

    impl Drop for SmallDisk {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(self.0.path())
                .output();
        }
    }

    /// Regression (issue 16, item 3): a commit failing with SQLITE_FULL left its pooled
    /// connection inside a transaction as sqlx saw it. Later commits drawn on that connection
    /// answered Ok without ever committing, and the others failed with "database is locked"
    /// after the busy timeout, until the process ended: once the disk had room again, the
    /// index still took nothing (or lost what it said it took).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn commits_after_a_full_disk_are_real_once_there_is_room_again() {
        use std::io::Write;
        let Some(disk) = SmallDisk::mount(2048) else {
            return;
        };
        let dir = disk.0.path();
        let store = Store::open(dir).await.expect("open");
        let none = SkipChanges::default();
        store
            .commit("f", &[rec("a.xml", 1)], None, &none)
            .await
            .expect("commit");
        let filler = dir.join("filler");
        let mut f = std::fs::File::create(&filler).expect("filler");
        let chunk = vec![1u8; 4096];
        for _ in 0..10_000 {
            if f.write_all(&chunk).is_err() {
                break;
            }
        }
        drop(f);
        let mut said_ok = vec!["a.xml".to_owned()];
        let mut failed = 0;
        for i in 0..20u64 {
            let recs: Vec<_> = (0..50)
                .map(|j| rec(&format!("full{i}/{j}.xml"), 2 + i * 100 + j))
                .collect();
            match store.commit("f", &recs, None, &none).await {
                Ok(()) => said_ok.extend(recs.iter().map(|r| r.record.path.to_string())),
                Err(_) => failed += 1,
            }
        }
        assert!(failed > 0, "the full disk must fail some commits");
        std::fs::remove_file(&filler).expect("remove the filler");
        for i in 0..8u64 {
            let path = format!("after{i}.xml");
            let t = std::time::Instant::now();
            store
                .commit("f", &[rec(&path, 10_000 + i)], None, &none)
                .await
                .expect("a commit once there is room");
            assert!(
                t.elapsed() < std::time::Duration::from_secs(5),
                "no lock wait"
            );
            said_ok.push(path);
        }
        drop(store);
        // What was answered Ok is in the index, as a new process sees it.
        let reopened = Store::open(dir).await.expect("reopen");
        let mut held: Vec<String> = reopened
            .load_folder("f")
            .await
            .expect("load")
            .iter()
            .map(|r| r.record.path.to_string())
            .collect();
        held.sort();
        said_ok.sort();
        assert_eq!(held, said_ok);
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

    /// Regression: with a bare `LIMIT ?`, SQLite compiled the bound limit into the program of
    /// `since` (and of the index pages), which makes it expire the statement whenever that
    /// parameter is bound again: every call prepared the statement anew. Such a program holds
    /// the bound value as a constant, which is what EXPLAIN shows.
    #[tokio::test]
    async fn the_limit_of_the_feed_and_index_reads_is_not_compiled_into_their_statements() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).await.expect("open");
        const LIMIT: i64 = 7919;
        for sql in [
            SINCE_SQL,
            SINCE_EXCEPT_SQL,
            INDEX_FIRST_PAGE_SQL,
            INDEX_NEXT_PAGE_SQL,
        ] {
            // The limit is the last parameter of each.
            let mut q = sqlx::query(sqlx::AssertSqlSafe(format!("EXPLAIN {sql}")));
            for _ in 1..sql.matches('?').count() {
                q = q.bind(0_i64);
            }
            let program = q.bind(LIMIT).fetch_all(&store.pool).await.expect("explain");
            assert!(!program.is_empty());
            let bound_into_program = program
                .iter()
                .any(|op| op.get::<String, _>(1) == "Integer" && op.get::<i64, _>(2) == LIMIT);
            assert!(!bound_into_program, "{sql}");
        }
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
}
