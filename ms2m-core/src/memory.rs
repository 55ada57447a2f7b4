//! In-memory implementations of every backend trait, so the whole protocol
//! (recovery, replay, migration, fencing, bad input) can be unit-tested
//! without a broker. Behind `cfg(any(test, feature = "test"))`: they are
//! test doubles for the protocol, never a stand-in for Kafka in
//! integration tests.
//!
//! Each has a shared handle (`Clone`) so a test can play producer, crash an
//! instance, corrupt a snapshot or trim a log while the runtime runs.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use tokio::sync::Notify;

use crate::control::{ControlChannel, ControlMessage, ControlReader};
use crate::error::{BackendError, ErrorKind};
use crate::log::{MessageLog, Watermarks};
use crate::position::{Position, TopicPartition};
use crate::record::{OutputRecord, Record};
use crate::sink::{BackgroundCommit, Delivery, OutputSink};
use crate::snapshot::EncodedSnapshot;
use crate::store::{SnapshotId, SnapshotStore};

/// Errors of the in-memory backends.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MemoryError {
    /// The backend was switched off by the test.
    #[error("in-memory backend is unavailable")]
    Unavailable,
    /// No such item.
    #[error("not found: {0}")]
    NotFound(String),
    /// A newer owner claimed the sink.
    #[error("sink fenced: claimed by epoch {current}, this sink has epoch {mine}")]
    Fenced {
        /// Epoch now in force.
        current: u64,
        /// This sink's epoch.
        mine: u64,
    },
    /// The partition is not assigned.
    #[error("partition {0} is not part of this log")]
    UnknownPartition(TopicPartition),
}

impl BackendError for MemoryError {
    fn kind(&self) -> ErrorKind {
        match self {
            MemoryError::Unavailable => ErrorKind::Unavailable,
            MemoryError::NotFound(_) => ErrorKind::NotFound,
            MemoryError::Fenced { .. } => ErrorKind::Fenced,
            MemoryError::UnknownPartition(_) => ErrorKind::Other,
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[derive(Debug, Default)]
struct PartitionData {
    /// Offset of `records[0]`.
    low: i64,
    records: Vec<Record>,
}

impl PartitionData {
    fn high(&self) -> i64 {
        self.low + self.records.len() as i64
    }
}

#[derive(Debug, Default)]
struct LogShared {
    partitions: Mutex<BTreeMap<TopicPartition, PartitionData>>,
    appended: Notify,
}

/// An in-memory partitioned log. Clone it to share; `reader()` makes a
/// [`MessageLog`] over all its partitions.
#[derive(Clone, Debug, Default)]
pub struct MemoryLog {
    shared: Arc<LogShared>,
}

impl MemoryLog {
    /// A log with `partitions` empty partitions of `topic`.
    pub fn new(topic: &str, partitions: i32) -> Self {
        let log = Self::default();
        {
            let mut p = lock(&log.shared.partitions);
            for i in 0..partitions {
                p.insert(TopicPartition::new(topic, i), PartitionData::default());
            }
        }
        log
    }

    /// Appends a message; returns its offset.
    pub fn append(&self, topic: &str, partition: i32, key: Option<&[u8]>, payload: impl Into<Bytes>) -> i64 {
        let tp = TopicPartition::new(topic, partition);
        let offset = {
            let mut parts = lock(&self.shared.partitions);
            let data = parts.entry(tp.clone()).or_default();
            let offset = data.high();
            data.records.push(Record {
                topic: tp.topic.clone(),
                partition,
                offset,
                timestamp_ms: Some(offset),
                key: key.map(Bytes::copy_from_slice),
                payload: Some(payload.into()),
                headers: Vec::new(),
            });
            offset
        };
        self.shared.appended.notify_waiters();
        offset
    }

    /// Deletes every record below `offset` (simulates retention).
    pub fn truncate_before(&self, tp: &TopicPartition, offset: i64) {
        let mut parts = lock(&self.shared.partitions);
        if let Some(data) = parts.get_mut(tp) {
            let n = (offset - data.low).clamp(0, data.records.len() as i64) as usize;
            data.records.drain(..n);
            data.low += n as i64;
        }
    }

    /// Every record currently stored, per partition in offset order.
    pub fn records(&self) -> Vec<Record> {
        lock(&self.shared.partitions)
            .values()
            .flat_map(|d| d.records.iter().cloned())
            .collect()
    }

    /// The position one past the last record of every partition.
    pub fn end_position(&self) -> Position {
        lock(&self.shared.partitions)
            .iter()
            .map(|(tp, d)| (tp.clone(), d.high()))
            .collect()
    }

    /// A reader over all partitions, positioned at the start.
    pub fn reader(&self) -> MemoryLogReader {
        MemoryLogReader {
            log: self.clone(),
            next: HashMap::new(),
            order: Vec::new(),
            rr: 0,
        }
    }
}

/// A [`MessageLog`] reading a [`MemoryLog`].
#[derive(Debug)]
pub struct MemoryLogReader {
    log: MemoryLog,
    next: HashMap<TopicPartition, i64>,
    order: Vec<TopicPartition>,
    rr: usize,
}

impl MemoryLogReader {
    fn take_available(&mut self, max: usize) -> Vec<Record> {
        let parts = lock(&self.log.shared.partitions);
        let mut out = Vec::new();
        let n = self.order.len();
        // Round-robin across partitions so that none starves.
        for i in 0..n {
            if out.len() >= max {
                break;
            }
            let tp = &self.order[(self.rr + i) % n];
            let Some(data) = parts.get(tp) else { continue };
            let next = self.next.get_mut(tp).expect("ordered partitions are tracked");
            // A reader past the trimmed point jumps to the earliest record,
            // like Kafka's auto.offset.reset=earliest.
            if *next < data.low {
                *next = data.low;
            }
            let start = (*next - data.low) as usize;
            let take = (max - out.len()).min(data.records.len().saturating_sub(start));
            out.extend_from_slice(&data.records[start..start + take]);
            *next += take as i64;
        }
        self.rr = self.rr.wrapping_add(1);
        out
    }
}

#[async_trait]
impl MessageLog for MemoryLogReader {
    type Error = MemoryError;

    async fn partitions(&mut self) -> Result<Vec<TopicPartition>, MemoryError> {
        Ok(lock(&self.log.shared.partitions).keys().cloned().collect())
    }

    async fn seek(&mut self, position: &Position) -> Result<(), MemoryError> {
        self.next = position.iter().map(|(tp, o)| (tp.clone(), o)).collect();
        self.order = position.iter().map(|(tp, _)| tp.clone()).collect();
        Ok(())
    }

    async fn poll(&mut self, max: usize, timeout: Duration) -> Result<Vec<Record>, MemoryError> {
        let deadline = tokio::time::Instant::now() + timeout;
        let shared = self.log.shared.clone();
        loop {
            let notified = shared.appended.notified();
            let out = self.take_available(max);
            if !out.is_empty() {
                return Ok(out);
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Ok(Vec::new());
            }
        }
    }

    async fn watermarks(&mut self, tp: &TopicPartition) -> Result<Watermarks, MemoryError> {
        let parts = lock(&self.log.shared.partitions);
        let data = parts.get(tp).ok_or_else(|| MemoryError::UnknownPartition(tp.clone()))?;
        Ok(Watermarks {
            low: data.low,
            high: data.high(),
        })
    }
}

#[derive(Debug, Default)]
struct StoreShared {
    snapshots: BTreeMap<SnapshotId, Bytes>,
    next_id: SnapshotId,
    unavailable: bool,
}

/// An in-memory [`SnapshotStore`]. Clone to share.
#[derive(Clone, Debug, Default)]
pub struct MemorySnapshotStore {
    shared: Arc<Mutex<StoreShared>>,
}

impl MemorySnapshotStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// Replaces a stored snapshot's bytes with `f(bytes)` (to corrupt or truncate it).
    pub fn tamper(&self, id: SnapshotId, f: impl FnOnce(Bytes) -> Bytes) {
        let mut s = lock(&self.shared);
        if let Some(b) = s.snapshots.remove(&id) {
            s.snapshots.insert(id, f(b));
        }
    }

    /// Makes every call fail with `Unavailable` (or work again).
    pub fn set_unavailable(&self, unavailable: bool) {
        lock(&self.shared).unavailable = unavailable;
    }

    fn check(&self) -> Result<MutexGuard<'_, StoreShared>, MemoryError> {
        let s = lock(&self.shared);
        if s.unavailable {
            return Err(MemoryError::Unavailable);
        }
        Ok(s)
    }
}

#[async_trait]
impl SnapshotStore for MemorySnapshotStore {
    type Error = MemoryError;

    async fn put(&self, snapshot: &EncodedSnapshot) -> Result<SnapshotId, MemoryError> {
        let mut s = self.check()?;
        s.next_id += 1;
        let id = s.next_id;
        s.snapshots.insert(id, snapshot.to_bytes());
        Ok(id)
    }

    async fn list(&self) -> Result<Vec<SnapshotId>, MemoryError> {
        Ok(self.check()?.snapshots.keys().copied().collect())
    }

    async fn get(&self, id: SnapshotId) -> Result<Bytes, MemoryError> {
        self.check()?
            .snapshots
            .get(&id)
            .cloned()
            .ok_or_else(|| MemoryError::NotFound(format!("snapshot {id}")))
    }

    async fn delete(&self, id: SnapshotId) -> Result<(), MemoryError> {
        self.check()?.snapshots.remove(&id);
        Ok(())
    }
}

#[derive(Debug, Default)]
struct SinkShared {
    committed: Vec<OutputRecord>,
    position: Option<Position>,
    epoch: u64,
}

/// The committed side of an in-memory, transactional output topic. Clone to
/// share; `sink()` makes an [`OutputSink`] writing to it.
#[derive(Clone, Debug)]
pub struct MemoryOutputs {
    shared: Arc<Mutex<SinkShared>>,
    /// Background commits wait while this is `true` (see
    /// [`hold_background_commits`](Self::hold_background_commits)).
    commits_held: Arc<tokio::sync::watch::Sender<bool>>,
}

impl Default for MemoryOutputs {
    fn default() -> Self {
        Self {
            shared: Arc::default(),
            commits_held: Arc::new(tokio::sync::watch::Sender::new(false)),
        }
    }
}

impl MemoryOutputs {
    /// An empty output topic.
    pub fn new() -> Self {
        Self::default()
    }

    /// A new sink (unclaimed until [`OutputSink::claim`]).
    pub fn sink(&self) -> MemorySink {
        MemorySink {
            outputs: self.clone(),
            epoch: 0,
            pending: Vec::new(),
            background: false,
        }
    }

    /// A new sink that also commits in the background
    /// ([`OutputSink::commit_in_background`]), as the Kafka sink does with
    /// at-least-once.
    pub fn sink_committing_in_background(&self) -> MemorySink {
        MemorySink {
            background: true,
            ..self.sink()
        }
    }

    /// While `held`, background commits wait before committing (a broker
    /// slow to acknowledge).
    pub fn hold_background_commits(&self, held: bool) {
        self.commits_held.send_replace(held);
    }

    /// Every committed output, in commit order.
    pub fn committed(&self) -> Vec<OutputRecord> {
        lock(&self.shared).committed.clone()
    }

    /// The committed input position.
    pub fn committed_position(&self) -> Option<Position> {
        lock(&self.shared).position.clone()
    }
}

/// An exactly-once [`OutputSink`] over [`MemoryOutputs`]: outputs and
/// position commit atomically, and a newer `claim` fences older sinks.
#[derive(Debug)]
pub struct MemorySink {
    outputs: MemoryOutputs,
    epoch: u64,
    pending: Vec<OutputRecord>,
    /// Whether it offers background commits.
    background: bool,
}

impl MemorySink {
    fn check_epoch(&self, shared: &SinkShared) -> Result<(), MemoryError> {
        check_epoch(shared, self.epoch)
    }
}

fn check_epoch(shared: &SinkShared, mine: u64) -> Result<(), MemoryError> {
    if shared.epoch != mine {
        return Err(MemoryError::Fenced {
            current: shared.epoch,
            mine,
        });
    }
    Ok(())
}

#[async_trait]
impl OutputSink for MemorySink {
    type Error = MemoryError;

    fn delivery(&self) -> Delivery {
        Delivery::ExactlyOnce
    }

    async fn claim(&mut self) -> Result<(), MemoryError> {
        let mut s = lock(&self.outputs.shared);
        s.epoch += 1;
        self.epoch = s.epoch;
        self.pending.clear();
        Ok(())
    }

    async fn send(&mut self, output: OutputRecord) -> Result<(), MemoryError> {
        self.pending.push(output);
        Ok(())
    }

    async fn commit(&mut self, position: &Position) -> Result<(), MemoryError> {
        let mut s = lock(&self.outputs.shared);
        self.check_epoch(&s)?;
        s.committed.append(&mut self.pending);
        s.position = Some(position.clone());
        Ok(())
    }

    fn commit_in_background(&mut self, position: &Position) -> Option<BackgroundCommit<MemoryError>> {
        if !self.background {
            return None;
        }
        let mut outputs = std::mem::take(&mut self.pending);
        let (shared, mut held) = (self.outputs.shared.clone(), self.outputs.commits_held.subscribe());
        let (position, epoch) = (position.clone(), self.epoch);
        Some(Box::pin(async move {
            // Cannot fail: the sender lives as long as `shared`'s outputs.
            let _ = held.wait_for(|held| !held).await;
            let mut s = lock(&shared);
            check_epoch(&s, epoch)?;
            s.committed.append(&mut outputs);
            s.position = Some(position);
            Ok(())
        }))
    }

    async fn abort(&mut self) -> Result<(), MemoryError> {
        self.pending.clear();
        Ok(())
    }

    async fn committed(&mut self) -> Result<Option<Position>, MemoryError> {
        Ok(lock(&self.outputs.shared).position.clone())
    }
}

/// What a [`MemoryControl`] fault hook does with a message being published.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PublishFault {
    /// Publish normally.
    Pass,
    /// Fail the publish with `Unavailable` (the publisher dies or gives up).
    Fail,
    /// Never return (the publisher hangs, e.g. until its task is aborted).
    Hang,
    /// Never return, but the message is already in flight: it is appended
    /// after the delay, whatever happens to the publisher (a record a
    /// producer had enqueued before its process died).
    Late(std::time::Duration),
}

type FaultHook = Box<dyn Fn(&ControlMessage) -> PublishFault + Send + Sync>;

#[derive(Default)]
struct ControlShared {
    messages: Mutex<Vec<ControlMessage>>,
    published: Notify,
    fault: Mutex<Option<FaultHook>>,
    /// Readers deliver nothing while set (a slow consumer); `history()` is
    /// not affected.
    readers_held: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for ControlShared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlShared").finish_non_exhaustive()
    }
}

/// An in-memory [`ControlChannel`]. Clone to share.
#[derive(Clone, Debug, Default)]
pub struct MemoryControl {
    shared: Arc<ControlShared>,
}

impl MemoryControl {
    /// An empty channel.
    pub fn new() -> Self {
        Self::default()
    }

    /// Every message published so far.
    pub fn history(&self) -> Vec<ControlMessage> {
        lock(&self.shared.messages).clone()
    }

    /// Holds (`true`) or releases every reader: while held, `next` delivers
    /// nothing, as a control consumer that lags behind would. Releasing
    /// wakes them.
    pub fn hold_readers(&self, hold: bool) {
        self.shared
            .readers_held
            .store(hold, std::sync::atomic::Ordering::SeqCst);
        self.shared.published.notify_waiters();
    }

    /// Installs a fault hook consulted on every publish (crash injection at
    /// an exact protocol step).
    pub fn set_fault(&self, hook: impl Fn(&ControlMessage) -> PublishFault + Send + Sync + 'static) {
        *lock(&self.shared.fault) = Some(Box::new(hook));
    }
}

/// Reader of a [`MemoryControl`].
#[derive(Debug)]
pub struct MemoryControlReader {
    shared: Arc<ControlShared>,
    next: usize,
}

#[async_trait]
impl ControlChannel for MemoryControl {
    type Error = MemoryError;
    type Reader = MemoryControlReader;

    async fn publish(&self, message: &ControlMessage) -> Result<(), MemoryError> {
        let fault = lock(&self.shared.fault)
            .as_ref()
            .map_or(PublishFault::Pass, |f| f(message));
        match fault {
            PublishFault::Pass => {}
            PublishFault::Fail => return Err(MemoryError::Unavailable),
            PublishFault::Hang => std::future::pending::<()>().await,
            PublishFault::Late(delay) => {
                let (shared, message) = (self.shared.clone(), message.clone());
                tokio::spawn(async move {
                    tokio::time::sleep(delay).await;
                    lock(&shared.messages).push(message);
                    shared.published.notify_waiters();
                });
                std::future::pending::<()>().await
            }
        }
        lock(&self.shared.messages).push(message.clone());
        self.shared.published.notify_waiters();
        Ok(())
    }

    async fn history(&self) -> Result<Vec<ControlMessage>, MemoryError> {
        Ok(self.history())
    }

    async fn reader(&self, from_start: bool) -> Result<MemoryControlReader, MemoryError> {
        let next = if from_start {
            0
        } else {
            lock(&self.shared.messages).len()
        };
        Ok(MemoryControlReader {
            shared: self.shared.clone(),
            next,
        })
    }
}

#[async_trait]
impl ControlReader for MemoryControlReader {
    type Error = MemoryError;

    async fn next(&mut self, timeout: Duration) -> Result<Option<ControlMessage>, MemoryError> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.shared.published.notified();
            let held = self.shared.readers_held.load(std::sync::atomic::Ordering::SeqCst);
            if let Some(m) = lock(&self.shared.messages).get(self.next).cloned().filter(|_| !held) {
                self.next += 1;
                return Ok(Some(m));
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Ok(None);
            }
        }
    }
}
