//! The protobuf codec of every generated client and server: prost, with
//! small per-call buffers.
//!
//! tonic allocates an encode and a decode buffer for each call up front
//! (8 KiB each by default) and keeps them for the life of the call. A hub
//! holds one long-lived stream per device, and device messages are small
//! (a batch of readings is a few hundred bytes, an ack a dozen), so at
//! 10,000 devices those idle buffers alone were 160 MiB. Here each call
//! starts at 1 KiB; a larger message grows its buffer as needed, so only
//! the calls that carry large messages pay for them.

use tonic::codec::{BufferSettings, Codec};
use tonic_prost::{ProstDecoder, ProstEncoder};

/// Initial encode and decode buffer of one call.
pub const CALL_BUFFER_BYTES: usize = 1024;
/// A stream sends what it has queued once this much is encoded (tonic's
/// default).
const YIELD_THRESHOLD: usize = 32 * 1024;

/// prost's codec with [`CALL_BUFFER_BYTES`] buffers.
#[derive(Debug, Clone)]
pub struct SmallBufferCodec<T, U>(std::marker::PhantomData<(T, U)>);

impl<T, U> Default for SmallBufferCodec<T, U> {
    fn default() -> Self {
        Self(std::marker::PhantomData)
    }
}

fn settings() -> BufferSettings {
    BufferSettings::new(CALL_BUFFER_BYTES, YIELD_THRESHOLD)
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
        ProstEncoder::new(settings())
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstDecoder::new(settings())
    }
}
