//! Progress of long operations (recovery replay, migration replay), for a
//! progress bar, metrics or logs.

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// What is making progress.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum ProgressPhase {
    /// A fresh instance replaying from its snapshot to the output watermark.
    Recovery,
    /// Migration phase 1: the source is taking its checkpoint.
    Checkpoint,
    /// Migration phases 2–3: the target fetches and restores the snapshot.
    Restore,
    /// A migration target replaying behind the live source.
    MigrationReplay,
    /// A migration target replaying the final gap to the cutover position.
    Cutover,
    /// A warm target following the owner before a migration names it
    /// (`applied`: since its restore; `remaining`: its lag behind the
    /// owner's committed position).
    Standby,
}

/// One progress report.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Progress {
    /// What is progressing.
    pub phase: ProgressPhase,
    /// Messages applied so far in this phase.
    pub applied: u64,
    /// Messages still to apply.
    pub remaining: u64,
    /// Apply rate, messages per second (smoothed).
    pub rate: f64,
    /// Estimated time to finish at the current rate.
    pub eta: Option<Duration>,
}

/// Receives progress reports. Implemented for every `Fn(&Progress)`.
pub trait ProgressListener: Send + Sync + 'static {
    /// Called at most every `progress_interval`, and once at the end.
    fn on_progress(&self, progress: &Progress);
}

impl<F: Fn(&Progress) + Send + Sync + 'static> ProgressListener for F {
    fn on_progress(&self, progress: &Progress) {
        self(progress)
    }
}

/// A shared listener.
pub type SharedListener = Arc<dyn ProgressListener>;

/// The listener that ignores everything.
pub fn no_progress() -> SharedListener {
    Arc::new(|_: &Progress| {})
}

/// Smoothed rate estimate (exponentially weighted over report intervals).
#[derive(Debug, Clone, Default)]
pub(crate) struct RateMeter {
    rate: f64,
    primed: bool,
}

impl RateMeter {
    pub(crate) fn observe(&mut self, count: u64, elapsed: Duration) -> f64 {
        let secs = elapsed.as_secs_f64();
        if secs > 0.0 {
            let sample = count as f64 / secs;
            self.rate = if self.primed {
                0.7 * self.rate + 0.3 * sample
            } else {
                sample
            };
            self.primed = true;
        }
        self.rate
    }

    pub(crate) fn rate(&self) -> f64 {
        self.rate
    }
}

pub(crate) fn eta(remaining: u64, rate: f64) -> Option<Duration> {
    if rate > 0.0 {
        Duration::try_from_secs_f64(remaining as f64 / rate).ok()
    } else {
        None
    }
}
