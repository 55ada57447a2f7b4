//! The service half: how one message changes the state.

use std::error::Error as StdError;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use serde::Serialize;

use crate::codec::{CodecError, MessageFormat, OutputFormat};
use crate::record::{OutputRecord, Record};
use crate::state::ServiceState;

/// A stateful microservice: a [`ServiceState`] plus how a message changes it.
///
/// # The contract of `apply`
///
/// `apply` must be **deterministic**: the same state and the same message
/// must give the same new state and the same outputs, in any process, at any
/// time. That is what lets a fresh instance rebuild the state by replaying
/// the log, and what the digest check at migration cutover verifies. So
/// inside `apply`:
///
/// * no wall clock: use [`ApplyContext::timestamp_ms`], the message's own time;
/// * no randomness unless seeded from the message;
/// * no I/O whose answer can change (no database reads, no HTTP calls);
/// * emit outputs only through [`ApplyContext::emit`], never by producing
///   directly: during replay the context suppresses them, because they were
///   already emitted the first time.
///
/// If `apply` returns an error the state must be unchanged (or the instance
/// must be allowed to fail, the default policy); see
/// [`BadMessagePolicy`](crate::BadMessagePolicy).
///
/// Messages from different partitions may interleave differently in another
/// process (Kafka orders messages within a partition only), so the state
/// should not depend on the order of messages *across* partitions.
#[async_trait]
pub trait StatefulService: ServiceState + Default {
    /// The service's name: written into snapshots and used to derive topic,
    /// group and transactional ids.
    const NAME: &'static str;

    /// The decoded input message.
    type Message: Send + 'static;

    /// How a raw record is decoded into [`Self::Message`]: [`Json`](crate::codec::Json),
    /// [`Bincode`](crate::codec::Bincode), [`Raw`](crate::codec::Raw) or your own.
    type Format: MessageFormat<Self::Message>;

    /// The service's own (domain) error.
    type Error: StdError + Send + Sync + 'static;

    /// Applies one message to the state. See the trait docs for the contract.
    async fn apply(&mut self, message: Self::Message, ctx: &mut ApplyContext<'_>) -> Result<(), Self::Error>;
}

/// Whether outputs are being emitted or suppressed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Mode {
    /// Rebuilding state from messages whose outputs were already emitted:
    /// outputs are counted and dropped.
    Replay,
    /// Processing new messages: outputs are produced.
    Live,
}

/// Outputs collected while applying messages (owned by the runtime).
#[derive(Debug, Default)]
pub(crate) struct OutputBuffer {
    pub(crate) records: Vec<OutputRecord>,
    pub(crate) suppressed: u64,
    pub(crate) error: Option<CodecError>,
}

/// Where outputs go when `apply` does not name a topic.
#[derive(Debug, Clone, Default)]
pub(crate) struct OutputSettings {
    pub(crate) default_topic: Option<Arc<str>>,
    pub(crate) format: OutputFormat,
}

/// What `apply` can see of the message and do besides changing the state.
#[derive(Debug)]
pub struct ApplyContext<'a> {
    record: &'a Record,
    mode: Mode,
    settings: &'a OutputSettings,
    outputs: &'a mut OutputBuffer,
}

impl<'a> ApplyContext<'a> {
    pub(crate) fn new(
        record: &'a Record,
        mode: Mode,
        settings: &'a OutputSettings,
        outputs: &'a mut OutputBuffer,
    ) -> Self {
        Self {
            record,
            mode,
            settings,
            outputs,
        }
    }

    /// Whether this message is being replayed (outputs suppressed).
    pub fn is_replaying(&self) -> bool {
        self.mode == Mode::Replay
    }

    /// Replay or live.
    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// The raw record being applied.
    pub fn record(&self) -> &Record {
        self.record
    }

    /// The message's topic.
    pub fn topic(&self) -> &str {
        &self.record.topic
    }

    /// The message's partition.
    pub fn partition(&self) -> i32 {
        self.record.partition
    }

    /// The message's offset.
    pub fn offset(&self) -> i64 {
        self.record.offset
    }

    /// The message's key.
    pub fn key(&self) -> Option<&[u8]> {
        self.record.key.as_deref()
    }

    /// The message's timestamp (ms since the Unix epoch): use this, never the wall clock.
    pub fn timestamp_ms(&self) -> Option<i64> {
        self.record.timestamp_ms
    }

    /// The message's headers.
    pub fn headers(&self) -> &[(String, Bytes)] {
        &self.record.headers
    }

    /// Emits an output to the configured output topic, encoded with the
    /// configured [`OutputFormat`]. Suppressed during replay.
    pub fn emit<T: Serialize + ?Sized>(&mut self, value: &T) {
        self.emit_inner(None, None, value)
    }

    /// Emits a keyed output to the configured output topic.
    pub fn emit_keyed<T: Serialize + ?Sized>(&mut self, key: impl AsRef<[u8]>, value: &T) {
        self.emit_inner(None, Some(Bytes::copy_from_slice(key.as_ref())), value)
    }

    /// Emits a keyed output to a named topic.
    pub fn emit_to<T: Serialize + ?Sized>(&mut self, topic: &str, key: Option<&[u8]>, value: &T) {
        self.emit_inner(Some(topic), key.map(Bytes::copy_from_slice), value)
    }

    /// Emits pre-encoded bytes (to `topic`, or the configured output topic).
    pub fn emit_raw(&mut self, topic: Option<&str>, key: Option<Bytes>, payload: Bytes) {
        if self.mode == Mode::Replay {
            self.outputs.suppressed += 1;
            return;
        }
        match self.resolve_topic(topic) {
            Some(topic) => self.outputs.records.push(OutputRecord {
                topic,
                key,
                payload,
                headers: Vec::new(),
            }),
            None => {
                self.outputs.error.get_or_insert(CodecError::NoOutputTopic);
            }
        }
    }

    fn resolve_topic(&self, topic: Option<&str>) -> Option<Arc<str>> {
        match topic {
            Some(t) => Some(Arc::from(t)),
            None => self.settings.default_topic.clone(),
        }
    }

    fn emit_inner<T: Serialize + ?Sized>(&mut self, topic: Option<&str>, key: Option<Bytes>, value: &T) {
        if self.mode == Mode::Replay {
            self.outputs.suppressed += 1;
            return;
        }
        match self.settings.format.encode(value) {
            Ok(payload) => self.emit_raw(topic, key, payload),
            Err(e) => {
                self.outputs.error.get_or_insert(e);
            }
        }
    }
}
