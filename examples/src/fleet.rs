//! The ledger as a fleet node: one process per instance id, running
//! [`ms2m_core::node::Node`] over Kafka until SIGTERM or SIGINT. This is
//! what `cargo run --example ledger_node -- --instance ID --brokers HOST:PORT`
//! runs, and what the process tests start, kill and pause; the load
//! generator and the independent verifier the tests use live here too.
//!
//! The node prints one JSON line on stdout each time its role or owner
//! changes (and once a second), so a supervisor or a test can follow it
//! without linking the library:
//!
//! ```text
//! {"instance_id":"a","role":"Owner","owner":["a",1],"position":{...},"lag":null,"stats":{...}}
//! ```

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use ms2m_core::migration::protocol::owner::LeaseConfig;
use ms2m_core::node::{Node, NodeOptions, NodeStatus};
use ms2m_core::{Component, Delivery, Error, InstanceConfig};
use ms2m_kafka::{KafkaCluster, KafkaConfig};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Message, Offset, TopicPartitionList};

use crate::ledger::{transaction, Ledger, LedgerEvent, Transaction};
use crate::support::BoxError;

/// Partitions of the input and output topics.
pub const PARTITIONS: i32 = 4;

/// The names of one ledger deployment's topics and group: `{prefix}ledger.*`
/// (several deployments can share a broker, as the tests do).
#[derive(Clone, Debug)]
pub struct Deployment {
    /// Prepended to every name.
    pub prefix: String,
    /// Partitions of the input and output topics ([`PARTITIONS`] unless set).
    pub partitions: i32,
}

impl Deployment {
    /// The deployment whose names start with `prefix`.
    pub fn new(prefix: impl Into<String>) -> Self {
        Self {
            prefix: prefix.into(),
            partitions: PARTITIONS,
        }
    }

    /// The same names over `partitions` partitions.
    pub fn with_partitions(mut self, partitions: i32) -> Self {
        self.partitions = partitions;
        self
    }

    /// The input topic.
    pub fn input(&self) -> String {
        format!("{}ledger.tx", self.prefix)
    }

    /// The output topic.
    pub fn output(&self) -> String {
        format!("{}ledger.balances", self.prefix)
    }

    /// The Kafka settings of the deployment at `brokers`.
    pub fn kafka_config(&self, brokers: &str) -> KafkaConfig {
        let name = |what: &str| format!("{}ledger.{what}", self.prefix);
        KafkaConfig::new(<Ledger as ms2m_core::StatefulService>::NAME)
            .bootstrap_servers(brokers)
            .input_topic(self.input())
            .control_topic_name(name("control"))
            .snapshot_topic_name(name("snapshots"))
            .group_id_name(name("group"))
            .transactional_id_name(name("txn"))
    }

    /// The cluster at `brokers`, with the input and output topics created.
    pub async fn cluster(&self, brokers: &str) -> Result<KafkaCluster, BoxError> {
        let cluster = KafkaCluster::connect(self.kafka_config(brokers))?;
        cluster.create_topic(&self.input(), self.partitions, &[]).await?;
        cluster.create_topic(&self.output(), self.partitions, &[]).await?;
        Ok(cluster)
    }
}

/// A node's settings (the `ledger_node` example's flags).
#[derive(Clone, Debug, clap::Args)]
pub struct NodeArgs {
    /// This node's instance id (one process per id).
    #[arg(long)]
    pub instance: String,
    /// Kafka bootstrap servers.
    #[arg(long)]
    pub brokers: String,
    /// How often the owner renews its lease, in ms.
    #[arg(long, default_value_t = 2_000)]
    pub lease_interval_ms: u64,
    /// How long a standby waits after the last renewal it read before it
    /// claims the service, in ms.
    #[arg(long, default_value_t = 10_000)]
    pub lease_timeout_ms: u64,
    /// The longest step of the apply loop the lease allows for, in ms.
    #[arg(long, default_value_t = 1_000)]
    pub lease_margin_ms: u64,
    /// Use the transactional sink (needs a broker with transactions).
    #[arg(long)]
    pub exactly_once: bool,
    /// Prepended to the deployment's topic and group names.
    #[arg(long, default_value = "")]
    pub prefix: String,
    /// Serve Prometheus metrics and health probes on this address
    /// (`/metrics`, `/health/live`, `/health/ready`), e.g. `0.0.0.0:9464`.
    #[arg(long)]
    pub metrics_addr: Option<std::net::SocketAddr>,
}

impl NodeArgs {
    /// The node options these flags give.
    pub fn options(&self) -> NodeOptions {
        NodeOptions {
            lease: LeaseConfig {
                interval: Duration::from_millis(self.lease_interval_ms),
                timeout: Duration::from_millis(self.lease_timeout_ms),
                margin: Duration::from_millis(self.lease_margin_ms),
                ..LeaseConfig::default()
            },
            ..NodeOptions::default()
        }
    }
}

/// Runs a ledger node until SIGTERM or SIGINT.
pub async fn run_node(args: NodeArgs) -> Result<(), BoxError> {
    let deployment = Deployment::new(&args.prefix);
    let cluster = deployment.cluster(&args.brokers).await?;
    let control = Arc::new(cluster.control().await?);
    let delivery = if args.exactly_once {
        Delivery::ExactlyOnce
    } else {
        Delivery::AtLeastOnce
    };
    let factory = backend_factory(cluster, delivery);
    let config = instance_config(&args.instance, &deployment);
    let node = Node::<Ledger, _, _, _, _, _>::new(factory, control, config, args.options())?;
    // Installed before the node builds its instances: their metric handles
    // bind to the recorder present when they are created.
    let _metrics = match args.metrics_addr {
        Some(addr) => Some(ms2m_kafka::telemetry::serve_prometheus(addr, Some(node.health())).await?),
        None => None,
    };
    let printer = tokio::spawn(print_status(node.status()));
    let result = node.run(terminated()).await;
    printer.abort();
    Ok(result?)
}

/// The node's backends on `cluster` (a new set each call).
pub fn backend_factory(
    cluster: KafkaCluster,
    delivery: Delivery,
) -> impl ms2m_core::node::BackendFactory<ms2m_kafka::KafkaLog, ms2m_kafka::KafkaSnapshotStore, ms2m_kafka::KafkaSink> {
    move || {
        let cluster = cluster.clone();
        async move {
            cluster
                .backends(delivery)
                .await
                .map_err(|e| Error::backend(Component::Log, "create the Kafka backends", e))
        }
    }
}

/// The ledger instance's settings: outputs to the deployment's output
/// topic, frequent commits, a snapshot every 2 s.
pub fn instance_config(instance: &str, deployment: &Deployment) -> InstanceConfig {
    InstanceConfig::new(instance)
        .output_topic(deployment.output())
        .commit_every(50, Duration::from_millis(20))
        .snapshot_interval(Some(Duration::from_secs(2)))
}

/// Prints the status as a JSON line on each role or owner change, and
/// once a second.
async fn print_status(mut status: tokio::sync::watch::Receiver<NodeStatus>) {
    let mut last: Option<(ms2m_core::node::NodeRole, Option<(String, u64)>)> = None;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            changed = status.changed() => if changed.is_err() { return },
            _ = tick.tick() => last = None,
        }
        let now = status.borrow_and_update().clone();
        let key = (now.role, now.owner.clone());
        if last.as_ref() != Some(&key) {
            last = Some(key);
            if let Ok(line) = serde_json::to_string(&now) {
                println!("{line}");
            }
        }
    }
}

/// Completes on SIGTERM or SIGINT.
pub async fn terminated() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

/// Produces transactions `from..from + n` keyed by account, at most
/// `per_sec` a second; returns `(partition, offset, transaction)` of each.
pub async fn produce_load(
    cluster: &KafkaCluster,
    deployment: &Deployment,
    from: u64,
    n: u64,
    per_sec: u64,
) -> Result<Vec<(i32, i64, Transaction)>, BoxError> {
    let producer = crate::support::producer(cluster)?;
    let burst = (per_sec / 100).max(1);
    let mut out = Vec::with_capacity(n as usize);
    let mut i = from;
    while i < from + n {
        let end = (i + burst).min(from + n);
        let batch = (i..end)
            .map(|k| (account_key(&transaction(k)), transaction(k)))
            .collect();
        out.extend(crate::support::produce_json(&producer, &deployment.input(), batch).await?);
        i = end;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(out)
}

fn account_key(tx: &Transaction) -> Vec<u8> {
    match tx {
        Transaction::Deposit { account, .. } | Transaction::Withdraw { account, .. } => account.as_bytes().to_vec(),
    }
}

/// What the independent verifier found.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Verdict {
    /// Expected outputs never seen.
    pub lost: usize,
    /// Outputs seen that no input explains.
    pub wrong: usize,
    /// Outputs seen more often than expected.
    pub duplicated: usize,
    /// Outputs seen in all.
    pub seen: usize,
}

/// Checks the committed outputs (read with its own `read_committed`
/// consumer) against the reference fold of `input`: per account, the
/// events expected, in input order.
pub async fn verify(
    brokers: &str,
    deployment: &Deployment,
    input: &[(i32, i64, Transaction)],
) -> Result<Verdict, BoxError> {
    let expected = reference_outputs(input);
    let at_least = expected.values().map(Vec::len).sum();
    let seen = read_outputs(brokers, &deployment.output(), deployment.partitions, at_least).await?;
    Ok(compare(&expected, &seen))
}

/// The reference fold: the events each account should see, in order.
pub fn reference_outputs(input: &[(i32, i64, Transaction)]) -> BTreeMap<String, Vec<LedgerEvent>> {
    let mut sorted: Vec<_> = input.iter().collect();
    sorted.sort_by_key(|(p, o, _)| (*p, *o));
    let mut ledger = Ledger::default();
    let mut out: BTreeMap<String, Vec<LedgerEvent>> = BTreeMap::new();
    for (_, _, tx) in sorted {
        let key = String::from_utf8_lossy(&account_key(tx)).into_owned();
        out.entry(key).or_default().push(ledger.book(tx));
    }
    out
}

fn compare(expected: &BTreeMap<String, Vec<LedgerEvent>>, seen: &BTreeMap<String, Vec<LedgerEvent>>) -> Verdict {
    let mut verdict = Verdict::default();
    let empty = Vec::new();
    for account in expected
        .keys()
        .chain(seen.keys())
        .collect::<std::collections::BTreeSet<_>>()
    {
        let want = expected.get(account).unwrap_or(&empty);
        let got = seen.get(account).unwrap_or(&empty);
        verdict.seen += got.len();
        let count = |events: &[LedgerEvent]| {
            let mut m: BTreeMap<String, usize> = BTreeMap::new();
            for e in events {
                *m.entry(format!("{e:?}")).or_default() += 1;
            }
            m
        };
        let (want, got) = (count(want), count(got));
        for (event, n) in &want {
            let g = got.get(event).copied().unwrap_or(0);
            verdict.lost += n.saturating_sub(g);
            verdict.duplicated += g.saturating_sub(*n);
        }
        verdict.wrong += got
            .iter()
            .filter(|(e, _)| !want.contains_key(*e))
            .map(|(_, n)| n)
            .sum::<usize>();
    }
    verdict
}

/// Reads the output topic from the start with a plain `read_committed`
/// consumer until `at_least` events arrived and the topic is drained (or
/// 60 s passed), grouped by key in order.
async fn read_outputs(
    brokers: &str,
    topic: &str,
    partitions: i32,
    at_least: usize,
) -> Result<BTreeMap<String, Vec<LedgerEvent>>, BoxError> {
    let topic = topic.to_string();
    let consumer: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", format!("{topic}.verifier"))
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_committed")
        .set("fetch.wait.max.ms", "10")
        .create()?;
    tokio::task::spawn_blocking(move || {
        let mut tpl = TopicPartitionList::new();
        for p in 0..partitions {
            tpl.add_partition_offset(&topic, p, Offset::Beginning)?;
        }
        consumer.assign(&tpl)?;
        let mut out: BTreeMap<String, Vec<LedgerEvent>> = BTreeMap::new();
        let (mut n, mut quiet) = (0, 0);
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while std::time::Instant::now() < deadline && !(n >= at_least && quiet >= 10) {
            match consumer.poll(Duration::from_millis(100)) {
                Some(Ok(m)) => {
                    quiet = 0;
                    n += 1;
                    let key = String::from_utf8_lossy(m.key().unwrap_or_default()).into_owned();
                    let event: LedgerEvent = serde_json::from_slice(m.payload().unwrap_or_default())?;
                    out.entry(key).or_default().push(event);
                }
                Some(Err(e)) => return Err(e.into()),
                None => quiet += 1,
            }
        }
        Ok(out)
    })
    .await?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_verifier_counts_lost_wrong_and_duplicated() {
        let input: Vec<_> = (0..40).map(|i| (0, i as i64, transaction(i))).collect();
        let expected = reference_outputs(&input);
        assert_eq!(compare(&expected, &expected).lost, 0);
        let mut seen = expected.clone();
        let first = seen.keys().next().cloned().unwrap();
        let events = seen.get_mut(&first).unwrap();
        let dup = events[0].clone();
        events.push(dup);
        events.remove(1);
        events.push(LedgerEvent::OverdraftRejected {
            account: first,
            cents: 1,
            balance: 999_999,
        });
        let v = compare(&expected, &seen);
        assert_eq!((v.lost, v.wrong, v.duplicated), (1, 1, 1));
    }
}
