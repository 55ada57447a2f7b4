//! # ms2m-benches
//!
//! Benchmarks of ms2m against raw rdkafka and against the MS2M paper's
//! baselines. Two entry points:
//!
//! * `benches/*.rs`: criterion micro benchmarks (codec and snapshot
//!   envelope, digest, checkpoint pause), `cargo bench -p ms2m-benches`.
//! * `src/bin/harness.rs`: the comparison harness (B1–B7, memory, F1–F2, S1). Every
//!   comparison runs side by side in one process on the same broker, the
//!   ratio is computed per run, and the table shows medians over runs:
//!   `cargo run --release -p ms2m-benches --bin harness -- --help`.
//!
//! # Layout
//!
//! * [`report`]: result rows, medians, the markdown table and JSON.
//! * [`services`]: the benchmark services (trivial apply, echo, slow replay).
//! * [`kafka`]: topic filling and the hand-written rdkafka baselines.
//! * [`throughput`]: B2 (replay), B3 (live with outputs), B6 (recovery).
//! * [`snapshots`]: B4 (snapshot store) and B5 (checkpoint pause).
//! * [`migration`]: B1 (downtime), B7 (threshold cutoff) and peak memory.
//! * [`mem`]: peak RSS from `/proc/<pid>/status`.
//! * [`child`]: the harness re-executed as a child process (the roles,
//!   nodes and hosts below).
//! * [`roles`]: the source and the target of a migration as separate
//!   processes, for the peak memory per role.
//! * [`failover`]: F1 (failover gap) and F2 (standby lag) of a fleet of
//!   nodes, each its own process ([`nodes`]), measured from outside.
//! * [`tasks`]: S1, a partitioned service's tasks moved to a new host
//!   process, per-task stalls measured from outside.

#![warn(missing_docs, missing_debug_implementations, rust_2018_idioms, unreachable_pub)]
#![forbid(unsafe_code)]

pub mod child;
pub mod failover;
pub mod kafka;
pub mod mem;
pub mod migration;
pub mod nodes;
pub mod report;
pub mod roles;
pub mod services;
pub mod snapshots;
pub mod tasks;
pub mod throughput;

use std::sync::atomic::{AtomicU64, Ordering};

use ms2m_kafka::{KafkaCluster, KafkaConfig};

/// Errors of the harness.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// What every benchmark gets: the broker and the run settings.
#[derive(Debug)]
pub struct Bench {
    /// The shared broker (embedded mock or `--brokers`).
    pub cluster: KafkaCluster,
    /// Smoke-test sizes.
    pub quick: bool,
    /// Repetitions per comparison (medians are over these).
    pub runs: usize,
    /// Prefix making topic names unique per harness invocation.
    prefix: String,
    seq: AtomicU64,
}

impl Bench {
    /// Connects to `brokers`, or starts the embedded mock cluster.
    pub fn connect(brokers: Option<&str>, quick: bool, runs: usize) -> Result<Self, BoxError> {
        let config = KafkaConfig::new("ms2m-bench");
        let cluster = match brokers {
            Some(b) => KafkaCluster::connect(config.bootstrap_servers(b))?,
            None => KafkaCluster::embedded(config)?,
        };
        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() % 100_000)
            .unwrap_or(0);
        Ok(Self {
            cluster,
            quick,
            runs: runs.max(1),
            prefix: format!("b{stamp}"),
            seq: AtomicU64::new(0),
        })
    }

    /// Whether the broker is the embedded mock cluster.
    pub fn embedded(&self) -> bool {
        self.cluster.is_embedded()
    }

    /// A name unique within this harness invocation (and across
    /// invocations on a persistent broker).
    pub fn unique(&self, what: &str) -> String {
        let n = self.seq.fetch_add(1, Ordering::Relaxed);
        format!("{}-{what}-{n}", self.prefix)
    }

    /// The broker, configured for `service` reading `input`.
    pub fn service(&self, service: &str, input: &str) -> KafkaCluster {
        self.cluster.for_service(KafkaConfig::new(service).input_topic(input))
    }

    /// A fresh service for child processes: `{unique}.in` and
    /// `{unique}.out` with `partitions` partitions each, and the service's
    /// snapshot and control topics, all created before any child connects
    /// (their clients cannot create topics on the embedded broker).
    /// Returns the cluster configured for it, the input and the output.
    pub async fn deployment(
        &self,
        what: &str,
        partitions: i32,
        snapshot_partitions: i32,
    ) -> Result<(KafkaCluster, String, String), BoxError> {
        let service = self.unique(what);
        let (input, output) = (format!("{service}.in"), format!("{service}.out"));
        let cluster = self.cluster.for_service(
            KafkaConfig::new(&service)
                .input_topic(&input)
                .snapshot_partitions(snapshot_partitions),
        );
        cluster.create_topic(&input, partitions, &[]).await?;
        cluster.create_topic(&output, partitions, &[]).await?;
        drop(cluster.snapshot_store().await?);
        drop(cluster.control().await?);
        Ok((cluster, input, output))
    }

    /// A broker label for the report.
    pub fn broker_label(&self) -> String {
        if self.embedded() {
            "embedded (librdkafka mock cluster)".into()
        } else {
            format!("external ({})", self.cluster.bootstrap_servers())
        }
    }
}

/// Seconds as milliseconds.
pub fn ms(d: std::time::Duration) -> f64 {
    d.as_secs_f64() * 1e3
}
