//! [`KafkaConfig`]: where the cluster is, how to talk to it, and the names
//! of every topic, group and transactional id a service uses.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use ms2m_core::TopicPartition;
use rdkafka::ClientConfig;

/// librdkafka keys whose values are secrets: redacted by `Debug`.
/// (The same list as rdkafka's `SENSITIVE_CONFIG_KEYS`, plus anything that
/// contains `password` or `secret`.)
const SENSITIVE_KEYS: &[&str] = &[
    "sasl.password",
    "ssl.key.password",
    "ssl.keystore.password",
    "ssl.truststore.password",
    "sasl.oauthbearer.client.secret",
    "ssl.key.pem",
    "ssl_key",
];

fn is_sensitive(key: &str) -> bool {
    SENSITIVE_KEYS.contains(&key) || key.contains("password") || key.contains("secret")
}

/// Default size of one snapshot chunk: 512 KiB, below the default
/// `message.max.bytes` (1,000,000) of Kafka brokers and librdkafka.
pub const DEFAULT_CHUNK_SIZE: usize = 512 * 1024;

/// Default number of partitions of a snapshot topic the store creates on
/// the embedded mock cluster (which keeps at most ~5 MiB per partition):
/// 64 × 5 MiB = 320 MiB of chunk capacity.
pub const DEFAULT_EMBEDDED_SNAPSHOT_PARTITIONS: i32 = 64;

/// What a [`KafkaConfig::for_task`] configuration adds.
#[derive(Clone, Debug)]
struct Task {
    /// The task's id.
    id: String,
    /// Appended to the group and transactional ids.
    suffix: String,
}

/// Default number of partitions of a snapshot topic the store creates on a
/// real cluster.
pub const DEFAULT_SNAPSHOT_PARTITIONS: i32 = 8;

/// Configuration of the Kafka backends of one service.
///
/// Every name is derived from the service name unless overridden:
///
/// | what | default |
/// |---|---|
/// | snapshot topic | `{service}.snapshots` |
/// | control topic | `{service}.control` |
/// | consumer group (committed input offsets) | `{service}` |
/// | transactional id (exactly-once sink) | `{service}.tx` (and `{service}.tx.probe` for the [transaction probe](crate::preflight)) |
///
/// The other defaults:
///
/// | what | default |
/// |---|---|
/// | bootstrap servers | none: [`KafkaCluster::connect`](crate::KafkaCluster::connect) refuses it |
/// | input topics / partitions | none / all partitions of the input topics |
/// | snapshot chunk size | [`DEFAULT_CHUNK_SIZE`] (512 KiB) |
/// | snapshot partitions (created topic) | [`DEFAULT_SNAPSHOT_PARTITIONS`] (8), [`DEFAULT_EMBEDDED_SNAPSHOT_PARTITIONS`] (64) on the embedded broker |
/// | replication factor (created topics) | -1: the broker's `default.replication.factor` |
/// | operation timeout | 30 s |
/// | librdkafka statistics ([`statistics_interval`](Self::statistics_interval)) | off |
///
/// Any librdkafka property can be passed through with [`set`](Self::set)
/// (security settings, timeouts, …); it applies to every client the
/// backends create. `Debug` redacts passwords and secrets.
///
/// ```
/// use ms2m_kafka::KafkaConfig;
///
/// let config = KafkaConfig::new("counter")
///     .bootstrap_servers("broker-1:9093,broker-2:9093")
///     .input_topic("numbers")
///     .set("security.protocol", "SASL_SSL")
///     .set("sasl.mechanism", "PLAIN")
///     .set("sasl.username", "counter")
///     .set("sasl.password", "hunter2");
/// assert_eq!(config.snapshot_topic(), "counter.snapshots");
/// assert!(!format!("{config:?}").contains("hunter2"));
/// ```
#[derive(Clone)]
pub struct KafkaConfig {
    service: String,
    task: Option<Task>,
    bootstrap_servers: Option<String>,
    settings: BTreeMap<String, String>,
    input_topics: Vec<String>,
    input_partitions: Option<Vec<TopicPartition>>,
    snapshot_topic: Option<String>,
    control_topic: Option<String>,
    group_id: Option<String>,
    transactional_id: Option<String>,
    chunk_size: usize,
    snapshot_partitions: Option<i32>,
    replication_factor: i32,
    operation_timeout: Duration,
    input_headers: bool,
}

impl fmt::Debug for KafkaConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let settings: BTreeMap<&str, &str> = self
            .settings
            .iter()
            .map(|(k, v)| (k.as_str(), if is_sensitive(k) { "<redacted>" } else { v.as_str() }))
            .collect();
        f.debug_struct("KafkaConfig")
            .field("service", &self.service)
            .field("bootstrap_servers", &self.bootstrap_servers)
            .field("settings", &settings)
            .field("input_topics", &self.input_topics)
            .field("input_partitions", &self.input_partitions)
            .field("snapshot_topic", &self.snapshot_topic())
            .field("control_topic", &self.control_topic())
            .field("group_id", &self.group_id())
            .field("transactional_id", &self.transactional_id())
            .field("chunk_size", &self.chunk_size)
            .field("snapshot_partitions", &self.snapshot_partitions)
            .field("replication_factor", &self.replication_factor)
            .field("operation_timeout", &self.operation_timeout)
            .field("input_headers", &self.input_headers)
            .finish()
    }
}

impl KafkaConfig {
    /// A configuration for `service` with no broker configured:
    /// [`KafkaCluster::connect`](crate::KafkaCluster::connect) refuses it
    /// until [`bootstrap_servers`](Self::bootstrap_servers) is set.
    pub fn new(service: impl Into<String>) -> Self {
        Self {
            service: service.into(),
            task: None,
            bootstrap_servers: None,
            settings: BTreeMap::new(),
            input_topics: Vec::new(),
            input_partitions: None,
            snapshot_topic: None,
            control_topic: None,
            group_id: None,
            transactional_id: None,
            chunk_size: DEFAULT_CHUNK_SIZE,
            snapshot_partitions: None,
            replication_factor: -1,
            operation_timeout: Duration::from_secs(30),
            input_headers: true,
        }
    }

    /// The cluster to connect to (`host:port[,host:port…]`). Default: none,
    /// which [`KafkaCluster::connect`](crate::KafkaCluster::connect) refuses
    /// ([`KafkaError::NoBrokerConfigured`](crate::KafkaError::NoBrokerConfigured)).
    /// An empty or blank string counts as none.
    pub fn bootstrap_servers(mut self, servers: impl Into<String>) -> Self {
        let servers = servers.into();
        self.bootstrap_servers = (!servers.trim().is_empty()).then_some(servers);
        self
    }

    /// Sets any librdkafka property on every client (e.g. `security.protocol`,
    /// `sasl.*`, `ssl.*`). `bootstrap.servers` set here counts as configured.
    pub fn set(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        let key = key.into();
        let value = value.into();
        if key == "bootstrap.servers" {
            return self.bootstrap_servers(value);
        }
        self.settings.insert(key, value);
        self
    }

    /// Adds an input topic: all of its partitions are read. Default: no
    /// input topics.
    pub fn input_topic(mut self, topic: impl Into<String>) -> Self {
        self.input_topics.push(topic.into());
        self
    }

    /// Reads exactly these partitions instead of all partitions of the input
    /// topics (an instance owning a subset of a topic). Default: all
    /// partitions of the input topics.
    pub fn input_partitions(mut self, partitions: impl IntoIterator<Item = TopicPartition>) -> Self {
        let partitions: Vec<TopicPartition> = partitions.into_iter().collect();
        for tp in &partitions {
            if !self.input_topics.iter().any(|t| **t == *tp.topic) {
                self.input_topics.push(tp.topic.to_string());
            }
        }
        self.input_partitions = Some(partitions);
        self
    }

    /// Whether input records carry their Kafka headers. Default: true.
    ///
    /// Turn it off for a service that never reads
    /// [`ApplyContext::headers`](ms2m_core::ApplyContext::headers): librdkafka
    /// parses a message's headers on first access, allocating and freeing a
    /// buffer per message even when it has none, and that parse is the
    /// largest single cost of reading a record (about a tenth of replay
    /// throughput for small messages, benchmark B2). The price: messages the
    /// service sends to a dead-letter topic lack their original headers.
    pub fn input_headers(mut self, read: bool) -> Self {
        self.input_headers = read;
        self
    }

    /// Overrides the snapshot topic (default `{service}.snapshots`).
    pub fn snapshot_topic_name(mut self, topic: impl Into<String>) -> Self {
        self.snapshot_topic = Some(topic.into());
        self
    }

    /// Overrides the control topic (default `{service}.control`).
    pub fn control_topic_name(mut self, topic: impl Into<String>) -> Self {
        self.control_topic = Some(topic.into());
        self
    }

    /// Overrides the consumer group whose committed offsets are the output
    /// watermark (default `{service}`).
    pub fn group_id_name(mut self, group: impl Into<String>) -> Self {
        self.group_id = Some(group.into());
        self
    }

    /// Overrides the exactly-once sink's `transactional.id` (default `{service}.tx`).
    pub fn transactional_id_name(mut self, id: impl Into<String>) -> Self {
        self.transactional_id = Some(id.into());
        self
    }

    /// Size of one snapshot chunk (default [`DEFAULT_CHUNK_SIZE`]). Keep it
    /// below the brokers' `message.max.bytes` minus ~1 KiB of overhead.
    pub fn snapshot_chunk_size(mut self, bytes: usize) -> Self {
        self.chunk_size = bytes.max(1);
        self
    }

    /// Number of partitions the snapshot store creates its topic with, and
    /// spreads chunks over (default [`DEFAULT_EMBEDDED_SNAPSHOT_PARTITIONS`]
    /// on the embedded broker, [`DEFAULT_SNAPSHOT_PARTITIONS`] otherwise).
    /// An existing topic keeps its own partition count.
    pub fn snapshot_partitions(mut self, partitions: i32) -> Self {
        self.snapshot_partitions = Some(partitions.max(1));
        self
    }

    /// Replication factor of the topics the library creates (snapshot and
    /// control topics); default -1, the broker's `default.replication.factor`.
    pub fn replication_factor(mut self, factor: i32) -> Self {
        self.replication_factor = factor;
        self
    }

    /// The replication factor for created topics.
    pub fn topic_replication_factor(&self) -> i32 {
        self.replication_factor
    }

    /// Timeout of blocking broker operations (metadata, commits,
    /// transactions, watermarks); default 30 s.
    pub fn operation_timeout(mut self, timeout: Duration) -> Self {
        self.operation_timeout = timeout;
        self
    }

    /// How often librdkafka reports statistics to the input log's and
    /// output sink's clients ([`ClientTelemetry`](crate::ClientTelemetry)
    /// turns them into metrics: broker round trip, messages, consumer lag).
    /// Default: off (`statistics.interval.ms` = 0); `Duration::ZERO` turns
    /// them off again. Same as `set("statistics.interval.ms", …)`.
    pub fn statistics_interval(self, every: Duration) -> Self {
        self.set("statistics.interval.ms", every.as_millis().to_string())
    }

    /// The configuration of the task serving `partition` of each input
    /// topic of a partitioned service (see [`ms2m_core::fleet`]): it reads
    /// only that partition, its snapshots and control records are keyed by
    /// the task's id ([`ms2m_core::fleet::task_id`], `{service}/p{NN}`), and
    /// its consumer group and transactional id get the suffix `.p{NN}`.
    /// Topics are shared by every task of the service.
    pub fn for_task(&self, partition: i32) -> Self {
        let mut task = self.clone();
        task.input_partitions = Some(
            self.input_topics
                .iter()
                .map(|t| TopicPartition::new(t.as_str(), partition))
                .collect(),
        );
        task.task = Some(Task {
            id: ms2m_core::fleet::task_id(&self.service, partition),
            suffix: format!(".p{partition:02}"),
        });
        task
    }

    /// The id the backends serve under: the service name, or the task's id
    /// for a [`for_task`](Self::for_task) configuration.
    pub fn service(&self) -> &str {
        self.task.as_ref().map_or(&self.service, |t| &t.id)
    }

    /// The service's name (a task's service too).
    pub fn service_name(&self) -> &str {
        &self.service
    }

    fn task_suffix(&self) -> &str {
        self.task.as_ref().map_or("", |t| &t.suffix)
    }

    /// The configured bootstrap servers, if any.
    pub fn configured_bootstrap_servers(&self) -> Option<&str> {
        self.bootstrap_servers.as_deref()
    }

    /// The input topics.
    pub fn input_topics(&self) -> &[String] {
        &self.input_topics
    }

    /// The explicit input partitions, if set.
    pub fn explicit_input_partitions(&self) -> Option<&[TopicPartition]> {
        self.input_partitions.as_deref()
    }

    /// Whether input records carry their headers (see [`input_headers`](Self::input_headers)).
    pub fn reads_input_headers(&self) -> bool {
        self.input_headers
    }

    /// The snapshot topic.
    pub fn snapshot_topic(&self) -> String {
        self.snapshot_topic
            .clone()
            .unwrap_or_else(|| format!("{}.snapshots", self.service))
    }

    /// The control topic.
    pub fn control_topic(&self) -> String {
        self.control_topic
            .clone()
            .unwrap_or_else(|| format!("{}.control", self.service))
    }

    /// The consumer group id (a task's with its suffix).
    pub fn group_id(&self) -> String {
        let group = self.group_id.clone().unwrap_or_else(|| self.service.clone());
        format!("{group}{}", self.task_suffix())
    }

    /// The transactional id (a task's with its suffix).
    pub fn transactional_id(&self) -> String {
        let id = self
            .transactional_id
            .clone()
            .unwrap_or_else(|| format!("{}.tx", self.service));
        format!("{id}{}", self.task_suffix())
    }

    /// The snapshot chunk size.
    pub fn chunk_size(&self) -> usize {
        self.chunk_size
    }

    /// The snapshot partition count override.
    pub fn snapshot_partition_count(&self) -> Option<i32> {
        self.snapshot_partitions
    }

    /// The operation timeout.
    pub fn timeout(&self) -> Duration {
        self.operation_timeout
    }

    /// The passthrough librdkafka settings.
    pub fn settings(&self) -> impl Iterator<Item = (&str, &str)> {
        self.settings.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    /// A librdkafka client configuration: `bootstrap` plus every passthrough setting.
    pub(crate) fn client_config(&self, bootstrap: &str) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", bootstrap);
        c.set("client.id", format!("ms2m-{}", self.service));
        for (k, v) in &self.settings {
            c.set(k, v);
        }
        c
    }
}

/// Tuning of the clients the library creates.
pub(crate) trait ClientTuning {
    /// `reconnect.backoff.ms` of 20 ms instead of librdkafka's 100, unless
    /// the user set it, or set `reconnect.backoff.max.ms` below 20. Every
    /// client the library creates gets it (not the configuration
    /// [`KafkaCluster::client_config`](crate::KafkaCluster::client_config)
    /// hands out for your own clients): with sparse connections
    /// (librdkafka's default) a client opens at most one connection per
    /// half of that backoff (at least 11 ms), and a fresh client whose
    /// bootstrap handle was replaced, before it connected, by the broker
    /// its metadata named waits out the rest of that interval before its
    /// first request (librdkafka issue #3574; up to 50 ms with the
    /// default, measured as benchmark B6 in BENCHMARKS.md). Reconnects
    /// after a broker failure still back off exponentially up to
    /// `reconnect.backoff.max.ms`.
    fn short_reconnect_backoff(&mut self) -> &mut Self;
}

impl ClientTuning for ClientConfig {
    fn short_reconnect_backoff(&mut self) -> &mut Self {
        let max_allows = self.get("reconnect.backoff.max.ms").is_none_or(|max| {
            max.trim()
                .parse::<u64>()
                .is_ok_and(|max| max >= SHORT_RECONNECT_BACKOFF_MS)
        });
        if self.get("reconnect.backoff.ms").is_none() && max_allows {
            self.set("reconnect.backoff.ms", SHORT_RECONNECT_BACKOFF_MS.to_string());
        }
        self
    }
}

/// See [`ClientTuning::short_reconnect_backoff`].
const SHORT_RECONNECT_BACKOFF_MS: u64 = 20;

/// `set` only where the user did not pass the key through already.
pub(crate) trait SetDefault {
    fn set_default(&mut self, key: &str, value: impl Into<String>) -> &mut Self;
}

impl SetDefault for ClientConfig {
    fn set_default(&mut self, key: &str, value: impl Into<String>) -> &mut Self {
        if self.get(key).is_none() {
            self.set(key, value);
        }
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_task_reads_its_partition_under_its_own_ids_on_the_shared_topics() {
        let service = KafkaConfig::new("svc").input_topic("in").group_id_name("g");
        let task = service.for_task(3);
        assert_eq!(task.service(), "svc/p03");
        assert_eq!(task.service_name(), "svc");
        assert_eq!(
            task.explicit_input_partitions(),
            Some(&[TopicPartition::new("in", 3)][..])
        );
        assert_eq!(
            (task.group_id(), task.transactional_id()),
            ("g.p03".into(), "svc.tx.p03".into())
        );
        assert_eq!(
            (task.snapshot_topic(), task.control_topic()),
            (service.snapshot_topic(), service.control_topic())
        );
    }

    #[test]
    fn a_short_reconnect_backoff_is_20_ms_unless_the_user_says_otherwise() {
        let backoff = |c: KafkaConfig| {
            let mut c = c.client_config("h:9092");
            c.short_reconnect_backoff();
            (
                c.get("reconnect.backoff.ms").map(str::to_string),
                c.get("reconnect.backoff.max.ms").map(str::to_string),
            )
        };
        assert_eq!(backoff(KafkaConfig::new("svc")), (Some("20".into()), None));
        let own = KafkaConfig::new("svc").set("reconnect.backoff.ms", "250");
        assert_eq!(backoff(own), (Some("250".into()), None));
        // A user's maximum of at least 20 ms keeps the short backoff; one
        // below it would make the pair invalid (librdkafka refuses a
        // maximum below the backoff), so the backoff is left to the user.
        let max = KafkaConfig::new("svc").set("reconnect.backoff.max.ms", "5000");
        assert_eq!(backoff(max), (Some("20".into()), Some("5000".into())));
        let low_max = KafkaConfig::new("svc").set("reconnect.backoff.max.ms", "10");
        assert_eq!(backoff(low_max), (None, Some("10".into())));
    }

    #[test]
    fn names_derive_from_the_service_and_can_be_overridden() {
        let c = KafkaConfig::new("svc");
        assert_eq!(c.snapshot_topic(), "svc.snapshots");
        assert_eq!(c.control_topic(), "svc.control");
        assert_eq!(c.group_id(), "svc");
        assert_eq!(c.transactional_id(), "svc.tx");
        let c = c
            .snapshot_topic_name("s")
            .control_topic_name("c")
            .group_id_name("g")
            .transactional_id_name("t");
        assert_eq!(
            (
                c.snapshot_topic(),
                c.control_topic(),
                c.group_id(),
                c.transactional_id()
            ),
            ("s".into(), "c".into(), "g".into(), "t".into())
        );
    }

    #[test]
    fn debug_redacts_secrets() {
        let c = KafkaConfig::new("svc")
            .set("sasl.password", "p4ss")
            .set("ssl.key.password", "k3y")
            .set("sasl.oauthbearer.client.secret", "s3cr3t")
            .set("sasl.username", "alice");
        let d = format!("{c:?}");
        assert!(
            !d.contains("p4ss") && !d.contains("k3y") && !d.contains("s3cr3t"),
            "{d}"
        );
        assert!(d.contains("alice"));
    }

    #[test]
    fn bootstrap_servers_via_set_counts_as_configured() {
        let c = KafkaConfig::new("svc").set("bootstrap.servers", "h:9092");
        assert_eq!(c.configured_bootstrap_servers(), Some("h:9092"));
        assert_eq!(
            KafkaConfig::new("svc")
                .bootstrap_servers("")
                .configured_bootstrap_servers(),
            None
        );
    }
}
