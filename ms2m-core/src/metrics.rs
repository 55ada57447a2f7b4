//! Metrics: every name ms2m records, and the recording itself.
//!
//! ms2m records through the facade of the [`metrics` crate](::metrics) and never installs
//! a recorder: without one, every call is a no-op; with one (the
//! application's, or `ms2m_kafka::telemetry::serve_prometheus`, which
//! installs a Prometheus recorder) the numbers below appear. Install the
//! recorder before building instances: an instance creates its metric
//! handles once, bound to the recorder installed then. The names are
//! constants here, in one place, so dashboards and alerts can be checked
//! against the code.
//!
//! Every metric carries the labels `service` ([`StatefulService::NAME`](crate::StatefulService::NAME))
//! and `instance` (the instance id), except the coordinator's migration
//! metrics, which carry `service`, `strategy`, `source` and `target` (a
//! coordinator is no instance), and the Kafka client metrics, which carry
//! `service` and `client` (the client's role: `log`, `sink`).
//!
//! The apply loop stays cheap: counters are handles created once per
//! instance and advanced once per step by what the step applied, not per
//! message; lag is measured at most every [`LAG_INTERVAL`], and not at all
//! while the instance is idle (an empty poll means no lag).

use std::time::{Duration, Instant};

use ::metrics::{counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram, Unit};
use ::metrics::{Counter, Gauge, Histogram};

use crate::error::Error;
use crate::health::Health;
use crate::migration::{MigrationError, MigrationPlan, MigrationReport};
use crate::position::TopicPartition;
use crate::runtime::InstanceStats;

/// Counter: messages applied (a dead-lettered one included: the position
/// passed it), label `mode` = `live` (outputs emitted) or
/// `replay` (outputs suppressed: recovery, standby, migration target).
pub const APPLIED: &str = "ms2m_applied_total";
/// Counter: bad messages sent to the dead-letter topic, counted when the
/// commit that carries them succeeded.
pub const DEAD_LETTERED: &str = "ms2m_dead_lettered_total";
/// Counter: output records sent (dead letters included).
pub const OUTPUTS: &str = "ms2m_outputs_total";
/// Gauge: messages between the instance's position and the log's end, per
/// partition (labels `topic`, `partition`).
pub const POSITION_LAG: &str = "ms2m_position_lag";
/// Gauge: messages applied in replay mode per second, over the last second or more.
pub const REPLAY_RATE: &str = "ms2m_replay_rate";
/// Histogram: seconds one commit of outputs and position took.
pub const COMMIT_SECONDS: &str = "ms2m_commit_seconds";
/// Histogram: seconds the apply loop paused to take a snapshot (serialize,
/// or freeze a `#[state(freeze)]` state).
pub const CHECKPOINT_PAUSE_SECONDS: &str = "ms2m_checkpoint_pause_seconds";
/// Histogram: encoded size of each stored snapshot, bytes.
pub const CHECKPOINT_BYTES: &str = "ms2m_checkpoint_bytes";
/// Histogram: seconds of each pause of the apply loop for its own work (a
/// commit, a snapshot's serialization): what a client sees as a stall.
pub const APPLY_STALL_SECONDS: &str = "ms2m_apply_stall_seconds";
/// Histogram: seconds of each phase of a completed migration, label `phase`
/// = `checkpoint`, `transfer`, `restore`, `replay`, `cutover`, `total`.
pub const MIGRATION_PHASE_SECONDS: &str = "ms2m_migration_phase_seconds";
/// Histogram: downtime of each completed migration, seconds (the report's
/// `downtime_ms`: the handover clients saw or the source's longest stall
/// before it).
pub const MIGRATION_DOWNTIME_SECONDS: &str = "ms2m_migration_downtime_seconds";
/// Counter: migrations that ended, label `outcome` = `completed`,
/// `digest_mismatch`, `timeout`, `taken_over_not_live`, `aborted` or `error`.
pub const MIGRATIONS: &str = "ms2m_migrations_total";
/// Counter: failovers, a standby taking ownership after the owner failed
/// (not a planned migration). Incremented by the node that takes over.
pub const FAILOVERS: &str = "ms2m_failovers_total";
/// Counter: errors librdkafka reported to a client, label `kind` (the error code).
pub const KAFKA_CLIENT_ERRORS: &str = "ms2m_kafka_client_errors_total";
/// Gauge: average round-trip time to a broker, seconds, from librdkafka's
/// statistics (label `broker`).
pub const KAFKA_BROKER_RTT_SECONDS: &str = "ms2m_kafka_broker_rtt_seconds";
/// Counter: messages a client sent to brokers, from librdkafka's statistics.
pub const KAFKA_TX_MESSAGES: &str = "ms2m_kafka_tx_messages_total";
/// Counter: messages a client received from brokers, from librdkafka's statistics.
pub const KAFKA_RX_MESSAGES: &str = "ms2m_kafka_rx_messages_total";
/// Gauge: a consumer's lag per partition from librdkafka's statistics (last
/// stable offset minus the next offset handed to the application; labels
/// `topic`, `partition`).
pub const KAFKA_CONSUMER_LAG: &str = "ms2m_kafka_consumer_lag";

/// Label: the service name.
pub const SERVICE: &str = "service";
/// Label: the instance id.
pub const INSTANCE: &str = "instance";

/// How often a busy instance measures its lag (watermarks of each partition).
pub const LAG_INTERVAL: Duration = Duration::from_secs(5);

/// Registers the help text and unit of every metric above with the
/// installed recorder (call once after installing one; idempotent).
pub fn describe() {
    describe_counter!(APPLIED, "Messages applied (mode=live|replay)");
    describe_counter!(
        DEAD_LETTERED,
        "Bad messages sent to the dead-letter topic and committed"
    );
    describe_counter!(OUTPUTS, "Output records sent");
    describe_gauge!(POSITION_LAG, "Messages between the position and the log's end");
    describe_gauge!(REPLAY_RATE, "Messages applied in replay mode per second");
    describe_histogram!(COMMIT_SECONDS, Unit::Seconds, "Commit latency");
    describe_histogram!(CHECKPOINT_PAUSE_SECONDS, Unit::Seconds, "Apply-loop pause per snapshot");
    describe_histogram!(CHECKPOINT_BYTES, Unit::Bytes, "Encoded snapshot size");
    describe_histogram!(APPLY_STALL_SECONDS, Unit::Seconds, "Apply-loop stalls");
    describe_histogram!(MIGRATION_PHASE_SECONDS, Unit::Seconds, "Migration phase durations");
    describe_histogram!(MIGRATION_DOWNTIME_SECONDS, Unit::Seconds, "Migration downtime");
    describe_counter!(MIGRATIONS, "Migrations ended (outcome)");
    describe_counter!(FAILOVERS, "Failovers to a standby");
    describe_counter!(KAFKA_CLIENT_ERRORS, "Errors reported by librdkafka (kind)");
    describe_gauge!(
        KAFKA_BROKER_RTT_SECONDS,
        Unit::Seconds,
        "Average broker round-trip time"
    );
    describe_counter!(KAFKA_TX_MESSAGES, "Messages sent to brokers");
    describe_counter!(KAFKA_RX_MESSAGES, "Messages received from brokers");
    describe_gauge!(KAFKA_CONSUMER_LAG, "Consumer lag per partition (librdkafka statistics)");
}

/// Counter values already reported, to report deltas.
#[derive(Debug, Default)]
struct Reported {
    live: u64,
    replay: u64,
    outputs: u64,
}

/// The metric handles and health of one instance, created once.
#[derive(Debug)]
pub(crate) struct InstanceMetrics {
    labels: [(&'static str, String); 2],
    applied_live: Counter,
    applied_replay: Counter,
    outputs: Counter,
    dead_lettered: Counter,
    replay_rate: Gauge,
    commit: Histogram,
    checkpoint_pause: Histogram,
    checkpoint_bytes: Histogram,
    stall: Histogram,
    reported: Reported,
    /// Start of the replay-rate window and the replay count then.
    rate_window: (Instant, u64),
    /// Lag gauges per partition, created on first measurement.
    lag: Vec<(TopicPartition, Gauge)>,
    last_lag: Instant,
    pub(crate) health: Health,
}

impl InstanceMetrics {
    pub(crate) fn new(service: &str, instance: &str) -> Self {
        let labels = [(SERVICE, service.to_string()), (INSTANCE, instance.to_string())];
        let with = |extra: (&'static str, &'static str)| {
            let mut l: Vec<(&'static str, String)> = labels.to_vec();
            l.push((extra.0, extra.1.to_string()));
            l
        };
        Self {
            applied_live: counter!(APPLIED, &with(("mode", "live"))),
            applied_replay: counter!(APPLIED, &with(("mode", "replay"))),
            outputs: counter!(OUTPUTS, &labels),
            dead_lettered: counter!(DEAD_LETTERED, &labels),
            replay_rate: gauge!(REPLAY_RATE, &labels),
            commit: histogram!(COMMIT_SECONDS, &labels),
            checkpoint_pause: histogram!(CHECKPOINT_PAUSE_SECONDS, &labels),
            checkpoint_bytes: histogram!(CHECKPOINT_BYTES, &labels),
            stall: histogram!(APPLY_STALL_SECONDS, &labels),
            labels,
            reported: Reported::default(),
            rate_window: (Instant::now(), 0),
            lag: Vec::new(),
            last_lag: Instant::now(),
            health: Health::new(),
        }
    }

    /// After each step: counters advanced by what the step did, the replay
    /// rate once a second, liveness and serving for the health.
    pub(crate) fn after_step(&mut self, stats: &InstanceStats, serving: bool) {
        let r = &mut self.reported;
        self.applied_live.increment(stats.applied_live - r.live);
        self.applied_replay.increment(stats.applied_replay - r.replay);
        self.outputs.increment(stats.outputs_emitted - r.outputs);
        (r.live, r.replay, r.outputs) = (stats.applied_live, stats.applied_replay, stats.outputs_emitted);
        let elapsed = self.rate_window.0.elapsed();
        if elapsed >= Duration::from_secs(1) {
            let replayed = stats.applied_replay - self.rate_window.1;
            self.replay_rate.set(replayed as f64 / elapsed.as_secs_f64());
            self.rate_window = (Instant::now(), stats.applied_replay);
        }
        self.health.set_serving(serving);
        self.health.progressed();
    }

    pub(crate) fn committed(&self, took: Duration, dead_letters: u64) {
        self.commit.record(took);
        self.dead_lettered.increment(dead_letters);
    }

    pub(crate) fn stalled(&self, stall: Duration) {
        self.stall.record(stall);
    }

    pub(crate) fn checkpoint_paused(&self, pause: Duration) {
        self.checkpoint_pause.record(pause);
    }

    pub(crate) fn checkpoint_stored(&self, bytes: u64) {
        self.checkpoint_bytes.record(bytes as f64);
    }

    /// Whether a busy instance should measure its lag now.
    pub(crate) fn lag_due(&self) -> bool {
        self.last_lag.elapsed() >= LAG_INTERVAL
    }

    /// Records a lag measurement (every partition) and tells the health.
    pub(crate) fn lag_measured<'a>(&mut self, lags: impl IntoIterator<Item = (&'a TopicPartition, u64)>) {
        let mut total = 0u64;
        for (tp, lag) in lags {
            total = total.saturating_add(lag);
            self.lag_gauge(tp).set(lag as f64);
        }
        self.health.set_lag(total);
        self.last_lag = Instant::now();
    }

    fn lag_gauge(&mut self, tp: &TopicPartition) -> &Gauge {
        let at = match self.lag.iter().position(|(t, _)| t == tp) {
            Some(at) => at,
            None => {
                let mut labels = self.labels.to_vec();
                labels.push(("topic", tp.topic.to_string()));
                labels.push(("partition", tp.partition.to_string()));
                self.lag.push((tp.clone(), gauge!(POSITION_LAG, &labels)));
                self.lag.len() - 1
            }
        };
        &self.lag[at].1
    }
}

/// Records how a migration the coordinator ran ended: its phase durations
/// and downtime when it completed, and its outcome.
pub(crate) fn record_migration(plan: &MigrationPlan, result: &Result<MigrationReport, Error>) {
    let labels = [
        (SERVICE, plan.service.clone()),
        ("strategy", plan.strategy.to_string()),
        ("source", plan.source.clone()),
        ("target", plan.target.clone()),
    ];
    let outcome = match result {
        Ok(report) => {
            record_phases(&labels, report);
            "completed"
        }
        Err(Error::Migration(MigrationError::DigestMismatch { .. })) => "digest_mismatch",
        Err(Error::Migration(MigrationError::Timeout { .. })) => "timeout",
        Err(Error::Migration(MigrationError::TakenOverNotLive { .. })) => "taken_over_not_live",
        Err(Error::Migration(MigrationError::Aborted { .. })) => "aborted",
        Err(_) => "error",
    };
    let mut with_outcome = labels.to_vec();
    with_outcome.push(("outcome", outcome.to_string()));
    counter!(MIGRATIONS, &with_outcome).increment(1);
}

fn record_phases(labels: &[(&'static str, String)], report: &MigrationReport) {
    let phases = [
        ("checkpoint", report.checkpoint_ms),
        ("transfer", report.transfer_ms),
        ("restore", report.restore_ms),
        ("replay", report.replay_ms),
        ("cutover", report.cutover_ms),
        ("total", report.total_ms),
    ];
    for (phase, ms) in phases {
        let mut l = labels.to_vec();
        l.push(("phase", phase.to_string()));
        histogram!(MIGRATION_PHASE_SECONDS, &l).record(ms / 1e3);
    }
    histogram!(MIGRATION_DOWNTIME_SECONDS, labels).record(report.downtime_ms / 1e3);
}
