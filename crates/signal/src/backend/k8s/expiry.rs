//! Deleting expired envelope objects, so that the namespace does not grow
//! while peers run: a running transport deletes the objects it sent and the
//! objects addressed to the keys it listens on once they are older than the
//! ttl.

use std::{
    collections::HashMap,
    sync::{Arc, atomic::Ordering::Relaxed},
    time::{Duration, SystemTime},
};

use kube::{
    Api, ResourceExt as _,
    api::{DeleteParams, ListParams, Preconditions},
};
use tokio::time::Instant;

use super::{
    Shared,
    crd::{LABEL_RECIPIENT, LABEL_SENDER, SignalingEnvelope, created, selector},
};
use crate::Key;

/// How many of our own sender keys are remembered for expiry at most.
const MAX_SENDERS: usize = 1024;
/// How many keys one label selector of the expiry sweep names.
const KEYS_PER_SELECTOR: usize = 64;

/// Our sender keys and when each last sent: at most [`MAX_SENDERS`], the one
/// that sent longest ago goes first.
#[derive(Debug, Default)]
pub(super) struct Senders {
    last: HashMap<Key, Instant>,
}

impl Senders {
    /// `key` sent at `now`.
    pub(super) fn sent(&mut self, key: Key, now: Instant) {
        if self.last.len() >= MAX_SENDERS
            && !self.last.contains_key(&key)
            && let Some(oldest) = self.last.iter().min_by_key(|(_, t)| **t).map(|(k, _)| *k)
        {
            self.last.remove(&oldest);
        }
        self.last.insert(key, now);
    }

    /// Forgets the keys that last sent `keep` or longer before `now`, and
    /// returns the others.
    fn recent(&mut self, now: Instant, keep: Duration) -> Vec<Key> {
        self.last.retain(|_, last| now.duration_since(*last) < keep);
        self.last.keys().copied().collect()
    }
}

/// Deletes, every `interval`, the objects this transport sent or listens for
/// once they are older than the ttl; each request within `limit`.
pub(super) async fn expire(
    shared: Arc<Shared>,
    api: Api<SignalingEnvelope>,
    interval: Duration,
    limit: Duration,
) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let (recipients, senders) = {
            let mut state = shared.state();
            // A sender key is kept until everything it sent has had time to expire.
            let keep = shared.ttl.0 * 2 + interval;
            let senders = state.senders.recent(Instant::now(), keep);
            (state.wanted.iter().copied().collect::<Vec<_>>(), senders)
        };
        for (label, keys) in [(LABEL_RECIPIENT, recipients), (LABEL_SENDER, senders)] {
            for chunk in keys.chunks(KEYS_PER_SELECTOR) {
                expire_matching(&shared, &api, &selector(label, chunk), limit).await;
            }
        }
    }
}

async fn expire_matching(
    shared: &Shared,
    api: &Api<SignalingEnvelope>,
    selector: &str,
    limit: Duration,
) {
    let params = ListParams::default().labels(selector);
    let objects = match tokio::time::timeout(limit, api.list(&params)).await {
        Ok(Ok(list)) => list.items,
        Ok(Err(e)) => {
            tracing::debug!(backend = %shared.name, "expiry: list failed: {e}");
            return;
        }
        Err(_) => {
            tracing::debug!(backend = %shared.name, "expiry: list: no answer within {limit:?}");
            return;
        }
    };
    for object in objects {
        if !shared
            .ttl
            .expired(created(&object.metadata), SystemTime::now())
        {
            continue;
        }
        let (Some(name), Some(uid)) = (object.metadata.name.as_deref(), object.uid()) else {
            continue;
        };
        let params = DeleteParams {
            preconditions: Some(Preconditions {
                uid: Some(uid),
                resource_version: None,
            }),
            ..DeleteParams::default()
        };
        let Ok(deleted) = tokio::time::timeout(limit, api.delete(name, &params)).await else {
            tracing::debug!(backend = %shared.name, object = name, "expiry: delete: no answer within {limit:?}");
            return;
        };
        match deleted {
            Ok(_) => {
                shared.counters.deleted.fetch_add(1, Relaxed);
                tracing::debug!(backend = %shared.name, object = name, "expired envelope deleted");
            }
            // Deleted meanwhile by another peer (404), or replaced (409).
            Err(kube::Error::Api(status)) if status.code == 404 || status.code == 409 => {}
            Err(kube::Error::Api(status)) if status.code == 403 => {
                if !shared.delete_denied_logged.swap(true, Relaxed) {
                    tracing::warn!(backend = %shared.name, "expired envelopes cannot be deleted: {}", status.message);
                }
                return;
            }
            Err(e) => {
                tracing::debug!(backend = %shared.name, object = name, "expiry: delete failed: {e}");
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn senders_are_bounded_and_forgotten_in_time() {
        let mut senders = Senders::default();
        let t0 = Instant::now();
        let keys: Vec<Key> = (0..MAX_SENDERS + 1).map(|_| Key::generate()).collect();
        for (i, key) in keys.iter().enumerate() {
            senders.sent(*key, t0 + Duration::from_millis(i as u64));
        }
        // The one that sent longest ago made room.
        assert_eq!(senders.last.len(), MAX_SENDERS);
        assert!(!senders.last.contains_key(&keys[0]));
        // Sending again refreshes, and does not evict.
        senders.sent(keys[1], t0 + Duration::from_secs(10));
        assert_eq!(senders.last.len(), MAX_SENDERS);
        let recent = senders.recent(t0 + Duration::from_secs(10), Duration::from_secs(1));
        assert_eq!(recent, vec![keys[1]]);
    }
}
