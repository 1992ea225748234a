//! `grpc://HOST:PORT`: a signaling server reached over gRPC (docs/PROTOCOL.md §6, §7).
//!
//! One `Subscribe` stream per own key that has handlers, opened by `listen`,
//! which returns once the server's empty sync envelope arrived (or with the
//! error of the first attempt, while retrying goes on). A stream that breaks,
//! or never opened, is opened again with exponential backoff and jitter, without end,
//! until the key is unlistened or the backend closed. TLS is on by default and
//! trusts the system's roots; `ca=FILE` trusts the PEM certificates in FILE
//! instead, `skip_verify=true` checks nothing, `insecure=true` speaks plain HTTP/2.

use std::{
    collections::HashMap,
    fmt,
    path::PathBuf,
    sync::{
        Arc, LazyLock,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
    time::Duration,
};

use async_trait::async_trait;
use backon::{BackoffBuilder, ExponentialBuilder};
use hyper_util::rt::TokioIo;
use parking_lot::Mutex;
use rustls::{
    ClientConfig, RootCertStore,
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    pki_types::{CertificateDer, ServerName, UnixTime, pem::PemObject},
};
use tokio::{net::TcpStream, sync::oneshot};
use tonic::{
    Request, Status, Streaming,
    transport::{Channel, Endpoint, Uri},
};

use super::{BackendError, Published, Transport, bool_param, check_params};
use tokio_util::task::AbortOnDropHandle;

use crate::{
    Key, PrivateKey, Registry, StreamEvent,
    auth::{PROOF_METADATA, SERVER_KEY_METADATA},
    proto::{
        method::{PUBLISH, SUBSCRIBE},
        signaling::{BackendType, Envelope, SubscribeParams, signaling_client::SignalingClient},
    },
    task,
};

/// Settings of the gRPC backend that URLs do not carry.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct GrpcOptions {
    /// Deadline of one `Publish`.
    pub publish_timeout: Duration,
    /// How long `listen` waits for the server's sync envelope.
    pub subscribe_timeout: Duration,
    /// Deadline of establishing the TCP (and TLS) connection.
    pub connect_timeout: Duration,
    /// Interval of HTTP/2 keepalive pings. cunīcu's server closes connections
    /// that ping more often than every 5 minutes.
    pub keepalive_interval: Duration,
    /// How long to wait for a ping's answer before the connection counts as dead.
    pub keepalive_timeout: Duration,
    /// First delay before a broken stream is opened again.
    pub backoff_min: Duration,
    /// Longest delay between attempts.
    pub backoff_max: Duration,
}

impl Default for GrpcOptions {
    fn default() -> Self {
        GrpcOptions {
            publish_timeout: Duration::from_secs(10),
            subscribe_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(5),
            keepalive_interval: Duration::from_secs(330),
            keepalive_timeout: Duration::from_secs(20),
            backoff_min: Duration::from_millis(100),
            backoff_max: Duration::from_secs(30),
        }
    }
}

/// Where and how to reach the server, parsed from a `grpc://` URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GrpcTarget {
    /// Host name or address.
    pub host: String,
    /// TCP port.
    pub port: u16,
    /// Security of the connection.
    pub security: Security,
    /// The server's key, pinned by `server_key=` (docs/PROTOCOL.md §11): a server that
    /// presents another is refused.
    pub server_key: Option<Key>,
}

/// How the connection to the server is secured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Security {
    /// Plain HTTP/2 (`insecure=true`).
    Plaintext,
    /// TLS, trusting the system's root certificates.
    SystemRoots,
    /// TLS, trusting only the PEM certificates in this file (`ca=FILE`).
    CaFile(PathBuf),
    /// TLS without any certificate check (`skip_verify=true`).
    SkipVerify,
}

impl GrpcTarget {
    /// Parses `grpc://HOST:PORT[?insecure=true][&skip_verify=true][&ca=FILE][&server_key=KEY]`.
    pub fn parse(url: &url::Url) -> Result<Self, BackendError> {
        check_params(url, &["insecure", "skip_verify", "ca", "server_key"])?;
        let host = match url.host() {
            Some(url::Host::Ipv6(ip)) => ip.to_string(),
            Some(host) => host.to_string(),
            None => {
                return Err(BackendError::url(
                    url,
                    "no host (expected grpc://HOST:PORT)",
                ));
            }
        };
        let port = url
            .port()
            .ok_or_else(|| BackendError::url(url, "no port (expected grpc://HOST:PORT)"))?;
        if !matches!(url.path(), "" | "/") {
            return Err(BackendError::url(url, "a grpc URL has no path"));
        }
        let insecure = bool_param(url, "insecure")?.unwrap_or(false);
        let skip_verify = bool_param(url, "skip_verify")?.unwrap_or(false);
        let ca = url
            .query_pairs()
            .find(|(k, _)| k == "ca")
            .map(|(_, v)| PathBuf::from(v.as_ref()));
        let security = match (insecure, skip_verify, ca) {
            (true, false, None) => Security::Plaintext,
            (true, _, _) => {
                return Err(BackendError::url(
                    url,
                    "insecure=true (no TLS) cannot be combined with skip_verify or ca",
                ));
            }
            (false, true, None) => Security::SkipVerify,
            (false, true, Some(_)) => {
                return Err(BackendError::url(
                    url,
                    "skip_verify=true and ca=FILE contradict each other",
                ));
            }
            (false, false, Some(ca)) => Security::CaFile(ca),
            (false, false, None) => Security::SystemRoots,
        };
        let server_key = url
            .query_pairs()
            .find(|(k, _)| k == "server_key")
            .map(|(_, v)| {
                // Form decoding reads a `+` as a space: a base64 key has no spaces.
                let text = v.replace(' ', "+");
                text.parse::<Key>().map_err(|e| {
                    BackendError::url(
                        url,
                        format!("server_key={text:?}: {e} (percent-encode + / =)"),
                    )
                })
            })
            .transpose()?;
        Ok(GrpcTarget {
            host,
            port,
            security,
            server_key,
        })
    }
}

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

/// The recipient count in a Publish's response metadata, if the server gave one.
fn recipients(metadata: &tonic::metadata::MetadataMap) -> Published {
    metadata
        .get(RECIPIENTS_METADATA)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u32>().ok())
        .map_or(Published::unknown(), Published::to)
}

/// How long a refused call must wait, if the server said so: a
/// RESOURCE_EXHAUSTED status with `grpc-retry-pushback-ms` (at most a minute
/// is believed).
pub fn pushback(status: &Status) -> Option<Duration> {
    if status.code() != tonic::Code::ResourceExhausted {
        return None;
    }
    let ms: u64 = status
        .metadata()
        .get(PUSHBACK_METADATA)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()?;
    Some(Duration::from_millis(ms.clamp(1, 60_000)))
}

/// The metadata of a Publish that asks how many subscription streams got its
/// envelope (value [`RECIPIENTS_ASK`]), and of the answer (the count, in the
/// response headers).
pub const RECIPIENTS_METADATA: &str = "cunicu-recipients";
/// The value of [`RECIPIENTS_METADATA`] that asks.
pub const RECIPIENTS_ASK: &str = "ask";
/// The metadata of a refusal by a rate: milliseconds until the server has
/// room again (gRPC's name for it).
pub const PUSHBACK_METADATA: &str = "grpc-retry-pushback-ms";

/// Proofs of key possession for one server (docs/PROTOCOL.md §11). The server's key is
/// pinned (`server_key=` in the URL) or learned from `GetBuildInfo`'s
/// `cunicu-server-key` metadata the first time a proof is needed; a server
/// that presents no key asks for no proofs. Cheap to clone.
#[derive(Debug, Clone)]
pub struct ServerAuth {
    pinned: Option<Key>,
    /// `Some(None)`: the server has no key.
    learned: Arc<Mutex<Option<Option<Key>>>>,
    /// Held while one call learns the key: the others wait for it instead
    /// of each asking (a backend subscribing many keys at once would
    /// otherwise send as many GetBuildInfo calls, which a server limits).
    learning: Arc<tokio::sync::Mutex<()>>,
    timeout: Duration,
}

impl ServerAuth {
    /// Proofs to the server of `pinned` if given, else to whatever key the
    /// server presents; `timeout` bounds learning it.
    pub fn new(pinned: Option<Key>, timeout: Duration) -> Self {
        ServerAuth {
            pinned,
            learned: Arc::new(Mutex::new(None)),
            learning: Arc::new(tokio::sync::Mutex::new(())),
            timeout,
        }
    }

    /// For the server of a `grpc://` URL (its `server_key=`, if any).
    pub fn for_url(url: &url::Url, options: &GrpcOptions) -> Result<Self, BackendError> {
        Ok(Self::new(
            GrpcTarget::parse(url)?.server_key,
            options.subscribe_timeout,
        ))
    }

    /// The server's key: learned once through `GetBuildInfo` on `client`'s
    /// channel, and checked against the pinned one.
    async fn server_key(
        &self,
        client: &SignalingClient<Channel>,
    ) -> Result<Option<Key>, GrpcError> {
        if let Some(known) = *self.learned.lock() {
            return Ok(known);
        }
        let _learning = self.learning.lock().await;
        // Learned by the call that held the lock before.
        if let Some(known) = *self.learned.lock() {
            return Ok(known);
        }
        let mut client = client.clone();
        let response =
            tokio::time::timeout(self.timeout, client.get_build_info(crate::proto::Empty {}))
                .await
                .map_err(|_| GrpcError::Timeout {
                    what: "learning the server's key",
                    timeout: self.timeout,
                })?
                .map_err(|status| GrpcError::Status {
                    // A connection that failed was not about the key.
                    what: match connection_problem(&status) {
                        Some(_) => "connecting",
                        None => "learning the server's key",
                    },
                    status,
                })?;
        let presented = match response.metadata().get(SERVER_KEY_METADATA) {
            None => None,
            Some(value) => Some(
                value
                    .to_str()
                    .ok()
                    .and_then(|v| v.parse::<Key>().ok())
                    .ok_or_else(|| GrpcError::BadServerKey(format!("{value:?}")))?,
            ),
        };
        if let Some(pinned) = self.pinned
            && presented != Some(pinned)
        {
            return Err(GrpcError::OtherServerKey { pinned, presented });
        }
        *self.learned.lock() = Some(presented);
        Ok(presented)
    }

    /// Adds to `request` a proof that we hold `ours` (a private key) for
    /// `method`, if the server has a key. `url` names the server in errors.
    pub async fn prove<T>(
        &self,
        url: &str,
        client: &SignalingClient<Channel>,
        request: &mut Request<T>,
        ours: &PrivateKey,
        method: &str,
    ) -> Result<(), BackendError> {
        self.add_proof(client, request, ours, method)
            .await
            .map_err(|e| BackendError::transport(url, e))
    }

    async fn add_proof<T>(
        &self,
        client: &SignalingClient<Channel>,
        request: &mut Request<T>,
        ours: &PrivateKey,
        method: &str,
    ) -> Result<(), GrpcError> {
        let Some(server) = self.server_key(client).await? else {
            return Ok(());
        };
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let proof = crate::auth::prove(ours, &server, method, now).map_err(GrpcError::Proof)?;
        request.metadata_mut().insert_bin(
            PROOF_METADATA,
            tonic::metadata::MetadataValue::from_bytes(&proof),
        );
        Ok(())
    }

    /// After a refused proof: learn the key again next time (unless pinned),
    /// in case the server's changed.
    fn refused(&self, status: &Status) {
        if status.code() == tonic::Code::Unauthenticated && self.pinned.is_none() {
            *self.learned.lock() = None;
        }
    }
}

/// A lazy gRPC channel to the server of a `grpc://` URL, secured as the
/// backend would be (TLS, `ca`, `skip_verify`, `insecure`): for the server's
/// other services, such as `RelayRegistry`.
pub fn channel_for(url: &url::Url, options: &GrpcOptions) -> Result<Channel, BackendError> {
    let target = GrpcTarget::parse(url)?;
    channel(url, &target, options)
}

fn channel(
    url: &url::Url,
    target: &GrpcTarget,
    options: &GrpcOptions,
) -> Result<Channel, BackendError> {
    let authority = if target.host.contains(':') {
        format!("[{}]:{}", target.host, target.port)
    } else {
        format!("{}:{}", target.host, target.port)
    };
    // TLS is ours (the connector below), so tonic sees http; the origin keeps
    // the request's :scheme right.
    let scheme = if target.security == Security::Plaintext {
        "http"
    } else {
        "https"
    };
    let origin: Uri = format!("{scheme}://{authority}")
        .parse()
        .map_err(|e| BackendError::url(url, e))?;
    let endpoint = Endpoint::from_shared(format!("http://{authority}"))
        .map_err(|e| BackendError::url(url, e))?
        .origin(origin)
        .connect_timeout(options.connect_timeout)
        .http2_keep_alive_interval(options.keepalive_interval)
        .keep_alive_timeout(options.keepalive_timeout)
        // cunīcu's (grpc-go) server counts pings without an open stream as abuse.
        .keep_alive_while_idle(false)
        .tcp_nodelay(true);
    let tls = match &target.security {
        Security::Plaintext => return Ok(endpoint.connect_lazy()),
        Security::SystemRoots => {
            let mut roots = RootCertStore::empty();
            let found = rustls_native_certs::load_native_certs();
            for cert in found.certs {
                // A broken system certificate is skipped, as browsers do.
                let _ = roots.add(cert);
            }
            if roots.is_empty() {
                return Err(BackendError::url(
                    url,
                    "no system root certificates found: give ca=FILE or install them",
                ));
            }
            client_config(roots)
        }
        Security::CaFile(path) => {
            let ca_error = |e: &dyn fmt::Display| {
                BackendError::url(url, format!("ca file {}: {e}", path.display()))
            };
            let mut roots = RootCertStore::empty();
            let certs = CertificateDer::pem_file_iter(path).map_err(|e| ca_error(&e))?;
            for cert in certs {
                roots
                    .add(cert.map_err(|e| ca_error(&e))?)
                    .map_err(|e| ca_error(&e))?;
            }
            if roots.is_empty() {
                return Err(BackendError::url(
                    url,
                    format!("ca file {} holds no certificate", path.display()),
                ));
            }
            client_config(roots)
        }
        Security::SkipVerify => with_h2(
            config_builder()
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(NoVerification))
                .with_no_client_auth(),
        ),
    };
    let server_name = ServerName::try_from(target.host.clone())
        .map_err(|e| BackendError::url(url, format!("host {:?}: {e}", target.host)))?;
    let connector = tokio_rustls::TlsConnector::from(Arc::new(tls));
    let address = authority.clone();
    let service = tower::service_fn(move |_: Uri| {
        let (connector, server_name, address) =
            (connector.clone(), server_name.clone(), address.clone());
        async move {
            let tcp = TcpStream::connect(&address).await?;
            tcp.set_nodelay(true)?;
            let tls = connector.connect(server_name, tcp).await?;
            Ok::<_, std::io::Error>(TokioIo::new(tls))
        }
    });
    Ok(endpoint.connect_with_connector_lazy(service))
}

/// The ring provider, made once (it is asked on every handshake too).
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    static PROVIDER: LazyLock<Arc<rustls::crypto::CryptoProvider>> =
        LazyLock::new(|| Arc::new(rustls::crypto::ring::default_provider()));
    PROVIDER.clone()
}

/// A client configuration with our provider and the safe default versions.
fn config_builder() -> rustls::ConfigBuilder<ClientConfig, rustls::WantsVerifier> {
    ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        // The ring provider supports them: never reached.
        .unwrap_or_else(|_| ClientConfig::builder())
}

/// `config` speaking HTTP/2 (ALPN `h2`), as gRPC needs.
fn with_h2(mut config: ClientConfig) -> ClientConfig {
    config.alpn_protocols = vec![b"h2".to_vec()];
    config
}

fn client_config(roots: RootCertStore) -> ClientConfig {
    with_h2(
        config_builder()
            .with_root_certificates(roots)
            .with_no_client_auth(),
    )
}

/// Accepts every certificate: `skip_verify=true`.
#[derive(Debug)]
struct NoVerification;

impl ServerCertVerifier for NoVerification {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }

    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// A gRPC status as one short line.
fn status_text(status: &Status) -> String {
    if let Some(problem) = connection_problem(status) {
        return problem.to_string();
    }
    let mut text = format!("{:?}", status.code());
    if !status.message().is_empty() {
        text.push_str(": ");
        text.push_str(status.message());
    }
    // Transport errors carry their cause as the source.
    if let Some(source) = std::error::Error::source(status) {
        text.push_str(&format!(" ({source})"));
    }
    text
}

/// What to tell a user whose connection failed in a way they can act on:
/// nothing listens there, or a TLS client met a plaintext server.
fn connection_problem(status: &Status) -> Option<&'static str> {
    let mut source = std::error::Error::source(status);
    while let Some(error) = source {
        let tls = |e: &(dyn std::error::Error + 'static)| {
            matches!(
                e.downcast_ref::<rustls::Error>(),
                Some(rustls::Error::InvalidMessage(
                    rustls::InvalidMessage::InvalidContentType
                ))
            )
        };
        if tls(error) {
            return Some("the server speaks plaintext: add ?insecure=true to the URL");
        }
        if let Some(io) = error.downcast_ref::<std::io::Error>() {
            if io.kind() == std::io::ErrorKind::ConnectionRefused {
                return Some("connection refused: is the server running, on this host and port?");
            }
            if io.get_ref().is_some_and(|inner| tls(inner)) {
                return Some("the server speaks plaintext: add ?insecure=true to the URL");
            }
        }
        source = error.source();
    }
    None
}

/// Why the gRPC medium failed: the source of a
/// [`BackendError::Transport`] from this backend (get it with
/// [`BackendError::medium`]).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum GrpcError {
    /// The server, or the connection to it, answered a call with a status.
    #[error("{what}: {}", status_text(.status))]
    Status {
        /// The call: `publish`, `subscribe`, `server key`.
        what: &'static str,
        /// The gRPC status (connection failures are `Unavailable`).
        status: Status,
    },
    /// A call got no answer in time.
    #[error("{what}: no answer within {timeout:?}")]
    Timeout {
        /// The call.
        what: &'static str,
        /// How long it waited.
        timeout: Duration,
    },
    /// The server refused a publish for a rate, also after waiting as long
    /// as it asked, as often as the backend tries.
    #[error("{}: rate limited by the server (tried again {retries} times after waiting {waited:?} in all)", status_text(.status))]
    RateLimited {
        /// Times it was tried again.
        retries: u32,
        /// How long those tries waited in all.
        waited: Duration,
        /// The last refusal.
        status: Status,
    },
    /// A Subscribe stream ended before the server confirmed it.
    #[error("subscribe: the server ended the stream before confirming the subscription")]
    NoSync,
    /// No proof of key possession could be made for this key (docs/PROTOCOL.md §11).
    #[error("proof of key possession: {0}")]
    Proof(#[source] crate::EnvelopeError),
    /// The server's `cunicu-server-key` is not a key.
    #[error("the server's key in {SERVER_KEY_METADATA} is not a key: {0}")]
    BadServerKey(String),
    /// The server is not the one pinned with `server_key=`.
    #[error("the server presents key {}, not the pinned server_key {pinned}", .presented.map(|k| k.to_string()).unwrap_or_else(|| "none".into()))]
    OtherServerKey {
        /// The key of the URL.
        pinned: Key,
        /// What the server presented, if anything.
        presented: Option<Key>,
    },
}

impl GrpcError {
    /// How long the server asked to wait before trying again, if it
    /// refused for a rate (`grpc-retry-pushback-ms`).
    pub fn pushback(&self) -> Option<Duration> {
        match self {
            GrpcError::Status { status, .. } | GrpcError::RateLimited { status, .. } => {
                pushback(status)
            }
            _ => None,
        }
    }

    /// The gRPC status code, for [`GrpcError::Status`].
    pub fn code(&self) -> Option<tonic::Code> {
        match self {
            GrpcError::Status { status, .. } | GrpcError::RateLimited { status, .. } => {
                Some(status.code())
            }
            _ => None,
        }
    }

    /// True if trying again later may succeed: the server is unreachable,
    /// overloaded, slow or restarting. False for what a retry does not cure:
    /// a refused key or proof, an invalid request, another server than the
    /// pinned one.
    pub fn is_transient(&self) -> bool {
        use tonic::Code;
        match self {
            GrpcError::Status { status, .. } => matches!(
                status.code(),
                Code::Unavailable
                    | Code::DeadlineExceeded
                    | Code::ResourceExhausted
                    | Code::Aborted
                    | Code::Cancelled
                    | Code::Unknown
                    | Code::Internal
            ),
            GrpcError::Timeout { .. } | GrpcError::NoSync | GrpcError::RateLimited { .. } => true,
            GrpcError::Proof(_) | GrpcError::BadServerKey(_) | GrpcError::OtherServerKey { .. } => {
                false
            }
        }
    }
}

/// Opens a Subscribe stream and waits for the sync envelope. Returns the
/// stream and a first real envelope, if a server sent one instead of a sync.
async fn open_stream(
    mut client: SignalingClient<Channel>,
    auth: &ServerAuth,
    key: Key,
    private: Option<PrivateKey>,
    timeout: Duration,
) -> Result<(Streaming<Envelope>, Option<Envelope>), GrpcError> {
    let attempt = async {
        let mut request = Request::new(SubscribeParams {
            key: key.as_bytes().to_vec(),
        });
        if let Some(private) = private {
            auth.add_proof(&client, &mut request, &private, SUBSCRIBE)
                .await?;
        }
        let mut stream = client
            .subscribe(request)
            .await
            .map_err(|status| {
                auth.refused(&status);
                GrpcError::Status {
                    what: "subscribe",
                    status,
                }
            })?
            .into_inner();
        match stream.message().await {
            Ok(Some(first)) if first == Envelope::default() => Ok((stream, None)),
            Ok(Some(first)) => Ok((stream, Some(first))),
            Ok(None) => Err(GrpcError::NoSync),
            Err(status) => Err(GrpcError::Status {
                what: "subscribe",
                status,
            }),
        }
    };
    tokio::time::timeout(timeout, attempt)
        .await
        .unwrap_or(Err(GrpcError::Timeout {
            what: "subscribe",
            timeout,
        }))
}

/// A stream open this long counts as healthy: the reconnect backoff restarts.
const STABLE_STREAM: Duration = Duration::from_secs(10);

/// Keeps one key's subscription stream open until aborted.
async fn run_subscription(
    name: Arc<str>,
    client: SignalingClient<Channel>,
    auth: ServerAuth,
    registry: Arc<Registry>,
    key: Key,
    options: GrpcOptions,
    ready: oneshot::Sender<Result<(), GrpcError>>,
) {
    let backoff = || {
        ExponentialBuilder::default()
            .with_min_delay(options.backoff_min)
            .with_max_delay(options.backoff_max)
            .with_factor(2.0)
            .with_jitter()
            .without_max_times()
            .build()
    };
    let mut delays = backoff();
    let mut ready = Some(ready);
    // What was last reported since the stream was last open: (refused, reason).
    let mut reported: Option<(bool, String)> = None;
    // How long the server's last refusal asked us to wait, if it did.
    let mut pushed_back: Option<Duration> = None;
    loop {
        // Our private key proves the subscription (docs/PROTOCOL.md §11); the handler that
        // asked for it is in the registry before the medium listens.
        let private = registry.private_key(&key);
        match open_stream(
            client.clone(),
            &auth,
            key,
            private,
            options.subscribe_timeout,
        )
        .await
        {
            Ok((mut stream, first)) => {
                match ready.take() {
                    Some(tx) => {
                        let _ = tx.send(Ok(()));
                    }
                    None => {
                        tracing::info!(backend = %name, %key, "subscription re-established");
                        registry.report_stream(StreamEvent::Back {
                            backend: name.to_string(),
                            key,
                        });
                    }
                }
                reported = None;
                let opened = tokio::time::Instant::now();
                if let Some(envelope) = first {
                    registry.deliver(&envelope);
                }
                let reason = loop {
                    match stream.message().await {
                        Ok(Some(envelope)) if envelope == Envelope::default() => {}
                        Ok(Some(envelope)) => {
                            registry.deliver(&envelope);
                        }
                        Ok(None) => break (false, "the server ended the stream".to_string()),
                        Err(status) => {
                            pushed_back = pushback(&status);
                            break (refusal(status.code()), status_text(&status));
                        }
                    }
                };
                // A stream that lived a while was healthy: start the backoff
                // afresh. One that a server ends at once keeps backing off.
                if opened.elapsed() >= STABLE_STREAM {
                    delays = backoff();
                }
                // Logged once per loss; failed attempts until it is back are debug.
                let (refused, reason) = reason;
                tracing::warn!(backend = %name, %key, "subscription stream lost ({reason}); reconnecting");
                report(&registry, &name, key, refused, reason, &mut reported);
            }
            Err(e) => {
                pushed_back = e.pushback();
                tracing::debug!(backend = %name, %key, "subscription attempt failed: {e}");
                // The first failure goes to `listen`; the task keeps trying until
                // unlistened (in a multi backend the others may carry on meanwhile).
                // A refusal while reconnecting is reported: retries do not cure it.
                match ready.take() {
                    Some(tx) => {
                        let _ = tx.send(Err(e));
                    }
                    None if !e.is_transient() => {
                        report(&registry, &name, key, true, e.to_string(), &mut reported);
                    }
                    None => {}
                }
            }
        }
        // Never sooner than the server asked (a refusal by a rate says when).
        let delay = delays.next().unwrap_or(options.backoff_max);
        tokio::time::sleep(delay.max(pushed_back.take().unwrap_or_default())).await;
    }
}

/// Whether a gRPC status refuses our key or its proof, which retrying does not cure.
fn refusal(code: tonic::Code) -> bool {
    matches!(
        code,
        tonic::Code::Unauthenticated | tonic::Code::PermissionDenied
    )
}

/// Reports a lost or refused stream to the registry, unless the same was
/// reported last since the stream was open.
fn report(
    registry: &Registry,
    name: &str,
    key: Key,
    refused: bool,
    reason: String,
    reported: &mut Option<(bool, String)>,
) {
    let now = (refused, reason);
    if reported.as_ref() == Some(&now) {
        return;
    }
    let (refused, reason) = now.clone();
    *reported = Some(now);
    let backend = name.to_string();
    registry.report_stream(if refused {
        StreamEvent::Refused {
            backend,
            key,
            reason,
        }
    } else {
        StreamEvent::Lost {
            backend,
            key,
            reason,
        }
    });
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
