//! `ms2m status`: who owns the service, which migrations are still open,
//! which snapshots a recovery would use, and how far the service is behind
//! its input. Ownership and open migrations are read from the control
//! topic through the same fold every protocol party uses
//! ([`Decisions`]), so the CLI can never disagree with them.
//!
//! The lease section says which record set the owner's current lease term
//! and how old it is; the nodes section lists every instance the channel
//! has heard of (claims, renewals, migrations, and the `Announce` every
//! node publishes at each change of role) with its latest record and its
//! last announced role. Only the owner's liveness is known (its lease): a
//! standby that died silently keeps its last announced role; its own status
//! line (`NodeStatus`, the health endpoint) is where a live node reports.

use std::collections::BTreeSet;
use std::fmt::Write as _;

use ms2m_core::migration::protocol::Decisions;
use ms2m_core::migration::Strategy;
use ms2m_core::node::NodeRole;
use ms2m_core::{ControlBody, ControlMessage, Role};
use serde::Serialize;

use super::error::CliError;
use super::output::{self, line};
use super::records;
use super::snapshots::{self, SnapshotInfo};
use crate::{KafkaCluster, KafkaControl};

/// How many snapshots `status` shows.
const LATEST_SNAPSHOTS: usize = 3;

/// Everything `ms2m status` reports.
#[derive(Clone, Debug, Serialize)]
pub struct Status {
    /// The service.
    pub service: String,
    /// Ownership and open migrations, from the control topic.
    pub control: ControlStatus,
    /// The newest snapshots, or why they could not be listed.
    pub snapshots: SnapshotsStatus,
    /// Lag of the service's consumer group per input partition.
    pub lag: LagStatus,
}

/// The control topic's view.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ControlStatus {
    /// The control topic.
    pub topic: String,
    /// Whether it exists (it is created by the first instance or migration).
    pub exists: bool,
    /// The recorded owner (`None` before any migration decided one).
    pub owner: Option<OwnerView>,
    /// Migrations with a `Prepare` and no decision yet.
    pub undecided: Vec<Undecided>,
    /// Records of this service on the topic.
    pub records: usize,
    /// Records skipped as undecodable (another tool or a newer version).
    pub skipped_records: u64,
    /// The owner's lease (`None` while nobody owns the service).
    pub lease: Option<LeaseView>,
    /// Every instance the channel names, in the order first named.
    pub nodes: Vec<NodeSeen>,
    /// Input records operators allowed to skip (`dead-letters skip`), the
    /// audit trail.
    pub skipped_inputs: Vec<SkipView>,
}

/// An operator's `SkipInput` record.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct SkipView {
    /// Input topic.
    pub topic: String,
    /// Partition.
    pub partition: i32,
    /// Offset.
    pub offset: i64,
    /// Why.
    pub reason: String,
    /// Who.
    pub operator: String,
    /// When, ms since the Unix epoch.
    pub sent_at_ms: u64,
}

/// The owner's current lease term and the record that set it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct LeaseView {
    /// The owner's epoch.
    pub epoch: u64,
    /// The latest renewal counted (0: none since the claim or takeover).
    pub renewal: u64,
    /// Kind of the record that set this term (`Claim`, `Renew`, `Takeover`).
    pub set_by: String,
    /// When that record was sent, ms since the Unix epoch (sender's clock).
    pub sent_at_ms: u64,
    /// Its age when `status` ran (wall clocks: off by their skew). Past the
    /// nodes' lease timeout (default 10 s), a standby claims the service.
    pub age_ms: u64,
}

/// An instance the control channel names.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct NodeSeen {
    /// Instance id.
    pub instance_id: String,
    /// `owner` for the recorded owner; otherwise its last announced role
    /// (`standby`, `target`, `stopped`), or `not owner` when it announced
    /// none. Only the owner's is known to be current (its lease).
    pub role: &'static str,
    /// Kind of the latest record naming it.
    pub last_record: String,
    /// When that record was sent, ms since the Unix epoch.
    pub last_sent_at_ms: u64,
}

/// The owner, as recorded.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct OwnerView {
    /// Instance id.
    pub instance_id: String,
    /// Owner epoch.
    pub epoch: u64,
}

/// A migration nobody decided yet: `ms2m recover` decides it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Undecided {
    /// Migration id.
    pub migration_id: String,
    /// Source instance.
    pub source: String,
    /// Target instance.
    pub target: String,
    /// The strategy its `Prepare` names (none in records written before
    /// `Prepare` carried it).
    pub strategy: Option<Strategy>,
    /// Kind of its latest record (e.g. `Stop`, `TargetProgress`).
    pub last_record: String,
    /// Who sent that record.
    pub last_from: Role,
    /// When, ms since the Unix epoch.
    pub last_sent_at_ms: u64,
}

/// The snapshot section.
#[derive(Clone, Debug, Default, Serialize)]
pub struct SnapshotsStatus {
    /// The snapshot topic.
    pub topic: String,
    /// The newest few, newest first.
    pub latest: Vec<SnapshotInfo>,
    /// Why they could not be listed.
    pub error: Option<String>,
}

/// The lag section.
#[derive(Clone, Debug, Default, Serialize)]
pub struct LagStatus {
    /// The consumer group whose committed offsets are the service's position.
    pub group: String,
    /// Per input partition.
    pub partitions: Vec<PartitionLagView>,
    /// Why some or all partitions are missing.
    pub notes: Vec<String>,
}

/// One input partition.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PartitionLagView {
    /// Topic.
    pub topic: String,
    /// Partition.
    pub partition: i32,
    /// Earliest stored offset.
    pub low: i64,
    /// Next offset to be written.
    pub high: i64,
    /// The group's committed offset (`None`: nothing committed).
    pub committed: Option<i64>,
    /// `high - committed` (`None` when nothing is committed).
    pub lag: Option<u64>,
}

/// Runs `ms2m status`.
pub async fn run(cluster: &KafkaCluster, json: bool) -> Result<(), CliError> {
    let control = control(cluster).await?;
    let snapshots = snapshots(cluster).await;
    let topics = lag_topics(cluster, &snapshots);
    let lag = lag(cluster, &topics).await?;
    let status = Status {
        service: cluster.config().service().to_string(),
        control,
        snapshots,
        lag,
    };
    output::print(json, &status, |out| text(out, &status));
    Ok(())
}

/// The control channel, if its topic exists (the CLI never creates it).
pub async fn open_control(cluster: &KafkaCluster) -> Result<Option<KafkaControl>, CliError> {
    let topic = cluster.config().control_topic();
    if cluster.partition_count(&topic).await?.is_none() {
        return Ok(None);
    }
    Ok(Some(KafkaControl::new(cluster).await?))
}

async fn control(cluster: &KafkaCluster) -> Result<ControlStatus, CliError> {
    let mut status = ControlStatus {
        topic: cluster.config().control_topic(),
        ..ControlStatus::default()
    };
    let Some(channel) = open_control(cluster).await? else {
        return Ok(status);
    };
    let history = ms2m_core::migration::read_history(&channel, cluster.config().service()).await?;
    let decisions = Decisions::from_history(&history);
    status.exists = true;
    status.owner = decisions.owner().map(|o| OwnerView {
        instance_id: o.instance_id.clone(),
        epoch: o.epoch,
    });
    status.undecided = undecided(&history);
    status.lease = lease(&history, output::now_ms());
    status.nodes = nodes(&history);
    status.skipped_inputs = skipped_inputs(&history);
    status.records = history.len();
    status.skipped_records = channel.skipped_records();
    Ok(status)
}

/// The migrations of `history` (one service's, in channel order) that have
/// a `Prepare` and no decision, in the order they started.
pub fn undecided(history: &[ControlMessage]) -> Vec<Undecided> {
    let decisions = Decisions::from_history(history);
    let mut open: Vec<Undecided> = Vec::new();
    for m in history {
        if let ControlBody::Prepare {
            source,
            target,
            strategy,
            ..
        } = &m.body
        {
            if !open.iter().any(|u| u.migration_id == m.migration_id) {
                open.push(Undecided {
                    migration_id: m.migration_id.clone(),
                    source: source.clone(),
                    target: target.clone(),
                    strategy: *strategy,
                    last_record: String::new(),
                    last_from: m.from,
                    last_sent_at_ms: m.sent_at_ms,
                });
            }
        }
        if let Some(u) = open.iter_mut().find(|u| u.migration_id == m.migration_id) {
            u.last_record = kind(&m.body);
            u.last_from = m.from;
            u.last_sent_at_ms = m.sent_at_ms;
        }
    }
    open.retain(|u| decisions.outcome(&u.migration_id).is_none());
    open
}

/// The owner's lease after `history`, with the record that last changed
/// it, aged at `now_ms`.
pub fn lease(history: &[ControlMessage], now_ms: u64) -> Option<LeaseView> {
    let mut decisions = Decisions::default();
    let mut set_by = None;
    for m in history {
        let before = decisions.lease();
        decisions.observe(m);
        if decisions.lease() != before {
            set_by = Some(m);
        }
    }
    let (term, m) = (decisions.lease()?, set_by?);
    Some(LeaseView {
        epoch: term.epoch,
        renewal: term.renewal,
        set_by: kind(&m.body),
        sent_at_ms: m.sent_at_ms,
        age_ms: now_ms.saturating_sub(m.sent_at_ms),
    })
}

/// Every instance `history` names, with its latest record.
pub fn nodes(history: &[ControlMessage]) -> Vec<NodeSeen> {
    let owner = Decisions::from_history(history).owner().map(|o| o.instance_id.clone());
    let mut seen: Vec<NodeSeen> = Vec::new();
    let mut announced: std::collections::BTreeMap<&str, NodeRole> = Default::default();
    for m in history {
        if let ControlBody::Announce { node, role } = &m.body {
            announced.insert(node, *role);
        }
        for id in named(m) {
            let role = match (owner.as_deref() == Some(id), announced.get(id)) {
                (true, _) => "owner",
                (false, Some(NodeRole::Standby)) => "standby",
                (false, Some(NodeRole::Target)) => "target",
                (false, Some(NodeRole::Stopped)) => "stopped",
                (false, _) => "not owner",
            };
            let entry = NodeSeen {
                instance_id: id.to_string(),
                role,
                last_record: kind(&m.body),
                last_sent_at_ms: m.sent_at_ms,
            };
            match seen.iter_mut().find(|n| n.instance_id == id) {
                Some(n) => *n = entry,
                None => seen.push(entry),
            }
        }
    }
    seen
}

/// The operators' `SkipInput` records of `history`, in channel order.
pub fn skipped_inputs(history: &[ControlMessage]) -> Vec<SkipView> {
    history
        .iter()
        .filter_map(|m| match (&m.body, m.from) {
            (
                ControlBody::SkipInput {
                    topic,
                    partition,
                    offset,
                    reason,
                    operator,
                },
                Role::Operator,
            ) => Some(SkipView {
                topic: topic.clone(),
                partition: *partition,
                offset: *offset,
                reason: reason.clone(),
                operator: operator.clone(),
                sent_at_ms: m.sent_at_ms,
            }),
            _ => None,
        })
        .collect()
}

/// The instances a record names.
fn named(m: &ControlMessage) -> Vec<&str> {
    match &m.body {
        ControlBody::Claim { owner, .. } | ControlBody::Renew { owner, .. } => vec![owner.as_str()],
        ControlBody::Prepare { source, target, .. } => vec![source.as_str(), target.as_str()],
        ControlBody::Announce { node, .. } => vec![node.as_str()],
        _ => Vec::new(),
    }
}

/// A record's kind, its variant name (from its serde form, so records
/// added later are named too).
fn kind(body: &ControlBody) -> String {
    match serde_json::to_value(body) {
        Ok(serde_json::Value::String(name)) => name,
        Ok(serde_json::Value::Object(map)) => map.keys().next().cloned().unwrap_or_default(),
        _ => "?".into(),
    }
}

async fn snapshots(cluster: &KafkaCluster) -> SnapshotsStatus {
    let mut status = SnapshotsStatus {
        topic: cluster.config().snapshot_topic(),
        ..SnapshotsStatus::default()
    };
    let listed = match snapshots::open(cluster).await {
        Ok(store) => snapshots::latest(cluster, &store, Some(LATEST_SNAPSHOTS)).await,
        Err(e) => Err(e),
    };
    match listed {
        Ok(latest) => status.latest = latest,
        Err(e) => status.error = Some(e.chain()),
    }
    status
}

/// The configured input topics, else those of the newest snapshot's position.
fn lag_topics(cluster: &KafkaCluster, snapshots: &SnapshotsStatus) -> Vec<String> {
    let configured = cluster.config().input_topics();
    if !configured.is_empty() {
        return configured.to_vec();
    }
    let from_snapshot: BTreeSet<String> = snapshots
        .latest
        .iter()
        .find_map(|s| s.header.as_ref())
        .map(|h| h.position.iter().map(|(tp, _)| tp.topic.to_string()).collect())
        .unwrap_or_default();
    from_snapshot.into_iter().collect()
}

async fn lag(cluster: &KafkaCluster, topics: &[String]) -> Result<LagStatus, CliError> {
    let group = cluster.config().group_id();
    let mut status = LagStatus {
        group: group.clone(),
        ..LagStatus::default()
    };
    if topics.is_empty() {
        status
            .notes
            .push("no input topics: pass --input-topic (no snapshot names them either)".into());
    }
    for topic in topics {
        if cluster.partition_count(topic).await?.is_none() {
            status.notes.push(format!("input topic `{topic}` does not exist"));
            continue;
        }
        let marks = records::watermarks(cluster, topic).await?;
        let partitions: Vec<i32> = marks.keys().copied().collect();
        let committed = records::committed(cluster, &group, topic, &partitions).await?;
        for (p, w) in marks {
            let c = committed.get(&p).copied().flatten();
            status.partitions.push(PartitionLagView {
                topic: topic.clone(),
                partition: p,
                low: w.low,
                high: w.high,
                committed: c,
                lag: c.map(|c| (w.high - c).max(0) as u64),
            });
        }
    }
    Ok(status)
}

fn text(out: &mut String, s: &Status) {
    line!(out, "service {}", s.service);
    control_text(out, &s.control);
    line!(out, "snapshots (topic {}):", s.snapshots.topic);
    match &s.snapshots.error {
        Some(e) => line!(out, "  unavailable: {e}"),
        None => snapshots::table(out, &s.snapshots.latest),
    }
    line!(out, "lag (group {}):", s.lag.group);
    for p in &s.lag.partitions {
        let committed = p.committed.map_or("none".to_string(), |c| c.to_string());
        let lag = p.lag.map_or("-".to_string(), |l| l.to_string());
        line!(
            out,
            "  {}/{:<3} committed {committed:>10}  high {:>10}  lag {lag}",
            p.topic,
            p.partition,
            p.high
        );
    }
    for note in &s.lag.notes {
        line!(out, "  {note}");
    }
}

fn control_text(out: &mut String, c: &ControlStatus) {
    if !c.exists {
        line!(
            out,
            "control topic {} does not exist yet: no owner recorded, no migrations",
            c.topic
        );
        return;
    }
    match &c.owner {
        Some(o) => line!(out, "owner {} (epoch {})", o.instance_id, o.epoch),
        None => line!(out, "owner none recorded (no claim or migration has decided one)"),
    }
    if let Some(l) = &c.lease {
        line!(
            out,
            "lease epoch {} renewal {}: set by {} at {} ({:.1} s ago)",
            l.epoch,
            l.renewal,
            l.set_by,
            output::time(l.sent_at_ms),
            l.age_ms as f64 / 1000.0
        );
    }
    if !c.nodes.is_empty() {
        line!(
            out,
            "nodes on the channel (role: as last announced; only the owner's is live, by its lease):"
        );
    }
    for n in &c.nodes {
        line!(
            out,
            "  {:<16} {:<9}  last: {} at {}",
            n.instance_id,
            n.role,
            n.last_record,
            output::time(n.last_sent_at_ms)
        );
    }
    line!(
        out,
        "control topic {}: {} record(s), {} skipped as undecodable",
        c.topic,
        c.records,
        c.skipped_records
    );
    for s in &c.skipped_inputs {
        line!(
            out,
            "skip allowed: {}/{}@{} by {} at {}: {}",
            s.topic,
            s.partition,
            s.offset,
            s.operator,
            output::time(s.sent_at_ms),
            s.reason
        );
    }
    if c.undecided.is_empty() {
        line!(out, "undecided migrations: none");
    } else {
        line!(out, "undecided migrations (decide them with `ms2m recover`):");
    }
    for u in &c.undecided {
        let strategy = u
            .strategy
            .map_or("strategy not recorded".to_string(), |s| s.to_string());
        line!(
            out,
            "  {}  {} -> {} ({strategy})  last: {} from {:?} at {}",
            u.migration_id,
            u.source,
            u.target,
            u.last_record,
            u.last_from,
            output::time(u.last_sent_at_ms)
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(migration: &str, from: Role, body: ControlBody) -> ControlMessage {
        ControlMessage {
            service: "svc".into(),
            migration_id: migration.into(),
            from,
            sent_at_ms: 7,
            body,
        }
    }

    fn prepare(migration: &str) -> ControlMessage {
        let body = ControlBody::Prepare {
            source: "a".into(),
            target: "b".into(),
            digest_policy: Default::default(),
            strategy: Some(Strategy::StopAndCopy),
        };
        record(migration, Role::Coordinator, body)
    }

    #[test]
    fn undecided_migrations_are_those_prepared_and_not_decided() {
        let history = vec![
            prepare("m1"),
            prepare("m2"),
            record("m1", Role::Coordinator, ControlBody::Aborted { reason: "x".into() }),
            record("m2", Role::Coordinator, ControlBody::Stop { next_epoch: 2 }),
            record("m3", Role::Coordinator, ControlBody::Checkpoint),
        ];
        let open = undecided(&history);
        assert_eq!(open.len(), 1, "{open:?}");
        assert_eq!(
            (
                open[0].migration_id.as_str(),
                open[0].last_record.as_str(),
                open[0].source.as_str()
            ),
            ("m2", "Stop", "a")
        );
        assert_eq!(open[0].strategy, Some(Strategy::StopAndCopy), "the Prepare's strategy");
    }

    fn node(sent_at_ms: u64, body: ControlBody) -> ControlMessage {
        ControlMessage {
            sent_at_ms,
            ..record("", Role::Node, body)
        }
    }

    #[test]
    fn the_lease_is_the_term_of_the_latest_counted_renewal_and_nodes_are_listed() {
        let claim = |owner: &str| ControlBody::Claim {
            owner: owner.into(),
            epoch: 1,
            expired: None,
        };
        let renew = |renewal| ControlBody::Renew {
            owner: "a".into(),
            epoch: 1,
            renewal,
            incarnation: 1,
        };
        let history = vec![
            node(100, claim("a")),
            node(101, claim("b")),
            node(2_000, renew(1)),
            node(3_000, renew(1)),
        ];
        let lease = lease(&history, 5_000).expect("a owns the service");
        assert_eq!(
            (lease.epoch, lease.renewal, lease.set_by.as_str(), lease.age_ms),
            (1, 1, "Renew", 3_000),
            "the duplicate renewal changes nothing"
        );
        let nodes = nodes(&history);
        let summary: Vec<_> = nodes.iter().map(|n| (n.instance_id.as_str(), n.role)).collect();
        assert_eq!(summary, [("a", "owner"), ("b", "not owner")]);
        assert!(super::lease(&history[..0], 0).is_none());
    }

    #[test]
    fn nodes_that_only_announce_are_listed_with_their_last_role() {
        let announce = |node: &str, role| ControlBody::Announce {
            node: node.into(),
            role,
        };
        let history = vec![
            node(
                100,
                ControlBody::Claim {
                    owner: "a".into(),
                    epoch: 1,
                    expired: None,
                },
            ),
            node(101, announce("a", NodeRole::Owner)),
            node(102, announce("c", NodeRole::Standby)),
            node(103, announce("d", NodeRole::Standby)),
            node(104, announce("d", NodeRole::Stopped)),
        ];
        let nodes = nodes(&history);
        let summary: Vec<_> = nodes
            .iter()
            .map(|n| (n.instance_id.as_str(), n.role, n.last_record.as_str()))
            .collect();
        assert_eq!(
            summary,
            [
                ("a", "owner", "Announce"),
                ("c", "standby", "Announce"),
                ("d", "stopped", "Announce")
            ]
        );
    }

    #[test]
    fn record_kinds_are_variant_names() {
        assert_eq!(kind(&ControlBody::Checkpoint), "Checkpoint");
        assert_eq!(kind(&ControlBody::Release), "Release");
        assert_eq!(kind(&ControlBody::Stop { next_epoch: 1 }), "Stop");
    }
}
