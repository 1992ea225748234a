//! STUN/TURN relays handed out by `RelayRegistry.GetRelays` (docs/PROTOCOL.md §7).
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
    ice_url::{IceUrl, IceUrlError, IceUrlReason},
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

/// Why a relay URL was refused: the URL (credentials and query values hidden)
/// and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid relay URL {:?}: {}", .0.url, .0.reason)]
pub struct RelayUrlError(pub IceUrlError);

impl FromStr for Relay {
    type Err = RelayUrlError;

    /// The rules of [`IceUrl::parse`], plus `secret=` and `ttl=` and nothing
    /// else; what this accepts, a peer's ICE agent accepts.
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let url = IceUrl::parse(text).map_err(RelayUrlError)?;
        let err = |name: &str, why: &str| {
            RelayUrlError(IceUrlError::new(
                text,
                IceUrlReason::Param {
                    name: name.to_string(),
                    why: why.to_string(),
                },
            ))
        };
        let mut secret = None;
        let mut ttl = None;
        for (name, value) in &url.params {
            match name.as_str() {
                "secret" if value.is_empty() => return Err(err("secret", "is empty")),
                "secret" => secret = Some(value.clone()),
                "ttl" => {
                    ttl = Some(
                        humantime::parse_duration(value)
                            .map_err(|e| err("ttl", &format!("{value:?}: {e}")))?,
                    )
                }
                other => {
                    return Err(RelayUrlError(IceUrlError::new(
                        text,
                        IceUrlReason::UnknownParam(other.to_string()),
                    )));
                }
            }
        }
        let credentials = match (&url.credentials, secret) {
            (Some(_), Some(_)) => {
                return Err(err("secret", "give either USER:PASS@ or secret=, not both"));
            }
            (Some(user), None) => Credentials::Static {
                username: user.username.clone(),
                password: user.password.clone(),
            },
            (None, Some(secret)) => Credentials::Secret {
                secret,
                ttl: ttl.unwrap_or(DEFAULT_TTL),
            },
            (None, None) => Credentials::None,
        };
        if ttl.is_some() && !matches!(credentials, Credentials::Secret { .. }) {
            return Err(err("ttl", "only applies with secret="));
        }
        Ok(Relay {
            url: url.to_string(),
            credentials,
        })
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
        let info = r.info_for(&Key::from([0; 32]), 0);
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
            // Refused by the ICE agents that would get it.
            "stun:h:1?transport=udp",
            "turn:2001:db8::1",
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
