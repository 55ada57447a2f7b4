//! F1 (failover gap) and F2 (standby replay lag) of a fleet of
//! [`Node`](ms2m_core::node::Node)s, measured from outside.
//!
//! Each node is this binary re-executed ([`crate::nodes`]), running the
//! [`GameSessions`](ms2m_examples::game::GameSessions) service with its state built to the requested size by
//! 1,000 joins, over the parent's broker, at least once, with a short lease
//! ([`LEASE_INTERVAL_MS`], [`LEASE_TIMEOUT_MS`], [`LEASE_MARGIN_MS`]). The
//! owner `a` starts first and serves; the standby `b` starts once `a`
//! serves, and counts as warm once it replays within one second of input
//! behind `a`'s committed position. The input runs at [`RATE`] msg/s in
//! 10 ms ticks, each with a score query whose answer keeps the output
//! flowing (as in B1).
//!
//! * **F1**: after a steady stretch, `a` is `SIGKILL`ed. The gap is from
//!   the instant before the signal to the first output arrival after the
//!   kill at the outside observer ([`Observer`]: its own process, its own
//!   `read_committed` consumer). Precisely: the end of the largest gap
//!   between output arrivals that overlaps the kill (±50 ms), so a stray
//!   output of `a` already in flight at the kill does not count as the new
//!   owner's. The game's outputs carry no instance id; nothing but `b`
//!   can produce after `a` is dead.
//!   Beside it, a parent-side consumer of the control topic stamps every
//!   `Renew` and `Claim` as it arrives, and `b`'s status lines stamp its
//!   switch to `Owner`, which splits the gap into: the age of `a`'s last
//!   renewal at the kill, the claim, the takeover (sink claim, replay to
//!   the committed position) and the first output.
//!   A standby counts the timeout from the last renewal it read, up to one
//!   interval before the kill, so the gap from the kill depends on where in
//!   the renewal cycle the kill lands: run `i` of `n` kills `i/n` of an
//!   interval later, spreading the runs over the cycle, and the
//!   `F1-renewal` row reports the gap from the owner's last renewal (the
//!   gap had it died right after renewing: the worst phase).
//! * **F2**: the standby's lag, sampled every 100 ms: the `NodeStatus.lag`
//!   it publishes (its distance to the owner's committed position) and,
//!   from outside, the input's high watermarks (fetched by the parent's own
//!   client) minus the standby's position (from its latest status line, at
//!   most [`BEAT_EVERY`](crate::nodes::BEAT_EVERY) old, ≈ 100 msgs).
//!
//! Why from outside: the library's own figures (its `took over` log, its
//! lag) are what it believes; a client sees outputs stop and resume, and
//! an operator sees the high watermark run ahead of a standby.
//!
//! The lease: renewed every 500 ms, expiring after 2 s, with a 200 ms
//! margin for one apply step (a poll of at most 500 records; freezing the
//! state for a snapshot is O(1)). The owner's validity after a renewal is
//! `2 s · 0.99/1.01 − 0.2 s ≈ 1.76 s`, well above the interval, so three
//! renewals may be lost before it stops; `LeaseConfig::validate` accepts it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ms2m_core::node::NodeRole;
use ms2m_core::{ControlBody, ControlMessage};
use ms2m_examples::game::GameEvent;
use ms2m_examples::observer::{now_us, Observer, Watch, Window};
use ms2m_examples::support::{produce_json, producer};
use ms2m_kafka::KafkaCluster;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Message, Offset, TopicPartitionList};
use tokio::task::JoinHandle;

use crate::migration::{game_input, key, PLAYERS};
use crate::nodes::{Beat, NodeProcess, NodeSpec};
use crate::report::{median, p99, Goal, Row, Stat};
use crate::{Bench, BoxError};

/// Input rate, msg/s.
pub const RATE: u64 = 2000;
/// The owner renews its lease this often, ms.
pub const LEASE_INTERVAL_MS: u64 = 500;
/// A standby claims this long after the last renewal it read, ms.
pub const LEASE_TIMEOUT_MS: u64 = 2000;
/// The longest apply step the lease allows for, ms.
pub const LEASE_MARGIN_MS: u64 = 200;
/// Partitions of the input and output topics.
const PARTITIONS: i32 = 4;

/// A fresh deployment: topics, observer, control watch, owner, warm
/// standby, input running. Dropping it kills every child.
struct Fleet {
    input: String,
    cluster: KafkaCluster,
    observer: Observer,
    control: ControlWatch,
    owner: NodeProcess,
    standby: NodeProcess,
    running: Arc<AtomicBool>,
    load: Option<JoinHandle<Result<u64, BoxError>>>,
}

impl Fleet {
    async fn start(b: &Bench, what: &str, mib: u64) -> Result<Self, BoxError> {
        let snapshot_partitions = if mib > 64 { 128 } else { 64 };
        let (cluster, input, output) = b
            .deployment(&format!("{what}-{mib}m"), PARTITIONS, snapshot_partitions)
            .await?;
        let service = cluster.config().service_name().to_string();
        let observer = Observer::start(&Watch::of(&cluster, &input, &output)).await?;
        let control = ControlWatch::start(&cluster)?;
        let spec = |instance: &str| NodeSpec {
            instance: instance.into(),
            bootstrap_servers: cluster.bootstrap_servers().to_string(),
            service: service.clone(),
            input: input.clone(),
            output: output.clone(),
            snapshot_partitions,
            lease_interval_ms: LEASE_INTERVAL_MS,
            lease_timeout_ms: LEASE_TIMEOUT_MS,
            lease_margin_ms: LEASE_MARGIN_MS,
        };
        join_players(&cluster, &input, mib).await?;
        let owner = NodeProcess::start(&spec("a"))?;
        let within = Duration::from_secs(60) + Duration::from_millis(20 * mib);
        owner.wait_for("the owner serving", within, serving).await?;
        let running = Arc::new(AtomicBool::new(true));
        let load = Some(game_input(
            &cluster,
            &input,
            RATE,
            crate::migration::TICK,
            running.clone(),
        )?);
        let standby = NodeProcess::start(&spec("b"))?;
        standby.wait_for("a warm standby", within, warm).await?;
        Ok(Self {
            input,
            cluster,
            observer,
            control,
            owner,
            standby,
            running,
            load,
        })
    }

    /// Stops the input and checks it ran; the children die on drop.
    async fn stop(mut self) -> Result<(), BoxError> {
        self.running.store(false, Ordering::Relaxed);
        if let Some(load) = self.load.take() {
            load.await??;
        }
        Ok(())
    }
}

/// Owner, with the joins applied.
fn serving(beat: &Beat) -> bool {
    beat.role == NodeRole::Owner && beat.position >= PLAYERS as i64
}

/// Standby, with the joins replayed, within 1 s of input of the owner's
/// committed position.
fn warm(beat: &Beat) -> bool {
    beat.role == NodeRole::Standby && beat.position >= PLAYERS as i64 && beat.lag.is_some_and(|l| l <= RATE)
}

/// One join per player, each with a level of `mib / PLAYERS`: the state.
async fn join_players(cluster: &KafkaCluster, input: &str, mib: u64) -> Result<(), BoxError> {
    let board_bytes = ((mib << 20) / PLAYERS) as u32;
    let joins = (0..PLAYERS)
        .map(|player| (key(player), GameEvent::Join { player, board_bytes }))
        .collect();
    produce_json(&producer(cluster)?, input, joins).await?;
    Ok(())
}

/// A lease event on the control topic, stamped on arrival.
#[derive(Clone, Debug)]
struct LeaseEvent {
    at_us: u64,
    claim: bool,
    owner: String,
}

/// The parent's own consumer of the control topic, stamping every `Renew`
/// and `Claim` as it arrives. Stops when dropped.
struct ControlWatch {
    events: Arc<Mutex<Vec<LeaseEvent>>>,
    running: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ControlWatch {
    fn start(cluster: &KafkaCluster) -> Result<Self, BoxError> {
        let consumer: BaseConsumer = cluster
            .client_config()
            .set("group.id", format!("{}.f1-watch", cluster.config().group_id()))
            .set("enable.auto.commit", "false")
            .set("fetch.wait.max.ms", "2")
            .create()?;
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(&cluster.config().control_topic(), 0, Offset::Beginning)?;
        consumer.assign(&tpl)?;
        let events: Arc<Mutex<Vec<LeaseEvent>>> = Arc::default();
        let running = Arc::new(AtomicBool::new(true));
        let mut watch = Self {
            events: events.clone(),
            running: running.clone(),
            thread: None,
        };
        let thread = std::thread::Builder::new()
            .name("ms2m-f1-control".into())
            .spawn(move || {
                while running.load(Ordering::Relaxed) {
                    let Some(Ok(m)) = consumer.poll(Duration::from_millis(50)) else {
                        continue;
                    };
                    if let Some(e) = lease_event(m.payload().unwrap_or_default()) {
                        events.lock().unwrap_or_else(|p| p.into_inner()).push(e);
                    }
                }
            })?;
        watch.thread = Some(thread);
        Ok(watch)
    }

    fn events(&self) -> Vec<LeaseEvent> {
        self.events.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

impl Drop for ControlWatch {
    fn drop(&mut self) {
        self.running.store(false, Ordering::Relaxed);
        // Its consumer must go before the (embedded) broker does.
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn lease_event(payload: &[u8]) -> Option<LeaseEvent> {
    let at_us = now_us();
    match ControlMessage::from_bytes(payload).ok()?.body {
        ControlBody::Renew { owner, .. } => Some(LeaseEvent {
            at_us,
            claim: false,
            owner,
        }),
        ControlBody::Claim { owner, .. } => Some(LeaseEvent {
            at_us,
            claim: true,
            owner,
        }),
        _ => None,
    }
}

/// One failover, in ms after the kill (negative: before).
#[derive(Clone, Copy, Debug)]
struct Failover {
    /// The first output of the new owner at the observer: the gap.
    first_output: f64,
    /// The last output before it.
    last_output: f64,
    /// `a`'s last renewal seen on the control topic.
    last_renewal: f64,
    /// `b`'s claim seen on the control topic.
    claim: f64,
    /// `b` reported itself the owner (live).
    live: f64,
    /// The output resumed within the wait (else the gap is a lower bound).
    resumed: bool,
}

fn after(t: u64, kill: u64) -> f64 {
    (t as f64 - kill as f64) / 1e3
}

/// One F1 run at `mib` MiB; `phase` (0..1) shifts the kill within the
/// renewal interval, so that the runs spread over the renewal cycle.
async fn failover_once(b: &Bench, mib: u64, phase: f64) -> Result<Failover, BoxError> {
    let mut fleet = Fleet::start(b, "f1", mib).await?;
    let steady = Duration::from_secs(if b.quick { 1 } else { 2 });
    tokio::time::sleep(steady + Duration::from_millis(LEASE_INTERVAL_MS).mul_f64(phase)).await;
    let kill = fleet.owner.kill();
    let takeover = Duration::from_millis(LEASE_TIMEOUT_MS) + Duration::from_secs(30);
    fleet
        .standby
        .wait_for("the standby's takeover", takeover, |beat| beat.role == NodeRole::Owner)
        .await?;
    let live = fleet
        .standby
        .became(NodeRole::Owner, kill)
        .ok_or("no switch to owner")?;
    let resumed = fleet.observer.await_resumed(live, Duration::from_secs(10)).await;
    let gaps = fleet.observer.gaps(Window {
        request_us: kill,
        live_us: kill,
    });
    let events = fleet.control.events();
    let last_renewal = events
        .iter()
        .filter(|e| !e.claim && e.owner == "a" && e.at_us <= kill)
        .map(|e| e.at_us)
        .max();
    let claim = events.iter().find(|e| e.claim && e.owner == "b" && e.at_us > kill);
    fleet.stop().await?;
    Ok(Failover {
        first_output: gaps.output_gap_ended_ms,
        last_output: gaps.output_gap_began_ms,
        last_renewal: last_renewal.map_or(f64::NAN, |t| after(t, kill)),
        claim: claim.map_or(f64::NAN, |e| after(e.at_us, kill)),
        live: after(live, kill),
        resumed: resumed && gaps.resumed,
    })
}

/// F1: the failover gap at 1 and 64 MiB (quick: 1 MiB).
pub async fn f1(b: &Bench) -> Result<Vec<Row>, BoxError> {
    let sizes: &[u64] = if b.quick { &[1] } else { &[1, 64] };
    let mut rows = Vec::new();
    for &mib in sizes {
        let mut runs = Vec::new();
        for run in 0..b.runs {
            let f = failover_once(b, mib, run as f64 / b.runs as f64).await?;
            eprintln!(
                "  F1 {mib} MiB: gap {:.0} ms (timeout {LEASE_TIMEOUT_MS}); last renewal {:+.0}, claim {:+.0}, \
                 live {:+.0}, last output {:+.0} ms after the kill{}",
                f.first_output,
                f.last_renewal,
                f.claim,
                f.live,
                f.last_output,
                if f.resumed { "" } else { "; NOT resumed" }
            );
            runs.push(f);
        }
        rows.extend(f1_rows(mib, &runs));
    }
    Ok(rows)
}

fn column(runs: &[Failover], f: fn(&Failover) -> f64) -> Vec<f64> {
    runs.iter().map(f).collect()
}

/// The F1 row (gap from the kill) and the F1-renewal row (gap from the
/// owner's last renewal: the kill at the worst phase of the lease).
fn f1_rows(mib: u64, runs: &[Failover]) -> [Row; 2] {
    let timeout = LEASE_TIMEOUT_MS as f64;
    let gaps = column(runs, |f| f.first_output);
    let from_renewal = column(runs, |f| f.first_output - f.last_renewal);
    let over = |v: &[f64]| v.iter().map(|g| g - timeout).collect::<Vec<_>>();
    let spread = |v: &[f64]| {
        format!(
            "p50 {:.0} / p99 {:.0} ms (− timeout: p50 {:+.0} / p99 {:+.0} ms)",
            median(v),
            p99(v),
            median(&over(v)),
            p99(&over(v))
        )
    };
    let lease = format!(
        "AtLeastOnce, {mib} MiB, lease {LEASE_INTERVAL_MS}/{LEASE_TIMEOUT_MS}/{LEASE_MARGIN_MS} ms (interval/timeout/margin)"
    );
    let row = |id: &str, what: String, samples: &[f64], notes: String| {
        let mut row = Row::new(
            id,
            what,
            Stat::new(samples.to_vec(), "ms"),
            "lease timeout",
            Some(Stat::new(vec![timeout; runs.len()], "ms")),
            None,
            format!("≤ timeout + 100 ms = {} ms", LEASE_TIMEOUT_MS + 100),
            Goal::None,
            notes,
        );
        row.met = Some(median(samples) <= timeout + 100.0);
        row
    };
    [
        row(
            "F1",
            format!("failover gap (outside: SIGKILL of the owner → first output of the new owner), {mib} MiB state, {RATE} msg/s"),
            &gaps,
            format!("{lease}; {}; {}", spread(&gaps), breakdown(runs)),
        ),
        row(
            "F1-renewal",
            format!("failover gap from the owner's last renewal (the kill at the lease's worst phase), {mib} MiB state, {RATE} msg/s"),
            &from_renewal,
            format!(
                "{lease}; {}; the owner's last renewal (seen on the control topic) → first output: F1 plus the renewal's age at the kill (0..interval)",
                spread(&from_renewal)
            ),
        ),
    ]
}

/// Where the gap went: medians of each step.
fn breakdown(runs: &[Failover]) -> String {
    let m = |f: fn(&Failover) -> f64| median(&column(runs, f));
    let unresumed = runs.iter().filter(|f| !f.resumed).count();
    format!(
        "medians: last renewal {:.0} ms before the kill; expiry (last renewal + timeout) → claim on the channel {:.0}; \
         claim → standby reports Owner {:.0}; Owner → first output {:.0}; last output of the old owner {:+.0} ms after the kill{}",
        -m(|f| f.last_renewal),
        m(|f| f.claim - f.last_renewal - LEASE_TIMEOUT_MS as f64),
        m(|f| f.live - f.claim),
        m(|f| f.first_output - f.live),
        m(|f| f.last_output),
        if unresumed > 0 {
            format!("; {unresumed} run(s) did not resume in 10 s")
        } else {
            String::new()
        }
    )
}

/// What F2 sampled, in messages.
#[derive(Default)]
struct Lags {
    /// `NodeStatus.lag` of the standby.
    published: Vec<f64>,
    /// Input high watermarks − the standby's position.
    outside: Vec<f64>,
    /// Input high watermarks − the owner's position.
    owner: Vec<f64>,
}

/// F2: the standby's lag at [`RATE`] msg/s over 20 s (quick: 5 s), 64 MiB
/// state (quick: 1 MiB).
pub async fn f2(b: &Bench) -> Result<Vec<Row>, BoxError> {
    let (mib, span) = if b.quick { (1, 5) } else { (64, 20) };
    let fleet = Fleet::start(b, "f2", mib).await?;
    let lags = sample_lags(&fleet, Duration::from_secs(span)).await;
    fleet.stop().await?;
    let lags = lags?;
    eprintln!(
        "  F2 {mib} MiB: published lag p50 {:.0} / p99 {:.0}, outside p50 {:.0} / p99 {:.0}, owner p50 {:.0} msgs",
        median(&lags.published),
        p99(&lags.published),
        median(&lags.outside),
        p99(&lags.outside),
        median(&lags.owner)
    );
    Ok(f2_rows(mib, span, &lags))
}

/// Samples the lags every 100 ms for `span`.
async fn sample_lags(fleet: &Fleet, span: Duration) -> Result<Lags, BoxError> {
    let consumer: Arc<BaseConsumer> = Arc::new(fleet.cluster.client_config().create()?);
    let mut lags = Lags::default();
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    let end = tokio::time::Instant::now() + span;
    while tokio::time::Instant::now() < end {
        tick.tick().await;
        let high = high_watermarks(consumer.clone(), fleet.input.clone()).await?;
        let (Some(standby), Some(owner)) = (fleet.standby.latest(), fleet.owner.latest()) else {
            continue;
        };
        if standby.role != NodeRole::Standby {
            return Err(format!("the standby left its role: {standby:?}").into());
        }
        lags.published.extend(standby.lag.map(|l| l as f64));
        lags.outside.push((high - standby.position).max(0) as f64);
        lags.owner.push((high - owner.position).max(0) as f64);
    }
    Ok(lags)
}

/// The sum of `topic`'s high watermarks.
async fn high_watermarks(consumer: Arc<BaseConsumer>, topic: String) -> Result<i64, BoxError> {
    tokio::task::spawn_blocking(move || -> Result<i64, BoxError> {
        let mut sum = 0;
        for p in 0..PARTITIONS {
            sum += consumer.fetch_watermarks(&topic, p, Duration::from_secs(5))?.1;
        }
        Ok(sum)
    })
    .await?
}

fn f2_rows(mib: u64, span: u64, lags: &Lags) -> Vec<Row> {
    let target = format!("≤ 1 s of input = {RATE} msgs");
    let sampling = format!("{mib} MiB state, sampled every 100 ms for {span} s (the runs column counts samples)");
    let mut published = Row::new(
        "F2",
        format!("standby replay lag, published (`NodeStatus.lag`: behind the owner's committed position), {RATE} msg/s input"),
        Stat::new(lags.published.clone(), "msgs"),
        "",
        None,
        None,
        target.clone(),
        Goal::None,
        format!(
            "p50 {:.0} / p99 {:.0} msgs; {sampling}",
            median(&lags.published),
            p99(&lags.published)
        ),
    );
    published.met = Some(p99(&lags.published) <= RATE as f64);
    let mut outside = Row::new(
        "F2-outside",
        format!("standby replay lag from outside (input high watermark − standby position), {RATE} msg/s input"),
        Stat::new(lags.outside.clone(), "msgs"),
        "the owner, same samples",
        Some(Stat::new(lags.owner.clone(), "msgs")),
        None,
        target,
        Goal::None,
        format!(
            "p50 {:.0} / p99 {:.0} msgs (owner p50 {:.0} / p99 {:.0}); positions from the nodes' status lines, \
             up to 50 ms old (≈ 100 msgs); {sampling}",
            median(&lags.outside),
            p99(&lags.outside),
            median(&lags.owner),
            p99(&lags.owner)
        ),
    );
    outside.met = Some(p99(&lags.outside) <= RATE as f64);
    vec![published, outside]
}
