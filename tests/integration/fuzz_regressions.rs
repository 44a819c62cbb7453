//! The fuzz targets' inputs, replayed on stable: every seed in `fuzz/corpus/<target>/` and
//! every input a fuzzer run found in `tests/fuzz/<target>/` goes through the same harness the
//! target runs (`fuzz/src/checks.rs`), so a fixed finding stays fixed without nightly.
//! `write_fuzz_seeds` (ignored) regenerates the seeds; fuzz/README.md says when.

use std::path::{Path, PathBuf};

use artisync::model::{FileRecord, Kind, NodeId, RelPath, Stamp, VersionVector};
use artisync::net::record_to_pb;
use artisync::pb::sync as pb;
use prost::Message;

use crate::fuzz_checks::TARGETS;

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The files of `dir`, sorted; none when it does not exist.
fn inputs(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = match std::fs::read_dir(dir) {
        Ok(entries) => entries
            .map(|e| e.expect("read a directory entry").path())
            .filter(|p| p.is_file())
            .collect(),
        Err(_) => Vec::new(),
    };
    files.sort();
    files
}

#[test]
fn every_seed_and_every_found_input_passes_its_fuzz_harness() {
    for (target, check) in TARGETS {
        let seeds = inputs(&repo().join("fuzz/corpus").join(target));
        assert!(!seeds.is_empty(), "fuzz/corpus/{target} has no seeds");
        for file in seeds
            .iter()
            .chain(&inputs(&repo().join("tests/fuzz").join(target)))
        {
            let data = std::fs::read(file).expect("read a fuzz input");
            let outcome = std::panic::catch_unwind(|| check(&data));
            assert!(outcome.is_ok(), "{target}: {} fails", file.display());
        }
    }
}

fn record(
    path: &str,
    kind: Kind,
    deleted: bool,
    content: &[u8],
    counters: &[(u64, u64)],
) -> FileRecord {
    let live_file = !deleted && kind == Kind::File;
    FileRecord {
        path: RelPath::new(path).expect("valid"),
        kind,
        deleted,
        size: if live_file { content.len() as u64 } else { 0 },
        mode: if kind == Kind::Dir { 0o755 } else { 0o644 },
        hash: live_file.then(|| *blake3::hash(content).as_bytes()),
        version: VersionVector::from_entries(counters.iter().map(|&(n, c)| (NodeId(n), c))),
        stamp: Stamp {
            hlc: counters.iter().map(|&(_, c)| c).max().unwrap_or(1),
            node: NodeId(counters.first().map_or(1, |&(n, _)| n)),
        },
        seq: 7,
    }
}

/// Regenerates the seed files of every target (`seed-*`) from realistic inputs:
/// `cargo test --test integration write_fuzz_seeds -- --ignored`.
#[test]
#[ignore = "writes fuzz/corpus; run by hand"]
fn write_fuzz_seeds() {
    let hlc = 1_767_225_600_000u64 << 16;
    let api = artisync::artifacts::wso2::testing::api_xml("admin--PizzaShackAPI:v1.0.0", "t1");
    let batch = |records: Vec<pb::Record>| {
        pb::IndexBatch {
            node_id: 2,
            node_name: "gw2".into(),
            folder: "synapse-configs".into(),
            epoch: 1,
            up_to_seq: 9,
            max_seq: 9,
            records,
        }
        .encode_to_vec()
    };
    let a = record(
        "default/api/a.xml",
        Kind::File,
        false,
        api.as_bytes(),
        &[(2, hlc)],
    );
    let a_concurrent = record(
        "default/api/a.xml",
        Kind::File,
        false,
        b"<api name=\"a\"/>",
        &[(3, hlc + 1)],
    );
    let dir = record("default/api", Kind::Dir, false, b"", &[(2, hlc)]);
    let gone = record(
        "default/sequences/old.xml",
        Kind::File,
        true,
        b"",
        &[(2, hlc), (1, hlc - 5)],
    );
    let big = record(
        "plans/big.siddhiql",
        Kind::File,
        false,
        &[b'x'; 4096],
        &[(2, hlc)],
    );
    let seeds: Vec<(&str, &str, Vec<u8>)> = vec![
        ("path", "seed-api", b"default/api/admin--PizzaShackAPI_v1.0.0.xml".to_vec()),
        ("path", "seed-top", b"executionplan.siddhiql".to_vec()),
        ("path", "seed-escape", b"default/../../etc/passwd".to_vec()),
        ("path", "seed-temp", b"default/api/.artisync.x.xml.tmp".to_vec()),
        ("path", "seed-name", b"admin--PizzaShackAPI:v1.0.0".to_vec()),
        (
            "peer_batch",
            "seed-inline",
            batch(vec![
                record_to_pb(&dir, None),
                record_to_pb(&a, Some(api.as_bytes().to_vec())),
                record_to_pb(&gone, None),
            ]),
        ),
        ("peer_batch", "seed-fetch", batch(vec![record_to_pb(&big, None)])),
        (
            "peer_batch",
            "seed-concurrent",
            batch(vec![
                record_to_pb(&a, None),
                record_to_pb(&a_concurrent, Some(b"<api name=\"a\"/>".to_vec())),
            ]),
        ),
        (
            "config",
            "seed-minimal",
            b"node = \"gw1\"\nlisten = \"127.0.0.1:7701\"\nstate_dir = \"/var/tmp/artisync-fuzz/state\"\n\n[[folder]]\nid = \"synapse-configs\"\npath = \"/tmp\"\nignore = [\"*.bak\", \"default/tmp/*\"]\n".to_vec(),
        ),
        (
            "config",
            "seed-peers-retriever",
            b"node = \"gw1\"\nlisten = \"127.0.0.1:7701\"\nstate_dir = \"/var/tmp/artisync-fuzz/state\"\nquiet_period_ms = 50\ntombstone_ttl_days = 30\n\n[[folder]]\nid = \"synapse-configs\"\npath = \"/tmp\"\nxml_gate = true\n\n[[peer]]\nname = \"gw2\"\naddress = \"http://127.0.0.1:7702\"\n\n[[peer]]\nname = \"gw3\"\naddress = \"http://[::1]:7703\"\n\n[retriever]\nartifact_retriever = \"db\"\ndatabase_url = \"sqlite:///var/tmp/artisync-fuzz/am.db\"\nschema = \"wso2-apim-3.2\"\nfolder = \"synapse-configs\"\ngateway_labels = [\"Production and Sandbox\"]\ndata_retrieval_mode = \"sync\"\n".to_vec(),
        ),
        ("xml_gate", "seed-api", api.clone().into_bytes()),
        (
            "xml_gate",
            "seed-entities",
            b"<?xml version=\"1.0\"?>\n<!-- c --><!DOCTYPE x><localEntry key=\"k\"><![CDATA[<x>]]>&amp;&#x41;<?pi x?></localEntry>\n".to_vec(),
        ),
        ("xml_gate", "seed-broken", b"<api><resource></api>".to_vec()),
        (
            "wso2_render",
            "seed-pizzashack",
            artisync::artifacts::wso2::testing::gateway_api_json(
                "6f1c2a9e-3b1d-4c2e-9a8f-0d1e2f3a4b5c",
                "admin--PizzaShackAPI:v1.0.0",
                "t1",
            ),
        ),
        (
            "wso2_render",
            "seed-default-version",
            serde_json::json!({
                "apiDefinition": api,
                "defaultAPIDefinition": "<api xmlns=\"http://ws.apache.org/ns/synapse\" name=\"admin--PizzaShackAPI\" context=\"/pizzashack\"/>",
                "sequenceToBeAdd": null,
                "localEntriesToBeAdd": [{"name": "k", "content": "<localEntry key=\"k\"/>"}],
            })
            .to_string()
            .into_bytes(),
        ),
    ];
    for (target, name, data) in seeds {
        let dir = repo().join("fuzz/corpus").join(target);
        std::fs::create_dir_all(&dir).expect("mkdir");
        std::fs::write(dir.join(name), data).expect("write a seed");
    }
}
