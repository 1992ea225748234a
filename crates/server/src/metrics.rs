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
    registry::{Metric, Registry},
};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::refusal;

/// Label of the counters that count by reason.
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
type ReasonFamily = Family<Reason, Counter>;

/// The server's counters, gauges and histograms. Cheap to share.
///
/// A client's address is never a label (it would let clients grow the
/// metrics without bound); the logs name it. Each metric is named once, in
/// [`Metrics::new`]; the reasons of the counters that count by reason are
/// the enums of the `refusal` module.
pub struct Metrics {
    /// Envelopes accepted by Publish.
    pub published: Counter,
    /// Envelopes written to subscription streams.
    pub delivered: Counter,
    /// Envelopes dropped, by reason.
    pub dropped: ReasonFamily,
    /// `dropped` for `queue_full`, looked up once (it is counted often).
    pub queue_full: Counter,
    /// `dropped` for `client_budget`.
    pub client_budget: Counter,
    /// `dropped` for `server_budget`.
    pub server_budget: Counter,
    /// `dropped` for `no_subscriber`.
    pub no_subscriber: Counter,
    /// Requests refused, by reason.
    pub rejected: ReasonFamily,
    /// Proofs of key possession, by result.
    pub auth: Family<AuthResult, Counter>,
    /// Subscription streams the server ended, by reason.
    pub subscribers_cut: ReasonFamily,
    /// Calls the server ended before they were done, by reason.
    pub calls_ended: ReasonFamily,
    /// Connections refused at accept, by reason.
    pub connections_refused: ReasonFamily,
    /// Connections the server closed, by reason.
    pub connections_closed: ReasonFamily,
    /// Open client connections.
    pub connections: Gauge,
    /// Clients (proven keys, addresses) with a connection open.
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
    pub cluster_dropped: ReasonFamily,
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

/// A reason a counter of [`Metrics`] counts by.
pub(crate) trait Counts: Copy + 'static {
    /// Every reason, shown at 0 from the start.
    const ALL: &'static [Self];
    /// The label value.
    fn label(self) -> &'static str;
    /// The counter that counts it.
    fn family(metrics: &Metrics) -> &ReasonFamily;
}

macro_rules! counted_by {
    ($($reason:ty => $family:ident,)+) => {
        $(
            impl Counts for $reason {
                const ALL: &'static [Self] = <$reason>::ALL;
                fn label(self) -> &'static str {
                    <$reason>::label(self)
                }
                fn family(metrics: &Metrics) -> &ReasonFamily {
                    &metrics.$family
                }
            }
        )+
    };
}

counted_by! {
    refusal::Rejected => rejected,
    refusal::ConnectionRefused => connections_refused,
    refusal::ConnectionClosed => connections_closed,
    refusal::CallEnded => calls_ended,
    refusal::Cut => subscribers_cut,
    refusal::Dropped => dropped,
    refusal::ClusterDropped => cluster_dropped,
}

/// Registers `metric` under `name` and hands it back.
fn add<M: Metric + Clone>(registry: &mut Registry, name: &str, help: &str, metric: M) -> M {
    registry.register(name, help, metric.clone());
    metric
}

/// A reason's help text: `intro`, then every label value.
fn with_reasons<R: Counts>(intro: &str) -> String {
    let labels: Vec<&str> = R::ALL.iter().map(|r| r.label()).collect();
    format!("{intro}: {}", labels.join(", "))
}

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
    /// Fresh metrics, registered under the names operators see, each
    /// reason's series at 0.
    pub fn new() -> Arc<Self> {
        use refusal::{
            CallEnded, ClusterDropped, ConnectionClosed, ConnectionRefused, Cut, Dropped, Rejected,
        };
        let mut registry = Registry::default();
        let r = &mut registry;
        let counter = Counter::default;
        let gauge = Gauge::default;
        let reasons = ReasonFamily::default;
        let dropped = add(
            r,
            "signaling_envelopes_dropped",
            &with_reasons::<Dropped>("Envelopes dropped"),
            reasons(),
        );
        let rpc_duration = add(
            r,
            "signaling_rpc_duration_seconds",
            "Duration of RPCs by method; for Subscribe, until the stream is set up",
            HistogramFamily::new_with_constructor(rpc_histogram),
        );
        let count_of = |reason: Dropped| {
            dropped
                .get_or_create(&Reason {
                    reason: reason.label(),
                })
                .clone()
        };
        let metrics = Metrics {
            published: add(
                r,
                "signaling_envelopes_published",
                "Envelopes accepted by Publish",
                counter(),
            ),
            delivered: add(
                r,
                "signaling_envelopes_delivered",
                "Envelopes written to subscription streams",
                counter(),
            ),
            queue_full: count_of(Dropped::QueueFull),
            client_budget: count_of(Dropped::ClientBudget),
            server_budget: count_of(Dropped::ServerBudget),
            no_subscriber: count_of(Dropped::NoSubscriber),
            rejected: add(
                r,
                "signaling_requests_rejected",
                &with_reasons::<Rejected>("Requests refused"),
                reasons(),
            ),
            auth: add(
                r,
                "signaling_auth",
                "Proofs of key possession checked, by result",
                Family::default(),
            ),
            subscribers_cut: add(
                r,
                "signaling_subscribers_cut",
                &with_reasons::<Cut>("Subscription streams the server ended"),
                reasons(),
            ),
            calls_ended: add(
                r,
                "signaling_calls_ended",
                &with_reasons::<CallEnded>("Calls the server ended before they were done"),
                reasons(),
            ),
            connections_refused: add(
                r,
                "signaling_connections_refused",
                &with_reasons::<ConnectionRefused>("Connections refused at accept"),
                reasons(),
            ),
            connections_closed: add(
                r,
                "signaling_connections_closed",
                &with_reasons::<ConnectionClosed>("Connections the server closed"),
                reasons(),
            ),
            connections: add(
                r,
                "signaling_connections",
                "Open client connections",
                gauge(),
            ),
            clients: add(
                r,
                "signaling_clients",
                "Clients (proven keys, addresses) with a connection open",
                gauge(),
            ),
            subscriptions: add(
                r,
                "signaling_subscriptions",
                "Open subscription streams",
                gauge(),
            ),
            topics: add(
                r,
                "signaling_topics",
                "Keys with at least one subscription stream",
                gauge(),
            ),
            queued_bytes: add(
                r,
                "signaling_queued_bytes",
                "Bytes held for clients: queued, in HTTP/2 send buffers, requests being received",
                gauge(),
            ),
            cluster_connected: add(
                r,
                "signaling_cluster_connected",
                "1 while connected to the NATS cluster (with --cluster), else 0",
                gauge(),
            ),
            cluster_subjects: add(
                r,
                "signaling_cluster_subjects",
                "Keys with a NATS subscription: those with local subscribers",
                gauge(),
            ),
            cluster_published: add(
                r,
                "signaling_cluster_published",
                "Envelopes handed to NATS for the other replicas",
                counter(),
            ),
            cluster_received: add(
                r,
                "signaling_cluster_received",
                "Envelopes received from other replicas",
                counter(),
            ),
            cluster_dropped: add(
                r,
                "signaling_cluster_dropped",
                &with_reasons::<ClusterDropped>("Envelopes not sent to or not taken from NATS"),
                reasons(),
            ),
            cluster_unconfirmed: add(
                r,
                "signaling_cluster_unconfirmed",
                "Keys' NATS subscriptions whose round trip to NATS did not come back within 2 s \
                 (the Subscribe's sync went without it)",
                counter(),
            ),
            memory_bound: add(
                r,
                "signaling_memory_bound_bytes",
                "The memory the server can hold with every limit reached at once (the worst case)",
                gauge(),
            ),
            hot_rpcs: ["Publish", "Subscribe"].map(|method| {
                (
                    method,
                    rpc_duration.get_or_create(&Method { method }).clone(),
                )
            }),
            rpc_duration,
            dropped,
            registry: {
                register_operator_metrics(r);
                registry
            },
        };
        metrics.at_zero::<Rejected>();
        metrics.at_zero::<ConnectionRefused>();
        metrics.at_zero::<ConnectionClosed>();
        metrics.at_zero::<CallEnded>();
        metrics.at_zero::<Cut>();
        metrics.at_zero::<Dropped>();
        metrics.at_zero::<ClusterDropped>();
        for &result in refusal::AuthResult::ALL {
            drop(metrics.auth.get_or_create(&AuthResult {
                result: result.label(),
            }));
        }
        Arc::new(metrics)
    }

    /// Shows every reason of `R` at 0.
    fn at_zero<R: Counts>(&self) {
        for &reason in R::ALL {
            drop(R::family(self).get_or_create(&Reason {
                reason: reason.label(),
            }));
        }
    }

    /// Counts one event of `reason` on the counter that counts it.
    pub(crate) fn count<R: Counts>(&self, reason: R) {
        R::family(self)
            .get_or_create(&Reason {
                reason: reason.label(),
            })
            .inc();
    }

    /// Counts a refusal on the counter its reason belongs to.
    pub(crate) fn count_refusal(&self, counted: refusal::Counted) {
        match counted {
            refusal::Counted::Request(reason) => self.count(reason),
            refusal::Counted::Connection(reason) => self.count(reason),
            refusal::Counted::Closed(reason) => self.count(reason),
        }
    }

    /// Counts a refused request and gives the status that answers it.
    pub(crate) fn refuse(&self, refusal: refusal::Refusal) -> tonic::Status {
        self.count_refusal(refusal.reason());
        refusal.status()
    }

    /// Counts a proof of key possession.
    pub(crate) fn count_auth(&self, result: refusal::AuthResult) {
        self.auth
            .get_or_create(&AuthResult {
                result: result.label(),
            })
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
        use refusal::{
            CallEnded, ClusterDropped, ConnectionClosed, ConnectionRefused, Cut, Dropped, Rejected,
        };
        fn labels<R: Counts>() -> Vec<&'static str> {
            R::ALL.iter().map(|r| r.label()).collect()
        }
        let text = Metrics::new().encode();
        for (name, label, values) in [
            (
                "signaling_requests_rejected_total",
                "reason",
                labels::<Rejected>(),
            ),
            ("signaling_subscribers_cut_total", "reason", labels::<Cut>()),
            (
                "signaling_calls_ended_total",
                "reason",
                labels::<CallEnded>(),
            ),
            (
                "signaling_connections_refused_total",
                "reason",
                labels::<ConnectionRefused>(),
            ),
            (
                "signaling_connections_closed_total",
                "reason",
                labels::<ConnectionClosed>(),
            ),
            (
                "signaling_envelopes_dropped_total",
                "reason",
                labels::<Dropped>(),
            ),
            (
                "signaling_cluster_dropped_total",
                "reason",
                labels::<ClusterDropped>(),
            ),
            (
                "signaling_auth_total",
                "result",
                refusal::AuthResult::ALL.iter().map(|r| r.label()).collect(),
            ),
        ] {
            for value in values {
                let line = format!("{name}{{{label}=\"{value}\"}} 0\n");
                assert!(text.contains(&line), "no {line} in\n{text}");
            }
        }
    }

    #[test]
    fn a_count_lands_on_its_reason() {
        let metrics = Metrics::new();
        metrics.count(refusal::Rejected::Malformed);
        metrics.count(refusal::Cut::Stalled);
        metrics.count_refusal(refusal::Counted::Closed(
            refusal::ConnectionClosed::Unproven,
        ));
        let text = metrics.encode();
        for line in [
            "signaling_requests_rejected_total{reason=\"malformed\"} 1\n",
            "signaling_subscribers_cut_total{reason=\"stalled\"} 1\n",
            "signaling_connections_closed_total{reason=\"unproven\"} 1\n",
            "signaling_requests_rejected_total{reason=\"oversize\"} 0\n",
        ] {
            assert!(text.contains(line), "no {line} in\n{text}");
        }
    }
}
