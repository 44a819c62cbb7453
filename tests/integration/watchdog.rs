//! systemd integration: the agent says READY=1 once it serves, then pets the watchdog
//! (WATCHDOG=1) at half `WATCHDOG_USEC` while its folder engines are alive, and says
//! STOPPING=1 on SIGTERM. The test plays systemd: it binds the notify socket in the node's
//! temp dir and reads the datagrams with a bounded timeout.

use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};

use crate::common::*;

/// systemd's watchdog period given to the agent: it pets every 100 ms.
const WATCHDOG_USEC: &str = "200000";
/// Bound for each datagram read.
const READ_TIMEOUT: Duration = Duration::from_secs(10);

/// The next notify message, or why there is none within the bound.
fn next_message(socket: &UnixDatagram) -> Result<String, String> {
    let mut buf = [0u8; 4096];
    let n = socket
        .recv(&mut buf)
        .map_err(|e| format!("no notify message within {READ_TIMEOUT:?}: {e}"))?;
    Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
}

#[test]
fn the_agent_says_ready_then_pets_the_watchdog_while_healthy_and_says_stopping() {
    let mut cluster = Cluster::full_mesh(1);
    let node = &mut cluster[0];
    let path = node.dir().join("notify.sock");
    let socket = UnixDatagram::bind(&path).expect("bind the notify socket");
    socket
        .set_read_timeout(Some(READ_TIMEOUT))
        .expect("read timeout");
    node.set_env("NOTIFY_SOCKET", path.display().to_string());
    node.set_env("WATCHDOG_USEC", WATCHDOG_USEC);
    node.start();

    let first = next_message(&socket).unwrap_or_else(|e| panic!("{e}; log:\n{}", node.log_tail()));
    assert_eq!(first.trim(), "READY=1", "READY=1 comes first");
    // Pets keep coming, about every 100 ms: 5 of them well within 10 s.
    let start = Instant::now();
    let mut pets = 0;
    while pets < 5 {
        let msg = next_message(&socket)
            .unwrap_or_else(|e| panic!("after {pets} pets: {e}; log:\n{}", node.log_tail()));
        assert_eq!(msg.trim(), "WATCHDOG=1", "only pets while the agent runs");
        pets += 1;
    }
    assert!(
        start.elapsed() < READ_TIMEOUT,
        "5 pets took {:?}: the agent does not pet at half WATCHDOG_USEC",
        start.elapsed()
    );

    // Status shows live engines, and the folders in sync.
    for id in [SYNAPSE, PLANS] {
        let f = node.folder_status(id);
        let state = f["engine"]["state"].as_str().unwrap_or_default().to_owned();
        assert!(
            state == "idle" || state == "working",
            "engine of {id} is {state:?}: {f}"
        );
        assert_eq!(f["in_sync"], true, "{f}");
    }

    node.stop();
    let stopping = wait_for(READ_TIMEOUT, "STOPPING=1 after SIGTERM", || {
        let msg = next_message(&socket)?;
        match msg.trim() {
            "WATCHDOG=1" => Err("a pet sent before the signal".into()),
            other => Ok(other.to_owned()),
        }
    });
    assert_eq!(stopping, "STOPPING=1");
}
