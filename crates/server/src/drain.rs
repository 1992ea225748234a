//! When each subscription stream ends at shutdown: spread evenly over the
//! drain window, in random order, one moment per stream (not per
//! connection), so that the clients of a stopping replica come back to the
//! others a few at a time instead of all at once.

use std::time::Duration;

use parking_lot::Mutex;
use rand::seq::SliceRandom as _;
use tokio::time::Instant;

/// The moments at which the streams open at shutdown end.
#[derive(Default)]
pub(crate) struct DrainPlan {
    plan: Mutex<Option<Plan>>,
}

struct Plan {
    start: Instant,
    window: Duration,
    /// Offsets from `start` not yet handed out, in random order.
    offsets: Vec<Duration>,
}

impl DrainPlan {
    /// Plans the end of `streams` streams over `window` from now: slot `i`
    /// of `streams` ends at `i * window / streams` plus a random part of one
    /// slot, and the slots are dealt in random order.
    pub(crate) fn begin(&self, window: Duration, streams: usize) {
        let mut rng = rand::rng();
        let slot = window / u32::try_from(streams.max(1)).unwrap_or(u32::MAX);
        let mut offsets: Vec<Duration> = (0..streams)
            .map(|i| {
                let jitter = slot.mul_f64(rand::Rng::random::<f64>(&mut rng));
                (slot * u32::try_from(i).unwrap_or(u32::MAX) + jitter).min(window)
            })
            .collect();
        offsets.shuffle(&mut rng);
        *self.plan.lock() = Some(Plan {
            start: Instant::now(),
            window,
            offsets,
        });
    }

    /// When the next stream to ask ends. Streams beyond the planned count
    /// (set up while stopping began) get a random moment in the window; with
    /// no plan (a stop without drain), now.
    pub(crate) fn next_end(&self) -> Instant {
        let mut plan = self.plan.lock();
        let Some(plan) = plan.as_mut() else {
            return Instant::now();
        };
        let offset = plan
            .offsets
            .pop()
            .unwrap_or_else(|| plan.window.mul_f64(rand::random::<f64>()));
        plan.start + offset
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ends_are_spread_evenly_over_the_window() {
        let plan = DrainPlan::default();
        let window = Duration::from_secs(10);
        plan.begin(window, 100);
        let start = Instant::now();
        let mut ends: Vec<Duration> = (0..100)
            .map(|_| plan.next_end().saturating_duration_since(start))
            .collect();
        // Not in order of asking.
        assert!(
            ends.windows(2).any(|w| w[0] > w[1]),
            "ends in order: {ends:?}"
        );
        ends.sort();
        // One in each tenth of the window, give or take the jitter.
        for (i, end) in ends.iter().enumerate() {
            let slot = window / 100;
            assert!(
                *end + slot * 2 >= slot * i as u32 && *end <= slot * (i as u32 + 1),
                "end {i} at {end:?}"
            );
        }
        // Beyond the plan: still within the window.
        assert!(plan.next_end() <= start + window + Duration::from_millis(50));
    }

    #[test]
    fn without_a_plan_streams_end_now() {
        let plan = DrainPlan::default();
        assert!(plan.next_end() <= Instant::now());
        plan.begin(Duration::ZERO, 3);
        assert!(plan.next_end() <= Instant::now());
    }
}
