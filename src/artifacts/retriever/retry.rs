//! When a failed deployment is tried again: capped exponential backoff, and the retry plan.

use std::time::Duration;

/// Longest delay between two retries of a failed deployment.
pub const MAX_RETRY_DELAY: Duration = Duration::from_secs(3600);
/// Sync start-up: the wait before the second try of the failing artifacts, doubling after
/// (with the default 3 `startup_attempts`: 0.5 s, then 1 s).
pub const STARTUP_RETRY_BASE: Duration = Duration::from_millis(500);

/// Delay before retry number `attempt` (1-based): `base`, doubling, never above one hour.
pub fn retry_delay(base: Duration, attempt: u32) -> Duration {
    let factor = 1u32
        .checked_shl(attempt.saturating_sub(1))
        .unwrap_or(u32::MAX);
    base.checked_mul(factor)
        .unwrap_or(MAX_RETRY_DELAY)
        .min(MAX_RETRY_DELAY)
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
