//! Reading raw records and group offsets for the CLI. The backends read
//! their own topics their own way; an operator's tool needs to look at
//! arbitrary ranges (a dead-letter topic, one input record, the first chunk
//! of a snapshot) without joining any group or committing anything.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use ms2m_core::Watermarks;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError as RdKafkaError;
use rdkafka::message::Headers;
use rdkafka::{Message, Offset, TopicPartitionList};
use serde::Serialize;

use crate::broker::learn_leaders;
use crate::error::{blocking, KafkaError, Result};
use crate::KafkaCluster;

/// One record as stored.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RawRecord {
    /// Partition.
    pub partition: i32,
    /// Offset.
    pub offset: i64,
    /// Key.
    pub key: Option<Vec<u8>>,
    /// Payload (`None`: a tombstone).
    pub payload: Option<Vec<u8>>,
    /// Headers in order (a header without a value has an empty one).
    pub headers: Vec<(String, Vec<u8>)>,
}

impl RawRecord {
    /// The first header named `name`.
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_slice())
    }

    /// The first header named `name`, as text.
    pub fn header_str(&self, name: &str) -> Option<&str> {
        self.header(name).and_then(|v| std::str::from_utf8(v).ok())
    }
}

/// A consumer that only reads assigned ranges: it never joins its group
/// and never commits (`group.id` is required by librdkafka's assign).
fn reader(cluster: &KafkaCluster, group: &str) -> Result<BaseConsumer> {
    let mut c = cluster.library_client_config();
    c.set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "true")
        .set("auto.offset.reset", "earliest");
    c.create().map_err(KafkaError::kafka("create a reader"))
}

/// Watermarks of every partition of `topic` (which must exist).
pub async fn watermarks(cluster: &KafkaCluster, topic: &str) -> Result<BTreeMap<i32, Watermarks>> {
    let partitions = cluster
        .partition_count(topic)
        .await?
        .ok_or_else(|| KafkaError::UnknownTopic(topic.to_string()))?;
    let consumer = reader(cluster, "ms2m-cli")?;
    let (topic, timeout) = (topic.to_string(), cluster.config().timeout());
    blocking(move || {
        learn_leaders(&consumer, &topic, timeout, "fetch metadata")?;
        (0..partitions)
            .map(|p| {
                let (low, high) = consumer
                    .fetch_watermarks(&topic, p, timeout)
                    .map_err(KafkaError::kafka("fetch watermarks"))?;
                Ok((p, Watermarks { low, high }))
            })
            .collect()
    })
    .await
}

/// Every record of `topic` from each partition's start to its end.
pub async fn read_topic(cluster: &KafkaCluster, topic: &str) -> Result<Vec<RawRecord>> {
    let ranges = watermarks(cluster, topic)
        .await?
        .into_iter()
        .map(|(p, w)| (p, w.low, w.high))
        .collect();
    read_ranges(cluster, topic, ranges).await
}

/// The record at `topic/partition@offset`, if it is stored.
pub async fn read_one(cluster: &KafkaCluster, topic: &str, partition: i32, offset: i64) -> Result<Option<RawRecord>> {
    let records = read_ranges(cluster, topic, vec![(partition, offset, offset + 1)]).await?;
    Ok(records
        .into_iter()
        .find(|r| r.partition == partition && r.offset == offset))
}

/// The records of `topic` in each `(partition, from, to)` range (`to`
/// exclusive), in offset order per partition. Offsets below a partition's
/// start, and past its end, are simply not returned.
pub async fn read_ranges(cluster: &KafkaCluster, topic: &str, ranges: Vec<(i32, i64, i64)>) -> Result<Vec<RawRecord>> {
    let ranges: Vec<_> = ranges.into_iter().filter(|(_, from, to)| from < to).collect();
    if ranges.is_empty() {
        return Ok(Vec::new());
    }
    let consumer = reader(cluster, "ms2m-cli")?;
    let (topic, timeout) = (topic.to_string(), cluster.config().timeout());
    blocking(move || read_blocking(&consumer, &topic, &ranges, timeout)).await
}

fn read_blocking(
    consumer: &BaseConsumer,
    topic: &str,
    ranges: &[(i32, i64, i64)],
    timeout: Duration,
) -> Result<Vec<RawRecord>> {
    let mut tpl = TopicPartitionList::new();
    let mut open: BTreeMap<i32, i64> = BTreeMap::new();
    for &(p, from, to) in ranges {
        tpl.add_partition_offset(topic, p, Offset::Offset(from))
            .map_err(KafkaError::kafka("assign a range"))?;
        open.insert(p, to);
    }
    consumer.assign(&tpl).map_err(KafkaError::kafka("assign a range"))?;
    let mut out = Vec::new();
    let mut last_progress = Instant::now();
    while !open.is_empty() {
        if last_progress.elapsed() >= timeout {
            return Err(KafkaError::Timeout {
                operation: "read records",
                timeout,
            });
        }
        match consumer.poll(Duration::from_millis(100)) {
            None => {}
            Some(Err(RdKafkaError::PartitionEOF(p))) => {
                open.remove(&p);
            }
            Some(Err(e)) => return Err(KafkaError::kafka("read records")(e)),
            Some(Ok(m)) => {
                last_progress = Instant::now();
                let Some(&to) = open.get(&m.partition()) else { continue };
                if m.offset() + 1 >= to {
                    open.remove(&m.partition());
                }
                if m.offset() < to {
                    out.push(raw(&m));
                }
            }
        }
    }
    let _ = consumer.unassign();
    Ok(out)
}

fn raw(m: &impl Message) -> RawRecord {
    let headers = m
        .headers()
        .map(|h| {
            h.iter()
                .map(|h| (h.key.to_string(), h.value.map(<[u8]>::to_vec).unwrap_or_default()))
                .collect()
        })
        .unwrap_or_default();
    RawRecord {
        partition: m.partition(),
        offset: m.offset(),
        key: m.key().map(<[u8]>::to_vec),
        payload: m.payload().map(<[u8]>::to_vec),
        headers,
    }
}

/// The offsets `group` committed for each partition of `topic` (`None`:
/// nothing committed).
pub async fn committed(
    cluster: &KafkaCluster,
    group: &str,
    topic: &str,
    partitions: &[i32],
) -> Result<BTreeMap<i32, Option<i64>>> {
    let consumer = reader(cluster, group)?;
    let mut tpl = TopicPartitionList::new();
    for &p in partitions {
        tpl.add_partition(topic, p);
    }
    let timeout = cluster.config().timeout();
    blocking(move || {
        let list = consumer
            .committed_offsets(tpl, timeout)
            .map_err(KafkaError::kafka("read the group's committed offsets"))?;
        Ok(list
            .elements()
            .iter()
            .map(|e| {
                let offset = match e.offset() {
                    Offset::Offset(o) => Some(o),
                    _ => None,
                };
                (e.partition(), offset)
            })
            .collect())
    })
    .await
}
