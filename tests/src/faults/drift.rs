//! The services the scenarios run: [`Summer`], and [`Drifting`], a Summer
//! whose replay is not deterministic while the drift switch is on (the
//! divergence a migration's digest check must catch).

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};

use async_trait::async_trait;
use ms2m_core::codec::{CodecError, Json};
use ms2m_core::{ApplyContext, ServiceState, StateDigest, StateError, StatefulService};

use crate::Summer;

/// A service whose final state can be compared with the reference fold.
pub trait Folds: StatefulService {
    fn summer(&self) -> &Summer;
}

impl Folds for Summer {
    fn summer(&self) -> &Summer {
        self
    }
}

/// On while a divergence scenario's target replays (process-wide).
static DRIFT: AtomicBool = AtomicBool::new(false);
/// Serializes the scenarios that use [`DRIFT`].
static DRIFT_LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// [`Summer`] that counts one message twice when it replays while the
/// drift switch is on.
#[derive(Default)]
pub struct Drifting(Summer);

/// The drift switch held by one scenario; turned off when dropped.
pub struct DriftSwitch(#[allow(dead_code)] tokio::sync::MutexGuard<'static, ()>);

impl Drifting {
    /// Waits until no other scenario holds the drift switch.
    pub async fn exclusive() -> DriftSwitch {
        DriftSwitch(DRIFT_LOCK.lock().await)
    }
}

/// Turns drift on or off (only a [`DriftSwitch`] holder may turn it on).
pub fn set_drift(on: bool) {
    DRIFT.store(on, Ordering::SeqCst);
}

impl Drop for DriftSwitch {
    fn drop(&mut self) {
        set_drift(false);
    }
}

impl ServiceState for Drifting {
    const SCHEMA_VERSION: u32 = Summer::SCHEMA_VERSION;
    fn snapshot(&self) -> Result<Vec<u8>, CodecError> {
        self.0.snapshot()
    }
    fn restore(version: u32, bytes: &[u8]) -> Result<Self, StateError> {
        Summer::restore(version, bytes).map(Drifting)
    }
    fn digest(&self) -> StateDigest {
        self.0.digest()
    }
}

#[async_trait]
impl StatefulService for Drifting {
    const NAME: &'static str = Summer::NAME;
    type Message = u64;
    type Format = Json;
    type Error = Infallible;
    async fn apply(&mut self, v: u64, ctx: &mut ApplyContext<'_>) -> Result<(), Infallible> {
        let drift = ctx.is_replaying() && DRIFT.load(Ordering::SeqCst);
        let partition = ctx.partition();
        self.0.apply(v, ctx).await?;
        if drift {
            self.0.partitions.entry(partition).or_default().count += 1;
        }
        Ok(())
    }
}

impl Folds for Drifting {
    fn summer(&self) -> &Summer {
        &self.0
    }
}
