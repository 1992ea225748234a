//! `cunicu-signal bench`: a load generator for any server that speaks the
//! `cunicu.signaling.Signaling` protocol (ours or cunīcu's).
//!
//! It opens N subscription streams over K keys (spread over several HTTP/2
//! connections) and runs P publishers, as fast as they can or at a set total
//! rate. Envelopes have random bodies of a realistic size; the nonce carries
//! a sequence number and the send time, so that subscribers measure the
//! end-to-end latency without opening anything (the server never does either).

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering::Relaxed},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use clap::Args;
use cunicu_signal::{
    Key,
    backend::grpc::{GrpcOptions, channel_for},
    proto::signaling::{
        EncryptedMessage, Envelope, SubscribeParams, signaling_client::SignalingClient,
    },
};
use hdrhistogram::Histogram;
use tonic::transport::Channel;

/// Options of the load generator.
#[derive(Args, Debug)]
pub struct BenchArgs {
    /// The server: grpc://HOST:PORT[?insecure=true|skip_verify=true|ca=FILE].
    #[arg(long)]
    backend: String,
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
    /// Print the report as one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

struct Stats {
    published: AtomicU64,
    publish_errors: AtomicU64,
    received: AtomicU64,
    latency: Mutex<Histogram<u64>>,
}

/// A new HTTP/2 connection to the server, secured as the URL says.
async fn connection(url: &url::Url) -> Result<Channel> {
    let channel = channel_for(url, &GrpcOptions::default())?;
    // Connect now, so that set-up errors show before the load starts.
    let mut client = SignalingClient::new(channel.clone());
    client
        .get_build_info(cunicu_signal::proto::Empty {})
        .await
        .map_err(|s| anyhow::anyhow!("{url}: {:?}: {}", s.code(), s.message()))?;
    Ok(channel)
}

fn topic(i: usize) -> Vec<u8> {
    let mut key = [0u8; 32];
    key[..8].copy_from_slice(&(i as u64).to_be_bytes());
    key[8..].copy_from_slice(&[0xbe; 24]);
    key.to_vec()
}

pub async fn run(args: BenchArgs) -> Result<()> {
    if args.subscribers == 0 || args.keys == 0 || args.streams_per_connection == 0 {
        bail!("--subscribers, --keys and --streams-per-connection must be at least 1");
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
    let start = Instant::now();
    let stats = Arc::new(Stats {
        published: AtomicU64::new(0),
        publish_errors: AtomicU64::new(0),
        received: AtomicU64::new(0),
        latency: Mutex::new(Histogram::new_with_bounds(1, 60_000_000, 3)?),
    });

    // Subscriptions, each waiting for its sync envelope before the load starts.
    let connections = args.subscribers.div_ceil(args.streams_per_connection);
    let mut channels = Vec::with_capacity(connections);
    for _ in 0..connections {
        channels.push(connection(&url).await?);
    }
    let stop = Arc::new(AtomicBool::new(false));
    let (done_tx, done_rx) = tokio::sync::watch::channel(false);
    let mut subscribers = tokio::task::JoinSet::new();
    let (ready_tx, mut ready_rx) =
        tokio::sync::mpsc::channel::<Result<(), tonic::Status>>(args.subscribers);
    for i in 0..args.subscribers {
        let mut client = SignalingClient::new(channels[i / args.streams_per_connection].clone());
        let (stats, ready, mut done) = (stats.clone(), ready_tx.clone(), done_rx.clone());
        let key = topic(i % args.keys);
        subscribers.spawn(async move {
            let mut stream = match client.subscribe(SubscribeParams { key }).await {
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
            let mut local = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).ok();
            let mut pending = 0u32;
            loop {
                let envelope = tokio::select! {
                    message = stream.message() => match message {
                        Ok(Some(envelope)) => envelope,
                        _ => break,
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
                if let Some(h) = local.as_mut() {
                    let _ = h.record(micros.max(1));
                }
                pending += 1;
                // Merge into the shared histogram now and then, not per envelope.
                if pending == 256 {
                    pending = 0;
                    if let (Some(h), Ok(mut all)) = (local.as_mut(), stats.latency.lock()) {
                        let _ = all.add(&*h);
                        h.reset();
                    }
                }
            }
            if let (Some(h), Ok(mut all)) = (local.as_ref(), stats.latency.lock()) {
                let _ = all.add(h);
            }
        });
    }
    drop(ready_tx);
    for _ in 0..args.subscribers {
        match ready_rx.recv().await {
            Some(Ok(())) => {}
            Some(Err(status)) => bail!(
                "subscribe failed: {:?}: {}",
                status.code(),
                status.message()
            ),
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
        let report = serde_json::json!({
            "mode": "idle",
            "subscriptions": args.subscribers,
            "keys": args.keys,
            "connections": connections,
            "setup_seconds": setup.as_secs_f64(),
            "held_seconds": args.duration.as_secs_f64(),
        });
        if args.json {
            println!("{report}");
        } else {
            println!(
                "held {} idle subscriptions for {:?}",
                args.subscribers, args.duration
            );
        }
        let _ = done_tx.send(true);
        while subscribers.join_next().await.is_some() {}
        return Ok(());
    }

    // Publishers. With --rate, each publisher sends its share at fixed intervals.
    let publish_channel = connection(&url).await?;
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
        publishers.spawn(async move {
            let mut ticker = per_publisher_interval.map(|i| {
                let mut t = tokio::time::interval(i);
                t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                t
            });
            let mut seq = 0u64;
            let sender = Key::from([p as u8; 32]).as_bytes().to_vec();
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
                    recipient: topic(k),
                    contents: Some(EncryptedMessage {
                        body: body.clone(),
                        nonce,
                    }),
                };
                match client.publish(envelope).await {
                    Ok(_) => {
                        stats.published.fetch_add(1, Relaxed);
                        expected.fetch_add(subs_per_key[k], Relaxed);
                    }
                    Err(_) => {
                        stats.publish_errors.fetch_add(1, Relaxed);
                    }
                }
                seq += 1;
            }
        });
    }
    tokio::time::sleep(args.duration).await;
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
    let _ = done_tx.send(true);
    while subscribers.join_next().await.is_some() {}
    let received = stats.received.load(Relaxed);
    let latency = stats
        .latency
        .lock()
        .map(|h| h.clone())
        .unwrap_or_else(|e| e.into_inner().clone());
    let secs = load_time.as_secs_f64();
    let report = serde_json::json!({
        "mode": if args.rate > 0 { "rate" } else { "max" },
        "subscriptions": args.subscribers,
        "keys": args.keys,
        "publishers": args.publishers,
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
    });
    if args.json {
        println!("{report}");
    } else {
        println!(
            "{} subscriptions on {} keys, {} publishers, {:.1} s\n\
             published   {published} ({:.0}/s), errors {}\n\
             delivered   {received} of {expected} ({:.0}/s), lost {}\n\
             latency     p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
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
        );
    }
    Ok(())
}
