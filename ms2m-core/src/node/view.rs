//! The node's running view of the control channel: every record folded
//! into the [`Decisions`] and a [`LeaseWatch`] on its own task, so that the
//! lease's expiry is timed from when this node read the last renewal,
//! across role changes (a standby that becomes a migration target and back
//! keeps its timer).

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::control::{ControlBody, ControlChannel, ControlMessage, Role};
use crate::error::{Error, Result};
use crate::migration::protocol::owner::{LeaseConfig, LeaseWatch};
use crate::migration::protocol::Decisions;
use crate::migration::{forward_control, lease_clock, read_history, MigrationError};

/// How many recent records [`ChannelView::wait_for`] can recognise.
const RECENT: usize = 256;

/// How long a node waits to read back its own record.
const READ_BACK_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug)]
struct State {
    decisions: Decisions,
    watch: LeaseWatch,
    /// Target of every migration prepared, by migration id.
    targets: BTreeMap<String, String>,
    /// The latest records, each with whether folding it changed the owner.
    recent: VecDeque<(ControlMessage, bool)>,
    /// Migrations this node gave up as their target.
    given_up: std::collections::BTreeSet<String>,
    /// The forwarding task ended (the channel's reader failed).
    closed: bool,
}

impl State {
    fn fold(&mut self, m: ControlMessage) {
        let owner_before = self.decisions.owner().cloned();
        self.decisions.observe(&m);
        let set_owner = self.decisions.owner() != owner_before.as_ref();
        self.watch.observe(lease_clock(Instant::now()), &self.decisions);
        if let (ControlBody::Prepare { target, .. }, Role::Coordinator) = (&m.body, m.from) {
            self.targets.insert(m.migration_id.clone(), target.clone());
        }
        if self.recent.len() == RECENT {
            self.recent.pop_front();
        }
        self.recent.push_back((m, set_owner));
    }
}

/// See the [module docs](self).
#[derive(Debug)]
pub(super) struct ChannelView {
    state: Arc<Mutex<State>>,
    changed: tokio::sync::watch::Receiver<u64>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for ChannelView {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl ChannelView {
    /// Subscribes, folds the history, then follows the channel.
    pub(super) async fn start<C: ControlChannel>(
        control: &C,
        service: &str,
        me: &str,
        lease: LeaseConfig,
    ) -> Result<Self> {
        // Subscribe first: a record in between arrives twice, and folding
        // it twice changes nothing.
        let mut records = forward_control(control, service.to_string(), false).await?;
        let mut state = State {
            decisions: Decisions::default(),
            watch: LeaseWatch::new(me, lease),
            targets: BTreeMap::new(),
            recent: VecDeque::new(),
            given_up: Default::default(),
            closed: false,
        };
        for m in read_history(control, service).await? {
            state.fold(m);
        }
        let state = Arc::new(Mutex::new(state));
        let (tx, changed) = tokio::sync::watch::channel(0u64);
        let shared = Arc::clone(&state);
        let task = tokio::spawn(async move {
            let mut count = 0;
            while let Some(m) = records.recv().await {
                lock(&shared).fold(m);
                count += 1;
                let _ = tx.send(count);
            }
            lock(&shared).closed = true;
            let _ = tx.send(u64::MAX);
        });
        Ok(Self { state, changed, task })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }

    /// Whether the channel names `me` the owner.
    pub(super) fn owner_is(&self, me: &str) -> bool {
        self.lock().decisions.owner().is_some_and(|o| o.instance_id == me)
    }

    /// The decisions folded so far.
    pub(super) fn decisions(&self) -> Decisions {
        self.lock().decisions.clone()
    }

    /// The claim to publish now, and the time taken before publishing it,
    /// when nobody owns the service or the owner's lease expired.
    pub(super) fn claim_due(&self) -> Option<(ControlBody, Instant)> {
        let now = Instant::now();
        let mut state = self.lock();
        let State { decisions, watch, .. } = &mut *state;
        watch.claim_due(lease_clock(now), decisions).map(|claim| (claim, now))
    }

    /// An undecided migration that names `me` as its target.
    pub(super) fn prepared_for(&self, me: &str) -> Option<String> {
        let state = self.lock();
        let id = state
            .decisions
            .undecided()
            .find(|id| !state.given_up.contains(*id) && state.targets.get(*id).is_some_and(|t| t == me))?;
        Some(id.to_string())
    }

    /// This node will not take part in `migration` again (it failed here).
    pub(super) fn give_up(&self, migration: String) {
        self.lock().given_up.insert(migration);
    }

    /// Completes once the owner's lease expired (or nobody owns the
    /// service), as a standby would judge it now.
    pub(super) async fn lease_expired(&self) {
        let mut changed = self.changed.clone();
        loop {
            changed.borrow_and_update();
            let expires_in = {
                let state = self.lock();
                if state.watch.won(&state.decisions) {
                    None
                } else {
                    Some(state.watch.expires_in(lease_clock(Instant::now())))
                }
            };
            match expires_in {
                Some(left) if left.is_zero() => return,
                Some(left) => {
                    let _ = tokio::time::timeout(left, changed.changed()).await;
                }
                None => {
                    let _ = changed.changed().await;
                }
            }
        }
    }

    /// Waits until `m` (a record this node published) was folded: whether
    /// folding it changed the owner (a claim that won; a claim that lost
    /// changes nothing, even when an earlier record of the same instance
    /// id, say one a crashed process left in flight, named this node).
    pub(super) async fn wait_for(&self, m: &ControlMessage) -> Result<bool> {
        let mut changed = self.changed.clone();
        let deadline = tokio::time::Instant::now() + READ_BACK_TIMEOUT;
        loop {
            changed.borrow_and_update();
            {
                let state = self.lock();
                let mut folds = state.recent.iter().filter(|(r, _)| r == m).peekable();
                if folds.peek().is_some() {
                    return Ok(folds.any(|(_, set_owner)| *set_owner));
                }
                if state.closed {
                    return Err(reader_stopped());
                }
            }
            if tokio::time::timeout_at(deadline, changed.changed()).await.is_err() {
                return Err(Error::Migration(MigrationError::Timeout {
                    waiting_for: "this node's own record on the control channel",
                }));
            }
        }
    }
}

fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    // A panic while folding leaves a consistent-enough state to read.
    state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn reader_stopped() -> Error {
    Error::Migration(MigrationError::Aborted {
        reason: "control channel reader stopped".into(),
    })
}
