//! The conformance suite that every backend runs (feature `test-util`).
//!
//! `n` peers, each with a backend of its own, each subscribed to every other
//! peer with two specific handlers and to anyone with two wildcard handlers.
//! Every ordered pair exchanges one message that names its sender and
//! recipient; every handler must receive exactly the messages meant for it:
//! nothing lost, duplicated or crossed. Then specific handlers are removed
//! and the suite checks that they receive nothing more while wildcard handlers
//! still do, that `first`/`last` are reported as SPEC §6 says, and that
//! nothing arrives once every handler is unsubscribed.
//!
//! The suite panics with a message that says what went wrong.

use std::{
    collections::BTreeMap,
    future::Future,
    sync::{Arc, Mutex},
    time::Duration,
};

use crate::{
    Backend, Delivery, Handler, Key, KeyPair,
    proto::{epdisc::Credentials, signaling::Message},
};

/// A handler that records what it receives.
#[derive(Default)]
pub struct Recorder {
    deliveries: Mutex<Vec<Delivery>>,
}

impl Recorder {
    /// What was received so far.
    pub fn deliveries(&self) -> Vec<Delivery> {
        self.deliveries
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// How many messages were received.
    pub fn len(&self) -> usize {
        self.deliveries
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .len()
    }

    /// True if nothing was received.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Handler for Recorder {
    fn on_message(&self, delivery: &Delivery) {
        self.deliveries
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(delivery.clone());
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
    private: Key,
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
        let private = Key::generate();
        peers.push(Peer {
            private,
            public: private.public_key(),
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
                    .subscribe(&KeyPair::new(peer.private, *their), as_handler(h))
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
                .subscribe(&KeyPair::new(peer.private, Key::ZERO), as_handler(h))
                .await
                .unwrap_or_else(|e| panic!("peer {i}: wildcard subscribe: {e}"));
            assert!(!first, "peer {i}: wildcard subscription reported `first`");
        }
        // The same handler again changes nothing.
        let again = peer
            .backend
            .subscribe(
                &KeyPair::new(peer.private, Key::ZERO),
                as_handler(&peer.wildcard[0]),
            )
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
                        &KeyPair::new(peer.private, *their),
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
        let pair = KeyPair::new(peer.private, next);
        let last = peer
            .backend
            .unsubscribe(&pair, &as_handler(&handlers[0]))
            .await;
        assert!(
            !last.unwrap_or_else(|e| panic!("peer {i}: unsubscribe: {e}")),
            "peer {i}: `last` with a handler left"
        );
        let last = peer
            .backend
            .unsubscribe(&pair, &as_handler(&handlers[1]))
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
                &KeyPair::new(peer.private, to),
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
            let pair = KeyPair::new(peer.private, *their);
            for (k, h) in handlers.iter().enumerate() {
                let last = peer
                    .backend
                    .unsubscribe(&pair, &as_handler(h))
                    .await
                    .unwrap_or_else(|e| panic!("peer {i}: unsubscribe: {e}"));
                // The handlers for the next peer are gone already: removing
                // them again leaves none for that sender.
                let expected = k == 1 || *their == publics[(i + 1) % n];
                assert_eq!(last, expected, "peer {i}: `last` of specific handler {k}");
            }
        }
        let pair = KeyPair::new(peer.private, Key::ZERO);
        for (k, h) in peer.wildcard.iter().enumerate() {
            let last = peer
                .backend
                .unsubscribe(&pair, &as_handler(h))
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
                &KeyPair::new(peer.private, to),
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
