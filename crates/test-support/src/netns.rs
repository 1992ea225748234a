//! Network namespaces for tests, made with `ip` (iproute2) and deleted on drop,
//! also when the test panics. Needs root.
//!
//! Names carry the process id and a counter, so tests that run in parallel, in
//! this process or in others, never share a namespace. A veth pair is created
//! with its two ends directly inside the two namespaces, so its interface names
//! never meet in the host's namespace, and it disappears with them.
//!
//! Processes run in a namespace by re-running the test binary there
//! ([`Netns::exec_test`]); the test sees [`IN_NETNS_ENV`] and runs its body.

use std::{
    ffi::OsStr,
    io::ErrorKind,
    net::Ipv4Addr,
    process::{Output, Stdio},
    sync::atomic::{AtomicU32, Ordering},
};

use anyhow::{Context as _, bail};

/// Set (to the test's name) in a test process that runs inside a namespace.
pub const IN_NETNS_ENV: &str = "CUNICU_TEST_IN_NETNS";

static NEXT: AtomicU32 = AtomicU32::new(0);

/// A number unique among the namespaces of this process.
fn next_number() -> u32 {
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// Runs `ip ARGS`; fails with its stderr, or with a clear message if `ip` is missing.
pub fn ip<S: AsRef<OsStr>>(args: &[S]) -> anyhow::Result<Output> {
    let shown = args
        .iter()
        .map(|a| a.as_ref().to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ");
    let output = std::process::Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| {
            if e.kind() == ErrorKind::NotFound {
                anyhow::anyhow!(
                    "the `ip` command is not installed: these tests need iproute2 (apt-get install iproute2) and root"
                )
            } else {
                anyhow::anyhow!("`ip {shown}` could not run: {e}")
            }
        })?;
    if !output.status.success() {
        bail!(
            "`ip {shown}` failed ({}): {} (these tests need root)",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(output)
}

/// A network namespace, deleted when dropped.
#[derive(Debug)]
pub struct Netns {
    name: String,
    number: u32,
}

impl Netns {
    /// Creates a namespace named `cunicu-PID-N-TAG` with `lo` up.
    pub fn new(tag: &str) -> anyhow::Result<Self> {
        let number = next_number();
        let name = format!("cunicu-{}-{number}-{tag}", std::process::id());
        ip(&["netns", "add", &name])?;
        let ns = Netns { name, number };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// The namespace's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs `ip -n NAME ARGS`.
    pub fn ip(&self, args: &[&str]) -> anyhow::Result<Output> {
        let mut all = vec!["-n", &self.name];
        all.extend_from_slice(args);
        ip(&all)
    }

    /// Lets multicast loop on `lo`: multicast flag on, a route for the IPv4
    /// groups and, for IPv6, a *local* route for ff00::/8 (a unicast route via
    /// `lo` would be turned into a reject route by the kernel).
    pub fn multicast_on_lo(&self) -> anyhow::Result<()> {
        self.ip(&["link", "set", "lo", "multicast", "on"])?;
        self.ip(&["route", "add", "224.0.0.0/4", "dev", "lo"])?;
        self.ip(&[
            "-6", "route", "add", "local", "ff00::/8", "dev", "lo", "table", "local",
        ])?;
        Ok(())
    }

    /// A subnet /24 for this namespace's links: `10.A.B.0`, from the process
    /// id and the namespace number, so that parallel tests use distinct ones.
    pub fn subnet(&self) -> [u8; 3] {
        let pid = std::process::id();
        [10, 64 + (pid % 128) as u8, (self.number % 256) as u8]
    }

    /// A command that runs `program` inside this namespace (`ip netns exec`).
    pub fn command(&self, program: impl AsRef<OsStr>) -> tokio::process::Command {
        let mut command = tokio::process::Command::new("ip");
        command
            .args(["netns", "exec", &self.name])
            .arg(program)
            .kill_on_drop(true);
        command
    }

    /// A command that runs the test `test` of the current test binary inside
    /// this namespace, with [`IN_NETNS_ENV`] set to its name. Its stdio is piped.
    pub fn exec_test(&self, test: &str) -> anyhow::Result<tokio::process::Command> {
        let exe = std::env::current_exe().context("path of the test binary")?;
        let mut command = self.command(exe);
        command
            .args(["--exact", test, "--nocapture", "--test-threads=1"])
            .env(IN_NETNS_ENV, test)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        Ok(command)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Err(e) = ip(&["netns", "del", &self.name]) {
            eprintln!("could not delete network namespace {}: {e:#}", self.name);
        }
    }
}

/// The two ends of a veth pair, each in its namespace, up, with an address.
#[derive(Debug, Clone)]
pub struct Veth {
    /// The interface in the first namespace.
    pub a: String,
    /// Its address.
    pub a_addr: Ipv4Addr,
    /// The interface in the second namespace.
    pub b: String,
    /// Its address.
    pub b_addr: Ipv4Addr,
}

impl Veth {
    /// Joins `a` and `b` by a veth pair on the subnet of `a`, `.1` in `a` and
    /// `.2` in `b`, with routes for the IPv4 multicast groups through it.
    /// IPv6 link-local addresses are used at once (no duplicate detection).
    pub fn link(a: &Netns, b: &Netns) -> anyhow::Result<Self> {
        let [x, y, z] = a.subnet();
        let veth = Veth {
            a: "mc-a".into(),
            a_addr: Ipv4Addr::new(x, y, z, 1),
            b: "mc-b".into(),
            b_addr: Ipv4Addr::new(x, y, z, 2),
        };
        for ns in [a, b] {
            // Before the link exists, so that its link-local address is usable at once.
            ns.sysctl("net.ipv6.conf.default.accept_dad", "0")?;
        }
        ip(&[
            "link", "add", &veth.a, "netns", &a.name, "type", "veth", "peer", "name", &veth.b,
            "netns", &b.name,
        ])?;
        for (ns, dev, addr) in [(a, &veth.a, veth.a_addr), (b, &veth.b, veth.b_addr)] {
            ns.ip(&["addr", "add", &format!("{addr}/24"), "dev", dev])?;
            ns.ip(&["link", "set", dev, "multicast", "on", "up"])?;
            ns.ip(&["route", "add", "224.0.0.0/4", "dev", dev])?;
        }
        Ok(veth)
    }
}

impl Netns {
    /// Sets a sysctl inside this namespace.
    pub fn sysctl(&self, key: &str, value: &str) -> anyhow::Result<()> {
        let output = std::process::Command::new("ip")
            .args(["netns", "exec", &self.name, "sysctl", "-q", "-w"])
            .arg(format!("{key}={value}"))
            .stdin(Stdio::null())
            .output()
            .context("running sysctl in the namespace")?;
        if !output.status.success() {
            bail!(
                "sysctl {key}={value} in {} failed: {}",
                self.name,
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
        Ok(())
    }
}
