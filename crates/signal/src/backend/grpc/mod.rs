//! `grpc://HOST:PORT`: a signaling server reached over gRPC (docs/PROTOCOL.md §6, §7).
//!
//! One `Subscribe` stream per own key that has handlers, opened by `listen`,
//! which returns once the server's empty sync envelope arrived (or with the
//! error of the first attempt, while retrying goes on). A stream that breaks,
//! or never opened, is opened again with exponential backoff and jitter, without end,
//! until the key is unlistened or the backend closed. TLS is on by default and
//! trusts the system's roots; `ca=FILE` trusts the PEM certificates in FILE
//! instead, `skip_verify=true` checks nothing, `insecure=true` speaks plain HTTP/2.
//!
//! Here the transport ([`Grpc`]: publish, listen, unlisten); beside it, one
//! concern each: `target` (the URL and [`GrpcOptions`]), `channel` (HTTP/2,
//! plain or rustls), `auth` (proofs of key possession, [`ServerAuth`]),
//! `stream` (one key's Subscribe stream and its reopening), `metadata` (what
//! calls carry besides the message), `error` ([`GrpcError`]).

use std::{
    collections::HashMap,
    fmt,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
    time::Duration,
};

use async_trait::async_trait;
use parking_lot::Mutex;
use tokio::sync::oneshot;
use tonic::{Request, transport::Channel};

use super::{BackendError, Published, Transport, bool_param, check_params};
use tokio_util::task::AbortOnDropHandle;

use crate::{
    Key, PrivateKey, Registry,
    proto::{
        method::PUBLISH,
        signaling::{BackendType, Envelope, signaling_client::SignalingClient},
    },
    task,
};

mod auth;
mod channel;
mod error;
mod metadata;
mod stream;
mod target;

use self::{channel::*, metadata::*, stream::*};
pub use auth::ServerAuth;
pub use channel::channel_for;
pub use error::GrpcError;
pub use metadata::{PUSHBACK_METADATA, RECIPIENTS_ASK, RECIPIENTS_METADATA, pushback};
pub use target::{GrpcOptions, GrpcTarget, Security};

/// A subscription's stream task, aborted when dropped.
type Subscription = AbortOnDropHandle<()>;

/// A refused publish is tried again at most this many times, each after the
/// server's pushback, within the publish's deadline.
pub const MAX_RATE_RETRIES: u32 = 3;

/// What the gRPC medium counted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct GrpcStats {
    /// Publishes tried again after the server refused them for a rate and
    /// said when to come back (`grpc-retry-pushback-ms`).
    pub rate_limited_retries: u64,
    /// The time those retries waited, in all.
    pub rate_limited_wait: Duration,
}

/// The gRPC transport.
pub struct Grpc {
    name: Arc<str>,
    client: SignalingClient<Channel>,
    auth: ServerAuth,
    registry: Arc<Registry>,
    options: GrpcOptions,
    streams: Mutex<HashMap<Key, Subscription>>,
    rate_limited_retries: AtomicU64,
    /// Microseconds.
    rate_limited_wait: AtomicU64,
}

impl fmt::Debug for Grpc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Grpc")
            .field("url", &self.name)
            .finish_non_exhaustive()
    }
}

impl Grpc {
    /// A transport to the server of `url` with default options. Nothing is
    /// contacted until the first publish or subscribe.
    pub fn connect(url: &url::Url, registry: Arc<Registry>) -> Result<Self, BackendError> {
        Self::with_options(url, registry, GrpcOptions::default())
    }

    /// A transport to the server of `url`.
    pub fn with_options(
        url: &url::Url,
        registry: Arc<Registry>,
        options: GrpcOptions,
    ) -> Result<Self, BackendError> {
        let target = GrpcTarget::parse(url)?;
        let channel = channel(url, &target, &options)?;
        Ok(Grpc {
            name: Arc::from(url.as_str()),
            client: SignalingClient::new(channel).max_decoding_message_size(16 << 20),
            auth: ServerAuth::new(target.server_key, options.subscribe_timeout),
            registry,
            options,
            streams: Mutex::new(HashMap::new()),
            rate_limited_retries: AtomicU64::new(0),
            rate_limited_wait: AtomicU64::new(0),
        })
    }

    /// What this medium counted so far.
    pub fn stats(&self) -> GrpcStats {
        GrpcStats {
            rate_limited_retries: self.rate_limited_retries.load(Relaxed),
            rate_limited_wait: Duration::from_micros(self.rate_limited_wait.load(Relaxed)),
        }
    }

    /// Publishes, with a proof that we hold `ours` (the sender's private key)
    /// if given and the server has a key, and asks how many subscription
    /// streams the envelope reached. A refusal for a rate that says when to
    /// come back is tried again then, at most [`MAX_RATE_RETRIES`] times
    /// within the publish's deadline.
    async fn publish(
        &self,
        envelope: &Envelope,
        ours: Option<&PrivateKey>,
    ) -> Result<Published, BackendError> {
        let timeout = self.options.publish_timeout;
        let deadline = tokio::time::Instant::now() + timeout;
        let (mut retries, mut waited) = (0, Duration::ZERO);
        loop {
            let mut request = Request::new(envelope.clone());
            request.set_timeout(deadline.saturating_duration_since(tokio::time::Instant::now()));
            request.metadata_mut().insert(
                RECIPIENTS_METADATA,
                tonic::metadata::MetadataValue::from_static(RECIPIENTS_ASK),
            );
            if let Some(ours) = ours {
                // A fresh proof each time: the server takes each nonce once.
                self.auth
                    .prove(&self.name, &self.client, &mut request, ours, PUBLISH)
                    .await?;
            }
            let mut client = self.client.clone();
            let status = match tokio::time::timeout_at(deadline, client.publish(request)).await {
                Ok(Ok(response)) => return Ok(recipients(response.metadata())),
                Ok(Err(status)) => status,
                Err(_) => {
                    return Err(BackendError::transport(
                        &self.name,
                        GrpcError::Timeout {
                            what: "publish",
                            timeout,
                        },
                    ));
                }
            };
            let Some(wait) = pushback(&status) else {
                self.auth.refused(&status);
                return Err(BackendError::transport(
                    &self.name,
                    GrpcError::Status {
                        what: "publish",
                        status,
                    },
                ));
            };
            let fits = tokio::time::Instant::now() + wait < deadline;
            if retries == MAX_RATE_RETRIES || !fits {
                return Err(BackendError::transport(
                    &self.name,
                    GrpcError::RateLimited {
                        retries,
                        waited,
                        status,
                    },
                ));
            }
            tracing::debug!(backend = %self.name, ?wait, "publish refused for a rate: trying again after the server's pushback");
            retries += 1;
            waited += wait;
            self.rate_limited_retries.fetch_add(1, Relaxed);
            self.rate_limited_wait
                .fetch_add(u64::try_from(wait.as_micros()).unwrap_or(u64::MAX), Relaxed);
            tokio::time::sleep(wait).await;
        }
    }
}

/// Removes a key's stream when `listen` is dropped before it finished.
struct CancelGuard<'a> {
    grpc: &'a Grpc,
    key: Option<Key>,
}

impl Drop for CancelGuard<'_> {
    fn drop(&mut self) {
        if let Some(key) = self.key.take() {
            // Dropping the subscription aborts its task.
            self.grpc.streams.lock().remove(&key);
        }
    }
}

#[async_trait]
impl Transport for Grpc {
    async fn send(&self, envelope: &Envelope) -> Result<Published, BackendError> {
        self.publish(envelope, None).await
    }

    async fn send_as(
        &self,
        envelope: &Envelope,
        ours: &PrivateKey,
    ) -> Result<Published, BackendError> {
        self.publish(envelope, Some(ours)).await
    }

    async fn listen(&self, key: Key) -> Result<(), BackendError> {
        if self.streams.lock().contains_key(&key) {
            return Ok(());
        }
        let (tx, rx) = oneshot::channel();
        let task = tokio::spawn(run_subscription(
            self.name.clone(),
            self.client.clone(),
            self.auth.clone(),
            self.registry.clone(),
            key,
            self.options.clone(),
            tx,
        ));
        // Kept also when the first attempt fails: it retries until unlisten.
        self.streams
            .lock()
            .insert(key, AbortOnDropHandle::new(task));
        // If the caller gives up waiting (drops this future), nobody asked for
        // the stream any more: take it away again.
        let mut cancelled = CancelGuard {
            grpc: self,
            key: Some(key),
        };
        let result = rx.await;
        cancelled.key = None;
        match result {
            Ok(Ok(())) => {
                tracing::debug!(backend = %self.name, %key, "subscribed");
                Ok(())
            }
            Ok(Err(e)) => Err(BackendError::transport(&self.name, e)),
            Err(_) => Err(BackendError::transport(
                &self.name,
                "subscription task ended unexpectedly",
            )),
        }
    }

    async fn unlisten(&self, key: Key) -> Result<(), BackendError> {
        let subscription = self.streams.lock().remove(&key);
        if let Some(subscription) = subscription {
            task::stop(subscription).await;
        }
        Ok(())
    }

    fn backend_type(&self) -> BackendType {
        BackendType::Grpc
    }

    async fn close(&self) -> Result<(), BackendError> {
        let subscriptions: Vec<Subscription> =
            self.streams.lock().drain().map(|(_, s)| s).collect();
        for subscription in subscriptions {
            task::stop(subscription).await;
        }
        Ok(())
    }

    fn name(&self) -> &str {
        &self.name
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Status;

    fn parse(s: &str) -> Result<GrpcTarget, BackendError> {
        let url = url::Url::parse(s).map_err(|e| BackendError::url(s, e))?;
        GrpcTarget::parse(&url)
    }

    #[test]
    fn transient_or_not() {
        let status = |code| GrpcError::Status {
            what: "publish",
            status: Status::new(code, "x"),
        };
        for code in [
            tonic::Code::Unavailable,
            tonic::Code::DeadlineExceeded,
            tonic::Code::ResourceExhausted,
        ] {
            assert!(status(code).is_transient(), "{code:?}");
            let e = BackendError::transport("grpc://h:1", status(code));
            assert!(e.is_transient(), "{e}");
            assert_eq!(
                e.medium::<GrpcError>().and_then(GrpcError::code),
                Some(code)
            );
        }
        for code in [
            tonic::Code::Unauthenticated,
            tonic::Code::PermissionDenied,
            tonic::Code::InvalidArgument,
            tonic::Code::Unimplemented,
        ] {
            assert!(!status(code).is_transient(), "{code:?}");
            assert!(!BackendError::transport("grpc://h:1", status(code)).is_transient());
        }
        let other = GrpcError::OtherServerKey {
            pinned: Key::from([0; 32]),
            presented: None,
        };
        assert!(!other.is_transient());
        let timeout = GrpcError::Timeout {
            what: "subscribe",
            timeout: Duration::from_secs(1),
        };
        assert!(timeout.is_transient());
        // A multi backend: transient if any part is.
        let all = BackendError::AllFailed(vec![
            BackendError::transport("grpc://a:1", other),
            BackendError::transport("grpc://b:1", timeout),
        ]);
        assert!(all.is_transient());
        assert!(!BackendError::Closed.is_transient());
        assert!(BackendError::Closed.medium::<GrpcError>().is_none());
    }

    #[test]
    fn pushback_is_read_from_resource_exhausted_only() {
        let mut metadata = tonic::metadata::MetadataMap::new();
        metadata.insert(PUSHBACK_METADATA, "250".parse().unwrap());
        let refused = Status::with_metadata(
            tonic::Code::ResourceExhausted,
            "slow down",
            metadata.clone(),
        );
        assert_eq!(pushback(&refused), Some(Duration::from_millis(250)));
        let error = GrpcError::Status {
            what: "subscribe",
            status: refused,
        };
        assert_eq!(error.pushback(), Some(Duration::from_millis(250)));
        let other = Status::with_metadata(tonic::Code::Unavailable, "x", metadata);
        assert_eq!(pushback(&other), None);
        let mut huge = tonic::metadata::MetadataMap::new();
        huge.insert(PUSHBACK_METADATA, "99999999".parse().unwrap());
        let huge = Status::with_metadata(tonic::Code::ResourceExhausted, "x", huge);
        assert_eq!(
            pushback(&huge),
            Some(Duration::from_secs(60)),
            "a minute at most"
        );
        assert_eq!(pushback(&Status::resource_exhausted("no hint")), None);
    }

    #[test]
    fn urls() {
        assert_eq!(
            parse("grpc://example.com:443").unwrap(),
            GrpcTarget {
                host: "example.com".into(),
                port: 443,
                security: Security::SystemRoots,
                server_key: None,
            }
        );
        assert_eq!(
            parse("grpc://127.0.0.1:8080?insecure=true")
                .unwrap()
                .security,
            Security::Plaintext
        );
        assert_eq!(
            parse("grpc://[::1]:8080?skip_verify=true").unwrap().host,
            "::1"
        );
        assert_eq!(
            parse("grpc://h:1?ca=/etc/ca.pem").unwrap().security,
            Security::CaFile("/etc/ca.pem".into())
        );
        for bad in [
            "grpc://h",
            "grpc://:80",
            "grpc://h:1?insecure=maybe",
            "grpc://h:1?insecure=true&ca=x",
            "grpc://h:1?skip_verify=true&ca=x",
            "grpc://h:1?tls=1",
            "grpc://h:1/path",
        ] {
            assert!(parse(bad).is_err(), "{bad} was accepted");
        }
    }
}
