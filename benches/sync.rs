//! End-to-end benchmark of two real artisync agents (child processes) on 127.0.0.1.
//!
//! Run with `cargo bench --bench sync`. See `benches/README.md` for what is measured.
//!
//! Every wait below is bounded: agents, rsync and `sync` run under deadlines, and a child
//! that outlives its deadline is killed (children are also killed if the bench panics).

mod common;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use notify::{RecursiveMode, Watcher};

use artisync::demo::{free_ports, tree_digest};
use common::*;

/// The folders every node syncs (folder id = directory name under the node's tree).
const FOLDERS: [&str; 2] = ["synapse-configs", "executionplans"];

/// (a): samples, warm-up samples (not counted), payload size, per-sample deadline, gap.
const LAT_SAMPLES: usize = 200;
const LAT_WARMUP: usize = 10;
const LAT_BYTES: usize = 4096;
const LAT_TIMEOUT: Duration = Duration::from_secs(5);
const LAT_GAP: Duration = Duration::from_millis(20);
/// Fallback poll interval of the arrival detector (it is woken by inotify before that).
const LAT_POLL: Duration = Duration::from_micros(100);

/// (b), (c): runs per measurement, unless `ARTISYNC_BENCH_RUNS` (1 to 15) says otherwise
/// (odd counts give a true median).
const DEFAULT_RUNS: usize = 3;
const SYNC_TIMEOUT: Duration = Duration::from_secs(120);

/// Size of each fresh file system made with `ARTISYNC_BENCH_LOOPFS=1` (sparse image; room for
/// the tree and 65,536 inodes).
const LOOPFS_BYTES: u64 = 1 << 30;
const LOOPFS_CMD_TIMEOUT: Duration = Duration::from_secs(60);

/// A fresh ext4 file system on a loop device (root only), mounted at `mount`; unmounted and
/// its image removed on drop. With `ARTISYNC_BENCH_LOOPFS=1` every copy in (b), artisync's and
/// the references', goes to one of these: a file system that earlier copies have filled makes
/// file creation slower run after run, and that drift is larger than the effects compared.
struct LoopFs {
    image: PathBuf,
    mount: PathBuf,
    keep: bool,
}

impl LoopFs {
    fn new(base: &Path, name: &str, keep: bool) -> Self {
        let image = base.join(format!("{name}.img"));
        let mount = base.join(name);
        fs::File::create(&image)
            .and_then(|f| f.set_len(LOOPFS_BYTES))
            .expect("create a loop fs image");
        fs::create_dir_all(&mount).expect("create a mount point");
        run_cmd(
            Command::new("mkfs.ext4")
                .args(["-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0"])
                .arg(&image),
            "mkfs.ext4 (ARTISYNC_BENCH_LOOPFS needs e2fsprogs)",
            LOOPFS_CMD_TIMEOUT,
        );
        run_cmd(
            Command::new("mount")
                .arg("-o")
                .arg("loop")
                .arg(&image)
                .arg(&mount),
            "mount -o loop (ARTISYNC_BENCH_LOOPFS needs root)",
            LOOPFS_CMD_TIMEOUT,
        );
        Self { image, mount, keep }
    }
}

impl Drop for LoopFs {
    fn drop(&mut self) {
        if self.keep {
            return;
        }
        // Bounded like every other wait of the bench (no panic here: this runs on drop).
        let unmounted = Command::new("umount")
            .arg(&self.mount)
            .stdin(Stdio::null())
            .spawn()
            .is_ok_and(|mut child| {
                let start = Instant::now();
                loop {
                    match child.try_wait() {
                        Ok(Some(status)) => break status.success(),
                        Ok(None) if start.elapsed() < LOOPFS_CMD_TIMEOUT => {
                            std::thread::sleep(Duration::from_millis(5));
                        }
                        _ => {
                            let _ = child.kill();
                            let _ = child.wait();
                            break false;
                        }
                    }
                }
            });
        if unmounted {
            let _ = fs::remove_file(&self.image);
        } else {
            eprintln!("could not unmount {}", self.mount.display());
        }
    }
}

/// Where one copy of (b) goes: a fresh loop fs (`ARTISYNC_BENCH_LOOPFS=1`), returned with the
/// root so that the caller unmounts it as soon as the copy is measured, or a new directory
/// under `base`. Mounted file systems slow each other down: with every copy of a 5-run bench
/// left mounted to the end, runs 3 to 5 took 1.8x as long as runs 1 and 2 (rsync -a too), and
/// with each unmounted right after its run, all runs took the same (2026-12-02).
fn copy_root(base: &Path, name: &str, keep: bool) -> (PathBuf, Option<LoopFs>) {
    if std::env::var("ARTISYNC_BENCH_LOOPFS").is_ok_and(|v| v == "1") {
        let m = LoopFs::new(base, &format!("fs-{name}"), keep);
        (m.mount.clone(), Some(m))
    } else {
        (base.to_owned(), None)
    }
}

fn runs() -> usize {
    std::env::var("ARTISYNC_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .filter(|n| (1..=15).contains(n))
        .unwrap_or(DEFAULT_RUNS)
}

// ------------------------------------------------------------------ deterministic content

fn siddhi_doc(rng: &mut Rng, name: &str, size: usize) -> String {
    let mut doc = format!(
        "@Plan:name('{name}')\n@Import('org.wso2.throttle.request.stream:1.0.0')\ndefine stream RequestStream (messageID string, appKey string, {} long);\n",
        rng.word()
    );
    while doc.len() < size {
        let (w1, w2, n) = (rng.word(), rng.word(), rng.below(10_000));
        let _ = if rng.below(2) == 0 {
            writeln!(
                doc,
                "from RequestStream[appKey == '{w1}-{n}'] select messageID, appKey insert into {w2}Stream{n};"
            )
        } else {
            writeln!(
                doc,
                "define stream {w1}Stream{n} ({w2} string, ts long, count int);"
            )
        };
    }
    doc
}

/// Generates the ~7,000-file / ~60 MB tree under `tree` (both folders). Deterministic.
/// Returns (files, bytes).
fn generate_tree(tree: &Path) -> (usize, u64) {
    // (directory under synapse-configs/default, root element, count, min size, max size)
    const KINDS: &[(&str, &str, usize, u64, u64)] = &[
        ("api", "api", 2200, 2_000, 40_000),
        ("endpoints", "endpoint", 2200, 600, 4_000),
        ("sequences", "sequence", 1100, 1_000, 24_000),
        ("local-entries", "localEntry", 300, 1_000, 160_000),
        ("proxy-services", "proxy", 250, 2_000, 30_000),
        ("templates", "template", 150, 1_000, 16_000),
        ("tasks", "task", 50, 500, 2_000),
        ("inbound-endpoints", "inboundEndpoint", 50, 500, 2_000),
    ];
    let mut rng = Rng(0x0A27_1590_5EED);
    let synapse = tree.join("synapse-configs/default");
    let plans = tree.join("executionplans");
    let (mut files, mut bytes) = (0usize, 0u64);
    let mut put = |path: PathBuf, text: String| {
        bytes += text.len() as u64;
        files += 1;
        fs::write(&path, text).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    };
    fs::create_dir_all(&plans).expect("create executionplans");
    for (dir, root, count, lo, hi) in KINDS {
        let d = synapse.join(dir);
        fs::create_dir_all(&d).expect("create a synapse-configs subdirectory");
        for i in 0..*count {
            let name = format!("admin--{}{i:05}_v1.0.0", rng.word());
            let size = rng.log_uniform(*lo, *hi) as usize;
            let open = format!(
                "<{root} xmlns=\"http://ws.apache.org/ns/synapse\" name=\"{name}\" context=\"/{}/{i}\" version=\"1.0.0\">",
                rng.word()
            );
            put(
                d.join(format!("{name}.xml")),
                xml_doc(&mut rng, &open, root, size),
            );
        }
    }
    // A few large WSDL/schema local entries: above the 256 KiB inline limit, so fetched.
    for i in 0..12 {
        let name = format!("schema-{}-{i:02}", rng.word());
        let size = rng.log_uniform(300_000, 1_500_000) as usize;
        let open = format!("<localEntry xmlns=\"http://ws.apache.org/ns/synapse\" key=\"{name}\">");
        put(
            synapse.join(format!("local-entries/{name}.xml")),
            xml_doc(&mut rng, &open, "localEntry", size),
        );
    }
    for i in 0..700 {
        let name = format!("throttle_{}_{i:04}", rng.word());
        let size = rng.log_uniform(800, 6_000) as usize;
        put(
            plans.join(format!("{name}.siddhiql")),
            siddhi_doc(&mut rng, &name, size),
        );
    }
    (files, bytes)
}

/// Every file of both folders with its size, sorted by path.
fn file_list(tree: &Path) -> Vec<(PathBuf, u64)> {
    let mut out: Vec<(PathBuf, u64)> = walkdir::WalkDir::new(tree)
        .min_depth(1)
        .into_iter()
        .filter_map(Result::ok)
        .filter(|e| e.file_type().is_file())
        .filter_map(|e| {
            let size = e.metadata().ok()?.len();
            let rel = e.path().strip_prefix(tree).ok()?.to_owned();
            Some((rel, size))
        })
        .collect();
    out.sort();
    out
}

type Digest = Vec<BTreeMap<String, [u8; 32]>>;

fn digest(tree: &Path) -> Digest {
    FOLDERS.iter().map(|f| tree_digest(&tree.join(f))).collect()
}

/// Walk + lstat of every entry, no reads (the lower bound of a stat-key scan).
fn walk_stat(tree: &Path) -> usize {
    walkdir::WalkDir::new(tree)
        .min_depth(1)
        .into_iter()
        .filter_map(Result::ok)
        .filter(|e| e.metadata().is_ok())
        .count()
}

// ------------------------------------------------------------------ agents

struct Node {
    name: String,
    port: u16,
    tree: PathBuf,
    state: PathBuf,
    config: PathBuf,
    log: PathBuf,
}

impl Node {
    /// A node whose files are under `root/name`, and its log at `logs/name.log` (off any
    /// loop fs, so it is still there after the fs is unmounted).
    fn new(root: &Path, logs: &Path, name: &str, port: u16) -> Self {
        let dir = root.join(name);
        let tree = dir.join("tree");
        for f in FOLDERS {
            fs::create_dir_all(tree.join(f)).expect("create a folder root");
        }
        Self {
            name: name.to_owned(),
            port,
            tree,
            state: dir.join("state"),
            config: dir.join("artisync.toml"),
            log: logs.join(format!("{name}.log")),
        }
    }

    /// Writes this node's config with the given peers.
    fn write_config(&self, peers: &[&Node]) {
        let mut text = format!(
            "node = \"{}\"\nlisten = \"127.0.0.1:{}\"\nstate_dir = \"{}\"\n",
            self.name,
            self.port,
            self.state.display()
        );
        for f in FOLDERS {
            let _ = write!(
                text,
                "\n[[folder]]\nid = \"{f}\"\npath = \"{}\"\n",
                self.tree.join(f).display()
            );
        }
        for p in peers {
            let _ = write!(
                text,
                "\n[[peer]]\nname = \"{}\"\naddress = \"http://127.0.0.1:{}\"\n",
                p.name, p.port
            );
        }
        fs::write(&self.config, text).expect("write config");
    }

    fn start(&self) -> Agent {
        Agent::spawn(
            &self.name,
            self.port,
            &self.config,
            &self.log,
            &std::env::var("ARTISYNC_BENCH_LOG").unwrap_or_else(|_| "warn".into()),
        )
    }
}

// ------------------------------------------------------------------ rsync

/// An rsync daemon serving `tree` as module `tree`; killed on drop.
struct RsyncDaemon {
    port: u16,
    child: Option<Child>,
}

impl RsyncDaemon {
    fn start(dir: &Path, tree: &Path, port: u16) -> Self {
        let conf = dir.join("rsyncd.conf");
        fs::write(
            &conf,
            format!(
                "use chroot = no\nlog file = {}\n\n[tree]\n    path = {}\n    read only = yes\n    uid = 0\n    gid = 0\n",
                dir.join("rsyncd.log").display(),
                tree.display()
            ),
        )
        .expect("write rsyncd.conf");
        let child = Command::new("rsync")
            .arg("--daemon")
            .arg("--no-detach")
            .arg(format!("--port={port}"))
            .arg(format!("--config={}", conf.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .expect("start rsync --daemon (is rsync installed?)");
        let mut daemon = Self {
            port,
            child: Some(child),
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Some(c) = daemon.child.as_mut() {
                if let Ok(Some(status)) = c.try_wait() {
                    panic!("rsync daemon exited: {status}");
                }
            }
            assert!(Instant::now() < deadline, "rsync daemon did not listen");
            std::thread::sleep(Duration::from_millis(5));
        }
        daemon
    }

    fn copy(&self, dest: &Path) -> Duration {
        run_cmd(
            Command::new("rsync")
                .arg("-a")
                .arg(format!("rsync://127.0.0.1:{}/tree/", self.port))
                .arg(format!("{}/", dest.display())),
            "rsync -a",
            CMD_TIMEOUT,
        )
    }

    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let pid = Pid::from_raw(i32::try_from(child.id()).expect("pid fits i32"));
            let _ = kill(pid, Signal::SIGTERM);
            let start = Instant::now();
            while !matches!(child.try_wait(), Ok(Some(_))) {
                if start.elapsed() > STOP_TIMEOUT {
                    let _ = child.kill();
                    let _ = child.wait();
                    break;
                }
                std::thread::sleep(Duration::from_millis(2));
            }
        }
    }
}

impl Drop for RsyncDaemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

// ------------------------------------------------------------------ measurements

/// Waits until every file of `expected` is at `tree` with its size (checked in path order,
/// resuming where the last poll stopped, so a poll costs O(new arrivals)), then confirms with
/// a full BLAKE3 digest. Returns the time since `start` at which the size check passed.
fn wait_tree(
    tree: &Path,
    expected: &[(PathBuf, u64)],
    want: &Digest,
    agents: &mut [&mut Agent],
) -> Duration {
    let start = agents.last().expect("at least one agent").started;
    let deadline = start + SYNC_TIMEOUT;
    let mut next = 0;
    loop {
        for agent in agents.iter_mut() {
            agent.check_alive();
        }
        while let Some((rel, size)) = expected.get(next) {
            match fs::symlink_metadata(tree.join(rel)) {
                Ok(m) if m.is_file() && m.len() == *size => next += 1,
                _ => break,
            }
        }
        if next == expected.len() {
            let at = start.elapsed();
            if digest(tree) == *want {
                return at;
            }
            std::thread::sleep(Duration::from_millis(50));
        } else {
            std::thread::sleep(Duration::from_millis(1));
        }
        assert!(
            Instant::now() < deadline,
            "{} did not converge within {SYNC_TIMEOUT:?} ({next}/{} files)",
            tree.display(),
            expected.len()
        );
    }
}

struct Latency {
    samples: Vec<Duration>,
    writes: Vec<Duration>,
    timeouts: usize,
}

/// (a): one 4 KiB XML file written on A per sample; time until B has its full content.
fn measure_latency(a: &Node, b: &Node, agents: &mut [&mut Agent]) -> Latency {
    let rel = "synapse-configs/default/api";
    let (dir_a, dir_b) = (a.tree.join(rel), b.tree.join(rel));
    let (tx, rx) = mpsc::channel::<()>();
    let mut watcher = notify::recommended_watcher(move |_res: notify::Result<notify::Event>| {
        let _ = tx.send(());
    })
    .expect("create the arrival watcher");
    watcher
        .watch(&dir_b, RecursiveMode::NonRecursive)
        .expect("watch B's api directory");
    let mut rng = Rng(0x01A7_E4C7);
    let mut out = Latency {
        samples: Vec::with_capacity(LAT_SAMPLES),
        writes: Vec::with_capacity(LAT_SAMPLES),
        timeouts: 0,
    };
    for i in 0..LAT_WARMUP + LAT_SAMPLES {
        let name = format!("admin--LatencyProbe{i:04}_v1.0.0.xml");
        let open = format!(
            "<api xmlns=\"http://ws.apache.org/ns/synapse\" name=\"LatencyProbe{i:04}\" context=\"/probe/{i}\" version=\"1.0.0\">"
        );
        let content = xml_doc(&mut rng, &open, "api", LAT_BYTES).into_bytes();
        assert_eq!(content.len(), LAT_BYTES);
        let (pa, pb) = (dir_a.join(&name), dir_b.join(&name));
        while rx.try_recv().is_ok() {}
        let t0 = Instant::now();
        fs::write(&pa, &content).expect("write the probe on A");
        let wrote = t0.elapsed();
        let arrived = loop {
            let ok = fs::symlink_metadata(&pb).is_ok_and(|m| m.len() == LAT_BYTES as u64)
                && fs::read(&pb).is_ok_and(|got| got == content);
            if ok {
                break Some(t0.elapsed());
            }
            if t0.elapsed() > LAT_TIMEOUT {
                break None;
            }
            let _ = rx.recv_timeout(LAT_POLL);
        };
        for agent in agents.iter_mut() {
            agent.check_alive();
        }
        if i >= LAT_WARMUP {
            match arrived {
                Some(d) => {
                    out.samples.push(d);
                    out.writes.push(wrote);
                }
                None => out.timeouts += 1,
            }
        }
        std::thread::sleep(LAT_GAP);
    }
    out
}

// ------------------------------------------------------------------ (d)

/// VmRSS of a process, in KiB.
fn rss_kib(pid: u32) -> Option<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// VmRSS once it stops growing: two polls 200 ms apart within 1 %, at most 10 s.
fn settled_rss(pid: u32) -> u64 {
    let mut last = rss_kib(pid).unwrap_or(0);
    for _ in 0..50 {
        std::thread::sleep(Duration::from_millis(200));
        let now = rss_kib(pid).unwrap_or(0);
        if now.abs_diff(last) * 100 <= last {
            return now;
        }
        last = now;
    }
    last
}

/// A's VmRSS with no stalled subscriber, then with 1, 10 and 100 (each subscribes to every
/// folder from the start on its own connection and never reads its stream).
fn measure_stalled(rt: &tokio::runtime::Runtime, port: u16, pid: Option<u32>) -> Vec<(usize, u64)> {
    use artisync::pb::sync::{FolderCursor, SubscribeRequest, peer_client::PeerClient};
    let Some(pid) = pid else { return Vec::new() };
    let mut out = vec![(0, settled_rss(pid))];
    let mut held = Vec::new();
    for target in [1usize, 10, 100] {
        while held.len() < target {
            let i = held.len();
            let stream = rt.block_on(async {
                let channel =
                    tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{port}"))
                        .ok()?
                        .connect_timeout(Duration::from_secs(3))
                        .connect()
                        .await
                        .ok()?;
                let mut client = PeerClient::new(channel);
                let request = SubscribeRequest {
                    node_id: 0x57a1_1ed0_u64.wrapping_add(i as u64),
                    node_name: format!("stalled{i}"),
                    folders: FOLDERS
                        .iter()
                        .map(|f| FolderCursor {
                            folder: (*f).to_owned(),
                            ..Default::default()
                        })
                        .collect(),
                };
                tokio::time::timeout(Duration::from_secs(10), client.subscribe(request))
                    .await
                    .ok()?
                    .ok()
            });
            match stream {
                Some(s) => held.push(s),
                None => {
                    println!("  subscriber {i} was refused or timed out");
                    break;
                }
            }
        }
        out.push((held.len(), settled_rss(pid)));
    }
    drop(held);
    out
}

// ------------------------------------------------------------------ main

fn main() {
    let bench_start = Instant::now();
    // A worker thread (not current-thread): tonic drives each probe's connection on a spawned
    // task, which must run to close the connection when the probe's channel is dropped. With a
    // current-thread runtime idle between probes, the connection would stay open and hold up
    // the agent's graceful shutdown.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let base_dir = tempfile::Builder::new()
        .prefix("artisync-bench-")
        .tempdir()
        .expect("temp dir");
    let base = base_dir.path();
    let keep = std::env::var_os("ARTISYNC_BENCH_KEEP").is_some();
    let n_runs = runs();

    println!("artisync sync benchmark");
    println!("=======================");
    print_env(base);
    println!(
        "rsync:   {}",
        shell_line("rsync", &["--version"])
            .lines()
            .next()
            .unwrap_or("?")
    );
    println!(
        "agent:   {} (ARTISYNC_LOG=warn, default config: quiet_period 25 ms, inline <= 256 KiB)",
        bin()
    );
    println!(
        "page cache is never dropped: all runs are warm-cache; `sync` (untimed) runs before each (b) run."
    );
    println!(
        "every copy goes to a fresh directory and nothing is deleted until the end (on ext4 without a journal,"
    );
    println!(
        "recently deleted inodes slow down new file creation, which would penalise later runs)."
    );
    if std::env::var("ARTISYNC_BENCH_LOOPFS").is_ok_and(|v| v == "1") {
        println!(
            "ARTISYNC_BENCH_LOOPFS=1: each (b) copy (artisync's B, rsync, rsync + sync) goes to its own fresh"
        );
        println!(
            "1 GiB ext4 loop file system (journaled; images under the bench dir), so no run inherits a filled fs."
        );
    }
    println!();

    // ---------------------------------------------------------------- setup
    // Declared before the agents, so that it is dropped (unmounted) after they are stopped:
    // the loop fs of the last B, which (c) and (a) go on using.
    let mut last_b_fs: Option<LoopFs> = None;
    let ports = free_ports(n_runs + 3).expect("free ports");
    let a = Node::new(base, base, "a", ports[0]);
    // B of each run, made when its run starts (on a loop fs mounted then).
    let mut bs: Vec<Node> = Vec::new();
    let lone = Node::new(base, base, "empty", ports[n_runs + 1]);
    let rsync_port = ports[n_runs + 2];

    let t = Instant::now();
    let (files, bytes) = generate_tree(&a.tree);
    println!(
        "generated on A: {files} files, {:.1} MB ({:.1} MiB) in {:.0} ms (seeded SplitMix64, well-formed XML)",
        bytes as f64 / 1e6,
        bytes as f64 / (1024.0 * 1024.0),
        ms(t.elapsed())
    );
    let expected = file_list(&a.tree);
    assert_eq!(expected.len(), files);
    let want = digest(&a.tree);
    let big = expected.iter().filter(|(_, s)| *s > 256 * 1024).count();
    println!("  of which {big} files > 256 KiB (fetched in chunks rather than inline)\n");

    // ---------------------------------------------------------------- (b) initial sync
    println!("(b) initial sync of the tree into an empty node, {n_runs} runs each");
    println!(
        "  artisync: A serves the tree (restarted per run with the new B as its only peer, SERVING before B"
    );
    println!(
        "  starts); B starts with empty folders and a fresh state_dir. Timed from B's spawn until every file"
    );
    println!(
        "  is at B with A's size (stat'ed in path order every 1 ms), then confirmed by tree_digest(B) =="
    );
    println!("  tree_digest(A) (digest time not counted).");
    println!(
        "  rsync: `rsync -a rsync://127.0.0.1:PORT/tree/ DEST/` against `rsync --daemon` (use chroot = no)"
    );
    println!(
        "  serving A's tree, into a fresh empty DEST; timed from spawn to exit, (+ sync) until `sync` returns."
    );
    let mut rsyncd = RsyncDaemon::start(base, &a.tree, rsync_port);
    let mut art_b = Vec::new();
    let mut rs = Vec::new();
    let mut rs_sync = Vec::new();
    let mut a_first_start = Duration::ZERO;
    let mut a_agent: Option<Agent> = None;
    let mut b_agent: Option<Agent> = None;
    for run in 0..n_runs {
        let name = format!("b{}", run + 1);
        let (b_root, b_fs) = copy_root(base, &name, keep);
        bs.push(Node::new(&b_root, base, &name, ports[1 + run]));
        let b = &bs[run];
        // A serves the tree with B as its only peer (restart: stat-key scan of its own tree).
        if let Some(mut old) = a_agent.take() {
            old.stop();
        }
        a.write_config(&[b]);
        b.write_config(&[&a]);
        let mut agent = a.start();
        let ready = agent.wait_serving(&rt);
        if run == 0 {
            a_first_start = ready;
        }
        a_agent = Some(agent);

        os_sync();
        let mut agent = b.start();
        let took = wait_tree(
            &b.tree,
            &expected,
            &want,
            &mut [a_agent.as_mut().expect("A is running"), &mut agent],
        );
        art_b.push(took);
        println!(
            "  run {}: artisync {:>8.0} ms  (B process start -> B's tree == A's)",
            run + 1,
            ms(took)
        );
        // Let B finish its book-keeping before the reference runs; keep the last B for (c).
        std::thread::sleep(Duration::from_millis(500));
        if run + 1 < n_runs {
            agent.stop();
            drop(b_fs);
        } else {
            b_agent = Some(agent);
            last_b_fs = b_fs;
        }

        let name = format!("rsync-{}", run + 1);
        let (root, dest_fs) = copy_root(base, &name, keep);
        let dest = root.join(&name);
        fs::create_dir_all(&dest).expect("rsync destination");
        os_sync();
        let took = rsyncd.copy(&dest);
        assert!(digest(&dest) == want, "rsync copy differs from A's tree");
        rs.push(took);
        drop(dest_fs);

        let name = format!("rsync-sync-{}", run + 1);
        let (root, dest_fs) = copy_root(base, &name, keep);
        let dest = root.join(&name);
        fs::create_dir_all(&dest).expect("rsync destination");
        os_sync();
        let start = Instant::now();
        rsyncd.copy(&dest);
        os_sync();
        let took = start.elapsed();
        assert!(digest(&dest) == want, "rsync copy differs from A's tree");
        rs_sync.push(took);
        drop(dest_fs);
        println!(
            "         rsync -a {:>8.0} ms   rsync -a + sync {:>8.0} ms",
            ms(rs[run]),
            ms(took)
        );
    }
    rsyncd.stop();
    let (m_art, m_rs, m_rss) = (median(&art_b), median(&rs), median(&rs_sync));
    println!(
        "  median: artisync {:.0} ms, rsync -a {:.0} ms, rsync -a + sync {:.0} ms",
        ms(m_art),
        ms(m_rs),
        ms(m_rss)
    );
    println!(
        "  ratio artisync/rsync = {:.2}x, artisync/(rsync+sync) = {:.2}x",
        m_art.as_secs_f64() / m_rs.as_secs_f64(),
        m_art.as_secs_f64() / m_rss.as_secs_f64()
    );
    println!(
        "  (info) A's first start with an empty index (walk + hash + index {files} files) -> SERVING: {:.0} ms\n",
        ms(a_first_start)
    );

    // ---------------------------------------------------------------- (c) restart scan
    let b = &bs[n_runs - 1];
    let mut b_agent = b_agent.expect("the last B is running");
    println!(
        "(c) no-change restart of B (SIGTERM, start again, until health SERVING), {n_runs} runs"
    );
    let mut restarts = Vec::new();
    let mut stops = Vec::new();
    for run in 0..n_runs {
        std::thread::sleep(Duration::from_millis(300));
        stops.push(b_agent.stop());
        b_agent = b.start();
        let took = b_agent.wait_serving(&rt);
        restarts.push(took);
        println!(
            "  run {}: restart -> SERVING {:>7.1} ms   (previous shutdown took {:.1} ms)",
            run + 1,
            ms(took),
            ms(stops[run])
        );
    }
    assert!(digest(&b.tree) == want, "B's tree changed across restarts");
    let mut hashes = Vec::new();
    let mut stats = Vec::new();
    for _ in 0..n_runs {
        let t = Instant::now();
        let d = digest(&b.tree);
        hashes.push(t.elapsed());
        assert_eq!(d.iter().map(BTreeMap::len).sum::<usize>(), files);
        let t = Instant::now();
        walk_stat(&b.tree);
        stats.push(t.elapsed());
    }
    lone.write_config(&[]);
    let mut empties = Vec::new();
    for _ in 0..n_runs {
        let mut agent = lone.start();
        empties.push(agent.wait_serving(&rt));
        agent.stop();
    }
    let (m_restart, m_hash) = (median(&restarts), median(&hashes));
    println!(
        "  median restart -> SERVING {:.1} ms  (runs: {} ms)",
        ms(m_restart),
        fmt_runs(&restarts)
    );
    println!(
        "  reference: full hash of the tree in-process (walk + read + BLAKE3, warm cache, 1 thread): median {:.1} ms",
        ms(m_hash)
    );
    println!(
        "  reference: walk + lstat only in-process: median {:.1} ms",
        ms(median(&stats))
    );
    println!(
        "  reference: agent with EMPTY folders, no peers, start -> SERVING: median {:.1} ms",
        ms(median(&empties))
    );
    println!(
        "  ratio restart/full-hash = {:.2}x\n",
        m_restart.as_secs_f64() / m_hash.as_secs_f64()
    );

    // ---------------------------------------------------------------- (a) latency
    println!(
        "(a) propagation latency of one {LAT_BYTES}-byte XML write on A until B has the full content"
    );
    println!(
        "  method: {LAT_SAMPLES} distinct files (+{LAT_WARMUP} warm-up, not counted) in synapse-configs/default/api,"
    );
    println!(
        "  written with one fs::write (open/write/close) on A; t0 = just before the write. B's directory is"
    );
    println!(
        "  watched with notify (inotify); after every event, and at least every {} us, B's file is stat'ed and",
        LAT_POLL.as_micros()
    );
    println!(
        "  read, and arrival is the first moment its bytes equal the written ones. One sample at a time,"
    );
    println!(
        "  {} ms gap after each arrival; both agents hold the {files}-file tree (steady state after (c)).",
        LAT_GAP.as_millis()
    );
    let mut a_agent = a_agent.expect("A is running");
    let lat = measure_latency(&a, b, &mut [&mut a_agent, &mut b_agent]);
    let mut sorted = lat.samples.clone();
    sorted.sort();
    let (p50, p90, p99) = (pct(&sorted, 0.5), pct(&sorted, 0.9), pct(&sorted, 0.99));
    let max = sorted.last().copied().unwrap_or_default();
    let min = sorted.first().copied().unwrap_or_default();
    let mut writes = lat.writes.clone();
    writes.sort();
    println!(
        "  n = {}, timeouts (> {LAT_TIMEOUT:?}) = {}",
        sorted.len(),
        lat.timeouts
    );
    println!(
        "  min {:.2}  p50 {:.2}  p90 {:.2}  p99 {:.2}  max {:.2} ms   (the write itself: p50 {:.3} ms)",
        ms(min),
        ms(p50),
        ms(p90),
        ms(p99),
        ms(max),
        ms(pct(&writes, 0.5))
    );
    let mut hist = [0usize; 7];
    for d in &sorted {
        let m = ms(*d);
        let bin = [1.0, 2.0, 5.0, 10.0, 25.0, 50.0]
            .iter()
            .position(|edge| m < *edge)
            .unwrap_or(6);
        hist[bin] += 1;
    }
    println!(
        "  histogram: <1 ms {}, 1-2 {}, 2-5 {}, 5-10 {}, 10-25 {}, 25-50 {}, >=50 {}\n",
        hist[0], hist[1], hist[2], hist[3], hist[4], hist[5], hist[6]
    );

    // ---------------------------------------------------------------- (d) stalled subscribers
    println!("(d) memory of a serving agent with subscribers that never read");
    println!(
        "  A (holding the tree) gets 1, then 10, then 100 subscriptions to both folders from the start, each"
    );
    println!(
        "  on its own connection, none ever read; A's VmRSS once it stops growing (polled every 200 ms, <= 10 s)."
    );
    let stalled = measure_stalled(&rt, a.port, a_agent.pid());
    for (n, kib) in &stalled {
        println!("  {n:>3} stalled: VmRSS {:.1} MiB", *kib as f64 / 1024.0);
    }
    println!();

    // ---------------------------------------------------------------- shut down
    b_agent.stop();
    a_agent.stop();
    drop(last_b_fs);
    let mut log_notes = String::new();
    for node in std::iter::once(&a).chain(bs.iter()).chain([&lone]) {
        let text = strip_ansi(&fs::read_to_string(&node.log).unwrap_or_default());
        let lines: Vec<&str> = text
            .lines()
            .filter(|l| l.contains("WARN") || l.contains("ERROR"))
            .collect();
        if !lines.is_empty() {
            let _ = writeln!(
                log_notes,
                "  {}: {} warning/error lines, first ones:",
                node.name,
                lines.len()
            );
            for l in lines.iter().take(5) {
                let _ = writeln!(log_notes, "    {l}");
            }
        }
    }
    if log_notes.is_empty() {
        println!("agent logs (level warn): empty for every agent\n");
    } else {
        println!("agent logs (level warn):\n{log_notes}");
    }

    // ---------------------------------------------------------------- summary
    let pass = |ok: bool| if ok { "PASS" } else { "MISS" };
    println!("SUMMARY ({files} files, {:.1} MB tree)", bytes as f64 / 1e6);
    println!(
        "{:<44} {:>12} {:>22} {:>9} {:>14}",
        "measurement", "artisync", "reference", "ratio", "target"
    );
    println!("{}", "-".repeat(105));
    let row = |m: &str, v: String, r: String, ratio: String, target: String| {
        println!("{m:<44} {v:>12} {r:>22} {ratio:>9} {target:>14}");
    };
    row(
        "(a) 4 KB write A->B, p50",
        format!("{:.2} ms", ms(p50)),
        "-".into(),
        "-".into(),
        format!("< 5 ms {}", pass(p50 < Duration::from_millis(5))),
    );
    row(
        "(a) 4 KB write A->B, p90",
        format!("{:.2} ms", ms(p90)),
        "-".into(),
        "-".into(),
        "-".into(),
    );
    row(
        "(a) 4 KB write A->B, p99",
        format!("{:.2} ms", ms(p99)),
        "-".into(),
        "-".into(),
        format!(
            "< 25 ms {}",
            pass(p99 < Duration::from_millis(25) && lat.timeouts == 0)
        ),
    );
    row(
        "(a) 4 KB write A->B, max",
        format!("{:.2} ms", ms(max)),
        "-".into(),
        "-".into(),
        "-".into(),
    );
    row(
        &format!("(b) initial sync, median of {n_runs} vs rsync -a"),
        format!("{:.0} ms", ms(m_art)),
        format!("{:.0} ms rsync", ms(m_rs)),
        format!("{:.2}x", m_art.as_secs_f64() / m_rs.as_secs_f64()),
        "-".into(),
    );
    row(
        &format!("(b) initial sync, median of {n_runs} vs rsync+sync"),
        format!("{:.0} ms", ms(m_art)),
        format!("{:.0} ms rsync+sync", ms(m_rss)),
        format!("{:.2}x", m_art.as_secs_f64() / m_rss.as_secs_f64()),
        "-".into(),
    );
    row(
        "(c) no-change restart -> SERVING, median",
        format!("{:.1} ms", ms(m_restart)),
        format!("{:.1} ms full hash", ms(m_hash)),
        format!("{:.2}x", m_restart.as_secs_f64() / m_hash.as_secs_f64()),
        "-".into(),
    );
    row(
        "(c) info: empty-folder agent start -> SERVING",
        format!("{:.1} ms", ms(median(&empties))),
        "-".into(),
        "-".into(),
        "-".into(),
    );
    row(
        "(c) info: walk + lstat of the tree, in-process",
        "-".into(),
        format!("{:.1} ms", ms(median(&stats))),
        "-".into(),
        "-".into(),
    );
    println!(
        "\nbench wall time: {:.1} s; loadavg at the end: {}",
        bench_start.elapsed().as_secs_f64(),
        fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .trim()
    );
    if keep {
        println!("kept the bench's files under {}", base_dir.keep().display());
    }
}
