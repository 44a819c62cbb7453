//! Folder engine liveness: whether an engine waits for work (idle), works (busy) or has
//! stopped, since when, and when it last showed progress. The engine writes it with atomic
//! stores (cheap enough for once per path of a scan); the daemon's watchdog and
//! `artisync status` read it, lock-free, so a wedged engine cannot block its own diagnosis.
//!
//! Whether a busy engine is stalled is decided by the pure [`judge`]; the clock is an input
//! (ms on a monotonic clock, see [`mono_ms`]), as in the model.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// How long an engine may be busy without any progress before it counts as stalled (wedged).
/// Generous on purpose: a `syncfs` on a loaded disk or a large rescan legitimately takes a
/// while, and a false restart loop is worse than a late restart. Progress is shown often (each
/// message, each settled batch, each path a scan looks at, each fetched content), so this only
/// has to cover one single step.
pub const ENGINE_STALL_LIMIT: Duration = Duration::from_secs(300);

/// Milliseconds on a monotonic clock, counted from the first reading in this process. Never
/// goes back when the wall clock is set.
pub fn mono_ms() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_millis() as u64
}

/// What an engine is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activity {
    /// Waiting for work.
    Idle,
    /// Handling a message, a timer or a batch chain.
    Busy,
    /// Its task ended (returned or panicked).
    Stopped,
}

/// The state bits sit above the time bits of [`Liveness::state`].
const STATE_SHIFT: u32 = 62;
const TIME_MASK: u64 = (1 << STATE_SHIFT) - 1;

fn encode(activity: Activity, since_ms: u64) -> u64 {
    let bits = match activity {
        Activity::Idle => 0,
        Activity::Busy => 1,
        Activity::Stopped => 2,
    };
    (bits << STATE_SHIFT) | (since_ms & TIME_MASK)
}

fn decode(word: u64) -> (Activity, u64) {
    let activity = match word >> STATE_SHIFT {
        0 => Activity::Idle,
        1 => Activity::Busy,
        _ => Activity::Stopped,
    };
    (activity, word & TIME_MASK)
}

/// One engine's liveness, shared between the engine (writer) and its readers.
#[derive(Debug)]
pub struct Liveness {
    /// Activity and since when (ms, [`mono_ms`]), in one word so readers see a pair that
    /// belongs together.
    state: AtomicU64,
    /// When the engine last showed progress (ms, [`mono_ms`]).
    progress_ms: AtomicU64,
}

impl Default for Liveness {
    fn default() -> Self {
        let now = mono_ms();
        Self {
            state: AtomicU64::new(encode(Activity::Idle, now)),
            progress_ms: AtomicU64::new(now),
        }
    }
}

impl Liveness {
    /// The engine waits for work. Keeps the start time when it already did.
    pub fn idle(&self) {
        self.enter(Activity::Idle);
    }

    /// The engine took up work. Keeps the start time when it already was busy, so that a
    /// stuck engine's busy time never restarts.
    pub fn busy(&self) {
        self.enter(Activity::Busy);
    }

    /// The engine moved forward (a message handled, a batch settled, a path looked at, a
    /// content fetched).
    pub fn progress(&self) {
        self.progress_ms.fetch_max(mono_ms(), Ordering::Release);
    }

    /// The engine's task ended.
    pub fn stopped(&self) {
        self.state
            .store(encode(Activity::Stopped, mono_ms()), Ordering::Release);
    }

    fn enter(&self, activity: Activity) {
        let (now_activity, _) = decode(self.state.load(Ordering::Acquire));
        // One writer (the engine), so load-then-store does not race; a stopped engine
        // stays stopped.
        if now_activity != activity && now_activity != Activity::Stopped {
            let now = mono_ms();
            if activity == Activity::Busy {
                // Going busy counts as progress: the stall clock starts now.
                self.progress_ms.fetch_max(now, Ordering::Release);
            }
            self.state.store(encode(activity, now), Ordering::Release);
        }
    }

    pub fn snapshot(&self) -> Snapshot {
        let (activity, since_ms) = decode(self.state.load(Ordering::Acquire));
        Snapshot {
            activity,
            since_ms,
            progress_ms: self.progress_ms.load(Ordering::Acquire),
        }
    }
}

/// Marks the liveness stopped when dropped: held by the engine's task, so a return and a
/// panic (unwinding) both leave the engine marked stopped.
pub struct StopOnDrop(pub std::sync::Arc<Liveness>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.stopped();
    }
}

/// A reading of a [`Liveness`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Snapshot {
    pub activity: Activity,
    /// Since when (ms, [`mono_ms`]) the engine is in `activity`.
    pub since_ms: u64,
    /// When it last showed progress (ms, [`mono_ms`]).
    pub progress_ms: u64,
}

/// What a snapshot says about an engine, at a given time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    Idle,
    /// Busy and moving.
    Working,
    /// Busy with no progress for longer than the limit.
    Stalled,
    Stopped,
}

/// The stall decision: an engine busy with no progress for longer than `limit` (counted from
/// its last progress, or from when it went busy if that is later) is stalled.
pub fn judge(s: &Snapshot, now_ms: u64, limit: Duration) -> Verdict {
    match s.activity {
        Activity::Idle => Verdict::Idle,
        Activity::Stopped => Verdict::Stopped,
        Activity::Busy => {
            if quiet_ms(s, now_ms) > limit.as_millis() as u64 {
                Verdict::Stalled
            } else {
                Verdict::Working
            }
        }
    }
}

/// How long the engine has shown no progress (for a busy engine: since it went busy at most).
pub fn quiet_ms(s: &Snapshot, now_ms: u64) -> u64 {
    now_ms.saturating_sub(s.progress_ms.max(s.since_ms))
}

/// An engine's liveness as `artisync status` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EngineReport {
    /// `idle`, `working`, `stalled` (busy, no progress for longer than the limit) or
    /// `stopped` (its task ended: the folder is not synced).
    pub state: Verdict,
    /// Seconds in the current state (idle, busy or stopped).
    pub for_secs: u64,
    /// Seconds since the engine last showed progress.
    pub quiet_secs: u64,
}

impl EngineReport {
    /// True when the engine cannot be trusted to keep the folder in sync.
    pub fn is_failing(&self) -> bool {
        matches!(self.state, Verdict::Stalled | Verdict::Stopped)
    }
}

pub fn report(s: &Snapshot, now_ms: u64, limit: Duration) -> EngineReport {
    EngineReport {
        state: judge(s, now_ms, limit),
        for_secs: now_ms.saturating_sub(s.since_ms) / 1000,
        quiet_secs: now_ms.saturating_sub(s.progress_ms) / 1000,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMIT: Duration = Duration::from_secs(300);
    const MIN: u64 = 60_000;

    fn busy(since_ms: u64, progress_ms: u64) -> Snapshot {
        Snapshot {
            activity: Activity::Busy,
            since_ms,
            progress_ms,
        }
    }

    #[test]
    fn an_idle_engine_is_never_stalled_however_long_it_waits() {
        let s = Snapshot {
            activity: Activity::Idle,
            since_ms: 0,
            progress_ms: 0,
        };
        assert_eq!(judge(&s, 24 * 60 * MIN, LIMIT), Verdict::Idle);
    }

    #[test]
    fn a_busy_engine_that_keeps_progressing_is_working_however_long_it_is_busy() {
        // Busy for an hour (a huge rescan), last progress a second ago.
        let s = busy(0, 60 * MIN - 1000);
        assert_eq!(judge(&s, 60 * MIN, LIMIT), Verdict::Working);
    }

    #[test]
    fn a_busy_engine_without_progress_is_stalled_only_past_the_limit() {
        let s = busy(10 * MIN, 10 * MIN);
        assert_eq!(judge(&s, 15 * MIN, LIMIT), Verdict::Working, "at the limit");
        assert_eq!(judge(&s, 15 * MIN + 1, LIMIT), Verdict::Stalled);
        assert_eq!(quiet_ms(&s, 15 * MIN + 1), 5 * MIN + 1);
    }

    #[test]
    fn old_progress_from_before_going_busy_does_not_count_against_the_engine() {
        // Idle for an hour, busy for a minute: not stalled, whatever the last progress was.
        let s = busy(60 * MIN, 0);
        assert_eq!(judge(&s, 61 * MIN, LIMIT), Verdict::Working);
    }

    #[test]
    fn a_stalled_engine_that_progresses_again_is_working() {
        let stuck = busy(0, 0);
        assert_eq!(judge(&stuck, 6 * MIN, LIMIT), Verdict::Stalled);
        let moved = busy(0, 6 * MIN);
        assert_eq!(judge(&moved, 6 * MIN + 1000, LIMIT), Verdict::Working);
    }

    #[test]
    fn a_stopped_engine_is_stopped_and_failing() {
        let s = Snapshot {
            activity: Activity::Stopped,
            since_ms: 5,
            progress_ms: 5,
        };
        assert_eq!(judge(&s, 10, LIMIT), Verdict::Stopped);
        assert!(report(&s, 10, LIMIT).is_failing());
        assert!(!report(&busy(0, 0), 10, LIMIT).is_failing());
    }

    #[test]
    fn the_report_counts_whole_seconds_in_the_state_and_since_progress() {
        let r = report(&busy(1_000, 3_500), 10_999, LIMIT);
        assert_eq!(
            r,
            EngineReport {
                state: Verdict::Working,
                for_secs: 9,
                quiet_secs: 7,
            }
        );
    }

    #[test]
    fn liveness_moves_between_states_and_keeps_the_start_of_a_state() {
        let live = Liveness::default();
        assert_eq!(live.snapshot().activity, Activity::Idle);
        live.busy();
        let first = live.snapshot();
        assert_eq!(first.activity, Activity::Busy);
        live.busy();
        assert_eq!(
            live.snapshot().since_ms,
            first.since_ms,
            "busy again keeps since"
        );
        live.idle();
        assert_eq!(live.snapshot().activity, Activity::Idle);
        live.stopped();
        live.busy();
        assert_eq!(
            live.snapshot().activity,
            Activity::Stopped,
            "a stopped engine stays stopped"
        );
    }

    #[test]
    fn the_encoding_round_trips() {
        for a in [Activity::Idle, Activity::Busy, Activity::Stopped] {
            assert_eq!(decode(encode(a, 123_456_789)), (a, 123_456_789));
        }
    }
}
