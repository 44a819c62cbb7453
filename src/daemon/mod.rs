//! Wiring: starts the folder engines and watchers, the gRPC server (peers + health), the admin
//! socket and the peer sessions; tells systemd when it is ready; on cancellation, stops
//! everything under a deadline.
//!
//! It also watches the folder engines (see [`crate::liveness`]): an engine whose task ends
//! while the agent runs is critical (health NOT_SERVING, graceful shutdown, exit non-zero, so
//! systemd's `Restart=on-failure` restarts the agent); an engine busy without progress for
//! longer than [`ENGINE_STALL_LIMIT`](crate::liveness::ENGINE_STALL_LIMIT) turns health NOT_SERVING and stops the systemd watchdog
//! pets (systemd then restarts the agent after `WatchdogSec`), until it moves again.
//!
//! [`run`] reads as the order things start in; each subsystem starts itself: the state
//! directory (`state.rs`), the folders (`folders.rs`), the servers (`servers.rs`), the
//! retriever (`retriever.rs`), the peer mesh, and the engine watch (`watch.rs`).

mod folders;
mod retriever;
mod servers;
mod state;
mod watch;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;
use tracing::{error, info, warn};

use crate::admin::AdminService;
use crate::config::Config;
use crate::engine::{self, FolderHandle};
use crate::metrics::{self, Metrics};
use crate::model::{FolderId, NodeId};
use crate::net;
use crate::store::Store;
use folders::{FolderRuntime, Gone};
use retriever::{RetrieverRunning, RetrieverStart};
use servers::GrpcServer;
use state::RunMarker;
pub use state::node_id;
use watch::{EngineWatch, notify_systemd, watchdog_interval};

/// How long shutdown waits for tasks to finish.
const SHUTDOWN_DEADLINE: Duration = Duration::from_secs(10);
/// How often files that were unstable, held or paused are looked at again.
const RETRY_LOOK: Duration = Duration::from_millis(500);
/// How often the engines' liveness is looked at (health follows it within this time).
const ENGINE_CHECK_EVERY: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("state_dir {path}: {source}")]
    StateDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "state_dir {0} is in use by another artisync process (lock held); two agents must not share one state_dir"
    )]
    Locked(PathBuf),
    #[error("node id file {path}: {problem}")]
    NodeId { path: PathBuf, problem: String },
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error(transparent)]
    Engine(#[from] engine::EngineError),
    #[error(transparent)]
    Watch(#[from] crate::fs::watch::WatchError),
    #[error("cannot watch {path}: the set-up failed: {message}")]
    WatchSetup { path: PathBuf, message: String },
    #[error(transparent)]
    Net(#[from] net::NetError),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: String,
        source: std::io::Error,
    },
    #[error("retriever: {0}")]
    Retriever(String),
    #[error(transparent)]
    Metrics(#[from] metrics::MetricsError),
    #[error("admin socket {path}: {source}")]
    Admin {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "the engine of folder {folder} {reason} while the agent was running; the agent stopped so that it can be restarted"
    )]
    EngineGone { folder: FolderId, reason: String },
    #[error(
        "the start-up scan of folder {folder} panicked ({reason}); the agent stopped before serving, so that it can be restarted"
    )]
    ScanPanicked { folder: FolderId, reason: String },
}

/// Handles the caller gets once the agent is up (tests and the demo use them).
#[derive(Clone)]
pub struct Running {
    pub node: NodeId,
    pub listen: std::net::SocketAddr,
    pub folders: Arc<HashMap<FolderId, FolderHandle>>,
}

/// Where the agent's tasks run: the tracker that shutdown waits on, and the agent's
/// cancellation.
#[derive(Clone)]
struct Tasks {
    tracker: TaskTracker,
    cancel: CancellationToken,
}

/// Runs the agent until `cancel`. `ready` receives the running handles once it serves.
pub async fn run(
    config: Config,
    cancel: CancellationToken,
    ready: Option<tokio::sync::oneshot::Sender<Running>>,
) -> Result<(), DaemonError> {
    let _lock = state::prepare_state_dir(&config.state_dir)?;
    state::raise_descriptor_limit();
    let node = node_id(&config.state_dir)?;
    let store = Store::open(&config.state_dir).await?;
    let marker = RunMarker::begin(&config.state_dir, &store).await?;
    let names: engine::NodeNames = Arc::new(Mutex::new(HashMap::new()));
    let metrics = Metrics::default();
    let opts = engine::engine_options(&config, node, names.clone(), metrics.clone());
    info!(node = %config.node, node_id = %node, folders = config.folders.len(), peers = config.peers.len(), "starting");

    let health = HealthReporter::new();
    // tonic-health starts service "" as SERVING; it must say so only once the agent is up
    // (admin socket bound, peer sessions started; in sync mode, the start-up deploy done).
    health
        .set_service_status("", ServingStatus::NotServing)
        .await;
    let gone: Gone = Arc::new(OnceLock::new());
    let tasks = Tasks {
        tracker: TaskTracker::new(),
        cancel: cancel.clone(),
    };

    let folders = FolderRuntime::start(&config, &store, &opts, &tasks, &health, &gone).await?;
    let handles = folders.handles.clone();
    marker.written().await?;

    let (listener, listen) = servers::bind(config.listen).await?;
    let grpc = GrpcServer::build(&config, node, &handles, &health, &metrics, &tasks).await?;
    let (grpc, retriever) = RetrieverStart::prepare(&config, &handles, &store, grpc).await?;
    grpc.spawn(listener, &tasks);
    let retriever: Option<RetrieverRunning> = retriever.map(|r| r.start(&tasks));

    let statuses: net::PeerStatuses = Arc::new(Mutex::new(HashMap::new()));
    let admin = AdminService {
        node,
        node_name: config.node.clone(),
        listen: listen.to_string(),
        started: std::time::Instant::now(),
        folders: handles.clone(),
        peers: statuses.clone(),
        store: store.clone(),
        retriever: retriever.as_ref().map(|r| r.handle.clone()),
    };
    let socket = config.admin_socket();
    servers::start_admin(admin, &socket, &tasks)?;
    let sources = metrics::Sources {
        folders: handles.clone(),
        peers: statuses.clone(),
        retriever: retriever.as_ref().map(|r| r.handle.clone()),
        retriever_events: Default::default(),
    };
    servers::start_metrics(&config, &metrics, sources, &tasks).await?;

    let sessions = net::peer_sessions(&config, node, handles.clone(), statuses, names, &metrics);
    for session in sessions {
        tasks.tracker.spawn(session.run(cancel.clone()));
    }

    // From here on the engine watch owns the health status: SERVING while every engine is
    // alive and (sync start-up) the start-up deploy finished or its retries ran out.
    let startup = retriever.and_then(|r| r.startup);
    let engine_watch =
        EngineWatch::first_look(&config.node, handles.clone(), health.clone(), startup).await;
    info!(node = %config.node, listen = %listen, "listening");
    notify_systemd(&[sd_notify::NotifyState::Ready]);
    let engine_watch = tokio::spawn(engine_watch.run(watchdog_interval(), cancel.clone()));
    if let Some(ready) = ready {
        let _ = ready.send(Running {
            node,
            listen,
            folders: handles,
        });
    }

    cancel.cancelled().await;
    shutdown(&config, engine_watch, &health, tasks, folders, &store).await;
    let _ = std::fs::remove_file(&socket);
    info!(node = %config.node, "stopped");
    match gone.get() {
        Some((folder, reason)) => Err(DaemonError::EngineGone {
            folder: folder.clone(),
            reason: reason.clone(),
        }),
        None => Ok(()),
    }
}

/// Stops everything after cancellation: the engine watch, health, every task (under
/// [`SHUTDOWN_DEADLINE`]), the watchers; then, if every task stopped, makes the index durable.
async fn shutdown(
    config: &Config,
    engine_watch: tokio::task::JoinHandle<()>,
    health: &HealthReporter,
    tasks: Tasks,
    folders: FolderRuntime,
    store: &Store,
) {
    info!(node = %config.node, "shutting down");
    notify_systemd(&[sd_notify::NotifyState::Stopping]);
    // Stopped first, so it cannot set SERVING again after this.
    if let Err(e) = engine_watch.await {
        error!(node = %config.node, error = %e, "the engine watch failed");
    }
    health
        .set_service_status("", ServingStatus::NotServing)
        .await;
    tasks.tracker.close();
    let stopped = tokio::time::timeout(SHUTDOWN_DEADLINE, tasks.tracker.wait())
        .await
        .is_ok();
    if !stopped {
        warn!("some tasks did not stop within the shutdown deadline");
    }
    folders.join_watchers().await;
    if stopped {
        state::clean_stop(store, &config.state_dir).await;
    }
}

#[cfg(test)]
mod tests {
    use tonic_health::ServingStatus;
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_server::Health;
    use tonic_health::server::{HealthReporter, HealthService};

    pub(super) async fn serving(health: &HealthReporter) -> bool {
        let service = HealthService::from_health_reporter(health.clone());
        let reply = service
            .check(tonic::Request::new(HealthCheckRequest {
                service: String::new(),
            }))
            .await
            .expect("service \"\" is known");
        reply.into_inner().status == ServingStatus::Serving as i32
    }

    /// A reporter that knows service "" as SERVING (as `HealthReporter::new` makes it).
    pub(super) fn health_serving() -> HealthReporter {
        HealthReporter::new()
    }
}
