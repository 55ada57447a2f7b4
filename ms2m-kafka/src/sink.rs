//! [`KafkaSink`]: outputs produced to Kafka and committed with the input
//! position that produced them.
//!
//! # Exactly-once ([`Delivery::ExactlyOnce`])
//!
//! A transactional producer with `transactional.id` = `{service}.tx`.
//! `claim` calls `init_transactions`, which fences every earlier producer
//! with that id (epoch bump) and aborts its open transaction. A transaction
//! begins at the first output (or commit) after the previous commit;
//! `commit(position)` adds the position as the group `{service}`'s offsets
//! (`send_offsets_to_transaction`) and commits: outputs and position become
//! visible together or not at all. Read outputs with
//! `isolation.level=read_committed`.
//!
//! The broker must run transactions: [`KafkaSink::new`] refuses
//! exactly-once at start on one that cannot (librdkafka's mock cluster
//! reached by address, tansu 0.6.0 which has no EndTxn), before anything is
//! claimed; see [`preflight`](crate::preflight).
//!
//! # At-least-once ([`Delivery::AtLeastOnce`])
//!
//! An idempotent producer (`enable.idempotence=true`: no duplicates from
//! producer retries, per-partition order kept). `commit(position)` waits
//! until every output sent so far is acknowledged, then commits the position
//! as the group's offsets. The runtime's periodic commits run that wait on
//! their own task ([`OutputSink::commit_in_background`]): the apply loop
//! keeps sending while a slow broker acknowledges; a migration's stop, a
//! snapshot and a shutdown still commit and wait. **Duplicate window:** a
//! crash after outputs were delivered but before the offset commit
//! re-emits, on recovery, the outputs of every message applied since the
//! last finished commit: the one still running covers at most
//! `InstanceConfig::commit_every` messages or `commit_interval` worth, and
//! the runtime waits for it once the next commit is due by either (so at
//! most twice that, plus a poll batch each). A crash never loses an output
//! (offsets are committed only after delivery).
//! `claim` fences nothing in this mode, and `abort` can only purge outputs
//! not yet handed to the network.
//!
//! # On the embedded mock cluster
//!
//! The mock accepts the transactional protocol but stores no transactional
//! offset commits, writes no commit/abort markers and never fences. So on
//! the embedded broker the exactly-once sink additionally commits the
//! position with a plain offset commit right after each transaction commits
//! (otherwise recovery would find no position at all), and its guarantee is
//! in effect at-least-once with the same window as above. That holds only
//! in the process that owns the mock ([`KafkaCluster::embedded`]); another
//! process reaching it by address is refused exactly-once.

use std::collections::VecDeque;
use std::time::Duration;

use async_trait::async_trait;
use ms2m_core::sink::{BackgroundCommit, Delivery, OutputSink};
use ms2m_core::{OutputRecord, Position, TopicPartition};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::error::{KafkaError as RdKafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer, PurgeConfig};
use rdkafka::{Offset, TopicPartitionList};
use std::sync::Arc;
use tracing::{debug, info, warn};

use crate::broker::{partition_count, KafkaCluster};
use crate::config::SetDefault;
use crate::error::{blocking, KafkaError, Result};
use crate::off_runtime::OffRuntime;
use crate::telemetry::ClientTelemetry;

/// Outputs delivered before `commit` starts waiting for acknowledgements.
const MAX_PENDING: usize = 100_000;

/// An [`OutputSink`] producing to Kafka; see the module docs.
pub struct KafkaSink {
    delivery: Delivery,
    cluster: KafkaCluster,
    producer: OffRuntime<FutureProducer<ClientTelemetry>>,
    /// Group `{service}`: commits offsets, reads committed offsets, and
    /// supplies the group metadata for `send_offsets_to_transaction`. Never
    /// joins the group.
    group: OffRuntime<Arc<BaseConsumer>>,
    /// At-least-once: deliveries not yet acknowledged.
    pending: VecDeque<DeliveryFuture>,
    /// At-least-once: fires when the background commit running has every
    /// delivery it took acknowledged (before it commits the offsets).
    background_delivered: Option<tokio::sync::oneshot::Receiver<()>>,
    /// Exactly-once: a transaction is open.
    in_txn: bool,
    claimed: bool,
    /// Also commit offsets outside the transaction (embedded mock only).
    plain_commit_after_txn: bool,
}

impl Drop for KafkaSink {
    fn drop(&mut self) {
        // Outputs still queued must not go out once this sink is gone (a new
        // owner may be serving): purge them now. Closing the producer (its
        // flush and threads) happens on the blocking pool (`OffRuntime`).
        self.producer.purge(PurgeConfig::default().queue().non_blocking());
    }
}

impl std::fmt::Debug for KafkaSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaSink")
            .field("delivery", &self.delivery)
            .field("pending", &self.pending.len())
            .field("in_txn", &self.in_txn)
            .field("claimed", &self.claimed)
            .finish_non_exhaustive()
    }
}

/// Waits for one output's acknowledgement.
async fn delivered(f: DeliveryFuture) -> Result<()> {
    acknowledged(f.await)
}

/// What a [`DeliveryFuture`] resolved to, as this sink's result.
fn acknowledged(resolved: <DeliveryFuture as std::future::Future>::Output) -> Result<()> {
    match resolved {
        Ok(Ok(_)) => Ok(()),
        Ok(Err((e, _))) => Err(KafkaError::kafka("deliver an output")(e)),
        Err(_) => Err(KafkaError::kafka("deliver an output")(RdKafkaError::Canceled)),
    }
}

/// Commits input offsets through the group's client (on the blocking pool).
async fn commit_offsets(group: Arc<BaseConsumer>, tpl: TopicPartitionList) -> Result<()> {
    if tpl.count() == 0 {
        return Ok(());
    }
    blocking(move || {
        group
            .commit(&tpl, CommitMode::Sync)
            .map_err(KafkaError::kafka("commit input offsets"))
    })
    .await
}

fn offsets(position: &Position) -> Result<TopicPartitionList> {
    let mut tpl = TopicPartitionList::new();
    for (tp, o) in position.iter() {
        tpl.add_partition_offset(&tp.topic, tp.partition, Offset::Offset(o))
            .map_err(KafkaError::kafka("build the offsets to commit"))?;
    }
    Ok(tpl)
}

impl KafkaSink {
    /// A sink for the cluster's service with the given guarantee.
    ///
    /// # Errors
    ///
    /// For [`Delivery::ExactlyOnce`], before anything is claimed: the
    /// mock cluster reached by address is refused with
    /// [`KafkaError::ExactlyOnceOnMockCluster`], and a broker that fails
    /// the transaction probe with [`KafkaError::TransactionsUnsupported`]
    /// (see [`preflight`](crate::preflight) for what the probe proves).
    pub async fn new(cluster: &KafkaCluster, delivery: Delivery) -> Result<Self> {
        if delivery == Delivery::ExactlyOnce {
            crate::preflight::check_exactly_once(cluster).await?;
        }
        let config = cluster.config();
        let producer = Self::producer(cluster, delivery).await?;
        let mut gc = cluster.library_client_config();
        gc.set("group.id", config.group_id())
            .set("enable.auto.commit", "false")
            .set("isolation.level", "read_committed");
        let group: BaseConsumer = gc.create().map_err(KafkaError::kafka("create the offset committer"))?;
        Ok(Self {
            delivery,
            cluster: cluster.clone(),
            producer: OffRuntime::new(producer, cluster),
            group: OffRuntime::new(Arc::new(group), cluster),
            pending: VecDeque::new(),
            background_delivered: None,
            in_txn: false,
            claimed: false,
            plain_commit_after_txn: cluster.is_embedded(),
        })
    }

    /// A connected producer: transactional for exactly-once.
    async fn producer(cluster: &KafkaCluster, delivery: Delivery) -> Result<FutureProducer<ClientTelemetry>> {
        let mut pc = cluster.library_client_config();
        pc.set("enable.idempotence", "true")
            .set_default("acks", "all")
            .set_default("linger.ms", "5");
        if delivery == Delivery::ExactlyOnce {
            pc.set("transactional.id", cluster.config().transactional_id())
                .set_default("transaction.timeout.ms", "60000");
        }
        let context = ClientTelemetry::new(cluster.config().service(), "sink");
        let producer: FutureProducer<ClientTelemetry> = pc
            .create_with_context(context)
            .map_err(KafkaError::kafka("create the output producer"))?;
        // librdkafka connects lazily; a transactional producer whose first
        // InitProducerId finds no connection retries only after 500 ms. Open
        // the connection now so that `claim` (on a migration's critical
        // path) does not pay for it.
        let warm = producer.clone();
        let timeout = cluster.config().timeout();
        blocking(move || {
            warm.client()
                .fetch_metadata(None, timeout)
                .map(|_| ())
                .map_err(KafkaError::kafka("connect the output producer"))
        })
        .await?;
        Ok(producer)
    }

    fn timeout(&self) -> Duration {
        self.cluster.config().timeout()
    }

    fn begin(&mut self) -> Result<()> {
        if self.delivery == Delivery::ExactlyOnce && !self.in_txn {
            if !self.claimed {
                return Err(KafkaError::Config(
                    "exactly-once sink used before claim() (init_transactions)".into(),
                ));
            }
            self.producer
                .begin_transaction()
                .map_err(KafkaError::kafka("begin a transaction"))?;
            self.in_txn = true;
        }
        Ok(())
    }

    async fn await_oldest(&mut self) -> Result<()> {
        match self.pending.pop_front() {
            Some(f) => delivered(f).await,
            None => Ok(()),
        }
    }

    async fn commit_offsets_plain(&self, tpl: TopicPartitionList) -> Result<()> {
        commit_offsets(self.group.clone(), tpl).await
    }

    /// The input partitions whose committed offsets form the watermark.
    async fn input_partitions(&self) -> Result<Vec<TopicPartition>> {
        let config = self.cluster.config();
        if let Some(explicit) = config.explicit_input_partitions() {
            return Ok(explicit.to_vec());
        }
        let topics: Vec<String> = config.input_topics().to_vec();
        let group = self.group.clone();
        let timeout = self.timeout();
        blocking(move || {
            let mut out = Vec::new();
            for topic in topics {
                let n =
                    partition_count(group.as_ref(), &topic, timeout)?.ok_or(KafkaError::UnknownTopic(topic.clone()))?;
                let topic: Arc<str> = Arc::from(topic.as_str());
                out.extend((0..n).map(|p| TopicPartition::new(topic.clone(), p)));
            }
            Ok(out)
        })
        .await
    }
}

#[async_trait]
impl OutputSink for KafkaSink {
    type Error = KafkaError;

    fn delivery(&self) -> Delivery {
        self.delivery
    }

    async fn claim(&mut self) -> Result<()> {
        if self.delivery == Delivery::ExactlyOnce {
            if self.claimed {
                // Claiming again (a source resuming after a failed handover):
                // a producer initializes transactions once, and a fenced one
                // is dead, so take a fresh one with the same transactional id.
                self.pending.clear();
                self.producer = OffRuntime::new(Self::producer(&self.cluster, self.delivery).await?, &self.cluster);
            }
            let producer = self.producer.clone();
            let timeout = self.timeout();
            blocking(move || {
                producer.init_transactions(timeout).map_err(KafkaError::kafka(
                    "initialize transactions (claim the transactional id)",
                ))
            })
            .await?;
            self.in_txn = false;
            info!(transactional_id = %self.cluster.config().transactional_id(), "output sink claimed");
        }
        self.claimed = true;
        Ok(())
    }

    async fn send(&mut self, output: OutputRecord) -> Result<()> {
        self.begin()?;
        let mut headers = OwnedHeaders::new_with_capacity(output.headers.len());
        for (k, v) in &output.headers {
            headers = headers.insert(Header {
                key: k,
                value: Some(&v[..]),
            });
        }
        loop {
            let mut record = FutureRecord::<[u8], [u8]>::to(&output.topic)
                .payload(&output.payload[..])
                .headers(headers.clone());
            if let Some(k) = &output.key {
                record = record.key(&k[..]);
            }
            match self.producer.send_result(record) {
                Ok(f) => {
                    if self.delivery == Delivery::AtLeastOnce {
                        self.pending.push_back(f);
                        if self.pending.len() > MAX_PENDING {
                            self.await_oldest().await?;
                        }
                    }
                    return Ok(());
                }
                Err((RdKafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                    if self.pending.is_empty() {
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    } else {
                        self.await_oldest().await?;
                    }
                }
                Err((e, _)) => return Err(KafkaError::kafka("produce an output")(e)),
            }
        }
    }

    async fn commit(&mut self, position: &Position) -> Result<()> {
        let tpl = offsets(position)?;
        match self.delivery {
            Delivery::AtLeastOnce => {
                let started = std::time::Instant::now();
                while !self.pending.is_empty() {
                    self.await_oldest().await?;
                }
                let delivered = started.elapsed();
                self.commit_offsets_plain(tpl).await?;
                debug!(?delivered, committed = ?started.elapsed(), "outputs delivered and position committed");
            }
            Delivery::ExactlyOnce => {
                self.begin()?;
                let producer = self.producer.clone();
                let cgm = self
                    .group
                    .group_metadata()
                    .ok_or_else(|| KafkaError::Config("no consumer group metadata (group.id missing?)".into()))?;
                let timeout = self.timeout();
                let offsets = tpl.clone();
                let result = blocking(move || {
                    let started = std::time::Instant::now();
                    if offsets.count() > 0 {
                        producer
                            .send_offsets_to_transaction(&offsets, &cgm, timeout)
                            .map_err(KafkaError::kafka("add the input position to the transaction"))?;
                    }
                    let offsets_sent = started.elapsed();
                    producer
                        .commit_transaction(timeout)
                        .map_err(KafkaError::kafka("commit the transaction"))?;
                    debug!(?offsets_sent, committed = ?started.elapsed(), "transaction committed");
                    Ok(())
                })
                .await;
                if let Err(e) = result {
                    let abortable =
                        matches!(e.rdkafka_error(), Some(RdKafkaError::Transaction(t)) if t.txn_requires_abort());
                    if abortable {
                        warn!(error = %e, "transaction failed; aborting it");
                        let _ = self.abort().await;
                    }
                    return Err(e);
                }
                self.in_txn = false;
                if self.plain_commit_after_txn {
                    // The mock cluster drops transactional offset commits.
                    self.commit_offsets_plain(tpl).await?;
                }
            }
        }
        debug!(%position, "outputs and position committed");
        Ok(())
    }

    /// At-least-once: the outputs sent so far are awaited and the offsets
    /// committed on the caller's task, while later outputs are sent.
    fn commit_in_background(&mut self, position: &Position) -> Option<BackgroundCommit<KafkaError>> {
        if self.delivery != Delivery::AtLeastOnce {
            return None;
        }
        let tpl = offsets(position);
        let pending = std::mem::take(&mut self.pending);
        let group = self.group.clone();
        let (all_delivered, on_delivered) = tokio::sync::oneshot::channel();
        self.background_delivered = Some(on_delivered);
        Some(Box::pin(async move {
            let started = std::time::Instant::now();
            for f in pending {
                delivered(f).await?;
            }
            let _ = all_delivered.send(());
            let delivered = started.elapsed();
            commit_offsets(group, tpl?).await?;
            debug!(?delivered, committed = ?started.elapsed(), "outputs delivered and position committed (background)");
            Ok(())
        }))
    }

    /// At-least-once: awaits the acknowledgement of every output sent so
    /// far, those a background commit took included (not its offset
    /// commit: the runtime runs that future on its own task, and `flush`
    /// waits until it has its acknowledgements), and answers `true`:
    /// acknowledged outputs are visible.
    /// Exactly-once: `false` at once (a transaction's outputs show at its
    /// commit). Cancel-safe: an acknowledgement is let go of only once it
    /// arrived. Not librdkafka's `flush`: through rust-rdkafka's producer
    /// that took about 100 ms on the embedded broker however few outputs
    /// were on their way.
    async fn flush(&mut self) -> Result<bool> {
        if self.delivery != Delivery::AtLeastOnce {
            return Ok(false);
        }
        if let Some(background) = self.background_delivered.as_mut() {
            // An error ends the background commit, which reports it.
            let _ = background.await;
            self.background_delivered = None;
        }
        while let Some(oldest) = self.pending.front_mut() {
            let resolved = oldest.await;
            self.pending.pop_front();
            acknowledged(resolved)?;
        }
        Ok(true)
    }

    async fn abort(&mut self) -> Result<()> {
        match self.delivery {
            Delivery::ExactlyOnce => {
                if self.in_txn {
                    let producer = self.producer.clone();
                    let timeout = self.timeout();
                    blocking(move || {
                        producer
                            .abort_transaction(timeout)
                            .map_err(KafkaError::kafka("abort the transaction"))
                    })
                    .await?;
                    self.in_txn = false;
                }
            }
            Delivery::AtLeastOnce => {
                // Best effort: outputs already on the wire cannot be recalled.
                self.producer.purge(PurgeConfig::default().queue());
                for f in self.pending.drain(..) {
                    let _ = f.await;
                }
            }
        }
        Ok(())
    }

    /// Fetches the topics' metadata through the producer (a producer that
    /// first meets a topic at its first commit after going live waited
    /// ~100 ms for it: measured on the embedded broker, a target's first
    /// `commit_transaction` took 102 ms and the next ones under 1 ms) and
    /// finds the group coordinator through the committing client.
    async fn warm_up(&mut self, topics: &[&str]) -> Result<()> {
        let started = std::time::Instant::now();
        for topic in topics {
            let (producer, topic, timeout) = (self.producer.clone(), topic.to_string(), self.timeout());
            blocking(move || {
                producer
                    .client()
                    .fetch_metadata(Some(&topic), timeout)
                    .map(|_| ())
                    .map_err(KafkaError::kafka("fetch output topic metadata"))
            })
            .await?;
        }
        self.committed().await?;
        debug!(elapsed = ?started.elapsed(), ?topics, "output sink warmed up");
        Ok(())
    }

    async fn committed(&mut self) -> Result<Option<Position>> {
        let partitions = self.input_partitions().await?;
        if partitions.is_empty() {
            return Ok(None);
        }
        let mut tpl = TopicPartitionList::new();
        for tp in &partitions {
            tpl.add_partition(&tp.topic, tp.partition);
        }
        let group = self.group.clone();
        let timeout = self.timeout();
        let committed = blocking(move || {
            group
                .committed_offsets(tpl, timeout)
                .map_err(KafkaError::kafka("read committed offsets"))
        })
        .await?;
        let position: Position = partitions
            .into_iter()
            .filter_map(|tp| match committed.find_partition(&tp.topic, tp.partition)?.offset() {
                Offset::Offset(o) => Some((tp, o)),
                _ => None,
            })
            .collect();
        Ok((!position.is_empty()).then_some(position))
    }
}
