//! Several servers as one (docs/PROTOCOL.md §12): replicas that share a NATS system.
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
//! does not fit is dropped and counted. What waits for NATS is bounded in
//! bytes: an envelope in the queue holds its bytes in the server's budget,
//! and the task hands the NATS client at most `bounds::NATS_UNFLUSHED_BYTES` that
//! the client has not confirmed written (a flush) before it hands more; with
//! NATS away or hung, the rest is dropped and counted.

use std::{
    collections::HashMap,
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering, Ordering::Relaxed},
    },
    time::Duration,
};

use bytes::Bytes;
use cunicu_signal::proto::signaling::Envelope;
use futures::StreamExt as _;
use parking_lot::Mutex;
use prost::Message as _;
use tokio::sync::{Notify, mpsc, watch};
use tokio_util::{sync::CancellationToken, task::AbortOnDropHandle};

use crate::{
    bounds::{
        MAX_COUNTING, NATS_CLIENT_CAPACITY, NATS_FLUSH_TIMEOUT, NATS_MAX_RECONNECT_DELAY,
        NATS_OUTBOUND, NATS_SUBSCRIPTION_CAPACITY, NATS_UNFLUSHED_BYTES,
    },
    client::{Budget, Reserved},
    hub::{Replicas, Topic, WeakHub},
    metrics::Metrics,
    refusal::ClusterDropped,
    wire::Frame,
};

/// How the replica reaches its NATS system.
#[derive(Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ClusterConfig {
    /// NATS servers: `nats://HOST:PORT` or `tls://HOST:PORT`, one or more,
    /// with `user:password@` or `token@` before the host if the NATS system
    /// wants them (the same for every URL).
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

impl std::fmt::Debug for ClusterConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let urls: Vec<_> = self.urls.iter().map(|u| redact(u)).collect();
        f.debug_struct("ClusterConfig")
            .field("urls", &urls)
            .field("creds", &self.creds)
            .field("ca", &self.ca)
            .field("name", &self.name)
            .field("subject_prefix", &self.subject_prefix)
            .finish()
    }
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

/// What one envelope in the queue to NATS costs beyond its bytes.
const OUTBOUND_ENTRY_BYTES: usize = 64;
/// What one key's NATS subscription costs here (measured with
/// scripts/bench-cluster-keys: 6.5 KiB, of which the NATS client's channel for
/// the subscription is 6.3 KiB, then its task, its subject, its entries).
pub(crate) const KEY_BYTES: usize = (7 << 10) + 512;
/// The subject (after the prefix) of the request that confirms a new
/// subscription has reached the NATS server; nobody serves it.
const READY_PROBE: &str = "_ready";
/// Where replies come, after the prefix: with the probe, everything a
/// replica publishes or subscribes to stays under the prefix, which is what a
/// NATS account must allow.
const INBOX: &str = "_inbox";
/// Where replicas send their recipient counts, after the prefix:
/// `<prefix>._recipients.<replica id>.<request number>`.
const RECIPIENTS: &str = "_recipients";

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
    ready: Arc<Ready>,
    _task: AbortOnDropHandle<()>,
}

/// Whether a key's subscription has reached the NATS server. Smaller than a
/// `watch` channel (which has room for many waiters), and kept as long as
/// the key is.
#[derive(Default)]
struct Ready {
    done: AtomicBool,
    notify: Notify,
}

impl Ready {
    fn set(&self) {
        self.done.store(true, Ordering::Release);
        self.notify.notify_waiters();
    }

    async fn wait(&self) {
        let notified = self.notify.notified();
        tokio::pin!(notified);
        // Registered before the flag is read: a `set` in between wakes it.
        notified.as_mut().enable();
        if !self.done.load(Ordering::Acquire) {
            notified.await;
        }
    }
}

/// An envelope for the other replicas, in publishing order.
struct Outbound {
    key: Topic,
    envelope: Bytes,
    /// Where the replicas that deliver it send their counts, if asked.
    reply: Option<String>,
    /// Its bytes in the server's budget, until NATS has them.
    _reserved: Reserved,
}

/// The counts of the other replicas for one asking publish.
#[derive(Default)]
struct Count {
    sum: AtomicUsize,
    /// NATS said nobody listens anywhere: no count will come.
    nobody: Notify,
}

/// The replica's side of the cluster. Cheap to share.
pub(crate) struct Cluster {
    client: async_nats::Client,
    origin: String,
    prefix: String,
    keys: Mutex<HashMap<Topic, Interest>>,
    /// The hub that received envelopes go to. Weak: the hub holds the
    /// cluster (as its [`Replicas`]), not the other way round.
    hub: WeakHub,
    outbound: mpsc::Sender<Outbound>,
    /// Recipient counts being collected, by request number.
    counting: Mutex<HashMap<u64, Arc<Count>>>,
    next_count: AtomicU64,
    /// The server's byte budget, which the envelopes queued for NATS take from.
    budget: Arc<Budget>,
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

/// A NATS connection made for a cluster whose hub does not exist yet:
/// [`Link::start`] makes the [`Cluster`] once the hub is being made.
pub(crate) struct Link {
    client: async_nats::Client,
    origin: String,
    prefix: String,
    connected: watch::Receiver<bool>,
    metrics: Arc<Metrics>,
    shown: Vec<String>,
}

impl Cluster {
    /// Connects to NATS (in the background: an unreachable NATS at start
    /// leaves the replica degraded, trying again, not failed).
    pub(crate) async fn connect(
        config: &ClusterConfig,
        metrics: Arc<Metrics>,
    ) -> Result<Link, ClusterError> {
        if config.urls.is_empty() {
            return Err(ClusterError::Urls {
                urls: Vec::new(),
                reason: "no URL given".into(),
            });
        }
        let origin = format!("{:032x}", rand::random::<u128>());
        let (connected_tx, connected) = watch::channel(false);
        let events = metrics.clone();
        // What the warnings show of the URLs: no passwords.
        let away_urls = config
            .urls
            .iter()
            .map(|u| redact(u).into_owned())
            .collect::<Vec<_>>()
            .join(",");
        // Whether the warning of this outage was given: one per outage, not
        // one per reconnect attempt.
        let warned = Arc::new(AtomicBool::new(false));
        let mut options = async_nats::ConnectOptions::new()
            .name(config.name.clone().unwrap_or_else(host_name))
            .no_echo()
            .retry_on_initial_connect()
            .max_reconnects(None)
            .client_capacity(NATS_CLIENT_CAPACITY)
            .subscription_capacity(NATS_SUBSCRIPTION_CAPACITY)
            .custom_inbox_prefix(format!("{}.{INBOX}", config.subject_prefix))
            .reconnect_delay_callback(|attempts| {
                let exponent = u32::try_from(attempts.min(5)).unwrap_or(5);
                (Duration::from_millis(100) * 2u32.pow(exponent)).min(NATS_MAX_RECONNECT_DELAY)
            })
            .event_callback(move |event| {
                let (connected_tx, metrics) = (connected_tx.clone(), events.clone());
                let (warned, urls) = (warned.clone(), away_urls.clone());
                async move {
                    match event {
                        async_nats::Event::Connected => {
                            tracing::info!("cluster: connected to NATS");
                            warned.store(false, Ordering::Relaxed);
                            connected_tx.send_replace(true);
                        }
                        async_nats::Event::Disconnected => {
                            tracing::warn!(
                                %urls,
                                "cluster: lost the connection to NATS; serving local subscribers \
                                 only, reconnecting"
                            );
                            warned.store(true, Ordering::Relaxed);
                            connected_tx.send_replace(false);
                        }
                        async_nats::Event::SlowConsumer(_) => {
                            metrics.count(ClusterDropped::SlowConsumer);
                        }
                        // A failed (re)connect attempt: the first of an outage
                        // is a warning with its cause, the rest are debug.
                        async_nats::Event::ClientError(e) => {
                            if warned.swap(true, Ordering::Relaxed) {
                                tracing::debug!(%urls, "cluster: NATS still away: {e}");
                            } else {
                                tracing::warn!(
                                    %urls,
                                    "cluster: cannot reach NATS ({e}); serving local subscribers \
                                     only, retrying"
                                );
                            }
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
        // What is shown of the URLs, in errors and logs: no passwords.
        let shown: Vec<String> = config.urls.iter().map(|u| redact(u).into_owned()).collect();
        let invalid = |reason: String| ClusterError::Urls {
            urls: shown.clone(),
            reason,
        };
        let addrs = config
            .urls
            .iter()
            .map(|u| u.parse::<async_nats::ServerAddr>())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| invalid(redact(&e.to_string()).into_owned()))?;
        // The NATS client does not read credentials from the URLs itself.
        match url_auth(&addrs).map_err(invalid)? {
            Some(_) if config.creds.is_some() => {
                return Err(invalid(
                    "credentials in the URLs and a credentials file: give one".into(),
                ));
            }
            Some(UrlAuth::UserPassword(user, password)) => {
                options = options.user_and_password(user, password);
            }
            Some(UrlAuth::Token(token)) => options = options.token(token),
            None => {}
        }
        let client = options
            .connect(addrs)
            .await
            .map_err(|e| invalid(redact(&e.to_string()).into_owned()))?;
        Ok(Link {
            client,
            origin,
            prefix: config.subject_prefix.clone(),
            connected,
            metrics,
            shown,
        })
    }
}

impl Link {
    /// The replica's side of the cluster, delivering what comes through NATS
    /// to `hub`; starts the publisher task, which `tasks` owns.
    pub(crate) fn start(
        self,
        hub: WeakHub,
        budget: Arc<Budget>,
        tasks: &tokio_util::task::TaskTracker,
    ) -> Arc<Cluster> {
        let Link {
            client,
            origin,
            prefix,
            connected,
            metrics,
            shown,
        } = self;
        let (outbound, queue) = mpsc::channel(NATS_OUTBOUND);
        let stop = CancellationToken::new();
        let cluster = Arc::new(Cluster {
            client: client.clone(),
            origin: origin.clone(),
            prefix: prefix.clone(),
            keys: Mutex::new(HashMap::new()),
            hub,
            outbound,
            counting: Mutex::new(HashMap::new()),
            next_count: AtomicU64::new(0),
            budget,
            connected,
            metrics: metrics.clone(),
            stop: stop.clone(),
        });
        tasks.spawn(publish_all(
            client,
            origin,
            prefix,
            queue,
            metrics,
            stop.clone(),
        ));
        tasks.spawn(collect_counts(cluster.clone(), stop));
        tracing::info!(urls = ?shown, origin = %cluster.origin, "cluster: replica of a NATS cluster");
        cluster
    }
}

impl Replicas for Cluster {
    fn watch(self: Arc<Self>, key: Topic) {
        Cluster::watch(&self, key);
    }

    fn unwatch(&self, key: &Topic) {
        Cluster::unwatch(self, key);
    }
}

impl Cluster {
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
        let ready = Arc::new(Ready::default());
        let task = tokio::spawn(receive(self.clone(), key, ready.clone()));
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
        if let Some(ready) = ready {
            let _ = tokio::time::timeout(NATS_FLUSH_TIMEOUT + Duration::from_secs(1), ready.wait())
                .await;
        }
    }

    /// Hands an envelope (its bytes as published) to the other replicas,
    /// without waiting.
    pub(crate) fn publish(&self, key: Topic, envelope: Bytes) {
        self.enqueue(key, envelope, None);
    }

    /// Hands an envelope to the other replicas as [`Cluster::publish`] does,
    /// at once, and returns what tells how many subscription streams it
    /// reached on them: the counts that come within `wait`, or 0 as soon as
    /// NATS says nobody listens anywhere.
    pub(crate) fn publish_counted(
        &self,
        key: Topic,
        envelope: Bytes,
        wait: Duration,
    ) -> impl Future<Output = usize> + Send + '_ {
        let number = self.next_count.fetch_add(1, Relaxed);
        let count = Arc::new(Count::default());
        let counting = {
            let mut counting = self.counting.lock();
            let room = counting.len() < MAX_COUNTING;
            if room {
                counting.insert(number, count.clone());
            }
            room
        };
        // Taken out however this ends (the caller may drop the wait).
        let forget = counting.then_some(Forget {
            counting: &self.counting,
            number,
        });
        let reply =
            counting.then(|| format!("{}.{RECIPIENTS}.{}.{number}", self.prefix, self.origin));
        let sent = self.enqueue(key, envelope, reply);
        async move {
            let _forget = forget;
            if !(counting && sent) {
                return 0;
            }
            let _ = tokio::time::timeout(wait, count.nobody.notified()).await;
            count.sum.load(Relaxed)
        }
    }

    /// Queues an envelope for the publisher task, its bytes taken from the
    /// server's budget until NATS has it; false if it was dropped.
    fn enqueue(&self, key: Topic, envelope: Bytes, reply: Option<String>) -> bool {
        let Ok(reserved) = Reserved::new(&self.budget, envelope.len() + OUTBOUND_ENTRY_BYTES)
        else {
            self.metrics.count(ClusterDropped::ServerBudget);
            return false;
        };
        let outbound = Outbound {
            key,
            envelope,
            reply,
            _reserved: reserved,
        };
        match self.outbound.try_send(outbound) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.metrics.count(ClusterDropped::BufferFull);
                false
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                self.metrics.count(ClusterDropped::Closed);
                false
            }
        }
    }

    /// Stops: every key's subscription and the publisher go.
    pub(crate) fn close(&self) {
        self.stop.cancel();
        let keys = std::mem::take(&mut *self.keys.lock());
        self.metrics.cluster_subjects.set(0);
        drop(keys);
    }
}

/// Takes a count being collected out of the table when dropped.
struct Forget<'a> {
    counting: &'a Mutex<HashMap<u64, Arc<Count>>>,
    number: u64,
}

impl Drop for Forget<'_> {
    fn drop(&mut self) {
        self.counting.lock().remove(&self.number);
    }
}

/// Receives the recipient counts of the other replicas (and NATS's "no
/// responders") for this replica's asking publishes, until stopped.
async fn collect_counts(cluster: Arc<Cluster>, stop: CancellationToken) {
    let subject = format!("{}.{RECIPIENTS}.{}.*", cluster.prefix, cluster.origin);
    let mut replies = match cluster.client.subscribe(subject).await {
        Ok(replies) => replies,
        Err(e) => {
            tracing::warn!("cluster: cannot receive recipient counts: {e}");
            return;
        }
    };
    loop {
        let message = tokio::select! {
            _ = stop.cancelled() => break,
            next = replies.next() => match next {
                Some(message) => message,
                None => break,
            },
        };
        let Some(number) = message
            .subject
            .rsplit('.')
            .next()
            .and_then(|n| n.parse::<u64>().ok())
        else {
            continue;
        };
        let Some(count) = cluster.counting.lock().get(&number).cloned() else {
            // Came after its wait: the publish was answered already.
            continue;
        };
        if message.status == Some(async_nats::StatusCode::NO_RESPONDERS) {
            count.nobody.notify_one();
            continue;
        }
        let n = std::str::from_utf8(&message.payload)
            .ok()
            .and_then(|n| n.parse::<u32>().ok());
        match n {
            Some(n) => {
                count.sum.fetch_add(n as usize, Relaxed);
            }
            None => cluster.metrics.count(ClusterDropped::Invalid),
        }
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

/// Credentials a NATS URL carries, as nats.go reads them: `user:password@`,
/// or `token@`.
#[derive(Debug, PartialEq, Eq)]
enum UrlAuth {
    UserPassword(String, String),
    Token(String),
}

/// The credentials the URLs carry, percent-decoded; they apply to every
/// server (the client has one set), so URLs may not carry different ones.
fn url_auth(addrs: &[async_nats::ServerAddr]) -> Result<Option<UrlAuth>, String> {
    let decode = |s: &str| {
        percent_encoding::percent_decode_str(s)
            .decode_utf8()
            .map(|s| s.into_owned())
            .map_err(|_| "credentials in a URL are not UTF-8".to_string())
    };
    let mut found = None;
    for addr in addrs {
        let Some(user) = addr.username() else {
            continue;
        };
        let auth = match addr.password() {
            Some(password) => UrlAuth::UserPassword(decode(user)?, decode(password)?),
            None => UrlAuth::Token(decode(user)?),
        };
        match &found {
            None => found = Some(auth),
            Some(seen) if *seen == auth => {}
            Some(_) => return Err("the URLs carry different credentials".into()),
        }
    }
    Ok(found)
}

/// `url` without what is between the scheme and the last `@` of its
/// authority: credentials stay out of logs and errors.
fn redact(url: &str) -> std::borrow::Cow<'_, str> {
    let Some(start) = url.find("://").map(|i| i + 3) else {
        return url.into();
    };
    let authority_end = url[start..]
        .find(['/', '?', '#'])
        .map_or(url.len(), |i| start + i);
    match url[start..authority_end].rfind('@') {
        Some(at) => format!("{}***{}", &url[..start], &url[start + at..]).into(),
        None => url.into(),
    }
}

/// Publishes the envelopes of the outbound queue to NATS, in order, until stopped.
async fn publish_all(
    client: async_nats::Client,
    origin: String,
    prefix: String,
    mut queue: mpsc::Receiver<Outbound>,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
) {
    let mut headers = async_nats::HeaderMap::new();
    headers.insert(ORIGIN_HEADER, origin.as_str());
    // Bytes handed to the client since its last confirmed flush.
    let mut unflushed = 0usize;
    loop {
        let next = tokio::select! {
            _ = stop.cancelled() => break,
            next = queue.recv() => match next {
                Some(next) => next,
                None => break,
            },
        };
        if unflushed + next.envelope.len() > NATS_UNFLUSHED_BYTES {
            // The client holds what it may: wait (a while) for it to write.
            let flushed = tokio::select! {
                _ = stop.cancelled() => break,
                flushed = tokio::time::timeout(NATS_FLUSH_TIMEOUT, client.flush()) => flushed,
            };
            match flushed {
                Ok(Ok(())) => unflushed = 0,
                _ => {
                    metrics.count(ClusterDropped::NatsBufferFull);
                    continue;
                }
            }
        }
        unflushed += next.envelope.len();

        let subject = subject(&prefix, &next.key);
        let publish = async {
            match next.reply {
                Some(reply) => {
                    client
                        .publish_with_reply_and_headers(
                            subject,
                            reply,
                            headers.clone(),
                            next.envelope,
                        )
                        .await
                }
                None => {
                    client
                        .publish_with_headers(subject, headers.clone(), next.envelope)
                        .await
                }
            }
        };
        let sent = tokio::select! {
            _ = stop.cancelled() => break,
            sent = publish => sent,
        };
        match sent {
            Ok(()) => {
                metrics.cluster_published.inc();
            }
            Err(e) => {
                metrics.count(ClusterDropped::PublishFailed);
                tracing::debug!("cluster: publish failed: {e}");
            }
        }
    }
    // Whatever the client buffered goes out before the connection closes.
    let _ = tokio::time::timeout(Duration::from_secs(1), client.flush()).await;
}

/// Subscribes to the key's subject and waits (a while) until the NATS server
/// has the SUB; `None` if the client is closed (the key is served locally).
async fn subscribe(cluster: &Cluster, key: &Topic) -> Option<async_nats::Subscriber> {
    let subject = subject(&cluster.prefix, key);
    let subscriber = match cluster.client.subscribe(subject).await {
        Ok(subscriber) => subscriber,
        Err(e) => {
            // Only a closed client fails here.
            tracing::warn!("cluster: cannot subscribe: {e}");
            return None;
        }
    };
    if *cluster.connected.borrow() {
        // A flush only writes the SUB to the socket. A request is answered
        // (by "no responders" when nobody serves its subject) only after the
        // NATS server has read everything before it on this connection, the
        // SUB included: one round trip, after which a publish through any
        // replica on that server reaches this one.
        let probe = format!("{}.{READY_PROBE}", cluster.prefix);
        let answered = tokio::time::timeout(
            NATS_FLUSH_TIMEOUT,
            cluster.client.request(probe, Bytes::new()),
        )
        .await;
        if answered.is_err() {
            cluster.metrics.cluster_unconfirmed.inc();
            tracing::debug!("cluster: no round trip to NATS in {NATS_FLUSH_TIMEOUT:?}; going on");
        }
    }
    Some(subscriber)
}

/// One key's NATS subscription: what comes goes to the local subscribers.
/// The task lives as long as the key has local subscribers, so what it holds
/// while it waits is kept small: the set-up (the subscribe and its round
/// trip, a large future) runs boxed and is freed once done.
async fn receive(cluster: Arc<Cluster>, key: Topic, ready: Arc<Ready>) {
    let subscriber = Box::pin(subscribe(&cluster, &key)).await;
    ready.set();
    let Some(mut subscriber) = subscriber else {
        return;
    };
    while let Some(message) = subscriber.next().await {
        let origin = message
            .headers
            .as_ref()
            .and_then(|h| h.get(ORIGIN_HEADER))
            .map(|v| v.as_str());
        if origin == Some(cluster.origin.as_str()) {
            cluster.metrics.count(ClusterDropped::Own);
            continue;
        }
        // The payload is an envelope to this key, or nothing to deliver.
        let valid = Envelope::decode(message.payload.as_ref())
            .is_ok_and(|e| e.recipient.as_slice() == key.as_slice() && e.sender.len() == 32);
        if !valid {
            cluster.metrics.count(ClusterDropped::Invalid);
            continue;
        }
        cluster.metrics.cluster_received.inc();
        let frame = Frame::with_prefix(&message.payload);
        let Some(hub) = cluster.hub.upgrade() else {
            continue;
        };
        let fanout = hub.publish(&key, &frame);
        if fanout.subscriptions == 0 {
            cluster.metrics.no_subscriber.inc();
        }
        // An asking publish elsewhere: tell it how many streams here got it
        // (boxed: the task would hold room for this large future always).
        if let Some(reply) = message.reply
            && let Err(e) = Box::pin(
                cluster
                    .client
                    .publish(reply, Bytes::from(fanout.queued.to_string())),
            )
            .await
        {
            tracing::debug!("cluster: recipient count not sent: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_never_show() {
        assert_eq!(
            redact("nats://user:p%40ss@nats-1:4222"),
            "nats://***@nats-1:4222"
        );
        assert_eq!(redact("tls://tok@n/x@y"), "tls://***@n/x@y");
        assert_eq!(redact("nats://nats-1:4222"), "nats://nats-1:4222");
        assert_eq!(redact("not a url @ all"), "not a url @ all");
        let err = ClusterError::Urls {
            urls: vec![redact("nats://a:secret@h").into_owned()],
            reason: "x".into(),
        };
        assert!(!err.to_string().contains("secret"));
        let debug = format!(
            "{:?}",
            ClusterConfig::new(vec!["nats://a:secret@h:1".into()])
        );
        assert!(!debug.contains("secret"), "{debug}");
    }

    #[test]
    fn credentials_come_from_the_urls_once() {
        let addrs = |urls: &[&str]| -> Vec<async_nats::ServerAddr> {
            urls.iter()
                .map(|u| u.parse().expect("a NATS URL"))
                .collect()
        };
        assert_eq!(url_auth(&addrs(&["nats://h:1", "nats://g:2"])), Ok(None));
        assert_eq!(
            url_auth(&addrs(&["nats://h:1", "nats://us%3Aer:p%40ss@g:2"])),
            Ok(Some(UrlAuth::UserPassword("us:er".into(), "p@ss".into())))
        );
        assert_eq!(
            url_auth(&addrs(&["nats://t0ken@h:1", "nats://t0ken@g:2"])),
            Ok(Some(UrlAuth::Token("t0ken".into())))
        );
        assert!(url_auth(&addrs(&["nats://a:b@h:1", "nats://a:c@g:2"])).is_err());
    }

    /// The size of what an async fn returns, without calling it.
    fn future_size<A, B, C, F: Future>(_: fn(A, B, C) -> F) -> usize {
        std::mem::size_of::<F>()
    }

    #[test]
    fn a_keys_task_holds_little_while_it_waits() {
        // One per key, for as long as the key has subscribers: the NATS
        // client's own per-subscription channel (about 6 KiB) is the floor;
        // the task must not add much to it.
        let size = future_size(receive);
        assert!(size <= 640, "a key's task holds {size} bytes");
    }

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
