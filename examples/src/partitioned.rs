//! The ledger with partitioned state: one task per input partition, each
//! with its own state, snapshots, lease and migrations, spread over any
//! number of host processes ([`ms2m_core::fleet::TaskHost`]). This is what
//! `cargo run --example ledger_host -- --instance ID --brokers HOST:PORT` runs.
//!
//! The ledger suits it as is: its input is keyed by account, every output
//! depends only on that account's records, so a partition's accounts are
//! a state of their own.
//!
//! The host prints one JSON line on stdout each time the set of its tasks
//! or their roles changes (and every 2 s):
//!
//! ```text
//! {"host":"a","tasks":{"ledger/p00":"Owner","ledger/p01":"Standby"}}
//! ```

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use ms2m_core::fleet::{FleetOptions, TaskHost};
use ms2m_core::node::{Node, NodeRole, NodeStatus};
use ms2m_core::Delivery;

use crate::fleet::{backend_factory, instance_config, terminated, Deployment, NodeArgs};
use crate::ledger::Ledger;
use crate::support::BoxError;

/// Partitions (tasks) of the partitioned deployment unless told otherwise.
pub const TASKS: i32 = 16;

/// A host's settings (the `ledger_host` example's flags).
#[derive(Clone, Debug, clap::Args)]
pub struct HostArgs {
    /// The settings every task node uses; `--instance` is the host's id
    /// (one process per id), the instance id of each of its task nodes.
    #[command(flatten)]
    pub node: NodeArgs,
    /// Partitions of the input topic: one task each.
    #[arg(long, default_value_t = TASKS)]
    pub partitions: i32,
    /// How often the host says it is alive, in ms.
    #[arg(long, default_value_t = 500)]
    pub heartbeat_ms: u64,
    /// How long a silent host counts as alive, in ms.
    #[arg(long, default_value_t = 3_000)]
    pub host_timeout_ms: u64,
    /// The most tasks moved at once.
    #[arg(long, default_value_t = 4)]
    pub max_moves: usize,
    /// Warm standbys per task, on other hosts.
    #[arg(long, default_value_t = 0)]
    pub standbys: usize,
    /// Move tasks to joining hosts only on `ms2m rebalance`.
    #[arg(long)]
    pub manual_rebalance: bool,
}

impl HostArgs {
    fn fleet_options(&self) -> FleetOptions {
        FleetOptions {
            heartbeat: Duration::from_millis(self.heartbeat_ms),
            host_timeout: Duration::from_millis(self.host_timeout_ms),
            max_moves: self.max_moves,
            standbys: self.standbys,
            auto_rebalance: !self.manual_rebalance,
            ..FleetOptions::default()
        }
    }
}

/// The roles of a host's task nodes, as printed.
type Roles = Arc<Mutex<BTreeMap<String, tokio::sync::watch::Receiver<NodeStatus>>>>;

/// Runs a ledger host until SIGTERM or SIGINT.
pub async fn run_host(args: HostArgs) -> Result<(), BoxError> {
    let deployment = Deployment::new(&args.node.prefix).with_partitions(args.partitions);
    let cluster = deployment.cluster(&args.node.brokers).await?;
    let control = Arc::new(cluster.control().await?);
    let delivery = if args.node.exactly_once {
        Delivery::ExactlyOnce
    } else {
        Delivery::AtLeastOnce
    };
    let service = cluster.config().service_name().to_string();
    let me = args.node.instance.clone();
    let host = TaskHost::new(
        &me,
        service,
        0..args.partitions,
        Arc::clone(&control),
        args.fleet_options(),
    );
    let roles: Roles = Arc::default();
    let printer = tokio::spawn(print_roles(me.clone(), Arc::clone(&roles)));
    let options = args.node.options();
    let make_node = |task: &str, partition: i32| {
        let factory = backend_factory(cluster.for_task(partition), delivery);
        let config = instance_config(&me, &deployment).service_id(task);
        let node = Node::<Ledger, _, _, _, _, _>::new(factory, Arc::clone(&control), config, options.clone())?;
        roles
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(task.to_string(), node.status());
        Ok(node)
    };
    let result = host.run(make_node, terminated()).await;
    printer.abort();
    Ok(result?)
}

/// Prints the host's tasks and their roles on each change, and every 2 s.
async fn print_roles(host: String, roles: Roles) {
    let mut last = String::new();
    let mut since = 0;
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let tasks: BTreeMap<String, NodeRole> = roles
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .map(|(task, status)| (task.clone(), status.borrow().role))
            .filter(|(_, role)| *role != NodeRole::Stopped)
            .collect();
        let line = serde_json::json!({ "host": host, "tasks": tasks }).to_string();
        since += 1;
        if line != last || since >= 20 {
            println!("{line}");
            (last, since) = (line, 0);
        }
    }
}
