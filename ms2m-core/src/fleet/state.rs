//! What a host knows of its fleet: the fold of the control records of the
//! service (heartbeats, assignments, drains, rebalance requests) and of
//! each of its tasks (owners, migrations, announced roles). Pure: the time
//! a record was read is passed in, so the rules are unit-tested without a
//! clock.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use crate::control::{ControlBody, ControlMessage, Role};
use crate::migration::protocol::Decisions;
use crate::migration::Owner;
use crate::node::NodeRole;

/// The fleet of one partitioned service, as one host has read it.
#[derive(Debug)]
pub struct FleetState {
    service: String,
    tasks: Vec<String>,
    heard: BTreeMap<String, Instant>,
    drained: BTreeSet<String>,
    assigned: BTreeMap<String, String>,
    decisions: BTreeMap<String, Decisions>,
    announced: BTreeMap<(String, String), NodeRole>,
    rebalances: u64,
}

impl FleetState {
    /// Nothing read yet of `service`'s fleet of `tasks` (task ids).
    pub fn new(service: impl Into<String>, tasks: Vec<String>) -> Self {
        let decisions = tasks.iter().map(|t| (t.clone(), Decisions::default())).collect();
        Self {
            service: service.into(),
            tasks,
            heard: BTreeMap::new(),
            drained: BTreeSet::new(),
            assigned: BTreeMap::new(),
            decisions,
            announced: BTreeMap::new(),
            rebalances: 0,
        }
    }

    /// Folds one record, read at `now`. Folding a record twice changes
    /// nothing but the time a heartbeat was heard.
    pub fn observe(&mut self, m: &ControlMessage, now: Instant) {
        if let Some(decisions) = self.decisions.get_mut(&m.service) {
            decisions.observe(m);
            if let ControlBody::Announce { node, role } = &m.body {
                self.announced.insert((m.service.clone(), node.clone()), *role);
            }
            return;
        }
        if m.service != self.service {
            return;
        }
        match (&m.body, m.from) {
            (ControlBody::Heartbeat { host }, _) => {
                self.heard.insert(host.clone(), now);
            }
            (ControlBody::Assign { task, host }, _) => {
                self.assigned.insert(task.clone(), host.clone());
            }
            (ControlBody::Drain { host, .. }, Role::Operator) => {
                self.drained.insert(host.clone());
            }
            (ControlBody::Rebalance { .. }, Role::Operator) => self.rebalances += 1,
            _ => {}
        }
    }

    /// The service's name.
    pub fn service(&self) -> &str {
        &self.service
    }

    /// The task ids, in order.
    pub fn tasks(&self) -> &[String] {
        &self.tasks
    }

    /// Whether `host` was heard within `timeout` of `now`.
    pub fn is_live(&self, host: &str, now: Instant, timeout: Duration) -> bool {
        self.heard
            .get(host)
            .is_some_and(|t| now.saturating_duration_since(*t) <= timeout)
    }

    /// Whether an operator drained `host`.
    pub fn is_drained(&self, host: &str) -> bool {
        self.drained.contains(host)
    }

    /// The live hosts that may hold tasks (not drained), sorted.
    pub fn eligible_hosts(&self, now: Instant, timeout: Duration) -> Vec<String> {
        self.heard
            .keys()
            .filter(|h| self.is_live(h, now, timeout) && !self.is_drained(h))
            .cloned()
            .collect()
    }

    /// The host that computes assignments and starts moves: the first
    /// eligible host by id. Hosts whose views differ may both lead for a
    /// moment; the migration protocol keeps that safe (a second migration
    /// of a task supersedes or is refused) and the assignment is a function
    /// of the records, so they agree once both read them.
    pub fn leader(&self, now: Instant, timeout: Duration) -> Option<String> {
        self.eligible_hosts(now, timeout).into_iter().next()
    }

    /// The owner the channel names for `task`.
    pub fn owner(&self, task: &str) -> Option<&Owner> {
        self.decisions.get(task).and_then(Decisions::owner)
    }

    /// The host the latest `Assign` names for `task`.
    pub fn assigned(&self, task: &str) -> Option<&str> {
        self.assigned.get(task).map(String::as_str)
    }

    /// The role `host`'s node for `task` last announced.
    pub fn announced(&self, task: &str, host: &str) -> Option<NodeRole> {
        self.announced.get(&(task.to_string(), host.to_string())).copied()
    }

    /// Rebalance requests read so far.
    pub fn rebalance_requests(&self) -> u64 {
        self.rebalances
    }

    /// Where each task is now, for the assignment: its assigned host when
    /// eligible (a move already decided stays decided), else its owner when
    /// eligible (a fleet's first assignment keeps the owners it finds);
    /// tasks with neither are left out (they must move).
    pub fn placement(&self, now: Instant, timeout: Duration) -> BTreeMap<String, String> {
        let eligible = |h: &str| self.is_live(h, now, timeout) && !self.is_drained(h);
        self.tasks
            .iter()
            .filter_map(|task| {
                let owner = self.owner(task).map(|o| o.instance_id.as_str());
                let host = self
                    .assigned(task)
                    .filter(|h| eligible(h))
                    .or(owner.filter(|h| eligible(h)))?;
                Some((task.clone(), host.to_string()))
            })
            .collect()
    }

    /// The `n` hosts that keep a warm standby of `task`: the eligible hosts
    /// after its assigned host in id order, wrapping around, never the
    /// assigned host itself (none while it has no assignment). A function
    /// of the records and liveness, so every host computes the same.
    pub fn standby_hosts(&self, task: &str, n: usize, now: Instant, timeout: Duration) -> Vec<String> {
        let Some(assigned) = self.assigned(task) else {
            return Vec::new();
        };
        let hosts = self.eligible_hosts(now, timeout);
        let after = hosts.iter().position(|h| h.as_str() > assigned).unwrap_or(0);
        hosts
            .iter()
            .cycle()
            .skip(after)
            .take(hosts.len())
            .filter(|h| h.as_str() != assigned)
            .take(n)
            .cloned()
            .collect()
    }

    /// The tasks `host` owns now.
    pub fn owned_by(&self, host: &str) -> Vec<&str> {
        self.tasks
            .iter()
            .filter(|t| self.owner(t).is_some_and(|o| o.instance_id == host))
            .map(String::as_str)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(service: &str, from: Role, body: ControlBody) -> ControlMessage {
        crate::migration::message(service, "", from, body)
    }

    fn heartbeat(host: &str) -> ControlMessage {
        record("svc", Role::Node, ControlBody::Heartbeat { host: host.into() })
    }

    #[test]
    fn hosts_go_silent_after_the_timeout_and_drained_hosts_never_lead() {
        let t0 = Instant::now();
        let timeout = Duration::from_secs(3);
        let mut fleet = FleetState::new("svc", vec!["svc/p0".into()]);
        fleet.observe(&heartbeat("a"), t0);
        fleet.observe(&heartbeat("b"), t0 + Duration::from_secs(2));
        assert_eq!(fleet.leader(t0 + Duration::from_secs(1), timeout).as_deref(), Some("a"));
        assert_eq!(fleet.leader(t0 + Duration::from_secs(4), timeout).as_deref(), Some("b"));
        let drain = ControlBody::Drain {
            host: "a".into(),
            operator: "ops".into(),
        };
        fleet.observe(&record("svc", Role::Operator, drain), t0);
        assert_eq!(
            fleet.eligible_hosts(t0 + Duration::from_secs(2), timeout),
            vec!["b".to_string()]
        );
    }

    #[test]
    fn a_drain_counts_only_from_an_operator() {
        let mut fleet = FleetState::new("svc", vec![]);
        let drain = ControlBody::Drain {
            host: "a".into(),
            operator: "x".into(),
        };
        fleet.observe(&record("svc", Role::Node, drain), Instant::now());
        assert!(!fleet.is_drained("a"));
    }

    #[test]
    fn placement_prefers_a_live_owner_and_falls_back_to_the_assignment() {
        let now = Instant::now();
        let timeout = Duration::from_secs(3);
        let tasks = vec!["svc/p0".to_string(), "svc/p1".to_string(), "svc/p2".to_string()];
        let mut fleet = FleetState::new("svc", tasks);
        for h in ["a", "b"] {
            fleet.observe(&heartbeat(h), now);
        }
        let claim = |owner: &str| ControlBody::Claim {
            owner: owner.into(),
            epoch: 1,
            expired: None,
        };
        fleet.observe(&record("svc/p0", Role::Node, claim("a")), now);
        fleet.observe(&record("svc/p1", Role::Node, claim("dead")), now);
        let assign = |task: &str, host: &str| ControlBody::Assign {
            task: task.into(),
            host: host.into(),
        };
        let unassigned = fleet.placement(now, timeout);
        assert_eq!(
            unassigned.get("svc/p0").map(String::as_str),
            Some("a"),
            "its live owner"
        );
        assert_eq!(unassigned.get("svc/p1"), None, "owner dead, never assigned: must move");
        for (task, host) in [("svc/p0", "b"), ("svc/p1", "b"), ("svc/p2", "gone")] {
            fleet.observe(&record("svc", Role::Coordinator, assign(task, host)), now);
        }
        let placement = fleet.placement(now, timeout);
        assert_eq!(placement.get("svc/p0").map(String::as_str), Some("b"), "a decided move");
        assert_eq!(
            placement.get("svc/p1").map(String::as_str),
            Some("b"),
            "owner dead: assigned"
        );
        assert_eq!(placement.get("svc/p2"), None, "nowhere live: must move");
        assert_eq!(fleet.owned_by("a"), vec!["svc/p0"]);
    }

    #[test]
    fn standbys_sit_on_the_next_eligible_hosts_after_the_assigned_one() {
        let now = Instant::now();
        let timeout = Duration::from_secs(3);
        let mut fleet = FleetState::new("svc", vec!["svc/p0".into(), "svc/p1".into()]);
        for h in ["a", "b", "c"] {
            fleet.observe(&heartbeat(h), now);
        }
        assert!(fleet.standby_hosts("svc/p0", 1, now, timeout).is_empty(), "unassigned");
        let assign = |task: &str, host: &str| ControlBody::Assign {
            task: task.into(),
            host: host.into(),
        };
        fleet.observe(&record("svc", Role::Coordinator, assign("svc/p0", "b")), now);
        fleet.observe(&record("svc", Role::Coordinator, assign("svc/p1", "c")), now);
        assert_eq!(fleet.standby_hosts("svc/p0", 1, now, timeout), ["c"]);
        assert_eq!(
            fleet.standby_hosts("svc/p0", 5, now, timeout),
            ["c", "a"],
            "at most the others"
        );
        assert_eq!(fleet.standby_hosts("svc/p1", 1, now, timeout), ["a"], "wraps around");
        let drain = ControlBody::Drain {
            host: "a".into(),
            operator: "ops".into(),
        };
        fleet.observe(&record("svc", Role::Operator, drain), now);
        assert_eq!(
            fleet.standby_hosts("svc/p1", 1, now, timeout),
            ["b"],
            "never on a drained host"
        );
    }
}
