//! `kill -9` of an agent in the middle of its work: of the receiving side during a large
//! initial sync and during a burst of edits, and of the sending side while large contents are
//! being fetched from it. After every kill, each file at a target path is a complete version
//! the other side wrote (never partial, never foreign); after the restarts the nodes converge,
//! the side that was not killed still has exactly what it wrote (a restarted index that
//! claimed content its disk lacked would have sent deletions), and no temp file is left.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};

use crate::common::*;

/// Waits (bounded) until `node` holds at least `count` files in its two folders.
fn wait_files(node: &Node, count: usize) {
    wait_until(
        SYNC_TIMEOUT,
        format!("node {} to hold {count} files", node.name),
        || tree(&node.synapse()).len() + tree(&node.plans()).len() >= count,
    );
}

/// Every file of `root` is one of `expected`'s, byte for byte.
fn only_complete_files(root: &Path, expected: &BTreeMap<String, [u8; 32]>, when: &str) {
    for (path, hash) in tree(root) {
        assert_eq!(
            expected.get(&path),
            Some(&hash),
            "{when}: {path} under {} is partial or foreign",
            root.display()
        );
    }
}

/// `n` files of `size` pseudo-random bytes under `dir`.
fn large_files(dir: &Path, n: usize, size: usize, seed: u64) {
    std::fs::create_dir_all(dir).expect("mkdir");
    let mut rng = StdRng::seed_from_u64(seed);
    for i in 0..n {
        let mut bytes = vec![0u8; size];
        rng.fill_bytes(&mut bytes);
        std::fs::write(dir.join(format!("blob-{i}.bin")), bytes).expect("write large file");
    }
}

#[test]
fn kill_9_of_the_receiver_during_an_initial_sync_leaves_no_partial_file_and_loses_nothing() {
    let mut cluster = Cluster::full_mesh(2);
    let (a_syn, a_plans) = (cluster[0].synapse(), cluster[0].plans());
    artisync::demo::generate_artifacts(&a_syn, &a_plans, 300, "crash").expect("generate");
    large_files(&a_syn.join("large"), 12, 2 << 20, 1);
    let (want_syn, want_plans) = (tree(&a_syn), tree(&a_plans));
    let total = want_syn.len() + want_plans.len();
    cluster[0].start();
    cluster[1].start();
    // Ten kills spread over the sync, each once the receiver has got further.
    let kills = 10;
    for k in 1..=kills {
        wait_files(&cluster[1], total * k / (kills + 2));
        cluster[1].crash();
        only_complete_files(&cluster[1].synapse(), &want_syn, &format!("kill {k}"));
        only_complete_files(&cluster[1].plans(), &want_plans, &format!("kill {k}"));
        cluster[1].start();
    }
    wait_same_trees(
        SYNC_TIMEOUT,
        "synapse-configs to converge after the kills",
        &cluster.synapse_roots(),
    );
    wait_same_trees(
        SYNC_TIMEOUT,
        "executionplans to converge after the kills",
        &[cluster[0].plans(), cluster[1].plans()],
    );
    cluster[1].wait_in_sync(SYNAPSE);
    cluster[0].wait_in_sync(SYNAPSE);
    assert_eq!(tree(&a_syn), want_syn, "the sender lost or changed files");
    assert_eq!(
        tree(&a_plans),
        want_plans,
        "the sender lost or changed files"
    );
    no_temp_files(&cluster[1].synapse());
    no_temp_files(&cluster[1].plans());
}

#[test]
fn kill_9_of_the_receiver_during_a_burst_of_edits_loses_no_edit() {
    let mut cluster = Cluster::start(2);
    let root = cluster[0].synapse().join("default/api");
    std::fs::create_dir_all(&root).expect("mkdir");
    let paths: Vec<PathBuf> = (0..40).map(|i| root.join(format!("api-{i}.xml"))).collect();
    let mut rng = StdRng::seed_from_u64(16);
    let mut last: BTreeMap<PathBuf, String> = BTreeMap::new();
    let mut version = 0u64;
    let mut edit_some = |rng: &mut StdRng, last: &mut BTreeMap<PathBuf, String>| {
        for _ in 0..rng.random_range(5..25) {
            version += 1;
            let path = &paths[rng.random_range(0..paths.len())];
            let text = format!(
                "<api name=\"x\" v=\"{version}\">{}</api>\n",
                "y".repeat(rng.random_range(0..4000))
            );
            write(path, &text);
            last.insert(path.clone(), text);
        }
    };
    for kill in 0..8 {
        edit_some(&mut rng, &mut last);
        // Let the receiver get some of it, then kill it at a moment of the seed's choosing.
        std::thread::sleep(Duration::from_millis(rng.random_range(5..150)));
        cluster[1].crash();
        edit_some(&mut rng, &mut last);
        for (path, text) in &last {
            let rel = path.strip_prefix(cluster[0].synapse()).expect("below");
            if let Ok(bytes) = std::fs::read(cluster[1].synapse().join(rel)) {
                let s = String::from_utf8_lossy(&bytes);
                assert!(
                    s.starts_with("<api name=\"x\" v=\"") && s.ends_with("</api>\n"),
                    "kill {kill}: {} is partial: {s:?}",
                    rel.display()
                );
            }
            assert_eq!(
                std::fs::read_to_string(path).expect("read the writer's file"),
                *text,
                "kill {kill}: the writer's node changed {}",
                path.display()
            );
        }
        cluster[1].start();
    }
    wait_same_trees(
        SYNC_TIMEOUT,
        "the edits to converge after the kills",
        &cluster.synapse_roots(),
    );
    cluster[1].wait_in_sync(SYNAPSE);
    for (path, text) in &last {
        assert_eq!(
            std::fs::read_to_string(path).expect("read"),
            *text,
            "the writer's last edit of {} was replaced",
            path.display()
        );
    }
    no_temp_files(&cluster[1].synapse());
}

#[test]
fn kill_9_of_the_sender_mid_fetch_leaves_no_partial_file() {
    let mut cluster = Cluster::full_mesh(2);
    let a_syn = cluster[0].synapse();
    // Large enough that they are fetched (not inline) and take a while each.
    large_files(&a_syn.join("large"), 16, 4 << 20, 2);
    let want = tree(&a_syn);
    cluster[0].start();
    cluster[1].start();
    for k in 1..=4 {
        wait_files(&cluster[1], 3 * k);
        cluster[0].crash();
        only_complete_files(&cluster[1].synapse(), &want, &format!("sender kill {k}"));
        cluster[0].start();
    }
    wait_same_trees(
        SYNC_TIMEOUT,
        "the large files to arrive after the sender's restarts",
        &cluster.synapse_roots(),
    );
    cluster[1].wait_in_sync(SYNAPSE);
    assert_eq!(tree(&a_syn), want);
    no_temp_files(&cluster[1].synapse());
}
