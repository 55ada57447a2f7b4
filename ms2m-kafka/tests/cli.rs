//! The `ms2m` binary end to end, on the embedded broker: this process hosts
//! the mock cluster, runs a real instance that dead-letters two bad records
//! (one cut to the size limit) and snapshots on shutdown, publishes control
//! records of one decided and one undecided migration, then runs the built
//! binary as a separate process against the mock's address and checks its
//! JSON. A migration driven through the CLI needs live node processes and
//! is not covered here.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::process::Command;
use std::time::{Duration, Instant};

use ms2m_core::{
    ApplyContext, BadMessagePolicy, ControlBody, ControlChannel, ControlMessage, Delivery, Instance, InstanceConfig,
    Role, ServiceState, StatefulService,
};
use ms2m_kafka::cli::records;
use ms2m_kafka::{KafkaCluster, KafkaConfig};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::util::Timeout;
use serde_json::Value;

const SERVICE: &str = "cli-e2e";
const INPUT: &str = "in";
const DLQ: &str = "cli-e2e.dlq";
/// Dead letters are cut above this many bytes.
const DLQ_MAX: usize = 16;
/// The undecodable record that is cut: its original stays at `in/1@0`.
const BIG_BAD: &str = "{this is not json, and it is longer than sixteen bytes}";

#[derive(Default, ServiceState)]
#[state(version = 3)]
struct Sum {
    total: u64,
}

#[async_trait::async_trait]
impl StatefulService for Sum {
    const NAME: &'static str = SERVICE;
    type Message = u64;
    type Format = ms2m_core::codec::Json;
    type Error = Infallible;

    async fn apply(&mut self, n: u64, ctx: &mut ApplyContext<'_>) -> Result<(), Infallible> {
        self.total += n;
        ctx.emit(&self.total);
        Ok(())
    }
}

/// Runs the binary with the broker and service in its environment.
fn ms2m(cluster: &KafkaCluster, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_ms2m"))
        .args(args)
        .env("MS2M_BOOTSTRAP_SERVERS", cluster.bootstrap_servers())
        .env("MS2M_SERVICE", SERVICE)
        .env_remove("MS2M_CONFIG")
        .env("RUST_LOG", "error")
        .output()
        .expect("run the ms2m binary");
    let text = |b: Vec<u8>| String::from_utf8(b).expect("UTF-8 output");
    (out.status.code().unwrap_or(-1), text(out.stdout), text(out.stderr))
}

/// Runs the binary with `--json`, expects success, parses stdout.
async fn json(cluster: &KafkaCluster, args: &[&str]) -> Value {
    let (cluster, mut args) = (cluster.clone(), args.iter().map(|a| a.to_string()).collect::<Vec<_>>());
    args.push("--json".into());
    let (code, out, err) = tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        ms2m(&cluster, &args)
    })
    .await
    .unwrap();
    assert_eq!(code, 0, "stdout: {out}\nstderr: {err}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
}

async fn produce(cluster: &KafkaCluster, topic: &str, records: &[(i32, &[u8])]) {
    let producer: FutureProducer = cluster.client_config().create().unwrap();
    for (partition, payload) in records {
        let record = FutureRecord::<[u8], [u8]>::to(topic)
            .partition(*partition)
            .key(b"k".as_slice())
            .payload(*payload);
        producer
            .send(record, Timeout::After(Duration::from_secs(10)))
            .await
            .unwrap();
    }
}

/// Waits until the service's group committed `want` on the input.
async fn committed(cluster: &KafkaCluster, want: &BTreeMap<i32, Option<i64>>) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let now = records::committed(cluster, SERVICE, INPUT, &[0, 1]).await.unwrap();
        if &now == want {
            return;
        }
        assert!(Instant::now() < deadline, "group committed {now:?}, want {want:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Runs an instance over the input until it committed all of it, then
/// shuts it down (commit, final snapshot).
async fn run_instance(cluster: &KafkaCluster) {
    let backends = cluster.backends(Delivery::AtLeastOnce).await.unwrap();
    let config = InstanceConfig::new("node-a")
        .output_topic("out")
        .bad_messages(BadMessagePolicy::DeadLetter { topic: DLQ.into() })
        .dead_letter_max_bytes(DLQ_MAX);
    let mut instance = Instance::<Sum, _, _, _>::recover(backends, config, &*ms2m_core::no_progress())
        .await
        .unwrap();
    let watcher = cluster.clone();
    let (done, stop) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        committed(&watcher, &BTreeMap::from([(0, Some(4)), (1, Some(2))])).await;
        let _ = done.send(());
    });
    instance
        .run(async {
            let _ = stop.await;
        })
        .await
        .unwrap();
    assert_eq!(instance.stats().dead_lettered, 2);
}

fn control(migration: &str, from: Role, body: ControlBody) -> ControlMessage {
    ControlMessage {
        service: SERVICE.into(),
        migration_id: migration.into(),
        from,
        sent_at_ms: 1_764_590_400_000,
        body,
    }
}

fn prepare(source: &str, target: &str) -> ControlBody {
    ControlBody::Prepare {
        source: source.into(),
        target: target.into(),
        digest_policy: Default::default(),
        strategy: None,
    }
}

/// m1 (a → b) decided by b's takeover; m2 (b → c) left after its checkpoint.
async fn publish_history(cluster: &KafkaCluster) {
    let channel = cluster.control().await.unwrap();
    let takeover = ControlBody::Takeover {
        owner: "node-b".into(),
        epoch: 1,
        position: Default::default(),
    };
    for m in [
        control("m1", Role::Coordinator, prepare("node-a", "node-b")),
        control("m1", Role::Target, takeover),
        control("m2", Role::Coordinator, prepare("node-b", "node-c")),
        control("m2", Role::Coordinator, ControlBody::Checkpoint),
    ] {
        channel.publish(&m).await.unwrap();
    }
}

async fn setup() -> KafkaCluster {
    let cluster = KafkaCluster::embedded(KafkaConfig::new(SERVICE).input_topic(INPUT)).unwrap();
    cluster.create_topic(INPUT, 2, &[]).await.unwrap();
    cluster.create_topic(DLQ, 1, &[]).await.unwrap();
    cluster.create_topic("out", 1, &[]).await.unwrap();
    let input: [(i32, &[u8]); 6] = [
        (0, b"1"),
        (0, b"2"),
        (0, b"not json"),
        (0, b"3"),
        (1, BIG_BAD.as_bytes()),
        (1, b"5"),
    ];
    produce(&cluster, INPUT, &input).await;
    run_instance(&cluster).await;
    publish_history(&cluster).await;
    // Three records the service has not seen: lag 3 on in/0.
    produce(&cluster, INPUT, &[(0, b"7"), (0, b"8"), (0, b"9")]).await;
    cluster
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_reports_and_acts_on_a_service() {
    let cluster = setup().await;
    status_shows_owner_undecided_snapshots_and_lag(&cluster).await;
    snapshots_are_listed_inspected_and_verified(&cluster).await;
    dead_letters_are_listed_and_replayed_whole(&cluster).await;
    recover_decides_the_open_migration(&cluster).await;
    a_migration_without_running_instances_times_out_and_rolls_back(&cluster).await;
    failures_exit_non_zero_and_name_the_fix(&cluster).await;
}

async fn status_shows_owner_undecided_snapshots_and_lag(cluster: &KafkaCluster) {
    let s = json(cluster, &["status"]).await;
    assert_eq!(s["service"], SERVICE);
    assert_eq!(
        s["control"]["owner"],
        serde_json::json!({"instance_id": "node-b", "epoch": 1})
    );
    let undecided = s["control"]["undecided"].as_array().unwrap();
    assert_eq!(undecided.len(), 1, "{s:#}");
    assert_eq!(
        (
            &undecided[0]["migration_id"],
            &undecided[0]["target"],
            &undecided[0]["last_record"]
        ),
        (&Value::from("m2"), &Value::from("node-c"), &Value::from("Checkpoint"))
    );
    let latest = &s["snapshots"]["latest"][0]["header"];
    assert_eq!(
        (&latest["instance_id"], &latest["schema_version"]),
        (&Value::from("node-a"), &Value::from(3))
    );
    // The input topics come from the snapshot's position (none were named).
    let lag: Vec<(i64, i64, i64)> = s["lag"]["partitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["partition"].as_i64().unwrap(),
                p["committed"].as_i64().unwrap(),
                p["lag"].as_i64().unwrap(),
            )
        })
        .collect();
    assert_eq!(lag, [(0, 4, 3), (1, 2, 0)], "{s:#}");
}

async fn snapshots_are_listed_inspected_and_verified(cluster: &KafkaCluster) {
    let list = json(cluster, &["snapshots", "list"]).await;
    let newest = list[0]["id"].as_u64().unwrap();
    let position = &list[0]["header"]["position"];
    assert_eq!(
        position,
        &serde_json::json!([
            {"topic": INPUT, "partition": 0, "offset": 4},
            {"topic": INPUT, "partition": 1, "offset": 2}
        ])
    );
    let inspected = json(cluster, &["snapshots", "inspect", &newest.to_string()]).await;
    assert_eq!(inspected["manifest"]["id"], newest);
    assert_eq!(inspected["snapshot"]["header"]["service"], SERVICE);
    let verified = json(cluster, &["snapshots", "verify"]).await;
    let all = verified.as_array().unwrap();
    assert!(!all.is_empty() && all.iter().all(|v| v["ok"] == true), "{verified:#}");

    // A manifest whose chunks do not verify: `verify` reports it and exits 1.
    let store = cluster.snapshot_store().await.unwrap();
    let mut forged = store.manifest(newest).await.unwrap();
    forged.id = newest + 1;
    let key = format!("{SERVICE}/{}/m", forged.id);
    let payload = serde_json::to_vec(&forged).unwrap();
    let producer: FutureProducer = cluster.client_config().create().unwrap();
    let record = FutureRecord::to(store.topic()).partition(0).key(&key).payload(&payload);
    producer
        .send(record, Timeout::After(Duration::from_secs(10)))
        .await
        .unwrap();
    let (code, out, err) = ms2m(cluster, &["snapshots", "verify", "--json"]);
    assert_eq!(code, 1, "stdout: {out}\nstderr: {err}");
    assert!(err.contains("1 of") && err.contains("failed verification"), "{err}");
    let reported: Value = serde_json::from_str(&out).expect("one JSON document");
    let bad: Vec<&Value> = reported
        .as_array()
        .unwrap()
        .iter()
        .filter(|v| v["ok"] == false)
        .collect();
    assert_eq!(
        (bad.len(), bad[0]["id"].as_u64()),
        (1, Some(newest + 1)),
        "{reported:#}"
    );
}

async fn dead_letters_are_listed_and_replayed_whole(cluster: &KafkaCluster) {
    let list = json(cluster, &["dead-letters", "list", "--topic", DLQ]).await;
    let list = list.as_array().unwrap();
    assert_eq!(list.len(), 2, "{list:?}");
    let by_source = |p: i64| list.iter().find(|d| d["source"]["partition"] == p).unwrap();
    let (small, big) = (by_source(0), by_source(1));
    assert_eq!(
        (&small["source"]["offset"], &small["truncated"], &small["stage"]),
        (&Value::from(2), &Value::from(false), &Value::from("decode"))
    );
    assert_eq!(
        (&big["truncated"], big["payload_bytes"].as_u64()),
        (&Value::from(true), Some(DLQ_MAX as u64))
    );
    assert_eq!(big["original_bytes"].as_u64(), Some(BIG_BAD.len() as u64));

    let at = format!("{}:{}", big["partition"], big["offset"]);
    let small_at = format!("{}:{}", small["partition"], small["offset"]);
    let replayed = json(
        cluster,
        &[
            "dead-letters",
            "replay",
            "--topic",
            DLQ,
            "--offset",
            &at,
            "--offset",
            &small_at,
        ],
    )
    .await;
    let replayed = replayed.as_array().unwrap();
    assert_eq!(replayed.len(), 2);
    assert_eq!(replayed[0]["from_original"], true);
    for (r, want) in replayed.iter().zip([BIG_BAD.as_bytes(), b"not json".as_slice()]) {
        let to = &r["produced"];
        assert_eq!(to["topic"], INPUT);
        let (p, o) = (to["partition"].as_i64().unwrap() as i32, to["offset"].as_i64().unwrap());
        let copy = records::read_one(cluster, INPUT, p, o)
            .await
            .unwrap()
            .expect("the replayed record");
        assert_eq!(copy.payload.as_deref(), Some(want), "the whole original payload");
        assert_eq!(copy.key.as_deref(), Some(b"k".as_slice()));
        assert!(
            copy.headers.iter().all(|(k, _)| !k.starts_with("ms2m.")),
            "{:?}",
            copy.headers
        );
    }
}

async fn recover_decides_the_open_migration(cluster: &KafkaCluster) {
    let recovered = json(cluster, &["recover", "--timeout", "10s"]).await;
    assert_eq!(
        recovered,
        serde_json::json!([{
            "migration_id": "m2", "source": "node-b", "target": "node-c", "decided": "Aborted", "error": null
        }])
    );
    let s = json(cluster, &["status"]).await;
    assert_eq!(s["control"]["undecided"], serde_json::json!([]));
    assert_eq!(
        s["control"]["owner"]["instance_id"], "node-b",
        "an abort before the stop keeps the owner"
    );
}

/// The CLI coordinates; with no source process to answer, the checkpoint
/// times out and the migration is abandoned (decided, not left open).
async fn a_migration_without_running_instances_times_out_and_rolls_back(cluster: &KafkaCluster) {
    let args = ["migrate", "--to", "node-c", "--id", "m3", "--timeout", "1s", "--json"];
    let (code, out, err) = ms2m(cluster, &args);
    assert_eq!(code, 1, "stdout: {out}\nstderr: {err}");
    assert!(err.contains("timed out waiting for"), "{err}");
    let error: Value = serde_json::from_str(&out).expect("one JSON document");
    assert_eq!(error["exit_code"], 1);
    let history = cluster.control().await.unwrap().history().await.unwrap();
    let prepared = history
        .iter()
        .find(|m| m.migration_id == "m3")
        .expect("the CLI published m3");
    let from_owner = ControlBody::Prepare {
        source: "node-b".into(),
        target: "node-c".into(),
        digest_policy: Default::default(),
        strategy: Some(ms2m_core::migration::Strategy::Ms2m),
    };
    assert_eq!(prepared.body, from_owner, "--from defaults to the recorded owner");
    let s = json(cluster, &["status"]).await;
    assert_eq!(s["control"]["undecided"], serde_json::json!([]), "{s:#}");
}

async fn failures_exit_non_zero_and_name_the_fix(cluster: &KafkaCluster) {
    let (code, _, err) = ms2m(cluster, &["snapshots", "list", "--snapshot-topic", "no-such-topic"]);
    assert_eq!(code, 1);
    assert!(
        err.contains("`no-such-topic` does not exist") && err.contains("--snapshot-topic"),
        "{err}"
    );

    // The service from a --config file (none in the environment): flags and
    // environment unset, the file's settings apply; without it, exit 2.
    let file = tempfile::NamedTempFile::new().unwrap();
    let text = format!(
        "# ms2m CLI\nbootstrap.servers={}\nms2m.service={SERVICE}\n",
        cluster.bootstrap_servers()
    );
    std::fs::write(file.path(), text).unwrap();
    let run = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_ms2m"))
            .args(args)
            .env_remove("MS2M_BOOTSTRAP_SERVERS")
            .env_remove("MS2M_SERVICE")
            .env_remove("MS2M_CONFIG")
            .output()
            .unwrap()
    };
    let out = run(&["--config", file.path().to_str().unwrap(), "snapshots", "list", "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let listed: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(!listed.as_array().unwrap().is_empty());
    let out = run(&["status"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no service given"));
}
