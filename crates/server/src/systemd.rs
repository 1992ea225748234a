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
    send(&[
        sd_notify::NotifyState::Ready,
        sd_notify::NotifyState::Status(status),
    ]);
}

/// Tells systemd the server is stopping.
pub fn stopping() {
    send(&[
        sd_notify::NotifyState::Stopping,
        sd_notify::NotifyState::Status("draining"),
    ]);
}

/// While the unit sets `WatchdogSec`, tells systemd every half of it that
/// the server is alive (the runtime runs tasks), until `stop`.
pub fn watchdog(stop: CancellationToken) -> Option<AbortOnDropHandle<()>> {
    let every = sd_notify::watchdog_enabled()? / 2;
    let every = every.max(Duration::from_millis(10));
    Some(AbortOnDropHandle::new(tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tick.tick() => send(&[sd_notify::NotifyState::Watchdog]),
            }
        }
    })))
}

fn send(state: &[sd_notify::NotifyState<'_>]) {
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return;
    }
    if let Err(e) = sd_notify::notify(state) {
        tracing::warn!("cannot notify systemd: {e}");
    }
}
