//! Plumbing the examples share: producing input (and remembering where each
//! message landed, for the reference fold) and reading back committed
//! outputs. Plain rdkafka, so the checks do not depend on ms2m's own code.

use std::collections::HashMap;
use std::time::Duration;

use futures::future::join_all;
use ms2m_kafka::KafkaCluster;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Message, Offset, TopicPartitionList};
use serde::Serialize;

/// Logs to stderr: `RUST_LOG` if set, else warnings plus ms2m's notices
/// (such as "using the embedded librdkafka mock cluster").
pub fn init_logging() {
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn,ms2m_kafka=info".into());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

/// Errors of the example plumbing.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A producer on `cluster`, tuned for a steady stream.
pub fn producer(cluster: &KafkaCluster) -> Result<FutureProducer, BoxError> {
    Ok(cluster
        .client_config()
        .set("linger.ms", "2")
        .set("enable.idempotence", "true")
        .create()?)
}

/// Produces `items` as JSON, keyed, and returns `(partition, offset, item)`
/// for each, in input order.
pub async fn produce_json<T: Serialize>(
    producer: &FutureProducer,
    topic: &str,
    items: Vec<(Vec<u8>, T)>,
) -> Result<Vec<(i32, i64, T)>, BoxError> {
    let payloads: Vec<Vec<u8>> = items
        .iter()
        .map(|(_, v)| serde_json::to_vec(v))
        .collect::<Result<_, _>>()?;
    let sends = items.iter().zip(&payloads).map(|((key, _), payload)| {
        producer.send(
            FutureRecord::to(topic).key(key).payload(payload),
            Duration::from_secs(30),
        )
    });
    let delivered = join_all(sends).await;
    let mut out = Vec::with_capacity(items.len());
    for (result, (_, item)) in delivered.into_iter().zip(items) {
        let delivery = result.map_err(|(e, _)| e)?;
        out.push((delivery.partition, delivery.offset, item));
    }
    Ok(out)
}

/// Every committed message of `topic` (read_committed), as
/// `(partition, offset, key, payload)`.
pub async fn read_committed(
    cluster: &KafkaCluster,
    topic: &str,
) -> Result<Vec<(i32, i64, Vec<u8>, Vec<u8>)>, BoxError> {
    let consumer: BaseConsumer = cluster
        .client_config()
        .set("group.id", format!("{topic}.reader"))
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_committed")
        .set("fetch.wait.max.ms", "10")
        .create()?;
    let topic = topic.to_string();
    tokio::task::spawn_blocking(move || -> Result<_, BoxError> {
        let md = consumer.fetch_metadata(Some(&topic), Duration::from_secs(10))?;
        let partitions = md.topics().first().map(|t| t.partitions().len()).unwrap_or(0) as i32;
        let mut tpl = TopicPartitionList::new();
        let mut ends = HashMap::new();
        for p in 0..partitions {
            let (low, high) = consumer.fetch_watermarks(&topic, p, Duration::from_secs(10))?;
            if high > low {
                tpl.add_partition_offset(&topic, p, Offset::Offset(low))?;
                ends.insert(p, high);
            }
        }
        let mut out = Vec::new();
        if ends.is_empty() {
            return Ok(out);
        }
        consumer.assign(&tpl)?;
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while !ends.is_empty() && std::time::Instant::now() < deadline {
            match consumer.poll(Duration::from_millis(100)) {
                Some(Ok(m)) => {
                    out.push((
                        m.partition(),
                        m.offset(),
                        m.key().unwrap_or_default().to_vec(),
                        m.payload().unwrap_or_default().to_vec(),
                    ));
                    if m.offset() + 1 >= ends.get(&m.partition()).copied().unwrap_or(i64::MAX) {
                        ends.remove(&m.partition());
                    }
                }
                Some(Err(e)) => return Err(e.into()),
                None => {
                    // Transaction markers occupy the last offsets: a partition
                    // whose position reached the end is done.
                    let pos = consumer.position()?;
                    for e in pos.elements() {
                        if let Offset::Offset(o) = e.offset() {
                            if ends.get(&e.partition()).is_some_and(|end| o >= *end) {
                                ends.remove(&e.partition());
                            }
                        }
                    }
                }
            }
        }
        if !ends.is_empty() {
            return Err(format!("timed out reading {topic}: partitions {:?} unfinished", ends.keys()).into());
        }
        Ok(out)
    })
    .await?
}

/// Keeps a live `instance` serving (stepping) until `stop` is set, then
/// hands it back still live. A target returned by `run_target` does not
/// serve by itself: without this, outputs stop until someone steps it, and
/// an outside observer would count that as downtime.
pub async fn serve_until<S, L, St, O>(
    mut instance: ms2m_core::Instance<S, L, St, O>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> Result<ms2m_core::Instance<S, L, St, O>, ms2m_core::Error>
where
    S: ms2m_core::StatefulService,
    L: ms2m_core::MessageLog,
    St: ms2m_core::SnapshotStore,
    O: ms2m_core::OutputSink,
{
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        instance.step().await?;
    }
    Ok(instance)
}

/// A standby target serving once live: [`run_target`](ms2m_core::migration::run_target)
/// (no progress listener) then [`serve_until`] the returned
/// flag is set.
pub type ServingTarget<S, L, St, O> =
    tokio::task::JoinHandle<Result<ms2m_core::Instance<S, L, St, O>, ms2m_core::Error>>;

/// Spawns a standby target (`options`: e.g. [`TargetOptions::warm`]) that
/// serves from the moment it goes live, until the returned flag is set.
///
/// [`TargetOptions::warm`]: ms2m_core::migration::TargetOptions::warm
pub fn spawn_serving_target<S, L, St, O, C>(
    backends: ms2m_core::Backends<L, St, O>,
    config: ms2m_core::InstanceConfig,
    control: std::sync::Arc<C>,
    options: ms2m_core::migration::TargetOptions,
) -> (
    ServingTarget<S, L, St, O>,
    std::sync::Arc<std::sync::atomic::AtomicBool>,
)
where
    S: ms2m_core::StatefulService,
    L: ms2m_core::MessageLog,
    St: ms2m_core::SnapshotStore,
    O: ms2m_core::OutputSink,
    C: ms2m_core::ControlChannel,
{
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let serving = stop.clone();
    let task = tokio::spawn(async move {
        let live = ms2m_core::migration::run_target::<S, _, _, _, _>(
            backends,
            config,
            control,
            options,
            &*ms2m_core::no_progress(),
        )
        .await?;
        serve_until(live, serving).await
    });
    (task, stop)
}
