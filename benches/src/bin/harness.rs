//! The ms2m benchmark harness: runs each comparison of issue 7 side by side
//! in one process on one broker, prints a markdown table of medians over
//! repeated runs and writes the rows (with every sample) as JSON.
//!
//! ```text
//! cargo run --release -p ms2m-benches --bin harness                      # everything, embedded broker
//! cargo run --release -p ms2m-benches --bin harness -- --quick           # CI smoke test (no thresholds asserted)
//! cargo run --release -p ms2m-benches --bin harness -- --only B2,B3 --runs 5
//! cargo run --release -p ms2m-benches --bin harness -- --only F1,F2 --runs 5   # failover, standby lag
//! cargo run --release -p ms2m-benches --bin harness -- --only S1 --runs 5      # tasks moved to a new host
//! cargo run --release -p ms2m-benches --bin harness -- --brokers 127.0.0.1:9092   # tansu or any Kafka
//! ```
//!
//! Exits non-zero only if a benchmark fails to run (a broken migration, a
//! lost message), never because a target is missed.

use std::path::PathBuf;
use std::time::Instant;

use clap::Parser;
use ms2m_benches::migration::B1Options;
use ms2m_benches::report::{markdown, Row};
use ms2m_benches::{failover, migration, snapshots, tasks, throughput, Bench, BoxError};

/// Benchmarks ms2m against raw rdkafka and the MS2M paper's baselines.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Kafka bootstrap servers; the embedded mock cluster when absent.
    #[arg(long)]
    brokers: Option<String>,
    /// Small sizes and one run: a smoke test for CI.
    #[arg(long)]
    quick: bool,
    /// Repetitions per comparison (default 3, quick 1). B1 reports p50 and
    /// p99 over them (p99 is the largest below 100 runs; use ≥ 20 for a
    /// meaningful tail).
    #[arg(long)]
    runs: Option<usize>,
    /// Benchmarks to run (comma-separated: B1..B7, F1, F2, S1; MEM comes with B1).
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Write the rows and every sample as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// B1 state sizes in MiB (default 1,16,64,256; quick 1,16).
    #[arg(long, value_delimiter = ',')]
    b1_sizes: Vec<u64>,
    /// B1 input rate, msg/s.
    #[arg(long, default_value_t = 2000)]
    b1_rate: u64,
    /// B1 also runs the 64 MiB case at this rate (0: off; default 20000, quick 0).
    #[arg(long)]
    b1_high_rate: Option<u64>,
    /// B1 skips the moves from a warm standby (the B1-warm rows).
    #[arg(long)]
    b1_no_warm: bool,
    /// S1 state per task in MiB (default 16, quick 1).
    #[arg(long)]
    s1_task_mib: Option<u64>,
    /// S1: the most tasks moved at once (default 8: all of them).
    #[arg(long, default_value_t = tasks::MOVED, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    s1_max_moves: usize,
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    // B1's outside observer is this binary re-executed.
    if let Some(code) = ms2m_examples::observer::run_child_if_requested() {
        std::process::exit(code);
    }
    // So are the source and target processes of the per-role memory rows.
    if let Some(code) = ms2m_benches::roles::run_role_if_requested().await {
        std::process::exit(code);
    }
    // And the fleet nodes of F1 and F2.
    if let Some(code) = ms2m_benches::nodes::run_node_if_requested().await {
        std::process::exit(code);
    }
    // And the task hosts of S1.
    if let Some(code) = ms2m_benches::tasks::run_host_if_requested().await {
        std::process::exit(code);
    }
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "error".into());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
    let args = Args::parse();
    let runs = args.runs.unwrap_or(if args.quick { 1 } else { 3 });
    let bench = Bench::connect(args.brokers.as_deref(), args.quick, runs)?;
    let wanted = |id: &str| args.only.is_empty() || args.only.iter().any(|o| o.eq_ignore_ascii_case(id));
    let b1 = B1Options {
        sizes: if args.b1_sizes.is_empty() {
            if args.quick {
                vec![1, 16]
            } else {
                vec![1, 16, 64, 256]
            }
        } else {
            args.b1_sizes.clone()
        },
        rate: args.b1_rate,
        high_rate: args.b1_high_rate.unwrap_or(if args.quick { 0 } else { 20_000 }),
        warm: !args.b1_no_warm,
    };
    let s1 = tasks::S1Options {
        task_mib: args.s1_task_mib.unwrap_or(if args.quick { 1 } else { 16 }),
        max_moves: args.s1_max_moves,
    };
    println!(
        "ms2m benchmarks on {}, {} run(s) each{}",
        bench.broker_label(),
        bench.runs,
        if args.quick { ", quick mode" } else { "" }
    );
    let started = Instant::now();
    let mut rows: Vec<Row> = Vec::new();
    for id in ["B5", "B2", "B3", "B4", "B6", "B7", "B1", "F1", "F2", "S1"] {
        if !wanted(id) {
            continue;
        }
        let t = Instant::now();
        eprintln!("running {id}...");
        let result = match id {
            "B1" => migration::b1(&bench, &b1).await,
            "B2" => throughput::b2(&bench).await,
            "B3" => throughput::b3(&bench).await,
            "B4" => snapshots::b4(&bench).await,
            "B5" => snapshots::b5(&bench).await,
            "B6" => throughput::b6(&bench).await,
            "F1" => failover::f1(&bench).await,
            "F2" => failover::f2(&bench).await,
            "S1" => tasks::s1(&bench, s1).await,
            _ => migration::b7(&bench).await,
        };
        let new = result.map_err(|e| format!("{id} failed: {e}"))?;
        eprintln!("{id} done in {:.1} s", t.elapsed().as_secs_f64());
        eprint!("{}", markdown(&new));
        rows.extend(new);
    }
    rows.sort_by_key(|r| order(&r.id));
    println!();
    print!("{}", markdown(&rows));
    println!();
    println!("total {:.0} s", started.elapsed().as_secs_f64());
    if let Some(path) = &args.json {
        let doc = serde_json::json!({
            "broker": bench.broker_label(),
            "runs": bench.runs,
            "quick": args.quick,
            "command": std::env::args().collect::<Vec<_>>(),
            "rows": rows,
        });
        std::fs::write(path, serde_json::to_vec_pretty(&doc)?)?;
        println!("rows written to {}", path.display());
    }
    Ok(())
}

fn order(id: &str) -> (u32, String) {
    // The B rows first, then the F rows, then the S rows.
    let (offset, rest) = if let Some(rest) = id.strip_prefix('F') {
        (100, rest)
    } else if let Some(rest) = id.strip_prefix('S') {
        (200, rest)
    } else {
        (0, id.trim_start_matches('B'))
    };
    let n = rest
        .chars()
        .take_while(char::is_ascii_digit)
        .collect::<String>()
        .parse()
        .unwrap_or(99);
    (offset + n, id.to_string())
}
