//! The exactly-once sink (transactional producer) across crashes.
//!
//! The embedded mock cluster runs the transactional protocol
//! (`init_transactions`, `send_offsets_to_transaction`, `commit_transaction`)
//! but enforces none of it: aborted records stay visible, transactional
//! offset commits are dropped, zombies are not fenced. So on the mock this
//! test crashes at transaction boundaries (after a commit), where
//! exactly-once must hold with any broker, and checks that no open
//! transaction's outputs are needed to recover. The mid-transaction crash,
//! where only a real transaction coordinator can abort the zombie's
//! outputs, runs only against a real Kafka given in
//! `MS2M_TEST_TXN_BROKERS` (tansu 0.6.0 has no EndTxn): it is `#[ignore]`d,
//! run it with `--ignored` (it fails if the variable is unset). The tests on
//! the mock's transactions end in `_on_mock` and always run on an embedded
//! mock cluster of their own.

use std::collections::BTreeMap;
use std::time::Duration;

use ms2m_core::{Delivery, Instance, InstanceConfig, OutputSink};
use ms2m_kafka::{KafkaCluster, KafkaConfig};
use ms2m_tests::*;
use rand::Rng;

const PARTITIONS: i32 = 2;

async fn crash_rounds(cluster: &KafkaCluster, input: &str, output: &str, mid_transaction: bool) -> Vec<(i32, u64)> {
    let mut rng = rand::thread_rng();
    let mut all = Vec::new();
    for round in 0..4 {
        let batch = random_values(rng.gen_range(100..300), PARTITIONS);
        produce(cluster, input, &batch).await;
        all.extend(batch);
        let end = end_position(cluster, input, PARTITIONS).await;
        let config = InstanceConfig::new(format!("eos{round}"))
            .output_topic(output)
            .snapshot_every(Some(rng.gen_range(40..150)))
            .snapshot_interval(None)
            .keep_snapshots(2)
            .commit_every(rng.gen_range(10..60), Duration::from_secs(3600))
            .poll(rng.gen_range(5..50), Duration::from_millis(100));
        let backends = cluster.backends(Delivery::ExactlyOnce).await.unwrap();
        assert_eq!(backends.sink.delivery(), Delivery::ExactlyOnce);
        let mut instance = Instance::<Summer, _, _, _>::recover(backends, config, &*ms2m_core::no_progress())
            .await
            .expect("recover");
        let crash_at = rng.gen_range(instance.position().total()..=end.total());
        while instance.position().total() < crash_at {
            instance.step().await.expect("step");
        }
        if !mid_transaction {
            // Crash right after a commit: no transaction is open.
            instance.commit().await.unwrap();
        }
        eprintln!(
            "round {round}: crashed at {} ({:?})",
            instance.position().total(),
            instance.stats()
        );
        drop(instance.into_parts());
    }
    let end = end_position(cluster, input, PARTITIONS).await;
    let backends = cluster.backends(Delivery::ExactlyOnce).await.unwrap();
    let mut instance = Instance::<Summer, _, _, _>::recover(
        backends,
        InstanceConfig::new("eos-final").output_topic(output),
        &*ms2m_core::no_progress(),
    )
    .await
    .unwrap();
    run_until(&mut instance, &end, Duration::from_secs(60)).await;
    instance.shutdown().await.unwrap();
    assert_eq!(
        instance.state(),
        &reference_fold(&all),
        "state equals the reference fold"
    );
    all
}

async fn assert_exactly_once(cluster: &KafkaCluster, input: &str, output: &str) {
    let end = end_position(cluster, input, PARTITIONS).await;
    let outs = read_outputs(cluster, output, 1).await;
    let mut seen: BTreeMap<(i32, i64), u32> = BTreeMap::new();
    for o in &outs {
        *seen.entry((o.p, o.o)).or_default() += 1;
    }
    let dups: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).collect();
    assert!(dups.is_empty(), "duplicated outputs: {dups:?}");
    for (tp, high) in end.iter() {
        for o in 0..high {
            assert!(seen.contains_key(&(tp.partition, o)), "output of {tp}@{o} missing");
        }
    }
    assert_eq!(outs.len() as i64, end.total());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exactly_once_across_crashes_at_commit_boundaries_on_mock() {
    let service = unique("eos");
    let input = unique("eos-in");
    let output = unique("eos-out");
    let cluster = connect(mock_config(&service).input_topic(&input).snapshot_partitions(4));
    cluster.create_topic(&input, PARTITIONS, &[]).await.unwrap();
    cluster.create_topic(&output, 1, &[]).await.unwrap();
    crash_rounds(&cluster, &input, &output, false).await;
    assert_exactly_once(&cluster, &input, &output).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transactional_sink_commits_position_and_aborts_on_mock() {
    let service = unique("txn");
    let input = unique("txn-in");
    let output = unique("txn-out");
    let cluster = connect(mock_config(&service).input_topic(&input));
    cluster.create_topic(&input, 1, &[]).await.unwrap();
    cluster.create_topic(&output, 1, &[]).await.unwrap();
    let mut sink = cluster.sink(Delivery::ExactlyOnce).await.unwrap();
    assert_eq!(sink.committed().await.unwrap(), None);
    sink.claim().await.unwrap();
    let record = |n: u64| out_record(&output, n);
    sink.send(record(0)).await.unwrap();
    let pos: ms2m_core::Position = [(ms2m_core::TopicPartition::new(input.as_str(), 0), 1)]
        .into_iter()
        .collect();
    sink.commit(&pos).await.unwrap();
    assert_eq!(sink.committed().await.unwrap(), Some(pos.clone()));
    // Abort with and without an open transaction.
    sink.abort().await.unwrap();
    sink.send(record(1)).await.unwrap();
    sink.abort().await.unwrap();
    assert_eq!(sink.committed().await.unwrap(), Some(pos));
    // A second sink on the same transactional id can claim and commit.
    let mut other = cluster.sink(Delivery::ExactlyOnce).await.unwrap();
    other.claim().await.unwrap();
    other.commit(&ms2m_core::Position::new()).await.unwrap();
}

/// Mid-transaction crashes: needs a broker with working transactions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a Kafka broker with transactions: MS2M_TEST_TXN_BROKERS=host:port"]
async fn exactly_once_across_mid_transaction_crashes_on_real_kafka() {
    let brokers = required_env("MS2M_TEST_TXN_BROKERS", "a Kafka broker with transactions (host:port)");
    let service = unique("eos-real");
    let input = unique("eos-real-in");
    let output = unique("eos-real-out");
    let cluster = connect(
        KafkaConfig::new(service.as_str())
            .bootstrap_servers(brokers)
            .input_topic(&input)
            .operation_timeout(Duration::from_secs(30)),
    );
    cluster.create_topic(&input, PARTITIONS, &[]).await.unwrap();
    cluster.create_topic(&output, 1, &[]).await.unwrap();
    crash_rounds(&cluster, &input, &output, true).await;
    assert_exactly_once(&cluster, &input, &output).await;
}
