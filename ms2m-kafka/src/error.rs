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
    /// Records of the control topic were deleted before this channel read
    /// them (the topic's earliest offset is past the next one to read):
    /// the history that decides migrations and owners is incomplete, so
    /// nothing is decided from it. Retention or DeleteRecords deleted them
    /// (see [`preflight`](crate::preflight#why-these-topic-settings)).
    #[error(
        "control topic `{topic}` lost records {from}..{earliest} before they were read: \
         migrations and owners cannot be decided from the rest"
    )]
    ControlHistoryTruncated {
        /// The control topic.
        topic: String,
        /// The next offset this channel had to read.
        from: i64,
        /// The topic's earliest offset.
        earliest: i64,
    },
    /// The control topic now ends before records this channel already
    /// read: it was deleted and created again, or emptied (tansu 0.6.0
    /// reports an emptied partition as offsets 0..0). The history that
    /// decided owners is gone, so nothing is decided from what is there.
    #[error(
        "control topic `{topic}` now ends at offset {end}, before the {read} record(s) this channel read: \
         it was emptied or created again, and migrations and owners cannot be decided from it"
    )]
    ControlTopicReset {
        /// The control topic.
        topic: String,
        /// Records this channel had read (the next offset it wanted).
        read: i64,
        /// The topic's end now.
        end: i64,
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
    /// [`KafkaCluster::connect`](crate::KafkaCluster::connect) was given no
    /// broker. There is no silent fallback to the in-process mock.
    #[error(
        "no broker configured: set `bootstrap.servers` (KafkaConfig::bootstrap_servers), \
         or opt into the in-process test broker with KafkaCluster::embedded"
    )]
    NoBrokerConfigured,
    /// `Delivery::ExactlyOnce` on librdkafka's mock cluster reached by
    /// address (from another process): it does not enforce transactions
    /// and does not store transactional offset commits.
    #[error(
        "`{bootstrap}` is librdkafka's mock cluster (cluster id `{cluster_id}`), which does not \
         enforce transactions: use Delivery::AtLeastOnce, or a broker with transactions"
    )]
    ExactlyOnceOnMockCluster {
        /// The address it was reached at.
        bootstrap: String,
        /// The cluster id it reported (`mockCluster…`).
        cluster_id: String,
    },
    /// `Delivery::ExactlyOnce` on a broker that failed the transaction
    /// probe (tansu 0.6 has no EndTxn).
    #[error(
        "the broker at `{bootstrap}` cannot run transactions (the probe transaction failed to \
         {step}): use Delivery::AtLeastOnce, or a broker with transactions (Apache Kafka, Redpanda)"
    )]
    TransactionsUnsupported {
        /// The broker's address.
        bootstrap: String,
        /// The step of the probe that failed.
        step: &'static str,
        /// librdkafka's error.
        #[source]
        source: RdKafkaError,
    },
    /// The control topic has more than one partition: migration records
    /// would have no single order.
    #[error(
        "control topic `{topic}` has {partitions} partitions but needs exactly 1: recreate it with \
         1 partition, or name a new one with KafkaConfig::control_topic_name"
    )]
    ControlTopicPartitions {
        /// The topic.
        topic: String,
        /// Its partition count.
        partitions: i32,
    },
    /// A topic setting lets the broker delete records the library relies on.
    #[error("topic `{topic}` has `{key}={value}`, which can delete {at_risk}: set {fix}")]
    UnsafeTopicSetting {
        /// The topic.
        topic: String,
        /// The setting.
        key: String,
        /// Its value on the broker.
        value: String,
        /// What the broker could delete.
        at_risk: &'static str,
        /// The settings to change it to.
        fix: &'static str,
    },
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
            KafkaError::TransactionsUnsupported { source, .. } => source.rdkafka_error_code(),
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
            KafkaError::Embedded(_)
            | KafkaError::Config(_)
            | KafkaError::Join(_)
            | KafkaError::NoBrokerConfigured
            | KafkaError::ExactlyOnceOnMockCluster { .. }
            | KafkaError::TransactionsUnsupported { .. }
            | KafkaError::ControlTopicPartitions { .. }
            | KafkaError::UnsafeTopicSetting { .. } => ErrorKind::Other,
            KafkaError::UnknownTopic(_) | KafkaError::SnapshotNotFound(_) => ErrorKind::NotFound,
            KafkaError::CorruptSnapshot { .. } | KafkaError::LogTruncated { .. } => ErrorKind::Corrupt,
            KafkaError::ControlDecode { .. }
            | KafkaError::ControlHistoryTruncated { .. }
            | KafkaError::ControlTopicReset { .. } => ErrorKind::Corrupt,
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
