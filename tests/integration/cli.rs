//! The operator's surface outside the agent: shell completions, the man page, and the sample
//! config the packages install as `/etc/artisync/artisync.toml` (`contrib/artisync.toml`).

use std::path::Path;
use std::process::Command;

use crate::common::*;

/// Runs `artisync ARGS` and returns its stdout; fails the test on a non-zero exit.
fn stdout_of(args: &[&str]) -> String {
    let out = Command::new(BIN)
        .args(args)
        .output()
        .expect("spawn artisync");
    assert!(
        out.status.success(),
        "artisync {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8 output")
}

#[test]
fn bash_completion_covers_the_subcommands() {
    let script = stdout_of(&["completions", "bash"]);
    assert!(script.contains("_artisync"), "no completion function");
    assert!(
        script.contains("check-config"),
        "check-config not completed"
    );
    for shell in ["zsh", "fish"] {
        assert!(
            stdout_of(&["completions", shell]).contains("check-config"),
            "{shell}: check-config not completed"
        );
    }
}

#[test]
fn man_page_lists_the_run_subcommand() {
    let page = stdout_of(&["man"]);
    assert!(
        page.starts_with(".ie") || page.contains(".TH artisync 1"),
        "not roff"
    );
    assert!(page.contains("artisync\\-run"), "run not listed:\n{page}");

    // The packages ship one page per subcommand, so the page's `artisync-run(1)` resolves.
    let dir = tempfile::tempdir().expect("temp dir");
    stdout_of(&["man", "--dir", &dir.path().display().to_string()]);
    for page in ["artisync.1", "artisync-run.1", "artisync-check-config.1"] {
        assert!(dir.path().join(page).is_file(), "{page} not written");
    }
}

/// The sample with its absolute paths moved under `dir`, and (if `uncomment`) every commented
/// key and section turned on, so the documented values are checked too.
fn sample_config(dir: &Path, uncomment: bool) -> String {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/contrib/artisync.toml"
    ))
    .expect("read contrib/artisync.toml");
    let mut out = String::new();
    for line in text.lines() {
        let line = match line.strip_prefix("# ") {
            Some(rest)
                if uncomment
                    && (rest.starts_with('[')
                        || rest.split_once(" = ").is_some_and(|(k, _)| {
                            k.chars().all(|c| c.is_ascii_lowercase() || c == '_')
                        })) =>
            {
                rest
            }
            _ => line,
        };
        out.push_str(line);
        out.push('\n');
    }
    out.replace("/opt/wso2am", &dir.join("opt").display().to_string())
        .replace(
            "/var/lib/artisync",
            &dir.join("state").display().to_string(),
        )
        .replace("/etc/artisync/pki", &dir.join("pki").display().to_string())
}

#[test]
fn shipped_sample_config_passes_check_config() {
    let dir = tempfile::tempdir().expect("temp dir");
    let d = dir.path();
    for folder in ["synapse-configs", "executionplans"] {
        std::fs::create_dir_all(d.join("opt/repository/deployment/server").join(folder))
            .expect("mkdir");
    }
    let pki = d.join("pki").display().to_string();
    stdout_of(&["cert", "ca", "--out", &pki]);
    stdout_of(&[
        "cert", "node", "--ca", &pki, "--name", "gw1", "--host", "gw1", "--out", &pki,
    ]);
    for uncomment in [false, true] {
        let config = d.join(format!("artisync-{uncomment}.toml"));
        std::fs::write(&config, sample_config(d, uncomment)).expect("write config");
        let said = stdout_of(&["check-config", "--config", &config.display().to_string()]);
        assert!(
            said.contains("ok (node gw1"),
            "uncomment {uncomment}: {said}"
        );
    }
}
