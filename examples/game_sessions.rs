//! # Game sessions: a large state under a steady stream
//!
//! The MS2M paper's evaluation workload: many player sessions, each with a
//! level (`board`) that makes the state large, updated by flap/tick events.
//! This example builds a 16 MiB state, takes a checkpoint, and shows how
//! long the apply loop paused to serialize it and how big it is; see the
//! `migrate` example for moving it between instances.
//!
//! ```text
//! cargo run --release --example game_sessions
//! ```

use ms2m_core::{Delivery, Instance, InstanceConfig, ServiceState};
use ms2m_examples::game::{event, GameEvent, GameSessions};
use ms2m_examples::support::{produce_json, producer, BoxError};
use ms2m_kafka::{KafkaCluster, KafkaConfig};

const PLAYERS: u64 = 256;
const BOARD_BYTES: u32 = 64 * 1024;
const EVENTS: u64 = 20_000;

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    ms2m_examples::support::init_logging();
    let cluster = KafkaCluster::embedded(KafkaConfig::new("game-sessions").input_topic("game-events"))?;
    cluster.create_topic("game-events", 4, &[]).await?;
    cluster.create_topic("game-scores", 4, &[]).await?;
    let key = |p: u64| p.to_be_bytes().to_vec();
    let mut batch: Vec<_> = (0..PLAYERS)
        .map(|player| {
            (
                key(player),
                GameEvent::Join {
                    player,
                    board_bytes: BOARD_BYTES,
                },
            )
        })
        .collect();
    batch.extend((0..EVENTS).map(|i| {
        let e = event(i, PLAYERS);
        (key(e.player()), e)
    }));
    let total = batch.len() as i64;
    produce_json(&producer(&cluster)?, "game-events", batch).await?;

    let config = InstanceConfig::new("game-1")
        .output_topic("game-scores")
        .snapshot_every(None);
    let backends = cluster.backends(Delivery::ExactlyOnce).await?;
    let mut game = Instance::<GameSessions, _, _, _>::recover(backends, config, &*ms2m_core::no_progress()).await?;
    while game.position().total() < total {
        game.step().await?;
    }
    let checkpoint = game.checkpoint().await?;
    let alive = game.state().sessions.values().filter(|s| s.alive).count();
    let best = game.state().sessions.values().map(|s| s.score).max().unwrap_or(0);
    println!(
        "{} events applied, {} outputs emitted; {alive} birds still flying, best score {best}",
        game.stats().applied_live,
        game.stats().outputs_emitted
    );
    println!(
        "checkpoint {}: {:.1} MiB, apply loop paused {:.1} ms to serialize, digest {}",
        checkpoint.id,
        checkpoint.bytes as f64 / 1048576.0,
        checkpoint.pause.as_secs_f64() * 1e3,
        game.state().digest()
    );
    game.shutdown().await?;
    Ok(())
}
