//! `grpc.health.v1.Health`: tonic-health's service, with watch streams that
//! end at shutdown (after showing NOT_SERVING) instead of holding it up.

use std::pin::Pin;

use futures::{FutureExt as _, Stream, StreamExt as _};
use tokio_util::sync::CancellationToken;
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
}

impl StoppingHealth {
    pub(crate) fn new(reporter: HealthReporter, stopped: CancellationToken) -> Self {
        StoppingHealth {
            inner: HealthService::from_health_reporter(reporter),
            stopped,
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
        let stream = futures::stream::unfold(Box::pin(inner), move |mut inner| {
            let stopped = stopped.clone();
            async move {
                if !stopped.is_cancelled() {
                    tokio::select! {
                        item = inner.next() => return Some((item?, inner)),
                        _ = stopped.cancelled() => {}
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
