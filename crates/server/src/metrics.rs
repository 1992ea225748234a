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
    /// `queue_full`, `no_subscriber`, `invalid_key`, `oversize`, `too_many_subscriptions`,
    /// `too_many_client_subscriptions`.
    pub reason: &'static str,
}

/// Label of the RPC duration histogram.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Method {
    /// The gRPC method name, e.g. `Publish`.
    pub method: &'static str,
}

type HistogramFamily = Family<Method, Histogram, fn() -> Histogram>;

/// The server's counters, gauges and histograms. Cheap to share.
pub struct Metrics {
    /// Envelopes accepted by Publish.
    pub published: Counter,
    /// Envelopes written to subscription streams.
    pub delivered: Counter,
    /// Envelopes dropped, by reason (`queue_full`, `no_subscriber`).
    pub dropped: Family<Reason, Counter>,
    /// `dropped` for `queue_full`, looked up once (it counts on the fan-out path).
    pub queue_full: Counter,
    /// `dropped` for `no_subscriber`.
    pub no_subscriber: Counter,
    /// Requests refused, by reason (`invalid_key`, `oversize`, `too_many_subscriptions`,
    /// `too_many_client_subscriptions`).
    pub rejected: Family<Reason, Counter>,
    /// Open subscription streams.
    pub subscriptions: Gauge,
    /// Keys with at least one subscription stream.
    pub topics: Gauge,
    /// Duration of unary RPCs; for Subscribe, the time until the stream is set up.
    pub rpc_duration: HistogramFamily,
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
        let subscriptions = Gauge::default();
        let topics = Gauge::default();
        let rpc_duration = HistogramFamily::new_with_constructor(rpc_histogram);
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
            "Envelopes dropped: queue_full (a slow subscriber lost its oldest envelope) or no_subscriber",
            dropped.clone(),
        );
        registry.register(
            "signaling_requests_rejected",
            "Requests refused: invalid_key, oversize, too_many_subscriptions \
             or too_many_client_subscriptions",
            rejected.clone(),
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
            "signaling_rpc_duration_seconds",
            "Duration of RPCs by method; for Subscribe, until the stream is set up",
            rpc_duration.clone(),
        );
        // Both drop reasons show from the start, at 0.
        let queue_full = dropped
            .get_or_create(&Reason {
                reason: "queue_full",
            })
            .clone();
        let no_subscriber = dropped
            .get_or_create(&Reason {
                reason: "no_subscriber",
            })
            .clone();
        Arc::new(Metrics {
            published,
            delivered,
            dropped,
            queue_full,
            no_subscriber,
            rejected,
            subscriptions,
            topics,
            rpc_duration,
            registry,
        })
    }

    /// Counts a refused request.
    pub fn reject_for(&self, reason: &'static str) {
        self.rejected.get_or_create(&Reason { reason }).inc();
    }

    /// Starts timing a call of `method`; the time is recorded when the guard drops.
    pub fn time(&self, method: &'static str) -> RpcTimer<'_> {
        RpcTimer {
            metrics: self,
            method,
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
pub struct RpcTimer<'a> {
    metrics: &'a Metrics,
    method: &'static str,
    start: Instant,
}

impl Drop for RpcTimer<'_> {
    fn drop(&mut self) {
        self.metrics
            .rpc_duration
            .get_or_create(&Method {
                method: self.method,
            })
            .observe(self.start.elapsed().as_secs_f64());
    }
}

/// Serves `/metrics` and `/healthz` on `listener` until `shutdown`.
pub(crate) async fn serve(
    listener: TcpListener,
    metrics: Arc<Metrics>,
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
        .route("/healthz", get(|| async { "ok\n" }));
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
}
