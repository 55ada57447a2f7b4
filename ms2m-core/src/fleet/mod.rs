//! Partitioned state: a service whose state is per input partition runs as
//! **tasks**, one per partition, spread over many hosts and moved between
//! them live.
//!
//! A task is an ordinary [`Node`](crate::node::Node) serving one partition:
//! its own state, position, snapshot series, owner record (epoch, lease),
//! standby and migrations, keyed on the control channel by its
//! [`task_id`] (`{service}/p{partition}`, set with
//! [`InstanceConfig::service_id`](crate::InstanceConfig::service_id)). Its
//! backends read only that partition (and, for the exactly-once sink, use
//! a transactional id of their own). The input topics must be
//! co-partitioned (as Kafka Streams requires): records that belong
//! together share a partition.
//!
//! A [`TaskHost`] is one process's part: it runs a node for each task
//! assigned to it (plus each it still owns), heartbeats, and reads the
//! fleet's records. The first live host by id leads: it computes where
//! each task belongs ([`assignment`]), publishes `Assign` records, and
//! moves tasks whose owner is alive with MS2M migrations, at most
//! [`FleetOptions::max_moves`] at a time. A task whose owner died is
//! assigned elsewhere and claimed there once its lease expired (failover
//! per task, the [`node`](crate::node) rules).
//!
//! ```text
//!  host joins ──▶ Heartbeat ──▶ leader: assign ──▶ Assign{task, host}
//!                                                    │
//!      host starts a standby node for the task ◀─────┘
//!                                                    │ Announce{Standby}
//!      leader: Coordinator::migrate(owner → host) ◀──┘ (owner alive)
//!      node claims after the lease expired       ◀──── (owner dead)
//!      old host stops its node once it stood by
//! ```
//!
//! With [`FleetOptions::standbys`] above 0, each task also keeps warm
//! standbys on the next hosts after its assigned one
//! ([`FleetState::standby_hosts`]).
//!
//! Operators: `Drain{host}` empties a host (it keeps serving each task
//! until that task moved; the id stays drained: restart under a new id);
//! `Rebalance` spreads tasks evenly now, for fleets with
//! [`FleetOptions::auto_rebalance`] off (on by default: joins, deaths and
//! drains rebalance at once).
//!
//! Whole-service state stays the default: a service that does not run
//! through a `TaskHost` keeps one state keyed by its name.

pub mod assignment;
mod host;
pub mod state;

use std::time::Duration;

pub use host::TaskHost;
pub use state::FleetState;

use crate::migration::{MigrationConfig, Strategy};

/// The id of the task serving `partition` of `service`: `{service}/p{partition}`
/// (zero-padded to two digits, so ids sort by partition up to 100).
pub fn task_id(service: &str, partition: i32) -> String {
    format!("{service}/p{partition:02}")
}

/// How a fleet host behaves.
#[derive(Clone, Debug)]
pub struct FleetOptions {
    /// How often a host says it is alive. Default: 500 ms.
    pub heartbeat: Duration,
    /// A host not heard from for this long is dead: its tasks are assigned
    /// to others. Also how long a starting host listens before it may lead
    /// (so it has heard every live host). Default: 3 s; keep it several
    /// heartbeats long. A dead host's tasks are claimed only once their
    /// leases expired (the nodes' lease timeout), whatever this is.
    pub host_timeout: Duration,
    /// The most migrations the leader runs at once. Default: 4.
    pub max_moves: usize,
    /// Warm standbys per task, on other hosts
    /// ([`FleetState::standby_hosts`]): each restores the task's snapshot
    /// and replays its partition behind the owner, so a failover or a move
    /// there starts warm. Each costs a node (a consumer of the partition)
    /// on its host. Default: 0 (a task's new host restores when assigned).
    pub standbys: usize,
    /// Rebalance on every join, death and drain (`false`: only tasks of
    /// dead or drained hosts move, and a `Rebalance` record spreads the
    /// rest). Default: `true`.
    pub auto_rebalance: bool,
    /// How the leader's migrations cut over. Default:
    /// [`MigrationConfig::default`].
    pub migration: MigrationConfig,
    /// The leader's migration procedure. Default:
    /// [`Strategy::Ms2mFromStandby`]: a task's node on its new host stands
    /// by (replays the task's partition behind the owner) before the task
    /// is moved to it, so the move writes and reads no snapshot; after a
    /// failed move of a task, the next one takes a checkpoint.
    /// [`Strategy::Ms2m`] takes a fresh checkpoint for every move instead.
    pub strategy: Strategy,
    /// How long a failed move waits before it is tried again. Default: 5 s.
    pub retry_after: Duration,
}

impl Default for FleetOptions {
    fn default() -> Self {
        Self {
            heartbeat: Duration::from_millis(500),
            host_timeout: Duration::from_secs(3),
            max_moves: 4,
            standbys: 0,
            auto_rebalance: true,
            migration: MigrationConfig::default(),
            strategy: Strategy::Ms2mFromStandby,
            retry_after: Duration::from_secs(5),
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn task_ids_sort_by_partition() {
        let mut ids: Vec<String> = [10, 2, 0].iter().map(|p| super::task_id("svc", *p)).collect();
        ids.sort();
        assert_eq!(ids, ["svc/p00", "svc/p02", "svc/p10"]);
    }
}
