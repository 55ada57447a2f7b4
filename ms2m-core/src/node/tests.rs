//! Nodes over the in-memory backends: the first claim, failover after a
//! crash or a partition, and migrations back and forth between nodes.

use std::sync::Arc;
use std::time::Duration;

use super::*;
use crate::memory::{MemoryControl, MemoryLogReader, MemorySink, MemorySnapshotStore, PublishFault};
use crate::migration::{
    Coordinator, CutoverRule, DigestPolicy, MigrationConfig, MigrationError, MigrationPlan, Strategy,
};
use crate::testkit::*;

const OUT: &str = "balances.out";

type TestNode = Node<
    Balances,
    MemoryLogReader,
    MemorySnapshotStore,
    MemorySink,
    MemoryControl,
    Box<
        dyn Fn() -> futures::future::BoxFuture<
                'static,
                Result<Backends<MemoryLogReader, MemorySnapshotStore, MemorySink>>,
            > + Send
            + Sync,
    >,
>;

fn options() -> NodeOptions {
    NodeOptions {
        lease: LeaseConfig {
            interval: Duration::from_millis(40),
            timeout: Duration::from_millis(400),
            max_drift_ppm: 10_000,
            margin: Duration::from_millis(50),
        },
        ..NodeOptions::default()
    }
}

struct Running {
    status: tokio::sync::watch::Receiver<NodeStatus>,
    task: tokio::task::JoinHandle<Result<()>>,
    stop: tokio::sync::oneshot::Sender<()>,
}

fn start(cluster: &MemoryCluster, id: &str) -> Running {
    start_with(cluster, id, |config| config)
}

/// [`start`], with `tweak` applied to the node's instance settings.
fn start_with(cluster: &MemoryCluster, id: &str, tweak: impl FnOnce(InstanceConfig) -> InstanceConfig) -> Running {
    let c = cluster.clone();
    let factory: Box<dyn Fn() -> futures::future::BoxFuture<'static, Result<_>> + Send + Sync> = Box::new(move || {
        let c = c.clone();
        Box::pin(async move { Ok(c.backends()) })
    });
    let config = InstanceConfig::new(id)
        .snapshot_every(Some(300))
        .commit_every(20, Duration::from_millis(5))
        .poll(64, Duration::from_millis(5))
        .output_topic(OUT);
    let node: TestNode =
        Node::new(factory, Arc::clone(&cluster.control), tweak(config), options()).expect("valid options");
    let status = node.status();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(node.run(async move {
        let _ = stopped.await;
    }));
    Running { status, task, stop }
}

/// Waits (up to 20 s) until `f` holds for the node's status.
async fn until(node: &mut Running, what: &str, f: impl Fn(&NodeStatus) -> bool) {
    tokio::time::timeout(Duration::from_secs(20), node.status.wait_for(|s| f(s)))
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
        .expect("node status");
}

/// Waits until every produced deposit's output is committed.
async fn all_outputs(cluster: &MemoryCluster) {
    let n = cluster.produced().len();
    tokio::time::timeout(Duration::from_secs(20), async {
        while cluster.balance_outputs(OUT).len() < n {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("timed out waiting for the outputs");
}

fn exactly_once(cluster: &MemoryCluster) {
    let (missing, duplicated) = output_exactly_once(&cluster.produced(), &cluster.balance_outputs(OUT));
    assert_eq!((missing, duplicated), (0, 0), "outputs lost or duplicated");
}

fn claims(cluster: &MemoryCluster) -> Vec<(String, Option<crate::LeaseTerm>)> {
    cluster
        .control
        .history()
        .into_iter()
        .filter_map(|m| match m.body {
            ControlBody::Claim { owner, expired, .. } => Some((owner, expired)),
            _ => None,
        })
        .collect()
}

fn is(role: NodeRole) -> impl Fn(&NodeStatus) -> bool {
    move |s| s.role == role
}

/// Node `a` started first (it owns), then `b` (it stands by).
async fn a_owns_b_stands_by(cluster: &MemoryCluster) -> (Running, Running) {
    let mut a = start(cluster, "a");
    until(&mut a, "a owns", is(NodeRole::Owner)).await;
    let mut b = start(cluster, "b");
    until(&mut b, "b stands by", is(NodeRole::Standby)).await;
    (a, b)
}

/// Waits until `a` owns and `b` stands by again and the load is sent, then
/// checks every output is committed exactly once.
async fn ends_back_home(cluster: &MemoryCluster, a: &mut Running, b: &mut Running, load: tokio::task::JoinHandle<()>) {
    until(a, "a owns again", is(NodeRole::Owner)).await;
    until(b, "b stands by again", is(NodeRole::Standby)).await;
    load.await.expect("load");
    all_outputs(cluster).await;
    exactly_once(cluster);
}

/// Migration `m{i}` of the balances service from `from` to `to`.
fn plan(i: usize, from: &str, to: &str, strategy: Strategy) -> MigrationPlan {
    MigrationPlan {
        service: "balances".into(),
        migration_id: format!("m{i}"),
        source: from.into(),
        target: to.into(),
        strategy,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_node_owns_and_a_second_one_stands_by() {
    let cluster = MemoryCluster::new();
    cluster.produce_now(100);
    let (a, mut b) = a_owns_b_stands_by(&cluster).await;
    cluster.produce_now(100);
    all_outputs(&cluster).await;
    until(&mut b, "b caught up", |s| s.lag == Some(0) && s.position.total() == 200).await;
    assert_eq!(claims(&cluster), [("a".to_string(), None)], "one first claim");
    exactly_once(&cluster);
    let _ = (a.stop.send(()), b.stop.send(()));
    a.task.await.expect("join").expect("a ran");
    b.task.await.expect("join").expect("b ran");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_takes_over_when_the_owner_crashes() {
    let cluster = MemoryCluster::new();
    let (a, mut b) = a_owns_b_stands_by(&cluster).await;
    cluster.produce_now(150);
    all_outputs(&cluster).await;
    a.task.abort();
    cluster.produce_now(150);
    until(&mut b, "b owns", is(NodeRole::Owner)).await;
    all_outputs(&cluster).await;
    exactly_once(&cluster);
    let taken: Vec<_> = claims(&cluster).into_iter().map(|(o, e)| (o, e.is_some())).collect();
    assert_eq!(taken, [("a".to_string(), false), ("b".to_string(), true)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_owner_cut_off_from_the_channel_stops_and_a_standby_takes_over() {
    let cluster = MemoryCluster::new();
    let (mut a, mut b) = a_owns_b_stands_by(&cluster).await;
    cluster.produce_now(100);
    all_outputs(&cluster).await;
    // a's renewals no longer reach the channel: its lease lapses.
    cluster.control.set_fault(|m| match &m.body {
        ControlBody::Renew { owner, .. } if owner == "a" => PublishFault::Fail,
        _ => PublishFault::Pass,
    });
    until(&mut b, "b owns", is(NodeRole::Owner)).await;
    until(&mut a, "a stands by", is(NodeRole::Standby)).await;
    cluster.produce_now(100);
    all_outputs(&cluster).await;
    exactly_once(&cluster);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_migrate_back_and_forth() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let cluster = MemoryCluster::new();
    let (mut a, mut b) = a_owns_b_stands_by(&cluster).await;
    let load = cluster.produce_steady(600, Duration::from_millis(5));
    let coordinator = Coordinator::new(Arc::clone(&cluster.control), migration_config());
    for (i, (from, to)) in [("a", "b"), ("b", "a")].into_iter().enumerate() {
        let plan = plan(i, from, to, Strategy::Ms2m);
        coordinator
            .migrate(&plan, &*crate::no_progress())
            .await
            .expect("migration");
    }
    ends_back_home(&cluster, &mut a, &mut b, load).await;
}

/// MS2M from the standby moves the service with the snapshot store down:
/// the target keeps the state it replayed as a standby (a fetch would fail)
/// and the source takes no checkpoint (an upload would fail), both ways.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_migrate_from_the_standby_with_the_snapshot_store_down() {
    let cluster = MemoryCluster::new();
    let (mut a, mut b) = a_owns_b_stands_by(&cluster).await;
    let load = cluster.produce_steady(600, Duration::from_millis(5));
    cluster.store.set_unavailable(true);
    let coordinator = Coordinator::new(Arc::clone(&cluster.control), migration_config());
    for (i, (from, to)) in [("a", "b"), ("b", "a")].into_iter().enumerate() {
        until(&mut a, "the next target stands by", |s| {
            s.role == if to == "a" { NodeRole::Standby } else { NodeRole::Owner }
        })
        .await;
        let plan = plan(i, from, to, Strategy::Ms2mFromStandby);
        let report = coordinator
            .migrate(&plan, &*crate::no_progress())
            .await
            .expect("migration without the snapshot store");
        assert_eq!(
            (report.snapshot_bytes, report.transfer_ms),
            (0, 0.0),
            "nothing transferred"
        );
        assert!(report.digest_match, "the kept state compared at the digest point");
    }
    assert_eq!(cluster.checkpoint_records(), 0, "no checkpoint asked for or taken");
    cluster.store.set_unavailable(false);
    ends_back_home(&cluster, &mut a, &mut b, load).await;
}

/// A standby whose state is not the owner's (here: it was allowed to skip
/// input that retention deleted before it started, and there was no
/// snapshot) is refused by the digest point: the move from the standby
/// fails before the source stops, the source keeps serving, and a move with
/// a checkpoint then succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_that_diverged_is_refused_at_the_digest_point() {
    let cluster = MemoryCluster::new();
    let mut a = start(&cluster, "a");
    until(&mut a, "a owns", is(NodeRole::Owner)).await;
    cluster.produce_now(100);
    all_outputs(&cluster).await;
    for (tp, end) in cluster.log.end_position().iter() {
        cluster.log.truncate_before(tp, end / 2);
    }
    let mut b = start_with(&cluster, "b", |config| config.allow_log_gap(true));
    until(&mut b, "b stands by", is(NodeRole::Standby)).await;
    let load = cluster.produce_steady(300, Duration::from_millis(5));
    let coordinator = Coordinator::new(Arc::clone(&cluster.control), migration_config());
    let refused = coordinator
        .migrate(&plan(0, "a", "b", Strategy::Ms2mFromStandby), &*crate::no_progress())
        .await
        .expect_err("a diverged standby must not take over");
    assert!(
        matches!(refused, Error::Migration(MigrationError::DigestMismatch { .. })),
        "{refused}"
    );
    assert_eq!(a.status.borrow().role, NodeRole::Owner, "the source kept serving");
    until(&mut b, "b stands by again", is(NodeRole::Standby)).await;
    coordinator
        .migrate(&plan(1, "a", "b", Strategy::Ms2m), &*crate::no_progress())
        .await
        .expect("a move with a checkpoint");
    until(&mut b, "b owns", is(NodeRole::Owner)).await;
    load.await.expect("load");
    all_outputs(&cluster).await;
    exactly_once(&cluster);
}

fn migration_config() -> MigrationConfig {
    MigrationConfig {
        cutover: CutoverRule {
            max_lag: Some(20),
            max_catch_up: Some(Duration::from_millis(20)),
            replay_max: Duration::from_millis(300),
        },
        digest_policy: DigestPolicy::Abort,
        phase_timeout: Duration::from_secs(20),
    }
}

/// A poison record under `BadMessagePolicy::Fail` stops the owner with a
/// typed error and loses nothing; once an operator's `SkipInput` is on the
/// channel, the restarted node skips exactly that record and serves on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poison_record_stops_the_owner_until_an_operator_skips_it() {
    let cluster = MemoryCluster::new();
    cluster.produce_now(40);
    let poison = cluster.log.append(INPUT_TOPIC, 0, None, &b"not a deposit"[..]);
    cluster.produce_now(40);
    // It claims, applies up to the poison and stops (by then its status
    // says Stopped, not Owner).
    let a = start(&cluster, "a");
    let failed = tokio::time::timeout(Duration::from_secs(20), a.task)
        .await
        .expect("the owner stops")
        .expect("join");
    assert!(
        matches!(failed, Err(Error::Decode { offset, .. }) if offset == poison),
        "{failed:?}"
    );
    assert_eq!(
        a.status.borrow().role,
        NodeRole::Stopped,
        "a failed node reports Stopped, not the role it had"
    );
    let skip = ControlBody::SkipInput {
        topic: INPUT_TOPIC.into(),
        partition: 0,
        offset: poison,
        reason: "not a deposit".into(),
        operator: "ops".into(),
    };
    let m = crate::migration::message("balances", "", Sender::Operator, skip);
    crate::migration::publish(&*cluster.control, &m).await.expect("publish");
    let mut a = start(&cluster, "a");
    until(&mut a, "a skipped the poison", |s| s.stats.skipped_by_operator == 1).await;
    all_outputs(&cluster).await;
    exactly_once(&cluster);
    let _ = a.stop.send(());
    a.task.await.expect("join").expect("a ran");
}
