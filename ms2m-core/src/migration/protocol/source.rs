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
    /// Publish the applied position as `SourceProgress`.
    PublishProgress {
        /// The migration.
        migration: String,
    },
    /// Commit every output, then publish `Stopped` with the position and
    /// digest reached (Pf).
    CommitAndPublishStopped {
        /// The migration.
        migration: String,
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
                Some(m) if !m.stopped => vec![SourceAction::PublishProgress {
                    migration: m.id.clone(),
                }],
                _ => Vec::new(),
            },
        }
    }

    fn on_record(&mut self, m: &ControlMessage) -> Vec<SourceAction> {
        match self.decisions.observe(m) {
            Observed::Decides(outcome) => return self.on_decision(&m.migration_id, outcome),
            // A late record of a decided migration (a dead coordinator's
            // `Stop` landing after its successor's rollback) changes nothing.
            Observed::AfterDecision(_) => return Vec::new(),
            Observed::Open => {}
        }
        if m.from != Role::Coordinator {
            return Vec::new();
        }
        let ours = self.migration.as_ref().is_some_and(|o| o.id == m.migration_id);
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

    fn on_decision(&mut self, id: &str, outcome: MigrationOutcome) -> Vec<SourceAction> {
        let ours = self.migration.take_if(|m| m.id == id);
        if self.decisions.owner().is_some_and(|o| o.instance_id != self.me) {
            // Whatever migration decided it (a `Takeover` always names the
            // target): another instance owns the service now, so this one
            // must never emit again.
            self.released = true;
            self.migration = None;
            return vec![SourceAction::Release];
        }
        match ours {
            // Rolled back after the stop: serve again, re-claiming the sink
            // first. Only a stopped source re-claims: a serving one never
            // let go of it, and a claim aborts its uncommitted outputs.
            Some(m) if m.stopped && outcome == MigrationOutcome::RolledBack => vec![SourceAction::Claim],
            _ => Vec::new(),
        }
    }
}
