//! `ms2m fleet`, `ms2m drain HOST`, `ms2m rebalance`: the partitioned
//! fleet of a service (its hosts and tasks, see `ms2m_core::fleet`) as the
//! control topic records it, and the two operator requests its leader acts
//! on.
//!
//! The view is a fold of the records: a task is every service id of the
//! form `{service}/p{N}` on the channel; its owner comes from the same
//! [`Decisions`] every node uses. A host is live when its latest heartbeat
//! is younger than `--host-timeout` by the record's own clock (the CLI's
//! clock is compared with the host's: skew between machines shifts it).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::time::Duration;

use clap::Args;
use ms2m_core::migration::protocol::Decisions;
use ms2m_core::{ControlBody, ControlMessage, Role};
use serde::Serialize;

use super::config::parse_duration;
use super::error::CliError;
use super::output::{self, line};
use crate::{KafkaCluster, KafkaControl};

/// `ms2m fleet`'s options.
#[derive(Args, Clone, Debug, PartialEq, Eq)]
pub struct FleetArgs {
    /// A host whose latest heartbeat is older than this counts as dead
    /// (the hosts' own `host_timeout`).
    #[arg(long, value_name = "DURATION", value_parser = parse_duration, default_value = "3s")]
    pub host_timeout: Duration,
}

/// `ms2m drain`'s options.
#[derive(Args, Clone, Debug, PartialEq, Eq)]
pub struct DrainArgs {
    /// The host to empty (its `--instance` id).
    pub host: String,
    /// Who asks (recorded); default `$USER`.
    #[arg(long)]
    pub operator: Option<String>,
    /// Wait until the host owns no task and none is assigned to it; fail
    /// after this long.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub wait: Option<Duration>,
}

/// `ms2m rebalance`'s options.
#[derive(Args, Clone, Debug, PartialEq, Eq)]
pub struct RebalanceArgs {
    /// Who asks (recorded); default `$USER`.
    #[arg(long)]
    pub operator: Option<String>,
}

/// The fleet as the control topic records it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct FleetView {
    /// The service.
    pub service: String,
    /// Every host named, by id.
    pub hosts: Vec<HostView>,
    /// Every task, by id.
    pub tasks: Vec<TaskView>,
    /// `Rebalance` requests recorded.
    pub rebalance_requests: usize,
}

/// A host of the fleet.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct HostView {
    /// Its id.
    pub host: String,
    /// Age of its latest heartbeat, ms (`None`: never heard).
    pub heartbeat_age_ms: Option<u64>,
    /// Whether that heartbeat is younger than the host timeout.
    pub live: bool,
    /// Whether an operator drained it.
    pub drained: bool,
    /// Tasks it owns.
    pub owns: usize,
    /// Tasks assigned to it.
    pub assigned: usize,
}

/// A task of the fleet.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct TaskView {
    /// Its id, `{service}/p{N}`.
    pub task: String,
    /// Its owner.
    pub owner: Option<String>,
    /// The owner's epoch.
    pub epoch: Option<u64>,
    /// The host it is assigned to.
    pub assigned: Option<String>,
    /// Whether a migration of it is under way.
    pub moving: bool,
}

impl FleetView {
    /// Folds `history` (the whole channel, in order) at `now_ms`.
    pub fn fold(service: &str, history: &[ControlMessage], now_ms: u64, host_timeout: Duration) -> Self {
        let prefix = format!("{service}/p");
        let mut per_task: BTreeMap<String, Vec<ControlMessage>> = BTreeMap::new();
        let mut heard: BTreeMap<String, u64> = BTreeMap::new();
        let (mut drained, mut assigned) = (BTreeSet::new(), BTreeMap::new());
        let mut rebalance_requests = 0;
        for m in history {
            if m.service.starts_with(&prefix) {
                per_task.entry(m.service.clone()).or_default().push(m.clone());
                continue;
            }
            if m.service != service {
                continue;
            }
            match (&m.body, m.from) {
                (ControlBody::Heartbeat { host }, _) => {
                    let at = heard.entry(host.clone()).or_insert(0);
                    *at = (*at).max(m.sent_at_ms);
                }
                (ControlBody::Assign { task, host }, _) => {
                    per_task.entry(task.clone()).or_default();
                    assigned.insert(task.clone(), host.clone());
                }
                (ControlBody::Drain { host, .. }, Role::Operator) => {
                    drained.insert(host.clone());
                }
                (ControlBody::Rebalance { .. }, Role::Operator) => rebalance_requests += 1,
                _ => {}
            }
        }
        let tasks: Vec<TaskView> = per_task
            .into_iter()
            .map(|(task, records)| {
                let decisions = Decisions::from_history(&records);
                let owner = decisions.owner();
                TaskView {
                    owner: owner.map(|o| o.instance_id.clone()),
                    epoch: owner.map(|o| o.epoch),
                    assigned: assigned.get(&task).cloned(),
                    moving: !super::status::undecided(&records).is_empty(),
                    task,
                }
            })
            .collect();
        let names: BTreeSet<String> = heard
            .keys()
            .chain(&drained)
            .chain(tasks.iter().filter_map(|t| t.owner.as_ref()))
            .chain(tasks.iter().filter_map(|t| t.assigned.as_ref()))
            .cloned()
            .collect();
        let hosts = names
            .into_iter()
            .map(|host| {
                let age = heard.get(&host).map(|at| now_ms.saturating_sub(*at));
                HostView {
                    heartbeat_age_ms: age,
                    live: age.is_some_and(|a| u128::from(a) <= host_timeout.as_millis()),
                    drained: drained.contains(&host),
                    owns: tasks.iter().filter(|t| t.owner.as_ref() == Some(&host)).count(),
                    assigned: tasks.iter().filter(|t| t.assigned.as_ref() == Some(&host)).count(),
                    host,
                }
            })
            .collect();
        Self {
            service: service.to_string(),
            hosts,
            tasks,
            rebalance_requests,
        }
    }

    /// The host named `host`.
    pub fn host(&self, host: &str) -> Option<&HostView> {
        self.hosts.iter().find(|h| h.host == host)
    }
}

/// What `drain` and `rebalance` did.
#[derive(Clone, Debug, Serialize)]
pub struct Requested {
    /// The record published: `Drain` or `Rebalance`.
    pub request: &'static str,
    /// The host drained, for `Drain`.
    pub host: Option<String>,
    /// Who asked.
    pub operator: String,
    /// The fleet after the request (after the wait, with `--wait`).
    pub fleet: FleetView,
}

/// Runs `ms2m fleet`.
pub async fn fleet(cluster: &KafkaCluster, args: &FleetArgs, json: bool) -> Result<(), CliError> {
    let control = control(cluster).await?;
    let view = read(cluster, &control, args.host_timeout).await?;
    output::print(json, &view, |out| text(out, &view));
    Ok(())
}

/// Runs `ms2m drain HOST` (refused for a host the channel never named).
pub async fn drain(cluster: &KafkaCluster, args: &DrainArgs, json: bool) -> Result<(), CliError> {
    let control = control(cluster).await?;
    let before = read(cluster, &control, FleetArgs::default_timeout()).await?;
    if before.host(&args.host).is_none() {
        return Err(CliError::UnknownHost {
            host: args.host.clone(),
            known: before.hosts.iter().map(|h| h.host.clone()).collect(),
        });
    }
    let operator = operator(&args.operator);
    let body = ControlBody::Drain {
        host: args.host.clone(),
        operator: operator.clone(),
    };
    publish(cluster, &control, body).await?;
    let timeout = FleetArgs::default_timeout();
    let mut view = read(cluster, &control, timeout).await?;
    if let Some(wait) = args.wait {
        let deadline = tokio::time::Instant::now() + wait;
        while view.host(&args.host).is_some_and(|h| h.owns + h.assigned > 0) {
            if tokio::time::Instant::now() >= deadline {
                let h = view.host(&args.host).cloned().unwrap_or_default();
                return Err(CliError::DrainTimeout {
                    host: args.host.clone(),
                    waited: wait,
                    owns: h.owns,
                });
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
            view = read(cluster, &control, timeout).await?;
        }
    }
    let done = Requested {
        request: "Drain",
        host: Some(args.host.clone()),
        operator,
        fleet: view,
    };
    output::print(json, &done, |out| requested_text(out, &done));
    Ok(())
}

/// Runs `ms2m rebalance`.
pub async fn rebalance(cluster: &KafkaCluster, args: &RebalanceArgs, json: bool) -> Result<(), CliError> {
    let control = control(cluster).await?;
    let operator = operator(&args.operator);
    let body = ControlBody::Rebalance {
        operator: operator.clone(),
    };
    publish(cluster, &control, body).await?;
    let view = read(cluster, &control, FleetArgs::default_timeout()).await?;
    let done = Requested {
        request: "Rebalance",
        host: None,
        operator,
        fleet: view,
    };
    output::print(json, &done, |out| requested_text(out, &done));
    Ok(())
}

impl FleetArgs {
    fn default_timeout() -> Duration {
        Duration::from_secs(3)
    }
}

fn operator(given: &Option<String>) -> String {
    given
        .clone()
        .or_else(|| std::env::var("USER").ok())
        .unwrap_or_else(|| "unknown".into())
}

async fn control(cluster: &KafkaCluster) -> Result<KafkaControl, CliError> {
    super::status::open_control(cluster)
        .await?
        .ok_or_else(|| CliError::MissingTopic {
            topic: cluster.config().control_topic(),
            hint: "no host of this service has started (or name the control topic with --control-topic)",
        })
}

async fn read(cluster: &KafkaCluster, control: &KafkaControl, host_timeout: Duration) -> Result<FleetView, CliError> {
    let history = ms2m_core::ControlChannel::history(control)
        .await
        .map_err(|e| ms2m_core::Error::backend(ms2m_core::Component::Control, "read history", e))?;
    Ok(FleetView::fold(
        cluster.config().service(),
        &history,
        output::now_ms(),
        host_timeout,
    ))
}

async fn publish(cluster: &KafkaCluster, control: &KafkaControl, body: ControlBody) -> Result<(), CliError> {
    let message = ControlMessage {
        service: cluster.config().service().to_string(),
        migration_id: String::new(),
        from: Role::Operator,
        sent_at_ms: output::now_ms(),
        body,
    };
    ms2m_core::ControlChannel::publish(control, &message).await?;
    Ok(())
}

fn text(out: &mut String, view: &FleetView) {
    line!(out, "service {}: {} task(s)", view.service, view.tasks.len());
    for h in &view.hosts {
        let age = h
            .heartbeat_age_ms
            .map_or_else(|| "never heard".to_string(), |a| format!("heard {a} ms ago"));
        let state = match (h.live, h.drained) {
            (_, true) => "drained",
            (true, false) => "live",
            (false, false) => "dead",
        };
        line!(
            out,
            "  host {:<12} {state:<8} owns {:>3}  assigned {:>3}  ({age})",
            h.host,
            h.owns,
            h.assigned
        );
    }
    for t in &view.tasks {
        let owner = t.owner.as_deref().unwrap_or("-");
        let assigned = t.assigned.as_deref().unwrap_or("-");
        let moving = if t.moving { "  moving" } else { "" };
        let epoch = t.epoch.map_or_else(String::new, |e| format!(" (epoch {e})"));
        line!(
            out,
            "  task {}  owner {owner}{epoch}  assigned {assigned}{moving}",
            t.task
        );
    }
}

fn requested_text(out: &mut String, done: &Requested) {
    match &done.host {
        Some(host) => line!(out, "{} {host} requested by {}", done.request, done.operator),
        None => line!(out, "{} requested by {}", done.request, done.operator),
    }
    text(out, &done.fleet);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(service: &str, at: u64, from: Role, body: ControlBody) -> ControlMessage {
        ControlMessage {
            service: service.into(),
            migration_id: String::new(),
            from,
            sent_at_ms: at,
            body,
        }
    }

    fn heartbeat(host: &str, at: u64) -> ControlMessage {
        let body = ControlBody::Heartbeat { host: host.into() };
        record("svc", at, Role::Node, body)
    }

    fn claim(task: &str, owner: &str, epoch: u64) -> ControlMessage {
        let body = ControlBody::Claim {
            owner: owner.into(),
            epoch,
            expired: None,
        };
        record(task, 1, Role::Node, body)
    }

    #[test]
    fn hosts_tasks_owners_and_drains_are_folded_from_the_records() {
        let assign = ControlBody::Assign {
            task: "svc/p01".into(),
            host: "b".into(),
        };
        let drain = ControlBody::Drain {
            host: "a".into(),
            operator: "op".into(),
        };
        let history = vec![
            heartbeat("a", 1_000),
            claim("svc/p00", "a", 1),
            claim("svc/p01", "a", 1),
            record("svc", 1_100, Role::Coordinator, assign),
            heartbeat("b", 4_000),
            record("svc", 4_100, Role::Operator, drain),
            record("other", 4_200, Role::Node, ControlBody::Heartbeat { host: "z".into() }),
        ];
        let view = FleetView::fold("svc", &history, 5_000, Duration::from_secs(3));
        assert_eq!(view.tasks.len(), 2);
        assert_eq!(view.tasks[1].owner.as_deref(), Some("a"));
        assert_eq!(view.tasks[1].assigned.as_deref(), Some("b"));
        let a = view.host("a").expect("a listed");
        assert_eq!((a.live, a.drained, a.owns, a.assigned), (false, true, 2, 0));
        let b = view.host("b").expect("b listed");
        assert_eq!((b.live, b.drained, b.owns, b.assigned), (true, false, 0, 1));
        assert!(view.host("z").is_none(), "another service's host is not ours");
    }
}
