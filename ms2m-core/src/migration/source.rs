//! The source side: an owner that keeps serving while it is migrated away.

use std::collections::HashSet;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::FutureExt;
use tokio::sync::mpsc::error::TryRecvError;
use tracing::{info, info_span, warn, Instrument};

use super::{forward_control, message, publish};
use crate::control::{ControlBody, ControlChannel, ControlMessage, Role};
use crate::error::{Error, Result};
use crate::log::MessageLog;
use crate::position::Position;
use crate::runtime::Instance;
use crate::service::StatefulService;
use crate::sink::OutputSink;
use crate::store::SnapshotStore;

/// How the source agent behaves.
#[derive(Clone, Debug)]
pub struct SourceOptions {
    /// How often the source publishes its position during a migration (the
    /// target's replay ceiling and input-rate estimate).
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

struct Migration {
    id: String,
    stopped: bool,
    last_progress: Instant,
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
/// returns, no command published afterwards is missed.
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
            .finish_non_exhaustive()
    }
}

impl<S, L, St, O, C> SourceAgent<S, L, St, O, C>
where
    S: StatefulService,
    L: MessageLog,
    St: SnapshotStore,
    O: OutputSink,
    C: ControlChannel,
{
    /// Subscribes to `control` for commands addressed to this instance.
    pub async fn new(instance: Instance<S, L, St, O>, control: Arc<C>, options: SourceOptions) -> Result<Self> {
        let commands = forward_control(&*control, S::NAME, false).await?;
        Ok(Self {
            instance,
            control,
            options,
            commands,
        })
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
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<SourceExit<Instance<S, L, St, O>>> {
        let Self {
            mut instance,
            control,
            options,
            mut commands,
        } = self;
        let span = info_span!("source", service = S::NAME, instance = %instance.config().instance_id());
        async move {
            let mut shutdown = std::pin::pin!(shutdown);
            instance.go_live_if_standby();
            let mut migration: Option<Migration> = None;
            // Migrations decided (rolled back or handed over): a late command
            // for one of them (a `Stop` from a dead coordinator) is ignored.
            let mut decided = HashSet::new();
            loop {
                if shutdown.as_mut().now_or_never().is_some() {
                    if migration.as_ref().is_some_and(|m| m.stopped) {
                        // Stopped at Pf for a handover: outputs are committed; a
                        // final snapshot would only race the new owner.
                        return Ok(SourceExit::Shutdown(instance));
                    }
                    instance.shutdown().await?;
                    return Ok(SourceExit::Shutdown(instance));
                }
                let command = match commands.try_recv() {
                    Ok(m) => Some(m),
                    Err(TryRecvError::Empty) => None,
                    Err(TryRecvError::Disconnected) => {
                        return Err(Error::Migration(super::MigrationError::Aborted {
                            reason: "control channel reader stopped".into(),
                        }))
                    }
                };
                if let Some(m) = command {
                    if handle(&mut instance, &*control, &mut migration, &mut decided, m).await? == Released::Yes {
                        return Ok(SourceExit::Released(instance));
                    }
                    continue;
                }
                match &mut migration {
                    Some(m) if m.stopped => {
                        // Stopped: wait for Release or Resume, applying nothing.
                        let wait = instance.config().poll_timeout();
                        if let Ok(Some(m)) = tokio::time::timeout(wait, commands.recv()).await {
                            if handle(&mut instance, &*control, &mut migration, &mut decided, m).await? == Released::Yes
                            {
                                return Ok(SourceExit::Released(instance));
                            }
                        }
                    }
                    Some(m) => {
                        instance.step().await?;
                        if m.last_progress.elapsed() >= options.progress_interval {
                            m.last_progress = Instant::now();
                            let id = m.id.clone();
                            publish_progress(S::NAME, instance.position().clone(), &*control, &id).await?;
                        }
                    }
                    None => {
                        instance.step().await?;
                    }
                }
            }
        }
        .instrument(span)
        .await
    }
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
        Err(_) => Err(Error::Migration(super::MigrationError::Aborted {
            reason: "the source agent's task was aborted".into(),
        })),
    }
}

async fn publish_progress<C: ControlChannel>(
    service: &str,
    position: Position,
    control: &C,
    migration_id: &str,
) -> Result<()> {
    let body = ControlBody::SourceProgress { position };
    publish(control, &message(service, migration_id, Role::Source, body)).await
}

async fn handle<S, L, St, O, C>(
    instance: &mut Instance<S, L, St, O>,
    control: &C,
    migration: &mut Option<Migration>,
    decided: &mut HashSet<String>,
    m: ControlMessage,
) -> Result<Released>
where
    S: StatefulService,
    L: MessageLog,
    St: SnapshotStore,
    O: OutputSink,
    C: ControlChannel,
{
    if decided.contains(&m.migration_id) {
        return Ok(Released::No);
    }
    let me = instance.config().instance_id().to_string();
    let ours = migration.as_ref().is_some_and(|mig| mig.id == m.migration_id);
    // Stopped for this migration (not merely for some other one).
    let stopped = ours && migration.as_ref().is_some_and(|mig| mig.stopped);
    if m.from == Role::Target {
        // The target's takeover came before any rollback: it owns the service.
        if let ControlBody::Takeover { owner, epoch, .. } = &m.body {
            if stopped {
                info!(migration = %m.migration_id, %owner, epoch, "released: the target took over");
                return Ok(Released::Yes);
            }
        }
        return Ok(Released::No);
    }
    if m.from != Role::Coordinator {
        return Ok(Released::No);
    }
    match m.body {
        ControlBody::Prepare { source, target } if source == me => {
            info!(migration = %m.migration_id, %target, "migration requested: taking checkpoint");
            *migration = Some(Migration {
                id: m.migration_id.clone(),
                stopped,
                last_progress: Instant::now(),
            });
            let info = match instance.checkpoint().await {
                Ok(info) => info,
                Err(e) => {
                    // The migration fails; the owner keeps serving. Stopped
                    // already (stop-and-copy), it waits for the coordinator's
                    // rollback: resuming on its own would not be ordered
                    // against the channel.
                    let reason = format!("checkpoint failed: {}", crate::store::error_chain(&e));
                    warn!(migration = %m.migration_id, %reason, "migration abandoned");
                    if !stopped {
                        *migration = None;
                    }
                    let body = ControlBody::CutoverFailed {
                        reason,
                        digest_mismatch: None,
                    };
                    publish(control, &message(S::NAME, &m.migration_id, Role::Source, body)).await?;
                    return Ok(Released::No);
                }
            };
            let body = ControlBody::CheckpointTaken {
                snapshot_id: info.id,
                position: info.position,
                bytes: info.bytes,
                pause_us: info.pause.as_micros() as u64,
            };
            publish(control, &message(S::NAME, &m.migration_id, Role::Source, body)).await?;
            publish_progress(S::NAME, instance.position().clone(), control, &m.migration_id).await?;
        }
        ControlBody::Stop { next_epoch } if ours || migration.is_none() => {
            // Stop-and-copy stops before any Prepare, so Stop may open a migration.
            let mig = migration.get_or_insert_with(|| Migration {
                id: m.migration_id.clone(),
                stopped: false,
                last_progress: Instant::now(),
            });
            if mig.id != m.migration_id {
                return Ok(Released::No);
            }
            instance.commit().await?;
            mig.stopped = true;
            let digest = instance.digest();
            info!(migration = %m.migration_id, position = %instance.position(), %digest, next_epoch, "stopped for cutover");
            let body = ControlBody::Stopped {
                position: instance.position().clone(),
                digest,
            };
            publish(control, &message(S::NAME, &m.migration_id, Role::Source, body)).await?;
        }
        ControlBody::Release if ours => {
            info!(migration = %m.migration_id, "released: the target owns the service now");
            return Ok(Released::Yes);
        }
        ControlBody::Resume { owner, epoch } if owner == me => {
            warn!(migration = %m.migration_id, epoch, "migration rolled back: resuming as owner");
            // Re-claim only after a stop (fencing any stray producer): a
            // serving owner never let go of the sink, and a claim would
            // abort its uncommitted outputs (fault-suite seed 325).
            if stopped {
                instance.claim().await?;
            }
            decided.insert(m.migration_id);
            *migration = None;
        }
        ControlBody::Aborted { reason } => {
            if ours {
                warn!(migration = %m.migration_id, %reason, "migration aborted");
                if stopped {
                    instance.claim().await?;
                }
                *migration = None;
            }
            decided.insert(m.migration_id);
        }
        _ => {}
    }
    Ok(Released::No)
}

/// Whether a command released the instance to the target.
#[derive(Debug, PartialEq, Eq)]
enum Released {
    Yes,
    No,
}
