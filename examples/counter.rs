//! # Hello, ms2m: a word counter
//!
//! The smallest useful service: counts words from a topic and emits each
//! word's new count. One derive on the state, one `apply`; the runtime
//! tracks offsets, snapshots and outputs. Runs on the embedded broker:
//!
//! ```text
//! cargo run --example counter
//! ```

use std::collections::HashMap;
use std::convert::Infallible;

use ms2m_core::{codec::Json, ApplyContext, Delivery, Instance, InstanceConfig, ServiceState, StatefulService};
use ms2m_examples::support::{produce_json, producer, read_committed, BoxError};
use ms2m_kafka::{KafkaCluster, KafkaConfig};

#[derive(Default, ServiceState)]
#[state(version = 1)]
struct WordCount {
    counts: HashMap<String, u64>,
}

#[async_trait::async_trait]
impl StatefulService for WordCount {
    const NAME: &'static str = "word-count";
    type Message = String;
    type Format = Json;
    type Error = Infallible;

    async fn apply(&mut self, word: String, ctx: &mut ApplyContext<'_>) -> Result<(), Infallible> {
        let n = self.counts.entry(word.clone()).or_default();
        *n += 1;
        ctx.emit_keyed(&word, &(word.as_str(), *n));
        Ok(())
    }
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    ms2m_examples::support::init_logging();
    // The embedded test broker, by explicit opt-in (a real cluster:
    // `KafkaCluster::connect` with `KafkaConfig::bootstrap_servers`).
    let cluster = KafkaCluster::embedded(KafkaConfig::new("word-count").input_topic("words"))?;
    cluster.create_topic("words", 2, &[]).await?;
    cluster.create_topic("word-counts", 2, &[]).await?;
    let text = "the quick brown fox jumps over the lazy dog the end";
    let words = text
        .split(' ')
        .map(|w| (w.as_bytes().to_vec(), w.to_string()))
        .collect();
    produce_json(&producer(&cluster)?, "words", words).await?;

    let config = InstanceConfig::new("word-count-1").output_topic("word-counts");
    let backends = cluster.backends(Delivery::ExactlyOnce).await?;
    let mut counter = Instance::<WordCount, _, _, _>::recover(backends, config, &*ms2m_core::no_progress()).await?;
    while counter.position().total() < 11 {
        counter.step().await?;
    }
    counter.shutdown().await?; // commit + final snapshot

    println!("\"the\" was seen {} times", counter.state().counts["the"]);
    println!(
        "{} outputs committed",
        read_committed(&cluster, "word-counts").await?.len()
    );
    Ok(())
}
