//! The codec of every credbroker.v1 call (server and client): prost, as
//! tonic's default codec, but a WatchRotations stream starts with a 1 KiB
//! encode buffer instead of tonic's 8 KiB. A stream holds its buffer for
//! its whole life and its messages are a few hundred bytes, so at 10,000
//! idle subscribers the default costs a replica tens of MiB for nothing (a
//! larger message grows the buffer as it needs). Unary answers keep
//! tonic's buffer: measured, the small one cost them CPU.

use std::marker::PhantomData;

use prost::Message;
use tonic::codec::BufferSettings;
use tonic_prost::{ProstDecoder, ProstEncoder};

/// The first size of a WatchRotations stream's encode buffer.
const ENCODE_BUFFER: usize = 1024;
/// Bytes a stream encodes before yielding (tonic's default).
const YIELD_THRESHOLD: usize = 32 * 1024;

/// See the module docs.
#[derive(Debug, Clone, Copy)]
pub struct Codec<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for Codec<T, U> {
    fn default() -> Self {
        Self(PhantomData)
    }
}

impl<T, U> tonic::codec::Codec for Codec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = ProstDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        let stream = std::any::TypeId::of::<T>()
            == std::any::TypeId::of::<crate::pb::WatchRotationsResponse>();
        ProstEncoder::new(if stream {
            BufferSettings::new(ENCODE_BUFFER, YIELD_THRESHOLD)
        } else {
            BufferSettings::default()
        })
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstDecoder::new(BufferSettings::default())
    }
}
