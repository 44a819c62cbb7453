//! Concurrent edits of one file: every node ends with the same winner, and the losing version
//! is kept once, outside every synced folder, and listed by `artisync conflicts`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::common::*;

#[test]
fn concurrent_edits_converge_and_keep_exactly_one_conflict_copy() {
    let mut cluster = Cluster::start(2);
    let rel = "default/api/contested.xml";
    let original = "<api name=\"contested\" context=\"/c\"/>\n";
    write(&cluster[0].synapse().join(rel), original);
    wait_content(&cluster[1].synapse().join(rel), original.as_bytes());

    // Truly concurrent: B is down while both sides edit, so neither saw the other's version.
    cluster[1].wait_in_sync(SYNAPSE);
    cluster[1].stop();
    let seq_before = cluster[0].seq(SYNAPSE);
    let version_a = "<api name=\"contested\" context=\"/c\" description=\"edited on a\"/>\n";
    let version_b =
        "<api name=\"contested\" context=\"/c\" description=\"edited on b, differently\"/>\n";
    write(&cluster[0].synapse().join(rel), version_a);
    wait_until(SYNC_TIMEOUT, "A to record its own edit", || {
        cluster[0].seq(SYNAPSE) > seq_before
    });
    write(&cluster[1].synapse().join(rel), version_b);
    cluster[1].start();

    let roots = cluster.synapse_roots();
    wait_for(
        SYNC_TIMEOUT,
        "the edits to converge with a conflict copy",
        || {
            let (ta, tb) = (tree(&roots[0]), tree(&roots[1]));
            if ta != tb {
                return Err(tree_diff(&ta, &tb));
            }
            let copies = cluster[0].conflict_copies().len() + cluster[1].conflict_copies().len();
            if copies == 0 {
                return Err("no conflict copy yet".into());
            }
            Ok(())
        },
    );
    // Nothing more is made once converged.
    holds_for(Duration::from_millis(300), "a single conflict copy", || {
        let n = cluster[0].conflict_copies().len() + cluster[1].conflict_copies().len();
        if n == 1 {
            Ok(())
        } else {
            Err(format!("{n} copies"))
        }
    });

    let winner = std::fs::read_to_string(cluster[0].synapse().join(rel)).expect("read winner");
    let loser = if winner == version_a {
        version_b
    } else if winner == version_b {
        version_a
    } else {
        panic!("the file holds neither edit: {winner:?}")
    };
    // Only the contested file is in the synced folders: the copy is not deployed anywhere.
    for root in &roots {
        let files: Vec<String> = tree(root).into_keys().collect();
        assert_eq!(
            files,
            vec![rel.to_owned()],
            "synced folder {}",
            root.display()
        );
    }

    let (holder, other) = if cluster[0].conflict_copies().len() == 1 {
        (&cluster[0], &cluster[1])
    } else {
        (&cluster[1], &cluster[0])
    };
    let copy = holder.conflict_copies().remove(0);
    assert_eq!(
        std::fs::read_to_string(&copy).expect("read the conflict copy"),
        loser,
        "the conflict copy {} holds the losing version",
        copy.display()
    );
    let expected_dir = holder.state_dir().join("conflicts").join(SYNAPSE);
    assert!(
        copy.starts_with(&expected_dir),
        "{} should lie under {}",
        copy.display(),
        expected_dir.display()
    );
    let name = copy
        .strip_prefix(&expected_dir)
        .expect("under the conflicts dir")
        .to_str()
        .expect("utf-8");
    assert!(
        name.starts_with(&format!("{rel}.")),
        "copy name {name} should be <path>.<node>.<stamp>"
    );
    for node in &cluster.nodes {
        for root in [node.synapse(), node.plans()] {
            assert!(
                !copy.starts_with(&root),
                "conflict copy inside synced folder {}",
                root.display()
            );
        }
    }

    // `artisync conflicts --json` lists it on the node that keeps it, and only there.
    let listed = holder.conflicts_json();
    assert_eq!(listed.len(), 1, "conflicts on {}: {listed:?}", holder.name);
    assert_eq!(listed[0]["folder"], SYNAPSE, "{listed:?}");
    assert_eq!(listed[0]["path"], rel, "{listed:?}");
    let listed_copy = PathBuf::from(listed[0]["copy"].as_str().expect("copy is a string"));
    assert!(
        same_file(&listed_copy, &copy),
        "listed copy {} is not the copy on disk {}",
        listed_copy.display(),
        copy.display()
    );
    assert!(
        other.conflicts_json().is_empty(),
        "the winning node {} lists no conflict",
        other.name
    );
}

fn same_file(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(x), Ok(y)) => x == y,
        _ => false,
    }
}
