//! Encoding, kept behind one module so the binary codec can be swapped.
//!
//! * State and snapshot headers use bincode 2 through serde ([`encode`],
//!   [`decode`]). Its identity is written into every snapshot as
//!   [`CodecId`], so a future codec change is detected, not misread.
//! * Input messages are decoded by a [`MessageFormat`] chosen by the
//!   service: [`Json`], [`Bincode`] or [`Raw`] bytes.
//! * Outputs are encoded by an [`OutputFormat`] chosen in the instance
//!   configuration.

use bytes::Bytes;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::record::Record;

/// The binary codec a snapshot's state was written with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum CodecId {
    /// bincode 2, standard configuration (varint integers, little endian), via serde.
    Bincode2,
}

/// The codec this build writes.
pub const CURRENT_CODEC: CodecId = CodecId::Bincode2;

/// The largest encoded value the codec decodes (4 GiB). bincode allocates a
/// container's claimed length before reading it, so without a bound a
/// corrupt length prefix could request petabytes; with it, such input is a
/// [`CodecError::Decode`] (`LimitExceeded`).
pub const DECODE_LIMIT: usize = 1 << 32;

type Config = bincode::config::Configuration<
    bincode::config::LittleEndian,
    bincode::config::Varint,
    bincode::config::Limit<DECODE_LIMIT>,
>;

fn config() -> Config {
    bincode::config::standard().with_limit::<DECODE_LIMIT>()
}

/// Encoding or decoding with the binary codec failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CodecError {
    /// The value could not be encoded.
    #[error("failed to encode")]
    Encode(#[source] bincode::error::EncodeError),
    /// The bytes are not a valid encoding of the expected type.
    #[error("failed to decode")]
    Decode(#[source] bincode::error::DecodeError),
    /// The bytes decoded but were followed by unexpected extra bytes.
    #[error("{0} unexpected bytes after the encoded value")]
    TrailingBytes(usize),
    /// Reading or writing a streamed encoding failed.
    #[error("streamed encoding failed")]
    Io(#[source] std::io::Error),
    /// Output encoding as JSON failed.
    #[error("failed to encode as JSON")]
    Json(#[source] serde_json::Error),
    /// `emit` named no topic and the instance has no default output topic.
    #[error("an output was emitted but no output topic is configured")]
    NoOutputTopic,
}

/// Encodes `value` with the binary codec.
pub fn encode<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>, CodecError> {
    bincode::serde::encode_to_vec(value, config()).map_err(CodecError::Encode)
}

/// Encodes `value` into `out` as it goes (no buffer of the whole
/// encoding; `out` sees many small writes).
pub fn encode_to<T: Serialize + ?Sized>(value: &T, out: &mut dyn std::io::Write) -> Result<(), CodecError> {
    bincode::serde::encode_into_std_write(value, &mut &mut *out, config())
        .map(drop)
        .map_err(CodecError::Encode)
}

/// Decodes a `T` from the start of `input`, reading no further than the
/// value (the caller checks that nothing follows, if that matters).
pub fn decode_from<T: DeserializeOwned>(input: &mut dyn std::io::Read) -> Result<T, CodecError> {
    bincode::serde::decode_from_std_read(&mut &mut *input, config()).map_err(CodecError::Decode)
}

/// Reads all of `input` (for decoders that need the bytes in one piece).
pub fn read_all(input: &mut dyn std::io::Read) -> Result<Vec<u8>, CodecError> {
    let mut bytes = Vec::new();
    input.read_to_end(&mut bytes).map_err(CodecError::Io)?;
    Ok(bytes)
}

/// Decodes a `T` that must span all of `bytes`.
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, CodecError> {
    let (value, read) = decode_prefix(bytes)?;
    if read != bytes.len() {
        return Err(CodecError::TrailingBytes(bytes.len() - read));
    }
    Ok(value)
}

/// Decodes a `T` from the start of `bytes`, returning how many bytes it used.
pub fn decode_prefix<T: DeserializeOwned>(bytes: &[u8]) -> Result<(T, usize), CodecError> {
    bincode::serde::decode_from_slice(bytes, config()).map_err(CodecError::Decode)
}

/// An input message could not be turned into the service's message type.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// The message has no payload (a tombstone) and the format needs one.
    #[error("message has no payload")]
    MissingPayload,
    /// JSON decoding failed.
    #[error("invalid JSON")]
    Json(#[source] serde_json::Error),
    /// Binary decoding failed.
    #[error("invalid bincode")]
    Bincode(#[source] CodecError),
    /// A user-defined format rejected the message.
    #[error("{0}")]
    Custom(String),
}

/// How a service's messages are decoded from the raw record.
///
/// Implemented for [`Json`], [`Bincode`] and [`Raw`]; implement it for
/// your own type to support another format (Avro, protobuf, ...).
pub trait MessageFormat<M>: Send + Sync + 'static {
    /// Decodes one record.
    fn decode(record: &Record) -> Result<M, DecodeError>;
}

/// JSON payloads (serde_json).
#[derive(Debug, Clone, Copy, Default)]
pub struct Json;

/// bincode 2 payloads (the same codec snapshots use).
#[derive(Debug, Clone, Copy, Default)]
pub struct Bincode;

/// No decoding: the service receives the [`Record`] itself, or its payload as [`Bytes`].
#[derive(Debug, Clone, Copy, Default)]
pub struct Raw;

fn payload(record: &Record) -> Result<&Bytes, DecodeError> {
    record.payload.as_ref().ok_or(DecodeError::MissingPayload)
}

impl<M: DeserializeOwned> MessageFormat<M> for Json {
    fn decode(record: &Record) -> Result<M, DecodeError> {
        serde_json::from_slice(payload(record)?).map_err(DecodeError::Json)
    }
}

impl<M: DeserializeOwned> MessageFormat<M> for Bincode {
    fn decode(record: &Record) -> Result<M, DecodeError> {
        decode(payload(record)?).map_err(DecodeError::Bincode)
    }
}

impl MessageFormat<Record> for Raw {
    fn decode(record: &Record) -> Result<Record, DecodeError> {
        Ok(record.detached())
    }
}

impl MessageFormat<Bytes> for Raw {
    fn decode(record: &Record) -> Result<Bytes, DecodeError> {
        payload(record).map(|p| Bytes::copy_from_slice(p))
    }
}

/// How outputs emitted through [`ApplyContext::emit`](crate::ApplyContext::emit) are encoded.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum OutputFormat {
    /// JSON (the default: readable by any downstream consumer).
    #[default]
    Json,
    /// bincode 2.
    Bincode,
}

impl OutputFormat {
    /// Encodes one output value.
    pub fn encode<T: Serialize + ?Sized>(self, value: &T) -> Result<Bytes, CodecError> {
        match self {
            OutputFormat::Json => serde_json::to_vec(value).map(Bytes::from).map_err(CodecError::Json),
            OutputFormat::Bincode => encode(value).map(Bytes::from),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn roundtrip_and_trailing_bytes() {
        let v = (1u32, "x".to_string(), vec![1u8, 2, 3]);
        let mut bytes = encode(&v).unwrap();
        assert_eq!(decode::<(u32, String, Vec<u8>)>(&bytes).unwrap(), v);
        bytes.push(0);
        assert!(matches!(
            decode::<(u32, String, Vec<u8>)>(&bytes),
            Err(CodecError::TrailingBytes(1))
        ));
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = decode::<(u64, String, Vec<u64>, Option<std::collections::BTreeMap<String, i64>>)>(&bytes);
        }
    }

    #[test]
    fn message_formats() {
        let rec = Record::new("t", 0, 0, serde_json::to_vec(&("a", 1)).unwrap());
        let m: (String, i32) = Json::decode(&rec).unwrap();
        assert_eq!(m, ("a".to_string(), 1));
        let bad = Record::new("t", 0, 0, &b"{nope"[..]);
        assert!(matches!(
            <Json as MessageFormat<(String, i32)>>::decode(&bad),
            Err(DecodeError::Json(_))
        ));
        let mut tomb = rec.clone();
        tomb.payload = None;
        assert!(matches!(
            <Json as MessageFormat<(String, i32)>>::decode(&tomb),
            Err(DecodeError::MissingPayload)
        ));
        let b = Record::new("t", 0, 0, encode(&7u64).unwrap());
        assert_eq!(<Bincode as MessageFormat<u64>>::decode(&b).unwrap(), 7);
    }

    /// A log may hand out payloads as slices of one batch buffer: `Raw`
    /// gives the service copies of its own, so keeping one keeps no batch.
    #[test]
    fn raw_hands_out_copies_not_slices_of_the_batch() {
        let batch = Bytes::from_static(b"key1payload1");
        let mut record = Record::new("t", 0, 0, batch.slice(4..));
        record.key = Some(batch.slice(..4));
        let payload: Bytes = Raw::decode(&record).unwrap();
        assert_eq!(payload, record.payload.clone().unwrap());
        assert_ne!(payload.as_ptr(), batch[4..].as_ptr(), "a copy, not a slice");
        let whole: Record = Raw::decode(&record).unwrap();
        assert_eq!(whole, record);
        assert_ne!(whole.key.unwrap().as_ptr(), batch.as_ptr());
        assert_ne!(whole.payload.unwrap().as_ptr(), batch[4..].as_ptr());
    }
}
