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
use cunicu_signal::Key;

#[test]
fn keygen_and_pubkey_work_like_wg() {
    let out = run(&["keygen"], b"");
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert_eq!(text.len(), 45, "44 characters and a newline: {text:?}");
    let private: Key = text.parse().unwrap();
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
    let (alice, bob) = (Key::generate(), Key::generate());
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
        &seal(alice_file.to_str().unwrap(), &Key::ZERO.to_string(), "{}"),
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
        let key: Key = case["recipient_private"].as_str().unwrap().parse().unwrap();
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
    let server_key = key_file(dir.path(), "server", &Key::generate());
    let (_server, _lines, addr) = spawn_server(&[
        ("CUNICU_SIGNAL_LISTEN", "127.0.0.1:0"),
        ("CUNICU_SIGNAL_KEY_FILE", server_key.to_str().unwrap()),
        ("CUNICU_SIGNAL_AUTH", "required"),
    ]);
    let url = format!("grpc://{addr}?insecure=true");
    let (alice, bob) = (Key::generate(), Key::generate());
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
    let carol = Key::generate().public_key().to_string();
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
    let (alice, bob) = (Key::generate(), Key::generate());
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
    let carol_file = key_file(dir.path(), "carol", &Key::generate());
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
    let file = key_file(dir.path(), "k", &Key::generate());
    let to = Key::generate().public_key().to_string();
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
    // the server's process is measured.
    let (server, _lines, addr) = spawn_server(&[("CUNICU_SIGNAL_LISTEN", "127.0.0.1:0")]);
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
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let published = report["published"].as_u64().unwrap();
    assert!(published > 0, "{report}");
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
