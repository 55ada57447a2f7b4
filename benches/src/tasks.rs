//! S1: moving tasks of a partitioned service to a new host, measured from
//! outside.
//!
//! The service is [`GameSessions`] as a partitioned fleet
//! ([`ms2m_core::fleet::TaskHost`]): [`PARTITIONS`] tasks, one per input
//! partition, each with [`PLAYERS_PER_TASK`] sessions whose levels make its
//! state the requested size. Each host is this binary re-executed with
//! [`HOST_FLAG`] (the pattern of [`crate::nodes`]): its own process, its
//! own clients, talking to the parent's broker.
//!
//! One run: host `a` starts alone and owns every task; the input runs at
//! [`RATE`] msg/s spread evenly over the partitions, half of it score
//! queries, so every task answers every ~16 ms; after a steady stretch,
//! host `b` starts. The leader (`a`) assigns half the tasks to `b` and
//! moves them, all at once by default (`max_moves` = [`MOVED`]), each an MS2M
//! migration while every other task keeps serving. Measured:
//!
//! * **total**: from `b`'s start (its process spawned) to the last moved
//!   task reported `Owner` by `b` — what an operator waits for a scale-out;
//! * **per-task stall**: for each moved task, the largest gap between its
//!   output arrivals at the outside observer ([`Observer::task_gap`]: its
//!   own process and `read_committed` consumer, outputs attributed to their
//!   task by the `partition` field the game writes) over that interval;
//!   the tasks that stay report theirs too (they must not stall).
//!
//! The same run with the leader's strategy set to stop-and-copy is the
//! baseline: the per-task ratio is the single-service B1 comparison, per
//! task of a host that keeps serving the others.
//!
//! Reading the stall: it is the largest gap over the whole move, so it
//! also holds whatever hiccup the host had meanwhile (by default 128 MiB
//! of snapshots written and read by processes sharing the machine). The
//! tasks that stayed, over the same interval, are the floor to compare
//! with. `MS2M_S1_TIMELINE=1` prints each task's largest gap, when it
//! began and when the task's owner on `b` started, per run.
//!
//! A run fails (the harness exits non-zero) if a task's outputs do not
//! resume within 10 s after the move.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ms2m_core::fleet::{FleetOptions, TaskHost};
use ms2m_core::migration::Strategy;
use ms2m_core::node::{Node, NodeOptions, NodeRole, NodeStatus};
use ms2m_core::{Delivery, InstanceConfig};
use ms2m_examples::fleet::backend_factory;
use ms2m_examples::game::{GameEvent, GameSessions};
use ms2m_examples::observer::{now_us, Observer, Watch};
use ms2m_kafka::{KafkaCluster, KafkaConfig};
use rdkafka::producer::{BaseRecord, Producer};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::child::{exit_code, parent_gone, Child};
use crate::kafka::{bulk_producer, send_retrying};
use crate::migration::{key, paced};
use crate::report::{median, p99, ratios, Goal, Row, Stat};
use crate::{Bench, BoxError};

/// The first argument that turns the harness into a task host.
pub const HOST_FLAG: &str = "__ms2m-host";
/// Input partitions: one task each.
pub const PARTITIONS: i32 = 16;
/// Tasks moved to the new host: half of them, as the leader's even
/// assignment over two hosts gives.
pub const MOVED: usize = PARTITIONS as usize / 2;
/// Input rate over all partitions, msg/s.
pub const RATE: u64 = 2000;
/// Sessions per task: its state is their levels.
pub const PLAYERS_PER_TASK: u64 = 16;
/// The Kafka Streams model's time to move [`MOVED`] tasks to a new
/// instance with its defaults (`max.warmup.replicas` = 2,
/// `probing.rebalance.interval.ms` = 10 min): 4 probing rounds, the last
/// pair active ≈ 30 min after the first, warm-up not counted.
pub const KAFKA_STREAMS_MODEL_MS: f64 = 30.0 * 60.0 * 1000.0;
/// How long a host child waits between checks of its tasks' roles.
const BEAT_EVERY: Duration = Duration::from_millis(10);

/// What a host child needs.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct HostSpec {
    /// The host's id.
    pub host: String,
    /// The parent's broker.
    pub bootstrap_servers: String,
    /// Service name (task ids, groups, snapshot and control topics derive from it).
    pub service: String,
    /// Input topic ([`PARTITIONS`] partitions).
    pub input: String,
    /// Output topic.
    pub output: String,
    /// Partitions of the snapshot topic.
    pub snapshot_partitions: i32,
    /// The most tasks moved at once.
    pub max_moves: usize,
    /// Move tasks with stop-and-copy instead of MS2M (the baseline).
    pub stop_and_copy: bool,
}

impl HostSpec {
    fn config(&self) -> KafkaConfig {
        KafkaConfig::new(&self.service)
            .input_topic(&self.input)
            .snapshot_partitions(self.snapshot_partitions)
            .bootstrap_servers(&self.bootstrap_servers)
    }

    fn fleet_options(&self) -> FleetOptions {
        FleetOptions {
            heartbeat: Duration::from_millis(200),
            host_timeout: Duration::from_secs(2),
            max_moves: self.max_moves,
            strategy: if self.stop_and_copy {
                Strategy::StopAndCopy
            } else {
                Strategy::Ms2mFromStandby
            },
            ..FleetOptions::default()
        }
    }
}

/// One status line of a host child: its tasks' roles by partition.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct HostBeat {
    /// When the child printed it ([`now_us`]).
    pub at_us: u64,
    /// The role of each task node the host runs.
    pub tasks: BTreeMap<i32, NodeRole>,
}

impl HostBeat {
    /// The partitions whose task this host owns.
    pub fn owned(&self) -> Vec<i32> {
        self.tasks
            .iter()
            .filter(|(_, r)| **r == NodeRole::Owner)
            .map(|(p, _)| *p)
            .collect()
    }
}

#[derive(Debug, Default)]
struct Beats {
    last: HostBeat,
    /// When each partition's task was first reported `Owner`.
    owner_since: BTreeMap<i32, u64>,
    /// When each partition's task was first reported `Standby`.
    standby_since: BTreeMap<i32, u64>,
    closed: bool,
}

/// A host child, seen from the parent. Dropping it kills the child.
#[derive(Debug)]
pub struct HostProcess {
    _child: Child,
    beats: Arc<Mutex<Beats>>,
}

impl HostProcess {
    /// Starts the harness again as the host `spec`.
    pub fn start(spec: &HostSpec) -> Result<Self, BoxError> {
        let beats: Arc<Mutex<Beats>> = Arc::default();
        let (sink, closed) = (beats.clone(), beats.clone());
        let child = Child::start(
            HOST_FLAG,
            spec,
            &[],
            move |line| record(&line, &sink),
            move || lock(&closed).closed = true,
        )?;
        Ok(Self { _child: child, beats })
    }

    /// The latest beat.
    pub fn latest(&self) -> HostBeat {
        self.lock().last.clone()
    }

    /// When this host first reported `partition`'s task as `Owner`.
    pub fn owner_since(&self, partition: i32) -> Option<u64> {
        self.lock().owner_since.get(&partition).copied()
    }

    /// When this host first reported `partition`'s task as `Standby`.
    pub fn standby_since(&self, partition: i32) -> Option<u64> {
        self.lock().standby_since.get(&partition).copied()
    }

    /// Waits until the latest beat satisfies `done` (`timeout` at most).
    pub async fn wait_for(
        &self,
        what: &str,
        timeout: Duration,
        done: impl Fn(&HostBeat) -> bool,
    ) -> Result<HostBeat, BoxError> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            {
                let beats = self.lock();
                if done(&beats.last) {
                    return Ok(beats.last.clone());
                }
                if beats.closed {
                    return Err(format!("the host process exited before {what}").into());
                }
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(format!("no {what} within {timeout:?} (last: {:?})", self.latest()).into());
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Beats> {
        lock(&self.beats)
    }
}

fn lock(beats: &Mutex<Beats>) -> std::sync::MutexGuard<'_, Beats> {
    beats.lock().unwrap_or_else(|p| p.into_inner())
}

/// Records a status line of the child.
fn record(line: &str, beats: &Mutex<Beats>) {
    let Ok(beat) = serde_json::from_str::<HostBeat>(line) else {
        return;
    };
    let mut b = lock(beats);
    for (&p, &role) in &beat.tasks {
        let since = match role {
            NodeRole::Owner => &mut b.owner_since,
            NodeRole::Standby => &mut b.standby_since,
            _ => continue,
        };
        since.entry(p).or_insert(beat.at_us);
    }
    b.last = beat;
}

/// In a host child (first argument [`HOST_FLAG`]), runs the host and
/// returns the exit code; elsewhere `None` at once.
pub async fn run_host_if_requested() -> Option<i32> {
    let spec = crate::child::requested::<HostSpec>(HOST_FLAG)?;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
    let result = match spec {
        Ok(spec) => run_host(&spec).await,
        Err(e) => Err(e),
    };
    Some(exit_code("host process", result))
}

/// Each task's instance settings: B1's, under the task's service id.
fn instance_config(spec: &HostSpec, task: &str) -> InstanceConfig {
    crate::migration::instance_config(&spec.host, &spec.output).service_id(task)
}

type Statuses = Arc<Mutex<BTreeMap<i32, watch::Receiver<NodeStatus>>>>;

async fn run_host(spec: &HostSpec) -> Result<(), BoxError> {
    let cluster = KafkaCluster::connect(spec.config())?;
    let control = Arc::new(cluster.control().await?);
    let service = cluster.config().service_name().to_string();
    let host = TaskHost::new(
        &spec.host,
        service,
        0..PARTITIONS,
        Arc::clone(&control),
        spec.fleet_options(),
    );
    let statuses: Statuses = Arc::default();
    let printer = tokio::spawn(print_beats(Arc::clone(&statuses)));
    let make_node = |task: &str, partition: i32| {
        let factory = backend_factory(cluster.for_task(partition), Delivery::AtLeastOnce);
        let config = instance_config(spec, task);
        let node =
            Node::<GameSessions, _, _, _, _, _>::new(factory, Arc::clone(&control), config, NodeOptions::default())?;
        statuses
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(partition, node.status());
        Ok(node)
    };
    let result = host.run(make_node, parent_gone()).await;
    printer.abort();
    Ok(result?)
}

/// Prints a [`HostBeat`] whenever a task's role changes, and every 200 ms.
async fn print_beats(statuses: Statuses) {
    let mut last = BTreeMap::new();
    let mut printed_at = 0;
    loop {
        tokio::time::sleep(BEAT_EVERY).await;
        let tasks: BTreeMap<i32, NodeRole> = statuses
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(p, status)| (*p, status.borrow().role))
            .filter(|(_, role)| *role != NodeRole::Stopped)
            .collect();
        let at_us = now_us();
        if tasks != last || at_us - printed_at >= 200_000 {
            if let Ok(line) = serde_json::to_string(&HostBeat {
                at_us,
                tasks: tasks.clone(),
            }) {
                println!("{line}");
            }
            (last, printed_at) = (tasks, at_us);
        }
    }
}

/// Player `k` of `partition`'s task.
fn player(partition: i32, k: u64) -> u64 {
    partition as u64 * 1_000 + k
}

/// Sends `events` as JSON, each to its partition, keyed by player.
fn send_events(
    producer: &rdkafka::producer::BaseProducer,
    topic: &str,
    events: impl Iterator<Item = (i32, GameEvent)>,
) -> Result<(), BoxError> {
    for (partition, e) in events {
        let body = serde_json::to_vec(&e)?;
        let k = key(e.player());
        send_retrying(
            producer,
            BaseRecord::to(topic)
                .partition(partition)
                .key(&k[..])
                .payload(&body[..]),
        )?;
    }
    Ok(())
}

/// The joins that give each task a state of `mib` MiB.
async fn join_players(cluster: &KafkaCluster, input: &str, mib: u64) -> Result<(), BoxError> {
    let producer = bulk_producer(cluster)?;
    let board_bytes = ((mib << 20) / PLAYERS_PER_TASK) as u32;
    let joins = (0..PARTITIONS).flat_map(|p| {
        (0..PLAYERS_PER_TASK).map(move |k| {
            let player = player(p, k);
            (p, GameEvent::Join { player, board_bytes })
        })
    });
    send_events(&producer, input, joins)?;
    tokio::task::spawn_blocking(move || producer.flush(Duration::from_secs(60))).await??;
    Ok(())
}

/// Event `i` of the load: partition `i mod PARTITIONS`; every other event
/// of a partition is a score query (an output of that task), the others
/// move its birds.
fn task_event(i: u64) -> (i32, GameEvent) {
    let partition = (i % PARTITIONS as u64) as i32;
    let round = i / PARTITIONS as u64;
    let player = player(partition, round % PLAYERS_PER_TASK);
    let event = match round % 4 {
        0 | 2 => GameEvent::Query { player },
        1 => GameEvent::Flap { player },
        _ => GameEvent::Tick { player },
    };
    (partition, event)
}

/// The load: [`RATE`] msg/s of [`task_event`]s until `running` is cleared.
fn task_input(
    cluster: &KafkaCluster,
    topic: &str,
    running: Arc<AtomicBool>,
) -> Result<JoinHandle<Result<u64, BoxError>>, BoxError> {
    let producer = bulk_producer(cluster)?;
    let topic = topic.to_string();
    Ok(paced(RATE, crate::migration::TICK, running, move |first, n| {
        send_events(&producer, &topic, (first..first + n).map(task_event))?;
        producer.poll(Duration::ZERO);
        Ok(())
    }))
}

/// One scale-out, from outside.
#[derive(Clone, Debug)]
struct ScaleOut {
    /// `b` spawned → its last moved task `Owner`, ms.
    total_ms: f64,
    /// `b` spawned → its last moved task standing by (ready to be the
    /// target of a move), ms.
    ready_ms: f64,
    /// The moved tasks' stalls (largest output gap over the interval), ms.
    moved: Vec<f64>,
    /// The other tasks' stalls over the same interval, ms.
    stayed: Vec<f64>,
    /// Every task's largest output gap in the second before `b` started.
    steady: Vec<f64>,
}

/// How S1 runs: each task's state, and how many tasks move at once.
#[derive(Clone, Copy, Debug)]
pub struct S1Options {
    /// State per task, MiB.
    pub task_mib: u64,
    /// The most tasks the leader moves at once (`FleetOptions::max_moves`).
    pub max_moves: usize,
}

/// A deployment with host `a` serving every task under load, watched.
/// Dropping it kills the hosts and the observer.
struct Deployment {
    cluster: KafkaCluster,
    spec: HostSpec,
    observer: Observer,
    a: HostProcess,
    running: Arc<AtomicBool>,
    load: JoinHandle<Result<u64, BoxError>>,
    /// How long a step may take.
    within: Duration,
}

impl Deployment {
    /// Topics, observer, the joins (the state), host `a` owning every
    /// task, the load, and a steady stretch.
    async fn start(b: &Bench, options: S1Options, stop_and_copy: bool) -> Result<Self, BoxError> {
        let mib = options.task_mib;
        let snapshot_partitions = 64;
        let (cluster, input, output) = b
            .deployment(&format!("s1-{mib}m"), PARTITIONS, snapshot_partitions)
            .await?;
        let service = cluster.config().service_name().to_string();
        let observer = Observer::start(&Watch::of(&cluster, &input, &output).per_task("partition")).await?;
        join_players(&cluster, &input, mib).await?;
        let spec = HostSpec {
            host: "a".into(),
            bootstrap_servers: cluster.bootstrap_servers().to_string(),
            service,
            input,
            output,
            snapshot_partitions,
            max_moves: options.max_moves,
            stop_and_copy,
        };
        let within = Duration::from_secs(60) + Duration::from_millis(100 * mib);
        let a = HostProcess::start(&spec)?;
        a.wait_for("host a owning every task", within, |beat| {
            beat.owned().len() == PARTITIONS as usize
        })
        .await?;
        let running = Arc::new(AtomicBool::new(true));
        let load = task_input(&cluster, &spec.input, running.clone())?;
        if !observer.await_tasks_resumed(&all_tasks(), now_us(), within).await {
            return Err("not every task answered its queries before the scale-out".into());
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
        Ok(Self {
            cluster,
            spec,
            observer,
            a,
            running,
            load,
            within,
        })
    }

    /// Starts host `b`; returns it and when it started, once it owns its
    /// share and `a` the rest.
    async fn scale_out(&self) -> Result<(HostProcess, u64), BoxError> {
        let started = now_us();
        let b = HostProcess::start(&HostSpec {
            host: "b".into(),
            ..self.spec.clone()
        })?;
        b.wait_for("host b owning its share", self.within, |beat| {
            beat.owned().len() == MOVED
        })
        .await?;
        self.a
            .wait_for("host a owning the rest", self.within, |beat| {
                beat.owned().len() == PARTITIONS as usize - MOVED
            })
            .await?;
        Ok((b, started))
    }

    /// Waits until every task answered after `done`, then stops the load.
    async fn finish(self, done: u64) -> Result<Observer, BoxError> {
        let resumed = self
            .observer
            .await_tasks_resumed(&all_tasks(), done + 50_000, Duration::from_secs(10))
            .await;
        self.running.store(false, Ordering::Relaxed);
        self.load.await??;
        drop(self.cluster);
        if !resumed {
            return Err("a task's outputs did not resume within 10 s after the move".into());
        }
        Ok(self.observer)
    }
}

fn all_tasks() -> Vec<i64> {
    (0..i64::from(PARTITIONS)).collect()
}

/// Runs one scale-out 1 → 2 hosts of [`PARTITIONS`] tasks, moved by MS2M
/// or by stop-and-copy.
async fn scale_out(b: &Bench, options: S1Options, stop_and_copy: bool) -> Result<ScaleOut, BoxError> {
    let deployment = Deployment::start(b, options, stop_and_copy).await?;
    let (new_host, started) = deployment.scale_out().await?;
    let moved = new_host.latest().owned();
    let since = |of: fn(&HostProcess, i32) -> Option<u64>| moved.iter().filter_map(|&p| of(&new_host, p)).max();
    let done = since(HostProcess::owner_since).ok_or("host b reported no owned task")?;
    let ready = since(HostProcess::standby_since).unwrap_or(done).min(done);
    let observer = deployment.finish(done).await?;
    let gap = |p: i32| observer.task_gap(i64::from(p), started, done);
    if std::env::var_os("MS2M_S1_TIMELINE").is_some() {
        for p in 0..PARTITIONS {
            let (g, owner) = (gap(p), new_host.owner_since(p).map(|t| ms_between(started, t)));
            eprintln!(
                "    task {p:2}: largest gap {:.0} ms from {:+.0} ms; owner on b at {owner:?} ms",
                g.gap_ms, g.began_ms
            );
        }
    }
    let (moved_tasks, stayed_tasks) = (0..PARTITIONS).partition::<Vec<i32>, _>(|p| moved.contains(p));
    Ok(ScaleOut {
        total_ms: ms_between(started, done),
        ready_ms: ms_between(started, ready),
        moved: moved_tasks.iter().map(|&p| gap(p).gap_ms).collect(),
        stayed: stayed_tasks.iter().map(|&p| gap(p).gap_ms).collect(),
        steady: (0..PARTITIONS).map(|p| gap(p).baseline_ms).collect(),
    })
}

/// Milliseconds from `from_us` to `to_us`.
fn ms_between(from_us: u64, to_us: u64) -> f64 {
    (to_us as f64 - from_us as f64) / 1e3
}

/// S1: the scale-out with MS2M and with stop-and-copy, `b.runs` times.
pub async fn s1(b: &Bench, options: S1Options) -> Result<Vec<Row>, BoxError> {
    let mut ms2m = Vec::new();
    let mut stop_and_copy = Vec::new();
    for _ in 0..b.runs {
        for (with_stop_and_copy, runs) in [(false, &mut ms2m), (true, &mut stop_and_copy)] {
            let run = scale_out(b, options, with_stop_and_copy).await?;
            eprintln!(
                "  S1 {} MiB/task, {}: total {:.0} ms (standing by after {:.0}); moved tasks' stall p50 {:.0} / max {:.0} ms; \
                 others max {:.0} ms; steady max {:.0} ms",
                options.task_mib,
                if with_stop_and_copy { "stop-and-copy" } else { "MS2M" },
                run.total_ms,
                run.ready_ms,
                median(&run.moved),
                p99(&run.moved),
                p99(&run.stayed),
                p99(&run.steady),
            );
            runs.push(run);
        }
    }
    Ok(s1_rows(options, &ms2m, &stop_and_copy))
}

/// Every run's values of `field`, together.
fn all(runs: &[ScaleOut], field: fn(&ScaleOut) -> &[f64]) -> Vec<f64> {
    runs.iter().flat_map(|r| field(r).to_vec()).collect()
}

fn moved(r: &ScaleOut) -> &[f64] {
    &r.moved
}

fn stayed(r: &ScaleOut) -> &[f64] {
    &r.stayed
}

fn steady(r: &ScaleOut) -> &[f64] {
    &r.steady
}

fn totals(runs: &[ScaleOut]) -> Vec<f64> {
    runs.iter().map(|r| r.total_ms).collect()
}

fn ready(runs: &[ScaleOut]) -> Vec<f64> {
    runs.iter().map(|r| r.ready_ms).collect()
}

/// Each run's median stall of the moved tasks.
fn per_run_median(runs: &[ScaleOut]) -> Vec<f64> {
    runs.iter().map(|r| median(&r.moved)).collect()
}

fn s1_rows(options: S1Options, ms2m: &[ScaleOut], stop_and_copy: &[ScaleOut]) -> Vec<Row> {
    let S1Options {
        task_mib: mib,
        max_moves,
    } = options;
    let setting = format!(
        "{PARTITIONS} tasks × {mib} MiB on one host, {MOVED} moved to a new host ≤ {max_moves} at once, {RATE} msg/s"
    );
    let mut total = Row::new(
        "S1",
        format!("scale-out: {MOVED} tasks × {mib} MiB to a new host under {RATE} msg/s, total (outside: host spawned → last task Owner)"),
        Stat::new(totals(ms2m), "ms"),
        format!(
            "Kafka Streams model, computed from its defaults (2 warm-ups per 10 min probe): ≈ {:.0} min",
            KAFKA_STREAMS_MODEL_MS / 60_000.0
        ),
        None,
        None,
        "≤ 10 s",
        Goal::None,
        format!(
            "{setting}; MS2M p99 {:.0} ms, of which the new host's task nodes standing by (replaying their partitions) {:.0} ms (median); stop-and-copy moves total {:.0} ms (median)",
            p99(&totals(ms2m)),
            median(&ready(ms2m)),
            median(&totals(stop_and_copy))
        ),
    );
    total.met = Some(median(&totals(ms2m)) <= 10_000.0);
    let moved_ms2m = all(ms2m, moved);
    let moved_baseline = all(stop_and_copy, moved);
    let stall = Row::new(
        "S1-stall",
        format!("per-task stall (outside: largest output gap of each moved task), {mib} MiB tasks"),
        Stat::new(moved_ms2m.clone(), "ms"),
        "stop-and-copy moves, same workload",
        Some(Stat::new(moved_baseline.clone(), "ms")),
        Some(ratios(&per_run_median(ms2m), &per_run_median(stop_and_copy))),
        "≤ 0.02 (B1's)",
        Goal::AtMost(0.02),
        format!(
            "samples: every moved task of every run; MS2M p99 {:.0} ms, stop-and-copy p99 {:.0} ms; \
             tasks that stayed: max {:.0} ms (MS2M) / {:.0} ms (stop-and-copy); steady rhythm before: max {:.0} ms",
            p99(&moved_ms2m),
            p99(&moved_baseline),
            p99(&all(ms2m, stayed)),
            p99(&all(stop_and_copy, stayed)),
            p99(&all(ms2m, steady)),
        ),
    );
    vec![total, stall]
}
