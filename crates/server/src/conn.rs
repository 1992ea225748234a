//! One task per client connection: its HTTP/2 (the h2 crate), its
//! subscription streams, its calls in progress and its timers.
//!
//! Subscribe and Publish are served here, the rest through tonic
//! ([`crate::bridge`]). The hub announces envelopes for this connection's
//! subscriptions in its [`Mailbox`]; the task hands them to HTTP/2 and lets
//! h2 write everything that is ready in one go, so that one write carries
//! the envelopes of many streams. Nothing waits on anything else: a call in
//! progress is a future the task polls, and a subscriber that does not read
//! only fills its own queue.
//!
//! Limits (docs/PROTOCOL.md §10): the TLS handshake, the HTTP/2 preface and the first
//! request must come within the handshake timeout; a request's first bytes
//! within the first-bytes timeout and its whole body within the request
//! timeout ([`crate::deadlines`]); a connection without streams is closed (GOAWAY)
//! after the idle timeout; one whose keepalive ping goes unanswered is
//! dropped; a subscriber that drains too little of what waits for it over
//! the stall timeout is cut off. Whatever way the connection ends, its
//! subscriptions, their queues and their bytes go with it at once.

use std::{
    future::Future,
    net::SocketAddr,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll, Waker},
    time::Duration,
};

use bytes::Bytes;
use cunicu_signal::{
    Key,
    backend::grpc::{RECIPIENTS_ASK, RECIPIENTS_METADATA},
    log_limit::LogLimiter,
    proto::signaling::{Envelope, SubscribeParams},
};
use futures::{StreamExt as _, stream::FuturesUnordered};
use h2::{
    Ping, PingPong, RecvStream, SendStream,
    server::{Builder, SendResponse},
};
use http::{HeaderMap, Request};
use prost::Message as _;
use slab::Slab;
use tokio::{
    net::TcpStream,
    time::{Instant, Sleep},
};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use tonic::{Status, service::Routes};

use crate::{
    auth::Auth,
    bridge::{self, MAX_HEALTH_REQUEST_BYTES},
    client::{
        Charged, Client, ClientState, Clients, ConnectionGuard, Evict, Exhausted, Origin, Refused,
        SlotGuard,
    },
    deadlines::{Late, RequestDeadline, Verdict},
    hub::{Cut, Hub, Mailbox, Publisher, Subscription, Take},
    listener::Io,
    metrics::Metrics,
    wire::{self, EMPTY_MESSAGE, PREFIX_LEN, ReadError},
};

/// The status message of streams ended and calls refused at shutdown.
const SHUTTING_DOWN: &str = "server shutting down";
/// The path of `grpc.health.v1.Health/Check`.
const HEALTH_CHECK: &str = "/grpc.health.v1.Health/Check";
/// The path of `grpc.health.v1.Health/Watch`.
const HEALTH_WATCH: &str = "/grpc.health.v1.Health/Watch";
/// The request message of a Subscribe is a key: a few dozen bytes.
const MAX_SUBSCRIBE_MESSAGE: usize = 1024;
/// Loop turns before the task lets others run.
const MAX_TURNS: usize = 64;
/// Requests a connection's task takes in one turn at most: enough for what
/// one read brings from busy publishers, and few enough that the calls taken
/// run before more come in (a burst of Subscribes from one client is taken in
/// steps, not all at once against its limit of calls in progress).
const MAX_ACCEPTS: usize = 4;
/// Streams refused on one connection for the client's request rate before
/// the connection is closed (GOAWAY `ENHANCE_YOUR_CALM`).
const REFUSED_BEFORE_CLOSE: u32 = 1024;
/// How long a connection ended to make room for another client's fair
/// share, or for want of a proof, has to let its last answers out.
const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// Timeouts of a connection.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Timeouts {
    /// TLS handshake, HTTP/2 preface and the first request.
    pub(crate) handshake: Duration,
    /// A request's first message bytes, once its stream is open.
    pub(crate) first_bytes: Duration,
    /// A request's whole message, once its stream is open.
    pub(crate) request: Duration,
    /// A connection without streams.
    pub(crate) idle: Duration,
    /// The span over which a subscriber's drain rate is judged.
    pub(crate) stall: Duration,
    /// Interval of keepalive pings.
    pub(crate) keepalive_interval: Duration,
    /// How long a ping may go unanswered.
    pub(crate) keepalive_timeout: Duration,
}

/// What every connection task shares.
pub(crate) struct Shared {
    pub(crate) hub: Hub,
    /// The other replicas, if this server is one of several.
    pub(crate) cluster: Option<Arc<crate::cluster::Cluster>>,
    pub(crate) clients: Arc<Clients>,
    pub(crate) metrics: Arc<Metrics>,
    /// The services served through tonic.
    pub(crate) routes: Routes,
    pub(crate) timeouts: Timeouts,
    pub(crate) max_envelope_size: usize,
    pub(crate) h2: Builder,
    pub(crate) tls: Option<Tls>,
    /// Metadata of every response.
    pub(crate) response_headers: HeaderMap,
    /// Proofs of key possession.
    pub(crate) auth: Arc<Auth>,
    /// Whether and how a Publish learns its recipient count.
    pub(crate) recipients: Recipients,
    pub(crate) logs: Logs,
    /// When each stream open at shutdown ends.
    pub(crate) drain: crate::drain::DrainPlan,
}

/// Recipient counts: a Publish with `cunicu-recipients: ask` learns how many
/// subscription streams got its envelope, on every replica.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Recipients {
    /// Off: `ask` is answered with nothing (presence is private).
    pub(crate) enabled: bool,
    /// How long a replica collects the counts of the others.
    pub(crate) wait: Duration,
}

impl Recipients {
    /// Whether the request asks for a count and gets one.
    fn answers(&self, headers: &HeaderMap) -> bool {
        self.enabled
            && headers
                .get(RECIPIENTS_METADATA)
                .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(RECIPIENTS_ASK.as_bytes()))
    }
}

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

/// Log limiters of what clients can cause many times.
#[derive(Default)]
pub(crate) struct Logs {
    pub(crate) refused: LogLimiter,
    pub(crate) cut: LogLimiter,
    pub(crate) closed: LogLimiter,
}

/// Serves one accepted connection until it ends, `kill` fires, or (after a
/// graceful end of its streams) `shutdown` completes.
pub(crate) async fn serve(
    stream: TcpStream,
    remote: SocketAddr,
    guard: ConnectionGuard,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
    kill: CancellationToken,
) {
    let metrics = shared.metrics.clone();
    metrics.connections.inc();
    let _open = scopeguard(move || {
        metrics.connections.dec();
    });
    let deadline = Instant::now() + shared.timeouts.handshake;
    // A TLS handshake waits for its turn among those in progress, and goes
    // only within the rate of all.
    let handshake = match &shared.tls {
        None => None,
        Some(tls) => {
            let permit = tokio::select! {
                _ = kill.cancelled() => return,
                _ = shutdown.cancelled() => return,
                permit = tokio::time::timeout_at(deadline, tls.in_progress.clone().acquire_owned()) => permit,
            };
            let Ok(Ok(permit)) = permit else {
                shared.metrics.close_connection_for("handshake_timeout");
                return;
            };
            if tls.rate.check().is_err() {
                shared.metrics.refuse_connection_for("tls_handshake_rate");
                if shared.logs.refused.allow() {
                    tracing::info!(%remote, "connection refused: the server starts all the TLS handshakes a second it may");
                }
                return;
            }
            Some(permit)
        }
    };
    let set_up = async {
        let io = match &shared.tls {
            None => Io::Plain(stream),
            Some(tls) => {
                let accepted = tls.acceptor.accept(stream).await;
                // The handshake's turn ends with it, not with the preface.
                drop(handshake);
                Io::Tls(Box::new(
                    accepted.map_err(|e| format!("TLS handshake: {e}"))?,
                ))
            }
        };
        shared
            .h2
            .handshake::<_, Bytes>(io)
            .await
            .map_err(|e| format!("HTTP/2 handshake: {e}"))
    };
    let h2 = tokio::select! {
        _ = kill.cancelled() => return,
        _ = shutdown.cancelled() => return,
        set_up = tokio::time::timeout_at(deadline, set_up) => match set_up {
            Ok(Ok(h2)) => h2,
            Ok(Err(e)) => {
                tracing::debug!(%remote, "connection not set up: {e}");
                return;
            }
            Err(_) => {
                shared.metrics.close_connection_for("handshake_timeout");
                if shared.logs.closed.allow() {
                    tracing::info!(%remote, "connection closed: no HTTP/2 set-up within the handshake timeout");
                }
                return;
            }
        },
    };
    let evicted = Arc::new(CancellationToken::new());
    let victim: std::sync::Weak<dyn Evict> = Arc::downgrade(&evicted) as _;
    guard.set_victim(victim);
    let mut connection = Connection::new(
        h2,
        shared,
        guard,
        remote,
        (
            shutdown,
            kill,
            CancellationToken::clone(&evicted).cancelled_owned(),
        ),
        deadline,
    );
    let end = std::future::poll_fn(|cx| connection.poll_run(cx)).await;
    match end {
        End::Closed | End::Killed => {}
        End::Error(e) => tracing::debug!(%remote, "connection ended: {e}"),
        End::Cut(reason) => {
            connection.shared.metrics.close_connection_for(reason);
            if connection.shared.logs.closed.allow() {
                tracing::info!(%remote, reason, "connection closed");
            }
        }
    }
}

/// Runs `f` when dropped.
fn scopeguard(f: impl FnOnce()) -> impl Drop {
    struct Guard<F: FnOnce()>(Option<F>);
    impl<F: FnOnce()> Drop for Guard<F> {
        fn drop(&mut self) {
            if let Some(f) = self.0.take() {
                f();
            }
        }
    }
    Guard(Some(f))
}

enum End {
    /// HTTP/2 closed the connection (the peer, or a GOAWAY that completed).
    Closed,
    /// The server stopped hard.
    Killed,
    Error(h2::Error),
    /// The server cut the connection (the metric's reason).
    Cut(&'static str),
}

/// What a call in progress ends with.
enum Done {
    /// Answered.
    Finished,
    /// A subscription is in the hub: its stream opens.
    Subscribed {
        slot: usize,
        respond: SendResponse<Bytes>,
        subscription: Subscription,
    },
    /// A subscription was refused (answered); its slot goes.
    NotSubscribed { slot: usize },
}

type Call = Pin<Box<dyn Future<Output = Done> + Send>>;

/// A subscription stream of this connection.
enum Slot {
    /// Being set up by a call in progress.
    Pending,
    Open {
        send: SendStream<Bytes>,
        subscription: Subscription,
    },
}

enum Keepalive {
    /// The next ping goes at this time.
    Next(Instant),
    /// A ping is out; without its answer by this time the connection goes.
    Waiting(Instant),
}

struct Connection {
    h2: h2::server::Connection<Io, Bytes>,
    shared: Arc<Shared>,
    client: ConnectionGuard,
    remote: SocketAddr,
    /// The key a call of this connection proved first: the client of its
    /// later calls without a proof.
    key: Option<Key>,
    /// A call other than GetBuildInfo came (a provisional connection's
    /// first must prove a key).
    called: bool,
    mailbox: Arc<Mailbox>,
    subs: Slab<Slot>,
    calls: FuturesUnordered<Call>,
    /// Scratch list of posted slots.
    posted: Vec<usize>,
    /// HTTP/2 streams open: calls in progress and subscriptions.
    streams: usize,
    timer: Pin<Box<Sleep>>,
    ping_pong: Option<PingPong>,
    keepalive: Keepalive,
    first_request_at: Option<Instant>,
    idle_at: Option<Instant>,
    stall_at: Option<Instant>,
    shutdown: Pin<Box<WaitForCancellationFutureOwned>>,
    kill: Pin<Box<WaitForCancellationFutureOwned>>,
    /// Fires when the connection is ended to make room for another client.
    evicted: Option<Pin<Box<WaitForCancellationFutureOwned>>>,
    /// Ended by the server (evicted, unproven): by then it goes, done or not.
    close_by: Option<Instant>,
    stopping: bool,
    /// A GOAWAY went out: the connection ends with its last stream.
    closing: bool,
    /// Stopping: when each open subscription ends, latest first.
    ending: Vec<(Instant, usize)>,
    /// Streams refused for the request rate.
    refused: u32,
    /// Writing was put off once to let other tasks add to it.
    deferred: bool,
}

impl Connection {
    fn new(
        mut h2: h2::server::Connection<Io, Bytes>,
        shared: Arc<Shared>,
        client: ConnectionGuard,
        remote: SocketAddr,
        (shutdown, kill, evicted): (
            CancellationToken,
            CancellationToken,
            WaitForCancellationFutureOwned,
        ),
        first_request_at: Instant,
    ) -> Self {
        let now = Instant::now();
        let keepalive = Keepalive::Next(now + shared.timeouts.keepalive_interval);
        Connection {
            ping_pong: h2.ping_pong(),
            h2,
            client,
            remote,
            key: None,
            called: false,
            mailbox: Arc::new(Mailbox::default()),
            subs: Slab::new(),
            calls: FuturesUnordered::new(),
            posted: Vec::new(),
            streams: 0,
            timer: Box::pin(tokio::time::sleep_until(first_request_at)),
            keepalive,
            first_request_at: Some(first_request_at),
            idle_at: None,
            stall_at: None,
            shutdown: Box::pin(shutdown.cancelled_owned()),
            kill: Box::pin(kill.cancelled_owned()),
            evicted: Some(Box::pin(evicted)),
            close_by: None,
            stopping: false,
            closing: false,
            ending: Vec::new(),
            refused: 0,
            deferred: false,
            shared,
        }
    }

    fn poll_run(&mut self, cx: &mut Context<'_>) -> Poll<End> {
        self.mailbox.register(cx.waker());
        for _ in 0..MAX_TURNS {
            let mut busy = false;
            if self.kill.as_mut().poll(cx).is_ready() {
                return Poll::Ready(End::Killed);
            }
            if !self.stopping && self.shutdown.as_mut().poll(cx).is_ready() {
                self.stop();
                busy = true;
            }
            if let Some(evicted) = self.evicted.as_mut()
                && evicted.as_mut().poll(cx).is_ready()
            {
                self.evicted = None;
                self.evict();
                busy = true;
            }
            // Envelopes to send, and streams that changed.
            self.mailbox.take(&mut self.posted);
            if !self.posted.is_empty() {
                busy = true;
                let posted = std::mem::take(&mut self.posted);
                for &slot in &posted {
                    self.drain(slot);
                }
                self.posted = posted;
            }
            while let Poll::Ready(Some(done)) = self.calls.poll_next_unpin(cx) {
                self.finish(done);
                busy = true;
            }
            // What the above queued is written below. Once per batch, let the
            // other tasks that are ready run first: they (publishers on other
            // connections) may queue more for this one, and one write then
            // carries it all. It costs a turn of the scheduler, not a wait.
            if busy && !self.deferred {
                self.deferred = true;
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            self.deferred = false;
            // Reads frames, and writes what is queued: once for all. Every
            // request that one read brought is taken in this turn, so that
            // their answers, too, go out in one write (taking one a turn
            // wrote once per request).
            for _ in 0..MAX_ACCEPTS {
                match self.h2.poll_accept(cx) {
                    Poll::Ready(Some(Ok((request, respond)))) => {
                        if let Err(end) = self.accept(request, respond) {
                            return Poll::Ready(end);
                        }
                        busy = true;
                    }
                    Poll::Ready(Some(Err(e))) => return Poll::Ready(End::Error(e)),
                    Poll::Ready(None) => return Poll::Ready(End::Closed),
                    Poll::Pending => break,
                }
            }
            match self.poll_timers(cx) {
                Ok(acted) => busy |= acted,
                Err(end) => return Poll::Ready(end),
            }
            if !busy {
                return Poll::Pending;
            }
        }
        // Busy for long: let other tasks run, then go on.
        cx.waker().wake_by_ref();
        Poll::Pending
    }

    /// Where the connection comes from.
    fn origin(&self) -> Origin {
        self.client.origin()
    }

    /// Who a new request is charged to: the key its proof proves, else the
    /// key the connection proved before, else its address. The first call
    /// (GetBuildInfo aside) of a connection admitted provisionally must
    /// prove a key: `Err` with the refusal that closes it.
    fn caller(&mut self, request: &Request<RecvStream>) -> Result<Client, Refused> {
        let path = request.uri().path();
        let origin = self.origin();
        let proven = self
            .shared
            .auth
            .identify(request.headers(), path, origin.client());
        if let Some(key) = proven
            && self.key.is_none()
        {
            // The connection is the key's from now on (if the key has room).
            match self.client.prove(key) {
                Ok(()) => self.key = Some(key),
                Err(refused) if self.client.is_provisional() => return Err(refused),
                Err(_) => {}
            }
        }
        if !self.called && path != wire::GET_BUILD_INFO {
            self.called = true;
            if self.client.is_provisional() {
                return Err(self.client.unproven());
            }
        }
        Ok(proven
            .or(self.key)
            .map_or_else(|| origin.client(), Client::Key))
    }

    /// Ends the connection, whose client held the most connections when the
    /// server held all it may, for another client's fair share: each
    /// subscription stream ends with RESOURCE_EXHAUSTED, calls in progress
    /// get a moment to finish.
    fn evict(&mut self) {
        let shared = self.shared.clone();
        shared.metrics.close_connection_for("fair_share");
        if shared.logs.closed.allow() {
            tracing::info!(remote = %self.remote, "connection closed: the server holds all the connections it may, this client the most, and another needed its share");
        }
        let status = Status::resource_exhausted(
            "the server holds all the connections it may: this client held the most, and another needed its share",
        );
        let open: Vec<usize> = self
            .subs
            .iter()
            .filter(|(_, s)| matches!(s, Slot::Open { .. }))
            .map(|(slot, _)| slot)
            .collect();
        for slot in open {
            if let Some(Slot::Open { mut send, .. }) = self.subs.try_remove(slot) {
                let _ = send.send_trailers(wire::status_trailers(&status));
                self.stream_done();
            }
        }
        self.close_soon();
    }

    /// Sends GOAWAY: the connection ends with its last stream, and within
    /// [`CLOSE_GRACE`] in any case.
    fn close_soon(&mut self) {
        self.closing = true;
        self.idle_at = None;
        self.first_request_at = None;
        self.h2.graceful_shutdown();
        self.close_by = Some(Instant::now() + CLOSE_GRACE);
    }

    /// A new stream: a call starts. Fails when the client keeps going over
    /// its request rate.
    fn accept(
        &mut self,
        request: Request<RecvStream>,
        mut respond: SendResponse<Bytes>,
    ) -> Result<(), End> {
        self.first_request_at = None;
        let shared = self.shared.clone();
        if self.closing && self.close_by.is_some() {
            let status = Status::unavailable("the server is closing this connection");
            let _ = respond.send_response(
                wire::error_response(&status, &shared.response_headers),
                true,
            );
            return Ok(());
        }
        let caller = match self.caller(&request) {
            Ok(caller) => caller,
            Err(refused) => {
                // A connection beyond its address's per-client limit whose
                // first call proved no key: refused, and closed.
                shared.metrics.close_connection_for("unproven");
                if shared.logs.closed.allow() {
                    tracing::info!(remote = %self.remote, "connection closed: {refused}");
                }
                let _ = respond.send_response(
                    wire::error_response(&refused.status(), &shared.response_headers),
                    true,
                );
                self.close_soon();
                return Ok(());
            }
        };
        if let Err(refused) = shared.clients.check_request(caller) {
            // One HEADERS frame that says when to come back (a reset would
            // say nothing); a flood costs that much a stream, no more.
            shared.metrics.reject_for(refused.reason());
            let _ = respond.send_response(
                wire::error_response(&refused.status(), &shared.response_headers),
                true,
            );
            self.refused += 1;
            if self.refused >= REFUSED_BEFORE_CLOSE {
                self.h2.abrupt_shutdown(h2::Reason::ENHANCE_YOUR_CALM);
                if shared.logs.refused.allow() {
                    tracing::info!(remote = %self.remote, "connection closed: {refused}");
                }
                return Err(End::Cut("request_rate"));
            }
            return Ok(());
        }
        self.idle_at = None;
        self.streams += 1;
        if self.stopping {
            let status = Status::unavailable(SHUTTING_DOWN);
            let _ = respond.send_response(
                wire::error_response(&status, &shared.response_headers),
                true,
            );
            self.stream_done();
            return Ok(());
        }
        let origin = self.origin();
        let call = match self.client.clients().call(caller, origin) {
            Ok(call) => call,
            Err(refused) => {
                self.refuse(&refused, respond);
                self.stream_done();
                return Ok(());
            }
        };
        let client = call.state().clone();
        let future: Call = match request.uri().path() {
            wire::SUBSCRIBE => {
                let slot = self.subs.insert(Slot::Pending);
                Box::pin(subscribe(
                    shared,
                    (client, origin),
                    call,
                    request,
                    respond,
                    self.mailbox.clone(),
                    slot,
                ))
            }
            wire::PUBLISH => Box::pin(publish(shared, (client, origin), call, request, respond)),
            path => {
                let clients = self.client.clients();
                // Health checks never wait behind the other services' calls,
                // and watches, which last, have a small pool of their own.
                let (taken, limit) = match path {
                    HEALTH_CHECK => (
                        clients.health_check(caller, origin),
                        MAX_HEALTH_REQUEST_BYTES,
                    ),
                    HEALTH_WATCH => (
                        clients.health_watch(caller, origin),
                        MAX_HEALTH_REQUEST_BYTES,
                    ),
                    _ => (clients.bridged(caller, origin), bridge::MAX_REQUEST_BYTES),
                };
                let bridged = match taken {
                    Ok(bridged) => bridged,
                    Err(refused) => {
                        self.refuse(&refused, respond);
                        self.stream_done();
                        return Ok(());
                    }
                };
                Box::pin(async move {
                    let answering = bridge::Answering {
                        client,
                        address: origin.client(),
                        server: shared.hub.budget().clone(),
                        metrics: shared.metrics.clone(),
                        timeout: shared.timeouts.request,
                        first_bytes: shared.timeouts.first_bytes,
                    };
                    // Either slot taken back ends the call.
                    let ended = async {
                        tokio::select! {
                            () = call.ended().cancelled() => {}
                            () = bridged.ended().cancelled() => {}
                        }
                    };
                    bridge::serve(
                        shared.routes.clone(),
                        request,
                        respond,
                        &shared.response_headers,
                        &answering,
                        limit,
                        ended,
                    )
                    .await;
                    // Held until the answer is written, or thrown away.
                    drop((call, bridged));
                    Done::Finished
                })
            }
        };
        self.calls.push(future);
        Ok(())
    }

    fn refuse(&self, refused: &Refused, mut respond: SendResponse<Bytes>) {
        let shared = &self.shared;
        shared.metrics.reject_for(refused.reason());
        if shared.logs.refused.allow() {
            tracing::info!(remote = %self.remote, "request refused: {refused}");
        }
        let status = refused.status();
        let _ = respond.send_response(
            wire::error_response(&status, &shared.response_headers),
            true,
        );
    }

    fn finish(&mut self, done: Done) {
        match done {
            Done::Finished => self.stream_done(),
            Done::NotSubscribed { slot } => {
                self.subs.try_remove(slot);
                self.stream_done();
            }
            Done::Subscribed {
                slot,
                mut respond,
                subscription,
            } => {
                let headers = &self.shared.response_headers;
                if self.stopping {
                    // Set up while stopping: end it at once.
                    let status = Status::unavailable(SHUTTING_DOWN);
                    let _ = respond.send_response(wire::error_response(&status, headers), true);
                    self.subs.try_remove(slot);
                    self.stream_done();
                    return;
                }
                let Ok(mut send) = respond.send_response(wire::ok_headers(headers), false) else {
                    self.subs.try_remove(slot);
                    self.stream_done();
                    return;
                };
                // The empty envelope first: it tells the client the
                // subscription exists.
                if send.send_data(EMPTY_MESSAGE.clone(), false).is_err() {
                    self.subs.try_remove(slot);
                    self.stream_done();
                    return;
                }
                tracing::debug!(remote = %self.remote, key = %Key::from(*subscription.sub().key()), "subscribed");
                if let Some(entry) = self.subs.get_mut(slot) {
                    *entry = Slot::Open { send, subscription };
                }
                // Envelopes may have come meanwhile; this also watches the stream.
                self.drain(slot);
            }
        }
    }

    /// Hands what a subscription has queued to HTTP/2, within the stream's
    /// flow-control window, and watches its stream for a reset.
    fn drain(&mut self, slot: usize) {
        let Some(Slot::Open { send, subscription }) = self.subs.get_mut(slot) else {
            return;
        };
        let sub = subscription.sub();
        if let Some(cut) = sub.cut() {
            let (reason, status) = match cut {
                Cut::NotAllowed => (
                    "not_allowed",
                    Status::permission_denied("this key is no longer allowed here"),
                ),
                Cut::QueueFairShare => (
                    "queue_fair_share",
                    Status::resource_exhausted(
                        "the server holds all the bytes it may, and this client held the most: \
                         its newest subscription was ended for a client below its fair share",
                    ),
                ),
                Cut::KeyFairShare => (
                    "key_fair_share",
                    Status::resource_exhausted(
                        "this key has all the subscriptions it may, and another client needed its share",
                    ),
                ),
                Cut::FairShare => (
                    "fair_share",
                    Status::resource_exhausted(
                        "the server holds all the subscriptions it may: this client held the most, and another needed its share",
                    ),
                ),
            };
            let _ = send.send_trailers(wire::status_trailers(&status));
            self.shared.metrics.cut_for(reason);
            self.subs.try_remove(slot);
            self.stream_done();
            return;
        }
        let mut sent = 0u64;
        let mut reserved = false;
        let failed = loop {
            match sub.take(send.capacity()) {
                Take::Frame(frame) => {
                    if send.send_data(frame, false).is_err() {
                        break true;
                    }
                    sent += 1;
                    reserved = false;
                }
                Take::Nothing => break false,
                Take::Window(want) if !reserved => {
                    send.reserve_capacity(want);
                    reserved = true;
                }
                // Waits for the peer's WINDOW_UPDATE (h2 wakes the stream).
                Take::Window(_) => break false,
            }
        };
        if sent > 0 {
            self.shared.metrics.delivered.inc_by(sent);
        }
        // A reset, or more capacity, wakes this slot's waker.
        let waker = Waker::from(sub.clone());
        let reset = send.poll_reset(&mut Context::from_waker(&waker)).is_ready();
        if failed || reset {
            self.subs.try_remove(slot);
            self.stream_done();
        }
    }

    /// A stream ended (a call, or a subscription).
    fn stream_done(&mut self) {
        self.streams = self.streams.saturating_sub(1);
        if self.streams == 0 && !self.closing {
            self.idle_at = Some(Instant::now() + self.shared.timeouts.idle);
        }
    }

    /// Sends GOAWAY and gives each subscription stream its moment to end
    /// (the server's drain plan); the connection ends with its last stream.
    fn stop(&mut self) {
        self.stopping = true;
        let drain = &self.shared.drain;
        self.ending = self
            .subs
            .iter()
            .filter(|(_, s)| matches!(s, Slot::Open { .. }))
            .map(|(slot, _)| (drain.next_end(), slot))
            .collect();
        self.ending
            .sort_unstable_by_key(|&(at, _)| std::cmp::Reverse(at));
        self.closing = true;
        self.idle_at = None;
        self.h2.graceful_shutdown();
        self.end_due(Instant::now());
    }

    /// Ends the subscription streams whose moment has come (UNAVAILABLE:
    /// clients subscribe again, elsewhere).
    fn end_due(&mut self, now: Instant) -> bool {
        let mut ended = false;
        while let Some(&(at, slot)) = self.ending.last() {
            if at > now {
                break;
            }
            self.ending.pop();
            if let Some(Slot::Open { mut send, .. }) = self.subs.try_remove(slot) {
                let status = Status::unavailable(SHUTTING_DOWN);
                let _ = send.send_trailers(wire::status_trailers(&status));
                self.stream_done();
                ended = true;
            }
        }
        ended
    }

    /// Cuts off the subscribers that took too little of what waited for
    /// them over the stall timeout (their drain rate, [`crate::deadlines`]).
    fn cut_stalled(&mut self, now: Instant) {
        let stall = self.shared.timeouts.stall;
        let stalled: Vec<(usize, usize, usize)> = self
            .subs
            .iter()
            .filter_map(|(slot, s)| match s {
                Slot::Open { subscription, .. } => match subscription.sub().judge(now, stall) {
                    Verdict::TooSlow { taken, owed } => Some((slot, taken, owed)),
                    Verdict::Waiting | Verdict::KeptUp => None,
                },
                Slot::Pending => None,
            })
            .collect();
        for (slot, taken, owed) in stalled {
            let Some(Slot::Open {
                mut send,
                subscription,
            }) = self.subs.try_remove(slot)
            else {
                continue;
            };
            let shared = &self.shared;
            shared.metrics.cut_for("stalled");
            if shared.logs.cut.allow() {
                tracing::info!(
                    remote = %self.remote,
                    key = %Key::from(*subscription.sub().key()),
                    "subscriber cut off: took {taken} of the {owed} bytes that waited for it over {stall:?}"
                );
            }
            if subscription.sub().in_flight() == 0 {
                let status = Status::unavailable("subscriber too slow");
                let _ = send.send_trailers(wire::status_trailers(&status));
            } else {
                // Its bytes are stuck behind an unread connection: free them.
                send.send_reset(h2::Reason::CANCEL);
            }
            drop(subscription);
            self.stream_done();
        }
    }

    /// Keepalive, the first request's deadline, idleness and stalls.
    /// `Ok(true)` if something happened.
    fn poll_timers(&mut self, cx: &mut Context<'_>) -> Result<bool, End> {
        let timeouts = self.shared.timeouts;
        let now = Instant::now();
        let mut acted = false;
        match self.keepalive {
            Keepalive::Next(at) if now >= at => {
                let sent = self
                    .ping_pong
                    .as_mut()
                    .is_some_and(|p| p.send_ping(Ping::opaque()).is_ok());
                self.keepalive = if sent {
                    Keepalive::Waiting(now + timeouts.keepalive_timeout)
                } else {
                    Keepalive::Next(now + timeouts.keepalive_interval)
                };
                acted = true;
            }
            Keepalive::Next(_) => {}
            Keepalive::Waiting(deadline) => {
                match self.ping_pong.as_mut().map(|p| p.poll_pong(cx)) {
                    Some(Poll::Ready(Ok(_))) => {
                        self.keepalive = Keepalive::Next(now + timeouts.keepalive_interval);
                        acted = true;
                    }
                    Some(Poll::Ready(Err(_))) | None => {
                        self.keepalive = Keepalive::Next(now + timeouts.keepalive_interval);
                    }
                    Some(Poll::Pending) if now >= deadline => {
                        return Err(End::Cut("keepalive_timeout"));
                    }
                    Some(Poll::Pending) => {}
                }
            }
        }
        if self.first_request_at.is_some_and(|at| now >= at) {
            return Err(End::Cut("handshake_timeout"));
        }
        if self.close_by.is_some_and(|at| now >= at) {
            // Counted when it was ended.
            return Err(End::Closed);
        }
        if self.idle_at.is_some_and(|at| now >= at) {
            self.idle_at = None;
            if !self.closing {
                self.closing = true;
                self.h2.graceful_shutdown();
                self.shared.metrics.close_connection_for("idle");
                tracing::debug!(remote = %self.remote, "idle connection closed");
            }
            acted = true;
        }
        if self.mailbox.waiting() > 0 {
            let check =
                (timeouts.stall / 4).clamp(Duration::from_millis(10), Duration::from_secs(1));
            match self.stall_at {
                None => self.stall_at = Some(now + check),
                Some(at) if now >= at => {
                    self.cut_stalled(now);
                    self.stall_at = (self.mailbox.waiting() > 0).then_some(now + check);
                    acted = true;
                }
                Some(_) => {}
            }
        } else {
            self.stall_at = None;
        }
        acted |= self.end_due(now);
        let keepalive = match self.keepalive {
            Keepalive::Next(at) | Keepalive::Waiting(at) => at,
        };
        let ending = self.ending.last().map(|&(at, _)| at);
        let next = [
            self.first_request_at,
            self.idle_at,
            self.stall_at,
            ending,
            self.close_by,
        ]
        .into_iter()
        .flatten()
        .fold(keepalive, Instant::min);
        if self.timer.deadline() != next {
            self.timer.as_mut().reset(next);
        }
        if self.timer.as_mut().poll(cx).is_ready() {
            acted = true;
        }
        Ok(acted)
    }
}

/// A key field checked to be 32 bytes; counts and explains a refusal.
pub(crate) fn key_field(metrics: &Metrics, field: &str, bytes: &[u8]) -> Result<[u8; 32], Status> {
    <[u8; 32]>::try_from(bytes).map_err(|_| {
        metrics.reject_for("invalid_key");
        Status::invalid_argument(format!("{field} key is {} bytes, expected 32", bytes.len()))
    })
}

/// The status for a request the server's budget has no room for, counted.
fn over_budget(metrics: &Metrics) -> Status {
    metrics.reject_for("server_budget");
    Status::resource_exhausted("the server holds all the bytes it may")
}

/// The status for a request a byte budget has no room for, counted.
fn budget_status(metrics: &Metrics, exhausted: Exhausted) -> Status {
    match exhausted {
        Exhausted::Server => over_budget(metrics),
        Exhausted::Client => {
            metrics.reject_for("client_budget");
            Status::resource_exhausted("this client holds all the bytes it may")
        }
    }
}

/// The status of a call ended to give its slot to a client below its fair
/// share, counted.
pub(crate) fn fair_share_ended(metrics: &Metrics) -> Status {
    metrics.end_call_for("fair_share");
    Status::resource_exhausted(
        "the server is at its limit of calls in progress, and this client held the most: \
         its newest call was ended for a client below its fair share",
    )
}

/// Reads the one request message of a call: its first bytes within the
/// first-bytes timeout, the whole within the request timeout; each piece
/// charged to the client and the server as it arrives (in `charged`).
/// Ends early when `ended` is cancelled (the call's slot was taken back).
/// Counts what it refuses.
async fn read_request(
    shared: &Shared,
    recv: &mut RecvStream,
    what: &str,
    limit: usize,
    charged: &Charged,
    ended: &CancellationToken,
    admit: impl FnMut(usize) -> Result<(), Status>,
) -> Result<Bytes, Status> {
    let metrics = &shared.metrics;
    let timeouts = shared.timeouts;
    let deadline = RequestDeadline::new(Instant::now(), timeouts.first_bytes, timeouts.request);
    let charge = |n| {
        charged
            .add(n)
            .or_else(|full| match full {
                // The server's budget is full: a client below its fair share
                // of it gets room, as its subscribers' envelopes do.
                Exhausted::Server if shared.hub.make_room_for(charged.client(), n) => {
                    charged.add(n)
                }
                full => Err(full),
            })
            .map_err(|e| budget_status(metrics, e))
    };
    let mut read = std::pin::pin!(wire::read_message(recv, limit, admit, charge));
    // Usually the message came with its headers: no timer for those.
    let read = match futures::poll!(read.as_mut()) {
        Poll::Ready(read) => Ok(read),
        Poll::Pending => loop {
            let due = deadline.due(charged.bytes() > 0);
            tokio::select! {
                biased;
                read = read.as_mut() => break Ok(read),
                _ = ended.cancelled() => return Err(fair_share_ended(metrics)),
                _ = tokio::time::sleep_until(due) => {
                    if let Some(late) = deadline.late(Instant::now(), charged.bytes() > 0) {
                        break Err(late);
                    }
                }
            }
        },
    };
    match read {
        Ok(Ok(read)) => Ok(read),
        Ok(Err(ReadError::Oversize { len, limit })) => {
            metrics.reject_for("oversize");
            Err(Status::resource_exhausted(format!(
                "{what} is {len} bytes, the limit is {limit}"
            )))
        }
        Ok(Err(ReadError::Admit(status))) => Err(status),
        Ok(Err(e)) => {
            metrics.reject_for("malformed");
            Err(e.into_status())
        }
        Err(Late::FirstBytes) => {
            metrics.end_call_for("first_bytes_timeout");
            Err(Status::deadline_exceeded(format!(
                "no request message bytes within {:?} of the headers",
                timeouts.first_bytes
            )))
        }
        Err(Late::Whole) => {
            metrics.reject_for("request_timeout");
            Err(Status::deadline_exceeded(format!(
                "the request message did not arrive within {:?}",
                timeouts.request
            )))
        }
    }
}

async fn subscribe(
    shared: Arc<Shared>,
    (client, origin): (Arc<ClientState>, Origin),
    call: SlotGuard,
    request: Request<RecvStream>,
    mut respond: SendResponse<Bytes>,
    mailbox: Arc<Mailbox>,
    slot: usize,
) -> Done {
    let timer = shared.metrics.time("Subscribe");
    let result = async {
        wire::check_request(&request)?;
        let (parts, mut recv) = request.into_parts();
        let charged = Charged::new(&client, shared.hub.budget());
        let frame = read_request(
            &shared,
            &mut recv,
            "request",
            MAX_SUBSCRIBE_MESSAGE,
            &charged,
            call.ended(),
            |_| Ok(()),
        )
        .await?;
        let params = SubscribeParams::decode(&frame[PREFIX_LEN..]).map_err(|e| {
            shared.metrics.reject_for("malformed");
            Status::internal(format!("SubscribeParams does not decode: {e}"))
        })?;
        let key = key_field(&shared.metrics, "subscription", &params.key)?;
        shared.auth.check(
            &parts.headers,
            wire::SUBSCRIBE,
            &Key::from(key),
            origin.client(),
        )?;
        let guard = shared
            .clients
            .subscribe(client.client, origin)
            .map_err(|refused| {
                shared.metrics.reject_for(refused.reason());
                tracing::debug!("subscription refused: {refused}");
                refused.status()
            })?;
        let (subscription, _first) = shared
            .hub
            .subscribe(key, client.clone(), guard, mailbox, slot)
            .map_err(|full| {
                tracing::debug!("subscription refused: {full}");
                Status::resource_exhausted(full.to_string())
            })?;
        // The sync envelope goes once the other replicas can reach us.
        if let Some(cluster) = &shared.cluster {
            cluster.ready(&key).await;
        }
        Ok::<_, Status>(subscription)
    }
    .await;
    drop(call);
    drop(timer);
    match result {
        Ok(subscription) => Done::Subscribed {
            slot,
            respond,
            subscription,
        },
        Err(status) => {
            let _ = respond.send_response(
                wire::error_response(&status, &shared.response_headers),
                true,
            );
            Done::NotSubscribed { slot }
        }
    }
}

async fn publish(
    shared: Arc<Shared>,
    (client, origin): (Arc<ClientState>, Origin),
    call: SlotGuard,
    request: Request<RecvStream>,
    mut respond: SendResponse<Bytes>,
) -> Done {
    let _call = call;
    let _timer = shared.metrics.time("Publish");
    let metrics = &shared.metrics;
    let result = async {
        wire::check_request(&request)?;
        let (parts, mut recv) = request.into_parts();
        let charged = Charged::new(&client, shared.hub.budget());
        let frame = read_request(
            &shared,
            &mut recv,
            "envelope",
            shared.max_envelope_size,
            &charged,
            _call.ended(),
            |n| {
                shared
                    .clients
                    .check_publish(client.client, origin, n)
                    .map_err(|refused| {
                        metrics.reject_for(refused.reason());
                        if shared.logs.refused.allow() {
                            tracing::info!("publish refused: {refused}");
                        }
                        refused.status()
                    })
            },
        )
        .await?;
        let envelope = Envelope::decode(&frame[PREFIX_LEN..]).map_err(|e| {
            metrics.reject_for("malformed");
            Status::internal(format!("Envelope does not decode: {e}"))
        })?;
        let sender = key_field(metrics, "sender", &envelope.sender)?;
        let recipient = key_field(metrics, "recipient", &envelope.recipient)?;
        shared.auth.check(
            &parts.headers,
            wire::PUBLISH,
            &Key::from(sender),
            origin.client(),
        )?;
        metrics.published.inc();
        let ask = shared.recipients.answers(&parts.headers);
        // The frame as received: the envelope unchanged, unknown fields kept.
        let local = shared
            .hub
            .publish_from(&recipient, &frame, Publisher::Client(client.client));
        let recipients = match &shared.cluster {
            Some(cluster) if ask => {
                let others = cluster.publish_counted(
                    recipient,
                    frame.slice(PREFIX_LEN..),
                    shared.recipients.wait,
                );
                // The envelope is in the queues now: the request's bytes are
                // not held while the other replicas count.
                drop((frame, charged));
                Some(local.queued + others.await)
            }
            Some(cluster) => {
                cluster.publish(recipient, frame.slice(PREFIX_LEN..));
                None
            }
            None => {
                if local.subscriptions == 0 {
                    metrics.no_subscriber.inc();
                }
                ask.then_some(local.queued)
            }
        };
        Ok::<_, Status>(recipients)
    }
    .await;
    let headers = &shared.response_headers;
    match result {
        Ok(recipients) => {
            let mut response = wire::ok_headers(headers);
            if let Some(n) = recipients {
                response
                    .headers_mut()
                    .insert(RECIPIENTS_METADATA, http::HeaderValue::from(n));
            }
            if let Ok(mut send) = respond.send_response(response, false) {
                let _ = send.send_data(EMPTY_MESSAGE.clone(), false);
                let _ = send.send_trailers(wire::ok_trailers());
            }
        }
        Err(status) => {
            let _ = respond.send_response(wire::error_response(&status, headers), true);
        }
    }
    Done::Finished
}
