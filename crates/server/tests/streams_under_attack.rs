//! Attacks on the server's streams from many source addresses, each next
//! to a well-behaved client from another address that must be served all
//! along: calls opened with headers alone, publishes that declare a large
//! message and send only its prefix, health watch streams that never end.
//! Caps are scaled down through `Config`, keeping their ratios.

mod fixture;

use std::{
    net::{IpAddr, Ipv6Addr},
    time::{Duration, Instant},
};

use bytes::Bytes;
use cunicu_signal::proto::{
    method::{GET_RELAYS, PUBLISH, SUBSCRIBE},
    signaling::{Envelope, GetRelaysParams, SubscribeParams},
};
use cunicu_signal_server::{Config, Server};
use fixture::{
    H2, STEP, envelope_to, ipv6_in, key, loopback, message, p99, route_on_lo, start, unlimited,
};
use futures::{FutureExt as _, StreamExt as _, stream::FuturesUnordered};
use tokio::{task::JoinSet, time::timeout};
use tonic_health::pb::HealthCheckRequest;

const HEALTH_CHECK: &str = "/grpc.health.v1.Health/Check";
const HEALTH_WATCH: &str = "/grpc.health.v1.Health/Watch";

/// The attackers' /48 and the well-behaved client's.
const ATTACK_48: [u16; 3] = [0xfd00, 0xf003, 0];
const WELL_48: [u16; 3] = [0xfd00, 0xf004, 0];

fn config() -> Config {
    let mut config = Config::default();
    config.request_rate = unlimited();
    config.publish_rate = unlimited();
    config.connection_rate = unlimited();
    config
}

fn envelope(recipient: [u8; 32]) -> Envelope {
    envelope_to(recipient, 64)
}

/// What the well-behaved client saw.
#[derive(Debug, Default)]
struct Report {
    refused: Vec<String>,
    latencies: Vec<Duration>,
}

impl Report {
    fn assert_served(mut self, rounds: usize) {
        assert_eq!(self.refused, Vec::<String>::new(), "refused");
        assert_eq!(self.latencies.len(), rounds, "every envelope delivered");
        let p99 = p99(&mut self.latencies);
        // Generous: the machine is loaded; a refusal or a lost envelope
        // shows as seconds, not milliseconds.
        assert!(p99 < Duration::from_secs(2), "p99 {p99:?}");
    }
}

/// `rounds` times: subscribes to a new key, publishes one envelope to it
/// from a second connection, and times its delivery.
async fn well_behaved(server: &Server, from: IpAddr, rounds: usize) -> Report {
    well_behaved_with(server, from, rounds, 64).await
}

/// [`well_behaved`] with envelope bodies of `body` bytes.
async fn well_behaved_with(server: &Server, from: IpAddr, rounds: usize, body: usize) -> Report {
    let addr = server.local_addr();
    let mut subscriber = H2::connect(addr, from, 1 << 20).await;
    let mut publisher = H2::connect(addr, from, 1 << 20).await;
    let mut report = Report::default();
    for round in 0..rounds {
        let key = key(1_000_000 + round as u32);
        let mut stream = match subscriber
            .call(SUBSCRIBE, message(&SubscribeParams { key: key.to_vec() }))
            .await
        {
            Ok(stream) => stream,
            Err(e) => {
                report.refused.push(format!("subscribe: {e}"));
                continue;
            }
        };
        let published = message(&envelope_to(key, body));
        let want = 5 + published.len();
        let sent = Instant::now();
        if let Err(e) = publisher.unary(PUBLISH, published).await {
            report.refused.push(format!("publish: {e}"));
            continue;
        }
        // The empty envelope that confirms the subscription, then ours.
        let mut have = 0;
        let got = timeout(Duration::from_secs(2), async {
            while have < want {
                match stream.data().await {
                    Some(Ok(data)) => {
                        have += data.len();
                        let _ = stream.flow_control().release_capacity(data.len());
                    }
                    _ => return false,
                }
            }
            true
        })
        .await;
        match got {
            Ok(true) => report.latencies.push(sent.elapsed()),
            _ => report.refused.push(format!("round {round}: envelope lost")),
        }
    }
    report
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_only_publishes_from_a_48_cannot_take_every_call() {
    route_on_lo("fd00:f003::/48");
    route_on_lo("fd00:f004::/48");
    // 4 096 calls and 64 per client, scaled: 64 and 4. 16 /64s of one /48
    // hold 4 each: every call slot.
    let mut config = config();
    config.max_calls = 64;
    config.max_calls_per_client = 4;
    let server = start(config, Ipv6Addr::LOCALHOST.into()).await;
    let mut attackers = JoinSet::new();
    for net in 1..=16 {
        let from = ipv6_in(ATTACK_48, net, 1);
        let server_addr = server.local_addr();
        attackers.spawn(async move {
            let server = server_addr;
            let mut h2 = H2::connect(server, from, 65_535).await;
            let mut open = FuturesUnordered::new();
            let mut held = Vec::new();
            loop {
                while open.len() < 4 {
                    let Ok((response, stream)) = h2.open(PUBLISH).await else {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    };
                    held.push(stream);
                    open.push(response);
                }
                let _ = open.next().await;
                if held.len() > 64 {
                    held.drain(..32);
                }
            }
        });
    }
    // The attackers hold every slot.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let report = well_behaved(&server, ipv6_in(WELL_48, 1, 1), 20).await;
    let ended = server.metrics().encode();
    attackers.shutdown().await;
    report.assert_served(20);
    assert!(
        ended.contains("signaling_calls_ended_total{reason=\"fair_share\"}")
            || ended.contains("signaling_calls_ended_total{reason=\"first_bytes_timeout\"}"),
        "{ended}"
    );
    server.shutdown(STEP).await.expect("stops");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefix_only_publishes_reserve_nothing_of_the_servers_budget() {
    // 64 MiB in all and 4 MiB per client, scaled: 2 MiB and 1 MiB. 24
    // addresses each declare four 64 KiB envelopes (6 MiB) and send only
    // their prefixes.
    let mut config = config();
    config.client_queued_bytes = 1 << 20;
    config.max_queued_bytes = 2 << 20;
    let server = start(config, loopback(1)).await;
    let mut prefix = vec![0u8];
    prefix.extend_from_slice(&65_536u32.to_be_bytes());
    let prefix = Bytes::from(prefix);
    let mut attackers = JoinSet::new();
    for n in 10..34 {
        let server_addr = server.local_addr();
        let prefix = prefix.clone();
        attackers.spawn(async move {
            let mut h2 = H2::connect(server_addr, loopback(n), 65_535).await;
            let mut open = FuturesUnordered::new();
            let mut held = Vec::new();
            loop {
                while open.len() < 4 {
                    let Ok((response, mut stream)) = h2.open(PUBLISH).await else {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    };
                    let _ = stream.send_data(prefix.clone(), false);
                    held.push(stream);
                    open.push(response);
                }
                let _ = open.next().await;
                if held.len() > 64 {
                    held.drain(..32);
                }
            }
        });
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let held = server.metrics().queued_bytes.get();
    let report = well_behaved(&server, loopback(2), 20).await;
    attackers.shutdown().await;
    report.assert_served(20);
    assert!(
        held < 64 * 1024,
        "96 prefixes hold {held} bytes of the server's budget"
    );
    server.shutdown(STEP).await.expect("stops");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_watches_cannot_take_the_slots_of_checks_and_relays() {
    let server = start(config(), loopback(1)).await;
    let watch = message(&HealthCheckRequest {
        service: String::new(),
    });
    // 16 addresses × 16 watch streams.
    let mut watchers = JoinSet::new();
    for n in 40..56 {
        let server_addr = server.local_addr();
        let watch = watch.clone();
        watchers.spawn(async move {
            let mut h2 = H2::connect(server_addr, loopback(n), 65_535).await;
            let mut streams = Vec::new();
            for _ in 0..16 {
                if let Ok(stream) = h2.call(HEALTH_WATCH, watch.clone()).await {
                    streams.push(stream);
                }
            }
            (h2, streams)
        });
    }
    let mut held = Vec::new();
    let mut open = 0;
    while let Some(joined) = watchers.join_next().await {
        let (h2, streams) = joined.expect("watcher");
        open += streams.len();
        held.push((h2, streams));
    }
    assert!(open <= 64, "{open} watch streams open");
    // Another address is served: checks, relays, and a watch of its own.
    let mut other = H2::connect(server.local_addr(), loopback(3), 65_535).await;
    let mut refused = Vec::new();
    for _ in 0..10 {
        if let Err(e) = other.unary(HEALTH_CHECK, watch.clone()).await {
            refused.push(format!("check: {e}"));
        }
        if let Err(e) = other
            .unary(
                GET_RELAYS,
                message(&GetRelaysParams {
                    public_key: vec![7; 32],
                }),
            )
            .await
        {
            refused.push(format!("relays: {e}"));
        }
    }
    if let Err(e) = other.call(HEALTH_WATCH, watch.clone()).await {
        refused.push(format!("watch: {e}"));
    }
    assert_eq!(refused, Vec::<String>::new());
    drop(held);
    server.shutdown(STEP).await.expect("stops");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_health_watch_ends_after_its_lifetime() {
    let mut config = config();
    config.health_watch_lifetime = Duration::from_millis(500);
    let server = start(config, loopback(1)).await;
    let mut h2 = H2::connect(server.local_addr(), loopback(4), 65_535).await;
    let watch = message(&HealthCheckRequest {
        service: String::new(),
    });
    let mut stream = h2.call(HEALTH_WATCH, watch).await.expect("watch");
    let started = Instant::now();
    let trailers = timeout(STEP, async {
        while let Some(Ok(data)) = stream.data().await {
            let _ = stream.flow_control().release_capacity(data.len());
        }
        stream.trailers().await
    })
    .await
    .expect("the watch ends")
    .expect("trailers");
    assert!(started.elapsed() >= Duration::from_millis(400));
    let status = trailers.as_ref().and_then(|t| t.get("grpc-status"));
    assert_eq!(status.map(|s| s.as_bytes()), Some(&b"0"[..]));
    assert!(
        server
            .metrics()
            .encode()
            .contains("signaling_calls_ended_total{reason=\"health_watch_lifetime\"} 1"),
    );
    server.shutdown(STEP).await.expect("stops");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribers_that_open_a_trickle_of_window_cannot_hold_the_queue_budget() {
    // 64 MiB in all, 4 MiB per client and a 30 s cut-off, scaled: 512 KiB,
    // 80 000 bytes and 2 s. 18 addresses × 8 subscriptions, each with a
    // window of one small envelope, opened again every half second, hold
    // more than the server's budget (each client under its own).
    let mut config = config();
    config.client_queued_bytes = 80_000;
    config.max_queued_bytes = 512 << 10;
    config.stall_timeout = Duration::from_secs(2);
    let server = start(config, loopback(1)).await;
    let mut attackers = JoinSet::new();
    for n in 60..78u8 {
        let addr = server.local_addr();
        attackers.spawn(async move {
            let from = loopback(n);
            let mut subscriber = H2::connect(addr, from, 300).await;
            let mut publisher = H2::connect(addr, from, 65_535).await;
            let keys: Vec<[u8; 32]> = (0..8).map(|i| key(u32::from(n) * 100 + i)).collect();
            let mut streams = Vec::new();
            for key in &keys {
                let params = message(&SubscribeParams { key: key.to_vec() });
                streams.push(
                    subscriber
                        .call(SUBSCRIBE, params)
                        .await
                        .expect("subscribed"),
                );
            }
            for _ in 0..40 {
                for key in &keys {
                    let _ = publisher.unary(PUBLISH, message(&envelope(*key))).await;
                }
            }
            loop {
                for key in &keys {
                    for _ in 0..4 {
                        let _ = publisher.unary(PUBLISH, message(&envelope(*key))).await;
                    }
                }
                // The trickle: what came is taken, and its window opened again.
                for stream in &mut streams {
                    while let Some(Some(Ok(data))) = stream.data().now_or_never() {
                        let _ = stream.flow_control().release_capacity(data.len());
                    }
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        });
    }
    // Past the cut-off, and a check of it. The well-behaved client's
    // envelopes (20 KB) would not fit in what the attackers leave free.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let report = well_behaved_with(&server, loopback(2), 20, 20_000).await;
    let metrics = server.metrics().encode();
    attackers.shutdown().await;
    report.assert_served(20);
    let cut: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("signaling_subscribers_cut_total{reason=\"stalled\"} "))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    assert!(cut >= 18.0 * 8.0, "{cut} of 144 cut off");
    server.shutdown(STEP).await.expect("stops");
}

/// A value of the server's metrics, 0 if it has none yet.
fn metric(server: &Server, name: &str) -> f64 {
    let text = server.metrics().encode();
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribers_that_take_nothing_from_many_addresses_leave_room_for_a_newcomer() {
    // 64 MiB in all and 4 MiB per client, scaled: 512 KiB and 80 000 bytes,
    // with a cut-off longer than the test, so that only the fair share can
    // make room. 18 addresses × 8 subscriptions that never open their
    // window fill the server's budget, each client within its own.
    let mut config = config();
    config.client_queued_bytes = 80_000;
    config.max_queued_bytes = 512 << 10;
    config.stall_timeout = Duration::from_secs(600);
    let server = start(config, loopback(1)).await;
    let (filled, mut done) = tokio::sync::mpsc::channel::<()>(18);
    let mut attackers = JoinSet::new();
    for n in 80..98u8 {
        let addr = server.local_addr();
        let filled = filled.clone();
        attackers.spawn(async move {
            let from = loopback(n);
            let mut subscriber = H2::connect(addr, from, 300).await;
            let mut publisher = H2::connect(addr, from, 65_535).await;
            let keys: Vec<[u8; 32]> = (0..8).map(|i| key(u32::from(n) * 100 + i)).collect();
            let mut streams = Vec::new();
            for key in &keys {
                let params = message(&SubscribeParams { key: key.to_vec() });
                streams.push(
                    subscriber
                        .call(SUBSCRIBE, params)
                        .await
                        .expect("subscribed"),
                );
            }
            // More than the client's budget: the rest is refused to it.
            for _ in 0..12 {
                for key in &keys {
                    let _ = publisher
                        .unary(PUBLISH, message(&envelope_to(*key, 1000)))
                        .await;
                }
            }
            let _ = filled.send(()).await;
            // Held, never read, until the test ends.
            std::future::pending::<()>().await;
            drop((streams, subscriber, publisher));
        });
    }
    drop(filled);
    for _ in 0..18 {
        timeout(STEP, done.recv()).await.expect("attackers publish");
    }
    let held = metric(&server, "signaling_queued_bytes");
    assert!(
        held > f64::from(512u32 << 10) - 8_000.0,
        "the attackers hold the server's budget: {held} bytes"
    );
    // The newcomer's envelopes (8 KB; its request and its subscriber's
    // queue hold one each, within its share of 1/19) fit only where the
    // attackers' were.
    let report = well_behaved_with(&server, loopback(2), 20, 8_000).await;
    let cut = metric(
        &server,
        "signaling_subscribers_cut_total{reason=\"queue_fair_share\"}",
    );
    let stalled = metric(
        &server,
        "signaling_subscribers_cut_total{reason=\"stalled\"}",
    );
    attackers.shutdown().await;
    report.assert_served(20);
    assert!(
        cut >= 1.0,
        "{cut} attackers' subscriptions cut for the newcomer"
    );
    assert!(
        cut <= 18.0 * 8.0,
        "{cut} cut: no more than the attackers held"
    );
    assert_eq!(stalled, 0.0, "the fair share made room, not the cut-off");
    server.shutdown(STEP).await.expect("stops");
}
