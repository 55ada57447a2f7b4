//! Plain rdkafka plumbing: filling input topics, reading watermarks, and
//! the hand-written loops ms2m is compared against. Nothing here uses
//! ms2m's own Kafka code apart from [`KafkaCluster::client_config`] (the
//! broker address) and topic creation.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use ms2m_core::{Position, TopicPartition};
use ms2m_kafka::KafkaCluster;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};

use crate::services::work;
use crate::BoxError;

const TIMEOUT: Duration = Duration::from_secs(30);

/// A payload of `size` bytes (at least 8) starting with `i` little-endian.
pub fn payload(i: u64, size: usize) -> Vec<u8> {
    let mut p = vec![0u8; size.max(8)];
    p[..8].copy_from_slice(&i.to_le_bytes());
    p
}

/// Waits for every delivery report. (`BaseProducer::flush` in rdkafka 0.39
/// sleeps in `poll` for up to 100 ms between flush attempts, which measured
/// ~100 ms per call here: fine once, not per commit.)
pub fn wait_delivered(producer: &BaseProducer) -> Result<(), BoxError> {
    let deadline = Instant::now() + TIMEOUT;
    while producer.in_flight_count() > 0 {
        if Instant::now() > deadline {
            return Err("deliveries timed out".into());
        }
        producer.poll(Duration::from_millis(1));
    }
    Ok(())
}

/// A producer tuned for bulk loading.
pub fn bulk_producer(cluster: &KafkaCluster) -> Result<BaseProducer, BoxError> {
    Ok(cluster
        .client_config()
        .set("linger.ms", "5")
        .set("batch.num.messages", "10000")
        .set("queue.buffering.max.messages", "1000000")
        .set("queue.buffering.max.kbytes", "1048576")
        .create()?)
}

/// Sends with retries while the local queue is full.
pub fn send_retrying(producer: &BaseProducer, mut record: BaseRecord<'_, [u8], [u8]>) -> Result<(), BoxError> {
    loop {
        match producer.send(record) {
            Ok(()) => return Ok(()),
            Err((rdkafka::error::KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                record = r;
                producer.poll(Duration::from_millis(5));
            }
            Err((e, _)) => return Err(e.into()),
        }
    }
}

/// Appends `n` messages of `size` bytes to `topic`, round-robin over its
/// `partitions`, numbered from `first`; returns the topic's end position.
pub async fn fill(
    cluster: &KafkaCluster,
    topic: &str,
    partitions: i32,
    first: u64,
    n: u64,
    size: usize,
) -> Result<Position, BoxError> {
    let producer = bulk_producer(cluster)?;
    let t = topic.to_string();
    tokio::task::spawn_blocking(move || -> Result<(), BoxError> {
        for i in first..first + n {
            let p = payload(i, size);
            let part = (i % partitions as u64) as i32;
            send_retrying(&producer, BaseRecord::to(&t).partition(part).payload(&p[..]))?;
            if i % 1000 == 0 {
                producer.poll(Duration::ZERO);
            }
        }
        producer.flush(TIMEOUT)?;
        Ok(())
    })
    .await??;
    end_position(cluster, topic, partitions).await
}

/// The high watermark of every partition of `topic`.
pub async fn end_position(cluster: &KafkaCluster, topic: &str, partitions: i32) -> Result<Position, BoxError> {
    let consumer: BaseConsumer = cluster.client_config().create()?;
    let t = topic.to_string();
    tokio::task::spawn_blocking(move || -> Result<Position, BoxError> {
        let mut end = Position::new();
        for p in 0..partitions {
            let (_, high) = consumer.fetch_watermarks(&t, p, TIMEOUT)?;
            end.set(TopicPartition::new(t.as_str(), p), high);
        }
        Ok(end)
    })
    .await?
}

/// A consumer configured like ms2m's input log (manual assignment, no
/// auto commit, read_committed, `fetch.wait.max.ms=10`,
/// `fetch.queue.backoff.ms=10`).
pub fn consumer(cluster: &KafkaCluster, group: &str) -> Result<BaseConsumer, BoxError> {
    Ok(consumer_config(cluster, group).create()?)
}

fn consumer_config(cluster: &KafkaCluster, group: &str) -> ClientConfig {
    let mut cc = cluster.client_config();
    cc.set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("enable.partition.eof", "false")
        .set("auto.offset.reset", "error")
        .set("isolation.level", "read_committed")
        .set("fetch.wait.max.ms", "10")
        .set("fetch.queue.backoff.ms", "10");
    cc
}

/// End offset per (topic, partition) still to be reached.
type Ends = HashMap<(String, i32), i64>;

fn assignment(end: &Position) -> Result<(TopicPartitionList, Ends), BoxError> {
    let mut tpl = TopicPartitionList::new();
    let mut ends = HashMap::new();
    for (tp, high) in end.iter() {
        if high > 0 {
            // Explicit offsets, as ms2m seeks: a logical offset (`Beginning`)
            // costs librdkafka an extra ListOffsets round trip (~0.5 s on
            // the mock). The benchmark topics are fresh and sized so that
            // nothing is evicted; `auto.offset.reset=error` would say so.
            tpl.add_partition_offset(&tp.topic, tp.partition, Offset::Offset(0))?;
            ends.insert((tp.topic.to_string(), tp.partition), high);
        }
    }
    Ok((tpl, ends))
}

/// What a raw loop did.
#[derive(Clone, Copy, Debug)]
pub struct RawRun {
    /// Messages processed.
    pub messages: u64,
    /// Checksum of the work (must equal ms2m's).
    pub sum: u64,
    /// Wall time from assignment to the last message (and its commit).
    pub elapsed: Duration,
}

/// The B2 baseline: a `BaseConsumer` loop reading every partition from the
/// beginning to `end`, doing the trivial work per message.
///
/// Like `Instance::restore` (which lists the partitions and reads their
/// watermarks before it seeks), the consumer learns the topic's metadata
/// before the clock starts; the loop itself allocates nothing per message.
pub async fn raw_replay(cluster: &KafkaCluster, group: &str, end: &Position) -> Result<RawRun, BoxError> {
    let consumer = consumer(cluster, group)?;
    let (tpl, ends) = assignment(end)?;
    let mut ends: Vec<(String, i32, i64)> = ends.into_iter().map(|((t, p), e)| (t, p, e)).collect();
    tokio::task::spawn_blocking(move || -> Result<RawRun, BoxError> {
        for (topic, _, _) in &ends {
            consumer.fetch_metadata(Some(topic), TIMEOUT)?;
        }
        let (mut count, mut sum) = (0u64, 0u64);
        let started = Instant::now();
        consumer.assign(&tpl)?;
        while !ends.is_empty() {
            // The deadline is read only when a poll comes back empty: a
            // clock read per message would slow the baseline (it is about
            // 5% of this loop's time on a VM's clock).
            let Some(m) = consumer.poll(Duration::from_millis(100)) else {
                if started.elapsed() > TIMEOUT * 4 {
                    return Err("raw replay timed out".into());
                }
                continue;
            };
            let m = m?;
            work(&mut count, &mut sum, m.payload().unwrap_or_default());
            let (partition, next) = (m.partition(), m.offset() + 1);
            if let Some(i) = ends
                .iter()
                .position(|(t, p, e)| *p == partition && next >= *e && t == m.topic())
            {
                ends.swap_remove(i);
            }
        }
        Ok(RawRun {
            messages: count,
            sum,
            elapsed: started.elapsed(),
        })
    })
    .await?
}

/// The B3 baseline: consume → work → produce the payload to `output` →
/// every 1,000 messages or 100 ms wait for every delivery and commit the
/// consumed offsets (at-least-once, the same policy as ms2m's default).
pub async fn raw_live(cluster: &KafkaCluster, group: &str, output: &str, end: &Position) -> Result<RawRun, BoxError> {
    let consumer = consumer(cluster, group)?;
    let producer: BaseProducer = cluster
        .client_config()
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "5")
        .create()?;
    let (tpl, ends) = assignment(end)?;
    let mut ends: Vec<(String, i32, i64)> = ends.into_iter().map(|((t, p), e)| (t, p, e)).collect();
    let output = output.to_string();
    tokio::task::spawn_blocking(move || -> Result<RawRun, BoxError> {
        let (mut count, mut sum) = (0u64, 0u64);
        // Next offset per partition consumed so far.
        let mut next: Vec<(String, i32, i64)> = Vec::new();
        let commit = |next: &[(String, i32, i64)]| -> Result<(), BoxError> {
            wait_delivered(&producer)?;
            let mut offsets = TopicPartitionList::new();
            for (t, p, o) in next {
                offsets.add_partition_offset(t, *p, Offset::Offset(*o))?;
            }
            if offsets.count() > 0 {
                consumer.commit(&offsets, CommitMode::Sync)?;
            }
            Ok(())
        };
        let started = Instant::now();
        consumer.assign(&tpl)?;
        let (mut since_commit, mut last_commit) = (0u64, Instant::now());
        while !ends.is_empty() {
            // Nothing per message allocates, and the clock is read once
            // every 100 messages or after an empty poll (a per-message
            // read is a measurable share of a loop this tight).
            let Some(m) = consumer.poll(Duration::from_millis(100)) else {
                if started.elapsed() > TIMEOUT * 4 {
                    return Err("raw live loop timed out".into());
                }
                if since_commit > 0 && last_commit.elapsed() >= Duration::from_millis(100) {
                    commit(&next)?;
                    (since_commit, last_commit) = (0, Instant::now());
                }
                continue;
            };
            let m = m?;
            let p = m.payload().unwrap_or_default();
            work(&mut count, &mut sum, p);
            let mut record = BaseRecord::<[u8], [u8]>::to(&output).payload(p);
            if let Some(k) = m.key() {
                record = record.key(k);
            }
            send_retrying(&producer, record)?;
            producer.poll(Duration::ZERO);
            let (partition, offset) = (m.partition(), m.offset() + 1);
            match next.iter_mut().find(|(t, p, _)| *p == partition && t == m.topic()) {
                Some((_, _, o)) => *o = offset,
                None => next.push((m.topic().to_string(), partition, offset)),
            }
            if let Some(i) = ends
                .iter()
                .position(|(t, p, e)| *p == partition && offset >= *e && t == m.topic())
            {
                ends.swap_remove(i);
            }
            since_commit += 1;
            let due = since_commit >= 1000
                || (since_commit % 100 == 0 && last_commit.elapsed() >= Duration::from_millis(100));
            if due {
                commit(&next)?;
                (since_commit, last_commit) = (0, Instant::now());
            }
        }
        commit(&next)?;
        Ok(RawRun {
            messages: count,
            sum,
            elapsed: started.elapsed(),
        })
    })
    .await?
}
