//! `cunicu-signal publish/subscribe --backend k8s://...` against a real
//! kube-apiserver from `scripts/kube-test-env` (started by this test binary,
//! or the one named by `CUNICU_KUBE_TEST_ENV`).

mod common;
#[path = "../../signal/tests/common/kube_env.rs"]
mod kube_env;

use std::time::Duration;

use common::{WAIT, key_file, publish, spawn_subscriber, terminate};
use cunicu_signal::Key;

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
    let (alice, bob) = (Key::generate(), Key::generate());
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
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut got: Vec<serde_json::Value> = (0..2)
        .map(|_| serde_json::from_str(&received.recv_timeout(WAIT).expect("a line")).unwrap())
        .collect();
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
    assert!(
        received.recv_timeout(Duration::from_millis(500)).is_err(),
        "a third line"
    );
    let (status, _) = terminate(&mut subscriber.0);
    assert!(status.success(), "subscriber exit: {status}");
}

#[test]
fn k8s_errors_are_one_clear_line() {
    let dir = tempfile::tempdir().unwrap();
    let key = key_file(dir.path(), "k", &Key::generate());
    let to = Key::generate().public_key().to_string();
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
        let out = publish(&url, &key, &to, b"");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{url}: succeeded");
        assert_eq!(stderr.trim_end().lines().count(), 1, "{url}: {stderr}");
        assert!(stderr.contains(needle), "{url}: {needle:?} not in {stderr}");
    }
}
