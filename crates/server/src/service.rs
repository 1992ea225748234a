//! `cunicu.signaling.RelayRegistry`, served through tonic ([`crate::bridge`]).
//! (`cunicu.signaling.Signaling` is the connection task's own:
//! [`crate::signaling`].)

use std::{sync::Arc, time::SystemTime};

use cunicu_signal::{
    Key,
    proto::signaling::{GetRelaysParams, GetRelaysResp, relay_registry_server::RelayRegistry},
};
use tonic::{Request, Response, Status};

use crate::{auth::Auth, client::Client, metrics::Metrics, refusal::key_field, relay::Relay};

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
        let key = key_field("public", &request.get_ref().public_key)
            .map(Key::from)
            .map_err(|refused| self.metrics.refuse(refused))?;
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
