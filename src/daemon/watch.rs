//! The engine watch: after start-up, looks at every folder engine's liveness, sets health, and
//! pets systemd's watchdog only while every engine is alive.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;
use tracing::{error, info, warn};

use super::ENGINE_CHECK_EVERY;
use crate::engine::FolderHandle;
use crate::liveness::{self, ENGINE_STALL_LIMIT, Verdict};
use crate::model::FolderId;

/// Watches the folder engines' liveness after start-up: sets health, and pets systemd's
/// watchdog only while every engine is alive (idle, or busy and progressing).
pub(super) struct EngineWatch {
    node: String,
    folders: Arc<HashMap<FolderId, FolderHandle>>,
    health: HealthReporter,
    /// Sync start-up mode: becomes true once the start-up deploy finished (or its retries ran
    /// out); `None` in async mode and without a retriever.
    startup: Option<watch::Receiver<bool>>,
    startup_done: bool,
    /// Engines found stalled, by folder: when they last showed progress (ms, `mono_ms`).
    stalled: BTreeMap<FolderId, u64>,
    /// The health status last set (`None`: not set yet).
    serving: Option<bool>,
}

impl EngineWatch {
    /// Takes over the health status after start-up, with a first look at every engine.
    pub(super) async fn first_look(
        node: &str,
        folders: Arc<HashMap<FolderId, FolderHandle>>,
        health: HealthReporter,
        startup: Option<watch::Receiver<bool>>,
    ) -> Self {
        let mut w = EngineWatch {
            node: node.to_owned(),
            folders,
            health,
            startup,
            startup_done: false,
            stalled: BTreeMap::new(),
            serving: None,
        };
        let engines = w.snapshots();
        w.check(&engines, liveness::mono_ms()).await;
        w
    }

    /// Every engine's liveness, now.
    fn snapshots(&self) -> Vec<(FolderId, liveness::Snapshot)> {
        self.folders
            .iter()
            .map(|(folder, handle)| (folder.clone(), handle.liveness()))
            .collect()
    }

    /// Looks at every engine's liveness once, logs the ones that stalled or moved again since
    /// the last look, and sets health. True when every engine is alive.
    async fn check(&mut self, engines: &[(FolderId, liveness::Snapshot)], now_ms: u64) -> bool {
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
    pub(super) async fn run(mut self, pet_every: Option<Duration>, cancel: CancellationToken) {
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

pub(super) fn notify_systemd(state: &[sd_notify::NotifyState]) {
    if std::env::var_os("NOTIFY_SOCKET").is_some() {
        if let Err(e) = sd_notify::notify(state) {
            warn!(error = %e, "sd_notify failed");
        }
    }
}

/// Half the systemd watchdog period, when systemd asked for one.
pub(super) fn watchdog_interval() -> Option<Duration> {
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    Some(Duration::from_micros(usec / 2))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::daemon::tests::{health_serving, serving};
    use crate::liveness::{Activity, Snapshot};

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

    fn engine(activity: Activity, since_ms: u64, progress_ms: u64) -> (FolderId, Snapshot) {
        (
            FolderId::literal("synapse-configs"),
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
}
