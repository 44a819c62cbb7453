//! The fuzz harnesses' bodies: each takes the raw input, drives one of artisync's real entry
//! points with it, and asserts what must hold for any input (no panic, and the invariants
//! named below). Shared, as this one file, by the `cargo fuzz` targets (nightly, `fuzz/`) and
//! by the regression tests (`tests/integration/fuzz_regressions.rs`, stable `cargo test`),
//! which replay the seeds in `fuzz/corpus/` and the inputs the fuzzer found in `tests/fuzz/`.
//!
//! It uses only artisync's public API, `prost` and `serde_json`, so it compiles in both crates.

use std::path::{Component, Path};

use artisync::config::Config;
use artisync::model::{Decision, FileRecord, MAX_PATH_BYTES, NodeId, RelPath, Replica};
use artisync::net::{record_from_pb, record_to_pb};
use artisync::pb::sync as pb;
use prost::Message;

/// One harness: takes the fuzzer's input, panics on a finding.
pub type Check = fn(&[u8]);

/// The targets, by the name of their `fuzz/fuzz_targets/<name>.rs` and corpus directory.
pub const TARGETS: &[(&str, Check)] = &[
    ("path", path),
    ("peer_batch", peer_batch),
    ("config", config),
    ("xml_gate", xml_gate),
    ("wso2_render", wso2_render),
];

/// A path from a peer, a DB row or the file system: `RelPath::new`, and what the rest of the
/// code relies on once it holds one (joined to a root it stays below it; its parent, name and
/// depth agree with it), plus the checks that run on every path (ignore rules, the XML gate's
/// choice) and Synapse's file naming of a WSO2 entry name.
pub fn path(data: &[u8]) {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    let _ = artisync::fs::xml::is_gated(s);
    if let Ok(file) = artisync::artifacts::wso2::synapse_file_name(s) {
        assert!(file.ends_with(".xml") && !file.contains('/'), "{file:?}");
        assert!(file.len() <= 255, "{} bytes", file.len());
    }
    let p = match RelPath::new(s) {
        Ok(p) => p,
        Err(e) => {
            let _ = e.to_string();
            return;
        }
    };
    assert_eq!(p.as_str(), s);
    assert!(s.len() <= MAX_PATH_BYTES);
    let root = Path::new("/srv/folder");
    let joined = root.join(p.as_str());
    assert!(joined.starts_with(root), "{joined:?}");
    assert!(
        Path::new(p.as_str())
            .components()
            .all(|c| matches!(c, Component::Normal(_))),
        "{s:?} has a component that is not a name"
    );
    assert_eq!(
        Path::new(p.as_str()).components().count(),
        p.depth(),
        "{s:?}"
    );
    let name = p.file_name();
    assert!(!name.is_empty() && !name.contains('/'), "{s:?}");
    match p.parent() {
        Some(parent) => {
            assert_eq!(RelPath::new(parent.as_str()).as_ref(), Ok(&parent));
            assert!(p.starts_with(&parent) && !parent.starts_with(&p));
            assert_eq!(parent.depth() + 1, p.depth());
            assert_eq!(format!("{parent}/{name}"), s);
        }
        None => assert_eq!(p.depth(), 1),
    }
    let _ = PATH_IGNORE.is_ignored(&p);
}

/// Built once: building the glob sets per input made `path` 20x slower.
static PATH_IGNORE: std::sync::LazyLock<artisync::fs::ignore::Ignore> =
    std::sync::LazyLock::new(|| {
        artisync::fs::ignore::Ignore::new(&["*.bak".into(), "default/tmp/*".into()])
            .expect("fixed globs")
    });

/// Node the replica of [`peer_batch`] runs as, and the wall time it runs at (ms).
const HERE: NodeId = NodeId(0x5eed);
const NOW_MS: u64 = 1_767_225_600_000;

/// An `IndexBatch` from a peer, as the session and the model take it: every record through
/// `net::record_from_pb` (what it accepts converts back to the wire and is accepted again,
/// unchanged), then the accepted ones through the replica's `receive`, committing what it
/// decides, as the engine does. Delivering the same batch again must then change nothing (a
/// peer resends batches after a reconnect).
pub fn peer_batch(data: &[u8]) {
    let Ok(batch) = pb::IndexBatch::decode(data) else {
        return;
    };
    let mut accepted: Vec<FileRecord> = Vec::new();
    for p in batch.records {
        let Ok(inc) = record_from_pb(p) else {
            continue;
        };
        let r = &inc.record;
        assert!(r.mode <= 0o7777, "{r:?}");
        assert!(r.version.entries().any(|(_, c)| c > 0), "{r:?}");
        if r.is_live_file() {
            assert!(r.hash.is_some(), "{r:?}");
        } else {
            assert!(r.hash.is_none() && r.size == 0, "{r:?}");
        }
        if let Some(inline) = &inc.inline {
            assert_eq!(Some(inline.hash()), r.hash.as_ref());
            assert_eq!(inline.as_bytes().len() as u64, r.size);
        }
        let inline = inc.inline.as_ref().map(|i| i.as_bytes().to_vec());
        let again = record_from_pb(record_to_pb(r, inline.clone()))
            .expect("a record the edge accepted is accepted again from the wire");
        assert_eq!(&again.record, r);
        assert_eq!(again.inline.map(|i| i.as_bytes().to_vec()), inline);
        accepted.push(inc.record);
    }
    let mut replica = Replica::new(HERE);
    for round in 0..2 {
        for remote in &accepted {
            match replica.receive(remote, NOW_MS) {
                Decision::Ignore => {}
                Decision::Store(record) | Decision::Apply { record, .. } => {
                    assert_eq!(
                        round, 0,
                        "the same batch delivered twice changed {record:?}"
                    );
                    assert_eq!(record.path, remote.path);
                    replica.commit(record);
                }
            }
        }
    }
    for r in replica.records() {
        assert!(accepted.iter().any(|a| a.path == r.path));
    }
}

/// A config file, as `artisync check-config` and `artisync run` take it: `Config::parse`
/// (TOML, then `validate`), and for a config it accepts, everything the daemon derives from it
/// before starting (durations, the engines' options and ignore rules, peer addresses): a
/// config that checks must start.
pub fn config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let config = match Config::parse(text, Path::new("fuzz.toml")) {
        Ok(c) => c,
        Err(e) => {
            let _ = e.to_string();
            return;
        }
    };
    let _ = (
        config.rescan_interval(),
        config.quiet_period(),
        config.open_write_hold(),
        config.tombstone_ttl(),
        config.admin_socket(),
    );
    let names = artisync::engine::NodeNames::default();
    let _ = artisync::engine::engine_options(&config, NodeId(1), names, Default::default());
    for f in &config.folders {
        if let Err(e) = artisync::engine::folder_ignore(f) {
            panic!(
                "folder {:?} passed validation but its ignore rules fail: {e}",
                f.id
            );
        }
    }
    for p in &config.peers {
        let address = p
            .address
            .as_deref()
            .expect("validated: every peer has an address");
        config
            .check_address("peer.address", address)
            .expect("validated address");
        artisync::config::parse_peer_address(address).expect("validated address");
    }
}

/// A file the XML gate looks at: `fs::xml::check_well_formed` on any bytes.
pub fn xml_gate(data: &[u8]) {
    if let Err(problem) = artisync::fs::xml::check_well_formed(data) {
        assert!(!problem.is_empty());
    }
}

/// WSO2's `ARTIFACT` column: `artifacts::wso2::render` on any bytes. What it renders is a set
/// of well-formed XML files, each directly in one of Synapse's four directories, with a name
/// the sync engine would ship.
pub fn wso2_render(data: &[u8]) {
    let Ok(bundle) = artisync::artifacts::wso2::render(data) else {
        return;
    };
    let dirs = [
        artisync::artifacts::wso2::API_DIR,
        artisync::artifacts::wso2::SEQUENCES_DIR,
        artisync::artifacts::wso2::ENDPOINTS_DIR,
        artisync::artifacts::wso2::LOCAL_ENTRIES_DIR,
    ];
    let ignore = artisync::fs::ignore::Ignore::new(&[]).expect("no globs");
    let mut last: Option<&RelPath> = None;
    for f in &bundle.files {
        let path = f.path.as_str();
        let parent = f.path.parent().map(|p| p.to_string()).unwrap_or_default();
        assert!(dirs.contains(&parent.as_str()), "{path:?}");
        assert!(path.ends_with(".xml"), "{path:?}");
        assert!(!ignore.is_ignored(&f.path), "{path:?}");
        assert!(
            last.is_none_or(|l| l < &f.path),
            "{path:?} unsorted or twice"
        );
        artisync::fs::xml::check_well_formed(&f.data).expect("rendered files are well-formed");
        last = Some(&f.path);
    }
}
