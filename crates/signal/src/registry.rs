//! The subscription registry that every backend shares: it holds the handlers of
//! each own key, opens the envelopes a transport receives and calls the handlers.

use std::{
    collections::{HashMap, HashSet, VecDeque, hash_map::Entry},
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
};

use tokio::sync::mpsc;

use crate::{
    Key, KeyPair, NONCE_LEN, SharedKeyCache,
    proto::signaling::{Envelope, Message},
};

/// A message that arrived, with the keys it travelled between.
#[derive(Debug, Clone, PartialEq)]
pub struct Delivery {
    /// The sender's public key (authenticated by the box).
    pub sender: Key,
    /// Our public key the envelope was addressed to.
    pub recipient: Key,
    /// The opened message.
    pub message: Message,
}

/// Receives the messages of a subscription.
///
/// Handlers are called on the task that received the envelope: they must return
/// quickly and must not block. [`ChannelHandler`] hands messages to a task.
/// A handler is identified by its `Arc`: subscribing the same `Arc` twice
/// delivers once.
pub trait Handler: Send + Sync + 'static {
    /// Called once for every message delivered to this handler.
    fn on_message(&self, delivery: &Delivery);
}

impl<F> Handler for F
where
    F: Fn(&Delivery) + Send + Sync + 'static,
{
    fn on_message(&self, delivery: &Delivery) {
        self(delivery)
    }
}

/// A handler that forwards deliveries into a bounded channel. When the receiver
/// falls behind, new deliveries are dropped and counted.
pub struct ChannelHandler {
    tx: mpsc::Sender<Delivery>,
    dropped: AtomicU64,
}

impl ChannelHandler {
    /// A handler with a channel of `capacity` deliveries (at least 1).
    pub fn new(capacity: usize) -> (Arc<Self>, mpsc::Receiver<Delivery>) {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        let handler = Arc::new(ChannelHandler {
            tx,
            dropped: AtomicU64::new(0),
        });
        (handler, rx)
    }

    /// How many deliveries were dropped because the channel was full or closed.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Relaxed)
    }
}

impl Handler for ChannelHandler {
    fn on_message(&self, delivery: &Delivery) {
        if self.tx.try_send(delivery.clone()).is_err() {
            let dropped = self.dropped.fetch_add(1, Relaxed) + 1;
            tracing::warn!(sender = %delivery.sender, dropped, "handler channel full or closed: message dropped");
        }
    }
}

/// Counters of a [`Registry`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RegistryStats {
    /// Envelopes opened and handed to at least one handler.
    pub opened: u64,
    /// Handler calls made.
    pub delivered: u64,
    /// Envelopes dropped because they did not open (forged, corrupt, malformed).
    pub dropped_invalid: u64,
    /// Envelopes dropped because no handler wanted them.
    pub dropped_no_subscriber: u64,
    /// Envelopes dropped because the same envelope had arrived already (through
    /// another backend, or again after a reconnect).
    pub dropped_duplicate: u64,
}

/// How many nonces of recently delivered envelopes are remembered to drop copies.
const RECENT_NONCES: usize = 4096;

type HandlerRef = Arc<dyn Handler>;

struct OwnKey {
    private: Key,
    /// By sender; [`Key::ZERO`] holds the handlers for any sender.
    handlers: HashMap<Key, Vec<HandlerRef>>,
}

/// An envelope's identity for duplicate suppression: sender and nonce.
type EnvelopeId = (Key, [u8; NONCE_LEN]);

#[derive(Default)]
struct Recent {
    set: HashSet<EnvelopeId>,
    order: VecDeque<EnvelopeId>,
}

impl Recent {
    fn contains(&self, id: &EnvelopeId) -> bool {
        self.set.contains(id)
    }

    /// Remembers an envelope; false if it was known already.
    fn insert(&mut self, id: EnvelopeId) -> bool {
        if !self.set.insert(id) {
            return false;
        }
        self.order.push_back(id);
        if self.order.len() > RECENT_NONCES
            && let Some(old) = self.order.pop_front()
        {
            self.set.remove(&old);
        }
        true
    }
}

/// The outcome of [`Registry::remove`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Removal {
    /// No handler is left for that sender (SPEC §6's `last`).
    pub last_for_sender: bool,
    /// No handler at all is left for our key: the transport may stop listening.
    pub last_for_key: bool,
}

/// Handlers by own key and sender; opens envelopes and calls the handlers.
#[derive(Default)]
pub struct Registry {
    keys: Mutex<HashMap<Key, OwnKey>>,
    recent: Mutex<Recent>,
    opened: AtomicU64,
    delivered: AtomicU64,
    dropped_invalid: AtomicU64,
    dropped_no_subscriber: AtomicU64,
    dropped_duplicate: AtomicU64,
    invalid_log: LogLimiter,
}

/// Lets a log line through at most once per interval, so that input from
/// outside cannot flood the log; counters keep the totals.
#[derive(Debug, Default)]
pub(crate) struct LogLimiter {
    /// Milliseconds since [`log_epoch`] of the last line let through, plus one.
    last: AtomicU64,
}

/// Interval of [`LogLimiter`].
const LOG_INTERVAL_MS: u64 = 10_000;

fn log_epoch() -> std::time::Instant {
    static EPOCH: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    *EPOCH.get_or_init(std::time::Instant::now)
}

impl LogLimiter {
    /// True for the first call and then at most once per interval.
    pub(crate) fn allow(&self) -> bool {
        let now = log_epoch().elapsed().as_millis() as u64 + 1;
        let last = self.last.load(Relaxed);
        if last != 0 && now < last + LOG_INTERVAL_MS {
            return false;
        }
        self.last
            .compare_exchange(last, now, Relaxed, Relaxed)
            .is_ok()
    }
}

fn same_handler(a: &HandlerRef, b: &HandlerRef) -> bool {
    // Compare the data pointers only: vtable pointers of one type may differ.
    std::ptr::addr_eq(Arc::as_ptr(a), Arc::as_ptr(b))
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every critical section leaves the maps consistent: go on after a panic elsewhere.
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Arc<Self> {
        Arc::new(Registry::default())
    }

    /// Adds `handler` for messages to `public(pair.ours)` from `pair.theirs` (any
    /// sender if that is the zero key). Returns true if this is the first handler
    /// of our key. Adding a handler that is there already changes nothing.
    pub fn add(&self, pair: &KeyPair, handler: HandlerRef) -> bool {
        let public = SharedKeyCache::global().public_key(&pair.ours);
        let mut keys = lock(&self.keys);
        let (own, first) = match keys.entry(public) {
            Entry::Occupied(e) => (e.into_mut(), false),
            Entry::Vacant(e) => (
                e.insert(OwnKey {
                    private: pair.ours,
                    handlers: HashMap::new(),
                }),
                true,
            ),
        };
        let list = own.handlers.entry(pair.theirs).or_default();
        if !list.iter().any(|h| same_handler(h, &handler)) {
            list.push(handler);
        }
        first
    }

    /// Removes `handler` for `pair`.
    pub fn remove(&self, pair: &KeyPair, handler: &HandlerRef) -> Removal {
        let public = SharedKeyCache::global().public_key(&pair.ours);
        let mut keys = lock(&self.keys);
        let Some(own) = keys.get_mut(&public) else {
            return Removal {
                last_for_sender: true,
                last_for_key: false,
            };
        };
        let mut last_for_sender = true;
        if let Some(list) = own.handlers.get_mut(&pair.theirs) {
            list.retain(|h| !same_handler(h, handler));
            last_for_sender = list.is_empty();
            if last_for_sender {
                own.handlers.remove(&pair.theirs);
            }
        }
        let last_for_key = own.handlers.is_empty();
        if last_for_key {
            keys.remove(&public);
        }
        Removal {
            last_for_sender,
            last_for_key,
        }
    }

    /// Removes every handler (and the private keys they came with); for a
    /// backend that closes, so that its handlers see the end.
    pub fn clear(&self) {
        let keys = std::mem::take(&mut *lock(&self.keys));
        // Dropped outside the lock: a handler's drop may do anything.
        drop(keys);
    }

    /// True if our key `public` has a handler.
    pub fn has_key(&self, public: &Key) -> bool {
        lock(&self.keys).contains_key(public)
    }

    /// The own public keys that have handlers.
    pub fn keys(&self) -> Vec<Key> {
        lock(&self.keys).keys().copied().collect()
    }

    /// Opens `envelope` and calls every handler that wants it, each once.
    /// Envelopes that do not open, that nobody wants or that arrived already are
    /// dropped and counted. Returns the number of handlers called.
    pub fn deliver(&self, envelope: &Envelope) -> usize {
        let Ok(recipient) = envelope.recipient_key() else {
            self.drop_invalid(envelope, "recipient is not a 32-byte key");
            return 0;
        };
        let Some(private) = lock(&self.keys).get(&recipient).map(|own| own.private) else {
            self.dropped_no_subscriber.fetch_add(1, Relaxed);
            tracing::debug!(%recipient, "envelope for a key without handlers dropped");
            return 0;
        };
        let sender = envelope.sender_key().unwrap_or_default();
        let id = envelope
            .contents
            .as_ref()
            .and_then(|c| <[u8; NONCE_LEN]>::try_from(c.nonce.as_slice()).ok())
            .map(|nonce| (sender, nonce));
        if id.is_some_and(|id| lock(&self.recent).contains(&id)) {
            self.dropped_duplicate.fetch_add(1, Relaxed);
            return 0;
        }
        let message = match envelope.open(&private) {
            Ok(message) => message,
            Err(e) => {
                self.drop_invalid(envelope, &e.to_string());
                return 0;
            }
        };
        // Remember only authenticated envelopes, so that a forged copy cannot
        // suppress the real one.
        if let Some(id) = id
            && !lock(&self.recent).insert(id)
        {
            self.dropped_duplicate.fetch_add(1, Relaxed);
            return 0;
        }
        let delivery = Delivery {
            sender,
            recipient,
            message,
        };
        let handlers = self.handlers_for(&recipient, &delivery.sender);
        if handlers.is_empty() {
            self.dropped_no_subscriber.fetch_add(1, Relaxed);
            tracing::debug!(sender = %delivery.sender, %recipient, "no handler for this sender: dropped");
            return 0;
        }
        self.opened.fetch_add(1, Relaxed);
        for handler in &handlers {
            handler.on_message(&delivery);
        }
        self.delivered.fetch_add(handlers.len() as u64, Relaxed);
        handlers.len()
    }

    fn handlers_for(&self, recipient: &Key, sender: &Key) -> Vec<HandlerRef> {
        let keys = lock(&self.keys);
        let Some(own) = keys.get(recipient) else {
            return Vec::new();
        };
        let mut out: Vec<HandlerRef> = Vec::new();
        for list in [own.handlers.get(sender), own.handlers.get(&Key::ZERO)]
            .into_iter()
            .flatten()
        {
            for handler in list {
                if !out.iter().any(|h| same_handler(h, handler)) {
                    out.push(handler.clone());
                }
            }
        }
        out
    }

    fn drop_invalid(&self, envelope: &Envelope, why: &str) {
        let total = self.dropped_invalid.fetch_add(1, Relaxed) + 1;
        // Anyone who can reach a medium can send these: log some, count all.
        if !self.invalid_log.allow() {
            return;
        }
        let sender = Key::from_slice(&envelope.sender)
            .map(|k| k.to_string())
            .unwrap_or_else(|_| format!("<{} bytes>", envelope.sender.len()));
        tracing::warn!(%sender, total, "envelope dropped: {why}");
    }

    /// The counters.
    pub fn stats(&self) -> RegistryStats {
        RegistryStats {
            opened: self.opened.load(Relaxed),
            delivered: self.delivered.load(Relaxed),
            dropped_invalid: self.dropped_invalid.load(Relaxed),
            dropped_no_subscriber: self.dropped_no_subscriber.load(Relaxed),
            dropped_duplicate: self.dropped_duplicate.load(Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use super::*;
    use crate::proto::epdisc::Credentials;

    fn message(ufrag: &str) -> Message {
        Message {
            credentials: Some(Credentials {
                ufrag: ufrag.into(),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn counter() -> (Arc<AtomicUsize>, HandlerRef) {
        let count = Arc::new(AtomicUsize::new(0));
        let c = count.clone();
        (
            count,
            Arc::new(move |_: &Delivery| {
                c.fetch_add(1, Relaxed);
            }),
        )
    }

    #[test]
    fn first_last_and_dedup_of_handlers() {
        let registry = Registry::new();
        let (a, b) = (Key::generate(), Key::generate());
        let pair = KeyPair::new(b, a.public_key());
        let (count, handler) = counter();
        assert!(registry.add(&pair, handler.clone()));
        assert!(!registry.add(&pair, handler.clone()));
        // Also subscribed for any sender: still one call per message.
        assert!(!registry.add(&KeyPair::new(b, Key::ZERO), handler.clone()));

        let env = message("x").seal(&KeyPair::new(a, b.public_key())).unwrap();
        assert_eq!(registry.deliver(&env), 1);
        assert_eq!(count.load(Relaxed), 1);
        // The same envelope again is a duplicate.
        assert_eq!(registry.deliver(&env), 0);
        assert_eq!(registry.stats().dropped_duplicate, 1);

        assert_eq!(
            registry.remove(&pair, &handler),
            Removal {
                last_for_sender: true,
                last_for_key: false
            }
        );
        assert_eq!(
            registry.remove(&KeyPair::new(b, Key::ZERO), &handler),
            Removal {
                last_for_sender: true,
                last_for_key: true
            }
        );
        assert!(!registry.has_key(&b.public_key()));
    }

    #[test]
    fn wrong_sender_and_forgeries_are_not_delivered() {
        let registry = Registry::new();
        let (a, b, c) = (Key::generate(), Key::generate(), Key::generate());
        let (count, handler) = counter();
        registry.add(&KeyPair::new(b, a.public_key()), handler);
        let from_c = message("c").seal(&KeyPair::new(c, b.public_key())).unwrap();
        assert_eq!(registry.deliver(&from_c), 0);
        let mut forged = message("a").seal(&KeyPair::new(a, b.public_key())).unwrap();
        forged.contents.as_mut().unwrap().body[20] ^= 1;
        assert_eq!(registry.deliver(&forged), 0);
        assert_eq!(count.load(Relaxed), 0);
        let stats = registry.stats();
        assert_eq!((stats.dropped_no_subscriber, stats.dropped_invalid), (1, 1));
    }

    #[test]
    fn channel_handler_counts_what_it_drops() {
        let (handler, mut rx) = ChannelHandler::new(1);
        let delivery = Delivery {
            sender: Key::ZERO,
            recipient: Key::ZERO,
            message: message("m"),
        };
        handler.on_message(&delivery);
        handler.on_message(&delivery);
        assert_eq!(handler.dropped(), 1);
        assert_eq!(rx.try_recv().unwrap(), delivery);
    }
}
