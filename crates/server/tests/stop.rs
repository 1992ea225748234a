//! Stopping as a replica behind a load balancer: readiness first, then the
//! drain delay, then the subscription streams end one by one over the drain
//! window; and a replica of a cluster stops as fast as one alone.

mod common;

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use anyhow::Result;
use common::{WAIT, nats::Nats};
use cunicu_signal::proto::signaling::{
    EncryptedMessage, Envelope, SubscribeParams, signaling_client::SignalingClient,
};
use cunicu_signal_server::{ClusterConfig, Config, Server};
use tokio::time::timeout;
use tonic::{Code, transport::Channel};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

fn config() -> Config {
    let mut config = Config::default();
    config.listen = SocketAddr::from(([127, 0, 0, 1], 0));
    config.metrics_listen = Some(SocketAddr::from(([127, 0, 0, 1], 0)));
    config
}

async fn channel(server: &Server) -> Result<Channel> {
    Ok(
        Channel::from_shared(format!("http://{}", server.local_addr()))?
            .connect()
            .await?,
    )
}

/// `GET /readyz` on the metrics port: the status code.
async fn readyz(addr: SocketAddr) -> Result<u16> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut tcp = tokio::net::TcpStream::connect(addr).await?;
    tcp.write_all(b"GET /readyz HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .await?;
    let mut answer = String::new();
    tcp.read_to_string(&mut answer).await?;
    let code = answer
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    Ok(code)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_turns_readiness_first_then_ends_streams_one_by_one() -> Result<()> {
    let server = Server::spawn(config()).await?;
    let metrics_addr = server.metrics_addr().unwrap();
    // 40 streams on 4 connections.
    let mut streams = Vec::new();
    for c in 0..4u8 {
        let mut client = SignalingClient::new(channel(&server).await?);
        for i in 0..10u8 {
            let mut s = client
                .subscribe(SubscribeParams {
                    key: vec![c * 10 + i; 32],
                })
                .await?
                .into_inner();
            s.message().await?;
            streams.push((c, s));
        }
    }
    let mut health = HealthClient::new(channel(&server).await?);
    let check = || HealthCheckRequest {
        service: String::new(),
    };
    assert_eq!(readyz(metrics_addr).await?, 200);

    let (delay, window) = (Duration::from_millis(1000), Duration::from_millis(2000));
    let started = Instant::now();
    let (skip_tx, skip_rx) = tokio::sync::oneshot::channel::<()>();
    let drain = tokio::spawn(server.drain(delay, window, async {
        let _ = skip_rx.await;
    }));
    // Not ready at once, while still serving.
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(readyz(metrics_addr).await?, 503);
    assert_eq!(
        health.check(check()).await?.into_inner().status,
        ServingStatus::NotServing as i32
    );
    // Each stream ends at its own moment, after the delay, within the window.
    let ends = futures::future::join_all(streams.into_iter().map(|(c, mut s)| async move {
        let end = timeout(WAIT, s.message()).await;
        (c, started.elapsed(), end)
    }))
    .await;
    let mut times = Vec::new();
    let mut per_connection = vec![Vec::new(); 4];
    for (c, at, end) in ends {
        let status = match end {
            Ok(Err(status)) => status,
            other => panic!("stream did not end with a status: {other:?}"),
        };
        assert_eq!(status.code(), Code::Unavailable, "{status:?}");
        assert_eq!(status.message(), "server shutting down");
        assert!(
            at >= delay,
            "a stream ended at {at:?}, before the drain delay"
        );
        assert!(
            at <= delay + window + Duration::from_millis(500),
            "a stream ended at {at:?}, after the drain window"
        );
        times.push(at);
        per_connection[usize::from(c)].push(at);
    }
    times.sort();
    // Spread over the window: no more than a few per tenth of it.
    for tenth in 0..10u32 {
        let (from, to) = (
            delay + window * tenth / 10,
            delay + window * (tenth + 1) / 10,
        );
        let n = times.iter().filter(|t| **t >= from && **t < to).count();
        assert!(
            n <= 10,
            "{n} of 40 streams ended in [{from:?}, {to:?}): {times:?}"
        );
    }
    let spread = times[times.len() - 1] - times[0];
    assert!(
        spread >= window / 2,
        "streams ended within {spread:?}: {times:?}"
    );
    // Per stream, not per connection: each connection's streams end apart.
    for ends in &per_connection {
        let (first, last) = (ends.iter().min().unwrap(), ends.iter().max().unwrap());
        assert!(
            *last - *first >= window / 4,
            "one connection's ends: {ends:?}"
        );
    }
    timeout(WAIT, drain).await???;
    drop(skip_tx);
    Ok(())
}

/// A subscription stream on `server`, once it is confirmed.
async fn one_subscription(server: &Server) -> Result<tonic::Streaming<Envelope>> {
    let mut client = SignalingClient::new(channel(server).await?);
    let mut stream = client
        .subscribe(SubscribeParams { key: vec![1; 32] })
        .await?
        .into_inner();
    stream.message().await?;
    Ok(stream)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_signal_skips_the_rest_of_the_drain() -> Result<()> {
    let server = Server::spawn(config()).await?;
    let mut stream = one_subscription(&server).await?;
    let started = Instant::now();
    let drain = server.drain(
        Duration::from_secs(30),
        Duration::from_secs(30),
        tokio::time::sleep(Duration::from_millis(300)),
    );
    timeout(WAIT, drain).await??;
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    // The stream goes with its connection.
    assert!(!matches!(
        timeout(WAIT, stream.message()).await?,
        Ok(Some(_))
    ));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_delay_and_window_the_server_stops_at_once() -> Result<()> {
    let server = Server::spawn(config()).await?;
    let mut stream = one_subscription(&server).await?;
    let started = Instant::now();
    timeout(
        WAIT,
        server.drain(Duration::ZERO, Duration::ZERO, std::future::pending()),
    )
    .await??;
    assert!(
        started.elapsed() < Duration::from_millis(500),
        "{:?}",
        started.elapsed()
    );
    let status = timeout(WAIT, stream.message()).await?.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);
    Ok(())
}

/// What a stopping server still held for a subscriber (beyond what the
/// stream's window let out) comes before the stream's end: each publisher
/// was told its envelope was delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_was_queued_for_a_subscriber_comes_before_its_end() -> Result<()> {
    const ENVELOPES: u8 = 40;
    let server = Server::spawn(config()).await?;
    // A stream window of two envelopes, and nothing read until the stop:
    // the rest wait in the server's queue.
    let narrow = Channel::from_shared(format!("http://{}", server.local_addr()))?
        .initial_stream_window_size(1024)
        .connect()
        .await?;
    let key = vec![1; 32];
    let mut stream = SignalingClient::new(narrow)
        .subscribe(SubscribeParams { key: key.clone() })
        .await?
        .into_inner();
    stream.message().await?;
    let mut publisher = SignalingClient::new(channel(&server).await?);
    for n in 0..ENVELOPES {
        publisher
            .publish(Envelope {
                sender: vec![2; 32],
                recipient: key.clone(),
                contents: Some(EncryptedMessage {
                    body: vec![n; 400],
                    nonce: vec![0; 24],
                }),
            })
            .await?;
    }
    let drain = tokio::spawn(server.drain(Duration::ZERO, Duration::ZERO, std::future::pending()));
    let mut got = Vec::new();
    let status = loop {
        match timeout(WAIT, stream.message()).await? {
            Ok(Some(envelope)) => got.push(envelope.contents.and_then(|c| c.body.first().copied())),
            Ok(None) => panic!("the stream ended without a status after {got:?}"),
            Err(status) => break status,
        }
    };
    assert_eq!(got, (0..ENVELOPES).map(Some).collect::<Vec<_>>());
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    timeout(WAIT, drain).await???;
    Ok(())
}

/// A replica with NATS connected and no clients stops as fast as a server
/// alone: the cluster's publisher does not hold the stop up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_stops_as_fast_as_a_server_alone() -> Result<()> {
    let nats = Nats::start().await;
    let mut alone = Duration::ZERO;
    for cluster in [false, true] {
        let mut config = config();
        if cluster {
            config.cluster = Some(ClusterConfig::new(vec![nats.url()]));
        }
        let server = Server::spawn(config).await?;
        if cluster {
            let mut connected = server_connected(&server).await;
            timeout(WAIT, connected.wait_for(|up| *up)).await??;
        }
        let started = Instant::now();
        server
            .drain(Duration::ZERO, Duration::ZERO, std::future::pending())
            .await?;
        let took = started.elapsed();
        if cluster {
            assert!(
                took <= alone + Duration::from_millis(300),
                "with --cluster the stop took {took:?}, alone {alone:?}"
            );
        } else {
            alone = took;
        }
    }
    Ok(())
}

/// Whether the replica is connected to NATS, from its metrics.
async fn server_connected(server: &Server) -> tokio::sync::watch::Receiver<bool> {
    let metrics = server.metrics().clone();
    let (tx, rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        loop {
            tx.send_replace(metrics.cluster_connected.get() == 1);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
    rx
}
