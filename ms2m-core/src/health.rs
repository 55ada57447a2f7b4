//! Liveness and readiness of a running service, for an orchestrator's
//! probes.
//!
//! Why two signals: a probe that restarts a process must only fire when the
//! process is stuck (liveness), while a load balancer or an operator that
//! routes traffic or starts a migration must know whether the instance is
//! serving current data (readiness). A migration target replaying behind its
//! source is alive but not ready; an owner lagging far behind its input is
//! alive but not ready either.
//!
//! [`Health`] is a cheap `Clone` (an `Arc` of atomics), shared between the
//! apply loop that updates it and whoever reads it: the HTTP listener of
//! `ms2m_kafka::telemetry` (`/health/live`, `/health/ready`), or the
//! application through [`Health::is_live`] and [`Health::is_ready`].
//!
//! * **Liveness**: the apply loop made progress (finished a step, even an
//!   idle one) within [`liveness_bound`](Health::with_liveness_bound).
//! * **Readiness**, decided by the role: a node (owner or warm standby)
//!   drives it with [`set_ready`](Health::set_ready); otherwise a plain
//!   [`Instance`](crate::Instance) is ready once it emits outputs (it owns
//!   the service) and its lag is at most
//!   [`ready_lag`](Health::with_ready_lag).

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Default [`Health::with_liveness_bound`]: 30 s without a finished step.
pub const DEFAULT_LIVENESS_BOUND: Duration = Duration::from_secs(30);

/// Default [`Health::with_ready_lag`]: 1,000 messages behind the log's end.
pub const DEFAULT_READY_LAG: u64 = 1_000;

/// Lag not measured yet.
const UNKNOWN_LAG: u64 = u64::MAX;

const AUTO: u8 = 0;
const FORCED_READY: u8 = 1;
const FORCED_NOT_READY: u8 = 2;

/// Liveness and readiness of one instance (or node); see [the module docs](self).
#[derive(Clone, Debug)]
pub struct Health {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    /// The zero of the millisecond clocks below.
    epoch: Instant,
    /// Milliseconds since `epoch` of the last progress.
    last_progress_ms: AtomicU64,
    liveness_bound_ms: AtomicU64,
    /// Whether the instance emits outputs (owns the service).
    serving: AtomicBool,
    /// The last measured lag (messages), `UNKNOWN_LAG` before the first.
    lag: AtomicU64,
    ready_lag: AtomicU64,
    /// `AUTO`, or a role's decision through `set_ready`.
    ready_override: AtomicU8,
}

/// A point-in-time view of a [`Health`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HealthReport {
    /// Whether the apply loop progressed within the bound.
    pub live: bool,
    /// Whether the instance serves current data (see [`Health::is_ready`]).
    pub ready: bool,
    /// Time since the apply loop last progressed.
    pub since_progress: Duration,
    /// The last measured lag in messages, if any was measured.
    pub lag: Option<u64>,
}

impl Default for Health {
    fn default() -> Self {
        Self::new()
    }
}

impl Health {
    /// A health handle with the default bounds, alive from now on, not ready.
    pub fn new() -> Self {
        Self {
            inner: Arc::new(Inner {
                epoch: Instant::now(),
                last_progress_ms: AtomicU64::new(0),
                liveness_bound_ms: AtomicU64::new(millis(DEFAULT_LIVENESS_BOUND)),
                serving: AtomicBool::new(false),
                lag: AtomicU64::new(UNKNOWN_LAG),
                ready_lag: AtomicU64::new(DEFAULT_READY_LAG),
                ready_override: AtomicU8::new(AUTO),
            }),
        }
    }

    /// The longest time without progress that still counts as alive
    /// (default [`DEFAULT_LIVENESS_BOUND`]). Keep it well above the poll
    /// timeout and the longest commit or snapshot pause.
    pub fn with_liveness_bound(self, bound: Duration) -> Self {
        self.inner.liveness_bound_ms.store(millis(bound), Ordering::Relaxed);
        self
    }

    /// The largest lag (messages behind the log's end, summed over the
    /// partitions) at which a serving instance counts as ready (default
    /// [`DEFAULT_READY_LAG`]).
    pub fn with_ready_lag(self, messages: u64) -> Self {
        self.inner.ready_lag.store(messages, Ordering::Relaxed);
        self
    }

    /// Records progress of the apply loop now.
    pub fn progressed(&self) {
        let now = millis(self.inner.epoch.elapsed());
        self.inner.last_progress_ms.store(now, Ordering::Relaxed);
    }

    /// Time since the last progress (or since creation).
    pub fn since_progress(&self) -> Duration {
        let last = self.inner.last_progress_ms.load(Ordering::Relaxed);
        self.inner.epoch.elapsed().saturating_sub(Duration::from_millis(last))
    }

    /// Whether the apply loop progressed within the liveness bound.
    pub fn is_live(&self) -> bool {
        self.since_progress().as_millis() as u64 <= self.inner.liveness_bound_ms.load(Ordering::Relaxed)
    }

    /// Whether the instance serves current data: as set by
    /// [`set_ready`](Self::set_ready) if a role decided, else serving and
    /// lag at most the ready lag.
    pub fn is_ready(&self) -> bool {
        match self.inner.ready_override.load(Ordering::Relaxed) {
            FORCED_READY => true,
            FORCED_NOT_READY => false,
            _ => self.inner.serving.load(Ordering::Relaxed) && self.caught_up(),
        }
    }

    fn caught_up(&self) -> bool {
        let lag = self.inner.lag.load(Ordering::Relaxed);
        lag != UNKNOWN_LAG && lag <= self.inner.ready_lag.load(Ordering::Relaxed)
    }

    /// Readiness decided by a role (a node: the owner once caught up, a
    /// warm standby once restored and following). Overrides the automatic
    /// rule until [`clear_ready`](Self::clear_ready).
    pub fn set_ready(&self, ready: bool) {
        let value = if ready { FORCED_READY } else { FORCED_NOT_READY };
        self.inner.ready_override.store(value, Ordering::Relaxed);
    }

    /// Back to the automatic rule (serving and caught up).
    pub fn clear_ready(&self) {
        self.inner.ready_override.store(AUTO, Ordering::Relaxed);
    }

    /// Whether the instance emits outputs (set by the instance).
    pub fn set_serving(&self, serving: bool) {
        self.inner.serving.store(serving, Ordering::Relaxed);
    }

    /// The lag just measured, in messages (set by the instance).
    pub fn set_lag(&self, lag: u64) {
        self.inner.lag.store(lag.min(UNKNOWN_LAG - 1), Ordering::Relaxed);
    }

    /// The last measured lag, if any.
    pub fn lag(&self) -> Option<u64> {
        Some(self.inner.lag.load(Ordering::Relaxed)).filter(|l| *l != UNKNOWN_LAG)
    }

    /// Everything at once.
    pub fn report(&self) -> HealthReport {
        HealthReport {
            live: self.is_live(),
            ready: self.is_ready(),
            since_progress: self.since_progress(),
            lag: self.lag(),
        }
    }
}

fn millis(d: Duration) -> u64 {
    d.as_millis().min(u128::from(u64::MAX)) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_needs_serving_and_a_small_lag_unless_a_role_decides() {
        let h = Health::new().with_ready_lag(10);
        assert!(!h.is_ready(), "lag unknown");
        h.set_lag(5);
        assert!(!h.is_ready(), "not serving");
        h.set_serving(true);
        assert!(h.is_ready());
        h.set_lag(11);
        assert!(!h.is_ready(), "lagging");
        h.set_ready(true);
        assert!(h.is_ready(), "a role decided");
        h.clear_ready();
        assert!(!h.is_ready());
        h.clone().set_ready(false);
        h.set_lag(0);
        assert!(!h.is_ready(), "clones share the state");
    }

    #[test]
    fn live_within_the_bound_of_the_last_progress() {
        let h = Health::new().with_liveness_bound(Duration::ZERO);
        std::thread::sleep(Duration::from_millis(5));
        assert!(!h.is_live());
        h.progressed();
        assert!(h.is_live() || h.since_progress() > Duration::ZERO);
        let h = h.with_liveness_bound(Duration::from_secs(60));
        assert!(h.report().live);
    }
}
