//! The seeded fault-injection suite (DESIGN.md §5 after every run).
//!
//! * `in_memory_scenarios`: recovery and migration (all four strategies,
//!   faults at every phase) on ms2m-core's in-memory backends, whose sink is
//!   transactional: 0 duplicated outputs is checked there. Runs only in the
//!   embedded-broker pass (it needs no broker).
//! * `kafka_scenarios`: the same families on the test broker — the embedded
//!   mock cluster (plus broker down/up, request errors, latency) or tansu
//!   (plus a process restart on its sqlite file). Duplicates are counted
//!   and bounded by the at-least-once window there: the mock does not
//!   implement transactions and tansu has none.
//!
//! Seeds: `MS2M_FAULT_SEED=N` replays one; `MS2M_FAULT_SEEDS` (count) and
//! `MS2M_FAULT_SEED_BASE` choose a range. CI runs the defaults; a soak is
//!
//! ```text
//! MS2M_FAULT_SEEDS=5000 MS2M_FAULT_SEED_BASE=$RANDOM cargo test -p ms2m-tests --test fault_injection -- --nocapture
//! ```

use std::time::Duration;

use ms2m_tests::faults::{run_kafka, run_memory, run_seeds, seeds, Backend, KafkaEnv, Summary};
use ms2m_tests::report_line;

/// Default seeds per CI run: in-memory (fast) and Kafka (slower).
const MEMORY_SEEDS: u64 = 160;
const MOCK_SEEDS: u64 = 40;
const TANSU_SEEDS: u64 = 25;

fn finish(name: &str, summary: Summary) {
    report_line(&format!("{name}\n{summary}"));
    assert!(
        summary.ok(),
        "{name}: invariants violated; see the failures and replay commands above"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_memory_scenarios() {
    if !ms2m_tests::on_mock() && std::env::var("MS2M_FAULT_SEED").is_err() {
        report_line("in-memory fault scenarios run in the embedded-broker pass; skipped");
        return;
    }
    ms2m_tests::init_tracing();
    let seeds = seeds(MEMORY_SEEDS);
    let summary = run_seeds(&seeds, Backend::Memory, Duration::from_secs(60), run_memory).await;
    finish("in-memory backends", summary);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_scenarios() {
    let env = KafkaEnv::connect();
    let backend = env.backend();
    let default = if backend == Backend::Mock {
        MOCK_SEEDS
    } else {
        TANSU_SEEDS
    };
    let seeds = seeds(default);
    let summary = run_seeds(&seeds, backend, Duration::from_secs(120), move |sc| {
        run_kafka(env.clone(), sc)
    })
    .await;
    finish(&format!("{backend:?} broker"), summary);
}

/// Mock seed 62 (found by a 100-seed mock run): the coordinator is killed
/// just after it publishes `Stop`; the record is already enqueued and lands
/// after the recovering coordinator read the history, decided "never
/// stopped" and published `Aborted`. The target takes over on `Stopped`
/// while the source resumes on `Aborted`. Sink fencing stops one of them,
/// but the recorded owner can be wrong.
///
/// Timing-dependent: it failed once in a 100-seed mock run and passes on
/// most replays (a seed replays the fault, not thread timing), so a green
/// run of this test proves nothing; loop it with `--ignored` to hunt.
///
/// Known bug: the fix is a first-writer-wins rule on the (single-partition,
/// totally ordered) control log: the target publishes its takeover intent
/// and goes live only if no `Resume`/`Aborted` precedes it; the source and
/// a recovering coordinator decide by the same order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "known race: a late Stop from a dead coordinator vs the recovering coordinator's Aborted"]
async fn regression_mock_seed_62_late_stop_from_a_dead_coordinator() {
    let env = KafkaEnv::connect();
    let backend = env.backend();
    let summary = run_seeds(&[62], backend, Duration::from_secs(120), move |sc| {
        run_kafka(env.clone(), sc)
    })
    .await;
    finish("mock seed 62", summary);
}
