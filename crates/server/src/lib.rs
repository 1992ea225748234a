//! The gRPC signaling server (SPEC §7): a relay of sealed envelopes addressed
//! by public keys. It never opens an envelope; it checks the key lengths and
//! the size, and fans each envelope out to the open Subscribe streams of its
//! recipient.
//!
//! One port serves `cunicu.signaling.Signaling`, `cunicu.signaling.RelayRegistry`,
//! `grpc.health.v1.Health` and gRPC server reflection (v1 and v1alpha). An
//! optional second port serves Prometheus metrics at `/metrics` and liveness at
//! `/healthz`.
//!
//! ```no_run
//! # async fn run() -> Result<(), cunicu_signal_server::ServerError> {
//! let server = cunicu_signal_server::Server::spawn(Default::default()).await?;
//! println!("listening on {}", server.local_addr());
//! server.shutdown(std::time::Duration::from_secs(5)).await?;
//! # Ok(()) }
//! ```
#![deny(missing_docs)]

mod health;
mod hub;
mod listener;
pub mod metrics;
pub mod relay;
mod service;

use std::{net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use cunicu_signal::proto::{
    FILE_DESCRIPTOR_SET,
    signaling::{relay_registry_server::RelayRegistryServer, signaling_server::SignalingServer},
};
use tokio::{net::TcpListener, task::JoinHandle};
use tokio_util::sync::CancellationToken;

pub use hub::Hub;
pub use metrics::Metrics;
pub use relay::{Relay, RelayError};
pub use service::build_info;
use service::{RelayService, SignalingService};

/// How the server runs. `Default` gives the built-in defaults.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Config {
    /// Address of the gRPC port.
    pub listen: SocketAddr,
    /// Address of the metrics port; none by default.
    pub metrics_listen: Option<SocketAddr>,
    /// STUN/TURN relays handed out by `GetRelays`.
    pub relays: Vec<Relay>,
    /// PEM certificate chain and key files; plaintext HTTP/2 without them.
    pub tls: Option<TlsFiles>,
    /// Largest encoded envelope accepted by Publish.
    pub max_envelope_size: usize,
    /// Envelopes queued per subscription stream before the oldest is dropped.
    pub queue_depth: usize,
    /// Bytes queued per subscription stream before the oldest is dropped.
    pub queue_bytes: usize,
    /// Bytes queued for all subscription streams together. A stream being
    /// fed drops its own oldest envelopes to stay within it; when even that
    /// would not make room (other streams hold the rest), the new envelope is
    /// dropped and the stream keeps what it has.
    pub max_queued_bytes: usize,
    /// Most client connections open at once; beyond it accepting waits.
    pub max_connections: usize,
    /// Most subscription streams open at once.
    pub max_subscriptions: usize,
    /// Most subscription streams open at once from one client: one IP
    /// address, or one /64 for IPv6.
    pub max_subscriptions_per_client: usize,
    /// Most concurrent HTTP/2 streams on one connection.
    pub max_streams_per_connection: u32,
    /// Interval of the server's HTTP/2 keepalive pings to clients.
    pub keepalive_interval: Duration,
    /// How long a ping may stay unanswered before the connection is closed.
    pub keepalive_timeout: Duration,
}

/// A certificate chain and its private key, both PEM files.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// The certificate chain.
    pub cert: PathBuf,
    /// The private key.
    pub key: PathBuf,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: SocketAddr::from(([0u16; 8], 8080)),
            metrics_listen: None,
            relays: Vec::new(),
            tls: None,
            max_envelope_size: 65536,
            queue_depth: 256,
            queue_bytes: 1 << 20,
            max_queued_bytes: 256 << 20,
            max_connections: 10_000,
            max_subscriptions: 100_000,
            max_subscriptions_per_client: 10_000,
            max_streams_per_connection: 1024,
            keepalive_interval: Duration::from_secs(120),
            keepalive_timeout: Duration::from_secs(20),
        }
    }
}

/// Why the server could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServerError {
    /// A port could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// A TLS file could not be read.
    #[error("cannot read {path}: {source}")]
    TlsFile {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The certificate or key was refused.
    #[error("invalid TLS certificate or key: {0}")]
    Tls(String),
    /// A setting is out of range.
    #[error("invalid setting: {0}")]
    Config(String),
    /// The gRPC server failed.
    #[error("gRPC server failed: {0}")]
    Serve(tonic::transport::Error),
    /// The metrics server failed.
    #[error("metrics server failed: {0}")]
    Metrics(std::io::Error),
    /// A server task panicked or was aborted.
    #[error("server task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
    /// Shutdown did not complete in time.
    #[error("shutdown did not complete within {0:?}")]
    ShutdownTimeout(Duration),
}

/// A running server. Dropping it stops it at once; [`Server::shutdown`] stops
/// it gracefully.
pub struct Server {
    local_addr: SocketAddr,
    metrics_addr: Option<SocketAddr>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
    /// Ends the connections still open: after a graceful shutdown ran out of
    /// time, or on drop.
    kill: CancellationToken,
    grpc: Option<JoinHandle<Result<(), ServerError>>>,
    http: Option<JoinHandle<Result<(), ServerError>>>,
}

impl Server {
    /// Binds the ports and starts serving.
    pub async fn spawn(config: Config) -> Result<Self, ServerError> {
        if config.max_envelope_size == 0
            || config.queue_depth == 0
            || config.max_connections == 0
            || config.max_subscriptions == 0
            || config.max_subscriptions_per_client == 0
            || config.max_streams_per_connection == 0
            || config.queue_bytes < config.max_envelope_size
            || config.max_queued_bytes < config.queue_bytes
        {
            return Err(ServerError::Config(
                "max envelope size, queue depth, connections, subscriptions, subscriptions \
                 per client and streams per connection must be at least 1, queue bytes at \
                 least the max envelope size, max queued bytes at least the queue bytes"
                    .into(),
            ));
        }
        let tls = match &config.tls {
            Some(files) => Some(listener::tls_acceptor(&files.cert, &files.key)?),
            None => None,
        };

        let listener =
            TcpListener::bind(config.listen)
                .await
                .map_err(|source| ServerError::Bind {
                    addr: config.listen,
                    source,
                })?;
        let local_addr = listener::bound(&listener, config.listen)?;
        let (metrics_listener, metrics_addr) = match config.metrics_listen {
            Some(addr) => {
                let l = TcpListener::bind(addr)
                    .await
                    .map_err(|source| ServerError::Bind { addr, source })?;
                let bound = listener::bound(&l, addr)?;
                (Some(l), Some(bound))
            }
            None => (None, None),
        };

        let metrics = Metrics::new();
        let shutdown = CancellationToken::new();
        let hub = Hub::new(
            hub::Limits {
                depth: config.queue_depth,
                queue_bytes: config.queue_bytes,
                total_bytes: config.max_queued_bytes,
                subscriptions: config.max_subscriptions,
                per_client: config.max_subscriptions_per_client,
            },
            metrics.clone(),
        );
        // tonic's own limit answers OUT_OF_RANGE; keep it above ours, which
        // answers RESOURCE_EXHAUSTED as grpc-go does.
        let decode_limit = config.max_envelope_size.saturating_mul(2).max(4 << 20);
        let signaling = SignalingServer::new(SignalingService {
            hub,
            metrics: metrics.clone(),
            max_envelope_size: config.max_envelope_size,
            shutdown: shutdown.clone(),
        })
        .max_decoding_message_size(decode_limit);
        let relays = RelayRegistryServer::new(RelayService {
            relays: config.relays.clone().into(),
            metrics: metrics.clone(),
        });

        let health = tonic_health::server::HealthReporter::new();
        let health_stopped = CancellationToken::new();
        let health_service = tonic_health::pb::health_server::HealthServer::new(
            health::StoppingHealth::new(health.clone(), health_stopped.clone()),
        );
        health
            .set_serving::<SignalingServer<SignalingService>>()
            .await;
        health
            .set_serving::<RelayRegistryServer<RelayService>>()
            .await;
        health
            .set_service_status("", tonic_health::ServingStatus::Serving)
            .await;
        let reflection = || {
            tonic_reflection::server::Builder::configure()
                .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        };
        let reflection_v1 = reflection()
            .build_v1()
            .map_err(|e| ServerError::Config(e.to_string()))?;
        let reflection_v1alpha = reflection()
            .build_v1alpha()
            .map_err(|e| ServerError::Config(e.to_string()))?;

        let router = tonic::transport::Server::builder()
            .http2_keepalive_interval(Some(config.keepalive_interval))
            .http2_keepalive_timeout(Some(config.keepalive_timeout))
            .max_concurrent_streams(Some(config.max_streams_per_connection))
            .add_service(signaling)
            .add_service(relays)
            .add_service(health_service)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha);
        let kill = CancellationToken::new();
        let (incoming, accept) = listener::incoming(
            listener,
            tls,
            config.max_connections,
            shutdown.clone(),
            kill.clone(),
        );
        let token = shutdown.clone();
        let grpc = tokio::spawn(async move {
            // NOT_SERVING as soon as shutdown starts, while health watchers
            // can still see it; then their streams end.
            let stopping = async move {
                token.cancelled().await;
                health
                    .set_not_serving::<SignalingServer<SignalingService>>()
                    .await;
                health
                    .set_not_serving::<RelayRegistryServer<RelayService>>()
                    .await;
                health
                    .set_service_status("", tonic_health::ServingStatus::NotServing)
                    .await;
                health_stopped.cancel();
            };
            let result = router
                .serve_with_incoming_shutdown(incoming, stopping)
                .await
                .map_err(ServerError::Serve);
            // The accept loop ends with the token; wait for it to let go of the port.
            let _ = accept.await;
            result
        });
        let http = metrics_listener.map(|listener| {
            let (metrics, token) = (metrics.clone(), shutdown.clone());
            tokio::spawn(async move {
                metrics::serve(listener, metrics, token)
                    .await
                    .map_err(ServerError::Metrics)
            })
        });
        tracing::info!(
            %local_addr,
            metrics = ?metrics_addr,
            tls = config.tls.is_some(),
            relays = config.relays.len(),
            "signaling server listening"
        );
        Ok(Server {
            local_addr,
            metrics_addr,
            metrics,
            shutdown,
            kill,
            grpc: Some(grpc),
            http,
        })
    }

    /// The address the gRPC port is bound to (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The address of the metrics port, if enabled.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// The server's metrics.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Stops accepting connections, ends every subscription stream and waits
    /// for the connections to close, for at most `grace`; then cuts the
    /// connections still open and fails with [`ServerError::ShutdownTimeout`].
    pub async fn shutdown(mut self, grace: Duration) -> Result<(), ServerError> {
        self.shutdown.cancel();
        let tasks = [self.grpc.take(), self.http.take()];
        let join = async {
            for task in tasks.into_iter().flatten() {
                task.await??;
            }
            Ok(())
        };
        match tokio::time::timeout(grace, join).await {
            Ok(result) => result,
            // Dropping self aborts what is left and ends the connections.
            Err(_) => Err(ServerError::ShutdownTimeout(grace)),
        }
    }

    /// Waits until the gRPC server's task ends: only if it fails, as
    /// nothing else stops it while this `Server` is borrowed.
    pub async fn join(&mut self) -> Result<(), ServerError> {
        if let Some(task) = self.grpc.as_mut() {
            let result = task.await;
            self.grpc = None;
            result??;
        }
        Ok(())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.shutdown.cancel();
        self.kill.cancel();
        for task in [self.grpc.take(), self.http.take()].into_iter().flatten() {
            task.abort();
        }
    }
}
