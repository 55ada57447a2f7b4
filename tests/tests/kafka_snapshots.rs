//! The Kafka snapshot store: chunked round trips (32 MiB on the mock, at
//! least 256 MiB on a real broker), retention, manifests written last,
//! and corrupt or missing chunks detected so recovery falls back to an
//! older snapshot.

use std::time::{Duration, Instant};

use bytes::Bytes;
use ms2m_core::snapshot::EncodedSnapshot;
use ms2m_core::store::{fetch_and_restore, load_newest_valid, retain_newest, store_frozen};
use ms2m_core::{
    BackendError, ErrorKind, Frozen, Position, ServiceState, Snapshot, SnapshotHeader, SnapshotId, SnapshotStore,
    StatefulService, TopicPartition,
};
use ms2m_kafka::KafkaSnapshotStore;
use ms2m_tests::*;
use rand::RngCore;

fn encoded(state: Bytes, offset: i64) -> EncodedSnapshot {
    let position: Position = [(TopicPartition::new("in", 0), offset)].into_iter().collect();
    Snapshot::seal(Summer::NAME, Summer::SCHEMA_VERSION, position, "test", state)
        .encode()
        .unwrap()
}

fn random_bytes(len: usize) -> Bytes {
    let mut v = vec![0u8; len];
    rand::thread_rng().fill_bytes(&mut v);
    Bytes::from(v)
}

async fn round_trip(store: &KafkaSnapshotStore, len: usize) {
    let snap = encoded(random_bytes(len), 1);
    let started = Instant::now();
    let id = store.put(&snap).await.unwrap();
    let put = started.elapsed();
    let started = Instant::now();
    let back = store.get(id).await.unwrap();
    let get = started.elapsed();
    eprintln!("{len} bytes: put {put:?}, get {get:?}");
    assert_eq!(back.len(), snap.len());
    assert!(back == snap.to_bytes(), "reassembled bytes differ");
    let decoded = Snapshot::decode(back).unwrap();
    assert_eq!(decoded.state, snap.state);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunked_round_trip_and_retention() {
    let service = unique("snap");
    let cluster = connect(config(&service).snapshot_chunk_size(64 * 1024).snapshot_partitions(5));
    let store = cluster.snapshot_store().await.unwrap();
    assert_eq!(store.partitions(), 5);

    // Empty store, a tiny snapshot, one of exactly a chunk, one of many chunks.
    assert!(store.list().await.unwrap().is_empty());
    round_trip(&store, 10).await;
    round_trip(&store, 64 * 1024 - 100).await;
    round_trip(&store, 3 * 1024 * 1024 + 17).await;
    let ids = store.list().await.unwrap();
    assert_eq!(ids, vec![1, 2, 3]);
    let manifest = store.manifest(3).await.unwrap();
    assert_eq!(manifest.chunks.len(), (manifest.total_len as usize).div_ceil(64 * 1024));
    assert!(
        manifest.chunks.iter().all(|c| c.0 != 0),
        "chunks avoid the manifest partition"
    );
    let used: std::collections::BTreeSet<i32> = manifest.chunks.iter().map(|c| c.0).collect();
    assert_eq!(used.len(), 4, "chunks spread over every chunk partition");

    // Retention keeps the newest K; a deleted snapshot is gone for a fresh store too.
    assert_eq!(retain_newest(&store, 2).await.unwrap(), 1);
    assert_eq!(store.list().await.unwrap(), vec![2, 3]);
    let err = store.get(1).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotFound);
    let fresh = cluster.snapshot_store().await.unwrap();
    assert_eq!(fresh.list().await.unwrap(), vec![2, 3]);
    // Ids keep growing after deletions.
    let id = fresh.put(&encoded(random_bytes(100), 2)).await.unwrap();
    assert_eq!(id, 4);
}

/// A big snapshot: 32 MiB in the default layout on the mock (64
/// partitions × ~5 MiB), 256 MiB on a real broker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn big_snapshot_round_trip() {
    let service = unique("big");
    let cluster = connect(config(&service).operation_timeout(Duration::from_secs(120)));
    let store = cluster.snapshot_store().await.unwrap();
    let len = if on_mock() { 32 << 20 } else { 256 << 20 };
    round_trip(&store, len).await;
}

/// A state of about `bytes` encoded bytes.
fn summer_of(bytes: usize) -> Summer {
    let mut s = Summer::default();
    for p in 0..(bytes / 12) as i32 {
        s.partitions.entry(p).or_default().push(p as u64 * 7919);
    }
    s
}

/// Writes `state` frozen and streamed, at position `in/0@offset`; the id,
/// the position and the state's encoded length.
async fn put_streamed_summer(store: &KafkaSnapshotStore, state: &Summer, offset: i64) -> (SnapshotId, Position, u64) {
    let position: Position = [(TopicPartition::new("in", 0), offset)].into_iter().collect();
    let header = SnapshotHeader::unsealed(Summer::NAME, Summer::SCHEMA_VERSION, position.clone(), "test");
    let (id, state_len) = store_frozen(store, Frozen::new(state.clone()), header).await.unwrap();
    (id, position, state_len)
}

/// A frozen state written as it is encoded (`put_streamed`: chunk 0, the
/// envelope's prefix, written last) reads back whole and streamed, and a
/// whole snapshot reads back streamed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streamed_snapshots_round_trip() {
    let service = unique("streamed");
    let cluster = connect(config(&service).snapshot_chunk_size(64 * 1024).snapshot_partitions(5));
    let store = cluster.snapshot_store().await.unwrap();
    let state = summer_of(3 << 20);
    let (id, position, state_len) = put_streamed_summer(&store, &state, 42).await;

    let whole = Snapshot::decode(store.get(id).await.unwrap()).unwrap();
    assert_eq!(whole.header.position, position);
    assert_eq!(whole.state.len() as u64, state_len);
    assert_eq!(Summer::restore(1, &whole.state).unwrap(), state);
    let manifest = store.manifest(id).await.unwrap();
    assert!(manifest.chunks.len() > 40, "{} chunks", manifest.chunks.len());
    assert!(
        manifest.chunks.iter().all(|c| c.2 as usize <= 64 * 1024),
        "chunks within the chunk size"
    );

    let loaded = fetch_and_restore::<Summer, _>(&store, Summer::NAME, id).await.unwrap();
    assert_eq!(loaded.state, state);
    assert_eq!(loaded.header.position, position);

    let older = store
        .put(&encoded(Bytes::from(ServiceState::snapshot(&state).unwrap()), 7))
        .await
        .unwrap();
    let loaded = fetch_and_restore::<Summer, _>(&store, Summer::NAME, older)
        .await
        .unwrap();
    assert_eq!(loaded.state, state);
}

/// A streamed restore of a snapshot larger than the reader's window (8 MiB
/// past the chunk the decoder awaits): partitions whose next chunk is
/// further ahead are unassigned and assigned again at that chunk, and the
/// prefix (chunk 0, written last, after chunk 40 of its partition) is
/// still found.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streamed_restore_beyond_the_read_window() {
    let service = unique("window");
    let cluster = connect(config(&service).snapshot_chunk_size(256 * 1024).snapshot_partitions(41));
    let store = cluster.snapshot_store().await.unwrap();
    let state = summer_of(12 << 20);
    let (id, position, _) = put_streamed_summer(&store, &state, 7).await;
    let chunks = store.manifest(id).await.unwrap().chunks.len();
    assert!(
        chunks > 32 + 8,
        "{chunks} chunks: more than the window and one round of partitions"
    );

    let loaded = fetch_and_restore::<Summer, _>(&store, Summer::NAME, id).await.unwrap();
    assert_eq!(loaded.state, state);
    assert_eq!(loaded.header.position, position);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_or_missing_chunks_fall_back_to_an_older_snapshot() {
    let service = unique("corrupt");
    let cluster = connect(config(&service).snapshot_chunk_size(1024).snapshot_partitions(3));
    let store = cluster.snapshot_store().await.unwrap();
    let state = |n: u64| {
        let mut s = Summer::default();
        s.partitions.entry(0).or_default().push(n);
        s
    };
    let put = |s: Summer, offset: i64| {
        let store = &store;
        async move {
            store
                .put(&encoded(Bytes::from(ServiceState::snapshot(&s).unwrap()), offset))
                .await
                .unwrap()
        }
    };
    let a = put(state(1), 10).await;
    let b = put(state(2), 20).await;
    let c = put(state(3), 30).await;

    // c: a chunk's checksum does not match.
    doctor_manifest(&cluster, &store, c, |m| m.chunks[0].3 ^= 1).await;
    // b: a chunk listed past the partition's end (missing).
    doctor_manifest(&cluster, &store, b, |m| m.chunks[0].1 += 1_000_000).await;

    let fresh = cluster.snapshot_store().await.unwrap();
    for id in [b, c] {
        let err = fresh.get(id).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Corrupt, "snapshot {id}: {err}");
    }
    let (loaded, rejected) = load_newest_valid::<Summer, _>(&fresh, Summer::NAME).await.unwrap();
    let loaded = loaded.expect("falls back to the oldest snapshot");
    assert_eq!(loaded.id, a);
    assert_eq!(loaded.state, state(1));
    assert_eq!(rejected.iter().map(|r| r.id).collect::<Vec<_>>(), vec![c, b]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_written_snapshot_is_never_listed() {
    let service = unique("half");
    let cluster = connect(config(&service).snapshot_partitions(2));
    let store = cluster.snapshot_store().await.unwrap();
    let a = store.put(&encoded(random_bytes(1000), 1)).await.unwrap();
    // Chunks of snapshot 7 without its manifest: a writer that crashed.
    let key = format!("{service}/7/0");
    producer(&cluster)
        .send(
            rdkafka::producer::FutureRecord::to(store.topic())
                .partition(1)
                .key(&key)
                .payload("partial"),
            Duration::from_secs(10),
        )
        .await
        .map_err(|(e, _)| e)
        .unwrap();
    let fresh = cluster.snapshot_store().await.unwrap();
    assert_eq!(fresh.list().await.unwrap(), vec![a]);
    assert_eq!(fresh.get(7).await.unwrap_err().kind(), ErrorKind::NotFound);
}

/// On the mock, a snapshot larger than a partition can hold loses its
/// first chunks to eviction: detected as corrupt, never returned.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn evicted_chunks_are_detected_on_mock() {
    let service = unique("evict");
    // Two partitions: manifests in 0, every chunk in 1 (~5 MiB limit).
    let cluster = connect(mock_config(&service).snapshot_partitions(2));
    let store = cluster.snapshot_store().await.unwrap();
    let id = store.put(&encoded(random_bytes(8 << 20), 1)).await.unwrap();
    let err = store.get(id).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Corrupt, "{err}");
}
