//! A real nats-server for the cluster tests (docs/PROTOCOL.md §12): one, or a cluster of
//! several with routes between them, on loopback. `scripts/test` builds the
//! server from the Go module proxy and names it in `CUNICU_TEST_NATS_SERVER`;
//! nothing is skipped without it: the tests fail and say so.

use std::{
    path::PathBuf,
    process::Stdio,
    time::{Duration, Instant},
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    process::{Child, Command},
};

/// The environment variable naming the nats-server binary.
pub const NATS_VAR: &str = "CUNICU_TEST_NATS_SERVER";

fn binary() -> PathBuf {
    match std::env::var_os(NATS_VAR) {
        Some(path) => PathBuf::from(path),
        None => panic!(
            "{NATS_VAR} is not set: the cluster tests need a nats-server \
             (scripts/test builds one; or `GOBIN=DIR go install \
             github.com/nats-io/nats-server/v2@v2.15.2` and set {NATS_VAR}=DIR/nats-server)"
        ),
    }
}

/// One nats-server process; killed when dropped.
pub struct Nats {
    child: Option<Child>,
    /// Its name in the cluster.
    pub name: String,
    /// Client port.
    pub port: u16,
    /// Monitoring port (HTTP).
    pub monitor: u16,
    cluster_port: u16,
    routes: Vec<u16>,
    /// Started once: a restart keeps its ports.
    started: bool,
    /// A configuration file, besides the flags.
    config: Option<PathBuf>,
}

impl Nats {
    /// A single server.
    pub async fn start() -> Nats {
        let mut nats = Nats::new("n1", Vec::new());
        nats.spawn().await;
        nats
    }

    /// A single server that also reads `config` (nats-server's configuration
    /// language), e.g. to set accounts and permissions.
    pub async fn start_with_config(config: &str) -> Nats {
        let mut nats = Nats::new("n1", Vec::new());
        let path = std::env::temp_dir().join(format!(
            "cunicu-signal-test-nats-{}-{}.conf",
            std::process::id(),
            nats.port
        ));
        std::fs::write(&path, config).expect("NATS configuration written");
        nats.config = Some(path);
        nats.spawn().await;
        nats
    }

    /// `n` servers with routes to each other.
    pub async fn cluster(n: usize) -> Vec<Nats> {
        let ports: Vec<u16> = (0..n).map(|_| super::unused_port()).collect();
        let mut nodes: Vec<Nats> = (0..n)
            .map(|i| {
                let mut node = Nats::new(&format!("n{}", i + 1), ports.clone());
                node.cluster_port = ports[i];
                node
            })
            .collect();
        for node in &mut nodes {
            node.spawn().await;
        }
        nodes
    }

    fn new(name: &str, routes: Vec<u16>) -> Nats {
        Nats {
            child: None,
            name: name.into(),
            port: super::unused_port(),
            monitor: super::unused_port(),
            cluster_port: 0,
            routes,
            started: false,
            config: None,
        }
    }

    /// Starts the process and waits until it serves; Err with its log if it
    /// exited first.
    async fn try_spawn(&mut self) -> Result<(), String> {
        let mut command = Command::new(binary());
        command
            .args(["-a", "127.0.0.1", "-p", &self.port.to_string()])
            .args(["-m", &self.monitor.to_string(), "-n", &self.name])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .kill_on_drop(true);
        // Its log, to say why when it does not come up.
        let log_path = std::env::temp_dir().join(format!(
            "cunicu-signal-test-nats-{}-{}.log",
            self.name, self.port
        ));
        match std::fs::File::create(&log_path) {
            Ok(file) => command.stderr(Stdio::from(file)),
            Err(_) => command.stderr(Stdio::null()),
        };
        if let Some(config) = &self.config {
            command.arg("-c").arg(config);
        }
        if self.cluster_port != 0 {
            let routes: Vec<String> = self
                .routes
                .iter()
                .filter(|p| **p != self.cluster_port)
                .map(|p| format!("nats://127.0.0.1:{p}"))
                .collect();
            command.args([
                "--cluster_name",
                "test",
                "--cluster",
                &format!("nats://127.0.0.1:{}", self.cluster_port),
                "--routes",
                &routes.join(","),
            ]);
        }
        self.child = Some(command.spawn().expect("nats-server starts"));
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.get("/healthz").await.is_none() {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                let log = std::fs::read_to_string(&log_path).unwrap_or_default();
                let _ = std::fs::remove_file(&log_path);
                return Err(format!("exited with {status}; its log:\n{log}"));
            }
            if Instant::now() >= deadline {
                let log = std::fs::read_to_string(&log_path).unwrap_or_default();
                let exited = self
                    .child
                    .as_mut()
                    .and_then(|c| c.try_wait().ok().flatten());
                panic!(
                    "nats-server {} (ports {} {}) not up in 20 s, exit {exited:?}; its log:\n{log}",
                    self.name, self.port, self.monitor
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let _ = std::fs::remove_file(&log_path);
        Ok(())
    }

    async fn spawn(&mut self) {
        let first = !self.started;
        let mut attempts = 0;
        loop {
            match self.try_spawn().await {
                Ok(()) => {
                    self.started = true;
                    return;
                }
                // A free port found by binding and closing may be taken by
                // another test's process before this one binds it: a first
                // start takes other ports (a restart must keep its own).
                Err(e) if first && attempts < 5 && e.contains("address already in use") => {
                    attempts += 1;
                    self.port = super::unused_port();
                    self.monitor = super::unused_port();
                }
                Err(e) => panic!("nats-server {} did not start: {e}", self.name),
            }
        }
    }

    /// Waits until this node has a route to each of `others` nodes.
    pub async fn wait_routes(&self, others: usize) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(body) = self.get("/routez").await
                && let Ok(json) = serde_json::from_str::<serde_json::Value>(&body)
                && json["num_routes"].as_u64().unwrap_or(0) as usize >= others
            {
                return;
            }
            assert!(Instant::now() < deadline, "{}: routes not up", self.name);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// `nats://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Stops the server (SIGKILL).
    pub async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill().await;
        }
    }

    /// Sends the server a signal (`STOP`, `CONT`) by `kill`.
    pub fn signal(&self, name: &str) {
        let Some(pid) = self.child.as_ref().and_then(|c| c.id()) else {
            return;
        };
        let sent = std::process::Command::new("kill")
            .args([format!("-{name}"), pid.to_string()])
            .status()
            .expect("kill runs");
        assert!(sent.success(), "kill -{name} {pid}");
    }

    /// Starts it again on the same ports.
    pub async fn restart(&mut self) {
        self.kill().await;
        self.spawn().await;
    }

    async fn get(&self, path: &str) -> Option<String> {
        let mut stream = TcpStream::connect(("127.0.0.1", self.monitor)).await.ok()?;
        stream
            // HTTP/1.0: the answer comes whole, not in chunks.
            .write_all(format!("GET {path} HTTP/1.0\r\nHost: nats\r\n\r\n").as_bytes())
            .await
            .ok()?;
        let mut text = String::new();
        tokio::time::timeout(Duration::from_secs(5), stream.read_to_string(&mut text))
            .await
            .ok()?
            .ok()?;
        let (head, body) = text.split_once("\r\n\r\n")?;
        head.contains(" 200 ").then(|| body.to_string())
    }

    /// The subjects each client connection (by its name) subscribes to.
    pub async fn subscriptions(&self) -> Vec<(String, Vec<String>)> {
        let body = self.get("/connz?subs=1").await.expect("connz");
        let json: serde_json::Value = serde_json::from_str(&body).expect("connz is JSON");
        json["connections"]
            .as_array()
            .map(|conns| {
                conns
                    .iter()
                    .map(|c| {
                        let name = c["name"].as_str().unwrap_or("").to_string();
                        let subs = c["subscriptions_list"]
                            .as_array()
                            .map(|s| {
                                s.iter()
                                    .filter_map(|x| x.as_str().map(str::to_string))
                                    .collect()
                            })
                            .unwrap_or_default();
                        (name, subs)
                    })
                    .collect()
            })
            .unwrap_or_default()
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        if let Some(config) = &self.config {
            let _ = std::fs::remove_file(config);
        }
    }
}
