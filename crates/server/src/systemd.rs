//! Running under systemd: the sockets it passes (socket activation,
//! `LISTEN_FDS`), and what the server tells it over `$NOTIFY_SOCKET`
//! (`READY=1` once listening, `STOPPING=1` when a stop begins, `WATCHDOG=1`
//! while the unit sets `WatchdogSec`). Outside systemd all of it does nothing.

use std::time::Duration;

use tokio_util::{sync::CancellationToken, task::AbortOnDropHandle};

use crate::Listeners;

/// Takes the listening sockets systemd passed, if any: the first is the
/// gRPC port, a second the metrics port.
///
/// Call it before any thread is started (before the tokio runtime): it
/// removes `LISTEN_FDS` and `LISTEN_PID` from the environment, so that
/// child processes do not take the sockets for theirs.
pub fn listeners() -> std::io::Result<Listeners> {
    let mut fds = listenfd::ListenFd::from_env();
    let grpc = fds.take_tcp_listener(0)?;
    let metrics = fds.take_tcp_listener(1)?;
    Ok(Listeners { grpc, metrics })
}

/// Tells systemd the server is ready (and what it listens on).
pub fn ready(status: &str) {
    send(&format!("READY=1\nSTATUS={status}\n"));
}

/// Tells systemd the server is stopping.
pub fn stopping() {
    send("STOPPING=1\nSTATUS=draining\n");
}

/// While the unit sets `WatchdogSec`, tells systemd every half of it that
/// the server is alive (the runtime runs tasks), until `stop`.
pub fn watchdog(stop: CancellationToken) -> Option<AbortOnDropHandle<()>> {
    let every = watchdog_interval()? / 2;
    let every = every.max(Duration::from_millis(10));
    Some(AbortOnDropHandle::new(tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tick.tick() => send("WATCHDOG=1\n"),
            }
        }
    })))
}

/// `WATCHDOG_USEC`, if it is meant for this process (`WATCHDOG_PID`).
fn watchdog_interval() -> Option<Duration> {
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    match std::env::var("WATCHDOG_PID") {
        Ok(pid) if pid.parse::<u32>().ok() != Some(std::process::id()) => None,
        _ => (usec > 0).then(|| Duration::from_micros(usec)),
    }
}

/// One datagram to `$NOTIFY_SOCKET` (a path, or `@` and an abstract name),
/// without blocking: a service manager that does not read loses it rather
/// than stalling the server.
fn send(message: &str) {
    use std::os::{linux::net::SocketAddrExt as _, unix::net};
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let sent = net::UnixDatagram::unbound().and_then(|socket| {
        socket.set_nonblocking(true)?;
        let bytes = std::os::unix::ffi::OsStrExt::as_bytes(path.as_os_str());
        match bytes.strip_prefix(b"@") {
            Some(name) => socket.send_to_addr(
                message.as_bytes(),
                &net::SocketAddr::from_abstract_name(name)?,
            ),
            None => socket.send_to(message.as_bytes(), &path),
        }
    });
    if let Err(e) = sent {
        tracing::warn!(
            "cannot notify systemd at {}: {e}",
            std::path::Path::new(&path).display()
        );
    }
}
