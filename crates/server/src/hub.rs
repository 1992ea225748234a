//! The fan-out core: subscription queues by key. No gRPC in here.
//!
//! Each subscription stream has its own queue, bounded in envelopes and in
//! bytes, and all queues together are bounded in bytes. Publishing pushes into
//! every queue of the key without waiting; a full queue drops its oldest
//! envelopes (newer credentials matter more) and counts them. A key's state
//! goes away with its last subscription. Subscriptions are bounded in all and
//! per client, so that one client cannot take every slot.

use std::{
    collections::{HashMap, VecDeque},
    fmt,
    net::{IpAddr, Ipv6Addr},
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicUsize, Ordering::Relaxed},
    },
};

use cunicu_signal::proto::signaling::Envelope;
use prost::Message as _;
use tokio::sync::Notify;

use crate::metrics::Metrics;

type Topic = [u8; 32];

/// The limits of a [`Hub`].
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Envelopes per queue.
    pub depth: usize,
    /// Bytes per queue (encoded envelope sizes).
    pub queue_bytes: usize,
    /// Bytes in all queues together.
    pub total_bytes: usize,
    /// Subscriptions at once.
    pub subscriptions: usize,
    /// Subscriptions at once of one [`Client`].
    pub per_client: usize,
}

/// Who opened a subscription, for the per-client limit: the remote IP
/// address; an IPv6 address by its /64, as a host usually holds a whole /64.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Client(IpAddr);

impl Client {
    /// The client at `addr`.
    pub fn of(addr: IpAddr) -> Client {
        match addr {
            IpAddr::V4(_) => Client(addr),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => Client(IpAddr::V4(v4)),
                None => Client(IpAddr::V6(Ipv6Addr::from_bits(
                    v6.to_bits() & !u128::from(u64::MAX),
                ))),
            },
        }
    }
}

impl fmt::Display for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            IpAddr::V4(v4) => v4.fmt(f),
            IpAddr::V6(v6) => write!(f, "{v6}/64"),
        }
    }
}

#[derive(Default)]
struct Items {
    /// Envelopes with their encoded sizes.
    queue: VecDeque<(Arc<Envelope>, usize)>,
    bytes: usize,
    /// The subscription has ended: a publisher that copied the queue list
    /// before must not add to it (its bytes would never be given back).
    closed: bool,
}

struct Queue {
    items: Mutex<Items>,
    ready: Notify,
}

impl Queue {
    fn items(&self) -> MutexGuard<'_, Items> {
        self.items.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[derive(Default)]
struct Tables {
    topics: HashMap<Topic, Vec<Arc<Queue>>>,
    /// Open subscriptions by client (only those with some).
    clients: HashMap<Client, usize>,
    /// Open subscriptions.
    subscriptions: usize,
}

struct Inner {
    tables: Mutex<Tables>,
    limits: Limits,
    /// Bytes in all queues.
    queued: AtomicUsize,
    metrics: Arc<Metrics>,
}

/// Subscriptions by key. Cheap to clone.
#[derive(Clone)]
pub struct Hub {
    inner: Arc<Inner>,
}

/// A limit on subscriptions was reached.
#[derive(Debug, thiserror::Error)]
pub enum TooManySubscriptions {
    /// The server's limit, for all clients together.
    #[error("the server has reached its limit of {0} subscriptions")]
    Server(usize),
    /// The limit of one client.
    #[error("{client} has reached the limit of {limit} subscriptions per client")]
    Client {
        /// The client.
        client: Client,
        /// Its limit.
        limit: usize,
    },
}

impl Hub {
    /// A hub with these limits (each at least 1, as [`crate::Server::spawn`]
    /// checks).
    pub fn new(limits: Limits, metrics: Arc<Metrics>) -> Self {
        Hub {
            inner: Arc::new(Inner {
                tables: Mutex::new(Tables::default()),
                limits,
                queued: AtomicUsize::new(0),
                metrics,
            }),
        }
    }

    fn tables(&self) -> MutexGuard<'_, Tables> {
        self.inner.tables.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Opens a subscription to `key` for `client` (none: only the server's
    /// limit applies). It ends when the returned value drops.
    pub fn subscribe(
        &self,
        key: Topic,
        client: Option<Client>,
    ) -> Result<Subscription, TooManySubscriptions> {
        let queue = Arc::new(Queue {
            items: Mutex::new(Items::default()),
            ready: Notify::new(),
        });
        let mut tables = self.tables();
        let (metrics, limits) = (&self.inner.metrics, &self.inner.limits);
        if tables.subscriptions >= limits.subscriptions {
            return Err(TooManySubscriptions::Server(limits.subscriptions));
        }
        if let Some(client) = client {
            if tables
                .clients
                .get(&client)
                .is_some_and(|n| *n >= limits.per_client)
            {
                return Err(TooManySubscriptions::Client {
                    client,
                    limit: limits.per_client,
                });
            }
            *tables.clients.entry(client).or_default() += 1;
        }
        tables.subscriptions += 1;
        let list = tables.topics.entry(key).or_insert_with(|| {
            metrics.topics.inc();
            Vec::new()
        });
        list.push(queue.clone());
        metrics.subscriptions.inc();
        Ok(Subscription {
            hub: self.clone(),
            key,
            client,
            queue,
        })
    }

    /// Hands `envelope` to every subscription of `key`; returns how many there were.
    pub fn publish(&self, key: &Topic, envelope: Envelope) -> usize {
        // Copy the queue list out so that the fan-out does not hold the map's lock.
        let queues: Vec<Arc<Queue>> = match self.tables().topics.get(key) {
            Some(list) => list.clone(),
            None => return 0,
        };
        let size = envelope.encoded_len();
        let envelope = Arc::new(envelope);
        let mut dropped = 0;
        for queue in &queues {
            dropped += self.offer(queue, &envelope, size);
        }
        if dropped > 0 {
            self.inner.metrics.queue_full.inc_by(dropped);
        }
        queues.len()
    }

    /// Puts `envelope` (`size` bytes encoded) into `queue`, making room by
    /// dropping the queue's oldest envelopes; returns how many envelopes were
    /// dropped (the new one included, when it cannot fit).
    fn offer(&self, queue: &Queue, envelope: &Arc<Envelope>, size: usize) -> u64 {
        let (limits, queued) = (&self.inner.limits, &self.inner.queued);
        let mut items = queue.items();
        if items.closed {
            return 0;
        }
        // Larger than a whole queue, or than what the other queues leave of
        // the hub's budget: emptying this queue would not make room.
        let others = queued.load(Relaxed).saturating_sub(items.bytes);
        if size > limits.queue_bytes || others + size > limits.total_bytes {
            return 1;
        }
        let mut dropped = 0;
        loop {
            let fits_queue =
                items.queue.len() < limits.depth && items.bytes + size <= limits.queue_bytes;
            // Reserve the bytes in the hub's budget at once, so that
            // concurrent publishers cannot overshoot it together.
            if fits_queue
                && queued
                    .fetch_update(Relaxed, Relaxed, |q| {
                        (q + size <= limits.total_bytes).then_some(q + size)
                    })
                    .is_ok()
            {
                break;
            }
            let Some((_, old)) = items.queue.pop_front() else {
                // Others took the budget meanwhile.
                return dropped + 1;
            };
            items.bytes -= old;
            queued.fetch_sub(old, Relaxed);
            dropped += 1;
        }
        items.queue.push_back((envelope.clone(), size));
        items.bytes += size;
        drop(items);
        queue.ready.notify_one();
        dropped
    }

    /// Number of keys with subscriptions.
    pub fn topic_count(&self) -> usize {
        self.tables().topics.len()
    }

    /// Number of clients with subscriptions.
    pub fn client_count(&self) -> usize {
        self.tables().clients.len()
    }
}

/// One subscription stream's queue. Dropping it unsubscribes.
pub struct Subscription {
    hub: Hub,
    key: Topic,
    client: Option<Client>,
    queue: Arc<Queue>,
}

impl Subscription {
    /// The next envelope, waiting for one if the queue is empty.
    pub async fn next(&self) -> Envelope {
        loop {
            let popped = {
                let mut items = self.queue.items();
                items
                    .queue
                    .pop_front()
                    .inspect(|(_, size)| items.bytes -= size)
            };
            if let Some((envelope, size)) = popped {
                self.hub.inner.queued.fetch_sub(size, Relaxed);
                self.hub.inner.metrics.delivered.inc();
                return Arc::unwrap_or_clone(envelope);
            }
            // notify_one keeps a permit if nobody waits: no wake-up is lost.
            self.queue.ready.notified().await;
        }
    }

    /// How many envelopes wait in the queue.
    pub fn queued(&self) -> usize {
        self.queue.items().queue.len()
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let metrics = &self.hub.inner.metrics;
        let mut tables = self.hub.tables();
        if let Some(list) = tables.topics.get_mut(&self.key) {
            list.retain(|q| !Arc::ptr_eq(q, &self.queue));
            if list.is_empty() {
                tables.topics.remove(&self.key);
                metrics.topics.dec();
            }
        }
        if let Some(client) = self.client
            && let Some(open) = tables.clients.get_mut(&client)
        {
            *open -= 1;
            if *open == 0 {
                tables.clients.remove(&client);
            }
        }
        tables.subscriptions -= 1;
        metrics.subscriptions.dec();
        drop(tables);
        let mut items = self.queue.items();
        items.closed = true;
        items.queue.clear();
        let bytes = std::mem::take(&mut items.bytes);
        self.hub.inner.queued.fetch_sub(bytes, Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(depth: usize, subscriptions: usize) -> Limits {
        Limits {
            depth,
            queue_bytes: 1 << 20,
            total_bytes: 1 << 30,
            subscriptions,
            per_client: subscriptions,
        }
    }

    fn sized(n: u8, body: usize) -> Envelope {
        Envelope {
            sender: vec![n; 32],
            recipient: vec![1; 32],
            contents: Some(cunicu_signal::proto::signaling::EncryptedMessage {
                body: vec![0; body],
                nonce: vec![0; 24],
            }),
        }
    }

    #[tokio::test]
    async fn byte_budgets_bound_memory() {
        let metrics = Metrics::new();
        let size = sized(0, 1000).encoded_len();
        // Each queue holds 3 envelopes by bytes; all queues together 5.
        let hub = Hub::new(
            Limits {
                depth: 100,
                queue_bytes: 3 * size,
                total_bytes: 5 * size,
                subscriptions: 10,
                per_client: 10,
            },
            metrics.clone(),
        );
        let a = hub.subscribe([1; 32], None).unwrap();
        for n in 0..10 {
            hub.publish(&[1; 32], sized(n, 1000));
        }
        assert_eq!(a.queued(), 3, "per-queue byte limit");
        assert_eq!(a.next().await, sized(7, 1000), "the oldest went first");
        let b = hub.subscribe([2; 32], None).unwrap();
        for n in 0..10 {
            hub.publish(&[2; 32], sized(n, 1000));
        }
        // a holds 2, so b gets the 3 the hub budget has left.
        assert_eq!((a.queued(), b.queued()), (2, 3));
        assert_eq!(hub.inner.queued.load(Relaxed), 5 * size);
        drop(b);
        assert_eq!(
            hub.inner.queued.load(Relaxed),
            2 * size,
            "a dropped stream returns its bytes"
        );
        a.next().await;
        a.next().await;
        assert_eq!(hub.inner.queued.load(Relaxed), 0);
    }

    #[tokio::test]
    async fn a_queue_keeps_its_backlog_when_the_budget_is_held_by_others() {
        let metrics = Metrics::new();
        let small = sized(0, 1000).encoded_len();
        let big = sized(0, 2000).encoded_len();
        let hub = Hub::new(
            Limits {
                depth: 100,
                queue_bytes: 10 * small,
                total_bytes: 5 * small,
                subscriptions: 10,
                per_client: 10,
            },
            metrics.clone(),
        );
        let (a, b) = (
            hub.subscribe([1; 32], None).unwrap(),
            hub.subscribe([2; 32], None).unwrap(),
        );
        for n in 0..4 {
            hub.publish(&[1; 32], sized(n, 1000));
        }
        hub.publish(&[2; 32], sized(9, 1000));
        // a holds 4 of the 5 budget units: b's envelope stays, the big one
        // (which would not fit even in an empty b) is dropped.
        hub.publish(&[2; 32], sized(10, 2000));
        assert_eq!((a.queued(), b.queued()), (4, 1));
        assert_eq!(b.next().await, sized(9, 1000));
        assert_eq!(metrics.queue_full.get(), 1);
        assert_eq!(hub.inner.queued.load(Relaxed), 4 * small);
        assert!(big > small);
    }

    #[test]
    fn an_ended_subscription_takes_nothing_more() {
        let hub = Hub::new(limits(4, 10), Metrics::new());
        let sub = hub.subscribe([1; 32], None).unwrap();
        hub.publish(&[1; 32], envelope(1));
        // A publisher that copied the queue list before the end offers late.
        let queue = sub.queue.clone();
        drop(sub);
        assert_eq!(hub.inner.queued.load(Relaxed), 0);
        let late = Arc::new(envelope(2));
        assert_eq!(hub.offer(&queue, &late, late.encoded_len()), 0);
        assert_eq!(queue.items().queue.len(), 0);
        assert_eq!(hub.inner.queued.load(Relaxed), 0, "no bytes left behind");
    }

    fn envelope(n: u8) -> Envelope {
        Envelope {
            sender: vec![n; 32],
            recipient: vec![1; 32],
            contents: None,
        }
    }

    #[tokio::test]
    async fn fan_out_and_cleanup() {
        let metrics = Metrics::new();
        let hub = Hub::new(limits(4, 10), metrics.clone());
        let a = hub.subscribe([1; 32], None).unwrap();
        let b = hub.subscribe([1; 32], None).unwrap();
        assert_eq!(hub.publish(&[1; 32], envelope(7)), 2);
        assert_eq!(hub.publish(&[2; 32], envelope(8)), 0);
        assert_eq!(a.next().await, envelope(7));
        assert_eq!(b.next().await, envelope(7));
        assert_eq!((metrics.subscriptions.get(), metrics.topics.get()), (2, 1));
        drop(a);
        drop(b);
        assert_eq!(hub.topic_count(), 0);
        assert_eq!((metrics.subscriptions.get(), metrics.topics.get()), (0, 0));
        assert_eq!(metrics.delivered.get(), 2);
    }

    #[tokio::test]
    async fn full_queue_drops_oldest_first() {
        let metrics = Metrics::new();
        let hub = Hub::new(limits(3, 10), metrics.clone());
        let slow = hub.subscribe([1; 32], None).unwrap();
        for n in 0..5 {
            hub.publish(&[1; 32], envelope(n));
        }
        assert_eq!(slow.queued(), 3);
        for n in 2..5 {
            assert_eq!(slow.next().await, envelope(n));
        }
        assert!(
            metrics
                .encode()
                .contains("signaling_envelopes_dropped_total{reason=\"queue_full\"} 2")
        );
    }

    #[test]
    fn subscription_limit() {
        let hub = Hub::new(limits(3, 2), Metrics::new());
        let _a = hub.subscribe([1; 32], None).unwrap();
        let _b = hub.subscribe([2; 32], None).unwrap();
        assert!(matches!(
            hub.subscribe([3; 32], None),
            Err(TooManySubscriptions::Server(2))
        ));
    }

    fn client(text: &str) -> Option<Client> {
        Some(Client::of(text.parse().unwrap()))
    }

    #[test]
    fn per_client_limit() {
        let hub = Hub::new(
            Limits {
                per_client: 2,
                ..limits(3, 5)
            },
            Metrics::new(),
        );
        let a1 = hub.subscribe([1; 32], client("192.0.2.1")).unwrap();
        let _a2 = hub.subscribe([1; 32], client("::ffff:192.0.2.1")).unwrap();
        let refused = hub.subscribe([2; 32], client("192.0.2.1")).err();
        assert!(
            matches!(refused, Some(TooManySubscriptions::Client { limit: 2, .. })),
            "{refused:?}"
        );
        assert_eq!(
            refused.map(|e| e.to_string()).as_deref(),
            Some("192.0.2.1 has reached the limit of 2 subscriptions per client")
        );
        // Others are not affected, and neither is a subscription without a client.
        let _b = hub.subscribe([2; 32], client("192.0.2.2")).unwrap();
        let _none = hub.subscribe([2; 32], None).unwrap();
        // A closed subscription frees its slot.
        drop(a1);
        let _a3 = hub.subscribe([3; 32], client("192.0.2.1")).unwrap();
        assert_eq!(hub.client_count(), 2);
        // The server's limit still holds for all.
        let _c = hub.subscribe([3; 32], client("192.0.2.3")).unwrap();
        assert!(matches!(
            hub.subscribe([3; 32], client("192.0.2.4")),
            Err(TooManySubscriptions::Server(5))
        ));
        assert_eq!(hub.client_count(), 3, "a refused client has no entry");
    }

    #[test]
    fn ipv6_clients_are_counted_by_their_64() {
        let hub = Hub::new(
            Limits {
                per_client: 1,
                ..limits(3, 5)
            },
            Metrics::new(),
        );
        let a = hub.subscribe([1; 32], client("2001:db8:1:2::1")).unwrap();
        let refused = hub
            .subscribe([1; 32], client("2001:db8:1:2:ffff::9"))
            .err()
            .map(|e| e.to_string());
        assert_eq!(
            refused.as_deref(),
            Some("2001:db8:1:2::/64 has reached the limit of 1 subscriptions per client")
        );
        let _other = hub.subscribe([1; 32], client("2001:db8:1:3::1")).unwrap();
        drop(a);
        let _again = hub.subscribe([1; 32], client("2001:db8:1:2::7")).unwrap();
        assert_eq!(hub.client_count(), 2);
    }
}
