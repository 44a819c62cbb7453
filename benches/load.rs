//! Sustained load (issue 16, item 4): a full mesh of agents on this machine, a large seeded
//! tree, a steady rate of edits on random nodes for a while, then quiet.
//!
//! `cargo bench --bench load` (release build). Settings: `ARTISYNC_LOAD_NODES` (10),
//! `ARTISYNC_LOAD_FILES` (20,000), `ARTISYNC_LOAD_RATE` (changes/s, 200),
//! `ARTISYNC_LOAD_SECS` (120), `ARTISYNC_LOAD_LOG` (the agents' log filter, `warn`),
//! `ARTISYNC_LOAD_KEEP` (keep the run's directory). It reports:
//! - the initial sync of the seeded tree to the empty nodes;
//! - during the load, once a second: records behind and lag seconds (each agent's own
//!   `artisync_peer_behind_records` / `artisync_peer_lag_seconds`, the largest over its
//!   peers), RSS and CPU of every agent;
//! - a probe: once a second a new file on a random node, timed until it is on every other
//!   node (end-to-end lag under load);
//! - the agents' own propagation latency histograms, summed;
//! - how long after the load stops every node holds the same tree.
//!
//! Every loop is bounded in time; the agents are killed when the bench ends.

mod common;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use artisync::demo::{free_ports, tree_digest};
use common::*;

const FOLDER: &str = "synapse-configs";
/// Bounds: the initial sync, and convergence after the load.
const INITIAL_SYNC_BOUND: Duration = Duration::from_secs(900);
const QUIET_BOUND: Duration = Duration::from_secs(300);
/// A probe not seen everywhere within this is reported as lost (never expected).
const PROBE_BOUND: Duration = Duration::from_secs(60);

fn env_or(key: &str, default: u64) -> u64 {
    std::env::var(key)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

struct LoadNode {
    name: String,
    port: u16,
    metrics_port: u16,
    root: PathBuf,
    config: PathBuf,
    log: PathBuf,
}

/// GET /metrics of an agent, as text (empty when it does not answer).
fn scrape(port: u16) -> String {
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return String::new();
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    let _ = s.write_all(b"GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n");
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

/// Every series `name{...}` in a scrape: its label text and its value.
fn series<'a>(text: &'a str, name: &'a str) -> impl Iterator<Item = (&'a str, f64)> + 'a {
    text.lines().filter_map(move |l| {
        let rest = l.strip_prefix(name)?;
        let (labels, value) = match rest.strip_prefix('{') {
            Some(r) => {
                let (labels, v) = r.split_once("} ")?;
                (labels, v)
            }
            None => ("", rest.strip_prefix(' ')?),
        };
        Some((labels, value.trim().parse().ok()?))
    })
}

fn max_series(text: &str, name: &str) -> f64 {
    series(text, name).map(|(_, v)| v).fold(0.0, f64::max)
}

/// (utime + stime) of a process, seconds.
fn cpu_secs(pid: u32) -> f64 {
    let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    let Some(after) = stat.rsplit_once(')').map(|(_, a)| a) else {
        return 0.0;
    };
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // Fields after the command: state is 0, utime 11, stime 12.
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100) as f64;
    (ticks(11) + ticks(12)) / hz
}

fn rss_mib(pid: u32) -> f64 {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))?
                .split_whitespace()
                .next()?
                .parse::<f64>()
                .ok()
        })
        .map_or(0.0, |kib| kib / 1024.0)
}

fn pctf(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() - 1) as f64 * q).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// Quantile `q` of a Prometheus histogram given as (upper bound, cumulative count), linear
/// within the bucket.
fn hist_quantile(buckets: &[(f64, f64)], q: f64) -> f64 {
    let Some(&(_, total)) = buckets.last() else {
        return 0.0;
    };
    if total == 0.0 {
        return 0.0;
    }
    let rank = q * total;
    let mut prev = (0.0, 0.0);
    for &(le, count) in buckets {
        if count >= rank {
            if !le.is_finite() {
                return prev.0;
            }
            let span = count - prev.1;
            let frac = if span > 0.0 {
                (rank - prev.1) / span
            } else {
                1.0
            };
            return prev.0 + (le - prev.0) * frac;
        }
        prev = (le, count);
    }
    prev.0
}

/// The open tag of API number `i` (the generated documents must pass the XML gate).
fn api_open(i: usize) -> String {
    format!("<api xmlns=\"http://ws.apache.org/ns/synapse\" name=\"api-{i}\" context=\"/api-{i}\">")
}

/// Every seeded file is well-formed, or the gate would hold it and the bench measure nothing.
fn check_seed(root: &Path, sample: &[String]) {
    for p in sample {
        let bytes = fs::read(root.join(p)).expect("read a seeded file");
        assert!(
            artisync::fs::xml::check_well_formed(&bytes).is_ok(),
            "the bench generated XML that is not well-formed: {p}"
        );
    }
}

fn main() {
    let n = env_or("ARTISYNC_LOAD_NODES", 10).clamp(2, 26) as usize;
    let files = env_or("ARTISYNC_LOAD_FILES", 20_000) as usize;
    let rate = env_or("ARTISYNC_LOAD_RATE", 200).max(1);
    // The agents' log filter (`ARTISYNC_LOG`); their logs are in the run's temp dir.
    let log_level = std::env::var("ARTISYNC_LOAD_LOG").unwrap_or_else(|_| "warn".to_owned());
    let secs = env_or("ARTISYNC_LOAD_SECS", 120);
    println!(
        "load: {n} agents (full mesh), {files} files, {rate} changes/s on random nodes for {secs} s; agent {}",
        bin()
    );
    let tmp = tempfile::Builder::new()
        .prefix("artisync-load-")
        .tempdir()
        .expect("tempdir");
    // `ARTISYNC_LOAD_KEEP=1` keeps the run's trees, states and logs.
    let (base, _cleanup) = if std::env::var_os("ARTISYNC_LOAD_KEEP").is_some() {
        let kept = tmp.keep();
        println!("kept: {}", kept.display());
        (kept, None)
    } else {
        (tmp.path().to_owned(), Some(tmp))
    };
    let ports = free_ports(2 * n).expect("ports");
    let nodes: Vec<LoadNode> = (0..n)
        .map(|i| {
            let name = format!("n{i:02}");
            let dir = base.as_path().join(&name);
            fs::create_dir_all(dir.join("tree").join(FOLDER)).expect("mkdir");
            LoadNode {
                name: name.clone(),
                port: ports[i],
                metrics_port: ports[n + i],
                root: dir.join("tree").join(FOLDER),
                config: dir.join("artisync.toml"),
                log: base.as_path().join(format!("{name}.log")),
            }
        })
        .collect();
    for (i, node) in nodes.iter().enumerate() {
        let mut text = format!(
            "node = \"{}\"\nlisten = \"127.0.0.1:{}\"\nstate_dir = \"{}\"\n\n[metrics]\nlisten = \"127.0.0.1:{}\"\n\n[[folder]]\nid = \"{FOLDER}\"\npath = \"{}\"\n",
            node.name,
            node.port,
            node.root
                .parent()
                .and_then(Path::parent)
                .expect("dir")
                .join("state")
                .display(),
            node.metrics_port,
            node.root.display()
        );
        for (j, peer) in nodes.iter().enumerate() {
            if i != j {
                let _ = write!(
                    text,
                    "\n[[peer]]\nname = \"{}\"\naddress = \"http://127.0.0.1:{}\"\n",
                    peer.name, peer.port
                );
            }
        }
        fs::write(&node.config, text).expect("config");
    }

    // The seeded tree, on the first node only.
    let mut rng = Rng(0x10ad);
    let paths: Vec<String> = (0..files)
        .map(|i| format!("default/api/d{:02}/api-{i:05}.xml", i % 50))
        .collect();
    for (i, p) in paths.iter().enumerate() {
        let full = nodes[0].root.join(p);
        if let Some(dir) = full.parent() {
            fs::create_dir_all(dir).expect("mkdir");
        }
        let size = rng.log_uniform(500, 8000) as usize;
        fs::write(&full, xml_doc(&mut rng, &api_open(i), "api", size)).expect("seed");
    }

    check_seed(&nodes[0].root, &paths[..paths.len().min(200)]);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let t0 = Instant::now();
    let mut agents: Vec<Agent> = nodes
        .iter()
        .map(|nd| Agent::spawn(&nd.name, nd.port, &nd.config, &nd.log, &log_level))
        .collect();
    for a in agents.iter_mut() {
        a.wait_serving_every(&rt, Duration::from_millis(20));
    }
    let want = tree_digest(&nodes[0].root);
    let deadline = Instant::now() + INITIAL_SYNC_BOUND;
    for nd in &nodes[1..] {
        loop {
            if tree_digest(&nd.root) == want {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "initial sync of {} did not finish",
                nd.name
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    let initial = t0.elapsed();
    println!(
        "initial sync: {} files to {} empty nodes in {:.1} s (start to the last node's identical tree)",
        files,
        n - 1,
        initial.as_secs_f64()
    );

    let pids: Vec<u32> = agents.iter().filter_map(Agent::pid).collect();
    let cpu_before: Vec<f64> = pids.iter().map(|p| cpu_secs(*p)).collect();
    let rss_before: Vec<f64> = pids.iter().map(|p| rss_mib(*p)).collect();
    let stop = Arc::new(AtomicBool::new(false));
    let roots: Vec<PathBuf> = nodes.iter().map(|nd| nd.root.clone()).collect();
    let metrics_ports: Vec<u16> = nodes.iter().map(|nd| nd.metrics_port).collect();

    // The probe: a new file once a second, timed until every other node has it.
    let probe = {
        let (roots, stop) = (roots.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut rng = Rng(0x9e0b);
            let mut lags = Vec::new();
            let mut lost = 0usize;
            let mut k = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let at = rng.below(roots.len() as u64) as usize;
                let rel = format!("probe/p-{k}.xml");
                k += 1;
                let full = roots[at].join(&rel);
                let _ = fs::create_dir_all(full.parent().expect("dir"));
                let started = Instant::now();
                fs::write(&full, format!("<probe n=\"{k}\"/>\n")).expect("probe");
                let mut seen = false;
                while started.elapsed() < PROBE_BOUND {
                    if roots.iter().all(|r| r.join(&rel).exists()) {
                        seen = true;
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(2));
                }
                if seen {
                    lags.push(started.elapsed().as_secs_f64());
                } else {
                    lost += 1;
                }
                let rest = Duration::from_secs(1).saturating_sub(started.elapsed());
                std::thread::sleep(rest);
            }
            (lags, lost)
        })
    };

    // Once a second: the largest records behind and lag seconds on each node, RSS, CPU.
    let sampler = {
        let (stop, pids, ports) = (stop.clone(), pids.clone(), metrics_ports.clone());
        std::thread::spawn(move || {
            let mut behind = Vec::new();
            let mut lag = Vec::new();
            let mut rss_max = vec![0.0f64; pids.len()];
            while !stop.load(Ordering::Relaxed) {
                let t = Instant::now();
                for (i, port) in ports.iter().enumerate() {
                    let text = scrape(*port);
                    behind.push(max_series(&text, "artisync_peer_behind_records"));
                    lag.push(max_series(&text, "artisync_peer_lag_seconds"));
                    rss_max[i] = rss_max[i].max(rss_mib(pids[i]));
                }
                std::thread::sleep(Duration::from_secs(1).saturating_sub(t.elapsed()));
            }
            (behind, lag, rss_max)
        })
    };

    // The load: `rate` edits a second, on random nodes and paths, in place.
    let load_start = Instant::now();
    let total = rate * secs;
    let mut behind_schedule = Duration::ZERO;
    for i in 0..total {
        let due = load_start + Duration::from_secs_f64(i as f64 / rate as f64);
        let now = Instant::now();
        if due > now {
            std::thread::sleep(due - now);
        } else {
            behind_schedule = behind_schedule.max(now - due);
        }
        let node = rng.below(n as u64) as usize;
        let k = rng.below(paths.len() as u64) as usize;
        let path = &paths[k];
        let size = rng.log_uniform(500, 8000) as usize;
        let mut doc = xml_doc(&mut rng, &api_open(k), "api", size);
        let _ = writeln!(doc, "<!-- edit {i} on {node} -->");
        let _ = fs::write(roots[node].join(path), doc);
    }
    let load_took = load_start.elapsed();
    let cpu_after: Vec<f64> = pids.iter().map(|p| cpu_secs(*p)).collect();
    let rss_after: Vec<f64> = pids.iter().map(|p| rss_mib(*p)).collect();
    stop.store(true, Ordering::Relaxed);

    // Quiet: every node in sync and holding the same tree.
    let quiet = Instant::now();
    let deadline = quiet + QUIET_BOUND;
    loop {
        let all_in_sync = metrics_ports.iter().all(|p| {
            let text = scrape(*p);
            series(&text, "artisync_folder_in_sync").all(|(_, v)| v == 1.0)
                && max_series(&text, "artisync_peer_behind_records") == 0.0
        });
        if all_in_sync {
            let first = tree_digest(&roots[0]);
            if roots[1..].iter().all(|r| tree_digest(r) == first) {
                break;
            }
        }
        assert!(
            Instant::now() < deadline,
            "the nodes did not converge within {QUIET_BOUND:?} of the load stopping"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let converged = quiet.elapsed();
    let held: f64 = metrics_ports
        .iter()
        .map(|p| {
            series(&scrape(*p), "artisync_folder_held_files")
                .map(|(_, v)| v)
                .sum::<f64>()
        })
        .sum();
    assert!(
        held == 0.0,
        "{held} files held back by the XML gate: the bench's edits are not well-formed"
    );
    let (mut probe_lags, lost) = probe.join().expect("probe");
    let (mut behind, mut lag, rss_max) = sampler.join().expect("sampler");

    // The agents' own propagation latency, summed over nodes.
    let mut buckets: BTreeMap<String, f64> = BTreeMap::new();
    for p in &metrics_ports {
        let text = scrape(*p);
        for (labels, v) in series(&text, "artisync_propagation_latency_seconds_bucket") {
            if let Some(le) = labels
                .split("le=\"")
                .nth(1)
                .and_then(|s| s.split('"').next())
            {
                *buckets.entry(le.to_owned()).or_default() += v;
            }
        }
    }
    let mut hist: Vec<(f64, f64)> = buckets
        .iter()
        .map(|(le, c)| {
            (
                if le == "+Inf" {
                    f64::INFINITY
                } else {
                    le.parse().unwrap_or(f64::INFINITY)
                },
                *c,
            )
        })
        .collect();
    hist.sort_by(|a, b| a.0.total_cmp(&b.0));

    let sortf = |v: &mut Vec<f64>| v.sort_by(f64::total_cmp);
    sortf(&mut probe_lags);
    sortf(&mut behind);
    sortf(&mut lag);
    let cpu: Vec<f64> = cpu_after
        .iter()
        .zip(&cpu_before)
        .map(|(a, b)| a - b)
        .collect();
    let cpu_total: f64 = cpu.iter().sum();
    println!(
        "load: {total} edits in {:.1} s (the driver fell at most {} ms behind its schedule)",
        load_took.as_secs_f64(),
        behind_schedule.as_millis()
    );
    println!(
        "probe (a new file on a random node until on all {n}): p50 {:.0} ms, p95 {:.0} ms, p99 {:.0} ms, max {:.0} ms; {} probes, {lost} not seen within {PROBE_BOUND:?}",
        pctf(&probe_lags, 0.5) * 1e3,
        pctf(&probe_lags, 0.95) * 1e3,
        pctf(&probe_lags, 0.99) * 1e3,
        probe_lags.last().copied().unwrap_or(0.0) * 1e3,
        probe_lags.len()
    );
    println!(
        "records behind (largest over peers, per node per second): p50 {:.0}, p99 {:.0}, max {:.0}; lag seconds: p50 {:.1}, p99 {:.1}, max {:.1}",
        pctf(&behind, 0.5),
        pctf(&behind, 0.99),
        behind.last().copied().unwrap_or(0.0),
        pctf(&lag, 0.5),
        pctf(&lag, 0.99),
        lag.last().copied().unwrap_or(0.0)
    );
    println!(
        "propagation latency (the agents' histograms, {:.0} applies): p50 {:.0} ms, p90 {:.0} ms, p99 {:.0} ms",
        hist.last().map_or(0.0, |h| h.1),
        hist_quantile(&hist, 0.5) * 1e3,
        hist_quantile(&hist, 0.9) * 1e3,
        hist_quantile(&hist, 0.99) * 1e3
    );
    let fmt_mib = |v: &[f64]| {
        let mut s = v.to_vec();
        s.sort_by(f64::total_cmp);
        format!(
            "min {:.0}, median {:.0}, max {:.0} MiB",
            s[0],
            pctf(&s, 0.5),
            s[s.len() - 1]
        )
    };
    println!(
        "RSS per agent: before the load {}; at its end {}; largest seen {}",
        fmt_mib(&rss_before),
        fmt_mib(&rss_after),
        fmt_mib(&rss_max)
    );
    println!(
        "CPU during the load: {:.1} core-seconds in all ({:.2} cores on average of {} s); per agent median {:.1} s, max {:.1} s",
        cpu_total,
        cpu_total / load_took.as_secs_f64(),
        load_took.as_secs(),
        {
            let mut c = cpu.clone();
            c.sort_by(f64::total_cmp);
            pctf(&c, 0.5)
        },
        cpu.iter().copied().fold(0.0, f64::max)
    );
    println!(
        "converged {:.2} s after the load stopped (every node in sync, same tree)",
        converged.as_secs_f64()
    );
    for a in agents.iter_mut() {
        a.stop();
    }
}
