//! kazoo's exclusive lock recipe, over any [`StateStore`].
//!
//! A contender is an ephemeral sequential child `<uuid4 hex>__lock__<seq10>`
//! of the lock directory; the lowest sequence owns the lock; a waiter waits
//! for its immediate predecessor to go. Python Nodepool and Zuul use exactly
//! this recipe, so they and we exclude each other on the same paths.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::broadcast::error::RecvError;

use super::paths::lock_contender_sequence;
use super::{CreateMode, MultiOp, MultiResult, SessionState, StateStore, StoreError, StoreEvent};

/// How long to wait for a lock.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LockWait {
    /// Fail at once with [`StoreError::Locked`] if someone else holds it
    /// (kazoo's `blocking=False`).
    NonBlocking,
    /// Wait up to this long, then fail with [`StoreError::Timeout`].
    Timeout(Duration),
    /// Wait as long as it takes.
    Forever,
}

/// A held lock. Release it with [`LockGuard::release`]; dropping it also
/// releases it, in a background task.
///
/// A lock lives as long as the session that took it. While that session
/// is suspended (connection lost, may come back) the lock is neither
/// surely held ([`is_held`](Self::is_held) is false: lock-guarded work
/// must not write) nor lost ([`is_lost`](Self::is_lost) is false: the work
/// must not be abandoned either, or the node stays locked by a live
/// session with nobody working on it). [`wait_held`](Self::wait_held)
/// tells which it turns out to be.
#[derive(Debug)]
pub struct LockGuard {
    store: Arc<dyn StateStore>,
    dir: String,
    contender: String,
    session_id: i64,
    released: bool,
}

impl LockGuard {
    /// The lock directory.
    pub fn dir(&self) -> &str {
        &self.dir
    }

    /// Our contender's path.
    pub fn contender(&self) -> &str {
        &self.contender
    }

    /// The session the lock belongs to.
    pub fn session_id(&self) -> i64 {
        self.session_id
    }

    /// Whether the lock is surely ours now: our session is the one that
    /// took it and is connected. A suspended session may still come back,
    /// but work guarded by the lock must not write meanwhile.
    pub fn is_held(&self) -> bool {
        matches!(*self.store.session().borrow(), SessionState::Connected { id } if id == self.session_id)
    }

    /// Whether the lock is surely gone: the session that took it expired,
    /// was replaced or closed. False while it is only suspended.
    pub fn is_lost(&self) -> bool {
        !self.store.session().borrow().may_be_alive(self.session_id)
    }

    /// Waits while the session is suspended; true once it is connected
    /// again with the same id (the lock survived), false when it is lost.
    /// The stores bound the wait: a ZooKeeper client declares its session
    /// expired when it cannot reconnect in time, a SQLite lease lapses.
    pub async fn wait_held(&self) -> bool {
        await_session(self.store.as_ref(), self.session_id).await
    }

    /// Releases the lock now (deletes our contender). When the store is
    /// unreachable for a moment, waits for the session to come back and
    /// deletes it then: a contender left behind by a live session would
    /// keep the lock taken until the process ends. A lost session took
    /// the contender with it, so that is success too.
    pub async fn release(mut self) -> Result<(), StoreError> {
        self.released = true;
        delete_contender(self.store.as_ref(), &self.contender, self.session_id).await
    }

    /// Gives up the guard without deleting the contender (it goes when the
    /// session ends). Used when the record under the lock was deleted with it.
    pub fn forget(mut self) {
        self.released = true;
    }
}

impl Drop for LockGuard {
    fn drop(&mut self) {
        if self.released {
            return;
        }
        let store = self.store.clone();
        let contender = std::mem::take(&mut self.contender);
        let session = self.session_id;
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            handle.spawn(async move {
                let _ = delete_contender(store.as_ref(), &contender, session).await;
            });
        }
    }
}

/// Waits while session `id` is suspended: true once it is connected
/// again, false once it expired, was replaced or closed.
pub async fn await_session(store: &dyn StateStore, id: i64) -> bool {
    let mut rx = store.session();
    loop {
        let state = *rx.borrow_and_update();
        match state {
            SessionState::Connected { id: s } if s == id => return true,
            SessionState::Suspended { id: s } if s == id => {}
            _ => return false,
        }
        if rx.changed().await.is_err() {
            return false;
        }
    }
}

/// Pause between attempts at a write the store could not take (ZooKeeper
/// unreachable, SQLite disk full) while the session still looks alive.
pub(crate) fn retry_pause(attempt: u32) -> Duration {
    Duration::from_millis(100u64 << attempt.min(4))
}

/// Deletes a lock contender of session `session`, retrying through
/// connection losses for as long as that session may be alive.
async fn delete_contender(
    store: &dyn StateStore,
    contender: &str,
    session: i64,
) -> Result<(), StoreError> {
    let mut attempt = 0;
    loop {
        match store.delete(contender, None).await {
            Ok(()) | Err(StoreError::NotFound { .. }) | Err(StoreError::SessionLost) => {
                return Ok(());
            }
            Err(StoreError::Unavailable { .. } | StoreError::Timeout { .. }) => {
                if !await_session(store, session).await {
                    // Ephemeral: it went with its session.
                    return Ok(());
                }
                tokio::time::sleep(retry_pause(attempt)).await;
                attempt += 1;
            }
            Err(e) => return Err(e),
        }
    }
}

fn contenders(children: &[String]) -> Vec<(i64, &str)> {
    let mut v: Vec<(i64, &str)> = children
        .iter()
        .filter_map(|c| lock_contender_sequence(c).map(|s| (s, c.as_str())))
        .collect();
    v.sort();
    v
}

/// Takes the lock at `dir` in one round trip when `dir` does not exist
/// yet: the directory and our contender are created together, so ours is
/// its only (lowest) contender and the queue need not be listed. The
/// layout is kazoo's, as [`acquire`] makes it. `Ok(None)` when `dir`
/// exists (or its parent is missing, or the store cannot do this): take
/// the lock with [`acquire`] then.
pub async fn acquire_new(
    store: &Arc<dyn StateStore>,
    dir: &str,
    data: &[u8],
) -> Result<Option<LockGuard>, StoreError> {
    let Some(session_id) = store.session().borrow().id() else {
        return Err(StoreError::SessionLost);
    };
    let prefix = format!("{dir}/{}__lock__", uuid::Uuid::new_v4().simple());
    match store
        .create_dir_with_child(dir, &prefix, data, CreateMode::EphemeralSequential)
        .await
    {
        Ok(Some(contender)) => Ok(Some(LockGuard {
            store: store.clone(),
            dir: dir.to_owned(),
            contender,
            session_id,
            released: false,
        })),
        Ok(None) => Ok(None),
        Err(e @ (StoreError::Unavailable { .. } | StoreError::Timeout { .. })) => {
            // As in `acquire`: the multi may have been applied, leaving a
            // contender of our live session that would hold the lock.
            remove_lost_contender(store.as_ref(), dir, &prefix, session_id).await;
            Err(e)
        }
        Err(e) => Err(e),
    }
}

/// [`acquire_new`], with `then` applied in the same transaction: the lock
/// directory, our contender and `then` are all made, or none of them. So
/// a record written by `then` is never seen changed without its lock
/// held (one round trip for lock and write). The layout is kazoo's, as
/// with [`acquire_new`]. `Ok(None)` when nothing was done because `dir`
/// exists (or its parent is missing, or the store cannot apply a
/// transaction): take the lock with [`acquire`] then. An error of an
/// operation of `then` is returned as it is (nothing was applied). Returns
/// the results of `then`'s operations.
pub async fn acquire_new_with(
    store: &Arc<dyn StateStore>,
    dir: &str,
    data: &[u8],
    then: &[MultiOp<'_>],
) -> Result<Option<(LockGuard, Vec<MultiResult>)>, StoreError> {
    let Some(session_id) = store.session().borrow().id() else {
        return Err(StoreError::SessionLost);
    };
    let prefix = format!("{dir}/{}__lock__", uuid::Uuid::new_v4().simple());
    let mut ops = Vec::with_capacity(2 + then.len());
    ops.push(MultiOp::Create {
        path: dir,
        data: b"",
        mode: CreateMode::Persistent,
    });
    ops.push(MultiOp::Create {
        path: &prefix,
        data,
        mode: CreateMode::EphemeralSequential,
    });
    ops.extend_from_slice(then);
    match store.multi(&ops).await {
        Ok(Some(mut results)) => {
            let contender = match results.get(1) {
                Some(MultiResult::Created(path)) => path.clone(),
                other => {
                    return Err(StoreError::Other(format!(
                        "{prefix}: unexpected transaction result {other:?}"
                    )));
                }
            };
            let rest = results.split_off(2);
            Ok(Some((
                LockGuard {
                    store: store.clone(),
                    dir: dir.to_owned(),
                    contender,
                    session_id,
                    released: false,
                },
                rest,
            )))
        }
        Ok(None) => Ok(None),
        Err(StoreError::Conflict { path, .. } | StoreError::NotFound { path }) if path == dir => {
            Ok(None)
        }
        Err(e @ (StoreError::Unavailable { .. } | StoreError::Timeout { .. })) => {
            // As in `acquire`: the transaction may have been applied,
            // leaving a contender of our live session that would hold the
            // lock. What `then` wrote stays, unlocked, as after a crash.
            remove_lost_contender(store.as_ref(), dir, &prefix, session_id).await;
            Err(e)
        }
        Err(e) => Err(e),
    }
}

/// Takes the lock at `dir` (created if missing). `data` is the contender's
/// data: empty for Nodepool's locks, `<hostname>-<pid>` for elections.
pub async fn acquire(
    store: &Arc<dyn StateStore>,
    dir: &str,
    wait: LockWait,
    data: &[u8],
) -> Result<LockGuard, StoreError> {
    let Some(session_id) = store.session().borrow().id() else {
        return Err(StoreError::SessionLost);
    };
    // Subscribe before creating, so no deletion of a predecessor is missed.
    let mut events = store.subscribe();
    let prefix = format!("{dir}/{}__lock__", uuid::Uuid::new_v4().simple());
    let contender = match store
        .create(&prefix, data, CreateMode::EphemeralSequential)
        .await
    {
        Ok(c) => c,
        Err(e @ (StoreError::Unavailable { .. } | StoreError::Timeout { .. })) => {
            // The create may have been applied: a contender of our live
            // session would hold the lock for ever. kazoo's recipe names
            // contenders with a fresh uuid for exactly this: find ours by
            // it once the session is back, and take it away.
            remove_lost_contender(store.as_ref(), dir, &prefix, session_id).await;
            return Err(e);
        }
        Err(e) => return Err(e),
    };
    let our_name = contender.rsplit('/').next().unwrap_or_default().to_owned();
    let deadline = match wait {
        LockWait::Timeout(d) => Some(tokio::time::Instant::now() + d),
        _ => None,
    };
    let guard = LockGuard {
        store: store.clone(),
        dir: dir.to_owned(),
        contender: contender.clone(),
        session_id,
        released: false,
    };
    loop {
        let children = match store.children(dir).await {
            Ok(c) => c,
            Err(e) => {
                let _ = guard.release().await;
                return Err(e);
            }
        };
        let queue = contenders(&children);
        let Some(pos) = queue.iter().position(|(_, n)| *n == our_name) else {
            // Our contender vanished: the session expired under us.
            let mut guard = guard;
            guard.released = true;
            return Err(StoreError::SessionLost);
        };
        if pos == 0 {
            return Ok(guard);
        }
        if wait == LockWait::NonBlocking {
            let _ = guard.release().await;
            return Err(StoreError::Locked {
                path: dir.to_owned(),
            });
        }
        let predecessor = format!("{dir}/{}", queue[pos - 1].1);
        // Wait until the predecessor is gone (or anything that may mean so).
        loop {
            let next = match deadline {
                Some(d) => match tokio::time::timeout_at(d, events.recv()).await {
                    Ok(r) => r,
                    Err(_) => {
                        let _ = guard.release().await;
                        return Err(StoreError::Timeout {
                            what: format!("lock {dir}"),
                        });
                    }
                },
                None => events.recv().await,
            };
            match next {
                Ok(StoreEvent::Deleted(p)) if p == predecessor || p == contender => break,
                Ok(_) => continue,
                Err(RecvError::Lagged(_)) => break,
                Err(RecvError::Closed) => {
                    let mut guard = guard;
                    guard.released = true;
                    return Err(StoreError::SessionLost);
                }
            }
        }
    }
}

/// Deletes the contender with name prefix `prefix` that an ambiguous
/// create may have left in `dir`, once session `session` is back. Nothing
/// to do when the session is lost: the contender went with it.
async fn remove_lost_contender(store: &dyn StateStore, dir: &str, prefix: &str, session: i64) {
    let name_prefix = prefix.rsplit('/').next().unwrap_or_default();
    let mut attempt = 0;
    while await_session(store, session).await {
        match store.children(dir).await {
            Ok(children) => {
                for c in children.iter().filter(|c| c.starts_with(name_prefix)) {
                    let _ = delete_contender(store, &format!("{dir}/{c}"), session).await;
                }
                return;
            }
            Err(StoreError::NotFound { .. }) => return,
            Err(StoreError::Unavailable { .. } | StoreError::Timeout { .. }) if attempt < 10 => {
                tokio::time::sleep(retry_pause(attempt)).await;
                attempt += 1;
            }
            Err(e) => {
                tracing::warn!(dir, error = %e, "could not look for a lock contender left by a failed create");
                return;
            }
        }
    }
}

/// Whether anyone holds or waits for the lock at `dir`.
pub async fn is_locked(store: &dyn StateStore, dir: &str) -> Result<bool, StoreError> {
    match store.children(dir).await {
        Ok(children) => Ok(!contenders(&children).is_empty()),
        Err(StoreError::NotFound { .. }) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Breaks a lock by deleting its lowest contender (Nodepool's
/// `forceUnlockNode`). Returns whether a contender was deleted.
pub async fn force_unlock(store: &dyn StateStore, dir: &str) -> Result<bool, StoreError> {
    let children = match store.children(dir).await {
        Ok(c) => c,
        Err(StoreError::NotFound { .. }) => return Ok(false),
        Err(e) => return Err(e),
    };
    let queue = contenders(&children);
    let Some((_, lowest)) = queue.first() else {
        return Ok(false);
    };
    match store.delete(&format!("{dir}/{lowest}"), None).await {
        Ok(()) => Ok(true),
        Err(StoreError::NotFound { .. }) => Ok(false),
        Err(e) => Err(e),
    }
}
