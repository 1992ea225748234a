//! The server's Prometheus metrics and the HTTP endpoint that serves them.

use std::{sync::Arc, time::Instant};

use axum::{Router, http::header, response::IntoResponse, routing::get};
use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Label of the drop and reject counters.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Reason {
    /// Why: see the metric's help text.
    pub reason: &'static str,
}

/// Label of the proof counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AuthResult {
    /// What the check found.
    pub result: &'static str,
}

/// Label of the RPC duration histogram.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Method {
    /// The gRPC method name, e.g. `Publish`.
    pub method: &'static str,
}

type HistogramFamily = Family<Method, Histogram, fn() -> Histogram>;

/// The server's counters, gauges and histograms. Cheap to share.
///
/// A client's address is never a label (it would let clients grow the
/// metrics without bound); the logs name it.
pub struct Metrics {
    /// Envelopes accepted by Publish.
    pub published: Counter,
    /// Envelopes written to subscription streams.
    pub delivered: Counter,
    /// Envelopes dropped, by reason (`queue_full`, `client_budget`,
    /// `server_budget`, `no_subscriber`).
    pub dropped: Family<Reason, Counter>,
    /// `dropped` for `queue_full`: a subscription's own queue was full and
    /// lost its oldest envelope.
    pub queue_full: Counter,
    /// `dropped` for `client_budget`: the subscriber's client held all the
    /// bytes it may.
    pub client_budget: Counter,
    /// `dropped` for `server_budget`: the server held all the bytes it may.
    pub server_budget: Counter,
    /// `dropped` for `no_subscriber`.
    pub no_subscriber: Counter,
    /// Requests refused, by reason.
    pub rejected: Family<Reason, Counter>,
    /// Proofs of key possession, by result (`ok`, `missing`, `malformed`,
    /// `bad_box`, `wrong_key`, `expired`, `replayed`, `low_order`,
    /// `not_allowed`, `cache_full`).
    pub auth: Family<AuthResult, Counter>,
    /// Subscription streams the server ended, by reason (`stalled`, `not_allowed`,
    /// `key_fair_share`).
    pub subscribers_cut: Family<Reason, Counter>,
    /// Connections refused at accept, by reason (`too_many_client_connections`,
    /// `connection_rate`, `tls_handshake_rate`).
    pub connections_refused: Family<Reason, Counter>,
    /// Connections the server closed, by reason (`handshake_timeout`, `idle`,
    /// `keepalive_timeout`).
    pub connections_closed: Family<Reason, Counter>,
    /// Open client connections.
    pub connections: Gauge,
    /// Clients (IP addresses, IPv6 /64s) with a connection open.
    pub clients: Gauge,
    /// Open subscription streams.
    pub subscriptions: Gauge,
    /// Keys with at least one subscription stream.
    pub topics: Gauge,
    /// Bytes the server holds for clients: queued for subscribers, handed to
    /// HTTP/2 and not yet written, and requests being received.
    pub queued_bytes: Gauge,
    /// 1 while the replica is connected to its NATS cluster, else 0.
    pub cluster_connected: Gauge,
    /// Keys with a NATS subscription (keys with local subscribers).
    pub cluster_subjects: Gauge,
    /// Envelopes handed to NATS for the other replicas.
    pub cluster_published: Counter,
    /// Envelopes received from other replicas.
    pub cluster_received: Counter,
    /// Envelopes not sent to or not taken from NATS, by reason.
    pub cluster_dropped: Family<Reason, Counter>,
    /// New key subscriptions whose round trip to NATS did not come back in
    /// time: their Subscribes went on without it.
    pub cluster_unconfirmed: Counter,
    /// Duration of unary RPCs; for Subscribe, the time until the stream is set up.
    pub rpc_duration: HistogramFamily,
    /// `rpc_duration` of the methods timed on every call, looked up once.
    hot_rpcs: [(&'static str, Histogram); 2],
    registry: Registry,
}

fn rpc_histogram() -> Histogram {
    // 10 µs to about 10 s.
    Histogram::new(exponential_buckets(0.00001, 4.0, 11))
}

impl Metrics {
    /// Fresh metrics, registered under the names operators see.
    pub fn new() -> Arc<Self> {
        let mut registry = Registry::default();
        let published = Counter::default();
        let delivered = Counter::default();
        let dropped = Family::<Reason, Counter>::default();
        let rejected = Family::<Reason, Counter>::default();
        let subscribers_cut = Family::<Reason, Counter>::default();
        let auth = Family::<AuthResult, Counter>::default();
        let connections_refused = Family::<Reason, Counter>::default();
        let connections_closed = Family::<Reason, Counter>::default();
        let connections = Gauge::default();
        let clients = Gauge::default();
        let subscriptions = Gauge::default();
        let topics = Gauge::default();
        let queued_bytes = Gauge::default();
        let rpc_duration = HistogramFamily::new_with_constructor(rpc_histogram);
        let cluster_connected = Gauge::default();
        let cluster_subjects = Gauge::default();
        let cluster_published = Counter::default();
        let cluster_received = Counter::default();
        let cluster_dropped = Family::<Reason, Counter>::default();
        let cluster_unconfirmed = Counter::default();
        registry.register(
            "signaling_cluster_connected",
            "1 while connected to the NATS cluster (with --cluster), else 0",
            cluster_connected.clone(),
        );
        registry.register(
            "signaling_cluster_subjects",
            "Keys with a NATS subscription: those with local subscribers",
            cluster_subjects.clone(),
        );
        registry.register(
            "signaling_cluster_published",
            "Envelopes handed to NATS for the other replicas",
            cluster_published.clone(),
        );
        registry.register(
            "signaling_cluster_received",
            "Envelopes received from other replicas",
            cluster_received.clone(),
        );
        registry.register(
            "signaling_cluster_unconfirmed",
            "Keys' NATS subscriptions whose round trip to NATS did not come back within 2 s \
             (the Subscribe's sync went without it)",
            cluster_unconfirmed.clone(),
        );
        registry.register(
            "signaling_cluster_dropped",
            "Envelopes not sent to or not taken from NATS: buffer_full (NATS away long), \
             server_budget, nats_buffer_full (NATS hung or away), publish_failed, \
             slow_consumer, invalid, own, closed",
            cluster_dropped.clone(),
        );
        registry.register(
            "signaling_envelopes_published",
            "Envelopes accepted by Publish",
            published.clone(),
        );
        registry.register(
            "signaling_envelopes_delivered",
            "Envelopes written to subscription streams",
            delivered.clone(),
        );
        registry.register(
            "signaling_envelopes_dropped",
            "Envelopes dropped: queue_full (a subscriber's queue lost its oldest), client_budget \
             (the subscriber's client holds all it may), server_budget, no_subscriber",
            dropped.clone(),
        );
        registry.register(
            "signaling_requests_rejected",
            "Requests refused, by reason",
            rejected.clone(),
        );
        registry.register(
            "signaling_subscribers_cut",
            "Subscription streams the server ended: stalled (took nothing while envelopes \
             waited), not_allowed (its key left the allowed keys)",
            subscribers_cut.clone(),
        );
        registry.register(
            "signaling_auth",
            "Proofs of key possession checked, by result",
            auth.clone(),
        );
        registry.register(
            "signaling_connections_refused",
            "Connections refused at accept: too_many_client_connections, connection_rate",
            connections_refused.clone(),
        );
        registry.register(
            "signaling_connections_closed",
            "Connections the server closed: handshake_timeout, idle, keepalive_timeout",
            connections_closed.clone(),
        );
        registry.register(
            "signaling_connections",
            "Open client connections",
            connections.clone(),
        );
        registry.register(
            "signaling_clients",
            "Clients (IP addresses, IPv6 /64s) with a connection open",
            clients.clone(),
        );
        registry.register(
            "signaling_subscriptions",
            "Open subscription streams",
            subscriptions.clone(),
        );
        registry.register(
            "signaling_topics",
            "Keys with at least one subscription stream",
            topics.clone(),
        );
        registry.register(
            "signaling_queued_bytes",
            "Bytes held for clients: queued, in HTTP/2 send buffers, requests being received",
            queued_bytes.clone(),
        );
        registry.register(
            "signaling_rpc_duration_seconds",
            "Duration of RPCs by method; for Subscribe, until the stream is set up",
            rpc_duration.clone(),
        );
        // The drop reasons show from the start, at 0.
        let reason = |reason| dropped.get_or_create(&Reason { reason }).clone();
        let (queue_full, client_budget, server_budget, no_subscriber) = (
            reason("queue_full"),
            reason("client_budget"),
            reason("server_budget"),
            reason("no_subscriber"),
        );
        let hot_rpcs = ["Publish", "Subscribe"].map(|method| {
            (
                method,
                rpc_duration.get_or_create(&Method { method }).clone(),
            )
        });
        Arc::new(Metrics {
            hot_rpcs,
            published,
            delivered,
            dropped,
            queue_full,
            client_budget,
            server_budget,
            no_subscriber,
            rejected,
            auth,
            subscribers_cut,
            connections_refused,
            connections_closed,
            connections,
            clients,
            subscriptions,
            topics,
            queued_bytes,
            rpc_duration,
            cluster_connected,
            cluster_subjects,
            cluster_published,
            cluster_received,
            cluster_dropped,
            cluster_unconfirmed,
            registry,
        })
    }

    /// Counts a refused request.
    pub fn reject_for(&self, reason: &'static str) {
        self.rejected.get_or_create(&Reason { reason }).inc();
    }

    /// Counts an envelope the cluster dropped.
    pub fn cluster_drop_for(&self, reason: &'static str) {
        self.cluster_dropped.get_or_create(&Reason { reason }).inc();
    }

    /// Counts a proof of key possession.
    pub fn auth_for(&self, result: &'static str) {
        self.auth.get_or_create(&AuthResult { result }).inc();
    }

    /// Counts a subscription stream the server ended.
    pub fn cut_for(&self, reason: &'static str) {
        self.subscribers_cut.get_or_create(&Reason { reason }).inc();
    }

    /// Counts a connection refused at accept.
    pub fn refuse_connection_for(&self, reason: &'static str) {
        self.connections_refused
            .get_or_create(&Reason { reason })
            .inc();
    }

    /// Counts a connection the server closed.
    pub fn close_connection_for(&self, reason: &'static str) {
        self.connections_closed
            .get_or_create(&Reason { reason })
            .inc();
    }

    /// Starts timing a call of `method`; the time is recorded when the guard drops.
    pub fn time(&self, method: &'static str) -> RpcTimer {
        let histogram = match self.hot_rpcs.iter().find(|(m, _)| *m == method) {
            Some((_, histogram)) => histogram.clone(),
            None => self.rpc_duration.get_or_create(&Method { method }).clone(),
        };
        RpcTimer {
            histogram,
            start: Instant::now(),
        }
    }

    /// The metrics in the Prometheus (OpenMetrics) text format.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut text, &self.registry);
        text
    }
}

/// Records an RPC's duration when dropped.
pub struct RpcTimer {
    histogram: Histogram,
    start: Instant,
}

impl Drop for RpcTimer {
    fn drop(&mut self) {
        self.histogram.observe(self.start.elapsed().as_secs_f64());
    }
}

/// Serves `/metrics`, liveness at `/healthz` and readiness at `/readyz` on
/// `listener` until `shutdown`. Readiness is 200 also while NATS is away
/// (`cluster` says whether it is there): the replica serves its own clients
/// then, and taking every replica out of a load balancer during a NATS outage
/// would turn a degradation into an outage; the body says "degraded".
pub(crate) async fn serve(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    cluster: Option<tokio::sync::watch::Receiver<bool>>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let app = Router::new()
        .route(
            "/metrics",
            get(move || {
                let metrics = metrics.clone();
                async move {
                    (
                        [(
                            header::CONTENT_TYPE,
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        )],
                        metrics.encode(),
                    )
                        .into_response()
                }
            }),
        )
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/readyz",
            get(move || {
                let up = cluster.as_ref().is_none_or(|c| *c.borrow());
                async move {
                    if up {
                        "ok\n"
                    } else {
                        "degraded: the NATS cluster is away; serving local subscribers only\n"
                    }
                }
            }),
        );
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
}
