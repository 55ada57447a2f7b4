//! Brokers: the embedded mock cluster, and [`KafkaCluster`], the handle
//! every backend is built from.
//!
//! # Choosing the broker is explicit
//!
//! [`KafkaCluster::connect`] needs `bootstrap.servers`
//! ([`KafkaConfig::bootstrap_servers`]); without it, it fails with
//! [`KafkaError::NoBrokerConfigured`]. It used to fall back to an
//! in-process mock broker, which turned a missing setting in production into
//! outputs "committed" into memory. The embedded broker is only started by
//! [`KafkaCluster::embedded`], for tests, demos and benchmarks.
//!
//! # The embedded broker and its limits
//!
//! [`KafkaCluster::embedded`] starts librdkafka's in-process mock cluster
//! ([`EmbeddedBroker`]) and logs so ([`EMBEDDED_NOTICE`]). It needs no
//! install, but it is a test double, not Kafka:
//!
//! * each partition keeps at most ~5 MiB or 100,000 message sets; older data
//!   is evicted silently (the snapshot store spreads chunks over many
//!   partitions because of this, and detects eviction on read);
//! * no CreateTopics or DescribeConfigs API (topics are created through the
//!   mock's own API, and topic settings are neither set nor checked);
//! * transactions are accepted but **not enforced**: a second producer with
//!   the same `transactional.id` gets a new producer id instead of fencing
//!   the first, aborted records stay visible to `read_committed` consumers,
//!   and transactional offset commits (`send_offsets_to_transaction`) are
//!   not stored. The exactly-once sink therefore also commits the position
//!   with a plain offset commit after each transaction on the embedded
//!   broker (see [`KafkaSink`]), and `Delivery::ExactlyOnce` there is
//!   at-least-once in effect: allowed, because tests and benchmarks run the
//!   transactional code path on it, but no evidence of exactly-once.
//!
//! The same mock reached **by address** from another process is refused for
//! `Delivery::ExactlyOnce` ([`KafkaError::ExactlyOnceOnMockCluster`], see
//! [`preflight`](crate::preflight)): that process cannot apply the mock's
//! workaround, so recovery would find no committed position and re-emit
//! every output since the last snapshot.

use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ms2m_core::sink::Delivery;
use ms2m_core::Backends;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError as RdKafkaError, RDKafkaErrorCode};
use rdkafka::mocking::MockCluster;
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
use rdkafka::ClientConfig;
use tracing::{debug, info, warn};

use crate::config::{ClientTuning, KafkaConfig};
use crate::control::KafkaControl;
use crate::error::{blocking, KafkaError, Result};
use crate::log::KafkaLog;
use crate::sink::KafkaSink;
use crate::store::KafkaSnapshotStore;

enum Command {
    CreateTopic {
        name: String,
        partitions: i32,
        reply: mpsc::Sender<std::result::Result<(), RdKafkaError>>,
    },
    /// A fault-injection call on the mock (see [`MockFault`]).
    Fault {
        fault: MockFault,
        reply: mpsc::Sender<std::result::Result<(), RdKafkaError>>,
    },
    Stop,
}

/// A fault the embedded mock cluster can inject, for fault-injection tests
/// ([`EmbeddedBroker::inject`]). Broker ids start at 1; `-1` means all brokers.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum MockFault {
    /// The broker closes its connections and refuses new ones.
    BrokerDown(i32),
    /// The broker accepts connections again.
    BrokerUp(i32),
    /// Added round-trip time on every request to the broker (zero to clear).
    RoundTripTime(i32, Duration),
    /// The next requests of this API fail with these errors, in order.
    RequestErrors(RDKafkaApiKey, Vec<RDKafkaRespErr>),
    /// Drops the queued errors of this API.
    ClearRequestErrors(RDKafkaApiKey),
}

/// librdkafka's in-process mock cluster, owned by a dedicated thread (the
/// mock handle is not `Send`). Stops when dropped.
pub struct EmbeddedBroker {
    bootstrap: String,
    commands: Mutex<mpsc::Sender<Command>>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for EmbeddedBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedBroker")
            .field("bootstrap", &self.bootstrap)
            .finish_non_exhaustive()
    }
}

impl EmbeddedBroker {
    /// Starts a mock cluster with `brokers` brokers.
    pub fn start(brokers: i32) -> Result<Self> {
        let (cmd_tx, cmd_rx) = mpsc::channel::<Command>();
        let (ready_tx, ready_rx) = mpsc::channel::<std::result::Result<String, String>>();
        let thread = std::thread::Builder::new()
            .name("ms2m-mock-cluster".into())
            .spawn(move || {
                let cluster = match MockCluster::new(brokers) {
                    Ok(c) => c,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e.to_string()));
                        return;
                    }
                };
                let _ = ready_tx.send(Ok(cluster.bootstrap_servers()));
                while let Ok(cmd) = cmd_rx.recv() {
                    match cmd {
                        Command::CreateTopic {
                            name,
                            partitions,
                            reply,
                        } => {
                            let _ = reply.send(cluster.create_topic(&name, partitions, 1));
                        }
                        Command::Fault { fault, reply } => {
                            let result = match fault {
                                MockFault::BrokerDown(id) => cluster.broker_down(id),
                                MockFault::BrokerUp(id) => cluster.broker_up(id),
                                MockFault::RoundTripTime(id, delay) => cluster.broker_round_trip_time(id, delay),
                                MockFault::RequestErrors(api, errors) => {
                                    cluster.request_errors(api, &errors);
                                    Ok(())
                                }
                                MockFault::ClearRequestErrors(api) => {
                                    cluster.clear_request_errors(api);
                                    Ok(())
                                }
                            };
                            let _ = reply.send(result);
                        }
                        Command::Stop => break,
                    }
                }
                drop(cluster);
            })
            .map_err(|e| KafkaError::Embedded(format!("cannot spawn the mock cluster thread: {e}")))?;
        let bootstrap = ready_rx
            .recv()
            .map_err(|_| KafkaError::Embedded("mock cluster thread exited".into()))?
            .map_err(KafkaError::Embedded)?;
        Ok(Self {
            bootstrap,
            commands: Mutex::new(cmd_tx),
            thread: Mutex::new(Some(thread)),
        })
    }

    /// The mock brokers' addresses.
    pub fn bootstrap_servers(&self) -> &str {
        &self.bootstrap
    }

    /// Creates a topic (blocking, but fast: the mock runs in process).
    /// Returns `false` if it already existed.
    pub fn create_topic(&self, name: &str, partitions: i32) -> Result<bool> {
        let (tx, rx) = mpsc::channel();
        self.commands
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .send(Command::CreateTopic {
                name: name.to_string(),
                partitions,
                reply: tx,
            })
            .map_err(|_| KafkaError::Embedded("mock cluster stopped".into()))?;
        match rx
            .recv()
            .map_err(|_| KafkaError::Embedded("mock cluster stopped".into()))?
        {
            Ok(()) => Ok(true),
            Err(RdKafkaError::MockCluster(RDKafkaErrorCode::TopicAlreadyExists)) => Ok(false),
            Err(e) => Err(KafkaError::Kafka {
                operation: "create a topic on the mock cluster",
                source: e,
            }),
        }
    }

    /// Injects a fault into the mock cluster (broker down/up, added latency,
    /// request errors): the hooks fault-injection tests drive. Blocking, but
    /// fast (the mock runs in process).
    pub fn inject(&self, fault: MockFault) -> Result<()> {
        let (tx, rx) = mpsc::channel();
        self.commands
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .send(Command::Fault { fault, reply: tx })
            .map_err(|_| KafkaError::Embedded("mock cluster stopped".into()))?;
        rx.recv()
            .map_err(|_| KafkaError::Embedded("mock cluster stopped".into()))?
            .map_err(|e| KafkaError::Kafka {
                operation: "inject a fault into the mock cluster",
                source: e,
            })
    }
}

impl Drop for EmbeddedBroker {
    fn drop(&mut self) {
        let _ = self
            .commands
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .send(Command::Stop);
        if let Some(t) = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = t.join();
        }
    }
}

#[derive(Debug)]
struct Broker {
    bootstrap: String,
    embedded: Option<EmbeddedBroker>,
}

/// A connection to a cluster (real, or the embedded mock) plus one
/// service's [`KafkaConfig`]; builds the backends.
///
/// Cheap to clone; the embedded broker, if any, stops when the last clone
/// is dropped.
#[derive(Clone, Debug)]
pub struct KafkaCluster {
    broker: Arc<Broker>,
    config: Arc<KafkaConfig>,
}

/// The message logged when [`KafkaCluster::embedded`] starts the mock cluster.
pub const EMBEDDED_NOTICE: &str =
    "using the embedded librdkafka mock cluster (a test broker: data in memory, transactions not enforced)";

impl KafkaCluster {
    /// Connects to the configured `bootstrap.servers`.
    ///
    /// No network round trip happens here; clients connect lazily.
    ///
    /// # Errors
    ///
    /// [`KafkaError::NoBrokerConfigured`] when `config` names no broker:
    /// set [`KafkaConfig::bootstrap_servers`], or call
    /// [`embedded`](Self::embedded) to opt into the in-process test broker.
    pub fn connect(config: KafkaConfig) -> Result<Self> {
        let servers = config
            .configured_bootstrap_servers()
            .ok_or(KafkaError::NoBrokerConfigured)?;
        debug!(bootstrap = servers, "using configured bootstrap.servers");
        let broker = Broker {
            bootstrap: servers.to_string(),
            embedded: None,
        };
        Ok(Self {
            broker: Arc::new(broker),
            config: Arc::new(config),
        })
    }

    /// Starts librdkafka's in-process mock cluster (one broker) and
    /// connects to it: the explicit opt-in to the test broker, with the
    /// limits listed in [the module docs](self). `config`'s own
    /// `bootstrap.servers`, if any, is ignored (and a warning logged).
    pub fn embedded(config: KafkaConfig) -> Result<Self> {
        if let Some(servers) = config.configured_bootstrap_servers() {
            warn!(
                ignored = servers,
                "KafkaCluster::embedded ignores the configured bootstrap.servers"
            );
        }
        let embedded = EmbeddedBroker::start(1)?;
        info!(bootstrap = embedded.bootstrap_servers(), "{EMBEDDED_NOTICE}");
        let broker = Broker {
            bootstrap: embedded.bootstrap_servers().to_string(),
            embedded: Some(embedded),
        };
        Ok(Self {
            broker: Arc::new(broker),
            config: Arc::new(config),
        })
    }

    /// The same broker (and embedded cluster), configured for another
    /// service. `config`'s own `bootstrap.servers` is ignored.
    pub fn for_service(&self, config: KafkaConfig) -> Self {
        Self {
            broker: self.broker.clone(),
            config: Arc::new(config),
        }
    }

    /// The same broker with the configuration of the task serving
    /// `partition` ([`KafkaConfig::for_task`]).
    pub fn for_task(&self, partition: i32) -> Self {
        self.for_service(self.config.for_task(partition))
    }

    /// The service configuration.
    pub fn config(&self) -> &KafkaConfig {
        &self.config
    }

    /// The bootstrap servers in use (the mock's, when embedded).
    pub fn bootstrap_servers(&self) -> &str {
        &self.broker.bootstrap
    }

    /// The embedded broker, if this cluster is the in-process mock.
    pub fn embedded_broker(&self) -> Option<&EmbeddedBroker> {
        self.broker.embedded.as_ref()
    }

    /// Whether this is the in-process embedded mock cluster (not a mock
    /// reached by address: see [`preflight`](crate::preflight)).
    pub fn is_embedded(&self) -> bool {
        self.broker.embedded.is_some()
    }

    /// A librdkafka configuration for this cluster: bootstrap servers plus
    /// every passthrough setting of the service configuration.
    pub fn client_config(&self) -> ClientConfig {
        self.config.client_config(&self.broker.bootstrap)
    }

    /// The configuration of a client the library creates: [`client_config`](Self::client_config)
    /// with the library's tuning ([`ClientTuning`]); every client of the
    /// backends, the preflight checks and the CLI starts from it.
    pub(crate) fn library_client_config(&self) -> ClientConfig {
        let mut config = self.client_config();
        config.short_reconnect_backoff();
        config
    }

    /// Number of partitions of `topic`, `None` if it does not exist.
    pub async fn partition_count(&self, topic: &str) -> Result<Option<i32>> {
        let consumer: BaseConsumer = self
            .library_client_config()
            .create()
            .map_err(KafkaError::kafka("create a metadata client"))?;
        let topic = topic.to_string();
        let timeout = self.config.timeout();
        blocking(move || partition_count(&consumer, &topic, timeout)).await
    }

    /// Creates `topic` with `partitions` partitions and topic `settings`
    /// (e.g. `cleanup.policy=compact`); an existing topic is left as it is.
    /// Returns whether it was created. Waits until the topic is visible in
    /// metadata.
    ///
    /// On the embedded broker topic settings are ignored (the mock has no
    /// topic configuration).
    pub async fn create_topic(&self, topic: &str, partitions: i32, settings: &[(&str, &str)]) -> Result<bool> {
        if self.embedded_broker().is_none() && self.partition_count(topic).await?.is_some_and(|n| n > 0) {
            // Already there: no admin request (the embedded broker reached
            // by address from another process does not answer CreateTopics).
            return Ok(false);
        }
        let created = match self.embedded_broker() {
            Some(embedded) => embedded.create_topic(topic, partitions)?,
            None => {
                let admin: AdminClient<DefaultClientContext> = self
                    .library_client_config()
                    .create()
                    .map_err(KafkaError::kafka("create an admin client"))?;
                let mut new = NewTopic::new(topic, partitions, TopicReplication::Fixed(self.replication_factor()));
                for (k, v) in settings {
                    new = new.set(k, v);
                }
                let opts = AdminOptions::new().operation_timeout(Some(self.config.timeout()));
                let results = admin
                    .create_topics([&new], &opts)
                    .await
                    .map_err(KafkaError::kafka("create a topic"))?;
                match results.into_iter().next() {
                    Some(Ok(_)) | None => true,
                    Some(Err((_, RDKafkaErrorCode::TopicAlreadyExists))) => false,
                    Some(Err((topic, code))) => return Err(KafkaError::CreateTopic { topic, code }),
                }
            }
        };
        if created {
            info!(topic, partitions, "created topic");
        }
        // Wait until the topic is visible (metadata propagates asynchronously).
        let deadline = Instant::now() + self.config.timeout();
        loop {
            if self.partition_count(topic).await?.is_some_and(|n| n > 0) {
                return Ok(created);
            }
            if Instant::now() >= deadline {
                return Err(KafkaError::Timeout {
                    operation: "see a created topic in metadata",
                    timeout: self.config.timeout(),
                });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn replication_factor(&self) -> i32 {
        self.config.topic_replication_factor()
    }

    /// The input log over the configured input topics (or partitions).
    pub async fn log(&self) -> Result<KafkaLog> {
        KafkaLog::new(self).await
    }

    /// The snapshot store (creates its compacted topic if missing).
    pub async fn snapshot_store(&self) -> Result<KafkaSnapshotStore> {
        KafkaSnapshotStore::new(self).await
    }

    /// The output sink with the given guarantee.
    pub async fn sink(&self, delivery: Delivery) -> Result<KafkaSink> {
        KafkaSink::new(self, delivery).await
    }

    /// The control channel (creates its topic if missing).
    pub async fn control(&self) -> Result<KafkaControl> {
        KafkaControl::new(self).await
    }

    /// Log, snapshot store and sink, ready for
    /// [`Instance::recover`](ms2m_core::Instance::recover).
    ///
    /// The sink is built first, so that a broker that cannot give
    /// `delivery` is refused before anything else is set up (see
    /// [`preflight`](crate::preflight)).
    pub async fn backends(&self, delivery: Delivery) -> Result<Backends<KafkaLog, KafkaSnapshotStore, KafkaSink>> {
        let sink = self.sink(delivery).await?;
        Ok(Backends {
            log: self.log().await?,
            store: Arc::new(self.snapshot_store().await?),
            sink,
        })
    }
}

/// Fills a client's leader cache for `topic` (blocking): call it once,
/// before the first `fetch_watermarks` of a client created just now;
/// `operation` names the read in the error.
///
/// librdkafka looks up the partition's leader before it lists offsets
/// (`rd_kafka_topic_partition_list_query_leaders`). When the client's first
/// connection is not up yet it skips that metadata request ("Skipping
/// metadata refresh ...: no usable brokers"), then waits 200, then 300 ms
/// ... for its cache to change before it asks again: the second request
/// left 500–750 ms after the first, in about one B6 recovery in fifty on
/// the embedded broker. A metadata request of our own waits for a
/// connection instead, and its answer names the leaders, so the watermark
/// read that follows goes out at once. On a fresh client it takes the place
/// of the request librdkafka would have sent; on a connected one it is an
/// extra round trip, which is why long-lived clients make it only once.
pub(crate) fn learn_leaders<C: rdkafka::consumer::ConsumerContext>(
    consumer: &impl Consumer<C>,
    topic: &str,
    timeout: Duration,
    operation: &'static str,
) -> Result<()> {
    consumer
        .fetch_metadata(Some(topic), timeout)
        .map(drop)
        .map_err(KafkaError::kafka(operation))
}

/// Partition count of a topic from metadata (blocking).
pub(crate) fn partition_count<C: rdkafka::consumer::ConsumerContext>(
    consumer: &impl Consumer<C>,
    topic: &str,
    timeout: Duration,
) -> Result<Option<i32>> {
    let md = consumer
        .fetch_metadata(Some(topic), timeout)
        .map_err(KafkaError::kafka("fetch metadata"))?;
    Ok(md.topics().iter().find(|t| t.name() == topic).and_then(|t| {
        if t.error().is_some() || t.partitions().is_empty() {
            None
        } else {
            Some(t.partitions().len() as i32)
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_without_a_broker_names_the_setting() {
        let error = KafkaCluster::connect(KafkaConfig::new("svc")).unwrap_err();
        assert!(matches!(error, KafkaError::NoBrokerConfigured), "{error:?}");
        let message = error.to_string();
        assert!(
            message.contains("bootstrap.servers") && message.contains("KafkaCluster::embedded"),
            "{message}"
        );
    }

    #[test]
    fn embedded_is_an_explicit_opt_in() {
        let cluster = KafkaCluster::embedded(KafkaConfig::new("svc")).unwrap();
        assert!(cluster.is_embedded());
        assert_eq!(
            cluster.bootstrap_servers(),
            cluster.embedded_broker().unwrap().bootstrap_servers()
        );
        let configured = KafkaCluster::connect(KafkaConfig::new("svc").bootstrap_servers("h:9092")).unwrap();
        assert!(!configured.is_embedded());
    }
}
