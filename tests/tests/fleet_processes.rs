//! The fleet as real processes: ledger nodes (`fleet_node`, the code of
//! `cargo run --example ledger_node`) started, killed, paused and cut off,
//! the `ms2m` CLI as the coordinator and operator, and an independent
//! verifier (its own `read_committed` consumer and reference fold) judging
//! every scenario: 0 lost, 0 wrong, duplicates within the at-least-once
//! window, one owner at the end.
//!
//! On loopback these run on the embedded broker (hosted by the test
//! process) and, in the tansu pass, on tansu. The `hosts_*` scenarios put
//! the broker and each node in network namespaces of their own (root
//! only; `#[ignore]`d with the reason, and run by `tests/run.sh` as root).

use std::time::Duration;

use ms2m_core::ControlBody;
use ms2m_examples::fleet::Deployment;
use ms2m_examples::ledger::Transaction;
use ms2m_tests::processes::{
    cli_spawn, judge, load, runtime, Binaries, Broker, ControlWatch, Hosts, NodeProcess, Tansu, BROKER_HOST, TEST_LEASE,
};

const BINS: Binaries = Binaries {
    node: env!("CARGO_BIN_EXE_fleet_node"),
    cli: env!("CARGO_BIN_EXE_ms2m_cli"),
    host: env!("CARGO_BIN_EXE_fleet_host"),
};

fn spawn(id: &str, brokers: &str, prefix: &str, netns: Option<&str>) -> NodeProcess {
    NodeProcess::spawn(BINS, id, brokers, prefix, TEST_LEASE, netns)
}

fn cli(brokers: &str, prefix: &str, args: &[&str]) -> (bool, serde_json::Value) {
    ms2m_tests::processes::cli(BINS, brokers, prefix, args)
}

/// Enough time for a takeover: the lease timeout, a claim, a recovery.
const TAKEOVER: Duration = Duration::from_secs(30);

/// The owner the control channel names, through the CLI.
fn owner(brokers: &str, prefix: &str) -> Option<String> {
    let (ok, status) = cli(brokers, prefix, &["status"]);
    assert!(ok, "ms2m status failed: {status}");
    status["control"]["owner"]["instance_id"].as_str().map(str::to_string)
}

/// Whether `ms2m status` lists node `id` with `role` within `wait` (its
/// announcement is published off the node's path, so it may trail the
/// node's own status line).
fn listed_as(brokers: &str, prefix: &str, id: &str, role: &str, wait: Duration) -> bool {
    let deadline = std::time::Instant::now() + wait;
    loop {
        let (ok, status) = cli(brokers, prefix, &["status"]);
        assert!(ok, "ms2m status failed: {status}");
        let nodes = status["control"]["nodes"].as_array().cloned().unwrap_or_default();
        if nodes.iter().any(|n| n["instance_id"] == id && n["role"] == role) {
            return true;
        }
        if std::time::Instant::now() >= deadline {
            eprintln!("nodes listed: {nodes:?}");
            return false;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn deployment(broker: &Broker, test: &str) -> (Deployment, String) {
    let prefix = ms2m_tests::unique(test) + ".";
    broker.prepare(&prefix, ms2m_examples::fleet::PARTITIONS);
    (Deployment::new(&prefix), prefix)
}

#[test]
fn a_standby_process_takes_over_when_the_owner_is_killed() {
    let rt = runtime();
    let broker = Broker::start();
    let brokers = broker.address();
    let (deployment, prefix) = deployment(&broker, "kill9");
    let a = spawn("a", &brokers, &prefix, None);
    a.wait_role("Owner", TAKEOVER);
    let b = spawn("b", &brokers, &prefix, None);
    b.wait_role("Standby", TAKEOVER);
    assert!(
        listed_as(&brokers, &prefix, "b", "standby", TAKEOVER),
        "ms2m status lists the standby"
    );
    let first = load(&rt, &brokers, &deployment, 0, 1_500, 500);
    std::thread::sleep(Duration::from_secs(1));
    a.signal("KILL");
    b.wait_role("Owner", TAKEOVER);
    let mut input = rt.block_on(first).expect("load");
    input.extend(
        rt.block_on(load(&rt, &brokers, &deployment, 1_500, 500, 500))
            .expect("load"),
    );
    judge(&rt, &brokers, &deployment, &input, 1);
    assert_eq!(owner(&brokers, &prefix).as_deref(), Some("b"));
    assert!(b.terminate(), "b shuts down cleanly");
}

#[test]
fn an_owner_paused_past_its_lease_never_emits_again() {
    let rt = runtime();
    let broker = Broker::start();
    let brokers = broker.address();
    let (deployment, prefix) = deployment(&broker, "sigstop");
    let a = spawn("a", &brokers, &prefix, None);
    a.wait_role("Owner", TAKEOVER);
    let b = spawn("b", &brokers, &prefix, None);
    b.wait_role("Standby", TAKEOVER);
    let first = load(&rt, &brokers, &deployment, 0, 2_000, 500);
    std::thread::sleep(Duration::from_millis(800));
    a.signal("STOP");
    b.wait_role("Owner", TAKEOVER);
    a.signal("CONT");
    a.wait_role("Standby", TAKEOVER);
    let input = rt.block_on(first).expect("load");
    judge(&rt, &brokers, &deployment, &input, 1);
    assert_eq!(owner(&brokers, &prefix).as_deref(), Some("b"));
    assert!(
        a.roles().ends_with(&["Owner".to_string(), "Standby".to_string()]),
        "{:?}",
        a.roles()
    );
}

/// Produces one record the ledger cannot decode to partition 0 of the
/// input; its offset.
fn produce_poison(rt: &tokio::runtime::Runtime, brokers: &str, deployment: &Deployment) -> i64 {
    rt.block_on(async {
        let cluster = deployment.cluster(brokers).await.expect("cluster");
        let producer = ms2m_examples::support::producer(&cluster).expect("producer");
        let topic = deployment.input();
        let record = rdkafka::producer::FutureRecord::to(&topic)
            .partition(0)
            .key("poison")
            .payload("not a transaction");
        let delivery = producer
            .send(record, Duration::from_secs(10))
            .await
            .map_err(|(e, _)| e)
            .expect("produce the poison record");
        delivery.offset
    })
}

/// Under the default `BadMessagePolicy::Fail`, a record the ledger cannot
/// decode stops its owner (typed error, exit status non-zero, nothing
/// skipped); `ms2m dead-letters skip` records the operator's decision on
/// the control channel, and the restarted node gets past exactly that
/// record. `ms2m status` lists the decision.
#[test]
fn a_poison_record_stops_the_owner_until_the_cli_skips_it() {
    let rt = runtime();
    let broker = Broker::start();
    let brokers = broker.address();
    let (deployment, prefix) = deployment(&broker, "poison");
    let mut a = spawn("a", &brokers, &prefix, None);
    a.wait_role("Owner", TAKEOVER);
    let mut input = rt
        .block_on(load(&rt, &brokers, &deployment, 0, 200, 500))
        .expect("load");
    let poison = produce_poison(&rt, &brokers, &deployment);
    input.extend(
        rt.block_on(load(&rt, &brokers, &deployment, 200, 200, 500))
            .expect("load"),
    );
    let exit = a.wait_exit(TAKEOVER).expect("the owner stops at the poison record");
    assert!(!exit.success(), "{exit}");
    let offset = poison.to_string();
    let args = [
        "dead-letters",
        "skip",
        "--input",
        &deployment.input(),
        "--partition",
        "0",
        "--offset",
        &offset,
        "--reason",
        "not a transaction",
        "--operator",
        "test",
    ];
    let (ok, skipped) = cli(&brokers, &prefix, &args);
    assert!(ok, "ms2m dead-letters skip: {skipped}");
    let a = spawn("a", &brokers, &prefix, None);
    a.wait_role("Owner", TAKEOVER);
    judge(&rt, &brokers, &deployment, &input, 1);
    let (ok, status) = cli(&brokers, &prefix, &["status"]);
    assert!(ok, "ms2m status: {status}");
    let audit = &status["control"]["skipped_inputs"][0];
    assert_eq!(
        (audit["offset"].as_i64(), audit["operator"].as_str()),
        (Some(poison), Some("test")),
        "{status}"
    );
    assert!(a.terminate(), "a shuts down cleanly");
}

#[test]
fn the_cli_migrates_between_node_processes_and_reports_them() {
    let rt = runtime();
    let broker = Broker::start();
    let brokers = broker.address();
    let (deployment, prefix) = deployment(&broker, "cli");
    let a = spawn("a", &brokers, &prefix, None);
    a.wait_role("Owner", TAKEOVER);
    let b = spawn("b", &brokers, &prefix, None);
    b.wait_role("Standby", TAKEOVER);
    let running = load(&rt, &brokers, &deployment, 0, 3_000, 500);
    std::thread::sleep(Duration::from_millis(800));
    for to in ["b", "a"] {
        let (ok, report) = cli(&brokers, &prefix, &["migrate", "--to", to, "--timeout", "30s"]);
        assert!(ok, "ms2m migrate --to {to}: {report}");
        assert_eq!(report["digest_match"], serde_json::Value::Bool(true), "{report}");
        assert_eq!(owner(&brokers, &prefix).as_deref(), Some(to));
    }
    b.wait_role("Standby", TAKEOVER);
    let input = rt.block_on(running).expect("load");
    judge(&rt, &brokers, &deployment, &input, 0);
    let (ok, recovered) = cli(&brokers, &prefix, &["recover"]);
    assert!(ok, "ms2m recover: {recovered}");
    let (ok, verified) = cli(&brokers, &prefix, &["snapshots", "verify"]);
    assert!(ok, "ms2m snapshots verify: {verified}");
}

/// Every fault of the fleet, with each node and the broker on a host of
/// its own: a link cut of the owner's host, a pause past the lease, kill -9
/// of the owner; and during migrations: a link cut of the source, kill -9
/// of the source after the stop, of the target after it restored and
/// after its takeover, and of the coordinator (then `ms2m recover`).
#[test]
#[ignore = "needs root (network namespaces) and tansu; tests/run.sh runs it when root"]
fn hosts_survive_link_cuts_pauses_and_kills() {
    assert!(Hosts::available(), "run as root with iproute2 (ip netns)");
    let mut fleet = HostsFleet::start(3);
    fleet.fault("cut the owner's link in steady state", |f| {
        let owner = f.owner();
        f.hosts.set_link(owner, false);
        f.wait_new_owner(owner);
        f.hosts.set_link(owner, true);
        f.nodes[owner].wait_role("Standby", TAKEOVER);
    });
    fleet.fault("pause the owner past its lease", |f| {
        let owner = f.owner();
        f.nodes[owner].signal("STOP");
        f.wait_new_owner(owner);
        f.nodes[owner].signal("CONT");
        f.nodes[owner].wait_role("Standby", TAKEOVER);
    });
    fleet.fault("kill -9 the owner", |f| {
        let owner = f.owner();
        f.nodes[owner].signal("KILL");
        f.wait_new_owner(owner);
        f.restart(owner);
    });
    fleet.fault("cut the source's link once the target restored", |f| {
        let (source, mut migration) = f.migrate_and_wait("Restored", is_restored);
        f.hosts.set_link(source, false);
        f.wait_new_owner(source);
        let _ = migration.wait();
        f.hosts.set_link(source, true);
        f.nodes[source].wait_role("Standby", TAKEOVER);
    });
    fleet.fault("kill -9 the source once it stopped", |f| {
        let (source, mut migration) = f.migrate_and_wait("Stopped", |b| matches!(b, ControlBody::Stopped { .. }));
        f.nodes[source].signal("KILL");
        let _ = migration.wait();
        f.restart(source);
    });
    fleet.fault("kill -9 the target once it restored", |f| {
        let (_, mut migration) = f.migrate_and_wait("Restored", is_restored);
        let target = f.target.expect("a target");
        f.nodes[target].signal("KILL");
        let _ = migration.wait();
        f.restart(target);
    });
    fleet.fault("kill -9 the target once it took over", |f| {
        let (_, mut migration) = f.migrate_and_wait("Takeover", |b| matches!(b, ControlBody::Takeover { .. }));
        let target = f.target.expect("a target");
        f.nodes[target].signal("KILL");
        f.wait_new_owner(target);
        let _ = migration.wait();
        f.restart(target);
    });
    fleet.fault(
        "kill -9 the coordinator once it asked for the restore, then recover",
        |f| {
            let (_, mut migration) = f.migrate_and_wait("Restore", |b| matches!(b, ControlBody::Restore { .. }));
            let _ = migration.kill();
            let _ = migration.wait();
            let (ok, recovered) = cli(&f.brokers, &f.prefix, &["recover", "--timeout", "10s"]);
            assert!(ok, "ms2m recover: {recovered}");
        },
    );
    fleet.one_owner_at_the_end();
}

fn is_restored(body: &ControlBody) -> bool {
    matches!(body, ControlBody::Restored { .. })
}

/// Three nodes and tansu, each on a host of its own, under load.
struct HostsFleet {
    rt: tokio::runtime::Runtime,
    hosts: Hosts,
    _tansu: Tansu,
    brokers: String,
    deployment: Deployment,
    prefix: String,
    nodes: Vec<NodeProcess>,
    input: Vec<(i32, i64, Transaction)>,
    faults: usize,
    /// The target of the migration under way, if any.
    target: Option<usize>,
}

const IDS: [&str; 3] = ["a", "b", "c"];

impl HostsFleet {
    fn start(nodes: usize) -> Self {
        let hosts = Hosts::create(nodes);
        let tansu = Tansu::start_in(&hosts.broker_ns(), BROKER_HOST);
        let brokers = tansu.address.clone();
        let (deployment, prefix) = deployment(&Broker::External(brokers.clone()), "hosts");
        let first = spawn(IDS[0], &brokers, &prefix, Some(hosts.node(0)));
        first.wait_role("Owner", TAKEOVER);
        let mut all = vec![first];
        for i in 1..nodes {
            all.push(spawn(IDS[i], &brokers, &prefix, Some(hosts.node(i))));
            all[i].wait_role("Standby", TAKEOVER);
        }
        let nodes = all;
        Self {
            rt: runtime(),
            hosts,
            _tansu: tansu,
            brokers,
            deployment,
            prefix,
            nodes,
            input: Vec::new(),
            faults: 0,
            target: None,
        }
    }

    /// Runs `inject` under load (1,000 transactions at 500/s), then checks
    /// every output so far and that the fleet healed: one owner, the
    /// others standing by.
    fn fault(&mut self, what: &str, inject: impl FnOnce(&mut Self)) {
        eprintln!("== {what}");
        let from = self.input.len() as u64;
        let running = load(&self.rt, &self.brokers, &self.deployment, from, 1_000, 500);
        std::thread::sleep(Duration::from_millis(600));
        inject(self);
        self.target = None;
        self.input.extend(self.rt.block_on(running).expect("load"));
        self.faults += 1;
        judge(&self.rt, &self.brokers, &self.deployment, &self.input, self.faults);
        self.one_owner_at_the_end();
    }

    fn owner(&self) -> usize {
        let owner = owner(&self.brokers, &self.prefix).expect("an owner");
        self.nodes
            .iter()
            .position(|n| n.id == owner)
            .expect("the owner is a node")
    }

    /// Waits until a node other than `old` serves as the owner.
    fn wait_new_owner(&self, old: usize) {
        let deadline = std::time::Instant::now() + TAKEOVER;
        loop {
            let named = owner(&self.brokers, &self.prefix).and_then(|o| self.nodes.iter().position(|n| n.id == o));
            if let Some(i) = named.filter(|&i| i != old) {
                self.nodes[i].wait_role("Owner", TAKEOVER);
                return;
            }
            assert!(std::time::Instant::now() < deadline, "no new owner after {TAKEOVER:?}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn restart(&mut self, i: usize) {
        self.nodes[i] = spawn(IDS[i], &self.brokers, &self.prefix, Some(self.hosts.node(i)));
        self.nodes[i].wait_role("Standby", TAKEOVER);
    }

    /// Starts a migration from the owner to the next node through the CLI
    /// and waits for the record `what`; returns the source and the CLI.
    fn migrate_and_wait(&mut self, what: &str, record: impl Fn(&ControlBody) -> bool) -> (usize, std::process::Child) {
        let source = self.owner();
        let target = (source + 1) % self.nodes.len();
        self.target = Some(target);
        let mut watch = ControlWatch::start(&self.rt, &self.brokers, &self.deployment);
        let args = ["migrate", "--to", IDS[target], "--timeout", "5s"];
        let migration = cli_spawn(BINS, &self.brokers, &self.prefix, &args);
        watch.wait(what, TAKEOVER, record);
        (source, migration)
    }

    /// Exactly one node serves as the owner, the one the channel names;
    /// every other one stands by.
    fn one_owner_at_the_end(&self) {
        let owner = self.owner();
        self.nodes[owner].wait_role("Owner", TAKEOVER);
        for (i, n) in self.nodes.iter().enumerate().filter(|(i, _)| *i != owner) {
            n.wait_role("Standby", TAKEOVER);
            assert_ne!(i, owner);
        }
    }
}
