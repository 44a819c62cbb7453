//! Wiring: starts the folder engines and watchers, the gRPC server (peers + health), the admin
//! socket and the peer sessions; tells systemd when it is ready and pets the watchdog; on
//! cancellation, stops everything under a deadline.

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::transport::Server;
use tonic::transport::server::TcpIncoming;
use tonic_health::ServingStatus;
use tracing::{debug, error, info, warn};

use crate::admin::AdminService;
use crate::artifacts::hub::{HubService, HubSource};
use crate::artifacts::retriever::{DbSource, Retriever, Source};
use crate::config::Config;
use crate::engine::{self, FolderEngine, FolderHandle};
use crate::fs::own::OwnWrites;
use crate::fs::watch::{Change, FolderWatcher};
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
            let (mut f, tmp) =
                crate::fs::apply::create_temp(state_dir, 0o600).map_err(|source| {
                    DaemonError::StateDir {
                        path: state_dir.to_owned(),
                        source,
                    }
                })?;
            use std::io::Write;
            let io = |source| DaemonError::StateDir {
                path: path.clone(),
                source,
            };
            f.write_all(format!("{id}\n").as_bytes()).map_err(io)?;
            f.sync_all().map_err(io)?;
            std::fs::rename(&tmp, &path).map_err(io)?;
            Ok(id)
        }
        Err(e) => Err(DaemonError::NodeId {
            path,
            problem: e.to_string(),
        }),
    }
}

/// The kernel's id of this boot of the machine.
fn boot_id() -> Option<String> {
    let id = std::fs::read_to_string(BOOT_ID_PATH).ok()?;
    let id = id.trim();
    (!id.is_empty()).then(|| id.to_owned())
}

/// True when the index may have lost its last commits: the last run did not stop cleanly (its
/// marker is still there) and the machine went down since (another boot, or no boot id to
/// compare). Commits are durable only at checkpoints (WAL with `synchronous = NORMAL`), so a
/// power loss can take the last ones back, while a process that dies on a running machine
/// loses none.
fn index_may_have_rolled_back(marker: Option<&str>, boot: Option<&str>) -> bool {
    match (marker, boot) {
        (None, _) => false,
        (Some(m), Some(b)) => m.trim() != b,
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
    use std::io::Write;
    let path = state_dir.join(RUNNING_MARKER);
    let io = |source| DaemonError::StateDir {
        path: path.clone(),
        source,
    };
    let (mut f, tmp) = crate::fs::apply::create_temp(state_dir, 0o600).map_err(io)?;
    f.write_all(format!("{}\n", boot.unwrap_or_default()).as_bytes())
        .map_err(io)?;
    f.sync_all().map_err(io)?;
    std::fs::rename(&tmp, &path).map_err(io)?;
    std::fs::File::open(state_dir)
        .and_then(|d| d.sync_all())
        .map_err(io)
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
    let boot = boot_id();
    let marker = read_running_marker(&config.state_dir)?;
    if index_may_have_rolled_back(marker.as_deref(), boot.as_deref()) {
        // Peers' cursors into this index and the records they leave out for this node
        // (`net::pump_folder`) hold only while an epoch's index never goes back.
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
        engine.initial_scan().await?;
        let status = handle.status();
        info!(folder = %folder.id, files = status.files, seq = status.seq, "folder scanned");
        debug!(
            folder = %folder.id,
            open_and_watch_ms = (loaded - started).as_secs_f64() * 1e3,
            scan_ms = loaded.elapsed().as_secs_f64() * 1e3,
            "folder start-up times"
        );
        tracker.spawn(engine.run(inbox, config.rescan_interval(), RETRY_LOOK, cancel.clone()));
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

    let (health, health_service) = tonic_health::server::health_reporter();
    // Not SERVING until everything below is up (and, in sync mode, the start-up deploy is done).
    health
        .set_service_status("", ServingStatus::NotServing)
        .await;
    // tonic-health starts service "" as SERVING; it must say so only once the agent is up
    // (admin socket bound, peer sessions started).
    health
        .set_service_status("", ServingStatus::NotServing)
        .await;
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
    // The retriever: a DB-backed node also serves the hub and saver to agents without DB access.
    let mut retriever_parts = None;
    if let Some(rc) = &config.retriever {
        let poll = Duration::from_millis(rc.poll_interval);
        let source: Arc<dyn Source> = if rc.artifact_retriever == "hub" {
            Arc::new(
                HubSource::new(
                    rc.hub.as_deref().unwrap_or_default(),
                    config.tls.as_ref(),
                    poll,
                )
                .await?,
            )
        } else {
            let db = Arc::new(DbSource::new(
                rc.database_url.as_deref().unwrap_or_default(),
                poll,
            ));
            let hub = HubService::new(db.clone());
            router = router
                .add_service(hub.clone().hub_server())
                .add_service(hub.saver_server());
            db
        };
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

    match retriever_ready {
        // Sync start-up: not SERVING until the start-up deploy finished or its retries ran out.
        Some(mut ready) => {
            let h = health.clone();
            let node_name = config.node.clone();
            tracker.spawn(async move {
                if ready.wait_for(|done| *done).await.is_ok() {
                    h.set_service_status("", ServingStatus::Serving).await;
                    info!(node = %node_name, "start-up deploy finished; serving");
                }
            });
        }
        None => health.set_service_status("", ServingStatus::Serving).await,
    }
    info!(node = %config.node, listen = %listen, "listening");
    notify_systemd(&[sd_notify::NotifyState::Ready]);
    if let Some(interval) = watchdog_interval() {
        let c = cancel.clone();
        tracker.spawn(async move {
            let mut tick = tokio::time::interval(interval);
            loop {
                tokio::select! {
                    _ = c.cancelled() => break,
                    _ = tick.tick() => notify_systemd(&[sd_notify::NotifyState::Watchdog]),
                }
            }
        });
    }
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
    Ok(())
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
