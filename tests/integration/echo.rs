//! A node's own writes (the files it applies for a peer) never come back as new local versions.

use std::time::Duration;

use crate::common::*;

/// How this is measured: a folder's `seq` (in `artisync status --json`) grows by exactly one
/// for every record the node commits, local or remote. The files are written before A starts,
/// so A's initial scan records each path exactly once: A's seq = N (files + dirs). B starts
/// empty and applies A's N records: B's seq = N. If B's watcher treated the files it wrote as
/// local edits ("echo"), B would commit extra versions (B's seq > N), and A would take those
/// in as well (A's seq > N). A marker written on B afterwards and seen arriving on A bounds the
/// time: B's watcher handled the applied files' events (25 ms quiet period) long before it
/// shipped the marker; both seqs must then be exactly N + 1, and stay there.
#[test]
fn applied_files_do_not_echo_back_as_new_versions() {
    let mut cluster = Cluster::full_mesh(2);
    let ra = cluster[0].synapse();
    for i in 0..10 {
        write(
            &ra.join(format!("default/api/api{i}.xml")),
            format!("<api name=\"api{i}\"/>\n"),
        );
    }
    let entries = 10 + 2; // ten files, plus the directories `default` and `default/api`
    cluster[0].start();
    assert_eq!(
        cluster[0].seq(SYNAPSE),
        entries,
        "A's initial scan records each path once"
    );
    cluster[1].start();
    let (a, b) = (&cluster[0], &cluster[1]);
    wait_same_trees(
        SYNC_TIMEOUT,
        "the files to reach B",
        &cluster.synapse_roots(),
    );
    wait_for(SYNC_TIMEOUT, "B's index to hold every entry", || {
        let f = b.folder_status(SYNAPSE);
        let n = f["files"].as_u64().unwrap_or(0) + f["dirs"].as_u64().unwrap_or(0);
        if n == entries {
            Ok(())
        } else {
            Err(format!("{f}"))
        }
    });

    write(&b.synapse().join("marker.txt"), "marker\n");
    wait_content(&a.synapse().join("marker.txt"), b"marker\n");
    wait_until(SYNC_TIMEOUT, "A to commit the marker", || {
        a.seq(SYNAPSE) > entries
    });
    let expect = entries + 1;
    holds_for(
        Duration::from_millis(500),
        "no extra versions on either node",
        || {
            let (sa, sb) = (a.seq(SYNAPSE), b.seq(SYNAPSE));
            if sa == expect && sb == expect {
                Ok(())
            } else {
                Err(format!(
                    "seq on A = {sa}, on B = {sb}, expected {expect} on both"
                ))
            }
        },
    );
}

/// Regression: a file can reach a peer before its parent directories' records do (the file's
/// close ships it at once, the new directories wait for their quiet period). The peer then
/// creates the parents itself while applying the file; it must not record those directories
/// as its own new versions. Counted as above: A commits exactly 4 records (three directories
/// and the file), B exactly the 4 it applies, then one each for a marker sent back from B.
#[test]
fn parent_directories_created_for_an_applied_file_do_not_echo() {
    let cluster = Cluster::start(2);
    let (a, b) = (&cluster[0], &cluster[1]);
    let rel = "default/sequences/nested/audit.xml";
    write(&a.synapse().join(rel), "<sequence name=\"audit\"/>\n");
    wait_content(&b.synapse().join(rel), b"<sequence name=\"audit\"/>\n");

    write(&b.synapse().join("marker.txt"), "marker\n");
    wait_content(&a.synapse().join("marker.txt"), b"marker\n");
    // `default`, `default/sequences`, `default/sequences/nested`, the file, then the marker.
    let expect = 5;
    wait_until(SYNC_TIMEOUT, "A to commit the marker", || {
        a.seq(SYNAPSE) >= expect
    });
    holds_for(
        Duration::from_millis(500),
        "no extra versions on either node",
        || {
            let (sa, sb) = (a.seq(SYNAPSE), b.seq(SYNAPSE));
            if sa == expect && sb == expect {
                Ok(())
            } else {
                Err(format!(
                    "seq on A = {sa}, on B = {sb}, expected {expect} on both; B's log:\n{}",
                    b.log_tail()
                ))
            }
        },
    );
}
