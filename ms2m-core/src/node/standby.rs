//! The standby and target roles: replaying behind the owner, taking over
//! when its lease expires, and serving as a migration's target.

use std::time::{Duration, Instant};

use tracing::{info, warn};

use super::view::ChannelView;
use super::{BackendFactory, Next, Node, NodeRole, Stop};
use crate::control::ControlChannel;
use crate::error::Result;
use crate::log::MessageLog;
use crate::migration::{serve_as_target, TargetStart};
use crate::runtime::{Instance, ProgressPhase};
use crate::service::StatefulService;
use crate::sink::OutputSink;
use crate::store::{self, SnapshotStore};

/// How long a standby waits for input in one step.
const STANDBY_POLL: Duration = Duration::from_millis(20);

impl<S, L, St, O, C, F> Node<S, L, St, O, C, F>
where
    S: StatefulService,
    L: MessageLog,
    St: SnapshotStore,
    O: OutputSink,
    C: ControlChannel,
    F: BackendFactory<L, St, O>,
{
    /// Replays behind the owner until a migration names this node, its
    /// claim wins, or shutdown.
    pub(super) async fn stand_by(
        &self,
        instance: Option<Instance<S, L, St, O>>,
        view: &ChannelView,
        stop: Stop,
    ) -> Result<Next<Instance<S, L, St, O>>> {
        let me = self.config.instance_id();
        let mut instance = match instance {
            Some(instance) => instance,
            None => self.restore_standby(view).await?,
        };
        info!(position = %instance.position(), "standing by");
        let mut refreshed: Option<Instant> = None;
        loop {
            if stop.is_requested() {
                return Ok(Next::Stop);
            }
            if view.owner_is(me) && self.channel_names_me().await? {
                // Our own takeover or claim, published by an earlier role
                // or process, decided it: serve.
                drop(instance);
                return Ok(Next::Owner(self.recover(view).await?, None));
            }
            if view.prepared_for(me).is_some() {
                return Ok(Next::Target(Some(instance)));
            }
            if let Some((claim, sent_at)) = view.claim_due() {
                info!(?claim, "the owner's lease expired: claiming the service");
                if self.claim(view, claim).await? {
                    return self
                        .take_over(instance, sent_at)
                        .await
                        .map(|i| Next::Owner(i, Some(sent_at)));
                }
                continue;
            }
            if refreshed.is_none_or(|at| at.elapsed() >= self.options.standby_refresh()) {
                refreshed = Some(Instant::now());
                self.refresh_ceiling(&mut instance, view).await?;
            }
            if instance.step_with_timeout(STANDBY_POLL).await? == 0 {
                // At the ceiling (or idle): the input stays in the log.
                tokio::time::sleep(STANDBY_POLL / 2).await;
            }
        }
    }

    /// The newest snapshot that verifies, restored with outputs suppressed.
    async fn restore_standby(&self, view: &ChannelView) -> Result<Instance<S, L, St, O>> {
        let backends = self.factory.backends().await?;
        let loaded = store::load_newest_logged::<S, St>(&*backends.store, self.service()).await?;
        let mut instance = Instance::restore(backends, self.instance_config(view), loaded).await?;
        instance.use_health(self.health.clone());
        Ok(instance)
    }

    /// The owner's committed position becomes the replay ceiling.
    async fn refresh_ceiling(&self, instance: &mut Instance<S, L, St, O>, view: &ChannelView) -> Result<()> {
        let lag = instance.follow_committed().await?;
        self.health.set_ready(lag <= crate::health::DEFAULT_READY_LAG);
        let decisions = view.decisions();
        instance.skip_inputs(decisions.skipped_inputs().iter().cloned());
        self.status
            .send_modify(|s| super::fill(s, NodeRole::Standby, instance, &decisions, Some(lag)));
        Ok(())
    }

    /// The claim won: fence the old owner's sink, replay to what it
    /// committed, go live from there (every output it had not committed is
    /// emitted again).
    async fn take_over(&self, mut instance: Instance<S, L, St, O>, sent_at: Instant) -> Result<Instance<S, L, St, O>> {
        instance.set_ceiling(None);
        instance.claim().await?;
        let watermark = instance.read_watermark().await?.unwrap_or_default();
        instance
            .replay_to(&watermark, ProgressPhase::Recovery, &*crate::no_progress())
            .await?;
        instance.go_live();
        let labels = [
            ("service", self.service().to_string()),
            ("instance", self.config.instance_id().to_string()),
        ];
        metrics::counter!(crate::metrics::FAILOVERS, &labels).increment(1);
        info!(position = %instance.position(), since_claim = ?sent_at.elapsed(), "took over: live");
        Ok(instance)
    }

    /// A released owner keeps its state as a standby when it stands at the
    /// committed position (a migration's source at Pf); one that applied
    /// past it (fenced while serving) starts over from a snapshot.
    pub(super) async fn keep_as_standby(&self, mut instance: Instance<S, L, St, O>) -> Option<Instance<S, L, St, O>> {
        match instance.read_watermark().await {
            Ok(Some(watermark)) if watermark.reaches(instance.position()) => {
                info!("released at the committed position: standing by with this state");
                instance.become_standby();
                Some(instance)
            }
            _ => {
                info!("released past the committed position: standing by from a snapshot");
                None
            }
        }
    }

    /// Runs the target protocol for a migration that named this node;
    /// gives it up if the source's lease expires meanwhile.
    pub(super) async fn migrate_here(
        &self,
        instance: Option<Instance<S, L, St, O>>,
        view: &ChannelView,
        stop: Stop,
    ) -> Result<Next<Instance<S, L, St, O>>> {
        self.report(NodeRole::Target, instance.as_ref(), |s| s.lag = None);
        self.health.set_ready(false);
        let migration = view.prepared_for(self.config.instance_id());
        let give_up = || {
            if let Some(id) = migration.clone() {
                view.give_up(id);
            }
        };
        let start = match instance {
            Some(instance) => TargetStart::Standby(Box::new(instance)),
            None => TargetStart::Backends(self.factory.backends().await?),
        };
        let quiet = crate::no_progress();
        let target = serve_as_target::<S, L, St, O, C>(
            start,
            self.instance_config(view),
            self.control.clone(),
            self.options.target.clone(),
            &*quiet,
        );
        tokio::select! {
            result = target => match result {
                Ok((live, takeover_sent)) => Ok(Next::Owner(live, takeover_sent)),
                Err(e) => {
                    warn!(error = %e, "the migration to this node did not complete: standing by");
                    give_up();
                    Ok(Next::Standby(None))
                }
            },
            () = view.lease_expired() => {
                warn!("the source's lease expired during the migration: giving it up");
                give_up();
                Ok(Next::Standby(None))
            }
            () = stop.requested() => Ok(Next::Stop),
        }
    }
}
