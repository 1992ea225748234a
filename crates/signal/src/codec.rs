//! The gRPC codec of the generated services: prost with small buffers.
//!
//! tonic's default codec gives every call, and so every open Subscribe
//! stream, an 8 KiB encode buffer. Envelopes are a few hundred bytes, and a
//! server holds one stream per subscribed key, so a 1 KiB buffer (it grows
//! when a message needs more) cuts the memory of an idle subscription by more
//! than half; see BENCHMARKS.md.

use std::marker::PhantomData;

use tonic::codec::{BufferSettings, Codec};
use tonic_prost::{ProstCodec, ProstDecoder, ProstEncoder};

/// Initial size of a call's encode and decode buffers.
const BUFFER_SIZE: usize = 1024;
/// Encoded bytes after which a stream yields to let the transport send.
const YIELD_THRESHOLD: usize = 32 * 1024;

/// prost encoding with [`BUFFER_SIZE`] buffers.
#[derive(Debug)]
pub struct SmallBufferCodec<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for SmallBufferCodec<T, U> {
    fn default() -> Self {
        SmallBufferCodec(PhantomData)
    }
}

impl<T, U> Codec for SmallBufferCodec<T, U>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = ProstDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstCodec::<T, U>::raw_encoder(BufferSettings::new(BUFFER_SIZE, YIELD_THRESHOLD))
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstCodec::<T, U>::raw_decoder(BufferSettings::new(BUFFER_SIZE, YIELD_THRESHOLD))
    }
}
