//! The server's settings, their defaults and checks, and the worst-case
//! memory they add up to (docs/PROTOCOL.md §10).

use std::{fmt, net::SocketAddr, num::NonZeroU32, path::PathBuf, time::Duration};

use cunicu_signal::PrivateKey;

use crate::{
    auth::{AuthMode, NONCE_BYTES, UNKNOWN_KEY_BYTES},
    bounds::{
        BRIDGED_CALLS, CALL_EVICTIONS_IN_FLIGHT, CONNECTION_WINDOW, EVICTIONS_IN_FLIGHT,
        HEALTH_CHECKS, HEALTH_WATCHES, MAX_HEADER_LIST, MAX_HEALTH_REQUEST_BYTES, MAX_NONCES,
        MAX_REQUEST_BYTES, NATS_UNFLUSHED_BYTES, SEND_BUFFER, SHARED_KEYS, STREAM_WINDOW,
    },
    client::{AddressLimits, ClientLimits, Rate},
    hub::QueueLimits,
    relay::Relay,
    shared::{Recipients, Timeouts},
};

/// How the server runs. `Default` gives the built-in defaults, which the
/// command line shows and uses too.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Config {
    /// Address of the gRPC port.
    pub listen: SocketAddr,
    /// Address of the metrics port; none by default.
    pub metrics_listen: Option<SocketAddr>,
    /// STUN/TURN relays handed out by `GetRelays`.
    pub relays: Vec<Relay>,
    /// PEM certificate chain and key files; plaintext HTTP/2 without them.
    pub tls: Option<TlsFiles>,
    /// Largest encoded envelope accepted by Publish.
    pub max_envelope_size: usize,
    /// Envelopes queued per subscription stream before the oldest is dropped.
    pub queue_depth: usize,
    /// Bytes queued per subscription stream before the oldest is dropped.
    pub queue_bytes: usize,
    /// Bytes one client may make the server hold for its subscriptions:
    /// queued, and handed to HTTP/2 and not yet written. Beyond it, that
    /// client's oldest envelopes are dropped. (Its requests being read are
    /// bounded by its calls in progress times the largest envelope.)
    pub client_queued_bytes: usize,
    /// Bytes held for all clients together: the above, and every request
    /// being read.
    pub max_queued_bytes: usize,
    /// A subscriber whose connection took less than a quarter of the bytes
    /// it owed over a span this long, during which envelopes waited for it,
    /// is cut off (UNAVAILABLE "subscriber too slow").
    pub stall_timeout: Duration,
    /// Most client connections open at once. At the cap, a client holding
    /// less than its fair share (the cap divided by the clients holding any)
    /// is still served: the client holding the most loses its newest
    /// connection.
    pub max_connections: usize,
    /// Most connections open at once from one client (a proven key, or an
    /// IP address, an IPv6 /64, without proof). More from one address are
    /// admitted provisionally, within the address's bound: the first call of
    /// each must prove a key, or it is closed.
    pub max_connections_per_client: usize,
    /// New connections per second from one client (a token bucket).
    pub connection_rate: Rate,
    /// Deadline of a connection's TLS handshake, HTTP/2 preface and first request.
    pub handshake_timeout: Duration,
    /// TLS handshakes in progress at once; beyond, connections wait their
    /// turn (within the handshake timeout).
    pub max_tls_handshakes: usize,
    /// TLS handshakes started per second, from all clients together (a token
    /// bucket); beyond, connections are closed at once. Each costs the
    /// certificate's signature: about 1 ms of CPU with RSA-2048, a quarter
    /// of that with ECDSA P-256.
    pub tls_handshake_rate: Rate,
    /// Deadline of a request's message once its stream opened.
    pub request_timeout: Duration,
    /// Deadline of a request's first message bytes once its stream opened:
    /// a call opened with headers alone ends then (DEADLINE_EXCEEDED), so
    /// that it holds its slots for about a second, not the request timeout.
    pub first_bytes_timeout: Duration,
    /// A `grpc.health.v1.Health/Watch` stream ends (OK) after this long;
    /// the watcher opens another.
    pub health_watch_lifetime: Duration,
    /// A connection without a stream for this long is closed with GOAWAY.
    pub idle_timeout: Duration,
    /// Most subscription streams open at once. At the cap, a client holding
    /// less than its fair share is still served: the client holding the
    /// most loses its newest subscription.
    pub max_subscriptions: usize,
    /// Most subscription streams open at once from one client.
    pub max_subscriptions_per_client: usize,
    /// Most subscription streams open at once on one key (a key is one peer:
    /// it needs a few). When a key is full, a client holding less than its
    /// fair share of them still gets one, and the client holding the most
    /// loses its most recent.
    pub max_subscriptions_per_key: usize,
    /// Most calls in progress at once (anything but an established
    /// subscription: a Publish being read, a subscription being set up,
    /// GetRelays, health, reflection).
    pub max_calls: usize,
    /// Most calls in progress at once from one client.
    pub max_calls_per_client: usize,
    /// New requests (HTTP/2 streams: calls and subscriptions) per second from
    /// one client (a token bucket). Beyond it streams are reset, and a
    /// connection that goes on is closed.
    pub request_rate: Rate,
    /// Publishes per second from one client (a token bucket).
    pub publish_rate: Rate,
    /// Published bytes per second from one client (a token bucket; the
    /// burst is at least one largest envelope).
    pub publish_bytes_rate: Rate,
    /// Most connections open at once from one address (IPv4, or an IPv6
    /// /64), proven or not; an IPv6 /48 may hold four times the address
    /// bounds.
    pub address_connections: usize,
    /// Most subscription streams open at once from one address.
    pub address_subscriptions: usize,
    /// Most calls in progress at once from one address.
    pub address_calls: usize,
    /// New connections per second from one address (a token bucket).
    pub address_connection_rate: Rate,
    /// Publishes per second from one address (a token bucket).
    pub address_publish_rate: Rate,
    /// Published bytes per second from one address (a token bucket).
    pub address_publish_bytes_rate: Rate,
    /// Most concurrent HTTP/2 streams on one connection.
    pub max_streams_per_connection: u32,
    /// Interval of the server's HTTP/2 keepalive pings to clients.
    pub keepalive_interval: Duration,
    /// How long a ping may stay unanswered before the connection is closed.
    pub keepalive_timeout: Duration,
    /// The server's private key (docs/PROTOCOL.md §11): its public key goes out as
    /// `cunicu-server-key` with every call, and proofs are boxes to it.
    pub key: Option<PrivateKey>,
    /// Whether Subscribe, Publish and GetRelays need a proof of key possession.
    pub auth: AuthMode,
    /// How far a proof's time may be behind the server's clock (inclusive).
    pub auth_skew: Duration,
    /// How far a proof's time may be ahead of the server's clock (inclusive):
    /// a few seconds, since a proof's nonce is remembered until its time plus
    /// `auth_skew`.
    pub auth_future_skew: Duration,
    /// Only the keys listed in this file may be proven (with `auth` required);
    /// the file is read again when it changes or on SIGHUP.
    pub allow_keys: Option<PathBuf>,
    /// Replicas of one service: the NATS system they share (docs/PROTOCOL.md §12).
    pub cluster: Option<crate::cluster::ClusterConfig>,
    /// Whether a Publish that asks (`cunicu-recipients: ask`) learns how many
    /// subscription streams got its envelope. Off for operators who see
    /// presence as private.
    pub recipients: bool,
    /// With `cluster`: how long a replica collects the other replicas'
    /// counts for a Publish that asks.
    pub recipients_wait: Duration,
    /// Serve gRPC server reflection (v1 and v1alpha), for tools such as grpcurl.
    pub reflection: bool,
}

/// A certificate chain and its private key, both PEM files.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// The certificate chain.
    pub cert: PathBuf,
    /// The private key.
    pub key: PathBuf,
}

const fn rate(per_second: u32, burst: u32) -> Rate {
    match (NonZeroU32::new(per_second), NonZeroU32::new(burst)) {
        (Some(per_second), Some(burst)) => Rate { per_second, burst },
        _ => panic!("a default rate of 0"),
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: SocketAddr::from(([0u16; 8], 8080)),
            metrics_listen: None,
            relays: Vec::new(),
            tls: None,
            max_envelope_size: 65536,
            queue_depth: 256,
            queue_bytes: 1 << 20,
            client_queued_bytes: 4 << 20,
            max_queued_bytes: 64 << 20,
            stall_timeout: Duration::from_secs(30),
            max_connections: 10_000,
            max_connections_per_client: 64,
            connection_rate: rate(10, 64),
            handshake_timeout: Duration::from_secs(10),
            max_tls_handshakes: 256,
            tls_handshake_rate: rate(500, 500),
            request_timeout: Duration::from_secs(10),
            first_bytes_timeout: Duration::from_secs(1),
            health_watch_lifetime: Duration::from_secs(300),
            idle_timeout: Duration::from_secs(300),
            max_subscriptions: 100_000,
            max_subscriptions_per_client: 1_000,
            max_subscriptions_per_key: 64,
            max_calls: 4_096,
            max_calls_per_client: 64,
            request_rate: rate(500, 1_000),
            publish_rate: rate(200, 1_000),
            publish_bytes_rate: rate(1 << 20, 4 << 20),
            address_connections: 1024,
            address_subscriptions: 8192,
            address_calls: 1024,
            address_connection_rate: rate(128, 1024),
            address_publish_rate: rate(16_384, 65_536),
            address_publish_bytes_rate: rate(16 << 20, 64 << 20),
            max_streams_per_connection: 1024,
            keepalive_interval: Duration::from_secs(120),
            keepalive_timeout: Duration::from_secs(20),
            key: None,
            auth: AuthMode::Off,
            auth_skew: Duration::from_secs(60),
            auth_future_skew: Duration::from_secs(5),
            allow_keys: None,
            cluster: None,
            recipients: true,
            recipients_wait: Duration::from_millis(100),
            reflection: false,
        }
    }
}

/// A setting that cannot work.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// A count or size is 0.
    #[error("{setting} must be at least 1")]
    Zero {
        /// The setting, as its command-line flag names it.
        setting: &'static str,
    },
    /// A duration is 0.
    #[error("{setting} must be longer than 0")]
    ZeroDuration {
        /// The setting.
        setting: &'static str,
    },
    /// `--auth required` without `--key-file`.
    #[error("--auth required needs the server's key (--key-file)")]
    AuthWithoutKey,
    /// `--allow-keys` without `--auth required`.
    #[error("--allow-keys needs --auth required")]
    AllowKeysWithoutAuth,
    /// One setting must be at least another.
    #[error("{setting} ({value}) must be at least {other} ({minimum})")]
    Below {
        /// The setting.
        setting: &'static str,
        /// Its value.
        value: usize,
        /// The setting it is compared with.
        other: &'static str,
        /// That setting's value.
        minimum: usize,
    },
}

impl Config {
    /// Checks that every setting can work.
    pub fn check(&self) -> Result<(), ConfigError> {
        let counts: [(&'static str, usize); 16] = [
            ("max-envelope-size", self.max_envelope_size),
            ("queue-depth", self.queue_depth),
            ("max-connections", self.max_connections),
            (
                "max-connections-per-client",
                self.max_connections_per_client,
            ),
            ("max-subscriptions", self.max_subscriptions),
            (
                "max-subscriptions-per-client",
                self.max_subscriptions_per_client,
            ),
            ("max-subscriptions-per-key", self.max_subscriptions_per_key),
            ("max-tls-handshakes", self.max_tls_handshakes),
            ("max-calls", self.max_calls),
            ("max-calls-per-client", self.max_calls_per_client),
            (
                "max-streams-per-connection",
                self.max_streams_per_connection as usize,
            ),
            ("client-queued-bytes", self.client_queued_bytes),
            ("max-queued-bytes", self.max_queued_bytes),
            ("address-connections", self.address_connections),
            ("address-subscriptions", self.address_subscriptions),
            ("address-calls", self.address_calls),
        ];
        for (setting, value) in counts {
            if value == 0 {
                return Err(ConfigError::Zero { setting });
            }
        }
        let durations = [
            ("stall-timeout", self.stall_timeout),
            ("handshake-timeout", self.handshake_timeout),
            ("request-timeout", self.request_timeout),
            ("first-bytes-timeout", self.first_bytes_timeout),
            ("health-watch-lifetime", self.health_watch_lifetime),
            ("idle-timeout", self.idle_timeout),
            ("keepalive-interval", self.keepalive_interval),
            ("keepalive-timeout", self.keepalive_timeout),
            ("recipients-wait", self.recipients_wait),
        ];
        for (setting, value) in durations {
            if value.is_zero() {
                return Err(ConfigError::ZeroDuration { setting });
            }
        }
        if self.auth == AuthMode::Required && self.key.is_none() {
            return Err(ConfigError::AuthWithoutKey);
        }
        if self.allow_keys.is_some() && self.auth != AuthMode::Required {
            return Err(ConfigError::AllowKeysWithoutAuth);
        }
        // One largest envelope, as a frame (its prefix included), must fit everywhere.
        let frame = self
            .max_envelope_size
            .saturating_add(crate::wire::Frame::OVERHEAD);
        let at_least: [(&'static str, usize); 5] = [
            ("queue-bytes", self.queue_bytes),
            ("client-queued-bytes", self.client_queued_bytes),
            ("max-queued-bytes", self.max_queued_bytes),
            (
                "publish-bytes-burst",
                self.publish_bytes_rate.burst.get() as usize,
            ),
            (
                "address-publish-bytes-burst",
                self.address_publish_bytes_rate.burst.get() as usize,
            ),
        ];
        for (setting, value) in at_least {
            if value < frame {
                return Err(ConfigError::Below {
                    setting,
                    value,
                    other: "max-envelope-size + 5",
                    minimum: frame,
                });
            }
        }
        // An address holds at least what one client may.
        let outer = [
            (
                "address-connections",
                self.address_connections,
                "max-connections-per-client",
                self.max_connections_per_client,
            ),
            (
                "address-subscriptions",
                self.address_subscriptions,
                "max-subscriptions-per-client",
                self.max_subscriptions_per_client,
            ),
            (
                "address-calls",
                self.address_calls,
                "max-calls-per-client",
                self.max_calls_per_client,
            ),
        ];
        for (setting, value, other, minimum) in outer {
            if value < minimum {
                return Err(ConfigError::Below {
                    setting,
                    value,
                    other,
                    minimum,
                });
            }
        }
        Ok(())
    }

    pub(crate) fn client_limits(&self) -> ClientLimits {
        ClientLimits {
            connections: self.max_connections_per_client,
            subscriptions: self.max_subscriptions_per_client,
            calls: self.max_calls_per_client,
            queued_bytes: self.client_queued_bytes,
            connection_rate: self.connection_rate,
            request_rate: self.request_rate,
            publish_rate: self.publish_rate,
            publish_bytes_rate: self.publish_bytes_rate,
            address: AddressLimits {
                connections: self.address_connections,
                subscriptions: self.address_subscriptions,
                calls: self.address_calls,
                connection_rate: self.address_connection_rate,
                publish_rate: self.address_publish_rate,
                publish_bytes_rate: self.address_publish_bytes_rate,
            },
        }
    }

    /// The deadlines of connections and of calls.
    pub(crate) fn timeouts(&self) -> Timeouts {
        Timeouts {
            handshake: self.handshake_timeout,
            first_bytes: self.first_bytes_timeout,
            request: self.request_timeout,
            idle: self.idle_timeout,
            stall: self.stall_timeout,
            keepalive_interval: self.keepalive_interval,
            keepalive_timeout: self.keepalive_timeout,
        }
    }

    /// The bounds of each subscription's queue.
    pub(crate) fn queue_limits(&self) -> QueueLimits {
        QueueLimits {
            depth: self.queue_depth,
            bytes: self.queue_bytes,
        }
    }

    /// Whether a Publish may ask for its recipient count, and how long the
    /// other replicas' counts are waited for.
    pub(crate) fn recipients(&self) -> Recipients {
        Recipients {
            enabled: self.recipients,
            wait: self.recipients_wait,
        }
    }

    pub(crate) fn h2_builder(&self) -> h2::server::Builder {
        let mut builder = h2::server::Builder::new();
        builder
            .max_concurrent_streams(self.max_streams_per_connection)
            .initial_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .max_header_list_size(MAX_HEADER_LIST)
            .max_send_buffer_size(SEND_BUFFER);
        builder
    }

    /// What the server's memory adds up to with every limit reached at once.
    pub fn memory_bound(&self) -> MemoryBound {
        let tls = self.tls.is_some();
        let connection = if tls {
            CONNECTION_BYTES + TLS_CONNECTION_BYTES
        } else {
            CONNECTION_BYTES
        };
        MemoryBound {
            base: BASE_BYTES,
            // At a cap, those being evicted for a client below its fair
            // share are still open for a moment besides.
            connections: self
                .max_connections
                .saturating_add(EVICTIONS_IN_FLIGHT)
                .saturating_mul(connection),
            subscriptions: self
                .max_subscriptions
                .saturating_add(EVICTIONS_IN_FLIGHT)
                .saturating_mul(SUBSCRIPTION_BYTES),
            // The same for each pool of calls.
            calls: self
                .max_calls
                .saturating_add(CALL_EVICTIONS_IN_FLIGHT)
                .saturating_mul(CALL_BYTES)
                .saturating_add((BRIDGED_CALLS + CALL_EVICTIONS_IN_FLIGHT) * BRIDGED_CALL_BYTES)
                .saturating_add(
                    (HEALTH_CHECKS + HEALTH_WATCHES + 2 * CALL_EVICTIONS_IN_FLIGHT)
                        * HEALTH_CALL_BYTES,
                ),
            queued: self.max_queued_bytes,
            cluster: if self.cluster.is_some() {
                // A NATS subscription and its task per key: at worst one
                // key per subscription. And what the NATS client holds.
                self.max_subscriptions
                    .saturating_mul(crate::cluster::KEY_BYTES)
                    .saturating_add(NATS_UNFLUSHED_BYTES + NATS_CLIENT_BYTES)
            } else {
                0
            },
            auth: if self.key.is_some() {
                MAX_NONCES * NONCE_BYTES + SHARED_KEY_CACHE_BYTES + UNKNOWN_KEY_BYTES
            } else {
                0
            },
        }
    }
}

/// The process without clients: code, runtime, tables.
const BASE_BYTES: usize = 16 << 20;
/// One connection (HTTP/2 state and buffers, its task), without TLS.
const CONNECTION_BYTES: usize = 48 << 10;
/// What TLS adds to a connection (rustls's buffers).
const TLS_CONNECTION_BYTES: usize = 48 << 10;
/// One open subscription stream (its HTTP/2 stream, queue and entries).
const SUBSCRIPTION_BYTES: usize = 4 << 10;
/// One call in progress, apart from the request bytes the budget counts: its
/// HTTP/2 stream and its future.
const CALL_BYTES: usize = 4 << 10;
/// What a call of a service served through tonic adds: its request (at most
/// [`MAX_REQUEST_BYTES`]), tonic's encoded response waiting for the
/// window, and what h2 buffers of it.
const BRIDGED_CALL_BYTES: usize = MAX_REQUEST_BYTES + 48 * 1024 + SEND_BUFFER;

/// What a health check or watch adds to its call: its request (at most
/// [`MAX_HEALTH_REQUEST_BYTES`]), its answers (a few bytes each) and
/// tonic's state of the call.
const HEALTH_CALL_BYTES: usize = MAX_HEALTH_REQUEST_BYTES + 15 * 1024;

/// The NATS client's own buffers (reading and writing), beyond what it was
/// handed to publish.
const NATS_CLIENT_BYTES: usize = 1 << 20;

/// The cache of shared keys of proven client keys.
const SHARED_KEY_CACHE_BYTES: usize = SHARED_KEYS * 256;

/// The worst case of the server's memory, by what holds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryBound {
    /// The process without clients.
    pub base: usize,
    /// Every connection open.
    pub connections: usize,
    /// Every subscription open.
    pub subscriptions: usize,
    /// Every call in progress.
    pub calls: usize,
    /// Every byte budget full (`max_queued_bytes`).
    pub queued: usize,
    /// With a cluster: a NATS subscription per key, and what the NATS client
    /// holds of what it was handed and of its buffers.
    pub cluster: usize,
    /// Proofs of key possession remembered (with a server key).
    pub auth: usize,
}

impl MemoryBound {
    /// The sum.
    pub fn total(&self) -> usize {
        [
            self.base,
            self.connections,
            self.subscriptions,
            self.calls,
            self.queued,
            self.cluster,
            self.auth,
        ]
        .into_iter()
        .fold(0, usize::saturating_add)
    }
}

fn mib(bytes: usize) -> f64 {
    bytes as f64 / f64::from(1 << 20)
}

impl fmt::Display for MemoryBound {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:.0} MiB: {:.0} base + {:.0} connections + {:.0} subscriptions + {:.0} calls + {:.0} queued bytes",
            mib(self.total()),
            mib(self.base),
            mib(self.connections),
            mib(self.subscriptions),
            mib(self.calls),
            mib(self.queued),
        )?;
        if self.cluster > 0 {
            write!(f, " + {:.0} cluster", mib(self.cluster))?;
        }
        if self.auth > 0 {
            write!(f, " + {:.0} proofs", mib(self.auth))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a token bucket lets through in `seconds`, from full.
    fn within(rate: Rate, seconds: u64) -> u64 {
        u64::from(rate.burst.get()) + u64::from(rate.per_second.get()) * seconds
    }

    #[test]
    fn the_defaults_fit_a_fleet_of_250_proven_peers_behind_one_address() {
        const PEERS: u64 = 250;
        // A full mesh's start: about 10 envelopes per pair and direction
        // within a minute, each a Publish of a few hundred bytes.
        const PER_PAIR: u64 = 10;
        const SECONDS: u64 = 60;
        const PUBLISH_BYTES: u64 = 512;
        let config = Config::default();
        config.check().unwrap();
        let per_peer = PER_PAIR * (PEERS - 1);
        let all = per_peer * PEERS;
        // Each peer: a connection, a subscription, a few calls at once, and
        // its share of the publishes, under its key's limits.
        assert!(config.max_connections_per_client >= 1);
        assert!(within(config.publish_rate, SECONDS) >= per_peer);
        assert!(within(config.publish_bytes_rate, SECONDS) >= per_peer * PUBLISH_BYTES);
        // Subscribe, publishes and GetRelays: requests.
        assert!(within(config.request_rate, SECONDS) >= per_peer + 2);
        // The address holds them all at once.
        let peers = PEERS as usize;
        assert!(config.address_connections >= peers);
        assert!(config.address_connection_rate.burst.get() as usize >= peers);
        assert!(config.address_subscriptions >= peers);
        assert!(config.address_calls >= 2 * peers);
        assert!(within(config.address_publish_rate, SECONDS) >= all);
        assert!(within(config.address_publish_bytes_rate, SECONDS) >= all * PUBLISH_BYTES);
        // And all at once at the start, the first envelope of each pair.
        assert!(u64::from(config.address_publish_rate.burst.get()) >= PEERS * (PEERS - 1));
        // An unproven client from that address keeps the per-client limits.
        assert!(config.max_connections_per_client < config.address_connections);
        assert!(config.publish_rate.burst < config.address_publish_rate.burst);
    }

    #[test]
    fn the_worst_case_fits_deploys_memory_limit() {
        // deploy/: a 1280 MiB limit for the defaults (plaintext, a key
        // file), and for a replica of a cluster with half the subscriptions.
        const LIMIT: usize = 1280 << 20;
        let mut config = Config {
            key: Some(cunicu_signal::PrivateKey::generate()),
            ..Config::default()
        };
        let bound = config.memory_bound();
        assert!(bound.total() < LIMIT, "{bound}");
        // The subscriptions and connections being evicted are in it.
        assert_eq!(
            bound.subscriptions,
            (config.max_subscriptions + EVICTIONS_IN_FLIGHT) * SUBSCRIPTION_BYTES
        );
        config.max_subscriptions = 50_000;
        config.cluster = Some(crate::cluster::ClusterConfig::new(vec![
            "nats://127.0.0.1:4222".into(),
        ]));
        let bound = config.memory_bound();
        assert!(bound.total() < LIMIT, "{bound}");
    }
}
