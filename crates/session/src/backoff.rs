//! The schedule of repeated credential messages (docs/PROTOCOL.md §8 step 2).
//!
//! cunīcu uses `cenkalti/backoff` with its defaults: 0.5 s initial, ×1.5, a
//! randomization factor of 0.5 and a maximum interval of 1 min. backon's
//! jitter only adds (0..100 % of the delay), so the schedule is computed here.
//! One difference, as docs/PROTOCOL.md §8 asks: the delay *after* jitter is capped at the
//! maximum too (cenkalti jitters around the capped interval, so its delays can
//! reach 1.5 min).

use std::time::Duration;

use rand::Rng;

/// Parameters of an exponential backoff with symmetric jitter.
#[derive(Debug, Clone, Copy, PartialEq)]
#[non_exhaustive]
pub struct BackoffOptions {
    /// The first interval (before jitter).
    pub initial: Duration,
    /// Each interval is the previous one times this.
    pub multiplier: f64,
    /// Each delay is the interval times a factor drawn uniformly from
    /// `1 - jitter ..= 1 + jitter`.
    pub jitter: f64,
    /// No interval and no delay is longer than this.
    pub max: Duration,
}

impl Default for BackoffOptions {
    /// docs/PROTOCOL.md §8: 0.5 s, ×1.5, ±50 %, at most 1 min.
    fn default() -> Self {
        BackoffOptions {
            initial: Duration::from_millis(500),
            multiplier: 1.5,
            jitter: 0.5,
            max: Duration::from_secs(60),
        }
    }
}

impl BackoffOptions {
    /// The same schedule starting at `initial` (tests use milliseconds).
    pub fn with_initial(mut self, initial: Duration) -> Self {
        self.initial = initial;
        self
    }

    /// The same schedule with the longest delay `max`.
    pub fn with_max(mut self, max: Duration) -> Self {
        self.max = max;
        self
    }
}

/// The shortest first interval and cap: a schedule of zeros would make its
/// user spin.
const MIN_DELAY: Duration = Duration::from_millis(1);

/// `d` × `factor`, or `cap` when that is larger or not a duration.
fn scaled(d: Duration, factor: f64, cap: Duration) -> Duration {
    Duration::try_from_secs_f64(d.as_secs_f64() * factor).map_or(cap, |d| d.min(cap))
}

/// A running backoff schedule: [`Backoff::next_delay`] gives the next delay.
/// Out-of-range options are brought into range: `initial` and `max` at least
/// 1 ms, `multiplier` at least 1, `jitter` within 0..=1.
#[derive(Debug, Clone)]
pub struct Backoff {
    options: BackoffOptions,
    /// The current interval before jitter.
    interval: Duration,
}

impl Backoff {
    /// A schedule at its first interval.
    pub fn new(options: BackoffOptions) -> Self {
        let max = options.max.max(MIN_DELAY);
        let options = BackoffOptions {
            initial: options.initial.clamp(MIN_DELAY, max),
            multiplier: if options.multiplier.is_finite() {
                options.multiplier.max(1.0)
            } else {
                1.0
            },
            jitter: if options.jitter.is_nan() {
                0.0
            } else {
                options.jitter.clamp(0.0, 1.0)
            },
            max,
        };
        Backoff {
            options,
            interval: options.initial,
        }
    }

    /// Starts again at the first interval.
    pub fn reset(&mut self) {
        self.interval = self.options.initial;
    }

    /// The next delay, drawn with `rng`, and advances the schedule.
    pub fn next_delay(&mut self, rng: &mut impl Rng) -> Duration {
        let BackoffOptions {
            multiplier,
            jitter,
            max,
            ..
        } = self.options;
        let factor = if jitter > 0.0 {
            rng.random_range((1.0 - jitter)..=(1.0 + jitter))
        } else {
            1.0
        };
        let delay = scaled(self.interval, factor, max);
        self.interval = scaled(self.interval, multiplier, max);
        delay
    }
}

#[cfg(test)]
mod tests {
    use rand::{SeedableRng, rngs::StdRng};

    use super::*;

    #[test]
    fn options_out_of_range_neither_spin_nor_panic() {
        let mut rng = StdRng::seed_from_u64(1);
        let zero = BackoffOptions {
            initial: Duration::ZERO,
            multiplier: 2.0,
            jitter: 0.0,
            max: Duration::ZERO,
        };
        let mut backoff = Backoff::new(zero);
        assert_eq!(backoff.next_delay(&mut rng), MIN_DELAY);
        let huge = BackoffOptions {
            initial: Duration::from_secs(1),
            multiplier: 1e300,
            jitter: f64::NAN,
            max: Duration::from_secs(60),
        };
        let mut backoff = Backoff::new(huge);
        assert_eq!(backoff.next_delay(&mut rng), Duration::from_secs(1));
        assert_eq!(backoff.next_delay(&mut rng), Duration::from_secs(60));
        assert_eq!(backoff.next_delay(&mut rng), Duration::from_secs(60));
    }

    #[test]
    fn spec_schedule_within_its_jitter_and_cap() {
        let mut rng = StdRng::seed_from_u64(7);
        let mut backoff = Backoff::new(BackoffOptions::default());
        let mut interval = 0.5_f64;
        let mut seen_low = false;
        let mut seen_high = false;
        for step in 0..40 {
            let delay = backoff.next_delay(&mut rng).as_secs_f64();
            let (low, high) = (interval * 0.5, (interval * 1.5).min(60.0));
            assert!(
                delay >= low - 1e-9 && delay <= high + 1e-9,
                "step {step}: {delay} not in {low}..={high}"
            );
            if step < 8 {
                seen_low |= delay < interval;
                seen_high |= delay > interval;
            }
            interval = (interval * 1.5).min(60.0);
        }
        assert!(seen_low && seen_high, "the jitter goes both ways");
        // Capped: after 40 steps the interval is the maximum.
        for _ in 0..100 {
            let delay = backoff.next_delay(&mut rng);
            assert!(delay <= Duration::from_secs(60));
            assert!(delay >= Duration::from_secs(30));
        }
    }

    #[test]
    fn reset_starts_again_and_zero_jitter_is_exact() {
        let mut rng = StdRng::seed_from_u64(1);
        let options = BackoffOptions {
            jitter: 0.0,
            ..BackoffOptions::default()
        };
        let mut backoff = Backoff::new(options);
        let delays: Vec<u128> = (0..4)
            .map(|_| backoff.next_delay(&mut rng).as_millis())
            .collect();
        assert_eq!(delays, [500, 750, 1125, 1687]);
        backoff.reset();
        assert_eq!(backoff.next_delay(&mut rng), Duration::from_millis(500));
    }
}
