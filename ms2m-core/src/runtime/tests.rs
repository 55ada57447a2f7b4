//! Protocol tests of the runtime over the in-memory backends.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use proptest::prelude::*;

use super::*;
use crate::memory::*;
use crate::testkit::*;

type TestInstance = Instance<Balances, MemoryLogReader, MemorySnapshotStore, MemorySink>;

struct World {
    log: MemoryLog,
    store: MemorySnapshotStore,
    outputs: MemoryOutputs,
    input: Vec<(i32, i64, Deposit)>,
    /// Sinks commit in the background ([`OutputSink::commit_in_background`]).
    background_commits: bool,
}

impl World {
    fn new(partitions: i32) -> Self {
        Self {
            log: MemoryLog::new("deposits", partitions),
            store: MemorySnapshotStore::new(),
            outputs: MemoryOutputs::new(),
            input: Vec::new(),
            background_commits: false,
        }
    }

    fn produce(&mut self, n: u64, partitions: i32) {
        for _ in 0..n {
            let i = self.input.len() as u64;
            let p = (i % partitions as u64) as i32;
            let o = self.log.append("deposits", p, None, deposit_payload(i));
            self.input.push((p, o, deposit(i)));
        }
    }

    fn backends(&self) -> Backends<MemoryLogReader, MemorySnapshotStore, MemorySink> {
        Backends {
            log: self.log.reader(),
            store: Arc::new(self.store.clone()),
            sink: if self.background_commits {
                self.outputs.sink_committing_in_background()
            } else {
                self.outputs.sink()
            },
        }
    }

    fn committed_outputs(&self) -> Vec<BalanceChanged> {
        self.outputs
            .committed()
            .iter()
            .map(|o| serde_json::from_slice(&o.payload).unwrap())
            .collect()
    }

    async fn recover(&self, config: InstanceConfig) -> Result<TestInstance> {
        Instance::recover(self.backends(), config, &*no_progress()).await
    }
}

fn config(snapshot_every: u64) -> InstanceConfig {
    InstanceConfig::new("i-1")
        .snapshot_every(Some(snapshot_every))
        .snapshot_interval(None)
        .commit_every(7, Duration::from_secs(3600))
        .poll(16, Duration::from_millis(1))
        .output_topic("balances.out")
}

/// Steps until the instance's position covers the whole log.
async fn drain(instance: &mut TestInstance, log: &MemoryLog) -> Result<()> {
    let end = log.end_position();
    while !instance.position().reaches(&end) {
        instance.step().await?;
    }
    Ok(())
}

async fn run_until(instance: &mut TestInstance, applied: i64) -> Result<()> {
    while instance.position().total() < applied {
        instance.step().await?;
    }
    Ok(())
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// State after (snapshot + tail replay) equals the reference fold, and
    /// every output is committed exactly once, for random inputs, snapshot
    /// cadences and crash points (including two crashes in a row).
    #[test]
    fn crash_and_recover_equals_reference_fold(
        n in 1u64..300,
        partitions in 1i32..4,
        snapshot_every in 1u64..60,
        crash_a in 0.0f64..1.0,
        crash_b in 0.0f64..1.0,
        background_commits in any::<bool>(),
    ) {
        rt().block_on(async {
            let mut world = World::new(partitions);
            world.background_commits = background_commits;
            world.produce(n, partitions);
            let mut crash_points = [(crash_a * n as f64) as i64, (crash_b * n as f64) as i64];
            crash_points.sort();
            for crash_at in crash_points {
                let mut instance = world.recover(config(snapshot_every)).await.unwrap();
                run_until(&mut instance, crash_at).await.unwrap();
                // Crash: no commit, no final snapshot, pending outputs lost.
                drop(instance.into_parts());
            }
            let mut instance = world.recover(config(snapshot_every)).await.unwrap();
            drain(&mut instance, &world.log).await.unwrap();
            instance.shutdown().await.unwrap();

            let (expected, _) = reference_fold(&world.input);
            prop_assert_eq!(instance.state(), &expected);
            let (missing, duplicated) = output_exactly_once(&world.input, &world.committed_outputs());
            prop_assert_eq!((missing, duplicated), (0, 0));
            prop_assert_eq!(world.committed_outputs().len() as u64, n);
            Ok(())
        })?;
    }
}

#[tokio::test]
async fn replay_below_the_watermark_suppresses_outputs() {
    let mut world = World::new(1);
    world.produce(40, 1);
    let mut a = world.recover(config(10)).await.unwrap();
    drain(&mut a, &world.log).await.unwrap();
    a.commit().await.unwrap();
    // Crash after committing 40 but with the newest snapshot at 40 or below.
    drop(a.into_parts());
    world.produce(10, 1);
    let b = world.recover(config(1000)).await.unwrap();
    assert_eq!(b.stats().applied_live, 0, "recovery only replays below the watermark");
    assert_eq!(b.stats().outputs_emitted, 0);
    assert_eq!(b.position().total(), 40);
}

#[tokio::test]
async fn corrupt_newest_snapshot_falls_back_to_the_previous_one() {
    let mut world = World::new(2);
    world.produce(100, 2);
    let mut a = world.recover(config(30)).await.unwrap();
    drain(&mut a, &world.log).await.unwrap();
    a.shutdown().await.unwrap();
    let ids = world.store.list().await.unwrap();
    assert!(ids.len() >= 2, "need two snapshots, have {ids:?}");
    let newest = *ids.last().unwrap();
    world.store.tamper(newest, |b| {
        let mut v = b.to_vec();
        let i = v.len() - 1;
        v[i] ^= 0xff;
        Bytes::from(v)
    });
    world.produce(20, 2);
    let (loaded, rejected) = crate::store::load_newest_valid::<Balances, _>(&world.store, "balances")
        .await
        .unwrap();
    assert_eq!(rejected.len(), 1);
    assert!(matches!(
        rejected[0].reason,
        Error::Snapshot(crate::SnapshotError::StateChecksum { .. })
    ));
    assert!(loaded.unwrap().id < newest);
    let mut b = world.recover(config(30)).await.unwrap();
    drain(&mut b, &world.log).await.unwrap();
    b.shutdown().await.unwrap();
    assert_eq!(b.state(), &reference_fold(&world.input).0);
    let (missing, duplicated) = output_exactly_once(&world.input, &world.committed_outputs());
    assert_eq!((missing, duplicated), (0, 0));
}

#[tokio::test]
async fn truncated_snapshot_and_wrong_service_are_skipped() {
    let mut world = World::new(1);
    world.produce(50, 1);
    let mut a = world.recover(config(20)).await.unwrap();
    drain(&mut a, &world.log).await.unwrap();
    a.shutdown().await.unwrap();
    let ids = world.store.list().await.unwrap();
    world.store.tamper(*ids.last().unwrap(), |b| b.slice(..b.len() / 2));
    let foreign = crate::Snapshot::seal("other-service", 1, Position::new(), "x", Bytes::from_static(b"{}"));
    world.store.put(&foreign.encode().unwrap()).await.unwrap();
    let (loaded, rejected) = crate::store::load_newest_valid::<Balances, _>(&world.store, "balances")
        .await
        .unwrap();
    assert_eq!(rejected.len(), 2);
    assert!(matches!(
        rejected[0].reason,
        Error::Snapshot(crate::SnapshotError::WrongService { .. })
    ));
    assert!(matches!(
        rejected[1].reason,
        Error::Snapshot(crate::SnapshotError::Truncated { .. })
    ));
    assert!(loaded.is_some());
}

#[tokio::test]
async fn unknown_schema_version_is_a_typed_error_and_skipped() {
    let world = World::new(1);
    let newer = crate::Snapshot::seal("balances", 9, Position::new(), "x", Bytes::new());
    world.store.put(&newer.encode().unwrap()).await.unwrap();
    let (loaded, rejected) = crate::store::load_newest_valid::<Balances, _>(&world.store, "balances")
        .await
        .unwrap();
    assert!(loaded.is_none());
    assert!(matches!(
        rejected[0].reason,
        Error::State(crate::StateError::UnknownSchemaVersion { found: 9, .. })
    ));
}

#[tokio::test]
async fn unreachable_store_fails_recovery_instead_of_falling_back() {
    let mut world = World::new(1);
    world.produce(10, 1);
    world.store.set_unavailable(true);
    let err = world.recover(config(5)).await.unwrap_err();
    assert_eq!(err.backend_kind(), Some(ErrorKind::Unavailable), "{err:?}");
}

#[tokio::test]
async fn deleted_log_tail_is_a_typed_error_unless_allowed() {
    let mut world = World::new(1);
    world.produce(30, 1);
    let mut a = world.recover(config(10)).await.unwrap();
    run_until(&mut a, 5).await.unwrap();
    let info = a.checkpoint().await.unwrap();
    drop(a.into_parts());
    let tp = TopicPartition::new("deposits", 0);
    let at = info.position.get(&tp).unwrap();
    assert!(at < 20);
    world.log.truncate_before(&tp, 20);
    let err = world.recover(config(10)).await.unwrap_err();
    match err {
        Error::LogTruncated {
            needed,
            earliest,
            missing,
            ..
        } => {
            assert_eq!((needed, earliest, missing), (at, 20, 20 - at));
        }
        other => panic!("expected LogTruncated, got {other:?}"),
    }
    let b = world.recover(config(10).allow_log_gap(true)).await.unwrap();
    assert!(b.position().get(&tp).unwrap() >= 20);
}

#[tokio::test]
async fn undecodable_message_fails_without_moving_the_position() {
    let mut world = World::new(1);
    world.produce(5, 1);
    world.log.append("deposits", 0, None, &b"not json"[..]);
    let mut a = world.recover(config(100)).await.unwrap();
    let err = loop {
        match a.step().await {
            Ok(_) => continue,
            Err(e) => break e,
        }
    };
    assert!(matches!(err, Error::Decode { offset: 5, .. }), "{err:?}");
    assert_eq!(a.position().total(), 5, "the bad message is not skipped");
    // Stepping again meets the same message again: it is never silently dropped.
    let again = a.step().await.unwrap_err();
    assert!(matches!(again, Error::Decode { offset: 5, .. }), "{again:?}");
    assert_eq!(a.position().total(), 5);
}

#[tokio::test]
async fn undecodable_message_goes_to_the_dead_letter_topic() {
    let mut world = World::new(1);
    world.produce(3, 1);
    world.log.append("deposits", 0, Some(b"k"), &b"not json"[..]);
    world.produce(3, 1);
    let policy = BadMessagePolicy::DeadLetter {
        topic: "deposits.dlq".into(),
    };
    let mut a = world.recover(config(100).bad_messages(policy.clone())).await.unwrap();
    drain(&mut a, &world.log).await.unwrap();
    a.shutdown().await.unwrap();
    let committed = world.outputs.committed();
    let dead: Vec<_> = committed.iter().filter(|o| &*o.topic == "deposits.dlq").collect();
    assert_eq!(dead.len(), 1);
    assert_eq!(&dead[0].payload[..], b"not json");
    let header = |k: &str| dead[0].headers.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
    assert_eq!(header("ms2m.source.offset").as_deref(), Some(&b"3"[..]));
    assert_eq!(header("ms2m.stage").as_deref(), Some(&b"decode"[..]));
    assert!(header("ms2m.error").is_some());
    assert_eq!(committed.len(), 7, "6 outputs and 1 dead letter");
    // Replaying the bad message after a restart does not dead-letter it twice.
    let b = world.recover(config(100).bad_messages(policy)).await.unwrap();
    drop(b);
    assert_eq!(world.outputs.committed().len(), 7);
}

/// A bad message longer than the dead-letter limit is cut, marked, and
/// still points at the whole record in the input: the dead letter never
/// fails for its size (Kafka's `message.max.bytes`).
#[tokio::test]
async fn an_oversized_bad_message_is_dead_lettered_cut_with_its_coordinates() {
    let mut world = World::new(1);
    world.produce(2, 1);
    let garbage = vec![b'x'; 100];
    world.log.append("deposits", 0, None, garbage.clone());
    world.produce(2, 1);
    let policy = BadMessagePolicy::DeadLetter {
        topic: "deposits.dlq".into(),
    };
    let config = config(100).bad_messages(policy).dead_letter_max_bytes(16);
    let mut a = world.recover(config).await.unwrap();
    drain(&mut a, &world.log).await.unwrap();
    a.shutdown().await.unwrap();
    let committed = world.outputs.committed();
    let dead: Vec<_> = committed.iter().filter(|o| &*o.topic == "deposits.dlq").collect();
    assert_eq!(dead.len(), 1);
    assert_eq!(&dead[0].payload[..], &garbage[..16]);
    let header = |k: &str| dead[0].headers.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
    assert_eq!(header("ms2m.truncated").as_deref(), Some(&b"true"[..]));
    assert_eq!(header("ms2m.original.bytes").as_deref(), Some(&b"100"[..]));
    assert_eq!(header("ms2m.source.offset").as_deref(), Some(&b"2"[..]));
    assert_eq!(committed.len(), 5, "4 outputs and 1 dead letter");
}

#[tokio::test]
async fn graceful_shutdown_leaves_nothing_to_replay() {
    let mut world = World::new(2);
    world.produce(64, 2);
    let mut a = world.recover(config(1000)).await.unwrap();
    drain(&mut a, &world.log).await.unwrap();
    a.shutdown().await.unwrap();
    assert_eq!(a.stats().snapshots, 1, "final snapshot");
    let b = world.recover(config(1000)).await.unwrap();
    assert_eq!(b.stats().applied_replay, 0);
    assert_eq!(b.position(), &world.log.end_position());
}

#[tokio::test]
async fn run_stops_on_shutdown_signal() {
    let mut world = World::new(1);
    world.produce(20, 1);
    let mut a = world.recover(config(1000)).await.unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let end = world.log.end_position();
    let task = tokio::spawn(async move {
        a.run(async {
            let _ = rx.await;
        })
        .await
        .map(|()| a)
    });
    // Wait (bounded) until everything committed, then signal shutdown.
    let outputs = world.outputs.clone();
    tokio::time::timeout(Duration::from_secs(10), async {
        while !outputs.committed_position().is_some_and(|p| p.reaches(&end)) {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    })
    .await
    .expect("instance commits its input");
    tx.send(()).unwrap();
    let a = task.await.unwrap().unwrap();
    assert_eq!(a.state(), &reference_fold(&world.input).0);
}

#[tokio::test]
async fn recovery_reports_progress() {
    let mut world = World::new(1);
    world.produce(500, 1);
    let mut a = world.recover(config(100_000)).await.unwrap();
    drain(&mut a, &world.log).await.unwrap();
    a.commit().await.unwrap();
    drop(a.into_parts());
    let seen = Arc::new(Mutex::new(Vec::new()));
    let sink = seen.clone();
    let listener = move |p: &Progress| sink.lock().unwrap().push(p.clone());
    let cfg = config(100_000).progress_interval(Duration::ZERO);
    let b: TestInstance = Instance::recover(world.backends(), cfg, &listener).await.unwrap();
    assert_eq!(b.stats().applied_replay, 500);
    let seen = seen.lock().unwrap();
    assert!(seen.len() >= 2, "got {} reports", seen.len());
    assert!(seen.iter().all(|p| p.phase == ProgressPhase::Recovery));
    assert_eq!(seen.last().unwrap().remaining, 0);
    assert!(seen.first().unwrap().remaining > 0);
}

#[tokio::test]
async fn a_fenced_sink_stops_the_old_owner() {
    let mut world = World::new(1);
    world.produce(10, 1);
    let mut old = world.recover(config(1000)).await.unwrap();
    run_until(&mut old, 5).await.unwrap();
    let _new = world.recover(config(1000)).await.unwrap();
    world.produce(5, 1);
    let err = drain(&mut old, &world.log).await.and(old.commit().await).unwrap_err();
    assert_eq!(err.backend_kind(), Some(ErrorKind::Fenced), "{err:?}");
}

/// `drain`, failing instead of hanging if it waits more than a (paused,
/// so auto-advanced) second: only a wait for a held commit can last that long.
async fn drain_without_waiting(instance: &mut TestInstance, log: &MemoryLog) {
    tokio::time::timeout(Duration::from_secs(1), drain(instance, log))
        .await
        .expect("the loop waited for the held commit")
        .unwrap();
}

/// An instance over background-committing sinks whose first commit (of 10
/// messages) is running, held by the "broker".
async fn with_a_held_commit() -> (World, TestInstance) {
    let mut world = World::new(1);
    world.background_commits = true;
    let mut instance = world.recover(config(1000)).await.unwrap();
    world.outputs.hold_background_commits(true);
    world.produce(10, 1);
    // 10 applied: a commit is due (every 7) and starts.
    drain_without_waiting(&mut instance, &world.log).await;
    assert_eq!(instance.position().total(), 10);
    assert_eq!(world.outputs.committed_position(), None);
    (world, instance)
}

/// Releases the held commit: `commit` waits for it, then commits the rest;
/// `outputs` in all, in two commits.
async fn release_and_commit(world: &World, instance: &mut TestInstance, outputs: usize) {
    world.outputs.hold_background_commits(false);
    instance.commit().await.unwrap();
    assert_eq!(world.outputs.committed_position(), Some(world.log.end_position()));
    assert_eq!(world.committed_outputs().len(), outputs);
    assert_eq!(instance.stats().commits, 2);
}

#[tokio::test(start_paused = true)]
async fn a_background_commit_lets_the_loop_go_on_and_commit_waits_for_it() {
    let (mut world, mut instance) = with_a_held_commit().await;
    // The loop goes on while it is held (fewer than 7 more: no commit due).
    world.produce(3, 1);
    drain_without_waiting(&mut instance, &world.log).await;
    assert_eq!(instance.position().total(), 13);
    assert!(world.committed_outputs().is_empty());
    assert_eq!(instance.stats().commits, 0);
    release_and_commit(&world, &mut instance, 13).await;
}

#[tokio::test(start_paused = true)]
async fn a_running_commit_is_waited_for_once_the_next_is_due() {
    let (mut world, mut instance) = with_a_held_commit().await;
    // 10 more: the next commit is due while the first is held, so the loop
    // waits (at most two commits' worth uncommitted).
    world.produce(10, 1);
    let waited = tokio::time::timeout(Duration::from_secs(1), drain(&mut instance, &world.log)).await;
    assert!(waited.is_err(), "the loop went on with two commits' worth uncommitted");
    // The cancelled wait let go of nothing: the held commit is still there.
    release_and_commit(&world, &mut instance, 20).await;
}

#[tokio::test]
async fn a_failed_background_commit_fails_the_instance() {
    let mut world = World::new(1);
    world.background_commits = true;
    let mut old = world.recover(config(1000)).await.unwrap();
    world.outputs.hold_background_commits(true);
    world.produce(10, 1);
    drain(&mut old, &world.log).await.unwrap();
    // A newer owner claims while the old owner's commit is held: it fails.
    let _new = world.recover(config(1000)).await.unwrap();
    world.outputs.hold_background_commits(false);
    let err = old.commit().await.unwrap_err();
    assert_eq!(err.backend_kind(), Some(ErrorKind::Fenced), "{err:?}");
    assert!(world.committed_outputs().is_empty());
}

/// [`Balances`] whose snapshots freeze and encode only once [`FREEZE_GATE`]
/// opens, so a test can hold an upload mid-encode.
#[derive(Clone, Debug, Default, PartialEq)]
struct FrozenBalances(Balances);

static FREEZE_GATE: std::sync::LazyLock<(std::sync::Mutex<bool>, std::sync::Condvar)> =
    std::sync::LazyLock::new(Default::default);

fn set_freeze_gate(open: bool) {
    *FREEZE_GATE.0.lock().unwrap() = open;
    FREEZE_GATE.1.notify_all();
}

impl crate::ServiceState for FrozenBalances {
    const SCHEMA_VERSION: u32 = 1;

    fn snapshot(&self) -> std::result::Result<Vec<u8>, crate::codec::CodecError> {
        let open = FREEZE_GATE.0.lock().unwrap();
        drop(FREEZE_GATE.1.wait_while(open, |open| !*open).unwrap());
        crate::ServiceState::snapshot(&self.0)
    }

    fn restore(schema_version: u32, bytes: &[u8]) -> std::result::Result<Self, crate::StateError> {
        <Balances as crate::ServiceState>::restore(schema_version, bytes).map(Self)
    }

    fn digest(&self) -> StateDigest {
        crate::ServiceState::digest(&self.0)
    }

    fn freeze(&self) -> Option<crate::Frozen> {
        Some(crate::Frozen::new(self.clone()))
    }
}

#[async_trait::async_trait]
impl StatefulService for FrozenBalances {
    const NAME: &'static str = Balances::NAME;
    type Message = Deposit;
    type Format = crate::codec::Json;
    type Error = std::convert::Infallible;

    async fn apply(&mut self, m: Deposit, ctx: &mut ApplyContext<'_>) -> std::result::Result<(), Self::Error> {
        self.0.apply(m, ctx).await
    }
}

/// With a frozen state the apply loop goes on while the snapshot encodes,
/// and the snapshot holds the state as it was at the freeze.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_snapshot_encodes_off_the_apply_loop() {
    let mut world = World::new(2);
    world.produce(100, 2);
    let mut instance: Instance<FrozenBalances, _, _, _> =
        Instance::recover(world.backends(), config(1_000_000), &*no_progress())
            .await
            .unwrap();
    while instance.position().total() < 100 {
        instance.step().await.unwrap();
    }
    set_freeze_gate(false);
    instance.start_checkpoint().await.unwrap();
    let frozen_at = instance.position().clone();

    // The encoding is held at the gate; the instance keeps applying.
    world.produce(50, 2);
    while instance.position().total() < 150 {
        instance.step().await.unwrap();
    }
    assert!(
        instance.poll_checkpoint().await.is_none(),
        "the upload waits at the gate"
    );

    set_freeze_gate(true);
    let info = instance.wait_checkpoint().await.unwrap().unwrap();
    assert_eq!(info.position, frozen_at);
    let stored = Snapshot::decode(world.store.get(info.id).await.unwrap()).unwrap();
    let restored = <Balances as crate::ServiceState>::restore(1, &stored.state).unwrap();
    assert_eq!(restored, reference_fold(&world.input[..100]).0);
    assert_eq!(instance.state().0, reference_fold(&world.input).0);
}

/// The input below `limit` (per partition, exclusive), as `reference_fold` takes it.
fn input_below(world: &World, limit: &Position) -> Vec<(i32, i64, Deposit)> {
    world
        .input
        .iter()
        .filter(|(p, o, _)| *o < limit.get(&TopicPartition::new("deposits", *p)).unwrap_or(0))
        .cloned()
        .collect()
}

fn position_of(offsets: &[(i32, i64)]) -> Position {
    offsets
        .iter()
        .map(|(p, o)| (TopicPartition::new("deposits", *p), *o))
        .collect()
}

#[tokio::test]
async fn a_standby_stops_exactly_at_its_ceiling_on_every_partition() {
    let mut world = World::new(3);
    world.produce(90, 3);
    let mut standby = TestInstance::restore(world.backends(), config(1000), None)
        .await
        .unwrap();
    // Polls of 16 deliver runs of one partition after another; the ceilings
    // fall inside runs, at a run's start (0) and beyond the log's end.
    let ceiling = position_of(&[(0, 5), (1, 0), (2, 100)]);
    standby.set_ceiling(Some(ceiling.clone()));
    for _ in 0..20 {
        standby.step().await.unwrap();
    }
    assert_eq!(standby.position(), &position_of(&[(0, 5), (1, 0), (2, 30)]));
    assert_eq!(standby.state(), &reference_fold(&input_below(&world, &ceiling)).0);
    // Lifting the ceiling applies the held records in order, nothing twice.
    standby.set_ceiling(None);
    drain(&mut standby, &world.log).await.unwrap();
    assert_eq!(standby.state(), &reference_fold(&world.input).0);
    assert_eq!(standby.stats().duplicates_skipped, 0);
}

#[tokio::test]
async fn replay_to_stops_exactly_at_the_target() {
    let mut world = World::new(2);
    world.produce(60, 2);
    let mut standby = TestInstance::restore(world.backends(), config(1000), None)
        .await
        .unwrap();
    let target = position_of(&[(0, 17), (1, 3)]);
    let applied = standby
        .replay_to(&target, ProgressPhase::Cutover, &*no_progress())
        .await
        .unwrap();
    assert_eq!(applied, 20);
    assert_eq!(standby.position(), &target);
    assert_eq!(standby.state(), &reference_fold(&input_below(&world, &target)).0);
}

/// Health: a plain instance is live while it steps and ready once it
/// serves and an empty poll showed it caught up; a standby is never ready
/// by itself, and a role's `set_ready` decides over the rule.
#[tokio::test]
async fn an_instance_is_ready_once_live_and_caught_up_and_a_standby_is_not() {
    let mut world = World::new(2);
    world.produce(20, 2);
    let mut owner = world.recover(config(100)).await.unwrap();
    let health = owner.health();
    assert!(health.is_live() && !health.is_ready(), "{:?}", health.report());
    drain(&mut owner, &world.log).await.unwrap();
    owner.step().await.unwrap();
    assert!(health.is_ready(), "{:?}", health.report());
    assert_eq!(health.lag(), Some(0));

    let mut standby = TestInstance::restore(world.backends(), config(100), None)
        .await
        .unwrap();
    drain(&mut standby, &world.log).await.unwrap();
    standby.step().await.unwrap();
    assert!(standby.health().is_live() && !standby.health().is_ready());
    standby.health().set_ready(true);
    assert!(standby.health().is_ready(), "a node decides for its warm standby");
}

/// More pending than one poll's batch (as a recovery's replay can leave)
/// is applied a batch per step, with housekeeping in between, so the
/// at-least-once duplicate window stays `commit_every + batch - 1`.
#[test]
fn pending_beyond_one_batch_is_applied_a_batch_per_step() {
    rt().block_on(async {
        let mut world = World::new(1);
        world.produce(40, 1);
        let mut instance = world.recover(config(1_000)).await.unwrap();
        let leftover = instance.log.poll(40, Duration::from_millis(1)).await.unwrap();
        assert_eq!(leftover.len(), 40);
        instance.pending.extend(leftover);
        assert_eq!(instance.step().await.unwrap(), 16, "one batch (16) per step");
        assert_eq!(world.committed_outputs().len(), 16, "and its commit before the next");
        assert_eq!(instance.step().await.unwrap(), 16);
        assert_eq!(world.committed_outputs().len(), 32);
        drain(&mut instance, &world.log).await.unwrap();
        assert_eq!(instance.position().total(), 40);
    });
}
