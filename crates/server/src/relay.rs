//! STUN/TURN relays handed out by `RelayRegistry.GetRelays` (SPEC §7).
//!
//! A relay URL carries static credentials (`turn:USER:PASS@host:port?transport=udp`)
//! or a shared secret (`turn:host:port?transport=udp&secret=S&ttl=1h`). With a
//! secret, each peer gets time-limited credentials of the TURN REST API scheme
//! that coturn implements: username `"<expiry>:<base64 public key>"`, password
//! `base64(HMAC-SHA1(secret, username))`.

use std::{fmt, str::FromStr, time::Duration};

use base64::{Engine as _, engine::general_purpose::STANDARD};
use cunicu_signal::{
    Key,
    proto::{Timestamp, signaling::RelayInfo},
};
use hmac::{Hmac, Mac};
use sha1::Sha1;

/// Default lifetime of credentials made from a shared secret.
pub const DEFAULT_TTL: Duration = Duration::from_secs(3600);

/// How a relay's credentials are made. `Debug` names the kind only.
#[derive(Clone, PartialEq, Eq)]
pub enum Credentials {
    /// No credentials (STUN).
    None,
    /// Fixed username and password from the URL.
    Static {
        /// User name.
        username: String,
        /// Password.
        password: String,
    },
    /// Per-peer credentials from a shared secret, valid for `ttl`.
    Secret {
        /// The secret shared with the TURN server.
        secret: String,
        /// How long the credentials are valid.
        ttl: Duration,
    },
}

/// A configured relay.
#[derive(Clone, PartialEq, Eq)]
pub struct Relay {
    /// The URL handed to peers: scheme, host, port and only the `transport` parameter.
    pub url: String,
    /// How credentials are made.
    pub credentials: Credentials,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never log secrets or passwords.
        f.write_str(match self {
            Credentials::None => "None",
            Credentials::Static { .. } => "Static(***)",
            Credentials::Secret { .. } => "Secret(***)",
        })
    }
}

impl fmt::Debug for Relay {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Relay")
            .field("url", &self.url)
            .field("credentials", &self.credentials)
            .finish()
    }
}

/// Why a relay URL was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid relay URL {url:?}: {reason}")]
pub struct RelayError {
    url: String,
    reason: String,
}

impl FromStr for Relay {
    type Err = RelayError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let err = |reason: &str| RelayError {
            url: redact(text),
            reason: reason.to_string(),
        };
        let (scheme, rest) = text
            .split_once(':')
            .ok_or_else(|| err("expected stun:, stuns:, turn: or turns:"))?;
        if !matches!(scheme, "stun" | "stuns" | "turn" | "turns") {
            return Err(err("scheme must be stun, stuns, turn or turns"));
        }
        let (authority, query) = rest.split_once('?').unwrap_or((rest, ""));
        let (userinfo, hostport) = match authority.rsplit_once('@') {
            Some((user, host)) => (Some(user), host),
            None => (None, authority),
        };
        if hostport.is_empty() || hostport.starts_with('/') {
            return Err(err("no host"));
        }
        let (host, port) = match hostport.rsplit_once(':') {
            Some((host, port)) if !port.contains(']') => {
                port.parse::<u16>()
                    .ok()
                    .filter(|p| *p != 0)
                    .ok_or_else(|| err("port is not a number from 1 to 65535"))?;
                (host, Some(port))
            }
            _ => (hostport, None),
        };
        if host.is_empty() {
            return Err(err("no host"));
        }
        let mut transport = None;
        let mut secret = None;
        let mut ttl = None;
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            if matches!(
                (k, &transport, &secret, &ttl),
                ("transport", Some(_), _, _) | ("secret", _, Some(_), _) | ("ttl", _, _, Some(_))
            ) {
                return Err(err(&format!("{k} is given twice")));
            }
            match k {
                "transport" => {
                    if !matches!(v, "udp" | "tcp") {
                        return Err(err("transport must be udp or tcp"));
                    }
                    transport = Some(v.to_string());
                }
                "secret" if v.is_empty() => return Err(err("secret is empty")),
                "secret" => secret = Some(v.to_string()),
                "ttl" => {
                    ttl = Some(
                        humantime::parse_duration(v)
                            .map_err(|e| err(&format!("ttl {v:?}: {e}")))?,
                    )
                }
                other => return Err(err(&format!("unknown parameter {other:?}"))),
            }
        }
        let credentials = match (userinfo, secret) {
            (Some(_), Some(_)) => return Err(err("give either USER:PASS@ or secret=, not both")),
            (Some(user), None) => {
                let (username, password) = user
                    .split_once(':')
                    .ok_or_else(|| err("credentials must be USER:PASS@"))?;
                Credentials::Static {
                    username: username.to_string(),
                    password: password.to_string(),
                }
            }
            (None, Some(secret)) => Credentials::Secret {
                secret,
                ttl: ttl.unwrap_or(DEFAULT_TTL),
            },
            (None, None) => Credentials::None,
        };
        if ttl.is_some() && !matches!(credentials, Credentials::Secret { .. }) {
            return Err(err("ttl only applies with secret="));
        }
        if scheme.starts_with("stun") && credentials != Credentials::None {
            return Err(err("a STUN server takes no credentials"));
        }
        let mut url = format!("{scheme}:{host}");
        if let Some(port) = port {
            url.push(':');
            url.push_str(port);
        }
        if let Some(transport) = transport {
            url.push_str("?transport=");
            url.push_str(&transport);
        }
        Ok(Relay { url, credentials })
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

impl Relay {
    /// The relay as handed to the peer with public key `peer`, at UNIX time `now`.
    pub fn info_for(&self, peer: &Key, now: u64) -> RelayInfo {
        let mut info = RelayInfo {
            url: self.url.clone(),
            ..Default::default()
        };
        match &self.credentials {
            Credentials::None => {}
            Credentials::Static { username, password } => {
                info.username = username.clone();
                info.password = password.clone();
            }
            Credentials::Secret { secret, ttl } => {
                let expiry = now.saturating_add(ttl.as_secs());
                let username = format!("{expiry}:{peer}");
                let mut mac = <Hmac<Sha1> as Mac>::new_from_slice(secret.as_bytes())
                    .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
                mac.update(username.as_bytes());
                info.password = STANDARD.encode(mac.finalize().into_bytes());
                info.username = username;
                info.expires = Some(Timestamp {
                    seconds: i32::try_from(expiry).unwrap_or(i32::MAX),
                    nanos: 0,
                });
            }
        }
        info
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn static_and_plain() {
        let r: Relay = "turn:alice:s3cret@turn.example.com:3478?transport=udp"
            .parse()
            .unwrap();
        assert_eq!(r.url, "turn:turn.example.com:3478?transport=udp");
        let info = r.info_for(&Key::ZERO, 0);
        assert_eq!(
            (info.username.as_str(), info.password.as_str()),
            ("alice", "s3cret")
        );
        assert_eq!(info.expires, None);
        let s: Relay = "stun:stun.example.com:3478".parse().unwrap();
        assert_eq!(s.credentials, Credentials::None);
        assert_eq!(s.url, "stun:stun.example.com:3478");
    }

    #[test]
    fn secret_gives_turn_rest_api_credentials() {
        let r: Relay = "turn:turn.example.com:3478?transport=tcp&secret=north&ttl=2h"
            .parse()
            .unwrap();
        assert_eq!(r.url, "turn:turn.example.com:3478?transport=tcp");
        let peer: Key = "3+zmlyn1r9Eimmw9jlLBlHUt75KzTf+LF17+M9nT8F4="
            .parse()
            .unwrap();
        let info = r.info_for(&peer, 1_700_000_000);
        assert_eq!(info.username, format!("1700007200:{peer}"));
        // echo -n "$username" | openssl dgst -sha1 -hmac north -binary | base64
        let mut mac = <Hmac<Sha1> as Mac>::new_from_slice(b"north").unwrap();
        mac.update(info.username.as_bytes());
        assert_eq!(info.password, STANDARD.encode(mac.finalize().into_bytes()));
        assert_eq!(info.expires.unwrap().seconds, 1_700_007_200);
        let default_ttl: Relay = "turn:h:1?secret=x".parse().unwrap();
        assert_eq!(
            default_ttl.info_for(&peer, 10).expires.unwrap().seconds,
            3610
        );
    }

    #[test]
    fn known_hmac_value() {
        // Computed independently: python3 -c "import hmac,hashlib,base64;
        // print(base64.b64encode(hmac.new(b'north',b'1433895918:alice',hashlib.sha1).digest()))"
        let mut mac = <Hmac<Sha1> as Mac>::new_from_slice(b"north").unwrap();
        mac.update(b"1433895918:alice");
        assert_eq!(
            STANDARD.encode(mac.finalize().into_bytes()),
            "RqMvcGPYTJMGThVLSi4amT4zFtI="
        );
    }

    #[test]
    fn bad_urls() {
        for bad in [
            "http://x:1",
            "turn:",
            "turn:h:99999",
            "turn:h:1?transport=sctp",
            "turn:u:p@h:1?secret=x",
            "turn:u@h:1",
            "stun:u:p@h:1",
            "turn:h:1?ttl=1h",
            "turn:h:1?foo=bar",
            "turn:h:0",
            "turn:h:1?secret=",
            "turn:h:1?secret=a&secret=b",
            "turn:h:1?transport=udp&transport=tcp",
        ] {
            assert!(bad.parse::<Relay>().is_err(), "{bad} accepted");
        }
        let e = "turn:u:p@h:1?transport=sctp"
            .parse::<Relay>()
            .unwrap_err()
            .to_string();
        assert!(!e.contains(":p@"), "password leaked into {e}");
    }
}
