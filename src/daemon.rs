//! Wiring: starts the folder engines and watchers, the gRPC server (peers + health), the admin
//! socket and the peer sessions; tells systemd when it is ready; on cancellation, stops
//! everything under a deadline.
//!
//! It also watches the folder engines (see [`crate::liveness`]): an engine whose task ends
//! while the agent runs is critical (health NOT_SERVING, graceful shutdown, exit non-zero, so
//! systemd's `Restart=on-failure` restarts the agent); an engine busy without progress for
//! longer than [`ENGINE_STALL_LIMIT`] turns health NOT_SERVING and stops the systemd watchdog
//! pets (systemd then restarts the agent after `WatchdogSec`), until it moves again.

use std::collections::{BTreeMap, HashMap};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use futures_util::FutureExt;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::transport::Server;
use tonic::transport::server::TcpIncoming;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;
use tracing::{debug, error, info, warn};

use crate::admin::AdminService;
use crate::artifacts::retriever::Retriever;
use crate::config::Config;
use crate::engine::{self, FolderEngine, FolderHandle};
use crate::fs::own::OwnWrites;
use crate::fs::watch::{Change, FolderWatcher};
use crate::liveness::{self, ENGINE_STALL_LIMIT, Verdict};
use crate::model::NodeId;
use crate::net::{self, PeerService};
use crate::store::Store;

/// How long shutdown waits for tasks to finish.
const SHUTDOWN_DEADLINE: Duration = Duration::from_secs(10);
/// How often files that were unstable, held or paused are looked at again.
const RETRY_LOOK: Duration = Duration::from_millis(500);
/// `state_dir/running`: while an agent runs, the id of the machine's boot it started in;
/// removed once a clean shutdown has made the index durable.
const RUNNING_MARKER: &str = "running";
/// Where the kernel tells the id of the current boot.
const BOOT_ID_PATH: &str = "/proc/sys/kernel/random/boot_id";
/// Marker text of a boot known by its wall-clock instant instead of its id (see [`this_boot`]).
const BOOT_AT: &str = "boot-at:";
/// Two boot instants this close are one boot: wall-clock slewing moves the computed instant by
/// milliseconds; a clock step moves it further and then reads as a restart, which only costs a
/// full exchange with the peers.
const BOOT_AT_TOLERANCE_MS: u64 = 2_000;
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
    #[error("admin socket {path}: {source}")]
    Admin {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "the engine of folder {folder} {reason} while the agent was running; the agent stopped so that it can be restarted"
    )]
    EngineGone { folder: String, reason: String },
    #[error(
        "the start-up scan of folder {folder} panicked ({reason}); the agent stopped before serving, so that it can be restarted"
    )]
    ScanPanicked { folder: String, reason: String },
}

/// Reads the node id kept in `state_dir`, creating it on first start.
pub fn node_id(state_dir: &Path) -> Result<NodeId, DaemonError> {
    let path = state_dir.join("node_id");
    match std::fs::read_to_string(&path) {
        Ok(text) => u64::from_str_radix(text.trim(), 16)
            .ok()
            .filter(|v| *v != 0)
            .map(NodeId)
            .ok_or_else(|| DaemonError::NodeId {
                path: path.clone(),
                problem: format!("{:?} is not a 16-digit hex node id", text.trim()),
            }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let id = NodeId(rand::random::<u64>().max(1));
            crate::fs::atomic::write(&path, format!("{id}\n").as_bytes(), 0o600).map_err(
                |source| DaemonError::StateDir {
                    path: path.clone(),
                    source,
                },
            )?;
            Ok(id)
        }
        Err(e) => Err(DaemonError::NodeId {
            path,
            problem: e.to_string(),
        }),
    }
}

/// This boot of the machine: the kernel's boot id or, where `/proc/sys` is hidden (the shipped
/// unit's `ProcSubset=pid`), the wall-clock instant the machine booted at
/// (`CLOCK_REALTIME - CLOCK_BOOTTIME`, in ms), as `boot-at:<ms>`.
fn this_boot() -> Option<String> {
    std::fs::read_to_string(BOOT_ID_PATH)
        .ok()
        .map(|id| id.trim().to_owned())
        .filter(|id| !id.is_empty())
        .or_else(boot_instant)
}

/// `boot-at:<ms>`: when this boot began, by the wall clock.
fn boot_instant() -> Option<String> {
    use nix::time::{ClockId, clock_gettime};
    let ms = |t: nix::sys::time::TimeSpec| -> Option<u64> {
        Some(u64::try_from(t.tv_sec()).ok()? * 1000 + u64::try_from(t.tv_nsec()).ok()? / 1_000_000)
    };
    let now = ms(clock_gettime(ClockId::CLOCK_REALTIME).ok()?)?;
    let up = ms(clock_gettime(ClockId::CLOCK_BOOTTIME).ok()?)?;
    Some(format!("{BOOT_AT}{}", now.checked_sub(up)?))
}

/// Whether a marker's boot and this one are the same boot (see [`this_boot`]).
fn same_boot(marker: &str, now: &str) -> bool {
    match (marker.strip_prefix(BOOT_AT), now.strip_prefix(BOOT_AT)) {
        (Some(then), Some(now)) => match (then.parse::<u64>(), now.parse::<u64>()) {
            (Ok(then), Ok(now)) => then.abs_diff(now) <= BOOT_AT_TOLERANCE_MS,
            _ => false,
        },
        (None, None) => marker == now,
        // Known one way then and the other way now: not comparable.
        _ => false,
    }
}

/// True when the index may have lost its last commits: the last run did not stop cleanly (its
/// marker is still there) and the machine went down since (another boot, or no boot to
/// compare). Commits are durable only at checkpoints (WAL with `synchronous = NORMAL`), so a
/// power loss can take the last ones back, while a process that dies on a running machine
/// loses none.
fn index_may_have_rolled_back(marker: Option<&str>, boot: Option<&str>) -> bool {
    match (marker, boot) {
        (None, _) => false,
        (Some(m), Some(b)) => !same_boot(m.trim(), b),
        (Some(_), None) => true,
    }
}

fn read_running_marker(state_dir: &Path) -> Result<Option<String>, DaemonError> {
    let path = state_dir.join(RUNNING_MARKER);
    match std::fs::read_to_string(&path) {
        Ok(text) => Ok(Some(text)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(DaemonError::StateDir { path, source }),
    }
}

/// Writes the marker durably: it must survive the power loss that the index's last commits
/// may not.
fn write_running_marker(state_dir: &Path, boot: Option<&str>) -> Result<(), DaemonError> {
    let path = state_dir.join(RUNNING_MARKER);
    let text = format!("{}\n", boot.unwrap_or_default());
    crate::fs::atomic::write(&path, text.as_bytes(), 0o600)
        .map_err(|source| DaemonError::StateDir { path, source })
}

/// Removes the marker once every index commit is durable; otherwise leaves it, so a start
/// after a machine restart takes new epochs.
async fn clean_stop(store: &Store, state_dir: &Path) {
    match store.checkpoint().await {
        Ok(true) => {
            if let Err(e) = std::fs::remove_file(state_dir.join(RUNNING_MARKER)) {
                warn!(error = %e, "cannot remove the running marker; a start after a machine restart will take new epochs");
            }
        }
        Ok(false) => warn!(
            "index checkpoint incomplete; a start after a machine restart will take new epochs"
        ),
        Err(e) => {
            warn!(error = %e, "index checkpoint failed; a start after a machine restart will take new epochs")
        }
    }
}

/// Creates `state_dir` (mode 0700) and takes its lock for the life of the process, so two
/// agents never share one index.
fn prepare_state_dir(dir: &Path) -> Result<nix::fcntl::Flock<std::fs::File>, DaemonError> {
    let io = |source| DaemonError::StateDir {
        path: dir.to_owned(),
        source,
    };
    std::fs::create_dir_all(dir).map_err(io)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(io)?;
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.join("lock"))
        .map_err(io)?;
    nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusiveNonblock)
        .map_err(|_| DaemonError::Locked(dir.to_owned()))
}

/// Handles the caller gets once the agent is up (tests and the demo use them).
#[derive(Clone)]
pub struct Running {
    pub node: NodeId,
    pub listen: std::net::SocketAddr,
    pub folders: Arc<HashMap<String, FolderHandle>>,
}

/// Runs the agent until `cancel`. `ready` receives the running handles once it serves.
/// Batches keep their unnamed temp files open until they are durable (see `fs::apply`):
/// lift the soft descriptor limit to the hard one (systemd's default soft limit is 1024).
fn raise_descriptor_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => {
            if let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
                warn!(soft, hard, error = %e, "cannot raise the open-file limit; large batches use named temp files");
            }
        }
        _ => {}
    }
}

pub async fn run(
    config: Config,
    cancel: CancellationToken,
    ready: Option<tokio::sync::oneshot::Sender<Running>>,
) -> Result<(), DaemonError> {
    let _lock = prepare_state_dir(&config.state_dir)?;
    raise_descriptor_limit();
    let node = node_id(&config.state_dir)?;
    let store = Store::open(&config.state_dir).await?;
    let boot = this_boot();
    let marker = read_running_marker(&config.state_dir)?;
    if index_may_have_rolled_back(marker.as_deref(), boot.as_deref()) {
        // Peers' cursors into this index and the records they leave out for this node
        // (`engine::Feed`) hold only while an epoch's index never goes back.
        let epochs = store.new_epochs().await?;
        warn!(
            folders = epochs,
            "the agent did not stop cleanly and the machine has restarted since: the index may have lost its last commits, so its folders take new epochs and every peer exchanges them in full once"
        );
    }
    // It must be durable before anything of this run reaches a peer (the listener binds and
    // the sessions start after the folders are scanned): its two fsyncs run meanwhile.
    let state_dir = config.state_dir.clone();
    let marker_written =
        tokio::task::spawn_blocking(move || write_running_marker(&state_dir, boot.as_deref()));
    let names: engine::NodeNames = Arc::new(Mutex::new(HashMap::new()));
    let opts = engine::engine_options(&config, node, names.clone());
    info!(node = %config.node, node_id = %node, folders = config.folders.len(), peers = config.peers.len(), "starting");

    let (health, health_service) = tonic_health::server::health_reporter();
    // tonic-health starts service "" as SERVING; it must say so only once the agent is up
    // (admin socket bound, peer sessions started; in sync mode, the start-up deploy done).
    health
        .set_service_status("", ServingStatus::NotServing)
        .await;
    let gone: Gone = Arc::new(OnceLock::new());

    let tracker = TaskTracker::new();
    let mut handles = HashMap::new();
    let mut watchers = Vec::new();
    for folder in &config.folders {
        let started = std::time::Instant::now();
        // Watch first, then scan: nothing changed during the scan is missed. Setting up the
        // watch walks the whole tree (notify adds one watch per directory), so it runs on a
        // blocking thread while the index loads; the scan waits for both.
        let (tx, mut rx) = mpsc::channel::<Change>(64);
        let own = Arc::new(OwnWrites::default());
        let watching = {
            let (root, ignore, own) = (
                folder.path.clone(),
                engine::folder_ignore(folder)?,
                own.clone(),
            );
            let (quiet, hold, cancel) = (
                config.quiet_period(),
                config.open_write_hold(),
                cancel.clone(),
            );
            tokio::task::spawn_blocking(move || {
                FolderWatcher::start(&root, ignore, own, quiet, hold, tx, cancel)
            })
        };
        let (opened, watching) = tokio::join!(
            FolderEngine::open_with(folder, store.clone(), opts.clone(), own),
            watching
        );
        let watcher = watching.map_err(|e| DaemonError::WatchSetup {
            path: folder.path.clone(),
            message: e.to_string(),
        })??;
        watchers.push(watcher);
        let (mut engine, handle, inbox) = opened?;
        let loaded = std::time::Instant::now();
        scan_at_start(&folder.id, engine.initial_scan()).await?;
        let status = handle.status();
        info!(folder = %folder.id, files = status.files, seq = status.seq, "folder scanned");
        debug!(
            folder = %folder.id,
            open_and_watch_ms = (loaded - started).as_secs_f64() * 1e3,
            scan_ms = loaded.elapsed().as_secs_f64() * 1e3,
            "folder start-up times"
        );
        tracker.spawn(watch_engine(
            folder.id.clone(),
            engine.run(inbox, config.rescan_interval(), RETRY_LOOK, cancel.clone()),
            cancel.clone(),
            health.clone(),
            gone.clone(),
        ));
        let h = handle.clone();
        tracker.spawn(async move {
            while let Some(change) = rx.recv().await {
                if h.local(change).await.is_err() {
                    break;
                }
            }
        });
        handles.insert(folder.id.clone(), handle);
    }
    let folders = Arc::new(handles);
    marker_written.await.map_err(|e| DaemonError::StateDir {
        path: config.state_dir.join(RUNNING_MARKER),
        source: std::io::Error::other(e.to_string()),
    })??;

    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|source| DaemonError::Listen {
            addr: config.listen.to_string(),
            source,
        })?;
    let listen = listener
        .local_addr()
        .map_err(|source| DaemonError::Listen {
            addr: config.listen.to_string(),
            source,
        })?;

    let peer_service = PeerService::new(
        node,
        config.node.clone(),
        folders.clone(),
        config.inline_max_bytes,
        cancel.clone(),
    );
    let mut builder = Server::builder()
        .tcp_nodelay(true)
        .http2_keepalive_interval(Some(Duration::from_secs(10)));
    if let Some(tls) = &config.tls {
        builder = builder
            .tls_config(net::server_tls(tls).await?)
            .map_err(|e| net::NetError::Peer {
                peer: "(server)".into(),
                message: e.to_string(),
            })?;
    }
    let mut router = builder
        .add_service(health_service)
        .add_service(peer_service.into_server());
    // The retriever: a DB-backed node also serves the hub and saver to agents without DB access
    // (with WSO2's tables: the hub only).
    let mut retriever_parts = None;
    if let Some(rc) = &config.retriever {
        let (source, hub) = crate::artifacts::source_for(rc, config.tls.as_ref()).await?;
        if let Some(hub) = hub {
            router = router
                .add_service(hub.clone().hub_server())
                .add_service(hub.saver_server());
        }
        let folder = folders.get(&rc.folder).cloned().ok_or_else(|| {
            DaemonError::Retriever(format!(
                "retriever.folder {:?} is not a configured folder",
                rc.folder
            ))
        })?;
        let (retriever, handle) = Retriever::new(rc.clone(), folder, store.clone(), source).await?;
        retriever_parts = Some((retriever, handle, rc.sync_start()));
    }
    let grpc_cancel = cancel.clone();
    tracker.spawn(async move {
        let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
        if let Err(e) = router
            .serve_with_incoming_shutdown(incoming, grpc_cancel.cancelled())
            .await
        {
            error!(error = %e, "gRPC server failed");
            grpc_cancel.cancel();
        }
    });

    let mut retriever_handle = None;
    let mut retriever_ready = None;
    if let Some((retriever, handle, sync)) = retriever_parts {
        let (ready_tx, ready_rx) = tokio::sync::watch::channel(false);
        tracker.spawn(retriever.run(ready_tx, cancel.clone()));
        retriever_handle = Some(handle);
        if sync {
            retriever_ready = Some(ready_rx);
        }
    }

    let statuses: net::PeerStatuses = Arc::new(Mutex::new(HashMap::new()));
    let admin = AdminService {
        node,
        node_name: config.node.clone(),
        listen: listen.to_string(),
        started: std::time::Instant::now(),
        folders: folders.clone(),
        peers: statuses.clone(),
        store: store.clone(),
        retriever: retriever_handle,
    };
    let socket = config.admin_socket();
    let _ = std::fs::remove_file(&socket);
    let uds = tokio::net::UnixListener::bind(&socket).map_err(|source| DaemonError::Admin {
        path: socket.clone(),
        source,
    })?;
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o600)).map_err(
        |source| DaemonError::Admin {
            path: socket.clone(),
            source,
        },
    )?;
    let admin_cancel = cancel.clone();
    tracker.spawn(async move {
        let incoming = tokio_stream::wrappers::UnixListenerStream::new(uds);
        if let Err(e) = Server::builder()
            .add_service(admin.into_server())
            .serve_with_incoming_shutdown(incoming, admin_cancel.cancelled())
            .await
        {
            error!(error = %e, "admin server failed");
        }
    });

    for session in net::peer_sessions(&config, node, folders.clone(), statuses, names) {
        tracker.spawn(session.run(cancel.clone()));
    }

    // From here on the engine watch owns the health status: SERVING while every engine is
    // alive and (sync start-up) the start-up deploy finished or its retries ran out.
    let mut engine_watch = EngineWatch {
        node: config.node.clone(),
        folders: folders.clone(),
        health: health.clone(),
        startup: retriever_ready,
        startup_done: false,
        stalled: BTreeMap::new(),
        serving: None,
    };
    let engines = engine_watch.snapshots();
    engine_watch.check(&engines, liveness::mono_ms()).await;
    info!(node = %config.node, listen = %listen, "listening");
    notify_systemd(&[sd_notify::NotifyState::Ready]);
    let engine_watch = tokio::spawn(engine_watch.run(watchdog_interval(), cancel.clone()));
    if let Some(ready) = ready {
        let _ = ready.send(Running {
            node,
            listen,
            folders: folders.clone(),
        });
    }

    cancel.cancelled().await;
    info!(node = %config.node, "shutting down");
    notify_systemd(&[sd_notify::NotifyState::Stopping]);
    // Stopped first, so it cannot set SERVING again after this.
    if let Err(e) = engine_watch.await {
        error!(node = %config.node, error = %e, "the engine watch failed");
    }
    health
        .set_service_status("", ServingStatus::NotServing)
        .await;
    tracker.close();
    let stopped = tokio::time::timeout(SHUTDOWN_DEADLINE, tracker.wait())
        .await
        .is_ok();
    if !stopped {
        warn!("some tasks did not stop within the shutdown deadline");
    }
    for w in watchers {
        w.join().await;
    }
    if stopped {
        clean_stop(&store, &config.state_dir).await;
    }
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

/// The first folder engine that ended while the agent ran, and how (see [`watch_engine`]).
type Gone = Arc<OnceLock<(String, String)>>;

/// Runs a folder engine and notices when it ends while the agent is not shutting down
/// (returned, or panicked: tokio would catch the panic and leave the folder silently
/// unsynced). That is critical: health goes NOT_SERVING and the agent shuts down, and
/// [`run`] then fails, so the process exits non-zero and systemd restarts it.
async fn watch_engine(
    folder: String,
    engine: impl std::future::Future<Output = ()>,
    cancel: CancellationToken,
    health: HealthReporter,
    gone: Gone,
) {
    // Unwind safety: after a panic nothing of the engine is used again.
    let reason = match std::panic::AssertUnwindSafe(engine).catch_unwind().await {
        Ok(()) => "stopped".to_owned(),
        Err(panic) => format!("panicked ({})", panic_message(panic.as_ref())),
    };
    if cancel.is_cancelled() {
        if reason != "stopped" {
            error!(folder = %folder, reason = %reason, "folder engine failed while shutting down");
        }
        return;
    }
    error!(folder = %folder, reason = %reason, "folder engine is gone while the agent runs: the folder is no longer synced; health is NOT_SERVING and the agent shuts down to be restarted");
    let _ = gone.set((folder, reason));
    health
        .set_service_status("", ServingStatus::NotServing)
        .await;
    cancel.cancel();
}

/// Runs a folder's start-up scan. A panic in it (a bug, or an index the code cannot read)
/// fails the start like any other error, named after the folder, and the agent shuts down
/// in order (state lock released, other tasks stopped) instead of the process aborting.
async fn scan_at_start(
    folder: &str,
    scan: impl std::future::Future<Output = Result<(), engine::EngineError>>,
) -> Result<(), DaemonError> {
    // Unwind safety: after a panic the engine is dropped unused.
    match std::panic::AssertUnwindSafe(scan).catch_unwind().await {
        Ok(r) => Ok(r?),
        Err(panic) => Err(DaemonError::ScanPanicked {
            folder: folder.to_owned(),
            reason: panic_message(panic.as_ref()).to_owned(),
        }),
    }
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> &str {
    panic
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("no message")
}

/// Watches the folder engines' liveness after start-up: sets health, and pets systemd's
/// watchdog only while every engine is alive (idle, or busy and progressing).
struct EngineWatch {
    node: String,
    folders: Arc<HashMap<String, FolderHandle>>,
    health: HealthReporter,
    /// Sync start-up mode: becomes true once the start-up deploy finished (or its retries ran
    /// out); `None` in async mode and without a retriever.
    startup: Option<watch::Receiver<bool>>,
    startup_done: bool,
    /// Engines found stalled, by folder: when they last showed progress (ms, `mono_ms`).
    stalled: BTreeMap<String, u64>,
    /// The health status last set (`None`: not set yet).
    serving: Option<bool>,
}

impl EngineWatch {
    /// Every engine's liveness, now.
    fn snapshots(&self) -> Vec<(String, liveness::Snapshot)> {
        self.folders
            .iter()
            .map(|(folder, handle)| (folder.clone(), handle.liveness()))
            .collect()
    }

    /// Looks at every engine's liveness once, logs the ones that stalled or moved again since
    /// the last look, and sets health. True when every engine is alive.
    async fn check(&mut self, engines: &[(String, liveness::Snapshot)], now_ms: u64) -> bool {
        let mut alive = true;
        for (folder, snapshot) in engines {
            let snapshot = *snapshot;
            match liveness::judge(&snapshot, now_ms, ENGINE_STALL_LIMIT) {
                Verdict::Stalled => {
                    alive = false;
                    if !self.stalled.contains_key(folder) {
                        error!(
                            node = %self.node,
                            folder = %folder,
                            stalled_secs = liveness::quiet_ms(&snapshot, now_ms) / 1000,
                            limit_secs = ENGINE_STALL_LIMIT.as_secs(),
                            "folder engine is stuck: busy without progress for longer than the limit; health is NOT_SERVING and the systemd watchdog is no longer petted, so systemd restarts the agent"
                        );
                        self.stalled
                            .insert(folder.clone(), snapshot.progress_ms.max(snapshot.since_ms));
                    }
                }
                // Logged by `watch_engine`, which also shuts the agent down.
                Verdict::Stopped => alive = false,
                Verdict::Idle | Verdict::Working => {
                    if let Some(quiet_from) = self.stalled.remove(folder) {
                        info!(
                            node = %self.node,
                            folder = %folder,
                            stalled_secs = snapshot.progress_ms.saturating_sub(quiet_from) / 1000,
                            "folder engine moves again; petting the systemd watchdog again"
                        );
                    }
                }
            }
        }
        if !self.startup_done && self.startup.as_ref().is_none_or(|r| *r.borrow()) {
            self.startup_done = true;
            if self.startup.is_some() {
                info!(node = %self.node, "start-up deploy finished");
            }
        }
        let serving = alive && self.startup_done;
        if self.serving != Some(serving) {
            let status = if serving {
                ServingStatus::Serving
            } else {
                ServingStatus::NotServing
            };
            self.health.set_service_status("", status).await;
            if self.serving.is_some() || serving {
                info!(node = %self.node, serving, "health status");
            }
            self.serving = Some(serving);
        }
        alive
    }

    /// Checks every [`ENGINE_CHECK_EVERY`] (and when the start-up deploy finishes), and pets
    /// systemd's watchdog every `pet_every` while every engine is alive; stops at `cancel`.
    async fn run(mut self, pet_every: Option<Duration>, cancel: CancellationToken) {
        let mut check = tokio::time::interval(ENGINE_CHECK_EVERY);
        check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut pet = tokio::time::interval(pet_every.unwrap_or(ENGINE_CHECK_EVERY));
        pet.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            // Wake when the start-up deploy finishes (not once its task is gone).
            let startup_pending = !self.startup_done
                && self
                    .startup
                    .as_ref()
                    .is_some_and(|r| r.has_changed().is_ok());
            let pet_now = tokio::select! {
                biased;
                _ = cancel.cancelled() => break,
                _ = pet.tick(), if pet_every.is_some() => true,
                _ = check.tick() => false,
                _ = async {
                    if let Some(r) = self.startup.as_mut() {
                        let _ = r.changed().await;
                    }
                }, if startup_pending => false,
            };
            let engines = self.snapshots();
            let alive = self.check(&engines, liveness::mono_ms()).await;
            if pet_now && alive {
                notify_systemd(&[sd_notify::NotifyState::Watchdog]);
            }
        }
    }
}

fn notify_systemd(state: &[sd_notify::NotifyState]) {
    if std::env::var_os("NOTIFY_SOCKET").is_some() {
        if let Err(e) = sd_notify::notify(state) {
            warn!(error = %e, "sd_notify failed");
        }
    }
}

/// Half the systemd watchdog period, when systemd asked for one.
fn watchdog_interval() -> Option<Duration> {
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    Some(Duration::from_micros(usec / 2))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::liveness::{Activity, Snapshot};
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_server::Health;
    use tonic_health::server::HealthService;

    async fn serving(health: &HealthReporter) -> bool {
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
    fn health_serving() -> HealthReporter {
        HealthReporter::new()
    }

    #[tokio::test]
    async fn an_engine_that_panics_while_the_agent_runs_shuts_it_down_as_a_failure() {
        let (cancel, health, gone) = (CancellationToken::new(), health_serving(), Gone::default());
        assert!(serving(&health).await);
        watch_engine(
            "synapse-configs".into(),
            async { panic!("index row 7 is corrupt") },
            cancel.clone(),
            health.clone(),
            gone.clone(),
        )
        .await;
        assert!(cancel.is_cancelled(), "the agent shuts down");
        assert!(!serving(&health).await);
        let (folder, reason) = gone.get().expect("the failure is kept for the exit code");
        assert_eq!(folder, "synapse-configs");
        assert_eq!(reason, "panicked (index row 7 is corrupt)");
    }

    #[tokio::test]
    async fn a_panic_in_the_start_up_scan_is_an_error_naming_the_folder() {
        let r = scan_at_start("executionplans", async {
            panic!("stat key of a.siddhiql is corrupt")
        })
        .await;
        match r {
            Err(DaemonError::ScanPanicked { folder, reason }) => {
                assert_eq!(folder, "executionplans");
                assert_eq!(reason, "stat key of a.siddhiql is corrupt");
            }
            other => panic!("expected ScanPanicked, got {other:?}"),
        }
        assert!(scan_at_start("f", async { Ok(()) }).await.is_ok());
        let failed =
            scan_at_start("f", async { Err(engine::EngineError::Stopped("f".into())) }).await;
        assert!(matches!(failed, Err(DaemonError::Engine(_))), "{failed:?}");
    }

    #[tokio::test]
    async fn an_engine_that_returns_while_the_agent_runs_is_a_failure_too() {
        let (cancel, health, gone) = (CancellationToken::new(), health_serving(), Gone::default());
        watch_engine(
            "plans".into(),
            async {},
            cancel.clone(),
            health,
            gone.clone(),
        )
        .await;
        assert!(cancel.is_cancelled());
        assert_eq!(
            gone.get(),
            Some(&("plans".to_owned(), "stopped".to_owned()))
        );
    }

    #[tokio::test]
    async fn an_engine_that_ends_at_shutdown_is_no_failure() {
        let (cancel, health, gone) = (CancellationToken::new(), health_serving(), Gone::default());
        cancel.cancel();
        watch_engine(
            "plans".into(),
            async {},
            cancel,
            health.clone(),
            gone.clone(),
        )
        .await;
        assert_eq!(gone.get(), None);
        assert!(serving(&health).await, "shutdown sets health itself");
    }

    fn watch_of(health: &HealthReporter, startup: Option<watch::Receiver<bool>>) -> EngineWatch {
        EngineWatch {
            node: "gw1".into(),
            folders: Arc::new(HashMap::new()),
            health: health.clone(),
            startup,
            startup_done: false,
            stalled: BTreeMap::new(),
            serving: None,
        }
    }

    fn engine(activity: Activity, since_ms: u64, progress_ms: u64) -> (String, Snapshot) {
        (
            "synapse-configs".into(),
            Snapshot {
                activity,
                since_ms,
                progress_ms,
            },
        )
    }

    #[tokio::test]
    async fn a_stuck_engine_turns_health_off_and_stops_the_pets_until_it_moves_again() {
        let health = health_serving();
        let mut w = watch_of(&health, None);
        let limit = ENGINE_STALL_LIMIT.as_millis() as u64;
        let t0 = 1_000_000;
        assert!(w.check(&[engine(Activity::Idle, 0, 0)], t0).await);
        assert!(serving(&health).await);
        // Busy, and progressing, for twice the limit: fine.
        let working = engine(Activity::Busy, t0, t0 + 2 * limit - 10);
        assert!(w.check(&[working], t0 + 2 * limit).await);
        assert!(serving(&health).await);
        // Then no progress for longer than the limit.
        let stuck = engine(Activity::Busy, t0, t0 + 2 * limit - 10);
        assert!(
            !w.check(std::slice::from_ref(&stuck), t0 + 3 * limit).await,
            "no pet"
        );
        assert!(!serving(&health).await);
        assert!(w.stalled.contains_key("synapse-configs"));
        assert!(!w.check(&[stuck], t0 + 4 * limit).await, "still no pet");
        // It moves again.
        let moved = engine(Activity::Busy, t0, t0 + 4 * limit);
        assert!(w.check(&[moved], t0 + 4 * limit + 5).await);
        assert!(serving(&health).await);
        assert!(w.stalled.is_empty());
        // A stopped engine is no pet either (`watch_engine` shuts the agent down).
        assert!(!w.check(&[engine(Activity::Stopped, 0, 0)], t0).await);
        assert!(!serving(&health).await);
    }

    #[tokio::test]
    async fn sync_start_up_stays_not_serving_until_the_deploy_is_done_and_a_recovery_keeps_that() {
        let health = health_serving();
        let (done_tx, done_rx) = watch::channel(false);
        let mut w = watch_of(&health, Some(done_rx));
        let limit = ENGINE_STALL_LIMIT.as_millis() as u64;
        let idle = engine(Activity::Idle, 0, 0);
        assert!(
            w.check(std::slice::from_ref(&idle), 10).await,
            "engines alive: pets go on"
        );
        assert!(!serving(&health).await, "start-up deploy not done");
        // A stall and a recovery while still deploying: still NOT_SERVING.
        assert!(!w.check(&[engine(Activity::Busy, 0, 0)], limit + 1).await);
        assert!(w.check(std::slice::from_ref(&idle), limit + 2).await);
        assert!(
            !serving(&health).await,
            "a recovery must not skip the start-up gate"
        );
        done_tx.send_replace(true);
        assert!(w.check(&[idle], limit + 3).await);
        assert!(serving(&health).await);
    }

    #[test]
    fn only_an_unclean_stop_before_a_machine_restart_may_have_lost_index_commits() {
        let boot = Some("6d1c2e1a-0b7f-4a7e-9c55-3b1f9b2f0c11");
        assert!(!index_may_have_rolled_back(None, boot), "clean stop");
        assert!(!index_may_have_rolled_back(None, None), "clean stop");
        assert!(
            !index_may_have_rolled_back(Some("6d1c2e1a-0b7f-4a7e-9c55-3b1f9b2f0c11\n"), boot),
            "the process died on this boot: the page cache kept every commit"
        );
        assert!(index_may_have_rolled_back(
            Some("0c7de3f2-7d34-4d7b-8d0e-8e4f1f6f7a90\n"),
            boot
        ));
        assert!(
            index_may_have_rolled_back(Some("\n"), boot),
            "no boot id then"
        );
        assert!(
            index_may_have_rolled_back(Some("x"), None),
            "no boot id now"
        );
    }

    #[test]
    fn a_boot_known_by_its_instant_is_the_same_boot_within_the_tolerance() {
        let then = "boot-at:1796000000000";
        assert!(!index_may_have_rolled_back(
            Some(then),
            Some("boot-at:1796000000700")
        ));
        assert!(!index_may_have_rolled_back(
            Some("boot-at:1796000001500\n"),
            Some(then)
        ));
        assert!(
            index_may_have_rolled_back(Some(then), Some("boot-at:1796000600000")),
            "booted ten minutes later"
        );
        assert!(index_may_have_rolled_back(Some("boot-at:x"), Some(then)));
        assert!(
            index_may_have_rolled_back(Some(then), Some("6d1c2e1a-0b7f-4a7e-9c55-3b1f9b2f0c11")),
            "an id and an instant cannot be compared"
        );
    }

    #[test]
    fn this_boot_reads_the_same_twice_by_id_and_by_instant() {
        let a = this_boot().expect("a boot id or the clocks");
        let b = this_boot().expect("a boot id or the clocks");
        assert!(!index_may_have_rolled_back(Some(&a), Some(&b)));
        let a = boot_instant().expect("the clocks");
        assert!(a.starts_with(BOOT_AT), "{a}");
        let b = boot_instant().expect("the clocks");
        assert!(!index_may_have_rolled_back(Some(&a), Some(&b)));
    }

    #[test]
    fn the_running_marker_round_trips_and_reads_as_absent_when_missing() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert_eq!(read_running_marker(dir.path()).expect("read"), None);
        write_running_marker(dir.path(), Some("b00t")).expect("write");
        let marker = read_running_marker(dir.path()).expect("read");
        assert!(!index_may_have_rolled_back(marker.as_deref(), Some("b00t")));
        assert!(index_may_have_rolled_back(marker.as_deref(), Some("other")));
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .expect("list")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(names, [RUNNING_MARKER], "no temp file is left");
    }
}
