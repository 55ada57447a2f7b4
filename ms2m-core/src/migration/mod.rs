//! Live migration (MS2M): moving a running service to another instance while
//! the source keeps serving.
//!
//! # Phases
//!
//! Three parties talk over a [`ControlChannel`] (one totally ordered
//! partition): the [`Coordinator`] (the paper's migration manager; runs
//! anywhere), the source (the owner, running a [`SourceAgent`]) and the
//! target (a standby running [`run_target`]).
//!
//! | phase | source | target |
//! |---|---|---|
//! | 1 checkpoint | freezes its state (a clone, O(1) with persistent collections; a plain state serializes here, the pause), encodes and uploads it in the background, keeps serving | — |
//! | 2 transfer | keeps serving | fetches the snapshot |
//! | 3 restore | keeps serving | verifies and restores it |
//! | 4 replay | keeps serving, publishes its position; once the target restored, publishes its digest at Pd (computed off the apply loop from a frozen copy) | applies from P0 with outputs suppressed, never past the source; holds at Pd and compares digests there |
//! | 5 cutover | stops at a message boundary Pf, commits, publishes Pf | replays the final gap to Pf, publishes `Takeover`, claims the sink once its `Takeover` decided the migration, goes live |
//!
//! The digests are compared at Pd, before the stop, so the cutover does no
//! O(state) work and a non-deterministic `apply` fails the migration while
//! the source still serves. Messages between Pd and Pf are not covered by
//! the comparison. A source that stops before its digest point (a stop that
//! overtakes it, stop-and-copy, cold start) publishes its digest at Pf in
//! `Stopped`, and the target compares there.
//!
//! Kafka's log is the replay buffer: the snapshot's position says exactly
//! where replay starts and Pf exactly where it ends, so no message is applied
//! twice or skipped, whatever rule triggers the cutover ([`CutoverRule`]).
//!
//! # The state machines
//!
//! Each role is a state type plus a pure transition function in
//! [`protocol`]: [`protocol::coordinator::CoordinatorMachine`],
//! [`protocol::source::SourceMachine`], [`protocol::target::TargetMachine`].
//! Their module docs draw each machine. The async drivers in this module
//! (`Coordinator`, `SourceAgent`, `run_target`) only perform the actions
//! they return over the backend traits and feed back what happened; the
//! model checker in this crate's tests drives the same functions over
//! models of the control log, input log, snapshot store and sink, with
//! crashes at every step.
//!
//! The control records of one migration, in the order they are published:
//!
//! ```text
//! coordinator: Prepare(source, target) ─ Checkpoint ─────────── Restore ───────────────────────────────── Stop ─────────── Release ─ Completed
//! source:                   CheckpointTaken(P0) ─ SourceProgress* ───── DigestAt(Pd) ─ SourceProgress* ──── Stopped(Pf)
//! target:                                                 Restored ─ TargetProgress* ───────────────────────────────── Takeover ─ Live
//! ```
//! (stop-and-copy: `Prepare`, `Stop`, `Checkpoint`, `Restore`; cold start:
//! `Prepare`, `Stop`, `Restore(none)`; MS2M from the standby: `Prepare`,
//! `RestoreFromStandby`, then as MS2M from `Restored` on.)
//!
//! # Without a checkpoint: MS2M from the standby
//!
//! Phases 1–3 exist to give the target the source's state at some position
//! P0. A target that is a [`Node`](crate::node::Node) standing by already
//! holds the service's state at a position of its own: it restored a
//! snapshot when it started and has replayed the input behind the owner
//! since, outputs suppressed, never past the owner's committed position
//! (so never past Pd or Pf). [`Strategy::Ms2mFromStandby`] skips phases
//! 1–3: the source takes no checkpoint, the target keeps that state and
//! replays on from where it stands, and the digest point checks it against
//! the source's before the source stops, as it checks a restored one. The
//! move then costs the standby's lag, not a snapshot written and read
//! through the store (the fleet's scale-out benchmark, S1 in BENCHMARKS.md,
//! measures both). What it trusts: that the standby's replay made the same
//! state the owner's did, which the digest checks under
//! [`DigestPolicy::Abort`] (default); under `Warn` a standby that diverged
//! (a log gap it was allowed to skip, `StartFrom::Latest` with no snapshot)
//! would go live with its own state. A target with no standby state (a
//! process started as a target, [`run_target`]) restores the newest
//! snapshot in the store that verifies, or the empty state, and replays
//! from there: correct, but as slow as that replay. The fleet's leader uses
//! this strategy by default
//! ([`FleetOptions::strategy`](crate::fleet::FleetOptions::strategy)) and
//! moves a task only once its node on the new host stands by; after a
//! failed move of a task it takes a checkpoint ([`Strategy::Ms2m`]) for the
//! next one.
//!
//! # The decision rule
//!
//! Before the source stops, a failure simply aborts the migration: the
//! source never noticed. After the stop, the target announces `Takeover`
//! once it reached Pf with digests equal (at Pd, or at Pf), and a coordinator that gives up
//! announces a rollback (`Resume`/`Aborted`). **The first of the two on the
//! channel wins**, and every party decides by that order through one fold,
//! [`protocol::Decisions`]: the target claims the sink only after reading
//! its own `Takeover` with no rollback before it; the source resumes only on
//! a rollback with no `Takeover` before it, and is released by a
//! `Takeover`; a restarted coordinator ([`Coordinator::recover`]) and
//! [`current_owner`] read the same order. No timing assumption.
//!
//! # Ownership and fencing
//!
//! [`current_owner`] reads the channel; an instance that is not the owner
//! must not start ([`ensure_owner`]). With an exactly-once sink the target's
//! claim also fences the source's producer. A control record that does not
//! decode is skipped by the backend (with a warning): it never decides.
//!
//! Outside migrations, ownership is decided on the same channel by the same
//! fold: a node's first `Claim` makes it the owner, the owner's `Renew`s
//! keep its lease, and a standby's `Claim` naming an expired lease term
//! replaces it (and rolls back any migration still open). The rule, the
//! lease's clock-drift safety argument and the owner's and standby's
//! machines are in [`protocol::owner`]; [`crate::node::Node`] drives them.

mod coordinator;
#[cfg(test)]
mod lease_model;
#[cfg(test)]
mod model;
pub mod protocol;
mod source;
mod target;
#[cfg(test)]
mod tests;

use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use coordinator::{Coordinator, MigrationPlan, Recovered};
pub(crate) use source::ChannelFeed;
pub use source::{run_source, SourceAgent, SourceExit, SourceHandle, SourceOptions};
pub use target::{run_target, TargetOptions};
pub(crate) use target::{serve_as_target, TargetStart};

use crate::control::{ControlBody, ControlChannel, ControlReader};
use crate::digest::StateDigest;
use crate::error::{Component, Error};
use crate::position::Position;

/// A migration failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MigrationError {
    /// Source and target disagree on the state at the cutover position:
    /// `apply` is not deterministic.
    #[error(
        "state digests differ at cutover: source {source_digest}, target {target_digest} (is apply deterministic?)"
    )]
    DigestMismatch {
        /// Source's digest.
        source_digest: StateDigest,
        /// Target's digest.
        target_digest: StateDigest,
    },
    /// A participant did not answer in time.
    #[error("migration timed out waiting for {waiting_for}")]
    Timeout {
        /// What was awaited.
        waiting_for: &'static str,
    },
    /// The target took over (its `Takeover` decided the migration, so it
    /// owns the service) but did not report `Live` in time: it crashed or
    /// failed to claim the sink. The source was released; restart the
    /// target's instance id as the owner ([`ensure_owner`] lets it).
    #[error("target {target} took over but did not report live in time; restart it as the owner")]
    TakenOverNotLive {
        /// Instance id of the target, now the owner.
        target: String,
    },
    /// A participant reported failure, or the migration was abandoned.
    #[error("migration aborted: {reason}")]
    Aborted {
        /// Why.
        reason: String,
    },
}

/// Which migration procedure to run. The baselines exist for comparison.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Strategy {
    /// MS2M: checkpoint, restore and replay while the source serves; cut over
    /// when the target is close (`max_lag` or the catch-up estimate).
    Ms2m,
    /// MS2M with the ICIN 2025 threshold cutoff: also cut over after
    /// `T_cutoff = T_replay_max · mu / lambda` of replay, bounding total time
    /// when the input outruns replay.
    Ms2mThreshold,
    /// MS2M without a checkpoint, for a target that stands by (a
    /// [`Node`](crate::node::Node) replaying behind the owner): the target
    /// keeps the state it already holds and replays on from there; one that
    /// holds none restores the newest snapshot in the store. No snapshot is
    /// written or read for the move, so it costs the standby's lag behind
    /// the source, whatever the state's size. The digest point still checks
    /// the target's state against the source's before the source stops.
    /// Needs the input log to still hold everything after the target's
    /// position (as a standby's replay does anyway).
    Ms2mFromStandby,
    /// Baseline: stop the source, snapshot, transfer, restore, go live.
    StopAndCopy,
    /// Baseline: stop the source, rebuild the target from the whole log.
    ColdStart,
}

impl std::fmt::Display for Strategy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Strategy::Ms2m => "MS2M",
            Strategy::Ms2mThreshold => "MS2M + threshold cutoff",
            Strategy::Ms2mFromStandby => "MS2M from the standby",
            Strategy::StopAndCopy => "stop-and-copy",
            Strategy::ColdStart => "cold start",
        })
    }
}

/// What to do when the digests differ at cutover. Chosen by whoever starts
/// the migration ([`MigrationConfig::digest_policy`]) and carried to the
/// target in the migration's `Prepare` record.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum DigestPolicy {
    /// Do not go live; hand ownership back to the source (default).
    #[default]
    Abort,
    /// Log a warning and go live anyway.
    Warn,
}

/// When the coordinator stops the source (MS2M strategies).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct CutoverRule {
    /// Cut over when the target is at most this many messages behind
    /// (`None`: rule disabled). Default: 100, a few milliseconds of replay.
    pub max_lag: Option<u64>,
    /// Cut over when the estimated catch-up time `lag / (mu - lambda)` is at
    /// most this. Default: 50 ms.
    pub max_catch_up: Option<Duration>,
    /// `T_replay_max` of the threshold cutoff (used by
    /// [`Strategy::Ms2mThreshold`]). Default: 10 s.
    pub replay_max: Duration,
}

impl Default for CutoverRule {
    fn default() -> Self {
        Self {
            max_lag: Some(100),
            max_catch_up: Some(Duration::from_millis(50)),
            replay_max: Duration::from_secs(10),
        }
    }
}

/// Which cutover rule fired.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum CutoverReason {
    /// The target's lag was at most `max_lag`.
    MaxLag {
        /// Lag when it fired.
        lag: u64,
    },
    /// The catch-up estimate was within bound.
    CatchUpEstimate {
        /// Estimated seconds to catch up.
        seconds: f64,
    },
    /// The threshold cutoff elapsed.
    ThresholdCutoff {
        /// `T_cutoff` in seconds.
        cutoff_seconds: f64,
    },
    /// Baselines stop the source first.
    StopFirst,
}

/// How the coordinator runs a migration.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct MigrationConfig {
    /// When to cut over. Default: [`CutoverRule::default`].
    pub cutover: CutoverRule,
    /// What the target does on a digest mismatch (sent to it in `Prepare`).
    /// Default: [`DigestPolicy::Abort`].
    pub digest_policy: DigestPolicy,
    /// How long to wait for any one answer before rolling back. Default: 60 s.
    pub phase_timeout: Duration,
}

impl Default for MigrationConfig {
    fn default() -> Self {
        Self {
            cutover: CutoverRule::default(),
            digest_policy: DigestPolicy::Abort,
            phase_timeout: Duration::from_secs(60),
        }
    }
}

/// Everything measured about one migration.
///
/// Serializes to any serde format: `serde_json::to_value` works, and the
/// digests are 32 hex digits in human-readable formats ([`StateDigest`]).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MigrationReport {
    /// The procedure.
    pub strategy: Strategy,
    /// Service migrated.
    pub service: String,
    /// Migration id.
    pub migration_id: String,
    /// Source instance.
    pub source: String,
    /// Target instance.
    pub target: String,
    /// The longest time clients saw no new output because of the
    /// migration: the handover (`handover_ms`) or the source's longest
    /// stall before it, whichever is longer. The broker's own delays (a
    /// broker slowed by the snapshot's upload holding back the source's
    /// outputs) are not in it: measure those from outside.
    pub downtime_ms: f64,
    /// From the request to the target being live.
    pub total_ms: f64,
    /// Phase 1: checkpoint taken and stored.
    pub checkpoint_ms: f64,
    /// Phase 2: target fetched the snapshot. The target decodes chunks as
    /// they arrive, so this ends when the decoder took the last chunk and
    /// includes the decoding that overlapped the fetch.
    pub transfer_ms: f64,
    /// Phase 3: target verified and restored it: what decoding and
    /// checking was left after the last chunk (often under a millisecond).
    pub restore_ms: f64,
    /// Phase 4: replay while the source served.
    pub replay_ms: f64,
    /// Phase 5: stop request to target live, as the coordinator saw it
    /// (including the trips of `Stop` and `Live` through the control
    /// channel and the target's first commit).
    pub cutover_ms: f64,
    /// The cutover as clients see it: from the source's last outputs to
    /// the target's first visible ones (acknowledged; committed with
    /// exactly-once). `cutover_ms` less the trips of `Stop` to the source
    /// and of `Live` back, each taken as long as the coordinator's own
    /// `Stop` took to come back to it through the control channel, and
    /// less what the target reports between its first visible outputs and
    /// its `Live`; `cutover_ms` itself when either is missing or they add
    /// up to more than it. Durations only: no host's clock is compared
    /// with another's. Absent (0) in reports written before it existed.
    #[serde(default)]
    pub handover_ms: f64,
    /// The control channel trip `handover_ms` used: from publishing `Stop`
    /// to reading it back. `None`: not read back.
    #[serde(default)]
    pub control_trip_ms: Option<f64>,
    /// What the target reported between its first visible outputs and its
    /// `Live`. `None`: it did not report it.
    #[serde(default)]
    pub visible_before_live_ms: Option<f64>,
    /// The longest stall of the source's apply loop between the migration's
    /// start and the stop: a commit, the checkpoint's serialization or
    /// freeze, the agent's own protocol work.
    pub source_stall_ms: f64,
    /// Encoded snapshot size.
    pub snapshot_bytes: u64,
    /// How long the source paused to serialize its state.
    pub snapshot_pause_ms: f64,
    /// Messages the target applied in replay mode.
    pub messages_replayed: u64,
    /// Of those, messages replayed after the source stopped.
    pub final_gap: u64,
    /// Target's lag when the cutover fired.
    pub lag_at_cutover: u64,
    /// Which rule fired.
    pub cutover_reason: CutoverReason,
    /// Position the snapshot was taken at.
    pub p0: Position,
    /// Position of the handover.
    pub pf: Position,
    /// Where source and target compared digests: Pd, the source's position
    /// when the target restored (before the stop, off the cutover's path),
    /// or Pf when the source stopped before it took a digest point.
    pub digest_position: Position,
    /// Source's digest at `digest_position`.
    pub source_digest: StateDigest,
    /// Target's digest at `digest_position`.
    pub target_digest: StateDigest,
    /// Whether they matched.
    pub digest_match: bool,
}

/// The current owner of a service, as recorded on the control channel.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Owner {
    /// Instance id.
    pub instance_id: String,
    /// Owner epoch (increases with every handover).
    pub epoch: u64,
}

/// The retained control history of `service`.
pub async fn read_history<C: ControlChannel>(control: &C, service: &str) -> Result<Vec<crate::ControlMessage>, Error> {
    let all = control
        .history()
        .await
        .map_err(|e| Error::backend(Component::Control, "read history", e))?;
    Ok(all.into_iter().filter(|m| m.service == service).collect())
}

/// How a migration was decided on the control channel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MigrationOutcome {
    /// The target's `Takeover` came first: the target owns the service.
    TakenOver,
    /// A rollback (`Resume` or `Aborted`) came first: the source keeps it.
    RolledBack,
}

/// The decision of `migration_id` in `history` (in channel order), if any:
/// the first decisive record wins (see [the decision rule](self#the-decision-rule)).
pub fn migration_outcome(history: &[crate::ControlMessage], migration_id: &str) -> Option<MigrationOutcome> {
    protocol::Decisions::from_history(history).outcome(migration_id)
}

/// The owner recorded on the control channel: named by the decisive record
/// of the latest migration that moved or re-confirmed ownership. Records
/// that lost the race are ignored.
pub async fn current_owner<C: ControlChannel>(control: &C, service: &str) -> Result<Option<Owner>, Error> {
    let history = read_history(control, service).await?;
    Ok(protocol::Decisions::from_history(&history).owner().cloned())
}

/// Fails with [`Error::Fenced`] if the control channel names another owner:
/// call before recovering an instance that takes part in migrations, so a
/// source that wakes up after a handover refuses to run.
pub async fn ensure_owner<C: ControlChannel>(control: &C, service: &str, instance_id: &str) -> Result<(), Error> {
    match current_owner(control, service).await? {
        Some(owner) if owner.instance_id != instance_id => Err(Error::Fenced {
            current_epoch: owner.epoch,
        }),
        _ => Ok(()),
    }
}

/// A monotonic clock reading as the pure lease logic takes it: the time
/// since an origin far enough in the past that every `Instant` the process
/// sees comes after it.
pub(crate) fn lease_clock(at: std::time::Instant) -> Duration {
    static ORIGIN: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    let origin = ORIGIN.get_or_init(|| {
        let now = std::time::Instant::now();
        now.checked_sub(Duration::from_secs(10 * 365 * 86_400)).unwrap_or(now)
    });
    at.saturating_duration_since(*origin)
}

/// Shared plumbing: forwards control messages for one service from a reader
/// task to an mpsc channel, so agents can check for commands between steps
/// without cancelling reads.
pub(crate) async fn forward_control<C: ControlChannel>(
    control: &C,
    service: String,
    from_start: bool,
) -> Result<tokio::sync::mpsc::Receiver<crate::ControlMessage>, Error> {
    forward_control_where(control, from_start, move |s| s == service).await
}

/// [`forward_control`] for every service id `wanted` accepts (a fleet
/// host reads its service's records and those of each of its tasks).
pub(crate) async fn forward_control_where<C: ControlChannel>(
    control: &C,
    from_start: bool,
    wanted: impl Fn(&str) -> bool + Send + Sync + 'static,
) -> Result<tokio::sync::mpsc::Receiver<crate::ControlMessage>, Error> {
    let mut reader = control
        .reader(from_start)
        .await
        .map_err(|e| Error::backend(Component::Control, "open reader", e))?;
    let (tx, rx) = tokio::sync::mpsc::channel(1024);
    tokio::spawn(async move {
        forward(&mut reader, &wanted, &tx).await;
        // Closing a reader can block (Kafka: the consumer's close, ~100 ms):
        // never on a runtime worker, where it would stall whatever task
        // waits in that worker's queue (a target just gone live).
        tokio::task::spawn_blocking(move || drop(reader));
    });
    Ok(rx)
}

/// Sends the records of the services `wanted` accepts to `tx` until its
/// receiver is gone.
async fn forward<R: ControlReader>(
    reader: &mut R,
    wanted: &(impl Fn(&str) -> bool + Send + Sync),
    tx: &tokio::sync::mpsc::Sender<crate::ControlMessage>,
) {
    loop {
        match reader.next(Duration::from_millis(200)).await {
            Ok(Some(m)) if wanted(&m.service) => {
                if tx.send(m).await.is_err() {
                    return;
                }
            }
            Ok(_) if tx.is_closed() => return,
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(error = %crate::store::error_chain(&e), "control channel read failed; retrying");
                tokio::time::sleep(Duration::from_millis(100)).await;
                if tx.is_closed() {
                    return;
                }
            }
        }
    }
}

pub(crate) fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Whole microseconds of `d`, as the control records carry durations.
pub(crate) fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

pub(crate) fn message(
    service: &str,
    migration_id: &str,
    from: crate::Role,
    body: ControlBody,
) -> crate::ControlMessage {
    crate::ControlMessage {
        service: service.to_string(),
        migration_id: migration_id.to_string(),
        from,
        sent_at_ms: crate::snapshot::now_ms(),
        body,
    }
}

/// Publishes `body` as `from` in `migration` of `service`.
pub(crate) async fn publish_as<C: ControlChannel>(
    control: &C,
    service: &str,
    migration: &str,
    from: crate::Role,
    body: ControlBody,
) -> Result<(), Error> {
    publish(control, &message(service, migration, from, body)).await
}

pub(crate) async fn publish<C: ControlChannel>(control: &C, m: &crate::ControlMessage) -> Result<(), Error> {
    tracing::debug!(migration = %m.migration_id, from = ?m.from, body = ?m.body, "control message");
    let t = std::time::Instant::now();
    let r = control
        .publish(m)
        .await
        .map_err(|e| Error::backend(Component::Control, "publish", e));
    tracing::trace!(elapsed = ?t.elapsed(), "control message acknowledged");
    r
}

#[cfg(test)]
mod report_serde_tests {
    use super::*;
    use crate::TopicPartition;

    fn report() -> MigrationReport {
        let position = |offset: i64| -> Position {
            [
                (TopicPartition::new("orders", 0), offset),
                (TopicPartition::new("orders", 1), 7),
            ]
            .into_iter()
            .collect()
        };
        MigrationReport {
            strategy: Strategy::Ms2mThreshold,
            service: "orders".into(),
            migration_id: "m-1".into(),
            source: "a".into(),
            target: "b".into(),
            downtime_ms: 12.5,
            total_ms: 1154.25,
            checkpoint_ms: 23.1,
            transfer_ms: 107.6,
            restore_ms: 0.3,
            replay_ms: 1005.0,
            cutover_ms: 19.5,
            handover_ms: 12.5,
            control_trip_ms: Some(2.5),
            visible_before_live_ms: Some(2.0),
            source_stall_ms: 0.9,
            snapshot_bytes: 1 << 20,
            snapshot_pause_ms: 0.7,
            messages_replayed: 2280,
            final_gap: 20,
            lag_at_cutover: 20,
            cutover_reason: CutoverReason::ThresholdCutoff { cutoff_seconds: 1.0 },
            p0: position(100),
            pf: position(2380),
            digest_position: position(1200),
            source_digest: StateDigest(u128::MAX - 1),
            target_digest: StateDigest(u128::MAX - 1),
            digest_match: true,
        }
    }

    #[test]
    fn a_report_round_trips_through_a_json_value() {
        let report = report();
        let value = serde_json::to_value(&report).expect("a report is a JSON value");
        assert_eq!(
            value["source_digest"],
            serde_json::json!("fffffffffffffffffffffffffffffffe")
        );
        assert_eq!(serde_json::from_value::<MigrationReport>(value).unwrap(), report);
        let text = serde_json::to_string_pretty(&report).unwrap();
        assert_eq!(serde_json::from_str::<MigrationReport>(&text).unwrap(), report);
    }
}
