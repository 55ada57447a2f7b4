//! The crate's error type.
//!
//! Infrastructure failures (a backend that is unreachable, a snapshot that
//! does not verify, a log that no longer reaches back far enough) are kept
//! apart from the user's own domain error, which arrives boxed in
//! [`Error::Apply`] with the offset of the message that caused it.

use std::error::Error as StdError;
use std::fmt;

use crate::codec::{CodecError, DecodeError};
use crate::position::TopicPartition;
use crate::snapshot::SnapshotError;
use crate::state::StateError;

/// A boxed error from a backend or from the user's service.
pub type BoxError = Box<dyn StdError + Send + Sync + 'static>;

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What kind of failure a backend reported; decides recovery policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The backend could not be reached or timed out; retrying may help.
    Unavailable,
    /// Stored data is damaged or incomplete (e.g. a snapshot chunk is missing).
    Corrupt,
    /// Another owner took over; this instance must stop emitting.
    Fenced,
    /// The requested item does not exist.
    NotFound,
    /// Anything else.
    Other,
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            ErrorKind::Unavailable => "unavailable",
            ErrorKind::Corrupt => "corrupt",
            ErrorKind::Fenced => "fenced",
            ErrorKind::NotFound => "not found",
            ErrorKind::Other => "other",
        };
        f.write_str(s)
    }
}

/// Implemented by the error types of every storage and transport backend,
/// so that the runtime can tell a corrupt snapshot (fall back to an older
/// one) from an unreachable store (fail).
pub trait BackendError: StdError + Send + Sync + 'static {
    /// The category of this failure.
    fn kind(&self) -> ErrorKind {
        ErrorKind::Other
    }
}

/// Which component a [`Error::Backend`] came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Component {
    /// The input [`MessageLog`](crate::MessageLog).
    Log,
    /// The [`SnapshotStore`](crate::SnapshotStore).
    SnapshotStore,
    /// The [`OutputSink`](crate::OutputSink).
    Sink,
    /// The migration [`ControlChannel`](crate::ControlChannel).
    Control,
}

impl fmt::Display for Component {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            Component::Log => "message log",
            Component::SnapshotStore => "snapshot store",
            Component::Sink => "output sink",
            Component::Control => "control channel",
        };
        f.write_str(s)
    }
}

/// Everything that can go wrong in the runtime, recovery and migration.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A backend operation failed.
    #[error("{component} failed to {operation} ({kind})")]
    Backend {
        /// Which backend.
        component: Component,
        /// What it was asked to do.
        operation: &'static str,
        /// The category reported by the backend.
        kind: ErrorKind,
        /// The backend's own error.
        #[source]
        source: BoxError,
    },
    /// A snapshot envelope failed verification.
    #[error("snapshot failed verification")]
    Snapshot(#[from] SnapshotError),
    /// The state inside a verified envelope could not be restored.
    #[error("state could not be restored")]
    State(#[from] StateError),
    /// Encoding the state or an output failed.
    #[error("encoding failed")]
    Codec(#[from] CodecError),
    /// An input message could not be decoded and the policy is to fail.
    #[error("message {tp}@{offset} could not be decoded")]
    Decode {
        /// Where the message is.
        tp: TopicPartition,
        /// Its offset.
        offset: i64,
        /// Why it failed.
        #[source]
        source: DecodeError,
    },
    /// The user's `apply` returned an error and the policy is to fail.
    #[error("service failed to apply message {tp}@{offset}")]
    Apply {
        /// Where the message is.
        tp: TopicPartition,
        /// Its offset.
        offset: i64,
        /// The service's own error.
        #[source]
        source: BoxError,
    },
    /// The log's earliest offset is above the position recovery must start
    /// from: messages were deleted (retention) and the state cannot be
    /// rebuilt without loss.
    #[error(
        "log {tp} starts at offset {earliest} but recovery needs offset {needed}: {missing} messages were deleted"
    )]
    LogTruncated {
        /// The partition.
        tp: TopicPartition,
        /// The offset recovery needs.
        needed: i64,
        /// The earliest offset still in the log.
        earliest: i64,
        /// How many messages are gone.
        missing: i64,
    },
    /// This instance no longer owns its partitions: another instance took over.
    #[error("instance was fenced: another owner (epoch {current_epoch}) took over")]
    Fenced {
        /// The owner epoch now in force.
        current_epoch: u64,
    },
    /// A migration failed; see the variant for the phase.
    #[error(transparent)]
    Migration(#[from] crate::migration::MigrationError),
    /// The instance was asked to stop while an operation was under way.
    #[error("instance was shut down")]
    Shutdown,
    /// A setting is out of range; the message names it and what to change.
    #[error("invalid configuration: {0}")]
    Config(String),
}

impl Error {
    /// Wraps a backend error with its component and operation.
    pub fn backend<E: BackendError>(component: Component, operation: &'static str, err: E) -> Self {
        Error::Backend {
            component,
            operation,
            kind: err.kind(),
            source: Box::new(err),
        }
    }

    /// A snapshot job on the blocking pool that did not finish: its panic
    /// goes on in the caller; a cancellation (the runtime shutting down)
    /// is a snapshot-store error of kind `Other`.
    pub(crate) fn snapshot_job_failed(operation: &'static str, join: tokio::task::JoinError) -> Self {
        if join.is_panic() {
            std::panic::resume_unwind(join.into_panic());
        }
        Error::Backend {
            component: Component::SnapshotStore,
            operation,
            kind: ErrorKind::Other,
            source: Box::new(join),
        }
    }

    /// The backend kind, for [`Error::Backend`]; `None` otherwise.
    pub fn backend_kind(&self) -> Option<ErrorKind> {
        match self {
            Error::Backend { kind, .. } => Some(*kind),
            _ => None,
        }
    }
}
