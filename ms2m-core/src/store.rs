//! Where snapshots are kept, and the recovery rule for choosing one.

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};

use crate::codec::CodecError;
use crate::error::{BackendError, Component, Error, ErrorKind};
use crate::snapshot::{EncodedSnapshot, SnapshotHeader};
use crate::state::Frozen;
use crate::state::ServiceState;
use crate::streamed::{encode_streamed, restore_streamed_announcing, SnapshotPieces, StreamedSnapshot};

/// Identifies a stored snapshot. Ids grow with every `put`, so the largest
/// id is the newest snapshot.
pub type SnapshotId = u64;

/// A store of encoded snapshots for one service.
///
/// A store must never list a snapshot that was only partly written: `put`
/// makes the snapshot visible atomically (rename, manifest written last).
#[async_trait]
pub trait SnapshotStore: Send + Sync + 'static {
    /// The backend's error. Report damaged or incomplete snapshots as
    /// [`ErrorKind::Corrupt`] so recovery falls back to an older one.
    type Error: BackendError;

    /// Stores a snapshot and returns its id.
    async fn put(&self, snapshot: &EncodedSnapshot) -> Result<SnapshotId, Self::Error>;

    /// Ids of the stored snapshots, oldest first.
    async fn list(&self) -> Result<Vec<SnapshotId>, Self::Error>;

    /// The encoded bytes of one snapshot.
    async fn get(&self, id: SnapshotId) -> Result<Bytes, Self::Error>;

    /// Deletes one snapshot.
    async fn delete(&self, id: SnapshotId) -> Result<(), Self::Error>;

    /// Stores a snapshot whose state is still being encoded: its pieces
    /// come from [`StreamedSnapshot::next_piece`], the envelope's prefix
    /// (which goes first) from [`StreamedSnapshot::prefix`] after the last
    /// piece. A store that writes pieces as they come keeps only a few in
    /// memory (see [`streamed`](crate::streamed)).
    ///
    /// The default collects the pieces and calls [`put`](Self::put).
    async fn put_streamed(&self, mut snapshot: StreamedSnapshot) -> Result<SnapshotId, Self::Error> {
        let mut state = BytesMut::new();
        while let Some(piece) = snapshot.next_piece().await {
            state.extend_from_slice(&piece);
        }
        let prefix = snapshot.prefix().expect("the state is complete");
        self.put(&EncodedSnapshot {
            prefix,
            state: state.freeze(),
        })
        .await
    }

    /// The encoded bytes of one snapshot in pieces, in order, for a restore
    /// that decodes as they arrive. An error found before the first piece
    /// (no such snapshot, store unreachable) is returned here; one found
    /// later ends the pieces.
    ///
    /// The default fetches the whole snapshot with [`get`](Self::get).
    async fn get_streamed(&self, id: SnapshotId) -> Result<SnapshotPieces<Self::Error>, Self::Error> {
        Ok(SnapshotPieces::whole(self.get(id).await?))
    }
}

/// Deletes all but the newest `keep` snapshots; returns how many were deleted.
pub async fn retain_newest<St: SnapshotStore + ?Sized>(store: &St, keep: usize) -> Result<usize, Error> {
    let ids = store
        .list()
        .await
        .map_err(|e| Error::backend(Component::SnapshotStore, "list snapshots", e))?;
    let excess = ids.len().saturating_sub(keep.max(1));
    for id in &ids[..excess] {
        store
            .delete(*id)
            .await
            .map_err(|e| Error::backend(Component::SnapshotStore, "delete snapshot", e))?;
    }
    Ok(excess)
}

/// A snapshot that was skipped during recovery, and why.
#[derive(Debug)]
pub struct RejectedSnapshot {
    /// Which snapshot.
    pub id: SnapshotId,
    /// Why it was not used.
    pub reason: Error,
}

/// The result of [`load_newest_valid`].
#[derive(Debug)]
pub struct LoadedSnapshot<S> {
    /// The id of the snapshot used.
    pub id: SnapshotId,
    /// Its verified header (position, schema version, writer).
    pub header: SnapshotHeader,
    /// The restored state.
    pub state: S,
}

/// Loads the newest snapshot that verifies and restores into `S`.
///
/// Policy: a snapshot that is corrupt (bad checksum, truncated, missing
/// chunks), belongs to another service, or whose schema version `S` cannot
/// restore is skipped with a warning and the next older one is tried; a
/// store that cannot be reached is an error (falling back to an older
/// snapshot because of a network blip would replay needlessly). `Ok(None)`
/// when no snapshot verifies; the skipped ones are returned either way.
pub async fn load_newest_valid<S: ServiceState, St: SnapshotStore + ?Sized>(
    store: &St,
    service: &str,
) -> Result<(Option<LoadedSnapshot<S>>, Vec<RejectedSnapshot>), Error> {
    let ids = store
        .list()
        .await
        .map_err(|e| Error::backend(Component::SnapshotStore, "list snapshots", e))?;
    let mut rejected = Vec::new();
    for id in ids.into_iter().rev() {
        match fetch_and_restore::<S, St>(store, service, id).await {
            Ok(loaded) => return Ok((Some(loaded), rejected)),
            Err(e) if is_fatal(&e) => return Err(e),
            Err(reason) => {
                tracing::warn!(snapshot = id, error = %error_chain(&reason), "snapshot rejected, trying an older one");
                rejected.push(RejectedSnapshot { id, reason });
            }
        }
    }
    Ok((None, rejected))
}

/// [`load_newest_valid`], logging how many snapshots failed verification
/// (what recovery, a standby and a target without standby state do).
pub(crate) async fn load_newest_logged<S: ServiceState, St: SnapshotStore + ?Sized>(
    store: &St,
    service: &str,
) -> Result<Option<LoadedSnapshot<S>>, Error> {
    let (loaded, rejected) = load_newest_valid(store, service).await?;
    if !rejected.is_empty() {
        tracing::warn!(count = rejected.len(), "skipped snapshots that failed verification");
    }
    Ok(loaded)
}

/// Fetches snapshot `id` of `service`, verifies it and restores its state
/// as its pieces arrive (see [`streamed`](crate::streamed): the encoded
/// snapshot is never held whole unless the store fetches it whole).
pub async fn fetch_and_restore<S: ServiceState, St: SnapshotStore + ?Sized>(
    store: &St,
    service: &str,
    id: SnapshotId,
) -> Result<LoadedSnapshot<S>, Error> {
    Ok(fetch_and_restore_timed(store, service, id, None).await?.0)
}

/// Stores a frozen state as a snapshot under `header`, encoding it while the
/// store uploads it ([`SnapshotStore::put_streamed`]; see
/// [`streamed`](crate::streamed)): the header's state length and checksum
/// are filled in as the pieces pass. Returns the snapshot's id and the
/// encoded state's length.
///
/// An encoding error fails the call and nothing is stored (the store's
/// `put_streamed` is dropped before it writes its manifest); so does a store
/// error, which also stops the encoder at its next piece.
pub async fn store_frozen<St: SnapshotStore + ?Sized>(
    store: &St,
    frozen: Frozen,
    header: SnapshotHeader,
) -> Result<(SnapshotId, u64), Error> {
    let (streamed, mut encoder) = encode_streamed(frozen, header);
    let put = store.put_streamed(streamed);
    tokio::pin!(put);
    let stored = tokio::select! {
        stored = &mut put => match stored {
            // The encoder stops at its next piece: nothing reads them.
            Err(e) => Err(e),
            Ok(id) => Ok((id, joined_encoder(encoder.await)?)),
        },
        encoded = &mut encoder => {
            // Done, or failed: then the store would wait for pieces that
            // never come, so the error returns here.
            let state_len = joined_encoder(encoded)?;
            put.await.map(|id| (id, state_len))
        }
    };
    stored.map_err(|e| Error::backend(Component::SnapshotStore, "store snapshot", e))
}

/// The streamed encoder's outcome: the state's length, or the error that
/// fails the snapshot.
fn joined_encoder(joined: Result<Result<u64, CodecError>, tokio::task::JoinError>) -> Result<u64, Error> {
    match joined {
        Ok(encoded) => Ok(encoded?),
        Err(join) => Err(Error::snapshot_job_failed("encode a frozen state", join)),
    }
}

/// [`fetch_and_restore`], and when the store's last piece arrived; the
/// header goes to `header_read` as soon as it is read and checked.
pub(crate) async fn fetch_and_restore_timed<S: ServiceState, St: SnapshotStore + ?Sized>(
    store: &St,
    service: &str,
    id: SnapshotId,
    header_read: Option<tokio::sync::oneshot::Sender<SnapshotHeader>>,
) -> Result<(LoadedSnapshot<S>, std::time::Instant), Error> {
    let pieces = store
        .get_streamed(id)
        .await
        .map_err(|e| Error::backend(Component::SnapshotStore, "read snapshot", e))?;
    let restored = restore_streamed_announcing::<S, St::Error>(pieces, service, header_read).await?;
    let loaded = LoadedSnapshot {
        id,
        header: restored.header,
        state: restored.state,
    };
    Ok((loaded, restored.last_piece_at))
}

fn is_fatal(e: &Error) -> bool {
    matches!(
        e.backend_kind(),
        Some(ErrorKind::Unavailable | ErrorKind::Other | ErrorKind::Fenced)
    )
}

/// Formats an error with all its sources, `a: b: c`.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        out.push_str(": ");
        out.push_str(&s.to_string());
        cur = s.source();
    }
    out
}
