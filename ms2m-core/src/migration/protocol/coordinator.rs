//! The coordinator's protocol (the paper's migration manager): it sequences
//! the phases of one migration by publishing commands and reading the
//! parties' replies, decides when to cut over, and rolls back on failure.
//! Everything it decides is a record on the control channel.
//!
//! | strategy | sequence of commands (each waits for the reply before it) |
//! |---|---|
//! | MS2M (+ threshold) | `Prepare`, `Checkpoint` → `Restore(snapshot)` → (replay; cutover rule) `Stop` → await `Takeover`, `Live` |
//! | MS2M from the standby | `Prepare`, `RestoreFromStandby` → (replay; cutover rule) `Stop` → await `Takeover`, `Live` |
//! | stop-and-copy | `Prepare`, `Stop` → `Checkpoint` → `Restore(snapshot)` → await `Takeover`, `Live` |
//! | cold start | `Prepare`, `Stop` → `Restore(none)` → await `Takeover`, `Live` |
//!
//! A failure reported by a party (`CutoverFailed`) or a phase timeout rolls
//! the migration back: `Resume` (if `Stop` was sent) and `Aborted`.
//! The rollback is a bid, not a verdict: the coordinator then reads the
//! channel, and a target's `Takeover` that came first wins
//! ([`super::Decisions`]). After the decision for the target it waits for
//! `Live`, releases the source and publishes the report.
//!
//! Time arrives as the `now` argument of [`CoordinatorMachine::handle`]
//! (time since the coordinator started); [`CoordinatorMachine::deadline`]
//! says when the driver must call it with [`CoordinatorEvent::Tick`].

use std::time::Duration;

use super::{Decisions, Measured, MigrationFailure, Observed};
use crate::control::{ControlBody, ControlMessage, Role};
use crate::digest::StateDigest;
use crate::migration::{
    ms, CutoverReason, MigrationConfig, MigrationOutcome, MigrationPlan, MigrationReport, Recovered, Strategy,
};
use crate::position::Position;
use crate::runtime::{eta, Progress, ProgressPhase};

/// The coordinator's state for one migration.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct CoordinatorMachine {
    plan: MigrationPlan,
    config: MigrationConfig,
    /// The owner epoch the target takes.
    epoch: u64,
    phase: CoordinatorPhase,
    decisions: Decisions,
    /// `Stop` was published: a rollback must `Resume` the source.
    stop_sent: bool,
    /// A restarted coordinator finishing a migration (no report).
    recovering: bool,
    /// Why we roll back, while the rollback is being read back.
    rollback: Option<MigrationFailure>,
    /// When the current phase times out (the driver's clock).
    deadline: Duration,
    /// Replay (MS2M) started at this time (the threshold cutoff's clock).
    replay_started: Duration,
    /// `mu / lambda` of the latest progress, in thousandths, capped at 1000
    /// (the threshold cutoff is `T_replay_max` times this).
    replay_ratio_permille: u32,
    facts: Measured<Facts>,
}

/// Where the coordinator is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CoordinatorPhase {
    /// Waiting for the source's checkpoint.
    Checkpointing,
    /// Waiting for the target's restore.
    Restoring,
    /// Watching the target's replay until a cutover rule fires.
    Replaying,
    /// Waiting for the source to stop at Pf.
    Stopping,
    /// Waiting for the target's `Takeover`.
    AwaitingTakeover,
    /// Decided for the target; waiting for its `Live`.
    AwaitingLive,
    /// Rollback published; waiting to read the decision.
    RollingBack,
    /// Finished.
    Done,
}

/// What the coordinator learned along the way (for the report).
#[derive(Clone, Debug, Default)]
struct Facts {
    snapshot_bytes: u64,
    snapshot_pause: Duration,
    p0: Position,
    checkpoint: Duration,
    transfer: Duration,
    restore: Duration,
    replay: Duration,
    lag_at_cutover: u64,
    stop_sent_at: Duration,
    pf: Position,
    source_digest: Option<StateDigest>,
    /// Where the digests are compared (Pd, or Pf without a digest point).
    digest_position: Option<Position>,
    /// The source's longest stall before the stop.
    source_stall: Duration,
    /// One trip through the control channel: from publishing `Stop` to
    /// reading it back.
    control_trip: Option<Duration>,
    /// From the target's first visible outputs to its `Live` (`Live`'s
    /// `visible_before_us`).
    visible_before_live: Option<Duration>,
    reason: Option<CutoverReason>,
}

impl Facts {
    /// The handover as clients see it, from the source's last outputs to
    /// the target's first, on the coordinator's clock: its `cutover` (stop
    /// published to `Live` read) less the trip of `Stop` to the source and
    /// of `Live` back (each as long as `Stop`'s own trip back to the
    /// coordinator) and less the time between the target's first visible
    /// outputs and its `Live`. The `cutover` itself when the target did not
    /// report that time, `Stop` was not read back, or they add up to more
    /// than the `cutover` (a trip estimate gone wrong: the upper bound is
    /// the honest figure then).
    fn handover(&self, cutover: Duration) -> Duration {
        match (self.control_trip, self.visible_before_live) {
            (Some(trip), Some(after)) => cutover.checked_sub(trip * 2 + after).unwrap_or(cutover),
            _ => cutover,
        }
    }
}

/// What happened to the coordinator.
#[derive(Clone, Debug)]
pub enum CoordinatorEvent {
    /// Start the migration.
    Start,
    /// The next record of this migration on the control channel.
    Record(ControlMessage),
    /// Time passed (see [`CoordinatorMachine::deadline`]).
    Tick,
}

/// What the coordinator's driver must do.
#[derive(Clone, Debug)]
pub enum CoordinatorAction {
    /// Publish `body` for the migration.
    Publish(ControlBody),
    /// Tell the progress listener.
    Progress(Progress),
    /// The migration completed; the coordinator is done.
    Completed(Box<MigrationReport>),
    /// A restarted coordinator finished the migration.
    Recovered(Recovered),
    /// The migration failed (and was rolled back unless decided for the target).
    Failed(MigrationFailure),
}

/// What the target restores from.
#[derive(Clone, Copy, Debug)]
enum RestoreFrom {
    /// The migration's checkpoint.
    Snapshot(u64),
    /// The empty state (cold start).
    Empty,
    /// The state it holds as a standby.
    Standby,
}

impl CoordinatorMachine {
    /// A coordinator for `plan`; the target will take owner epoch `epoch`.
    pub fn new(plan: MigrationPlan, config: MigrationConfig, epoch: u64) -> Self {
        Self {
            plan,
            deadline: config.phase_timeout,
            config,
            epoch,
            phase: CoordinatorPhase::Checkpointing,
            decisions: Decisions::default(),
            stop_sent: false,
            recovering: false,
            rollback: None,
            replay_started: Duration::ZERO,
            replay_ratio_permille: 1000,
            facts: Measured::default(),
        }
    }

    /// The same machine, starting from the decisions already on the channel
    /// (the service's history before the migration started).
    pub fn knowing(mut self, decisions: Decisions) -> Self {
        self.decisions = decisions;
        self
    }

    /// Where the coordinator is.
    pub fn phase(&self) -> CoordinatorPhase {
        self.phase
    }

    /// The plan.
    pub fn plan(&self) -> &MigrationPlan {
        &self.plan
    }

    /// When the driver must deliver a [`CoordinatorEvent::Tick`] at the latest.
    pub fn deadline(&self) -> Duration {
        self.deadline
    }

    /// The driver is about to publish `body` (one of this machine's
    /// `Publish` actions) at `now`. A `Stop` published after another record
    /// of the same batch (stop-and-copy's `Prepare`) goes out only once
    /// that one is acknowledged: the stop, and the control trip measured
    /// from it, count from here. A driver that does not call this leaves
    /// them at the batch's time.
    pub fn publishing(&mut self, now: Duration, body: &ControlBody) {
        if matches!(body, ControlBody::Stop { .. }) && self.stop_sent && self.facts.0.control_trip.is_none() {
            self.facts.0.stop_sent_at = now;
        }
    }

    /// The transition function; `now` is the time since the coordinator started.
    pub fn handle(&mut self, now: Duration, event: CoordinatorEvent) -> Vec<CoordinatorAction> {
        if self.phase == CoordinatorPhase::Done {
            return Vec::new();
        }
        match event {
            CoordinatorEvent::Start => self.start(now),
            CoordinatorEvent::Record(m) => self.on_record(now, m),
            CoordinatorEvent::Tick if now >= self.deadline => self.on_timeout(now),
            CoordinatorEvent::Tick => Vec::new(),
        }
    }

    fn start(&mut self, now: Duration) -> Vec<CoordinatorAction> {
        let prepare = ControlBody::Prepare {
            source: self.plan.source.clone(),
            target: self.plan.target.clone(),
            digest_policy: self.config.digest_policy,
            strategy: Some(self.plan.strategy),
        };
        let mut actions = vec![CoordinatorAction::Publish(prepare)];
        match self.plan.strategy {
            Strategy::Ms2m | Strategy::Ms2mThreshold => actions.extend(self.enter_checkpoint(now)),
            Strategy::Ms2mFromStandby => actions.extend(self.enter_restore(now, RestoreFrom::Standby)),
            Strategy::StopAndCopy | Strategy::ColdStart => actions.extend(self.enter_stop(now)),
        }
        actions
    }

    fn enter(&mut self, now: Duration, phase: CoordinatorPhase) {
        self.phase = phase;
        self.deadline = now.saturating_add(self.config.phase_timeout);
    }

    fn enter_checkpoint(&mut self, now: Duration) -> Vec<CoordinatorAction> {
        self.enter(now, CoordinatorPhase::Checkpointing);
        self.facts.0.checkpoint = now;
        vec![
            progress(ProgressPhase::Checkpoint),
            CoordinatorAction::Publish(ControlBody::Checkpoint),
        ]
    }

    fn enter_stop(&mut self, now: Duration) -> Vec<CoordinatorAction> {
        self.enter(now, CoordinatorPhase::Stopping);
        self.stop_sent = true;
        self.facts.0.stop_sent_at = now;
        let stop = ControlBody::Stop { next_epoch: self.epoch };
        vec![CoordinatorAction::Publish(stop)]
    }

    fn enter_restore(&mut self, now: Duration, from: RestoreFrom) -> Vec<CoordinatorAction> {
        self.enter(now, CoordinatorPhase::Restoring);
        let body = match from {
            RestoreFrom::Snapshot(id) => ControlBody::Restore { snapshot_id: Some(id) },
            RestoreFrom::Empty => ControlBody::Restore { snapshot_id: None },
            RestoreFrom::Standby => ControlBody::RestoreFromStandby,
        };
        vec![CoordinatorAction::Publish(body)]
    }

    /// Every record of the service is folded into the decisions (a winning
    /// ownership claim decides this migration too); only this migration's
    /// records drive it further.
    fn on_record(&mut self, now: Duration, m: ControlMessage) -> Vec<CoordinatorAction> {
        match self.decisions.observe_for(&m, &self.plan.migration_id) {
            Observed::Decides(outcome) => return self.on_decision(now, outcome),
            Observed::AfterDecision(_) | Observed::Open => {}
        }
        if m.migration_id != self.plan.migration_id {
            return Vec::new();
        }
        if let ControlBody::CutoverFailed {
            reason,
            digest_mismatch,
        } = &m.body
        {
            let failure = match digest_mismatch {
                Some((source, target)) => MigrationFailure::DigestMismatch(*source, *target),
                None => MigrationFailure::Aborted(reason.clone()),
            };
            return self.fail(now, failure);
        }
        if let (ControlBody::Stop { .. }, Role::Coordinator) = (&m.body, m.from) {
            if self.stop_sent && self.facts.0.control_trip.is_none() {
                self.facts.0.control_trip = Some(now.saturating_sub(self.facts.0.stop_sent_at));
            }
            return Vec::new();
        }
        if let (ControlBody::DigestAt { position, digest }, Role::Source) = (&m.body, m.from) {
            (self.facts.0.source_digest, self.facts.0.digest_position) = (Some(*digest), Some(position.clone()));
            return Vec::new();
        }
        match (self.phase, m.from) {
            (CoordinatorPhase::Checkpointing, Role::Source) => self.on_checkpoint_taken(now, &m.body),
            (CoordinatorPhase::Restoring, Role::Target) => self.on_restored(now, &m.body),
            (CoordinatorPhase::Replaying, Role::Target) => self.on_target_progress(now, &m.body),
            (CoordinatorPhase::Stopping, Role::Source) => self.on_stopped(now, &m.body),
            (CoordinatorPhase::AwaitingLive, Role::Target) => self.on_live(now, &m.body),
            _ => Vec::new(),
        }
    }

    fn on_checkpoint_taken(&mut self, now: Duration, body: &ControlBody) -> Vec<CoordinatorAction> {
        let ControlBody::CheckpointTaken {
            snapshot_id,
            position,
            bytes,
            pause_us,
        } = body
        else {
            return Vec::new();
        };
        let facts = &mut self.facts.0;
        facts.checkpoint = now.saturating_sub(facts.checkpoint);
        (facts.p0, facts.snapshot_bytes) = (position.clone(), *bytes);
        facts.snapshot_pause = Duration::from_micros(*pause_us);
        self.enter_restore(now, RestoreFrom::Snapshot(*snapshot_id))
    }

    fn on_restored(&mut self, now: Duration, body: &ControlBody) -> Vec<CoordinatorAction> {
        let ControlBody::Restored {
            position,
            transfer_us,
            restore_us,
        } = body
        else {
            return Vec::new();
        };
        self.facts.0.transfer = Duration::from_micros(*transfer_us);
        self.facts.0.restore = Duration::from_micros(*restore_us);
        match self.plan.strategy {
            Strategy::Ms2mFromStandby => {
                // No checkpoint: replay starts where the target stood.
                self.facts.0.p0 = position.clone();
                self.replay_started = now;
                self.enter(now, CoordinatorPhase::Replaying);
            }
            Strategy::Ms2m | Strategy::Ms2mThreshold => {
                self.replay_started = now;
                self.enter(now, CoordinatorPhase::Replaying);
                self.deadline = self.deadline.min(self.threshold_deadline());
            }
            Strategy::StopAndCopy | Strategy::ColdStart => self.await_takeover(now),
        }
        Vec::new()
    }

    fn await_takeover(&mut self, now: Duration) {
        self.facts.0.reason.get_or_insert(CutoverReason::StopFirst);
        self.enter(now, CoordinatorPhase::AwaitingTakeover);
    }

    /// Watches the target's replay until a cutover rule fires.
    fn on_target_progress(&mut self, now: Duration, body: &ControlBody) -> Vec<CoordinatorAction> {
        let ControlBody::TargetProgress {
            position,
            lag,
            apply_rate,
            input_rate,
        } = body
        else {
            return Vec::new();
        };
        let (lag, mu, lambda) = (*lag, *apply_rate, *input_rate);
        self.replay_ratio_permille = if lambda > 0.0 && mu < lambda {
            (mu / lambda * 1000.0) as u32
        } else {
            1000
        };
        let mut actions = vec![CoordinatorAction::Progress(Progress {
            phase: ProgressPhase::MigrationReplay,
            applied: 0,
            remaining: lag,
            rate: mu,
            eta: eta(lag, (mu - lambda).max(0.0)),
        })];
        self.facts.0.lag_at_cutover = lag;
        let replaying_for = now.saturating_sub(self.replay_started);
        let reason = cutover_reason(&self.config, self.plan.strategy, lag, mu, lambda, replaying_for);
        // The lag rules wait until the target compared digests at the digest
        // point (its progress reaches Pd), so the comparison stays off the
        // cutover's path; the threshold cutoff is a time bound and does not.
        let compared = self
            .facts
            .0
            .digest_position
            .as_ref()
            .is_some_and(|pd| position.reaches(pd));
        let gated = reason
            .as_ref()
            .is_some_and(|r| !compared && !matches!(r, CutoverReason::ThresholdCutoff { .. }));
        if !gated {
            // Progress extends the phase; waiting for a digest point does
            // not (a source that died before it would hold the migration).
            self.deadline = now
                .saturating_add(self.config.phase_timeout)
                .min(self.threshold_deadline());
        }
        if let Some(reason) = reason.filter(|_| !gated) {
            actions.extend(self.cut_over(now, reason));
        }
        actions
    }

    /// When the threshold cutoff fires, even if no progress arrives (never,
    /// for the other strategies).
    fn threshold_deadline(&self) -> Duration {
        if self.plan.strategy != Strategy::Ms2mThreshold {
            return Duration::MAX;
        }
        let cutoff = self
            .config
            .cutover
            .replay_max
            .mul_f64(f64::from(self.replay_ratio_permille) / 1000.0);
        self.replay_started.saturating_add(cutoff)
    }

    fn cut_over(&mut self, now: Duration, reason: CutoverReason) -> Vec<CoordinatorAction> {
        self.facts.0.replay = now.saturating_sub(self.replay_started);
        self.facts.0.reason = Some(reason);
        self.enter_stop(now)
    }

    fn on_stopped(&mut self, now: Duration, body: &ControlBody) -> Vec<CoordinatorAction> {
        let ControlBody::Stopped {
            position,
            digest,
            longest_stall_us,
        } = body
        else {
            return Vec::new();
        };
        self.facts.0.pf = position.clone();
        if let Some(digest) = digest {
            // No digest point: the digests are compared at Pf.
            (self.facts.0.source_digest, self.facts.0.digest_position) = (Some(*digest), Some(position.clone()));
        }
        self.facts.0.source_stall = Duration::from_micros(*longest_stall_us);
        match self.plan.strategy {
            Strategy::Ms2m | Strategy::Ms2mThreshold | Strategy::Ms2mFromStandby => {
                self.await_takeover(now);
                vec![progress(ProgressPhase::Cutover)]
            }
            Strategy::StopAndCopy => self.enter_checkpoint(now),
            Strategy::ColdStart => self.enter_restore(now, RestoreFrom::Empty),
        }
    }

    /// The first decisive record of the migration.
    fn on_decision(&mut self, now: Duration, outcome: MigrationOutcome) -> Vec<CoordinatorAction> {
        match (outcome, self.recovering) {
            (MigrationOutcome::TakenOver, false) => {
                if self.rollback.take().is_some() {
                    tracing::warn!("the target's takeover came before our rollback: it owns the service");
                }
                self.enter(now, CoordinatorPhase::AwaitingLive);
                vec![progress(ProgressPhase::Cutover)]
            }
            (MigrationOutcome::TakenOver, true) => self.complete_recovered(),
            (MigrationOutcome::RolledBack, true) => {
                let recovered = if self.stop_sent {
                    Recovered::RolledBack
                } else {
                    Recovered::Aborted
                };
                self.finish(CoordinatorAction::Recovered(recovered))
            }
            (MigrationOutcome::RolledBack, false) => {
                let failure = self
                    .rollback
                    .take()
                    .unwrap_or_else(|| MigrationFailure::Aborted("rolled back by another coordinator".into()));
                self.finish(CoordinatorAction::Failed(failure))
            }
        }
    }

    fn on_live(&mut self, now: Duration, body: &ControlBody) -> Vec<CoordinatorAction> {
        let ControlBody::Live {
            digest,
            digest_match,
            replayed,
            final_gap,
            visible_before_us,
            ..
        } = body
        else {
            return Vec::new();
        };
        self.facts.0.visible_before_live = visible_before_us.map(Duration::from_micros);
        let report = self.report(now, *digest, *digest_match, *replayed, *final_gap);
        let report_json = serde_json::to_string(&report).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"));
        let mut actions = vec![
            CoordinatorAction::Publish(ControlBody::Release),
            CoordinatorAction::Publish(ControlBody::Completed { report_json }),
        ];
        actions.extend(self.finish(CoordinatorAction::Completed(Box::new(report))));
        actions
    }

    fn on_timeout(&mut self, now: Duration) -> Vec<CoordinatorAction> {
        let waiting_for = match self.phase {
            CoordinatorPhase::Checkpointing => "source checkpoint",
            CoordinatorPhase::Restoring => "target restore",
            CoordinatorPhase::Replaying if now >= self.threshold_deadline() => {
                let cutoff = self.threshold_deadline().saturating_sub(self.replay_started);
                let reason = CutoverReason::ThresholdCutoff {
                    cutoff_seconds: cutoff.as_secs_f64(),
                };
                return self.cut_over(now, reason);
            }
            CoordinatorPhase::Replaying => "target progress",
            CoordinatorPhase::Stopping => "source stop",
            CoordinatorPhase::AwaitingTakeover => "target takeover",
            CoordinatorPhase::AwaitingLive => {
                tracing::warn!("the target took over but did not report live");
                let mut actions = vec![CoordinatorAction::Publish(ControlBody::Release)];
                let failure = MigrationFailure::TakenOverNotLive(self.plan.target.clone());
                actions.extend(self.finish(CoordinatorAction::Failed(failure)));
                return actions;
            }
            CoordinatorPhase::RollingBack => {
                // Our own rollback never came back: the outcome is unknown
                // here; a restarted coordinator reads it from the channel.
                let failure = self
                    .rollback
                    .take()
                    .unwrap_or(MigrationFailure::Timeout("our rollback"));
                return self.finish(CoordinatorAction::Failed(failure));
            }
            CoordinatorPhase::Done => return Vec::new(),
        };
        self.fail(now, MigrationFailure::Timeout(waiting_for))
    }

    /// Bids to roll back: `Resume` the source if it was stopped, then
    /// `Aborted`; the decision is read back from the channel.
    fn fail(&mut self, now: Duration, failure: MigrationFailure) -> Vec<CoordinatorAction> {
        if matches!(
            self.phase,
            CoordinatorPhase::AwaitingLive | CoordinatorPhase::RollingBack
        ) {
            return Vec::new();
        }
        tracing::warn!(reason = %failure, stopped = self.stop_sent, "migration failed; rolling back");
        let mut actions = Vec::new();
        if self.stop_sent {
            actions.push(CoordinatorAction::Publish(ControlBody::Resume {
                owner: self.plan.source.clone(),
                epoch: self.epoch + 1,
            }));
        }
        actions.push(CoordinatorAction::Publish(ControlBody::Aborted {
            reason: failure.to_string(),
        }));
        self.enter(now, CoordinatorPhase::RollingBack);
        self.rollback = Some(failure);
        actions
    }

    fn finish(&mut self, action: CoordinatorAction) -> Vec<CoordinatorAction> {
        self.phase = CoordinatorPhase::Done;
        vec![action]
    }

    fn report(
        &self,
        now: Duration,
        digest: StateDigest,
        digest_match: bool,
        replayed: u64,
        final_gap: u64,
    ) -> MigrationReport {
        let facts = &self.facts.0;
        let cutover = now.saturating_sub(facts.stop_sent_at);
        let handover = facts.handover(cutover);
        let downtime = handover.max(facts.source_stall);
        MigrationReport {
            strategy: self.plan.strategy,
            service: self.plan.service.clone(),
            migration_id: self.plan.migration_id.clone(),
            source: self.plan.source.clone(),
            target: self.plan.target.clone(),
            downtime_ms: ms(downtime),
            total_ms: ms(now),
            checkpoint_ms: ms(facts.checkpoint),
            transfer_ms: ms(facts.transfer),
            restore_ms: ms(facts.restore),
            replay_ms: ms(facts.replay),
            cutover_ms: ms(cutover),
            handover_ms: ms(handover),
            control_trip_ms: facts.control_trip.map(ms),
            visible_before_live_ms: facts.visible_before_live.map(ms),
            source_stall_ms: ms(facts.source_stall),
            snapshot_bytes: facts.snapshot_bytes,
            snapshot_pause_ms: ms(facts.snapshot_pause),
            messages_replayed: replayed,
            final_gap,
            lag_at_cutover: facts.lag_at_cutover,
            cutover_reason: facts.reason.clone().unwrap_or(CutoverReason::StopFirst),
            p0: facts.p0.clone(),
            pf: facts.pf.clone(),
            digest_position: facts.digest_position.clone().unwrap_or_else(|| facts.pf.clone()),
            source_digest: facts.source_digest.unwrap_or(digest),
            target_digest: digest,
            digest_match,
        }
    }
}

/// A restarted coordinator (see [`super::super::Coordinator::recover`]).
impl CoordinatorMachine {
    /// Takes over `migration_id` from the service's `history` (in channel
    /// order) after its coordinator died, and returns
    /// the first actions. A decided migration is closed; an undecided one
    /// whose source stopped gives the target the phase timeout to take
    /// over, then rolls back; one whose source never stopped is rolled back
    /// at once.
    pub fn recover(
        service: &str,
        migration_id: &str,
        full_history: &[ControlMessage],
        config: MigrationConfig,
        now: Duration,
    ) -> (Self, Vec<CoordinatorAction>) {
        let own: Vec<ControlMessage> = full_history
            .iter()
            .filter(|m| m.migration_id == migration_id)
            .cloned()
            .collect();
        let history = own.as_slice();
        let mut machine = Self::new(plan_from_history(service, migration_id, history), config, 0);
        machine.recovering = true;
        machine.decisions = Decisions::from_history(full_history);
        let stop_epoch = history.iter().find_map(|m| match (&m.body, m.from) {
            (ControlBody::Stop { next_epoch }, Role::Coordinator) => Some(*next_epoch),
            _ => None,
        });
        machine.epoch = stop_epoch.unwrap_or(0);
        machine.stop_sent = stop_epoch.is_some();
        let finished = history.iter().any(|m| matches!(m.body, ControlBody::Completed { .. }));
        let aborted = history
            .iter()
            .any(|m| matches!((&m.body, m.from), (ControlBody::Aborted { .. }, Role::Coordinator)));
        let actions = match machine.decisions.outcome(migration_id) {
            _ if finished => machine.finish(CoordinatorAction::Recovered(Recovered::AlreadyFinished)),
            Some(MigrationOutcome::TakenOver) => machine.complete_recovered(),
            Some(MigrationOutcome::RolledBack) if aborted => {
                machine.finish(CoordinatorAction::Recovered(Recovered::AlreadyFinished))
            }
            Some(MigrationOutcome::RolledBack) => {
                // Died between `Resume` and `Aborted`.
                let reason = "coordinator restarted after the rollback".to_string();
                let mut actions = vec![CoordinatorAction::Publish(ControlBody::Aborted { reason })];
                actions.extend(machine.finish(CoordinatorAction::Recovered(Recovered::RolledBack)));
                actions
            }
            // The target takes over on its own once the source stopped:
            // give it the phase timeout before rolling back.
            None if machine.stop_sent => {
                machine.enter(now, CoordinatorPhase::AwaitingTakeover);
                Vec::new()
            }
            None => machine.fail(
                now,
                MigrationFailure::Aborted("coordinator restarted before the target took over".into()),
            ),
        };
        (machine, actions)
    }

    /// The target took over: release the source and close the migration.
    fn complete_recovered(&mut self) -> Vec<CoordinatorAction> {
        let mut actions = vec![
            CoordinatorAction::Publish(ControlBody::Release),
            CoordinatorAction::Publish(ControlBody::Completed {
                report_json: "{\"recovered\":true}".into(),
            }),
        ];
        actions.extend(self.finish(CoordinatorAction::Recovered(Recovered::Completed)));
        actions
    }
}

/// The plan a migration was started with, as far as its records tell (a
/// `Prepare` without a strategy, written before it carried one, means MS2M).
fn plan_from_history(service: &str, migration_id: &str, history: &[ControlMessage]) -> MigrationPlan {
    let prepare = history.iter().find_map(|m| match (&m.body, m.from) {
        (
            ControlBody::Prepare {
                source,
                target,
                strategy,
                ..
            },
            Role::Coordinator,
        ) => Some((source.clone(), target.clone(), *strategy)),
        _ => None,
    });
    let (source, target, strategy) = prepare.unwrap_or_default();
    MigrationPlan {
        service: service.to_string(),
        migration_id: migration_id.to_string(),
        source,
        target,
        strategy: strategy.unwrap_or(Strategy::Ms2m),
    }
}

/// Which cutover rule fires, if any: `max_lag`, the catch-up estimate
/// `lag / (mu - lambda)`, or (threshold strategy) `T_cutoff = T_replay_max ·
/// mu / lambda` when the input outruns replay, never more than `T_replay_max`.
pub fn cutover_reason(
    config: &MigrationConfig,
    strategy: Strategy,
    lag: u64,
    mu: f64,
    lambda: f64,
    replaying_for: Duration,
) -> Option<CutoverReason> {
    let rule = &config.cutover;
    if rule.max_lag.is_some_and(|max| lag <= max) {
        return Some(CutoverReason::MaxLag { lag });
    }
    let catch_up = (mu > lambda).then(|| lag as f64 / (mu - lambda));
    if let (Some(bound), Some(seconds)) = (rule.max_catch_up, catch_up) {
        if seconds <= bound.as_secs_f64() {
            return Some(CutoverReason::CatchUpEstimate { seconds });
        }
    }
    if strategy == Strategy::Ms2mThreshold {
        let ratio = if lambda > 0.0 && mu < lambda { mu / lambda } else { 1.0 };
        let cutoff = rule.replay_max.as_secs_f64() * ratio;
        if replaying_for.as_secs_f64() >= cutoff {
            return Some(CutoverReason::ThresholdCutoff { cutoff_seconds: cutoff });
        }
    }
    None
}

fn progress(phase: ProgressPhase) -> CoordinatorAction {
    CoordinatorAction::Progress(Progress {
        phase,
        applied: 0,
        remaining: 0,
        rate: 0.0,
        eta: None,
    })
}
