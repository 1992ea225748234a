//! The one watch of a transport: kube's [`watcher()`] with backoff over the
//! keys listened on, restarted when they change; its events go through the
//! delivery [`rules`](super::rules) to the registry, and its first list of a
//! key lets the `listen`s that wait for it return.

use std::{
    collections::BTreeSet,
    pin::pin,
    sync::{Arc, atomic::Ordering::Relaxed},
    time::{Duration, SystemTime},
};

use futures::StreamExt as _;
use kube::{
    Api, ResourceExt as _,
    runtime::{
        WatchStreamExt as _,
        utils::ResetTimerBackoff,
        watcher::{self, ExponentialBackoff, watcher},
    },
};
use tokio::sync::{oneshot, watch};

use super::{
    K8sError, K8sOptions, Shared,
    crd::{LABEL_RECIPIENT, SignalingEnvelope, created, selector},
    rules::{Object, Verdict},
};
use crate::{Key, proto::signaling::Envelope};

/// A `listen` that waits for the first list of its key.
pub(super) struct Waiter {
    pub(super) key: Key,
    pub(super) tx: oneshot::Sender<Result<(), K8sError>>,
}

/// What the watch does after an event.
#[derive(Debug, PartialEq, Eq)]
enum Flow {
    Continue,
    /// The wanted keys changed: start over with the new selector.
    Restart,
}

impl Shared {
    /// One event of the watch over `keys`.
    fn on_event(
        &self,
        event: Result<watcher::Event<SignalingEnvelope>, watcher::Error>,
        keys: &BTreeSet<Key>,
        failing: &mut bool,
    ) -> Flow {
        let event = match event {
            Ok(event) => event,
            Err(e) => return self.on_error(e, keys, failing),
        };
        if *failing {
            tracing::info!(backend = %self.name, "watch is back");
            *failing = false;
        }
        match event {
            watcher::Event::Init => {}
            watcher::Event::InitApply(object) | watcher::Event::Apply(object) => {
                self.handle(&object)
            }
            watcher::Event::InitDone => self.listed(keys),
            // Deleted objects stay remembered until their time is up.
            watcher::Event::Delete(_) => {}
        }
        Flow::Continue
    }

    /// An error of the watch over `keys`. The listens waiting for one of
    /// them get the error; on a definitive one their keys are forgotten first.
    /// Other errors are logged and counted: the stream retries with backoff.
    fn on_error(&self, e: watcher::Error, keys: &BTreeSet<Key>, failing: &mut bool) -> Flow {
        let error = self.place.watch_error(e);
        let definitive = error.is_definitive();
        let waiters = {
            let mut state = self.state.lock();
            let state = &mut *state;
            state.waiters.retain(|w| !w.tx.is_closed());
            let (hit, rest): (Vec<Waiter>, Vec<Waiter>) = std::mem::take(&mut state.waiters)
                .into_iter()
                .partition(|w| keys.contains(&w.key) && state.rules.is_pending(&w.key));
            state.waiters = rest;
            if definitive {
                for waiter in &hit {
                    state.wanted.remove(&waiter.key);
                    state.rules.forget(&waiter.key);
                }
            }
            hit
        };
        if !waiters.is_empty() {
            for waiter in &waiters {
                tracing::debug!(backend = %self.name, key = %waiter.key, definitive, "first list failed: {error}");
            }
            let mut waiters = waiters.into_iter();
            let first = waiters.next();
            for waiter in waiters {
                let _ = waiter.tx.send(Err(error.duplicate()));
            }
            if let Some(first) = first {
                let _ = first.tx.send(Err(error));
            }
            return if definitive {
                Flow::Restart
            } else {
                Flow::Continue
            };
        }
        self.counters.watch_errors.fetch_add(1, Relaxed);
        if !*failing {
            tracing::warn!(backend = %self.name, "watch failed, retrying with backoff: {error}");
            *failing = true;
        } else {
            tracing::debug!(backend = %self.name, "watch failed again: {error}");
        }
        Flow::Continue
    }

    /// The watch over `keys` has listed them: none is new any more, and the
    /// listens waiting for one of them return.
    pub(super) fn listed(&self, keys: &BTreeSet<Key>) {
        let waiters = {
            let mut state = self.state.lock();
            state.rules.listed(keys);
            let (hit, rest): (Vec<Waiter>, Vec<Waiter>) = std::mem::take(&mut state.waiters)
                .into_iter()
                .partition(|w| keys.contains(&w.key));
            state.waiters = rest;
            hit
        };
        for waiter in waiters {
            let _ = waiter.tx.send(Ok(()));
        }
    }

    /// Hands `object` to the registry if the delivery rules say so, and
    /// counts what they decided.
    pub(super) fn handle(&self, object: &SignalingEnvelope) {
        let Some(uid) = object.metadata.uid.as_deref() else {
            self.counters.invalid.fetch_add(1, Relaxed);
            return;
        };
        let decoded: Result<(Envelope, Key), String> = object.to_envelope().and_then(|e| {
            let recipient = Key::from_slice(&e.recipient)
                .map_err(|_| "the recipient is not a 32-byte key".to_string())?;
            Ok((e, recipient))
        });
        let facts = Object {
            uid,
            created: created(&object.metadata),
            recipient: decoded.as_ref().ok().map(|(_, recipient)| *recipient),
        };
        let verdict = self.state.lock().rules.decide(&facts, SystemTime::now());
        let counter = match verdict {
            Verdict::Deliver => None,
            Verdict::CaughtUp => Some(&self.counters.caught_up),
            Verdict::Seen => Some(&self.counters.seen_again),
            Verdict::Stale => Some(&self.counters.stale),
            Verdict::TooOld => Some(&self.counters.too_old),
            Verdict::Invalid => {
                let why = decoded.err().unwrap_or_default();
                self.invalid(object, &why);
                return;
            }
        };
        if let Some(counter) = counter {
            counter.fetch_add(1, Relaxed);
        }
        if let (true, Ok((envelope, _))) = (verdict.delivers(), decoded) {
            self.counters.handed_over.fetch_add(1, Relaxed);
            self.registry.deliver(&envelope);
        }
    }

    /// Counts and (rate-limited) logs an object that is not an envelope.
    fn invalid(&self, object: &SignalingEnvelope, why: &str) {
        let total = self.counters.invalid.fetch_add(1, Relaxed) + 1;
        if self.invalid_log.allow() {
            tracing::warn!(
                backend = %self.name,
                object = %object.name_any(),
                total,
                "not an envelope, dropped: {why} ({total} so far; logged at most once a minute)"
            );
        } else {
            tracing::debug!(backend = %self.name, object = %object.name_any(), total, "not an envelope, dropped: {why}");
        }
    }
}

/// Runs the one watch of a transport over the wanted keys, started over when
/// they change (`changes` counts the changes; `applied` reports the count the
/// running watch reflects), until the transport is closed.
pub(super) async fn run_watches(
    shared: Arc<Shared>,
    api: Api<SignalingEnvelope>,
    options: K8sOptions,
    mut changes: watch::Receiver<u64>,
    applied: watch::Sender<u64>,
) {
    loop {
        let generation = *changes.borrow_and_update();
        let keys = shared.state.lock().wanted.clone();
        applied.send_replace(generation);
        if keys.is_empty() {
            if changes.changed().await.is_err() {
                return;
            }
            continue;
        }
        let backoff = ResetTimerBackoff::new(
            ExponentialBackoff::from(
                backon::ExponentialBuilder::default()
                    .with_min_delay(options.backoff_min)
                    .with_max_delay(options.backoff_max)
                    .with_factor(2.0)
                    .with_jitter()
                    .without_max_times(),
            ),
            Duration::from_secs(120),
        );
        let mut stream = pin!(
            watcher(
                api.clone(),
                watcher::Config::default().labels(&selector(LABEL_RECIPIENT, &keys)),
            )
            .backoff(backoff)
        );
        let mut failing = false;
        loop {
            tokio::select! {
                biased;
                changed = changes.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    break;
                }
                event = stream.next() => {
                    // The stream retries without end; it ends only if kube changes that.
                    let Some(event) = event else { break };
                    if shared.on_event(event, &keys, &mut failing) == Flow::Restart {
                        break;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::{PrivateKey, Sender};
    use std::sync::atomic::AtomicU64;

    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    use super::*;
    use crate::{KeyPair, Registry, backend::k8s::CLOCK_SKEW};

    /// An object from `a` to `b`, created `ago` ago.
    fn object(a: &PrivateKey, b: &PrivateKey, ago: Duration, uid: &str) -> SignalingEnvelope {
        let envelope = crate::proto::signaling::Message::default()
            .seal(&KeyPair::new(a.clone(), b.public_key()))
            .unwrap();
        let mut object = SignalingEnvelope::from_envelope(&envelope).unwrap();
        object.metadata.uid = Some(uid.into());
        let created = k8s_openapi::jiff::Timestamp::try_from(SystemTime::now() - ago).unwrap();
        object.metadata.creation_timestamp = Some(Time(created));
        object
    }

    /// Waits until the registry's worker has handled what was handed over.
    async fn flush(registry: &Registry) {
        tokio::time::timeout(Duration::from_secs(10), registry.flush())
            .await
            .expect("the registry's worker finishes within 10 s");
    }

    #[tokio::test]
    async fn a_first_list_delivers_what_was_created_after_listen_was_called() {
        let registry = Registry::new();
        let (a, b) = (PrivateKey::generate(), PrivateKey::generate());
        let count = Arc::new(AtomicU64::new(0));
        let c = count.clone();
        registry.add(
            &b,
            Sender::Any,
            Arc::new(move |_: &crate::Delivery| {
                c.fetch_add(1, Relaxed);
            }),
        );
        let shared = Shared::for_test(registry.clone(), Duration::from_secs(60));
        {
            let mut state = shared.state.lock();
            state.wanted.insert(b.public_key());
            // listen was called 10 s ago.
            state
                .rules
                .listening(b.public_key(), SystemTime::now() - Duration::from_secs(10));
        }
        // Created before the call, beyond the allowance: stale.
        let beyond = Duration::from_secs(10) + CLOCK_SKEW + Duration::from_secs(1);
        shared.handle(&object(&a, &b, beyond, "old"));
        // Within the allowance, and after the call: delivered.
        shared.handle(&object(&a, &b, Duration::from_secs(11), "skewed"));
        shared.handle(&object(&a, &b, Duration::from_secs(5), "new"));
        shared.handle(&object(&a, &b, Duration::from_secs(5), "new"));
        let stats = &shared.counters;
        assert_eq!(stats.stale.load(Relaxed), 1);
        assert_eq!(stats.caught_up.load(Relaxed), 2);
        assert_eq!(stats.seen_again.load(Relaxed), 1);
        assert_eq!(stats.handed_over.load(Relaxed), 2);
        flush(&registry).await;
        assert_eq!(count.load(Relaxed), 2);
        // Once listed, the key is live: everything not seen is delivered.
        shared.listed(&BTreeSet::from([b.public_key()]));
        shared.handle(&object(&a, &b, Duration::from_secs(30), "relisted"));
        flush(&registry).await;
        assert_eq!(count.load(Relaxed), 3);
        assert_eq!(stats.stale.load(Relaxed), 1);
        // Expired: not delivered.
        shared.handle(&object(&a, &b, Duration::from_secs(61), "expired"));
        assert_eq!(stats.too_old.load(Relaxed), 1);
        // Not an envelope: counted once, also when seen again.
        let mut junk = object(&a, &b, Duration::ZERO, "junk");
        junk.spec.recipient = "AAAA".into();
        shared.handle(&junk);
        shared.handle(&junk);
        assert_eq!(stats.invalid.load(Relaxed), 1);
        flush(&registry).await;
        assert_eq!(count.load(Relaxed), 3);
        assert_eq!(stats.handed_over.load(Relaxed), 3);
    }
}
