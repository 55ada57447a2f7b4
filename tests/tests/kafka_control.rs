//! The control channel on a topic: publish, readers from the start or from
//! now, and the history a restarted coordinator reads.

use std::time::Duration;

use ms2m_core::{ControlBody, ControlChannel, ControlMessage, ControlReader, Role};
use ms2m_kafka::KafkaError;
use ms2m_tests::*;

fn message(migration: &str, reason: &str) -> ControlMessage {
    ControlMessage {
        service: "svc".into(),
        migration_id: migration.into(),
        from: Role::Coordinator,
        sent_at_ms: 1,
        body: ControlBody::Aborted { reason: reason.into() },
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_read_and_history() {
    let service = unique("ctl");
    let cluster = connect(config(&service));
    let control = cluster.control().await.unwrap();
    assert_eq!(control.topic(), format!("{service}.control"));
    assert!(control.history().await.unwrap().is_empty());

    let first = message("m1", "a");
    control.publish(&first).await.unwrap();
    let mut from_now = control.reader(false).await.unwrap();
    let mut from_start = control.reader(true).await.unwrap();
    let second = message("m1", "b");
    control.publish(&second).await.unwrap();

    let t = Duration::from_secs(10);
    assert_eq!(from_start.next(t).await.unwrap(), Some(first.clone()));
    assert_eq!(from_start.next(t).await.unwrap(), Some(second.clone()));
    assert_eq!(from_now.next(t).await.unwrap(), Some(second.clone()));
    assert_eq!(from_now.next(Duration::from_millis(300)).await.unwrap(), None);
    assert_eq!(control.history().await.unwrap(), vec![first, second]);
}

/// One undecodable record (garbage, or a `ControlBody` variant written by a
/// newer version during a rolling upgrade) once made `history()` and every
/// reader fail for every party. It is skipped, logged and counted; the
/// valid records around it are read in order and still decide ownership.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn undecodable_control_records_are_skipped_and_counted() {
    let service = unique("ctl-bad");
    let cluster = connect(config(&service));
    let control = cluster.control().await.unwrap();
    assert_eq!(control.skipped_records(), 0);

    let position: ms2m_core::Position = [(ms2m_core::TopicPartition::new("in", 0), 7)].into_iter().collect();
    let resume = ControlMessage {
        service: "svc".into(),
        migration_id: "m1".into(),
        from: Role::Coordinator,
        sent_at_ms: 1,
        body: ControlBody::Resume {
            owner: "a".into(),
            epoch: 1,
        },
    };
    let prepare = ControlMessage {
        service: "svc".into(),
        migration_id: "m2".into(),
        from: Role::Coordinator,
        sent_at_ms: 2,
        body: ControlBody::Prepare {
            source: "a".into(),
            target: "b".into(),
            digest_policy: Default::default(),
            strategy: None,
        },
    };
    let takeover = ControlMessage {
        service: "svc".into(),
        migration_id: "m2".into(),
        from: Role::Target,
        sent_at_ms: 3,
        body: ControlBody::Takeover {
            owner: "b".into(),
            epoch: 2,
            position,
        },
    };
    // Valid JSON, but a body variant this version does not know.
    let mut newer = serde_json::to_value(&prepare).unwrap();
    newer["body"] = serde_json::json!({ "Handback": { "owner": "c", "epoch": 9 } });
    let newer = serde_json::to_vec(&newer).unwrap();
    assert!(
        ControlMessage::from_bytes(&newer).is_err(),
        "the test record must not decode"
    );

    // One record at a time, each acknowledged before the next: the order on
    // the partition is the order below.
    let raw = producer(&cluster);
    let produce_raw = |payload: Vec<u8>| {
        let raw = &raw;
        let topic = control.topic().to_string();
        async move {
            raw.send(
                rdkafka::producer::FutureRecord::to(&topic)
                    .partition(0)
                    .key("svc/raw")
                    .payload(&payload),
                Duration::from_secs(10),
            )
            .await
            .map_err(|(e, _)| e)
            .expect("produce a raw control record");
        }
    };
    control.publish(&resume).await.unwrap();
    produce_raw(b"\x00not json {".to_vec()).await;
    control.publish(&prepare).await.unwrap();
    produce_raw(newer).await;
    control.publish(&takeover).await.unwrap();
    let valid = vec![resume, prepare, takeover];

    assert_eq!(control.history().await.unwrap(), valid);
    assert_eq!(control.skipped_records(), 2);

    let mut from_start = control.reader(true).await.unwrap();
    let t = Duration::from_secs(10);
    for expected in &valid {
        assert_eq!(from_start.next(t).await.unwrap().as_ref(), Some(expected));
    }
    assert_eq!(from_start.next(Duration::from_millis(300)).await.unwrap(), None);

    let owner = ms2m_core::migration::current_owner(&control, "svc")
        .await
        .unwrap()
        .expect("the takeover names an owner");
    assert_eq!((owner.instance_id.as_str(), owner.epoch), ("b", 2));

    // The same two records, read three times: counted once each.
    assert_eq!(control.skipped_records(), 2);
}

/// Concurrent `history()` calls share reads (a call that waited behind
/// another read returns that read's result when it began after the call),
/// and still each returns every record acknowledged before it was called:
/// each of 8 tasks publishes its own record, then reads the history.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_history_reads_each_see_every_record_published_before_them() {
    let service = unique("ctl-shared");
    let cluster = connect(config(&service));
    let control = std::sync::Arc::new(cluster.control().await.unwrap());
    control.publish(&message("m0", "before")).await.unwrap();
    let mut calls = tokio::task::JoinSet::new();
    for round in 0..3 {
        for i in 0..8 {
            let control = std::sync::Arc::clone(&control);
            calls.spawn(async move {
                let own = message(&format!("m{round}-{i}"), "own");
                control.publish(&own).await.unwrap();
                (own, control.history().await.unwrap())
            });
        }
        while let Some(call) = calls.join_next().await {
            let (own, history) = call.unwrap();
            assert!(
                history.contains(&own),
                "{} missing from a history read after it was published",
                own.migration_id
            );
        }
    }
    assert_eq!(control.history().await.unwrap().len(), 1 + 3 * 8);
}

/// The embedded broker keeps about 5 MiB per partition and drops the
/// oldest records past that: a control topic that lost records is refused
/// by a channel that had not read them, rather than folded without them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_history_that_lost_its_oldest_records_is_refused_on_mock() {
    let cluster = connect(mock_config(&unique("ctl-evicted")));
    let control = cluster.control().await.expect("control channel");
    let big = "x".repeat(700 * 1024);
    for i in 0..10 {
        control
            .publish(&message(&format!("m{i}"), &big))
            .await
            .expect("publish");
    }
    let fresh = cluster.control().await.expect("control channel");
    match fresh.history().await {
        Err(KafkaError::ControlHistoryTruncated { topic, from, earliest }) => {
            assert_eq!((topic.as_str(), from), (control.topic(), 0));
            assert!(earliest > 0, "{earliest}");
        }
        Err(e) => panic!("expected ControlHistoryTruncated, got: {e}"),
        Ok(h) => panic!("a history missing its first records was read: {} record(s)", h.len()),
    }
}

/// tansu 0.6.0's retention sweep (at each start and every 10 minutes)
/// deletes every record of a `cleanup.policy=delete` topic whose
/// `retention.ms` is `-1`: each record's age exceeds -1. A control topic
/// made that way lost its ownership records in the middle of long runs.
/// The library creates the control topic with `retention.ms = i64::MAX`
/// (`ms2m_kafka::preflight::RETENTION_FOREVER_MS`). Here a `-1` topic
/// beside it shows the sweep ran (its history empties); the library's
/// topic still holds every record; and a channel that had read the `-1`
/// topic refuses it now (`ControlTopicReset`) instead of taking the empty
/// topic for a new history.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "restarts the shared tansu and waits up to 120 s for its retention sweep: run alone after the tansu pass of tests/run.sh"]
async fn the_history_outlives_the_brokers_retention_sweep_on_tansu() {
    assert!(
        tansu_restartable(),
        "needs the tansu of tests/broker.sh in MS2M_TEST_BROKERS (it restarts it)"
    );
    let ours = connect(config(&unique("ctl-kept")));
    let swept = connect(config(&unique("ctl-swept")));
    let minus_one = [
        ("cleanup.policy", "delete"),
        ("retention.ms", "-1"),
        ("retention.bytes", "-1"),
    ];
    let topic = swept.config().control_topic();
    swept.create_topic(&topic, 1, &minus_one).await.expect("create");
    let records: Vec<ControlMessage> = (0..20).map(|i| message(&format!("m{i}"), "kept")).collect();
    let mut channels = Vec::new();
    for cluster in [&ours, &swept] {
        let control = cluster.control().await.expect("control channel");
        for m in &records {
            control.publish(m).await.expect("publish");
        }
        assert_eq!(control.history().await.expect("history"), records);
        channels.push(control);
    }
    let had_read_swept = channels.pop().expect("the -1 topic's channel");

    tansu_restart().expect("restart tansu (tests/broker.sh restart)");

    // A fresh channel each time: one channel reads only what it has not.
    let history = |cluster: &ms2m_kafka::KafkaCluster| {
        let cluster = cluster.clone();
        async move { cluster.control().await?.history().await }
    };
    let (history, swept, ours, had_read_swept) = (&history, &swept, &ours, &had_read_swept);
    eventually("tansu's sweep emptied the `retention.ms=-1` topic", || async move {
        match history(swept).await {
            // tansu reports an emptied partition as 0..0.
            Ok(h) if h.is_empty() => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    let kept = eventually("the library's topic was read", || async move {
        history(ours).await.map_err(|e| format!("{e:?}"))
    })
    .await;
    assert_eq!(kept, records);
    let reset = eventually(
        "the channel that had read the emptied topic refused it",
        || async move {
            match had_read_swept.history().await {
                Err(KafkaError::ControlTopicReset { read, end, .. }) => Ok((read, end)),
                Ok(h) => panic!(
                    "an emptied control topic was read as a history of {} record(s)",
                    h.len()
                ),
                Err(e) => Err(format!("{e:?}")),
            }
        },
    )
    .await;
    assert_eq!(reset, (20, 0));
}

/// `attempt`'s value once it succeeds, retried every 200 ms while the
/// clients reconnect to a restarted broker; fails after 120 s with the
/// last attempt's error.
async fn eventually<T, F, Fut>(what: &str, mut attempt: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, String>>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    loop {
        match attempt().await {
            Ok(value) => return value,
            Err(last) => assert!(
                tokio::time::Instant::now() < deadline,
                "{what} within 120 s; last read: {last}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
