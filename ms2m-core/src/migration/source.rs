//! The source's driver: an owner that keeps serving while it is migrated
//! away. It runs a [`SourceMachine`] (the protocol) around an [`Instance`]
//! (the apply loop): records from the control channel, the background
//! checkpoint's result and the progress timer go in; the machine's actions
//! (checkpoint, publish, stop and commit, re-claim, release) come out.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::FutureExt;
use tokio::sync::mpsc::error::TryRecvError;
use tracing::{info, info_span, warn, Instrument};

use super::protocol::owner::{LeaseConfig, LeaseKeeper};
use super::protocol::source::{SourceAction, SourceEvent, SourceMachine};
use super::protocol::Decisions;
use super::{forward_control, publish_as, read_history, MigrationError};
use super::{lease_clock, micros};
use crate::control::{ControlBody, ControlChannel, ControlMessage, Role};
use crate::error::{Error, Result};
use crate::log::MessageLog;
use crate::runtime::Instance;
use crate::service::StatefulService;
use crate::sink::OutputSink;
use crate::store::SnapshotStore;

/// How the source agent behaves.
#[derive(Clone, Debug)]
pub struct SourceOptions {
    /// How often the source publishes its position during a migration (the
    /// target's replay ceiling and input-rate estimate). Default: 20 ms.
    pub progress_interval: Duration,
}

impl Default for SourceOptions {
    fn default() -> Self {
        Self {
            progress_interval: Duration::from_millis(20),
        }
    }
}

/// How [`run_source`] ended.
#[derive(Debug)]
pub enum SourceExit<I> {
    /// A migration completed: ownership moved to the target. The instance
    /// was stopped at Pf with everything committed; it is returned for
    /// inspection and must not be run again.
    Released(I),
    /// Shutdown was requested; the instance shut down gracefully.
    Shutdown(I),
}

/// Runs `instance` as the live owner, answering migration commands on
/// `control` until it is released to a target or `shutdown` completes.
/// Shorthand for [`SourceAgent::new`] + [`SourceAgent::run`].
pub async fn run_source<S, L, St, O, C>(
    instance: Instance<S, L, St, O>,
    control: Arc<C>,
    options: SourceOptions,
    shutdown: impl Future<Output = ()>,
) -> Result<SourceExit<Instance<S, L, St, O>>>
where
    S: StatefulService,
    L: MessageLog,
    St: SnapshotStore,
    O: OutputSink,
    C: ControlChannel,
{
    SourceAgent::new(instance, control, options).await?.run(shutdown).await
}

/// An owner subscribed to the control channel: once [`new`](Self::new)
/// returns, no command is missed.
pub struct SourceAgent<S, L, St, O, C>
where
    S: StatefulService,
    L: MessageLog,
    St: SnapshotStore,
    O: OutputSink,
{
    instance: Instance<S, L, St, O>,
    control: Arc<C>,
    options: SourceOptions,
    commands: tokio::sync::mpsc::Receiver<ControlMessage>,
    machine: SourceMachine,
    stalls: StallMeter,
    /// The digest point of a frozen state, computed on a blocking thread.
    digest_task: Option<DigestTask>,
    /// The owner's lease, when it keeps one ([`SourceAgent::with_lease`]).
    lease: Option<LeaseKeeper>,
    /// The lease lapsed and the agent waits for a renewal (logged once).
    lease_lapsed: bool,
    /// Reports the instance now and then while it serves.
    observer: Option<Observer<S, L, St, O>>,
}

/// A callback that sees the instance between steps (a node's status).
type Observer<S, L, St, O> = Box<dyn FnMut(&Instance<S, L, St, O>, &Decisions) + Send>;

type DigestTask = tokio::task::JoinHandle<
    std::result::Result<(crate::position::Position, crate::digest::StateDigest), tokio::task::JoinError>,
>;

/// The longest stall of the apply loop during a migration: the longest gap
/// between two steps of the loop (the agent's own protocol work, a
/// checkpoint's serialization) or inside one (a commit), measured from the
/// migration's first record to the stop.
#[derive(Debug, Default)]
struct StallMeter {
    /// The migration being measured.
    migration: Option<String>,
    /// When the last step of the apply loop ended.
    last_step_end: Option<Instant>,
    longest: Duration,
}

impl StallMeter {
    /// Starts measuring anew when the machine entered another migration.
    fn follow(&mut self, migration: Option<&str>) -> bool {
        if self.migration.as_deref() == migration {
            return false;
        }
        self.migration = migration.map(str::to_string);
        self.longest = Duration::ZERO;
        true
    }

    fn step_started(&mut self) {
        if let Some(end) = self.last_step_end {
            self.longest = self.longest.max(end.elapsed());
        }
    }

    fn step_ended(&mut self, inside: Duration) {
        self.longest = self.longest.max(inside);
        self.last_step_end = Some(Instant::now());
    }
}

impl<S, L, St, O, C> std::fmt::Debug for SourceAgent<S, L, St, O, C>
where
    S: StatefulService,
    L: MessageLog,
    St: SnapshotStore,
    O: OutputSink,
{
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SourceAgent")
            .field("instance", &self.instance)
            .field("machine", &self.machine)
            .finish_non_exhaustive()
    }
}

/// A reader of the control channel caught up to a point: what the records
/// up to it decided, those of them that belong to migrations still open
/// then (in channel order; more may be given, the machine skips decided
/// ones), and every record after it.
pub(crate) struct ChannelFeed {
    pub(crate) decisions: Decisions,
    pub(crate) open_records: Vec<ControlMessage>,
    pub(crate) records: tokio::sync::mpsc::Receiver<ControlMessage>,
}

/// Whether the agent goes on.
#[derive(Debug, PartialEq, Eq)]
enum Flow {
    Continue,
    Released,
}

impl<S, L, St, O, C> SourceAgent<S, L, St, O, C>
where
    S: StatefulService,
    L: MessageLog,
    St: SnapshotStore,
    O: OutputSink,
    C: ControlChannel,
{
    /// The id served (the service's name or a task's).
    fn service(&self) -> &str {
        self.instance.config().service_id_of::<S>()
    }

    /// Subscribes to `control` for commands addressed to this instance, and
    /// catches up with the channel's history before it returns.
    ///
    /// Migrations decided in the past are skipped; an undecided one that
    /// stopped this instance before it restarted is taken up again (it
    /// stays stopped at the position it committed, and says so again) before
    /// the instance applies anything: serving first would let it move past
    /// the Pf a target may already be taking over at. Fails with
    /// [`Error::Fenced`] if the channel names another owner.
    pub async fn new(instance: Instance<S, L, St, O>, control: Arc<C>, options: SourceOptions) -> Result<Self> {
        // Subscribe before reading the history: a record published in
        // between arrives twice, which the machine ignores.
        let service = instance.config().service_id_of::<S>().to_string();
        let records = forward_control(&*control, service.clone(), false).await?;
        let history = read_history(&*control, &service).await?;
        let feed = ChannelFeed {
            decisions: Decisions::from_history(&history),
            open_records: history,
            records,
        };
        Self::following(instance, control, options, feed).await
    }

    /// Like [`new`](Self::new), from a reader of the channel that is
    /// already caught up (a node's running view): no history is read again.
    pub(crate) async fn following(
        instance: Instance<S, L, St, O>,
        control: Arc<C>,
        options: SourceOptions,
        feed: ChannelFeed,
    ) -> Result<Self> {
        let me = instance.config().instance_id().to_string();
        if let Some(owner) = feed.decisions.owner().filter(|o| o.instance_id != me) {
            return Err(Error::Fenced {
                current_epoch: owner.epoch,
            });
        }
        let mut agent = Self {
            instance,
            control,
            options,
            commands: feed.records,
            machine: SourceMachine::new(me, feed.decisions),
            stalls: StallMeter::default(),
            digest_task: None,
            lease: None,
            lease_lapsed: false,
            observer: None,
        };
        for m in feed.open_records {
            agent.feed(SourceEvent::Record(m)).await?;
        }
        Ok(agent)
    }

    /// Keeps a lease while serving (see [`protocol::owner`](super::protocol::owner)):
    /// renews it on the control channel every `config.interval` and applies
    /// input (so emits outputs) only while it is valid. A winning claim of
    /// another node releases the agent like a migration does. `granted_at`:
    /// a time before the record that made this instance the owner was
    /// published, if known; without it the agent applies nothing until its
    /// first renewal is read back.
    pub fn with_lease(mut self, config: LeaseConfig, granted_at: Option<Instant>) -> Self {
        let me = self.instance.config().instance_id().to_string();
        self.lease = Some(LeaseKeeper::new(me, config, granted_at.map(lease_clock)));
        self
    }

    /// Calls `observer` with the instance and the channel's decisions
    /// between steps (at most every `progress_interval`).
    pub fn with_observer(mut self, observer: impl FnMut(&Instance<S, L, St, O>, &Decisions) + Send + 'static) -> Self {
        self.observer = Some(Box::new(observer));
        self
    }

    /// Runs the agent on its own task; the handle stops or joins it.
    pub fn spawn(self) -> SourceHandle<Instance<S, L, St, O>> {
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(self.run(async move {
            // A dropped handle also stops the agent.
            let _ = stopped.await;
        }));
        SourceHandle { task, stop }
    }

    /// Serves live and answers migration commands until released or shut down.
    pub async fn run(mut self, shutdown: impl Future<Output = ()>) -> Result<SourceExit<Instance<S, L, St, O>>> {
        let span = info_span!("source", service = self.service(), instance = %self.instance.config().instance_id());
        async move {
            let mut shutdown = std::pin::pin!(shutdown);
            self.instance.go_live_if_standby();
            let mut last_progress = Instant::now();
            loop {
                if shutdown.as_mut().now_or_never().is_some() {
                    return self.shut_down().await;
                }
                if self.turn(&mut last_progress).await? == Flow::Released {
                    return Ok(SourceExit::Released(self.instance));
                }
            }
        }
        .instrument(span)
        .await
    }

    /// One turn of the loop: control records, the checkpoint, progress, and
    /// one step of the apply loop (or a wait, while stopped).
    async fn turn(&mut self, last_progress: &mut Instant) -> Result<Flow> {
        loop {
            match self.commands.try_recv() {
                Ok(m) => self.feed(SourceEvent::Record(m)).await?,
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => return Err(control_reader_stopped()),
            };
            if self.machine.is_released() {
                return Ok(Flow::Released);
            }
        }
        if let Some(result) = self.instance.poll_checkpoint().await {
            self.feed(checkpoint_event(result)).await?;
        }
        if let Some(event) = self.poll_digest().await {
            self.feed(event).await?;
        }
        if last_progress.elapsed() >= self.options.progress_interval {
            *last_progress = Instant::now();
            self.feed(SourceEvent::ProgressDue).await?;
            if let Some(observe) = self.observer.as_mut() {
                observe(&self.instance, self.machine.decisions());
            }
        }
        self.renew_lease_if_due();
        if self.machine.may_apply() && !self.lease_allows() {
            return self.wait_for_lease().await;
        }
        if std::mem::take(&mut self.lease_lapsed) {
            info!("lease valid again: serving");
        }
        if self.machine.may_apply() {
            self.stalls.step_started();
            self.instance.step().await?;
            let inside = self.instance.take_longest_stall();
            self.stalls.step_ended(inside);
        } else if !self.machine.is_released() {
            self.wait_while_stopped().await?;
        }
        Ok(if self.machine.is_released() {
            Flow::Released
        } else {
            Flow::Continue
        })
    }

    /// Whether the lease (if the agent keeps one) lets it emit now.
    fn lease_allows(&self) -> bool {
        self.lease
            .as_ref()
            .is_none_or(|l| l.may_emit(lease_clock(Instant::now())))
    }

    /// Publishes a renewal when one is due, on its own task: the apply
    /// loop never waits for the channel's acknowledgement.
    fn renew_lease_if_due(&mut self) {
        let Some(lease) = self.lease.as_mut() else {
            return;
        };
        let Some(body) = lease.renewal_due(lease_clock(Instant::now()), self.machine.decisions()) else {
            return;
        };
        let control = Arc::clone(&self.control);
        let service = self.service().to_string();
        tokio::spawn(async move {
            if let Err(e) = publish_as(&*control, &service, "", Role::Node, body).await {
                warn!(error = %e, "could not renew the lease; retrying");
            }
        });
    }

    /// The lease lapsed (renewals not read back in time: a partition, a
    /// pause, a slow channel): apply nothing until a renewal is read back,
    /// or another node's claim releases this one.
    async fn wait_for_lease(&mut self) -> Result<Flow> {
        if !self.lease_lapsed {
            self.lease_lapsed = true;
            warn!("lease not valid: emitting nothing until a renewal is read back");
        }
        let event = tokio::select! {
            m = self.commands.recv() => match m {
                Some(m) => SourceEvent::Record(m),
                None => return Err(control_reader_stopped()),
            },
            () = tokio::time::sleep(Duration::from_millis(10)) => return Ok(Flow::Continue),
        };
        self.feed(event).await?;
        Ok(if self.machine.is_released() {
            Flow::Released
        } else {
            Flow::Continue
        })
    }

    /// Stopped at Pf: applies nothing; waits for the decision (or the
    /// checkpoint a stop-and-copy takes after the stop).
    async fn wait_while_stopped(&mut self) -> Result<()> {
        let wait = self.instance.config().poll_timeout();
        let checkpoint = async {
            match self.instance.wait_checkpoint().await {
                Some(result) => result,
                None => std::future::pending().await,
            }
        };
        let event = tokio::select! {
            m = self.commands.recv() => match m {
                Some(m) => SourceEvent::Record(m),
                None => return Err(control_reader_stopped()),
            },
            result = checkpoint => checkpoint_event(result),
            () = tokio::time::sleep(wait) => return Ok(()),
        };
        self.feed(event).await
    }

    /// Runs the machine on `event` and performs its actions (and those of
    /// the events the actions cause).
    async fn feed(&mut self, event: SourceEvent) -> Result<()> {
        let mut events = std::collections::VecDeque::from([event]);
        while let Some(event) = events.pop_front() {
            let record = match (&event, self.lease.is_some()) {
                (SourceEvent::Record(m), true) => Some(m.clone()),
                _ => None,
            };
            let actions = self.machine.handle(event);
            if let (Some(m), Some(lease)) = (record, self.lease.as_mut()) {
                lease.on_record(&m, self.machine.decisions());
            }
            if self.stalls.follow(self.machine.migration()) {
                // Pauses before this migration are not its downtime.
                self.instance.take_longest_stall();
            }
            for action in actions {
                if let Some(next) = self.perform(action).await? {
                    events.push_back(next);
                }
            }
        }
        Ok(())
    }

    async fn perform(&mut self, action: SourceAction) -> Result<Option<SourceEvent>> {
        match action {
            SourceAction::StartCheckpoint => {
                info!(migration = ?self.machine.migration(), "migration checkpoint: serializing, uploading in the background");
                if let Err(e) = self.instance.start_checkpoint().await {
                    return Ok(Some(SourceEvent::CheckpointFailed(crate::store::error_chain(&e))));
                }
            }
            SourceAction::Publish { migration, body } => {
                publish_as(&*self.control, self.service(), &migration, Role::Source, body).await?
            }
            SourceAction::TakeDigest => return Ok(self.take_digest()),
            SourceAction::PublishProgress { migration } => {
                let position = self.instance.position().clone();
                publish_as(
                    &*self.control,
                    self.service(),
                    &migration,
                    Role::Source,
                    ControlBody::SourceProgress { position },
                )
                .await?;
            }
            SourceAction::CommitAndPublishStopped { migration, digest } => {
                self.stalls.step_started();
                self.instance.commit().await?;
                let position = self.instance.position().clone();
                // Without a digest point, the digest at Pf (on the cutover's path).
                let digest = digest.then(|| self.instance.digest());
                let longest_stall = self.stalls.longest;
                info!(%migration, %position, ?digest, ?longest_stall, "stopped for cutover");
                let longest_stall_us = micros(longest_stall);
                publish_as(
                    &*self.control,
                    self.service(),
                    &migration,
                    Role::Source,
                    ControlBody::Stopped {
                        position,
                        digest,
                        longest_stall_us,
                    },
                )
                .await?;
            }
            SourceAction::Claim => {
                warn!("migration rolled back after the stop: resuming as owner");
                self.instance.claim().await?;
            }
            SourceAction::Release => info!("released: another instance owns the service now"),
        }
        Ok(None)
    }

    /// Takes the digest point: of a frozen copy on a blocking thread (the
    /// apply loop pauses only for the freeze), or on the apply loop for a
    /// state that does not freeze.
    fn take_digest(&mut self) -> Option<SourceEvent> {
        let position = self.instance.position().clone();
        match self.instance.state().freeze() {
            Some(frozen) => {
                let task = tokio::spawn(crate::heavy::off_loop(move || (position, frozen.digest())));
                self.digest_task = Some(task);
                None
            }
            None => Some(SourceEvent::DigestTaken {
                position,
                digest: self.instance.digest(),
            }),
        }
    }

    async fn poll_digest(&mut self) -> Option<SourceEvent> {
        if !self.digest_task.as_ref().is_some_and(|t| t.is_finished()) {
            return None;
        }
        match self.digest_task.take()?.await.and_then(|digested| digested) {
            Ok((position, digest)) => Some(SourceEvent::DigestTaken { position, digest }),
            Err(join) if join.is_panic() => std::panic::resume_unwind(join.into_panic()),
            // Aborted: only when the agent is dropped.
            Err(_) => None,
        }
    }

    async fn shut_down(mut self) -> Result<SourceExit<Instance<S, L, St, O>>> {
        if self.machine.may_apply() {
            self.instance.shutdown().await?;
        }
        // Otherwise stopped at Pf for a handover: outputs are committed, and a
        // final snapshot would only race the new owner.
        Ok(SourceExit::Shutdown(self.instance))
    }
}

fn checkpoint_event(result: Result<crate::runtime::CheckpointInfo>) -> SourceEvent {
    match result {
        Ok(info) => SourceEvent::CheckpointStored(info),
        Err(e) => SourceEvent::CheckpointFailed(crate::store::error_chain(&e)),
    }
}

fn control_reader_stopped() -> Error {
    Error::Migration(MigrationError::Aborted {
        reason: "control channel reader stopped".into(),
    })
}

/// A [`SourceAgent`] running on its own task ([`SourceAgent::spawn`]).
#[derive(Debug)]
pub struct SourceHandle<I> {
    task: tokio::task::JoinHandle<Result<SourceExit<I>>>,
    stop: tokio::sync::oneshot::Sender<()>,
}

impl<I: Send + 'static> SourceHandle<I> {
    /// Asks the agent to shut down gracefully (unless a migration released
    /// it already) and waits for it.
    pub async fn stop(self) -> Result<SourceExit<I>> {
        let _ = self.stop.send(());
        join(self.task).await
    }

    /// Waits for the agent to end on its own: released to a migration's
    /// target, or failed.
    pub async fn join(self) -> Result<SourceExit<I>> {
        // Hold the stop sender until the task ends: dropping it stops the agent.
        let Self { task, stop: _keep } = self;
        join(task).await
    }

    /// Whether the agent's task has ended.
    pub fn is_finished(&self) -> bool {
        self.task.is_finished()
    }

    /// Kills the agent's task at its next await point (a crash, for tests:
    /// nothing is committed or snapshotted).
    pub fn abort(&self) {
        self.task.abort();
    }
}

async fn join<I>(task: tokio::task::JoinHandle<Result<SourceExit<I>>>) -> Result<SourceExit<I>> {
    match task.await {
        Ok(result) => result,
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Err(_) => Err(Error::Migration(MigrationError::Aborted {
            reason: "the source agent's task was aborted".into(),
        })),
    }
}
