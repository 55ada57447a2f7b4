//! Migration scenarios over the in-memory backends: every strategy under a
//! steady input stream, the threshold cutoff, a non-deterministic `apply`,
//! and crashes of each party at each phase. Every scenario ends by checking
//! the invariants: final state equals the reference fold of all input,
//! every output committed exactly once, one owner.

use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use super::*;
use crate::codec::{CodecError, Json};
use crate::memory::*;
use crate::runtime::{no_progress, Instance, InstanceConfig, ProgressPhase};
use crate::state::{ServiceState, StateError};
use crate::testkit::*;
use crate::{ApplyContext, ControlMessage, Error, StatefulService};

type Inst<S> = Instance<S, MemoryLogReader, MemorySnapshotStore, MemorySink>;

type Cluster = MemoryCluster;

const OUT: &str = "balances.out";

async fn wait_for(cluster: &Cluster, what: &str, f: impl Fn(&ControlBody) -> bool) {
    tokio::time::timeout(Duration::from_secs(20), async {
        while !cluster.has(|m| f(&m.body)) {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("timed out waiting for {what}"));
}

/// The invariants every scenario ends with.
fn check(cluster: &Cluster, final_state: &Balances) {
    let input = cluster.produced();
    assert_eq!(
        final_state,
        &reference_fold(&input).0,
        "final state differs from the reference fold"
    );
    let (missing, duplicated) = output_exactly_once(&input, &cluster.balance_outputs(OUT));
    assert_eq!((missing, duplicated), (0, 0), "outputs lost or duplicated");
}

fn config(id: &str) -> InstanceConfig {
    InstanceConfig::new(id)
        .snapshot_every(Some(500))
        .commit_every(50, Duration::from_millis(5))
        .poll(64, Duration::from_millis(5))
        .output_topic(OUT)
}

fn fast() -> MigrationConfig {
    MigrationConfig {
        cutover: CutoverRule {
            max_lag: Some(20),
            max_catch_up: Some(Duration::from_millis(20)),
            replay_max: Duration::from_millis(300),
        },
        digest_policy: DigestPolicy::Abort,
        phase_timeout: Duration::from_secs(20),
    }
}

fn plan(strategy: Strategy) -> MigrationPlan {
    MigrationPlan {
        service: "balances".into(),
        migration_id: format!("m-{strategy:?}"),
        source: "src".into(),
        target: "tgt".into(),
        strategy,
    }
}

type SourceTask<S> = tokio::task::JoinHandle<crate::Result<SourceExit<Inst<S>>>>;
type TargetTask<S> = tokio::task::JoinHandle<crate::Result<Inst<S>>>;

/// Starts the source (recovered with `config`, owner) until `stop_source`.
async fn spawn_source<S: StatefulService>(
    cluster: &Cluster,
    config: InstanceConfig,
    stop_source: tokio::sync::oneshot::Receiver<()>,
) -> SourceTask<S> {
    let source: Inst<S> = Instance::recover(cluster.backends(), config, &*no_progress())
        .await
        .unwrap();
    let agent = SourceAgent::new(source, cluster.control.clone(), SourceOptions::default())
        .await
        .unwrap();
    tokio::spawn(agent.run(async move {
        let _ = stop_source.await;
    }))
}

/// Starts the source (recovered, owner) and a standby target.
async fn start<S: StatefulService>(
    cluster: &Cluster,
    stop_source: tokio::sync::oneshot::Receiver<()>,
) -> (SourceTask<S>, TargetTask<S>) {
    let source = spawn_source::<S>(cluster, config("src"), stop_source).await;
    let (backends, control) = (cluster.backends(), cluster.control.clone());
    let target = tokio::spawn(async move {
        let options = TargetOptions {
            phase_timeout: Duration::from_secs(3),
            ..TargetOptions::default()
        };
        run_target::<S, _, _, _, _>(backends, config("tgt"), control, options, &*no_progress()).await
    });
    // The source is subscribed; the target reads the channel from its start.
    (source, target)
}

async fn drain<S: StatefulService, St: crate::store::SnapshotStore>(
    instance: &mut Instance<S, MemoryLogReader, St, MemorySink>,
    log: &MemoryLog,
) {
    let end = log.end_position();
    tokio::time::timeout(Duration::from_secs(20), async {
        while !instance.position().reaches(&end) {
            instance.step().await.unwrap();
        }
    })
    .await
    .expect("instance drains the log");
    instance.shutdown().await.unwrap();
}

/// A full migration under steady input; returns the report.
async fn migrate_under_load(strategy: Strategy, config: MigrationConfig) -> MigrationReport {
    let cluster = Cluster::new();
    cluster.produce_now(2_000);
    let (_stop, stop_rx) = tokio::sync::oneshot::channel();
    let (source, target) = start::<Balances>(&cluster, stop_rx).await;
    let producer = cluster.produce_steady(3_000, Duration::from_millis(2));
    await_committed(&cluster, 2_010).await;
    let coordinator = Coordinator::new(cluster.control.clone(), config);
    let report = coordinator.migrate(&plan(strategy), &*no_progress()).await.unwrap();
    let released = source.await.unwrap().unwrap();
    assert!(matches!(released, SourceExit::Released(_)));
    let mut live = target.await.unwrap().unwrap();
    assert!(live.is_live());
    producer.await.unwrap();
    drain(&mut live, &cluster.log).await;
    check(&cluster, live.state());
    assert!(report.digest_match);
    assert_eq!(report.source_digest, report.target_digest);
    assert_eq!(report.strategy, strategy);
    assert!(report.downtime_ms <= report.total_ms);
    // The handover was computed from its parts, not taken from the cutover.
    assert!(report.control_trip_ms.is_some(), "the coordinator read its Stop back");
    assert!(
        report.visible_before_live_ms.is_some(),
        "the target timed its first outputs"
    );
    let owner = current_owner(&*cluster.control, "balances").await.unwrap().unwrap();
    assert_eq!(owner.instance_id, "tgt");
    report
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ms2m_under_steady_input_loses_and_duplicates_nothing() {
    let report = migrate_under_load(Strategy::Ms2m, fast()).await;
    assert!(report.snapshot_bytes > 0);
    assert!(report.messages_replayed > 0);
    assert!(matches!(
        report.cutover_reason,
        CutoverReason::MaxLag { .. } | CutoverReason::CatchUpEstimate { .. }
    ));
    // The report serializes for plotting.
    let json = serde_json::to_string(&report).unwrap();
    assert!(json.contains("\"downtime_ms\""));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_and_copy_and_cold_start_baselines_are_correct() {
    for strategy in [Strategy::StopAndCopy, Strategy::ColdStart] {
        let report = migrate_under_load(strategy, fast()).await;
        assert_eq!(report.cutover_reason, CutoverReason::StopFirst);
        assert_eq!(report.downtime_ms, report.handover_ms.max(report.source_stall_ms));
        if strategy == Strategy::ColdStart {
            assert_eq!(report.snapshot_bytes, 0);
            assert!(report.messages_replayed >= 2_000, "cold start replays the whole log");
        }
    }
}

/// Balances whose serialization takes [`SLOW_SNAPSHOT`] on the apply loop.
#[derive(Default)]
struct SlowSnapshot(Balances);

const SLOW_SNAPSHOT: Duration = Duration::from_millis(150);

impl ServiceState for SlowSnapshot {
    const SCHEMA_VERSION: u32 = 1;
    fn snapshot(&self) -> Result<Vec<u8>, CodecError> {
        std::thread::sleep(SLOW_SNAPSHOT);
        self.0.snapshot()
    }
    fn restore(v: u32, b: &[u8]) -> Result<Self, StateError> {
        Balances::restore(v, b).map(SlowSnapshot)
    }
    fn digest(&self) -> crate::StateDigest {
        self.0.digest()
    }
}

#[async_trait]
impl StatefulService for SlowSnapshot {
    const NAME: &'static str = "balances";
    type Message = Deposit;
    type Format = Json;
    type Error = Infallible;
    async fn apply(&mut self, m: Deposit, ctx: &mut ApplyContext<'_>) -> Result<(), Infallible> {
        self.0.apply(m, ctx).await
    }
}

/// The source's checkpoint serialization stalls its apply loop: clients see
/// that as downtime, so the report counts it even though it happens long
/// before the stop.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_source_serialization_pause_is_reported_as_downtime() {
    let cluster = Cluster::new();
    cluster.produce_now(1_000);
    let (_stop, stop_rx) = tokio::sync::oneshot::channel();
    let (source, target) = start::<SlowSnapshot>(&cluster, stop_rx).await;
    let producer = cluster.produce_steady(1_000, Duration::from_millis(2));
    await_committed(&cluster, 1_010).await;
    let coordinator = Coordinator::new(cluster.control.clone(), fast());
    let report = coordinator
        .migrate(&plan(Strategy::Ms2m), &*no_progress())
        .await
        .unwrap();
    assert!(matches!(source.await.unwrap().unwrap(), SourceExit::Released(_)));
    let mut live = target.await.unwrap().unwrap();
    producer.await.unwrap();
    drain(&mut live, &cluster.log).await;
    check(&cluster, &live.state().0);
    let slow = SLOW_SNAPSHOT.as_secs_f64() * 1000.0;
    assert!(
        report.source_stall_ms >= slow,
        "stall {} ms < {slow} ms",
        report.source_stall_ms
    );
    assert_eq!(report.downtime_ms, report.handover_ms.max(report.source_stall_ms));
}

/// Opens the replay of [`GatedReplay`]; closed until a test opens it.
static REPLAY_GATE: std::sync::LazyLock<tokio::sync::watch::Sender<bool>> =
    std::sync::LazyLock::new(|| tokio::sync::watch::Sender::new(false));

/// Balances whose replay cannot move until [`REPLAY_GATE`] opens: a target
/// that cannot catch up, whatever the machine's speed.
#[derive(Default)]
struct GatedReplay(Balances);

impl ServiceState for GatedReplay {
    const SCHEMA_VERSION: u32 = 1;
    fn snapshot(&self) -> Result<Vec<u8>, CodecError> {
        self.0.snapshot()
    }
    fn restore(v: u32, b: &[u8]) -> Result<Self, StateError> {
        Balances::restore(v, b).map(GatedReplay)
    }
    fn digest(&self) -> crate::StateDigest {
        self.0.digest()
    }
}

#[async_trait]
impl StatefulService for GatedReplay {
    const NAME: &'static str = "balances";
    type Message = Deposit;
    type Format = Json;
    type Error = Infallible;
    async fn apply(&mut self, m: Deposit, ctx: &mut ApplyContext<'_>) -> Result<(), Infallible> {
        if ctx.is_replaying() {
            let mut gate = REPLAY_GATE.subscribe();
            let _ = gate.wait_for(|open| *open).await;
        }
        self.0.apply(m, ctx).await
    }
}

/// Recovers `Balances` as the owner and runs its source agent.
async fn spawn_owner(cluster: &Cluster, config: InstanceConfig) -> SourceHandle<Inst<Balances>> {
    let source: Inst<Balances> = Instance::recover(cluster.backends(), config, &*no_progress())
        .await
        .unwrap();
    SourceAgent::new(source, cluster.control.clone(), SourceOptions::default())
        .await
        .unwrap()
        .spawn()
}

/// Shuts the owner down (it must still own the service) and checks the
/// invariants on its final state.
async fn stop_owner_and_check(cluster: &Cluster, owner: SourceHandle<Inst<Balances>>) {
    let SourceExit::Shutdown(src) = owner.stop().await.unwrap() else {
        panic!("the source should still own the service")
    };
    check(cluster, src.state());
}

/// Waits until every input produced so far is committed: the owner serves it.
async fn await_all_committed(cluster: &Cluster, what: &str) {
    let end = cluster.log.end_position();
    tokio::time::timeout(Duration::from_secs(20), async {
        while !cluster.outputs.committed_position().is_some_and(|p| p.reaches(&end)) {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("timed out: {what}"));
}

/// Waits until the owner has committed outputs for `n` inputs: it serves.
async fn await_committed(cluster: &Cluster, n: i64) {
    tokio::time::timeout(Duration::from_secs(20), async {
        while cluster.outputs.committed_position().is_none_or(|p| p.total() < n) {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("the owner did not commit {n} inputs"));
}

/// The target's replay is held still, so it cannot catch up: with the
/// other rules off, only the threshold cutoff can end the replay (on the
/// coordinator's clock, with no progress arriving), and every message from
/// P0 to Pf is replayed once the target can move: none dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn threshold_cutoff_ends_a_replay_that_cannot_catch_up_and_loses_nothing() {
    let cluster = Cluster::new();
    cluster.produce_now(500);
    let (_stop, stop_rx) = tokio::sync::oneshot::channel();
    let (source, target) = start::<GatedReplay>(&cluster, stop_rx).await;
    let producer = cluster.produce_steady(2_000, Duration::from_millis(2));
    await_committed(&cluster, 600).await;
    let mut config = fast();
    config.cutover.max_lag = None;
    config.cutover.max_catch_up = None;
    config.cutover.replay_max = Duration::from_secs(1);
    let coordinator = Coordinator::new(cluster.control.clone(), config.clone());
    let migration = tokio::spawn(async move {
        coordinator
            .migrate(&plan(Strategy::Ms2mThreshold), &*no_progress())
            .await
    });
    wait_for(&cluster, "the cutoff's stop", |b| matches!(b, ControlBody::Stop { .. })).await;
    REPLAY_GATE.send_replace(true);
    let report = migration.await.unwrap().unwrap();
    match report.cutover_reason {
        CutoverReason::ThresholdCutoff { cutoff_seconds } => {
            assert!(cutoff_seconds <= config.cutover.replay_max.as_secs_f64());
            assert!(report.replay_ms >= cutoff_seconds * 1e3, "fired before T_cutoff");
        }
        other => panic!("expected the threshold cutoff to fire, got {other:?}"),
    }
    // Every message from P0 to Pf was replayed once: whatever the held
    // target had not reached at the cutoff was replayed, not dropped.
    assert_eq!(
        report.messages_replayed as i64,
        report.pf.total() - report.p0.total(),
        "{report:?}"
    );
    assert!(matches!(source.await.unwrap().unwrap(), SourceExit::Released(_)));
    let mut live = target.await.unwrap().unwrap();
    producer.await.unwrap();
    drain(&mut live, &cluster.log).await;
    check(&cluster, &live.state().0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nondeterministic_apply_is_caught_at_the_digest_point_before_the_source_stops() {
    let cluster = Cluster::new();
    cluster.produce_now(300);
    let (stop, stop_rx) = tokio::sync::oneshot::channel();
    let (source, target) = start::<Nondeterministic>(&cluster, stop_rx).await;
    let producer = cluster.produce_steady(2_000, Duration::from_millis(2));
    await_committed(&cluster, 310).await;
    let coordinator = Coordinator::new(cluster.control.clone(), fast());
    let err = coordinator
        .migrate(&plan(Strategy::Ms2m), &*no_progress())
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::Migration(MigrationError::DigestMismatch { .. })),
        "{err:?}"
    );
    let target_err = target.await.unwrap().unwrap_err();
    assert!(matches!(
        target_err,
        Error::Migration(MigrationError::DigestMismatch { .. })
    ));
    // Caught at the digest point, before the stop: the source never
    // stopped, stays the owner and processes everything exactly once.
    assert!(cluster.has(|m| matches!(m.body, ControlBody::DigestAt { .. })));
    assert!(!cluster.has(|m| matches!(m.body, ControlBody::Stop { .. } | ControlBody::Stopped { .. })));
    producer.await.unwrap();
    wait_for(&cluster, "the migration to be aborted", |b| {
        matches!(b, ControlBody::Aborted { .. })
    })
    .await;
    await_all_committed(&cluster, "the resumed source commits all input").await;
    stop.send(()).unwrap();
    let SourceExit::Shutdown(src) = source.await.unwrap().unwrap() else {
        panic!("source should have been shut down, not released")
    };
    check(&cluster, &src.state().balances);
    // Ownership never moved (no migration decided for anyone).
    let owner = current_owner(&*cluster.control, "balances").await.unwrap();
    assert_eq!(owner, None);
}

/// Which party dies, and when. Each crash is injected at an exact protocol
/// step through the control channel's fault hook: the party's publish fails
/// (it dies there) or hangs (and its task is then aborted).
#[derive(Clone, Copy, Debug)]
enum Kill {
    /// The target dies instead of reporting its first replay progress.
    TargetDuringReplay,
    /// The target dies at cutover, instead of announcing `Takeover`.
    TargetAtCutover,
    /// The target dies after its `Takeover` decided the migration, instead
    /// of announcing `Live`: it owns the service and is restarted as owner.
    TargetAfterTakeover,
    /// The coordinator dies while publishing `Stop`: nothing was stopped.
    CoordinatorBeforeStop,
    /// The coordinator dies after the source stopped, and the target hangs
    /// before announcing `Takeover`: a restarted coordinator rolls back.
    CoordinatorAndTargetAtCutover,
    /// The coordinator dies after the target went live, before `Release`.
    CoordinatorAfterLive,
}

async fn kill_scenario(kill: Kill) {
    let cluster = Cluster::new();
    cluster.produce_now(1_000);
    let hook_hit = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let hit_flag = hook_hit.clone();
    cluster.control.set_fault(move |m| {
        let hit = match kill {
            Kill::TargetDuringReplay => matches!(m.body, ControlBody::TargetProgress { .. }),
            Kill::TargetAtCutover => matches!(m.body, ControlBody::Takeover { .. }),
            Kill::TargetAfterTakeover => matches!(m.body, ControlBody::Live { .. }),
            Kill::CoordinatorBeforeStop => matches!(m.body, ControlBody::Stop { .. }),
            Kill::CoordinatorAndTargetAtCutover => matches!(m.body, ControlBody::Takeover { .. }),
            Kill::CoordinatorAfterLive => matches!(m.body, ControlBody::Release),
        };
        if hit {
            hit_flag.store(true, Ordering::SeqCst);
        }
        match (hit, kill) {
            (false, _) => PublishFault::Pass,
            (true, Kill::TargetDuringReplay | Kill::TargetAtCutover | Kill::TargetAfterTakeover) => PublishFault::Fail,
            (true, _) => PublishFault::Hang,
        }
    });
    let (stop, stop_rx) = tokio::sync::oneshot::channel();
    let (source, target) = start::<Balances>(&cluster, stop_rx).await;
    let producer = cluster.produce_steady(1_000, Duration::from_millis(2));
    let mut config = fast();
    config.phase_timeout = Duration::from_millis(800);
    let coordinator = Arc::new(Coordinator::new(cluster.control.clone(), config));
    let plan = plan(Strategy::Ms2m);
    let migration = {
        let (c, p) = (coordinator.clone(), plan.clone());
        tokio::spawn(async move { c.migrate(&p, &*no_progress()).await })
    };
    let mut target = Some(target);
    match kill {
        Kill::TargetDuringReplay | Kill::TargetAtCutover => {
            let err = migration.await.unwrap().unwrap_err();
            assert!(
                matches!(err, Error::Migration(MigrationError::Timeout { .. })),
                "{err:?}"
            );
            assert!(target.take().unwrap().await.unwrap().is_err(), "the target died");
            let resumed = cluster.has(|m| matches!(m.body, ControlBody::Resume { .. }));
            match kill {
                Kill::TargetDuringReplay => assert!(!resumed, "the source never stopped, nothing to resume"),
                _ => assert!(resumed, "the stopped source is told to resume"),
            }
        }
        Kill::TargetAfterTakeover => {
            let err = migration.await.unwrap().unwrap_err();
            assert!(
                matches!(err, Error::Migration(MigrationError::TakenOverNotLive { .. })),
                "{err:?}"
            );
            assert!(target.take().unwrap().await.unwrap().is_err(), "the target died");
            assert!(!cluster.has(|m| matches!(m.body, ControlBody::Resume { .. })));
            assert!(matches!(source.await.unwrap().unwrap(), SourceExit::Released(_)));
            // The decided owner is restarted from the snapshot and the log.
            producer.await.unwrap();
            ensure_owner(&*cluster.control, "balances", "tgt").await.unwrap();
            let backends = cluster.backends();
            let mut owner = Instance::<Balances, _, _, _>::recover(backends, self::config("tgt"), &*no_progress())
                .await
                .unwrap();
            drain(&mut owner, &cluster.log).await;
            check(&cluster, owner.state());
            return;
        }
        Kill::CoordinatorBeforeStop => {
            // Wait until the coordinator hangs publishing Stop, then kill it.
            tokio::time::timeout(Duration::from_secs(20), async {
                while !hook_hit.load(Ordering::SeqCst) {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            })
            .await
            .expect("the coordinator reaches the stop");
            migration.abort();
            cluster.control.set_fault(|_| PublishFault::Pass);
            let done = coordinator.recover("balances", &plan.migration_id).await.unwrap();
            assert_eq!(done, Recovered::Aborted);
            assert!(
                target.take().unwrap().await.unwrap().is_err(),
                "an aborted target must not go live"
            );
        }
        Kill::CoordinatorAndTargetAtCutover => {
            wait_for(&cluster, "stopped", |b| matches!(b, ControlBody::Stopped { .. })).await;
            migration.abort();
            target.take().unwrap().abort();
            let done = coordinator.recover("balances", &plan.migration_id).await.unwrap();
            assert_eq!(done, Recovered::RolledBack);
            cluster.control.set_fault(|_| PublishFault::Pass);
        }
        Kill::CoordinatorAfterLive => {
            wait_for(&cluster, "target live", |b| matches!(b, ControlBody::Live { .. })).await;
            migration.abort();
            cluster.control.set_fault(|_| PublishFault::Pass);
            let done = coordinator.recover("balances", &plan.migration_id).await.unwrap();
            assert_eq!(done, Recovered::Completed);
        }
    }
    producer.await.unwrap();
    // Exactly one owner at the end, and it processes everything exactly once.
    let owner = current_owner(&*cluster.control, "balances")
        .await
        .unwrap()
        .map(|o| o.instance_id);
    let final_state = if let Some(target) = target.take() {
        assert_eq!(owner.as_deref(), Some("tgt"));
        let mut live = target.await.unwrap().unwrap();
        assert!(matches!(source.await.unwrap().unwrap(), SourceExit::Released(_)));
        drain(&mut live, &cluster.log).await;
        live.state().clone()
    } else {
        assert_ne!(owner.as_deref(), Some("tgt"));
        await_all_committed(
            &cluster,
            "the source keeps (or resumes) ownership and commits all input",
        )
        .await;
        stop.send(()).unwrap();
        let SourceExit::Shutdown(src) = source.await.unwrap().unwrap() else {
            panic!("source should still own the service")
        };
        src.state().clone()
    };
    check(&cluster, &final_state);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn target_crash_before_stop_aborts_cleanly() {
    kill_scenario(Kill::TargetDuringReplay).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn target_crash_after_stop_hands_ownership_back() {
    kill_scenario(Kill::TargetAtCutover).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn target_crash_after_its_takeover_leaves_it_the_owner() {
    kill_scenario(Kill::TargetAfterTakeover).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coordinator_crash_before_stop_is_aborted_by_a_new_coordinator() {
    kill_scenario(Kill::CoordinatorBeforeStop).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coordinator_and_target_crash_at_cutover_is_rolled_back_by_a_new_coordinator() {
    kill_scenario(Kill::CoordinatorAndTargetAtCutover).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coordinator_crash_after_the_target_is_live_completes_the_migration() {
    kill_scenario(Kill::CoordinatorAfterLive).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zombie_source_is_fenced_after_the_handover() {
    let cluster = Cluster::new();
    cluster.produce_now(500);
    let (_stop, stop_rx) = tokio::sync::oneshot::channel();
    let (source, target) = start::<Balances>(&cluster, stop_rx).await;
    let coordinator = Coordinator::new(cluster.control.clone(), fast());
    coordinator
        .migrate(&plan(Strategy::Ms2m), &*no_progress())
        .await
        .unwrap();
    let SourceExit::Released(mut zombie) = source.await.unwrap().unwrap() else {
        panic!("source should be released")
    };
    let mut live = target.await.unwrap().unwrap();
    // The zombie wakes up, sees new input and tries to emit: its commit is fenced.
    cluster.produce_now(50);
    let err = async {
        for _ in 0..1_000 {
            zombie.step().await?;
        }
        zombie.commit().await
    }
    .await
    .unwrap_err();
    assert_eq!(err.backend_kind(), Some(crate::ErrorKind::Fenced), "{err:?}");
    // A restarted zombie refuses to start at all.
    let err = ensure_owner(&*cluster.control, "balances", "src").await.unwrap_err();
    assert!(matches!(err, Error::Fenced { .. }));
    ensure_owner(&*cluster.control, "balances", "tgt").await.unwrap();
    drain(&mut live, &cluster.log).await;
    check(&cluster, live.state());
}

#[test]
fn control_messages_roundtrip_as_json() {
    let m = message(
        "balances",
        "m-1",
        crate::Role::Coordinator,
        ControlBody::Stop { next_epoch: 3 },
    );
    assert_eq!(ControlMessage::from_bytes(&m.to_bytes()).unwrap(), m);
}

/// Fault-suite seed 8: a standby target replaying behind the source must
/// never write snapshots, or a recovering source could restore a position
/// above its committed outputs and never emit them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn regression_seed_8_a_standby_never_snapshots() {
    let cluster = Cluster::new();
    cluster.produce_now(200);
    let source: Inst<Balances> = Instance::recover(cluster.backends(), config("src"), &*no_progress())
        .await
        .unwrap();
    let agent = SourceAgent::new(source, cluster.control.clone(), SourceOptions::default())
        .await
        .unwrap();
    let (_stop, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let source = tokio::spawn(agent.run(async move {
        let _ = stop_rx.await;
    }));
    let (backends, control) = (cluster.backends(), cluster.control.clone());
    let target = tokio::spawn(async move {
        let options = TargetOptions {
            phase_timeout: Duration::from_secs(3),
            ..TargetOptions::default()
        };
        // Snapshot after every message, were it allowed to.
        let eager = config("tgt").snapshot_every(Some(1));
        run_target::<Balances, _, _, _, _>(backends, eager, control, options, &*no_progress()).await
    });
    let producer = cluster.produce_steady(1_000, Duration::from_millis(2));
    let coordinator = Coordinator::new(cluster.control.clone(), fast());
    let report = coordinator
        .migrate(&plan(Strategy::Ms2m), &*no_progress())
        .await
        .unwrap();
    producer.await.unwrap();
    let _live = target.await.unwrap().unwrap();
    assert!(matches!(source.await.unwrap().unwrap(), SourceExit::Released(_)));
    // The standby wrote none while replaying: every stored snapshot is the
    // source's (its checkpoint, and periodic ones if it crossed its cadence)
    // or the target's once live (at or past Pf, after its first commit).
    let ids = crate::SnapshotStore::list(&cluster.store).await.unwrap();
    assert!(!ids.is_empty(), "the source's checkpoint is stored");
    for id in ids {
        let bytes = crate::SnapshotStore::get(&cluster.store, id).await.unwrap();
        let header = crate::Snapshot::decode(bytes).unwrap().header;
        let (writer, position) = (header.instance_id, header.position);
        let live_target = writer == "tgt" && position.reaches(&report.pf);
        assert!(
            writer == "src" || live_target,
            "snapshot {id} was written by the standby at {position}"
        );
    }
}

/// Fault suite: a checkpoint that cannot be stored abandons the migration
/// and the source keeps serving (it never noticed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_checkpoint_abandons_the_migration_and_the_source_keeps_serving() {
    let cluster = Cluster::new();
    cluster.produce_now(300);
    let (stop, stop_rx) = tokio::sync::oneshot::channel();
    let (source, target) = start::<Balances>(&cluster, stop_rx).await;
    cluster.store.set_unavailable(true);
    let coordinator = Coordinator::new(cluster.control.clone(), fast());
    let err = coordinator
        .migrate(&plan(Strategy::Ms2m), &*no_progress())
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::Migration(MigrationError::Aborted { .. })),
        "{err:?}"
    );
    assert!(target.await.unwrap().is_err());
    cluster.store.set_unavailable(false);
    cluster.produce_now(100);
    await_all_committed(&cluster, "the source keeps serving").await;
    stop.send(()).unwrap();
    let SourceExit::Shutdown(src) = source.await.unwrap().unwrap() else {
        panic!("the source keeps ownership")
    };
    check(&cluster, src.state());
}

/// Publishes `body` as a coordinator of migration `id` would.
async fn coordinator_says(cluster: &Cluster, id: &str, body: ControlBody) {
    let m = message("balances", id, crate::Role::Coordinator, body);
    cluster.control.publish(&m).await.unwrap();
}

/// How a dead coordinator's `Stop` and its successor's rollback interleave.
#[derive(Clone, Copy, Debug)]
enum LateStop {
    /// The successor's `Aborted` lands first, the dead one's `Stop` after it.
    AbortedThenStop,
    /// `Stop` lands just before the successor's `Aborted`.
    StopThenAborted,
    /// The source already stopped when `Aborted` lands: it races the
    /// target's `Takeover`.
    AbortedRacesTakeover,
    /// As above, with `Resume` (the successor saw the `Stop`).
    ResumeRacesTakeover,
}

/// Fault-suite mock seed 62, made deterministic: the coordinator's messages
/// are published by hand in each interleaving. Whatever the order, the
/// source, the target and `current_owner` agree with `migration_outcome`:
/// exactly one owner, nothing lost or duplicated.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn regression_mock_seed_62_a_late_stop_and_a_rollback_are_decided_by_channel_order() {
    for case in [
        LateStop::AbortedThenStop,
        LateStop::StopThenAborted,
        LateStop::AbortedRacesTakeover,
        LateStop::ResumeRacesTakeover,
    ] {
        late_stop(case).await;
    }
}

async fn late_stop(case: LateStop) {
    let cluster = Cluster::new();
    cluster.produce_now(300);
    let (stop, stop_rx) = tokio::sync::oneshot::channel();
    let (source, target) = start::<Balances>(&cluster, stop_rx).await;
    let producer = cluster.produce_steady(3_000, Duration::from_millis(2));
    let id = format!("m-late-{case:?}");
    let prepare = ControlBody::Prepare {
        source: "src".into(),
        target: "tgt".into(),
        digest_policy: DigestPolicy::Abort,
        strategy: None,
    };
    coordinator_says(&cluster, &id, prepare).await;
    coordinator_says(&cluster, &id, ControlBody::Checkpoint).await;
    wait_for(&cluster, "checkpoint", |b| {
        matches!(b, ControlBody::CheckpointTaken { .. })
    })
    .await;
    let history = read_history(&*cluster.control, "balances").await.unwrap();
    let snapshot_id = history.iter().find_map(|m| match m.body {
        ControlBody::CheckpointTaken { snapshot_id, .. } => Some(snapshot_id),
        _ => None,
    });
    coordinator_says(&cluster, &id, ControlBody::Restore { snapshot_id }).await;
    wait_for(&cluster, "restored", |b| matches!(b, ControlBody::Restored { .. })).await;
    let stop_cmd = ControlBody::Stop { next_epoch: 1 };
    let aborted = ControlBody::Aborted {
        reason: "coordinator restarted before the target took over".into(),
    };
    match case {
        LateStop::AbortedThenStop => {
            coordinator_says(&cluster, &id, aborted).await;
            coordinator_says(&cluster, &id, stop_cmd).await;
        }
        LateStop::StopThenAborted => {
            coordinator_says(&cluster, &id, stop_cmd).await;
            coordinator_says(&cluster, &id, aborted).await;
        }
        LateStop::AbortedRacesTakeover | LateStop::ResumeRacesTakeover => {
            coordinator_says(&cluster, &id, stop_cmd).await;
            wait_for(&cluster, "stopped", |b| matches!(b, ControlBody::Stopped { .. })).await;
            if matches!(case, LateStop::ResumeRacesTakeover) {
                let resume = ControlBody::Resume {
                    owner: "src".into(),
                    epoch: 2,
                };
                coordinator_says(&cluster, &id, resume).await;
            }
            coordinator_says(&cluster, &id, aborted).await;
        }
    }
    // The target either goes live or stands down; either way it ends.
    let target = tokio::time::timeout(Duration::from_secs(20), target)
        .await
        .expect("the target decides")
        .unwrap();
    let history = read_history(&*cluster.control, "balances").await.unwrap();
    let outcome = migration_outcome(&history, &id);
    let owner = protocol::Decisions::from_history(&history)
        .owner()
        .cloned()
        .map(|o| o.instance_id);
    if matches!(case, LateStop::AbortedThenStop) {
        assert_eq!(outcome, Some(MigrationOutcome::RolledBack));
        assert!(
            !cluster.has(|m| matches!(m.body, ControlBody::Stopped { .. })),
            "a Stop after the rollback must not stop the source"
        );
    }
    producer.await.unwrap();
    let final_state = match target {
        Ok(mut live) => {
            assert_eq!(outcome, Some(MigrationOutcome::TakenOver), "{case:?}");
            assert_eq!(owner.as_deref(), Some("tgt"), "{case:?}");
            let exit = tokio::time::timeout(Duration::from_secs(20), source).await;
            assert!(
                matches!(exit, Ok(Ok(Ok(SourceExit::Released(_))))),
                "{case:?}: the source must be released"
            );
            drain(&mut live, &cluster.log).await;
            live.state().clone()
        }
        Err(e) => {
            assert_eq!(outcome, Some(MigrationOutcome::RolledBack), "{case:?}: {e:?}");
            assert_ne!(owner.as_deref(), Some("tgt"), "{case:?}");
            await_all_committed(&cluster, &format!("{case:?}: the source keeps serving")).await;
            stop.send(()).unwrap();
            let Ok(SourceExit::Shutdown(src)) = source.await.unwrap() else {
                panic!("{case:?}: the source should still own the service")
            };
            src.state().clone()
        }
    };
    check(&cluster, &final_state);
}

#[test]
fn the_first_decisive_record_wins() {
    let say = |from, body| message("svc", "m1", from, body);
    let takeover = say(
        crate::Role::Target,
        ControlBody::Takeover {
            owner: "tgt".into(),
            epoch: 2,
            position: Position::default(),
        },
    );
    let resume = say(
        crate::Role::Coordinator,
        ControlBody::Resume {
            owner: "src".into(),
            epoch: 3,
        },
    );
    let aborted = say(crate::Role::Coordinator, ControlBody::Aborted { reason: "x".into() });
    let stop = say(crate::Role::Coordinator, ControlBody::Stop { next_epoch: 2 });
    let earlier = ControlMessage {
        migration_id: "m0".into(),
        ..say(
            crate::Role::Target,
            ControlBody::Takeover {
                owner: "src".into(),
                epoch: 1,
                position: Position::default(),
            },
        )
    };
    let h = |ms: &[&ControlMessage]| ms.iter().map(|m| (*m).clone()).collect::<Vec<_>>();
    let owner = |ms: &[&ControlMessage]| {
        protocol::Decisions::from_history(h(ms).iter())
            .owner()
            .cloned()
            .map(|o| (o.instance_id, o.epoch))
    };

    assert_eq!(migration_outcome(&h(&[&stop]), "m1"), None);
    let taken = [&earlier, &stop, &takeover, &resume, &aborted];
    assert_eq!(migration_outcome(&h(&taken), "m1"), Some(MigrationOutcome::TakenOver));
    assert_eq!(owner(&taken), Some(("tgt".into(), 2)), "a late Resume is ignored");
    let rolled = [&earlier, &stop, &resume, &aborted, &takeover];
    assert_eq!(migration_outcome(&h(&rolled), "m1"), Some(MigrationOutcome::RolledBack));
    assert_eq!(owner(&rolled), Some(("src".into(), 3)));
    let aborted_only = [&earlier, &aborted, &stop, &takeover];
    assert_eq!(
        migration_outcome(&h(&aborted_only), "m1"),
        Some(MigrationOutcome::RolledBack)
    );
    assert_eq!(owner(&aborted_only), Some(("src".into(), 1)), "the owner is unchanged");
}

/// Fault-suite seed 325 (in-memory soak): stop-and-copy with the snapshot
/// store down at the checkpoint. The stopped source abandoned the migration
/// and resumed serving on its own; the coordinator's `Resume` then made it
/// re-claim its sink, which aborted the outputs it had not committed yet,
/// while its position stayed past them: outputs lost. Now a stopped source
/// waits for the rollback, and only a stopped source re-claims.
///
/// `Resume` lands once new input is waiting, so a source that (wrongly)
/// served while stopped has uncommitted outputs to lose; the check is on
/// outputs, not on timing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn regression_seed_325_a_failed_stop_and_copy_checkpoint_loses_no_output() {
    let cluster = Cluster::new();
    cluster.produce_now(200);
    // Commits only when idle: uncommitted outputs pile up while it serves.
    let config = self::config("src").commit_every(100_000, Duration::from_secs(3600));
    let source = spawn_owner(&cluster, config).await;
    let id = "m-325";
    let prepare = ControlBody::Prepare {
        source: "src".into(),
        target: "tgt".into(),
        digest_policy: DigestPolicy::Abort,
        strategy: None,
    };
    coordinator_says(&cluster, id, prepare).await;
    coordinator_says(&cluster, id, ControlBody::Stop { next_epoch: 1 }).await;
    wait_for(&cluster, "stopped", |b| matches!(b, ControlBody::Stopped { .. })).await;
    cluster.store.set_unavailable(true);
    coordinator_says(&cluster, id, ControlBody::Checkpoint).await;
    wait_for(&cluster, "failed checkpoint", |b| {
        matches!(b, ControlBody::CutoverFailed { .. })
    })
    .await;
    cluster.store.set_unavailable(false);
    // Steady input keeps a serving source busy (never idle, so it commits
    // nothing) when the `Resume` lands.
    let producer = cluster.produce_steady(3_000, Duration::from_millis(2));
    tokio::time::timeout(Duration::from_secs(20), async {
        while cluster.log.end_position().total() < 250 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    })
    .await
    .expect("new input waits while the source is stopped");
    let resume = ControlBody::Resume {
        owner: "src".into(),
        epoch: 2,
    };
    coordinator_says(&cluster, id, resume).await;
    let aborted = ControlBody::Aborted {
        reason: "checkpoint failed".into(),
    };
    coordinator_says(&cluster, id, aborted).await;
    producer.await.unwrap();
    await_all_committed(&cluster, "the resumed source commits all input").await;
    stop_owner_and_check(&cluster, source).await;
}

/// A coordinator restarted in the middle of a cold start (or a stop-and-copy
/// before its checkpoint) must hand ownership back to the real source. The
/// baselines used to name the source only in a `Prepare` sent after the stop
/// (cold start: never), so the restarted coordinator published
/// `Resume { owner: "" }`: `current_owner` then named nobody real and the
/// stopped source never resumed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn regression_a_coordinator_restarted_mid_cold_start_resumes_the_real_source() {
    let cluster = Cluster::new();
    cluster.produce_now(200);
    let source = spawn_owner(&cluster, config("src")).await;
    // No target runs: the coordinator waits for its restore until it dies.
    let config = MigrationConfig {
        phase_timeout: Duration::from_millis(300),
        ..fast()
    };
    let coordinator = Coordinator::new(cluster.control.clone(), config.clone());
    let dying = tokio::spawn(async move { coordinator.migrate(&plan(Strategy::ColdStart), &*no_progress()).await });
    wait_for(&cluster, "the cold start's restore command", |b| {
        matches!(b, ControlBody::Restore { .. })
    })
    .await;
    dying.abort();
    let recovered = Coordinator::new(cluster.control.clone(), config)
        .recover("balances", "m-ColdStart")
        .await
        .unwrap();
    assert_eq!(recovered, Recovered::RolledBack);
    let owner = current_owner(&*cluster.control, "balances").await.unwrap();
    assert_eq!(
        owner.map(|o| o.instance_id).as_deref(),
        Some("src"),
        "the source owns the service again"
    );
    ensure_owner(&*cluster.control, "balances", "src").await.unwrap();
    cluster.produce_now(100);
    await_all_committed(&cluster, "the resumed source serves the new input").await;
    stop_owner_and_check(&cluster, source).await;
}

/// Found by the model checker (`model.rs`): a source restarted while a
/// migration had it stopped served input before it read that `Stop` back
/// from the channel's history, then stopped again further on and published
/// a second `Stopped` with a later Pf. A target taking over at the first Pf
/// re-emitted every output in between. A restarted source now catches up
/// with the history before it applies anything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn regression_model_a_source_restarted_while_stopped_stays_at_its_pf() {
    let cluster = Cluster::new();
    cluster.produce_now(200);
    let first = spawn_owner(&cluster, config("src")).await;
    await_committed(&cluster, 200).await;
    let id = "m-restart";
    let prepare = ControlBody::Prepare {
        source: "src".into(),
        target: "tgt".into(),
        digest_policy: DigestPolicy::Abort,
        strategy: None,
    };
    coordinator_says(&cluster, id, prepare).await;
    coordinator_says(&cluster, id, ControlBody::Stop { next_epoch: 1 }).await;
    wait_for(&cluster, "stopped", |b| matches!(b, ControlBody::Stopped { .. })).await;
    first.abort();
    let stopped_at = |cluster: &Cluster| -> Vec<Position> {
        cluster
            .control
            .history()
            .into_iter()
            .filter_map(|m| match m.body {
                ControlBody::Stopped { position, .. } => Some(position),
                _ => None,
            })
            .collect()
    };
    let pf = stopped_at(&cluster)[0].clone();
    // New input waits; the source restarts with the migration undecided,
    // and its control consumer lags: it must act on the history it read.
    cluster.produce_now(300);
    cluster.control.hold_readers(true);
    // `SourceAgent::new` returns only once it caught up with the history:
    // by then it has said again where it stopped, and served nothing.
    let second = spawn_owner(&cluster, config("src")).await;
    assert_eq!(
        stopped_at(&cluster),
        vec![pf.clone(), pf.clone()],
        "the restarted source must state its stop once more, at the same Pf"
    );
    assert_eq!(
        cluster.outputs.committed_position(),
        Some(pf),
        "served past Pf while stopped"
    );
    cluster.control.hold_readers(false);
    // Rolled back: the source serves everything, exactly once.
    let resume = ControlBody::Resume {
        owner: "src".into(),
        epoch: 2,
    };
    coordinator_says(&cluster, id, resume).await;
    await_committed(&cluster, 500).await;
    stop_owner_and_check(&cluster, second).await;
}

/// A log that records the calls made to it.
struct RecordingLog<L> {
    inner: L,
    calls: Arc<std::sync::Mutex<Vec<String>>>,
}

#[async_trait]
impl<L: crate::MessageLog> crate::MessageLog for RecordingLog<L> {
    type Error = L::Error;

    async fn partitions(&mut self) -> Result<Vec<crate::TopicPartition>, Self::Error> {
        self.inner.partitions().await
    }

    async fn seek(&mut self, position: &crate::Position) -> Result<(), Self::Error> {
        self.calls.lock().unwrap().push(format!("seek {position}"));
        self.inner.seek(position).await
    }

    async fn poll(&mut self, max: usize, timeout: Duration) -> Result<Vec<crate::Record>, Self::Error> {
        self.calls.lock().unwrap().push("poll".into());
        self.inner.poll(max, timeout).await
    }

    async fn watermarks(&mut self, tp: &crate::TopicPartition) -> Result<crate::Watermarks, Self::Error> {
        self.inner.watermarks(tp).await
    }
}

/// The cluster's snapshot store with test hooks: `listed` is notified
/// after each listing; with `hold_last_byte`, a streamed fetch hands out a
/// snapshot up to its last byte and waits for that notify before the last
/// byte, so a restore from it cannot finish before the test says so.
#[derive(Default)]
struct HookedStore {
    inner: MemorySnapshotStore,
    listed: Option<Arc<tokio::sync::Notify>>,
    hold_last_byte: Option<Arc<tokio::sync::Notify>>,
}

#[async_trait]
impl crate::SnapshotStore for HookedStore {
    type Error = MemoryError;

    async fn put(&self, snapshot: &crate::snapshot::EncodedSnapshot) -> Result<crate::SnapshotId, MemoryError> {
        self.inner.put(snapshot).await
    }

    async fn list(&self) -> Result<Vec<crate::SnapshotId>, MemoryError> {
        let ids = self.inner.list().await?;
        if let Some(listed) = &self.listed {
            listed.notify_one();
        }
        Ok(ids)
    }

    async fn get(&self, id: crate::SnapshotId) -> Result<bytes::Bytes, MemoryError> {
        self.inner.get(id).await
    }

    async fn delete(&self, id: crate::SnapshotId) -> Result<(), MemoryError> {
        self.inner.delete(id).await
    }

    async fn get_streamed(
        &self,
        id: crate::SnapshotId,
    ) -> Result<crate::streamed::SnapshotPieces<MemoryError>, MemoryError> {
        let mut bytes = self.get(id).await?;
        let Some(release) = self.hold_last_byte.clone() else {
            return Ok(crate::streamed::SnapshotPieces::whole(bytes));
        };
        let last = bytes.split_off(bytes.len() - 1);
        let (tx, pieces) = crate::streamed::SnapshotPieces::channel(2);
        tokio::spawn(async move {
            let _ = tx.send(Ok(bytes)).await;
            release.notified().await;
            let _ = tx.send(Ok(last)).await;
        });
        Ok(pieces)
    }
}

/// The target seeks its log to the checkpoint's position while it restores
/// (so a Kafka log fetches the input's tail during the transfer), and the
/// restored instance seeks there again with nothing polled in between
/// (which a Kafka log turns into keeping what it fetched).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_target_seeks_its_log_to_the_checkpoint_while_it_restores() {
    let cluster = Cluster::new();
    cluster.produce_now(300);
    let mut source: Inst<Balances> = Instance::recover(cluster.backends(), config("src"), &*no_progress())
        .await
        .unwrap();
    while source.position().total() < 300 {
        source.step().await.unwrap();
    }
    let checkpoint = source.checkpoint().await.unwrap();
    cluster.produce_now(100);

    let calls: Arc<std::sync::Mutex<Vec<String>>> = Arc::default();
    let release = Arc::new(tokio::sync::Notify::new());
    let plain = cluster.backends();
    let mut backends = crate::Backends {
        log: RecordingLog {
            inner: plain.log,
            calls: Arc::clone(&calls),
        },
        store: Arc::new(HookedStore {
            inner: cluster.store.clone(),
            hold_last_byte: Some(Arc::clone(&release)),
            ..HookedStore::default()
        }),
        sink: plain.sink,
    };
    let seek_at_checkpoint = format!("seek {}", checkpoint.position);
    let target_config = config("tgt");
    let restore =
        target::fetch_and_restore::<Balances, _, _, _>(&mut backends, &target_config, "balances", checkpoint.id, true);
    let released_once_seeked = async {
        tokio::time::timeout(Duration::from_secs(20), async {
            while calls.lock().unwrap().is_empty() {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        })
        .await
        .expect("the log is seeked before the snapshot's last byte arrives");
        release.notify_one();
    };
    let (restored, ()) = tokio::join!(restore, released_once_seeked);
    let (loaded, _, _) = restored.unwrap();
    assert_eq!(*calls.lock().unwrap(), std::slice::from_ref(&seek_at_checkpoint));

    let mut target = Instance::<Balances, _, _, _>::restore(backends, target_config, Some(loaded))
        .await
        .unwrap();
    assert_eq!(
        *calls.lock().unwrap(),
        [seek_at_checkpoint.clone(), seek_at_checkpoint],
        "the instance seeks to the same position, with no poll in between"
    );
    while target.position().total() < 400 {
        target.step().await.unwrap();
    }
    assert_eq!(target.state(), &reference_fold(&cluster.produced()).0);
}

/// A warm target restores at start (here: the empty state, the service
/// takes no snapshots) and follows the owner's committed position; a move
/// from the standby keeps that state. The store is down from right after
/// the target's start, so a checkpoint, a fetch or a fallback restore would
/// fail the move, and the position the target reports on `Restored` shows
/// it followed the owner before the move.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_warm_target_follows_the_owner_and_moves_with_the_snapshot_store_down() {
    let cluster = Cluster::new();
    cluster.produce_now(2_000);
    let (_stop, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let no_snapshots = |id| config(id).snapshot_every(None);
    let source = spawn_source::<Balances>(&cluster, no_snapshots("src"), stop_rx).await;
    let listed = Arc::new(tokio::sync::Notify::new());
    let store = HookedStore {
        inner: cluster.store.clone(),
        listed: Some(listed.clone()),
        ..HookedStore::default()
    };
    let backends = crate::Backends {
        log: cluster.log.reader(),
        store: Arc::new(store),
        sink: cluster.outputs.sink(),
    };
    let (control, followed) = (cluster.control.clone(), Arc::new(AtomicU64::new(0)));
    let applied = followed.clone();
    let target = tokio::spawn(async move {
        let options = TargetOptions {
            phase_timeout: Duration::from_secs(3),
            warm: true,
            ..TargetOptions::default()
        };
        let progress = move |p: &crate::Progress| {
            if p.phase == ProgressPhase::Standby {
                applied.store(p.applied, Ordering::Relaxed);
            }
        };
        run_target::<Balances, _, _, _, _>(backends, no_snapshots("tgt"), control, options, &progress).await
    });
    tokio::time::timeout(Duration::from_secs(20), listed.notified())
        .await
        .expect("the warm target looks for a snapshot at start");
    cluster.store.set_unavailable(true);
    cluster.produce_now(1_000);
    await_committed(&cluster, 3_000).await;
    tokio::time::timeout(Duration::from_secs(20), async {
        while followed.load(Ordering::Relaxed) < 3_000 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("the warm target follows the owner to its committed position");
    let producer = cluster.produce_steady(1_000, Duration::from_millis(2));
    let coordinator = Coordinator::new(cluster.control.clone(), fast());
    let report = coordinator
        .migrate(&plan(Strategy::Ms2mFromStandby), &*no_progress())
        .await
        .expect("a move from the warm standby without the snapshot store");
    let restored_at = cluster.control.history().into_iter().find_map(|m| match m.body {
        ControlBody::Restored { position, .. } => Some(position.total()),
        _ => None,
    });
    assert!(restored_at >= Some(3_000), "kept the followed state: {restored_at:?}");
    assert_eq!(
        (report.snapshot_bytes, report.transfer_ms),
        (0, 0.0),
        "nothing transferred"
    );
    assert!(report.digest_match);
    assert_eq!(cluster.checkpoint_records(), 0, "no checkpoint asked for or taken");
    assert!(matches!(source.await.unwrap().unwrap(), SourceExit::Released(_)));
    let mut live = target.await.unwrap().unwrap();
    producer.await.unwrap();
    cluster.store.set_unavailable(false);
    drain(&mut live, &cluster.log).await;
    check(&cluster, live.state());
}
