//! Interop with real Go implementations of gRPC (google.golang.org/grpc) and NaCl box
//! (golang.org/x/crypto/nacl/box), the libraries cunīcu uses: the Go program under
//! `interop/go` (no generated code; it loads our `FILE_DESCRIPTOR_SET`), built once per
//! test binary with the Go toolchain. These tests fail, and are never skipped, when Go is
//! missing.
//!
//! cunīcu's own module cannot be used (the Go module proxy refuses `cunicu.li/cunicu`), so
//! this checks the wire format against independent Go implementations instead:
//! - our server with Go clients (publish and subscribe, invalid keys, GetBuildInfo);
//! - our grpc:// backend against a grpc-go server (`interop serve`), whose keepalive
//!   enforcement is the one grpc-go signaling servers like cunīcu's use.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    process::{ExitStatus, Stdio},
    sync::{Arc, OnceLock},
    time::{Duration, Instant},
};

use parking_lot::Mutex;
mod common;

use base64::{Engine, engine::general_purpose::STANDARD};
use cunicu_signal::{
    Backend, ChannelHandler, Delivery, Key, KeyPair, PrivateKey, Sender,
    backend::connect,
    json::message_from_json,
    proto::{
        BuildInfo, FILE_DESCRIPTOR_SET, Timestamp,
        core::IpAddress,
        epdisc::{Candidate, CandidateType, Credentials, NetworkType, RelayProtocol, TcpType},
        pdisc::{PeerAddresses, PeerDescription, PeerDescriptionChange},
        pske::PresharedKeyEstablishment,
        signaling::Message,
    },
};
use cunicu_signal_server::{Config, Server};
use tokio::{
    io::{AsyncBufReadExt, BufReader, Lines},
    process::{Child, ChildStdout, Command},
    sync::mpsc,
    time::timeout,
};

/// The longest any single step may take.
const WAIT: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------------------------------
// The Go program

struct GoTool {
    bin: PathBuf,
    descriptors: PathBuf,
}

fn go_toolchain() -> PathBuf {
    // $GO, when set, is the only one tried.
    let candidates = match std::env::var_os("GO") {
        Some(go) => vec![PathBuf::from(go)],
        None => vec![PathBuf::from("go"), PathBuf::from("/usr/local/go/bin/go")],
    };
    for go in &candidates {
        if std::process::Command::new(go)
            .arg("version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
        {
            return go.clone();
        }
    }
    panic!(
        "the Go interop tests need the Go toolchain (1.25 or newer; the first build fetches \
         grpc-go and x/crypto from the Go module proxy), tried {candidates:?}: install Go or \
         set GO=/path/to/go. These tests are never skipped"
    );
}

/// Builds `interop/go` once per test binary (the Go build cache makes later builds a
/// link only) and writes our descriptor set beside it.
fn go_tool() -> &'static GoTool {
    static TOOL: OnceLock<GoTool> = OnceLock::new();
    TOOL.get_or_init(|| {
        let go = go_toolchain();
        let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../interop/go");
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("interop-go");
        std::fs::create_dir_all(&dir).expect("create the interop build directory");
        // Build and write under names of our own, then rename: several test processes
        // may do this at once, and renaming never disturbs a running binary.
        let pid = std::process::id();
        let building = dir.join(format!("interop.{pid}"));
        let started = Instant::now();
        let output = std::process::Command::new(&go)
            .args(["build", "-buildvcs=false", "-o"])
            .arg(&building)
            .arg(".")
            .current_dir(&source)
            .output()
            .unwrap_or_else(|e| panic!("running {} build: {e}", go.display()));
        assert!(
            output.status.success(),
            "go build of {} failed ({}):\n{}{}",
            source.display(),
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr),
        );
        eprintln!(
            "interop_go: built the Go interop program in {:.1?}",
            started.elapsed()
        );
        let bin = dir.join("interop");
        std::fs::rename(&building, &bin).expect("move the interop binary into place");
        let descriptors = dir.join("descriptors.bin");
        let writing = dir.join(format!("descriptors.bin.{pid}"));
        std::fs::write(&writing, FILE_DESCRIPTOR_SET).expect("write the descriptor set");
        std::fs::rename(&writing, &descriptors).expect("move the descriptor set into place");
        GoTool { bin, descriptors }
    })
}

/// A running Go subcommand: stdout line by line, stderr collected for failure messages.
/// Killed when dropped.
struct GoProcess {
    what: String,
    child: Child,
    stdout: Lines<BufReader<ChildStdout>>,
    stderr: Arc<Mutex<String>>,
}

impl GoProcess {
    /// Runs `interop COMMAND --descriptors FILE ARGS...`.
    fn spawn(command: &str, args: &[&str]) -> Self {
        let tool = go_tool();
        let what = format!("interop {command} {}", args.join(" "));
        let mut child = Command::new(&tool.bin)
            .arg(command)
            .arg("--descriptors")
            .arg(&tool.descriptors)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        let stdout = BufReader::new(child.stdout.take().expect("stdout")).lines();
        let stderr = Arc::new(Mutex::new(String::new()));
        let mut err_lines = BufReader::new(child.stderr.take().expect("stderr")).lines();
        let collected = stderr.clone();
        tokio::spawn(async move {
            while let Ok(Some(line)) = err_lines.next_line().await {
                let mut all = collected.lock();
                all.push_str(&line);
                all.push('\n');
            }
        });
        GoProcess {
            what,
            child,
            stdout,
            stderr,
        }
    }

    fn stderr(&self) -> String {
        self.stderr.lock().clone()
    }

    /// The next line on stdout; panics on timeout or end of output.
    async fn line(&mut self) -> String {
        match timeout(WAIT, self.stdout.next_line()).await {
            Ok(Ok(Some(line))) => line,
            Ok(Ok(None)) => panic!(
                "{}: stdout ended early; stderr:\n{}",
                self.what,
                self.stderr()
            ),
            Ok(Err(e)) => panic!("{}: reading stdout: {e}", self.what),
            Err(_) => panic!(
                "{}: no line on stdout within {WAIT:?}; stderr:\n{}",
                self.what,
                self.stderr()
            ),
        }
    }

    /// Reads the rest of stdout and waits for the exit, within [`WAIT`].
    async fn finish(mut self) -> (ExitStatus, Vec<String>) {
        let mut rest = Vec::new();
        let result = timeout(WAIT, async {
            while let Some(line) = self.stdout.next_line().await? {
                rest.push(line);
            }
            self.child.wait().await
        })
        .await;
        match result {
            Ok(Ok(status)) => (status, rest),
            Ok(Err(e)) => panic!("{}: {e}", self.what),
            Err(_) => panic!(
                "{}: did not exit within {WAIT:?}; output so far {rest:?}; stderr:\n{}",
                self.what,
                self.stderr()
            ),
        }
    }

    /// Waits for the exit and expects status 0 and exactly `expected` on stdout.
    async fn expect_success(self, expected: &[&str]) {
        let what = self.what.clone();
        let stderr = self.stderr.clone();
        let (status, lines) = self.finish().await;
        assert!(
            status.success() && lines == expected,
            "{what}: exit {status}, stdout {lines:?}, expected {expected:?}; stderr:\n{}",
            stderr.lock()
        );
    }

    /// Sends SIGTERM (to this child, by its process id).
    fn terminate(&self) {
        let pid = self.child.id().expect("child still running");
        let status = std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -TERM {pid}: {status}");
    }
}

// ---------------------------------------------------------------------------------------
// Keys, servers, messages

/// A temporary directory with private key files as `wg genkey` writes them.
struct Keys(tempfile::TempDir);

impl Keys {
    fn new() -> Self {
        Keys(tempfile::tempdir().expect("temp dir"))
    }

    fn file(&self, name: &str, private: &PrivateKey) -> String {
        let path = self.0.path().join(format!("{name}.key"));
        std::fs::write(&path, format!("{}\n", private.secret_base64().as_str()))
            .expect("write key file");
        path.to_str().expect("UTF-8 temp path").to_owned()
    }
}

async fn our_server() -> Server {
    let mut config = Config::default();
    config.listen = ([127, 0, 0, 1], 0).into();
    Server::spawn(config).await.expect("server starts")
}

/// `interop serve`: the grpc-go server. Returns it and its HOST:PORT.
async fn go_server() -> (GoProcess, String) {
    let mut server = GoProcess::spawn("serve", &["--listen", "127.0.0.1:0"]);
    let line = server.line().await;
    let addr = line
        .strip_prefix("LISTENING ")
        .unwrap_or_else(|| panic!("interop serve printed {line:?}"))
        .to_owned();
    (server, addr)
}

fn grpc_url(addr: &str) -> String {
    format!("grpc://{addr}?insecure=true")
}

/// A message that uses every field of docs/PROTOCOL.md §5 (enums, nested messages, a map, repeated
/// and bytes fields, a negative int32), in Rust and written by hand in proto3 JSON.
fn rich_message(tag: &str) -> (Message, String) {
    let key_a = [0x11u8; 32];
    let key_b: Vec<u8> = (0u8..32).collect();
    let v6 = [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
    let message = Message {
        credentials: Some(Credentials {
            ufrag: format!("ufrag-{tag}"),
            pwd: "pwd/with+odd=chars ü".into(),
            need_creds: true,
        }),
        candidate: Some(Candidate {
            r#type: CandidateType::ServerReflexive as i32,
            network_type: NetworkType::Udp6 as i32,
            tcp_type: TcpType::Passive as i32,
            foundation: "4711".into(),
            component: 1,
            priority: 2_130_706_431,
            address: "2001:db8::1".into(),
            port: 51820,
            related_address: Some(cunicu_signal::proto::epdisc::RelatedAddress {
                address: "10.0.0.1".into(),
                port: -1,
            }),
            relay_protocol: RelayProtocol::Dtls as i32,
        }),
        peer: Some(PeerDescription {
            change: PeerDescriptionChange::Update as i32,
            name: format!("peer-{tag}"),
            public_key: key_a.to_vec(),
            public_key_new: key_b.clone(),
            allowed_ips: vec!["10.1.0.0/16".into(), "fd00::/64".into()],
            build_info: Some(BuildInfo {
                version: "v0.9.1".into(),
                date: Some(Timestamp {
                    seconds: 1_700_000_000,
                    nanos: 5,
                }),
                commit: "0123abcd".into(),
                tag: String::new(),
                branch: "main".into(),
                built_by: "interop".into(),
                os: "linux".into(),
                arch: "amd64".into(),
                dirty: true,
            }),
            hosts: HashMap::from([
                (
                    "host-a".to_owned(),
                    PeerAddresses {
                        addresses: vec![
                            IpAddress {
                                addr: vec![10, 0, 0, 1],
                            },
                            IpAddress { addr: v6.to_vec() },
                        ],
                    },
                ),
                ("host-b".to_owned(), PeerAddresses { addresses: vec![] }),
            ]),
        }),
        pske: Some(PresharedKeyEstablishment {
            public_key: key_b.clone(),
            cipher_text: vec![0xff; 100],
        }),
    };
    let json = format!(
        r#"{{
  "credentials": {{"ufrag": "ufrag-{tag}", "pwd": "pwd/with+odd=chars ü", "needCreds": true}},
  "candidate": {{"type": "SERVER_REFLEXIVE", "networkType": "UDP6", "tcpType": "PASSIVE",
    "foundation": "4711", "component": 1, "priority": 2130706431, "address": "2001:db8::1",
    "port": 51820, "relatedAddress": {{"address": "10.0.0.1", "port": -1}},
    "relayProtocol": "DTLS"}},
  "peer": {{"change": "UPDATE", "name": "peer-{tag}", "publicKey": "{a}", "publicKeyNew": "{b}",
    "allowedIps": ["10.1.0.0/16", "fd00::/64"],
    "buildInfo": {{"version": "v0.9.1", "date": {{"seconds": 1700000000, "nanos": 5}},
      "commit": "0123abcd", "branch": "main", "builtBy": "interop", "os": "linux",
      "arch": "amd64", "dirty": true}},
    "hosts": {{"host-a": {{"addresses": [{{"addr": "CgAAAQ=="}}, {{"addr": "{v6}"}}]}},
      "host-b": {{}}}}}},
  "pske": {{"publicKey": "{b}", "cipherText": "{c}"}}
}}"#,
        a = STANDARD.encode(key_a),
        b = STANDARD.encode(&key_b),
        v6 = STANDARD.encode(v6),
        c = STANDARD.encode([0xff; 100]),
    );
    (message, json)
}

fn numbered(n: usize, from: &Key) -> Message {
    Message {
        credentials: Some(Credentials {
            ufrag: format!("n-{n}"),
            pwd: from.to_string(),
            need_creds: n.is_multiple_of(2),
        }),
        ..Default::default()
    }
}

async fn recv(rx: &mut mpsc::Receiver<Delivery>, what: &str) -> Delivery {
    timeout(WAIT, rx.recv())
        .await
        .unwrap_or_else(|_| panic!("{what}: nothing arrived within {WAIT:?}"))
        .unwrap_or_else(|| panic!("{what}: channel closed"))
}

/// The next delivery is `marker`: a message published after whatever must
/// not arrive, through the same server, so anything unwanted would come first
/// (a stream delivers in publishing order). No quiet spell to wait out.
async fn expect_marker(rx: &mut mpsc::Receiver<Delivery>, marker: &Message, what: &str) {
    let got = recv(rx, what).await;
    assert_eq!(&got.message, marker, "{what}: a delivery before the marker");
}

/// One line of `interop subscribe`.
struct GoDelivery {
    sender: String,
    recipient: String,
    json: serde_json::Value,
    message: Message,
}

fn parse_go_delivery(line: &str) -> GoDelivery {
    let value: serde_json::Value =
        serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
    let text = |name: &str| {
        value[name]
            .as_str()
            .unwrap_or_else(|| panic!("no {name} in {line}"))
            .to_owned()
    };
    let json = value["message"].clone();
    let message = message_from_json(&json.to_string())
        .unwrap_or_else(|e| panic!("Go's proto3 JSON does not parse here ({e}): {line}"));
    GoDelivery {
        sender: text("sender"),
        recipient: text("recipient"),
        json,
        message,
    }
}

// ---------------------------------------------------------------------------------------
// Tests

/// a. Go (grpc-go client, nacl/box.Seal, protojson) publishes to our server; our grpc://
/// backend subscriber opens it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn go_publishes_to_a_rust_subscriber_through_our_server() {
    go_tool();
    let server = our_server().await;
    let addr = server.local_addr().to_string();
    go_publishes_to_rust(&addr, &addr).await;
    // Go's two and the marker.
    assert_eq!(server.metrics().published.get(), 3);
}

/// A Go peer publishes through the server at `publish_to`; our subscriber
/// listens at `subscribe_at`.
async fn go_publishes_to_rust(publish_to: &str, subscribe_at: &str) {
    let addr = publish_to;
    let keys = Keys::new();
    let (go_peer, rust_peer, stranger) = (
        PrivateKey::generate(),
        PrivateKey::generate(),
        PrivateKey::generate(),
    );

    let backend = connect(&[grpc_url(subscribe_at)]).await.expect("connect");
    let (handler, mut rx) = ChannelHandler::new(16);
    backend
        .subscribe(&rust_peer, Sender::Key(go_peer.public_key()), handler)
        .await
        .expect("subscribe");

    let (expected, json) = rich_message("go-to-rust");
    let go_key = keys.file("go", &go_peer);
    let to = rust_peer.public_key().to_string();
    GoProcess::spawn(
        "publish",
        &[
            "--server",
            addr,
            "--key-file",
            &go_key,
            "--to",
            &to,
            "--json",
            &json,
            "--timeout",
            "30s",
        ],
    )
    .expect_success(&["OK"])
    .await;
    // A sender this subscription does not ask for is not delivered.
    let stranger_key = keys.file("stranger", &stranger);
    GoProcess::spawn(
        "publish",
        &[
            "--server",
            addr,
            "--key-file",
            &stranger_key,
            "--to",
            &to,
            "--json",
            r#"{"credentials": {"ufrag": "stranger"}}"#,
        ],
    )
    .expect_success(&["OK"])
    .await;

    let got = recv(&mut rx, "Go's message").await;
    assert_eq!(got.sender, go_peer.public_key());
    assert_eq!(got.recipient, rust_peer.public_key());
    assert_eq!(got.message, expected);
    // Nothing else (not the stranger's, no second copy): a message from the Go
    // peer's key, published afterwards through the same server, comes next.
    let marker = numbered(0, &go_peer.public_key());
    let publisher = connect(&[grpc_url(publish_to)]).await.expect("connect");
    publisher
        .publish(
            &KeyPair::new(go_peer.clone(), rust_peer.public_key()),
            &marker,
        )
        .await
        .expect("publish the marker");
    expect_marker(&mut rx, &marker, "after Go's message").await;
    publisher.close().await.expect("close");
    backend.close().await.expect("close");
}

/// b. Our grpc:// backend publishes; Go subscribes to our server and opens the envelopes
/// with nacl/box.Open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rust_publishes_to_a_go_subscriber_through_our_server() {
    go_tool();
    let server = our_server().await;
    let addr = server.local_addr().to_string();
    rust_publishes_to_go(&addr, &addr).await;
    assert_eq!(server.metrics().published.get(), 2);
    assert_eq!(server.metrics().delivered.get(), 2);
}

/// We publish through the server at `publish_to`; a Go peer subscribes at
/// `subscribe_at`.
async fn rust_publishes_to_go(publish_to: &str, subscribe_at: &str) {
    let addr = subscribe_at;
    let keys = Keys::new();
    let (go_peer, rust_peer) = (PrivateKey::generate(), PrivateKey::generate());

    let go_key = keys.file("go", &go_peer);
    let mut subscriber = GoProcess::spawn(
        "subscribe",
        &[
            "--server",
            addr,
            "--key-file",
            &go_key,
            "--count",
            "2",
            "--timeout",
            "60s",
        ],
    );
    assert_eq!(subscriber.line().await, "READY");

    let backend = connect(&[grpc_url(publish_to)]).await.expect("connect");
    let pair = KeyPair::new(rust_peer.clone(), go_peer.public_key());
    let (rich, _) = rich_message("rust-to-go");
    let simple = numbered(7, &rust_peer.public_key());
    backend.publish(&pair, &rich).await.expect("publish");
    backend.publish(&pair, &simple).await.expect("publish");

    let first = parse_go_delivery(&subscriber.line().await);
    let second = parse_go_delivery(&subscriber.line().await);
    let (status, rest) = subscriber.finish().await;
    assert!(status.success(), "interop subscribe: {status}");
    assert!(rest.is_empty(), "more output than 2 messages: {rest:?}");

    for got in [&first, &second] {
        assert_eq!(got.sender, rust_peer.public_key().to_string());
        assert_eq!(got.recipient, go_peer.public_key().to_string());
    }
    assert_eq!(first.message, rich);
    assert_eq!(second.message, simple);
    // Go's protojson, read directly: our encoding means the same to Go.
    let candidate = &first.json["candidate"];
    assert_eq!(candidate["type"], "SERVER_REFLEXIVE");
    assert_eq!(candidate["networkType"], "UDP6");
    assert_eq!(candidate["priority"], 2_130_706_431);
    assert_eq!(candidate["relatedAddress"]["port"], -1);
    assert_eq!(first.json["peer"]["change"], "UPDATE");
    assert_eq!(
        first.json["peer"]["hosts"]["host-a"]["addresses"][0]["addr"],
        "CgAAAQ=="
    );
    assert_eq!(first.json["credentials"]["pwd"], "pwd/with+odd=chars ü");
    assert_eq!(second.json["credentials"]["ufrag"], "n-7");
    backend.close().await.expect("close");
}

/// c. The grpc-go server (`interop serve`) with our grpc:// backend: two Rust peers both
/// ways (sync envelope, streaming, Publish), then a Go client's envelope to a Rust
/// subscriber.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rust_peers_through_a_grpc_go_server() {
    go_tool();
    let (go_server, addr) = go_server().await;
    let url = grpc_url(&addr);
    let keys = Keys::new();
    let (alice, bob, carol) = (
        PrivateKey::generate(),
        PrivateKey::generate(),
        PrivateKey::generate(),
    );

    let alice_backend = connect(&[&url]).await.expect("alice connects");
    let bob_backend = connect(&[&url]).await.expect("bob connects");
    let (alice_handler, mut alice_rx) = ChannelHandler::new(256);
    let (bob_handler, mut bob_rx) = ChannelHandler::new(256);
    // `subscribe` returns once the grpc-go server's sync envelope arrived; the server only
    // delivers to streams that exist, so publishing right away checks that.
    alice_backend
        .subscribe(&alice, Sender::Key(bob.public_key()), alice_handler)
        .await
        .expect("alice subscribes");
    bob_backend
        .subscribe(&bob, Sender::Key(alice.public_key()), bob_handler)
        .await
        .expect("bob subscribes");

    const N: usize = 50;
    let to_bob = KeyPair::new(alice.clone(), bob.public_key());
    let to_alice = KeyPair::new(bob.clone(), alice.public_key());
    let (a, b) = tokio::join!(
        async {
            for i in 0..N {
                alice_backend
                    .publish(&to_bob, &numbered(i, &alice.public_key()))
                    .await?;
            }
            Ok::<_, cunicu_signal::BackendError>(())
        },
        async {
            for i in 0..N {
                bob_backend
                    .publish(&to_alice, &numbered(i, &bob.public_key()))
                    .await?;
            }
            Ok::<_, cunicu_signal::BackendError>(())
        },
    );
    a.expect("alice publishes");
    b.expect("bob publishes");
    for i in 0..N {
        let got = recv(&mut bob_rx, "bob").await;
        assert_eq!(got.sender, alice.public_key());
        assert_eq!(got.recipient, bob.public_key());
        assert_eq!(got.message, numbered(i, &alice.public_key()));
        let got = recv(&mut alice_rx, "alice").await;
        assert_eq!(got.sender, bob.public_key());
        assert_eq!(got.recipient, alice.public_key());
        assert_eq!(got.message, numbered(i, &bob.public_key()));
    }
    let marker = numbered(N, &alice.public_key());
    alice_backend
        .publish(&to_bob, &marker)
        .await
        .expect("alice publishes the marker");
    expect_marker(&mut bob_rx, &marker, "bob after the exchange").await;

    // A Go client publishes to alice, who now also listens to anyone.
    let (wildcard, mut wildcard_rx) = ChannelHandler::new(16);
    alice_backend
        .subscribe(&alice, Sender::Any, wildcard)
        .await
        .expect("alice subscribes to anyone");
    let (expected, json) = rich_message("go-client-via-go-server");
    let carol_key = keys.file("carol", &carol);
    let to = alice.public_key().to_string();
    GoProcess::spawn(
        "publish",
        &[
            "--server",
            &addr,
            "--key-file",
            &carol_key,
            "--to",
            &to,
            "--json",
            &json,
        ],
    )
    .expect_success(&["OK"])
    .await;
    let got = recv(&mut wildcard_rx, "carol's message").await;
    assert_eq!(got.sender, carol.public_key());
    assert_eq!(got.message, expected);
    // Bob's next message reaches both of alice's handlers, and before it
    // nothing: carol's message did not reach the handler for bob only.
    let marker = numbered(N, &bob.public_key());
    bob_backend
        .publish(&to_alice, &marker)
        .await
        .expect("bob publishes the marker");
    expect_marker(&mut wildcard_rx, &marker, "after carol's message").await;
    expect_marker(&mut alice_rx, &marker, "alice's handler for bob only").await;

    alice_backend.close().await.expect("close");
    bob_backend.close().await.expect("close");
    go_server.terminate();
    // Every envelope went through the grpc-go server exactly once, to exactly
    // one stream: 2 N, carol's and the two markers.
    go_server
        .expect_success(&[&format!(
            "STOPPED published={} delivered={} dropped=0",
            2 * N + 3,
            2 * N + 3
        )])
        .await;
}

/// d. Invalid keys through a grpc-go client: our server answers INVALID_ARGUMENT, naming
/// the field.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_keys_from_a_grpc_go_client() {
    go_tool();
    let server = our_server().await;
    let addr = server.local_addr().to_string();
    let good = STANDARD.encode([5u8; 32]);
    let short = STANDARD.encode([5u8; 31]);
    let long = STANDARD.encode([5u8; 33]);
    let nonce = STANDARD.encode([0u8; 24]);

    for (field, sender, recipient, len) in [
        ("sender", &short, &good, "31"),
        ("recipient", &good, &long, "33"),
        ("sender", &String::new(), &good, "0"),
    ] {
        let (status, lines) = GoProcess::spawn(
            "publish-raw",
            &[
                "--server",
                &addr,
                "--sender",
                sender,
                "--recipient",
                recipient,
                "--body",
                "AAAA",
                "--nonce",
                &nonce,
            ],
        )
        .finish()
        .await;
        assert_eq!(status.code(), Some(1), "publish-raw {field}: {lines:?}");
        assert_eq!(lines.len(), 1, "{lines:?}");
        assert!(
            lines[0].starts_with("ERROR InvalidArgument "),
            "publish-raw with a {len}-byte {field}: {}",
            lines[0]
        );
        assert!(
            lines[0].contains(field) && lines[0].contains(len),
            "the message names the field and its length: {}",
            lines[0]
        );
    }

    let (status, lines) = GoProcess::spawn("subscribe-raw", &["--server", &addr, "--key", &short])
        .finish()
        .await;
    assert_eq!(status.code(), Some(1), "subscribe-raw: {lines:?}");
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(
        lines[0].starts_with("ERROR InvalidArgument "),
        "subscribe-raw with a 31-byte key: {}",
        lines[0]
    );
    assert_eq!(server.metrics().published.get(), 0);

    // A valid raw envelope still goes through.
    GoProcess::spawn(
        "publish-raw",
        &[
            "--server",
            &addr,
            "--sender",
            &good,
            "--recipient",
            &good,
            "--nonce",
            &nonce,
        ],
    )
    .expect_success(&["OK"])
    .await;
    assert_eq!(server.metrics().published.get(), 1);
}

/// GetBuildInfo from a grpc-go client: cunicu.BuildInfo and cunicu.Timestamp decode.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn build_info_for_a_grpc_go_client() {
    go_tool();
    let server = our_server().await;
    let addr = server.local_addr().to_string();
    let mut client = GoProcess::spawn("build-info", &["--server", &addr]);
    let line = client.line().await;
    client.expect_success(&[]).await;
    let info: serde_json::Value = serde_json::from_str(&line).expect("JSON");
    let ours = cunicu_signal_server::build_info();
    let text = |name: &str| info[name].as_str().unwrap_or_default().to_owned();
    assert_eq!(text("version"), ours.version, "{line}");
    assert_eq!(text("commit"), ours.commit, "{line}");
    assert_eq!(text("builtBy"), ours.built_by, "{line}");
    assert_eq!(text("os"), ours.os, "{line}");
    assert_eq!(text("arch"), ours.arch, "{line}");
    assert_eq!(
        info["dirty"].as_bool().unwrap_or(false),
        ours.dirty,
        "{line}"
    );
    let seconds = info["date"]["seconds"].as_i64().unwrap_or(0);
    assert_eq!(
        Some(seconds),
        ours.date.map(|d| i64::from(d.seconds)),
        "{line}"
    );
}

/// A grpc-go client that sends no proof (as cunīcu's peers) against a server
/// that requires them (docs/PROTOCOL.md §11): refused, with a message that says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grpc_go_client_without_proofs_is_told_why_it_is_refused() {
    go_tool();
    let mut config = Config::default();
    config.listen = ([127, 0, 0, 1], 0).into();
    config.key = Some(PrivateKey::generate());
    config.auth = cunicu_signal_server::AuthMode::Required;
    let server = Server::spawn(config).await.expect("server starts");
    let addr = server.local_addr().to_string();
    let key = STANDARD.encode(PrivateKey::generate().public_key().as_bytes());
    let (status, lines) = GoProcess::spawn("subscribe-raw", &["--server", &addr, "--key", &key])
        .finish()
        .await;
    assert_eq!(status.code(), Some(1), "subscribe-raw: {lines:?}");
    assert!(
        lines[0].starts_with("ERROR Unauthenticated ") && lines[0].contains("cunicu-auth-bin"),
        "{}",
        lines[0]
    );
    let (status, lines) = GoProcess::spawn(
        "publish-raw",
        &[
            "--server",
            &addr,
            "--sender",
            &key,
            "--recipient",
            &key,
            "--body",
            "AAAA",
            "--nonce",
            &STANDARD.encode([0u8; 24]),
        ],
    )
    .finish()
    .await;
    assert_eq!(status.code(), Some(1), "publish-raw: {lines:?}");
    assert!(
        lines[0].starts_with("ERROR Unauthenticated "),
        "{}",
        lines[0]
    );
    // GetBuildInfo needs no proof.
    let (status, lines) = GoProcess::spawn("build-info", &["--server", &addr])
        .finish()
        .await;
    assert!(status.success(), "{lines:?}");
}

/// Go peers and ours through two replicas of a cluster (docs/PROTOCOL.md §12): each side
/// on another replica.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn go_and_rust_peers_through_two_replicas() {
    go_tool();
    let nats = common::nats::Nats::start().await;
    let mut replicas = Vec::new();
    for _ in 0..2 {
        let mut config = Config::default();
        config.listen = ([127, 0, 0, 1], 0).into();
        config.cluster = Some(cunicu_signal_server::ClusterConfig::new(vec![nats.url()]));
        replicas.push(Server::spawn(config).await.expect("replica starts"));
    }
    let (one, two) = (
        replicas[0].local_addr().to_string(),
        replicas[1].local_addr().to_string(),
    );
    // Until both are connected to NATS, a publish may find nobody there.
    let deadline = Instant::now() + Duration::from_secs(20);
    while replicas
        .iter()
        .any(|r| r.metrics().cluster_connected.get() != 1)
    {
        assert!(Instant::now() < deadline, "replicas not connected to NATS");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    go_publishes_to_rust(&one, &two).await;
    rust_publishes_to_go(&two, &one).await;
}
