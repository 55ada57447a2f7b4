//! One message read from the input log, and one output to emit.

use std::sync::Arc;

use bytes::Bytes;

use crate::position::TopicPartition;

/// A message read from the input log.
///
/// Cheap to clone: key, payload and header values are reference-counted.
///
/// A log may hand out the keys and payloads of many records as slices of
/// one buffer (the Kafka log does, one per poll: one allocation per batch
/// instead of two per record), and that buffer lives as long as any of
/// them. To keep a key or payload past `apply`, keep a copy
/// ([`Record::detached`], `Bytes::copy_from_slice`); the [`Raw`](crate::codec::Raw)
/// format already hands the service its own copy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    /// Topic it was read from.
    pub topic: Arc<str>,
    /// Partition it was read from.
    pub partition: i32,
    /// Its offset in that partition.
    pub offset: i64,
    /// Producer or log-append timestamp, milliseconds since the Unix epoch.
    pub timestamp_ms: Option<i64>,
    /// Message key.
    pub key: Option<Bytes>,
    /// Message value; `None` for a tombstone.
    pub payload: Option<Bytes>,
    /// Message headers, in order.
    pub headers: Vec<(String, Bytes)>,
}

impl Record {
    /// A record with a payload and no key, timestamp or headers (handy in tests).
    pub fn new(topic: impl Into<Arc<str>>, partition: i32, offset: i64, payload: impl Into<Bytes>) -> Self {
        Self {
            topic: topic.into(),
            partition,
            offset,
            timestamp_ms: None,
            key: None,
            payload: Some(payload.into()),
            headers: Vec::new(),
        }
    }

    /// This record with its own copies of key and payload: keeping it keeps
    /// no other record's bytes alive.
    pub fn detached(&self) -> Self {
        let copy = |b: &Bytes| Bytes::copy_from_slice(b);
        Self {
            topic: self.topic.clone(),
            partition: self.partition,
            offset: self.offset,
            timestamp_ms: self.timestamp_ms,
            key: self.key.as_ref().map(copy),
            payload: self.payload.as_ref().map(copy),
            headers: self.headers.clone(),
        }
    }

    /// The record's topic and partition.
    pub fn topic_partition(&self) -> TopicPartition {
        TopicPartition {
            topic: self.topic.clone(),
            partition: self.partition,
        }
    }
}

/// A message to produce: emitted by `apply` or sent to a dead-letter topic.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OutputRecord {
    /// Destination topic.
    pub topic: Arc<str>,
    /// Message key (decides the destination partition).
    pub key: Option<Bytes>,
    /// Message value.
    pub payload: Bytes,
    /// Message headers.
    pub headers: Vec<(String, Bytes)>,
}
