//! Lock combinators: the "take a lock, read the record again under it,
//! check it, write it, release the lock" sequence that every runtime
//! action needs, written once with the fault handling it needs.
//!
//! - A write is made only while the lock is surely ours
//!   ([`LockGuard::wait_held`]): while the session is suspended it waits,
//!   once the session is lost it fails with [`StoreError::SessionLost`]
//!   and writes nothing (the record may be someone else's by now).
//! - A write whose outcome is unknown is resolved by reading it back
//!   ([`Store::set_resolved`]).
//! - The record is written at the version read under the lock, so a
//!   writer that ignores the lock cannot be overwritten unseen.
//! - The lock is released however the work ended, retrying through
//!   connection losses ([`LockGuard::release`]); a release that still
//!   fails is logged, since the contender goes with the session anyway.
//!
//! [`Store::with_locked`] is the whole sequence; [`Store::update_locked`]
//! is its middle for work that holds the lock longer (a launch, a build),
//! and [`Store::read`] and [`Store::write_locked`] are its two halves for
//! work that does more between them.

use std::marker::PhantomData;

use super::paths;
use super::{LockGuard, LockWait, Store, StoreError, Versioned};
use crate::model::{ImageBuild, ImageUpload, Node, NodeRequest, WireRecord};

/// Where a typed record lives. Its type fixes how it is decoded.
#[derive(Debug, PartialEq, Eq)]
pub struct RecordKey<T> {
    path: String,
    kind: PhantomData<fn() -> T>,
}

impl<T> Clone for RecordKey<T> {
    fn clone(&self) -> Self {
        RecordKey {
            path: self.path.clone(),
            kind: PhantomData,
        }
    }
}

impl<T> RecordKey<T> {
    /// The record's path.
    pub fn path(&self) -> &str {
        &self.path
    }

    fn at(path: String) -> Self {
        RecordKey {
            path,
            kind: PhantomData,
        }
    }
}

impl RecordKey<Node> {
    /// Node `id`.
    pub fn node(id: &str) -> Self {
        Self::at(paths::node(id))
    }
}

impl RecordKey<NodeRequest> {
    /// Node request `id`.
    pub fn request(id: &str) -> Self {
        Self::at(paths::request(id))
    }
}

impl RecordKey<ImageBuild> {
    /// Build `id` of diskimage `image`.
    pub fn build(image: &str, id: &str) -> Self {
        Self::at(paths::build(image, id))
    }
}

impl RecordKey<ImageUpload> {
    /// Upload `id` of build `build` of `image` to `provider`.
    pub fn upload(image: &str, build: &str, provider: &str, id: &str) -> Self {
        Self::at(paths::upload(image, build, provider, id))
    }
}

/// Which lock guards the work.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LockOf<'a> {
    /// A node's lock, taken as [`Store::lock_node`] takes it: a node that
    /// is gone is [`StoreError::NotFound`].
    Node(&'a str),
    /// A node request's lock (under `/nodepool/requests-lock`).
    Request(&'a str),
    /// Any lock directory (builds and uploads have several).
    Dir(&'a str),
}

/// What a decision makes of a record read under its lock.
#[derive(Clone, Debug, PartialEq)]
pub enum Decision<T, R> {
    /// Write this record at the version read, then return `R`.
    Write(T, R),
    /// Leave the record as it is and return `R`.
    Leave(R),
}

impl Store {
    /// Takes a lock.
    pub async fn lock_for(
        &self,
        lock: LockOf<'_>,
        wait: LockWait,
    ) -> Result<LockGuard, StoreError> {
        match lock {
            LockOf::Node(id) => self.lock_node(id, wait).await,
            LockOf::Request(id) => self.lock_request(id, wait).await,
            LockOf::Dir(dir) => self.lock(dir, wait).await,
        }
    }

    /// Takes a lock without waiting; `Ok(None)` when someone else holds
    /// it (someone else is doing the work).
    pub async fn try_lock_for(&self, lock: LockOf<'_>) -> Result<Option<LockGuard>, StoreError> {
        match self.lock_for(lock, LockWait::NonBlocking).await {
            Ok(g) => Ok(Some(g)),
            Err(StoreError::Locked { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Reads a typed record; `Ok(None)` if it does not exist, and
    /// [`StoreError::Malformed`] if it cannot be decoded.
    pub async fn read<T: WireRecord>(
        &self,
        key: &RecordKey<T>,
    ) -> Result<Option<Versioned<T>>, StoreError> {
        match self.backend().get(key.path()).await? {
            None => Ok(None),
            Some((data, stat)) => T::from_json(&data)
                .map(|value| {
                    Some(Versioned {
                        value,
                        version: stat.version,
                    })
                })
                .map_err(|e| StoreError::Malformed {
                    path: key.path().to_owned(),
                    reason: e.to_string(),
                }),
        }
    }

    /// Writes a record under a lock the caller holds (at `version`, when
    /// given); returns its new version. Waits while the session is
    /// suspended; writes nothing once the lock is lost.
    pub async fn write_locked<T: WireRecord>(
        &self,
        guard: &LockGuard,
        key: &RecordKey<T>,
        value: &T,
        version: Option<i32>,
    ) -> Result<i32, StoreError> {
        if !guard.wait_held().await {
            return Err(StoreError::SessionLost);
        }
        match self
            .set_resolved(key.path(), &value.to_json(), version)
            .await
        {
            // Whatever failed, a lost lock is the reason that matters.
            Err(_) if guard.is_lost() => Err(StoreError::SessionLost),
            other => other,
        }
    }

    /// Reads a record under a lock the caller holds (and keeps), lets
    /// `decide` check it, and writes what it decided at the version read.
    pub async fn update_locked<T: WireRecord, R>(
        &self,
        guard: &LockGuard,
        key: &RecordKey<T>,
        decide: impl FnOnce(Option<Versioned<T>>) -> Decision<T, R>,
    ) -> Result<R, StoreError> {
        let current = self.read(key).await?;
        let version = current.as_ref().map(|c| c.version);
        match decide(current) {
            Decision::Leave(r) => Ok(r),
            Decision::Write(value, r) => {
                let Some(version) = version else {
                    // Nothing was read: there is no version to write at.
                    return Err(StoreError::NotFound {
                        path: key.path().to_owned(),
                    });
                };
                self.write_locked(guard, key, &value, Some(version)).await?;
                Ok(r)
            }
        }
    }

    /// The whole sequence: takes `lock`, reads `key` under it, lets
    /// `decide` check it, writes what it decided at the version read, and
    /// releases the lock however that went.
    pub async fn with_locked<T: WireRecord, R>(
        &self,
        lock: LockOf<'_>,
        wait: LockWait,
        key: &RecordKey<T>,
        decide: impl FnOnce(Option<Versioned<T>>) -> Decision<T, R>,
    ) -> Result<R, StoreError> {
        let guard = self.lock_for(lock, wait).await?;
        let result = self.update_locked(&guard, key, decide).await;
        guard.release_logged().await;
        result
    }
}

impl LockGuard {
    /// Releases the lock (see [`release`](Self::release)); a failure is
    /// logged, not returned: the contender goes with the session at the
    /// latest, and the work it guarded is done either way.
    pub async fn release_logged(self) {
        let dir = self.dir().to_owned();
        if let Err(e) = self.release().await {
            tracing::debug!(lock = %dir, error = %e, "lock release failed (it goes with the session)");
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;
    use crate::model::NodeState;
    use crate::store::MemoryStore;

    fn stores() -> (MemoryStore, Store, Store) {
        let server = MemoryStore::new();
        let ours = server.new_session();
        let theirs = server.new_session();
        (
            ours.clone(),
            Store::new(Arc::new(ours)),
            Store::new(Arc::new(theirs)),
        )
    }

    async fn a_node(store: &Store, state: NodeState) -> String {
        let node = Node::new(state, 0.0, "cloud", "main", vec!["small".into()]);
        store.create_node(&node).await.expect("create")
    }

    /// Marks a ready node used; leaves any other alone.
    fn use_it(cur: Option<Versioned<Node>>) -> Decision<Node, bool> {
        match cur {
            Some(v) if v.value.state == NodeState::Ready => {
                let mut n = v.value;
                n.state = NodeState::Used;
                Decision::Write(n, true)
            }
            _ => Decision::Leave(false),
        }
    }

    async fn state(store: &Store, id: &str) -> Option<NodeState> {
        store
            .get_node(id)
            .await
            .expect("get")
            .map(|v| v.value.state)
    }

    #[tokio::test]
    async fn with_locked_writes_what_was_decided_and_releases() {
        let (_, store, _) = stores();
        let id = a_node(&store, NodeState::Ready).await;
        let key = RecordKey::node(&id);
        let wrote = store
            .with_locked(LockOf::Node(&id), LockWait::NonBlocking, &key, use_it)
            .await;
        assert_eq!(wrote, Ok(true));
        assert_eq!(state(&store, &id).await, Some(NodeState::Used));
        assert!(!store.is_node_locked(&id).await.expect("locked?"));
        // Now it is not ready: left alone, and released again.
        let wrote = store
            .with_locked(LockOf::Node(&id), LockWait::NonBlocking, &key, use_it)
            .await;
        assert_eq!(wrote, Ok(false));
        assert_eq!(
            store.get_node(&id).await.expect("get").map(|v| v.version),
            Some(1),
            "nothing written"
        );
        assert!(!store.is_node_locked(&id).await.expect("locked?"));
    }

    #[tokio::test]
    async fn a_lock_held_elsewhere_is_reported_and_nothing_is_read() {
        let (_, store, other) = stores();
        let id = a_node(&store, NodeState::Ready).await;
        let theirs = other
            .lock_node(&id, LockWait::NonBlocking)
            .await
            .expect("lock");
        let mut called = false;
        let r = store
            .with_locked(
                LockOf::Node(&id),
                LockWait::NonBlocking,
                &RecordKey::node(&id),
                |cur| {
                    called = true;
                    use_it(cur)
                },
            )
            .await;
        assert!(matches!(r, Err(StoreError::Locked { .. })), "{r:?}");
        assert!(!called);
        assert_eq!(
            store
                .try_lock_for(LockOf::Node(&id))
                .await
                .map(|g| g.is_some()),
            Ok(false)
        );
        theirs.release().await.expect("release");
        assert_eq!(state(&store, &id).await, Some(NodeState::Ready));
    }

    #[tokio::test]
    async fn a_write_decided_without_a_record_is_not_found() {
        let (_, store, _) = stores();
        let dir = "/nodepool/requests-lock/100-0000000001";
        let guard = store
            .lock_for(LockOf::Dir(dir), LockWait::NonBlocking)
            .await
            .expect("lock");
        let key = RecordKey::request("100-0000000001");
        let r = store
            .update_locked(&guard, &key, |cur| {
                assert!(cur.is_none());
                Decision::Write(NodeRequest::new(vec![], "x", 0.0), ())
            })
            .await;
        assert!(matches!(r, Err(StoreError::NotFound { .. })), "{r:?}");
        assert!(store.read(&key).await.expect("read").is_none());
        guard.release_logged().await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_write_waits_for_a_suspended_session_and_is_made_when_it_returns() {
        let (client, store, _) = stores();
        let id = a_node(&store, NodeState::Ready).await;
        let key = RecordKey::node(&id);
        let guard = store
            .lock_for(LockOf::Node(&id), LockWait::NonBlocking)
            .await
            .expect("lock");
        let read = store.read(&key).await.expect("read").expect("exists");
        let mut used = read.value;
        used.state = NodeState::Used;
        client.suspend();
        {
            let write = store.write_locked(&guard, &key, &used, Some(read.version));
            tokio::pin!(write);
            // Suspended: the write waits (it neither fails nor lands).
            assert!(
                tokio::time::timeout(Duration::from_secs(30), &mut write)
                    .await
                    .is_err()
            );
            client.resume();
            assert_eq!(write.await, Ok(read.version + 1));
        }
        assert_eq!(state(&store, &id).await, Some(NodeState::Used));
        guard.release_logged().await;
    }

    #[tokio::test(start_paused = true)]
    async fn nothing_is_written_once_the_lock_is_lost() {
        let (client, store, other) = stores();
        let id = a_node(&other, NodeState::Ready).await;
        let guard = store
            .lock_for(LockOf::Node(&id), LockWait::NonBlocking)
            .await
            .expect("lock");
        client.suspend();
        client.expire_session();
        let r = store
            .update_locked(&guard, &RecordKey::node(&id), use_it)
            .await;
        assert_eq!(r, Err(StoreError::SessionLost));
        assert_eq!(state(&other, &id).await, Some(NodeState::Ready));
        // Releasing a lock that went with its session is no failure.
        guard.release_logged().await;
        assert!(!other.is_node_locked(&id).await.expect("locked?"));
    }

    #[tokio::test]
    async fn a_write_at_the_version_read_does_not_overwrite_a_change_made_meanwhile() {
        let (_, store, other) = stores();
        let id = a_node(&store, NodeState::Ready).await;
        let key = RecordKey::node(&id);
        let guard = store
            .lock_for(LockOf::Node(&id), LockWait::NonBlocking)
            .await
            .expect("lock");
        let r = store
            .update_locked(&guard, &key, |cur| {
                let mut n = cur.expect("exists").value;
                n.state = NodeState::Used;
                Decision::Write(n, ())
            })
            .await;
        assert_eq!(r, Ok(()));
        // A writer that ignores the lock changes it between read and write.
        let stale = store.read(&key).await.expect("read").expect("exists");
        let mut hold = stale.value.clone();
        hold.state = NodeState::Hold;
        other.store_node(&id, &hold).await.expect("store");
        let mut deleting = stale.value;
        deleting.state = NodeState::Deleting;
        let r = store
            .write_locked(&guard, &key, &deleting, Some(stale.version))
            .await;
        assert!(matches!(r, Err(StoreError::Conflict { .. })), "{r:?}");
        assert_eq!(state(&store, &id).await, Some(NodeState::Hold));
        guard.release_logged().await;
    }
}
