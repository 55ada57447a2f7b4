//! # A bank ledger: outputs survive a crash exactly once
//!
//! The ledger emits a balance update (or an overdraft rejection) for every
//! transaction. This example crashes the ledger half-way (no final commit,
//! no final snapshot), recovers a fresh instance from its last snapshot plus
//! the log, and shows that every transaction's output was committed exactly
//! once: outputs of replayed messages were suppressed, and the crashed
//! instance's uncommitted outputs were aborted with its transaction.
//!
//! ```text
//! cargo run --example ledger
//! ```

use std::collections::HashMap;
use std::time::Duration;

use ms2m_core::{Delivery, Instance, InstanceConfig};
use ms2m_examples::ledger::{transaction, Ledger};
use ms2m_examples::support::{produce_json, producer, read_committed, BoxError};
use ms2m_kafka::{KafkaCluster, KafkaConfig};

const TRANSACTIONS: u64 = 2_000;

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    ms2m_examples::support::init_logging();
    let cluster = KafkaCluster::embedded(KafkaConfig::new("ledger").input_topic("transactions"))?;
    cluster.create_topic("transactions", 3, &[]).await?;
    cluster.create_topic("ledger-events", 3, &[]).await?;
    let txs = (0..TRANSACTIONS)
        .map(|i| {
            let tx = transaction(i);
            let key = format!("acct-{:02}", i % 10).into_bytes();
            (key, tx)
        })
        .collect();
    let input = produce_json(&producer(&cluster)?, "transactions", txs).await?;

    let config = || {
        InstanceConfig::new("ledger-1")
            .output_topic("ledger-events")
            .snapshot_every(None)
            .commit_every(100, Duration::from_millis(50))
            .poll(100, Duration::from_millis(50))
    };
    let mut first = Instance::<Ledger, _, _, _>::recover(
        cluster.backends(Delivery::ExactlyOnce).await?,
        config(),
        &*ms2m_core::no_progress(),
    )
    .await?;
    while first.position().total() < 800 {
        first.step().await?;
    }
    let checkpoint = first.checkpoint().await?;
    println!("checkpoint at {} transactions", checkpoint.position.total());
    while first.position().total() < 1_000 {
        first.step().await?;
    }
    println!("crashing after {} transactions", first.position().total());
    drop(first.into_parts()); // no commit, no final snapshot

    let progress = |p: &ms2m_core::Progress| println!("  recovery: {} replayed, {} to go", p.applied, p.remaining);
    let mut second =
        Instance::<Ledger, _, _, _>::recover(cluster.backends(Delivery::ExactlyOnce).await?, config(), &progress)
            .await?;
    println!(
        "recovered: replayed {} transactions with outputs suppressed",
        second.stats().applied_replay
    );
    while second.position().total() < TRANSACTIONS as i64 {
        second.step().await?;
    }
    second.shutdown().await?;

    // Every transaction's output is there exactly once.
    let outputs = read_committed(&cluster, "ledger-events").await?;
    let mut per_key: HashMap<Vec<u8>, usize> = HashMap::new();
    for (_, _, key, _) in &outputs {
        *per_key.entry(key.clone()).or_default() += 1;
    }
    let expected: usize = input.len();
    println!(
        "{} transactions, {} outputs committed, {} overdrafts rejected",
        expected,
        outputs.len(),
        second.state().rejected
    );
    if outputs.len() != expected {
        return Err(format!("expected {expected} outputs, found {}", outputs.len()).into());
    }
    println!("every output committed exactly once");
    Ok(())
}
