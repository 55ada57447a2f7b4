//! # ms2m-kafka
//!
//! Kafka backends for [`ms2m_core`], over rdkafka (librdkafka):
//!
//! | core trait | Kafka type | on Kafka |
//! |---|---|---|
//! | [`MessageLog`](ms2m_core::MessageLog) | [`KafkaLog`] | manual `assign` of the input partitions, `seek` to snapshot positions, watermarks and lag |
//! | [`SnapshotStore`](ms2m_core::SnapshotStore) | [`KafkaSnapshotStore`] | a compacted topic, snapshots in checksummed chunks with a manifest written last |
//! | [`OutputSink`](ms2m_core::OutputSink) | [`KafkaSink`] | transactional producer (exactly-once) or idempotent producer (at-least-once) |
//! | [`ControlChannel`](ms2m_core::ControlChannel) | [`KafkaControl`] | a single-partition topic |
//!
//! All of them are built from a [`KafkaCluster`]:
//! [`KafkaCluster::connect`] connects to the configured `bootstrap.servers`
//! (and fails with [`KafkaError::NoBrokerConfigured`] when there is none);
//! [`KafkaCluster::embedded`] starts librdkafka's in-process mock cluster
//! ([`EmbeddedBroker`]) instead, an explicit opt-in for tests and demos.
//! A broker or topic that cannot give the promised guarantee is refused at
//! start ([`preflight`]).
//!
//! # Example
//!
//! ```no_run
//! use ms2m_core::{Delivery, Instance, InstanceConfig};
//! use ms2m_kafka::{KafkaCluster, KafkaConfig};
//! # use ms2m_core::{ApplyContext, StatefulService, ServiceState, StateDigest, StateError};
//! # use ms2m_core::codec::CodecError;
//! # #[derive(Default)] struct Counter { total: u64 }
//! # impl ServiceState for Counter {
//! #     const SCHEMA_VERSION: u32 = 1;
//! #     fn snapshot(&self) -> Result<Vec<u8>, CodecError> { ms2m_core::codec::encode(&self.total) }
//! #     fn restore(_: u32, b: &[u8]) -> Result<Self, StateError> {
//! #         Ok(Self { total: ms2m_core::codec::decode(b).map_err(|source| StateError::Decode { version: 1, source })? })
//! #     }
//! #     fn digest(&self) -> StateDigest { ms2m_core::digest::digest_of(&self.total) }
//! # }
//! # #[async_trait::async_trait]
//! # impl StatefulService for Counter {
//! #     const NAME: &'static str = "counter";
//! #     type Message = u64;
//! #     type Format = ms2m_core::codec::Json;
//! #     type Error = std::convert::Infallible;
//! #     async fn apply(&mut self, n: u64, ctx: &mut ApplyContext<'_>) -> Result<(), Self::Error> {
//! #         self.total += n; ctx.emit(&self.total); Ok(())
//! #     }
//! # }
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! // The in-process test broker, by explicit opt-in (`KafkaCluster::connect`
//! // with `bootstrap_servers` for a real cluster).
//! let cluster = KafkaCluster::embedded(KafkaConfig::new("counter").input_topic("numbers"))?;
//! cluster.create_topic("numbers", 4, &[]).await?;
//! let backends = cluster.backends(Delivery::ExactlyOnce).await?;
//! let config = InstanceConfig::new("counter-1").output_topic("totals");
//! let mut counter = Instance::<Counter, _, _, _>::recover(backends, config, &*ms2m_core::no_progress()).await?;
//! // Run live for a minute, then shut down gracefully (commit, final snapshot).
//! counter.run(tokio::time::sleep(std::time::Duration::from_secs(60))).await?;
//! # Ok(()) }
//! ```
//!
//! # Layout
//!
//! * [`config`]: [`KafkaConfig`], names of topics, group and transactional id,
//!   librdkafka passthrough (security settings).
//! * [`broker`]: [`KafkaCluster`], [`EmbeddedBroker`], topic creation.
//! * [`log`], [`store`], [`sink`], [`control`]: the backends.
//! * [`preflight`]: the checks that refuse a broker or topic at start.
//! * [`error`]: [`KafkaError`], mapped into [`ms2m_core::ErrorKind`].
//! * `cli` (feature `cli`): the `ms2m` operator command line.
//! * [`telemetry`]: [`ClientTelemetry`] (librdkafka statistics and errors
//!   to metrics and logs) and, with the `prometheus` feature,
//!   `telemetry::serve_prometheus` (`/metrics`, `/health/live`, `/health/ready`).
//!
//! Every blocking librdkafka call (metadata, watermarks, commits,
//! transactions) runs on tokio's blocking pool, never on a runtime worker.

#![warn(missing_docs, missing_debug_implementations, rust_2018_idioms, unreachable_pub)]
#![forbid(unsafe_code)]

pub mod broker;
#[cfg(feature = "cli")]
pub mod cli;
pub mod config;
pub mod control;
pub mod error;
pub mod log;
mod off_runtime;
pub mod preflight;
pub mod sink;
pub mod store;
pub mod telemetry;

pub use broker::{EmbeddedBroker, KafkaCluster, EMBEDDED_NOTICE};
pub use config::KafkaConfig;
pub use control::{KafkaControl, KafkaControlReader};
pub use error::{KafkaError, Result};
pub use log::{KafkaLog, PartitionLag};
pub use ms2m_core::Delivery;
pub use sink::KafkaSink;
pub use store::{KafkaSnapshotStore, Manifest};
pub use telemetry::ClientTelemetry;
