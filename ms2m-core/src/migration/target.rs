//! The target's driver: a standby that runs a [`TargetMachine`] (the
//! protocol) and, once named by a migration, an [`Instance`] restored from
//! the source's checkpoint, replaying behind the source up to the ceiling
//! the machine sets. It measures replay progress (lag, rates) for the
//! coordinator's cutover rule.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::{debug, info, info_span, warn, Instrument};

use super::protocol::target::{TargetAction, TargetEvent, TargetMachine, TargetPhase};
use super::protocol::Decisions;
use super::{forward_control, micros, publish_as, read_history, MigrationError};
use crate::control::{ControlBody, ControlChannel, ControlMessage, Role};
use crate::error::{Error, Result};
use crate::log::MessageLog;
use crate::position::Position;
use crate::runtime::{Backends, Instance, InstanceConfig, ProgressListener, ProgressPhase, RateMeter};
use crate::service::StatefulService;
use crate::sink::OutputSink;
use crate::store::{LoadedSnapshot, SnapshotId, SnapshotStore};

/// How the target behaves.
#[derive(Clone, Debug)]
pub struct TargetOptions {
    /// How often replay progress is published. Default: 20 ms.
    pub progress_interval: Duration,
    /// How long to wait for the next record of a migration once it started.
    /// Default: 60 s.
    pub phase_timeout: Duration,
    /// Stand by warm: restore the newest snapshot that verifies (or the
    /// empty state) at start and, until a migration names this target,
    /// replay behind the owner's committed position with outputs
    /// suppressed. A move with [`Strategy::Ms2mFromStandby`] then keeps
    /// this state: no checkpoint is taken, transferred or restored, and
    /// neither the move's downtime nor its transfer grows with the state
    /// (the digest at the digest point still reads the whole state, off
    /// the apply loop for a state that freezes). A move with a checkpoint
    /// discards it and restores the checkpoint. It reports
    /// [`ProgressPhase::Standby`] to the listener while it follows. If
    /// following fails (the log, the sink's committed position, a record
    /// that fails to apply), it stands by cold, as without this option.
    /// Costs a full copy of the state in this process and the replay's CPU
    /// while waiting. Default: false (the target holds nothing until a
    /// migration names it).
    ///
    /// [`Strategy::Ms2mFromStandby`]: super::Strategy::Ms2mFromStandby
    pub warm: bool,
}

impl Default for TargetOptions {
    fn default() -> Self {
        Self {
            progress_interval: Duration::from_millis(20),
            phase_timeout: Duration::from_secs(60),
            warm: false,
        }
    }
}

/// How often a warm target reads the owner's committed position (its
/// ceiling while it follows).
const WARM_REFRESH: Duration = Duration::from_millis(100);
/// How long a warm target waits for input in one step.
const WARM_POLL: Duration = Duration::from_millis(10);

/// Waits as a standby for a migration naming `config.instance_id()` as its
/// target, restores the checkpoint, replays behind the source, and when the
/// source reports it stopped at Pf, replays to Pf, checks the digest, takes
/// over, claims the output sink and returns the instance live at Pf, ready
/// to [`run`](Instance::run) (or to [`SourceAgent`](super::SourceAgent) for
/// the next migration).
///
/// The channel is read from its start, so a standby that subscribes after
/// the coordinator spoke still sees its migration; migrations already
/// decided are skipped. With [`TargetOptions::warm`] the target restores
/// and follows the owner before it is named.
pub async fn run_target<S, L, St, O, C>(
    backends: Backends<L, St, O>,
    config: InstanceConfig,
    control: Arc<C>,
    options: TargetOptions,
    listener: &dyn ProgressListener,
) -> Result<Instance<S, L, St, O>>
where
    S: StatefulService,
    L: MessageLog,
    St: SnapshotStore,
    O: OutputSink,
    C: ControlChannel,
{
    let start = if options.warm {
        warm_start::<S, L, St, O>(backends, &config).await?
    } else {
        TargetStart::Backends(backends)
    };
    Ok(serve_as_target(start, config, control, options, listener).await?.0)
}

/// A warm target's instance: the newest snapshot that verifies (or the
/// empty state), outputs suppressed. A store that cannot be read leaves the
/// target cold (it restores when named), with a warning: the store may be
/// back by then.
async fn warm_start<S, L, St, O>(
    backends: Backends<L, St, O>,
    config: &InstanceConfig,
) -> Result<TargetStart<S, L, St, O>>
where
    S: StatefulService,
    L: MessageLog,
    St: SnapshotStore,
    O: OutputSink,
{
    let service = config.service_id_of::<S>().to_string();
    match crate::store::load_newest_logged::<S, St>(&*backends.store, &service).await {
        Ok(loaded) => {
            let instance = Instance::restore(backends, config.clone(), loaded).await?;
            info!(position = %instance.position(), "standing by warm");
            Ok(TargetStart::Standby(Box::new(instance)))
        }
        Err(e) => {
            warn!(error = %crate::store::error_chain(&e), "cannot load a snapshot: standing by cold");
            Ok(TargetStart::Backends(backends))
        }
    }
}

/// What a target starts from.
pub(crate) enum TargetStart<S, L, St, O>
where
    S: StatefulService,
    L: MessageLog,
    St: SnapshotStore,
    O: OutputSink,
{
    /// Fresh backends: every restore fetches its state.
    Backends(Backends<L, St, O>),
    /// A standby's instance: kept by a restore from the standby
    /// ([`Strategy::Ms2mFromStandby`](super::Strategy::Ms2mFromStandby)),
    /// else taken apart for its backends.
    Standby(Box<Instance<S, L, St, O>>),
}

impl<S, L, St, O> TargetStart<S, L, St, O>
where
    S: StatefulService,
    L: MessageLog,
    St: SnapshotStore,
    O: OutputSink,
{
    fn into_backends(self) -> Backends<L, St, O> {
        match self {
            TargetStart::Backends(backends) => backends,
            TargetStart::Standby(instance) => (*instance).into_parts().2,
        }
    }
}

/// [`run_target`] from `start`, also returning when the target was about to
/// publish its `Takeover` (the start of its owner lease), if this run
/// published it.
pub(crate) async fn serve_as_target<S, L, St, O, C>(
    mut start: TargetStart<S, L, St, O>,
    config: InstanceConfig,
    control: Arc<C>,
    options: TargetOptions,
    listener: &dyn ProgressListener,
) -> Result<(Instance<S, L, St, O>, Option<Instant>)>
where
    S: StatefulService,
    L: MessageLog,
    St: SnapshotStore,
    O: OutputSink,
    C: ControlChannel,
{
    let me = config.instance_id().to_string();
    let service = config.service_id_of::<S>().to_string();
    let span = info_span!("target", service = %service, instance = %me);
    async move {
        let decisions = Decisions::from_history(&read_history(&*control, &service).await?);
        if let TargetStart::Standby(instance) = &mut start {
            // Inputs an operator skipped before this target started.
            instance.skip_inputs(decisions.skipped_inputs().iter().cloned());
        }
        let commands = forward_control(&*control, service.clone(), true).await?;
        let mut driver = TargetDriver {
            machine: TargetMachine::new(me, decisions),
            service: service.clone(),
            commands,
            control,
            options,
            listener,
            parts: Some((start, config)),
            instance: None,
            replay: Replay::default(),
            last_heard: Instant::now(),
            takeover_sent: None,
            ceiling_read: None,
        };
        let live = driver.run().await?;
        Ok((live, driver.takeover_sent))
    }
    .instrument(span)
    .await
}

/// The target's I/O around its machine.
struct TargetDriver<'a, S, L, St, O, C>
where
    S: StatefulService,
    L: MessageLog,
    St: SnapshotStore,
    O: OutputSink,
{
    machine: TargetMachine,
    /// The id served (the service's name or a task's).
    service: String,
    commands: tokio::sync::mpsc::Receiver<ControlMessage>,
    control: Arc<C>,
    options: TargetOptions,
    listener: &'a dyn ProgressListener,
    /// What the instance is built from, until the restore.
    parts: Option<(TargetStart<S, L, St, O>, InstanceConfig)>,
    instance: Option<Instance<S, L, St, O>>,
    replay: Replay,
    /// When a record of our migration last arrived (the phase timeout).
    last_heard: Instant,
    /// Taken just before the `Takeover` was published.
    takeover_sent: Option<Instant>,
    /// When a warm standby last read the owner's committed position.
    ceiling_read: Option<Instant>,
}

impl<S, L, St, O, C> TargetDriver<'_, S, L, St, O, C>
where
    S: StatefulService,
    L: MessageLog,
    St: SnapshotStore,
    O: OutputSink,
    C: ControlChannel,
{
    async fn run(&mut self) -> Result<Instance<S, L, St, O>> {
        loop {
            let event = self.next_event().await?;
            if let Some(live) = self.feed(event).await? {
                return Ok(live);
            }
        }
    }

    /// The next thing that happened: a control record, the progress timer,
    /// the phase timeout; in between, replay steps up to the ceiling.
    async fn next_event(&mut self) -> Result<TargetEvent> {
        loop {
            let wait = if self.machine.phase() == TargetPhase::Replaying {
                match self.commands.try_recv() {
                    Ok(m) => return Ok(self.heard(m)),
                    Err(tokio::sync::mpsc::error::TryRecvError::Disconnected) => return Err(closed()),
                    Err(tokio::sync::mpsc::error::TryRecvError::Empty) => {}
                }
                if let Some(event) = self.at_digest_point().await {
                    return Ok(event);
                }
                if self.replay.progress_due(self.options.progress_interval) {
                    // Restart the interval whether or not the machine reports:
                    // before the source's first position it does not, and the
                    // loop must go on to replay and to its timeout.
                    self.replay.last_report = Some(Instant::now());
                    return Ok(TargetEvent::ProgressDue);
                }
                if self.replay_step().await? > 0 {
                    continue;
                }
                // Held at the ceiling or idle: wait briefly for the source to move on.
                Duration::from_millis(5)
            } else if self.following() {
                // Not named yet: every record already read is handled before
                // the next step behind the owner (the channel's history, a
                // `Prepare`), so following never delays them.
                match self.commands.try_recv() {
                    Ok(m) => return Ok(self.heard(m)),
                    Err(tokio::sync::mpsc::error::TryRecvError::Disconnected) => return Err(closed()),
                    Err(tokio::sync::mpsc::error::TryRecvError::Empty) => {}
                }
                match self.follow_owner().await {
                    Some(0) => WARM_POLL,
                    _ => Duration::ZERO,
                }
            } else {
                self.options.phase_timeout
            };
            let waiting = self.machine.migration().is_some();
            if waiting && self.last_heard.elapsed() > self.options.phase_timeout {
                return Ok(TargetEvent::TimedOut);
            }
            match tokio::time::timeout(wait, self.commands.recv()).await {
                Ok(Some(m)) => return Ok(self.heard(m)),
                Ok(None) => return Err(closed()),
                Err(_) => {}
            }
        }
    }

    /// A warm target no migration has named yet: one step of replay
    /// behind the owner's committed position (read every [`WARM_REFRESH`]),
    /// as far as it goes. `None` if there is no such target. Following
    /// stops once a migration names this target (its `Prepare` is read),
    /// before this target reports `Restored`, and the source picks the
    /// digest point (and later Pf) at or after its position when it reads
    /// `Restored`: the kept state, at a position the owner had committed,
    /// is never past either. A failure while following leaves the target
    /// cold: it restores when named, as a target that was never warm.
    async fn follow_owner(&mut self) -> Option<usize> {
        if !self.following() {
            return None;
        }
        let Some((TargetStart::Standby(instance), _)) = self.parts.as_mut() else {
            return None;
        };
        let refresh = self.ceiling_read.is_none_or(|at| at.elapsed() >= WARM_REFRESH);
        if refresh {
            self.ceiling_read = Some(Instant::now());
        }
        match follow_step(instance, refresh, self.listener).await {
            Ok(applied) => Some(applied),
            Err(e) => {
                warn!(error = %e, "following the owner failed: standing by cold");
                self.go_cold();
                None
            }
        }
    }

    /// Whether this is a warm target that no migration has named yet.
    fn following(&self) -> bool {
        self.options.warm
            && self.machine.migration().is_none()
            && matches!(self.parts, Some((TargetStart::Standby(_), _)))
    }

    /// Gives up the warm state: the target restores when named.
    fn go_cold(&mut self) {
        if let Some((TargetStart::Standby(instance), config)) = self.parts.take() {
            let backends = (*instance).into_parts().2;
            self.parts = Some((TargetStart::Backends(backends), config));
        }
    }

    /// An operator's skip decision reaches a warm target's state at once.
    fn skip_while_warm(&mut self, m: &ControlMessage) {
        if let (
            ControlBody::SkipInput {
                topic,
                partition,
                offset,
                ..
            },
            Some((TargetStart::Standby(instance), _)),
        ) = (&m.body, self.parts.as_mut())
        {
            instance.skip_inputs([(topic.clone(), *partition, *offset)]);
        }
    }

    fn heard(&mut self, m: ControlMessage) -> TargetEvent {
        self.skip_while_warm(&m);
        if self.machine.migration() == Some(m.migration_id.as_str()) {
            self.last_heard = Instant::now();
        }
        TargetEvent::Record(m)
    }

    /// The digest point's event once replay is there (the ceiling holds it
    /// there): the digest (the source serves meanwhile), or the position if
    /// replay had gone past it.
    async fn at_digest_point(&mut self) -> Option<TargetEvent> {
        let (point, instance) = (self.replay.digest_point.as_ref()?, self.instance.as_ref()?);
        let position = instance.position();
        let event = if !point.reaches(position) {
            TargetEvent::PastDigestPoint(position.clone())
        } else if position.reaches(point) {
            let digest = match instance.state().freeze() {
                Some(frozen) => digest_off_loop(frozen).await,
                None => instance.digest(),
            };
            TargetEvent::ReachedDigestPoint(digest)
        } else {
            return None;
        };
        self.replay.digest_point = None;
        Some(event)
    }

    async fn replay_step(&mut self) -> Result<usize> {
        let Some(instance) = self.instance.as_mut() else {
            return Ok(0);
        };
        let applied = instance.step().await?;
        self.replay.window_applied += applied as u64;
        Ok(applied)
    }

    /// Runs the machine on `event` and performs its actions; the live
    /// instance once the role ended in `Live`.
    async fn feed(&mut self, event: TargetEvent) -> Result<Option<Instance<S, L, St, O>>> {
        let mut events = std::collections::VecDeque::from([event]);
        while let Some(event) = events.pop_front() {
            let selected_before = self.machine.migration().is_some();
            let actions = self.machine.handle(event);
            if !selected_before && self.machine.migration().is_some() {
                // The phase clock starts when a migration names this target.
                info!(migration = ?self.machine.migration(), "selected as migration target");
                self.last_heard = Instant::now();
            }
            for action in actions {
                match self.perform(action).await? {
                    Performed::Next(event) => events.push_back(event),
                    Performed::Live => return Ok(self.instance.take()),
                    Performed::Done => {}
                }
            }
        }
        Ok(None)
    }

    async fn perform(&mut self, action: TargetAction) -> Result<Performed> {
        Ok(match action {
            TargetAction::Restore {
                snapshot_id,
                read_ahead,
            } => Performed::Next(self.restore(snapshot_id, read_ahead).await?),
            TargetAction::RestoreFromStandby => Performed::Next(self.restore_from_standby().await?),
            TargetAction::SetCeiling(position) => {
                self.instance_mut()?.set_ceiling(Some(position.clone()));
                self.replay.source_position = position;
                Performed::Done
            }
            TargetAction::CheckDigestAt(position) => {
                self.replay.digest_point = Some(position);
                Performed::Done
            }
            TargetAction::ReplayTo { pf, digest } => Performed::Next(self.replay_to(pf, digest).await?),
            TargetAction::Publish(body) => {
                if matches!(body, ControlBody::Takeover { .. }) {
                    self.takeover_sent = Some(Instant::now());
                }
                self.publish(body).await?;
                Performed::Done
            }
            TargetAction::PublishProgress => {
                self.publish_progress().await?;
                Performed::Done
            }
            TargetAction::Claim => {
                self.instance_mut()?.claim().await?;
                Performed::Next(TargetEvent::Claimed)
            }
            TargetAction::GoLive {
                epoch,
                position,
                digest,
                digest_match,
            } => {
                self.go_live(epoch, position, digest, digest_match).await?;
                Performed::Live
            }
            TargetAction::Fail(failure) => return Err(Error::Migration(MigrationError::from(failure))),
        })
    }

    /// Fetches, verifies and restores the checkpoint (or sets up the empty
    /// state of a cold start) and builds the standby instance.
    async fn restore(&mut self, snapshot_id: Option<SnapshotId>, read_ahead: bool) -> Result<TargetEvent> {
        self.listener.on_progress(&crate::Progress {
            phase: ProgressPhase::Restore,
            applied: 0,
            remaining: 0,
            rate: 0.0,
            eta: None,
        });
        let Some((start, config)) = self.parts.take() else {
            return Ok(TargetEvent::RestoreFailed("restored twice".into()));
        };
        let mut backends = start.into_backends();
        let (loaded, transfer, restore) = match snapshot_id {
            Some(id) => match fetch_and_restore(&mut backends, &config, &self.service, id, read_ahead).await {
                Ok((loaded, transfer, restore)) => (Some(loaded), transfer, restore),
                Err(e) => return Ok(TargetEvent::RestoreFailed(crate::store::error_chain(&e))),
            },
            None => (None, Duration::ZERO, Duration::ZERO),
        };
        let instance = Instance::<S, L, St, O>::restore(backends, config, loaded).await?;
        Ok(self.restored(instance, transfer, restore))
    }

    /// Keeps the standby's state (its instance replays on from where it
    /// stands); a target started without one restores the newest snapshot
    /// that verifies, or the empty state if there is none.
    async fn restore_from_standby(&mut self) -> Result<TargetEvent> {
        let Some((start, config)) = self.parts.take() else {
            return Ok(TargetEvent::RestoreFailed("restored twice".into()));
        };
        let backends = match start {
            TargetStart::Standby(mut instance) => {
                info!(position = %instance.position(), "replaying on from the standby's state");
                // Inputs an operator skipped since the standby last looked.
                instance.skip_inputs(config.skip_inputs.iter().cloned());
                return Ok(self.restored(*instance, Duration::ZERO, Duration::ZERO));
            }
            TargetStart::Backends(backends) => backends,
        };
        let started = Instant::now();
        let loaded = match crate::store::load_newest_logged::<S, St>(&*backends.store, &self.service).await {
            Ok(loaded) => loaded,
            Err(e) => return Ok(TargetEvent::RestoreFailed(crate::store::error_chain(&e))),
        };
        let transfer = started.elapsed();
        let instance = Instance::<S, L, St, O>::restore(backends, config, loaded).await?;
        Ok(self.restored(instance, transfer, Duration::ZERO))
    }

    /// Replay starts with `instance`.
    fn restored(&mut self, instance: Instance<S, L, St, O>, transfer: Duration, restore: Duration) -> TargetEvent {
        let position = instance.position().clone();
        self.replay = Replay::starting_at(&position);
        self.replay.replayed_before = instance.stats().applied_replay;
        self.instance = Some(instance);
        TargetEvent::Restored {
            position,
            transfer_us: transfer.as_micros() as u64,
            restore_us: restore.as_micros() as u64,
        }
    }

    async fn replay_to(&mut self, pf: Position, with_digest: bool) -> Result<TargetEvent> {
        let listener = self.listener;
        let instance = self.instance_mut()?;
        if !pf.reaches(instance.position()) {
            return Ok(TargetEvent::PastPf(instance.position().clone()));
        }
        let replayed_at_stop = instance.stats().applied_replay;
        let t = Instant::now();
        instance.replay_to(&pf, ProgressPhase::Cutover, listener).await?;
        let digest = with_digest.then(|| instance.digest());
        tracing::debug!(replay_gap = ?t.elapsed(), ?digest, "final gap replayed");
        self.replay.replayed_at_stop = Some(replayed_at_stop);
        Ok(TargetEvent::ReachedPf(digest))
    }

    async fn go_live(
        &mut self,
        epoch: u64,
        position: Position,
        digest: crate::StateDigest,
        digest_match: bool,
    ) -> Result<()> {
        let (replayed_at_stop, replayed_before) = (self.replay.replayed_at_stop, self.replay.replayed_before);
        let instance = self.instance_mut()?;
        instance.go_live();
        let replayed_total = instance.stats().applied_replay;
        let final_gap = replayed_total - replayed_at_stop.unwrap_or(replayed_total);
        // A kept standby counted what it replayed before the migration too.
        let replayed = replayed_total.saturating_sub(replayed_before);
        let owner = instance.config().instance_id().to_string();
        if !digest_match {
            warn!(%digest, "state digests differ at cutover; going live anyway (policy: warn)");
        }
        info!(position = %position, %digest, replayed, final_gap, "live at the cutover position");
        let started = Instant::now();
        let visible = serve_to_first_commit(instance).await?;
        tracing::debug!(
            visible = ?visible.saturating_duration_since(started),
            committed = ?started.elapsed(),
            "first outputs after the handover visible, then committed"
        );
        let body = ControlBody::Live {
            owner,
            epoch,
            position,
            digest,
            digest_match,
            replayed,
            final_gap,
            visible_before_us: Some(micros(visible.elapsed())),
        };
        self.publish(body).await
    }

    async fn publish_progress(&mut self) -> Result<()> {
        let Some(instance) = self.instance.as_ref() else {
            return Ok(());
        };
        let (lag, apply_rate, input_rate) = self.replay.report(instance.position());
        self.listener.on_progress(&crate::Progress {
            phase: ProgressPhase::MigrationReplay,
            applied: instance
                .stats()
                .applied_replay
                .saturating_sub(self.replay.replayed_before),
            remaining: lag,
            rate: apply_rate,
            eta: crate::runtime::eta(lag, (apply_rate - input_rate).max(0.0)),
        });
        let body = ControlBody::TargetProgress {
            position: instance.position().clone(),
            lag,
            apply_rate,
            input_rate,
        };
        self.publish(body).await
    }

    /// Publishes `body` for our migration (the future borrows nothing of
    /// `self`, so the driver's future stays `Send` whatever `S` is).
    fn publish(&self, body: ControlBody) -> impl std::future::Future<Output = Result<()>> + Send + 'static {
        let migration = self.machine.migration().unwrap_or_default().to_string();
        let control = self.control.clone();
        let service = self.service.clone();
        async move { publish_as(&*control, &service, &migration, Role::Target, body).await }
    }

    fn instance_mut(&mut self) -> Result<&mut Instance<S, L, St, O>> {
        self.instance.as_mut().ok_or_else(|| {
            Error::Migration(MigrationError::Aborted {
                reason: "no restored instance".into(),
            })
        })
    }
}

/// What performing one action led to.
enum Performed {
    Done,
    Next(TargetEvent),
    Live,
}

fn closed() -> Error {
    Error::Migration(MigrationError::Aborted {
        reason: "control channel closed".into(),
    })
}

/// Fetches, verifies and restores snapshot `id` as it arrives, and, if
/// `read_ahead`, meanwhile, as soon as its header is read, seeks the input
/// log to where the instance will start reading (the snapshot's position,
/// checked against the log's watermarks as [`Instance::restore`] does): the log's
/// backend then fetches the input's tail (what arrived since the
/// checkpoint) while the snapshot transfers, so the catch-up replay reads
/// it locally instead of asking the broker for all of it in one burst at
/// the end. The instance's own seek to that position keeps what was
/// fetched ([`MessageLog::seek`]). Returns how long until the decoder took
/// the last piece (the transfer) and the decoding left after it (the
/// restore).
pub(super) async fn fetch_and_restore<S, L, St, O>(
    backends: &mut Backends<L, St, O>,
    config: &InstanceConfig,
    service: &str,
    id: SnapshotId,
    read_ahead: bool,
) -> Result<(LoadedSnapshot<S>, Duration, Duration)>
where
    S: StatefulService,
    L: MessageLog,
    St: SnapshotStore,
{
    let started = Instant::now();
    let (header_read, header) = tokio::sync::oneshot::channel();
    let header_read = read_ahead.then_some(header_read);
    let store = &*backends.store;
    let restore = async move {
        let restored = crate::store::fetch_and_restore_timed::<S, St>(store, service, id, header_read).await;
        (restored, Instant::now())
    };
    let log = &mut backends.log;
    let read_ahead = async move {
        let Ok(header) = header.await else { return };
        // A log that no longer reaches back to the snapshot is left alone:
        // the instance reports it (or skips the gap, if allowed) itself.
        let seeked = match crate::runtime::start_position(log, &header.position, config).await {
            Ok(start) => log.seek(&start).await.map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        if let Err(e) = seeked {
            // Only a head start lost: the instance seeks itself.
            debug!(error = %e, "not reading the input ahead of the restore");
        }
    };
    let ((restored, restored_at), ()) = tokio::join!(restore, read_ahead);
    let (loaded, transferred_at) = restored?;
    Ok((
        loaded,
        transferred_at.duration_since(started),
        restored_at.duration_since(transferred_at),
    ))
}

/// One step of a warm target behind the owner's committed position; with
/// `refresh`, the committed position is read again first and the target's
/// lag reported.
async fn follow_step<S, L, St, O>(
    instance: &mut Instance<S, L, St, O>,
    refresh: bool,
    listener: &dyn ProgressListener,
) -> Result<usize>
where
    S: StatefulService,
    L: MessageLog,
    St: SnapshotStore,
    O: OutputSink,
{
    if refresh {
        let lag = instance.follow_committed().await?;
        listener.on_progress(&crate::Progress {
            phase: ProgressPhase::Standby,
            applied: instance.stats().applied_replay,
            remaining: lag,
            rate: 0.0,
            eta: None,
        });
    }
    instance.step_with_timeout(WARM_POLL).await
}

/// The digest of a frozen copy of the state, on the blocking pool
/// ([`crate::heavy`]: the other tasks of this process keep their worker
/// threads).
async fn digest_off_loop(frozen: crate::state::Frozen) -> crate::StateDigest {
    match crate::heavy::off_loop(move || frozen.digest()).await {
        Ok(digest) => digest,
        Err(join) if join.is_panic() => std::panic::resume_unwind(join.into_panic()),
        // Cancelled: only when the runtime shuts down, which drops us too.
        Err(_) => std::future::pending().await,
    }
}

/// Replay measurements: the source's position (our ceiling) and the rates
/// the coordinator's cutover rule needs.
#[derive(Default)]
struct Replay {
    source_position: Position,
    input_rate: RateMeter,
    apply_rate: RateMeter,
    window_start: Option<Instant>,
    window_applied: u64,
    window_source_total: i64,
    last_report: Option<Instant>,
    /// Replay-mode messages applied when the final gap began.
    replayed_at_stop: Option<u64>,
    /// Replay-mode messages the instance had applied when the migration's
    /// replay began (a kept standby's own replay before it).
    replayed_before: u64,
    /// The digest point to report reaching (`CheckDigestAt`).
    digest_point: Option<Position>,
}

impl Replay {
    fn starting_at(position: &Position) -> Self {
        let now = Instant::now();
        Self {
            source_position: position.clone(),
            window_start: Some(now),
            window_source_total: position.total(),
            last_report: Some(now),
            ..Self::default()
        }
    }

    fn progress_due(&self, interval: Duration) -> bool {
        self.last_report.is_some_and(|t| t.elapsed() >= interval)
    }

    /// (lag, apply rate, input rate), and starts a new measurement window.
    fn report(&mut self, position: &Position) -> (u64, f64, f64) {
        let now = Instant::now();
        let elapsed = self.window_start.map_or(Duration::ZERO, |t| now - t);
        let source_total = self.source_position.total();
        let mu = self.apply_rate.observe(self.window_applied, elapsed);
        let lambda = self
            .input_rate
            .observe((source_total - self.window_source_total).max(0) as u64, elapsed);
        self.window_start = Some(now);
        self.window_applied = 0;
        self.window_source_total = source_total;
        self.last_report = Some(now);
        (position.distance_to(&self.source_position), mu, lambda)
    }
}

/// Serves a target that just went live until its first outputs are
/// committed or the input is idle, so that `Live` reports committed
/// outputs, and returns when clients could first read them: when the first
/// step's outputs were flushed, if the sink makes flushed outputs readable
/// (Kafka, at-least-once); else at that commit; or when it went live, if no
/// input waited. The handover clients see ends there; `Live` says how long
/// before it was sent.
async fn serve_to_first_commit<S, L, St, O>(instance: &mut Instance<S, L, St, O>) -> Result<Instant>
where
    S: StatefulService,
    L: MessageLog,
    St: SnapshotStore,
    O: OutputSink,
{
    let went_live = Instant::now();
    let commits = instance.stats().commits;
    let mut visible = None;
    loop {
        let applied = instance.step().await?;
        if visible.is_none() {
            if applied == 0 {
                visible = Some(went_live);
            } else if instance.flush_outputs().await? {
                visible = Some(Instant::now());
            }
        }
        if instance.stats().commits > commits || applied == 0 {
            return Ok(visible.unwrap_or_else(Instant::now));
        }
    }
}
