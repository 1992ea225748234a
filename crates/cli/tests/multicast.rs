//! `multicast://` through the CLI: two hosts (network namespaces joined by a
//! veth pair) exchange messages both ways, and several backends at once
//! (gRPC and multicast) deliver through whichever reaches the peer.
//! Everything runs inside namespaces these tests create (root).

mod common;

use std::{path::Path, process::Stdio, time::Duration};

use common::{BIN, assert_succeeds, key_file};
use cunicu_signal::Key;
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

    /// Nothing more arrives for a while.
    async fn quiet(&mut self) {
        if let Ok(line) = timeout(Duration::from_millis(700), self.stdout.next_line()).await {
            panic!("unexpected output: {line:?}");
        }
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
    let (alice, bob) = (Key::generate(), Key::generate());
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
    bob_sub.quiet().await;

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
    alice_sub.quiet().await;
    // Bob did not hear his own message.
    bob_sub.quiet().await;
    alice_sub.stop().await;
    bob_sub.stop().await;
}

#[tokio::test]
async fn an_envelope_over_4096_bytes_is_refused_by_the_cli() {
    let ns = Netns::new("mcbig").unwrap();
    ns.multicast_on_lo().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let alice_file = key_file(dir.path(), "alice", &Key::generate());
    let big = format!("{{\"peer\":{{\"name\":\"{}\"}}}}\n", "x".repeat(5000));
    let url = vec![format!(
        "multicast://239.77.1.1:{}?interface=lo&loopback=true",
        port(2)
    )];
    let out = publish(&ns, &url, &alice_file, &Key::generate().public_key(), &big).await;
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
    let (alice, bob) = (Key::generate(), Key::generate());
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
    sub.quiet().await;

    // Only gRPC reaches Bob, then only multicast.
    let out = publish(
        &ns,
        std::slice::from_ref(&grpc),
        &alice_file,
        &to,
        "{\"credentials\":{\"ufrag\":\"grpc\"}}\n",
    )
    .await;
    assert!(out.status.success());
    assert_eq!(ufrag(&sub.next().await), "grpc");
    let out = publish(
        &ns,
        std::slice::from_ref(&mcast),
        &alice_file,
        &to,
        "{\"credentials\":{\"ufrag\":\"mcast\"}}\n",
    )
    .await;
    assert!(out.status.success());
    assert_eq!(ufrag(&sub.next().await), "mcast");

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
    sub.quiet().await;
    sub.stop().await;
}
