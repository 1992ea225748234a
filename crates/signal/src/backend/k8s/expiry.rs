//! Deleting expired envelope objects, so that the namespace does not grow
//! while peers run (docs/PROTOCOL.md §9, §10): a running transport deletes the objects it
//! sent and the objects addressed to the keys it listens on once they are
//! older than the ttl, and any object once it is older than twice the ttl,
//! whoever sent it and whoever it is for (also objects without our labels,
//! such as cunīcu's). Each sweep reads the namespace's object metadata only
//! (no contents), [`PAGE`] objects per request.

use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, atomic::Ordering::Relaxed},
    time::{Duration, SystemTime},
};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::{
    Api,
    api::{DeleteParams, ListParams, Preconditions},
};
use tokio::time::Instant;

use super::{
    Shared,
    crd::{LABEL_RECIPIENT, LABEL_SENDER, SignalingEnvelope, created},
    rules::Expiry,
};
use crate::Key;

/// How many of our own sender keys are remembered for expiry at most.
const MAX_SENDERS: usize = 1024;
/// How many objects one list request of the sweep asks for.
const PAGE: u32 = 500;

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

/// Deletes, every `interval`, the objects of the namespace that
/// [`Ttl::expiry`](super::rules::Ttl::expiry) says to: ours (sent by this
/// transport or addressed to a key it listens on) older than the ttl, and
/// anyone's older than twice the ttl. Each request within `limit`.
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
        let ours: HashSet<String> = {
            let mut state = shared.state.lock();
            // A sender key is kept until everything it sent has had time to expire.
            let keep = shared.ttl.0 * 2 + interval;
            let senders = state.senders.recent(Instant::now(), keep);
            state
                .wanted
                .iter()
                .chain(&senders)
                .map(Key::to_base32)
                .collect()
        };
        sweep(&shared, &api, &ours, limit).await;
    }
}

/// One pass over the namespace, a page of object metadata at a time.
/// `ours` holds the label values of our keys.
async fn sweep(
    shared: &Shared,
    api: &Api<SignalingEnvelope>,
    ours: &HashSet<String>,
    limit: Duration,
) {
    let mut token: Option<String> = None;
    loop {
        let mut params = ListParams::default().limit(PAGE);
        if let Some(token) = &token {
            params = params.continue_token(token);
        }
        let page = match tokio::time::timeout(limit, api.list_metadata(&params)).await {
            Ok(Ok(page)) => page,
            // Also a continue token that has expired (410): the next sweep starts over.
            Ok(Err(e)) => {
                tracing::debug!(backend = %shared.name, "expiry: list failed: {e}");
                return;
            }
            Err(_) => {
                tracing::debug!(backend = %shared.name, "expiry: list: no answer within {limit:?}");
                return;
            }
        };
        let now = SystemTime::now();
        for object in &page.items {
            let meta = &object.metadata;
            let labels = meta.labels.as_ref();
            let is_ours = [LABEL_RECIPIENT, LABEL_SENDER].into_iter().any(|label| {
                labels
                    .and_then(|labels| labels.get(label))
                    .is_some_and(|value| ours.contains(value))
            });
            let expiry = shared.ttl.expiry(created(meta), is_ours, now);
            if expiry != Expiry::Keep && !delete(shared, api, meta, expiry, limit).await {
                return;
            }
        }
        token = page.metadata.continue_.filter(|token| !token.is_empty());
        if token.is_none() {
            return;
        }
    }
}

/// Deletes the object of `meta` (that very object: its UID is a
/// precondition). Returns false if the sweep should stop here.
async fn delete(
    shared: &Shared,
    api: &Api<SignalingEnvelope>,
    meta: &ObjectMeta,
    expiry: Expiry,
    limit: Duration,
) -> bool {
    let (Some(name), Some(uid)) = (meta.name.as_deref(), meta.uid.clone()) else {
        return true;
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
        return false;
    };
    match deleted {
        Ok(_) => {
            shared.counters.deleted.fetch_add(1, Relaxed);
            if expiry == Expiry::Abandoned {
                shared.counters.deleted_abandoned.fetch_add(1, Relaxed);
            }
            tracing::debug!(backend = %shared.name, object = name, ?expiry, "expired envelope deleted");
            true
        }
        // Deleted meanwhile by another peer (404), or replaced (409).
        Err(kube::Error::Api(status)) if status.code == 404 || status.code == 409 => true,
        Err(kube::Error::Api(status)) if status.code == 403 => {
            if !shared.delete_denied_logged.swap(true, Relaxed) {
                tracing::warn!(backend = %shared.name, "expired envelopes cannot be deleted: {}", status.message);
            }
            false
        }
        Err(e) => {
            tracing::debug!(backend = %shared.name, object = name, "expiry: delete failed: {e}");
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::PrivateKey;

    #[test]
    fn senders_are_bounded_and_forgotten_in_time() {
        let mut senders = Senders::default();
        let t0 = Instant::now();
        let keys: Vec<Key> = (0..MAX_SENDERS + 1)
            .map(|_| PrivateKey::generate().public_key())
            .collect();
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
