//! The control channel on a topic: publish, readers from the start or from
//! now, and the history a restarted coordinator reads.

use std::time::Duration;

use ms2m_core::{ControlBody, ControlChannel, ControlMessage, ControlReader, Role};
use ms2m_tests::*;

fn message(migration: &str, reason: &str) -> ControlMessage {
    ControlMessage {
        service: "svc".into(),
        migration_id: migration.into(),
        from: Role::Coordinator,
        sent_at_ms: 1,
        body: ControlBody::Aborted { reason: reason.into() },
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_read_and_history() {
    let service = unique("ctl");
    let cluster = connect(config(&service));
    let control = cluster.control().await.unwrap();
    assert_eq!(control.topic(), format!("{service}.control"));
    assert!(control.history().await.unwrap().is_empty());

    let first = message("m1", "a");
    control.publish(&first).await.unwrap();
    let mut from_now = control.reader(false).await.unwrap();
    let mut from_start = control.reader(true).await.unwrap();
    let second = message("m1", "b");
    control.publish(&second).await.unwrap();

    let t = Duration::from_secs(10);
    assert_eq!(from_start.next(t).await.unwrap(), Some(first.clone()));
    assert_eq!(from_start.next(t).await.unwrap(), Some(second.clone()));
    assert_eq!(from_now.next(t).await.unwrap(), Some(second.clone()));
    assert_eq!(from_now.next(Duration::from_millis(300)).await.unwrap(), None);
    assert_eq!(control.history().await.unwrap(), vec![first, second]);
}
