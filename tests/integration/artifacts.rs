//! The DB-backed artifact saver and retriever end to end, on every database backend: artifacts
//! are published with the CLI, agents subscribed to gateway labels deploy them into their
//! folder, follow publish/remove events, keep what they have while the database is down and
//! reconcile when it is back; sync start-up holds health at NOT_SERVING; hub mode serves
//! agents that have no database credentials.
//!
//! Every scenario is one function taking a [`Backend`]; `per_backend!` makes the three tests
//! (`<scenario>::sqlite`, `::postgres`, `::mysql`). PostgreSQL and MariaDB tests skip with a
//! printed reason when their server is unreachable, except in CI (`CI=true`), where they fail.
//! Retriever nodes have no peers, so the mesh never blurs what each node retrieved (except in
//! the mesh scenario).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use artisync::artifacts::db::Backend;
use serde_json::Value;

use crate::common::db::{
    FreshDb, RETRIEVE_TIMEOUT, block_on, contents, per_backend, retriever_status, tree_is,
    wait_failing,
};
use crate::common::proxy::Proxy;
use crate::common::*;

const A: &str = "6f1c2a9e-3b1d-4c2e-9a8f-0d1e2f3a4b5c";
const B: &str = "0b6f7d4e-1c2a-4f3b-8e9d-5a6b7c8d9e0f";
const C: &str = "c3a1e2f4-5b6d-4e7f-8a9b-0c1d2e3f4a5b";
const D: &str = "d4b2f3a5-6c7e-4f8a-9b0c-1d2e3f4a5b6c";

/// Files of an artifact revision: (path below the folder root, content).
type Files = &'static [(&'static str, &'static str)];

const A1: Files = &[
    (
        "default/api/PizzaShackAPI_v1.0.0.xml",
        "<api name=\"PizzaShackAPI\" context=\"/pizzashack/1.0.0\" version=\"1.0.0\"/>\n",
    ),
    (
        "default/sequences/PizzaShackAPI_v1.0.0_in.xml",
        "<sequence name=\"PizzaShackAPI_v1.0.0_in\"><log level=\"full\"/></sequence>\n",
    ),
];
/// A's second revision: the API changed, the sequence dropped, an endpoint added.
const A2: Files = &[
    (
        "default/api/PizzaShackAPI_v1.0.0.xml",
        "<api name=\"PizzaShackAPI\" context=\"/pizzashack/1.0.0\" version=\"1.0.0\" description=\"rev 2\"/>\n",
    ),
    (
        "default/endpoints/PizzaShackAPI_v1.0.0_prod.xml",
        "<endpoint name=\"PizzaShackAPI_v1.0.0_prod\"><http uri-template=\"https://pizza.example/v1\"/></endpoint>\n",
    ),
];
const B1: Files = &[
    (
        "default/api/WeatherAPI_v2.0.0.xml",
        "<api name=\"WeatherAPI\" context=\"/weather/2.0.0\" version=\"2.0.0\"/>\n",
    ),
    (
        "default/local-entries/WeatherAPI_v2.0.0_swagger.xml",
        "<localEntry key=\"WeatherAPI_v2.0.0_swagger\">{}</localEntry>\n",
    ),
];
const C1: Files = &[(
    "default/api/CalculatorAPI_v1.0.0.xml",
    "<api name=\"CalculatorAPI\" context=\"/calc/1.0.0\" version=\"1.0.0\"/>\n",
)];
const D1: Files = &[(
    "default/api/StoreAPI_v1.0.0.xml",
    "<api name=\"StoreAPI\" context=\"/store/1.0.0\" version=\"1.0.0\"/>\n",
)];

/// How long "nothing changes" and "still NOT_SERVING" are watched.
const HOLD: Duration = Duration::from_secs(1);

per_backend!(
    startup_deploys_only_the_nodes_labels,
    publish_and_remove_follow_events,
    sync_mode_serves_only_after_the_startup_deploy,
    database_outage_keeps_files_and_reconciles_after,
    hub_mode_serves_nodes_without_database_credentials,
    mesh_peers_retrieving_the_same_label_do_not_conflict,
    bad_publish_input_is_refused,
    shared_paths_are_reference_counted_and_conflicts_reported,
);

/// The database of one test.
type TestDb = FreshDb;

impl FreshDb {
    /// `--db URL` for the CLI.
    fn target(&self) -> [&str; 2] {
        ["--db", &self.url]
    }

    /// The database server's address (PostgreSQL and MariaDB).
    fn server(&self) -> SocketAddr {
        let (_, after) = self.url.split_once('@').expect("URL with user@host");
        let host_port = after.split('/').next().expect("host:port");
        host_port.parse().expect("a loopback socket address")
    }

    /// The URL with its server port replaced by `port` (a proxy's).
    fn via(&self, port: u16) -> String {
        let server = self.server();
        self.url.replacen(
            &server.to_string(),
            &SocketAddr::new(server.ip(), port).to_string(),
            1,
        )
    }
}

fn sqlite_url(path: &Path) -> String {
    format!("sqlite://{}", path.display())
}

/// Runs the CLI (no `--config` added).
fn artisync(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("run {BIN} {args:?}: {e}"))
}

/// Runs the CLI, fails the test unless it succeeds; returns stdout.
fn artisync_ok(args: &[&str]) -> String {
    let out = artisync(args);
    assert!(
        out.status.success(),
        "artisync {args:?} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Writes `files` into a new temp dir (a bundle's `--from`).
fn source_dir(files: Files) -> tempfile::TempDir {
    let dir = tempfile::Builder::new()
        .prefix("artisync-it-bundle-")
        .tempdir()
        .expect("temp dir");
    for (rel, content) in files {
        write(&dir.path().join(rel), content);
    }
    dir
}

/// `artisync artifact publish TARGET --id ID ... --from (files)`; returns the new revision.
fn publish(target: &[&str], id: &str, labels: &[&str], files: Files) -> i64 {
    let from = source_dir(files);
    let from = from.path().to_str().expect("utf-8 temp path");
    let mut args = vec!["artifact", "publish"];
    args.extend_from_slice(target);
    args.extend_from_slice(&["--id", id, "--name", "TestAPI", "--version", "1.0.0"]);
    for l in labels {
        args.extend_from_slice(&["--label", l]);
    }
    args.extend_from_slice(&["--from", from]);
    let out = artisync_ok(&args);
    let revision = out
        .split_whitespace()
        .skip_while(|w| *w != "revision")
        .nth(1)
        .and_then(|r| r.parse().ok())
        .unwrap_or_else(|| panic!("publish printed no revision: {out}"));
    assert!(out.contains(id), "publish names the artifact: {out}");
    revision
}

/// `artisync artifact remove TARGET --id ID`.
fn remove(target: &[&str], id: &str) {
    let mut args = vec!["artifact", "remove"];
    args.extend_from_slice(target);
    args.extend_from_slice(&["--id", id]);
    let out = artisync_ok(&args);
    assert!(out.contains(id), "remove names the artifact: {out}");
}

/// The `[retriever]` section of a node reading the database itself (first retry after 200 ms).
fn db_retriever(url: &str, labels: &[&str], extra: &str) -> String {
    db_retriever_retrying(url, labels, 200, extra)
}

/// [`db_retriever`] with the first retry after `retry_ms`.
fn db_retriever_retrying(url: &str, labels: &[&str], retry_ms: u64, extra: &str) -> String {
    format!(
        "\n[retriever]\nartifact_retriever = \"db\"\ndatabase_url = \"{url}\"\n{}",
        retriever_common(labels, retry_ms, extra)
    )
}

/// The `[retriever]` section of a node that asks a hub agent (no database URL).
fn hub_retriever(hub_port: u16, labels: &[&str]) -> String {
    format!(
        "\n[retriever]\nartifact_retriever = \"hub\"\nhub = \"http://127.0.0.1:{hub_port}\"\n{}",
        retriever_common(labels, 200, "")
    )
}

fn retriever_common(labels: &[&str], retry_ms: u64, extra: &str) -> String {
    format!(
        "gateway_labels = {labels:?}\npoll_interval = 50\nevent_waiting_time = 1\n\
         deployment_retry_duration = {retry_ms}\nmax_retry_count = 20\n{extra}"
    )
}

/// A node without peers, with `retriever` appended to its config (not started).
fn lone_node(name: &str, retriever: &str) -> Node {
    let port = artisync::demo::free_ports(1).expect("reserve a loopback port")[0];
    let node = Node::new(name, port, &[]);
    node.append_config(retriever);
    node
}

/// The exact tree a folder should hold: the union of `sets`.
fn expected(sets: &[Files]) -> BTreeMap<String, Vec<u8>> {
    sets.iter()
        .flat_map(|s| s.iter())
        .map(|(p, c)| (p.to_string(), c.as_bytes().to_vec()))
        .collect()
}

/// Waits until the node's synapse folder holds exactly the files of `sets`, byte for byte.
fn wait_tree(node: &Node, what: &str, sets: &[Files]) {
    let want = expected(sets);
    wait_for(
        RETRIEVE_TIMEOUT,
        format!("node {}: {what}", node.name),
        || tree_is(&node.synapse(), &want),
    );
}

/// `artisync artifact deployed --json` of a node.
fn deployed_json(node: &Node) -> Value {
    let out = node.cli(&["artifact", "deployed", "--json"]);
    assert!(
        out.status.success(),
        "artifact deployed on {} failed: {}",
        node.name,
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "artifact deployed --json printed no JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

/// (id, revision) of every deployed artifact, sorted.
fn deployed(v: &Value) -> Vec<(String, i64)> {
    let mut list: Vec<(String, i64)> = v["deployed"]
        .as_array()
        .unwrap_or_else(|| panic!("no deployed list in {v}"))
        .iter()
        .map(|d| {
            (
                d["id"].as_str().expect("deployed id").to_owned(),
                d["revision"].as_i64().expect("deployed revision"),
            )
        })
        .collect();
    list.sort();
    list
}

fn ids(list: &[(&str, i64)]) -> Vec<(String, i64)> {
    let mut v: Vec<(String, i64)> = list.iter().map(|(i, r)| (i.to_string(), *r)).collect();
    v.sort();
    v
}

/// Waits until `artifact deployed --json` lists exactly `want` (ids and revisions).
fn wait_deployed(node: &Node, want: &[(&str, i64)]) -> Value {
    let want = ids(want);
    wait_for(
        RETRIEVE_TIMEOUT,
        format!("node {} to list {want:?} as deployed", node.name),
        || {
            let v = deployed_json(node);
            let got = deployed(&v);
            if got == want {
                Ok(v)
            } else {
                Err(format!("deployed {got:?}"))
            }
        },
    )
}

/// A published on L1, B on L2; node x subscribed to L1 and y to L2, both started, both
/// converged on their artifact.
fn two_label_nodes(db: &TestDb) -> (Node, Node) {
    assert_eq!(publish(&db.target(), A, &["L1"], A1), 1);
    assert_eq!(publish(&db.target(), B, &["L2"], B1), 1);
    let mut x = lone_node("x", &db_retriever(&db.url, &["L1"], ""));
    let mut y = lone_node("y", &db_retriever(&db.url, &["L2"], ""));
    x.start();
    y.start();
    wait_tree(&x, "A's files only (label L1)", &[A1]);
    wait_tree(&y, "B's files only (label L2)", &[B1]);
    (x, y)
}

// ---------------------------------------------------------------------------------------------
// 1. Start-up deploy (async mode) and label filtering.

fn startup_deploys_only_the_nodes_labels(backend: Backend) {
    let Some(db) = TestDb::new(backend) else {
        return;
    };
    let (x, y) = two_label_nodes(&db);

    let vx = wait_deployed(&x, &[(A, 1)]);
    let vy = wait_deployed(&y, &[(B, 1)]);
    assert_eq!(
        vx["deployed"][0]["labels"],
        serde_json::json!(["L1"]),
        "{vx}"
    );
    assert_eq!(vx["deployed"][0]["folder"], SYNAPSE, "{vx}");
    let mut paths: Vec<&str> = vx["deployed"][0]["paths"]
        .as_array()
        .expect("paths")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    paths.sort();
    assert_eq!(
        paths,
        A1.iter().map(|(p, _)| *p).collect::<Vec<_>>(),
        "{vx}"
    );
    assert_eq!(
        vy["deployed"][0]["labels"],
        serde_json::json!(["L2"]),
        "{vy}"
    );
    for (node, v) in [(&x, &vx), (&y, &vy)] {
        assert_eq!(v["mode"], "async", "{}: {v}", node.name);
        assert_eq!(v["startup_done"], true, "{}: {v}", node.name);
        assert_eq!(v["source_available"], true, "{}: {v}", node.name);
        assert_eq!(v["failing"], serde_json::json!([]), "{}: {v}", node.name);
    }
    // Exactly the node's artifact: nothing of the other label arrives later either.
    holds_for(Duration::from_millis(300), "label filtering", || {
        tree_is(&x.synapse(), &expected(&[A1]))?;
        tree_is(&y.synapse(), &expected(&[B1]))
    });
}

// ---------------------------------------------------------------------------------------------
// 2. A new revision is deployed (changed, added and dropped files); remove undeploys.

fn publish_and_remove_follow_events(backend: Backend) {
    let Some(db) = TestDb::new(backend) else {
        return;
    };
    let (x, y) = two_label_nodes(&db);
    wait_deployed(&x, &[(A, 1)]);

    assert_eq!(publish(&db.target(), A, &["L1"], A2), 2);
    wait_tree(
        &x,
        "A's revision 2 (changed + added, dropped file removed)",
        &[A2],
    );
    wait_deployed(&x, &[(A, 2)]);
    holds_for(
        Duration::from_millis(300),
        "y unaffected by A's revision 2",
        || tree_is(&y.synapse(), &expected(&[B1])),
    );
    assert_eq!(deployed(&deployed_json(&y)), ids(&[(B, 1)]));

    remove(&db.target(), A);
    wait_tree(&x, "A undeployed after remove", &[]);
    wait_deployed(&x, &[]);
    tree_is(&y.synapse(), &expected(&[B1])).unwrap_or_else(|e| panic!("y after remove: {e}"));
    assert_eq!(deployed(&deployed_json(&y)), ids(&[(B, 1)]));

    // The store says so too.
    let list: Value = serde_json::from_str(&artisync_ok(&[
        "artifact", "list", "--db", &db.url, "--json",
    ]))
    .expect("list --json");
    let a = list
        .as_array()
        .expect("list")
        .iter()
        .find(|m| m["id"] == A)
        .unwrap_or_else(|| panic!("A not listed: {list}"));
    assert_eq!(a["removed"], true, "{a}");
    assert_eq!(a["revision"], 2, "{a}");
}

// ---------------------------------------------------------------------------------------------
// 3. Sync mode: NOT_SERVING while the database is down at start-up; SERVING only once the
//    start-up deploy is done.

fn sync_mode_serves_only_after_the_startup_deploy(backend: Backend) {
    let Some(db) = TestDb::new(backend) else {
        return;
    };
    // The node's database is not reachable yet: a proxy that is not started, or (SQLite) a
    // file in a directory that does not exist yet. A is already in the database it will find.
    let mut proxy = None;
    let (node_url, staged) = match db.backend {
        Backend::Sqlite => {
            let staging = db.dir().join("staging");
            std::fs::create_dir(&staging).expect("mkdir staging");
            let live = db.dir().join("live");
            assert_eq!(
                publish(
                    &["--db", &sqlite_url(&staging.join("art.db"))],
                    A,
                    &["L1"],
                    A1
                ),
                1
            );
            (sqlite_url(&live.join("art.db")), Some((staging, live)))
        }
        _ => {
            assert_eq!(publish(&db.target(), A, &["L1"], A1), 1);
            let p = Proxy::new(db.server());
            let url = db.via(p.port());
            proxy = Some(p);
            (url, None)
        }
    };
    let mut node = lone_node(
        "s",
        &db_retriever(&node_url, &["L1"], "data_retrieval_mode = \"sync\"\n"),
    );
    node.start_no_wait();
    wait_for(
        Duration::from_secs(30),
        "the sync-mode node to answer health checks with NOT_SERVING",
        || match node.health() {
            Ok(HealthStatus::NotServing) => Ok(()),
            other => Err(format!("{other:?}")),
        },
    );
    holds_for(
        HOLD,
        "NOT_SERVING while the database is down",
        || match node.health() {
            Ok(HealthStatus::NotServing) => Ok(()),
            other => Err(format!("health {other:?}")),
        },
    );
    assert!(contents(&node.synapse()).is_empty(), "nothing deployed yet");
    // The failed attempt is reported (a connection attempt to a server that refuses can take
    // the pool's 3 s acquire timeout), and health is still NOT_SERVING after it.
    let r = wait_for(
        RETRIEVE_TIMEOUT,
        "status to report the failed start-up retrieval",
        || {
            let r = retriever_status(&node);
            if r["last_error"].is_string() {
                Ok(r)
            } else {
                Err(format!("retriever status {r}"))
            }
        },
    );
    assert_eq!(r["mode"], "sync", "{r}");
    assert_eq!(r["startup_done"], false, "{r}");
    assert_eq!(r["source_available"], false, "{r}");
    assert_eq!(node.health(), Ok(HealthStatus::NotServing));

    // The database comes up.
    match (&mut proxy, staged) {
        (Some(p), _) => p.start(),
        (None, Some((staging, live))) => {
            std::fs::rename(&staging, &live).expect("move the database into place")
        }
        (None, None) => unreachable!(),
    }
    wait_for(
        RETRIEVE_TIMEOUT,
        "the node to report SERVING once the database is up",
        || match node.health() {
            Ok(HealthStatus::Serving) => Ok(()),
            other => Err(format!("{other:?}")),
        },
    );
    // SERVING in sync mode means the start-up deploy is done: A is there already.
    tree_is(&node.synapse(), &expected(&[A1]))
        .unwrap_or_else(|e| panic!("SERVING before A was deployed: {e}"));
    let v = deployed_json(&node);
    assert_eq!(deployed(&v), ids(&[(A, 1)]), "{v}");
    assert_eq!(v["startup_done"], true, "{v}");
    assert_eq!(v["source_available"], true, "{v}");
}

// ---------------------------------------------------------------------------------------------
// 4. The database goes away under a running node: files stay; what changed meanwhile is
//    reconciled once it is back.

fn database_outage_keeps_files_and_reconciles_after(backend: Backend) {
    let Some(db) = TestDb::new(backend) else {
        return;
    };
    match db.backend {
        Backend::Sqlite => sqlite_outage(&db),
        _ => server_outage(&db),
    }
}

/// PostgreSQL / MariaDB: the node reaches the server through a proxy that is stopped (every
/// connection cut) and started again; meanwhile the database changes.
fn server_outage(db: &TestDb) {
    let mut proxy = Proxy::new(db.server());
    proxy.start();
    publish(&db.target(), A, &["L1"], A1);
    publish(&db.target(), C, &["L1"], C1);
    let mut node = lone_node("o", &db_retriever(&db.via(proxy.port()), &["L1"], ""));
    node.start();
    wait_tree(&node, "A and C deployed", &[A1, C1]);
    wait_deployed(&node, &[(A, 1), (C, 1)]);

    proxy.stop();
    wait_until(
        RETRIEVE_TIMEOUT,
        "status to report the source unavailable",
        || retriever_status(&node)["source_available"] == false,
    );
    // Changes the node cannot see now: straight into the database, not through the proxy.
    assert_eq!(publish(&db.target(), A, &["L1"], A2), 2);
    remove(&db.target(), C);
    outage_holds(&mut node);

    proxy.start();
    after_outage(&node);
}

/// SQLite: an open SQLite file cannot be taken away from a running process (its open file
/// descriptors keep working after a rename), so the outage starts while the agent is stopped:
/// the database directory is moved away, the agent restarts without it, and the directory is
/// moved back while it runs.
fn sqlite_outage(db: &TestDb) {
    let live = db.dir().join("live");
    let away = db.dir().join("away");
    std::fs::create_dir(&live).expect("mkdir");
    let live_url = sqlite_url(&live.join("art.db"));
    publish(&["--db", &live_url], A, &["L1"], A1);
    publish(&["--db", &live_url], C, &["L1"], C1);
    let mut node = lone_node("o", &db_retriever(&live_url, &["L1"], ""));
    node.start();
    wait_tree(&node, "A and C deployed", &[A1, C1]);
    wait_deployed(&node, &[(A, 1), (C, 1)]);

    node.stop();
    std::fs::rename(&live, &away).expect("move the database away");
    node.start(); // async mode: serves at once
    wait_until(
        RETRIEVE_TIMEOUT,
        "status to report the source unavailable",
        || {
            let r = retriever_status(&node);
            r["source_available"] == false && r["last_error"].is_string()
        },
    );
    let away_url = sqlite_url(&away.join("art.db"));
    assert_eq!(publish(&["--db", &away_url], A, &["L1"], A2), 2);
    remove(&["--db", &away_url], C);
    outage_holds(&mut node);

    std::fs::rename(&away, &live).expect("move the database back");
    after_outage(&node);
}

/// While the database is unreachable: the node keeps A1 and C, keeps serving, and says the
/// source is down.
fn outage_holds(node: &mut Node) {
    let want = expected(&[A1, C1]);
    holds_for(
        HOLD,
        "deployed files kept while the database is down",
        || tree_is(&node.synapse(), &want),
    );
    assert_eq!(node.health(), Ok(HealthStatus::Serving));
    let r = retriever_status(node);
    assert_eq!(r["source_available"], false, "{r}");
    assert_eq!(deployed(&r), ids(&[(A, 1), (C, 1)]), "{r}");
}

/// Once the database is back: A's revision 2 is deployed and C undeployed.
fn after_outage(node: &Node) {
    wait_tree(node, "A's revision 2 and no C after reconnecting", &[A2]);
    wait_deployed(node, &[(A, 2)]);
    wait_until(
        RETRIEVE_TIMEOUT,
        "status to report the source available again",
        || retriever_status(node)["source_available"] == true,
    );
}

// ---------------------------------------------------------------------------------------------
// 5. Hub mode: nodes without database credentials retrieve through an agent that has them;
//    publish and remove go through that agent's saver.

fn hub_mode_serves_nodes_without_database_credentials(backend: Backend) {
    let Some(db) = TestDb::new(backend) else {
        return;
    };
    let mut hub = lone_node("hub", &db_retriever(&db.url, &["L1"], ""));
    hub.start();
    let hub_addr = format!("http://127.0.0.1:{}", hub.port);
    let mut subscribers: Vec<Node> = ["s1", "s2"]
        .iter()
        .map(|name| lone_node(name, &hub_retriever(hub.port, &["L1"])))
        .collect();
    for s in &mut subscribers {
        let config = std::fs::read_to_string(s.config()).expect("read config");
        assert!(
            !config.contains("database_url") && !config.contains(&db.url),
            "a hub subscriber has no database URL:\n{config}"
        );
        s.start();
    }

    let via_hub = ["--hub", hub_addr.as_str()];
    assert_eq!(publish(&via_hub, A, &["L1"], A1), 1);
    assert_eq!(publish(&via_hub, B, &["L2"], B1), 1);
    for s in &subscribers {
        wait_tree(s, "A (label L1) through the hub, not B (L2)", &[A1]);
        let v = wait_deployed(s, &[(A, 1)]);
        assert!(
            v["source"].as_str().is_some_and(|src| src.contains("hub")),
            "{}: {v}",
            s.name
        );
    }
    wait_tree(&hub, "A on the hub node itself", &[A1]);

    remove(&via_hub, A);
    for s in &subscribers {
        wait_tree(s, "A undeployed after remove through the hub", &[]);
        wait_deployed(s, &[]);
    }
    wait_tree(&hub, "A undeployed on the hub node itself", &[]);
}

// ---------------------------------------------------------------------------------------------
// 6. Two mesh peers both retrieve the same label into the synced folder: identical trees, no
//    conflict copies.

fn mesh_peers_retrieving_the_same_label_do_not_conflict(backend: Backend) {
    let Some(db) = TestDb::new(backend) else {
        return;
    };
    let mut cluster = Cluster::new(&[&[1], &[0]]);
    for node in &cluster.nodes {
        node.append_config(&db_retriever(&db.url, &["L1"], ""));
    }
    cluster.start_all();

    let no_conflicts = |cluster: &Cluster| -> Result<(), String> {
        for node in &cluster.nodes {
            let copies = node.conflict_copies();
            if !copies.is_empty() {
                return Err(format!("{} has conflict copies {copies:?}", node.name));
            }
        }
        Ok(())
    };
    let check_converged = |cluster: &Cluster, sets: &[Files], what: &str| {
        for node in &cluster.nodes {
            wait_tree(node, what, sets);
        }
        let want = expected(sets);
        holds_for(
            Duration::from_millis(500),
            format!("{what}, no conflict"),
            || {
                for node in &cluster.nodes {
                    tree_is(&node.synapse(), &want)?;
                }
                no_conflicts(cluster)
            },
        );
        for node in &cluster.nodes {
            let listed = node.conflicts_json();
            assert!(
                listed.is_empty(),
                "{} lists conflicts {listed:?}",
                node.name
            );
        }
    };

    publish(&db.target(), A, &["L1"], A1);
    publish(&db.target(), C, &["L1"], C1);
    check_converged(&cluster, &[A1, C1], "A and C on both peers");
    publish(&db.target(), A, &["L1"], A2);
    check_converged(&cluster, &[A2, C1], "A's revision 2 on both peers");
    remove(&db.target(), C);
    check_converged(&cluster, &[A2], "C removed on both peers");
    for node in &cluster.nodes {
        wait_deployed(node, &[(A, 2)]);
    }
}

// ---------------------------------------------------------------------------------------------
// 7. Bad input is refused with a clear message, and nothing is stored.

fn bad_publish_input_is_refused(backend: Backend) {
    let Some(db) = TestDb::new(backend) else {
        return;
    };
    let good = source_dir(A1);
    let good = good.path().to_str().expect("utf-8");
    let base = |id: &'static str, from: &str| -> Vec<String> {
        [
            "artifact",
            "publish",
            "--db",
            &db.url,
            "--id",
            id,
            "--name",
            "N",
            "--version",
            "1",
            "--label",
            "L1",
            "--from",
            from,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    let refused = |args: &[String], needle: &str| {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = artisync(&args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success(),
            "artisync {args:?} should fail; stdout: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        assert!(
            stderr.contains(needle),
            "artisync {args:?}: stderr should name {needle:?}: {stderr}"
        );
    };

    refused(&base("not-a-uuid", good), "--id");

    let with_link = source_dir(A1);
    std::os::unix::fs::symlink("/etc/passwd", with_link.path().join("default/api/link.xml"))
        .expect("symlink");
    refused(
        &base(A, with_link.path().to_str().expect("utf-8")),
        "symlink",
    );

    let mut oracle = base(A, good);
    oracle[3] = "oracle://x".into();
    refused(&oracle, "must start with sqlite:");
    refused(
        &[
            "artifact".into(),
            "remove".into(),
            "--db".into(),
            "oracle://x".into(),
            "--id".into(),
            A.into(),
        ],
        "must start with sqlite:",
    );

    // Nothing was stored by the refused publishes.
    let list = artisync_ok(&["artifact", "list", "--db", &db.url, "--json"]);
    let list: Value = serde_json::from_str(&list).expect("list --json");
    assert_eq!(list, serde_json::json!([]), "nothing stored");
}

/// A corrupt bundle in the database: the retriever skips it, reports it as failing, and
/// every other artifact (already there, or published later) still deploys.
#[test]
fn corrupt_bundle_is_skipped_and_reported() {
    let Some(db) = TestDb::new(Backend::Sqlite) else {
        return;
    };
    publish(&db.target(), B, &["L1"], B1);
    publish(&db.target(), C, &["L1"], C1);
    // Corrupt one chunk of C's bundle.
    block_on(async {
        let pool = sqlx::sqlite::SqlitePoolOptions::new()
            .max_connections(1)
            .connect(&db.url)
            .await
            .expect("open the SQLite database");
        let done = sqlx::query(
            "UPDATE artifact_files SET data = ? WHERE artifact_id = ? AND file_no = 0 AND chunk = 0",
        )
        .bind(b"<api name=\"tampered\"/>".to_vec())
        .bind(C)
        .execute(&pool)
        .await
        .expect("corrupt C's bundle");
        assert_eq!(done.rows_affected(), 1);
        pool.close().await;
    });

    // A long first retry delay: anything deployed within the test's bounds was deployed by
    // the event path, not by a retry of the start-up pass.
    let mut node = lone_node("k", &db_retriever_retrying(&db.url, &["L1"], 60_000, ""));
    node.start();
    wait_tree(&node, "B deployed, corrupt C skipped", &[B1]);
    let failing = wait_failing(&node, C);
    assert!(
        failing["reason"]
            .as_str()
            .is_some_and(|r| r.contains("digest")),
        "{failing}"
    );
    assert_eq!(deployed(&deployed_json(&node)), ids(&[(B, 1)]));

    // The corrupt artifact does not hold the retriever up: a later publish deploys.
    publish(&db.target(), D, &["L1"], D1);
    wait_tree(&node, "D deployed while C keeps failing", &[B1, D1]);
    wait_deployed(&node, &[(B, 1), (D, 1)]);
    let log = std::fs::read_to_string(node.log_path()).unwrap_or_default();
    assert!(
        !log.contains("tampered"),
        "artifact contents must never be logged"
    );
}

// ---------------------------------------------------------------------------------------------
// 8. Deployed paths are owned with reference counts: a file two artifacts want stays until
//    neither does; different content at one path is a reported conflict that the lowest
//    artifact id wins; a shared file deleted on disk is restored by the reconcile.

const SHARED: &str = "default/sequences/fault.xml";
const SHARED_X: &str = "<sequence name=\"fault\"><log level=\"full\"/></sequence>\n";
const SHARED_Y: &str = "<sequence name=\"fault\"><drop/></sequence>\n";
const A_SHARED: Files = &[
    ("default/api/A.xml", "<api name=\"A\"/>\n"),
    (SHARED, SHARED_X),
];
const B_SHARED: Files = &[
    ("default/api/B.xml", "<api name=\"B\"/>\n"),
    (SHARED, SHARED_X),
];
/// C wants other bytes at the shared path; C's id sorts after B's.
const C_SHARED: Files = &[
    ("default/api/C.xml", "<api name=\"C\"/>\n"),
    (SHARED, SHARED_Y),
];

fn conflicts(v: &Value) -> Vec<(String, String, Vec<String>)> {
    v["conflicts"]
        .as_array()
        .unwrap_or_else(|| panic!("no conflicts list in {v}"))
        .iter()
        .map(|c| {
            (
                c["path"].as_str().unwrap_or_default().to_owned(),
                c["winner"].as_str().unwrap_or_default().to_owned(),
                c["losers"]
                    .as_array()
                    .map(|l| {
                        l.iter()
                            .filter_map(|x| x.as_str().map(str::to_owned))
                            .collect()
                    })
                    .unwrap_or_default(),
            )
        })
        .collect()
}

fn shared_paths_are_reference_counted_and_conflicts_reported(backend: Backend) {
    let Some(db) = TestDb::new(backend) else {
        return;
    };
    assert!(B < A && A < C, "the ids' order this test relies on");
    publish(&db.target(), A, &["L1"], A_SHARED);
    publish(&db.target(), B, &["L1"], B_SHARED);
    let mut node = lone_node(
        "x",
        &db_retriever(&db.url, &["L1"], "reconcile_interval = 1\n"),
    );
    node.start();
    wait_tree(&node, "A and B, sharing one file", &[A_SHARED, B_SHARED]);
    wait_deployed(&node, &[(A, 1), (B, 1)]);

    // Undeploying A keeps the file B still wants.
    remove(&db.target(), A);
    wait_tree(&node, "A removed, the shared file kept for B", &[B_SHARED]);

    // Deleted by hand: the reconcile puts it back (revisions alone would not notice).
    std::fs::remove_file(node.synapse().join(SHARED)).expect("delete the shared file");
    wait_tree(&node, "the shared file restored", &[B_SHARED]);

    // C wants other bytes there: a conflict, reported; the lowest id (B) keeps the file.
    publish(&db.target(), C, &["L1"], C_SHARED);
    let want = expected(&[B_SHARED, &C_SHARED[..1]]);
    wait_for(
        RETRIEVE_TIMEOUT,
        "C deployed beside B, B's shared file kept",
        || {
            tree_is(&node.synapse(), &want)?;
            let v = deployed_json(&node);
            match conflicts(&v).as_slice() {
                [(path, winner, losers)] if path == SHARED && winner == B && losers == &[C] => {
                    Ok(())
                }
                other => Err(format!("conflicts {other:?}")),
            }
        },
    );
    let text = node.cli(&["artifact", "deployed"]);
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.contains("CONFLICT") && text.contains(SHARED) && text.contains(C),
        "artifact deployed shows the conflict: {text}"
    );
    let status = node.cli(&["status"]);
    assert!(
        String::from_utf8_lossy(&status.stdout).contains("CONFLICT"),
        "status shows the conflict"
    );
    holds_for(HOLD, "B's bytes stay (never a silent overwrite)", || {
        tree_is(&node.synapse(), &want)
    });

    // B goes: the file now holds what C wants, and the conflict is over.
    remove(&db.target(), B);
    wait_tree(
        &node,
        "B removed, C's content at the shared path",
        &[C_SHARED],
    );
    wait_for(RETRIEVE_TIMEOUT, "no conflict left", || {
        let c = conflicts(&deployed_json(&node));
        if c.is_empty() {
            Ok(())
        } else {
            Err(format!("{c:?}"))
        }
    });
    remove(&db.target(), C);
    wait_tree(&node, "nothing claims the shared file any more", &[]);
}
