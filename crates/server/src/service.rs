//! The services tonic serves: `cunicu.signaling.Signaling` (GetBuildInfo;
//! Subscribe and Publish are the connection task's, see [`crate::conn`]) and
//! `cunicu.signaling.RelayRegistry`.

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
use tonic::{Request, Response, Status};

use crate::{auth::Auth, client::Client, conn::key_field, metrics::Metrics, relay::Relay};

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

/// `cunicu.signaling.Signaling`.
pub struct SignalingService {
    pub(crate) metrics: Arc<Metrics>,
}

type EnvelopeStream = Pin<Box<dyn Stream<Item = Result<Envelope, Status>> + Send>>;

#[tonic::async_trait]
impl Signaling for SignalingService {
    async fn get_build_info(&self, _: Request<Empty>) -> Result<Response<BuildInfo>, Status> {
        let _timer = self.metrics.time("GetBuildInfo");
        Ok(Response::new(build_info()))
    }

    type SubscribeStream = EnvelopeStream;

    // Never called: the connection task serves these paths itself.
    async fn subscribe(
        &self,
        _: Request<SubscribeParams>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        Err(Status::internal("Subscribe is served by the connection"))
    }

    async fn publish(&self, _: Request<Envelope>) -> Result<Response<Empty>, Status> {
        Err(Status::internal("Publish is served by the connection"))
    }
}

/// `cunicu.signaling.RelayRegistry`.
pub struct RelayService {
    pub(crate) relays: Arc<[Relay]>,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) auth: Arc<Auth>,
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
        // The connection put its client there (see `bridge`).
        let client = request
            .extensions()
            .get::<Client>()
            .copied()
            .ok_or_else(|| Status::internal("the call came without its client"))?;
        self.auth.check(
            request.metadata().as_ref(),
            cunicu_signal::proto::method::GET_RELAYS,
            &key,
            client,
        )?;
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let relays = self.relays.iter().map(|r| r.info_for(&key, now)).collect();
        Ok(Response::new(GetRelaysResp { relays }))
    }
}
