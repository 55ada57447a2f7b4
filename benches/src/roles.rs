//! Peak memory per role: the source and the target of one MS2M migration
//! as separate OS processes.
//!
//! With every role in the harness process, `VmHWM` cannot tell the source's
//! peak from the target's or from the embedded broker's copy of the data.
//! Here the harness re-executes itself with [`ROLE_FLAG`] once per role; each
//! child connects to the parent's broker over its bootstrap address (the
//! embedded mock listens on loopback TCP), the coordinator stays in the
//! parent, and the parent reads each child's `VmHWM` from
//! `/proc/<pid>/status` once the target is live. The peak is over the
//! child's whole life: for the source that includes building its state from
//! the joins, for the target restoring it.
//!
//! A child ([`crate::child`]) prints `ready` on stdout once it serves
//! (source) or waits as a standby (target), and stops when its stdin
//! closes; the parent kills it when the [`RoleProcess`] is dropped.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use ms2m_core::migration::{SourceAgent, SourceOptions};
use ms2m_core::{no_progress, Delivery, Instance};
use ms2m_examples::game::GameSessions;
use ms2m_examples::support::spawn_serving_target;
use ms2m_kafka::{KafkaCluster, KafkaConfig};
use serde::{Deserialize, Serialize};

use crate::child::{exit_code, parent_gone, Child};
use crate::mem::{self, ProcMemory};
use crate::migration::instance_config;
use crate::BoxError;

/// The first argument that turns the harness into one role of a migration.
pub const ROLE_FLAG: &str = "__ms2m-role";

/// Which side of the migration a child plays.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Role {
    /// Owns the service and serves until the migration releases it.
    Source,
    /// Waits as a standby, restores, replays, takes over and serves.
    Target,
}

/// What a role child needs to reach the service.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RoleSpec {
    /// The side it plays.
    pub role: Role,
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
}

impl RoleSpec {
    /// The service's configuration, as the parent's `for_service` built it.
    pub fn config(&self) -> KafkaConfig {
        KafkaConfig::new(&self.service)
            .input_topic(&self.input)
            .snapshot_partitions(self.snapshot_partitions)
    }
}

/// A role child, seen from the parent. Dropping it kills the child.
#[derive(Debug)]
pub struct RoleProcess {
    child: Child,
    ready: Option<std::sync::mpsc::Receiver<()>>,
}

impl RoleProcess {
    /// Starts the harness again as `spec.role`, `env` added to its
    /// environment.
    pub fn start(spec: &RoleSpec, env: &[(&str, &str)]) -> Result<Self, BoxError> {
        let (tx, rx) = std::sync::mpsc::channel();
        let on_line = move |line: String| {
            if line.trim() == "ready" {
                let _ = tx.send(());
            }
        };
        let child = Child::start(ROLE_FLAG, spec, env, on_line, || {})?;
        Ok(Self { child, ready: Some(rx) })
    }

    /// Waits until the child says it is ready (`timeout` at most).
    pub async fn ready(&mut self, timeout: Duration) -> Result<(), BoxError> {
        let rx = self.ready.take().ok_or("ready already awaited")?;
        tokio::task::spawn_blocking(move || rx.recv_timeout(timeout))
            .await?
            .map_err(|_| format!("the role process was not ready within {timeout:?}"))?;
        Ok(())
    }

    /// The child's memory now (`VmHWM` is its peak so far).
    pub fn memory(&self) -> Option<ProcMemory> {
        mem::of_pid(self.child.pid())
    }

    /// Closes the child's stdin (it stops) and waits up to `timeout` for it.
    pub async fn finish(mut self, timeout: Duration) {
        self.child.close_stdin();
        let deadline = tokio::time::Instant::now() + timeout;
        while tokio::time::Instant::now() < deadline {
            if self.child.exited() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// In a role child (first argument [`ROLE_FLAG`]), plays the role and
/// returns the exit code; elsewhere `None` at once.
pub async fn run_role_if_requested() -> Option<i32> {
    let result = match crate::child::requested::<RoleSpec>(ROLE_FLAG)? {
        Ok(spec) => play(&spec).await,
        Err(e) => Err(e),
    };
    Some(exit_code("role process", result))
}

async fn play(spec: &RoleSpec) -> Result<(), BoxError> {
    let cluster = KafkaCluster::connect(spec.config().bootstrap_servers(&spec.bootstrap_servers))?;
    let backends = cluster.backends(Delivery::AtLeastOnce).await?;
    let control = Arc::new(cluster.control().await?);
    let config = instance_config(&format!("{:?}", spec.role).to_lowercase(), &spec.output);
    match spec.role {
        Role::Source => {
            let source = Instance::<GameSessions, _, _, _>::recover(backends, config, &*no_progress()).await?;
            let agent = SourceAgent::new(source, control, SourceOptions::default())
                .await?
                .spawn();
            println!("ready");
            parent_gone().await;
            let _ = agent.stop().await;
        }
        Role::Target => {
            let (target, stop) =
                spawn_serving_target::<GameSessions, _, _, _, _>(backends, config, control, Default::default());
            println!("ready");
            parent_gone().await;
            stop.store(true, Ordering::Relaxed);
            // A target still waiting for its migration just exits.
            if let Ok(served) = tokio::time::timeout(Duration::from_secs(10), target).await {
                served??;
            }
        }
    }
    Ok(())
}
