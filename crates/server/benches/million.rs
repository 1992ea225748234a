//! The load generator of `scripts/bench-million`: many idle subscriptions held
//! on one server, then a steady rate of publishes while they are held.
//!
//! It speaks gRPC over HTTP/2 with `h2` directly, not through a gRPC client
//! library: a subscription here costs a few hundred bytes of the generator's
//! memory, so that a million of them fit beside the server on one machine.
//!
//! ```text
//! cargo bench -p cunicu-signal-server --bench million -- \
//!     --server 127.0.0.1:PORT --connections 2000 --streams 500 \
//!     --rate 1000 --duration 30s --server-pid PID
//! ```
//!
//! Subscription *i* (on connection *i / streams*) is to key *i*; each key has
//! one subscriber. It prints one JSON object: the time to subscribe them all,
//! the time from each Subscribe to its confirmation (percentiles), the server's
//! RSS sampled while they were set up (against subscriptions confirmed), while
//! held, and after the publishes, and the publish→delivery latency (percentiles
//! and a CDF), with what was published, delivered and lost.
//!
//! Beside replicas of a cluster (`scripts/bench-million-cluster`): `--publish-server`
//! publishes through another replica than the one subscribed to, `--key-offset` gives each
//! generator keys of its own, `--hold-after` keeps the subscriptions that long after the
//! publishes (while NATS is taken away and brought back).

use std::{
    net::{Ipv4Addr, SocketAddr},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use bytes::{Buf, Bytes, BytesMut};
use cunicu_signal::proto::{
    method::{PUBLISH, SUBSCRIBE},
    signaling::{EncryptedMessage, Envelope, SubscribeParams},
};
use futures::{StreamExt, stream::FuturesUnordered};
use h2::{RecvStream, client::SendRequest};
use hdrhistogram::Histogram;
use parking_lot::Mutex;
use prost::Message;
use tokio::{net::TcpSocket, sync::Semaphore};

/// Connections per local address: well below one address's ephemeral ports.
const CONNECTIONS_PER_ADDRESS: usize = 10_000;

struct Args {
    server: SocketAddr,
    connections: usize,
    streams: usize,
    rate: u64,
    duration: Duration,
    publishers: usize,
    concurrency: usize,
    server_pid: Option<u32>,
    body_size: usize,
    /// Where to publish, if not to `server` (another replica of a cluster).
    publish_server: Option<SocketAddr>,
    /// Subscription *i* is to key *key_offset + i*: generators beside each other use
    /// keys of their own.
    key_offset: u64,
    /// How long to hold the subscriptions after the publishes, before closing them.
    hold_after: Duration,
}

fn parse_args() -> Result<Args> {
    let mut args = Args {
        server: "127.0.0.1:8080".parse()?,
        connections: 2000,
        streams: 500,
        rate: 1000,
        duration: Duration::from_secs(30),
        publishers: 4,
        concurrency: 64,
        server_pid: None,
        body_size: 120,
        publish_server: None,
        key_offset: 0,
        hold_after: Duration::ZERO,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        // `cargo bench` passes --bench to every bench target.
        if flag == "--bench" {
            continue;
        }
        let value = it.next().with_context(|| format!("{flag} needs a value"))?;
        let bad = || format!("{flag} {value}");
        match flag.as_str() {
            "--server" => args.server = value.parse().with_context(bad)?,
            "--connections" => args.connections = value.parse().with_context(bad)?,
            "--streams" => args.streams = value.parse().with_context(bad)?,
            "--rate" => args.rate = value.parse().with_context(bad)?,
            "--duration" => args.duration = humantime::parse_duration(&value).with_context(bad)?,
            "--publishers" => args.publishers = value.parse().with_context(bad)?,
            "--concurrency" => args.concurrency = value.parse().with_context(bad)?,
            "--server-pid" => args.server_pid = Some(value.parse().with_context(bad)?),
            "--body-size" => args.body_size = value.parse().with_context(bad)?,
            "--publish-server" => args.publish_server = Some(value.parse().with_context(bad)?),
            "--key-offset" => args.key_offset = value.parse().with_context(bad)?,
            "--hold-after" => {
                args.hold_after = humantime::parse_duration(&value).with_context(bad)?
            }
            _ => bail!("unknown flag {flag}"),
        }
    }
    if args.connections == 0 || args.streams == 0 || args.publishers == 0 || args.concurrency == 0 {
        bail!("--connections, --streams, --publishers and --concurrency must be at least 1");
    }
    if !args.server.ip().is_loopback() || args.publish_server.is_some_and(|p| !p.ip().is_loopback())
    {
        bail!("--server and --publish-server must be on loopback");
    }
    Ok(args)
}

/// Key *i*: its number, then a fixed filler.
fn key(i: u64) -> Vec<u8> {
    let mut key = vec![0xbe; 32];
    key[..8].copy_from_slice(&i.to_be_bytes());
    key
}

/// A gRPC message: no compression, a 32-bit length, the bytes.
fn grpc_message(message: &impl Message) -> Bytes {
    let len = message.encoded_len();
    let mut out = BytesMut::with_capacity(5 + len);
    out.extend_from_slice(&[0]);
    out.extend_from_slice(&(len as u32).to_be_bytes());
    message.encode_raw(&mut out);
    out.freeze()
}

fn request(server: SocketAddr, path: &str) -> Result<http::Request<()>> {
    Ok(http::Request::post(format!("http://{server}{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())?)
}

fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

struct Stats {
    start: Instant,
    ready: AtomicU64,
    failed: AtomicU64,
    ended: AtomicU64,
    delivered: AtomicU64,
    ready_micros: Mutex<Histogram<u64>>,
    latency_micros: Mutex<Histogram<u64>>,
    first_error: Mutex<Option<String>>,
}

impl Stats {
    fn fail(&self, counter: &AtomicU64, why: String) {
        counter.fetch_add(1, Relaxed);
        self.first_error.lock().get_or_insert(why);
    }
}

async fn connect(server: SocketAddr, index: usize) -> Result<SendRequest<Bytes>> {
    let socket = TcpSocket::new_v4()?;
    // 127.0.0.1, 127.0.0.2, ...: one address per CONNECTIONS_PER_ADDRESS.
    let local =
        Ipv4Addr::from(u32::from(Ipv4Addr::LOCALHOST) + (index / CONNECTIONS_PER_ADDRESS) as u32);
    socket.bind(SocketAddr::from((local, 0)))?;
    let tcp = socket.connect(server).await?;
    tcp.set_nodelay(true)?;
    // Hundreds of small DATA frames (confirmations) may arrive at once, before
    // the subscriptions take them: not an attack here.
    let (send, connection) = h2::client::Builder::new()
        .data_frame_budget(64 << 20)
        .handshake(tcp)
        .await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(send)
}

/// The messages whole in `buf` (a message may span chunks): their bytes.
fn messages(buf: &mut BytesMut) -> Vec<Bytes> {
    let mut out = Vec::new();
    while buf.len() >= 5 {
        let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
        if buf.len() < 5 + len {
            break;
        }
        buf.advance(5);
        out.push(buf.split_to(len).freeze());
    }
    out
}

/// One subscription: confirmed (its first, empty envelope), then every
/// envelope's latency from the send time in its nonce, until `done`.
async fn subscription(
    mut send: SendRequest<Bytes>,
    args: Arc<Args>,
    index: u64,
    stats: Arc<Stats>,
    done: Arc<AtomicBool>,
    settled: Arc<AtomicUsize>,
) {
    let sent = Instant::now();
    let response = async {
        send = send.ready().await?;
        let (response, mut body) = send.send_request(request(args.server, SUBSCRIBE)?, false)?;
        body.send_data(
            grpc_message(&SubscribeParams {
                key: key(args.key_offset + index),
            }),
            true,
        )?;
        let response = response.await?;
        if let Some(status) = response.headers().get("grpc-status") {
            bail!("subscribe answered grpc-status {status:?}");
        }
        Ok::<RecvStream, anyhow::Error>(response.into_body())
    };
    let mut body = match response.await {
        Ok(body) => body,
        Err(e) => {
            settled.fetch_add(1, Relaxed);
            return stats.fail(&stats.failed, format!("subscribe {index}: {e:#}"));
        }
    };
    let mut confirmed = false;
    let mut buf = BytesMut::new();
    let mut why = format!("subscription {index} ended by the server");
    while let Some(chunk) = body.data().await {
        let chunk = match chunk {
            Ok(chunk) => chunk,
            Err(e) => {
                why = format!("subscription {index} failed: {e}");
                break;
            }
        };
        let _ = body.flow_control().release_capacity(chunk.len());
        buf.extend_from_slice(&chunk);
        for message in messages(&mut buf) {
            if !confirmed {
                confirmed = true;
                let _ = stats
                    .ready_micros
                    .lock()
                    .record(sent.elapsed().as_micros().max(1) as u64);
                stats.ready.fetch_add(1, Relaxed);
                settled.fetch_add(1, Relaxed);
                continue;
            }
            let Some(sent_nanos) = Envelope::decode(message)
                .ok()
                .and_then(|e| e.contents)
                .and_then(|c| c.nonce.get(8..16).and_then(|b| <[u8; 8]>::try_from(b).ok()))
            else {
                continue;
            };
            let sent = Duration::from_nanos(u64::from_be_bytes(sent_nanos));
            let micros = stats.start.elapsed().saturating_sub(sent).as_micros() as u64;
            let _ = stats.latency_micros.lock().record(micros.max(1));
            stats.delivered.fetch_add(1, Relaxed);
        }
        if buf.is_empty() {
            // Hold no buffer between envelopes.
            buf = BytesMut::new();
        }
    }
    if !confirmed {
        settled.fetch_add(1, Relaxed);
    }
    if !done.load(Relaxed) {
        stats.fail(&stats.ended, why);
    }
}

/// One connection and its subscriptions, opened once a setup slot is free.
async fn subscriber_connection(
    c: usize,
    args: Arc<Args>,
    stats: Arc<Stats>,
    slots: Arc<Semaphore>,
    done: Arc<AtomicBool>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let permit = slots.acquire().await;
    let send = match connect(args.server, c).await {
        Ok(send) => send,
        Err(e) => {
            stats.fail(&stats.failed, format!("connection {c}: {e:#}"));
            stats.failed.fetch_add(args.streams as u64 - 1, Relaxed);
            return;
        }
    };
    let settled = Arc::new(AtomicUsize::new(0));
    let mut subscriptions: FuturesUnordered<_> = (0..args.streams)
        .map(|s| {
            let index = (c * args.streams + s) as u64;
            let (stats, done) = (stats.clone(), done.clone());
            subscription(
                send.clone(),
                args.clone(),
                index,
                stats,
                done,
                settled.clone(),
            )
        })
        .collect();
    drop(send);
    // The slot is given back once this connection's subscriptions are all
    // confirmed (or failed): --concurrency peers arrive at once.
    let mut permit = Some(permit);
    let mut check = tokio::time::interval(Duration::from_millis(10));
    loop {
        tokio::select! {
            next = subscriptions.next() => if next.is_none() { break },
            _ = stop.wait_for(|stop| *stop) => break,
            _ = check.tick(), if permit.is_some() => {
                if settled.load(Relaxed) >= args.streams {
                    permit = None;
                }
            }
        }
    }
}

/// Publishes at `rate` a second over `args.publishers` connections, to keys
/// spread over all subscriptions, until `stop`.
async fn publish(
    args: Arc<Args>,
    stats: Arc<Stats>,
    published: Arc<AtomicU64>,
    publish_errors: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
) -> Result<()> {
    let mut senders = Vec::new();
    let server = args.publish_server.unwrap_or(args.server);
    for p in 0..args.publishers {
        senders.push(connect(server, p).await?);
    }
    let subscriptions = (args.connections * args.streams) as u64;
    let body: Vec<u8> = (0..args.body_size)
        .map(|i| (i as u8).wrapping_mul(151))
        .collect();
    let mut ticker = tokio::time::interval(Duration::from_secs_f64(1.0 / args.rate as f64));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut answers = FuturesUnordered::new();
    let mut seq = 0u64;
    // A fixed walk over the keys (a prime step), so runs are comparable.
    let mut k = 0u64;
    while !stop.load(Relaxed) {
        tokio::select! {
            _ = ticker.tick() => {}
            Some(answer) = answers.next() => {
                match answer {
                    Ok(()) => published.fetch_add(1, Relaxed),
                    Err(e) => {
                        stats.first_error.lock().get_or_insert(format!("publish: {e:#}"));
                        publish_errors.fetch_add(1, Relaxed)
                    }
                };
                continue;
            }
        }
        k = (k + 7_919) % subscriptions;
        let mut nonce = Vec::with_capacity(24);
        nonce.extend_from_slice(&seq.to_be_bytes());
        nonce.extend_from_slice(&(stats.start.elapsed().as_nanos() as u64).to_be_bytes());
        nonce.extend_from_slice(&[0; 8]);
        let envelope = Envelope {
            sender: vec![7; 32],
            recipient: key(args.key_offset + k),
            contents: Some(EncryptedMessage {
                body: body.clone(),
                nonce,
            }),
        };
        let send = senders[seq as usize % senders.len()].clone();
        seq += 1;
        answers.push(async move {
            let mut send = send.ready().await?;
            let (response, mut body) = send.send_request(request(server, PUBLISH)?, false)?;
            body.send_data(grpc_message(&envelope), true)?;
            let response = response.await?;
            let (parts, mut body) = response.into_parts();
            let mut status = parts.headers.get("grpc-status").cloned();
            while let Some(chunk) = body.data().await {
                let chunk = chunk?;
                let _ = body.flow_control().release_capacity(chunk.len());
            }
            if status.is_none() {
                status = body
                    .trailers()
                    .await?
                    .and_then(|t| t.get("grpc-status").cloned());
            }
            match status {
                Some(s) if s == "0" => Ok(()),
                other => bail!("publish answered grpc-status {other:?}"),
            }
        });
    }
    while let Some(answer) = answers.next().await {
        match answer {
            Ok(()) => published.fetch_add(1, Relaxed),
            Err(_) => publish_errors.fetch_add(1, Relaxed),
        };
    }
    Ok(())
}

fn percentiles(h: &Histogram<u64>) -> serde_json::Value {
    let ms = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    serde_json::json!({
        "count": h.len(),
        "p50_ms": ms(0.5),
        "p90_ms": ms(0.9),
        "p99_ms": ms(0.99),
        "p999_ms": ms(0.999),
        "max_ms": h.max() as f64 / 1000.0,
    })
}

/// (latency ms, fraction at or below it) at the histogram's own steps.
fn cdf(h: &Histogram<u64>) -> Vec<(f64, f64)> {
    h.iter_quantiles(4)
        .map(|v| {
            (
                v.value_iterated_to() as f64 / 1000.0,
                v.quantile_iterated_to(),
            )
        })
        .collect()
}

#[tokio::main]
async fn main() -> Result<()> {
    // `cargo test --all-targets` runs bench targets too, without `--bench`:
    // there is no server to load then.
    if !std::env::args().any(|arg| arg == "--bench") {
        eprintln!("million: a load generator for scripts/bench-million; nothing to test");
        return Ok(());
    }
    let args = Arc::new(parse_args()?);
    let subscriptions = (args.connections * args.streams) as u64;
    let stats = Arc::new(Stats {
        start: Instant::now(),
        ready: AtomicU64::new(0),
        failed: AtomicU64::new(0),
        ended: AtomicU64::new(0),
        delivered: AtomicU64::new(0),
        ready_micros: Mutex::new(Histogram::new_with_bounds(1, 600_000_000, 3)?),
        latency_micros: Mutex::new(Histogram::new_with_bounds(1, 600_000_000, 3)?),
        first_error: Mutex::new(None),
    });
    let rss = || args.server_pid.and_then(rss_kib);
    let rss_before = rss();
    let done = Arc::new(AtomicBool::new(false));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let slots = Arc::new(Semaphore::new(args.concurrency));
    let mut connections = tokio::task::JoinSet::new();
    for c in 0..args.connections {
        connections.spawn(subscriber_connection(
            c,
            args.clone(),
            stats.clone(),
            slots.clone(),
            done.clone(),
            stop_rx.clone(),
        ));
    }

    // Set-up: sample the server's RSS against subscriptions confirmed.
    let mut samples = Vec::new();
    let setup = loop {
        let ready = stats.ready.load(Relaxed);
        let failed = stats.failed.load(Relaxed) + stats.ended.load(Relaxed);
        samples.push(serde_json::json!({
            "seconds": stats.start.elapsed().as_secs_f64(),
            "subscriptions": ready,
            "rss_kib": rss(),
        }));
        if ready + failed >= subscriptions {
            break stats.start.elapsed();
        }
        if failed > 0 {
            eprintln!(
                "million: {failed} subscriptions failed; the first: {}",
                stats.first_error.lock().clone().unwrap_or_default()
            );
            break stats.start.elapsed();
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    eprintln!(
        "million: {} of {subscriptions} subscriptions confirmed in {setup:.2?}",
        stats.ready.load(Relaxed)
    );
    // Held idle a moment, so that what set-up took and released is settled.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let rss_held = rss();

    let (published, publish_errors) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let stop_publishing = Arc::new(AtomicBool::new(false));
    let publisher = tokio::spawn(publish(
        args.clone(),
        stats.clone(),
        published.clone(),
        publish_errors.clone(),
        stop_publishing.clone(),
    ));
    tokio::time::sleep(args.duration).await;
    stop_publishing.store(true, Relaxed);
    let publisher = publisher.await.context("publisher")?;
    // Deliveries still on their way.
    let published_count = published.load(Relaxed);
    let grace = Instant::now();
    while stats.delivered.load(Relaxed) < published_count
        && grace.elapsed() < Duration::from_secs(5)
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let rss_after = rss();
    if !args.hold_after.is_zero() {
        eprintln!(
            "million: publishes done; holding the subscriptions for {:?}",
            args.hold_after
        );
        tokio::time::sleep(args.hold_after).await;
    }

    done.store(true, Relaxed);
    let _ = stop_tx.send(true);
    while connections.join_next().await.is_some() {}

    let latency = stats.latency_micros.lock().clone();
    let ready = stats.ready_micros.lock().clone();
    let delivered = stats.delivered.load(Relaxed);
    let report = serde_json::json!({
        "connections": args.connections,
        "subscriptions": subscriptions,
        "confirmed": stats.ready.load(Relaxed),
        "failed": stats.failed.load(Relaxed),
        "ended_early": stats.ended.load(Relaxed),
        "first_error": stats.first_error.lock().clone(),
        "setup_seconds": setup.as_secs_f64(),
        "subscribe_ready": percentiles(&ready),
        "subscribe_cdf": cdf(&ready),
        "server_rss_before_kib": rss_before,
        "server_rss_held_kib": rss_held,
        "server_rss_after_load_kib": rss_after,
        "rate": args.rate,
        "load_seconds": args.duration.as_secs_f64(),
        "published": published_count,
        "publish_errors": publish_errors.load(Relaxed),
        "publisher_error": publisher.err().map(|e| format!("{e:#}")),
        "delivered": delivered,
        "lost": published_count.saturating_sub(delivered),
        "latency": percentiles(&latency),
        "latency_cdf": cdf(&latency),
        "rss_samples": samples,
    });
    println!("{report}");
    Ok(())
}
