//! The scenario bodies, written once for every [`Deployment`]: recovery
//! after a crash (or a broker fault), snapshot damage, bad input and a
//! deleted log tail; migrations are in [`super::migration`]. [`Run`] holds
//! one scenario's bookkeeping (the input produced, the crashes so far) and
//! the invariant check every scenario ends with.

use std::collections::BTreeMap;
use std::time::Instant;

use bytes::Bytes;
use ms2m_core::store::load_newest_valid;
use ms2m_core::{
    no_progress, BadMessagePolicy, Error, Instance, InstanceConfig, MessageLog, OutputSink, Position, ServiceState,
    Snapshot, SnapshotStore, StateError, StatefulService, TopicPartition,
};

use super::deployment::{Deployment, Guarantee};
use super::drift::{Drifting, Folds};
use super::{Fault, Kind, Outcome, Phase, Scenario, INPUT_PARTITIONS};
use crate::{reference_fold, Summer};

/// An instance of service `S` on deployment `D`'s backends.
pub type Inst<D, S = Summer> = Instance<S, <D as Deployment>::Log, <D as Deployment>::Store, <D as Deployment>::Sink>;

/// Runs one scenario on `d` and checks the invariants (a violation panics).
pub async fn run_scenario<D: Deployment>(d: D, sc: Scenario) -> Outcome {
    let mut run = Run::new(d, sc.clone());
    match sc.kind {
        Kind::Recovery => recovery(&mut run).await,
        Kind::Snapshot => snapshot_damage(&mut run).await,
        Kind::BadInput => bad_input(&mut run).await,
        Kind::TailDeleted => tail_deleted(&mut run).await,
        Kind::Migration(strategy) if sc.fault == Fault::Divergence => {
            let _drift = Drifting::exclusive().await;
            super::migration::migration::<D, Drifting>(&mut run, strategy).await
        }
        Kind::Migration(strategy) => super::migration::migration::<D, Summer>(&mut run, strategy).await,
    }
    run.outcome
}

/// One scenario in progress.
pub struct Run<D> {
    pub d: D,
    pub sc: Scenario,
    pub outcome: Outcome,
    /// Every value produced, as `(partition, offset, value)`.
    input: Vec<(i32, i64, u64)>,
    next_offset: [i64; INPUT_PARTITIONS as usize],
    /// Crashes with uncommitted outputs (each may duplicate a window's worth).
    pub crashes: u64,
}

impl<D: Deployment> Run<D> {
    fn new(d: D, sc: Scenario) -> Self {
        Self {
            d,
            sc,
            outcome: Outcome::default(),
            input: Vec::new(),
            next_offset: [0; INPUT_PARTITIONS as usize],
            crashes: 0,
        }
    }

    pub fn limit(&self) -> std::time::Duration {
        D::TIMING.limit
    }

    /// The next `n` values of this seed, recorded with their offsets.
    fn next_values(&mut self, n: u64) -> Vec<(i32, u64)> {
        let first = self.input.len() as u64;
        let values: Vec<(i32, u64)> = (first..first + n)
            .map(|k| {
                (
                    (k % INPUT_PARTITIONS as u64) as i32,
                    1 + (k * 7919 + self.sc.seed) % 997,
                )
            })
            .collect();
        for &(p, v) in &values {
            self.input.push((p, self.next_offset[p as usize], v));
            self.next_offset[p as usize] += 1;
        }
        values
    }

    pub async fn produce(&mut self, n: u64) {
        let values = self.next_values(n);
        self.d.produce(values).await;
    }

    pub fn produce_in_background(&mut self, n: u64) -> tokio::task::JoinHandle<()> {
        let values = self.next_values(n);
        self.d.produce_in_background(values)
    }

    /// One undecodable message on `partition`; its offset.
    async fn produce_undecodable(&mut self, partition: i32) -> i64 {
        self.next_offset[partition as usize] += 1;
        self.d.produce_undecodable(partition).await
    }

    /// How many values have been produced (or are being produced).
    pub fn produced(&self) -> i64 {
        self.input.len() as i64
    }

    pub fn config(&self, id: &str) -> InstanceConfig {
        let t = D::TIMING;
        InstanceConfig::new(id)
            .output_topic(self.d.output_topic())
            .snapshot_every(Some(self.sc.snapshot_every))
            .snapshot_interval(None)
            .keep_snapshots(3)
            .commit_every(self.sc.commit_every, t.commit_interval)
            .poll(t.poll_batch as usize, t.poll_wait)
    }

    pub fn dead_letter_policy(&self) -> BadMessagePolicy {
        let topic = self.d.dead_letter_topic().to_string();
        BadMessagePolicy::DeadLetter { topic }
    }

    pub async fn recover<S: StatefulService>(&self, config: InstanceConfig) -> ms2m_core::Result<Inst<D, S>> {
        Instance::recover(self.d.backends().await, config, &*no_progress()).await
    }

    /// Recovers, retrying while a backend is unreachable (typed
    /// `Unavailable` errors, counted); any other error fails the scenario.
    pub async fn recover_retrying<S: StatefulService>(&mut self, config: InstanceConfig) -> Inst<D, S> {
        let deadline = Instant::now() + self.limit();
        loop {
            match self.recover(config.clone()).await {
                Ok(instance) => return instance,
                Err(e) if e.backend_kind() == Some(ms2m_core::ErrorKind::Unavailable) && Instant::now() < deadline => {
                    self.outcome.typed_errors += 1;
                    tokio::time::sleep(D::TIMING.retry).await;
                }
                Err(e) => panic!("recovery failed: {e:?}"),
            }
        }
    }

    /// Runs `instance` to the end of the input and shuts it down; its state.
    pub async fn drain<S: Folds>(&self, mut instance: Inst<D, S>) -> Summer {
        let end = self.d.input_end().await;
        step_to(&mut instance, end.total(), self.limit()).await;
        instance.shutdown().await.expect("graceful shutdown");
        instance.state().summer().clone()
    }

    /// Drains `instance`, then checks the invariants.
    pub async fn finish<S: Folds>(&mut self, instance: Inst<D, S>) {
        let state = self.drain(instance).await;
        self.check(&state, &[]).await;
    }

    /// The final state is the reference fold of the input (less the
    /// offsets in `dead`); every input offset not in `dead` has an output;
    /// duplicates: none on an exactly-once sink, else within the window.
    pub async fn check(&mut self, state: &Summer, dead: &[(i32, i64)]) {
        let kept: Vec<(i32, u64)> = self
            .input
            .iter()
            .filter(|(p, o, _)| !dead.contains(&(*p, *o)))
            .map(|&(p, _, v)| (p, v))
            .collect();
        assert_eq!(
            state,
            &reference_fold(&kept),
            "final state differs from the reference fold"
        );
        let (missing, duplicated) = self.count_outputs(dead).await;
        self.outcome.lost += missing;
        assert_eq!(missing, 0, "outputs lost");
        self.count_duplicates(duplicated, "outputs");
    }

    /// Whether `state` is the reference fold of all input.
    pub fn matches_fold(&self, state: &Summer) -> bool {
        let all: Vec<(i32, u64)> = self.input.iter().map(|&(p, _, v)| (p, v)).collect();
        state == &reference_fold(&all)
    }

    /// (missing, duplicated) outputs over the input's end offsets.
    async fn count_outputs(&self, dead: &[(i32, i64)]) -> (u64, u64) {
        let end = self.d.input_end().await;
        let mut seen: BTreeMap<(i32, i64), u64> = BTreeMap::new();
        for out in self.d.committed_outputs().await {
            *seen.entry((out.p, out.o)).or_default() += 1;
        }
        let missing = end
            .iter()
            .flat_map(|(tp, high)| (0..high).map(move |o| (tp.partition, o)))
            .filter(|k| !seen.contains_key(k) && !dead.contains(k))
            .count();
        (missing as u64, seen.values().map(|n| n - 1).sum())
    }

    /// Records `n` duplicated `what`s against the deployment's guarantee.
    fn count_duplicates(&mut self, n: u64, what: &str) {
        match D::GUARANTEE {
            Guarantee::ExactlyOnce => {
                self.outcome.duplicated_exactly_once += n;
                assert_eq!(n, 0, "{what} duplicated on an exactly-once sink");
            }
            Guarantee::AtLeastOnce => {
                self.outcome.duplicated_at_least_once += n;
                // Two commits' worth: one running in the background, one applied meanwhile.
                let per_crash = 2 * (self.sc.commit_every + D::TIMING.poll_batch - 1);
                assert!(
                    n <= (self.crashes + 1) * per_crash,
                    "{n} {what} duplicated beyond the at-least-once window ({} crashes x 2 x (commit_every {} + batch {} - 1))",
                    self.crashes + 1,
                    self.sc.commit_every,
                    D::TIMING.poll_batch
                );
            }
        }
    }

    /// Drops `instance` without a commit or a final snapshot.
    pub fn crash<S: StatefulService>(&mut self, instance: Inst<D, S>) {
        drop(instance.into_parts());
        self.crashes += 1;
    }
}

/// Steps `instance` until its position totals `total`.
pub async fn step_to<S, L, St, O>(instance: &mut Instance<S, L, St, O>, total: i64, limit: std::time::Duration)
where
    S: StatefulService,
    L: MessageLog,
    St: SnapshotStore,
    O: OutputSink,
{
    let stepping = async {
        while instance.position().total() < total {
            instance.step().await.expect("step");
        }
    };
    tokio::time::timeout(limit, stepping)
        .await
        .expect("the instance reaches the point");
}

/// Run, crash in a phase (or ride out a broker fault), recover, finish.
async fn recovery<D: Deployment>(run: &mut Run<D>) {
    run.outcome.injected = true;
    let sc = run.sc.clone();
    run.produce(sc.initial).await;
    let mut a: Inst<D> = run.recover(run.config("a")).await.expect("recover");
    step_to(&mut a, (sc.initial as f64 * sc.at) as i64, run.limit()).await;
    let producing = run.produce_in_background(sc.during);
    if sc.fault.is_broker_fault() {
        ride_out_broker_fault(run, a).await;
    } else {
        crash_owner_in_phase(run, a).await;
    }
    producing.await.expect("input producer");
    let c: Inst<D> = run.recover_retrying(run.config("c")).await;
    run.finish(c).await;
}

/// The owner crashes in `sc.phase`: while its checkpoint fails or is
/// uploading, or its successor crashes while restoring or replaying.
async fn crash_owner_in_phase<D: Deployment>(run: &mut Run<D>, mut a: Inst<D>) {
    match run.sc.phase {
        Phase::Checkpoint if run.d.set_store_unavailable(true) => {
            let before = a.stats().snapshot_failures;
            a.checkpoint().await.expect_err("the store is down");
            assert!(a.stats().snapshot_failures > before, "the failed upload is counted");
            run.outcome.typed_errors += 1;
            run.crash(a);
            run.d.set_store_unavailable(false);
        }
        Phase::Checkpoint => {
            // No store outage here: the owner dies while a snapshot uploads.
            a.commit().await.expect("commit");
            let target = (a.position().total() + run.sc.snapshot_every as i64).min(run.produced());
            step_to(&mut a, target, run.limit()).await;
            run.crash(a);
        }
        Phase::Restore | Phase::Replay => {
            run.crash(a);
            crash_standby(run).await;
        }
        _ => run.crash(a),
    }
}

/// A successor built like `recover` builds it crashes before it is live
/// (after three replay steps in `Replay`); it must not have emitted.
async fn crash_standby<D: Deployment>(run: &mut Run<D>) {
    let backends = run.d.backends().await;
    let (loaded, _) = load_newest_valid::<Summer, _>(&*backends.store, Summer::NAME)
        .await
        .expect("load a snapshot");
    let outputs_before = committed_output_count(run).await;
    let mut b = Instance::<Summer, _, _, _>::restore(backends, run.config("b"), loaded)
        .await
        .expect("restore");
    if run.sc.phase == Phase::Replay {
        for _ in 0..3 {
            b.step().await.expect("replay step");
        }
    }
    assert!(!b.is_live(), "a restoring instance is a standby");
    run.crash(b);
    assert_eq!(committed_output_count(run).await, outputs_before, "a standby emitted");
}

/// Committed outputs so far, where that count cannot move behind the
/// harness's back (a transactional sink); `None` elsewhere.
async fn committed_output_count<D: Deployment>(run: &Run<D>) -> Option<usize> {
    match D::GUARANTEE {
        Guarantee::ExactlyOnce => Some(run.d.committed_outputs().await.len()),
        Guarantee::AtLeastOnce => None,
    }
}

/// A broker fault hits the owner (in `Replay`: a recovering one after a
/// crash): it rides through or fails with a typed error, then crashes.
async fn ride_out_broker_fault<D: Deployment>(run: &mut Run<D>, a: Inst<D>) {
    let from = a.position().total();
    let until = (from + (run.produced() - from) / 2).max(from + 1);
    let mut owner = Some(a);
    if run.sc.phase == Phase::Replay {
        run.crash(owner.take().expect("the owner"));
    }
    let healed = run.d.inject_broker_fault(run.sc.fault, run.sc.seed).await;
    let mut owner = match owner {
        Some(a) => a,
        None => run.recover_retrying(run.config("b")).await,
    };
    let deadline = Instant::now() + std::time::Duration::from_secs(20);
    match step_through_fault(&mut owner, until, deadline).await {
        Some(e) => {
            // It did not ride through: a typed error, then a crash.
            assert!(
                e.backend_kind().is_some(),
                "a broker fault must surface as a typed backend error: {e:?}"
            );
            run.outcome.typed_errors += 1;
            run.outcome
                .notes
                .push(format!("{:?} surfaced as {:?}", run.sc.fault, e.backend_kind()));
            run.crash(owner);
            healed.wait().await;
        }
        None => {
            // Crash after the fault too: the next recovery must see everything.
            healed.wait().await;
            run.crash(owner);
        }
    }
}

/// Steps until `total` or the first error (a typed error under a broker fault).
async fn step_through_fault<L, St, O>(
    instance: &mut Instance<Summer, L, St, O>,
    total: i64,
    deadline: Instant,
) -> Option<Error>
where
    L: MessageLog,
    St: SnapshotStore,
    O: OutputSink,
{
    while instance.position().total() < total && Instant::now() < deadline {
        if let Err(e) = instance.step().await {
            return Some(e);
        }
    }
    None
}

/// The newest snapshot is damaged (or of an unknown schema): recovery
/// rejects it with a typed reason and falls back to an older one.
async fn snapshot_damage<D: Deployment>(run: &mut Run<D>) {
    run.outcome.injected = true;
    let sc = run.sc.clone();
    run.produce(sc.initial).await;
    let every = sc.snapshot_every.min(sc.initial / 3).max(1);
    let a: Inst<D> = run
        .recover(run.config("a").snapshot_every(Some(every)))
        .await
        .expect("recover");
    let (state, position) = {
        let end = run.d.input_end().await;
        let mut a = a;
        step_to(&mut a, end.total(), run.limit()).await;
        a.shutdown().await.expect("shutdown");
        (a.state().clone(), a.position().clone())
    };
    let still_listed = damage_newest_snapshot(run, &state, position).await;
    run.produce(sc.during).await;
    let store = run.d.snapshot_store().await;
    let (loaded, rejected) = load_newest_valid::<Summer, _>(&*store, Summer::NAME)
        .await
        .expect("load");
    assert!(loaded.is_some(), "an older snapshot verifies");
    assert_eq!(
        rejected.len(),
        still_listed as usize,
        "exactly the damaged snapshot is rejected"
    );
    if let Some(r) = rejected.first() {
        let expected = match sc.fault {
            Fault::UnknownSchema => {
                matches!(
                    r.reason,
                    Error::State(StateError::UnknownSchemaVersion { found: 99, .. })
                )
            }
            _ => D::is_damage_rejection(&r.reason),
        };
        assert!(expected, "{:?} rejected for {:?}", sc.fault, r.reason);
        run.outcome.snapshots_rejected += 1;
        run.outcome.typed_errors += 1;
    }
    let b: Inst<D> = run
        .recover(run.config("b"))
        .await
        .expect("recover from an older snapshot");
    run.finish(b).await;
}

/// Damages the newest of at least two snapshots (an unknown schema: a newer
/// snapshot of schema 99 is stored); whether the damaged one is listed.
async fn damage_newest_snapshot<D: Deployment>(run: &Run<D>, state: &Summer, position: Position) -> bool {
    let store = run.d.snapshot_store().await;
    let ids = store.list().await.expect("list snapshots");
    assert!(ids.len() >= 2, "at least two snapshots: {ids:?}");
    let newest = *ids.last().expect("a snapshot");
    if run.sc.fault == Fault::UnknownSchema {
        let bytes = Bytes::from(state.snapshot().expect("encode the state"));
        let future = Snapshot::seal(Summer::NAME, 99, position, "future", bytes);
        store
            .put(&future.encode().expect("encode"))
            .await
            .expect("store a snapshot");
        return true;
    }
    run.d.damage_snapshot(newest, run.sc.fault, run.sc.seed).await
}

/// An undecodable message: `Fail` stops with `Error::Decode` without moving
/// the position (also when a restart replays it); `DeadLetter` puts it on
/// the DLQ, with the reason in headers, once (within the window at least once).
async fn bad_input<D: Deployment>(run: &mut Run<D>) {
    run.outcome.injected = true;
    let sc = run.sc.clone();
    run.produce(sc.initial / 2).await;
    let bad_p = (sc.seed % INPUT_PARTITIONS as u64) as i32;
    let bad = (
        TopicPartition::new(run.d.input_topic(), bad_p),
        run.produce_undecodable(bad_p).await,
    );
    run.produce(sc.initial - sc.initial / 2).await;
    match (sc.fault, sc.phase) {
        (Fault::BadInputFail, Phase::Live) => fail_on_bad_input(run, &bad).await,
        (Fault::BadInputFail, _) => fail_on_replayed_bad_input(run, &bad).await,
        (Fault::BadInputDeadLetter, _) => crash_after_dead_lettering(run).await,
        (f, _) => unreachable!("{f:?}"),
    }
    run.produce(sc.during).await;
    let c: Inst<D> = run
        .recover(run.config("c").bad_messages(run.dead_letter_policy()))
        .await
        .expect("recover");
    let state = run.drain(c).await;
    check_dead_letters(run, &bad).await;
    run.check(&state, &[(bad_p, bad.1)]).await;
}

/// `Fail` live: the step fails with `Error::Decode` at the message, and
/// again on a retry, without moving the position.
async fn fail_on_bad_input<D: Deployment>(run: &mut Run<D>, bad: &(TopicPartition, i64)) {
    let mut a: Inst<D> = run
        .recover(run.config("a").bad_messages(BadMessagePolicy::Fail))
        .await
        .expect("recover");
    let first = tokio::time::timeout(run.limit(), async {
        loop {
            if let Err(e) = a.step().await {
                return e;
            }
        }
    })
    .await
    .expect("the bad message is reached");
    for e in [first, a.step().await.expect_err("retrying fails the same way")] {
        expect_decode_error(&e, bad);
        assert_eq!(a.position().get(&bad.0), Some(bad.1), "the position moved past");
        run.outcome.typed_errors += 1;
    }
    a.shutdown().await.expect("shutdown");
}

/// Dead-lettered live, then a restart with `Fail` replays it: the recovery
/// fails with `Error::Decode` (unless a snapshot is already past it).
async fn fail_on_replayed_bad_input<D: Deployment>(run: &mut Run<D>, bad: &(TopicPartition, i64)) {
    let config = run.config("a").bad_messages(run.dead_letter_policy());
    let mut a: Inst<D> = run.recover(config).await.expect("recover");
    let end = run.d.input_end().await;
    step_to(&mut a, end.total(), run.limit()).await;
    a.commit().await.expect("commit");
    run.crash(a);
    match run
        .recover::<Summer>(run.config("b").bad_messages(BadMessagePolicy::Fail))
        .await
    {
        Err(e) => {
            expect_decode_error(&e, bad);
            run.outcome.typed_errors += 1;
        }
        Ok(b) => {
            drop(b.into_parts());
            run.outcome
                .notes
                .push("fail policy: snapshot already past the bad message".into());
        }
    }
}

/// Dead-letters, then crashes mid-input (in `Replay`: at the end, after a commit).
async fn crash_after_dead_lettering<D: Deployment>(run: &mut Run<D>) {
    let mut a: Inst<D> = run
        .recover(run.config("a").bad_messages(run.dead_letter_policy()))
        .await
        .expect("recover");
    let replay = run.sc.phase == Phase::Replay;
    let crash_at = if replay {
        run.d.input_end().await.total()
    } else {
        (run.sc.initial as f64 * run.sc.at) as i64
    };
    step_to(&mut a, crash_at, run.limit()).await;
    if replay {
        a.commit().await.expect("commit");
    }
    run.crash(a);
}

fn expect_decode_error(e: &Error, (bad_tp, bad_offset): &(TopicPartition, i64)) {
    match e {
        Error::Decode { tp, offset, .. } => assert_eq!((tp, offset), (bad_tp, bad_offset), "{e}"),
        other => panic!("expected Error::Decode, got {other:?}"),
    }
}

/// The bad message is on the DLQ with its payload, stage, origin and error.
async fn check_dead_letters<D: Deployment>(run: &mut Run<D>, (bad_tp, bad_offset): &(TopicPartition, i64)) {
    let letters = run.d.dead_letters().await;
    assert!(!letters.is_empty(), "the bad message is dead-lettered");
    for letter in &letters {
        let header = |k: &str| {
            letter
                .headers
                .get(k)
                .cloned()
                .unwrap_or_else(|| panic!("header {k} missing"))
        };
        assert_eq!(letter.payload, b"{not json");
        assert_eq!(header("ms2m.stage"), "decode");
        assert_eq!(header("ms2m.source.offset"), bad_offset.to_string());
        assert_eq!(header("ms2m.source.partition"), bad_tp.partition.to_string());
        assert!(!header("ms2m.error").is_empty());
    }
    run.count_duplicates(letters.len() as u64 - 1, "dead letters");
    run.outcome.dead_lettered += 1;
}

/// Retention deleted input the snapshot needs: recovery fails with
/// `Error::LogTruncated`; where the deletion is exact, a recovery that
/// allows the gap misses exactly the deleted messages.
async fn tail_deleted<D: Deployment>(run: &mut Run<D>) {
    run.outcome.injected = true;
    let sc = run.sc.clone();
    run.produce(sc.initial).await;
    let mut a: Inst<D> = run
        .recover(run.config("a").snapshot_every(None))
        .await
        .expect("recover");
    step_to(&mut a, (sc.initial as f64 * sc.at * 0.5) as i64, run.limit()).await;
    let checkpoint = a.checkpoint().await.expect("checkpoint");
    step_to(&mut a, (sc.initial as f64 * (0.5 + sc.at * 0.5)) as i64, run.limit()).await;
    run.crash(a);
    let tp = TopicPartition::new(run.d.input_topic(), 0);
    let needed = checkpoint.position.get(&tp).expect("partition 0 in the checkpoint");
    let earliest = run.d.expire_input_through(needed, sc.seed).await;
    let refused = run
        .recover::<Summer>(run.config("b"))
        .await
        .expect_err("recovery must refuse the gap");
    expect_log_truncated(&refused, &tp, needed, earliest);
    run.outcome.typed_errors += 1;
    if let Some(earliest) = earliest {
        let c: Inst<D> = run
            .recover(run.config("c").allow_log_gap(true))
            .await
            .expect("recover past the gap");
        let state = run.drain(c).await;
        let deleted: Vec<(i32, i64)> = (needed..earliest).map(|o| (0, o)).collect();
        run.check(&state, &deleted).await;
    }
}

fn expect_log_truncated(e: &Error, tp: &TopicPartition, needed: i64, exact_earliest: Option<i64>) {
    let Error::LogTruncated {
        tp: t,
        needed: n,
        earliest,
        missing,
    } = e
    else {
        panic!("expected Error::LogTruncated, got {e:?}");
    };
    assert_eq!((t, *n), (tp, needed));
    match exact_earliest {
        Some(exact) => assert_eq!((*earliest, *missing), (exact, exact - needed)),
        None => assert!(*earliest > needed, "{e:?}"),
    }
}
