//! The `cunicu-signal` binary as users run it: child processes, pipes, signals.

mod common;

use std::{
    io::Read,
    process::{Command, Stdio},
    time::Duration,
};

use base64::{Engine as _, engine::general_purpose::STANDARD};
use common::{
    BIN, assert_fails, assert_succeeds, json_lines, key_file, publish, publish_marker_next, run,
    spawn_server, spawn_server_logged, spawn_subscriber, terminate,
};
use cunicu_signal::{Key, PrivateKey};

#[test]
fn keygen_and_pubkey_work_like_wg() {
    let out = run(&["keygen"], b"");
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert_eq!(text.len(), 45, "44 characters and a newline: {text:?}");
    let private: PrivateKey = text.parse().unwrap();
    let out = run(&["pubkey"], text.as_bytes());
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        format!("{}\n", private.public_key())
    );
    // Two keys differ.
    assert_ne!(run(&["keygen"], b"").stdout, text.as_bytes());
    assert_fails(&run(&["pubkey"], b"AAAA\n"), "3 bytes, expected 32");
}

#[test]
fn envelope_seal_and_open() {
    let dir = tempfile::tempdir().unwrap();
    let (alice, bob) = (PrivateKey::generate(), PrivateKey::generate());
    let alice_file = key_file(dir.path(), "alice", &alice);
    let bob_file = key_file(dir.path(), "bob", &bob);
    let json = r#"{"candidate":{"type":"HOST","networkType":"UDP4","foundation":"1","component":1,"priority":2130706431,"address":"10.0.0.1","port":51820}}"#;

    let sealed = run(
        &[
            "envelope",
            "seal",
            "--key-file",
            alice_file.to_str().unwrap(),
            "--to",
            &bob.public_key().to_string(),
        ],
        json.as_bytes(),
    );
    assert_succeeds(&sealed);
    let opened = run(
        &["envelope", "open", "--key-file", bob_file.to_str().unwrap()],
        &sealed.stdout,
    );
    assert_succeeds(&opened);
    let got: serde_json::Value = serde_json::from_slice(&opened.stdout).unwrap();
    let want: serde_json::Value = serde_json::from_str(json).unwrap();
    assert_eq!(got, want);

    // The wrong key, a corrupted envelope, bad inputs: one clear line, nothing on stdout.
    assert_fails(
        &run(
            &[
                "envelope",
                "open",
                "--key-file",
                alice_file.to_str().unwrap(),
            ],
            &sealed.stdout,
        ),
        "addressed to",
    );
    let mut corrupt = sealed.stdout.clone();
    let last = corrupt.len() - 30;
    corrupt[last] ^= 1;
    assert_fails(
        &run(
            &["envelope", "open", "--key-file", bob_file.to_str().unwrap()],
            &corrupt,
        ),
        "does not open",
    );
    assert_fails(
        &run(
            &["envelope", "open", "--key-file", bob_file.to_str().unwrap()],
            b"\xff\xff",
        ),
        "does not parse",
    );
    let to = bob.public_key().to_string();
    let seal = |key: &str, to: &str, input: &str| {
        run(
            &["envelope", "seal", "--key-file", key, "--to", to],
            input.as_bytes(),
        )
    };
    assert_fails(
        &seal(alice_file.to_str().unwrap(), &to, "{"),
        "invalid cunicu.signaling.Message JSON",
    );
    assert_fails(
        &seal(alice_file.to_str().unwrap(), &to, r#"{"nope":1}"#),
        "JSON",
    );
    assert_fails(&seal(alice_file.to_str().unwrap(), "abc", "{}"), "--to");
    assert_fails(
        &seal(
            alice_file.to_str().unwrap(),
            &Key::from([0; 32]).to_string(),
            "{}",
        ),
        "low-order",
    );
    assert_fails(
        &seal("/nonexistent/key", &to, "{}"),
        "reading key file /nonexistent/key",
    );
    let bad_key = dir.path().join("bad");
    std::fs::write(&bad_key, "not a key").unwrap();
    assert_fails(&seal(bad_key.to_str().unwrap(), &to, "{}"), "not base64");
}

#[test]
fn envelope_open_reads_libsodium_vectors() {
    let text = include_str!("../../signal/tests/vectors/envelopes.json");
    let vectors: serde_json::Value = serde_json::from_str(text).unwrap();
    let dir = tempfile::tempdir().unwrap();
    for case in vectors["cases"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["valid"] == true)
    {
        let key: PrivateKey = case["recipient_private"].as_str().unwrap().parse().unwrap();
        let file = key_file(dir.path(), "r", &key);
        let envelope = STANDARD.decode(case["envelope"].as_str().unwrap()).unwrap();
        let out = run(
            &["envelope", "open", "--key-file", file.to_str().unwrap()],
            &envelope,
        );
        assert_succeeds(&out);
        let got: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(got, case["message_json"], "{}", case["name"]);
    }
}

/// `serve --key-file --auth required` (from the environment, as operators
/// configure it): our subscribe and publish prove their keys unchanged.
#[test]
fn publish_and_subscribe_through_a_server_that_requires_proofs() {
    let dir = tempfile::tempdir().unwrap();
    let server_key = key_file(dir.path(), "server", &PrivateKey::generate());
    let (_server, _lines, addr) = spawn_server(&[
        ("CUNICU_SIGNAL_LISTEN", "127.0.0.1:0"),
        ("CUNICU_SIGNAL_KEY_FILE", server_key.to_str().unwrap()),
        ("CUNICU_SIGNAL_AUTH", "required"),
    ]);
    let url = format!("grpc://{addr}?insecure=true");
    let (alice, bob) = (PrivateKey::generate(), PrivateKey::generate());
    let alice_file = key_file(dir.path(), "alice", &alice);
    let bob_file = key_file(dir.path(), "bob", &bob);
    let (_subscriber, received) = spawn_subscriber(&url, &bob_file, None);
    let out = publish(
        &url,
        &alice_file,
        &bob.public_key().to_string(),
        b"{\"credentials\":{\"ufrag\":\"proven\"}}\n",
    );
    assert_succeeds(&out);
    let got = json_lines(&received, 1);
    assert_eq!(got[0]["message"]["credentials"]["ufrag"], "proven");
    // --print-recipients: one count a message; bob's subscriber got them,
    // nobody listens to carol.
    let carol = PrivateKey::generate().public_key().to_string();
    for (to, count) in [(bob.public_key().to_string(), 1), (carol, 0)] {
        let out = run(
            &[
                "publish",
                "--backend",
                &url,
                "--key-file",
                alice_file.to_str().unwrap(),
                "--to",
                &to,
                "--print-recipients",
            ],
            b"{}\n{}\n",
        );
        assert_succeeds(&out);
        let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(
            lines,
            [
                serde_json::json!({"line": 1, "recipients": count}),
                serde_json::json!({"line": 2, "recipients": count}),
            ]
        );
    }
    // --auth required without a key: one clear line, exit non-zero.
    let out = run(
        &["serve", "--listen", "127.0.0.1:0", "--auth", "required"],
        b"",
    );
    assert_fails(&out, "--auth required needs the server's key (--key-file)");
}

#[test]
fn serve_publish_subscribe_and_sigterm() {
    // Listen address and threads from the environment, as operators
    // configure them: all that follows runs on one worker thread, and the
    // start-up log says so.
    let (mut server, _server_lines, addr, startup) = spawn_server_logged(&[
        ("CUNICU_SIGNAL_LISTEN", "127.0.0.1:0"),
        ("CUNICU_SIGNAL_THREADS", "1"),
    ]);
    assert!(
        startup
            .iter()
            .any(|l| l.trim_end().ends_with("worker threads: 1")),
        "{startup:?}"
    );
    let url = format!("grpc://{addr}?insecure=true");
    let dir = tempfile::tempdir().unwrap();
    let (alice, bob) = (PrivateKey::generate(), PrivateKey::generate());
    let alice_file = key_file(dir.path(), "alice", &alice);
    let bob_file = key_file(dir.path(), "bob", &bob);

    let (mut subscriber, received) = spawn_subscriber(&url, &bob_file, Some(&alice.public_key()));

    let input = "{\"credentials\":{\"ufrag\":\"one\",\"pwd\":\"p\"}}\n\n{\"credentials\":{\"ufrag\":\"two\",\"needCreds\":true}}\n";
    let out = publish(
        &url,
        &alice_file,
        &bob.public_key().to_string(),
        input.as_bytes(),
    );
    assert_succeeds(&out);

    let mut got = json_lines(&received, 2);
    got.sort_by_key(|v| {
        v["message"]["credentials"]["ufrag"]
            .as_str()
            .unwrap_or("")
            .to_string()
    });
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
        serde_json::json!({"credentials": {"ufrag": "two", "needCreds": true}})
    );

    // A message from someone else is not printed with --from. Alice's next
    // message, published after it, is the next line: neither Carol's nor a
    // third line from before came first (the server delivers in order).
    let carol_file = key_file(dir.path(), "carol", &PrivateKey::generate());
    let out = publish(
        &url,
        &carol_file,
        &bob.public_key().to_string(),
        b"{\"credentials\":{\"ufrag\":\"carol\"}}\n",
    );
    assert!(out.status.success());
    publish_marker_next(
        Command::new(BIN),
        &url,
        &alice_file,
        &bob.public_key().to_string(),
        &received,
        "three",
        "carol's message",
    );

    // A bad line: non-zero exit, one line naming the line.
    let out = publish(
        &url,
        &alice_file,
        &bob.public_key().to_string(),
        b"{}\n{bad\n",
    );
    assert_fails(&out, "stdin line 2");

    // SIGTERM with a subscription open: the server exits 0 within 5 s.
    let (status, took) = terminate(&mut server.0);
    assert!(status.success(), "server exit: {status}");
    assert!(took < Duration::from_secs(5), "server took {took:?}");
    let (status, _) = terminate(&mut subscriber.0);
    assert!(status.success(), "subscriber exit: {status}");
}

#[test]
fn bad_backend_urls_fail_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let file = key_file(dir.path(), "k", &PrivateKey::generate());
    let to = PrivateKey::generate().public_key().to_string();
    for (url, needle) in [
        ("nats://x:1", "unknown backend scheme"),
        ("grpc://host", "no port"),
        ("grpc://h:1?insecure=perhaps", "not a boolean"),
        ("grpc://h:1?colour=blue", "unknown parameter"),
    ] {
        let out = publish(url, &file, &to, b"");
        assert_fails(&out, needle);
        let out = run(
            &[
                "subscribe",
                "--backend",
                url,
                "--key-file",
                file.to_str().unwrap(),
            ],
            b"",
        );
        assert_fails(&out, needle);
    }
    // No server there: the subscription fails instead of hanging.
    let out = run(
        &[
            "subscribe",
            "--backend",
            "grpc://127.0.0.1:1?insecure=true",
            "--key-file",
            file.to_str().unwrap(),
        ],
        b"",
    );
    assert_fails(&out, "grpc://127.0.0.1:1");
}

#[test]
fn serve_refuses_bad_settings() {
    let out = run(&["serve", "--listen", "127.0.0.1:0", "--threads", "0"], b"");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("invalid value '0' for '--threads"),
        "{stderr}"
    );
    let out = run(
        &["serve", "--listen", "127.0.0.1:0", "--relay", "http://x"],
        b"",
    );
    assert_fails(&out, "invalid relay URL");
    let mut child = Command::new(BIN)
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--tls-cert",
            "/nonexistent",
            "--tls-key",
            "/nonexistent",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    assert!(!child.wait().unwrap().success());
    assert!(stderr.contains("cannot read /nonexistent"), "{stderr}");
}

#[test]
fn bench_refuses_bad_arguments_and_measures_a_server() {
    let out = run(
        &[
            "bench",
            "--backend",
            "grpc://127.0.0.1:1?insecure=true",
            "--subscribers",
            "1",
            "--keys",
            "2",
        ],
        b"",
    );
    assert_fails(&out, "--keys (2) must not exceed --subscribers (1)");
    let out = run(&["bench", "--backend", "inprocess:"], b"");
    assert_fails(&out, "grpc://");

    let out = run(
        &[
            "bench",
            "--backend",
            "grpc://localhost:1",
            "--local-addresses",
            "2",
        ],
        b"",
    );
    assert_fails(
        &out,
        "--local-addresses needs a plaintext server on 127.0.0.0/8",
    );

    // A short run against a real server: every expected delivery arrives, and
    // the server's process is measured. Its rates are lifted, so that no
    // publish is refused (bench would exit 1 then).
    let (server, _lines, addr) = spawn_server(&[
        ("CUNICU_SIGNAL_LISTEN", "127.0.0.1:0"),
        ("CUNICU_SIGNAL_REQUEST_RATE", "1000000"),
        ("CUNICU_SIGNAL_REQUEST_BURST", "1000000"),
        ("CUNICU_SIGNAL_PUBLISH_RATE", "1000000"),
        ("CUNICU_SIGNAL_PUBLISH_BURST", "1000000"),
        ("CUNICU_SIGNAL_PUBLISH_BYTES_RATE", "1000000000"),
        ("CUNICU_SIGNAL_PUBLISH_BYTES_BURST", "1000000000"),
    ]);
    let backend = format!("grpc://{addr}?insecure=true");
    let pid = server.0.id().to_string();
    let out = run(
        &[
            "bench",
            "--backend",
            &backend,
            "--subscribers",
            "20",
            "--keys",
            "5",
            "--publishers",
            "2",
            "--duration",
            "1s",
            "--server-pid",
            &pid,
            "--json",
        ],
        b"",
    );
    assert_succeeds(&out);
    // Piped: no progress, only the set-up line.
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let published = report["published"].as_u64().unwrap();
    assert!(published > 0, "{report}");
    assert_eq!(report["publish_errors"], 0, "{report}");
    assert_eq!(
        report["expected_deliveries"].as_u64(),
        Some(published * 4),
        "{report}"
    );
    assert_eq!(
        report["delivered"], report["expected_deliveries"],
        "{report}"
    );
    assert_eq!(report["lost"], 0, "{report}");
    assert_eq!(report["streams_ended"], 0, "{report}");
    assert!(report["latency_p99_ms"].as_f64().unwrap() > 0.0, "{report}");
    // Forwarding thousands of envelopes costs the server some CPU time (the
    // clock ticks are 10 ms, the run is 1 s) and it holds memory.
    let per_delivery = report["server_cpu_us_per_delivery"].as_f64().unwrap();
    assert!(per_delivery > 0.0, "{report}");
    let split = report["server_cpu_user_us_per_delivery"].as_f64().unwrap()
        + report["server_cpu_system_us_per_delivery"]
            .as_f64()
            .unwrap();
    assert!((split - per_delivery).abs() < 1e-6, "{report}");
    assert!(
        report["server_rss_before_kib"].as_u64().unwrap() > 0,
        "{report}"
    );
    assert!(
        report["server_rss_after_kib"].as_u64().unwrap() > 0,
        "{report}"
    );

    // Idle peers, one subscription per connection, bound to 127.0.0.1 and
    // 127.0.0.2; the report says what they cost the server.
    let out = run(
        &[
            "bench",
            "--backend",
            &backend,
            "--idle",
            "--subscribers",
            "40",
            "--keys",
            "40",
            "--streams-per-connection",
            "1",
            "--local-addresses",
            "2",
            "--duration",
            "300ms",
            "--server-pid",
            &pid,
            "--json",
        ],
        b"",
    );
    assert_succeeds(&out);
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["connections"], 40, "{report}");
    assert_eq!(report["streams_ended"], 0, "{report}");
    let (before, with) = (
        report["server_rss_before_kib"].as_u64().unwrap(),
        report["server_rss_with_peers_kib"].as_u64().unwrap(),
    );
    assert!(before > 0 && with > 0, "{report}");
    let per_subscription = report["server_rss_bytes_per_subscription"]
        .as_f64()
        .unwrap();
    let expected = with.saturating_sub(before) as f64 * 1024.0 / 40.0;
    assert!((per_subscription - expected).abs() < 1e-6, "{report}");
}

/// Runs `command_line` (a shell command) with a terminal as its stdin, stdout
/// and stderr, as a user at a terminal would (util-linux `script`); returns
/// its exit status and what the terminal showed.
fn run_on_a_terminal(command_line: &str) -> (std::process::ExitStatus, String) {
    let out = common::run_command(
        Command::new("script"),
        &[
            "--quiet",
            "--return",
            "--command",
            command_line,
            "/dev/null",
        ],
        b"",
    );
    (
        out.status,
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

#[test]
fn keygen_writes_private_files_and_warns_of_readable_ones() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let mode =
        |path: &std::path::Path| std::fs::metadata(path).unwrap().permissions().mode() & 0o777;

    // --out: a new file of mode 0600, and an existing readable one made so.
    let new = dir.path().join("new.key");
    let out = run(&["keygen", "--out", new.to_str().unwrap()], b"");
    assert_succeeds(&out);
    assert!(out.stdout.is_empty() && out.stderr.is_empty(), "{out:?}");
    assert_eq!(mode(&new), 0o600);
    let key: Key = std::fs::read_to_string(&new).unwrap().parse().unwrap();
    let existing = dir.path().join("existing.key");
    std::fs::write(&existing, "old").unwrap();
    std::fs::set_permissions(&existing, std::fs::Permissions::from_mode(0o644)).unwrap();
    assert_succeeds(&run(&["keygen", "--out", existing.to_str().unwrap()], b""));
    assert_eq!(mode(&existing), 0o600);
    let other: Key = std::fs::read_to_string(&existing).unwrap().parse().unwrap();
    assert_ne!(key, other);

    // `keygen > file`: the key goes there; a warning when others may read it.
    let keygen_into = |mode: u32| {
        let path = dir.path().join(format!("stdout-{mode:o}.key"));
        let file = std::fs::File::create(&path).unwrap();
        file.set_permissions(std::fs::Permissions::from_mode(mode))
            .unwrap();
        let out = Command::new(BIN)
            .arg("keygen")
            .stdout(file)
            .stderr(Stdio::piped())
            .output()
            .unwrap();
        assert!(out.status.success());
        // The key went there.
        std::fs::read_to_string(&path)
            .unwrap()
            .parse::<Key>()
            .unwrap();
        String::from_utf8(out.stderr).unwrap()
    };
    let warning = keygen_into(0o644);
    assert!(
        warning.contains("others may read (mode 0644)") && warning.contains("umask 077"),
        "{warning}"
    );
    assert_eq!(keygen_into(0o600), "");
}

#[test]
fn envelope_open_names_the_sender_and_seal_keeps_binary_off_terminals() {
    let dir = tempfile::tempdir().unwrap();
    let (alice, bob) = (PrivateKey::generate(), PrivateKey::generate());
    let alice_file = key_file(dir.path(), "alice", &alice);
    let bob_file = key_file(dir.path(), "bob", &bob);
    let json = r#"{"credentials":{"ufrag":"abc"}}"#;
    let sealed = dir.path().join("envelope.bin");
    let out = run(
        &[
            "envelope",
            "seal",
            "--key-file",
            alice_file.to_str().unwrap(),
            "--to",
            &bob.public_key().to_string(),
            "--output",
            sealed.to_str().unwrap(),
        ],
        json.as_bytes(),
    );
    assert_succeeds(&out);
    assert!(out.stdout.is_empty());
    let opened = run(
        &["envelope", "open", "--key-file", bob_file.to_str().unwrap()],
        &std::fs::read(&sealed).unwrap(),
    );
    assert_succeeds(&opened);
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&opened.stdout).unwrap(),
        serde_json::from_str::<serde_json::Value>(json).unwrap()
    );
    assert_eq!(
        String::from_utf8_lossy(&opened.stderr),
        format!(
            "cunicu-signal: from {} to {}\n",
            alice.public_key(),
            bob.public_key()
        )
    );

    // On a terminal: refused, nothing binary written.
    let (status, screen) = run_on_a_terminal(&format!(
        "echo '{json}' | {BIN} envelope seal --key-file {} --to {}",
        alice_file.display(),
        bob.public_key()
    ));
    assert!(!status.success(), "{screen}");
    assert!(
        screen.contains("stdout is a terminal") && screen.contains("--output"),
        "{screen}"
    );
}

#[test]
fn publish_stops_reading_a_line_longer_than_its_limit() {
    let (_server, _lines, addr) = spawn_server(&[("CUNICU_SIGNAL_LISTEN", "localhost:0")]);
    let url = format!("grpc://{addr}?insecure=true");
    let dir = tempfile::tempdir().unwrap();
    let alice_file = key_file(dir.path(), "alice", &PrivateKey::generate());
    let to = PrivateKey::generate().public_key().to_string();
    let mut input = b"{\"credentials\":{\"ufrag\":\"fits\"}}\n".to_vec();
    input.extend(std::iter::repeat_n(b'x', 4 << 20));
    input.push(b'\n');
    let out = publish(&url, &alice_file, &to, &input);
    assert_fails(&out, "stdin line 2 is longer than --max-line 262144 bytes");
}

#[test]
fn serve_takes_listen_addresses_as_users_write_them_and_logs_plainly() {
    // HOST:PORT, for both ports; the start-up line shows plain addresses and
    // the allow-list.
    let (_server, _lines, addr, startup) = spawn_server_logged(&[
        ("CUNICU_SIGNAL_LISTEN", "localhost:0"),
        ("CUNICU_SIGNAL_METRICS_LISTEN", "localhost:0"),
    ]);
    let loopback = |a: &str| a.starts_with("127.0.0.1:") || a.starts_with("[::1]:");
    assert!(loopback(&addr), "{addr}");
    let metrics = startup
        .last()
        .and_then(|l| {
            l.split_whitespace()
                .find_map(|w| w.strip_prefix("metrics="))
        })
        .unwrap_or_else(|| panic!("no metrics= in {startup:?}"));
    assert!(loopback(metrics), "{startup:?}");
    // :PORT is every address; a bad port says what is expected.
    let out = run(&["serve", "--listen", ":99999"], b"");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("the port is not a number"), "{stderr}");
    let out = run(&["serve", "--listen", "no-such-host.invalid:80"], b"");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("expected IP:PORT, HOST:PORT or :PORT"),
        "{stderr}"
    );
}

#[test]
fn serve_start_up_says_where_metrics_are_and_who_is_admitted() {
    // Without an allow-list: every key is admitted, and the line says so.
    let (_server, _lines, _addr, startup) = spawn_server_logged(&[
        ("CUNICU_SIGNAL_LISTEN", "127.0.0.1:0"),
        ("CUNICU_SIGNAL_METRICS_LISTEN", "127.0.0.1:0"),
    ]);
    let listening = startup.last().unwrap();
    assert!(!listening.contains("Some("), "{listening}");
    assert!(listening.contains(" metrics=127.0.0.1:"), "{listening}");
    assert!(listening.contains("server_key=none"), "{listening}");
    assert!(
        listening.contains("allow_keys=none (every key is admitted)"),
        "{listening}"
    );
    assert!(!startup.iter().any(|l| l.contains("WARN")), "{startup:?}");

    // An empty allow-list admits nobody: a warning says so.
    let dir = tempfile::tempdir().unwrap();
    let server_key = key_file(dir.path(), "server", &PrivateKey::generate());
    let allow = dir.path().join("allow.txt");
    std::fs::write(&allow, "# nobody yet\n").unwrap();
    let (_server, _lines, _addr, startup) = spawn_server_logged(&[
        ("CUNICU_SIGNAL_LISTEN", "127.0.0.1:0"),
        ("CUNICU_SIGNAL_AUTH", "required"),
        ("CUNICU_SIGNAL_KEY_FILE", server_key.to_str().unwrap()),
        ("CUNICU_SIGNAL_ALLOW_KEYS", allow.to_str().unwrap()),
    ]);
    let warning = startup
        .iter()
        .find(|l| l.contains("allow-list"))
        .unwrap_or_else(|| panic!("no warning: {startup:?}"));
    assert!(
        warning.contains("WARN") && warning.contains("admits nobody"),
        "{warning}"
    );
    let listening = startup.last().unwrap();
    assert!(
        listening.contains(&format!("allow_keys={} (0 keys)", allow.display())),
        "{listening}"
    );
    assert!(listening.contains(" metrics=off"), "{listening}");
}

#[test]
fn serve_with_nats_away_warns_once_with_the_cause() {
    // Nothing listens on port 1: NATS is away from the start.
    let (_server, lines, _addr, _startup) = spawn_server_logged(&[
        ("CUNICU_SIGNAL_LISTEN", "127.0.0.1:0"),
        ("CUNICU_SIGNAL_CLUSTER", "nats://127.0.0.1:1"),
    ]);
    let warning = common::wait_for_line(&lines, "NATS");
    assert!(
        warning.contains("WARN") && warning.contains("cannot reach NATS ("),
        "{warning}"
    );
    assert!(warning.contains("nats://127.0.0.1:1"), "{warning}");
    // The client tries again every 2 s at most: in 5 s, nothing more is said.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let mut more = Vec::new();
    while let Some(left) = deadline.checked_duration_since(std::time::Instant::now()) {
        if let Ok(line) = lines.recv_timeout(left) {
            more.push(line);
        }
    }
    assert!(more.is_empty(), "{more:?}");
}

#[test]
fn serve_help_computes_memory_for_the_flags_and_environment_given() {
    let sum = |args: &[&str], env: &[(&str, &str)]| {
        let out = Command::new(BIN)
            .arg("serve")
            .args(args)
            .arg("--help")
            .envs(env.iter().copied())
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        let help = String::from_utf8(out.stdout).unwrap();
        let line = help
            .lines()
            .find(|l| l.contains("adds up to about"))
            .unwrap_or_else(|| panic!("no sum in {help}"))
            .to_string();
        let total = line
            .split("adds up to about ")
            .nth(1)
            .and_then(|rest| rest.split(':').next())
            .unwrap()
            .to_string();
        (total, line)
    };
    let (defaults, line) = sum(&[], &[]);
    assert!(line.contains("(the defaults, plaintext"), "{line}");
    let (fewer, line) = sum(&["--max-connections", "100"], &[]);
    assert!(line.contains("(these flags and environment"), "{line}");
    assert_ne!(fewer, defaults, "{line}");
    let (from_env, line) = sum(&[], &[("CUNICU_SIGNAL_MAX_SUBSCRIPTIONS", "10")]);
    assert_ne!(from_env, defaults, "{line}");
    assert_ne!(from_env, fewer, "{line}");
    // The server logs the same sum at start.
    let (_server, _lines, _addr, startup) = spawn_server_logged(&[
        ("CUNICU_SIGNAL_LISTEN", "127.0.0.1:0"),
        ("CUNICU_SIGNAL_MAX_CONNECTIONS", "100"),
    ]);
    assert!(
        startup
            .iter()
            .any(|l| l.contains(&format!("worst-case memory with these limits: {fewer}:"))),
        "{fewer} not in {startup:?}"
    );
}

/// Starts `subscribe` for `key` with its stdout and stderr as pipes, and waits
/// until it has subscribed; returns it with its stderr lines.
fn subscriber(
    url: &str,
    key: &std::path::Path,
) -> (common::Killed, std::sync::mpsc::Receiver<String>) {
    let mut child = common::Killed(
        Command::new(BIN)
            .args(["subscribe", "--backend", url, "--key-file"])
            .arg(key)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let stderr = common::lines_of(child.0.stderr.take().unwrap());
    common::wait_for_line(&stderr, "subscribed as");
    (child, stderr)
}

/// Waits (up to [`common::WAIT`]) for the exit of `child`.
fn exit_of(child: &mut std::process::Child) -> std::process::ExitStatus {
    let deadline = std::time::Instant::now() + common::WAIT;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(std::time::Instant::now() < deadline, "still running");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn subscribe_ends_normally_when_its_reader_goes_away() {
    use std::io::BufRead;
    let (_server, _lines, addr) = spawn_server(&[("CUNICU_SIGNAL_LISTEN", "127.0.0.1:0")]);
    let url = format!("grpc://{addr}?insecure=true");
    let dir = tempfile::tempdir().unwrap();
    let (alice, bob) = (PrivateKey::generate(), PrivateKey::generate());
    let alice_file = key_file(dir.path(), "alice", &alice);
    let bob_file = key_file(dir.path(), "bob", &bob);
    let (mut child, stderr) = subscriber(&url, &bob_file);
    let to = bob.public_key().to_string();
    let message = b"{\"credentials\":{\"ufrag\":\"first\"}}\n";
    assert_succeeds(&publish(&url, &alice_file, &to, message));
    // `| head -1`: one line read, then the pipe is closed.
    let mut stdout = std::io::BufReader::new(child.0.stdout.take().unwrap());
    let mut line = String::new();
    stdout.read_line(&mut line).unwrap();
    assert!(line.contains("first"), "{line}");
    drop(stdout);
    assert_succeeds(&publish(&url, &alice_file, &to, message));
    let status = exit_of(&mut child.0);
    let said: Vec<String> = stderr.try_iter().collect();
    assert!(status.success(), "{status}: {said:?}");
    assert!(
        !said
            .iter()
            .any(|l| l.contains("Broken pipe") || l.contains("error")),
        "{said:?}"
    );
}

#[test]
fn subscribe_says_when_it_is_back_and_stops_on_a_refusal() {
    let dir = tempfile::tempdir().unwrap();
    let server_key = key_file(dir.path(), "server", &PrivateKey::generate());
    let (alice, bob) = (PrivateKey::generate(), PrivateKey::generate());
    let bob_file = key_file(dir.path(), "bob", &bob);
    let allow = dir.path().join("allow.txt");
    std::fs::write(
        &allow,
        format!("{}\n{}\n", alice.public_key(), bob.public_key()),
    )
    .unwrap();
    let (key, allowed) = (
        server_key.to_str().unwrap().to_string(),
        allow.to_str().unwrap().to_string(),
    );
    let start = |listen: &str| {
        spawn_server(&[
            ("CUNICU_SIGNAL_LISTEN", listen),
            ("CUNICU_SIGNAL_AUTH", "required"),
            ("CUNICU_SIGNAL_KEY_FILE", &key),
            ("CUNICU_SIGNAL_ALLOW_KEYS", &allowed),
        ])
    };
    let (server, _lines, addr) = start("127.0.0.1:0");
    let url = format!("grpc://{addr}?insecure=true");
    let (mut child, stderr) = subscriber(&url, &bob_file);

    // The server restarts on the same port: the subscription comes back, and
    // subscribe says so.
    drop(server);
    let (_server, _lines, again) = start(&addr);
    assert_eq!(again, addr);
    let back = common::wait_for_line(&stderr, "subscription back");
    assert!(back.contains(&url), "{back}");

    // Bob is taken off the allow-list: subscribe exits 1 with the reason.
    std::fs::write(&allow, format!("{}\n", alice.public_key())).unwrap();
    let status = exit_of(&mut child.0);
    let said: Vec<String> = stderr.try_iter().collect();
    assert!(!status.success(), "{said:?}");
    let last = said.last().unwrap_or_else(|| panic!("nothing said"));
    assert!(
        last.contains("refused the subscription") && last.contains("PermissionDenied"),
        "{said:?}"
    );
}

#[test]
fn bench_shows_progress_on_a_terminal_and_fails_when_the_server_dies() {
    let (server, _lines, addr) = spawn_server(&[("CUNICU_SIGNAL_LISTEN", "127.0.0.1:0")]);
    let backend = format!("grpc://{addr}?insecure=true");
    // On a terminal, a line a second while the load runs (a slow rate: no
    // publish is refused).
    let (status, screen) = run_on_a_terminal(&format!(
        "{BIN} bench --backend '{backend}' --subscribers 4 --keys 2 --publishers 1 \
         --rate 20 --duration 2500ms"
    ));
    assert!(status.success(), "{screen}");
    let progress = screen
        .lines()
        .filter(|l| l.contains(" s: published "))
        .count();
    assert!(
        (1..=3).contains(&progress),
        "{progress} progress lines: {screen}"
    );

    // The server dies a second into the run: every later publish fails. The
    // report comes, the first error is one line, and the exit status is 1.
    let mut bench = Command::new(BIN)
        .args([
            "bench",
            "--backend",
            &backend,
            "--subscribers",
            "4",
            "--keys",
            "2",
        ])
        .args(["--publishers", "2", "--rate", "100", "--duration", "3s"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(1));
    drop(server);
    let status = exit_of(&mut bench);
    let (mut stdout, mut stderr) = (String::new(), String::new());
    bench
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut stdout)
        .unwrap();
    bench
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    assert!(!status.success(), "{stdout}{stderr}");
    assert!(stdout.contains("published"), "no report: {stdout}");
    assert!(stderr.contains("more than --max-errors 0"), "{stderr}");
    for line in stderr.lines() {
        assert!(
            !line.contains("MetadataMap") && !line.contains("details:"),
            "{line}"
        );
    }
    let first = stderr
        .lines()
        .find(|l| l.contains("first publish error") || l.contains("ended early: "))
        .unwrap_or_else(|| panic!("no first error: {stderr}"));
    assert!(
        first.contains("Unavailable") || first.contains("Unknown"),
        "{first}"
    );
}

/// The documents a clone has name every server variable as `serve` reads it,
/// and nothing that is not there.
#[test]
fn docs_name_every_environment_variable_as_serve_reads_it() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let out = run(&["serve", "--help"], b"");
    assert_succeeds(&out);
    let help = String::from_utf8(out.stdout).unwrap();
    let names = |text: &str| -> std::collections::BTreeSet<String> {
        text.match_indices("CUNICU_SIGNAL_")
            .map(|(i, _)| {
                text[i..]
                    .chars()
                    .take_while(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || *c == '_')
                    .collect::<String>()
            })
            .filter(|name| name.len() > "CUNICU_SIGNAL_".len())
            .collect()
    };
    let read = names(&help);
    assert!(read.len() > 30, "{read:?}");
    let mut documents = vec![root.join("README.md")];
    for dir in ["docs", "deploy"] {
        for entry in std::fs::read_dir(root.join(dir)).unwrap() {
            let path = entry.unwrap().path();
            if matches!(
                path.extension().and_then(|e| e.to_str()),
                Some("md" | "yaml")
            ) {
                documents.push(path);
            }
        }
    }
    for path in &documents {
        let text = std::fs::read_to_string(path).unwrap();
        let unknown: Vec<_> = names(&text).difference(&read).cloned().collect();
        assert!(unknown.is_empty(), "{}: {unknown:?}", path.display());
        assert!(!text.contains("…_"), "{}: shorthand", path.display());
        assert!(!text.contains("SPEC §"), "{}: SPEC", path.display());
    }
    let reference = std::fs::read_to_string(root.join("docs/SERVER.md")).unwrap();
    let missing: Vec<_> = read.difference(&names(&reference)).cloned().collect();
    assert!(missing.is_empty(), "docs/SERVER.md lacks {missing:?}");
}
