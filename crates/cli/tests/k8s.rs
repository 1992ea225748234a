//! `cunicu-signal publish/subscribe --backend k8s://...` against a real
//! kube-apiserver from `scripts/kube-test-env` (started by this test binary,
//! or the one named by `CUNICU_KUBE_TEST_ENV`), also as peers in a pod would
//! run (root: a mount namespace per process).

mod common;

use std::{path::Path, process::Command};

use common::{
    BIN, WAIT, assert_fails, assert_succeeds, json_lines, key_file, publish, publish_in,
    publish_marker_next, spawn_subscriber, spawn_subscriber_in, terminate,
};
use cunicu_signal::PrivateKey;
use cunicu_signal_test_support::kube_env;

#[test]
fn publish_and_subscribe_through_the_api_server() {
    let env = kube_env::shared();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let ns = runtime.block_on(async {
        tokio::time::timeout(WAIT, async {
            let admin = env.admin().await;
            kube_env::install_crd(&admin).await;
            kube_env::namespace(&admin, "cli").await
        })
        .await
        .expect("CRD and namespace within 30 s")
    });
    let url = env.url(&ns, "1m");
    let dir = tempfile::tempdir().unwrap();
    let (alice, bob) = (PrivateKey::generate(), PrivateKey::generate());
    let alice_file = key_file(dir.path(), "alice", &alice);
    let bob_file = key_file(dir.path(), "bob", &bob);

    let (mut subscriber, received) = spawn_subscriber(&url, &bob_file, Some(&alice.public_key()));
    let input = "{\"credentials\":{\"ufrag\":\"one\",\"pwd\":\"p\"}}\n{\"credentials\":{\"ufrag\":\"two\"}}\n";
    let out = publish(
        &url,
        &alice_file,
        &bob.public_key().to_string(),
        input.as_bytes(),
    );
    assert_succeeds(&out);
    let mut got = json_lines(&received, 2);
    got.sort_by_key(|v| v["message"]["credentials"]["ufrag"].to_string());
    assert_eq!(
        got[0],
        serde_json::json!({
            "sender": alice.public_key().to_string(),
            "recipient": bob.public_key().to_string(),
            "message": {"credentials": {"ufrag": "one", "pwd": "p"}},
        })
    );
    assert_eq!(
        got[1]["message"],
        serde_json::json!({"credentials": {"ufrag": "two"}})
    );
    // No third line: Alice's next message, published last, is the next line
    // (the watch delivers the objects in the order they were created).
    publish_marker_next(
        Command::new(BIN),
        &url,
        &alice_file,
        &bob.public_key().to_string(),
        &received,
        "three",
        "a third line",
    );
    let (status, _) = terminate(&mut subscriber.0);
    assert!(status.success(), "subscriber exit: {status}");
}

#[test]
fn k8s_errors_are_one_clear_line() {
    let dir = tempfile::tempdir().unwrap();
    let key = key_file(dir.path(), "k", &PrivateKey::generate());
    let to = PrivateKey::generate().public_key().to_string();
    for (url, needle) in [
        (
            "k8s:///no/such/kubeconfig".to_string(),
            "kubeconfig /no/such/kubeconfig",
        ),
        (
            "k8s:///x?namespace=Bad_Name".to_string(),
            "is not a DNS label",
        ),
        ("k8s:///x?ttl=later".to_string(), "is not a duration"),
    ] {
        // The line names the URL, so a failure shows which one.
        assert_fails(&publish(&url, &key, &to, b""), needle);
    }
}

/// Where kubelet mounts a pod's ServiceAccount (`/var/run` is `/run` here).
const SERVICE_ACCOUNT_DIR: &str = "/run/secrets/kubernetes.io/serviceaccount";

/// Runs the binary as in a pod: in a mount namespace of its own, with a tmpfs
/// on `/run` holding the ServiceAccount's files from `pod` where kubelet puts
/// them, `KUBERNETES_SERVICE_HOST` and `_PORT` set, and no kubeconfig.
fn in_pod(pod: &Path, home: &Path, api_server: &str) -> Command {
    let (host, port) = api_server
        .strip_prefix("https://")
        .and_then(|rest| rest.rsplit_once(':'))
        .unwrap_or_else(|| panic!("API server URL {api_server:?}"));
    let script = format!(
        "set -e; mount -t tmpfs -o size=1m,mode=0755 cunicu-pod /run; \
         mkdir -p {SERVICE_ACCOUNT_DIR}; \
         cp \"$0\"/token \"$0\"/ca.crt \"$0\"/namespace {SERVICE_ACCOUNT_DIR}/; \
         exec \"$@\""
    );
    let mut command = Command::new("unshare");
    command
        .args(["--mount", "--propagation", "private", "sh", "-c", &script])
        .arg(pod)
        .arg(BIN)
        .env_remove("KUBECONFIG")
        .env("HOME", home)
        .env("KUBERNETES_SERVICE_HOST", host)
        .env("KUBERNETES_SERVICE_PORT", port);
    command
}

#[test]
fn peers_in_a_pod_use_its_service_account() {
    let env = kube_env::shared();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let (ns, token) = runtime.block_on(async {
        tokio::time::timeout(WAIT, async {
            let admin = env.admin().await;
            kube_env::install_crd(&admin).await;
            let ns = kube_env::namespace(&admin, "pod").await;
            kube_env::apply_deploy(&admin, "rbac.yaml", Some(&ns)).await;
            let token = kube_env::service_account_token(&admin, &ns).await;
            (ns, token)
        })
        .await
        .expect("CRD, namespace, RBAC and token within 30 s")
    });
    let dir = tempfile::tempdir().unwrap();
    let (pod, home) = (dir.path().join("pod"), dir.path().join("home"));
    for d in [&pod, &home] {
        std::fs::create_dir(d).unwrap();
    }
    std::fs::write(pod.join("token"), &token).unwrap();
    std::fs::copy(env.ca(), pod.join("ca.crt")).unwrap();
    std::fs::write(pod.join("namespace"), &ns).unwrap();
    let server = env.server();
    let (alice, bob) = (PrivateKey::generate(), PrivateKey::generate());
    let alice_file = key_file(dir.path(), "alice", &alice);
    let bob_file = key_file(dir.path(), "bob", &bob);

    // `k8s:incluster` names the pod's ServiceAccount; `k8s://` finds it after
    // $KUBECONFIG and ~/.kube/config, which a pod does not have.
    let (mut subscriber, received) = spawn_subscriber_in(
        in_pod(&pod, &home, &server),
        &format!("k8s:incluster?namespace={ns}"),
        &bob_file,
        Some(&alice.public_key()),
    );
    let out = publish_in(
        in_pod(&pod, &home, &server),
        &format!("k8s://?namespace={ns}"),
        &alice_file,
        &bob.public_key().to_string(),
        b"{\"credentials\":{\"ufrag\":\"from-a-pod\",\"pwd\":\"p\"}}\n",
    );
    assert_succeeds(&out);
    assert_eq!(
        json_lines(&received, 1),
        [serde_json::json!({
            "sender": alice.public_key().to_string(),
            "recipient": bob.public_key().to_string(),
            "message": {"credentials": {"ufrag": "from-a-pod", "pwd": "p"}},
        })]
    );
    // No second line: Alice's next message, published last, is the next one.
    publish_marker_next(
        in_pod(&pod, &home, &server),
        &format!("k8s://?namespace={ns}"),
        &alice_file,
        &bob.public_key().to_string(),
        &received,
        "again",
        "a second line",
    );

    // The ServiceAccount has no rights beyond its namespace: one clear line.
    let out = publish_in(
        in_pod(&pod, &home, &server),
        "k8s:incluster?namespace=default",
        &alice_file,
        &bob.public_key().to_string(),
        b"{\"credentials\":{\"ufrag\":\"x\"}}\n",
    );
    assert_fails(&out, "not allowed to create");
    assert_fails(&out, "in namespace \"default\"");

    // Without the pod's files and variables, in-cluster fails and says so.
    let out = common::run(
        &[
            "publish",
            "--backend",
            "k8s:incluster",
            "--key-file",
            alice_file.to_str().unwrap(),
            "--to",
            &bob.public_key().to_string(),
        ],
        b"",
    );
    assert_fails(&out, "KUBERNETES_SERVICE_HOST");

    let (status, _) = terminate(&mut subscriber.0);
    assert!(status.success(), "subscriber exit: {status}");
}
