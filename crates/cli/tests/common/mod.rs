//! Helpers shared by the integration tests of the `cunicu-signal` binary.

// Each test binary includes this module and uses a part of it.
#![allow(dead_code)]

use std::{
    io::{BufRead, BufReader, Read, Write},
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Output, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use cunicu_signal::{Key, PrivateKey};

pub const BIN: &str = env!("CARGO_BIN_EXE_cunicu-signal");
/// Limit of one step of the synchronous helpers (a run, a line).
pub const WAIT: Duration = Duration::from_secs(30);

/// Writes the private `key` (base64 and a newline) to `dir/name`.
pub fn key_file(dir: &Path, name: &str, key: &PrivateKey) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, format!("{}\n", key.secret_base64().as_str())).unwrap();
    path
}

/// Runs the binary to its end, killing it after [`WAIT`].
pub fn run(args: &[&str], stdin: &[u8]) -> Output {
    run_command(Command::new(BIN), args, stdin)
}

/// Runs `command` (the binary, or a wrapper that ends by executing it) with
/// `args` to its end, killing it after [`WAIT`].
pub fn run_command(mut command: Command, args: &[&str], stdin: &[u8]) -> Output {
    let mut child = command
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn cunicu-signal");
    // The command may exit before reading its input (a bad flag): ignore a broken pipe.
    let _ = child.stdin.take().unwrap().write_all(stdin);
    let id = child.id();
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(WAIT) {
        Ok(output) => output.unwrap(),
        Err(_) => {
            let _ = Command::new("kill")
                .args(["-KILL", &id.to_string()])
                .status();
            panic!("cunicu-signal {args:?} did not finish within {WAIT:?}");
        }
    }
}

/// Asserts a success; shows stderr if not.
pub fn assert_succeeds(output: &Output) {
    assert!(
        output.status.success(),
        "{}: {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
}

/// The next `n` lines of `lines`, each a JSON value, in arrival order.
pub fn json_lines(lines: &mpsc::Receiver<String>, n: usize) -> Vec<serde_json::Value> {
    (0..n)
        .map(|i| {
            let line = lines
                .recv_timeout(WAIT)
                .unwrap_or_else(|_| panic!("line {} of {n}: none within {WAIT:?}", i + 1));
            serde_json::from_str(&line).unwrap_or_else(|e| panic!("{line:?}: {e}"))
        })
        .collect()
}

/// Asserts a failure as users should see it: non-zero, nothing on stdout, one line on stderr.
pub fn assert_fails(output: &Output, needle: &str) {
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "succeeded; stderr: {stderr}");
    assert!(output.stdout.is_empty(), "stdout: {:?}", output.stdout);
    assert_eq!(
        stderr.trim_end().lines().count(),
        1,
        "stderr is not one line: {stderr}"
    );
    assert!(stderr.contains(needle), "{needle:?} not in {stderr}");
}

/// Collects the lines of a child's stdout or stderr on a thread.
pub fn lines_of<R: Read + Send + 'static>(stream: R) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        for line in BufReader::new(stream).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// Waits (up to [`WAIT`]) for a line containing `needle`; skips the others.
pub fn wait_for_line(lines: &mpsc::Receiver<String>, needle: &str) -> String {
    let deadline = Instant::now() + WAIT;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match lines.recv_timeout(left) {
            Ok(line) if line.contains(needle) => return line,
            Ok(_) => {}
            Err(e) => panic!("no line with {needle:?}: {e}"),
        }
    }
}

/// A child process killed (and reaped) when dropped.
pub struct Killed(pub Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Sends SIGTERM and waits (10 s at most) for the exit; returns the status
/// and how long the exit took.
pub fn terminate(child: &mut Child) -> (ExitStatus, Duration) {
    let started = Instant::now();
    let ok = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(ok.success());
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return (status, started.elapsed());
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "no exit after SIGTERM"
        );
        thread::sleep(Duration::from_millis(20));
    }
}

/// Starts `cunicu-signal serve` (listen address and more from `extra_env`);
/// returns it, its stderr lines and the address it listens on.
pub fn spawn_server(extra_env: &[(&str, &str)]) -> (Killed, mpsc::Receiver<String>, String) {
    let (child, lines, addr, _startup) = spawn_server_logged(extra_env);
    (child, lines, addr)
}

/// [`spawn_server`], and the lines it logged up to "listening" (the last).
pub fn spawn_server_logged(
    extra_env: &[(&str, &str)],
) -> (Killed, mpsc::Receiver<String>, String, Vec<String>) {
    let mut command = Command::new(BIN);
    command
        .arg("serve")
        .env("RUST_LOG", "info")
        // Tests stop servers at once unless they test the drain.
        .env("CUNICU_SIGNAL_DRAIN_DELAY", "0s")
        .env("CUNICU_SIGNAL_DRAIN_WINDOW", "0s")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    for (k, v) in extra_env {
        command.env(k, v);
    }
    // Owned at once, so that a failure below does not leave the server running.
    let mut child = Killed(command.spawn().unwrap());
    let lines = lines_of(child.0.stderr.take().unwrap());
    let deadline = Instant::now() + WAIT;
    let mut startup = Vec::new();
    let line = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match lines.recv_timeout(left) {
            Ok(line) if line.contains("signaling server listening") => {
                startup.push(line.clone());
                break line;
            }
            Ok(line) => startup.push(line),
            Err(e) => panic!("server not listening: {e}; it logged {startup:?}"),
        }
    };
    let addr = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("local_addr="))
        .unwrap_or_else(|| panic!("no address in {line}"))
        .to_string();
    (child, lines, addr, startup)
}

/// Starts `cunicu-signal subscribe` (from `from` only, if given) and waits until
/// it has subscribed; returns it with its stdout lines.
pub fn spawn_subscriber(
    url: &str,
    key: &Path,
    from: Option<&Key>,
) -> (Killed, mpsc::Receiver<String>) {
    spawn_subscriber_in(Command::new(BIN), url, key, from)
}

/// [`spawn_subscriber`] with `command`: the binary, or a wrapper that ends by
/// executing it.
pub fn spawn_subscriber_in(
    mut command: Command,
    url: &str,
    key: &Path,
    from: Option<&Key>,
) -> (Killed, mpsc::Receiver<String>) {
    command
        .args(["subscribe", "--backend", url, "--key-file"])
        .arg(key);
    if let Some(from) = from {
        command.args(["--from", &from.to_string()]);
    }
    let child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Owned at once, so that a failure below does not leave it running.
    let mut child = Killed(child);
    let stderr = lines_of(child.0.stderr.take().unwrap());
    let stdout = lines_of(child.0.stdout.take().unwrap());
    wait_for_line(&stderr, "subscribed as");
    (child, stdout)
}

/// Runs `cunicu-signal publish` with `input` on stdin.
pub fn publish(url: &str, key: &Path, to: &str, input: &[u8]) -> Output {
    publish_in(Command::new(BIN), url, key, to, input)
}

/// Publishes a credentials message with `ufrag` (with `command`, as
/// [`publish_in`]) and checks that it is the next line of `received`: that
/// nothing else came before it, on a medium that delivers in order. `unwanted`
/// says what must not have come, for the failure message.
pub fn publish_marker_next(
    command: Command,
    url: &str,
    key: &Path,
    to: &str,
    received: &mpsc::Receiver<String>,
    ufrag: &str,
    unwanted: &str,
) {
    let message = serde_json::json!({"credentials": {"ufrag": ufrag}});
    let out = publish_in(command, url, key, to, format!("{message}\n").as_bytes());
    assert_succeeds(&out);
    assert_eq!(
        json_lines(received, 1)[0]["message"],
        message,
        "{unwanted} before the marker {ufrag:?}"
    );
}

/// [`publish`] with `command`: the binary, or a wrapper that ends by executing it.
pub fn publish_in(command: Command, url: &str, key: &Path, to: &str, input: &[u8]) -> Output {
    let key = key.to_str().unwrap();
    run_command(
        command,
        &["publish", "--backend", url, "--key-file", key, "--to", to],
        input,
    )
}
