//! Sessions: ZooKeeper's session semantics over a row with a lease.
//!
//! A handle's session is a row in `sessions` whose `expires_ms` its worker
//! thread pushes forward every third of the lease; the handle's own writes
//! push it too when a renewal is due (a busy writer holds the write lock so
//! often that its worker could starve waiting for it). Every process checks
//! the table (on each write and every `sweep_interval`) and expires the
//! sessions whose lease ran out: their ephemeral records, including lock
//! contenders, are deleted in the same transaction as the row, so the
//! locks of a process killed with SIGKILL free up a lease later, as with
//! ZooKeeper.
//!
//! A process notices that its own lease lapsed (it was stopped, or starved,
//! for longer than the lease) before using the session again: from its
//! local copy of the expiry (checked before every operation and every poll)
//! or from the row (gone, or past its expiry, when a write or renewal looks
//! at it). It then reports [`SessionState::Expired`], deletes what the
//! session owned if nobody has yet, and shortly after starts a new session
//! ([`SessionState::Connected`] with a new id), as a ZooKeeper client does
//! after expiry. Operations that were in flight, and those made before the
//! new session is up, fail with [`StoreError::SessionLost`].

use nodepool_model::store::{SessionState, StoreError};
use rusqlite::Connection;

use crate::db::{Txn, now_ms, sql_error};
use crate::store::{Shared, lock};

/// What this handle knows about its session.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct SessionInfo {
    /// The session's id (its row in `sessions`).
    pub id: i64,
    /// Reported state.
    pub state: SessionState,
    /// Lease end as last written, epoch ms.
    pub expires_ms: i64,
    /// When it was last renewed, epoch ms; when it expired, once expired.
    pub renewed_ms: i64,
}

/// How long a handle stays [`SessionState::Expired`] before it starts a new
/// session: long enough that watchers of the session state see the expiry
/// (a `watch` channel only keeps the latest state) and stop lock-guarded
/// work, short against any lease.
pub(crate) const RECONNECT_DELAY_MS: i64 = 200;

/// What the worker should do about the session now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Due {
    /// Nothing yet.
    Nothing,
    /// Push the lease forward.
    Renew,
    /// The lease ran out: the session is gone.
    Lapsed,
    /// The session expired earlier and no new one could be started yet.
    Reconnect,
}

impl SessionInfo {
    /// Pure decision from the state and the time, so it is tested without
    /// any clock.
    pub(crate) fn due(&self, now: i64, renew_every_ms: i64) -> Due {
        match self.state {
            SessionState::Closed => Due::Nothing,
            SessionState::Expired if now - self.renewed_ms >= RECONNECT_DELAY_MS => Due::Reconnect,
            SessionState::Expired => Due::Nothing,
            SessionState::Connected { .. } | SessionState::Suspended { .. } => {
                if now > self.expires_ms {
                    Due::Lapsed
                } else if matches!(self.state, SessionState::Suspended { .. })
                    || now - self.renewed_ms >= renew_every_ms
                    // The wall clock went back: renew so the lease is
                    // measured from the new "now".
                    || now < self.renewed_ms
                {
                    Due::Renew
                } else {
                    Due::Nothing
                }
            }
        }
    }

    /// Whether operations may use the session.
    fn live(&self) -> bool {
        matches!(
            self.state,
            SessionState::Connected { .. } | SessionState::Suspended { .. }
        )
    }
}

impl Shared {
    /// The session id an operation runs under, after checking locally that
    /// its lease has not run out.
    pub(crate) fn session_for_op(&self) -> Result<i64, StoreError> {
        let info = *lock(&self.session);
        if !info.live() {
            return Err(StoreError::SessionLost);
        }
        if now_ms() > info.expires_ms {
            let mut conn = lock(&self.writer);
            self.lapse(&mut conn, info.id);
            return Err(StoreError::SessionLost);
        }
        Ok(info.id)
    }

    /// Our session `old` lapsed: report it, delete what it owned and start
    /// a new one. Does nothing if `old` is no longer the live session.
    pub(crate) fn lapse(&self, conn: &mut Connection, old: i64) {
        let _transition = lock(&self.transition);
        self.lapse_locked(conn, old);
    }

    fn lapse_locked(&self, conn: &mut Connection, old: i64) {
        {
            let mut info = lock(&self.session);
            if info.id != old || !info.live() {
                return;
            }
            info.state = SessionState::Expired;
            info.renewed_ms = now_ms();
        }
        tracing::warn!(
            store = %self.label,
            session = old,
            "session lease lapsed (the process stopped renewing it for longer than the lease): \
             its locks and ephemeral records are gone"
        );
        // Another process's sweep may already have done this; if it fails
        // here, theirs will, since the lease has run out.
        let cleanup = Txn::begin(conn).and_then(|mut t| {
            t.expire_session(old)?;
            t.commit()
        });
        match cleanup {
            Ok(logged) => {
                if logged {
                    self.nudge();
                }
            }
            Err(e) => tracing::warn!(
                store = %self.label,
                session = old,
                error = %e,
                "could not delete the lapsed session's records; other processes' sweeps will"
            ),
        }
        self.session_tx.send_replace(SessionState::Expired);
        // The worker starts the new session after RECONNECT_DELAY_MS.
        self.nudge();
    }

    /// Starts a new session after an expiry (the worker calls this).
    pub(crate) fn reconnect(&self, conn: &mut Connection) -> Result<(), StoreError> {
        let _transition = lock(&self.transition);
        if lock(&self.session).state != SessionState::Expired {
            return Ok(());
        }
        self.reconnect_locked(conn)
    }

    fn reconnect_locked(&self, conn: &mut Connection) -> Result<(), StoreError> {
        let lease = self.options.lease_ms();
        let opened = Txn::begin(conn).and_then(|mut t| {
            let now = t.now;
            let (id, expires) = t.open_session(lease)?;
            t.commit()?;
            Ok((id, expires, now))
        });
        let (id, expires, now) = opened.map_err(|e| sql_error(&self.label, &e))?;
        {
            let mut info = lock(&self.session);
            if info.state != SessionState::Expired {
                // Closed meanwhile: give the new session up at once.
                drop(info);
                let _ = Txn::begin(conn).and_then(|mut t| {
                    t.expire_session(id)?;
                    t.commit()
                });
                return Ok(());
            }
            *info = SessionInfo {
                id,
                state: SessionState::Connected { id },
                expires_ms: expires,
                renewed_ms: now,
            };
        }
        tracing::info!(store = %self.label, session = id, "started a new session");
        self.session_tx.send_replace(SessionState::Connected { id });
        Ok(())
    }

    /// Pushes the lease forward (the worker calls this every third of it).
    pub(crate) fn renew(&self, conn: &mut Connection) -> Result<(), StoreError> {
        let _transition = lock(&self.transition);
        let info = *lock(&self.session);
        if !info.live() {
            return Ok(());
        }
        let renewed = Txn::begin(conn).and_then(|mut t| {
            let now = t.now;
            let r = t.renew(info.id, self.options.lease_ms())?;
            if r.is_some() {
                t.commit()?;
            }
            Ok(r.map(|expires| (expires, now)))
        });
        match renewed {
            Ok(Some((expires, now))) => {
                let mut s = lock(&self.session);
                if s.id == info.id && s.live() {
                    s.expires_ms = expires;
                    s.renewed_ms = now;
                    if matches!(s.state, SessionState::Suspended { .. }) {
                        s.state = SessionState::Connected { id: s.id };
                        drop(s);
                        tracing::info!(store = %self.label, session = info.id, "session renewed again");
                        self.session_tx
                            .send_replace(SessionState::Connected { id: info.id });
                    }
                }
                Ok(())
            }
            Ok(None) => {
                // Our row is gone (swept) or past its expiry.
                self.lapse_locked(conn, info.id);
                Ok(())
            }
            Err(e) => {
                let err = sql_error(&self.label, &e);
                let mut s = lock(&self.session);
                if s.id == info.id && s.state == (SessionState::Connected { id: info.id }) {
                    // Like a ZooKeeper connection loss: the session may come
                    // back if a renewal gets through before the lease ends.
                    s.state = SessionState::Suspended { id: info.id };
                    drop(s);
                    self.session_tx
                        .send_replace(SessionState::Suspended { id: info.id });
                }
                Err(err)
            }
        }
    }

    /// Ends the session cleanly: its ephemeral records and locks go now.
    pub(crate) fn close_session(&self, conn: &mut Connection) -> Result<(), StoreError> {
        let _transition = lock(&self.transition);
        let id = {
            let mut info = lock(&self.session);
            if info.state == SessionState::Closed {
                return Ok(());
            }
            let id = info.live().then_some(info.id);
            info.state = SessionState::Closed;
            id
        };
        self.session_tx.send_replace(SessionState::Closed);
        let Some(id) = id else {
            return Ok(());
        };
        let closed = Txn::begin(conn).and_then(|mut t| {
            t.expire_session(id)?;
            t.commit()
        });
        match closed {
            Ok(logged) => {
                if logged {
                    self.nudge();
                }
                Ok(())
            }
            Err(e) => {
                let err = sql_error(&self.label, &e);
                tracing::warn!(
                    store = %self.label,
                    session = id,
                    error = %err,
                    "could not end the session; its records go when its lease lapses"
                );
                Err(err)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(state: SessionState) -> SessionInfo {
        SessionInfo {
            id: 7,
            state,
            expires_ms: 10_000,
            renewed_ms: 9_000,
        }
    }

    #[test]
    fn renews_every_third_of_the_lease_and_lapses_after_it() {
        let c = info(SessionState::Connected { id: 7 });
        // Lease 1000 ms, renewed at 9000: renew from 9333, lapsed after 10000.
        assert_eq!(c.due(9_100, 333), Due::Nothing);
        assert_eq!(c.due(9_333, 333), Due::Renew);
        assert_eq!(
            c.due(10_000, 333),
            Due::Renew,
            "the last moment is still ours"
        );
        assert_eq!(c.due(10_001, 333), Due::Lapsed);
    }

    #[test]
    fn a_clock_step_back_renews_at_once() {
        let c = info(SessionState::Connected { id: 7 });
        assert_eq!(c.due(5_000, 333), Due::Renew);
    }

    #[test]
    fn suspended_retries_expired_reconnects_closed_rests() {
        assert_eq!(
            info(SessionState::Suspended { id: 7 }).due(9_001, 333),
            Due::Renew
        );
        assert_eq!(
            info(SessionState::Suspended { id: 7 }).due(10_500, 333),
            Due::Lapsed
        );
        assert_eq!(info(SessionState::Expired).due(9_100, 333), Due::Nothing);
        assert_eq!(
            info(SessionState::Expired).due(9_000 + RECONNECT_DELAY_MS, 333),
            Due::Reconnect
        );
        assert_eq!(info(SessionState::Closed).due(99_999, 333), Due::Nothing);
    }
}
