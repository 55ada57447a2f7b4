//! What the scenarios need from a backend, and nothing more: the one seam
//! between the backend-independent harness ([`super::scenarios`],
//! [`super::migration`]) and each backend ([`super::memory`],
//! [`super::kafka`]).
//!
//! Instances, agents, targets and coordinators run on the core's backend
//! traits (`MessageLog`, `SnapshotStore`, `OutputSink`, `ControlChannel`);
//! a [`Deployment`] only adds what a test needs around them: producing
//! input, reading what was committed, damaging storage, and the faults the
//! backend can inject. A fault a backend cannot inject is never generated
//! for it ([`super::Scenario::generate`]).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use ms2m_core::store::SnapshotId;
use ms2m_core::{Backends, ControlChannel, ControlMessage, Error, MessageLog, OutputSink, Position, SnapshotStore};

use super::{Fault, Trigger};
use crate::Out;

/// What the deployment's output sink promises across crashes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Guarantee {
    /// A transactional sink: every output exactly once, and a released
    /// owner's commits are fenced.
    ExactlyOnce,
    /// Outputs after the last finished commit may be emitted again: at most
    /// `2 × (commit_every + poll batch - 1)` duplicates per crash.
    AtLeastOnce,
}

/// Timeouts and batch sizes of one backend (a broker round trip is
/// milliseconds; the in-memory backends answer at once).
#[derive(Clone, Copy, Debug)]
pub struct Timing {
    /// How long any single wait of a scenario may take.
    pub limit: Duration,
    /// The instance's largest poll batch (part of the at-least-once window).
    pub poll_batch: u64,
    /// How long one poll waits for input.
    pub poll_wait: Duration,
    /// The commit timer (besides `commit_every` messages).
    pub commit_interval: Duration,
    /// The migration parties' phase timeout.
    pub phase_timeout: Duration,
    /// The cutover rule's catch-up bound.
    pub max_catch_up: Duration,
    /// The cutover rule's replay bound.
    pub replay_max: Duration,
    /// How often the harness re-reads a cheap condition it waits for.
    pub recheck: Duration,
    /// How long before retrying an unavailable backend or re-reading
    /// broker-side state.
    pub retry: Duration,
}

/// How the harness intercepts a control message as it is published.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Act {
    /// Let it through; the harness acts once it is published.
    Observe,
    /// The publisher hangs there (and its task is then aborted).
    Hang,
    /// As `Hang`, but the message lands later anyway (it was in flight).
    Late,
}

/// A control-message interception: on the first message `matches`
/// accepts, apply the scenario's storage `fault` (a store outage or a
/// damaged migration snapshot, if it is one) and then `act`.
#[derive(Clone)]
pub struct Interception {
    pub matches: Arc<dyn Fn(&ControlMessage) -> bool + Send + Sync>,
    pub act: Act,
    pub fault: Fault,
    pub seed: u64,
}

/// One dead-lettered record: its payload and headers.
#[derive(Clone, Debug)]
pub struct DeadLetter {
    pub payload: Vec<u8>,
    pub headers: BTreeMap<String, String>,
}

/// Ends an injected broker fault: awaiting it waits until the broker is
/// healthy again.
pub struct FaultEnd(pub tokio::task::JoinHandle<()>);

impl FaultEnd {
    /// Runs `heal` after `hold` on a blocking thread (the fault's schedule,
    /// not an assertion).
    pub fn after(hold: Duration, heal: impl FnOnce() + Send + 'static) -> Self {
        FaultEnd(tokio::spawn(async move {
            tokio::time::sleep(hold).await;
            tokio::task::spawn_blocking(heal).await.expect("heal the broker");
        }))
    }

    pub async fn wait(self) {
        self.0.await.expect("broker fault schedule");
    }
}

/// The backends one scenario runs on, with the test-side access the
/// scenarios need. Input partitions are `0..INPUT_PARTITIONS`.
#[async_trait]
pub trait Deployment: Send + Sync + 'static {
    type Log: MessageLog;
    type Store: SnapshotStore;
    type Sink: OutputSink;
    type Control: ControlChannel;

    const TIMING: Timing;
    const GUARANTEE: Guarantee;

    fn input_topic(&self) -> &str;
    fn output_topic(&self) -> &str;
    fn dead_letter_topic(&self) -> &str;

    /// Fresh backends for one instance (its own reader and sink).
    async fn backends(&self) -> Backends<Self::Log, Self::Store, Self::Sink>;
    /// A handle on the snapshot store, as a fresh process would open it.
    async fn snapshot_store(&self) -> Arc<Self::Store>;
    /// The control channel (one per party is fine; all see one history).
    async fn control(&self) -> Arc<Self::Control>;

    /// Appends `(partition, value)`s to the input; returns once they are stored.
    async fn produce(&self, values: Vec<(i32, u64)>);
    /// Appends them from a task, paced like a live producer.
    fn produce_in_background(&self, values: Vec<(i32, u64)>) -> tokio::task::JoinHandle<()>;
    /// Appends one undecodable message to `partition`; returns its offset.
    async fn produce_undecodable(&self, partition: i32) -> i64;
    /// The input's end offsets.
    async fn input_end(&self) -> Position;

    /// Every committed output.
    async fn committed_outputs(&self) -> Vec<Out>;
    /// Every committed dead letter.
    async fn dead_letters(&self) -> Vec<DeadLetter>;
    /// Whether the owner's committed input position reaches `end`.
    async fn committed_through(&self, end: &Position) -> bool;

    /// Damages snapshot `id` (`CorruptSnapshot`, `TruncatedSnapshot` or
    /// `MissingSnapshot`); returns whether the store still lists it (so a
    /// load must reject it rather than not see it).
    async fn damage_snapshot(&self, id: SnapshotId, fault: Fault, seed: u64) -> bool;
    /// Whether `reason` is how this store reports a damaged snapshot.
    fn is_damage_rejection(reason: &Error) -> bool;
    /// Retention: deletes input partition 0's oldest records through at
    /// least offset `needed` (the log tail a snapshot needs). Returns the
    /// new earliest offset when the deletion is exact (the rest of the log
    /// is intact, so a gap-tolerant recovery can go on), `None` when only
    /// "past `needed`" is known.
    async fn expire_input_through(&self, needed: i64, seed: u64) -> Option<i64>;

    /// Starts a broker fault (`BrokerDown`, `RequestErrors`, `Latency`,
    /// `BrokerRestart`); only generated for backends that have a broker.
    async fn inject_broker_fault(&self, fault: Fault, seed: u64) -> FaultEnd {
        unreachable!("{fault:?} is not generated for this backend (seed {seed})")
    }

    /// Takes the snapshot store down or up; false if the backend cannot.
    fn set_store_unavailable(&self, _down: bool) -> bool {
        false
    }

    /// Intercepts control messages at publish time; `None` if the backend
    /// cannot (the harness then waits to see the message in the history).
    fn intercept_control(&self, _at: Interception) -> Option<Trigger> {
        None
    }

    /// Lets every control message through again.
    fn stop_intercepting(&self) {}
}
