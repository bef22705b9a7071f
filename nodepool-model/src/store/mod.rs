//! The `StateStore` trait: where nodes, requests, images and components live.
//!
//! Wire compatibility with Python Nodepool and Zuul fixes the data model:
//! a tree of versioned records with sequential and ephemeral children,
//! exactly ZooKeeper's. So the trait is that model's small core
//! ([`StateStore`]), implemented by ZooKeeper (`nodepool-zookeeper`), an
//! embedded SQLite file (`nodepool-sqlite`) and memory ([`MemoryStore`]), and
//! everything Nodepool-specific is written once on top of it:
//!
//! * [`paths`]: the znode layout of reference §1.2;
//! * [`lock`]: kazoo's lock recipe (`<uuid>__lock__<seq>` contenders);
//! * [`Store`]: typed operations (nodes, requests, builds, uploads,
//!   components, flags) with decoding that skips malformed records;
//! * [`locked`]: the lock combinators ([`Store::with_locked`]) that take a
//!   lock, re-read a record under it, write what was decided and release.
//!
//! Because the layout and lock recipe live here, all three stores hold
//! byte-identical data and the Python CLI can read what any of them wrote
//! once it is in ZooKeeper.

pub mod holds;
pub mod lock;
pub mod locked;
mod memory;
pub mod paths;
mod typed;

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};

use async_trait::async_trait;
use bytes::Bytes;
use tokio::sync::{broadcast, watch};

pub use lock::{LockGuard, LockWait, await_session};
pub use locked::{Decision, Held, LockOf, RecordKey};
pub use memory::MemoryStore;
pub use typed::{
    BuildRecord, ComponentRegistration, ImageState, Listing, Listings, Malformed, NodeRecord,
    RequestLockDir, RequestRecord, Store, UploadRecord, Versioned,
};

/// How a record is created.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CreateMode {
    /// Stays until deleted.
    Persistent,
    /// Stays until deleted; a 10-digit sequence number is appended to the name.
    PersistentSequential,
    /// Deleted when the creating session ends.
    Ephemeral,
    /// Ephemeral, with a sequence number appended.
    EphemeralSequential,
}

impl CreateMode {
    /// Whether the record is tied to its session.
    pub fn is_ephemeral(self) -> bool {
        matches!(
            self,
            CreateMode::Ephemeral | CreateMode::EphemeralSequential
        )
    }

    /// Whether a sequence number is appended.
    pub fn is_sequential(self) -> bool {
        matches!(
            self,
            CreateMode::PersistentSequential | CreateMode::EphemeralSequential
        )
    }
}

/// One operation of a [`StateStore::multi`] transaction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MultiOp<'a> {
    /// Creates a record. Unlike [`StateStore::create`], missing parents are
    /// not made: the transaction fails.
    Create {
        /// The path (a prefix for sequential modes).
        path: &'a str,
        /// Its data.
        data: &'a [u8],
        /// How it is created.
        mode: CreateMode,
    },
    /// Replaces a record's data, at `version` when given.
    Set {
        /// The record's path.
        path: &'a str,
        /// The new data.
        data: &'a [u8],
        /// The version it must be at.
        version: Option<i32>,
    },
    /// Deletes a record without children, at `version` when given.
    Delete {
        /// The record's path.
        path: &'a str,
        /// The version it must be at.
        version: Option<i32>,
    },
}

impl MultiOp<'_> {
    /// The path the operation acts on.
    pub fn path(&self) -> &str {
        match self {
            MultiOp::Create { path, .. }
            | MultiOp::Set { path, .. }
            | MultiOp::Delete { path, .. } => path,
        }
    }
}

/// What one operation of an applied [`StateStore::multi`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MultiResult {
    /// The path created (with its sequence number, for sequential modes).
    Created(String),
    /// The record's stat after the write.
    Set(Stat),
    /// The record was deleted.
    Deleted,
}

/// Metadata of a record, as ZooKeeper's `Stat`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stat {
    /// Data version: 0 at creation, +1 for each `set`. Used for compare-and-set.
    pub version: i32,
    /// Store-wide change id of the creation (ZooKeeper's czxid).
    pub czxid: i64,
    /// Store-wide change id of the last data change (ZooKeeper's mzxid).
    pub mzxid: i64,
    /// Creation time, epoch milliseconds.
    pub ctime: i64,
    /// Last data change, epoch milliseconds.
    pub mtime: i64,
    /// Owning session for ephemeral records, 0 for persistent ones.
    pub ephemeral_owner: i64,
    /// Number of children.
    pub num_children: i32,
}

/// A record with its path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// Absolute path, e.g. `/nodepool/nodes/0000000001`.
    pub path: String,
    /// The data (JSON for Nodepool records; may be empty).
    pub data: Bytes,
    /// Its metadata.
    pub stat: Stat,
}

/// What changed in the store.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoreEvent {
    /// A record was created.
    Created(String),
    /// A record's data changed.
    Changed(String),
    /// A record was deleted.
    Deleted(String),
}

impl StoreEvent {
    /// The path the event is about.
    pub fn path(&self) -> &str {
        match self {
            StoreEvent::Created(p) | StoreEvent::Changed(p) | StoreEvent::Deleted(p) => p,
        }
    }
}

/// The state of this client's session.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SessionState {
    /// Connected; ephemeral records and locks of this session id are alive.
    Connected {
        /// Session id; changes when a session is replaced after expiry.
        id: i64,
    },
    /// Connection lost; the session may still come back (kazoo's SUSPENDED).
    /// Lock-guarded work should pause until it is connected again, and go
    /// on if it comes back with the same id: its locks survived.
    Suspended {
        /// The session that may come back.
        id: i64,
    },
    /// The session ended: its ephemerals and locks are gone.
    Expired,
    /// Closed by [`StateStore::close`].
    Closed,
}

impl SessionState {
    /// The live session id, if connected.
    pub fn id(self) -> Option<i64> {
        match self {
            SessionState::Connected { id } => Some(id),
            _ => None,
        }
    }

    /// Whether session `id` may still be alive: connected, or suspended
    /// and possibly coming back. False once it expired or was replaced.
    pub fn may_be_alive(self, id: i64) -> bool {
        matches!(self, SessionState::Connected { id: s } | SessionState::Suspended { id: s } if s == id)
    }
}

/// Errors of a state store, by meaning.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The record does not exist.
    #[error("{path}: not found")]
    NotFound {
        /// The record's path.
        path: String,
    },
    /// A compare-and-set failed or the record already exists.
    #[error("{path}: {reason}")]
    Conflict {
        /// The record's path.
        path: String,
        /// What conflicted.
        reason: String,
    },
    /// A record cannot be deleted while it has children.
    #[error("{path}: has children")]
    NotEmpty {
        /// The record's path.
        path: String,
    },
    /// A lock is held by someone else (non-blocking acquire).
    #[error("{path}: locked by another owner")]
    Locked {
        /// The lock's path.
        path: String,
    },
    /// Waiting took too long.
    #[error("timed out: {what}")]
    Timeout {
        /// What was waited for.
        what: String,
    },
    /// The store cannot be reached.
    #[error("{store} is unreachable: {reason}")]
    Unavailable {
        /// The store's address.
        store: String,
        /// Why.
        reason: String,
    },
    /// The session ended; ephemerals and locks are gone.
    #[error("session lost")]
    SessionLost,
    /// A record's data could not be decoded.
    #[error("{path}: malformed record: {reason}")]
    Malformed {
        /// The record's path.
        path: String,
        /// What is wrong.
        reason: String,
    },
    /// Anything else.
    #[error("{0}")]
    Other(String),
}

impl StoreError {
    /// A short stable label for metrics.
    pub fn metric_label(&self) -> &'static str {
        match self {
            StoreError::NotFound { .. } => "not_found",
            StoreError::Conflict { .. } => "conflict",
            StoreError::NotEmpty { .. } => "not_empty",
            StoreError::Locked { .. } => "locked",
            StoreError::Timeout { .. } => "timeout",
            StoreError::Unavailable { .. } => "unavailable",
            StoreError::SessionLost => "session_lost",
            StoreError::Malformed { .. } => "malformed",
            StoreError::Other(_) => "other",
        }
    }

    /// Whether this is [`StoreError::NotFound`].
    pub fn is_not_found(&self) -> bool {
        matches!(self, StoreError::NotFound { .. })
    }
}

/// What a store client is busy with, for the `nodepool.launcher.<host>.zk.*`
/// gauges (kazoo's connection queue and tree caches' queues in Python
/// Nodepool), and the traffic it sent and received so far (counters, for
/// `nodepool_zk_operations` / `nodepool_zk_bytes`). Zero where a store has
/// no such queue or does not count.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StoreHealth {
    /// Requests sent to the server and not yet answered.
    pub requests_in_flight: u64,
    /// Change events received whose records are still being read into
    /// the local cache.
    pub event_queue: u64,
    /// Changes applied to the cache and not yet taken by the slowest
    /// subscriber.
    pub playback_queue: u64,
    /// Records in the local cache.
    pub cached_records: u64,
    /// Writes of this client whose change events the cache has not taken
    /// yet (ZooKeeper: each is applied from its answer instead of a read):
    /// a handful while writes are in flight; one that keeps growing is a
    /// leak.
    pub own_writes: u64,
    /// Write requests sent since the client was opened (creates, data
    /// sets, deletes; the lock recipe's contender nodes included).
    pub writes: u64,
    /// Read requests sent since the client was opened (data reads, child
    /// listings, `sync` barriers, and the reads that keep a watch-fed
    /// cache fresh: one per change event, and full loads).
    pub reads: u64,
    /// Change notifications received from the server's watches.
    pub watch_events: u64,
    /// Payload bytes sent: the paths and record data of requests (not the
    /// protocol's framing).
    pub bytes_sent: u64,
    /// Payload bytes received: record data and child names read.
    pub bytes_received: u64,
}

/// Counts one operation as in flight while it lives: +1 when made, -1 when
/// dropped, so every return path (errors and cancelled futures included)
/// gives the count back. Stores keep the counter for
/// [`StoreHealth::requests_in_flight`] in [`StateStore::health`].
#[derive(Debug)]
#[must_use = "the operation counts as in flight only while the guard lives"]
pub struct InFlight<'a>(&'a AtomicU64);

impl<'a> InFlight<'a> {
    /// Adds one to `counter` until the guard is dropped.
    pub fn new(counter: &'a AtomicU64) -> Self {
        counter.fetch_add(1, Ordering::Relaxed);
        InFlight(counter)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A hierarchical store of versioned records with ZooKeeper's semantics.
///
/// Paths are absolute (`/nodepool/nodes/0000000001`), `/`-separated, with no
/// trailing slash. Every implementation must pass the conformance suite in
/// `nodepool_model::conformance::store` (feature `conformance`).
///
/// Programs rarely call it directly: [`Store`] wraps any implementation
/// with the typed records and the lock recipe.
///
/// # Example
///
/// ```no_run
/// use std::sync::Arc;
/// use nodepool_model::model::{Node, NodeState};
/// use nodepool_model::store::{LockWait, MemoryStore, StateStore, Store, StoreError};
///
/// # async fn example() -> Result<(), StoreError> {
/// let backend: Arc<dyn StateStore> = Arc::new(MemoryStore::new());
/// let store = Store::new(backend.clone());
/// let node = Node::new(NodeState::Ready, 0.0, "cloud", "main", vec!["small".into()]);
/// let id = store.create_node(&node).await?;
/// // The raw record, as ZooKeeper would hold it.
/// let (json, stat) = backend
///     .get(&format!("/nodepool/nodes/{id}"))
///     .await?
///     .expect("just created");
/// println!("version {}: {}", stat.version, String::from_utf8_lossy(&json));
/// // Kazoo's lock recipe, as Zuul and Python Nodepool take it.
/// let lock = store.lock_node(&id, LockWait::NonBlocking).await?;
/// lock.release().await?;
/// # Ok(())
/// # }
/// ```
#[async_trait]
pub trait StateStore: Send + Sync + fmt::Debug {
    /// The store's address for messages, e.g. `zookeeper 127.0.0.1:2181/nodepool`.
    fn describe(&self) -> String;

    /// Creates a record; missing parents are created as empty persistent
    /// records. For sequential modes `path` is a prefix (it may end in `/`)
    /// and a 10-digit number, increasing per parent, is appended.
    /// Returns the path created. An existing path is a [`StoreError::Conflict`].
    async fn create(&self, path: &str, data: &[u8], mode: CreateMode)
    -> Result<String, StoreError>;

    /// Creates the empty persistent record `dir` and, in the same atomic
    /// step, a child of it: `child_prefix` (a path below `dir`) with the
    /// 10-digit sequence appended, in `child_mode` (sequential). Returns the
    /// child's path, or `Ok(None)` when nothing was created: `dir` exists
    /// already, its parent is missing, or the store cannot create both at
    /// once. Being the first child of a directory nobody could see before
    /// is what lets a lock contender skip listing its queue.
    ///
    /// The default creates nothing: two separate creates would let another
    /// child in between, so there is no composition of the other
    /// operations with this meaning; callers take their ordinary path.
    async fn create_dir_with_child(
        &self,
        dir: &str,
        child_prefix: &str,
        data: &[u8],
        child_mode: CreateMode,
    ) -> Result<Option<String>, StoreError> {
        let _ = (dir, child_prefix, data, child_mode);
        Ok(None)
    }

    /// Applies `ops` as one atomic transaction (ZooKeeper's `multi`): all
    /// of them or none, in one round trip. `Ok(None)` when the store cannot
    /// (nothing was done: the caller takes its ordinary path, one
    /// operation at a time). When an operation fails nothing is applied,
    /// and the error names that operation's path (a failed version check
    /// is a [`StoreError::Conflict`] on it, an existing path a `Conflict`,
    /// a missing one [`StoreError::NotFound`]). As with single writes, a
    /// connection error leaves the outcome unknown.
    ///
    /// The default does nothing, for the reason given at
    /// [`create_dir_with_child`](Self::create_dir_with_child).
    async fn multi(&self, ops: &[MultiOp<'_>]) -> Result<Option<Vec<MultiResult>>, StoreError> {
        let _ = ops;
        Ok(None)
    }

    /// Reads a record; `Ok(None)` when it does not exist.
    async fn get(&self, path: &str) -> Result<Option<(Bytes, Stat)>, StoreError>;

    /// Replaces a record's data. With `version`, only if the record is still
    /// at that version ([`StoreError::Conflict`] otherwise).
    async fn set(&self, path: &str, data: &[u8], version: Option<i32>) -> Result<Stat, StoreError>;

    /// Deletes a record without children. With `version`, only at that version.
    async fn delete(&self, path: &str, version: Option<i32>) -> Result<(), StoreError>;

    /// The names (not paths) of a record's children, sorted.
    async fn children(&self, path: &str) -> Result<Vec<String>, StoreError>;

    /// The record at `prefix` (if any) and every descendant, sorted by path.
    /// May be served from a local cache kept fresh by watches; a planning
    /// pass reads through this.
    async fn scan(&self, prefix: &str) -> Result<Vec<Entry>, StoreError>;

    /// [`scan`](Self::scan) of each prefix, in order, as one view where
    /// the store can give one: a ZooKeeper mirror answers them all after
    /// one sync from one state, so that two records written together (a
    /// request and its lock released in one transaction) are never seen
    /// one before and one after the write. The default scans one prefix
    /// after the other.
    async fn scan_together(&self, prefixes: &[&str]) -> Result<Vec<Vec<Entry>>, StoreError> {
        let mut scans = Vec::with_capacity(prefixes.len());
        for prefix in prefixes {
            scans.push(self.scan(prefix).await?);
        }
        Ok(scans)
    }

    /// A stream of changes anywhere in the store. Receivers that lag get
    /// `RecvError::Lagged` and should rescan.
    fn subscribe(&self) -> broadcast::Receiver<StoreEvent>;

    /// This client's session state.
    fn session(&self) -> watch::Receiver<SessionState>;

    /// Ends the session: its ephemeral records and locks go away.
    async fn close(&self) -> Result<(), StoreError>;

    /// The client's queue lengths, for health gauges. Cheap: no I/O.
    fn health(&self) -> StoreHealth {
        StoreHealth::default()
    }

    /// Deletes a record and everything below it, deepest first. Records
    /// that vanish meanwhile are not an error.
    async fn delete_tree(&self, path: &str) -> Result<(), StoreError> {
        let mut entries = match self.scan(path).await {
            Ok(e) => e,
            Err(e) if e.is_not_found() => return Ok(()),
            Err(e) => return Err(e),
        };
        entries.retain(|e| e.path == path || e.path.starts_with(&format!("{path}/")));
        // Deepest first: longer paths sort after their parents, so reverse.
        entries.sort_by(|a, b| b.path.len().cmp(&a.path.len()).then(b.path.cmp(&a.path)));
        for e in entries {
            match self.delete(&e.path, None).await {
                Ok(()) | Err(StoreError::NotFound { .. }) => {}
                Err(StoreError::NotEmpty { .. }) => {
                    // A child appeared meanwhile (a lock contender): retry once below it.
                    let children = self.children(&e.path).await.unwrap_or_default();
                    for c in children {
                        Box::pin(self.delete_tree(&format!("{}/{c}", e.path))).await?;
                    }
                    match self.delete(&e.path, None).await {
                        Ok(()) | Err(StoreError::NotFound { .. }) => {}
                        Err(err) => return Err(err),
                    }
                }
                Err(err) => return Err(err),
            }
        }
        Ok(())
    }
}

/// Splits a path into parent and name: `/a/b/c` → (`/a/b`, `c`).
pub fn split_path(path: &str) -> (&str, &str) {
    match path.rfind('/') {
        Some(0) => ("/", &path[1..]),
        Some(i) => (&path[..i], &path[i + 1..]),
        None => ("", path),
    }
}

/// Checks a path's shape: absolute, no empty segments, no trailing slash.
pub fn validate_path(path: &str) -> Result<(), StoreError> {
    let ok = path.starts_with('/')
        && (path == "/" || !path.ends_with('/'))
        && !path.contains("//")
        && !path.contains('\0');
    if ok {
        Ok(())
    } else {
        Err(StoreError::Other(format!("invalid path {path:?}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_flight_counts_while_guards_live() {
        let counter = AtomicU64::new(0);
        let first = InFlight::new(&counter);
        {
            let _second = InFlight::new(&counter);
            assert_eq!(counter.load(Ordering::Relaxed), 2);
        }
        assert_eq!(counter.load(Ordering::Relaxed), 1);
        drop(first);
        assert_eq!(counter.load(Ordering::Relaxed), 0);
    }
}
