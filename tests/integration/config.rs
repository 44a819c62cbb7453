//! Bad configuration fails at start, through the binary: non-zero exit, and stderr names the
//! key and the problem.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::*;

/// A valid config for a node living in `dir`, with the given extra text appended.
fn config_text(dir: &Path, extra: &str) -> String {
    format!(
        "node = \"gw1\"\nlisten = \"127.0.0.1:1\"\nstate_dir = \"{}\"\n\n\
         [[folder]]\nid = \"synapse-configs\"\npath = \"{}\"\n{extra}",
        dir.join("state").display(),
        dir.join("sc").display()
    )
}

/// Runs `artisync <cmd> --config FILE` and returns (exit success, stderr). A `run` that does
/// not exit by itself (it accepted the config) is killed and reported as success.
fn run_cli(cmd: &str, config: &Path) -> (bool, String) {
    let mut child = Command::new(BIN)
        .arg(cmd)
        .arg("--config")
        .arg(config)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn artisync");
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break Some(status);
        }
        if start.elapsed() > Duration::from_secs(15) {
            let _ = child.kill();
            break None;
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let out = child.wait_with_output().expect("collect output");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    (
        status.is_some_and(|s| s.success()) || status.is_none(),
        stderr,
    )
}

#[test]
fn bad_configs_fail_at_start_naming_the_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::create_dir(dir.path().join("sc")).expect("mkdir");
    std::fs::create_dir(dir.path().join("ep")).expect("mkdir");
    let d = dir.path();
    let cases: Vec<(&str, String, &[&str])> = vec![
        (
            "unknown key",
            config_text(d, "colour = \"blue\"\n"),
            &["colour", "unknown"],
        ),
        (
            "missing folder path",
            config_text(d, "").replace("/sc\"", "/does-not-exist\""),
            &["folder[0].path", "does-not-exist"],
        ),
        (
            "duplicate folder id",
            config_text(
                d,
                &format!(
                    "\n[[folder]]\nid = \"synapse-configs\"\npath = \"{}\"\n",
                    d.join("ep").display()
                ),
            ),
            &["folder[1].id", "duplicate"],
        ),
        (
            "peer without address",
            config_text(d, "\n[[peer]]\nname = \"gw2\"\n"),
            &["peer[0].address"],
        ),
    ];

    // The unchanged base config is accepted: the failures below come from the edits.
    let good = d.join("good.toml");
    std::fs::write(&good, config_text(d, "")).expect("write config");
    let (ok, stderr) = run_cli("check-config", &good);
    assert!(ok, "the base config should be valid: {stderr}");

    for (what, text, needles) in cases {
        let path = d.join("bad.toml");
        std::fs::write(&path, &text).expect("write config");
        for cmd in ["check-config", "run"] {
            let (ok, stderr) = run_cli(cmd, &path);
            assert!(
                !ok,
                "`artisync {cmd}` accepted a config with {what}:\n{text}\nstderr: {stderr}"
            );
            for needle in needles {
                assert!(
                    stderr.contains(needle),
                    "`artisync {cmd}` with {what}: stderr should mention {needle:?}: {stderr}"
                );
            }
        }
    }
    assert!(
        !d.join("state").exists(),
        "nothing may be created on disk before the config validated"
    );
}

/// Issue 12: a `state_dir` inside a synced folder that did not exist yet was accepted; on the
/// first start its index, node id, lock and `running` files were synced to peers, and the agent
/// could crash on its own `running` file. Both commands refuse it, naming `state_dir` and the
/// folder, and nothing is created inside the folder.
#[test]
fn a_state_dir_inside_a_synced_folder_is_refused_before_anything_is_created() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    std::fs::create_dir(d.join("sc")).expect("mkdir");
    for state in [d.join("sc/state"), d.join("sc/../sc/.artisync")] {
        let text = config_text(d, "").replace(
            &format!("\"{}\"", d.join("state").display()),
            &format!("\"{}\"", state.display()),
        );
        assert!(text.contains(&state.display().to_string()), "{text}");
        let path = d.join("inside.toml");
        std::fs::write(&path, &text).expect("write config");
        for cmd in ["check-config", "run"] {
            let (ok, stderr) = run_cli(cmd, &path);
            assert!(
                !ok,
                "`artisync {cmd}` accepted state_dir {} inside the folder\nstderr: {stderr}",
                state.display()
            );
            assert!(
                stderr.contains("state_dir") && stderr.contains("synapse-configs"),
                "`artisync {cmd}`: stderr should name state_dir and the folder: {stderr}"
            );
        }
    }
    let created: Vec<_> = std::fs::read_dir(d.join("sc"))
        .expect("read folder")
        .map(|e| e.map(|e| e.path()))
        .collect();
    assert!(
        created.is_empty(),
        "nothing may be created inside the folder: {created:?}"
    );
}
