//! artisync keeps the artifact folders of an API-gateway cluster identical, without NFS or
//! rsync: every node runs one agent that watches its folders, and agents replicate changes
//! among each other over gRPC with version vectors and deterministic conflict resolution.
//!
//! # Layout
//! - [`model`]: the pure core: paths, version vectors, records, the replica state machine,
//!   and the names used as keys ([`model::FolderId`], [`model::PeerName`]), checked once where
//!   they enter.
//! - [`store`]: the crash-safe local index (SQLite, WAL), one file per table and one row codec.
//! - [`fs`]: scan + hash, watch, safe batched apply (one file per step), durable state-file
//!   writes, ignore rules, the XML gate.
//! - [`engine`]: one task per folder that owns its replica and wires the edges to the model:
//!   local changes, peer batches (chained, staged, settled), the pure disk plan of a peer
//!   record, the skip book, conflict copies, deploys, and the feed of what a subscriber is
//!   sent.
//! - [`liveness`]: whether each engine is idle, busy or stopped, and whether it is stalled.
//! - [`net`]: the peer gRPC edge: wire conversions, the `Peer` service streaming the engine's
//!   feed, and the client sessions to each peer.
//! - [`artifacts`]: the DB-backed artifact saver and retriever, the hub for agents without
//!   database credentials, and WSO2 API-M 3.2's own tables as a read-only source;
//!   [`artifacts::source_for`] picks one from the typed [`config::RetrieverConfig`]. Test
//!   fixtures (`artifacts::db::testing`, `artifacts::wso2::testing`) exist only with the
//!   `testing` feature, which the integration tests and benches turn on.
//! - [`admin`]: the local admin service on a unix socket (status, conflicts, resume).
//! - [`metrics`]: Prometheus at `GET /metrics` (`[metrics]`): event counters and histograms
//!   handed to the engines and the net edge, status snapshots read at scrape time, `process_*`.
//! - [`daemon`]: starts everything, health service, systemd notify, graceful shutdown.
//! - [`demo`]: a three-node cluster on loopback.
//! - [`config`]: the TOML configuration and its validation.
//! - [`cert`]: a private CA for the peers' mutual TLS.
//! - [`identity`]: who a gRPC caller is (node, publisher, plaintext) by its client
//!   certificate, and what each service lets it do.

pub mod admin;
pub mod artifacts;
pub mod cert;
pub mod config;
pub mod daemon;
pub mod demo;
pub mod engine;
pub mod fs;
pub mod identity;
pub mod liveness;
pub mod metrics;
pub mod model;
pub mod net;
pub mod store;

/// Generated protobuf/gRPC code. Never leaks past `net` and `admin`.
pub mod pb {
    pub mod sync {
        tonic::include_proto!("artisync.v1");
    }
    pub mod admin {
        tonic::include_proto!("artisync.admin.v1");
    }
    pub mod artifacts {
        tonic::include_proto!("artisync.artifacts.v1");
    }
}

/// Milliseconds since the Unix epoch: the one place the wall clock is read for the model.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The wait before try number `attempt` (1-based) of something that keeps failing: `base`,
/// doubling with each attempt, never above `cap`. The one backoff rule of the retriever's
/// deployments, the skip book's retries and the engine's index reloads.
pub fn doubling_delay(
    base: std::time::Duration,
    attempt: u32,
    cap: std::time::Duration,
) -> std::time::Duration {
    let factor = 1u32
        .checked_shl(attempt.saturating_sub(1))
        .unwrap_or(u32::MAX);
    base.checked_mul(factor).unwrap_or(cap).min(cap)
}
