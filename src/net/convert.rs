//! Records to and from the wire: every field from a peer checked before the model sees it.

use crate::engine::{Incoming, Inline};
use crate::model::{
    FileRecord, Hash, Kind, MAX_CLOCK_VALUE, NodeId, RelPath, Stamp, VersionVector,
};
use crate::pb::sync as pb;

/// Most entries a version vector from a peer may have (one per node that ever wrote the path;
/// a record with more is refused, so it can never make a batch too large to relay).
pub const MAX_VERSION_ENTRIES: usize = 1024;
/// Largest file a peer may announce (1 TiB).
const MAX_FILE_BYTES: u64 = 1 << 40;

// ---------------------------------------------------------------- conversions

/// Converts a model record to the wire.
pub fn record_to_pb(r: &FileRecord, inline: Option<Vec<u8>>) -> pb::Record {
    pb::Record {
        path: r.path.to_string(),
        kind: match r.kind {
            Kind::File => pb::Kind::File as i32,
            Kind::Dir => pb::Kind::Dir as i32,
        },
        deleted: r.deleted,
        size: r.size,
        mode: r.mode,
        hash: r.hash.map(|h| h.to_vec()).unwrap_or_default(),
        version: r
            .version
            .entries()
            .map(|(n, c)| pb::VersionEntry {
                node: n.0,
                counter: c,
            })
            .collect(),
        stamp_hlc: r.stamp.hlc,
        stamp_node: r.stamp.node.0,
        seq: r.seq,
        inline_data: inline.map(bytes::Bytes::from),
    }
}

/// Validates and converts a record from a peer. The error says what is wrong with it.
pub fn record_from_pb(p: pb::Record) -> Result<Incoming, String> {
    let path = RelPath::new(&p.path).map_err(|e| e.to_string())?;
    let kind = match pb::Kind::try_from(p.kind) {
        Ok(pb::Kind::File) => Kind::File,
        Ok(pb::Kind::Dir) => Kind::Dir,
        Err(_) => return Err(format!("{path}: unknown kind {}", p.kind)),
    };
    let hash: Option<Hash> = if p.hash.is_empty() {
        None
    } else {
        Some(
            p.hash
                .as_slice()
                .try_into()
                .map_err(|_| format!("{path}: hash is {} bytes, not 32", p.hash.len()))?,
        )
    };
    if !p.deleted && kind == Kind::File && hash.is_none() {
        return Err(format!("{path}: live file without a hash"));
    }
    if p.mode > 0o7777 {
        return Err(format!("{path}: mode {:o} out of range", p.mode));
    }
    // Counters of 0 are no entries: a vector of only those would compare equal to anything
    // new, and the record would be ignored or taken at random.
    if p.version.iter().all(|e| e.counter == 0) {
        return Err(format!("{path}: empty version vector"));
    }
    if p.version.len() > MAX_VERSION_ENTRIES {
        return Err(format!(
            "{path}: version vector of {} entries (at most {MAX_VERSION_ENTRIES})",
            p.version.len()
        ));
    }
    // The largest stamp or counter taken from a peer. One gap remains, by construction: a
    // record crafted just under the cap makes this node's next write of that path (stamped
    // one past it) go over it, and peers refuse that write. No wrong clock gets there (the cap
    // is about the year 4200); only a peer that forges records does, and with `[tls]` such a
    // peer holds a cluster certificate.
    if p.stamp_hlc > MAX_CLOCK_VALUE || p.version.iter().any(|e| e.counter > MAX_CLOCK_VALUE) {
        return Err(format!(
            "{path}: stamp or version counter beyond the clock's range (a hostile or broken peer)"
        ));
    }
    if !p.deleted && kind == Kind::File && p.size > MAX_FILE_BYTES {
        return Err(format!("{path}: declared size {} is absurd", p.size));
    }
    // Only permission bits, and always readable and writable (directories also searchable)
    // by the agent itself: a peer never sets setuid, setgid or sticky bits here, nor locks
    // this node out of its own files. Directories and tombstones carry no size.
    let (mode, size) = match (p.deleted, kind) {
        (true, _) => (0, 0),
        (false, Kind::Dir) => (p.mode & 0o777 | 0o700, 0),
        (false, Kind::File) => (p.mode & 0o777 | 0o600, p.size),
    };
    if let Some(data) = &p.inline_data {
        if data.len() as u64 != p.size {
            return Err(format!(
                "{path}: inline content is {} bytes, record says {}",
                data.len(),
                p.size
            ));
        }
    }
    // Inline bytes that do not hash to the record's hash are dropped: the engine then fetches
    // the content by hash, which fails (and is retried) if the peer no longer has it.
    // Only a live file has content: whatever else a tombstone or a directory carries is
    // dropped.
    let live_file = !p.deleted && kind == Kind::File;
    let hash = hash.filter(|_| live_file);
    let inline = match (p.inline_data, &hash) {
        (Some(data), Some(h)) => Inline::verified(data, h),
        _ => None,
    };
    Ok(Incoming {
        record: FileRecord {
            path,
            kind,
            deleted: p.deleted,
            size,
            mode,
            hash,
            version: VersionVector::from_entries(
                p.version.iter().map(|e| (NodeId(e.node), e.counter)),
            ),
            stamp: Stamp {
                hlc: p.stamp_hlc,
                node: NodeId(p.stamp_node),
            },
            seq: p.seq,
        },
        inline,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::model::sample_record as sample;

    #[test]
    fn records_round_trip_through_the_wire() {
        let r = sample();
        let back = record_from_pb(record_to_pb(&r, Some(b"<a/>".to_vec()))).expect("valid");
        assert!(back.record.same_version(&r));
        assert_eq!(back.record.seq, 7);
        assert_eq!(
            back.inline.as_ref().map(Inline::as_bytes),
            Some(&b"<a/>"[..])
        );
        // Bytes of the right size but other content do not travel on as verified.
        let forged = record_from_pb(record_to_pb(&r, Some(b"<b/>".to_vec()))).expect("valid");
        assert!(forged.inline.is_none());
    }

    #[test]
    fn hostile_records_are_refused() {
        let good = record_to_pb(&sample(), None);
        let cases: Vec<(pb::Record, &str)> = vec![
            (
                pb::Record {
                    path: "../../etc/passwd".into(),
                    ..good.clone()
                },
                "component",
            ),
            (
                pb::Record {
                    path: "/etc/passwd".into(),
                    ..good.clone()
                },
                "absolute",
            ),
            (
                pb::Record {
                    path: "a/\0b".into(),
                    ..good.clone()
                },
                "NUL",
            ),
            (
                pb::Record {
                    hash: vec![1, 2, 3],
                    ..good.clone()
                },
                "32",
            ),
            (
                pb::Record {
                    hash: vec![],
                    ..good.clone()
                },
                "without a hash",
            ),
            (
                pb::Record {
                    kind: 9,
                    ..good.clone()
                },
                "kind",
            ),
            (
                pb::Record {
                    mode: 0o100000,
                    ..good.clone()
                },
                "mode",
            ),
            (
                pb::Record {
                    version: vec![],
                    ..good.clone()
                },
                "version",
            ),
            (
                pb::Record {
                    inline_data: Some(vec![0; 10].into()),
                    ..good.clone()
                },
                "inline",
            ),
        ];
        for (rec, expect) in cases {
            let path = rec.path.clone();
            match record_from_pb(rec) {
                Ok(_) => panic!("{path}: accepted, expected refusal mentioning {expect}"),
                Err(e) => assert!(e.contains(expect), "{e} should mention {expect}"),
            }
        }
    }

    mod arbitrary_records {
        use super::*;
        use proptest::prelude::*;

        fn any_path() -> impl Strategy<Value = String> {
            prop_oneof![
                "[a-z./]{0,24}",
                "(\\.\\.|/|[a-z]{1,3}|\\x00|\\.){1,8}",
                Just("a".repeat(4000)),
            ]
        }

        fn any_record() -> impl Strategy<Value = pb::Record> {
            (
                (
                    any_path(),
                    -2i32..4,
                    any::<bool>(),
                    any::<u64>(),
                    any::<u32>(),
                ),
                prop::collection::vec(any::<u8>(), 0..40),
                prop::collection::vec((any::<u64>(), any::<u64>()), 0..6),
                (any::<u64>(), any::<u64>(), any::<u64>()),
                prop::option::of(prop::collection::vec(any::<u8>(), 0..48)),
                any::<bool>(),
            )
                .prop_map(
                    |((path, kind, deleted, size, mode), hash, version, stamps, inline, honest)| {
                        let (stamp_hlc, stamp_node, seq) = stamps;
                        let mut r = pb::Record {
                            path,
                            kind,
                            deleted,
                            size,
                            mode,
                            hash,
                            version: version
                                .into_iter()
                                .map(|(node, counter)| pb::VersionEntry { node, counter })
                                .collect(),
                            stamp_hlc,
                            stamp_node,
                            seq,
                            inline_data: inline.map(bytes::Bytes::from),
                        };
                        // Half the cases are made consistent where it is cheap, so the
                        // accepting side is explored as well as the refusing one.
                        if honest {
                            if let Some(data) = &r.inline_data {
                                r.size = data.len() as u64;
                                r.hash = blake3::hash(data).as_bytes().to_vec();
                            }
                            r.stamp_hlc >>= 3;
                            for e in &mut r.version {
                                e.counter >>= 3;
                            }
                            r.mode &= 0o7777;
                        }
                        r
                    },
                )
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(2000))]

            /// Whatever a peer sends, the conversion never panics, and what it accepts keeps
            /// every rule the rest of the node relies on.
            #[test]
            fn any_record_from_a_peer_is_refused_or_sound(p in any_record()) {
                let sent = p.clone();
                match record_from_pb(p) {
                    Err(e) => prop_assert!(!e.is_empty()),
                    Ok(Incoming { record: r, inline }) => {
                        prop_assert_eq!(r.path.as_str(), sent.path.as_str());
                        prop_assert!(RelPath::new(r.path.as_str()).is_ok());
                        prop_assert!(r.stamp.hlc <= MAX_CLOCK_VALUE);
                        prop_assert!(r.version.entries().count() <= MAX_VERSION_ENTRIES);
                        prop_assert!(r.version.entries().all(|(_, c)| c <= MAX_CLOCK_VALUE));
                        prop_assert!(r.version.entries().count() > 0, "a version to compare");
                        prop_assert_eq!(r.mode & !0o777, 0, "only permission bits");
                        if !r.deleted {
                            let owner = if r.kind == Kind::Dir { 0o700 } else { 0o600 };
                            prop_assert_eq!(r.mode & owner, owner);
                        }
                        if r.is_live_file() {
                            prop_assert!(r.hash.is_some());
                            prop_assert!(r.size <= MAX_FILE_BYTES);
                        } else {
                            prop_assert_eq!(r.size, 0);
                        }
                        if let Some(i) = inline {
                            prop_assert_eq!(Some(*i.hash()), r.hash);
                            prop_assert_eq!(*blake3::hash(i.as_bytes()).as_bytes(), *i.hash());
                            prop_assert_eq!(i.as_bytes().len() as u64, r.size);
                        }
                    }
                }
            }
        }
    }
}
