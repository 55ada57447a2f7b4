//! [`KafkaControl`]: the migration control channel on a topic.
//!
//! Topic `{service}.control`, one partition (one total order of the
//! migration's messages), key `{service}/{migration_id}`, value
//! [`ControlMessage::to_bytes`] (JSON). `publish` returns once the broker
//! acknowledged the message, so a restarted coordinator reading the topic
//! from the start sees every message that was published.
//!
//! # Undecodable records
//!
//! A record whose value does not decode as a [`ControlMessage`] (garbage
//! written by another tool, or a [`ControlBody`](ms2m_core::ControlBody)
//! variant added by a newer version during a rolling upgrade) is skipped by
//! [`history`](ControlChannel::history) and by every reader: the records
//! around it are returned in order and the read does not fail. Such a record
//! never decides anything (no migration outcome, no owner), because no
//! party that cannot decode it ever sees it; a newer version must therefore
//! not rely on a new variant for a decision older parties have to see until
//! every party is upgraded. Each skipped record is logged once per channel,
//! at `warn`, with its topic, partition, offset and decode error
//! ([`KafkaError::ControlDecode`]), and counted once:
//! [`KafkaControl::skipped_records`] is shared by the channel and its
//! readers. Records without a value (tombstones) are skipped silently.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use ms2m_core::{ControlChannel, ControlMessage, ControlReader};
use rdkafka::consumer::{BaseConsumer, Consumer, StreamConsumer};
use rdkafka::error::KafkaError as RdKafkaError;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::util::Timeout;
use rdkafka::{Message, Offset, TopicPartitionList};
use tracing::warn;

use crate::broker::KafkaCluster;
use crate::config::SetDefault;
use crate::error::{blocking, KafkaError, Result};

/// A [`ControlChannel`] on a single-partition Kafka topic.
pub struct KafkaControl {
    cluster: KafkaCluster,
    topic: String,
    service: String,
    producer: FutureProducer,
    skipped: Arc<Skipped>,
}

impl std::fmt::Debug for KafkaControl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaControl")
            .field("topic", &self.topic)
            .field("service", &self.service)
            .field("skipped_records", &self.skipped_records())
            .finish_non_exhaustive()
    }
}

/// The undecodable records a channel and its readers have skipped, by
/// `(partition, offset)`: each is logged and counted once, however often
/// it is read.
#[derive(Debug, Default)]
struct Skipped {
    seen: Mutex<BTreeSet<(i32, i64)>>,
    count: AtomicU64,
}

impl Skipped {
    /// Notes an undecodable record; warns the first time it is seen.
    fn record(&self, topic: &str, partition: i32, offset: i64, source: serde_json::Error) {
        let first = self
            .seen
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert((partition, offset));
        if !first {
            return;
        }
        let total = self.count.fetch_add(1, Ordering::Relaxed) + 1;
        let cause = source.to_string();
        let error = KafkaError::ControlDecode {
            topic: topic.to_string(),
            partition,
            offset,
            source,
        };
        warn!(
            topic,
            partition,
            offset,
            error = %error,
            cause = %cause,
            skipped_total = total,
            "control channel: skipping an undecodable record (garbage, or a message from a newer version)"
        );
    }
}

impl KafkaControl {
    /// The control channel of the cluster's service; creates its topic
    /// (one partition, every record kept) if missing, and refuses one that
    /// has more partitions or can delete records
    /// ([`preflight`](crate::preflight)).
    pub async fn new(cluster: &KafkaCluster) -> Result<Self> {
        let config = cluster.config();
        let topic = crate::preflight::ensure_control_topic(cluster).await?;
        let mut pc = cluster.client_config();
        pc.set("enable.idempotence", "true").set_default("linger.ms", "0");
        let producer: FutureProducer = pc.create().map_err(KafkaError::kafka("create the control producer"))?;
        Ok(Self {
            cluster: cluster.clone(),
            topic,
            service: config.service().to_string(),
            producer,
            skipped: Arc::default(),
        })
    }

    /// The control topic.
    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// How many distinct undecodable records this channel and its readers
    /// have skipped so far (see [the module docs](self)). Non-zero means
    /// another tool or a newer version writes to the control topic.
    pub fn skipped_records(&self) -> u64 {
        self.skipped.count.load(Ordering::Relaxed)
    }
}

/// Reads a [`KafkaControl`] topic in order.
pub struct KafkaControlReader {
    consumer: Arc<StreamConsumer>,
    topic: String,
    skipped: Arc<Skipped>,
}

impl std::fmt::Debug for KafkaControlReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaControlReader")
            .field("topic", &self.topic)
            .finish_non_exhaustive()
    }
}

#[async_trait]
impl ControlChannel for KafkaControl {
    type Error = KafkaError;
    type Reader = KafkaControlReader;

    async fn publish(&self, message: &ControlMessage) -> Result<()> {
        let key = format!("{}/{}", message.service, message.migration_id);
        let payload = message.to_bytes();
        let record = FutureRecord::to(&self.topic).partition(0).key(&key).payload(&payload);
        self.producer
            .send(record, Timeout::After(self.cluster.config().timeout()))
            .await
            .map_err(|(e, _)| KafkaError::kafka("publish a control message")(e))?;
        Ok(())
    }

    async fn history(&self) -> Result<Vec<ControlMessage>> {
        let mut cc = self.cluster.client_config();
        cc.set(
            "group.id",
            format!("{}.control-reader", self.cluster.config().group_id()),
        )
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "true")
        .set("auto.offset.reset", "earliest")
        .set_default("fetch.wait.max.ms", "50");
        let consumer: BaseConsumer = cc.create().map_err(KafkaError::kafka("create a control reader"))?;
        let topic = self.topic.clone();
        let timeout = self.cluster.config().timeout();
        let skipped = self.skipped.clone();
        blocking(move || {
            let (low, high) = consumer
                .fetch_watermarks(&topic, 0, timeout)
                .map_err(KafkaError::kafka("fetch control topic watermarks"))?;
            let mut out = Vec::new();
            if low >= high {
                return Ok(out);
            }
            let mut tpl = TopicPartitionList::new();
            tpl.add_partition_offset(&topic, 0, Offset::Offset(low))
                .map_err(KafkaError::kafka("assign the control topic"))?;
            consumer
                .assign(&tpl)
                .map_err(KafkaError::kafka("assign the control topic"))?;
            let deadline = std::time::Instant::now() + timeout;
            let mut next = low;
            while next < high {
                if std::time::Instant::now() >= deadline {
                    return Err(KafkaError::Timeout {
                        operation: "read the control history",
                        timeout,
                    });
                }
                match consumer.poll(Duration::from_millis(100)) {
                    None => {}
                    Some(Err(RdKafkaError::PartitionEOF(_))) => break,
                    Some(Err(e)) => return Err(KafkaError::kafka("read the control history")(e)),
                    Some(Ok(m)) => {
                        next = m.offset() + 1;
                        if m.offset() >= high {
                            break;
                        }
                        let Some(payload) = m.payload() else { continue };
                        match ControlMessage::from_bytes(payload) {
                            Ok(message) => out.push(message),
                            Err(source) => skipped.record(&topic, m.partition(), m.offset(), source),
                        }
                    }
                }
            }
            Ok(out)
        })
        .await
    }

    async fn reader(&self, from_start: bool) -> Result<KafkaControlReader> {
        let mut cc = self.cluster.client_config();
        // group.id is required by assign; this consumer never joins or commits.
        cc.set(
            "group.id",
            format!("{}.control-reader", self.cluster.config().group_id()),
        )
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "false")
        .set("auto.offset.reset", "earliest")
        // Control messages are few and on the migration's critical path
        // (every hop of the cutover is one of them): fetch without waiting.
        .set_default("fetch.wait.max.ms", "1");
        let consumer: StreamConsumer = cc.create().map_err(KafkaError::kafka("create a control reader"))?;
        let consumer = Arc::new(consumer);
        let c = consumer.clone();
        let topic = self.topic.clone();
        let timeout = self.cluster.config().timeout();
        let (low, high) = blocking(move || {
            c.fetch_watermarks(&topic, 0, timeout)
                .map_err(KafkaError::kafka("fetch control topic watermarks"))
        })
        .await?;
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(&self.topic, 0, Offset::Offset(if from_start { low } else { high }))
            .map_err(KafkaError::kafka("assign the control topic"))?;
        consumer
            .assign(&tpl)
            .map_err(KafkaError::kafka("assign the control topic"))?;
        Ok(KafkaControlReader {
            consumer,
            topic: self.topic.clone(),
            skipped: self.skipped.clone(),
        })
    }
}

#[async_trait]
impl ControlReader for KafkaControlReader {
    type Error = KafkaError;

    async fn next(&mut self, timeout: Duration) -> Result<Option<ControlMessage>> {
        let deadline = tokio::time::Instant::now() + timeout;
        // Tombstones (from a cleanup) carry no message and undecodable
        // records are not ours to interpret: skip both (module docs).
        loop {
            let m = match tokio::time::timeout_at(deadline, self.consumer.recv()).await {
                Err(_) => return Ok(None),
                Ok(r) => r.map_err(KafkaError::kafka("read the control topic"))?,
            };
            let Some(payload) = m.payload() else { continue };
            match ControlMessage::from_bytes(payload) {
                Ok(message) => return Ok(Some(message)),
                Err(source) => self.skipped.record(&self.topic, m.partition(), m.offset(), source),
            }
        }
    }
}
