//! Instance configuration, built with chained setters.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use crate::codec::OutputFormat;
use crate::service::OutputSettings;

/// Where to start reading a partition that no snapshot mentions.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum StartFrom {
    /// The earliest offset still in the log (rebuild everything).
    #[default]
    Earliest,
    /// The end of the log (only new messages).
    Latest,
}

/// What to do with a message that does not decode, or that `apply` rejects.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum BadMessagePolicy {
    /// Stop the instance with a typed error ([`Error::Decode`](crate::Error::Decode)
    /// or [`Error::Apply`](crate::Error::Apply)). The position stays before the
    /// message, so nothing is lost: fix the code or the data and restart.
    #[default]
    Fail,
    /// Produce the original message to `topic` with the reason in headers
    /// (`ms2m.error`, `ms2m.stage`, `ms2m.source.topic`,
    /// `ms2m.source.partition`, `ms2m.source.offset`), committed together
    /// with the position like any output, and move on. A payload longer
    /// than [`InstanceConfig::dead_letter_max_bytes`] is cut to that length
    /// (headers `ms2m.truncated` and `ms2m.original.bytes`): the whole
    /// record stays in the input at the coordinates the headers give, and
    /// a dead letter never fails for its size.
    DeadLetter {
        /// The dead-letter topic.
        topic: String,
    },
}

/// How an [`Instance`](crate::Instance) runs.
#[derive(Clone, Debug)]
pub struct InstanceConfig {
    pub(crate) instance_id: String,
    pub(crate) service_id: Option<String>,
    pub(crate) snapshot_every: Option<u64>,
    pub(crate) snapshot_interval: Option<Duration>,
    pub(crate) keep_snapshots: usize,
    pub(crate) commit_every: u64,
    pub(crate) commit_interval: Duration,
    pub(crate) poll_batch: usize,
    pub(crate) poll_timeout: Duration,
    pub(crate) start_from: StartFrom,
    pub(crate) allow_log_gap: bool,
    pub(crate) bad_messages: BadMessagePolicy,
    pub(crate) dead_letter_max_bytes: usize,
    pub(crate) output: OutputSettings,
    pub(crate) progress_interval: Duration,
    pub(crate) skip_inputs: BTreeSet<(String, i32, i64)>,
}

impl InstanceConfig {
    /// Defaults: snapshot every 100,000 messages or 60 s, keep 3; commit every
    /// 1,000 messages or 100 ms; start from the earliest offset; fail on bad
    /// messages; JSON outputs; no default output topic.
    pub fn new(instance_id: impl Into<String>) -> Self {
        Self {
            instance_id: instance_id.into(),
            service_id: None,
            snapshot_every: Some(100_000),
            snapshot_interval: Some(Duration::from_secs(60)),
            keep_snapshots: 3,
            commit_every: 1_000,
            commit_interval: Duration::from_millis(100),
            poll_batch: 1_000,
            poll_timeout: Duration::from_millis(100),
            start_from: StartFrom::Earliest,
            allow_log_gap: false,
            bad_messages: BadMessagePolicy::Fail,
            dead_letter_max_bytes: 900 * 1024,
            output: OutputSettings::default(),
            progress_interval: Duration::from_millis(250),
            skip_inputs: BTreeSet::new(),
        }
    }

    /// This instance's id (written into its snapshots).
    pub fn instance_id(&self) -> &str {
        &self.instance_id
    }

    /// Serves `id` instead of the whole service: the key of its control
    /// records, its snapshot series and its metrics labels. A partitioned
    /// service runs one instance per task, each with the task's id
    /// ([`task_id`](crate::fleet::task_id): `{NAME}/p{partition}`).
    /// Default: the service's [`StatefulService::NAME`](crate::StatefulService::NAME).
    pub fn service_id(mut self, id: impl Into<String>) -> Self {
        self.service_id = Some(id.into());
        self
    }

    /// The id this instance serves under: the one set with
    /// [`service_id`](Self::service_id), or `S::NAME`.
    pub fn service_id_of<S: crate::StatefulService>(&self) -> &str {
        self.service_id.as_deref().unwrap_or(S::NAME)
    }

    /// The longest wait for input (and for a shutdown request to be noticed).
    pub fn poll_timeout(&self) -> Duration {
        self.poll_timeout
    }

    /// Snapshot after this many applied messages (`None`: never by count).
    /// Default: `Some(100_000)`.
    pub fn snapshot_every(mut self, messages: Option<u64>) -> Self {
        self.snapshot_every = messages.filter(|n| *n > 0);
        self
    }

    /// Snapshot when this much time passed since the last one (`None`: never by time).
    /// Default: `Some(60 s)`.
    pub fn snapshot_interval(mut self, interval: Option<Duration>) -> Self {
        self.snapshot_interval = interval;
        self
    }

    /// How many snapshots to keep (at least 1; keep 2 or more so a corrupt
    /// newest snapshot has a fallback). Default: 3.
    pub fn keep_snapshots(mut self, keep: usize) -> Self {
        self.keep_snapshots = keep.max(1);
        self
    }

    /// Commit outputs and position after this many messages or this much time,
    /// whichever comes first. Checked after each batch, so a commit covers at
    /// most `messages + batch - 1` outputs (see [`poll`](Self::poll)). An
    /// at-least-once crash re-emits what the last finished commit did not
    /// cover: at most that (or `interval` worth), or twice that while a
    /// commit waits for the broker in the background (see the runtime's
    /// module docs).
    /// Default: 1,000 messages or 100 ms.
    pub fn commit_every(mut self, messages: u64, interval: Duration) -> Self {
        self.commit_every = messages.max(1);
        self.commit_interval = interval;
        self
    }

    /// Largest batch taken from the log at once, and the longest wait for one
    /// (also the longest a shutdown request waits). Default: 1,000 messages,
    /// 100 ms.
    pub fn poll(mut self, batch: usize, timeout: Duration) -> Self {
        self.poll_batch = batch.max(1);
        self.poll_timeout = timeout;
        self
    }

    /// Where to start partitions that no snapshot mentions. Default:
    /// [`StartFrom::Earliest`].
    pub fn start_from(mut self, start: StartFrom) -> Self {
        self.start_from = start;
        self
    }

    /// Accept a log whose earliest offset is above the snapshot position
    /// (the messages in between are lost). Off by default: recovery fails
    /// with [`Error::LogTruncated`](crate::Error::LogTruncated).
    pub fn allow_log_gap(mut self, allow: bool) -> Self {
        self.allow_log_gap = allow;
        self
    }

    /// Policy for messages that fail to decode or apply. Default:
    /// [`BadMessagePolicy::Fail`].
    pub fn bad_messages(mut self, policy: BadMessagePolicy) -> Self {
        self.bad_messages = policy;
        self
    }

    /// Input records (`topic`, `partition`, `offset`) to skip if they are
    /// bad, whatever the [`BadMessagePolicy`]: an operator's decision to get
    /// past a poison record under [`BadMessagePolicy::Fail`] (`ms2m
    /// dead-letters skip` records it on the control channel, and a
    /// [`Node`](crate::node::Node) passes every such decision here). A
    /// good record at one of these offsets is applied as usual. Default:
    /// none.
    pub fn skip_inputs(mut self, records: impl IntoIterator<Item = (String, i32, i64)>) -> Self {
        self.skip_inputs.extend(records);
        self
    }

    /// The longest payload a dead letter carries; longer ones are cut
    /// ([`BadMessagePolicy::DeadLetter`]). Default: 900 KiB, under Kafka's
    /// default `message.max.bytes` (1 MiB) with room for the headers.
    pub fn dead_letter_max_bytes(mut self, bytes: usize) -> Self {
        self.dead_letter_max_bytes = bytes;
        self
    }

    /// The topic [`ApplyContext::emit`](crate::ApplyContext::emit) writes to.
    /// Default: none (an `emit` without a topic is then an error).
    pub fn output_topic(mut self, topic: impl Into<Arc<str>>) -> Self {
        self.output.default_topic = Some(topic.into());
        self
    }

    /// How emitted values are encoded. Default: [`OutputFormat::Json`].
    pub fn output_format(mut self, format: OutputFormat) -> Self {
        self.output.format = format;
        self
    }

    /// How often progress is reported during replay. Default: 250 ms.
    pub fn progress_interval(mut self, interval: Duration) -> Self {
        self.progress_interval = interval;
        self
    }
}
