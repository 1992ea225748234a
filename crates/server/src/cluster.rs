//! Several servers as one (SPEC §12): replicas that share a NATS system.
//!
//! A replica subscribes to the subject of a key (`<prefix>.<key in lowercase
//! hex>`) while it has local subscribers on that key, so NATS carries an
//! envelope only to the replicas where someone listens for it. `Publish` fans
//! out to the local subscribers at once (the hub) and hands the envelope, as
//! it was published, to NATS with the header `Cunicu-Origin: <replica id>`;
//! the NATS connection does not echo what it publishes, and a message with
//! our own origin is dropped all the same, so each subscriber of a key, on
//! every replica, gets an envelope once.
//!
//! NATS away: the replica serves its own subscribers on, counts what it
//! could not send, and says so in health; the NATS client reconnects and
//! subscribes again by itself. `Publish` never waits for NATS: envelopes go
//! through a bounded queue to one task that publishes them in order, and what
//! does not fit is dropped and counted.

use std::{collections::HashMap, path::PathBuf, sync::Arc, time::Duration};

use bytes::{BufMut, Bytes, BytesMut};
use cunicu_signal::proto::signaling::Envelope;
use futures::StreamExt as _;
use parking_lot::Mutex;
use prost::Message as _;
use tokio::sync::{mpsc, watch};
use tokio_util::{sync::CancellationToken, task::AbortOnDropHandle};

use crate::{
    hub::{Hub, Topic},
    metrics::Metrics,
    wire::PREFIX_LEN,
};

/// How the replica reaches its NATS system.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ClusterConfig {
    /// NATS servers: `nats://HOST:PORT` or `tls://HOST:PORT`, one or more.
    pub urls: Vec<String>,
    /// A NATS credentials file (JWT and NKey seed).
    pub creds: Option<PathBuf>,
    /// PEM certificates to trust for `tls://` (instead of the system's roots).
    pub ca: Option<PathBuf>,
    /// The NATS connection name (the host name when not given).
    pub name: Option<String>,
    /// The prefix of the subjects, one per key.
    pub subject_prefix: String,
}

impl ClusterConfig {
    /// The NATS servers at `urls`, with the defaults.
    pub fn new(urls: Vec<String>) -> Self {
        ClusterConfig {
            urls,
            creds: None,
            ca: None,
            name: None,
            subject_prefix: DEFAULT_SUBJECT_PREFIX.into(),
        }
    }
}

/// The subject prefix by default.
pub const DEFAULT_SUBJECT_PREFIX: &str = "cunicu.signal.v1";
/// The header that names the replica a message comes from.
pub const ORIGIN_HEADER: &str = "Cunicu-Origin";
/// The gRPC health service that says whether NATS is there.
pub const HEALTH_SERVICE: &str = "cunicu.signaling.Cluster";

/// Envelopes waiting for the NATS publisher at most.
const OUTBOUND: usize = 4096;
/// Commands the NATS client buffers (while disconnected, too).
const CLIENT_CAPACITY: usize = 4096;
/// Messages one key's NATS subscription holds before dropping.
const SUBSCRIPTION_CAPACITY: usize = 1024;
/// How long a Subscribe waits for its key's NATS subscription to reach the server.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(2);
/// Longest wait between two attempts to reach NATS.
const MAX_RECONNECT_DELAY: Duration = Duration::from_secs(2);

/// Why the cluster could not be set up.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClusterError {
    /// The credentials file could not be read.
    #[error("cannot read NATS credentials {path}: {source}")]
    Creds {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// No URL, or one the NATS client does not take.
    #[error("NATS servers {urls:?}: {reason}")]
    Urls {
        /// The URLs given.
        urls: Vec<String>,
        /// Why.
        reason: String,
    },
}

/// One key's NATS subscription; dropping it unsubscribes.
struct Interest {
    ready: watch::Receiver<bool>,
    _task: AbortOnDropHandle<()>,
}

/// The replica's side of the cluster. Cheap to share.
pub(crate) struct Cluster {
    client: async_nats::Client,
    origin: String,
    prefix: String,
    keys: Mutex<HashMap<Topic, Interest>>,
    /// The hub that received envelopes go to; `None` once closed, which
    /// breaks the cycle hub → cluster → hub.
    hub: Mutex<Option<Hub>>,
    outbound: mpsc::Sender<(Topic, Bytes)>,
    connected: watch::Receiver<bool>,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
}

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "cunicu-signal".into())
}

impl Cluster {
    /// Connects to NATS (in the background: an unreachable NATS at start
    /// leaves the replica degraded, trying again, not failed) and starts the
    /// publisher task, which `tasks` owns.
    pub(crate) async fn connect(
        config: &ClusterConfig,
        metrics: Arc<Metrics>,
        tasks: &tokio_util::task::TaskTracker,
    ) -> Result<Arc<Self>, ClusterError> {
        if config.urls.is_empty() {
            return Err(ClusterError::Urls {
                urls: Vec::new(),
                reason: "no URL given".into(),
            });
        }
        let origin = format!("{:032x}", rand::random::<u128>());
        let (connected_tx, connected) = watch::channel(false);
        let events = metrics.clone();
        let mut options = async_nats::ConnectOptions::new()
            .name(config.name.clone().unwrap_or_else(host_name))
            .no_echo()
            .retry_on_initial_connect()
            .max_reconnects(None)
            .client_capacity(CLIENT_CAPACITY)
            .subscription_capacity(SUBSCRIPTION_CAPACITY)
            .reconnect_delay_callback(|attempts| {
                let exponent = u32::try_from(attempts.min(5)).unwrap_or(5);
                (Duration::from_millis(100) * 2u32.pow(exponent)).min(MAX_RECONNECT_DELAY)
            })
            .event_callback(move |event| {
                let (connected_tx, metrics) = (connected_tx.clone(), events.clone());
                async move {
                    match event {
                        async_nats::Event::Connected => {
                            tracing::info!("cluster: connected to NATS");
                            connected_tx.send_replace(true);
                        }
                        async_nats::Event::Disconnected => {
                            tracing::warn!("cluster: NATS is away; serving local subscribers only");
                            connected_tx.send_replace(false);
                        }
                        async_nats::Event::SlowConsumer(_) => {
                            metrics.cluster_drop_for("slow_consumer");
                        }
                        other => tracing::info!("cluster: NATS {other}"),
                    }
                }
            });
        if let Some(path) = &config.creds {
            options =
                options
                    .credentials_file(path)
                    .await
                    .map_err(|source| ClusterError::Creds {
                        path: path.clone(),
                        source,
                    })?;
        }
        if let Some(ca) = &config.ca {
            options = options.add_root_certificates(ca.clone());
        }
        let addrs = config
            .urls
            .iter()
            .map(|u| u.parse::<async_nats::ServerAddr>())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| ClusterError::Urls {
                urls: config.urls.clone(),
                reason: e.to_string(),
            })?;
        let client = options
            .connect(addrs)
            .await
            .map_err(|e| ClusterError::Urls {
                urls: config.urls.clone(),
                reason: e.to_string(),
            })?;
        let (outbound, queue) = mpsc::channel(OUTBOUND);
        let stop = CancellationToken::new();
        let cluster = Arc::new(Cluster {
            client: client.clone(),
            origin: origin.clone(),
            prefix: config.subject_prefix.clone(),
            keys: Mutex::new(HashMap::new()),
            hub: Mutex::new(None),
            outbound,
            connected,
            metrics: metrics.clone(),
            stop: stop.clone(),
        });
        tasks.spawn(publish_all(
            client,
            origin,
            config.subject_prefix.clone(),
            queue,
            metrics,
            stop,
        ));
        tracing::info!(urls = ?config.urls, origin = %cluster.origin, "cluster: replica of a NATS cluster");
        Ok(cluster)
    }

    /// Envelopes that come through NATS go to `hub`.
    pub(crate) fn attach(&self, hub: Hub) {
        *self.hub.lock() = Some(hub);
    }

    /// Whether NATS is connected, as it changes.
    pub(crate) fn connected(&self) -> watch::Receiver<bool> {
        self.connected.clone()
    }

    /// The key has its first local subscriber: subscribe to its subject.
    pub(crate) fn watch(self: &Arc<Self>, key: Topic) {
        let mut keys = self.keys.lock();
        if keys.contains_key(&key) {
            return;
        }
        let (ready_tx, ready) = watch::channel(false);
        let task = tokio::spawn(receive(self.clone(), key, ready_tx));
        keys.insert(
            key,
            Interest {
                ready,
                _task: AbortOnDropHandle::new(task),
            },
        );
        self.metrics.cluster_subjects.inc();
    }

    /// The key's last local subscriber is gone: unsubscribe from its subject.
    pub(crate) fn unwatch(&self, key: &Topic) {
        let interest = self.keys.lock().remove(key);
        if interest.is_some() {
            self.metrics.cluster_subjects.dec();
        }
        // Dropped here: the task is aborted and its subscription goes.
        drop(interest);
    }

    /// Waits until the key's subscription has reached the NATS server (or
    /// NATS is away, or it took too long): then a publish through any replica
    /// on that server reaches this one.
    pub(crate) async fn ready(&self, key: &Topic) {
        let ready = self.keys.lock().get(key).map(|i| i.ready.clone());
        if let Some(mut ready) = ready {
            let _ = tokio::time::timeout(
                FLUSH_TIMEOUT + Duration::from_secs(1),
                ready.wait_for(|r| *r),
            )
            .await;
        }
    }

    /// Hands an envelope (its bytes as published) to the other replicas,
    /// without waiting.
    pub(crate) fn publish(&self, key: Topic, envelope: Bytes) {
        match self.outbound.try_send((key, envelope)) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.metrics.cluster_drop_for("buffer_full");
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                self.metrics.cluster_drop_for("closed");
            }
        }
    }

    /// Stops: every key's subscription and the publisher go; the hub is let go.
    pub(crate) fn close(&self) {
        self.stop.cancel();
        let keys = std::mem::take(&mut *self.keys.lock());
        self.metrics.cluster_subjects.set(0);
        drop(keys);
        self.hub.lock().take();
    }
}

/// The subject of a key: `<prefix>.<key in lowercase hex>`.
fn subject(prefix: &str, key: &Topic) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut subject = String::with_capacity(prefix.len() + 1 + 2 * key.len());
    subject.push_str(prefix);
    subject.push('.');
    for b in key {
        subject.push(char::from(HEX[usize::from(b >> 4)]));
        subject.push(char::from(HEX[usize::from(b & 0xf)]));
    }
    subject
}

/// Publishes the envelopes of the outbound queue to NATS, in order, until stopped.
async fn publish_all(
    client: async_nats::Client,
    origin: String,
    prefix: String,
    mut queue: mpsc::Receiver<(Topic, Bytes)>,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
) {
    let mut headers = async_nats::HeaderMap::new();
    headers.insert(ORIGIN_HEADER, origin.as_str());
    loop {
        let (key, envelope) = tokio::select! {
            _ = stop.cancelled() => break,
            next = queue.recv() => match next {
                Some(next) => next,
                None => break,
            },
        };
        let subject = subject(&prefix, &key);
        let sent = tokio::select! {
            _ = stop.cancelled() => break,
            sent = client.publish_with_headers(subject, headers.clone(), envelope) => sent,
        };
        match sent {
            Ok(()) => {
                metrics.cluster_published.inc();
            }
            Err(e) => {
                metrics.cluster_drop_for("publish_failed");
                tracing::debug!("cluster: publish failed: {e}");
            }
        }
    }
    // Whatever the client buffered goes out before the connection closes.
    let _ = tokio::time::timeout(Duration::from_secs(1), client.flush()).await;
}

/// One key's NATS subscription: what comes goes to the local subscribers.
async fn receive(cluster: Arc<Cluster>, key: Topic, ready: watch::Sender<bool>) {
    let subject = subject(&cluster.prefix, &key);
    let mut subscriber = match cluster.client.subscribe(subject).await {
        Ok(subscriber) => subscriber,
        Err(e) => {
            // Only a closed client fails here; the key is served locally.
            tracing::warn!("cluster: cannot subscribe: {e}");
            ready.send_replace(true);
            return;
        }
    };
    if *cluster.connected.borrow() {
        let _ = tokio::time::timeout(FLUSH_TIMEOUT, cluster.client.flush()).await;
    }
    ready.send_replace(true);
    while let Some(message) = subscriber.next().await {
        let origin = message
            .headers
            .as_ref()
            .and_then(|h| h.get(ORIGIN_HEADER))
            .map(|v| v.as_str());
        if origin == Some(cluster.origin.as_str()) {
            cluster.metrics.cluster_drop_for("own");
            continue;
        }
        // The payload is an envelope to this key, or nothing to deliver.
        let valid = Envelope::decode(message.payload.as_ref())
            .is_ok_and(|e| e.recipient.as_slice() == key.as_slice() && e.sender.len() == 32);
        if !valid {
            cluster.metrics.cluster_drop_for("invalid");
            continue;
        }
        cluster.metrics.cluster_received.inc();
        let mut frame = BytesMut::with_capacity(PREFIX_LEN + message.payload.len());
        frame.put_u8(0);
        frame.put_u32(message.payload.len() as u32);
        frame.put_slice(&message.payload);
        let hub = cluster.hub.lock().clone();
        if let Some(hub) = hub
            && hub.publish(&key, &frame.freeze()) == 0
        {
            cluster.metrics.no_subscriber.inc();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_are_the_prefix_and_the_key_in_lowercase_hex() {
        let mut key = [0u8; 32];
        key[0] = 0xab;
        key[31] = 0x0f;
        assert_eq!(
            subject(DEFAULT_SUBJECT_PREFIX, &key),
            format!("cunicu.signal.v1.ab{}0f", "00".repeat(30))
        );
    }
}
