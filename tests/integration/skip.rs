//! A change one node cannot apply is skipped after a few tries: it must not hold up the
//! peer's other changes, it shows in status until it applies, and it is retried by itself.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::common::*;

/// Makes a directory immutable (`chattr +i`: not even root can add an entry), and mutable
/// again when dropped, so the temp dir can be removed whatever the test does.
struct Immutable(PathBuf);

impl Immutable {
    /// `None` (with the reason printed) where the file system or the user cannot do it; in
    /// CI that fails the test instead.
    fn set(dir: &Path) -> Option<Self> {
        match Command::new("chattr").arg("+i").arg(dir).output() {
            Ok(out) if out.status.success() => Some(Self(dir.to_owned())),
            other => {
                let why = format!("cannot `chattr +i {}`: {other:?}", dir.display());
                assert!(std::env::var_os("CI").is_none(), "{why}");
                eprintln!("skipping: {why}");
                None
            }
        }
    }

    fn clear(&self) {
        let out = Command::new("chattr")
            .arg("-i")
            .arg(&self.0)
            .output()
            .expect("run chattr");
        assert!(out.status.success(), "chattr -i: {out:?}");
    }
}

impl Drop for Immutable {
    fn drop(&mut self) {
        let _ = Command::new("chattr").arg("-i").arg(&self.0).output();
    }
}

/// The skipped entries of a folder's status.
fn skipped(node: &Node, folder: &str) -> Vec<serde_json::Value> {
    node.folder_status(folder)["skipped"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

#[test]
fn a_change_that_cannot_be_applied_is_skipped_and_the_rest_still_flows() {
    let mut cluster = Cluster::full_mesh(2);
    for node in &cluster.nodes {
        node.set_top_level("skip_retry_ms = 300");
        std::fs::create_dir_all(node.synapse().join("locked")).expect("mkdir locked");
    }
    cluster.start_all();
    let (a, b) = (&cluster[0], &cluster[1]);
    b.wait_in_sync(SYNAPSE);
    let Some(lock) = Immutable::set(&b.synapse().join("locked")) else {
        return;
    };

    write(&a.synapse().join("locked/api.xml"), "<api name='locked'/>");
    write(&a.synapse().join("free.xml"), "<api name='free'/>");
    wait_content(&b.synapse().join("free.xml"), b"<api name='free'/>");
    let entry = wait_for(SYNC_TIMEOUT, "B to list the change it cannot apply", || {
        let list = skipped(b, SYNAPSE);
        match list.as_slice() {
            [one] if one["path"] == "locked/api.xml" => Ok(one.clone()),
            _ => Err(format!("skipped: {list:?}")),
        }
    });
    assert_eq!(entry["peer"], "a", "{entry}");
    assert!(
        entry["attempts"].as_u64().is_some_and(|n| n >= 3),
        "{entry}"
    );
    assert!(
        entry["problem"]
            .as_str()
            .is_some_and(|p| p.contains("not permitted")),
        "the problem names the cause: {entry}"
    );
    assert_eq!(b.folder_status(SYNAPSE)["in_sync"], false);
    let text = b.cli(&["status"]);
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.contains("skipped from a: locked/api.xml"),
        "status text lists it:\n{text}"
    );

    // The stream from A has moved on: later changes keep arriving.
    write(&a.synapse().join("later.xml"), "<api name='later'/>");
    wait_content(&b.synapse().join("later.xml"), b"<api name='later'/>");

    // Once the directory takes entries again, a retry applies the change by itself.
    lock.clear();
    wait_content(&b.synapse().join("locked/api.xml"), b"<api name='locked'/>");
    b.wait_in_sync(SYNAPSE);
    assert!(skipped(b, SYNAPSE).is_empty());
    wait_same_trees(SYNC_TIMEOUT, "A and B", &cluster.synapse_roots());
}
