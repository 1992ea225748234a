//! `multicast://` through the CLI: two hosts (network namespaces joined by a
//! veth pair) exchange messages both ways, and several backends at once
//! (gRPC and multicast) deliver through whichever reaches the peer.
//! Everything runs inside namespaces these tests create (root).

mod common;

use std::{path::Path, process::Stdio, time::Duration};

use common::{BIN, assert_succeeds, key_file};
use cunicu_signal::{Key, PrivateKey};
use cunicu_signal_test_support::netns::{Netns, Veth};
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines},
    process::{Child, ChildStderr, ChildStdout},
    time::timeout,
};

const WAIT: Duration = Duration::from_secs(20);

/// A port for this test process, so that parallel runs do not hear each other.
fn port(offset: u16) -> u16 {
    20000 + (std::process::id() % 20000) as u16 + offset
}

struct Subscriber {
    child: Child,
    stdout: Lines<BufReader<ChildStdout>>,
    _stderr: Lines<BufReader<ChildStderr>>,
}

impl Subscriber {
    async fn start(ns: &Netns, backends: &[String], key_file: &Path) -> Self {
        let mut command = ns.command(BIN);
        command.args(["subscribe", "--key-file"]).arg(key_file);
        for b in backends {
            command.args(["--backend", b]);
        }
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn subscribe");
        let mut stderr = BufReader::new(child.stderr.take().unwrap()).lines();
        timeout(WAIT, async {
            while let Some(line) = stderr.next_line().await.unwrap() {
                if line.contains("subscribed as") {
                    return;
                }
                eprintln!("subscriber: {line}");
            }
            panic!("subscriber exited before subscribing");
        })
        .await
        .expect("subscriber ready");
        let stdout = BufReader::new(child.stdout.take().unwrap()).lines();
        Subscriber {
            child,
            stdout,
            _stderr: stderr,
        }
    }

    async fn next(&mut self) -> serde_json::Value {
        let line = timeout(WAIT, self.stdout.next_line())
            .await
            .expect("a message within the time limit")
            .unwrap()
            .expect("subscriber still running");
        serde_json::from_str(&line).unwrap()
    }

    /// The next message has the ufrag `marker`: nothing else came before it.
    /// The markers are published after whatever must not arrive, and one
    /// medium delivers in order, so this checks that nothing else arrived
    /// without waiting for a quiet spell.
    async fn next_is(&mut self, marker: &str) {
        let got = self.next().await;
        assert_eq!(ufrag(&got), marker, "before the marker {marker:?}: {got}");
    }

    async fn stop(mut self) {
        let pid = self.child.id().expect("running").to_string();
        let status = std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap();
        assert!(status.success());
        let exit = timeout(WAIT, self.child.wait()).await.unwrap().unwrap();
        assert!(exit.success(), "subscriber exited with {exit}");
    }
}

async fn publish(
    ns: &Netns,
    backends: &[String],
    key_file: &Path,
    to: &Key,
    input: &str,
) -> std::process::Output {
    let mut command = ns.command(BIN);
    command
        .args(["publish", "--key-file"])
        .arg(key_file)
        .args(["--to", &to.to_string()]);
    for b in backends {
        command.args(["--backend", b]);
    }
    let mut child = command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn publish");
    let mut stdin = child.stdin.take().unwrap();
    let _ = stdin.write_all(input.as_bytes()).await;
    drop(stdin);
    timeout(WAIT, child.wait_with_output())
        .await
        .expect("publish exits")
        .unwrap()
}

fn ufrag(value: &serde_json::Value) -> &str {
    value["message"]["credentials"]["ufrag"]
        .as_str()
        .unwrap_or("")
}

#[tokio::test]
async fn two_hosts_on_a_veth_lan_exchange_messages_both_ways() {
    let (a, b) = (Netns::new("mca").unwrap(), Netns::new("mcb").unwrap());
    let veth = Veth::link(&a, &b).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (alice, bob) = (PrivateKey::generate(), PrivateKey::generate());
    let (alice_file, bob_file) = (
        key_file(dir.path(), "alice", &alice),
        key_file(dir.path(), "bob", &bob),
    );
    let group = format!("239.77.{}.{}", port(0) % 250, port(0) % 200);
    let url = |interface: &str| {
        vec![format!(
            "multicast://{group}:{}?interface={interface}",
            port(1)
        )]
    };
    let (url_a, url_b) = (url(&veth.a), url(&veth.b));

    // Bob on host B hears Alice on host A.
    let mut bob_sub = Subscriber::start(&b, &url_b, &bob_file).await;
    let out = publish(
        &a,
        &url_a,
        &alice_file,
        &bob.public_key(),
        "{\"credentials\":{\"ufrag\":\"a-to-b\"}}\n",
    )
    .await;
    assert_succeeds(&out);
    let got = bob_sub.next().await;
    assert_eq!(
        got,
        serde_json::json!({
            "sender": alice.public_key().to_string(),
            "recipient": bob.public_key().to_string(),
            "message": {"credentials": {"ufrag": "a-to-b"}},
        })
    );

    // And the other way round.
    let mut alice_sub = Subscriber::start(&a, &url_a, &alice_file).await;
    let out = publish(
        &b,
        &url_b,
        &bob_file,
        &alice.public_key(),
        "{\"credentials\":{\"ufrag\":\"b-to-a\"}}\n",
    )
    .await;
    assert_succeeds(&out);
    let got = alice_sub.next().await;
    assert_eq!(got["sender"], bob.public_key().to_string());
    assert_eq!(ufrag(&got), "b-to-a");
    // Nothing else for either: each one's next message is the other's second.
    // Bob did not hear his own message (sent before the marker), nor Alice's
    // first one twice.
    for (ns, url, file, to, sub, marker) in [
        (&b, &url_b, &bob_file, &alice, &mut alice_sub, "b-to-a-2"),
        (&a, &url_a, &alice_file, &bob, &mut bob_sub, "a-to-b-2"),
    ] {
        let input = format!("{{\"credentials\":{{\"ufrag\":\"{marker}\"}}}}\n");
        let out = publish(ns, url, file, &to.public_key(), &input).await;
        assert_succeeds(&out);
        sub.next_is(marker).await;
    }
    alice_sub.stop().await;
    bob_sub.stop().await;
}

#[tokio::test]
async fn an_envelope_over_4096_bytes_is_refused_by_the_cli() {
    let ns = Netns::new("mcbig").unwrap();
    ns.multicast_on_lo().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let alice_file = key_file(dir.path(), "alice", &PrivateKey::generate());
    let big = format!("{{\"peer\":{{\"name\":\"{}\"}}}}\n", "x".repeat(5000));
    let url = vec![format!(
        "multicast://239.77.1.1:{}?interface=lo&loopback=true",
        port(2)
    )];
    let out = publish(
        &ns,
        &url,
        &alice_file,
        &PrivateKey::generate().public_key(),
        &big,
    )
    .await;
    assert!(!out.status.success());
    assert!(out.stdout.is_empty());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
    assert!(stderr.contains("4096"), "{stderr}");
}

#[tokio::test]
async fn grpc_and_multicast_at_once_deliver_through_whichever_reaches_the_peer() {
    let ns = Netns::new("multi").unwrap();
    ns.multicast_on_lo().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (alice, bob) = (PrivateKey::generate(), PrivateKey::generate());
    let (alice_file, bob_file) = (
        key_file(dir.path(), "alice", &alice),
        key_file(dir.path(), "bob", &bob),
    );

    let mut server = ns
        .command(BIN)
        .args(["serve", "--listen", "127.0.0.1:0"])
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut server_err = BufReader::new(server.stderr.take().unwrap()).lines();
    let addr = timeout(WAIT, async {
        while let Some(line) = server_err.next_line().await.unwrap() {
            if let Some(addr) = line
                .split_whitespace()
                .find_map(|w| w.strip_prefix("local_addr="))
            {
                return addr.to_string();
            }
        }
        panic!("server exited");
    })
    .await
    .unwrap();
    let grpc = format!("grpc://{addr}?insecure=true");
    let mcast = format!(
        "multicast://239.77.2.1:{}?interface=lo&loopback=true",
        port(3)
    );
    let both = vec![grpc.clone(), mcast.clone()];
    let mut sub = Subscriber::start(&ns, &both, &bob_file).await;
    let to = bob.public_key();

    // Both media carry the envelope; it is printed once.
    let out = publish(
        &ns,
        &both,
        &alice_file,
        &to,
        "{\"credentials\":{\"ufrag\":\"both\"}}\n",
    )
    .await;
    assert_succeeds(&out);
    assert_eq!(ufrag(&sub.next().await), "both");

    // Only gRPC reaches Bob, then only multicast. Each is the next line: the
    // copy of "both" that came second was not printed before them.
    let out = publish(
        &ns,
        std::slice::from_ref(&grpc),
        &alice_file,
        &to,
        "{\"credentials\":{\"ufrag\":\"grpc\"}}\n",
    )
    .await;
    assert!(out.status.success());
    sub.next_is("grpc").await;
    let out = publish(
        &ns,
        std::slice::from_ref(&mcast),
        &alice_file,
        &to,
        "{\"credentials\":{\"ufrag\":\"mcast\"}}\n",
    )
    .await;
    assert!(out.status.success());
    sub.next_is("mcast").await;

    // The server goes away: publishing to both still reaches Bob over multicast.
    server.kill().await.unwrap();
    let out = publish(
        &ns,
        &both,
        &alice_file,
        &to,
        "{\"credentials\":{\"ufrag\":\"no-server\"}}\n",
    )
    .await;
    assert_succeeds(&out);
    let got = sub.next().await;
    assert_eq!(ufrag(&got), "no-server");
    assert_eq!(got["sender"], alice.public_key().to_string());
    // Printed once: the next multicast message is the next line.
    let out = publish(
        &ns,
        std::slice::from_ref(&mcast),
        &alice_file,
        &to,
        "{\"credentials\":{\"ufrag\":\"after\"}}\n",
    )
    .await;
    assert_succeeds(&out);
    sub.next_is("after").await;
    sub.stop().await;
}
