//! Logs that clients can cause: at most one line per interval and kind, so
//! that nobody can flood the log; the metrics keep the totals.

use std::{
    sync::{
        OnceLock,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
    time::Instant,
};

/// Interval between two lines of one kind.
const INTERVAL_MS: u64 = 10_000;

/// Lets a log line through at most once per interval.
#[derive(Debug, Default)]
pub(crate) struct LogLimiter {
    /// Milliseconds since the epoch below of the last line let through, plus one.
    last: AtomicU64,
}

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

impl LogLimiter {
    /// True for the first call and then at most once per interval.
    pub(crate) fn allow(&self) -> bool {
        let now = epoch().elapsed().as_millis() as u64 + 1;
        let last = self.last.load(Relaxed);
        if last != 0 && now < last + INTERVAL_MS {
            return false;
        }
        self.last
            .compare_exchange(last, now, Relaxed, Relaxed)
            .is_ok()
    }
}
