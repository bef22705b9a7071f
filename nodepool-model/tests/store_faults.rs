//! The typed store and the lock recipe when the store misbehaves: writes
//! whose outcome was not reported, writes made while the connection is
//! down, and locks across a suspended or expired session. On the
//! in-memory store (its fault knobs) and tokio's paused clock.

use std::sync::Arc;
use std::time::Duration;

use nodepool_model::model::{Node, NodeState};
use nodepool_model::store::MemoryStore;
use nodepool_model::store::{LockWait, SessionState, StateStore, Store, StoreError};

fn node() -> Node {
    Node::new(
        NodeState::Building,
        1.0,
        "sim",
        "main",
        vec!["small".into()],
    )
}

#[tokio::test(start_paused = true)]
async fn an_applied_write_reported_as_failed_is_recognised() {
    let client = MemoryStore::new();
    let store = Store::new(Arc::new(client.clone()));
    let id = store.create_node(&node()).await.expect("create");
    let mut n = node();
    n.state = NodeState::Ready;
    client.ambiguous_writes(1);
    let v = store
        .update_node(&id, &n, 0)
        .await
        .expect("resolved as applied");
    assert_eq!(v, 1, "applied once, not twice");
    let back = store.get_node(&id).await.expect("get").expect("exists");
    assert_eq!((back.value.state, back.version), (NodeState::Ready, 1));
}

#[tokio::test(start_paused = true)]
async fn a_write_made_while_disconnected_is_sent_again_once_connected() {
    let client = MemoryStore::new();
    let store = Store::new(Arc::new(client.clone()));
    let id = store.create_node(&node()).await.expect("create");
    client.suspend();
    let resume = {
        let client = client.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(5)).await;
            client.resume();
        })
    };
    let mut n = node();
    n.external_id = Some("server-1".into());
    let v = store
        .update_node(&id, &n, 0)
        .await
        .expect("written after the outage");
    assert_eq!(v, 1);
    resume.await.expect("resume task");
    let back = store.get_node(&id).await.expect("get").expect("exists");
    assert_eq!(back.value.external_id.as_deref(), Some("server-1"));
}

#[tokio::test(start_paused = true)]
async fn another_writer_in_between_is_a_conflict_not_a_success() {
    let client = MemoryStore::new();
    let other = Store::new(Arc::new(client.new_session()));
    let store = Store::new(Arc::new(client.clone()));
    let id = store.create_node(&node()).await.expect("create");
    // Our write is refused while our connection is down; meanwhile
    // another client moves the record on. Once back, ours must not be
    // sent again over theirs, nor reported as done.
    client.suspend();
    let mut ours = node();
    ours.state = NodeState::Ready;
    let write = {
        let store = store.clone();
        let id = id.clone();
        tokio::spawn(async move { store.update_node(&id, &ours, 0).await })
    };
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut theirs = node();
    theirs.state = NodeState::Deleting;
    other.store_node(&id, &theirs).await.expect("their write");
    client.resume();
    let err = write.await.expect("write task");
    assert!(matches!(err, Err(StoreError::Conflict { .. })), "{err:?}");
    let back = store.get_node(&id).await.expect("get").expect("exists");
    assert_eq!(back.value.state, NodeState::Deleting);
}

#[tokio::test(start_paused = true)]
async fn a_store_that_keeps_refusing_gives_up_with_its_error() {
    let client = MemoryStore::new();
    let store = Store::new(Arc::new(client.clone()));
    let id = store.create_node(&node()).await.expect("create");
    client.suspend();
    // Never resumed: the write fails after the reconnection wait, with
    // the store's own error.
    let err = store.update_node(&id, &node(), 0).await;
    assert!(
        matches!(err, Err(StoreError::Unavailable { .. })),
        "{err:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_lock_is_neither_held_nor_lost_while_suspended() {
    let client = MemoryStore::new();
    let store = Store::new(Arc::new(client.clone()));
    let guard = store
        .lock("/nodepool/test/lock", LockWait::NonBlocking)
        .await
        .expect("lock");
    assert!(guard.is_held() && !guard.is_lost());
    client.suspend();
    assert!(!guard.is_held(), "no writes under a suspended lock");
    assert!(!guard.is_lost(), "and no giving up on it either");
    let resume = {
        let client = client.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(3)).await;
            client.resume();
        })
    };
    assert!(guard.wait_held().await, "same session: the lock survived");
    resume.await.expect("resume task");
    client.suspend();
    let expire = {
        let client = client.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(3)).await;
            client.expire_session();
        })
    };
    assert!(!guard.wait_held().await, "expired: the lock is gone");
    assert!(guard.is_lost());
    expire.await.expect("expire task");
    guard
        .release()
        .await
        .expect("releasing a lost lock is a no-op");
}

#[tokio::test(start_paused = true)]
async fn a_release_during_an_outage_happens_when_the_session_is_back() {
    let client = MemoryStore::new();
    let store = Store::new(Arc::new(client.clone()));
    let other = Store::new(Arc::new(client.new_session()));
    let guard = store
        .lock("/nodepool/test/lock", LockWait::NonBlocking)
        .await
        .expect("lock");
    client.suspend();
    let release = tokio::spawn(guard.release());
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        matches!(
            other
                .lock("/nodepool/test/lock", LockWait::NonBlocking)
                .await,
            Err(StoreError::Locked { .. })
        ),
        "still ours while the session may come back"
    );
    client.resume();
    release.await.expect("release task").expect("released");
    let theirs = other
        .lock("/nodepool/test/lock", LockWait::NonBlocking)
        .await
        .expect("free once released: no contender was left behind");
    theirs.release().await.expect("release");
    assert!(matches!(
        *client.session().borrow(),
        SessionState::Connected { .. }
    ));
}
