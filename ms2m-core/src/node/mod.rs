//! A node: one process per instance id, going through every role until it
//! is shut down, so that a deployment is one call ([`Node::run`]) instead
//! of a hand-written loop around the migration drivers.
//!
//! ```text
//!            claim won                    Prepare names this node
//!  start ──────────────▶ Owner ◀──────── Target ◀──────────────── Standby ◀── start (another node owns)
//!    │                    │  ▲   Takeover      ▲                    │  ▲
//!    │                    │  └─────────────────┼────── claim won ───┘  │
//!    │                    └── released (migration, or a claim by    ───┘
//!    └── nobody owns: Claim{expired: None}       another node after its lease)
//! ```
//!
//! * **Owner**: recovers (snapshot + log, claims the sink, replays to the
//!   output watermark), serves and answers migrations as a
//!   [`SourceAgent`], renewing its lease; it applies input only while the
//!   lease is valid (see [`protocol::owner`](crate::migration::protocol::owner)).
//! * **Standby**: restores the newest snapshot and replays the input
//!   continuously behind the owner with outputs suppressed, never past the
//!   owner's committed position (the output watermark), so that on a
//!   takeover every output the owner did not commit is emitted again. It
//!   watches the owner's lease; once expired it claims the service; the
//!   first claim on the channel wins. The winner claims the sink (fencing
//!   the old owner's producer where the broker can), replays to the
//!   watermark and serves.
//! * **Target**: a standby named by a migration runs the target protocol
//!   ([`run_target`](crate::migration::run_target)); if the source's lease
//!   expires meanwhile, it gives the migration up and claims the service.
//!
//! A node that loses ownership (a migration released it, or a claim fenced
//! it after a pause or a partition) becomes a standby and never emits again
//! under its old epoch.

mod standby;
mod view;

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use tracing::{info, info_span, warn, Instrument};

use crate::control::{ControlBody, ControlChannel, Role as Sender};
use crate::error::{Error, Result};
use crate::health::Health;
use crate::log::MessageLog;
use crate::migration::protocol::owner::LeaseConfig;
use crate::migration::protocol::Decisions;
use crate::migration::TargetOptions;
use crate::migration::{SourceAgent, SourceExit, SourceOptions};
use crate::position::Position;
use crate::runtime::{Backends, Instance, InstanceConfig, InstanceStats};
use crate::service::StatefulService;
use crate::sink::OutputSink;
use crate::store::SnapshotStore;

use view::ChannelView;

/// How long a new owner waits for its view of the channel to name it
/// before its agent reads the channel itself instead.
const VIEW_CATCH_UP: Duration = Duration::from_secs(2);

/// Makes a fresh set of backends (a node needs new ones after it gives up
/// a role half-way, e.g. a target whose migration was abandoned).
#[async_trait]
pub trait BackendFactory<L, St, O>: Send + Sync + 'static {
    /// New backends.
    async fn backends(&self) -> Result<Backends<L, St, O>>;
}

#[async_trait]
impl<L, St, O, F, Fut> BackendFactory<L, St, O> for F
where
    L: Send + 'static,
    St: Send + Sync + 'static,
    O: Send + 'static,
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Backends<L, St, O>>> + Send,
{
    async fn backends(&self) -> Result<Backends<L, St, O>> {
        self().await
    }
}

/// How a node behaves.
#[derive(Clone, Debug, Default)]
pub struct NodeOptions {
    /// The owner's lease (renewal interval, expiry, drift bound).
    pub lease: LeaseConfig,
    /// The owner's migration agent.
    pub source: SourceOptions,
    /// The migration target.
    pub target: TargetOptions,
    /// How often a standby reads the owner's committed position, its
    /// replay ceiling. Default (`None`): 50 ms.
    pub standby_refresh: Option<Duration>,
}

impl NodeOptions {
    fn standby_refresh(&self) -> Duration {
        self.standby_refresh.unwrap_or(Duration::from_millis(50))
    }
}

/// The role a node plays now.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum NodeRole {
    /// Reading the channel, deciding what to be.
    Starting,
    /// Serving as the owner.
    Owner,
    /// Replaying behind the owner, outputs suppressed.
    Standby,
    /// The target of a migration.
    Target,
    /// Shut down.
    Stopped,
}

/// What a running node reports ([`Node::status`]).
#[derive(Clone, Debug, serde::Serialize)]
pub struct NodeStatus {
    /// The node's instance id.
    pub instance_id: String,
    /// Its role.
    pub role: NodeRole,
    /// The owner the channel names, and its epoch.
    pub owner: Option<(String, u64)>,
    /// The position applied.
    pub position: Position,
    /// Records the node is behind: a standby, behind the owner's committed
    /// position; an owner, `None` (its input lag is the log's).
    pub lag: Option<u64>,
    /// The instance's counters.
    pub stats: InstanceStats,
}

/// One process's part in a fleet serving `S` (see the [module docs](self)).
pub struct Node<S, L, St, O, C, F> {
    factory: F,
    control: Arc<C>,
    config: InstanceConfig,
    options: NodeOptions,
    status: tokio::sync::watch::Sender<NodeStatus>,
    health: Health,
    _types: std::marker::PhantomData<Types<S, L, St, O>>,
}

/// The node's type parameters, held without owning values of them.
type Types<S, L, St, O> = fn() -> (S, L, St, O);

impl<S, L, St, O, C, F> std::fmt::Debug for Node<S, L, St, O, C, F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node")
            .field("instance_id", &self.config.instance_id())
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

/// What a node does next.
enum Next<I> {
    Owner(I, Option<Instant>),
    Standby(Option<I>),
    Target(Option<I>),
    Stop,
}

impl<I> Next<I> {
    fn role(&self) -> NodeRole {
        match self {
            Next::Owner(..) => NodeRole::Owner,
            Next::Standby(_) => NodeRole::Standby,
            Next::Target(_) => NodeRole::Target,
            Next::Stop => NodeRole::Stopped,
        }
    }
}

impl<S, L, St, O, C, F> Node<S, L, St, O, C, F>
where
    S: StatefulService,
    L: MessageLog,
    St: SnapshotStore,
    O: OutputSink,
    C: ControlChannel,
    F: BackendFactory<L, St, O>,
{
    /// A node of instance `config.instance_id()`, making backends with
    /// `factory`, talking on `control`.
    pub fn new(factory: F, control: Arc<C>, config: InstanceConfig, options: NodeOptions) -> Result<Self> {
        options
            .lease
            .validate()
            .map_err(|reason| Error::Config(format!("lease settings: {reason}")))?;
        let status = NodeStatus {
            instance_id: config.instance_id().to_string(),
            role: NodeRole::Starting,
            owner: None,
            position: Position::new(),
            lag: None,
            stats: InstanceStats::default(),
        };
        Ok(Self {
            factory,
            control,
            config,
            options,
            status: tokio::sync::watch::channel(status).0,
            health: Health::new(),
            _types: std::marker::PhantomData,
        })
    }

    /// The node's instance id.
    pub fn instance_id(&self) -> &str {
        self.config.instance_id()
    }

    /// The id this node serves under: the service's name, or the task's
    /// id ([`InstanceConfig::service_id`]).
    pub fn service(&self) -> &str {
        self.config.service_id_of::<S>()
    }

    /// The node's status, updated while it runs.
    pub fn status(&self) -> tokio::sync::watch::Receiver<NodeStatus> {
        self.status.subscribe()
    }

    /// The node's liveness and readiness, shared by every instance it
    /// runs: ready as the owner once caught up (the automatic rule), as a
    /// standby while within [`DEFAULT_READY_LAG`](crate::health::DEFAULT_READY_LAG)
    /// of the owner's committed position; not ready while starting or
    /// serving as a migration's target.
    pub fn health(&self) -> Health {
        self.health.clone()
    }

    /// Runs the node through its roles until `shutdown` completes.
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send) -> Result<()> {
        let span = info_span!("node", service = self.service(), instance = %self.config.instance_id());
        async move {
            let (tx, rx) = tokio::sync::watch::channel(false);
            let work = self.roles(Stop(rx));
            let requested = async move {
                shutdown.await;
                let _ = tx.send(true);
                // Keep the sender: a dropped one would read as "never".
                std::future::pending::<()>().await
            };
            tokio::pin!(work, requested);
            let result = tokio::select! {
                result = &mut work => result,
                () = &mut requested => unreachable!("pending never completes"),
            };
            if result.is_err() {
                // A node that fails must not go on reporting its last role
                // (an `Owner` that no longer serves).
                self.report(NodeRole::Stopped, None, |_| {});
            }
            result
        }
        .instrument(span)
        .await
    }

    async fn roles(&self, stop: Stop) -> Result<()> {
        let view = ChannelView::start(
            &*self.control,
            self.service(),
            self.config.instance_id(),
            self.options.lease,
        )
        .await?;
        let (announcer, announced) = self.announcer();
        let mut next = self.first_role(&view).await?;
        loop {
            let _ = announcer.send(next.role());
            next = match next {
                Next::Owner(instance, granted_at) => self.own(instance, granted_at, &view, stop.clone()).await?,
                Next::Standby(instance) => self.stand_by(instance, &view, stop.clone()).await?,
                Next::Target(instance) => self.migrate_here(instance, &view, stop.clone()).await?,
                Next::Stop => break,
            };
        }
        let _ = announcer.send(NodeRole::Stopped);
        drop(announcer);
        // The last announcement before the process may exit, within bounds.
        let _ = tokio::time::timeout(Duration::from_secs(2), announced).await;
        self.report(NodeRole::Stopped, None, |_| {});
        Ok(())
    }

    /// A task that tells operators each new role of this node
    /// (`ControlBody::Announce`), in order and off the role's path (a new
    /// owner does not wait for it). A failure is logged, never fatal: the
    /// announcement is informational. The task ends when the sender is
    /// dropped and its queue is published.
    fn announcer(
        &self,
    ) -> (
        tokio::sync::mpsc::UnboundedSender<NodeRole>,
        tokio::task::JoinHandle<()>,
    ) {
        let (tx, mut roles) = tokio::sync::mpsc::unbounded_channel();
        let control = Arc::clone(&self.control);
        let node = self.config.instance_id().to_string();
        let service = self.service().to_string();
        let task = tokio::spawn(
            async move {
                while let Some(role) = roles.recv().await {
                    let body = ControlBody::Announce {
                        node: node.clone(),
                        role,
                    };
                    let m = crate::migration::message(&service, "", Sender::Node, body);
                    if let Err(e) = crate::migration::publish(&*control, &m).await {
                        warn!(error = %e, ?role, "could not announce the node's role");
                    }
                }
            }
            .in_current_span(),
        );
        (tx, task)
    }

    /// Owner if the channel names this node, or nobody and its first claim
    /// wins; otherwise a standby.
    async fn first_role(&self, view: &ChannelView) -> Result<Next<Instance<S, L, St, O>>> {
        let me = self.config.instance_id();
        self.health.set_ready(false);
        if view.owner_is(me) && self.channel_names_me().await? {
            info!("the channel names this node the owner: recovering");
            return Ok(Next::Owner(self.recover(view).await?, None));
        }
        if let Some((claim, sent_at)) = view.claim_due() {
            if self.claim(view, claim).await? {
                info!("first claim won: recovering as the owner");
                return Ok(Next::Owner(self.recover(view).await?, Some(sent_at)));
            }
        }
        Ok(Next::Standby(None))
    }

    /// Whether the whole channel, read now, names this node the owner: the
    /// check before recovering (which claims the sink, fencing whoever
    /// holds it), since the view may lag behind a release another reader
    /// of this node already saw.
    async fn channel_names_me(&self) -> Result<bool> {
        let owner = crate::migration::current_owner(&*self.control, self.service()).await?;
        Ok(owner.is_some_and(|o| o.instance_id == self.config.instance_id()))
    }

    /// Publishes `claim` and waits until the view folded it: whether it won.
    /// Only a win dates the lease from `claim`'s sending; when the channel
    /// names this node by an earlier record (a claim a crashed process of
    /// this instance id left in flight), the standby loop finds that and
    /// serves once a renewal is read back.
    async fn claim(&self, view: &ChannelView, claim: ControlBody) -> Result<bool> {
        let m = crate::migration::message(self.service(), "", Sender::Node, claim);
        crate::migration::publish(&*self.control, &m).await?;
        let won = view.wait_for(&m).await?;
        Ok(won && view.owner_is(self.config.instance_id()))
    }

    /// Recovers as the owner, renewing the lease meanwhile: a recovery
    /// longer than the lease timeout must not hand the service to a
    /// standby. (The renewals only keep standbys waiting; the instance
    /// emits nothing before its agent's own lease holds.)
    async fn recover(&self, view: &ChannelView) -> Result<Instance<S, L, St, O>> {
        let backends = self.factory.backends().await?;
        let quiet = crate::no_progress();
        let recovery = Instance::recover(backends, self.instance_config(view), &*quiet);
        tokio::select! {
            instance = recovery => {
                let mut instance = instance?;
                instance.use_health(self.health.clone());
                Ok(instance)
            }
            never = self.renew_while_recovering(view) => match never {},
        }
    }

    async fn renew_while_recovering(&self, view: &ChannelView) -> std::convert::Infallible {
        let me = self.config.instance_id();
        loop {
            tokio::time::sleep(self.options.lease.interval).await;
            let Some(owner) = view.decisions().owner().filter(|o| o.instance_id == me).cloned() else {
                continue;
            };
            let renewal = view.decisions().lease().map_or(1, |l| l.renewal + 1);
            let body = ControlBody::Renew {
                owner: owner.instance_id,
                epoch: owner.epoch,
                renewal,
                // No keeper counts these: they only keep standbys waiting.
                incarnation: 0,
            };
            let m = crate::migration::message(self.service(), "", Sender::Node, body);
            if let Err(e) = crate::migration::publish(&*self.control, &m).await {
                warn!(error = %e, "could not renew the lease while recovering");
            }
        }
    }

    /// Serves as the owner until released, fenced or shut down.
    async fn own(
        &self,
        instance: Instance<S, L, St, O>,
        granted_at: Option<Instant>,
        view: &ChannelView,
        stop: Stop,
    ) -> Result<Next<Instance<S, L, St, O>>> {
        let owner = view.decisions().owner().map(|o| (o.instance_id.clone(), o.epoch));
        self.report(NodeRole::Owner, Some(&instance), |s| s.owner = owner);
        self.health.clear_ready();
        let status = self.status.clone();
        let agent = match self.source_agent(instance, view).await {
            Ok(agent) => agent,
            Err(Error::Fenced { current_epoch }) => {
                warn!(current_epoch, "another node owns the service: standing by");
                return Ok(Next::Standby(None));
            }
            Err(e) => return Err(e),
        };
        let agent = agent
            .with_lease(self.options.lease, granted_at)
            .with_observer(move |instance, decisions| {
                status.send_modify(|s| fill(s, NodeRole::Owner, instance, decisions, None));
            });
        match agent.run(stop.requested()).await? {
            SourceExit::Released(instance) => Ok(Next::Standby(self.keep_as_standby(instance).await)),
            SourceExit::Shutdown(_) => Ok(Next::Stop),
        }
    }

    /// The owner's agent, fed by the view once it names this node (no new
    /// reader, no history read again: the failover gap); if the view does
    /// not within [`VIEW_CATCH_UP`], the agent reads the channel itself.
    async fn source_agent(
        &self,
        instance: Instance<S, L, St, O>,
        view: &ChannelView,
    ) -> Result<SourceAgent<S, L, St, O, C>> {
        let (control, options) = (Arc::clone(&self.control), self.options.source.clone());
        if view.names_owner_within(self.config.instance_id(), VIEW_CATCH_UP).await {
            SourceAgent::following(instance, control, options, view.follow()?).await
        } else {
            SourceAgent::new(instance, control, options).await
        }
    }

    /// The instance configuration, with every input an operator allowed to
    /// skip (`SkipInput` on the channel).
    fn instance_config(&self, view: &ChannelView) -> InstanceConfig {
        let skips = view.decisions().skipped_inputs().clone();
        self.config.clone().skip_inputs(skips)
    }

    /// Updates the status for `role`.
    fn report(&self, role: NodeRole, instance: Option<&Instance<S, L, St, O>>, extra: impl FnOnce(&mut NodeStatus)) {
        self.status.send_modify(|s| {
            s.role = role;
            if let Some(i) = instance {
                s.position = i.position().clone();
                s.stats = i.stats().clone();
            }
            extra(s);
        });
    }
}

/// Fills `status` from an instance and the decisions.
fn fill<S, L, St, O>(
    status: &mut NodeStatus,
    role: NodeRole,
    instance: &Instance<S, L, St, O>,
    decisions: &Decisions,
    lag: Option<u64>,
) where
    S: StatefulService,
    L: MessageLog,
    St: SnapshotStore,
    O: OutputSink,
{
    status.role = role;
    status.owner = decisions.owner().map(|o| (o.instance_id.clone(), o.epoch));
    status.position = instance.position().clone();
    status.stats = instance.stats().clone();
    status.lag = lag;
}

/// The shutdown request, as every role sees it.
#[derive(Clone, Debug)]
struct Stop(tokio::sync::watch::Receiver<bool>);

impl Stop {
    fn is_requested(&self) -> bool {
        *self.0.borrow()
    }

    /// Completes once shutdown is requested.
    async fn requested(mut self) {
        let _ = self.0.wait_for(|stop| *stop).await;
    }
}

#[cfg(test)]
mod tests;
