//! The input log: where messages come from, and how far back it reaches.

use std::time::Duration;

use async_trait::async_trait;

use crate::error::BackendError;
use crate::position::{Position, TopicPartition};
use crate::record::Record;

/// The offsets a partition spans: `low` is the earliest offset still stored,
/// `high` the offset the next appended message will get.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Watermarks {
    /// Earliest offset still in the log.
    pub low: i64,
    /// Offset of the next message to be appended.
    pub high: i64,
}

/// An ordered, replayable, partitioned log of input messages (a set of Kafka
/// partitions, or an in-memory log in tests).
///
/// Implementations read a fixed set of partitions (no rebalancing: an
/// instance owns its partitions until it hands them over) and deliver each
/// partition's messages in offset order.
#[async_trait]
pub trait MessageLog: Send + 'static {
    /// The backend's error.
    type Error: BackendError;

    /// The partitions this log reads.
    async fn partitions(&mut self) -> Result<Vec<TopicPartition>, Self::Error>;

    /// Starts (or restarts) reading each partition of `position` at its
    /// offset. Records buffered from before the call are discarded, except
    /// as follows.
    ///
    /// Seeking again to the position of the previous seek, with no `poll`
    /// in between, may keep what the backend fetched ahead meanwhile (the
    /// records are the same): a migration target seeks as soon as it knows
    /// the snapshot's position, so the input's tail is fetched while the
    /// snapshot transfers, and the restored instance seeks there again.
    async fn seek(&mut self, position: &Position) -> Result<(), Self::Error>;

    /// Up to `max` next records, waiting at most `timeout` for the first one.
    /// An empty vector means nothing arrived in time.
    async fn poll(&mut self, max: usize, timeout: Duration) -> Result<Vec<Record>, Self::Error>;

    /// The partition's current watermarks.
    async fn watermarks(&mut self, tp: &TopicPartition) -> Result<Watermarks, Self::Error>;
}
