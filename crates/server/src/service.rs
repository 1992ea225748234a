//! The gRPC services: `cunicu.signaling.Signaling` and `cunicu.signaling.RelayRegistry`.

use std::{pin::Pin, sync::Arc, time::SystemTime};

use cunicu_signal::{
    Key,
    proto::{
        BuildInfo, Empty, Timestamp,
        signaling::{
            Envelope, GetRelaysParams, GetRelaysResp, SubscribeParams,
            relay_registry_server::RelayRegistry, signaling_server::Signaling,
        },
    },
};
use futures::Stream;
use prost::Message as _;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use crate::{
    hub::{Client, Hub, TooManySubscriptions},
    metrics::Metrics,
    relay::Relay,
};

/// The version, commit and build date of this server.
pub fn build_info() -> BuildInfo {
    BuildInfo {
        version: env!("CARGO_PKG_VERSION").to_string(),
        date: Some(Timestamp {
            seconds: env!("CUNICU_SIGNAL_BUILD_DATE").parse().unwrap_or(0),
            nanos: 0,
        }),
        commit: env!("CUNICU_SIGNAL_GIT_COMMIT").to_string(),
        tag: env!("CUNICU_SIGNAL_GIT_TAG").to_string(),
        branch: env!("CUNICU_SIGNAL_GIT_BRANCH").to_string(),
        built_by: "cargo".to_string(),
        os: std::env::consts::OS.to_string(),
        arch: std::env::consts::ARCH.to_string(),
        dirty: env!("CUNICU_SIGNAL_GIT_DIRTY") == "true",
    }
}

/// A key field checked to be 32 bytes; counts and explains a refusal.
fn key_field(metrics: &Metrics, field: &str, bytes: &[u8]) -> Result<[u8; 32], Status> {
    <[u8; 32]>::try_from(bytes).map_err(|_| {
        metrics.reject_for("invalid_key");
        Status::invalid_argument(format!("{field} key is {} bytes, expected 32", bytes.len()))
    })
}

/// `cunicu.signaling.Signaling`.
pub struct SignalingService {
    pub(crate) hub: Hub,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) max_envelope_size: usize,
    pub(crate) shutdown: CancellationToken,
}

type EnvelopeStream = Pin<Box<dyn Stream<Item = Result<Envelope, Status>> + Send>>;

#[tonic::async_trait]
impl Signaling for SignalingService {
    async fn get_build_info(&self, _: Request<Empty>) -> Result<Response<BuildInfo>, Status> {
        let _timer = self.metrics.time("GetBuildInfo");
        Ok(Response::new(build_info()))
    }

    type SubscribeStream = EnvelopeStream;

    async fn subscribe(
        &self,
        request: Request<SubscribeParams>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        let _timer = self.metrics.time("Subscribe");
        let key = key_field(&self.metrics, "subscription", &request.get_ref().key)?;
        let client = request.remote_addr().map(|addr| Client::of(addr.ip()));
        let subscription = self.hub.subscribe(key, client).map_err(|e| {
            // Counted, not logged: a full server would log every retry.
            self.metrics.reject_for(match e {
                TooManySubscriptions::Server(_) => "too_many_subscriptions",
                TooManySubscriptions::Client { .. } => "too_many_client_subscriptions",
            });
            tracing::debug!("subscription refused: {e}");
            Status::resource_exhausted(e.to_string())
        })?;
        tracing::debug!(key = %Key::from(key), "subscribed");
        let shutdown = self.shutdown.clone();
        // The empty envelope first: it tells the client the subscription exists.
        let sync = futures::stream::once(async { Ok(Envelope::default()) });
        let envelopes = futures::stream::unfold(subscription, move |subscription| {
            let shutdown = shutdown.clone();
            async move {
                tokio::select! {
                    biased;
                    // Ends the stream (status OK) so that shutdown can complete.
                    _ = shutdown.cancelled() => None,
                    envelope = subscription.next() => Some((Ok(envelope), subscription)),
                }
            }
        });
        Ok(Response::new(Box::pin(futures::StreamExt::chain(
            sync, envelopes,
        ))))
    }

    async fn publish(&self, request: Request<Envelope>) -> Result<Response<Empty>, Status> {
        let _timer = self.metrics.time("Publish");
        let envelope = request.into_inner();
        let size = envelope.encoded_len();
        if size > self.max_envelope_size {
            self.metrics.reject_for("oversize");
            return Err(Status::resource_exhausted(format!(
                "envelope is {size} bytes, the limit is {}",
                self.max_envelope_size
            )));
        }
        key_field(&self.metrics, "sender", &envelope.sender)?;
        let recipient = key_field(&self.metrics, "recipient", &envelope.recipient)?;
        self.metrics.published.inc();
        if self.hub.publish(&recipient, envelope) == 0 {
            self.metrics.no_subscriber.inc();
        }
        Ok(Response::new(Empty {}))
    }
}

/// `cunicu.signaling.RelayRegistry`.
pub struct RelayService {
    pub(crate) relays: Arc<[Relay]>,
    pub(crate) metrics: Arc<Metrics>,
}

#[tonic::async_trait]
impl RelayRegistry for RelayService {
    async fn get_relays(
        &self,
        request: Request<GetRelaysParams>,
    ) -> Result<Response<GetRelaysResp>, Status> {
        let _timer = self.metrics.time("GetRelays");
        let key = Key::from(key_field(
            &self.metrics,
            "public",
            &request.get_ref().public_key,
        )?);
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let relays = self.relays.iter().map(|r| r.info_for(&key, now)).collect();
        Ok(Response::new(GetRelaysResp { relays }))
    }
}
