//! Where snapshots are kept, and the recovery rule for choosing one.

use async_trait::async_trait;
use bytes::Bytes;

use crate::error::{BackendError, Component, Error, ErrorKind};
use crate::snapshot::{EncodedSnapshot, Snapshot};
use crate::state::ServiceState;

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
    /// Its verified envelope (state bytes included).
    pub snapshot: Snapshot,
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
        let attempt = async {
            let bytes = store
                .get(id)
                .await
                .map_err(|e| Error::backend(Component::SnapshotStore, "read snapshot", e))?;
            decode_and_restore::<S>(bytes, service).await
        };
        match attempt.await {
            Ok((snapshot, state)) => {
                return Ok((Some(LoadedSnapshot { id, snapshot, state }), rejected));
            }
            Err(e) if is_fatal(&e) => return Err(e),
            Err(reason) => {
                tracing::warn!(snapshot = id, error = %error_chain(&reason), "snapshot rejected, trying an older one");
                rejected.push(RejectedSnapshot { id, reason });
            }
        }
    }
    Ok((None, rejected))
}

/// Verifies stored snapshot `bytes` of `service` and restores its state,
/// off the apply loop ([`crate::heavy`]: both take time proportional to
/// the state).
pub(crate) async fn decode_and_restore<S: ServiceState>(bytes: Bytes, service: &str) -> Result<(Snapshot, S), Error> {
    let service = service.to_string();
    let decoded = crate::heavy::off_loop(move || {
        let snapshot = Snapshot::decode(bytes)?;
        snapshot.check_service(&service)?;
        let state = S::restore(snapshot.header.schema_version, &snapshot.state)?;
        Ok::<_, Error>((snapshot, state))
    })
    .await;
    match decoded {
        Ok(restored) => restored,
        Err(join) if join.is_panic() => std::panic::resume_unwind(join.into_panic()),
        Err(join) => Err(Error::Backend {
            component: Component::SnapshotStore,
            operation: "decode a snapshot",
            kind: ErrorKind::Other,
            source: Box::new(join),
        }),
    }
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
