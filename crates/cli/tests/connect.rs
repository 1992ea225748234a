//! `cunicu-signal connect` as users run it: two processes establish an ICE
//! session and carry stdin lines both ways.
//!
//! Network safety: candidates are limited to 127.0.0.1 (`--address`), or the
//! peers run in network namespaces these tests create (root), joined by a
//! veth pair: no connectivity check reaches an address of the machine's
//! real interfaces.

mod common;

use std::{
    net::{Ipv4Addr, SocketAddr},
    path::Path,
    process::{ExitStatus, Stdio},
    sync::Arc,
    time::Duration,
};

use common::{BIN, key_file};
use cunicu_signal::{Key, PrivateKey};
use cunicu_signal_server::{Config, Server};
use cunicu_signal_test_support::netns::{Netns, Veth};
use parking_lot::Mutex;
use tokio::{
    io::{AsyncBufReadExt, AsyncRead, AsyncWriteExt, BufReader},
    process::{Child, ChildStdin, Command},
    sync::mpsc,
    task::JoinHandle,
    time::timeout,
};

/// Limit of one step (a line, a connection, an exit).
const STEP: Duration = Duration::from_secs(30);

/// A running `connect`: stdin to write, stdout and stderr lines to wait for.
struct Peer {
    name: String,
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: mpsc::Receiver<String>,
    stderr: mpsc::Receiver<String>,
    /// Every stderr line so far, and whether [`Peer::stderr_line`] returned it.
    seen: Vec<(String, bool)>,
    log: Arc<Mutex<String>>,
    /// The tasks copying stdout and stderr into `log`; each ends with its pipe.
    readers: Vec<JoinHandle<()>>,
}

/// Copies the lines of `stream` into `log` (each after `label: `) and into
/// the returned channel, until the stream ends.
fn read_lines(
    stream: impl AsyncRead + Unpin + Send + 'static,
    label: &'static str,
    log: &Arc<Mutex<String>>,
) -> (mpsc::Receiver<String>, JoinHandle<()>) {
    let (tx, rx) = mpsc::channel(1024);
    let mut lines = BufReader::new(stream).lines();
    let log = log.clone();
    let reader = tokio::spawn(async move {
        while let Ok(Some(line)) = lines.next_line().await {
            log.lock().push_str(&format!("{label}: {line}\n"));
            let _ = tx.try_send(line);
        }
    });
    (rx, reader)
}

impl Peer {
    /// Starts `command` (already holding the `connect` arguments).
    fn spawn(name: &str, mut command: Command) -> Peer {
        let mut child = command
            .env("RUST_LOG", "warn")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("{name}: cannot start: {e}"));
        let log = Arc::new(Mutex::new(String::new()));
        let (stdout, out_reader) = read_lines(child.stdout.take().unwrap(), "stdout", &log);
        let (stderr, err_reader) = read_lines(child.stderr.take().unwrap(), "stderr", &log);
        Peer {
            name: name.into(),
            stdin: child.stdin.take(),
            child,
            stdout,
            stderr,
            seen: Vec::new(),
            log,
            readers: vec![out_reader, err_reader],
        }
    }

    /// After the exit: waits until the output is read to its end, so that
    /// [`Peer::output`] holds all of it (the last lines may still be in the
    /// pipes when the exit is seen).
    async fn read_to_end(&mut self) {
        for reader in self.readers.drain(..) {
            if timeout(STEP, reader).await.is_err() {
                panic!("{}: output still open after the exit", self.name);
            }
        }
        while let Ok(line) = self.stderr.try_recv() {
            self.seen.push((line, false));
        }
    }

    fn output(&self) -> String {
        format!("--- {}:\n{}", self.name, self.log.lock())
    }

    /// Waits for the first stderr line containing `needle` that was not
    /// returned before (lines from different tasks may come in any order).
    async fn stderr_line(&mut self, needle: &str) -> String {
        let found = timeout(STEP, async {
            loop {
                if let Some((line, taken)) = self
                    .seen
                    .iter_mut()
                    .find(|(line, taken)| !*taken && line.contains(needle))
                {
                    *taken = true;
                    return Some(line.clone());
                }
                self.seen.push((self.stderr.recv().await?, false));
            }
        })
        .await;
        match found {
            Ok(Some(line)) => line,
            _ => panic!(
                "{}: no stderr line with {needle:?}\n{}",
                self.name,
                self.output()
            ),
        }
    }

    /// The states reported for `agent` so far, in order.
    fn states(&self, agent: u64) -> Vec<String> {
        let suffix = format!(" (agent {agent})");
        self.seen
            .iter()
            .filter_map(|(line, _)| Some(line.split_once(" state ")?.1.split_once(&suffix)?.0))
            .map(str::to_string)
            .collect()
    }

    async fn send_line(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().expect("stdin open");
        timeout(STEP, stdin.write_all(format!("{line}\n").as_bytes()))
            .await
            .expect("write in time")
            .expect("write to stdin");
        timeout(STEP, stdin.flush()).await.unwrap().unwrap();
    }

    /// The next stdout line.
    async fn stdout_line(&mut self) -> String {
        match timeout(STEP, self.stdout.recv()).await {
            Ok(Some(line)) => line,
            _ => panic!("{}: no stdout line\n{}", self.name, self.output()),
        }
    }

    /// Sends `line` until it arrives at `to` (datagrams of a connection that is
    /// just being replaced may be lost); returns how many were sent.
    async fn deliver(&mut self, to: &mut Peer, line: &str) -> usize {
        for attempt in 1..=20 {
            self.send_line(line).await;
            if let Ok(Some(got)) = timeout(Duration::from_millis(500), to.stdout.recv()).await {
                assert_eq!(got, line, "{}{}", self.output(), to.output());
                return attempt;
            }
        }
        panic!("{line:?} never arrived\n{}{}", self.output(), to.output());
    }

    /// Closes stdin and waits for the exit.
    async fn finish(mut self) -> (ExitStatus, String) {
        drop(self.stdin.take());
        self.exit_within(STEP, "stdin closed").await
    }

    /// Sends a signal (`kill` option, e.g. `-TERM`) with stdin left open;
    /// waits a few seconds at most for the exit.
    async fn signal_and_wait(self, signal: &str) -> (ExitStatus, String) {
        let pid = self.child.id().expect("running").to_string();
        let kill = std::process::Command::new("kill")
            .args([signal, &pid])
            .status()
            .expect("kill runs");
        assert!(kill.success());
        self.exit_within(Duration::from_secs(5), &format!("kill {signal}"))
            .await
    }

    /// Waits up to `limit` for the exit `after` something, then for the
    /// rest of the output; returns the status and the whole output.
    async fn exit_within(mut self, limit: Duration, after: &str) -> (ExitStatus, String) {
        let status = match timeout(limit, self.child.wait()).await {
            Ok(Ok(status)) => status,
            _ => panic!(
                "{}: still running {limit:?} after {after}\n{}",
                self.name,
                self.output()
            ),
        };
        self.read_to_end().await;
        (status, self.output())
    }

    /// SIGKILL: no goodbye of any kind.
    async fn kill(mut self) {
        self.child.kill().await.expect("kill");
    }
}

fn connect_args(command: &mut Command, backend: &str, key: &Path, peer: &Key) {
    command.args(["connect", "--backend", backend, "--key-file"]);
    command.arg(key);
    command.args(["--peer", &peer.to_string()]);
}

/// The agent number and ufrags of a `connected, ...` line.
fn connected_line(line: &str) -> (u64, String, String) {
    let field = |name: &str| {
        line.split(&format!("{name} "))
            .nth(1)
            .and_then(|rest| rest.split([',', ')']).next())
            .unwrap_or_else(|| panic!("no {name} in {line:?}"))
            .to_string()
    };
    (
        field("agent").parse().expect("agent number"),
        field("local ufrag"),
        field("remote ufrag"),
    )
}

/// The local and remote addresses of a `selected candidate pair` line. Ours
/// is a host candidate; the peer's is host, or peer-reflexive when its check
/// arrived before its candidate did (the same address, learned from the check).
fn selected_pair(line: &str) -> (SocketAddr, SocketAddr) {
    let pair = line
        .split_once("selected candidate pair ")
        .and_then(|(_, pair)| pair.rsplit_once(" (agent "))
        .map(|(pair, _)| pair)
        .unwrap_or_else(|| panic!("not a selected pair: {line:?}"));
    let (local, remote) = pair
        .split_once(" <-> ")
        .unwrap_or_else(|| panic!("no <-> in {line:?}"));
    let address = |candidate: &str, kinds: &[&str]| -> SocketAddr {
        match candidate.split(' ').collect::<Vec<_>>()[..] {
            [kind, "udp4", address] if kinds.contains(&kind) => {
                address.parse().unwrap_or_else(|e| panic!("{line:?}: {e}"))
            }
            _ => panic!("unexpected candidate {candidate:?} in {line:?}"),
        }
    };
    (
        address(local, &["host"]),
        address(remote, &["host", "prflx"]),
    )
}

/// The pairs `a` and `b` selected: each the mirror of the other.
async fn selected_pairs(a: &mut Peer, b: &mut Peer) -> (SocketAddr, SocketAddr) {
    let (a_local, a_remote) = selected_pair(&a.stderr_line("selected candidate pair").await);
    let (b_local, b_remote) = selected_pair(&b.stderr_line("selected candidate pair").await);
    assert_eq!((a_local, a_remote), (b_remote, b_local), "mirrored pairs");
    (a_local, b_local)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_on_loopback_through_the_grpc_server_and_after_a_kill() {
    let mut config = Config::default();
    config.listen = SocketAddr::from((Ipv4Addr::LOCALHOST, 0));
    // A STUN server on loopback where nothing answers: a takes it from the
    // server's RelayRegistry, asks it in vain, and connects with host candidates.
    config.relays = vec!["stun:127.0.0.1:9".parse().unwrap()];
    let server = Server::spawn(config).await.expect("server starts");
    let url = format!("grpc://{}?insecure=true", server.local_addr());
    let dir = tempfile::tempdir().unwrap();
    let (ka, kb) = (PrivateKey::generate(), PrivateKey::generate());
    let (fa, fb) = (
        key_file(dir.path(), "a", &ka),
        key_file(dir.path(), "b", &kb),
    );
    let start = |name: &str, key: &Path, peer: &Key, extra: &[&str]| {
        let mut command = Command::new(BIN);
        connect_args(&mut command, &url, key, peer);
        command.args(["--address", "127.0.0.1"]).args(extra);
        Peer::spawn(name, command)
    };
    let mut a = start("a", &fa, &kb.public_key(), &["--relays-from-server"]);
    let mut b = start("b", &fb, &ka.public_key(), &[]);
    a.stderr_line(&format!("1 relay(s) from {url}")).await;

    // The smaller key controls and dials; the other accepts.
    let a_controls = ka.public_key() < kb.public_key();
    let (a_role, b_role) = if a_controls {
        ("controlling (dials)", "controlled (accepts)")
    } else {
        ("controlled (accepts)", "controlling (dials)")
    };
    a.stderr_line(a_role).await;
    b.stderr_line(b_role).await;
    for p in [&mut a, &mut b] {
        p.stderr_line("state Connected (agent 1)").await;
        assert_eq!(
            p.states(1),
            [
                "Creating",
                "Idle",
                "Gathering",
                "Connecting",
                "Checking",
                "Connected"
            ],
            "{}",
            p.output()
        );
    }
    let a1 = connected_line(&a.stderr_line("connected, ").await);
    let b1 = connected_line(&b.stderr_line("connected, ").await);
    assert_eq!((a1.0, b1.0), (1, 1));
    assert_eq!(
        (&a1.2, &b1.2),
        (&b1.1, &a1.1),
        "each uses the other's credentials"
    );
    let (a_address, b_address) = selected_pairs(&mut a, &mut b).await;
    assert_eq!(a_address.ip(), Ipv4Addr::LOCALHOST);
    assert_eq!(b_address.ip(), Ipv4Addr::LOCALHOST);

    // Lines both ways, as they are.
    a.send_line("hello from a").await;
    assert_eq!(b.stdout_line().await, "hello from a");
    b.send_line("hello from b").await;
    b.send_line("").await;
    b.send_line("  spaces kept  ").await;
    assert_eq!(a.stdout_line().await, "hello from b");
    assert_eq!(a.stdout_line().await, "");
    assert_eq!(a.stdout_line().await, "  spaces kept  ");

    // b is killed and started again with the same key: the session comes back
    // with new credentials, and lines flow again.
    b.kill().await;
    let mut b = start("b again", &fb, &ka.public_key(), &[]);
    let b2 = connected_line(&b.stderr_line("connected, ").await);
    let a2 = loop {
        let line = connected_line(&a.stderr_line("connected, ").await);
        if line.2 == b2.1 {
            break line;
        }
    };
    assert!(a2.0 > a1.0, "a made a new agent: {a2:?}");
    assert_ne!(a2.1, a1.1, "a has new credentials");
    assert_ne!(b2.1, b1.1, "b has new credentials");
    assert_eq!(b2.2, a2.1);
    a.stderr_line(&format!("state Closing (agent {})", a1.0))
        .await;
    a.deliver(&mut b, "after the restart, from a").await;
    b.deliver(&mut a, "after the restart, from b").await;

    // stdin closes: both exit 0.
    for p in [a, b] {
        let (status, output) = p.finish().await;
        // Captured by libtest: shown with --nocapture or when the test fails.
        println!("{output}");
        assert!(status.success(), "{status}\n{output}");
        assert!(output.contains("state Closed"), "{output}");
    }
}

/// Against a server that requires proof of key possession (docs/PROTOCOL.md §11),
/// `connect` works unchanged: it proves its key when it subscribes,
/// publishes and asks for relays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_through_a_server_that_requires_proofs() {
    let mut config = Config::default();
    config.listen = SocketAddr::from((Ipv4Addr::LOCALHOST, 0));
    config.relays = vec!["stun:127.0.0.1:9".parse().unwrap()];
    config.key = Some(PrivateKey::generate());
    config.auth = cunicu_signal_server::AuthMode::Required;
    let server = Server::spawn(config).await.expect("server starts");
    let url = format!("grpc://{}?insecure=true", server.local_addr());
    let dir = tempfile::tempdir().unwrap();
    let (ka, kb) = (PrivateKey::generate(), PrivateKey::generate());
    let (fa, fb) = (
        key_file(dir.path(), "a", &ka),
        key_file(dir.path(), "b", &kb),
    );
    let start = |name: &str, key: &Path, peer: &Key, extra: &[&str]| {
        let mut command = Command::new(BIN);
        connect_args(&mut command, &url, key, peer);
        command.args(["--address", "127.0.0.1"]).args(extra);
        Peer::spawn(name, command)
    };
    let mut a = start("a", &fa, &kb.public_key(), &["--relays-from-server"]);
    let mut b = start("b", &fb, &ka.public_key(), &[]);
    a.stderr_line(&format!("1 relay(s) from {url}")).await;
    for p in [&mut a, &mut b] {
        p.stderr_line("state Connected (agent 1)").await;
    }
    a.send_line("proven").await;
    assert_eq!(b.stdout_line().await, "proven");
    let text = server.metrics().encode();
    // Every result shows from the start, at 0.
    assert!(
        text.contains("signaling_auth_total{result=\"missing\"} 0\n"),
        "a call without a proof: {text}"
    );
    for p in [a, b] {
        let (status, output) = p.finish().await;
        assert!(status.success(), "{status}\n{output}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_in_two_namespaces_with_host_candidates_over_multicast() {
    let (na, nb) = (
        Netns::new("ica").unwrap_or_else(|e| panic!("{e:#}")),
        Netns::new("icb").unwrap_or_else(|e| panic!("{e:#}")),
    );
    let veth = Veth::link(&na, &nb).unwrap_or_else(|e| panic!("{e:#}"));
    let dir = tempfile::tempdir().unwrap();
    let (ka, kb) = (PrivateKey::generate(), PrivateKey::generate());
    let (fa, fb) = (
        key_file(dir.path(), "a", &ka),
        key_file(dir.path(), "b", &kb),
    );
    let pid = std::process::id();
    let group = format!(
        "239.255.{}.{}:{}",
        100 + pid % 100,
        1 + pid % 250,
        23000 + pid % 20000
    );
    let mut command = na.command(BIN);
    connect_args(
        &mut command,
        &format!("multicast://{group}?interface={}", veth.a),
        &fa,
        &kb.public_key(),
    );
    // One side limits gathering by interface, the other by address.
    command.args(["--interface", &veth.a]);
    let mut a = Peer::spawn("a (namespace A)", command);
    let mut command = nb.command(BIN);
    connect_args(
        &mut command,
        &format!("multicast://{group}?interface={}", veth.b),
        &fb,
        &ka.public_key(),
    );
    command.args(["--address", &veth.b_addr.to_string()]);
    let mut b = Peer::spawn("b (namespace B)", command);

    let a1 = connected_line(&a.stderr_line("connected, ").await);
    let b1 = connected_line(&b.stderr_line("connected, ").await);
    assert_eq!((&a1.2, &b1.2), (&b1.1, &a1.1));
    let (a_address, b_address) = selected_pairs(&mut a, &mut b).await;
    assert_eq!(a_address.ip(), veth.a_addr);
    assert_eq!(b_address.ip(), veth.b_addr);

    a.send_line("across the veth, from a").await;
    assert_eq!(b.stdout_line().await, "across the veth, from a");
    b.send_line("across the veth, from b").await;
    assert_eq!(a.stdout_line().await, "across the veth, from b");

    for p in [a, b] {
        let (status, output) = p.finish().await;
        // Captured by libtest: shown with --nocapture or when the test fails.
        println!("{output}");
        assert!(status.success(), "{status}\n{output}");
    }
}

/// A signaling server on loopback and a `connect` to a peer that never
/// shows up, candidates limited to 127.0.0.1, stdin closed from the start.
async fn lonely_connect(name: &str) -> (Server, Child, tempfile::TempDir) {
    let mut config = Config::default();
    config.listen = SocketAddr::from((Ipv4Addr::LOCALHOST, 0));
    let server = Server::spawn(config).await.expect("server starts");
    let url = format!("grpc://{}?insecure=true", server.local_addr());
    let dir = tempfile::tempdir().unwrap();
    let key = key_file(dir.path(), name, &PrivateKey::generate());
    let mut command = Command::new(BIN);
    connect_args(
        &mut command,
        &url,
        &key,
        &PrivateKey::generate().public_key(),
    );
    let child = command
        .args(["--address", "127.0.0.1"])
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("connect starts");
    (server, child, dir)
}

/// Waits (a few seconds at most) for the exit; returns the status and stderr.
async fn exit_soon(name: &str, mut child: Child) -> (ExitStatus, String) {
    let mut stderr = child.stderr.take().unwrap();
    let read = tokio::spawn(async move {
        let mut text = String::new();
        let _ = tokio::io::AsyncReadExt::read_to_string(&mut stderr, &mut text).await;
        text
    });
    let Ok(status) = timeout(Duration::from_secs(5), child.wait()).await else {
        child.kill().await.unwrap();
        let stderr = read.await.unwrap();
        panic!("{name}: still running after 5 s\n{stderr}");
    };
    (status.unwrap(), read.await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_exits_when_stdin_closes_before_any_connection() {
    let (_server, child, _dir) = lonely_connect("alone").await;
    let (status, stderr) = exit_soon("alone", child).await;
    assert!(status.success(), "{status}\n{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_exits_on_sigterm_and_sigint_with_stdin_open() {
    let mut config = Config::default();
    config.listen = SocketAddr::from((Ipv4Addr::LOCALHOST, 0));
    let server = Server::spawn(config).await.expect("server starts");
    let url = format!("grpc://{}?insecure=true", server.local_addr());
    let dir = tempfile::tempdir().unwrap();
    let (ka, kb) = (PrivateKey::generate(), PrivateKey::generate());
    let (fa, fb) = (
        key_file(dir.path(), "a", &ka),
        key_file(dir.path(), "b", &kb),
    );
    let start = |name: &str, key: &Path, peer: &Key| {
        let mut command = Command::new(BIN);
        connect_args(&mut command, &url, key, peer);
        command.args(["--address", "127.0.0.1"]);
        Peer::spawn(name, command)
    };
    let mut a = start("a", &fa, &kb.public_key());
    // Lines read before any connection exists go out once one does.
    a.stderr_line("state Idle (agent 1)").await;
    a.send_line("early from a, 1").await;
    a.send_line("early from a, 2").await;
    let mut b = start("b", &fb, &ka.public_key());
    a.stderr_line("connected, ").await;
    b.stderr_line("connected, ").await;
    assert_eq!(b.stdout_line().await, "early from a, 1");
    assert_eq!(b.stdout_line().await, "early from a, 2");
    // Connected: both read stdin, which stays open (and quiet) from here on.
    b.send_line("from b").await;
    assert_eq!(a.stdout_line().await, "from b");

    let (status, output) = a.signal_and_wait("-TERM").await;
    assert!(status.success(), "{status}\n{output}");
    assert!(output.contains("SIGTERM: stopping"), "{output}");
    // b, whose peer is gone, on SIGINT.
    let (status, output) = b.signal_and_wait("-INT").await;
    assert!(status.success(), "{status}\n{output}");
    assert!(output.contains("SIGINT: stopping"), "{output}");
}

#[test]
fn connect_refuses_bad_arguments() {
    let dir = tempfile::tempdir().unwrap();
    let file = key_file(dir.path(), "k", &PrivateKey::generate());
    let peer = PrivateKey::generate().public_key().to_string();
    let run = |extra: &[&str]| {
        let output = std::process::Command::new(BIN)
            .args(["connect", "--backend", "inprocess:", "--key-file"])
            .arg(&file)
            .args(extra)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(!output.status.success());
        assert!(output.stdout.is_empty());
        String::from_utf8_lossy(&output.stderr).into_owned()
    };
    assert!(run(&["--peer", "abc"]).contains("--peer"));
    assert!(run(&["--peer", &Key::from([0; 32]).to_string()]).contains("low-order"));
    let err = run(&["--peer", &peer, "--stun", "http://x"]);
    assert!(err.contains("http://x"), "{err}");
    let err = run(&["--peer", &peer, "--relays-from-server"]);
    assert!(err.contains("needs a grpc:// backend"), "{err}");
    let err = run(&["--peer", &peer, "--address", "not-an-ip"]);
    assert!(err.contains("not-an-ip"), "{err}");
    // Limits that gather nothing are refused at once, with what exists.
    let err = run(&["--peer", &peer, "--interface", "nosuch0"]);
    assert!(
        err.contains("--interface nosuch0: no such interface here (interfaces: ")
            && err.contains("lo"),
        "{err}"
    );
    // Binding a socket to it fails; nothing is sent.
    let err = run(&["--peer", &peer, "--address", "192.0.2.1"]);
    assert!(
        err.contains("--address 192.0.2.1: not an address of this host"),
        "{err}"
    );
}

/// Two peers on loopback through a server of their own, connected.
async fn connected_pair() -> (Server, Peer, Peer, tempfile::TempDir) {
    let mut config = Config::default();
    config.listen = SocketAddr::from((Ipv4Addr::LOCALHOST, 0));
    let server = Server::spawn(config).await.expect("server starts");
    let url = format!("grpc://{}?insecure=true", server.local_addr());
    let dir = tempfile::tempdir().unwrap();
    let (ka, kb) = (PrivateKey::generate(), PrivateKey::generate());
    let (fa, fb) = (
        key_file(dir.path(), "a", &ka),
        key_file(dir.path(), "b", &kb),
    );
    let start = |name: &str, key: &Path, peer: &Key| {
        let mut command = Command::new(BIN);
        connect_args(&mut command, &url, key, peer);
        command.args(["--address", "127.0.0.1"]);
        Peer::spawn(name, command)
    };
    let mut a = start("a", &fa, &kb.public_key());
    let mut b = start("b", &fb, &ka.public_key());
    a.stderr_line("connected, ").await;
    b.stderr_line("connected, ").await;
    (server, a, b, dir)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_refuses_a_line_longer_than_one_datagram() {
    let (_server, mut a, mut b, _dir) = connected_pair().await;
    a.deliver(&mut b, "before").await;
    // The longest line that fits (8 000 bytes with its newline) goes as it is.
    let fits = "y".repeat(7999);
    a.deliver(&mut b, &fits).await;
    // A line of 1 MB: an error, and nothing of it arrives.
    let long = "x".repeat(1_000_000);
    let stdin = a.stdin.as_mut().expect("stdin open");
    // connect may stop reading before the whole line is written.
    let _ = timeout(STEP, stdin.write_all(format!("{long}\n").as_bytes())).await;
    let (status, output) = a.exit_within(STEP, "a long line").await;
    assert!(!status.success(), "{output}");
    assert!(
        output.contains("longer than one datagram (8000 bytes with its newline)"),
        "{output}"
    );
    // b got nothing more than the lines before it.
    let more = timeout(Duration::from_secs(2), b.stdout.recv()).await;
    assert!(
        !matches!(more, Ok(Some(_))),
        "b got more: {more:?}\n{}",
        b.output()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_says_what_it_waits_for_and_gives_up_when_told() {
    let mut config = Config::default();
    config.listen = SocketAddr::from((Ipv4Addr::LOCALHOST, 0));
    let server = Server::spawn(config).await.expect("server starts");
    let url = format!("grpc://{}?insecure=true", server.local_addr());
    let dir = tempfile::tempdir().unwrap();
    let (ka, kb) = (PrivateKey::generate(), PrivateKey::generate());
    let (fa, fb) = (
        key_file(dir.path(), "a", &ka),
        key_file(dir.path(), "b", &kb),
    );
    let start = |name: &str, key: &Path, peer: &Key, extra: &[&str]| {
        let mut command = Command::new(BIN);
        connect_args(&mut command, &url, key, peer);
        command.args(extra);
        Peer::spawn(name, command)
    };

    // Alone: the state lines carry their time and say what is awaited; after
    // --timeout, an error.
    let started = std::time::Instant::now();
    let mut a = start(
        "alone",
        &fa,
        &kb.public_key(),
        &["--address", "127.0.0.1", "--timeout", "2s"],
    );
    let idle = a.stderr_line("state Idle (agent 1)").await;
    let (time, what) = idle
        .strip_prefix("cunicu-signal: ")
        .and_then(|rest| rest.split_once(" state Idle (agent 1): "))
        .unwrap_or_else(|| panic!("{idle}"));
    assert!(
        humantime::parse_rfc3339(time).is_ok(),
        "not a time: {time:?} in {idle}"
    );
    assert!(
        what.contains("waiting for the peer's")
            && what.contains(&format!("--peer {}", ka.public_key())),
        "{idle}"
    );
    let (status, output) = a.exit_within(STEP, "--timeout 2s").await;
    assert!(!status.success(), "{output}");
    assert!(
        output.contains("no connection for --timeout 2s"),
        "{output}"
    );
    assert!(started.elapsed() >= Duration::from_secs(2), "{output}");

    // Limits that no local address passes (127.0.0.2 can be bound, but no
    // interface has it): once the peer's credentials come, gathering finds
    // nothing, and connect says so and exits instead of waiting forever.
    let mut a = start(
        "nothing",
        &fa,
        &kb.public_key(),
        &["--address", "127.0.0.2"],
    );
    let b = start("b", &fb, &ka.public_key(), &["--address", "127.0.0.1"]);
    a.stderr_line("state Gathering (agent 1)").await;
    let (status, output) = a.exit_within(STEP, "gathering nothing").await;
    assert!(!status.success(), "{output}");
    assert!(
        output.contains("no local candidate gathered (agent 1): no address passed --address 127.0.0.2 (interfaces here: "),
        "{output}"
    );
    b.kill().await;
}
