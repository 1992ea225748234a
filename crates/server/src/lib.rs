//! The gRPC signaling server (docs/PROTOCOL.md §7, §10): a relay of sealed envelopes
//! addressed by public keys. It never opens an envelope; it checks the key
//! lengths and the size, and fans each envelope out to the open Subscribe
//! streams of its recipient.
//!
//! One port serves `cunicu.signaling.Signaling`, `cunicu.signaling.RelayRegistry`,
//! `grpc.health.v1.Health` and gRPC server reflection (v1 and v1alpha). An
//! optional second port serves Prometheus metrics at `/metrics` and liveness at
//! `/healthz`.
//!
//! The layout: `listener` accepts connections (capped in all and per
//! client, rate-limited per client) and gives each a task (`conn`) that sets
//! up TLS and HTTP/2 (`transport`, the h2 crate), serves the Signaling
//! service itself (`signaling`) and the other services through tonic
//! (`bridge`); what the tasks share is in `shared`. The `hub` holds the
//! subscriptions by key and their queues; `client` what each client may hold.
//! Everything a client makes the server hold is bounded per client and in
//! all (docs/PROTOCOL.md §10), and docs/SERVER.md adds up the worst case.
//!
//! ```no_run
//! # async fn run() -> Result<(), cunicu_signal_server::ServerError> {
//! let server = cunicu_signal_server::Server::spawn(Default::default()).await?;
//! println!("listening on {}", server.local_addr());
//! server.shutdown(std::time::Duration::from_secs(5)).await?;
//! # Ok(()) }
//! ```
#![deny(missing_docs)]

mod auth;
mod bounds;
mod bridge;
mod client;
pub mod cluster;
mod config;
mod conn;
mod deadlines;
mod drain;
mod health;
mod hub;
mod listener;
pub mod metrics;
mod process;
mod refusal;
pub mod relay;
mod service;
mod shared;
mod signaling;
pub mod systemd;
mod tls;
mod transport;
mod wire;

use std::{future::Future, net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use cunicu_signal::proto::{
    FILE_DESCRIPTOR_SET,
    signaling::{relay_registry_server::RelayRegistryServer, signaling_server},
};
use tokio::net::TcpListener;
use tokio_util::{
    sync::CancellationToken,
    task::{AbortOnDropHandle, TaskTracker},
};
use tonic::server::NamedService;

pub use auth::{AllowKeysError, AuthMode};
pub use client::Rate;
pub use cluster::{ClusterConfig, ClusterError};
pub use config::{Config, ConfigError, TlsFiles};
pub use metrics::Metrics;
pub use relay::{Relay, RelayUrlError};
use service::RelayService;
pub use signaling::build_info;

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
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The cluster could not be set up.
    #[error(transparent)]
    Cluster(#[from] ClusterError),
    /// The allowed keys could not be read at start.
    #[error(transparent)]
    AllowKeys(#[from] AllowKeysError),
    /// A service could not be built.
    #[error("cannot build the {service} service: {reason}")]
    Service {
        /// Which.
        service: &'static str,
        /// Why.
        reason: String,
    },
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

/// Listening sockets made elsewhere (passed by systemd, say), used instead of
/// binding [`Config::listen`] and [`Config::metrics_listen`].
#[derive(Debug, Default)]
pub struct Listeners {
    /// The gRPC port.
    pub grpc: Option<std::net::TcpListener>,
    /// The metrics port.
    pub metrics: Option<std::net::TcpListener>,
}

/// What [`Server::reload`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Reloaded {
    /// Nothing can be reloaded: no TLS files, no allowed keys.
    Nothing,
    /// The TLS certificate and key were read again (and the allowed keys,
    /// if any, are read again by their own watcher).
    Tls,
    /// Only the allowed keys (read again by their own watcher, which also
    /// listens for SIGHUP).
    AllowedKeys,
}

/// A running server. Dropping it stops it at once; [`Server::shutdown`] and
/// [`Server::drain`] stop it gracefully.
pub struct Server {
    /// The other replicas, if any.
    cluster: Option<Arc<cluster::Cluster>>,
    local_addr: SocketAddr,
    metrics_addr: Option<SocketAddr>,
    metrics: Arc<Metrics>,
    /// Readiness says NOT_SERVING from the moment this is cancelled.
    draining: CancellationToken,
    shutdown: CancellationToken,
    shared: Arc<shared::Shared>,
    tls: Option<Arc<tls::Reloadable>>,
    allow_keys: bool,
    /// The cluster's publisher: it stops after the connections.
    cluster_tasks: TaskTracker,
    /// Ends the connections still open: after a graceful shutdown ran out of
    /// time, or on drop.
    kill: CancellationToken,
    connections: TaskTracker,
    accept: Option<AbortOnDropHandle<()>>,
    http: Option<AbortOnDropHandle<Result<(), ServerError>>>,
}

impl Server {
    /// Binds the ports and starts serving.
    pub async fn spawn(config: Config) -> Result<Self, ServerError> {
        Self::spawn_with(config, Listeners::default()).await
    }

    /// Starts serving on the listeners given, binding the ports of `config`
    /// only for those not given.
    pub async fn spawn_with(config: Config, given: Listeners) -> Result<Self, ServerError> {
        config.check()?;
        let tls = match &config.tls {
            Some(files) => Some(Arc::new(tls::Reloadable::new(
                files.cert.clone(),
                files.key.clone(),
            )?)),
            None => None,
        };

        let listener = listen(given.grpc, config.listen).await?;
        let local_addr = listener::bound(&listener, config.listen)?;
        let (metrics_listener, metrics_addr) = match (given.metrics, config.metrics_listen) {
            (given @ Some(_), addr) | (given @ None, addr @ Some(_)) => {
                let asked = addr.unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0)));
                let l = listen(given, asked).await?;
                let bound = listener::bound(&l, asked)?;
                (Some(l), Some(bound))
            }
            (None, None) => (None, None),
        };

        let metrics = Metrics::new();
        metrics
            .memory_bound
            .set(i64::try_from(config.memory_bound().total()).unwrap_or(i64::MAX));
        let shutdown = CancellationToken::new();
        let budget = Arc::new(client::Budget::in_gauge(
            config.max_queued_bytes,
            metrics.queued_bytes.clone(),
        ));
        let connections = TaskTracker::new();
        let cluster_tasks = TaskTracker::new();
        let link = match &config.cluster {
            Some(cluster) => Some(cluster::Cluster::connect(cluster, metrics.clone()).await?),
            None => None,
        };
        // The hub holds the cluster; the cluster reaches the hub through a
        // weak handle made with it.
        let mut cluster = None;
        let hub = hub::Hub::new(
            config.queue_limits(),
            config.max_subscriptions_per_key,
            budget.clone(),
            metrics.clone(),
            |hub| {
                let started = link.map(|link| link.start(hub, budget, &cluster_tasks));
                cluster.clone_from(&started);
                started.map(|c| c as Arc<dyn hub::Replicas>)
            },
        );
        let clients = Arc::new(client::Clients::new(
            config.client_limits(),
            config.max_connections,
            config.max_subscriptions,
            config.max_calls,
            metrics.clients.clone(),
        ));

        let allowed = match &config.allow_keys {
            Some(path) => Some(auth::read_allowed(path)?),
            None => None,
        };
        // What the start-up line says of the allow-list.
        let allow_list = match (&config.allow_keys, &allowed) {
            (Some(path), Some(keys)) => {
                if keys.is_empty() {
                    tracing::warn!(
                        path = %path.display(),
                        "the allow-list has no key: it admits nobody until keys are added"
                    );
                }
                format!("{} ({} keys)", path.display(), keys.len())
            }
            _ => "none (every key is admitted)".to_string(),
        };
        let server_key = config.key.clone().map(|private| auth::ServerKey {
            public: private.public_key(),
            private,
        });
        let auth = Arc::new(auth::Auth::new(
            config.auth,
            server_key,
            (config.auth_skew, config.auth_future_skew),
            allowed,
            metrics.clone(),
        ));
        let mut response_headers = http::HeaderMap::new();
        if let Some(public) = auth.server_key() {
            let value = http::HeaderValue::from_str(&public.to_string()).map_err(|e| {
                ServerError::Service {
                    service: "authentication",
                    reason: e.to_string(),
                }
            })?;
            response_headers.insert(cunicu_signal::auth::SERVER_KEY_METADATA, value);
        }

        // The services tonic serves (Signaling is the connection's own).
        let relays = RelayRegistryServer::new(RelayService {
            relays: config.relays.clone().into(),
            metrics: metrics.clone(),
            auth: auth.clone(),
        })
        .max_decoding_message_size(bounds::MAX_REQUEST_BYTES);
        let health = tonic_health::server::HealthReporter::new();
        let health_stopped = CancellationToken::new();
        let health_service =
            tonic_health::pb::health_server::HealthServer::new(health::StoppingHealth::new(
                health.clone(),
                health_stopped.clone(),
                config.health_watch_lifetime,
                metrics.clone(),
            ));
        set_health(&health, tonic_health::ServingStatus::Serving).await;
        // A replica reports whether NATS is there, and keeps serving either way.
        if let Some(cluster) = &cluster {
            let (mut connected, health, metrics, token) = (
                cluster.connected(),
                health.clone(),
                metrics.clone(),
                shutdown.clone(),
            );
            connections.spawn(async move {
                loop {
                    let up = *connected.borrow_and_update();
                    metrics.cluster_connected.set(i64::from(up));
                    let status = if up {
                        tonic_health::ServingStatus::Serving
                    } else {
                        tonic_health::ServingStatus::NotServing
                    };
                    health
                        .set_service_status(cluster::HEALTH_SERVICE, status)
                        .await;
                    tokio::select! {
                        _ = token.cancelled() => break,
                        changed = connected.changed() => if changed.is_err() { break },
                    }
                }
            });
        }
        let mut routes = tonic::service::Routes::new(relays).add_service(health_service);
        // Off by default: its answers are tens of KiB for a request of a few
        // bytes, a lever for anyone who wants the server to send much.
        if config.reflection {
            let reflection = || {
                tonic_reflection::server::Builder::configure()
                    .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
                    .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            };
            let service_error =
                |service, e: tonic_reflection::server::Error| ServerError::Service {
                    service,
                    reason: e.to_string(),
                };
            let reflection_v1 = reflection()
                .build_v1()
                .map_err(|e| service_error("reflection v1", e))?;
            let reflection_v1alpha = reflection()
                .build_v1alpha()
                .map_err(|e| service_error("reflection v1alpha", e))?;
            routes = routes
                .add_service(reflection_v1)
                .add_service(reflection_v1alpha);
        }
        let routes = routes.prepare();

        let shared = Arc::new(shared::Shared {
            hub: hub.clone(),
            cluster: cluster.clone(),
            clients,
            metrics: metrics.clone(),
            routes,
            timeouts: config.timeouts(),
            max_envelope_size: config.max_envelope_size,
            h2: config.h2_builder(),
            tls: tls
                .as_ref()
                .map(|tls| tls.acceptor())
                .transpose()?
                .map(|acceptor| transport::Tls {
                    acceptor,
                    in_progress: Arc::new(tokio::sync::Semaphore::new(config.max_tls_handshakes)),
                    rate: governor::RateLimiter::direct(config.tls_handshake_rate.quota()),
                }),
            response_headers,
            auth: auth.clone(),
            recipients: config.recipients(),
            logs: shared::Logs::default(),
            drain: drain::DrainPlan::default(),
        });

        let kill = CancellationToken::new();
        if let Some(path) = config.allow_keys.clone() {
            connections.spawn(auth::watch_allowed(
                path,
                auth.clone(),
                hub.clone(),
                shutdown.clone(),
            ));
        }
        let accept = tokio::spawn(listener::accept(
            listener,
            shared.clone(),
            shutdown.clone(),
            kill.clone(),
            connections.clone(),
        ));
        // NOT_SERVING as soon as draining starts, while health watchers can
        // still see it; their streams end at shutdown.
        let draining = CancellationToken::new();
        connections.spawn({
            let (draining, token) = (draining.clone(), shutdown.clone());
            async move {
                draining.cancelled().await;
                set_health(&health, tonic_health::ServingStatus::NotServing).await;
                health
                    .set_service_status(
                        cluster::HEALTH_SERVICE,
                        tonic_health::ServingStatus::NotServing,
                    )
                    .await;
                token.cancelled().await;
                health_stopped.cancel();
            }
        });
        let http = metrics_listener.map(|listener| {
            let (metrics, token) = (metrics.clone(), shutdown.clone());
            let connected = cluster.as_ref().map(|c| c.connected());
            let draining = draining.clone();
            AbortOnDropHandle::new(tokio::spawn(async move {
                metrics::serve(listener, metrics, connected, draining, token)
                    .await
                    .map_err(ServerError::Metrics)
            }))
        });
        tracing::info!(
            %local_addr,
            metrics = %metrics_addr.map_or_else(|| "off".to_string(), |a| a.to_string()),
            allow_keys = %allow_list,
            tls = config.tls.is_some(),
            auth = %config.auth,
            server_key = %auth.server_key().map_or_else(|| "none".to_string(), |k| k.to_string()),
            relays = config.relays.len(),
            "signaling server listening"
        );
        Ok(Server {
            cluster,
            local_addr,
            metrics_addr,
            metrics,
            draining,
            shutdown,
            shared,
            tls,
            allow_keys: config.allow_keys.is_some(),
            cluster_tasks,
            kill,
            connections,
            accept: Some(AbortOnDropHandle::new(accept)),
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
        self.draining.cancel();
        self.stop(Duration::ZERO);
        let join = self.join_all();
        match tokio::time::timeout(grace, join).await {
            Ok(result) => result,
            // Dropping self ends what is left.
            Err(_) => Err(ServerError::ShutdownTimeout(grace)),
        }
    }

    /// Stops as a replica behind a load balancer should: readiness says
    /// NOT_SERVING at once; the server goes on serving for `delay` (the
    /// balancers stop sending new clients); then it stops accepting, sends
    /// GOAWAY and ends each subscription stream at its own moment, spread
    /// evenly over `window` in random order, with UNAVAILABLE "server
    /// shutting down" (clients subscribe again, elsewhere). It returns once
    /// the connections have closed, at most a few seconds after the window.
    /// If `skip` completes first (a second signal), what is left is cut at
    /// once.
    pub async fn drain(
        mut self,
        delay: Duration,
        window: Duration,
        skip: impl Future<Output = ()>,
    ) -> Result<(), ServerError> {
        self.draining.cancel();
        let mut skip = std::pin::pin!(skip);
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = &mut skip => return Ok(()),
        }
        self.stop(window);
        let grace = window + bounds::AFTER_DRAIN_WINDOW;
        let join = self.join_all();
        tokio::select! {
            result = tokio::time::timeout(grace, join) => match result {
                Ok(result) => result,
                Err(_) => Err(ServerError::ShutdownTimeout(grace)),
            },
            // Dropping self ends what is left.
            _ = skip => Ok(()),
        }
    }

    /// Reads again what can change while the server runs: the TLS
    /// certificate and key (the connections made from now on use them). The
    /// allowed keys have their own watcher, which also reloads on SIGHUP.
    pub fn reload(&self) -> Result<Reloaded, ServerError> {
        match (&self.tls, self.allow_keys) {
            (Some(tls), _) => {
                tls.reload()?;
                Ok(Reloaded::Tls)
            }
            (None, true) => Ok(Reloaded::AllowedKeys),
            (None, false) => Ok(Reloaded::Nothing),
        }
    }

    /// Stops accepting and ends the streams over `window`.
    fn stop(&self, window: Duration) {
        let streams = usize::try_from(self.metrics.subscriptions.get()).unwrap_or(0);
        self.shared.drain.begin(window, streams);
        self.shutdown.cancel();
        self.connections.close();
    }

    /// Waits for the accept loop, the connections, then the cluster (which
    /// serves the subscribers until their streams end) and the metrics port.
    fn join_all(&mut self) -> impl Future<Output = Result<(), ServerError>> + use<> {
        let (accept, http, connections) = (
            self.accept.take(),
            self.http.take(),
            self.connections.clone(),
        );
        let (cluster, cluster_tasks) = (self.cluster.clone(), self.cluster_tasks.clone());
        async move {
            if let Some(accept) = accept {
                accept.await?;
            }
            connections.wait().await;
            if let Some(cluster) = cluster {
                cluster.close();
                cluster_tasks.close();
                cluster_tasks.wait().await;
            }
            if let Some(http) = http {
                http.await??;
            }
            Ok(())
        }
    }

    /// Waits until the server's accept loop ends: only if it fails, as
    /// nothing else stops it while this `Server` is borrowed.
    pub async fn join(&mut self) -> Result<(), ServerError> {
        if let Some(task) = self.accept.as_mut() {
            let result = task.await;
            self.accept = None;
            result?;
        }
        Ok(())
    }
}

/// A listener: the one given (made non-blocking for tokio), or `addr` bound.
async fn listen(
    given: Option<std::net::TcpListener>,
    addr: SocketAddr,
) -> Result<TcpListener, ServerError> {
    let bind_error = |source| ServerError::Bind { addr, source };
    match given {
        Some(listener) => {
            listener.set_nonblocking(true).map_err(bind_error)?;
            TcpListener::from_std(listener).map_err(bind_error)
        }
        None => TcpListener::bind(addr).await.map_err(bind_error),
    }
}

/// Reports `status` for what this server always serves: the Signaling and
/// RelayRegistry services and the server as a whole (`""`).
async fn set_health(
    health: &tonic_health::server::HealthReporter,
    status: tonic_health::ServingStatus,
) {
    for service in [
        signaling_server::SERVICE_NAME,
        <RelayRegistryServer<RelayService> as NamedService>::NAME,
        "",
    ] {
        health.set_service_status(service, status).await;
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.shutdown.cancel();
        self.kill.cancel();
        if let Some(cluster) = self.cluster.take() {
            cluster.close();
        }
        // The accept and metrics tasks are aborted as their handles drop.
    }
}
