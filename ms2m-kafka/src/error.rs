//! [`KafkaError`]: every failure of the Kafka backends, mapped into the
//! core's [`ErrorKind`] categories with the raw librdkafka code kept
//! reachable ([`KafkaError::code`]).

use std::time::Duration;

use ms2m_core::{BackendError, ErrorKind, TopicPartition};
use rdkafka::error::{KafkaError as RdKafkaError, RDKafkaErrorCode};

/// `Result` with [`KafkaError`].
pub type Result<T, E = KafkaError> = std::result::Result<T, E>;

/// A failure of one of the Kafka backends.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KafkaError {
    /// A librdkafka operation failed.
    #[error("kafka: failed to {operation}")]
    Kafka {
        /// What was being done.
        operation: &'static str,
        /// librdkafka's error.
        #[source]
        source: RdKafkaError,
    },
    /// The embedded mock cluster could not be started or driven.
    #[error("embedded mock cluster: {0}")]
    Embedded(String),
    /// A topic could not be created.
    #[error("failed to create topic `{topic}`: {code}")]
    CreateTopic {
        /// The topic.
        topic: String,
        /// The broker's error code.
        code: RDKafkaErrorCode,
    },
    /// A topic does not exist (the library creates only its own topics).
    #[error("topic `{0}` does not exist")]
    UnknownTopic(String),
    /// A snapshot's manifest or chunks are missing, evicted, or do not verify.
    #[error("snapshot {id} is corrupt: {reason}")]
    CorruptSnapshot {
        /// The snapshot id.
        id: u64,
        /// What is wrong.
        reason: String,
    },
    /// No snapshot with this id is stored.
    #[error("snapshot {0} does not exist")]
    SnapshotNotFound(u64),
    /// A partition of the input log was truncated below the read position
    /// while it was being read (`auto.offset.reset=error` fired).
    #[error("log partition {tp} was truncated below the read position")]
    LogTruncated {
        /// The partition, when librdkafka reported it.
        tp: TopicPartition,
    },
    /// A control message did not decode. The control channel logs it and
    /// skips the record instead of failing the read (see
    /// [`control`](crate::control#undecodable-records)).
    #[error("control message at {topic}/{partition}@{offset} did not decode")]
    ControlDecode {
        /// The control topic.
        topic: String,
        /// Its partition.
        partition: i32,
        /// The offset.
        offset: i64,
        /// Why.
        #[source]
        source: serde_json::Error,
    },
    /// An operation did not finish in time.
    #[error("timed out after {timeout:?} waiting to {operation}")]
    Timeout {
        /// What was being waited for.
        operation: &'static str,
        /// How long.
        timeout: Duration,
    },
    /// A blocking librdkafka call on the blocking thread pool panicked or was cancelled.
    #[error("background task failed")]
    Join(#[source] tokio::task::JoinError),
    /// The configuration cannot work.
    #[error("invalid configuration: {0}")]
    Config(String),
}

impl KafkaError {
    pub(crate) fn kafka(operation: &'static str) -> impl FnOnce(RdKafkaError) -> Self {
        move |source| KafkaError::Kafka { operation, source }
    }

    pub(crate) fn corrupt(id: u64, reason: impl Into<String>) -> Self {
        KafkaError::CorruptSnapshot {
            id,
            reason: reason.into(),
        }
    }

    /// The underlying rdkafka error, if this failure came from librdkafka.
    pub fn rdkafka_error(&self) -> Option<&RdKafkaError> {
        match self {
            KafkaError::Kafka { source, .. } => Some(source),
            _ => None,
        }
    }

    /// The raw librdkafka / broker error code, if there is one.
    pub fn code(&self) -> Option<RDKafkaErrorCode> {
        match self {
            KafkaError::Kafka { source, .. } => source.rdkafka_error_code(),
            KafkaError::CreateTopic { code, .. } => Some(*code),
            _ => None,
        }
    }
}

/// The core category of a librdkafka error code.
pub fn kind_of_code(code: RDKafkaErrorCode) -> ErrorKind {
    use RDKafkaErrorCode as C;
    match code {
        C::ProducerFenced
        | C::InvalidProducerEpoch
        | C::Fenced
        | C::TransactionCoordinatorFenced
        | C::FencedInstanceId => ErrorKind::Fenced,
        C::BrokerTransportFailure
        | C::AllBrokersDown
        | C::Resolve
        | C::MessageTimedOut
        | C::OperationTimedOut
        | C::TimedOutQueue
        | C::RequestTimedOut
        | C::NetworkException
        | C::QueueFull
        | C::WaitingForCoordinator
        | C::CoordinatorLoadInProgress
        | C::CoordinatorNotAvailable
        | C::NotCoordinator
        | C::LeaderNotAvailable
        | C::NotLeaderForPartition
        | C::BrokerNotAvailable
        | C::ReplicaNotAvailable => ErrorKind::Unavailable,
        C::UnknownTopicOrPartition | C::UnknownTopic | C::UnknownPartition | C::UnknownTopicId => ErrorKind::NotFound,
        C::AutoOffsetReset | C::OffsetOutOfRange => ErrorKind::Corrupt,
        _ => ErrorKind::Other,
    }
}

impl BackendError for KafkaError {
    fn kind(&self) -> ErrorKind {
        match self {
            KafkaError::Kafka { source, .. } => {
                if let RdKafkaError::Transaction(e) = source {
                    if e.is_fatal() && kind_of_code(e.code()) != ErrorKind::Fenced {
                        return ErrorKind::Other;
                    }
                }
                source.rdkafka_error_code().map_or(ErrorKind::Other, kind_of_code)
            }
            KafkaError::CreateTopic { code, .. } => kind_of_code(*code),
            KafkaError::Embedded(_) | KafkaError::Config(_) | KafkaError::Join(_) => ErrorKind::Other,
            KafkaError::UnknownTopic(_) | KafkaError::SnapshotNotFound(_) => ErrorKind::NotFound,
            KafkaError::CorruptSnapshot { .. } | KafkaError::LogTruncated { .. } => ErrorKind::Corrupt,
            KafkaError::ControlDecode { .. } => ErrorKind::Corrupt,
            KafkaError::Timeout { .. } => ErrorKind::Unavailable,
        }
    }
}

/// Runs a blocking librdkafka call on tokio's blocking pool.
pub(crate) async fn blocking<T, F>(f: F) -> Result<T>
where
    F: FnOnce() -> Result<T> + Send + 'static,
    T: Send + 'static,
{
    tokio::task::spawn_blocking(f).await.map_err(KafkaError::Join)?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_map_to_kinds() {
        let fenced = KafkaError::Kafka {
            operation: "commit",
            source: RdKafkaError::MessageProduction(RDKafkaErrorCode::ProducerFenced),
        };
        assert_eq!(fenced.kind(), ErrorKind::Fenced);
        assert_eq!(fenced.code(), Some(RDKafkaErrorCode::ProducerFenced));
        let down = KafkaError::Kafka {
            operation: "poll",
            source: RdKafkaError::MessageConsumption(RDKafkaErrorCode::AllBrokersDown),
        };
        assert_eq!(down.kind(), ErrorKind::Unavailable);
        assert_eq!(KafkaError::corrupt(1, "x").kind(), ErrorKind::Corrupt);
        assert_eq!(KafkaError::SnapshotNotFound(1).kind(), ErrorKind::NotFound);
    }
}
