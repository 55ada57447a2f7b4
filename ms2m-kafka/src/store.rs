//! [`KafkaSnapshotStore`]: snapshots on a compacted Kafka topic, in chunks.
//!
//! # Layout
//!
//! One topic per service (`{service}.snapshots`; several services may share
//! a topic, every key starts with the service name). When the store creates
//! the topic it sets `cleanup.policy=compact`; an existing topic whose
//! retention could delete the latest snapshot is refused at start
//! ([`preflight`](crate::preflight)).
//!
//! * A snapshot is split into chunks of [`chunk size`](crate::KafkaConfig::snapshot_chunk_size)
//!   bytes (default 512 KiB, below the default `message.max.bytes`), keyed
//!   `{service}/{id}/{index}`, spread round-robin over partitions `1..n`
//!   (partition 0 too when the topic has a single partition).
//! * When every chunk is acknowledged, a **manifest** keyed `{service}/{id}/m`
//!   is written to partition 0, listing each chunk's partition, offset,
//!   length and CRC-32C plus the total length and the CRC-32C of the whole.
//!   A snapshot exists only once its manifest does, so a half-written
//!   snapshot is never listed, never "latest".
//! * `get` reads the manifest, then fetches exactly the listed offsets
//!   (one consumer, all partitions in parallel, starting at each partition's
//!   first chunk) and verifies every chunk and the whole. A missing, evicted,
//!   replaced or damaged chunk is [`ErrorKind::Corrupt`](ms2m_core::ErrorKind::Corrupt):
//!   the runtime then falls back to an older snapshot.
//! * `put_streamed` writes chunks as the encoder produces them (at most
//!   2 MiB in flight: a broker serves requests in order, and the service's
//!   outputs wait behind the chunks already sent), the state's bytes as
//!   chunks `1..`, then the envelope's prefix (known only once the state's
//!   length and checksum are) as chunk 0, then the manifest.
//! * `get_streamed` hands chunks over in index order as they arrive: chunk
//!   0 first (read on its own when later chunks precede it in its
//!   partition), then only the partitions whose next chunk is
//!   within 8 MiB of the one the decoder awaits are assigned (`Window`),
//!   so chunks held early stay within that.
//! * `delete` writes tombstones for the manifest, then every chunk; log
//!   compaction removes them.
//! * Ids: `1 +` the highest id this store has seen for the service in
//!   partition 0 (manifests and tombstones), so ids grow with every `put`
//!   as long as the newest manifest or its tombstone is retained.
//!
//! # Sizing on the embedded broker
//!
//! The mock cluster keeps at most ~5 MiB per partition and evicts the oldest
//! data silently. With `n` partitions, snapshots of `S` bytes and `K` kept,
//! chunks occupy about `(K + 1) · S / (n − 1)` per partition while a new
//! snapshot is written, which must stay below 5 MiB: the default of 64
//! partitions holds K = 2 snapshots of up to ~100 MiB. An evicted chunk is
//! detected on read (offset below the partition's start, or a different key
//! at the listed offset).

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use futures::future::{BoxFuture, FutureExt};
use futures::stream::{FuturesOrdered, StreamExt};
use ms2m_core::snapshot::EncodedSnapshot;
use ms2m_core::streamed::{SnapshotPieces, StreamedSnapshot};
use ms2m_core::{SnapshotId, SnapshotStore};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError as RdKafkaError, RDKafkaErrorCode};
use rdkafka::message::BorrowedMessage;
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord};
use rdkafka::{Message, Offset, TopicPartitionList};
use serde::{Deserialize, Serialize};
use tracing::{debug, info};

use crate::broker::{learn_leaders, KafkaCluster};
use crate::config::SetDefault;
use crate::config::{DEFAULT_EMBEDDED_SNAPSHOT_PARTITIONS, DEFAULT_SNAPSHOT_PARTITIONS};
use crate::error::{blocking, KafkaError, Result};
use crate::off_runtime::OffRuntime;

const MANIFEST_FORMAT: u32 = 1;
/// Bytes of chunks in flight at once while writing a snapshot (at least
/// two chunks). Small on purpose: a broker serves requests in order, and a
/// service's outputs queue behind the chunks already sent to it.
const UPLOAD_IN_FLIGHT_BYTES: usize = 2 * 1024 * 1024;
/// Chunks fetched and waiting, in order, for a streamed restore.
const READ_AHEAD: usize = 4;
/// What a snapshot reader's client may hold fetched ahead of the decoder.
const READER_QUEUE_KIB: usize = 8 * 1024;
/// How far past the chunk a streamed restore waits for a reader fetches:
/// a partition whose next chunk lies further ahead is paused until the
/// restore comes near, so chunks held early stay within this.
const EARLY_BYTES: usize = 8 * 1024 * 1024;

/// The manifest of one snapshot (JSON, readable with any Kafka tool).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// Manifest format version.
    pub format: u32,
    /// The service.
    pub service: String,
    /// The snapshot id.
    pub id: SnapshotId,
    /// Total encoded length.
    pub total_len: u64,
    /// CRC-32C of the whole encoding.
    pub crc32c: u32,
    /// Chunk size used.
    pub chunk_size: u64,
    /// `(partition, offset, length, crc32c)` of every chunk, in order.
    pub chunks: Vec<(i32, i64, u32, u32)>,
}

#[derive(Debug, Default)]
struct Catalog {
    /// Next offset of partition 0 to scan.
    next_offset: i64,
    manifests: BTreeMap<SnapshotId, Manifest>,
    max_id: SnapshotId,
}

/// A [`SnapshotStore`] on a compacted Kafka topic; see the module docs.
pub struct KafkaSnapshotStore {
    cluster: KafkaCluster,
    topic: String,
    service: String,
    partitions: i32,
    chunk_size: usize,
    producer: OffRuntime<FutureProducer>,
    /// Reads partition 0 (manifests); used by one refresh at a time.
    scanner: OffRuntime<Arc<BaseConsumer>>,
    catalog: Arc<Mutex<Catalog>>,
    /// Serializes refreshes and id allocation.
    refresh: tokio::sync::Mutex<()>,
    /// Whether the manifest scanner has read the topic once (its first
    /// scan learns the topic's leaders first: see `learn_leaders`).
    scanned: AtomicBool,
}

impl std::fmt::Debug for KafkaSnapshotStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaSnapshotStore")
            .field("topic", &self.topic)
            .field("service", &self.service)
            .field("partitions", &self.partitions)
            .field("chunk_size", &self.chunk_size)
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl KafkaSnapshotStore {
    /// Opens the store of the cluster's service, creating its topic
    /// (compacted) if missing, and refusing one whose settings can delete
    /// the latest snapshot ([`preflight`](crate::preflight)).
    pub async fn new(cluster: &KafkaCluster) -> Result<Self> {
        let config = cluster.config();
        let topic = config.snapshot_topic();
        let partitions = match cluster.partition_count(&topic).await? {
            Some(n) => n,
            None => {
                let wanted = config.snapshot_partition_count().unwrap_or(if cluster.is_embedded() {
                    DEFAULT_EMBEDDED_SNAPSHOT_PARTITIONS
                } else {
                    DEFAULT_SNAPSHOT_PARTITIONS
                });
                cluster
                    .create_topic(&topic, wanted, crate::preflight::SNAPSHOT_TOPIC_SETTINGS)
                    .await?;
                cluster
                    .partition_count(&topic)
                    .await?
                    .ok_or_else(|| KafkaError::UnknownTopic(topic.clone()))?
            }
        };
        crate::preflight::check_snapshot_topic(cluster, &topic).await?;
        let chunk_size = config.chunk_size();
        let mut pc = cluster.library_client_config();
        pc.set_default("acks", "all")
            .set_default("linger.ms", "5")
            .set_default("compression.type", "none")
            .set_default("enable.idempotence", "false")
            .set_default("message.max.bytes", (chunk_size + 64 * 1024).max(1_000_000).to_string())
            .set_default("batch.size", (chunk_size + 64 * 1024).max(1_000_000).to_string())
            .set_default("queue.buffering.max.kbytes", "262144");
        let producer: FutureProducer = pc.create().map_err(KafkaError::kafka("create the snapshot producer"))?;
        let mut cc = cluster.library_client_config();
        // group.id is required by assign; this consumer never joins or commits.
        cc.set("group.id", format!("{}.snapshot-reader", config.group_id()))
            .set("enable.auto.commit", "false")
            .set("enable.partition.eof", "true")
            .set("auto.offset.reset", "earliest")
            .set_default("fetch.wait.max.ms", "50");
        let scanner: BaseConsumer = cc.create().map_err(KafkaError::kafka("create the manifest reader"))?;
        info!(topic, partitions, chunk_size, "snapshot store ready");
        Ok(Self {
            cluster: cluster.clone(),
            topic,
            service: config.service().to_string(),
            partitions,
            chunk_size,
            producer: OffRuntime::new(producer, cluster),
            scanner: OffRuntime::new(Arc::new(scanner), cluster),
            catalog: Arc::new(Mutex::new(Catalog::default())),
            refresh: tokio::sync::Mutex::new(()),
            scanned: AtomicBool::new(false),
        })
    }

    /// The snapshot topic.
    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// Partitions of the snapshot topic.
    pub fn partitions(&self) -> i32 {
        self.partitions
    }

    /// The manifest of a stored snapshot.
    pub async fn manifest(&self, id: SnapshotId) -> Result<Manifest> {
        let _guard = self.refresh.lock().await;
        if let Some(m) = lock(&self.catalog).manifests.get(&id) {
            return Ok(m.clone());
        }
        self.refresh_locked().await?;
        lock(&self.catalog)
            .manifests
            .get(&id)
            .cloned()
            .ok_or(KafkaError::SnapshotNotFound(id))
    }

    /// Allocates the next snapshot id (after reading partition 0 up to date).
    async fn next_id(&self) -> Result<SnapshotId> {
        let _guard = self.refresh.lock().await;
        self.refresh_locked().await?;
        let mut cat = lock(&self.catalog);
        cat.max_id += 1;
        Ok(cat.max_id)
    }

    /// The manifest of snapshot `id`, checked to be this service's, and a
    /// consumer to fetch its chunks with.
    async fn open_chunks(&self, id: SnapshotId) -> Result<(Manifest, BaseConsumer)> {
        let manifest = self.manifest(id).await?;
        if manifest.service != self.service {
            return Err(KafkaError::corrupt(
                id,
                format!("manifest belongs to `{}`", manifest.service),
            ));
        }
        let mut cc = self.cluster.library_client_config();
        // group.id is required by assign; this consumer never joins or commits.
        cc.set(
            "group.id",
            format!("{}.snapshot-reader", self.cluster.config().group_id()),
        )
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "false")
        .set("auto.offset.reset", "error")
        .set_default("fetch.wait.max.ms", "50")
        // Chunks fetched ahead of the decoder wait here: bounded, and
        // fetching resumes soon after the decoder caught up (librdkafka's
        // default backoff once the queue is full is a second).
        .set_default("queued.max.messages.kbytes", READER_QUEUE_KIB.to_string())
        .set_default("fetch.queue.backoff.ms", "5")
        // One fetch response is one buffer, freed when its last chunk is:
        // with the default (50 MB) one response could hold the snapshot.
        .set_default(
            "fetch.max.bytes",
            (READER_QUEUE_KIB * 1024 / 2).max(2 * self.chunk_size).to_string(),
        )
        // About one chunk per partition per fetch: a partition's later
        // chunks are far ahead of the restore (see `Window`).
        .set_default("max.partition.fetch.bytes", (self.chunk_size + 64 * 1024).to_string());
        let consumer = cc.create().map_err(KafkaError::kafka("create a snapshot reader"))?;
        Ok((manifest, consumer))
    }

    fn chunk_partitions(&self) -> Vec<i32> {
        if self.partitions <= 1 {
            vec![0]
        } else {
            (1..self.partitions).collect()
        }
    }

    fn manifest_key(&self, id: SnapshotId) -> String {
        format!("{}/{id}/m", self.service)
    }

    fn chunk_key(&self, id: SnapshotId, index: usize) -> String {
        format!("{}/{id}/{index}", self.service)
    }

    /// Reads partition 0 from where the last refresh stopped to its end.
    /// Call with `self.refresh` held.
    async fn refresh_locked(&self) -> Result<()> {
        let scanner = self.scanner.clone();
        let topic = self.topic.clone();
        let prefix = format!("{}/", self.service);
        let from = lock(&self.catalog).next_offset;
        let timeout = self.cluster.config().timeout();
        let first_scan = !self.scanned.load(Ordering::Acquire);
        let (events, next) =
            blocking(move || scan_manifests(&scanner, &topic, &prefix, from, timeout, first_scan)).await?;
        self.scanned.store(true, Ordering::Release);
        let mut cat = lock(&self.catalog);
        cat.next_offset = next;
        for (id, event) in events {
            cat.max_id = cat.max_id.max(id);
            match event {
                ManifestEvent::Written(m) => {
                    cat.manifests.insert(id, m);
                }
                ManifestEvent::Gone => {
                    cat.manifests.remove(&id);
                }
                ManifestEvent::Seen => {}
            }
        }
        Ok(())
    }

    async fn produce(&self, partition: i32, key: &str, payload: Option<&[u8]>) -> Result<DeliveryFuture> {
        loop {
            let mut record = FutureRecord::<str, [u8]>::to(&self.topic).partition(partition).key(key);
            if let Some(p) = payload {
                record = record.payload(p);
            }
            match self.producer.send_result(record) {
                Ok(f) => return Ok(f),
                Err((RdKafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                Err((e, _)) => return Err(KafkaError::kafka("produce a snapshot record")(e)),
            }
        }
    }
}

/// The chunks and each one's CRC-32C, computed on the blocking pool:
/// checksumming a large snapshot on a runtime worker stalls every task that
/// worker runs.
async fn checksummed(chunks: Vec<Bytes>) -> Result<(Vec<Bytes>, Vec<u32>)> {
    blocking(move || {
        let crcs = chunks.iter().map(|c| crc32c::crc32c(c)).collect();
        Ok((chunks, crcs))
    })
    .await
}

/// The chunks of one snapshot being written: at most
/// [`UPLOAD_IN_FLIGHT_BYTES`] in flight, then the manifest that makes the
/// snapshot visible.
struct ChunkUpload<'a> {
    store: &'a KafkaSnapshotStore,
    id: SnapshotId,
    parts: Vec<i32>,
    rotate: usize,
    in_flight: FuturesOrdered<BoxFuture<'static, Result<(i32, i64)>>>,
    /// Chunks in flight at most.
    window: usize,
    /// `(index, length, crc)` of each chunk in flight, in send order.
    sent: VecDeque<(usize, u32, u32)>,
    /// `(partition, offset, length, crc)` by chunk index.
    stored: BTreeMap<usize, (i32, i64, u32, u32)>,
}

impl<'a> ChunkUpload<'a> {
    fn new(store: &'a KafkaSnapshotStore, id: SnapshotId) -> Self {
        let parts = store.chunk_partitions();
        let rotate = id as usize % parts.len();
        Self {
            store,
            id,
            parts,
            rotate,
            in_flight: FuturesOrdered::new(),
            window: (UPLOAD_IN_FLIGHT_BYTES / store.chunk_size.max(1)).max(2),
            sent: VecDeque::new(),
            stored: BTreeMap::new(),
        }
    }

    /// Sends chunk `index`; waits for the oldest in flight when the window is full.
    async fn send(&mut self, index: usize, chunk: Bytes, crc: u32) -> Result<()> {
        let partition = self.parts[(self.rotate + index) % self.parts.len()];
        let key = self.store.chunk_key(self.id, index);
        let f = self.store.produce(partition, &key, Some(&chunk)).await?;
        self.in_flight.push_back(delivered(f).boxed());
        self.sent.push_back((index, chunk.len() as u32, crc));
        if self.in_flight.len() >= self.window {
            self.settle_one().await?;
        }
        Ok(())
    }

    async fn settle_one(&mut self) -> Result<()> {
        let (p, o) = self.in_flight.next().await.expect("non-empty")?;
        let (index, len, crc) = self.sent.pop_front().expect("in step");
        self.stored.insert(index, (p, o, len, crc));
        Ok(())
    }

    /// Waits for every chunk, then writes the manifest (chunks `0..n`,
    /// none missing).
    async fn finish(mut self) -> Result<Manifest> {
        while !self.in_flight.is_empty() {
            self.settle_one().await?;
        }
        let chunks: Vec<_> = self.stored.into_values().collect();
        let manifest = Manifest {
            format: MANIFEST_FORMAT,
            service: self.store.service.clone(),
            id: self.id,
            total_len: chunks.iter().map(|c| c.2 as u64).sum(),
            crc32c: whole_crc(&chunks),
            chunk_size: self.store.chunk_size as u64,
            chunks,
        };
        let bytes = serde_json::to_vec(&manifest).expect("manifests serialize");
        let f = self
            .store
            .produce(0, &self.store.manifest_key(self.id), Some(&bytes))
            .await?;
        delivered(f).await?;
        lock(&self.store.catalog).manifests.insert(self.id, manifest.clone());
        Ok(manifest)
    }
}

/// The CRC-32C of the chunks' concatenation, from their own CRCs.
fn whole_crc(chunks: &[(i32, i64, u32, u32)]) -> u32 {
    chunks.iter().fold(0, |whole, &(_, _, len, crc)| {
        crc32c::crc32c_combine(whole, crc, len as usize)
    })
}

/// Hands fetched chunks to a streamed restore in index order, holding the
/// ones that arrived early.
struct InOrder<'a> {
    to_decoder: &'a tokio::sync::mpsc::Sender<Result<Bytes>>,
    next: usize,
    early: BTreeMap<usize, Bytes>,
    early_bytes: usize,
    /// The most bytes held early at once (logged: it is memory).
    most_early_bytes: usize,
}

impl<'a> InOrder<'a> {
    fn new(to_decoder: &'a tokio::sync::mpsc::Sender<Result<Bytes>>) -> Self {
        Self {
            to_decoder,
            next: 0,
            early: BTreeMap::new(),
            early_bytes: 0,
            most_early_bytes: 0,
        }
    }

    /// Takes chunk `index`; sends every chunk now in order (blocking while
    /// the decoder is behind) and answers the index awaited next. Fails
    /// when the decoder stopped reading.
    fn deliver(&mut self, index: usize, chunk: Bytes) -> Result<Option<usize>> {
        self.early_bytes += chunk.len();
        self.most_early_bytes = self.most_early_bytes.max(self.early_bytes);
        self.early.insert(index, chunk);
        while let Some(chunk) = self.early.remove(&self.next) {
            self.early_bytes -= chunk.len();
            self.to_decoder
                .blocking_send(Ok(chunk))
                .map_err(|_| KafkaError::kafka("hand a snapshot chunk over")(RdKafkaError::Canceled))?;
            self.next += 1;
        }
        Ok(Some(self.next))
    }
}

async fn delivered(f: DeliveryFuture) -> Result<(i32, i64)> {
    match f.await {
        Ok(Ok(d)) => Ok((d.partition, d.offset)),
        Ok(Err((e, _))) => Err(KafkaError::kafka("deliver a snapshot record")(e)),
        Err(_) => Err(KafkaError::kafka("deliver a snapshot record")(RdKafkaError::Canceled)),
    }
}

/// What a record of partition 0 says about a snapshot id.
enum ManifestEvent {
    /// The manifest was written.
    Written(Manifest),
    /// The manifest was deleted (tombstone) or is unreadable.
    Gone,
    /// A chunk key: the id is taken, nothing else.
    Seen,
}

/// Scans partition 0 from `from` to its end (blocking). Returns the
/// manifests and tombstones found, and the next offset to scan.
/// `first_scan`: the scanner has not read the topic yet (see
/// [`learn_leaders`]).
fn scan_manifests(
    consumer: &BaseConsumer,
    topic: &str,
    prefix: &str,
    from: i64,
    timeout: Duration,
    first_scan: bool,
) -> Result<(Vec<(SnapshotId, ManifestEvent)>, i64)> {
    if first_scan {
        learn_leaders(consumer, topic, timeout, "fetch snapshot topic metadata")?;
    }
    let (low, high) = consumer
        .fetch_watermarks(topic, 0, timeout)
        .map_err(KafkaError::kafka("fetch snapshot topic watermarks"))?;
    let start = from.max(low);
    if start >= high {
        return Ok((Vec::new(), start));
    }
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, 0, Offset::Offset(start))
        .map_err(KafkaError::kafka("assign the manifest partition"))?;
    consumer
        .assign(&tpl)
        .map_err(KafkaError::kafka("assign the manifest partition"))?;
    let mut events = Vec::new();
    let mut next = start;
    let deadline = Instant::now() + timeout;
    while next < high {
        if Instant::now() >= deadline {
            return Err(KafkaError::Timeout {
                operation: "read snapshot manifests",
                timeout,
            });
        }
        match consumer.poll(Duration::from_millis(100)) {
            None => {}
            Some(Err(RdKafkaError::PartitionEOF(_))) => break,
            Some(Err(e)) => return Err(KafkaError::kafka("read snapshot manifests")(e)),
            Some(Ok(m)) => {
                next = m.offset() + 1;
                let Some(key) = m.key().and_then(|k| std::str::from_utf8(k).ok()) else {
                    continue;
                };
                let Some(rest) = key.strip_prefix(prefix) else { continue };
                let mut parts = rest.split('/');
                let (Some(id), Some(kind), None) = (parts.next(), parts.next(), parts.next()) else {
                    continue;
                };
                let Ok(id) = id.parse::<SnapshotId>() else { continue };
                if kind != "m" {
                    events.push((id, ManifestEvent::Seen));
                    continue;
                }
                match m.payload() {
                    None => events.push((id, ManifestEvent::Gone)),
                    Some(p) => match serde_json::from_slice::<Manifest>(p) {
                        Ok(manifest) if manifest.id == id && manifest.format == MANIFEST_FORMAT => {
                            events.push((id, ManifestEvent::Written(manifest)))
                        }
                        // An unreadable manifest makes the snapshot invisible;
                        // its id still counts as used.
                        _ => events.push((id, ManifestEvent::Gone)),
                    },
                }
            }
        }
    }
    let _ = consumer.unassign();
    Ok((events, next.max(start)))
}

/// Fetches and verifies every chunk of `manifest` (blocking), handing each
/// to `deliver` with its index as it arrives (in no particular order).
/// When `ordered`, `deliver` answers the index it awaits next, and only
/// the partitions whose next chunk lies within [`EARLY_BYTES`] of it are
/// read meanwhile; chunk 0 is then read first, on its own, when a streamed
/// snapshot wrote it last, after later chunks of its partition.
fn fetch_chunks(
    consumer: &BaseConsumer,
    topic: &str,
    service: &str,
    manifest: &Manifest,
    timeout: Duration,
    ordered: bool,
    deliver: &mut dyn FnMut(usize, Bytes) -> Result<Option<usize>>,
) -> Result<()> {
    check_manifest(manifest)?;
    let mut expected = expected_chunks(consumer, topic, manifest, timeout)?;
    let reader = ChunkReader {
        consumer,
        topic,
        service,
        manifest,
        timeout,
        ordered,
    };
    if ordered && !first_in_its_partition(&expected, 0) {
        reader.read(take_chunk(&mut expected, 0), deliver)?;
    }
    reader.read(expected, deliver)
}

/// Whether chunk `index` comes first, by offset, in its partition (a whole
/// snapshot's chunk 0 does; a streamed one's, written last, does only when
/// it is alone there).
fn first_in_its_partition(expected: &HashMap<i32, VecDeque<(i64, usize)>>, index: usize) -> bool {
    expected
        .values()
        .any(|list| list.front().is_some_and(|&(_, i)| i == index))
}

/// Chunk `index` taken out of `expected`, as a list of its own.
fn take_chunk(
    expected: &mut HashMap<i32, VecDeque<(i64, usize)>>,
    index: usize,
) -> HashMap<i32, VecDeque<(i64, usize)>> {
    let mut taken = HashMap::new();
    for (&p, list) in expected.iter_mut() {
        if let Some(at) = list.iter().position(|&(_, i)| i == index) {
            taken.insert(p, list.remove(at).into_iter().collect());
            break;
        }
    }
    expected.retain(|_, list| !list.is_empty());
    taken
}

/// What reading one snapshot's chunks needs (see [`fetch_chunks`]).
struct ChunkReader<'a> {
    consumer: &'a BaseConsumer,
    topic: &'a str,
    service: &'a str,
    manifest: &'a Manifest,
    timeout: Duration,
    ordered: bool,
}

impl ChunkReader<'_> {
    /// Reads the chunks `expected` lists (per partition, in offset order),
    /// then unassigns every partition.
    fn read(
        &self,
        mut expected: HashMap<i32, VecDeque<(i64, usize)>>,
        deliver: &mut dyn FnMut(usize, Bytes) -> Result<Option<usize>>,
    ) -> Result<()> {
        let (id, topic) = (self.manifest.id, self.topic);
        let mut window = Window::new(topic, self.manifest);
        let first = expected.values().flatten().map(|&(_, i)| i).min();
        window.apply(self.consumer, &expected, first.filter(|_| self.ordered))?;
        let mut remaining: usize = expected.values().map(VecDeque::len).sum();
        let mut last_progress = Instant::now();
        while remaining > 0 {
            if last_progress.elapsed() >= self.timeout {
                return Err(KafkaError::Timeout {
                    operation: "read snapshot chunks",
                    timeout: self.timeout,
                });
            }
            let Some(m) = self.poll()? else { continue };
            let p = m.partition();
            let Some(list) = expected.get_mut(&p) else { continue };
            // Offsets listed in the manifest that were skipped are gone.
            let Some(&(o, i)) = list.front() else { continue };
            if o < m.offset() {
                return Err(KafkaError::corrupt(
                    id,
                    format!("chunk {i} at {topic}/{p}@{o} is missing (compacted or deleted)"),
                ));
            }
            if o != m.offset() {
                continue;
            }
            list.pop_front();
            let awaited = deliver(i, verified_chunk(&m, self.service, self.manifest, i)?)?;
            window.apply(self.consumer, &expected, awaited.filter(|_| self.ordered))?;
            remaining -= 1;
            last_progress = Instant::now();
        }
        let _ = self.consumer.unassign();
        Ok(())
    }

    /// The next record, if one came within 100 ms.
    fn poll(&self) -> Result<Option<BorrowedMessage<'_>>> {
        match self.consumer.poll(Duration::from_millis(100)) {
            None | Some(Err(RdKafkaError::PartitionEOF(_))) => Ok(None),
            Some(Err(e)) => Err(match e.rdkafka_error_code() {
                Some(RDKafkaErrorCode::AutoOffsetReset | RDKafkaErrorCode::OffsetOutOfRange) => {
                    KafkaError::corrupt(self.manifest.id, "a chunk was evicted while it was being read")
                }
                _ => KafkaError::kafka("read snapshot chunks")(e),
            }),
            Some(Ok(m)) => Ok(Some(m)),
        }
    }
}

/// Keeps assigned only the partitions whose next chunk is within reach of
/// the one a streamed restore awaits; the others are unassigned and
/// assigned again, at that chunk, as the restore comes near. (Pausing
/// would do, but a paused partition resumes from the last record handed
/// out, which a partition not read from yet does not have.)
struct Window<'a> {
    topic: &'a str,
    /// Chunks past the awaited one that may be fetched.
    ahead: usize,
    assigned: HashSet<i32>,
}

impl<'a> Window<'a> {
    fn new(topic: &'a str, manifest: &Manifest) -> Self {
        let largest = manifest.chunks.iter().map(|c| c.2 as usize).max().unwrap_or(1);
        Self {
            topic,
            ahead: (EARLY_BYTES / largest.max(1)).max(1),
            assigned: HashSet::new(),
        }
    }

    /// Assigns the partitions now within reach of `awaited` (all of them
    /// for `None`) and unassigns those beyond it; partitions read to their
    /// end stay as they are.
    fn apply(
        &mut self,
        consumer: &BaseConsumer,
        expected: &HashMap<i32, VecDeque<(i64, usize)>>,
        awaited: Option<usize>,
    ) -> Result<()> {
        let (mut add, mut drop) = (TopicPartitionList::new(), TopicPartitionList::new());
        for (&p, list) in expected {
            // The lowest index left, not the next offset's: the prefix
            // (chunk 0) is written last, after later chunks of its partition.
            let Some(lowest) = list.iter().map(|&(_, i)| i).min() else {
                // Read to its end: left as it is until the reader unassigns.
                continue;
            };
            let within = awaited.is_none_or(|awaited| lowest < awaited + self.ahead);
            if within && self.assigned.insert(p) {
                let (offset, _) = list[0];
                add.add_partition_offset(self.topic, p, Offset::Offset(offset))
                    .map_err(KafkaError::kafka("assign snapshot partitions"))?;
            } else if !within && self.assigned.remove(&p) {
                drop.add_partition(self.topic, p);
            }
        }
        if drop.count() > 0 {
            consumer
                .incremental_unassign(&drop)
                .map_err(KafkaError::kafka("unassign snapshot partitions"))?;
        }
        if add.count() > 0 {
            consumer
                .incremental_assign(&add)
                .map_err(KafkaError::kafka("assign snapshot partitions"))?;
        }
        Ok(())
    }
}

/// Checks that the manifest's chunks add up to its length and checksum.
fn check_manifest(manifest: &Manifest) -> Result<()> {
    let total: u64 = manifest.chunks.iter().map(|c| c.2 as u64).sum();
    if total != manifest.total_len {
        return Err(KafkaError::corrupt(
            manifest.id,
            format!("chunk lengths add up to {total}, manifest says {}", manifest.total_len),
        ));
    }
    let whole = whole_crc(&manifest.chunks);
    if whole != manifest.crc32c {
        return Err(KafkaError::corrupt(
            manifest.id,
            format!(
                "the chunks' checksums combine to {whole:#010x}, manifest says {:#010x}",
                manifest.crc32c
            ),
        ));
    }
    Ok(())
}

/// The `(offset, index)` of the chunks each partition holds, in order. A chunk below the
/// partition's start or beyond its end is [`KafkaError::CorruptSnapshot`].
fn expected_chunks(
    consumer: &BaseConsumer,
    topic: &str,
    manifest: &Manifest,
    timeout: Duration,
) -> Result<HashMap<i32, VecDeque<(i64, usize)>>> {
    let id = manifest.id;
    let mut expected: HashMap<i32, VecDeque<(i64, usize)>> = HashMap::new();
    for (i, &(p, o, _, _)) in manifest.chunks.iter().enumerate() {
        expected.entry(p).or_default().push_back((o, i));
    }
    learn_leaders(consumer, topic, timeout, "fetch snapshot topic metadata")?;
    for (p, list) in expected.iter_mut() {
        list.make_contiguous().sort_unstable();
        let (first, _) = list[0];
        let (last, last_index) = *list.back().expect("non-empty");
        let (low, high) = consumer
            .fetch_watermarks(topic, *p, timeout)
            .map_err(KafkaError::kafka("fetch snapshot topic watermarks"))?;
        if first < low {
            return Err(KafkaError::corrupt(
                id,
                format!("chunk at {topic}/{p}@{first} was deleted or evicted (partition now starts at {low})"),
            ));
        }
        if last >= high {
            return Err(KafkaError::corrupt(
                id,
                format!("chunk {last_index} at {topic}/{p}@{last} is beyond the partition's end ({high})"),
            ));
        }
    }
    Ok(expected)
}

/// Chunk `i`'s bytes from the record at its listed offset, after checking
/// its key, length and checksum.
fn verified_chunk(m: &BorrowedMessage<'_>, service: &str, manifest: &Manifest, i: usize) -> Result<Bytes> {
    let (id, p, o) = (manifest.id, m.partition(), m.offset());
    let topic = m.topic();
    let (_, _, len, crc) = manifest.chunks[i];
    let want_key = format!("{service}/{id}/{i}");
    if m.key() != Some(want_key.as_bytes()) {
        return Err(KafkaError::corrupt(
            id,
            format!("{topic}/{p}@{o} holds another record than chunk {i}"),
        ));
    }
    let Some(payload) = m.payload() else {
        return Err(KafkaError::corrupt(id, format!("chunk {i} was deleted (tombstone)")));
    };
    if payload.len() != len as usize || crc32c::crc32c(payload) != crc {
        return Err(KafkaError::corrupt(
            id,
            format!("chunk {i} at {topic}/{p}@{o} fails its checksum"),
        ));
    }
    Ok(Bytes::copy_from_slice(payload))
}

#[async_trait]
impl SnapshotStore for KafkaSnapshotStore {
    type Error = KafkaError;

    async fn put(&self, snapshot: &EncodedSnapshot) -> Result<SnapshotId> {
        let id = self.next_id().await?;
        let started = Instant::now();
        let (pieces, crcs) = checksummed(snapshot.chunks(self.chunk_size).collect()).await?;
        let mut upload = ChunkUpload::new(self, id);
        for (index, (chunk, crc)) in pieces.into_iter().zip(crcs).enumerate() {
            upload.send(index, chunk, crc).await?;
        }
        let manifest = upload.finish().await?;
        debug!(id, bytes = snapshot.len(), chunks = manifest.chunks.len(), elapsed = ?started.elapsed(), "snapshot written");
        Ok(id)
    }

    /// Writes the state's chunks as they are encoded (chunks `1..`), then
    /// the envelope's prefix as chunk 0, then the manifest: a few chunks
    /// in memory at a time, never the whole snapshot.
    async fn put_streamed(&self, mut snapshot: StreamedSnapshot) -> Result<SnapshotId> {
        let id = self.next_id().await?;
        let started = Instant::now();
        let mut upload = ChunkUpload::new(self, id);
        let mut pending = BytesMut::new();
        let mut index = 1;
        while let Some(piece) = snapshot.next_piece().await {
            pending.extend_from_slice(&piece);
            while pending.len() >= self.chunk_size {
                let chunk = pending.split_to(self.chunk_size).freeze();
                upload.send(index, chunk.clone(), crc32c::crc32c(&chunk)).await?;
                index += 1;
            }
        }
        if !pending.is_empty() {
            let chunk = pending.freeze();
            upload.send(index, chunk.clone(), crc32c::crc32c(&chunk)).await?;
        }
        let prefix = snapshot.prefix().expect("the state is complete");
        upload.send(0, prefix.clone(), crc32c::crc32c(&prefix)).await?;
        let manifest = upload.finish().await?;
        debug!(id, bytes = manifest.total_len, chunks = manifest.chunks.len(), elapsed = ?started.elapsed(), "streamed snapshot written");
        Ok(id)
    }

    /// Fetches the chunks on a blocking thread and hands them over in
    /// order as they arrive (at most `READ_AHEAD`, 4, wait for the decoder).
    async fn get_streamed(&self, id: SnapshotId) -> Result<SnapshotPieces<KafkaError>> {
        let (manifest, consumer) = self.open_chunks(id).await?;
        let (tx, pieces) = SnapshotPieces::channel(READ_AHEAD);
        let (topic, service) = (self.topic.clone(), self.service.clone());
        let timeout = self.cluster.config().timeout();
        // Held until the reader is gone: an embedded broker outlives it.
        let cluster = self.cluster.clone();
        tokio::task::spawn_blocking(move || {
            let mut in_order = InOrder::new(&tx);
            let fetched = fetch_chunks(
                &consumer,
                &topic,
                &service,
                &manifest,
                timeout,
                true,
                &mut |i, chunk| in_order.deliver(i, chunk),
            );
            debug!(
                id,
                most_early_bytes = in_order.most_early_bytes,
                "snapshot chunks fetched"
            );
            if let Err(e) = fetched {
                // Nobody reading any more is not worth reporting.
                let _ = tx.blocking_send(Err(e));
            }
            // The pieces end before the reader closes.
            drop(tx);
            drop(consumer);
            drop(cluster);
        });
        Ok(pieces)
    }

    async fn list(&self) -> Result<Vec<SnapshotId>> {
        let _guard = self.refresh.lock().await;
        self.refresh_locked().await?;
        Ok(lock(&self.catalog).manifests.keys().copied().collect())
    }

    async fn get(&self, id: SnapshotId) -> Result<Bytes> {
        let (manifest, consumer) = self.open_chunks(id).await?;
        let (topic, service) = (self.topic.clone(), self.service.clone());
        let timeout = self.cluster.config().timeout();
        blocking(move || {
            let starts: Vec<usize> = manifest
                .chunks
                .iter()
                .scan(0usize, |at, c| {
                    let start = *at;
                    *at += c.2 as usize;
                    Some(start)
                })
                .collect();
            let mut buf = vec![0u8; manifest.total_len as usize];
            fetch_chunks(
                &consumer,
                &topic,
                &service,
                &manifest,
                timeout,
                false,
                &mut |i, chunk| {
                    buf[starts[i]..starts[i] + chunk.len()].copy_from_slice(&chunk);
                    Ok(None)
                },
            )?;
            Ok(Bytes::from(buf))
        })
        .await
    }

    async fn delete(&self, id: SnapshotId) -> Result<()> {
        let manifest = match self.manifest(id).await {
            Ok(m) => m,
            Err(KafkaError::SnapshotNotFound(_)) => return Ok(()),
            Err(e) => return Err(e),
        };
        // Manifest first: from here on the snapshot is not listed.
        let f = self.produce(0, &self.manifest_key(id), None).await?;
        delivered(f).await?;
        lock(&self.catalog).manifests.remove(&id);
        let mut in_flight = FuturesOrdered::new();
        for (i, &(p, _, _, _)) in manifest.chunks.iter().enumerate() {
            in_flight.push_back(delivered(self.produce(p, &self.chunk_key(id, i), None).await?));
        }
        while let Some(r) = in_flight.next().await {
            r?;
        }
        debug!(id, "snapshot deleted");
        Ok(())
    }
}
