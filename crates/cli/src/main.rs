//! `cunicu-signal`: keys, envelopes, the signaling server, publish and subscribe.
//!
//! This binary only parses arguments and calls the library and the server crate.

mod bench;
mod connect;

use std::{
    io::{IsTerminal, Read, Write},
    net::SocketAddr,
    num::NonZeroU32,
    path::{Path, PathBuf},
    process::ExitCode,
    sync::{Arc, LazyLock},
    time::Duration,
};

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use cunicu_signal::{
    Backend, ChannelHandler, Key, KeyPair,
    json::{message_from_json, message_to_json},
    proto::signaling::Envelope,
};
use cunicu_signal_server::{AuthMode, ClusterConfig, Config, Rate, Relay, Server, TlsFiles};
use prost::Message as _;
use tokio::io::AsyncBufReadExt;

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
    /// Print a new private key (base64, like `wg genkey`).
    Keygen,
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
    /// An ICE session with a peer over signaling: stdin lines out as datagrams,
    /// datagrams in to stdout (a tiny netcat over ICE).
    Connect(connect::ConnectArgs),
    /// Write the man pages (DIR/man) and shell completions (DIR/completions) of this
    /// command, for packages.
    #[command(hide = true)]
    GenerateAssets {
        /// Where to write them.
        dir: PathBuf,
    },
}

#[derive(Subcommand)]
enum EnvelopeCommand {
    /// Read one Message as proto3 JSON on stdin; write the binary Envelope to stdout.
    Seal {
        /// File with our base64 private key.
        #[arg(long)]
        key_file: PathBuf,
        /// The recipient's base64 public key.
        #[arg(long)]
        to: String,
    },
    /// Read a binary Envelope on stdin; write the Message as proto3 JSON to stdout.
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

fn memory_help() -> String {
    format!(
        "With every limit reached at once, the server's memory adds up to about {} \
         (defaults, plaintext; TLS adds {:.0} MiB). Lower --max-connections, \
         --max-subscriptions, --max-calls or --max-queued-bytes to fit a smaller limit.",
        DEFAULTS.memory_bound(),
        {
            let mut tls = DEFAULTS.clone();
            tls.tls = Some(TlsFiles {
                cert: PathBuf::new(),
                key: PathBuf::new(),
            });
            (tls.memory_bound().total() - DEFAULTS.memory_bound().total()) as f64
                / f64::from(1 << 20)
        }
    )
}

#[derive(Args)]
#[command(after_help = memory_help())]
struct ServeArgs {
    /// Address of the gRPC port.
    #[arg(long, env = "CUNICU_SIGNAL_LISTEN", default_value_t = DEFAULTS.listen)]
    listen: SocketAddr,
    /// Address of the HTTP port with Prometheus metrics at /metrics and liveness at /healthz.
    #[arg(long, env = "CUNICU_SIGNAL_METRICS_LISTEN")]
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
    /// A subscriber that takes nothing for this long while envelopes wait for it is cut off
    /// (UNAVAILABLE "subscriber too slow").
    #[arg(long, env = "CUNICU_SIGNAL_STALL_TIMEOUT", default_value_t = default_duration(DEFAULTS.stall_timeout))]
    stall_timeout: humantime::Duration,
    /// Most client connections open at once; beyond it new ones wait to be accepted.
    #[arg(long, env = "CUNICU_SIGNAL_MAX_CONNECTIONS", default_value_t = DEFAULTS.max_connections)]
    max_connections: usize,
    /// Most connections open at once from one client; more are refused.
    #[arg(long, env = "CUNICU_SIGNAL_MAX_CONNECTIONS_PER_CLIENT", default_value_t = DEFAULTS.max_connections_per_client)]
    max_connections_per_client: usize,
    /// New connections per second from one client (a token bucket); more are refused.
    #[arg(long, env = "CUNICU_SIGNAL_CONNECTION_RATE", default_value_t = DEFAULTS.connection_rate.per_second)]
    connection_rate: NonZeroU32,
    /// New connections one client may open at once before --connection-rate applies.
    #[arg(long, env = "CUNICU_SIGNAL_CONNECTION_BURST", default_value_t = DEFAULTS.connection_rate.burst)]
    connection_burst: NonZeroU32,
    /// Deadline of a connection's TLS handshake, HTTP/2 preface and first request.
    #[arg(long, env = "CUNICU_SIGNAL_HANDSHAKE_TIMEOUT", default_value_t = default_duration(DEFAULTS.handshake_timeout))]
    handshake_timeout: humantime::Duration,
    /// Deadline of a request's message once its stream opened.
    #[arg(long, env = "CUNICU_SIGNAL_REQUEST_TIMEOUT", default_value_t = default_duration(DEFAULTS.request_timeout))]
    request_timeout: humantime::Duration,
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
    /// How far a proof's time may be from the server's clock.
    #[arg(long, env = "CUNICU_SIGNAL_AUTH_SKEW", default_value_t = default_duration(DEFAULTS.auth_skew))]
    auth_skew: humantime::Duration,
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
        config.request_timeout = self.request_timeout.into();
        config.idle_timeout = self.idle_timeout.into();
        config.max_subscriptions = self.max_subscriptions;
        config.max_subscriptions_per_client = self.max_subscriptions_per_client;
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
        config.max_streams_per_connection = self.max_streams_per_connection;
        config.keepalive_interval = self.keepalive_interval.into();
        config.keepalive_timeout = self.keepalive_timeout.into();
        config.key = self.key_file.as_deref().map(read_key_file).transpose()?;
        config.auth = self.auth;
        config.auth_skew = self.auth_skew.into();
        config.allow_keys = self.allow_keys;
        let urls: Vec<String> = self.cluster.into_iter().filter(|u| !u.is_empty()).collect();
        if !urls.is_empty() {
            let mut cluster = ClusterConfig::new(urls);
            cluster.creds = self.cluster_creds;
            cluster.ca = self.cluster_ca;
            cluster.name = self.cluster_name;
            cluster.subject_prefix = self.cluster_subject_prefix;
            config.cluster = Some(cluster);
        }
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
    let cli = Cli::parse();
    // webrtc-ice warns about routine events (e.g. candidates closed with their agent).
    let default_level = if matches!(cli.command, Command::Serve(_)) {
        "info"
    } else {
        "warn,webrtc_ice=error"
    };
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level)),
        )
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
        Command::Keygen => {
            println!("{}", Key::generate());
            Ok(())
        }
        Command::Pubkey => {
            let mut text = String::new();
            std::io::stdin()
                .read_to_string(&mut text)
                .context("reading the private key from stdin")?;
            let key: Key = text.parse().context("private key on stdin")?;
            println!("{}", key.public_key());
            Ok(())
        }
        Command::Envelope(EnvelopeCommand::Seal { key_file, to }) => seal(&key_file, &to),
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
fn read_key_file(path: &Path) -> Result<Key> {
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

fn seal(key_file: &Path, to: &str) -> Result<()> {
    let ours = read_key_file(key_file)?;
    let theirs = public_key_arg("to", to)?;
    let mut json = String::new();
    std::io::stdin()
        .read_to_string(&mut json)
        .context("reading the message from stdin")?;
    let message = message_from_json(&json)?;
    let envelope = message.seal(&KeyPair::new(ours, theirs))?;
    let mut stdout = std::io::stdout().lock();
    stdout.write_all(&envelope.encode_to_vec())?;
    stdout.flush()?;
    Ok(())
}

fn open(key_file: &Path) -> Result<()> {
    let ours = read_key_file(key_file)?;
    let mut bytes = Vec::new();
    std::io::stdin()
        .read_to_end(&mut bytes)
        .context("reading the envelope from stdin")?;
    let message = Envelope::from_bytes(&bytes)?.open(&ours)?;
    println!("{}", message_to_json(&message));
    Ok(())
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

async fn connect(peer: &PeerArgs) -> Result<(cunicu_signal::backend::SignalingBackend, Key)> {
    let ours = read_key_file(&peer.key_file)?;
    let backend = cunicu_signal::backend::connect(&peer.backends).await?;
    Ok((backend, ours))
}

async fn publish(args: PublishArgs) -> Result<()> {
    let theirs = public_key_arg("to", &args.to)?;
    let (backend, ours) = connect(&args.peer).await?;
    let pair = KeyPair::new(ours, theirs);
    let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    let mut number = 0;
    let result = async {
        while let Some(line) = lines.next_line().await.context("reading stdin")? {
            number += 1;
            if line.trim().is_empty() {
                continue;
            }
            let message =
                message_from_json(&line).with_context(|| format!("stdin line {number}"))?;
            backend
                .publish(&pair, &message)
                .await
                .with_context(|| format!("publishing stdin line {number}"))?;
        }
        Ok(())
    }
    .await;
    backend.close().await?;
    result
}

async fn subscribe(args: SubscribeArgs) -> Result<()> {
    let theirs = match &args.from {
        Some(from) => public_key_arg("from", from)?,
        None => Key::ZERO,
    };
    let (backend, ours) = connect(&args.peer).await?;
    let (handler, mut deliveries) = ChannelHandler::new(1024);
    let pair = KeyPair::new(ours, theirs);
    backend.subscribe(&pair, handler.clone() as Arc<_>).await?;
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
                    writeln!(stdout, "{line}")?;
                    stdout.flush()?;
                }
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

    use super::report;

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
