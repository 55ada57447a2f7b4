//! The ledger host the partitioned process tests start (the same code as
//! `cargo run --example ledger_host`), built with the tests so they can
//! find it.

use clap::Parser;
use ms2m_examples::partitioned::{run_host, HostArgs};

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    host: HostArgs,
}

#[tokio::main]
async fn main() -> Result<(), ms2m_examples::support::BoxError> {
    ms2m_examples::support::init_logging();
    run_host(Cli::parse().host).await
}
