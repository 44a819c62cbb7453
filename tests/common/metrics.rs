//! Scraping a real agent's Prometheus endpoint (`[metrics]`) in tests.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use super::{Node, SYNC_TIMEOUT, wait_for};

/// Reserves a port and turns the node's metrics endpoint on there; returns the port.
pub fn metrics_on(node: &Node) -> u16 {
    let port = artisync::demo::free_ports(1).expect("reserve a loopback port")[0];
    node.append_config(&format!("\n[metrics]\nlisten = \"127.0.0.1:{port}\"\n"));
    port
}

/// One HTTP/1.1 request; returns the status code and the body.
pub fn http_get(port: u16, path: &str) -> Result<(u16, String), String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| format!("send: {e}"))?;
    let mut reply = String::new();
    s.read_to_string(&mut reply)
        .map_err(|e| format!("read: {e}"))?;
    let (head, body) = reply
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("no header end in {reply:?}"))?;
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("no status in {head:?}"))?;
    Ok((code, body.to_owned()))
}

/// A scrape of `GET /metrics`.
pub fn scrape(port: u16) -> String {
    match http_get(port, "/metrics") {
        Ok((200, body)) => body,
        other => panic!("scrape of port {port}: {other:?}"),
    }
}

/// Every sample of a scrape: (name, labels as written, value).
pub fn samples(text: &str) -> Vec<(String, String, f64)> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (name, labels) = match series.split_once('{') {
                Some((n, rest)) => (n, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            Some((name.to_owned(), labels.to_owned(), value.parse().ok()?))
        })
        .collect()
}

/// The value of the series `name` whose labels include every `labels` pair.
pub fn value(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    samples(text).into_iter().find_map(|(n, l, v)| {
        let all = labels
            .iter()
            .all(|(k, val)| l.split(',').any(|kv| kv == format!("{k}=\"{val}\"")));
        (n == name && all).then_some(v)
    })
}

/// Polls scrapes until `check` accepts one (bounded); returns what it returned.
pub fn scrape_until<T>(port: u16, what: &str, mut check: impl FnMut(&str) -> Option<T>) -> T {
    wait_for(SYNC_TIMEOUT, what, || {
        let text = scrape(port);
        check(&text).ok_or_else(|| {
            let relevant: Vec<&str> = text
                .lines()
                .filter(|l| !l.starts_with('#') && !l.starts_with("process_"))
                .collect();
            format!("scrape:\n{}", relevant.join("\n"))
        })
    })
}
