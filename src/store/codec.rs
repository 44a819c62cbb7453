//! The one row codec of the index: how a record's columns are written (bound to a query) and
//! read back, whichever way they were read (a sqlx row, or one row of a JSON page, see
//! `files::load_index`), and how a version vector is stored.

use sqlx::Row;

use crate::model::{FileRecord, Kind, NodeId, RelPath, Stamp, VersionVector};

use super::{Origin, StatKey, StoreError, StoredRecord};

// SQLite integers are signed 64-bit: u64 values are stored by bit pattern.
pub(super) fn to_db(v: u64) -> i64 {
    v as i64
}
pub(super) fn from_db(v: i64) -> u64 {
    v as u64
}

pub(super) fn encode_version(v: &VersionVector) -> Vec<u8> {
    let mut out = Vec::with_capacity(16 * 4);
    for (node, counter) in v.entries() {
        out.extend_from_slice(&node.0.to_le_bytes());
        out.extend_from_slice(&counter.to_le_bytes());
    }
    out
}

pub(super) type SqliteQuery<'q> =
    sqlx::query::Query<'q, sqlx::Sqlite, sqlx::sqlite::SqliteArguments>;

/// Binds the replicated part of a record to the columns `path, kind, deleted, size, mode,
/// hash, version, stamp_hlc, stamp_node, seq` (the order [`record_at`] reads them in).
pub(super) fn bind_record<'q>(q: SqliteQuery<'q>, r: &FileRecord) -> SqliteQuery<'q> {
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

/// Reads the columns `path, kind, deleted, size, mode, hash, version, stamp_hlc, stamp_node,
/// seq` of `row`, starting at column `at`, and hands them to `f`.
fn with_record_columns<R>(
    row: &sqlx::sqlite::SqliteRow,
    at: usize,
    f: impl FnOnce(RecordColumns<'_>) -> R,
) -> R {
    let path: String = row.get(at);
    let hash = row.get::<Option<Vec<u8>>, _>(at + 5);
    f(RecordColumns {
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
    })
}

/// The replicated part of a record, from the columns `path, kind, deleted, size, mode, hash,
/// version, stamp_hlc, stamp_node, seq` of `row`, starting at column `at`.
pub(super) fn record_at(
    row: &sqlx::sqlite::SqliteRow,
    at: usize,
    corrupt: impl Fn(&str) -> StoreError,
) -> Result<FileRecord, StoreError> {
    with_record_columns(row, at, |c| record_from(c, corrupt))
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

/// The decoder of a record's columns, whichever way they were read.
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

/// A row of [`json_rows_sql`]'s array.
pub(super) type JsonRow<'a> = (
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

pub(super) fn decode_version(bytes: &[u8]) -> Option<VersionVector> {
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

/// Every column of a `files` row, in the order of `files::columns!`, as SQLite holds them.
struct FilesColumns<'a> {
    record: RecordColumns<'a>,
    stat_size: Option<i64>,
    stat_mtime_ns: Option<i64>,
    stat_ino: Option<i64>,
    origin_peer: Option<String>,
    origin_epoch: Option<i64>,
}

/// The one decoder of a `files` row into a [`StoredRecord`], whichever way it was read
/// ([`stored_at`] for a sqlx row, [`stored_from_json`] for a row of a JSON page). `corrupt`
/// makes the error for a row (its path) and a problem.
fn stored_from(
    c: FilesColumns<'_>,
    corrupt: impl Fn(&str, &str) -> StoreError,
) -> Result<StoredRecord, StoreError> {
    let path = c.record.path;
    let record = record_from(c.record, |problem| corrupt(path, problem))?;
    // Both or neither are written; a half one is read as no origin (always sent).
    let origin = match (c.origin_peer, c.origin_epoch) {
        (Some(peer), Some(epoch)) => Some(Origin {
            peer,
            epoch: from_db(epoch),
        }),
        _ => None,
    };
    Ok(StoredRecord {
        record,
        stat: stat_from(c.stat_size, c.stat_mtime_ns, c.stat_ino),
        origin,
    })
}

/// A `files` row read by sqlx, its columns in the order of `files::columns!`.
pub(super) fn stored_at(
    row: &sqlx::sqlite::SqliteRow,
    corrupt: impl Fn(&str, &str) -> StoreError,
) -> Result<StoredRecord, StoreError> {
    with_record_columns(row, 0, |record| {
        stored_from(
            FilesColumns {
                record,
                stat_size: row.get(10),
                stat_mtime_ns: row.get(11),
                stat_ino: row.get(12),
                origin_peer: row.get(13),
                origin_epoch: row.get(14),
            },
            corrupt,
        )
    })
}

/// A row of a JSON page (see `files::json_rows_sql!`): the same columns, BLOBs in hex.
pub(super) fn stored_from_json(
    row: JsonRow<'_>,
    corrupt: impl Fn(&str, &str) -> StoreError,
) -> Result<StoredRecord, StoreError> {
    let (path, kind, deleted, size, mode, hash, version, hlc, node, seq, ss, sm, si, op, oe) = row;
    let hash = match hash {
        None => None,
        Some(h) => Some(from_hex(h).ok_or_else(|| corrupt(&path, "hash"))?),
    };
    let version = from_hex(version).ok_or_else(|| corrupt(&path, "version vector"))?;
    stored_from(
        FilesColumns {
            record: RecordColumns {
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
            stat_size: ss,
            stat_mtime_ns: sm,
            stat_ino: si,
            origin_peer: op,
            origin_epoch: oe,
        },
        corrupt,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_version_vector_and_hex_round_trip() {
        let mut v = VersionVector::new();
        v.bump(NodeId(u64::MAX - 3));
        v.bump(NodeId(7));
        v.bump(NodeId(7));
        let bytes = encode_version(&v);
        assert_eq!(bytes.len(), 32);
        assert_eq!(decode_version(&bytes), Some(v));
        assert_eq!(decode_version(&bytes[..15]), None, "not whole entries");
        let hex: String = bytes.iter().map(|b| format!("{b:02X}")).collect();
        assert_eq!(from_hex(&hex).as_deref(), Some(bytes.as_slice()));
        assert_eq!(
            from_hex(&hex.to_lowercase()).as_deref(),
            Some(bytes.as_slice())
        );
        assert_eq!(from_hex("abc"), None);
        assert_eq!(from_hex("zz"), None);
    }
}
