//! The instance runtime: runs one service over a log, a snapshot store and an
//! output sink.
//!
//! # Lifecycle
//!
//! 1. [`Instance::recover`]: load the newest snapshot that verifies, seek the
//!    log to its position (failing if retention deleted the tail), claim the
//!    output sink (fencing any older owner), and replay up to the output
//!    watermark with outputs suppressed.
//! 2. [`Instance::run`]: apply messages live, emit outputs, commit the
//!    position with them, snapshot every N messages and/or T seconds. A
//!    sink that can ([`OutputSink::commit_in_background`]: the Kafka sink
//!    with at-least-once) finishes periodic commits on their own task, so
//!    the apply loop never waits for a broker's acknowledgements; at most
//!    one runs, and the loop waits for it only once the next commit is due
//!    (by count or by time), or before anything that needs the commit done
//!    (a snapshot, a migration's stop, a claim, shutdown).
//! 3. On shutdown: finish the message in hand, commit, take a final snapshot.
//!
//! Migration drives the same instance through lower-level steps
//! ([`Instance::step`], [`Instance::checkpoint`], [`Instance::set_ceiling`]).

mod config;
mod progress;
#[cfg(test)]
mod tests;

use std::collections::VecDeque;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::FutureExt;
use serde::{Deserialize, Serialize};
use tokio::task::JoinHandle;
use tracing::{debug, info, info_span, warn, Instrument};

pub use config::{BadMessagePolicy, InstanceConfig, StartFrom};
pub(crate) use progress::{eta, RateMeter};
pub use progress::{no_progress, Progress, ProgressListener, ProgressPhase, SharedListener};

use crate::codec::{DecodeError, MessageFormat};
use crate::digest::StateDigest;
use crate::error::{BackendError, BoxError, Component, Error, ErrorKind, Result};
use crate::health::Health;
use crate::log::MessageLog;
use crate::metrics::InstanceMetrics;
use crate::position::{Position, TopicPartition};
use crate::record::{OutputRecord, Record};
use crate::service::{ApplyContext, Mode, OutputBuffer, StatefulService};
use crate::sink::OutputSink;
use crate::snapshot::{Snapshot, SnapshotHeader};
use crate::state::Frozen;
use crate::store::{self, LoadedSnapshot, SnapshotId, SnapshotStore};

/// The backends an instance runs on.
#[derive(Debug)]
pub struct Backends<L, St, O> {
    /// The input log.
    pub log: L,
    /// Where snapshots go (shared with background uploads).
    pub store: Arc<St>,
    /// Where outputs go.
    pub sink: O,
}

/// A snapshot that was taken and stored.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckpointInfo {
    /// Its id in the store.
    pub id: SnapshotId,
    /// The position it reflects.
    pub position: Position,
    /// The encoded state's size in bytes (the envelope's header, a few
    /// hundred bytes, not counted).
    pub bytes: u64,
    /// How long the apply loop was paused to serialize the state.
    pub pause: Duration,
}

/// Counters of one instance.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceStats {
    /// Messages applied live (outputs emitted).
    pub applied_live: u64,
    /// Messages applied in replay mode (outputs suppressed).
    pub applied_replay: u64,
    /// Outputs emitted.
    pub outputs_emitted: u64,
    /// Outputs suppressed during replay.
    pub outputs_suppressed: u64,
    /// Messages sent to the dead-letter topic (live) or skipped as
    /// previously dead-lettered (replay).
    pub dead_lettered: u64,
    /// Duplicate deliveries below the position, ignored.
    pub duplicates_skipped: u64,
    /// Bad records skipped because an operator said so
    /// ([`InstanceConfig::skip_inputs`]).
    #[serde(default)]
    pub skipped_by_operator: u64,
    /// Commits of outputs and position.
    pub commits: u64,
    /// Snapshots stored.
    pub snapshots: u64,
    /// Snapshot uploads that failed (retried at the next trigger).
    pub snapshot_failures: u64,
    /// The last stored snapshot.
    pub last_checkpoint: Option<CheckpointInfo>,
}

/// How outputs are treated.
#[derive(Clone, Debug)]
enum OutputMode {
    /// Replay below the watermark, live at and above it.
    Watermark(Position),
    /// Standby migration target: everything is replay.
    SuppressAll,
}

type Upload = JoinHandle<Result<CheckpointInfo>>;

/// A sink's commit error as the instance reports it.
fn commit_failed<E: BackendError>(e: E) -> Error {
    match e.kind() {
        ErrorKind::Fenced => {
            warn!("output sink fenced: another instance owns this service now");
            Error::backend(Component::Sink, "commit (fenced by a newer owner)", e)
        }
        _ => Error::backend(Component::Sink, "commit", e),
    }
}

/// A commit running on its own task: how long it took once it is done, and
/// the dead letters it commits (logged when it is joined). Dropped unjoined
/// (the instance dropped or taken apart, as in a crash), its task is
/// aborted: it waits for no more acknowledgements and starts no offset
/// commit. An offset commit it had already handed to the client may still
/// land, as a commit in flight when a process dies may (at-least-once
/// allows it: the watermark can only fall back to a position whose outputs
/// were delivered).
struct RunningCommit {
    task: JoinHandle<Result<Duration>>,
    dead_letters: u64,
}

impl Drop for RunningCommit {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A snapshot's state as taken on the apply loop.
enum StateBytes {
    /// Serialized there (plain states).
    Encoded(Bytes),
    /// Frozen there, serialized by the upload on a blocking thread.
    Frozen(Frozen),
}

impl StateBytes {
    /// Seals and stores the state under `header` (its length and checksum
    /// are computed here); the stored id and the encoded state's length. A frozen
    /// state is encoded straight into the store ([`crate::streamed`]).
    async fn store<St: SnapshotStore>(self, store: &St, header: SnapshotHeader) -> Result<(SnapshotId, u64)> {
        match self {
            StateBytes::Encoded(state) => {
                let state_len = state.len() as u64;
                let encoded = Snapshot::seal_under(header, state).encode()?;
                let id = store.put(&encoded).await;
                id.map(|id| (id, state_len))
                    .map_err(|e| Error::backend(Component::SnapshotStore, "store snapshot", e))
            }
            StateBytes::Frozen(frozen) => crate::store::store_frozen(store, frozen, header).await,
        }
    }
}

/// One running instance of service `S`.
pub struct Instance<S, L, St, O>
where
    S: StatefulService,
    L: MessageLog,
    St: SnapshotStore,
    O: OutputSink,
{
    state: S,
    log: L,
    store: Arc<St>,
    sink: O,
    config: InstanceConfig,
    /// Next offset to apply per partition: the state is the fold of all below.
    position: Position,
    output_mode: OutputMode,
    /// Standby targets never apply at or beyond this (the source's position).
    ceiling: Option<Position>,
    /// Records polled but not yet applied, in delivery order.
    pending: VecDeque<Record>,
    outputs: OutputBuffer,
    live_since_commit: u64,
    since_snapshot: u64,
    last_commit: Instant,
    last_snapshot: Instant,
    /// At most one periodic snapshot upload runs in the background.
    upload: Option<Upload>,
    /// A requested checkpoint (a migration's) uploading in the background,
    /// beside any periodic one, so the request never waits for it.
    requested: Option<Upload>,
    /// The longest time the apply loop spent on something other than
    /// polling and applying (commits, snapshot serialization) since
    /// [`take_longest_stall`](Instance::take_longest_stall).
    longest_stall: Duration,
    /// Dead letters sent since the last commit (logged once committed).
    uncommitted_dead_letters: u64,
    /// A commit finishing on its own task (at most one; see
    /// [`OutputSink::commit_in_background`]).
    committing: Option<RunningCommit>,
    stats: InstanceStats,
    /// Metric handles and health (see [`crate::metrics`]).
    metrics: InstanceMetrics,
}

impl<S, L, St, O> std::fmt::Debug for Instance<S, L, St, O>
where
    S: StatefulService,
    L: MessageLog,
    St: SnapshotStore,
    O: OutputSink,
{
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Instance")
            .field("service", &self.config.service_id_of::<S>())
            .field("instance_id", &self.config.instance_id)
            .field("position", &self.position)
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

impl<S, L, St, O> Instance<S, L, St, O>
where
    S: StatefulService,
    L: MessageLog,
    St: SnapshotStore,
    O: OutputSink,
{
    /// Recovers an instance: newest valid snapshot (or the configured start),
    /// seek, claim the sink, replay to the output watermark. Progress of the
    /// replay goes to `listener`. Returns an instance ready to [`run`](Self::run).
    pub async fn recover(
        backends: Backends<L, St, O>,
        config: InstanceConfig,
        listener: &dyn ProgressListener,
    ) -> Result<Self> {
        let span = info_span!("recover", service = config.service_id_of::<S>(), instance = %config.instance_id);
        async move {
            let loaded = store::load_newest_logged::<S, St>(&backends.store, config.service_id_of::<S>()).await?;
            let mut instance = Self::restore(backends, config, loaded).await?;
            instance.claim().await?;
            let watermark = instance
                .sink
                .committed()
                .await
                .map_err(|e| Error::backend(Component::Sink, "read committed position", e))?
                .unwrap_or_default();
            info!(position = %instance.position, watermark = %watermark, "restored; replaying to the output watermark");
            instance.output_mode = OutputMode::Watermark(watermark.clone());
            instance
                .replay_to(&watermark, ProgressPhase::Recovery, listener)
                .await?;
            info!(position = %instance.position, "recovered; going live");
            Ok(instance)
        }
        .instrument(span)
        .await
    }

    /// Builds an instance from a loaded snapshot (or a fresh state) and seeks
    /// the log, without claiming the sink: outputs stay suppressed until
    /// [`go_live`](Self::go_live). This is how a migration target starts.
    pub async fn restore(
        backends: Backends<L, St, O>,
        config: InstanceConfig,
        loaded: Option<LoadedSnapshot<S>>,
    ) -> Result<Self> {
        let Backends { mut log, store, sink } = backends;
        let (state, snapshot_position) = match loaded {
            Some(l) => {
                info!(snapshot = l.id, position = %l.header.position, "restoring snapshot");
                (l.state, l.header.position)
            }
            None => {
                info!(start = ?config.start_from, "no snapshot; starting from a fresh state");
                (S::default(), Position::new())
            }
        };
        let position = start_position(&mut log, &snapshot_position, &config).await?;
        log.seek(&position)
            .await
            .map_err(|e| Error::backend(Component::Log, "seek", e))?;
        let mut sink = sink;
        if let Some(topic) = config.output.default_topic.as_deref() {
            if let Err(e) = sink.warm_up(&[topic]).await {
                warn!(error = %e, topic, "could not warm up the output sink; its first commit may be slower");
            }
        }
        let now = Instant::now();
        Ok(Self {
            state,
            log,
            store,
            sink,
            position,
            output_mode: OutputMode::SuppressAll,
            ceiling: None,
            pending: VecDeque::new(),
            outputs: OutputBuffer::default(),
            live_since_commit: 0,
            since_snapshot: 0,
            last_commit: now,
            last_snapshot: now,
            upload: None,
            requested: None,
            longest_stall: Duration::ZERO,
            uncommitted_dead_letters: 0,
            committing: None,
            stats: InstanceStats::default(),
            metrics: InstanceMetrics::new(config.service_id_of::<S>(), &config.instance_id),
            config,
        })
    }

    /// Takes ownership of the output stream (fences any older owner).
    /// Outputs sent but not yet committed are aborted with the old claim:
    /// [`commit`](Self::commit) first if the instance has been serving.
    pub async fn claim(&mut self) -> Result<()> {
        self.reap_commit(true).await?;
        self.sink
            .claim()
            .await
            .map_err(|e| Error::backend(Component::Sink, "claim output ownership", e))
    }

    /// Makes this instance live from its current position: messages from
    /// here on emit outputs. Call after [`claim`](Self::claim).
    pub fn go_live(&mut self) {
        self.output_mode = OutputMode::Watermark(self.position.clone());
        self.ceiling = None;
    }

    /// Goes live if the instance is still a standby (outputs suppressed).
    pub fn go_live_if_standby(&mut self) {
        if matches!(self.output_mode, OutputMode::SuppressAll) {
            self.go_live();
        }
    }

    /// Stops emitting: from now on the instance applies with outputs
    /// suppressed, as a standby (an owner released at its committed
    /// position).
    pub fn become_standby(&mut self) {
        self.output_mode = OutputMode::SuppressAll;
    }

    /// The output sink's committed position (the output watermark).
    pub(crate) async fn read_watermark(&mut self) -> Result<Option<Position>> {
        self.reap_commit(true).await?;
        self.sink
            .committed()
            .await
            .map_err(|e| Error::backend(Component::Sink, "read committed position", e))
    }

    /// A standby's ceiling becomes the owner's committed position (the
    /// output watermark), read now; returns how far behind it this
    /// instance stands, in messages.
    pub(crate) async fn follow_committed(&mut self) -> Result<u64> {
        let committed = self.read_watermark().await?.unwrap_or_default();
        let lag = committed.total().saturating_sub(self.position.total()).max(0) as u64;
        self.set_ceiling(Some(committed));
        Ok(lag)
    }

    /// Whether outputs are being emitted (false for a standby).
    pub fn is_live(&self) -> bool {
        !matches!(self.output_mode, OutputMode::SuppressAll)
    }

    /// Limits how far a standby instance may apply (exclusive), or lifts the limit.
    pub fn set_ceiling(&mut self, ceiling: Option<Position>) {
        self.ceiling = ceiling;
    }

    /// The state.
    pub fn state(&self) -> &S {
        &self.state
    }

    /// The position: the state is the fold of every message below it.
    pub fn position(&self) -> &Position {
        &self.position
    }

    /// The state's order-independent digest.
    pub fn digest(&self) -> StateDigest {
        self.state.digest()
    }

    /// Counters.
    pub fn stats(&self) -> &InstanceStats {
        &self.stats
    }

    /// Liveness and readiness of this instance, updated on every step (a
    /// cheap clone sharing the state: hand it to a probe endpoint).
    pub fn health(&self) -> Health {
        self.metrics.health.clone()
    }

    /// Makes this instance update `health` instead of its own (a node
    /// sharing one handle across the instances it runs).
    pub fn use_health(&mut self, health: Health) {
        self.metrics.health = health;
    }

    /// The configuration.
    pub fn config(&self) -> &InstanceConfig {
        &self.config
    }

    /// The backends' read side, for watermarks and lag.
    pub fn log_mut(&mut self) -> &mut L {
        &mut self.log
    }

    /// Runs live until `shutdown` completes, then shuts down gracefully
    /// (finish the message in hand, commit, final snapshot). A shutdown
    /// request is noticed within the poll timeout.
    pub async fn run(&mut self, shutdown: impl Future<Output = ()>) -> Result<()> {
        let span = info_span!("run", service = self.config.service_id_of::<S>(), instance = %self.config.instance_id);
        async move {
            let mut shutdown = std::pin::pin!(shutdown);
            self.go_live_if_standby();
            loop {
                if shutdown.as_mut().now_or_never().is_some() {
                    break;
                }
                self.step().await?;
            }
            self.shutdown().await
        }
        .instrument(span)
        .await
    }

    /// Applies what is pending, or polls once when nothing pending can be
    /// applied, then commits and snapshots if due. Returns the number
    /// applied. Never cancels half-way: safe to call in a loop that checks
    /// other events.
    pub async fn step(&mut self) -> Result<usize> {
        self.step_with_timeout(self.config.poll_timeout).await
    }

    /// [`step`](Self::step) with a different longest wait for input.
    pub async fn step_with_timeout(&mut self, timeout: Duration) -> Result<usize> {
        let mut applied = self.apply_pending().await?;
        let mut drained = false;
        if applied == 0 {
            let batch = self
                .log
                .poll(self.config.poll_batch, timeout)
                .await
                .map_err(|e| Error::backend(Component::Log, "poll", e))?;
            drained = batch.is_empty() && self.pending.is_empty();
            if self.pending.is_empty() {
                // Takes the batch's buffer as it is (no copy of the records).
                self.pending = batch.into();
            } else {
                self.pending.extend(batch);
            }
            applied = self.apply_pending().await?;
        }
        self.housekeeping(applied == 0).await?;
        self.observe_step(drained).await;
        Ok(applied)
    }

    /// Metrics and health after a step. An empty poll with nothing held
    /// means no lag; a busy instance measures it every few seconds.
    async fn observe_step(&mut self, drained: bool) {
        self.metrics.after_step(&self.stats, self.is_live());
        if drained {
            self.metrics.lag_measured(self.position.iter().map(|(tp, _)| (tp, 0)));
        } else if self.metrics.lag_due() {
            self.measure_lag().await;
        }
    }

    /// Lag per partition from the log's watermarks (bounded in time: a
    /// slow broker skips the measurement rather than stall the loop).
    async fn measure_lag(&mut self) {
        let mut lags = Vec::new();
        for (tp, next) in self.position.iter() {
            let marks = tokio::time::timeout(Duration::from_millis(500), self.log.watermarks(tp)).await;
            match marks {
                Ok(Ok(marks)) => lags.push((tp, (marks.high - next).max(0) as u64)),
                _ => {
                    debug!(%tp, "lag not measured: watermarks unavailable");
                    return;
                }
            }
        }
        self.metrics.lag_measured(lags);
    }

    /// Applies pending records below the ceiling. A record at or above the
    /// ceiling is held, and so is every later record of its partition (order
    /// within a partition is kept); other partitions go on.
    ///
    /// Applies at most one poll's batch, leaving the rest pending for the
    /// next step, so housekeeping runs at least that often: records can be
    /// pending beyond one batch (what a recovery's replay held past its
    /// target while it polled on), and applying them all at once widened the
    /// at-least-once duplicate window past `commit_every + batch - 1`.
    async fn apply_pending(&mut self) -> Result<usize> {
        let mut applied = 0;
        let mut held = VecDeque::new();
        let mut limits = CeilingLimits::default();
        while let Some(record) = self.pending.pop_front() {
            if applied >= self.config.poll_batch {
                self.pending.push_front(record);
                break;
            }
            if let Some(ceiling) = &self.ceiling {
                if record.offset >= limits.of(ceiling, &record) {
                    limits.block(&record);
                    held.push_back(record);
                    continue;
                }
            }
            match self.apply_one(&record).await {
                Ok(true) => applied += 1,
                Ok(false) => {}
                Err(e) => {
                    // Keep the failed record: the position stays before it.
                    held.push_back(record);
                    held.extend(self.pending.drain(..));
                    self.pending = held;
                    return Err(e);
                }
            }
        }
        // Held records go back in front of what is left, in order.
        if !held.is_empty() {
            held.extend(self.pending.drain(..));
            self.pending = held;
        }
        Ok(applied)
    }

    /// Applies every available message until the position reaches `target`
    /// (on every partition it names), reporting progress.
    pub async fn replay_to(
        &mut self,
        target: &Position,
        phase: ProgressPhase,
        listener: &dyn ProgressListener,
    ) -> Result<u64> {
        let mut total = 0u64;
        let mut meter = RateMeter::default();
        let mut window = (Instant::now(), 0u64);
        while !self.position.reaches(target) {
            let saved = self.ceiling.replace(target.clone());
            let applied = self.step().await;
            self.ceiling = saved;
            let applied = applied? as u64;
            total += applied;
            window.1 += applied;
            if window.0.elapsed() >= self.config.progress_interval {
                let rate = meter.observe(window.1, window.0.elapsed());
                window = (Instant::now(), 0);
                let remaining = self.position.distance_to(target);
                listener.on_progress(&Progress {
                    phase,
                    applied: total,
                    remaining,
                    rate,
                    eta: eta(remaining, rate),
                });
            }
        }
        listener.on_progress(&Progress {
            phase,
            applied: total,
            remaining: 0,
            rate: meter.rate(),
            eta: Some(Duration::ZERO),
        });
        Ok(total)
    }

    fn mode_for(&self, tp: &TopicPartition, offset: i64) -> Mode {
        match &self.output_mode {
            OutputMode::SuppressAll => Mode::Replay,
            OutputMode::Watermark(w) if offset < w.get(tp).unwrap_or(0) => Mode::Replay,
            OutputMode::Watermark(_) => Mode::Live,
        }
    }

    /// Applies one record; `false` if it was a duplicate below the position.
    async fn apply_one(&mut self, record: &Record) -> Result<bool> {
        let tp = record.topic_partition();
        if record.offset < self.position.get(&tp).unwrap_or(0) {
            self.stats.duplicates_skipped += 1;
            return Ok(false);
        }
        let mode = self.mode_for(&tp, record.offset);
        match <S::Format as MessageFormat<S::Message>>::decode(record) {
            Ok(message) => {
                let mut ctx = ApplyContext::new(record, mode, &self.config.output, &mut self.outputs);
                if let Err(e) = self.state.apply(message, &mut ctx).await {
                    self.outputs.records.clear();
                    self.bad_message(record, &tp, mode, BadStage::Apply(Box::new(e)))
                        .await?;
                }
            }
            Err(e) => self.bad_message(record, &tp, mode, BadStage::Decode(e)).await?,
        }
        if let Some(e) = self.outputs.error.take() {
            self.outputs.records.clear();
            return Err(Error::Codec(e));
        }
        self.stats.outputs_suppressed += std::mem::take(&mut self.outputs.suppressed);
        for output in self.outputs.records.drain(..) {
            self.sink
                .send(output)
                .await
                .map_err(|e| Error::backend(Component::Sink, "send output", e))?;
            self.stats.outputs_emitted += 1;
        }
        self.position.advance(&tp, record.offset);
        self.since_snapshot += 1;
        match mode {
            Mode::Live => {
                self.stats.applied_live += 1;
                self.live_since_commit += 1;
            }
            Mode::Replay => self.stats.applied_replay += 1,
        }
        Ok(true)
    }

    async fn bad_message(&mut self, record: &Record, tp: &TopicPartition, mode: Mode, stage: BadStage) -> Result<()> {
        if self.skip_allowed(tp, record.offset) {
            let reason = crate::store::error_chain(stage.as_error());
            warn!(%tp, offset = record.offset, stage = stage.name(), %reason,
                "bad message skipped: an operator allowed it (SkipInput on the control channel)");
            self.stats.skipped_by_operator += 1;
            return Ok(());
        }
        let topic = match &self.config.bad_messages {
            BadMessagePolicy::Fail => {
                return Err(match stage {
                    BadStage::Decode(source) => Error::Decode {
                        tp: tp.clone(),
                        offset: record.offset,
                        source,
                    },
                    BadStage::Apply(source) => Error::Apply {
                        tp: tp.clone(),
                        offset: record.offset,
                        source,
                    },
                })
            }
            BadMessagePolicy::DeadLetter { topic } => topic.clone(),
        };
        self.stats.dead_lettered += 1;
        if mode == Mode::Replay {
            // Dead-lettered the first time round; the output is suppressed like any other.
            return Ok(());
        }
        let reason = crate::store::error_chain(stage.as_error());
        warn!(%tp, offset = record.offset, stage = stage.name(), %reason, dead_letter_topic = %topic,
            "bad message: its original goes to the dead-letter topic with the next commit");
        self.uncommitted_dead_letters += 1;
        let payload = record.payload.clone().unwrap_or_default();
        let max = self.config.dead_letter_max_bytes;
        let mut headers = record.headers.clone();
        if payload.len() > max {
            headers.extend([
                ("ms2m.truncated".to_string(), Bytes::from_static(b"true")),
                (
                    "ms2m.original.bytes".to_string(),
                    Bytes::from(payload.len().to_string()),
                ),
            ]);
        }
        headers.extend([
            ("ms2m.error".to_string(), Bytes::from(reason)),
            ("ms2m.stage".to_string(), Bytes::from_static(stage.name().as_bytes())),
            (
                "ms2m.source.topic".to_string(),
                Bytes::copy_from_slice(record.topic.as_bytes()),
            ),
            (
                "ms2m.source.partition".to_string(),
                Bytes::from(record.partition.to_string()),
            ),
            ("ms2m.source.offset".to_string(), Bytes::from(record.offset.to_string())),
        ]);
        // Copies: the record's bytes may be slices of a whole batch's
        // buffer, which the output would keep alive until it is sent.
        self.outputs.records.push(OutputRecord {
            topic: topic.into(),
            key: record.key.as_deref().map(Bytes::copy_from_slice),
            payload: Bytes::copy_from_slice(&payload[..payload.len().min(max)]),
            headers,
        });
        Ok(())
    }

    /// Adds input records to skip if bad (see
    /// [`InstanceConfig::skip_inputs`]), e.g. a standby learning of an
    /// operator's decision while it replays.
    pub fn skip_inputs(&mut self, records: impl IntoIterator<Item = (String, i32, i64)>) {
        self.config.skip_inputs.extend(records);
    }

    fn skip_allowed(&self, tp: &TopicPartition, offset: i64) -> bool {
        self.config
            .skip_inputs
            .contains(&(tp.topic.to_string(), tp.partition, offset))
    }

    /// Commits and snapshots when due.
    async fn housekeeping(&mut self, idle: bool) -> Result<()> {
        self.reap_commit(false).await?;
        let due_by_policy = self.live_since_commit >= self.config.commit_every
            || self.last_commit.elapsed() >= self.config.commit_interval;
        let due = self.live_since_commit > 0 && (idle || due_by_policy);
        if due && due_by_policy && self.committing.is_some() {
            // The next commit is due (by count or time) while the last one
            // still runs: wait for it, so at most two commits' worth is ever
            // uncommitted (the at-least-once duplicate window).
            let started = Instant::now();
            self.reap_commit(true).await?;
            self.note_stall(started.elapsed());
        }
        if due && self.committing.is_none() {
            self.commit_without_waiting().await?;
        }
        self.reap_upload(false).await;
        if !self.is_live() {
            // A standby is not the owner: its position can be ahead of the
            // owner's committed outputs, and a snapshot there would let a
            // recovering owner skip outputs it never committed.
            return Ok(());
        }
        let by_count = self.config.snapshot_every.is_some_and(|n| self.since_snapshot >= n);
        let by_time = self.since_snapshot > 0
            && self
                .config
                .snapshot_interval
                .is_some_and(|t| self.last_snapshot.elapsed() >= t);
        if (by_count || by_time) && self.upload.is_none() {
            self.start_snapshot().await?;
        }
        Ok(())
    }

    /// Commits outputs sent so far together with the position, and waits
    /// until it is done (and any commit still running in the background).
    /// A no-op when nothing was applied live since the last commit:
    /// committing a replay position would move the output watermark
    /// backwards.
    pub async fn commit(&mut self) -> Result<()> {
        if self.live_since_commit == 0 && self.committing.is_none() {
            return Ok(());
        }
        let started = Instant::now();
        self.reap_commit(true).await?;
        if self.live_since_commit > 0 {
            let committing = Instant::now();
            self.sink.commit(&self.position).await.map_err(commit_failed)?;
            let dead_letters = self.commit_started();
            self.commit_finished(committing.elapsed(), dead_letters);
        }
        self.note_stall(started.elapsed());
        Ok(())
    }

    /// Waits until clients can read every output sent so far, committing
    /// nothing ([`OutputSink::flush`]); `false` when the sink shows outputs
    /// only at a commit.
    pub async fn flush_outputs(&mut self) -> Result<bool> {
        self.sink
            .flush()
            .await
            .map_err(|e| Error::backend(Component::Sink, "flush outputs", e))
    }

    /// Starts a commit on its own task when the sink can finish it there
    /// (the apply loop goes on meanwhile), else commits and waits.
    async fn commit_without_waiting(&mut self) -> Result<()> {
        let Some(finish) = self.sink.commit_in_background(&self.position) else {
            return self.commit().await;
        };
        let dead_letters = self.commit_started();
        let started = Instant::now();
        let task = tokio::spawn(async move {
            finish.await.map_err(commit_failed)?;
            Ok(started.elapsed())
        });
        self.committing = Some(RunningCommit { task, dead_letters });
        Ok(())
    }

    /// Joins the background commit if it is done (or, with `wait`, once it
    /// is); its error fails the instance like a commit's. Cancel-safe: the
    /// commit is let go of only once it has finished.
    async fn reap_commit(&mut self, wait: bool) -> Result<()> {
        let Some(running) = self.committing.as_mut() else {
            return Ok(());
        };
        if !wait && !running.task.is_finished() {
            return Ok(());
        }
        let joined = (&mut running.task).await;
        let dead_letters = running.dead_letters;
        self.committing = None;
        let took = joined.map_err(|join| Error::Backend {
            component: Component::Sink,
            operation: "commit",
            kind: ErrorKind::Other,
            source: format!("the background commit did not finish: {join}").into(),
        })??;
        self.commit_finished(took, dead_letters);
        Ok(())
    }

    /// A commit of everything applied so far has started: the next one
    /// counts from here. Returns the dead letters it covers.
    fn commit_started(&mut self) -> u64 {
        self.live_since_commit = 0;
        self.last_commit = Instant::now();
        std::mem::take(&mut self.uncommitted_dead_letters)
    }

    fn commit_finished(&mut self, took: Duration, dead_letters: u64) {
        self.stats.commits += 1;
        self.metrics.committed(took, dead_letters);
        if dead_letters > 0 {
            // Only now are they acknowledged: say so now, not at the send.
            info!(count = dead_letters, "dead-lettered records committed");
        }
    }

    fn note_stall(&mut self, stall: Duration) {
        self.metrics.stalled(stall);
        self.longest_stall = self.longest_stall.max(stall);
    }

    /// The longest single pause of the apply loop for its own work (a
    /// commit, a snapshot's serialization or freeze) since the last call,
    /// and starts measuring anew. A migration source reports it, because a
    /// client sees such a pause as downtime just like the cutover.
    pub fn take_longest_stall(&mut self) -> Duration {
        std::mem::take(&mut self.longest_stall)
    }

    /// Serializes the state on this task and starts the upload in the background.
    async fn start_snapshot(&mut self) -> Result<()> {
        self.upload = Some(self.spawn_upload().await?);
        Ok(())
    }

    /// Commits, serializes the state (or freezes it, see
    /// [`ServiceState::freeze`]) on this task, the only pause of the apply
    /// loop, and spawns the encoding, sealing and upload.
    async fn spawn_upload(&mut self) -> Result<Upload> {
        // Outputs up to the snapshot position must be committed first, so a
        // snapshot never reflects messages whose outputs could still be lost.
        self.commit().await?;
        let started = Instant::now();
        let state = match self.state.freeze() {
            Some(frozen) => StateBytes::Frozen(frozen),
            None => StateBytes::Encoded(Bytes::from(self.state.snapshot()?)),
        };
        let pause = started.elapsed();
        self.note_stall(pause);
        self.metrics.checkpoint_paused(pause);
        let position = self.position.clone();
        debug!(?pause, frozen = matches!(state, StateBytes::Frozen(_)), %position, "snapshot taken");
        let store = self.store.clone();
        let instance_id = self.config.instance_id.clone();
        let service = self.config.service_id_of::<S>().to_string();
        let keep = self.config.keep_snapshots;
        self.since_snapshot = 0;
        self.last_snapshot = Instant::now();
        Ok(tokio::spawn(
            async move {
                // Encoding (of a frozen state), checksumming and sealing run
                // here, off the apply loop.
                let header = SnapshotHeader::unsealed(service, S::SCHEMA_VERSION, position.clone(), instance_id);
                let (id, bytes) = state.store(&*store, header).await?;
                store::retain_newest(&*store, keep).await?;
                Ok(CheckpointInfo {
                    id,
                    position,
                    bytes,
                    pause,
                })
            }
            .in_current_span(),
        ))
    }

    /// Starts a checkpoint that the caller collects with
    /// [`poll_checkpoint`](Self::poll_checkpoint) or
    /// [`wait_checkpoint`](Self::wait_checkpoint): commits, serializes the
    /// state now and uploads it in the background while the instance keeps
    /// applying (migration phase 1). A checkpoint still uploading from an
    /// earlier request is abandoned.
    pub async fn start_checkpoint(&mut self) -> Result<()> {
        if let Some(old) = self.requested.take() {
            old.abort();
        }
        self.requested = Some(self.spawn_upload().await?);
        Ok(())
    }

    /// The result of the checkpoint started by
    /// [`start_checkpoint`](Self::start_checkpoint), once its upload ended;
    /// `None` while it runs or when none was started.
    pub async fn poll_checkpoint(&mut self) -> Option<Result<CheckpointInfo>> {
        if !self.requested.as_ref().is_some_and(|u| u.is_finished()) {
            return None;
        }
        self.wait_checkpoint().await
    }

    /// Waits for the checkpoint started by
    /// [`start_checkpoint`](Self::start_checkpoint); `None` when none was
    /// started. Cancel-safe: dropping the future leaves the upload running.
    pub async fn wait_checkpoint(&mut self) -> Option<Result<CheckpointInfo>> {
        let upload = self.requested.as_mut()?;
        let joined = upload.await;
        self.requested = None;
        Some(self.record_upload(joined))
    }

    /// Collects a finished periodic upload (or waits for it with `wait`).
    async fn reap_upload(&mut self, wait: bool) -> Option<Result<CheckpointInfo>> {
        let finished = self.upload.as_ref().is_some_and(|u| u.is_finished());
        if !(finished || wait && self.upload.is_some()) {
            return None;
        }
        let joined = self.upload.take()?.await;
        Some(self.record_upload(joined))
    }

    /// Logs and counts how an upload ended.
    fn record_upload(
        &mut self,
        joined: std::result::Result<Result<CheckpointInfo>, tokio::task::JoinError>,
    ) -> Result<CheckpointInfo> {
        let result = joined.unwrap_or_else(|join| {
            Err(Error::Backend {
                component: Component::SnapshotStore,
                operation: "upload snapshot",
                kind: ErrorKind::Other,
                source: Box::new(join),
            })
        });
        match &result {
            Ok(info) => {
                info!(snapshot = info.id, bytes = info.bytes, pause_us = info.pause.as_micros() as u64, position = %info.position, "snapshot stored");
                self.stats.snapshots += 1;
                self.stats.last_checkpoint = Some(info.clone());
                self.metrics.checkpoint_stored(info.bytes);
            }
            Err(e) => {
                warn!(error = %crate::store::error_chain(e), "snapshot upload failed; will retry at the next trigger");
                self.stats.snapshot_failures += 1;
            }
        }
        result
    }

    /// Takes a snapshot now and waits until it is stored (the apply loop
    /// waits too; a migration uses [`start_checkpoint`](Self::start_checkpoint)).
    pub async fn checkpoint(&mut self) -> Result<CheckpointInfo> {
        self.start_checkpoint().await?;
        match self.wait_checkpoint().await {
            Some(result) => result,
            None => Err(Error::Backend {
                component: Component::SnapshotStore,
                operation: "upload snapshot",
                kind: ErrorKind::Other,
                source: "the checkpoint upload vanished".into(),
            }),
        }
    }

    /// Commits, takes a final snapshot and waits for it: the graceful end of
    /// an owner. A failing final snapshot is logged, not fatal (the committed
    /// position and older snapshots still recover everything).
    pub async fn shutdown(&mut self) -> Result<()> {
        self.commit().await?;
        self.reap_upload(true).await;
        if self.since_snapshot > 0 {
            if let Err(e) = self.checkpoint().await {
                warn!(error = %crate::store::error_chain(&e), "final snapshot failed");
            }
        }
        info!(position = %self.position, "instance stopped");
        Ok(())
    }

    /// Stops without committing or snapshotting and hands back the parts
    /// (used when a migration hands ownership away, and in crash tests).
    pub fn into_parts(self) -> (S, Position, Backends<L, St, O>) {
        for upload in [self.upload, self.requested].into_iter().flatten() {
            upload.abort();
        }
        // Like a crash: a commit still running is aborted (dropped with
        // the rest; see `RunningCommit`).
        (
            self.state,
            self.position,
            Backends {
                log: self.log,
                store: self.store,
                sink: self.sink,
            },
        )
    }

    /// Drops uncommitted outputs (a source handing ownership away).
    pub async fn abort_outputs(&mut self) -> Result<()> {
        self.reap_commit(true).await?;
        self.sink
            .abort()
            .await
            .map_err(|e| Error::backend(Component::Sink, "abort outputs", e))
    }
}

/// The ceiling of each partition during one pass over the pending records,
/// looked up once per run of records from the same partition (a poll
/// delivers each partition's records in runs).
#[derive(Default)]
struct CeilingLimits {
    /// Partitions with a held record: everything after it is held too.
    blocked: Vec<TopicPartition>,
    /// The previous record's partition and its limit.
    last: Option<(TopicPartition, i64)>,
}

impl CeilingLimits {
    /// The offset `record`'s partition may not reach: the ceiling's
    /// (0 for a partition it does not name), `i64::MIN` once blocked.
    fn of(&mut self, ceiling: &Position, record: &Record) -> i64 {
        if let Some((tp, limit)) = &self.last {
            // Records of one log share their topic's allocation: compare
            // pointers before names (`Arc<str>`'s `==` compares the bytes).
            let same_topic = Arc::ptr_eq(&tp.topic, &record.topic) || tp.topic == record.topic;
            if tp.partition == record.partition && same_topic {
                return *limit;
            }
        }
        let tp = record.topic_partition();
        let limit = if self.blocked.contains(&tp) {
            i64::MIN
        } else {
            ceiling.get(&tp).unwrap_or(0)
        };
        self.last = Some((tp, limit));
        limit
    }

    /// Holds every later record of `record`'s partition.
    fn block(&mut self, record: &Record) {
        let tp = record.topic_partition();
        if !self.blocked.contains(&tp) {
            self.blocked.push(tp.clone());
        }
        self.last = Some((tp, i64::MIN));
    }
}

enum BadStage {
    Decode(DecodeError),
    Apply(BoxError),
}

impl BadStage {
    fn name(&self) -> &'static str {
        match self {
            BadStage::Decode(_) => "decode",
            BadStage::Apply(_) => "apply",
        }
    }

    fn as_error(&self) -> &(dyn std::error::Error + 'static) {
        match self {
            BadStage::Decode(e) => e,
            BadStage::Apply(e) => e.as_ref(),
        }
    }
}

/// The position reading starts at: the snapshot's, plus the configured start
/// for partitions it does not mention. Fails if the log no longer reaches
/// back to it (unless gaps are allowed).
pub(crate) async fn start_position<L: MessageLog>(
    log: &mut L,
    from_snapshot: &Position,
    config: &InstanceConfig,
) -> Result<Position> {
    let partitions = log
        .partitions()
        .await
        .map_err(|e| Error::backend(Component::Log, "list partitions", e))?;
    let mut position = Position::new();
    for tp in partitions {
        let marks = log
            .watermarks(&tp)
            .await
            .map_err(|e| Error::backend(Component::Log, "read watermarks", e))?;
        let start = match from_snapshot.get(&tp) {
            Some(needed) if needed < marks.low => {
                if !config.allow_log_gap {
                    return Err(Error::LogTruncated {
                        tp,
                        needed,
                        earliest: marks.low,
                        missing: marks.low - needed,
                    });
                }
                warn!(%tp, needed, earliest = marks.low, "log gap allowed: skipping deleted messages");
                marks.low
            }
            Some(needed) => needed,
            None => match config.start_from {
                StartFrom::Earliest => marks.low,
                StartFrom::Latest => marks.high,
            },
        };
        position.set(tp, start);
    }
    Ok(position)
}
