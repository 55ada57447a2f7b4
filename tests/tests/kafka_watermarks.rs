//! Watermarks, lag, ordered delivery, explicit partition subsets, and a log
//! truncated below the snapshot position (`Error::LogTruncated`).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use ms2m_core::{
    Delivery, Error, Instance, InstanceConfig, MessageLog, Position, Snapshot, SnapshotStore, TopicPartition,
};
use ms2m_kafka::{KafkaError, KafkaLog};
use ms2m_tests::*;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::FutureRecord;

const TIMEOUT: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watermarks_lag_and_ordered_delivery() {
    let service = unique("wm");
    let input = unique("wm-in");
    let cluster = connect(config(&service).input_topic(&input));
    cluster.create_topic(&input, 3, &[]).await.unwrap();
    let mut values = Vec::new();
    for (p, n) in [(0, 10u64), (1, 20), (2, 30)] {
        values.extend((0..n).map(|v| (p, v)));
    }
    produce(&cluster, &input, &values).await;

    let mut log = cluster.log().await.unwrap();
    let parts = log.partitions().await.unwrap();
    assert_eq!(
        parts,
        (0..3)
            .map(|p| TopicPartition::new(input.as_str(), p))
            .collect::<Vec<_>>()
    );
    for (tp, n) in parts.iter().zip([10, 20, 30]) {
        let w = log.watermarks(tp).await.unwrap();
        assert_eq!((w.low, w.high), (0, n), "{tp}");
    }

    let start: Position = [(parts[0].clone(), 3), (parts[1].clone(), 0), (parts[2].clone(), 30)]
        .into_iter()
        .collect();
    log.seek(&start).await.unwrap();
    let lag = log.lag().await.unwrap();
    assert_eq!(lag.values().map(|l| l.lag).collect::<Vec<_>>(), vec![7, 20, 0]);
    assert_eq!(log.total_lag().await.unwrap(), 27);

    let got = poll_n(&mut log, 27).await;
    let mut per: BTreeMap<i32, Vec<i64>> = BTreeMap::new();
    for r in &got {
        per.entry(r.partition).or_default().push(r.offset);
        assert_eq!(&*r.topic, input.as_str());
        let v: u64 = std::str::from_utf8(r.payload.as_deref().unwrap())
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(v, r.offset as u64, "payload matches offset");
        assert_eq!(r.key.as_deref(), Some(format!("k{v}").as_bytes()));
    }
    assert_eq!(
        per[&0],
        (3..10).collect::<Vec<_>>(),
        "partition 0 in order from the seek offset"
    );
    assert_eq!(per[&1], (0..20).collect::<Vec<_>>(), "partition 1 in order");
    assert!(!per.contains_key(&2), "partition 2 was seeked to its end");
    // Records share one topic allocation.
    assert!(got.windows(2).all(|w| Arc::ptr_eq(&w[0].topic, &w[1].topic)));
    assert_eq!(log.total_lag().await.unwrap(), 0);
    assert!(log.poll(100, Duration::from_millis(300)).await.unwrap().is_empty());

    // New messages raise the high watermark and the lag.
    produce(&cluster, &input, &[(2, 30), (2, 31)]).await;
    let lag = log.lag().await.unwrap();
    assert_eq!(lag[&parts[2]].watermarks.high, 32);
    assert_eq!(lag[&parts[2]].lag, 2);
    let got = poll_n(&mut log, 2).await;
    assert_eq!(got.iter().map(|r| r.offset).collect::<Vec<_>>(), vec![30, 31]);

    // Seeking back discards nothing it should not and replays in order.
    log.seek(&[(parts[0].clone(), 8)].into_iter().collect()).await.unwrap();
    let got = poll_n(&mut log, 2).await;
    assert_eq!(
        got.iter().map(|r| (r.partition, r.offset)).collect::<Vec<_>>(),
        vec![(0, 8), (0, 9)]
    );
}

/// Full batches start a prefetch of the next one: small polls over a
/// backlog must still deliver every record once, in order, count only what
/// was delivered as read, and a seek must drop what a prefetch took for the
/// old assignment.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefetched_batches_keep_order_and_a_seek_drops_them() {
    let (mut log, parts) = two_partition_log("pf", 200).await;
    log.seek(&parts.iter().map(|tp| (tp.clone(), 0)).collect())
        .await
        .unwrap();

    let mut got = Vec::new();
    let deadline = Instant::now() + TIMEOUT;
    while got.len() < 150 {
        assert!(Instant::now() < deadline, "only {} of 150 records arrived", got.len());
        got.extend(log.poll(7, Duration::from_millis(200)).await.unwrap());
    }
    let per = offsets_per_partition(&got);
    for (p, offsets) in &per {
        let first_n: Vec<i64> = (0..offsets.len() as i64).collect();
        assert_eq!(offsets, &first_n, "partition {p}: every record once, in order");
    }
    // Prefetched records share one buffer per batch: each must still see
    // its own key and payload (value v at offset v, key "k{v}").
    for r in &got {
        assert_eq!(r.payload.as_deref(), Some(r.offset.to_string().as_bytes()), "{r:?}");
        assert_eq!(r.key.as_deref(), Some(format!("k{}", r.offset).as_bytes()), "{r:?}");
    }
    let delivered: Position = parts
        .iter()
        .map(|tp| (tp.clone(), per.get(&tp.partition).map_or(0, |o| o.len() as i64)))
        .collect();
    assert_eq!(
        log.next_offsets(),
        delivered,
        "prefetched records are not counted as read"
    );

    // The last poll was full, so a prefetch may be running: seek anyway.
    let start: Position = [(parts[0].clone(), 5), (parts[1].clone(), 100)].into_iter().collect();
    log.seek(&start).await.unwrap();
    let per = offsets_per_partition(&poll_n(&mut log, 195 + 100).await);
    assert_eq!(
        per[&0],
        (5..200).collect::<Vec<_>>(),
        "partition 0 from the seek offset only"
    );
    assert_eq!(
        per[&1],
        (100..200).collect::<Vec<_>>(),
        "partition 1 from the seek offset only"
    );
    assert_eq!(log.total_lag().await.unwrap(), 0);
}

/// A seek to where the log already stands with nothing polled since (a
/// migration target seeks as soon as it reads the snapshot's header, then
/// again when the instance is built) delivers each record once from there;
/// once something was polled, a seek to the same position rewinds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeated_seek_delivers_once_and_a_seek_after_a_poll_rewinds() {
    let (mut log, parts) = two_partition_log("rs", 50).await;
    let start: Position = [(parts[0].clone(), 10), (parts[1].clone(), 0)].into_iter().collect();
    let expected = |per: &BTreeMap<i32, Vec<i64>>| {
        assert_eq!(per[&0], (10..50).collect::<Vec<_>>(), "partition 0 once, from 10");
        assert_eq!(per[&1], (0..50).collect::<Vec<_>>(), "partition 1 once, from 0");
    };

    log.seek(&start).await.unwrap();
    // Give librdkafka time to fetch ahead before the second seek (what is
    // asserted holds whether it did or not).
    tokio::time::sleep(Duration::from_millis(200)).await;
    log.seek(&start).await.unwrap();
    expected(&offsets_per_partition(&poll_n(&mut log, 90).await));
    assert!(log.poll(100, Duration::from_millis(300)).await.unwrap().is_empty());

    log.seek(&start).await.unwrap();
    expected(&offsets_per_partition(&poll_n(&mut log, 90).await));
}

/// Records name the topic they were read from, whether the assignment
/// spans one topic (the name is then not read per message) or several,
/// in polls of one batch and in prefetched batches (polls of 2).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_name_their_topic_with_one_or_two_topics_assigned() {
    let service = unique("tp");
    let (a, b) = (unique("tp-a"), unique("tp-b"));
    let cluster = connect(config(&service).input_topic(&a).input_topic(&b));
    cluster.create_topic(&a, 1, &[]).await.unwrap();
    cluster.create_topic(&b, 1, &[]).await.unwrap();
    produce(&cluster, &a, &[(0, 1), (0, 2)]).await;
    produce(&cluster, &b, &[(0, 101), (0, 102), (0, 103)]).await;
    let mut log = cluster.log().await.unwrap();
    let parts = log.partitions().await.unwrap();
    for (assigned, max) in [
        (&parts[..], 1000),
        (&parts[1..], 1000),
        (&parts[..], 2),
        (&parts[1..], 2),
    ] {
        log.seek(&assigned.iter().map(|tp| (tp.clone(), 0)).collect())
            .await
            .unwrap();
        let expected = if assigned.len() == 2 { 5 } else { 3 };
        for r in poll_n_by(&mut log, expected, max).await {
            let v: u64 = std::str::from_utf8(r.payload.as_deref().unwrap())
                .unwrap()
                .parse()
                .unwrap();
            let topic = if v > 100 { &b } else { &a };
            assert_eq!(&*r.topic, topic.as_str(), "value {v}");
        }
    }
}

/// Records carry their Kafka headers by default, and none with
/// `KafkaConfig::input_headers(false)`; key and payload either way; in
/// polls of one batch and in prefetched batches (polls of 2).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn input_headers_are_read_unless_turned_off() {
    let input = unique("hd-in");
    let base = connect(config(&unique("hd")).input_topic(&input));
    base.create_topic(&input, 1, &[]).await.unwrap();
    let producer = producer(&base);
    for i in 0..5 {
        let (value, trace) = (format!("v{i}"), format!("t-{i}"));
        let headers = OwnedHeaders::new().insert(Header {
            key: "trace",
            value: Some(&trace),
        });
        let record = FutureRecord::to(&input)
            .partition(0)
            .key("k")
            .payload(&value)
            .headers(headers);
        producer.send(record, TIMEOUT).await.map_err(|(e, _)| e).unwrap();
    }
    for (read, max) in [(true, 1000), (false, 1000), (true, 2), (false, 2)] {
        let cluster = base.for_service(config(&unique("hd")).input_topic(&input).input_headers(read));
        let mut log = cluster.log().await.unwrap();
        let parts = log.partitions().await.unwrap();
        log.seek(&parts.iter().map(|tp| (tp.clone(), 0)).collect())
            .await
            .unwrap();
        for r in poll_n_by(&mut log, 5, max).await {
            let i = r.offset;
            let expected = if read {
                vec![("trace".to_string(), Bytes::from(format!("t-{i}")))]
            } else {
                Vec::new()
            };
            assert_eq!(r.headers, expected, "input_headers({read}), polls of {max}, offset {i}");
            let value = format!("v{i}");
            assert_eq!(
                (r.key.as_deref(), r.payload.as_deref()),
                (Some(&b"k"[..]), Some(value.as_bytes()))
            );
        }
    }
}

fn offsets_per_partition(records: &[ms2m_core::Record]) -> BTreeMap<i32, Vec<i64>> {
    let mut per: BTreeMap<i32, Vec<i64>> = BTreeMap::new();
    for r in records {
        per.entry(r.partition).or_default().push(r.offset);
    }
    per
}

/// A log over a new two-partition topic holding `per_partition` records in
/// each partition, and its partitions.
async fn two_partition_log(prefix: &str, per_partition: u64) -> (KafkaLog, Vec<TopicPartition>) {
    let service = unique(prefix);
    let input = unique(&format!("{prefix}-in"));
    let cluster = connect(config(&service).input_topic(&input));
    cluster.create_topic(&input, 2, &[]).await.unwrap();
    let values: Vec<(i32, u64)> = (0..2).flat_map(|p| (0..per_partition).map(move |v| (p, v))).collect();
    produce(&cluster, &input, &values).await;
    let mut log = cluster.log().await.unwrap();
    let parts = log.partitions().await.unwrap();
    (log, parts)
}

async fn poll_n(log: &mut KafkaLog, n: usize) -> Vec<ms2m_core::Record> {
    poll_n_by(log, n, 1000).await
}

/// `n` records in polls of at most `max`: a `max` below `n` makes the
/// first full poll start a prefetch, which takes the rest.
async fn poll_n_by(log: &mut KafkaLog, n: usize, max: usize) -> Vec<ms2m_core::Record> {
    let deadline = Instant::now() + TIMEOUT;
    let mut got = Vec::new();
    while got.len() < n {
        assert!(Instant::now() < deadline, "only {} of {n} records arrived", got.len());
        got.extend(log.poll(max, Duration::from_millis(200)).await.unwrap());
    }
    assert_eq!(got.len(), n, "no more than the expected records");
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn explicit_partition_subset() {
    let service = unique("sub");
    let input = unique("sub-in");
    let cluster = connect(config(&service).input_partitions([TopicPartition::new(input.as_str(), 1)]));
    cluster.create_topic(&input, 2, &[]).await.unwrap();
    produce(&cluster, &input, &[(0, 1), (1, 2), (0, 3), (1, 4)]).await;
    let mut log = cluster.log().await.unwrap();
    let parts = log.partitions().await.unwrap();
    assert_eq!(parts, vec![TopicPartition::new(input.as_str(), 1)]);
    log.seek(&[(parts[0].clone(), 0)].into_iter().collect()).await.unwrap();
    let got = poll_n(&mut log, 2).await;
    assert!(got.iter().all(|r| r.partition == 1));
}

/// How a test truncates the input log below a snapshot's position.
#[derive(Clone, Copy, Debug)]
enum Truncation {
    /// Overflow the embedded mock's ~5 MiB per-partition limit.
    Eviction,
    /// DeleteRecords on the real broker in `MS2M_TEST_BROKERS`.
    DeleteRecords,
}

/// Makes partition 0 of `topic` start above offset 0; its new low watermark.
async fn truncate_partition0(cluster: &ms2m_kafka::KafkaCluster, topic: &str, how: Truncation) -> i64 {
    match how {
        Truncation::Eviction => {
            let big = "x".repeat(700 * 1024);
            let producer = producer(cluster);
            for i in 0..12 {
                let key = format!("big{i}");
                producer
                    .send(
                        rdkafka::producer::FutureRecord::to(topic)
                            .partition(0)
                            .key(&key)
                            .payload(&big),
                        Duration::from_secs(10),
                    )
                    .await
                    .map_err(|(e, _)| e)
                    .unwrap();
            }
        }
        Truncation::DeleteRecords => {
            let admin: rdkafka::admin::AdminClient<rdkafka::client::DefaultClientContext> =
                rdkafka::ClientConfig::new()
                    .set("bootstrap.servers", cluster.bootstrap_servers())
                    .create()
                    .unwrap();
            let mut tpl = rdkafka::TopicPartitionList::new();
            tpl.add_partition_offset(topic, 0, rdkafka::Offset::Offset(2)).unwrap();
            let r = admin
                .delete_records(&tpl, &rdkafka::admin::AdminOptions::new())
                .await
                .expect("delete records");
            assert!(r.elements().iter().all(|e| e.error().is_ok()), "{r:?}");
        }
    }
    let low = end_low(cluster, topic).await;
    assert!(
        low > 1,
        "{how:?} left the log starting at {low}: the test needs offset 1 gone"
    );
    low
}

async fn end_low(cluster: &ms2m_kafka::KafkaCluster, topic: &str) -> i64 {
    let mut log = cluster
        .for_service(config("probe").input_topic(topic))
        .log()
        .await
        .unwrap();
    log.watermarks(&TopicPartition::new(topic, 0)).await.unwrap().low
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncated_log_fails_recovery_loudly_on_mock() {
    truncated_log_fails_recovery_loudly(Truncation::Eviction).await;
}

/// tansu 0.6.0's sqlite engine panics on DeleteRecords (`todo!()`), which
/// kills its storage task: only for a broker known to support it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a broker with DeleteRecords (not tansu 0.6.0): MS2M_TEST_BROKERS=host:port MS2M_TEST_DELETE_RECORDS=1"]
async fn truncated_log_fails_recovery_loudly_with_delete_records() {
    required_env(BROKERS_ENV, "a real broker that supports DeleteRecords (host:port)");
    required_env(
        "MS2M_TEST_DELETE_RECORDS",
        "confirmation (=1) that the broker supports DeleteRecords",
    );
    truncated_log_fails_recovery_loudly(Truncation::DeleteRecords).await;
}

async fn truncated_log_fails_recovery_loudly(how: Truncation) {
    let service = unique("trunc");
    let input = unique("trunc-in");
    let output = unique("trunc-out");
    let base = match how {
        Truncation::Eviction => mock_config(&service),
        Truncation::DeleteRecords => config(&service),
    };
    let cluster = connect(base.input_topic(&input));
    cluster.create_topic(&input, 1, &[]).await.unwrap();
    cluster.create_topic(&output, 1, &[]).await.unwrap();
    produce(&cluster, &input, &[(0, 1), (0, 2), (0, 3), (0, 4)]).await;
    let low = truncate_partition0(&cluster, &input, how).await;

    // A snapshot that needs offset 1, which is gone.
    let backends = cluster.backends(Delivery::AtLeastOnce).await.unwrap();
    let tp = TopicPartition::new(input.as_str(), 0);
    let state = Bytes::from(ms2m_core::ServiceState::snapshot(&Summer::default()).unwrap());
    let snap = Snapshot::seal(
        <Summer as ms2m_core::StatefulService>::NAME,
        1,
        [(tp.clone(), 1)].into_iter().collect(),
        "old",
        state,
    );
    backends.store.put(&snap.encode().unwrap()).await.unwrap();
    let err = Instance::<Summer, _, _, _>::recover(
        backends,
        InstanceConfig::new("i").output_topic(output.as_str()),
        &*ms2m_core::no_progress(),
    )
    .await
    .unwrap_err();
    match err {
        Error::LogTruncated {
            tp: t,
            needed,
            earliest,
            missing,
        } => {
            assert_eq!((t, needed, earliest, missing), (tp.clone(), 1, low, low - 1));
        }
        other => panic!("expected LogTruncated, got {other:?}"),
    }

    // A log seeked below the start reports the truncation instead of jumping.
    let mut log = cluster.log().await.unwrap();
    log.seek(&[(tp, 0)].into_iter().collect()).await.unwrap();
    let deadline = Instant::now() + TIMEOUT;
    loop {
        assert!(Instant::now() < deadline, "no truncation error");
        match log.poll(10, Duration::from_millis(200)).await {
            Ok(records) => assert!(records.is_empty(), "delivered {records:?} past a gap"),
            Err(KafkaError::LogTruncated { .. }) => break,
            Err(e) => panic!("unexpected error {e:?}"),
        }
    }
}
