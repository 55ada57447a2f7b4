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
use crate::migration::ChannelFeed;
use crate::migration::{forward_control, lease_clock, read_history, MigrationError};

/// How many recent records [`ChannelView::wait_for`] can recognise.
const RECENT: usize = 256;

/// Records an agent following the view may fall behind by before the view
/// waits for it.
const FOLLOWER_BUFFER: usize = 1024;

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
    /// The records of migrations undecided when they were folded, while
    /// they stay undecided: what an owner's agent must see again.
    open_records: Vec<ControlMessage>,
    /// Agents following the channel through this view.
    followers: Vec<tokio::sync::mpsc::Sender<ControlMessage>>,
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
        if !m.migration_id.is_empty() {
            self.open_records.push(m.clone());
        }
        let decisions = &self.decisions;
        self.open_records.retain(|r| !decisions.is_decided(&r.migration_id));
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
            open_records: Vec::new(),
            followers: Vec::new(),
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
                let followers = {
                    let mut state = lock(&shared);
                    state.fold(m.clone());
                    state.followers.retain(|f| !f.is_closed());
                    state.followers.clone()
                };
                for follower in followers {
                    let _ = follower.send(m.clone()).await;
                }
                count += 1;
                let _ = tx.send(count);
            }
            let mut state = lock(&shared);
            state.closed = true;
            // Their receivers see the channel end.
            state.followers.clear();
            drop(state);
            let _ = tx.send(u64::MAX);
        });
        Ok(Self { state, changed, task })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }

    /// A feed for an owner's agent: the decisions and open migrations'
    /// records so far, and every record folded from now on (taken under
    /// one lock, so none is missed or given twice). No new reader, no
    /// history read again: taking over costs no round trip here.
    pub(super) fn follow(&self) -> Result<ChannelFeed> {
        let mut state = self.lock();
        if state.closed {
            return Err(reader_stopped());
        }
        let (tx, records) = tokio::sync::mpsc::channel(FOLLOWER_BUFFER);
        state.followers.push(tx);
        Ok(ChannelFeed {
            decisions: state.decisions.clone(),
            open_records: state.open_records.clone(),
            records,
        })
    }

    /// Waits up to `timeout` until the view names `me` the owner (it may
    /// lag behind a record another reader of this node already saw, such
    /// as a migration target's `Takeover`): whether it does.
    pub(super) async fn names_owner_within(&self, me: &str, timeout: Duration) -> bool {
        let mut changed = self.changed.clone();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            changed.borrow_and_update();
            if self.owner_is(me) {
                return true;
            }
            if self.lock().closed || tokio::time::timeout_at(deadline, changed.changed()).await.is_err() {
                return false;
            }
        }
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
