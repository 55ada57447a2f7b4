//! The coordinator's driver: runs a
//! [`CoordinatorMachine`](super::protocol::coordinator::CoordinatorMachine)
//! over a control channel. It publishes what the machine says, feeds it the
//! channel's records and the time, and tells the progress listener.

use std::sync::Arc;

use tokio::sync::mpsc::Receiver;
use tokio::time::Instant;
use tracing::{info, info_span, Instrument};

use super::protocol::coordinator::{CoordinatorAction, CoordinatorEvent, CoordinatorMachine};
use super::protocol::Decisions;
use super::{
    forward_control, message, publish, read_history, MigrationConfig, MigrationError, MigrationReport, Strategy,
};
use crate::control::{ControlChannel, ControlMessage, Role};
use crate::error::{Error, Result};
use crate::runtime::ProgressListener;

/// One migration to run.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct MigrationPlan {
    /// The service (its `StatefulService::NAME`).
    pub service: String,
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

/// What [`Coordinator::recover`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Recovered {
    /// The migration had already completed or been aborted.
    AlreadyFinished,
    /// The target had taken over: the source was released.
    Completed,
    /// `Stop` had been sent: the source was told to resume.
    RolledBack,
    /// The source had not stopped: the migration was abandoned.
    Aborted,
}

/// How a machine run ended.
enum Ended {
    Completed(Box<MigrationReport>),
    Recovered(Recovered),
}

impl<C: ControlChannel> Coordinator<C> {
    /// A coordinator publishing on `control`.
    pub fn new(control: Arc<C>, config: MigrationConfig) -> Self {
        Self { control, config }
    }

    /// Runs one migration to completion, or rolls it back and returns the
    /// error. Progress (phase, replay lag, ETA) goes to `listener`; the
    /// phase durations and the outcome go to the metrics
    /// ([`MIGRATION_PHASE_SECONDS`](crate::metrics::MIGRATION_PHASE_SECONDS),
    /// [`MIGRATIONS`](crate::metrics::MIGRATIONS)).
    pub async fn migrate(&self, plan: &MigrationPlan, listener: &dyn ProgressListener) -> Result<MigrationReport> {
        let span =
            info_span!("migrate", service = %plan.service, migration = %plan.migration_id, strategy = %plan.strategy);
        async move {
            // Subscribe before reading the history: a record in between
            // arrives twice, and folding it twice changes nothing.
            let mut replies = forward_control(&*self.control, plan.service.clone(), false).await?;
            let history = read_history(&*self.control, &plan.service).await?;
            let decisions = Decisions::from_history(&history);
            let epoch = decisions.owner().map_or(1, |o| o.epoch + 1);
            let mut machine = CoordinatorMachine::new(plan.clone(), self.config.clone(), epoch).knowing(decisions);
            let started = Instant::now();
            let first = machine.handle(started.elapsed(), CoordinatorEvent::Start);
            let ended = self.drive(&mut machine, first, &mut replies, started, listener).await;
            let ended = ended.and_then(|ended| match ended {
                Ended::Completed(report) => Ok(*report),
                Ended::Recovered(r) => Err(aborted(format!("unexpected recovery outcome {r:?}"))),
            });
            crate::metrics::record_migration(plan, &ended);
            ended.inspect(|report| {
                info!(
                    downtime_ms = report.downtime_ms,
                    total_ms = report.total_ms,
                    replayed = report.messages_replayed,
                    final_gap = report.final_gap,
                    "migration completed"
                )
            })
        }
        .instrument(span)
        .await
    }

    /// Finishes or rolls back a migration whose coordinator died, from the
    /// history on the control channel, deciding by channel order like every
    /// other party: if the target's `Takeover` is there first, the migration
    /// completes; if the source may have stopped, the target gets the phase
    /// timeout to take over; otherwise a rollback is published, and a
    /// `Takeover` that still lands before it wins.
    ///
    /// The names are taken by value (`String` or `&str`), so a command-line
    /// tool passes its arguments as they are.
    pub async fn recover(&self, service: impl Into<String>, migration_id: impl Into<String>) -> Result<Recovered> {
        let (service, migration_id) = (service.into(), migration_id.into());
        let mut replies = forward_control(&*self.control, service.clone(), false).await?;
        let history = read_history(&*self.control, &service).await?;
        let started = Instant::now();
        let (mut machine, first) = CoordinatorMachine::recover(
            &service,
            &migration_id,
            &history,
            self.config.clone(),
            started.elapsed(),
        );
        match self
            .drive(&mut machine, first, &mut replies, started, &*crate::no_progress())
            .await?
        {
            Ended::Recovered(r) => Ok(r),
            Ended::Completed(_) => Err(aborted("a recovering coordinator completed a migration".into())),
        }
    }

    /// Performs the machine's actions and feeds it records and time until
    /// it finishes.
    async fn drive(
        &self,
        machine: &mut CoordinatorMachine,
        mut actions: Vec<CoordinatorAction>,
        replies: &mut Receiver<ControlMessage>,
        started: Instant,
        listener: &dyn ProgressListener,
    ) -> Result<Ended> {
        loop {
            for action in std::mem::take(&mut actions) {
                match action {
                    CoordinatorAction::Publish(body) => {
                        machine.publishing(started.elapsed(), &body);
                        let plan = machine.plan();
                        let m = message(&plan.service, &plan.migration_id, Role::Coordinator, body);
                        publish(&*self.control, &m).await?;
                    }
                    CoordinatorAction::Progress(p) => listener.on_progress(&p),
                    CoordinatorAction::Completed(report) => return Ok(Ended::Completed(report)),
                    CoordinatorAction::Recovered(r) => return Ok(Ended::Recovered(r)),
                    CoordinatorAction::Failed(f) => return Err(Error::Migration(MigrationError::from(f))),
                }
            }
            let event = tokio::select! {
                biased;
                m = replies.recv() => match m {
                    Some(m) => CoordinatorEvent::Record(m),
                    None => return Err(aborted("control channel closed".into())),
                },
                () = tokio::time::sleep_until(started + machine.deadline()) => CoordinatorEvent::Tick,
            };
            actions = machine.handle(started.elapsed(), event);
        }
    }
}

fn aborted(reason: String) -> Error {
    Error::Migration(MigrationError::Aborted { reason })
}
