//! The load generator of `scripts/bench-restart`: clients of a cluster held
//! through a rolling restart of one replica.
//!
//! Every client is the library's `grpc://` medium (one HTTP/2 connection, one
//! Subscribe stream per key) behind a load balancer that this program plays
//! itself: one TCP listener per replica, which forwards a new connection to
//! that replica while its `/readyz` says 200, and otherwise to the other
//! replicas that are ready, in turn. So when a replica drains, its clients'
//! streams end, the library opens them again, and their new connections land on
//! the survivors, as a load balancer would send them.
//!
//! ```text
//! cargo bench -p cunicu-signal-server --bench restart -- \
//!     --replica 127.0.0.1:P1,127.0.0.1:M1 --replica ... --replica ... \
//!     --restarted 0 --clients 3000 --keys 10 --rate 2000 --duration 40s
//! ```
//!
//! It prints one line `{"ready": EPOCH_SECONDS}` once every subscription is
//! confirmed (the restart may begin), publishes to the keys of the restarted
//! replica's clients through the other replicas for `--duration`, and then
//! prints one JSON object: every connection the balancer made (when, to which
//! replica), when streams were lost and back, how long each key was without
//! its stream, and each envelope sent against what arrived.

use std::{
    collections::{HashMap, HashSet},
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed},
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context, Result, bail};
use cunicu_signal::{
    Delivery, Key, PrivateKey, Registry, Sender, StreamEvent, Transport,
    backend::grpc::{Grpc, GrpcOptions},
    envelope::SharedKey,
    proto::{epdisc::Credentials, signaling::Message},
};
use futures::{StreamExt, stream};
use hdrhistogram::Histogram;
use parking_lot::Mutex;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::Semaphore,
    task::JoinSet,
};
use tokio_util::sync::CancellationToken;

struct Replica {
    grpc: SocketAddr,
    health: SocketAddr,
}

struct Args {
    replicas: Vec<Replica>,
    restarted: usize,
    clients: usize,
    keys: usize,
    rate: u64,
    duration: Duration,
    health_interval: Duration,
    concurrency: usize,
    publishers: usize,
}

fn parse_args() -> Result<Args> {
    let mut args = Args {
        replicas: Vec::new(),
        restarted: 0,
        clients: 3000,
        keys: 10,
        rate: 2000,
        duration: Duration::from_secs(40),
        health_interval: Duration::from_secs(1),
        concurrency: 100,
        publishers: 4,
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
            "--replica" => {
                let (grpc, health) = value.split_once(',').with_context(bad)?;
                args.replicas.push(Replica {
                    grpc: grpc.parse().with_context(bad)?,
                    health: health.parse().with_context(bad)?,
                });
            }
            "--restarted" => args.restarted = value.parse().with_context(bad)?,
            "--clients" => args.clients = value.parse().with_context(bad)?,
            "--keys" => args.keys = value.parse().with_context(bad)?,
            "--rate" => args.rate = value.parse().with_context(bad)?,
            "--duration" => args.duration = humantime::parse_duration(&value).with_context(bad)?,
            "--health-interval" => {
                args.health_interval = humantime::parse_duration(&value).with_context(bad)?
            }
            "--concurrency" => args.concurrency = value.parse().with_context(bad)?,
            "--publishers" => args.publishers = value.parse().with_context(bad)?,
            _ => bail!("unknown flag {flag}"),
        }
    }
    if args.replicas.len() < 2 || args.restarted >= args.replicas.len() {
        bail!("give at least two --replica GRPC,HEALTH and --restarted one of them");
    }
    for r in &args.replicas {
        if !r.grpc.ip().is_loopback() || !r.health.ip().is_loopback() {
            bail!(
                "replicas must be on loopback, not {} / {}",
                r.grpc,
                r.health
            );
        }
    }
    if args.clients == 0 || args.keys == 0 || args.rate == 0 || args.publishers == 0 {
        bail!("--clients, --keys, --rate and --publishers must be at least 1");
    }
    if args.concurrency == 0 || args.health_interval.is_zero() {
        bail!("--concurrency and --health-interval must be above 0");
    }
    Ok(args)
}

/// Milliseconds since the Unix epoch: the script lines these up with when it
/// signalled the replica.
fn now_ms() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64() * 1000.0)
}

/// The load balancer: readiness of each replica, and the connections it made.
struct Balancer {
    replicas: Vec<SocketAddr>,
    ready: Vec<AtomicBool>,
    turn: AtomicUsize,
    /// (when, the replica the client came for, the replica it was sent to).
    connections: Mutex<Vec<(f64, usize, usize)>>,
    /// (when, replica, ready).
    readiness: Mutex<Vec<(f64, usize, bool)>>,
}

impl Balancer {
    /// Where to try a connection that came for `home`: it while ready, then
    /// the other ready replicas in turn, then the rest as a last resort.
    fn order(&self, home: usize) -> Vec<usize> {
        let n = self.replicas.len();
        let mut ready: Vec<usize> = (0..n)
            .filter(|&i| i != home && self.ready[i].load(Relaxed))
            .collect();
        if !ready.is_empty() {
            let turn = self.turn.fetch_add(1, Relaxed) % ready.len();
            ready.rotate_left(turn);
        }
        let mut rest: Vec<usize> = (0..n)
            .filter(|&i| i != home && !ready.contains(&i))
            .collect();
        let mut order = Vec::with_capacity(n);
        if self.ready[home].load(Relaxed) {
            order.push(home);
        } else {
            rest.push(home);
        }
        order.append(&mut ready);
        order.append(&mut rest);
        order
    }
}

/// True if `/readyz` at `addr` answers 200.
async fn is_ready(addr: SocketAddr) -> bool {
    let probe = async {
        let mut tcp = TcpStream::connect(addr).await?;
        tcp.write_all(b"GET /readyz HTTP/1.1\r\nHost: probe\r\nConnection: close\r\n\r\n")
            .await?;
        let mut head = vec![0; 64];
        let n = tcp.read(&mut head).await?;
        std::io::Result::Ok(head[..n].starts_with(b"HTTP/1.1 200"))
    };
    matches!(
        tokio::time::timeout(Duration::from_millis(500), probe).await,
        Ok(Ok(true))
    )
}

async fn health_checks(
    balancer: Arc<Balancer>,
    health: Vec<SocketAddr>,
    interval: Duration,
    cancel: CancellationToken,
) {
    loop {
        for (i, addr) in health.iter().enumerate() {
            let up = is_ready(*addr).await;
            if balancer.ready[i].swap(up, Relaxed) != up {
                balancer.readiness.lock().push((now_ms(), i, up));
            }
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(interval) => {}
        }
    }
}

/// The balancer's listener for the clients of replica `home`.
async fn front(
    balancer: Arc<Balancer>,
    home: usize,
    listener: TcpListener,
    cancel: CancellationToken,
) {
    let mut relays = JoinSet::new();
    loop {
        let accepted = tokio::select! {
            _ = cancel.cancelled() => break,
            accepted = listener.accept() => accepted,
            Some(_) = relays.join_next(), if !relays.is_empty() => continue,
        };
        let Ok((client, _)) = accepted else { continue };
        let balancer = balancer.clone();
        let cancel = cancel.clone();
        relays.spawn(async move {
            for target in balancer.order(home) {
                let addr = balancer.replicas[target];
                let connect =
                    tokio::time::timeout(Duration::from_secs(1), TcpStream::connect(addr));
                let Ok(Ok(server)) = connect.await else {
                    continue;
                };
                balancer.connections.lock().push((now_ms(), home, target));
                let _ = client.set_nodelay(true);
                let _ = server.set_nodelay(true);
                let (mut client, mut server) = (client, server);
                tokio::select! {
                    _ = cancel.cancelled() => {}
                    _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                }
                return;
            }
        });
    }
    relays.shutdown().await;
}

/// What the subscribers saw.
struct Seen {
    /// Per key (client × keys + j): the sequence numbers received.
    received: Vec<Mutex<Vec<u32>>>,
    /// (when, key, back): a stream lost (false) or open again (true).
    events: Mutex<Vec<(f64, u32, bool)>>,
    /// Stream events a client's receiver fell too far behind to see.
    lagged: AtomicU64,
    refused: AtomicU64,
}

struct Client {
    grpc: Arc<Grpc>,
    registry: Arc<Registry>,
}

/// The keys whose first attempt to subscribe failed, and why.
type Failed = Vec<(u32, String)>;

async fn client(
    url: url::Url,
    first: u32,
    keys: &[PrivateKey],
    seen: Arc<Seen>,
    cancel: CancellationToken,
    watchers: &Mutex<JoinSet<()>>,
) -> Result<(Client, Failed)> {
    let registry = Registry::new();
    let grpc = Arc::new(Grpc::with_options(
        &url,
        registry.clone(),
        GrpcOptions::default(),
    )?);
    let index: HashMap<Key, u32> = keys
        .iter()
        .enumerate()
        .map(|(j, k)| (k.public_key(), first + j as u32))
        .collect();
    let mut events = registry.stream_events();
    {
        let seen = seen.clone();
        watchers.lock().spawn(async move {
            loop {
                let event = tokio::select! {
                    _ = cancel.cancelled() => return,
                    event = events.recv() => event,
                };
                let (key, back) = match event {
                    Ok(StreamEvent::Lost { key, .. }) => (key, false),
                    Ok(StreamEvent::Back { key, .. }) => (key, true),
                    Ok(StreamEvent::Refused { key, .. }) => {
                        seen.refused.fetch_add(1, Relaxed);
                        (key, false)
                    }
                    Ok(_) => continue,
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                        seen.lagged.fetch_add(n, Relaxed);
                        continue;
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                };
                if let Some(&i) = index.get(&key) {
                    seen.events.lock().push((now_ms(), i, back));
                }
            }
        });
    }
    let listens = keys.iter().enumerate().map(|(j, key)| {
        let seen = seen.clone();
        let i = (first as usize) + j;
        let handler = move |d: &Delivery| {
            let seq = d
                .message
                .credentials
                .as_ref()
                .and_then(|c| c.ufrag.parse().ok());
            if let Some(seq) = seq {
                seen.received[i].lock().push(seq);
            }
        };
        registry.add(key, Sender::Any, Arc::new(handler));
        let grpc = grpc.clone();
        async move { (i as u32, grpc.listen(key.public_key()).await) }
    });
    // A first attempt that failed goes on being retried by the medium.
    let failed = futures::future::join_all(listens)
        .await
        .into_iter()
        .filter_map(|(i, r)| r.err().map(|e| (i, e.to_string())))
        .collect();
    Ok((Client { grpc, registry }, failed))
}

/// One publish: the key, its sequence number, when it was sent and answered
/// (ms since the epoch), and how many streams it reached (`None` if it failed).
struct Sent {
    key: u32,
    seq: u32,
    start: f64,
    end: f64,
    recipients: Option<u32>,
}

#[allow(clippy::too_many_arguments)]
async fn publisher(
    url: url::Url,
    targets: Vec<(u32, Key)>,
    rate: f64,
    sent: Arc<Mutex<Vec<Sent>>>,
    stop: Arc<AtomicBool>,
    first_error: Arc<Mutex<Option<String>>>,
) -> Result<()> {
    if targets.is_empty() {
        return Ok(());
    }
    let grpc = Arc::new(Grpc::with_options(
        &url,
        Registry::new(),
        GrpcOptions::default(),
    )?);
    let ours = PrivateKey::generate();
    let sender = ours.public_key();
    let shared: Vec<Arc<SharedKey>> = targets
        .iter()
        .map(|(_, k)| SharedKey::new(&ours, k).map(Arc::new))
        .collect::<Result<_, _>>()?;
    let mut seqs = vec![0u32; targets.len()];
    let slots = Arc::new(Semaphore::new(512));
    let mut tasks = JoinSet::new();
    let start = tokio::time::Instant::now();
    let mut n: u64 = 0;
    while !stop.load(Relaxed) {
        tokio::time::sleep_until(start + Duration::from_secs_f64(n as f64 / rate)).await;
        let t = (n % targets.len() as u64) as usize;
        n += 1;
        seqs[t] += 1;
        let (key, recipient) = targets[t];
        let seq = seqs[t];
        let message = Message {
            credentials: Some(Credentials {
                ufrag: seq.to_string(),
                pwd: "restart-bench".into(),
                need_creds: false,
            }),
            ..Default::default()
        };
        let envelope = shared[t].seal(sender, recipient, &message);
        let permit = slots.clone().acquire_owned().await?;
        let (grpc, sent, first_error) = (grpc.clone(), sent.clone(), first_error.clone());
        tasks.spawn(async move {
            let begun = now_ms();
            let result = grpc.send(&envelope).await;
            let recipients = match result {
                Ok(published) => Some(published.recipients.unwrap_or(0)),
                Err(e) => {
                    first_error.lock().get_or_insert(e.to_string());
                    None
                }
            };
            sent.lock().push(Sent {
                key,
                seq,
                start: begun,
                end: now_ms(),
                recipients,
            });
            drop(permit);
        });
        while tasks.try_join_next().is_some() {}
    }
    while tasks.join_next().await.is_some() {}
    grpc.close().await?;
    Ok(())
}

fn percentiles(h: &Histogram<u64>) -> serde_json::Value {
    let ms = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    serde_json::json!({
        "count": h.len(),
        "p50_ms": ms(0.5),
        "p90_ms": ms(0.9),
        "p99_ms": ms(0.99),
        "max_ms": h.max() as f64 / 1000.0,
    })
}

#[tokio::main]
async fn main() -> Result<()> {
    // `cargo test --all-targets` runs bench targets too, without `--bench`:
    // there is no cluster to restart then.
    if !std::env::args().any(|arg| arg == "--bench") {
        eprintln!("restart: a load generator for scripts/bench-restart; nothing to test");
        return Ok(());
    }
    let args = parse_args()?;
    let cancel = CancellationToken::new();
    let n = args.replicas.len();

    let balancer = Arc::new(Balancer {
        replicas: args.replicas.iter().map(|r| r.grpc).collect(),
        ready: (0..n).map(|_| AtomicBool::new(true)).collect(),
        turn: AtomicUsize::new(0),
        connections: Mutex::new(Vec::new()),
        readiness: Mutex::new(Vec::new()),
    });
    let mut background = JoinSet::new();
    background.spawn(health_checks(
        balancer.clone(),
        args.replicas.iter().map(|r| r.health).collect(),
        args.health_interval,
        cancel.clone(),
    ));
    let mut fronts = Vec::new();
    for home in 0..n {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        fronts.push(listener.local_addr()?);
        background.spawn(front(balancer.clone(), home, listener, cancel.clone()));
    }

    // Client c comes for replica c % n; its keys are c × keys .. (c + 1) × keys.
    let total = args.clients * args.keys;
    let seen = Arc::new(Seen {
        received: (0..total).map(|_| Mutex::new(Vec::new())).collect(),
        events: Mutex::new(Vec::new()),
        lagged: AtomicU64::new(0),
        refused: AtomicU64::new(0),
    });
    let keys: Vec<PrivateKey> = (0..total).map(|_| PrivateKey::generate()).collect();
    let watchers = Mutex::new(JoinSet::new());
    let setup_start = std::time::Instant::now();
    let results: Vec<Result<(Client, Failed)>> = stream::iter(0..args.clients)
        .map(|c| {
            let url = url::Url::parse(&format!("grpc://{}?insecure=true", fronts[c % n]));
            let (seen, cancel, watchers) = (seen.clone(), cancel.clone(), &watchers);
            let first = c * args.keys;
            let keys = &keys[first..first + args.keys];
            async move { client(url?, first as u32, keys, seen, cancel, watchers).await }
        })
        .buffer_unordered(args.concurrency)
        .collect()
        .await;
    let mut clients = Vec::new();
    let mut failed = Vec::new();
    for result in results {
        let (client, mut f) = result?;
        failed.append(&mut f);
        clients.push(client);
    }
    eprintln!(
        "restart: {} of {total} subscriptions confirmed at the first attempt in {:.2?}",
        total - failed.len(),
        setup_start.elapsed()
    );
    if let Some((_, why)) = failed.first() {
        eprintln!("restart: the first failure: {why}; waiting for the retries");
    }
    // The medium retries a failed first attempt and reports it back.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let back: HashSet<u32> = seen
            .events
            .lock()
            .iter()
            .filter(|e| e.2)
            .map(|e| e.1)
            .collect();
        if failed.iter().all(|(i, _)| back.contains(i)) {
            break;
        }
        if std::time::Instant::now() > deadline {
            bail!("subscriptions still not confirmed after a minute");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let setup = setup_start.elapsed();
    let retried = failed.len();
    // What happened during set-up is not part of the restart.
    seen.events.lock().clear();
    let ready_at = now_ms();
    println!("{}", serde_json::json!({ "ready": ready_at / 1000.0 }));

    // Publish to the keys of the restarted replica's clients, through the others.
    let moved: Vec<u32> = (0..args.clients)
        .filter(|c| c % n == args.restarted)
        .flat_map(|c| (c * args.keys..(c + 1) * args.keys).map(|i| i as u32))
        .collect();
    let others: Vec<usize> = (0..n).filter(|&i| i != args.restarted).collect();
    let sent = Arc::new(Mutex::new(Vec::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let first_error = Arc::new(Mutex::new(None));
    let mut publishers = JoinSet::new();
    for p in 0..args.publishers {
        let targets: Vec<(u32, Key)> = moved
            .iter()
            .filter(|&&i| i as usize % args.publishers == p)
            .map(|&i| (i, keys[i as usize].public_key()))
            .collect();
        let via = args.replicas[others[p % others.len()]].grpc;
        publishers.spawn(publisher(
            url::Url::parse(&format!("grpc://{via}?insecure=true"))?,
            targets,
            args.rate as f64 / args.publishers as f64,
            sent.clone(),
            stop.clone(),
            first_error.clone(),
        ));
    }
    tokio::time::sleep(args.duration).await;
    stop.store(true, Relaxed);
    while let Some(result) = publishers.join_next().await {
        result.context("publisher")??;
    }
    // Deliveries still on their way.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let end_at = now_ms();

    // Take everything down before counting.
    for client in &clients {
        let _ = client.grpc.close().await;
        client.registry.close().await;
    }
    cancel.cancel();
    let mut watchers = watchers.into_inner();
    while watchers.join_next().await.is_some() {}
    while background.join_next().await.is_some() {}

    let report = analyse(&args, &seen, &sent.lock(), &moved, ready_at, end_at)?;
    let connections: Vec<_> = balancer
        .connections
        .lock()
        .iter()
        .map(|&(t, home, to)| serde_json::json!([t, home, to]))
        .collect();
    let readiness: Vec<_> = balancer
        .readiness
        .lock()
        .iter()
        .map(|&(t, i, up)| serde_json::json!([t, i, up]))
        .collect();
    let mut report = report;
    report["clients"] = args.clients.into();
    report["keys_per_client"] = args.keys.into();
    report["subscriptions"] = total.into();
    report["setup_seconds"] = setup.as_secs_f64().into();
    report["setup_retried"] = retried.into();
    report["rate"] = args.rate.into();
    report["health_interval_ms"] = (args.health_interval.as_millis() as u64).into();
    report["connections"] = connections.into();
    report["readiness"] = readiness.into();
    report["stream_events_lagged"] = seen.lagged.load(Relaxed).into();
    report["refused"] = seen.refused.load(Relaxed).into();
    report["publish_error"] = first_error.lock().clone().into();
    println!("{report}");
    Ok(())
}

/// Each key's time without its stream, and each envelope sent against what arrived.
fn analyse(
    args: &Args,
    seen: &Seen,
    sent: &[Sent],
    moved: &[u32],
    ready_at: f64,
    end_at: f64,
) -> Result<serde_json::Value> {
    let total = args.clients * args.keys;
    let mut events: Vec<Vec<(f64, bool)>> = vec![Vec::new(); total];
    let mut lost_at = Vec::new();
    let mut back_at = Vec::new();
    for &(t, key, back) in seen.events.lock().iter() {
        events[key as usize].push((t, back));
        if back { &mut back_at } else { &mut lost_at }.push(t);
    }
    let mut gaps = Histogram::<u64>::new_with_bounds(1, 3_600_000_000, 3)?;
    let mut never_back = 0u64;
    let mut keys_lost = 0u64;
    let mut moved_lost = 0u64;
    let moved_set: HashSet<u32> = moved.iter().copied().collect();
    for (key, list) in events.iter_mut().enumerate() {
        list.sort_by(|a, b| a.0.total_cmp(&b.0));
        let mut down: Option<f64> = None;
        for &(t, back) in list.iter() {
            match (back, down) {
                (false, None) => down = Some(t),
                (true, Some(since)) => {
                    gaps.record(((t - since) * 1000.0).max(1.0) as u64)?;
                    down = None;
                }
                _ => {}
            }
        }
        if down.is_some() {
            never_back += 1;
        }
        if !list.is_empty() {
            keys_lost += 1;
            if moved_set.contains(&(key as u32)) {
                moved_lost += 1;
            }
        }
    }
    // Subscribed at `t`: every subscription was confirmed before the load
    // began, so a key is subscribed until its first loss, and again from each return.
    // Returns (subscribed from `from` through `to`, on a stream opened again).
    let subscribed_through = |key: u32, from: f64, to: f64| {
        let list = &events[key as usize];
        let before = list.partition_point(|e| e.0 <= from);
        let up = before == 0 || list[before - 1].1;
        let through = up && list.get(before).is_none_or(|e| e.0 > to);
        (through, through && before > 0)
    };
    let received: Vec<HashSet<u32>> = seen
        .received
        .iter()
        .map(|r| r.lock().iter().copied().collect())
        .collect();
    let delivered_total: usize = seen.received.iter().map(|r| r.lock().len()).sum();
    let distinct: usize = received.iter().map(HashSet::len).sum();
    let (mut expected_state, mut lost_state) = (0u64, 0u64);
    let (mut expected_again, mut lost_again) = (0u64, 0u64);
    let (mut expected_recipients, mut lost_recipients) = (0u64, 0u64);
    let (mut zero, mut zero_delivered, mut failed) = (0u64, 0u64, 0u64);
    let mut examples = Vec::new();
    for s in sent {
        let got = received[s.key as usize].contains(&s.seq);
        let Some(recipients) = s.recipients else {
            failed += 1;
            continue;
        };
        if recipients > 0 {
            expected_recipients += 1;
            if !got {
                lost_recipients += 1;
            }
        } else {
            zero += 1;
            if got {
                zero_delivered += 1;
            }
        }
        let (through, again) = subscribed_through(s.key, s.start, s.end);
        if again {
            expected_again += 1;
            if !got {
                lost_again += 1;
            }
        }
        if through {
            expected_state += 1;
            if !got {
                lost_state += 1;
                if examples.len() < 10 {
                    examples.push(serde_json::json!({
                        "key": s.key, "seq": s.seq, "sent_ms": s.start - ready_at,
                        "answered_ms": s.end - ready_at, "recipients": recipients,
                    }));
                }
            }
        }
    }
    let rel = |v: Vec<f64>| -> Vec<f64> { v.into_iter().map(|t| t - ready_at).collect() };
    Ok(serde_json::json!({
        "ready_at": ready_at / 1000.0,
        "end_at": end_at / 1000.0,
        "moved_keys": moved.len(),
        "keys_that_lost_their_stream": keys_lost,
        "moved_keys_that_lost_their_stream": moved_lost,
        "never_back": never_back,
        "without_subscription": percentiles(&gaps),
        "lost_ms": rel(lost_at),
        "back_ms": rel(back_at),
        "published": sent.len(),
        "publish_failed": failed,
        "delivered": delivered_total,
        "duplicates": delivered_total - distinct,
        "sent_while_subscribed": expected_state,
        "lost_while_subscribed": lost_state,
        "sent_after_resubscribing": expected_again,
        "lost_after_resubscribing": lost_again,
        "sent_with_recipients": expected_recipients,
        "lost_with_recipients": lost_recipients,
        "sent_to_nobody": zero,
        "sent_to_nobody_but_delivered": zero_delivered,
        "lost_examples": examples,
    }))
}
