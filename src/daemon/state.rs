//! The agent's state directory: its lock, the node id, and the running marker that tells a
//! start whether the machine went down under the last run (then the index may have lost its
//! last commits and the folders take new epochs).

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use tracing::warn;

use super::DaemonError;
use crate::model::NodeId;
use crate::store::Store;

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
pub(super) async fn clean_stop(store: &Store, state_dir: &Path) {
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
pub(super) fn prepare_state_dir(
    dir: &Path,
) -> Result<nix::fcntl::Flock<std::fs::File>, DaemonError> {
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

/// The running marker of this run, being written durably (see [`RunMarker::begin`]).
pub(super) struct RunMarker {
    path: std::path::PathBuf,
    writing: tokio::task::JoinHandle<Result<(), DaemonError>>,
}

impl RunMarker {
    /// Gives the folders new epochs when the last run may have lost index commits, then
    /// starts writing this run's marker.
    pub(super) async fn begin(state_dir: &Path, store: &Store) -> Result<Self, DaemonError> {
        let boot = this_boot();
        let marker = read_running_marker(state_dir)?;
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
        let state_dir = state_dir.to_owned();
        let path = state_dir.join(RUNNING_MARKER);
        let writing =
            tokio::task::spawn_blocking(move || write_running_marker(&state_dir, boot.as_deref()));
        Ok(Self { path, writing })
    }

    /// Waits until the marker is durable.
    pub(super) async fn written(self) -> Result<(), DaemonError> {
        self.writing.await.map_err(|e| DaemonError::StateDir {
            path: self.path,
            source: std::io::Error::other(e.to_string()),
        })?
    }
}

/// Batches keep their unnamed temp files open until they are durable (see `fs::apply`):
/// lift the soft descriptor limit to the hard one (systemd's default soft limit is 1024).
pub(super) fn raise_descriptor_limit() {
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
