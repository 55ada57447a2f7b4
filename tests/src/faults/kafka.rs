//! Scenarios on Kafka: the embedded mock cluster (broker down/up, request
//! errors, added latency) or tansu (process restart on its sqlite file).
//! No test double stands in for Kafka here: every scenario uses the real
//! `KafkaLog`, `KafkaSnapshotStore`, `KafkaSink` and `KafkaControl`.
//!
//! Output duplicates are counted, not forbidden: the mock does not
//! implement transactions and tansu has none, so the guarantee shown here is
//! at-least-once with its documented window (`commit_every + batch - 1`
//! outputs per crash); exactly-once is shown on the in-memory backends.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use ms2m_core::migration::{
    current_owner, ensure_owner, migration_outcome, read_history, run_target, Coordinator, CutoverRule, DigestPolicy,
    MigrationConfig, MigrationOutcome, MigrationPlan, Recovered, SourceAgent, SourceExit, SourceOptions, TargetOptions,
};
use ms2m_core::store::load_newest_valid;
use ms2m_core::{
    no_progress, BadMessagePolicy, ControlBody, Delivery, Error, ErrorKind, Instance, InstanceConfig, ServiceState,
    Snapshot, SnapshotStore, StateError, StatefulService, TopicPartition,
};
use ms2m_kafka::broker::MockFault;
use ms2m_kafka::{KafkaCluster, KafkaLog, KafkaSink, KafkaSnapshotStore};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Headers;
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};

use super::{judge_migration, Backend, Fault, Kind, Outcome, Phase, Scenario, Strategy};
use crate::{config, doctor_manifest, end_position, produce, producer, read_outputs, reference_fold, unique, Summer};

const PARTITIONS: i32 = 2;
const LIMIT: Duration = Duration::from_secs(60);
/// Largest batch an instance takes at once: commits are due after a batch,
/// so a crash can duplicate up to `commit_every + POLL_BATCH - 1` outputs.
const POLL_BATCH: u64 = 50;

type Inst = Instance<Summer, KafkaLog, KafkaSnapshotStore, KafkaSink>;

/// One connection to the test broker, shared by every scenario of a run
/// (each scenario uses fresh topic names).
#[derive(Clone, Debug)]
pub struct KafkaEnv {
    cluster: KafkaCluster,
}

impl KafkaEnv {
    pub fn connect() -> Self {
        Self {
            cluster: crate::connect(config(&unique("fi-probe"))),
        }
    }

    pub fn backend(&self) -> Backend {
        if self.cluster.is_embedded() {
            Backend::Mock
        } else {
            Backend::Tansu
        }
    }
}

/// Topics and the service cluster handle of one scenario.
struct Run {
    env: KafkaEnv,
    cluster: KafkaCluster,
    input: String,
    output: String,
    dlq: String,
    delivery: Delivery,
    all: Vec<(i32, u64)>,
    /// Crashes with uncommitted live outputs (each may duplicate up to `commit_every`).
    crashes: u64,
}

impl Run {
    async fn new(env: &KafkaEnv, sc: &Scenario) -> Self {
        let service = unique(&format!("fi{}", sc.seed));
        let input = format!("{service}-in");
        let output = format!("{service}-out");
        let dlq = format!("{service}-dlq");
        let cluster = env.cluster.for_service(
            config(&service)
                .input_topic(&input)
                .snapshot_partitions(2)
                .snapshot_chunk_size(256)
                .operation_timeout(Duration::from_secs(15)),
        );
        for (t, p) in [(&input, PARTITIONS), (&output, 1), (&dlq, 1)] {
            cluster.create_topic(t, p, &[]).await.expect("create topic");
        }
        // Exactly-once sink on the mock where it can be (the mock's
        // transactions are not real; see the module docs), at-least-once on tansu.
        let delivery = if env.backend() == Backend::Mock && sc.variant {
            Delivery::ExactlyOnce
        } else {
            Delivery::AtLeastOnce
        };
        Self {
            env: env.clone(),
            cluster,
            input,
            output,
            dlq,
            delivery,
            all: Vec::new(),
            crashes: 0,
        }
    }

    async fn produce(&mut self, n: u64, seed: u64) {
        self.produce_in_background(n, seed).await.expect("input producer");
    }

    /// Like [`Run::produce`], in a task: the values are recorded now.
    fn produce_in_background(&mut self, n: u64, seed: u64) -> tokio::task::JoinHandle<()> {
        let first = self.all.len();
        let values: Vec<(i32, u64)> = (0..n)
            .map(|i| {
                let k = first as u64 + i;
                ((k % PARTITIONS as u64) as i32, 1 + (k * 7919 + seed) % 997)
            })
            .collect();
        self.all.extend(values.iter().copied());
        let (cluster, input) = (self.cluster.clone(), self.input.clone());
        tokio::spawn(async move { produce(&cluster, &input, &values).await })
    }

    fn config(&self, id: &str, sc: &Scenario) -> InstanceConfig {
        InstanceConfig::new(id)
            .output_topic(self.output.as_str())
            .snapshot_every(Some(sc.snapshot_every))
            .snapshot_interval(None)
            .keep_snapshots(3)
            .commit_every(sc.commit_every, Duration::from_secs(3600))
            .poll(POLL_BATCH as usize, Duration::from_millis(50))
    }

    async fn recover(&self, cfg: InstanceConfig) -> ms2m_core::Result<Inst> {
        let backends = self.cluster.backends(self.delivery).await.expect("backends");
        Instance::recover(backends, cfg, &*no_progress()).await
    }

    /// Recovers, retrying while the broker is unreachable (typed
    /// `Unavailable` errors); any other error fails the scenario.
    async fn recover_retrying(&self, cfg: InstanceConfig, o: &mut Outcome) -> Inst {
        let deadline = Instant::now() + LIMIT;
        loop {
            match self.recover(cfg.clone()).await {
                Ok(i) => return i,
                Err(e) if e.backend_kind() == Some(ErrorKind::Unavailable) && Instant::now() < deadline => {
                    o.typed_errors += 1;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => panic!("recovery failed: {e:?}"),
            }
        }
    }

    async fn end(&self) -> ms2m_core::Position {
        end_position(&self.cluster, &self.input, PARTITIONS).await
    }

    /// Runs to the end of the input, shuts down, checks the invariants.
    async fn finish(&mut self, sc: &Scenario, o: &mut Outcome, mut instance: Inst) {
        let end = self.end().await;
        tokio::time::timeout(LIMIT, async {
            while !instance.position().reaches(&end) {
                instance.step().await.expect("step while finishing");
            }
        })
        .await
        .expect("the instance reaches the end of the input");
        instance.shutdown().await.expect("graceful shutdown");
        self.check(sc, o, instance.state(), &end, &[]).await;
    }

    /// State equals the fold; every input has an output (or is dead-lettered);
    /// duplicates within the at-least-once window.
    async fn check(
        &self,
        sc: &Scenario,
        o: &mut Outcome,
        state: &Summer,
        end: &ms2m_core::Position,
        dead: &[(i32, i64)],
    ) {
        assert_eq!(
            state,
            &reference_fold(&self.all),
            "final state differs from the reference fold"
        );
        let outs = read_outputs(&self.cluster, &self.output, 1).await;
        let mut seen: BTreeMap<(i32, i64), u64> = BTreeMap::new();
        for out in &outs {
            *seen.entry((out.p, out.o)).or_default() += 1;
        }
        let mut missing = 0;
        for (tp, high) in end.iter() {
            for off in 0..high {
                if !seen.contains_key(&(tp.partition, off)) && !dead.contains(&(tp.partition, off)) {
                    missing += 1;
                }
            }
        }
        let dups: u64 = seen.values().map(|n| n - 1).sum();
        o.lost += missing;
        o.duplicated_at_least_once += dups;
        assert_eq!(missing, 0, "outputs lost");
        let window = (self.crashes + 1) * (sc.commit_every + POLL_BATCH - 1);
        assert!(
            dups <= window,
            "{dups} duplicates exceed the at-least-once window ({} crashes x (commit_every {} + batch {} - 1))",
            self.crashes + 1,
            sc.commit_every,
            POLL_BATCH
        );
    }

    fn mock(&self, fault: MockFault) {
        self.env
            .cluster
            .embedded()
            .expect("mock-only fault")
            .inject(fault)
            .expect("inject a mock fault");
    }
}

/// Runs one Kafka scenario and checks the invariants.
pub async fn run_kafka(env: KafkaEnv, sc: Scenario) -> Outcome {
    let mut run = Run::new(&env, &sc).await;
    match sc.kind {
        Kind::Recovery => recovery(&mut run, &sc).await,
        Kind::Snapshot => snapshot_damage(&mut run, &sc).await,
        Kind::BadInput => bad_input(&mut run, &sc).await,
        Kind::TailDeleted => tail_deleted(&mut run, &sc).await,
        Kind::Migration(strategy) => migration(&mut run, &sc, strategy).await,
    }
}

async fn step_to(instance: &mut Inst, total: i64) {
    tokio::time::timeout(LIMIT, async {
        while instance.position().total() < total {
            instance.step().await.expect("step");
        }
    })
    .await
    .expect("the instance reaches the crash point");
}

/// Steps until `total` or the first error (a typed error under a broker fault).
async fn step_through_fault(instance: &mut Inst, total: i64, deadline: Instant) -> Option<Error> {
    while instance.position().total() < total && Instant::now() < deadline {
        if let Err(e) = instance.step().await {
            return Some(e);
        }
    }
    None
}

async fn recovery(run: &mut Run, sc: &Scenario) -> Outcome {
    let mut o = Outcome {
        injected: true,
        ..Outcome::default()
    };
    run.produce(sc.initial, sc.seed).await;
    let mut a = run.recover(run.config("a", sc)).await.expect("recover");
    let crash_at = (sc.initial as f64 * sc.at) as i64;
    step_to(&mut a, crash_at).await;
    run.produce(sc.during, sc.seed).await;
    let end = run.end().await.total();
    match sc.fault {
        Fault::CrashSource => {
            if sc.phase == Phase::Checkpoint {
                // A checkpoint is being uploaded when the owner dies.
                a.commit().await.unwrap();
                let mut b = a;
                let target = (b.position().total() + sc.snapshot_every as i64).min(end);
                step_to(&mut b, target).await;
                drop(b.into_parts());
            } else {
                drop(a.into_parts());
            }
            run.crashes += 1;
            if sc.phase == Phase::Replay {
                // The next instance crashes while it replays to the watermark:
                // built like `recover`, dropped before it is live.
                let backends = run.cluster.backends(run.delivery).await.unwrap();
                let (loaded, _) = load_newest_valid::<Summer, _>(&*backends.store, Summer::NAME)
                    .await
                    .unwrap();
                let mut b = Instance::<Summer, _, _, _>::restore(backends, run.config("b", sc), loaded)
                    .await
                    .unwrap();
                for _ in 0..3 {
                    b.step().await.unwrap();
                }
                assert!(!b.is_live());
                drop(b.into_parts());
            }
        }
        Fault::BrokerDown | Fault::RequestErrors | Fault::Latency | Fault::BrokerRestart => {
            let until = (a.position().total() + (end - a.position().total()) / 2).max(a.position().total() + 1);
            let mut instance = Some(a);
            if sc.phase == Phase::Replay {
                // Crash first, then the fault hits the recovering instance.
                drop(instance.take().unwrap().into_parts());
                run.crashes += 1;
            }
            let restore = inject_broker_fault(run, sc).await;
            if instance.is_none() {
                instance = Some(run.recover_retrying(run.config("b", sc), &mut o).await);
            }
            let deadline = Instant::now() + Duration::from_secs(20);
            if let Some(e) = step_through_fault(instance.as_mut().unwrap(), until, deadline).await {
                // Did not ride through: a typed error, then a fresh recovery.
                assert!(
                    e.backend_kind().is_some(),
                    "a broker fault must surface as a typed backend error: {e:?}"
                );
                o.typed_errors += 1;
                o.notes
                    .push(format!("{:?} surfaced as {:?}", sc.fault, e.backend_kind()));
                drop(instance.take().unwrap().into_parts());
                run.crashes += 1;
            }
            restore.await;
            if let Some(i) = instance.take() {
                // Crash after the fault too: the next recovery must see everything.
                drop(i.into_parts());
                run.crashes += 1;
            }
        }
        f => unreachable!("{f:?}"),
    }
    let c = run.recover_retrying(run.config("c", sc), &mut o).await;
    run.finish(sc, &mut o, c).await;
    o
}

/// Injects the scenario's broker fault; the returned future ends it.
async fn inject_broker_fault(run: &Run, sc: &Scenario) -> futures_end::End {
    let hold = Duration::from_millis(200 + sc.seed % 600);
    match sc.fault {
        Fault::BrokerDown => {
            run.mock(MockFault::BrokerDown(1));
            let env = run.env.clone();
            futures_end::End::after(hold, move || {
                env.cluster.embedded().unwrap().inject(MockFault::BrokerUp(1)).unwrap();
            })
        }
        Fault::RequestErrors => {
            use RDKafkaRespErr::*;
            let errs = [
                RD_KAFKA_RESP_ERR_NOT_LEADER_FOR_PARTITION,
                RD_KAFKA_RESP_ERR_REQUEST_TIMED_OUT,
                RD_KAFKA_RESP_ERR__TRANSPORT,
            ];
            let n = 1 + (sc.seed % 3) as usize;
            for api in [
                RDKafkaApiKey::Produce,
                RDKafkaApiKey::Fetch,
                RDKafkaApiKey::OffsetCommit,
            ] {
                run.mock(MockFault::RequestErrors(api, errs[..n].to_vec()));
            }
            let env = run.env.clone();
            futures_end::End::after(Duration::ZERO, move || {
                let m = env.cluster.embedded().unwrap();
                for api in [
                    RDKafkaApiKey::Produce,
                    RDKafkaApiKey::Fetch,
                    RDKafkaApiKey::OffsetCommit,
                ] {
                    m.inject(MockFault::ClearRequestErrors(api)).unwrap();
                }
            })
        }
        Fault::Latency => {
            run.mock(MockFault::RoundTripTime(1, Duration::from_millis(20 + sc.seed % 100)));
            let env = run.env.clone();
            futures_end::End::after(hold, move || {
                env.cluster
                    .embedded()
                    .unwrap()
                    .inject(MockFault::RoundTripTime(1, Duration::ZERO))
                    .unwrap();
            })
        }
        Fault::BrokerRestart => {
            crate::tansu_restart().expect("restart tansu (tests/broker.sh restart)");
            futures_end::End::after(Duration::ZERO, || {})
        }
        f => unreachable!("{f:?}"),
    }
}

mod futures_end {
    use std::time::Duration;

    /// Ends a fault: runs `f` after `delay` on a blocking thread (the
    /// fault schedule, not an assertion); awaiting waits until it ran.
    pub struct End(tokio::task::JoinHandle<()>);

    impl End {
        pub fn after(delay: Duration, f: impl FnOnce() + Send + 'static) -> Self {
            End(tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                tokio::task::spawn_blocking(f).await.unwrap();
            }))
        }
    }

    impl std::future::IntoFuture for End {
        type Output = ();
        type IntoFuture = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;
        fn into_future(self) -> Self::IntoFuture {
            Box::pin(async move { self.0.await.unwrap() })
        }
    }
}

async fn snapshot_damage(run: &mut Run, sc: &Scenario) -> Outcome {
    let mut o = Outcome {
        injected: true,
        ..Outcome::default()
    };
    run.produce(sc.initial, sc.seed).await;
    let every = sc.snapshot_every.min(sc.initial / 3).max(1);
    let mut a = run
        .recover(run.config("a", sc).snapshot_every(Some(every)))
        .await
        .unwrap();
    let end = run.end().await;
    step_to(&mut a, end.total()).await;
    a.shutdown().await.unwrap();
    let store = run.cluster.snapshot_store().await.unwrap();
    let ids = store.list().await.unwrap();
    assert!(ids.len() >= 2, "at least two snapshots: {ids:?}");
    let newest = *ids.last().unwrap();
    match sc.fault {
        Fault::CorruptSnapshot => doctor_manifest(&run.cluster, &store, newest, |m| m.chunks[0].3 ^= 1).await,
        Fault::MissingSnapshot => {
            doctor_manifest(&run.cluster, &store, newest, |m| {
                let last = m.chunks.len() - 1;
                m.chunks[last].1 += 1_000_000;
            })
            .await
        }
        Fault::TruncatedSnapshot => {
            doctor_manifest(&run.cluster, &store, newest, |m| {
                m.chunks.pop();
            })
            .await
        }
        Fault::UnknownSchema => {
            let state = Bytes::from(a.state().snapshot().unwrap());
            let snap = Snapshot::seal(Summer::NAME, 99, a.position().clone(), "future", state);
            store.put(&snap.encode().unwrap()).await.unwrap();
        }
        f => unreachable!("{f:?}"),
    }
    drop(a.into_parts());
    run.produce(sc.during, sc.seed).await;
    let fresh = run.cluster.snapshot_store().await.unwrap();
    let (loaded, rejected) = load_newest_valid::<Summer, _>(&fresh, Summer::NAME).await.unwrap();
    assert!(loaded.is_some(), "an older snapshot verifies");
    assert_eq!(rejected.len(), 1, "exactly the damaged snapshot is rejected");
    o.snapshots_rejected += 1;
    o.typed_errors += 1;
    match sc.fault {
        Fault::UnknownSchema => assert!(
            matches!(
                rejected[0].reason,
                Error::State(StateError::UnknownSchemaVersion { found: 99, .. })
            ),
            "{:?}",
            rejected[0].reason
        ),
        _ => assert_eq!(
            rejected[0].reason.backend_kind(),
            Some(ErrorKind::Corrupt),
            "{:?}",
            rejected[0].reason
        ),
    }
    let b = run.recover(run.config("b", sc)).await.unwrap();
    run.finish(sc, &mut o, b).await;
    o
}

/// Every record of the DLQ with its headers.
async fn read_dlq(run: &Run) -> Vec<(Vec<u8>, BTreeMap<String, String>)> {
    let bootstrap = run.cluster.bootstrap_servers().to_string();
    let topic = run.dlq.clone();
    tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &bootstrap)
            .set("group.id", unique("dlq-reader"))
            .set("enable.auto.commit", "false")
            .create()
            .unwrap();
        let (low, high) = consumer.fetch_watermarks(&topic, 0, Duration::from_secs(10)).unwrap();
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(&topic, 0, Offset::Offset(low)).unwrap();
        consumer.assign(&tpl).unwrap();
        let mut out = Vec::new();
        let mut next = low;
        let deadline = Instant::now() + Duration::from_secs(30);
        while next < high {
            assert!(Instant::now() < deadline, "timed out reading the DLQ");
            if let Some(m) = consumer.poll(Duration::from_millis(100)) {
                let m = m.unwrap();
                next = m.offset() + 1;
                let mut headers = BTreeMap::new();
                if let Some(h) = m.headers() {
                    for hd in h.iter() {
                        headers.insert(
                            hd.key.to_string(),
                            String::from_utf8_lossy(hd.value.unwrap_or_default()).to_string(),
                        );
                    }
                }
                out.push((m.payload().unwrap_or_default().to_vec(), headers));
            }
        }
        out
    })
    .await
    .unwrap()
}

async fn bad_input(run: &mut Run, sc: &Scenario) -> Outcome {
    let mut o = Outcome {
        injected: true,
        ..Outcome::default()
    };
    run.produce(sc.initial / 2, sc.seed).await;
    let bad_p = (sc.seed % PARTITIONS as u64) as i32;
    let before = run.end().await;
    let bad_tp = TopicPartition::new(run.input.as_str(), bad_p);
    let bad_offset = before.get(&bad_tp).unwrap_or(0);
    producer(&run.cluster)
        .send(
            rdkafka::producer::FutureRecord::to(&run.input)
                .partition(bad_p)
                .key("bad")
                .payload("{not json"),
            Duration::from_secs(10),
        )
        .await
        .map_err(|(e, _)| e)
        .unwrap();
    run.produce(sc.initial - sc.initial / 2, sc.seed).await;
    let dead_letter = BadMessagePolicy::DeadLetter { topic: run.dlq.clone() };
    if sc.fault == Fault::BadInputFail {
        let mut a = run
            .recover(run.config("a", sc).bad_messages(BadMessagePolicy::Fail))
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
        for e in [err, a.step().await.expect_err("retrying fails the same way")] {
            match &e {
                Error::Decode { tp, offset, .. } => assert_eq!((tp, *offset), (&bad_tp, bad_offset)),
                other => panic!("expected Error::Decode, got {other:?}"),
            }
            assert_eq!(a.position().get(&bad_tp), Some(bad_offset), "the position moved past");
            o.typed_errors += 1;
        }
        a.shutdown().await.unwrap();
    } else {
        let mut a = run
            .recover(run.config("a", sc).bad_messages(dead_letter.clone()))
            .await
            .unwrap();
        let end = run.end().await;
        step_to(&mut a, (end.total() as f64 * (0.5 + sc.at / 2.0)) as i64).await;
        drop(a.into_parts());
        run.crashes += 1;
    }
    run.produce(sc.during, sc.seed).await;
    let mut c = run
        .recover(run.config("c", sc).bad_messages(dead_letter))
        .await
        .unwrap();
    let end = run.end().await;
    step_to(&mut c, end.total()).await;
    c.shutdown().await.unwrap();
    let dlq = read_dlq(run).await;
    assert!(!dlq.is_empty(), "the bad message is dead-lettered");
    assert!(
        dlq.len() as u64 <= 1 + run.crashes * (sc.commit_every + POLL_BATCH - 1),
        "DLQ duplicates beyond the at-least-once window"
    );
    o.duplicated_at_least_once += dlq.len() as u64 - 1;
    for (payload, h) in &dlq {
        assert_eq!(payload, b"{not json");
        assert_eq!(h.get("ms2m.stage").map(String::as_str), Some("decode"));
        assert_eq!(h.get("ms2m.source.offset"), Some(&bad_offset.to_string()));
        assert_eq!(h.get("ms2m.source.partition"), Some(&bad_p.to_string()));
        assert!(h.get("ms2m.error").is_some_and(|e| !e.is_empty()));
    }
    o.dead_lettered += 1;
    // `all` holds only the good values: the fold ignores the bad one.
    run.check(sc, &mut o, c.state(), &end, &[(bad_p, bad_offset)]).await;
    o
}

/// On the mock: overflow partition 0's ~5 MiB so its oldest records are
/// evicted (the mock's retention), then recovery must fail loudly.
async fn tail_deleted(run: &mut Run, sc: &Scenario) -> Outcome {
    let mut o = Outcome {
        injected: true,
        ..Outcome::default()
    };
    run.produce(sc.initial, sc.seed).await;
    let mut a = run.recover(run.config("a", sc).snapshot_every(None)).await.unwrap();
    step_to(&mut a, 4).await;
    let info = a.checkpoint().await.unwrap();
    drop(a.into_parts());
    let big = "x".repeat(700 * 1024);
    let p = producer(&run.cluster);
    for i in 0..12 {
        let key = format!("big{i}");
        p.send(
            rdkafka::producer::FutureRecord::to(&run.input)
                .partition(0)
                .key(&key)
                .payload(&big),
            Duration::from_secs(10),
        )
        .await
        .map_err(|(e, _)| e)
        .unwrap();
    }
    let tp = TopicPartition::new(run.input.as_str(), 0);
    let needed = info.position.get(&tp).unwrap();
    let err = run
        .recover(run.config("b", sc))
        .await
        .expect_err("recovery must refuse the gap");
    match err {
        Error::LogTruncated {
            tp: t,
            needed: n,
            earliest,
            ..
        } => {
            assert_eq!((t, n), (tp, needed));
            assert!(earliest > needed);
        }
        other => panic!("expected Error::LogTruncated, got {other:?}"),
    }
    o.typed_errors += 1;
    o
}

async fn migration(run: &mut Run, sc: &Scenario, strategy: Strategy) -> Outcome {
    let mut o = Outcome::default();
    run.produce(sc.initial, sc.seed).await;
    let control = Arc::new(run.cluster.control().await.unwrap());
    let migration_id = format!("m-{}", sc.seed);
    let plan = MigrationPlan {
        service: Summer::NAME,
        migration_id: migration_id.clone(),
        source: "src".into(),
        target: "tgt".into(),
        strategy,
    };
    let timeout = Duration::from_secs(4);
    let source = run.recover(run.config("src", sc)).await.unwrap();
    let agent = SourceAgent::new(source, control.clone(), SourceOptions::default())
        .await
        .unwrap();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let mut source_task = Some(tokio::spawn(agent.run(async move {
        let _ = stop_rx.await;
    })));
    let mut target_task = Some({
        let backends = run.cluster.backends(run.delivery).await.unwrap();
        let (control, cfg) = (control.clone(), run.config("tgt", sc));
        tokio::spawn(async move {
            let options = TargetOptions {
                phase_timeout: timeout,
                ..TargetOptions::default()
            };
            run_target::<Summer, _, _, _, _>(backends, cfg, control, options, &*no_progress()).await
        })
    });
    let mconfig = MigrationConfig {
        cutover: CutoverRule {
            max_lag: Some(20),
            max_catch_up: Some(Duration::from_millis(50)),
            replay_max: Duration::from_millis(500),
        },
        digest_policy: DigestPolicy::Abort,
        phase_timeout: timeout,
    };
    let coordinator = Arc::new(Coordinator::new(control.clone(), mconfig.clone()));
    let mut mig = Some({
        let (c, p) = (coordinator.clone(), plan.clone());
        tokio::spawn(async move { c.migrate(&p, &*no_progress()).await })
    });
    // More input while the migration runs.
    let producing = run.produce_in_background(sc.during, sc.seed);

    // Crash the victim once the phase's message is on the control topic; a
    // broker fault starts with the message that opens the phase.
    let broker_fault = matches!(
        sc.fault,
        Fault::BrokerDown | Fault::RequestErrors | Fault::Latency | Fault::BrokerRestart
    );
    let trigger: Option<fn(&ControlBody) -> bool> = match (sc.fault, sc.phase) {
        (_, p) if broker_fault => Some(match p {
            Phase::Checkpoint => |b| matches!(b, ControlBody::Prepare { .. }),
            Phase::Transfer => |b| matches!(b, ControlBody::CheckpointTaken { .. }),
            Phase::Restore => |b| matches!(b, ControlBody::Restore { .. }),
            Phase::Replay => |b| matches!(b, ControlBody::Restored { .. }),
            Phase::Cutover => |b| matches!(b, ControlBody::Stop { .. }),
            Phase::Live => |b| matches!(b, ControlBody::Live { .. }),
        }),
        (Fault::CrashSource | Fault::CrashTarget | Fault::CrashCoordinator, p) => Some(match p {
            Phase::Checkpoint => |b| matches!(b, ControlBody::CheckpointTaken { .. }),
            Phase::Transfer => |b| matches!(b, ControlBody::Restore { .. }),
            Phase::Restore => |b| matches!(b, ControlBody::Restored { .. }),
            Phase::Replay => |b| matches!(b, ControlBody::TargetProgress { .. }),
            Phase::Cutover => |b| matches!(b, ControlBody::Stopped { .. }),
            Phase::Live => |b| matches!(b, ControlBody::Live { .. }),
        }),
        _ => None,
    };
    let mut recovered = None;
    let crash_applies = sc.phase != Phase::Live || matches!(sc.fault, Fault::CrashCoordinator) || broker_fault;
    if let Some(hit) = trigger.filter(|_| crash_applies) {
        let deadline = Instant::now() + LIMIT;
        let fired = loop {
            let h = read_history(&*control, Summer::NAME).await.unwrap();
            if h.iter().any(|m| m.migration_id == migration_id && hit(&m.body)) {
                break true;
            }
            if mig.as_ref().unwrap().is_finished() || Instant::now() > deadline {
                break false;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        o.injected = fired;
        if fired {
            match sc.fault {
                Fault::CrashSource => source_task.take().unwrap().abort(),
                Fault::CrashTarget => target_task.take().unwrap().abort(),
                Fault::CrashCoordinator => {
                    mig.take().unwrap().abort();
                    let fresh = Coordinator::new(control.clone(), mconfig.clone());
                    recovered = Some(recover_coordinator(&fresh, &migration_id, &mut o).await);
                }
                _ => {
                    // The parties ride through or fail with typed errors; the
                    // harness reads the channel again once the fault is over.
                    inject_broker_fault(run, sc).await.await;
                }
            }
        }
    }
    producing.await.expect("input producer");
    let result = match mig.take() {
        Some(t) => Some(tokio::time::timeout(LIMIT, t).await.expect("coordinator ends").unwrap()),
        None => None,
    };
    if matches!(result, Some(Err(_))) && decision(&control, &migration_id).await.is_none() {
        // The coordinator gave up without recording a decision (its own
        // publish failed under the broker fault): restart it.
        o.notes
            .push("coordinator failed to record its decision: a restarted one did".into());
        let fresh = Coordinator::new(control.clone(), mconfig.clone());
        recovered = Some(recover_coordinator(&fresh, &migration_id, &mut o).await);
    }
    // The control channel's order decides (first writer wins); every
    // party's own view must agree with it.
    let history = read_history(&*control, Summer::NAME).await.unwrap();
    let completed = judge_migration(&history, &migration_id, result.as_ref(), recovered, &mut o);
    let owner = current_owner(&*control, Summer::NAME)
        .await
        .unwrap()
        .map(|o| o.instance_id);
    let end = run.end().await;
    if completed {
        assert_eq!(owner.as_deref(), Some("tgt"));
        let went_live = match target_task.take() {
            Some(t) => match tokio::time::timeout(LIMIT, t).await.expect("target returns").unwrap() {
                Ok(live) => Some(live),
                Err(e) if broker_fault => {
                    // It took over, then failed (claiming the sink) under the fault.
                    o.notes
                        .push(format!("target failed after its takeover: {:?}", e.backend_kind()));
                    None
                }
                Err(e) => panic!("the target took over but failed: {e:?}"),
            },
            None => {
                o.notes.push("crashed target had already taken over".into());
                None
            }
        };
        let mut live = match went_live {
            Some(live) => live,
            None => {
                // The decided owner is restarted with its id.
                run.crashes += 1;
                ensure_owner(&*control, Summer::NAME, "tgt").await.unwrap();
                run.recover_retrying(run.config("tgt", sc), &mut o).await
            }
        };
        let released = match source_task.take() {
            Some(t) => match tokio::time::timeout(LIMIT, t).await.expect("source returns").unwrap() {
                Ok(SourceExit::Released(i)) => Some(i),
                Err(e) if broker_fault => {
                    o.notes
                        .push(format!("source failed under the broker fault: {:?}", e.backend_kind()));
                    None
                }
                other => panic!("the source was not released: {other:?}"),
            },
            None => None,
        };
        match (sc.fault, sc.phase) {
            (Fault::ZombieSource, Phase::Live) => {
                // The zombie is refused by the control channel; the broker
                // cannot fence its producer (mock: no real transactions; tansu: none).
                drop(released);
                o.injected = true;
                o.notes.push(
                    "kafka zombie: refused by ensure_owner; producer fencing needs a real transactional broker".into(),
                );
            }
            (Fault::CrashTarget, Phase::Live) => {
                o.injected = true;
                for _ in 0..3 {
                    live.step().await.unwrap();
                }
                drop(live.into_parts());
                run.crashes += 1;
                ensure_owner(&*control, Summer::NAME, "tgt").await.unwrap();
                live = run.recover(run.config("tgt", sc)).await.unwrap();
            }
            _ => {}
        }
        let err = ensure_owner(&*control, Summer::NAME, "src")
            .await
            .expect_err("old owner refused");
        assert!(matches!(err, Error::Fenced { .. }));
        o.typed_errors += 1;
        run.finish(sc, &mut o, live).await;
    } else {
        assert_ne!(owner.as_deref(), Some("tgt"));
        if let Some(t) = target_task.take() {
            match tokio::time::timeout(LIMIT, t).await {
                Ok(r) => assert!(r.unwrap().is_err(), "an aborted target must not go live"),
                Err(_) => panic!("the target neither gave up nor went live"),
            }
        }
        let alive = match source_task.take() {
            // Let the source catch up with the input (unless it dies).
            Some(t) if wait_committed(run, &end, &t).await && !t.is_finished() => Some(t),
            Some(t) => {
                let e = t.await.unwrap().expect_err("the source ended on its own");
                assert!(
                    broker_fault && e.backend_kind().is_some(),
                    "the source died without a broker fault: {e:?}"
                );
                o.notes
                    .push(format!("source failed under the broker fault: {:?}", e.backend_kind()));
                None
            }
            None => None,
        };
        let state = match alive {
            Some(t) => {
                stop_tx.send(()).unwrap();
                match tokio::time::timeout(LIMIT, t).await.expect("source stops").unwrap() {
                    Ok(SourceExit::Shutdown(i)) => i.state().clone(),
                    other => panic!("source should still own the service: {other:?}"),
                }
            }
            None => {
                run.crashes += 1;
                ensure_owner(&*control, Summer::NAME, "src").await.unwrap();
                let mut again = run.recover_retrying(run.config("src", sc), &mut o).await;
                step_to(&mut again, end.total()).await;
                again.shutdown().await.unwrap();
                again.state().clone()
            }
        };
        run.check(sc, &mut o, &state, &end, &[]).await;
        return o;
    }
    o
}

/// The decision of `migration_id` on the control channel, if any.
async fn decision(control: &ms2m_kafka::KafkaControl, migration_id: &str) -> Option<MigrationOutcome> {
    let history = read_history(control, Summer::NAME).await.unwrap();
    migration_outcome(&history, migration_id)
}

/// A restarted coordinator finishes or rolls back, retrying while the
/// broker is unreachable.
async fn recover_coordinator(
    coordinator: &Coordinator<ms2m_kafka::KafkaControl>,
    migration_id: &str,
    o: &mut Outcome,
) -> Recovered {
    let deadline = Instant::now() + LIMIT;
    loop {
        match coordinator.recover(Summer::NAME, migration_id).await {
            Ok(r) => return r,
            Err(e) if Instant::now() < deadline && e.backend_kind().is_some() => {
                o.typed_errors += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("coordinator recovery failed: {e:?}"),
        }
    }
}

/// Waits until the group's committed offsets reach `end`; false if they
/// do not in time or `owner` ends first.
async fn wait_committed<T>(run: &Run, end: &ms2m_core::Position, owner: &tokio::task::JoinHandle<T>) -> bool {
    let bootstrap = run.cluster.bootstrap_servers().to_string();
    let group = run.cluster.config().group_id();
    let end = end.clone();
    let deadline = Instant::now() + LIMIT;
    loop {
        let (b, g, e) = (bootstrap.clone(), group.clone(), end.clone());
        let reached = tokio::task::spawn_blocking(move || {
            let consumer: BaseConsumer = ClientConfig::new()
                .set("bootstrap.servers", &b)
                .set("group.id", &g)
                .create()
                .ok()?;
            let mut tpl = TopicPartitionList::new();
            for (tp, _) in e.iter() {
                tpl.add_partition(&tp.topic, tp.partition);
            }
            let c = consumer.committed_offsets(tpl, Duration::from_secs(5)).ok()?;
            Some(e.iter().all(|(tp, high)| {
                c.find_partition(&tp.topic, tp.partition)
                    .is_some_and(|el| matches!(el.offset(), Offset::Offset(o) if o >= high))
            }))
        })
        .await
        .unwrap()
        .unwrap_or(false);
        if reached {
            return true;
        }
        if Instant::now() > deadline || owner.is_finished() {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
