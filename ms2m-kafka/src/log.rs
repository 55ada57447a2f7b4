//! [`KafkaLog`]: the input log over a fixed set of Kafka partitions.
//!
//! * Partitions are **assigned** manually (`assign`, never `subscribe`):
//!   no consumer-group rebalance can take a partition from under a running
//!   instance. `group.id` is set (to the service's group) but the consumer
//!   never joins the group and never commits; committed offsets are the
//!   sink's business.
//! * `seek` re-assigns every partition at an explicit offset.
//! * `auto.offset.reset=error`: a read position that falls below the log's
//!   start (retention, or the mock cluster's eviction) is reported as
//!   [`KafkaError::LogTruncated`] instead of silently jumping. Before
//!   seeking, the runtime compares the snapshot position with
//!   [`watermarks`](ms2m_core::MessageLog::watermarks) and fails with
//!   `Error::LogTruncated` itself.
//! * `isolation.level=read_committed`: records of aborted transactions are
//!   never applied (on a real broker).
//! * `fetch.queue.backoff.ms=10` (librdkafka's default is 1000): once the
//!   local queue holds `queued.min.messages` (counted over *all* assigned
//!   partitions, which share one queue), librdkafka stops fetching for that
//!   long. During catch-up the queue fills within milliseconds, so with the
//!   default a replay stalled for about a second every time it did.
//! * Records are delivered in offset order per partition; key, payload and
//!   headers are copied into `Bytes` of their own (one allocation each, so a
//!   service that keeps a payload keeps only that payload alive, never a
//!   batch buffer), topic names are shared `Arc<str>`s.
//! * Per message the cost is librdkafka's queue pop, these copies and the
//!   header parse (see [`KafkaLog::without_headers`]); everything else
//!   (waker registration, next-offset bookkeeping) happens once per poll or
//!   once per run of records from one partition.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::{FutureExt, StreamExt};
use ms2m_core::{MessageLog, Position, Record, TopicPartition, Watermarks};
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::error::{KafkaError as RdKafkaError, RDKafkaErrorCode};
use rdkafka::message::{BorrowedMessage, Headers};
use rdkafka::{Message, Offset, TopicPartitionList};
use tracing::{debug, warn};

use crate::broker::{partition_count, KafkaCluster};
use crate::config::SetDefault;
use crate::error::{blocking, KafkaError, Result};

/// Lag of one partition: how far the log's end is ahead of the next offset
/// this log will deliver.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PartitionLag {
    /// The partition's watermarks (with `read_committed`, `high` is the last
    /// stable offset).
    pub watermarks: Watermarks,
    /// Next offset this log delivers (the seek offset plus what was polled).
    pub next: i64,
    /// `high - next`, at least 0.
    pub lag: u64,
}

/// A [`MessageLog`] over Kafka partitions, read with manual assignment.
pub struct KafkaLog {
    consumer: Arc<StreamConsumer>,
    cluster: KafkaCluster,
    explicit: Option<Vec<TopicPartition>>,
    /// Topic names handed out in records, so each record shares one allocation.
    topics: Vec<Arc<str>>,
    /// Next offset to deliver per assigned partition.
    next: BTreeMap<TopicPartition, i64>,
    /// An error met after records were already taken in the same poll;
    /// returned by the next poll so no record is lost.
    deferred: Option<KafkaError>,
    /// When a connection event was last logged at `warn` (one per outage
    /// burst; librdkafka reports each outage several times per client).
    warned_at: Option<std::time::Instant>,
    /// Whether records carry the messages' headers (see [`KafkaLog::without_headers`]).
    read_headers: bool,
}

impl std::fmt::Debug for KafkaLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaLog")
            .field("topics", &self.topics)
            .field("next", &self.next)
            .finish_non_exhaustive()
    }
}

impl KafkaLog {
    /// A log over the input topics (or explicit partitions) of the
    /// cluster's service configuration. Nothing is assigned until `seek`.
    pub async fn new(cluster: &KafkaCluster) -> Result<Self> {
        let config = cluster.config();
        if config.input_topics().is_empty() {
            return Err(KafkaError::Config("no input topics configured".into()));
        }
        let mut cc = cluster.client_config();
        cc.set("group.id", config.group_id())
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("enable.partition.eof", "false")
            .set("auto.offset.reset", "error")
            .set("isolation.level", "read_committed")
            .set_default("fetch.wait.max.ms", "10")
            .set_default("fetch.queue.backoff.ms", "10")
            .set_default("allow.auto.create.topics", "false");
        let consumer: StreamConsumer = cc.create().map_err(KafkaError::kafka("create the input consumer"))?;
        Ok(Self {
            consumer: Arc::new(consumer),
            cluster: cluster.clone(),
            explicit: config.explicit_input_partitions().map(<[_]>::to_vec),
            topics: config.input_topics().iter().map(|t| Arc::from(t.as_str())).collect(),
            next: BTreeMap::new(),
            deferred: None,
            warned_at: None,
            read_headers: true,
        })
    }

    /// Records from this log carry no headers.
    ///
    /// librdkafka parses a message's headers on first access, and that
    /// parse (a buffer allocated, read and freed per message, even when the
    /// message has no headers) is the largest single cost of turning a
    /// message into a [`Record`]: about a fifth of the instructions of the
    /// replay loop for small messages (benchmark B2). Only for services that
    /// never read [`ApplyContext::headers`](ms2m_core::ApplyContext::headers);
    /// messages they send to a dead-letter topic lack the original headers.
    pub fn without_headers(mut self) -> Self {
        self.read_headers = false;
        self
    }

    fn topic_arc(&mut self, topic: &str) -> Arc<str> {
        if let Some(t) = self.topics.iter().find(|t| ***t == *topic) {
            return t.clone();
        }
        let t: Arc<str> = Arc::from(topic);
        self.topics.push(t.clone());
        t
    }

    fn record_of(&mut self, m: &BorrowedMessage<'_>) -> Record {
        let topic = self.topic_arc(m.topic());
        let headers = self
            .read_headers
            .then(|| m.headers())
            .flatten()
            .map(|h| {
                h.iter()
                    .map(|h| {
                        (
                            h.key.to_string(),
                            h.value.map(Bytes::copy_from_slice).unwrap_or_default(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        Record {
            topic,
            partition: m.partition(),
            offset: m.offset(),
            timestamp_ms: m.timestamp().to_millis(),
            key: m.key().map(Bytes::copy_from_slice),
            payload: m.payload().map(Bytes::copy_from_slice),
            headers,
        }
    }

    fn consume_error(&self, e: RdKafkaError) -> KafkaError {
        match e.rdkafka_error_code() {
            Some(RDKafkaErrorCode::AutoOffsetReset | RDKafkaErrorCode::OffsetOutOfRange) => {
                // librdkafka does not say which partition; name the first
                // assigned one whose start moved above our position if we can.
                let tp = self
                    .next
                    .keys()
                    .next()
                    .cloned()
                    .unwrap_or_else(|| TopicPartition::new("?", -1));
                KafkaError::LogTruncated { tp }
            }
            _ => KafkaError::Kafka {
                operation: "consume from the input log",
                source: e,
            },
        }
    }

    /// Moves each partition's next offset past the records taken. Records
    /// of one partition arrive in offset order and in runs (one per fetched
    /// batch), so the map is updated once per run, at its last record.
    fn advance_next(&mut self, records: &[Record]) {
        for (i, r) in records.iter().enumerate() {
            let run_goes_on = records
                .get(i + 1)
                .is_some_and(|n| n.partition == r.partition && n.topic == r.topic);
            if run_goes_on {
                continue;
            }
            let tp = TopicPartition {
                topic: r.topic.clone(),
                partition: r.partition,
            };
            if let Some(next) = self.next.get_mut(&tp) {
                *next = (*next).max(r.offset + 1);
            }
        }
    }

    /// Logs a connection event at `warn` once per outage burst, else at `debug`.
    fn log_connection_event(&mut self, e: &RdKafkaError) {
        if self.warned_at.is_none_or(|t| t.elapsed() > Duration::from_secs(10)) {
            warn!(error = %e, "input log: broker connection lost; librdkafka reconnects");
            self.warned_at = Some(std::time::Instant::now());
        } else {
            debug!(error = %e, "input log: broker connection event");
        }
    }

    /// Watermarks, next offset and lag of every assigned partition.
    pub async fn lag(&mut self) -> Result<BTreeMap<TopicPartition, PartitionLag>> {
        let mut out = BTreeMap::new();
        let assigned: Vec<(TopicPartition, i64)> = self.next.iter().map(|(tp, o)| (tp.clone(), *o)).collect();
        for (tp, next) in assigned {
            let watermarks = self.watermarks(&tp).await?;
            out.insert(
                tp,
                PartitionLag {
                    watermarks,
                    next,
                    lag: (watermarks.high - next).max(0) as u64,
                },
            );
        }
        Ok(out)
    }

    /// Total lag over all assigned partitions.
    pub async fn total_lag(&mut self) -> Result<u64> {
        Ok(self.lag().await?.values().map(|l| l.lag).sum())
    }

    /// The next offset this log delivers per assigned partition.
    pub fn next_offsets(&self) -> Position {
        self.next.iter().map(|(tp, o)| (tp.clone(), *o)).collect()
    }
}

#[async_trait]
impl MessageLog for KafkaLog {
    type Error = KafkaError;

    async fn partitions(&mut self) -> Result<Vec<TopicPartition>> {
        if let Some(explicit) = &self.explicit {
            return Ok(explicit.clone());
        }
        let consumer = self.consumer.clone();
        let topics: Vec<Arc<str>> = self.topics.clone();
        let timeout = self.cluster.config().timeout();
        blocking(move || {
            let mut out = Vec::new();
            for topic in topics {
                let n = partition_count(consumer.as_ref(), &topic, timeout)?
                    .ok_or_else(|| KafkaError::UnknownTopic(topic.to_string()))?;
                out.extend((0..n).map(|p| TopicPartition {
                    topic: topic.clone(),
                    partition: p,
                }));
            }
            Ok(out)
        })
        .await
    }

    async fn seek(&mut self, position: &Position) -> Result<()> {
        let mut tpl = TopicPartitionList::new();
        for (tp, offset) in position.iter() {
            tpl.add_partition_offset(&tp.topic, tp.partition, Offset::Offset(offset))
                .map_err(KafkaError::kafka("build the assignment"))?;
        }
        // A fresh assignment discards whatever was fetched for the old one
        // (librdkafka drops messages of an outdated fetch version).
        self.consumer
            .assign(&tpl)
            .map_err(KafkaError::kafka("assign input partitions"))?;
        self.next = position.iter().map(|(tp, o)| (tp.clone(), o)).collect();
        self.deferred = None;
        debug!(%position, "input log assigned");
        Ok(())
    }

    /// Waits up to `timeout` for the first record, then takes whatever else
    /// is already fetched, up to `max`.
    ///
    /// Cancel-safe: a cancelled poll loses no record (rdkafka's message
    /// stream is cancel-safe, and records are moved into the result only
    /// when it is returned).
    async fn poll(&mut self, max: usize, timeout: Duration) -> Result<Vec<Record>> {
        if let Some(e) = self.deferred.take() {
            return Err(e);
        }
        let mut out = Vec::new();
        if self.next.is_empty() || max == 0 {
            tokio::time::sleep(timeout).await;
            return Ok(out);
        }
        let consumer = self.consumer.clone();
        // One stream for the whole batch: `StreamConsumer::recv` registers
        // and unregisters a waker (under a mutex) for every message.
        let mut stream = consumer.stream();
        let deadline = tokio::time::Instant::now() + timeout;
        let first = loop {
            match tokio::time::timeout_at(deadline, stream.next()).await {
                Err(_) | Ok(None) => return Ok(out),
                Ok(Some(Err(e))) if is_transient(&e) => self.log_connection_event(&e),
                Ok(Some(Err(e))) => return Err(self.consume_error(e)),
                Ok(Some(Ok(m))) => break self.record_of(&m),
            }
        };
        out.push(first);
        while out.len() < max {
            match stream.next().now_or_never() {
                None | Some(None) => break,
                Some(Some(Ok(m))) => {
                    let r = self.record_of(&m);
                    out.push(r);
                }
                Some(Some(Err(e))) if is_transient(&e) => break,
                Some(Some(Err(e))) => {
                    self.deferred = Some(self.consume_error(e));
                    break;
                }
            }
        }
        self.advance_next(&out);
        Ok(out)
    }

    async fn watermarks(&mut self, tp: &TopicPartition) -> Result<Watermarks> {
        let consumer = self.consumer.clone();
        let tp = tp.clone();
        let timeout = self.cluster.config().timeout();
        blocking(move || {
            let (low, high) = consumer
                .fetch_watermarks(&tp.topic, tp.partition, timeout)
                .map_err(KafkaError::kafka("fetch watermarks"))?;
            Ok(Watermarks { low, high })
        })
        .await
    }
}

/// Connection-level consumer events: librdkafka reports them while it
/// reconnects and resumes fetching on its own, so `poll` logs them and goes
/// on waiting instead of failing the instance. Anything else (a truncated
/// log, an unknown topic, authorization) is an error.
fn is_transient(e: &RdKafkaError) -> bool {
    matches!(
        e.rdkafka_error_code(),
        Some(
            RDKafkaErrorCode::AllBrokersDown
                | RDKafkaErrorCode::BrokerTransportFailure
                | RDKafkaErrorCode::NetworkException
                | RDKafkaErrorCode::RequestTimedOut
                | RDKafkaErrorCode::OperationTimedOut
                | RDKafkaErrorCode::Resolve
        )
    )
}
