//! Live migration (MS2M): moving a running service to another instance while
//! the source keeps serving.

use crate::digest::StateDigest;

/// A migration failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MigrationError {
    /// Source and target disagree on the state at the cutover position:
    /// `apply` is not deterministic.
    #[error("state digests differ at cutover: source {source_digest}, target {target_digest}")]
    DigestMismatch {
        /// Source's digest.
        source_digest: StateDigest,
        /// Target's digest.
        target_digest: StateDigest,
    },
    /// A participant did not answer in time.
    #[error("migration timed out waiting for {waiting_for}")]
    Timeout {
        /// What was awaited.
        waiting_for: &'static str,
    },
    /// A participant reported failure.
    #[error("migration aborted: {reason}")]
    Aborted {
        /// Why.
        reason: String,
    },
}
