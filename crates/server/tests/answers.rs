//! Answers a client can act on: every refusal by a rate says when to come
//! back (`grpc-retry-pushback-ms`), and a Publish that asks learns how many
//! subscription streams got its envelope (`cunicu-recipients`).

mod common;

use std::{
    net::SocketAddr,
    num::NonZeroU32,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use common::WAIT;
use cunicu_signal::{
    Backend, ChannelHandler, KeyPair, PrivateKey, Registry, Sender,
    backend::{
        SignalingBackend,
        grpc::{
            Grpc, GrpcError, GrpcOptions, PUSHBACK_METADATA, RECIPIENTS_ASK, RECIPIENTS_METADATA,
        },
    },
    proto::signaling::{
        EncryptedMessage, Envelope, SubscribeParams, signaling_client::SignalingClient,
    },
};
use cunicu_signal_server::{AuthMode, Config, Rate, Server};
use tokio::time::timeout;
use tonic::{Code, Request, Status, Streaming, transport::Channel};

fn config() -> Config {
    let mut config = Config::default();
    config.listen = SocketAddr::from(([127, 0, 0, 1], 0));
    config
}

fn rate(per_second: u32, burst: u32) -> Rate {
    Rate {
        per_second: NonZeroU32::new(per_second).expect("not 0"),
        burst: NonZeroU32::new(burst).expect("not 0"),
    }
}

async fn start(config: Config) -> Server {
    Server::spawn(config).await.expect("server starts")
}

async fn client(server: &Server) -> SignalingClient<Channel> {
    let channel = Channel::from_shared(format!("http://{}", server.local_addr()))
        .expect("uri")
        .connect()
        .await
        .expect("connects");
    SignalingClient::new(channel)
}

fn envelope(recipient: [u8; 32], size: usize) -> Envelope {
    Envelope {
        sender: vec![7; 32],
        recipient: recipient.to_vec(),
        contents: Some(EncryptedMessage {
            body: vec![1; size],
            nonce: vec![0; 24],
        }),
    }
}

/// The pushback of a refusal: RESOURCE_EXHAUSTED and at least 1 ms.
fn pushback_of(status: &Status) -> Duration {
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    let ms: u64 = status
        .metadata()
        .get(PUSHBACK_METADATA)
        .unwrap_or_else(|| panic!("no {PUSHBACK_METADATA} in {status:?}"))
        .to_str()
        .expect("ASCII")
        .parse()
        .expect("milliseconds");
    assert!(ms >= 1, "{ms}");
    Duration::from_millis(ms)
}

/// Publishes until the server refuses; returns that refusal.
async fn publish_until_refused(c: &mut SignalingClient<Channel>, size: usize) -> Status {
    for _ in 0..10_000 {
        if let Err(status) = c.publish(envelope([1; 32], size)).await {
            return status;
        }
    }
    panic!("never refused");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_refusal_by_a_rate_says_when_to_come_back_and_that_is_enough() -> Result<()> {
    // Publishes per second.
    let mut config = config();
    config.publish_rate = rate(5, 5);
    let (_, refused, wait) = refused_then_served(config, 10).await?;
    assert!(
        refused.message().contains("envelopes per second"),
        "{refused:?}"
    );
    assert!(wait <= Duration::from_millis(201), "{wait:?}");

    // Published bytes per second: a second 60 000-byte envelope must wait.
    let mut config = self::config();
    config.publish_bytes_rate = rate(100_000, 100_000);
    let (_, refused, wait) = refused_then_served(config, 60_000).await?;
    assert!(
        refused.message().contains("bytes per second"),
        "{refused:?}"
    );
    assert!(wait <= Duration::from_millis(601), "{wait:?}");

    // Requests (streams) per second: answered, not reset, with a pushback.
    let mut config = self::config();
    config.request_rate = rate(5, 5);
    let (server, refused, _) = refused_then_served(config, 10).await?;
    assert!(refused.message().contains("requests faster"), "{refused:?}");
    let metrics = server.metrics().encode();
    assert!(
        metrics.contains("signaling_requests_rejected_total{reason=\"request_rate\"} 1"),
        "{metrics}"
    );
    Ok(())
}

/// A server with `config`, published to with envelopes of `size` bytes until
/// it refuses; after waiting the refusal's pushback, the next publish is
/// served. Returns the server, the refusal and its pushback.
async fn refused_then_served(config: Config, size: usize) -> Result<(Server, Status, Duration)> {
    let server = start(config).await;
    let mut c = client(&server).await;
    let refused = publish_until_refused(&mut c, size).await;
    let wait = pushback_of(&refused);
    tokio::time::sleep(wait).await;
    c.publish(envelope([1; 32], size))
        .await
        .context("after waiting the pushback")?;
    Ok((server, refused, wait))
}

/// A backend over our grpc:// medium, with its counters at hand.
fn grpc_backend(server: &Server, options: GrpcOptions) -> (SignalingBackend, Arc<Grpc>) {
    let url = url::Url::parse(&format!(
        "grpc://127.0.0.1:{}?insecure=true",
        server.local_addr().port()
    ))
    .expect("url");
    let registry = Registry::new();
    let grpc = Arc::new(Grpc::with_options(&url, registry.clone(), options).expect("grpc"));
    (
        SignalingBackend::new(Box::new(grpc.clone()), registry),
        grpc,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_library_waits_out_a_refusal_once_and_says_rate_limited_only_after_trying() -> Result<()>
{
    let mut config = config();
    config.publish_rate = rate(2, 2);
    let server = start(config).await;
    let (backend, grpc) = grpc_backend(&server, GrpcOptions::default());
    let pair = KeyPair::new(PrivateKey::generate(), PrivateKey::generate().public_key());
    let message = cunicu_signal::proto::signaling::Message::default();
    for n in 0..3 {
        backend
            .publish(&pair, &message)
            .await
            .with_context(|| format!("publish {n}"))?;
    }
    // The third waited the server's pushback once and then got through:
    // one refusal, one retry.
    let stats = grpc.stats();
    assert_eq!(stats.rate_limited_retries, 1, "{stats:?}");
    assert!(stats.rate_limited_wait > Duration::ZERO, "{stats:?}");
    assert!(
        stats.rate_limited_wait <= Duration::from_millis(501),
        "{stats:?}"
    );
    let metrics = server.metrics().encode();
    assert!(
        metrics.contains("signaling_requests_rejected_total{reason=\"publish_rate\"} 1\n"),
        "{metrics}"
    );
    backend.close().await?;

    // A pushback beyond the publish's deadline: no retry, and an error that
    // says why.
    let mut config = self::config();
    config.publish_rate = rate(1, 1);
    let server = start(config).await;
    let mut options = GrpcOptions::default();
    options.publish_timeout = Duration::from_millis(300);
    let (backend, grpc) = grpc_backend(&server, options);
    backend.publish(&pair, &message).await?;
    let err = backend.publish(&pair, &message).await.unwrap_err();
    assert!(err.to_string().contains("rate limited"), "{err}");
    assert!(matches!(
        err.medium::<GrpcError>(),
        Some(GrpcError::RateLimited { retries: 0, .. })
    ));
    assert!(err.is_transient());
    assert_eq!(grpc.stats().rate_limited_retries, 0);
    backend.close().await?;
    Ok(())
}

/// A raw Publish that asks for the count; returns it (None if not given).
async fn publish_asking(c: &mut SignalingClient<Channel>, key: [u8; 32]) -> Option<u32> {
    let mut request = Request::new(envelope(key, 10));
    request
        .metadata_mut()
        .insert(RECIPIENTS_METADATA, RECIPIENTS_ASK.parse().expect("ascii"));
    let response = c.publish(request).await.expect("published");
    response
        .metadata()
        .get(RECIPIENTS_METADATA)
        .map(|v| v.to_str().expect("ascii").parse().expect("a count"))
}

/// A subscription stream of `key`, once the server confirmed it.
async fn subscribe(server: &Server, key: [u8; 32]) -> Streaming<Envelope> {
    let mut c = client(server).await;
    let mut stream = c
        .subscribe(SubscribeParams { key: key.to_vec() })
        .await
        .expect("subscribed")
        .into_inner();
    let sync = timeout(WAIT, stream.message()).await.expect("in time");
    assert_eq!(sync.expect("ok"), Some(Envelope::default()));
    stream
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recipient_counts_are_exact_on_one_server() -> Result<()> {
    let server = start(config()).await;
    let mut c = client(&server).await;
    let key = [3; 32];
    assert_eq!(publish_asking(&mut c, key).await, Some(0));
    let mut streams = Vec::new();
    for n in 1..=3 {
        streams.push(subscribe(&server, key).await);
        assert_eq!(publish_asking(&mut c, key).await, Some(n));
    }
    // Another key's subscribers do not count.
    let _other = subscribe(&server, [4; 32]).await;
    assert_eq!(publish_asking(&mut c, key).await, Some(3));
    // A publish that does not ask gets no count.
    let response = c.publish(envelope(key, 10)).await?;
    assert!(response.metadata().get(RECIPIENTS_METADATA).is_none());

    drop(streams);
    let gone = Instant::now();
    loop {
        if publish_asking(&mut c, key).await == Some(0) {
            break;
        }
        assert!(
            gone.elapsed() < Duration::from_secs(1),
            "still counted {:?} after the last unsubscribe",
            gone.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    // The library returns what the server said.
    let backend = cunicu_signal::backend::connect(&[format!(
        "grpc://127.0.0.1:{}?insecure=true",
        server.local_addr().port()
    )])
    .await?;
    let (alice, bob) = (PrivateKey::generate(), PrivateKey::generate());
    let message = cunicu_signal::proto::signaling::Message::default();
    let to_bob = KeyPair::new(alice.clone(), bob.public_key());
    assert_eq!(
        backend.publish(&to_bob, &message).await?.recipients,
        Some(0)
    );
    let (handler, mut rx) = ChannelHandler::new(4);
    backend
        .subscribe(&bob, Sender::Key(alice.public_key()), handler)
        .await?;
    assert_eq!(
        backend.publish(&to_bob, &message).await?.recipients,
        Some(1)
    );
    timeout(WAIT, rx.recv()).await?.context("delivered")?;
    backend.close().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recipients_off_answers_nothing_and_proven_senders_get_counts() -> Result<()> {
    let mut config = config();
    config.recipients = false;
    let server = start(config).await;
    let mut c = client(&server).await;
    let _stream = subscribe(&server, [5; 32]).await;
    assert_eq!(publish_asking(&mut c, [5; 32]).await, None);

    // With proofs required, the library's proven publishes get counts.
    let mut config = self::config();
    config.key = Some(PrivateKey::generate());
    config.auth = AuthMode::Required;
    let server = start(config).await;
    let url = format!(
        "grpc://127.0.0.1:{}?insecure=true",
        server.local_addr().port()
    );
    let backend = cunicu_signal::backend::connect(&[url]).await?;
    let (alice, bob) = (PrivateKey::generate(), PrivateKey::generate());
    let (handler, _rx) = ChannelHandler::new(4);
    backend
        .subscribe(&bob, Sender::Key(alice.public_key()), handler)
        .await?;
    let message = cunicu_signal::proto::signaling::Message::default();
    let published = backend
        .publish(&KeyPair::new(alice.clone(), bob.public_key()), &message)
        .await?;
    assert_eq!(published.recipients, Some(1));
    // Unproven, it is refused before anything is counted.
    let mut c = client(&server).await;
    let mut request = Request::new(envelope(bob.public_key().as_bytes().to_owned(), 10));
    request
        .metadata_mut()
        .insert(RECIPIENTS_METADATA, RECIPIENTS_ASK.parse().expect("ascii"));
    let refused = c.publish(request).await.unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated);
    assert!(refused.metadata().get(RECIPIENTS_METADATA).is_none());
    backend.close().await?;
    Ok(())
}
