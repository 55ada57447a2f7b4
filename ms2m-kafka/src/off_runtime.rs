//! Closing librdkafka clients off the async runtime.
//!
//! Dropping an rdkafka client blocks its thread: a consumer with a group
//! closes its queue and polls until it is closed, then every client joins
//! librdkafka's threads; a producer first purges and flushes for up to
//! 500 ms. On a tokio worker that is a stall of every task the worker
//! runs. A host of many task nodes on a 2-core runtime showed it from
//! outside: when three of its tasks cut over to another host at once,
//! dropping their sources' clients stalled the outputs of every task the
//! host kept, for 350–450 ms. [`OffRuntime`] holds a client and, dropped
//! inside a runtime, hands it to the blocking pool instead.

use std::ops::Deref;

/// A client that is dropped on tokio's blocking pool when dropped inside a
/// runtime (inline elsewhere). Derefs to the client.
#[derive(Clone)]
pub(crate) struct OffRuntime<T: Send + 'static>(Option<T>);

impl<T: Send + 'static> OffRuntime<T> {
    pub(crate) fn new(client: T) -> Self {
        Self(Some(client))
    }
}

impl<T: Send + 'static> Deref for OffRuntime<T> {
    type Target = T;

    fn deref(&self) -> &T {
        self.0.as_ref().expect("an OffRuntime holds its client until dropped")
    }
}

impl<T: Send + 'static> Drop for OffRuntime<T> {
    fn drop(&mut self) {
        let Some(client) = self.0.take() else { return };
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => drop(runtime.spawn_blocking(move || drop(client))),
            Err(_) => drop(client),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};
    use std::thread::ThreadId;

    use super::OffRuntime;

    /// Records the thread it is dropped on.
    struct Probe(Arc<Mutex<Option<ThreadId>>>);

    impl Drop for Probe {
        fn drop(&mut self) {
            *self.0.lock().unwrap() = Some(std::thread::current().id());
        }
    }

    #[test]
    fn outside_a_runtime_it_drops_inline() {
        let on: Arc<Mutex<Option<ThreadId>>> = Arc::default();
        drop(OffRuntime::new(Probe(Arc::clone(&on))));
        assert_eq!(*on.lock().unwrap(), Some(std::thread::current().id()));
    }

    #[tokio::test]
    async fn inside_a_runtime_it_drops_on_the_blocking_pool() {
        let on: Arc<Mutex<Option<ThreadId>>> = Arc::default();
        drop(OffRuntime::new(Probe(Arc::clone(&on))));
        let dropped_on = loop {
            if let Some(id) = *on.lock().unwrap() {
                break id;
            }
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        };
        assert_ne!(
            dropped_on,
            std::thread::current().id(),
            "dropped on the runtime's thread"
        );
    }
}
