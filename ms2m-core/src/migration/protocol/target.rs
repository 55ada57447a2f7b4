//! The target's protocol: a standby that is named by a migration, restores
//! its checkpoint (or keeps its own state, when the migration says so),
//! replays behind the source (never past the source's
//! published position), and takes over at exactly the position Pf where the
//! source stopped.
//!
//! ```text
//!          Prepare(me)         Restore            Restored
//! Standby ───────────► Selected ──────► Restoring ────────► Replaying
//!                                                              │ Stopped(Pf) (+ Stop's epoch)
//!                                                              ▼
//!    Live ◄──── Claiming ◄──── TakingOver ◄──────────── CuttingOver
//!         Claimed      our Takeover     digests equal:       ReachedPf
//!                      decides          publish Takeover
//! ```
//!
//! While replaying, the source's `DigestAt` names a digest point Pd: the
//! target holds its ceiling at Pd, compares its digest there with the
//! source's (a mismatch under `DigestPolicy::Abort` fails the migration
//! before the source ever stops), then replays on. The cutover itself then
//! replays the final gap and needs no digest; without a digest point (the
//! source stopped first) the digests are compared at Pf.
//!
//! The target claims the sink only after reading its own `Takeover` back as
//! the decision of the migration ([`super::Decisions`]): a rollback that
//! came first makes it stand down instead. Any failure publishes
//! `CutoverFailed` where the coordinator needs to know, and ends the role.

use super::{Decisions, MigrationFailure, Observed};
use crate::control::{ControlBody, ControlMessage, Role};
use crate::digest::StateDigest;
use crate::migration::{DigestPolicy, MigrationError, MigrationOutcome};
use crate::position::Position;
use crate::store::SnapshotId;

/// The target's state.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct TargetMachine {
    me: String,
    decisions: Decisions,
    phase: TargetPhase,
    migration: Option<Selected>,
}

/// Where the target is in its migration.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TargetPhase {
    /// Waiting for a migration that names it.
    Standby,
    /// Named by a migration; waiting for the restore command.
    Selected,
    /// Fetching and restoring the checkpoint.
    Restoring,
    /// Replaying behind the serving source.
    Replaying,
    /// Replaying the final gap up to Pf.
    CuttingOver,
    /// `Takeover` published; waiting to read the decision.
    TakingOver,
    /// The migration is ours; claiming the sink.
    Claiming,
    /// Live at Pf: the owner.
    Live,
    /// The migration failed or was rolled back.
    Failed,
}

/// What the target knows of its migration.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Selected {
    id: String,
    digest_policy: DigestPolicy,
    /// The owner epoch the coordinator's `Stop` announced.
    epoch: Option<u64>,
    /// The source's latest published position (the replay ceiling).
    source_position: Option<Position>,
    /// Pf and the source's digest there (`None`: compared at the digest
    /// point), once it stopped.
    stopped: Option<(Position, Option<StateDigest>)>,
    /// The digest point the source published.
    digest_point: Option<DigestPoint>,
    /// This target's digest at Pf, when one is compared there.
    digest_at_pf: Option<StateDigest>,
}

/// Pd, where source and target compare digests before the stop.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct DigestPoint {
    position: Position,
    source: StateDigest,
    /// Ours, once replay reached Pd.
    target: Option<StateDigest>,
}

impl Selected {
    /// Whether replay must still stop at the digest point.
    fn digest_point_pending(&self) -> bool {
        self.digest_point.as_ref().is_some_and(|d| d.target.is_none())
    }

    /// The source's and this target's digests, where they were compared.
    fn digests(&self) -> Option<(StateDigest, StateDigest)> {
        match &self.stopped {
            Some((_, Some(source))) => Some((*source, self.digest_at_pf?)),
            Some((_, None)) => self.digest_point.as_ref().and_then(|d| Some((d.source, d.target?))),
            None => None,
        }
    }
}

/// What happened to the target.
#[derive(Clone, Debug)]
pub enum TargetEvent {
    /// The next record of the service on the control channel.
    Record(ControlMessage),
    /// The checkpoint was fetched and restored (or the empty state set up).
    Restored {
        /// The restored position.
        position: Position,
        /// Time to fetch the snapshot, µs.
        transfer_us: u64,
        /// Time to verify and restore it, µs.
        restore_us: u64,
    },
    /// The checkpoint could not be fetched or restored.
    RestoreFailed(String),
    /// Replay reached the digest point; the state's digest there.
    ReachedDigestPoint(StateDigest),
    /// The target had already applied past the digest point (its position).
    PastDigestPoint(Position),
    /// Replay reached Pf; the state's digest there, if asked for.
    ReachedPf(Option<StateDigest>),
    /// The target had already applied past Pf (its position).
    PastPf(Position),
    /// The sink is claimed.
    Claimed,
    /// The progress interval elapsed.
    ProgressDue,
    /// Nothing was heard of the migration for the phase timeout.
    TimedOut,
}

/// What the target's driver must do.
#[derive(Clone, Debug, PartialEq)]
pub enum TargetAction {
    /// Fetch and restore this snapshot (`None`: start from the empty state),
    /// then report [`TargetEvent::Restored`] or `RestoreFailed`.
    Restore {
        /// The snapshot.
        snapshot_id: Option<SnapshotId>,
        /// Whether to start reading the input while the snapshot transfers:
        /// only while the source still serves (MS2M), when the input's tail
        /// is what the target replays before the cutover. After the source
        /// stopped (stop-and-copy) the transfer is the downtime, and reading
        /// ahead would only add fetches that slow it.
        read_ahead: bool,
    },
    /// Keep the state this target holds as a standby (having none: restore
    /// the newest snapshot in the store, or start empty), then report
    /// [`TargetEvent::Restored`] or `RestoreFailed`.
    RestoreFromStandby,
    /// Never apply past this position (the source's).
    SetCeiling(Position),
    /// Replay up to the digest point (the ceiling holds there) and report
    /// [`TargetEvent::ReachedDigestPoint`] or `PastDigestPoint`.
    CheckDigestAt(Position),
    /// Replay up to `pf` and report [`TargetEvent::ReachedPf`] (with the
    /// digest there if `digest`) or `PastPf`.
    ReplayTo {
        /// Pf.
        pf: Position,
        /// Whether to take the digest at Pf.
        digest: bool,
    },
    /// Publish `body` for the migration.
    Publish(ControlBody),
    /// Publish `TargetProgress` (lag and rates are the driver's measurements).
    PublishProgress,
    /// Claim the output sink (fencing the source's producer where the sink can).
    Claim,
    /// Go live at Pf and publish `Live`; the role ends with the instance.
    GoLive {
        /// The owner epoch taken.
        epoch: u64,
        /// The position gone live at.
        position: Position,
        /// The state digest there.
        digest: StateDigest,
        /// Whether it matched the source's.
        digest_match: bool,
    },
    /// The role ends with this error.
    Fail(MigrationFailure),
}

impl TargetMachine {
    /// A standby `me`, knowing the decisions already on the channel (so a
    /// finished migration that named it is not taken up again).
    pub fn new(me: impl Into<String>, decisions: Decisions) -> Self {
        Self {
            me: me.into(),
            decisions,
            phase: TargetPhase::Standby,
            migration: None,
        }
    }

    /// Where the target is.
    pub fn phase(&self) -> TargetPhase {
        self.phase
    }

    /// The migration it takes part in, once named.
    pub fn migration(&self) -> Option<&str> {
        self.migration.as_ref().map(|m| m.id.as_str())
    }

    /// Whether the role ended (live or failed).
    pub fn is_finished(&self) -> bool {
        matches!(self.phase, TargetPhase::Live | TargetPhase::Failed)
    }

    /// The transition function.
    pub fn handle(&mut self, event: TargetEvent) -> Vec<TargetAction> {
        if self.is_finished() {
            return Vec::new();
        }
        match event {
            TargetEvent::Record(m) => self.on_record(m),
            TargetEvent::Restored {
                position,
                transfer_us,
                restore_us,
            } => self.on_restored(position, transfer_us, restore_us),
            TargetEvent::RestoreFailed(reason) => self.fail_loudly(format!("restore failed: {reason}")),
            TargetEvent::ReachedDigestPoint(digest) => self.on_reached_digest_point(digest),
            TargetEvent::PastDigestPoint(position) => {
                self.fail_loudly(format!("target is past the digest point: {position}"))
            }
            TargetEvent::ReachedPf(digest) => self.on_reached_pf(digest),
            TargetEvent::PastPf(position) => self.on_past_pf(position),
            TargetEvent::Claimed => self.on_claimed(),
            TargetEvent::ProgressDue => self.on_progress_due(),
            TargetEvent::TimedOut => self.on_timeout(),
        }
    }

    fn on_record(&mut self, m: ControlMessage) -> Vec<TargetAction> {
        let ours = self.migration.as_ref().is_some_and(|s| s.id == m.migration_id);
        let mine = self.migration.as_ref().map_or(m.migration_id.clone(), |s| s.id.clone());
        match self.decisions.observe_for(&m, &mine) {
            // Its own record, or a winning claim that rolled it back.
            Observed::Decides(outcome) if self.migration.is_some() => return self.on_decision(outcome),
            Observed::Decides(_) | Observed::AfterDecision(_) => return Vec::new(),
            Observed::Open => {}
        }
        if ours {
            return self.on_own_record(m);
        }
        match m.body {
            ControlBody::Prepare {
                target, digest_policy, ..
            } if self.phase == TargetPhase::Standby && m.from == Role::Coordinator && target == self.me => {
                self.phase = TargetPhase::Selected;
                self.migration = Some(Selected {
                    id: m.migration_id,
                    digest_policy,
                    epoch: None,
                    source_position: None,
                    stopped: None,
                    digest_point: None,
                    digest_at_pf: None,
                });
                Vec::new()
            }
            _ => Vec::new(),
        }
    }

    fn on_own_record(&mut self, m: ControlMessage) -> Vec<TargetAction> {
        let replaying = self.phase == TargetPhase::Replaying;
        let Some(sel) = self.migration.as_mut() else {
            return Vec::new();
        };
        match (m.body, m.from) {
            (ControlBody::RestoreFromStandby, Role::Coordinator) if self.phase == TargetPhase::Selected => {
                self.phase = TargetPhase::Restoring;
                vec![TargetAction::RestoreFromStandby]
            }
            (ControlBody::Restore { snapshot_id }, Role::Coordinator) if self.phase == TargetPhase::Selected => {
                self.phase = TargetPhase::Restoring;
                let read_ahead = sel.stopped.is_none();
                vec![TargetAction::Restore {
                    snapshot_id,
                    read_ahead,
                }]
            }
            (ControlBody::Stop { next_epoch }, Role::Coordinator) => {
                sel.epoch = Some(next_epoch);
                Vec::new()
            }
            (ControlBody::DigestAt { position, digest }, Role::Source)
                if sel.stopped.is_none() && sel.digest_point.is_none() =>
            {
                sel.digest_point = Some(DigestPoint {
                    position: position.clone(),
                    source: digest,
                    target: None,
                });
                if replaying {
                    vec![
                        TargetAction::SetCeiling(position.clone()),
                        TargetAction::CheckDigestAt(position),
                    ]
                } else {
                    Vec::new()
                }
            }
            (ControlBody::SourceProgress { position }, Role::Source) if sel.stopped.is_none() => {
                sel.source_position = Some(position.clone());
                if replaying && !sel.digest_point_pending() {
                    vec![TargetAction::SetCeiling(position)]
                } else {
                    Vec::new()
                }
            }
            (ControlBody::Stopped { position, digest, .. }, Role::Source) if sel.stopped.is_none() => {
                sel.stopped = Some((position, digest));
                if replaying && !sel.digest_point_pending() {
                    self.cut_over()
                } else {
                    Vec::new()
                }
            }
            _ => Vec::new(),
        }
    }

    fn on_restored(&mut self, position: Position, transfer_us: u64, restore_us: u64) -> Vec<TargetAction> {
        let Some(sel) = self.migration.as_ref().filter(|_| self.phase == TargetPhase::Restoring) else {
            return Vec::new();
        };
        self.phase = TargetPhase::Replaying;
        let pending = sel.digest_point.as_ref().filter(|_| sel.digest_point_pending());
        let ceiling = match pending {
            Some(point) => point.position.clone(),
            None => sel.source_position.clone().unwrap_or_else(|| position.clone()),
        };
        let check = pending.map(|point| TargetAction::CheckDigestAt(point.position.clone()));
        let body = ControlBody::Restored {
            position,
            transfer_us,
            restore_us,
        };
        let mut actions = vec![TargetAction::SetCeiling(ceiling), TargetAction::Publish(body)];
        actions.extend(check);
        if sel.stopped.is_some() && !sel.digest_point_pending() {
            actions.extend(self.cut_over());
        }
        actions
    }

    /// Replay reached Pd: compare, then replay on (or cut over, if the
    /// source stopped meanwhile).
    fn on_reached_digest_point(&mut self, digest: StateDigest) -> Vec<TargetAction> {
        let replaying = self.phase == TargetPhase::Replaying;
        let Some(sel) = self
            .migration
            .as_mut()
            .filter(|s| replaying && s.digest_point_pending())
        else {
            return Vec::new();
        };
        let Some(point) = sel.digest_point.as_mut() else {
            return Vec::new();
        };
        point.target = Some(digest);
        let (source, pd) = (point.source, point.position.clone());
        if digest != source && sel.digest_policy == DigestPolicy::Abort {
            return self.digest_mismatch(source, digest);
        }
        if sel.stopped.is_some() {
            return self.cut_over();
        }
        let ceiling = sel.source_position.clone().filter(|p| p.reaches(&pd)).unwrap_or(pd);
        vec![TargetAction::SetCeiling(ceiling)]
    }

    /// Digests differ under `DigestPolicy::Abort`: the migration fails.
    fn digest_mismatch(&mut self, source_digest: StateDigest, target_digest: StateDigest) -> Vec<TargetAction> {
        let error = MigrationError::DigestMismatch {
            source_digest,
            target_digest,
        };
        self.phase = TargetPhase::Failed;
        let body = ControlBody::CutoverFailed {
            reason: error.to_string(),
            digest_mismatch: Some((source_digest, target_digest)),
        };
        let failure = MigrationFailure::DigestMismatch(source_digest, target_digest);
        vec![TargetAction::Publish(body), TargetAction::Fail(failure)]
    }

    /// The source stopped at Pf: replay the final gap.
    fn cut_over(&mut self) -> Vec<TargetAction> {
        let Some((pf, at_pf)) = self.migration.as_ref().and_then(|s| s.stopped.clone()) else {
            return Vec::new();
        };
        if self.migration.as_ref().is_some_and(|s| s.epoch.is_none()) {
            return self.fail_loudly("the source stopped without a stop command".into());
        }
        if at_pf.is_none() && self.migration.as_ref().is_some_and(|s| s.digest_point.is_none()) {
            return self.fail_loudly("the source compared digests at a point this target never saw".into());
        }
        self.phase = TargetPhase::CuttingOver;
        vec![
            TargetAction::SetCeiling(pf.clone()),
            TargetAction::ReplayTo {
                pf,
                digest: at_pf.is_some(),
            },
        ]
    }

    fn on_reached_pf(&mut self, digest: Option<StateDigest>) -> Vec<TargetAction> {
        let cutting_over = self.phase == TargetPhase::CuttingOver;
        let Some(sel) = self.migration.as_mut().filter(|_| cutting_over) else {
            return Vec::new();
        };
        sel.digest_at_pf = digest;
        let (Some((pf, _)), Some(epoch)) = (sel.stopped.clone(), sel.epoch) else {
            return Vec::new();
        };
        let Some((source_digest, target_digest)) = sel.digests() else {
            return self.fail_loudly("no digest to compare at the cutover".into());
        };
        if target_digest != source_digest && sel.digest_policy == DigestPolicy::Abort {
            return self.digest_mismatch(source_digest, target_digest);
        }
        self.phase = TargetPhase::TakingOver;
        let body = ControlBody::Takeover {
            owner: self.me.clone(),
            epoch,
            position: pf,
        };
        vec![TargetAction::Publish(body)]
    }

    fn on_past_pf(&mut self, position: Position) -> Vec<TargetAction> {
        let pf = self
            .migration
            .as_ref()
            .and_then(|s| s.stopped.as_ref())
            .map(|(pf, _)| pf);
        let reason = match pf {
            Some(pf) => format!("target is past the cutover position: {position} > {pf}"),
            None => format!("target is past the cutover position: {position}"),
        };
        self.fail_loudly(reason)
    }

    /// The first decisive record of our migration.
    fn on_decision(&mut self, outcome: MigrationOutcome) -> Vec<TargetAction> {
        match (outcome, self.phase) {
            // Our own `Takeover` came first: the migration is ours.
            (MigrationOutcome::TakenOver, TargetPhase::TakingOver) => {
                self.phase = TargetPhase::Claiming;
                vec![TargetAction::Claim]
            }
            (MigrationOutcome::TakenOver, _) => self.fail("a takeover this target did not publish".into()),
            (MigrationOutcome::RolledBack, TargetPhase::TakingOver) => {
                self.fail("the migration was rolled back before the takeover".into())
            }
            (MigrationOutcome::RolledBack, _) => self.fail("the migration was rolled back".into()),
        }
    }

    fn on_claimed(&mut self) -> Vec<TargetAction> {
        let Some(sel) = self.migration.as_ref().filter(|_| self.phase == TargetPhase::Claiming) else {
            return Vec::new();
        };
        let (Some((pf, _)), Some(epoch), Some((source_digest, digest))) =
            (sel.stopped.clone(), sel.epoch, sel.digests())
        else {
            return Vec::new();
        };
        self.phase = TargetPhase::Live;
        vec![TargetAction::GoLive {
            epoch,
            position: pf,
            digest,
            digest_match: digest == source_digest,
        }]
    }

    fn on_progress_due(&self) -> Vec<TargetAction> {
        let heard = self.migration.as_ref().is_some_and(|s| s.source_position.is_some());
        if self.phase == TargetPhase::Replaying && heard {
            vec![TargetAction::PublishProgress]
        } else {
            Vec::new()
        }
    }

    fn on_timeout(&mut self) -> Vec<TargetAction> {
        let waiting_for = match self.phase {
            TargetPhase::Standby | TargetPhase::Live | TargetPhase::Failed => return Vec::new(),
            TargetPhase::Selected => "restore command",
            TargetPhase::Restoring | TargetPhase::CuttingOver | TargetPhase::Claiming => return Vec::new(),
            TargetPhase::Replaying => "source progress or cutover",
            TargetPhase::TakingOver => "our takeover on the control channel",
        };
        self.phase = TargetPhase::Failed;
        vec![TargetAction::Fail(MigrationFailure::Timeout(waiting_for))]
    }

    /// Ends the role and tells the coordinator why.
    fn fail_loudly(&mut self, reason: String) -> Vec<TargetAction> {
        let body = ControlBody::CutoverFailed {
            reason: reason.clone(),
            digest_mismatch: None,
        };
        let mut actions = vec![TargetAction::Publish(body)];
        actions.extend(self.fail(reason));
        actions
    }

    fn fail(&mut self, reason: String) -> Vec<TargetAction> {
        self.phase = TargetPhase::Failed;
        vec![TargetAction::Fail(MigrationFailure::Aborted(reason))]
    }
}
