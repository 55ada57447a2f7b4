//! Micro benchmarks of the snapshot path's CPU work: the state codec
//! (derive-generated `snapshot` / `restore`), the envelope (seal + encode,
//! decode + verify) and the state digest, on a game-sessions state.
//!
//! ```text
//! cargo bench -p ms2m-benches --bench codec
//! ```

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use ms2m_benches::services::Tally;
use ms2m_core::{Position, ServiceState, Snapshot, StatefulService};
use ms2m_examples::game::{play, GameEvent, GameSessions};

const MIB: usize = 1 << 20;

fn state(mib: usize) -> GameSessions {
    let mut s = GameSessions::default();
    let players = 1000u64;
    let board_bytes = (mib * MIB / players as usize) as u32;
    for player in 0..players {
        play(&mut s.sessions, &GameEvent::Join { player, board_bytes });
    }
    s
}

fn codec(c: &mut Criterion) {
    let mut g = c.benchmark_group("state_codec");
    g.sample_size(10);
    for mib in [1usize, 16] {
        let s = state(mib);
        let bytes = s.snapshot().expect("encodes");
        g.throughput(Throughput::Bytes(bytes.len() as u64));
        g.bench_with_input(BenchmarkId::new("snapshot", format!("{mib}MiB")), &s, |b, s| {
            b.iter(|| s.snapshot().expect("encodes"))
        });
        g.bench_with_input(BenchmarkId::new("restore", format!("{mib}MiB")), &bytes, |b, bytes| {
            b.iter(|| GameSessions::restore(GameSessions::SCHEMA_VERSION, bytes).expect("decodes"))
        });
        g.bench_with_input(BenchmarkId::new("digest", format!("{mib}MiB")), &s, |b, s| {
            b.iter(|| s.digest())
        });
    }
    g.finish();

    let mut g = c.benchmark_group("envelope");
    g.sample_size(10);
    let mib = 64;
    let state = ms2m_benches::snapshots::noise(mib * MIB, 1);
    g.throughput(Throughput::Bytes(state.len() as u64));
    g.bench_function(format!("seal_encode/{mib}MiB"), |b| {
        b.iter(|| {
            Snapshot::seal(Tally::NAME, 1, Position::new(), "bench", state.clone())
                .encode()
                .expect("encodes")
        })
    });
    let encoded: Bytes = Snapshot::seal(Tally::NAME, 1, Position::new(), "bench", state.clone())
        .encode()
        .expect("encodes")
        .to_bytes();
    g.bench_function(format!("decode_verify/{mib}MiB"), |b| {
        b.iter(|| Snapshot::decode(encoded.clone()).expect("decodes"))
    });
    g.finish();
}

criterion_group!(benches, codec);
criterion_main!(benches);
