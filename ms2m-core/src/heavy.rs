//! State-sized work off the apply loops, a bounded amount at a time.
//!
//! Digesting a frozen copy of the state takes time proportional to the
//! state. On a runtime worker it stalls every task that worker runs — in a
//! host of many task nodes, tasks that have nothing to do with the one
//! being moved. It runs on tokio's blocking pool instead, and at most
//! `available_parallelism − 1` such jobs at once per process (at least
//! one): a host that moves eight tasks at once digests a few at a time
//! and keeps a core for the apply loops. (A state that does not freeze is
//! still encoded and digested on its apply loop: there is no copy to hand
//! off.) Encoding and decoding a streamed snapshot
//! ([`streamed`](crate::streamed)) hold a slot too, but give it back while
//! they wait for the store: they are paced by its transfer, seconds on a
//! slow broker, and would otherwise hold up every other job that long.
//!
//! The cost: such jobs queue behind each other; on a machine of one or two
//! cores, one runs at a time.

use std::num::NonZeroUsize;
use std::sync::{Arc, OnceLock};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinError;

/// The slots, and how many there are.
static SLOTS: OnceLock<(usize, Arc<Semaphore>)> = OnceLock::new();

fn slots_and_semaphore() -> &'static (usize, Arc<Semaphore>) {
    SLOTS.get_or_init(|| {
        let cores = std::thread::available_parallelism().map_or(2, NonZeroUsize::get);
        let slots = cores.saturating_sub(1).max(1);
        (slots, Arc::new(Semaphore::new(slots)))
    })
}

/// How many state-sized jobs run at once in this process.
pub fn slots() -> usize {
    slots_and_semaphore().0
}

fn semaphore() -> Arc<Semaphore> {
    Arc::clone(&slots_and_semaphore().1)
}

/// Runs `work` on the blocking pool once a slot is free; the slot is held
/// until `work` returns, even if the caller stops waiting.
pub(crate) async fn off_loop<T, F>(work: F) -> Result<T, JoinError>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    let slot = semaphore()
        .acquire_owned()
        .await
        .expect("the semaphore is never closed");
    tokio::task::spawn_blocking(move || {
        let _slot = slot;
        work()
    })
    .await
}

/// A slot held by a job on the blocking pool that also waits for I/O: it
/// gives the slot back while it waits.
pub(crate) struct Slot(Option<OwnedSemaphorePermit>);

impl Slot {
    /// Waits for a slot. Call on the blocking pool (it blocks the thread).
    pub(crate) fn acquire_blocking() -> Self {
        Self(Some(take_blocking()))
    }

    /// Runs `wait` without the slot, then waits for one again.
    pub(crate) fn released_while<T>(&mut self, wait: impl FnOnce() -> T) -> T {
        self.0 = None;
        let out = wait();
        self.0 = Some(take_blocking());
        out
    }
}

fn take_blocking() -> OwnedSemaphorePermit {
    tokio::runtime::Handle::current()
        .block_on(semaphore().acquire_owned())
        .expect("the semaphore is never closed")
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    use super::{off_loop, slots};

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn no_more_jobs_run_at_once_than_there_are_slots() {
        let (running, most) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let jobs: Vec<_> = (0..slots() + 3)
            .map(|_| {
                let (running, most) = (Arc::clone(&running), Arc::clone(&most));
                tokio::spawn(off_loop(move || {
                    let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                    most.fetch_max(now, Ordering::SeqCst);
                    std::thread::sleep(Duration::from_millis(20));
                    running.fetch_sub(1, Ordering::SeqCst);
                }))
            })
            .collect();
        for job in jobs {
            job.await.unwrap().unwrap();
        }
        // Other tests of this process may hold slots meanwhile: at most.
        assert!(most.load(Ordering::SeqCst) <= slots(), "more jobs at once than slots");
    }
}
