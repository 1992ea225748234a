//! The fan-out core: subscription queues by key. No gRPC in here.
//!
//! Each subscription stream has its own bounded queue. Publishing pushes into
//! every queue of the key without waiting; a full queue drops its oldest
//! envelope (newer credentials matter more) and counts it. A key's state goes
//! away with its last subscription.

use std::{
    collections::{HashMap, VecDeque},
    sync::{Arc, Mutex, MutexGuard},
};

use cunicu_signal::proto::signaling::Envelope;
use tokio::sync::Notify;

use crate::metrics::Metrics;

type Topic = [u8; 32];

struct Queue {
    items: Mutex<VecDeque<Arc<Envelope>>>,
    ready: Notify,
}

impl Queue {
    fn items(&self) -> MutexGuard<'_, VecDeque<Arc<Envelope>>> {
        self.items.lock().unwrap_or_else(|e| e.into_inner())
    }
}

struct Inner {
    topics: Mutex<HashMap<Topic, Vec<Arc<Queue>>>>,
    depth: usize,
    max_subscriptions: usize,
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
    /// A hub with queues of `depth` envelopes and at most `max_subscriptions` streams.
    pub fn new(depth: usize, max_subscriptions: usize, metrics: Arc<Metrics>) -> Self {
        Hub {
            inner: Arc::new(Inner {
                topics: Mutex::new(HashMap::new()),
                depth: depth.max(1),
                max_subscriptions,
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
            items: Mutex::new(VecDeque::new()),
            ready: Notify::new(),
        });
        let mut topics = self.topics();
        let metrics = &self.inner.metrics;
        if metrics.subscriptions.get() as usize >= self.inner.max_subscriptions {
            return Err(TooManySubscriptions(self.inner.max_subscriptions));
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
        let envelope = Arc::new(envelope);
        for queue in &queues {
            let mut items = queue.items();
            if items.len() >= self.inner.depth {
                items.pop_front();
                self.inner.metrics.drop_for("queue_full");
            }
            items.push_back(envelope.clone());
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
            if let Some(envelope) = self.queue.items().pop_front() {
                self.hub.inner.metrics.delivered.inc();
                return Arc::unwrap_or_clone(envelope);
            }
            // notify_one keeps a permit if nobody waits: no wake-up is lost.
            self.queue.ready.notified().await;
        }
    }

    /// How many envelopes wait in the queue.
    pub fn queued(&self) -> usize {
        self.queue.items().len()
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
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let hub = Hub::new(4, 10, metrics.clone());
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
        let hub = Hub::new(3, 10, metrics.clone());
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
        let hub = Hub::new(3, 2, Metrics::new());
        let _a = hub.subscribe([1; 32]).unwrap();
        let _b = hub.subscribe([2; 32]).unwrap();
        assert!(hub.subscribe([3; 32]).is_err());
    }
}
