//! The k8s:// backend against a real kube-apiserver (and etcd), started by
//! `scripts/kube-test-env` (see `cunicu_signal_test_support::kube_env`):
//! nothing is mocked and nothing is skipped.

use std::{
    future::Future,
    pin::pin,
    sync::Arc,
    task::Poll,
    time::{Duration, Instant},
};

use cunicu_signal::{
    Backend, BackendError, ChannelHandler, Delivery, Handler, Key, KeyPair, PrivateKey, Registry,
    Sender, Transport as _,
    backend::{
        Multi, SignalingBackend, connect, connect_transport,
        k8s::{self, K8s, K8sError, K8sOptions, LABEL_RECIPIENT, LABEL_SENDER, SignalingEnvelope},
    },
    conformance::{Options, gated, message_for, run, subscribe_race},
    proto::{
        epdisc::Credentials,
        signaling::{BackendType, Envelope, Message},
    },
};
use cunicu_signal_test_support::kube_env::{
    self, KubeEnv, apply_deploy, install_crd, namespace, service_account_token, shared,
};
use futures::poll;
use k8s_openapi::api::{
    apps::v1::{Deployment, StatefulSet},
    core::v1::{ResourceQuota, Service},
    rbac::v1::{Role, RoleBinding},
};
use kube::{
    Api, Client,
    api::{ListParams, Patch, PatchParams, PostParams},
};
use tokio::sync::mpsc;

/// Limit of one step of a test.
const STEP: Duration = Duration::from_secs(30);

/// Awaits `future`, failing the test after `limit`.
async fn within<T>(what: &str, limit: Duration, future: impl Future<Output = T>) -> T {
    tokio::time::timeout(limit, future)
        .await
        .unwrap_or_else(|_| panic!("{what}: no result within {limit:?}"))
}

/// Waits until `counted` holds: an object can be gone from the API server
/// before the instance that deleted it has counted the answer.
async fn until_counted(what: &str, counted: impl Fn() -> bool) {
    within(what, STEP, async {
        while !counted() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
}

/// Short backoffs, so that the tests recover quickly.
fn fast() -> K8sOptions {
    K8sOptions::default()
        .with_backoff(Duration::from_millis(50), Duration::from_millis(500))
        .with_expiry_interval(Duration::from_millis(500))
}

/// A backend over a k8s transport of its own.
async fn backend(url: &str, options: K8sOptions) -> (Arc<SignalingBackend>, Arc<K8s>) {
    let registry = Registry::new();
    let url = url::Url::parse(url).unwrap();
    let transport = Arc::new(
        within(
            "connect",
            STEP,
            K8s::with_options(&url, registry.clone(), options),
        )
        .await
        .unwrap_or_else(|e| panic!("{e}")),
    );
    let backend = SignalingBackend::new(Box::new(transport.clone()), registry);
    (Arc::new(backend), transport)
}

fn credentials(ufrag: String) -> Message {
    Message {
        credentials: Some(Credentials {
            ufrag,
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn ufrag(d: &Delivery) -> String {
    d.message
        .credentials
        .as_ref()
        .map(|c| c.ufrag.clone())
        .unwrap_or_default()
}

/// Receives until `n` deliveries arrived, then checks for `quiet` that no more come.
///
/// A quiet spell rather than a later marker message: after a watch restarts,
/// the API server lists the objects in name order, not in creation order, so
/// a marker created later could come before a repeated delivery.
async fn receive(rx: &mut mpsc::Receiver<Delivery>, n: usize, quiet: Duration) -> Vec<Delivery> {
    let mut got = Vec::with_capacity(n);
    while got.len() < n {
        let d = within(
            &format!("delivery {} of {n}", got.len() + 1),
            STEP,
            rx.recv(),
        )
        .await
        .expect("handler channel open");
        got.push(d);
    }
    if let Ok(Some(extra)) = tokio::time::timeout(quiet, rx.recv()).await {
        panic!("more than {n} deliveries: {extra:?}");
    }
    got
}

/// The envelope objects in `ns`.
async fn objects(client: &Client, ns: &str) -> Vec<SignalingEnvelope> {
    within(
        "list",
        STEP,
        Api::<SignalingEnvelope>::namespaced(client.clone(), ns).list(&ListParams::default()),
    )
    .await
    .unwrap()
    .items
}

/// The error of a k8s transport behind `err`.
fn k8s_error(err: &BackendError) -> &K8sError {
    match err {
        BackendError::Transport { source, .. } => source
            .downcast_ref::<K8sError>()
            .unwrap_or_else(|| panic!("not a K8sError: {err:?}")),
        other => panic!("not a transport error: {other:?}"),
    }
}

// ------------------------------------------------------------------ CRD --

#[test]
fn deploy_crd_yaml_is_generated_from_the_type() {
    let generated = serde_saphyr::to_string(&k8s::crd()).unwrap();
    let path = kube_env::repo_root().join("deploy/crd.yaml");
    let file = std::fs::read_to_string(&path).unwrap();
    assert!(
        file == generated,
        "{} differs from the CRD of SignalingEnvelope: run \
         `cargo run -p cunicu-signal --example crd > deploy/crd.yaml`\n--- generated:\n{generated}",
        path.display()
    );
}

/// A change to an object's fields.
type Edit = fn(&mut SignalingEnvelope);

/// The CRD bounds each field (docs/PROTOCOL.md §10): the API server takes the largest
/// body and refuses anything longer, and objects whose fields are not what a
/// key, a nonce or base64 looks like.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_server_refuses_fields_beyond_their_bounds() {
    let env = shared();
    let admin = env.admin().await;
    within("install the CRD", STEP, install_crd(&admin)).await;
    let ns = within("namespace", STEP, namespace(&admin, "bounds")).await;
    let api: Api<SignalingEnvelope> = Api::namespaced(admin.clone(), &ns);
    let (a, b) = (PrivateKey::generate(), PrivateKey::generate());
    let envelope = credentials("x".into())
        .seal(&KeyPair::new(a.clone(), b.public_key()))
        .unwrap();
    let object = SignalingEnvelope::from_envelope(&envelope).unwrap();
    let create = |object: SignalingEnvelope| {
        let api = api.clone();
        async move { within("create", STEP, api.create(&PostParams::default(), &object)).await }
    };

    // The largest body the CRD allows is taken.
    let mut largest = object.clone();
    largest.spec.contents.body = "A".repeat(k8s::MAX_BODY_FIELD_LEN);
    create(largest).await.unwrap();

    let edits: [(&str, Edit); 6] = [
        ("contents.body", |o| {
            o.spec.contents.body = "A".repeat(k8s::MAX_BODY_FIELD_LEN + 4)
        }),
        ("contents.body", |o| {
            o.spec.contents.body = "not base64!".into()
        }),
        ("contents.nonce", |o| o.spec.contents.nonce.push_str("AAAA")),
        ("sender", |o| {
            o.spec.sender = format!("AAAA{}", o.spec.sender)
        }),
        ("recipient", |o| o.spec.recipient.truncate(40)),
        ("recipient", |o| {
            o.spec.recipient = o.spec.recipient.replace('=', "A")
        }),
    ];
    for (field, edit) in edits {
        let mut broken = object.clone();
        edit(&mut broken);
        match create(broken).await {
            Err(kube::Error::Api(status)) => {
                assert_eq!(status.code, 422, "{field}: {status:?}");
                assert!(
                    status.message.contains(field),
                    "{field}: {}",
                    status.message
                );
            }
            other => panic!("{field}: an object beyond the bounds was taken: {other:?}"),
        }
    }

    // Through the backend: a message whose body is beyond the bound fails to
    // send, with the API server's reason.
    let (publisher, publisher_t) = backend(&env.url(&ns, "1m"), fast()).await;
    let err = within(
        "publish",
        STEP,
        publisher.publish(
            &KeyPair::new(a.clone(), b.public_key()),
            &credentials("u".repeat(k8s::MAX_BODY_LEN)),
        ),
    )
    .await
    .unwrap_err();
    assert!(err.to_string().contains("contents.body"), "{err}");
    assert_eq!(publisher_t.stats().sent, 0);
    assert_eq!(objects(&admin, &ns).await.len(), 1);
    within("close", STEP, publisher.close()).await.unwrap();
}

/// `deploy/resourcequota.yaml` limits the envelope objects of its namespace,
/// and a publish beyond it fails with an error that says so. No quota
/// controller runs here (only kube-apiserver and etcd), so the test writes
/// the quota's status itself, as that controller would after counting all
/// but two of the allowed objects: the next two are taken, the third is not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_resource_quota_example_limits_the_envelope_count() {
    const COUNT: &str = "count/signalingenvelopes.cunicu.li";
    let env = shared();
    let admin = env.admin().await;
    within("install the CRD", STEP, install_crd(&admin)).await;
    let ns = within("namespace", STEP, namespace(&admin, "quota")).await;
    within(
        "apply resourcequota.yaml",
        STEP,
        apply_deploy(&admin, "resourcequota.yaml", Some(&ns)),
    )
    .await;
    let quotas: Api<ResourceQuota> = Api::namespaced(admin.clone(), &ns);
    let quota = within("the quota", STEP, quotas.get("cunicu-signal"))
        .await
        .unwrap();
    let hard = quota
        .spec
        .and_then(|s| s.hard)
        .and_then(|h| h.get(COUNT).cloned())
        .unwrap_or_else(|| panic!("resourcequota.yaml does not limit {COUNT}"));
    // The API server writes 2000 as "2k".
    let limit: u64 = match hard.0.strip_suffix('k') {
        Some(thousands) => thousands.parse::<u64>().unwrap() * 1000,
        None => hard.0.parse().unwrap(),
    };
    assert!(limit >= 100, "{}", hard.0);
    let status = serde_json::json!({"status": {
        "hard": {COUNT: limit.to_string()},
        "used": {COUNT: (limit - 2).to_string()},
    }});
    within(
        "the quota's status",
        STEP,
        quotas.patch_status(
            "cunicu-signal",
            &PatchParams::default(),
            &Patch::Merge(&status),
        ),
    )
    .await
    .unwrap();

    let (publisher, publisher_t) = backend(&env.url(&ns, "1m"), fast()).await;
    let (a, b) = (PrivateKey::generate(), PrivateKey::generate());
    let to_b = KeyPair::new(a.clone(), b.public_key());
    // The admission may see the new status a moment later.
    within("the first publish", STEP, async {
        while let Err(e) = publisher.publish(&to_b, &credentials("1".into())).await {
            eprintln!("publish failed, retrying: {e}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    within(
        "publish",
        STEP,
        publisher.publish(&to_b, &credentials("2".into())),
    )
    .await
    .unwrap();
    let err = within(
        "publish",
        STEP,
        publisher.publish(&to_b, &credentials("3".into())),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(k8s_error(&err), K8sError::QuotaExceeded { namespace, .. } if *namespace == ns),
        "{err:?}"
    );
    assert!(err.to_string().contains("ResourceQuota"), "{err}");
    assert_eq!(publisher_t.stats().sent, 2);
    assert_eq!(objects(&admin, &ns).await.len(), 2);
    within("close", STEP, publisher.close()).await.unwrap();
}

// ---------------------------------------------------------- conformance --

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_with_five_peers_each_with_its_own_backend() {
    let env = shared();
    let admin = env.admin().await;
    within("install the CRD", STEP, install_crd(&admin)).await;
    let ns = within("namespace", STEP, namespace(&admin, "conformance")).await;
    let url = env.url(&ns, "1m");
    let options = Options {
        peers: 5,
        timeout: Duration::from_secs(60),
        settle: Duration::from_secs(1),
    };
    within("conformance", Duration::from_secs(300), async {
        run(options, |_| {
            let url = url.clone();
            async move {
                let backend = connect(&[url]).await?;
                assert_eq!(backend.backend_type(), BackendType::K8s);
                Ok::<_, BackendError>(Arc::new(backend) as Arc<dyn Backend>)
            }
        })
        .await
    })
    .await;
    // Every object carries both labels, readable with kubectl.
    for object in objects(&admin, &ns).await {
        let labels = object.metadata.labels.unwrap_or_default();
        let recipient: Key = object.spec.recipient.parse().unwrap();
        let sender: Key = object.spec.sender.parse().unwrap();
        assert_eq!(labels[LABEL_RECIPIENT], recipient.to_base32());
        assert_eq!(labels[LABEL_SENDER], sender.to_base32());
    }
}

// ------------------------------------------------- deploy/, ServiceAccount --

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deploy_manifests_apply_and_a_service_account_peer_works() {
    let env = shared();
    let admin = env.admin().await;
    within("install the CRD", STEP, install_crd(&admin)).await;
    // namespace.yaml as it is; the rest into a namespace of this test.
    within(
        "apply namespace.yaml",
        STEP,
        apply_deploy(&admin, "namespace.yaml", None),
    )
    .await;
    let ns = within("namespace", STEP, namespace(&admin, "deploy")).await;
    // nats.yaml and cluster.yaml: NATS and three replicas of the server (the
    // chart, rendered); the API server validates both.
    for file in ["rbac.yaml", "nats.yaml", "cluster.yaml"] {
        within(file, STEP, apply_deploy(&admin, file, Some(&ns))).await;
    }
    let get = |what: &'static str, f: std::pin::Pin<Box<dyn Future<Output = bool> + Send>>| {
        within(what, STEP, f)
    };
    assert!(
        get(
            "role",
            Box::pin({
                let api = Api::<Role>::namespaced(admin.clone(), &ns);
                async move { api.get("cunicu-signal").await.is_ok() }
            })
        )
        .await
    );
    assert!(
        get(
            "rolebinding",
            Box::pin({
                let api = Api::<RoleBinding>::namespaced(admin.clone(), &ns);
                async move { api.get("cunicu-signal").await.is_ok() }
            })
        )
        .await
    );
    let deployment = within(
        "deployment",
        STEP,
        Api::<Deployment>::namespaced(admin.clone(), &ns).get("cunicu-signal"),
    )
    .await
    .unwrap();
    assert_eq!(deployment.spec.as_ref().and_then(|s| s.replicas), Some(3));
    let container = deployment
        .spec
        .and_then(|s| s.template.spec)
        .map(|s| s.containers[0].clone())
        .expect("a container");
    assert_eq!(container.args.unwrap_or_default(), ["serve"]);
    assert!(
        container
            .env
            .unwrap_or_default()
            .iter()
            .any(|e| e.name == "CUNICU_SIGNAL_CLUSTER"),
        "the replicas share NATS"
    );
    let nats = within(
        "NATS StatefulSet",
        STEP,
        Api::<StatefulSet>::namespaced(admin.clone(), &ns).get("cunicu-signal-nats"),
    )
    .await
    .unwrap();
    assert_eq!(nats.spec.and_then(|s| s.replicas), Some(3));
    within(
        "service",
        STEP,
        Api::<Service>::namespaced(admin.clone(), &ns).get("cunicu-signal"),
    )
    .await
    .unwrap();

    // Two peers that authenticate as the ServiceAccount, with tokens from the TokenRequest API.
    let dir = tempfile::tempdir().unwrap();
    let mut urls = Vec::new();
    for _ in 0..2 {
        let token = within("token", STEP, service_account_token(&admin, &ns)).await;
        let kubeconfig = env.kubeconfig_with_token(dir.path(), &token);
        urls.push(kube_env::url_for(&kubeconfig, &ns, "3s"));
    }
    let (alice, alice_t) = backend(&urls[0], fast()).await;
    let (bob, bob_t) = backend(&urls[1], fast()).await;
    let (a, b) = (PrivateKey::generate(), PrivateKey::generate());
    let (to_alice, mut alice_rx) = ChannelHandler::new(16);
    let (to_bob, mut bob_rx) = ChannelHandler::new(16);
    within(
        "alice subscribes",
        STEP,
        alice.subscribe(&a, Sender::Key(b.public_key()), to_alice),
    )
    .await
    .unwrap();
    within(
        "bob subscribes",
        STEP,
        bob.subscribe(&b, Sender::Key(a.public_key()), to_bob),
    )
    .await
    .unwrap();
    within(
        "alice publishes",
        STEP,
        alice.publish(
            &KeyPair::new(a.clone(), b.public_key()),
            &message_for(1, &a.public_key(), &b.public_key()),
        ),
    )
    .await
    .unwrap();
    within(
        "bob publishes",
        STEP,
        bob.publish(
            &KeyPair::new(b.clone(), a.public_key()),
            &message_for(1, &b.public_key(), &a.public_key()),
        ),
    )
    .await
    .unwrap();
    let at_bob = receive(&mut bob_rx, 1, Duration::from_millis(300)).await;
    assert_eq!(
        at_bob[0].message,
        message_for(1, &a.public_key(), &b.public_key())
    );
    let at_alice = receive(&mut alice_rx, 1, Duration::from_millis(300)).await;
    assert_eq!(at_alice[0].sender, b.public_key());

    // The ServiceAccount may delete: its peers expire their envelopes (ttl 3 s).
    within("expiry by the ServiceAccount", STEP, async {
        while !objects(&admin, &ns).await.is_empty() {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await;
    // Whichever instance looks first deletes both objects (each once).
    until_counted("both deletions", || {
        alice_t.stats().deleted + bob_t.stats().deleted >= 2
    })
    .await;
    assert_eq!(
        alice_t.stats().deleted + bob_t.stats().deleted,
        2,
        "{:?} {:?}",
        alice_t.stats(),
        bob_t.stats()
    );
    within("close", STEP, alice.close()).await.unwrap();
    within("close", STEP, bob.close()).await.unwrap();
}

// ------------------------------------------------------ clear errors --

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_namespace_without_rights_fails_at_once_with_a_clear_error() {
    let env = shared();
    let admin = env.admin().await;
    within("install the CRD", STEP, install_crd(&admin)).await;
    let home = within("namespace", STEP, namespace(&admin, "rights")).await;
    let elsewhere = within("namespace", STEP, namespace(&admin, "norights")).await;
    within(
        "apply rbac.yaml",
        STEP,
        apply_deploy(&admin, "rbac.yaml", Some(&home)),
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let token = within("token", STEP, service_account_token(&admin, &home)).await;
    let kubeconfig = env.kubeconfig_with_token(dir.path(), &token);
    // The ServiceAccount's token, used in a namespace where it has no Role.
    let url = kube_env::url_for(&kubeconfig, &elsewhere, "1m");
    let (peer, _) = backend(&url, fast()).await;
    let (a, b) = (PrivateKey::generate(), PrivateKey::generate());
    let (handler, _rx) = ChannelHandler::new(4);

    let started = Instant::now();
    let err = within(
        "subscribe",
        STEP,
        peer.subscribe(&a, Sender::Key(b.public_key()), handler.clone()),
    )
    .await
    .unwrap_err();
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
    let K8sError::Forbidden {
        verbs, namespace, ..
    } = k8s_error(&err)
    else {
        panic!("expected Forbidden, got {err:?}");
    };
    assert_eq!(verbs, "list, watch");
    assert_eq!(namespace, &elsewhere);
    let text = err.to_string();
    assert!(
        text.contains("not allowed to list, watch signalingenvelopes.cunicu.li")
            && text.contains(&elsewhere)
            && text.contains("deploy/rbac.yaml"),
        "{text}"
    );

    let err = within(
        "publish",
        STEP,
        peer.publish(
            &KeyPair::new(a.clone(), b.public_key()),
            &credentials("x".into()),
        ),
    )
    .await
    .unwrap_err();
    let K8sError::Forbidden { verbs, message, .. } = k8s_error(&err) else {
        panic!("expected Forbidden, got {err:?}");
    };
    assert_eq!(verbs, "create");
    assert!(message.contains("system:serviceaccount"), "{message}");

    // The same token works in its own namespace.
    let (ok, _) = backend(&kube_env::url_for(&kubeconfig, &home, "1m"), fast()).await;
    within(
        "subscribe at home",
        STEP,
        ok.subscribe(&a, Sender::Key(b.public_key()), handler),
    )
    .await
    .unwrap();
    within("close", STEP, ok.close()).await.unwrap();
    within("close", STEP, peer.close()).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_crd_fails_at_once_with_a_clear_error() {
    // An API server of its own, where the CRD was never installed.
    let env = KubeEnv::private("nocrd");
    let url = env.url("default", "1m");
    let (peer, transport) = backend(&url, fast()).await;
    let (a, b) = (PrivateKey::generate(), PrivateKey::generate());
    let (handler, _rx) = ChannelHandler::new(4);
    let started = Instant::now();
    let err = within(
        "subscribe",
        STEP,
        peer.subscribe(&a, Sender::Key(b.public_key()), handler),
    )
    .await
    .unwrap_err();
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
    assert!(
        matches!(k8s_error(&err), K8sError::CrdMissing { .. }),
        "{err:?}"
    );
    let text = err.to_string();
    assert!(
        text.contains("CRD signalingenvelopes.cunicu.li is not installed")
            && text.contains("kubectl apply -f deploy/crd.yaml"),
        "{text}"
    );
    let err = within(
        "publish",
        STEP,
        peer.publish(
            &KeyPair::new(a.clone(), b.public_key()),
            &credentials("x".into()),
        ),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(k8s_error(&err), K8sError::CrdMissing { .. }),
        "{err:?}"
    );
    // The key was forgotten: no watch was left behind to retry.
    assert!(
        transport.listening().is_empty(),
        "{:?}",
        transport.listening()
    );
    // A watch left retrying against the real API server would count an error
    // within this second; one that does not exist gives no event to wait for.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(transport.stats().watch_errors, 0);

    // Once the CRD is there, subscribing again works.
    let admin = env.admin().await;
    within("install the CRD", STEP, install_crd(&admin)).await;
    let (handler, mut rx) = ChannelHandler::new(4);
    within(
        "subscribe again",
        STEP,
        peer.subscribe(&a, Sender::Key(b.public_key()), handler),
    )
    .await
    .unwrap();
    within(
        "publish",
        STEP,
        peer.publish(
            &KeyPair::new(b.clone(), a.public_key()),
            &credentials("x".into()),
        ),
    )
    .await
    .unwrap();
    assert_eq!(
        ufrag(&receive(&mut rx, 1, Duration::from_millis(300)).await[0]),
        "x"
    );

    // A namespace that does not exist is named as such.
    let (lost, _) = backend(&env.url("no-such-namespace", "1m"), fast()).await;
    let err = within(
        "publish",
        STEP,
        lost.publish(
            &KeyPair::new(a.clone(), b.public_key()),
            &credentials("x".into()),
        ),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(k8s_error(&err), K8sError::NamespaceMissing { namespace, .. } if namespace == "no-such-namespace"),
        "{err:?}"
    );
    within("close", STEP, peer.close()).await.unwrap();
}

// -------------------------------------------- what is (not) delivered --

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn existing_objects_are_not_replayed_and_expired_ones_disappear() {
    let env = shared();
    let admin = env.admin().await;
    within("install the CRD", STEP, install_crd(&admin)).await;
    let ns = within("namespace", STEP, namespace(&admin, "expiry")).await;
    let url = env.url(&ns, "6s");
    let (a, b, c) = (
        PrivateKey::generate(),
        PrivateKey::generate(),
        PrivateKey::generate(),
    );
    let to_b = KeyPair::new(a.clone(), b.public_key());

    // Sent before anyone listens: an object that waits.
    let (sender, sender_t) = backend(&url, fast()).await;
    within(
        "publish",
        STEP,
        sender.publish(&to_b, &credentials("early".into())),
    )
    .await
    .unwrap();
    assert_eq!(objects(&admin, &ns).await.len(), 1);

    // Subscribing later does not replay it. (Objects created up to CLOCK_SKEW
    // before the subscription, plus the one-second resolution of their
    // timestamps, count as sent after it: the API server stamps them with its
    // wall clock, so only real time moves the subscription past them.)
    tokio::time::sleep(k8s::CLOCK_SKEW + Duration::from_millis(1500)).await;
    let (receiver, receiver_t) = backend(&url, fast()).await;
    let (handler, mut rx) = ChannelHandler::new(16);
    within(
        "subscribe",
        STEP,
        receiver.subscribe(&b, Sender::Any, handler),
    )
    .await
    .unwrap();
    within(
        "publish",
        STEP,
        sender.publish(&to_b, &credentials("late".into())),
    )
    .await
    .unwrap();
    let got = receive(&mut rx, 1, Duration::from_millis(500)).await;
    assert_eq!(ufrag(&got[0]), "late");
    assert_eq!(receiver_t.stats().stale, 1, "{:?}", receiver_t.stats());

    // The sender stops: the recipient's instance alone deletes both objects
    // addressed to it once they are older than the ttl (6 s).
    within("sender closes", STEP, sender.close()).await.unwrap();
    assert_eq!(objects(&admin, &ns).await.len(), 2);
    let started = Instant::now();
    wait_until_empty(&admin, &ns).await;
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "took {:?}",
        started.elapsed()
    );
    until_counted("the receiver's deletions", || {
        receiver_t.stats().deleted >= 2
    })
    .await;
    assert_eq!(receiver_t.stats().deleted, 2, "{:?}", receiver_t.stats());
    assert_eq!(sender_t.stats().deleted, 0, "{:?}", sender_t.stats());

    // The recipient stops; an envelope to a key nobody listens on is deleted
    // by its sender's instance alone.
    within("receiver closes", STEP, receiver.close())
        .await
        .unwrap();
    let (sender, sender_t) = backend(&url, fast()).await;
    within(
        "publish",
        STEP,
        sender.publish(
            &KeyPair::new(a.clone(), c.public_key()),
            &credentials("lost".into()),
        ),
    )
    .await
    .unwrap();
    wait_until_empty(&admin, &ns).await;
    until_counted("the sender's deletion", || sender_t.stats().deleted >= 1).await;
    assert_eq!(sender_t.stats().deleted, 1, "{:?}", sender_t.stats());
    assert!(rx.try_recv().is_err(), "a delivery after close");
    within("close", STEP, sender.close()).await.unwrap();
}

/// Objects older than twice the ttl are deleted by any running instance,
/// whoever sent them and whoever they are for, also objects without our
/// labels (docs/PROTOCOL.md §10); younger ones of others are left alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn any_instance_deletes_objects_older_than_twice_the_ttl() {
    const TTL: Duration = Duration::from_secs(3);
    let env = shared();
    let admin = env.admin().await;
    within("install the CRD", STEP, install_crd(&admin)).await;
    let ns = within("namespace", STEP, namespace(&admin, "abandoned")).await;
    let api: Api<SignalingEnvelope> = Api::namespaced(admin.clone(), &ns);
    // Objects of peers that are gone: created by the administrator, between
    // keys no instance knows; one without labels, as cunīcu's Go peers make them.
    let create = |unlabelled: bool| {
        let api = api.clone();
        async move {
            let (a, b) = (PrivateKey::generate(), PrivateKey::generate());
            let envelope = credentials("gone".into())
                .seal(&KeyPair::new(a.clone(), b.public_key()))
                .unwrap();
            let mut object = SignalingEnvelope::from_envelope(&envelope).unwrap();
            if unlabelled {
                object.metadata.labels = None;
            }
            let created = within("create", STEP, api.create(&PostParams::default(), &object))
                .await
                .unwrap();
            created.metadata.name.unwrap()
        }
    };
    let started = Instant::now();
    let old = [create(false).await, create(true).await];
    // A bystander: it sends nothing and listens on nothing.
    let (bystander, bystander_t) = backend(&env.url(&ns, "3s"), fast()).await;
    // Expiry goes by the creation times the API server stamps with its wall
    // clock: real time has to pass before the young object is made.
    tokio::time::sleep(TTL + Duration::from_secs(1)).await;
    let young = create(false).await;

    let names = || async {
        let mut names: Vec<String> = objects(&admin, &ns)
            .await
            .into_iter()
            .filter_map(|o| o.metadata.name)
            .collect();
        names.sort();
        names
    };
    within("the old objects go", STEP, async {
        while names().await.iter().any(|n| old.contains(n)) {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    // Not before twice the ttl (less the one-second resolution of creation times).
    let gone_after = started.elapsed();
    assert!(
        gone_after >= TTL * 2 - Duration::from_secs(1),
        "{gone_after:?}"
    );
    assert_eq!(
        names().await,
        vec![young.clone()],
        "the young object went too"
    );
    until_counted("the bystander's deletions", || {
        bystander_t.stats().deleted >= 2
    })
    .await;
    within("the young object goes", STEP, async {
        while !names().await.is_empty() {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    until_counted("the bystander's deletions", || {
        bystander_t.stats().deleted >= 3
    })
    .await;
    let stats = bystander_t.stats();
    assert_eq!(
        (stats.deleted, stats.deleted_abandoned),
        (3, 3),
        "{stats:?}"
    );
    within("close", STEP, bystander.close()).await.unwrap();
}

/// Waits until no envelope object is left in `ns`.
async fn wait_until_empty(admin: &Client, ns: &str) {
    within("expiry", STEP, async {
        while !objects(admin, ns).await.is_empty() {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_keys_restart_the_watch_without_losing_or_repeating() {
    let env = shared();
    let admin = env.admin().await;
    within("install the CRD", STEP, install_crd(&admin)).await;
    let ns = within("namespace", STEP, namespace(&admin, "selector")).await;
    let url = env.url(&ns, "1m");
    let (publisher, _) = backend(&url, fast()).await;
    let (receiver, receiver_t) = backend(&url, fast()).await;
    let sender = PrivateKey::generate();
    let first = PrivateKey::generate();
    let (handler, mut rx) = ChannelHandler::new(1024);
    within(
        "subscribe",
        STEP,
        receiver.subscribe(&first, Sender::Any, handler.clone()),
    )
    .await
    .unwrap();

    // While messages flow to the first key, four more keys are subscribed: each
    // restarts the one watch with a new selector.
    const MESSAGES: usize = 40;
    let flow = {
        let publisher = publisher.clone();
        let to = KeyPair::new(sender.clone(), first.public_key());
        tokio::spawn(async move {
            for i in 0..MESSAGES {
                publisher
                    .publish(&to, &credentials(format!("m{i}")))
                    .await
                    .unwrap();
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
        })
    };
    let mut others = Vec::new();
    for _ in 0..4 {
        let key = PrivateKey::generate();
        within(
            "subscribe another key",
            STEP,
            receiver.subscribe(&key, Sender::Any, handler.clone()),
        )
        .await
        .unwrap();
        others.push(key);
    }
    within("publisher", STEP, flow).await.unwrap();
    let got = receive(&mut rx, MESSAGES, Duration::from_secs(1)).await;
    let mut seen: Vec<String> = got.iter().map(ufrag).collect();
    seen.sort();
    seen.dedup();
    assert_eq!(seen.len(), MESSAGES, "duplicates");
    assert_eq!(
        receiver.registry().stats().dropped_duplicate,
        0,
        "the transport handed an envelope over twice"
    );

    // The new keys receive too; unsubscribing one restarts the watch again.
    for key in &others {
        within(
            "publish",
            STEP,
            publisher.publish(
                &KeyPair::new(sender.clone(), key.public_key()),
                &credentials("k".into()),
            ),
        )
        .await
        .unwrap();
    }
    receive(&mut rx, others.len(), Duration::from_millis(300)).await;
    let handler: Arc<dyn Handler> = handler;
    within(
        "unsubscribe",
        STEP,
        receiver.unsubscribe(&others[0], Sender::Any, &handler),
    )
    .await
    .unwrap();
    within(
        "publish",
        STEP,
        publisher.publish(
            &KeyPair::new(sender.clone(), first.public_key()),
            &credentials("after".into()),
        ),
    )
    .await
    .unwrap();
    let got = receive(&mut rx, 1, Duration::from_millis(500)).await;
    assert_eq!(ufrag(&got[0]), "after");
    assert_eq!(receiver.registry().stats().dropped_duplicate, 0);
    assert_eq!(receiver_t.stats().invalid, 0);
    within("close", STEP, receiver.close()).await.unwrap();
    within("close", STEP, publisher.close()).await.unwrap();
}

// ------------------------------------------------ API server restart --

/// Sends `envelope`, retrying while the API server is away. A retry sends the
/// same envelope (same nonce) again.
async fn send_until_accepted(publisher: &SignalingBackend, envelope: &Envelope) {
    within("publish with retries", Duration::from_secs(120), async {
        while let Err(e) = publisher.transport().send(envelope).await {
            eprintln!("publish failed, retrying: {e}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivery_resumes_after_an_api_server_restart_without_loss_or_duplicates() {
    let env = KubeEnv::private("restart");
    let admin = env.admin().await;
    within("install the CRD", STEP, install_crd(&admin)).await;
    let url = env.url("default", "1m");
    let (publisher, _) = backend(&url, fast()).await;
    let (receiver, receiver_t) = backend(&url, fast()).await;
    let (a, b) = (PrivateKey::generate(), PrivateKey::generate());
    let (handler, mut rx) = ChannelHandler::new(1024);
    within(
        "subscribe",
        STEP,
        receiver.subscribe(&b, Sender::Key(a.public_key()), handler),
    )
    .await
    .unwrap();
    let to_b = KeyPair::new(a.clone(), b.public_key());
    let envelope = |i: usize| credentials(format!("m{i}")).seal(&to_b).unwrap();

    for i in 0..10 {
        send_until_accepted(&publisher, &envelope(i)).await;
    }
    let mut got = receive(&mut rx, 10, Duration::from_millis(200)).await;

    // The API server goes away (etcd keeps the objects). Meanwhile five
    // messages wait in the publisher's retries; they are created as soon as it
    // is back, while the receiver's watch is still away or reconnecting.
    tokio::task::block_in_place(|| env.stop_apiserver());
    let waiting = tokio::spawn({
        let publisher = publisher.clone();
        let envelopes: Vec<Envelope> = (10..15).map(envelope).collect();
        async move {
            for e in &envelopes {
                send_until_accepted(&publisher, e).await;
            }
        }
    });
    // Publishing cannot succeed while the API server is down, and there is no
    // event for a publish that did not happen: a second of real retries.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        !waiting.is_finished(),
        "published while the API server was down"
    );
    tokio::task::block_in_place(|| env.start_apiserver());
    within("the waiting messages", Duration::from_secs(120), waiting)
        .await
        .unwrap();
    for i in 15..20 {
        send_until_accepted(&publisher, &envelope(i)).await;
    }
    got.extend(receive(&mut rx, 10, Duration::from_secs(2)).await);

    let mut all: Vec<String> = got.iter().map(ufrag).collect();
    all.sort();
    all.dedup();
    assert_eq!(all.len(), 20, "lost or repeated: {all:?}");
    let stats = receiver_t.stats();
    assert!(
        stats.watch_errors >= 1,
        "the watch never noticed: {stats:?}"
    );
    assert_eq!(stats.handed_over, 20, "{stats:?}");
    // The restarted API server answers the old resource version with 410 Gone:
    // the watch lists again and skips the ten objects it had delivered by UID.
    assert!(stats.seen_again >= 10, "no relist: {stats:?}");
    assert_eq!(
        receiver.registry().stats().dropped_duplicate,
        0,
        "the transport handed an envelope over twice: {stats:?}"
    );
    eprintln!("after the restart: {stats:?}");
    within("close", STEP, receiver.close()).await.unwrap();
    within("close", STEP, publisher.close()).await.unwrap();
}

// ------------------------------------- subscriptions that are starting --

/// Publishes `tag` from `from` to `to`.
async fn send_to(publisher: &SignalingBackend, from: &PrivateKey, to: &PrivateKey, tag: String) {
    within(
        "publish",
        STEP,
        publisher.publish(
            &KeyPair::new(from.clone(), to.public_key()),
            &credentials(tag),
        ),
    )
    .await
    .unwrap();
}

/// The distinct ufrags of `got`, which must hold no duplicates.
fn distinct(got: &[Delivery]) -> Vec<String> {
    let mut all: Vec<String> = got.iter().map(ufrag).collect();
    all.sort();
    let n = all.len();
    all.dedup();
    assert_eq!(all.len(), n, "delivered twice: {all:?}");
    all
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envelopes_sent_while_a_subscription_starts_arrive_exactly_once() {
    let env = shared();
    let admin = env.admin().await;
    within("install the CRD", STEP, install_crd(&admin)).await;
    let ns = within("namespace", STEP, namespace(&admin, "starting")).await;
    let url = env.url(&ns, "1m");
    let (publisher, _) = backend(&url, fast()).await;
    let sender = PrivateKey::generate();

    // The handler first, then listen. Five envelopes are created after listen
    // was called and before its first list (the first poll of a fresh
    // transport's listen waits for the access review): they are delivered,
    // not taken for objects that existed before.
    let (receiver, receiver_t) = backend(&url, fast()).await;
    let b = PrivateKey::generate();
    let (handler, mut rx) = ChannelHandler::new(64);
    receiver.registry().add(&b, Sender::Any, handler.clone());
    {
        let mut listen = pin!(receiver_t.listen(b.public_key()));
        assert!(poll!(listen.as_mut()).is_pending());
        for i in 0..5 {
            send_to(&publisher, &sender, &b, format!("early{i}")).await;
        }
        within("listen", STEP, listen).await.unwrap();
    }
    for i in 0..5 {
        send_to(&publisher, &sender, &b, format!("late{i}")).await;
    }
    let got = receive(&mut rx, 10, Duration::from_millis(500)).await;
    assert_eq!(distinct(&got).len(), 10);
    let stats = receiver_t.stats();
    assert_eq!((stats.caught_up, stats.stale), (5, 0), "{stats:?}");

    // Through subscribe, with publishers racing the subscription.
    let d = PrivateKey::generate();
    let (to_d, mut d_rx) = ChannelHandler::new(256);
    let subscribe = tokio::spawn({
        let (receiver, d) = (receiver.clone(), d.clone());
        async move { receiver.subscribe(&d, Sender::Any, to_d).await }
    });
    let publishers: Vec<_> = (0..4)
        .map(|p| {
            let publisher = publisher.clone();
            let (sender, d) = (sender.clone(), d.clone());
            tokio::spawn(async move {
                for i in 0..5 {
                    send_to(&publisher, &sender, &d, format!("p{p}m{i}")).await;
                }
            })
        })
        .collect();
    within("subscribe", STEP, subscribe).await.unwrap().unwrap();
    for p in publishers {
        within("publisher", STEP, p).await.unwrap();
    }
    let got = receive(&mut d_rx, 20, Duration::from_secs(1)).await;
    assert_eq!(distinct(&got).len(), 20);
    assert_eq!(receiver.registry().stats().dropped_duplicate, 0);
    eprintln!("racing subscribe: {:?}", receiver_t.stats());
    within("close", STEP, receiver.close()).await.unwrap();
    within("close", STEP, publisher.close()).await.unwrap();
}

/// An envelope that arrives once the watch lists, while subscribe has not
/// returned, and one sent right after it returned are delivered once each; a
/// subscribe dropped midway unlistens its key (`conformance::subscribe_race`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envelopes_racing_subscribe_arrive_once() {
    let env = shared();
    let admin = env.admin().await;
    within("install the CRD", STEP, install_crd(&admin)).await;
    let ns = within("namespace", STEP, namespace(&admin, "race")).await;
    let url = env.url(&ns, "1m");
    let registry = Registry::new();
    let medium = Arc::new(
        within(
            "connect",
            STEP,
            K8s::with_options(&url::Url::parse(&url).unwrap(), registry.clone(), fast()),
        )
        .await
        .unwrap(),
    );
    let (transport, gate) = gated(medium.clone());
    let backend = Arc::new(SignalingBackend::new(Box::new(transport), registry));
    let (publisher, _) = self::backend(&url, fast()).await;
    let options = Options {
        timeout: STEP,
        settle: Duration::from_millis(500),
        ..Options::default()
    };
    subscribe_race(backend, gate, publisher.clone(), &options).await;
    let stats = medium.stats();
    // Each envelope handed over once (restarts of the watch for c's key
    // relist b's objects: seen again, not handed over again).
    assert_eq!((stats.handed_over, stats.stale), (3, 0), "{stats:?}");
    within("close", STEP, publisher.close()).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listen_that_failed_or_was_dropped_is_retried_until_unlisten() {
    let env = KubeEnv::private("retry");
    let admin = env.admin().await;
    within("install the CRD", STEP, install_crd(&admin)).await;
    let url = env.url("default", "1m");
    // A multi backend: k8s and inprocess over one registry.
    let registry = Registry::new();
    let k8s_t = Arc::new(
        within(
            "connect",
            STEP,
            K8s::with_options(&url::Url::parse(&url).unwrap(), registry.clone(), fast()),
        )
        .await
        .unwrap(),
    );
    let inprocess = connect_transport("inprocess:", registry.clone())
        .await
        .unwrap();
    let receiver = SignalingBackend::new(
        Box::new(Multi::new(vec![Box::new(k8s_t.clone()), inprocess])),
        registry.clone(),
    );
    let (publisher, _) = backend(&url, fast()).await;
    let [a, b, c, d, e, f] = [(); 6].map(|_| PrivateKey::generate());
    let (handler, mut rx) = ChannelHandler::new(64);

    // The API server is away while b subscribes: the multi backend's
    // subscribe succeeds through inprocess; k8s's listen failed and retries.
    tokio::task::block_in_place(|| env.stop_apiserver());
    within(
        "subscribe",
        STEP,
        receiver.subscribe(&b, Sender::Any, handler.clone()),
    )
    .await
    .unwrap();
    for key in [&c, &d, &e, &f] {
        registry.add(key, Sender::Any, handler.clone());
    }
    // A transient error is returned, and the key stays wanted.
    let err = within("listen", STEP, k8s_t.listen(c.public_key()))
        .await
        .unwrap_err();
    assert!(!k8s_error(&err).is_definitive(), "{err:?}");
    // A listen dropped midway, once it has made its key wanted: it stays wanted.
    {
        let mut listen = pin!(k8s_t.listen(d.public_key()));
        within("the listen of d", STEP, async {
            loop {
                match poll!(listen.as_mut()) {
                    Poll::Ready(result) => {
                        assert!(result.is_err(), "listened while the API server was away");
                        break;
                    }
                    Poll::Pending if k8s_t.listening().contains(&d.public_key()) => break,
                    Poll::Pending => tokio::time::sleep(Duration::from_millis(1)).await,
                }
            }
        })
        .await;
    }
    let wanted = k8s_t.listening();
    for key in [&b, &c, &d] {
        assert!(wanted.contains(&key.public_key()), "{:?} not wanted", key);
    }

    // Back: the watch lists without another listen, and what is sent now arrives once.
    tokio::task::block_in_place(|| env.start_apiserver());
    for key in [&b, &c, &d] {
        send_until_accepted(
            &publisher,
            &credentials(format!("to {}", key.public_key()))
                .seal(&KeyPair::new(a.clone(), key.public_key()))
                .unwrap(),
        )
        .await;
    }
    let got = receive(&mut rx, 3, Duration::from_millis(500)).await;
    assert_eq!(distinct(&got).len(), 3);
    assert!(got.iter().all(|d| d.sender == a.public_key()));

    // A later listen of a key that failed works; unlisten stops its retries.
    within("listen again", STEP, k8s_t.listen(c.public_key()))
        .await
        .unwrap();
    within("unlisten", STEP, k8s_t.unlisten(d.public_key()))
        .await
        .unwrap();
    assert!(!k8s_t.listening().contains(&d.public_key()));
    send_to(&publisher, &a, &d, "unlistened".into()).await;

    // A listen dropped before it changed anything (on its access review):
    // the key is not wanted, and listening again works.
    {
        let mut listen = pin!(k8s_t.listen(e.public_key()));
        assert!(poll!(listen.as_mut()).is_pending());
    }
    assert!(!k8s_t.listening().contains(&e.public_key()));
    within("listen", STEP, k8s_t.listen(e.public_key()))
        .await
        .unwrap();
    // A listen dropped while it waits for its first list: listening again works.
    {
        let mut listen = pin!(k8s_t.listen(f.public_key()));
        assert!(poll!(listen.as_mut()).is_pending());
    }
    within("listen", STEP, k8s_t.listen(f.public_key()))
        .await
        .unwrap();
    for key in [&e, &f] {
        send_to(&publisher, &a, key, format!("to {}", key.public_key())).await;
    }
    let got = receive(&mut rx, 2, Duration::from_millis(500)).await;
    assert_eq!(distinct(&got).len(), 2);
    let mut recipients: Vec<Key> = got.iter().map(|d| d.recipient).collect();
    recipients.sort_by_key(|k| k.to_string());
    let mut expected = vec![e.public_key(), f.public_key()];
    expected.sort_by_key(|k| k.to_string());
    assert_eq!(recipients, expected);
    assert_eq!(registry.stats().dropped_duplicate, 0);
    eprintln!("after the retries: {:?}", k8s_t.stats());
    within("close", STEP, receiver.close()).await.unwrap();
    within("close", STEP, publisher.close()).await.unwrap();
}
