//! Logging never takes the agent down: a stderr that goes away (a pipe whose reader exited, a
//! log collector restarted) loses log lines, not the agent.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::common::*;

const EXIT_TIMEOUT: Duration = Duration::from_secs(20);

/// Regression: tracing-subscriber reported a failed write with `eprint!`, which panics on a
/// broken stderr, so the agent died (exit 101) at its first log line after the reader left.
#[test]
fn the_agent_keeps_running_when_its_stderr_breaks() {
    let port = artisync::demo::free_ports(1).expect("a free port")[0];
    let node = Node::new("pipe", port, &[]);
    let mut child = Command::new(BIN)
        .args(["run", "--config"])
        .arg(node.config())
        .env("ARTISYNC_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start artisync run");
    // The reader goes away: every later write to stderr fails with EPIPE.
    drop(child.stderr.take());
    wait_for(SYNC_TIMEOUT, "the agent to answer status", || {
        if let Some(status) = child.try_wait().expect("try_wait") {
            panic!("the agent died when its stderr broke: {status}");
        }
        let out = node.cli(&["status", "--json"]);
        out.status
            .success()
            .then_some(())
            .ok_or_else(|| String::from_utf8_lossy(&out.stderr).into_owned())
    });
    // Each change is logged at info ("local changes recorded"), so each one hits the pipe.
    for i in 0..5 {
        write(
            &node.synapse().join(format!("default/api/p{i}.xml")),
            format!("<api name=\"p{i}\"/>\n"),
        );
        wait_until(SYNC_TIMEOUT, format!("p{i}.xml to be indexed"), || {
            node.folder_status(SYNAPSE)["files"].as_u64() == Some(i + 1)
        });
    }
    assert!(
        child.try_wait().expect("try_wait").is_none(),
        "the agent died when its stderr broke"
    );
    let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM);
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().expect("try_wait") {
            break s;
        }
        if start.elapsed() > EXIT_TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the agent did not stop within {EXIT_TIMEOUT:?} of SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "clean stop expected, got {status}");
}
