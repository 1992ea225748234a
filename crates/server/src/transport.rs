//! What a connection's HTTP/2 runs on: a TCP stream, plain or TLS, set up
//! within the handshake deadline (a TLS handshake waits for its turn among
//! those in progress and goes only within the rate of all).

use std::{
    io,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use bytes::Bytes;
use h2::server::{Builder, Connection};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
    time::Instant,
};
use tokio_rustls::{TlsAcceptor, server::TlsStream};

/// TLS, and the bounds on what its handshakes cost (a handshake costs a
/// signature, a fraction of a millisecond to a millisecond of CPU).
pub(crate) struct Tls {
    pub(crate) acceptor: TlsAcceptor,
    /// Handshakes in progress at once; beyond, a connection waits (within
    /// its handshake deadline).
    pub(crate) in_progress: Arc<tokio::sync::Semaphore>,
    /// Handshakes started a second, in all; beyond, connections are closed.
    pub(crate) rate: governor::DefaultDirectRateLimiter,
}

/// Why a connection was not set up.
#[derive(Debug)]
pub(crate) enum NotSetUp {
    /// No turn for its TLS handshake, or no TLS and HTTP/2 set-up, within
    /// the handshake deadline.
    Timeout,
    /// The server starts all the TLS handshakes a second it may.
    TlsRate,
    /// The client's handshake failed.
    Failed(String),
}

/// Sets up `stream`'s TLS (if `tls`) and HTTP/2 by `deadline`.
pub(crate) async fn establish(
    stream: TcpStream,
    tls: Option<&Tls>,
    h2: &Builder,
    deadline: Instant,
) -> Result<Connection<Io, Bytes>, NotSetUp> {
    let set_up = async {
        let io = match tls {
            None => Io::Plain(stream),
            Some(tls) => {
                let Ok(turn) = tls.in_progress.acquire().await else {
                    return Err(NotSetUp::Failed("no TLS handshakes are taken".into()));
                };
                if tls.rate.check().is_err() {
                    return Err(NotSetUp::TlsRate);
                }
                let accepted = tls.acceptor.accept(stream).await;
                // The handshake's turn ends with it, not with the preface.
                drop(turn);
                Io::Tls(Box::new(
                    accepted.map_err(|e| NotSetUp::Failed(format!("TLS handshake: {e}")))?,
                ))
            }
        };
        h2.handshake::<_, Bytes>(io)
            .await
            .map_err(|e| NotSetUp::Failed(format!("HTTP/2 handshake: {e}")))
    };
    tokio::time::timeout_at(deadline, set_up)
        .await
        .unwrap_or(Err(NotSetUp::Timeout))
}

/// An accepted connection, plain or TLS.
pub(crate) enum Io {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl AsyncRead for Io {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Io {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Io::Plain(s) => s.is_write_vectored(),
            Io::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_flush(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}
