//! # Downtime as an independent client sees it
//!
//! `MigrationReport::downtime_ms` is the library's own figure: the handover
//! as its parties timed it, or the source's longest stall. A client of the
//! service sees something else: outputs stop arriving and the service's
//! committed input position stop advancing, for whatever reason (a broker
//! holding back the source's outputs too). Measured from outside, those gaps
//! were once far larger than the report's figure, so the demo and the
//! benchmark harness measure downtime the way a client would, and report the
//! library's figure beside it. When the two differ, the outside figure is
//! the truth.
//!
//! The [`Observer`] is a **separate OS process** (the current executable
//! re-executed with [`CHILD_FLAG`]; [`run_child_if_requested`] at the top of
//! `main` turns it into the observer), so nothing it measures shares a
//! runtime, an allocator or librdkafka clients with the service. It has its
//! own rdkafka clients:
//!
//! * a `BaseConsumer` with `isolation.level=read_committed` and
//!   `fetch.wait.max.ms=2`, assigned to every partition of the output topic
//!   from the high watermark at start, which timestamps every arrival;
//! * a second `BaseConsumer` that never joins the group: every
//!   [`COMMITTED_POLL`] it fetches (OffsetFetch) the committed offsets of the
//!   service's consumer group on every input partition, and timestamps each
//!   advance of their sum.
//!
//! Timestamps are `CLOCK_MONOTONIC` in microseconds ([`now_us`]), which is the
//! same clock in every process of one machine, so the parent can stamp a
//! migration's request and live times with it and compare. The child streams
//! one JSON line per event on stdout; the parent collects them on a thread
//! and computes, per migration window, the largest gap between consecutive
//! output arrivals and between consecutive committed-position advances
//! ([`Observer::gaps`]).
//!
//! For a partitioned service ([`Watch::per_task`]), the observer also reads
//! each output's task from a JSON field (the game writes its input
//! `partition`) and timestamps arrivals per task, so a move of some tasks
//! can be judged task by task ([`Observer::task_gap`]): the moved tasks'
//! stalls, and whether the others kept flowing.
//!
//! Resolution: the input arrives in ticks (10 ms in the demo, 2 ms in the
//! harness's B1), and the clients batch and wait for data, so output gaps
//! up to the largest steady gap before a migration (~13 ms on the embedded
//! broker, 20–45 ms on tansu) are the stream's own rhythm, not downtime; the
//! service commits every 500
//! messages or 20 ms, so committed-position gaps below ~20 ms are the commit
//! interval. The child exits when its stdin closes (the parent died) and the
//! parent kills it when the [`Observer`] is dropped, on every exit path.

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ms2m_kafka::KafkaCluster;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Message, Offset, Timestamp, TopicPartitionList};
use serde::{Deserialize, Serialize};

use crate::support::BoxError;

/// The first argument that turns the current executable into the observer.
pub const CHILD_FLAG: &str = "__ms2m-observer";

/// How often the committed input position is fetched.
pub const COMMITTED_POLL: Duration = Duration::from_millis(3);

/// Margin around a migration window: gaps that overlap
/// `[request − margin, live + margin]` count.
pub const WINDOW_MARGIN_US: u64 = 50_000;

/// Length of the quiet stretch before each window whose largest gaps are
/// reported as the baseline (the workload's own rhythm).
const BASELINE_US: u64 = 1_000_000;

/// `CLOCK_MONOTONIC` in microseconds: comparable across the processes of one
/// machine (unlike `std::time::Instant`, which cannot leave its process).
pub fn now_us() -> u64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    t.tv_sec as u64 * 1_000_000 + t.tv_nsec as u64 / 1_000
}

/// The wall clock in milliseconds since the epoch (the clock of Kafka's
/// create timestamps).
fn wall_clock_ms() -> i64 {
    let since_epoch = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    i64::try_from(since_epoch.as_millis()).unwrap_or(i64::MAX)
}

/// What the observer watches.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Watch {
    /// Bootstrap servers (the embedded broker's loopback address works from
    /// another process).
    pub bootstrap_servers: String,
    /// Passthrough client settings of the service's configuration (security).
    pub settings: Vec<(String, String)>,
    /// The service's output topic.
    pub output_topic: String,
    /// The service's input topic.
    pub input_topic: String,
    /// The service's consumer group, whose committed offsets are watched.
    pub input_group: String,
    /// For a partitioned service: the integer field of each (JSON) output
    /// that names the task it came from (the game's `partition`), so gaps
    /// can be measured per task ([`Observer::task_gap`]). `None`: outputs
    /// are only counted.
    #[serde(default)]
    pub task_field: Option<String>,
}

impl Watch {
    /// Watches the service configured in `cluster` (its group, its
    /// settings) reading `input` and writing `output`.
    pub fn of(cluster: &KafkaCluster, input: &str, output: &str) -> Self {
        Self {
            bootstrap_servers: cluster.bootstrap_servers().to_string(),
            settings: cluster
                .config()
                .settings()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            output_topic: output.to_string(),
            input_topic: input.to_string(),
            input_group: cluster.config().group_id(),
            task_field: None,
        }
    }

    /// The same watch, timing each task's outputs apart: `field` is the
    /// integer field of the JSON outputs that names their task.
    pub fn per_task(mut self, field: &str) -> Self {
        self.task_field = Some(field.to_string());
        self
    }

    fn client_config(&self, group: &str) -> ClientConfig {
        let mut cc = ClientConfig::new();
        for (k, v) in &self.settings {
            cc.set(k, v);
        }
        cc.set("bootstrap.servers", &self.bootstrap_servers)
            .set("group.id", group)
            .set("enable.auto.commit", "false")
            .set("enable.partition.eof", "false");
        if let Ok(debug) = std::env::var("MS2M_OBSERVER_DEBUG") {
            cc.set("debug", debug);
        }
        cc
    }
}

/// One line of the child's stdout.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
enum Event {
    /// Both clients are in place; outputs from here on are seen.
    Ready { at_us: u64 },
    /// `count` output records arrived (drained together) at `at_us`; the
    /// oldest of them was created `lag_ms` before (wall clock minus the
    /// record's create timestamp; `None` without create timestamps).
    Output {
        at_us: u64,
        count: u32,
        #[serde(default)]
        lag_ms: Option<i64>,
    },
    /// Of those, the tasks (values of [`Watch::task_field`]) that had an
    /// output among them.
    Tasks { at_us: u64, tasks: Vec<i64> },
    /// The committed input position (sum over partitions) advanced.
    Committed { at_us: u64, position: i64 },
    /// The observer cannot go on.
    Failed { error: String },
}

/// One migration, on the [`now_us`] clock.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Window {
    /// Just before the coordinator was asked to migrate.
    pub request_us: u64,
    /// Just after the coordinator returned (target live).
    pub live_us: u64,
}

impl Window {
    /// A window starting now; call [`Window::live`] when the target is live.
    pub fn start() -> Self {
        let now = now_us();
        Self {
            request_us: now,
            live_us: now,
        }
    }

    /// Marks the target live now.
    pub fn live(mut self) -> Self {
        self.live_us = now_us();
        self
    }
}

/// What the observer saw around one migration.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct OutsideGaps {
    /// Largest gap between consecutive output arrivals overlapping the
    /// window: the downtime a client of the outputs saw.
    pub output_gap_ms: f64,
    /// Largest gap between consecutive advances of the service group's
    /// committed input position overlapping the window.
    pub input_commit_gap_ms: f64,
    /// Largest output gap in the second before the window (the workload's
    /// own rhythm: the resolution floor of `output_gap_ms`).
    pub baseline_output_gap_ms: f64,
    /// Largest committed-position gap in the second before the window.
    pub baseline_input_commit_gap_ms: f64,
    /// When the largest output gap began (the last output before it),
    /// in ms after the target went live (negative: before).
    pub output_gap_began_ms: f64,
    /// When it ended (the first output after it), in ms after live.
    pub output_gap_ended_ms: f64,
    /// How long before its arrival the first output after the largest gap
    /// was created (its producer's create timestamp; `None` without one).
    /// Close to the gap itself: the outputs were produced on time and
    /// delivered late (the producer or the broker held them). Close to the
    /// steady lag: nothing was produced during the gap (the service stood
    /// still or had no input).
    pub output_lag_after_gap_ms: Option<f64>,
    /// Output arrivals (drained batches) seen inside the window.
    pub output_batches_in_window: usize,
    /// Both streams advanced again after the window; if not, the gaps run
    /// to the end of the observation and are lower bounds.
    pub resumed: bool,
}

/// What the observer saw of one task's outputs around a window.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct TaskGap {
    /// Largest gap between the task's output arrivals overlapping the
    /// window: the task's outside-visible stall.
    pub gap_ms: f64,
    /// When that gap began (the task's last output before it), in ms after
    /// the window's start.
    pub began_ms: f64,
    /// Largest in the second before the window (the task's own rhythm).
    pub baseline_ms: f64,
}

#[derive(Debug, Default)]
struct Timeline {
    ready: bool,
    outputs: Vec<u64>,
    /// Per output arrival: its oldest record's lag ([`Event::Output`]).
    lags: Vec<Option<i64>>,
    /// Output arrivals per task (with [`Watch::task_field`]).
    by_task: std::collections::HashMap<i64, Vec<u64>>,
    commits: Vec<u64>,
    failed: Option<String>,
    closed: bool,
}

impl Timeline {
    fn record(&mut self, event: Event) {
        match event {
            Event::Ready { .. } => self.ready = true,
            Event::Output { at_us, lag_ms, .. } => {
                self.outputs.push(at_us);
                self.lags.push(lag_ms);
            }
            Event::Tasks { at_us, tasks } => {
                for task in tasks {
                    self.by_task.entry(task).or_default().push(at_us);
                }
            }
            Event::Committed { at_us, .. } => self.commits.push(at_us),
            Event::Failed { error } => self.failed = Some(error),
        }
    }
}

/// Largest gap between consecutive `times` that overlaps `[from, to]`, as
/// `(start, end)`; a stream with nothing after `to` is open up to `until`.
fn largest_gap_span(times: &[u64], from: u64, to: u64, until: u64) -> (u64, u64) {
    let mut largest = (from, from);
    let mut consider = |a: u64, b: u64| {
        if b.saturating_sub(a) > largest.1 - largest.0 {
            largest = (a, b);
        }
    };
    let before = times.iter().rposition(|&t| t <= from);
    let start = before.unwrap_or(0);
    let mut previous = before.map_or(from, |i| times[i]);
    for &t in &times[start..] {
        if previous > to {
            break;
        }
        consider(previous, t);
        previous = t;
    }
    if previous <= to {
        consider(previous, until);
    }
    largest
}

/// The length of [`largest_gap_span`], in milliseconds.
fn largest_gap(times: &[u64], from: u64, to: u64, until: u64) -> f64 {
    let (start, end) = largest_gap_span(times, from, to, until);
    (end - start) as f64 / 1e3
}

/// Signed milliseconds from `reference` to `t`.
fn ms_after(t: u64, reference: u64) -> f64 {
    (t as f64 - reference as f64) / 1e3
}

/// The observer process, seen from the parent. Dropping it kills the child.
#[derive(Debug)]
pub struct Observer {
    child: Child,
    stdin: Option<ChildStdin>,
    timeline: Arc<Mutex<Timeline>>,
}

impl Observer {
    /// Starts the observer process on `watch` and waits until it watches.
    pub async fn start(watch: &Watch) -> Result<Self, BoxError> {
        let mut child = Command::new(std::env::current_exe()?)
            .arg(CHILD_FLAG)
            .arg(serde_json::to_string(watch)?)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()?;
        let stdout = child.stdout.take().ok_or("observer stdout not captured")?;
        let observer = Self {
            stdin: child.stdin.take(),
            child,
            timeline: Arc::default(),
        };
        let timeline = observer.timeline.clone();
        std::thread::Builder::new()
            .name("ms2m-observer-reader".into())
            .spawn(move || collect(stdout, &timeline))?;
        observer
            .wait_for(Duration::from_secs(30), |t| t.ready)
            .await
            .map_err(|e| format!("the observer did not start: {e}"))?;
        Ok(observer)
    }

    /// Waits until both streams advanced after `after_us`, so a window that
    /// ends there is closed on both sides; `false` after `timeout`.
    pub async fn await_resumed(&self, after_us: u64, timeout: Duration) -> bool {
        let resumed = |t: &Timeline| {
            t.outputs.last().is_some_and(|&o| o > after_us) && t.commits.last().is_some_and(|&c| c > after_us)
        };
        self.wait_for(timeout, resumed).await.is_ok()
    }

    /// The gaps around `window` seen so far.
    pub fn gaps(&self, window: Window) -> OutsideGaps {
        let t = self.timeline.lock().unwrap_or_else(|p| p.into_inner());
        let from = window.request_us.saturating_sub(WINDOW_MARGIN_US);
        let to = window.live_us + WINDOW_MARGIN_US;
        let until = now_us();
        let quiet_from = from.saturating_sub(BASELINE_US);
        let in_window = |times: &[u64]| times.iter().filter(|&&x| x >= from && x <= to).count();
        let (began, ended) = largest_gap_span(&t.outputs, from, to, until);
        OutsideGaps {
            output_gap_ms: (ended - began) as f64 / 1e3,
            output_gap_began_ms: ms_after(began, window.live_us),
            output_gap_ended_ms: ms_after(ended, window.live_us),
            input_commit_gap_ms: largest_gap(&t.commits, from, to, until),
            baseline_output_gap_ms: largest_gap(&t.outputs, quiet_from, from, from),
            baseline_input_commit_gap_ms: largest_gap(&t.commits, quiet_from, from, from),
            output_lag_after_gap_ms: t
                .outputs
                .iter()
                .position(|&x| x == ended)
                .and_then(|i| t.lags[i])
                .map(|lag| lag as f64),
            output_batches_in_window: in_window(&t.outputs),
            resumed: t.outputs.last().is_some_and(|&x| x > to) && t.commits.last().is_some_and(|&x| x > to),
        }
    }

    /// The largest gap between `task`'s output arrivals that overlaps
    /// `[from_us, to_us]` (no margin), and the largest in the second
    /// before (needs [`Watch::per_task`]). A task with no output after
    /// `to_us` has its gap run to now: check [`Observer::await_tasks_resumed`]
    /// first.
    pub fn task_gap(&self, task: i64, from_us: u64, to_us: u64) -> TaskGap {
        let t = self.timeline.lock().unwrap_or_else(|p| p.into_inner());
        let times = t.by_task.get(&task).map_or(&[][..], Vec::as_slice);
        let (began, ended) = largest_gap_span(times, from_us, to_us, now_us());
        TaskGap {
            gap_ms: (ended - began) as f64 / 1e3,
            began_ms: ms_after(began, from_us),
            baseline_ms: largest_gap(times, from_us.saturating_sub(BASELINE_US), from_us, from_us),
        }
    }

    /// Waits until every task in `tasks` had an output after `after_us`;
    /// `false` after `timeout`.
    pub async fn await_tasks_resumed(&self, tasks: &[i64], after_us: u64, timeout: Duration) -> bool {
        let resumed = |t: &Timeline| {
            tasks.iter().all(|task| {
                t.by_task
                    .get(task)
                    .and_then(|v| v.last())
                    .is_some_and(|&x| x > after_us)
            })
        };
        self.wait_for(timeout, resumed).await.is_ok()
    }

    async fn wait_for(&self, timeout: Duration, done: impl Fn(&Timeline) -> bool) -> Result<(), String> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            {
                let t = self.timeline.lock().unwrap_or_else(|p| p.into_inner());
                if let Some(e) = &t.failed {
                    return Err(e.clone());
                }
                if done(&t) {
                    return Ok(());
                }
                if t.closed {
                    return Err("the observer process exited".into());
                }
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(format!("nothing after {timeout:?}"));
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

impl Drop for Observer {
    fn drop(&mut self) {
        drop(self.stdin.take());
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn collect(stdout: std::process::ChildStdout, timeline: &Mutex<Timeline>) {
    for line in BufReader::new(stdout).lines() {
        let Ok(line) = line else { break };
        match serde_json::from_str::<Event>(&line) {
            Ok(event) => timeline.lock().unwrap_or_else(|p| p.into_inner()).record(event),
            Err(e) => eprintln!("observer: unreadable line {line:?}: {e}"),
        }
    }
    timeline.lock().unwrap_or_else(|p| p.into_inner()).closed = true;
}

/// In the observer process (first argument [`CHILD_FLAG`]), observes and
/// returns the exit code; elsewhere returns `None` at once. Call it first
/// thing in `main`: `if let Some(code) = run_child_if_requested() { std::process::exit(code) }`.
pub fn run_child_if_requested() -> Option<i32> {
    let mut args = std::env::args().skip(1);
    if args.next().as_deref() != Some(CHILD_FLAG) {
        return None;
    }
    crate::support::init_logging();
    let result = args
        .next()
        .ok_or_else(|| BoxError::from("missing the watch argument"))
        .and_then(|json| serde_json::from_str::<Watch>(&json).map_err(BoxError::from))
        .and_then(|watch| observe(&watch));
    Some(match result {
        Ok(()) => 0,
        Err(e) => {
            emit(&Event::Failed { error: e.to_string() });
            1
        }
    })
}

fn emit(event: &Event) {
    let line = serde_json::to_string(event).expect("events serialize");
    let mut out = std::io::stdout().lock();
    if writeln!(out, "{line}").and_then(|()| out.flush()).is_err() {
        // The parent is gone.
        std::process::exit(0);
    }
}

const METADATA_TIMEOUT: Duration = Duration::from_secs(10);

fn partitions(consumer: &BaseConsumer, topic: &str) -> Result<i32, BoxError> {
    let md = consumer.fetch_metadata(Some(topic), METADATA_TIMEOUT)?;
    let n = md.topics().first().map_or(0, |t| t.partitions().len()) as i32;
    if n == 0 {
        return Err(format!("topic {topic} has no partitions").into());
    }
    Ok(n)
}

fn output_consumer(watch: &Watch) -> Result<BaseConsumer, BoxError> {
    let consumer: BaseConsumer = watch
        .client_config(&format!("{}.observer", watch.output_topic))
        .set("isolation.level", "read_committed")
        .set("fetch.wait.max.ms", "2")
        .set("fetch.min.bytes", "1")
        .create()?;
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions(&consumer, &watch.output_topic)? {
        let (_, high) = consumer.fetch_watermarks(&watch.output_topic, p, METADATA_TIMEOUT)?;
        tpl.add_partition_offset(&watch.output_topic, p, Offset::Offset(high))?;
    }
    consumer.assign(&tpl)?;
    Ok(consumer)
}

/// The service group's committed offsets on `tpl`, summed.
fn committed_sum(consumer: &BaseConsumer, tpl: &TopicPartitionList) -> Result<i64, BoxError> {
    let committed = consumer.committed_offsets(tpl.clone(), METADATA_TIMEOUT)?;
    Ok(committed
        .elements()
        .iter()
        .filter_map(|e| match e.offset() {
            Offset::Offset(o) => Some(o),
            _ => None,
        })
        .sum())
}

fn watch_commits(consumer: BaseConsumer, tpl: TopicPartitionList, mut last: i64) {
    loop {
        match committed_sum(&consumer, &tpl) {
            Ok(position) if position != last => {
                emit(&Event::Committed {
                    at_us: now_us(),
                    position,
                });
                last = position;
            }
            Ok(_) => {}
            Err(e) => eprintln!("observer: fetching committed offsets: {e}"),
        }
        std::thread::sleep(COMMITTED_POLL);
    }
}

/// The integer `field` of a JSON object `payload` (an output's task).
fn task_of(payload: Option<&[u8]>, field: &str) -> Option<i64> {
    let value: serde_json::Value = serde_json::from_slice(payload?).ok()?;
    value.get(field)?.as_i64()
}

fn observe(watch: &Watch) -> Result<(), BoxError> {
    let outputs = output_consumer(watch)?;
    let group: BaseConsumer = watch.client_config(&watch.input_group).create()?;
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions(&group, &watch.input_topic)? {
        tpl.add_partition(&watch.input_topic, p);
    }
    let start = committed_sum(&group, &tpl)?;
    std::thread::Builder::new()
        .name("committed".into())
        .spawn(move || watch_commits(group, tpl, start))?;
    // The parent holds our stdin: end of file means it is gone.
    std::thread::Builder::new().name("parent".into()).spawn(|| {
        let _ = std::io::copy(&mut std::io::stdin().lock(), &mut std::io::sink());
        std::process::exit(0);
    })?;
    emit(&Event::Ready { at_us: now_us() });
    loop {
        let Some(first) = outputs.poll(Duration::from_millis(100)) else {
            continue;
        };
        let at_us = now_us();
        let wall_ms = wall_clock_ms();
        // Records already fetched arrived together: one event for all.
        let mut count = 0;
        let mut lag_ms: Option<i64> = None;
        let mut tasks = std::collections::BTreeSet::new();
        for record in std::iter::once(first).chain(std::iter::from_fn(|| outputs.poll(Duration::ZERO))) {
            match record {
                Ok(record) => {
                    count += 1;
                    if let Timestamp::CreateTime(created) = record.timestamp() {
                        lag_ms = Some(lag_ms.unwrap_or(i64::MIN).max(wall_ms - created));
                    }
                    let field = watch.task_field.as_deref();
                    tasks.extend(field.and_then(|f| task_of(record.payload(), f)));
                }
                // Transient (a broker reconnecting): the gap will show it.
                Err(e) => eprintln!("observer: reading outputs: {e}"),
            }
        }
        if count > 0 {
            emit(&Event::Output { at_us, count, lag_ms });
        }
        if !tasks.is_empty() {
            emit(&Event::Tasks {
                at_us,
                tasks: tasks.into_iter().collect(),
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{largest_gap, task_of};

    #[test]
    fn an_output_names_its_task_by_an_integer_field() {
        let output = br#"{"player":7,"score":0,"partition":12,"offset":40}"#;
        assert_eq!(task_of(Some(output), "partition"), Some(12));
        assert_eq!(task_of(Some(output), "task"), None);
        assert_eq!(task_of(Some(b"not json"), "partition"), None);
        assert_eq!(task_of(None, "partition"), None);
    }

    #[test]
    fn a_gap_overlapping_the_window_counts_whole() {
        // 10 ms rhythm, then a 100 ms hole straddling the window start.
        let times = [0, 10_000, 20_000, 120_000, 130_000, 140_000];
        assert_eq!(largest_gap(&times, 50_000, 60_000, 200_000), 100.0);
    }

    #[test]
    fn gaps_outside_the_window_do_not_count() {
        let times = [0, 100_000, 110_000, 120_000, 130_000, 400_000];
        assert_eq!(largest_gap(&times, 105_000, 125_000, 500_000), 10.0);
    }

    #[test]
    fn a_stream_that_never_resumes_is_open_until_the_end() {
        let times = [0, 10_000, 20_000];
        assert_eq!(largest_gap(&times, 15_000, 30_000, 90_000), 70.0);
    }

    #[test]
    fn an_empty_stream_is_one_gap_from_the_window_start() {
        assert_eq!(largest_gap(&[], 10_000, 20_000, 50_000), 40.0);
    }
}
