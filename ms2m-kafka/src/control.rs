//! [`KafkaControl`]: the migration control channel on a topic.
//!
//! Topic `{service}.control`, one partition (one total order of the
//! migration's messages), key `{service}/{migration_id}`, value
//! [`ControlMessage::to_bytes`] (JSON). `publish` returns once the broker
//! acknowledged the message, so a restarted coordinator reading the topic
//! from the start sees every message that was published.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use ms2m_core::{ControlChannel, ControlMessage, ControlReader};
use rdkafka::consumer::{BaseConsumer, Consumer, StreamConsumer};
use rdkafka::error::KafkaError as RdKafkaError;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::util::Timeout;
use rdkafka::{Message, Offset, TopicPartitionList};

use crate::broker::KafkaCluster;
use crate::config::SetDefault;
use crate::error::{blocking, KafkaError, Result};

/// A [`ControlChannel`] on a single-partition Kafka topic.
pub struct KafkaControl {
    cluster: KafkaCluster,
    topic: String,
    service: String,
    producer: FutureProducer,
}

impl std::fmt::Debug for KafkaControl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaControl")
            .field("topic", &self.topic)
            .field("service", &self.service)
            .finish_non_exhaustive()
    }
}

impl KafkaControl {
    /// The control channel of the cluster's service; creates its topic
    /// (one partition) if missing.
    pub async fn new(cluster: &KafkaCluster) -> Result<Self> {
        let config = cluster.config();
        let topic = config.control_topic();
        if cluster.partition_count(&topic).await?.is_none() {
            cluster.create_topic(&topic, 1, &[]).await?;
        }
        let mut pc = cluster.client_config();
        pc.set("enable.idempotence", "true").set_default("linger.ms", "0");
        let producer: FutureProducer = pc.create().map_err(KafkaError::kafka("create the control producer"))?;
        Ok(Self {
            cluster: cluster.clone(),
            topic,
            service: config.service().to_string(),
            producer,
        })
    }

    /// The control topic.
    pub fn topic(&self) -> &str {
        &self.topic
    }
}

/// Reads a [`KafkaControl`] topic in order.
pub struct KafkaControlReader {
    consumer: Arc<StreamConsumer>,
    topic: String,
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
                        out.push(
                            ControlMessage::from_bytes(payload).map_err(|source| KafkaError::ControlDecode {
                                topic: topic.clone(),
                                partition: 0,
                                offset: m.offset(),
                                source,
                            })?,
                        );
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
        })
    }
}

#[async_trait]
impl ControlReader for KafkaControlReader {
    type Error = KafkaError;

    async fn next(&mut self, timeout: Duration) -> Result<Option<ControlMessage>> {
        let deadline = tokio::time::Instant::now() + timeout;
        // Tombstones (from a cleanup) carry no message: skip them.
        loop {
            let m = match tokio::time::timeout_at(deadline, self.consumer.recv()).await {
                Err(_) => return Ok(None),
                Ok(r) => r.map_err(KafkaError::kafka("read the control topic"))?,
            };
            let Some(payload) = m.payload() else { continue };
            let message = ControlMessage::from_bytes(payload).map_err(|source| KafkaError::ControlDecode {
                topic: self.topic.clone(),
                partition: m.partition(),
                offset: m.offset(),
                source,
            })?;
            return Ok(Some(message));
        }
    }
}
