//! Volume: one large file (fetched in chunks, not inline) and many small ones.

use std::time::Duration;

use crate::common::*;

#[test]
fn a_20_mb_file_arrives_intact() {
    let cluster = Cluster::start(2);
    let mut content = vec![0u8; 20 * 1024 * 1024];
    rand::fill(&mut content[..]);
    let want = blake3::hash(&content);
    let rel = "default/local-entries/big.bin";
    write(&cluster[0].synapse().join(rel), &content);
    let on_b = cluster[1].synapse().join(rel);
    wait_for(
        Duration::from_secs(60),
        "the 20 MB file to arrive on B",
        || {
            // Cheap size check first; hash only a complete-looking file.
            let len = std::fs::metadata(&on_b).map_err(|e| e.to_string())?.len();
            if len != content.len() as u64 {
                return Err(format!("{len} bytes on B"));
            }
            let got = std::fs::read(&on_b).map_err(|e| e.to_string())?;
            if blake3::hash(&got) == want {
                Ok(())
            } else {
                Err("same size, different BLAKE3".into())
            }
        },
    );
}

#[test]
fn five_thousand_small_files_reach_a_node_that_starts_later() {
    let mut cluster = Cluster::full_mesh(2);
    cluster[0].start();
    // Written while A runs (its watcher sees a burst), before B exists on the network.
    let mut count = 0;
    for d in 0..50 {
        for f in 0..100 {
            let path = cluster[0]
                .synapse()
                .join(format!("default/api/group{d:02}/api{f:03}.xml"));
            write(
                &path,
                format!("<api name=\"g{d}a{f}\" context=\"/g{d}/a{f}\"/>\n"),
            );
            count += 1;
        }
    }
    assert_eq!(count, 5000);
    cluster[1].start();
    let (ra, rb) = (cluster[0].synapse(), cluster[1].synapse());
    wait_for(
        Duration::from_secs(60),
        "5000 files to be identical on B",
        || {
            // Count first (cheap), compare digests once the count is right.
            let n = files_below(&rb).len();
            if n != count {
                return Err(format!("{n} of {count} files on B"));
            }
            let (ta, tb) = (tree(&ra), tree(&rb));
            if ta.len() != count {
                return Err(format!("{} files on A", ta.len()));
            }
            if ta == tb {
                Ok(())
            } else {
                Err(tree_diff(&ta, &tb))
            }
        },
    );
}
