//! The migration protocol without I/O: each role is a state type plus a
//! transition function `handle(&mut self, event) -> Vec<Action>`. No
//! sockets, no clock reads, no tokio: time arrives as an event (or as the
//! `now` argument of the coordinator), and every effect is an action for the
//! async driver around it ([`super::Coordinator`], [`super::SourceAgent`],
//! [`super::run_target`]) to perform over the backend traits. The model
//! checker in this crate's tests drives these same functions.
//!
//! # The decision rule
//!
//! A migration is decided by the first *decisive* record of it on the
//! control channel, which is a single, totally ordered partition:
//!
//! * the target's `Takeover` (or its `Live`, which follows a `Takeover`)
//!   decides [`MigrationOutcome::TakenOver`]: the target owns the service;
//! * the coordinator's `Resume` or `Aborted` decides
//!   [`MigrationOutcome::RolledBack`]: the source keeps it.
//!
//! Records of a migration after its decision never change it. The owner is
//! the one the latest `Takeover` named; a rollback's `Resume` re-confirms
//! the owner it names but never moves ownership. Every party
//! folds the channel through one [`Decisions`] value, so the target, the
//! source, a running or restarted coordinator and
//! [`current_owner`](super::current_owner) always agree, with no timing
//! assumption.

pub mod coordinator;
pub mod owner;
pub mod source;
pub mod target;

use std::collections::{BTreeMap, BTreeSet};
use std::hash::{Hash, Hasher};

use super::{MigrationError, MigrationOutcome, Owner};
use crate::control::{ControlBody, ControlMessage, LeaseTerm, Role};
use crate::digest::StateDigest;

/// The decisions found so far on the control channel, folded in channel order.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct Decisions {
    decided: BTreeMap<String, MigrationOutcome>,
    owner: Option<Owner>,
    /// The current owner's latest renewal in its epoch (0: none since the
    /// record that made it the owner).
    renewal: u64,
    /// Migrations prepared and not yet decided: a decisive claim rolls
    /// them back.
    open: BTreeSet<String>,
    /// Input records an operator allowed to skip when bad.
    skips: BTreeSet<(String, i32, i64)>,
}

/// What one record means for a migration's decision.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Observed {
    /// The migration is not decided (the record is not decisive for it).
    Open,
    /// This record decides the migration.
    Decides(MigrationOutcome),
    /// The migration was decided by an earlier record; this one changes nothing.
    AfterDecision(MigrationOutcome),
}

impl Decisions {
    /// The decisions of a whole history (in channel order).
    pub fn from_history<'a>(history: impl IntoIterator<Item = &'a ControlMessage>) -> Self {
        let mut decisions = Self::default();
        for m in history {
            decisions.observe(m);
        }
        decisions
    }

    /// Folds the next record of the channel in; says what it means for the
    /// record's own migration.
    pub fn observe(&mut self, m: &ControlMessage) -> Observed {
        let id = m.migration_id.clone();
        self.observe_for(m, &id)
    }

    /// Folds the next record of the channel in; says what it means for
    /// `migration`, which a record of another migration decides too when it
    /// is a decisive ownership claim (it rolls back every open migration).
    pub fn observe_for(&mut self, m: &ControlMessage, migration: &str) -> Observed {
        let before = self.outcome(migration);
        self.fold(m);
        match (before, self.outcome(migration)) {
            (Some(outcome), _) => Observed::AfterDecision(outcome),
            (None, Some(outcome)) => Observed::Decides(outcome),
            (None, None) => Observed::Open,
        }
    }

    fn fold(&mut self, m: &ControlMessage) {
        if let Some(lease) = owner::lease_record(m) {
            self.fold_lease_record(lease);
            return;
        }
        if let (
            ControlBody::SkipInput {
                topic,
                partition,
                offset,
                ..
            },
            Role::Operator,
        ) = (&m.body, m.from)
        {
            self.skips.insert((topic.clone(), *partition, *offset));
            return;
        }
        if self.decided.contains_key(&m.migration_id) {
            return;
        }
        if matches!((&m.body, m.from), (ControlBody::Prepare { .. }, Role::Coordinator)) {
            self.open.insert(m.migration_id.clone());
        }
        let Some((outcome, owner)) = decision(m) else {
            return;
        };
        self.open.remove(&m.migration_id);
        self.decided.insert(m.migration_id.clone(), outcome);
        match (outcome, owner) {
            (MigrationOutcome::TakenOver, Some(owner)) => self.set_owner(owner),
            // A rollback re-confirms the owner it names; it never moves
            // ownership: a late `Resume` of a superseded migration must not
            // hand the service back to a source another migration released.
            (MigrationOutcome::RolledBack, Some(owner))
                if self.owner.as_ref().is_none_or(|o| o.instance_id == owner.instance_id) =>
            {
                self.set_owner(owner)
            }
            _ => {}
        }
    }

    fn fold_lease_record(&mut self, record: owner::LeaseRecord<'_>) {
        match record {
            owner::LeaseRecord::Renew {
                owner, epoch, renewal, ..
            } => {
                if self
                    .owner
                    .as_ref()
                    .is_some_and(|o| o.instance_id == owner && o.epoch == epoch)
                {
                    self.renewal = self.renewal.max(renewal);
                }
            }
            owner::LeaseRecord::Claim { owner, epoch, expired } => {
                if self.claim_wins(epoch, expired) {
                    for id in std::mem::take(&mut self.open) {
                        self.decided.insert(id, MigrationOutcome::RolledBack);
                    }
                    self.set_owner(Owner {
                        instance_id: owner.to_string(),
                        epoch,
                    });
                }
            }
        }
    }

    /// The first-writer-wins rule of claims: a first claim wins while no
    /// one owns the service; a takeover claim wins when the lease it saw
    /// expire is still the current one, and its epoch is higher.
    fn claim_wins(&self, epoch: u64, expired: Option<LeaseTerm>) -> bool {
        match (&self.owner, expired) {
            (None, None) => true,
            (Some(o), Some(term)) => Some(term) == self.lease() && epoch > o.epoch,
            _ => false,
        }
    }

    fn set_owner(&mut self, owner: Owner) {
        if self.owner.as_ref() != Some(&owner) {
            self.renewal = 0;
        }
        self.owner = Some(owner);
    }

    /// The input records (`topic`, `partition`, `offset`) operators allowed
    /// to skip when bad (`ControlBody::SkipInput`).
    pub fn skipped_inputs(&self) -> &BTreeSet<(String, i32, i64)> {
        &self.skips
    }

    /// How `migration_id` was decided, if it was.
    pub fn outcome(&self, migration_id: &str) -> Option<MigrationOutcome> {
        self.decided.get(migration_id).copied()
    }

    /// The owner named by the latest decision that named one.
    pub fn owner(&self) -> Option<&Owner> {
        self.owner.as_ref()
    }

    /// The current owner's lease: its epoch and latest renewal.
    pub fn lease(&self) -> Option<LeaseTerm> {
        self.owner.as_ref().map(|o| LeaseTerm {
            epoch: o.epoch,
            renewal: self.renewal,
        })
    }

    /// Whether `migration_id` is decided.
    pub fn is_decided(&self, migration_id: &str) -> bool {
        self.decided.contains_key(migration_id)
    }

    /// Migrations prepared on the channel and not decided yet.
    pub fn undecided(&self) -> impl Iterator<Item = &str> {
        self.open.iter().map(String::as_str)
    }
}

/// Whether `m` decides its migration, and the owner it names (an `Aborted`
/// leaves the owner unchanged).
fn decision(m: &ControlMessage) -> Option<(MigrationOutcome, Option<Owner>)> {
    let owner = |instance_id: &String, epoch: &u64| {
        Some(Owner {
            instance_id: instance_id.clone(),
            epoch: *epoch,
        })
    };
    match (&m.body, m.from) {
        (ControlBody::Takeover { owner: o, epoch, .. } | ControlBody::Live { owner: o, epoch, .. }, Role::Target) => {
            Some((MigrationOutcome::TakenOver, owner(o, epoch)))
        }
        (ControlBody::Resume { owner: o, epoch }, Role::Coordinator) => {
            Some((MigrationOutcome::RolledBack, owner(o, epoch)))
        }
        (ControlBody::Aborted { .. }, Role::Coordinator) => Some((MigrationOutcome::RolledBack, None)),
        _ => None,
    }
}

/// A measurement carried beside protocol state (durations, sizes, rates):
/// it never influences a transition, so it takes no part in equality or
/// hashing, and the model checker does not tell states apart by it.
#[derive(Clone, Debug, Default)]
pub struct Measured<T>(pub T);

impl<T> PartialEq for Measured<T> {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl<T> Eq for Measured<T> {}

impl<T> Hash for Measured<T> {
    fn hash<H: Hasher>(&self, _: &mut H) {}
}

/// Why a role gave up on a migration: a [`MigrationError`] that can be
/// compared and kept in protocol state.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum MigrationFailure {
    /// See [`MigrationError::DigestMismatch`] (source, target).
    DigestMismatch(StateDigest, StateDigest),
    /// See [`MigrationError::Timeout`].
    Timeout(&'static str),
    /// See [`MigrationError::TakenOverNotLive`].
    TakenOverNotLive(String),
    /// See [`MigrationError::Aborted`].
    Aborted(String),
}

impl From<MigrationFailure> for MigrationError {
    fn from(f: MigrationFailure) -> Self {
        match f {
            MigrationFailure::DigestMismatch(source_digest, target_digest) => MigrationError::DigestMismatch {
                source_digest,
                target_digest,
            },
            MigrationFailure::Timeout(waiting_for) => MigrationError::Timeout { waiting_for },
            MigrationFailure::TakenOverNotLive(target) => MigrationError::TakenOverNotLive { target },
            MigrationFailure::Aborted(reason) => MigrationError::Aborted { reason },
        }
    }
}

impl std::fmt::Display for MigrationFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(&MigrationError::from(self.clone()), f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::position::Position;

    fn record(migration: &str, from: Role, body: ControlBody) -> ControlMessage {
        ControlMessage {
            service: "s".into(),
            migration_id: migration.into(),
            from,
            sent_at_ms: 0,
            body,
        }
    }

    /// Review finding: migration B superseded A and its target took over;
    /// A's coordinator then gave up and published `Resume` for the old
    /// source. That late rollback decides A, but must not name the released
    /// source as the owner again.
    #[test]
    fn a_late_resume_of_a_superseded_migration_does_not_move_ownership() {
        let takeover = ControlBody::Takeover {
            owner: "tgt".into(),
            epoch: 1,
            position: Default::default(),
        };
        let resume = ControlBody::Resume {
            owner: "src".into(),
            epoch: 2,
        };
        let history = [
            record("B", Role::Target, takeover),
            record("A", Role::Coordinator, resume),
        ];
        let decisions = Decisions::from_history(&history);
        assert_eq!(decisions.outcome("A"), Some(MigrationOutcome::RolledBack));
        assert_eq!(decisions.owner().map(|o| o.instance_id.as_str()), Some("tgt"));
    }

    #[test]
    fn a_resume_names_the_first_owner_and_reconfirms_the_current_one() {
        let resume = |epoch| ControlBody::Resume {
            owner: "src".into(),
            epoch,
        };
        let mut decisions = Decisions::default();
        decisions.observe(&record("A", Role::Coordinator, resume(2)));
        assert_eq!(
            decisions.owner().map(|o| (o.instance_id.as_str(), o.epoch)),
            Some(("src", 2))
        );
        decisions.observe(&record("B", Role::Coordinator, resume(3)));
        assert_eq!(
            decisions.owner().map(|o| (o.instance_id.as_str(), o.epoch)),
            Some(("src", 3))
        );
    }

    fn at(offset: i64) -> Position {
        let mut p = Position::new();
        p.set(crate::position::TopicPartition::new("in", 0), offset);
        p
    }

    fn prepare() -> ControlMessage {
        let body = ControlBody::Prepare {
            source: "src".into(),
            target: "tgt".into(),
            digest_policy: crate::migration::DigestPolicy::Abort,
            strategy: None,
        };
        record("m", Role::Coordinator, body)
    }

    fn restored() -> ControlMessage {
        let body = ControlBody::Restored {
            position: at(10),
            transfer_us: 0,
            restore_us: 0,
        };
        record("m", Role::Target, body)
    }

    /// The source holds its progress while it takes the digest point, and a
    /// digest that comes back after the stop changes nothing (`Stopped`
    /// then carries the digest at Pf).
    #[test]
    fn the_source_holds_progress_for_the_digest_point_and_digests_at_pf_if_stopped_first() {
        use source::{SourceAction, SourceEvent, SourceMachine};
        let mut source = SourceMachine::new("src", Decisions::default());
        source.handle(SourceEvent::Record(prepare()));
        assert_eq!(
            source.handle(SourceEvent::Record(restored())),
            vec![SourceAction::TakeDigest]
        );
        assert_eq!(source.handle(SourceEvent::ProgressDue), vec![]);
        let stop = record("m", Role::Coordinator, ControlBody::Stop { next_epoch: 1 });
        assert_eq!(
            source.handle(SourceEvent::Record(stop)),
            vec![SourceAction::CommitAndPublishStopped {
                migration: "m".into(),
                digest: true
            }]
        );
        let late = SourceEvent::DigestTaken {
            position: at(20),
            digest: StateDigest(1),
        };
        assert_eq!(source.handle(late), vec![]);
    }

    #[test]
    fn after_the_digest_point_the_source_stops_without_a_digest() {
        use source::{SourceAction, SourceEvent, SourceMachine};
        let mut source = SourceMachine::new("src", Decisions::default());
        source.handle(SourceEvent::Record(prepare()));
        source.handle(SourceEvent::Record(restored()));
        let taken = SourceEvent::DigestTaken {
            position: at(20),
            digest: StateDigest(1),
        };
        let actions = source.handle(taken);
        assert!(matches!(
            &actions[0],
            SourceAction::Publish {
                body: ControlBody::DigestAt {
                    digest: StateDigest(1),
                    ..
                },
                ..
            }
        ));
        let stop = record("m", Role::Coordinator, ControlBody::Stop { next_epoch: 1 });
        assert_eq!(
            source.handle(SourceEvent::Record(stop)),
            vec![SourceAction::CommitAndPublishStopped {
                migration: "m".into(),
                digest: false
            }]
        );
    }

    /// The target reads the input ahead of its restore only while the
    /// source serves (MS2M); after the source stopped (stop-and-copy) the
    /// transfer is the downtime and is left alone.
    #[test]
    fn the_target_reads_ahead_only_while_the_source_serves() {
        use target::{TargetAction, TargetEvent, TargetMachine};
        let restore = || record("m", Role::Coordinator, ControlBody::Restore { snapshot_id: Some(0) });
        let mut serving = TargetMachine::new("tgt", Decisions::default());
        serving.handle(TargetEvent::Record(prepare()));
        assert_eq!(
            serving.handle(TargetEvent::Record(restore())),
            vec![TargetAction::Restore {
                snapshot_id: Some(0),
                read_ahead: true
            }]
        );
        let mut stopped = TargetMachine::new("tgt", Decisions::default());
        stopped.handle(TargetEvent::Record(prepare()));
        let stop = ControlBody::Stopped {
            position: at(10),
            digest: None,
            longest_stall_us: 0,
        };
        stopped.handle(TargetEvent::Record(record("m", Role::Source, stop)));
        assert_eq!(
            stopped.handle(TargetEvent::Record(restore())),
            vec![TargetAction::Restore {
                snapshot_id: Some(0),
                read_ahead: false
            }]
        );
    }

    /// A coordinator that takes a migration over after a restart reads the
    /// strategy from the `Prepare` the first one published (MS2M when the
    /// record predates the field).
    #[test]
    fn a_recovering_coordinator_keeps_the_strategy_of_the_prepare() {
        use crate::migration::{MigrationConfig, MigrationPlan, Strategy};
        use coordinator::{CoordinatorAction, CoordinatorEvent, CoordinatorMachine};
        use std::time::Duration;
        for strategy in [
            Strategy::StopAndCopy,
            Strategy::Ms2mFromStandby,
            Strategy::Ms2mThreshold,
        ] {
            let plan = MigrationPlan {
                service: "s".into(),
                migration_id: "m".into(),
                source: "src".into(),
                target: "tgt".into(),
                strategy,
            };
            let mut first = CoordinatorMachine::new(plan, MigrationConfig::default(), 1);
            let history: Vec<ControlMessage> = first
                .handle(Duration::ZERO, CoordinatorEvent::Start)
                .into_iter()
                .filter_map(|a| match a {
                    CoordinatorAction::Publish(body) => Some(record("m", Role::Coordinator, body)),
                    _ => None,
                })
                .collect();
            let (recovered, _) =
                CoordinatorMachine::recover("s", "m", &history, MigrationConfig::default(), Duration::ZERO);
            assert_eq!(recovered.plan().strategy, strategy);
            assert_eq!(
                (recovered.plan().source.as_str(), recovered.plan().target.as_str()),
                ("src", "tgt")
            );
        }
        let (recovered, _) =
            CoordinatorMachine::recover("s", "m", &[prepare()], MigrationConfig::default(), Duration::ZERO);
        assert_eq!(
            recovered.plan().strategy,
            Strategy::Ms2m,
            "a Prepare without a strategy"
        );
    }

    /// From the standby: no `Checkpoint` goes to the source; `Restore` tells
    /// the target to keep its state, and replay starts from where it stood.
    #[test]
    fn from_the_standby_the_coordinator_skips_the_checkpoint() {
        use coordinator::{CoordinatorAction, CoordinatorEvent, CoordinatorMachine, CoordinatorPhase};
        use std::time::Duration;
        use target::{TargetAction, TargetEvent, TargetMachine};
        let plan = crate::migration::MigrationPlan {
            service: "s".into(),
            migration_id: "m".into(),
            source: "src".into(),
            target: "tgt".into(),
            strategy: crate::migration::Strategy::Ms2mFromStandby,
        };
        let mut machine = CoordinatorMachine::new(plan, crate::migration::MigrationConfig::default(), 1);
        let published: Vec<ControlBody> = machine
            .handle(Duration::ZERO, CoordinatorEvent::Start)
            .into_iter()
            .filter_map(|a| match a {
                CoordinatorAction::Publish(body) => Some(body),
                _ => None,
            })
            .collect();
        let restore = ControlBody::RestoreFromStandby;
        assert!(matches!(published[0], ControlBody::Prepare { .. }));
        assert_eq!(published[1..], [ControlBody::RestoreFromStandby], "no Checkpoint");
        assert_eq!(machine.phase(), CoordinatorPhase::Restoring);
        machine.handle(Duration::ZERO, CoordinatorEvent::Record(restored()));
        assert_eq!(machine.phase(), CoordinatorPhase::Replaying);

        let mut target = TargetMachine::new("tgt", Decisions::default());
        target.handle(TargetEvent::Record(prepare()));
        assert_eq!(
            target.handle(TargetEvent::Record(record("m", Role::Coordinator, restore))),
            vec![TargetAction::RestoreFromStandby]
        );
    }

    /// A target replaying from 10 that just read the source's digest point
    /// (Pd = 20, digest 7), and its actions for that record.
    fn replaying_target_given_digest_point() -> (target::TargetMachine, Vec<target::TargetAction>) {
        use target::{TargetEvent, TargetMachine};
        let mut target = TargetMachine::new("tgt", Decisions::default());
        target.handle(TargetEvent::Record(prepare()));
        let restore = record("m", Role::Coordinator, ControlBody::Restore { snapshot_id: Some(0) });
        target.handle(TargetEvent::Record(restore));
        target.handle(TargetEvent::Restored {
            position: at(10),
            transfer_us: 0,
            restore_us: 0,
        });
        let digest_at = ControlBody::DigestAt {
            position: at(20),
            digest: StateDigest(7),
        };
        let actions = target.handle(TargetEvent::Record(record("m", Role::Source, digest_at)));
        (target, actions)
    }

    /// The target's ceiling stays at Pd until it compared digests there;
    /// a `Stopped` that arrives meanwhile waits for the comparison.
    #[test]
    fn the_target_compares_at_the_digest_point_before_it_cuts_over() {
        use target::{TargetAction, TargetEvent};
        let (mut target, actions) = replaying_target_given_digest_point();
        assert_eq!(
            actions,
            vec![TargetAction::SetCeiling(at(20)), TargetAction::CheckDigestAt(at(20))]
        );
        let progress = ControlBody::SourceProgress { position: at(30) };
        assert_eq!(
            target.handle(TargetEvent::Record(record("m", Role::Source, progress))),
            vec![]
        );
        target.handle(TargetEvent::Record(record(
            "m",
            Role::Coordinator,
            ControlBody::Stop { next_epoch: 1 },
        )));
        let stopped = ControlBody::Stopped {
            position: at(40),
            digest: None,
            longest_stall_us: 0,
        };
        assert_eq!(
            target.handle(TargetEvent::Record(record("m", Role::Source, stopped))),
            vec![]
        );
        assert_eq!(
            target.handle(TargetEvent::ReachedDigestPoint(StateDigest(7))),
            vec![
                TargetAction::SetCeiling(at(40)),
                TargetAction::ReplayTo {
                    pf: at(40),
                    digest: false
                }
            ]
        );
        let actions = target.handle(TargetEvent::ReachedPf(None));
        assert!(matches!(
            &actions[..],
            [TargetAction::Publish(ControlBody::Takeover { .. })]
        ));
    }

    #[test]
    fn a_digest_mismatch_at_the_digest_point_fails_before_the_stop() {
        use target::{TargetAction, TargetEvent};
        let (mut target, _) = replaying_target_given_digest_point();
        let actions = target.handle(TargetEvent::ReachedDigestPoint(StateDigest(8)));
        assert!(matches!(
            &actions[..],
            [
                TargetAction::Publish(ControlBody::CutoverFailed {
                    digest_mismatch: Some(_),
                    ..
                }),
                TargetAction::Fail(MigrationFailure::DigestMismatch(..))
            ]
        ));
    }

    /// Fault-suite seeds 21 and 125: a source that died before its digest
    /// point left the target reporting lag 0; the gated cutover rule must
    /// not keep extending the phase, or the migration never ends.
    #[test]
    fn waiting_for_a_digest_point_does_not_extend_the_phase() {
        use coordinator::{CoordinatorAction, CoordinatorEvent, CoordinatorMachine};
        use std::time::Duration;
        let plan = crate::migration::MigrationPlan {
            service: "s".into(),
            migration_id: "m".into(),
            source: "src".into(),
            target: "tgt".into(),
            strategy: crate::migration::Strategy::Ms2m,
        };
        let config = crate::migration::MigrationConfig {
            phase_timeout: Duration::from_secs(10),
            ..Default::default()
        };
        let mut machine = CoordinatorMachine::new(plan, config, 1);
        machine.handle(Duration::ZERO, CoordinatorEvent::Start);
        let taken = ControlBody::CheckpointTaken {
            snapshot_id: 0,
            position: at(10),
            bytes: 0,
            pause_us: 0,
        };
        machine.handle(
            Duration::ZERO,
            CoordinatorEvent::Record(record("m", Role::Source, taken)),
        );
        machine.handle(Duration::ZERO, CoordinatorEvent::Record(restored()));
        let progress = |offset| ControlBody::TargetProgress {
            position: at(offset),
            lag: 0,
            apply_rate: 1000.0,
            input_rate: 100.0,
        };
        let first = Duration::from_secs(1);
        let actions = machine.handle(first, CoordinatorEvent::Record(record("m", Role::Target, progress(12))));
        assert!(!actions
            .iter()
            .any(|a| matches!(a, CoordinatorAction::Publish(ControlBody::Stop { .. }))));
        let deadline = machine.deadline();
        for s in 2..9 {
            let at_s = Duration::from_secs(s);
            machine.handle(at_s, CoordinatorEvent::Record(record("m", Role::Target, progress(12))));
            assert_eq!(
                machine.deadline(),
                deadline,
                "no DigestAt yet: the phase is not extended"
            );
        }
        // Once the digest point is announced and passed, the rule fires.
        let digest_at = ControlBody::DigestAt {
            position: at(12),
            digest: StateDigest(1),
        };
        machine.handle(
            Duration::from_secs(9),
            CoordinatorEvent::Record(record("m", Role::Source, digest_at)),
        );
        let actions = machine.handle(
            Duration::from_secs(9),
            CoordinatorEvent::Record(record("m", Role::Target, progress(12))),
        );
        assert!(actions
            .iter()
            .any(|a| matches!(a, CoordinatorAction::Publish(ControlBody::Stop { .. }))));
    }

    /// Runs a stop-and-copy migration through the coordinator's machine:
    /// its `Stop` published at 1 ms (after `Prepare`'s acknowledgement) and
    /// read back `echo` later, `Live` read at 401 ms carrying
    /// `visible_before`; returns the report.
    fn stop_and_copy_report(
        echo: Option<std::time::Duration>,
        visible_before: Option<std::time::Duration>,
    ) -> crate::migration::MigrationReport {
        use coordinator::{CoordinatorAction, CoordinatorEvent, CoordinatorMachine};
        use std::time::Duration;
        let plan = crate::migration::MigrationPlan {
            service: "s".into(),
            migration_id: "m".into(),
            source: "src".into(),
            target: "tgt".into(),
            strategy: crate::migration::Strategy::StopAndCopy,
        };
        let mut machine = CoordinatorMachine::new(plan, crate::migration::MigrationConfig::default(), 1);
        let start = machine.handle(Duration::ZERO, CoordinatorEvent::Start);
        let stop = ControlBody::Stop { next_epoch: 1 };
        assert!(start
            .iter()
            .any(|a| matches!(a, CoordinatorAction::Publish(ControlBody::Stop { .. }))));
        machine.publishing(Duration::from_millis(1), &stop);
        let mut feed = |at: Duration, from: Role, body: ControlBody| {
            machine.handle(at, CoordinatorEvent::Record(record("m", from, body)))
        };
        let ms = Duration::from_millis;
        if let Some(echo) = echo {
            feed(ms(1) + echo, Role::Coordinator, ControlBody::Stop { next_epoch: 1 });
        }
        let stopped = ControlBody::Stopped {
            position: at(10),
            digest: Some(StateDigest(7)),
            longest_stall_us: 0,
        };
        feed(ms(10), Role::Source, stopped);
        let taken = ControlBody::CheckpointTaken {
            snapshot_id: 1,
            position: at(10),
            bytes: 1,
            pause_us: 0,
        };
        feed(ms(100), Role::Source, taken);
        feed(ms(300), Role::Target, restored().body);
        let takeover = ControlBody::Takeover {
            owner: "tgt".into(),
            epoch: 1,
            position: at(10),
        };
        feed(ms(350), Role::Target, takeover);
        let live = ControlBody::Live {
            owner: "tgt".into(),
            epoch: 1,
            position: at(10),
            digest: StateDigest(7),
            digest_match: true,
            replayed: 0,
            final_gap: 0,
            visible_before_us: visible_before.map(crate::migration::micros),
        };
        let actions = feed(ms(401), Role::Target, live);
        match actions
            .into_iter()
            .find(|a| matches!(a, CoordinatorAction::Completed(_)))
        {
            Some(CoordinatorAction::Completed(report)) => *report,
            other => panic!("no report: {other:?}"),
        }
    }

    /// The report's downtime is the handover clients see: the coordinator's
    /// stop-to-`Live` less the trips of `Stop` and `Live` (each as long as
    /// `Stop`'s trip back to the coordinator) and less the target's time
    /// from its first visible outputs to `Live`.
    #[test]
    fn the_handover_leaves_out_the_control_trips_and_the_wait_for_live() {
        let ms = std::time::Duration::from_millis;
        let report = stop_and_copy_report(Some(ms(2)), Some(ms(30)));
        assert_eq!(report.cutover_ms, 400.0, "from the Stop's own publishing");
        assert_eq!(report.control_trip_ms, Some(2.0));
        assert_eq!(report.visible_before_live_ms, Some(30.0));
        assert_eq!(report.handover_ms, 366.0);
        assert_eq!(report.downtime_ms, 366.0);
        // The target did not report, or `Stop` never came back: the
        // coordinator's own view.
        assert_eq!(stop_and_copy_report(Some(ms(2)), None).handover_ms, 400.0);
        assert_eq!(stop_and_copy_report(None, Some(ms(30))).handover_ms, 400.0);
        // More to take off than there is: the estimate went wrong, and the
        // coordinator's view is the honest bound.
        assert_eq!(stop_and_copy_report(Some(ms(200)), Some(ms(30))).handover_ms, 400.0);
    }
}
