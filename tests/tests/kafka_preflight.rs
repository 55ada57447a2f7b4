//! Fail-fast configuration: a broker or topic that cannot give the
//! promised guarantee is refused at start with a typed error, instead of
//! failing at the first commit or silently weakening the guarantee (see
//! `ms2m_kafka::preflight`).
//!
//! Tests without a suffix run in both passes of `tests/run.sh` and assert
//! what each broker must do: tansu 0.6.0 (`MS2M_TEST_BROKERS`) has no
//! EndTxn and answers DescribeConfigs, the embedded mock accepts
//! transactions and has no topic settings.

use ms2m_core::{Delivery, OutputSink};
use ms2m_kafka::{KafkaCluster, KafkaError};
use ms2m_tests::*;

/// `MS2M_TEST_BROKERS` set: the refusal must happen (tansu has no EndTxn);
/// unset: the in-process embedded broker is let through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exactly_once_is_refused_on_a_broker_without_transactions() {
    let service = unique("pf-eos");
    let cluster = connect(config(&service));
    let result = cluster.sink(Delivery::ExactlyOnce).await;
    match brokers() {
        Some(brokers) => match result {
            Err(KafkaError::TransactionsUnsupported { bootstrap, step, .. }) => {
                assert_eq!(bootstrap, brokers);
                eprintln!("refused at step: {step}");
            }
            Err(e) => panic!("expected TransactionsUnsupported from {brokers}, got: {e}"),
            Ok(_) => panic!("{brokers} (tansu 0.6.0, no EndTxn) was not refused for exactly-once"),
        },
        None => {
            let mut sink = result.expect("the in-process embedded broker allows exactly-once");
            sink.claim().await.expect("claim on the embedded broker");
        }
    }
    // At-least-once needs no transactions: allowed everywhere.
    cluster.sink(Delivery::AtLeastOnce).await.expect("at-least-once sink");
}

/// Another process reaching librdkafka's mock cluster by address cannot
/// apply the mock's workaround (a plain offset commit after each
/// transaction), so exactly-once is refused there; at-least-once is not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exactly_once_is_refused_on_a_mock_cluster_reached_by_address_on_mock() {
    let owner = connect(mock_config(&unique("pf-mock-owner")));
    let by_address =
        KafkaCluster::connect(mock_config(&unique("pf-mock")).bootstrap_servers(owner.bootstrap_servers()))
            .expect("connect by address");
    assert!(!by_address.is_embedded());
    match by_address.sink(Delivery::ExactlyOnce).await {
        Err(KafkaError::ExactlyOnceOnMockCluster { bootstrap, cluster_id }) => {
            assert_eq!(bootstrap, owner.bootstrap_servers());
            assert!(cluster_id.starts_with("mockCluster"), "{cluster_id}");
        }
        Err(e) => panic!("expected ExactlyOnceOnMockCluster, got: {e}"),
        Ok(_) => panic!("exactly-once on the mock cluster by address was not refused"),
    }
    by_address
        .sink(Delivery::AtLeastOnce)
        .await
        .expect("at-least-once on the mock by address");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_control_topic_with_more_than_one_partition_is_refused() {
    let service = unique("pf-ctl");
    let cluster = connect(config(&service));
    let topic = cluster.config().control_topic();
    cluster.create_topic(&topic, 2, &[]).await.expect("create");
    match cluster.control().await {
        Err(KafkaError::ControlTopicPartitions { topic: t, partitions }) => {
            assert_eq!((t, partitions), (topic, 2));
        }
        Err(e) => panic!("expected ControlTopicPartitions, got: {e}"),
        Ok(_) => panic!("a control topic with 2 partitions was accepted"),
    }
}

/// tansu answers DescribeConfigs: topics whose retention can delete what
/// the library relies on are refused. The embedded broker has no topic
/// settings (documented): the same topics are accepted there, without
/// waiting on a DescribeConfigs it cannot answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topics_whose_retention_can_delete_records_are_refused() {
    let service = unique("pf-ret");
    let cluster = connect(config(&service).operation_timeout(std::time::Duration::from_secs(20)));
    let week = [("cleanup.policy", "delete"), ("retention.ms", "604800000")];
    cluster
        .create_topic(&cluster.config().control_topic(), 1, &week)
        .await
        .expect("create the control topic");
    cluster
        .create_topic(&cluster.config().snapshot_topic(), 2, &week)
        .await
        .expect("create the snapshot topic");
    let control = cluster.control().await;
    let store = cluster.snapshot_store().await;
    if on_mock() {
        control.expect("the embedded broker has no topic settings to refuse");
        store.expect("the embedded broker has no topic settings to refuse");
        return;
    }
    for (what, result) in [("control", control.err()), ("snapshot", store.err())] {
        match result {
            Some(KafkaError::UnsafeTopicSetting { key, value, .. }) => {
                assert_eq!((key.as_str(), value.as_str()), ("retention.ms", "604800000"), "{what}");
            }
            Some(e) => panic!("{what} topic: expected UnsafeTopicSetting, got: {e}"),
            None => panic!("{what} topic with a 7-day retention was accepted"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topics_created_by_the_library_pass_their_own_checks() {
    let service = unique("pf-own");
    let cluster = connect(config(&service));
    cluster.control().await.expect("control topic");
    cluster.control().await.expect("control topic, existing");
    cluster.snapshot_store().await.expect("snapshot topic");
    cluster.snapshot_store().await.expect("snapshot topic, existing");
}
