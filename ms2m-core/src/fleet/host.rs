//! The host's driver: one loop that heartbeats, folds the fleet's records,
//! starts and stops task nodes to match the assignment, and, while this
//! host leads, publishes assignments and runs the moves (see the
//! [module docs](super)).

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tracing::{info, info_span, warn, Instrument};

use super::assignment::assign;
use super::{task_id, FleetOptions, FleetState};
use crate::control::{ControlBody, ControlChannel, ControlMessage, Role};
use crate::error::{Error, Result};
use crate::log::MessageLog;
use crate::migration::{Coordinator, MigrationPlan};
use crate::node::{BackendFactory, Node, NodeRole, NodeStatus};
use crate::service::StatefulService;
use crate::sink::OutputSink;
use crate::store::SnapshotStore;

/// How often the host reconciles its nodes and, leading, the assignment.
const TICK: Duration = Duration::from_millis(200);
/// The longest a stopping node may take before the host stops waiting.
const STOP_WAIT: Duration = Duration::from_secs(15);

/// One process's part in a partitioned fleet: the nodes of the tasks
/// assigned to it (see the [module docs](super)).
#[derive(Debug)]
pub struct TaskHost<C> {
    host: String,
    service: String,
    tasks: Vec<String>,
    partitions: Vec<i32>,
    control: Arc<C>,
    options: FleetOptions,
}

/// A node this host runs.
struct RunningTask {
    stop: oneshot::Sender<()>,
    status: watch::Receiver<NodeStatus>,
    done: tokio::task::JoinHandle<Result<()>>,
}

/// The leader's bookkeeping.
#[derive(Default)]
struct Leading {
    /// Assignments published and not read back yet.
    sent: BTreeMap<String, String>,
    /// Tasks being moved by this host.
    moving: BTreeSet<String>,
    /// When a failed move of a task may be tried again.
    retry_at: BTreeMap<String, Instant>,
    /// Rebalance requests acted on.
    rebalances: u64,
}

impl<C: ControlChannel> TaskHost<C> {
    /// Host `host` of `service`'s tasks over `partitions`, talking on
    /// `control`.
    pub fn new(
        host: impl Into<String>,
        service: impl Into<String>,
        partitions: impl IntoIterator<Item = i32>,
        control: Arc<C>,
        options: FleetOptions,
    ) -> Self {
        let service = service.into();
        let partitions: Vec<i32> = partitions.into_iter().collect();
        let tasks = partitions.iter().map(|p| task_id(&service, *p)).collect();
        Self {
            host: host.into(),
            service,
            tasks,
            partitions,
            control,
            options,
        }
    }

    /// The task ids, in order.
    pub fn tasks(&self) -> &[String] {
        &self.tasks
    }

    /// Runs until `shutdown` completes, then stops every node. `make_node`
    /// builds the node of a task (its id and partition); the node's
    /// instance id must be this host's and its service id the task's.
    pub async fn run<S, L, St, O, F, M>(self, mut make_node: M, shutdown: impl Future<Output = ()> + Send) -> Result<()>
    where
        S: StatefulService,
        L: MessageLog,
        St: SnapshotStore,
        O: OutputSink,
        F: BackendFactory<L, St, O>,
        M: FnMut(&str, i32) -> Result<Node<S, L, St, O, C, F>> + Send,
    {
        let span = info_span!("host", service = %self.service, host = %self.host);
        async move {
            let (mut records, mut fleet) = self.read_fleet().await?;
            let started = Instant::now();
            let mut running: BTreeMap<String, RunningTask> = BTreeMap::new();
            let mut stopping: JoinSet<String> = JoinSet::new();
            let mut stopping_ids: BTreeSet<String> = BTreeSet::new();
            let mut moves: JoinSet<(String, Result<()>)> = JoinSet::new();
            let mut leading = Leading::default();
            let mut heartbeat = tokio::time::interval(self.options.heartbeat);
            let mut tick = tokio::time::interval(TICK);
            tokio::pin!(shutdown);
            info!(tasks = self.tasks.len(), "host started");
            loop {
                tokio::select! {
                    () = &mut shutdown => break,
                    _ = heartbeat.tick() => self.heartbeat(),
                    m = records.recv() => match m {
                        Some(m) => fleet.observe(&m, Instant::now().into_std()),
                        None => return Err(Error::Config("the control channel's reader stopped".into())),
                    },
                    Some(done) = stopping.join_next(), if !stopping.is_empty() => {
                        if let Ok(task) = done { stopping_ids.remove(&task); }
                    }
                    Some(done) = moves.join_next(), if !moves.is_empty() => {
                        if let Ok((task, result)) = done { self.moved(&mut leading, task, result); }
                    }
                    _ = tick.tick() => {
                        self.reap(&mut running);
                        self.reconcile(&fleet, &mut running, &mut stopping, &mut stopping_ids, &mut make_node)?;
                        if started.elapsed() >= self.options.host_timeout {
                            self.lead(&fleet, &mut leading, &mut moves);
                        }
                    }
                }
            }
            moves.abort_all();
            self.stop_all(running, stopping).await;
            Ok(())
        }
        .instrument(span)
        .await
    }

    /// The fleet's records: subscribed first, then the history folded
    /// (a record in between is folded twice, which changes nothing).
    async fn read_fleet(&self) -> Result<(mpsc::Receiver<ControlMessage>, FleetState)> {
        let mut fleet = FleetState::new(self.service.clone(), self.tasks.clone());
        let ids: BTreeSet<String> = self.tasks.iter().cloned().chain([self.service.clone()]).collect();
        let records = crate::migration::forward_control_where(&*self.control, false, move |s| ids.contains(s)).await?;
        let history = self
            .control
            .history()
            .await
            .map_err(|e| Error::backend(crate::Component::Control, "read history", e))?;
        let now = Instant::now().into_std();
        for m in &history {
            fleet.observe(m, now);
        }
        Ok((records, fleet))
    }

    fn heartbeat(&self) {
        let body = ControlBody::Heartbeat {
            host: self.host.clone(),
        };
        self.publish(Role::Node, body);
    }

    /// Publishes in the background (the loop never waits on the channel).
    fn publish(&self, from: Role, body: ControlBody) {
        let m = crate::migration::message(&self.service, "", from, body);
        let control = Arc::clone(&self.control);
        tokio::spawn(
            async move {
                if let Err(e) = crate::migration::publish(&*control, &m).await {
                    warn!(error = %e, "could not publish a fleet record");
                }
            }
            .in_current_span(),
        );
    }

    /// Forgets nodes that ended on their own (an error, logged); the next
    /// reconcile starts them again if they are still wanted.
    fn reap(&self, running: &mut BTreeMap<String, RunningTask>) {
        let ended: Vec<String> = running
            .iter()
            .filter(|(_, r)| r.done.is_finished())
            .map(|(t, _)| t.clone())
            .collect();
        for task in ended {
            warn!(%task, "task node ended on its own; starting it again if still assigned");
            running.remove(&task);
        }
    }

    /// Starts a node for each task assigned here or owned here, and stops
    /// each node that stands by for a task assigned elsewhere.
    fn reconcile<S, L, St, O, F, M>(
        &self,
        fleet: &FleetState,
        running: &mut BTreeMap<String, RunningTask>,
        stopping: &mut JoinSet<String>,
        stopping_ids: &mut BTreeSet<String>,
        make_node: &mut M,
    ) -> Result<()>
    where
        S: StatefulService,
        L: MessageLog,
        St: SnapshotStore,
        O: OutputSink,
        F: BackendFactory<L, St, O>,
        M: FnMut(&str, i32) -> Result<Node<S, L, St, O, C, F>>,
    {
        for (task, partition) in self.tasks.iter().zip(&self.partitions) {
            let wanted = self.wants(fleet, task);
            match running.get(task) {
                None if wanted && !stopping_ids.contains(task) => {
                    let node = make_node(task, *partition)?;
                    running.insert(task.clone(), self.start(task, node)?);
                }
                Some(r) if !wanted && r.status.borrow().role == NodeRole::Standby => {
                    let r = running.remove(task).expect("present");
                    info!(%task, "task neither assigned nor kept as a standby here: stopping its node");
                    let _ = r.stop.send(());
                    stopping_ids.insert(task.clone());
                    let task = task.clone();
                    stopping.spawn(async move {
                        let _ = tokio::time::timeout(STOP_WAIT, r.done).await;
                        task
                    });
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// A task is wanted here while assigned here, owned here (an owner
    /// serves until a migration or a claim takes the task), or kept here
    /// as one of its standbys.
    fn wants(&self, fleet: &FleetState, task: &str) -> bool {
        let standby = || {
            let n = self.options.standbys;
            let (now, timeout) = (Instant::now().into_std(), self.options.host_timeout);
            n > 0 && fleet.standby_hosts(task, n, now, timeout).contains(&self.host)
        };
        fleet.assigned(task) == Some(self.host.as_str())
            || fleet.owner(task).is_some_and(|o| o.instance_id == self.host)
            || standby()
    }

    fn start<S, L, St, O, F>(&self, task: &str, node: Node<S, L, St, O, C, F>) -> Result<RunningTask>
    where
        S: StatefulService,
        L: MessageLog,
        St: SnapshotStore,
        O: OutputSink,
        F: BackendFactory<L, St, O>,
    {
        if node.service() != task || node.instance_id() != self.host {
            return Err(Error::Config(format!(
                "the node made for task {task} serves {} as {}; it must serve {task} as {}",
                node.service(),
                node.instance_id(),
                self.host
            )));
        }
        info!(%task, "starting the task's node");
        let (stop, stopped) = oneshot::channel();
        let status = node.status();
        let done = tokio::spawn(
            node.run(async move {
                let _ = stopped.await;
            })
            .in_current_span(),
        );
        Ok(RunningTask { stop, status, done })
    }

    /// Leading: publishes where each task belongs and starts the moves
    /// whose target node stands by, at most `max_moves` at once.
    fn lead(&self, fleet: &FleetState, leading: &mut Leading, moves: &mut JoinSet<(String, Result<()>)>) {
        let now = Instant::now();
        let (std_now, timeout) = (now.into_std(), self.options.host_timeout);
        if fleet.leader(std_now, timeout).as_deref() != Some(self.host.as_str()) {
            return;
        }
        let hosts = fleet.eligible_hosts(std_now, timeout);
        let requested = fleet.rebalance_requests() > leading.rebalances;
        leading.rebalances = fleet.rebalance_requests();
        let balance = self.options.auto_rebalance || requested;
        let desired = assign(&self.tasks, &hosts, &fleet.placement(std_now, timeout), balance);
        for (task, host) in &desired {
            leading.sent.retain(|t, h| fleet.assigned(t) != Some(h.as_str()));
            if fleet.assigned(task) != Some(host) && leading.sent.get(task) != Some(host) {
                info!(%task, %host, "assigning");
                leading.sent.insert(task.clone(), host.clone());
                let body = ControlBody::Assign {
                    task: task.clone(),
                    host: host.clone(),
                };
                self.publish(Role::Coordinator, body);
            }
        }
        for task in &self.tasks {
            if leading.moving.len() >= self.options.max_moves {
                break;
            }
            if let Some(plan) = self.move_due(fleet, leading, task, now) {
                leading.moving.insert(task.clone());
                let coordinator = Coordinator::new(Arc::clone(&self.control), self.options.migration.clone());
                let task = task.clone();
                moves.spawn(
                    async move {
                        info!(%task, source = %plan.source, target = %plan.target, "moving");
                        let result = coordinator.migrate(&plan, &*crate::no_progress()).await.map(|_| ());
                        (task, result)
                    }
                    .in_current_span(),
                );
            }
        }
    }

    /// The migration that moves `task` to its assigned host, if due: its
    /// owner lives elsewhere (a dead owner's task is claimed, not moved),
    /// the assigned host's node stands by, and no move of it runs here.
    fn move_due(&self, fleet: &FleetState, leading: &Leading, task: &str, now: Instant) -> Option<MigrationPlan> {
        let target = fleet.assigned(task)?;
        let owner = fleet.owner(task)?;
        let live = fleet.is_live(&owner.instance_id, now.into_std(), self.options.host_timeout);
        let ready = fleet.announced(task, target) == Some(NodeRole::Standby);
        let waiting = leading.retry_at.get(task).is_some_and(|at| now < *at);
        if owner.instance_id == target || !live || !ready || waiting || leading.moving.contains(task) {
            return None;
        }
        Some(MigrationPlan {
            service: task.to_string(),
            migration_id: format!(
                "{task}:{}->{target}:e{}:{}",
                owner.instance_id,
                owner.epoch,
                crate::snapshot::now_ms()
            ),
            source: owner.instance_id.clone(),
            target: target.to_string(),
            strategy: self.options.strategy,
        })
    }

    fn moved(&self, leading: &mut Leading, task: String, result: Result<()>) {
        leading.moving.remove(&task);
        match result {
            Ok(()) => info!(%task, "moved"),
            Err(e) => {
                warn!(%task, error = %e, "move failed; trying again later");
                leading.retry_at.insert(task, Instant::now() + self.options.retry_after);
            }
        }
    }

    /// Stops every node and waits (bounded) for each.
    async fn stop_all(&self, running: BTreeMap<String, RunningTask>, mut stopping: JoinSet<String>) {
        info!(nodes = running.len(), "host stopping its nodes");
        for (_, r) in running {
            let _ = r.stop.send(());
            stopping.spawn(async move {
                let _ = tokio::time::timeout(STOP_WAIT, r.done).await;
                String::new()
            });
        }
        while stopping.join_next().await.is_some() {}
    }
}
