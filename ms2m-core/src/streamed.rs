//! Snapshots that never exist in one piece.
//!
//! A 64 MiB state checkpointed into a buffer and then uploaded costs the
//! process the state twice over; restored from a fetched buffer, twice again
//! on the other side. Here the state flows in pieces instead:
//!
//! * **Writing** ([`StreamedSnapshot`]): a frozen state is encoded on a
//!   blocking thread ([`ServiceState::snapshot_to`])
//!   into pieces of [`PIECE_SIZE`] bytes that go through a channel of
//!   [`PIECES_IN_FLIGHT`] to the store's
//!   [`put_streamed`](crate::SnapshotStore::put_streamed), which stores
//!   them as they come. The envelope's header needs the state's length and
//!   checksum, known only at the end: the store asks for the
//!   [`prefix`](StreamedSnapshot::prefix) once the last piece is in, and
//!   places it first (the Kafka store writes it as chunk 0 after the
//!   others, before the manifest that makes the snapshot visible).
//! * **Reading** ([`SnapshotPieces`]): a store's
//!   [`get_streamed`](crate::SnapshotStore::get_streamed) sends the encoded
//!   snapshot's pieces in order; a blocking thread reads the envelope's
//!   prefix and decodes the state as the pieces arrive
//!   ([`ServiceState::restore_from`]),
//!   dropping each piece once read, and checks the state's length and
//!   checksum at the end. A state whose bytes fail the checksum is
//!   discarded and reported as [`SnapshotError::StateChecksum`], whatever
//!   its decoding said.
//!
//! Memory in flight is a few pieces on each side, plus what the store's
//! client buffers. The encoder and decoder run on tokio's blocking pool
//! and hold a [`heavy`](crate::heavy) slot while they work, not while they
//! wait for the store: they are paced by its transfer (seconds on a slow
//! broker), and holding the slot that long would hold up every other
//! state-sized job of the process.

use std::io::{Read, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use tokio::sync::mpsc;

use crate::codec::CodecError;
use crate::error::{BackendError, Component, Error};
use crate::heavy::Slot;
use crate::snapshot::{SnapshotError, SnapshotHeader};
use crate::state::{Frozen, ServiceState, StateError};

/// The size of the pieces a state is encoded into.
pub const PIECE_SIZE: usize = 256 * 1024;
/// How many encoded pieces may wait for the store at once.
pub const PIECES_IN_FLIGHT: usize = 4;

enum Piece {
    Data(Bytes),
    End,
}

/// A snapshot on its way into a store: the state's pieces as they are
/// encoded, then the envelope's prefix. Made by the instance for
/// [`SnapshotStore::put_streamed`](crate::SnapshotStore::put_streamed).
pub struct StreamedSnapshot {
    header: SnapshotHeader,
    pieces: mpsc::Receiver<Piece>,
    ended: bool,
}

impl std::fmt::Debug for StreamedSnapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamedSnapshot")
            .field("service", &self.header.service)
            .field("position", &self.header.position)
            .field("state_len", &self.header.state_len)
            .field("ended", &self.ended)
            .finish()
    }
}

impl StreamedSnapshot {
    /// The next piece of the state, in order; `None` once the state is
    /// complete. If encoding fails this never completes:
    /// [`store_frozen`](crate::store::store_frozen), which made this
    /// snapshot, then drops the `put_streamed` future (nothing may be
    /// stored) and reports the encoding error.
    pub async fn next_piece(&mut self) -> Option<Bytes> {
        if self.ended {
            return None;
        }
        match self.pieces.recv().await {
            Some(Piece::Data(bytes)) => {
                self.header.state_len += bytes.len() as u64;
                self.header.state_crc32c = crc32c::crc32c_append(self.header.state_crc32c, &bytes);
                Some(bytes)
            }
            Some(Piece::End) => {
                self.ended = true;
                None
            }
            None => std::future::pending().await,
        }
    }

    /// The envelope's prefix (magic, format, header, checksum), which goes
    /// before the state; `None` until [`next_piece`](Self::next_piece)
    /// returned `None`.
    pub fn prefix(&self) -> Option<Bytes> {
        self.ended
            .then(|| self.header.prefix().expect("a snapshot header always encodes"))
    }

    /// The snapshot's header so far (the state's length and checksum are
    /// final once the state is complete).
    pub fn header(&self) -> &SnapshotHeader {
        &self.header
    }
}

/// Splits an encoding into [`PIECE_SIZE`] pieces sent to a
/// [`StreamedSnapshot`]; blocks while [`PIECES_IN_FLIGHT`] wait.
struct PieceWriter {
    buffer: BytesMut,
    to_store: mpsc::Sender<Piece>,
    written: u64,
    slot: Slot,
}

impl PieceWriter {
    fn send(&mut self, piece: Piece) -> std::io::Result<()> {
        let stopped = || std::io::Error::new(std::io::ErrorKind::BrokenPipe, "the snapshot store stopped reading");
        match self.to_store.try_send(piece) {
            Ok(()) => Ok(()),
            Err(mpsc::error::TrySendError::Closed(_)) => Err(stopped()),
            Err(mpsc::error::TrySendError::Full(piece)) => {
                let to_store = &self.to_store;
                self.slot
                    .released_while(|| to_store.blocking_send(piece))
                    .map_err(|_| stopped())
            }
        }
    }

    fn send_buffered(&mut self) -> std::io::Result<()> {
        let piece = self.buffer.split().freeze();
        self.buffer.reserve(PIECE_SIZE);
        self.send(Piece::Data(piece))
    }

    fn finish(mut self) -> std::io::Result<()> {
        if !self.buffer.is_empty() {
            self.send_buffered()?;
        }
        self.send(Piece::End)
    }
}

impl Write for PieceWriter {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        let room = PIECE_SIZE - self.buffer.len();
        let taken = bytes.len().min(room);
        self.buffer.extend_from_slice(&bytes[..taken]);
        self.written += taken as u64;
        if self.buffer.len() == PIECE_SIZE {
            self.send_buffered()?;
        }
        Ok(taken)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Starts encoding `frozen` for a snapshot with `header` (its state length
/// and checksum are filled in as the pieces pass). Returns the snapshot to
/// hand to the store, and the encoder to join: the state's length, or the
/// encoding error, which is then the checkpoint's error. The two must be
/// raced (if the encoder fails, the store waits for pieces that never
/// come): [`store_frozen`](crate::store::store_frozen) does that.
pub(crate) fn encode_streamed(
    frozen: Frozen,
    header: SnapshotHeader,
) -> (StreamedSnapshot, tokio::task::JoinHandle<Result<u64, CodecError>>) {
    let (to_store, pieces) = mpsc::channel(PIECES_IN_FLIGHT);
    let encoder = tokio::task::spawn_blocking(move || {
        let mut writer = PieceWriter {
            buffer: BytesMut::with_capacity(PIECE_SIZE),
            to_store,
            written: 0,
            slot: Slot::acquire_blocking(),
        };
        frozen.snapshot_to(&mut writer)?;
        let written = writer.written;
        writer.finish().map_err(CodecError::Io)?;
        Ok(written)
    });
    let snapshot = StreamedSnapshot {
        header: SnapshotHeader {
            state_len: 0,
            state_crc32c: 0,
            ..header
        },
        pieces,
        ended: false,
    };
    (snapshot, encoder)
}

/// A stored snapshot's encoded bytes, in order, as a store fetches them
/// (from [`SnapshotStore::get_streamed`](crate::SnapshotStore::get_streamed)).
/// A store error ends the pieces: it is reported as the restore's error.
#[derive(Debug)]
pub struct SnapshotPieces<E> {
    pieces: mpsc::Receiver<Result<Bytes, E>>,
}

impl<E> SnapshotPieces<E> {
    /// A channel for a store to send pieces into (from a blocking thread
    /// with `blocking_send`, or from a task): at most `capacity` wait.
    /// Dropping the sender after the last piece ends them.
    pub fn channel(capacity: usize) -> (mpsc::Sender<Result<Bytes, E>>, Self) {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        (tx, Self { pieces: rx })
    }

    /// The whole encoding as one piece (stores that fetch it whole).
    pub fn whole(bytes: Bytes) -> Self {
        let (tx, pieces) = Self::channel(1);
        tx.try_send(Ok(bytes))
            .unwrap_or_else(|_| unreachable!("a new channel has room"));
        pieces
    }
}

/// A state restored from [`SnapshotPieces`].
pub(crate) struct Restored<S> {
    pub(crate) header: SnapshotHeader,
    pub(crate) state: S,
    /// When the decoder found the store's pieces ended (it may have taken
    /// the last piece after the store sent it; the restore may finish
    /// later).
    pub(crate) last_piece_at: Instant,
}

/// Reads [`SnapshotPieces`] on a blocking thread, keeping the first store
/// error aside (the decoder only sees that reading stopped).
struct PiecesReader<E> {
    pieces: mpsc::Receiver<Result<Bytes, E>>,
    current: Bytes,
    failed: Option<E>,
    ended_at: Option<Instant>,
    slot: Slot,
    /// Set when the restore's future is dropped: reading fails at the next
    /// piece, so the decoder stops and the store stops fetching.
    abandoned: Arc<AtomicBool>,
}

/// Marks a restore abandoned when its future is dropped (see
/// [`PiecesReader::abandoned`]).
struct AbandonOnDrop(Arc<AtomicBool>);

impl Drop for AbandonOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

impl<E> PiecesReader<E> {
    /// The next piece, waiting for the store without the slot.
    fn next_piece(&mut self) -> Option<Result<Bytes, E>> {
        match self.pieces.try_recv() {
            Ok(piece) => Some(piece),
            Err(mpsc::error::TryRecvError::Disconnected) => None,
            Err(mpsc::error::TryRecvError::Empty) => {
                let pieces = &mut self.pieces;
                self.slot.released_while(|| pieces.blocking_recv())
            }
        }
    }
}

impl<E> Read for PiecesReader<E> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.current.is_empty() {
            if self.failed.is_some() {
                return Err(std::io::Error::other("the snapshot store failed"));
            }
            if self.abandoned.load(Ordering::Relaxed) {
                return Err(std::io::Error::other("the restore was abandoned"));
            }
            match self.next_piece() {
                Some(Ok(piece)) => self.current = piece,
                Some(Err(e)) => self.failed = Some(e),
                None => {
                    self.ended_at.get_or_insert_with(Instant::now);
                    return Ok(0);
                }
            }
        }
        let n = buf.len().min(self.current.len());
        buf[..n].copy_from_slice(&self.current[..n]);
        let _ = self.current.split_to(n);
        Ok(n)
    }
}

/// The state's bytes of an envelope: at most the header's length, with
/// the checksum computed as they are read.
struct StateBytes<'a> {
    input: &'a mut dyn Read,
    remaining: u64,
    crc: u32,
}

impl Read for StateBytes<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let room = buf.len().min(usize::try_from(self.remaining).unwrap_or(usize::MAX));
        let n = self.input.read(&mut buf[..room])?;
        self.remaining -= n as u64;
        self.crc = crc32c::crc32c_append(self.crc, &buf[..n]);
        Ok(n)
    }
}

impl StateBytes<'_> {
    /// Reads what the decoder left, so the checksum covers every byte;
    /// how many there were.
    fn drain(&mut self) -> std::io::Result<u64> {
        std::io::copy(self, &mut std::io::sink())
    }
}

/// [`restore_streamed_announcing`] without the header's announcement.
#[cfg(test)]
pub(crate) async fn restore_streamed<S: ServiceState, E: BackendError>(
    pieces: SnapshotPieces<E>,
    service: &str,
) -> Result<Restored<S>, Error> {
    restore_streamed_announcing(pieces, service, None).await
}

/// Restores an `S` of `service` from `pieces`: verifies the envelope's
/// prefix, decodes the state as it arrives and checks its length and
/// checksum. Runs on the blocking pool (see the module docs); dropping the
/// future stops the decoder at its next piece, and with it the store's
/// fetch.
///
/// The header goes to `header_read` as soon as it is read and checked,
/// before the state is decoded: a migration target starts fetching the log
/// from the header's position meanwhile.
pub(crate) async fn restore_streamed_announcing<S: ServiceState, E: BackendError>(
    pieces: SnapshotPieces<E>,
    service: &str,
    header_read: Option<tokio::sync::oneshot::Sender<SnapshotHeader>>,
) -> Result<Restored<S>, Error> {
    let service = service.to_string();
    let pieces = pieces.pieces;
    let abandoned = Arc::new(AtomicBool::new(false));
    let _abandon_on_drop = AbandonOnDrop(Arc::clone(&abandoned));
    let restored = tokio::task::spawn_blocking(move || {
        let mut reader = PiecesReader {
            pieces,
            current: Bytes::new(),
            failed: None,
            ended_at: None,
            slot: Slot::acquire_blocking(),
            abandoned,
        };
        let restored = restore_from_reader::<S>(&mut reader, &service, header_read);
        (restored, reader)
    })
    .await;
    match restored {
        Ok((_, PiecesReader { failed: Some(e), .. })) => {
            Err(Error::backend(Component::SnapshotStore, "read snapshot", e))
        }
        Ok((restored, reader)) => {
            let (header, state) = restored?;
            let last_piece_at = reader.ended_at.unwrap_or_else(Instant::now);
            Ok(Restored {
                header,
                state,
                last_piece_at,
            })
        }
        Err(join) => Err(Error::snapshot_job_failed("decode a snapshot", join)),
    }
}

fn restore_from_reader<S: ServiceState>(
    input: &mut dyn Read,
    service: &str,
    header_read: Option<tokio::sync::oneshot::Sender<SnapshotHeader>>,
) -> Result<(SnapshotHeader, S), Error> {
    let header = SnapshotHeader::read_prefix(input)?;
    header.check_service(service)?;
    if let Some(announce) = header_read {
        // Nobody listening any more is fine: the announcement is a hint.
        let _ = announce.send(header.clone());
    }
    let mut state = StateBytes {
        input,
        remaining: header.state_len,
        crc: 0,
    };
    let restored = S::restore_from(header.schema_version, &mut state);
    let left = state.drain().map_err(SnapshotError::Read)?;
    if state.remaining > 0 {
        return Err(SnapshotError::Truncated {
            expected: header.state_len,
            actual: header.state_len - state.remaining,
        }
        .into());
    }
    if state.crc != header.state_crc32c {
        return Err(SnapshotError::StateChecksum {
            expected: header.state_crc32c,
            actual: state.crc,
        }
        .into());
    }
    let trailing = std::io::copy(state.input, &mut std::io::sink()).map_err(SnapshotError::Read)?;
    if trailing > 0 {
        return Err(SnapshotError::TrailingBytes(trailing).into());
    }
    let restored = restored?;
    if left > 0 {
        return Err(StateError::Decode {
            version: header.schema_version,
            source: CodecError::TrailingBytes(left as usize),
        }
        .into());
    }
    Ok((header, restored))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;
    use crate::memory::MemoryError;
    use crate::position::Position;
    use crate::snapshot::Snapshot;

    #[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
    struct Blob(Vec<u8>);

    impl ServiceState for Blob {
        const SCHEMA_VERSION: u32 = 1;
        fn snapshot(&self) -> Result<Vec<u8>, CodecError> {
            crate::codec::encode(self)
        }
        fn restore(_: u32, bytes: &[u8]) -> Result<Self, StateError> {
            crate::codec::decode(bytes).map_err(|source| StateError::Decode { version: 1, source })
        }
        fn restore_from(_: u32, input: &mut dyn Read) -> Result<Self, StateError> {
            crate::codec::decode_from(input).map_err(|source| StateError::Decode { version: 1, source })
        }
        fn snapshot_to(&self, out: &mut dyn Write) -> Result<(), CodecError> {
            crate::codec::encode_to(self, out)
        }
        fn digest(&self) -> crate::StateDigest {
            crate::digest::digest_of(self)
        }
    }

    fn header() -> SnapshotHeader {
        Snapshot::seal("svc", 1, Position::new(), "i", Bytes::new()).header
    }

    /// Streams `blob` into a `StreamedSnapshot` and collects what a store would store.
    async fn store_streamed(blob: Blob) -> (Vec<Bytes>, Bytes) {
        let (mut snapshot, encoder) = encode_streamed(Frozen::new(blob), header());
        let mut pieces = Vec::new();
        while let Some(piece) = snapshot.next_piece().await {
            pieces.push(piece);
        }
        encoder.await.unwrap().unwrap();
        (pieces, snapshot.prefix().unwrap())
    }

    /// A streamed snapshot of `blob` as one envelope, and its prefix's length.
    async fn envelope_of(blob: Blob) -> (Vec<u8>, usize) {
        let (pieces, prefix) = store_streamed(blob).await;
        let mut all = prefix.to_vec();
        pieces.iter().for_each(|p| all.extend_from_slice(p));
        (all, prefix.len())
    }

    fn blob(len: usize) -> Blob {
        Blob((0..len).map(|i| (i * 7 % 251) as u8).collect())
    }

    #[tokio::test]
    async fn a_streamed_snapshot_is_the_envelope_a_whole_one_would_be() {
        let state = blob(3 * PIECE_SIZE + 17);
        let (pieces, prefix) = store_streamed(blob(3 * PIECE_SIZE + 17)).await;
        assert!(pieces.len() >= 4, "{} pieces", pieces.len());
        assert!(pieces.iter().all(|p| p.len() <= PIECE_SIZE));
        let whole = Snapshot::seal("svc", 1, Position::new(), "i", Bytes::from(state.snapshot().unwrap()));
        let mut streamed = prefix.to_vec();
        pieces.iter().for_each(|p| streamed.extend_from_slice(p));
        let decoded = Snapshot::decode(Bytes::from(streamed)).unwrap();
        assert_eq!(decoded.state, whole.state);
        assert_eq!(decoded.header.state_crc32c, whole.header.state_crc32c);
    }

    /// The envelope of `blob` in pieces of `size`, as a store would send them.
    async fn envelope_pieces(blob: Blob, size: usize) -> SnapshotPieces<MemoryError> {
        let (pieces, prefix) = store_streamed(blob).await;
        let mut all = prefix.to_vec();
        pieces.iter().for_each(|p| all.extend_from_slice(p));
        let (tx, rx) = SnapshotPieces::channel(all.len() / size + 2);
        for chunk in all.chunks(size) {
            tx.try_send(Ok(Bytes::copy_from_slice(chunk))).unwrap();
        }
        rx
    }

    #[tokio::test]
    async fn pieces_of_any_size_restore_the_state() {
        for size in [1, 7, 4096, PIECE_SIZE + 3] {
            let pieces = envelope_pieces(blob(PIECE_SIZE + 5), size).await;
            let restored = restore_streamed::<Blob, MemoryError>(pieces, "svc").await.unwrap();
            assert_eq!(restored.state, blob(PIECE_SIZE + 5), "pieces of {size}");
            assert_eq!(
                restored.header.state_len,
                blob(PIECE_SIZE + 5).snapshot().unwrap().len() as u64
            );
        }
    }

    async fn restore_bytes(bytes: Vec<u8>) -> Error {
        match restore_streamed::<Blob, MemoryError>(SnapshotPieces::whole(Bytes::from(bytes)), "svc").await {
            Ok(_) => panic!("restored"),
            Err(e) => e,
        }
    }

    #[tokio::test]
    async fn a_flipped_state_bit_is_a_checksum_error_not_a_decode_error() {
        let (all, prefix_len) = envelope_of(blob(1000)).await;
        for at in [prefix_len, prefix_len + 1, all.len() - 1] {
            let mut bad = all.clone();
            bad[at] ^= 0x40;
            let e = restore_bytes(bad).await;
            assert!(
                matches!(e, Error::Snapshot(SnapshotError::StateChecksum { .. })),
                "flip at {at}: {e:?}"
            );
        }
    }

    #[tokio::test]
    async fn truncation_and_trailing_bytes_are_typed_errors() {
        let (all, prefix_len) = envelope_of(blob(1000)).await;
        for cut in [0, 3, prefix_len - 1, prefix_len + 10, all.len() - 1] {
            let e = restore_bytes(all[..cut].to_vec()).await;
            assert!(
                matches!(e, Error::Snapshot(SnapshotError::Truncated { .. })),
                "cut at {cut}: {e:?}"
            );
        }
        let mut longer = all.clone();
        longer.extend_from_slice(b"xx");
        let e = restore_bytes(longer).await;
        assert!(matches!(e, Error::Snapshot(SnapshotError::TrailingBytes(2))), "{e:?}");
        let Err(e) = restore_streamed::<Blob, MemoryError>(SnapshotPieces::whole(Bytes::from(all)), "other").await
        else {
            panic!("restored as another service")
        };
        assert!(
            matches!(e, Error::Snapshot(SnapshotError::WrongService { .. })),
            "{e:?}"
        );
    }

    #[tokio::test]
    async fn a_store_error_mid_way_is_the_restores_error() {
        let (pieces, prefix) = store_streamed(blob(1000)).await;
        let (tx, rx) = SnapshotPieces::channel(4);
        tx.try_send(Ok(prefix)).unwrap();
        tx.try_send(Ok(pieces[0].slice(..10))).unwrap();
        tx.try_send(Err(MemoryError::Unavailable)).unwrap();
        drop(tx);
        let Err(e) = restore_streamed::<Blob, MemoryError>(rx, "svc").await else {
            panic!("restored")
        };
        assert!(
            matches!(
                &e,
                Error::Backend {
                    operation: "read snapshot",
                    kind: ErrorKind::Unavailable,
                    ..
                }
            ),
            "{e:?}"
        );
    }

    /// Encodes a few pieces, then fails.
    struct FailsMidway;

    impl ServiceState for FailsMidway {
        const SCHEMA_VERSION: u32 = 1;
        fn snapshot(&self) -> Result<Vec<u8>, CodecError> {
            unreachable!("only streamed here")
        }
        fn restore(_: u32, _: &[u8]) -> Result<Self, StateError> {
            unreachable!("never restored")
        }
        fn snapshot_to(&self, out: &mut dyn Write) -> Result<(), CodecError> {
            out.write_all(&vec![7; 3 * PIECE_SIZE]).map_err(CodecError::Io)?;
            Err(CodecError::TrailingBytes(1))
        }
        fn digest(&self) -> crate::StateDigest {
            crate::digest::digest_of(&0u8)
        }
    }

    /// Guards a test against a hang (a bug here would wait forever).
    async fn within_a_minute<T>(f: impl std::future::Future<Output = T>) -> T {
        tokio::time::timeout(std::time::Duration::from_secs(60), f)
            .await
            .expect("hung")
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failing_encoder_fails_store_frozen_and_stores_nothing() {
        let store = crate::memory::MemorySnapshotStore::new();
        let stored = within_a_minute(crate::store::store_frozen(&store, Frozen::new(FailsMidway), header())).await;
        let e = stored.unwrap_err();
        assert!(
            matches!(e, Error::Codec(CodecError::TrailingBytes(1))),
            "the encoder's own error: {e:?}"
        );
        assert!(crate::SnapshotStore::list(&store).await.unwrap().is_empty());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_dropped_restore_stops_reading_the_store() {
        let (envelope, _) = envelope_of(blob(8 * PIECE_SIZE)).await;
        let (tx, pieces) = SnapshotPieces::<MemoryError>::channel(1);
        tx.send(Ok(Bytes::copy_from_slice(&envelope[..PIECE_SIZE])))
            .await
            .unwrap();
        // Boxed, so that dropping it drops the future (a pinned local would live on).
        let mut restore = Box::pin(restore_streamed::<Blob, MemoryError>(pieces, "svc"));
        // Polled until the decoder took the first piece and waits for more.
        tokio::select! {
            _ = &mut restore => panic!("restored from a part of the envelope"),
            sent = tx.send(Ok(Bytes::copy_from_slice(&envelope[PIECE_SIZE..2 * PIECE_SIZE]))) => sent.unwrap(),
        }
        drop(restore);
        // The store keeps sending; the decoder stops at the next piece it
        // takes and closes the channel.
        let rest = envelope[2 * PIECE_SIZE..].chunks(PIECE_SIZE);
        within_a_minute(async {
            for piece in rest {
                if tx.send(Ok(Bytes::copy_from_slice(piece))).await.is_err() {
                    return;
                }
            }
            tx.closed().await;
        })
        .await;
    }

    #[tokio::test]
    async fn a_store_that_stops_reading_fails_the_encoder_and_stores_nothing() {
        let (snapshot, encoder) = encode_streamed(Frozen::new(blob(8 * PIECE_SIZE)), header());
        drop(snapshot);
        let e = encoder.await.unwrap().unwrap_err();
        assert!(matches!(e, CodecError::Io(_) | CodecError::Encode(_)), "{e:?}");
    }
}
