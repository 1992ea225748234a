//! The backend API of docs/PROTOCOL.md §6, and backends built from URLs.
//!
//! A [`Backend`] is what peers use: publish a message to a peer, subscribe a
//! [`Handler`] to the messages from a peer. Every backend of this crate is a
//! [`SignalingBackend`]: the shared [`Registry`] (handlers, opening envelopes)
//! over a [`Transport`] (the medium that moves sealed envelopes). Several URLs
//! give one backend over a multi transport: publish goes to all media,
//! subscribe to all, and an envelope that arrives through several is delivered once.

use std::{
    collections::HashMap,
    fmt,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use async_trait::async_trait;
use tokio::task::JoinSet;

use crate::{
    EnvelopeError, Handler, Key, KeyPair, PrivateKey, Registry, Sender,
    proto::signaling::{BackendType, Envelope, Message},
};

#[cfg(feature = "grpc")]
pub mod grpc;
mod inprocess;
#[cfg(feature = "k8s")]
pub mod k8s;
mod multi;
#[cfg(feature = "multicast")]
pub mod multicast;

pub use inprocess::InProcess;
pub use multi::Multi;

/// Boxed error of an implementation behind a trait: a medium's, kept as the
/// source of [`BackendError::Transport`], or an ICE agent's (in the session crate).
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Why a backend operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BackendError {
    /// The URL does not parse or has a bad parameter.
    #[error("invalid backend URL {url:?}: {reason}")]
    Url {
        /// The URL as given.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// No backend has this URL scheme.
    #[error(
        "unknown backend scheme {scheme:?} in {url:?} (known: grpc://, k8s://, multicast://, inprocess:)"
    )]
    UnknownScheme {
        /// The URL as given.
        url: String,
        /// Its scheme.
        scheme: String,
    },
    /// The backend exists but this build does not include it.
    #[error("backend {scheme}:// is not in this build (cargo feature {feature:?})")]
    NotBuilt {
        /// The URL scheme.
        scheme: String,
        /// The cargo feature that adds it.
        feature: &'static str,
    },
    /// The message could not be sealed.
    #[error(transparent)]
    Seal(#[from] EnvelopeError),
    /// The medium failed.
    #[error("{backend}: {source}")]
    Transport {
        /// Which backend (its URL).
        backend: String,
        /// What failed.
        #[source]
        source: BoxError,
    },
    /// Every backend of a multi backend failed.
    #[error("all backends failed: {}", join(.0))]
    AllFailed(Vec<BackendError>),
    /// The backend was closed.
    #[error("backend is closed")]
    Closed,
}

fn join(errors: &[BackendError]) -> String {
    errors
        .iter()
        .map(|e| e.to_string())
        .collect::<Vec<_>>()
        .join("; ")
}

impl BackendError {
    /// A [`BackendError::Transport`] for `backend`.
    pub fn transport(backend: impl fmt::Display, source: impl Into<BoxError>) -> Self {
        BackendError::Transport {
            backend: backend.to_string(),
            source: source.into(),
        }
    }

    /// A [`BackendError::Url`].
    pub fn url(url: impl fmt::Display, reason: impl fmt::Display) -> Self {
        BackendError::Url {
            url: url.to_string(),
            reason: reason.to_string(),
        }
    }

    /// The medium's own error, if this is a [`BackendError::Transport`] whose
    /// source is an `E`: `grpc::GrpcError`, `k8s::K8sError`,
    /// `multicast::MulticastError`.
    ///
    /// ```
    /// # #[cfg(feature = "grpc")] {
    /// # use cunicu_signal::{BackendError, backend::grpc::GrpcError};
    /// fn refused(e: &BackendError) -> bool {
    ///     e.medium::<GrpcError>()
    ///         .and_then(GrpcError::code)
    ///         .is_some_and(|c| c == tonic::Code::PermissionDenied)
    /// }
    /// # assert!(!refused(&BackendError::Closed));
    /// # }
    /// ```
    pub fn medium<E: std::error::Error + 'static>(&self) -> Option<&E> {
        match self {
            BackendError::Transport { source, .. } => source.downcast_ref::<E>(),
            _ => None,
        }
    }

    /// True if the same call may succeed later without any change on our
    /// side: the medium is unreachable, overloaded or restarting. False for
    /// what needs a change first: a bad URL, a missing feature, a message
    /// that cannot be sealed, a closed backend, a refused key, a missing CRD
    /// or right. A multi backend's failure is transient if any part's is.
    /// A medium error of an unknown type counts as transient.
    pub fn is_transient(&self) -> bool {
        match self {
            BackendError::Url { .. }
            | BackendError::UnknownScheme { .. }
            | BackendError::NotBuilt { .. }
            | BackendError::Seal(_)
            | BackendError::Closed => false,
            BackendError::AllFailed(errors) => errors.iter().any(BackendError::is_transient),
            BackendError::Transport { source, .. } => transient_source(source.as_ref()),
        }
    }
}

fn transient_source(source: &(dyn std::error::Error + Send + Sync + 'static)) -> bool {
    #[cfg(feature = "grpc")]
    if let Some(e) = source.downcast_ref::<grpc::GrpcError>() {
        return e.is_transient();
    }
    #[cfg(feature = "k8s")]
    if let Some(e) = source.downcast_ref::<k8s::K8sError>() {
        return e.is_transient();
    }
    #[cfg(feature = "multicast")]
    if let Some(e) = source.downcast_ref::<multicast::MulticastError>() {
        return e.is_transient();
    }
    // An envelope that cannot be made is as bad the next time.
    !source.is::<EnvelopeError>()
}

/// What a publish achieved, as far as the medium can tell.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Published {
    /// How many subscription streams the envelope reached: a `grpc://`
    /// server that counts says (on every replica of a cluster), `inprocess:`
    /// knows its listeners; `None` where the medium cannot tell (multicast,
    /// Kubernetes, a server that does not count).
    pub recipients: Option<u32>,
}

impl Published {
    /// The medium cannot tell who got it.
    pub const fn unknown() -> Self {
        Published { recipients: None }
    }

    /// It reached `n` subscription streams.
    pub const fn to(n: u32) -> Self {
        Published {
            recipients: Some(n),
        }
    }

    /// True if the medium knows that nobody got it.
    pub fn reached_nobody(&self) -> bool {
        self.recipients == Some(0)
    }
}

/// A signaling backend (docs/PROTOCOL.md §6).
#[async_trait]
pub trait Backend: Send + Sync {
    /// Seals `message` from `pair.ours` to `pair.theirs` and sends it. Says how
    /// many subscription streams it reached where the medium can tell.
    async fn publish(&self, pair: &KeyPair, message: &Message) -> Result<Published, BackendError>;

    /// Delivers every message addressed to the public key of `ours` and sent by
    /// `from` to `handler`. Returns true if this is the first subscription of
    /// our public key on this backend. Returns once the medium delivers (for
    /// gRPC: once the server has confirmed the subscription).
    async fn subscribe(
        &self,
        ours: &PrivateKey,
        from: Sender,
        handler: Arc<dyn Handler>,
    ) -> Result<bool, BackendError>;

    /// Stops delivering to `handler` what `ours` gets from `from`. Returns true
    /// if no handler is left for that sender. The medium's resources for our
    /// key (a stream, a watch) are released when no handler at all is left for
    /// it.
    async fn unsubscribe(
        &self,
        ours: &PrivateKey,
        from: Sender,
        handler: &Arc<dyn Handler>,
    ) -> Result<bool, BackendError>;

    /// Which kind of backend this is.
    fn backend_type(&self) -> BackendType;

    /// Stops every subscription, drops its handlers and releases the medium.
    /// Later calls fail with [`BackendError::Closed`].
    async fn close(&self) -> Result<(), BackendError>;
}

/// A medium that moves sealed envelopes: what a new kind of backend implements.
///
/// A transport hands every envelope it receives for a key it listens on to the
/// [`Registry`] it was built with ([`Registry::deliver`], which only queues it
/// for the registry's worker); it never opens envelopes itself.
#[async_trait]
pub trait Transport: Send + Sync + 'static {
    /// Sends a sealed envelope to its recipient; says how many subscription
    /// streams it reached, if the medium can tell.
    async fn send(&self, envelope: &Envelope) -> Result<Published, BackendError>;
    /// Sends a sealed envelope that `ours` (the sender's private key) sealed: a
    /// medium that proves possession of the sender's key (`grpc://` to a
    /// server that asks for it, docs/PROTOCOL.md §11) uses the key; the others send.
    async fn send_as(
        &self,
        envelope: &Envelope,
        ours: &PrivateKey,
    ) -> Result<Published, BackendError> {
        let _ = ours;
        self.send(envelope).await
    }
    /// Starts receiving envelopes addressed to our public key `key`. Returns once
    /// envelopes published from now on will arrive. On an error the medium may
    /// go on trying in the background until [`Transport::unlisten`].
    async fn listen(&self, key: Key) -> Result<(), BackendError>;
    /// Stops receiving envelopes for `key`.
    async fn unlisten(&self, key: Key) -> Result<(), BackendError>;
    /// Which kind of medium this is.
    fn backend_type(&self) -> BackendType;
    /// Stops receiving and releases the medium.
    async fn close(&self) -> Result<(), BackendError>;
    /// The URL or name used in logs and errors.
    fn name(&self) -> &str;
}

/// Implements [`Transport`] for a pointer type by forwarding every method to
/// the transport it points to.
macro_rules! forward_transport {
    ($(#[$doc:meta])* $pointer:ident) => {
        $(#[$doc])*
        #[async_trait]
        impl<T: Transport + ?Sized> Transport for $pointer<T> {
            async fn send(&self, envelope: &Envelope) -> Result<Published, BackendError> {
                (**self).send(envelope).await
            }
            async fn send_as(&self, envelope: &Envelope, ours: &PrivateKey) -> Result<Published, BackendError> {
                (**self).send_as(envelope, ours).await
            }
            async fn listen(&self, key: Key) -> Result<(), BackendError> {
                (**self).listen(key).await
            }
            async fn unlisten(&self, key: Key) -> Result<(), BackendError> {
                (**self).unlisten(key).await
            }
            fn backend_type(&self) -> BackendType {
                (**self).backend_type()
            }
            async fn close(&self) -> Result<(), BackendError> {
                (**self).close().await
            }
            fn name(&self) -> &str {
                (**self).name()
            }
        }
    };
}

forward_transport!(
    /// A shared transport is a transport: keep an `Arc` to read its counters
    /// (e.g. `Multicast::stats`) while a backend owns a clone.
    Arc
);
forward_transport!(
    /// A boxed transport is a transport: what [`connect_transport`] returns can
    /// be wrapped (e.g. in `conformance::Gated`).
    Box
);

/// The locks of own keys, one per key that a subscribe or unsubscribe works on.
type KeyLocks = parking_lot::Mutex<HashMap<Key, Arc<tokio::sync::Mutex<()>>>>;

/// A backend: the subscription [`Registry`] over a [`Transport`].
///
/// `subscribe` adds the handler to the registry first and then lets the
/// medium listen, so that an envelope the medium receives as soon as it
/// listens finds its handler. If the listen fails, or the caller drops the
/// `subscribe` future while it waits for the medium, the handler is removed
/// again and the medium stops listening for the key unless another handler
/// wants it (for a dropped future, in a task that the backend owns; `close`
/// ends it).
pub struct SignalingBackend {
    transport: Arc<dyn Transport>,
    registry: Arc<Registry>,
    /// One lock per own key, held by subscribe and unsubscribe, so that
    /// listen/unlisten of a key never race while other keys go on.
    key_locks: Arc<KeyLocks>,
    /// Unlistens of subscribes dropped while their medium listened.
    undos: parking_lot::Mutex<JoinSet<()>>,
    closed: AtomicBool,
}

impl SignalingBackend {
    /// A backend over `transport`, which delivers into `registry`.
    pub fn new(transport: Box<dyn Transport>, registry: Arc<Registry>) -> Self {
        SignalingBackend {
            transport: Arc::from(transport),
            registry,
            key_locks: Arc::default(),
            undos: parking_lot::Mutex::new(JoinSet::new()),
            closed: AtomicBool::new(false),
        }
    }

    /// The registry: its counters say what was delivered and dropped.
    pub fn registry(&self) -> &Arc<Registry> {
        &self.registry
    }

    /// The transport underneath.
    pub fn transport(&self) -> &dyn Transport {
        self.transport.as_ref()
    }

    fn check_open(&self) -> Result<(), BackendError> {
        if self.closed.load(Ordering::Acquire) {
            Err(BackendError::Closed)
        } else {
            Ok(())
        }
    }

    /// Waits for the lock of our key `public`.
    async fn lock_key(&self, public: Key) -> KeyLock {
        let mutex = self.key_locks.lock().entry(public).or_default().clone();
        let guard = mutex.clone().lock_owned().await;
        KeyLock {
            locks: self.key_locks.clone(),
            public,
            mutex,
            guard: Some(guard),
        }
    }

    /// Stops the medium listening for `public` in a task that keeps the key's
    /// lock until it is done: for a subscribe dropped midway, which cannot
    /// wait for the medium any more.
    fn unlisten_later(&self, public: Key, lock: KeyLock) {
        if self.closed.load(Ordering::Acquire) {
            // The close stops the medium for every key.
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            tracing::warn!(
                backend = self.transport.name(),
                key = %public,
                "subscribe dropped outside a tokio runtime: the medium listens for this key until close"
            );
            return;
        };
        let transport = self.transport.clone();
        let mut undos = self.undos.lock();
        // Those done are taken out: the set holds the running ones only.
        while undos.try_join_next().is_some() {}
        undos.spawn_on(
            async move {
                let _lock = lock;
                if let Err(e) = transport.unlisten(public).await {
                    tracing::debug!(backend = transport.name(), key = %public, "unlisten after a dropped subscribe failed: {e}");
                }
            },
            &runtime,
        );
    }
}

/// The lock of one own key; the map entry goes when nobody holds or waits for it.
struct KeyLock {
    locks: Arc<KeyLocks>,
    public: Key,
    mutex: Arc<tokio::sync::Mutex<()>>,
    guard: Option<tokio::sync::OwnedMutexGuard<()>>,
}

impl Drop for KeyLock {
    fn drop(&mut self) {
        self.guard.take();
        let mut locks = self.locks.lock();
        // Held by the map and by us only: nobody else waits.
        if Arc::strong_count(&self.mutex) == 2 {
            locks.remove(&self.public);
        }
    }
}

/// The first handler of a key, added by a subscribe whose medium does not
/// listen yet. Unless [`Undo::keep`] is called, the handler is removed again
/// and, if no handler is left for the key, the medium stops listening for it:
/// by [`Undo::run`], or in a task if this is dropped. Holds the key's lock
/// until then.
struct Undo<'a> {
    backend: &'a SignalingBackend,
    ours: PrivateKey,
    from: Sender,
    handler: Arc<dyn Handler>,
    public: Key,
    lock: Option<KeyLock>,
}

impl Undo<'_> {
    /// The subscription stands: nothing to undo.
    fn keep(mut self) {
        self.lock.take();
    }

    /// Removes the handler and, if no handler is left for the key, stops the
    /// medium listening for it. If this future is dropped midway, the drop
    /// finishes the job.
    async fn run(mut self) {
        let registry = &self.backend.registry;
        registry.remove(&self.ours, self.from, &self.handler);
        if !registry.has_key(&self.public)
            && let Err(e) = self.backend.transport.unlisten(self.public).await
        {
            tracing::debug!(backend = self.backend.transport.name(), key = %self.public, "unlisten after a failed subscribe failed: {e}");
        }
        self.lock.take();
    }
}

impl Drop for Undo<'_> {
    fn drop(&mut self) {
        let Some(lock) = self.lock.take() else {
            return;
        };
        let registry = &self.backend.registry;
        registry.remove(&self.ours, self.from, &self.handler);
        if !registry.has_key(&self.public) {
            self.backend.unlisten_later(self.public, lock);
        }
    }
}

#[async_trait]
impl Backend for SignalingBackend {
    async fn publish(&self, pair: &KeyPair, message: &Message) -> Result<Published, BackendError> {
        self.check_open()?;
        let envelope = message.seal(pair)?;
        self.transport.send_as(&envelope, &pair.ours).await
    }

    async fn subscribe(
        &self,
        ours: &PrivateKey,
        from: Sender,
        handler: Arc<dyn Handler>,
    ) -> Result<bool, BackendError> {
        let public = ours.public_key();
        let lock = self.lock_key(public).await;
        self.check_open()?;
        // The handler first, then the medium: what the medium receives from
        // the moment it listens finds the handler.
        let first = self.registry.add(ours, from, handler.clone());
        if !first {
            // The medium listens already: the subscribe that added the key's
            // first handler kept the key's lock until its listen was done.
            drop(lock);
            // Closed meanwhile (close does not take the key locks): the close
            // may have cleared the registry before this add.
            if self.closed.load(Ordering::Acquire) {
                self.registry.clear();
                return Err(BackendError::Closed);
            }
            return Ok(false);
        }
        let undo = Undo {
            backend: self,
            ours: ours.clone(),
            from,
            handler,
            public,
            lock: Some(lock),
        };
        let error = match self.transport.listen(public).await {
            // Closed while the medium was listening: the close did not see
            // this listen (nor, maybe, this add), so both are undone here.
            Ok(()) if self.closed.load(Ordering::Acquire) => BackendError::Closed,
            Ok(()) => {
                undo.keep();
                return Ok(true);
            }
            Err(e) => e,
        };
        // Also stops what the medium may still be trying for this key.
        undo.run().await;
        Err(error)
    }

    async fn unsubscribe(
        &self,
        ours: &PrivateKey,
        from: Sender,
        handler: &Arc<dyn Handler>,
    ) -> Result<bool, BackendError> {
        let public = ours.public_key();
        let _lock = self.lock_key(public).await;
        self.check_open()?;
        let removal = self.registry.remove(ours, from, handler);
        if removal.last_for_key {
            self.transport.unlisten(public).await?;
        }
        Ok(removal.last_for_sender)
    }

    fn backend_type(&self) -> BackendType {
        self.transport.backend_type()
    }

    async fn close(&self) -> Result<(), BackendError> {
        if self.closed.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        // Unlistens still running are moot: the medium stops for every key.
        let mut undos = std::mem::take(&mut *self.undos.lock());
        undos.shutdown().await;
        let closed = self.transport.close().await;
        // The worker stops and the handlers go: channels they feed see their end.
        self.registry.close().await;
        closed
    }
}

impl fmt::Debug for SignalingBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SignalingBackend")
            .field("transport", &self.transport.name())
            .finish_non_exhaustive()
    }
}

/// Builds the transport for one URL, delivering into `registry`. The scheme
/// picks the medium (docs/PROTOCOL.md §6).
pub async fn connect_transport(
    url: &str,
    registry: Arc<Registry>,
) -> Result<Box<dyn Transport>, BackendError> {
    let parsed = url::Url::parse(url).map_err(|e| BackendError::url(url, e))?;
    match parsed.scheme() {
        "inprocess" => Ok(Box::new(InProcess::new(&parsed, registry)?)),
        #[cfg(feature = "grpc")]
        "grpc" => Ok(Box::new(grpc::Grpc::connect(&parsed, registry)?)),
        #[cfg(not(feature = "grpc"))]
        "grpc" => Err(BackendError::NotBuilt {
            scheme: "grpc".into(),
            feature: "grpc",
        }),
        #[cfg(feature = "k8s")]
        "k8s" => Ok(Box::new(k8s::K8s::connect(&parsed, registry).await?)),
        #[cfg(not(feature = "k8s"))]
        "k8s" => Err(BackendError::NotBuilt {
            scheme: "k8s".into(),
            feature: "k8s",
        }),
        #[cfg(feature = "multicast")]
        "multicast" => Ok(Box::new(
            multicast::Multicast::connect(&parsed, registry).await?,
        )),
        #[cfg(not(feature = "multicast"))]
        "multicast" => Err(BackendError::NotBuilt {
            scheme: "multicast".into(),
            feature: "multicast",
        }),
        scheme => Err(BackendError::UnknownScheme {
            url: url.to_string(),
            scheme: scheme.to_string(),
        }),
    }
}

/// Builds a backend from one or more URLs. With several, publish goes to all
/// and subscribe to all (a multi backend); an envelope that arrives through
/// several is delivered once.
pub async fn connect<S: AsRef<str>>(urls: &[S]) -> Result<SignalingBackend, BackendError> {
    let registry = Registry::new();
    let transport: Box<dyn Transport> = match urls {
        [] => {
            return Err(BackendError::url(
                "",
                "no backend URL given (there is no default backend)",
            ));
        }
        [one] => connect_transport(one.as_ref(), registry.clone()).await?,
        many => {
            let mut transports = Vec::with_capacity(many.len());
            for url in many {
                transports.push(connect_transport(url.as_ref(), registry.clone()).await?);
            }
            Box::new(Multi::new(transports))
        }
    };
    Ok(SignalingBackend::new(transport, registry))
}

/// Rejects query parameters other than `known` in a backend URL.
pub(crate) fn check_params(url: &url::Url, known: &[&str]) -> Result<(), BackendError> {
    for (name, _) in url.query_pairs() {
        if !known.contains(&name.as_ref()) {
            return Err(BackendError::url(
                url,
                format!(
                    "unknown parameter {name:?} (known: {})",
                    if known.is_empty() {
                        "none".to_string()
                    } else {
                        known.join(", ")
                    }
                ),
            ));
        }
    }
    Ok(())
}

/// Parses a boolean URL parameter (`true`/`false`/`1`/`0`).
#[cfg_attr(not(any(feature = "grpc", feature = "multicast")), allow(dead_code))]
pub(crate) fn bool_param(url: &url::Url, name: &str) -> Result<Option<bool>, BackendError> {
    let Some((_, value)) = url.query_pairs().find(|(k, _)| k == name) else {
        return Ok(None);
    };
    match value.as_ref() {
        "true" | "1" | "yes" => Ok(Some(true)),
        "false" | "0" | "no" => Ok(Some(false)),
        other => Err(BackendError::url(
            url,
            format!("parameter {name}={other:?} is not a boolean (true or false)"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn bad_urls_say_why() {
        let err = connect(&["nats://x"]).await.unwrap_err();
        assert!(matches!(err, BackendError::UnknownScheme { ref scheme, .. } if scheme == "nats"));
        let err = connect(&["not a url"]).await.unwrap_err();
        assert!(matches!(err, BackendError::Url { .. }), "{err}");
        let err = connect::<&str>(&[]).await.unwrap_err();
        assert!(err.to_string().contains("no backend URL"), "{err}");
        let err = connect(&["inprocess:?foo=1"]).await.unwrap_err();
        assert!(
            err.to_string().contains("unknown parameter \"foo\""),
            "{err}"
        );
    }

    #[tokio::test]
    async fn close_lets_the_handlers_go() {
        let backend = connect(&["inprocess:"]).await.unwrap();
        let (handler, mut rx) = crate::ChannelHandler::new(4);
        let key = PrivateKey::generate();
        backend.subscribe(&key, Sender::Any, handler).await.unwrap();
        backend.close().await.unwrap();
        // The handler was the channel's last sender: the receiver sees the end.
        let end = tokio::time::timeout(std::time::Duration::from_secs(5), rx.recv()).await;
        assert!(matches!(end, Ok(None)), "{end:?}");
        let (handler, _rx) = crate::ChannelHandler::new(4);
        let again = backend.subscribe(&key, Sender::Any, handler).await;
        assert!(matches!(again, Err(BackendError::Closed)), "{again:?}");
    }

    /// An in-process medium whose listen fails once it has joined the exchange.
    struct FailingListen(InProcess);

    #[async_trait]
    impl Transport for FailingListen {
        async fn send(&self, envelope: &Envelope) -> Result<Published, BackendError> {
            self.0.send(envelope).await
        }
        async fn listen(&self, key: Key) -> Result<(), BackendError> {
            self.0.listen(key).await?;
            Err(BackendError::transport(self.name(), "listen refused"))
        }
        async fn unlisten(&self, key: Key) -> Result<(), BackendError> {
            self.0.unlisten(key).await
        }
        fn backend_type(&self) -> BackendType {
            self.0.backend_type()
        }
        async fn close(&self) -> Result<(), BackendError> {
            self.0.close().await
        }
        fn name(&self) -> &str {
            "failing:"
        }
    }

    #[tokio::test]
    async fn a_failed_listen_takes_the_handler_and_the_medium_back() {
        let registry = Registry::new();
        let url = url::Url::parse("inprocess:").unwrap();
        let medium = FailingListen(InProcess::new(&url, registry.clone()).unwrap());
        let backend = SignalingBackend::new(Box::new(medium), registry.clone());
        let (key, sender) = (PrivateKey::generate(), PrivateKey::generate());
        let (handler, mut rx) = crate::ChannelHandler::new(4);
        let err = backend
            .subscribe(&key, Sender::Any, handler)
            .await
            .unwrap_err();
        assert!(err.to_string().contains("listen refused"), "{err}");
        assert!(!registry.has_key(&key.public_key()));
        // The handler was the channel's last sender: it is gone.
        assert!(matches!(
            rx.try_recv(),
            Err(tokio::sync::mpsc::error::TryRecvError::Disconnected)
        ));
        // The medium left the exchange: an envelope to the key reaches nobody
        // (in-process delivery happens before publish returns).
        let publisher = connect(&["inprocess:"]).await.unwrap();
        let published = publisher
            .publish(
                &KeyPair::new(sender.clone(), key.public_key()),
                &Message::default(),
            )
            .await
            .unwrap();
        assert_eq!(published.recipients, Some(0));
        assert_eq!(registry.stats(), crate::registry::RegistryStats::default());
    }
}
