//! A Prometheus scrape of a service that did everything the metrics cover:
//! applied messages live, dead-lettered a bad one, committed, took a
//! checkpoint, and migrated to a target that replayed the log. The
//! exporter (`ms2m_kafka::telemetry::serve_prometheus`, feature
//! `prometheus`) is read over plain HTTP/1.0 like a scraper would, and so
//! are the health probes. librdkafka statistics are on (every 100 ms), so
//! the Kafka client metrics appear too.
//!
//! The recorder is global to the process: this file is its own test binary,
//! and the exporter starts before any instance, whose metric handles bind
//! to the recorder installed when they are created.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use ms2m_core::metrics as m;
use ms2m_core::migration::{
    run_target, Coordinator, CutoverRule, MigrationConfig, MigrationPlan, SourceAgent, SourceExit, SourceOptions,
    Strategy, TargetOptions,
};
use ms2m_core::testkit::{deposit, deposit_payload, Balances};
use ms2m_core::{no_progress, BadMessagePolicy, Delivery, Health, Instance, InstanceConfig};
use ms2m_kafka::telemetry::serve_prometheus;
use ms2m_kafka::{ClientTelemetry, KafkaCluster, KafkaLog, KafkaSink, KafkaSnapshotStore};
use ms2m_tests::{config, connect, end_position, producer, unique};
use rdkafka::error::{KafkaError as RdKafkaError, RDKafkaErrorCode};
use rdkafka::producer::FutureRecord;
use rdkafka::ClientContext;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const PARTITIONS: i32 = 2;

type Inst = Instance<Balances, KafkaLog, KafkaSnapshotStore, KafkaSink>;

/// `GET path` over HTTP/1.0: status code and body.
async fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).await.expect("connect to the exporter");
    let request = format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    let (head, body) = response.split_once("\r\n\r\n").expect("a response head");
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("a status");
    (status, body.to_string())
}

/// The value of the first sample of `name` whose labels include every one
/// of `labels` (`key="value"`).
fn sample(scrape: &str, name: &str, labels: &[&str]) -> Option<f64> {
    scrape
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.strip_prefix(name).is_some_and(|rest| rest.starts_with(['{', ' '])))
        .find(|l| labels.iter().all(|want| l.contains(want)))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

fn instance_config(id: &str, output: &str, dead_letters: &str) -> InstanceConfig {
    InstanceConfig::new(id)
        .output_topic(output.to_string())
        .snapshot_every(None)
        .snapshot_interval(None)
        .commit_every(20, Duration::from_millis(20))
        .poll(50, Duration::from_millis(10))
        .bad_messages(BadMessagePolicy::DeadLetter {
            topic: dead_letters.into(),
        })
}

/// Deposits `from..to`.
async fn produce_deposits(cluster: &KafkaCluster, input: &str, from: u64, to: u64) {
    let producer = producer(cluster);
    for i in from..to {
        let (key, payload) = (deposit(i).account, deposit_payload(i));
        let record = FutureRecord::to(input).key(&key).payload(&payload);
        producer.send(record, Duration::from_secs(10)).await.unwrap();
    }
}

/// 60 deposits and one payload that is not one.
async fn produce_input(cluster: &KafkaCluster, input: &str) {
    produce_deposits(cluster, input, 0, 60).await;
    let producer = producer(cluster);
    let bad = FutureRecord::to(input).partition(0).key("bad").payload("not a deposit");
    producer.send(bad, Duration::from_secs(10)).await.unwrap();
}

/// Steps `instance` to the end of the input, then a few idle steps (an
/// empty poll measures a lag of zero).
async fn drain(instance: &mut Inst, cluster: &KafkaCluster, input: &str) {
    let end = end_position(cluster, input, PARTITIONS).await;
    tokio::time::timeout(Duration::from_secs(60), async {
        while !instance.position().reaches(&end) {
            instance.step().await.unwrap();
        }
        for _ in 0..3 {
            instance.step().await.unwrap();
        }
    })
    .await
    .expect("the instance drains its input");
}

/// Migrates `source` to a new target (MS2M) while deposits keep arriving,
/// so that the target replays.
async fn migrate(source: Inst, cluster: &KafkaCluster, input: &str, output: &str, dead_letters: &str) -> Inst {
    let (feed_cluster, feed_input) = (cluster.clone(), input.to_string());
    let feed = tokio::spawn(async move {
        for batch in 0..40u64 {
            produce_deposits(&feed_cluster, &feed_input, 1000 + batch * 5, 1005 + batch * 5).await;
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    });
    let control = Arc::new(cluster.control().await.unwrap());
    let source = SourceAgent::new(source, control.clone(), SourceOptions::default())
        .await
        .unwrap()
        .spawn();
    let backends = cluster.backends(Delivery::AtLeastOnce).await.unwrap();
    let (config, target_control) = (instance_config("target", output, dead_letters), control.clone());
    let target = tokio::spawn(async move {
        let options = TargetOptions {
            phase_timeout: Duration::from_secs(30),
            ..TargetOptions::default()
        };
        run_target::<Balances, _, _, _, _>(backends, config, target_control, options, &*no_progress()).await
    });
    let plan = MigrationPlan {
        service: "balances".into(),
        migration_id: unique("m"),
        source: "source".into(),
        target: "target".into(),
        strategy: Strategy::Ms2m,
    };
    let config = MigrationConfig {
        cutover: CutoverRule {
            max_lag: Some(50),
            ..CutoverRule::default()
        },
        phase_timeout: Duration::from_secs(30),
        ..MigrationConfig::default()
    };
    let report = Coordinator::new(control, config)
        .migrate(&plan, &*no_progress())
        .await
        .unwrap();
    assert!(report.digest_match);
    feed.await.unwrap();
    assert!(matches!(source.join().await.unwrap(), SourceExit::Released(_)));
    target.await.unwrap().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_prometheus_scrape_shows_the_runtime_migration_and_client_metrics() {
    let server = serve_prometheus("127.0.0.1:0".parse().unwrap(), None).await.unwrap();
    let addr = server.local_addr();
    assert_eq!(get(addr, "/health/ready").await.0, 503, "no health yet");

    let service = unique("scrape");
    let (input, output, dead_letters) = (
        format!("{service}.in"),
        format!("{service}.out"),
        format!("{service}.dlq"),
    );
    let cluster = connect(
        config(&service)
            .input_topic(&input)
            .statistics_interval(Duration::from_millis(100)),
    );
    for topic in [&input, &output, &dead_letters] {
        cluster.create_topic(topic, PARTITIONS, &[]).await.unwrap();
    }
    produce_input(&cluster, &input).await;

    let backends = cluster.backends(Delivery::AtLeastOnce).await.unwrap();
    let config = instance_config("source", &output, &dead_letters);
    let mut source: Inst = Instance::recover(backends, config, &*no_progress()).await.unwrap();
    server.set_health(source.health());
    drain(&mut source, &cluster, &input).await;
    let checkpoint = source.checkpoint().await.unwrap();
    assert_eq!(get(addr, "/health/live").await.0, 200);
    assert_eq!(
        get(addr, "/health/ready").await.0,
        200,
        "{:?}",
        source.health().report()
    );

    let mut target = migrate(source, &cluster, &input, &output, &dead_letters).await;
    drain(&mut target, &cluster, &input).await;
    server.set_health(target.health());
    assert_eq!(
        get(addr, "/health/ready").await.0,
        200,
        "the target is live and caught up"
    );
    server.set_health(Health::new());
    assert_eq!(get(addr, "/health/ready").await.0, 503, "a standby that is not serving");
    assert_eq!(get(addr, "/health/live").await.0, 200);

    // librdkafka reports errors that belong to no call (here: as if every
    // broker connection were down) to the context's callback.
    let down = RdKafkaError::Global(RDKafkaErrorCode::AllBrokersDown);
    ClientTelemetry::new(service.clone(), "log").error(down, "test: all brokers down");
    tokio::time::sleep(Duration::from_millis(300)).await; // one more statistics report
    let (status, scrape) = get(addr, "/metrics").await;
    assert_eq!(status, 200);
    eprintln!("{scrape}");
    let source_l = [r#"service="balances""#, r#"instance="source""#];
    let value = |name: &str, extra: &[&str]| {
        let labels: Vec<&str> = source_l.iter().chain(extra).copied().collect();
        sample(&scrape, name, &labels).unwrap_or_else(|| panic!("{name} {labels:?} in the scrape"))
    };
    let live = value(m::APPLIED, &[r#"mode="live""#]);
    assert!(
        live >= 61.0,
        "60 deposits and the bad one, then more while migrating: {live}"
    );
    assert_eq!(value(m::DEAD_LETTERED, &[]), 1.0, "one bad message");
    assert_eq!(
        value(m::OUTPUTS, &[]),
        live,
        "a balance per deposit, and the dead letter"
    );
    let count = |name: &str| format!("{name}_count");
    assert!(value(&count(m::COMMIT_SECONDS), &[]) >= 1.0);
    assert!(value(&count(m::APPLY_STALL_SECONDS), &[]) >= 1.0);
    let pauses = value(&count(m::CHECKPOINT_PAUSE_SECONDS), &[]);
    assert!(pauses >= 2.0, "our checkpoint and the migration's: {pauses}");
    assert!(value(&format!("{}_sum", m::CHECKPOINT_BYTES), &[]) >= checkpoint.bytes as f64);
    let target_l = [r#"instance="target""#];
    // How many deposits fall between the checkpoint and the cutover depends
    // on how fast the migration runs (on a fast run, none): the series must
    // be there; the replay rate only once something was replayed.
    let replayed = sample(&scrape, m::APPLIED, &[target_l[0], r#"mode="replay""#]).expect("target replay");
    if replayed >= 1.0 {
        assert!(sample(&scrape, m::REPLAY_RATE, &target_l).is_some());
    }
    for p in 0..PARTITIONS {
        let partition = format!(r#"partition="{p}""#);
        assert_eq!(sample(&scrape, m::POSITION_LAG, &[target_l[0], &partition]), Some(0.0));
    }

    let migration = [r#"service="balances""#, r#"strategy="MS2M""#, r#"target="target""#];
    for phase in ["checkpoint", "transfer", "restore", "replay", "cutover", "total"] {
        let phase = format!(r#"phase="{phase}""#);
        let labels: Vec<&str> = migration.iter().copied().chain([phase.as_str()]).collect();
        assert_eq!(
            sample(&scrape, &count(m::MIGRATION_PHASE_SECONDS), &labels),
            Some(1.0),
            "{phase}"
        );
    }
    assert_eq!(
        sample(&scrape, &count(m::MIGRATION_DOWNTIME_SECONDS), &migration),
        Some(1.0)
    );
    let completed: Vec<&str> = migration.iter().copied().chain([r#"outcome="completed""#]).collect();
    assert_eq!(sample(&scrape, m::MIGRATIONS, &completed), Some(1.0));

    let sink = [r#"client="sink""#];
    assert!(sample(&scrape, m::KAFKA_TX_MESSAGES, &sink).is_some_and(|n| n >= 61.0));
    assert!(sample(&scrape, m::KAFKA_RX_MESSAGES, &[r#"client="log""#]).is_some());
    assert!(sample(&scrape, m::KAFKA_BROKER_RTT_SECONDS, &sink).is_some());
    assert!(sample(&scrape, m::KAFKA_CONSUMER_LAG, &[r#"client="log""#]).is_some());
    let error = [r#"client="log""#, r#"kind="AllBrokersDown""#];
    assert!(sample(&scrape, m::KAFKA_CLIENT_ERRORS, &error).is_some_and(|n| n >= 1.0));
}
