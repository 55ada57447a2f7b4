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

use crate::broker::KafkaCluster;

/// A client that is dropped on tokio's blocking pool when dropped inside a
/// runtime (inline elsewhere). Derefs to the client; not `Clone` (clone the
/// client itself: only the last handle's drop closes it). It holds a
/// handle on the cluster and lets it go after the client, so an embedded
/// broker is not shut down under a client still closing.
pub(crate) struct OffRuntime<T: Send + 'static>(Option<(T, KafkaCluster)>);

impl<T: Send + 'static> OffRuntime<T> {
    pub(crate) fn new(client: T, cluster: &KafkaCluster) -> Self {
        Self(Some((client, cluster.clone())))
    }
}

impl<T: Send + 'static> Deref for OffRuntime<T> {
    type Target = T;

    fn deref(&self) -> &T {
        &self.0.as_ref().expect("an OffRuntime holds its client until dropped").0
    }
}

impl<T: Send + 'static> Drop for OffRuntime<T> {
    fn drop(&mut self) {
        let Some((client, cluster)) = self.0.take() else { return };
        let close = move || {
            drop(client);
            drop(cluster);
        };
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => drop(runtime.spawn_blocking(close)),
            Err(_) => close(),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};
    use std::thread::ThreadId;

    use super::OffRuntime;
    use crate::{KafkaCluster, KafkaConfig};

    /// Records the thread it is dropped on.
    struct Probe(Arc<Mutex<Option<ThreadId>>>);

    impl Drop for Probe {
        fn drop(&mut self) {
            *self.0.lock().unwrap() = Some(std::thread::current().id());
        }
    }

    fn cluster() -> KafkaCluster {
        KafkaCluster::connect(KafkaConfig::new("off-runtime").bootstrap_servers("127.0.0.1:1")).expect("a config")
    }

    #[test]
    fn outside_a_runtime_it_drops_inline() {
        let on: Arc<Mutex<Option<ThreadId>>> = Arc::default();
        drop(OffRuntime::new(Probe(Arc::clone(&on)), &cluster()));
        assert_eq!(*on.lock().unwrap(), Some(std::thread::current().id()));
    }

    #[tokio::test]
    async fn inside_a_runtime_it_drops_on_the_blocking_pool() {
        let on: Arc<Mutex<Option<ThreadId>>> = Arc::default();
        drop(OffRuntime::new(Probe(Arc::clone(&on)), &cluster()));
        let dropped_on = tokio::time::timeout(std::time::Duration::from_secs(10), async {
            loop {
                if let Some(id) = *on.lock().unwrap() {
                    break id;
                }
                tokio::time::sleep(std::time::Duration::from_millis(1)).await;
            }
        })
        .await
        .expect("dropped within 10 s");
        assert_ne!(
            dropped_on,
            std::thread::current().id(),
            "dropped on the runtime's thread"
        );
    }
}
