//! The subscription registry that every backend shares: it holds the handlers of
//! each own key, opens the envelopes a transport receives and calls the handlers.
//!
//! A transport hands every envelope it receives to [`Registry::deliver`] on its
//! receive task. That costs no cryptography: it checks that the envelope is
//! addressed to one of our keys and puts it into a bounded queue. The registry's
//! worker task takes the envelopes from the queue in order, opens them and calls
//! the handlers. So a flood of forged envelopes keeps the worker busy, not the
//! socket, and what the worker cannot keep up with is dropped at the queue and
//! counted ([`RegistryStats::dropped_queue_full`]). The worker belongs to the
//! registry: [`Registry::close`] and dropping the registry stop it.
//!
//! Copies of an envelope (through several media, or again after a reconnect)
//! are delivered once. The registry remembers the nonces of the envelopes it
//! delivered, in a window per sender: at most
//! [`RegistryOptions::nonces_per_sender`] nonces, each for at most
//! [`RegistryOptions::duplicate_window`]. One sender, however much it sends,
//! only pushes its own nonces out. The number of senders remembered is bounded
//! too ([`RegistryOptions::senders`]; the least recently heard go first). Only
//! envelopes that opened and reached a handler are remembered, so that a forged
//! copy cannot suppress the real one and a sender nobody listens to takes no
//! room. A copy that arrives after its nonce was forgotten is delivered again.

use std::{
    collections::{HashMap, VecDeque, hash_map::Entry},
    num::NonZeroUsize,
    sync::{
        Arc,
        atomic::{
            AtomicU64, AtomicUsize,
            Ordering::{Relaxed, SeqCst},
        },
    },
    time::Duration,
};

use lru::LruCache;
use parking_lot::Mutex;
use prost::Message as _;
use tokio::{
    sync::{broadcast, mpsc, watch},
    time::Instant,
};

use tokio_util::task::AbortOnDropHandle;

use crate::{
    Key, PrivateKey, Sender,
    envelope::NONCE_LEN,
    log_limit::LogLimiter,
    proto::signaling::{Envelope, Message},
    task,
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
/// Handlers are called on the registry's worker task, one envelope after the
/// other: they must return quickly and must not block, or every delivery of the
/// registry waits and its queue fills. [`ChannelHandler`] hands messages to a
/// task. A handler is identified by its `Arc`: subscribing the same `Arc` twice
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
#[non_exhaustive]
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
    /// Envelopes dropped unopened because the queue to the worker was full
    /// (in envelopes or in bytes, [`RegistryOptions`]).
    pub dropped_queue_full: u64,
    /// Nonces forgotten before their time because their sender sent more than
    /// [`RegistryOptions::nonces_per_sender`] within the window (a copy of such
    /// an envelope would be delivered again).
    pub nonces_forgotten: u64,
    /// Senders whose nonces were forgotten before their time to make room for
    /// another sender ([`RegistryOptions::senders`]).
    pub senders_forgotten: u64,
}

/// Limits of a [`Registry`]. Their worst case together: the queue holds at
/// most `queue_bytes` of envelopes, and the duplicate windows at most
/// `senders × nonces_per_sender` nonces of about 40 bytes each (5 MiB with the
/// defaults).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct RegistryOptions {
    /// Envelopes waiting for the worker, at most (default 1024).
    pub queue_envelopes: usize,
    /// Bytes of encoded envelopes waiting for the worker, at most (default 4 MiB).
    /// A larger envelope is always dropped.
    pub queue_bytes: usize,
    /// Nonces remembered per sender to drop copies (default 128).
    pub nonces_per_sender: usize,
    /// Senders whose nonces are remembered (default 1024); when more send, the
    /// least recently heard is forgotten.
    pub senders: usize,
    /// How long a nonce is remembered (default 5 minutes).
    pub duplicate_window: Duration,
}

impl Default for RegistryOptions {
    fn default() -> Self {
        RegistryOptions {
            queue_envelopes: 1024,
            queue_bytes: 4 << 20,
            nonces_per_sender: 128,
            senders: 1024,
            duplicate_window: Duration::from_secs(5 * 60),
        }
    }
}

type HandlerRef = Arc<dyn Handler>;

struct OwnKey {
    private: PrivateKey,
    handlers: HashMap<Sender, Vec<HandlerRef>>,
}

type Nonce = [u8; NONCE_LEN];

/// The nonces one sender's delivered envelopes carried, oldest first.
#[derive(Default)]
struct Window {
    nonces: VecDeque<(Nonce, Instant)>,
}

impl Window {
    /// Forgets the nonces remembered for `window` or longer.
    fn expire(&mut self, now: Instant, window: Duration) {
        while self
            .nonces
            .front()
            .is_some_and(|(_, at)| now.saturating_duration_since(*at) >= window)
        {
            self.nonces.pop_front();
        }
    }

    fn contains(&self, nonce: &Nonce) -> bool {
        // A short list of 24-byte arrays: a scan costs less than a hash set's memory.
        self.nonces.iter().any(|(n, _)| n == nonce)
    }

    /// True if a nonce of this window is still within its time.
    fn is_live(&self, now: Instant, window: Duration) -> bool {
        self.nonces
            .back()
            .is_some_and(|(_, at)| now.saturating_duration_since(*at) < window)
    }
}

/// What [`Recent::insert`] did.
#[derive(Debug, Default, PartialEq, Eq)]
struct Inserted {
    /// The nonce was new for its sender.
    new: bool,
    /// An older nonce of the same sender made room for it.
    forgot_nonce: bool,
    /// Another sender's live window made room for this sender's.
    forgot_sender: bool,
}

/// Duplicate windows by sender, least recently heard first out.
struct Recent {
    senders: LruCache<Key, Window>,
    nonces_per_sender: usize,
    window: Duration,
}

impl Recent {
    fn new(options: &RegistryOptions) -> Self {
        Recent {
            senders: LruCache::new(NonZeroUsize::new(options.senders).unwrap_or(NonZeroUsize::MIN)),
            nonces_per_sender: options.nonces_per_sender.max(1),
            window: options.duplicate_window,
        }
    }

    /// True if `sender` delivered an envelope with `nonce` within the window.
    /// The sender is only claimed here: looking does not make it recent.
    fn contains(&mut self, sender: &Key, nonce: &Nonce, now: Instant) -> bool {
        let window = self.window;
        self.senders.peek_mut(sender).is_some_and(|w| {
            w.expire(now, window);
            w.contains(nonce)
        })
    }

    /// Remembers that an authenticated envelope of `sender` with `nonce` was delivered.
    fn insert(&mut self, sender: Key, nonce: Nonce, now: Instant) -> Inserted {
        let mut done = Inserted::default();
        if let Some(w) = self.senders.get_mut(&sender) {
            w.expire(now, self.window);
            if w.contains(&nonce) {
                return done;
            }
            w.nonces.push_back((nonce, now));
            if w.nonces.len() > self.nonces_per_sender {
                w.nonces.pop_front();
                done.forgot_nonce = true;
            }
        } else {
            let mut w = Window::default();
            w.nonces.push_back((nonce, now));
            if let Some((_, old)) = self.senders.push(sender, w) {
                done.forgot_sender = old.is_live(now, self.window);
            }
        }
        done.new = true;
        done
    }
}

/// The outcome of [`Registry::remove`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Removal {
    /// No handler is left for that sender (docs/PROTOCOL.md §6's `last`).
    pub last_for_sender: bool,
    /// No handler at all is left for our key: the transport may stop listening.
    pub last_for_key: bool,
}

/// An envelope waiting for the worker, with its encoded size.
struct Queued {
    envelope: Envelope,
    size: usize,
}

/// What happened to a medium's subscription stream of one of our keys, as
/// the media that keep such streams (grpc://) report it through
/// [`Registry::stream_events`]: for a program that wants to say so, or to
/// stop on a refusal that retrying does not cure.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum StreamEvent {
    /// The stream ended or could not be opened for a passing reason (the
    /// server went away, a timeout); the medium tries again.
    Lost {
        /// The medium, as in its URL.
        backend: String,
        /// Our public key the stream is for.
        key: Key,
        /// Why, in one line.
        reason: String,
    },
    /// The stream is open again after it was lost or refused.
    Back {
        /// The medium, as in its URL.
        backend: String,
        /// Our public key the stream is for.
        key: Key,
    },
    /// The server refused the key or its proof (a gRPC UNAUTHENTICATED or
    /// PERMISSION_DENIED, another server key than the pinned one): retrying
    /// does not cure that by itself. The medium still tries again, slowly, in
    /// case the server's list of keys changes.
    Refused {
        /// The medium, as in its URL.
        backend: String,
        /// Our public key the stream is for.
        key: Key,
        /// The server's reason, in one line.
        reason: String,
    },
}

/// Stream events kept for a receiver that is behind; older ones are lost to it
/// (it learns how many through `RecvError::Lagged`).
const STREAM_EVENTS: usize = 64;

/// Handlers by own key and sender; opens envelopes on its worker task and
/// calls the handlers.
///
/// Made with [`Registry::new`] within a tokio runtime. The worker stops when the
/// registry is closed or dropped.
pub struct Registry {
    shared: Arc<Shared>,
    queue: mpsc::Sender<Queued>,
    /// How many queued envelopes the worker has finished with.
    finished: watch::Receiver<u64>,
    /// `None` once closed.
    worker: Mutex<Option<AbortOnDropHandle<()>>>,
    /// What the media report about their subscription streams.
    stream_events: broadcast::Sender<StreamEvent>,
}

/// What the registry shares with its worker.
struct Shared {
    keys: Mutex<HashMap<Key, OwnKey>>,
    recent: Mutex<Recent>,
    queue_bytes: usize,
    queued_bytes: AtomicUsize,
    /// Envelopes put into the queue.
    queued: AtomicU64,
    opened: AtomicU64,
    delivered: AtomicU64,
    dropped_invalid: AtomicU64,
    dropped_no_subscriber: AtomicU64,
    dropped_duplicate: AtomicU64,
    dropped_queue_full: AtomicU64,
    nonces_forgotten: AtomicU64,
    senders_forgotten: AtomicU64,
    invalid_log: LogLimiter,
    queue_full_log: LogLimiter,
    forgotten_log: LogLimiter,
}

fn same_handler(a: &HandlerRef, b: &HandlerRef) -> bool {
    // Compare the data pointers only: vtable pointers of one type may differ.
    std::ptr::addr_eq(Arc::as_ptr(a), Arc::as_ptr(b))
}

impl Registry {
    /// An empty registry with the default [`RegistryOptions`]. Starts the
    /// worker task, so it must be called within a tokio runtime.
    pub fn new() -> Arc<Self> {
        Self::with_options(RegistryOptions::default())
    }

    /// An empty registry with these limits. Starts the worker task, so it must
    /// be called within a tokio runtime.
    pub fn with_options(options: RegistryOptions) -> Arc<Self> {
        let (queue, rx) = mpsc::channel(options.queue_envelopes.max(1));
        let (finished_tx, finished) = watch::channel(0);
        let shared = Arc::new(Shared {
            keys: Mutex::new(HashMap::new()),
            recent: Mutex::new(Recent::new(&options)),
            queue_bytes: options.queue_bytes,
            queued_bytes: AtomicUsize::new(0),
            queued: AtomicU64::new(0),
            opened: AtomicU64::new(0),
            delivered: AtomicU64::new(0),
            dropped_invalid: AtomicU64::new(0),
            dropped_no_subscriber: AtomicU64::new(0),
            dropped_duplicate: AtomicU64::new(0),
            dropped_queue_full: AtomicU64::new(0),
            nonces_forgotten: AtomicU64::new(0),
            senders_forgotten: AtomicU64::new(0),
            invalid_log: LogLimiter::default(),
            queue_full_log: LogLimiter::default(),
            forgotten_log: LogLimiter::default(),
        });
        let worker = tokio::spawn(work(shared.clone(), rx, finished_tx));
        Arc::new(Registry {
            shared,
            queue,
            finished,
            worker: Mutex::new(Some(AbortOnDropHandle::new(worker))),
            stream_events: broadcast::channel(STREAM_EVENTS).0,
        })
    }

    /// Adds `handler` for messages to the public key of `ours` from `from`.
    /// Returns true if this is the first handler of our key. Adding a handler
    /// that is there already changes nothing.
    pub fn add(&self, ours: &PrivateKey, from: Sender, handler: HandlerRef) -> bool {
        let public = ours.public_key();
        let mut keys = self.shared.keys.lock();
        let (own, first) = match keys.entry(public) {
            Entry::Occupied(e) => (e.into_mut(), false),
            Entry::Vacant(e) => (
                e.insert(OwnKey {
                    private: ours.clone(),
                    handlers: HashMap::new(),
                }),
                true,
            ),
        };
        let list = own.handlers.entry(from).or_default();
        if !list.iter().any(|h| same_handler(h, &handler)) {
            list.push(handler);
        }
        first
    }

    /// Removes `handler` for messages to `ours` from `from`. Envelopes still in
    /// the queue are not delivered to it.
    pub fn remove(&self, ours: &PrivateKey, from: Sender, handler: &HandlerRef) -> Removal {
        let public = ours.public_key();
        let mut keys = self.shared.keys.lock();
        let Some(own) = keys.get_mut(&public) else {
            return Removal {
                last_for_sender: true,
                last_for_key: false,
            };
        };
        let mut last_for_sender = true;
        if let Some(list) = own.handlers.get_mut(&from) {
            list.retain(|h| !same_handler(h, handler));
            last_for_sender = list.is_empty();
            if last_for_sender {
                own.handlers.remove(&from);
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

    /// Removes every handler (and the private keys they came with), so that
    /// they see the end.
    pub fn clear(&self) {
        let keys = std::mem::take(&mut *self.shared.keys.lock());
        // Dropped outside the lock: a handler's drop may do anything.
        drop(keys);
    }

    /// Stops the worker (envelopes still queued are dropped unopened) and
    /// removes every handler; for a backend that closes. Later envelopes are
    /// not delivered.
    pub async fn close(&self) {
        let worker = self.worker.lock().take();
        if let Some(worker) = worker {
            task::stop(worker).await;
        }
        self.clear();
    }

    /// The private key of our key `public`, if it has a handler.
    pub(crate) fn private_key(&self, public: &Key) -> Option<PrivateKey> {
        self.shared
            .keys
            .lock()
            .get(public)
            .map(|own| own.private.clone())
    }

    /// True if our key `public` has a handler.
    pub fn has_key(&self, public: &Key) -> bool {
        self.shared.keys.lock().contains_key(public)
    }

    /// The own public keys that have handlers.
    pub fn keys(&self) -> Vec<Key> {
        self.shared.keys.lock().keys().copied().collect()
    }

    /// Hands `envelope` to the worker, which opens it and calls every handler
    /// that wants it, each once, in the order envelopes were handed over.
    /// Transports call this on their receive task: it costs no cryptography.
    ///
    /// Returns true if the envelope was queued. Envelopes for a key without
    /// handlers, or that find the queue full, are dropped and counted; so are,
    /// later, those that do not open, that nobody wants or that arrived already.
    pub fn deliver(&self, envelope: &Envelope) -> bool {
        let shared = &self.shared;
        let Ok(recipient) = envelope.recipient_key() else {
            shared.drop_invalid(envelope, "recipient is not a 32-byte key");
            return false;
        };
        if !self.has_key(&recipient) {
            shared.dropped_no_subscriber.fetch_add(1, Relaxed);
            tracing::debug!(%recipient, "envelope for a key without handlers dropped");
            return false;
        }
        let permit = match self.queue.try_reserve() {
            Ok(permit) => permit,
            Err(mpsc::error::TrySendError::Full(())) => {
                shared.queue_full(envelope, "envelopes");
                return false;
            }
            Err(mpsc::error::TrySendError::Closed(())) => {
                tracing::debug!(%recipient, "registry closed: envelope dropped");
                return false;
            }
        };
        let size = envelope.encoded_len();
        let before = shared.queued_bytes.fetch_add(size, SeqCst);
        if before.saturating_add(size) > shared.queue_bytes {
            shared.queued_bytes.fetch_sub(size, SeqCst);
            shared.queue_full(envelope, "bytes");
            return false;
        }
        permit.send(Queued {
            envelope: envelope.clone(),
            size,
        });
        shared.queued.fetch_add(1, SeqCst);
        true
    }

    /// Waits until the worker has finished with every envelope that
    /// [`Registry::deliver`] queued before this call: opened it and called its
    /// handlers, or dropped it. Returns at once once the registry is closed.
    pub async fn flush(&self) {
        let target = self.shared.queued.load(SeqCst);
        let mut finished = self.finished.clone();
        // An error means the worker is gone: nothing more will be finished.
        let _ = finished.wait_for(|&n| n >= target).await;
    }

    /// What the media report about their subscription streams from now on:
    /// lost, back, refused. A receiver that falls more than 64 events behind
    /// loses the oldest.
    pub fn stream_events(&self) -> broadcast::Receiver<StreamEvent> {
        self.stream_events.subscribe()
    }

    /// Reports what happened to a medium's subscription stream (for media).
    pub fn report_stream(&self, event: StreamEvent) {
        // No receiver is fine: nobody asked.
        let _ = self.stream_events.send(event);
    }

    /// The counters.
    pub fn stats(&self) -> RegistryStats {
        let s = &self.shared;
        RegistryStats {
            opened: s.opened.load(Relaxed),
            delivered: s.delivered.load(Relaxed),
            dropped_invalid: s.dropped_invalid.load(Relaxed),
            dropped_no_subscriber: s.dropped_no_subscriber.load(Relaxed),
            dropped_duplicate: s.dropped_duplicate.load(Relaxed),
            dropped_queue_full: s.dropped_queue_full.load(Relaxed),
            nonces_forgotten: s.nonces_forgotten.load(Relaxed),
            senders_forgotten: s.senders_forgotten.load(Relaxed),
        }
    }
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

/// The worker: opens queued envelopes and calls their handlers until the queue
/// closes or the task is aborted.
async fn work(
    shared: Arc<Shared>,
    mut queue: mpsc::Receiver<Queued>,
    finished: watch::Sender<u64>,
) {
    let mut done = 0u64;
    while let Some(queued) = queue.recv().await {
        shared.open_and_dispatch(&queued.envelope);
        shared.queued_bytes.fetch_sub(queued.size, SeqCst);
        done += 1;
        finished.send_replace(done);
    }
}

impl Shared {
    /// Opens `envelope` and calls every handler that wants it, each once.
    fn open_and_dispatch(&self, envelope: &Envelope) {
        let Ok(recipient) = envelope.recipient_key() else {
            self.drop_invalid(envelope, "recipient is not a 32-byte key");
            return;
        };
        // Looked up again: the handlers may have gone while it waited.
        let Some(private) = self
            .keys
            .lock()
            .get(&recipient)
            .map(|own| own.private.clone())
        else {
            self.dropped_no_subscriber.fetch_add(1, Relaxed);
            tracing::debug!(%recipient, "envelope for a key without handlers dropped");
            return;
        };
        let id = envelope.sender_key().ok().zip(
            envelope
                .contents
                .as_ref()
                .and_then(|c| Nonce::try_from(c.nonce.as_slice()).ok()),
        );
        let now = Instant::now();
        if let Some((sender, nonce)) = &id
            && self.recent.lock().contains(sender, nonce, now)
        {
            self.dropped_duplicate.fetch_add(1, Relaxed);
            return;
        }
        let message = match envelope.open(&private) {
            Ok(message) => message,
            Err(e) => {
                self.drop_invalid(envelope, &e.to_string());
                return;
            }
        };
        // Opening checked both: an envelope that opened has a sender and a nonce.
        let Some((sender, nonce)) = id else {
            self.drop_invalid(envelope, "no sender key or nonce");
            return;
        };
        let handlers = self.handlers_for(&recipient, &sender);
        if handlers.is_empty() {
            self.dropped_no_subscriber.fetch_add(1, Relaxed);
            tracing::debug!(%sender, %recipient, "no handler for this sender: dropped");
            return;
        }
        // Remembered only now, so that a forged copy cannot suppress the real
        // one and a sender nobody listens to takes no room.
        let inserted = self.recent.lock().insert(sender, nonce, now);
        if !inserted.new {
            self.dropped_duplicate.fetch_add(1, Relaxed);
            return;
        }
        if inserted.forgot_nonce {
            self.nonces_forgotten.fetch_add(1, Relaxed);
        }
        if inserted.forgot_sender {
            let total = self.senders_forgotten.fetch_add(1, Relaxed) + 1;
            if self.forgotten_log.allow() {
                tracing::info!(
                    total,
                    "more senders than duplicate windows: the least recently heard was forgotten"
                );
            }
        }
        let delivery = Delivery {
            sender,
            recipient,
            message,
        };
        self.opened.fetch_add(1, Relaxed);
        self.delivered.fetch_add(handlers.len() as u64, Relaxed);
        for handler in &handlers {
            handler.on_message(&delivery);
        }
    }

    fn handlers_for(&self, recipient: &Key, sender: &Key) -> Vec<HandlerRef> {
        let keys = self.keys.lock();
        let Some(own) = keys.get(recipient) else {
            return Vec::new();
        };
        let mut out: Vec<HandlerRef> = Vec::new();
        let lists = [
            own.handlers.get(&Sender::Key(*sender)),
            own.handlers.get(&Sender::Any),
        ];
        for list in lists.into_iter().flatten() {
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
        tracing::warn!(sender = %sender_text(envelope), total, "envelope dropped: {why}");
    }

    fn queue_full(&self, envelope: &Envelope, what: &str) {
        let total = self.dropped_queue_full.fetch_add(1, Relaxed) + 1;
        // A flood fills the queue once per envelope: log some, count all.
        if !self.queue_full_log.allow() {
            return;
        }
        tracing::warn!(
            sender = %sender_text(envelope),
            total,
            "envelope dropped unopened: the queue to the registry's worker is full ({what})"
        );
    }
}

/// The claimed sender of an envelope, for a log line.
fn sender_text(envelope: &Envelope) -> String {
    Key::from_slice(&envelope.sender)
        .map(|k| k.to_string())
        .unwrap_or_else(|_| format!("<{} bytes>", envelope.sender.len()))
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use super::*;
    use crate::{KeyPair, proto::epdisc::Credentials};

    /// How long a test waits for the worker.
    const STEP: Duration = Duration::from_secs(10);

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

    /// Waits until the worker finished with everything delivered so far.
    async fn flush(registry: &Registry) {
        tokio::time::timeout(STEP, registry.flush())
            .await
            .expect("the worker finishes within 10 s");
    }

    /// Delivers `envelope`, waits for the worker, returns how many handler
    /// calls it made.
    async fn deliver(registry: &Registry, envelope: &Envelope) -> u64 {
        let before = registry.stats().delivered;
        registry.deliver(envelope);
        flush(registry).await;
        registry.stats().delivered - before
    }

    #[tokio::test]
    async fn first_last_and_dedup_of_handlers() {
        let registry = Registry::new();
        let (a, b) = (PrivateKey::generate(), PrivateKey::generate());
        let from_a = Sender::Key(a.public_key());
        let (count, handler) = counter();
        assert!(registry.add(&b, from_a, handler.clone()));
        assert!(!registry.add(&b, from_a, handler.clone()));
        // Also subscribed for any sender: still one call per message.
        assert!(!registry.add(&b, Sender::Any, handler.clone()));

        let env = message("x")
            .seal(&KeyPair::new(a.clone(), b.public_key()))
            .unwrap();
        assert_eq!(deliver(&registry, &env).await, 1);
        assert_eq!(count.load(Relaxed), 1);
        // The same envelope again is a duplicate.
        assert_eq!(deliver(&registry, &env).await, 0);
        assert_eq!(registry.stats().dropped_duplicate, 1);

        assert_eq!(
            registry.remove(&b, from_a, &handler),
            Removal {
                last_for_sender: true,
                last_for_key: false
            }
        );
        assert_eq!(
            registry.remove(&b, Sender::Any, &handler),
            Removal {
                last_for_sender: true,
                last_for_key: true
            }
        );
        assert!(!registry.has_key(&b.public_key()));
    }

    #[tokio::test]
    async fn wrong_sender_and_forgeries_are_not_delivered() {
        let registry = Registry::new();
        let (a, b, c) = (
            PrivateKey::generate(),
            PrivateKey::generate(),
            PrivateKey::generate(),
        );
        let (count, handler) = counter();
        registry.add(&b, Sender::Key(a.public_key()), handler);
        let from_c = message("c")
            .seal(&KeyPair::new(c.clone(), b.public_key()))
            .unwrap();
        assert_eq!(deliver(&registry, &from_c).await, 0);
        let mut forged = message("a")
            .seal(&KeyPair::new(a.clone(), b.public_key()))
            .unwrap();
        forged.contents.as_mut().unwrap().body[20] ^= 1;
        assert_eq!(deliver(&registry, &forged).await, 0);
        // Not remembered: the genuine envelope with the forgery's nonce still arrives.
        forged.contents.as_mut().unwrap().body[20] ^= 1;
        assert_eq!(deliver(&registry, &forged).await, 1);
        assert_eq!(count.load(Relaxed), 1);
        let stats = registry.stats();
        assert_eq!((stats.dropped_no_subscriber, stats.dropped_invalid), (1, 1));
        // Nobody listens to c: its envelope took no duplicate window.
        assert_eq!(registry.shared.recent.lock().senders.len(), 1);
    }

    #[tokio::test]
    async fn deliver_does_not_open_and_handlers_run_on_the_worker() {
        let registry = Registry::new();
        let (a, b) = (PrivateKey::generate(), PrivateKey::generate());
        let (handler, mut rx) = ChannelHandler::new(4);
        registry.add(&b, Sender::Any, handler);
        let env = message("m")
            .seal(&KeyPair::new(a.clone(), b.public_key()))
            .unwrap();
        // On a current-thread runtime the worker cannot run before this task
        // awaits: deliver returns having queued, not opened.
        assert!(registry.deliver(&env));
        assert_eq!(registry.stats().opened, 0);
        let delivery = tokio::time::timeout(STEP, rx.recv())
            .await
            .expect("delivered within 10 s")
            .expect("channel open");
        assert_eq!(delivery.message, message("m"));
        assert_eq!(delivery.sender, a.public_key());
        assert_eq!(registry.stats().opened, 1);
    }

    #[tokio::test]
    async fn one_sender_cannot_push_out_another_senders_nonces() {
        let registry = Registry::new();
        let per_sender = RegistryOptions::default().nonces_per_sender;
        let (a, b, ours) = (
            PrivateKey::generate(),
            PrivateKey::generate(),
            PrivateKey::generate(),
        );
        let (count, handler) = counter();
        registry.add(&ours, Sender::Any, handler);
        let from_b = message("b")
            .seal(&KeyPair::new(b.clone(), ours.public_key()))
            .unwrap();
        assert_eq!(deliver(&registry, &from_b).await, 1);

        // A, with a valid key, sends many more envelopes than a window holds.
        let to_ours = KeyPair::new(a.clone(), ours.public_key());
        let first_of_a = message("a0").seal(&to_ours).unwrap();
        registry.deliver(&first_of_a);
        // More than its own window, and more than the 4 096 nonces that all
        // senders once shared.
        let flood = 5_000;
        assert!(flood > per_sender);
        for i in 1..flood {
            registry.deliver(&message(&format!("a{i}")).seal(&to_ours).unwrap());
            if i % 500 == 0 {
                flush(&registry).await;
            }
        }
        flush(&registry).await;
        let stats = registry.stats();
        assert_eq!(stats.dropped_queue_full, 0, "paced to fit the queue");
        assert_eq!(count.load(Relaxed), 1 + flood);
        assert_eq!(stats.nonces_forgotten as usize, flood - per_sender);

        // B's envelope replayed: still known.
        assert_eq!(deliver(&registry, &from_b).await, 0);
        assert_eq!(registry.stats().dropped_duplicate, 1);
        // A's own first envelope was pushed out by A's later ones: delivered again.
        assert_eq!(deliver(&registry, &first_of_a).await, 1);
        assert_eq!(registry.stats().senders_forgotten, 0);
    }

    #[tokio::test(start_paused = true)]
    async fn nonces_are_remembered_for_the_window_only() {
        let registry = Registry::new();
        let window = RegistryOptions::default().duplicate_window;
        let (a, b) = (PrivateKey::generate(), PrivateKey::generate());
        let (count, handler) = counter();
        registry.add(&b, Sender::Any, handler);
        let env = message("x")
            .seal(&KeyPair::new(a.clone(), b.public_key()))
            .unwrap();
        assert_eq!(deliver(&registry, &env).await, 1);
        tokio::time::advance(window - Duration::from_secs(1)).await;
        assert_eq!(deliver(&registry, &env).await, 0);
        tokio::time::advance(Duration::from_secs(1)).await;
        // Forgotten: a replay this late is delivered (and remembered again).
        assert_eq!(deliver(&registry, &env).await, 1);
        assert_eq!(deliver(&registry, &env).await, 0);
        assert_eq!(count.load(Relaxed), 2);
        let stats = registry.stats();
        assert_eq!(stats.dropped_duplicate, 2);
        // Expiry is not eviction.
        assert_eq!((stats.nonces_forgotten, stats.senders_forgotten), (0, 0));
    }

    #[tokio::test(start_paused = true)]
    async fn senders_are_bounded_least_recently_heard_first() {
        let options = RegistryOptions {
            senders: 2,
            ..Default::default()
        };
        let window = options.duplicate_window;
        let registry = Registry::with_options(options);
        let ours = PrivateKey::generate();
        let (_, handler) = counter();
        registry.add(&ours, Sender::Any, handler);
        let [a, b, c] = [
            PrivateKey::generate(),
            PrivateKey::generate(),
            PrivateKey::generate(),
        ];
        let from = |k: &PrivateKey, text: &str| {
            message(text)
                .seal(&KeyPair::new(k.clone(), ours.public_key()))
                .unwrap()
        };
        let (a1, b1) = (from(&a, "a1"), from(&b, "b1"));
        assert_eq!(deliver(&registry, &a1).await, 1);
        assert_eq!(deliver(&registry, &b1).await, 1);
        // A is heard again: B is now the least recently heard.
        assert_eq!(deliver(&registry, &from(&a, "a2")).await, 1);
        // A replay is only claimed to come from B: it does not make B recent.
        assert_eq!(deliver(&registry, &b1).await, 0);
        assert_eq!(deliver(&registry, &from(&c, "c1")).await, 1);
        assert_eq!(registry.stats().senders_forgotten, 1);
        assert_eq!(deliver(&registry, &a1).await, 0, "A was kept");
        assert_eq!(deliver(&registry, &b1).await, 1, "B was forgotten");
        // B's return pushed out the least recently heard, A (C came later).
        assert_eq!(registry.stats().senders_forgotten, 2);

        // A sender whose window ran out goes without counting as forgotten.
        tokio::time::advance(window).await;
        assert_eq!(deliver(&registry, &from(&a, "a3")).await, 1);
        assert_eq!(registry.stats().senders_forgotten, 2);
    }

    #[tokio::test]
    async fn a_full_queue_drops_and_counts() {
        let registry = Registry::with_options(RegistryOptions {
            queue_envelopes: 2,
            ..Default::default()
        });
        let (a, b) = (PrivateKey::generate(), PrivateKey::generate());
        let (count, handler) = counter();
        registry.add(&b, Sender::Any, handler);
        let to_b = KeyPair::new(a.clone(), b.public_key());
        // The worker cannot run before this task awaits (current-thread runtime).
        let queued: Vec<bool> = (0..5)
            .map(|i| registry.deliver(&message(&i.to_string()).seal(&to_b).unwrap()))
            .collect();
        assert_eq!(queued, [true, true, false, false, false]);
        assert_eq!(registry.stats().dropped_queue_full, 3);
        flush(&registry).await;
        assert_eq!(count.load(Relaxed), 2);
        // Room again.
        assert_eq!(
            deliver(&registry, &message("later").seal(&to_b).unwrap()).await,
            1
        );

        // The byte bound: two envelopes fit, a third does not.
        let envelope = message("x").seal(&to_b).unwrap();
        let registry = Registry::with_options(RegistryOptions {
            queue_bytes: envelope.encoded_len() * 2,
            ..Default::default()
        });
        registry.add(&b, Sender::Any, Arc::new(|_: &Delivery| {}));
        let queued: Vec<bool> = (0..3)
            .map(|_| registry.deliver(&message("x").seal(&to_b).unwrap()))
            .collect();
        assert_eq!(queued, [true, true, false]);
        assert_eq!(registry.stats().dropped_queue_full, 1);
        flush(&registry).await;
        assert_eq!(registry.stats().opened, 2);
        assert_eq!(registry.shared.queued_bytes.load(SeqCst), 0);
    }

    #[tokio::test]
    async fn close_and_drop_stop_the_worker() {
        let registry = Registry::new();
        let (a, b) = (PrivateKey::generate(), PrivateKey::generate());
        let (handler, mut rx) = ChannelHandler::new(4);
        registry.add(&b, Sender::Any, handler.clone());
        let env = message("m")
            .seal(&KeyPair::new(a.clone(), b.public_key()))
            .unwrap();
        registry.deliver(&env);
        tokio::time::timeout(STEP, registry.close())
            .await
            .expect("closed within 10 s");
        assert!(registry.worker.lock().is_none());
        // Queued before the close, dropped with the queue: never opened.
        assert_eq!(registry.stats().opened, 0);
        registry.add(&b, Sender::Any, handler);
        assert!(!registry.deliver(&env));
        // Returns although nothing will ever be finished.
        flush(&registry).await;
        assert!(rx.try_recv().is_err());

        // Dropped: the worker goes, and with it the last handle on the handler.
        let registry = Registry::new();
        let (handler, mut rx) = ChannelHandler::new(4);
        registry.add(&b, Sender::Any, handler);
        drop(registry);
        let end = tokio::time::timeout(STEP, rx.recv()).await;
        assert!(matches!(end, Ok(None)), "{end:?}");
    }

    #[test]
    fn channel_handler_counts_what_it_drops() {
        let (handler, mut rx) = ChannelHandler::new(1);
        let delivery = Delivery {
            sender: Key::from([0; 32]),
            recipient: Key::from([0; 32]),
            message: message("m"),
        };
        handler.on_message(&delivery);
        handler.on_message(&delivery);
        assert_eq!(handler.dropped(), 1);
        assert_eq!(rx.try_recv().unwrap(), delivery);
    }
}
