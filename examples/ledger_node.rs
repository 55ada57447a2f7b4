//! # A ledger node: one process of a fleet
//!
//! Runs the ledger service as a node ([`ms2m_core::node::Node`]): the first
//! node to start owns the service, every other one stands by, replaying
//! behind the owner, and takes over when the owner's lease expires; a
//! migration (`ms2m migrate --to ID`) moves ownership between nodes.
//! Stops on SIGTERM or SIGINT. Prints its status as JSON lines.
//!
//! ```text
//! cargo run --release --example ledger_node -- --instance a --brokers 127.0.0.1:9092
//! cargo run --release --example ledger_node -- --instance b --brokers 127.0.0.1:9092
//! ```

use clap::Parser;
use ms2m_examples::fleet::{run_node, NodeArgs};
use ms2m_examples::support::BoxError;

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    node: NodeArgs,
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    ms2m_examples::support::init_logging();
    run_node(Cli::parse().node).await
}
