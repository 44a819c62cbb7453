//! A node that was down catches up with what changed meanwhile, and ships what its own folder
//! got while it was down.

use crate::common::*;

#[test]
fn a_restarted_node_catches_up_in_both_directions() {
    let mut cluster = Cluster::start(2);
    let (ra, rb) = (cluster[0].synapse(), cluster[1].synapse());
    for name in ["keep", "modify", "delete"] {
        write(
            &ra.join(format!("default/api/{name}.xml")),
            format!("<api name=\"{name}\"/>\n"),
        );
    }
    wait_same_trees(
        SYNC_TIMEOUT,
        "the first files to reach B",
        &[ra.clone(), rb.clone()],
    );

    cluster[1].wait_in_sync(SYNAPSE);
    cluster[1].stop();
    let modified = "<api name=\"modify\" context=\"/changed-while-b-was-down\"/>\n";
    write(&ra.join("default/api/modify.xml"), modified);
    std::fs::remove_file(ra.join("default/api/delete.xml")).expect("delete on A");
    write(&ra.join("default/api/new.xml"), "<api name=\"new\"/>\n");
    // B's folder changes while its agent is down (an operator, a deploy tool...).
    write(
        &rb.join("default/sequences/from_b.xml"),
        "<sequence name=\"from_b\"/>\n",
    );
    cluster[1].start();

    wait_same_trees(
        SYNC_TIMEOUT,
        "A and B to converge after B's restart",
        &[ra.clone(), rb.clone()],
    );
    let files: Vec<String> = tree(&ra).into_keys().collect();
    assert_eq!(
        files,
        [
            "default/api/keep.xml",
            "default/api/modify.xml",
            "default/api/new.xml",
            "default/sequences/from_b.xml"
        ],
        "the delete made while B was down is not resurrected, and B's new file reached A"
    );
    assert_eq!(
        std::fs::read_to_string(rb.join("default/api/modify.xml")).expect("read on B"),
        modified
    );
}
