//! The services other than Subscribe and Publish (GetBuildInfo,
//! RelayRegistry, health, reflection) are tonic's: a call's HTTP/2 stream is
//! handed to tonic's router as an `http::Request` and its response written
//! back, within HTTP/2 flow control. The request body is bounded.

use std::{
    future::poll_fn,
    pin::Pin,
    task::{Context, Poll},
};

use bytes::{Buf, Bytes};
use h2::{RecvStream, SendStream, server::SendResponse};
use http::{HeaderMap, Request};
use http_body::{Body, Frame};
use tonic::service::Routes;
use tower::ServiceExt as _;

/// Request bytes a bridged call may send: these services take small requests.
pub(crate) const MAX_REQUEST_BYTES: usize = 16 * 1024;

/// A request body read from HTTP/2, at most [`MAX_REQUEST_BYTES`].
struct RecvBody {
    recv: RecvStream,
    data_done: bool,
    received: usize,
}

#[derive(Debug, thiserror::Error)]
enum BodyError {
    #[error("request body over {MAX_REQUEST_BYTES} bytes")]
    TooLarge,
    #[error(transparent)]
    H2(#[from] h2::Error),
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
                    if this.received > MAX_REQUEST_BYTES {
                        return Poll::Ready(Some(Err(BodyError::TooLarge)));
                    }
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(e.into()))),
                Poll::Ready(None) => this.data_done = true,
                Poll::Pending => return Poll::Pending,
            }
        }
        match this.recv.poll_trailers(cx) {
            Poll::Ready(Ok(Some(trailers))) => Poll::Ready(Some(Ok(Frame::trailers(trailers)))),
            Poll::Ready(Ok(None)) => Poll::Ready(None),
            Poll::Ready(Err(e)) => Poll::Ready(Some(Err(e.into()))),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.recv.is_end_stream()
    }
}

/// Serves one call through `routes`, adding `extra` to the response headers.
pub(crate) async fn serve(
    routes: Routes,
    request: Request<RecvStream>,
    mut respond: SendResponse<Bytes>,
    extra: &HeaderMap,
) {
    let request = request.map(|recv| {
        tonic::body::Body::new(RecvBody {
            recv,
            data_done: false,
            received: 0,
        })
    });
    let response = match routes.oneshot(request).await {
        Ok(response) => response,
        Err(never) => match never {},
    };
    let (mut parts, body) = response.into_parts();
    for (name, value) in extra {
        parts.headers.insert(name, value.clone());
    }
    let end = body.is_end_stream();
    let Ok(mut send) = respond.send_response(http::Response::from_parts(parts, ()), end) else {
        return;
    };
    if !end && let Err(e) = pipe(body, &mut send).await {
        tracing::debug!("response of a bridged call: {e}");
        send.send_reset(h2::Reason::INTERNAL_ERROR);
    }
}

/// Writes `body` to `send`, no faster than the peer's flow control allows.
async fn pipe(body: tonic::body::Body, send: &mut SendStream<Bytes>) -> Result<(), String> {
    let mut body = std::pin::pin!(body);
    while let Some(frame) = poll_fn(|cx| body.as_mut().poll_frame(cx)).await {
        let frame = frame.map_err(|e| e.to_string())?;
        let frame = match frame.into_data() {
            Ok(mut data) => {
                while data.has_remaining() {
                    send.reserve_capacity(data.len());
                    let capacity = loop {
                        match poll_fn(|cx| send.poll_capacity(cx)).await {
                            Some(Ok(0)) => continue,
                            Some(Ok(n)) => break n,
                            Some(Err(e)) => return Err(e.to_string()),
                            None => return Err("stream closed".into()),
                        }
                    };
                    let piece = data.split_to(capacity.min(data.len()));
                    send.send_data(piece, false).map_err(|e| e.to_string())?;
                }
                continue;
            }
            Err(frame) => frame,
        };
        if let Ok(trailers) = frame.into_trailers() {
            send.reserve_capacity(0);
            return send.send_trailers(trailers).map_err(|e| e.to_string());
        }
    }
    send.send_data(Bytes::new(), true)
        .map_err(|e| e.to_string())
}
