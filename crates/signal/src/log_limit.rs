//! Log lines that input from outside can cause as often as it likes (invalid
//! envelopes, refused connections, ...): at most one line per interval and
//! kind, so that nobody can flood the log. Counters keep the totals.
//!
//! One [`LogLimiter`] per kind of line:
//!
//! ```
//! use cunicu_signal::log_limit::LogLimiter;
//!
//! let invalid_log = LogLimiter::default();
//! for _ in 0..3 {
//!     if invalid_log.allow() {
//!         // tracing::warn!(...): only the first of the three gets here.
//!     }
//! }
//! ```

use std::{
    sync::atomic::{AtomicU64, Ordering::Relaxed},
    time::Duration,
};

use tokio::time::Instant;

/// The interval of [`LogLimiter::default`].
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(10);

/// Lets a log line through for the first call and then at most once per
/// interval. Lock-free: a denied call only reads one atomic.
#[derive(Debug)]
pub struct LogLimiter {
    /// What `last` counts from: when the limiter was made.
    epoch: Instant,
    interval_ms: u64,
    /// Milliseconds since `epoch` of the last line let through, plus one
    /// (0: none yet).
    last: AtomicU64,
}

impl LogLimiter {
    /// A limiter that lets one line through per `interval` (counted in
    /// milliseconds).
    pub fn new(interval: Duration) -> Self {
        LogLimiter {
            epoch: Instant::now(),
            interval_ms: u64::try_from(interval.as_millis()).unwrap_or(u64::MAX),
            last: AtomicU64::new(0),
        }
    }

    /// True for the first call and then for the first call after each
    /// interval.
    pub fn allow(&self) -> bool {
        self.allow_at(Instant::now())
    }

    /// [`allow`](Self::allow) at time `now` (for tests with their own clock).
    pub fn allow_at(&self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.epoch).as_millis();
        let now = u64::try_from(elapsed).unwrap_or(u64::MAX - 1) + 1;
        let last = self.last.load(Relaxed);
        if last != 0 && now < last.saturating_add(self.interval_ms) {
            return false;
        }
        // Of callers racing past the check, only one wins the line.
        self.last
            .compare_exchange(last, now, Relaxed, Relaxed)
            .is_ok()
    }
}

impl Default for LogLimiter {
    /// One line per [`DEFAULT_INTERVAL`].
    fn default() -> Self {
        LogLimiter::new(DEFAULT_INTERVAL)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_interval() {
        let limit = LogLimiter::new(Duration::from_secs(60));
        let t0 = Instant::now();
        assert!(limit.allow_at(t0));
        assert!(!limit.allow_at(t0 + Duration::from_secs(1)));
        assert!(!limit.allow_at(t0 + Duration::from_secs(59)));
        assert!(limit.allow_at(t0 + Duration::from_secs(60)));
        assert!(!limit.allow_at(t0 + Duration::from_secs(61)));
        assert!(limit.allow_at(t0 + Duration::from_secs(125)));
    }

    #[test]
    fn default_interval_counts_from_the_first_line() {
        let limit = LogLimiter::default();
        assert!(limit.allow());
        assert!(!limit.allow());
        let later = Instant::now() + DEFAULT_INTERVAL + Duration::from_millis(1);
        assert!(limit.allow_at(later));
        assert!(!limit.allow_at(later));
    }
}
