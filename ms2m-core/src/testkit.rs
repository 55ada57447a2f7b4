//! A reference service and an independent reference fold, shared by the
//! protocol tests (in-memory) and the integration tests (Kafka).
//!
//! The service keeps per-account balances and emits one output per message
//! naming the message's partition and offset, so tests can prove every
//! output appears exactly once.

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::codec::{self, CodecError, Json};
use crate::digest::{Digester, StateDigest};
use crate::service::{ApplyContext, StatefulService};
use crate::state::{ServiceState, StateError};

/// One input: add `amount` to `account`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Deposit {
    /// Account name.
    pub account: String,
    /// Amount (may be negative).
    pub amount: i64,
}

/// One output: the new balance after a message.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct BalanceChanged {
    /// Input partition of the message.
    pub partition: i32,
    /// Input offset of the message.
    pub offset: i64,
    /// Account.
    pub account: String,
    /// Balance after the message.
    pub balance: i64,
}

/// The reference service: balances per account.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Balances {
    /// Balance per account.
    pub accounts: HashMap<String, i64>,
    /// Messages applied.
    pub applied: u64,
}

impl ServiceState for Balances {
    const SCHEMA_VERSION: u32 = 1;

    fn snapshot(&self) -> Result<Vec<u8>, CodecError> {
        codec::encode(self)
    }

    fn restore(schema_version: u32, bytes: &[u8]) -> Result<Self, StateError> {
        if schema_version != Self::SCHEMA_VERSION {
            return Err(StateError::UnknownSchemaVersion {
                found: schema_version,
                current: Self::SCHEMA_VERSION,
                upgradable: vec![],
            });
        }
        codec::decode(bytes).map_err(|source| StateError::Decode {
            version: schema_version,
            source,
        })
    }

    fn digest(&self) -> StateDigest {
        let mut d = Digester::new();
        d.field("accounts", &self.accounts);
        d.field("applied", &self.applied);
        d.finish()
    }
}

#[async_trait]
impl StatefulService for Balances {
    const NAME: &'static str = "balances";
    type Message = Deposit;
    type Format = Json;
    type Error = Infallible;

    async fn apply(&mut self, m: Deposit, ctx: &mut ApplyContext<'_>) -> Result<(), Infallible> {
        let balance = self.accounts.entry(m.account.clone()).or_default();
        *balance += m.amount;
        self.applied += 1;
        let out = BalanceChanged {
            partition: ctx.partition(),
            offset: ctx.offset(),
            account: m.account,
            balance: *balance,
        };
        ctx.emit(&out);
        Ok(())
    }
}

/// The deterministic input generator: message `i` of a test run.
pub fn deposit(i: u64) -> Deposit {
    Deposit {
        account: format!("acct-{}", i % 7),
        amount: (i as i64 % 13) - 4,
    }
}

/// The JSON payload of [`deposit`]`(i)`.
pub fn deposit_payload(i: u64) -> Vec<u8> {
    serde_json::to_vec(&deposit(i)).expect("deposits serialize")
}

/// The reference fold, computed without the runtime: per-partition messages
/// in offset order, as `(partition, offset, deposit)`.
pub fn reference_fold(input: &[(i32, i64, Deposit)]) -> (Balances, Vec<BalanceChanged>) {
    let mut by_partition: BTreeMap<i32, Vec<(i64, &Deposit)>> = BTreeMap::new();
    for (p, o, d) in input {
        by_partition.entry(*p).or_default().push((*o, d));
    }
    // Balances are sums: the final state does not depend on how partitions
    // interleave. The outputs' balances do, so they are recomputed per
    // partition order only for the final-state check; output identity is
    // checked by (partition, offset).
    let mut state = Balances::default();
    let mut outputs = Vec::new();
    for (p, msgs) in by_partition {
        for (o, d) in msgs {
            let b = state.accounts.entry(d.account.clone()).or_default();
            *b += d.amount;
            state.applied += 1;
            outputs.push(BalanceChanged {
                partition: p,
                offset: o,
                account: d.account.clone(),
                balance: *b,
            });
        }
    }
    (state, outputs)
}

/// Checks that `outputs` holds exactly one output for every input message
/// (by partition and offset); returns (missing, duplicated) counts.
pub fn output_exactly_once(input: &[(i32, i64, Deposit)], outputs: &[BalanceChanged]) -> (usize, usize) {
    let mut seen: HashMap<(i32, i64), usize> = HashMap::new();
    for o in outputs {
        *seen.entry((o.partition, o.offset)).or_default() += 1;
    }
    let missing = input.iter().filter(|(p, o, _)| !seen.contains_key(&(*p, *o))).count();
    let duplicated = seen.values().filter(|n| **n > 1).map(|n| n - 1).sum();
    (missing, duplicated)
}

static NOISE: AtomicU64 = AtomicU64::new(0);

/// [`Balances`] plus a deliberately non-deterministic field (it reads a
/// process-wide counter in `apply`): a target replaying the same messages
/// ends in a different state, which the digest check at cutover must catch.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Nondeterministic {
    /// The deterministic part.
    pub balances: Balances,
    /// Differs between processes (and instances) for the same input.
    pub noise: u64,
}

impl ServiceState for Nondeterministic {
    const SCHEMA_VERSION: u32 = 1;

    fn snapshot(&self) -> Result<Vec<u8>, CodecError> {
        codec::encode(self)
    }

    fn restore(schema_version: u32, bytes: &[u8]) -> Result<Self, StateError> {
        codec::decode(bytes).map_err(|source| StateError::Decode {
            version: schema_version,
            source,
        })
    }

    fn digest(&self) -> StateDigest {
        crate::digest::digest_of(self)
    }
}

#[async_trait]
impl StatefulService for Nondeterministic {
    const NAME: &'static str = "balances";
    type Message = Deposit;
    type Format = Json;
    type Error = Infallible;

    async fn apply(&mut self, m: Deposit, ctx: &mut ApplyContext<'_>) -> Result<(), Infallible> {
        self.noise = self.noise.wrapping_add(NOISE.fetch_add(1, Ordering::Relaxed));
        self.balances.apply(m, ctx).await
    }
}

/// Input topic of [`MemoryCluster`].
pub const INPUT_TOPIC: &str = "deposits";
/// Partitions of [`MemoryCluster`]'s input topic.
pub const INPUT_PARTITIONS: i32 = 2;

/// A whole in-memory deployment for protocol tests: the input log, a shared
/// snapshot store, transactional outputs, the control channel, and a record
/// of every deposit produced (for the reference fold). Clone to share.
#[derive(Clone, Debug)]
pub struct MemoryCluster {
    /// The input log.
    pub log: crate::memory::MemoryLog,
    /// The snapshot store every instance shares.
    pub store: crate::memory::MemorySnapshotStore,
    /// The committed outputs.
    pub outputs: crate::memory::MemoryOutputs,
    /// The migration control channel.
    pub control: std::sync::Arc<crate::memory::MemoryControl>,
    /// Every deposit produced, as `(partition, offset, deposit)`.
    pub input: std::sync::Arc<std::sync::Mutex<Vec<(i32, i64, Deposit)>>>,
}

impl Default for MemoryCluster {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryCluster {
    /// An empty deployment.
    pub fn new() -> Self {
        Self {
            log: crate::memory::MemoryLog::new(INPUT_TOPIC, INPUT_PARTITIONS),
            store: crate::memory::MemorySnapshotStore::new(),
            outputs: crate::memory::MemoryOutputs::new(),
            control: std::sync::Arc::new(crate::memory::MemoryControl::new()),
            input: std::sync::Arc::default(),
        }
    }

    /// Fresh backends for one instance: its own log reader and sink, the shared store.
    pub fn backends(
        &self,
    ) -> crate::Backends<crate::memory::MemoryLogReader, crate::memory::MemorySnapshotStore, crate::memory::MemorySink>
    {
        crate::Backends {
            log: self.log.reader(),
            store: std::sync::Arc::new(self.store.clone()),
            sink: self.outputs.sink(),
        }
    }

    /// Produces the next `n` deposits, round-robin over the partitions.
    pub fn produce_now(&self, n: u64) {
        let mut input = self.input.lock().unwrap_or_else(|p| p.into_inner());
        for _ in 0..n {
            let i = input.len() as u64;
            let p = (i % INPUT_PARTITIONS as u64) as i32;
            let o = self.log.append(INPUT_TOPIC, p, None, deposit_payload(i));
            input.push((p, o, deposit(i)));
        }
    }

    /// Produces `n` deposits in bursts of 20, one burst every `every`.
    pub fn produce_steady(&self, n: u64, every: std::time::Duration) -> tokio::task::JoinHandle<()> {
        let this = self.clone();
        tokio::spawn(async move {
            let mut left = n;
            while left > 0 {
                let burst = left.min(20);
                this.produce_now(burst);
                left -= burst;
                tokio::time::sleep(every).await;
            }
        })
    }

    /// Every deposit produced so far.
    pub fn produced(&self) -> Vec<(i32, i64, Deposit)> {
        self.input.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Whether any control message so far satisfies `f`.
    pub fn has(&self, f: impl Fn(&crate::ControlMessage) -> bool) -> bool {
        self.control.history().iter().any(f)
    }

    /// How many checkpoint requests and reports the control channel holds
    /// (a move from the standby has none).
    pub fn checkpoint_records(&self) -> usize {
        let checkpoint = |m: &&crate::ControlMessage| {
            matches!(
                m.body,
                crate::ControlBody::Checkpoint | crate::ControlBody::CheckpointTaken { .. }
            )
        };
        self.control.history().iter().filter(checkpoint).count()
    }

    /// The committed [`BalanceChanged`] outputs on `topic`.
    pub fn balance_outputs(&self, topic: &str) -> Vec<BalanceChanged> {
        self.outputs
            .committed()
            .iter()
            .filter(|o| &*o.topic == topic)
            .map(|o| serde_json::from_slice(&o.payload).expect("balance outputs decode"))
            .collect()
    }
}
