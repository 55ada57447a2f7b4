//! The ledger node the process tests start (the same code as
//! `cargo run --example ledger_node`), built with the tests so they can
//! find it.

use clap::Parser;
use ms2m_examples::fleet::{run_node, NodeArgs};

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    node: NodeArgs,
}

#[tokio::main]
async fn main() -> Result<(), ms2m_examples::support::BoxError> {
    ms2m_examples::support::init_logging();
    run_node(Cli::parse().node).await
}
