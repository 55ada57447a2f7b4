//! Nodes as OS processes, on loopback or on separate network hosts: the
//! harness of the fleet process tests (`tests/tests/fleet_processes.rs`).
//!
//! * [`NodeProcess`] runs the `fleet_node` binary (the ledger node of
//!   `cargo run --example ledger_node`), follows the JSON status lines it
//!   prints, and sends it signals: `KILL` (a crash), `STOP`/`CONT` (a
//!   pause), `TERM` (a shutdown).
//! * [`Hosts`] (root only) builds network namespaces joined by a bridge:
//!   one for the broker, one per node, one link for the test process; a
//!   host's link can be cut ([`Hosts::set_link`]) and restored.
//! * [`Tansu`] starts tansu inside the broker's namespace.
//! * [`cli`] runs the `ms2m` operator CLI as a process.
//!
//! Everything a test starts is stopped when its handle drops, also on a
//! failed assertion.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ms2m_examples::fleet::{produce_load, verify, Deployment, Verdict};
use ms2m_examples::ledger::Transaction;

/// The lease settings the process tests use: short, so failovers take
/// about two seconds.
#[derive(Clone, Copy, Debug)]
pub struct Lease {
    /// Renewal interval, ms.
    pub interval_ms: u64,
    /// Expiry, ms.
    pub timeout_ms: u64,
    /// The margin for one step, ms.
    pub margin_ms: u64,
}

/// The lease of the process tests.
pub const TEST_LEASE: Lease = Lease {
    interval_ms: 200,
    timeout_ms: 1_500,
    margin_ms: 250,
};

/// The binaries the process tests run: integration tests name them with
/// `env!("CARGO_BIN_EXE_…")`, which only they can read.
#[derive(Clone, Copy, Debug)]
pub struct Binaries {
    /// `fleet_node`: the ledger node.
    pub node: &'static str,
    /// `ms2m`: the operator CLI.
    pub cli: &'static str,
    /// `fleet_host`: the ledger host of a partitioned fleet.
    pub host: &'static str,
}

/// A node running as its own process.
#[derive(Debug)]
pub struct NodeProcess {
    /// Its instance id.
    pub id: String,
    child: Child,
    log: PathBuf,
    statuses: Arc<Mutex<Vec<serde_json::Value>>>,
}

impl NodeProcess {
    /// Starts node `id` of the deployment `prefix` at `brokers`, inside
    /// network namespace `netns` if given.
    pub fn spawn(bins: Binaries, id: &str, brokers: &str, prefix: &str, lease: Lease, netns: Option<&str>) -> Self {
        Self::start(bins.node, &[], id, brokers, prefix, lease, netns)
    }

    /// Starts host `id` of the partitioned deployment `prefix` (the
    /// `fleet_host` binary, `args` its own flags: `--partitions N`, ...).
    pub fn spawn_host(bins: Binaries, id: &str, brokers: &str, prefix: &str, lease: Lease, args: &[String]) -> Self {
        Self::start(bins.host, args, id, brokers, prefix, lease, None)
    }

    fn start(
        node: &str,
        extra: &[String],
        id: &str,
        brokers: &str,
        prefix: &str,
        lease: Lease,
        netns: Option<&str>,
    ) -> Self {
        let mut command = match netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, node]);
                c
            }
            None => Command::new(node),
        };
        command
            .args(["--instance", id, "--brokers", brokers, "--prefix", prefix])
            .args(["--lease-interval-ms", &lease.interval_ms.to_string()])
            .args(["--lease-timeout-ms", &lease.timeout_ms.to_string()])
            .args(["--lease-margin-ms", &lease.margin_ms.to_string()])
            .args(extra)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "warn,ms2m_core=info".into()),
            )
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log_file(&format!("{prefix}{id}"))));
        let log = log_path(&format!("{prefix}{id}"));
        let mut child = command.spawn().expect("start fleet_node");
        let statuses = Arc::new(Mutex::new(Vec::new()));
        let stdout = child.stdout.take().expect("piped stdout");
        let sink = Arc::clone(&statuses);
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) {
                    sink.lock().unwrap_or_else(|p| p.into_inner()).push(v);
                }
            }
        });
        Self {
            id: id.to_string(),
            child,
            log,
            statuses,
        }
    }

    /// The role of the latest status line ("Owner", "Standby", ...).
    pub fn role(&self) -> Option<String> {
        let statuses = self.statuses.lock().unwrap_or_else(|p| p.into_inner());
        statuses.last().and_then(|s| s["role"].as_str()).map(str::to_string)
    }

    /// A host's tasks and their roles, from its latest status line
    /// (`{"host":..,"tasks":{task: role}}`).
    pub fn tasks(&self) -> std::collections::BTreeMap<String, String> {
        let statuses = self.statuses.lock().unwrap_or_else(|p| p.into_inner());
        let Some(tasks) = statuses.last().and_then(|s| s["tasks"].as_object()) else {
            return Default::default();
        };
        tasks
            .iter()
            .filter_map(|(t, r)| Some((t.clone(), r.as_str()?.to_string())))
            .collect()
    }

    /// The tasks a host reports owning.
    pub fn owned(&self) -> std::collections::BTreeSet<String> {
        self.tasks()
            .into_iter()
            .filter(|(_, role)| role == "Owner")
            .map(|(t, _)| t)
            .collect()
    }

    /// Every role the node reported, in order, without repeats.
    pub fn roles(&self) -> Vec<String> {
        let statuses = self.statuses.lock().unwrap_or_else(|p| p.into_inner());
        let mut roles: Vec<String> = Vec::new();
        for role in statuses.iter().filter_map(|s| s["role"].as_str()) {
            if roles.last().is_none_or(|r| r != role) {
                roles.push(role.to_string());
            }
        }
        roles
    }

    /// Waits until the node reports `role`; panics after `within`.
    pub fn wait_role(&self, role: &str, within: Duration) {
        let deadline = Instant::now() + within;
        while self.role().as_deref() != Some(role) {
            assert!(
                Instant::now() < deadline,
                "node {} did not become {role} within {within:?} (roles so far: {:?}; log: {})",
                self.id,
                self.roles(),
                self.log.display()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends `signal` (`KILL`, `STOP`, `CONT`, `TERM`).
    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args(["-s", signal, &self.child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -s {signal} {}", self.child.id());
    }

    /// Stops the node with SIGTERM and waits for it; whether it exited 0.
    pub fn terminate(mut self) -> bool {
        self.signal("TERM");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return status.success();
            }
            if Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits up to `within` for the process to exit on its own; its exit
    /// status, or `None` if it still runs.
    pub fn wait_exit(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return Some(status);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().expect("wait").is_none()
    }
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn log_path(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("ms2m-fleet-{name}.log"))
}

fn log_file(name: &str) -> std::fs::File {
    std::fs::File::create(log_path(name)).expect("create a node log")
}

/// Runs the `ms2m` CLI with `args` (plus `--json`); its exit status and
/// stdout parsed as JSON (`Null` if it printed none).
pub fn cli(bins: Binaries, brokers: &str, prefix: &str, args: &[&str]) -> (bool, serde_json::Value) {
    let name = |what: &str| format!("{prefix}ledger.{what}");
    let output = Command::new(bins.cli)
        .args(["--bootstrap-servers", brokers, "--service", "ledger", "--json"])
        .args([
            "--control-topic",
            &name("control"),
            "--snapshot-topic",
            &name("snapshots"),
        ])
        .args(["--input-topic", &name("tx"), "--group-id", &name("group")])
        .args(args)
        .stderr(Stdio::inherit())
        .output()
        .expect("run ms2m");
    let json = serde_json::from_slice(&output.stdout).unwrap_or(serde_json::Value::Null);
    (output.status.success(), json)
}

/// Network namespaces acting as hosts: `{tag}-b` for the broker (with the
/// bridge, 10.77.0.1), one per node (10.77.0.10 + i), and a link from the
/// test's own namespace (10.77.0.2). Root only; removed on drop.
#[derive(Debug)]
pub struct Hosts {
    tag: String,
    nodes: Vec<String>,
}

/// The broker host's address.
pub const BROKER_HOST: &str = "10.77.0.1";

impl Hosts {
    /// Whether this process may create namespaces (root with `ip`).
    pub fn available() -> bool {
        let root = Command::new("id")
            .arg("-u")
            .output()
            .is_ok_and(|o| o.stdout.starts_with(b"0"));
        root && Command::new("ip").arg("-V").output().is_ok()
    }

    /// Creates the broker host and `nodes` node hosts.
    pub fn create(nodes: usize) -> Self {
        let tag = format!("ms2m{}", std::process::id() % 10_000);
        let hosts = Self {
            nodes: (0..nodes).map(|i| format!("{tag}-n{i}")).collect(),
            tag,
        };
        hosts.build();
        hosts
    }

    fn broker(&self) -> String {
        format!("{}-b", self.tag)
    }

    fn build(&self) {
        let b = self.broker();
        ip(&["netns", "add", &b]);
        ip(&["-n", &b, "link", "set", "lo", "up"]);
        ip(&["-n", &b, "link", "add", "br0", "type", "bridge"]);
        ip(&["-n", &b, "addr", "add", &format!("{BROKER_HOST}/24"), "dev", "br0"]);
        ip(&["-n", &b, "link", "set", "br0", "up"]);
        // The test's own link (load generator, verifier, CLI).
        let (outer, inner) = (format!("{}-t", self.tag), format!("{}-tb", self.tag));
        ip(&["link", "add", &outer, "type", "veth", "peer", "name", &inner]);
        ip(&["link", "set", &inner, "netns", &b]);
        ip(&["-n", &b, "link", "set", &inner, "master", "br0", "up"]);
        ip(&["addr", "add", "10.77.0.2/24", "dev", &outer]);
        ip(&["link", "set", &outer, "up"]);
        for (i, ns) in self.nodes.iter().enumerate() {
            let (host_end, bridge_end) = (format!("{}-v{i}", self.tag), self.bridge_end(i));
            ip(&["netns", "add", ns]);
            ip(&["-n", ns, "link", "set", "lo", "up"]);
            ip(&["link", "add", &host_end, "type", "veth", "peer", "name", &bridge_end]);
            ip(&["link", "set", &host_end, "netns", ns]);
            ip(&["link", "set", &bridge_end, "netns", &b]);
            ip(&["-n", &b, "link", "set", &bridge_end, "master", "br0", "up"]);
            ip(&[
                "-n",
                ns,
                "addr",
                "add",
                &format!("10.77.0.{}/24", 10 + i),
                "dev",
                &host_end,
            ]);
            ip(&["-n", ns, "link", "set", &host_end, "up"]);
        }
    }

    fn bridge_end(&self, i: usize) -> String {
        format!("{}-w{i}", self.tag)
    }

    /// The namespace of node host `i`.
    pub fn node(&self, i: usize) -> &str {
        &self.nodes[i]
    }

    /// The broker's namespace.
    pub fn broker_ns(&self) -> String {
        self.broker()
    }

    /// Cuts (`up = false`) or restores node host `i`'s link.
    pub fn set_link(&self, i: usize, up: bool) {
        let state = if up { "up" } else { "down" };
        ip(&["-n", &self.broker(), "link", "set", &self.bridge_end(i), state]);
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        for ns in self.nodes.iter().chain(std::iter::once(&self.broker())) {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
        let _ = Command::new("ip")
            .args(["link", "del", &format!("{}-t", self.tag)])
            .status();
    }
}

fn ip(args: &[&str]) {
    let status = Command::new("ip").args(args).status().expect("run ip");
    assert!(status.success(), "ip {}", args.join(" "));
}

/// tansu running in a namespace (a host of its own).
#[derive(Debug)]
pub struct Tansu {
    child: Child,
    /// `host:port` to connect to.
    pub address: String,
    _dir: tempfile::TempDir,
}

impl Tansu {
    /// The tansu binary `tests/broker.sh install` put in place.
    pub fn binary() -> Option<PathBuf> {
        let home = std::env::var("CARGO_HOME")
            .map(PathBuf::from)
            .unwrap_or_else(|_| PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(".cargo"));
        let candidate = home.join("bin").join("tansu");
        candidate.exists().then_some(candidate)
    }

    /// Starts tansu in namespace `ns`, listening on `host:9092`; waits
    /// until it accepts connections.
    pub fn start_in(ns: &str, host: &str) -> Self {
        let bin = Self::binary().expect("tansu is installed (tests/broker.sh install)");
        let dir = tempfile::tempdir().expect("temp dir");
        let address = format!("{host}:9092");
        let url = format!("tcp://{address}");
        let child = Command::new("ip")
            .args(["netns", "exec", ns])
            .arg(bin)
            .args(["broker", "--listener-url", &url, "--advertised-listener-url", &url])
            .args(["--storage-engine", "sqlite://tansu.db"])
            .current_dir(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log_file("tansu")))
            .spawn()
            .expect("start tansu");
        let tansu = Self {
            child,
            address,
            _dir: dir,
        };
        tansu.wait_listening();
        tansu
    }

    fn wait_listening(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        let addr: std::net::SocketAddr = self.address.parse().expect("address");
        while std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
            assert!(Instant::now() < deadline, "tansu did not listen on {}", self.address);
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Tansu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts the `ms2m` CLI with `args` and returns it running (a coordinator
/// to kill mid-migration, or to wait for).
pub fn cli_spawn(bins: Binaries, brokers: &str, prefix: &str, args: &[&str]) -> Child {
    let name = |what: &str| format!("{prefix}ledger.{what}");
    Command::new(bins.cli)
        .args(["--bootstrap-servers", brokers, "--service", "ledger", "--json"])
        .args([
            "--control-topic",
            &name("control"),
            "--snapshot-topic",
            &name("snapshots"),
        ])
        .args(["--input-topic", &name("tx"), "--group-id", &name("group")])
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::from(log_file(&format!("{prefix}cli"))))
        .spawn()
        .expect("start ms2m")
}

/// Every control record of a deployment from now on, read by the test's
/// own Kafka consumer: how a scenario injects a fault at a given phase of
/// a migration.
#[derive(Debug)]
pub struct ControlWatch {
    records: tokio::sync::mpsc::UnboundedReceiver<ms2m_core::ControlMessage>,
    task: tokio::task::JoinHandle<()>,
}

impl ControlWatch {
    /// Subscribes to the control topic of `deployment` at `brokers`.
    pub fn start(rt: &tokio::runtime::Runtime, brokers: &str, deployment: &ms2m_examples::fleet::Deployment) -> Self {
        use ms2m_core::{ControlChannel, ControlReader};
        let cluster = ms2m_kafka::KafkaCluster::connect(deployment.kafka_config(brokers)).expect("cluster");
        let mut reader = rt.block_on(async {
            let control = cluster.control().await.expect("control channel");
            control.reader(false).await.expect("control reader")
        });
        let (tx, records) = tokio::sync::mpsc::unbounded_channel();
        let task = rt.spawn(async move {
            while let Ok(next) = reader.next(Duration::from_millis(100)).await {
                if let Some(m) = next {
                    if tx.send(m).is_err() {
                        return;
                    }
                }
            }
        });
        Self { records, task }
    }

    /// Waits (blocking, up to `within`) for a record whose body satisfies `f`.
    pub fn wait(&mut self, what: &str, within: Duration, f: impl Fn(&ms2m_core::ControlBody) -> bool) {
        let deadline = Instant::now() + within;
        loop {
            match self.records.try_recv() {
                Ok(m) if f(&m.body) => return,
                Ok(_) => continue,
                Err(tokio::sync::mpsc::error::TryRecvError::Empty) => {
                    assert!(
                        Instant::now() < deadline,
                        "no {what} on the control channel within {within:?}"
                    );
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(e) => panic!("control watch ended: {e}"),
            }
        }
    }
}

impl Drop for ControlWatch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The at-least-once window: outputs a dead or fenced owner sent after its
/// last finished commit, emitted again by the next owner. It commits every
/// 50 messages or 20 ms, and one commit may still be waiting for
/// acknowledgements in the background when the fault hits, so two commits'
/// worth (see `OutputSink::commit_in_background`). Per fault (per task that
/// failed over), generously.
pub const DUPLICATES_PER_FAULT: usize = 400;

/// The broker a process scenario runs on, kept alive for it: the embedded
/// one (hosted by the test process) or `MS2M_TEST_BROKERS`.
pub enum Broker {
    /// Hosted by this process.
    Embedded(ms2m_kafka::EmbeddedBroker),
    /// A running broker's address.
    External(String),
}

impl Broker {
    /// `MS2M_TEST_BROKERS` if set, else an embedded broker.
    pub fn start() -> Self {
        match crate::brokers() {
            Some(address) => Broker::External(address),
            None => Broker::Embedded(ms2m_kafka::EmbeddedBroker::start(1).expect("embedded broker")),
        }
    }

    /// Creates the deployment's topics (input and output over `partitions`)
    /// where nodes cannot: the embedded broker answers no CreateTopics from
    /// other processes.
    pub fn prepare(&self, prefix: &str, partitions: i32) {
        if let Broker::Embedded(b) = self {
            let topics = [
                ("tx", partitions),
                ("balances", partitions),
                ("control", 1),
                ("snapshots", 8),
            ];
            for (what, partitions) in topics {
                b.create_topic(&format!("{prefix}ledger.{what}"), partitions)
                    .expect("create a topic");
            }
        }
    }

    /// Its bootstrap address.
    pub fn address(&self) -> String {
        match self {
            Broker::Embedded(b) => b.bootstrap_servers().to_string(),
            Broker::External(a) => a.clone(),
        }
    }
}

/// The test's own runtime (load generator, verifier).
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

/// Produces `n` transactions from `from` at `per_sec` in the background.
pub fn load(
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

/// The independent verifier's verdict on every output for `input`:
/// asserts 0 lost, 0 wrong, and duplicates within `faults` windows.
pub fn judge(
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
