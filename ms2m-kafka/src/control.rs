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
//!
//! # Deleted records
//!
//! Every party folds the whole history, so a history with records missing
//! could name a former owner again. Two reads fail instead of folding
//! what is left:
//!
//! * the next offset to read is below the topic's earliest one (records
//!   deleted before this channel read them: retention, DeleteRecords, the
//!   embedded broker's cap of 5 MiB or 100,000 record batches per
//!   partition): [`KafkaError::ControlHistoryTruncated`];
//! * the topic now ends before records this channel already read (deleted
//!   and created again, or emptied: tansu 0.6.0 reports an emptied
//!   partition as offsets 0..0): [`KafkaError::ControlTopicReset`].
//!
//! A node or host cannot start on such a topic, and says why, until an
//! operator decides (a new control topic means every task starts
//! unowned). The library creates the topic so that nothing expires
//! ([`preflight`](crate::preflight#why-these-topic-settings)). A channel
//! that has read nothing cannot tell a topic emptied on tansu from a new
//! one: both report offsets 0..0.
//!
//! # One consumer per channel
//!
//! Every [`reader`](ControlChannel::reader) of one `KafkaControl` is fed by
//! one consumer that follows the topic's end (started by the first reader),
//! and [`history`](ControlChannel::history) reads only the records after
//! those it read before; calls that arrive while a read runs share the
//! next one. A host of many partitioned tasks shares one
//! channel among their nodes, and each of them takes several readers
//! (view, source, target, coordinator): with a consumer each, the broker
//! answered tens of thousands of empty fetches a second. The follower runs
//! while the channel or any of its readers lives: a reader keeps reading
//! after the channel it came from was dropped.

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
use tokio::sync::{mpsc, OnceCell};
use tracing::warn;

use crate::broker::KafkaCluster;
use crate::config::SetDefault;
use crate::error::{blocking, KafkaError, Result};
use crate::off_runtime::OffRuntime;

/// A [`ControlChannel`] on a single-partition Kafka topic.
pub struct KafkaControl {
    cluster: KafkaCluster,
    topic: String,
    service: String,
    producer: OffRuntime<FutureProducer>,
    skipped: Arc<Skipped>,
    /// The records read so far: each `history()` reads only the tail.
    read: Arc<tokio::sync::Mutex<ReadSoFar>>,
    /// The consumer that feeds every reader, once one was asked for.
    follower: OnceCell<Follower>,
}

/// A record the follower read: its offset and message.
type Followed = (i64, ControlMessage);

/// One consumer at the topic's end, copying each record to every reader.
/// It runs while the channel or any of its readers lives (a reader
/// outlives the channel it came from, as it did with a consumer of its own).
struct Follower {
    readers: Arc<Mutex<Vec<mpsc::UnboundedSender<Followed>>>>,
    /// Dropped with the channel: the follower then stops with its last reader.
    _channel_alive: Arc<()>,
}

/// How often an idle follower checks whether anyone still listens.
const FOLLOWER_CHECK: Duration = Duration::from_secs(1);

/// The decoded prefix of the control topic, and the offset after it.
#[derive(Default)]
struct ReadSoFar {
    records: Vec<ControlMessage>,
    next: i64,
    /// When the latest read that reached the end began (before it asked
    /// for the end).
    last_began: Option<std::time::Instant>,
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
        let mut pc = cluster.library_client_config();
        pc.set("enable.idempotence", "true").set_default("linger.ms", "0");
        let producer: FutureProducer = pc.create().map_err(KafkaError::kafka("create the control producer"))?;
        Ok(Self {
            cluster: cluster.clone(),
            topic,
            service: config.service().to_string(),
            producer: OffRuntime::new(producer, cluster),
            skipped: Arc::default(),
            read: Arc::default(),
            follower: OnceCell::new(),
        })
    }

    /// The control topic.
    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// The records from offset `from` to the end as of now, and the offset
    /// after them (below `from` when the topic ends before it); when the
    /// read was cut short (timeout, error), the records read until then
    /// and why. Fails when the topic starts after `from` (module docs).
    async fn read_from(&self, from: i64) -> Result<(Vec<ControlMessage>, i64, Option<KafkaError>)> {
        let mut cc = self.reader_config("50");
        cc.set("enable.partition.eof", "true");
        let consumer: BaseConsumer = cc.create().map_err(KafkaError::kafka("create a control reader"))?;
        let topic = self.topic.clone();
        let timeout = self.cluster.config().timeout();
        let skipped = self.skipped.clone();
        blocking(move || {
            let (low, high) = consumer
                .fetch_watermarks(&topic, 0, timeout)
                .map_err(KafkaError::kafka("fetch control topic watermarks"))?;
            if low > from {
                return Err(KafkaError::ControlHistoryTruncated {
                    topic,
                    from,
                    earliest: low,
                });
            }
            let mut out = Vec::new();
            if from >= high {
                return Ok((out, high, None));
            }
            let mut tpl = TopicPartitionList::new();
            tpl.add_partition_offset(&topic, 0, Offset::Offset(from))
                .map_err(KafkaError::kafka("assign the control topic"))?;
            consumer
                .assign(&tpl)
                .map_err(KafkaError::kafka("assign the control topic"))?;
            let deadline = std::time::Instant::now() + timeout;
            let mut next = from;
            while next < high {
                if std::time::Instant::now() >= deadline {
                    let cut = KafkaError::Timeout {
                        operation: "read the control history",
                        timeout,
                    };
                    return Ok((out, next, Some(cut)));
                }
                match consumer.poll(Duration::from_millis(100)) {
                    // The end as of the start is the target: an end-of-partition
                    // event before it (a broker answering a fetch with nothing
                    // yet) is not the end of the history. Records of aborted
                    // transactions (the exactly-once probe's) and transaction
                    // markers never reach a `read_committed` reader but move its
                    // position: past them, the end is the position's.
                    None | Some(Err(RdKafkaError::PartitionEOF(_))) => {
                        if position(&consumer, &topic).is_some_and(|p| p >= high) {
                            next = high;
                            break;
                        }
                    }
                    Some(Err(e)) => return Ok((out, next, Some(KafkaError::kafka("read the control history")(e)))),
                    Some(Ok(m)) => {
                        if m.offset() >= high {
                            break;
                        }
                        next = m.offset() + 1;
                        let Some(payload) = m.payload() else { continue };
                        match ControlMessage::from_bytes(payload) {
                            Ok(message) => out.push(message),
                            Err(source) => skipped.record(&topic, m.partition(), m.offset(), source),
                        }
                    }
                }
            }
            Ok((out, next, None))
        })
        .await
    }

    /// How many distinct undecodable records this channel and its readers
    /// have skipped so far (see [the module docs](self)). Non-zero means
    /// another tool or a newer version writes to the control topic.
    pub fn skipped_records(&self) -> u64 {
        self.skipped.count.load(Ordering::Relaxed)
    }
}

/// Reads a [`KafkaControl`] topic in order (records copied from the
/// channel's follower, after the history when it reads from the start).
#[derive(Debug)]
pub struct KafkaControlReader {
    backlog: std::collections::VecDeque<ControlMessage>,
    /// Followed records below this offset were in the backlog or before
    /// the reader's start.
    from: i64,
    records: mpsc::UnboundedReceiver<Followed>,
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

    /// Reads only the records after those this channel read before (the
    /// topic is append-only: never compacted, never deleted, checked at
    /// start; a read that finds records deleted fails, see
    /// [Deleted records](self#deleted-records)), so a host whose many task
    /// nodes each read the history pays for each record once. Concurrent calls share reads: a call that
    /// waited for another read returns that read's result if it began
    /// after the call did (it saw every record acknowledged before), so
    /// calls never queue more than one read deep.
    async fn history(&self) -> Result<Vec<ControlMessage>> {
        Ok(self.history_and_next().await?.0)
    }

    async fn reader(&self, from_start: bool) -> Result<KafkaControlReader> {
        let follower = self.follower.get_or_try_init(|| self.follow()).await?;
        let (tx, rx) = mpsc::unbounded_channel();
        follower.readers.lock().unwrap_or_else(PoisonError::into_inner).push(tx);
        // Subscribed first: every record past the end read below reaches it.
        let (backlog, from) = if from_start {
            self.history_and_next().await?
        } else {
            (Vec::new(), self.end().await?)
        };
        Ok(KafkaControlReader {
            backlog: backlog.into(),
            from,
            records: rx,
        })
    }
}

/// The next offset `consumer` delivers from partition 0 of `topic`.
fn position(consumer: &BaseConsumer, topic: &str) -> Option<i64> {
    match consumer.position().ok()?.find_partition(topic, 0)?.offset() {
        Offset::Offset(p) => Some(p),
        _ => None,
    }
}

impl KafkaControl {
    /// The whole history and the offset after it (the tail read only).
    async fn history_and_next(&self) -> Result<(Vec<ControlMessage>, i64)> {
        let asked = std::time::Instant::now();
        let mut read = self.read.lock().await;
        if read.last_began.is_some_and(|began| began > asked) {
            // A read that began after this call did reached the end while
            // we waited for it: every record acknowledged before this call
            // is in it. Concurrent calls share one read instead of queueing
            // one each (one read is a client, a watermark and a fetch).
            return Ok((read.records.clone(), read.next));
        }
        let began = std::time::Instant::now();
        let from = read.next;
        let (tail, next, cut) = self.read_from(from).await?;
        if next < from {
            return Err(KafkaError::ControlTopicReset {
                topic: self.topic.clone(),
                read: from,
                end: next,
            });
        }
        // Progress is kept when the read was cut short: a long history is
        // read over several calls rather than never.
        read.records.extend(tail);
        read.next = next;
        match cut {
            Some(e) => {
                // What is kept is not the whole history: no waiting call may
                // take it as one.
                read.last_began = None;
                Err(e)
            }
            None => {
                read.last_began = Some(began);
                Ok((read.records.clone(), read.next))
            }
        }
    }

    /// The topic's end (its high watermark).
    async fn end(&self) -> Result<i64> {
        let consumer: BaseConsumer = self
            .reader_config("50")
            .create()
            .map_err(KafkaError::kafka("create a control reader"))?;
        let (topic, timeout) = (self.topic.clone(), self.cluster.config().timeout());
        blocking(move || {
            consumer
                .fetch_watermarks(&topic, 0, timeout)
                .map(|(_, high)| high)
                .map_err(KafkaError::kafka("fetch control topic watermarks"))
        })
        .await
    }

    /// A control consumer's settings: it never joins a group or commits
    /// (`group.id` is required by assign only).
    fn reader_config(&self, fetch_wait_ms: &str) -> rdkafka::ClientConfig {
        let mut cc = self.cluster.library_client_config();
        cc.set(
            "group.id",
            format!("{}.control-reader", self.cluster.config().group_id()),
        )
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "false")
        .set("auto.offset.reset", "earliest")
        .set_default("fetch.wait.max.ms", fetch_wait_ms);
        cc
    }

    /// Starts the follower at the topic's current end.
    async fn follow(&self) -> Result<Follower> {
        // Control messages are few and on the migration's critical path
        // (every hop of the cutover is one of them): fetch without waiting.
        let consumer: StreamConsumer = self
            .reader_config("1")
            .create()
            .map_err(KafkaError::kafka("create a control reader"))?;
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(&self.topic, 0, Offset::Offset(self.end().await?))
            .map_err(KafkaError::kafka("assign the control topic"))?;
        consumer
            .assign(&tpl)
            .map_err(KafkaError::kafka("assign the control topic"))?;
        let readers: Arc<Mutex<Vec<mpsc::UnboundedSender<Followed>>>> = Arc::default();
        let (to, topic, skipped) = (Arc::clone(&readers), self.topic.clone(), Arc::clone(&self.skipped));
        let channel_alive = Arc::new(());
        let alive = Arc::downgrade(&channel_alive);
        tokio::spawn(async move {
            loop {
                let received = match tokio::time::timeout(FOLLOWER_CHECK, consumer.recv()).await {
                    Ok(received) => received,
                    Err(_) => {
                        let mut to = to.lock().unwrap_or_else(PoisonError::into_inner);
                        to.retain(|reader| !reader.is_closed());
                        if to.is_empty() && alive.upgrade().is_none() {
                            break;
                        }
                        continue;
                    }
                };
                let followed = match received {
                    // librdkafka retries by itself: readers see silence
                    // (as in an outage), not one error each.
                    Err(e) => {
                        warn!(error = %e, topic = %topic, "reading the control topic failed; retrying");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                    Ok(m) => {
                        // Tombstones (from a cleanup) carry no message and
                        // undecodable records are not ours to interpret:
                        // skip both (module docs).
                        let Some(payload) = m.payload() else { continue };
                        match ControlMessage::from_bytes(payload) {
                            Ok(message) => (m.offset(), message),
                            Err(source) => {
                                skipped.record(&topic, m.partition(), m.offset(), source);
                                continue;
                            }
                        }
                    }
                };
                let mut to = to.lock().unwrap_or_else(PoisonError::into_inner);
                to.retain(|reader| reader.send(followed.clone()).is_ok());
            }
            // Closing a consumer can block (~100 ms): not on a runtime worker.
            tokio::task::spawn_blocking(move || drop(consumer));
        });
        Ok(Follower {
            readers,
            _channel_alive: channel_alive,
        })
    }
}

#[async_trait]
impl ControlReader for KafkaControlReader {
    type Error = KafkaError;

    async fn next(&mut self, timeout: Duration) -> Result<Option<ControlMessage>> {
        if let Some(m) = self.backlog.pop_front() {
            return Ok(Some(m));
        }
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            match tokio::time::timeout_at(deadline, self.records.recv()).await {
                Err(_) => return Ok(None),
                Ok(None) => return Err(KafkaError::Config("the control channel was dropped".into())),
                Ok(Some((offset, m))) if offset >= self.from => return Ok(Some(m)),
                Ok(Some(_)) => {}
            }
        }
    }
}
