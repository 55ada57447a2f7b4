//! The control channel: how the migration coordinator, the source and the
//! target talk. Every message is also a durable record of the migration's
//! progress, so a restarted coordinator can read the history and finish or
//! roll back.

use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::digest::StateDigest;
use crate::error::BackendError;
use crate::position::Position;
use crate::store::SnapshotId;

/// Who sent a control message.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Role {
    /// The migration coordinator.
    Coordinator,
    /// The instance being migrated away from.
    Source,
    /// The instance being migrated to.
    Target,
    /// A node of the fleet speaking for itself: ownership claims and lease
    /// renewals (see [`migration::protocol::owner`](crate::migration::protocol::owner)).
    Node,
    /// An operator's decision (the `ms2m` CLI), e.g. skipping a poison input.
    Operator,
}

/// One owner's lease, as a claim that supersedes it names it: the owner's
/// epoch and the number of its latest renewal on the channel (0: the record
/// that made it the owner, before any renewal).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct LeaseTerm {
    /// The owner epoch.
    pub epoch: u64,
    /// The latest renewal of that epoch the claimant had seen.
    pub renewal: u64,
}

/// One message on the control channel.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ControlMessage {
    /// The service being migrated (the channel's partitioning key).
    pub service: String,
    /// Which migration this belongs to.
    pub migration_id: String,
    /// Who sent it.
    pub from: Role,
    /// Send time, ms since the Unix epoch (diagnostics only).
    pub sent_at_ms: u64,
    /// The message itself.
    pub body: ControlBody,
}

/// The migration protocol's records, in the order a migration publishes
/// them (see the [`migration`](crate::migration) module docs for the phase
/// table and [`migration::protocol`](crate::migration::protocol) for the
/// state machines that send and read them).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum ControlBody {
    /// Coordinator → all: a migration from `source` to `target` starts (the
    /// first record of every migration, whatever its strategy).
    Prepare {
        /// Instance id of the source.
        source: String,
        /// Instance id of the target.
        target: String,
        /// What the target does if the digests differ at Pf.
        #[serde(default)]
        digest_policy: crate::migration::DigestPolicy,
        /// The strategy the coordinator runs, so that a coordinator taking
        /// the migration over after a restart runs the same one. Records
        /// written before this field existed carry none (MS2M is assumed).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        strategy: Option<crate::migration::Strategy>,
    },
    /// Coordinator → source: take a checkpoint now (serialize, upload in the
    /// background, keep serving unless stopped) and report `CheckpointTaken`.
    Checkpoint,
    /// Source → coordinator: the checkpoint is stored.
    CheckpointTaken {
        /// Snapshot to restore.
        snapshot_id: SnapshotId,
        /// Its position (P0).
        position: Position,
        /// Encoded size.
        bytes: u64,
        /// How long input was paused to serialize it.
        pause_us: u64,
    },
    /// Coordinator → target: fetch and restore this snapshot (or start from
    /// an empty state: the cold-start baseline), then replay.
    Restore {
        /// Snapshot to restore; `None` for a cold start.
        snapshot_id: Option<SnapshotId>,
    },
    /// Coordinator → target: keep the state held as a standby (having none,
    /// restore the newest snapshot in the store, or the empty state), then
    /// replay ([`Strategy::Ms2mFromStandby`](crate::migration::Strategy::Ms2mFromStandby)).
    /// A record of its own rather than a flag on `Restore`: a target from
    /// before it cannot decode it and skips it, so the migration times out
    /// and rolls back, where an ignored flag would have read as a cold start.
    RestoreFromStandby,
    /// Target → coordinator: restored; replay is starting.
    Restored {
        /// Position restored at.
        position: Position,
        /// Time to fetch the snapshot.
        transfer_us: u64,
        /// Time to verify and restore it.
        restore_us: u64,
    },
    /// Source → target and coordinator: the source's state digest at Pd, a
    /// position it applied while serving (taken when the target restored).
    /// The target replays exactly to Pd and compares its own digest there,
    /// before the stop, so the cutover needs no digest.
    DigestAt {
        /// Pd.
        position: Position,
        /// The source's state digest at Pd.
        digest: StateDigest,
    },
    /// Source → target: the source's applied position (the target never
    /// replays past it while the source is live).
    SourceProgress {
        /// Source's position.
        position: Position,
    },
    /// Target → coordinator: replay progress.
    TargetProgress {
        /// Target's position.
        position: Position,
        /// Messages behind the source.
        lag: u64,
        /// Measured replay rate (messages/s).
        apply_rate: f64,
        /// Measured input rate (messages/s).
        input_rate: f64,
    },
    /// Coordinator → source and target: the source stops at the next message
    /// boundary; the target takes over when the source reports `Stopped`.
    Stop {
        /// The owner epoch the target will take.
        next_epoch: u64,
    },
    /// Source → coordinator and target: stopped at `position` (Pf) with
    /// every output committed; no output will follow. The target replays to
    /// Pf (comparing digests there only when `digest` is given: otherwise
    /// they were compared at the digest point), claims the sink and goes
    /// live.
    Stopped {
        /// Pf.
        position: Position,
        /// The source's state digest at Pf; `None` when it published
        /// `DigestAt` for this migration (the digests are compared there).
        digest: Option<StateDigest>,
        /// The longest time the source's apply loop stood still between the
        /// migration's start and the stop (serialization, commits, its own
        /// protocol work), in µs: clients saw it as downtime too.
        #[serde(default)]
        longest_stall_us: u64,
    },
    /// Target → all: the target takes over at `position` (Pf), digests
    /// matched. The decisive record of a migration: the first of a
    /// `Takeover` and a rollback (`Resume` or `Aborted`) on the channel
    /// wins, and every party decides by that order (see
    /// [`migration_outcome`](crate::migration::migration_outcome)). The
    /// target claims the sink only after it has read its `Takeover` back
    /// with no rollback before it.
    Takeover {
        /// Instance id of the new owner.
        owner: String,
        /// The owner epoch it takes.
        epoch: u64,
        /// Pf.
        position: Position,
    },
    /// Target → coordinator: live at `position` and its first outputs since
    /// committed (or the input idle); `owner` now owns the service.
    Live {
        /// Instance id of the new owner.
        owner: String,
        /// The owner epoch it holds.
        epoch: u64,
        /// Position it went live at.
        position: Position,
        /// Its digest at that position.
        digest: StateDigest,
        /// Whether it matched the source's.
        digest_match: bool,
        /// Messages applied in replay mode since the restore.
        replayed: u64,
        /// Of those, messages replayed after the source stopped (the final gap).
        final_gap: u64,
        /// How long before publishing this the target's first outputs
        /// since the handover became visible to clients (at-least-once:
        /// acknowledged; exactly-once: committed; or it went live, when no
        /// input waited), in µs: what the coordinator takes off its own
        /// stop-to-`Live` to get the handover clients saw (`None` from a
        /// target that does not measure it).
        #[serde(default)]
        visible_before_us: Option<u64>,
    },
    /// Target (or source, for a failed checkpoint) → coordinator: the
    /// migration cannot go on.
    CutoverFailed {
        /// Why.
        reason: String,
        /// `(source, target)` digests, when the failure is a digest mismatch.
        digest_mismatch: Option<(StateDigest, StateDigest)>,
    },
    /// Coordinator → source: migration done; release ownership and shut down.
    Release,
    /// Coordinator → source: migration failed after the stop; resume as the
    /// owner at the position you stopped at.
    Resume {
        /// Instance id of the source, which owns the service again.
        owner: String,
        /// The owner epoch the source resumes with.
        epoch: u64,
    },
    /// Coordinator → all: the migration was abandoned.
    Aborted {
        /// Why.
        reason: String,
    },
    /// Coordinator → all: the migration finished (JSON report attached).
    Completed {
        /// The migration report, as JSON.
        report_json: String,
    },
    /// Node → all: `owner` claims the service with `epoch`. Decisive when it
    /// lands while no one owns the service (the first start) or when the
    /// lease it names as `expired` is still the current owner's latest
    /// (no renewal landed in between) and `epoch` is higher; otherwise it
    /// lost a race and changes nothing. A decisive claim also rolls back
    /// every migration still undecided. `migration_id` is empty.
    Claim {
        /// The instance id claiming ownership.
        owner: String,
        /// The epoch it claims.
        epoch: u64,
        /// The lease that expired (`None`: the first claim of the service).
        expired: Option<LeaseTerm>,
    },
    /// Owner → all: renewal number `renewal` of the lease of `owner` at
    /// `epoch`. Counts only while `owner` holds `epoch`; a standby measures
    /// the lease's expiry from the last renewal it read. `migration_id` is
    /// empty.
    Renew {
        /// The owner renewing.
        owner: String,
        /// Its epoch.
        epoch: u64,
        /// The renewal's number within the epoch, from 1.
        renewal: u64,
        /// Tells the renewals of one lease keeper from those of another
        /// process with the same instance id (a restarted owner, or one
        /// still in flight from before a crash), so a keeper counts only
        /// its own; random per keeper, 0 for renewals no keeper counts
        /// (and for renewals written before the field existed).
        #[serde(default)]
        incarnation: u64,
    },
    /// Operator → all: the input record at `topic`/`partition`@`offset` may
    /// be skipped if it is bad (it does not decode, or `apply` rejects it),
    /// whatever the instance's `BadMessagePolicy`; a good record there is
    /// applied as usual. The record is the audit trail: who (`operator`),
    /// why (`reason`) and when (`sent_at_ms`). Honoured by nodes when they
    /// next build an instance (recovery, standby, target). `migration_id`
    /// is empty.
    SkipInput {
        /// Input topic.
        topic: String,
        /// Partition.
        partition: i32,
        /// Offset of the bad record.
        offset: i64,
        /// Why it is skipped.
        reason: String,
        /// Who decided (e.g. the login running the CLI).
        operator: String,
    },
    /// Node → operators: `node` now plays `role` (published at each change
    /// of role, never periodically), so `ms2m status` can list standbys
    /// that publish nothing else. Only the owner's liveness is known (its
    /// lease): a node that died keeps its last announced role here. No
    /// protocol party folds it. `migration_id` is empty.
    Announce {
        /// The node's instance id.
        node: String,
        /// Its new role.
        role: crate::node::NodeRole,
    },
    /// Host → fleet: `host` is alive and hosts tasks of the service
    /// (published every [`FleetOptions::heartbeat`](crate::fleet::FleetOptions::heartbeat)
    /// under the service's name). A host not heard from for
    /// [`FleetOptions::host_timeout`](crate::fleet::FleetOptions::host_timeout)
    /// is dead: its tasks are assigned to others. `migration_id` is empty.
    Heartbeat {
        /// The host's id (the instance id of each of its task nodes).
        host: String,
    },
    /// Fleet leader → hosts: `task` belongs on `host` (the latest record per
    /// task counts). The host starts a node for it; the leader then moves
    /// the task there with a migration, or, when its owner is dead, the
    /// node claims it once the lease expired. `migration_id` is empty.
    Assign {
        /// The task's id (`{service}/p{partition}`).
        task: String,
        /// The host it belongs on.
        host: String,
    },
    /// Operator → fleet: move every task off `host` (it keeps serving
    /// until each is moved; it is never assigned tasks again under this
    /// id). `migration_id` is empty.
    Drain {
        /// The host to empty.
        host: String,
        /// Who decided.
        operator: String,
    },
    /// Operator → fleet: spread the tasks evenly over the live hosts now
    /// (hosts with automatic rebalancing off move tasks only for dead or
    /// drained hosts otherwise). `migration_id` is empty.
    Rebalance {
        /// Who asked.
        operator: String,
    },
}

impl ControlMessage {
    /// Encodes as JSON (readable with any Kafka tool).
    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("control messages always serialize")
    }

    /// Decodes from JSON.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(bytes)
    }
}

/// A durable, ordered channel of control messages for one service.
#[async_trait]
pub trait ControlChannel: Send + Sync + 'static {
    /// The backend's error.
    type Error: BackendError;
    /// A reader returned by [`ControlChannel::reader`].
    type Reader: ControlReader<Error = Self::Error>;

    /// Appends one message.
    async fn publish(&self, message: &ControlMessage) -> Result<(), Self::Error>;

    /// A reader that sees every message published from now on, or, with
    /// `from_start`, every message still retained.
    async fn reader(&self, from_start: bool) -> Result<Self::Reader, Self::Error>;

    /// Every retained message, up to the end of the channel at the time of
    /// the call (a restarted coordinator's view of the past).
    async fn history(&self) -> Result<Vec<ControlMessage>, Self::Error>;
}

/// Reads a [`ControlChannel`] in order.
#[async_trait]
pub trait ControlReader: Send + 'static {
    /// The backend's error.
    type Error: BackendError;

    /// The next message, waiting at most `timeout`; `None` on time-out.
    async fn next(&mut self, timeout: Duration) -> Result<Option<ControlMessage>, Self::Error>;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A renewal written before renewals carried an incarnation still
    /// decodes (as incarnation 0, which no keeper counts): a rolling upgrade
    /// must not make new nodes skip the old owner's renewals and claim.
    #[test]
    fn a_renewal_without_an_incarnation_decodes_as_zero() {
        let old = br#"{"service":"s","migration_id":"","from":"Node","sent_at_ms":1,
            "body":{"Renew":{"owner":"a","epoch":2,"renewal":3}}}"#;
        let m = ControlMessage::from_bytes(old).expect("decodes");
        assert_eq!(
            m.body,
            ControlBody::Renew {
                owner: "a".into(),
                epoch: 2,
                renewal: 3,
                incarnation: 0
            }
        );
    }

    /// A `Prepare` written before it carried the strategy still decodes
    /// (without one); one that carries it keeps it through a round trip.
    #[test]
    fn a_prepare_carries_its_strategy_and_one_without_decodes() {
        let old = br#"{"service":"s","migration_id":"m","from":"Coordinator","sent_at_ms":1,
            "body":{"Prepare":{"source":"a","target":"b","digest_policy":"Abort"}}}"#;
        let m = ControlMessage::from_bytes(old).expect("decodes");
        assert!(matches!(m.body, ControlBody::Prepare { strategy: None, .. }), "{m:?}");
        let new = ControlMessage {
            body: ControlBody::Prepare {
                source: "a".into(),
                target: "b".into(),
                digest_policy: Default::default(),
                strategy: Some(crate::migration::Strategy::StopAndCopy),
            },
            ..m
        };
        assert_eq!(ControlMessage::from_bytes(&new.to_bytes()).expect("round trip"), new);
    }
}
