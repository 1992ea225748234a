//! What can go wrong with the gRPC medium, and how it reads in one line.

use std::time::Duration;

use tonic::Status;

use super::metadata::pushback;

use crate::{Key, auth::SERVER_KEY_METADATA};

/// A gRPC status as one short line.
pub(super) fn status_text(status: &Status) -> String {
    if let Some(problem) = connection_problem(status) {
        return problem.to_string();
    }
    let mut text = format!("{:?}", status.code());
    if !status.message().is_empty() {
        text.push_str(": ");
        text.push_str(status.message());
    }
    // Transport errors carry their cause as the source.
    if let Some(source) = std::error::Error::source(status) {
        text.push_str(&format!(" ({source})"));
    }
    text
}

/// What to tell a user whose connection failed in a way they can act on:
/// nothing listens there, or a TLS client met a plaintext server.
pub(super) fn connection_problem(status: &Status) -> Option<&'static str> {
    let mut source = std::error::Error::source(status);
    while let Some(error) = source {
        let tls = |e: &(dyn std::error::Error + 'static)| {
            matches!(
                e.downcast_ref::<rustls::Error>(),
                Some(rustls::Error::InvalidMessage(
                    rustls::InvalidMessage::InvalidContentType
                ))
            )
        };
        if tls(error) {
            return Some("the server speaks plaintext: add ?insecure=true to the URL");
        }
        if let Some(io) = error.downcast_ref::<std::io::Error>() {
            if io.kind() == std::io::ErrorKind::ConnectionRefused {
                return Some("connection refused: is the server running, on this host and port?");
            }
            if io.get_ref().is_some_and(|inner| tls(inner)) {
                return Some("the server speaks plaintext: add ?insecure=true to the URL");
            }
        }
        source = error.source();
    }
    None
}

/// Why the gRPC medium failed: the source of a
/// [`BackendError::Transport`](crate::BackendError::Transport) from this backend (get it with
/// [`BackendError::medium`](crate::BackendError::medium)).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum GrpcError {
    /// The server, or the connection to it, answered a call with a status.
    #[error("{what}: {}", status_text(.status))]
    Status {
        /// The call: `publish`, `subscribe`, `server key`.
        what: &'static str,
        /// The gRPC status (connection failures are `Unavailable`).
        status: Status,
    },
    /// A call got no answer in time.
    #[error("{what}: no answer within {timeout:?}")]
    Timeout {
        /// The call.
        what: &'static str,
        /// How long it waited.
        timeout: Duration,
    },
    /// The server refused a publish for a rate, also after waiting as long
    /// as it asked, as often as the backend tries.
    #[error("{}: rate limited by the server (tried again {retries} times after waiting {waited:?} in all)", status_text(.status))]
    RateLimited {
        /// Times it was tried again.
        retries: u32,
        /// How long those tries waited in all.
        waited: Duration,
        /// The last refusal.
        status: Status,
    },
    /// A Subscribe stream ended before the server confirmed it.
    #[error("subscribe: the server ended the stream before confirming the subscription")]
    NoSync,
    /// No proof of key possession could be made for this key (docs/PROTOCOL.md §11).
    #[error("proof of key possession: {0}")]
    Proof(#[source] crate::EnvelopeError),
    /// The server's `cunicu-server-key` is not a key.
    #[error("the server's key in {SERVER_KEY_METADATA} is not a key: {0}")]
    BadServerKey(String),
    /// The server is not the one pinned with `server_key=`.
    #[error("the server presents key {}, not the pinned server_key {pinned}", .presented.map(|k| k.to_string()).unwrap_or_else(|| "none".into()))]
    OtherServerKey {
        /// The key of the URL.
        pinned: Key,
        /// What the server presented, if anything.
        presented: Option<Key>,
    },
}

impl GrpcError {
    /// How long the server asked to wait before trying again, if it
    /// refused for a rate (`grpc-retry-pushback-ms`).
    pub fn pushback(&self) -> Option<Duration> {
        match self {
            GrpcError::Status { status, .. } | GrpcError::RateLimited { status, .. } => {
                pushback(status)
            }
            _ => None,
        }
    }

    /// The gRPC status code, for [`GrpcError::Status`].
    pub fn code(&self) -> Option<tonic::Code> {
        match self {
            GrpcError::Status { status, .. } | GrpcError::RateLimited { status, .. } => {
                Some(status.code())
            }
            _ => None,
        }
    }

    /// True if trying again later may succeed: the server is unreachable,
    /// overloaded, slow or restarting. False for what a retry does not cure:
    /// a refused key or proof, an invalid request, another server than the
    /// pinned one.
    pub fn is_transient(&self) -> bool {
        use tonic::Code;
        match self {
            GrpcError::Status { status, .. } => matches!(
                status.code(),
                Code::Unavailable
                    | Code::DeadlineExceeded
                    | Code::ResourceExhausted
                    | Code::Aborted
                    | Code::Cancelled
                    | Code::Unknown
                    | Code::Internal
            ),
            GrpcError::Timeout { .. } | GrpcError::NoSync | GrpcError::RateLimited { .. } => true,
            GrpcError::Proof(_) | GrpcError::BadServerKey(_) | GrpcError::OtherServerKey { .. } => {
                false
            }
        }
    }
}
