//! [`KafkaLog`]: the input log over a fixed set of Kafka partitions.
//!
//! * Partitions are **assigned** manually (`assign`, never `subscribe`):
//!   no consumer-group rebalance can take a partition from under a running
//!   instance. `group.id` is set (to the service's group) but the consumer
//!   never joins the group and never commits; committed offsets are the
//!   sink's business.
//! * `seek` re-assigns every partition at an explicit offset; a seek to
//!   where the log already stands, with nothing polled since, keeps the
//!   assignment and what librdkafka fetched for it. A migration target
//!   seeks as soon as it has read the snapshot's header, so librdkafka
//!   fetches the input's tail (up to `queued.min.messages` records and
//!   `queued.max.messages.kbytes`) while the snapshot transfers, and the
//!   catch-up replay reads it locally.
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
//! * Records are delivered in offset order per partition; topic names are
//!   shared `Arc<str>`s, and the keys and payloads of the records one poll
//!   (or one prefetched batch) takes share one buffer (below).
//! * Per message the cost is librdkafka's queue pop and message destroy
//!   (as in any rdkafka loop), the header parse (librdkafka allocates,
//!   reads and frees a buffer per message even when it has no headers; see
//!   [`KafkaConfig::input_headers`](crate::KafkaConfig::input_headers)) and
//!   copying key and payload; everything else (waker registration,
//!   next-offset bookkeeping) happens once per poll or once per run of
//!   records from one partition.
//! * During catch-up the consumer side of that cost is taken off the apply
//!   loop: a poll that returns a full batch starts a prefetch on the
//!   blocking pool, which takes already-fetched messages (it never waits)
//!   batch after batch while they come full, and the following polls
//!   return its batches. It holds at most two batches (one handed over, one
//!   being taken). Only one task polls the consumer at a time (a poll waits
//!   for the prefetch's next batch or its end, a seek stops and joins it
//!   first), so order and exact offsets are kept and a seek never mixes in
//!   records of the old assignment.
//! * Keys and payloads are copied out of librdkafka's messages into one
//!   buffer per batch, and the records are handed out with slices of it:
//!   one allocation per batch instead of an allocation and a free per
//!   record on the applying task (benchmark B2: about 0.06 of the ratio).
//!   The buffer lives as long as any record of the batch; the
//!   [`Raw`](ms2m_core::codec::Raw) format hands the service its own copy, and
//!   [`Record`]'s docs say how to keep one. When the assigned partitions
//!   share a topic, a staged message does not name it, so a prefetch never
//!   touches the name's reference count.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::{FutureExt, StreamExt};
use ms2m_core::{MessageLog, Position, Record, TopicPartition, Watermarks};
use rdkafka::consumer::{Consumer, MessageStream, StreamConsumer};
use rdkafka::error::{KafkaError as RdKafkaError, RDKafkaErrorCode};
use rdkafka::message::{BorrowedMessage, Headers};
use rdkafka::{Message, Offset, TopicPartitionList};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tracing::{debug, warn};

use crate::broker::{learn_leaders, partition_count, KafkaCluster};
use crate::config::SetDefault;
use crate::error::{blocking, KafkaError, Result};
use crate::off_runtime::OffRuntime;
use crate::telemetry::ClientTelemetry;

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
    consumer: OffRuntime<Arc<StreamConsumer<ClientTelemetry>>>,
    cluster: KafkaCluster,
    explicit: Option<Vec<TopicPartition>>,
    /// Turns messages into records (here and in prefetch tasks).
    records: RecordBuilder,
    /// Next offset to deliver per assigned partition.
    next: BTreeMap<TopicPartition, i64>,
    /// An error met after records were already taken in the same poll;
    /// returned by the next poll so no record is lost.
    deferred: Option<KafkaError>,
    /// When a connection event was last logged at `warn` (one per outage
    /// burst; librdkafka reports each outage several times per client).
    warned_at: Option<std::time::Instant>,
    /// Records taken off the consumer by a prefetch, not delivered yet.
    ready: Vec<Record>,
    /// A prefetch taking records off the consumer on the blocking pool
    /// while the caller applies the previous batches.
    prefetch: Option<Prefetch>,
    /// The position of the last seek while nothing has been polled since:
    /// a seek there again keeps what librdkafka fetched meanwhile.
    unread_seek: Option<Position>,
    /// Whether this consumer has fetched the input topics' metadata (listing
    /// their partitions, or before its first watermark read, which
    /// otherwise could wait for librdkafka's own leader query: see
    /// `learn_leaders`).
    leaders_known: bool,
}

/// A blocking task taking already-fetched records off the consumer, batch
/// after batch, for as long as they come full.
struct Prefetch {
    /// Its batches in order, each with the error that stopped the task
    /// (after that batch's records), if one did. Holds one batch at most.
    batches: mpsc::Receiver<(StagedBatch, Option<RdKafkaError>)>,
    task: JoinHandle<()>,
}

/// Messages taken off the consumer, not yet records: the polling task
/// turns them into [`Record`]s (see [`StagedBatch::into_records`]).
struct StagedBatch {
    /// The topic every assigned partition shares, if they share one: then
    /// no entry names its topic (and a prefetch never touches the name's
    /// reference count).
    shared_topic: Option<Arc<str>>,
    entries: Vec<StagedRecord>,
    /// Every key and payload of the batch, one after the other.
    bodies: Vec<u8>,
}

/// What is kept of one message until it becomes a [`Record`].
struct StagedRecord {
    /// Its topic, when the batch has no shared one.
    topic: Option<Arc<str>>,
    partition: i32,
    offset: i64,
    timestamp_ms: Option<i64>,
    key: Option<Span>,
    payload: Option<Span>,
    headers: Vec<(String, Bytes)>,
}

/// A byte range of [`StagedBatch::bodies`].
type Span = std::ops::Range<usize>;

/// Turns consumed messages into [`Record`]s.
#[derive(Clone, Debug)]
struct RecordBuilder {
    /// Topic names handed out in records, so each record shares one
    /// allocation (the same one the log's partitions and positions use).
    topics: Arc<[Arc<str>]>,
    /// Whether records carry the messages' headers
    /// ([`KafkaConfig::input_headers`](crate::KafkaConfig::input_headers)).
    read_headers: bool,
    /// The topic of every assigned partition when they share one (the
    /// usual case): then no message's topic name is read and compared.
    assigned_topic: Option<Arc<str>>,
}

impl std::fmt::Debug for KafkaLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaLog")
            .field("topics", &self.records.topics)
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
        let mut cc = cluster.library_client_config();
        cc.set("group.id", config.group_id())
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("enable.partition.eof", "false")
            .set("auto.offset.reset", "error")
            .set("isolation.level", "read_committed")
            .set_default("fetch.wait.max.ms", "10")
            .set_default("fetch.queue.backoff.ms", "10")
            .set_default("allow.auto.create.topics", "false");
        let context = ClientTelemetry::new(config.service(), "log");
        let consumer: StreamConsumer<ClientTelemetry> = cc
            .create_with_context(context)
            .map_err(KafkaError::kafka("create the input consumer"))?;
        let explicit = config.explicit_input_partitions().map(<[_]>::to_vec);
        let mut topics: Vec<Arc<str>> = Vec::new();
        let named = explicit.iter().flatten().map(|tp| tp.topic.clone());
        for topic in named.chain(config.input_topics().iter().map(|t| Arc::from(t.as_str()))) {
            if !topics.contains(&topic) {
                topics.push(topic);
            }
        }
        Ok(Self {
            consumer: OffRuntime::new(Arc::new(consumer), cluster),
            cluster: cluster.clone(),
            explicit,
            records: RecordBuilder {
                topics: topics.into(),
                read_headers: config.reads_input_headers(),
                assigned_topic: None,
            },
            next: BTreeMap::new(),
            deferred: None,
            warned_at: None,
            ready: Vec::new(),
            prefetch: None,
            unread_seek: None,
            leaders_known: false,
        })
    }

    /// Records from this log carry no headers: like
    /// [`KafkaConfig::input_headers`](crate::KafkaConfig::input_headers)`(false)`,
    /// for this log only. (librdkafka's public API has no cheaper test for
    /// "no headers" than parsing them.)
    pub fn without_headers(mut self) -> Self {
        self.records.read_headers = false;
        self
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

    /// Waits up to `timeout` for the first record, then takes whatever else
    /// is already fetched, up to `max`.
    async fn wait_and_drain(&mut self, max: usize, timeout: Duration) -> Result<Vec<Record>> {
        let consumer = self.consumer.clone();
        // One stream for the whole batch: `StreamConsumer::recv` registers
        // and unregisters a waker (under a mutex) for every message.
        let mut stream = consumer.stream();
        let deadline = tokio::time::Instant::now() + timeout;
        // Live polls usually take a few records: start small, grow if not.
        let mut batch = StagedBatch::new(&self.records, max.min(64));
        loop {
            match tokio::time::timeout_at(deadline, stream.next()).await {
                Err(_) | Ok(None) => return Ok(Vec::new()),
                Ok(Some(Err(e))) if is_transient(&e) => self.log_connection_event(&e),
                Ok(Some(Err(e))) => return Err(self.consume_error(e)),
                Ok(Some(Ok(m))) => {
                    batch.take(&self.records, &m);
                    break;
                }
            }
        }
        if let Some(e) = self.records.drain(&mut stream, &mut batch, max) {
            self.deferred = Some(self.consume_error(e));
        }
        Ok(batch.into_records())
    }

    /// Starts taking already-fetched records on the blocking pool in
    /// batches of `max`, until one comes out short (the backlog is taken),
    /// an error stops it or the log stops listening. Only this task polls
    /// the consumer until it is joined.
    fn start_prefetch(&mut self, max: usize) {
        let consumer = self.consumer.clone();
        let records = self.records.clone();
        let (sender, batches) = mpsc::channel(1);
        let task = tokio::task::spawn_blocking(move || {
            let mut stream = consumer.stream();
            loop {
                let mut batch = StagedBatch::new(&records, max);
                let error = records.drain(&mut stream, &mut batch, max);
                let backlog_left = batch.count() == max && error.is_none();
                if batch.count() == 0 && error.is_none() {
                    return;
                }
                if sender.blocking_send((batch, error)).is_err() || !backlog_left {
                    return;
                }
            }
        });
        self.prefetch = Some(Prefetch { batches, task });
    }

    /// Takes a running prefetch's next batch: its records into `ready`, its
    /// error into `deferred` (returned after those records). Joins the
    /// prefetch once it has ended.
    async fn receive_prefetched(&mut self) -> Result<()> {
        while self.ready.is_empty() && self.deferred.is_none() {
            let Some(prefetch) = self.prefetch.as_mut() else {
                return Ok(());
            };
            match prefetch.batches.recv().await {
                Some((batch, error)) => {
                    self.ready = batch.into_records();
                    if let Some(e) = error {
                        self.deferred = Some(self.consume_error(e));
                    }
                }
                None => {
                    let joined = (&mut prefetch.task).await;
                    self.prefetch = None;
                    joined.map_err(KafkaError::Join)?;
                }
            }
        }
        Ok(())
    }

    /// Stops a running prefetch and waits for it to end; what it took is
    /// dropped.
    async fn stop_prefetch(&mut self) {
        if let Some(prefetch) = self.prefetch.as_mut() {
            prefetch.batches.close();
            let _ = (&mut prefetch.task).await;
            self.prefetch = None;
        }
    }

    /// Up to `max` of the records a prefetch took, in order.
    fn take_ready(&mut self, max: usize) -> Vec<Record> {
        if self.ready.len() <= max {
            return std::mem::take(&mut self.ready);
        }
        let rest = self.ready.split_off(max);
        std::mem::replace(&mut self.ready, rest)
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
        let topics: Vec<Arc<str>> = self.records.topics.to_vec();
        let timeout = self.cluster.config().timeout();
        let partitions = blocking(move || {
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
        .await?;
        // The same metadata request named the leaders.
        self.leaders_known = true;
        Ok(partitions)
    }

    async fn seek(&mut self, position: &Position) -> Result<()> {
        if self.unread_seek.as_ref() == Some(position) {
            // Assigned here and never polled since: librdkafka's queue holds
            // exactly the records from `position` on (a target seeks as soon
            // as it reads the snapshot's header; see the trait's docs).
            debug!(%position, "input log already assigned here; keeping what it fetched");
            return Ok(());
        }
        // Until this assignment succeeds, no position is "already assigned".
        self.unread_seek = None;
        let mut tpl = TopicPartitionList::new();
        for (tp, offset) in position.iter() {
            tpl.add_partition_offset(&tp.topic, tp.partition, Offset::Offset(offset))
                .map_err(KafkaError::kafka("build the assignment"))?;
        }
        // Records a prefetch took for the old assignment are dropped; the
        // task is joined first so that nothing polls during the assign.
        self.stop_prefetch().await;
        self.ready.clear();
        // A fresh assignment discards whatever was fetched for the old one
        // (librdkafka drops messages of an outdated fetch version).
        self.consumer
            .assign(&tpl)
            .map_err(KafkaError::kafka("assign input partitions"))?;
        self.next = position.iter().map(|(tp, o)| (tp.clone(), o)).collect();
        self.records.assigned_topic = self.records.single_topic(position);
        self.deferred = None;
        self.unread_seek = Some(position.clone());
        debug!(%position, "input log assigned");
        Ok(())
    }

    /// Returns records a prefetch took (waiting for its next batch while it
    /// runs), or waits up to `timeout` for the first record and takes
    /// whatever else is already fetched, up to `max`. A full batch means a
    /// backlog: a prefetch then takes the next batches on the blocking pool
    /// while the caller applies this one.
    ///
    /// Cancel-safe: a cancelled poll loses no record (rdkafka's message
    /// stream and tokio's channel receive are cancel-safe, a prefetch's
    /// handle stays until it is joined, and records are moved into the
    /// result only when it is returned).
    async fn poll(&mut self, max: usize, timeout: Duration) -> Result<Vec<Record>> {
        self.unread_seek = None;
        self.receive_prefetched().await?;
        if self.ready.is_empty() {
            if let Some(e) = self.deferred.take() {
                return Err(e);
            }
        }
        if self.next.is_empty() || max == 0 {
            tokio::time::sleep(timeout).await;
            return Ok(Vec::new());
        }
        let mut out = self.take_ready(max);
        if out.is_empty() {
            out = self.wait_and_drain(max, timeout).await?;
            if out.len() == max && self.deferred.is_none() {
                self.start_prefetch(max);
            }
        }
        self.advance_next(&out);
        Ok(out)
    }

    async fn watermarks(&mut self, tp: &TopicPartition) -> Result<Watermarks> {
        let consumer = self.consumer.clone();
        let tp = tp.clone();
        let timeout = self.cluster.config().timeout();
        let first = !self.leaders_known;
        let watermarks = blocking(move || {
            if first {
                learn_leaders(consumer.as_ref(), &tp.topic, timeout, "fetch input topic metadata")?;
            }
            let (low, high) = consumer
                .fetch_watermarks(&tp.topic, tp.partition, timeout)
                .map_err(KafkaError::kafka("fetch watermarks"))?;
            Ok(Watermarks { low, high })
        })
        .await?;
        self.leaders_known = true;
        Ok(watermarks)
    }
}

impl RecordBuilder {
    fn topic(&self, name: &str) -> Arc<str> {
        let known = self.topics.iter().find(|t| ***t == *name);
        known.cloned().unwrap_or_else(|| Arc::from(name))
    }

    /// The topic every partition of `position` belongs to, if there is one.
    fn single_topic(&self, position: &Position) -> Option<Arc<str>> {
        let mut topics = position.iter().map(|(tp, _)| &tp.topic);
        let first = topics.next()?;
        topics.all(|t| t == first).then(|| self.topic(first))
    }

    /// The message's headers; none when the log reads none
    /// ([`KafkaConfig::input_headers`](crate::KafkaConfig::input_headers)).
    fn headers(&self, m: &BorrowedMessage<'_>) -> Vec<(String, Bytes)> {
        let Some(headers) = self.read_headers.then(|| m.headers()).flatten() else {
            return Vec::new();
        };
        headers
            .iter()
            .map(|h| {
                (
                    h.key.to_string(),
                    h.value.map(Bytes::copy_from_slice).unwrap_or_default(),
                )
            })
            .collect()
    }

    /// Appends already-fetched records to `out` until it holds `max`,
    /// without waiting. Returns the error that stopped it, if any
    /// (connection events only end the batch: librdkafka reconnects).
    fn drain(
        &self,
        stream: &mut MessageStream<'_, ClientTelemetry>,
        out: &mut StagedBatch,
        max: usize,
    ) -> Option<RdKafkaError> {
        while out.count() < max {
            match stream.next().now_or_never() {
                None | Some(None) => break,
                Some(Some(Ok(m))) => out.take(self, &m),
                Some(Some(Err(e))) if is_transient(&e) => break,
                Some(Some(Err(e))) => return Some(e),
            }
        }
        None
    }
}

impl StagedBatch {
    /// An empty batch with room for `capacity` messages read with `builder`.
    fn new(builder: &RecordBuilder, capacity: usize) -> Self {
        Self {
            shared_topic: builder.assigned_topic.clone(),
            entries: Vec::with_capacity(capacity),
            bodies: Vec::new(),
        }
    }

    fn count(&self) -> usize {
        self.entries.len()
    }

    /// Keeps what the record of `m` needs; `m` may then be released.
    fn take(&mut self, builder: &RecordBuilder, m: &BorrowedMessage<'_>) {
        let key = m.key().map(|k| self.stage(k));
        let payload = m.payload().map(|p| self.stage(p));
        self.entries.push(StagedRecord {
            topic: self.shared_topic.is_none().then(|| builder.topic(m.topic())),
            partition: m.partition(),
            offset: m.offset(),
            timestamp_ms: m.timestamp().to_millis(),
            key,
            payload,
            headers: builder.headers(m),
        });
    }

    /// Appends `bytes` to the batch's buffer.
    fn stage(&mut self, bytes: &[u8]) -> Span {
        let start = self.bodies.len();
        self.bodies.extend_from_slice(bytes);
        start..self.bodies.len()
    }

    /// The records, their keys and payloads slices of the batch's one
    /// buffer (no allocation per record). The buffer is trimmed to its
    /// contents first: it lives as long as any of the records.
    fn into_records(self) -> Vec<Record> {
        let StagedBatch {
            shared_topic,
            entries,
            mut bodies,
        } = self;
        bodies.shrink_to_fit();
        let bodies = Bytes::from(bodies);
        let slice = |span: Span| bodies.slice(span);
        entries
            .into_iter()
            .map(|entry| Record {
                topic: match (entry.topic, &shared_topic) {
                    (Some(topic), _) => topic,
                    (None, Some(shared)) => shared.clone(),
                    (None, None) => unreachable!("`take` names the topic when the batch has no shared one"),
                },
                partition: entry.partition,
                offset: entry.offset,
                timestamp_ms: entry.timestamp_ms,
                key: entry.key.map(slice),
                payload: entry.payload.map(slice),
                headers: entry.headers,
            })
            .collect()
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
