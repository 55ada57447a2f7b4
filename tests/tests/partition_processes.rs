//! Partitioned state as real processes: ledger hosts (`fleet_host`, the
//! code of `cargo run --example ledger_host`) sharing 16 tasks, one per
//! input partition, scaled 1 → 4 under load, one killed (its tasks fail
//! over) and started again, then drained 4 → 2 with the `ms2m` CLI. An
//! independent verifier (its own `read_committed` consumer and reference
//! fold) judges every output: 0 lost, 0 wrong, duplicates within the
//! at-least-once window of each task that failed over; at the end every
//! task has exactly one owner, named alike by the control topic and by
//! the hosts' own reports.
//!
//! Runs without a standby per task on the embedded broker and on tansu
//! (`tests/run.sh` runs it alone on a fresh tansu: after the other suites
//! on the same tansu it failed on 2 cores, leases expiring under the load);
//! and with a warm standby per task (`--standbys 1`) on the embedded
//! broker. One scenario at a time.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use ms2m_examples::fleet::Deployment;
use ms2m_examples::ledger::Transaction;
use ms2m_tests::processes::{judge, load, runtime, Binaries, Broker, Lease, NodeProcess};

const BINS: Binaries = Binaries {
    node: env!("CARGO_BIN_EXE_fleet_node"),
    cli: env!("CARGO_BIN_EXE_ms2m_cli"),
    host: env!("CARGO_BIN_EXE_fleet_host"),
};

/// Tasks: partitions of the input topic.
const PARTITIONS: i32 = 16;

/// Enough time for a step: host timeouts, leases, a few rounds of moves,
/// on a tansu whose store earlier suites have filled (a bound on the wait,
/// not a speed claim: the speed of moves is measured by S1).
const STEP: Duration = Duration::from_secs(240);

/// Each task's lease: every owner renews on the one control topic, so 16
/// tasks per host renew less often than the single-service tests' nodes,
/// and a stall of the (debug-built, shared) broker does not expire leases.
const HOST_LEASE: Lease = Lease {
    interval_ms: 1_000,
    timeout_ms: 6_000,
    margin_ms: 500,
};

/// The load while a step runs: transactions per second.
const RATE: u64 = 500;

/// One scenario: the broker, the deployment, its hosts, the input so far.
struct Fleet {
    rt: tokio::runtime::Runtime,
    _broker: Broker,
    brokers: String,
    prefix: String,
    deployment: Deployment,
    hosts: BTreeMap<String, NodeProcess>,
    input: Vec<(i32, i64, Transaction)>,
    standbys: usize,
}

/// One scenario at a time: each alone keeps two cores busy.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

impl Fleet {
    fn start(test: &str, standbys: usize) -> Self {
        let broker = Broker::start();
        let prefix = ms2m_tests::unique(test) + ".";
        broker.prepare(&prefix, PARTITIONS);
        Self {
            rt: runtime(),
            brokers: broker.address(),
            _broker: broker,
            deployment: Deployment::new(&prefix).with_partitions(PARTITIONS),
            prefix,
            hosts: BTreeMap::new(),
            input: Vec::new(),
            standbys,
        }
    }

    fn spawn(&mut self, id: &str) {
        let args = [
            "--partitions".to_string(),
            PARTITIONS.to_string(),
            "--standbys".to_string(),
            self.standbys.to_string(),
        ];
        let host = NodeProcess::spawn_host(BINS, id, &self.brokers, &self.prefix, HOST_LEASE, &args);
        self.hosts.insert(id.to_string(), host);
    }

    /// Runs `step` under load (`seconds` of transactions at [`RATE`]).
    fn under_load(&mut self, what: &str, seconds: u64, step: impl FnOnce(&mut Self)) {
        eprintln!("== {what}");
        let from = self.input.len() as u64;
        let running = load(&self.rt, &self.brokers, &self.deployment, from, seconds * RATE, RATE);
        step(self);
        self.input.extend(self.rt.block_on(running).expect("load"));
    }

    /// Waits until the hosts `ids` own every task, each exactly once, `per_host`
    /// each (by their own reports).
    fn wait_spread(&self, ids: &[&str], per_host: usize) {
        self.wait_owned(ids, |counts| counts.iter().all(|c| *c == per_host));
    }

    /// Waits until the hosts `ids` own every task between them, each once,
    /// in counts `spread` accepts.
    fn wait_owned(&self, ids: &[&str], spread: impl Fn(&[usize]) -> bool) {
        let deadline = Instant::now() + STEP;
        loop {
            let owned: Vec<BTreeSet<String>> = ids.iter().map(|id| self.hosts[*id].owned()).collect();
            let all: BTreeSet<&String> = owned.iter().flatten().collect();
            let counts: Vec<usize> = owned.iter().map(BTreeSet::len).collect();
            let once = counts.iter().sum::<usize>() == all.len();
            if once && all.len() == PARTITIONS as usize && spread(&counts) {
                eprintln!("   owned by {ids:?}: {counts:?}");
                return;
            }
            assert!(
                Instant::now() < deadline,
                "tasks not owned as expected by {ids:?} within {STEP:?}: {:?}",
                self.report()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits until every task also stands by on one of the hosts `ids`
    /// other than its owner (with `--standbys 1`).
    fn wait_standbys(&self, ids: &[&str]) {
        let deadline = Instant::now() + STEP;
        loop {
            let standing: BTreeSet<String> = ids
                .iter()
                .flat_map(|id| self.hosts[*id].tasks())
                .filter(|(_, role)| role == "Standby")
                .map(|(task, _)| task)
                .collect();
            if standing.len() == PARTITIONS as usize {
                eprintln!("   every task stands by on another host");
                return;
            }
            assert!(
                Instant::now() < deadline,
                "not every task stands by on {ids:?} within {STEP:?}: {:?}",
                self.report()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Every host's tasks and roles, for failure messages.
    fn report(&self) -> BTreeMap<&String, BTreeMap<String, String>> {
        self.hosts.iter().map(|(id, h)| (id, h.tasks())).collect()
    }

    fn cli(&self, args: &[&str]) -> serde_json::Value {
        let started = Instant::now();
        let (ok, out) = ms2m_tests::processes::cli(BINS, &self.brokers, &self.prefix, args);
        assert!(ok, "ms2m {args:?} failed: {out}");
        eprintln!("   ms2m {args:?}: {:?}", started.elapsed());
        out
    }

    /// The control topic names exactly one owner per task, one of `ids`,
    /// and each host reports owning exactly the tasks it is named for.
    fn one_owner_per_task(&self, ids: &[&str]) {
        let fleet = self.cli(&["fleet"]);
        let tasks = fleet["tasks"].as_array().cloned().unwrap_or_default();
        assert_eq!(tasks.len(), PARTITIONS as usize, "{fleet}");
        for id in ids {
            let named: BTreeSet<String> = tasks
                .iter()
                .filter(|t| t["owner"] == *id)
                .filter_map(|t| t["task"].as_str().map(str::to_string))
                .collect();
            assert_eq!(
                named,
                self.hosts[*id].owned(),
                "host {id}: the channel and the host agree; channel: {fleet}; hosts: {:?}",
                self.report()
            );
        }
        let named: usize = ids
            .iter()
            .map(|id| tasks.iter().filter(|t| t["owner"] == *id).count())
            .sum();
        assert_eq!(
            named, PARTITIONS as usize,
            "every task owned by one of {ids:?}: {fleet}"
        );
    }
}

#[test]
fn tasks_spread_fail_over_and_drain_across_host_processes() {
    scale_out_fail_over_drain("tasks", 0);
}

/// On the embedded broker only: in the tansu pass, after the other suites
/// filled its sqlite store, one scenario takes 8 minutes.
#[test]
fn with_a_warm_standby_per_task_too_on_mock() {
    scale_out_fail_over_drain("standbys", 1);
}

/// 1 -> 4 hosts, kill -9 of one and its restart, drain 4 -> 2, under load.
fn scale_out_fail_over_drain(test: &str, standbys: usize) {
    let _alone = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let mut fleet = Fleet::start(test, standbys);
    fleet.spawn("a");
    fleet.wait_spread(&["a"], 16);
    fleet.under_load("scale out 1 -> 4", 20, |f| {
        for id in ["b", "c", "d"] {
            f.spawn(id);
        }
        f.wait_spread(&["a", "b", "c", "d"], 4);
    });
    let failed_over = fleet.hosts["d"].owned().len();
    fleet.under_load("kill -9 d", 15, |f| {
        f.hosts["d"].signal("KILL");
        f.wait_owned(&["a", "b", "c"], |counts| counts.iter().all(|c| (5..=6).contains(c)));
    });
    fleet.under_load("d starts again", 15, |f| {
        f.hosts.remove("d");
        f.spawn("d");
        f.wait_spread(&["a", "b", "c", "d"], 4);
    });
    fleet.under_load("drain c and d: 4 -> 2", 20, |f| {
        let wait = format!("{}s", STEP.as_secs());
        let drained = f.cli(&["drain", "c", "--wait", &wait]);
        let hosts = drained["fleet"]["hosts"].as_array().cloned().unwrap_or_default();
        let c = hosts.iter().find(|h| h["host"] == "c").expect("c listed");
        assert_eq!(
            (c["owns"].as_u64(), c["drained"].as_bool()),
            (Some(0), Some(true)),
            "{drained}"
        );
        f.cli(&["drain", "d", "--wait", &wait]);
        f.wait_spread(&["a", "b"], 8);
    });
    let verdict = judge(&fleet.rt, &fleet.brokers, &fleet.deployment, &fleet.input, failed_over);
    fleet.one_owner_per_task(&["a", "b"]);
    if standbys > 0 {
        fleet.wait_standbys(&["a", "b"]);
    }
    eprintln!(
        "summary ({standbys} standby per task): 16 tasks, 1 -> 4 -> (kill -9 d: {failed_over} task(s) failed over) -> 4 -> 2 hosts; \
         {} transactions; verdict {verdict:?}",
        fleet.input.len()
    );
    for id in ["c", "d", "a", "b"] {
        let host = fleet.hosts.remove(id).expect("running");
        assert!(host.terminate(), "host {id} shuts down cleanly");
    }
}
