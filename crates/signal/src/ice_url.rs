//! STUN and TURN server URLs (RFC 7064, RFC 7065), the one parser of them:
//! `serve --relay`, `connect --stun` and the ICE agents all read URLs here, so
//! that nothing is handed out or accepted that an ICE agent then refuses.
//!
//! ```text
//! stun:HOST[:PORT]                      stuns:HOST[:PORT]
//! turn:[USER:PASS@]HOST[:PORT][?transport=udp|tcp][&NAME=VALUE...]
//! turns:[USER:PASS@]HOST[:PORT][?transport=udp|tcp][&NAME=VALUE...]
//! ```
//!
//! `HOST` is a name, an IPv4 address or an IPv6 address in brackets. Query
//! parameters other than `transport` are kept in [`IceUrl::params`] for the
//! caller to check (the server takes `secret=` and `ttl=`); [`IceUrl::parse_plain`]
//! refuses them. The [`Display`](fmt::Display) form is the URL an ICE agent
//! gets: scheme, host, port and transport, without credentials or other
//! parameters. Errors name the URL with credentials and query values hidden.
//!
//! ```
//! use cunicu_signal::ice_url::{IceScheme, IceUrl};
//!
//! let url = IceUrl::parse("turn:alice:pw@turn.example.com:3478?transport=udp").unwrap();
//! assert_eq!(url.scheme, IceScheme::Turn);
//! assert_eq!(url.credentials.as_ref().unwrap().username, "alice");
//! assert_eq!(url.to_string(), "turn:turn.example.com:3478?transport=udp");
//! assert!(IceUrl::parse("stun:h:3478?transport=udp").is_err());
//! ```

use std::{fmt, net::Ipv6Addr, str::FromStr};

/// The scheme of a STUN or TURN URL.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IceScheme {
    /// `stun:`
    Stun,
    /// `stuns:` (STUN over TLS)
    Stuns,
    /// `turn:`
    Turn,
    /// `turns:` (TURN over TLS)
    Turns,
}

impl IceScheme {
    /// The scheme as written in a URL, without the colon.
    pub fn as_str(self) -> &'static str {
        match self {
            IceScheme::Stun => "stun",
            IceScheme::Stuns => "stuns",
            IceScheme::Turn => "turn",
            IceScheme::Turns => "turns",
        }
    }

    /// True for `stun:` and `stuns:`.
    pub fn is_stun(self) -> bool {
        matches!(self, IceScheme::Stun | IceScheme::Stuns)
    }
}

/// The `transport` parameter of a TURN URL.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IceTransport {
    /// `transport=udp`
    Udp,
    /// `transport=tcp`
    Tcp,
}

impl IceTransport {
    /// The value as written in a URL.
    pub fn as_str(self) -> &'static str {
        match self {
            IceTransport::Udp => "udp",
            IceTransport::Tcp => "tcp",
        }
    }
}

/// `USER:PASS` of a TURN URL. `Debug` hides the password.
#[derive(Clone, PartialEq, Eq)]
pub struct UserPass {
    /// User name (never empty).
    pub username: String,
    /// Password.
    pub password: String,
}

impl fmt::Debug for UserPass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UserPass")
            .field("username", &self.username)
            .field("password", &"***")
            .finish()
    }
}

/// A parsed STUN or TURN URL. `Debug` hides the password and the values of
/// the other parameters (a `secret=`).
#[derive(Clone, PartialEq, Eq)]
pub struct IceUrl {
    /// `stun`, `stuns`, `turn` or `turns`.
    pub scheme: IceScheme,
    /// The host as written: a name, an IPv4 address or `[IPv6]`.
    pub host: String,
    /// The port, if given (1 to 65535).
    pub port: Option<u16>,
    /// The `transport` parameter, if given (TURN only).
    pub transport: Option<IceTransport>,
    /// `USER:PASS@`, if given (TURN only).
    pub credentials: Option<UserPass>,
    /// The other query parameters, in order, each name at most once.
    pub params: Vec<(String, String)>,
}

/// What is wrong with a STUN or TURN URL.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum IceUrlReason {
    /// No `scheme:` at all.
    #[error("expected stun:, stuns:, turn: or turns:")]
    NoScheme,
    /// A scheme other than the four.
    #[error("scheme {0:?} is not stun, stuns, turn or turns")]
    Scheme(String),
    /// Nothing where the host should be.
    #[error("no host")]
    NoHost,
    /// A host that is not a name, an IPv4 address or a bracketed IPv6 address.
    #[error("host {0:?} is not a name, an IPv4 address or an [IPv6] address")]
    Host(String),
    /// A port that is not a number from 1 to 65535.
    #[error("port {0:?} is not a number from 1 to 65535")]
    Port(String),
    /// A `transport` other than `udp` or `tcp`.
    #[error("transport {0:?} is not udp or tcp")]
    Transport(String),
    /// A query parameter on a STUN URL: STUN URLs take none.
    #[error("a STUN URL takes no parameters (here {0:?})")]
    StunParam(String),
    /// A query parameter given twice.
    #[error("{0} is given twice")]
    Twice(String),
    /// Credentials that are not `USER:PASS@` with a user name.
    #[error("credentials must be USER:PASS@ with a non-empty USER")]
    Credentials,
    /// Credentials on a STUN URL.
    #[error("a STUN server takes no credentials")]
    StunCredentials,
    /// A query parameter the reader does not take.
    #[error("unknown parameter {0:?}")]
    UnknownParam(String),
    /// A parameter the reader takes, with a value or in a combination it refuses.
    #[error("{name}: {why}")]
    Param {
        /// The parameter's name.
        name: String,
        /// What is wrong with it.
        why: String,
    },
}

/// A STUN or TURN URL that was refused: the URL (credentials and query
/// values hidden) and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid STUN/TURN URL {url:?}: {reason}")]
pub struct IceUrlError {
    /// The URL as given, with anything before `@` and the query values hidden.
    pub url: String,
    /// What is wrong with it.
    pub reason: IceUrlReason,
}

impl IceUrlError {
    /// The error for URL `text` (hidden as in [`IceUrlError::url`]): for
    /// readers that check [`IceUrl::params`] themselves.
    pub fn new(text: &str, reason: IceUrlReason) -> Self {
        IceUrlError {
            url: redact(text),
            reason,
        }
    }
}

impl IceUrl {
    /// Parses a `stun:`, `stuns:`, `turn:` or `turns:` URL; parameters other
    /// than `transport` go to [`IceUrl::params`] unchecked.
    pub fn parse(text: &str) -> Result<Self, IceUrlError> {
        let err = |reason| IceUrlError::new(text, reason);
        let (scheme, rest) = text
            .split_once(':')
            .ok_or_else(|| err(IceUrlReason::NoScheme))?;
        let scheme = match scheme {
            "stun" => IceScheme::Stun,
            "stuns" => IceScheme::Stuns,
            "turn" => IceScheme::Turn,
            "turns" => IceScheme::Turns,
            other => return Err(err(IceUrlReason::Scheme(other.to_string()))),
        };
        let (authority, query) = rest.split_once('?').unwrap_or((rest, ""));
        let (userinfo, hostport) = match authority.rsplit_once('@') {
            Some((user, host)) => (Some(user), host),
            None => (None, authority),
        };
        let (host, port) = match hostport.rsplit_once(':') {
            Some((host, port)) if !port.contains(']') => {
                let port = port
                    .parse::<u16>()
                    .ok()
                    .filter(|p| *p != 0)
                    .ok_or_else(|| err(IceUrlReason::Port(port.to_string())))?;
                (host, Some(port))
            }
            _ => (hostport, None),
        };
        check_host(host).map_err(err)?;

        let mut transport = None;
        let mut params: Vec<(String, String)> = Vec::new();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            if scheme.is_stun() {
                return Err(err(IceUrlReason::StunParam(name.to_string())));
            }
            let seen = if name == "transport" {
                transport.is_some()
            } else {
                params.iter().any(|(n, _)| n == name)
            };
            if seen {
                return Err(err(IceUrlReason::Twice(name.to_string())));
            }
            match name {
                "transport" => {
                    transport = Some(match value {
                        "udp" => IceTransport::Udp,
                        "tcp" => IceTransport::Tcp,
                        other => return Err(err(IceUrlReason::Transport(other.to_string()))),
                    })
                }
                _ => params.push((name.to_string(), value.to_string())),
            }
        }

        let credentials = match userinfo {
            None => None,
            Some(_) if scheme.is_stun() => return Err(err(IceUrlReason::StunCredentials)),
            Some(userinfo) => match userinfo.split_once(':') {
                Some((username, password)) if !username.is_empty() => Some(UserPass {
                    username: username.to_string(),
                    password: password.to_string(),
                }),
                _ => return Err(err(IceUrlReason::Credentials)),
            },
        };
        Ok(IceUrl {
            scheme,
            host: host.to_string(),
            port,
            transport,
            credentials,
            params,
        })
    }

    /// [`IceUrl::parse`], refusing any parameter but `transport`: for readers
    /// that take no others (`connect --stun`, the ICE agents).
    pub fn parse_plain(text: &str) -> Result<Self, IceUrlError> {
        let url = Self::parse(text)?;
        match url.params.first() {
            Some((name, _)) => Err(IceUrlError::new(
                text,
                IceUrlReason::UnknownParam(name.clone()),
            )),
            None => Ok(url),
        }
    }

    /// The value of parameter `name` (not `transport`), if given.
    pub fn param(&self, name: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

fn check_host(host: &str) -> Result<(), IceUrlReason> {
    if host.is_empty() {
        return Err(IceUrlReason::NoHost);
    }
    let ok = match host.strip_prefix('[') {
        Some(inside) => inside
            .strip_suffix(']')
            .is_some_and(|ip| ip.parse::<Ipv6Addr>().is_ok()),
        None => !host
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || "/\\#[]:@%".contains(c)),
    };
    if ok {
        Ok(())
    } else {
        Err(IceUrlReason::Host(host.to_string()))
    }
}

impl FromStr for IceUrl {
    type Err = IceUrlError;

    /// [`IceUrl::parse`].
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Self::parse(text)
    }
}

impl fmt::Display for IceUrl {
    /// The URL an ICE agent gets: `scheme:host[:port][?transport=...]`,
    /// without credentials or other parameters.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.scheme.as_str(), self.host)?;
        if let Some(port) = self.port {
            write!(f, ":{port}")?;
        }
        if let Some(transport) = self.transport {
            write!(f, "?transport={}", transport.as_str())?;
        }
        Ok(())
    }
}

impl fmt::Debug for IceUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let params: Vec<&str> = self.params.iter().map(|(n, _)| n.as_str()).collect();
        f.debug_struct("IceUrl")
            .field("url", &self.to_string())
            .field("credentials", &self.credentials)
            .field("params", &params)
            .finish()
    }
}

/// The URL without anything before `@` and without query values, for errors.
fn redact(text: &str) -> String {
    let without_user = match (text.split_once(':'), text.rsplit_once('@')) {
        (Some((scheme, _)), Some((_, host))) => format!("{scheme}:***@{host}"),
        _ => text.to_string(),
    };
    match without_user.split_once('?') {
        Some((base, _)) => format!("{base}?..."),
        None => without_user,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reason(text: &str) -> IceUrlReason {
        IceUrl::parse(text).unwrap_err().reason
    }

    #[test]
    fn parts_of_a_turn_url() {
        let url =
            IceUrl::parse("turns:alice:s3:cret@[2001:db8::1]:5349?transport=tcp&secret=x").unwrap();
        assert_eq!(url.scheme, IceScheme::Turns);
        assert_eq!(url.host, "[2001:db8::1]");
        assert_eq!(url.port, Some(5349));
        assert_eq!(url.transport, Some(IceTransport::Tcp));
        assert_eq!(
            url.credentials,
            Some(UserPass {
                username: "alice".into(),
                password: "s3:cret".into()
            })
        );
        assert_eq!(url.param("secret"), Some("x"));
        assert_eq!(url.param("ttl"), None);
        assert_eq!(url.to_string(), "turns:[2001:db8::1]:5349?transport=tcp");
    }

    #[test]
    fn plain_stun_and_defaults() {
        let url = IceUrl::parse_plain("stun:stun.example.com").unwrap();
        assert_eq!(
            (url.scheme, url.port, url.transport, url.credentials.clone()),
            (IceScheme::Stun, None, None, None)
        );
        assert_eq!(url.to_string(), "stun:stun.example.com");
        let url: IceUrl = "stuns:192.0.2.1:5349".parse().unwrap();
        assert_eq!(url.to_string(), "stuns:192.0.2.1:5349");
        assert_eq!(
            IceUrl::parse("turn:h:1?transport=udp").unwrap().to_string(),
            "turn:h:1?transport=udp"
        );
    }

    #[test]
    fn what_is_refused_and_why() {
        use IceUrlReason::*;
        for (text, want) in [
            ("nothing", NoScheme),
            ("http://x:1", Scheme("http".into())),
            ("turn:", NoHost),
            ("turn::1", NoHost),
            ("turn://h:1", Host("//h".into())),
            ("turn:h/x:1", Host("h/x".into())),
            ("turn:2001:db8::1", Host("2001:db8:".into())),
            ("turn:[2001:db8::1", Host("[2001:db8:".into())),
            ("turn:[nope]:1", Host("[nope]".into())),
            ("turn:h:99999", Port("99999".into())),
            ("turn:h:0", Port("0".into())),
            ("turn:h:x", Port("x".into())),
            ("turn:h:1?transport=sctp", Transport("sctp".into())),
            (
                "turn:h:1?transport=udp&transport=tcp",
                Twice("transport".into()),
            ),
            ("turn:h:1?secret=a&secret=b", Twice("secret".into())),
            ("stun:h:1?transport=udp", StunParam("transport".into())),
            ("stun:u:p@h:1", StunCredentials),
            ("turn:u@h:1", Credentials),
            ("turn::p@h:1", Credentials),
        ] {
            assert_eq!(reason(text), want, "{text}");
        }
        assert_eq!(
            IceUrl::parse_plain("turn:h:1?secret=x").unwrap_err().reason,
            UnknownParam("secret".into())
        );
    }

    #[test]
    fn errors_name_the_url_without_secrets() {
        let e = IceUrl::parse("turn:u:p4ss@h:1?transport=sctp&secret=s3cr3t").unwrap_err();
        assert_eq!(e.url, "turn:***@h:1?...");
        let shown = e.to_string();
        assert!(
            shown.contains("turn:***@h:1") && shown.contains("sctp"),
            "{shown}"
        );
        assert!(
            !shown.contains("p4ss") && !shown.contains("s3cr3t"),
            "{shown}"
        );
        let url = IceUrl::parse("turn:u:p4ss@h:1?secret=s3cr3t").unwrap();
        let shown = format!("{url:?}");
        assert!(
            !shown.contains("p4ss") && !shown.contains("s3cr3t"),
            "{shown}"
        );
    }
}
