//! One task per client connection: its HTTP/2 (the h2 crate), its
//! subscription streams, its calls in progress and its timers.
//!
//! The Signaling service is served here ([`crate::signaling`]), the rest
//! through tonic ([`crate::bridge`]). The hub announces envelopes for this
//! connection's subscriptions in its [`Mailbox`]; the task hands them to
//! HTTP/2 and lets h2 write everything that is ready in one go, so that one
//! write carries the envelopes of many streams. Nothing waits on anything
//! else: a call in progress is a future the task polls, and a subscriber
//! that does not read only fills its own queue.
//!
//! Each turn of the task is a list of phases ([`Connection::poll_run`]):
//! how the connection ends (killed, stopping, evicted), envelopes to hand
//! over, calls that finished, new streams (reading and writing), deadlines.
//!
//! Limits (docs/PROTOCOL.md §10): TLS and HTTP/2 set-up and the first
//! request must come within the handshake timeout ([`crate::transport`]); a
//! request's first bytes within the first-bytes timeout and its whole body
//! within the request timeout; a connection without streams is sent away
//! (GOAWAY) after the idle timeout; one whose keepalive ping goes unanswered
//! is dropped; a subscriber that drains too little of what waits for it
//! over the stall timeout is cut off ([`crate::deadlines`]). Whatever way
//! the connection ends, its subscriptions, their queues and their bytes go
//! with it at once.

use std::{
    net::SocketAddr,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll, Waker},
};

use bytes::Bytes;
use cunicu_signal::{Key, proto::method};
use futures::{StreamExt as _, stream::FuturesUnordered};
use h2::{
    Ping, PingPong, RecvStream, SendStream,
    server::{self, SendResponse},
};
use http::Request;
use slab::Slab;
use tokio::{
    net::TcpStream,
    time::{Instant, Sleep},
};
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use tonic::Status;

use crate::{
    bounds::{
        CLOSE_GRACE, MAX_ACCEPTS, MAX_HEALTH_REQUEST_BYTES, MAX_REQUEST_BYTES, MAX_TURNS,
        REFUSED_BEFORE_CLOSE,
    },
    bridge,
    client::{Client, ConnectionGuard, Evict, Origin, Refused},
    deadlines::{ConnectionDeadlines, Due, Verdict},
    hub::{Mailbox, Subscription, Take},
    refusal::{ConnectionClosed, ConnectionRefused, Cut},
    shared::Shared,
    signaling::{self, Call, Done},
    transport::{self, Io, NotSetUp},
    wire::{self, EMPTY_MESSAGE},
};

/// The status message of streams ended and calls refused at shutdown.
const SHUTTING_DOWN: &str = "server shutting down";
/// The path of `grpc.health.v1.Health/Check`.
const HEALTH_CHECK: &str = "/grpc.health.v1.Health/Check";
/// The path of `grpc.health.v1.Health/Watch`.
const HEALTH_WATCH: &str = "/grpc.health.v1.Health/Watch";

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
    // From now on, the server may end it for another client's fair share:
    // one still being set up (a client that connects and says nothing) is
    // the cheapest to end.
    let evicted = Arc::new(CancellationToken::new());
    let victim: std::sync::Weak<dyn Evict> = Arc::downgrade(&evicted) as _;
    guard.set_victim(victim);
    let deadline = Instant::now() + shared.timeouts.handshake;
    let set_up = transport::establish(stream, shared.tls.as_ref(), &shared.h2, deadline);
    let h2 = tokio::select! {
        _ = kill.cancelled() => return,
        _ = shutdown.cancelled() => return,
        _ = evicted.cancelled() => {
            shared.close(ConnectionClosed::FairShare, &remote);
            return;
        }
        set_up = set_up => match set_up {
            Ok(h2) => h2,
            Err(NotSetUp::Failed(e)) => {
                tracing::debug!(%remote, "connection not set up: {e}");
                return;
            }
            Err(NotSetUp::TlsRate) => {
                shared.metrics.count(ConnectionRefused::TlsHandshakeRate);
                if shared.logs.refused.allow() {
                    tracing::info!(%remote, "connection refused: the server starts all the TLS handshakes a second it may");
                }
                return;
            }
            Err(NotSetUp::Timeout) => {
                shared.close(ConnectionClosed::HandshakeTimeout, &remote);
                return;
            }
        },
    };
    let life = Lifecycle {
        shutdown: Box::pin(shutdown.cancelled_owned()),
        kill: Box::pin(kill.cancelled_owned()),
        evicted: Some(Box::pin(
            CancellationToken::clone(&evicted).cancelled_owned(),
        )),
        state: State::Serving,
        deferred: false,
    };
    let mut connection = Connection::new(h2, shared, Peer::new(guard, remote), life, deadline);
    let end = std::future::poll_fn(|cx| connection.poll_run(cx)).await;
    match end {
        End::Closed | End::Killed => {}
        End::Error(e) => tracing::debug!(%remote, "connection ended: {e}"),
        End::Cut(why) => connection.shared.close(why, &remote),
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

/// How a connection ended.
enum End {
    /// HTTP/2 closed the connection (the peer, or a GOAWAY that completed).
    Closed,
    /// The server stopped hard.
    Killed,
    Error(h2::Error),
    /// The server cut the connection (the metric's reason).
    Cut(ConnectionClosed),
}

/// `Ok` goes on; `Err` ends the task with it.
macro_rules! or_end {
    ($phase:expr) => {
        match $phase {
            Ok(busy) => busy,
            Err(end) => return Poll::Ready(end),
        }
    };
}

/// A subscription stream of this connection.
enum Slot {
    /// Being set up by a call in progress.
    Pending,
    Open {
        send: SendStream<Bytes>,
        subscription: Subscription,
    },
}

/// Whose the connection is.
struct Peer {
    /// Its slot among the client's connections, and whom it is charged to.
    guard: ConnectionGuard,
    remote: SocketAddr,
    /// The key a call of this connection proved first: the client of its
    /// later calls without a proof.
    key: Option<Key>,
    /// A call other than GetBuildInfo came (a provisional connection's
    /// first must prove a key).
    called: bool,
    /// Streams refused for the request rate.
    refused: u32,
}

impl Peer {
    fn new(guard: ConnectionGuard, remote: SocketAddr) -> Self {
        Peer {
            guard,
            remote,
            key: None,
            called: false,
            refused: 0,
        }
    }

    /// Where the connection comes from.
    fn origin(&self) -> Origin {
        self.guard.origin()
    }
}

/// The connection's streams: calls in progress and subscriptions.
struct Streams {
    /// Where the hub posts the subscriptions that have envelopes or changed.
    mailbox: Arc<Mailbox>,
    subs: Slab<Slot>,
    calls: FuturesUnordered<Call>,
    /// Scratch list of posted slots.
    posted: Vec<usize>,
    /// HTTP/2 streams open: calls in progress and subscriptions.
    open: usize,
    /// Stopping: when each open subscription ends, latest first.
    ending: Vec<(Instant, usize)>,
}

impl Streams {
    /// The slots of the open subscription streams.
    fn open_subscriptions(&self) -> Vec<usize> {
        self.subs
            .iter()
            .filter(|(_, s)| matches!(s, Slot::Open { .. }))
            .map(|(slot, _)| slot)
            .collect()
    }
}

/// How far along its end the connection is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Serving,
    /// GOAWAY went out (idle): it ends with its last stream.
    GoingAway,
    /// The server ended it (evicted, unproven): new streams are refused and
    /// it goes by its grace deadline.
    Leaving,
    /// The server stops: new streams are refused, and each subscription
    /// ends at its moment of the drain plan.
    Stopping,
}

/// What ends the connection, and how far along it is.
struct Lifecycle {
    shutdown: Pin<Box<WaitForCancellationFutureOwned>>,
    kill: Pin<Box<WaitForCancellationFutureOwned>>,
    /// Fires when the connection is ended to make room for another client.
    evicted: Option<Pin<Box<WaitForCancellationFutureOwned>>>,
    state: State,
    /// Writing was put off once to let other tasks add to it.
    deferred: bool,
}

struct Connection {
    h2: server::Connection<Io, Bytes>,
    shared: Arc<Shared>,
    peer: Peer,
    streams: Streams,
    deadlines: ConnectionDeadlines,
    /// Wakes the task at the next deadline.
    timer: Pin<Box<Sleep>>,
    ping_pong: Option<PingPong>,
    life: Lifecycle,
}

impl Connection {
    fn new(
        mut h2: server::Connection<Io, Bytes>,
        shared: Arc<Shared>,
        peer: Peer,
        life: Lifecycle,
        first_request_by: Instant,
    ) -> Self {
        let deadlines = ConnectionDeadlines::new(
            Instant::now(),
            first_request_by,
            shared.timeouts.connection(),
        );
        Connection {
            ping_pong: h2.ping_pong(),
            h2,
            peer,
            streams: Streams {
                mailbox: Arc::new(Mailbox::default()),
                subs: Slab::new(),
                calls: FuturesUnordered::new(),
                posted: Vec::new(),
                open: 0,
                ending: Vec::new(),
            },
            timer: Box::pin(tokio::time::sleep_until(deadlines.next())),
            deadlines,
            life,
            shared,
        }
    }

    /// One run of the task: the phases in turn, while any has something to
    /// do (each says whether it had).
    fn poll_run(&mut self, cx: &mut Context<'_>) -> Poll<End> {
        self.streams.mailbox.register(cx.waker());
        for _ in 0..MAX_TURNS {
            let mut busy = or_end!(self.poll_lifecycle(cx));
            busy |= self.hand_over_posted();
            busy |= self.poll_calls(cx);
            if self.put_off_writing(cx, busy) {
                return Poll::Pending;
            }
            busy |= or_end!(self.poll_requests(cx));
            busy |= or_end!(self.poll_timers(cx));
            if !busy {
                return Poll::Pending;
            }
        }
        // Busy for long: let other tasks run, then go on.
        cx.waker().wake_by_ref();
        Poll::Pending
    }

    /// Phase: the server kills it, stops, or ends it for another client's
    /// fair share.
    fn poll_lifecycle(&mut self, cx: &mut Context<'_>) -> Result<bool, End> {
        let life = &mut self.life;
        if life.kill.as_mut().poll(cx).is_ready() {
            return Err(End::Killed);
        }
        let mut busy = false;
        if life.state != State::Stopping && life.shutdown.as_mut().poll(cx).is_ready() {
            self.stop();
            busy = true;
        }
        if let Some(evicted) = self.life.evicted.as_mut()
            && evicted.as_mut().poll(cx).is_ready()
        {
            self.life.evicted = None;
            self.evict();
            busy = true;
        }
        Ok(busy)
    }

    /// Phase: hands what the hub posted for its subscriptions to HTTP/2.
    fn hand_over_posted(&mut self) -> bool {
        self.streams.mailbox.take(&mut self.streams.posted);
        if self.streams.posted.is_empty() {
            return false;
        }
        let posted = std::mem::take(&mut self.streams.posted);
        for &slot in &posted {
            self.drain(slot);
        }
        self.streams.posted = posted;
        true
    }

    /// Phase: the calls in progress that finished.
    fn poll_calls(&mut self, cx: &mut Context<'_>) -> bool {
        let mut busy = false;
        while let Poll::Ready(Some(done)) = self.streams.calls.poll_next_unpin(cx) {
            self.finish(done);
            busy = true;
        }
        busy
    }

    /// What the phases before queued is written by the next. Once per
    /// batch, the other tasks that are ready run first: they (publishers on
    /// other connections) may queue more for this one, and one write then
    /// carries it all. It costs a turn of the scheduler, not a wait.
    fn put_off_writing(&mut self, cx: &mut Context<'_>, busy: bool) -> bool {
        let put_off = busy && !self.life.deferred;
        self.life.deferred = put_off;
        if put_off {
            cx.waker().wake_by_ref();
        }
        put_off
    }

    /// Phase: reads frames, and writes what is queued, once for all. Every
    /// request that one read brought is taken in this turn, so that their
    /// answers, too, go out in one write (taking one a turn wrote once per
    /// request).
    fn poll_requests(&mut self, cx: &mut Context<'_>) -> Result<bool, End> {
        let mut busy = false;
        for _ in 0..MAX_ACCEPTS {
            match self.h2.poll_accept(cx) {
                Poll::Ready(Some(Ok((request, respond)))) => {
                    self.accept(request, respond)?;
                    busy = true;
                }
                Poll::Ready(Some(Err(e))) => return Err(End::Error(e)),
                Poll::Ready(None) => return Err(End::Closed),
                Poll::Pending => break,
            }
        }
        Ok(busy)
    }

    /// Phase: keepalive, the first request's deadline, the grace of a
    /// connection the server ended, idleness, stalls and the drain plan.
    fn poll_timers(&mut self, cx: &mut Context<'_>) -> Result<bool, End> {
        let now = Instant::now();
        let mut busy = false;
        if self.deadlines.awaits_pong() {
            match self.ping_pong.as_mut().map(|p| p.poll_pong(cx)) {
                Some(Poll::Ready(Ok(_))) => {
                    self.deadlines.pong_came(now);
                    busy = true;
                }
                // The connection's end says what went wrong.
                Some(Poll::Ready(Err(_))) | None => self.deadlines.pong_came(now),
                Some(Poll::Pending) => {}
            }
        }
        self.deadlines
            .watch_stalls(now, self.streams.mailbox.waiting() > 0);
        while let Some(due) = self.deadlines.take_due(now) {
            busy = true;
            match due {
                Due::Ping => {
                    let sent = self
                        .ping_pong
                        .as_mut()
                        .is_some_and(|p| p.send_ping(Ping::opaque()).is_ok());
                    if !sent {
                        self.deadlines.ping_failed(now);
                    }
                }
                Due::PongLate => return Err(End::Cut(ConnectionClosed::KeepaliveTimeout)),
                Due::FirstRequest => return Err(End::Cut(ConnectionClosed::HandshakeTimeout)),
                // Counted when it was ended.
                Due::CloseBy => return Err(End::Closed),
                Due::Idle => self.go_away_idle(),
                Due::StallCheck => {
                    self.cut_stalled(now);
                    self.deadlines
                        .watch_stalls(now, self.streams.mailbox.waiting() > 0);
                }
            }
        }
        busy |= self.end_due(now);
        let next = match self.streams.ending.last() {
            Some(&(at, _)) => self.deadlines.next().min(at),
            None => self.deadlines.next(),
        };
        if self.timer.deadline() != next {
            self.timer.as_mut().reset(next);
        }
        if self.timer.as_mut().poll(cx).is_ready() {
            busy = true;
        }
        Ok(busy)
    }

    /// Who a new request is charged to: the key its proof proves, else the
    /// key the connection proved before, else its address. The first call
    /// (GetBuildInfo aside) of a connection admitted provisionally must
    /// prove a key: `Err` with the refusal that closes it.
    fn caller(&mut self, request: &Request<RecvStream>) -> Result<Client, Refused> {
        let path = request.uri().path();
        let peer = &mut self.peer;
        let origin = peer.origin();
        let proven = self
            .shared
            .auth
            .identify(request.headers(), path, origin.client());
        if let Some(key) = proven
            && peer.key.is_none()
        {
            // The connection is the key's from now on (if the key has room).
            match peer.guard.prove(key) {
                Ok(()) => peer.key = Some(key),
                Err(refused) if peer.guard.is_provisional() => return Err(refused),
                Err(_) => {}
            }
        }
        if !peer.called && path != method::GET_BUILD_INFO {
            peer.called = true;
            if peer.guard.is_provisional() {
                return Err(peer.guard.unproven());
            }
        }
        Ok(proven
            .or(peer.key)
            .map_or_else(|| origin.client(), Client::Key))
    }

    /// Ends the connection, whose client held the most connections when the
    /// server held all it may, for another client's fair share: each
    /// subscription stream ends with RESOURCE_EXHAUSTED, calls in progress
    /// get a moment to finish.
    fn evict(&mut self) {
        self.shared
            .close(ConnectionClosed::FairShare, &self.peer.remote);
        let status = Status::resource_exhausted(
            "the server holds all the connections it may: this client held the most, and another needed its share",
        );
        for slot in self.streams.open_subscriptions() {
            if let Some(Slot::Open { mut send, .. }) = self.streams.subs.try_remove(slot) {
                let _ = send.send_trailers(wire::status_trailers(&status));
                self.stream_done();
            }
        }
        self.leave();
    }

    /// Sends GOAWAY: the connection ends with its last stream, and within
    /// [`CLOSE_GRACE`] in any case.
    fn leave(&mut self) {
        if self.life.state != State::Stopping {
            self.life.state = State::Leaving;
        }
        self.h2.graceful_shutdown();
        self.deadlines.close_within(Instant::now(), CLOSE_GRACE);
    }

    /// No stream for the idle timeout: GOAWAY, and it ends once the streams
    /// the client opened meanwhile are done.
    fn go_away_idle(&mut self) {
        if self.life.state == State::Serving {
            self.life.state = State::GoingAway;
            self.deadlines.going_away();
            self.h2.graceful_shutdown();
            self.shared.close(ConnectionClosed::Idle, &self.peer.remote);
        }
    }

    /// Answers a new stream at once with `status`.
    fn answer_now(&self, mut respond: SendResponse<Bytes>, status: &Status) {
        let _ = respond.send_response(
            wire::error_response(status, &self.shared.response_headers),
            true,
        );
    }

    /// A new stream: a call starts. Fails when the client keeps going over
    /// its request rate.
    fn accept(
        &mut self,
        request: Request<RecvStream>,
        respond: SendResponse<Bytes>,
    ) -> Result<(), End> {
        self.deadlines.request_came();
        let shared = self.shared.clone();
        if self.deadlines.is_closing() {
            let status = Status::unavailable("the server is closing this connection");
            self.answer_now(respond, &status);
            return Ok(());
        }
        let caller = match self.caller(&request) {
            Ok(caller) => caller,
            Err(refused) => {
                // A connection beyond its address's per-client limit whose
                // first call proved no key: refused, and closed.
                shared.close(ConnectionClosed::Unproven, &self.peer.remote);
                self.answer_now(respond, &refused.status());
                self.leave();
                return Ok(());
            }
        };
        if let Err(refused) = shared.clients.check_request(caller) {
            // One HEADERS frame that says when to come back (a reset would
            // say nothing); a flood costs that much a stream, no more.
            let status = shared.refuse(refused, &self.peer.remote);
            self.answer_now(respond, &status);
            self.peer.refused += 1;
            if self.peer.refused >= REFUSED_BEFORE_CLOSE {
                self.h2.abrupt_shutdown(h2::Reason::ENHANCE_YOUR_CALM);
                return Err(End::Cut(ConnectionClosed::RequestRate));
            }
            return Ok(());
        }
        self.deadlines.stream_opened();
        self.streams.open += 1;
        if self.life.state == State::Stopping {
            self.answer_now(respond, &Status::unavailable(SHUTTING_DOWN));
            self.stream_done();
            return Ok(());
        }
        match self.start_call(shared, caller, request, respond) {
            Ok(call) => self.streams.calls.push(call),
            Err((refused, respond)) => {
                let status = self.shared.refuse(refused, &self.peer.remote);
                self.answer_now(respond, &status);
                self.stream_done();
            }
        }
        Ok(())
    }

    /// The call of `request` by `caller`, with the slots it takes; or the
    /// refusal of a slot.
    fn start_call(
        &mut self,
        shared: Arc<Shared>,
        caller: Client,
        request: Request<RecvStream>,
        respond: SendResponse<Bytes>,
    ) -> Result<Call, (Refused, SendResponse<Bytes>)> {
        let origin = self.peer.origin();
        let clients = self.peer.guard.clients();
        let call = match clients.call(caller, origin) {
            Ok(call) => call,
            Err(refused) => return Err((refused, respond)),
        };
        let client = call.state().clone();
        let path = request.uri().path();
        let started: Call = match path {
            method::SUBSCRIBE => {
                let slot = self.streams.subs.insert(Slot::Pending);
                Box::pin(signaling::subscribe(
                    shared,
                    (client, origin),
                    call,
                    request,
                    respond,
                    self.streams.mailbox.clone(),
                    slot,
                ))
            }
            method::PUBLISH => Box::pin(signaling::publish(
                shared,
                (client, origin),
                call,
                request,
                respond,
            )),
            method::GET_BUILD_INFO => Box::pin(signaling::get_build_info(
                shared, client, call, request, respond,
            )),
            path => {
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
                    _ => (clients.bridged(caller, origin), MAX_REQUEST_BYTES),
                };
                let bridged = match taken {
                    Ok(bridged) => bridged,
                    Err(refused) => return Err((refused, respond)),
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
        Ok(started)
    }

    /// A call in progress finished: a subscription's stream opens, or the
    /// stream is done.
    fn finish(&mut self, done: Done) {
        match done {
            Done::Finished => self.stream_done(),
            Done::NotSubscribed { slot } => {
                self.streams.subs.try_remove(slot);
                self.stream_done();
            }
            Done::Subscribed {
                slot,
                respond,
                subscription,
            } => self.open_subscription(slot, respond, subscription),
        }
    }

    /// Opens the stream of a subscription now in the hub: its headers, then
    /// the empty envelope that tells the client the subscription exists.
    fn open_subscription(
        &mut self,
        slot: usize,
        mut respond: SendResponse<Bytes>,
        subscription: Subscription,
    ) {
        let headers = &self.shared.response_headers;
        if self.life.state == State::Stopping {
            // Set up while stopping: end it at once.
            self.answer_now(respond, &Status::unavailable(SHUTTING_DOWN));
            self.streams.subs.try_remove(slot);
            self.stream_done();
            return;
        }
        let opened = respond
            .send_response(wire::ok_headers(headers), false)
            .ok()
            .and_then(|mut send| {
                send.send_data(EMPTY_MESSAGE.bytes().clone(), false).ok()?;
                Some(send)
            });
        let Some(send) = opened else {
            self.streams.subs.try_remove(slot);
            self.stream_done();
            return;
        };
        tracing::debug!(remote = %self.peer.remote, key = %Key::from(*subscription.sub().key()), "subscribed");
        if let Some(entry) = self.streams.subs.get_mut(slot) {
            *entry = Slot::Open { send, subscription };
        }
        // Envelopes may have come meanwhile; this also watches the stream.
        self.drain(slot);
    }

    /// Hands what a subscription has queued to HTTP/2, within the stream's
    /// flow-control window, and watches its stream for a reset.
    fn drain(&mut self, slot: usize) {
        let Some(Slot::Open { send, subscription }) = self.streams.subs.get_mut(slot) else {
            return;
        };
        let sub = subscription.sub();
        if let Some(cut) = sub.cut() {
            let _ = send.send_trailers(wire::status_trailers(&cut.status()));
            self.shared.metrics.count(cut);
            self.streams.subs.try_remove(slot);
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
            self.streams.subs.try_remove(slot);
            self.stream_done();
        }
    }

    /// A stream ended (a call, or a subscription).
    fn stream_done(&mut self) {
        self.streams.open = self.streams.open.saturating_sub(1);
        if self.streams.open == 0 && self.life.state == State::Serving {
            self.deadlines.streams_ended(Instant::now());
        }
    }

    /// Sends GOAWAY and gives each subscription stream its moment to end
    /// (the server's drain plan); the connection ends with its last stream.
    fn stop(&mut self) {
        self.life.state = State::Stopping;
        let drain = &self.shared.drain;
        let mut ending: Vec<(Instant, usize)> = self
            .streams
            .open_subscriptions()
            .into_iter()
            .map(|slot| (drain.next_end(), slot))
            .collect();
        ending.sort_unstable_by_key(|&(at, _)| std::cmp::Reverse(at));
        self.streams.ending = ending;
        self.deadlines.going_away();
        self.h2.graceful_shutdown();
        self.end_due(Instant::now());
    }

    /// Ends the subscription streams whose moment has come (UNAVAILABLE:
    /// clients subscribe again, elsewhere), each after what its queue still
    /// held: those envelopes were counted as delivered.
    fn end_due(&mut self, now: Instant) -> bool {
        let mut ended = false;
        while let Some(&(at, slot)) = self.streams.ending.last() {
            if at > now {
                break;
            }
            self.streams.ending.pop();
            if let Some(Slot::Open {
                mut send,
                subscription,
            }) = self.streams.subs.try_remove(slot)
            {
                // Beyond the stream's window HTTP/2 holds them until the
                // client reads; a stop cuts what is still open a few
                // seconds after its drain window.
                let mut sent = 0;
                for frame in subscription.end() {
                    if send.send_data(frame, false).is_err() {
                        break;
                    }
                    sent += 1;
                }
                self.shared.metrics.delivered.inc_by(sent);
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
            .streams
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
            }) = self.streams.subs.try_remove(slot)
            else {
                continue;
            };
            let shared = &self.shared;
            shared.metrics.count(Cut::Stalled);
            if shared.logs.cut.allow() {
                tracing::info!(
                    remote = %self.peer.remote,
                    key = %Key::from(*subscription.sub().key()),
                    "subscriber cut off: took {taken} of the {owed} bytes that waited for it over {stall:?}"
                );
            }
            if subscription.sub().in_flight() == 0 {
                let _ = send.send_trailers(wire::status_trailers(&Cut::Stalled.status()));
            } else {
                // Its bytes are stuck behind an unread connection: free them.
                send.send_reset(h2::Reason::CANCEL);
            }
            drop(subscription);
            self.stream_done();
        }
    }
}
