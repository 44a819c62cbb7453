//! `artisync demo`: a local cluster of agents on loopback in a temp dir. It generates a
//! WSO2-style artifact tree on one node and narrates what syncs as it happens: initial sync,
//! an edit, a delete, a concurrent edit (conflict copy), a broken XML held by the gate.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::daemon;

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("demo: {0}")]
    Io(#[from] std::io::Error),
    #[error("demo: {0}")]
    Config(#[from] crate::config::ConfigError),
    #[error("demo: node {node} failed: {message}")]
    Node { node: String, message: String },
    #[error("demo: timed out waiting for {0}")]
    Timeout(String),
}

/// Options of the demo.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    pub nodes: usize,
    pub apis: usize,
    /// Keep the cluster's directory (and print where it is) instead of deleting it.
    pub keep: bool,
    /// Where the agents' log lines go (named in the narration), if the caller sends them
    /// to a file rather than to the terminal.
    pub log: Option<PathBuf>,
}

/// BLAKE3 of every file under `root`, by relative path (artisync's temp files excluded).
pub fn tree_digest(root: &Path) -> BTreeMap<String, [u8; 32]> {
    tree_map(root, |p| crate::fs::scan::hash_file(p).ok())
}

/// `f` of every file under `root`, by relative path (artisync's temp files excluded, and
/// files `f` gives nothing for).
pub fn tree_map<T>(root: &Path, f: impl Fn(&Path) -> Option<T>) -> BTreeMap<String, T> {
    walkdir::WalkDir::new(root)
        .min_depth(1)
        .into_iter()
        .filter_map(Result::ok)
        .filter(|e| e.file_type().is_file())
        .filter(|e| {
            !e.file_name()
                .to_str()
                .is_some_and(crate::fs::ignore::Ignore::is_temp)
        })
        .filter_map(|e| {
            let rel = e.path().strip_prefix(root).ok()?.to_str()?.to_owned();
            Some((rel, f(e.path())?))
        })
        .collect()
}

/// Writes a WSO2 API-M style artifact tree: APIs, endpoints, sequences and execution plans.
pub fn generate_artifacts(
    synapse: &Path,
    plans: &Path,
    apis: usize,
    seed: &str,
) -> std::io::Result<usize> {
    let mut count = 0;
    for sub in [
        "api",
        "endpoints",
        "sequences",
        "local-entries",
        "proxy-services",
    ] {
        std::fs::create_dir_all(synapse.join("default").join(sub))?;
    }
    std::fs::create_dir_all(plans)?;
    for i in 0..apis {
        let name = format!("admin--API{i:04}_v1.0.0");
        let api = format!(
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<api xmlns=\"http://ws.apache.org/ns/synapse\" name=\"{name}\" context=\"/api{i}/1.0.0\" version=\"1.0.0\" version-type=\"context\">\n  <resource methods=\"GET\" uri-template=\"/items/*\">\n    <inSequence><send><endpoint key=\"{name}--Production\"/></send></inSequence>\n    <outSequence><send/></outSequence>\n  </resource>\n  <!-- {seed} -->\n</api>\n"
        );
        std::fs::write(synapse.join(format!("default/api/{name}.xml")), api)?;
        let ep = format!(
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<endpoint xmlns=\"http://ws.apache.org/ns/synapse\" name=\"{name}--Production\">\n  <http uri-template=\"https://backend{i}.internal:8243/v1\"/>\n</endpoint>\n"
        );
        std::fs::write(
            synapse.join(format!("default/endpoints/{name}--Production.xml")),
            ep,
        )?;
        count += 2;
        if i % 4 == 0 {
            let seq = format!(
                "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<sequence xmlns=\"http://ws.apache.org/ns/synapse\" name=\"{name}--In\">\n  <log level=\"custom\"><property name=\"api\" value=\"{name}\"/></log>\n</sequence>\n"
            );
            std::fs::write(
                synapse.join(format!("default/sequences/{name}--In.xml")),
                seq,
            )?;
            count += 1;
        }
        if i % 10 == 0 {
            let plan = format!(
                "@Plan:name('throttle_{i}')\n@Import('org.wso2.throttle.request.stream:1.0.0')\ndefine stream RequestStream (messageID string, appKey string);\nfrom RequestStream select appKey insert into ThrottleStream{i};\n"
            );
            std::fs::write(plans.join(format!("throttle_{i}.siddhiql")), plan)?;
            count += 1;
        }
    }
    Ok(count)
}

/// The gateway label the demo's retrievers subscribe to.
const DEMO_LABEL: &str = "Production and Sandbox";

struct Node {
    name: String,
    synapse: PathBuf,
    plans: PathBuf,
    state: PathBuf,
    cancel: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), daemon::DaemonError>>,
}

/// Reserves `n` distinct free loopback ports (bound, then released for the agents to take).
pub fn free_ports(n: usize) -> std::io::Result<Vec<u16>> {
    let listeners: Vec<std::net::TcpListener> = (0..n)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0"))
        .collect::<Result<_, _>>()?;
    listeners
        .iter()
        .map(|l| l.local_addr().map(|a| a.port()))
        .collect()
}

async fn wait_for(
    what: &str,
    timeout: Duration,
    mut check: impl FnMut() -> bool,
) -> Result<Duration, DemoError> {
    let start = Instant::now();
    loop {
        if check() {
            return Ok(start.elapsed());
        }
        if start.elapsed() > timeout {
            return Err(DemoError::Timeout(what.to_owned()));
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

fn same_trees(nodes: &[Node]) -> bool {
    let first = (tree_digest(&nodes[0].synapse), tree_digest(&nodes[0].plans));
    nodes[1..]
        .iter()
        .all(|n| (tree_digest(&n.synapse), tree_digest(&n.plans)) == first)
}

/// `1 conflict copy`, `2 conflict copies`.
fn plural(n: u64, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

fn say(line: impl AsRef<str>) {
    println!("{}", line.as_ref());
}

/// Runs the narrated demo.
pub async fn run(opts: DemoOptions) -> Result<(), DemoError> {
    let n = opts.nodes.clamp(2, 9);
    let dir = tempfile::Builder::new()
        .prefix("artisync-demo-")
        .tempdir()?;
    let base = dir.path().to_owned();
    let ports = free_ports(n)?;
    let names: Vec<String> = (1..=n).map(|i| format!("gw{i}")).collect();
    let mut nodes = Vec::new();
    for i in 0..n {
        let root = base.join(&names[i]);
        let synapse = root.join("repository/deployment/server/synapse-configs");
        let plans = root.join("repository/deployment/server/executionplans");
        let state = root.join("state");
        std::fs::create_dir_all(&synapse)?;
        std::fs::create_dir_all(&plans)?;
        let mut text = format!(
            "node = \"{}\"\nlisten = \"127.0.0.1:{}\"\nstate_dir = \"{}\"\n\n[[folder]]\nid = \"synapse-configs\"\npath = \"{}\"\n\n[[folder]]\nid = \"executionplans\"\npath = \"{}\"\n",
            names[i],
            ports[i],
            state.display(),
            synapse.display(),
            plans.display()
        );
        for j in (0..n).filter(|j| *j != i) {
            text.push_str(&format!(
                "\n[[peer]]\nname = \"{}\"\naddress = \"http://127.0.0.1:{}\"\n",
                names[j], ports[j]
            ));
        }
        // gw1 retrieves artifacts from the embedded SQLite database; gw2 has no database
        // credentials and retrieves through gw1 (the hub).
        if i == 0 {
            text.push_str(&format!(
                "\n[retriever]\nartifact_retriever = \"db\"\ndatabase_url = \"sqlite://{}\"\ngateway_labels = [\"{DEMO_LABEL}\"]\n",
                base.join("artifacts.db").display()
            ));
        } else if i == 1 {
            text.push_str(&format!(
                "\n[retriever]\nartifact_retriever = \"hub\"\nhub = \"http://127.0.0.1:{}\"\ngateway_labels = [\"{DEMO_LABEL}\"]\n",
                ports[0]
            ));
        }
        let config_path = root.join("artisync.toml");
        std::fs::write(&config_path, &text)?;
        let config = Config::parse(&text, &config_path)?;
        let cancel = CancellationToken::new();
        let (tx, rx) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(daemon::run(config, cancel.clone(), Some(tx)));
        rx.await.map_err(|_| DemoError::Node {
            node: names[i].clone(),
            message: match &opts.log {
                Some(log) => format!("did not start (see {})", log.display()),
                None => "did not start (see the log)".into(),
            },
        })?;
        nodes.push(Node {
            name: names[i].clone(),
            synapse,
            plans,
            state,
            cancel,
            task,
        });
    }
    say(format!(
        "artisync demo: {n} agents on loopback under {}",
        base.display()
    ));
    for (node, port) in nodes.iter().zip(&ports) {
        say(format!(
            "  {} listens on 127.0.0.1:{port}, folders synapse-configs + executionplans",
            node.name
        ));
    }
    if let Some(log) = &opts.log {
        say(format!(
            "  the agents' warnings and errors go to {}",
            log.display()
        ));
    }

    let result = narrate(&nodes, opts.apis, &base.join("artifacts.db")).await;

    for node in &nodes {
        node.cancel.cancel();
    }
    for node in nodes {
        match node.task.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => say(format!("{} stopped with an error: {e}", node.name)),
            Err(e) => say(format!("{} task failed: {e}", node.name)),
        }
    }
    if opts.keep {
        let kept = dir.keep();
        say(format!("kept the cluster's files under {}", kept.display()));
    }
    if let Some(log) = &opts.log {
        let lines = std::fs::read_to_string(log).map_or(0, |t| t.lines().count());
        say(format!(
            "the agents logged {} to {}",
            plural(lines as u64, "line", "lines"),
            log.display()
        ));
    }
    result
}

async fn narrate(nodes: &[Node], apis: usize, db_path: &Path) -> Result<(), DemoError> {
    let timeout = Duration::from_secs(60);
    let (a, b) = (&nodes[0], &nodes[1]);
    let c = nodes.last().unwrap_or(b);

    say(format!(
        "\n1. {} publishes {apis} APIs (API, endpoint, some sequences and execution plans)",
        a.name
    ));
    let count = generate_artifacts(&a.synapse, &a.plans, apis, "v1")?;
    let took = wait_for("the initial sync", timeout, || same_trees(nodes)).await?;
    say(format!(
        "   {count} files identical on all {} nodes after {} ms",
        nodes.len(),
        took.as_millis()
    ));

    let api = "default/api/admin--API0001_v1.0.0.xml";
    say(format!("\n2. {} edits {api}", b.name));
    let edited = std::fs::read_to_string(b.synapse.join(api))?.replace("/items/*", "/items/{id}");
    std::fs::write(b.synapse.join(api), &edited)?;
    let want = *blake3::hash(edited.as_bytes()).as_bytes();
    let took = wait_for("the edit", timeout, || {
        nodes
            .iter()
            .all(|n| crate::fs::scan::hash_file(&n.synapse.join(api)).ok() == Some(want))
    })
    .await?;
    say(format!(
        "   every node has the new version after {:.1} ms",
        took.as_secs_f64() * 1000.0
    ));

    let ep = "default/endpoints/admin--API0002_v1.0.0--Production.xml";
    say(format!("\n3. {} deletes {ep}", c.name));
    std::fs::remove_file(c.synapse.join(ep))?;
    let took = wait_for("the delete", timeout, || {
        nodes.iter().all(|n| !n.synapse.join(ep).exists())
    })
    .await?;
    say(format!(
        "   gone everywhere after {:.1} ms",
        took.as_secs_f64() * 1000.0
    ));

    let contested = "default/api/admin--API0003_v1.0.0.xml";
    say(format!(
        "\n4. {} and {} edit {contested} at the same moment",
        a.name, b.name
    ));
    let original = std::fs::read_to_string(a.synapse.join(contested))?;
    let va = original.replace(
        "version=\"1.0.0\"",
        &format!("version=\"1.0.0\" description=\"edited on {}\"", a.name),
    );
    let vb = original.replace(
        "version=\"1.0.0\"",
        &format!("version=\"1.0.0\" description=\"edited on {}\"", b.name),
    );
    let (pa, pb) = (a.synapse.join(contested), b.synapse.join(contested));
    let ta = std::thread::spawn(move || std::fs::write(pa, va));
    let tb = std::thread::spawn(move || std::fs::write(pb, vb));
    for t in [ta, tb] {
        t.join()
            .map_err(|_| std::io::Error::other("writer thread panicked"))??;
    }
    wait_for("the concurrent edits to converge", timeout, || {
        same_trees(nodes)
    })
    .await?;
    let winner = std::fs::read_to_string(a.synapse.join(contested))?;
    let who = if winner.contains(&format!("edited on {}", a.name)) {
        &a.name
    } else {
        &b.name
    };
    say(format!("   all nodes converged on {who}'s version"));
    let copies: Vec<String> = nodes
        .iter()
        .flat_map(|n| {
            walkdir::WalkDir::new(n.state.join("conflicts"))
                .into_iter()
                .filter_map(Result::ok)
                .filter(|e| e.file_type().is_file())
                .map(|e| format!("{}: {}", n.name, e.path().display()))
                .collect::<Vec<_>>()
        })
        .collect();
    if copies.is_empty() {
        say(
            "   (the two writes did not overlap this time: one node saw the other's edit first, so there was no conflict)",
        );
    }
    for copy in copies {
        say(format!(
            "   losing version kept outside the deployed tree: {copy}"
        ));
    }

    let broken = "default/api/admin--NewAPI_v1.0.0.xml";
    say(format!(
        "\n5. {} writes {broken} in two steps; the first is not well-formed XML",
        a.name
    ));
    std::fs::write(
        a.synapse.join(broken),
        "<api xmlns=\"http://ws.apache.org/ns/synapse\" name=\"NewAPI\">\n  <resource methods=\"GET\">",
    )?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let leaked = nodes[1..].iter().any(|n| n.synapse.join(broken).exists());
    say(format!(
        "   after 300 ms the half-written file is {} the other nodes (held by the XML gate)",
        if leaked { "ON (unexpected!)" } else { "not on" }
    ));
    std::fs::write(
        a.synapse.join(broken),
        "<api xmlns=\"http://ws.apache.org/ns/synapse\" name=\"NewAPI\">\n  <resource methods=\"GET\"/>\n</api>\n",
    )?;
    let took = wait_for("the completed XML", timeout, || same_trees(nodes)).await?;
    say(format!(
        "   completed and well-formed: on every node after {:.1} ms",
        took.as_secs_f64() * 1000.0
    ));

    let api = "default/api/admin--PizzaShackAPI_v1.0.0.xml";
    say(format!(
        "\n6. a publisher saves PizzaShackAPI in the artifact database with label {DEMO_LABEL:?}"
    ));
    say(format!(
        "   ({} retrieves from the database, {} through {} with no DB credentials, the mesh does the rest)",
        a.name, b.name, a.name
    ));
    let db = crate::artifacts::db::ArtifactDb::connect(&format!("sqlite://{}", db_path.display()))
        .await
        .map_err(|e| DemoError::Node {
            node: "publisher".into(),
            message: e.to_string(),
        })?;
    let bundle = crate::artifacts::Bundle {
        files: vec![crate::artifacts::BundleFile {
            path: crate::model::RelPath::new(api).map_err(|e| DemoError::Node {
                node: "publisher".into(),
                message: e.to_string(),
            })?,
            mode: 0o644,
            data: b"<api xmlns=\"http://ws.apache.org/ns/synapse\" name=\"PizzaShackAPI\" context=\"/pizzashack/1.0.0\"/>\n".to_vec(),
        }],
    };
    let meta = crate::artifacts::db::NewArtifact {
        id: "6f1c2a9e-3b1d-4c2e-9a8f-0d1e2f3a4b5c".into(),
        name: "PizzaShackAPI".into(),
        version: "1.0.0".into(),
        tenant: "carbon.super".into(),
        folder: "synapse-configs".into(),
        labels: vec![DEMO_LABEL.into()],
    };
    let start = Instant::now();
    db.publish(&meta, &bundle, crate::now_ms())
        .await
        .map_err(|e| DemoError::Node {
            node: "publisher".into(),
            message: e.to_string(),
        })?;
    wait_for("the published artifact", timeout, || {
        nodes.iter().all(|n| n.synapse.join(api).exists())
    })
    .await?;
    say(format!(
        "   deployed on every node {:.0} ms after the publish commit",
        start.elapsed().as_secs_f64() * 1000.0
    ));

    say("\nstatus of the first node (artisync status --json shows the same as JSON):");
    let json = crate::admin::call(&a.state.join("admin.sock"), "status", None)
        .await
        .map_err(|e| DemoError::Node {
            node: a.name.clone(),
            message: e.to_string(),
        })?;
    if let Ok(report) = serde_json::from_str::<crate::admin::StatusReport>(&json) {
        print!("{}", render_status(&report));
    }
    say("\ndemo finished.");
    Ok(())
}

/// Human-readable retriever state (`artisync artifact deployed`, and part of `status`).
pub fn render_retriever(r: &crate::artifacts::retriever::RetrieverStatus) -> String {
    let mut out = format!(
        "  retriever: {} mode, source {} ({}), labels {:?}, folder {}{}\n",
        r.mode,
        r.source,
        if r.source_available {
            "available"
        } else {
            "UNAVAILABLE"
        },
        r.labels,
        r.folder,
        if r.startup_done {
            ""
        } else {
            ", start-up deploy in progress"
        }
    );
    for (tenant, folder) in &r.tenants {
        out.push_str(&format!("    tenant {tenant:?} -> folder {folder}\n"));
    }
    for d in &r.deployed {
        out.push_str(&format!(
            "    deployed {}  {} {}  rev {}  labels {:?}  folder {}  {}\n",
            d.id,
            d.name,
            d.version,
            d.revision,
            d.labels,
            d.folder,
            plural(d.paths.len() as u64, "file", "files")
        ));
        for w in &d.warnings {
            out.push_str(&format!("      WARNING {}: {w}\n", d.id));
        }
    }
    for f in &r.failing {
        out.push_str(&format!(
            "    FAILING {}  rev {}  attempts {}{}: {}\n",
            f["id"].as_str().unwrap_or("?"),
            f["revision"],
            f["attempts"],
            if f["gave_up"].as_bool().unwrap_or(false) {
                " (gave up)"
            } else {
                ""
            },
            f["reason"].as_str().unwrap_or("?")
        ));
    }
    for c in &r.conflicts {
        out.push_str(&format!(
            "    CONFLICT {}/{}: holds artifact {}'s content, not {} ({})\n",
            c.folder,
            c.path,
            c.winner,
            c.losers.join(", "),
            c.rule
        ));
    }
    if let Some(e) = &r.last_error {
        out.push_str(&format!("    last error: {e}\n"));
    }
    out
}

/// Human-readable status (what `artisync status` prints without `--json`).
pub fn render_status(r: &crate::admin::StatusReport) -> String {
    let mut out = format!(
        "node {} ({}) listening on {}, up {} s\n",
        r.node, r.node_id, r.listen, r.uptime_secs
    );
    for report in &r.folders {
        let f = &report.status;
        out.push_str(&format!(
            "  folder {:<18} {:>6} files {:>12} bytes  {}{}\n",
            f.id,
            f.files,
            f.bytes,
            if report.in_sync {
                "in sync"
            } else {
                "NOT in sync"
            },
            if f.conflicts > 0 {
                format!(
                    ", {}",
                    plural(f.conflicts, "conflict copy", "conflict copies")
                )
            } else {
                String::new()
            }
        ));
        match &report.engine {
            Some(e) if e.state == crate::liveness::Verdict::Stalled => out.push_str(&format!(
                "    ENGINE STALLED: busy for {} s, no progress for {} s (health is NOT_SERVING; systemd's watchdog restarts the agent)\n",
                e.for_secs, e.quiet_secs
            )),
            Some(e) if e.state == crate::liveness::Verdict::Stopped => out.push_str(&format!(
                "    ENGINE STOPPED {} s ago: the folder is not synced (the agent shuts down to be restarted)\n",
                e.for_secs
            )),
            _ => {}
        }
        if let Some(e) = &f.index_error {
            out.push_str(&format!(
                "    INDEX NOT WRITABLE: {e}\n    (no change is taken or applied until it can be written: free space in state_dir; it resumes by itself)\n"
            ));
        }
        if let Some(p) = &f.paused {
            out.push_str(&format!(
                "    PAUSED: {p}\n    (confirm with: artisync resume --config FILE --folder {})\n",
                f.id
            ));
        }
        for (path, why) in &f.held {
            out.push_str(&format!("    held: {path}: {why}\n"));
        }
        for (path, why) in &f.unreadable {
            out.push_str(&format!("    unreadable: {path}: {why}\n"));
        }
        let now = crate::now_ms();
        const SKIPPED_SHOWN: usize = 20;
        for s in f.skipped.iter().take(SKIPPED_SHOWN) {
            out.push_str(&format!(
                "    skipped from {}: {}: {} ({} attempts, next in {} s)\n",
                s.peer,
                s.path,
                s.problem,
                s.attempts,
                s.next_retry_ms.saturating_sub(now).div_ceil(1000)
            ));
        }
        if f.skipped.len() > SKIPPED_SHOWN {
            out.push_str(&format!(
                "    ... and {} more skipped (all of them: artisync status --json)\n",
                f.skipped.len() - SKIPPED_SHOWN
            ));
        }
        if let Some(c) = &f.clock_ahead {
            out.push_str(&format!(
                "    clock ahead: {} sent {} stamped {} s ahead of this node's clock, {} s ago (applied without moving the clock)\n",
                c.peer,
                c.path,
                c.ahead_ms / 1000,
                now.saturating_sub(c.at_ms) / 1000
            ));
        }
        if let Some(e) = &f.last_error {
            match f.last_error_ms {
                Some(at) => out.push_str(&format!(
                    "    last error, {} s ago: {e}\n",
                    now.saturating_sub(at) / 1000
                )),
                None => out.push_str(&format!("    last error: {e}\n")),
            }
        }
    }
    for p in &r.peers {
        let behind: u64 = p.behind.values().sum();
        out.push_str(&format!(
            "  peer {:<10} {:<28} {}{}\n",
            p.name,
            p.address,
            if p.connected {
                "connected"
            } else {
                "DISCONNECTED"
            },
            if p.connected {
                format!(", {behind} changes behind")
            } else {
                String::new()
            }
        ));
        if let (false, Some(e)) = (p.connected, &p.last_error) {
            out.push_str(&format!("    last error: {e}\n"));
        }
    }
    if let Some(r) = &r.retriever {
        out.push_str(&render_retriever(r));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::admin::{FolderReport, StatusReport};
    use crate::engine::FolderStatus;

    #[test]
    fn status_says_how_old_the_last_error_is() {
        let folder = |last_error_ms| FolderReport {
            status: FolderStatus {
                id: "synapse-configs".into(),
                last_error: Some("disk full".into()),
                last_error_ms,
                ..Default::default()
            },
            engine: None,
            in_sync: false,
        };
        let report = StatusReport {
            node: "gw1".into(),
            node_id: "01".into(),
            listen: "127.0.0.1:7701".into(),
            uptime_secs: 1,
            folders: vec![
                folder(Some(crate::now_ms().saturating_sub(90_000))),
                folder(None),
            ],
            peers: Vec::new(),
            retriever: None,
        };
        let text = render_status(&report);
        assert!(
            text.contains("last error, 90 s ago: disk full")
                || text.contains("last error, 91 s ago: disk full"),
            "{text}"
        );
        // A status from an older agent has no time: the error alone.
        assert!(text.contains("    last error: disk full\n"), "{text}");
    }
}
