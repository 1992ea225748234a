//! The fan-out core: subscription queues by key. No gRPC in here.
//!
//! Each subscription stream has its own queue, bounded in envelopes and in
//! bytes, and all queues together are bounded in bytes. Publishing pushes into
//! every queue of the key without waiting; a full queue drops its oldest
//! envelopes (newer credentials matter more) and counts them. A key's state
//! goes away with its last subscription.

use std::{
    collections::{HashMap, VecDeque},
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
}

#[derive(Default)]
struct Items {
    /// Envelopes with their encoded sizes.
    queue: VecDeque<(Arc<Envelope>, usize)>,
    bytes: usize,
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

struct Inner {
    topics: Mutex<HashMap<Topic, Vec<Arc<Queue>>>>,
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

/// The limit on subscriptions was reached.
#[derive(Debug, thiserror::Error)]
#[error("the server has reached its limit of {0} subscriptions")]
pub struct TooManySubscriptions(pub usize);

impl Hub {
    /// A hub with these limits.
    pub fn new(limits: Limits, metrics: Arc<Metrics>) -> Self {
        Hub {
            inner: Arc::new(Inner {
                topics: Mutex::new(HashMap::new()),
                limits: Limits {
                    depth: limits.depth.max(1),
                    ..limits
                },
                queued: AtomicUsize::new(0),
                metrics,
            }),
        }
    }

    fn topics(&self) -> MutexGuard<'_, HashMap<Topic, Vec<Arc<Queue>>>> {
        self.inner.topics.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Opens a subscription to `key`. It ends when the returned value drops.
    pub fn subscribe(&self, key: Topic) -> Result<Subscription, TooManySubscriptions> {
        let queue = Arc::new(Queue {
            items: Mutex::new(Items::default()),
            ready: Notify::new(),
        });
        let mut topics = self.topics();
        let metrics = &self.inner.metrics;
        if metrics.subscriptions.get() as usize >= self.inner.limits.subscriptions {
            return Err(TooManySubscriptions(self.inner.limits.subscriptions));
        }
        let list = topics.entry(key).or_insert_with(|| {
            metrics.topics.inc();
            Vec::new()
        });
        list.push(queue.clone());
        metrics.subscriptions.inc();
        Ok(Subscription {
            hub: self.clone(),
            key,
            queue,
        })
    }

    /// Hands `envelope` to every subscription of `key`; returns how many there were.
    pub fn publish(&self, key: &Topic, envelope: Envelope) -> usize {
        // Copy the queue list out so that the fan-out does not hold the map's lock.
        let queues: Vec<Arc<Queue>> = match self.topics().get(key) {
            Some(list) => list.clone(),
            None => return 0,
        };
        let size = envelope.encoded_len();
        let envelope = Arc::new(envelope);
        let (limits, queued) = (&self.inner.limits, &self.inner.queued);
        for queue in &queues {
            let mut items = queue.items();
            // Make room, oldest first, within this queue's and the hub's limits.
            while items.queue.len() >= limits.depth
                || items.bytes + size > limits.queue_bytes
                || queued.load(Relaxed) + size > limits.total_bytes
            {
                let Some((_, old)) = items.queue.pop_front() else {
                    break;
                };
                items.bytes -= old;
                queued.fetch_sub(old, Relaxed);
                self.inner.metrics.drop_for("queue_full");
            }
            // Other queues hold the hub's budget: this stream goes without.
            if queued.load(Relaxed) + size > limits.total_bytes {
                self.inner.metrics.drop_for("queue_full");
                continue;
            }
            items.queue.push_back((envelope.clone(), size));
            items.bytes += size;
            queued.fetch_add(size, Relaxed);
            drop(items);
            queue.ready.notify_one();
        }
        queues.len()
    }

    /// Number of keys with subscriptions.
    pub fn topic_count(&self) -> usize {
        self.topics().len()
    }
}

/// One subscription stream's queue. Dropping it unsubscribes.
pub struct Subscription {
    hub: Hub,
    key: Topic,
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
        let mut topics = self.hub.topics();
        if let Some(list) = topics.get_mut(&self.key) {
            list.retain(|q| !Arc::ptr_eq(q, &self.queue));
            if list.is_empty() {
                topics.remove(&self.key);
                metrics.topics.dec();
            }
        }
        metrics.subscriptions.dec();
        let bytes = std::mem::take(&mut self.queue.items().bytes);
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
            },
            metrics.clone(),
        );
        let a = hub.subscribe([1; 32]).unwrap();
        for n in 0..10 {
            hub.publish(&[1; 32], sized(n, 1000));
        }
        assert_eq!(a.queued(), 3, "per-queue byte limit");
        assert_eq!(a.next().await, sized(7, 1000), "the oldest went first");
        let b = hub.subscribe([2; 32]).unwrap();
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
        let a = hub.subscribe([1; 32]).unwrap();
        let b = hub.subscribe([1; 32]).unwrap();
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
        let slow = hub.subscribe([1; 32]).unwrap();
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
        let _a = hub.subscribe([1; 32]).unwrap();
        let _b = hub.subscribe([2; 32]).unwrap();
        assert!(hub.subscribe([3; 32]).is_err());
    }
}
