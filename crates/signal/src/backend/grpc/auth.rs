//! Proofs of key possession for one server: its key, pinned or learned.

use std::{sync::Arc, time::Duration};

use parking_lot::Mutex;
use tonic::{Request, Status, transport::Channel};

use super::BackendError;

use super::{
    error::{GrpcError, connection_problem},
    target::{GrpcOptions, GrpcTarget},
};

use crate::{
    Key, PrivateKey,
    auth::{PROOF_METADATA, SERVER_KEY_METADATA},
    proto::signaling::signaling_client::SignalingClient,
};

/// Proofs of key possession for one server (docs/PROTOCOL.md §11). The server's key is
/// pinned (`server_key=` in the URL) or learned from `GetBuildInfo`'s
/// `cunicu-server-key` metadata the first time a proof is needed; a server
/// that presents no key asks for no proofs. Cheap to clone.
#[derive(Debug, Clone)]
pub struct ServerAuth {
    pinned: Option<Key>,
    /// `Some(None)`: the server has no key.
    learned: Arc<Mutex<Option<Option<Key>>>>,
    /// Held while one call learns the key: the others wait for it instead
    /// of each asking (a backend subscribing many keys at once would
    /// otherwise send as many GetBuildInfo calls, which a server limits).
    learning: Arc<tokio::sync::Mutex<()>>,
    timeout: Duration,
}

impl ServerAuth {
    /// Proofs to the server of `pinned` if given, else to whatever key the
    /// server presents; `timeout` bounds learning it.
    pub fn new(pinned: Option<Key>, timeout: Duration) -> Self {
        ServerAuth {
            pinned,
            learned: Arc::new(Mutex::new(None)),
            learning: Arc::new(tokio::sync::Mutex::new(())),
            timeout,
        }
    }

    /// For the server of a `grpc://` URL (its `server_key=`, if any).
    pub fn for_url(url: &url::Url, options: &GrpcOptions) -> Result<Self, BackendError> {
        Ok(Self::new(
            GrpcTarget::parse(url)?.server_key,
            options.subscribe_timeout,
        ))
    }

    /// The server's key: learned once through `GetBuildInfo` on `client`'s
    /// channel, and checked against the pinned one.
    pub(super) async fn server_key(
        &self,
        client: &SignalingClient<Channel>,
    ) -> Result<Option<Key>, GrpcError> {
        if let Some(known) = *self.learned.lock() {
            return Ok(known);
        }
        let _learning = self.learning.lock().await;
        // Learned by the call that held the lock before.
        if let Some(known) = *self.learned.lock() {
            return Ok(known);
        }
        let mut client = client.clone();
        let response =
            tokio::time::timeout(self.timeout, client.get_build_info(crate::proto::Empty {}))
                .await
                .map_err(|_| GrpcError::Timeout {
                    what: "learning the server's key",
                    timeout: self.timeout,
                })?
                .map_err(|status| GrpcError::Status {
                    // A connection that failed was not about the key.
                    what: match connection_problem(&status) {
                        Some(_) => "connecting",
                        None => "learning the server's key",
                    },
                    status,
                })?;
        let presented = match response.metadata().get(SERVER_KEY_METADATA) {
            None => None,
            Some(value) => Some(
                value
                    .to_str()
                    .ok()
                    .and_then(|v| v.parse::<Key>().ok())
                    .ok_or_else(|| GrpcError::BadServerKey(format!("{value:?}")))?,
            ),
        };
        if let Some(pinned) = self.pinned
            && presented != Some(pinned)
        {
            return Err(GrpcError::OtherServerKey { pinned, presented });
        }
        *self.learned.lock() = Some(presented);
        Ok(presented)
    }

    /// Adds to `request` a proof that we hold `ours` (a private key) for
    /// `method`, if the server has a key. `url` names the server in errors.
    pub async fn prove<T>(
        &self,
        url: &str,
        client: &SignalingClient<Channel>,
        request: &mut Request<T>,
        ours: &PrivateKey,
        method: &str,
    ) -> Result<(), BackendError> {
        self.add_proof(client, request, ours, method)
            .await
            .map_err(|e| BackendError::transport(url, e))
    }

    pub(super) async fn add_proof<T>(
        &self,
        client: &SignalingClient<Channel>,
        request: &mut Request<T>,
        ours: &PrivateKey,
        method: &str,
    ) -> Result<(), GrpcError> {
        let Some(server) = self.server_key(client).await? else {
            return Ok(());
        };
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let proof = crate::auth::prove(ours, &server, method, now).map_err(GrpcError::Proof)?;
        request.metadata_mut().insert_bin(
            PROOF_METADATA,
            tonic::metadata::MetadataValue::from_bytes(&proof),
        );
        Ok(())
    }

    /// After a refused proof: learn the key again next time (unless pinned),
    /// in case the server's changed.
    pub(super) fn refused(&self, status: &Status) {
        if status.code() == tonic::Code::Unauthenticated && self.pinned.is_none() {
            *self.learned.lock() = None;
        }
    }
}
