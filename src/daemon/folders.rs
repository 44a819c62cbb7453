//! The node's folders, started: per folder a watcher, the engine (opened while the watch is
//! set up, then its start-up scan), the engine's task under [`watch_engine`], and the pump of
//! local changes from the watcher to the engine.

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use futures_util::FutureExt;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;
use tracing::{debug, error, info};

use super::{DaemonError, RETRY_LOOK, Tasks};
use crate::config::{Config, FolderConfig};
use crate::engine::{self, EngineOptions, FolderEngine, FolderHandle, Inbox};
use crate::fs::own::OwnWrites;
use crate::fs::watch::{Change, FolderWatcher};
use crate::model::FolderId;
use crate::store::Store;

/// The running folders: their engines' handles, and their watchers (joined at shutdown).
pub(super) struct FolderRuntime {
    pub(super) handles: Arc<HashMap<FolderId, FolderHandle>>,
    watchers: Vec<FolderWatcher>,
}

impl FolderRuntime {
    /// Starts every configured folder, one after the other. An engine that ends while the
    /// agent runs is recorded in `gone` and shuts the agent down (see [`watch_engine`]).
    pub(super) async fn start(
        config: &Config,
        store: &Store,
        opts: &EngineOptions,
        tasks: &Tasks,
        health: &HealthReporter,
        gone: &Gone,
    ) -> Result<Self, DaemonError> {
        let cancel = &tasks.cancel;
        let mut handles = HashMap::new();
        let mut watchers = Vec::new();
        for folder in &config.folders {
            let started = Instant::now();
            let Opened {
                mut engine,
                handle,
                inbox,
                watcher,
                changes,
            } = open_watched(folder, config, store, opts, cancel).await?;
            watchers.push(watcher);
            let loaded = Instant::now();
            scan_at_start(&folder.id, engine.initial_scan()).await?;
            log_scanned(&folder.id, &handle, started, loaded);
            tasks.tracker.spawn(watch_engine(
                folder.id.clone(),
                engine.run(inbox, config.rescan_interval(), RETRY_LOOK, cancel.clone()),
                cancel.clone(),
                health.clone(),
                gone.clone(),
            ));
            tasks
                .tracker
                .spawn(pump_local_changes(changes, handle.clone()));
            handles.insert(folder.id.clone(), handle);
        }
        Ok(Self {
            handles: Arc::new(handles),
            watchers,
        })
    }

    /// Waits for every watcher's task to end (after cancellation).
    pub(super) async fn join_watchers(self) {
        for w in self.watchers {
            w.join().await;
        }
    }
}

/// A folder's engine, opened (its start-up scan still to run), and its watcher, already
/// sending the folder's changes.
struct Opened {
    engine: FolderEngine,
    handle: FolderHandle,
    inbox: Inbox,
    watcher: FolderWatcher,
    changes: mpsc::Receiver<Change>,
}

/// Sets up a folder's watch and opens its engine at the same time. Watch first, then scan:
/// nothing changed during the scan is missed. Setting up the watch walks the whole tree
/// (notify adds one watch per directory), so it runs on a blocking thread while the index
/// loads; the scan waits for both.
async fn open_watched(
    folder: &FolderConfig,
    config: &Config,
    store: &Store,
    opts: &EngineOptions,
    cancel: &CancellationToken,
) -> Result<Opened, DaemonError> {
    let (tx, changes) = mpsc::channel::<Change>(64);
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
    let (engine, handle, inbox) = opened?;
    Ok(Opened {
        engine,
        handle,
        inbox,
        watcher,
        changes,
    })
}

/// Logs a folder's start-up scan, and (at debug) how long opening and watching it, then
/// scanning it, took.
fn log_scanned(folder: &str, handle: &FolderHandle, started: Instant, loaded: Instant) {
    let status = handle.status();
    info!(folder = %folder, files = status.files, seq = status.seq, "folder scanned");
    debug!(
        folder = %folder,
        open_and_watch_ms = (loaded - started).as_secs_f64() * 1e3,
        scan_ms = loaded.elapsed().as_secs_f64() * 1e3,
        "folder start-up times"
    );
}

/// Hands the watcher's local changes to the folder's engine, until either side stops.
async fn pump_local_changes(mut changes: mpsc::Receiver<Change>, engine: FolderHandle) {
    while let Some(change) = changes.recv().await {
        if engine.local(change).await.is_err() {
            break;
        }
    }
}

/// The first folder engine that ended while the agent ran, and how (see [`watch_engine`]).
pub(super) type Gone = Arc<OnceLock<(FolderId, String)>>;

/// Runs a folder engine and notices when it ends while the agent is not shutting down
/// (returned, or panicked: tokio would catch the panic and leave the folder silently
/// unsynced). That is critical: health goes NOT_SERVING and the agent shuts down, and
/// [`super::run`] then fails, so the process exits non-zero and systemd restarts it.
async fn watch_engine(
    folder: FolderId,
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
    folder: &FolderId,
    scan: impl std::future::Future<Output = Result<(), engine::EngineError>>,
) -> Result<(), DaemonError> {
    // Unwind safety: after a panic the engine is dropped unused.
    match std::panic::AssertUnwindSafe(scan).catch_unwind().await {
        Ok(r) => Ok(r?),
        Err(panic) => Err(DaemonError::ScanPanicked {
            folder: folder.clone(),
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::daemon::tests::{health_serving, serving};

    #[tokio::test]
    async fn an_engine_that_panics_while_the_agent_runs_shuts_it_down_as_a_failure() {
        let (cancel, health, gone) = (CancellationToken::new(), health_serving(), Gone::default());
        assert!(serving(&health).await);
        watch_engine(
            FolderId::literal("synapse-configs"),
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
        let r = scan_at_start(&FolderId::literal("executionplans"), async {
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
        assert!(
            scan_at_start(&FolderId::literal("f"), async { Ok(()) })
                .await
                .is_ok()
        );
        let failed = scan_at_start(&FolderId::literal("f"), async {
            Err(engine::EngineError::Stopped(FolderId::literal("f")))
        })
        .await;
        assert!(matches!(failed, Err(DaemonError::Engine(_))), "{failed:?}");
    }

    #[tokio::test]
    async fn an_engine_that_returns_while_the_agent_runs_is_a_failure_too() {
        let (cancel, health, gone) = (CancellationToken::new(), health_serving(), Gone::default());
        watch_engine(
            FolderId::literal("plans"),
            async {},
            cancel.clone(),
            health,
            gone.clone(),
        )
        .await;
        assert!(cancel.is_cancelled());
        assert_eq!(
            gone.get(),
            Some(&(FolderId::literal("plans"), "stopped".to_owned()))
        );
    }

    #[tokio::test]
    async fn an_engine_that_ends_at_shutdown_is_no_failure() {
        let (cancel, health, gone) = (CancellationToken::new(), health_serving(), Gone::default());
        cancel.cancel();
        watch_engine(
            FolderId::literal("plans"),
            async {},
            cancel,
            health.clone(),
            gone.clone(),
        )
        .await;
        assert_eq!(gone.get(), None);
        assert!(serving(&health).await, "shutdown sets health itself");
    }
}
