//! Shared helpers for the integration tests: broker selection from the
//! environment, unique topic names, a reference service and its
//! independently computed fold.
//!
//! The broker is read from `MS2M_TEST_BROKERS` (`host:port`); unset, each
//! test starts its own embedded mock cluster. `tests/broker.sh start`
//! starts tansu and prints the variable to export.

#![allow(missing_docs)]

pub mod processes;

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::future::Future;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use ms2m_core::codec::CodecError;
use ms2m_core::{
    ApplyContext, Instance, MessageLog, OutputSink, ServiceState, SnapshotStore, StateDigest, StateError,
    StatefulService,
};
use ms2m_kafka::{KafkaCluster, KafkaConfig};
use rand::Rng;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};
use serde::{Deserialize, Serialize};

/// Environment variable holding the real broker's address.
pub const BROKERS_ENV: &str = "MS2M_TEST_BROKERS";

/// The real broker's address, `None` for the embedded mock cluster.
pub fn brokers() -> Option<String> {
    std::env::var(BROKERS_ENV).ok().filter(|s| !s.trim().is_empty())
}

/// Whether the tests run on the embedded mock cluster.
pub fn on_mock() -> bool {
    brokers().is_none()
}

/// Installs a tracing subscriber once (`RUST_LOG` controls it).
pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn,ms2m=info".into()),
        )
        .with_test_writer()
        .try_init();
}

/// A name unique to this test run: `{prefix}-{random}`.
pub fn unique(prefix: &str) -> String {
    let n: u64 = rand::thread_rng().gen();
    format!("{prefix}-{n:016x}")
}

/// A service configuration on the test broker.
pub fn config(service: &str) -> KafkaConfig {
    let c = KafkaConfig::new(service).operation_timeout(Duration::from_secs(20));
    match brokers() {
        Some(b) => c.bootstrap_servers(b).replication_factor(1),
        None => c,
    }
}

/// A service configuration on an embedded mock cluster of the test's own,
/// whatever `MS2M_TEST_BROKERS` says: for tests of the mock's behaviour.
/// Their names end in `_on_mock`, and `tests/run.sh` skips them (with
/// `--skip _on_mock`) in its real-broker pass.
pub fn mock_config(service: &str) -> KafkaConfig {
    KafkaConfig::new(service).operation_timeout(Duration::from_secs(20))
}

/// The value of the environment variable `name`, for an `#[ignore]`d test
/// that needs something the default run has not (a broker with
/// transactions, ...): run with `--ignored` without it, the test fails
/// loudly instead of passing without having run.
pub fn required_env(name: &str, needed_for: &str) -> String {
    match std::env::var(name) {
        Ok(v) if !v.trim().is_empty() => v,
        _ => panic!("{name} is not set: this test needs {needed_for}; set it or do not run ignored tests"),
    }
}

/// Connects to the configured broker, or starts an embedded mock cluster
/// (explicitly) when `config` names none.
pub fn connect(config: KafkaConfig) -> KafkaCluster {
    init_tracing();
    let cluster = if config.configured_bootstrap_servers().is_some() {
        KafkaCluster::connect(config)
    } else {
        KafkaCluster::embedded(config)
    };
    cluster.expect("connect to the test broker")
}

/// A producer for test input.
pub fn producer(cluster: &KafkaCluster) -> FutureProducer {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", cluster.bootstrap_servers())
        .set("linger.ms", "5")
        .set("acks", "all");
    c.create().expect("test producer")
}

/// Produces `values` to `topic`, partition `p` for each `(p, value)`, as
/// JSON numbers; waits for every delivery.
pub async fn produce(cluster: &KafkaCluster, topic: &str, values: &[(i32, u64)]) {
    let producer = producer(cluster);
    let mut futures = Vec::with_capacity(values.len());
    for (p, v) in values {
        let payload = v.to_string();
        let key = format!("k{v}");
        let record = FutureRecord::to(topic).partition(*p).key(&key).payload(&payload);
        futures.push(producer.send_result(record).map_err(|(e, _)| e).expect("enqueue"));
    }
    for f in futures {
        f.await.expect("delivery future").expect("delivered");
    }
}

/// `n` random values spread round-robin over `partitions` partitions.
pub fn random_values(n: usize, partitions: i32) -> Vec<(i32, u64)> {
    let mut rng = rand::thread_rng();
    (0..n)
        .map(|i| ((i as i32) % partitions, rng.gen_range(1..1000)))
        .collect()
}

/// The reference service: per partition, a count, a sum and an
/// order-sensitive hash of the values. Emits one output per message:
/// `{"p":partition,"o":offset,"v":value}`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Summer {
    pub partitions: BTreeMap<i32, Fold>,
}

/// The fold of one partition.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fold {
    pub count: u64,
    pub sum: u64,
    pub hash: u64,
}

impl Fold {
    pub fn push(&mut self, v: u64) {
        self.count += 1;
        self.sum += v;
        self.hash = self.hash.wrapping_mul(1_000_003).wrapping_add(v);
    }
}

/// The fold of `values` computed without the runtime.
pub fn reference_fold(values: &[(i32, u64)]) -> Summer {
    let mut s = Summer::default();
    for (p, v) in values {
        s.partitions.entry(*p).or_default().push(*v);
    }
    s
}

/// One output of [`Summer`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Out {
    pub p: i32,
    pub o: i64,
    pub v: u64,
}

/// The `n`-th [`Out`] (partition 0, offset and value `n`) as an output
/// record to `topic`, with one header, for tests that drive a sink by hand.
pub fn out_record(topic: &str, n: u64) -> ms2m_core::OutputRecord {
    let out = Out {
        p: 0,
        o: n as i64,
        v: n,
    };
    ms2m_core::OutputRecord {
        topic: topic.into(),
        key: None,
        payload: serde_json::to_vec(&out).expect("an Out serializes").into(),
        headers: vec![("h".into(), bytes::Bytes::from_static(b"v"))],
    }
}

impl ServiceState for Summer {
    const SCHEMA_VERSION: u32 = 1;

    fn snapshot(&self) -> Result<Vec<u8>, CodecError> {
        ms2m_core::codec::encode(self)
    }

    fn restore(schema_version: u32, bytes: &[u8]) -> Result<Self, StateError> {
        if schema_version != Self::SCHEMA_VERSION {
            return Err(StateError::UnknownSchemaVersion {
                found: schema_version,
                current: Self::SCHEMA_VERSION,
                upgradable: vec![],
            });
        }
        ms2m_core::codec::decode(bytes).map_err(|source| StateError::Decode {
            version: schema_version,
            source,
        })
    }

    fn digest(&self) -> StateDigest {
        ms2m_core::digest::digest_of(self)
    }
}

#[async_trait]
impl StatefulService for Summer {
    const NAME: &'static str = "ms2m-test-summer";
    type Message = u64;
    type Format = ms2m_core::codec::Json;
    type Error = Infallible;

    async fn apply(&mut self, v: u64, ctx: &mut ApplyContext<'_>) -> Result<(), Infallible> {
        let p = ctx.partition();
        self.partitions.entry(p).or_default().push(v);
        let out = Out { p, o: ctx.offset(), v };
        ctx.emit_keyed(format!("{}/{}", out.p, out.o), &out);
        Ok(())
    }
}

/// Steps `instance` until its position reaches `target` on every partition
/// `target` names, failing after `timeout`.
pub async fn run_until<L, St, O>(
    instance: &mut Instance<Summer, L, St, O>,
    target: &ms2m_core::Position,
    timeout: Duration,
) where
    L: MessageLog,
    St: SnapshotStore,
    O: OutputSink,
{
    let deadline = Instant::now() + timeout;
    while !instance.position().reaches(target) {
        assert!(
            Instant::now() < deadline,
            "instance did not reach {target} within {timeout:?}: at {}",
            instance.position()
        );
        instance.step().await.expect("step");
    }
}

/// Waits until `f` returns `Some`, polling every 50 ms, failing after `timeout`.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Every record of `topic` (all `partitions`) up to the high watermarks,
/// read with `isolation.level=read_committed`, as `(partition, offset, payload)`.
pub async fn read_all(cluster: &KafkaCluster, topic: &str, partitions: i32) -> Vec<(i32, i64, Vec<u8>)> {
    let bootstrap = cluster.bootstrap_servers().to_string();
    let topic = topic.to_string();
    tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &bootstrap)
            .set("group.id", unique("reader"))
            .set("enable.auto.commit", "false")
            .set("isolation.level", "read_committed")
            .set("auto.offset.reset", "earliest")
            .create()
            .expect("reader");
        let mut tpl = TopicPartitionList::new();
        let mut highs = BTreeMap::new();
        for p in 0..partitions {
            let (low, high) = consumer
                .fetch_watermarks(&topic, p, Duration::from_secs(10))
                .expect("watermarks");
            highs.insert(p, high);
            tpl.add_partition_offset(&topic, p, Offset::Offset(low)).unwrap();
        }
        consumer.assign(&tpl).expect("assign");
        let mut next: BTreeMap<i32, i64> = BTreeMap::new();
        let mut out = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(60);
        while highs.iter().any(|(p, h)| next.get(p).copied().unwrap_or(0) < *h) {
            assert!(Instant::now() < deadline, "timed out reading {topic}");
            if let Some(m) = consumer.poll(Duration::from_millis(100)) {
                let m = m.expect("consume");
                next.insert(m.partition(), m.offset() + 1);
                out.push((m.partition(), m.offset(), m.payload().unwrap_or_default().to_vec()));
            }
        }
        out
    })
    .await
    .expect("reader task")
}

/// The [`Out`]s on an output topic.
pub async fn read_outputs(cluster: &KafkaCluster, topic: &str, partitions: i32) -> Vec<Out> {
    read_all(cluster, topic, partitions)
        .await
        .into_iter()
        .map(|(_, _, p)| serde_json::from_slice(&p).expect("output decodes"))
        .collect()
}

/// The end offsets of `topic`'s partitions as a position.
pub async fn end_position(cluster: &KafkaCluster, topic: &str, partitions: i32) -> ms2m_core::Position {
    let bootstrap = cluster.bootstrap_servers().to_string();
    let topic = topic.to_string();
    tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &bootstrap)
            .create()
            .expect("client");
        (0..partitions)
            .map(|p| {
                let (_, high) = consumer
                    .fetch_watermarks(&topic, p, Duration::from_secs(10))
                    .expect("watermarks");
                (ms2m_core::TopicPartition::new(topic.as_str(), p), high)
            })
            .collect()
    })
    .await
    .expect("watermark task")
}

pub mod faults;

/// Writes a line to the process's stderr, bypassing the test harness's
/// output capture (the fault-injection progress and summary always show).
pub fn report_line(line: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr().lock(), "{line}");
}

/// Publishes a doctored manifest for `id` (a later manifest record wins).
pub async fn doctor_manifest(
    cluster: &KafkaCluster,
    store: &ms2m_kafka::KafkaSnapshotStore,
    id: u64,
    f: impl FnOnce(&mut ms2m_kafka::Manifest),
) {
    let mut m = store.manifest(id).await.unwrap();
    f(&mut m);
    let payload = serde_json::to_vec(&m).unwrap();
    let key = format!("{}/{id}/m", cluster.config().service());
    producer(cluster)
        .send(
            rdkafka::producer::FutureRecord::to(store.topic())
                .partition(0)
                .key(&key)
                .payload(&payload),
            Duration::from_secs(10),
        )
        .await
        .map_err(|(e, _)| e)
        .unwrap();
}

/// Restarts the tansu broker that `tests/broker.sh start` started, keeping
/// its sqlite file and port (`tests/broker.sh restart`). Fails unless the
/// script's broker is the one in `MS2M_TEST_BROKERS`.
pub fn tansu_restart() -> Result<(), String> {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/broker.sh");
    let out = std::process::Command::new("bash")
        .arg(script)
        .arg("restart")
        .output()
        .map_err(|e| format!("cannot run {script}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{script} restart failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let printed = String::from_utf8_lossy(&out.stdout);
    let expected = format!("{BROKERS_ENV}={}", brokers().unwrap_or_default());
    if printed.trim() != expected {
        return Err(format!("restarted broker ({}) is not {expected}", printed.trim()));
    }
    Ok(())
}

/// Whether `tests/broker.sh` runs the broker in `MS2M_TEST_BROKERS` (so
/// the suite may restart it).
pub fn tansu_restartable() -> bool {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/broker.sh");
    let Some(brokers) = brokers() else { return false };
    std::process::Command::new("bash")
        .arg(script)
        .arg("status")
        .output()
        .ok()
        .is_some_and(|o| {
            let s = String::from_utf8_lossy(&o.stdout);
            s.starts_with("running") && brokers.ends_with(&format!(":{}", s.trim().rsplit('=').next().unwrap_or("")))
        })
}
