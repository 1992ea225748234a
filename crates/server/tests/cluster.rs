//! Several servers as one (docs/PROTOCOL.md §12): replicas of our server on a real
//! nats-server (and a real three-node NATS cluster), on loopback.

mod common;

use std::{
    collections::HashMap,
    net::SocketAddr,
    time::{Duration, Instant},
};

use common::{WAIT, backend, nats::Nats, url};
use cunicu_signal::{
    conformance::{self, Options},
    proto::signaling::{
        EncryptedMessage, Envelope, SubscribeParams, signaling_client::SignalingClient,
    },
};
use cunicu_signal_server::{ClusterConfig, Config, Server};
use tokio::time::timeout;
use tonic::{Streaming, transport::Channel};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

/// A replica named `name` on the NATS servers `urls`.
async fn replica(name: &str, urls: Vec<String>) -> Server {
    replica_with(name, urls, Config::default()).await
}

/// The same, with `config` for the rest.
async fn replica_with(name: &str, urls: Vec<String>, mut config: Config) -> Server {
    config.listen = SocketAddr::from(([127, 0, 0, 1], 0));
    config.metrics_listen = Some(SocketAddr::from(([127, 0, 0, 1], 0)));
    let mut cluster = ClusterConfig::new(urls);
    cluster.name = Some(name.into());
    config.cluster = Some(cluster);
    let server = Server::spawn(config).await.expect("replica starts");
    // Connected to NATS before the test goes on.
    wait_health(&server, ServingStatus::Serving).await;
    server
}

async fn channel(server: &Server) -> Channel {
    Channel::from_shared(format!("http://{}", server.local_addr()))
        .expect("uri")
        .connect()
        .await
        .expect("connects")
}

async fn cluster_health(server: &Server) -> i32 {
    let mut health = HealthClient::new(channel(server).await);
    health
        .check(HealthCheckRequest {
            service: "cunicu.signaling.Cluster".into(),
        })
        .await
        .map(|r| r.into_inner().status)
        .unwrap_or(-1)
}

async fn wait_health(server: &Server, status: ServingStatus) {
    let deadline = Instant::now() + WAIT;
    while cluster_health(server).await != status as i32 {
        assert!(Instant::now() < deadline, "cluster health never {status:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// An envelope to `key` whose body says who sent it and its number.
fn envelope(key: [u8; 32], publisher: u8, seq: u32) -> Envelope {
    let mut body = vec![publisher];
    body.extend_from_slice(&seq.to_be_bytes());
    Envelope {
        sender: vec![publisher; 32],
        recipient: key.to_vec(),
        contents: Some(EncryptedMessage {
            body,
            nonce: vec![0; 24],
        }),
    }
}

fn id(envelope: &Envelope) -> (u8, u32) {
    let body = &envelope.contents.as_ref().expect("contents").body;
    (
        body[0],
        u32::from_be_bytes(body[1..5].try_into().expect("4 bytes")),
    )
}

async fn subscribe(server: &Server, key: [u8; 32]) -> Streaming<Envelope> {
    let mut stream = SignalingClient::new(channel(server).await)
        .subscribe(SubscribeParams { key: key.to_vec() })
        .await
        .expect("subscribed")
        .into_inner();
    assert_eq!(
        timeout(WAIT, stream.message())
            .await
            .expect("sync")
            .expect("ok"),
        Some(Envelope::default())
    );
    stream
}

/// Reads envelopes until the marker `(255, 0)` arrives; returns what came before it.
async fn until_marker(stream: &mut Streaming<Envelope>) -> Vec<(u8, u32)> {
    until(stream, (255, 0)).await
}

/// Reads envelopes until `marker` arrives; returns the others (other markers
/// included) that came before it.
async fn until(stream: &mut Streaming<Envelope>, marker: (u8, u32)) -> Vec<(u8, u32)> {
    until_all(stream, &[marker]).await
}

/// Reads envelopes until every one of `markers` has arrived, in any order;
/// returns the others. Replicas do not order their envelopes among each other,
/// so each publishing replica sends its own marker after its envelopes.
async fn until_all(stream: &mut Streaming<Envelope>, markers: &[(u8, u32)]) -> Vec<(u8, u32)> {
    let mut missing = markers.to_vec();
    let mut got = Vec::new();
    while !missing.is_empty() {
        let envelope = timeout(WAIT, stream.message())
            .await
            .expect("an envelope in time")
            .expect("stream ok")
            .expect("stream open");
        let id = id(&envelope);
        match missing.iter().position(|m| *m == id) {
            Some(i) => {
                missing.swap_remove(i);
            }
            None => got.push(id),
        }
    }
    got
}

async fn publish(server: &Server, envelopes: impl IntoIterator<Item = Envelope>) {
    let mut client = SignalingClient::new(channel(server).await);
    for envelope in envelopes {
        client.publish(envelope).await.expect("published");
    }
}

fn marker(key: [u8; 32]) -> Envelope {
    envelope(key, 255, 0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_on_one_replica_gets_what_another_publishes_once_in_order() {
    let nats = Nats::start().await;
    let r = [
        replica("r1", vec![nats.url()]).await,
        replica("r2", vec![nats.url()]).await,
        replica("r3", vec![nats.url()]).await,
    ];
    let key = [1u8; 32];
    let mut sub = subscribe(&r[0], key).await;
    // Right after the sync: the subscription has reached NATS.
    publish(
        &r[2],
        (0..200).map(|n| envelope(key, 3, n)).chain([marker(key)]),
    )
    .await;
    assert_eq!(
        until_marker(&mut sub).await,
        (0..200).map(|n| (3, n)).collect::<Vec<_>>()
    );
    // From two publishers on two replicas at once: each in its order, once.
    // Each replica's marker follows its own envelopes: one replica's marker
    // may overtake what the other still has on its way to NATS.
    let (a, b) = (
        publish(
            &r[1],
            (0..100)
                .map(|n| envelope(key, 2, n))
                .chain([envelope(key, 255, 1)]),
        ),
        publish(
            &r[2],
            (0..100)
                .map(|n| envelope(key, 3, n))
                .chain([envelope(key, 255, 2)]),
        ),
    );
    tokio::join!(a, b);
    let got = until_all(&mut sub, &[(255, 1), (255, 2)]).await;
    for publisher in [2, 3] {
        let seqs: Vec<u32> = got
            .iter()
            .filter(|(p, _)| *p == publisher)
            .map(|(_, s)| *s)
            .collect();
        assert_eq!(seqs, (0..100).collect::<Vec<_>>(), "publisher {publisher}");
    }
    let received = r[0].metrics().cluster_received.get();
    assert_eq!(received, 200 + 200 + 3);
}

/// A NATS user that may publish and subscribe under the subject prefix and
/// nowhere else is all a replica needs: the round trip that makes a Subscribe
/// ready stays under the prefix too, and is answered at once (a probe outside
/// it would be refused, and each first Subscribe of a key would wait out the
/// 2 s timeout).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nats_user_allowed_only_the_prefix_is_enough() {
    let nats = Nats::start_with_config(
        r#"
        authorization {
          users = [
            { user: "signal", password: "s3cret",
              permissions: { publish: "cunicu.signal.v1.>", subscribe: "cunicu.signal.v1.>" } }
          ]
        }
        "#,
    )
    .await;
    let url = format!("nats://signal:s3cret@127.0.0.1:{}", nats.port);
    let r = [
        replica("r1", vec![url.clone()]).await,
        replica("r2", vec![url]).await,
    ];
    for (i, key) in [[31u8; 32], [32u8; 32], [33u8; 32]].into_iter().enumerate() {
        let started = Instant::now();
        let mut sub = subscribe(&r[0], key).await;
        let took = started.elapsed();
        assert!(
            took < Duration::from_secs(1),
            "Subscribe {i} ready after {took:?}"
        );
        assert_eq!(metric(&r[0], "signaling_cluster_unconfirmed_total"), 0.0);
        publish(&r[1], [envelope(key, 2, 0), marker(key)]).await;
        assert_eq!(until_marker(&mut sub).await, vec![(2, 0)]);
    }
}

/// A NATS that never answers the round trip (the probe's subject refused)
/// holds a key's first Subscribe 2 s at most, and each such wait is counted;
/// envelopes still flow.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_round_trip_that_never_comes_back_is_waited_for_2_s_and_counted() {
    let nats = Nats::start_with_config(
        r#"
        authorization {
          users = [
            { user: "signal", password: "s3cret",
              permissions: {
                publish: { allow: "cunicu.signal.v1.>", deny: "cunicu.signal.v1._ready" },
                subscribe: "cunicu.signal.v1.>" } }
          ]
        }
        "#,
    )
    .await;
    let url = format!("nats://signal:s3cret@127.0.0.1:{}", nats.port);
    let r = [
        replica("r1", vec![url.clone()]).await,
        replica("r2", vec![url]).await,
    ];
    let key = [34u8; 32];
    let started = Instant::now();
    let mut sub = subscribe(&r[0], key).await;
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(1900) && took < Duration::from_secs(4),
        "Subscribe ready after {took:?}"
    );
    assert_eq!(metric(&r[0], "signaling_cluster_unconfirmed_total"), 1.0);
    // A second stream on the key has nothing to wait for.
    let started = Instant::now();
    let _second = subscribe(&r[0], key).await;
    assert!(started.elapsed() < Duration::from_secs(1));
    assert_eq!(metric(&r[0], "signaling_cluster_unconfirmed_total"), 1.0);
    publish(&r[1], [envelope(key, 2, 0), marker(key)]).await;
    assert_eq!(until_marker(&mut sub).await, vec![(2, 0)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_subscriber_of_a_key_on_every_replica_gets_each_envelope_once() {
    let nats = Nats::start().await;
    let r = [
        replica("r1", vec![nats.url()]).await,
        replica("r2", vec![nats.url()]).await,
        replica("r3", vec![nats.url()]).await,
    ];
    let key = [2u8; 32];
    let mut subs = vec![
        subscribe(&r[0], key).await,
        subscribe(&r[1], key).await,
        subscribe(&r[1], key).await,
        subscribe(&r[2], key).await,
    ];
    // Each replica's marker after its own envelopes: NATS keeps one
    // publisher's order, not the order among replicas.
    for (i, publisher) in r.iter().enumerate() {
        let marker = envelope(key, 255, i as u32);
        publish(
            publisher,
            (0..20).map(|n| envelope(key, i as u8, n)).chain([marker]),
        )
        .await;
    }
    let markers = [(255, 0), (255, 1), (255, 2)];
    for sub in &mut subs {
        let mut got = until_all(sub, &markers).await;
        got.sort();
        let want: Vec<(u8, u32)> = (0..3u8)
            .flat_map(|p| (0..20).map(move |n| (p, n)))
            .collect();
        assert_eq!(got, want);
    }
    // One copy of each on NATS, whoever subscribes where: nothing echoed
    // back. (Counted just after the NATS client took it: wait for the count.)
    for server in &r {
        let deadline = Instant::now() + WAIT;
        while server.metrics().cluster_published.get() < 20 + 1 {
            assert!(Instant::now() < deadline, "never counted");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(server.metrics().cluster_published.get(), 20 + 1);
    }
}

/// Each client's subscriptions to keys' subjects, by client name (without
/// the replica's own reply subjects: its inbox and its recipient counts).
async fn key_subscriptions(nats: &Nats) -> HashMap<String, Vec<String>> {
    nats.subscriptions()
        .await
        .into_iter()
        .map(|(name, subjects)| {
            let keys = subjects
                .into_iter()
                .filter(|s| {
                    !s.starts_with("cunicu.signal.v1._inbox.")
                        && !s.starts_with("cunicu.signal.v1._recipients.")
                })
                .collect();
            (name, keys)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_with_subscribers_on_one_replica_brings_no_traffic_to_the_others() {
    let nats = Nats::start().await;
    let r = [
        replica("r1", vec![nats.url()]).await,
        replica("r2", vec![nats.url()]).await,
        replica("r3", vec![nats.url()]).await,
    ];
    let key = [0xabu8; 32];
    let subject = format!("cunicu.signal.v1.{}", "ab".repeat(32));
    let sub = subscribe(&r[1], key).await;
    let subs = key_subscriptions(&nats).await;
    assert_eq!(subs.get("r2"), Some(&vec![subject.clone()]), "{subs:?}");
    assert_eq!(subs.get("r1"), Some(&vec![]), "{subs:?}");
    assert_eq!(subs.get("r3"), Some(&vec![]), "{subs:?}");
    // Published on r1: only r2 receives it from NATS.
    publish(&r[0], [envelope(key, 1, 0)]).await;
    let mut sub = sub;
    assert_eq!(
        id(&timeout(WAIT, sub.message())
            .await
            .unwrap()
            .unwrap()
            .unwrap()),
        (1, 0)
    );
    assert_eq!(r[1].metrics().cluster_received.get(), 1);
    assert_eq!(r[2].metrics().cluster_received.get(), 0);
    // With its last stream, the key's subscription goes within a second.
    drop(sub);
    let deadline = Instant::now() + Duration::from_secs(1) + Duration::from_millis(500);
    loop {
        let subs = key_subscriptions(&nats).await;
        if subs.get("r2") == Some(&vec![]) {
            break;
        }
        assert!(Instant::now() < deadline, "still subscribed: {subs:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_nats_replicas_serve_their_own_and_then_find_each_other_again() {
    let mut nats = Nats::start().await;
    let r = [
        replica("r1", vec![nats.url()]).await,
        replica("r2", vec![nats.url()]).await,
    ];
    let key = [3u8; 32];
    let (mut on1, mut on2) = (subscribe(&r[0], key).await, subscribe(&r[1], key).await);

    nats.kill().await;
    for server in &r {
        wait_health(server, ServingStatus::NotServing).await;
    }
    // Degraded, not down: the service and readiness say so, and serve.
    let mut health = HealthClient::new(channel(&r[0]).await);
    let overall = health
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .expect("health")
        .into_inner()
        .status;
    assert_eq!(overall, ServingStatus::Serving as i32);
    let ready = http_get(r[0].metrics_addr().expect("metrics port"), "/readyz").await;
    assert!(
        ready.starts_with("HTTP/1.1 200") && ready.contains("degraded"),
        "{ready}"
    );
    assert!(
        r[0].metrics()
            .encode()
            .contains("signaling_cluster_connected 0")
    );
    publish(&r[0], [envelope(key, 1, 0), marker(key)]).await;
    assert_eq!(until_marker(&mut on1).await, vec![(1, 0)]);

    // Back, on the same port: cross-replica delivery resumes by itself.
    nats.restart().await;
    for server in &r {
        wait_health(server, ServingStatus::Serving).await;
    }
    let second = envelope(key, 255, 1);
    publish(&r[0], (1..50).map(|n| envelope(key, 1, n)).chain([second])).await;
    assert_eq!(
        until(&mut on1, (255, 1)).await,
        (1..50).map(|n| (1, n)).collect::<Vec<_>>()
    );
    let got = until(&mut on2, (255, 1)).await;
    // What was published during the outage may come late, at most once (the
    // NATS client held it); the rest comes in order, once.
    let after: Vec<(u8, u32)> = got
        .iter()
        .copied()
        .filter(|&(p, n)| p == 1 && n > 0)
        .collect();
    assert_eq!(after, (1..50).map(|n| (1, n)).collect::<Vec<_>>());
    for outage in [(1, 0), (255, 0)] {
        assert!(got.iter().filter(|&&e| e == outage).count() <= 1, "{got:?}");
    }
}

async fn http_get(addr: SocketAddr, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .expect("write");
    let mut text = String::new();
    timeout(WAIT, stream.read_to_string(&mut text))
        .await
        .expect("in time")
        .expect("read");
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_carry_on_through_the_other_nodes_of_a_nats_cluster() {
    let mut nodes = Nats::cluster(3).await;
    for node in &nodes {
        node.wait_routes(2).await;
    }
    let urls: Vec<String> = nodes.iter().map(Nats::url).collect();
    let r = [
        replica("r1", urls.clone()).await,
        replica("r2", urls.clone()).await,
    ];
    let key = [4u8; 32];
    let mut sub = subscribe(&r[0], key).await;
    // The replicas may be on two nodes: interest crosses the routes soon, not at once.
    let n = until_flowing(&r[1], &mut sub, key, 0).await;

    // Kill the node r1 is connected to.
    let mut on = None;
    for (i, node) in nodes.iter().enumerate() {
        if node
            .subscriptions()
            .await
            .iter()
            .any(|(name, _)| name == "r1")
        {
            on = Some(i);
        }
    }
    let on = on.expect("r1 is connected to a node");
    nodes[on].kill().await;
    // r1 reconnects to another node and subscribes again; envelopes flow.
    until_flowing(&r[1], &mut sub, key, n).await;
    publish(
        &r[1],
        (100..120).map(|n| envelope(key, 2, n)).chain([marker(key)]),
    )
    .await;
    let got = until_marker(&mut sub).await;
    let tail: Vec<u32> = got.iter().map(|(_, n)| *n).filter(|n| *n >= 100).collect();
    assert_eq!(tail, (100..120).collect::<Vec<_>>());
    let mut seen = got.clone();
    seen.dedup();
    assert_eq!(seen.len(), got.len(), "duplicates: {got:?}");
}

/// Publishes `(2, from)`, `(2, from + 1)`... through `server` until one
/// reaches `sub`; returns the next number. Envelopes published before may
/// still come later.
async fn until_flowing(
    server: &Server,
    sub: &mut Streaming<Envelope>,
    key: [u8; 32],
    from: u32,
) -> u32 {
    let deadline = Instant::now() + WAIT;
    let mut n = from;
    loop {
        publish(server, [envelope(key, 2, n)]).await;
        n += 1;
        if let Ok(Ok(Some(envelope))) = timeout(Duration::from_millis(300), sub.message()).await {
            assert_eq!(id(&envelope).0, 2);
            return n;
        }
        assert!(Instant::now() < deadline, "no delivery in {WAIT:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_that_dies_does_not_touch_the_others() {
    let nats = Nats::start().await;
    let r1 = replica("r1", vec![nats.url()]).await;
    let r2 = replica("r2", vec![nats.url()]).await;
    let r3 = replica("r3", vec![nats.url()]).await;
    let key = [5u8; 32];
    let mut sub = subscribe(&r1, key).await;
    let _doomed = subscribe(&r3, key).await;
    drop(r3);
    publish(
        &r2,
        (0..50).map(|n| envelope(key, 2, n)).chain([marker(key)]),
    )
    .await;
    assert_eq!(
        until_marker(&mut sub).await,
        (0..50).map(|n| (2, n)).collect::<Vec<_>>()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_across_two_replicas() {
    let nats = Nats::start().await;
    let r = [
        replica("r1", vec![nats.url()]).await,
        replica("r2", vec![nats.url()]).await,
    ];
    let urls = [url(&r[0]), url(&r[1])];
    // Each peer on one replica, alternately: every pair crosses or not.
    conformance::run(Options::default(), |i| backend(vec![urls[i % 2].clone()])).await;
}

/// A metric of `server`'s, 0 if it has no sample yet.
fn metric(server: &Server, name: &str) -> f64 {
    let text = server.metrics().encode();
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

/// Whoever can publish on NATS is not trusted with the subscribers: what
/// comes on a key's subject and is not an envelope to that key is dropped
/// and counted, and the envelopes around it still arrive, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_nats_brings_that_is_not_an_envelope_for_the_key_is_dropped_and_counted() {
    use prost::Message as _;
    let nats = Nats::start().await;
    let r1 = replica("r1", vec![nats.url()]).await;
    let key = [6u8; 32];
    let mut stream = subscribe(&r1, key).await;

    let other = async_nats::connect(nats.url()).await.expect("NATS client");
    let subject = format!(
        "cunicu.signal.v1.{}",
        key.iter().map(|b| format!("{b:02x}")).collect::<String>()
    );
    let messages = [
        envelope(key, 7, 0).encode_to_vec(),
        vec![0xff; 40],                            // not protobuf
        envelope([9u8; 32], 7, 1).encode_to_vec(), // another key's
        Envelope {
            sender: vec![1; 5], // not a key
            ..envelope(key, 7, 2)
        }
        .encode_to_vec(),
        envelope(key, 7, 3).encode_to_vec(),
        marker(key).encode_to_vec(),
    ];
    for message in messages {
        other
            .publish(subject.clone(), message.into())
            .await
            .expect("published to NATS");
    }
    other.flush().await.expect("flushed");
    assert_eq!(until_marker(&mut stream).await, vec![(7, 0), (7, 3)]);
    assert_eq!(
        metric(&r1, "signaling_cluster_dropped_total{reason=\"invalid\"}"),
        3.0
    );
    assert_eq!(metric(&r1, "signaling_cluster_received_total"), 3.0);
}

/// One client publishes far more than the queue to NATS holds while NATS is
/// away: every publish is answered at once (none waits for NATS), what does
/// not fit is dropped and counted, and the replica's own subscriber still
/// gets the envelopes after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_flood_while_nats_is_away_is_answered_and_counted() {
    let mut nats = Nats::start().await;
    let mut config = Config::default();
    let rate = |n: u32| {
        let n = std::num::NonZeroU32::new(n).expect("not 0");
        cunicu_signal_server::Rate {
            per_second: n,
            burst: n,
        }
    };
    config.publish_rate = rate(1_000_000);
    config.publish_bytes_rate = rate(1 << 30);
    config.request_rate = rate(1_000_000);
    let r1 = replica_with("r1", vec![nats.url()], config).await;
    nats.kill().await;
    wait_health(&r1, ServingStatus::NotServing).await;

    const TASKS: u32 = 16;
    const EACH: u32 = 1_000;
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for t in 0..TASKS {
        let mut client = SignalingClient::new(channel(&r1).await);
        tasks.spawn(async move {
            for n in 0..EACH {
                client
                    .publish(envelope([t as u8; 32], 1, n))
                    .await
                    .expect("answered");
            }
        });
    }
    timeout(WAIT * 3, tasks.join_all())
        .await
        .expect("every publish answered in time");
    let elapsed = started.elapsed();
    let published = f64::from(TASKS * EACH);
    assert_eq!(
        metric(&r1, "signaling_envelopes_published_total"),
        published
    );
    let dropped = metric(
        &r1,
        "signaling_cluster_dropped_total{reason=\"buffer_full\"}",
    );
    // The queue to NATS and the NATS client's buffer hold 8 192 at most.
    assert!(
        dropped > 0.0 && dropped >= published - 8_192.0 - f64::from(TASKS),
        "{dropped} of {published} dropped in {elapsed:?}"
    );

    // The replica's own subscribers are still served.
    let key = [200u8; 32];
    let mut stream = subscribe(&r1, key).await;
    publish(&r1, [envelope(key, 2, 0), marker(key)]).await;
    assert_eq!(until_marker(&mut stream).await, vec![(2, 0)]);
}

/// A raw Publish through `server` that asks for the count: the count, and
/// how long the answer took.
async fn publish_asking(server: &Server, key: [u8; 32]) -> (Option<u32>, Duration) {
    use cunicu_signal::backend::grpc::{RECIPIENTS_ASK, RECIPIENTS_METADATA};
    let mut client = SignalingClient::new(channel(server).await);
    let mut request = tonic::Request::new(envelope(key, 9, 0));
    request
        .metadata_mut()
        .insert(RECIPIENTS_METADATA, RECIPIENTS_ASK.parse().expect("ascii"));
    let started = Instant::now();
    let response = client.publish(request).await.expect("published");
    let count = response
        .metadata()
        .get(RECIPIENTS_METADATA)
        .map(|v| v.to_str().expect("ascii").parse().expect("a count"));
    (count, started.elapsed())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recipient_counts_add_up_over_every_replica() {
    let nats = Nats::start().await;
    // A long wait, so that answering at once (nobody anywhere) and waiting
    // for the counts of others cannot be mistaken for each other.
    let mut config = Config::default();
    config.recipients_wait = Duration::from_secs(2);
    let r = [
        replica_with("r1", vec![nats.url()], config.clone()).await,
        replica_with("r2", vec![nats.url()], config.clone()).await,
        replica_with("r3", vec![nats.url()], config).await,
    ];
    let key = [6u8; 32];
    // Nobody anywhere: NATS says "no responders" within a round trip.
    let (count, took) = publish_asking(&r[0], key).await;
    assert_eq!(count, Some(0));
    assert!(took < Duration::from_millis(1000), "{took:?}");

    // One subscriber on another replica, two on a third, one local.
    let _s1 = subscribe(&r[1], key).await;
    let _s2 = subscribe(&r[2], key).await;
    let _s3 = subscribe(&r[2], key).await;
    let (count, took) = publish_asking(&r[0], key).await;
    assert_eq!(count, Some(3), "took {took:?}");
    let _s4 = subscribe(&r[0], key).await;
    let (count, _) = publish_asking(&r[0], key).await;
    assert_eq!(count, Some(4));
    // Through a replica with subscribers of its own, the others count too.
    let (count, _) = publish_asking(&r[2], key).await;
    assert_eq!(count, Some(4));
}

/// Resident memory of this process (the replica runs in it).
fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .expect("status")
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

/// NATS hung (SIGSTOP) while 60 addresses publish 60 KB envelopes, each
/// within its own rates. Before, the queue to NATS and the NATS client's
/// buffer were bounded in envelopes (4 096 each), not bytes, and outside
/// the server's budget: a replica grew by hundreds of MiB. Now what waits
/// for NATS takes from the server's budget, and the NATS client is handed
/// at most 4 MiB it has not written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_nats_holds_no_more_than_the_budget() {
    let nats = Nats::start().await;
    let server = replica("a", vec![nats.url()]).await;
    let baseline = rss_kib();
    nats.signal("STOP");
    struct Resume<'a>(&'a Nats);
    impl Drop for Resume<'_> {
        fn drop(&mut self) {
            self.0.signal("CONT");
        }
    }
    let _resume = Resume(&nats);
    let mut tasks = tokio::task::JoinSet::new();
    for address in 0..60u8 {
        let endpoint = Channel::from_shared(format!("http://{}", server.local_addr()))
            .expect("uri")
            .local_address(Some([127, 0, 1, 10 + address].into()));
        tasks.spawn(async move {
            let mut client = SignalingClient::new(endpoint.connect().await.expect("connects"));
            let mut sent = 0u32;
            for n in 0..64u32 {
                let mut envelope = envelope([100 + address; 32], address, n);
                if let Some(contents) = envelope.contents.as_mut() {
                    contents.body = vec![address; 60_000];
                }
                if client.publish(envelope).await.is_ok() {
                    sent += 1;
                }
            }
            sent
        });
    }
    let sent: u32 = timeout(WAIT * 2, tasks.join_all())
        .await
        .expect("published in time")
        .into_iter()
        .sum();
    assert!(sent >= 60 * 60, "{sent} publishes accepted");
    let grown = rss_kib().saturating_sub(baseline);
    let text = server.metrics().encode();
    // The budget (64 MiB), the NATS client's 4 MiB, and room for the test's
    // own clients and the allocator.
    assert!(
        grown <= 128 * 1024,
        "grew by {grown} KiB with NATS hung\n{text}"
    );
    assert!(
        text.lines().any(|l| (l
            .starts_with("signaling_cluster_dropped_total{reason=\"server_budget\"}")
            || l.starts_with("signaling_cluster_dropped_total{reason=\"nats_buffer_full\"}"))
            && !l.ends_with(" 0")),
        "nothing dropped for the bound\n{text}"
    );
    drop(_resume);
    wait_health(&server, ServingStatus::Serving).await;
}
