//! When a failed deployment is tried again: capped exponential backoff, the retry plan, and the
//! retriever's record of failing artifacts with the retries that fall due.

use std::time::Duration;

use tokio::time::Instant;
use tracing::warn;

use super::{Failure, Retriever};

/// Longest delay between two retries of a failed deployment.
pub const MAX_RETRY_DELAY: Duration = Duration::from_secs(3600);
/// Sync start-up: the wait before the second try of the failing artifacts, doubling after
/// (with the default 3 `startup_attempts`: 0.5 s, then 1 s).
pub const STARTUP_RETRY_BASE: Duration = Duration::from_millis(500);

/// Delay before retry number `attempt` (1-based): `base`, doubling, never above one hour.
pub fn retry_delay(base: Duration, attempt: u32) -> Duration {
    crate::doubling_delay(base, attempt, MAX_RETRY_DELAY)
}

/// The retry plan of one operation: `max_retries` retries after the first try, waiting
/// [`retry_delay`] before each.
#[derive(Debug, Clone)]
pub struct RetryPlan {
    base: Duration,
    max_retries: u32,
    retries: u32,
}

impl RetryPlan {
    pub fn new(base: Duration, max_retries: u32) -> Self {
        Self {
            base,
            max_retries,
            retries: 0,
        }
    }

    /// After a failed try: how long to wait before the next one, or `None` when retries ran out.
    pub fn next_delay(&mut self) -> Option<Duration> {
        if self.retries >= self.max_retries {
            return None;
        }
        self.retries += 1;
        Some(retry_delay(self.base, self.retries))
    }

    pub fn retries(&self) -> u32 {
        self.retries
    }
}

impl Retriever {
    /// Records that artifact `id` at `revision` failed to deploy, and when it is tried again
    /// (attempts count per revision), or that its retries ran out.
    pub(super) fn fail(&mut self, id: &str, revision: i64, reason: String) {
        let max = self.config.max_retry_count;
        let base = self.retry_base();
        let f = self
            .failures
            .entry(id.to_owned())
            .or_insert_with(|| Failure {
                id: id.to_owned(),
                revision,
                attempts: 0,
                reason: String::new(),
                gave_up: false,
                next_at: None,
            });
        if f.revision != revision {
            f.attempts = 0;
            f.revision = revision;
        }
        f.attempts += 1;
        f.reason = reason;
        if f.attempts > max {
            f.gave_up = true;
            f.next_at = None;
            warn!(artifact = %id, revision, attempts = f.attempts, reason = %f.reason, "deployment retries ran out; running without this artifact");
        } else {
            let delay = retry_delay(base, f.attempts);
            f.next_at = Some(Instant::now() + delay);
            warn!(artifact = %id, revision, attempt = f.attempts, retry_in_ms = delay.as_millis() as u64, reason = %f.reason, "artifact not deployed");
        }
    }

    /// Tries again every failed artifact whose retry is due; stops at a source outage.
    pub(super) async fn retry_due(&mut self) {
        let now = Instant::now();
        let due: Vec<String> = self
            .failures
            .values()
            .filter(|f| !f.gave_up && f.next_at.is_some_and(|t| t <= now))
            .map(|f| f.id.clone())
            .collect();
        for id in due {
            if let Err(e) = self.sync_one(&id).await {
                self.available = false;
                self.last_error = Some(e.to_string());
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::{MAX_RETRY_DELAY, retry_delay};

    #[test]
    fn retry_delays_double_and_cap_at_one_hour() {
        let base = Duration::from_millis(15_000);
        let got: Vec<u64> = (1..=10).map(|a| retry_delay(base, a).as_secs()).collect();
        assert_eq!(got, vec![15, 30, 60, 120, 240, 480, 960, 1920, 3600, 3600]);
        assert_eq!(
            retry_delay(base, 200),
            MAX_RETRY_DELAY,
            "no overflow for huge attempt counts"
        );
        assert_eq!(
            retry_delay(Duration::from_millis(1), 1),
            Duration::from_millis(1)
        );
    }
}
