//! The Kafka deployment: the real `KafkaLog`, `KafkaSnapshotStore`,
//! `KafkaSink` and `KafkaControl` on the embedded mock cluster (broker
//! down/up, request errors, added latency) or on tansu (a process restart
//! on its sqlite file). Each scenario gets fresh topics.
//!
//! Output duplicates are counted, not forbidden: the mock does not
//! implement transactions and tansu has none, so the guarantee shown here
//! is at-least-once with its window (`2 × (commit_every + poll batch - 1)`
//! outputs per crash: a commit in the background and the messages applied
//! meanwhile); exactly-once is shown on the in-memory backends.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use ms2m_core::store::SnapshotId;
use ms2m_core::{Backends, Delivery, Error, ErrorKind, Position};
use ms2m_kafka::broker::MockFault;
use ms2m_kafka::{KafkaCluster, KafkaControl, KafkaLog, KafkaSink, KafkaSnapshotStore};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Headers;
use rdkafka::producer::FutureRecord;
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};

use super::deployment::{DeadLetter, Deployment, FaultEnd, Guarantee, Timing};
use super::{Backend, Fault, Scenario, INPUT_PARTITIONS};
use crate::{config, doctor_manifest, end_position, produce, producer, read_outputs, unique};

/// One connection to the test broker, shared by the scenarios of a run on
/// tansu (each scenario uses fresh topic names); one per scenario on the
/// mock, so its broker faults hit no other scenario.
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

    fn mock(&self, fault: MockFault) {
        let mock = self.cluster.embedded_broker().expect("a mock-only fault");
        mock.inject(fault).expect("inject a mock fault");
    }
}

/// One scenario's topics on the test broker.
pub struct KafkaDeployment {
    env: KafkaEnv,
    cluster: KafkaCluster,
    input: String,
    output: String,
    dlq: String,
    delivery: Delivery,
}

impl KafkaDeployment {
    /// Fresh topics for `sc`. The sink is transactional on the mock for
    /// half the seeds (the mock's transactions are not real, so duplicates
    /// are still only bounded), at-least-once otherwise.
    pub async fn new(env: &KafkaEnv, sc: &Scenario) -> Self {
        let service = unique(&format!("fi{}", sc.seed));
        let (input, output, dlq) = (
            format!("{service}-in"),
            format!("{service}-out"),
            format!("{service}-dlq"),
        );
        let cluster = env.cluster.for_service(
            config(&service)
                .input_topic(&input)
                .snapshot_partitions(2)
                .snapshot_chunk_size(256)
                .operation_timeout(Duration::from_secs(15)),
        );
        for (topic, partitions) in [(&input, INPUT_PARTITIONS), (&output, 1), (&dlq, 1)] {
            cluster
                .create_topic(topic, partitions, &[])
                .await
                .expect("create topic");
        }
        let delivery = if env.backend() == Backend::Mock && sc.variant {
            Delivery::ExactlyOnce
        } else {
            Delivery::AtLeastOnce
        };
        let env = env.clone();
        Self {
            env,
            cluster,
            input,
            output,
            dlq,
            delivery,
        }
    }

    /// Sends one record to the input and waits for its delivery.
    async fn send_to_input(&self, partition: i32, key: &str, payload: &[u8]) {
        let record = FutureRecord::to(&self.input)
            .partition(partition)
            .key(key)
            .payload(payload);
        let sent = producer(&self.cluster).send(record, Duration::from_secs(10)).await;
        sent.map_err(|(e, _)| e).expect("input delivered");
    }
}

#[async_trait]
impl Deployment for KafkaDeployment {
    type Log = KafkaLog;
    type Store = KafkaSnapshotStore;
    type Sink = KafkaSink;
    type Control = KafkaControl;

    const TIMING: Timing = Timing {
        limit: Duration::from_secs(60),
        poll_batch: 50,
        poll_wait: Duration::from_millis(50),
        commit_interval: Duration::from_secs(3600),
        phase_timeout: Duration::from_secs(4),
        max_catch_up: Duration::from_millis(50),
        replay_max: Duration::from_millis(500),
        recheck: Duration::from_millis(10),
        retry: Duration::from_millis(100),
    };
    const GUARANTEE: Guarantee = Guarantee::AtLeastOnce;

    fn input_topic(&self) -> &str {
        &self.input
    }

    fn output_topic(&self) -> &str {
        &self.output
    }

    fn dead_letter_topic(&self) -> &str {
        &self.dlq
    }

    async fn backends(&self) -> Backends<KafkaLog, KafkaSnapshotStore, KafkaSink> {
        self.cluster.backends(self.delivery).await.expect("backends")
    }

    async fn snapshot_store(&self) -> Arc<KafkaSnapshotStore> {
        Arc::new(self.cluster.snapshot_store().await.expect("snapshot store"))
    }

    async fn control(&self) -> Arc<KafkaControl> {
        Arc::new(self.cluster.control().await.expect("control channel"))
    }

    async fn produce(&self, values: Vec<(i32, u64)>) {
        produce(&self.cluster, &self.input, &values).await;
    }

    fn produce_in_background(&self, values: Vec<(i32, u64)>) -> tokio::task::JoinHandle<()> {
        let (cluster, input) = (self.cluster.clone(), self.input.clone());
        tokio::spawn(async move { produce(&cluster, &input, &values).await })
    }

    async fn produce_undecodable(&self, partition: i32) -> i64 {
        let tp = ms2m_core::TopicPartition::new(self.input.as_str(), partition);
        let offset = self.input_end().await.get(&tp).unwrap_or(0);
        self.send_to_input(partition, "bad", b"{not json").await;
        offset
    }

    async fn input_end(&self) -> Position {
        end_position(&self.cluster, &self.input, INPUT_PARTITIONS).await
    }

    async fn committed_outputs(&self) -> Vec<crate::Out> {
        read_outputs(&self.cluster, &self.output, 1).await
    }

    async fn dead_letters(&self) -> Vec<DeadLetter> {
        let (bootstrap, topic) = (self.cluster.bootstrap_servers().to_string(), self.dlq.clone());
        tokio::task::spawn_blocking(move || read_dead_letters(&bootstrap, &topic))
            .await
            .expect("DLQ reader")
    }

    async fn committed_through(&self, end: &Position) -> bool {
        let bootstrap = self.cluster.bootstrap_servers().to_string();
        let (group, end) = (self.cluster.config().group_id(), end.clone());
        tokio::task::spawn_blocking(move || group_committed_through(&bootstrap, &group, &end))
            .await
            .expect("offset reader")
    }

    async fn damage_snapshot(&self, id: SnapshotId, fault: Fault, _seed: u64) -> bool {
        let store = self.cluster.snapshot_store().await.expect("snapshot store");
        let doctor: fn(&mut ms2m_kafka::Manifest) = match fault {
            Fault::CorruptSnapshot => |m| m.chunks[0].3 ^= 1,
            Fault::MissingSnapshot => |m| {
                let last = m.chunks.len() - 1;
                m.chunks[last].1 += 1_000_000;
            },
            Fault::TruncatedSnapshot => |m| {
                m.chunks.pop();
            },
            f => unreachable!("{f:?}"),
        };
        doctor_manifest(&self.cluster, &store, id, doctor).await;
        true
    }

    fn is_damage_rejection(reason: &Error) -> bool {
        reason.backend_kind() == Some(ErrorKind::Corrupt)
    }

    /// Overflows partition 0's ~5 MiB so its oldest records are evicted
    /// (the mock's retention).
    async fn expire_input_through(&self, _needed: i64, _seed: u64) -> Option<i64> {
        let big = "x".repeat(700 * 1024);
        for i in 0..12 {
            self.send_to_input(0, &format!("big{i}"), big.as_bytes()).await;
        }
        None
    }

    async fn inject_broker_fault(&self, fault: Fault, seed: u64) -> FaultEnd {
        let hold = Duration::from_millis(200 + seed % 600);
        let env = self.env.clone();
        match fault {
            Fault::BrokerDown => {
                env.mock(MockFault::BrokerDown(1));
                FaultEnd::after(hold, move || env.mock(MockFault::BrokerUp(1)))
            }
            Fault::RequestErrors => {
                let errors = request_errors(seed);
                for api in FAILING_APIS {
                    env.mock(MockFault::RequestErrors(api, errors.clone()));
                }
                FaultEnd::after(Duration::ZERO, move || {
                    for api in FAILING_APIS {
                        env.mock(MockFault::ClearRequestErrors(api));
                    }
                })
            }
            Fault::Latency => {
                env.mock(MockFault::RoundTripTime(1, Duration::from_millis(20 + seed % 100)));
                FaultEnd::after(hold, move || env.mock(MockFault::RoundTripTime(1, Duration::ZERO)))
            }
            Fault::BrokerRestart => {
                crate::tansu_restart().expect("restart tansu (tests/broker.sh restart)");
                FaultEnd::after(Duration::ZERO, || {})
            }
            f => unreachable!("{f:?}"),
        }
    }
}

/// The requests `RequestErrors` fails.
const FAILING_APIS: [RDKafkaApiKey; 3] = [
    RDKafkaApiKey::Produce,
    RDKafkaApiKey::Fetch,
    RDKafkaApiKey::OffsetCommit,
];

/// One to three retriable errors per failing request, by seed.
fn request_errors(seed: u64) -> Vec<RDKafkaRespErr> {
    use RDKafkaRespErr::*;
    let all = [
        RD_KAFKA_RESP_ERR_NOT_LEADER_FOR_PARTITION,
        RD_KAFKA_RESP_ERR_REQUEST_TIMED_OUT,
        RD_KAFKA_RESP_ERR__TRANSPORT,
    ];
    all[..1 + (seed % 3) as usize].to_vec()
}

/// Every record of the single-partition DLQ `topic` with its headers.
fn read_dead_letters(bootstrap: &str, topic: &str) -> Vec<DeadLetter> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", unique("dlq-reader"))
        .set("enable.auto.commit", "false")
        .create()
        .expect("DLQ consumer");
    let (low, high) = consumer.fetch_watermarks(topic, 0, Duration::from_secs(10)).unwrap();
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, 0, Offset::Offset(low)).unwrap();
    consumer.assign(&tpl).unwrap();
    let (mut letters, mut next) = (Vec::new(), low);
    let deadline = Instant::now() + Duration::from_secs(30);
    while next < high {
        assert!(Instant::now() < deadline, "timed out reading the DLQ");
        if let Some(m) = consumer.poll(Duration::from_millis(100)) {
            let m = m.expect("consume the DLQ");
            next = m.offset() + 1;
            let headers = m.headers().map(|h| {
                h.iter()
                    .map(|hd| {
                        (
                            hd.key.to_string(),
                            String::from_utf8_lossy(hd.value.unwrap_or_default()).to_string(),
                        )
                    })
                    .collect()
            });
            let payload = m.payload().unwrap_or_default().to_vec();
            letters.push(DeadLetter {
                payload,
                headers: headers.unwrap_or_else(BTreeMap::new),
            });
        }
    }
    letters
}

/// Whether `group`'s committed offsets reach `end` (false if unreadable).
fn group_committed_through(bootstrap: &str, group: &str, end: &Position) -> bool {
    let read = || -> Option<bool> {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", bootstrap)
            .set("group.id", group)
            .create()
            .ok()?;
        let mut tpl = TopicPartitionList::new();
        for (tp, _) in end.iter() {
            tpl.add_partition(&tp.topic, tp.partition);
        }
        let committed = consumer.committed_offsets(tpl, Duration::from_secs(5)).ok()?;
        Some(end.iter().all(|(tp, high)| {
            committed
                .find_partition(&tp.topic, tp.partition)
                .is_some_and(|el| matches!(el.offset(), Offset::Offset(o) if o >= high))
        }))
    };
    read().unwrap_or(false)
}
