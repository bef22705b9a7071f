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
//! work that does more between them. [`Store::try_holding`] runs longer
//! work under a lock and releases it however the work ended (unless the
//! work deleted the record and the lock with it: [`Held::Removed`]),
//! [`Store::lock_if`] takes a lock for work that outlives the caller (a
//! deletion task) only when the record read under it still qualifies, and
//! [`Store::update_keeping`] writes under a lock it keeps on success (a
//! request accepted until it is fulfilled).

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

/// What work done under a lock left of the record the lock guards.
#[derive(Clone, Debug, PartialEq)]
pub enum Held<R> {
    /// The record is still there: release the lock.
    Kept(R),
    /// The record was deleted, and the lock directory under it went with
    /// it: there is nothing left to release. Only for locks that live
    /// under their record (a node's, a build's, an upload's).
    Removed(R),
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

    /// Takes `lock`, reads `key` under it and writes what `decide`
    /// decided, like [`with_locked`](Self::with_locked), but keeps the
    /// lock when `decide` says `Ok`: for records held across passes (a
    /// request accepted until it is fulfilled). On any error the lock is
    /// released.
    pub async fn update_keeping<T: WireRecord, R, E: From<StoreError>>(
        &self,
        lock: LockOf<'_>,
        wait: LockWait,
        key: &RecordKey<T>,
        decide: impl FnOnce(Option<Versioned<T>>) -> Decision<T, Result<R, E>>,
    ) -> Result<(LockGuard, R), E> {
        let guard = self.lock_for(lock, wait).await?;
        match self.update_locked(&guard, key, decide).await {
            Ok(Ok(r)) => Ok((guard, r)),
            Ok(Err(e)) => {
                guard.release_logged().await;
                Err(e)
            }
            Err(e) => {
                guard.release_logged().await;
                Err(e.into())
            }
        }
    }

    /// Takes `lock` without waiting and runs `work` holding it; `Ok(None)`
    /// when someone else holds it (someone else is doing the work). The
    /// lock is released however `work` ended, except after
    /// [`Held::Removed`], when it went with the record.
    pub async fn try_holding<R, E: From<StoreError>>(
        &self,
        lock: LockOf<'_>,
        work: impl AsyncFnOnce(&LockGuard) -> Result<Held<R>, E>,
    ) -> Result<Option<R>, E> {
        match self.try_lock_for(lock).await? {
            Some(guard) => guard.hold(work).await.map(Some),
            None => Ok(None),
        }
    }

    /// Takes `lock`, reads `key` under it and hands the lock and the
    /// record over only when `qualifies` accepts what was read: for work
    /// that keeps the lock past the caller (a deletion task). `Ok(None)`
    /// when the record is gone; when `qualifies` refuses, its error. In
    /// both cases the lock is released.
    pub async fn lock_if<T: WireRecord, E: From<StoreError>>(
        &self,
        lock: LockOf<'_>,
        wait: LockWait,
        key: &RecordKey<T>,
        qualifies: impl FnOnce(&T) -> Result<(), E>,
    ) -> Result<Option<(LockGuard, Versioned<T>)>, E> {
        let guard = self.lock_for(lock, wait).await?;
        let checked = match self.read(key).await {
            Ok(None) => {
                guard.release_logged().await;
                return Ok(None);
            }
            Ok(Some(cur)) => qualifies(&cur.value).map(|()| cur),
            Err(e) => Err(e.into()),
        };
        match checked {
            Ok(cur) => Ok(Some((guard, cur))),
            Err(e) => {
                guard.release_logged().await;
                Err(e)
            }
        }
    }
}

impl LockGuard {
    /// Runs `work` holding this lock, then releases it however `work`
    /// ended, except after [`Held::Removed`], when it went with the
    /// record. For locks taken with their own wait or error handling;
    /// [`Store::try_holding`] takes the lock too.
    pub async fn hold<R, E>(
        self,
        work: impl AsyncFnOnce(&LockGuard) -> Result<Held<R>, E>,
    ) -> Result<R, E> {
        match work(&self).await {
            Ok(Held::Removed(r)) => {
                self.forget();
                Ok(r)
            }
            Ok(Held::Kept(r)) => {
                self.release_logged().await;
                Ok(r)
            }
            Err(e) => {
                self.release_logged().await;
                Err(e)
            }
        }
    }

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

    #[tokio::test]
    async fn try_holding_releases_after_work_that_kept_the_record_or_failed() {
        let (_, store, _) = stores();
        let id = a_node(&store, NodeState::Ready).await;
        let r: Result<Option<u8>, StoreError> = store
            .try_holding(LockOf::Node(&id), async |g: &LockGuard| {
                assert!(!g.is_lost());
                Ok(Held::Kept(7))
            })
            .await;
        assert_eq!(r, Ok(Some(7)));
        assert!(!store.is_node_locked(&id).await.expect("locked?"));
        let r: Result<Option<u8>, StoreError> = store
            .try_holding(LockOf::Node(&id), async |_: &LockGuard| {
                Err(StoreError::SessionLost)
            })
            .await;
        assert_eq!(r, Err(StoreError::SessionLost));
        assert!(!store.is_node_locked(&id).await.expect("locked?"));
    }

    #[tokio::test]
    async fn try_holding_skips_work_someone_else_holds_and_forgets_a_removed_record() {
        let (_, store, other) = stores();
        let id = a_node(&store, NodeState::Ready).await;
        let theirs = other
            .lock_node(&id, LockWait::NonBlocking)
            .await
            .expect("lock");
        let mut ran = false;
        let r: Result<Option<()>, StoreError> = store
            .try_holding(LockOf::Node(&id), async |_: &LockGuard| {
                ran = true;
                Ok(Held::Kept(()))
            })
            .await;
        assert_eq!(r, Ok(None));
        assert!(!ran, "the work is someone else's");
        theirs.release().await.expect("release");
        let r: Result<Option<()>, StoreError> = store
            .try_holding(LockOf::Node(&id), async |_: &LockGuard| {
                store.delete_node(&id).await?;
                Ok(Held::Removed(()))
            })
            .await;
        assert_eq!(r, Ok(Some(())));
        assert_eq!(store.get_node(&id).await.expect("get"), None);
    }

    #[tokio::test]
    async fn lock_if_hands_over_the_lock_only_for_a_record_that_qualifies() {
        let (_, store, _) = stores();
        let id = a_node(&store, NodeState::Ready).await;
        let key = RecordKey::node(&id);
        let refused: Result<_, StoreError> = store
            .lock_if(
                LockOf::Node(&id),
                LockWait::NonBlocking,
                &key,
                |n: &Node| {
                    if n.state == NodeState::Hold {
                        Ok(())
                    } else {
                        Err(StoreError::SessionLost)
                    }
                },
            )
            .await;
        assert!(matches!(refused, Err(StoreError::SessionLost)));
        assert!(!store.is_node_locked(&id).await.expect("locked?"));
        let (guard, cur) = store
            .lock_if(
                LockOf::Node(&id),
                LockWait::NonBlocking,
                &key,
                |_: &Node| Ok::<(), StoreError>(()),
            )
            .await
            .expect("lock_if")
            .expect("the record is there");
        assert_eq!(cur.value.state, NodeState::Ready);
        assert!(store.is_node_locked(&id).await.expect("locked?"));
        guard.release_logged().await;
        // A record gone under its lock: nothing handed over, nothing held.
        let dir = "/nodepool/requests-lock/100-0000000009";
        let gone: Result<_, StoreError> = store
            .lock_if(
                LockOf::Dir(dir),
                LockWait::NonBlocking,
                &RecordKey::request("100-0000000009"),
                |_: &NodeRequest| Ok(()),
            )
            .await;
        assert!(matches!(gone, Ok(None)));
        assert_eq!(
            store
                .try_lock_for(LockOf::Dir(dir))
                .await
                .map(|g| g.map(|g| g.forget()).is_some()),
            Ok(true),
            "the lock was released"
        );
    }

    #[tokio::test]
    async fn update_keeping_keeps_the_lock_only_when_the_decision_is_ok() {
        let (_, store, _) = stores();
        let id = a_node(&store, NodeState::Ready).await;
        let key = RecordKey::node(&id);
        let decide = |cur: Option<Versioned<Node>>| match cur {
            Some(v) if v.value.state == NodeState::Ready => {
                let mut n = v.value;
                n.state = NodeState::Used;
                Decision::Write(n, Ok(()))
            }
            _ => Decision::Leave(Err(StoreError::SessionLost)),
        };
        let (guard, ()) = store
            .update_keeping(LockOf::Node(&id), LockWait::NonBlocking, &key, decide)
            .await
            .expect("kept");
        assert_eq!(state(&store, &id).await, Some(NodeState::Used));
        assert!(store.is_node_locked(&id).await.expect("locked?"));
        guard.release_logged().await;
        // Not ready any more: refused, nothing written, lock released.
        let refused = store
            .update_keeping(LockOf::Node(&id), LockWait::NonBlocking, &key, decide)
            .await;
        assert!(matches!(refused, Err(StoreError::SessionLost)));
        assert!(!store.is_node_locked(&id).await.expect("locked?"));
        assert_eq!(
            store.get_node(&id).await.expect("get").map(|v| v.version),
            Some(1)
        );
    }
}
