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

use ms2m_examples::fleet::{produce_load, verify, Deployment, Verdict};
use ms2m_examples::ledger::Transaction;
use ms2m_tests::processes::{Binaries, Hosts, NodeProcess, Tansu, BROKER_HOST, TEST_LEASE};

const BINS: Binaries = Binaries {
    node: env!("CARGO_BIN_EXE_fleet_node"),
    cli: env!("CARGO_BIN_EXE_ms2m_cli"),
};

fn spawn(id: &str, brokers: &str, prefix: &str, netns: Option<&str>) -> NodeProcess {
    NodeProcess::spawn(BINS, id, brokers, prefix, TEST_LEASE, netns)
}

fn cli(brokers: &str, prefix: &str, args: &[&str]) -> (bool, serde_json::Value) {
    ms2m_tests::processes::cli(BINS, brokers, prefix, args)
}

/// The at-least-once window: outputs a dead or fenced owner sent after its
/// last commit (it commits every 50 messages or 20 ms), emitted again by
/// the next owner. Per fault, generously.
const DUPLICATES_PER_FAULT: usize = 200;

/// Enough time for a takeover: the lease timeout, a claim, a recovery.
const TAKEOVER: Duration = Duration::from_secs(30);

/// The broker the scenario runs on, kept alive for it.
enum Broker {
    Embedded(ms2m_kafka::EmbeddedBroker),
    External(String),
}

impl Broker {
    fn start() -> Self {
        match ms2m_tests::brokers() {
            Some(address) => Broker::External(address),
            None => Broker::Embedded(ms2m_kafka::EmbeddedBroker::start(1).expect("embedded broker")),
        }
    }

    /// Creates the deployment's topics where nodes cannot: the embedded
    /// broker answers no CreateTopics from other processes.
    fn prepare(&self, prefix: &str) {
        if let Broker::Embedded(b) = self {
            for (what, partitions) in [("tx", 4), ("balances", 4), ("control", 1), ("snapshots", 8)] {
                b.create_topic(&format!("{prefix}ledger.{what}"), partitions)
                    .expect("create a topic");
            }
        }
    }

    fn address(&self) -> String {
        match self {
            Broker::Embedded(b) => b.bootstrap_servers().to_string(),
            Broker::External(a) => a.clone(),
        }
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

/// Produces `n` transactions from `from` at `per_sec` in the background.
fn load(
    rt: &tokio::runtime::Runtime,
    brokers: &str,
    deployment: &Deployment,
    from: u64,
    n: u64,
    per_sec: u64,
) -> tokio::task::JoinHandle<Vec<(i32, i64, Transaction)>> {
    let (brokers, deployment) = (brokers.to_string(), deployment.clone());
    rt.spawn(async move {
        let cluster = deployment.cluster(&brokers).await.expect("cluster");
        produce_load(&cluster, &deployment, from, n, per_sec)
            .await
            .expect("produce the load")
    })
}

fn judge(
    rt: &tokio::runtime::Runtime,
    brokers: &str,
    deployment: &Deployment,
    input: &[(i32, i64, Transaction)],
    faults: usize,
) -> Verdict {
    let verdict = rt.block_on(verify(brokers, deployment, input)).expect("verify");
    eprintln!("verdict after {faults} fault(s): {verdict:?}");
    assert_eq!((verdict.lost, verdict.wrong), (0, 0), "{verdict:?}");
    assert!(
        verdict.duplicated <= faults * DUPLICATES_PER_FAULT,
        "duplicates beyond the at-least-once window: {verdict:?}"
    );
    verdict
}

/// The owner the control channel names, through the CLI.
fn owner(brokers: &str, prefix: &str) -> Option<String> {
    let (ok, status) = cli(brokers, prefix, &["status"]);
    assert!(ok, "ms2m status failed: {status}");
    status["control"]["owner"]["instance_id"].as_str().map(str::to_string)
}

fn deployment(broker: &Broker, test: &str) -> (Deployment, String) {
    let prefix = ms2m_tests::unique(test) + ".";
    broker.prepare(&prefix);
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
/// its own: a link cut of the owner's host, in steady state and during a
/// migration, a pause past the lease, and kill -9 of the owner, of a
/// migration's source, target and coordinator.
#[test]
#[ignore = "needs root (network namespaces) and tansu; tests/run.sh runs it when root"]
fn hosts_survive_link_cuts_pauses_and_kills() {
    assert!(Hosts::available(), "run as root with iproute2 (ip netns)");
    let hosts = Hosts::create(3);
    let tansu = Tansu::start_in(&hosts.broker_ns(), BROKER_HOST);
    let brokers = tansu.address.clone();
    let rt = runtime();
    let (deployment, prefix) = deployment(&Broker::External(brokers.clone()), "hosts");
    let node = |i: usize| spawn(["a", "b", "c"][i], &brokers, &prefix, Some(hosts.node(i)));
    let mut nodes: Vec<NodeProcess> = (0..3).map(node).collect();
    nodes[0].wait_role("Owner", TAKEOVER);
    for n in &nodes[1..] {
        n.wait_role("Standby", TAKEOVER);
    }
    let mut input = Vec::new();
    let mut faults = 0;
    let mut next = 0u64;
    let mut step = |what: &str, fault: &mut dyn FnMut(&mut Vec<NodeProcess>)| {
        eprintln!("== {what}");
        let running = load(&rt, &brokers, &deployment, next, 1_000, 500);
        next += 1_000;
        std::thread::sleep(Duration::from_millis(600));
        fault(&mut nodes);
        input.extend(rt.block_on(running).expect("load"));
        faults += 1;
        judge(&rt, &brokers, &deployment, &input, faults);
    };
    step("cut the owner's link in steady state", &mut |nodes| {
        let owner = owner_index(&brokers, &prefix, nodes);
        hosts.set_link(owner, false);
        wait_new_owner(&brokers, &prefix, nodes, owner);
        hosts.set_link(owner, true);
        nodes[owner].wait_role("Standby", TAKEOVER);
    });
    step("pause the owner past its lease", &mut |nodes| {
        let owner = owner_index(&brokers, &prefix, nodes);
        nodes[owner].signal("STOP");
        wait_new_owner(&brokers, &prefix, nodes, owner);
        nodes[owner].signal("CONT");
        nodes[owner].wait_role("Standby", TAKEOVER);
    });
    step("kill -9 the owner", &mut |nodes| {
        let owner = owner_index(&brokers, &prefix, nodes);
        nodes[owner].signal("KILL");
        wait_new_owner(&brokers, &prefix, nodes, owner);
        let id = nodes[owner].id.clone();
        nodes[owner] = spawn(&id, &brokers, &prefix, Some(hosts.node(owner)));
        nodes[owner].wait_role("Standby", TAKEOVER);
    });
    drop(tansu);
}

/// The index of the node the channel names the owner.
fn owner_index(brokers: &str, prefix: &str, nodes: &[NodeProcess]) -> usize {
    let owner = owner(brokers, prefix).expect("an owner");
    nodes
        .iter()
        .position(|n| n.id == owner)
        .expect("the owner is one of the nodes")
}

/// Waits until another node than `old` reports itself the owner.
fn wait_new_owner(brokers: &str, prefix: &str, nodes: &[NodeProcess], old: usize) {
    let deadline = std::time::Instant::now() + TAKEOVER;
    loop {
        let owner = owner(brokers, prefix);
        if let Some(i) = owner
            .and_then(|o| nodes.iter().position(|n| n.id == o))
            .filter(|&i| i != old)
        {
            nodes[i].wait_role("Owner", TAKEOVER);
            return;
        }
        assert!(std::time::Instant::now() < deadline, "no new owner after {TAKEOVER:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}
