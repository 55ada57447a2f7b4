//! The services the benchmarks run. Their `apply` is deliberately trivial so
//! the numbers measure the runtime, not the service.

use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use ms2m_core::codec::Raw;
use ms2m_core::{ApplyContext, ServiceState, StatefulService};

/// The trivial work both ms2m and the raw baselines do per message: count
/// it and add its first 8 bytes (little-endian) to a sum.
pub fn work(count: &mut u64, sum: &mut u64, payload: &[u8]) {
    *count += 1;
    let mut b = [0u8; 8];
    let n = payload.len().min(8);
    b[..n].copy_from_slice(&payload[..n]);
    *sum = sum.wrapping_add(u64::from_le_bytes(b));
}

/// Counts messages and sums their first 8 bytes; no outputs.
#[derive(Debug, Default, PartialEq, Eq, ServiceState)]
#[state(version = 1)]
pub struct Tally {
    /// Messages applied.
    pub count: u64,
    /// Sum of the first 8 bytes of each payload.
    pub sum: u64,
}

#[async_trait]
impl StatefulService for Tally {
    const NAME: &'static str = "bench-tally";
    type Message = Bytes;
    type Format = Raw;
    type Error = Infallible;

    async fn apply(&mut self, payload: Bytes, _ctx: &mut ApplyContext<'_>) -> Result<(), Infallible> {
        work(&mut self.count, &mut self.sum, &payload);
        Ok(())
    }
}

/// [`Tally`] that also forwards every payload to the output topic.
#[derive(Debug, Default, PartialEq, Eq, ServiceState)]
#[state(version = 1)]
pub struct Echo {
    /// Messages applied.
    pub count: u64,
    /// Sum of the first 8 bytes of each payload.
    pub sum: u64,
}

#[async_trait]
impl StatefulService for Echo {
    const NAME: &'static str = "bench-echo";
    type Message = Bytes;
    type Format = Raw;
    type Error = Infallible;

    async fn apply(&mut self, payload: Bytes, ctx: &mut ApplyContext<'_>) -> Result<(), Infallible> {
        work(&mut self.count, &mut self.sum, &payload);
        let key = ctx.key().map(Bytes::copy_from_slice);
        ctx.emit_raw(None, key, payload);
        Ok(())
    }
}

/// CPU time each replayed message costs [`SlowReplay`], in nanoseconds.
pub static REPLAY_COST_NS: AtomicU64 = AtomicU64::new(0);

/// [`Tally`] whose replay is slower than its live processing (a busy
/// target host): each message applied in replay mode spins for
/// [`REPLAY_COST_NS`]. The state does not depend on it, so `apply` stays
/// deterministic. Used to make the input rate outrun replay (B7).
#[derive(Debug, Default, PartialEq, Eq, ServiceState)]
#[state(version = 1)]
pub struct SlowReplay {
    /// Messages applied.
    pub count: u64,
    /// Sum of the first 8 bytes of each payload.
    pub sum: u64,
}

#[async_trait]
impl StatefulService for SlowReplay {
    const NAME: &'static str = "bench-slow-replay";
    type Message = Bytes;
    type Format = Raw;
    type Error = Infallible;

    async fn apply(&mut self, payload: Bytes, ctx: &mut ApplyContext<'_>) -> Result<(), Infallible> {
        work(&mut self.count, &mut self.sum, &payload);
        if ctx.is_replaying() {
            let cost = Duration::from_nanos(REPLAY_COST_NS.load(Ordering::Relaxed));
            let start = Instant::now();
            while start.elapsed() < cost {
                std::hint::spin_loop();
            }
        }
        Ok(())
    }
}
