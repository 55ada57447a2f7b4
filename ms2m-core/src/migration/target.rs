//! The target side: a standby that restores, replays behind the source and
//! takes over at exactly the position where the source stopped.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::{info, info_span, warn, Instrument};

use super::{forward_control, message, publish, DigestPolicy, MigrationError};
use crate::control::{ControlBody, ControlChannel, ControlMessage, Role};
use crate::digest::StateDigest;
use crate::error::{Component, Error, Result};
use crate::log::MessageLog;
use crate::position::Position;
use crate::runtime::{Backends, Instance, InstanceConfig, ProgressListener, ProgressPhase, RateMeter};
use crate::service::StatefulService;
use crate::sink::OutputSink;
use crate::snapshot::Snapshot;
use crate::store::{LoadedSnapshot, SnapshotStore};

/// How the target behaves.
#[derive(Clone, Debug)]
pub struct TargetOptions {
    /// How often replay progress is published.
    pub progress_interval: Duration,
    /// What to do when the digests differ at Pf.
    pub digest_policy: DigestPolicy,
    /// How long to wait for the next command once a migration started.
    pub phase_timeout: Duration,
}

impl Default for TargetOptions {
    fn default() -> Self {
        Self {
            progress_interval: Duration::from_millis(20),
            digest_policy: DigestPolicy::Abort,
            phase_timeout: Duration::from_secs(60),
        }
    }
}

fn aborted(reason: impl Into<String>) -> Error {
    Error::Migration(MigrationError::Aborted { reason: reason.into() })
}

/// Waits as a standby for a migration naming `config.instance_id()` as its
/// target, restores the checkpoint, replays behind the source, and when the
/// source reports it stopped at Pf, replays to Pf, checks the digest, claims
/// the output sink and returns the instance live at Pf, ready to
/// [`run`](Instance::run) (or to [`SourceAgent`](super::SourceAgent) for the
/// next migration).
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
    let me = config.instance_id().to_string();
    let span = info_span!("target", service = S::NAME, instance = %me);
    async move {
        // Read from the start of the channel, so a standby that subscribes
        // after the coordinator spoke still sees its migration; migrations
        // that already finished are skipped.
        let history = super::read_history(&*control, S::NAME).await?;
        let finished = super::decided_migrations(&history);
        let mut commands = forward_control(&*control, S::NAME, true).await?;
        // 1. Wait for a migration naming us, then for its Restore command.
        // Baselines stop the source before naming the target, so messages
        // read before Prepare are kept and the migration's own are replayed.
        let mut before = Vec::new();
        let migration_id = loop {
            let m = commands.recv().await.ok_or_else(|| aborted("control channel closed"))?;
            if let ControlBody::Prepare { target, .. } = &m.body {
                if *target == me && m.from == Role::Coordinator && !finished.contains(m.migration_id.as_str()) {
                    break m.migration_id;
                }
            }
            before.push(m);
        };
        info!(migration = %migration_id, "selected as migration target");
        let mut early: Vec<_> = before.into_iter().filter(|m| m.migration_id == migration_id).collect();
        let snapshot_id = loop {
            let m = next_for(&mut commands, &migration_id, options.phase_timeout, "restore command").await?;
            match m.body {
                ControlBody::Restore { snapshot_id } => break snapshot_id,
                ControlBody::Aborted { reason } => return Err(aborted(reason)),
                _ => early.push(m),
            }
        };

        // 2–3. Transfer and restore.
        listener.on_progress(&crate::Progress {
            phase: ProgressPhase::Restore,
            applied: 0,
            remaining: 0,
            rate: 0.0,
            eta: None,
        });
        let started = Instant::now();
        let (loaded, transfer, restore) = match snapshot_id {
            Some(id) => {
                let bytes = backends
                    .store
                    .get(id)
                    .await
                    .map_err(|e| Error::backend(Component::SnapshotStore, "fetch migration snapshot", e))?;
                let transfer = started.elapsed();
                let t = Instant::now();
                let snapshot = Snapshot::decode(bytes)?;
                snapshot.check_service(S::NAME)?;
                let state = S::restore(snapshot.header.schema_version, &snapshot.state)?;
                (Some(LoadedSnapshot { id, snapshot, state }), transfer, t.elapsed())
            }
            None => (None, Duration::ZERO, Duration::ZERO),
        };
        let mut instance = Instance::<S, L, St, O>::restore(backends, config, loaded).await?;
        let restored_at = instance.position().clone();
        instance.set_ceiling(Some(restored_at.clone()));
        let body = ControlBody::Restored {
            position: restored_at,
            transfer_us: transfer.as_micros() as u64,
            restore_us: restore.as_micros() as u64,
        };
        publish(&*control, &message(S::NAME, &migration_id, Role::Target, body)).await?;

        // 4–5. Replay behind the source until the cutover command.
        let mut replay = Replay::new(&instance);
        for m in early {
            replay.observe(&mut instance, m)?;
        }
        let mut last_command = Instant::now();
        loop {
            while let Ok(m) = commands.try_recv() {
                if m.migration_id == migration_id {
                    last_command = Instant::now();
                    replay.observe(&mut instance, m)?;
                }
            }
            if let Some((pf, source_digest, epoch)) = replay.cutover.take() {
                return cut_over(
                    instance,
                    &*control,
                    &mut commands,
                    &migration_id,
                    &options,
                    listener,
                    replay,
                    pf,
                    source_digest,
                    epoch,
                )
                .await;
            }
            let applied = instance.step().await?;
            replay.applied(applied as u64);
            // Lag is only meaningful once the source's position is known.
            if replay.source_heard && replay.progress_due(options.progress_interval) {
                let (lag, apply_rate, input_rate) = replay.report(&instance);
                listener.on_progress(&crate::Progress {
                    phase: ProgressPhase::MigrationReplay,
                    applied: instance.stats().applied_replay,
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
                publish(&*control, &message(S::NAME, &migration_id, Role::Target, body)).await?;
            }
            if applied == 0 {
                // Held at the ceiling or idle: wait for the source to move on.
                if let Ok(Some(m)) = tokio::time::timeout(Duration::from_millis(5), commands.recv()).await {
                    if m.migration_id == migration_id {
                        last_command = Instant::now();
                        replay.observe(&mut instance, m)?;
                    }
                }
            }
            if last_command.elapsed() > options.phase_timeout {
                return Err(Error::Migration(MigrationError::Timeout {
                    waiting_for: "source progress or cutover",
                }));
            }
        }
    }
    .instrument(span)
    .await
}

async fn next_for(
    commands: &mut tokio::sync::mpsc::Receiver<ControlMessage>,
    migration_id: &str,
    timeout: Duration,
    waiting_for: &'static str,
) -> Result<ControlMessage> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        match tokio::time::timeout_at(deadline, commands.recv()).await {
            Ok(Some(m)) if m.migration_id == migration_id => return Ok(m),
            Ok(Some(_)) => {}
            Ok(None) => return Err(aborted("control channel closed")),
            Err(_) => return Err(Error::Migration(MigrationError::Timeout { waiting_for })),
        }
    }
}

/// Replay bookkeeping: the source's position (our ceiling), rates, the stop.
struct Replay {
    /// Whether a position from the source arrived since the restore.
    source_heard: bool,
    source_position: Position,
    input_rate: RateMeter,
    apply_rate: RateMeter,
    window_start: Instant,
    window_applied: u64,
    window_source_total: i64,
    last_report: Instant,
    /// Replay-mode messages applied when the source stopped.
    replayed_at_stop: Option<u64>,
    /// The owner epoch announced with the coordinator's Stop.
    epoch: Option<u64>,
    cutover: Option<(Position, StateDigest, u64)>,
}

impl Replay {
    fn new<S, L, St, O>(instance: &Instance<S, L, St, O>) -> Self
    where
        S: StatefulService,
        L: MessageLog,
        St: SnapshotStore,
        O: OutputSink,
    {
        let now = Instant::now();
        Self {
            source_heard: false,
            source_position: instance.position().clone(),
            input_rate: RateMeter::default(),
            apply_rate: RateMeter::default(),
            window_start: now,
            window_applied: 0,
            window_source_total: instance.position().total(),
            last_report: now,
            replayed_at_stop: None,
            epoch: None,
            cutover: None,
        }
    }

    fn observe<S, L, St, O>(&mut self, instance: &mut Instance<S, L, St, O>, m: ControlMessage) -> Result<()>
    where
        S: StatefulService,
        L: MessageLog,
        St: SnapshotStore,
        O: OutputSink,
    {
        match m.body {
            ControlBody::SourceProgress { position } if self.replayed_at_stop.is_none() => {
                instance.set_ceiling(Some(position.clone()));
                self.source_position = position;
                self.source_heard = true;
            }
            ControlBody::Stop { next_epoch } if m.from == Role::Coordinator => {
                self.epoch = Some(next_epoch);
            }
            ControlBody::Stopped { position, digest } if m.from == Role::Source => {
                // The source has committed everything below Pf and emits
                // nothing more: replay the final gap and take over.
                instance.set_ceiling(Some(position.clone()));
                self.source_position = position.clone();
                self.replayed_at_stop = Some(instance.stats().applied_replay);
                let epoch = self
                    .epoch
                    .ok_or_else(|| aborted("the source stopped without a stop command"))?;
                self.cutover = Some((position, digest, epoch));
            }
            ControlBody::Aborted { reason } => return Err(aborted(reason)),
            ControlBody::Resume { .. } => return Err(aborted("the source resumed ownership")),
            _ => {}
        }
        Ok(())
    }

    fn applied(&mut self, n: u64) {
        self.window_applied += n;
    }

    fn progress_due(&self, interval: Duration) -> bool {
        self.last_report.elapsed() >= interval
    }

    /// (lag, apply rate, input rate), and starts a new measurement window.
    fn report<S, L, St, O>(&mut self, instance: &Instance<S, L, St, O>) -> (u64, f64, f64)
    where
        S: StatefulService,
        L: MessageLog,
        St: SnapshotStore,
        O: OutputSink,
    {
        let elapsed = self.window_start.elapsed();
        let source_total = self.source_position.total();
        let mu = self.apply_rate.observe(self.window_applied, elapsed);
        let lambda = self
            .input_rate
            .observe((source_total - self.window_source_total).max(0) as u64, elapsed);
        self.window_start = Instant::now();
        self.window_applied = 0;
        self.window_source_total = source_total;
        self.last_report = Instant::now();
        (instance.position().distance_to(&self.source_position), mu, lambda)
    }
}

#[allow(clippy::too_many_arguments)]
async fn cut_over<S, L, St, O, C>(
    mut instance: Instance<S, L, St, O>,
    control: &C,
    commands: &mut tokio::sync::mpsc::Receiver<ControlMessage>,
    migration_id: &str,
    options: &TargetOptions,
    listener: &dyn ProgressListener,
    replay: Replay,
    pf: Position,
    source_digest: StateDigest,
    epoch: u64,
) -> Result<Instance<S, L, St, O>>
where
    S: StatefulService,
    L: MessageLog,
    St: SnapshotStore,
    O: OutputSink,
    C: ControlChannel,
{
    if !pf.reaches(instance.position()) {
        let reason = format!("target is past the cutover position: {} > {pf}", instance.position());
        publish(
            control,
            &message(
                S::NAME,
                migration_id,
                Role::Target,
                ControlBody::CutoverFailed {
                    reason: reason.clone(),
                    digest_mismatch: None,
                },
            ),
        )
        .await?;
        return Err(aborted(reason));
    }
    let t = Instant::now();
    instance.replay_to(&pf, ProgressPhase::Cutover, listener).await?;
    let replay_gap = t.elapsed();
    let t = Instant::now();
    let digest = instance.digest();
    let digest_time = t.elapsed();
    let digest_match = digest == source_digest;
    if !digest_match {
        match options.digest_policy {
            DigestPolicy::Abort => {
                let err = MigrationError::DigestMismatch {
                    source_digest,
                    target_digest: digest,
                };
                let body = ControlBody::CutoverFailed {
                    reason: err.to_string(),
                    digest_mismatch: Some((source_digest, digest)),
                };
                publish(control, &message(S::NAME, migration_id, Role::Target, body)).await?;
                return Err(Error::Migration(err));
            }
            DigestPolicy::Warn => {
                warn!(%source_digest, target_digest = %digest, "state digests differ at cutover; going live anyway (policy: warn)")
            }
        }
    }
    // Announce the takeover and read the channel up to it: it stands only
    // if no rollback precedes it (first writer wins, see `migration_outcome`).
    let me = instance.config().instance_id().to_string();
    let t = Instant::now();
    let body = ControlBody::Takeover {
        owner: me.clone(),
        epoch,
        position: pf.clone(),
    };
    publish(control, &message(S::NAME, migration_id, Role::Target, body)).await?;
    confirm_takeover(commands, migration_id, &me, options.phase_timeout).await?;
    let confirm_time = t.elapsed();
    let t = Instant::now();
    instance.claim().await?;
    let claim_time = t.elapsed();
    instance.go_live();
    tracing::debug!(?replay_gap, ?digest_time, ?confirm_time, ?claim_time, "cutover steps");
    let replayed = instance.stats().applied_replay;
    let final_gap = replayed - replay.replayed_at_stop.unwrap_or(replayed);
    info!(migration = %migration_id, position = %pf, %digest, replayed, final_gap, "live at the cutover position");
    let body = ControlBody::Live {
        owner: instance.config().instance_id().to_string(),
        epoch,
        position: pf,
        digest,
        digest_match,
        replayed,
        final_gap,
    };
    publish(control, &message(S::NAME, migration_id, Role::Target, body)).await?;
    Ok(instance)
}

/// Reads the control channel up to our own `Takeover`: the migration is ours
/// only if no rollback (`Resume`/`Aborted`) of it comes first.
async fn confirm_takeover(
    commands: &mut tokio::sync::mpsc::Receiver<ControlMessage>,
    migration_id: &str,
    me: &str,
    timeout: Duration,
) -> Result<()> {
    loop {
        let m = next_for(commands, migration_id, timeout, "our takeover on the control channel").await?;
        match (&m.body, m.from) {
            (ControlBody::Takeover { owner, .. }, Role::Target) if owner == me => return Ok(()),
            (ControlBody::Resume { .. } | ControlBody::Aborted { .. }, Role::Coordinator) => {
                info!(migration = %migration_id, "a rollback came before our takeover: standing down");
                return Err(aborted("the migration was rolled back before the takeover"));
            }
            _ => {}
        }
    }
}
