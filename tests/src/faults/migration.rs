//! The migration scenario, written once for every [`Deployment`]: a source
//! agent, a standby target and a coordinator migrate under live input
//! while a fault hits one party (or the broker, or the store) at the
//! scenario's phase; then the harness checks that the control channel's
//! order decided the migration, that every party's own view agrees with
//! it (`migration_outcome`), that exactly one instance owns the service
//! (`current_owner`, `ensure_owner` refuses the other), and the state and
//! outputs ([`Run::check`]).
//!
//! Where the deployment can intercept control messages as they are
//! published (in memory), a crash lands at an exact protocol step: the
//! publisher hangs there, or its message lands late. Elsewhere the harness
//! watches the control history and crashes the victim once the phase's
//! message is on the channel.

use std::sync::Arc;
use std::time::Instant;

use ms2m_core::migration::{
    current_owner, ensure_owner, migration_outcome, read_history, run_target, Coordinator, CutoverRule, DigestPolicy,
    MigrationConfig, MigrationError, MigrationPlan, MigrationReport, Recovered, SourceAgent, SourceExit, SourceHandle,
    SourceOptions, TargetOptions,
};
use ms2m_core::{no_progress, ControlBody, ControlChannel, ControlMessage, Error, ErrorKind, Role, StatefulService};

use super::deployment::{Act, Deployment, Guarantee, Interception};
use super::drift::{set_drift, Folds};
use super::scenarios::{Inst, Run};
use super::{Fault, Outcome, Phase, Strategy, Trigger};
use crate::Summer;

const SOURCE: &str = "src";
const TARGET: &str = "tgt";

/// The plan of one migration (the one place a plan is built; when
/// `MigrationPlan::service` becomes a `String`, append `.into()` below).
fn migration_plan(migration_id: &str, strategy: Strategy) -> MigrationPlan {
    MigrationPlan {
        service: Summer::NAME.into(),
        migration_id: migration_id.into(),
        source: SOURCE.into(),
        target: TARGET.into(),
        strategy,
    }
}

/// The coordinator's configuration (the one place it is built).
fn migration_config<D: Deployment>() -> MigrationConfig {
    let t = D::TIMING;
    MigrationConfig {
        cutover: CutoverRule {
            max_lag: Some(20),
            max_catch_up: Some(t.max_catch_up),
            replay_max: t.replay_max,
        },
        digest_policy: DigestPolicy::Abort,
        phase_timeout: t.phase_timeout,
    }
}

/// The target's options (the one place they are built).
fn target_options<D: Deployment>() -> TargetOptions {
    TargetOptions {
        phase_timeout: D::TIMING.phase_timeout,
        ..TargetOptions::default()
    }
}

type TargetTask<D, S> = tokio::task::JoinHandle<ms2m_core::Result<Inst<D, S>>>;
type CoordinatorTask = tokio::task::JoinHandle<ms2m_core::Result<MigrationReport>>;

/// The migration's parties; a crashed one is `None`.
struct Parties<D: Deployment, S: Folds> {
    control: Arc<D::Control>,
    migration_id: String,
    source: Option<SourceHandle<Inst<D, S>>>,
    target: Option<TargetTask<D, S>>,
    coordinator: Option<CoordinatorTask>,
}

/// A migration with a fault at a phase, then the invariants.
pub async fn migration<D: Deployment, S: Folds>(run: &mut Run<D>, strategy: Strategy) {
    run.produce(run.sc.initial).await;
    let injection = arm_injection(run);
    let mut parties = start_source_and_target::<D, S>(run).await;
    let divergence = run.sc.fault == Fault::Divergence;
    if divergence {
        set_drift(true);
        run.outcome.injected = true;
    }
    let producing = run.produce_in_background(run.sc.during);
    parties.coordinator = Some(start_coordinator::<D>(&parties, strategy));
    inject(run, &mut parties, injection).await;
    producing.await.expect("input producer");
    let (result, recovered) = coordinator_verdict(run, &mut parties).await;
    run.d.set_store_unavailable(false);
    set_drift(false);
    let history = read_history(&*parties.control, S::NAME).await.expect("control history");
    let id = &parties.migration_id;
    let completed = judge_migration(&history, id, result.as_ref(), recovered, &mut run.outcome);
    if divergence && completed {
        let note = "divergence scenario completed (no drifted replay reached cutover?)";
        run.outcome.notes.push(note.into());
    }
    let owner = current_owner(&*parties.control, S::NAME).await.expect("owner");
    let owner = owner.map(|o| o.instance_id);
    let state = if completed {
        after_takeover(run, &mut parties, owner).await
    } else {
        after_rollback(run, &mut parties, owner).await
    };
    if divergence && completed && !run.matches_fold(&state) {
        run.outcome.divergences_undetected += 1;
    }
    run.check(&state, &[]).await;
}

/// Whether the migration completed, by the control channel's order (first
/// writer wins), after checking that the coordinator's own view agrees:
/// success only if taken over, `TakenOverNotLive` only if taken over, any
/// other error or a recovery's rollback only if rolled back.
fn judge_migration(
    history: &[ControlMessage],
    migration_id: &str,
    result: Option<&ms2m_core::Result<MigrationReport>>,
    recovered: Option<Recovered>,
    o: &mut Outcome,
) -> bool {
    use ms2m_core::migration::MigrationOutcome;
    let completed = migration_outcome(history, migration_id) == Some(MigrationOutcome::TakenOver);
    match (result, recovered) {
        (Some(Ok(report)), _) => {
            assert!(
                completed,
                "the coordinator reported success but the channel says otherwise"
            );
            assert!(report.digest_match, "completed with differing digests: {report:?}");
            assert_eq!(report.source_digest, report.target_digest);
        }
        (Some(Err(e)), _) => {
            if matches!(e, Error::Migration(MigrationError::DigestMismatch { .. })) {
                o.divergences_detected += 1;
            }
            let decided_for_target = matches!(e, Error::Migration(MigrationError::TakenOverNotLive { .. }));
            assert_eq!(
                completed, decided_for_target,
                "coordinator error vs channel order: {e:?}"
            );
            o.typed_errors += 1;
        }
        (None, Some(Recovered::Completed)) => assert!(completed, "recovery completed a rolled-back migration"),
        (None, Some(Recovered::RolledBack | Recovered::Aborted)) => {
            assert!(!completed, "recovery rolled back a taken-over migration")
        }
        _ => {}
    }
    o.migration_completed = completed;
    o.migration_rolled_back = !completed;
    completed
}

/// The source (the owner, serving) and a standby target.
async fn start_source_and_target<D: Deployment, S: Folds>(run: &mut Run<D>) -> Parties<D, S> {
    let control = run.d.control().await;
    let source: Inst<D, S> = run.recover(run.config(SOURCE)).await.expect("recover the source");
    let agent = SourceAgent::new(source, control.clone(), SourceOptions::default()).await;
    let source = agent.expect("source agent").spawn();
    let (target_control, subscribed) = Subscribed::watch(control.clone());
    let (backends, config) = (run.d.backends().await, run.config(TARGET));
    let target = tokio::spawn(async move {
        run_target::<S, _, _, _, _>(backends, config, target_control, target_options::<D>(), &*no_progress()).await
    });
    // The coordinator starts once the target reads the channel: a target
    // that first reads a history where this migration is already decided
    // rightly stays a standby, and would be judged as one that never gave up.
    tokio::time::timeout(run.limit(), subscribed.notified())
        .await
        .expect("the target subscribes to the control channel");
    Parties {
        control,
        migration_id: format!("m-{}", run.sc.seed),
        source: Some(source),
        target: Some(target),
        coordinator: None,
    }
}

/// A control channel that tells when its first reader is open (the
/// target has read the history and follows the channel from then on).
struct Subscribed<C> {
    inner: Arc<C>,
    opened: Arc<tokio::sync::Notify>,
}

impl<C> Subscribed<C> {
    fn watch(inner: Arc<C>) -> (Arc<Self>, Arc<tokio::sync::Notify>) {
        let opened = Arc::new(tokio::sync::Notify::new());
        (
            Arc::new(Self {
                inner,
                opened: opened.clone(),
            }),
            opened,
        )
    }
}

#[async_trait::async_trait]
impl<C: ControlChannel> ControlChannel for Subscribed<C> {
    type Error = C::Error;
    type Reader = C::Reader;

    async fn publish(&self, message: &ControlMessage) -> Result<(), Self::Error> {
        self.inner.publish(message).await
    }

    async fn reader(&self, from_start: bool) -> Result<Self::Reader, Self::Error> {
        let reader = self.inner.reader(from_start).await;
        // `notify_one` keeps a permit: the waiter may start waiting later.
        self.opened.notify_one();
        reader
    }

    async fn history(&self) -> Result<Vec<ControlMessage>, Self::Error> {
        self.inner.history().await
    }
}

fn start_coordinator<D: Deployment>(parties: &Parties<D, impl Folds>, strategy: Strategy) -> CoordinatorTask {
    let coordinator = Coordinator::new(parties.control.clone(), migration_config::<D>());
    let plan = migration_plan(&parties.migration_id, strategy);
    tokio::spawn(async move { coordinator.migrate(&plan, &*no_progress()).await })
}

/// A control message, by body and sender.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Msg {
    Checkpoint,
    CheckpointTaken,
    Restore,
    Restored,
    TargetProgress,
    Stop,
    Stopped,
    Takeover,
    Live,
    Release,
}

impl Msg {
    fn matches(self, m: &ControlMessage) -> bool {
        let (sender, ok) = match (&m.body, self) {
            (ControlBody::Checkpoint, Msg::Checkpoint) => (Role::Coordinator, true),
            (ControlBody::CheckpointTaken { .. }, Msg::CheckpointTaken) => (Role::Source, true),
            (ControlBody::Restore { .. } | ControlBody::RestoreFromStandby, Msg::Restore) => (Role::Coordinator, true),
            (ControlBody::Restored { .. }, Msg::Restored) => (Role::Target, true),
            (ControlBody::TargetProgress { .. }, Msg::TargetProgress) => (Role::Target, true),
            (ControlBody::Stop { .. }, Msg::Stop) => (Role::Coordinator, true),
            (ControlBody::Stopped { .. }, Msg::Stopped) => (Role::Source, true),
            (ControlBody::Takeover { .. }, Msg::Takeover) => (Role::Target, true),
            (ControlBody::Live { .. }, Msg::Live) => (Role::Target, true),
            (ControlBody::Release, Msg::Release) => (Role::Coordinator, true),
            _ => (Role::Coordinator, false),
        };
        ok && m.from == sender
    }
}

/// Who the fault hits once its point is reached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Victim {
    Source,
    Target,
    Coordinator,
    /// A broker fault starts (and ends before the harness goes on).
    Broker,
    /// Only the side effect at the interception (store down, snapshot damaged).
    Nobody,
}

/// How the harness knows the injection point is reached.
enum Reached {
    /// The deployment's publish hook fired.
    Intercepted(Trigger),
    /// The message is in the control history.
    Published(Msg),
}

struct Injection {
    victim: Victim,
    reached: Reached,
}

/// Sets up the scenario's injection point: intercepted where the
/// deployment can, else watched for in the history. `None` for faults
/// that hit after the migration (live phase) or need no trigger.
fn arm_injection<D: Deployment>(run: &Run<D>) -> Option<Injection> {
    let sc = &run.sc;
    if let Some((msg, act, victim)) = interception_point(sc.fault, sc.phase, sc.variant, sc.at) {
        let at = Interception {
            matches: Arc::new(move |m| msg.matches(m)),
            act,
            fault: sc.fault,
            seed: sc.seed,
        };
        if let Some(trigger) = run.d.intercept_control(at) {
            let reached = Reached::Intercepted(trigger);
            return Some(Injection { victim, reached });
        }
    }
    let (msg, victim) = observation_point(sc.fault, sc.phase)?;
    let reached = Reached::Published(msg);
    Some(Injection { victim, reached })
}

/// Where a fault lands when publishes can be intercepted: the message, what
/// its publisher does there, and the victim.
fn interception_point(fault: Fault, phase: Phase, variant: bool, at: f64) -> Option<(Msg, Act, Victim)> {
    use Msg::*;
    let crash = |msg, act, victim| Some((msg, act, victim));
    match (fault, phase) {
        (Fault::CrashSource | Fault::CrashTarget, Phase::Live) => None,
        (Fault::CrashSource, Phase::Checkpoint) => crash(CheckpointTaken, Act::Hang, Victim::Source),
        (Fault::CrashSource, Phase::Cutover) => crash(Stopped, Act::Hang, Victim::Source),
        (Fault::CrashSource, p) => crash(phase_message(p), Act::Observe, Victim::Source),
        (Fault::CrashTarget, Phase::Checkpoint | Phase::Transfer) => {
            crash(phase_message(phase), Act::Observe, Victim::Target)
        }
        // Before its takeover (rolled back) or after it (the owner).
        (Fault::CrashTarget, Phase::Cutover) if variant => crash(Takeover, Act::Hang, Victim::Target),
        (Fault::CrashTarget, Phase::Cutover) => crash(Live, Act::Hang, Victim::Target),
        (Fault::CrashTarget, p) => crash(phase_message(p), Act::Hang, Victim::Target),
        (Fault::CrashCoordinator, p) => coordinator_interception(p, variant, at),
        (Fault::StoreUnavailable, Phase::Checkpoint) => crash(Checkpoint, Act::Observe, Victim::Nobody),
        (Fault::StoreUnavailable, _) => crash(Restore, Act::Observe, Victim::Nobody),
        (Fault::CorruptSnapshot | Fault::TruncatedSnapshot | Fault::MissingSnapshot, _) => {
            crash(CheckpointTaken, Act::Observe, Victim::Nobody)
        }
        _ => None,
    }
}

/// The message that marks a crash in each phase (the phase's own work is done).
fn phase_message(phase: Phase) -> Msg {
    match phase {
        Phase::Checkpoint => Msg::CheckpointTaken,
        Phase::Transfer => Msg::Restore,
        Phase::Restore => Msg::Restored,
        Phase::Replay => Msg::TargetProgress,
        Phase::Cutover => Msg::Stopped,
        Phase::Live => Msg::Live,
    }
}

/// Where the coordinator dies when its publishes can be intercepted.
fn coordinator_interception(phase: Phase, variant: bool, at: f64) -> Option<(Msg, Act, Victim)> {
    let (msg, act) = match phase {
        Phase::Checkpoint => (Msg::Checkpoint, Act::Hang),
        Phase::Transfer => (Msg::Restore, Act::Hang),
        // It dies with its Stop in flight (mock seed 62): the Stop may land
        // after the successor's rollback.
        Phase::Cutover if variant && at < 0.5 => (Msg::Stop, Act::Late),
        Phase::Cutover if variant => (Msg::Stop, Act::Hang),
        Phase::Live => (Msg::Release, Act::Hang),
        p => (phase_message(p), Act::Observe),
    };
    Some((msg, act, Victim::Coordinator))
}

/// Where a fault lands when the harness can only watch the history: a
/// crash once the phase's work is on the channel, a broker fault once the
/// message that opens the phase is.
fn observation_point(fault: Fault, phase: Phase) -> Option<(Msg, Victim)> {
    let opening = |p| match p {
        Phase::Checkpoint => Msg::Checkpoint,
        Phase::Transfer => Msg::CheckpointTaken,
        Phase::Restore => Msg::Restore,
        Phase::Replay => Msg::Restored,
        Phase::Cutover => Msg::Stop,
        Phase::Live => Msg::Live,
    };
    match (fault, phase) {
        (f, p) if f.is_broker_fault() => Some((opening(p), Victim::Broker)),
        (Fault::CrashSource | Fault::CrashTarget, Phase::Live) => None,
        (Fault::CrashSource, p) => Some((phase_message(p), Victim::Source)),
        (Fault::CrashTarget, p) => Some((phase_message(p), Victim::Target)),
        (Fault::CrashCoordinator, p) => Some((phase_message(p), Victim::Coordinator)),
        _ => None,
    }
}

/// Waits for the injection point (or the end of the migration), then hits the victim.
async fn inject<D: Deployment, S: Folds>(run: &mut Run<D>, parties: &mut Parties<D, S>, injection: Option<Injection>) {
    let Some(injection) = injection else { return };
    let reached = injection_reached(run, parties, &injection.reached).await;
    run.outcome.injected = reached;
    if reached {
        match injection.victim {
            Victim::Source => parties.source.take().expect("the source").abort(),
            Victim::Target => parties.target.take().expect("the target").abort(),
            Victim::Coordinator => parties.coordinator.take().expect("the coordinator").abort(),
            Victim::Broker => {
                // The parties ride through or fail with typed errors.
                run.d.inject_broker_fault(run.sc.fault, run.sc.seed).await.wait().await
            }
            Victim::Nobody => {}
        }
    }
    run.d.stop_intercepting();
}

/// Whether the point was reached before the coordinator finished.
async fn injection_reached<D: Deployment, S: Folds>(run: &Run<D>, parties: &Parties<D, S>, how: &Reached) -> bool {
    let deadline = Instant::now() + run.limit();
    loop {
        let reached = match how {
            Reached::Intercepted(trigger) => trigger.fired(),
            Reached::Published(msg) => {
                let history = read_history(&*parties.control, S::NAME).await.expect("control history");
                history
                    .iter()
                    .any(|m| m.migration_id == parties.migration_id && msg.matches(m))
            }
        };
        if reached {
            return true;
        }
        if parties.coordinator.as_ref().is_some_and(|t| t.is_finished()) {
            return false;
        }
        assert!(
            Instant::now() < deadline,
            "neither the injection point nor the end of the migration was reached"
        );
        tokio::time::sleep(D::TIMING.recheck).await;
    }
}

/// The coordinator's result, or (if it was crashed, or failed without
/// recording a decision) what a restarted coordinator recovered.
async fn coordinator_verdict<D: Deployment, S: Folds>(
    run: &mut Run<D>,
    parties: &mut Parties<D, S>,
) -> (Option<ms2m_core::Result<MigrationReport>>, Option<Recovered>) {
    let Some(task) = parties.coordinator.take() else {
        return (None, Some(recover_coordinator(run, parties).await));
    };
    let result = tokio::time::timeout(run.limit(), task).await;
    let result = result.expect("the coordinator finishes").expect("coordinator task");
    if result.is_ok() || decision_recorded(parties).await {
        return (Some(result), None);
    }
    let note = "coordinator failed to record its decision: a restarted one did";
    run.outcome.notes.push(note.into());
    (Some(result), Some(recover_coordinator(run, parties).await))
}

async fn decision_recorded<D: Deployment, S: Folds>(parties: &Parties<D, S>) -> bool {
    let history = read_history(&*parties.control, S::NAME).await.expect("control history");
    migration_outcome(&history, &parties.migration_id).is_some()
}

/// A restarted coordinator finishes or rolls back from the control
/// history, retrying while a backend is unreachable.
async fn recover_coordinator<D: Deployment, S: Folds>(run: &mut Run<D>, parties: &Parties<D, S>) -> Recovered {
    let coordinator = Coordinator::new(parties.control.clone(), migration_config::<D>());
    let deadline = Instant::now() + run.limit();
    loop {
        match coordinator.recover(S::NAME, &parties.migration_id).await {
            Ok(recovered) => return recovered,
            Err(e) if Instant::now() < deadline && e.backend_kind().is_some() => {
                run.outcome.typed_errors += 1;
                tokio::time::sleep(D::TIMING.retry).await;
            }
            Err(e) => panic!("coordinator recovery failed: {e:?}"),
        }
    }
}

/// Taken over: the target is the one owner (restarted if it crashed), the
/// released source is refused, live-phase faults hit; its final state.
async fn after_takeover<D: Deployment, S: Folds>(
    run: &mut Run<D>,
    parties: &mut Parties<D, S>,
    owner: Option<String>,
) -> Summer {
    assert_eq!(owner.as_deref(), Some(TARGET), "a completed migration names the target");
    let live = live_target(run, parties).await;
    let released = released_source(run, parties).await;
    let live = hit_live_phase(run, parties, live, released).await;
    let refused = ensure_owner(&*parties.control, S::NAME, SOURCE).await;
    let refused = refused.expect_err("the old owner must be refused");
    assert!(matches!(refused, Error::Fenced { .. }), "{refused:?}");
    run.outcome.typed_errors += 1;
    run.drain(live).await
}

/// The target, live; restarted as the owner if it crashed (or failed
/// under a broker fault) after taking over.
async fn live_target<D: Deployment, S: Folds>(run: &mut Run<D>, parties: &mut Parties<D, S>) -> Inst<D, S> {
    let note = match parties.target.take() {
        Some(task) => match tokio::time::timeout(run.limit(), task)
            .await
            .expect("the target returns")
        {
            Ok(Ok(live)) => {
                assert!(live.is_live(), "the target returned before going live");
                return live;
            }
            Ok(Err(e)) if run.sc.fault.is_broker_fault() => {
                format!("target failed after its takeover: {:?}", e.backend_kind())
            }
            other => panic!("the target took over but failed: {other:?}"),
        },
        None => "crashed target had already taken over: restarted as owner".into(),
    };
    run.outcome.notes.push(note);
    restart_owner(run, parties, TARGET).await
}

/// The owner `id` is restarted (a crash before it): `ensure_owner`, recover.
async fn restart_owner<D: Deployment, S: Folds>(run: &mut Run<D>, parties: &Parties<D, S>, id: &str) -> Inst<D, S> {
    run.crashes += 1;
    ensure_owner(&*parties.control, S::NAME, id)
        .await
        .expect("the decided owner restarts");
    run.recover_retrying(run.config(id)).await
}

/// The source, released by the migration (unless it crashed, or failed
/// under a broker fault).
async fn released_source<D: Deployment, S: Folds>(run: &mut Run<D>, parties: &mut Parties<D, S>) -> Option<Inst<D, S>> {
    let source = parties.source.take()?;
    match tokio::time::timeout(run.limit(), source.join())
        .await
        .expect("the source returns")
    {
        Ok(SourceExit::Released(instance)) => Some(instance),
        Err(e) if run.sc.fault.is_broker_fault() => {
            let note = format!("source failed under the broker fault: {:?}", e.backend_kind());
            run.outcome.notes.push(note);
            None
        }
        other => panic!("the source was not released: {other:?}"),
    }
}

/// Live-phase faults: the released source tries to go on (a zombie) or
/// crashes; the new owner crashes while serving and is restarted.
async fn hit_live_phase<D: Deployment, S: Folds>(
    run: &mut Run<D>,
    parties: &Parties<D, S>,
    mut live: Inst<D, S>,
    released: Option<Inst<D, S>>,
) -> Inst<D, S> {
    match (run.sc.fault, run.sc.phase) {
        (Fault::ZombieSource, Phase::Live) => {
            run.outcome.injected = true;
            zombie_is_fenced(run, released.expect("the released source")).await;
        }
        (Fault::CrashSource, Phase::Live) => {
            run.outcome.injected = true;
            drop(released);
        }
        (Fault::CrashTarget, Phase::Live) => {
            run.outcome.injected = true;
            run.produce(20).await;
            for _ in 0..(1 + run.sc.seed % 5) {
                live.step().await.expect("the new owner steps");
            }
            run.crash(live);
            live = restart_owner(run, parties, TARGET).await;
        }
        _ => {}
    }
    live
}

/// A released source keeps stepping: a transactional sink fences its
/// commit. Elsewhere only the control channel refuses it (checked by the caller).
async fn zombie_is_fenced<D: Deployment, S: Folds>(run: &mut Run<D>, mut zombie: Inst<D, S>) {
    if D::GUARANTEE == Guarantee::AtLeastOnce {
        let note = "zombie: refused by ensure_owner; producer fencing needs a real transactional broker";
        run.outcome.notes.push(note.into());
        return;
    }
    run.produce(30).await;
    let outcome = async {
        for _ in 0..500 {
            zombie.step().await?;
        }
        zombie.commit().await
    };
    let err = outcome.await.expect_err("the zombie's commit must be fenced");
    assert_eq!(err.backend_kind(), Some(ErrorKind::Fenced), "{err:?}");
    run.outcome.typed_errors += 1;
}

/// Rolled back: the target never goes live, the source (resumed, or
/// restarted if it crashed) is the one owner; its final state.
async fn after_rollback<D: Deployment, S: Folds>(
    run: &mut Run<D>,
    parties: &mut Parties<D, S>,
    owner: Option<String>,
) -> Summer {
    assert_ne!(
        owner.as_deref(),
        Some(TARGET),
        "a rolled-back migration leaves the source owner"
    );
    target_gave_up(run, parties).await;
    let state = match source_still_serving(run, parties).await {
        Some(source) => match tokio::time::timeout(run.limit(), source.stop())
            .await
            .expect("the source stops")
        {
            Ok(SourceExit::Shutdown(instance)) => instance.state().summer().clone(),
            other => panic!("the source should still own the service: {other:?}"),
        },
        None => {
            let again = restart_owner(run, parties, SOURCE).await;
            run.drain(again).await
        }
    };
    if owner.is_some() {
        let refused = ensure_owner(&*parties.control, S::NAME, TARGET).await;
        let refused = refused.expect_err("the target must be refused");
        assert!(matches!(refused, Error::Fenced { .. }), "{refused:?}");
    }
    state
}

/// A target named in a `Prepare` gives up with an error (a digest
/// mismatch only for an injected divergence); one never named is still a
/// standby, never live.
async fn target_gave_up<D: Deployment, S: Folds>(run: &mut Run<D>, parties: &mut Parties<D, S>) {
    let Some(task) = parties.target.take() else { return };
    let history = read_history(&*parties.control, S::NAME).await.expect("control history");
    let prepared = history.iter().any(|m| {
        m.migration_id == parties.migration_id
            && matches!(&m.body, ControlBody::Prepare { target, .. } if target == TARGET)
    });
    if !prepared {
        assert!(
            !task.is_finished() || task.await.expect("target task").is_err(),
            "an unprepared target went live"
        );
        return;
    }
    let result = tokio::time::timeout(run.limit(), task)
        .await
        .expect("the target gives up");
    let e = result
        .expect("target task")
        .expect_err("an aborted target must not go live");
    run.outcome.typed_errors += 1;
    if matches!(e, Error::Migration(MigrationError::DigestMismatch { .. })) {
        assert_eq!(run.sc.fault, Fault::Divergence, "unexpected divergence: {e}");
    }
}

/// The source once it committed all input, if it still serves; `None` if
/// it crashed, or died of an injected backend outage (a typed error).
async fn source_still_serving<D: Deployment, S: Folds>(
    run: &mut Run<D>,
    parties: &mut Parties<D, S>,
) -> Option<SourceHandle<Inst<D, S>>> {
    let source = parties.source.take()?;
    let end = run.d.input_end().await;
    let deadline = Instant::now() + run.limit();
    while !source.is_finished() && Instant::now() < deadline {
        if run.d.committed_through(&end).await {
            return Some(source);
        }
        tokio::time::sleep(D::TIMING.retry).await;
    }
    assert!(source.is_finished(), "the (resumed) source commits all input");
    let e = source
        .join()
        .await
        .expect_err("the source ended without being released or shut down");
    let outage = run.sc.fault.is_broker_fault() || run.sc.fault == Fault::StoreUnavailable;
    assert!(
        outage && e.backend_kind().is_some(),
        "the source died without a backend outage: {e:?}"
    );
    let note = format!("source failed under {:?}: {:?}", run.sc.fault, e.backend_kind());
    run.outcome.notes.push(note);
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every crash of a party before the live phase has an injection point
    /// on both kinds of deployment.
    #[test]
    fn every_pre_live_crash_has_an_injection_point() {
        let phases = [
            Phase::Checkpoint,
            Phase::Transfer,
            Phase::Restore,
            Phase::Replay,
            Phase::Cutover,
        ];
        for fault in [Fault::CrashSource, Fault::CrashTarget, Fault::CrashCoordinator] {
            for phase in phases {
                for variant in [false, true] {
                    assert!(
                        interception_point(fault, phase, variant, 0.3).is_some(),
                        "{fault:?} {phase:?}"
                    );
                }
                assert!(observation_point(fault, phase).is_some(), "{fault:?} {phase:?}");
            }
        }
    }
}
