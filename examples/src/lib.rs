//! Example ms2m microservices, shared by the runnable examples, the
//! migration demo, the benchmarks and the tests.
//!
//! * [`game`]: many player sessions updated by input events at a steady
//!   rate, in the spirit of the MS2M paper's Flappy Bird evaluation; its
//!   state size is configurable, which is what the demo varies.
//! * [`ledger`]: a bank ledger that emits outputs (balance updates,
//!   rejected overdrafts).
//! * [`fleet`]: the ledger as a fleet node (owner, standbys, failover),
//!   its load generator and an independent verifier.
//! * [`observer`]: downtime as an independent client in another process
//!   sees it, shared by the migration demo and the benchmark harness.
//!
//! Each service comes with a *reference fold*: a plain loop over the input
//! that computes the expected final state and outputs without the runtime,
//! Kafka, snapshots or replay, so a test or the demo can check the
//! runtime's result against it.

#![warn(missing_docs, rust_2018_idioms)]
#![forbid(unsafe_code)]

pub mod fleet;
pub mod game;
pub mod ledger;
pub mod observer;
pub mod partitioned;
pub mod support;
