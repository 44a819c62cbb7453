//! The Prometheus endpoint (`[metrics]`) of real agents: counters that move with a change, a
//! peer whose changes cannot be applied showing a growing lag and then `connected 0` once it
//! is stopped, the plaintext rule for a non-loopback address, and the Grafana dashboard's
//! queries against a real scrape.

use std::process::{Command, Stdio};

use crate::common::metrics::*;
use crate::common::*;

#[test]
fn a_change_moves_the_counters_and_the_latency_histogram() {
    let mut cluster = Cluster::full_mesh(2);
    let pa = metrics_on(&cluster[0]);
    let pb = metrics_on(&cluster[1]);
    cluster.start_all();
    let (a, b) = (&cluster[0], &cluster[1]);
    let link = [("peer", "b"), ("folder", SYNAPSE)];
    let folder = [("folder", SYNAPSE)];
    let before = scrape(pa);
    let received_before = value(&before, "artisync_records_received_total", &link).unwrap_or(0.0);
    let count_before = value(
        &before,
        "artisync_propagation_latency_seconds_count",
        &folder,
    )
    .expect("the folder's latency histogram exists from the start");
    assert_eq!(value(&before, "artisync_folder_files", &folder), Some(0.0));
    assert_eq!(
        value(&before, "artisync_folder_index_writable", &folder),
        Some(1.0)
    );
    assert!(
        before.contains("process_resident_memory_bytes "),
        "{before}"
    );
    assert!(before.contains("process_cpu_seconds_total "), "{before}");

    let content = "<api name=\"metered\" context=\"/m\"/>\n";
    write(&b.synapse().join("default/api/metered.xml"), content);
    wait_content(
        &a.synapse().join("default/api/metered.xml"),
        content.as_bytes(),
    );
    let n = content.len() as f64;
    scrape_until(pa, "A's counters to show B's change", |t| {
        let ok = value(t, "artisync_records_received_total", &link)? > received_before
            && value(t, "artisync_content_received_bytes_total", &link)? >= n
            && value(t, "artisync_propagation_latency_seconds_count", &folder)? > count_before
            && value(t, "artisync_apply_batches_total", &folder)? >= 1.0
            && value(t, "artisync_apply_batch_duration_seconds_count", &folder)? >= 1.0
            && value(t, "artisync_folder_files", &folder)? == 1.0
            && value(t, "artisync_folder_bytes", &folder)? == n
            && value(t, "artisync_peer_connected", &[("peer", "b")])? == 1.0;
        ok.then_some(())
    });
    // The writer counted what it sent.
    scrape_until(pb, "B's counters to show what it sent A", |t| {
        let to_a = [("peer", "a"), ("folder", SYNAPSE)];
        (value(t, "artisync_records_sent_total", &to_a)? >= 1.0
            && value(t, "artisync_content_sent_bytes_total", &to_a)? >= n)
            .then_some(())
    });
    // Only GET /metrics is served.
    assert_eq!(http_get(pa, "/").map(|(c, _)| c), Ok(404));
    assert_eq!(http_get(pa, "/metrics/x").map(|(c, _)| c), Ok(404));
}

/// Lag with respect to B grows on A while B has changes A has not applied: A's folder is
/// paused (the mass-delete guard), so B's new file reaches A's session but is not applied.
/// Once B stops, A shows it disconnected, and the lag keeps growing.
#[test]
fn a_peer_whose_changes_wait_shows_a_growing_lag_and_connected_0_once_stopped() {
    let mut cluster = Cluster::full_mesh(2);
    let pa = metrics_on(&cluster[0]);
    cluster.start_all();
    let b_link = [("peer", "b"), ("folder", SYNAPSE)];
    scrape_until(pa, "A connected to B and caught up", |t| {
        (value(t, "artisync_peer_connected", &[("peer", "b")])? == 1.0
            && value(t, "artisync_peer_behind_records", &b_link)? == 0.0
            && value(t, "artisync_peer_lag_seconds", &b_link)? == 0.0)
            .then_some(())
    });
    {
        let (a, b) = (&cluster[0], &cluster[1]);
        write(
            &a.synapse().join("default/api/one.xml"),
            "<api name=\"one\"/>\n",
        );
        wait_content(
            &b.synapse().join("default/api/one.xml"),
            b"<api name=\"one\"/>\n",
        );
        std::fs::remove_dir_all(a.synapse().join("default")).expect("empty A's root");
        scrape_until(pa, "A to pause synapse-configs", |t| {
            (value(t, "artisync_folder_paused", &[("folder", SYNAPSE)])? == 1.0).then_some(())
        });
        assert_eq!(
            value(
                &scrape(pa),
                "artisync_folder_in_sync",
                &[("folder", SYNAPSE)]
            ),
            Some(0.0)
        );
        write(
            &b.synapse().join("default/api/two.xml"),
            "<api name=\"two\"/>\n",
        );
    }
    let first = scrape_until(pa, "A to know it is behind B", |t| {
        let behind = value(t, "artisync_peer_behind_records", &b_link)?;
        let lag = value(t, "artisync_peer_lag_seconds", &b_link)?;
        (behind > 0.0 && lag > 0.0).then_some(lag)
    });
    let second = scrape_until(pa, "A's lag behind B to grow", |t| {
        let lag = value(t, "artisync_peer_lag_seconds", &b_link)?;
        (lag > first + 0.2).then_some(lag)
    });

    cluster[1].stop();
    let third = scrape_until(pa, "A to show B disconnected", |t| {
        let connected = value(t, "artisync_peer_connected", &[("peer", "b")])?;
        let lag = value(t, "artisync_peer_lag_seconds", &b_link)?;
        (connected == 0.0).then_some(lag)
    });
    assert!(third >= second, "lag went back: {second} -> {third}");
    scrape_until(pa, "A's lag behind the stopped B to keep growing", |t| {
        let behind = value(t, "artisync_peer_behind_records", &b_link)?;
        let lag = value(t, "artisync_peer_lag_seconds", &b_link)?;
        (behind > 0.0 && lag > third + 0.2).then_some(())
    });
    assert!(
        !cluster[0].synapse().join("default/api/two.xml").exists(),
        "a paused folder takes in nothing"
    );
}

#[test]
fn a_plaintext_metrics_endpoint_off_loopback_needs_its_own_insecure() {
    let port = artisync::demo::free_ports(1).expect("reserve a loopback port")[0];
    let node = Node::new("m", port, &[]);
    node.append_config("\n[metrics]\nlisten = \"0.0.0.0:9464\"\n");
    let out = node.cli(&["check-config"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "must be refused");
    assert!(
        err.contains("metrics.listen")
            && err.contains("plaintext")
            && err.contains("insecure = true"),
        "the error names the key, the reason and the way out: {err}"
    );
    node.append_config("insecure = true\n");
    let out = node.cli(&["check-config"]);
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        said.contains("metrics at http://0.0.0.0:9464/metrics"),
        "{said}"
    );
}

/// Every `artisync_*` metric the Grafana dashboard queries exists in a real scrape of a node
/// with a peer and a retriever (so the retriever's series exist too).
#[test]
fn every_metric_the_dashboard_queries_is_in_a_real_scrape() {
    let mut cluster = Cluster::full_mesh(2);
    let pa = metrics_on(&cluster[0]);
    let db = cluster[0].dir().join("artifacts.db");
    let url = format!("sqlite://{}", db.display());
    let from = cluster[0].dir().join("bundle");
    write(&from.join("api/dash.xml"), "<api name=\"dash\"/>\n");
    let published = Command::new(BIN)
        .args(["artifact", "publish", "--db", &url, "--id"])
        .arg("6f1c1d7e-8a40-4c52-9a43-5b7c0c2f9d11")
        .args(["--name", "Dash", "--version", "1.0.0", "--label", "L1"])
        .args(["--folder", SYNAPSE, "--from"])
        .arg(&from)
        .stdin(Stdio::null())
        .output()
        .expect("run artifact publish");
    assert!(
        published.status.success(),
        "publish: {}",
        String::from_utf8_lossy(&published.stderr)
    );
    cluster[0].append_config(&format!(
        "\n[retriever]\nartifact_retriever = \"db\"\ndatabase_url = \"{url}\"\ngateway_labels = [\"L1\"]\npoll_interval = 50\n"
    ));
    cluster.start_all();
    write(&cluster[1].synapse().join("x.xml"), "<x/>\n");
    let text = scrape_until(pa, "the retriever's deploy and B's change on A", |t| {
        (value(
            t,
            "artisync_retriever_deployed_artifacts",
            &[("label", "L1")],
        )? == 1.0
            && value(
                t,
                "artisync_propagation_latency_seconds_count",
                &[("folder", SYNAPSE)],
            )? >= 1.0)
            .then_some(t.to_owned())
    });
    let exposed: std::collections::BTreeSet<String> =
        samples(&text).into_iter().map(|(n, _, _)| n).collect();

    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/contrib/grafana/artisync.json");
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).expect("read the dashboard"))
            .expect("the dashboard is JSON");
    let mut exprs = Vec::new();
    collect_exprs(&dashboard, &mut exprs);
    assert!(exprs.len() >= 8, "the dashboard has its queries: {exprs:?}");
    let mut used = std::collections::BTreeSet::new();
    for e in &exprs {
        used.extend(metric_names(e));
    }
    let missing: Vec<&String> = used.iter().filter(|n| !exposed.contains(*n)).collect();
    assert!(
        missing.is_empty(),
        "the dashboard queries {missing:?}, which the scrape does not have; it has {exposed:?}"
    );
    for needed in [
        "artisync_peer_lag_seconds",
        "artisync_peer_behind_records",
        "artisync_propagation_latency_seconds_bucket",
        "artisync_folder_conflicts",
        "artisync_folder_held_files",
        "artisync_folder_skipped_changes",
        "artisync_retriever_failing_artifacts",
        "artisync_peer_connected",
    ] {
        assert!(
            used.contains(needed),
            "the dashboard has no panel on {needed}"
        );
    }
}

/// Every `expr` string anywhere in the dashboard.
fn collect_exprs(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::Object(m) => {
            for (k, x) in m {
                match (k.as_str(), x) {
                    ("expr", serde_json::Value::String(e)) => out.push(e.clone()),
                    _ => collect_exprs(x, out),
                }
            }
        }
        serde_json::Value::Array(a) => a.iter().for_each(|x| collect_exprs(x, out)),
        _ => {}
    }
}

/// The `artisync_*` metric names in a PromQL expression, as written (a histogram's
/// `_bucket`, `_sum` and `_count` series are names of their own in a scrape too).
fn metric_names(expr: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = expr;
    while let Some(i) = rest.find("artisync_") {
        let boundary = rest[..i]
            .chars()
            .last()
            .is_none_or(|c| !(c.is_ascii_alphanumeric() || c == '_'));
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        if boundary {
            names.push(tail[..end].to_owned());
        }
        rest = &tail[end..];
    }
    names
}
