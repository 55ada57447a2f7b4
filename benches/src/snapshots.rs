//! B4 (snapshot store write + read) and B5 (checkpoint pause).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use ms2m_core::memory::{MemoryLog, MemoryOutputs, MemorySnapshotStore};
use ms2m_core::{no_progress, Backends, Instance, InstanceConfig, Position, ServiceState, Snapshot, SnapshotStore};
use ms2m_examples::game::{event, GameEvent, GameSessions};
use ms2m_kafka::KafkaConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::BaseRecord;
use rdkafka::{Message, Offset, TopicPartitionList};

use crate::kafka::{bulk_producer, send_retrying, wait_delivered};
use crate::report::{median, ratios, Goal, Row, Stat};
use crate::{Bench, BoxError};

const MIB: usize = 1 << 20;
const CHUNK: usize = 512 * 1024;

/// `len` incompressible bytes.
pub fn noise(len: usize, seed: u64) -> Bytes {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        out.extend_from_slice(&s.to_le_bytes());
    }
    out.truncate(len);
    Bytes::from(out)
}

/// B4: `KafkaSnapshotStore::put` + `get` of a 64 MiB snapshot vs raw
/// rdkafka producing and consuming the same bytes in the same chunks over
/// the same number of partitions.
pub async fn b4(b: &Bench) -> Result<Vec<Row>, BoxError> {
    let mib = if b.quick { 8 } else { 64 };
    let encoded = Snapshot::seal("bench-b4", 1, Position::new(), "b4", noise(mib * MIB, 4)).encode()?;
    let whole = encoded.to_bytes();
    let (mut ours, mut raw) = (Vec::new(), Vec::new());
    let mut partitions = 0;
    for run in 0..b.runs {
        for side in [run % 2, 1 - run % 2] {
            if side == 0 {
                let cluster = b.cluster.for_service(KafkaConfig::new(b.unique("b4-ours")));
                let store = cluster.snapshot_store().await?;
                partitions = store.partitions();
                let started = Instant::now();
                let id = store.put(&encoded).await?;
                let back = store.get(id).await?;
                let elapsed = started.elapsed();
                if back != whole {
                    return Err("snapshot read back differs".into());
                }
                ours.push(crate::ms(elapsed));
            } else {
                let n = if partitions > 0 { partitions } else { 64 };
                let elapsed = raw_roundtrip(b, &whole, n).await?;
                raw.push(crate::ms(elapsed));
            }
        }
    }
    Ok(vec![Row::new(
        "B4",
        format!("snapshot store write + read, {mib} MiB"),
        Stat::new(ours.clone(), "ms"),
        "raw rdkafka produce + consume of the same bytes",
        Some(Stat::new(raw.clone(), "ms")),
        // The target is stated as throughput: ours / raw = raw time / our time.
        Some(ratios(&raw, &ours)),
        "≥ 0.7 (throughput ratio)",
        Goal::AtLeast(0.7),
        format!("512 KiB chunks over {partitions} partitions both sides; ours verifies checksums and writes a manifest; clients created outside the timing except the store's reader (created per `get`)"),
    )])
}

/// Produces `bytes` in 512 KiB chunks round-robin over partitions `1..n`
/// of a fresh topic, then reads them back in order.
async fn raw_roundtrip(b: &Bench, bytes: &Bytes, partitions: i32) -> Result<Duration, BoxError> {
    let topic = b.unique("b4-raw");
    b.cluster.create_topic(&topic, partitions, &[]).await?;
    let producer = bulk_producer(&b.cluster)?;
    let consumer: BaseConsumer = b
        .cluster
        .client_config()
        .set("group.id", format!("{topic}.reader"))
        .set("enable.auto.commit", "false")
        .set("fetch.wait.max.ms", "10")
        .create()?;
    // Warm up metadata outside the timing, as the store has.
    let t = topic.clone();
    let consumer = tokio::task::spawn_blocking(move || -> Result<BaseConsumer, BoxError> {
        consumer.fetch_metadata(Some(&t), Duration::from_secs(10))?;
        Ok(consumer)
    })
    .await??;
    let bytes = bytes.clone();
    tokio::task::spawn_blocking(move || -> Result<Duration, BoxError> {
        let started = Instant::now();
        let chunks: Vec<&[u8]> = bytes.chunks(CHUNK).collect();
        let spread = (partitions - 1).max(1);
        for (i, c) in chunks.iter().enumerate() {
            let part = if partitions > 1 { 1 + (i as i32 % spread) } else { 0 };
            let key = (i as u64).to_be_bytes();
            send_retrying(
                &producer,
                BaseRecord::to(&topic).partition(part).key(&key[..]).payload(*c),
            )?;
            producer.poll(Duration::ZERO);
        }
        wait_delivered(&producer)?;
        let mut tpl = TopicPartitionList::new();
        for p in 0..partitions {
            tpl.add_partition_offset(&topic, p, Offset::Offset(0))?;
        }
        consumer.assign(&tpl)?;
        let mut got: HashMap<u64, Vec<u8>> = HashMap::with_capacity(chunks.len());
        while got.len() < chunks.len() {
            if started.elapsed() > Duration::from_secs(120) {
                return Err("raw read timed out".into());
            }
            if let Some(m) = consumer.poll(Duration::from_millis(100)) {
                let m = m?;
                let mut k = [0u8; 8];
                k.copy_from_slice(m.key().unwrap_or(&[0; 8]));
                got.insert(u64::from_be_bytes(k), m.payload().unwrap_or_default().to_vec());
            }
        }
        let mut out = BytesMut::with_capacity(bytes.len());
        for i in 0..chunks.len() as u64 {
            out.extend_from_slice(&got[&i]);
        }
        let elapsed = started.elapsed();
        if out.freeze() != bytes {
            return Err("raw read back differs".into());
        }
        Ok(elapsed)
    })
    .await?
}

/// A game-sessions log on the in-memory backends: `players` joins with
/// boards summing to `mib` MiB, then `events` flaps and ticks.
pub fn game_log(mib: usize, players: u64, events: u64) -> Result<MemoryLog, BoxError> {
    let log = MemoryLog::new("b5.events", 1);
    let board_bytes = (mib * MIB / players as usize) as u32;
    for player in 0..players {
        let e = GameEvent::Join { player, board_bytes };
        log.append("b5.events", 0, None, serde_json::to_vec(&e)?);
    }
    for i in 0..events {
        log.append("b5.events", 0, None, serde_json::to_vec(&event(i, players))?);
    }
    Ok(log)
}

/// B5: how long the apply loop stalls when a snapshot of a 64 MiB state is
/// triggered, vs serializing that state alone.
pub async fn b5(b: &Bench) -> Result<Vec<Row>, BoxError> {
    let mib = if b.quick { 8 } else { 64 };
    let (players, events) = (1000u64, 20_000u64);
    let (mut stalls, mut serial, mut pauses) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..b.runs {
        let log = game_log(mib, players, events)?;
        let outputs = MemoryOutputs::new();
        let backends = Backends {
            log: log.reader(),
            store: Arc::new(MemorySnapshotStore::new()),
            sink: outputs.sink(),
        };
        let config = InstanceConfig::new("b5")
            .output_topic("b5.scores")
            .snapshot_every(Some(players + events / 2))
            .snapshot_interval(None)
            .poll(100, Duration::from_millis(1));
        let mut inst = Instance::<GameSessions, _, _, _>::recover(backends, config, &*no_progress()).await?;
        let total = (players + events) as i64;
        let mut steps = Vec::new();
        while inst.position().total() < total {
            let before = inst.position().total();
            let t = Instant::now();
            inst.step().await?;
            if before >= players as i64 {
                steps.push(t.elapsed().as_secs_f64() * 1e3);
            }
        }
        inst.shutdown().await?;
        let info = inst.stats().last_checkpoint.clone().ok_or("no snapshot was taken")?;
        pauses.push(crate::ms(info.pause));
        let typical = median(&steps);
        let worst = steps.iter().copied().fold(0.0, f64::max);
        stalls.push(worst - typical);
        let mut s = Vec::new();
        for _ in 0..3 {
            let t = Instant::now();
            let bytes = inst.state().snapshot()?;
            s.push(t.elapsed().as_secs_f64() * 1e3);
            drop(bytes);
        }
        serial.push(median(&s));
    }
    Ok(vec![
        Row::new(
            "B5",
            format!("apply-loop stall when a snapshot of a {mib} MiB state fires"),
            Stat::new(stalls.clone(), "ms"),
            "`ServiceState::snapshot` alone",
            Some(Stat::new(serial.clone(), "ms")),
            Some(ratios(&stalls, &serial)),
            "≤ 1.1",
            Goal::AtMost(1.1),
            format!(
                "in-memory backends; stall = slowest `step()` − median `step()` (100-msg batches); `CheckpointInfo.pause` median {:.1} ms",
                median(&pauses)
            ),
        ),
    ])
}
