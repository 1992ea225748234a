//! The [`IceAgent`] on webrtc-ice 0.17 (pion's design, in Rust).
//!
//! mDNS is off (candidates carry IP addresses only). Gathering can be limited
//! to interfaces (by name) and to addresses; with either limit, loopback
//! addresses are gathered too when the limit allows them, so that tests can
//! keep every candidate on `127.0.0.1`. IPv6 link-local addresses are never
//! gathered: webrtc-ice 0.17 cannot bind them (it has no scope id).

use std::{fmt, io, net::IpAddr, sync::Arc, time::Duration};

use async_trait::async_trait;
use cunicu_signal::{
    Role,
    ice_url::{IceUrl, IceUrlError, IceUrlReason},
    proto::epdisc::{
        Candidate as ProtoCandidate, CandidateType as ProtoType, NetworkType as ProtoNetwork,
        RelatedAddress, RelayProtocol, TcpType as ProtoTcpType,
    },
};
use tokio::sync::mpsc;
use webrtc_ice::{
    agent::{Agent, agent_config::AgentConfig},
    candidate::{
        Candidate, CandidateType, candidate_base::CandidateBaseConfig,
        candidate_host::CandidateHostConfig,
        candidate_peer_reflexive::CandidatePeerReflexiveConfig,
        candidate_relay::CandidateRelayConfig,
        candidate_server_reflexive::CandidateServerReflexiveConfig,
    },
    mdns::MulticastDnsMode,
    network_type::NetworkType,
    state::ConnectionState,
    tcp_type::TcpType,
    url::Url,
};
use webrtc_util::Conn;

use crate::{
    agent::{
        AgentError, AgentEvent, AgentEvents, AgentParams, DatagramConn, IceAgent, IceAgentFactory,
        IceCredentials, IceState,
    },
    candidate::{self, ParsedCandidate},
};

/// A STUN or TURN server: `stun:HOST:PORT`, `turn:HOST:PORT?transport=udp`,
/// with credentials for TURN (URL rules: [`cunicu_signal::ice_url`]). `Debug`
/// hides the password.
#[derive(Clone, PartialEq, Eq)]
pub struct IceServer {
    /// The URL.
    pub url: String,
    /// TURN user name (empty for STUN).
    pub username: String,
    /// TURN password (empty for STUN).
    pub password: String,
}

impl IceServer {
    /// A server without credentials (STUN).
    pub fn new(url: impl Into<String>) -> Self {
        IceServer {
            url: url.into(),
            username: String::new(),
            password: String::new(),
        }
    }

    /// A server with credentials (TURN).
    pub fn with_credentials(
        url: impl Into<String>,
        username: impl Into<String>,
        password: impl Into<String>,
    ) -> Self {
        IceServer {
            url: url.into(),
            username: username.into(),
            password: password.into(),
        }
    }

    /// Checks the URL with the rules of `serve --relay` and `connect --stun`
    /// ([`IceUrl::parse_plain`]), then gives webrtc-ice its form of it with
    /// the credentials. Credentials go in [`username`](Self::username) and
    /// [`password`](Self::password), not in the URL (which `Debug` shows).
    fn to_url(&self) -> Result<Url, AgentError> {
        let invalid = |e: IceUrlError| AgentError::Option(e.to_string());
        let parsed = IceUrl::parse_plain(&self.url).map_err(invalid)?;
        if parsed.credentials.is_some() {
            return Err(invalid(IceUrlError::new(
                &self.url,
                IceUrlReason::Param {
                    name: "USER:PASS@".into(),
                    why: "give credentials as username and password, not in the URL".into(),
                },
            )));
        }
        let mut url = Url::parse_url(&parsed.to_string())
            .map_err(|e| AgentError::Option(format!("STUN/TURN URL {parsed}: {e}")))?;
        if !self.username.is_empty() {
            url.username = self.username.clone();
            url.password = self.password.clone();
        }
        Ok(url)
    }
}

impl fmt::Debug for IceServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IceServer")
            .field("url", &self.url)
            .field("username", &self.username)
            .field("password", &"***")
            .finish()
    }
}

/// Settings of the webrtc-ice agents.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct IceOptions {
    /// STUN/TURN servers. None by default: nothing is contacted that the user
    /// did not name.
    pub servers: Vec<IceServer>,
    /// Gather only on these interfaces (by name); all when empty.
    pub interfaces: Vec<String>,
    /// Gather only these local addresses; all when empty.
    pub addresses: Vec<IpAddr>,
    /// How long without an answer before the agent reports Disconnected.
    pub disconnected_timeout: Duration,
    /// How long without an answer before the agent reports Failed.
    pub failed_timeout: Duration,
    /// Interval of keepalives on the selected pair.
    pub keepalive_interval: Duration,
    /// Interval of connectivity checks.
    pub check_interval: Duration,
}

impl Default for IceOptions {
    /// webrtc-ice's (and pion's) timers: 5 s disconnected, 25 s failed, 2 s
    /// keepalive, 200 ms checks.
    fn default() -> Self {
        IceOptions {
            servers: Vec::new(),
            interfaces: Vec::new(),
            addresses: Vec::new(),
            disconnected_timeout: Duration::from_secs(5),
            failed_timeout: Duration::from_secs(25),
            keepalive_interval: Duration::from_secs(2),
            check_interval: Duration::from_millis(200),
        }
    }
}

impl IceOptions {
    /// Gathers only on `addresses` (loopback included if listed).
    pub fn only_addresses(mut self, addresses: impl IntoIterator<Item = IpAddr>) -> Self {
        self.addresses = addresses.into_iter().collect();
        self
    }

    /// Gathers only on the interfaces named.
    pub fn only_interfaces(mut self, interfaces: impl IntoIterator<Item = String>) -> Self {
        self.interfaces = interfaces.into_iter().collect();
        self
    }

    /// Adds STUN/TURN servers.
    pub fn with_servers(mut self, servers: impl IntoIterator<Item = IceServer>) -> Self {
        self.servers.extend(servers);
        self
    }

    /// Sets the agent's timers for disconnect and failure.
    pub fn with_timeouts(mut self, disconnected: Duration, failed: Duration) -> Self {
        self.disconnected_timeout = disconnected;
        self.failed_timeout = failed;
        self
    }
}

/// Makes webrtc-ice agents. `Debug` hides TURN passwords.
#[derive(Clone)]
pub struct WebrtcIce {
    options: IceOptions,
    /// The servers as webrtc-ice takes them; their `Debug` shows passwords.
    urls: Vec<Url>,
}

impl fmt::Debug for WebrtcIce {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The options hold the same servers, with passwords hidden.
        f.debug_struct("WebrtcIce")
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

impl WebrtcIce {
    /// A factory with `options`; fails on a STUN/TURN URL that does not parse.
    pub fn new(options: IceOptions) -> Result<Self, AgentError> {
        let urls = options
            .servers
            .iter()
            .map(IceServer::to_url)
            .collect::<Result<Vec<_>, _>>()?;
        Ok(WebrtcIce { options, urls })
    }

    fn agent_config(&self, params: &AgentParams) -> AgentConfig {
        let options = &self.options;
        let interfaces = options.interfaces.clone();
        let addresses = options.addresses.clone();
        let limited = !interfaces.is_empty() || !addresses.is_empty();
        AgentConfig {
            urls: self.urls.clone(),
            local_ufrag: params.credentials.ufrag.clone(),
            local_pwd: params.credentials.pwd.clone(),
            multicast_dns_mode: MulticastDnsMode::Disabled,
            is_controlling: params.role == Role::Controlling,
            disconnected_timeout: Some(options.disconnected_timeout),
            failed_timeout: Some(options.failed_timeout),
            keepalive_interval: Some(options.keepalive_interval),
            check_interval: options.check_interval,
            network_types: vec![NetworkType::Udp4, NetworkType::Udp6],
            interface_filter: Arc::new(if interfaces.is_empty() {
                None
            } else {
                Some(Box::new(move |name: &str| {
                    interfaces.iter().any(|i| i == name)
                }))
            }),
            ip_filter: Arc::new(Some(Box::new(move |ip: IpAddr| {
                gatherable(ip) && (addresses.is_empty() || addresses.contains(&ip))
            }))),
            // Loopback only when a limit says which addresses: then the limit decides.
            include_loopback: limited,
            ..AgentConfig::default()
        }
    }
}

#[async_trait]
impl IceAgentFactory for WebrtcIce {
    async fn create(&self, params: AgentParams) -> Result<Arc<dyn IceAgent>, AgentError> {
        let agent = Agent::new(self.agent_config(&params))
            .await
            .map_err(|e| AgentError::Create(e.into()))?;
        let events = params.events;

        let sink = events.clone();
        agent.on_candidate(Box::new(
            move |c: Option<Arc<dyn Candidate + Send + Sync>>| {
                let sink = sink.clone();
                Box::pin(async move {
                    match c {
                        Some(c) => sink.emit(AgentEvent::Candidate(to_proto(c.as_ref()))),
                        None => sink.emit(AgentEvent::GatheringComplete),
                    }
                })
            },
        ));
        let sink = events.clone();
        agent.on_connection_state_change(Box::new(move |state: ConnectionState| {
            let sink = sink.clone();
            Box::pin(async move {
                if let Some(state) = ice_state(state) {
                    sink.emit_state(state).await;
                }
            })
        }));
        let sink: AgentEvents = events;
        agent.on_selected_candidate_pair_change(Box::new(
            move |local: &Arc<dyn Candidate + Send + Sync>,
                  remote: &Arc<dyn Candidate + Send + Sync>| {
                sink.emit(AgentEvent::SelectedPair {
                    local: to_proto(local.as_ref()),
                    remote: to_proto(remote.as_ref()),
                });
                Box::pin(async {})
            },
        ));
        Ok(Arc::new(WebrtcAgent { agent }))
    }
}

/// One webrtc-ice agent.
struct WebrtcAgent {
    agent: Agent,
}

#[async_trait]
impl IceAgent for WebrtcAgent {
    fn gather(&self) -> Result<(), AgentError> {
        self.agent
            .gather_candidates()
            .map_err(|e| AgentError::Gather(e.into()))
    }

    fn add_remote_candidate(&self, candidate: &ProtoCandidate) -> Result<(), AgentError> {
        let parsed = candidate::parse(candidate).map_err(|e| AgentError::Candidate(Box::new(e)))?;
        let candidate = from_parsed(&parsed).map_err(|e| AgentError::Candidate(e.into()))?;
        self.agent
            .add_remote_candidate(&candidate)
            .map_err(|e| AgentError::Candidate(e.into()))
    }

    async fn connect(
        &self,
        role: Role,
        remote: &IceCredentials,
    ) -> Result<Arc<dyn DatagramConn>, AgentError> {
        // Dropping this future drops the sender, which cancels dial/accept.
        let (_cancel, cancel_rx) = mpsc::channel(1);
        let (ufrag, pwd) = (remote.ufrag.clone(), remote.pwd.clone());
        let conn: Arc<dyn Conn + Send + Sync> = match role {
            Role::Controlling => self.agent.dial(cancel_rx, ufrag, pwd).await.map(upcast),
            Role::Controlled => self.agent.accept(cancel_rx, ufrag, pwd).await.map(upcast),
        }
        .map_err(|e| AgentError::Connect(e.into()))?;
        Ok(Arc::new(WebrtcConn(conn)))
    }

    async fn close(&self) -> Result<(), AgentError> {
        match self.agent.close().await {
            Ok(()) | Err(webrtc_ice::Error::ErrClosed) => Ok(()),
            Err(e) => Err(AgentError::Close(e.into())),
        }
    }
}

/// The agent's connection over the selected pair.
struct WebrtcConn(Arc<dyn Conn + Send + Sync>);

#[async_trait]
impl DatagramConn for WebrtcConn {
    async fn send(&self, datagram: &[u8]) -> io::Result<usize> {
        self.0.send(datagram).await.map_err(io::Error::other)
    }

    async fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.recv(buf).await.map_err(io::Error::other)
    }
}

/// webrtc-ice 0.17 binds host candidates without a scope id, which fails for
/// IPv6 link-local addresses (EINVAL): they are not gathered at all.
fn gatherable(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V6(v6) => !v6.is_unicast_link_local(),
        IpAddr::V4(_) => true,
    }
}

fn upcast<C: Conn + Send + Sync + 'static>(conn: Arc<C>) -> Arc<dyn Conn + Send + Sync> {
    conn
}

fn ice_state(state: ConnectionState) -> Option<IceState> {
    Some(match state {
        ConnectionState::Unspecified => return None,
        ConnectionState::New => IceState::New,
        ConnectionState::Checking => IceState::Checking,
        ConnectionState::Connected => IceState::Connected,
        ConnectionState::Completed => IceState::Completed,
        ConnectionState::Disconnected => IceState::Disconnected,
        ConnectionState::Failed => IceState::Failed,
        ConnectionState::Closed => IceState::Closed,
    })
}

/// A webrtc-ice candidate in protobuf form.
pub(crate) fn to_proto(c: &(dyn Candidate + Send + Sync)) -> ProtoCandidate {
    let kind = match c.candidate_type() {
        CandidateType::Host => ProtoType::Host,
        CandidateType::ServerReflexive => ProtoType::ServerReflexive,
        CandidateType::PeerReflexive => ProtoType::PeerReflexive,
        CandidateType::Relay => ProtoType::Relay,
        CandidateType::Unspecified => ProtoType::UnspecifiedCandidateType,
    };
    let network = match c.network_type() {
        NetworkType::Udp4 => ProtoNetwork::Udp4,
        NetworkType::Udp6 => ProtoNetwork::Udp6,
        NetworkType::Tcp4 => ProtoNetwork::Tcp4,
        NetworkType::Tcp6 => ProtoNetwork::Tcp6,
        NetworkType::Unspecified => ProtoNetwork::UnspecifiedNetworkType,
    };
    let tcp_type = match c.tcp_type() {
        TcpType::Active => ProtoTcpType::Active,
        TcpType::Passive => ProtoTcpType::Passive,
        TcpType::SimultaneousOpen => ProtoTcpType::SimultaneousOpen,
        TcpType::Unspecified => ProtoTcpType::UnspecifiedTcpType,
    };
    // webrtc-ice 0.17 allocates TURN relays over UDP only.
    let relay_protocol = if kind == ProtoType::Relay {
        RelayProtocol::Udp
    } else {
        RelayProtocol::UnspecifiedRelayProtocol
    };
    ProtoCandidate {
        r#type: kind as i32,
        network_type: network as i32,
        tcp_type: tcp_type as i32,
        foundation: c.foundation(),
        component: i32::from(c.component()),
        // Carried as int32 on the wire, as cunīcu does (Go's int32(uint32)).
        priority: c.priority() as i32,
        address: c.address(),
        port: i32::from(c.port()),
        related_address: c
            .related_address()
            .filter(|r| !r.address.is_empty())
            .map(|r| RelatedAddress {
                address: r.address,
                port: i32::from(r.port),
            }),
        relay_protocol: relay_protocol as i32,
    }
}

/// A webrtc-ice candidate for a checked protobuf candidate. The relay
/// protocol has no place in webrtc-ice's candidates and is not carried over.
pub(crate) fn from_parsed(
    p: &ParsedCandidate,
) -> Result<Arc<dyn Candidate + Send + Sync>, webrtc_ice::Error> {
    use cunicu_signal::proto::epdisc::NetworkType as N;
    let network = match p.network {
        N::Tcp4 | N::Tcp6 => "tcp",
        _ => "udp",
    };
    let base_config = CandidateBaseConfig {
        network: network.to_string(),
        address: p.addr.ip().to_string(),
        port: p.addr.port(),
        component: p.component,
        priority: p.priority,
        foundation: p.foundation.clone(),
        ..CandidateBaseConfig::default()
    };
    let (rel_addr, rel_port) = p
        .related
        .map(|r| (r.ip().to_string(), r.port()))
        .unwrap_or_default();
    let candidate = match p.kind {
        ProtoType::Host => CandidateHostConfig {
            base_config,
            tcp_type: match p.tcp_type {
                ProtoTcpType::Active => TcpType::Active,
                ProtoTcpType::Passive => TcpType::Passive,
                ProtoTcpType::SimultaneousOpen => TcpType::SimultaneousOpen,
                ProtoTcpType::UnspecifiedTcpType => TcpType::Unspecified,
            },
        }
        .new_candidate_host()?,
        ProtoType::ServerReflexive => CandidateServerReflexiveConfig {
            base_config,
            rel_addr,
            rel_port,
        }
        .new_candidate_server_reflexive()?,
        ProtoType::PeerReflexive => CandidatePeerReflexiveConfig {
            base_config,
            rel_addr,
            rel_port,
        }
        .new_candidate_peer_reflexive()?,
        ProtoType::Relay => CandidateRelayConfig {
            base_config,
            rel_addr,
            rel_port,
            relay_client: None,
        }
        .new_candidate_relay()?,
        ProtoType::UnspecifiedCandidateType => {
            return Err(webrtc_ice::Error::ErrUnknownCandidateType);
        }
    };
    Ok(Arc::new(candidate))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn proto(kind: ProtoType, address: &str, related: Option<(&str, i32)>) -> ProtoCandidate {
        ProtoCandidate {
            r#type: kind as i32,
            network_type: if address.contains(':') {
                ProtoNetwork::Udp6
            } else {
                ProtoNetwork::Udp4
            } as i32,
            tcp_type: 0,
            foundation: "3405661321".into(),
            component: 1,
            priority: 1694498815,
            address: address.into(),
            port: 40001,
            related_address: related.map(|(a, p)| RelatedAddress {
                address: a.into(),
                port: p,
            }),
            relay_protocol: if kind == ProtoType::Relay {
                RelayProtocol::Udp as i32
            } else {
                0
            },
        }
    }

    #[test]
    fn candidates_map_both_ways() {
        for c in [
            proto(ProtoType::Host, "192.0.2.7", None),
            proto(ProtoType::Host, "2001:db8::7", None),
            proto(
                ProtoType::ServerReflexive,
                "198.51.100.1",
                Some(("192.0.2.7", 40001)),
            ),
            proto(
                ProtoType::PeerReflexive,
                "198.51.100.2",
                Some(("192.0.2.7", 5)),
            ),
            proto(
                ProtoType::Relay,
                "203.0.113.9",
                Some(("198.51.100.1", 3478)),
            ),
        ] {
            let parsed = candidate::parse(&c).unwrap();
            let webrtc = from_parsed(&parsed).unwrap();
            assert_eq!(to_proto(webrtc.as_ref()), c, "{}", webrtc.marshal());
        }
    }

    #[test]
    fn unparsable_server_urls_are_refused() {
        let err = WebrtcIce::new(
            IceOptions::default().with_servers([IceServer::new("http://stun.invalid")]),
        )
        .unwrap_err();
        assert!(err.to_string().contains("http://stun.invalid"), "{err}");
        assert!(
            WebrtcIce::new(
                IceOptions::default().with_servers([IceServer::new("stun:127.0.0.1:3478")])
            )
            .is_ok()
        );
        // The rules of `serve --relay`: what a server would not hand out.
        for bad in [
            "stun:127.0.0.1:3478?transport=udp",
            "turn:127.0.0.1:3478?secret=x",
            "turn:u:p@127.0.0.1:3478",
        ] {
            let err = WebrtcIce::new(IceOptions::default().with_servers([IceServer::new(bad)]))
                .unwrap_err();
            assert!(err.to_string().contains("127.0.0.1:3478"), "{err}");
        }
        let turn = IceServer::with_credentials("turn:127.0.0.1:3478?transport=udp", "u", "secret");
        assert!(!format!("{turn:?}").contains("secret"));
    }

    #[test]
    fn debug_hides_turn_passwords() {
        let ice =
            WebrtcIce::new(
                IceOptions::default().with_servers([IceServer::with_credentials(
                    "turn:127.0.0.1:3478?transport=udp",
                    "user",
                    "s3cr3tpw",
                )]),
            )
            .unwrap();
        // webrtc-ice's own Url shows it: what this guards against.
        assert!(format!("{:?}", ice.urls).contains("s3cr3tpw"));
        let shown = format!("{ice:?} {ice:#?}");
        assert!(!shown.contains("s3cr3tpw"), "{shown}");
        assert!(
            shown.contains("turn:127.0.0.1:3478") && shown.contains("user"),
            "{shown}"
        );
    }
}
