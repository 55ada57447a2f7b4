//! Checks made before a backend starts: a broker or a topic that cannot
//! give the promised guarantee is refused at start, with an error that
//! names the setting to change, instead of failing at the first commit or
//! silently weakening the guarantee.
//!
//! | what is wrong | checked by | error |
//! |---|---|---|
//! | no `bootstrap.servers` | [`KafkaCluster::connect`] | [`KafkaError::NoBrokerConfigured`] |
//! | `ExactlyOnce` on librdkafka's mock cluster reached by address | the exactly-once sink | [`KafkaError::ExactlyOnceOnMockCluster`] |
//! | `ExactlyOnce` on a broker without transactions (tansu 0.6: no EndTxn) | the exactly-once sink | [`KafkaError::TransactionsUnsupported`] |
//! | control topic with more than one partition | control channel, exactly-once sink | [`KafkaError::ControlTopicPartitions`] |
//! | control topic compacted, or with finite retention | control channel, exactly-once sink | [`KafkaError::UnsafeTopicSetting`] |
//! | snapshot topic `cleanup.policy=delete` with finite retention | snapshot store | [`KafkaError::UnsafeTopicSetting`] |
//!
//! # Why these topic settings
//!
//! * **Control topic.** Every party decides a migration and the current
//!   owner by folding the whole history of the topic in order
//!   (`ms2m_core::migration::protocol::Decisions`). One partition is one
//!   order. Compaction keeps only the last record per key
//!   (`{service}/{migration_id}`), which drops the `Takeover` or rollback
//!   that decided a migration; time or size retention drops ownership
//!   records, after which `ensure_owner` lets a former owner start again.
//!   So the topic needs `cleanup.policy=delete`, no time limit and
//!   `retention.bytes=-1`. Its records are a few hundred bytes per
//!   migration.
//!
//!   No time limit is `retention.ms=-1` or [`RETENTION_FOREVER_MS`]
//!   (`i64::MAX`, about 292 million years); both are accepted. The library
//!   creates the topic with the second, because tansu 0.6.0 does not
//!   treat `-1` as "no limit": its retention sweep (every 10 minutes and
//!   at each start) deletes a record when its age exceeds `retention.ms`,
//!   and every age exceeds -1, so it empties a `retention.ms=-1` control
//!   topic, and with it every ownership record. Kafka treats the two
//!   values alike. A control topic made with `-1` on tansu needs
//!   `retention.ms` changed to `9223372036854775807`; the check logs a
//!   warning for `-1` on a `delete` topic, since it cannot tell tansu from
//!   Kafka.
//! * **Snapshot topic.** The store keeps a snapshot for as long as it is
//!   among the newest, whatever its age: an idle service's latest snapshot
//!   may be weeks old. `cleanup.policy=compact` (how the library creates
//!   it) never drops it; `delete` with a finite `retention.ms` or
//!   `retention.bytes` would.
//!
//! Settings are read with DescribeConfigs. A broker that does not answer it
//! is not refused: a warning says the settings were not checked. tansu
//! 0.6.0 answers with the settings given at creation only, so on a topic
//! created by hand without them the missing keys are reported as
//! unchecked. The embedded broker has no topic settings at all (only the
//! partition count is checked there).
//!
//! # The transaction probe: what it proves, and what it cannot
//!
//! Before an exactly-once sink exists, a producer with its own
//! transactional id (`{transactional id}.probe`, so that the probe never
//! fences the live owner) initializes transactions, produces one record
//! without a value to partition 0 of the control topic, and **aborts**,
//! each step bounded by the operation timeout. The abort sends EndTxn, the
//! request tansu 0.6.0 lacks; librdkafka fails it at once from the
//! broker's advertised API versions. On a broker with transactions the
//! aborted record is invisible to `read_committed` readers (the control
//! readers' default), and readers skip records without a value anyway.
//!
//! It proves the broker accepts the whole transactional protocol for this
//! principal (InitProducerId, AddPartitionsToTxn, Produce, EndTxn). It
//! cannot prove that the broker enforces transactions: fencing of a
//! second producer with the same id, or the isolation of aborted records.
//! librdkafka's mock passes every step and enforces neither, which is why
//! the mock is recognized by its cluster id (`mockCluster…`) first.
//! With ACLs, the principal also needs `Write` on the transactional id
//! `{transactional id}.probe`.

use std::collections::BTreeMap;

use ms2m_core::ErrorKind;
use rdkafka::admin::{AdminClient, AdminOptions, ResourceSpecifier};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError as RdKafkaError;
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use tracing::{debug, info, warn};

use crate::broker::KafkaCluster;
use crate::config::SetDefault;
use crate::error::{blocking, kind_of_code, KafkaError, Result};

/// How librdkafka's mock cluster names itself (`rdkafka_mock.c`:
/// `"mockCluster%lx"`).
pub const MOCK_CLUSTER_ID_PREFIX: &str = "mockCluster";

/// The settings the library creates the control topic with (see the
/// module docs).
pub(crate) const CONTROL_TOPIC_SETTINGS: &[(&str, &str)] = &[
    ("cleanup.policy", "delete"),
    ("retention.ms", RETENTION_FOREVER_MS),
    ("retention.bytes", "-1"),
];

/// `retention.ms` that keeps records for good on every broker: `i64::MAX`
/// ms. Kafka's `-1` means the same, but tansu 0.6.0 deletes every record of
/// a `delete` topic whose `retention.ms` is `-1` (see the module docs).
pub const RETENTION_FOREVER_MS: &str = "9223372036854775807";

/// The settings the library creates the snapshot topic with.
pub(crate) const SNAPSHOT_TOPIC_SETTINGS: &[(&str, &str)] = &[("cleanup.policy", "compact")];

const CONTROL_FIX: &str =
    "`cleanup.policy=delete`, `retention.ms=9223372036854775807` (or -1 on Kafka) and `retention.bytes=-1` on the control topic";
const SNAPSHOT_FIX: &str =
    "`cleanup.policy=compact` on the snapshot topic (or `retention.ms=9223372036854775807` and `retention.bytes=-1`)";

/// A topic's settings as the broker reported them.
type TopicSettings = BTreeMap<String, String>;

/// Creates the control topic (one partition, [`CONTROL_TOPIC_SETTINGS`])
/// if it is missing, then refuses it unless it has exactly one partition
/// and keeps every record. Returns its name.
pub(crate) async fn ensure_control_topic(cluster: &KafkaCluster) -> Result<String> {
    let topic = cluster.config().control_topic();
    if cluster.partition_count(&topic).await?.is_none() {
        cluster.create_topic(&topic, 1, CONTROL_TOPIC_SETTINGS).await?;
    }
    let partitions = cluster
        .partition_count(&topic)
        .await?
        .ok_or_else(|| KafkaError::UnknownTopic(topic.clone()))?;
    if partitions != 1 {
        return Err(KafkaError::ControlTopicPartitions { topic, partitions });
    }
    if let Some(settings) = topic_settings(cluster, &topic).await {
        check_control_settings(&topic, &settings)?;
    }
    Ok(topic)
}

/// Refuses a snapshot topic whose settings can delete the latest snapshot.
pub(crate) async fn check_snapshot_topic(cluster: &KafkaCluster, topic: &str) -> Result<()> {
    match topic_settings(cluster, topic).await {
        Some(settings) => check_snapshot_settings(topic, &settings),
        None => Ok(()),
    }
}

/// Refuses `Delivery::ExactlyOnce` on a broker that cannot give it: the
/// mock cluster reached by address, or a broker that fails the transaction
/// probe. The in-process embedded broker is let through (module docs of
/// [`broker`](crate::broker)).
pub(crate) async fn check_exactly_once(cluster: &KafkaCluster) -> Result<()> {
    if cluster.is_embedded() {
        debug!("exactly-once on the embedded broker: transactions accepted, not enforced");
        return Ok(());
    }
    if let Some(cluster_id) = cluster_id(cluster).await? {
        if cluster_id.starts_with(MOCK_CLUSTER_ID_PREFIX) {
            return Err(KafkaError::ExactlyOnceOnMockCluster {
                bootstrap: cluster.bootstrap_servers().to_string(),
                cluster_id,
            });
        }
    }
    let topic = ensure_control_topic(cluster).await?;
    probe_transaction(cluster, &topic).await?;
    info!(
        bootstrap = cluster.bootstrap_servers(),
        "the broker accepts transactions (probe passed; that it fences zombies is not proven by the probe)"
    );
    Ok(())
}

/// The cluster id from metadata; `None` if the broker reports none.
async fn cluster_id(cluster: &KafkaCluster) -> Result<Option<String>> {
    let client: BaseConsumer = cluster
        .library_client_config()
        .create()
        .map_err(KafkaError::kafka("create a metadata client"))?;
    let timeout = cluster.config().timeout();
    blocking(move || Ok(client.client().fetch_cluster_id(timeout))).await
}

/// One aborted transaction on partition 0 of `topic` (module docs).
async fn probe_transaction(cluster: &KafkaCluster, topic: &str) -> Result<()> {
    let config = cluster.config();
    let timeout = config.timeout();
    let mut pc = cluster.library_client_config();
    pc.set("transactional.id", format!("{}.probe", config.transactional_id()))
        .set("enable.idempotence", "true")
        .set_default("transaction.timeout.ms", timeout.as_millis().max(1000).to_string());
    let producer: FutureProducer = pc.create().map_err(KafkaError::kafka("create the probe producer"))?;
    let unsupported = |step: &'static str| {
        let bootstrap = cluster.bootstrap_servers().to_string();
        move |source: RdKafkaError| refusal(bootstrap, step, source)
    };
    let p = producer.clone();
    blocking(move || Ok(p.init_transactions(timeout)))
        .await?
        .map_err(unsupported("initialize transactions"))?;
    producer
        .begin_transaction()
        .map_err(unsupported("begin a transaction"))?;
    let key = format!("{}/transaction-probe", config.service());
    let record = FutureRecord::<String, [u8]>::to(topic).partition(0).key(&key);
    producer
        .send(record, timeout)
        .await
        .map_err(|(e, _)| unsupported("produce a record")(e))?;
    blocking(move || Ok(producer.abort_transaction(timeout)))
        .await?
        .map_err(unsupported("abort (EndTxn)"))
}

/// A failed probe step: the broker is unreachable (kept as such, not a
/// verdict on transactions), or it refused the transactional protocol.
fn refusal(bootstrap: String, step: &'static str, source: RdKafkaError) -> KafkaError {
    if source.rdkafka_error_code().map(kind_of_code) == Some(ErrorKind::Unavailable) {
        return KafkaError::Kafka {
            operation: "probe transactions",
            source,
        };
    }
    KafkaError::TransactionsUnsupported {
        bootstrap,
        step,
        source,
    }
}

/// The topic's settings from DescribeConfigs; `None` (with a warning) when
/// they cannot be read, and on the embedded broker (in process or reached
/// by address), which has none and does not answer DescribeConfigs: asking
/// would cost the whole request timeout.
async fn topic_settings(cluster: &KafkaCluster, topic: &str) -> Option<TopicSettings> {
    if cluster.is_embedded() {
        return None;
    }
    let id = cluster_id(cluster).await.ok().flatten();
    if id.is_some_and(|id| id.starts_with(MOCK_CLUSTER_ID_PREFIX)) {
        debug!(
            topic,
            "topic settings not checked: the broker is librdkafka's mock cluster"
        );
        return None;
    }
    match describe_topic(cluster, topic).await {
        Ok(settings) => Some(settings),
        Err(e) => {
            warn!(topic, error = %e, "topic settings not checked: the broker did not answer DescribeConfigs");
            None
        }
    }
}

async fn describe_topic(cluster: &KafkaCluster, topic: &str) -> Result<TopicSettings> {
    let admin: AdminClient<DefaultClientContext> = cluster
        .library_client_config()
        .create()
        .map_err(KafkaError::kafka("create an admin client"))?;
    let timeout = cluster.config().timeout();
    let opts = AdminOptions::new().request_timeout(Some(timeout));
    let results = admin
        .describe_configs([&ResourceSpecifier::Topic(topic)], &opts)
        .await
        .map_err(KafkaError::kafka("describe the topic's settings"))?;
    let resource = results
        .into_iter()
        .next()
        .ok_or_else(|| KafkaError::UnknownTopic(topic.to_string()))?
        .map_err(|code| KafkaError::kafka("describe the topic's settings")(RdKafkaError::AdminOp(code)))?;
    Ok(resource
        .entries
        .into_iter()
        .filter_map(|e| Some((e.name, e.value?)))
        .collect())
}

/// Refuses control-topic settings that can delete records (module docs).
fn check_control_settings(topic: &str, settings: &TopicSettings) -> Result<()> {
    warn_unreported(topic, settings, &["cleanup.policy", "retention.ms", "retention.bytes"]);
    if let Some(policy) = settings.get("cleanup.policy") {
        if policy.contains("compact") {
            return Err(unsafe_setting(
                topic,
                "cleanup.policy",
                policy,
                "all but the last record of each migration, and with them the order that decides ownership",
                CONTROL_FIX,
            ));
        }
    }
    check_unlimited(
        topic,
        settings,
        "ownership records (a former owner could start again)",
        CONTROL_FIX,
    )
}

/// Refuses snapshot-topic settings that can delete the latest snapshot.
fn check_snapshot_settings(topic: &str, settings: &TopicSettings) -> Result<()> {
    let Some(policy) = settings.get("cleanup.policy") else {
        warn_unreported(topic, settings, &["cleanup.policy"]);
        return Ok(());
    };
    if !policy.contains("delete") {
        return Ok(());
    }
    warn_unreported(topic, settings, &["retention.ms", "retention.bytes"]);
    check_unlimited(
        topic,
        settings,
        "the latest snapshot (it is kept for as long as it is the newest, whatever its age)",
        SNAPSHOT_FIX,
    )
}

/// Refuses a finite `retention.ms` or `retention.bytes` (`-1` and
/// `i64::MAX` are unlimited); warns about `retention.ms=-1`, which tansu
/// 0.6.0 takes for "delete everything" (module docs).
fn check_unlimited(topic: &str, settings: &TopicSettings, at_risk: &'static str, fix: &'static str) -> Result<()> {
    for key in ["retention.ms", "retention.bytes"] {
        match settings.get(key) {
            Some(value) if !is_unlimited(value) => return Err(unsafe_setting(topic, key, value, at_risk, fix)),
            _ => {}
        }
    }
    if settings.get("retention.ms").is_some_and(|v| v.trim() == "-1") {
        warn!(
            topic,
            "`retention.ms=-1` keeps every record on Kafka, but tansu 0.6.0's retention sweep deletes them all: \
             on tansu, set `retention.ms={RETENTION_FOREVER_MS}`"
        );
    }
    Ok(())
}

/// Whether a retention setting sets no limit.
fn is_unlimited(value: &str) -> bool {
    matches!(value.trim().parse::<i64>(), Ok(-1 | i64::MAX))
}

fn unsafe_setting(topic: &str, key: &str, value: &str, at_risk: &'static str, fix: &'static str) -> KafkaError {
    KafkaError::UnsafeTopicSetting {
        topic: topic.to_string(),
        key: key.to_string(),
        value: value.to_string(),
        at_risk,
        fix,
    }
}

/// Warns about settings the broker did not report (tansu reports only the
/// ones given at creation): they could not be checked.
fn warn_unreported(topic: &str, settings: &TopicSettings, keys: &[&str]) {
    let missing: Vec<&str> = keys.iter().copied().filter(|k| !settings.contains_key(*k)).collect();
    if !missing.is_empty() {
        warn!(
            topic,
            ?missing,
            "topic settings not reported by the broker, so not checked"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(pairs: &[(&str, &str)]) -> TopicSettings {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    fn refused_key(result: Result<()>) -> Option<String> {
        match result {
            Err(KafkaError::UnsafeTopicSetting { key, .. }) => Some(key),
            Err(e) => panic!("unexpected error {e}"),
            Ok(()) => None,
        }
    }

    #[test]
    fn the_control_topic_as_created_is_accepted() {
        assert_eq!(
            refused_key(check_control_settings("c", &settings(CONTROL_TOPIC_SETTINGS))),
            None
        );
    }

    #[test]
    fn both_spellings_of_no_time_limit_are_accepted() {
        for forever in ["-1", RETENTION_FOREVER_MS] {
            let kept = settings(&[("cleanup.policy", "delete"), ("retention.ms", forever)]);
            assert_eq!(refused_key(check_control_settings("c", &kept)), None, "{forever}");
        }
        let almost = settings(&[("retention.ms", "9223372036854775806")]);
        assert_eq!(
            refused_key(check_control_settings("c", &almost)).as_deref(),
            Some("retention.ms")
        );
    }

    #[test]
    fn a_compacted_or_expiring_control_topic_is_refused() {
        let compacted = settings(&[("cleanup.policy", "compact,delete"), ("retention.ms", "-1")]);
        assert_eq!(
            refused_key(check_control_settings("c", &compacted)).as_deref(),
            Some("cleanup.policy")
        );
        let week = settings(&[
            ("cleanup.policy", "delete"),
            ("retention.ms", "604800000"),
            ("retention.bytes", "-1"),
        ]);
        assert_eq!(
            refused_key(check_control_settings("c", &week)).as_deref(),
            Some("retention.ms")
        );
        let capped = settings(&[
            ("cleanup.policy", "delete"),
            ("retention.ms", "-1"),
            ("retention.bytes", "1048576"),
        ]);
        assert_eq!(
            refused_key(check_control_settings("c", &capped)).as_deref(),
            Some("retention.bytes")
        );
    }

    #[test]
    fn a_snapshot_topic_is_refused_only_when_deletion_can_drop_the_latest() {
        let created = settings(SNAPSHOT_TOPIC_SETTINGS);
        assert_eq!(refused_key(check_snapshot_settings("s", &created)), None);
        let compact_with_retention = settings(&[("cleanup.policy", "compact"), ("retention.ms", "1000")]);
        assert_eq!(refused_key(check_snapshot_settings("s", &compact_with_retention)), None);
        let kept_forever = settings(&[
            ("cleanup.policy", "delete"),
            ("retention.ms", "-1"),
            ("retention.bytes", "-1"),
        ]);
        assert_eq!(refused_key(check_snapshot_settings("s", &kept_forever)), None);
        let week = settings(&[("cleanup.policy", "delete"), ("retention.ms", "604800000")]);
        assert_eq!(
            refused_key(check_snapshot_settings("s", &week)).as_deref(),
            Some("retention.ms")
        );
        let both = settings(&[("cleanup.policy", "compact,delete"), ("retention.bytes", "10")]);
        assert_eq!(
            refused_key(check_snapshot_settings("s", &both)).as_deref(),
            Some("retention.bytes")
        );
    }

    #[test]
    fn a_refusal_names_the_fix() {
        let week = settings(&[("cleanup.policy", "delete"), ("retention.ms", "604800000")]);
        let message = check_snapshot_settings("orders.snapshots", &week)
            .unwrap_err()
            .to_string();
        assert!(
            message.contains("`retention.ms=604800000`") && message.contains("cleanup.policy=compact"),
            "{message}"
        );
    }
}
