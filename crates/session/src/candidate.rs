//! Checking the protobuf candidates that arrive from the network, and printing
//! them. Agent independent: an [`IceAgent`](crate::IceAgent) maps a
//! [`ParsedCandidate`] to its own type.

use std::{
    fmt,
    net::{IpAddr, SocketAddr},
};

use cunicu_signal::proto::epdisc::{
    Candidate, CandidateType, NetworkType, RelatedAddress, RelayProtocol, TcpType,
};

/// The longest foundation accepted (RFC 8445 allows 32 characters).
pub const MAX_FOUNDATION_LEN: usize = 32;

/// Why a candidate from the peer was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CandidateError {
    /// The candidate type is unspecified or unknown.
    #[error("candidate type {0} is not host, srflx, prflx or relay")]
    Type(i32),
    /// The network type is unspecified or unknown.
    #[error("network type {0} is not udp4, udp6, tcp4 or tcp6")]
    NetworkType(i32),
    /// The TCP type is unknown.
    #[error("tcp type {0} is not known")]
    TcpType(i32),
    /// The relay protocol is unknown.
    #[error("relay protocol {0} is not known")]
    RelayProtocol(i32),
    /// The address is not an IP address (mDNS names are not resolved).
    #[error("candidate address {0:?} is not an IP address")]
    Address(String),
    /// The address family does not match the network type.
    #[error("candidate address {address} does not fit network type {network}")]
    Family {
        /// The address.
        address: IpAddr,
        /// The network type's name.
        network: &'static str,
    },
    /// The port is 0 or out of range.
    #[error("candidate port {0} is not in 1..=65535")]
    Port(i32),
    /// The component is 0 or out of range.
    #[error("candidate component {0} is not in 1..=65535")]
    Component(i32),
    /// The foundation is too long.
    #[error("candidate foundation is {0} bytes, at most 32 allowed")]
    Foundation(usize),
    /// The related address or port is invalid.
    #[error("related address {address:?} port {port} is invalid")]
    RelatedAddress {
        /// The address as sent.
        address: String,
        /// The port as sent.
        port: i32,
    },
}

/// A candidate whose fields were checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedCandidate {
    /// host, srflx, prflx or relay.
    pub kind: CandidateType,
    /// udp4, udp6, tcp4 or tcp6.
    pub network: NetworkType,
    /// The TCP type (unspecified for UDP).
    pub tcp_type: TcpType,
    /// The foundation.
    pub foundation: String,
    /// The component (1 for the only one ICE sessions here use).
    pub component: u16,
    /// The priority; the wire carries it as a signed 32-bit integer, as cunīcu does.
    pub priority: u32,
    /// Address and port.
    pub addr: SocketAddr,
    /// The related address, if any.
    pub related: Option<SocketAddr>,
    /// The relay protocol (relay candidates).
    pub relay_protocol: RelayProtocol,
}

/// Checks a candidate that came from the network.
pub fn parse(candidate: &Candidate) -> Result<ParsedCandidate, CandidateError> {
    let kind = match CandidateType::try_from(candidate.r#type) {
        Ok(CandidateType::UnspecifiedCandidateType) | Err(_) => {
            return Err(CandidateError::Type(candidate.r#type));
        }
        Ok(kind) => kind,
    };
    let network = match NetworkType::try_from(candidate.network_type) {
        Ok(NetworkType::UnspecifiedNetworkType) | Err(_) => {
            return Err(CandidateError::NetworkType(candidate.network_type));
        }
        Ok(network) => network,
    };
    let tcp_type = TcpType::try_from(candidate.tcp_type)
        .map_err(|_| CandidateError::TcpType(candidate.tcp_type))?;
    let relay_protocol = RelayProtocol::try_from(candidate.relay_protocol)
        .map_err(|_| CandidateError::RelayProtocol(candidate.relay_protocol))?;
    let ip: IpAddr = candidate
        .address
        .parse()
        .map_err(|_| CandidateError::Address(candidate.address.clone()))?;
    let fits = match network {
        NetworkType::Udp4 | NetworkType::Tcp4 => ip.is_ipv4(),
        _ => ip.is_ipv6(),
    };
    if !fits {
        return Err(CandidateError::Family {
            address: ip,
            network: network_name(network),
        });
    }
    let port = match u16::try_from(candidate.port) {
        Ok(port) if port != 0 => port,
        _ => return Err(CandidateError::Port(candidate.port)),
    };
    let component = match u16::try_from(candidate.component) {
        Ok(component) if component != 0 => component,
        _ => return Err(CandidateError::Component(candidate.component)),
    };
    if candidate.foundation.len() > MAX_FOUNDATION_LEN {
        return Err(CandidateError::Foundation(candidate.foundation.len()));
    }
    let related = match &candidate.related_address {
        None => None,
        Some(related) if related.address.is_empty() => None,
        Some(related) => {
            let bad = || CandidateError::RelatedAddress {
                address: related.address.clone(),
                port: related.port,
            };
            let ip: IpAddr = related.address.parse().map_err(|_| bad())?;
            let port = u16::try_from(related.port).map_err(|_| bad())?;
            Some(SocketAddr::new(ip, port))
        }
    };
    Ok(ParsedCandidate {
        kind,
        network,
        tcp_type,
        foundation: candidate.foundation.clone(),
        component,
        // Go's uint32(int32) on the other side: the bits are the priority.
        priority: candidate.priority as u32,
        addr: SocketAddr::new(ip, port),
        related,
        relay_protocol,
    })
}

impl ParsedCandidate {
    /// The protobuf form.
    pub fn to_proto(&self) -> Candidate {
        Candidate {
            r#type: self.kind as i32,
            network_type: self.network as i32,
            tcp_type: self.tcp_type as i32,
            foundation: self.foundation.clone(),
            component: i32::from(self.component),
            priority: self.priority as i32,
            address: self.addr.ip().to_string(),
            port: i32::from(self.addr.port()),
            related_address: self.related.map(|r| RelatedAddress {
                address: r.ip().to_string(),
                port: i32::from(r.port()),
            }),
            relay_protocol: self.relay_protocol as i32,
        }
    }
}

/// The short name of a candidate type: host, srflx, prflx, relay.
pub fn type_name(kind: CandidateType) -> &'static str {
    match kind {
        CandidateType::Host => "host",
        CandidateType::ServerReflexive => "srflx",
        CandidateType::PeerReflexive => "prflx",
        CandidateType::Relay => "relay",
        CandidateType::UnspecifiedCandidateType => "unspecified",
    }
}

/// The short name of a network type: udp4, udp6, tcp4, tcp6.
pub fn network_name(network: NetworkType) -> &'static str {
    match network {
        NetworkType::Udp4 => "udp4",
        NetworkType::Udp6 => "udp6",
        NetworkType::Tcp4 => "tcp4",
        NetworkType::Tcp6 => "tcp6",
        NetworkType::UnspecifiedNetworkType => "unspecified",
    }
}

/// Shows a protobuf candidate in one line: `host udp4 127.0.0.1:5000`
/// (and ` related ADDR:PORT` when there is one).
pub struct Display<'a>(pub &'a Candidate);

impl fmt::Display for Display<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let c = self.0;
        let kind = CandidateType::try_from(c.r#type)
            .map(type_name)
            .unwrap_or("unknown");
        let network = NetworkType::try_from(c.network_type)
            .map(network_name)
            .unwrap_or("unknown");
        let address = match c.address.parse::<IpAddr>() {
            Ok(IpAddr::V6(ip)) => format!("[{ip}]"),
            _ => c.address.clone(),
        };
        write!(f, "{kind} {network} {address}:{}", c.port)?;
        if let Some(related) = &c.related_address
            && !related.address.is_empty()
        {
            write!(f, " related {}:{}", related.address, related.port)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(address: &str, port: i32) -> Candidate {
        Candidate {
            r#type: CandidateType::Host as i32,
            network_type: NetworkType::Udp4 as i32,
            foundation: "1234".into(),
            component: 1,
            priority: 2130706431,
            address: address.into(),
            port,
            ..Default::default()
        }
    }

    #[test]
    fn a_good_candidate_round_trips() {
        let mut c = host("10.0.0.1", 51820);
        c.r#type = CandidateType::ServerReflexive as i32;
        c.related_address = Some(RelatedAddress {
            address: "192.168.1.2".into(),
            port: 4000,
        });
        c.priority = -5; // above 2^31 as Go's int32 carries it
        let parsed = parse(&c).unwrap();
        assert_eq!(parsed.priority, u32::MAX - 4);
        assert_eq!(parsed.related, Some("192.168.1.2:4000".parse().unwrap()));
        assert_eq!(parsed.to_proto(), c);
        assert_eq!(
            Display(&c).to_string(),
            "srflx udp4 10.0.0.1:51820 related 192.168.1.2:4000"
        );
    }

    #[test]
    fn bad_candidates_say_why() {
        let cases: Vec<(Candidate, CandidateError)> = vec![
            (
                Candidate {
                    r#type: 0,
                    ..host("10.0.0.1", 1)
                },
                CandidateError::Type(0),
            ),
            (
                Candidate {
                    r#type: 9,
                    ..host("10.0.0.1", 1)
                },
                CandidateError::Type(9),
            ),
            (
                Candidate {
                    network_type: 0,
                    ..host("10.0.0.1", 1)
                },
                CandidateError::NetworkType(0),
            ),
            (
                host("abc.local", 1),
                CandidateError::Address("abc.local".into()),
            ),
            (
                host("::1", 1),
                CandidateError::Family {
                    address: "::1".parse().unwrap(),
                    network: "udp4",
                },
            ),
            (host("10.0.0.1", 0), CandidateError::Port(0)),
            (host("10.0.0.1", 70000), CandidateError::Port(70000)),
            (
                Candidate {
                    component: 0,
                    ..host("10.0.0.1", 1)
                },
                CandidateError::Component(0),
            ),
            (
                Candidate {
                    foundation: "x".repeat(33),
                    ..host("10.0.0.1", 1)
                },
                CandidateError::Foundation(33),
            ),
            (
                Candidate {
                    related_address: Some(RelatedAddress {
                        address: "nope".into(),
                        port: 1,
                    }),
                    ..host("10.0.0.1", 1)
                },
                CandidateError::RelatedAddress {
                    address: "nope".into(),
                    port: 1,
                },
            ),
        ];
        for (candidate, want) in cases {
            assert_eq!(parse(&candidate), Err(want), "{candidate:?}");
        }
    }
}
