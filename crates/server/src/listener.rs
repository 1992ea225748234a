//! The accept loop: connections capped in all (shared fairly at the cap),
//! per client and per address, new ones rate-limited per client and per
//! address ([`crate::client`]); each accepted connection gets its own task
//! ([`crate::conn`]), which sets up TLS and HTTP/2 within its deadline
//! ([`crate::transport`]).

use std::{net::SocketAddr, sync::Arc};

use tokio::net::TcpListener;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    ServerError,
    bounds::{ACCEPT_ERROR_PAUSE, FORGET_RATES_EVERY},
    conn,
    shared::Shared,
};

/// Accepts connections on `listener` until `shutdown` and serves each in a
/// task of `tasks`. A connection is admitted or refused at once, never kept
/// waiting: at the server's cap of connections, one from a client below its
/// fair share ends the newest connection of the client holding the most; a
/// client over its limits is refused (its connection closed).
pub(crate) async fn accept(
    listener: TcpListener,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
    kill: CancellationToken,
    tasks: TaskTracker,
) {
    let mut forget = tokio::time::interval(FORGET_RATES_EVERY);
    forget.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let (stream, remote) = tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = forget.tick() => {
                shared.clients.forget_idle_rates();
                continue;
            }
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    tracing::warn!("accepting a connection failed: {e}");
                    tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                    continue;
                }
            },
        };
        let guard = match shared.clients.connect(remote.ip()) {
            Ok(guard) => guard,
            Err(refused) => {
                shared.metrics.count_refusal(refused.counted());
                if shared.logs.refused.allow() {
                    tracing::info!(%remote, "connection refused: {refused}");
                }
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let (shared, shutdown, kill) = (shared.clone(), shutdown.clone(), kill.clone());
        tasks.spawn(async move {
            conn::serve(stream, remote, guard, shared, shutdown, kill).await;
        });
    }
}

/// The address a listener is bound to.
pub(crate) fn bound(listener: &TcpListener, asked: SocketAddr) -> Result<SocketAddr, ServerError> {
    listener.local_addr().map_err(|source| ServerError::Bind {
        addr: asked,
        source,
    })
}
