//! STUN/TURN servers from a signaling server's `RelayRegistry` (SPEC §7).

use std::time::Duration;

use cunicu_signal::{
    BackendError, Key,
    backend::grpc::{GrpcOptions, channel_for},
    proto::signaling::{GetRelaysParams, RelayInfo, relay_registry_client::RelayRegistryClient},
};

use crate::webrtc::IceServer;

/// Why the relays could not be fetched.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RelayError {
    /// The URL is not a usable `grpc://` URL.
    #[error(transparent)]
    Url(#[from] BackendError),
    /// The server answered with an error.
    #[error("GetRelays at {url}: {source}")]
    Call {
        /// The server's URL.
        url: String,
        /// The gRPC status.
        #[source]
        source: tonic::Status,
    },
    /// The server did not answer in time.
    #[error("GetRelays at {url}: no answer within {limit:?}")]
    Timeout {
        /// The server's URL.
        url: String,
        /// The time limit.
        limit: Duration,
    },
}

/// Asks the signaling server of `url` (`grpc://HOST:PORT?...`, secured as the
/// backend of that URL would be) for its STUN/TURN relays for our public key.
pub async fn relays_from_server(
    url: &str,
    our_public: &Key,
    limit: Duration,
) -> Result<Vec<IceServer>, RelayError> {
    let parsed = url::Url::parse(url).map_err(|e| BackendError::url(url, e))?;
    let options = GrpcOptions::default();
    let channel = channel_for(&parsed, &options)?;
    let mut client = RelayRegistryClient::new(channel);
    let call = client.get_relays(GetRelaysParams {
        public_key: our_public.as_bytes().to_vec(),
    });
    let response = match tokio::time::timeout(limit, call).await {
        Ok(Ok(response)) => response.into_inner(),
        Ok(Err(source)) => {
            return Err(RelayError::Call {
                url: url.to_string(),
                source,
            });
        }
        Err(_) => {
            return Err(RelayError::Timeout {
                url: url.to_string(),
                limit,
            });
        }
    };
    Ok(response.relays.iter().map(ice_server).collect())
}

/// A relay as the ICE agent takes it. The expiry is not checked here: a
/// session fetches the relays when it starts.
pub fn ice_server(relay: &RelayInfo) -> IceServer {
    IceServer::with_credentials(&relay.url, &relay.username, &relay.password)
}
