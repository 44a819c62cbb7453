//! The test harness: a cluster of real `artisync run` processes on loopback.
//!
//! Every node gets its own temp dir (config, state dir, two synced folders, a log file), a port
//! reserved with [`artisync::demo::free_ports`], and is ready once the standard gRPC health
//! probe says SERVING. Every wait is a bounded poll ([`wait_for`] / [`wait_until`]) that fails
//! the test with what it was waiting for. Nodes are stopped with SIGTERM when dropped; when a
//! test fails, each node's log is printed.

#![allow(dead_code)] // not every test module uses every helper

use std::collections::BTreeMap;
use std::fmt::Display;
use std::fs::File;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::Value;

/// The agent binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_artisync");
/// Folder ids every node in a test cluster syncs.
pub const SYNAPSE: &str = "synapse-configs";
pub const PLANS: &str = "executionplans";
/// Default bound for a change to reach another node (generous: debug build, loaded CI box).
pub const SYNC_TIMEOUT: Duration = Duration::from_secs(30);
/// Bound for a node to start serving, and to stop after SIGTERM.
const START_TIMEOUT: Duration = Duration::from_secs(30);
const STOP_TIMEOUT: Duration = Duration::from_secs(20);
/// How often polls look again.
const POLL_EVERY: Duration = Duration::from_millis(5);
/// Lines of each node's log printed when a test fails.
const LOG_TAIL_LINES: usize = 150;

/// Polls `check` every few ms until it returns `Ok`, or fails the test after `timeout` with
/// `what` and the last reason `check` gave.
pub fn wait_for<T>(
    timeout: Duration,
    what: impl Display,
    mut check: impl FnMut() -> Result<T, String>,
) -> T {
    let start = Instant::now();
    loop {
        match check() {
            Ok(v) => return v,
            Err(reason) => {
                if start.elapsed() > timeout {
                    panic!(
                        "timed out after {:.1} s waiting for {what}; last check: {reason}",
                        timeout.as_secs_f64()
                    );
                }
            }
        }
        std::thread::sleep(POLL_EVERY);
    }
}

/// Polls `cond` every few ms until it is true, or fails the test after `timeout`.
pub fn wait_until(timeout: Duration, what: impl Display, mut cond: impl FnMut() -> bool) {
    wait_for(timeout, what, || {
        if cond() {
            Ok(())
        } else {
            Err("condition still false".into())
        }
    })
}

/// Asserts that `check` stays `Ok` during the whole of `period` (polled): for "nothing more
/// happens" claims, which no event can signal.
pub fn holds_for(
    period: Duration,
    what: impl Display,
    mut check: impl FnMut() -> Result<(), String>,
) {
    let start = Instant::now();
    while start.elapsed() < period {
        if let Err(reason) = check() {
            panic!(
                "{what} stopped holding after {} ms: {reason}",
                start.elapsed().as_millis()
            );
        }
        std::thread::sleep(POLL_EVERY * 4);
    }
}

/// BLAKE3 of every file below `root`, by relative path (artisync's temp files excluded).
pub fn tree(root: &Path) -> BTreeMap<String, [u8; 32]> {
    artisync::demo::tree_digest(root)
}

/// Short description of how two trees differ, for failure messages.
pub fn tree_diff(a: &BTreeMap<String, [u8; 32]>, b: &BTreeMap<String, [u8; 32]>) -> String {
    let only_a: Vec<&String> = a.keys().filter(|k| !b.contains_key(*k)).take(5).collect();
    let only_b: Vec<&String> = b.keys().filter(|k| !a.contains_key(*k)).take(5).collect();
    let differ: Vec<&String> = a
        .iter()
        .filter(|(k, v)| b.get(*k).is_some_and(|w| w != *v))
        .map(|(k, _)| k)
        .take(5)
        .collect();
    format!(
        "{} vs {} files; only in first: {only_a:?}; only in second: {only_b:?}; content differs: {differ:?}",
        a.len(),
        b.len()
    )
}

/// No temp file of the agent's under `root` (fails the test, naming them).
pub fn no_temp_files(root: &Path) {
    let stray: Vec<PathBuf> = walkdir::WalkDir::new(root)
        .into_iter()
        .filter_map(Result::ok)
        .filter(|e| {
            e.file_name()
                .to_str()
                .is_some_and(artisync::fs::ignore::Ignore::is_temp)
        })
        .map(|e| e.path().to_owned())
        .collect();
    assert!(stray.is_empty(), "temp files left behind: {stray:?}");
}

/// Waits until every root in `roots` holds the same files with the same bytes.
pub fn wait_same_trees(timeout: Duration, what: impl Display, roots: &[PathBuf]) {
    wait_for(timeout, what, || {
        let first = tree(&roots[0]);
        for r in &roots[1..] {
            let other = tree(r);
            if other != first {
                return Err(format!(
                    "{} vs {}: {}",
                    roots[0].display(),
                    r.display(),
                    tree_diff(&first, &other)
                ));
            }
        }
        Ok(())
    })
}

/// Waits until `path` holds exactly `content`.
pub fn wait_content(path: &Path, content: &[u8]) {
    wait_for(
        SYNC_TIMEOUT,
        format!(
            "{} to hold the expected {} bytes",
            path.display(),
            content.len()
        ),
        || match std::fs::read(path) {
            Ok(b) if b == content => Ok(()),
            Ok(b) => Err(format!("it holds {} other bytes", b.len())),
            Err(e) => Err(e.to_string()),
        },
    )
}

/// Waits until nothing is at `path` any more.
pub fn wait_gone(path: &Path) {
    wait_until(
        SYNC_TIMEOUT,
        format!("{} to be gone", path.display()),
        || std::fs::symlink_metadata(path).is_err(),
    )
}

/// Permission bits of `path`.
pub fn mode(path: &Path) -> u32 {
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("stat {}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o7777
}

/// Writes `content` to `path`, creating parent directories.
pub fn write(path: &Path, content: impl AsRef<[u8]>) {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)
            .unwrap_or_else(|e| panic!("mkdir {}: {e}", parent.display()));
    }
    std::fs::write(path, content).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}

/// All regular files below `dir` (empty when `dir` does not exist).
pub fn files_below(dir: &Path) -> Vec<PathBuf> {
    walkdir::WalkDir::new(dir)
        .into_iter()
        .filter_map(Result::ok)
        .filter(|e| e.file_type().is_file())
        .map(|e| e.into_path())
        .collect()
}

/// One agent: its directory, config and (while running) its process.
pub struct Node {
    pub name: String,
    pub port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
    /// Extra environment of the agent process (see [`Node::set_env`]).
    env: Vec<(String, String)>,
}

impl Node {
    /// Creates the node's directory and folders, and writes its config (not started).
    pub fn new(name: &str, port: u16, peers: &[(String, u16)]) -> Self {
        let dir = tempfile::Builder::new()
            .prefix(&format!("artisync-it-{name}-"))
            .tempdir()
            .expect("create the node's temp dir");
        let node = Self {
            name: name.to_owned(),
            port,
            dir,
            child: None,
            env: Vec::new(),
        };
        for folder in [node.synapse(), node.plans()] {
            std::fs::create_dir_all(&folder).expect("create a synced folder");
        }
        let mut text = format!(
            "node = \"{name}\"\nlisten = \"127.0.0.1:{port}\"\nstate_dir = \"{}\"\n\n\
             [[folder]]\nid = \"{SYNAPSE}\"\npath = \"{}\"\n\n\
             [[folder]]\nid = \"{PLANS}\"\npath = \"{}\"\n",
            node.state_dir().display(),
            node.synapse().display(),
            node.plans().display()
        );
        for (peer, peer_port) in peers {
            text.push_str(&format!(
                "\n[[peer]]\nname = \"{peer}\"\naddress = \"http://127.0.0.1:{peer_port}\"\n"
            ));
        }
        std::fs::write(node.config(), text).expect("write the node's config");
        node
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn config(&self) -> PathBuf {
        self.dir().join("artisync.toml")
    }

    /// Root of the `synapse-configs` folder.
    pub fn synapse(&self) -> PathBuf {
        self.dir().join("synapse-configs")
    }

    /// Root of the `executionplans` folder.
    pub fn plans(&self) -> PathBuf {
        self.dir().join("executionplans")
    }

    pub fn state_dir(&self) -> PathBuf {
        self.dir().join("state")
    }

    /// The agent's stderr (and stdout), appended over restarts.
    pub fn log_path(&self) -> PathBuf {
        self.dir().join("agent.log")
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// Process id of the running agent (e.g. to read its memory use from `/proc`).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Sets an environment variable for the agent's next starts (e.g. systemd's
    /// `NOTIFY_SOCKET` and `WATCHDOG_USEC`).
    pub fn set_env(&mut self, key: &str, value: impl Into<String>) {
        self.env.push((key.to_owned(), value.into()));
    }

    /// Starts `artisync run` and waits until its health service says SERVING.
    pub fn start(&mut self) {
        self.start_no_wait();
        self.wait_serving();
    }

    fn wait_serving(&mut self) {
        assert!(self.child.is_some(), "node {} is not started", self.name);
        let start = Instant::now();
        loop {
            // `health` fails the test at once if the process has exited.
            let last = match self.health() {
                Ok(HealthStatus::Serving) => {
                    // SERVING means up: the admin socket (bound before) must answer already.
                    let socket = self.state_dir().join("admin.sock");
                    assert!(
                        socket.exists(),
                        "node {} reports SERVING before its admin socket {} exists",
                        self.name,
                        socket.display()
                    );
                    return;
                }
                Ok(s) => format!("health status {s:?}"),
                Err(e) => e,
            };
            if start.elapsed() > START_TIMEOUT {
                panic!(
                    "node {} did not report SERVING within {} s (last probe: {last}); log:\n{}",
                    self.name,
                    START_TIMEOUT.as_secs(),
                    self.log_tail()
                );
            }
            std::thread::sleep(POLL_EVERY);
        }
    }

    /// Sends SIGTERM and waits for a graceful exit (status 0).
    pub fn stop(&mut self) {
        let status = self
            .terminate()
            .unwrap_or_else(|| panic!("node {} is not running", self.name));
        match status {
            Ok(s) => assert!(
                s.success(),
                "node {} should exit 0 after SIGTERM, got {s}; log:\n{}",
                self.name,
                self.log_tail()
            ),
            Err(why) => panic!("node {}: {why}; log:\n{}", self.name, self.log_tail()),
        }
    }

    /// `kill -9`: the agent gets no chance to finish anything; returns once it is reaped.
    pub fn crash(&mut self) {
        let mut child = self
            .child
            .take()
            .unwrap_or_else(|| panic!("node {} is not running", self.name));
        let _ = child.kill();
        let _ = child.wait();
    }

    /// SIGTERM, bounded wait, SIGKILL as a last resort. `None` when not running.
    fn terminate(&mut self) -> Option<Result<ExitStatus, String>> {
        let mut child = self.child.take()?;
        let pid = Pid::from_raw(child.id() as i32);
        let _ = kill(pid, Signal::SIGTERM);
        let start = Instant::now();
        loop {
            match child.try_wait() {
                Ok(Some(status)) => return Some(Ok(status)),
                Ok(None) if start.elapsed() < STOP_TIMEOUT => std::thread::sleep(POLL_EVERY),
                Ok(None) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Some(Err(format!(
                        "did not stop within {} s of SIGTERM (killed)",
                        STOP_TIMEOUT.as_secs()
                    )));
                }
                Err(e) => return Some(Err(format!("wait: {e}"))),
            }
        }
    }

    /// Runs the CLI with `args` and this node's `--config`.
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(BIN)
            .args(args)
            .arg("--config")
            .arg(self.config())
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("run {BIN} {args:?}: {e}"))
    }

    fn cli_json(&self, args: &[&str]) -> Value {
        let out = self.cli(args);
        assert!(
            out.status.success(),
            "artisync {args:?} on node {} failed ({}): {}",
            self.name,
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "artisync {args:?} printed no JSON ({e}): {}",
                String::from_utf8_lossy(&out.stdout)
            )
        })
    }

    /// `artisync status --json`.
    pub fn status_json(&self) -> Value {
        self.cli_json(&["status", "--json"])
    }

    /// The `folders[]` entry of `artisync status --json` for folder `id`.
    pub fn folder_status(&self, id: &str) -> Value {
        let status = self.status_json();
        status["folders"]
            .as_array()
            .and_then(|list| list.iter().find(|f| f["id"] == id))
            .cloned()
            .unwrap_or_else(|| panic!("status of node {} has no folder {id}: {status}", self.name))
    }

    /// The `peers[]` entry of `artisync status --json` for peer `name`.
    pub fn peer_status(&self, name: &str) -> Value {
        let status = self.status_json();
        status["peers"]
            .as_array()
            .and_then(|list| list.iter().find(|p| p["name"] == name))
            .cloned()
            .unwrap_or_else(|| panic!("status of node {} has no peer {name}: {status}", self.name))
    }

    /// The folder's index sequence number, from `artisync status --json`.
    pub fn seq(&self, id: &str) -> u64 {
        let f = self.folder_status(id);
        f["seq"]
            .as_u64()
            .unwrap_or_else(|| panic!("folder status without a seq: {f}"))
    }

    /// Waits until the folder reports `in_sync` (every peer connected, nothing left to apply,
    /// nothing held). Seeing a file's bytes on disk does not mean the node has committed it
    /// yet: a test that acts on a node right after it received something waits for this.
    pub fn wait_in_sync(&self, id: &str) {
        wait_for(
            SYNC_TIMEOUT,
            format!("folder {id} on node {} to be in sync", self.name),
            || {
                let f = self.folder_status(id);
                if f["in_sync"] == true {
                    Ok(())
                } else {
                    Err(format!("status: {f}"))
                }
            },
        )
    }

    /// `artisync conflicts --json`.
    pub fn conflicts_json(&self) -> Vec<Value> {
        match self.cli_json(&["conflicts", "--json"]) {
            Value::Array(list) => list,
            other => panic!("conflicts --json is not a list: {other}"),
        }
    }

    /// Conflict copies on disk under `state_dir/conflicts`.
    pub fn conflict_copies(&self) -> Vec<PathBuf> {
        files_below(&self.state_dir().join("conflicts"))
    }

    /// The last lines of the node's log.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(self.log_path()).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let from = lines.len().saturating_sub(LOG_TAIL_LINES);
        lines[from..].join("\n")
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let result = self.terminate();
        if std::thread::panicking() {
            eprintln!(
                "----- node {} (port {}, dir {}) stopped: {:?}; last {LOG_TAIL_LINES} log lines:\n{}\n-----",
                self.name,
                self.port,
                self.dir().display(),
                result,
                self.log_tail()
            );
        }
    }
}

/// Nodes named a, b, c, ... with peers given by an adjacency list.
pub struct Cluster {
    pub nodes: Vec<Node>,
}

impl Cluster {
    /// `n` nodes, full mesh, all started.
    pub fn start(n: usize) -> Self {
        let mut c = Self::full_mesh(n);
        c.start_all();
        c
    }

    /// Nodes peered as `topology[i]` lists (indices), all started.
    pub fn start_with(topology: &[&[usize]]) -> Self {
        let mut c = Self::new(topology);
        c.start_all();
        c
    }

    /// `n` nodes, full mesh, none started.
    pub fn full_mesh(n: usize) -> Self {
        let topology: Vec<Vec<usize>> = (0..n)
            .map(|i| (0..n).filter(|j| *j != i).collect())
            .collect();
        let refs: Vec<&[usize]> = topology.iter().map(Vec::as_slice).collect();
        Self::new(&refs)
    }

    /// Nodes peered as `topology[i]` lists, none started.
    pub fn new(topology: &[&[usize]]) -> Self {
        let n = topology.len();
        let ports = artisync::demo::free_ports(n).expect("reserve loopback ports");
        let names: Vec<String> = (0..n)
            .map(|i| char::from(b'a' + i as u8).to_string())
            .collect();
        let nodes = (0..n)
            .map(|i| {
                let peers: Vec<(String, u16)> = topology[i]
                    .iter()
                    .map(|j| (names[*j].clone(), ports[*j]))
                    .collect();
                Node::new(&names[i], ports[i], &peers)
            })
            .collect();
        Self { nodes }
    }

    pub fn start_all(&mut self) {
        for node in &mut self.nodes {
            node.start();
        }
    }

    /// The `synapse-configs` roots of all nodes.
    pub fn synapse_roots(&self) -> Vec<PathBuf> {
        self.nodes.iter().map(Node::synapse).collect()
    }
}

impl std::ops::Index<usize> for Cluster {
    type Output = Node;
    fn index(&self, i: usize) -> &Node {
        &self.nodes[i]
    }
}

impl std::ops::IndexMut<usize> for Cluster {
    fn index_mut(&mut self, i: usize) -> &mut Node {
        &mut self.nodes[i]
    }
}

pub mod db;
pub mod disk;
pub mod faults;
pub mod hostile;
pub mod metrics;
pub mod proxy;

/// Extensions for retriever tests: extra config, a start that does not wait for SERVING, and
/// a single health probe.
impl Node {
    /// Appends `text` (e.g. a `[retriever]` section) to the node's config; call before start.
    pub fn append_config(&self, text: &str) {
        use std::io::Write;
        let mut f = File::options()
            .append(true)
            .open(self.config())
            .expect("open the node's config");
        f.write_all(text.as_bytes())
            .expect("append to the node's config");
    }

    /// Puts a top-level key (`key = value` line) at the head of the node's config, where
    /// it cannot land in a table; call before start.
    pub fn set_top_level(&self, line: &str) {
        let text = std::fs::read_to_string(self.config()).expect("read the node's config");
        std::fs::write(self.config(), format!("{line}\n{text}")).expect("write the node's config");
    }

    /// Starts `artisync run` without waiting for SERVING (see [`Node::health`]).
    pub fn start_no_wait(&mut self) {
        assert!(
            self.child.is_none(),
            "node {} is already running",
            self.name
        );
        let log = File::options()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("open the node's log file");
        let log2 = log.try_clone().expect("clone the log file handle");
        let child = Command::new(BIN)
            .arg("run")
            .arg("--config")
            .arg(self.config())
            .env("ARTISYNC_LOG", "info,artisync=debug")
            .env_remove("NOTIFY_SOCKET")
            .env_remove("WATCHDOG_USEC")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {BIN}: {e}"));
        self.child = Some(child);
    }

    /// One probe of the standard gRPC health service (service ""): its status, or why there
    /// is no answer. Fails the test if the process has exited.
    pub fn health(&mut self) -> Result<HealthStatus, String> {
        use tonic_health::pb::HealthCheckRequest;
        use tonic_health::pb::health_client::HealthClient;

        if let Some(child) = self.child.as_mut() {
            if let Ok(Some(status)) = child.try_wait() {
                self.child = None;
                panic!(
                    "node {} exited with {status}; log:\n{}",
                    self.name,
                    self.log_tail()
                );
            }
        }
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime for the health probe");
        let address = format!("http://127.0.0.1:{}", self.port);
        let status = runtime.block_on(async {
            let channel = tonic::transport::Endpoint::from_shared(address)
                .map_err(|e| e.to_string())?
                .connect_timeout(Duration::from_millis(500))
                .timeout(Duration::from_secs(2))
                .connect()
                .await
                .map_err(|e| format!("connect: {e}"))?;
            let reply = HealthClient::new(channel)
                .check(HealthCheckRequest {
                    service: String::new(),
                })
                .await
                .map_err(|s| format!("check: {s}"))?;
            Ok::<i32, String>(reply.into_inner().status)
        })?;
        HealthStatus::try_from(status).map_err(|_| format!("unknown health status {status}"))
    }

    /// Waits for SERVING after [`Node::start_no_wait`] (as [`Node::start`] does).
    pub fn wait_started(&mut self) {
        self.wait_serving();
    }
}

pub use tonic_health::pb::health_check_response::ServingStatus as HealthStatus;
