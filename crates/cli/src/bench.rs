//! `cunicu-signal bench`: a load generator for any server that speaks the
//! `cunicu.signaling.Signaling` protocol (ours or cunīcu's).
//!
//! It opens N subscription streams over K keys (spread over several HTTP/2
//! connections) and runs P publishers, as fast as they can or at a set total
//! rate. Envelopes have random bodies of a realistic size; the nonce carries
//! a sequence number and the send time, so that subscribers measure the
//! end-to-end latency without opening anything (the server never does either).
//!
//! With `--server-pid`, it also reads the server process's CPU time and
//! resident memory from `/proc` just before and just after the load (or, with
//! `--idle`, before the connections open and while they are held), so that
//! the same run reports what each delivery or each idle peer costs the server.

use std::{
    io::IsTerminal,
    net::{IpAddr, Ipv4Addr},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering::Relaxed},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use clap::Args;
use cunicu_signal::{
    Key, PrivateKey,
    backend::grpc::{
        GrpcOptions, GrpcTarget, RECIPIENTS_ASK, RECIPIENTS_METADATA, Security, ServerAuth,
        channel_for,
    },
    proto::method::{PUBLISH, SUBSCRIBE},
    proto::signaling::{
        EncryptedMessage, Envelope, SubscribeParams, signaling_client::SignalingClient,
    },
};
use futures::{StreamExt, TryStreamExt};
use hdrhistogram::Histogram;
use parking_lot::Mutex;
use tonic::transport::{Channel, Endpoint};

/// Options of the load generator.
#[derive(Args, Debug)]
pub struct BenchArgs {
    /// The server: grpc://HOST:PORT[?insecure=true|skip_verify=true|ca=FILE].
    #[arg(long)]
    backend: String,
    /// Publish through this server instead (another replica of a cluster, to
    /// measure deliveries across replicas); subscriptions stay on --backend.
    #[arg(long)]
    publish_backend: Option<String>,
    /// Subscription streams to open.
    #[arg(long, default_value_t = 1000)]
    subscribers: usize,
    /// Keys the subscriptions are spread over (round robin).
    #[arg(long, default_value_t = 100)]
    keys: usize,
    /// Concurrent publishers (each waits for its Publish to return before the next).
    #[arg(long, default_value_t = 8)]
    publishers: usize,
    /// Total publishes per second; 0 = as fast as possible.
    #[arg(long, default_value_t = 0)]
    rate: u64,
    /// How long to publish (e.g. 10s).
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Only hold the subscriptions open for --duration, publishing nothing
    /// (for measuring the server's memory per idle subscription).
    #[arg(long)]
    idle: bool,
    /// Subscription streams per HTTP/2 connection.
    #[arg(long, default_value_t = 500)]
    streams_per_connection: usize,
    /// Body size of each envelope in bytes (a sealed candidate is about 120).
    #[arg(long, default_value_t = 120)]
    body_size: usize,
    /// Print the report as one JSON object instead of text (and no progress).
    #[arg(long)]
    json: bool,
    /// Exit with status 1 (after the report) when more than this many errors
    /// came: publishes that failed and subscription streams that ended early.
    #[arg(long, default_value_t = 0)]
    max_errors: u64,
    /// Prove every key to the server (docs/PROTOCOL.md §11), for a server with
    /// `--auth required` or to measure what proofs cost: the keys subscribed to
    /// and the publishers' keys are then real key pairs.
    #[arg(long)]
    auth: bool,
    /// The server's process id (on this machine): report its CPU time per
    /// delivery and its memory (RSS), read from /proc/PID/stat and /proc/PID/status.
    #[arg(long)]
    server_pid: Option<u32>,
    /// Bind the connections' local ends round robin to 127.0.0.1, 127.0.0.2, ...
    /// (this many addresses), so that more connections fit than one address has
    /// ephemeral ports (about 28 000). Needs a plaintext server on 127.0.0.0/8;
    /// 0 = let the system choose.
    #[arg(long, default_value_t = 0)]
    local_addresses: u32,
    /// Connections being set up at once.
    #[arg(long, default_value_t = 64)]
    connect_concurrency: usize,
    /// Every Publish asks how many subscription streams got its envelope
    /// (metadata `cunicu-recipients: ask`), to measure what counting costs.
    #[arg(long)]
    ask_recipients: bool,
}

struct Stats {
    published: AtomicU64,
    publish_errors: AtomicU64,
    received: AtomicU64,
    /// Subscription streams that ended (or failed) before the bench closed them.
    streams_ended: AtomicU64,
    latency: Mutex<Histogram<u64>>,
    /// How long each Publish call took until its answer (µs).
    publish_latency: Mutex<Histogram<u64>>,
}

/// A new HTTP/2 connection to the server, secured as the URL says, from
/// `local` if given (plaintext only, checked by the caller).
async fn connection(url: &url::Url, target: &GrpcTarget, local: Option<IpAddr>) -> Result<Channel> {
    let options = GrpcOptions::default();
    let channel = match local {
        None => channel_for(url, &options)?,
        // The library's channel has no local address; this one keeps its
        // plaintext settings (keepalive as cunīcu's server tolerates it).
        Some(local) => Endpoint::from_shared(format!("http://{}:{}", target.host, target.port))
            .with_context(|| format!("--backend {url}"))?
            .local_address(Some(local))
            .connect_timeout(options.connect_timeout)
            .http2_keep_alive_interval(options.keepalive_interval)
            .keep_alive_timeout(options.keepalive_timeout)
            .keep_alive_while_idle(false)
            .tcp_nodelay(true)
            .connect_lazy(),
    };
    // Connect now, so that set-up errors show before the load starts. Many
    // connections set up at once from one address can meet the server's
    // limit of such calls per client: that one waits its turn (the server's
    // pushback, or a moment) and tries again, a bounded number of times.
    let mut client = SignalingClient::new(channel.clone());
    let mut refused = 0;
    loop {
        match client.get_build_info(cunicu_signal::proto::Empty {}).await {
            Ok(_) => return Ok(channel),
            Err(s) if s.code() == tonic::Code::ResourceExhausted && refused < SETUP_RETRIES => {
                refused += 1;
                let wait =
                    cunicu_signal::backend::grpc::pushback(&s).unwrap_or(Duration::from_millis(50));
                tokio::time::sleep(wait).await;
            }
            Err(s) => {
                let from = local.map(|l| format!(" from {l}")).unwrap_or_default();
                bail!("{url}{from}: {:?}: {}", s.code(), s.message());
            }
        }
    }
}

/// Times a connection's first call is tried again when the server says it
/// has too many calls in progress for this client.
const SETUP_RETRIES: u32 = 200;

/// The local address of connection `i` of `count` addresses from 127.0.0.1 up.
fn local_address(i: usize, count: u32) -> Option<IpAddr> {
    if count == 0 {
        return None;
    }
    let offset = (i % count as usize) as u32;
    Some(IpAddr::V4(Ipv4Addr::from(
        u32::from(Ipv4Addr::new(127, 0, 0, 1)) + offset,
    )))
}

/// CPU time and memory of the server process at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ServerSample {
    user: Duration,
    system: Duration,
    rss_kib: u64,
}

/// Reads a process's CPU time (`/proc/PID/stat`) and RSS (`/proc/PID/status`).
struct ServerProbe {
    pid: u32,
    ticks_per_second: u64,
}

impl ServerProbe {
    fn new(pid: u32) -> Result<Self> {
        let probe = ServerProbe {
            pid,
            ticks_per_second: rustix::param::clock_ticks_per_second().max(1),
        };
        probe.sample().context("--server-pid")?;
        Ok(probe)
    }

    fn sample(&self) -> Result<ServerSample> {
        let read = |file: &str| {
            let path = format!("/proc/{}/{file}", self.pid);
            std::fs::read_to_string(&path)
                .with_context(|| format!("server process {}: reading {path}", self.pid))
        };
        let (user, system) = cpu_ticks(&read("stat")?)
            .with_context(|| format!("/proc/{}/stat: no CPU times", self.pid))?;
        let rss_kib = rss_kib(&read("status")?)
            .with_context(|| format!("/proc/{}/status: no VmRSS line", self.pid))?;
        let time = |ticks: u64| {
            Duration::from_micros(ticks.saturating_mul(1_000_000) / self.ticks_per_second)
        };
        Ok(ServerSample {
            user: time(user),
            system: time(system),
            rss_kib,
        })
    }
}

/// utime and stime (fields 14 and 15, in clock ticks) of a `/proc/PID/stat`
/// line. The command name (field 2) may hold spaces and parentheses, so the
/// fields are counted from after its last `)`.
fn cpu_ticks(stat: &str) -> Option<(u64, u64)> {
    let (_, rest) = stat.rsplit_once(')')?;
    let mut fields = rest.split_whitespace().skip(11);
    let user = fields.next()?.parse().ok()?;
    let system = fields.next()?.parse().ok()?;
    Some((user, system))
}

/// The `VmRSS:` value of `/proc/PID/status`, in KiB.
fn rss_kib(status: &str) -> Option<u64> {
    let line = status.lines().find_map(|l| l.strip_prefix("VmRSS:"))?;
    line.trim().strip_suffix("kB")?.trim().parse().ok()
}

/// What the server spent between two samples, as JSON fields and one line of text.
fn server_report(
    before: ServerSample,
    after: ServerSample,
    deliveries: u64,
) -> (serde_json::Value, String) {
    let user = after.user.saturating_sub(before.user).as_secs_f64() * 1e6;
    let system = after.system.saturating_sub(before.system).as_secs_f64() * 1e6;
    let per = |us: f64| (deliveries > 0).then(|| us / deliveries as f64);
    let json = serde_json::json!({
        "server_cpu_user_us": user,
        "server_cpu_system_us": system,
        "server_cpu_us_per_delivery": per(user + system),
        "server_cpu_user_us_per_delivery": per(user),
        "server_cpu_system_us_per_delivery": per(system),
        "server_rss_before_kib": before.rss_kib,
        "server_rss_after_kib": after.rss_kib,
    });
    let text = match (per(user), per(system)) {
        (Some(u), Some(s)) => format!(
            "server      CPU {:.2} µs per delivery ({u:.2} user + {s:.2} system), \
             RSS {} -> {} KiB",
            u + s,
            before.rss_kib,
            after.rss_kib
        ),
        _ => format!(
            "server      CPU {:.0} µs, nothing delivered, RSS {} -> {} KiB",
            user + system,
            before.rss_kib,
            after.rss_kib
        ),
    };
    (json, text)
}

fn topic(i: usize) -> Vec<u8> {
    let mut key = [0u8; 32];
    key[..8].copy_from_slice(&(i as u64).to_be_bytes());
    key[8..].copy_from_slice(&[0xbe; 24]);
    key.to_vec()
}

pub async fn run(args: BenchArgs) -> Result<()> {
    if args.subscribers == 0
        || args.keys == 0
        || args.streams_per_connection == 0
        || args.connect_concurrency == 0
    {
        bail!(
            "--subscribers, --keys, --streams-per-connection and --connect-concurrency \
             must be at least 1"
        );
    }
    if args.keys > args.subscribers {
        bail!(
            "--keys ({}) must not exceed --subscribers ({})",
            args.keys,
            args.subscribers
        );
    }
    if !args.idle && args.publishers == 0 {
        bail!("--publishers must be at least 1");
    }
    let url =
        url::Url::parse(&args.backend).with_context(|| format!("--backend {}", args.backend))?;
    if url.scheme() != "grpc" {
        bail!("--backend must be a grpc:// URL");
    }
    let target = GrpcTarget::parse(&url)?;
    if args.local_addresses > 0 {
        let loopback = target
            .host
            .parse::<Ipv4Addr>()
            .is_ok_and(|ip| ip.is_loopback());
        if !loopback || target.security != Security::Plaintext {
            bail!(
                "--local-addresses needs a plaintext server on 127.0.0.0/8 \
                 (grpc://127.x.x.x:PORT?insecure=true), not {url}"
            );
        }
        if args.local_addresses > (1 << 24) - 2 {
            bail!(
                "--local-addresses {} is more than 127.0.0.0/8 holds",
                args.local_addresses
            );
        }
    }
    let probe = args.server_pid.map(ServerProbe::new).transpose()?;
    let before_setup = probe.as_ref().map(ServerProbe::sample).transpose()?;
    let start = Instant::now();
    let stats = Arc::new(Stats {
        published: AtomicU64::new(0),
        publish_errors: AtomicU64::new(0),
        received: AtomicU64::new(0),
        publish_latency: Mutex::new(Histogram::new_with_bounds(1, 60_000_000, 3)?),
        streams_ended: AtomicU64::new(0),
        latency: Mutex::new(Histogram::new_with_bounds(1, 60_000_000, 3)?),
    });

    // Subscriptions, each waiting for its sync envelope before the load starts.
    let connections = args.subscribers.div_ceil(args.streams_per_connection);
    let channels: Vec<Channel> = futures::stream::iter(0..connections)
        .map(|i| connection(&url, &target, local_address(i, args.local_addresses)))
        .buffered(args.connect_concurrency)
        .try_collect()
        .await?;
    // The keys subscribed to: with --auth, real key pairs whose holder we are.
    let topics: Arc<Vec<(Vec<u8>, Option<PrivateKey>)>> = Arc::new(
        (0..args.keys)
            .map(|i| match args.auth {
                true => {
                    let private = PrivateKey::generate();
                    (private.public_key().as_bytes().to_vec(), Some(private))
                }
                false => (topic(i), None),
            })
            .collect(),
    );
    let server_auth = ServerAuth::for_url(&url, &GrpcOptions::default())?;
    let stop = Arc::new(AtomicBool::new(false));
    let (done_tx, done_rx) = tokio::sync::watch::channel(false);
    let mut subscribers = tokio::task::JoinSet::new();
    let (ready_tx, mut ready_rx) =
        tokio::sync::mpsc::channel::<Result<(), tonic::Status>>(args.subscribers);
    for i in 0..args.subscribers {
        let mut client = SignalingClient::new(channels[i / args.streams_per_connection].clone());
        let (stats, ready, mut done) = (stats.clone(), ready_tx.clone(), done_rx.clone());
        let (key, private) = topics[i % args.keys].clone();
        let (auth, url) = (server_auth.clone(), args.backend.clone());
        subscribers.spawn(async move {
            let mut request = tonic::Request::new(SubscribeParams { key });
            if let Some(private) = private
                && let Err(e) = auth
                    .prove(&url, &client, &mut request, &private, SUBSCRIBE)
                    .await
            {
                let _ = ready
                    .send(Err(tonic::Status::unauthenticated(e.to_string())))
                    .await;
                return;
            }
            let mut stream = match client.subscribe(request).await {
                Ok(response) => response.into_inner(),
                Err(status) => {
                    let _ = ready.send(Err(status)).await;
                    return;
                }
            };
            let _ = match stream.message().await {
                Ok(_) => ready.send(Ok(())).await,
                Err(status) => ready.send(Err(status)).await,
            };
            // Made at the first envelope: a histogram is about 140 KB, too
            // much to hold for each of 100 000 idle subscriptions.
            let mut local: Option<Histogram<u64>> = None;
            let mut pending = 0u32;
            loop {
                let envelope = tokio::select! {
                    message = stream.message() => match message {
                        Ok(Some(envelope)) => envelope,
                        ended => {
                            if stats.streams_ended.fetch_add(1, Relaxed) == 0 {
                                let why = match ended {
                                    Err(status) => status_line(&status),
                                    _ => "the server ended it".to_string(),
                                };
                                eprintln!(
                                    "cunicu-signal bench: first subscription stream ended early: {why}"
                                );
                            }
                            break;
                        }
                    },
                    _ = done.wait_for(|done| *done) => break,
                };
                let Some(sent) = envelope
                    .contents
                    .as_ref()
                    .and_then(|c| c.nonce.get(8..16))
                    .and_then(|b| <[u8; 8]>::try_from(b).ok())
                else {
                    continue;
                };
                let sent = Duration::from_nanos(u64::from_be_bytes(sent));
                let micros = start.elapsed().saturating_sub(sent).as_micros() as u64;
                stats.received.fetch_add(1, Relaxed);
                if local.is_none() {
                    local = Histogram::new_with_bounds(1, 60_000_000, 3).ok();
                }
                if let Some(h) = local.as_mut() {
                    let _ = h.record(micros.max(1));
                }
                pending += 1;
                // Merge into the shared histogram now and then, not per envelope.
                if pending == 256 {
                    pending = 0;
                    if let Some(h) = local.as_mut() {
                        let mut all = stats.latency.lock();
                        let _ = all.add(&*h);
                        h.reset();
                    }
                }
            }
            if let Some(h) = local.as_ref() {
                let _ = stats.latency.lock().add(h);
            }
        });
    }
    drop(ready_tx);
    for _ in 0..args.subscribers {
        match ready_rx.recv().await {
            Some(Ok(())) => {}
            Some(Err(status)) => bail!("subscribe failed: {}", status_line(&status)),
            None => bail!("subscriptions ended before they were confirmed"),
        }
    }
    let setup = start.elapsed();
    eprintln!(
        "cunicu-signal bench: {} subscriptions on {} keys over {} connections ready in {:.2?}",
        args.subscribers, args.keys, connections, setup
    );

    if args.idle {
        tokio::time::sleep(args.duration).await;
        // While the subscriptions are still held.
        let with_peers = probe.as_ref().map(ServerProbe::sample).transpose()?;
        let streams_ended = stats.streams_ended.load(Relaxed);
        let mut report = serde_json::json!({
            "mode": "idle",
            "subscriptions": args.subscribers,
            "keys": args.keys,
            "connections": connections,
            "setup_seconds": setup.as_secs_f64(),
            "held_seconds": args.duration.as_secs_f64(),
            "streams_ended": streams_ended,
        });
        let mut server_text = String::new();
        if let (Some(before), Some(with), Some(fields)) =
            (before_setup, with_peers, report.as_object_mut())
        {
            let added = with.rss_kib.saturating_sub(before.rss_kib);
            let per_subscription = added as f64 * 1024.0 / args.subscribers as f64;
            let per_connection = added as f64 * 1024.0 / connections as f64;
            fields.insert("server_rss_before_kib".into(), before.rss_kib.into());
            fields.insert("server_rss_with_peers_kib".into(), with.rss_kib.into());
            fields.insert(
                "server_rss_bytes_per_subscription".into(),
                per_subscription.into(),
            );
            fields.insert(
                "server_rss_bytes_per_connection".into(),
                per_connection.into(),
            );
            server_text = format!(
                "\nserver RSS {} KiB before, {} KiB with them: {:.0} bytes per subscription, \
                 {:.0} per connection",
                before.rss_kib, with.rss_kib, per_subscription, per_connection
            );
        }
        if args.json {
            println!("{report}");
        } else {
            println!(
                "held {} idle subscriptions on {} connections for {:?}, {} ended early{}",
                args.subscribers, connections, args.duration, streams_ended, server_text
            );
        }
        let _ = done_tx.send(true);
        while subscribers.join_next().await.is_some() {}
        if streams_ended > args.max_errors {
            bail!(
                "{streams_ended} streams ended early, more than --max-errors {}",
                args.max_errors
            );
        }
        return Ok(());
    }

    // Publishers. With --rate, each publisher sends its share at fixed intervals.
    let publish_url = match &args.publish_backend {
        Some(other) => {
            url::Url::parse(other).with_context(|| format!("--publish-backend {other}"))?
        }
        None => url.clone(),
    };
    let publish_target = GrpcTarget::parse(&publish_url)?;
    let publish_channel = connection(
        &publish_url,
        &publish_target,
        local_address(0, args.local_addresses),
    )
    .await?;
    let before_load = probe.as_ref().map(ServerProbe::sample).transpose()?;
    let load_start = Instant::now();
    let mut publishers = tokio::task::JoinSet::new();
    let per_publisher_interval =
        (args.rate > 0).then(|| Duration::from_secs_f64(args.publishers as f64 / args.rate as f64));
    let body = {
        let mut body = vec![0u8; args.body_size];
        for (i, b) in body.iter_mut().enumerate() {
            *b = (i as u8).wrapping_mul(151).wrapping_add(7);
        }
        body
    };
    let subs_per_key: Vec<u64> = (0..args.keys)
        .map(|k| ((args.subscribers - k).div_ceil(args.keys)) as u64)
        .collect();
    let expected = Arc::new(AtomicU64::new(0));
    for p in 0..args.publishers {
        let mut client = SignalingClient::new(publish_channel.clone());
        let (stats, stop, expected, body) =
            (stats.clone(), stop.clone(), expected.clone(), body.clone());
        let subs_per_key = subs_per_key.clone();
        let keys = args.keys;
        let (topics, auth, url) = (topics.clone(), server_auth.clone(), args.backend.clone());
        let private = args.auth.then(PrivateKey::generate);
        let ask = args.ask_recipients;
        publishers.spawn(async move {
            let mut ticker = per_publisher_interval.map(|i| {
                let mut t = tokio::time::interval(i);
                t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                t
            });
            let mut seq = 0u64;
            let sender = match &private {
                Some(private) => private.public_key().as_bytes().to_vec(),
                None => Key::from([p as u8; 32]).as_bytes().to_vec(),
            };
            while !stop.load(Relaxed) {
                if let Some(t) = ticker.as_mut() {
                    t.tick().await;
                }
                let k = (p + seq as usize * 7919) % keys;
                let mut nonce = Vec::with_capacity(24);
                nonce.extend_from_slice(&seq.to_be_bytes());
                nonce.extend_from_slice(&(start.elapsed().as_nanos() as u64).to_be_bytes());
                nonce.extend_from_slice(&(p as u64).to_be_bytes());
                let envelope = Envelope {
                    sender: sender.clone(),
                    recipient: topics[k].0.clone(),
                    contents: Some(EncryptedMessage {
                        body: body.clone(),
                        nonce,
                    }),
                };
                let mut request = tonic::Request::new(envelope);
                if ask {
                    request.metadata_mut().insert(
                        RECIPIENTS_METADATA,
                        tonic::metadata::MetadataValue::from_static(RECIPIENTS_ASK),
                    );
                }
                if let Some(private) = &private
                    && auth
                        .prove(&url, &client, &mut request, private, PUBLISH)
                        .await
                        .is_err()
                {
                    stats.publish_errors.fetch_add(1, Relaxed);
                    seq += 1;
                    continue;
                }
                let called = Instant::now();
                match client.publish(request).await {
                    Ok(_) => {
                        let _ = stats
                            .publish_latency
                            .lock()
                            .record(called.elapsed().as_micros() as u64);
                        stats.published.fetch_add(1, Relaxed);
                        expected.fetch_add(subs_per_key[k], Relaxed);
                    }
                    Err(status) => {
                        // The first one says why; the count says how often.
                        if stats.publish_errors.fetch_add(1, Relaxed) == 0 {
                            eprintln!(
                                "cunicu-signal bench: first publish error: {}",
                                status_line(&status)
                            );
                        }
                    }
                }
                seq += 1;
            }
        });
    }
    {
        // A line a second on a terminal; nothing in a pipe or with --json.
        let progress = (!args.json && std::io::stderr().is_terminal())
            .then(|| tokio::spawn(progress(stats.clone(), load_start)));
        let progress = progress.map(tokio_util::task::AbortOnDropHandle::new);
        tokio::time::sleep(args.duration).await;
        drop(progress);
    }
    stop.store(true, Relaxed);
    while publishers.join_next().await.is_some() {}
    let load_time = load_start.elapsed();
    let published = stats.published.load(Relaxed);
    let expected = expected.load(Relaxed);

    // Drain: wait until everything arrived or nothing more comes.
    let mut last = u64::MAX;
    let drain_start = Instant::now();
    loop {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let now = stats.received.load(Relaxed);
        if now >= expected || (now == last && drain_start.elapsed() > Duration::from_secs(1)) {
            break;
        }
        last = now;
        if drain_start.elapsed() > Duration::from_secs(10) {
            break;
        }
    }
    // After the drain (deliveries still arriving are part of the load), before
    // the subscriptions close.
    let after_load = probe.as_ref().map(ServerProbe::sample).transpose()?;
    let _ = done_tx.send(true);
    while subscribers.join_next().await.is_some() {}
    let received = stats.received.load(Relaxed);
    let latency = stats.latency.lock().clone();
    let publish_latency = stats.publish_latency.lock().clone();
    let secs = load_time.as_secs_f64();
    let streams_ended = stats.streams_ended.load(Relaxed);
    let mut report = serde_json::json!({
        "mode": if args.rate > 0 { "rate" } else { "max" },
        "subscriptions": args.subscribers,
        "keys": args.keys,
        "publishers": args.publishers,
        "ask_recipients": args.ask_recipients,
        "connections": connections + 1,
        "body_bytes": args.body_size,
        "seconds": secs,
        "published": published,
        "publish_errors": stats.publish_errors.load(Relaxed),
        "publishes_per_second": published as f64 / secs,
        "expected_deliveries": expected,
        "delivered": received,
        "deliveries_per_second": received as f64 / secs,
        "lost": expected.saturating_sub(received),
        "latency_p50_ms": latency.value_at_quantile(0.5) as f64 / 1000.0,
        "latency_p99_ms": latency.value_at_quantile(0.99) as f64 / 1000.0,
        "latency_max_ms": latency.max() as f64 / 1000.0,
        "publish_call_p50_ms": publish_latency.value_at_quantile(0.5) as f64 / 1000.0,
        "publish_call_p99_ms": publish_latency.value_at_quantile(0.99) as f64 / 1000.0,
        "streams_ended": streams_ended,
    });
    let mut server_text = String::new();
    if let (Some(before), Some(after), Some(fields)) =
        (before_load, after_load, report.as_object_mut())
    {
        let (json, text) = server_report(before, after, received);
        if let serde_json::Value::Object(json) = json {
            fields.extend(json);
        }
        server_text = format!("\n{text}");
    }
    let errors = stats.publish_errors.load(Relaxed) + streams_ended;
    if args.json {
        println!("{report}");
    } else {
        println!(
            "{} subscriptions on {} keys, {} publishers, {:.1} s\n\
             published   {published} ({:.0}/s), errors {}\n\
             delivered   {received} of {expected} ({:.0}/s), lost {}, \
             streams ended early {streams_ended}\n\
             latency     p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms\n\
             publish     p50 {:.2} ms, p99 {:.2} ms until answered{server_text}",
            args.subscribers,
            args.keys,
            args.publishers,
            secs,
            published as f64 / secs,
            stats.publish_errors.load(Relaxed),
            received as f64 / secs,
            expected.saturating_sub(received),
            latency.value_at_quantile(0.5) as f64 / 1000.0,
            latency.value_at_quantile(0.99) as f64 / 1000.0,
            latency.max() as f64 / 1000.0,
            publish_latency.value_at_quantile(0.5) as f64 / 1000.0,
            publish_latency.value_at_quantile(0.99) as f64 / 1000.0,
        );
    }
    if errors > args.max_errors {
        bail!(
            "{errors} errors ({} publishes failed, {streams_ended} streams ended early), \
             more than --max-errors {}",
            stats.publish_errors.load(Relaxed),
            args.max_errors
        );
    }
    Ok(())
}

/// A gRPC status in one line: its code, its message and its cause (not
/// tonic's dump of the metadata).
fn status_line(status: &tonic::Status) -> String {
    let mut line = format!("{:?}", status.code());
    if !status.message().is_empty() {
        line.push_str(": ");
        line.push_str(status.message());
    }
    let mut source = std::error::Error::source(status);
    while let Some(cause) = source {
        let text = cause.to_string();
        if !line.contains(&text) {
            line.push_str(&format!(" ({text})"));
        }
        source = cause.source();
    }
    line
}

/// Prints the counts once a second on stderr while the load runs.
async fn progress(stats: Arc<Stats>, start: Instant) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The first tick is at once.
    tick.tick().await;
    let mut last = 0;
    loop {
        tick.tick().await;
        let published = stats.published.load(Relaxed);
        eprintln!(
            "cunicu-signal bench: {:>4.0} s: published {published} ({}/s), delivered {}, \
             errors {}, streams ended {}",
            start.elapsed().as_secs_f64(),
            published - last,
            stats.received.load(Relaxed),
            stats.publish_errors.load(Relaxed),
            stats.streams_ended.load(Relaxed),
        );
        last = published;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_ticks_are_fields_14_and_15_after_the_name() {
        // A name with a space and a parenthesis, as a thread may set it.
        let stat = "4242 (tokio (rt) 1) S 1 4242 4242 0 -1 4194560 1234 0 0 0 \
                    357 91 0 0 20 0 3 0 12345 98765432 2500 18446744073709551615";
        assert_eq!(cpu_ticks(stat), Some((357, 91)));
        assert_eq!(cpu_ticks("4242 (x) S 1 2"), None);
        assert_eq!(cpu_ticks("no name at all"), None);
    }

    #[test]
    fn rss_is_read_in_kib() {
        let status = "Name:\tcunicu\nVmPeak:\t  99 kB\nVmRSS:\t   25004 kB\nThreads:\t3\n";
        assert_eq!(rss_kib(status), Some(25004));
        assert_eq!(rss_kib("Name:\tx\n"), None);
        assert_eq!(rss_kib("VmRSS:\t12 MB\n"), None);
    }

    #[test]
    fn our_own_process_can_be_sampled() {
        let probe = ServerProbe::new(std::process::id()).expect("probe of our process");
        let before = probe.sample().expect("first sample");
        // Burn some CPU so that user time moves by at least a tick or two.
        let start = Instant::now();
        let mut x = 1u64;
        while start.elapsed() < Duration::from_millis(200) {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
        }
        std::hint::black_box(x);
        let after = probe.sample().expect("second sample");
        assert!(before.rss_kib > 0, "{before:?}");
        assert!(after.user > before.user, "{before:?} then {after:?}");
    }

    #[test]
    fn a_missing_process_is_named() {
        // PIDs are below 2^22 on Linux.
        let error = ServerProbe::new(u32::MAX).err().expect("no such process");
        assert!(
            format!("{error:#}").contains("/proc/4294967295/stat"),
            "{error:#}"
        );
    }

    #[test]
    fn local_addresses_go_round_robin_from_127_0_0_1() {
        assert_eq!(local_address(5, 0), None);
        let ip = |s: &str| Some(s.parse::<IpAddr>().expect("address"));
        assert_eq!(local_address(0, 300), ip("127.0.0.1"));
        assert_eq!(local_address(299, 300), ip("127.0.1.44"));
        assert_eq!(local_address(300, 300), ip("127.0.0.1"));
    }

    #[test]
    fn cpu_per_delivery_splits_user_and_system() {
        let before = ServerSample {
            user: Duration::from_millis(100),
            system: Duration::from_millis(50),
            rss_kib: 1000,
        };
        let after = ServerSample {
            user: Duration::from_millis(700),
            system: Duration::from_millis(350),
            rss_kib: 1200,
        };
        let (json, text) = server_report(before, after, 100_000);
        assert_eq!(json["server_cpu_user_us_per_delivery"], 6.0);
        assert_eq!(json["server_cpu_system_us_per_delivery"], 3.0);
        assert_eq!(json["server_cpu_us_per_delivery"], 9.0);
        assert_eq!(json["server_rss_after_kib"], 1200);
        assert!(text.contains("9.00 µs per delivery"), "{text}");
        let (json, _) = server_report(before, after, 0);
        assert!(json["server_cpu_us_per_delivery"].is_null());
    }
}
