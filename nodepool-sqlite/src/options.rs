//! Tuning knobs of a [`SqliteStore`](crate::SqliteStore).

use std::time::Duration;

/// How hard SQLite works to make a commit durable (`PRAGMA synchronous`).
///
/// In WAL mode both levels keep every committed transaction when a process
/// is killed (even with SIGKILL): a commit has been written to the WAL file,
/// which the kernel owns, before `COMMIT` returns. They differ when the
/// machine itself stops (power loss, kernel panic).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Synchronous {
    /// fsync the WAL at every commit: a commit also survives power loss.
    /// This is what ZooKeeper does with its transaction log, and the default.
    #[default]
    Full,
    /// fsync only at checkpoints: commits survive any process crash but the
    /// last few may be rolled back by a power loss (the file stays
    /// consistent). Cheaper on slow disks.
    Normal,
}

impl Synchronous {
    pub(crate) fn pragma_value(self) -> &'static str {
        match self {
            Synchronous::Full => "FULL",
            Synchronous::Normal => "NORMAL",
        }
    }
}

/// Options of a [`SqliteStore`](crate::SqliteStore).
///
/// Start from [`SqliteOptions::default`] and change what you need:
///
/// ```
/// use std::time::Duration;
/// let options = nodepool_sqlite::SqliteOptions::default()
///     .with_lease(Duration::from_secs(30));
/// assert_eq!(options.lease, Duration::from_secs(30));
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct SqliteOptions {
    /// How long this process's session (and so its locks and ephemeral
    /// records) outlives its last renewal. The session is renewed every
    /// third of it; a process that stops renewing (killed, stopped, hung)
    /// loses its session once it lapses. Default 10 s, ZooKeeper's session
    /// timeout in Nodepool.
    pub lease: Duration,
    /// How often the change feed is polled for other processes' writes: the
    /// watch latency. Default 20 ms (a poll that finds nothing is one
    /// `PRAGMA data_version`, a few microseconds).
    pub poll_interval: Duration,
    /// How often expired sessions of other processes are looked for. A dead
    /// process's locks free up at most this long after its lease lapsed.
    /// Default 250 ms (a check that finds nothing is one read).
    pub sweep_interval: Duration,
    /// How long a write waits for another process's write transaction
    /// before failing with [`StoreError::Timeout`](nodepool_model::store::StoreError::Timeout).
    /// Default 5 s.
    pub busy_timeout: Duration,
    /// Durability of commits. Default [`Synchronous::Full`].
    pub synchronous: Synchronous,
    /// How long entries of the change feed are kept. A process that does
    /// not poll for longer than this (it was stopped; its session expired
    /// long before) misses changes and reloads its cache. Default 5 min.
    pub change_retention: Duration,
    /// Serve [`scan`](nodepool_model::store::StateStore::scan) from an
    /// in-process copy of the tree kept fresh from the change feed, so a
    /// planning pass does not re-read every record. Default on.
    pub scan_cache: bool,
}

impl Default for SqliteOptions {
    fn default() -> Self {
        SqliteOptions {
            lease: Duration::from_secs(10),
            poll_interval: Duration::from_millis(20),
            sweep_interval: Duration::from_millis(250),
            busy_timeout: Duration::from_secs(5),
            synchronous: Synchronous::Full,
            change_retention: Duration::from_secs(300),
            scan_cache: true,
        }
    }
}

impl SqliteOptions {
    /// Sets [`lease`](Self::lease).
    pub fn with_lease(mut self, lease: Duration) -> Self {
        self.lease = lease;
        self
    }

    /// Sets [`poll_interval`](Self::poll_interval).
    pub fn with_poll_interval(mut self, interval: Duration) -> Self {
        self.poll_interval = interval;
        self
    }

    /// Sets [`sweep_interval`](Self::sweep_interval).
    pub fn with_sweep_interval(mut self, interval: Duration) -> Self {
        self.sweep_interval = interval;
        self
    }

    /// Sets [`busy_timeout`](Self::busy_timeout).
    pub fn with_busy_timeout(mut self, timeout: Duration) -> Self {
        self.busy_timeout = timeout;
        self
    }

    /// Sets [`synchronous`](Self::synchronous).
    pub fn with_synchronous(mut self, synchronous: Synchronous) -> Self {
        self.synchronous = synchronous;
        self
    }

    /// Sets [`change_retention`](Self::change_retention).
    pub fn with_change_retention(mut self, retention: Duration) -> Self {
        self.change_retention = retention;
        self
    }

    /// Sets [`scan_cache`](Self::scan_cache).
    pub fn with_scan_cache(mut self, on: bool) -> Self {
        self.scan_cache = on;
        self
    }

    /// The lease in milliseconds (at least 1).
    pub(crate) fn lease_ms(&self) -> i64 {
        i64::try_from(self.lease.as_millis())
            .unwrap_or(i64::MAX)
            .max(1)
    }

    /// Renewal period: a third of the lease, as ZooKeeper clients ping.
    pub(crate) fn renew_every_ms(&self) -> i64 {
        (self.lease_ms() / 3).max(1)
    }
}
