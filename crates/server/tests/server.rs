//! The signaling server on port 0, with the grpc:// backend and raw gRPC clients.

mod common;

use std::{net::SocketAddr, sync::Arc, time::Duration};

use anyhow::{Context, Result};
use common::{WAIT, backend, exchange, url};
use cunicu_signal::{
    Backend, ChannelHandler, KeyPair, PrivateKey, Registry, Sender,
    backend::{SignalingBackend, connect, connect_transport},
    conformance::{self, Options, message_for},
    proto::signaling::{
        EncryptedMessage, Envelope, GetRelaysParams, SubscribeParams,
        relay_registry_client::RelayRegistryClient, signaling_client::SignalingClient,
    },
};
use cunicu_signal_server::{Config, Rate, Relay, Server, TlsFiles};
use tokio::time::timeout;
use tonic::{Code, transport::Channel};

fn config() -> Config {
    let mut config = Config::default();
    config.listen = SocketAddr::from(([127, 0, 0, 1], 0));
    config
}

/// A rate that never limits a test.
fn unlimited() -> Rate {
    let max = std::num::NonZeroU32::MAX;
    Rate {
        per_second: max,
        burst: max,
    }
}

async fn start(config: Config) -> Server {
    Server::spawn(config).await.expect("server starts")
}

async fn client(server: &Server) -> SignalingClient<Channel> {
    let channel = Channel::from_shared(format!("http://{}", server.local_addr()))
        .unwrap()
        .connect()
        .await
        .expect("connects");
    SignalingClient::new(channel)
}

/// An envelope whose body starts with a sequence number, padded to `size` bytes.
fn raw_envelope_of(recipient: [u8; 32], seq: u32, size: usize) -> Envelope {
    let mut body = seq.to_be_bytes().to_vec();
    body.resize(size.max(4), 0);
    Envelope {
        sender: vec![7; 32],
        recipient: recipient.to_vec(),
        contents: Some(EncryptedMessage {
            body,
            nonce: vec![0; 24],
        }),
    }
}

fn raw_envelope(recipient: [u8; 32], seq: u32) -> Envelope {
    raw_envelope_of(recipient, seq, 4)
}

fn seq(envelope: &Envelope) -> u32 {
    let body = &envelope.contents.as_ref().expect("contents").body;
    u32::from_be_bytes(body[..4].try_into().expect("4 bytes"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_through_one_server() {
    let server = start(config()).await;
    let url = url(&server);
    conformance::run(Options::default(), |_| backend(vec![url.clone()])).await;
    // Every stream ended with its backend: the server keeps no state.
    let metrics = server.metrics();
    timeout(WAIT, async {
        while metrics.subscriptions.get() != 0 || metrics.topics.get() != 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("subscriptions and topics back to 0");
}

/// An envelope that arrives while subscribe waits for the server's sync, or
/// right after, reaches the handler exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribe_races_the_first_envelope() {
    let server = start(config()).await;
    let url = url(&server);
    let registry = Registry::new();
    let transport = connect_transport(&url, registry.clone())
        .await
        .expect("transport");
    let (transport, gate) = conformance::gated(transport);
    let backend = Arc::new(SignalingBackend::new(Box::new(transport), registry));
    let publisher: Arc<dyn Backend> = Arc::new(connect(&[url.as_str()]).await.expect("publisher"));
    conformance::subscribe_race(
        backend,
        gate,
        publisher,
        &Options {
            timeout: Duration::from_secs(10),
            settle: Duration::from_millis(200),
            ..Options::default()
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_through_two_servers_at_once() {
    let (a, b) = (start(config()).await, start(config()).await);
    let urls = vec![url(&a), url(&b)];
    conformance::run(Options::default(), |_| backend(urls.clone())).await;
    // Both servers carried every envelope: 90 + 10 + 10 publishes each.
    assert_eq!(a.metrics().published.get(), 110);
    assert_eq!(b.metrics().published.get(), 110);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribers_come_back_after_a_server_restart() -> Result<()> {
    let server = start(config()).await;
    let addr = server.local_addr();
    let url = url(&server);
    let (alice, bob) = (PrivateKey::generate(), PrivateKey::generate());
    let receiver = connect(&[&url]).await?;
    let (handler, mut rx) = ChannelHandler::new(16);
    receiver
        .subscribe(&bob, Sender::Key(alice.public_key()), handler)
        .await?;
    let sender = connect(&[&url]).await?;
    let pair = KeyPair::new(alice.clone(), bob.public_key());
    sender
        .publish(
            &pair,
            &message_for(1, &alice.public_key(), &bob.public_key()),
        )
        .await?;
    let first = timeout(WAIT, rx.recv()).await?.context("first message")?;
    assert_eq!(
        first.message,
        message_for(1, &alice.public_key(), &bob.public_key())
    );

    server.shutdown(Duration::from_secs(5)).await?;
    let mut config = config();
    config.listen = addr;
    let server = start(config).await;
    // The subscriber reconnects by itself.
    timeout(WAIT, async {
        while server.metrics().subscriptions.get() < 1 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .context("subscriber did not come back")?;
    sender
        .publish(
            &pair,
            &message_for(2, &alice.public_key(), &bob.public_key()),
        )
        .await?;
    let second = timeout(WAIT, rx.recv()).await?.context("second message")?;
    assert_eq!(
        second.message,
        message_for(2, &alice.public_key(), &bob.public_key())
    );
    assert_eq!(second.sender, alice.public_key());
    // Nothing else arrives (no replay of the first message, no second copy of
    // this one): a third message, published last, is the next delivery.
    sender
        .publish(
            &pair,
            &message_for(3, &alice.public_key(), &bob.public_key()),
        )
        .await?;
    let third = timeout(WAIT, rx.recv()).await?.context("third message")?;
    assert_eq!(
        third.message,
        message_for(3, &alice.public_key(), &bob.public_key()),
        "something else arrived before the third message"
    );
    receiver.close().await?;
    sender.close().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_subscriber_loses_only_its_own_oldest_envelopes() -> Result<()> {
    let mut config = config();
    config.queue_depth = 16;
    // This test publishes as fast as it can, and its slow subscriber reads
    // nothing for a while: lift the rate and the stall cut-off.
    config.request_rate = unlimited();
    config.publish_rate = unlimited();
    config.publish_bytes_rate = unlimited();
    config.stall_timeout = Duration::from_secs(600);
    let server = start(config).await;
    let key = [3u8; 32];
    // The slow subscriber reads the sync envelope, then nothing.
    let mut slow = client(&server)
        .await
        .subscribe(SubscribeParams { key: key.to_vec() })
        .await?
        .into_inner();
    assert_eq!(slow.message().await?, Some(Envelope::default()));
    let mut fast = client(&server)
        .await
        .subscribe(SubscribeParams { key: key.to_vec() })
        .await?
        .into_inner();
    assert_eq!(fast.message().await?, Some(Envelope::default()));

    let mut publisher = client(&server).await;
    let total = 4000u32;
    let started = std::time::Instant::now();
    for batch in 0..total / 10 {
        for i in 0..10 {
            // 4 KiB each: far more in all than HTTP/2 flow control lets sit in buffers.
            publisher
                .publish(raw_envelope_of(key, batch * 10 + i, 4096))
                .await?;
        }
        // The fast subscriber keeps up and receives every envelope, in order.
        for i in 0..10 {
            let envelope = timeout(WAIT, fast.message())
                .await??
                .context("fast stream ended")?;
            assert_eq!(seq(&envelope), batch * 10 + i);
        }
    }
    let elapsed = started.elapsed();
    assert!(
        elapsed < Duration::from_secs(30),
        "publishing took {elapsed:?}"
    );

    // The slow one gets what was in flight, then the newest 16: the oldest were dropped.
    let mut got = Vec::new();
    while let Ok(Ok(Some(envelope))) = timeout(Duration::from_millis(500), slow.message()).await {
        got.push(seq(&envelope));
    }
    assert!(
        got.len() < total as usize,
        "slow subscriber lost nothing: {}",
        got.len()
    );
    let newest: Vec<u32> = (total - 16..total).collect();
    assert_eq!(&got[got.len() - 16..], newest.as_slice());
    let metrics = server.metrics().encode();
    let dropped = total as usize - got.len();
    assert!(
        metrics.contains(&format!(
            "signaling_envelopes_dropped_total{{reason=\"queue_full\"}} {dropped}"
        )),
        "{metrics}"
    );
    Ok(())
}

#[tokio::test]
async fn invalid_keys_and_oversize_envelopes_are_refused() -> Result<()> {
    let mut config = config();
    config.max_envelope_size = 1000;
    let server = start(config).await;
    let mut c = client(&server).await;

    let mut bad = raw_envelope([1; 32], 0);
    bad.sender = vec![1; 31];
    let status = c.publish(bad).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert_eq!(status.message(), "sender key is 31 bytes, expected 32");

    let mut bad = raw_envelope([1; 32], 0);
    bad.recipient = vec![];
    let status = c.publish(bad).await.unwrap_err();
    assert_eq!(status.message(), "recipient key is 0 bytes, expected 32");

    let status = c
        .subscribe(SubscribeParams { key: vec![1; 33] })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert_eq!(
        status.message(),
        "subscription key is 33 bytes, expected 32"
    );

    let mut big = raw_envelope([1; 32], 0);
    big.contents.as_mut().unwrap().body = vec![0; 2000];
    let status = c.publish(big).await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted);
    assert!(
        status.message().contains("the limit is 1000"),
        "{}",
        status.message()
    );

    let mut huge = raw_envelope([1; 32], 0);
    huge.contents.as_mut().unwrap().body = vec![0; 100_000];
    assert_eq!(
        c.publish(huge).await.unwrap_err().code(),
        Code::ResourceExhausted
    );

    let text = server.metrics().encode();
    assert!(
        text.contains("signaling_requests_rejected_total{reason=\"invalid_key\"} 3"),
        "{text}"
    );
    assert!(
        text.contains("signaling_requests_rejected_total{reason=\"oversize\"} 2"),
        "{text}"
    );
    assert_eq!(server.metrics().published.get(), 0);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_the_server_cannot_end_ends_when_the_grace_runs_out() -> Result<()> {
    use tonic_reflection::pb::v1::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest,
    };
    let mut config = config();
    config.reflection = true;
    let server = start(config).await;
    let channel = Channel::from_shared(format!("http://{}", server.local_addr()))?
        .connect()
        .await?;
    // A reflection stream whose client keeps its side open: nothing in the
    // server ends it.
    let (requests, rx) = tokio::sync::mpsc::channel(1);
    requests
        .send(ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        })
        .await?;
    let mut responses = ServerReflectionClient::new(channel)
        .server_reflection_info(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await?
        .into_inner();
    assert!(responses.message().await?.is_some());
    let result = server.shutdown(Duration::from_millis(300)).await;
    assert!(
        matches!(
            result,
            Err(cunicu_signal_server::ServerError::ShutdownTimeout(_))
        ),
        "{result:?}"
    );
    // Past the grace the connection is cut: the stream ends, and soon.
    let end = timeout(Duration::from_secs(5), responses.message())
        .await
        .expect("the stream ended after the grace");
    assert!(!matches!(end, Ok(Some(_))), "{end:?}");
    drop(requests);
    Ok(())
}

#[tokio::test]
async fn settings_of_zero_are_refused() {
    type Zero = fn(&mut Config);
    let settings: [(&str, Zero); 8] = [
        ("queue-depth", |c| c.queue_depth = 0),
        ("max-connections", |c| c.max_connections = 0),
        ("max-connections-per-client", |c| {
            c.max_connections_per_client = 0
        }),
        ("max-subscriptions", |c| c.max_subscriptions = 0),
        ("max-subscriptions-per-client", |c| {
            c.max_subscriptions_per_client = 0
        }),
        ("max-streams-per-connection", |c| {
            c.max_streams_per_connection = 0
        }),
        ("max-envelope-size", |c| c.max_envelope_size = 0),
        ("max-calls", |c| c.max_calls = 0),
    ];
    for (what, zero) in settings {
        let mut c = config();
        zero(&mut c);
        match Server::spawn(c).await {
            Err(cunicu_signal_server::ServerError::Config(e)) => {
                assert_eq!(e.to_string(), format!("{what} must be at least 1"))
            }
            Err(e) => panic!("{what}: {e}"),
            Ok(_) => panic!("{what} = 0 accepted"),
        }
    }
    let mut c = config();
    c.stall_timeout = Duration::ZERO;
    assert_eq!(
        Server::spawn(c).await.err().map(|e| e.to_string()),
        Some("stall-timeout must be longer than 0".into())
    );
    let mut c = config();
    c.client_queued_bytes = 1000;
    assert_eq!(
        Server::spawn(c).await.err().map(|e| e.to_string()),
        Some("client-queued-bytes (1000) must be at least max-envelope-size + 5 (65541)".into())
    );
}

/// A client whose connections come from `local` (an address of 127.0.0.0/8).
async fn client_from(server: &Server, local: [u8; 4]) -> SignalingClient<Channel> {
    let channel = Channel::from_shared(format!("http://{}", server.local_addr()))
        .unwrap()
        .local_address(Some(local.into()))
        .connect()
        .await
        .expect("connects");
    SignalingClient::new(channel)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriptions_are_limited_per_client_and_in_all() -> Result<()> {
    let mut config = config();
    config.max_subscriptions = 3;
    config.max_subscriptions_per_client = 2;
    let server = start(config).await;
    let (mut one, mut two) = (
        client_from(&server, [127, 0, 0, 1]).await,
        client_from(&server, [127, 0, 0, 2]).await,
    );
    let key = |n: u8| SubscribeParams { key: vec![n; 32] };
    let mut first = one.subscribe(key(1)).await?.into_inner();
    assert_eq!(first.message().await?, Some(Envelope::default()));
    let mut second = one.subscribe(key(2)).await?.into_inner();
    assert_eq!(second.message().await?, Some(Envelope::default()));

    // A third from the same address is refused; another address still gets one.
    let status = one.subscribe(key(3)).await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted);
    assert_eq!(
        status.message(),
        "127.0.0.1 has reached the limit of 2 subscriptions per client"
    );
    let mut other = two.subscribe(key(3)).await?.into_inner();
    assert_eq!(other.message().await?, Some(Envelope::default()));
    // Now the server is full, for everyone.
    let status = two.subscribe(key(4)).await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted);
    assert_eq!(
        status.message(),
        "the server has reached its limit of 3 subscriptions and this client holds its fair share"
    );

    // A stream that ends frees its client's slot.
    drop(first);
    timeout(WAIT, async {
        while server.metrics().subscriptions.get() != 2 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await?;
    let mut again = one.subscribe(key(3)).await?.into_inner();
    assert_eq!(again.message().await?, Some(Envelope::default()));
    // Both streams on key 3 get what is published to it, once, and key 2's
    // nothing: a marker published next to each key is the next (and only)
    // thing its streams get, since a stream delivers in publishing order.
    one.publish(raw_envelope([3; 32], 42)).await?;
    one.publish(raw_envelope([3; 32], 43)).await?;
    one.publish(raw_envelope([2; 32], 44)).await?;
    for stream in [&mut again, &mut other] {
        for seq in [42, 43] {
            let got = timeout(WAIT, stream.message()).await??.context("ended")?;
            assert_eq!(got, raw_envelope([3; 32], seq));
        }
    }
    let got = timeout(WAIT, second.message()).await??.context("ended")?;
    assert_eq!(
        got,
        raw_envelope([2; 32], 44),
        "key 2 got something else first"
    );

    let text = server.metrics().encode();
    for reason in ["too_many_client_subscriptions", "too_many_subscriptions"] {
        assert!(
            text.contains(&format!(
                "signaling_requests_rejected_total{{reason=\"{reason}\"}} 1"
            )),
            "{text}"
        );
    }
    Ok(())
}

fn self_signed(dir: &std::path::Path) -> TlsFiles {
    let rcgen::CertifiedKey { cert, signing_key } =
        rcgen::generate_simple_self_signed(vec!["localhost".to_string(), "127.0.0.1".to_string()])
            .expect("certificate");
    let files = TlsFiles {
        cert: dir.join("cert.pem"),
        key: dir.join("key.pem"),
    };
    std::fs::write(&files.cert, cert.pem()).unwrap();
    std::fs::write(&files.key, signing_key.serialize_pem()).unwrap();
    files
}

#[tokio::test]
async fn tls_with_a_trusted_ca_file_and_with_skip_verify() -> Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let dir = tempfile::tempdir()?;
    let files = self_signed(dir.path());
    let mut config = config();
    config.tls = Some(files.clone());
    let server = start(config).await;
    let port = server.local_addr().port();

    exchange(&format!(
        "grpc://localhost:{port}?ca={}",
        files.cert.display()
    ))
    .await?;
    exchange(&format!("grpc://127.0.0.1:{port}?skip_verify=true")).await?;

    // Not trusted: the subscription fails with a clear error instead of hanging.
    let failed = timeout(WAIT, async {
        let backend = connect(&[format!("grpc://localhost:{port}")]).await?;
        let (handler, _rx) = ChannelHandler::new(1);
        backend
            .subscribe(&PrivateKey::generate(), Sender::Any, handler)
            .await
    })
    .await
    .expect("an answer, not a hang")
    .expect_err("untrusted certificate accepted");
    assert!(
        failed.to_string().contains("invalid peer certificate"),
        "{failed}"
    );
    // Plaintext against a TLS port fails too.
    let plain = connect(&[format!("grpc://127.0.0.1:{port}?insecure=true")]).await?;
    let (handler, _rx) = ChannelHandler::new(1);
    assert!(
        plain
            .subscribe(&PrivateKey::generate(), Sender::Any, handler)
            .await
            .is_err()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_ends_open_streams() -> Result<()> {
    let server = start(config()).await;
    let mut streams = Vec::new();
    for i in 0..20u8 {
        let mut s = client(&server)
            .await
            .subscribe(SubscribeParams { key: vec![i; 32] })
            .await?
            .into_inner();
        assert_eq!(s.message().await?, Some(Envelope::default()));
        streams.push(s);
    }
    assert_eq!(server.metrics().subscriptions.get(), 20);
    // A health watcher sees SERVING, then NOT_SERVING once shutdown starts.
    use tonic_health::pb::{
        HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
    };
    let channel = Channel::from_shared(format!("http://{}", server.local_addr()))?
        .connect()
        .await?;
    let mut health = HealthClient::new(channel)
        .watch(HealthCheckRequest {
            service: String::new(),
        })
        .await?
        .into_inner();
    let status = |m: Option<tonic_health::pb::HealthCheckResponse>| m.map(|m| m.status);
    assert_eq!(
        status(health.message().await?),
        Some(ServingStatus::Serving as i32)
    );
    let started = std::time::Instant::now();
    server.shutdown(Duration::from_secs(5)).await?;
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "shutdown took {:?}",
        started.elapsed()
    );
    assert_eq!(
        status(timeout(WAIT, health.message()).await??),
        Some(ServingStatus::NotServing as i32)
    );
    // Then the watch ends: it did not hold the shutdown up.
    assert!(
        !matches!(timeout(WAIT, health.message()).await?, Ok(Some(_))),
        "health watch went on after shutdown"
    );
    for mut s in streams {
        // Each stream ends (cleanly or with the connection); none hangs.
        let end = timeout(Duration::from_secs(2), s.message()).await?;
        assert!(
            !matches!(end, Ok(Some(_))),
            "stream delivered after shutdown"
        );
    }
    Ok(())
}

#[tokio::test]
async fn build_info_relays_health_reflection_and_metrics() -> Result<()> {
    let mut config = config();
    config.reflection = true;
    config.metrics_listen = Some(SocketAddr::from(([127, 0, 0, 1], 0)));
    config.relays = vec![
        "stun:stun.example.com:3478".parse::<Relay>()?,
        "turn:turn.example.com:3478?transport=udp&secret=s3cret&ttl=10m".parse()?,
    ];
    let server = start(config).await;
    let channel = Channel::from_shared(format!("http://{}", server.local_addr()))?
        .connect()
        .await?;

    let info = SignalingClient::new(channel.clone())
        .get_build_info(cunicu_signal::proto::Empty {})
        .await?
        .into_inner();
    assert_eq!(info.version, env!("CARGO_PKG_VERSION"));
    assert_eq!(info.os, std::env::consts::OS);
    assert_eq!(info.arch, std::env::consts::ARCH);
    assert!(info.date.is_some_and(|d| d.seconds > 1_600_000_000));

    let peer = PrivateKey::generate().public_key();
    let relays = RelayRegistryClient::new(channel.clone())
        .get_relays(GetRelaysParams {
            public_key: peer.as_bytes().to_vec(),
        })
        .await?
        .into_inner()
        .relays;
    assert_eq!(relays.len(), 2);
    assert_eq!(relays[0].url, "stun:stun.example.com:3478");
    assert_eq!(relays[1].url, "turn:turn.example.com:3478?transport=udp");
    assert!(relays[1].username.ends_with(&format!(":{peer}")));
    let status = RelayRegistryClient::new(channel.clone())
        .get_relays(GetRelaysParams {
            public_key: vec![1; 5],
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);

    use tonic_health::pb::{
        HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
    };
    for service in [
        "",
        "cunicu.signaling.Signaling",
        "cunicu.signaling.RelayRegistry",
    ] {
        let status = HealthClient::new(channel.clone())
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await?
            .into_inner()
            .status;
        assert_eq!(
            status,
            ServingStatus::Serving as i32,
            "health of {service:?}"
        );
    }

    use tonic_reflection::pb::v1::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
    };
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    // Without --reflection there is none.
    let plain = start(self::config()).await;
    let plain = Channel::from_shared(format!("http://{}", plain.local_addr()))?
        .connect()
        .await?;
    let status = ServerReflectionClient::new(plain)
        .server_reflection_info(futures::stream::iter([request.clone()]))
        .await
        .expect_err("no reflection by default");
    assert_eq!(status.code(), tonic::Code::Unimplemented, "{status:?}");
    let mut responses = ServerReflectionClient::new(channel.clone())
        .server_reflection_info(futures::stream::iter([request]))
        .await?
        .into_inner();
    let Some(MessageResponse::ListServicesResponse(list)) =
        responses.message().await?.and_then(|r| r.message_response)
    else {
        panic!("no service list");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for expected in [
        "cunicu.signaling.Signaling",
        "cunicu.signaling.RelayRegistry",
        "grpc.health.v1.Health",
    ] {
        assert!(
            names.iter().any(|n| n == expected),
            "{expected} missing from {names:?}"
        );
    }

    let metrics_addr = server.metrics_addr().context("metrics port")?;
    let body = http_get(metrics_addr, "/metrics").await?;
    for name in [
        "signaling_envelopes_published_total",
        "signaling_envelopes_delivered_total",
        "signaling_subscriptions",
        "signaling_topics",
        "signaling_rpc_duration_seconds_bucket{le=",
        "method=\"GetBuildInfo\"",
        "signaling_requests_rejected_total{reason=\"invalid_key\"} 1",
    ] {
        assert!(body.contains(name), "{name} missing from\n{body}");
    }
    assert!(http_get(metrics_addr, "/healthz").await?.ends_with("ok\n"));
    Ok(())
}

async fn http_get(addr: SocketAddr, path: &str) -> Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await?;
    let mut response = String::new();
    timeout(WAIT, stream.read_to_string(&mut response)).await??;
    anyhow::ensure!(response.starts_with("HTTP/1.1 200"), "{response}");
    Ok(response)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_is_down_at_subscribe_time_is_used_once_it_is_up() -> Result<()> {
    // A free port, with nothing listening yet (and none of the other tests'
    // servers, which take theirs from the ephemeral range).
    let port = common::unused_port();
    let url = format!("grpc://127.0.0.1:{port}?insecure=true");
    let (alice, bob) = (PrivateKey::generate(), PrivateKey::generate());
    let (handler, mut rx) = ChannelHandler::new(4);
    // Alone, the gRPC backend refuses the subscription with the reason.
    let alone = connect(&[&url]).await?;
    let err = alone
        .subscribe(&bob, Sender::Any, handler.clone())
        .await
        .expect_err("nothing listens");
    assert!(err.to_string().contains(&url), "{err}");
    // Together with another backend, the subscription stands and gRPC joins later.
    let receiver = connect(&[url.as_str(), "inprocess:"]).await?;
    assert!(receiver.subscribe(&bob, Sender::Any, handler).await?);

    let mut config = config();
    config.listen = SocketAddr::from(([127, 0, 0, 1], port));
    let server = start(config).await;
    timeout(WAIT, async {
        while server.metrics().subscriptions.get() < 1 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .context("the subscription never reached the server")?;
    // Only the multi backend's: the refused one stopped trying (it would be
    // back within a few hundred milliseconds otherwise). A retry that does not
    // happen has no event to wait for, and the client's backoff runs on real
    // time against a real socket: a wait longer than that backoff it is.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(server.metrics().subscriptions.get(), 1);
    let sender = connect(&[&url]).await?;
    let message = message_for(1, &alice.public_key(), &bob.public_key());
    sender
        .publish(&KeyPair::new(alice.clone(), bob.public_key()), &message)
        .await?;
    let got = timeout(WAIT, rx.recv()).await?.context("no message")?;
    assert_eq!(got.message, message);
    receiver.close().await?;
    sender.close().await?;
    alone.close().await?;
    timeout(WAIT, async {
        while server.metrics().subscriptions.get() > 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .context("subscriptions left behind")?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_stream_per_key_ended_by_the_last_unsubscribe() -> Result<()> {
    let server = start(config()).await;
    let backend = connect(&[url(&server)]).await?;
    let (bob, carol) = (PrivateKey::generate(), PrivateKey::generate());
    let metrics = server.metrics().clone();
    let gauge = || metrics.subscriptions.get();
    let wait_for = |n: i64| {
        let metrics = metrics.clone();
        async move {
            timeout(WAIT, async {
                while metrics.subscriptions.get() != n {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            })
            .await
        }
    };
    let (h1, _rx1) = ChannelHandler::new(1);
    let (h2, _rx2) = ChannelHandler::new(1);
    let (h3, _rx3) = ChannelHandler::new(1);
    let (h1, h2, h3): (
        Arc<dyn cunicu_signal::Handler>,
        Arc<dyn cunicu_signal::Handler>,
        Arc<dyn cunicu_signal::Handler>,
    ) = (h1, h2, h3);
    // Three handlers of Bob's key share one stream; Carol's key has its own.
    assert!(backend.subscribe(&bob, Sender::Any, h1.clone()).await?);
    assert!(
        !backend
            .subscribe(&bob, Sender::Key(carol.public_key()), h2.clone())
            .await?
    );
    assert!(backend.subscribe(&carol, Sender::Any, h3.clone()).await?);
    assert_eq!(gauge(), 2);
    assert!(backend.unsubscribe(&bob, Sender::Any, &h1).await?);
    // A stream ended by mistake would reach the server's gauge as a real
    // HTTP/2 reset, with no event of ours to wait for: give it that time.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(gauge(), 2, "Bob's stream ended while a handler was left");
    assert!(
        backend
            .unsubscribe(&bob, Sender::Key(carol.public_key()), &h2)
            .await?
    );
    wait_for(1)
        .await
        .context("Bob's stream did not end with his last handler")?;
    assert!(backend.unsubscribe(&carol, Sender::Any, &h3).await?);
    wait_for(0).await.context("Carol's stream did not end")?;
    backend.close().await?;
    Ok(())
}

/// At the cap of connections, a client that holds its fair share (here the
/// only client, holding all) is refused at once, not kept waiting; once one
/// closes, a new one is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_the_cap_are_refused_at_once() -> Result<()> {
    let mut config = config();
    config.max_connections = 2;
    let server = start(config).await;
    let mut first = client(&server).await;
    let second = client(&server).await;
    first.publish(raw_envelope([1; 32], 0)).await?;
    let mut second = second;
    second.publish(raw_envelope([1; 32], 1)).await?;
    let third = Channel::from_shared(format!("http://{}", server.local_addr()))?.connect_lazy();
    let mut third = SignalingClient::new(third);
    let refused = timeout(WAIT, third.publish(raw_envelope([1; 32], 2))).await?;
    assert!(refused.is_err(), "a third connection was served");
    assert_eq!(server.metrics().published.get(), 2);
    let text = server.metrics().encode();
    assert!(
        text.contains("signaling_connections_refused_total{reason=\"too_many_connections\"} 1\n"),
        "{text}"
    );
    drop(first);
    // Its slot is free once the server saw it go.
    timeout(WAIT, async {
        while server.metrics().connections.get() > 1 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await?;
    let mut fourth = client(&server).await;
    timeout(WAIT, fourth.publish(raw_envelope([1; 32], 3))).await??;
    assert_eq!(server.metrics().published.get(), 3);
    drop(second);
    Ok(())
}
