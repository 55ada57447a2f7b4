//! The snapshot envelope: a service's state bound to the input position it
//! reflects, with everything needed to refuse a snapshot that is not what it
//! claims to be.
//!
//! Wire layout (all integers little endian):
//!
//! ```text
//! "MS2M" | format u16 | header_len u32 | header (bincode) | header_crc32c u32 | state bytes
//! ```
//!
//! The header carries the service name, state schema version, position,
//! creation time, writer instance, codec, state length and the state's
//! CRC-32C. The header has its own checksum so a flipped bit in the position
//! can never silently move where replay starts.

use std::io::Read;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::{Bytes, BytesMut};
use serde::{Deserialize, Serialize};

use crate::codec::{self, CodecError, CodecId, CURRENT_CODEC};
use crate::position::Position;

const MAGIC: &[u8; 4] = b"MS2M";
/// The envelope format this build writes and reads.
pub const FORMAT_VERSION: u16 = 1;
const FIXED_PREFIX: usize = 4 + 2 + 4;
/// The longest header a streamed read accepts before its checksum can be
/// checked (a header lists a position per input partition: a few dozen
/// bytes each), so a corrupt length never buffers the snapshot.
const MAX_HEADER_LEN: u64 = 1 << 20;

/// A snapshot failed verification. Never a panic, never a wrong state.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SnapshotError {
    /// Fewer bytes than the envelope says it has.
    #[error("snapshot truncated: expected at least {expected} bytes, found {actual}")]
    Truncated {
        /// Bytes the envelope needs.
        expected: u64,
        /// Bytes present.
        actual: u64,
    },
    /// Not an ms2m snapshot.
    #[error("not an ms2m snapshot (bad magic bytes)")]
    BadMagic,
    /// Written by a newer envelope format.
    #[error("unsupported snapshot format version {0} (this build reads {FORMAT_VERSION})")]
    UnsupportedFormat(u16),
    /// The header's checksum does not match.
    #[error("snapshot header checksum mismatch")]
    HeaderChecksum,
    /// The envelope gives a header length beyond what any header needs.
    #[error("snapshot header length {0} is beyond the limit (corrupt envelope)")]
    HeaderTooLong(u64),
    /// The header did not decode.
    #[error("snapshot header is malformed")]
    Header(#[source] CodecError),
    /// More bytes than the envelope says it has.
    #[error("snapshot has {0} unexpected trailing bytes")]
    TrailingBytes(u64),
    /// The state bytes' checksum does not match.
    #[error("snapshot state checksum mismatch: header says {expected:#010x}, state hashes to {actual:#010x}")]
    StateChecksum {
        /// Checksum recorded in the header.
        expected: u32,
        /// Checksum of the bytes present.
        actual: u32,
    },
    /// The snapshot belongs to another service.
    #[error("snapshot belongs to service `{found}`, expected `{expected}`")]
    WrongService {
        /// The service restoring.
        expected: String,
        /// The service that wrote it.
        found: String,
    },
    /// The state was written with a codec this build cannot read.
    #[error("snapshot state uses codec {0:?}, which this build cannot read")]
    UnsupportedCodec(CodecId),
    /// Reading a streamed snapshot failed (not the bytes: the reading).
    #[error("reading the snapshot failed")]
    Read(#[source] std::io::Error),
}

/// The verified metadata of a snapshot.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotHeader {
    /// Name of the service that wrote it.
    pub service: String,
    /// Schema version of the state bytes.
    pub schema_version: u32,
    /// Input position the state reflects: replay starts here.
    pub position: Position,
    /// When it was taken, milliseconds since the Unix epoch.
    pub created_at_ms: u64,
    /// Instance that wrote it.
    pub instance_id: String,
    /// Codec of the state bytes.
    pub codec: CodecId,
    /// Length of the state bytes.
    pub state_len: u64,
    /// CRC-32C of the state bytes.
    pub state_crc32c: u32,
}

impl SnapshotHeader {
    /// The header of a snapshot taken now by `instance_id`, before its
    /// state's length and checksum are known (both zero).
    pub fn unsealed(
        service: impl Into<String>,
        schema_version: u32,
        position: Position,
        instance_id: impl Into<String>,
    ) -> Self {
        Self {
            service: service.into(),
            schema_version,
            position,
            created_at_ms: now_ms(),
            instance_id: instance_id.into(),
            codec: CURRENT_CODEC,
            state_len: 0,
            state_crc32c: 0,
        }
    }

    /// The envelope up to the state bytes: magic, format, this header and
    /// its checksum.
    pub fn prefix(&self) -> Result<Bytes, CodecError> {
        let header = codec::encode(self)?;
        let mut prefix = BytesMut::with_capacity(FIXED_PREFIX + header.len() + 4);
        prefix.extend_from_slice(MAGIC);
        prefix.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        prefix.extend_from_slice(&(header.len() as u32).to_le_bytes());
        prefix.extend_from_slice(&header);
        prefix.extend_from_slice(&crc32c::crc32c(&header).to_le_bytes());
        Ok(prefix.freeze())
    }

    /// Reads and verifies the envelope's prefix from `input`, leaving it at
    /// the first state byte. Checks what [`Snapshot::decode`] checks
    /// before the state.
    pub fn read_prefix(input: &mut dyn std::io::Read) -> Result<Self, SnapshotError> {
        let mut fixed = [0u8; FIXED_PREFIX];
        let got = read_up_to(input, &mut fixed)?;
        if got >= 4 && &fixed[..4] != MAGIC {
            return Err(SnapshotError::BadMagic);
        }
        if got < FIXED_PREFIX {
            return Err(SnapshotError::Truncated {
                expected: FIXED_PREFIX as u64,
                actual: got as u64,
            });
        }
        let format = u16::from_le_bytes([fixed[4], fixed[5]]);
        if format != FORMAT_VERSION {
            return Err(SnapshotError::UnsupportedFormat(format));
        }
        let header_len = u32::from_le_bytes(fixed[6..10].try_into().expect("4 bytes")) as u64;
        if header_len > MAX_HEADER_LEN {
            return Err(SnapshotError::HeaderTooLong(header_len));
        }
        let mut header_bytes = Vec::new();
        let mut with_crc = input.take(header_len + 4);
        with_crc.read_to_end(&mut header_bytes).map_err(SnapshotError::Read)?;
        if (header_bytes.len() as u64) < header_len + 4 {
            return Err(SnapshotError::Truncated {
                expected: FIXED_PREFIX as u64 + header_len + 4,
                actual: (FIXED_PREFIX + header_bytes.len()) as u64,
            });
        }
        let (header_bytes, crc) = header_bytes.split_at(header_len as usize);
        if crc32c::crc32c(header_bytes) != u32::from_le_bytes(crc.try_into().expect("4 bytes")) {
            return Err(SnapshotError::HeaderChecksum);
        }
        let header: SnapshotHeader = codec::decode(header_bytes).map_err(SnapshotError::Header)?;
        if header.codec != CURRENT_CODEC {
            return Err(SnapshotError::UnsupportedCodec(header.codec));
        }
        Ok(header)
    }

    /// Checks that the snapshot was written by `service`.
    pub fn check_service(&self, service: &str) -> Result<(), SnapshotError> {
        if self.service != service {
            return Err(SnapshotError::WrongService {
                expected: service.to_string(),
                found: self.service.clone(),
            });
        }
        Ok(())
    }
}

/// Fills `buf` from `input` as far as it goes; how many bytes it got.
fn read_up_to(input: &mut dyn std::io::Read, buf: &mut [u8]) -> Result<usize, SnapshotError> {
    let mut got = 0;
    while got < buf.len() {
        match input.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(SnapshotError::Read(e)),
        }
    }
    Ok(got)
}

/// A decoded snapshot: header plus state bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Snapshot {
    /// Verified metadata.
    pub header: SnapshotHeader,
    /// The state, as written by [`ServiceState::snapshot`](crate::ServiceState::snapshot).
    pub state: Bytes,
}

/// A snapshot encoded for storage, in two parts so the (large) state bytes
/// are never copied to prepend the (small) header.
#[derive(Clone, Debug)]
pub struct EncodedSnapshot {
    /// Magic, format, header and header checksum.
    pub prefix: Bytes,
    /// The state bytes.
    pub state: Bytes,
}

impl EncodedSnapshot {
    /// Total encoded length.
    pub fn len(&self) -> usize {
        self.prefix.len() + self.state.len()
    }

    /// Whether the encoding is empty (never true for a real snapshot).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The encoding as one contiguous buffer (copies the state).
    pub fn to_bytes(&self) -> Bytes {
        let mut out = BytesMut::with_capacity(self.len());
        out.extend_from_slice(&self.prefix);
        out.extend_from_slice(&self.state);
        out.freeze()
    }

    /// Iterates over the encoding in `chunk_size` pieces without copying.
    pub fn chunks(&self, chunk_size: usize) -> impl Iterator<Item = Bytes> + '_ {
        assert!(chunk_size > 0, "chunk size must be positive");
        let total = self.len();
        (0..total).step_by(chunk_size).map(move |start| {
            let end = (start + chunk_size).min(total);
            self.slice(start, end)
        })
    }

    fn slice(&self, start: usize, end: usize) -> Bytes {
        let p = self.prefix.len();
        if end <= p {
            self.prefix.slice(start..end)
        } else if start >= p {
            self.state.slice(start - p..end - p)
        } else {
            let mut out = BytesMut::with_capacity(end - start);
            out.extend_from_slice(&self.prefix[start..]);
            out.extend_from_slice(&self.state[..end - p]);
            out.freeze()
        }
    }
}

/// Milliseconds since the Unix epoch (metadata only; never used by `apply`).
pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Snapshot {
    /// Wraps state bytes in an envelope, computing length and checksum.
    pub fn seal(
        service: impl Into<String>,
        schema_version: u32,
        position: Position,
        instance_id: impl Into<String>,
        state: Bytes,
    ) -> Self {
        Self::seal_under(
            SnapshotHeader::unsealed(service, schema_version, position, instance_id),
            state,
        )
    }

    /// Wraps state bytes in an envelope under `header`, setting its state
    /// length and checksum.
    pub fn seal_under(header: SnapshotHeader, state: Bytes) -> Self {
        let header = SnapshotHeader {
            state_len: state.len() as u64,
            state_crc32c: crc32c::crc32c(&state),
            ..header
        };
        Self { header, state }
    }

    /// Encodes the envelope.
    pub fn encode(&self) -> Result<EncodedSnapshot, CodecError> {
        Ok(EncodedSnapshot {
            prefix: self.header.prefix()?,
            state: self.state.clone(),
        })
    }

    /// Decodes and verifies an envelope. The state bytes are not copied.
    pub fn decode(bytes: Bytes) -> Result<Self, SnapshotError> {
        let truncated = |expected: usize| SnapshotError::Truncated {
            expected: expected as u64,
            actual: bytes.len() as u64,
        };
        if bytes.len() < 4 {
            return Err(truncated(FIXED_PREFIX));
        }
        if &bytes[..4] != MAGIC {
            return Err(SnapshotError::BadMagic);
        }
        if bytes.len() < FIXED_PREFIX {
            return Err(truncated(FIXED_PREFIX));
        }
        let format = u16::from_le_bytes([bytes[4], bytes[5]]);
        if format != FORMAT_VERSION {
            return Err(SnapshotError::UnsupportedFormat(format));
        }
        let header_len = u32::from_le_bytes(bytes[6..10].try_into().expect("4 bytes")) as usize;
        let header_end = FIXED_PREFIX
            .checked_add(header_len)
            .ok_or(SnapshotError::HeaderChecksum)?;
        if bytes.len() < header_end + 4 {
            return Err(truncated(header_end + 4));
        }
        let header_bytes = &bytes[FIXED_PREFIX..header_end];
        let stored_crc = u32::from_le_bytes(bytes[header_end..header_end + 4].try_into().expect("4 bytes"));
        if crc32c::crc32c(header_bytes) != stored_crc {
            return Err(SnapshotError::HeaderChecksum);
        }
        let header: SnapshotHeader = codec::decode(header_bytes).map_err(SnapshotError::Header)?;
        if header.codec != CURRENT_CODEC {
            return Err(SnapshotError::UnsupportedCodec(header.codec));
        }
        let state_start = header_end + 4;
        let present = (bytes.len() - state_start) as u64;
        if present < header.state_len {
            return Err(SnapshotError::Truncated {
                expected: state_start as u64 + header.state_len,
                actual: bytes.len() as u64,
            });
        }
        if present > header.state_len {
            return Err(SnapshotError::TrailingBytes(present - header.state_len));
        }
        let state = bytes.slice(state_start..);
        let actual = crc32c::crc32c(&state);
        if actual != header.state_crc32c {
            return Err(SnapshotError::StateChecksum {
                expected: header.state_crc32c,
                actual,
            });
        }
        Ok(Self { header, state })
    }

    /// Checks that the snapshot was written by `service`.
    pub fn check_service(&self, service: &str) -> Result<(), SnapshotError> {
        self.header.check_service(service)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::position::TopicPartition;
    use proptest::prelude::*;

    fn sample(state: &[u8]) -> Snapshot {
        let pos: Position = [(TopicPartition::new("in", 0), 42), (TopicPartition::new("in", 1), 7)]
            .into_iter()
            .collect();
        Snapshot::seal("svc", 3, pos, "i-1", Bytes::copy_from_slice(state))
    }

    #[test]
    fn a_corrupt_header_length_is_refused_before_reading_on() {
        let encoded = sample(&[7; 64]).encode().unwrap();
        let mut bytes = encoded.to_bytes().to_vec();
        bytes[6..10].copy_from_slice(&u32::MAX.to_le_bytes());
        let err = SnapshotHeader::read_prefix(&mut bytes.as_slice()).unwrap_err();
        assert!(
            matches!(err, SnapshotError::HeaderTooLong(len) if len == u32::MAX as u64),
            "{err}"
        );
        let header = SnapshotHeader::read_prefix(&mut encoded.to_bytes().as_ref()).unwrap();
        assert_eq!(header.service, "svc");
    }

    #[test]
    fn roundtrip() {
        let snap = sample(b"hello state");
        let enc = snap.encode().unwrap();
        let back = Snapshot::decode(enc.to_bytes()).unwrap();
        assert_eq!(back, snap);
        back.check_service("svc").unwrap();
        assert!(matches!(
            back.check_service("other"),
            Err(SnapshotError::WrongService { .. })
        ));
    }

    #[test]
    fn chunks_reassemble_to_the_same_bytes() {
        let snap = sample(&[7u8; 1000]);
        let enc = snap.encode().unwrap();
        for size in [1, 3, 64, enc.prefix.len(), enc.prefix.len() + 1, 5000] {
            let joined: Vec<u8> = enc.chunks(size).flat_map(|c| c.to_vec()).collect();
            assert_eq!(joined, enc.to_bytes().to_vec(), "chunk size {size}");
        }
    }

    #[test]
    fn every_truncation_is_a_typed_error() {
        let bytes = sample(b"some state bytes").encode().unwrap().to_bytes();
        for len in 0..bytes.len() {
            let err = Snapshot::decode(bytes.slice(..len)).unwrap_err();
            assert!(
                matches!(err, SnapshotError::Truncated { .. }),
                "length {len} gave {err:?}"
            );
        }
    }

    #[test]
    fn every_single_bit_flip_is_detected() {
        let bytes = sample(b"state!").encode().unwrap().to_bytes().to_vec();
        for i in 0..bytes.len() * 8 {
            let mut b = bytes.clone();
            b[i / 8] ^= 1 << (i % 8);
            assert!(Snapshot::decode(Bytes::from(b)).is_err(), "bit {i} flip went unnoticed");
        }
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = Snapshot::decode(Bytes::from(bytes));
        }

        #[test]
        fn arbitrary_bytes_after_magic_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let mut b = b"MS2M\x01\x00".to_vec();
            b.extend(bytes);
            let _ = Snapshot::decode(Bytes::from(b));
        }

        #[test]
        fn roundtrips_arbitrary_state(state in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let snap = sample(&state);
            prop_assert_eq!(Snapshot::decode(snap.encode().unwrap().to_bytes()).unwrap(), snap);
        }
    }
}
