//! # A ledger host: one process of a partitioned fleet
//!
//! Runs the ledger as 16 tasks, one per input partition
//! ([`ms2m_core::fleet::TaskHost`]). The first host takes every task; each
//! host that joins receives its share, moved live with MS2M; a host that
//! dies has its tasks claimed by the others once their leases expire;
//! `ms2m drain ID` empties a host before it is stopped. Stops on SIGTERM
//! or SIGINT. Prints its tasks and their roles as JSON lines.
//!
//! ```text
//! cargo run --release --example ledger_host -- --instance a --brokers 127.0.0.1:9092 --prefix demo.
//! cargo run --release --example ledger_host -- --instance b --brokers 127.0.0.1:9092 --prefix demo.
//! ```

use clap::Parser;
use ms2m_examples::partitioned::{run_host, HostArgs};
use ms2m_examples::support::BoxError;

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    host: HostArgs,
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    ms2m_examples::support::init_logging();
    run_host(Cli::parse().host).await
}
