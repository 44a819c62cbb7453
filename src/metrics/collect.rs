//! Series read at scrape time from the status snapshots the admin service shows too: the
//! folders, the peers (connected, and how far this node is behind each), and the retriever.
//! Each snapshot is a clone taken under its own short lock; nothing is held while encoding.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeGaugeValue, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::gauge::ConstGauge;

use crate::artifacts::retriever::RetrieverHandle;
use crate::engine::FolderHandle;
use crate::liveness::{self, ENGINE_STALL_LIMIT};
use crate::model::FolderId;
use crate::net::{PeerStatus, PeerStatuses};

/// Where the scrape-time series come from.
#[derive(Clone, Default)]
pub struct Sources {
    pub folders: Arc<HashMap<FolderId, FolderHandle>>,
    pub peers: PeerStatuses,
    pub retriever: Option<RetrieverHandle>,
    /// When the retriever's event cursor last moved (kept by the metrics server's sampler).
    pub retriever_events: Arc<EventClock>,
}

/// The retriever's last event id and the wall time (ms) this node first saw it: the
/// retriever's status has the id, not the time, so the metrics server samples it every
/// second ([`super::MetricsServer`]). Before any event it holds the agent's start.
#[derive(Debug)]
pub struct EventClock {
    id: AtomicI64,
    at_ms: AtomicU64,
}

impl Default for EventClock {
    fn default() -> Self {
        Self {
            id: AtomicI64::new(0),
            at_ms: AtomicU64::new(crate::now_ms()),
        }
    }
}

impl EventClock {
    /// Notes the retriever's event cursor as seen at `now_ms`.
    pub fn note(&self, id: i64, now_ms: u64) {
        if self.id.swap(id, Ordering::Relaxed) != id {
            self.at_ms.store(now_ms, Ordering::Relaxed);
        }
    }

    /// Seconds since the cursor last moved (or since the agent started).
    fn age_secs(&self, now_ms: u64) -> f64 {
        now_ms.saturating_sub(self.at_ms.load(Ordering::Relaxed)) as f64 / 1000.0
    }
}

/// Encodes the snapshots of [`Sources`] at every scrape.
pub(super) struct StatusCollector {
    sources: Sources,
}

impl std::fmt::Debug for StatusCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StatusCollector")
            .field("folders", &self.sources.folders.len())
            .finish_non_exhaustive()
    }
}

impl StatusCollector {
    pub(super) fn new(sources: Sources) -> Self {
        Self { sources }
    }
}

/// One gauge series: its labels and value.
type Row<'a, V> = (Vec<(&'static str, &'a str)>, V);

/// Writes one gauge family (`artisync_<name>`) with its rows.
fn gauges<V: EncodeGaugeValue>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    rows: Vec<Row<'_, V>>,
) -> Result<(), std::fmt::Error> {
    let mut family = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for (labels, value) in rows {
        ConstGauge::new(value).encode(family.encode_family(&labels)?)?;
    }
    Ok(())
}

fn flag(b: bool) -> i64 {
    i64::from(b)
}

/// Seconds this node has been behind `p` on `folder`: since it first knew of a change of the
/// peer's not applied here (see [`PeerStatus::behind_since_ms`]); 0 when caught up.
fn lag_secs(p: &PeerStatus, folder: &str, now_ms: u64) -> f64 {
    match p.behind_since_ms.get(folder) {
        Some(since) if p.behind.get(folder).is_some_and(|b| *b > 0) => {
            now_ms.saturating_sub(*since) as f64 / 1000.0
        }
        _ => 0.0,
    }
}

impl Collector for StatusCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let mut peers: Vec<PeerStatus> = self
            .sources
            .peers
            .lock()
            .map(|m| m.values().cloned().collect())
            .unwrap_or_default();
        peers.sort_by(|a, b| a.name.cmp(&b.name));
        let mono = liveness::mono_ms();
        let mut folders: Vec<_> = self
            .sources
            .folders
            .values()
            .map(|h| {
                let f = h.status();
                let engine = h.engine_report(mono, ENGINE_STALL_LIMIT);
                let in_sync = crate::admin::in_sync(&f, &engine, &peers);
                (f, in_sync)
            })
            .collect();
        folders.sort_by(|a, b| a.0.id.cmp(&b.0.id));
        let now = crate::now_ms();
        let e = &mut encoder;

        let per_folder = |v: &dyn Fn(&crate::engine::FolderStatus, bool) -> i64| {
            folders
                .iter()
                .map(|(f, in_sync)| (vec![("folder", f.id.as_str())], v(f, *in_sync)))
                .collect::<Vec<_>>()
        };
        gauges(
            e,
            "folder_files",
            "Live files in the folder's index",
            per_folder(&|f, _| f.files as i64),
        )?;
        gauges(
            e,
            "folder_bytes",
            "Bytes of the live files in the folder's index",
            per_folder(&|f, _| f.bytes as i64),
        )?;
        gauges(
            e,
            "folder_in_sync",
            "1 when the folder is in sync: not paused, nothing held or skipped, its engine alive, every peer connected with nothing left to apply",
            per_folder(&|_, s| flag(s)),
        )?;
        gauges(
            e,
            "folder_paused",
            "1 while the mass-delete guard pauses the folder (artisync resume)",
            per_folder(&|f, _| flag(f.paused.is_some())),
        )?;
        gauges(
            e,
            "folder_index_writable",
            "0 while the folder's index cannot be written (a full or read-only state_dir): it takes no change until it can",
            per_folder(&|f, _| flag(f.index_error.is_none())),
        )?;
        gauges(
            e,
            "folder_held_files",
            "Local files held back by the validation gate",
            per_folder(&|f, _| f.held.len() as i64),
        )?;
        gauges(
            e,
            "folder_unreadable_files",
            "Local files that could not be read on the last look",
            per_folder(&|f, _| f.unreadable.len() as i64),
        )?;
        gauges(
            e,
            "folder_skipped_changes",
            "Peer changes set aside after failing to apply, retried with backoff",
            per_folder(&|f, _| f.skipped.len() as i64),
        )?;
        gauges(
            e,
            "folder_conflicts",
            "Conflict copies kept for the folder under state_dir/conflicts",
            per_folder(&|f, _| f.conflicts as i64),
        )?;

        let rows = peers
            .iter()
            .map(|p| (vec![("peer", p.name.as_str())], flag(p.connected)))
            .collect();
        gauges(
            e,
            "peer_connected",
            "1 while at least one folder stream from the peer is up",
            rows,
        )?;
        let rows = peers
            .iter()
            .filter_map(|p| {
                let seen = p.last_seen_ms?;
                Some((
                    vec![("peer", p.name.as_str())],
                    now.saturating_sub(seen) as f64 / 1000.0,
                ))
            })
            .collect();
        gauges(
            e,
            "peer_last_seen_age_seconds",
            "Seconds since the last message from the peer",
            rows,
        )?;
        let links: Vec<(&PeerStatus, &str)> = peers
            .iter()
            .flat_map(|p| folders.iter().map(move |(f, _)| (p, f.id.as_str())))
            .collect();
        let rows = links
            .iter()
            .map(|(p, folder)| {
                let behind = p.behind.get(*folder).copied().unwrap_or(0) as i64;
                (vec![("peer", p.name.as_str()), ("folder", *folder)], behind)
            })
            .collect();
        gauges(
            e,
            "peer_behind_records",
            "The peer's index sequence numbers not applied here yet, as last known (a disconnected peer's new changes are not known)",
            rows,
        )?;
        let rows = links
            .iter()
            .map(|(p, folder)| {
                (
                    vec![("peer", p.name.as_str()), ("folder", *folder)],
                    lag_secs(p, folder, now),
                )
            })
            .collect();
        gauges(
            e,
            "peer_lag_seconds",
            "Age of the oldest change from the peer known here and not applied yet (since it arrived), seconds; 0 when caught up",
            rows,
        )?;

        if let Some(r) = &self.sources.retriever {
            let s = r.status();
            self.sources.retriever_events.note(s.last_event_id, now);
            let rows = s
                .labels
                .iter()
                .map(|l| {
                    let n = s.deployed.iter().filter(|d| d.labels.contains(l)).count();
                    (vec![("label", l.as_str())], n as i64)
                })
                .collect();
            gauges(
                e,
                "retriever_deployed_artifacts",
                "Artifacts deployed on this node, by subscribed gateway label",
                rows,
            )?;
            let gave_up = s
                .failing
                .iter()
                .filter(|f| f["gave_up"].as_bool() == Some(true))
                .count();
            let attempts: u64 = s
                .failing
                .iter()
                .filter_map(|f| f["attempts"].as_u64())
                .sum();
            let one = |v: i64| vec![(Vec::new(), v)];
            gauges(
                e,
                "retriever_failing_artifacts",
                "Artifacts whose deployment failed and is retried (or was given up)",
                one(s.failing.len() as i64),
            )?;
            gauges(
                e,
                "retriever_given_up_artifacts",
                "Failing artifacts whose retries ran out (until a new event or redeploy)",
                one(gave_up as i64),
            )?;
            gauges(
                e,
                "retriever_deploy_retries",
                "Failed deploy attempts of the artifacts failing now",
                one(attempts as i64),
            )?;
            gauges(
                e,
                "retriever_database_available",
                "1 while the artifact source (database or hub) answers",
                one(flag(s.source_available)),
            )?;
            gauges(
                e,
                "retriever_startup_done",
                "1 once the start-up deploy finished",
                one(flag(s.startup_done)),
            )?;
            gauges(
                e,
                "retriever_last_event_age_seconds",
                "Seconds since the retriever's event cursor last moved (sampled every second), or since the agent started",
                vec![(Vec::new(), self.sources.retriever_events.age_secs(now))],
            )?;
        }
        Ok(())
    }
}
