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
        info::Info,
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
    /// `key_fair_share`, `fair_share`, `queue_fair_share`).
    pub subscribers_cut: Family<Reason, Counter>,
    /// Calls the server ended before they were done, by reason
    /// (`first_bytes_timeout`: no request bytes within the first-bytes
    /// timeout; `fair_share`: the server was at a cap of calls and the
    /// client holding the most lost its newest; `health_watch_lifetime`: a
    /// health watch stream reached its end).
    pub calls_ended: Family<Reason, Counter>,
    /// Connections refused at accept, by reason (`too_many_client_connections`,
    /// `too_many_connections`, `too_many_address_connections`,
    /// `address_connection_rate`, `tls_handshake_rate`).
    pub connections_refused: Family<Reason, Counter>,
    /// Connections the server closed, by reason (`handshake_timeout`, `idle`,
    /// `keepalive_timeout`, `request_rate`, `fair_share`: ended for another
    /// client's fair share, `unproven`: admitted beyond its address's
    /// per-client limit, its first call proved no key).
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
    /// The memory the server can hold with every limit reached at once.
    pub memory_bound: Gauge,
    /// `rpc_duration` of the methods timed on every call, looked up once.
    hot_rpcs: [(&'static str, Histogram); 2],
    registry: Registry,
}

fn rpc_histogram() -> Histogram {
    // 10 µs to about 10 s.
    Histogram::new(exponential_buckets(0.00001, 4.0, 11))
}

// Every label a counter family can take, shown at 0 from the start (a rate
// over a series that appears only with its first event misses that event).
// A reason added where it is counted belongs here too.
const REJECT_REASONS: &[&str] = &[
    "invalid_key",
    "server_budget",
    "oversize",
    "malformed",
    "request_timeout",
    "too_many_client_subscriptions",
    "too_many_subscriptions",
    "too_many_client_calls",
    "too_many_calls",
    "too_many_client_service_calls",
    "too_many_service_calls",
    "request_rate",
    "publish_rate",
    "publish_bytes_rate",
    "too_many_address_subscriptions",
    "too_many_address_calls",
    "address_publish_rate",
    "address_publish_bytes_rate",
    "too_many_client_health_checks",
    "too_many_health_checks",
    "too_many_client_health_watches",
    "too_many_health_watches",
];
const CUT_REASONS: &[&str] = &[
    "stalled",
    "not_allowed",
    "key_fair_share",
    "fair_share",
    "queue_fair_share",
];
const CONNECTION_REFUSED_REASONS: &[&str] = &[
    "too_many_client_connections",
    "connection_rate",
    "too_many_connections",
    "too_many_address_connections",
    "address_connection_rate",
];
const CALL_END_REASONS: &[&str] = &["first_bytes_timeout", "fair_share", "health_watch_lifetime"];
const CONNECTION_CLOSED_REASONS: &[&str] = &[
    "handshake_timeout",
    "idle",
    "keepalive_timeout",
    "request_rate",
    "fair_share",
    "unproven",
];
const CLUSTER_DROP_REASONS: &[&str] = &[
    "buffer_full",
    "publish_failed",
    "slow_consumer",
    "invalid",
    "own",
    "closed",
];
const AUTH_RESULTS: &[&str] = &[
    "ok",
    "missing",
    "malformed",
    "bad_box",
    "wrong_key",
    "expired",
    "replayed",
    "low_order",
    "not_allowed",
    "cache_full",
];

/// Label of the build information.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Version {
    version: &'static str,
}

/// What every server shows whatever it does: its build and its process.
fn register_operator_metrics(registry: &mut Registry) {
    registry.register(
        "signaling_build",
        "The server's version",
        Info::new(Version {
            version: env!("CARGO_PKG_VERSION"),
        }),
    );
    registry.register_collector(Box::new(crate::process::ProcessCollector));
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
        let calls_ended = Family::<Reason, Counter>::default();
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
            "Subscription streams the server ended: stalled (took too little of what waited \
             for it over the stall timeout), not_allowed (its key left the allowed keys), \
             key_fair_share, queue_fair_share (its client held the most of a full cap)",
            subscribers_cut.clone(),
        );
        registry.register(
            "signaling_calls_ended",
            "Calls the server ended before they were done: first_bytes_timeout, fair_share, \
             health_watch_lifetime",
            calls_ended.clone(),
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
        register_operator_metrics(&mut registry);
        let memory_bound = Gauge::default();
        registry.register(
            "signaling_memory_bound_bytes",
            "The memory the server can hold with every limit reached at once (the worst case)",
            memory_bound.clone(),
        );
        let hot_rpcs = ["Publish", "Subscribe"].map(|method| {
            (
                method,
                rpc_duration.get_or_create(&Method { method }).clone(),
            )
        });
        for (family, reasons) in [
            (&rejected, REJECT_REASONS),
            (&subscribers_cut, CUT_REASONS),
            (&calls_ended, CALL_END_REASONS),
            (&connections_refused, CONNECTION_REFUSED_REASONS),
            (&connections_closed, CONNECTION_CLOSED_REASONS),
            (&cluster_dropped, CLUSTER_DROP_REASONS),
        ] {
            for &reason in reasons {
                drop(family.get_or_create(&Reason { reason }));
            }
        }
        for &result in AUTH_RESULTS {
            drop(auth.get_or_create(&AuthResult { result }));
        }
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
            calls_ended,
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
            memory_bound,
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

    /// Counts a call the server ended before it was done.
    pub fn end_call_for(&self, reason: &'static str) {
        self.calls_ended.get_or_create(&Reason { reason }).inc();
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

    /// The metrics in the OpenMetrics text format.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut text, &self.registry);
        text
    }

    /// The metrics in the Prometheus text format (0.0.4), for scrapers that
    /// ask for `text/plain`.
    pub fn encode_text(&self) -> String {
        openmetrics_to_text(&self.encode())
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

/// The content type of the OpenMetrics text format.
const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// The content type of the Prometheus text format.
const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Whether a scraper's `Accept` asks for the Prometheus text format: it
/// names `text/plain` and not OpenMetrics (which Prometheus itself prefers).
fn wants_text(accept: Option<&str>) -> bool {
    accept.is_some_and(|a| a.contains("text/plain") && !a.contains("application/openmetrics-text"))
}

/// OpenMetrics text to Prometheus text (0.0.4): counters are declared by
/// their sample name (`_total`), info metrics become gauges, and there is no
/// `# UNIT` or `# EOF`.
fn openmetrics_to_text(openmetrics: &str) -> String {
    let mut types = std::collections::HashMap::new();
    for line in openmetrics.lines() {
        if let Some((name, kind)) = line
            .strip_prefix("# TYPE ")
            .and_then(|rest| rest.split_once(' '))
        {
            types.insert(name, kind);
        }
    }
    let rename = |name: &str| -> (String, Option<&'static str>) {
        match types.get(name).copied() {
            Some("counter") => (format!("{name}_total"), None),
            Some("info") => (format!("{name}_info"), Some("gauge")),
            Some("unknown") => (name.to_string(), Some("untyped")),
            _ => (name.to_string(), None),
        }
    };
    let mut text = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, help) = rest.split_once(' ').unwrap_or((rest, ""));
            let (name, _) = rename(name);
            text.push_str(&format!("# HELP {name} {}\n", help.replace("\\\"", "\"")));
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap_or((rest, ""));
            let (name, new_kind) = rename(name);
            text.push_str(&format!("# TYPE {name} {}\n", new_kind.unwrap_or(kind)));
            continue;
        }
        text.push_str(line);
        text.push('\n');
    }
    text
}

/// Serves `/metrics` (OpenMetrics, or the Prometheus text format to a
/// scraper that asks for `text/plain`), liveness at `/healthz` and readiness
/// at `/readyz` on `listener` until `shutdown`. Readiness is 503 from the
/// moment the server starts draining (`draining`), and 200 also while NATS
/// is away (`cluster` says whether it is there): the replica serves its own
/// clients then, and taking every replica out of a load balancer during a
/// NATS outage would turn a degradation into an outage; the body says
/// "degraded".
pub(crate) async fn serve(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    cluster: Option<tokio::sync::watch::Receiver<bool>>,
    draining: CancellationToken,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let app = Router::new()
        .route(
            "/metrics",
            get(move |headers: axum::http::HeaderMap| {
                let metrics = metrics.clone();
                async move {
                    let accept = headers.get(header::ACCEPT).and_then(|a| a.to_str().ok());
                    if wants_text(accept) {
                        (
                            [(header::CONTENT_TYPE, PROMETHEUS_TEXT)],
                            metrics.encode_text(),
                        )
                            .into_response()
                    } else {
                        ([(header::CONTENT_TYPE, OPENMETRICS)], metrics.encode()).into_response()
                    }
                }
            }),
        )
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/readyz",
            get(move || {
                let up = cluster.as_ref().is_none_or(|c| *c.borrow());
                let draining = draining.is_cancelled();
                async move {
                    if draining {
                        (
                            axum::http::StatusCode::SERVICE_UNAVAILABLE,
                            "shutting down\n",
                        )
                            .into_response()
                    } else if up {
                        "ok\n".into_response()
                    } else {
                        "degraded: the NATS cluster is away; serving local subscribers only\n"
                            .into_response()
                    }
                }
            }),
        );
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scrapers_get_the_format_they_ask_for() {
        assert!(!wants_text(None));
        assert!(!wants_text(Some("*/*")));
        assert!(wants_text(Some("text/plain")));
        assert!(wants_text(Some("text/plain;version=0.0.4;q=1,*/*;q=0.1")));
        // Prometheus's own Accept: OpenMetrics first.
        assert!(!wants_text(Some(
            "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
        )));
    }

    #[test]
    fn text_format_names_counters_by_their_samples() {
        let metrics = Metrics::new();
        metrics.published.inc();
        let text = metrics.encode_text();
        assert!(
            text.contains("# TYPE signaling_envelopes_published_total counter\n"),
            "{text}"
        );
        assert!(
            text.contains("\nsignaling_envelopes_published_total 1\n"),
            "{text}"
        );
        assert!(
            text.contains("# TYPE signaling_build_info gauge\n"),
            "{text}"
        );
        assert!(text.contains(&format!(
            "signaling_build_info{{version=\"{}\"}} 1\n",
            env!("CARGO_PKG_VERSION")
        )));
        assert!(
            text.contains("# TYPE process_cpu_seconds_total counter\n"),
            "{text}"
        );
        assert!(text.contains("process_resident_memory_bytes "), "{text}");
        assert!(!text.contains("# EOF"));
        let om = metrics.encode();
        assert!(om.ends_with("# EOF\n"));
    }

    #[test]
    fn counters_with_known_labels_start_at_zero() {
        let text = Metrics::new().encode();
        for (name, label, values) in [
            (
                "signaling_requests_rejected_total",
                "reason",
                REJECT_REASONS,
            ),
            ("signaling_subscribers_cut_total", "reason", CUT_REASONS),
            ("signaling_calls_ended_total", "reason", CALL_END_REASONS),
            (
                "signaling_connections_refused_total",
                "reason",
                CONNECTION_REFUSED_REASONS,
            ),
            (
                "signaling_connections_closed_total",
                "reason",
                CONNECTION_CLOSED_REASONS,
            ),
            (
                "signaling_cluster_dropped_total",
                "reason",
                CLUSTER_DROP_REASONS,
            ),
            ("signaling_auth_total", "result", AUTH_RESULTS),
        ] {
            for value in values {
                let line = format!("{name}{{{label}=\"{value}\"}} 0\n");
                assert!(text.contains(&line), "no {line} in\n{text}");
            }
        }
    }
}
