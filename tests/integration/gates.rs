//! What must NOT be shipped: a file still being written, XML that is not well-formed, and the
//! deletions of a folder whose root suddenly went empty (mass-delete guard).

use std::io::Write;
use std::time::{Duration, Instant};

use crate::common::*;

#[test]
fn a_slow_writer_is_never_seen_half_written() {
    let cluster = Cluster::start(2);
    // Not XML, so the XML gate is not what protects it: only close-after-write does.
    let rel = "throttle_slow.siddhiql";
    let pieces = [
        "@Plan:name('throttle_slow')\n",
        "@Import('org.wso2.throttle.request.stream:1.0.0')\n",
        "define stream RequestStream (messageID string, appKey string);\n",
        "from RequestStream select appKey\n",
        "insert into ThrottleStream;\n",
    ];
    let full: String = pieces.concat();
    let on_a = cluster[0].plans().join(rel);
    let on_b = cluster[1].plans().join(rel);

    let writer = std::thread::spawn(move || {
        let mut f = std::fs::File::create(&on_a).expect("create on A");
        for (i, piece) in pieces.iter().enumerate() {
            if i > 0 {
                // The scenario itself: a writer pausing with the file open.
                std::thread::sleep(Duration::from_millis(100));
            }
            f.write_all(piece.as_bytes()).expect("write a piece");
        }
        drop(f); // close-after-write
    });

    let mut seen_partial: Vec<String> = Vec::new();
    let start = Instant::now();
    loop {
        match std::fs::read(&on_b) {
            Ok(bytes) if bytes == full.as_bytes() => break,
            Ok(bytes) => {
                let text = String::from_utf8_lossy(&bytes).into_owned();
                if seen_partial.last() != Some(&text) {
                    seen_partial.push(text);
                }
            }
            Err(_) => {} // absent is fine
        }
        assert!(
            start.elapsed() < SYNC_TIMEOUT,
            "B did not get the complete file within {} s; partial contents seen: {seen_partial:?}",
            SYNC_TIMEOUT.as_secs()
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    writer.join().expect("writer thread");
    assert!(
        seen_partial.is_empty(),
        "B saw content other than the final one: {seen_partial:?}"
    );
}

#[test]
fn malformed_xml_is_held_until_it_parses() {
    let cluster = Cluster::start(2);
    let (a, b) = (&cluster[0], &cluster[1]);
    let bad_rel = "default/api/x.xml";
    write(
        &a.synapse().join(bad_rel),
        "<api xmlns=\"http://ws.apache.org/ns/synapse\" name=\"x\">\n  <resource methods=\"GET\">\n",
    );
    // Sentinel: a good file written after the bad one. Once it is on B, the bad one had every
    // chance to travel too.
    let sentinel = "default/api/sentinel.xml";
    write(&a.synapse().join(sentinel), "<api name=\"sentinel\"/>\n");
    wait_content(&b.synapse().join(sentinel), b"<api name=\"sentinel\"/>\n");
    wait_for(SYNC_TIMEOUT, "A's status to list x.xml as held", || {
        let f = a.folder_status(SYNAPSE);
        if f["held"].get(bad_rel).is_some() {
            Ok(())
        } else {
            Err(format!("held = {}", f["held"]))
        }
    });
    assert!(
        !b.synapse().join(bad_rel).exists(),
        "the malformed XML must not reach B"
    );

    let fixed = "<api xmlns=\"http://ws.apache.org/ns/synapse\" name=\"x\">\n  <resource methods=\"GET\"/>\n</api>\n";
    write(&a.synapse().join(bad_rel), fixed);
    wait_content(&b.synapse().join(bad_rel), fixed.as_bytes());
    wait_for(SYNC_TIMEOUT, "A to stop holding x.xml", || {
        let f = a.folder_status(SYNAPSE);
        match f["held"].as_object() {
            Some(m) if m.is_empty() => Ok(()),
            _ => Err(format!("held = {}", f["held"])),
        }
    });
}

#[test]
fn emptying_a_folder_root_pauses_it_until_resume() {
    let cluster = Cluster::start(2);
    let (a, b) = (&cluster[0], &cluster[1]);
    for i in 0..5 {
        write(
            &a.synapse().join(format!("default/api/api{i}.xml")),
            format!("<api name=\"{i}\"/>\n"),
        );
    }
    write(
        &a.synapse().join("default/endpoints/ep.xml"),
        "<endpoint name=\"ep\"/>\n",
    );
    wait_same_trees(
        SYNC_TIMEOUT,
        "the folder to reach B",
        &cluster.synapse_roots(),
    );
    let before = tree(&b.synapse());
    assert_eq!(before.len(), 6);

    // Everything inside A's root goes at once, as when a disk is unmounted; the root stays.
    // (The content is moved out of the folder and deleted there: a slow `rm -rf` inside the
    // root races the watcher, and deletions the agent sees before the root is empty do ship.)
    let gone = a.dir().join("moved-out");
    std::fs::create_dir(&gone).expect("mkdir outside the folder");
    for entry in std::fs::read_dir(a.synapse()).expect("list A's root") {
        let entry = entry.expect("entry");
        std::fs::rename(entry.path(), gone.join(entry.file_name())).expect("move out of A's root");
    }
    std::fs::remove_dir_all(&gone).expect("delete outside the folder");
    // Sentinel in the other folder: once it is on B, A's watcher has long reported the deletes.
    write(&a.plans().join("marker.siddhiql"), "@Plan:name('marker')\n");
    wait_content(
        &b.plans().join("marker.siddhiql"),
        b"@Plan:name('marker')\n",
    );
    wait_for(
        SYNC_TIMEOUT,
        "A to pause the folder (or B to lose files)",
        || {
            if tree(&b.synapse()) != before {
                return Ok(());
            }
            let f = a.folder_status(SYNAPSE);
            if f["paused"].is_string() {
                Ok(())
            } else {
                Err(format!("status: {f}"))
            }
        },
    );
    let after = tree(&b.synapse());
    assert_eq!(
        after,
        before,
        "B must keep every file when A's root goes empty: {}",
        tree_diff(&before, &after)
    );
    let f = a.folder_status(SYNAPSE);
    assert!(f["paused"].is_string(), "A's folder should be paused: {f}");
    assert_eq!(f["in_sync"], false, "a paused folder is not in sync: {f}");

    // The operator confirms: now the deletions propagate.
    let out = a.cli(&["resume", "--folder", SYNAPSE]);
    assert!(
        out.status.success(),
        "resume failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_for(
        SYNC_TIMEOUT,
        "B's folder to be emptied after resume",
        || {
            let left: Vec<_> = std::fs::read_dir(b.synapse())
                .map_err(|e| e.to_string())?
                .filter_map(Result::ok)
                .map(|e| e.file_name())
                .collect();
            if left.is_empty() {
                Ok(())
            } else {
                Err(format!("B still has {left:?}"))
            }
        },
    );
    let f = a.folder_status(SYNAPSE);
    assert!(f["paused"].is_null(), "A's folder should run again: {f}");
}

/// Regression: while one folder is paused, the node must keep taking in the peers' changes to
/// its other folders (each folder has its own stream per peer).
#[test]
fn a_paused_folder_does_not_stop_other_folders_from_syncing() {
    let cluster = Cluster::start(2);
    let (a, b) = (&cluster[0], &cluster[1]);
    // A started before B listened: let its first reconnect land before judging it.
    wait_for(SYNC_TIMEOUT, "A to connect to B", || {
        let peers = a.status_json()["peers"].clone();
        if peers[0]["connected"] == true {
            Ok(())
        } else {
            Err(format!("A's peers: {peers}"))
        }
    });
    write(
        &a.synapse().join("default/api/one.xml"),
        "<api name=\"one\"/>\n",
    );
    wait_content(
        &b.synapse().join("default/api/one.xml"),
        b"<api name=\"one\"/>\n",
    );
    std::fs::remove_dir_all(a.synapse().join("default")).expect("empty A's root");
    wait_for(SYNC_TIMEOUT, "A to pause synapse-configs", || {
        let f = a.folder_status(SYNAPSE);
        if f["paused"].is_string() {
            Ok(())
        } else {
            Err(format!("status: {f}"))
        }
    });
    // B changes its synapse-configs too (A must not apply it while paused) ...
    write(
        &b.synapse().join("default/api/two.xml"),
        "<api name=\"two\"/>\n",
    );
    // The session that carries every folder from B must not break over the paused one.
    holds_for(
        Duration::from_millis(1500),
        "A's session to B staying connected while a folder is paused",
        || {
            let peers = a.status_json()["peers"].clone();
            if peers[0]["connected"] == true {
                Ok(())
            } else {
                Err(format!("A's peers: {peers}"))
            }
        },
    );
    // ... and the other folder, which A must take in as usual, repeatedly.
    for i in 0..3 {
        let rel = format!("plan{i}.siddhiql");
        let text = format!("@Plan:name('p{i}')\n");
        write(&b.plans().join(&rel), &text);
        wait_for(
            Duration::from_secs(10),
            format!("{rel} from B to reach A while A's other folder is paused"),
            || match std::fs::read(a.plans().join(&rel)) {
                Ok(got) if got == text.as_bytes() => Ok(()),
                Ok(_) => Err("other content".into()),
                Err(e) => Err(format!(
                    "{e}; A's peer status: {}",
                    a.status_json()["peers"]
                )),
            },
        );
    }
    assert!(
        !a.synapse().join("default/api/two.xml").exists(),
        "a paused folder takes in nothing"
    );
}
