//! What every connection task shares: the hub, the clients and their
//! limits, the services served through tonic, the timeouts, and the
//! settings of the calls the connection serves itself.

use std::{fmt, net::SocketAddr, sync::Arc, time::Duration};

use cunicu_signal::{
    backend::grpc::{RECIPIENTS_ASK, RECIPIENTS_METADATA},
    log_limit::LogLimiter,
};
use h2::server::Builder;
use http::HeaderMap;
use tonic::{Status, service::Routes};

use crate::{
    auth::Auth,
    client::Clients,
    cluster::Cluster,
    deadlines::ConnectionTimeouts,
    drain::DrainPlan,
    hub::Hub,
    metrics::Metrics,
    refusal::{CallEnded, ConnectionClosed, Refusal},
    transport::Tls,
};

/// Timeouts of a connection.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Timeouts {
    /// TLS handshake, HTTP/2 preface and the first request.
    pub(crate) handshake: Duration,
    /// A request's first message bytes, once its stream is open.
    pub(crate) first_bytes: Duration,
    /// A request's whole message, once its stream is open.
    pub(crate) request: Duration,
    /// A connection without streams.
    pub(crate) idle: Duration,
    /// The span over which a subscriber's drain rate is judged.
    pub(crate) stall: Duration,
    /// Interval of keepalive pings.
    pub(crate) keepalive_interval: Duration,
    /// How long a ping may go unanswered.
    pub(crate) keepalive_timeout: Duration,
}

impl Timeouts {
    /// Those of a connection's own deadlines.
    pub(crate) fn connection(&self) -> ConnectionTimeouts {
        ConnectionTimeouts {
            idle: self.idle,
            keepalive_interval: self.keepalive_interval,
            keepalive_timeout: self.keepalive_timeout,
            stall: self.stall,
        }
    }
}

/// What every connection task shares.
pub(crate) struct Shared {
    pub(crate) hub: Hub,
    /// The other replicas, if this server is one of several.
    pub(crate) cluster: Option<Arc<Cluster>>,
    pub(crate) clients: Arc<Clients>,
    pub(crate) metrics: Arc<Metrics>,
    /// The services served through tonic.
    pub(crate) routes: Routes,
    pub(crate) timeouts: Timeouts,
    pub(crate) max_envelope_size: usize,
    pub(crate) h2: Builder,
    pub(crate) tls: Option<Tls>,
    /// Metadata of every response.
    pub(crate) response_headers: HeaderMap,
    /// Proofs of key possession.
    pub(crate) auth: Arc<Auth>,
    /// Whether and how a Publish learns its recipient count.
    pub(crate) recipients: Recipients,
    pub(crate) logs: Logs,
    /// When each stream open at shutdown ends.
    pub(crate) drain: DrainPlan,
}

impl Shared {
    /// Refuses a request of `who`: counts it, logs it (a few times a second
    /// at most), and gives the status that answers it.
    pub(crate) fn refuse(&self, refusal: impl Into<Refusal>, who: &dyn fmt::Display) -> Status {
        refuse(&self.metrics, &self.logs, refusal.into(), who)
    }

    /// Closes a connection from `remote`: counts it, and logs it (a few
    /// times a second at most; an idle one only at debug).
    pub(crate) fn close(&self, why: ConnectionClosed, remote: &SocketAddr) {
        self.metrics.count(why);
        let line = why.log_line();
        if why == ConnectionClosed::Idle {
            tracing::debug!(%remote, "connection closed: {line}");
        } else if self.logs.closed.allow() {
            tracing::info!(%remote, "connection closed: {line}");
        }
    }

    /// Ends a call before it is done: counts it, and gives the status that
    /// ends it.
    pub(crate) fn end_call(&self, why: CallEnded) -> Status {
        self.metrics.count(why);
        why.status(self.timeouts.first_bytes)
    }
}

/// Refuses a request of `who`: counts it, logs it (as `logs` allow), and
/// gives the status that answers it.
pub(crate) fn refuse(
    metrics: &Metrics,
    logs: &Logs,
    refusal: Refusal,
    who: &dyn fmt::Display,
) -> Status {
    if logs.refused.allow() {
        tracing::info!(%who, "request refused: {refusal}");
    }
    metrics.refuse(refusal)
}

/// Recipient counts: a Publish with `cunicu-recipients: ask` learns how many
/// subscription streams got its envelope, on every replica.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Recipients {
    /// Off: `ask` is answered with nothing (presence is private).
    pub(crate) enabled: bool,
    /// How long a replica collects the counts of the others.
    pub(crate) wait: Duration,
}

impl Recipients {
    /// Whether the request asks for a count and gets one.
    pub(crate) fn answers(&self, headers: &HeaderMap) -> bool {
        self.enabled
            && headers
                .get(RECIPIENTS_METADATA)
                .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(RECIPIENTS_ASK.as_bytes()))
    }
}

/// Log limiters of what clients can cause many times.
#[derive(Default)]
pub(crate) struct Logs {
    pub(crate) refused: LogLimiter,
    pub(crate) cut: LogLimiter,
    pub(crate) closed: LogLimiter,
}
