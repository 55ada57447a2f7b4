//! Model checking of owner leases, claims and standby takeovers with
//! `stateright`.
//!
//! Why: the lease's safety argument (the [`owner`](super::protocol::owner)
//! module docs) is a timing argument over three pieces of code that run on
//! different nodes, read the channel at different times and publish records
//! that land later. This model composes the *real* [`LeaseKeeper`],
//! [`LeaseWatch`] and [`Decisions`] (no rule is re-implemented here) with a
//! global clock, a lagging channel and crashes, and checks the argument's
//! conclusion on every interleaving up to a horizon. The limits: whole
//! seconds up to that horizon (the tests' 3 s equal the timeout, so a
//! takeover happens at the last instant and nothing after it is explored;
//! the deep run takes the horizon as a parameter: 4 s, without crashes,
//! explores the new owner's renewals and the deposed owner's records
//! landing after the claim), no clock drift, `a` always the first owner
//! (by symmetry), and a bounded search with a crash in the default test.
//!
//! # What is modelled
//!
//! * Three nodes, `a`, `b` and `c`, none owning the service at first. Every
//!   node folds the channel into its own [`Decisions`] and [`LeaseWatch`]
//!   (as the node's channel view does, across roles); it is a standby until
//!   its view names it the owner, then it also keeps a [`LeaseKeeper`]
//!   (`granted_at`: the clock reading taken just before it published its
//!   claim, if folding that claim made it the owner, as `Node::claim`
//!   decides; none when the view names it for another reason, as after a
//!   restart); a keeper that is fenced is dropped, and the node is a
//!   standby again. Each keeper marks its renewals with an incarnation of
//!   its own (the crash count plus one here, random in the real node).
//! * Time: one discrete global clock, whole seconds, advanced by `Tick` up
//!   to a horizon. Every node reads it exactly (ρ = 0, `max_drift_ppm` 0):
//!   clock drift is *not* modelled.
//! * The control channel: the records that landed, in order. Every node
//!   reads it through its own cursor, lagging arbitrarily; a node's publish
//!   (a claim, a renewal) is in flight until it lands, at any later step, in
//!   order per node. A standby publishes a claim when `claim_due` says so and
//!   then claims nothing until it reads that claim back (the node waits for
//!   its own record); an owner publishes a renewal when `renewal_due` says
//!   so.
//! * Outputs: an owner whose keeper allows it (`may_emit(now)`) may emit an
//!   output; it is in flight until it lands, which must happen within
//!   `output_delay` of the check (no `Tick` moves the clock past the
//!   deadline of an output in flight): the default is the keeper's `margin`,
//!   the bound the lease is built on. When it lands, the channel's owner at
//!   that instant (every landed record, folded) must be its emitter.
//! * Crashes, up to a budget: the node loses its machines and its view,
//!   and restarts at once, reading the channel from the start; like the
//!   real node, it first reads the history as it stood at the restart, and
//!   only then claims, or keeps a lease (with `granted_at` none) when that
//!   history names it. What the dead incarnation had in flight may still
//!   land, in its own order, or never: see `orphans_land`. An output in
//!   flight still lands by its deadline.
//! * Pauses (a process stopped, a slow reader, a partition delaying a
//!   publish) need no fault of their own: a node may take no step while the
//!   clock ticks, and a record may stay in flight.
//!
//! # Properties
//!
//! * always *outputs land only while the log names their emitter*;
//! * always *at most one node may emit at any time*: no two keepers with
//!   `may_emit(now)` at the same clock reading;
//! * always *winning claim epochs increase*: the owners the channel names,
//!   in order, have strictly increasing epochs;
//! * sometimes *a standby takes over an expired lease*: the channel's owner
//!   moves from one node to another;
//! * sometimes *standbys race for one term and exactly one wins*: two
//!   nodes' claims name the same expired lease, and exactly one of them won.
//!
//! Negative controls, each of which must find a violation: outputs that
//! land later than the margin; keepers that do not tell their renewals from
//! their dead process's (one incarnation for all); a node that dates its
//! lease from a claim that lost. The last two are the bugs this model found
//! in the node and the keeper.
//!
//! # Reductions
//!
//! * A node reads a record at once when reading it changes nothing of its
//!   state but the cursor (a losing claim of another node, a duplicate
//!   renewal): such a read depends on no clock, so reading it later reaches
//!   nothing new.
//! * At most one output per node is in flight: every output is judged
//!   alone, by when it was emitted and when it landed, and one in flight
//!   can be emitted at any step the keeper allows.
//! * An output that lands correctly leaves no trace; the first that lands
//!   while the channel names another owner is kept for the property.
//!
//! # Not modelled
//!
//! * Clock drift (ρ = 0 above): the `(1−ρ)/(1+ρ)` factor of the validity
//!   is not exercised.
//! * Renewals published while a node recovers (`Node::renew_while_recovering`)
//!   carry incarnation 0, which no keeper counts; they only keep standbys
//!   waiting, as a renewal in flight here does.
//! * Recovery takes no time here.
//! * Migrations (`Takeover`, `Resume`, ...): [`model`](super::model) checks
//!   those; the lease records are the only records here.
//! * A pause between the lease check and the send longer than the margin:
//!   the output deadline rules it out, as the lease's argument assumes
//!   (the sink's producer fencing covers it in the real system).

use std::collections::VecDeque;
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::time::Duration;

use stateright::{Checker, Expectation, Model, Property};

use super::model::check_model;
use super::protocol::owner::{LeaseConfig, LeaseKeeper, LeaseWatch};
use super::protocol::Decisions;
use crate::control::{ControlBody, ControlMessage, LeaseTerm, Role};

const SERVICE: &str = "model";
const NODES: [&str; 3] = ["a", "b", "c"];

/// A reading of the global clock.
fn clock(t: u64) -> Duration {
    Duration::from_secs(t)
}

/// A record on the channel, or on its way there, with the incarnation of
/// the node that sent it (a node knows its own record by more than its
/// body, as the real node compares the whole message).
#[derive(Clone, Debug)]
struct Rec {
    message: Arc<ControlMessage>,
    sender: usize,
    life: u8,
    key: u64,
}

impl Rec {
    fn new(sender: usize, life: u8, body: ControlBody) -> Self {
        let message = ControlMessage {
            service: SERVICE.into(),
            migration_id: String::new(),
            from: Role::Node,
            sent_at_ms: 0,
            body,
        };
        let key = xxhash_rust::xxh3::xxh3_64(&message.to_bytes());
        Self {
            message: Arc::new(message),
            sender,
            life,
            key,
        }
    }
}

impl PartialEq for Rec {
    fn eq(&self, other: &Self) -> bool {
        (self.key, self.sender, self.life) == (other.key, other.sender, other.life) && self.message == other.message
    }
}

impl Eq for Rec {}

impl Hash for Rec {
    fn hash<H: Hasher>(&self, h: &mut H) {
        (self.key, self.sender, self.life).hash(h);
    }
}

/// A claim published and not read back yet, and the clock reading taken
/// before publishing it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct SentClaim {
    record: Rec,
    at: u64,
}

/// One node (one incarnation at a time).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Node {
    /// Bumped by every crash.
    life: u8,
    /// The next record to read.
    cursor: usize,
    decisions: Decisions,
    watch: LeaseWatch,
    keeper: Option<LeaseKeeper>,
    claim: Option<SentClaim>,
    /// Published, not landed yet.
    outbox: VecDeque<Rec>,
    /// What a crashed incarnation left in flight.
    orphans: VecDeque<Rec>,
    /// The latest instant its last output may land, while it still may.
    output: Option<u64>,
}

impl Node {
    fn new(i: usize, config: LeaseConfig) -> Self {
        Self {
            life: 0,
            cursor: 0,
            decisions: Decisions::default(),
            watch: LeaseWatch::new(NODES[i], config),
            keeper: None,
            claim: None,
            outbox: VecDeque::new(),
            orphans: VecDeque::new(),
            output: None,
        }
    }

    fn named_owner(&self, i: usize) -> bool {
        self.decisions.owner().is_some_and(|o| o.instance_id == NODES[i])
    }

    fn may_emit(&self, t: u64) -> bool {
        self.keeper.as_ref().is_some_and(|k| k.may_emit(clock(t)))
    }

    fn is_standby(&self) -> bool {
        self.keeper.is_none() && self.claim.is_none()
    }
}

/// What the channel showed so far (a function of the log, kept to make the
/// properties cheap; it tells no two states apart that the log does not).
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
struct ChannelFacts {
    /// The owner moved from one node to another.
    took_over: bool,
    /// An owner followed one of an equal or higher epoch.
    epoch_regressed: bool,
    /// Two nodes claimed against one lease and exactly one of them won.
    raced: bool,
}

/// The whole system.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(super) struct World {
    t: u64,
    log: Vec<Rec>,
    /// The log folded: what the channel names now.
    channel: Decisions,
    facts: ChannelFacts,
    nodes: [Node; 3],
    crashes_left: u8,
}

/// One step of one party.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(super) enum Step {
    /// The clock advances one second.
    Tick,
    /// The node reads its next record.
    Read(usize),
    /// The node publishes the claim its watch says is due.
    Claim(usize),
    /// The node publishes the renewal its keeper says is due.
    Renew(usize),
    /// The node's oldest record in flight lands.
    Land(usize),
    /// The oldest record the node's dead incarnation left in flight lands.
    LandOrphan(usize),
    /// The node crashes and starts again, reading the channel's history.
    Crash(usize),
}

/// The model: three nodes keeping and taking over one service's lease.
#[derive(Clone, Debug)]
pub(super) struct LeaseModel {
    pub(super) config: LeaseConfig,
    /// The longest time from an owner's lease check to its output landing.
    pub(super) output_delay: u64,
    /// The clock stops here.
    pub(super) horizon: u64,
    pub(super) crashes: u8,
    /// Whether records a crashed incarnation had in flight may still land.
    pub(super) orphans_land: bool,
    /// Whether each keeper marks its renewals with an incarnation of its
    /// own, as the real keeper does; `false` (every keeper marks them 1)
    /// is a negative control: a restarted owner then counts the renewals
    /// its dead process left in flight as its own.
    pub(super) distinct_incarnations: bool,
    /// Whether a node dates its lease from its own claim only when that
    /// claim won, as `Node::claim` does; `false` is a negative control: a
    /// restarted node whose claim lost to the one its dead process left in
    /// flight dates the lease from its own, later claim.
    pub(super) only_won_claims_grant: bool,
}

impl LeaseModel {
    fn init(&self) -> World {
        World {
            t: 0,
            log: Vec::new(),
            channel: Decisions::default(),
            facts: ChannelFacts::default(),
            nodes: std::array::from_fn(|i| Node::new(i, self.config)),
            crashes_left: self.crashes,
        }
    }

    fn node_steps(&self, w: &World, i: usize, steps: &mut Vec<Step>) {
        let node = &w.nodes[i];
        if node.cursor < w.log.len() {
            steps.push(Step::Read(i));
        }
        if self.claim_due(w, i).is_some() {
            steps.push(Step::Claim(i));
        }
        if self.renewal_due(w, i).is_some() {
            steps.push(Step::Renew(i));
        }
        // By symmetry, the first record to land is `a`'s.
        let may_land = i == 0 || !w.log.is_empty();
        if may_land && !node.outbox.is_empty() {
            steps.push(Step::Land(i));
        }
        if may_land && !node.orphans.is_empty() {
            steps.push(Step::LandOrphan(i));
        }
        if w.crashes_left > 0 && self.crash_matters(node) {
            steps.push(Step::Crash(i));
        }
    }

    /// Whether a crash of `node` may reach anything a pause cannot: it
    /// forgets a lease, or leaves records in flight that may still land.
    fn crash_matters(&self, node: &Node) -> bool {
        node.keeper.is_some() || (self.orphans_land && !node.outbox.is_empty())
    }

    /// The claim node `i` would publish now (on a probe: asking changes
    /// nothing the model keeps when the answer is no).
    fn claim_due(&self, w: &World, i: usize) -> Option<(LeaseWatch, ControlBody)> {
        let node = &w.nodes[i];
        if !node.is_standby() {
            return None;
        }
        let mut watch = node.watch.clone();
        let body = watch.claim_due(clock(w.t), &node.decisions)?;
        // By symmetry `a`'s first claim lands first: another node's would
        // lose (see the reductions).
        let first_claim = matches!(body, ControlBody::Claim { expired: None, .. });
        (i == 0 || !first_claim).then_some((watch, body))
    }

    /// The renewal node `i`'s keeper would publish now.
    fn renewal_due(&self, w: &World, i: usize) -> Option<(LeaseKeeper, ControlBody)> {
        let node = &w.nodes[i];
        let mut keeper = node.keeper.clone()?;
        let body = keeper.renewal_due(clock(w.t), &node.decisions)?;
        Some((keeper, body))
    }

    fn step(&self, w: &mut World, step: Step) {
        match step {
            Step::Tick => tick(w),
            Step::Read(i) => self.read(w, i),
            Step::Claim(i) => self.claim(w, i),
            Step::Renew(i) => self.renew(w, i),
            Step::Land(i) => {
                if let Some(record) = w.nodes[i].outbox.pop_front() {
                    land(w, record);
                }
            }
            Step::LandOrphan(i) => {
                if let Some(record) = w.nodes[i].orphans.pop_front() {
                    land(w, record);
                }
            }
            Step::Crash(i) => self.crash(w, i),
        }
    }

    /// Node `i` reads its next record, as the node's view and its owner's
    /// agent do: the decisions fold it, the keeper (if any) checks for a
    /// fence and a renewal read back, the watch notes the lease.
    fn read(&self, w: &mut World, i: usize) {
        let t = w.t;
        let node = &mut w.nodes[i];
        let Some(record) = w.log.get(node.cursor).cloned() else {
            return;
        };
        node.cursor += 1;
        let owner_before = node.decisions.owner().cloned();
        node.decisions.observe(&record.message);
        let set_owner = node.decisions.owner() != owner_before.as_ref();
        if let Some(keeper) = node.keeper.as_mut() {
            if keeper.on_record(&record.message, &node.decisions).is_some() {
                node.keeper = None;
            }
        }
        // Its own claim read back: the lease dates from its sending only if
        // it won (`Node::claim`).
        let read_back = node.claim.take_if(|c| c.record == record);
        let granted_at = read_back
            .filter(|_| set_owner || !self.only_won_claims_grant)
            .map(|c| c.at);
        self.own_if_named(node, i, granted_at);
        self.watch(node, i, t);
    }

    /// A node whose view names it the owner (and that is not waiting for
    /// its own claim) keeps a lease from then on.
    fn own_if_named(&self, node: &mut Node, i: usize, granted_at: Option<u64>) {
        if node.keeper.is_none() && node.claim.is_none() && node.named_owner(i) {
            let keeper = LeaseKeeper::new(NODES[i], self.config, granted_at.map(clock));
            let incarnation = if self.distinct_incarnations {
                u64::from(node.life) + 1
            } else {
                1
            };
            node.keeper = Some(keeper.with_incarnation(incarnation));
        }
    }

    /// The watch notes the lease the node read; an owner's watch is kept
    /// blank (see the reductions in the module docs).
    fn watch(&self, node: &mut Node, i: usize, t: u64) {
        if node.keeper.is_some() {
            node.watch = LeaseWatch::new(NODES[i], self.config);
        } else {
            node.watch.observe(clock(t), &node.decisions);
        }
    }

    fn claim(&self, w: &mut World, i: usize) {
        let Some((watch, body)) = self.claim_due(w, i) else {
            return;
        };
        let node = &mut w.nodes[i];
        let record = Rec::new(i, node.life, body);
        node.watch = watch;
        node.claim = Some(SentClaim {
            record: record.clone(),
            at: w.t,
        });
        node.outbox.push_back(record);
    }

    fn renew(&self, w: &mut World, i: usize) {
        let Some((keeper, body)) = self.renewal_due(w, i) else {
            return;
        };
        let node = &mut w.nodes[i];
        node.keeper = Some(keeper);
        node.outbox.push_back(Rec::new(i, node.life, body));
    }

    /// Node `i` dies with everything in memory (what it had in flight
    /// becomes the dead incarnation's; its output still lands) and starts
    /// again like `ChannelView::start`: it folds the whole history at once,
    /// then keeps a lease (granted at no known time) if the history names
    /// it, or stands by.
    fn crash(&self, w: &mut World, i: usize) {
        w.crashes_left -= 1;
        let old = &w.nodes[i];
        let mut orphans = old.orphans.clone();
        if self.orphans_land {
            orphans.extend(old.outbox.iter().cloned());
        }
        let mut node = Node {
            life: old.life + 1,
            cursor: w.log.len(),
            decisions: w.channel.clone(),
            orphans,
            output: old.output,
            ..Node::new(i, self.config)
        };
        self.own_if_named(&mut node, i, None);
        self.watch(&mut node, i, w.t);
        w.nodes[i] = node;
    }
}

/// The clock advances; outputs past their deadline have landed.
fn tick(w: &mut World) {
    w.t += 1;
    for node in &mut w.nodes {
        node.output = node.output.filter(|deadline| *deadline >= w.t);
    }
}

/// Every owner whose lease allows it emits now; its output may land at any
/// instant until `t + delay`.
fn emit_where_allowed(w: &mut World, delay: u64) {
    for node in &mut w.nodes {
        if node.may_emit(w.t) {
            node.output = Some(w.t + delay);
        }
    }
}

/// A node whose output may land now while the channel names another owner.
fn misdirected_output(w: &World) -> Option<usize> {
    let owner = w.channel.owner();
    let named = |i: usize| owner.is_some_and(|o| o.instance_id == NODES[i]);
    (0..NODES.len()).find(|&i| w.nodes[i].output.is_some() && !named(i))
}

/// `record` lands on the channel.
fn land(w: &mut World, record: Rec) {
    let before = w.channel.owner().cloned();
    w.channel.observe(&record.message);
    let is_claim = matches!(record.message.body, ControlBody::Claim { .. });
    w.log.push(record);
    if let (Some(old), Some(new)) = (before.as_ref(), w.channel.owner()) {
        if old != new {
            w.facts.took_over |= old.instance_id != new.instance_id;
            w.facts.epoch_regressed |= old.epoch >= new.epoch;
        }
    }
    if is_claim {
        w.facts.raced = raced_and_one_won(&w.log);
    }
}

/// Reads every record whose read would change nothing of a node's state
/// but its cursor (see the module docs).
fn skip_silent_reads(w: &mut World) {
    for node in &mut w.nodes {
        while let Some(record) = w.log.get(node.cursor) {
            if !read_is_silent(node, record) {
                break;
            }
            node.cursor += 1;
        }
    }
}

fn read_is_silent(node: &Node, record: &Rec) -> bool {
    if node.claim.as_ref().is_some_and(|c| c.record == *record) {
        // Reading one's own claim ends the wait for it.
        return false;
    }
    let mut decisions = node.decisions.clone();
    decisions.observe(&record.message);
    if decisions != node.decisions {
        return false;
    }
    let mut keeper = node.keeper.clone();
    if let Some(k) = keeper.as_mut() {
        k.on_record(&record.message, &decisions);
    }
    keeper == node.keeper
}

/// Every takeover claim on the channel: the lease it names, its claimant,
/// and whether it won.
fn takeover_claims(log: &[Rec]) -> Vec<(LeaseTerm, usize, bool)> {
    let mut decisions = Decisions::default();
    let mut claims = Vec::new();
    for record in log {
        let before = decisions.owner().cloned();
        decisions.observe(&record.message);
        if let ControlBody::Claim {
            expired: Some(term), ..
        } = record.message.body
        {
            let won = decisions.owner() != before.as_ref();
            claims.push((term, record.sender, won));
        }
    }
    claims
}

/// Two nodes claimed against the same lease and exactly one of them won.
fn raced_and_one_won(log: &[Rec]) -> bool {
    let claims = takeover_claims(log);
    claims.iter().any(|(term, claimant, _)| {
        let rivals: Vec<_> = claims.iter().filter(|(t, _, _)| t == term).collect();
        let wins = rivals.iter().filter(|(_, _, won)| *won).count();
        rivals.iter().any(|(_, other, _)| other != claimant) && wins == 1
    })
}

fn at_most_one_emitter(w: &World) -> bool {
    w.nodes.iter().filter(|n| n.may_emit(w.t)).count() <= 1
}

impl Model for LeaseModel {
    type State = World;
    type Action = Step;

    fn init_states(&self) -> Vec<World> {
        vec![self.init()]
    }

    fn actions(&self, w: &World, steps: &mut Vec<Step>) {
        if w.t < self.horizon {
            steps.push(Step::Tick);
        }
        for i in 0..NODES.len() {
            self.node_steps(w, i, steps);
        }
    }

    fn next_state(&self, w: &World, step: Step) -> Option<World> {
        let mut next = w.clone();
        self.step(&mut next, step);
        skip_silent_reads(&mut next);
        emit_where_allowed(&mut next, self.output_delay);
        Some(next)
    }

    fn properties(&self) -> Vec<Property<Self>> {
        vec![
            Property::always("outputs land only while the log names their emitter", |_, w: &World| {
                misdirected_output(w).is_none()
            }),
            Property::always("at most one node may emit at any time", |_, w: &World| {
                at_most_one_emitter(w)
            }),
            Property::always("winning claim epochs increase", |_, w: &World| !w.facts.epoch_regressed),
            Property::sometimes("a standby takes over an expired lease", |_, w: &World| {
                w.facts.took_over
            }),
            Property::sometimes("standbys race for one term and exactly one wins", |_, w: &World| {
                w.facts.raced
            }),
        ]
    }
}

/// The first failure the checker finds in `model`, depth first, with the
/// path that reaches it.
#[cfg(test)]
fn first_violation(model: LeaseModel) -> Option<(&'static str, Vec<Step>)> {
    let names: Vec<_> = model
        .properties()
        .into_iter()
        .filter(|p| p.expectation == Expectation::Always)
        .map(|p| p.name)
        .collect();
    let checker = model
        .checker()
        .threads(2)
        .finish_when(stateright::HasDiscoveries::AnyFailures)
        .spawn_dfs()
        .join();
    names
        .into_iter()
        .find_map(|name| Some((name, checker.discovery(name)?.into_actions())))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// States a bounded check generates (well under a minute on 2 cores in
    /// a test build, with the optimized profile of the workspace manifest).
    const BOUND: usize = 3_000_000;

    /// Renew every second, expire after three, one second of margin.
    fn config() -> LeaseConfig {
        LeaseConfig {
            interval: clock(1),
            timeout: clock(3),
            max_drift_ppm: 0,
            margin: clock(1),
        }
    }

    /// Three seconds: enough for a lease to expire once.
    fn model(crashes: u8) -> LeaseModel {
        let config = config();
        LeaseModel {
            config,
            output_delay: config.margin.as_secs(),
            horizon: 3,
            crashes,
            orphans_land: true,
            distinct_incarnations: true,
            only_won_claims_grant: true,
        }
    }

    #[test]
    fn the_model_config_is_valid() {
        assert_eq!(config().validate(), Ok(()));
    }

    #[test]
    fn lease_model_check_without_crashes() {
        check_model("leases (3 nodes, 3 s, no crash)", model(0), None);
    }

    /// Bounded (it reaches depth 24 of 41): exhaustive, it is 7,383,513
    /// states (about a minute and a half in a release build on 2 cores;
    /// `lease_model_check_deep` runs it).
    #[test]
    fn lease_model_check_with_a_crash() {
        check_model("leases (3 nodes, 3 s, 1 crash)", model(1), Some(BOUND));
    }

    /// The checker is not blind: outputs allowed to land later than the
    /// margin the lease allows for reach the new owner's term.
    #[test]
    fn negative_control_outputs_later_than_the_margin_are_caught() {
        let model = LeaseModel {
            output_delay: config().margin.as_secs() + 1,
            ..model(0)
        };
        let (name, path) = first_violation(model).expect("a late output lands in another owner's term");
        assert!(name.starts_with("outputs land only"), "{name}: {path:?}");
    }

    /// A restarted owner whose renewals look like its dead process's
    /// counts one of those (sent earlier, read earlier by the standbys) as
    /// its own, and emits after a standby may claim.
    #[test]
    fn negative_control_renewals_without_incarnations_are_caught() {
        let model = LeaseModel {
            distinct_incarnations: false,
            ..model(1)
        };
        let (name, path) = first_violation(model).expect("the restarted owner overstays its lease");
        assert!(path.iter().any(|s| matches!(s, Step::Crash(_))), "{name}: {path:?}");
    }

    /// A restarted node that takes its claim read back for a win, when the
    /// claim its dead process left in flight won first, dates its lease
    /// too late.
    #[test]
    fn negative_control_claims_that_lost_but_name_the_node_are_caught() {
        let model = LeaseModel {
            only_won_claims_grant: false,
            ..model(1)
        };
        let (name, path) = first_violation(model).expect("the restarted owner overstays its lease");
        assert!(path.iter().any(|s| matches!(s, Step::Crash(_))), "{name}: {path:?}");
    }

    /// Exhaustive runs, longer and with more crashes (release build;
    /// minutes to hours on 2 cores). `MS2M_LEASE_HORIZON` (seconds) and
    /// `MS2M_LEASE_CRASHES` override the defaults (3 and 1).
    #[test]
    #[ignore = "deep model check, minutes: cargo test -p ms2m-core --release --lib lease_model_check_deep -- --ignored"]
    fn lease_model_check_deep() {
        let env = |name: &str, default: u64| std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default);
        let model = LeaseModel {
            horizon: env("MS2M_LEASE_HORIZON", 3),
            ..model(env("MS2M_LEASE_CRASHES", 1) as u8)
        };
        let label = format!("leases (3 nodes, {} s, {} crashes)", model.horizon, model.crashes);
        check_model(&label, model, None);
    }
}
