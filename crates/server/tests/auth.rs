//! Proof of key possession (docs/PROTOCOL.md §11) through a real server on loopback:
//! every way a proof can be wrong is refused, our grpc:// backend proves
//! what it must unchanged, and the allowed keys follow their file.

mod common;

use std::{
    net::SocketAddr,
    path::Path,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::Result;
use common::{WAIT, exchange};
use cunicu_signal::{
    Backend, ChannelHandler, Key, PrivateKey, Sender,
    auth::{PROOF_METADATA, SERVER_KEY_METADATA, prove},
    backend::{connect, grpc::GrpcError},
    proto::{
        Empty,
        signaling::{
            EncryptedMessage, Envelope, GetRelaysParams, SubscribeParams,
            relay_registry_client::RelayRegistryClient, signaling_client::SignalingClient,
        },
    },
};
use cunicu_signal_server::{AuthMode, Config, Server};
use tokio::time::timeout;
use tonic::{Code, Request, metadata::MetadataValue, transport::Channel};

use cunicu_signal::proto::method::{GET_RELAYS, PUBLISH, SUBSCRIBE};

struct Fixture {
    server: Server,
    key: PrivateKey,
}

async fn start(auth: AuthMode, allow_keys: Option<&Path>) -> Fixture {
    let key = PrivateKey::generate();
    let mut config = Config::default();
    config.listen = SocketAddr::from(([127, 0, 0, 1], 0));
    config.key = Some(key.clone());
    config.auth = auth;
    config.allow_keys = allow_keys.map(Path::to_path_buf);
    config.relays = vec!["stun:stun.example.net:3478".parse().expect("relay")];
    Fixture {
        server: Server::spawn(config).await.expect("server starts"),
        key,
    }
}

impl Fixture {
    fn url(&self) -> String {
        format!(
            "grpc://127.0.0.1:{}?insecure=true",
            self.server.local_addr().port()
        )
    }

    async fn channel(&self) -> Channel {
        Channel::from_shared(format!("http://{}", self.server.local_addr()))
            .expect("uri")
            .connect()
            .await
            .expect("connects")
    }

    fn public(&self) -> Key {
        self.key.public_key()
    }

    async fn metric(&self, result: &str) -> String {
        let text = self.server.metrics().encode();
        let name = format!("signaling_auth_total{{result=\"{result}\"}} ");
        text.lines()
            .find_map(|l| l.strip_prefix(&name))
            .unwrap_or("0")
            .to_string()
    }
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("after 1970")
        .as_secs()
}

fn with_proof<T>(message: T, proof: Option<&[u8]>) -> Request<T> {
    let mut request = Request::new(message);
    if let Some(proof) = proof {
        request
            .metadata_mut()
            .insert_bin(PROOF_METADATA, MetadataValue::from_bytes(proof));
    }
    request
}

fn envelope(sender: &Key, recipient: [u8; 32]) -> Envelope {
    Envelope {
        sender: sender.as_bytes().to_vec(),
        recipient: recipient.to_vec(),
        contents: Some(EncryptedMessage {
            body: vec![1; 40],
            nonce: vec![2; 24],
        }),
    }
}

/// Subscribe with `proof` on key `key`; the status it ends with (OK once the
/// sync envelope came).
async fn subscribe_status(channel: &Channel, key: &Key, proof: Option<&[u8]>) -> Code {
    let mut client = SignalingClient::new(channel.clone());
    let request = with_proof(
        SubscribeParams {
            key: key.as_bytes().to_vec(),
        },
        proof,
    );
    match timeout(WAIT, client.subscribe(request))
        .await
        .expect("answered")
    {
        Ok(response) => {
            let mut stream = response.into_inner();
            match timeout(WAIT, stream.message()).await.expect("sync") {
                Ok(Some(_)) => Code::Ok,
                Ok(None) => Code::Unknown,
                Err(status) => status.code(),
            }
        }
        Err(status) => status.code(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_call_needs_a_proof_of_its_key_and_every_bad_proof_is_refused() -> Result<()> {
    let f = start(AuthMode::Required, None).await;
    let channel = f.channel().await;
    let client = PrivateKey::generate();
    let public = client.public_key();

    // The server names its key with every call, GetBuildInfo included.
    let info = SignalingClient::new(channel.clone())
        .get_build_info(Empty {})
        .await?;
    assert_eq!(
        info.metadata()
            .get(SERVER_KEY_METADATA)
            .map(|v| v.to_str().unwrap().to_string()),
        Some(f.public().to_string())
    );

    // Without a proof: UNAUTHENTICATED, saying why.
    let status = SignalingClient::new(channel.clone())
        .subscribe(SubscribeParams {
            key: public.as_bytes().to_vec(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    assert!(
        status.message().contains("cunicu-auth-bin"),
        "{}",
        status.message()
    );
    let status = SignalingClient::new(channel.clone())
        .publish(envelope(&public, [7; 32]))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    let status = RelayRegistryClient::new(channel.clone())
        .get_relays(GetRelaysParams {
            public_key: public.as_bytes().to_vec(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);

    // A good one is accepted, once.
    let good = prove(&client, &f.public(), SUBSCRIBE, now())?;
    assert_eq!(
        subscribe_status(&channel, &public, Some(&good)).await,
        Code::Ok
    );
    assert_eq!(
        subscribe_status(&channel, &public, Some(&good)).await,
        Code::Unauthenticated
    );

    // Each way to be wrong.
    let other = PrivateKey::generate();
    let cases: [(&str, Vec<u8>, Key); 6] = [
        (
            "another key",
            prove(&other, &f.public(), SUBSCRIBE, now())?,
            public,
        ),
        (
            "too old",
            prove(&client, &f.public(), SUBSCRIBE, now() - 120)?,
            public,
        ),
        (
            "too new",
            prove(&client, &f.public(), SUBSCRIBE, now() + 120)?,
            public,
        ),
        (
            "another method",
            prove(&client, &f.public(), PUBLISH, now())?,
            public,
        ),
        (
            "another server",
            prove(
                &client,
                &PrivateKey::generate().public_key(),
                SUBSCRIBE,
                now(),
            )?,
            public,
        ),
        ("garbage", vec![0xab; 10], public),
    ];
    for (what, proof, key) in cases {
        assert_eq!(
            subscribe_status(&channel, &key, Some(&proof)).await,
            Code::Unauthenticated,
            "{what}"
        );
    }
    // A low-order key, in the call and in the proof: nobody can hold it.
    let mut low = prove(&client, &f.public(), SUBSCRIBE, now())?;
    low[..32].fill(0);
    let code = subscribe_status(&channel, &Key::from([0; 32]), Some(&low)).await;
    assert!(
        matches!(code, Code::Unauthenticated | Code::InvalidArgument),
        "{code:?}"
    );
    // A field of the wrong length is INVALID_ARGUMENT before any proof.
    let status = SignalingClient::new(channel.clone())
        .subscribe(SubscribeParams { key: vec![1; 31] })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);

    // Publish proves the sender; GetRelays its key.
    let proof = prove(&client, &f.public(), PUBLISH, now())?;
    SignalingClient::new(channel.clone())
        .publish(with_proof(envelope(&public, [7; 32]), Some(&proof)))
        .await?;
    let proof = prove(&other, &f.public(), PUBLISH, now())?;
    let status = SignalingClient::new(channel.clone())
        .publish(with_proof(envelope(&public, [7; 32]), Some(&proof)))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    let proof = prove(&client, &f.public(), GET_RELAYS, now())?;
    let relays = RelayRegistryClient::new(channel.clone())
        .get_relays(with_proof(
            GetRelaysParams {
                public_key: public.as_bytes().to_vec(),
            },
            Some(&proof),
        ))
        .await?
        .into_inner();
    assert_eq!(relays.relays.len(), 1);

    for (result, count) in [
        ("ok", "3"),
        ("missing", "3"),
        ("replayed", "1"),
        ("wrong_key", "2"),
        ("expired", "2"),
        ("bad_box", "2"),
        ("malformed", "1"),
        ("low_order", "1"),
    ] {
        assert_eq!(f.metric(result).await, count, "{result}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn our_backend_proves_its_keys_learned_or_pinned() -> Result<()> {
    let f = start(AuthMode::Required, None).await;
    // Learned from GetBuildInfo.
    exchange(&f.url()).await?;
    // Pinned, percent-encoded; a `+` read as a space is read back.
    let key = f.public().to_string();
    let encoded = key
        .replace('+', "%2B")
        .replace('/', "%2F")
        .replace('=', "%3D");
    exchange(&format!("{}&server_key={encoded}", f.url())).await?;
    exchange(&format!(
        "{}&server_key={}",
        f.url(),
        key.replace('/', "%2F")
    ))
    .await?;
    // Pinned to another key: refused, naming both.
    let wrong = PrivateKey::generate().public_key().to_string();
    let backend = connect(&[format!(
        "{}&server_key={}",
        f.url(),
        wrong
            .replace('+', "%2B")
            .replace('/', "%2F")
            .replace('=', "%3D")
    )])
    .await?;
    let (handler, _rx) = ChannelHandler::new(1);
    let err = timeout(
        WAIT,
        backend.subscribe(&PrivateKey::generate(), Sender::Any, handler),
    )
    .await?
    .unwrap_err();
    // Typed: a caller can tell that retrying will not help.
    assert!(
        matches!(
            err.medium::<GrpcError>(),
            Some(GrpcError::OtherServerKey { pinned, presented })
                if pinned.to_string() == wrong && *presented == Some(f.public())
        ),
        "{err:?}"
    );
    assert!(!err.is_transient(), "{err}");
    let err = err.to_string();
    assert!(err.contains(&key) && err.contains(&wrong), "{err}");
    // Relays for our key, proven.
    let ours = PrivateKey::generate();
    let relays = cunicu_signal_session::relays_from_server(&f.url(), &ours, WAIT).await?;
    assert_eq!(relays.len(), 1);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_auth_off_no_proof_is_needed_and_a_bad_one_is_only_counted() -> Result<()> {
    let f = start(AuthMode::Off, None).await;
    let channel = f.channel().await;
    let client = PrivateKey::generate();
    assert_eq!(
        subscribe_status(&channel, &client.public_key(), None).await,
        Code::Ok
    );
    let proof = prove(&PrivateKey::generate(), &f.public(), SUBSCRIBE, now())?;
    assert_eq!(
        subscribe_status(&channel, &client.public_key(), Some(&proof)).await,
        Code::Ok
    );
    assert_eq!(f.metric("wrong_key").await, "1");
    assert_eq!(f.metric("missing").await, "0");
    exchange(&f.url()).await?;
    // Without a key file there is no server key at all.
    let mut config = Config::default();
    config.listen = SocketAddr::from(([127, 0, 0, 1], 0));
    let keyless = Server::spawn(config).await?;
    let channel = Channel::from_shared(format!("http://{}", keyless.local_addr()))?
        .connect()
        .await?;
    let info = SignalingClient::new(channel)
        .get_build_info(Empty {})
        .await?;
    assert!(info.metadata().get(SERVER_KEY_METADATA).is_none());
    exchange(&format!(
        "grpc://127.0.0.1:{}?insecure=true",
        keyless.local_addr().port()
    ))
    .await?;
    Ok(())
}

/// Waits until `check` holds, polling.
async fn eventually(what: &str, mut check: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !check().await {
        assert!(Instant::now() < deadline, "{what}: not within {WAIT:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_allowed_keys_follow_their_file() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("allowed");
    let (alice, bob) = (PrivateKey::generate(), PrivateKey::generate());
    std::fs::write(&path, format!("# peers\n{}  # alice\n", alice.public_key()))?;
    let f = start(AuthMode::Required, Some(&path)).await;
    let channel = f.channel().await;
    let proof = |key: &PrivateKey| prove(key, &f.public(), SUBSCRIBE, now()).expect("proof");

    // Alice is listed: her stream opens. Bob is proven but not listed.
    let mut client = SignalingClient::new(channel.clone());
    let mut alices = client
        .subscribe(with_proof(
            SubscribeParams {
                key: alice.public_key().as_bytes().to_vec(),
            },
            Some(&proof(&alice)),
        ))
        .await?
        .into_inner();
    assert_eq!(alices.message().await?, Some(Envelope::default()));
    assert_eq!(
        subscribe_status(&channel, &bob.public_key(), Some(&proof(&bob))).await,
        Code::PermissionDenied
    );

    // Bob added (the file replaced by a rename): admitted without a restart.
    let next = dir.path().join("allowed.new");
    std::fs::write(
        &next,
        format!("{}\n{}\n", alice.public_key(), bob.public_key()),
    )?;
    std::fs::rename(&next, &path)?;
    let started = Instant::now();
    eventually("bob admitted", async || {
        subscribe_status(&channel, &bob.public_key(), Some(&proof(&bob))).await == Code::Ok
    })
    .await;
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );

    // A file that does not parse keeps the list as it was.
    std::fs::write(&path, "not a key\n")?;
    // The server looks at the file every 500 ms and a refused file changes
    // nothing it shows: wait for three looks (real time: the watcher runs
    // beside a real gRPC server, so time cannot be paused).
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        subscribe_status(&channel, &bob.public_key(), Some(&proof(&bob))).await,
        Code::Ok
    );

    // Alice removed (edited in place): her open stream ends, PERMISSION_DENIED.
    std::fs::write(&path, format!("{}\n", bob.public_key()))?;
    let end = timeout(WAIT, alices.message()).await?;
    assert_eq!(end.unwrap_err().code(), Code::PermissionDenied);
    assert_eq!(
        subscribe_status(&channel, &alice.public_key(), Some(&proof(&alice))).await,
        Code::PermissionDenied
    );
    let text = f.server.metrics().encode();
    assert!(
        text.contains("signaling_subscribers_cut_total{reason=\"not_allowed\"} 1"),
        "{text}"
    );
    Ok(())
}

/// An allow-keys file rewritten in place: truncated, then written again with
/// the same keys 1.2 s later (as an editor or a `>` redirection may). Before,
/// the reload saw an empty file, cut the allowed subscriber and refused its
/// publishes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_allow_list_read_while_it_is_written_cuts_nobody() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("allowed");
    let alice = PrivateKey::generate();
    let list = format!("{}\n", alice.public_key());
    std::fs::write(&path, &list)?;
    let f = start(AuthMode::Required, Some(&path)).await;
    let channel = f.channel().await;
    let mut client = SignalingClient::new(channel.clone());
    let key = alice.public_key();
    let mut stream = client
        .subscribe(with_proof(
            SubscribeParams {
                key: key.as_bytes().to_vec(),
            },
            Some(&prove(&alice, &f.public(), SUBSCRIBE, now())?),
        ))
        .await?
        .into_inner();
    assert_eq!(stream.message().await?, Some(Envelope::default()));
    // Truncated; the keys come back 1.2 s later. Alice publishes to herself
    // every 100 ms throughout, and for a while after.
    std::fs::File::create(&path)?;
    let rewrite = {
        let (path, list) = (path.clone(), list.clone());
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(1200)).await;
            std::fs::write(&path, list)
        })
    };
    let mut sent = 0u32;
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(3) {
        let proof = prove(&alice, &f.public(), PUBLISH, now())?;
        client
            .publish(with_proof(envelope(&key, *key.as_bytes()), Some(&proof)))
            .await
            .map_err(|status| anyhow::anyhow!("publish {sent} refused: {status:?}"))?;
        sent += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    rewrite.await??;
    for n in 0..sent {
        let got = timeout(WAIT, stream.message())
            .await?
            .map_err(|status| anyhow::anyhow!("stream ended after {n} of {sent}: {status:?}"))?;
        assert_eq!(got, Some(envelope(&key, *key.as_bytes())), "envelope {n}");
    }
    // Nobody was cut (the counter exists from the start, at 0).
    let text = f.server.metrics().encode();
    assert!(
        text.contains("signaling_subscribers_cut_total{reason=\"not_allowed\"} 0\n"),
        "{text}"
    );
    Ok(())
}

#[tokio::test]
async fn settings_that_cannot_work_are_refused() {
    let mut config = Config::default();
    config.listen = SocketAddr::from(([127, 0, 0, 1], 0));
    config.auth = AuthMode::Required;
    let err = Server::spawn(config.clone())
        .await
        .err()
        .map(|e| e.to_string());
    assert_eq!(
        err.as_deref(),
        Some("--auth required needs the server's key (--key-file)")
    );
    config.key = Some(PrivateKey::generate());
    config.allow_keys = Some("/nonexistent/allowed".into());
    let err = Server::spawn(config.clone())
        .await
        .err()
        .map(|e| e.to_string());
    assert!(
        err.as_deref()
            .is_some_and(|e| e.contains("/nonexistent/allowed")),
        "{err:?}"
    );
    config.auth = AuthMode::Off;
    let err = Server::spawn(config).await.err().map(|e| e.to_string());
    assert_eq!(err.as_deref(), Some("--allow-keys needs --auth required"));
}

/// A backend that subscribes many keys at once learns the server's key
/// once: a GetBuildInfo per key would run into the server's limit on such
/// calls from one client (16 at once) and fail subscriptions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_keys_subscribed_at_once_learn_the_server_key_once() -> Result<()> {
    let f = start(AuthMode::Required, None).await;
    let backend = connect(&[f.url()]).await?;
    let peer = PrivateKey::generate().public_key();
    let (handler, _rx) = ChannelHandler::new(1);
    let keys: Vec<PrivateKey> = (0..100).map(|_| PrivateKey::generate()).collect();
    let subscribed = futures::future::join_all(
        keys.iter()
            .map(|key| backend.subscribe(key, Sender::Key(peer), handler.clone())),
    );
    let results = timeout(WAIT, subscribed).await?;
    let failed: Vec<String> = results
        .into_iter()
        .filter_map(|r| r.err().map(|e| e.to_string()))
        .collect();
    assert!(
        failed.is_empty(),
        "{} failed, first: {}",
        failed.len(),
        failed[0]
    );
    assert_eq!(f.metric("ok").await, "100");
    backend.close().await?;
    Ok(())
}

/// The server's configuration, printed for a log or an error report, shows
/// the public key of the server's key, never the private key.
#[test]
fn the_config_in_debug_form_does_not_show_the_private_key() {
    let key = PrivateKey::generate();
    let mut config = Config::default();
    config.key = Some(key.clone());
    let shown = format!("{config:?} {config:#?}");
    assert!(!shown.contains(key.secret_base64().as_str()), "{shown}");
    let bytes = format!("{:?}", key.secret_bytes());
    assert!(!shown.contains(&bytes), "{shown}");
    assert!(shown.contains(&key.public_key().to_string()), "{shown}");
}
