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
use super::{CreateMode, SessionState, StateStore, StoreError, StoreEvent};

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

    /// Whether the lock is still ours: our session is the one that took it
    /// and is connected. A suspended session may still come back, but work
    /// guarded by the lock must not continue meanwhile.
    pub fn is_held(&self) -> bool {
        matches!(*self.store.session().borrow(), SessionState::Connected { id } if id == self.session_id)
    }

    /// Releases the lock now (deletes our contender).
    pub async fn release(mut self) -> Result<(), StoreError> {
        self.released = true;
        match self.store.delete(&self.contender, None).await {
            Ok(()) | Err(StoreError::NotFound { .. }) | Err(StoreError::SessionLost) => Ok(()),
            Err(e) => Err(e),
        }
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
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            handle.spawn(async move {
                let _ = store.delete(&contender, None).await;
            });
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
    let contender = store
        .create(&prefix, data, CreateMode::EphemeralSequential)
        .await?;
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
