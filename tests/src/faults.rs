//! The seeded fault-injection harness: a scenario generator, one set of
//! scenario bodies run on every backend, the invariant checks, and the
//! summary printed at the end of a run.
//!
//! # Why one harness
//!
//! The guarantees under test (no input lost, outputs exactly once where the
//! sink is transactional, one owner, divergence caught) are properties of
//! the runtime and the migration protocol, which run on the core's backend
//! traits. So the scenarios are written once (`scenarios`, `migration`)
//! against a small [`Deployment`] trait, and each backend only says how to
//! produce input, read what was committed, damage storage and inject the
//! faults it has (`memory`: ms2m-core's in-memory backends; `kafka`:
//! the embedded mock cluster or tansu). A fault a backend cannot inject is
//! not generated for it.
//!
//! Every scenario is a pure function of its seed (which kind, which fault,
//! at which phase, message counts, commit and snapshot intervals), so a
//! failing seed replays with
//! `MS2M_FAULT_SEED=<seed> cargo test -p ms2m-tests --test fault_injection <test>`.
//! Timing inside a scenario (how far a producer got when a crash hits) is
//! not replayed bit for bit; the fault, its phase and the checks are.
//!
//! # What is checked after every run
//!
//! * the final state equals the reference fold of all input (nothing lost);
//! * outputs: none missing; none duplicated on the in-memory backends
//!   (`MemorySink` is a faithful transactional sink). On the embedded mock
//!   and on tansu duplicates are counted and must stay within the
//!   at-least-once window (`2 × (commit_every + batch - 1)` outputs per crash): the mock does
//!   not implement transactions and tansu has none, so exactly-once cannot
//!   be shown there;
//! * exactly one owner at the end: the control channel's order decides a
//!   migration (`migration_outcome`), `current_owner` names that instance,
//!   and `ensure_owner` refuses the other one;
//! * digests: a migration reported as complete has equal digests; an
//!   injected divergence must be detected (`DigestMismatch`) and rolled back;
//! * every bad input is answered by a typed error or the documented policy.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

pub use ms2m_core::migration::Strategy;

mod deployment;
mod drift;
mod kafka;
mod memory;
mod migration;
mod scenarios;

pub use deployment::{Deployment, Guarantee, Timing};
pub use kafka::{KafkaDeployment, KafkaEnv};
pub use memory::MemoryDeployment;
pub use scenarios::run_scenario;

/// Partitions of every scenario's input topic.
pub const INPUT_PARTITIONS: i32 = 2;

/// Runs one scenario on a fresh in-memory cluster.
pub async fn run_memory(sc: Scenario) -> Outcome {
    run_scenario(MemoryDeployment::new(), sc).await
}

/// Runs one scenario on fresh topics of the test broker.
pub async fn run_kafka(env: KafkaEnv, sc: Scenario) -> Outcome {
    let deployment = KafkaDeployment::new(&env, &sc).await;
    run_scenario(deployment, sc).await
}

/// Where a scenario runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Backend {
    /// ms2m-core's in-memory backends (exactly-once sink).
    Memory,
    /// librdkafka's embedded mock cluster.
    Mock,
    /// tansu, a real Kafka-compatible broker.
    Tansu,
}

impl Backend {
    /// The backend the Kafka scenarios run on, from `MS2M_TEST_BROKERS`.
    pub fn kafka() -> Self {
        if crate::on_mock() {
            Backend::Mock
        } else {
            Backend::Tansu
        }
    }
}

/// The phase a fault hits: the migration's phases in protocol order
/// (checkpoint on the source, transfer of the snapshot, restore on the
/// target, replay behind the source, cutover), plus `Live` for an owner
/// serving (before a recovery, or after a migration).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Phase {
    Checkpoint,
    Transfer,
    Restore,
    Replay,
    Cutover,
    Live,
}

const PHASES: [Phase; 6] = [
    Phase::Checkpoint,
    Phase::Transfer,
    Phase::Restore,
    Phase::Replay,
    Phase::Cutover,
    Phase::Live,
];

/// The injected fault.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Fault {
    /// No fault (control runs, not counted as fault-injected).
    None,
    /// The source (or the single owner) crashes: task aborted or instance
    /// dropped without commit or final snapshot.
    CrashSource,
    /// The migration target crashes.
    CrashTarget,
    /// The coordinator's task is aborted (in-process stand-in for a killed
    /// process); a new coordinator recovers from the control history.
    CrashCoordinator,
    /// The snapshot store is unreachable for a while (in-memory store).
    StoreUnavailable,
    /// The mock cluster's broker goes down and comes back.
    BrokerDown,
    /// The mock cluster fails Produce / Fetch / OffsetCommit requests.
    RequestErrors,
    /// The mock cluster adds round-trip latency.
    Latency,
    /// The tansu process is stopped and restarted on its sqlite file.
    BrokerRestart,
    /// The newest snapshot (or the migration's) fails its checksum.
    CorruptSnapshot,
    /// The newest snapshot is truncated.
    TruncatedSnapshot,
    /// The newest snapshot (or one of its chunks) is missing.
    MissingSnapshot,
    /// The newest snapshot has a schema version the service cannot read.
    UnknownSchema,
    /// An undecodable input message, policy `Fail`.
    BadInputFail,
    /// An undecodable input message, policy `DeadLetter`.
    BadInputDeadLetter,
    /// Retention deleted the log tail the snapshot needs.
    TailDeleted,
    /// A released source keeps stepping and tries to emit.
    ZombieSource,
    /// The target's `apply` diverges in replay: must be caught by the digest.
    Divergence,
}

impl Fault {
    /// Whether the fault hits the broker (every party at once).
    pub fn is_broker_fault(self) -> bool {
        matches!(
            self,
            Fault::BrokerDown | Fault::RequestErrors | Fault::Latency | Fault::BrokerRestart
        )
    }
}

/// What a scenario exercises.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Run, fault, recover, finish.
    Recovery,
    /// A migration with the given strategy.
    Migration(Strategy),
    /// Bad input under a policy.
    BadInput,
    /// Snapshot damage or an unknown schema version, then recovery.
    Snapshot,
    /// Log tail deleted before recovery.
    TailDeleted,
}

/// One generated scenario.
#[derive(Clone, Debug)]
pub struct Scenario {
    pub seed: u64,
    pub backend: Backend,
    pub kind: Kind,
    pub fault: Fault,
    pub phase: Phase,
    /// Messages before the instance starts.
    pub initial: u64,
    /// Messages produced while it runs.
    pub during: u64,
    pub commit_every: u64,
    pub snapshot_every: u64,
    /// A fraction in [0, 1) picking the crash point inside the phase.
    pub at: f64,
    /// A free bit for variants (e.g. the coordinator dies before or after `Stop`).
    pub variant: bool,
}

/// Damage done to the newest snapshot before a recovery.
const SNAPSHOT_FAULTS: [Fault; 4] = [
    Fault::CorruptSnapshot,
    Fault::TruncatedSnapshot,
    Fault::MissingSnapshot,
    Fault::UnknownSchema,
];

/// An undecodable input message under each policy.
const BAD_INPUT_FAULTS: [Fault; 2] = [Fault::BadInputFail, Fault::BadInputDeadLetter];

const STRATEGIES: [Strategy; 5] = [
    Strategy::Ms2m,
    Strategy::Ms2mThreshold,
    Strategy::Ms2mFromStandby,
    Strategy::StopAndCopy,
    Strategy::ColdStart,
];

/// Phases a strategy has (the baselines stop the source first: no replay
/// while it serves; cold start and MS2M from the standby take no
/// checkpoint; here the target of MS2M from the standby is started by
/// `run_target`, without standby state, so its restore loads the newest
/// snapshot in the store).
pub fn phases_of(strategy: Strategy) -> &'static [Phase] {
    match strategy {
        Strategy::Ms2m | Strategy::Ms2mThreshold => &PHASES,
        Strategy::Ms2mFromStandby => &[Phase::Restore, Phase::Replay, Phase::Cutover, Phase::Live],
        Strategy::StopAndCopy => &[
            Phase::Checkpoint,
            Phase::Transfer,
            Phase::Restore,
            Phase::Cutover,
            Phase::Live,
        ],
        Strategy::ColdStart => &[Phase::Restore, Phase::Cutover, Phase::Live],
    }
}

/// The faults an in-memory migration draws at `phase`.
fn in_memory_migration_faults(phase: Phase) -> &'static [Fault] {
    const CRASHES: [Fault; 3] = [Fault::CrashSource, Fault::CrashTarget, Fault::CrashCoordinator];
    match phase {
        Phase::Live => &[
            Fault::CrashSource,
            Fault::CrashTarget,
            Fault::CrashCoordinator,
            Fault::ZombieSource,
        ],
        Phase::Checkpoint => &[
            Fault::CrashSource,
            Fault::CrashTarget,
            Fault::CrashCoordinator,
            Fault::StoreUnavailable,
        ],
        Phase::Transfer => &[
            Fault::CrashSource,
            Fault::CrashTarget,
            Fault::CrashCoordinator,
            Fault::StoreUnavailable,
            Fault::CorruptSnapshot,
            Fault::TruncatedSnapshot,
            Fault::MissingSnapshot,
        ],
        Phase::Replay => &[
            Fault::CrashSource,
            Fault::CrashTarget,
            Fault::CrashCoordinator,
            Fault::Divergence,
        ],
        _ => &CRASHES,
    }
}

/// The broker faults a backend can inject.
fn broker_faults(backend: Backend) -> &'static [Fault] {
    match backend {
        Backend::Mock => &[Fault::BrokerDown, Fault::RequestErrors, Fault::Latency],
        Backend::Tansu => &[Fault::BrokerRestart],
        Backend::Memory => &[],
    }
}

/// One of `xs`, uniformly.
fn pick<T: Copy>(rng: &mut StdRng, xs: &[T]) -> T {
    xs[rng.gen_range(0..xs.len())]
}

impl Scenario {
    /// The scenario of `seed` on `backend`.
    pub fn generate(seed: u64, backend: Backend) -> Self {
        let mut rng = StdRng::seed_from_u64(seed ^ 0x6d73_326d_6661_756c);
        let mut s = Scenario {
            seed,
            backend,
            kind: Kind::Recovery,
            fault: Fault::None,
            phase: Phase::Live,
            initial: 0,
            during: 0,
            commit_every: rng.gen_range(5..60),
            snapshot_every: rng.gen_range(40..200),
            at: rng.gen_range(0.0..1.0),
            variant: rng.gen(),
        };
        match backend {
            Backend::Memory => s.draw_in_memory(&mut rng),
            Backend::Mock | Backend::Tansu => s.draw_on_broker(&mut rng),
        }
        s
    }

    /// In memory: mostly migrations (crashes at exact protocol steps, store
    /// outages, damaged migration snapshots, divergence), then recovery,
    /// snapshot damage, bad input and a deleted log tail.
    fn draw_in_memory(&mut self, rng: &mut StdRng) {
        self.initial = rng.gen_range(200..1_200);
        self.during = rng.gen_range(100..800);
        let roll = rng.gen_range(0..100);
        let (kind, phase, fault) = if roll < 55 {
            return self.draw_in_memory_migration(rng);
        } else if roll < 75 {
            let phases = [Phase::Checkpoint, Phase::Restore, Phase::Replay, Phase::Live];
            (Kind::Recovery, pick(rng, &phases), Fault::CrashSource)
        } else if roll < 87 {
            (Kind::Snapshot, Phase::Restore, pick(rng, &SNAPSHOT_FAULTS))
        } else if roll < 95 {
            let phase = pick(rng, &[Phase::Live, Phase::Replay]);
            (Kind::BadInput, phase, pick(rng, &BAD_INPUT_FAULTS))
        } else {
            (Kind::TailDeleted, Phase::Restore, Fault::TailDeleted)
        };
        (self.kind, self.phase, self.fault) = (kind, phase, fault);
    }

    fn draw_in_memory_migration(&mut self, rng: &mut StdRng) {
        let strategy = pick(rng, &STRATEGIES);
        self.kind = Kind::Migration(strategy);
        self.phase = pick(rng, phases_of(strategy));
        self.fault = pick(rng, in_memory_migration_faults(self.phase));
        let damages_snapshot = matches!(
            self.fault,
            Fault::CorruptSnapshot | Fault::TruncatedSnapshot | Fault::MissingSnapshot
        );
        if damages_snapshot && strategy == Strategy::ColdStart {
            // Cold start transfers no snapshot.
            self.fault = Fault::CrashTarget;
        }
        if rng.gen_range(0..20) == 0 {
            self.fault = Fault::None;
        }
    }

    /// On a broker: recovery after a crash or a broker fault, snapshot
    /// damage, bad input, a deleted log tail (mock), and migrations.
    fn draw_on_broker(&mut self, rng: &mut StdRng) {
        self.initial = rng.gen_range(60..250);
        self.during = rng.gen_range(30..150);
        let broker_faults = broker_faults(self.backend);
        let roll = rng.gen_range(0..100);
        let (kind, phase, fault) = if roll < 22 {
            let phase = pick(rng, &[Phase::Checkpoint, Phase::Replay, Phase::Live]);
            (Kind::Recovery, phase, Fault::CrashSource)
        } else if roll < 36 {
            let phase = pick(rng, &[Phase::Replay, Phase::Live]);
            let fault = pick(rng, broker_faults);
            // tansu 0.6 panics its storage task when an idempotent producer
            // from before a restart produces again (`idempotent_message_check`:
            // "more or less than one row"), so the instance is down while
            // tansu restarts and the next one recovers against the restarted broker.
            let phase = if self.backend == Backend::Tansu {
                Phase::Replay
            } else {
                phase
            };
            (Kind::Recovery, phase, fault)
        } else if roll < 46 {
            (Kind::Snapshot, Phase::Restore, pick(rng, &SNAPSHOT_FAULTS))
        } else if roll < 54 {
            (Kind::BadInput, Phase::Live, pick(rng, &BAD_INPUT_FAULTS))
        } else if roll < 57 && self.backend == Backend::Mock {
            (Kind::TailDeleted, Phase::Restore, Fault::TailDeleted)
        } else {
            return self.draw_broker_migration(rng, broker_faults);
        };
        (self.kind, self.phase, self.fault) = (kind, phase, fault);
    }

    /// A crash of any party, or (on the mock) a broker fault, at every
    /// phase the strategy has.
    fn draw_broker_migration(&mut self, rng: &mut StdRng, broker_faults: &[Fault]) {
        let strategy = pick(rng, &STRATEGIES);
        self.kind = Kind::Migration(strategy);
        self.phase = pick(rng, phases_of(strategy));
        let crashes: &[Fault] = if self.phase == Phase::Live {
            &[Fault::ZombieSource, Fault::CrashTarget, Fault::CrashCoordinator]
        } else {
            &[Fault::CrashTarget, Fault::CrashCoordinator, Fault::CrashSource]
        };
        // Broker faults during migrations on the mock only (the tansu
        // restart bug above would kill the broker).
        self.fault = if self.backend == Backend::Mock && rng.gen_range(0..3) == 0 {
            pick(rng, broker_faults)
        } else {
            pick(rng, crashes)
        };
    }

    /// Whether the fault hits the whole broker, so no other scenario may
    /// run meanwhile (a tansu restart; each mock scenario has its own cluster).
    pub fn runs_alone(&self) -> bool {
        self.fault == Fault::BrokerRestart
    }

    /// The command that replays this seed.
    pub fn replay_command(&self) -> String {
        let (test, env) = match self.backend {
            Backend::Memory => ("fault_scenarios_in_memory", ""),
            Backend::Mock => ("kafka_scenarios", "env -u MS2M_TEST_BROKERS "),
            Backend::Tansu => ("kafka_scenarios", "MS2M_TEST_BROKERS=<tansu address> "),
        };
        format!(
            "{env}MS2M_FAULT_SEED={} cargo test -p ms2m-tests --test fault_injection {test} -- --nocapture",
            self.seed
        )
    }
}

impl fmt::Display for Scenario {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match self.kind {
            Kind::Migration(s) => format!("migration ({s})"),
            k => format!("{k:?}"),
        };
        write!(
            f,
            "seed {} [{:?}] {kind}: {:?} at {:?} (initial {}, during {}, commit every {}, snapshot every {})",
            self.seed,
            self.backend,
            self.fault,
            self.phase,
            self.initial,
            self.during,
            self.commit_every,
            self.snapshot_every
        )
    }
}

/// What one scenario observed (merged into [`Summary`]).
#[derive(Clone, Debug, Default)]
pub struct Outcome {
    /// Whether the fault actually hit (a trigger the run never reached does not count).
    pub injected: bool,
    pub migration_completed: bool,
    pub migration_rolled_back: bool,
    pub lost: u64,
    /// Duplicated outputs where exactly-once is claimed (must be 0).
    pub duplicated_exactly_once: u64,
    /// Duplicated outputs on an at-least-once path (within the window).
    pub duplicated_at_least_once: u64,
    pub divergences_detected: u64,
    pub divergences_undetected: u64,
    /// Typed errors observed and expected (decode, truncated log, fenced, ...).
    pub typed_errors: u64,
    pub dead_lettered: u64,
    pub snapshots_rejected: u64,
    /// Findings that are not invariant violations but worth reporting.
    pub notes: Vec<String>,
}

/// Totals of a run, printed at the end.
#[derive(Debug, Default)]
pub struct Summary {
    pub scenarios: u64,
    pub fault_injected: u64,
    pub per_backend: BTreeMap<String, u64>,
    pub faults: BTreeMap<String, u64>,
    pub faults_by_phase: BTreeMap<String, u64>,
    pub migrations_completed: u64,
    pub migrations_rolled_back: u64,
    pub lost: u64,
    pub duplicated_exactly_once: u64,
    pub duplicated_at_least_once: u64,
    pub divergences_detected: u64,
    pub divergences_undetected: u64,
    pub typed_errors: u64,
    pub dead_lettered: u64,
    pub snapshots_rejected: u64,
    pub notes: BTreeMap<String, u64>,
    pub failures: Vec<String>,
    pub elapsed: Duration,
}

impl Summary {
    fn add(&mut self, s: &Scenario, o: &Outcome) {
        self.scenarios += 1;
        *self.per_backend.entry(format!("{:?}", s.backend)).or_default() += 1;
        if o.injected && s.fault != Fault::None {
            self.fault_injected += 1;
            *self.faults.entry(format!("{:?}", s.fault)).or_default() += 1;
            let kind = match s.kind {
                Kind::Migration(st) => format!("migration/{st:?}"),
                k => format!("{k:?}"),
            };
            *self
                .faults_by_phase
                .entry(format!("{:?} x {:?} x {kind} x {:?}", s.fault, s.phase, s.backend))
                .or_default() += 1;
        }
        self.migrations_completed += o.migration_completed as u64;
        self.migrations_rolled_back += o.migration_rolled_back as u64;
        self.lost += o.lost;
        self.duplicated_exactly_once += o.duplicated_exactly_once;
        self.duplicated_at_least_once += o.duplicated_at_least_once;
        self.divergences_detected += o.divergences_detected;
        self.divergences_undetected += o.divergences_undetected;
        self.typed_errors += o.typed_errors;
        self.dead_lettered += o.dead_lettered;
        self.snapshots_rejected += o.snapshots_rejected;
        for n in &o.notes {
            *self.notes.entry(n.clone()).or_default() += 1;
        }
    }

    /// Whether the run upholds the invariants.
    pub fn ok(&self) -> bool {
        self.failures.is_empty()
            && self.lost == 0
            && self.duplicated_exactly_once == 0
            && self.divergences_undetected == 0
    }
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "==== fault-injection summary ({:.1} s)", self.elapsed.as_secs_f64())?;
        writeln!(
            f,
            "scenarios run: {} ({} fault-injected) {:?}",
            self.scenarios, self.fault_injected, self.per_backend
        )?;
        writeln!(f, "faults injected per kind:")?;
        for (k, n) in &self.faults {
            writeln!(f, "  {k:<20} {n}")?;
        }
        writeln!(f, "faults injected per kind x phase x scenario x backend:")?;
        for (k, n) in &self.faults_by_phase {
            writeln!(f, "  {k:<60} {n}")?;
        }
        writeln!(
            f,
            "migrations completed: {}, rolled back / aborted: {}",
            self.migrations_completed, self.migrations_rolled_back
        )?;
        writeln!(f, "messages lost: {}", self.lost)?;
        writeln!(
            f,
            "outputs duplicated (exactly-once, in-memory transactional sink): {}",
            self.duplicated_exactly_once
        )?;
        writeln!(
            f,
            "outputs duplicated (at-least-once window, mock / tansu: no real transactions): {}",
            self.duplicated_at_least_once
        )?;
        writeln!(
            f,
            "divergences detected: {}, undetected: {}",
            self.divergences_detected, self.divergences_undetected
        )?;
        writeln!(
            f,
            "typed errors seen: {}, dead-lettered: {}, snapshots rejected on load: {}",
            self.typed_errors, self.dead_lettered, self.snapshots_rejected
        )?;
        for (n, c) in &self.notes {
            writeln!(f, "note ({c}x): {n}")?;
        }
        if self.failures.is_empty() {
            writeln!(f, "failures: 0")?;
        } else {
            writeln!(f, "FAILURES: {}", self.failures.len())?;
            for x in &self.failures {
                writeln!(f, "  {x}")?;
            }
        }
        Ok(())
    }
}

/// The seeds to run: `MS2M_FAULT_SEED` (one), else `MS2M_FAULT_SEEDS`
/// (count, default `default_count`) from `MS2M_FAULT_SEED_BASE` (default 0).
pub fn seeds(default_count: u64) -> Vec<u64> {
    let var = |k: &str| std::env::var(k).ok().and_then(|v| v.trim().parse::<u64>().ok());
    if let Some(seed) = var("MS2M_FAULT_SEED") {
        return vec![seed];
    }
    let count = var("MS2M_FAULT_SEEDS").unwrap_or(default_count);
    let base = var("MS2M_FAULT_SEED_BASE").unwrap_or(0);
    (base..base + count).collect()
}

/// How many scenarios run at once: `MS2M_FAULT_JOBS`, else `default`.
/// Kafka scenarios mostly wait on the broker, so they overlap well.
pub fn jobs(default: usize) -> usize {
    std::env::var("MS2M_FAULT_JOBS")
        .ok()
        .and_then(|v| v.trim().parse::<usize>().ok())
        .filter(|&n| n > 0)
        .unwrap_or(default)
}

/// Runs every seed with `run` (each under `limit`), `jobs` at a time,
/// collecting outcomes and failures (a panic or timeout is a failure naming
/// the seed and the command to replay it). A scenario whose fault hits the
/// whole broker ([`Scenario::runs_alone`]) waits for the others and runs alone.
pub async fn run_seeds<F, Fut>(seeds: &[u64], backend: Backend, limit: Duration, jobs: usize, mut run: F) -> Summary
where
    F: FnMut(Scenario) -> Fut,
    Fut: std::future::Future<Output = Outcome> + Send + 'static,
{
    let started = Instant::now();
    let mut summary = Summary::default();
    let slots = Arc::new(tokio::sync::Semaphore::new(jobs.max(1)));
    let gate = Arc::new(tokio::sync::RwLock::new(()));
    let mut running = tokio::task::JoinSet::new();
    for &seed in seeds {
        let scenario = Scenario::generate(seed, backend);
        let slot = slots.clone().acquire_owned().await.expect("semaphore open");
        let turn: Box<dyn Send + Sync> = if scenario.runs_alone() {
            Box::new(gate.clone().write_owned().await)
        } else {
            Box::new(gate.clone().read_owned().await)
        };
        let scenario_run = run(scenario.clone());
        running.spawn(async move {
            let _held = (slot, turn);
            let t = Instant::now();
            let verdict = run_one(scenario_run, limit).await;
            (scenario, verdict, t.elapsed())
        });
        while let Some(done) = running.try_join_next() {
            summary.record(done.expect("scenario runner"));
        }
    }
    while let Some(done) = running.join_next().await {
        summary.record(done.expect("scenario runner"));
    }
    summary.elapsed = started.elapsed();
    summary
}

/// Runs one scenario in its own task: its outcome, or why it failed.
async fn run_one<Fut>(scenario_run: Fut, limit: Duration) -> Result<Outcome, String>
where
    Fut: std::future::Future<Output = Outcome> + Send + 'static,
{
    let task = tokio::spawn(scenario_run);
    let abort = task.abort_handle();
    match tokio::time::timeout(limit, task).await {
        Ok(Ok(outcome)) => Ok(outcome),
        Ok(Err(join)) => Err(match join.try_into_panic() {
            Ok(p) => p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "panic".into()),
            Err(e) => e.to_string(),
        }),
        Err(_) => {
            abort.abort();
            Err(format!("timed out after {limit:?}"))
        }
    }
}

impl Summary {
    /// Adds one finished scenario and prints its line.
    fn record(&mut self, (scenario, verdict, elapsed): (Scenario, Result<Outcome, String>, Duration)) {
        match verdict {
            Ok(o) => {
                crate::report_line(&format!(
                    "ok   {scenario} ({:.2} s){}",
                    elapsed.as_secs_f64(),
                    if o.injected { "" } else { " [fault not reached]" }
                ));
                self.add(&scenario, &o);
            }
            Err(msg) => {
                let line = format!("FAIL {scenario}: {msg}\n       replay: {}", scenario.replay_command());
                crate::report_line(&line);
                self.scenarios += 1;
                *self.per_backend.entry(format!("{:?}", scenario.backend)).or_default() += 1;
                self.failures.push(line);
            }
        }
    }
}

/// A flag a fault hook raises when its trigger is reached.
#[derive(Clone, Debug, Default)]
pub struct Trigger(Arc<AtomicBool>);

impl Trigger {
    pub fn fire(&self) {
        self.0.store(true, Ordering::SeqCst);
    }

    pub fn fired(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}
