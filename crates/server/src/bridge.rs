//! The services other than Subscribe and Publish (GetBuildInfo,
//! RelayRegistry, health, reflection) are tonic's: a call's HTTP/2 stream is
//! handed to tonic's router as an `http::Request` and its response written
//! back, within HTTP/2 flow control. The request body is bounded.
//!
//! The response's bytes count against the caller's client and the server
//! (their byte budgets, as envelopes for subscribers do) from the moment
//! they are handed to h2 until h2 has written them or thrown them away, and
//! the call keeps its slots until then: a client that opens huge windows
//! and never reads holds at most its calls' worth of answers, and only for
//! the request timeout, after which the stream is reset.

use std::{
    future::{Future, poll_fn},
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering::Relaxed},
    },
    task::{Context, Poll},
    time::Duration,
};

use bytes::{Buf, Bytes};
use h2::{RecvStream, SendStream, server::SendResponse};
use http::{HeaderMap, Request};
use http_body::{Body, Frame};
use tokio::{
    sync::Notify,
    time::{Instant, Sleep},
};
use tonic::{Status, service::Routes};
use tower::ServiceExt as _;

use crate::{
    client::{Budget, ClientState, Exhausted, reserve},
    deadlines::{Late, RequestDeadline},
    metrics::Metrics,
    refusal::{CallEnded, Refusal, Rejected},
    wire,
};

/// A request body read from HTTP/2, at most `limit` bytes, its first bytes
/// and its end within the call's deadlines.
struct RecvBody {
    recv: RecvStream,
    data_done: bool,
    received: usize,
    limit: usize,
    deadline: RequestDeadline,
    timer: Pin<Box<Sleep>>,
    metrics: Arc<Metrics>,
}

#[derive(Debug, thiserror::Error)]
enum BodyError {
    #[error("request body over {0} bytes")]
    TooLarge(usize),
    #[error("no request message bytes in time")]
    FirstBytes,
    #[error("the request message did not arrive in time")]
    Whole,
    #[error(transparent)]
    H2(#[from] h2::Error),
}

impl RecvBody {
    /// The body of a call opened now.
    fn new(recv: RecvStream, limit: usize, answering: &Answering) -> Self {
        let deadline =
            RequestDeadline::new(Instant::now(), answering.first_bytes, answering.timeout);
        RecvBody {
            recv,
            data_done: false,
            received: 0,
            limit,
            deadline,
            timer: Box::pin(tokio::time::sleep_until(deadline.due(false))),
            metrics: answering.metrics.clone(),
        }
    }

    /// Ends the call if a deadline of its request passed.
    fn poll_late(&mut self, cx: &mut Context<'_>) -> Poll<BodyError> {
        let got = self.received > 0;
        let due = self.deadline.due(got);
        if self.timer.deadline() != due {
            self.timer.as_mut().reset(due);
        }
        if self.timer.as_mut().poll(cx).is_pending() {
            return Poll::Pending;
        }
        match self.deadline.late(Instant::now(), got) {
            Some(Late::FirstBytes) => {
                self.metrics.count(CallEnded::FirstBytesTimeout);
                Poll::Ready(BodyError::FirstBytes)
            }
            Some(Late::Whole) => {
                self.metrics.count(Rejected::RequestTimeout);
                Poll::Ready(BodyError::Whole)
            }
            None => {
                cx.waker().wake_by_ref();
                Poll::Pending
            }
        }
    }
}

impl Body for RecvBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = &mut *self;
        if !this.data_done {
            match this.recv.poll_data(cx) {
                Poll::Ready(Some(Ok(data))) => {
                    let _ = this.recv.flow_control().release_capacity(data.len());
                    this.received += data.len();
                    if this.received > this.limit {
                        return Poll::Ready(Some(Err(BodyError::TooLarge(this.limit))));
                    }
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(e.into()))),
                Poll::Ready(None) => this.data_done = true,
                Poll::Pending => {
                    return match this.poll_late(cx) {
                        Poll::Ready(late) => Poll::Ready(Some(Err(late))),
                        Poll::Pending => Poll::Pending,
                    };
                }
            }
        }
        match this.recv.poll_trailers(cx) {
            Poll::Ready(Ok(Some(trailers))) => Poll::Ready(Some(Ok(Frame::trailers(trailers)))),
            Poll::Ready(Ok(None)) => Poll::Ready(None),
            Poll::Ready(Err(e)) => Poll::Ready(Some(Err(e.into()))),
            Poll::Pending => match this.poll_late(cx) {
                Poll::Ready(late) => Poll::Ready(Some(Err(late))),
                Poll::Pending => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        self.recv.is_end_stream()
    }
}

/// Where a bridged call's answer is counted, and how long it may wait to be written.
pub(crate) struct Answering {
    pub(crate) client: Arc<ClientState>,
    /// The address the call comes from (what proofs are rate-limited by).
    pub(crate) address: crate::client::Client,
    pub(crate) server: Arc<Budget>,
    pub(crate) metrics: Arc<Metrics>,
    /// How long the request may take to come, and the answer may stay
    /// unwritten after the call ended.
    pub(crate) timeout: Duration,
    /// How long the request's first bytes may take to come.
    pub(crate) first_bytes: Duration,
}

impl Answering {
    /// Ends the call before it is done: counts it, and gives the status
    /// that ends it.
    fn end_call(&self, why: CallEnded) -> Status {
        self.metrics.count(why);
        why.status(self.first_bytes)
    }
}

/// The bytes of one answer handed to h2 and not yet written.
struct Unwritten {
    client: Arc<ClientState>,
    server: Arc<Budget>,
    bytes: AtomicUsize,
    written: Notify,
}

/// A piece of an answer handed to h2: its bytes are given back when dropped.
struct Piece {
    data: Bytes,
    unwritten: Arc<Unwritten>,
}

impl AsRef<[u8]> for Piece {
    fn as_ref(&self) -> &[u8] {
        &self.data
    }
}

impl Drop for Piece {
    fn drop(&mut self) {
        let n = self.data.len();
        let unwritten = &self.unwritten;
        unwritten.client.budget.release(n);
        unwritten.server.release(n);
        if unwritten.bytes.fetch_sub(n, Relaxed) == n {
            unwritten.written.notify_one();
        }
    }
}

/// Why an answer was not sent whole.
#[derive(Debug, thiserror::Error)]
enum PipeError {
    #[error("a byte budget is full: {0:?}")]
    Budget(Exhausted),
    #[error("{0}")]
    Stream(String),
}

/// Serves one call through `routes`, adding `extra` to the response headers;
/// returns once the answer is written (or thrown away), so that whoever
/// holds the call's slots holds them until then. The request may send at
/// most `limit` bytes. When `ended` completes (a slot of the call was taken
/// back for a client below its fair share), the call ends at once with
/// RESOURCE_EXHAUSTED.
pub(crate) async fn serve(
    routes: Routes,
    request: Request<RecvStream>,
    mut respond: SendResponse<Bytes>,
    extra: &HeaderMap,
    answering: &Answering,
    limit: usize,
    ended: impl Future<Output = ()>,
) {
    let mut ended = std::pin::pin!(ended);
    let mut request =
        request.map(|recv| tonic::body::Body::new(RecvBody::new(recv, limit, answering)));
    // Who calls, for the services that charge it (GetRelays' proofs).
    request.extensions_mut().insert(answering.address);
    let response = tokio::select! {
        response = routes.oneshot(request) => match response {
            Ok(response) => response,
            Err(never) => match never {},
        },
        () = &mut ended => {
            let status = answering.end_call(CallEnded::FairShare);
            let _ = respond.send_response(wire::error_response(&status, extra), true);
            return;
        }
    };
    let (mut parts, body) = response.into_parts();
    for (name, value) in extra {
        parts.headers.insert(name, value.clone());
    }
    let end = body.is_end_stream();
    let Ok(mut send) = respond.send_response(http::Response::from_parts(parts, ()), end) else {
        return;
    };
    if end {
        return;
    }
    let unwritten = Arc::new(Unwritten {
        client: answering.client.clone(),
        server: answering.server.clone(),
        bytes: AtomicUsize::new(0),
        written: Notify::new(),
    });
    let piped = tokio::select! {
        piped = pipe(body, &mut send, &unwritten) => piped,
        () = &mut ended => {
            let status = answering.end_call(CallEnded::FairShare);
            let _ = send.send_trailers(wire::status_trailers(&status));
            return;
        }
    };
    match piped {
        Ok(()) => {}
        Err(PipeError::Budget(exhausted)) => {
            let status = answering.metrics.refuse(Refusal::Budget(exhausted));
            let _ = send.send_trailers(wire::status_trailers(&status));
        }
        Err(PipeError::Stream(e)) => {
            tracing::debug!("response of a bridged call: {e}");
            send.send_reset(h2::Reason::INTERNAL_ERROR);
        }
    }
    let written = async {
        while unwritten.bytes.load(Relaxed) > 0 {
            unwritten.written.notified().await;
        }
    };
    if tokio::time::timeout(answering.timeout, written)
        .await
        .is_err()
    {
        // Not read: the stream goes, and h2 drops what it buffered of it.
        answering.metrics.count(Rejected::AnswerUnread);
        send.send_reset(h2::Reason::CANCEL);
    }
}

/// Writes `body` to `send`, no faster than the peer's flow control allows,
/// each piece counted in `unwritten` and its budgets until h2 drops it.
async fn pipe(
    body: tonic::body::Body,
    send: &mut SendStream<Bytes>,
    unwritten: &Arc<Unwritten>,
) -> Result<(), PipeError> {
    let mut body = std::pin::pin!(body);
    let stream = |e: &dyn std::fmt::Display| PipeError::Stream(e.to_string());
    while let Some(frame) = poll_fn(|cx| body.as_mut().poll_frame(cx)).await {
        let frame = frame.map_err(|e| stream(&e))?;
        let frame = match frame.into_data() {
            Ok(mut data) => {
                while data.has_remaining() {
                    send.reserve_capacity(data.len());
                    let capacity = loop {
                        match poll_fn(|cx| send.poll_capacity(cx)).await {
                            Some(Ok(0)) => continue,
                            Some(Ok(n)) => break n,
                            Some(Err(e)) => return Err(stream(&e)),
                            None => return Err(PipeError::Stream("stream closed".into())),
                        }
                    };
                    let piece = data.split_to(capacity.min(data.len()));
                    reserve(&unwritten.client.budget, &unwritten.server, piece.len())
                        .map_err(PipeError::Budget)?;
                    unwritten.bytes.fetch_add(piece.len(), Relaxed);
                    let piece = Bytes::from_owner(Piece {
                        data: piece,
                        unwritten: unwritten.clone(),
                    });
                    send.send_data(piece, false).map_err(|e| stream(&e))?;
                }
                continue;
            }
            Err(frame) => frame,
        };
        if let Ok(trailers) = frame.into_trailers() {
            send.reserve_capacity(0);
            return send.send_trailers(trailers).map_err(|e| stream(&e));
        }
    }
    send.send_data(Bytes::new(), true).map_err(|e| stream(&e))
}
