//! The server as a service: signals (SIGHUP never stops it, SIGTERM drains,
//! a second one stops at once), the messages systemd gets on its notify
//! socket, and socket activation with `systemd-socket-activate`.

mod common;

use std::{
    os::unix::net::UnixDatagram,
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use common::{BIN, Killed, WAIT, lines_of, spawn_server, wait_for_line};

fn signal(pid: u32, name: &str) {
    let ok = Command::new("kill")
        .args([&format!("-{name}"), &pid.to_string()])
        .status()
        .unwrap();
    assert!(ok.success());
}

/// The status of the gRPC health service of the server at `addr` ("" service).
fn health(addr: &str) -> Result<i32, String> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let channel = tonic::transport::Channel::from_shared(format!("http://{addr}"))
            .map_err(|e| e.to_string())?
            .connect_timeout(Duration::from_secs(5))
            .connect()
            .await
            .map_err(|e| format!("{e:?}"))?;
        let answer = tokio::time::timeout(
            Duration::from_secs(10),
            tonic_health::pb::health_client::HealthClient::new(channel).check(
                tonic_health::pb::HealthCheckRequest {
                    service: String::new(),
                },
            ),
        )
        .await
        .map_err(|_| "no health answer in 10 s".to_string())?
        .map_err(|e| e.to_string())?;
        Ok(answer.into_inner().status)
    })
}

const SERVING: i32 = tonic_health::pb::health_check_response::ServingStatus::Serving as i32;

/// Waits for the process to exit; returns its status and when.
fn wait_exit(child: &mut std::process::Child, limit: Duration) -> std::process::ExitStatus {
    let started = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(started.elapsed() < limit, "no exit within {limit:?}");
        thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn sighup_without_anything_to_reload_does_not_stop_the_server() {
    let (mut server, lines, addr) = spawn_server(&[("CUNICU_SIGNAL_LISTEN", "127.0.0.1:0")]);
    signal(server.0.id(), "HUP");
    wait_for_line(&lines, "SIGHUP: nothing to reload");
    signal(server.0.id(), "HUP");
    wait_for_line(&lines, "SIGHUP: nothing to reload");
    assert!(server.0.try_wait().unwrap().is_none(), "the server exited");
    assert_eq!(health(&addr), Ok(SERVING));
}

#[test]
fn sighup_reloads_the_tls_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    let make = |name: &str| {
        let pair = rcgen::generate_simple_self_signed(vec![name.to_string()]).unwrap();
        std::fs::write(&cert, pair.cert.pem()).unwrap();
        std::fs::write(&key, pair.signing_key.serialize_pem()).unwrap();
    };
    make("one.example");
    let (mut server, lines, _addr) = spawn_server(&[
        ("CUNICU_SIGNAL_LISTEN", "127.0.0.1:0"),
        ("CUNICU_SIGNAL_TLS_CERT", cert.to_str().unwrap()),
        ("CUNICU_SIGNAL_TLS_KEY", key.to_str().unwrap()),
    ]);
    make("two.example");
    signal(server.0.id(), "HUP");
    wait_for_line(&lines, "SIGHUP: TLS certificate and key reloaded");
    // A broken pair is refused and the previous one stays.
    std::fs::write(&key, "not a key").unwrap();
    signal(server.0.id(), "HUP");
    wait_for_line(&lines, "SIGHUP: not reloaded");
    assert!(server.0.try_wait().unwrap().is_none(), "the server exited");
}

#[test]
fn systemd_hears_ready_watchdog_and_stopping_at_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notify");
    let socket = UnixDatagram::bind(&path).unwrap();
    // systemd reads all the time; so does this thread.
    let (tx, messages) = std::sync::mpsc::channel();
    thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = socket.recv(&mut buf) {
            if tx
                .send(String::from_utf8_lossy(&buf[..n]).into_owned())
                .is_err()
            {
                break;
            }
        }
    });
    let (mut server, _lines, _addr) = spawn_server(&[
        ("CUNICU_SIGNAL_LISTEN", "127.0.0.1:0"),
        ("NOTIFY_SOCKET", path.to_str().unwrap()),
        // 100 ms: WATCHDOG=1 every 50 ms.
        ("WATCHDOG_USEC", "100000"),
        ("CUNICU_SIGNAL_DRAIN_DELAY", "1500ms"),
    ]);
    let recv = |limit: Duration| -> Vec<String> {
        let deadline = Instant::now() + limit;
        let mut got = Vec::new();
        while let Ok(m) = messages.recv_timeout(deadline.saturating_duration_since(Instant::now()))
        {
            got.push(m);
        }
        got
    };
    let first = recv(Duration::from_millis(600));
    assert!(
        first
            .first()
            .is_some_and(|m| m.lines().any(|l| l == "READY=1")),
        "READY=1 first: {first:?}"
    );
    let watchdogs = first.iter().filter(|m| m.trim() == "WATCHDOG=1").count();
    assert!(
        watchdogs >= 5,
        "{watchdogs} WATCHDOG=1 in 600 ms: {first:?}"
    );
    let sent = Instant::now();
    signal(server.0.id(), "TERM");
    let after = recv(Duration::from_millis(500));
    assert!(
        after.iter().any(|m| m.lines().any(|l| l == "STOPPING=1")),
        "no STOPPING=1 within 500 ms of SIGTERM: {after:?}"
    );
    // At SIGTERM, not at exit: the server drains for 1.5 s.
    assert!(
        server.0.try_wait().unwrap().is_none(),
        "exited before the drain delay"
    );
    let status = wait_exit(&mut server.0, WAIT);
    assert!(status.success(), "exit: {status}");
    assert!(
        sent.elapsed() >= Duration::from_millis(1400),
        "{:?}",
        sent.elapsed()
    );
}

#[test]
fn a_second_sigterm_stops_at_once() {
    let (mut server, lines, _addr) = spawn_server(&[
        ("CUNICU_SIGNAL_LISTEN", "127.0.0.1:0"),
        ("CUNICU_SIGNAL_DRAIN_DELAY", "60s"),
    ]);
    signal(server.0.id(), "TERM");
    wait_for_line(&lines, "draining");
    let sent = Instant::now();
    signal(server.0.id(), "INT");
    let status = wait_exit(&mut server.0, Duration::from_secs(5));
    assert!(status.success(), "exit: {status}");
    assert!(
        sent.elapsed() < Duration::from_secs(2),
        "{:?}",
        sent.elapsed()
    );
}

#[test]
fn a_socket_passed_by_systemd_is_served_instead_of_listen() {
    // --listen names a port that is taken: binding it would fail.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken_addr = taken.local_addr().unwrap().to_string();
    let port = {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        probe.local_addr().unwrap().port()
    };
    let addr = format!("127.0.0.1:{port}");
    let mut command = Command::new("systemd-socket-activate");
    command
        .args(["--listen", &addr, "-E", "RUST_LOG=info"])
        .args([BIN, "serve", "--listen", &taken_addr])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut activate = Killed(command.spawn().expect("systemd-socket-activate runs"));
    let lines = lines_of(activate.0.stderr.take().unwrap());
    wait_for_line(&lines, "Listening on");
    // The server starts with the first connection, and answers it.
    let started = Instant::now();
    let status = loop {
        match health(&addr) {
            Ok(status) => break status,
            Err(e) if started.elapsed() > WAIT => panic!("no answer on {addr}: {e}"),
            Err(_) => thread::sleep(Duration::from_millis(100)),
        }
    };
    assert_eq!(status, SERVING);
    wait_for_line(&lines, "serving on the socket passed by systemd");
    drop(taken);
}

#[test]
fn connection_errors_say_what_to_do() {
    let dir = tempfile::tempdir().unwrap();
    let key = common::key_file(dir.path(), "k", &cunicu_signal::PrivateKey::generate());
    let to = cunicu_signal::PrivateKey::generate()
        .public_key()
        .to_string();
    let (_server, _lines, addr) = spawn_server(&[("CUNICU_SIGNAL_LISTEN", "127.0.0.1:0")]);
    // A TLS client (the default) against a plaintext server.
    let out = common::publish(&format!("grpc://{addr}"), &key, &to, b"{}\n");
    common::assert_fails(&out, "the server speaks plaintext: add ?insecure=true");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("learning the server's key"), "{stderr}");
    // Nothing listens.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let closed_addr = closed.local_addr().unwrap();
    drop(closed);
    let out = common::publish(
        &format!("grpc://{closed_addr}?insecure=true"),
        &key,
        &to,
        b"{}\n",
    );
    common::assert_fails(&out, "connection refused");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("learning the server's key"), "{stderr}");
}
