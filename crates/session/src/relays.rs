//! STUN/TURN servers from a signaling server's `RelayRegistry` (docs/PROTOCOL.md §7).

use std::{
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use async_trait::async_trait;
use cunicu_signal::{
    BackendError, PrivateKey,
    backend::grpc::{GrpcOptions, ServerAuth, channel_for},
    proto::method::GET_RELAYS,
    proto::signaling::{
        GetRelaysParams, RelayInfo, relay_registry_client::RelayRegistryClient,
        signaling_client::SignalingClient,
    },
};

use crate::{
    agent::{AgentError, AgentParams, IceAgent, IceAgentFactory},
    webrtc::{IceOptions, IceServer, WebrtcIce},
};

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
    /// The ICE agent cannot take the relays (or another of its options).
    #[error(transparent)]
    Ice(#[from] AgentError),
}

/// The relays of one signaling server and when the first of their
/// credentials expires.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Relays {
    /// The relays as the ICE agent takes them.
    pub servers: Vec<IceServer>,
    /// The earliest expiry of their credentials (TURN REST API credentials
    /// made from a shared secret); `None` if none expires.
    pub expires: Option<SystemTime>,
}

/// Asks the signaling server of `url` (`grpc://HOST:PORT?...`, secured as the
/// backend of that URL would be) for its STUN/TURN relays for our key `ours`
/// (private: a server may ask for proof that we hold it, docs/PROTOCOL.md §11).
pub async fn relays_from_server(
    url: &str,
    ours: &PrivateKey,
    limit: Duration,
) -> Result<Vec<IceServer>, RelayError> {
    Ok(fetch_relays(url, ours, limit).await?.servers)
}

/// Like [`relays_from_server`], with the expiry of the credentials.
pub async fn fetch_relays(
    url: &str,
    ours: &PrivateKey,
    limit: Duration,
) -> Result<Relays, RelayError> {
    let parsed = url::Url::parse(url).map_err(|e| BackendError::url(url, e))?;
    let options = GrpcOptions::default();
    let channel = channel_for(&parsed, &options)?;
    let auth = ServerAuth::for_url(&parsed, &options)?;
    let mut request = tonic::Request::new(GetRelaysParams {
        public_key: ours.public_key().as_bytes().to_vec(),
    });
    let signaling = SignalingClient::new(channel.clone());
    let prove = auth.prove(url, &signaling, &mut request, ours, GET_RELAYS);
    match tokio::time::timeout(limit, prove).await {
        Ok(result) => result?,
        Err(_) => {
            return Err(RelayError::Timeout {
                url: url.to_string(),
                limit,
            });
        }
    }
    let mut client = RelayRegistryClient::new(channel);
    let call = client.get_relays(request);
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
    Ok(Relays {
        servers: response.relays.iter().map(ice_server).collect(),
        expires: response.relays.iter().filter_map(expiry).min(),
    })
}

/// A relay as the ICE agent takes it. The expiry is not checked here (see
/// [`ServerRelayIce`]).
pub fn ice_server(relay: &RelayInfo) -> IceServer {
    IceServer::with_credentials(&relay.url, &relay.username, &relay.password)
}

/// When the credentials of `relay` expire. A timestamp at or before the
/// UNIX epoch counts as none (a zero timestamp is an unset one).
fn expiry(relay: &RelayInfo) -> Option<SystemTime> {
    let t = relay.expires.as_ref()?;
    let seconds = u64::try_from(t.seconds).ok().filter(|s| *s > 0)?;
    let nanos = u32::try_from(t.nanos).unwrap_or(0).min(999_999_999);
    Some(UNIX_EPOCH + Duration::new(seconds, nanos))
}

/// Relays are fetched again when their credentials expire within this.
pub const RELAY_REFRESH_MARGIN: Duration = Duration::from_secs(60);

/// Time limit of fetching the relays again before an agent is made (all
/// servers together): short, since the agent waits for it.
pub const RELAY_REFRESH_TIMEOUT: Duration = Duration::from_secs(3);

/// True if relays expiring at `expires` must be fetched again at `now`.
fn needs_refresh(expires: Option<SystemTime>, now: SystemTime) -> bool {
    expires.is_some_and(|at| at <= now + RELAY_REFRESH_MARGIN)
}

/// An [`IceAgentFactory`]: [`WebrtcIce`] agents with the given options plus
/// the relays that signaling servers hand out (`RelayRegistry.GetRelays`).
///
/// The relays are fetched when this is made. Credentials made from a shared
/// secret expire (after 1 h by default): before each agent is made, the
/// relays of a server whose credentials expire within
/// [`RELAY_REFRESH_MARGIN`] are fetched again, within
/// [`RELAY_REFRESH_TIMEOUT`]. If that fails, the agent gets the relays
/// fetched before (a warning is logged), and the next agent tries again.
/// Relays without an expiry are fetched once.
pub struct ServerRelayIce {
    options: IceOptions,
    /// Our private key, to prove it to servers that ask.
    ours: PrivateKey,
    cache: tokio::sync::Mutex<Cache>,
}

struct Cache {
    /// Per signaling server: its URL and its relays as last fetched.
    sources: Vec<(String, Relays)>,
    /// The factory for the options and the relays of `sources`.
    ice: WebrtcIce,
    /// Successful fetches, the first ones included.
    fetches: u64,
}

impl std::fmt::Debug for ServerRelayIce {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerRelayIce")
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

impl ServerRelayIce {
    /// Fetches the relays of the signaling servers at `urls` (`grpc://`),
    /// each within `limit`, for our key `ours` (private, to prove it to a
    /// server that asks); agents get `options` and these relays. Fails if a
    /// server does not answer or a relay cannot be used.
    pub async fn fetch(
        options: IceOptions,
        urls: impl IntoIterator<Item = impl Into<String>>,
        ours: PrivateKey,
        limit: Duration,
    ) -> Result<Self, RelayError> {
        let mut sources = Vec::new();
        for url in urls {
            let url = url.into();
            let relays = fetch_relays(&url, &ours, limit).await?;
            sources.push((url, relays));
        }
        let fetches = sources.len() as u64;
        let ice = WebrtcIce::new(with_relays(&options, &sources))?;
        Ok(ServerRelayIce {
            options,
            ours,
            cache: tokio::sync::Mutex::new(Cache {
                sources,
                ice,
                fetches,
            }),
        })
    }

    /// The relays of each signaling server, as last fetched.
    pub async fn relays(&self) -> Vec<(String, Relays)> {
        self.cache.lock().await.sources.clone()
    }

    /// How many times relays were fetched successfully (the first time
    /// included).
    pub async fn fetches(&self) -> u64 {
        self.cache.lock().await.fetches
    }

    /// The factory for the next agent, with relays fetched again if needed.
    async fn current(&self) -> WebrtcIce {
        let mut cache = self.cache.lock().await;
        let now = SystemTime::now();
        if !cache
            .sources
            .iter()
            .any(|(_, relays)| needs_refresh(relays.expires, now))
        {
            return cache.ice.clone();
        }
        let ours = &self.ours;
        let cache = &mut *cache;
        let sources = &mut cache.sources;
        let fetches = &mut cache.fetches;
        let refresh = async {
            for (url, relays) in sources.iter_mut() {
                if !needs_refresh(relays.expires, now) {
                    continue;
                }
                match fetch_relays(url, ours, RELAY_REFRESH_TIMEOUT).await {
                    Ok(fresh) => {
                        tracing::debug!(%url, relays = fresh.servers.len(), "relays fetched again");
                        *relays = fresh;
                        *fetches += 1;
                    }
                    Err(e) => tracing::warn!("{e}; the relays fetched before are used"),
                }
            }
        };
        if tokio::time::timeout(RELAY_REFRESH_TIMEOUT, refresh)
            .await
            .is_err()
        {
            tracing::warn!(
                "fetching the relays again took over {RELAY_REFRESH_TIMEOUT:?}; \
                 the relays fetched before are used"
            );
        }
        match WebrtcIce::new(with_relays(&self.options, &cache.sources)) {
            Ok(ice) => cache.ice = ice,
            Err(e) => tracing::warn!("{e}; the relays fetched before are used"),
        }
        cache.ice.clone()
    }
}

fn with_relays(options: &IceOptions, sources: &[(String, Relays)]) -> IceOptions {
    options.clone().with_servers(
        sources
            .iter()
            .flat_map(|(_, relays)| relays.servers.iter().cloned()),
    )
}

#[async_trait]
impl IceAgentFactory for ServerRelayIce {
    async fn create(&self, params: AgentParams) -> Result<Arc<dyn IceAgent>, AgentError> {
        self.current().await.create(params).await
    }
}

#[cfg(test)]
mod tests {
    use cunicu_signal::proto::Timestamp;

    use super::*;

    #[test]
    fn relays_are_fetched_again_a_minute_before_they_expire() {
        let now = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        assert!(!needs_refresh(None, now));
        assert!(!needs_refresh(Some(now + Duration::from_secs(61)), now));
        assert!(needs_refresh(Some(now + Duration::from_secs(60)), now));
        assert!(needs_refresh(Some(now - Duration::from_secs(1)), now));
    }

    #[test]
    fn expiry_of_relay_info() {
        let info = |expires| RelayInfo {
            expires,
            ..Default::default()
        };
        assert_eq!(expiry(&info(None)), None);
        let zero = Timestamp {
            seconds: 0,
            nanos: 0,
        };
        assert_eq!(expiry(&info(Some(zero))), None);
        let t = Timestamp {
            seconds: 1_700_007_200,
            nanos: 0,
        };
        assert_eq!(
            expiry(&info(Some(t))),
            Some(UNIX_EPOCH + Duration::from_secs(1_700_007_200))
        );
    }
}
