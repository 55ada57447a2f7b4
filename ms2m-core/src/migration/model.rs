//! Exhaustive model checking of the migration protocol with `stateright`.
//!
//! The checked system is the *real* transition functions of
//! [`protocol`](super::protocol) (`CoordinatorMachine`, `SourceMachine`,
//! `TargetMachine`), composed with small models of what they run over:
//!
//! * the control channel: one totally ordered log; every party publishes
//!   through an outbox (a record is sent, then lands), and a party that
//!   crashes may leave its next record *in flight*, to land at any later
//!   point (a dead coordinator's `Stop` arriving after its successor's
//!   rollback; only the coordinator's records are delayed this way, which
//!   is the case the decision rule exists for);
//! * the input log: `INPUT` messages, applied one at a time;
//! * the snapshot store: positions by id, uploads that finish or fail;
//! * the sink: transactional, exactly-once, with fencing: a claim makes the
//!   claimer the only producer whose commit succeeds and aborts everyone
//!   else's uncommitted outputs; a fenced commit stops that instance.
//!
//! Every step is one party handling one event (and performing the actions
//! its machine returns). Faults (a crash of any party, a failed checkpoint
//! upload, a target's timeout) may happen between any two steps, up to a
//! budget; a crashed or failed instance is restarted like a supervisor
//! would, and recovers like `Instance::recover` + `SourceAgent::new` (the
//! owner) or `run_target` (anyone else) do; the coordinator may time out at
//! any point where it waits (no timing assumption), and a dead one is
//! replaced by `Coordinator::recover`.
//!
//! Reductions that keep every distinct outcome: the coordinator reads each
//! record as it lands (reading late is the same as its own commands landing
//! late, which the outbox explores); a party skips records that change
//! nothing for it; a party crashes right after one of its own steps (a
//! crash after others' steps reaches the same states).
//!
//! Properties:
//! * *single writer, exactly once*: the committed outputs are exactly one
//!   output for every input offset below the committed position, each from
//!   one instance (nothing lost, nothing duplicated);
//! * *owner views agree*: an instance that has read the whole channel and
//!   serves (applies and emits) is the owner `current_owner` names;
//! * *migration decides*: every run ends with the migration decided, and
//!   *all input committed*: every run ends with all input served by the
//!   owner (liveness, once crashes stop: every state with nothing left to
//!   do satisfies them);
//! * *sometimes taken over* / *sometimes rolled back*: both outcomes are
//!   reachable (the model is not vacuous).

use std::collections::VecDeque;
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::time::Duration;

use stateright::{Checker, Model, Property};

use super::protocol::coordinator::{CoordinatorAction, CoordinatorEvent, CoordinatorMachine};
use super::protocol::source::{SourceAction, SourceEvent, SourceMachine};
use super::protocol::target::{TargetAction, TargetEvent, TargetMachine, TargetPhase};
use super::protocol::Decisions;
use super::{CutoverRule, DigestPolicy, MigrationConfig, MigrationPlan, Strategy};
use crate::control::{ControlBody, ControlMessage, Role};
use crate::digest::StateDigest;
use crate::position::{Position, TopicPartition};
use crate::runtime::CheckpointInfo;

const SERVICE: &str = "model";
const MIGRATION: &str = "m1";
const IDS: [&str; 2] = ["src", "tgt"];
const SRC: usize = 0;
const TGT: usize = 1;

/// A control record, hashed once by its encoding.
#[derive(Clone, Debug)]
struct Rec {
    message: Arc<ControlMessage>,
    key: u64,
}

impl Rec {
    fn new(from: Role, body: ControlBody) -> Self {
        let message = ControlMessage {
            service: SERVICE.into(),
            migration_id: MIGRATION.into(),
            from,
            sent_at_ms: 0,
            body,
        };
        let key = xxhash_rust::xxh3::xxh3_64(&message.to_bytes());
        Self {
            message: Arc::new(message),
            key,
        }
    }
}

impl PartialEq for Rec {
    fn eq(&self, other: &Self) -> bool {
        self.key == other.key && self.message == other.message
    }
}

impl Eq for Rec {}

impl Hash for Rec {
    fn hash<H: Hasher>(&self, h: &mut H) {
        self.key.hash(h);
    }
}

/// What an instance is doing.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
#[allow(
    clippy::large_enum_variant,
    reason = "boxing would allocate on every clone of a model state"
)]
enum NodeRole {
    /// Serving as the owner (its agent's machine).
    Owner(SourceMachine),
    /// A standby / migration target; live once its machine is `Live`.
    Standby(TargetMachine),
    /// Crashed, fenced or refused to start.
    Down,
}

/// One instance (process) of the service.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Node {
    role: NodeRole,
    /// Next control record to read.
    cursor: usize,
    outbox: VecDeque<Rec>,
    /// Input applied (the position; the state is the fold of it).
    applied: u64,
    /// A target never replays past this.
    ceiling: u64,
    /// Input offsets whose outputs are sent but not committed.
    pending: Vec<u64>,
    /// The sink generation this instance claimed (its producer epoch).
    claimed: Option<u32>,
    /// A checkpoint upload under way, at this position.
    uploading: Option<u64>,
    /// A digest point being computed off the apply loop, at this position.
    digesting: Option<u64>,
    /// A target's digest point, to report once replay gets there.
    digest_point: Option<u64>,
    /// Position last published as progress.
    reported: Option<u64>,
}

impl Node {
    fn new(role: NodeRole) -> Self {
        Self {
            role,
            cursor: 0,
            outbox: VecDeque::new(),
            applied: 0,
            ceiling: 0,
            pending: Vec::new(),
            claimed: None,
            uploading: None,
            digesting: None,
            digest_point: None,
            reported: None,
        }
    }

    fn emits(&self) -> bool {
        match &self.role {
            NodeRole::Owner(m) => m.may_apply(),
            NodeRole::Standby(m) => m.phase() == TargetPhase::Live,
            NodeRole::Down => false,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Coordinator {
    machine: Option<CoordinatorMachine>,
    cursor: usize,
    outbox: VecDeque<Rec>,
    /// Logical time: bumped by every timeout.
    clock: u32,
    restarts_left: u8,
}

/// The exactly-once sink: committed outputs and the fencing generation.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
struct Sink {
    generation: u32,
    /// Committed outputs: (input offset, instance).
    committed: Vec<(u64, usize)>,
    /// The input position committed with them.
    position: u64,
}

/// The whole system.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(super) struct World {
    log: Vec<Rec>,
    /// A record sent by a crashed party that has not landed yet.
    in_flight: Option<Rec>,
    coordinator: Coordinator,
    nodes: [Node; 2],
    sink: Sink,
    /// Snapshot positions by id.
    store: Vec<u64>,
    crashes_left: u8,
    /// Who took the last step: only it may crash next (a crash of a party
    /// that did not act since its last step leads to the same states).
    last: Option<Party>,
}

/// Who acts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(super) enum Party {
    Coordinator,
    Node(usize),
}

/// One step of the system.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(super) enum Step {
    /// The party's next outgoing record lands on the channel.
    Send(Party),
    /// The record in flight lands.
    Land,
    /// The party reads the next record of the channel.
    Read(Party),
    /// The instance applies the next input message.
    Apply(usize),
    /// The instance commits its outputs with its position.
    Commit(usize),
    /// The instance's checkpoint upload finishes (`true`) or fails.
    Upload(usize, bool),
    /// The source's digest point is computed.
    Digest(usize),
    /// The instance's progress timer fires.
    Progress(usize),
    /// The party's timeout fires.
    Timeout(Party),
    /// The party crashes; `true`: its next record stays in flight.
    Crash(Party, bool),
    /// The party restarts.
    Restart(Party),
}

impl Step {
    /// The party taking the step (`None`: the channel delivering a record).
    fn party(self) -> Option<Party> {
        match self {
            Step::Send(p) | Step::Read(p) | Step::Timeout(p) | Step::Crash(p, _) | Step::Restart(p) => Some(p),
            Step::Apply(i) | Step::Commit(i) | Step::Upload(i, _) | Step::Digest(i) | Step::Progress(i) => {
                Some(Party::Node(i))
            }
            Step::Land => None,
        }
    }
}

/// The model: one migration of `strategy` under faults.
#[derive(Clone, Debug)]
pub(super) struct MigrationModel {
    pub(super) strategy: Strategy,
    /// Input messages in the log.
    pub(super) input: u64,
    /// Fault budget: crashes, failed uploads and target timeouts.
    pub(super) crashes: u8,
    /// Whether the source's digest point completes as a step of its own
    /// (as off the apply loop, so a `Stop` can come first) or at once.
    pub(super) async_digest: bool,
}

fn pos(n: u64) -> Position {
    let mut p = Position::new();
    p.set(TopicPartition::new("in", 0), n as i64);
    p
}

fn offset(p: &Position) -> u64 {
    p.total().max(0) as u64
}

fn digest(n: u64) -> StateDigest {
    StateDigest(u128::from(n))
}

fn config() -> MigrationConfig {
    MigrationConfig {
        cutover: CutoverRule {
            max_lag: Some(1),
            max_catch_up: None,
            replay_max: Duration::from_secs(1),
        },
        digest_policy: DigestPolicy::Abort,
        phase_timeout: Duration::from_secs(1),
    }
}

fn plan(strategy: Strategy) -> MigrationPlan {
    MigrationPlan {
        service: SERVICE.into(),
        migration_id: MIGRATION.into(),
        source: IDS[SRC].into(),
        target: IDS[TGT].into(),
        strategy,
    }
}

impl World {
    fn decisions(&self) -> Decisions {
        Decisions::from_history(self.log.iter().map(|r| &*r.message))
    }

    fn owner(&self) -> Option<usize> {
        let decisions = self.decisions();
        let owner = decisions.owner()?;
        IDS.iter().position(|id| *id == owner.instance_id)
    }

    fn decided(&self) -> bool {
        self.decisions().is_decided(MIGRATION)
    }

    fn now(&self) -> Duration {
        Duration::from_secs(10) * self.coordinator.clock
    }
}

impl MigrationModel {
    fn init(&self) -> World {
        let source = Node::new(NodeRole::Owner(SourceMachine::new(IDS[SRC], Decisions::default())));
        let target = Node::new(NodeRole::Standby(TargetMachine::new(IDS[TGT], Decisions::default())));
        let mut world = World {
            log: Vec::new(),
            in_flight: None,
            coordinator: Coordinator {
                machine: None,
                cursor: 0,
                outbox: VecDeque::new(),
                clock: 0,
                restarts_left: self.crashes,
            },
            nodes: [source, target],
            sink: Sink::default(),
            store: Vec::new(),
            crashes_left: self.crashes,
            last: None,
        };
        world.sink.generation = 1;
        world.nodes[SRC].claimed = Some(1);
        let mut machine = CoordinatorMachine::new(plan(self.strategy), config(), 1);
        let actions = machine.handle(Duration::ZERO, CoordinatorEvent::Start);
        world.coordinator.machine = Some(machine);
        self.coordinator_actions(&mut world, actions);
        world
    }

    // ---- the coordinator ----

    fn coordinator_event(&self, w: &mut World, event: CoordinatorEvent) {
        let now = w.now();
        let Some(machine) = w.coordinator.machine.as_mut() else {
            return;
        };
        let actions = machine.handle(now, event);
        self.coordinator_actions(w, actions);
    }

    fn coordinator_actions(&self, w: &mut World, actions: Vec<CoordinatorAction>) {
        for action in actions {
            if let CoordinatorAction::Publish(body) = action {
                w.coordinator.outbox.push_back(Rec::new(Role::Coordinator, body));
            }
        }
    }

    // ---- an owner (the source's agent) ----

    fn owner_event(&self, w: &mut World, i: usize, event: SourceEvent) {
        let NodeRole::Owner(machine) = &mut w.nodes[i].role else {
            return;
        };
        let actions = machine.handle(event);
        for action in actions {
            self.owner_action(w, i, action);
        }
    }

    fn owner_action(&self, w: &mut World, i: usize, action: SourceAction) {
        match action {
            SourceAction::StartCheckpoint => {
                if self.commit(w, i) {
                    w.nodes[i].uploading = Some(w.nodes[i].applied);
                }
            }
            SourceAction::Publish { body, .. } => w.nodes[i].outbox.push_back(Rec::new(Role::Source, body)),
            SourceAction::PublishProgress { .. } => {
                let position = pos(w.nodes[i].applied);
                w.nodes[i].reported = Some(w.nodes[i].applied);
                let body = ControlBody::SourceProgress { position };
                w.nodes[i].outbox.push_back(Rec::new(Role::Source, body));
            }
            SourceAction::TakeDigest if self.async_digest => w.nodes[i].digesting = Some(w.nodes[i].applied),
            SourceAction::TakeDigest => {
                let at = w.nodes[i].applied;
                let event = SourceEvent::DigestTaken {
                    position: pos(at),
                    digest: digest(at),
                };
                self.owner_event(w, i, event);
            }
            SourceAction::CommitAndPublishStopped {
                digest: with_digest, ..
            } => {
                if self.commit(w, i) {
                    let n = w.nodes[i].applied;
                    let body = ControlBody::Stopped {
                        position: pos(n),
                        digest: with_digest.then(|| digest(n)),
                        longest_stall_us: 0,
                    };
                    w.nodes[i].outbox.push_back(Rec::new(Role::Source, body));
                }
            }
            SourceAction::Claim => self.claim(w, i),
            SourceAction::Release => {}
        }
    }

    // ---- a standby / target ----

    fn target_event(&self, w: &mut World, i: usize, event: TargetEvent) {
        let mut events = VecDeque::from([event]);
        while let Some(event) = events.pop_front() {
            let NodeRole::Standby(machine) = &mut w.nodes[i].role else {
                return;
            };
            let actions = machine.handle(event);
            for action in actions {
                if let Some(next) = self.target_action(w, i, action) {
                    events.push_back(next);
                }
            }
        }
    }

    fn target_action(&self, w: &mut World, i: usize, action: TargetAction) -> Option<TargetEvent> {
        let node = &mut w.nodes[i];
        match action {
            TargetAction::Restore { .. } | TargetAction::RestoreFromStandby => {
                let at = match action {
                    TargetAction::Restore {
                        snapshot_id: Some(id), ..
                    } => *w.store.get(id as usize)?,
                    // A standby replays up to the owner's committed
                    // position: the furthest it can stand, so the closest
                    // to the digest point and to Pf (one standing further
                    // back replays more, as from a snapshot).
                    TargetAction::RestoreFromStandby => w.sink.position,
                    _ => 0,
                };
                node.applied = at;
                node.ceiling = at;
                Some(TargetEvent::Restored {
                    position: pos(at),
                    transfer_us: 0,
                    restore_us: 0,
                })
            }
            TargetAction::SetCeiling(p) => {
                node.ceiling = offset(&p);
                None
            }
            TargetAction::CheckDigestAt(pd) => {
                let pd = offset(&pd);
                if node.applied > pd {
                    return Some(TargetEvent::PastDigestPoint(pos(node.applied)));
                }
                if node.applied == pd {
                    return Some(TargetEvent::ReachedDigestPoint(digest(pd)));
                }
                // Replay gets there step by step (`Step::Apply`).
                node.digest_point = Some(pd);
                None
            }
            TargetAction::ReplayTo {
                pf,
                digest: with_digest,
            } => {
                let pf = offset(&pf);
                if node.applied > pf {
                    return Some(TargetEvent::PastPf(pos(node.applied)));
                }
                node.applied = pf;
                Some(TargetEvent::ReachedPf(with_digest.then(|| digest(pf))))
            }
            TargetAction::Publish(body) => {
                node.outbox.push_back(Rec::new(Role::Target, body));
                None
            }
            TargetAction::PublishProgress => {
                let source = node.ceiling;
                node.reported = Some(node.applied);
                let body = ControlBody::TargetProgress {
                    position: pos(node.applied),
                    lag: source.saturating_sub(node.applied),
                    apply_rate: 0.0,
                    input_rate: 0.0,
                };
                node.outbox.push_back(Rec::new(Role::Target, body));
                None
            }
            TargetAction::Claim => {
                self.claim(w, i);
                Some(TargetEvent::Claimed)
            }
            TargetAction::GoLive {
                epoch,
                position,
                digest,
                digest_match,
            } => {
                let body = ControlBody::Live {
                    owner: IDS[i].into(),
                    epoch,
                    position,
                    digest,
                    digest_match,
                    replayed: 0,
                    final_gap: 0,
                    visible_before_us: None,
                };
                node.outbox.push_back(Rec::new(Role::Target, body));
                None
            }
            TargetAction::Fail(_) => {
                // `run_target` returns the error: the process ends, and its
                // supervisor restarts it (a restart, below).
                node.role = NodeRole::Down;
                node.pending.clear();
                None
            }
        }
    }

    // ---- the sink ----

    /// Claims the sink: a new producer generation; every other instance's
    /// uncommitted outputs are aborted, and so are the claimer's own.
    fn claim(&self, w: &mut World, i: usize) {
        w.sink.generation += 1;
        w.nodes[i].claimed = Some(w.sink.generation);
        for node in &mut w.nodes {
            node.pending.clear();
        }
    }

    /// Commits `i`'s outputs with its position; a fenced commit stops the
    /// instance. Returns whether it committed.
    fn commit(&self, w: &mut World, i: usize) -> bool {
        if w.nodes[i].claimed != Some(w.sink.generation) {
            w.nodes[i].role = NodeRole::Down;
            w.nodes[i].outbox.clear();
            return false;
        }
        let node = &mut w.nodes[i];
        if node.pending.is_empty() {
            return true;
        }
        w.sink
            .committed
            .extend(node.pending.drain(..).map(|offset| (offset, i)));
        w.sink.position = node.applied;
        true
    }

    // ---- crashes and restarts ----

    fn crash(&self, w: &mut World, party: Party, keep_in_flight: bool) {
        w.crashes_left -= 1;
        let outbox = match party {
            Party::Coordinator => {
                w.coordinator.machine = None;
                std::mem::take(&mut w.coordinator.outbox)
            }
            Party::Node(i) => {
                let node = &mut w.nodes[i];
                node.role = NodeRole::Down;
                node.pending.clear();
                node.uploading = None;
                node.digesting = None;
                node.digest_point = None;
                std::mem::take(&mut node.outbox)
            }
        };
        if keep_in_flight {
            w.in_flight = outbox.into_iter().next();
        }
    }

    fn restart(&self, w: &mut World, party: Party) {
        match party {
            Party::Coordinator => {
                w.coordinator.restarts_left -= 1;
                let history: Vec<ControlMessage> = w.log.iter().map(|r| (*r.message).clone()).collect();
                let (machine, actions) = CoordinatorMachine::recover(SERVICE, MIGRATION, &history, config(), w.now());
                w.coordinator.machine = Some(machine);
                w.coordinator.cursor = w.log.len();
                self.coordinator_actions(w, actions);
            }
            Party::Node(i) => self.restart_node(w, i),
        }
    }

    /// `ensure_owner` + `Instance::recover` + `SourceAgent::new` for the
    /// owner; `run_target` (a new standby) for anyone else.
    fn restart_node(&self, w: &mut World, i: usize) {
        let decisions = w.decisions();
        let owner = w.owner();
        let node = &mut w.nodes[i];
        node.cursor = 0;
        node.outbox.clear();
        node.pending.clear();
        node.uploading = None;
        node.digesting = None;
        node.digest_point = None;
        node.reported = None;
        let is_owner = owner == Some(i) || (owner.is_none() && i == SRC);
        if is_owner {
            // Recovers at the committed position, claims the sink, then
            // catches up with the whole history before serving.
            node.applied = w.sink.position;
            node.role = NodeRole::Owner(SourceMachine::new(IDS[i], decisions));
            self.claim(w, i);
            for k in 0..w.log.len() {
                let m = (*w.log[k].message).clone();
                w.nodes[i].cursor = k + 1;
                self.owner_event(w, i, SourceEvent::Record(m));
            }
        } else {
            node.role = NodeRole::Standby(TargetMachine::new(IDS[i], decisions));
        }
    }

    // ---- what can happen next ----

    fn node_steps(&self, w: &World, i: usize, steps: &mut Vec<Step>) {
        let node = &w.nodes[i];
        if node.role == NodeRole::Down {
            // A supervisor restarts a process that ended, however often.
            steps.push(Step::Restart(Party::Node(i)));
            return;
        }
        if !node.outbox.is_empty() {
            steps.push(Step::Send(Party::Node(i)));
        }
        if node.cursor < w.log.len() {
            steps.push(Step::Read(Party::Node(i)));
        }
        if node.applied < self.input && self.may_apply(node) {
            steps.push(Step::Apply(i));
        }
        if !node.pending.is_empty() {
            steps.push(Step::Commit(i));
        }
        if node.uploading.is_some() {
            steps.push(Step::Upload(i, true));
            if w.crashes_left > 0 {
                steps.push(Step::Upload(i, false));
            }
        }
        if node.digesting.is_some() {
            steps.push(Step::Digest(i));
        }
        if self.progress_due(node) {
            steps.push(Step::Progress(i));
        }
        // A timeout fires only while the party waits (nothing left to read
        // or send): a reply that arrives "too late" is the same as one still
        // unsent when the timeout fires, which is explored.
        let waiting = node.cursor == w.log.len() && node.outbox.is_empty();
        if let NodeRole::Standby(m) = &node.role {
            // A target's timeout is a fault (it ends the role), so it comes
            // out of the same budget as crashes.
            let times_out = matches!(
                m.phase(),
                TargetPhase::Selected | TargetPhase::Replaying | TargetPhase::TakingOver
            );
            if times_out && waiting && w.crashes_left > 0 {
                steps.push(Step::Timeout(Party::Node(i)));
            }
        }
        if self.may_crash(w, Party::Node(i)) {
            steps.push(Step::Crash(Party::Node(i), false));
        }
    }

    /// A party crashes right after one of its own steps (or before any
    /// step): crashing it later, after other parties' steps that do not
    /// touch it, reaches the same states.
    fn may_crash(&self, w: &World, party: Party) -> bool {
        w.crashes_left > 0 && (w.last == Some(party) || w.last.is_none())
    }

    fn may_apply(&self, node: &Node) -> bool {
        match &node.role {
            NodeRole::Owner(m) => m.may_apply(),
            NodeRole::Standby(m) => match m.phase() {
                TargetPhase::Replaying => node.applied < node.ceiling,
                TargetPhase::Live => true,
                _ => false,
            },
            NodeRole::Down => false,
        }
    }

    fn progress_due(&self, node: &Node) -> bool {
        let fresh = node.reported != Some(node.applied);
        match &node.role {
            NodeRole::Owner(m) => fresh && m.migration().is_some() && m.may_apply(),
            NodeRole::Standby(m) => fresh && m.phase() == TargetPhase::Replaying,
            NodeRole::Down => false,
        }
    }

    fn coordinator_steps(&self, w: &World, steps: &mut Vec<Step>) {
        let c = &w.coordinator;
        let running = c
            .machine
            .as_ref()
            .is_some_and(|m| m.phase() != super::protocol::coordinator::CoordinatorPhase::Done);
        if c.machine.is_none() {
            if c.restarts_left > 0 {
                steps.push(Step::Restart(Party::Coordinator));
            }
            return;
        }
        if !c.outbox.is_empty() {
            steps.push(Step::Send(Party::Coordinator));
        }
        if running && c.outbox.is_empty() {
            steps.push(Step::Timeout(Party::Coordinator));
        }
        if running && self.may_crash(w, Party::Coordinator) {
            steps.push(Step::Crash(Party::Coordinator, false));
            if !c.outbox.is_empty() && w.in_flight.is_none() {
                steps.push(Step::Crash(Party::Coordinator, true));
            }
        }
    }

    fn step(&self, w: &mut World, step: Step) {
        w.last = step.party();
        self.step_party(w, step);
        self.coordinator_reads(w);
    }

    /// The coordinator reads every record as it lands: it only commands,
    /// so reading late is the same as its commands landing late, which the
    /// outbox explores.
    fn coordinator_reads(&self, w: &mut World) {
        while w.coordinator.machine.is_some() && w.coordinator.cursor < w.log.len() {
            let m = (*w.log[w.coordinator.cursor].message).clone();
            w.coordinator.cursor += 1;
            self.coordinator_event(w, CoordinatorEvent::Record(m));
        }
    }

    fn step_party(&self, w: &mut World, step: Step) {
        match step {
            Step::Send(Party::Coordinator) => {
                let rec = w.coordinator.outbox.pop_front();
                w.log.extend(rec);
            }
            Step::Send(Party::Node(i)) => {
                let rec = w.nodes[i].outbox.pop_front();
                w.log.extend(rec);
            }
            Step::Land => {
                let rec = w.in_flight.take();
                w.log.extend(rec);
            }
            Step::Read(Party::Coordinator) => {
                let m = (*w.log[w.coordinator.cursor].message).clone();
                w.coordinator.cursor += 1;
                self.coordinator_event(w, CoordinatorEvent::Record(m));
            }
            Step::Read(Party::Node(i)) => {
                let m = (*w.log[w.nodes[i].cursor].message).clone();
                w.nodes[i].cursor += 1;
                match w.nodes[i].role {
                    NodeRole::Owner(_) => self.owner_event(w, i, SourceEvent::Record(m)),
                    _ => self.target_event(w, i, TargetEvent::Record(m)),
                }
            }
            Step::Apply(i) => {
                let node = &mut w.nodes[i];
                if node.emits() {
                    node.pending.push(node.applied);
                }
                node.applied += 1;
                if node.digest_point == Some(node.applied) {
                    node.digest_point = None;
                    let at = node.applied;
                    self.target_event(w, i, TargetEvent::ReachedDigestPoint(digest(at)));
                }
            }
            Step::Commit(i) => {
                self.commit(w, i);
            }
            Step::Upload(i, ok) => self.upload(w, i, ok),
            Step::Digest(i) => {
                if let Some(at) = w.nodes[i].digesting.take() {
                    let event = SourceEvent::DigestTaken {
                        position: pos(at),
                        digest: digest(at),
                    };
                    self.owner_event(w, i, event);
                }
            }
            Step::Progress(i) => match w.nodes[i].role {
                NodeRole::Owner(_) => self.owner_event(w, i, SourceEvent::ProgressDue),
                _ => self.target_event(w, i, TargetEvent::ProgressDue),
            },
            Step::Timeout(Party::Coordinator) => {
                w.coordinator.clock += 1;
                self.coordinator_event(w, CoordinatorEvent::Tick);
            }
            Step::Timeout(Party::Node(i)) => {
                w.crashes_left -= 1;
                self.target_event(w, i, TargetEvent::TimedOut);
            }
            Step::Crash(party, keep) => self.crash(w, party, keep),
            Step::Restart(party) => self.restart(w, party),
        }
    }

    fn upload(&self, w: &mut World, i: usize, ok: bool) {
        let Some(at) = w.nodes[i].uploading.take() else {
            return;
        };
        let event = if ok {
            w.store.push(at);
            SourceEvent::CheckpointStored(CheckpointInfo {
                id: (w.store.len() - 1) as u64,
                position: pos(at),
                bytes: 0,
                pause: Duration::ZERO,
            })
        } else {
            w.crashes_left -= 1;
            SourceEvent::CheckpointFailed("snapshot store unavailable".into())
        };
        self.owner_event(w, i, event);
    }
}

impl Model for MigrationModel {
    type State = World;
    type Action = Step;

    fn init_states(&self) -> Vec<World> {
        vec![self.init()]
    }

    fn actions(&self, w: &World, steps: &mut Vec<Step>) {
        self.coordinator_steps(w, steps);
        for i in 0..IDS.len() {
            self.node_steps(w, i, steps);
        }
        if w.in_flight.is_some() {
            steps.push(Step::Land);
        }
    }

    fn next_state(&self, w: &World, step: Step) -> Option<World> {
        let mut next = w.clone();
        self.step(&mut next, step);
        skip_silent_reads(&mut next);
        Some(next)
    }

    fn properties(&self) -> Vec<Property<Self>> {
        vec![
            Property::always("single writer, exactly once", |_, w| exactly_once(w)),
            Property::always("owner views agree", |_, w| owner_views_agree(w)),
            Property::eventually("migration decides", |_, w: &World| w.decided()),
            Property::eventually("all input committed", all_committed),
            Property::sometimes("sometimes taken over", |_, w: &World| w.owner() == Some(TGT)),
            Property::sometimes("sometimes rolled back", |_, w: &World| {
                w.decided() && w.owner() != Some(TGT)
            }),
        ]
    }
}

/// Advances every party over records that change nothing for it (its
/// machine returns no action and keeps its state): reading them is
/// invisible, so exploring when they are read only multiplies states.
fn skip_silent_reads(w: &mut World) {
    for node in &mut w.nodes {
        while let Some(record) = w.log.get(node.cursor) {
            let m = (*record.message).clone();
            let silent = match &node.role {
                NodeRole::Owner(machine) => {
                    let mut probe = machine.clone();
                    probe.handle(SourceEvent::Record(m)).is_empty() && probe == *machine
                }
                NodeRole::Standby(machine) => {
                    let mut probe = machine.clone();
                    probe.handle(TargetEvent::Record(m)).is_empty() && probe == *machine
                }
                NodeRole::Down => false,
            };
            if !silent {
                break;
            }
            node.cursor += 1;
        }
    }
}

/// Committed outputs are exactly one per input offset below the committed
/// position.
fn exactly_once(w: &World) -> bool {
    let mut offsets: Vec<u64> = w.sink.committed.iter().map(|(o, _)| *o).collect();
    offsets.sort_unstable();
    offsets.iter().copied().eq(0..w.sink.position)
}

/// An instance that read the whole channel and emits is the recorded owner
/// (or the first owner, before any decision named one).
fn owner_views_agree(w: &World) -> bool {
    let owner = w.owner();
    w.nodes.iter().enumerate().all(|(i, node)| {
        let caught_up = node.cursor == w.log.len();
        !(caught_up && node.emits() && node.claimed == Some(w.sink.generation)) || owner.unwrap_or(SRC) == i
    })
}

/// All input committed by the owner.
fn all_committed(m: &MigrationModel, w: &World) -> bool {
    w.sink.position == m.input && exactly_once(w)
}

/// Checks `model` exhaustively, or breadth-first until about `bound`
/// states were generated, and prints what it explored; panics with the
/// counterexample path if a property fails.
pub(super) fn check(model: MigrationModel, bound: Option<usize>) -> (usize, usize) {
    let label = format!("{:?} ({} input, {} faults)", model.strategy, model.input, model.crashes);
    check_model(&label, model, bound)
}

/// Checks any of the protocol models (this one, the lease model) the same
/// way: exhaustively, or breadth-first until about `bound` states were
/// generated; prints `label`, the states and the depth; panics with the
/// counterexample path if a property fails. A bounded run checks the
/// safety and liveness properties on what it reached, and skips the
/// "sometimes" examples it may not have reached.
pub(super) fn check_model<M>(label: &str, model: M, bound: Option<usize>) -> (usize, usize)
where
    M: Model + Send + Sync + 'static,
    M::State: std::fmt::Debug + Hash + Send + Sync + Clone + PartialEq + 'static,
    M::Action: std::fmt::Debug + Clone + PartialEq,
{
    let names: Vec<_> = model
        .properties()
        .into_iter()
        .filter(|p| p.expectation != stateright::Expectation::Sometimes)
        .map(|p| p.name)
        .collect();
    let mut builder = model.checker().threads(2);
    if let Some(bound) = bound {
        builder = builder.target_state_count(bound);
    }
    let checker = builder.spawn_bfs().join();
    let (states, depth) = (checker.unique_state_count(), checker.max_depth());
    let exhaustive = bound.is_none_or(|b| checker.state_count() < b);
    let extent = if exhaustive {
        "exhaustive"
    } else {
        "bounded, breadth-first"
    };
    use std::io::Write;
    // Straight to stderr, so `cargo test` shows it without --nocapture.
    let _ = writeln!(
        std::io::stderr(),
        "model check {label}: {states} states, depth {depth} ({extent})"
    );
    if exhaustive {
        checker.assert_properties();
    } else {
        for name in names {
            checker.assert_no_discovery(name);
        }
    }
    (states, depth)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// States a bounded check generates (under a minute on 2 cores in a
    /// test build, with the optimized profile of the workspace manifest).
    const BOUND: usize = 3_000_000;

    fn model(strategy: Strategy, crashes: u8) -> MigrationModel {
        MigrationModel {
            strategy,
            input: 1,
            crashes,
            async_digest: false,
        }
    }

    /// Bounded since the digest point: exhaustive, it is 4,884,259 states
    /// at depth 44 (about two minutes in a test build on 2 cores).
    #[test]
    fn model_check_ms2m_without_faults() {
        check(model(Strategy::Ms2m, 0), Some(BOUND));
    }

    #[test]
    fn model_check_ms2m_with_a_fault_anywhere() {
        check(model(Strategy::Ms2m, 1), Some(BOUND));
    }

    /// The source's digest point completing at any step, a `Stop` or a
    /// rollback included (bounded: the extra interleavings multiply the
    /// states by about ten).
    #[test]
    fn model_check_ms2m_with_the_digest_point_at_any_step() {
        let model = MigrationModel {
            async_digest: true,
            ..model(Strategy::Ms2m, 0)
        };
        check(model, Some(BOUND));
    }

    /// The target keeps a standby's state, as far along as a standby gets
    /// (the owner's committed position): no checkpoint, no upload.
    #[test]
    fn model_check_ms2m_from_standby_with_a_fault_anywhere() {
        check(model(Strategy::Ms2mFromStandby, 1), Some(BOUND));
    }

    #[test]
    fn model_check_stop_and_copy_with_a_fault_anywhere() {
        check(model(Strategy::StopAndCopy, 1), Some(BOUND));
    }

    #[test]
    fn model_check_cold_start_with_a_fault_anywhere() {
        check(model(Strategy::ColdStart, 1), None);
    }

    /// Exhaustive runs with more input and faults (release build; minutes
    /// to hours on 2 cores). `MS2M_MODEL_INPUT` / `MS2M_MODEL_FAULTS`
    /// override the defaults (2 and 1).
    #[test]
    #[ignore = "deep model check, minutes: cargo test -p ms2m-core --release --lib model_check_deep -- --ignored"]
    fn model_check_deep() {
        let env = |name: &str, default: u64| std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default);
        for strategy in [
            Strategy::ColdStart,
            Strategy::StopAndCopy,
            Strategy::Ms2m,
            Strategy::Ms2mFromStandby,
        ] {
            check(
                MigrationModel {
                    strategy,
                    input: env("MS2M_MODEL_INPUT", 2),
                    crashes: env("MS2M_MODEL_FAULTS", 1) as u8,
                    async_digest: true,
                },
                None,
            );
        }
    }
}
