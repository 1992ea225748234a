//! `cunicu-signal`: keys, envelopes, the signaling server, publish and subscribe.
//!
//! This binary only parses arguments and calls the library and the server crate.

mod bench;
mod connect;

use std::{
    ffi::OsString,
    io::{IsTerminal, Read, Write},
    net::{SocketAddr, ToSocketAddrs},
    num::NonZeroU32,
    path::{Path, PathBuf},
    process::ExitCode,
    sync::{Arc, LazyLock},
    time::Duration,
};

use anyhow::{Context, Result, bail};
use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand};
use cunicu_signal::{
    Backend, ChannelHandler, Key, KeyPair, PrivateKey, Sender, StreamEvent,
    json::{message_from_json, message_to_json},
    proto::signaling::Envelope,
};
use cunicu_signal_server::{AuthMode, ClusterConfig, Config, Rate, Relay, Server, TlsFiles};
use prost::Message as _;
use tokio::io::{AsyncBufReadExt, AsyncReadExt};

#[derive(Parser)]
#[command(
    name = "cunicu-signal",
    version,
    about = "Sealed signaling for peer-to-peer ICE sessions, wire-compatible with cunicu"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print a new private key (base64, like `wg genkey`), or write it to a
    /// file only its owner may read.
    Keygen(KeygenArgs),
    /// Read a private key on stdin and print its public key (like `wg pubkey`).
    Pubkey,
    /// Seal or open a single envelope.
    #[command(subcommand)]
    Envelope(EnvelopeCommand),
    /// Run the gRPC signaling server.
    Serve(Box<ServeArgs>),
    /// Publish proto3-JSON messages read from stdin, one per line, to a peer.
    Publish(PublishArgs),
    /// Print every message received, one JSON object per line.
    Subscribe(SubscribeArgs),
    /// Load generator: subscribers and publishers against a signaling server.
    Bench(bench::BenchArgs),
    /// An ICE session with a peer over signaling: each stdin line out as one
    /// UDP datagram (at most 8000 bytes; longer lines are refused, and like UDP
    /// a datagram may be lost), datagrams in to stdout.
    Connect(connect::ConnectArgs),
    /// Write the man pages (DIR/man) and shell completions (DIR/completions) of this
    /// command, for packages.
    #[command(hide = true)]
    GenerateAssets {
        /// Where to write them.
        dir: PathBuf,
    },
}

#[derive(Args)]
struct KeygenArgs {
    /// Write the key to this file, readable by its owner only (mode 0600),
    /// instead of stdout. Without it, redirect stdout after `umask 077`, as
    /// with `wg genkey`.
    #[arg(long, value_name = "FILE")]
    out: Option<PathBuf>,
}

#[derive(Subcommand)]
enum EnvelopeCommand {
    /// Read one Message as proto3 JSON on stdin; write the binary Envelope to
    /// stdout (not to a terminal) or to --output.
    Seal {
        /// File with our base64 private key.
        #[arg(long)]
        key_file: PathBuf,
        /// The recipient's base64 public key.
        #[arg(long)]
        to: String,
        /// Write the envelope to this file instead of stdout.
        #[arg(long, value_name = "FILE")]
        output: Option<PathBuf>,
    },
    /// Read a binary Envelope on stdin; write the Message as proto3 JSON to
    /// stdout, and its sender and recipient to stderr.
    Open {
        /// File with our base64 private key.
        #[arg(long)]
        key_file: PathBuf,
    },
}

/// The server's built-in defaults: the flags show and use them.
static DEFAULTS: LazyLock<Config> = LazyLock::new(Config::default);

fn default_duration(d: Duration) -> humantime::Duration {
    d.into()
}

/// The end of `serve --help`: the worst-case memory of the configuration
/// that `args` (the command line, `--help` aside) and the environment make, or
/// of the defaults when they make none.
fn memory_help(args: &[OsString]) -> String {
    let given: Vec<&OsString> = args
        .iter()
        .filter(|a| !matches!(a.to_str(), Some("--help" | "-h")))
        .collect();
    let given_args = given.len();
    let (config, of) = match Cli::try_parse_from(given) {
        Ok(Cli {
            command: Command::Serve(serve),
        }) => match serve.config() {
            Ok(config) => {
                // More than the program and `serve`, or a variable of ours.
                let given = given_args > 2
                    || std::env::vars_os().any(|(name, _)| {
                        name.to_str()
                            .is_some_and(|n| n.starts_with("CUNICU_SIGNAL_"))
                    });
                let of = if given {
                    "these flags and environment"
                } else {
                    "the defaults"
                };
                (config, of.to_string())
            }
            Err(e) => (
                DEFAULTS.clone(),
                format!(
                    "the defaults, as the flags given are not valid: {}",
                    report(&e)
                ),
            ),
        },
        _ => (DEFAULTS.clone(), "the defaults".to_string()),
    };
    let tls = if config.tls.is_some() {
        "with TLS".to_string()
    } else {
        let mut tls = config.clone();
        tls.tls = Some(TlsFiles {
            cert: PathBuf::new(),
            key: PathBuf::new(),
        });
        let more = tls.memory_bound().total() - config.memory_bound().total();
        format!(
            "plaintext; TLS adds {:.0} MiB",
            more as f64 / f64::from(1 << 20)
        )
    };
    format!(
        "With every limit reached at once, the server's memory adds up to about {} \
         ({of}, {tls}). Lower --max-connections, --max-subscriptions, --max-calls or \
         --max-queued-bytes to fit a smaller limit; `serve --help` with other flags \
         computes it for them.",
        config.memory_bound(),
    )
}

/// A listen address: IP:PORT, [IPv6]:PORT, HOST:PORT (its first address) or
/// :PORT (every address, IPv6 and IPv4).
fn listen_addr(text: &str) -> Result<SocketAddr, String> {
    if let Some(port) = text.strip_prefix(':') {
        let port: u16 = port
            .parse()
            .map_err(|_| format!("{text:?}: the port is not a number from 0 to 65535"))?;
        return Ok(SocketAddr::from(([0u16; 8], port)));
    }
    if let Ok(addr) = text.parse() {
        return Ok(addr);
    }
    match text.to_socket_addrs() {
        Ok(mut addrs) => addrs
            .next()
            .ok_or_else(|| format!("{text:?}: the name has no address")),
        Err(e) => Err(format!(
            "{text:?}: expected IP:PORT, HOST:PORT or :PORT ({e})"
        )),
    }
}

#[derive(Args)]
struct ServeArgs {
    /// Address of the gRPC port: IP:PORT, HOST:PORT or :PORT (every address).
    #[arg(long, env = "CUNICU_SIGNAL_LISTEN", default_value_t = DEFAULTS.listen, value_parser = listen_addr)]
    listen: SocketAddr,
    /// Address of the HTTP port with Prometheus metrics at /metrics and liveness at /healthz
    /// (IP:PORT, HOST:PORT or :PORT).
    #[arg(long, env = "CUNICU_SIGNAL_METRICS_LISTEN", value_parser = listen_addr)]
    metrics_listen: Option<SocketAddr>,
    /// Worker threads [default: the CPUs the process may use, its cgroup's quota included].
    /// One thread never wakes another: it costs less per delivery where the server shares
    /// its cores, and carries no more than one core's load.
    #[arg(long, env = "CUNICU_SIGNAL_THREADS")]
    threads: Option<std::num::NonZeroUsize>,
    /// A STUN/TURN relay for RelayRegistry.GetRelays (repeatable): stun:HOST:PORT,
    /// turn:USER:PASS@HOST:PORT?transport=udp or turn:HOST:PORT?transport=udp&secret=S&ttl=1h.
    #[arg(long = "relay", env = "CUNICU_SIGNAL_RELAY", value_delimiter = ',')]
    relays: Vec<String>,
    /// PEM certificate chain; with --tls-key, serve TLS instead of plaintext HTTP/2.
    #[arg(long, env = "CUNICU_SIGNAL_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, env = "CUNICU_SIGNAL_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Largest encoded envelope accepted; larger ones get RESOURCE_EXHAUSTED.
    #[arg(long, env = "CUNICU_SIGNAL_MAX_ENVELOPE_SIZE", default_value_t = DEFAULTS.max_envelope_size)]
    max_envelope_size: usize,
    /// Envelopes queued per subscription stream; when full, the oldest is dropped.
    #[arg(long, env = "CUNICU_SIGNAL_QUEUE_DEPTH", default_value_t = DEFAULTS.queue_depth)]
    queue_depth: usize,
    /// Bytes queued per subscription stream; when full, the oldest envelopes are dropped.
    #[arg(long, env = "CUNICU_SIGNAL_QUEUE_BYTES", default_value_t = DEFAULTS.queue_bytes)]
    queue_bytes: usize,
    /// Bytes one client (an IP address, an IPv6 /64) may make the server hold for its
    /// subscriptions: queued, and in HTTP/2 send buffers. Beyond it, that client loses its
    /// own oldest envelopes, and only it.
    #[arg(long, env = "CUNICU_SIGNAL_CLIENT_QUEUED_BYTES", default_value_t = DEFAULTS.client_queued_bytes)]
    client_queued_bytes: usize,
    /// Bytes held for all clients together: the above and the requests being read.
    #[arg(long, env = "CUNICU_SIGNAL_MAX_QUEUED_BYTES", default_value_t = DEFAULTS.max_queued_bytes)]
    max_queued_bytes: usize,
    /// A subscriber whose connection took less than a quarter of the bytes it owed over a span
    /// this long, while envelopes waited for it, is cut off (UNAVAILABLE "subscriber too slow").
    #[arg(long, env = "CUNICU_SIGNAL_STALL_TIMEOUT", default_value_t = default_duration(DEFAULTS.stall_timeout))]
    stall_timeout: humantime::Duration,
    /// Most client connections open at once. At the cap, a client holding less than its
    /// fair share (the cap divided by the clients holding any) is still served: the client
    /// holding the most loses its newest connection (RESOURCE_EXHAUSTED); others are refused.
    #[arg(long, env = "CUNICU_SIGNAL_MAX_CONNECTIONS", default_value_t = DEFAULTS.max_connections)]
    max_connections: usize,
    /// Most connections open at once from one client (a proven key, or an address without
    /// proof); more from one address are admitted within --address-connections, but the
    /// first call of each must prove a key, or it is closed.
    #[arg(long, env = "CUNICU_SIGNAL_MAX_CONNECTIONS_PER_CLIENT", default_value_t = DEFAULTS.max_connections_per_client)]
    max_connections_per_client: usize,
    /// New connections per second from one address before they need a proof (a token
    /// bucket); more are admitted within --address-connection-rate, but the first call of
    /// each must prove a key, or it is closed.
    #[arg(long, env = "CUNICU_SIGNAL_CONNECTION_RATE", default_value_t = DEFAULTS.connection_rate.per_second)]
    connection_rate: NonZeroU32,
    /// New connections one client may open at once before --connection-rate applies.
    #[arg(long, env = "CUNICU_SIGNAL_CONNECTION_BURST", default_value_t = DEFAULTS.connection_rate.burst)]
    connection_burst: NonZeroU32,
    /// Deadline of a connection's TLS handshake, HTTP/2 preface and first request.
    #[arg(long, env = "CUNICU_SIGNAL_HANDSHAKE_TIMEOUT", default_value_t = default_duration(DEFAULTS.handshake_timeout))]
    handshake_timeout: humantime::Duration,
    /// TLS handshakes in progress at once; beyond, connections wait their turn (within
    /// --handshake-timeout).
    #[arg(long, env = "CUNICU_SIGNAL_MAX_TLS_HANDSHAKES", default_value_t = DEFAULTS.max_tls_handshakes)]
    max_tls_handshakes: usize,
    /// TLS handshakes started per second from all clients together (a token bucket of as
    /// many); beyond, connections are closed. One costs about 1 ms of CPU with an RSA-2048
    /// certificate, a quarter of that with ECDSA P-256.
    #[arg(long, env = "CUNICU_SIGNAL_TLS_HANDSHAKE_RATE", default_value_t = DEFAULTS.tls_handshake_rate.per_second)]
    tls_handshake_rate: NonZeroU32,
    /// Deadline of a request's message once its stream opened.
    #[arg(long, env = "CUNICU_SIGNAL_REQUEST_TIMEOUT", default_value_t = default_duration(DEFAULTS.request_timeout))]
    request_timeout: humantime::Duration,
    /// Deadline of a request's first message bytes once its stream opened: a
    /// call that sends headers alone ends then (DEADLINE_EXCEEDED).
    #[arg(long, env = "CUNICU_SIGNAL_FIRST_BYTES_TIMEOUT", default_value_t = default_duration(DEFAULTS.first_bytes_timeout))]
    first_bytes_timeout: humantime::Duration,
    /// A grpc.health.v1.Health/Watch stream ends (OK) after this long; the
    /// watcher opens another.
    #[arg(long, env = "CUNICU_SIGNAL_HEALTH_WATCH_LIFETIME", default_value_t = default_duration(DEFAULTS.health_watch_lifetime))]
    health_watch_lifetime: humantime::Duration,
    /// A connection without a stream for this long is closed (GOAWAY).
    #[arg(long, env = "CUNICU_SIGNAL_IDLE_TIMEOUT", default_value_t = default_duration(DEFAULTS.idle_timeout))]
    idle_timeout: humantime::Duration,
    /// Most subscription streams open at once; more get RESOURCE_EXHAUSTED.
    #[arg(long, env = "CUNICU_SIGNAL_MAX_SUBSCRIPTIONS", default_value_t = DEFAULTS.max_subscriptions)]
    max_subscriptions: usize,
    /// Most subscription streams open at once from one client; more get RESOURCE_EXHAUSTED.
    /// Raise it when many peers share one address (NAT, a proxy).
    #[arg(long, env = "CUNICU_SIGNAL_MAX_SUBSCRIPTIONS_PER_CLIENT", default_value_t = DEFAULTS.max_subscriptions_per_client)]
    max_subscriptions_per_client: usize,
    /// Most subscription streams open at once on one key (a key is one peer). When a key is
    /// full, a client holding less than its fair share of them still gets one and the client
    /// holding the most loses its most recent (RESOURCE_EXHAUSTED); others are refused.
    #[arg(long, env = "CUNICU_SIGNAL_MAX_SUBSCRIPTIONS_PER_KEY", default_value_t = DEFAULTS.max_subscriptions_per_key)]
    max_subscriptions_per_key: usize,
    /// Most calls in progress at once (publishes being read, subscriptions being set up,
    /// GetRelays, health, reflection); more get RESOURCE_EXHAUSTED.
    #[arg(long, env = "CUNICU_SIGNAL_MAX_CALLS", default_value_t = DEFAULTS.max_calls)]
    max_calls: usize,
    /// The same per client.
    #[arg(long, env = "CUNICU_SIGNAL_MAX_CALLS_PER_CLIENT", default_value_t = DEFAULTS.max_calls_per_client)]
    max_calls_per_client: usize,
    /// New requests (calls and subscriptions) per second from one client (a token bucket);
    /// more are reset, and a connection that goes on is closed.
    #[arg(long, env = "CUNICU_SIGNAL_REQUEST_RATE", default_value_t = DEFAULTS.request_rate.per_second)]
    request_rate: NonZeroU32,
    /// Requests one client may send at once before --request-rate applies.
    #[arg(long, env = "CUNICU_SIGNAL_REQUEST_BURST", default_value_t = DEFAULTS.request_rate.burst)]
    request_burst: NonZeroU32,
    /// Publishes per second from one client (a token bucket); more get RESOURCE_EXHAUSTED.
    #[arg(long, env = "CUNICU_SIGNAL_PUBLISH_RATE", default_value_t = DEFAULTS.publish_rate.per_second)]
    publish_rate: NonZeroU32,
    /// Publishes one client may send at once before --publish-rate applies.
    #[arg(long, env = "CUNICU_SIGNAL_PUBLISH_BURST", default_value_t = DEFAULTS.publish_rate.burst)]
    publish_burst: NonZeroU32,
    /// Published bytes per second from one client (a token bucket).
    #[arg(long, env = "CUNICU_SIGNAL_PUBLISH_BYTES_RATE", default_value_t = DEFAULTS.publish_bytes_rate.per_second)]
    publish_bytes_rate: NonZeroU32,
    /// Bytes one client may publish at once before --publish-bytes-rate applies.
    #[arg(long, env = "CUNICU_SIGNAL_PUBLISH_BYTES_BURST", default_value_t = DEFAULTS.publish_bytes_rate.burst)]
    publish_bytes_burst: NonZeroU32,
    /// Most connections open at once from one address (IPv4, or an IPv6 /64), proven or
    /// not; an IPv6 /48 may hold four times each --address-… bound.
    #[arg(long, env = "CUNICU_SIGNAL_ADDRESS_CONNECTIONS", default_value_t = DEFAULTS.address_connections)]
    address_connections: usize,
    /// Most subscription streams open at once from one address, proven or not.
    #[arg(long, env = "CUNICU_SIGNAL_ADDRESS_SUBSCRIPTIONS", default_value_t = DEFAULTS.address_subscriptions)]
    address_subscriptions: usize,
    /// Most calls in progress at once from one address, proven or not.
    #[arg(long, env = "CUNICU_SIGNAL_ADDRESS_CALLS", default_value_t = DEFAULTS.address_calls)]
    address_calls: usize,
    /// New connections per second from one address, proven or not (a token bucket); more
    /// are refused.
    #[arg(long, env = "CUNICU_SIGNAL_ADDRESS_CONNECTION_RATE", default_value_t = DEFAULTS.address_connection_rate.per_second)]
    address_connection_rate: NonZeroU32,
    /// New connections one address may open at once before --address-connection-rate applies.
    #[arg(long, env = "CUNICU_SIGNAL_ADDRESS_CONNECTION_BURST", default_value_t = DEFAULTS.address_connection_rate.burst)]
    address_connection_burst: NonZeroU32,
    /// Publishes per second from one address, proven or not (a token bucket).
    #[arg(long, env = "CUNICU_SIGNAL_ADDRESS_PUBLISH_RATE", default_value_t = DEFAULTS.address_publish_rate.per_second)]
    address_publish_rate: NonZeroU32,
    /// Publishes one address may send at once before --address-publish-rate applies.
    #[arg(long, env = "CUNICU_SIGNAL_ADDRESS_PUBLISH_BURST", default_value_t = DEFAULTS.address_publish_rate.burst)]
    address_publish_burst: NonZeroU32,
    /// Published bytes per second from one address, proven or not (a token bucket).
    #[arg(long, env = "CUNICU_SIGNAL_ADDRESS_PUBLISH_BYTES_RATE", default_value_t = DEFAULTS.address_publish_bytes_rate.per_second)]
    address_publish_bytes_rate: NonZeroU32,
    /// Bytes one address may publish at once before --address-publish-bytes-rate applies.
    #[arg(long, env = "CUNICU_SIGNAL_ADDRESS_PUBLISH_BYTES_BURST", default_value_t = DEFAULTS.address_publish_bytes_rate.burst)]
    address_publish_bytes_burst: NonZeroU32,
    /// Most concurrent HTTP/2 streams (subscriptions and calls) on one connection.
    #[arg(long, env = "CUNICU_SIGNAL_MAX_STREAMS_PER_CONNECTION", default_value_t = DEFAULTS.max_streams_per_connection)]
    max_streams_per_connection: u32,
    /// Interval of the server's HTTP/2 keepalive pings.
    #[arg(long, env = "CUNICU_SIGNAL_KEEPALIVE_INTERVAL", default_value_t = default_duration(DEFAULTS.keepalive_interval))]
    keepalive_interval: humantime::Duration,
    /// How long a keepalive ping may go unanswered before the connection is closed.
    #[arg(long, env = "CUNICU_SIGNAL_KEEPALIVE_TIMEOUT", default_value_t = default_duration(DEFAULTS.keepalive_timeout))]
    keepalive_timeout: humantime::Duration,
    /// The server's private key (WireGuard base64, `cunicu-signal keygen`): its public key
    /// goes out as cunicu-server-key with every call; needed by --auth required.
    #[arg(long, env = "CUNICU_SIGNAL_KEY_FILE")]
    key_file: Option<PathBuf>,
    /// off: proofs of key possession are not needed (cunicu's peers send none);
    /// required: Subscribe, Publish and GetRelays need a proof of their key.
    #[arg(long, env = "CUNICU_SIGNAL_AUTH", default_value_t = DEFAULTS.auth)]
    auth: AuthMode,
    /// How far a proof's time may be behind the server's clock.
    #[arg(long, env = "CUNICU_SIGNAL_AUTH_SKEW", default_value_t = default_duration(DEFAULTS.auth_skew))]
    auth_skew: humantime::Duration,
    /// How far a proof's time may be ahead of the server's clock (a proof's nonce is
    /// remembered until its time plus --auth-skew, so this stays short).
    #[arg(long, env = "CUNICU_SIGNAL_AUTH_FUTURE_SKEW", default_value_t = default_duration(DEFAULTS.auth_future_skew))]
    auth_future_skew: humantime::Duration,
    /// Admit only the keys in this file (one base64 key a line, # comments); read again
    /// when it changes or on SIGHUP. Needs --auth required.
    #[arg(long, env = "CUNICU_SIGNAL_ALLOW_KEYS")]
    allow_keys: Option<PathBuf>,
    /// Serve as one of several replicas that share this NATS system (nats://HOST:PORT or
    /// tls://HOST:PORT, comma-separated; USER:PASSWORD@ or TOKEN@ before the host if NATS
    /// wants them, never logged): an envelope published to any replica reaches the
    /// subscribers of every replica.
    #[arg(long, env = "CUNICU_SIGNAL_CLUSTER", value_delimiter = ',')]
    cluster: Vec<String>,
    /// NATS credentials file (JWT and NKey seed) for --cluster.
    #[arg(long, env = "CUNICU_SIGNAL_CLUSTER_CREDS", requires = "cluster")]
    cluster_creds: Option<PathBuf>,
    /// PEM certificates to trust for tls:// NATS servers.
    #[arg(long, env = "CUNICU_SIGNAL_CLUSTER_CA", requires = "cluster")]
    cluster_ca: Option<PathBuf>,
    /// The NATS connection name (default: the host name).
    #[arg(long, env = "CUNICU_SIGNAL_CLUSTER_NAME", requires = "cluster")]
    cluster_name: Option<String>,
    /// Prefix of the NATS subjects, one per key.
    #[arg(long, env = "CUNICU_SIGNAL_CLUSTER_SUBJECT_PREFIX", default_value = cunicu_signal_server::cluster::DEFAULT_SUBJECT_PREFIX)]
    cluster_subject_prefix: String,
    /// on: a Publish that asks (metadata cunicu-recipients: ask) learns how many subscription
    /// streams got its envelope, on every replica; off: asking gets no count, for operators who
    /// see presence as private (with --auth off anyone may ask about any key).
    #[arg(long, env = "CUNICU_SIGNAL_RECIPIENTS", value_enum, default_value_t = OnOff::from(DEFAULTS.recipients))]
    recipients: OnOff,
    /// With --cluster: how long a replica collects the other replicas' counts for a Publish
    /// that asks (an answer comes at once when nobody listens anywhere).
    #[arg(long, env = "CUNICU_SIGNAL_RECIPIENTS_WAIT", default_value_t = default_duration(DEFAULTS.recipients_wait))]
    recipients_wait: humantime::Duration,
    /// Serve gRPC server reflection (v1 and v1alpha), for tools such as grpcurl. Off by
    /// default: its answers are tens of KiB for a request of a few bytes.
    #[arg(long, env = "CUNICU_SIGNAL_REFLECTION")]
    reflection: bool,
    /// On SIGTERM, how long to go on serving with readiness (/readyz, gRPC health) saying
    /// NOT_SERVING, so that load balancers stop sending new clients.
    #[arg(long, env = "CUNICU_SIGNAL_DRAIN_DELAY", default_value = "5s")]
    drain_delay: humantime::Duration,
    /// Then, the time over which the subscription streams end, each at its own moment
    /// (UNAVAILABLE: clients subscribe again, elsewhere), so that they do not all come back
    /// at once. A second SIGTERM or SIGINT skips what is left.
    #[arg(long, env = "CUNICU_SIGNAL_DRAIN_WINDOW", default_value = "10s")]
    drain_window: humantime::Duration,
}

/// A setting that is on or off.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum OnOff {
    On,
    Off,
}

impl From<bool> for OnOff {
    fn from(on: bool) -> Self {
        if on { OnOff::On } else { OnOff::Off }
    }
}

impl ServeArgs {
    /// The server's configuration: these flags over the defaults.
    fn config(self) -> Result<Config> {
        let relays = self
            .relays
            .iter()
            .filter(|r| !r.is_empty())
            .map(|r| r.parse::<Relay>())
            .collect::<Result<Vec<_>, _>>()?;
        let mut config = Config::default();
        config.listen = self.listen;
        config.metrics_listen = self.metrics_listen;
        config.relays = relays;
        config.tls = match (self.tls_cert, self.tls_key) {
            (Some(cert), Some(key)) => Some(TlsFiles { cert, key }),
            _ => None,
        };
        config.max_envelope_size = self.max_envelope_size;
        config.queue_depth = self.queue_depth;
        config.queue_bytes = self.queue_bytes;
        config.client_queued_bytes = self.client_queued_bytes;
        config.max_queued_bytes = self.max_queued_bytes;
        config.stall_timeout = self.stall_timeout.into();
        config.max_connections = self.max_connections;
        config.max_connections_per_client = self.max_connections_per_client;
        config.connection_rate = Rate {
            per_second: self.connection_rate,
            burst: self.connection_burst,
        };
        config.handshake_timeout = self.handshake_timeout.into();
        config.max_tls_handshakes = self.max_tls_handshakes;
        config.tls_handshake_rate = Rate {
            per_second: self.tls_handshake_rate,
            burst: self.tls_handshake_rate,
        };
        config.request_timeout = self.request_timeout.into();
        config.first_bytes_timeout = self.first_bytes_timeout.into();
        config.health_watch_lifetime = self.health_watch_lifetime.into();
        config.idle_timeout = self.idle_timeout.into();
        config.max_subscriptions = self.max_subscriptions;
        config.max_subscriptions_per_client = self.max_subscriptions_per_client;
        config.max_subscriptions_per_key = self.max_subscriptions_per_key;
        config.max_calls = self.max_calls;
        config.max_calls_per_client = self.max_calls_per_client;
        config.request_rate = Rate {
            per_second: self.request_rate,
            burst: self.request_burst,
        };
        config.publish_rate = Rate {
            per_second: self.publish_rate,
            burst: self.publish_burst,
        };
        config.publish_bytes_rate = Rate {
            per_second: self.publish_bytes_rate,
            burst: self.publish_bytes_burst,
        };
        config.address_connections = self.address_connections;
        config.address_subscriptions = self.address_subscriptions;
        config.address_calls = self.address_calls;
        config.address_connection_rate = Rate {
            per_second: self.address_connection_rate,
            burst: self.address_connection_burst,
        };
        config.address_publish_rate = Rate {
            per_second: self.address_publish_rate,
            burst: self.address_publish_burst,
        };
        config.address_publish_bytes_rate = Rate {
            per_second: self.address_publish_bytes_rate,
            burst: self.address_publish_bytes_burst,
        };
        config.max_streams_per_connection = self.max_streams_per_connection;
        config.keepalive_interval = self.keepalive_interval.into();
        config.keepalive_timeout = self.keepalive_timeout.into();
        config.key = self.key_file.as_deref().map(read_key_file).transpose()?;
        config.auth = self.auth;
        config.auth_skew = self.auth_skew.into();
        config.auth_future_skew = self.auth_future_skew.into();
        config.allow_keys = self.allow_keys;
        config.reflection = self.reflection;
        let urls: Vec<String> = self.cluster.into_iter().filter(|u| !u.is_empty()).collect();
        if !urls.is_empty() {
            let mut cluster = ClusterConfig::new(urls);
            cluster.creds = self.cluster_creds;
            cluster.ca = self.cluster_ca;
            cluster.name = self.cluster_name;
            cluster.subject_prefix = self.cluster_subject_prefix;
            config.cluster = Some(cluster);
        }
        config.recipients = self.recipients == OnOff::On;
        config.recipients_wait = self.recipients_wait.into();
        config.check()?;
        Ok(config)
    }
}

/// Backends and our key, shared by publish and subscribe.
#[derive(Args)]
struct PeerArgs {
    /// Backend URL (repeatable: several backends at once): grpc://HOST:PORT,
    /// k8s:///KUBECONFIG, multicast://GROUP:PORT, inprocess:.
    #[arg(long = "backend", required = true)]
    backends: Vec<String>,
    /// File with our base64 private key.
    #[arg(long)]
    key_file: PathBuf,
}

#[derive(Args)]
struct PublishArgs {
    #[command(flatten)]
    peer: PeerArgs,
    /// The recipient's base64 public key.
    #[arg(long)]
    to: String,
    /// After each message, print how many subscription streams got it, as one JSON object a
    /// line on stdout: {"line":N,"recipients":COUNT}; COUNT is null where the backend cannot
    /// tell (multicast, Kubernetes, a server that does not count).
    #[arg(long)]
    print_recipients: bool,
    /// Longest stdin line, in bytes: a longer one ends publish with an error
    /// before it is read whole (servers refuse envelopes over 64 KiB unless
    /// configured otherwise).
    #[arg(long, value_name = "BYTES", default_value_t = 256 * 1024)]
    max_line: usize,
}

#[derive(Args)]
struct SubscribeArgs {
    #[command(flatten)]
    peer: PeerArgs,
    /// Receive only from this base64 public key (default: from anyone).
    #[arg(long)]
    from: Option<String>,
}

fn main() -> ExitCode {
    let args: Vec<OsString> = std::env::args_os().collect();
    let command = Cli::command();
    // Only `serve --help` shows the sum: computing it for every run would
    // read the key files twice.
    let command = if args.get(1).and_then(|a| a.to_str()) == Some("serve")
        && args
            .iter()
            .any(|a| matches!(a.to_str(), Some("--help" | "-h")))
    {
        command.mut_subcommand("serve", |serve| serve.after_help(memory_help(&args)))
    } else {
        command
    };
    let cli = match Cli::from_arg_matches(&command.get_matches_from(&args)) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    // webrtc-ice warns about routine events (e.g. candidates closed with their agent).
    let default_level = if matches!(cli.command, Command::Serve(_)) {
        "info"
    } else {
        "warn,webrtc_ice=error"
    };
    let mut filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    // The NATS client logs each of its events (every failed reconnect) at
    // info; the cluster logs them itself, once, with their cause and level.
    // RUST_LOG that names async_nats decides for itself.
    let asked = std::env::var("RUST_LOG").is_ok_and(|v| v.contains("async_nats"));
    if !asked && let Ok(quiet) = "async_nats=warn".parse() {
        filter = filter.add_directive(quiet);
    }
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_env_filter(filter)
        .init();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("cunicu-signal: {}", report(&e));
            ExitCode::FAILURE
        }
    }
}

/// An error and its causes on one line. Many errors (ours, kube's) already
/// show their source in their own text: a cause is added only when the line
/// does not hold it yet, so that nothing is said twice.
fn report(error: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in error.chain() {
        let text = cause.to_string();
        if line.contains(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Keygen(args) => keygen(args.out.as_deref()),
        Command::Pubkey => {
            let mut text = String::new();
            std::io::stdin()
                .read_to_string(&mut text)
                .context("reading the private key from stdin")?;
            let key: PrivateKey = text.parse().context("private key on stdin")?;
            write_stdout(format!("{}\n", key.public_key()).as_bytes())
        }
        Command::Envelope(EnvelopeCommand::Seal {
            key_file,
            to,
            output,
        }) => seal(&key_file, &to, output.as_deref()),
        Command::Envelope(EnvelopeCommand::Open { key_file }) => open(&key_file),
        Command::Serve(args) => {
            // Before any thread starts: this edits the environment.
            let listeners = cunicu_signal_server::systemd::listeners()
                .context("taking the sockets passed by systemd (LISTEN_FDS)")?;
            runtime_with(args.threads)?.block_on(serve(*args, listeners))
        }
        Command::GenerateAssets { dir } => generate_assets(&dir),
        Command::Publish(args) => runtime()?.block_on(publish(args)),
        Command::Subscribe(args) => runtime()?.block_on(subscribe(args)),
        Command::Bench(args) => runtime()?.block_on(bench::run(args)),
        Command::Connect(args) => {
            let runtime = runtime()?;
            let result = runtime.block_on(connect::run(args));
            // Exit now: a blocked write to stdout (spawn_blocking) must not
            // hold the process. (stdin is read on a thread of its own.)
            runtime.shutdown_timeout(Duration::from_millis(500));
            result
        }
    }
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    runtime_with(None)
}

/// The multi-threaded runtime, with `threads` workers (tokio's default
/// when `None`: `TOKIO_WORKER_THREADS`, else the CPUs the process may use).
fn runtime_with(threads: Option<std::num::NonZeroUsize>) -> Result<tokio::runtime::Runtime> {
    // One TLS provider for the whole process.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.enable_all();
    if let Some(threads) = threads {
        builder.worker_threads(threads.get());
    }
    builder.build().context("starting the async runtime")
}

/// Reads a private key file: base64, a trailing newline is fine.
fn read_key_file(path: &Path) -> Result<PrivateKey> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading key file {}", path.display()))?;
    text.parse()
        .with_context(|| format!("key file {}", path.display()))
}

fn public_key_arg(flag: &str, text: &str) -> Result<Key> {
    let key: Key = text.parse().with_context(|| format!("--{flag} {text:?}"))?;
    if key.is_low_order() {
        bail!("--{flag} {text:?}: a low-order point, not a valid peer key");
    }
    Ok(key)
}

/// Writes a new private key to `out` (created with mode 0600, or made so) or
/// to stdout; says so when stdout is a file that others may read.
fn keygen(out: Option<&Path>) -> Result<()> {
    let key = PrivateKey::generate();
    match out {
        Some(path) => {
            use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(path)
                .with_context(|| format!("creating {}", path.display()))?;
            // An existing file keeps its mode on open: make it private first.
            file.set_permissions(std::fs::Permissions::from_mode(0o600))
                .with_context(|| format!("making {} private (mode 0600)", path.display()))?;
            writeln!(file, "{}", key.secret_base64().as_str())
                .with_context(|| format!("writing {}", path.display()))?;
            Ok(())
        }
        None => {
            write_stdout(format!("{}\n", key.secret_base64().as_str()).as_bytes())?;
            let stdout = std::io::stdout();
            if let Ok(stat) = rustix::fs::fstat(&stdout) {
                let mode = stat.st_mode & 0o7777;
                let file = rustix::fs::FileType::from_raw_mode(stat.st_mode)
                    == rustix::fs::FileType::RegularFile;
                if file && mode & 0o077 != 0 {
                    eprintln!(
                        "cunicu-signal: warning: the private key went to a file that others may \
                         read (mode {mode:04o}): run `chmod 600` on it, and next time use \
                         `keygen --out FILE` or `umask 077` first"
                    );
                }
            }
            Ok(())
        }
    }
}

/// Writes `bytes` to stdout; a reader that went away (a closed pipe) is a
/// normal end, not an error.
fn write_stdout(bytes: &[u8]) -> Result<()> {
    let mut stdout = std::io::stdout().lock();
    match stdout.write_all(bytes).and_then(|()| stdout.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e).context("writing stdout"),
        _ => Ok(()),
    }
}

fn seal(key_file: &Path, to: &str, output: Option<&Path>) -> Result<()> {
    if output.is_none() && std::io::stdout().is_terminal() {
        bail!(
            "stdout is a terminal: the envelope is binary; redirect stdout (> FILE, | ...) \
             or give --output FILE"
        );
    }
    let ours = read_key_file(key_file)?;
    let theirs = public_key_arg("to", to)?;
    let mut json = String::new();
    std::io::stdin()
        .read_to_string(&mut json)
        .context("reading the message from stdin")?;
    let message = message_from_json(&json)?;
    let envelope = message.seal(&KeyPair::new(ours, theirs))?;
    match output {
        Some(path) => std::fs::write(path, envelope.encode_to_vec())
            .with_context(|| format!("writing {}", path.display())),
        None => write_stdout(&envelope.encode_to_vec()),
    }
}

fn open(key_file: &Path) -> Result<()> {
    let ours = read_key_file(key_file)?;
    let mut bytes = Vec::new();
    std::io::stdin()
        .read_to_end(&mut bytes)
        .context("reading the envelope from stdin")?;
    let envelope = Envelope::from_bytes(&bytes)?;
    let message = envelope.open(&ours)?;
    eprintln!(
        "cunicu-signal: from {} to {}",
        envelope.sender_key()?,
        ours.public_key()
    );
    write_stdout(format!("{}\n", message_to_json(&message)).as_bytes())
}

async fn serve(args: ServeArgs, listeners: cunicu_signal_server::Listeners) -> Result<()> {
    use cunicu_signal_server::{Reloaded, systemd};
    let (delay, window) = (args.drain_delay.into(), args.drain_window.into());
    let config = args.config()?;
    tracing::info!(
        "worst-case memory with these limits: {}; worker threads: {}",
        config.memory_bound(),
        tokio::runtime::Handle::current().metrics().num_workers()
    );
    if listeners.grpc.is_some() {
        tracing::info!("serving on the socket passed by systemd instead of --listen");
    }
    let mut signals = Signals::install()?;
    let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .context("installing the SIGHUP handler")?;
    let mut server = Server::spawn_with(config, listeners).await?;
    systemd::ready(&format!("serving on {}", server.local_addr()));
    let watchdog_stop = tokio_util::sync::CancellationToken::new();
    let _watchdog = systemd::watchdog(watchdog_stop.clone());
    let signal = loop {
        tokio::select! {
            signal = signals.recv() => break signal,
            _ = hangup.recv() => match server.reload() {
                Ok(Reloaded::Nothing) => tracing::info!(
                    "SIGHUP: nothing to reload (no --tls-cert, no --allow-keys); going on"
                ),
                Ok(Reloaded::Tls) => tracing::info!("SIGHUP: TLS certificate and key reloaded"),
                Ok(Reloaded::AllowedKeys) => {}
                Ok(_) => {}
                Err(e) => tracing::error!("SIGHUP: not reloaded, the previous TLS files stay: {e}"),
            },
            result = server.join() => return result.context("server stopped"),
        }
    };
    systemd::stopping();
    tracing::info!(
        "{signal}: draining: not ready now, new clients for {delay:?}, then streams end over {window:?} \
         (send it again to stop at once)"
    );
    let again = async {
        let signal = signals.recv().await;
        tracing::info!("{signal} again: stopping at once");
    };
    let result = server.drain(delay, window, again).await;
    watchdog_stop.cancel();
    if let Err(e) = result {
        tracing::warn!("{e}; open connections were closed");
    }
    tracing::info!("stopped");
    Ok(())
}

/// Man pages (one per command) and completions for bash, zsh and fish.
fn generate_assets(dir: &Path) -> Result<()> {
    use clap::CommandFactory as _;
    let man = dir.join("man");
    let completions = dir.join("completions");
    for d in [&man, &completions] {
        std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
    }
    let mut command = Cli::command();
    command.build();
    fn pages(command: &clap::Command, name: &str, man: &Path) -> Result<()> {
        if command.is_hide_set() {
            return Ok(());
        }
        let path = man.join(format!("{name}.1"));
        let mut page = Vec::new();
        // A one-off command: leaking the few page names is fine.
        clap_mangen::Man::new(command.clone().name(&*name.to_string().leak()))
            .render(&mut page)
            .context("rendering a man page")?;
        std::fs::write(&path, page).with_context(|| format!("writing {}", path.display()))?;
        for sub in command.get_subcommands() {
            if sub.get_name() != "help" {
                pages(sub, &format!("{name}-{}", sub.get_name()), man)?;
            }
        }
        Ok(())
    }
    pages(&command, "cunicu-signal", &man)?;
    for shell in [
        clap_complete::Shell::Bash,
        clap_complete::Shell::Zsh,
        clap_complete::Shell::Fish,
    ] {
        clap_complete::generate_to(shell, &mut command, "cunicu-signal", &completions)
            .with_context(|| format!("writing the {shell} completion"))?;
    }
    Ok(())
}

/// Waits for SIGTERM or SIGINT; returns its name.
async fn shutdown_signal() -> Result<&'static str> {
    Ok(Signals::install()?.recv().await)
}

/// SIGTERM and SIGINT, caught (instead of ending the process) from the
/// moment this is made.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> Result<Self> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Signals {
            term: signal(SignalKind::terminate()).context("installing the SIGTERM handler")?,
            int: signal(SignalKind::interrupt()).context("installing the SIGINT handler")?,
        })
    }

    /// Waits for the next signal; returns its name.
    async fn recv(&mut self) -> &'static str {
        tokio::select! {
            _ = self.term.recv() => "SIGTERM",
            _ = self.int.recv() => "SIGINT",
        }
    }
}

async fn connect(
    peer: &PeerArgs,
) -> Result<(cunicu_signal::backend::SignalingBackend, PrivateKey)> {
    let ours = read_key_file(&peer.key_file)?;
    let backend = cunicu_signal::backend::connect(&peer.backends).await?;
    Ok((backend, ours))
}

async fn publish(args: PublishArgs) -> Result<()> {
    let theirs = public_key_arg("to", &args.to)?;
    let (backend, ours) = connect(&args.peer).await?;
    let pair = KeyPair::new(ours, theirs);
    let mut stdin = tokio::io::BufReader::new(tokio::io::stdin());
    let mut number = 0;
    let mut bytes = Vec::new();
    let result = async {
        loop {
            bytes.clear();
            // At most one byte more than a line may have: a longer line is
            // refused without being read whole.
            let limit = u64::try_from(args.max_line)
                .unwrap_or(u64::MAX)
                .saturating_add(1);
            let n = (&mut stdin)
                .take(limit)
                .read_until(b'\n', &mut bytes)
                .await
                .context("reading stdin")?;
            if n == 0 {
                break;
            }
            number += 1;
            if bytes.strip_suffix(b"\n").unwrap_or(&bytes).len() > args.max_line {
                bail!(
                    "stdin line {number} is longer than --max-line {} bytes",
                    args.max_line
                );
            }
            let line = std::str::from_utf8(&bytes)
                .with_context(|| format!("stdin line {number} is not UTF-8"))?;
            if line.trim().is_empty() {
                continue;
            }
            let message =
                message_from_json(line).with_context(|| format!("stdin line {number}"))?;
            let published = backend
                .publish(&pair, &message)
                .await
                .with_context(|| format!("publishing stdin line {number}"))?;
            if args.print_recipients {
                let line = serde_json::json!({
                    "line": number,
                    "recipients": published.recipients,
                });
                let mut stdout = std::io::stdout().lock();
                writeln!(stdout, "{line}")?;
                stdout.flush()?;
            }
        }
        Ok(())
    }
    .await;
    backend.close().await?;
    result
}

async fn subscribe(args: SubscribeArgs) -> Result<()> {
    let from = match &args.from {
        Some(from) => Sender::Key(public_key_arg("from", from)?),
        None => Sender::Any,
    };
    let (backend, ours) = connect(&args.peer).await?;
    let (handler, mut deliveries) = ChannelHandler::new(1024);
    let mut streams = backend.registry().stream_events();
    backend
        .subscribe(&ours, from, handler.clone() as Arc<_>)
        .await?;
    tracing::info!(key = %ours.public_key(), "subscribed");
    eprintln!("cunicu-signal: subscribed as {}", ours.public_key());
    let result = async {
        let signal = shutdown_signal();
        tokio::pin!(signal);
        loop {
            tokio::select! {
                delivery = deliveries.recv() => {
                    let Some(d) = delivery else { return Ok(()) };
                    let line = serde_json::json!({
                        "sender": d.sender.to_string(),
                        "recipient": d.recipient.to_string(),
                        "message": message_to_json(&d.message),
                    });
                    let mut stdout = std::io::stdout().lock();
                    if let Err(e) = writeln!(stdout, "{line}").and_then(|()| stdout.flush()) {
                        // A reader that went away (`| head -1`) ends us normally.
                        if e.kind() == std::io::ErrorKind::BrokenPipe {
                            return Ok(());
                        }
                        return Err(e).context("writing stdout");
                    }
                }
                event = streams.recv() => match event {
                    Ok(StreamEvent::Back { backend, .. }) => {
                        eprintln!("cunicu-signal: {backend}: subscription back");
                    }
                    Ok(StreamEvent::Refused { backend, reason, .. }) => {
                        bail!("{backend}: the server refused the subscription: {reason}");
                    }
                    // Said by the backend's warning.
                    Ok(_) => {}
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => {}
                },
                signal = &mut signal => {
                    tracing::info!("{}: stopping", signal?);
                    return Ok(());
                }
            }
        }
    }
    .await;
    backend.close().await?;
    result
}

#[cfg(test)]
mod tests {
    use std::{fmt, io};

    use std::net::SocketAddr;

    use super::{listen_addr, report};

    #[test]
    fn listen_addresses_as_users_write_them() {
        let addr = |s: &str| listen_addr(s).unwrap();
        assert_eq!(addr(":8080"), SocketAddr::from(([0u16; 8], 8080)));
        assert_eq!(addr("127.0.0.1:80"), SocketAddr::from(([127, 0, 0, 1], 80)));
        assert_eq!(
            addr("[::1]:80"),
            SocketAddr::from(([0, 0, 0, 0, 0, 0, 0, 1], 80))
        );
        assert!(addr("localhost:8080").ip().is_loopback());
        assert_eq!(addr("localhost:8080").port(), 8080);
        for bad in [":", ":x", ":65536", "8080", "127.0.0.1", "[::1]", "host:"] {
            assert!(listen_addr(bad).is_err(), "{bad} accepted");
        }
    }

    /// An error that shows its source in its own text, as many do.
    #[derive(Debug)]
    struct Outer(io::Error);

    impl fmt::Display for Outer {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            write!(f, "outer: {}", self.0)
        }
    }

    impl std::error::Error for Outer {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.0)
        }
    }

    #[test]
    fn report_says_each_cause_once() {
        let e = anyhow::Error::new(Outer(io::Error::other("inner"))).context("doing it");
        assert_eq!(report(&e), "doing it: outer: inner");
        let e = anyhow::Error::new(io::Error::other("plain"))
            .context("a")
            .context("b");
        assert_eq!(report(&e), "b: a: plain");
    }
}
