//! B5 as a micro benchmark: the apply-loop pause of `Instance::checkpoint`
//! (`CheckpointInfo.pause`, what the runtime measures) vs serializing the
//! same 64 MiB state alone, on the in-memory backends.
//!
//! ```text
//! cargo bench -p ms2m-benches --bench checkpoint
//! ```

use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use ms2m_benches::snapshots::game_log;
use ms2m_core::memory::{MemoryOutputs, MemorySnapshotStore};
use ms2m_core::{no_progress, Backends, Instance, InstanceConfig, ServiceState};
use ms2m_examples::game::GameSessions;

fn checkpoint(c: &mut Criterion) {
    let mib = 64;
    let players = 1000u64;
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let log = game_log(mib, players, 0).expect("log");
    let outputs = MemoryOutputs::new();
    let mut instance = rt.block_on(async {
        let backends = Backends {
            log: log.reader(),
            store: Arc::new(MemorySnapshotStore::new()),
            sink: outputs.sink(),
        };
        let config = InstanceConfig::new("b5")
            .output_topic("b5.scores")
            .snapshot_every(None)
            .snapshot_interval(None)
            .keep_snapshots(1);
        let mut i = Instance::<GameSessions, _, _, _>::recover(backends, config, &*no_progress())
            .await
            .expect("recovers");
        while i.position().total() < players as i64 {
            i.step().await.expect("applies");
        }
        i
    });
    let bytes = instance.state().snapshot().expect("encodes").len() as u64;
    let mut g = c.benchmark_group(format!("b5_checkpoint_{mib}MiB"));
    g.sample_size(10);
    g.throughput(Throughput::Bytes(bytes));
    g.bench_function("serialize_alone", |b| {
        b.iter(|| instance.state().snapshot().expect("encodes"))
    });
    g.bench_function("checkpoint_pause", |b| {
        b.iter_custom(|iters| {
            let mut paused = Duration::ZERO;
            for _ in 0..iters {
                paused += rt.block_on(instance.checkpoint()).expect("checkpoint").pause;
            }
            paused
        })
    });
    g.finish();
}

criterion_group!(benches, checkpoint);
criterion_main!(benches);
