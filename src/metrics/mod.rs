//! Prometheus metrics: what the agent counts as it works ([`Metrics`]: records and contents
//! sent and received per peer and folder, propagation latency, apply batches), what it reads
//! from the status snapshots at scrape time (`collect.rs`: folders, peers and their lag, the
//! retriever), the process itself (`process.rs`, from `/proc`), and the `GET /metrics`
//! endpoint (`server.rs`).
//!
//! Event metrics are plain counters and histograms, handed to the engine and the net edge
//! as handles resolved once per folder or peer link ([`FolderMetrics`], [`LinkMetrics`]);
//! nothing is global. Scrapes clone the status snapshots (each under its own short lock, no
//! I/O while it is held) and encode from the copies.

mod collect;
mod process;
mod server;

use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

pub use collect::{EventClock, Sources};
pub use server::{MetricsError, MetricsServer};

/// Every series of the agent starts with this (`artisync_...`); the process series are the
/// standard `process_*` ones.
pub const PREFIX: &str = "artisync";

/// Propagation latency buckets, seconds: a write on a peer until it is on disk here.
const LATENCY_BUCKETS: [f64; 15] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 3600.0,
];
/// Apply batch duration buckets, seconds.
const BATCH_BUCKETS: [f64; 14] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 60.0,
];

/// Labels of a folder's series.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FolderLabel {
    folder: String,
}

/// Labels of a peer link's series: the peer, and the folder the link carries.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LinkLabels {
    peer: String,
    folder: String,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

fn latency_histogram() -> Histogram {
    Histogram::new(LATENCY_BUCKETS)
}

fn batch_histogram() -> Histogram {
    Histogram::new(BATCH_BUCKETS)
}

/// The agent's event metrics. Cheap to clone; a default one counts into nothing that is
/// served (tests, and an agent without `[metrics]`, count all the same).
#[derive(Clone, Debug, Default)]
pub struct Metrics {
    events: Arc<Events>,
}

#[derive(Debug)]
struct Events {
    records_sent: Family<LinkLabels, Counter>,
    records_received: Family<LinkLabels, Counter>,
    content_sent: Family<LinkLabels, Counter>,
    content_received: Family<LinkLabels, Counter>,
    propagation: HistogramFamily<FolderLabel>,
    apply_batches: Family<FolderLabel, Counter>,
    apply_seconds: HistogramFamily<FolderLabel>,
}

impl Default for Events {
    fn default() -> Self {
        Self {
            records_sent: Family::default(),
            records_received: Family::default(),
            content_sent: Family::default(),
            content_received: Family::default(),
            propagation: Family::new_with_constructor(latency_histogram),
            apply_batches: Family::default(),
            apply_seconds: Family::new_with_constructor(batch_histogram),
        }
    }
}

impl Metrics {
    /// The metrics of one folder's engine.
    pub fn folder(&self, folder: &str) -> FolderMetrics {
        let l = FolderLabel {
            folder: folder.to_owned(),
        };
        let e = &self.events;
        FolderMetrics {
            propagation: e.propagation.get_or_create(&l).clone(),
            apply_batches: e.apply_batches.get_or_create(&l).clone(),
            apply_seconds: e.apply_seconds.get_or_create(&l).clone(),
        }
    }

    /// The metrics of what goes between this node and `peer` for `folder`.
    pub fn link(&self, peer: &str, folder: &str) -> LinkMetrics {
        let l = LinkLabels {
            peer: peer.to_owned(),
            folder: folder.to_owned(),
        };
        let e = &self.events;
        LinkMetrics {
            records_sent: e.records_sent.get_or_create(&l).clone(),
            records_received: e.records_received.get_or_create(&l).clone(),
            content_sent: e.content_sent.get_or_create(&l).clone(),
            content_received: e.content_received.get_or_create(&l).clone(),
        }
    }

    /// A registry with every series: these event metrics, the snapshots of `sources` read at
    /// each scrape, and the process.
    pub fn registry(&self, sources: Sources) -> Registry {
        let mut root = Registry::default();
        root.register_collector(Box::new(process::ProcessCollector));
        let r = root.sub_registry_with_prefix(PREFIX);
        let e = &self.events;
        r.register(
            "records_sent",
            "Index records sent to a peer",
            e.records_sent.clone(),
        );
        r.register(
            "records_received",
            "Index records received from a peer",
            e.records_received.clone(),
        );
        r.register(
            "content_sent_bytes",
            "File content bytes sent to a peer: inline with index records, and served to its fetches (peer unknown without TLS, which proves no fetcher name)",
            e.content_sent.clone(),
        );
        r.register(
            "content_received_bytes",
            "File content bytes received from a peer: inline with index records, and fetched",
            e.content_received.clone(),
        );
        r.register(
            "propagation_latency_seconds",
            "From the writer's stamp (its wall clock) until a peer's change is on disk here; 0 when the writer's clock is ahead",
            e.propagation.clone(),
        );
        r.register(
            "apply_batches",
            "Peer batches applied (settled and committed to the index)",
            e.apply_batches.clone(),
        );
        r.register(
            "apply_batch_duration_seconds",
            "From the start of a peer batch's decisions until its index commit",
            e.apply_seconds.clone(),
        );
        r.register_collector(Box::new(collect::StatusCollector::new(sources)));
        root
    }
}

/// One folder engine's metrics.
#[derive(Clone, Debug)]
pub struct FolderMetrics {
    propagation: Histogram,
    apply_batches: Counter,
    apply_seconds: Histogram,
}

impl Default for FolderMetrics {
    fn default() -> Self {
        Metrics::default().folder("")
    }
}

impl FolderMetrics {
    /// A peer's change is on disk here: `written_ms` is the writer's wall clock when it wrote
    /// it (the wall part of the record's stamp). A writer's clock ahead of this one counts 0.
    pub fn applied_remote(&self, written_ms: u64, now_ms: u64) {
        let ms = now_ms.saturating_sub(written_ms);
        self.propagation.observe(ms as f64 / 1000.0);
    }

    /// A peer batch was applied and committed, `took` after its decisions began.
    pub fn applied_batch(&self, took: Duration) {
        self.apply_batches.inc();
        self.apply_seconds.observe(took.as_secs_f64());
    }
}

/// The metrics of one peer link (peer and folder).
#[derive(Clone, Debug)]
pub struct LinkMetrics {
    records_sent: Counter,
    records_received: Counter,
    content_sent: Counter,
    content_received: Counter,
}

impl LinkMetrics {
    /// A batch of `records` went to the peer, with `bytes` of inline contents.
    pub fn sent(&self, records: u64, bytes: u64) {
        self.records_sent.inc_by(records);
        self.content_sent.inc_by(bytes);
    }

    /// Content bytes went to the peer outside index batches (its fetches).
    pub fn served(&self, bytes: u64) {
        self.content_sent.inc_by(bytes);
    }

    /// A batch of `records` came from the peer, with `bytes` of inline contents.
    pub fn received(&self, records: u64, bytes: u64) {
        self.records_received.inc_by(records);
        self.content_received.inc_by(bytes);
    }

    /// Content bytes came from the peer outside index batches (this node's fetches).
    pub fn fetched(&self, bytes: u64) {
        self.content_received.inc_by(bytes);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scrape(m: &Metrics) -> String {
        let registry = m.registry(Sources::default());
        let mut text = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut text, &registry).expect("encode");
        text
    }

    #[test]
    fn event_metrics_show_under_their_labels_and_clock_skew_counts_zero() {
        let m = Metrics::default();
        let link = m.link("gw2", "synapse-configs");
        link.received(3, 120);
        link.fetched(1000);
        link.sent(2, 7);
        let f = m.folder("synapse-configs");
        f.applied_remote(10_000, 10_250);
        f.applied_remote(20_000, 10_000); // the writer's clock is ahead
        f.applied_batch(Duration::from_millis(3));
        let text = scrape(&m);
        for line in [
            "artisync_records_received_total{peer=\"gw2\",folder=\"synapse-configs\"} 3",
            "artisync_content_received_bytes_total{peer=\"gw2\",folder=\"synapse-configs\"} 1120",
            "artisync_records_sent_total{peer=\"gw2\",folder=\"synapse-configs\"} 2",
            "artisync_content_sent_bytes_total{peer=\"gw2\",folder=\"synapse-configs\"} 7",
            "artisync_propagation_latency_seconds_count{folder=\"synapse-configs\"} 2",
            "artisync_propagation_latency_seconds_sum{folder=\"synapse-configs\"} 0.25",
            "artisync_propagation_latency_seconds_bucket{folder=\"synapse-configs\",le=\"0.005\"} 1",
            "artisync_apply_batches_total{folder=\"synapse-configs\"} 1",
            "artisync_apply_batch_duration_seconds_count{folder=\"synapse-configs\"} 1",
        ] {
            assert!(text.contains(line), "missing {line:?} in:\n{text}");
        }
    }
}
