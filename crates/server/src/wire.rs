//! gRPC over HTTP/2 as the connection task speaks it for the Signaling
//! service: request checks, reading one length-prefixed message, response
//! headers and trailers. The other services go through tonic ([`crate::bridge`]).

use std::future::poll_fn;

use bytes::{Buf, BufMut as _, Bytes, BytesMut};
use h2::RecvStream;
use http::{HeaderMap, HeaderValue, Request, Response, header::CONTENT_TYPE};
use tonic::Status;

/// Length of a message's prefix: a compression flag and a 32-bit length.
pub(crate) const PREFIX_LEN: usize = 5;

/// A gRPC message frame: the prefix (compression flag 0, then the
/// message's length, big-endian), then the message. One buffer, shared by
/// its clones; the message is a view into it, never a copy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Frame(Bytes);

/// The frame of an empty message: `cunicu.Empty`, and the empty `Envelope`
/// that confirms a subscription.
pub(crate) static EMPTY_MESSAGE: Frame = Frame(Bytes::from_static(&[0; PREFIX_LEN]));

impl Frame {
    /// What a frame adds to its message: the prefix.
    pub(crate) const OVERHEAD: usize = PREFIX_LEN;

    /// `message` encoded into a frame.
    pub(crate) fn encode(message: &impl prost::Message) -> Self {
        let len = message.encoded_len();
        let mut frame = Self::prefixed(len);
        message.encode_raw(&mut frame);
        Self(frame.freeze())
    }

    /// The frame of `message`, already encoded (copied once, after the prefix).
    pub(crate) fn with_prefix(message: &[u8]) -> Self {
        let mut frame = Self::prefixed(message.len());
        frame.put_slice(message);
        Self(frame.freeze())
    }

    /// A buffer with room for a message of `len` bytes, its prefix written.
    fn prefixed(len: usize) -> BytesMut {
        let mut frame = BytesMut::with_capacity(PREFIX_LEN + len);
        frame.put_u8(0);
        frame.put_u32(u32::try_from(len).unwrap_or(u32::MAX));
        frame
    }

    /// The message, without its prefix.
    pub(crate) fn message(&self) -> &[u8] {
        &self.0[PREFIX_LEN..]
    }

    /// The message as a buffer of its own: a view into the frame's buffer.
    pub(crate) fn message_bytes(&self) -> Bytes {
        self.0.slice(PREFIX_LEN..)
    }

    /// The whole frame, prefix included: what goes on the wire.
    pub(crate) fn bytes(&self) -> &Bytes {
        &self.0
    }

    /// The whole frame as a buffer, for sending.
    pub(crate) fn into_bytes(self) -> Bytes {
        self.0
    }

    /// Bytes in the whole frame, prefix included.
    pub(crate) fn len(&self) -> usize {
        self.0.len()
    }
}

const GRPC: HeaderValue = HeaderValue::from_static("application/grpc");

/// Checks what gRPC needs of a request's headers, before its body is read.
pub(crate) fn check_request<B>(request: &Request<B>) -> Result<(), Status> {
    if request.method() != http::Method::POST {
        return Err(Status::unimplemented(format!(
            "method {} (gRPC needs POST)",
            request.method()
        )));
    }
    let content_type = request
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if !(content_type == "application/grpc"
        || content_type.starts_with("application/grpc+proto")
        || content_type.starts_with("application/grpc;"))
    {
        return Err(Status::invalid_argument(format!(
            "content-type {content_type:?} is not gRPC with protobuf"
        )));
    }
    if let Some(encoding) = request.headers().get("grpc-encoding")
        && encoding != "identity"
    {
        return Err(Status::unimplemented(format!(
            "message compression {encoding:?} is not supported"
        )));
    }
    Ok(())
}

/// The headers of a successful response, with `extra` (the server's own
/// metadata).
pub(crate) fn ok_headers(extra: &HeaderMap) -> Response<()> {
    let mut response = Response::new(());
    response.headers_mut().insert(CONTENT_TYPE, GRPC);
    extend(response.headers_mut(), extra);
    response
}

/// The trailers of a successful call.
pub(crate) fn ok_trailers() -> HeaderMap {
    let mut trailers = HeaderMap::with_capacity(1);
    trailers.insert("grpc-status", HeaderValue::from_static("0"));
    trailers
}

/// The trailers that end a call with `status`.
pub(crate) fn status_trailers(status: &Status) -> HeaderMap {
    let mut trailers = HeaderMap::with_capacity(2);
    if status.add_header(&mut trailers).is_err() {
        // Only a status whose details do not encode fails: send the code alone.
        trailers.insert("grpc-status", HeaderValue::from(status.code() as i32));
    }
    trailers
}

/// A trailers-only response that ends the call with `status`.
pub(crate) fn error_response(status: &Status, extra: &HeaderMap) -> Response<()> {
    let mut response = ok_headers(extra);
    let trailers = status_trailers(status);
    response.headers_mut().extend(trailers);
    response
}

fn extend(headers: &mut HeaderMap, extra: &HeaderMap) {
    for (name, value) in extra {
        headers.insert(name, value.clone());
    }
}

/// Why a request message could not be read.
#[derive(Debug)]
pub(crate) enum ReadError {
    /// The message is larger than the limit (known from its prefix).
    Oversize { len: usize, limit: usize },
    /// `admit` refused it.
    Admit(Status),
    /// The message is compressed.
    Compressed,
    /// The stream ended before a whole message.
    Incomplete,
    /// More than one message came.
    Extra,
    /// The stream failed.
    Stream(h2::Error),
}

impl ReadError {
    /// The status that answers it.
    pub(crate) fn into_status(self) -> Status {
        match self {
            ReadError::Oversize { len, limit } => {
                Status::resource_exhausted(format!("envelope is {len} bytes, the limit is {limit}"))
            }
            ReadError::Admit(status) => status,
            ReadError::Compressed => Status::unimplemented("compressed messages are not supported"),
            ReadError::Incomplete => {
                Status::internal("the request message is missing or cut short")
            }
            ReadError::Extra => Status::unimplemented("more than one request message"),
            ReadError::Stream(e) => Status::cancelled(format!("request stream: {e}")),
        }
    }
}

/// Reads one length-prefixed message of at most `limit` bytes from `recv`,
/// releasing HTTP/2 flow control as it goes. `admit` is called with the
/// frame's length once the prefix is known, before the rest is read: it may
/// refuse (a rate). `charge` is called with the length of each piece as it
/// arrives, before it is kept: it may refuse (a budget). Returns the whole
/// frame, as received.
pub(crate) async fn read_message(
    recv: &mut RecvStream,
    limit: usize,
    mut admit: impl FnMut(usize) -> Result<(), Status>,
    mut charge: impl FnMut(usize) -> Result<(), Status>,
) -> Result<Frame, ReadError> {
    let mut chunks: Vec<Bytes> = Vec::with_capacity(1);
    let mut have = 0usize;
    let mut admitted: Option<usize> = None;
    // Read to the end of the request stream, not just to the end of the
    // message: answering a half-open stream makes h2 reset it, and the
    // client's END_STREAM that crosses the reset then counts as a protocol
    // error against the connection (h2 closes a connection with 1 024 of
    // them: GOAWAY ENHANCE_YOUR_CALM), so a busy publisher would lose its
    // connection. The caller's deadlines bound the wait.
    loop {
        let chunk = match poll_fn(|cx| recv.poll_data(cx)).await {
            Some(Ok(chunk)) => chunk,
            Some(Err(e)) => return Err(ReadError::Stream(e)),
            None => break,
        };
        // Everything read is ours now: let the client send more.
        let _ = recv.flow_control().release_capacity(chunk.len());
        if chunk.is_empty() {
            continue;
        }
        have += chunk.len();
        if let Some(want) = admitted
            && have > want
        {
            return Err(ReadError::Extra);
        }
        if have > PREFIX_LEN + limit {
            return Err(ReadError::Oversize { len: have, limit });
        }
        charge(chunk.len()).map_err(ReadError::Admit)?;
        chunks.push(chunk);
        if admitted.is_none() && have >= PREFIX_LEN {
            let mut prefix = [0u8; PREFIX_LEN];
            copy_prefix(&chunks, &mut prefix);
            if prefix[0] != 0 {
                return Err(ReadError::Compressed);
            }
            let len = u32::from_be_bytes([prefix[1], prefix[2], prefix[3], prefix[4]]) as usize;
            if len > limit {
                return Err(ReadError::Oversize { len, limit });
            }
            let frame = PREFIX_LEN + len;
            admit(frame).map_err(ReadError::Admit)?;
            if have > frame {
                return Err(ReadError::Extra);
            }
            admitted = Some(frame);
        }
    }
    let Some(want) = admitted else {
        return Err(ReadError::Incomplete);
    };
    if have < want {
        return Err(ReadError::Incomplete);
    }
    if have > want {
        return Err(ReadError::Extra);
    }
    let frame = match chunks.len() {
        1 => chunks.pop().unwrap_or_default(),
        _ => {
            let mut all = BytesMut::with_capacity(want);
            for chunk in chunks {
                all.extend_from_slice(&chunk);
            }
            all.freeze()
        }
    };
    // Checked above: an uncompressed prefix and exactly its length after it.
    Ok(Frame(frame))
}

fn copy_prefix(chunks: &[Bytes], out: &mut [u8; PREFIX_LEN]) {
    let mut filled = 0;
    for chunk in chunks {
        let mut chunk = chunk.clone();
        while filled < PREFIX_LEN && chunk.has_remaining() {
            out[filled] = chunk.get_u8();
            filled += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use cunicu_signal::proto::signaling::SubscribeParams;
    use prost::Message as _;

    use super::*;

    #[test]
    fn a_frame_is_its_prefix_then_its_message() {
        let params = SubscribeParams { key: vec![7; 32] };
        let frame = Frame::encode(&params);
        let encoded = params.encode_to_vec();
        assert_eq!(frame.len(), Frame::OVERHEAD + encoded.len());
        assert_eq!(&frame.bytes()[..PREFIX_LEN], &[0, 0, 0, 0, 34]);
        assert_eq!(frame.message(), encoded.as_slice());
        assert_eq!(Frame::with_prefix(&encoded), frame);
        assert_eq!(
            SubscribeParams::decode(frame.message_bytes()).ok(),
            Some(params)
        );
        assert_eq!(EMPTY_MESSAGE.message(), b"");
        assert_eq!(EMPTY_MESSAGE.bytes().as_ref(), &[0; PREFIX_LEN]);
    }

    #[test]
    fn the_message_shares_the_frames_buffer() {
        let frame = Frame::with_prefix(&[1, 2, 3]);
        let message = frame.message_bytes();
        assert_eq!(message.as_ptr(), frame.bytes()[PREFIX_LEN..].as_ptr());
    }
}
