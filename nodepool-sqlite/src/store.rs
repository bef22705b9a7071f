//! [`SqliteStore`]: the [`StateStore`] handle.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, mpsc};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use nodepool_model::config::{Config, StateStoreConfig};
use nodepool_model::store::{
    CreateMode, Entry, InFlight, SessionState, Stat, StateStore, StoreError, StoreEvent,
    StoreHealth, validate_path,
};
use rusqlite::Connection;
use tokio::sync::{broadcast, watch};

use crate::cache::Cache;
use crate::db::{self, DbError, Txn, sql_error};
use crate::options::SqliteOptions;
use crate::queue::{self, Read, ReadJob, Write, WriteJob};
use crate::session::{Due, SessionInfo};
use crate::worker::{self, Signal};

/// How many events a subscriber may fall behind before it sees `Lagged`
/// (the same as the in-memory store).
const EVENT_BUFFER: usize = 16_384;

/// Locks a mutex, carrying on after a panic elsewhere: every critical
/// section here leaves its data consistent between statements.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// State shared by a handle's clones and its worker thread.
pub(crate) struct Shared {
    /// `sqlite <path>`, for messages.
    pub(crate) label: String,
    pub(crate) path: PathBuf,
    pub(crate) options: SqliteOptions,
    /// Connection for writes (and for expiring our own session).
    pub(crate) writer: Mutex<Connection>,
    /// Connection for reads, so that reads never queue behind a write
    /// waiting for another process's lock.
    pub(crate) reader: Mutex<Connection>,
    pub(crate) cache: Mutex<Cache>,
    pub(crate) session: Mutex<SessionInfo>,
    /// Held while the session changes (renewal, lapse, new session, close),
    /// so that two threads never start two new sessions.
    pub(crate) transition: Mutex<()>,
    pub(crate) session_tx: watch::Sender<SessionState>,
    pub(crate) events: broadcast::Sender<StoreEvent>,
    pub(crate) signal: Mutex<Signal>,
    pub(crate) wake: Condvar,
}

impl Shared {
    /// Wakes the worker so it polls the feed now.
    pub(crate) fn nudge(&self) {
        lock(&self.signal).nudged = true;
        self.wake.notify_one();
    }

    /// Tells the worker to finish.
    fn stop(&self) {
        lock(&self.signal).stop = true;
        self.wake.notify_one();
    }

    /// Waits for a nudge, a stop or the timeout; false once stopped.
    pub(crate) fn wait(&self, timeout: Duration) -> bool {
        let mut sig = lock(&self.signal);
        if !sig.stop && !sig.nudged {
            sig = self
                .wake
                .wait_timeout(sig, timeout)
                .map(|(g, _)| g)
                .unwrap_or_else(|p| p.into_inner().0);
        }
        sig.nudged = false;
        !sig.stop
    }

    fn err(&self, e: DbError) -> StoreError {
        e.into_store(&self.label)
    }

    /// Runs a batch of queued writes in one write transaction under the
    /// live session (the writer thread calls this; see `queue.rs`), then
    /// answers each caller.
    pub(crate) fn write_batch(&self, mut batch: Vec<Box<dyn WriteJob>>) {
        let committed = self.commit_batch(&mut batch);
        for job in batch {
            job.finish(committed.clone());
        }
    }

    /// The transaction of [`Self::write_batch`], after expiring other
    /// processes' lapsed sessions.
    fn commit_batch(&self, batch: &mut [Box<dyn WriteJob>]) -> Result<(), StoreError> {
        let id = self.session_for_op()?;
        let mut conn = lock(&self.writer);
        let mut t = Txn::begin(&mut conn).map_err(|e| sql_error(&self.label, &e))?;
        let status = t
            .session_status(id)
            .map_err(|e| sql_error(&self.label, &e))?;
        if status != db::SessionStatus::Alive {
            // Swept by another process, or lapsed before anyone noticed.
            drop(t);
            self.lapse(&mut conn, id);
            return Err(StoreError::SessionLost);
        }
        t.sweep_expired(id)
            .map_err(|e| sql_error(&self.label, &e))?;
        // Like any ZooKeeper request, a write counts as a heartbeat: a
        // handle busy writing holds the write lock often, while its worker's
        // renewal would have to win it against those very writes (SQLite's
        // lock is not fair).
        let now = t.now;
        let renew = lock(&self.session).due(now, self.options.renew_every_ms()) == Due::Renew;
        let renewed = if renew {
            t.renew(id, self.options.lease_ms())
                .map_err(|e| sql_error(&self.label, &e))?
        } else {
            None
        };
        // On error the transaction rolls back as it drops.
        for job in batch.iter_mut() {
            job.run(&mut t, id, &self.label)
                .map_err(|e| sql_error(&self.label, &e))?;
        }
        let logged = t.commit().map_err(|e| sql_error(&self.label, &e))?;
        drop(conn);
        if let Some(expires) = renewed {
            let mut info = lock(&self.session);
            if info.id == id && info.expires_ms < expires {
                info.expires_ms = expires;
                info.renewed_ms = now;
            }
        }
        if logged {
            self.nudge();
        }
        Ok(())
    }

    /// Answers a batch of queued reads from one read transaction (one
    /// snapshot) under the live session (the reader thread calls this).
    pub(crate) fn read_batch(&self, batch: Vec<Box<dyn ReadJob>>) {
        let mut conn = lock(&self.reader);
        let tx = self
            .session_for_op()
            .and_then(|_| conn.transaction().map_err(|e| sql_error(&self.label, &e)));
        match &tx {
            Ok(tx) => {
                for job in batch {
                    job.run(Ok(tx), &self.label);
                }
            }
            Err(e) => {
                for job in batch {
                    job.run(Err(e.clone()), &self.label);
                }
            }
        }
    }

    /// Runs `f` in one read transaction (one snapshot) under the live session.
    fn read<T>(&self, f: impl FnOnce(&Connection) -> Result<T, DbError>) -> Result<T, StoreError> {
        self.session_for_op()?;
        let mut conn = lock(&self.reader);
        let tx = conn.transaction().map_err(|e| sql_error(&self.label, &e))?;
        f(&tx).map_err(|e| self.err(e))
    }

    fn scan(&self, prefix: &str) -> Result<Vec<Entry>, StoreError> {
        let mut scans = self.scan_together(&[prefix])?;
        Ok(scans.pop().unwrap_or_default())
    }

    /// Each prefix's scan, from one read transaction (or one refresh of
    /// the scan cache): one state of the file for all of them.
    fn scan_together(&self, prefixes: &[&str]) -> Result<Vec<Vec<Entry>>, StoreError> {
        for prefix in prefixes {
            validate_path(prefix)?;
        }
        if !self.options.scan_cache {
            let scans = self.read(|c| {
                prefixes
                    .iter()
                    .map(|p| db::scan(c, p))
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(DbError::from)
            })?;
            return Ok(scans
                .into_iter()
                .map(|(rows, bad)| {
                    for m in bad {
                        tracing::warn!(store = %self.label, path = %m.path, reason = %m.reason, "skipping malformed record row");
                    }
                    rows.into_iter()
                        .map(|r| Entry {
                            path: r.path,
                            data: r.data,
                            stat: r.stat,
                        })
                        .collect()
                })
                .collect());
        }
        self.session_for_op()?;
        let mut cache = lock(&self.cache);
        {
            let mut conn = lock(&self.reader);
            cache.refresh(&mut conn).map_err(|e| self.err(e))?;
        }
        Ok(prefixes.iter().map(|p| cache.scan(p)).collect())
    }
}

/// The handle's owner part: dropping the last clone stops the worker,
/// which then ends the session.
struct Inner {
    shared: Arc<Shared>,
    worker: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// The writer and reader threads' queues; dropping them ends the threads.
    writes: mpsc::Sender<Box<dyn WriteJob>>,
    reads: mpsc::Sender<Box<dyn ReadJob>>,
    /// Operations queued or running, and totals since opening, for
    /// [`StateStore::health`].
    in_flight: AtomicU64,
    writes_sent: AtomicU64,
    reads_sent: AtomicU64,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Not joined: this may run on an async runtime thread.
        self.shared.stop();
    }
}

/// A [`StateStore`] on an SQLite file, shared by every process of one
/// machine that opens the same file.
///
/// Each handle (with its clones) is one client session. Open it with
/// [`SqliteStore::open`] or [`SqliteStore::from_config`]; end it with
/// [`StateStore::close`] (dropping the last clone also ends it, in the
/// background).
///
/// ```no_run
/// # async fn demo() -> Result<(), nodepool_model::store::StoreError> {
/// use std::sync::Arc;
/// use nodepool_model::store::{StateStore, Store};
/// use nodepool_sqlite::{SqliteOptions, SqliteStore};
///
/// let sqlite = SqliteStore::open("/var/lib/nodepool/nodepool.db", SqliteOptions::default()).await?;
/// let store = Store::new(Arc::new(sqlite));
/// let nodes = store.list_nodes().await?;
/// println!("{} nodes", nodes.records.len());
/// store.backend().close().await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct SqliteStore {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore")
            .field("path", &self.inner.shared.path)
            .field("session", &*self.inner.shared.session_tx.borrow())
            .finish()
    }
}

impl SqliteStore {
    /// Opens (creating if needed, with missing parent directories) the
    /// database at `path` and starts a session.
    ///
    /// Fails with [`StoreError::Unavailable`] naming the path when the file
    /// cannot be created or opened, is not an SQLite database, belongs to
    /// something else, or has a schema this version does not read.
    pub async fn open(path: impl AsRef<Path>, options: SqliteOptions) -> Result<Self, StoreError> {
        let path = path.as_ref().to_path_buf();
        let label = format!("sqlite {}", path.display());
        let (shared, worker_conn, feed_zxid) =
            tokio::task::spawn_blocking(move || open_blocking(path, options))
                .await
                .map_err(|e| StoreError::Unavailable {
                    store: label,
                    reason: format!("the opening task failed: {e}"),
                })??;
        let thread_err = |e: std::io::Error| StoreError::Unavailable {
            store: shared.label.clone(),
            reason: format!("cannot start the store's threads: {e}"),
        };
        let (writes, write_jobs) = mpsc::channel();
        let (reads, read_jobs) = mpsc::channel();
        // Writer and reader first: they end with the handle's senders,
        // whereas the worker would need to be stopped if they failed.
        queue::spawn_writer(shared.clone(), write_jobs).map_err(thread_err)?;
        queue::spawn_reader(shared.clone(), read_jobs).map_err(thread_err)?;
        let handle = worker::spawn(shared.clone(), worker_conn, feed_zxid).map_err(thread_err)?;
        Ok(SqliteStore {
            inner: Arc::new(Inner {
                shared,
                worker: Mutex::new(Some(handle)),
                writes,
                reads,
                in_flight: AtomicU64::new(0),
                writes_sent: AtomicU64::new(0),
                reads_sent: AtomicU64::new(0),
            }),
        })
    }

    /// Opens the store a configuration selects (`state-store: {driver:
    /// sqlite, path: ...}`, or the default path when no ZooKeeper is set);
    /// the configuration's `lease`, when set, replaces `options.lease`.
    pub async fn from_config(config: &Config, options: SqliteOptions) -> Result<Self, StoreError> {
        match &config.state_store {
            StateStoreConfig::Sqlite { path, lease } => {
                let mut options = options;
                if let Some(lease) = lease {
                    options.lease = *lease;
                }
                Self::open(path, options).await
            }
            StateStoreConfig::ZooKeeper => Err(StoreError::Other(
                "the configuration selects the ZooKeeper state store (zookeeper-servers), not sqlite"
                    .into(),
            )),
        }
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.inner.shared.path
    }

    /// The options the store was opened with.
    pub fn options(&self) -> &SqliteOptions {
        &self.inner.shared.options
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Shared) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let shared = self.inner.shared.clone();
        tokio::task::spawn_blocking(move || f(&shared))
            .await
            .map_err(|e| StoreError::Other(format!("sqlite task failed: {e}")))?
    }

    /// Queues a write for the writer thread and waits until its batch
    /// committed.
    async fn write<T: Send + 'static>(
        &self,
        op: impl FnOnce(&mut Txn<'_>, i64) -> Result<T, DbError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let (job, rx) = Write::new(op);
        let _in_flight = InFlight::new(&self.inner.in_flight);
        self.inner.writes_sent.fetch_add(1, Ordering::Relaxed);
        self.inner
            .writes
            .send(Box::new(job))
            .map_err(|_| self.stopped())?;
        rx.await.map_err(|_| self.stopped())?
    }

    /// Queues a read for the reader thread.
    async fn read<T: Send + 'static>(
        &self,
        op: impl FnOnce(&Connection) -> Result<T, DbError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let (job, rx) = Read::new(op);
        let _in_flight = InFlight::new(&self.inner.in_flight);
        self.inner.reads_sent.fetch_add(1, Ordering::Relaxed);
        self.inner
            .reads
            .send(Box::new(job))
            .map_err(|_| self.stopped())?;
        rx.await.map_err(|_| self.stopped())?
    }

    fn stopped(&self) -> StoreError {
        StoreError::Other(format!(
            "{}: the store's thread stopped",
            self.inner.shared.label
        ))
    }
}

fn open_blocking(
    path: PathBuf,
    options: SqliteOptions,
) -> Result<(Arc<Shared>, Connection, i64), StoreError> {
    let label = format!("sqlite {}", path.display());
    let unavailable = |reason: String| StoreError::Unavailable {
        store: label.clone(),
        reason,
    };
    if let Some(dir) = path.parent()
        && !dir.as_os_str().is_empty()
    {
        std::fs::create_dir_all(dir).map_err(|e| {
            unavailable(format!(
                "cannot create the directory {}: {e}",
                dir.display()
            ))
        })?;
    }
    let open_err = |e: DbError| match e {
        DbError::Sql(e) => unavailable(format!("cannot open the database: {e}")),
        DbError::Store(e) => unavailable(e.to_string()),
    };
    let connect = || db::connect(&path, &options).map_err(|e| open_err(DbError::Sql(e)));
    let mut writer = connect()?;
    db::init(&mut writer, options.busy_timeout).map_err(open_err)?;
    let reader = connect()?;
    let worker_conn = connect()?;
    let mut t = Txn::begin(&mut writer).map_err(|e| open_err(DbError::Sql(e)))?;
    let started = (|| {
        t.sweep_expired(0)?;
        t.sweep_orphans()?;
        t.cap_changes(worker::MAX_FEED_ENTRIES)?;
        let now = t.now;
        let (id, expires) = t.open_session(options.lease_ms())?;
        t.commit()?;
        Ok::<_, rusqlite::Error>((id, expires, now))
    })();
    let (id, expires, now) = started.map_err(|e| open_err(DbError::Sql(e)))?;
    let feed_zxid = db::current_zxid(&worker_conn).map_err(|e| open_err(DbError::Sql(e)))?;
    tracing::debug!(store = %label, session = id, "opened");
    let (session_tx, _) = watch::channel(SessionState::Connected { id });
    let (events, _) = broadcast::channel(EVENT_BUFFER);
    let shared = Arc::new(Shared {
        label,
        path,
        options,
        writer: Mutex::new(writer),
        reader: Mutex::new(reader),
        cache: Mutex::new(Cache::default()),
        session: Mutex::new(SessionInfo {
            id,
            state: SessionState::Connected { id },
            expires_ms: expires,
            renewed_ms: now,
        }),
        transition: Mutex::new(()),
        session_tx,
        events,
        signal: Mutex::new(Signal::default()),
        wake: Condvar::new(),
    });
    Ok((shared, worker_conn, feed_zxid))
}

#[async_trait]
impl StateStore for SqliteStore {
    fn describe(&self) -> String {
        self.inner.shared.label.clone()
    }

    async fn create(
        &self,
        path: &str,
        data: &[u8],
        mode: CreateMode,
    ) -> Result<String, StoreError> {
        let path = path.to_owned();
        let data = data.to_vec();
        self.write(move |t, session| t.create(session, &path, &data, mode))
            .await
    }

    async fn create_dir_with_child(
        &self,
        dir: &str,
        child_prefix: &str,
        data: &[u8],
        child_mode: CreateMode,
    ) -> Result<Option<String>, StoreError> {
        let dir = dir.to_owned();
        let child_prefix = child_prefix.to_owned();
        let data = data.to_vec();
        self.write(move |t, session| {
            t.create_dir_with_child(session, &dir, &child_prefix, &data, child_mode)
        })
        .await
    }

    async fn get(&self, path: &str) -> Result<Option<(Bytes, Stat)>, StoreError> {
        validate_path(path)?;
        let path = path.to_owned();
        self.read(move |c| match db::get(c, &path)? {
            None => Ok(None),
            Some(Ok(r)) => Ok(Some((r.data, r.stat))),
            Some(Err(m)) => Err(m.into_store().into()),
        })
        .await
    }

    async fn set(&self, path: &str, data: &[u8], version: Option<i32>) -> Result<Stat, StoreError> {
        validate_path(path)?;
        let path = path.to_owned();
        let data = data.to_vec();
        self.write(move |t, _| t.set(&path, &data, version)).await
    }

    async fn delete(&self, path: &str, version: Option<i32>) -> Result<(), StoreError> {
        let path = path.to_owned();
        self.write(move |t, _| t.delete(&path, version)).await
    }

    async fn children(&self, path: &str) -> Result<Vec<String>, StoreError> {
        validate_path(path)?;
        let path = path.to_owned();
        self.read(move |c| {
            db::children(c, &path)?.ok_or_else(|| StoreError::NotFound { path }.into())
        })
        .await
    }

    async fn scan(&self, prefix: &str) -> Result<Vec<Entry>, StoreError> {
        let prefix = prefix.to_owned();
        self.blocking(move |s| s.scan(&prefix)).await
    }

    async fn scan_together(&self, prefixes: &[&str]) -> Result<Vec<Vec<Entry>>, StoreError> {
        let prefixes: Vec<String> = prefixes.iter().map(|p| (*p).to_owned()).collect();
        self.blocking(move |s| {
            let prefixes: Vec<&str> = prefixes.iter().map(String::as_str).collect();
            s.scan_together(&prefixes)
        })
        .await
    }

    fn subscribe(&self) -> broadcast::Receiver<StoreEvent> {
        self.inner.shared.events.subscribe()
    }

    fn session(&self) -> watch::Receiver<SessionState> {
        self.inner.shared.session_tx.subscribe()
    }

    /// Writes and reads queued for (or running on) the writer and reader
    /// threads, their totals, and changes waiting for the slowest
    /// subscriber. Scans are not counted (they run on a blocking thread)
    /// and the scan cache is refreshed under its lock, which this must not
    /// wait for.
    fn health(&self) -> StoreHealth {
        let i = &self.inner;
        StoreHealth {
            requests_in_flight: i.in_flight.load(Ordering::Relaxed),
            playback_queue: i.shared.events.len() as u64,
            writes: i.writes_sent.load(Ordering::Relaxed),
            reads: i.reads_sent.load(Ordering::Relaxed),
            ..StoreHealth::default()
        }
    }

    async fn close(&self) -> Result<(), StoreError> {
        let worker = lock(&self.inner.worker).take();
        self.blocking(move |s| {
            let closed = {
                let mut conn = lock(&s.writer);
                s.close_session(&mut conn)
            };
            s.stop();
            if let Some(w) = worker {
                // The worker finishes its current step (a few ms at most).
                let _ = w.join();
            }
            closed
        })
        .await
    }
}
