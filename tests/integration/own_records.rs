//! A node does not stream a peer's own records back to it, and still moves the peer's cursor
//! past them; a peer that lost its index (a new epoch) gets everything again.
//!
//! Observed through `artisync status --json` on the subscriber: per peer and folder,
//! `received` counts the batches and records that came from that peer, and `applied_seq` is the
//! peer's index sequence applied up to (this node's cursor into it).

use std::time::Duration;

use serde_json::Value;

use crate::common::*;

/// Ten files, plus the directories `default` and `default/api`.
const ENTRIES: u64 = 12;

fn write_tree(root: &std::path::Path) {
    for i in 0..10 {
        write(
            &root.join(format!("default/api/api{i}.xml")),
            format!("<api name=\"api{i}\"/>\n"),
        );
    }
}

/// What `node` reports of `peer` for the synapse folder: (applied_seq, batches, records).
fn view_of(node: &Node, peer: &str) -> (Option<u64>, u64, u64, Value) {
    let p = node.peer_status(peer);
    let applied = p["applied_seq"][SYNAPSE].as_u64();
    let received = &p["received"][SYNAPSE];
    let batches = received["batches"].as_u64().unwrap_or(0);
    let records = received["records"].as_u64().unwrap_or(0);
    (applied, batches, records, p)
}

/// Waits until `node` has applied `peer`'s index of the synapse folder up to `seq`, with
/// nothing left behind; returns the batches and records received from it so far.
fn wait_applied(node: &Node, peer: &Node, seq: u64) -> (u64, u64) {
    wait_for(
        SYNC_TIMEOUT,
        format!("{}'s cursor into {} to reach {seq}", node.name, peer.name),
        || {
            let (applied, batches, records, p) = view_of(node, &peer.name);
            let peer_seq = peer.seq(SYNAPSE);
            if peer_seq == seq && applied == Some(seq) && p["behind"][SYNAPSE] == 0 {
                Ok((batches, records))
            } else {
                Err(format!("{}'s seq {peer_seq}; view of it: {p}", peer.name))
            }
        },
    )
}

/// A's files reach B; B then holds A's records, sends none of them back, and still brings
/// A's cursor into B up to B's seq (in batches without records). A later change made on B
/// does travel, as one record.
#[test]
fn a_peer_is_not_sent_its_own_records_and_its_cursor_catches_up() {
    let mut cluster = Cluster::full_mesh(2);
    write_tree(&cluster[0].synapse());
    cluster[0].start();
    assert_eq!(cluster[0].seq(SYNAPSE), ENTRIES);
    cluster[1].start();
    let (a, b) = (&cluster[0], &cluster[1]);
    wait_same_trees(
        SYNC_TIMEOUT,
        "A's files to reach B",
        &cluster.synapse_roots(),
    );

    let (batches, records) = wait_applied(a, b, ENTRIES);
    assert_eq!(
        records,
        0,
        "B sent A records of A's own ({batches} batches); B's log:\n{}",
        b.log_tail()
    );
    let (_, _, from_a, _) = view_of(b, "a");
    assert!(from_a >= ENTRIES, "B counted {from_a} records from A");
    // Caught up, B waits for its next commit: no stream of empty batches.
    holds_for(
        Duration::from_millis(300),
        "no more batches from an idle B",
        || match view_of(a, "b") {
            (_, now, 0, _) if now == batches => Ok(()),
            (_, now, r, _) => Err(format!("{now} batches, {r} records; was {batches}, 0")),
        },
    );

    write(&b.synapse().join("marker.txt"), "marker\n");
    wait_content(&a.synapse().join("marker.txt"), b"marker\n");
    let (_, records) = wait_applied(a, b, ENTRIES + 1);
    assert_eq!(records, 1, "only B's own change travels from B to A");
}

/// A loses its index and its files: its folder has a new epoch, so B, which took all of A's
/// records from A, sends them all back (the contents, too: with the node id kept they carry
/// A's node id, and travel by fetch instead of inline).
fn a_peer_that_lost_its_index_gets_everything_back(keep_node_id: bool) {
    let mut cluster = Cluster::full_mesh(2);
    write_tree(&cluster[0].synapse());
    cluster[0].start();
    cluster[1].start();
    wait_same_trees(
        SYNC_TIMEOUT,
        "A's files to reach B",
        &cluster.synapse_roots(),
    );
    let (_, records) = wait_applied(&cluster[0], &cluster[1], ENTRIES);
    assert_eq!(records, 0, "B left A's own records out before the loss");
    let epoch = cluster[0].folder_status(SYNAPSE)["epoch"].clone();
    let node_id = cluster[0].status_json()["node_id"].clone();

    cluster[0].stop();
    let state = cluster[0].state_dir();
    for name in ["index.db", "index.db-wal", "index.db-shm"] {
        match std::fs::remove_file(state.join(name)) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => panic!("remove {name}: {e}"),
        }
    }
    if !keep_node_id {
        std::fs::remove_file(state.join("node_id")).expect("remove node_id");
    }
    let root = cluster[0].synapse();
    std::fs::remove_dir_all(&root).expect("empty A's folder");
    std::fs::create_dir_all(&root).expect("recreate A's folder");
    cluster[0].start();

    let a = &cluster[0];
    assert_ne!(
        a.folder_status(SYNAPSE)["epoch"],
        epoch,
        "a new index has a new epoch"
    );
    assert_eq!(a.status_json()["node_id"] == node_id, keep_node_id);
    wait_same_trees(
        SYNC_TIMEOUT,
        "B's copy of everything to reach A again",
        &cluster.synapse_roots(),
    );
    let (_, records) = wait_applied(a, &cluster[1], ENTRIES);
    assert_eq!(records, ENTRIES, "B sent A every record again");
}

#[test]
fn a_peer_that_lost_its_index_but_kept_its_node_id_gets_everything_back() {
    a_peer_that_lost_its_index_gets_everything_back(true);
}

#[test]
fn a_peer_that_lost_its_index_and_node_id_gets_everything_back() {
    a_peer_that_lost_its_index_gets_everything_back(false);
}

/// What a power loss can leave behind, simulated on a stopped A: its running marker names
/// another boot (it did not stop cleanly), and its index lost its last commits: the record of
/// `api3.xml` (whose bytes never reached the disk either) and its cursor into B. A's folders
/// take new epochs, so B, which holds `api3.xml` as A's own record, sends it back; with the
/// epoch kept, B would leave it out for good. Before that, a marker of the current boot (a
/// process that died on a running machine, which loses no commit) keeps the epochs.
#[test]
fn a_node_whose_machine_went_down_while_it_ran_takes_new_epochs_and_gets_its_lost_records_back() {
    let mut cluster = Cluster::full_mesh(2);
    write_tree(&cluster[0].synapse());
    cluster[0].start();
    cluster[1].start();
    wait_same_trees(
        SYNC_TIMEOUT,
        "A's files to reach B",
        &cluster.synapse_roots(),
    );
    wait_applied(&cluster[0], &cluster[1], ENTRIES);
    let epoch = cluster[0].folder_status(SYNAPSE)["epoch"].clone();
    let b_epoch = cluster[1].folder_status(SYNAPSE)["epoch"]
        .as_u64()
        .expect("B's epoch");
    let marker = cluster[0].state_dir().join("running");
    cluster[0].stop();
    assert!(!marker.exists(), "a clean stop removes the running marker");

    let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").expect("boot id");
    std::fs::write(&marker, boot).expect("a marker of this boot");
    cluster[0].start();
    assert!(marker.exists(), "a running agent has its marker");
    assert_eq!(
        cluster[0].folder_status(SYNAPSE)["epoch"],
        epoch,
        "same boot"
    );
    let (_, records) = wait_applied(&cluster[0], &cluster[1], ENTRIES);
    assert_eq!(records, 0, "B still leaves A's records out");
    cluster[0].stop();

    let lost = "default/api/api3.xml";
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        use artisync::store::{Cursor, Store};
        let store = Store::open(&cluster[0].state_dir())
            .await
            .expect("A's index");
        let path = artisync::model::RelPath::new(lost).expect("valid");
        store.remove(SYNAPSE, &[path]).await.expect("lose a record");
        let cursor = Cursor {
            epoch: b_epoch,
            seq: 0,
        };
        store
            .commit(
                SYNAPSE,
                &[],
                Some(("b", cursor)),
                &artisync::store::SkipChanges::default(),
            )
            .await
            .expect("lose the cursor's progress");
    });
    std::fs::remove_file(cluster[0].synapse().join(lost)).expect("lose the bytes");
    std::fs::write(&marker, "00000000-0000-0000-0000-000000000000\n").expect("another boot");
    cluster[0].start();

    assert_ne!(
        cluster[0].folder_status(SYNAPSE)["epoch"],
        epoch,
        "new epoch"
    );
    wait_content(&cluster[0].synapse().join(lost), b"<api name=\"api3\"/>\n");
    wait_same_trees(SYNC_TIMEOUT, "A and B to agree", &cluster.synapse_roots());
}
