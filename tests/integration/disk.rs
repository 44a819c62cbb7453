//! Disk trouble through the real binary: a folder on a small file system that fills up, a
//! folder remounted read-only, and a `state_dir` that fills up. In each case the change that
//! cannot be written waits and is reported (status, log), nothing at a target path is left
//! truncated or half-written, the process stays up, and syncing resumes by itself once the
//! disk takes writes again.
//!
//! The mounts (tmpfs, bind) need root: see `common::disk`.

use std::path::Path;
use std::time::Duration;

use crate::common::disk::{BindMount, Tmpfs, fill};
use crate::common::metrics::{metrics_on, scrape_until, value};
use crate::common::*;

/// How long a waiting change is watched to stay waiting (the old file intact meanwhile).
const WAITING_WATCHED: Duration = Duration::from_secs(3);

/// `n` bytes that differ from file to file (so nothing compresses or dedups by accident).
fn bytes(n: usize, tag: u8) -> Vec<u8> {
    (0..n).map(|i| (i % 251) as u8 ^ tag).collect()
}

/// A well-formed XML document of `n` bytes (the folder's XML gate holds anything else).
fn xml(n: usize, tag: u8) -> Vec<u8> {
    let (head, tail) = (format!("<api v='{tag}'><!--"), "--></api>");
    let body = (0..n.saturating_sub(head.len() + tail.len()))
        .map(|i| b'a' + ((i + tag as usize) % 26) as u8);
    head.bytes().chain(body).chain(tail.bytes()).collect()
}

/// A file filling a disk: ignored by the agent (`*.swp`), as another program's file would
/// be that is not synced.
const FILLER: &str = "filler.swp";

/// The folder's `last_error` from status, or "".
fn last_error(node: &Node, folder: &str) -> String {
    node.folder_status(folder)["last_error"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

/// Every file under `root` is, byte for byte, one of the versions `allowed` lists for its path.
/// An empty version stands for "absent".
fn only_whole_versions(root: &Path, allowed: &[(String, Vec<Vec<u8>>)]) -> Result<(), String> {
    for (path, versions) in allowed {
        match std::fs::read(root.join(path)) {
            Ok(b) if versions.contains(&b) => {}
            Ok(b) => return Err(format!("{path} holds {} bytes of no version", b.len())),
            Err(e)
                if e.kind() == std::io::ErrorKind::NotFound && versions.contains(&Vec::new()) => {}
            Err(e) => return Err(format!("{path}: {e}")),
        }
    }
    Ok(())
}

#[test]
fn a_folder_on_a_full_file_system_waits_keeps_the_old_file_and_resumes_when_space_is_freed() {
    let mut cluster = Cluster::full_mesh(2);
    let Some(disk) = Tmpfs::mount(4096) else {
        return;
    };
    cluster[1].relocate(&cluster[1].synapse(), disk.path());
    cluster.start_all();
    let (a, b) = (&cluster[0], &cluster[1]);
    let b_syn = disk.path().to_owned();
    let old = b"<api name='keep' v='1'/>".to_vec();
    write(&a.synapse().join("keep.xml"), &old);
    wait_content(&b_syn.join("keep.xml"), &old);
    b.wait_in_sync(SYNAPSE);
    let pid = b.pid();

    // B's folder has 256 KiB left; A writes more than that: a large new version of keep.xml
    // (fetched) and many small new files (inline).
    fill(&b_syn, FILLER, 256 * 1024);
    let new = xml(1 << 20, 1);
    let small: Vec<(String, Vec<u8>)> = (0..40)
        .map(|i| (format!("many/{i}.bin"), bytes(16 * 1024, i as u8)))
        .collect();
    write(&a.synapse().join("keep.xml"), &new);
    for (path, content) in &small {
        write(&a.synapse().join(path), content);
    }

    // The change waits and says why.
    wait_for(SYNC_TIMEOUT, "B's status to report the full disk", || {
        let e = last_error(b, SYNAPSE);
        if e.contains("No space left on device") {
            Ok(())
        } else {
            Err(format!("last_error: {e:?}"))
        }
    });
    assert_eq!(b.folder_status(SYNAPSE)["in_sync"], false);
    assert!(
        b.log().contains("No space left on device"),
        "the log says why:\n{}",
        b.log_tail()
    );
    // Meanwhile the other folder syncs, and nothing half-written appears at a target path.
    write(&a.plans().join("plan.siddhi"), "@App:name('plan')");
    wait_content(&b.plans().join("plan.siddhi"), b"@App:name('plan')");
    let mut allowed = vec![("keep.xml".to_owned(), vec![old.clone(), new.clone()])];
    for (path, content) in &small {
        allowed.push((path.clone(), vec![content.clone(), Vec::new()]));
    }
    holds_for(WAITING_WATCHED, "old or whole new versions only", || {
        only_whole_versions(&b_syn, &allowed)
    });
    assert_eq!(
        std::fs::read(b_syn.join("keep.xml")).expect("keep.xml"),
        old,
        "the old version stays while the new one cannot be written"
    );

    // Space comes back: the changes apply without a restart.
    std::fs::remove_file(b_syn.join(FILLER)).expect("remove the filler");
    wait_content(&b_syn.join("keep.xml"), &new);
    for (path, content) in &small {
        wait_content(&b_syn.join(path), content);
    }
    b.wait_in_sync(SYNAPSE);
    wait_same_trees(SYNC_TIMEOUT, "A and B", &[a.synapse(), b_syn.clone()]);
    no_temp_files(&b_syn);
    assert_eq!(b.pid(), pid, "B was never restarted");
    let b = &mut cluster[1];
    assert_eq!(b.health(), Ok(HealthStatus::Serving));
    // Unmounted before the cluster's directories go, or they are left behind in /tmp.
    cluster[1].stop();
    drop(disk);
    drop(cluster);
}

/// The folder's status, and the status text, waiting for `what` in the text.
fn wait_status_text(node: &Node, what: &str) -> String {
    wait_for(
        SYNC_TIMEOUT,
        format!("status of node {} to say {what:?}", node.name),
        || {
            let out = node.cli(&["status"]);
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            if text.contains(what) {
                Ok(text)
            } else {
                Err(text)
            }
        },
    )
}

#[test]
fn a_full_state_dir_stops_changes_without_losing_any_and_resumes_when_space_is_freed() {
    let mut cluster = Cluster::full_mesh(2);
    let Some(disk) = Tmpfs::mount_on(&cluster[1].state_dir(), 8192) else {
        return;
    };
    let b_metrics = metrics_on(&cluster[1]);
    cluster.start_all();
    let (a, b) = (&cluster[0], &cluster[1]);
    write(&a.synapse().join("seed.xml"), "<api name='seed'/>");
    wait_content(&b.synapse().join("seed.xml"), b"<api name='seed'/>");
    b.wait_in_sync(SYNAPSE);
    let pid = b.pid();

    // The state_dir is full: changes from A, and a local one on B, cannot be recorded.
    fill(disk.path(), FILLER, 0);
    let big = xml(600 * 1024, 2);
    write(&a.synapse().join("from-a.xml"), "<api name='from-a'/>");
    write(&a.synapse().join("big.xml"), &big);
    for i in 0..30 {
        write(
            &a.synapse().join(format!("more/{i}.xml")),
            format!("<api n='{i}'/>"),
        );
    }
    write(&b.synapse().join("from-b.xml"), "<api name='from-b'/>");
    let text = wait_status_text(b, "INDEX NOT WRITABLE");
    assert!(text.contains("database or disk is full"), "{text}");
    let folder = [("folder", SYNAPSE)];
    scrape_until(b_metrics, "B's index_writable gauge to say 0", |t| {
        (value(t, "artisync_folder_index_writable", &folder)? == 0.0).then_some(())
    });
    assert!(
        b.log().contains("the index cannot be written"),
        "the log says so:\n{}",
        b.log_tail()
    );
    holds_for(WAITING_WATCHED, "B stays up", || {
        std::fs::metadata(format!("/proc/{}", pid.expect("running")))
            .map(|_| ())
            .map_err(|e| e.to_string())
    });

    // Space comes back: everything flows, both ways, without a restart.
    std::fs::remove_file(disk.path().join(FILLER)).expect("remove the filler");
    wait_content(&a.synapse().join("from-b.xml"), b"<api name='from-b'/>");
    wait_content(&b.synapse().join("big.xml"), &big);
    b.wait_in_sync(SYNAPSE);
    a.wait_in_sync(SYNAPSE);
    wait_same_trees(SYNC_TIMEOUT, "A and B", &cluster.synapse_roots());
    assert_eq!(b.pid(), pid, "B was never restarted");
    scrape_until(b_metrics, "B's index_writable gauge to say 1 again", |t| {
        (value(t, "artisync_folder_index_writable", &folder)? == 1.0).then_some(())
    });

    // B's index holds what its disk holds: a restart finds nothing to record.
    let seq = b.seq(SYNAPSE);
    cluster[1].stop();
    cluster[1].start();
    cluster[1].wait_in_sync(SYNAPSE);
    assert_eq!(
        cluster[1].seq(SYNAPSE),
        seq,
        "the restart found changes the index lacked"
    );
    wait_same_trees(
        SYNC_TIMEOUT,
        "A and B after B's restart",
        &cluster.synapse_roots(),
    );
    no_temp_files(&cluster[1].synapse());
    // Unmounted before the cluster's directories go, or they are left behind in /tmp.
    cluster[1].stop();
    drop(disk);
    drop(cluster);
}

#[test]
fn a_folder_remounted_read_only_waits_stays_up_and_resumes_when_writable() {
    let mut cluster = Cluster::full_mesh(2);
    let Some(bind) = BindMount::on(&cluster[1].synapse()) else {
        return;
    };
    cluster.start_all();
    let (a, b) = (&cluster[0], &cluster[1]);
    let old = b"<api name='keep' v='1'/>".to_vec();
    write(&a.synapse().join("keep.xml"), &old);
    wait_content(&b.synapse().join("keep.xml"), &old);
    b.wait_in_sync(SYNAPSE);
    let pid = b.pid();

    bind.read_only();
    let new = xml(600 * 1024, 3);
    write(&a.synapse().join("keep.xml"), &new);
    write(&a.synapse().join("added.xml"), "<api name='added'/>");
    let text = wait_status_text(b, "Read-only file system");
    assert!(text.contains("last error, "), "{text}");
    write(&a.plans().join("plan.siddhi"), "@App:name('plan')");
    wait_content(&b.plans().join("plan.siddhi"), b"@App:name('plan')");
    holds_for(
        WAITING_WATCHED,
        "the old file stays",
        || match std::fs::read(b.synapse().join("keep.xml")) {
            Ok(bytes) if bytes == old => Ok(()),
            other => Err(format!("{other:?}")),
        },
    );
    let b = &mut cluster[1];
    assert_eq!(b.health(), Ok(HealthStatus::Serving));

    bind.read_write();
    let b = &cluster[1];
    wait_content(&b.synapse().join("keep.xml"), &new);
    wait_content(&b.synapse().join("added.xml"), b"<api name='added'/>");
    b.wait_in_sync(SYNAPSE);
    assert_eq!(b.pid(), pid, "B was never restarted");
    wait_same_trees(SYNC_TIMEOUT, "A and B", &cluster.synapse_roots());
    // Unmounted before the cluster's directories go, or they are left behind in /tmp.
    cluster[1].stop();
    drop(bind);
    drop(cluster);
}
