//! End-to-end benchmark of the DB-backed artifact retriever: real `artisync run` agents (child
//! processes) deploying artifacts from SQLite, PostgreSQL and MariaDB.
//!
//! Run with `cargo bench --bench artifacts`. See `benches/README.md` for what is measured.
//! PostgreSQL (127.0.0.1:5432, user postgres) and MariaDB (127.0.0.1:3306, root) must be
//! running; a backend whose server is unreachable is skipped with a printed reason (a failure
//! when `CI=true`). Every test database is dropped at the end, also after a panic.
//!
//! Every wait below is bounded; a child that outlives its deadline is killed (children are
//! also killed if the bench panics).

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use notify::{RecursiveMode, Watcher};
use sqlx::Row;

use artisync::artifacts::db::testing::{MYSQL_ADMIN, POSTGRES_ADMIN, drop_db, fresh_url};
use artisync::artifacts::db::{ArtifactDb, Backend, DbError, NewArtifact};
use artisync::artifacts::{Bundle, BundleFile};
use artisync::demo::free_ports;
use artisync::model::RelPath;
use common::*;

const BACKENDS: [Backend; 3] = [Backend::Sqlite, Backend::Postgres, Backend::MySql];
/// The gateway label every agent subscribes to and every artifact carries.
const LABEL: &str = "Production and Sandbox";
/// The one folder of every node, and the retriever's target folder.
const FOLDER: &str = "synapse-configs";
/// The retriever's default `poll_interval` (the configs leave it unset).
const POLL_INTERVAL_MS: u64 = 200;

/// (a): agents, samples, warm-ups (not counted), per-sample deadline, fallback poll of the
/// arrival detector (inotify wakes it first), random gap after each arrival. An arrival comes
/// right after an agent's poll, so the gap spans a whole poll interval: otherwise the next
/// publish would always fall at the same phase of the poll timers.
const LAT_AGENTS: usize = 3;
const LAT_SAMPLES: usize = 50;
const LAT_WARMUP: usize = 5;
const LAT_TIMEOUT: Duration = Duration::from_secs(10);
const LAT_POLL: Duration = Duration::from_millis(1);
const LAT_GAP_MS: (u64, u64) = (20, 20 + POLL_INTERVAL_MS);
/// Bound for the first revision to reach the freshly started agents.
const FIRST_DEPLOY_TIMEOUT: Duration = Duration::from_secs(60);
/// Sizes of the two files of the (a) bundle: an API definition and its endpoint.
const API_BYTES: usize = 7_000;
const EP_BYTES: usize = 1_200;

/// (b): artifacts, agent runs per backend, health probe interval, publish deadline.
const START_ARTIFACTS: usize = 2_000;
const START_RUNS: usize = 3;
const START_PROBE: Duration = Duration::from_millis(2);
const PUBLISH_TIMEOUT: Duration = Duration::from_secs(180);
/// The retriever's start-up batch (`DEPLOY_BATCH` in `src/artifacts/retriever.rs`).
const DEPLOY_BATCH: usize = 200;

// ------------------------------------------------------------------ databases

/// Test databases made by `fresh_url`; dropped when this goes (also on panic).
struct Databases {
    urls: Vec<String>,
}

impl Drop for Databases {
    fn drop(&mut self) {
        if self.urls.is_empty() {
            return;
        }
        if let Ok(rt) = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            for url in self.urls.drain(..) {
                let _ = rt.block_on(async {
                    tokio::time::timeout(Duration::from_secs(20), drop_db(&url)).await
                });
            }
        }
    }
}

/// One text value from `query` on `url` (for the environment lines), or why not.
async fn scalar(url: &str, query: &str) -> String {
    sqlx::any::install_default_drivers();
    let go = async {
        let pool = sqlx::any::AnyPoolOptions::new()
            .max_connections(1)
            .acquire_timeout(Duration::from_secs(3))
            .connect(url)
            .await?;
        let row = sqlx::query(sqlx::AssertSqlSafe(query.to_owned()))
            .fetch_one(&pool)
            .await?;
        let v: String = row.try_get(0)?;
        pool.close().await;
        Ok::<_, sqlx::Error>(v)
    };
    match tokio::time::timeout(Duration::from_secs(5), go).await {
        Ok(Ok(v)) => v.lines().next().unwrap_or_default().to_owned(),
        Ok(Err(e)) => format!("? ({e})"),
        Err(_) => "? (timeout)".into(),
    }
}

fn connect(rt: &tokio::runtime::Runtime, url: &str) -> ArtifactDb {
    rt.block_on(ArtifactDb::connect(url))
        .unwrap_or_else(|e| panic!("connect to the test database: {e}"))
}

fn meta(id: &str, name: &str) -> NewArtifact {
    NewArtifact {
        id: id.to_owned(),
        name: name.to_owned(),
        version: "1.0.0".into(),
        tenant: "carbon.super".into(),
        folder: FOLDER.into(),
        labels: vec![LABEL.into()],
    }
}

fn bundle(files: Vec<(String, String)>) -> Bundle {
    Bundle {
        files: files
            .into_iter()
            .map(|(path, text)| BundleFile {
                path: RelPath::new(&path).expect("a valid bundle path"),
                mode: 0o644,
                data: text.into_bytes(),
            })
            .collect(),
    }
}

/// Publishes `items` with `workers` concurrent publishers (each its own transaction).
fn publish_all(
    rt: &tokio::runtime::Runtime,
    db: &ArtifactDb,
    items: &Arc<Vec<(NewArtifact, Bundle)>>,
    workers: usize,
) -> Duration {
    let start = Instant::now();
    let work = async {
        let mut set = tokio::task::JoinSet::new();
        for w in 0..workers {
            let (db, items) = (db.clone(), items.clone());
            set.spawn(async move {
                for (m, b) in items.iter().skip(w).step_by(workers) {
                    db.publish(m, b, artisync::now_ms()).await?;
                }
                Ok::<_, DbError>(())
            });
        }
        while let Some(r) = set.join_next().await {
            r.expect("publisher task")?;
        }
        Ok::<_, DbError>(())
    };
    match rt.block_on(async { tokio::time::timeout(PUBLISH_TIMEOUT, work).await }) {
        Ok(Ok(())) => start.elapsed(),
        Ok(Err(e)) => panic!("publish failed: {e}"),
        Err(_) => panic!("publishing did not finish within {PUBLISH_TIMEOUT:?}"),
    }
}

/// A UUID-shaped id from the seeded generator (lower case, version 4 layout).
fn uuid(rng: &mut Rng) -> String {
    let (a, b) = (rng.next(), rng.next());
    format!(
        "{:08x}-{:04x}-4{:03x}-8{:03x}-{:012x}",
        a >> 32,
        (a >> 16) & 0xffff,
        a & 0xfff,
        b >> 52,
        b & 0xffff_ffff_ffff
    )
}

// ------------------------------------------------------------------ agents

struct Node {
    name: String,
    port: u16,
    folder: PathBuf,
    state: PathBuf,
    config: PathBuf,
    log: PathBuf,
}

impl Node {
    fn new(base: &Path, name: &str, port: u16) -> Self {
        let dir = base.join(name);
        let folder = dir.join(FOLDER);
        fs::create_dir_all(&folder).expect("create the folder root");
        Self {
            name: name.to_owned(),
            port,
            folder,
            state: dir.join("state"),
            config: dir.join("artisync.toml"),
            log: dir.join("agent.log"),
        }
    }

    /// One folder, no peers, a `[retriever]` reading `url` for `label` (poll_interval left
    /// at its default).
    fn write_config(&self, url: &str, mode: &str, label: &str) {
        let text = format!(
            "node = \"{}\"\nlisten = \"127.0.0.1:{}\"\nstate_dir = \"{}\"\n\n\
             [[folder]]\nid = \"{FOLDER}\"\npath = \"{}\"\n\n\
             [retriever]\nartifact_retriever = \"db\"\ndatabase_url = \"{url}\"\n\
             folder = \"{FOLDER}\"\ngateway_labels = [\"{label}\"]\n\
             data_retrieval_mode = \"{mode}\"\nevent_waiting_time = 1\n",
            self.name,
            self.port,
            self.state.display(),
            self.folder.display()
        );
        fs::write(&self.config, text).expect("write config");
    }

    fn start(&self) -> Agent {
        Agent::spawn(&self.name, self.port, &self.config, &self.log, &log_level())
    }

    /// `artisync artifact deployed --config F --json` (stdout through a file: the answer
    /// for 2,000 artifacts is larger than a pipe buffer). Returns the JSON and the CLI's time.
    fn deployed_json(&self) -> (serde_json::Value, Duration) {
        let out_path = self.config.with_extension("deployed.json");
        let out = fs::File::create(&out_path).expect("create the CLI output file");
        let took = run_cmd(
            Command::new(bin())
                .args(["artifact", "deployed", "--json", "--config"])
                .arg(&self.config)
                .stdout(out),
            "artisync artifact deployed",
            CMD_TIMEOUT,
        );
        let text = fs::read_to_string(&out_path).expect("read the CLI output");
        let v = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("artifact deployed --json printed no JSON ({e}): {text}"));
        (v, took)
    }
}

fn log_level() -> String {
    std::env::var("ARTISYNC_BENCH_LOG").unwrap_or_else(|_| "warn".into())
}

// ------------------------------------------------------------------ (a) latency

/// The two files of the (a) artifact at revision `rev`: new content every time.
fn latency_files(rng: &mut Rng, rev: usize) -> Vec<(String, String)> {
    let api_open = format!(
        "<api xmlns=\"http://ws.apache.org/ns/synapse\" name=\"admin--PizzaShackAPI\" context=\"/pizzashack/1.0.0\" version=\"1.0.0\" version-type=\"context\"><!-- bench revision {rev} -->"
    );
    let ep_open = format!(
        "<endpoint xmlns=\"http://ws.apache.org/ns/synapse\" name=\"PizzaShackAPI--vv1.0.0_APIproductionEndpoint\"><http uri-template=\"https://pizza.example.com/v1/r{rev}\"/>"
    );
    vec![
        (
            "default/api/admin--PizzaShackAPI_v1.0.0.xml".into(),
            xml_doc(rng, &api_open, "api", API_BYTES),
        ),
        (
            "default/endpoints/PizzaShackAPI--vv1.0.0_APIproductionEndpoint.xml".into(),
            xml_doc(rng, &ep_open, "endpoint", EP_BYTES),
        ),
    ]
}

/// Whether `root` holds every file of `files` with exactly those bytes.
fn holds(root: &Path, files: &[(String, String)]) -> bool {
    files.iter().all(|(rel, text)| {
        let p = root.join(rel);
        fs::symlink_metadata(&p).is_ok_and(|m| m.len() == text.len() as u64)
            && fs::read(&p).is_ok_and(|got| got == text.as_bytes())
    })
}

/// Waits until every root holds `files`. Returns each root's arrival time since `t0`, or
/// `None` past `timeout`. Woken by `rx` (inotify events), and looks again every `LAT_POLL`.
fn wait_arrival(
    roots: &[PathBuf],
    files: &[(String, String)],
    rx: &mpsc::Receiver<()>,
    t0: Instant,
    timeout: Duration,
) -> Option<Vec<Duration>> {
    let mut at: Vec<Option<Duration>> = vec![None; roots.len()];
    loop {
        for (i, root) in roots.iter().enumerate() {
            if at[i].is_none() && holds(root, files) {
                at[i] = Some(t0.elapsed());
            }
        }
        if at.iter().all(Option::is_some) {
            return Some(at.into_iter().flatten().collect());
        }
        if t0.elapsed() > timeout {
            return None;
        }
        let _ = rx.recv_timeout(LAT_POLL);
    }
}

struct Latency {
    backend: Backend,
    /// Publish start until the last of the agents holds the revision.
    all: Vec<Duration>,
    /// ... until the first one does.
    first: Vec<Duration>,
    /// The in-process `ArtifactDb::publish` call itself.
    publish: Vec<Duration>,
    timeouts: usize,
}

fn measure_latency(
    rt: &tokio::runtime::Runtime,
    base: &Path,
    backend: Backend,
    url: &str,
) -> Latency {
    let name = backend.name();
    let db = connect(rt, url);
    let id = "6f1c2a9e-3b1d-4c2e-9a8f-0d1e2f3a4b5c";
    let m = meta(id, "PizzaShackAPI");
    let mut rng = Rng(0x0A27_1FAC_7000 ^ name.len() as u64);
    let first = latency_files(&mut rng, 0);
    rt.block_on(db.publish(&m, &bundle(first.clone()), artisync::now_ms()))
        .unwrap_or_else(|e| panic!("{name}: first publish: {e}"));

    let ports = free_ports(LAT_AGENTS).expect("free ports");
    let nodes: Vec<Node> = (0..LAT_AGENTS)
        .map(|i| Node::new(base, &format!("{name}-lat{}", i + 1), ports[i]))
        .collect();
    // Started a third of a poll interval apart, so their poll timers are out of phase as
    // for agents started independently (started together, they would poll in step).
    let mut agents: Vec<Agent> = Vec::new();
    for n in &nodes {
        if !agents.is_empty() {
            std::thread::sleep(Duration::from_millis(POLL_INTERVAL_MS / LAT_AGENTS as u64));
        }
        n.write_config(url, "async", LABEL);
        agents.push(n.start());
    }
    for a in &mut agents {
        a.wait_serving(rt);
    }
    let roots: Vec<PathBuf> = nodes.iter().map(|n| n.folder.clone()).collect();
    let (tx, rx) = mpsc::channel::<()>();
    let mut watcher = notify::recommended_watcher(move |_res: notify::Result<notify::Event>| {
        let _ = tx.send(());
    })
    .expect("create the arrival watcher");
    for root in &roots {
        watcher
            .watch(root, RecursiveMode::Recursive)
            .expect("watch an agent's folder");
    }
    let t0 = Instant::now();
    let started = wait_arrival(&roots, &first, &rx, t0, FIRST_DEPLOY_TIMEOUT);
    assert!(
        started.is_some(),
        "{name}: revision 1 not on all agents within {FIRST_DEPLOY_TIMEOUT:?}; log tail:\n{}",
        agents[0].log_tail()
    );

    let mut out = Latency {
        backend,
        all: Vec::with_capacity(LAT_SAMPLES),
        first: Vec::with_capacity(LAT_SAMPLES),
        publish: Vec::with_capacity(LAT_SAMPLES),
        timeouts: 0,
    };
    // Every sample (warm-ups first) for a look afterwards (ARTISYNC_BENCH_KEEP=1).
    let mut log = format!(
        "# sample\tpublish start (unix s)\tpublish call ms\t{}\n",
        nodes
            .iter()
            .map(|n| format!("{} ms", n.name))
            .collect::<Vec<_>>()
            .join("\t")
    );
    for i in 0..LAT_WARMUP + LAT_SAMPLES {
        let files = latency_files(&mut rng, i + 1);
        let b = bundle(files.clone());
        while rx.try_recv().is_ok() {}
        let wall = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let t0 = Instant::now();
        rt.block_on(db.publish(&m, &b, artisync::now_ms()))
            .unwrap_or_else(|e| panic!("{name}: publish: {e}"));
        let published = t0.elapsed();
        let arrived = wait_arrival(&roots, &files, &rx, t0, LAT_TIMEOUT);
        for a in &mut agents {
            a.check_alive();
        }
        let _ = writeln!(
            log,
            "{i}\t{}.{:06}\t{:.3}\t{}",
            wall.as_secs(),
            wall.subsec_micros(),
            ms(published),
            arrived.as_ref().map_or("timeout".into(), |at| at
                .iter()
                .map(|d| format!("{:.3}", ms(*d)))
                .collect::<Vec<_>>()
                .join("\t"))
        );
        if i >= LAT_WARMUP {
            match arrived {
                Some(at) => {
                    out.all.push(at.iter().copied().max().unwrap_or_default());
                    out.first.push(at.iter().copied().min().unwrap_or_default());
                    out.publish.push(published);
                }
                None => out.timeouts += 1,
            }
        }
        let gap = LAT_GAP_MS.0 + rng.below(LAT_GAP_MS.1 - LAT_GAP_MS.0 + 1);
        std::thread::sleep(Duration::from_millis(gap));
    }
    drop(watcher);
    fs::write(base.join(format!("latency-{name}.tsv")), log).expect("write the samples");
    for a in &mut agents {
        a.stop();
    }
    out
}

// ------------------------------------------------------------------ (b) start-up deploy

/// The (b) artifacts: an API (2-6 KB), its endpoint (0.6-1.5 KB) and, for every other one,
/// an in-sequence (0.8-2.5 KB). Deterministic.
fn startup_artifacts() -> Vec<(NewArtifact, Bundle)> {
    let mut rng = Rng(0x0A27_1F57_0A27);
    (0..START_ARTIFACTS)
        .map(|i| {
            let id = uuid(&mut rng);
            let name = format!("{}{}{i:04}API", rng.word(), rng.word());
            let api_open = format!(
                "<api xmlns=\"http://ws.apache.org/ns/synapse\" name=\"admin--{name}\" context=\"/{name}/1.0.0\" version=\"1.0.0\" version-type=\"context\">"
            );
            let ep_open = format!(
                "<endpoint xmlns=\"http://ws.apache.org/ns/synapse\" name=\"{name}--vv1.0.0_APIproductionEndpoint\"><http uri-template=\"https://{name}.internal:8243/v1\"/>"
            );
            let api_size = rng.log_uniform(2_000, 6_000) as usize;
            let ep_size = rng.log_uniform(600, 1_500) as usize;
            let mut files = vec![
                (
                    format!("default/api/admin--{name}_v1.0.0.xml"),
                    xml_doc(&mut rng, &api_open, "api", api_size),
                ),
                (
                    format!("default/endpoints/{name}--vv1.0.0_APIproductionEndpoint.xml"),
                    xml_doc(&mut rng, &ep_open, "endpoint", ep_size),
                ),
            ];
            if i % 2 == 0 {
                let seq_open = format!(
                    "<sequence xmlns=\"http://ws.apache.org/ns/synapse\" name=\"admin--{name}:v1.0.0--In\">"
                );
                let seq_size = rng.log_uniform(800, 2_500) as usize;
                files.push((
                    format!("default/sequences/admin--{name}_v1.0.0--In.xml"),
                    xml_doc(&mut rng, &seq_open, "sequence", seq_size),
                ));
            }
            (meta(&id, &name), bundle(files))
        })
        .collect()
}

struct StartRun {
    serving: Duration,
    /// `source_queries` of `artifact deployed --json`, and when (after SERVING) it was read.
    queries: Option<u64>,
    read_after: Duration,
    deployed: usize,
    startup_done: bool,
    failing: usize,
    /// Files missing or with other bytes than published.
    bad_files: usize,
    first_bad: Option<String>,
}

struct Startup {
    backend: Backend,
    files: usize,
    bytes: u64,
    runs: Vec<StartRun>,
    /// Reference: plain in-process copy (read + write, no fsync) into a fresh dir.
    copies: Vec<Duration>,
    /// The `sync` right after each copy.
    copy_syncs: Vec<Duration>,
    /// Same agent and database, a label with no artifacts: start -> SERVING.
    empty: Vec<Duration>,
}

/// Files of `items` that `root` lacks or holds with other bytes.
fn check_files(root: &Path, items: &[(NewArtifact, Bundle)]) -> (usize, Option<String>) {
    let mut bad = 0;
    let mut first = None;
    for f in items.iter().flat_map(|(_, b)| &b.files) {
        if fs::read(root.join(f.path.as_str())).is_ok_and(|got| got == f.data) {
            continue;
        }
        bad += 1;
        first.get_or_insert_with(|| f.path.to_string());
    }
    (bad, first)
}

/// The reference: every file of `items`, read from `src` and written into the fresh `dest`
/// (directories created once each, no fsync).
fn plain_copy(src: &Path, dest: &Path, items: &[(NewArtifact, Bundle)]) -> Duration {
    let start = Instant::now();
    let mut dirs: BTreeSet<PathBuf> = BTreeSet::new();
    for f in items.iter().flat_map(|(_, b)| &b.files) {
        let to = dest.join(f.path.as_str());
        if let Some(parent) = to.parent() {
            if !dirs.contains(parent) {
                fs::create_dir_all(parent).expect("create a copy directory");
                dirs.insert(parent.to_owned());
            }
        }
        let data = fs::read(src.join(f.path.as_str())).expect("read a deployed file");
        fs::write(&to, data).expect("write a copy");
    }
    start.elapsed()
}

fn measure_startup(
    rt: &tokio::runtime::Runtime,
    base: &Path,
    backend: Backend,
    url: &str,
) -> Startup {
    let name = backend.name();
    let items = Arc::new(startup_artifacts());
    let files = items.iter().map(|(_, b)| b.files.len()).sum();
    let bytes = items.iter().map(|(_, b)| b.size()).sum();
    let db = connect(rt, url);
    // One publisher task on SQLite and MariaDB. SQLite: two deferred transactions that both
    // go on to write can fail at once with SQLITE_BUSY. MariaDB: concurrent first publishes
    // of different artifacts deadlocked (InnoDB gap locks of `SELECT ... FOR UPDATE` and
    // `DELETE` on absent keys; error 1213, not retried by `publish`).
    let workers = if backend == Backend::Postgres { 4 } else { 1 };
    let publish = publish_all(rt, &db, &items, workers);
    drop(db);
    println!(
        "  {name}: published {START_ARTIFACTS} artifacts ({files} files, {:.1} MB) in-process in {:.1} s ({workers} publisher task(s))",
        bytes as f64 / 1e6,
        publish.as_secs_f64()
    );
    let ports = free_ports(START_RUNS + 1).expect("free ports");
    let mut out = Startup {
        backend,
        files,
        bytes,
        runs: Vec::new(),
        copies: Vec::new(),
        copy_syncs: Vec::new(),
        empty: Vec::new(),
    };
    for (run, port) in ports.iter().copied().enumerate().take(START_RUNS) {
        let node = Node::new(base, &format!("{name}-start{}", run + 1), port);
        node.write_config(url, "sync", LABEL);
        os_sync();
        let mut agent = node.start();
        let serving = agent.wait_serving_every(rt, START_PROBE);
        let (v, _) = node.deployed_json();
        let read_after = agent.started.elapsed().saturating_sub(serving);
        let (bad_files, first_bad) = check_files(&node.folder, &items);
        agent.stop();
        let r = StartRun {
            serving,
            queries: v["source_queries"].as_u64(),
            read_after,
            deployed: v["deployed"].as_array().map_or(0, Vec::len),
            startup_done: v["startup_done"] == true,
            failing: v["failing"].as_array().map_or(0, Vec::len),
            bad_files,
            first_bad,
        };
        println!(
            "  run {}: start -> SERVING {:>7.0} ms; deployed {} (startup_done {}, failing {}); files missing/different: {}{}; source_queries {} (read {:.0} ms after SERVING)",
            run + 1,
            ms(r.serving),
            r.deployed,
            r.startup_done,
            r.failing,
            r.bad_files,
            r.first_bad
                .as_ref()
                .map_or(String::new(), |p| format!(" (first: {p})")),
            r.queries.map_or("?".into(), |q| q.to_string()),
            ms(r.read_after)
        );
        out.runs.push(r);

        let dest = base.join(format!("{name}-copy{}", run + 1));
        fs::create_dir_all(&dest).expect("copy destination");
        os_sync();
        let copy = plain_copy(&node.folder, &dest, &items);
        let synced = os_sync();
        println!(
            "         reference: plain copy of the {files} files {:>6.0} ms (+ sync afterwards {:.0} ms)",
            ms(copy),
            ms(synced)
        );
        out.copies.push(copy);
        out.copy_syncs.push(synced);
    }
    let lone = Node::new(base, &format!("{name}-empty"), ports[START_RUNS]);
    lone.write_config(url, "sync", "Nobody");
    for _ in 0..START_RUNS {
        let mut agent = lone.start();
        out.empty.push(agent.wait_serving_every(rt, START_PROBE));
        agent.stop();
    }
    println!(
        "  (info) same agent in sync mode for a label with no artifacts, start -> SERVING: runs {} ms",
        fmt_runs(&out.empty)
    );
    out
}

// ------------------------------------------------------------------ main

fn main() {
    let bench_start = Instant::now();
    // A worker thread (not current-thread), as in benches/sync.rs: each health probe's
    // connection task must run to close the connection when the probe is dropped.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let base_dir = tempfile::Builder::new()
        .prefix("artisync-bench-art-")
        .tempdir()
        .expect("temp dir");
    let base = base_dir.path();
    let keep = std::env::var_os("ARTISYNC_BENCH_KEEP").is_some();

    println!("artisync artifacts benchmark");
    println!("============================");
    print_env(base);
    let pg = rt.block_on(async {
        format!(
            "{}; fsync {}, synchronous_commit {}",
            scalar(POSTGRES_ADMIN, "SELECT version()").await,
            scalar(POSTGRES_ADMIN, "SHOW fsync").await,
            scalar(POSTGRES_ADMIN, "SHOW synchronous_commit").await
        )
    });
    let my = rt.block_on(async {
        format!(
            "{}; innodb_flush_log_at_trx_commit {}",
            scalar(MYSQL_ADMIN, "SELECT version()").await,
            scalar(
                MYSQL_ADMIN,
                "SELECT CAST(@@innodb_flush_log_at_trx_commit AS CHAR)"
            )
            .await
        )
    });
    let lite = rt.block_on(scalar("sqlite::memory:", "SELECT sqlite_version()"));
    println!("postgres: 127.0.0.1:5432 {pg}");
    println!("mariadb:  127.0.0.1:3306 {my}");
    println!("sqlite:   {lite} (file in the bench dir, WAL)");
    println!(
        "agent:    {} (ARTISYNC_LOG={}; retriever: artifact_retriever = \"db\", labels [\"{LABEL}\"],",
        bin(),
        log_level()
    );
    println!(
        "          poll_interval default {POLL_INTERVAL_MS} ms, event_waiting_time 1 ms, no peers)"
    );
    println!(
        "publishing is in-process (ArtifactDb::publish on the bench's own pool), so no CLI process"
    );
    println!(
        "start-up is measured; `artisync artifact publish` adds its process start and DB connect.\n"
    );

    let mut dbs = Databases { urls: Vec::new() };
    let mut fresh = |backend: Backend| -> Option<String> {
        let url = rt.block_on(fresh_url(backend, base))?;
        dbs.urls.push(url.clone());
        Some(url)
    };
    let mut plan: Vec<(Backend, String, String)> = Vec::new();
    for backend in BACKENDS {
        match (fresh(backend), fresh(backend)) {
            (Some(a), Some(b)) => plan.push((backend, a, b)),
            _ => println!("{}: SKIPPED (server unreachable)\n", backend.name()),
        }
    }

    // ---------------------------------------------------------------- (a)
    println!(
        "(a) publish -> deployed on all {LAT_AGENTS} subscribed agents (async mode), one 2-file artifact"
    );
    println!(
        "  method: per backend, {LAT_AGENTS} agents with [retriever] on one fresh database; a new revision of one"
    );
    println!(
        "  artifact (API xml {API_BYTES} B + endpoint xml {EP_BYTES} B, new content each time) is published in-process;"
    );
    println!(
        "  t0 = just before ArtifactDb::publish; arrival = the first moment all {LAT_AGENTS} agents' folders hold both"
    );
    println!(
        "  files with the new bytes (inotify on the folders wakes the checker, fallback poll {} ms).",
        LAT_POLL.as_millis()
    );
    println!(
        "  {LAT_SAMPLES} samples after {LAT_WARMUP} warm-ups, one at a time, random {}-{} ms gap after each arrival",
        LAT_GAP_MS.0, LAT_GAP_MS.1
    );
    println!(
        "  (so publishes fall at random phases of the agents' {POLL_INTERVAL_MS} ms poll timers); the agents are"
    );
    println!(
        "  started {} ms apart so their poll timers are out of phase with each other.",
        POLL_INTERVAL_MS / LAT_AGENTS as u64
    );
    let mut lats = Vec::new();
    for (backend, url, _) in &plan {
        let lat = measure_latency(&rt, base, *backend, url);
        let mut s = lat.all.clone();
        s.sort();
        let mut f = lat.first.clone();
        f.sort();
        let mut p = lat.publish.clone();
        p.sort();
        println!(
            "  {:<8} all {LAT_AGENTS}: min {:.1}  p50 {:.1}  p90 {:.1}  p99 {:.1}  max {:.1} ms;  first agent p50 {:.1} ms;  publish call p50 {:.1} ms;  n = {}, timeouts = {}",
            backend.name(),
            ms(s.first().copied().unwrap_or_default()),
            ms(pct(&s, 0.5)),
            ms(pct(&s, 0.9)),
            ms(pct(&s, 0.99)),
            ms(s.last().copied().unwrap_or_default()),
            ms(pct(&f, 0.5)),
            ms(pct(&p, 0.5)),
            s.len(),
            lat.timeouts
        );
        lats.push(lat);
    }
    println!(
        "  (for a pure {POLL_INTERVAL_MS} ms poll, the last of {LAT_AGENTS} independent pollers wakes after {POLL_INTERVAL_MS} x 0.5^(1/{LAT_AGENTS}) = {:.0} ms at the median)\n",
        POLL_INTERVAL_MS as f64 * 0.5f64.powf(1.0 / LAT_AGENTS as f64)
    );

    // ---------------------------------------------------------------- (b)
    println!(
        "(b) start-up deploy of {START_ARTIFACTS} artifacts into an empty agent (sync mode), {START_RUNS} runs per backend"
    );
    println!(
        "  method: {START_ARTIFACTS} artifacts (2-3 files each) published in-process beforehand on a second fresh"
    );
    println!(
        "  database; each run starts ONE new agent (fresh folder and state_dir) and times process spawn ->"
    );
    println!(
        "  health SERVING (probed every {} ms; in sync mode SERVING = start-up deploy finished). Then",
        START_PROBE.as_millis()
    );
    println!(
        "  `artisync artifact deployed --json` is read at once (source_queries) and every file's bytes are"
    );
    println!(
        "  checked. Reference: plain in-process copy of the same files (read + write, no fsync) from the"
    );
    println!(
        "  agent's folder into a fresh directory. `sync` (untimed) runs before each agent and each copy."
    );
    let mut starts = Vec::new();
    for (backend, _, url) in &plan {
        starts.push(measure_startup(&rt, base, *backend, url));
    }
    println!(
        "  source_queries counts DbSource::db() calls: one per query the retriever issues (the first one"
    );
    println!(
        "  also connects and checks the schema). Expected for a start-up deploy: last_event_id (cursor) +"
    );
    println!(
        "  last_event_id + current_for_labels (reconcile) + one bundles query per {DEPLOY_BATCH} artifacts = {}.\n",
        3 + START_ARTIFACTS.div_ceil(DEPLOY_BATCH)
    );

    // ---------------------------------------------------------------- agent logs
    let mut log_notes = String::new();
    let mut logs: BTreeMap<String, PathBuf> = BTreeMap::new();
    for entry in fs::read_dir(base).into_iter().flatten().flatten() {
        let log = entry.path().join("agent.log");
        if log.exists() {
            logs.insert(entry.file_name().to_string_lossy().into_owned(), log);
        }
    }
    for (node, log) in &logs {
        let text = strip_ansi(&fs::read_to_string(log).unwrap_or_default());
        let lines: Vec<&str> = text
            .lines()
            .filter(|l| l.contains("WARN") || l.contains("ERROR"))
            .collect();
        if !lines.is_empty() {
            let _ = writeln!(
                log_notes,
                "  {node}: {} warning/error lines, first ones:",
                lines.len()
            );
            for l in lines.iter().take(5) {
                let _ = writeln!(log_notes, "    {l}");
            }
        }
    }
    if log_notes.is_empty() {
        println!(
            "agent logs (warnings and errors): none in any of {} agents\n",
            logs.len()
        );
    } else {
        println!("agent logs (warnings and errors):\n{log_notes}");
    }

    // ---------------------------------------------------------------- summary
    let pass = |ok: bool| if ok { "PASS" } else { "MISS" };
    println!("SUMMARY");
    println!(
        "{:<46} {:>10} {:>10} {:>10} {:>22} {:>8} {:>14}",
        "measurement", "p50/median", "p99", "max", "reference", "ratio", "target"
    );
    println!("{}", "-".repeat(126));
    let row = |m: String, a: String, b: String, c: String, r: String, x: String, t: String| {
        println!("{m:<46} {a:>10} {b:>10} {c:>10} {r:>22} {x:>8} {t:>14}");
    };
    for lat in &lats {
        let mut s = lat.all.clone();
        s.sort();
        let (p50, p99) = (pct(&s, 0.5), pct(&s, 0.99));
        let limit = if lat.backend == Backend::Postgres {
            100
        } else {
            POLL_INTERVAL_MS + 50
        };
        let ok = p50 < Duration::from_millis(limit) && lat.timeouts == 0 && !s.is_empty();
        row(
            format!(
                "(a) {} publish -> on all {LAT_AGENTS} agents",
                lat.backend.name()
            ),
            format!("{:.1} ms", ms(p50)),
            format!("{:.1} ms", ms(p99)),
            format!("{:.1} ms", ms(s.last().copied().unwrap_or_default())),
            "-".into(),
            "-".into(),
            format!("p50 < {limit} ms {}", pass(ok)),
        );
    }
    for st in &starts {
        let serving: Vec<Duration> = st.runs.iter().map(|r| r.serving).collect();
        let (m, max) = (
            median(&serving),
            serving.iter().copied().max().unwrap_or_default(),
        );
        let copy = median(&st.copies);
        let complete = st.runs.iter().all(|r| {
            r.bad_files == 0 && r.deployed == START_ARTIFACTS && r.startup_done && r.failing == 0
        });
        row(
            format!(
                "(b) {} {START_ARTIFACTS} artifacts start -> SERVING",
                st.backend.name()
            ),
            format!("{:.0} ms", ms(m)),
            "-".into(),
            format!("{:.0} ms", ms(max)),
            format!("{:.0} ms plain copy", ms(copy)),
            format!("{:.1}x", m.as_secs_f64() / copy.as_secs_f64()),
            format!(
                "< 5 s {}",
                pass(m < Duration::from_secs(5) && max < Duration::from_secs(5) && complete)
            ),
        );
        let queries: Vec<String> = st
            .runs
            .iter()
            .map(|r| r.queries.map_or("?".into(), |q| q.to_string()))
            .collect();
        row(
            format!("(b) {} DB queries during start-up", st.backend.name()),
            queries.join("/"),
            "-".into(),
            "-".into(),
            format!("{} expected", 3 + START_ARTIFACTS.div_ceil(DEPLOY_BATCH)),
            "-".into(),
            "-".into(),
        );
        row(
            format!("(b) {} all files verified", st.backend.name()),
            if complete { "yes" } else { "NO" }.into(),
            "-".into(),
            "-".into(),
            format!("{} files, {:.1} MB", st.files, st.bytes as f64 / 1e6),
            "-".into(),
            "-".into(),
        );
        let copy_sync: Vec<Duration> = st
            .copies
            .iter()
            .zip(&st.copy_syncs)
            .map(|(c, s)| *c + *s)
            .collect();
        let cs = median(&copy_sync);
        row(
            format!("(b) {} info: vs plain copy + sync", st.backend.name()),
            format!("{:.0} ms", ms(m)),
            "-".into(),
            "-".into(),
            format!("{:.0} ms copy+sync", ms(cs)),
            format!("{:.1}x", m.as_secs_f64() / cs.as_secs_f64()),
            "-".into(),
        );
        row(
            format!(
                "(b) {} info: empty-label agent -> SERVING",
                st.backend.name()
            ),
            format!("{:.0} ms", ms(median(&st.empty))),
            "-".into(),
            "-".into(),
            "-".into(),
            "-".into(),
            "-".into(),
        );
    }
    println!(
        "\nbench wall time: {:.1} s; loadavg at the end: {}",
        bench_start.elapsed().as_secs_f64(),
        fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .trim()
    );
    let n = dbs.urls.len();
    drop(dbs);
    println!(
        "dropped the {n} test databases (PostgreSQL, MariaDB; SQLite files go with the bench dir)"
    );
    if keep {
        println!("kept the bench's files under {}", base_dir.keep().display());
    }
}
