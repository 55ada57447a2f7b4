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
use crate::migration::{Coordinator, MigrationPlan, Strategy};
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

/// The nodes this host runs, and those it is stopping.
#[derive(Default)]
struct Nodes {
    running: BTreeMap<String, RunningTask>,
    stopping: JoinSet<String>,
    stopping_ids: BTreeSet<String>,
    /// When a task whose node ended on its own may start again.
    restart_at: BTreeMap<String, Instant>,
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
    /// Assignments published and not read back yet, and when (one not
    /// read back within the host timeout is published again).
    sent: BTreeMap<String, (String, Instant)>,
    /// Tasks being moved by this host.
    moving: BTreeSet<String>,
    /// When a failed move of a task may be tried again.
    retry_at: BTreeMap<String, Instant>,
    /// Tasks whose last move failed: the next one takes a checkpoint
    /// ([`Strategy::Ms2m`]) rather than trust the target's standby state
    /// again (a digest mismatch, a standby that stood past the source).
    checkpoint_next: BTreeSet<String>,
    /// Rebalance requests seen (acted on if this host led then).
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
            let mut nodes = Nodes::default();
            let mut moves: JoinSet<(String, Result<()>)> = JoinSet::new();
            // Requests made before this host started are not for it to act on.
            let mut leading = Leading {
                rebalances: fleet.rebalance_requests(),
                ..Leading::default()
            };
            let mut heartbeat = tokio::time::interval(self.options.heartbeat);
            let mut tick = tokio::time::interval(TICK);
            tokio::pin!(shutdown);
            info!(tasks = self.tasks.len(), "host started");
            let result = loop {
                tokio::select! {
                    () = &mut shutdown => break Ok(()),
                    _ = heartbeat.tick() => self.heartbeat(),
                    m = records.recv() => match m {
                        Some(m) => fleet.observe(&m, Instant::now().into_std()),
                        None => break Err(Error::Config("the control channel's reader stopped".into())),
                    },
                    Some(done) = nodes.stopping.join_next(), if !nodes.stopping.is_empty() => {
                        if let Ok(task) = done { nodes.stopping_ids.remove(&task); }
                    }
                    Some(done) = moves.join_next(), if !moves.is_empty() => {
                        if let Ok((task, result)) = done { self.moved(&mut leading, task, result); }
                    }
                    _ = tick.tick() => {
                        self.reap(&mut nodes).await;
                        if let Err(e) = self.reconcile(&fleet, &mut nodes, &mut make_node) {
                            break Err(e);
                        }
                        if started.elapsed() >= self.options.host_timeout {
                            self.lead(&fleet, &mut leading, &mut moves);
                        }
                    }
                }
            };
            moves.abort_all();
            self.stop_all(nodes).await;
            result
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

    /// Collects nodes that ended on their own (logging why); each task's
    /// node starts again after `retry_after` if the task is still wanted.
    async fn reap(&self, nodes: &mut Nodes) {
        let ended: Vec<String> = nodes
            .running
            .iter()
            .filter(|(_, r)| r.done.is_finished())
            .map(|(t, _)| t.clone())
            .collect();
        for task in ended {
            let r = nodes.running.remove(&task).expect("listed");
            let retry_in = self.options.retry_after;
            match r.done.await {
                Ok(Ok(())) => warn!(%task, ?retry_in, "task node stopped on its own"),
                Ok(Err(e)) => warn!(%task, error = %e, ?retry_in, "task node failed"),
                Err(e) => warn!(%task, error = %e, ?retry_in, "task node panicked"),
            }
            nodes.restart_at.insert(task, Instant::now() + retry_in);
        }
    }

    /// Starts a node for each task wanted here (assigned, owned, or kept
    /// as a standby), and stops each node that stands by for a task not.
    fn reconcile<S, L, St, O, F, M>(&self, fleet: &FleetState, nodes: &mut Nodes, make_node: &mut M) -> Result<()>
    where
        S: StatefulService,
        L: MessageLog,
        St: SnapshotStore,
        O: OutputSink,
        F: BackendFactory<L, St, O>,
        M: FnMut(&str, i32) -> Result<Node<S, L, St, O, C, F>>,
    {
        let now = Instant::now();
        for (task, partition) in self.tasks.iter().zip(&self.partitions) {
            let wanted = self.wants(fleet, task);
            match nodes.running.get(task) {
                None if wanted && !nodes.stopping_ids.contains(task) => {
                    if nodes.restart_at.get(task).is_some_and(|at| now < *at) {
                        continue;
                    }
                    let node = make_node(task, *partition)?;
                    nodes.running.insert(task.clone(), self.start(task, node)?);
                }
                Some(r) if !wanted && r.status.borrow().role == NodeRole::Standby => {
                    let r = nodes.running.remove(task).expect("present");
                    info!(%task, "task neither assigned nor kept as a standby here: stopping its node");
                    nodes.stop(task.clone(), r);
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
        let requested = fleet.rebalance_requests() > leading.rebalances;
        leading.rebalances = fleet.rebalance_requests();
        if fleet.leader(std_now, timeout).as_deref() != Some(self.host.as_str()) {
            return;
        }
        let hosts = fleet.eligible_hosts(std_now, timeout);
        let balance = self.options.auto_rebalance || requested;
        let desired = assign(&self.tasks, &hosts, &fleet.placement(std_now, timeout), balance);
        leading
            .sent
            .retain(|t, (h, at)| fleet.assigned(t) != Some(h.as_str()) && now < *at + timeout);
        for (task, host) in &desired {
            if fleet.assigned(task) != Some(host) && leading.sent.get(task).map(|(h, _)| h) != Some(host) {
                info!(%task, %host, "assigning");
                leading.sent.insert(task.clone(), (host.clone(), now));
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
            strategy: self.strategy_for(leading, task),
        })
    }

    /// The fleet's strategy, except after a failed move of the task from a
    /// standby: then one with a fresh checkpoint.
    fn strategy_for(&self, leading: &Leading, task: &str) -> Strategy {
        match self.options.strategy {
            Strategy::Ms2mFromStandby if leading.checkpoint_next.contains(task) => Strategy::Ms2m,
            strategy => strategy,
        }
    }

    fn moved(&self, leading: &mut Leading, task: String, result: Result<()>) {
        leading.moving.remove(&task);
        match result {
            Ok(()) => {
                info!(%task, "moved");
                leading.checkpoint_next.remove(&task);
            }
            Err(e) => {
                warn!(%task, error = %e, "move failed; trying again later, with a checkpoint");
                leading.checkpoint_next.insert(task.clone());
                leading.retry_at.insert(task, Instant::now() + self.options.retry_after);
            }
        }
    }

    /// Stops every node and waits for each (each aborted after [`STOP_WAIT`]).
    async fn stop_all(&self, mut nodes: Nodes) {
        info!(nodes = nodes.running.len(), "host stopping its nodes");
        for (task, r) in std::mem::take(&mut nodes.running) {
            nodes.stop(task, r);
        }
        while nodes.stopping.join_next().await.is_some() {}
    }
}

impl Nodes {
    /// Asks `task`'s node to stop; aborts it if it has not within [`STOP_WAIT`]
    /// (a node of the task is never started while one still runs).
    fn stop(&mut self, task: String, r: RunningTask) {
        let _ = r.stop.send(());
        self.stopping_ids.insert(task.clone());
        let mut done = r.done;
        self.stopping.spawn(
            async move {
                if tokio::time::timeout(STOP_WAIT, &mut done).await.is_err() {
                    warn!(%task, "task node did not stop in time: aborting it");
                    done.abort();
                    let _ = done.await;
                }
                task
            }
            .in_current_span(),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::MemoryControl;

    /// A failed move of a task from its target's standby state (a digest
    /// mismatch, say) is followed by one with a checkpoint; a move that
    /// succeeds restores the fleet's strategy for that task.
    #[tokio::test]
    async fn after_a_failed_move_from_the_standby_the_next_takes_a_checkpoint() {
        let host = TaskHost::new(
            "a",
            "svc",
            0..2,
            Arc::new(MemoryControl::new()),
            FleetOptions::default(),
        );
        let (task, other) = (task_id("svc", 0), task_id("svc", 1));
        let mut leading = Leading::default();
        assert_eq!(host.strategy_for(&leading, &task), Strategy::Ms2mFromStandby);
        let failed = Err(Error::Migration(crate::migration::MigrationError::Aborted {
            reason: "digests differ".into(),
        }));
        host.moved(&mut leading, task.clone(), failed);
        assert_eq!(host.strategy_for(&leading, &task), Strategy::Ms2m);
        assert_eq!(host.strategy_for(&leading, &other), Strategy::Ms2mFromStandby);
        host.moved(&mut leading, task.clone(), Ok(()));
        assert_eq!(host.strategy_for(&leading, &task), Strategy::Ms2mFromStandby);
    }
}
