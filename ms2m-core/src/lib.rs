//! # ms2m-core
//!
//! Stateful microservices on a message log: snapshots bound to exact input
//! offsets, recovery from snapshot plus log tail, and live migration with
//! near-zero downtime (the MS2M scheme). This crate has no Kafka dependency;
//! `ms2m-kafka` provides the rdkafka backends.
//!
//! # The model
//!
//! A service is a state ([`ServiceState`]: snapshot, restore, digest —
//! usually derived) plus how one message changes it
//! ([`StatefulService::apply`]). The runtime ([`Instance`]) tracks the
//! [`Position`] after every applied message, so every snapshot says exactly
//! which messages it contains. A fresh instance restores the newest snapshot
//! that verifies and replays the log from its position; outputs of messages
//! that were already emitted are suppressed during that replay.
//!
//! # Example
//!
//! A counter, run over the in-memory backends (feature `test`):
//!
//! ```
//! # #[cfg(feature = "test")] {
//! use ms2m_core::{memory::*, ApplyContext, Backends, Instance, InstanceConfig, StatefulService, ServiceState};
//! use std::{convert::Infallible, sync::Arc};
//!
//! #[derive(Default, ServiceState, serde::Serialize, serde::Deserialize)]
//! #[state(version = 1)]
//! struct Counter {
//!     total: u64,
//! }
//!
//! #[async_trait::async_trait]
//! impl StatefulService for Counter {
//!     const NAME: &'static str = "counter";
//!     type Message = u64;
//!     type Format = ms2m_core::codec::Json;
//!     type Error = Infallible;
//!
//!     async fn apply(&mut self, n: u64, ctx: &mut ApplyContext<'_>) -> Result<(), Infallible> {
//!         self.total += n;
//!         ctx.emit(&self.total);
//!         Ok(())
//!     }
//! }
//!
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! let log = MemoryLog::new("numbers", 1);
//! for n in 1..=10u64 {
//!     log.append("numbers", 0, None, n.to_string());
//! }
//! let outputs = MemoryOutputs::new();
//! let backends = Backends { log: log.reader(), store: Arc::new(MemorySnapshotStore::new()), sink: outputs.sink() };
//! let config = InstanceConfig::new("counter-1").output_topic("totals");
//! let mut counter = Instance::<Counter, _, _, _>::recover(backends, config, &*ms2m_core::no_progress()).await?;
//! while counter.position().total() < 10 {
//!     counter.step().await?;
//! }
//! counter.shutdown().await?;
//! assert_eq!(counter.state().total, 55);
//! assert_eq!(outputs.committed().len(), 10);
//! # Ok::<_, ms2m_core::Error>(()) }).unwrap();
//! # }
//! ```
//!
//! # Layout
//!
//! * [`service`], [`state`]: the traits a service implements.
//! * [`snapshot`], [`codec`], [`digest`]: the envelope, the codec, the digest.
//! * [`log`], [`store`], [`sink`], [`control`]: backend traits;
//!   [`fs_store`] a filesystem snapshot store; `memory` in-memory backends.
//! * [`runtime`]: the instance runtime and recovery.
//! * [`migration`]: live migration.
//! * [`metrics`]: every metric name recorded (through the `metrics` facade);
//!   [`health`]: liveness and readiness of an instance.

#![warn(missing_docs, missing_debug_implementations, rust_2018_idioms, unreachable_pub)]
#![forbid(unsafe_code)]

pub mod codec;
pub mod control;
pub mod digest;
pub mod error;
pub mod fleet;
pub mod fs_store;
pub mod health;
pub mod heavy;
pub mod log;
#[cfg(any(test, feature = "test"))]
pub mod memory;
pub mod metrics;
pub mod migration;
pub mod node;
pub mod position;
pub mod record;
pub mod runtime;
pub mod service;
pub mod sink;
pub mod snapshot;
pub mod state;
pub mod store;
pub mod streamed;
#[cfg(any(test, feature = "test"))]
pub mod testkit;

pub use control::{ControlBody, ControlChannel, ControlMessage, ControlReader, LeaseTerm, Role};
pub use digest::{Digester, StateDigest};
pub use error::{BackendError, BoxError, Component, Error, ErrorKind, Result};
pub use health::{Health, HealthReport};
pub use log::{MessageLog, Watermarks};
pub use position::{Position, TopicPartition};
pub use record::{OutputRecord, Record};
pub use runtime::{
    no_progress, Backends, BadMessagePolicy, CheckpointInfo, Instance, InstanceConfig, InstanceStats, Progress,
    ProgressListener, ProgressPhase, StartFrom,
};
pub use service::{ApplyContext, Mode, StatefulService};
pub use sink::{BackgroundCommit, Delivery, OutputSink};
pub use snapshot::{Snapshot, SnapshotError, SnapshotHeader};
pub use state::{Frozen, ServiceState, StateError};
pub use store::{SnapshotId, SnapshotStore};

/// `#[derive(ServiceState)]`: snapshot, restore and digest for a state struct.
#[cfg(feature = "derive")]
pub use ms2m_macros::ServiceState;

#[doc(hidden)]
pub mod __private {
    //! Re-exports for generated code; not a public API.
    pub use serde;
}
