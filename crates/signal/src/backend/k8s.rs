//! `k8s:///PATH/TO/KUBECONFIG?namespace=NS&ttl=D`: envelopes as objects of a
//! Kubernetes API server (SPEC §6, §9).
//!
//! Publishing creates one [`SignalingEnvelope`] object (a custom resource,
//! `signalingenvelopes.cunicu.li`) in the namespace, labelled with the sender's
//! and the recipient's key ([`LABEL_SENDER`], [`LABEL_RECIPIENT`]). Every
//! transport runs one watch (kube's [`watcher()`] with backoff), whose label
//! selector names the keys it listens on; it is restarted when that set
//! changes.
//!
//! Delivery rules (SPEC §9):
//! - A subscription delivers what is created after it started: objects that
//!   the first list of a newly listened key finds are delivered if they were
//!   created after `listen` was called (less [`CLOCK_SKEW`], see *Time* below),
//!   and remembered, not delivered, if they are older (counted in
//!   [`K8sStats::stale`]). So an envelope sent while the subscription is still
//!   starting is not lost.
//! - Each object is handed to the registry at most once *while its UID is
//!   remembered*: UIDs are kept for two ttls (at least the one ttl SPEC §9
//!   asks), but at most 65 536 of them; when more objects arrive within that
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
//!   to the keys it listens on once they are older than the ttl, so the
//!   namespace does not grow while peers run.
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
//! Where this differs from cunīcu: the labels are ours (SPEC §9). Objects
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

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, VecDeque},
    fmt,
    path::PathBuf,
    pin::pin,
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicBool, AtomicU64, Ordering::Relaxed},
    },
    time::{Duration, SystemTime},
};

use async_trait::async_trait;
use base64::{Engine as _, engine::general_purpose::STANDARD};
use futures::StreamExt as _;
use k8s_openapi::{
    api::authorization::v1::{
        ResourceAttributes, SelfSubjectAccessReview, SelfSubjectAccessReviewSpec,
    },
    apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use kube::{
    Api, Client, Config, CustomResource, CustomResourceExt as _, ResourceExt as _,
    api::{DeleteParams, ListParams, PostParams, Preconditions},
    config::{KubeConfigOptions, Kubeconfig},
    runtime::{
        WatchStreamExt as _,
        utils::ResetTimerBackoff,
        watcher::{self, ExponentialBackoff, watcher},
    },
};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use tokio::{
    sync::{oneshot, watch},
    task::JoinHandle,
    time::Instant,
};

use super::{BackendError, Transport, check_params};
use crate::{
    Key, Registry,
    proto::signaling::{BackendType, EncryptedMessage, Envelope},
};

/// The API group of the envelope objects.
pub const GROUP: &str = "cunicu.li";
/// The name of the CustomResourceDefinition (`<plural>.<group>`).
pub const CRD_NAME: &str = "signalingenvelopes.cunicu.li";
/// The label holding the recipient's key in lowercase unpadded base32 ([`Key::to_base32`]).
pub const LABEL_RECIPIENT: &str = "cunicu.li/recipient";
/// The label holding the sender's key in lowercase unpadded base32 ([`Key::to_base32`]).
pub const LABEL_SENDER: &str = "cunicu.li/sender";
/// How long an envelope object lives when the URL gives no `ttl` (SPEC §6).
pub const DEFAULT_TTL: Duration = Duration::from_secs(120);
/// The namespace used when the URL gives none.
pub const DEFAULT_NAMESPACE: &str = "default";
/// The `generateName` prefix of envelope objects.
const NAME_PREFIX: &str = "env-";
/// The resource name in RBAC rules and errors.
const RESOURCE: &str = "signalingenvelopes";
/// How many object UIDs a transport remembers at most; the oldest go first.
const MAX_KNOWN: usize = 65_536;
/// How many of our own sender keys are remembered for expiry at most.
const MAX_SENDERS: usize = 1024;
/// How many keys one label selector of the expiry sweep names.
const KEYS_PER_SELECTOR: usize = 64;
/// How much earlier than the call of `listen` an object found by the key's
/// first list may have been created and still be delivered: the
/// `creationTimestamp` has a resolution of one second, and the clocks of peer
/// and API server may differ a little.
pub const CLOCK_SKEW: Duration = Duration::from_secs(2);
/// After the first, undecodable objects are logged as warnings at most this often.
const INVALID_LOG_INTERVAL: Duration = Duration::from_secs(60);
/// How long `unlisten` waits at most for the watch to drop the key.
const UNLISTEN_WAIT: Duration = Duration::from_secs(5);

/// The fields of a [`SignalingEnvelope`] object: cunīcu's layout, at the top
/// level of the object (there is no `spec`). Keys and contents are standard
/// base64, so that `kubectl get env -o yaml` shows them readably.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[kube(
    group = "cunicu.li",
    version = "v1",
    kind = "SignalingEnvelope",
    shortname = "env",
    namespaced,
    no_spec,
    derive = "PartialEq",
    doc = "A sealed signaling envelope on its way from sender to recipient (cunicu-signal)."
)]
pub struct SignalingEnvelopeFields {
    /// The sender's public key, base64.
    pub sender: String,
    /// The recipient's public key, base64.
    pub recipient: String,
    /// The sealed message.
    pub contents: EnvelopeContents,
}

/// The sealed message of a [`SignalingEnvelope`]: `EncryptedMessage` of SPEC §5.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
pub struct EnvelopeContents {
    /// The 24-byte nonce, base64.
    pub nonce: String,
    /// The NaCl box (tag, then ciphertext), base64.
    pub body: String,
}

impl SignalingEnvelope {
    /// The object that carries `envelope`, with both labels and a generated name.
    pub fn from_envelope(envelope: &Envelope) -> Result<Self, BackendError> {
        let sender = envelope.sender_key()?;
        let recipient = envelope.recipient_key()?;
        let contents = envelope
            .contents
            .as_ref()
            .ok_or(crate::EnvelopeError::NoContents)?;
        Ok(SignalingEnvelope {
            metadata: ObjectMeta {
                generate_name: Some(NAME_PREFIX.into()),
                labels: Some(BTreeMap::from([
                    (LABEL_RECIPIENT.to_string(), recipient.to_base32()),
                    (LABEL_SENDER.to_string(), sender.to_base32()),
                ])),
                ..ObjectMeta::default()
            },
            spec: SignalingEnvelopeFields {
                sender: STANDARD.encode(&envelope.sender),
                recipient: STANDARD.encode(&envelope.recipient),
                contents: EnvelopeContents {
                    nonce: STANDARD.encode(&contents.nonce),
                    body: STANDARD.encode(&contents.body),
                },
            },
        })
    }

    /// The envelope this object carries. Fails, naming the field, if one is not
    /// base64; whether the envelope opens is the registry's business.
    pub fn to_envelope(&self) -> Result<Envelope, String> {
        let decode = |field: &str, text: &str| {
            STANDARD
                .decode(text)
                .map_err(|e| format!("field {field} is not base64: {e}"))
        };
        Ok(Envelope {
            sender: decode("sender", &self.spec.sender)?,
            recipient: decode("recipient", &self.spec.recipient)?,
            contents: Some(EncryptedMessage {
                body: decode("contents.body", &self.spec.contents.body)?,
                nonce: decode("contents.nonce", &self.spec.contents.nonce)?,
            }),
        })
    }
}

/// The CustomResourceDefinition of [`SignalingEnvelope`]: what `deploy/crd.yaml`
/// holds as YAML (`cargo run -p cunicu-signal --example crd > deploy/crd.yaml`).
pub fn crd() -> CustomResourceDefinition {
    SignalingEnvelope::crd()
}

/// Why the Kubernetes medium failed: the source of a
/// [`BackendError::Transport`] from this backend.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum K8sError {
    /// The API server does not serve `signalingenvelopes.cunicu.li`.
    #[error(
        "CRD {CRD_NAME} is not installed in the API server {server}: kubectl apply -f deploy/crd.yaml"
    )]
    CrdMissing {
        /// The API server's URL.
        server: String,
    },
    /// The namespace does not exist.
    #[error("namespace {namespace:?} does not exist in the API server {server}")]
    NamespaceMissing {
        /// The namespace of the URL.
        namespace: String,
        /// The API server's URL.
        server: String,
    },
    /// RBAC denies what the backend needs.
    #[error(
        "not allowed to {verbs} {CRD_NAME} in namespace {namespace:?}: {message} (deploy/rbac.yaml grants create, list, watch and delete)"
    )]
    Forbidden {
        /// The verbs denied, comma-separated.
        verbs: String,
        /// The namespace of the URL.
        namespace: String,
        /// The API server's explanation.
        message: String,
    },
    /// No client configuration could be loaded.
    #[error("{what}: {source}")]
    Config {
        /// Which configuration (a kubeconfig path, the search, in-cluster).
        what: String,
        /// What failed.
        #[source]
        source: BoxError,
    },
    /// A request to the API server failed.
    #[error("{what}: {source}")]
    Api {
        /// The request.
        what: &'static str,
        /// The error of the client.
        #[source]
        source: Box<kube::Error>,
    },
    /// The watch failed before it had listed the objects once.
    #[error("watch: {0}")]
    Watch(#[source] Box<watcher::Error>),
    /// An error that several listens got at once, as text (the first got
    /// the error itself).
    #[error("{0}")]
    Message(String),
    /// The API server did not answer in time.
    #[error("{what}: no answer within {timeout:?}")]
    Timeout {
        /// The request.
        what: &'static str,
        /// The limit.
        timeout: Duration,
    },
}

impl K8sError {
    /// This error again, for another listen that waited for the same list:
    /// the same variant where its fields can be copied, else its text.
    fn duplicate(&self) -> K8sError {
        match self {
            K8sError::CrdMissing { server } => K8sError::CrdMissing {
                server: server.clone(),
            },
            K8sError::NamespaceMissing { namespace, server } => K8sError::NamespaceMissing {
                namespace: namespace.clone(),
                server: server.clone(),
            },
            K8sError::Forbidden {
                verbs,
                namespace,
                message,
            } => K8sError::Forbidden {
                verbs: verbs.clone(),
                namespace: namespace.clone(),
                message: message.clone(),
            },
            K8sError::Timeout { what, timeout } => K8sError::Timeout {
                what,
                timeout: *timeout,
            },
            other => K8sError::Message(other.to_string()),
        }
    }

    /// True for the errors that retrying does not cure: the CRD or the
    /// namespace is missing (404), or RBAC denies (403). `listen` forgets its
    /// key on these; on every other error it keeps the key and the watch
    /// retries.
    pub fn is_definitive(&self) -> bool {
        matches!(
            self,
            K8sError::CrdMissing { .. }
                | K8sError::NamespaceMissing { .. }
                | K8sError::Forbidden { .. }
        )
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Settings of the Kubernetes backend that URLs do not carry.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct K8sOptions {
    /// Deadline of creating one envelope object.
    pub send_timeout: Duration,
    /// How long `listen` waits for the watch's first list; when it is up,
    /// `listen` fails and the watch goes on trying until `unlisten`.
    pub listen_timeout: Duration,
    /// First delay before a failed watch is retried.
    pub backoff_min: Duration,
    /// Longest delay between watch attempts.
    pub backoff_max: Duration,
    /// How often expired objects are looked for; `None`: half the ttl, between
    /// one second and one minute.
    pub expiry_interval: Option<Duration>,
}

impl Default for K8sOptions {
    fn default() -> Self {
        K8sOptions {
            send_timeout: Duration::from_secs(10),
            listen_timeout: Duration::from_secs(30),
            backoff_min: Duration::from_millis(500),
            backoff_max: Duration::from_secs(30),
            expiry_interval: None,
        }
    }
}

impl K8sOptions {
    /// These options with other watch backoff bounds (`min` ≤ `max`).
    pub fn with_backoff(mut self, min: Duration, max: Duration) -> Self {
        self.backoff_min = min;
        self.backoff_max = max.max(min);
        self
    }

    /// These options with another expiry interval.
    pub fn with_expiry_interval(mut self, interval: Duration) -> Self {
        self.expiry_interval = Some(interval);
        self
    }
}

/// Where the client configuration comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KubeconfigSource {
    /// The usual search: `$KUBECONFIG`, `~/.kube/config`, then in-cluster.
    Infer,
    /// This kubeconfig file.
    File(PathBuf),
    /// The pod's service account.
    InCluster,
}

/// A parsed `k8s:` URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct K8sTarget {
    /// Where the client configuration comes from.
    pub source: KubeconfigSource,
    /// The namespace of the envelope objects.
    pub namespace: String,
    /// How long an envelope object lives.
    pub ttl: Duration,
}

impl K8sTarget {
    /// Parses `k8s:///PATH?namespace=NS&ttl=D`, `k8s:incluster`, `k8s://`.
    pub fn parse(url: &url::Url) -> Result<Self, BackendError> {
        check_params(url, &["namespace", "ttl"])?;
        if !url.username().is_empty() || url.password().is_some() || url.port().is_some() {
            return Err(BackendError::url(
                url,
                "a k8s URL has no user or port (expected k8s:///PATH/TO/KUBECONFIG)",
            ));
        }
        let path = url.path();
        let source = match url.host_str() {
            Some("incluster") if matches!(path, "" | "/") => KubeconfigSource::InCluster,
            Some(host) if !host.is_empty() => {
                return Err(BackendError::url(
                    url,
                    format!(
                        "unexpected host {host:?}: the kubeconfig is a path (k8s:///PATH/TO/KUBECONFIG, three slashes)"
                    ),
                ));
            }
            _ => match path {
                "" | "/" => KubeconfigSource::Infer,
                "incluster" | "/incluster" => KubeconfigSource::InCluster,
                path => {
                    let decoded = percent_decode(path).map_err(|e| BackendError::url(url, e))?;
                    KubeconfigSource::File(PathBuf::from(decoded))
                }
            },
        };
        let namespace = match url.query_pairs().find(|(k, _)| k == "namespace") {
            None => DEFAULT_NAMESPACE.to_string(),
            Some((_, ns)) if is_dns_label(&ns) => ns.into_owned(),
            Some((_, ns)) => {
                return Err(BackendError::url(
                    url,
                    format!(
                        "namespace {ns:?} is not a DNS label (lowercase letters, digits and '-', at most 63)"
                    ),
                ));
            }
        };
        let ttl = match url.query_pairs().find(|(k, _)| k == "ttl") {
            None => DEFAULT_TTL,
            Some((_, text)) => {
                let ttl = humantime::parse_duration(&text).map_err(|e| {
                    BackendError::url(url, format!("ttl={text:?} is not a duration: {e}"))
                })?;
                if ttl < Duration::from_secs(1) {
                    return Err(BackendError::url(
                        url,
                        format!("ttl={text:?} is shorter than one second"),
                    ));
                }
                ttl
            }
        };
        Ok(K8sTarget {
            source,
            namespace,
            ttl,
        })
    }
}

fn percent_decode(path: &str) -> Result<String, String> {
    let bytes = path.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = path
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| format!("bad percent escape in path {path:?}"))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| format!("path {path:?} is not UTF-8"))
}

fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// Counters of a [`K8s`] transport.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct K8sStats {
    /// Envelope objects created.
    pub sent: u64,
    /// Envelopes handed to the registry (each object once while its UID is
    /// remembered, see the module's docs).
    pub handed_over: u64,
    /// Objects seen again (after a relist or a restart of the watch) and skipped.
    pub seen_again: u64,
    /// Objects that existed before their key was listened on: not replayed.
    pub stale: u64,
    /// Objects found by the first list of their key that were created after
    /// `listen` was called (less [`CLOCK_SKEW`]): delivered, not taken for stale.
    pub caught_up: u64,
    /// Objects older than the ttl: expired, not delivered.
    pub too_old: u64,
    /// Objects that are not envelopes (fields not base64, a recipient that is
    /// not a 32-byte key): dropped.
    pub invalid: u64,
    /// Expired objects deleted by this transport.
    pub deleted: u64,
    /// Remembered UIDs forgotten early because the memory was full: such an
    /// object may be handed over again if a relist finds it within its ttl.
    pub forgotten_early: u64,
    /// Errors of the watch that no `listen` returned (it retries with backoff).
    pub watch_errors: u64,
}

#[derive(Default)]
struct Counters {
    sent: AtomicU64,
    handed_over: AtomicU64,
    seen_again: AtomicU64,
    stale: AtomicU64,
    caught_up: AtomicU64,
    too_old: AtomicU64,
    invalid: AtomicU64,
    deleted: AtomicU64,
    forgotten_early: AtomicU64,
    watch_errors: AtomicU64,
}

/// UIDs of objects seen, each remembered for a while.
#[derive(Default)]
struct Known {
    until: HashMap<String, Instant>,
    order: VecDeque<(Instant, String)>,
}

impl Known {
    /// Remembers `uid` until `until`; false if it was known already.
    fn insert(&mut self, uid: &str, until: Instant, counters: &Counters) -> bool {
        let now = Instant::now();
        while let Some((t, _)) = self.order.front() {
            if *t > now && self.order.len() < MAX_KNOWN {
                break;
            }
            if let Some((t, old)) = self.order.pop_front() {
                if t > now {
                    counters.forgotten_early.fetch_add(1, Relaxed);
                }
                if self.until.get(&old) == Some(&t) {
                    self.until.remove(&old);
                }
            }
        }
        if self.until.get(uid).is_some_and(|t| *t > now) {
            return false;
        }
        self.until.insert(uid.to_string(), until);
        self.order.push_back((until, uid.to_string()));
        true
    }
}

/// A `listen` that waits for the first list of its key.
struct Waiter {
    key: Key,
    tx: oneshot::Sender<Result<(), K8sError>>,
}

#[derive(Default)]
struct State {
    known: Known,
    /// Keys wanted (the watch's selector): from `listen` until `unlisten`,
    /// also while the watch fails for them.
    wanted: BTreeSet<Key>,
    /// Wanted keys that no watch has listed yet, with the time `listen` was
    /// first called for them.
    pending: HashMap<Key, SystemTime>,
    /// The listens waiting for the first list of their key.
    waiters: Vec<Waiter>,
    /// Our sender keys and when they last sent.
    senders: HashMap<Key, Instant>,
}

impl State {
    /// True if `key` is wanted and a watch has listed it.
    fn is_live(&self, key: &Key) -> bool {
        self.wanted.contains(key) && !self.pending.contains_key(key)
    }
}

/// Lets an event through at most once per interval.
struct RateLimit {
    interval: Duration,
    last: Mutex<Option<Instant>>,
}

impl RateLimit {
    fn new(interval: Duration) -> Self {
        RateLimit {
            interval,
            last: Mutex::new(None),
        }
    }

    /// True for the first call and then for the first call after each interval.
    fn allow(&self, now: Instant) -> bool {
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        if last.is_some_and(|t| now.saturating_duration_since(t) < self.interval) {
            return false;
        }
        *last = Some(now);
        true
    }
}

/// What the watch does after an event.
#[derive(Debug, PartialEq, Eq)]
enum Flow {
    Continue,
    /// The wanted keys changed: start over with the new selector.
    Restart,
}

/// What the tasks of a transport share.
struct Shared {
    name: Arc<str>,
    server: String,
    namespace: String,
    ttl: Duration,
    registry: Arc<Registry>,
    state: Mutex<State>,
    counters: Counters,
    /// Set once a denied delete has been logged as a warning.
    delete_denied_logged: AtomicBool,
    /// Limits the warnings about undecodable objects.
    invalid_log: RateLimit,
}

impl Shared {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn api_error(&self, what: &'static str, verb: &str, e: kube::Error) -> K8sError {
        match &e {
            kube::Error::Api(status) if status.code == 404 => {
                let about_namespace = status
                    .details
                    .as_ref()
                    .is_some_and(|d| d.kind == "namespaces");
                if about_namespace {
                    K8sError::NamespaceMissing {
                        namespace: self.namespace.clone(),
                        server: self.server.clone(),
                    }
                } else {
                    K8sError::CrdMissing {
                        server: self.server.clone(),
                    }
                }
            }
            kube::Error::Api(status) if status.code == 403 => K8sError::Forbidden {
                verbs: verb.to_string(),
                namespace: self.namespace.clone(),
                message: status.message.clone(),
            },
            _ => K8sError::Api {
                what,
                source: Box::new(e),
            },
        }
    }

    fn watch_error(&self, e: watcher::Error) -> K8sError {
        match e {
            watcher::Error::InitialListFailed(e) => self.api_error("list", "list", e),
            watcher::Error::WatchStartFailed(e) => self.api_error("watch", "watch", e),
            e => K8sError::Watch(Box::new(e)),
        }
    }

    /// The object's creation time; `None` without one.
    fn created(object: &SignalingEnvelope) -> Option<SystemTime> {
        Some(object.metadata.creation_timestamp.as_ref()?.0.into())
    }

    /// The object's age by our clock; `None` without a creation time.
    fn age(object: &SignalingEnvelope) -> Option<Duration> {
        let created = Self::created(object)?;
        Some(
            SystemTime::now()
                .duration_since(created)
                .unwrap_or_default(),
        )
    }

    /// One event of the watch over `keys`.
    fn on_event(
        &self,
        event: Result<watcher::Event<SignalingEnvelope>, watcher::Error>,
        keys: &BTreeSet<Key>,
        failing: &mut bool,
    ) -> Flow {
        let event = match event {
            Ok(event) => event,
            Err(e) => return self.on_error(e, keys, failing),
        };
        if *failing {
            tracing::info!(backend = %self.name, "watch is back");
            *failing = false;
        }
        match event {
            watcher::Event::Init => {}
            watcher::Event::InitApply(object) | watcher::Event::Apply(object) => {
                self.handle(&object)
            }
            watcher::Event::InitDone => self.listed(keys),
            // Deleted objects stay remembered until their time is up.
            watcher::Event::Delete(_) => {}
        }
        Flow::Continue
    }

    /// An error of the watch over `keys`. The listens waiting for one of
    /// them get the error; on a definitive one their keys are forgotten first.
    /// Other errors are logged and counted: the stream retries with backoff.
    fn on_error(&self, e: watcher::Error, keys: &BTreeSet<Key>, failing: &mut bool) -> Flow {
        let error = self.watch_error(e);
        let definitive = error.is_definitive();
        let waiters = {
            let mut state = self.state();
            let state = &mut *state;
            state.waiters.retain(|w| !w.tx.is_closed());
            let (hit, rest): (Vec<Waiter>, Vec<Waiter>) = std::mem::take(&mut state.waiters)
                .into_iter()
                .partition(|w| keys.contains(&w.key) && state.pending.contains_key(&w.key));
            state.waiters = rest;
            if definitive {
                for waiter in &hit {
                    state.wanted.remove(&waiter.key);
                    state.pending.remove(&waiter.key);
                }
            }
            hit
        };
        if !waiters.is_empty() {
            for waiter in &waiters {
                tracing::debug!(backend = %self.name, key = %waiter.key, definitive, "first list failed: {error}");
            }
            let mut waiters = waiters.into_iter();
            let first = waiters.next();
            for waiter in waiters {
                let _ = waiter.tx.send(Err(error.duplicate()));
            }
            if let Some(first) = first {
                let _ = first.tx.send(Err(error));
            }
            return if definitive {
                Flow::Restart
            } else {
                Flow::Continue
            };
        }
        self.counters.watch_errors.fetch_add(1, Relaxed);
        if !*failing {
            tracing::warn!(backend = %self.name, "watch failed, retrying with backoff: {error}");
            *failing = true;
        } else {
            tracing::debug!(backend = %self.name, "watch failed again: {error}");
        }
        Flow::Continue
    }

    /// The watch over `keys` has listed them: none is new any more, and the
    /// listens waiting for one of them return.
    fn listed(&self, keys: &BTreeSet<Key>) {
        let waiters = {
            let mut state = self.state();
            for key in keys {
                state.pending.remove(key);
            }
            let (hit, rest): (Vec<Waiter>, Vec<Waiter>) = std::mem::take(&mut state.waiters)
                .into_iter()
                .partition(|w| keys.contains(&w.key));
            state.waiters = rest;
            hit
        };
        for waiter in waiters {
            let _ = waiter.tx.send(Ok(()));
        }
    }

    /// Hands `object` to the registry unless it was seen before, predates the
    /// listen of its recipient or is expired.
    fn handle(&self, object: &SignalingEnvelope) {
        let Some(uid) = object.metadata.uid.as_deref() else {
            self.counters.invalid.fetch_add(1, Relaxed);
            return;
        };
        let until = Instant::now() + self.ttl * 2;
        if !self.state().known.insert(uid, until, &self.counters) {
            self.counters.seen_again.fetch_add(1, Relaxed);
            return;
        }
        let envelope = match object.to_envelope() {
            Ok(envelope) => envelope,
            Err(why) => {
                self.invalid(object, &why);
                return;
            }
        };
        let Ok(recipient) = Key::from_slice(&envelope.recipient) else {
            self.invalid(object, "the recipient is not a 32-byte key");
            return;
        };
        let since = self.state().pending.get(&recipient).copied();
        if let Some(since) = since {
            // The key's first list: what existed before listen was called is stale.
            let threshold = since.checked_sub(CLOCK_SKEW).unwrap_or(since);
            if Self::created(object).is_none_or(|created| created < threshold) {
                self.counters.stale.fetch_add(1, Relaxed);
                return;
            }
        }
        if Self::age(object).is_some_and(|age| age > self.ttl) {
            self.counters.too_old.fetch_add(1, Relaxed);
            return;
        }
        if since.is_some() {
            self.counters.caught_up.fetch_add(1, Relaxed);
        }
        self.hand_over(&envelope);
    }

    fn hand_over(&self, envelope: &Envelope) {
        self.counters.handed_over.fetch_add(1, Relaxed);
        self.registry.deliver(envelope);
    }

    /// Counts and (rate-limited) logs an object that is not an envelope.
    fn invalid(&self, object: &SignalingEnvelope, why: &str) {
        let total = self.counters.invalid.fetch_add(1, Relaxed) + 1;
        if self.invalid_log.allow(Instant::now()) {
            tracing::warn!(
                backend = %self.name,
                object = %object.name_any(),
                total,
                "not an envelope, dropped: {why} ({total} so far; logged at most once a minute)"
            );
        } else {
            tracing::debug!(backend = %self.name, object = %object.name_any(), total, "not an envelope, dropped: {why}");
        }
    }
}

/// Aborts the task when dropped.
struct Task(JoinHandle<()>);

impl Task {
    async fn stop(mut self) {
        self.0.abort();
        let _ = (&mut self.0).await;
    }
}

impl Drop for Task {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The label selector of the watch over `keys`.
fn selector<'a>(label: &str, keys: impl IntoIterator<Item = &'a Key>) -> String {
    let values: Vec<String> = keys.into_iter().map(Key::to_base32).collect();
    format!("{label} in ({})", values.join(","))
}

/// Runs the one watch of a transport over the wanted keys, started over when
/// they change (`changes` counts the changes; `applied` reports the count the
/// running watch reflects), until the transport is closed.
async fn run_watches(
    shared: Arc<Shared>,
    api: Api<SignalingEnvelope>,
    options: K8sOptions,
    mut changes: watch::Receiver<u64>,
    applied: watch::Sender<u64>,
) {
    loop {
        let generation = *changes.borrow_and_update();
        let keys = shared.state().wanted.clone();
        applied.send_replace(generation);
        if keys.is_empty() {
            if changes.changed().await.is_err() {
                return;
            }
            continue;
        }
        let backoff = ResetTimerBackoff::new(
            ExponentialBackoff::from(
                backon::ExponentialBuilder::default()
                    .with_min_delay(options.backoff_min)
                    .with_max_delay(options.backoff_max)
                    .with_factor(2.0)
                    .with_jitter()
                    .without_max_times(),
            ),
            Duration::from_secs(120),
        );
        let mut stream = pin!(
            watcher(
                api.clone(),
                watcher::Config::default().labels(&selector(LABEL_RECIPIENT, &keys)),
            )
            .backoff(backoff)
        );
        let mut failing = false;
        loop {
            tokio::select! {
                biased;
                changed = changes.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    break;
                }
                event = stream.next() => {
                    // The stream retries without end; it ends only if kube changes that.
                    let Some(event) = event else { break };
                    if shared.on_event(event, &keys, &mut failing) == Flow::Restart {
                        break;
                    }
                }
            }
        }
    }
}

/// Whether access was checked, under a lock that serializes the access reviews.
#[derive(Default)]
struct Ops {
    access_checked: bool,
}

/// The Kubernetes transport.
pub struct K8s {
    shared: Arc<Shared>,
    client: Client,
    api: Api<SignalingEnvelope>,
    options: K8sOptions,
    /// Serializes the access reviews of concurrent listens.
    ops: tokio::sync::Mutex<Ops>,
    /// The watch task and the expiry task.
    tasks: Mutex<Option<(Task, Task)>>,
    /// Counts changes of the wanted keys, for the watch task.
    changes: watch::Sender<u64>,
    /// The count of changes the running watch reflects.
    applied: watch::Receiver<u64>,
    closed: AtomicBool,
}

impl fmt::Debug for K8s {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("K8s")
            .field("url", &self.shared.name)
            .field("namespace", &self.shared.namespace)
            .finish_non_exhaustive()
    }
}

impl K8s {
    /// A transport for `url` with default options. Loads the client
    /// configuration; the API server is contacted on the first send or listen.
    pub async fn connect(url: &url::Url, registry: Arc<Registry>) -> Result<Self, BackendError> {
        Self::with_options(url, registry, K8sOptions::default()).await
    }

    /// A transport for `url`.
    pub async fn with_options(
        url: &url::Url,
        registry: Arc<Registry>,
        options: K8sOptions,
    ) -> Result<Self, BackendError> {
        let target = K8sTarget::parse(url)?;
        let name: Arc<str> = Arc::from(url.as_str());
        let config = load_config(&target.source)
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
        let shared = Arc::new(Shared {
            name,
            server,
            namespace: target.namespace,
            ttl: target.ttl,
            registry,
            state: Mutex::new(State::default()),
            counters: Counters::default(),
            delete_denied_logged: AtomicBool::new(false),
            invalid_log: RateLimit::new(INVALID_LOG_INTERVAL),
        });
        let interval = options.expiry_interval.unwrap_or_else(|| {
            (target.ttl / 2).clamp(Duration::from_secs(1), Duration::from_secs(60))
        });
        let (changes, changes_rx) = watch::channel(0);
        let (applied_tx, applied) = watch::channel(0);
        let watches = Task(tokio::spawn(run_watches(
            shared.clone(),
            api.clone(),
            options.clone(),
            changes_rx,
            applied_tx,
        )));
        let expiry = Task(tokio::spawn(expire(
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
            ops: tokio::sync::Mutex::new(Ops::default()),
            tasks: Mutex::new(Some((watches, expiry))),
            changes,
            applied,
            closed: AtomicBool::new(false),
        })
    }

    /// The namespace of the envelope objects.
    pub fn namespace(&self) -> &str {
        &self.shared.namespace
    }

    /// How long an envelope object lives.
    pub fn ttl(&self) -> Duration {
        self.shared.ttl
    }

    /// The keys this transport listens on: from `listen` until `unlisten`,
    /// including those whose watch is still retrying after a transient error.
    pub fn listening(&self) -> BTreeSet<Key> {
        self.shared.state().wanted.clone()
    }

    /// The counters.
    pub fn stats(&self) -> K8sStats {
        let c = &self.shared.counters;
        K8sStats {
            sent: c.sent.load(Relaxed),
            handed_over: c.handed_over.load(Relaxed),
            seen_again: c.seen_again.load(Relaxed),
            stale: c.stale.load(Relaxed),
            caught_up: c.caught_up.load(Relaxed),
            too_old: c.too_old.load(Relaxed),
            invalid: c.invalid.load(Relaxed),
            deleted: c.deleted.load(Relaxed),
            forgotten_early: c.forgotten_early.load(Relaxed),
            watch_errors: c.watch_errors.load(Relaxed),
        }
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

    /// Asks the API server whether we may `verbs` envelope objects in our
    /// namespace, so that a missing right fails at once instead of making the
    /// watch retry forever. Returns whether the API server answered: if the
    /// review itself fails or times out (`timeout`), the check is skipped
    /// and the requests that follow report what is wrong.
    async fn check_access(&self, verbs: &[&str], timeout: Duration) -> Result<bool, K8sError> {
        let reviews: Api<SelfSubjectAccessReview> = Api::all(self.client.clone());
        let ask = |verb: &str| {
            let review = SelfSubjectAccessReview {
                spec: SelfSubjectAccessReviewSpec {
                    resource_attributes: Some(ResourceAttributes {
                        group: Some(GROUP.into()),
                        resource: Some(RESOURCE.into()),
                        namespace: Some(self.shared.namespace.clone()),
                        verb: Some((*verb).into()),
                        ..ResourceAttributes::default()
                    }),
                    ..SelfSubjectAccessReviewSpec::default()
                },
                ..SelfSubjectAccessReview::default()
            };
            let reviews = reviews.clone();
            async move {
                tokio::time::timeout(timeout, reviews.create(&PostParams::default(), &review)).await
            }
        };
        // All verbs at once: the whole check takes one `timeout` at most.
        let answers = futures::future::join_all(verbs.iter().map(|verb| ask(verb))).await;
        let mut denied = Vec::new();
        let mut reason = String::new();
        for (verb, answer) in verbs.iter().zip(answers) {
            match answer {
                Ok(Ok(review)) => {
                    if let Some(status) = review.status
                        && !status.allowed
                    {
                        denied.push(*verb);
                        if reason.is_empty() {
                            reason = status.reason.unwrap_or_default();
                        }
                    }
                }
                Ok(Err(e)) => {
                    tracing::debug!(backend = %self.shared.name, "access review failed, not checked: {e}");
                    return Ok(false);
                }
                Err(_) => {
                    tracing::debug!(backend = %self.shared.name, "access review: no answer within {timeout:?}, not checked");
                    return Ok(false);
                }
            }
        }
        if denied.is_empty() {
            return Ok(true);
        }
        Err(K8sError::Forbidden {
            verbs: denied.join(", "),
            namespace: self.shared.namespace.clone(),
            message: if reason.is_empty() {
                "denied by the API server's authorization".into()
            } else {
                reason
            },
        })
    }
}

/// Deletes, every `interval`, the objects this transport sent or listens for
/// once they are older than the ttl; each request within `limit`.
async fn expire(
    shared: Arc<Shared>,
    api: Api<SignalingEnvelope>,
    interval: Duration,
    limit: Duration,
) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let (recipients, senders) = {
            let mut state = shared.state();
            let now = Instant::now();
            // A sender key is kept until everything it sent has had time to expire.
            let keep = shared.ttl * 2 + interval;
            state
                .senders
                .retain(|_, last| now.duration_since(*last) < keep);
            let senders: Vec<Key> = state.senders.keys().copied().collect();
            (state.wanted.iter().copied().collect::<Vec<_>>(), senders)
        };
        for (label, keys) in [(LABEL_RECIPIENT, recipients), (LABEL_SENDER, senders)] {
            for chunk in keys.chunks(KEYS_PER_SELECTOR) {
                expire_matching(&shared, &api, &selector(label, chunk), limit).await;
            }
        }
    }
}

async fn expire_matching(
    shared: &Shared,
    api: &Api<SignalingEnvelope>,
    selector: &str,
    limit: Duration,
) {
    let params = ListParams::default().labels(selector);
    let objects = match tokio::time::timeout(limit, api.list(&params)).await {
        Ok(Ok(list)) => list.items,
        Ok(Err(e)) => {
            tracing::debug!(backend = %shared.name, "expiry: list failed: {e}");
            return;
        }
        Err(_) => {
            tracing::debug!(backend = %shared.name, "expiry: list: no answer within {limit:?}");
            return;
        }
    };
    for object in objects {
        if Shared::age(&object).is_none_or(|age| age <= shared.ttl) {
            continue;
        }
        let (Some(name), Some(uid)) = (object.metadata.name.as_deref(), object.uid()) else {
            continue;
        };
        let params = DeleteParams {
            preconditions: Some(Preconditions {
                uid: Some(uid),
                resource_version: None,
            }),
            ..DeleteParams::default()
        };
        let Ok(deleted) = tokio::time::timeout(limit, api.delete(name, &params)).await else {
            tracing::debug!(backend = %shared.name, object = name, "expiry: delete: no answer within {limit:?}");
            return;
        };
        match deleted {
            Ok(_) => {
                shared.counters.deleted.fetch_add(1, Relaxed);
                tracing::debug!(backend = %shared.name, object = name, "expired envelope deleted");
            }
            // Deleted meanwhile by another peer (404), or replaced (409).
            Err(kube::Error::Api(status)) if status.code == 404 || status.code == 409 => {}
            Err(kube::Error::Api(status)) if status.code == 403 => {
                if !shared.delete_denied_logged.swap(true, Relaxed) {
                    tracing::warn!(backend = %shared.name, "expired envelopes cannot be deleted: {}", status.message);
                }
                return;
            }
            Err(e) => {
                tracing::debug!(backend = %shared.name, object = name, "expiry: delete failed: {e}");
                return;
            }
        }
    }
}

async fn load_config(source: &KubeconfigSource) -> Result<Config, K8sError> {
    match source {
        KubeconfigSource::Infer => Config::infer().await.map_err(|e| K8sError::Config {
            what: "kubeconfig search ($KUBECONFIG, ~/.kube/config, in-cluster)".into(),
            source: Box::new(e),
        }),
        KubeconfigSource::InCluster => Config::incluster().map_err(|e| K8sError::Config {
            what: "in-cluster configuration (KUBERNETES_SERVICE_HOST, KUBERNETES_SERVICE_PORT \
                   and /var/run/secrets/kubernetes.io/serviceaccount, as in a pod)"
                .into(),
            source: Box::new(e),
        }),
        KubeconfigSource::File(path) => {
            let what = || format!("kubeconfig {}", path.display());
            let kubeconfig = Kubeconfig::read_from(path).map_err(|e| K8sError::Config {
                what: what(),
                source: Box::new(e),
            })?;
            Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
                .await
                .map_err(|e| K8sError::Config {
                    what: what(),
                    source: Box::new(e),
                })
        }
    }
}

#[async_trait]
impl Transport for K8s {
    async fn send(&self, envelope: &Envelope) -> Result<(), BackendError> {
        self.check_open()?;
        let object = SignalingEnvelope::from_envelope(envelope)?;
        let timeout = self.options.send_timeout;
        match tokio::time::timeout(timeout, self.api.create(&PostParams::default(), &object)).await
        {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(self.error(self.shared.api_error("create", "create", e))),
            Err(_) => {
                return Err(self.error(K8sError::Timeout {
                    what: "create",
                    timeout,
                }));
            }
        }
        self.shared.counters.sent.fetch_add(1, Relaxed);
        let sender = envelope.sender_key()?;
        let mut state = self.shared.state();
        if state.senders.len() >= MAX_SENDERS
            && !state.senders.contains_key(&sender)
            && let Some(oldest) = state
                .senders
                .iter()
                .min_by_key(|(_, t)| **t)
                .map(|(k, _)| *k)
        {
            state.senders.remove(&oldest);
        }
        state.senders.insert(sender, Instant::now());
        Ok(())
    }

    async fn listen(&self, key: Key) -> Result<(), BackendError> {
        // Objects of the key created from here on are delivered.
        let called = SystemTime::now();
        self.check_open()?;
        let deadline = Instant::now() + self.options.listen_timeout;
        if self.shared.state().is_live(&key) {
            return Ok(());
        }
        // The access review, once per transport, within this listen's time.
        let reviewed = tokio::time::timeout_at(deadline, async {
            let mut ops = self.ops.lock().await;
            if !ops.access_checked {
                let timeout = self.options.send_timeout.min(self.options.listen_timeout);
                // Unanswered: the next listen asks again, within its own time.
                ops.access_checked = self.check_access(&["list", "watch"], timeout).await?;
            }
            Ok(())
        });
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
            let mut state = self.shared.state();
            // Checked under the lock that close clears the state under.
            self.check_open()?;
            if state.is_live(&key) {
                return Ok(());
            }
            state.wanted.insert(key);
            state.pending.entry(key).or_insert(called);
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
                let why = if self.shared.state().wanted.contains(&key) {
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
            let mut state = self.shared.state();
            if !state.wanted.remove(&key) {
                return Ok(());
            }
            state.pending.remove(&key);
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
            let mut state = self.shared.state();
            state.wanted.clear();
            state.pending.clear();
            state.waiters.clear();
        }
        let tasks = self.tasks.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some((watches, expiry)) = tasks {
            watches.stop().await;
            expiry.stop().await;
        }
        Ok(())
    }

    fn name(&self) -> &str {
        &self.shared.name
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<K8sTarget, BackendError> {
        let url = url::Url::parse(s).map_err(|e| BackendError::url(s, e))?;
        K8sTarget::parse(&url)
    }

    #[test]
    fn urls() {
        let t = parse("k8s:///etc/kube/config?namespace=signal&ttl=30s").unwrap();
        assert_eq!(t.source, KubeconfigSource::File("/etc/kube/config".into()));
        assert_eq!(t.namespace, "signal");
        assert_eq!(t.ttl, Duration::from_secs(30));
        let t = parse("k8s://").unwrap();
        assert_eq!(
            (t.source, t.namespace.as_str(), t.ttl),
            (KubeconfigSource::Infer, "default", DEFAULT_TTL)
        );
        assert_eq!(parse("k8s:///").unwrap().source, KubeconfigSource::Infer);
        for incluster in ["k8s:incluster", "k8s://incluster", "k8s:///incluster"] {
            assert_eq!(
                parse(incluster).unwrap().source,
                KubeconfigSource::InCluster,
                "{incluster}"
            );
        }
        assert_eq!(
            parse("k8s:///tmp/my%20config").unwrap().source,
            KubeconfigSource::File("/tmp/my config".into())
        );
        assert_eq!(
            parse("k8s:rel/config").unwrap().source,
            KubeconfigSource::File("rel/config".into())
        );
        assert_eq!(
            parse("k8s:///x?ttl=2m").unwrap().ttl,
            Duration::from_secs(120)
        );
        for bad in [
            "k8s://host/path",
            "k8s:///x?namespace=Not_A_Label",
            "k8s:///x?ttl=soon",
            "k8s:///x?ttl=10ms",
            "k8s:///x?context=foo",
            "k8s://user@/x",
        ] {
            assert!(parse(bad).is_err(), "{bad} was accepted");
        }
        let err = parse("k8s:///x?context=foo").unwrap_err().to_string();
        assert!(err.contains("unknown parameter \"context\""), "{err}");
    }

    #[test]
    fn objects_carry_the_envelope_and_both_labels() {
        let (a, b) = (Key::generate(), Key::generate());
        let envelope = crate::proto::signaling::Message::default()
            .seal(&crate::KeyPair::new(a, b.public_key()))
            .unwrap();
        let object = SignalingEnvelope::from_envelope(&envelope).unwrap();
        assert_eq!(object.to_envelope().unwrap(), envelope);
        let labels = object.metadata.labels.as_ref().unwrap();
        assert_eq!(labels[LABEL_SENDER], a.public_key().to_base32());
        assert_eq!(labels[LABEL_RECIPIENT], b.public_key().to_base32());
        assert_eq!(object.spec.sender, a.public_key().to_string());
        let json = serde_json::to_value(&object).unwrap();
        assert_eq!(json["apiVersion"], "cunicu.li/v1");
        assert_eq!(json["kind"], "SignalingEnvelope");
        assert_eq!(json["recipient"], b.public_key().to_string());
        assert!(json["contents"]["nonce"].is_string());
        assert!(json.get("spec").is_none(), "{json}");
        let mut broken = object.clone();
        broken.spec.contents.body = "not base64!".into();
        assert!(broken.to_envelope().unwrap_err().contains("contents.body"));
    }

    #[test]
    fn the_crd_has_no_spec() {
        let crd = serde_json::to_value(crd()).unwrap();
        assert_eq!(crd["metadata"]["name"], CRD_NAME);
        assert_eq!(crd["spec"]["scope"], "Namespaced");
        assert_eq!(crd["spec"]["names"]["shortNames"][0], "env");
        let props = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"];
        for field in ["sender", "recipient", "contents"] {
            assert!(props.get(field).is_some(), "{field} missing: {props}");
        }
        assert!(props.get("spec").is_none(), "{props}");
    }

    fn shared(registry: Arc<Registry>) -> Shared {
        Shared {
            name: "k8s:///test".into(),
            server: "https://127.0.0.1:1".into(),
            namespace: "default".into(),
            ttl: Duration::from_secs(60),
            registry,
            state: Mutex::new(State::default()),
            counters: Counters::default(),
            delete_denied_logged: AtomicBool::new(false),
            invalid_log: RateLimit::new(INVALID_LOG_INTERVAL),
        }
    }

    /// An object from `a` to `b`, created `ago` ago.
    fn object(a: &Key, b: &Key, ago: Duration, uid: &str) -> SignalingEnvelope {
        let envelope = crate::proto::signaling::Message::default()
            .seal(&crate::KeyPair::new(*a, b.public_key()))
            .unwrap();
        let mut object = SignalingEnvelope::from_envelope(&envelope).unwrap();
        object.metadata.uid = Some(uid.into());
        let created = k8s_openapi::jiff::Timestamp::try_from(SystemTime::now() - ago).unwrap();
        object.metadata.creation_timestamp = Some(
            k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(created),
        );
        object
    }

    #[tokio::test]
    async fn a_first_list_delivers_what_was_created_after_listen_was_called() {
        let registry = Registry::new();
        let (a, b) = (Key::generate(), Key::generate());
        let count = Arc::new(AtomicU64::new(0));
        let c = count.clone();
        registry.add(
            &crate::KeyPair::new(b, Key::ZERO),
            Arc::new(move |_: &crate::Delivery| {
                c.fetch_add(1, Relaxed);
            }),
        );
        let shared = shared(registry);
        {
            let mut state = shared.state();
            state.wanted.insert(b.public_key());
            // listen was called 10 s ago.
            state
                .pending
                .insert(b.public_key(), SystemTime::now() - Duration::from_secs(10));
        }
        // Created before the call, beyond the allowance: stale.
        shared.handle(&object(&a, &b, Duration::from_secs(13), "old"));
        // Within the allowance, and after the call: delivered.
        shared.handle(&object(&a, &b, Duration::from_secs(11), "skewed"));
        shared.handle(&object(&a, &b, Duration::from_secs(5), "new"));
        shared.handle(&object(&a, &b, Duration::from_secs(5), "new"));
        let stats = &shared.counters;
        assert_eq!(stats.stale.load(Relaxed), 1);
        assert_eq!(stats.caught_up.load(Relaxed), 2);
        assert_eq!(stats.seen_again.load(Relaxed), 1);
        assert_eq!(count.load(Relaxed), 2);
        // Once listed, the key is live: everything not seen is delivered.
        shared.listed(&BTreeSet::from([b.public_key()]));
        shared.handle(&object(&a, &b, Duration::from_secs(30), "relisted"));
        assert_eq!(count.load(Relaxed), 3);
        assert_eq!(stats.stale.load(Relaxed), 1);
    }

    #[test]
    fn warnings_about_undecodable_objects_are_rate_limited() {
        let limit = RateLimit::new(Duration::from_secs(60));
        let t0 = Instant::now();
        assert!(limit.allow(t0));
        assert!(!limit.allow(t0 + Duration::from_secs(1)));
        assert!(!limit.allow(t0 + Duration::from_secs(59)));
        assert!(limit.allow(t0 + Duration::from_secs(60)));
        assert!(!limit.allow(t0 + Duration::from_secs(61)));
    }

    #[test]
    fn only_403_and_404_are_definitive() {
        let server = String::from("https://x");
        assert!(K8sError::CrdMissing { server }.is_definitive());
        assert!(
            K8sError::Forbidden {
                verbs: "list".into(),
                namespace: "n".into(),
                message: String::new(),
            }
            .is_definitive()
        );
        assert!(
            !K8sError::Timeout {
                what: "list",
                timeout: Duration::from_secs(1),
            }
            .is_definitive()
        );
    }

    #[test]
    fn known_uids_are_remembered_and_bounded() {
        let counters = Counters::default();
        let mut known = Known::default();
        let until = Instant::now() + Duration::from_secs(60);
        assert!(known.insert("a", until, &counters));
        assert!(!known.insert("a", until, &counters));
        for i in 0..MAX_KNOWN + 10 {
            known.insert(&i.to_string(), until, &counters);
        }
        assert!(known.until.len() <= MAX_KNOWN);
        assert!(counters.forgotten_early.load(Relaxed) >= 10);
    }
}
