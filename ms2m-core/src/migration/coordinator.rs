//! The coordinator (the paper's migration manager): drives the phases over
//! the control channel and measures them. It holds no state of its own
//! beyond one migration: everything it decides is a message on the channel.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc::Receiver;
use tracing::{info, info_span, warn, Instrument};

use super::{
    forward_control, message, migration_outcome, ms, owner_from, publish, read_history, CutoverReason, MigrationConfig,
    MigrationError, MigrationOutcome, MigrationReport, Strategy,
};
use crate::control::{ControlBody, ControlChannel, ControlMessage, Role};
use crate::digest::StateDigest;
use crate::error::{Error, Result};
use crate::position::Position;
use crate::runtime::{eta, Progress, ProgressListener, ProgressPhase};

/// One migration to run.
#[derive(Clone, Debug)]
pub struct MigrationPlan {
    /// The service (its `StatefulService::NAME`).
    pub service: &'static str,
    /// A unique id for this migration.
    pub migration_id: String,
    /// Instance id of the current owner.
    pub source: String,
    /// Instance id of the standby target.
    pub target: String,
    /// The procedure.
    pub strategy: Strategy,
}

/// Drives migrations over a control channel.
#[derive(Debug)]
pub struct Coordinator<C> {
    control: Arc<C>,
    config: MigrationConfig,
}

/// What the coordinator learned along the way.
#[derive(Default)]
struct Facts {
    snapshot_id: u64,
    p0: Position,
    snapshot_bytes: u64,
    snapshot_pause: Duration,
    checkpoint: Duration,
    transfer: Duration,
    restore: Duration,
    replay: Duration,
    lag_at_cutover: u64,
    pf: Position,
    source_digest: Option<StateDigest>,
    reason: Option<CutoverReason>,
}

impl<C: ControlChannel> Coordinator<C> {
    /// A coordinator publishing on `control`.
    pub fn new(control: Arc<C>, config: MigrationConfig) -> Self {
        Self { control, config }
    }

    /// Runs one migration to completion, or rolls it back and returns the
    /// error. Progress (phase, replay lag, ETA) goes to `listener`.
    pub async fn migrate(&self, plan: &MigrationPlan, listener: &dyn ProgressListener) -> Result<MigrationReport> {
        let span =
            info_span!("migrate", service = plan.service, migration = %plan.migration_id, strategy = %plan.strategy);
        async move {
            let history = read_history(&*self.control, plan.service).await?;
            let epoch = owner_from(&history).map_or(1, |o| o.epoch + 1);
            let mut replies = forward_control(&*self.control, plan.service, false).await?;
            let started = Instant::now();
            let mut facts = Facts::default();
            let mut stop_sent: Option<Instant> = None;
            let result = self
                .run(plan, epoch, &mut replies, listener, started, &mut facts, &mut stop_sent)
                .await;
            let e = match result {
                Ok(report) => return Ok(report),
                // Decided for the target: nothing to roll back.
                Err(e @ Error::Migration(MigrationError::TakenOverNotLive { .. })) => return Err(e),
                Err(e) => e,
            };
            let reason = crate::store::error_chain(&e);
            warn!(%reason, stopped = stop_sent.is_some(), "migration failed; rolling back");
            if stop_sent.is_some() {
                let body = ControlBody::Resume {
                    owner: plan.source.clone(),
                    epoch: epoch + 1,
                };
                self.send(plan, body).await?;
            }
            self.send(plan, ControlBody::Aborted { reason }).await?;
            if stop_sent.is_none() {
                return Err(e);
            }
            // First writer wins: a takeover published before our rollback stands.
            let history = read_history(&*self.control, plan.service).await?;
            if migration_outcome(&history, &plan.migration_id) != Some(MigrationOutcome::TakenOver) {
                return Err(e);
            }
            warn!("the target's takeover came before our rollback: it owns the service; completing");
            if facts.source_digest.is_none() {
                if let Some((pf, digest)) = history.iter().find_map(|m| match &m.body {
                    ControlBody::Stopped { position, digest } if m.migration_id == plan.migration_id => {
                        Some((position.clone(), *digest))
                    }
                    _ => None,
                }) {
                    (facts.pf, facts.source_digest) = (pf, Some(digest));
                }
            }
            self.finish(plan, &mut replies, started, &mut facts, stop_sent, true)
                .await
        }
        .instrument(span)
        .await
    }

    #[allow(clippy::too_many_arguments)]
    async fn run(
        &self,
        plan: &MigrationPlan,
        epoch: u64,
        replies: &mut Receiver<ControlMessage>,
        listener: &dyn ProgressListener,
        started: Instant,
        facts: &mut Facts,
        stop_sent: &mut Option<Instant>,
    ) -> Result<MigrationReport> {
        let prepare = ControlBody::Prepare {
            source: plan.source.clone(),
            target: plan.target.clone(),
        };
        let reason = match plan.strategy {
            Strategy::Ms2m | Strategy::Ms2mThreshold => {
                self.checkpoint(plan, prepare, replies, listener, facts).await?;
                self.restore(plan, Some(facts.snapshot_id), replies, facts).await?;
                let replay_started = Instant::now();
                let reason = self.wait_for_cutover(plan, replies, listener, facts).await?;
                facts.replay = replay_started.elapsed();
                *stop_sent = Some(Instant::now());
                self.stop(plan, epoch, replies, facts).await?;
                reason
            }
            Strategy::StopAndCopy => {
                *stop_sent = Some(Instant::now());
                self.stop(plan, epoch, replies, facts).await?;
                self.checkpoint(plan, prepare, replies, listener, facts).await?;
                self.restore(plan, Some(facts.snapshot_id), replies, facts).await?;
                CutoverReason::StopFirst
            }
            Strategy::ColdStart => {
                *stop_sent = Some(Instant::now());
                self.stop(plan, epoch, replies, facts).await?;
                // The target learns the migration from Prepare; the source is
                // already stopped and does not checkpoint for a cold start.
                self.send(plan, prepare_target_only(plan)).await?;
                self.restore(plan, None, replies, facts).await?;
                CutoverReason::StopFirst
            }
        };
        facts.reason = Some(reason);
        listener.on_progress(&phase_only(ProgressPhase::Cutover));
        self.finish(plan, replies, started, facts, *stop_sent, false).await
    }

    /// Waits for the target's `Takeover` (unless already known) and `Live`,
    /// releases the source and publishes the report.
    #[allow(clippy::too_many_arguments)]
    async fn finish(
        &self,
        plan: &MigrationPlan,
        replies: &mut Receiver<ControlMessage>,
        started: Instant,
        facts: &mut Facts,
        stop_sent: Option<Instant>,
        takeover_known: bool,
    ) -> Result<MigrationReport> {
        let source_digest = facts.source_digest.ok_or_else(|| {
            Error::Migration(MigrationError::Aborted {
                reason: "the source's digest at Pf is unknown".into(),
            })
        })?;
        let reason = facts.reason.clone().unwrap_or(CutoverReason::StopFirst);
        // The target takes over on the source's Stopped; wait for it.
        if !takeover_known {
            self.wait(plan, replies, Role::Target, "target takeover", |b| {
                matches!(b, ControlBody::Takeover { .. }).then_some(())
            })
            .await?;
        }
        // Decided: from here on the target owns the service, whatever happens.
        let live = self.wait(plan, replies, Role::Target, "target live", |b| match b {
            ControlBody::Live { .. } => Some(b.clone()),
            _ => None,
        });
        let (digest, digest_match, replayed, final_gap) = match live.await {
            Ok(ControlBody::Live {
                digest,
                digest_match,
                replayed,
                final_gap,
                ..
            }) => (digest, digest_match, replayed, final_gap),
            Ok(_) => unreachable!("wait only returns Live"),
            Err(e) => {
                warn!(error = %e, "the target took over but did not report live");
                self.send(plan, ControlBody::Release).await?;
                return Err(Error::Migration(MigrationError::TakenOverNotLive {
                    target: plan.target.clone(),
                }));
            }
        };
        let live_at = Instant::now();
        let downtime = live_at - stop_sent.expect("every strategy stops the source");
        self.send(plan, ControlBody::Release).await?;
        let report = MigrationReport {
            strategy: plan.strategy,
            service: plan.service.to_string(),
            migration_id: plan.migration_id.clone(),
            source: plan.source.clone(),
            target: plan.target.clone(),
            downtime_ms: ms(downtime),
            total_ms: ms(live_at - started),
            checkpoint_ms: ms(facts.checkpoint),
            transfer_ms: ms(facts.transfer),
            restore_ms: ms(facts.restore),
            replay_ms: ms(facts.replay),
            cutover_ms: ms(downtime),
            snapshot_bytes: facts.snapshot_bytes,
            snapshot_pause_ms: ms(facts.snapshot_pause),
            messages_replayed: replayed,
            final_gap,
            lag_at_cutover: facts.lag_at_cutover,
            cutover_reason: reason,
            p0: facts.p0.clone(),
            pf: facts.pf.clone(),
            source_digest,
            target_digest: digest,
            digest_match,
        };
        info!(
            downtime_ms = report.downtime_ms,
            total_ms = report.total_ms,
            replayed,
            final_gap,
            "migration completed"
        );
        let report_json = serde_json::to_string(&report).expect("reports serialize");
        self.send(plan, ControlBody::Completed { report_json }).await?;
        Ok(report)
    }

    async fn checkpoint(
        &self,
        plan: &MigrationPlan,
        prepare: ControlBody,
        replies: &mut Receiver<ControlMessage>,
        listener: &dyn ProgressListener,
        facts: &mut Facts,
    ) -> Result<()> {
        listener.on_progress(&phase_only(ProgressPhase::Checkpoint));
        let t = Instant::now();
        self.send(plan, prepare).await?;
        let taken = self
            .wait(plan, replies, Role::Source, "source checkpoint", |b| match b {
                ControlBody::CheckpointTaken {
                    snapshot_id,
                    position,
                    bytes,
                    pause_us,
                } => Some((*snapshot_id, position.clone(), *bytes, *pause_us)),
                _ => None,
            })
            .await?;
        facts.checkpoint = t.elapsed();
        (facts.snapshot_id, facts.p0, facts.snapshot_bytes) = (taken.0, taken.1, taken.2);
        facts.snapshot_pause = Duration::from_micros(taken.3);
        Ok(())
    }

    async fn restore(
        &self,
        plan: &MigrationPlan,
        snapshot_id: Option<u64>,
        replies: &mut Receiver<ControlMessage>,
        facts: &mut Facts,
    ) -> Result<()> {
        self.send(plan, ControlBody::Restore { snapshot_id }).await?;
        let (transfer, restore) = self
            .wait(plan, replies, Role::Target, "target restore", |b| match b {
                ControlBody::Restored {
                    transfer_us,
                    restore_us,
                    ..
                } => Some((*transfer_us, *restore_us)),
                _ => None,
            })
            .await?;
        facts.transfer = Duration::from_micros(transfer);
        facts.restore = Duration::from_micros(restore);
        Ok(())
    }

    async fn stop(
        &self,
        plan: &MigrationPlan,
        epoch: u64,
        replies: &mut Receiver<ControlMessage>,
        facts: &mut Facts,
    ) -> Result<()> {
        self.send(plan, ControlBody::Stop { next_epoch: epoch }).await?;
        let (pf, digest) = self
            .wait(plan, replies, Role::Source, "source stop", |b| match b {
                ControlBody::Stopped { position, digest } => Some((position.clone(), *digest)),
                _ => None,
            })
            .await?;
        facts.pf = pf;
        facts.source_digest = Some(digest);
        Ok(())
    }

    /// Watches the target's replay progress until a cutover rule fires.
    async fn wait_for_cutover(
        &self,
        plan: &MigrationPlan,
        replies: &mut Receiver<ControlMessage>,
        listener: &dyn ProgressListener,
        facts: &mut Facts,
    ) -> Result<CutoverReason> {
        let rule = &self.config.cutover;
        let started = Instant::now();
        loop {
            let (lag, mu, lambda) = self
                .wait(plan, replies, Role::Target, "target progress", |b| match b {
                    ControlBody::TargetProgress {
                        lag,
                        apply_rate,
                        input_rate,
                        ..
                    } => Some((*lag, *apply_rate, *input_rate)),
                    _ => None,
                })
                .await?;
            let catch_up = (mu > lambda).then(|| lag as f64 / (mu - lambda));
            listener.on_progress(&Progress {
                phase: ProgressPhase::MigrationReplay,
                applied: 0,
                remaining: lag,
                rate: mu,
                eta: eta(lag, (mu - lambda).max(0.0)),
            });
            facts.lag_at_cutover = lag;
            if rule.max_lag.is_some_and(|max| lag <= max) {
                return Ok(CutoverReason::MaxLag { lag });
            }
            if let (Some(bound), Some(secs)) = (rule.max_catch_up, catch_up) {
                if secs <= bound.as_secs_f64() {
                    return Ok(CutoverReason::CatchUpEstimate { seconds: secs });
                }
            }
            if plan.strategy == Strategy::Ms2mThreshold {
                // ICIN 2025: T_cutoff = T_replay_max · mu / lambda when the
                // input outruns replay; never more than T_replay_max.
                let ratio = if lambda > 0.0 && mu < lambda { mu / lambda } else { 1.0 };
                let cutoff = rule.replay_max.as_secs_f64() * ratio;
                if started.elapsed().as_secs_f64() >= cutoff {
                    return Ok(CutoverReason::ThresholdCutoff { cutoff_seconds: cutoff });
                }
            }
        }
    }

    async fn send(&self, plan: &MigrationPlan, body: ControlBody) -> Result<()> {
        publish(
            &*self.control,
            &message(plan.service, &plan.migration_id, Role::Coordinator, body),
        )
        .await
    }

    /// Waits for a reply from `from` that `pick` accepts; a failure report
    /// from any party ends the wait with an error.
    async fn wait<T>(
        &self,
        plan: &MigrationPlan,
        replies: &mut Receiver<ControlMessage>,
        from: Role,
        waiting_for: &'static str,
        pick: impl Fn(&ControlBody) -> Option<T>,
    ) -> Result<T> {
        let deadline = tokio::time::Instant::now() + self.config.phase_timeout;
        loop {
            let m = match tokio::time::timeout_at(deadline, replies.recv()).await {
                Ok(Some(m)) => m,
                Ok(None) => {
                    return Err(Error::Migration(MigrationError::Aborted {
                        reason: "control channel closed".into(),
                    }))
                }
                Err(_) => return Err(Error::Migration(MigrationError::Timeout { waiting_for })),
            };
            if m.migration_id != plan.migration_id {
                continue;
            }
            if let ControlBody::CutoverFailed {
                reason,
                digest_mismatch,
            } = &m.body
            {
                return Err(Error::Migration(match digest_mismatch {
                    Some((source_digest, target_digest)) => MigrationError::DigestMismatch {
                        source_digest: *source_digest,
                        target_digest: *target_digest,
                    },
                    None => MigrationError::Aborted { reason: reason.clone() },
                }));
            }
            if m.from == from {
                if let Some(v) = pick(&m.body) {
                    return Ok(v);
                }
            }
        }
    }

    /// Finishes or rolls back a migration whose coordinator died, from the
    /// history on the control channel. Returns what it did.
    ///
    /// Decides by channel order like everyone else ([`migration_outcome`]):
    /// if the target's `Takeover` is there first, the migration completes;
    /// if the source may have stopped, the target gets the phase timeout to
    /// take over; otherwise a rollback is published, and a `Takeover` that
    /// still lands before it wins.
    pub async fn recover(&self, service: &'static str, migration_id: &str) -> Result<Recovered> {
        let history = self.history_of(service, migration_id).await?;
        let has = |h: &[ControlMessage], f: &dyn Fn(&ControlBody) -> bool| h.iter().any(|m| f(&m.body));
        if has(&history, &|b| matches!(b, ControlBody::Completed { .. })) {
            return Ok(Recovered::AlreadyFinished);
        }
        let prepare = history.iter().find_map(|m| match &m.body {
            ControlBody::Prepare { source, target } => Some((source.clone(), target.clone())),
            _ => None,
        });
        let plan = MigrationPlan {
            service,
            migration_id: migration_id.to_string(),
            source: prepare.as_ref().map(|p| p.0.clone()).unwrap_or_default(),
            target: prepare.as_ref().map(|p| p.1.clone()).unwrap_or_default(),
            strategy: Strategy::Ms2m,
        };
        let stop_epoch = history.iter().find_map(|m| match &m.body {
            ControlBody::Stop { next_epoch } => Some(*next_epoch),
            _ => None,
        });
        let mut outcome = migration_outcome(&history, migration_id);
        if outcome.is_none() && stop_epoch.is_some() {
            // The target takes over on its own once the source stopped: give
            // it the phase timeout before rolling back.
            outcome = self.await_decision(service, migration_id).await?;
        }
        match outcome {
            Some(MigrationOutcome::TakenOver) => return self.complete_recovered(&plan).await,
            Some(MigrationOutcome::RolledBack) => {
                if has(&history, &|b| matches!(b, ControlBody::Aborted { .. })) {
                    return Ok(Recovered::AlreadyFinished);
                }
                // Died between `Resume` and `Aborted`.
                let reason = "coordinator restarted after the rollback".to_string();
                self.send(&plan, ControlBody::Aborted { reason }).await?;
                return Ok(Recovered::RolledBack);
            }
            None => {}
        }
        let reason = "coordinator restarted before the target took over".to_string();
        if let Some(epoch) = stop_epoch {
            let body = ControlBody::Resume {
                owner: plan.source.clone(),
                epoch: epoch + 1,
            };
            self.send(&plan, body).await?;
        }
        self.send(&plan, ControlBody::Aborted { reason }).await?;
        // A `Stop` still in flight from the dead coordinator may land after
        // this read (fault-suite seed 62): the order decides, not the read.
        let history = self.history_of(service, migration_id).await?;
        match migration_outcome(&history, migration_id) {
            Some(MigrationOutcome::TakenOver) => self.complete_recovered(&plan).await,
            _ if stop_epoch.is_some() => Ok(Recovered::RolledBack),
            _ => Ok(Recovered::Aborted),
        }
    }

    async fn history_of(&self, service: &'static str, migration_id: &str) -> Result<Vec<ControlMessage>> {
        let mut history = read_history(&*self.control, service).await?;
        history.retain(|m| m.migration_id == migration_id);
        Ok(history)
    }

    /// The target took over: release the source and close the migration.
    async fn complete_recovered(&self, plan: &MigrationPlan) -> Result<Recovered> {
        self.send(plan, ControlBody::Release).await?;
        let body = ControlBody::Completed {
            report_json: "{\"recovered\":true}".into(),
        };
        self.send(plan, body).await?;
        Ok(Recovered::Completed)
    }
}

impl<C: ControlChannel> Coordinator<C> {
    /// The decision of `migration_id` once one is on the channel, waiting at
    /// most the phase timeout.
    async fn await_decision(&self, service: &'static str, migration_id: &str) -> Result<Option<MigrationOutcome>> {
        let deadline = Instant::now() + self.config.phase_timeout;
        while Instant::now() < deadline {
            let history = self.history_of(service, migration_id).await?;
            if let Some(outcome) = migration_outcome(&history, migration_id) {
                return Ok(Some(outcome));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(None)
    }
}

/// What [`Coordinator::recover`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Recovered {
    /// The migration had already completed or been aborted.
    AlreadyFinished,
    /// The target was live: the source was released.
    Completed,
    /// The source had stopped: it was told to resume.
    RolledBack,
    /// The source had not stopped: the migration was abandoned.
    Aborted,
}

fn prepare_target_only(plan: &MigrationPlan) -> ControlBody {
    // The source id is left empty so the (stopped) source does not checkpoint.
    ControlBody::Prepare {
        source: String::new(),
        target: plan.target.clone(),
    }
}

fn phase_only(phase: ProgressPhase) -> Progress {
    Progress {
        phase,
        applied: 0,
        remaining: 0,
        rate: 0.0,
        eta: None,
    }
}
