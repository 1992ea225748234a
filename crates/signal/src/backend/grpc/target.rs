//! Where and how to reach the server: what a `grpc://` URL and [`GrpcOptions`] say.

use std::{path::PathBuf, time::Duration};

use super::{BackendError, bool_param, check_params};

use crate::Key;

/// Settings of the gRPC backend that URLs do not carry.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct GrpcOptions {
    /// Deadline of one `Publish`.
    pub publish_timeout: Duration,
    /// How long `listen` waits for the server's sync envelope.
    pub subscribe_timeout: Duration,
    /// Deadline of establishing the TCP (and TLS) connection.
    pub connect_timeout: Duration,
    /// Interval of HTTP/2 keepalive pings. cunīcu's server closes connections
    /// that ping more often than every 5 minutes.
    pub keepalive_interval: Duration,
    /// How long to wait for a ping's answer before the connection counts as dead.
    pub keepalive_timeout: Duration,
    /// First delay before a broken stream is opened again.
    pub backoff_min: Duration,
    /// Longest delay between attempts.
    pub backoff_max: Duration,
}

impl Default for GrpcOptions {
    fn default() -> Self {
        GrpcOptions {
            publish_timeout: Duration::from_secs(10),
            subscribe_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(5),
            keepalive_interval: Duration::from_secs(330),
            keepalive_timeout: Duration::from_secs(20),
            backoff_min: Duration::from_millis(100),
            backoff_max: Duration::from_secs(30),
        }
    }
}

/// Where and how to reach the server, parsed from a `grpc://` URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GrpcTarget {
    /// Host name or address.
    pub host: String,
    /// TCP port.
    pub port: u16,
    /// Security of the connection.
    pub security: Security,
    /// The server's key, pinned by `server_key=` (docs/PROTOCOL.md §11): a server that
    /// presents another is refused.
    pub server_key: Option<Key>,
}

/// How the connection to the server is secured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Security {
    /// Plain HTTP/2 (`insecure=true`).
    Plaintext,
    /// TLS, trusting the system's root certificates.
    SystemRoots,
    /// TLS, trusting only the PEM certificates in this file (`ca=FILE`).
    CaFile(PathBuf),
    /// TLS without any certificate check (`skip_verify=true`).
    SkipVerify,
}

impl GrpcTarget {
    /// Parses `grpc://HOST:PORT[?insecure=true][&skip_verify=true][&ca=FILE][&server_key=KEY]`.
    pub fn parse(url: &url::Url) -> Result<Self, BackendError> {
        check_params(url, &["insecure", "skip_verify", "ca", "server_key"])?;
        let host = match url.host() {
            Some(url::Host::Ipv6(ip)) => ip.to_string(),
            Some(host) => host.to_string(),
            None => {
                return Err(BackendError::url(
                    url,
                    "no host (expected grpc://HOST:PORT)",
                ));
            }
        };
        let port = url
            .port()
            .ok_or_else(|| BackendError::url(url, "no port (expected grpc://HOST:PORT)"))?;
        if !matches!(url.path(), "" | "/") {
            return Err(BackendError::url(url, "a grpc URL has no path"));
        }
        let insecure = bool_param(url, "insecure")?.unwrap_or(false);
        let skip_verify = bool_param(url, "skip_verify")?.unwrap_or(false);
        let ca = url
            .query_pairs()
            .find(|(k, _)| k == "ca")
            .map(|(_, v)| PathBuf::from(v.as_ref()));
        let security = match (insecure, skip_verify, ca) {
            (true, false, None) => Security::Plaintext,
            (true, _, _) => {
                return Err(BackendError::url(
                    url,
                    "insecure=true (no TLS) cannot be combined with skip_verify or ca",
                ));
            }
            (false, true, None) => Security::SkipVerify,
            (false, true, Some(_)) => {
                return Err(BackendError::url(
                    url,
                    "skip_verify=true and ca=FILE contradict each other",
                ));
            }
            (false, false, Some(ca)) => Security::CaFile(ca),
            (false, false, None) => Security::SystemRoots,
        };
        let server_key = url
            .query_pairs()
            .find(|(k, _)| k == "server_key")
            .map(|(_, v)| {
                // Form decoding reads a `+` as a space: a base64 key has no spaces.
                let text = v.replace(' ', "+");
                text.parse::<Key>().map_err(|e| {
                    BackendError::url(
                        url,
                        format!("server_key={text:?}: {e} (percent-encode + / =)"),
                    )
                })
            })
            .transpose()?;
        Ok(GrpcTarget {
            host,
            port,
            security,
            server_key,
        })
    }
}
