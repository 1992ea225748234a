//! The fan-out core: subscriptions by key, their queues and their budgets.
//! No HTTP/2 in here; the connection task ([`crate::conn`]) takes envelopes
//! out of a subscription's queue when its [`Mailbox`] says there are some.
//!
//! An envelope travels as a [`Frame`]: its gRPC message frame (the 5-byte
//! prefix and the envelope's bytes exactly as the publisher sent them), one
//! buffer shared by every subscriber. Each subscription has its own queue,
//! bounded in envelopes and bytes; a full queue drops envelopes of the
//! publisher that holds the most of it, its oldest first (newer credentials
//! matter more), and counts them: a flood to one key costs the flooder's
//! envelopes, not those of the key's other peers. The bytes of an
//! envelope count against the subscriber's client and the server from the
//! moment they are queued until HTTP/2 has written them out (see
//! [`Sub::take`]): a client whose budget is full loses its own envelopes, and
//! only its own.
//!
//! Keys are spread over [`SHARDS`] maps, each behind its own lock, and a
//! key's subscriptions are a list in which each knows its place: adding or
//! removing one costs the same however many the key has, and touches the
//! one shard of its key. A key is one peer, so it has few streams: at most
//! `max_per_key` (`--max-subscriptions-per-key`). When a key is full, a
//! client holding less than its fair share of it (the cap divided by the
//! clients holding any, the newcomer included) still gets in, and the client
//! holding the most loses its most recent one (ended with
//! RESOURCE_EXHAUSTED); others are refused.

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    hash::BuildHasher,
    sync::{
        Arc,
        atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed},
    },
    task::Wake,
};

use bytes::Bytes;
use futures::task::AtomicWaker;
use parking_lot::Mutex;
use tokio::time::Instant;

use crate::{
    bounds::{IDLE_QUEUE_SLOTS, IN_FLIGHT_PER_STREAM, LARGE_FRAME_WINDOW, MAX_EVICTED_FOR_ROOM},
    client::{Budget, Client, ClientState, Evict, Exhausted, SlotGuard, reserve},
    deadlines::{DrainMeter, Verdict},
    metrics::Metrics,
    refusal::{Cut, KeyFull},
    wire::Frame,
};

/// What the hub needs from the other replicas of a cluster: to hear of a
/// key's first and last subscriber here, so that envelopes for the key
/// published elsewhere come here exactly while someone here wants them.
pub(crate) trait Replicas: Send + Sync {
    /// `key` has its first subscriber here. Called under the key's shard
    /// lock: it must not block.
    fn watch(self: Arc<Self>, key: Topic);
    /// `key`'s last subscriber here is gone. Called under the key's shard
    /// lock: it must not block.
    fn unwatch(&self, key: &Topic);
}

/// A handle to a hub that does not keep it alive: what the other replicas
/// hold, since the hub holds them.
#[derive(Clone)]
pub(crate) struct WeakHub(std::sync::Weak<Inner>);

impl WeakHub {
    /// The hub, unless it is gone.
    pub(crate) fn upgrade(&self) -> Option<Hub> {
        self.0.upgrade().map(|inner| Hub { inner })
    }
}

/// A key: what subscriptions are for and envelopes addressed to.
pub(crate) type Topic = [u8; 32];

/// What a queued or in-flight frame costs beyond its bytes: its slot in a
/// queue (the buffer's handle and its publisher) and its share of the
/// queue's bytes by publisher, or the shared header HTTP/2 holds it by.
const ENTRY_COST: usize = 80;

/// What one copy of `frame` counts against the budgets: its bytes (each
/// subscriber's copy counts whole, although they share one buffer) and its entry.
fn cost(frame: &Frame) -> usize {
    frame.len() + ENTRY_COST
}

/// The limits of the subscriptions in a [`Hub`].
#[derive(Debug, Clone, Copy)]
pub(crate) struct QueueLimits {
    /// Envelopes per queue.
    pub(crate) depth: usize,
    /// Bytes per queue (frame sizes).
    pub(crate) bytes: usize,
}

/// What a connection task has to look at: the slots of its subscriptions
/// that have envelopes to send or whose HTTP/2 stream changed.
#[derive(Default)]
pub(crate) struct Mailbox {
    slots: Mutex<Vec<usize>>,
    waker: AtomicWaker,
    /// Subscriptions of this connection that have envelopes waiting.
    waiting: AtomicUsize,
}

impl Mailbox {
    fn post(&self, slot: usize) {
        self.slots.lock().push(slot);
        self.waker.wake();
    }

    /// The slots posted since the last call (into `out`, which is cleared).
    pub(crate) fn take(&self, out: &mut Vec<usize>) {
        out.clear();
        std::mem::swap(&mut *self.slots.lock(), out);
    }

    /// Wakes the connection task with this waker.
    pub(crate) fn register(&self, waker: &std::task::Waker) {
        self.waker.register(waker);
    }

    /// How many subscriptions of this connection have envelopes waiting.
    pub(crate) fn waiting(&self) -> usize {
        self.waiting.load(Relaxed)
    }
}

/// Who published an envelope, for sharing a queue fairly between publishers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Publisher {
    /// A client of this server.
    Client(Client),
    /// Another replica of the cluster.
    Replicas,
}

#[derive(Default)]
struct State {
    queue: VecDeque<(Frame, Publisher)>,
    /// Bytes in `queue`.
    queued: usize,
    /// Bytes in `queue` by publisher (a few publishers: a list).
    by_publisher: Vec<(Publisher, usize)>,
    /// Bytes handed to HTTP/2 and not yet written.
    in_flight: usize,
    /// How fast the subscriber takes what waits for it.
    drain: DrainMeter,
    /// The slot is posted to the mailbox or being drained.
    posted: bool,
    /// The subscription has ended: nothing more is queued.
    closed: bool,
    /// The server ends it: its connection task sends the status.
    cut: Option<Cut>,
}

impl Evict for Sub {
    fn evict(&self) {
        self.cut_for(Cut::FairShare);
    }
}

impl State {
    fn pending(&self) -> bool {
        self.queued > 0 || self.in_flight > 0
    }

    fn can_send(&self) -> bool {
        !self.queue.is_empty()
            && (self.in_flight == 0
                || self.in_flight + cost(&self.queue[0].0) <= IN_FLIGHT_PER_STREAM)
    }

    fn push(&mut self, frame: Frame, from: Publisher) {
        let size = cost(&frame);
        self.queued += size;
        match self.by_publisher.iter_mut().find(|(p, _)| *p == from) {
            Some((_, bytes)) => *bytes += size,
            None => self.by_publisher.push((from, size)),
        }
        self.queue.push_back((frame, from));
    }

    /// Takes the queue's entry at `index` out.
    fn remove(&mut self, index: usize) -> Option<Frame> {
        let (frame, from) = self.queue.remove(index)?;
        let size = cost(&frame);
        self.queued -= size;
        if let Some(at) = self.by_publisher.iter().position(|(p, _)| *p == from) {
            self.by_publisher[at].1 -= size;
            if self.by_publisher[at].1 == 0 {
                self.by_publisher.swap_remove(at);
            }
        }
        Some(frame)
    }

    /// The oldest envelope of the publisher holding the most bytes here,
    /// counting `incoming` from `from` as held already: taken out.
    fn drop_heaviest(&mut self, from: Publisher, incoming: usize) -> Option<Frame> {
        let heaviest = self
            .by_publisher
            .iter()
            .map(|&(p, bytes)| (p, bytes + if p == from { incoming } else { 0 }))
            .max_by_key(|&(_, bytes)| bytes)?
            .0;
        let index = self.queue.iter().position(|(_, p)| *p == heaviest)?;
        self.remove(index)
    }
}

/// Why an envelope was not queued for a subscriber.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Drop {
    /// The subscription's own queue was full (its oldest went).
    QueueFull,
    /// The subscriber's client has queued all it may.
    ClientBudget,
    /// The server has queued all it may.
    ServerBudget,
}

/// What [`Sub::take`] gives.
#[derive(Debug)]
pub(crate) enum Take {
    /// An envelope to send.
    Frame(Bytes),
    /// Nothing may go now.
    Nothing,
    /// The next envelopes need this much of the stream's window.
    Window(usize),
}

/// What [`Sub::offer`] did: whether the envelope was queued, how many
/// envelopes were dropped, and why.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Offered {
    /// Queues the envelope went into (0 or 1 for one subscription).
    pub(crate) queued: u64,
    pub(crate) queue_full: u64,
    pub(crate) client_budget: u64,
    pub(crate) server_budget: u64,
}

impl Offered {
    fn add(&mut self, why: Drop) {
        match why {
            Drop::QueueFull => self.queue_full += 1,
            Drop::ClientBudget => self.client_budget += 1,
            Drop::ServerBudget => self.server_budget += 1,
        }
    }

    fn merge(&mut self, other: Offered) {
        self.queued += other.queued;
        self.queue_full += other.queue_full;
        self.client_budget += other.client_budget;
        self.server_budget += other.server_budget;
    }
}

/// One subscription stream: its queue, and where its envelopes go.
pub(crate) struct Sub {
    key: Topic,
    /// When it was added (a number from the hub's counter): the most
    /// recent of a client on a full key goes first.
    seq: u64,
    /// Its place in its key's list; [`NOT_LISTED`] once taken out. Changed
    /// only under the lock of the key's shard.
    index: AtomicUsize,
    client: Arc<ClientState>,
    server: Arc<Budget>,
    limits: QueueLimits,
    mailbox: Arc<Mailbox>,
    slot: usize,
    state: Mutex<State>,
}

impl Sub {
    /// The key subscribed to.
    pub(crate) fn key(&self) -> &Topic {
        &self.key
    }

    /// Queues `frame` from `from`, dropping envelopes of the publisher that
    /// holds the most of this queue (its oldest first; `frame` counted as
    /// its publisher's) to make room within the queue's, the client's and
    /// the server's limits; drops `frame` itself when even an empty queue
    /// would not make room.
    pub(crate) fn offer(&self, frame: &Frame, from: Publisher) -> Offered {
        let size = cost(frame);
        let mut out = Offered::default();
        let mut state = self.state.lock();
        if state.closed {
            return out;
        }
        if size > self.limits.bytes {
            out.add(Drop::QueueFull);
            return out;
        }
        // When others hold so much of a budget that even emptying this queue
        // would not make room, the new envelope goes and the backlog stays.
        for (budget, why) in [
            (&self.client.budget, Drop::ClientBudget),
            (&*self.server, Drop::ServerBudget),
        ] {
            if budget.used().saturating_sub(state.queued) + size > budget.limit() {
                out.add(why);
                return out;
            }
        }
        loop {
            let fits_queue =
                state.queue.len() < self.limits.depth && state.queued + size <= self.limits.bytes;
            let why = if !fits_queue {
                Drop::QueueFull
            } else {
                match reserve(&self.client.budget, &self.server, size) {
                    Ok(()) => break,
                    Err(Exhausted::Client) => Drop::ClientBudget,
                    Err(Exhausted::Server) => Drop::ServerBudget,
                }
            };
            // Make room by dropping the heaviest publisher's oldest; when
            // there is none, others hold the budget: drop the new one and
            // keep the backlog.
            let Some(old) = state.drop_heaviest(from, size) else {
                out.add(why);
                return out;
            };
            self.client.budget.release(cost(&old));
            self.server.release(cost(&old));
            out.add(why);
        }
        let backlog = state.queued + state.in_flight;
        state.push(frame.clone(), from);
        out.queued = 1;
        if state.drain.offered(Instant::now(), size, backlog) {
            self.mailbox.waiting.fetch_add(1, Relaxed);
        }
        if !state.posted && state.can_send() {
            state.posted = true;
            drop(state);
            self.mailbox.post(self.slot);
        }
        out
    }

    /// The next envelope to hand to HTTP/2, if one may go: the stream has
    /// room in flight, and `window` (the stream's send capacity) holds it,
    /// or nothing is in flight and the window is open wide enough (a frame
    /// larger than the peer's window goes alone). Its bytes stay counted until the
    /// returned buffer (and every piece of it) is dropped, which HTTP/2 does
    /// once it wrote them or the stream is gone. [`Take::Nothing`] ends a
    /// drain: the slot is posted again when there is more to send.
    pub(crate) fn take(self: &Arc<Self>, window: usize) -> Take {
        let mut state = self.state.lock();
        if state.closed || !state.can_send() {
            state.posted = false;
            return Take::Nothing;
        }
        let len = cost(&state.queue[0].0);
        // A frame larger than the window goes alone, once the peer opened a
        // fair part of it (a largest envelope exceeds a default window).
        if len > window && (state.in_flight > 0 || window < len.min(LARGE_FRAME_WINDOW)) {
            // What may go now, for the reservation of the stream's window.
            let room = IN_FLIGHT_PER_STREAM.saturating_sub(state.in_flight);
            return Take::Window(state.queued.min(room).max(len));
        }
        let Some(frame) = state.remove(0) else {
            state.posted = false;
            return Take::Nothing;
        };
        state.in_flight += cost(&frame);
        if state.queue.is_empty() && state.queue.capacity() > IDLE_QUEUE_SLOTS {
            // A burst grew it: do not keep that for an idle subscriber.
            state.queue.shrink_to(IDLE_QUEUE_SLOTS);
            state.by_publisher.shrink_to(IDLE_QUEUE_SLOTS);
        }
        drop(state);
        Take::Frame(self.in_flight_buffer(frame))
    }

    /// `frame`, taken out of the queue and counted in flight, as the buffer
    /// HTTP/2 sends: its bytes are given back when HTTP/2 drops it.
    fn in_flight_buffer(self: &Arc<Self>, frame: Frame) -> Bytes {
        Bytes::from_owner(InFlight {
            frame,
            sub: self.clone(),
        })
    }

    /// Bytes handed out by [`Sub::take`] were written (or thrown away).
    fn written(&self, size: usize) {
        self.client.budget.release(size);
        self.server.release(size);
        let mut state = self.state.lock();
        state.in_flight -= size;
        if state.closed {
            return;
        }
        state.drain.took(size);
        if !state.pending() && state.drain.caught_up() {
            self.mailbox.waiting.fetch_sub(1, Relaxed);
        }
        if !state.posted && state.can_send() {
            state.posted = true;
            drop(state);
            self.mailbox.post(self.slot);
        }
    }

    /// Why the server ends this subscription, if it does.
    pub(crate) fn cut(&self) -> Option<Cut> {
        self.state.lock().cut
    }

    /// Marks the subscription to be ended by its connection task.
    fn cut_for(&self, why: Cut) {
        let mut state = self.state.lock();
        if state.closed || state.cut.is_some() {
            return;
        }
        state.cut = Some(why);
        drop(state);
        self.mailbox.post(self.slot);
    }

    /// Judges how fast the subscriber took what waited for it over the
    /// last `cutoff` (see [`DrainMeter`]).
    pub(crate) fn judge(&self, now: Instant, cutoff: std::time::Duration) -> Verdict {
        let mut state = self.state.lock();
        let backlog = state.queued + state.in_flight;
        state.drain.judge(now, cutoff, backlog)
    }

    /// Bytes handed to HTTP/2 and not yet written.
    pub(crate) fn in_flight(&self) -> usize {
        self.state.lock().in_flight
    }

    /// Ends the queue: nothing more is queued. What it holds is dropped and
    /// its bytes given back, or with `hand_out`, returned as in-flight
    /// buffers for the stream's last writes (no envelope can slip in
    /// between). Bytes in flight come back as HTTP/2 drops them.
    fn close(self: &Arc<Self>, hand_out: bool) -> Vec<Bytes> {
        let mut state = self.state.lock();
        if state.closed {
            return Vec::new();
        }
        state.closed = true;
        let queued = std::mem::take(&mut state.queued);
        let queue = std::mem::take(&mut state.queue);
        state.by_publisher = Vec::new();
        if hand_out {
            // The queued bytes stay counted, now as in flight.
            state.in_flight += queued;
        }
        if state.drain.caught_up() {
            self.mailbox.waiting.fetch_sub(1, Relaxed);
        }
        drop(state);
        if !hand_out {
            self.client.budget.release(queued);
            self.server.release(queued);
            return Vec::new();
        }
        queue
            .into_iter()
            .map(|(frame, _)| self.in_flight_buffer(frame))
            .collect()
    }
}

/// The HTTP/2 stream of a subscription changed (it may have been reset):
/// the connection task looks at it.
impl Wake for Sub {
    fn wake(self: Arc<Self>) {
        self.mailbox.post(self.slot);
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.mailbox.post(self.slot);
    }
}

/// An envelope handed to HTTP/2: its bytes are given back when dropped.
struct InFlight {
    frame: Frame,
    sub: Arc<Sub>,
}

impl AsRef<[u8]> for InFlight {
    fn as_ref(&self) -> &[u8] {
        self.frame.bytes()
    }
}

impl std::ops::Drop for InFlight {
    fn drop(&mut self) {
        self.sub.written(cost(&self.frame));
    }
}

/// The place of a subscription no longer in its key's list.
const NOT_LISTED: usize = usize::MAX;

/// Locks the keys are spread over: changes to different keys seldom wait
/// for each other.
pub(crate) const SHARDS: usize = 64;

/// One shard: keys and their subscriptions.
type Shard = Mutex<HashMap<Topic, Vec<Arc<Sub>>>>;

struct Inner {
    shards: Box<[Shard]>,
    /// Each client's subscriptions by their sequence number, for taking the
    /// newest of the client that holds the most of the server's budget (a
    /// client may hold many: taking one out must not cost a walk of all).
    by_client: Mutex<HashMap<Client, BTreeMap<u64, Arc<Sub>>>>,
    /// Picks a key's shard; seeded at random, so that nobody can choose keys
    /// that all land in one.
    hasher: std::hash::RandomState,
    limits: QueueLimits,
    /// Most subscriptions of one key.
    max_per_key: usize,
    /// Numbers subscriptions in the order they were added.
    next_seq: AtomicU64,
    server: Arc<Budget>,
    metrics: Arc<Metrics>,
    /// The other replicas: a key's first and last subscriber here start
    /// and end its NATS subscription.
    replicas: Option<Arc<dyn Replicas>>,
}

impl Inner {
    fn shard(&self, key: &Topic) -> &Shard {
        let n = self.hasher.hash_one(key) as usize % self.shards.len();
        &self.shards[n]
    }
}

/// Subscriptions by key. Cheap to clone.
#[derive(Clone)]
pub(crate) struct Hub {
    inner: Arc<Inner>,
}

impl Hub {
    pub(crate) fn new(
        limits: QueueLimits,
        max_per_key: usize,
        server: Arc<Budget>,
        metrics: Arc<Metrics>,
        replicas: impl FnOnce(WeakHub) -> Option<Arc<dyn Replicas>>,
    ) -> Self {
        Hub {
            inner: Arc::new_cyclic(|weak| Inner {
                shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
                by_client: Mutex::new(HashMap::new()),
                hasher: std::hash::RandomState::new(),
                limits,
                max_per_key: max_per_key.max(1),
                next_seq: AtomicU64::new(0),
                server,
                metrics,
                replicas: replicas(WeakHub(weak.clone())),
            }),
        }
    }

    /// The server's byte budget.
    pub(crate) fn budget(&self) -> &Arc<Budget> {
        &self.inner.server
    }

    /// Adds a subscription to `key` whose envelopes are announced to
    /// `mailbox` as `slot`; `slot_guard` is its place in the limits. It ends
    /// when the returned handle drops. Returns the handle and whether it is
    /// the key's first subscription here, or [`KeyFull`] (for the caller to count).
    pub(crate) fn subscribe(
        &self,
        key: Topic,
        client: Arc<ClientState>,
        slot_guard: SlotGuard,
        mailbox: Arc<Mailbox>,
        slot: usize,
    ) -> Result<(Subscription, bool), KeyFull> {
        let inner = &*self.inner;
        let sub = Arc::new(Sub {
            key,
            seq: inner.next_seq.fetch_add(1, Relaxed),
            index: AtomicUsize::new(NOT_LISTED),
            client,
            server: inner.server.clone(),
            limits: inner.limits,
            mailbox,
            slot,
            state: Mutex::new(State::default()),
        });
        let (first, evicted) = {
            let mut shard = inner.shard(&key).lock();
            let list = shard.entry(key).or_default();
            let first = list.is_empty();
            let evicted = if list.len() >= inner.max_per_key {
                let Some(evicted) = make_room(list, sub.client.client, inner.max_per_key) else {
                    drop(shard);
                    return Err(KeyFull {
                        key: cunicu_signal::Key::from(key),
                        limit: inner.max_per_key,
                        client: sub.client.client,
                    });
                };
                Some(evicted)
            } else {
                None
            };
            sub.index.store(list.len(), Relaxed);
            list.push(sub.clone());
            // Under the lock: a last subscriber going at the same time cannot
            // unsubscribe after this subscribes.
            if first && let Some(replicas) = &inner.replicas {
                replicas.clone().watch(key);
            }
            (first, evicted)
        };
        if let Some(evicted) = evicted {
            // Its connection task ends the stream; its handle, dropped
            // there, finds it out of the list already.
            evicted.cut_for(Cut::KeyFairShare);
        }
        inner
            .by_client
            .lock()
            .entry(sub.client.client)
            .or_default()
            .insert(sub.seq, sub.clone());
        let victim: std::sync::Weak<dyn Evict> = Arc::downgrade(&sub) as _;
        slot_guard.set_victim(victim);
        let metrics = &inner.metrics;
        metrics.subscriptions.inc();
        if first {
            metrics.topics.inc();
        }
        Ok((
            Subscription {
                hub: self.clone(),
                sub,
                _slot: slot_guard,
            },
            first,
        ))
    }

    /// Queues `frame`, from another replica, for every subscription of `key`.
    pub(crate) fn publish(&self, key: &Topic, frame: &Frame) -> Fanout {
        self.publish_from(key, frame, Publisher::Replicas)
    }

    /// Queues `frame`, published by `from`, for every subscription of `key`.
    pub(crate) fn publish_from(&self, key: &Topic, frame: &Frame, from: Publisher) -> Fanout {
        // A copy of the list (at most `max_per_key`), so that the offers,
        // which take each queue's lock, run outside the shard's.
        let subs: Vec<Arc<Sub>> = match self.inner.shard(key).lock().get(key) {
            Some(list) => list.clone(),
            None => return Fanout::default(),
        };
        let mut offered = Offered::default();
        for sub in &subs {
            let mut got = sub.offer(frame, from);
            if got.queued == 0
                && got.server_budget > 0
                && self.make_room_for(&sub.client, cost(frame))
            {
                got = sub.offer(frame, from);
            }
            offered.merge(got);
        }
        let metrics = &self.inner.metrics;
        if offered.queue_full + offered.client_budget + offered.server_budget > 0 {
            metrics.queue_full.inc_by(offered.queue_full);
            metrics.client_budget.inc_by(offered.client_budget);
            metrics.server_budget.inc_by(offered.server_budget);
        }
        Fanout {
            subscriptions: subs.len(),
            queued: usize::try_from(offered.queued).unwrap_or(usize::MAX),
        }
    }

    /// The server's budget has no room for `size` more bytes of `client`
    /// (an envelope for one of its subscribers, or a request it sends): if
    /// it holds less than its fair share of the budget (the limit
    /// divided by the clients holding any, itself included), the client
    /// holding the most loses its newest subscriptions that hold bytes
    /// (ended with RESOURCE_EXHAUSTED, their queues freed at once) until
    /// there is room, a few at most. Returns whether any went. O(clients
    /// with subscriptions): only at a full budget.
    pub(crate) fn make_room_for(&self, client: &ClientState, size: usize) -> bool {
        let inner = &*self.inner;
        let server = &inner.server;
        let me = client.client;
        let mine = client.budget.used();
        let mut victims = Vec::new();
        {
            let by_client = inner.by_client.lock();
            let mut holders = usize::from(mine == 0);
            let mut heaviest: Option<(&BTreeMap<u64, Arc<Sub>>, usize)> = None;
            for (client, subs) in by_client.iter() {
                let Some(first) = subs.values().next() else {
                    continue;
                };
                let used = first.client.budget.used();
                if used == 0 {
                    continue;
                }
                holders += 1;
                if *client != me && heaviest.is_none_or(|(_, most)| used > most) {
                    heaviest = Some((subs, used));
                }
            }
            // mine + size <= limit / holders, without fractions.
            let Some((subs, most)) = heaviest else {
                return false;
            };
            if (mine + size).saturating_mul(holders) > server.limit() || most <= mine + size {
                return false;
            }
            let mut freed = 0;
            for victim in subs.values().rev() {
                if victims.len() >= MAX_EVICTED_FOR_ROOM
                    || server.used().saturating_sub(freed) + size <= server.limit()
                {
                    break;
                }
                let held = victim.state.lock().queued;
                if held > 0 {
                    freed += held;
                    victims.push(victim.clone());
                }
            }
        }
        for victim in &victims {
            victim.cut_for(Cut::QueueFairShare);
            victim.close(false);
        }
        !victims.is_empty()
    }

    /// Ends every subscription of `keys` (their connection tasks send the
    /// status); returns how many there were.
    pub(crate) fn cut(&self, keys: &[Topic], why: Cut) -> usize {
        let subs: Vec<Arc<Sub>> = keys
            .iter()
            .flat_map(|k| {
                self.inner
                    .shard(k)
                    .lock()
                    .get(k)
                    .cloned()
                    .unwrap_or_default()
            })
            .collect();
        for sub in &subs {
            sub.cut_for(why);
        }
        subs.len()
    }

    /// Takes `sub` out of its key's list; returns whether it was the last.
    fn remove(&self, sub: &Arc<Sub>) -> bool {
        let inner = &*self.inner;
        {
            let mut by_client = inner.by_client.lock();
            if let Some(subs) = by_client.get_mut(&sub.client.client) {
                subs.remove(&sub.seq);
                if subs.is_empty() {
                    by_client.remove(&sub.client.client);
                }
            }
        }
        let mut shard = inner.shard(&sub.key).lock();
        let index = sub.index.swap(NOT_LISTED, Relaxed);
        if index == NOT_LISTED {
            return false;
        }
        let Some(list) = shard.get_mut(&sub.key) else {
            return false;
        };
        take_out(list, index);
        if !list.is_empty() {
            return false;
        }
        shard.remove(&sub.key);
        if let Some(replicas) = &inner.replicas {
            replicas.unwatch(&sub.key);
        }
        true
    }

    /// Number of keys with subscriptions.
    #[cfg(test)]
    pub(crate) fn topic_count(&self) -> usize {
        self.inner.shards.iter().map(|s| s.lock().len()).sum()
    }
}

/// Where one published envelope went.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Fanout {
    /// The key's subscription streams.
    pub(crate) subscriptions: usize,
    /// Those whose queue took the envelope: its recipients.
    pub(crate) queued: usize,
}

/// Removes the subscription at `index` of `list` in O(1): the last one takes its place.
fn take_out(list: &mut Vec<Arc<Sub>>, index: usize) -> Arc<Sub> {
    let gone = list.swap_remove(index);
    if let Some(moved) = list.get(index) {
        moved.index.store(index, Relaxed);
    }
    gone
}

/// A full key's list and a newcomer from `client`: if the newcomer holds
/// less than its fair share, takes the most recent subscription of the
/// client that holds the most out of `list` and returns it. O(`max`): only
/// on a full key.
fn make_room(list: &mut Vec<Arc<Sub>>, client: Client, max: usize) -> Option<Arc<Sub>> {
    let mut held: HashMap<Client, usize> = HashMap::new();
    for sub in list.iter() {
        *held.entry(sub.client.client).or_default() += 1;
    }
    let mine = held.get(&client).copied().unwrap_or(0);
    let holders = held.len() + usize::from(mine == 0);
    // mine < max / holders, without fractions.
    if mine * holders >= max {
        return None;
    }
    let (&heaviest, _) = held.iter().max_by_key(|&(_, n)| *n)?;
    let index = list
        .iter()
        .enumerate()
        .filter(|(_, s)| s.client.client == heaviest)
        .max_by_key(|(_, s)| s.seq)
        .map(|(i, _)| i)?;
    let evicted = take_out(list, index);
    evicted.index.store(NOT_LISTED, Relaxed);
    Some(evicted)
}

/// A subscription in the hub; dropping it unsubscribes and frees its queue.
pub(crate) struct Subscription {
    hub: Hub,
    sub: Arc<Sub>,
    _slot: SlotGuard,
}

impl Subscription {
    pub(crate) fn sub(&self) -> &Arc<Sub> {
        &self.sub
    }

    /// Unsubscribes, handing out what its queue holds (as [`Sub::take`]
    /// does, whatever the stream's window and what is in flight) for the
    /// stream's last writes: publishers were told those envelopes were
    /// delivered. At most the queue's byte limit.
    pub(crate) fn end(self) -> Vec<Bytes> {
        self.sub.close(true)
    }
}

impl std::ops::Drop for Subscription {
    fn drop(&mut self) {
        let last = self.hub.remove(&self.sub);
        let metrics = &self.hub.inner.metrics;
        metrics.subscriptions.dec();
        if last {
            metrics.topics.dec();
        }
        self.sub.close(false);
    }
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use super::*;
    use crate::client::{ClientLimits, Clients, Rate};

    fn frame(n: u8, body: usize) -> Frame {
        Frame::with_prefix(&vec![n; body])
    }

    struct Fixture {
        clients: Arc<Clients>,
        hub: Hub,
        metrics: Arc<Metrics>,
        _conns: Vec<crate::client::ConnectionGuard>,
    }

    fn fixture(
        depth: usize,
        queue_bytes: usize,
        client_bytes: usize,
        server_bytes: usize,
    ) -> Fixture {
        let one = std::num::NonZeroU32::new(1000).unwrap();
        let rate = Rate {
            per_second: one,
            burst: one,
        };
        let clients = Arc::new(Clients::new(
            ClientLimits {
                connections: 10,
                subscriptions: 10,
                calls: 10,
                queued_bytes: client_bytes,
                connection_rate: rate,
                request_rate: rate,
                publish_rate: rate,
                publish_bytes_rate: rate,
                address: crate::client::tests::UNBOUNDED,
            },
            1000,
            100,
            100,
            Default::default(),
        ));
        let metrics = Metrics::new();
        let hub = Hub::new(
            QueueLimits {
                depth,
                bytes: queue_bytes,
            },
            4,
            Arc::new(Budget::new(server_bytes)),
            metrics.clone(),
            |_| None,
        );
        Fixture {
            clients,
            hub,
            metrics,
            _conns: Vec::new(),
        }
    }

    impl Fixture {
        fn subscribe(
            &mut self,
            key: u8,
            ip: &str,
            mailbox: &Arc<Mailbox>,
            slot: usize,
        ) -> Subscription {
            self.try_subscribe(key, ip, mailbox, slot).unwrap()
        }

        fn try_subscribe(
            &mut self,
            key: u8,
            ip: &str,
            mailbox: &Arc<Mailbox>,
            slot: usize,
        ) -> Result<Subscription, KeyFull> {
            let addr = ip.parse::<IpAddr>().unwrap();
            let conn = self.clients.connect(addr).unwrap();
            let state = conn.state().clone();
            let origin = conn.origin();
            self._conns.push(conn);
            let guard = self.clients.subscribe(state.client, origin).unwrap();
            self.hub
                .subscribe([key; 32], state, guard, mailbox.clone(), slot)
                .map(|(s, _)| s)
        }
    }

    fn drain(sub: &Arc<Sub>) -> Vec<Bytes> {
        std::iter::from_fn(|| match sub.take(usize::MAX) {
            Take::Frame(frame) => Some(frame),
            _ => None,
        })
        .collect()
    }

    #[test]
    fn fan_out_posts_each_slot_once_and_drops_oldest_first() {
        let mut f = fixture(3, 1 << 20, 1 << 20, 1 << 20);
        let mailbox = Arc::new(Mailbox::default());
        let a = f.subscribe(1, "192.0.2.1", &mailbox, 7);
        let b = f.subscribe(1, "192.0.2.2", &mailbox, 8);
        for n in 0..5 {
            let fanout = f.hub.publish(&[1; 32], &frame(n, 10));
            assert_eq!((fanout.subscriptions, fanout.queued), (2, 2));
        }
        let mut slots = Vec::new();
        mailbox.take(&mut slots);
        assert_eq!(slots, vec![7, 8], "posted once each");
        let got: Vec<u8> = drain(a.sub()).iter().map(|f| f[5]).collect();
        assert_eq!(got, vec![2, 3, 4], "the oldest two went");
        assert_eq!(f.metrics.queue_full.get(), 4);
        assert_eq!(f.hub.publish(&[2; 32], &frame(9, 10)), Fanout::default());
        drop((a, b));
        assert_eq!(f.hub.topic_count(), 0);
        assert_eq!(f.hub.budget().used(), 0, "everything given back");
    }

    #[test]
    fn bytes_count_until_written_and_in_flight_is_bounded() {
        let mut f = fixture(100, 1 << 20, 1 << 20, 1 << 20);
        let mailbox = Arc::new(Mailbox::default());
        let a = f.subscribe(1, "192.0.2.1", &mailbox, 0);
        let size = cost(&frame(0, 4000));
        for n in 0..10 {
            f.hub.publish(&[1; 32], &frame(n, 4000));
        }
        let handed = drain(a.sub());
        // 16 KiB in flight: four 4005-byte frames.
        assert_eq!(handed.len(), IN_FLIGHT_PER_STREAM / size);
        assert_eq!(f.hub.budget().used(), 10 * size);
        assert_eq!(mailbox.waiting(), 1);
        // Written: the bytes come back and the slot is posted again.
        let mut slots = Vec::new();
        mailbox.take(&mut slots);
        drop(handed);
        assert_eq!(f.hub.budget().used(), (10 - 4) * size);
        mailbox.take(&mut slots);
        assert_eq!(slots, vec![0]);
        let rest = drain(a.sub());
        assert_eq!(rest.len(), 4);
        // A piece of a frame (HTTP/2 may split it) keeps the whole counted.
        let mut first = rest.into_iter().next().unwrap();
        let tail = first.split_off(100);
        drop(first);
        assert!(f.hub.budget().used() >= size);
        drop(tail);
        drop(a);
        assert_eq!(f.hub.budget().used(), 0);
        assert_eq!(mailbox.waiting(), 0);
    }

    #[test]
    fn a_full_client_budget_costs_that_client_only() {
        let size = cost(&frame(0, 1000));
        let mut f = fixture(100, 1 << 20, 3 * size, 100 * size);
        let mailbox = Arc::new(Mailbox::default());
        // Two subscriptions of one client, one of another, all on one key.
        let a1 = f.subscribe(1, "192.0.2.1", &mailbox, 0);
        let a2 = f.subscribe(1, "192.0.2.1", &mailbox, 1);
        let b = f.subscribe(1, "192.0.2.2", &mailbox, 2);
        for n in 0..3 {
            f.hub.publish(&[1; 32], &frame(n, 1000));
        }
        let seqs = |s: &Subscription| {
            let state = s.sub().state.lock();
            state
                .queue
                .iter()
                .map(|(f, _)| f.message()[0])
                .collect::<Vec<_>>()
        };
        // Client A needs two copies of each and may hold 3 in all: it lost
        // some of its own; B, holding 3 of its own 3, lost nothing.
        assert_eq!(seqs(&b), vec![0, 1, 2]);
        assert_eq!(seqs(&a1).len() + seqs(&a2).len(), 3);
        assert_eq!(seqs(&a2).last(), Some(&2), "the newest is kept");
        assert_eq!(f.metrics.client_budget.get(), 3);
        drop((a1, a2, b));
        assert_eq!(f.hub.budget().used(), 0);
    }

    #[test]
    fn the_server_budget_keeps_a_backlog_and_refuses_what_cannot_fit() {
        let size = cost(&frame(0, 1000));
        let mut f = fixture(100, 1 << 20, 100 * size, 5 * size);
        let mailbox = Arc::new(Mailbox::default());
        let a = f.subscribe(1, "192.0.2.1", &mailbox, 0);
        let b = f.subscribe(2, "192.0.2.2", &mailbox, 1);
        for n in 0..4 {
            f.hub.publish(&[1; 32], &frame(n, 1000));
        }
        f.hub.publish(&[2; 32], &frame(9, 1000));
        // A bigger one would not fit even in an empty b: it goes, b keeps 9,
        // and it has no recipient.
        let fanout = f.hub.publish(&[2; 32], &frame(10, 2000));
        assert_eq!((fanout.subscriptions, fanout.queued), (1, 0));
        assert_eq!(b.sub().state.lock().queue.len(), 1);
        assert_eq!(b.sub().state.lock().queue[0].0.message()[0], 9);
        assert_eq!(f.metrics.server_budget.get(), 1);
        // One of the same size takes the place of b's oldest.
        f.hub.publish(&[2; 32], &frame(11, 1000));
        assert_eq!(b.sub().state.lock().queue[0].0.message()[0], 11);
        assert_eq!(f.metrics.server_budget.get(), 2);
        drop((a, b));
        assert_eq!(f.hub.budget().used(), 0);
    }

    #[test]
    fn a_full_server_budget_makes_room_for_a_client_below_its_share() {
        let size = cost(&frame(0, 1000));
        let mut f = fixture(100, 1 << 20, 100 * size, 10 * size);
        let mailbox = Arc::new(Mailbox::default());
        // A fills the server's budget through two subscriptions.
        let a1 = f.subscribe(1, "192.0.2.1", &mailbox, 0);
        let a2 = f.subscribe(2, "192.0.2.1", &mailbox, 1);
        for n in 0..5 {
            f.hub.publish(&[1; 32], &frame(n, 1000));
            f.hub.publish(&[2; 32], &frame(n, 1000));
        }
        assert_eq!(f.hub.budget().used(), 10 * size);
        // B holds nothing: its envelope gets room, at the cost of A's newest.
        let b = f.subscribe(3, "192.0.2.2", &mailbox, 2);
        let fanout = f.hub.publish(&[3; 32], &frame(9, 1000));
        assert_eq!((fanout.subscriptions, fanout.queued), (1, 1));
        assert_eq!(a2.sub().cut(), Some(Cut::QueueFairShare));
        assert_eq!(a1.sub().cut(), None);
        assert_eq!(f.hub.budget().used(), 6 * size);
        // B within its share (5 of 10 with two holders) gets more; at its
        // share, it loses its own oldest instead.
        for n in 10..14 {
            f.hub.publish(&[3; 32], &frame(n, 1000));
        }
        assert_eq!(b.sub().state.lock().queue.len(), 5);
        f.hub.publish(&[3; 32], &frame(20, 1000));
        assert_eq!(a1.sub().cut(), None, "A is at its share");
        assert_eq!(b.sub().state.lock().queue.len(), 5);
        drop((a1, a2, b));
        assert_eq!(f.hub.budget().used(), 0);
    }

    #[test]
    fn an_ended_subscription_takes_nothing_more() {
        let mut f = fixture(4, 1 << 20, 1 << 20, 1 << 20);
        let mailbox = Arc::new(Mailbox::default());
        let a = f.subscribe(1, "192.0.2.1", &mailbox, 0);
        f.hub.publish(&[1; 32], &frame(1, 10));
        let sub = a.sub().clone();
        drop(a);
        assert_eq!(f.hub.budget().used(), 0);
        // A publisher that copied the list before the end offers late.
        assert_eq!(
            sub.offer(&frame(2, 10), Publisher::Replicas),
            Offered::default()
        );
        assert!(matches!(sub.take(usize::MAX), Take::Nothing));
        assert_eq!(f.hub.budget().used(), 0, "no bytes left behind");
    }

    #[test]
    fn an_ended_subscription_hands_out_its_queue_counted_until_written() {
        let mut f = fixture(4, 1 << 20, 1 << 20, 1 << 20);
        let mailbox = Arc::new(Mailbox::default());
        let a = f.subscribe(1, "192.0.2.1", &mailbox, 0);
        f.hub.publish(&[1; 32], &frame(1, 10));
        f.hub.publish(&[1; 32], &frame(2, 10));
        let sub = a.sub().clone();
        let last = a.end();
        let firsts: Vec<u8> = last.iter().map(|b| b[crate::wire::PREFIX_LEN]).collect();
        assert_eq!(firsts, [1, 2]);
        // Unsubscribed: nothing more is queued, and the key is gone.
        assert_eq!(f.hub.publish(&[1; 32], &frame(3, 10)).subscriptions, 0);
        assert_eq!(
            sub.offer(&frame(4, 10), Publisher::Replicas),
            Offered::default()
        );
        // The handed-out bytes stay counted until HTTP/2 drops them.
        assert!(f.hub.budget().used() > 0);
        drop(last);
        assert_eq!(f.hub.budget().used(), 0, "no bytes left behind");
    }

    #[test]
    fn a_full_key_admits_a_client_below_its_share_at_the_heaviest_cost() {
        let mut f = fixture(4, 1 << 20, 1 << 20, 1 << 20);
        let mailbox = Arc::new(Mailbox::default());
        // Four of one client fill the key (the fixture's cap is 4).
        let a: Vec<Subscription> = (0..4)
            .map(|slot| f.subscribe(1, "192.0.2.1", &mailbox, slot))
            .collect();
        assert!(matches!(
            f.try_subscribe(1, "192.0.2.1", &mailbox, 9),
            Err(KeyFull { limit: 4, .. })
        ));
        // A newcomer gets in; A's most recent goes.
        let b = f.subscribe(1, "192.0.2.2", &mailbox, 10);
        assert_eq!(a[3].sub().cut(), Some(Cut::KeyFairShare));
        assert!(a[..3].iter().all(|s| s.sub().cut().is_none()));
        assert_eq!(f.hub.publish(&[1; 32], &frame(1, 10)).subscriptions, 4);
        // B holds 1 of 4 with two holders: below its share of 2, it gets one more.
        let b2 = f.subscribe(1, "192.0.2.2", &mailbox, 11);
        assert_eq!(a[2].sub().cut(), Some(Cut::KeyFairShare));
        // Now both hold 2: neither may take more.
        assert!(f.try_subscribe(1, "192.0.2.2", &mailbox, 12).is_err());
        assert!(f.try_subscribe(1, "192.0.2.1", &mailbox, 13).is_err());
        // Dropping the cut ones (their handles) changes nothing in the list.
        let mut a = a;
        a.truncate(2);
        assert_eq!(f.hub.publish(&[1; 32], &frame(2, 10)).subscriptions, 4);
        // Removing in any order keeps every place right.
        drop(b);
        assert_eq!(f.hub.publish(&[1; 32], &frame(3, 10)).subscriptions, 3);
        drop(a);
        assert_eq!(f.hub.publish(&[1; 32], &frame(4, 10)).subscriptions, 1);
        drop(b2);
        assert_eq!(f.hub.topic_count(), 0);
        assert_eq!(f.hub.budget().used(), 0);
    }

    #[test]
    fn a_full_queue_drops_the_heaviest_publishers_envelopes_first() {
        let mut f = fixture(100, 10 * cost(&frame(0, 1000)), 1 << 20, 1 << 20);
        let mailbox = Arc::new(Mailbox::default());
        let victim = f.subscribe(1, "192.0.2.1", &mailbox, 0);
        let peer = Publisher::Client(crate::client::Client::of([192, 0, 2, 2].into()));
        let flooder = Publisher::Client(crate::client::Client::of([192, 0, 2, 3].into()));
        // The peer's envelopes come between the flood's, which is 30 times as much.
        for n in 0..30u8 {
            if n % 10 == 0 {
                f.hub.publish_from(&[1; 32], &frame(200 + n, 1000), peer);
            }
            f.hub.publish_from(&[1; 32], &frame(n, 1000), flooder);
        }
        let got: Vec<u8> = drain(victim.sub()).iter().map(|f| f[5]).collect();
        // The peer's three stay; the flood keeps its newest seven.
        assert_eq!(got.iter().filter(|&&b| b >= 200).count(), 3, "{got:?}");
        assert_eq!(
            got.iter()
                .filter(|&&b| b < 200)
                .copied()
                .collect::<Vec<_>>(),
            (23..30).collect::<Vec<u8>>()
        );
        assert_eq!(f.metrics.queue_full.get(), 23);
        drop(victim);
        assert_eq!(f.hub.budget().used(), 0);
    }
}
