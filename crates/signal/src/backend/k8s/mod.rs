//! `k8s:///PATH/TO/KUBECONFIG?namespace=NS&ttl=D`: envelopes as objects of a
//! Kubernetes API server (docs/PROTOCOL.md §6, §9).
//!
//! Publishing creates one [`SignalingEnvelope`] object (a custom resource,
//! `signalingenvelopes.cunicu.li`) in the namespace, labelled with the sender's
//! and the recipient's key ([`LABEL_SENDER`], [`LABEL_RECIPIENT`]). Every
//! transport runs one watch (kube's [`watcher()`] with backoff), whose label
//! selector names the keys it listens on; it is restarted when that set
//! changes.
//!
//! The files, by concern: `crd` the object and its labels, `url` the URL and
//! [`K8sOptions`], `error` the errors, `rules` the delivery rules without I/O
//! (which object is delivered, stale, too old or seen), `watch` the watch
//! task, `expiry` the deletion of expired objects, `access` the access review,
//! `config` the loading of the client configuration, `stats` the counters;
//! this file the transport that ties them together.
//!
//! Delivery rules (docs/PROTOCOL.md §9):
//! - A subscription delivers what is created after it started: objects that
//!   the first list of a newly listened key finds are delivered if they were
//!   created after `listen` was called (less [`CLOCK_SKEW`], see *Time* below),
//!   and remembered, not delivered, if they are older (counted in
//!   [`K8sStats::stale`]). So an envelope sent while the subscription is still
//!   starting is not lost.
//! - Each object is handed to the registry at most once *while its UID is
//!   remembered*: UIDs are kept for two ttls from when they were first seen
//!   (at least the one ttl docs/PROTOCOL.md §9 asks), but at most 65 536 of them; when more objects arrive within that
//!   time, the oldest UIDs are forgotten early ([`K8sStats::forgotten_early`]
//!   counts them). An object whose UID was forgotten early and that a later
//!   relist or restart of the watch finds again while it is younger than the
//!   ttl is handed over a second time (the registry's memory of recent nonces
//!   then usually, not always, drops the copy), and an old object of a newly
//!   listened key that was forgotten so may be replayed. Objects older than the
//!   ttl are expired, never delivered. After a disconnect, a relist (410 Gone
//!   after an API server restart) or a restart of the watch for a new
//!   selector, objects not seen before are delivered: nothing created while the
//!   watch was away is lost.
//! - A running transport deletes the objects it sent and the objects addressed
//!   to the keys it listens on once they are older than the ttl, and any
//!   object of its namespace once it is older than twice the ttl, whoever it
//!   is from or for ([`K8sStats::deleted_abandoned`]), so the namespace does
//!   not grow while peers run, nor keep what peers that are gone left. The
//!   CRD bounds each field (a body of at most [`MAX_BODY_LEN`] bytes), and
//!   `deploy/resourcequota.yaml` the number of objects (docs/PROTOCOL.md §10).
//!
//! Failures of `listen`: a key stays *wanted* from `listen` until `unlisten`,
//! also when its `listen` fails with a transient error (the API server is
//! unreachable, answers 5xx or 429, or does not list within
//! [`K8sOptions::listen_timeout`]): the error is returned all the same, the
//! key stays in the watch's selector and the watch retries with backoff, so
//! that in a multi backend (whose subscribe succeeds when another medium
//! succeeded) the key is watched as soon as the API server answers. Only the
//! definitive cases fail fast and forget the key: a missing CRD or namespace
//! (404) and missing RBAC rights (403, also found by an access review before
//! the first watch) give one [`K8sError`] that names the cause
//! ([`K8sError::is_definitive`]) instead of retrying without end. `send`
//! fails on any error; the caller decides whether to send again. The rights a
//! peer needs in its namespace are `create`, `list`, `watch` and `delete` on
//! `signalingenvelopes.cunicu.li` (`deploy/rbac.yaml`).
//!
//! `listen` is cancellation-safe: if its future is dropped midway, the key is
//! either wanted (and retried by the watch, as after a transient error) or not
//! wanted at all, and a later `listen` of the key works either way.
//! [`K8s::listening`] tells which.
//!
//! URL forms: `k8s:///path/to/kubeconfig` (an absolute path), `k8s:relative/path`,
//! `k8s://` or `k8s:///` (the usual kubeconfig search: `$KUBECONFIG`,
//! `~/.kube/config`, then the pod's service account), and `k8s:incluster`
//! (also `k8s://incluster`, `k8s:///incluster`) for the pod's service account.
//! Parameters: `namespace`
//! (default `default`), `ttl` (how long an envelope object lives, default 2
//! minutes, e.g. `ttl=30s`).
//!
//! Where this differs from cunīcu: the labels are ours (docs/PROTOCOL.md §9). Objects
//! without them (cunīcu's Go peers do not set them) are not seen by the label
//! selector of our watch; our objects carry cunīcu's fields, so Go peers can
//! read them.
//!
//! Objects whose fields are not base64 are dropped and counted
//! ([`K8sStats::invalid`]); the first is logged as a warning, later ones at
//! most once a minute, with the running count.
//!
//! Time: the age of an object is the local clock minus its `creationTimestamp`,
//! so the clocks of peers and API server are assumed to agree to well within
//! the ttl. Whether an object found by a key's first list was created after
//! `listen` was called compares its `creationTimestamp` with the local clock
//! at that call less [`CLOCK_SKEW`] (2 s): the timestamp has a resolution of
//! one second and the clocks may differ a little. So an envelope created up to
//! about two seconds before the subscription may still be delivered; older
//! ones are not replayed.

mod access;
mod config;
mod crd;
mod error;
mod expiry;
mod rules;
mod stats;
mod url;
mod watch;

use std::{
    collections::BTreeSet,
    fmt,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering::Relaxed},
    },
    time::{Duration, SystemTime},
};

use async_trait::async_trait;
#[cfg(doc)]
use kube::runtime::watcher::watcher;
use kube::{Api, Client, api::PostParams};
use parking_lot::Mutex;
use tokio::{
    sync::{oneshot, watch as channel},
    time::Instant,
};

pub use crd::{
    CRD_NAME, EnvelopeContents, GROUP, LABEL_RECIPIENT, LABEL_SENDER, MAX_BODY_FIELD_LEN,
    MAX_BODY_LEN, SignalingEnvelope, SignalingEnvelopeFields, crd,
};
pub use error::K8sError;
pub use rules::CLOCK_SKEW;
pub use stats::K8sStats;
pub use url::{DEFAULT_NAMESPACE, DEFAULT_TTL, K8sOptions, K8sTarget, KubeconfigSource};

use super::{BackendError, Transport};
use tokio_util::task::AbortOnDropHandle;

use crate::{
    Key, Registry,
    log_limit::LogLimiter,
    proto::signaling::{BackendType, Envelope},
    task,
};
use access::Access;
use error::Place;
use expiry::Senders;
use rules::{Rules, Ttl};
use stats::Counters;
use watch::Waiter;

/// After the first, undecodable objects are logged as warnings at most this often.
const INVALID_LOG_INTERVAL: Duration = Duration::from_secs(60);
/// How long `unlisten` waits at most for the watch to drop the key.
const UNLISTEN_WAIT: Duration = Duration::from_secs(5);

/// What the transport and its tasks change, under one lock.
struct State {
    /// The delivery rules and what they remember.
    rules: Rules,
    /// Keys wanted (the watch's selector): from `listen` until `unlisten`,
    /// also while the watch fails for them.
    wanted: BTreeSet<Key>,
    /// The listens waiting for the first list of their key.
    waiters: Vec<Waiter>,
    /// Our sender keys, for expiry.
    senders: Senders,
}

impl State {
    fn new(ttl: Duration) -> Self {
        State {
            rules: Rules::new(ttl),
            wanted: BTreeSet::new(),
            waiters: Vec::new(),
            senders: Senders::default(),
        }
    }

    /// True if `key` is wanted and a watch has listed it.
    fn is_live(&self, key: &Key) -> bool {
        self.wanted.contains(key) && !self.rules.is_pending(key)
    }
}

/// What the transport and its tasks share.
struct Shared {
    name: Arc<str>,
    place: Place,
    ttl: Ttl,
    registry: Arc<Registry>,
    state: Mutex<State>,
    counters: Counters,
    /// Set once a denied delete has been logged as a warning.
    delete_denied_logged: AtomicBool,
    /// Limits the warnings about undecodable objects.
    invalid_log: LogLimiter,
}

impl Shared {
    fn new(name: Arc<str>, place: Place, ttl: Duration, registry: Arc<Registry>) -> Self {
        Shared {
            name,
            place,
            ttl: Ttl(ttl),
            registry,
            state: Mutex::new(State::new(ttl)),
            counters: Counters::default(),
            delete_denied_logged: AtomicBool::new(false),
            invalid_log: LogLimiter::new(INVALID_LOG_INTERVAL),
        }
    }

    #[cfg(test)]
    fn for_test(registry: Arc<Registry>, ttl: Duration) -> Self {
        let place = Place {
            server: "https://127.0.0.1:1".into(),
            namespace: "default".into(),
        };
        Shared::new("k8s:///test".into(), place, ttl, registry)
    }
}

/// A task of the transport, aborted when dropped.
type Task = AbortOnDropHandle<()>;

/// The Kubernetes transport.
pub struct K8s {
    shared: Arc<Shared>,
    client: Client,
    api: Api<SignalingEnvelope>,
    options: K8sOptions,
    /// The access review, once per transport.
    access: Access,
    /// The watch task and the expiry task.
    tasks: Mutex<Option<(Task, Task)>>,
    /// Counts changes of the wanted keys, for the watch task.
    changes: channel::Sender<u64>,
    /// The count of changes the running watch reflects.
    applied: channel::Receiver<u64>,
    closed: AtomicBool,
}

impl fmt::Debug for K8s {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("K8s")
            .field("url", &self.shared.name)
            .field("namespace", &self.shared.place.namespace)
            .finish_non_exhaustive()
    }
}

impl K8s {
    /// A transport for `url` with default options. Loads the client
    /// configuration; the API server is contacted on the first send or listen.
    pub async fn connect(url: &::url::Url, registry: Arc<Registry>) -> Result<Self, BackendError> {
        Self::with_options(url, registry, K8sOptions::default()).await
    }

    /// A transport for `url`.
    pub async fn with_options(
        url: &::url::Url,
        registry: Arc<Registry>,
        options: K8sOptions,
    ) -> Result<Self, BackendError> {
        let target = K8sTarget::parse(url)?;
        let name: Arc<str> = Arc::from(url.as_str());
        let config = config::load_config(&target.source)
            .await
            .map_err(|e| BackendError::transport(&name, e))?;
        let server = config.cluster_url.to_string();
        let client = Client::try_from(config).map_err(|e| {
            BackendError::transport(
                &name,
                K8sError::Api {
                    what: "client",
                    source: Box::new(e),
                },
            )
        })?;
        let api = Api::namespaced(client.clone(), &target.namespace);
        let place = Place {
            server,
            namespace: target.namespace,
        };
        let shared = Arc::new(Shared::new(name, place, target.ttl, registry));
        let interval = options.expiry_interval.unwrap_or_else(|| {
            (target.ttl / 2).clamp(Duration::from_secs(1), Duration::from_secs(60))
        });
        let (changes, changes_rx) = channel::channel(0);
        let (applied_tx, applied) = channel::channel(0);
        let watches = AbortOnDropHandle::new(tokio::spawn(watch::run_watches(
            shared.clone(),
            api.clone(),
            options.clone(),
            changes_rx,
            applied_tx,
        )));
        let expiry = AbortOnDropHandle::new(tokio::spawn(expiry::expire(
            shared.clone(),
            api.clone(),
            interval,
            options.send_timeout,
        )));
        Ok(K8s {
            shared,
            client,
            api,
            options,
            access: Access::default(),
            tasks: Mutex::new(Some((watches, expiry))),
            changes,
            applied,
            closed: AtomicBool::new(false),
        })
    }

    /// The namespace of the envelope objects.
    pub fn namespace(&self) -> &str {
        &self.shared.place.namespace
    }

    /// How long an envelope object lives.
    pub fn ttl(&self) -> Duration {
        self.shared.ttl.0
    }

    /// The keys this transport listens on: from `listen` until `unlisten`,
    /// including those whose watch is still retrying after a transient error.
    pub fn listening(&self) -> BTreeSet<Key> {
        self.shared.state.lock().wanted.clone()
    }

    /// The counters.
    pub fn stats(&self) -> K8sStats {
        let forgotten_early = self.shared.state.lock().rules.forgotten_early();
        self.shared.counters.snapshot(forgotten_early)
    }

    fn check_open(&self) -> Result<(), BackendError> {
        if self.closed.load(Relaxed) {
            Err(BackendError::Closed)
        } else {
            Ok(())
        }
    }

    fn error(&self, e: K8sError) -> BackendError {
        BackendError::transport(&self.shared.name, e)
    }

    /// Tells the watch task that the wanted keys changed; returns the new count.
    fn changed(&self) -> u64 {
        let mut count = 0;
        self.changes.send_modify(|c| {
            *c += 1;
            count = *c;
        });
        count
    }
}

#[async_trait]
impl Transport for K8s {
    async fn send(&self, envelope: &Envelope) -> Result<crate::Published, BackendError> {
        self.check_open()?;
        let object = SignalingEnvelope::from_envelope(envelope)?;
        let timeout = self.options.send_timeout;
        match tokio::time::timeout(timeout, self.api.create(&PostParams::default(), &object)).await
        {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                return Err(self.error(self.shared.place.api_error("create", "create", e)));
            }
            Err(_) => {
                return Err(self.error(K8sError::Timeout {
                    what: "create",
                    timeout,
                }));
            }
        }
        self.shared.counters.sent.fetch_add(1, Relaxed);
        let sender = envelope.sender_key()?;
        self.shared
            .state
            .lock()
            .senders
            .sent(sender, Instant::now());
        // Who watches for it, the API server does not say.
        Ok(crate::Published::unknown())
    }

    async fn listen(&self, key: Key) -> Result<(), BackendError> {
        // Objects of the key created from here on are delivered.
        let called = SystemTime::now();
        self.check_open()?;
        let deadline = Instant::now() + self.options.listen_timeout;
        if self.shared.state.lock().is_live(&key) {
            return Ok(());
        }
        // The access review, once per transport, within this listen's time.
        let timeout = self.options.send_timeout.min(self.options.listen_timeout);
        let reviewed = tokio::time::timeout_at(
            deadline,
            self.access.check(
                &self.client,
                &self.shared.place,
                &self.shared.name,
                &["list", "watch"],
                timeout,
            ),
        );
        match reviewed.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(self.error(e)),
            Err(_) => {
                return Err(self.error(K8sError::Timeout {
                    what: "access review",
                    timeout: self.options.listen_timeout,
                }));
            }
        }
        // Nothing has changed up to here. From here on the key is wanted until
        // unlisten, or until the watch reports a definitive error to this
        // listen: if this future is dropped, the watch goes on trying.
        let (tx, rx) = oneshot::channel();
        {
            let mut state = self.shared.state.lock();
            // Checked under the lock that close clears the state under.
            self.check_open()?;
            if state.is_live(&key) {
                return Ok(());
            }
            state.wanted.insert(key);
            state.rules.listening(key, called);
            state.waiters.retain(|w| !w.tx.is_closed());
            state.waiters.push(Waiter { key, tx });
        }
        self.changed();
        let error = match tokio::time::timeout_at(deadline, rx).await {
            Ok(Ok(Ok(()))) => {
                tracing::debug!(backend = %self.shared.name, %key, "listening");
                return Ok(());
            }
            Ok(Ok(Err(e))) => e,
            Ok(Err(_)) => {
                // The waiter was dropped: by close, by unlisten, or the task ended.
                self.check_open()?;
                let why = if self.shared.state.lock().wanted.contains(&key) {
                    "watch task ended unexpectedly"
                } else {
                    "unlistened while listening"
                };
                return Err(BackendError::transport(&self.shared.name, why));
            }
            Err(_) => K8sError::Timeout {
                what: "first list of the watch",
                timeout: self.options.listen_timeout,
            },
        };
        if !error.is_definitive() {
            tracing::debug!(backend = %self.shared.name, %key, "listen failed, the watch retries until unlisten: {error}");
        }
        Err(self.error(error))
    }

    async fn unlisten(&self, key: Key) -> Result<(), BackendError> {
        {
            let mut state = self.shared.state.lock();
            if !state.wanted.remove(&key) {
                return Ok(());
            }
            state.rules.forget(&key);
            state.waiters.retain(|w| w.key != key);
        }
        // Wait (briefly) until the watch runs without the key.
        let count = self.changed();
        let mut applied = self.applied.clone();
        let _ = tokio::time::timeout(UNLISTEN_WAIT, applied.wait_for(|c| *c >= count)).await;
        Ok(())
    }

    fn backend_type(&self) -> BackendType {
        BackendType::K8s
    }

    async fn close(&self) -> Result<(), BackendError> {
        self.closed.store(true, Relaxed);
        {
            // Listens still waiting return `Closed`.
            let mut state = self.shared.state.lock();
            state.wanted.clear();
            state.rules.forget_all();
            state.waiters.clear();
        }
        let tasks = self.tasks.lock().take();
        if let Some((watches, expiry)) = tasks {
            task::stop(watches).await;
            task::stop(expiry).await;
        }
        Ok(())
    }

    fn name(&self) -> &str {
        &self.shared.name
    }
}
