//! Plain replication: create, modify, delete, rename, mode changes and directories, between
//! two nodes, in a three-node mesh and along a line of three nodes (relay).

use std::fs::Permissions;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};

use crate::common::*;

fn api(name: &str, extra: &str) -> String {
    format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<api xmlns=\"http://ws.apache.org/ns/synapse\" name=\"{name}\" context=\"/{name}\">\n  <!-- {extra} -->\n</api>\n"
    )
}

#[test]
fn two_nodes_replicate_every_kind_of_change_both_ways() {
    let cluster = Cluster::start(2);
    let (a, b) = (&cluster[0], &cluster[1]);

    // Create on A, with unusual mode bits: B gets identical bytes and mode.
    let rel = "default/api/orders.xml";
    let v1 = api("orders", "v1");
    std::fs::create_dir_all(a.synapse().join("default/api")).expect("mkdir");
    let mut f = std::fs::File::options()
        .create_new(true)
        .write(true)
        .mode(0o640)
        .open(a.synapse().join(rel))
        .expect("create on A");
    f.write_all(v1.as_bytes()).expect("write on A");
    drop(f);
    assert_eq!(mode(&a.synapse().join(rel)), 0o640, "test setup: umask");
    wait_content(&b.synapse().join(rel), v1.as_bytes());
    assert_eq!(mode(&b.synapse().join(rel)), 0o640, "mode bits travel");

    // A mode-only change travels too.
    std::fs::set_permissions(a.synapse().join(rel), Permissions::from_mode(0o600)).expect("chmod");
    wait_for(SYNC_TIMEOUT, "the chmod on A to reach B", || {
        match mode(&b.synapse().join(rel)) {
            0o600 => Ok(()),
            m => Err(format!("mode on B is {m:o}")),
        }
    });

    // Modify on B -> A.
    let v2 = api("orders", "v2, edited on b with a longer comment");
    b.wait_in_sync(SYNAPSE);
    write(&b.synapse().join(rel), &v2);
    wait_content(&a.synapse().join(rel), v2.as_bytes());

    // Delete on A -> gone on B.
    a.wait_in_sync(SYNAPSE);
    std::fs::remove_file(a.synapse().join(rel)).expect("delete on A");
    wait_gone(&b.synapse().join(rel));

    // Rename on B -> A has the new name, not the old one.
    let old = "default/api/pets.xml";
    let new = "default/api/pets_v2.xml";
    let pets = api("pets", "renamed later");
    write(&a.synapse().join(old), &pets);
    wait_content(&b.synapse().join(old), pets.as_bytes());
    b.wait_in_sync(SYNAPSE);
    std::fs::rename(b.synapse().join(old), b.synapse().join(new)).expect("rename on B");
    wait_content(&a.synapse().join(new), pets.as_bytes());
    wait_gone(&a.synapse().join(old));

    // An empty directory replicates, and so does its removal (mkdir on A, rmdir on B).
    let empty = a.synapse().join("default/local-entries");
    std::fs::create_dir(&empty).expect("mkdir on A");
    let on_b = b.synapse().join("default/local-entries");
    wait_until(SYNC_TIMEOUT, "the empty directory to appear on B", || {
        on_b.is_dir()
    });
    b.wait_in_sync(SYNAPSE);
    std::fs::remove_dir(&on_b).expect("rmdir on B");
    wait_gone(&empty);

    wait_same_trees(
        SYNC_TIMEOUT,
        "A and B to end identical",
        &cluster.synapse_roots(),
    );
}

#[test]
fn three_node_mesh_spreads_a_change_from_any_node() {
    let cluster = Cluster::start(3);
    let roots = cluster.synapse_roots();
    let rel = "default/sequences/audit.xml";

    // Created on A.
    let v1 = api("audit", "from a");
    write(&cluster[0].synapse().join(rel), &v1);
    for n in [1, 2] {
        wait_content(&cluster[n].synapse().join(rel), v1.as_bytes());
    }
    // Modified on B.
    let v2 = api("audit", "from b, longer");
    cluster[1].wait_in_sync(SYNAPSE);
    write(&cluster[1].synapse().join(rel), &v2);
    for n in [0, 2] {
        wait_content(&cluster[n].synapse().join(rel), v2.as_bytes());
    }
    // A new file on C, then deleted on C.
    let plan = "throttle.siddhiql";
    write(&cluster[2].plans().join(plan), "@Plan:name('t')\n");
    for n in [0, 1] {
        wait_content(&cluster[n].plans().join(plan), b"@Plan:name('t')\n");
    }
    cluster[2].wait_in_sync(SYNAPSE);
    std::fs::remove_file(cluster[2].synapse().join(rel)).expect("delete on C");
    for n in [0, 1] {
        wait_gone(&cluster[n].synapse().join(rel));
    }
    wait_same_trees(SYNC_TIMEOUT, "the three nodes to end identical", &roots);
}

#[test]
fn line_topology_relays_changes_both_ways() {
    // A peers only B, B peers A and C, C peers only B: A and C never talk directly.
    let cluster = Cluster::start_with(&[&[1], &[0, 2], &[1]]);
    let (a, c) = (&cluster[0], &cluster[2]);

    let from_a = api("relayed_from_a", "a");
    write(&a.synapse().join("default/api/from_a.xml"), &from_a);
    wait_content(
        &c.synapse().join("default/api/from_a.xml"),
        from_a.as_bytes(),
    );

    let from_c = api("relayed_from_c", "c");
    write(&c.synapse().join("default/api/from_c.xml"), &from_c);
    wait_content(
        &a.synapse().join("default/api/from_c.xml"),
        from_c.as_bytes(),
    );

    // A modification and a delete relay as well.
    let edited = api("relayed_from_a", "edited on c");
    c.wait_in_sync(SYNAPSE);
    write(&c.synapse().join("default/api/from_a.xml"), &edited);
    wait_content(
        &a.synapse().join("default/api/from_a.xml"),
        edited.as_bytes(),
    );
    a.wait_in_sync(SYNAPSE);
    std::fs::remove_file(a.synapse().join("default/api/from_c.xml")).expect("delete on A");
    wait_gone(&c.synapse().join("default/api/from_c.xml"));

    wait_same_trees(
        SYNC_TIMEOUT,
        "the line to end identical",
        &cluster.synapse_roots(),
    );
}
