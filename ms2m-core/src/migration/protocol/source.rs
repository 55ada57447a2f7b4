//! The source's protocol: an owner that keeps serving while it is migrated
//! away, stops at a message boundary when told, and then waits for the
//! decision on the control channel.
//!
//! ```text
//!            Prepare          Checkpoint               Stop
//! Serving ──────────► Open ─────────────► (upload) ──────────► Stopped
//!    ▲                 │  CheckpointStored: publish            │
//!    │  rollback       │  CheckpointTaken                      │ Takeover decides
//!    └─────────────────┴───────────────────────────────────────┤
//!                     (a stopped source re-claims its sink)     ▼
//!                                                           Released
//! ```
//!
//! # The digest point
//!
//! When the target reports `Restored`, the source takes its digest at its
//! current position Pd (the driver freezes the state and digests the copy
//! off the apply loop where the state can freeze) and publishes `DigestAt`.
//! Until then it publishes no progress, so the target's replay ceiling
//! stays at or below Pd and the target can compare its own digest there
//! before it goes live. The cutover then needs no digest: `Stopped` carries
//! one only when no `DigestAt` went out for the migration.
//!
//! The source applies input unless it is stopped or released
//! ([`SourceMachine::may_apply`]). It never decides anything: it learns the
//! decision from the channel like every other party ([`super::Decisions`]).

use super::{Decisions, Observed};
use crate::control::{ControlBody, ControlMessage, Role};
use crate::migration::MigrationOutcome;
use crate::runtime::CheckpointInfo;

/// The source's state.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct SourceMachine {
    me: String,
    decisions: Decisions,
    migration: Option<OpenMigration>,
    released: bool,
}

/// The undecided migration this source takes part in.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct OpenMigration {
    id: String,
    /// Stopped at Pf: applies nothing until the migration is decided.
    stopped: bool,
    /// A checkpoint upload for this migration is under way.
    uploading: bool,
    /// Where the digest point is.
    digest: DigestStep,
}

/// The source's part of the digest point.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum DigestStep {
    /// Not asked for yet (no `Restored` seen).
    NotTaken,
    /// Being computed; no progress goes out meanwhile.
    Taking,
    /// `DigestAt` published: the cutover needs no digest.
    Published,
}

/// What happened to the source.
#[derive(Clone, Debug)]
pub enum SourceEvent {
    /// The next record of the service on the control channel.
    Record(ControlMessage),
    /// The migration checkpoint is stored.
    CheckpointStored(CheckpointInfo),
    /// The migration checkpoint could not be stored.
    CheckpointFailed(String),
    /// The progress interval elapsed.
    ProgressDue,
    /// The digest asked for by [`SourceAction::TakeDigest`].
    DigestTaken {
        /// The position it was taken at (Pd).
        position: crate::position::Position,
        /// The state's digest there.
        digest: crate::digest::StateDigest,
    },
}

/// What the source's driver must do.
#[derive(Clone, Debug, PartialEq)]
pub enum SourceAction {
    /// Serialize the state now and upload it in the background; report the
    /// result as [`SourceEvent::CheckpointStored`] or `CheckpointFailed`.
    StartCheckpoint,
    /// Publish `body` for `migration`.
    Publish {
        /// The migration.
        migration: String,
        /// The record.
        body: ControlBody,
    },
    /// Take the state's digest at the current position (off the apply loop
    /// if the state freezes) and report [`SourceEvent::DigestTaken`].
    TakeDigest,
    /// Publish the applied position as `SourceProgress`.
    PublishProgress {
        /// The migration.
        migration: String,
    },
    /// Commit every output, then publish `Stopped` with the position
    /// reached (Pf) and, with `digest`, the state's digest there.
    CommitAndPublishStopped {
        /// The migration.
        migration: String,
        /// Whether `Stopped` carries a digest (no `DigestAt` went out).
        digest: bool,
    },
    /// Re-claim the output sink (fencing any stray producer) before serving
    /// again after a stop.
    Claim,
    /// Ownership moved away: stop for good, emit nothing more.
    Release,
}

impl SourceMachine {
    /// A serving owner `me`, knowing the decisions already on the channel.
    pub fn new(me: impl Into<String>, decisions: Decisions) -> Self {
        Self {
            me: me.into(),
            decisions,
            migration: None,
            released: false,
        }
    }

    /// Whether the source may apply input (and emit outputs) now.
    pub fn may_apply(&self) -> bool {
        !self.released && !self.migration.as_ref().is_some_and(|m| m.stopped)
    }

    /// The decisions folded so far.
    pub fn decisions(&self) -> &Decisions {
        &self.decisions
    }

    /// Whether ownership moved away.
    pub fn is_released(&self) -> bool {
        self.released
    }

    /// The migration under way, if any.
    pub fn migration(&self) -> Option<&str> {
        self.migration.as_ref().map(|m| m.id.as_str())
    }

    /// The transition function.
    pub fn handle(&mut self, event: SourceEvent) -> Vec<SourceAction> {
        if self.released {
            return Vec::new();
        }
        match event {
            SourceEvent::Record(m) => self.on_record(&m),
            SourceEvent::CheckpointStored(info) => self.on_checkpoint(Ok(info)),
            SourceEvent::CheckpointFailed(reason) => self.on_checkpoint(Err(reason)),
            SourceEvent::ProgressDue => match &self.migration {
                // No progress while the digest point is taken: the target's
                // ceiling must not pass Pd before it learns Pd.
                Some(m) if !m.stopped && m.digest != DigestStep::Taking => vec![SourceAction::PublishProgress {
                    migration: m.id.clone(),
                }],
                _ => Vec::new(),
            },
            SourceEvent::DigestTaken { position, digest } => self.on_digest_taken(position, digest),
        }
    }

    /// The target restored: take the digest point (once, while serving).
    fn take_digest(&mut self) -> Vec<SourceAction> {
        match self.migration.as_mut() {
            Some(m) if !m.stopped && m.digest == DigestStep::NotTaken => {
                m.digest = DigestStep::Taking;
                vec![SourceAction::TakeDigest]
            }
            _ => Vec::new(),
        }
    }

    fn on_digest_taken(
        &mut self,
        position: crate::position::Position,
        digest: crate::digest::StateDigest,
    ) -> Vec<SourceAction> {
        match self.migration.as_mut() {
            // Stopped meanwhile: `Stopped` carried the digest at Pf instead.
            Some(m) if !m.stopped && m.digest == DigestStep::Taking => {
                m.digest = DigestStep::Published;
                let migration = m.id.clone();
                let body = ControlBody::DigestAt { position, digest };
                let progress = SourceAction::PublishProgress {
                    migration: migration.clone(),
                };
                vec![SourceAction::Publish { migration, body }, progress]
            }
            _ => Vec::new(),
        }
    }

    fn on_record(&mut self, m: &ControlMessage) -> Vec<SourceAction> {
        let mine = self.migration().unwrap_or(&m.migration_id).to_string();
        let observed = self.decisions.observe_for(m, &mine);
        if self.decisions.owner().is_some_and(|o| o.instance_id != self.me) {
            // A takeover or a winning claim named another owner: this one
            // must never emit again.
            return self.release();
        }
        if mine != m.migration_id {
            // Another migration's record, or a lease record: it decided
            // ours only if it was a winning claim (which names another
            // owner, handled above).
            return Vec::new();
        }
        match observed {
            Observed::Decides(outcome) => return self.on_decision(&m.migration_id, outcome),
            // A late record of a decided migration (a dead coordinator's
            // `Stop` landing after its successor's rollback) changes nothing.
            Observed::AfterDecision(_) => return Vec::new(),
            Observed::Open => {}
        }
        let ours = self.migration.as_ref().is_some_and(|o| o.id == m.migration_id);
        if m.from == Role::Target && ours && matches!(m.body, ControlBody::Restored { .. }) {
            return self.take_digest();
        }
        if m.from != Role::Coordinator {
            return Vec::new();
        }
        match &m.body {
            ControlBody::Prepare { source, .. } if *source == self.me => self.open(&m.migration_id),
            ControlBody::Checkpoint if ours => self.start_checkpoint(),
            ControlBody::Stop { .. } if ours => self.stop(),
            _ => Vec::new(),
        }
    }

    /// A new migration names this source. One that stopped it already keeps
    /// it until decided; an unstopped one is superseded (its coordinator
    /// can no longer stop this source and will roll it back).
    fn open(&mut self, id: &str) -> Vec<SourceAction> {
        if self.migration.as_ref().is_some_and(|m| m.stopped || m.id == id) {
            // Stopped: kept until decided. The same migration (a record
            // read twice): nothing new.
            return Vec::new();
        }
        self.migration = Some(OpenMigration {
            id: id.to_string(),
            stopped: false,
            uploading: false,
            digest: DigestStep::NotTaken,
        });
        Vec::new()
    }

    fn start_checkpoint(&mut self) -> Vec<SourceAction> {
        let Some(m) = self.migration.as_mut().filter(|m| !m.uploading) else {
            // No migration, or its checkpoint is uploading already (the
            // command read twice).
            return Vec::new();
        };
        m.uploading = true;
        vec![SourceAction::StartCheckpoint]
    }

    fn stop(&mut self) -> Vec<SourceAction> {
        let Some(m) = &mut self.migration else {
            return Vec::new();
        };
        if m.stopped {
            return Vec::new();
        }
        m.stopped = true;
        vec![SourceAction::CommitAndPublishStopped {
            migration: m.id.clone(),
            digest: m.digest != DigestStep::Published,
        }]
    }

    fn on_checkpoint(&mut self, result: Result<CheckpointInfo, String>) -> Vec<SourceAction> {
        let Some(m) = self.migration.as_mut().filter(|m| m.uploading) else {
            // The migration was decided or superseded while uploading.
            return Vec::new();
        };
        m.uploading = false;
        let migration = m.id.clone();
        match result {
            Ok(info) => {
                let body = ControlBody::CheckpointTaken {
                    snapshot_id: info.id,
                    position: info.position,
                    bytes: info.bytes,
                    pause_us: info.pause.as_micros() as u64,
                };
                let progress = SourceAction::PublishProgress {
                    migration: migration.clone(),
                };
                vec![SourceAction::Publish { migration, body }, progress]
            }
            Err(reason) => {
                // The migration cannot go on. A stopped source waits for the
                // coordinator's rollback (resuming on its own would not be
                // ordered against the channel); a serving one forgets it.
                if !m.stopped {
                    self.migration = None;
                }
                let body = ControlBody::CutoverFailed {
                    reason: format!("checkpoint failed: {reason}"),
                    digest_mismatch: None,
                };
                vec![SourceAction::Publish { migration, body }]
            }
        }
    }

    /// Ownership moved away: stop for good.
    fn release(&mut self) -> Vec<SourceAction> {
        self.released = true;
        self.migration = None;
        vec![SourceAction::Release]
    }

    fn on_decision(&mut self, id: &str, outcome: MigrationOutcome) -> Vec<SourceAction> {
        let ours = self.migration.take_if(|m| m.id == id);
        match ours {
            // Rolled back after the stop: serve again, re-claiming the sink
            // first. Only a stopped source re-claims: a serving one never
            // let go of it, and a claim aborts its uncommitted outputs.
            Some(m) if m.stopped && outcome == MigrationOutcome::RolledBack => vec![SourceAction::Claim],
            _ => Vec::new(),
        }
    }
}
