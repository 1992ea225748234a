//! `grpc.health.v1.Health`: tonic-health's service, with watch streams that
//! end at shutdown (after showing NOT_SERVING) instead of holding it up, and
//! after their lifetime (`--health-watch-lifetime`) in any case: a watcher
//! opens another, and nobody holds a watch slot for ever.

use std::{pin::Pin, sync::Arc, time::Duration};

use futures::{FutureExt as _, Stream, StreamExt as _};
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;
use tonic::{Request, Response, Status};
use tonic_health::{
    pb::{HealthCheckRequest, HealthCheckResponse, health_server::Health},
    server::{HealthReporter, HealthService},
};

/// The health service; `stopped` is cancelled once the statuses say
/// NOT_SERVING.
pub(crate) struct StoppingHealth {
    inner: HealthService,
    stopped: CancellationToken,
    /// How long a watch stream lasts.
    lifetime: Duration,
    metrics: Arc<Metrics>,
}

impl StoppingHealth {
    pub(crate) fn new(
        reporter: HealthReporter,
        stopped: CancellationToken,
        lifetime: Duration,
        metrics: Arc<Metrics>,
    ) -> Self {
        StoppingHealth {
            inner: HealthService::from_health_reporter(reporter),
            stopped,
            lifetime,
            metrics,
        }
    }
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<HealthCheckResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Health for StoppingHealth {
    async fn check(
        &self,
        request: Request<HealthCheckRequest>,
    ) -> Result<Response<HealthCheckResponse>, Status> {
        self.inner.check(request).await
    }

    type WatchStream = WatchStream;

    async fn watch(
        &self,
        request: Request<HealthCheckRequest>,
    ) -> Result<Response<WatchStream>, Status> {
        let inner = self.inner.watch(request).await?.into_inner();
        let stopped = self.stopped.clone();
        let end = tokio::time::Instant::now() + self.lifetime;
        let metrics = self.metrics.clone();
        let stream = futures::stream::unfold(Box::pin(inner), move |mut inner| {
            let (stopped, metrics) = (stopped.clone(), metrics.clone());
            async move {
                if !stopped.is_cancelled() {
                    tokio::select! {
                        item = inner.next() => return Some((item?, inner)),
                        _ = stopped.cancelled() => {}
                        _ = tokio::time::sleep_until(end) => {
                            // Its time is up: the stream ends (OK).
                            metrics.count(crate::refusal::CallEnded::HealthWatchLifetime);
                            return None;
                        }
                    }
                }
                // Stopping: what the stream already holds (NOT_SERVING), then the end.
                let item = inner.next().now_or_never().flatten()?;
                Some((item, inner))
            }
        });
        Ok(Response::new(Box::pin(stream)))
    }
}
