//! Why the server refuses a request, ends a call, a stream or a connection,
//! or drops an envelope, in one place. Each counter that counts by reason
//! has one enum here; each variant knows the label the counter shows, and
//! every variant is shown at 0 from the start (a rate over a series that
//! appears only with its first event misses that event). What a client is
//! told, [`Refusal`], [`CallEnded`] and [`Cut`] also know: their gRPC
//! status, and the line the log writes.

use std::{fmt, time::Duration};

use tonic::Status;

use crate::client::{Client, Exhausted, Refused};

/// A key field checked to be 32 bytes.
pub(crate) fn key_field(field: &'static str, bytes: &[u8]) -> Result<[u8; 32], Refusal> {
    <[u8; 32]>::try_from(bytes).map_err(|_| Refusal::InvalidKey {
        field,
        len: bytes.len(),
    })
}

/// Defines an enum of reasons: each variant with the label value its
/// counter shows, and `ALL`, every variant.
macro_rules! reasons {
    (
        $(#[$meta:meta])*
        $vis:vis enum $name:ident {
            $( $(#[$vmeta:meta])* $variant:ident = $label:literal, )+
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        $vis enum $name {
            $( $(#[$vmeta])* $variant, )+
        }

        impl $name {
            /// Every reason, each shown at 0 from the start.
            pub(crate) const ALL: &'static [$name] = &[$( $name::$variant, )+];

            /// The label value its counter shows.
            pub(crate) const fn label(self) -> &'static str {
                match self {
                    $( $name::$variant => $label, )+
                }
            }
        }
    };
}

reasons! {
    /// Why a request was refused (`signaling_requests_rejected_total`).
    pub(crate) enum Rejected {
        /// A key field is not 32 bytes.
        InvalidKey = "invalid_key",
        /// The request message does not decode, is compressed, cut short or
        /// followed by another.
        Malformed = "malformed",
        /// The request message is larger than the server takes.
        Oversize = "oversize",
        /// The request message did not arrive within the request timeout.
        RequestTimeout = "request_timeout",
        /// The client holds all the bytes it may.
        ClientBudget = "client_budget",
        /// The server holds all the bytes it may.
        ServerBudget = "server_budget",
        /// The key has all the subscriptions it may, the client its share.
        KeySubscriptions = "too_many_key_subscriptions",
        /// The answer of a call was not read within the request timeout.
        AnswerUnread = "answer_unread",
        ClientSubscriptions = "too_many_client_subscriptions",
        Subscriptions = "too_many_subscriptions",
        AddressSubscriptions = "too_many_address_subscriptions",
        ClientCalls = "too_many_client_calls",
        Calls = "too_many_calls",
        AddressCalls = "too_many_address_calls",
        ClientServiceCalls = "too_many_client_service_calls",
        ServiceCalls = "too_many_service_calls",
        ClientHealthChecks = "too_many_client_health_checks",
        HealthChecks = "too_many_health_checks",
        ClientHealthWatches = "too_many_client_health_watches",
        HealthWatches = "too_many_health_watches",
        RequestRate = "request_rate",
        PublishRate = "publish_rate",
        AddressPublishRate = "address_publish_rate",
        PublishBytesRate = "publish_bytes_rate",
        AddressPublishBytesRate = "address_publish_bytes_rate",
    }
}

reasons! {
    /// Why a connection was refused at accept
    /// (`signaling_connections_refused_total`).
    pub(crate) enum ConnectionRefused {
        ClientConnections = "too_many_client_connections",
        Connections = "too_many_connections",
        AddressConnections = "too_many_address_connections",
        AddressConnectionRate = "address_connection_rate",
        /// Its address started TLS handshakes faster than it may.
        TlsHandshakeRate = "tls_handshake_rate",
    }
}

reasons! {
    /// Why the server closed a connection
    /// (`signaling_connections_closed_total`).
    pub(crate) enum ConnectionClosed {
        /// TLS and HTTP/2 were not set up within the handshake timeout.
        HandshakeTimeout = "handshake_timeout",
        /// Nothing open on it for the idle timeout.
        Idle = "idle",
        /// It did not answer a keepalive ping in time.
        KeepaliveTimeout = "keepalive_timeout",
        /// It kept sending requests past its rate.
        RequestRate = "request_rate",
        /// Ended for another client's fair share of the connections.
        FairShare = "fair_share",
        /// Admitted beyond its address's per-client limit, its first call
        /// proved no key.
        Unproven = "unproven",
    }
}

reasons! {
    /// Why the server ended a call before it was done
    /// (`signaling_calls_ended_total`).
    pub(crate) enum CallEnded {
        /// No request bytes within the first-bytes timeout.
        FirstBytesTimeout = "first_bytes_timeout",
        /// The server was at a cap of calls and this client held the most.
        FairShare = "fair_share",
        /// A health watch stream reached its end.
        HealthWatchLifetime = "health_watch_lifetime",
    }
}

reasons! {
    /// Why the server ended a subscription stream of its own accord
    /// (`signaling_subscribers_cut_total`).
    pub(crate) enum Cut {
        /// It took too little of what waited for it over the stall timeout.
        Stalled = "stalled",
        /// Its key was removed from the allowed keys.
        NotAllowed = "not_allowed",
        /// Its key was full and a client with less than its share of it came.
        KeyFairShare = "key_fair_share",
        /// The server's byte budget was full, its client held the most of
        /// it, and a subscriber of a client with less than its share needed
        /// room.
        QueueFairShare = "queue_fair_share",
        /// The server held all the subscriptions it may, its client the
        /// most, and a client with less than its share came.
        FairShare = "fair_share",
    }
}

reasons! {
    /// Why an envelope was dropped (`signaling_envelopes_dropped_total`).
    pub(crate) enum Dropped {
        /// A subscription's own queue was full and lost its oldest envelope.
        QueueFull = "queue_full",
        /// The subscriber's client held all the bytes it may.
        ClientBudget = "client_budget",
        /// The server held all the bytes it may.
        ServerBudget = "server_budget",
        /// Nobody was subscribed to its key.
        NoSubscriber = "no_subscriber",
    }
}

reasons! {
    /// Why an envelope was not sent to or not taken from NATS
    /// (`signaling_cluster_dropped_total`).
    pub(crate) enum ClusterDropped {
        /// NATS was away long enough to fill the buffer for it.
        BufferFull = "buffer_full",
        /// The server held all the bytes it may.
        ServerBudget = "server_budget",
        /// NATS hung or was away and its client's buffer was full.
        NatsBufferFull = "nats_buffer_full",
        /// NATS refused the publish.
        PublishFailed = "publish_failed",
        /// NATS said this replica reads too slowly.
        SlowConsumer = "slow_consumer",
        /// What came from NATS is not an envelope of the key.
        Invalid = "invalid",
        /// What came from NATS was this replica's own.
        Own = "own",
        /// The replica was stopping.
        Closed = "closed",
    }
}

reasons! {
    /// What the check of a proof of key possession found
    /// (`signaling_auth_total`, label `result`).
    pub(crate) enum AuthResult {
        Ok = "ok",
        Missing = "missing",
        Malformed = "malformed",
        BadBox = "bad_box",
        WrongKey = "wrong_key",
        Expired = "expired",
        Replayed = "replayed",
        LowOrder = "low_order",
        NotAllowed = "not_allowed",
        CacheFull = "cache_full",
        KeyQuota = "key_quota",
        ClientQuota = "client_quota",
        UnknownKeyRate = "unknown_key_rate",
    }
}

/// Where a refusal of one of the client's limits is counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Counted {
    /// A refused request.
    Request(Rejected),
    /// A connection refused at accept.
    Connection(ConnectionRefused),
    /// A connection closed at its first call.
    Closed(ConnectionClosed),
}

impl Refused {
    /// Which counter counts it, and under which reason.
    pub(crate) fn counted(&self) -> Counted {
        use Counted::{Closed, Connection, Request};
        match self {
            Refused::ClientConnections(..) => Connection(ConnectionRefused::ClientConnections),
            Refused::Connections(..) => Connection(ConnectionRefused::Connections),
            Refused::AddressConnections(..) => Connection(ConnectionRefused::AddressConnections),
            Refused::AddressConnectionRate(..) => {
                Connection(ConnectionRefused::AddressConnectionRate)
            }
            Refused::Unproven(..) => Closed(ConnectionClosed::Unproven),
            Refused::ClientSubscriptions(..) => Request(Rejected::ClientSubscriptions),
            Refused::Subscriptions(..) => Request(Rejected::Subscriptions),
            Refused::AddressSubscriptions(..) => Request(Rejected::AddressSubscriptions),
            Refused::ClientCalls(..) => Request(Rejected::ClientCalls),
            Refused::Calls(..) => Request(Rejected::Calls),
            Refused::AddressCalls(..) => Request(Rejected::AddressCalls),
            Refused::ClientBridged(..) => Request(Rejected::ClientServiceCalls),
            Refused::Bridged(..) => Request(Rejected::ServiceCalls),
            Refused::ClientHealthChecks(..) => Request(Rejected::ClientHealthChecks),
            Refused::HealthChecks(..) => Request(Rejected::HealthChecks),
            Refused::ClientHealthWatches(..) => Request(Rejected::ClientHealthWatches),
            Refused::HealthWatches(..) => Request(Rejected::HealthWatches),
            Refused::RequestRate(..) => Request(Rejected::RequestRate),
            Refused::PublishRate(..) => Request(Rejected::PublishRate),
            Refused::AddressPublishRate(..) => Request(Rejected::AddressPublishRate),
            Refused::PublishBytesRate(..) => Request(Rejected::PublishBytesRate),
            Refused::AddressPublishBytesRate(..) => Request(Rejected::AddressPublishBytesRate),
        }
    }
}

/// A key has all the subscriptions it may, and the client holds its share.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "key {key} has reached the limit of {limit} subscriptions, and {client} holds its share of them"
)]
pub(crate) struct KeyFull {
    pub(crate) key: cunicu_signal::Key,
    pub(crate) limit: usize,
    pub(crate) client: Client,
}

/// A request the server refuses: its reason, the status that answers it
/// and (its `Display`) the line the log writes.
#[derive(Debug)]
pub(crate) enum Refusal {
    /// A limit of the client, its address or the server.
    Limit(Refused),
    /// A byte budget has no room for the request.
    Budget(Exhausted),
    /// The key has all the subscriptions it may.
    KeyFull(KeyFull),
    /// The request message does not decode (`what` it should have been).
    Malformed { what: &'static str, error: String },
    /// The request message is not one whole uncompressed message.
    Framing(Status),
    /// A key field is not 32 bytes.
    InvalidKey { field: &'static str, len: usize },
    /// The request message is larger than the server takes.
    Oversize {
        what: &'static str,
        len: usize,
        limit: usize,
    },
    /// The request message did not arrive within the request timeout.
    RequestTimeout(Duration),
}

impl Refusal {
    /// The reason its counter shows.
    pub(crate) fn reason(&self) -> Counted {
        Counted::Request(match self {
            Refusal::Limit(refused) => return refused.counted(),
            Refusal::Budget(Exhausted::Client) => Rejected::ClientBudget,
            Refusal::Budget(Exhausted::Server) => Rejected::ServerBudget,
            Refusal::KeyFull(_) => Rejected::KeySubscriptions,
            Refusal::Malformed { .. } | Refusal::Framing(_) => Rejected::Malformed,
            Refusal::InvalidKey { .. } => Rejected::InvalidKey,
            Refusal::Oversize { .. } => Rejected::Oversize,
            Refusal::RequestTimeout(_) => Rejected::RequestTimeout,
        })
    }

    /// The status that answers it.
    pub(crate) fn status(&self) -> Status {
        match self {
            Refusal::Limit(refused) => refused.status(),
            Refusal::Budget(_) | Refusal::KeyFull(_) | Refusal::Oversize { .. } => {
                Status::resource_exhausted(self.to_string())
            }
            Refusal::Malformed { .. } => Status::internal(self.to_string()),
            Refusal::Framing(status) => status.clone(),
            Refusal::InvalidKey { .. } => Status::invalid_argument(self.to_string()),
            Refusal::RequestTimeout(_) => Status::deadline_exceeded(self.to_string()),
        }
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::Limit(refused) => refused.fmt(f),
            Refusal::Budget(Exhausted::Client) => {
                f.write_str("this client holds all the bytes it may")
            }
            Refusal::Budget(Exhausted::Server) => {
                f.write_str("the server holds all the bytes it may")
            }
            Refusal::KeyFull(full) => full.fmt(f),
            Refusal::Malformed { what, error } => write!(f, "{what} does not decode: {error}"),
            Refusal::Framing(status) => f.write_str(status.message()),
            Refusal::InvalidKey { field, len } => {
                write!(f, "{field} key is {len} bytes, expected 32")
            }
            Refusal::Oversize { what, len, limit } => {
                write!(f, "{what} is {len} bytes, the limit is {limit}")
            }
            Refusal::RequestTimeout(timeout) => {
                write!(f, "the request message did not arrive within {timeout:?}")
            }
        }
    }
}

impl From<Refused> for Refusal {
    fn from(refused: Refused) -> Self {
        Refusal::Limit(refused)
    }
}

impl From<Exhausted> for Refusal {
    fn from(exhausted: Exhausted) -> Self {
        Refusal::Budget(exhausted)
    }
}

impl From<KeyFull> for Refusal {
    fn from(full: KeyFull) -> Self {
        Refusal::KeyFull(full)
    }
}

impl ConnectionClosed {
    /// Why, as the log says it.
    pub(crate) fn log_line(self) -> &'static str {
        match self {
            ConnectionClosed::HandshakeTimeout => {
                "no TLS and HTTP/2 set-up, or no first request, within the handshake timeout"
            }
            ConnectionClosed::Idle => "nothing open on it for the idle timeout",
            ConnectionClosed::KeepaliveTimeout => "no answer to a keepalive ping in time",
            ConnectionClosed::RequestRate => "it kept sending requests faster than it may",
            ConnectionClosed::FairShare => {
                "the server holds all the connections it may, this client the most, \
                 and another needed its share"
            }
            ConnectionClosed::Unproven => {
                "admitted beyond its address's per-client limit, its first call proved no key"
            }
        }
    }
}

impl CallEnded {
    /// The status that ends the call; `first_bytes` is the first-bytes
    /// timeout.
    pub(crate) fn status(self, first_bytes: Duration) -> Status {
        match self {
            CallEnded::FirstBytesTimeout => Status::deadline_exceeded(format!(
                "no request message bytes within {first_bytes:?} of the headers"
            )),
            CallEnded::FairShare => Status::resource_exhausted(
                "the server is at its limit of calls in progress, and this client held the most: \
                 its newest call was ended for a client below its fair share",
            ),
            CallEnded::HealthWatchLifetime => Status::ok(""),
        }
    }
}

impl Cut {
    /// The status that ends the stream.
    pub(crate) fn status(self) -> Status {
        match self {
            Cut::Stalled => Status::unavailable("subscriber too slow"),
            Cut::NotAllowed => Status::permission_denied("this key is no longer allowed here"),
            Cut::QueueFairShare => Status::resource_exhausted(
                "the server holds all the bytes it may, and this client held the most: \
                 its newest subscription was ended for a client below its fair share",
            ),
            Cut::KeyFairShare => Status::resource_exhausted(
                "this key has all the subscriptions it may, and another client needed its share",
            ),
            Cut::FairShare => Status::resource_exhausted(
                "the server holds all the subscriptions it may: this client held the most, \
                 and another needed its share",
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use tonic::Code;

    use super::*;

    fn unique<R: Copy>(all: &[R], label: fn(R) -> &'static str) -> bool {
        all.iter().map(|&r| label(r)).collect::<HashSet<_>>().len() == all.len()
    }

    #[test]
    fn no_two_reasons_of_a_counter_share_a_label() {
        assert!(unique(Rejected::ALL, Rejected::label));
        assert!(unique(ConnectionRefused::ALL, ConnectionRefused::label));
        assert!(unique(ConnectionClosed::ALL, ConnectionClosed::label));
        assert!(unique(CallEnded::ALL, CallEnded::label));
        assert!(unique(Cut::ALL, Cut::label));
        assert!(unique(Dropped::ALL, Dropped::label));
        assert!(unique(ClusterDropped::ALL, ClusterDropped::label));
        assert!(unique(AuthResult::ALL, AuthResult::label));
    }

    #[test]
    fn each_refusal_has_its_status_reason_and_words() {
        let client = Client::Address("192.0.2.1".parse().expect("an address"));
        let cases = [
            (
                Refusal::Budget(Exhausted::Client),
                Code::ResourceExhausted,
                Rejected::ClientBudget,
                "this client holds all the bytes it may",
            ),
            (
                Refusal::InvalidKey {
                    field: "sender",
                    len: 31,
                },
                Code::InvalidArgument,
                Rejected::InvalidKey,
                "sender key is 31 bytes, expected 32",
            ),
            (
                Refusal::Oversize {
                    what: "envelope",
                    len: 70_000,
                    limit: 65_536,
                },
                Code::ResourceExhausted,
                Rejected::Oversize,
                "envelope is 70000 bytes, the limit is 65536",
            ),
            (
                Refusal::RequestTimeout(Duration::from_secs(10)),
                Code::DeadlineExceeded,
                Rejected::RequestTimeout,
                "the request message did not arrive within 10s",
            ),
            (
                Refusal::Limit(Refused::ClientCalls(client, 64)),
                Code::ResourceExhausted,
                Rejected::ClientCalls,
                "192.0.2.1 has reached the limit of 64 calls in progress per client",
            ),
        ];
        for (refusal, code, reason, words) in cases {
            assert_eq!(refusal.reason(), Counted::Request(reason), "{refusal}");
            let status = refusal.status();
            assert_eq!(status.code(), code, "{refusal}");
            assert_eq!(status.message(), words);
            assert_eq!(refusal.to_string(), words);
        }
        // A rate says when to come back.
        let rate = Refusal::Limit(Refused::PublishRate(client, 10, Duration::from_millis(250)));
        assert!(
            rate.status()
                .metadata()
                .get("grpc-retry-pushback-ms")
                .is_some()
        );
        // Refusals of connections are counted where connections are.
        assert_eq!(
            Refused::Unproven(client, 64).counted(),
            Counted::Closed(ConnectionClosed::Unproven)
        );
    }
}
