//! The multicast:// backend on real sockets, in network namespaces that the
//! tests create and delete (root and iproute2 needed): no datagram leaves them.
//!
//! A test that needs a namespace creates it and re-runs itself inside it
//! (`ip netns exec NS <this binary> --exact <test>`, see
//! `cunicu_signal_test_support::netns`). There `CUNICU_TEST_IN_NETNS` names
//! the test, and the test body runs the real test. The parent asserts the
//! child's exit status and that the child printed [`DONE`], so that a test
//! name that matches nothing cannot pass.
//!
//! On `lo` the kernel delivers every multicast datagram to every socket of the
//! namespace whatever `loopback` says; the `loopback` flag itself is tested on a
//! dummy interface, and `loopback=false` between hosts on a veth pair.

use std::{
    future::Future,
    net::{SocketAddr, UdpSocket as StdUdpSocket},
    process::ExitStatus,
    sync::Arc,
    time::Duration,
};

use cunicu_signal::{
    Backend, BackendError, ChannelHandler, Delivery, Handler, Key, KeyPair, PrivateKey, Registry,
    Sender, Transport,
    backend::{
        SignalingBackend, connect,
        multicast::{MAX_DATAGRAM, Multicast, MulticastError, SOURCE_BURST, SOURCE_RATE},
    },
    conformance::{Options, gated, message_for, run, subscribe_race},
    proto::{
        epdisc::Credentials,
        pdisc::PeerDescription,
        signaling::{BackendType, Envelope, Message},
    },
};
use cunicu_signal_test_support::netns::{IN_NETNS_ENV, Netns, Veth};
use parking_lot::Mutex;
use prost::Message as _;
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    sync::{mpsc, oneshot},
};

/// Printed by a child at the end of its test body.
const DONE: &str = "CUNICU-CHILD-DONE";
/// Printed by a child once it listens.
const READY: &str = "CUNICU-CHILD-READY";

/// How long one step (connect, subscribe, receive) may take.
const STEP: Duration = Duration::from_secs(10);
/// How long a child process may run.
const CHILD: Duration = Duration::from_secs(90);

fn in_netns(test: &str) -> bool {
    std::env::var(IN_NETNS_ENV).is_ok_and(|name| name == test)
}

async fn within<F: Future>(what: &str, limit: Duration, future: F) -> F::Output {
    match tokio::time::timeout(limit, future).await {
        Ok(output) => output,
        Err(_) => panic!("{what}: nothing within {limit:?}"),
    }
}

/// Waits until `condition` holds, checking every 10 ms.
async fn until(what: &str, mut condition: impl FnMut() -> bool) {
    within(what, STEP, async {
        while !condition() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
}

fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| panic!("{name} is not set"))
}

// ---------------------------------------------------------------- children --

/// A re-run of this test binary in a namespace.
struct Child {
    what: String,
    process: tokio::process::Child,
    stdin: Option<tokio::process::ChildStdin>,
    ready: Option<oneshot::Receiver<()>>,
    stdout: Arc<Mutex<String>>,
    stderr: Arc<Mutex<String>>,
    readers: Vec<tokio::task::JoinHandle<()>>,
}

impl Child {
    fn spawn(ns: &Netns, test: &str, envs: &[(&str, String)]) -> Child {
        let what = format!("{test} in {}", ns.name());
        let mut command = ns
            .exec_test(test)
            .unwrap_or_else(|e| panic!("{what}: {e:#}"));
        command.envs(envs.iter().map(|(k, v)| (k, v)));
        let mut process = command
            .spawn()
            .unwrap_or_else(|e| panic!("{what}: could not start `ip netns exec`: {e}"));
        let stdin = process.stdin.take();
        let out = process.stdout.take().expect("stdout is piped");
        let err = process.stderr.take().expect("stderr is piped");
        let stdout = Arc::new(Mutex::new(String::new()));
        let stderr = Arc::new(Mutex::new(String::new()));
        let (ready_tx, ready) = oneshot::channel();
        let out_log = stdout.clone();
        let out_reader = tokio::spawn(async move {
            let mut ready_tx = Some(ready_tx);
            let mut lines = BufReader::new(out).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                // libtest may print `test NAME ... ` in front of the marker.
                if line.contains(READY)
                    && let Some(tx) = ready_tx.take()
                {
                    let _ = tx.send(());
                }
                let mut log = out_log.lock();
                log.push_str(&line);
                log.push('\n');
            }
        });
        let err_log = stderr.clone();
        let err_reader = tokio::spawn(async move {
            let mut lines = BufReader::new(err).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let mut log = err_log.lock();
                log.push_str(&line);
                log.push('\n');
            }
        });
        Child {
            what,
            process,
            stdin,
            ready: Some(ready),
            stdout,
            stderr,
            readers: vec![out_reader, err_reader],
        }
    }

    fn output(&self) -> String {
        format!(
            "--- stdout of {}:\n{}--- stderr:\n{}",
            self.what,
            self.stdout.lock(),
            self.stderr.lock()
        )
    }

    /// Waits until the child printed [`READY`].
    async fn ready(&mut self) {
        let ready = self.ready.take().expect("ready() is called once");
        match tokio::time::timeout(STEP * 3, ready).await {
            Ok(Ok(())) => {}
            _ => panic!(
                "{} did not get ready (exit: {:?})\n{}",
                self.what,
                self.process.try_wait(),
                self.output()
            ),
        }
    }

    /// Tells the child to go on.
    async fn go(&mut self) {
        let stdin = self.stdin.as_mut().expect("stdin is piped");
        within("writing to a child", STEP, stdin.write_all(b"go\n"))
            .await
            .unwrap_or_else(|e| panic!("{}: cannot write to it: {e}", self.what));
        within("flushing a child's stdin", STEP, stdin.flush())
            .await
            .unwrap_or_else(|e| panic!("{}: cannot write to it: {e}", self.what));
    }

    /// Waits for the end of the child; panics unless it passed and reached [`DONE`].
    async fn passed(mut self) {
        drop(self.stdin.take());
        let status: ExitStatus = match tokio::time::timeout(CHILD, self.process.wait()).await {
            Ok(Ok(status)) => status,
            Ok(Err(e)) => panic!("{}: wait failed: {e}", self.what),
            Err(_) => panic!(
                "{} still runs after {CHILD:?}\n{}",
                self.what,
                self.output()
            ),
        };
        for reader in self.readers.drain(..) {
            let _ = tokio::time::timeout(STEP, reader).await;
        }
        // Captured by libtest: shown when the test fails.
        println!("{}", self.output());
        assert!(
            status.success(),
            "{} failed ({status})\n{}",
            self.what,
            self.output()
        );
        assert!(
            self.stdout.lock().contains(DONE),
            "{} exited without running its body (wrong test name?)\n{}",
            self.what,
            self.output()
        );
    }
}

/// Runs `test` in `ns` and asserts that it passed.
async fn run_in(ns: &Netns, test: &str) {
    Child::spawn(ns, test, &[]).passed().await
}

/// A namespace in which multicast loops on `lo`.
fn lo_namespace(tag: &str) -> Netns {
    let ns = Netns::new(tag).unwrap_or_else(|e| panic!("{e:#}"));
    ns.multicast_on_lo().unwrap_or_else(|e| panic!("{e:#}"));
    ns
}

// --------------------------------------------------------------- helpers --

async fn multicast(url: &str, registry: Arc<Registry>) -> Multicast {
    let parsed = url::Url::parse(url).unwrap();
    within("connect", STEP, Multicast::connect(&parsed, registry))
        .await
        .unwrap_or_else(|e| panic!("{url}: {e}"))
}

/// A transport listening for what `ours` gets from `from`, with a channel of
/// what it delivers.
async fn listener(
    url: &str,
    ours: &PrivateKey,
    from: Sender,
) -> (Multicast, Arc<Registry>, mpsc::Receiver<Delivery>) {
    let registry = Registry::new();
    let transport = multicast(url, registry.clone()).await;
    let (handler, rx) = ChannelHandler::new(64);
    registry.add(ours, from, handler as Arc<dyn Handler>);
    within("listen", STEP, transport.listen(ours.public_key()))
        .await
        .unwrap();
    (transport, registry, rx)
}

fn credentials(ufrag: String) -> Message {
    Message {
        credentials: Some(Credentials {
            ufrag,
            pwd: "pwd".into(),
            need_creds: false,
        }),
        ..Default::default()
    }
}

/// An envelope from `pair` whose encoding is exactly `size` bytes.
fn envelope_of_size(pair: &KeyPair, size: usize) -> (Message, Envelope) {
    // The sealed envelope is about 130 bytes longer than the ufrag.
    for n in size.saturating_sub(400)..size {
        let message = credentials("u".repeat(n));
        let envelope = message.seal(pair).unwrap();
        match envelope.encoded_len().cmp(&size) {
            std::cmp::Ordering::Less => continue,
            std::cmp::Ordering::Equal => return (message, envelope),
            std::cmp::Ordering::Greater => break,
        }
    }
    panic!("no envelope of exactly {size} bytes");
}

/// A raw UDP socket on the host's side of the group, to send arbitrary datagrams.
fn raw_sender() -> StdUdpSocket {
    let socket = StdUdpSocket::bind("0.0.0.0:0").unwrap();
    socket.set_multicast_loop_v4(true).unwrap();
    socket.set_multicast_ttl_v4(1).unwrap();
    socket
}

// ----------------------------------------------------------- URL errors --

#[tokio::test]
async fn url_errors_say_what_is_wrong() {
    for (url, reason) in [
        (
            "multicast://10.1.2.3:7000",
            "10.1.2.3 is not a multicast group",
        ),
        ("multicast://[2001:db8::1]:7000", "is not a multicast group"),
        (
            "multicast://239.255.77.1:7000?ttl=2",
            "unknown parameter \"ttl\"",
        ),
        (
            "multicast://239.255.77.1:7000?loopback=sometimes",
            "parameter loopback=\"sometimes\" is not a boolean",
        ),
        ("multicast://239.255.77.1", "no port"),
        ("multicast://239.255.77.1:0", "port 0"),
        ("multicast://[ff02::77]:7000", "name the interface"),
        // Fails when the socket is bound to the interface: nothing is sent.
        (
            "multicast://239.255.77.1:7000?interface=nosuchif77",
            "there is no network interface \"nosuchif77\"",
        ),
    ] {
        let err = within("connect", STEP, connect(&[url]))
            .await
            .expect_err(url);
        assert!(
            matches!(err, BackendError::Url { .. }),
            "{url}: expected a URL error, got {err:?}"
        );
        assert!(err.to_string().contains(reason), "{url}: {err}");
    }
}

// ---------------------------------------------------------- conformance --

/// The conformance suite with six peers, each with its own backend (and socket)
/// on the group.
async fn conformance(url: &'static str) {
    let options = Options {
        peers: 6,
        timeout: Duration::from_secs(20),
        settle: Duration::from_millis(300),
    };
    within(
        "conformance suite",
        Duration::from_secs(60),
        run(options, |_| async move {
            let backend = within("connect", STEP, connect(&[url])).await?;
            assert_eq!(backend.backend_type(), BackendType::Mcast);
            Ok::<Arc<dyn Backend>, BackendError>(Arc::new(backend))
        }),
    )
    .await;
}

#[tokio::test]
async fn conformance_ipv4_on_lo() {
    const TEST: &str = "conformance_ipv4_on_lo";
    if in_netns(TEST) {
        conformance("multicast://239.255.77.1:7701?interface=lo&loopback=true").await;
        println!("{DONE}");
        return;
    }
    let ns = lo_namespace("conf4");
    run_in(&ns, TEST).await;
}

#[tokio::test]
async fn conformance_ipv6_on_lo() {
    const TEST: &str = "conformance_ipv6_on_lo";
    if in_netns(TEST) {
        conformance("multicast://[ff02::77:1]:7701?interface=lo&loopback=true").await;
        println!("{DONE}");
        return;
    }
    let ns = lo_namespace("conf6");
    run_in(&ns, TEST).await;
}

#[tokio::test]
async fn conformance_ipv6_site_scope_default_interface() {
    const TEST: &str = "conformance_ipv6_site_scope_default_interface";
    if in_netns(TEST) {
        // No interface: the kernel picks it from the route for ff00::/8.
        conformance("multicast://[ff15::77:2]:7702?loopback=true").await;
        println!("{DONE}");
        return;
    }
    let ns = lo_namespace("conf6s");
    run_in(&ns, TEST).await;
}

// ------------------------------------------------------ subscribe race --

/// An envelope that arrives while a subscription's listen is under way, and
/// one sent right after subscribe returned, are delivered once each; a
/// subscribe dropped midway leaves nothing behind (`conformance::subscribe_race`).
#[tokio::test]
async fn subscribe_race_on_lo() {
    const TEST: &str = "subscribe_race_on_lo";
    if in_netns(TEST) {
        const URL: &str = "multicast://239.255.77.8:7708?interface=lo&loopback=true";
        let registry = Registry::new();
        let medium = Arc::new(multicast(URL, registry.clone()).await);
        let (transport, gate) = gated(medium.clone());
        let backend = Arc::new(SignalingBackend::new(Box::new(transport), registry));
        let publisher: Arc<dyn Backend> =
            Arc::new(within("connect", STEP, connect(&[URL])).await.unwrap());
        let options = Options {
            timeout: STEP,
            settle: Duration::from_millis(200),
            ..Options::default()
        };
        subscribe_race(backend, gate, publisher, &options).await;
        // Three envelopes to our keys, each handed to the registry once.
        assert_eq!(medium.stats().handed_over, 3, "{:?}", medium.stats());
        println!("{DONE}");
        return;
    }
    let ns = lo_namespace("race");
    run_in(&ns, TEST).await;
}

// ------------------------------------------- two hosts on a veth pair --

/// Copies of its one envelope each side sends (UDP may lose one; the registry
/// drops the copies that arrive).
const REPEATS: u64 = 5;

/// One side of [`veth_exchange`]: listen, say READY, wait for "go", send
/// [`REPEATS`] copies of one envelope, then check what arrived from the other side.
async fn veth_peer() {
    let ours: PrivateKey = env("CUNICU_TEST_OURS").parse().unwrap();
    let theirs: Key = env("CUNICU_TEST_THEIRS").parse().unwrap();
    let url = env("CUNICU_TEST_URL");
    let our_public = ours.public_key();

    let registry = Registry::new();
    let transport = Arc::new(multicast(&url, registry.clone()).await);
    let backend = SignalingBackend::new(Box::new(transport.clone()), registry.clone());
    let (handler, mut rx) = ChannelHandler::new(16);
    let first = within(
        "subscribe",
        STEP,
        backend.subscribe(&ours, Sender::Key(theirs), handler),
    )
    .await
    .unwrap();
    assert!(first);
    println!("\n{READY}");

    let mut line = String::new();
    within(
        "\"go\" from the parent",
        STEP * 3,
        BufReader::new(tokio::io::stdin()).read_line(&mut line),
    )
    .await
    .unwrap();
    assert_eq!(line.trim(), "go");

    // The same envelope each time, so that the registry recognises the copies.
    let envelope = message_for(1, &our_public, &theirs)
        .seal(&KeyPair::new(ours.clone(), theirs))
        .unwrap();
    for _ in 0..REPEATS {
        within("send", STEP, backend.transport().send(&envelope))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let delivery = within("the other side's message", STEP, rx.recv())
        .await
        .expect("handler channel open");
    assert_eq!(delivery.sender, theirs, "sender");
    assert_eq!(delivery.recipient, our_public, "recipient");
    assert_eq!(
        delivery.message,
        message_for(1, &theirs, &our_public),
        "content"
    );

    // Every copy the other side sent arrives (veth loses nothing at this rate),
    // and nothing else: with loopback=false we do not hear our own datagrams.
    until("all copies", || transport.stats().handed_over == REPEATS).await;
    within("the registry's worker", STEP, registry.flush()).await;
    let stats = transport.stats();
    assert_eq!(stats.sent, REPEATS);
    assert_eq!(stats.received, REPEATS, "{stats:?}");
    assert_eq!(stats.not_ours, 0, "heard our own datagrams: {stats:?}");
    assert_eq!(stats.not_envelopes, 0, "{stats:?}");
    let reg = registry.stats();
    assert_eq!(reg.opened, 1, "{reg:?}");
    assert_eq!(reg.delivered, 1, "{reg:?}");
    assert_eq!(reg.dropped_duplicate, REPEATS - 1, "{reg:?}");
    assert_eq!(reg.dropped_invalid, 0, "{reg:?}");
    assert_eq!(reg.dropped_no_subscriber, 0, "{reg:?}");
    assert!(rx.try_recv().is_err(), "a second delivery");

    within("close", STEP, backend.close()).await.unwrap();
}

/// Two namespaces joined by a veth pair, one process in each; each sends one
/// message to the other through `group` with loopback=false.
async fn veth_exchange(test: &str, tag: &str, group: &str) {
    let a = Netns::new(&format!("{tag}a")).unwrap_or_else(|e| panic!("{e:#}"));
    let b = Netns::new(&format!("{tag}b")).unwrap_or_else(|e| panic!("{e:#}"));
    let veth = Veth::link(&a, &b).unwrap_or_else(|e| panic!("{e:#}"));
    let (key_a, key_b) = (PrivateKey::generate(), PrivateKey::generate());
    let side = |ns: &Netns, ours: &PrivateKey, theirs: &PrivateKey, dev: &str| {
        Child::spawn(
            ns,
            test,
            &[
                ("CUNICU_TEST_OURS", ours.secret_base64().to_string()),
                ("CUNICU_TEST_THEIRS", theirs.public_key().to_string()),
                (
                    "CUNICU_TEST_URL",
                    format!("multicast://{group}?interface={dev}&loopback=false"),
                ),
            ],
        )
    };
    let mut child_a = side(&a, &key_a, &key_b, &veth.a);
    let mut child_b = side(&b, &key_b, &key_a, &veth.b);
    child_a.ready().await;
    child_b.ready().await;
    child_a.go().await;
    child_b.go().await;
    child_a.passed().await;
    child_b.passed().await;
}

#[tokio::test]
async fn veth_two_hosts_ipv4() {
    const TEST: &str = "veth_two_hosts_ipv4";
    if in_netns(TEST) {
        veth_peer().await;
        println!("{DONE}");
        return;
    }
    veth_exchange(TEST, "v4", "239.255.77.3:7703").await;
}

#[tokio::test]
async fn veth_two_hosts_ipv6() {
    const TEST: &str = "veth_two_hosts_ipv6";
    if in_netns(TEST) {
        veth_peer().await;
        println!("{DONE}");
        return;
    }
    veth_exchange(TEST, "v6", "[ff02::77:3]:7703").await;
}

// ------------------------------------------------------- the 4096 limit --

#[tokio::test]
async fn envelopes_over_4096_bytes_are_refused_before_sending() {
    const TEST: &str = "envelopes_over_4096_bytes_are_refused_before_sending";
    if !in_netns(TEST) {
        let ns = lo_namespace("limit");
        return run_in(&ns, TEST).await;
    }
    const URL: &str = "multicast://239.255.77.4:7704?interface=lo&loopback=true";
    let (a, b) = (PrivateKey::generate(), PrivateKey::generate());
    let to_b = KeyPair::new(a.clone(), b.public_key());
    let (receiver, registry, mut rx) = listener(URL, &b, Sender::Key(a.public_key())).await;
    let sender = multicast(URL, Registry::new()).await;

    let big = Message {
        peer: Some(PeerDescription {
            name: "big".into(),
            allowed_ips: (0..400)
                .map(|i| format!("10.{}.{}.0/24", i / 256, i % 256))
                .collect(),
            ..Default::default()
        }),
        ..Default::default()
    }
    .seal(&to_b)
    .unwrap();
    let size = big.encoded_len();
    assert!(size > MAX_DATAGRAM);
    let err = within("send", STEP, sender.send(&big)).await.unwrap_err();
    let BackendError::Transport { ref source, .. } = err else {
        panic!("expected a transport error, got {err:?}");
    };
    assert!(
        matches!(
            source.downcast_ref::<MulticastError>(),
            Some(MulticastError::TooLarge { size: s, limit: 4096 }) if *s == size
        ),
        "{err:?}"
    );
    let text = err.to_string();
    assert!(
        text.contains(&format!("envelope is {size} bytes")) && text.contains("4096"),
        "{text}"
    );
    assert_eq!(sender.stats().sent, 0);

    // One of exactly 4096 bytes goes, arrives whole and opens.
    let (message, exact) = envelope_of_size(&to_b, MAX_DATAGRAM);
    within("send", STEP, sender.send(&exact)).await.unwrap();
    let delivery = within("the 4096-byte envelope", STEP, rx.recv())
        .await
        .unwrap();
    assert_eq!(delivery.message, message);
    assert_eq!(delivery.sender, a.public_key());
    assert_eq!(sender.stats().sent, 1);
    until("the datagram is counted", || {
        receiver.stats().handed_over == 1
    })
    .await;
    // The refused envelope never reached the group.
    assert_eq!(receiver.stats().received, 1, "{:?}", receiver.stats());
    assert_eq!(registry.stats().opened, 1);
    println!("{DONE}");
}

// ------------------------------------------------- not envelopes, strays --

#[tokio::test]
async fn datagrams_that_are_not_envelopes_are_counted_not_delivered() {
    const TEST: &str = "datagrams_that_are_not_envelopes_are_counted_not_delivered";
    if !in_netns(TEST) {
        let ns = lo_namespace("junk");
        return run_in(&ns, TEST).await;
    }
    // No interface: the kernel picks `lo` from the route for 224.0.0.0/4.
    const URL: &str = "multicast://239.255.77.5:7705";
    let group: SocketAddr = "239.255.77.5:7705".parse().unwrap();
    let (a, b, c) = (
        PrivateKey::generate(),
        PrivateKey::generate(),
        PrivateKey::generate(),
    );
    let (receiver, registry, mut rx) = listener(URL, &b, Sender::Any).await;

    let to_b = KeyPair::new(a.clone(), b.public_key());
    let mut short_recipient = credentials("x".into()).seal(&to_b).unwrap();
    short_recipient.recipient.truncate(5);
    let (_, oversized) = envelope_of_size(&to_b, MAX_DATAGRAM + 1);
    // A whole envelope of 4096 bytes and then an unknown field: cut to 4096
    // bytes, it would open; whole, it is more than a datagram may carry.
    let (_, exact) = envelope_of_size(&to_b, MAX_DATAGRAM);
    let mut with_tail = exact.encode_to_vec();
    with_tail.extend_from_slice(&[0x78, 0x01]); // field 15, varint 1
    assert!(Envelope::from_bytes(&with_tail).is_ok());
    let for_c = credentials("for c".into())
        .seal(&KeyPair::new(a.clone(), c.public_key()))
        .unwrap();
    let good = credentials("for b".into()).seal(&to_b).unwrap();

    let raw = raw_sender();
    for datagram in [
        vec![0xff; 16],                  // not protobuf
        Vec::new(),                      // an empty message: no recipient
        short_recipient.encode_to_vec(), // recipient of 5 bytes
        oversized.encode_to_vec(),       // a real envelope, but 4097 bytes
        with_tail,                       // a real envelope of 4096 bytes, and more
        for_c.encode_to_vec(),           // someone else's: ignored quietly
        good.encode_to_vec(),
    ] {
        raw.send_to(&datagram, group).unwrap();
    }

    let delivery = within("the good envelope", STEP, rx.recv()).await.unwrap();
    assert_eq!(delivery.message, credentials("for b".into()));
    assert_eq!(delivery.sender, a.public_key());
    until("all seven datagrams", || receiver.stats().received == 7).await;
    until("the last one handled", || {
        let s = receiver.stats();
        s.not_envelopes + s.not_ours + s.handed_over == 7
    })
    .await;
    within("the registry's worker", STEP, registry.flush()).await;
    let stats = receiver.stats();
    assert_eq!(stats.not_envelopes, 5, "{stats:?}");
    assert_eq!(stats.read_errors, 0, "{stats:?}");
    assert_eq!(stats.not_ours, 1, "{stats:?}");
    assert_eq!(stats.handed_over, 1, "{stats:?}");
    let reg = registry.stats();
    assert_eq!((reg.opened, reg.dropped_invalid), (1, 0), "{reg:?}");
    assert!(rx.try_recv().is_err(), "a second delivery");
    println!("{DONE}");
}

// ------------------------------------------------- a flooding source --

/// A UDP socket with the source address `ip` (any of 127.0.0.0/8 is on `lo`).
fn sender_from(ip: &str) -> StdUdpSocket {
    let socket = StdUdpSocket::bind((ip, 0)).unwrap();
    socket.set_multicast_loop_v4(true).unwrap();
    socket.set_multicast_ttl_v4(1).unwrap();
    socket
}

#[tokio::test]
async fn a_flooding_source_is_limited_before_opening_and_others_get_through() {
    const TEST: &str = "a_flooding_source_is_limited_before_opening_and_others_get_through";
    if !in_netns(TEST) {
        let ns = lo_namespace("flood");
        return run_in(&ns, TEST).await;
    }
    const URL: &str = "multicast://239.255.77.8:7708?interface=lo&loopback=true";
    let group: SocketAddr = "239.255.77.8:7708".parse().unwrap();
    let (a, b) = (PrivateKey::generate(), PrivateKey::generate());
    let (receiver, registry, mut rx) = listener(URL, &b, Sender::Any).await;

    // Forged envelopes to b, each from a made-up sender: every one that got
    // through would cost b an X25519.
    const FLOOD: u64 = 2_000;
    let forged = |i: u64| {
        let mut envelope = credentials(format!("forged {i}"))
            .seal(&KeyPair::new(PrivateKey::generate(), b.public_key()))
            .unwrap();
        envelope.contents.as_mut().unwrap().body[20] ^= 1;
        envelope.encode_to_vec()
    };
    let datagrams: Vec<Vec<u8>> = (0..FLOOD).map(forged).collect();
    let genuine = credentials("genuine".into())
        .seal(&KeyPair::new(a.clone(), b.public_key()))
        .unwrap()
        .encode_to_vec();
    let flooder = sender_from("127.0.0.2");
    let other = sender_from("127.0.0.3");
    let started = std::time::Instant::now();
    let mut sent = 0u64;
    for (i, datagram) in datagrams.iter().enumerate() {
        flooder.send_to(datagram, group).unwrap();
        sent += 1;
        // Another host, while the flooder is far over its limit.
        if i as u64 == FLOOD / 2 {
            other.send_to(&genuine, group).unwrap();
            sent += 1;
        }
        // Paced so that the socket's receive buffer loses nothing: the counts
        // below are exact.
        if i % 100 == 99 {
            until("the flood read", || receiver.stats().received == sent).await;
        }
    }
    let delivery = within("the genuine envelope", STEP, rx.recv())
        .await
        .unwrap();
    assert_eq!(delivery.message, credentials("genuine".into()));
    assert_eq!(delivery.sender, a.public_key());
    until("the flood read", || receiver.stats().received == FLOOD + 1).await;
    let elapsed = started.elapsed();

    let stats = receiver.stats();
    assert_eq!(
        stats.rate_limited + stats.handed_over,
        FLOOD + 1,
        "{stats:?}"
    );
    // The flooder got its burst and what refilled while it sent, rounded up.
    let refill = (elapsed.as_secs_f64() * f64::from(SOURCE_RATE)).ceil() as u64 + 1;
    let let_through = u64::from(SOURCE_BURST) + refill;
    let flooder_through = stats.handed_over - 1;
    assert!(
        (u64::from(SOURCE_BURST)..=let_through).contains(&flooder_through),
        "{stats:?}, at most {let_through} of the flood expected in {elapsed:?}"
    );
    assert_eq!(
        (stats.not_envelopes, stats.not_ours, stats.sources_full),
        (0, 0, 0),
        "{stats:?}"
    );
    // Only what was let through reached the registry and was tried.
    within("the registry's worker", STEP, registry.flush()).await;
    let reg = registry.stats();
    assert_eq!(reg.dropped_invalid, flooder_through, "{reg:?}");
    assert_eq!((reg.opened, reg.delivered), (1, 1), "{reg:?}");
    assert_eq!(reg.dropped_queue_full, 0, "{reg:?}");
    assert!(rx.try_recv().is_err(), "a second delivery");
    println!("{DONE}");
}

// ----------------------------------------------------- the loopback flag --

/// Sends through `interface` with loopback off, then on: only the second
/// envelope reaches a socket of this host.
async fn loopback_flag(group: &str, interface: &str) {
    let url = |loopback| format!("multicast://{group}?interface={interface}&loopback={loopback}");
    let (a, b) = (PrivateKey::generate(), PrivateKey::generate());
    let (receiver, _registry, mut rx) = listener(&url(false), &b, Sender::Any).await;
    let quiet = multicast(&url(false), Registry::new()).await;
    let looping = multicast(&url(true), Registry::new()).await;
    let to_b = KeyPair::new(a.clone(), b.public_key());

    for _ in 0..3 {
        let envelope = credentials("quiet".into()).seal(&to_b).unwrap();
        within("send", STEP, quiet.send(&envelope)).await.unwrap();
    }
    let envelope = credentials("looped".into()).seal(&to_b).unwrap();
    within("send", STEP, looping.send(&envelope)).await.unwrap();
    let delivery = within("the looped envelope", STEP, rx.recv())
        .await
        .unwrap();
    assert_eq!(delivery.message, credentials("looped".into()), "{group}");
    until("counted", || receiver.stats().handed_over == 1).await;
    assert_eq!(quiet.stats().sent, 3);
    // The quiet sender's datagrams left through the link and did not come back.
    assert_eq!(
        receiver.stats().received,
        1,
        "{group}: {:?}",
        receiver.stats()
    );
    assert!(rx.try_recv().is_err());
}

#[tokio::test]
async fn loopback_flag_decides_whether_the_host_hears_itself() {
    const TEST: &str = "loopback_flag_decides_whether_the_host_hears_itself";
    if !in_netns(TEST) {
        // What goes out of the veth end arrives in the other namespace, where
        // nobody listens: only the kernel's loopback copies (IP_MULTICAST_LOOP,
        // IPV6_MULTICAST_LOOP) reach the sockets of the sending namespace.
        let a = Netns::new("loopa").unwrap_or_else(|e| panic!("{e:#}"));
        let b = Netns::new("loopb").unwrap_or_else(|e| panic!("{e:#}"));
        let veth = Veth::link(&a, &b).unwrap_or_else(|e| panic!("{e:#}"));
        assert_eq!(veth.a, "mc-a");
        return run_in(&a, TEST).await;
    }
    loopback_flag("239.255.77.6:7706", "mc-a").await;
    loopback_flag("[ff02::77:6]:7706", "mc-a").await;
    println!("{DONE}");
}

// --------------------------------------------------------------- close --

fn plain_bind(group: &str) -> std::io::Result<StdUdpSocket> {
    // No SO_REUSEADDR: fails while any other socket holds the port.
    StdUdpSocket::bind(group)
}

#[tokio::test]
async fn close_releases_the_socket() {
    const TEST: &str = "close_releases_the_socket";
    if !in_netns(TEST) {
        let ns = lo_namespace("close");
        return run_in(&ns, TEST).await;
    }
    const GROUP: &str = "239.255.77.7:7707";
    const URL: &str = "multicast://239.255.77.7:7707?interface=lo&loopback=true";
    let (a, b) = (PrivateKey::generate(), PrivateKey::generate());
    let to_b = KeyPair::new(a.clone(), b.public_key());

    // Through the backend API.
    let backend = within("connect", STEP, connect(&[URL])).await.unwrap();
    assert_eq!(backend.backend_type(), BackendType::Mcast);
    assert_eq!(backend.transport().name(), URL);
    assert!(plain_bind(GROUP).is_err(), "the port is not held");
    within("close", STEP, backend.close()).await.unwrap();
    drop(plain_bind(GROUP).expect("port released by close()"));
    let err = within(
        "publish",
        STEP,
        backend.publish(&to_b, &credentials("x".into())),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, BackendError::Closed), "{err:?}");

    // The transport itself refuses to work once closed.
    let transport = multicast(URL, Registry::new()).await;
    within("close", STEP, transport.close()).await.unwrap();
    drop(plain_bind(GROUP).expect("port released by close()"));
    let envelope = credentials("x".into()).seal(&to_b).unwrap();
    let err = within("send", STEP, transport.send(&envelope))
        .await
        .unwrap_err();
    assert!(matches!(err, BackendError::Closed), "{err:?}");
    let err = within("listen", STEP, transport.listen(b.public_key()))
        .await
        .unwrap_err();
    assert!(matches!(err, BackendError::Closed), "{err:?}");
    within("close again", STEP, transport.close())
        .await
        .unwrap();

    // Dropping releases it too (the receive task is aborted).
    drop(multicast(URL, Registry::new()).await);
    until("port released by drop", || plain_bind(GROUP).is_ok()).await;

    // The same group and port again: it works.
    let (receiver, _registry, mut rx) = listener(URL, &b, Sender::Key(a.public_key())).await;
    let sender = multicast(URL, Registry::new()).await;
    within("send", STEP, sender.send(&envelope)).await.unwrap();
    let delivery = within("delivery after rebinding", STEP, rx.recv())
        .await
        .unwrap();
    assert_eq!(delivery.message, credentials("x".into()));
    within("close", STEP, receiver.close()).await.unwrap();
    within("close", STEP, sender.close()).await.unwrap();
    drop(plain_bind(GROUP).expect("port released"));
    println!("{DONE}");
}
