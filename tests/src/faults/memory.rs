//! The in-memory deployment: ms2m-core's `MemoryCluster` (feature `test`).
//! Its sink is transactional, so exactly-once is checked here; its control
//! channel has a publish hook, so crashes land at exact protocol steps
//! (a publisher hangs, or its message lands late), and its store can be
//! taken down and tampered with byte by byte.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use ms2m_core::memory::{MemoryControl, MemoryLogReader, MemorySink, MemorySnapshotStore, PublishFault};
use ms2m_core::store::SnapshotId;
use ms2m_core::testkit::{MemoryCluster, INPUT_TOPIC};
use ms2m_core::{Backends, ControlBody, Error, Position, SnapshotStore, TopicPartition};

use super::deployment::{Act, DeadLetter, Deployment, Guarantee, Interception, Timing};
use super::{Fault, Trigger};
use crate::Out;

const OUTPUT_TOPIC: &str = "summer.out";
const DEAD_LETTER_TOPIC: &str = "summer.dlq";

/// One scenario's in-memory cluster.
#[derive(Clone, Debug, Default)]
pub struct MemoryDeployment {
    cluster: MemoryCluster,
}

impl MemoryDeployment {
    pub fn new() -> Self {
        Self::default()
    }

    fn append(&self, values: &[(i32, u64)]) {
        for (p, v) in values {
            self.cluster.log.append(INPUT_TOPIC, *p, None, v.to_string());
        }
    }

    fn committed_on(&self, topic: &str) -> Vec<ms2m_core::OutputRecord> {
        let all = self.cluster.outputs.committed();
        all.into_iter().filter(|r| &*r.topic == topic).collect()
    }
}

#[async_trait]
impl Deployment for MemoryDeployment {
    type Log = MemoryLogReader;
    type Store = MemorySnapshotStore;
    type Sink = MemorySink;
    type Control = MemoryControl;

    const TIMING: Timing = Timing {
        limit: Duration::from_secs(20),
        poll_batch: 64,
        poll_wait: Duration::from_millis(5),
        commit_interval: Duration::from_millis(5),
        phase_timeout: Duration::from_millis(800),
        max_catch_up: Duration::from_millis(20),
        replay_max: Duration::from_millis(300),
        recheck: Duration::from_millis(2),
        retry: Duration::from_millis(2),
    };
    const GUARANTEE: Guarantee = Guarantee::ExactlyOnce;

    fn input_topic(&self) -> &str {
        INPUT_TOPIC
    }

    fn output_topic(&self) -> &str {
        OUTPUT_TOPIC
    }

    fn dead_letter_topic(&self) -> &str {
        DEAD_LETTER_TOPIC
    }

    async fn backends(&self) -> Backends<MemoryLogReader, MemorySnapshotStore, MemorySink> {
        self.cluster.backends()
    }

    async fn snapshot_store(&self) -> Arc<MemorySnapshotStore> {
        Arc::new(self.cluster.store.clone())
    }

    async fn control(&self) -> Arc<MemoryControl> {
        self.cluster.control.clone()
    }

    async fn produce(&self, values: Vec<(i32, u64)>) {
        self.append(&values);
    }

    /// Bursts of 20, one every 2 ms.
    fn produce_in_background(&self, values: Vec<(i32, u64)>) -> tokio::task::JoinHandle<()> {
        let this = self.clone();
        tokio::spawn(async move {
            for burst in values.chunks(20) {
                this.append(burst);
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        })
    }

    async fn produce_undecodable(&self, partition: i32) -> i64 {
        self.cluster
            .log
            .append(INPUT_TOPIC, partition, Some(b"bad"), &b"{not json"[..])
    }

    async fn input_end(&self) -> Position {
        self.cluster.log.end_position()
    }

    async fn committed_outputs(&self) -> Vec<Out> {
        let records = self.committed_on(OUTPUT_TOPIC);
        records
            .iter()
            .map(|r| serde_json::from_slice(&r.payload).expect("outputs decode"))
            .collect()
    }

    async fn dead_letters(&self) -> Vec<DeadLetter> {
        let records = self.committed_on(DEAD_LETTER_TOPIC);
        let header = |(k, v): &(String, Bytes)| (k.clone(), String::from_utf8_lossy(v).to_string());
        records
            .iter()
            .map(|r| DeadLetter {
                payload: r.payload.to_vec(),
                headers: r.headers.iter().map(header).collect(),
            })
            .collect()
    }

    async fn committed_through(&self, end: &Position) -> bool {
        let committed = self.cluster.outputs.committed_position();
        committed.is_some_and(|p| p.reaches(end))
    }

    async fn damage_snapshot(&self, id: SnapshotId, fault: Fault, seed: u64) -> bool {
        damage(&self.cluster.store, id, fault, seed)
    }

    fn is_damage_rejection(reason: &Error) -> bool {
        matches!(reason, Error::Snapshot(_))
    }

    async fn expire_input_through(&self, needed: i64, seed: u64) -> Option<i64> {
        let earliest = needed + 1 + (seed as i64 % 5);
        let tp = TopicPartition::new(INPUT_TOPIC, 0);
        self.cluster.log.truncate_before(&tp, earliest);
        Some(earliest)
    }

    fn set_store_unavailable(&self, down: bool) -> bool {
        self.cluster.store.set_unavailable(down);
        true
    }

    fn intercept_control(&self, at: Interception) -> Option<Trigger> {
        let trigger = Trigger::default();
        let (fired, store) = (trigger.clone(), self.cluster.store.clone());
        self.cluster.control.set_fault(move |message| {
            if fired.fired() || !(at.matches)(message) {
                return PublishFault::Pass;
            }
            fired.fire();
            apply_storage_fault(&store, message, &at);
            match at.act {
                Act::Observe => PublishFault::Pass,
                Act::Hang => PublishFault::Hang,
                Act::Late => PublishFault::Late(Duration::from_millis(at.seed % 30)),
            }
        });
        Some(trigger)
    }

    fn stop_intercepting(&self) {
        self.cluster.control.set_fault(|_| PublishFault::Pass);
    }
}

/// At the intercepted message: take the store down, or damage the
/// migration's snapshot as the source announces it.
fn apply_storage_fault(store: &MemorySnapshotStore, message: &ms2m_core::ControlMessage, at: &Interception) {
    match (at.fault, &message.body) {
        (Fault::StoreUnavailable, _) => store.set_unavailable(true),
        (_, ControlBody::CheckpointTaken { snapshot_id, .. }) => {
            damage(store, *snapshot_id, at.fault, at.seed);
        }
        _ => {}
    }
}

/// Flips a byte in the second half, cuts the snapshot in half, or deletes
/// it; returns whether it is still listed. Other faults leave it alone.
fn damage(store: &MemorySnapshotStore, id: SnapshotId, fault: Fault, seed: u64) -> bool {
    match fault {
        Fault::CorruptSnapshot => store.tamper(id, |b| {
            let mut v = b.to_vec();
            let i = v.len() / 2 + (seed as usize % (v.len() / 2));
            v[i] ^= 0x5a;
            Bytes::from(v)
        }),
        Fault::TruncatedSnapshot => store.tamper(id, |b| b.slice(..b.len() / 2)),
        Fault::MissingSnapshot => {
            // Called from the synchronous publish hook too; the memory
            // store's delete completes without waiting.
            complete_at_once(store.delete(id)).expect("delete a snapshot");
            return false;
        }
        _ => {}
    }
    true
}

/// Runs a future that completes without waiting (the memory store) on the
/// current thread.
fn complete_at_once<F: std::future::Future>(f: F) -> F::Output {
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    match std::pin::pin!(f).poll(&mut cx) {
        std::task::Poll::Ready(out) => out,
        std::task::Poll::Pending => panic!("the in-memory store does not wait"),
    }
}
