//! The conformance suite that every backend runs (feature `test-util`).
//!
//! `n` peers, each with a backend of its own, each subscribed to every other
//! peer with two specific handlers and to anyone with two wildcard handlers.
//! Every ordered pair exchanges one message that names its sender and
//! recipient; every handler must receive exactly the messages meant for it:
//! nothing lost, duplicated or crossed. Then specific handlers are removed
//! and the suite checks that they receive nothing more while wildcard handlers
//! still do, that `first`/`last` are reported as docs/PROTOCOL.md §6 says, and that
//! nothing arrives once every handler is unsubscribed.
//!
//! [`subscribe_race`] checks, on a backend whose medium is wrapped in
//! [`Gated`], that envelopes racing a subscription are delivered exactly
//! once: one that arrives while the subscription's listen is still under way,
//! and one published right after `subscribe` returned. It also checks that a
//! subscribe dropped midway leaves no handler behind and stops the medium.
//!
//! The suite panics with a message that says what went wrong.

use std::{collections::BTreeMap, future::Future, sync::Arc, time::Duration};

use async_trait::async_trait;
use parking_lot::Mutex;
use tokio::sync::watch;

use crate::{
    Backend, BackendError, Delivery, Handler, Key, KeyPair, PrivateKey, Published, Sender,
    Transport,
    backend::SignalingBackend,
    proto::{
        epdisc::Credentials,
        signaling::{BackendType, Envelope, Message},
    },
};

/// A handler that records what it receives.
#[derive(Default)]
pub struct Recorder {
    deliveries: Mutex<Vec<Delivery>>,
}

impl Recorder {
    /// What was received so far.
    pub fn deliveries(&self) -> Vec<Delivery> {
        self.deliveries.lock().clone()
    }

    /// How many messages were received.
    pub fn len(&self) -> usize {
        self.deliveries.lock().len()
    }

    /// True if nothing was received.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Handler for Recorder {
    fn on_message(&self, delivery: &Delivery) {
        self.deliveries.lock().push(delivery.clone());
    }
}

/// Options of a conformance run.
#[derive(Debug, Clone)]
pub struct Options {
    /// Number of peers.
    pub peers: usize,
    /// How long to wait for the expected deliveries.
    pub timeout: Duration,
    /// How long to go on listening after everything expected arrived, to catch
    /// duplicates and strays.
    pub settle: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            peers: 10,
            timeout: Duration::from_secs(30),
            settle: Duration::from_millis(300),
        }
    }
}

/// The message peer `from` sends to peer `to` in `round`.
pub fn message_for(round: u32, from: &Key, to: &Key) -> Message {
    Message {
        credentials: Some(Credentials {
            ufrag: format!("round-{round}"),
            pwd: format!("{from}>{to}"),
            need_creds: false,
        }),
        ..Default::default()
    }
}

struct Peer {
    private: PrivateKey,
    public: Key,
    backend: Arc<dyn Backend>,
    /// By sender: two handlers each.
    specific: BTreeMap<Key, [Arc<Recorder>; 2]>,
    wildcard: [Arc<Recorder>; 2],
}

fn as_handler(r: &Arc<Recorder>) -> Arc<dyn Handler> {
    r.clone()
}

/// Runs the suite; `make_backend(i)` gives peer `i` its own backend.
pub async fn run<F, Fut, E>(options: Options, mut make_backend: F)
where
    F: FnMut(usize) -> Fut,
    Fut: Future<Output = Result<Arc<dyn Backend>, E>>,
    E: std::fmt::Display,
{
    let n = options.peers;
    assert!(n >= 2, "the conformance suite needs at least two peers");
    let mut peers = Vec::with_capacity(n);
    for i in 0..n {
        let backend = match make_backend(i).await {
            Ok(backend) => backend,
            Err(e) => panic!("peer {i}: backend could not be made: {e}"),
        };
        let private = PrivateKey::generate();
        peers.push(Peer {
            public: private.public_key(),
            private,
            backend,
            specific: BTreeMap::new(),
            wildcard: Default::default(),
        });
    }
    let publics: Vec<Key> = peers.iter().map(|p| p.public).collect();

    // Subscribe: the first subscription of a key reports `first`, no other does.
    for (i, peer) in peers.iter_mut().enumerate() {
        let mut first_seen = false;
        for (j, their) in publics.iter().enumerate() {
            if i == j {
                continue;
            }
            let handlers: [Arc<Recorder>; 2] = Default::default();
            for h in &handlers {
                let first = peer
                    .backend
                    .subscribe(&peer.private, Sender::Key(*their), as_handler(h))
                    .await
                    .unwrap_or_else(|e| panic!("peer {i}: subscribe to peer {j}: {e}"));
                assert_eq!(
                    first, !first_seen,
                    "peer {i}: `first` of the subscription to peer {j}"
                );
                first_seen = true;
            }
            peer.specific.insert(*their, handlers);
        }
        for h in &peer.wildcard {
            let first = peer
                .backend
                .subscribe(&peer.private, Sender::Any, as_handler(h))
                .await
                .unwrap_or_else(|e| panic!("peer {i}: wildcard subscribe: {e}"));
            assert!(!first, "peer {i}: wildcard subscription reported `first`");
        }
        // The same handler again changes nothing.
        let again = peer
            .backend
            .subscribe(&peer.private, Sender::Any, as_handler(&peer.wildcard[0]))
            .await
            .unwrap_or_else(|e| panic!("peer {i}: repeated subscribe: {e}"));
        assert!(!again);
    }

    // Round 1: every ordered pair.
    for (i, peer) in peers.iter().enumerate() {
        for (j, their) in publics.iter().enumerate() {
            if i != j {
                peer.backend
                    .publish(
                        &KeyPair::new(peer.private.clone(), *their),
                        &message_for(1, &peer.public, their),
                    )
                    .await
                    .unwrap_or_else(|e| panic!("peer {i}: publish to peer {j}: {e}"));
            }
        }
    }
    let expected_total = n * (n - 1) * 4;
    wait_for(&peers, expected_total, &options).await;

    for (i, peer) in peers.iter().enumerate() {
        for (sender, handlers) in &peer.specific {
            for (k, h) in handlers.iter().enumerate() {
                let got = h.deliveries();
                assert_eq!(
                    got.len(),
                    1,
                    "peer {i}: specific handler {k} for {sender} got {} messages, expected 1",
                    got.len()
                );
                check(&got[0], 1, sender, &peer.public, i);
            }
        }
        for (k, h) in peer.wildcard.iter().enumerate() {
            let got = h.deliveries();
            assert_eq!(
                got.len(),
                n - 1,
                "peer {i}: wildcard handler {k} got {} messages, expected {}",
                got.len(),
                n - 1
            );
            let mut senders: Vec<Key> = got.iter().map(|d| d.sender).collect();
            senders.sort();
            senders.dedup();
            assert_eq!(
                senders.len(),
                n - 1,
                "peer {i}: wildcard handler {k} got duplicates"
            );
            for d in &got {
                assert_ne!(d.sender, peer.public, "peer {i} received its own message");
                check(d, 1, &d.sender, &peer.public, i);
            }
        }
    }

    // Unsubscribe the specific handlers for the next peer: `last` only on the second.
    for (i, peer) in peers.iter().enumerate() {
        let next = publics[(i + 1) % n];
        let handlers = &peer.specific[&next];
        let last = peer
            .backend
            .unsubscribe(&peer.private, Sender::Key(next), &as_handler(&handlers[0]))
            .await;
        assert!(
            !last.unwrap_or_else(|e| panic!("peer {i}: unsubscribe: {e}")),
            "peer {i}: `last` with a handler left"
        );
        let last = peer
            .backend
            .unsubscribe(&peer.private, Sender::Key(next), &as_handler(&handlers[1]))
            .await;
        assert!(
            last.unwrap_or_else(|e| panic!("peer {i}: unsubscribe: {e}")),
            "peer {i}: no `last` after the last handler"
        );
    }

    // Round 2: each peer sends to the previous one, whose specific handlers for it are gone.
    for (i, peer) in peers.iter().enumerate() {
        let to = publics[(i + n - 1) % n];
        peer.backend
            .publish(
                &KeyPair::new(peer.private.clone(), to),
                &message_for(2, &peer.public, &to),
            )
            .await
            .unwrap_or_else(|e| panic!("peer {i}: round 2 publish: {e}"));
    }
    wait_for(&peers, expected_total + n * 2, &options).await;
    for (i, peer) in peers.iter().enumerate() {
        let next = publics[(i + 1) % n];
        for h in &peer.specific[&next] {
            assert_eq!(
                h.len(),
                1,
                "peer {i}: an unsubscribed handler received a message"
            );
        }
        for h in &peer.wildcard {
            let got = h.deliveries();
            assert_eq!(got.len(), n, "peer {i}: wildcard handler after round 2");
            let round2: Vec<&Delivery> = got.iter().filter(|d| ufrag(d) == "round-2").collect();
            assert_eq!(round2.len(), 1, "peer {i}: round 2 messages");
            check(round2[0], 2, &next, &peer.public, i);
        }
    }

    // Unsubscribe everything: `last` with the second handler of each sender.
    for (i, peer) in peers.iter().enumerate() {
        for (their, handlers) in &peer.specific {
            for (k, h) in handlers.iter().enumerate() {
                let last = peer
                    .backend
                    .unsubscribe(&peer.private, Sender::Key(*their), &as_handler(h))
                    .await
                    .unwrap_or_else(|e| panic!("peer {i}: unsubscribe: {e}"));
                // The handlers for the next peer are gone already: removing
                // them again leaves none for that sender.
                let expected = k == 1 || *their == publics[(i + 1) % n];
                assert_eq!(last, expected, "peer {i}: `last` of specific handler {k}");
            }
        }
        for (k, h) in peer.wildcard.iter().enumerate() {
            let last = peer
                .backend
                .unsubscribe(&peer.private, Sender::Any, &as_handler(h))
                .await
                .unwrap_or_else(|e| panic!("peer {i}: unsubscribe: {e}"));
            assert_eq!(last, k == 1, "peer {i}: `last` of wildcard handler {k}");
        }
    }

    // Round 3: nothing arrives any more.
    for (i, peer) in peers.iter().enumerate() {
        let to = publics[(i + 1) % n];
        peer.backend
            .publish(
                &KeyPair::new(peer.private.clone(), to),
                &message_for(3, &peer.public, &to),
            )
            .await
            .unwrap_or_else(|e| panic!("peer {i}: round 3 publish: {e}"));
    }
    tokio::time::sleep(options.settle).await;
    assert_eq!(
        total(&peers),
        expected_total + n * 2,
        "messages arrived after every handler was unsubscribed"
    );

    for peer in &peers {
        peer.backend
            .close()
            .await
            .unwrap_or_else(|e| panic!("close failed: {e}"));
    }
}

fn ufrag(d: &Delivery) -> &str {
    d.message
        .credentials
        .as_ref()
        .map(|c| c.ufrag.as_str())
        .unwrap_or("")
}

fn check(d: &Delivery, round: u32, sender: &Key, recipient: &Key, i: usize) {
    assert_eq!(&d.sender, sender, "peer {i}: sender");
    assert_eq!(&d.recipient, recipient, "peer {i}: recipient");
    assert_eq!(
        d.message,
        message_for(round, sender, recipient),
        "peer {i}: message content (crossed messages?)"
    );
}

fn total(peers: &[Peer]) -> usize {
    peers
        .iter()
        .map(|p| {
            p.specific
                .values()
                .flatten()
                .map(|h| h.len())
                .sum::<usize>()
                + p.wildcard.iter().map(|h| h.len()).sum::<usize>()
        })
        .sum()
}

async fn wait_for(peers: &[Peer], expected: usize, options: &Options) {
    let deadline = tokio::time::Instant::now() + options.timeout;
    while total(peers) < expected {
        if tokio::time::Instant::now() > deadline {
            panic!(
                "only {} of {expected} deliveries arrived within {:?}",
                total(peers),
                options.timeout
            );
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::sleep(options.settle).await;
    let got = total(peers);
    assert_eq!(
        got, expected,
        "more deliveries than expected: duplicates or strays"
    );
}

// ------------------------------------------------------- racing subscribe --

/// A transport whose `listen` waits, once the medium underneath listens, until
/// its [`Gate`] is open: it keeps a subscription in the state where its medium
/// receives envelopes and `subscribe` has not returned yet. Made by [`gated`].
pub struct Gated<T> {
    inner: T,
    gate: Gate,
}

/// Controls the [`Gated`] transport it was made with, and tells what it saw.
#[derive(Clone)]
pub struct Gate {
    state: Arc<GateState>,
}

struct GateState {
    open: watch::Sender<bool>,
    /// How many listens have reached the gate.
    reached: watch::Sender<u64>,
    /// The keys unlistened, in order, each once the medium underneath was done.
    unlistened: watch::Sender<Vec<Key>>,
}

/// `inner` behind a gate, which starts open.
pub fn gated<T: Transport>(inner: T) -> (Gated<T>, Gate) {
    let gate = Gate {
        state: Arc::new(GateState {
            open: watch::Sender::new(true),
            reached: watch::Sender::new(0),
            unlistened: watch::Sender::new(Vec::new()),
        }),
    };
    (
        Gated {
            inner,
            gate: gate.clone(),
        },
        gate,
    )
}

impl Gate {
    /// Lets waiting and later listens return.
    pub fn open(&self) {
        self.state.open.send_replace(true);
    }

    /// Makes later listens wait after the medium listens.
    pub fn close(&self) {
        self.state.open.send_replace(false);
    }

    /// How many listens have reached the gate so far.
    pub fn reached(&self) -> u64 {
        *self.state.reached.borrow()
    }

    /// Waits until `n` listens have reached the gate.
    pub async fn wait_reached(&self, n: u64) {
        let mut reached = self.state.reached.subscribe();
        // The sender lives in `self`: the wait ends only when `n` is reached.
        let _ = reached.wait_for(|r| *r >= n).await;
    }

    /// The keys unlistened so far.
    pub fn unlistened(&self) -> Vec<Key> {
        self.state.unlistened.borrow().clone()
    }

    /// Waits until `key` has been unlistened.
    pub async fn wait_unlistened(&self, key: Key) {
        let mut unlistened = self.state.unlistened.subscribe();
        let _ = unlistened.wait_for(|keys| keys.contains(&key)).await;
    }
}

#[async_trait]
impl<T: Transport> Transport for Gated<T> {
    async fn send(&self, envelope: &Envelope) -> Result<Published, BackendError> {
        self.inner.send(envelope).await
    }

    async fn send_as(
        &self,
        envelope: &Envelope,
        ours: &PrivateKey,
    ) -> Result<Published, BackendError> {
        self.inner.send_as(envelope, ours).await
    }

    async fn listen(&self, key: Key) -> Result<(), BackendError> {
        self.inner.listen(key).await?;
        let mut open = self.gate.state.open.subscribe();
        self.gate.state.reached.send_modify(|r| *r += 1);
        let _ = open.wait_for(|open| *open).await;
        Ok(())
    }

    async fn unlisten(&self, key: Key) -> Result<(), BackendError> {
        let result = self.inner.unlisten(key).await;
        self.gate
            .state
            .unlistened
            .send_modify(|keys| keys.push(key));
        result
    }

    fn backend_type(&self) -> BackendType {
        self.inner.backend_type()
    }

    async fn close(&self) -> Result<(), BackendError> {
        self.inner.close().await
    }

    fn name(&self) -> &str {
        self.inner.name()
    }
}

/// Awaits `future`, panicking with `what` after `limit`.
async fn within<T>(what: &str, limit: Duration, future: impl Future<Output = T>) -> T {
    match tokio::time::timeout(limit, future).await {
        Ok(out) => out,
        Err(_) => panic!("subscribe race: {what}: nothing within {limit:?}"),
    }
}

/// Waits until `recorder` holds `n` deliveries, then for `options.settle`,
/// and checks that no more came.
async fn exactly(what: &str, recorder: &Recorder, n: usize, options: &Options) {
    within(what, options.timeout, async {
        while recorder.len() < n {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    tokio::time::sleep(options.settle).await;
    assert_eq!(
        recorder.len(),
        n,
        "subscribe race: {what}: more deliveries than sent: {:?}",
        recorder.deliveries()
    );
}

/// Closes `gate`, starts a subscribe of `key` (to `recorder`) on `backend`
/// and returns it once it reached the medium, where the gate holds it.
async fn subscribe_held_at_gate(
    backend: &Arc<SignalingBackend>,
    gate: &Gate,
    key: PrivateKey,
    recorder: &Arc<Recorder>,
    options: &Options,
) -> tokio::task::JoinHandle<Result<bool, BackendError>> {
    gate.close();
    let reached = gate.reached();
    let subscribe = tokio::spawn({
        let backend = backend.clone();
        let handler = as_handler(recorder);
        async move { backend.subscribe(&key, Sender::Any, handler).await }
    });
    within(
        "the medium listens",
        options.timeout,
        gate.wait_reached(reached + 1),
    )
    .await;
    subscribe
}

/// Checks that a subscription misses nothing that races it and that one
/// dropped midway leaves nothing behind, on `backend`, whose transport is (or
/// holds) the [`Gated`] transport of `gate`. `publisher` is another backend on
/// the same medium.
///
/// 1. With the gate closed, `subscribe` runs until the medium listens; an
///    envelope published then reaches the handler before `subscribe` returns
///    (the handler is registered before the medium listens).
/// 2. The gate opens, `subscribe` returns `first`, and an envelope published
///    right after arrives. Each of the two arrives once; the registry dropped
///    none for want of a handler.
/// 3. A `subscribe` of another key, dropped while the medium listens: its
///    handler is gone from the registry and the medium unlistens the key.
///    Subscribing the key again with another handler works, and an envelope
///    to it reaches that handler only.
pub async fn subscribe_race(
    backend: Arc<SignalingBackend>,
    gate: Gate,
    publisher: Arc<dyn Backend>,
    options: &Options,
) {
    let sender = PrivateKey::generate();
    let (b, c) = (PrivateKey::generate(), PrivateKey::generate());
    let send = |round: u32, to: &PrivateKey| {
        let publisher = publisher.clone();
        let pair = KeyPair::new(sender.clone(), to.public_key());
        async move {
            let message = message_for(round, &pair.ours.public_key(), &pair.theirs);
            within(
                "publish",
                options.timeout,
                publisher.publish(&pair, &message),
            )
            .await
            .unwrap_or_else(|e| panic!("subscribe race: publish round {round}: {e}"));
        }
    };

    // 1. An envelope while the medium listens and subscribe has not returned.
    let to_b = Arc::new(Recorder::default());
    let subscribe = subscribe_held_at_gate(&backend, &gate, b.clone(), &to_b, options).await;
    send(1, &b).await;
    within(
        "the envelope sent while subscribe waits for the medium",
        options.timeout,
        async {
            while to_b.is_empty() {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        },
    )
    .await;
    assert!(
        !subscribe.is_finished(),
        "subscribe race: subscribe returned before the gate opened"
    );

    // 2. Right after subscribe returned.
    gate.open();
    let first = within("subscribe", options.timeout, subscribe)
        .await
        .unwrap_or_else(|e| panic!("subscribe race: subscribe task: {e}"))
        .unwrap_or_else(|e| panic!("subscribe race: subscribe: {e}"));
    assert!(first, "subscribe race: the first subscription of a key");
    send(2, &b).await;
    exactly("two envelopes to b", &to_b, 2, options).await;
    let mut got = to_b.deliveries();
    got.sort_by_key(|d| ufrag(d).to_string());
    for (d, round) in got.iter().zip([1, 2]) {
        check(d, round, &sender.public_key(), &b.public_key(), 0);
    }
    assert_eq!(
        backend.registry().stats().dropped_no_subscriber,
        0,
        "subscribe race: envelopes dropped for want of a handler"
    );

    // 3. A subscribe dropped while the medium listens.
    let dropped = Arc::new(Recorder::default());
    let subscribe = subscribe_held_at_gate(&backend, &gate, c.clone(), &dropped, options).await;
    subscribe.abort();
    let aborted = within("the dropped subscribe", options.timeout, subscribe).await;
    assert!(
        aborted.as_ref().is_err_and(|e| e.is_cancelled()),
        "subscribe race: the subscribe was not dropped midway: {aborted:?}"
    );
    gate.open();
    within(
        "the unlisten after the dropped subscribe",
        options.timeout,
        gate.wait_unlistened(c.public_key()),
    )
    .await;
    assert!(
        !backend.registry().has_key(&c.public_key()),
        "subscribe race: the handler of a dropped subscribe stayed"
    );
    let again = Arc::new(Recorder::default());
    let first = within(
        "subscribe again",
        options.timeout,
        backend.subscribe(&c, Sender::Any, as_handler(&again)),
    )
    .await
    .unwrap_or_else(|e| panic!("subscribe race: subscribe after a dropped one: {e}"));
    assert!(first, "subscribe race: `first` after a dropped subscribe");
    send(3, &c).await;
    exactly("the envelope to c", &again, 1, options).await;
    check(
        &again.deliveries()[0],
        3,
        &sender.public_key(),
        &c.public_key(),
        0,
    );
    assert!(
        dropped.is_empty(),
        "subscribe race: the handler of a dropped subscribe got {:?}",
        dropped.deliveries()
    );
    within("close", options.timeout, backend.close())
        .await
        .unwrap_or_else(|e| panic!("subscribe race: close: {e}"));
}
