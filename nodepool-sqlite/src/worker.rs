//! The background thread of a handle: renews the session, sweeps other
//! processes' expired sessions, prunes the change feed, and polls the feed
//! to deliver watch events and keep the scan cache fresh.
//!
//! It is an OS thread rather than a tokio task so that a busy or blocked
//! runtime (or a test's paused clock) cannot starve the lease renewal, and
//! so it can use its own SQLite connection synchronously.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nodepool_model::store::{StoreError, StoreEvent};
use rusqlite::Connection;
use tokio::sync::broadcast;

use crate::db::{self, ChangeKind, DbError, Txn, now_ms};
use crate::session::Due;
use crate::store::{Shared, lock};

/// Wake-up flags shared with the handle.
#[derive(Debug, Default)]
pub(crate) struct Signal {
    /// The handle is gone or closed: finish.
    pub stop: bool,
    /// A write of this handle committed: poll now rather than at the next tick.
    pub nudged: bool,
}

/// How often orphaned ephemerals (no session row) are looked for.
const ORPHAN_SWEEP_EVERY: Duration = Duration::from_secs(60);

/// Starts the worker for a freshly opened handle. `feed_zxid` is where its
/// watch events start.
pub(crate) fn spawn(
    shared: Arc<Shared>,
    conn: Connection,
    feed_zxid: i64,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("nodepool-sqlite".into())
        .spawn(move || run(&shared, conn, feed_zxid))
}

/// Logs a failing activity once per distinct error, and its recovery,
/// rather than every tick.
#[derive(Default)]
struct Warnings(HashMap<&'static str, String>);

impl Warnings {
    fn check<T>(&mut self, label: &str, what: &'static str, r: Result<T, StoreError>) -> Option<T> {
        match r {
            Ok(v) => {
                if self.0.remove(what).is_some() {
                    tracing::info!(store = %label, what, "recovered");
                }
                Some(v)
            }
            Err(e) => {
                let msg = e.to_string();
                if self.0.get(what) != Some(&msg) {
                    tracing::warn!(store = %label, what, error = %msg, "background work failed; retrying");
                    self.0.insert(what, msg);
                }
                None
            }
        }
    }
}

fn run(shared: &Shared, mut conn: Connection, feed_zxid: i64) {
    let options = shared.options.clone();
    let mut feed = Feed {
        zxid: feed_zxid,
        data_version: None,
        dirty: true,
    };
    let mut warnings = Warnings::default();
    let mut next_sweep = Instant::now();
    let mut next_orphan_sweep = Instant::now() + ORPHAN_SWEEP_EVERY;
    let mut pruner = Pruner::new(options.change_retention);
    let tick = options.poll_interval.max(Duration::from_millis(1));
    while shared.wait(tick) {
        // Session first: a lapse must be noticed before anything else runs
        // under the old session.
        let due = lock(&shared.session).due(now_ms(), options.renew_every_ms());
        let session = match due {
            Due::Nothing => Ok(()),
            Due::Renew => shared.renew(&mut conn),
            Due::Lapsed => {
                let id = lock(&shared.session).id;
                shared.lapse(&mut conn, id);
                Ok(())
            }
            Due::Reconnect => shared.reconnect(&mut conn),
        };
        warnings.check(&shared.label, "session renewal", session);

        let now = Instant::now();
        if now >= next_sweep {
            next_sweep = now + options.sweep_interval;
            let orphans = now >= next_orphan_sweep;
            if orphans {
                next_orphan_sweep = now + ORPHAN_SWEEP_EVERY;
            }
            let me = lock(&shared.session).id;
            let swept = sweep(&mut conn, me, orphans).map_err(|e| e.into_store(&shared.label));
            if warnings.check(&shared.label, "session sweep", swept) == Some(true) {
                feed.dirty = true;
            }
        }

        if let Some(upto) = pruner.due(now, feed.zxid) {
            let pruned = Txn::begin(&mut conn)
                .and_then(|mut t| {
                    let n = t.prune_changes(upto)?;
                    t.commit()?;
                    Ok(n)
                })
                .map_err(|e| db::sql_error(&shared.label, &e));
            if let Some(n) = warnings.check(&shared.label, "change feed pruning", pruned)
                && n > 0
            {
                tracing::debug!(store = %shared.label, upto, rows = n, "pruned the change feed");
            }
        }

        let polled = feed
            .poll(&mut conn, &shared.events)
            .map_err(|e| e.into_store(&shared.label));
        if warnings.check(&shared.label, "change feed poll", polled) == Some(true) {
            let mut cache = lock(&shared.cache);
            if cache.is_loaded() {
                let refreshed = cache
                    .refresh(&mut conn)
                    .map_err(|e| e.into_store(&shared.label));
                warnings.check(&shared.label, "scan cache refresh", refreshed);
            }
        }
    }
    // The handle was dropped without `close`: end the session now rather
    // than leaving its ephemerals to the lease.
    let _ = shared.close_session(&mut conn);
}

/// Expires other processes' lapsed sessions. A read finds out whether there
/// is anything to do, so the common case takes no write lock. Returns
/// whether anything was deleted.
fn sweep(conn: &mut Connection, me: i64, orphans: bool) -> Result<bool, DbError> {
    if !orphans && !db::any_expired(conn, me, now_ms())? {
        return Ok(false);
    }
    let mut t = Txn::begin(conn)?;
    let expired = t.sweep_expired(me)?;
    let orphaned = if orphans { t.sweep_orphans()? } else { 0 };
    let logged = t.commit()?;
    Ok(logged || !expired.is_empty() || orphaned > 0)
}

/// The watch side of the change feed.
struct Feed {
    /// Last change id delivered.
    zxid: i64,
    /// `PRAGMA data_version` at the last poll.
    data_version: Option<i64>,
    /// Our own connection wrote: `data_version` does not move for that.
    dirty: bool,
}

impl Feed {
    /// Delivers changes committed since the last poll. Returns whether the
    /// feed moved.
    fn poll(
        &mut self,
        conn: &mut Connection,
        events: &broadcast::Sender<StoreEvent>,
    ) -> Result<bool, DbError> {
        let dv = db::data_version(conn)?;
        if Some(dv) == self.data_version && !self.dirty {
            return Ok(false);
        }
        self.data_version = Some(dv);
        self.dirty = false;
        let tx = conn.transaction()?;
        let max = db::current_zxid(&tx)?;
        if max == self.zxid {
            return Ok(false);
        }
        if max < self.zxid {
            tracing::warn!(
                from = self.zxid,
                to = max,
                "the change id went back: was the database file replaced?"
            );
            self.zxid = max;
            return Ok(true);
        }
        // Nobody listens: just move on (a later subscriber only gets later changes).
        if events.receiver_count() > 0 {
            let changes = db::changes_since(&tx, self.zxid)?;
            if changes.first().map(|c| c.zxid) != Some(self.zxid + 1) {
                // Only after a stall far longer than the retention, which
                // expired our session long before: consumers resynchronise
                // on that, as after a ZooKeeper session expiry.
                tracing::warn!(
                    from = self.zxid,
                    first = changes.first().map(|c| c.zxid),
                    "changes were pruned before this process saw them; some watch events are lost"
                );
            }
            for c in changes {
                let e = match c.kind {
                    ChangeKind::Created => StoreEvent::Created(c.path),
                    ChangeKind::Changed => StoreEvent::Changed(c.path),
                    ChangeKind::Deleted => StoreEvent::Deleted(c.path),
                };
                // No receivers left is fine.
                let _ = events.send(e);
            }
        }
        self.zxid = max;
        Ok(true)
    }
}

/// At most this many change feed entries are kept, whatever their age: a
/// live process is never this far behind, and the file stays bounded when
/// no long-lived process runs long enough to prune by age.
pub(crate) const MAX_FEED_ENTRIES: i64 = 100_000;

/// Decides when to prune the change feed: entries older than the retention
/// go, and all but the last [`MAX_FEED_ENTRIES`]. Change ids are remembered
/// with the (monotonic) time they were seen, so no timestamp column or time
/// index is needed.
struct Pruner {
    retention: Duration,
    every: Duration,
    next: Option<Instant>,
    seen: VecDeque<(Instant, i64)>,
    /// Up to where we pruned last.
    done: i64,
}

impl Pruner {
    fn new(retention: Duration) -> Self {
        Pruner {
            retention,
            every: (retention / 4).clamp(Duration::from_millis(10), Duration::from_secs(30)),
            next: None,
            seen: VecDeque::new(),
            done: 0,
        }
    }

    /// The change id up to which entries may go, when it is time to prune.
    fn due(&mut self, now: Instant, zxid: i64) -> Option<i64> {
        if self.next.is_some_and(|n| now < n) {
            return None;
        }
        self.next = Some(now + self.every);
        self.seen.push_back((now, zxid));
        let mut upto = zxid - MAX_FEED_ENTRIES;
        while let Some(&(t, z)) = self.seen.front() {
            if now.duration_since(t) < self.retention {
                break;
            }
            upto = upto.max(z);
            self.seen.pop_front();
        }
        (upto > self.done).then(|| {
            self.done = upto;
            upto
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prunes_only_what_is_older_than_the_retention() {
        let t0 = Instant::now();
        let mut p = Pruner::new(Duration::from_secs(40));
        assert_eq!(p.every, Duration::from_secs(10));
        assert_eq!(p.due(t0, 5), None, "nothing is old yet");
        assert_eq!(
            p.due(t0 + Duration::from_secs(5), 6),
            None,
            "not time to look yet"
        );
        assert_eq!(p.due(t0 + Duration::from_secs(10), 9), None);
        assert_eq!(p.due(t0 + Duration::from_secs(30), 20), None);
        assert_eq!(
            p.due(t0 + Duration::from_secs(41), 30),
            Some(5),
            "what was current 40 s ago"
        );
        assert_eq!(p.due(t0 + Duration::from_secs(80), 31), Some(20));
        assert_eq!(p.due(t0 + Duration::from_secs(90), 32), Some(30));
        assert_eq!(
            p.due(t0 + Duration::from_secs(100), MAX_FEED_ENTRIES + 500),
            Some(500),
            "a burst beyond the cap"
        );
        assert_eq!(
            p.due(t0 + Duration::from_secs(110), MAX_FEED_ENTRIES + 500),
            None,
            "nothing new to prune"
        );
    }
}
