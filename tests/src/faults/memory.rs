//! Scenarios on ms2m-core's in-memory backends: the whole protocol with a
//! faithful exactly-once sink, crashes injected at exact protocol steps
//! through `MemoryControl`'s fault hook.

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use ms2m_core::codec::{CodecError, Json};
use ms2m_core::memory::PublishFault;
use ms2m_core::memory::{MemoryLog, MemoryLogReader, MemorySink, MemorySnapshotStore};
use ms2m_core::migration::{
    current_owner, ensure_owner, run_target, Coordinator, CutoverRule, DigestPolicy, MigrationConfig, MigrationError,
    MigrationPlan, Recovered, SourceAgent, SourceExit, SourceOptions, TargetOptions,
};
use ms2m_core::store::load_newest_valid;
use ms2m_core::testkit::{output_exactly_once, reference_fold, Balances, Deposit};
use ms2m_core::{
    no_progress, ApplyContext, BadMessagePolicy, ControlBody, ControlMessage, Error, ErrorKind, Instance,
    InstanceConfig, Role, ServiceState, Snapshot, SnapshotStore, StateDigest, StateError, StatefulService,
    TopicPartition,
};

use super::{judge_migration, wait_until, Fault, Kind, Outcome, Phase, Scenario, Strategy, Trigger};

use ms2m_core::testkit::{MemoryCluster, INPUT_PARTITIONS as PARTITIONS, INPUT_TOPIC as TOPIC};

const OUT: &str = "balances.out";
const DLQ: &str = "balances.dlq";
const SERVICE: &str = "balances";
const LIMIT: Duration = Duration::from_secs(20);

type Inst<S> = Instance<S, MemoryLogReader, MemorySnapshotStore, MemorySink>;

/// A service whose final state can be compared with the reference fold.
pub trait Folds: StatefulService {
    fn balances(&self) -> &Balances;
}

impl Folds for Balances {
    fn balances(&self) -> &Balances {
        self
    }
}

/// Set while a divergence scenario's target replays.
static DRIFT: AtomicBool = AtomicBool::new(false);
/// Serializes the scenarios that use [`DRIFT`] (a process-wide switch).
static DRIFT_LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Balances whose `apply` is not deterministic in replay while [`DRIFT`] is
/// set: the divergence the digest check must catch.
#[derive(Default)]
pub struct Drifting(Balances);

impl ServiceState for Drifting {
    const SCHEMA_VERSION: u32 = 1;
    fn snapshot(&self) -> Result<Vec<u8>, CodecError> {
        self.0.snapshot()
    }
    fn restore(v: u32, b: &[u8]) -> Result<Self, StateError> {
        Balances::restore(v, b).map(Drifting)
    }
    fn digest(&self) -> StateDigest {
        self.0.digest()
    }
}

#[async_trait]
impl StatefulService for Drifting {
    const NAME: &'static str = SERVICE;
    type Message = Deposit;
    type Format = Json;
    type Error = Infallible;
    async fn apply(&mut self, m: Deposit, ctx: &mut ApplyContext<'_>) -> Result<(), Infallible> {
        let drift = ctx.is_replaying() && DRIFT.load(Ordering::SeqCst);
        self.0.apply(m, ctx).await?;
        if drift {
            self.0.applied += 1;
        }
        Ok(())
    }
}

impl Folds for Drifting {
    fn balances(&self) -> &Balances {
        &self.0
    }
}

type Mem = MemoryCluster;

/// Final state equals the reference fold of `input` (all of it unless
/// `expected` says otherwise); every output exactly once.
fn check(m: &Mem, state: &Balances, expected: Option<&[(i32, i64, Deposit)]>, o: &mut Outcome) {
    let all = m.produced();
    let input = expected.unwrap_or(&all);
    let (fold, _) = reference_fold(input);
    let (missing, duplicated) = output_exactly_once(input, &m.balance_outputs(OUT));
    o.lost += missing as u64;
    o.duplicated_exactly_once += duplicated as u64;
    assert_eq!(state, &fold, "final state differs from the reference fold");
    assert_eq!((missing, duplicated), (0, 0), "outputs lost or duplicated");
}

fn config(id: &str, sc: &Scenario) -> InstanceConfig {
    InstanceConfig::new(id)
        .snapshot_every(Some(sc.snapshot_every))
        .snapshot_interval(None)
        .keep_snapshots(3)
        .commit_every(sc.commit_every, Duration::from_millis(5))
        .poll(64, Duration::from_millis(5))
        .output_topic(OUT)
}

async fn drain<S: StatefulService>(instance: &mut Inst<S>, log: &MemoryLog) {
    let end = log.end_position();
    tokio::time::timeout(LIMIT, async {
        while !instance.position().reaches(&end) {
            instance.step().await.expect("step while draining");
        }
    })
    .await
    .expect("instance drains the log");
    instance.shutdown().await.expect("graceful shutdown");
}

async fn recover<S: StatefulService>(m: &Mem, config: InstanceConfig) -> ms2m_core::Result<Inst<S>> {
    Instance::recover(m.backends(), config, &*no_progress()).await
}

async fn step_to<S: StatefulService>(instance: &mut Inst<S>, total: i64) {
    tokio::time::timeout(LIMIT, async {
        while instance.position().total() < total {
            instance.step().await.expect("step");
        }
    })
    .await
    .expect("instance reaches the crash point");
}

/// Runs one in-memory scenario and checks the invariants.
pub async fn run_memory(sc: Scenario) -> Outcome {
    match sc.kind {
        Kind::Recovery => recovery(&sc).await,
        Kind::Snapshot => snapshot_damage(&sc).await,
        Kind::BadInput => bad_input(&sc).await,
        Kind::TailDeleted => tail_deleted(&sc).await,
        Kind::Migration(strategy) => {
            if sc.fault == Fault::Divergence {
                let _guard = DRIFT_LOCK.lock().await;
                let o = migration::<Drifting>(&sc, strategy).await;
                DRIFT.store(false, Ordering::SeqCst);
                o
            } else {
                migration::<Balances>(&sc, strategy).await
            }
        }
    }
}

/// Run, crash in a phase, recover, finish.
async fn recovery(sc: &Scenario) -> Outcome {
    let mut o = Outcome {
        injected: true,
        ..Outcome::default()
    };
    let m = Mem::new();
    m.produce_now(sc.initial);
    let mut a: Inst<Balances> = recover(&m, config("a", sc)).await.unwrap();
    let crash_at = (sc.initial as f64 * sc.at) as i64;
    step_to(&mut a, crash_at).await;
    let producer = m.produce_steady(sc.during, Duration::from_millis(2));
    match sc.phase {
        Phase::Checkpoint => {
            // The snapshot upload fails (store down), then the owner crashes.
            m.store.set_unavailable(true);
            let before = a.stats().snapshot_failures;
            a.checkpoint().await.expect_err("the store is down");
            // The checkpoint's upload failed (and any upload still in flight).
            assert!(a.stats().snapshot_failures > before);
            o.typed_errors += 1;
            drop(a.into_parts());
            m.store.set_unavailable(false);
        }
        Phase::Restore | Phase::Replay => {
            drop(a.into_parts());
            // The next instance crashes while restoring / replaying (it is
            // built like `recover` does, and dropped before it is live).
            let (loaded, _) = load_newest_valid::<Balances, _>(&m.store, SERVICE).await.unwrap();
            let mut b = Instance::<Balances, _, _, _>::restore(m.backends(), config("b", sc), loaded)
                .await
                .unwrap();
            let committed_before = m.outputs.committed().len();
            if sc.phase == Phase::Replay {
                for _ in 0..3 {
                    b.step().await.unwrap();
                }
            }
            assert!(!b.is_live());
            drop(b.into_parts());
            assert_eq!(m.outputs.committed().len(), committed_before, "a standby emitted");
        }
        _ => drop(a.into_parts()),
    }
    producer.await.unwrap();
    let mut c: Inst<Balances> = recover(&m, config("c", sc)).await.unwrap();
    drain(&mut c, &m.log).await;
    check(&m, c.state(), None, &mut o);
    o
}

/// The newest snapshot is damaged (or of an unknown schema): recovery
/// rejects it with a typed reason and falls back to an older one.
async fn snapshot_damage(sc: &Scenario) -> Outcome {
    let mut o = Outcome {
        injected: true,
        ..Outcome::default()
    };
    let m = Mem::new();
    m.produce_now(sc.initial);
    let every = sc.snapshot_every.min(sc.initial / 3).max(1);
    let cfg = config("a", sc).snapshot_every(Some(every));
    let mut a: Inst<Balances> = recover(&m, cfg).await.unwrap();
    drain(&mut a, &m.log).await;
    let ids = m.store.list().await.unwrap();
    assert!(ids.len() >= 2, "at least two snapshots: {ids:?}");
    let newest = *ids.last().unwrap();
    match sc.fault {
        Fault::CorruptSnapshot => m.store.tamper(newest, |b| {
            let mut v = b.to_vec();
            let i = v.len() / 2 + (sc.seed as usize % (v.len() / 2));
            v[i] ^= 0x5a;
            Bytes::from(v)
        }),
        Fault::TruncatedSnapshot => m.store.tamper(newest, |b| b.slice(..b.len() / 2)),
        Fault::MissingSnapshot => m.store.delete(newest).await.unwrap(),
        Fault::UnknownSchema => {
            let state = Bytes::from(a.state().snapshot().unwrap());
            let snap = Snapshot::seal(SERVICE, 99, a.position().clone(), "future", state);
            m.store.put(&snap.encode().unwrap()).await.unwrap();
        }
        f => unreachable!("{f:?}"),
    }
    m.produce_now(sc.during);
    let (loaded, rejected) = load_newest_valid::<Balances, _>(&m.store, SERVICE).await.unwrap();
    assert!(loaded.is_some(), "an older snapshot verifies");
    o.snapshots_rejected += rejected.len() as u64;
    match sc.fault {
        Fault::MissingSnapshot => assert!(rejected.is_empty()),
        Fault::UnknownSchema => {
            assert_eq!(rejected.len(), 1);
            assert!(
                matches!(
                    rejected[0].reason,
                    Error::State(StateError::UnknownSchemaVersion { found: 99, .. })
                ),
                "{:?}",
                rejected[0].reason
            );
            o.typed_errors += 1;
        }
        _ => {
            assert_eq!(rejected.len(), 1);
            assert!(
                matches!(rejected[0].reason, Error::Snapshot(_)),
                "{:?}",
                rejected[0].reason
            );
            o.typed_errors += 1;
        }
    }
    let mut b: Inst<Balances> = recover(&m, config("b", sc)).await.unwrap();
    drain(&mut b, &m.log).await;
    check(&m, b.state(), None, &mut o);
    o
}

/// An undecodable message: `Fail` stops with `Error::Decode` without moving
/// the position; `DeadLetter` puts it on the DLQ with the reason in headers.
async fn bad_input(sc: &Scenario) -> Outcome {
    let mut o = Outcome {
        injected: true,
        ..Outcome::default()
    };
    let m = Mem::new();
    m.produce_now(sc.initial / 2);
    let bad_p = (sc.seed % PARTITIONS as u64) as i32;
    let bad_offset = m.log.append(TOPIC, bad_p, Some(b"bad"), &b"{not json"[..]);
    let bad_tp = TopicPartition::new(TOPIC, bad_p);
    m.produce_now(sc.initial - sc.initial / 2);
    let dead_letter = BadMessagePolicy::DeadLetter { topic: DLQ.into() };
    let expect_decode = |e: &Error| match e {
        Error::Decode { tp, offset, .. } => {
            assert_eq!((tp, *offset), (&bad_tp, bad_offset), "{e}");
        }
        other => panic!("expected Error::Decode, got {other:?}"),
    };
    match (sc.fault, sc.phase) {
        (Fault::BadInputFail, Phase::Live) => {
            let mut a: Inst<Balances> = recover(&m, config("a", sc).bad_messages(BadMessagePolicy::Fail))
                .await
                .unwrap();
            let err = tokio::time::timeout(LIMIT, async {
                loop {
                    if let Err(e) = a.step().await {
                        return e;
                    }
                }
            })
            .await
            .expect("the bad message is reached");
            expect_decode(&err);
            assert_eq!(a.position().get(&bad_tp), Some(bad_offset), "position moved past");
            // Retrying fails the same way: the position does not move.
            let again = a.step().await.expect_err("still failing");
            expect_decode(&again);
            assert_eq!(a.position().get(&bad_tp), Some(bad_offset));
            o.typed_errors += 2;
            a.shutdown().await.unwrap();
        }
        (Fault::BadInputFail, _) => {
            // Dead-lettered live, then a restart with `Fail` replays it.
            let mut a: Inst<Balances> = recover(&m, config("a", sc).bad_messages(dead_letter.clone()))
                .await
                .unwrap();
            let end = m.log.end_position();
            step_to(&mut a, end.total()).await;
            a.commit().await.unwrap();
            drop(a.into_parts());
            match recover::<Balances>(&m, config("b", sc).bad_messages(BadMessagePolicy::Fail)).await {
                Err(e) => {
                    expect_decode(&e);
                    o.typed_errors += 1;
                }
                Ok(b) => {
                    // A snapshot past the bad message: nothing to replay.
                    drop(b.into_parts());
                    o.notes
                        .push("fail policy: snapshot already past the bad message".into());
                }
            }
        }
        (Fault::BadInputDeadLetter, phase) => {
            let mut a: Inst<Balances> = recover(&m, config("a", sc).bad_messages(dead_letter.clone()))
                .await
                .unwrap();
            let crash = if phase == Phase::Replay {
                m.log.end_position().total()
            } else {
                (sc.initial as f64 * sc.at) as i64
            };
            step_to(&mut a, crash).await;
            if phase == Phase::Replay {
                a.commit().await.unwrap();
            }
            drop(a.into_parts());
        }
        f => unreachable!("{f:?}"),
    }
    m.produce_now(sc.during);
    let mut c: Inst<Balances> = recover(&m, config("c", sc).bad_messages(dead_letter)).await.unwrap();
    drain(&mut c, &m.log).await;
    let dlq: Vec<_> = m.outputs.committed().into_iter().filter(|r| &*r.topic == DLQ).collect();
    assert_eq!(dlq.len(), 1, "the bad message is dead-lettered exactly once");
    let header = |k: &str| {
        dlq[0]
            .headers
            .iter()
            .find(|(n, _)| n == k)
            .map(|(_, v)| String::from_utf8_lossy(v).to_string())
            .unwrap_or_else(|| panic!("header {k} missing"))
    };
    assert_eq!(header("ms2m.stage"), "decode");
    assert_eq!(header("ms2m.source.offset"), bad_offset.to_string());
    assert_eq!(header("ms2m.source.partition"), bad_p.to_string());
    assert!(!header("ms2m.error").is_empty());
    assert_eq!(&dlq[0].payload[..], b"{not json");
    o.dead_lettered += 1;
    check(&m, c.state(), None, &mut o);
    o
}

/// Retention deleted messages the snapshot needs: `Error::LogTruncated`,
/// unless gaps are allowed (then exactly the deleted messages are missing).
async fn tail_deleted(sc: &Scenario) -> Outcome {
    let mut o = Outcome {
        injected: true,
        ..Outcome::default()
    };
    let m = Mem::new();
    m.produce_now(sc.initial);
    let mut a: Inst<Balances> = recover(&m, config("a", sc).snapshot_every(None)).await.unwrap();
    step_to(&mut a, (sc.initial as f64 * sc.at * 0.5) as i64).await;
    let info = a.checkpoint().await.unwrap();
    step_to(&mut a, (sc.initial as f64 * (0.5 + sc.at * 0.5)) as i64).await;
    drop(a.into_parts());
    let tp = TopicPartition::new(TOPIC, 0);
    let needed = info.position.get(&tp).unwrap();
    let deleted_to = needed + 1 + (sc.seed as i64 % 5);
    m.log.truncate_before(&tp, deleted_to);
    let err = recover::<Balances>(&m, config("b", sc))
        .await
        .expect_err("recovery must refuse a gap");
    match err {
        Error::LogTruncated {
            tp: t,
            needed: n,
            earliest,
            missing,
        } => {
            assert_eq!(
                (t, n, earliest, missing),
                (tp.clone(), needed, deleted_to, deleted_to - needed)
            );
        }
        other => panic!("expected Error::LogTruncated, got {other:?}"),
    }
    o.typed_errors += 1;
    // Opting in to the gap: exactly the deleted messages are missing.
    let mut c: Inst<Balances> = recover(&m, config("c", sc).allow_log_gap(true)).await.unwrap();
    drain(&mut c, &m.log).await;
    let all = m.produced();
    let kept: Vec<_> = all
        .iter()
        .filter(|(p, off, _)| !(*p == 0 && *off >= needed && *off < deleted_to))
        .cloned()
        .collect();
    let (fold, _) = reference_fold(&kept);
    assert_eq!(c.state(), &fold, "state is the fold of what the log still holds");
    let (_, dup) = output_exactly_once(&kept, &m.balance_outputs(OUT));
    assert_eq!(dup, 0);
    o
}

/// Who publishes a trigger message, what it is, and what the hook does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Act {
    /// Let it through; the test acts once it is published.
    Observe,
    /// The publisher hangs there (and its task is then aborted).
    Hang,
    /// As `Hang`, but the message lands later anyway (it was in flight).
    Late,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Victim {
    Source,
    Target,
    Coordinator,
    /// A side effect in the hook (store down, snapshot damaged).
    None,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Msg {
    Prepare,
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
        let (role, ok) = match (&m.body, self) {
            (ControlBody::Prepare { .. }, Msg::Prepare) => (Role::Coordinator, true),
            (ControlBody::CheckpointTaken { .. }, Msg::CheckpointTaken) => (Role::Source, true),
            (ControlBody::Restore { .. }, Msg::Restore) => (Role::Coordinator, true),
            (ControlBody::Restored { .. }, Msg::Restored) => (Role::Target, true),
            (ControlBody::TargetProgress { .. }, Msg::TargetProgress) => (Role::Target, true),
            (ControlBody::Stop { .. }, Msg::Stop) => (Role::Coordinator, true),
            (ControlBody::Stopped { .. }, Msg::Stopped) => (Role::Source, true),
            (ControlBody::Takeover { .. }, Msg::Takeover) => (Role::Target, true),
            (ControlBody::Live { .. }, Msg::Live) => (Role::Target, true),
            (ControlBody::Release, Msg::Release) => (Role::Coordinator, true),
            _ => (Role::Coordinator, false),
        };
        ok && m.from == role
    }
}

/// The injection point of a migration fault before the target is live.
fn injection(sc: &Scenario) -> Option<(Msg, Act, Victim)> {
    use Msg::*;
    let p = sc.phase;
    Some(match sc.fault {
        Fault::CrashSource => match p {
            Phase::Checkpoint => (CheckpointTaken, Act::Hang, Victim::Source),
            Phase::Transfer => (Restore, Act::Observe, Victim::Source),
            Phase::Restore => (Restored, Act::Observe, Victim::Source),
            Phase::Replay => (TargetProgress, Act::Observe, Victim::Source),
            Phase::Cutover => (Stopped, Act::Hang, Victim::Source),
            Phase::Live => return None,
        },
        Fault::CrashTarget => match p {
            Phase::Checkpoint => (CheckpointTaken, Act::Observe, Victim::Target),
            Phase::Transfer => (Restore, Act::Observe, Victim::Target),
            Phase::Restore => (Restored, Act::Hang, Victim::Target),
            Phase::Replay => (TargetProgress, Act::Hang, Victim::Target),
            // Before its takeover (rolled back) or after it (the owner).
            Phase::Cutover if sc.variant => (Takeover, Act::Hang, Victim::Target),
            Phase::Cutover => (Live, Act::Hang, Victim::Target),
            Phase::Live => return None,
        },
        Fault::CrashCoordinator => match p {
            Phase::Checkpoint => (Prepare, Act::Hang, Victim::Coordinator),
            Phase::Transfer => (Restore, Act::Hang, Victim::Coordinator),
            Phase::Restore => (Restored, Act::Observe, Victim::Coordinator),
            Phase::Replay => (TargetProgress, Act::Observe, Victim::Coordinator),
            // The coordinator dies with its Stop in flight (mock seed 62):
            // the Stop may land after the successor's rollback.
            Phase::Cutover if sc.variant && sc.at < 0.5 => (Stop, Act::Late, Victim::Coordinator),
            Phase::Cutover if sc.variant => (Stop, Act::Hang, Victim::Coordinator),
            Phase::Cutover => (Stopped, Act::Observe, Victim::Coordinator),
            Phase::Live => (Release, Act::Hang, Victim::Coordinator),
        },
        Fault::StoreUnavailable => match p {
            Phase::Checkpoint => (Prepare, Act::Observe, Victim::None),
            _ => (Restore, Act::Observe, Victim::None),
        },
        Fault::CorruptSnapshot | Fault::TruncatedSnapshot | Fault::MissingSnapshot => {
            (CheckpointTaken, Act::Observe, Victim::None)
        }
        _ => return None,
    })
}

type SourceTask<S> = tokio::task::JoinHandle<ms2m_core::Result<SourceExit<Inst<S>>>>;
type TargetTask<S> = tokio::task::JoinHandle<ms2m_core::Result<Inst<S>>>;

const PHASE_TIMEOUT: Duration = Duration::from_millis(800);

/// A migration with a fault at a phase, then the invariants.
async fn migration<S: Folds>(sc: &Scenario, strategy: Strategy) -> Outcome {
    let mut o = Outcome::default();
    let m = Mem::new();
    m.produce_now(sc.initial);
    let migration_id = format!("m-{}", sc.seed);
    let plan = MigrationPlan {
        service: SERVICE,
        migration_id: migration_id.clone(),
        source: "src".into(),
        target: "tgt".into(),
        strategy,
    };

    // The hook: fire the trigger at the injection point, hang or damage there.
    let trigger = Trigger::default();
    let point = injection(sc);
    if let Some((msg, act, _)) = point {
        let (t, store, fault) = (trigger.clone(), m.store.clone(), sc.fault);
        let seed = sc.seed;
        m.control.set_fault(move |cm| {
            if t.fired() || !msg.matches(cm) {
                return PublishFault::Pass;
            }
            t.fire();
            match fault {
                Fault::StoreUnavailable => store.set_unavailable(true),
                Fault::CorruptSnapshot | Fault::TruncatedSnapshot | Fault::MissingSnapshot => {
                    if let ControlBody::CheckpointTaken { snapshot_id, .. } = &cm.body {
                        let id = *snapshot_id;
                        match fault {
                            Fault::CorruptSnapshot => store.tamper(id, |b| {
                                let mut v = b.to_vec();
                                let i = v.len() - 1 - (seed as usize % (v.len() / 2));
                                v[i] ^= 0x77;
                                Bytes::from(v)
                            }),
                            Fault::TruncatedSnapshot => store.tamper(id, |b| b.slice(..b.len() * 2 / 3)),
                            _ => {
                                let store = store.clone();
                                // The hook is synchronous; the memory store's delete is instant.
                                futures_lite_block_on(async move { store.delete(id).await.unwrap() });
                            }
                        }
                    }
                }
                _ => {}
            }
            match act {
                Act::Observe => PublishFault::Pass,
                Act::Hang => PublishFault::Hang,
                Act::Late => PublishFault::Late(Duration::from_millis(seed % 30)),
            }
        });
    }

    // Source (the owner) and a standby target.
    let source: Inst<S> = recover(&m, config("src", sc)).await.unwrap();
    let agent = SourceAgent::new(source, m.control.clone(), SourceOptions::default())
        .await
        .unwrap();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let source_task: SourceTask<S> = tokio::spawn(agent.run(async move {
        let _ = stop_rx.await;
    }));
    let target_task: TargetTask<S> = {
        let (backends, control, cfg) = (m.backends(), m.control.clone(), config("tgt", sc));
        tokio::spawn(async move {
            let options = TargetOptions {
                phase_timeout: PHASE_TIMEOUT,
                ..TargetOptions::default()
            };
            run_target::<S, _, _, _, _>(backends, cfg, control, options, &*no_progress()).await
        })
    };
    if sc.fault == Fault::Divergence {
        DRIFT.store(true, Ordering::SeqCst);
        o.injected = true;
    }
    let producer = m.produce_steady(sc.during, Duration::from_millis(2));
    let mconfig = MigrationConfig {
        cutover: CutoverRule {
            max_lag: Some(20),
            max_catch_up: Some(Duration::from_millis(20)),
            replay_max: Duration::from_millis(300),
        },
        digest_policy: DigestPolicy::Abort,
        phase_timeout: PHASE_TIMEOUT,
    };
    let coordinator = Arc::new(Coordinator::new(m.control.clone(), mconfig.clone()));
    let mig = {
        let (c, p) = (coordinator.clone(), plan.clone());
        tokio::spawn(async move { c.migrate(&p, &*no_progress()).await })
    };

    // Wait for the injection point (or the end of the migration), then crash the victim.
    let mut source_task = Some(source_task);
    let mut target_task = Some(target_task);
    let mut mig = Some(mig);
    let mut recovered: Option<Recovered> = None;
    if let Some((_, _, victim)) = point {
        let fired = wait_until(LIMIT, || {
            trigger.fired() || mig.as_ref().is_some_and(|t| t.is_finished())
        })
        .await;
        assert!(
            fired,
            "neither the injection point nor the end of the migration was reached"
        );
        o.injected = trigger.fired();
        if trigger.fired() {
            match victim {
                Victim::Source => source_task.take().unwrap().abort(),
                Victim::Target => target_task.take().unwrap().abort(),
                Victim::Coordinator => mig.take().unwrap().abort(),
                Victim::None => {}
            }
        }
        m.control.set_fault(|_| PublishFault::Pass);
    }
    let result = match mig.take() {
        Some(task) => Some(
            tokio::time::timeout(LIMIT, task)
                .await
                .expect("the coordinator finishes")
                .expect("coordinator task"),
        ),
        None => {
            // A new coordinator finishes or rolls back from the control history.
            let fresh = Coordinator::new(m.control.clone(), mconfig);
            recovered = Some(
                fresh
                    .recover(SERVICE, &migration_id)
                    .await
                    .expect("coordinator recovery"),
            );
            None
        }
    };
    m.store.set_unavailable(false);
    if sc.fault == Fault::Divergence {
        DRIFT.store(false, Ordering::SeqCst);
    }
    // The control channel's order decides (first writer wins); every
    // party's own view must agree with it.
    let history = m.control.history();
    let completed = judge_migration(&history, &migration_id, result.as_ref(), recovered, &mut o);
    if sc.fault == Fault::Divergence && completed {
        // Undetected only if the target really replayed in drift mode; the
        // final state check below tells.
        o.notes
            .push("divergence scenario completed (no drifted replay reached cutover?)".into());
    }
    producer.await.unwrap();

    let owner = current_owner(&*m.control, SERVICE)
        .await
        .unwrap()
        .map(|o| o.instance_id);
    let final_state: Balances;
    if completed {
        assert_eq!(owner.as_deref(), Some("tgt"), "a completed migration names the target");
        let mut live = match target_task.take() {
            Some(target) => {
                let live = tokio::time::timeout(LIMIT, target)
                    .await
                    .expect("target returns")
                    .unwrap()
                    .expect("the target went live");
                assert!(live.is_live());
                live
            }
            None => {
                // The target was crashed (observed trigger) but had already
                // gone live: the owner is restarted with its id.
                o.notes
                    .push("crashed target had already gone live: restarted as owner".into());
                ensure_owner(&*m.control, SERVICE, "tgt").await.unwrap();
                recover(&m, config("tgt", sc)).await.unwrap()
            }
        };
        // The released source.
        let released = match source_task.take() {
            Some(t) => match tokio::time::timeout(LIMIT, t).await.expect("source returns").unwrap() {
                Ok(SourceExit::Released(i)) => Some(i),
                Ok(SourceExit::Shutdown(_)) => panic!("the source was not released"),
                Err(e) => panic!("the source failed: {e:?}"),
            },
            None => None,
        };
        match (sc.fault, sc.phase) {
            (Fault::ZombieSource, Phase::Live) => {
                let mut zombie = released.expect("released source");
                o.injected = true;
                m.produce_now(30);
                let err = async {
                    for _ in 0..500 {
                        zombie.step().await?;
                    }
                    zombie.commit().await
                }
                .await
                .expect_err("the zombie's commit must be fenced");
                assert_eq!(err.backend_kind(), Some(ErrorKind::Fenced), "{err:?}");
                o.typed_errors += 1;
            }
            (Fault::CrashSource, Phase::Live) => {
                drop(released);
                o.injected = true;
            }
            (Fault::CrashTarget, Phase::Live) => {
                // The new owner crashes while live; a fresh instance with its id recovers.
                o.injected = true;
                m.produce_now(20);
                for _ in 0..(1 + sc.seed % 5) {
                    live.step().await.unwrap();
                }
                drop(live.into_parts());
                ensure_owner(&*m.control, SERVICE, "tgt").await.unwrap();
                live = recover(&m, config("tgt", sc)).await.unwrap();
            }
            _ => {}
        }
        // A restarted source refuses to run.
        let err = ensure_owner(&*m.control, SERVICE, "src")
            .await
            .expect_err("the old owner must be refused");
        assert!(matches!(err, Error::Fenced { .. }));
        drain(&mut live, &m.log).await;
        final_state = live.state().balances().clone();
    } else {
        assert_ne!(
            owner.as_deref(),
            Some("tgt"),
            "a rolled-back migration leaves the source owner"
        );
        if let Some(t) = target_task.take() {
            let prepared = m.has(|cm| {
                cm.migration_id == migration_id
                    && matches!(&cm.body, ControlBody::Prepare { target, .. } if target == "tgt")
            });
            if prepared {
                let r = tokio::time::timeout(LIMIT, t).await.expect("target gives up").unwrap();
                let e = r.expect_err("an aborted target must not go live");
                o.typed_errors += 1;
                if matches!(e, Error::Migration(MigrationError::DigestMismatch { .. })) {
                    assert!(sc.fault == Fault::Divergence, "unexpected divergence: {e}");
                }
            } else {
                // Never named in a Prepare: still a standby, never live.
                assert!(!t.is_finished() || t.await.unwrap().is_err());
            }
        }
        let alive = match source_task.take() {
            Some(t) if !t.is_finished() => Some(t),
            Some(t) => {
                let r = t.await.unwrap();
                let e = r.expect_err("the source ended without being released or shut down");
                // The source died of the injected fault: a typed error.
                o.notes.push(format!(
                    "source died of {:?} at {:?} ({})",
                    sc.fault,
                    sc.phase,
                    short(&e)
                ));
                None
            }
            None => None,
        };
        let state = match alive {
            Some(t) => {
                let end = m.log.end_position();
                let caught_up = wait_until(LIMIT, || {
                    m.outputs.committed_position().is_some_and(|p| p.reaches(&end))
                })
                .await;
                assert!(caught_up, "the (resumed) source commits all input");
                stop_tx.send(()).unwrap();
                match tokio::time::timeout(LIMIT, t).await.expect("source stops").unwrap() {
                    Ok(SourceExit::Shutdown(i)) => i.state().balances().clone(),
                    other => panic!("source should still own the service: {other:?}"),
                }
            }
            None => {
                // The source crashed: restart it (it is still the owner).
                ensure_owner(&*m.control, SERVICE, "src").await.unwrap();
                let mut again: Inst<S> = recover(&m, config("src", sc)).await.unwrap();
                drain(&mut again, &m.log).await;
                again.state().balances().clone()
            }
        };
        if owner.is_some() {
            let err = ensure_owner(&*m.control, SERVICE, "tgt")
                .await
                .expect_err("target refused");
            assert!(matches!(err, Error::Fenced { .. }));
        }
        final_state = state;
    }
    if sc.fault == Fault::Divergence && completed {
        let all = m.produced();
        if final_state != reference_fold(&all).0 {
            o.divergences_undetected += 1;
        }
    }
    check(&m, &final_state, None, &mut o);
    o
}

fn short(e: &Error) -> String {
    match e {
        Error::Backend {
            component,
            operation,
            kind,
            ..
        } => format!("{component:?} {operation}: {kind:?}"),
        Error::Snapshot(_) => "snapshot error".into(),
        Error::Migration(m) => format!("migration: {m}"),
        other => other.to_string(),
    }
}

/// Runs a future that completes without waiting (the memory store) to
/// completion on the current thread.
fn futures_lite_block_on<F: std::future::Future<Output = ()>>(f: F) {
    let waker = std::task::Waker::noop();
    let mut cx = std::task::Context::from_waker(waker);
    let mut f = std::pin::pin!(f);
    match f.as_mut().poll(&mut cx) {
        std::task::Poll::Ready(()) => {}
        std::task::Poll::Pending => panic!("the in-memory store does not wait"),
    }
}
