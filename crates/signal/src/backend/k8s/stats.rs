//! The counters of a Kubernetes transport.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

#[cfg(doc)]
use super::{CLOCK_SKEW, K8s};

/// Counters of a [`K8s`] transport.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct K8sStats {
    /// Envelope objects created.
    pub sent: u64,
    /// Envelopes handed to the registry (each object once while its UID is
    /// remembered, see the module's docs).
    pub handed_over: u64,
    /// Objects seen again (after a relist or a restart of the watch) and skipped.
    pub seen_again: u64,
    /// Objects that existed before their key was listened on: not replayed.
    pub stale: u64,
    /// Objects found by the first list of their key that were created after
    /// `listen` was called (less [`CLOCK_SKEW`]): delivered, not taken for stale.
    pub caught_up: u64,
    /// Objects older than the ttl: expired, not delivered.
    pub too_old: u64,
    /// Objects that are not envelopes (fields not base64, a recipient that is
    /// not a 32-byte key): dropped.
    pub invalid: u64,
    /// Expired objects deleted by this transport: ours older than the ttl,
    /// and anyone's older than twice the ttl.
    pub deleted: u64,
    /// Of `deleted`, the objects neither sent by this transport nor addressed
    /// to a key it listens on (older than twice the ttl).
    pub deleted_abandoned: u64,
    /// Remembered UIDs forgotten early because the memory was full: such an
    /// object may be handed over again if a relist finds it within its ttl.
    pub forgotten_early: u64,
    /// Errors of the watch that no `listen` returned (it retries with backoff).
    pub watch_errors: u64,
}

/// The counters as the tasks count them (all but `forgotten_early`).
#[derive(Default)]
pub(super) struct Counters {
    pub(super) sent: AtomicU64,
    pub(super) handed_over: AtomicU64,
    pub(super) seen_again: AtomicU64,
    pub(super) stale: AtomicU64,
    pub(super) caught_up: AtomicU64,
    pub(super) too_old: AtomicU64,
    pub(super) invalid: AtomicU64,
    pub(super) deleted: AtomicU64,
    pub(super) deleted_abandoned: AtomicU64,
    pub(super) watch_errors: AtomicU64,
}

impl Counters {
    /// The counters now; `forgotten_early` is counted by the delivery rules.
    pub(super) fn snapshot(&self, forgotten_early: u64) -> K8sStats {
        K8sStats {
            sent: self.sent.load(Relaxed),
            handed_over: self.handed_over.load(Relaxed),
            seen_again: self.seen_again.load(Relaxed),
            stale: self.stale.load(Relaxed),
            caught_up: self.caught_up.load(Relaxed),
            too_old: self.too_old.load(Relaxed),
            invalid: self.invalid.load(Relaxed),
            deleted: self.deleted.load(Relaxed),
            deleted_abandoned: self.deleted_abandoned.load(Relaxed),
            forgotten_early,
            watch_errors: self.watch_errors.load(Relaxed),
        }
    }
}
