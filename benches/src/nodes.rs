//! Fleet nodes as separate OS processes, for the failover benchmarks
//! ([`crate::failover`]).
//!
//! The harness re-executes itself with [`NODE_FLAG`] (the pattern of
//! [`crate::roles`]); the child runs one [`Node`] of the
//! [`GameSessions`] service over the parent's broker (the embedded mock
//! listens on loopback TCP) until its stdin closes, and prints one
//! [`Beat`] (a JSON line) whenever its role or owner changes, and at most
//! every [`BEAT_EVERY`] otherwise, stamped with the cross-process
//! `CLOCK_MONOTONIC` ([`now_us`]). The parent follows the beats, can
//! `SIGKILL` the child ([`NodeProcess::kill`]), and kills it when the
//! [`NodeProcess`] is dropped, on every exit path.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use ms2m_core::migration::protocol::owner::LeaseConfig;
use ms2m_core::node::{Node, NodeOptions, NodeRole, NodeStatus};
use ms2m_core::{Component, Delivery, Error, InstanceConfig};
use ms2m_examples::game::GameSessions;
use ms2m_examples::observer::now_us;
use ms2m_kafka::{KafkaCluster, KafkaConfig};
use serde::{Deserialize, Serialize};

use crate::child::{exit_code, parent_gone, Child};
use crate::BoxError;

/// The first argument that turns the harness into a fleet node.
pub const NODE_FLAG: &str = "__ms2m-node";

/// The longest a child stays silent while nothing changes.
pub const BEAT_EVERY: Duration = Duration::from_millis(50);

/// What a node child needs: its id, the broker, the service, the lease.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct NodeSpec {
    /// The node's instance id.
    pub instance: String,
    /// The parent's broker.
    pub bootstrap_servers: String,
    /// Service name (group, snapshot and control topics derive from it).
    pub service: String,
    /// Input topic.
    pub input: String,
    /// Output topic.
    pub output: String,
    /// Partitions of the snapshot topic.
    pub snapshot_partitions: i32,
    /// Lease renewal interval, ms.
    pub lease_interval_ms: u64,
    /// Lease timeout, ms.
    pub lease_timeout_ms: u64,
    /// Lease margin (longest apply step), ms.
    pub lease_margin_ms: u64,
}

impl NodeSpec {
    /// The service's configuration, as the parent's `for_service` built it.
    pub fn config(&self) -> KafkaConfig {
        KafkaConfig::new(&self.service)
            .input_topic(&self.input)
            .snapshot_partitions(self.snapshot_partitions)
            .bootstrap_servers(&self.bootstrap_servers)
    }

    /// The lease the node runs with.
    pub fn lease(&self) -> LeaseConfig {
        LeaseConfig {
            interval: Duration::from_millis(self.lease_interval_ms),
            timeout: Duration::from_millis(self.lease_timeout_ms),
            margin: Duration::from_millis(self.lease_margin_ms),
            ..LeaseConfig::default()
        }
    }
}

/// One status line of a node child.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Beat {
    /// When the child printed it ([`now_us`]).
    pub at_us: u64,
    /// The node's role.
    pub role: NodeRole,
    /// The owner the channel names, and its epoch.
    pub owner: Option<(String, u64)>,
    /// `NodeStatus::lag`: a standby's distance to the owner's committed
    /// position.
    pub lag: Option<u64>,
    /// The position applied (sum of the next offsets over partitions).
    pub position: i64,
}

impl Beat {
    fn of(status: &NodeStatus) -> Self {
        Self {
            at_us: now_us(),
            role: status.role,
            owner: status.owner.clone(),
            lag: status.lag,
            position: status.position.total(),
        }
    }
}

#[derive(Debug, Default)]
struct Beats {
    last: Option<Beat>,
    /// `(at_us, role)` at every role change.
    roles: Vec<(u64, NodeRole)>,
    closed: bool,
}

/// A node child, seen from the parent. Dropping it kills the child.
#[derive(Debug)]
pub struct NodeProcess {
    child: Child,
    beats: Arc<Mutex<Beats>>,
}

impl NodeProcess {
    /// Starts the harness again as the node `spec`.
    pub fn start(spec: &NodeSpec) -> Result<Self, BoxError> {
        let beats: Arc<Mutex<Beats>> = Arc::default();
        let (sink, closed) = (beats.clone(), beats.clone());
        let child = Child::start(
            NODE_FLAG,
            spec,
            &[],
            move |line| record(&line, &sink),
            move || lock(&closed).closed = true,
        )?;
        Ok(Self { child, beats })
    }

    /// The latest beat.
    pub fn latest(&self) -> Option<Beat> {
        self.lock().last.clone()
    }

    /// When the node first reported `role` at or after `since_us`.
    pub fn became(&self, role: NodeRole, since_us: u64) -> Option<u64> {
        self.lock()
            .roles
            .iter()
            .find(|&&(at, r)| r == role && at >= since_us)
            .map(|&(at, _)| at)
    }

    /// Waits until a beat satisfies `done` (`timeout` at most).
    pub async fn wait_for(
        &self,
        what: &str,
        timeout: Duration,
        done: impl Fn(&Beat) -> bool,
    ) -> Result<Beat, BoxError> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            {
                let beats = self.lock();
                if let Some(beat) = beats.last.as_ref().filter(|b| done(b)) {
                    return Ok(beat.clone());
                }
                if beats.closed {
                    return Err(format!("the node process exited before {what}").into());
                }
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(format!("no {what} within {timeout:?} (last: {:?})", self.latest()).into());
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// `SIGKILL`s the child; returns the instant just before the signal.
    pub fn kill(&mut self) -> u64 {
        let at = now_us();
        self.child.kill();
        at
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Beats> {
        lock(&self.beats)
    }
}

fn lock(beats: &Mutex<Beats>) -> std::sync::MutexGuard<'_, Beats> {
    beats.lock().unwrap_or_else(|p| p.into_inner())
}

/// Records a status line of the child.
fn record(line: &str, beats: &Mutex<Beats>) {
    let Ok(beat) = serde_json::from_str::<Beat>(line) else {
        return;
    };
    let mut b = lock(beats);
    if b.last.as_ref().is_none_or(|l| l.role != beat.role) {
        b.roles.push((beat.at_us, beat.role));
    }
    b.last = Some(beat);
}

/// In a node child (first argument [`NODE_FLAG`]), runs the node and
/// returns the exit code; elsewhere `None` at once.
pub async fn run_node_if_requested() -> Option<i32> {
    let spec = crate::child::requested::<NodeSpec>(NODE_FLAG)?;
    ms2m_examples::support::init_logging();
    let result = match spec {
        Ok(spec) => run(&spec).await,
        Err(e) => Err(e),
    };
    Some(exit_code("node process", result))
}

/// The instance settings of every node: commits as in B1, no periodic
/// snapshots (the standby replays the joins, which rebuild the state; a
/// warm standby's takeover restores nothing).
fn instance_config(spec: &NodeSpec) -> InstanceConfig {
    crate::migration::instance_config(&spec.instance, &spec.output)
}

async fn run(spec: &NodeSpec) -> Result<(), BoxError> {
    let cluster = KafkaCluster::connect(spec.config())?;
    let control = Arc::new(cluster.control().await?);
    let factory = move || {
        let cluster = cluster.clone();
        async move {
            cluster
                .backends(Delivery::AtLeastOnce)
                .await
                .map_err(|e| Error::backend(Component::Log, "create the Kafka backends", e))
        }
    };
    let options = NodeOptions {
        lease: spec.lease(),
        ..NodeOptions::default()
    };
    let node = Node::<GameSessions, _, _, _, _, _>::new(factory, control, instance_config(spec), options)?;
    let printer = tokio::spawn(print_beats(node.status()));
    let result = node.run(parent_gone()).await;
    printer.abort();
    Ok(result?)
}

/// Prints a [`Beat`] on every role or owner change, else at most every
/// [`BEAT_EVERY`].
async fn print_beats(mut status: tokio::sync::watch::Receiver<NodeStatus>) {
    let mut last: Option<Beat> = None;
    let mut tick = tokio::time::interval(BEAT_EVERY);
    loop {
        tokio::select! {
            changed = status.changed() => if changed.is_err() { return },
            _ = tick.tick() => {}
        }
        let beat = Beat::of(&status.borrow_and_update());
        let due = last.as_ref().is_none_or(|l| {
            l.role != beat.role || l.owner != beat.owner || beat.at_us - l.at_us >= BEAT_EVERY.as_micros() as u64
        });
        if due {
            if let Ok(line) = serde_json::to_string(&beat) {
                println!("{line}");
            }
            last = Some(beat);
        }
    }
}
