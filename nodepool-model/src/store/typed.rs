//! Typed operations on top of any [`StateStore`].

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex};

use super::lock::{self, LockGuard, LockWait};
use super::locked::RecordKey;
use super::paths::{self, ImagePath, classify_image_path, lock_contender_sequence};
use super::{CreateMode, Entry, MultiOp, MultiResult, SessionState, StateStore, StoreError};
use crate::model::{
    Component, ComponentKind, ImageBuild, ImageUpload, Node, NodeRequest, WireRecord,
};

/// A record with the version it was read at (for compare-and-set).
#[derive(Clone, Debug, PartialEq)]
pub struct Versioned<T> {
    /// The record.
    pub value: T,
    /// Its version.
    pub version: i32,
}

/// A record that could not be decoded; listings skip it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Malformed {
    /// Its path.
    pub path: String,
    /// Why it could not be read.
    pub reason: String,
}

/// Everything a planning pass reads, from [`Store::listings`].
#[derive(Debug)]
pub struct Listings {
    /// Every node, with its lock state.
    pub nodes: Listing<NodeRecord>,
    /// Every request, with its lock state.
    pub requests: Listing<RequestRecord>,
    /// The request lock directories.
    pub request_lock_dirs: Vec<RequestLockDir>,
    /// The registered pools.
    pub pools: Listing<(String, Component)>,
    /// Everything under `/nodepool/images`.
    pub images: ImageState,
}

/// The decodable records of a listing and the ones that were skipped.
#[derive(Clone, Debug, PartialEq)]
pub struct Listing<T> {
    /// Records that decoded.
    pub records: Vec<T>,
    /// Records that did not (logged once per version).
    pub malformed: Vec<Malformed>,
}

/// A node as listed.
#[derive(Clone, Debug, PartialEq)]
pub struct NodeRecord {
    /// Node id.
    pub id: String,
    /// The node (shared with the decode cache; clone it to modify).
    pub node: Arc<Node>,
    /// Version for compare-and-set.
    pub version: i32,
    /// Whether its lock has any contender.
    pub locked: bool,
}

/// A request as listed.
#[derive(Clone, Debug, PartialEq)]
pub struct RequestRecord {
    /// Request id (`<prio>-<seq>`).
    pub id: String,
    /// The request.
    pub request: Arc<NodeRequest>,
    /// Version for compare-and-set.
    pub version: i32,
    /// Whether it was created ephemeral (min-ready requests are).
    pub ephemeral: bool,
    /// The session that owns it when ephemeral (0 otherwise).
    pub ephemeral_owner: i64,
    /// Whether its lock (`/nodepool/requests-lock/<id>`) has any contender.
    pub locked: bool,
}

/// A build as listed.
#[derive(Clone, Debug, PartialEq)]
pub struct BuildRecord {
    /// Diskimage name.
    pub image: String,
    /// Build id.
    pub id: String,
    /// The build.
    pub build: ImageBuild,
    /// Version for compare-and-set.
    pub version: i32,
    /// Whether its lock has any contender.
    pub locked: bool,
}

/// An upload as listed.
#[derive(Clone, Debug, PartialEq)]
pub struct UploadRecord {
    /// Diskimage name.
    pub image: String,
    /// Build id.
    pub build_id: String,
    /// Provider name.
    pub provider: String,
    /// Upload id.
    pub id: String,
    /// The upload.
    pub upload: ImageUpload,
    /// Version for compare-and-set.
    pub version: i32,
    /// Whether its lock has any contender.
    pub locked: bool,
    /// Whether the per-build-per-provider upload lock has any contender.
    pub uploads_locked: bool,
}

/// Everything under `/nodepool/images`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ImageState {
    /// Image names that have a record.
    pub images: BTreeSet<String>,
    /// Builds, by image then build id.
    pub builds: Vec<BuildRecord>,
    /// Uploads.
    pub uploads: Vec<UploadRecord>,
    /// Images paused with `image-pause`.
    pub paused: BTreeSet<String>,
    /// Images with a pending `image-build` request, and when it was made (epoch s).
    pub build_requests: BTreeMap<String, f64>,
    /// Images whose build lock (`/nodepool/images/<image>/builds/lock`) has
    /// a contender: a builder is building it (or about to).
    pub build_locked: BTreeSet<String>,
    /// Pending "upload now" requests (`nodepool image-upload`), by (image,
    /// provider), and when each was made (epoch s). See
    /// [`paths::image_upload_request`].
    pub upload_requests: BTreeMap<(String, String), f64>,
    /// Records that could not be decoded.
    pub malformed: Vec<Malformed>,
    /// Builds whose record, or the record of one of whose uploads, could
    /// not be decoded, by (image, build id): their state is unknown, so
    /// the builder leaves everything of theirs alone.
    pub unreadable_builds: BTreeSet<(String, String)>,
}

/// A request lock directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequestLockDir {
    /// The request id it locks.
    pub id: String,
    /// Last modification, epoch milliseconds.
    pub mtime_ms: i64,
    /// Whether anyone holds or waits for it.
    pub locked: bool,
}

/// A component this process registered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ComponentRegistration {
    /// Path of the ephemeral record.
    pub path: String,
    /// Version for updates.
    pub version: i32,
}

type DecodeCache<T> = HashMap<String, (i64, Result<Arc<T>, String>)>;

#[derive(Default)]
struct Caches {
    nodes: DecodeCache<Node>,
    requests: DecodeCache<NodeRequest>,
    /// Components of every kind, by path (so a malformed registration is
    /// warned about once per version, like nodes and requests).
    components: DecodeCache<Component>,
}

/// Typed Nodepool operations over a [`StateStore`].
///
/// Cheap to clone. Listings decode each record once per version and skip
/// malformed ones with a warning (never an error for the whole listing).
#[derive(Clone)]
pub struct Store {
    inner: Arc<dyn StateStore>,
    caches: Arc<Mutex<Caches>>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Store")
            .field(&self.inner.describe())
            .finish()
    }
}

fn decode_cached<T: WireRecord>(
    cache: &mut DecodeCache<T>,
    entry: &Entry,
) -> Result<Arc<T>, String> {
    if let Some((mzxid, r)) = cache.get(&entry.path)
        && *mzxid == entry.stat.mzxid
    {
        return r.clone();
    }
    let r = T::from_json(&entry.data)
        .map(Arc::new)
        .map_err(|e| e.to_string());
    if let Err(reason) = &r {
        tracing::warn!(path = %entry.path, %reason, "skipping malformed record");
    }
    cache.insert(entry.path.clone(), (entry.stat.mzxid, r.clone()));
    r
}

fn child_name<'a>(path: &'a str, parent: &str) -> Option<&'a str> {
    let rest = path.strip_prefix(parent)?.strip_prefix('/')?;
    (!rest.is_empty() && !rest.contains('/')).then_some(rest)
}

/// Whether the entry is a lock contender directly under `<record>/lock`.
fn contender_of(path: &str) -> Option<&str> {
    let (dir, name) = super::split_path(path);
    lock_contender_sequence(name)?;
    let (record, lock_name) = super::split_path(dir);
    (lock_name == paths::LOCK).then_some(record)
}

/// Attempts at a write whose outcome was unknown, or that the store could
/// not take (SQLite's disk full), before the error is returned.
const WRITE_ATTEMPTS: u32 = 6;

/// Longest wait for a connected session before an unresolved write's
/// error is returned (a ZooKeeper client gives up a session it cannot
/// reconnect after 1.4 session timeouts and opens a new one; this covers
/// that and a restart of the server).
const RECONNECT_WAIT: std::time::Duration = std::time::Duration::from_secs(60);

/// Whether an error leaves a write's outcome unknown: the request may or
/// may not have been applied before the connection broke.
fn outcome_unknown(e: &StoreError) -> bool {
    matches!(
        e,
        StoreError::Unavailable { .. } | StoreError::Timeout { .. }
    )
}

/// Waits for a connected session (any id: persistent records outlive
/// sessions); false when the store was closed or none came in time.
async fn await_connected(store: &dyn StateStore) -> bool {
    let mut rx = store.session();
    let wait = async {
        loop {
            match *rx.borrow_and_update() {
                SessionState::Connected { .. } => return true,
                SessionState::Closed => return false,
                _ => {}
            }
            if rx.changed().await.is_err() {
                return false;
            }
        }
    };
    tokio::time::timeout(RECONNECT_WAIT, wait)
        .await
        .unwrap_or(false)
}

impl Store {
    /// Wraps a backend.
    pub fn new(inner: Arc<dyn StateStore>) -> Self {
        Store {
            inner,
            caches: Arc::new(Mutex::new(Caches::default())),
        }
    }

    /// The backend.
    pub fn backend(&self) -> &Arc<dyn StateStore> {
        &self.inner
    }

    /// The backend's address, for messages.
    pub fn describe(&self) -> String {
        self.inner.describe()
    }

    // ----- writes whose outcome may be unknown ---------------------------

    /// Sets a record (at `version`, when given) and returns its new
    /// version, resolving a write whose outcome is unknown.
    ///
    /// A connection that breaks after ZooKeeper applied a write reports
    /// the write as failed. Acting on that report (deleting the server a
    /// `ready` node points to, writing the next step at the old version)
    /// is how a dead node gets handed out. So the record is read back once
    /// a session is connected again: our bytes at the next version mean
    /// the write was applied; the old version means it was not, and it is
    /// sent again; anything else is a [`StoreError::Conflict`]. A store
    /// that keeps refusing the write (SQLite's disk full) gets a few
    /// attempts with growing pauses, then its error is returned.
    pub async fn set_resolved(
        &self,
        path: &str,
        data: &[u8],
        version: Option<i32>,
    ) -> Result<i32, StoreError> {
        let mut attempt = 0;
        loop {
            let err = match self.inner.set(path, data, version).await {
                Ok(stat) => return Ok(stat.version),
                Err(e) if outcome_unknown(&e) => e,
                Err(e) => return Err(e),
            };
            attempt += 1;
            if !await_connected(self.inner.as_ref()).await {
                return Err(err);
            }
            match self.inner.get(path).await {
                Ok(Some((current, stat))) => {
                    let ours = current.as_ref() == data;
                    match version {
                        Some(v) if stat.version == v + 1 && ours => return Ok(stat.version),
                        Some(v) if stat.version != v => {
                            return Err(StoreError::Conflict {
                                path: path.to_owned(),
                                reason: "version changed".into(),
                            });
                        }
                        None if ours => return Ok(stat.version),
                        _ => {
                            tracing::debug!(path, error = %err, "write not applied; sending it again");
                        }
                    }
                }
                Ok(None) => {
                    return Err(StoreError::NotFound {
                        path: path.to_owned(),
                    });
                }
                Err(e) if outcome_unknown(&e) => {}
                Err(e) => return Err(e),
            }
            if attempt >= WRITE_ATTEMPTS {
                return Err(err);
            }
            tokio::time::sleep(lock::retry_pause(attempt)).await;
        }
    }

    /// Runs an idempotent operation (a delete that treats "not found" as
    /// done), again when its outcome was unknown.
    async fn retry_unknown<T, F, Fut>(&self, mut op: F) -> Result<T, StoreError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, StoreError>>,
    {
        let mut attempt = 0;
        loop {
            match op().await {
                Err(e) if outcome_unknown(&e) && attempt + 1 < WRITE_ATTEMPTS => {
                    attempt += 1;
                    if !await_connected(self.inner.as_ref()).await {
                        return Err(e);
                    }
                    tokio::time::sleep(lock::retry_pause(attempt)).await;
                }
                other => return other,
            }
        }
    }

    // ----- locks -------------------------------------------------------

    /// Takes a kazoo-compatible lock on a lock directory.
    pub async fn lock(&self, dir: &str, wait: LockWait) -> Result<LockGuard, StoreError> {
        lock::acquire(&self.inner, dir, wait, b"").await
    }

    /// Takes an election's lock, kazoo's `Election`: the lock recipe with
    /// `identifier` as the contender's data (Nodepool's stats election
    /// uses `<hostname>-<pid>`), so operators can see who holds it.
    pub async fn elect(
        &self,
        dir: &str,
        wait: LockWait,
        identifier: &str,
    ) -> Result<LockGuard, StoreError> {
        lock::acquire(&self.inner, dir, wait, identifier.as_bytes()).await
    }

    /// Locks a node.
    ///
    /// Taking a lock creates the lock directory's missing parents, so a
    /// lock attempt racing with the node's deletion would leave an empty
    /// node record behind (Python Nodepool has the same race and cleans
    /// such records up later). So the record is checked under the lock: if
    /// it is gone or empty, the lock is dropped, the empty leftover removed,
    /// and the node reported [`StoreError::NotFound`].
    pub async fn lock_node(&self, id: &str, wait: LockWait) -> Result<LockGuard, StoreError> {
        let path = paths::node(id);
        let guard = self.lock(&paths::node_lock(id), wait).await?;
        match self.inner.get(&path).await {
            Ok(Some((data, _))) if !data.is_empty() => Ok(guard),
            Ok(_) => {
                let _ = guard.release().await;
                if let Ok(Some((data, stat))) = self.inner.get(&path).await
                    && data.is_empty()
                {
                    let _ = self.inner.delete(&paths::node_lock(id), None).await;
                    let _ = self.inner.delete(&path, Some(stat.version)).await;
                }
                Err(StoreError::NotFound { path })
            }
            Err(e) => {
                let _ = guard.release().await;
                Err(e)
            }
        }
    }

    /// Locks a node this process has just created, in one round trip: its
    /// lock directory and our contender are created together (see
    /// [`lock::acquire_new`]). The record needs no check under the lock:
    /// the directory's creation needed it to exist. If someone took the
    /// lock already (the directory exists), this is [`lock_node`](Self::lock_node).
    pub async fn lock_new_node(&self, id: &str, wait: LockWait) -> Result<LockGuard, StoreError> {
        match lock::acquire_new(&self.inner, &paths::node_lock(id), b"").await? {
            Some(guard) => Ok(guard),
            None => self.lock_node(id, wait).await,
        }
    }

    /// Locks a request whose lock directory was missing at the last look
    /// (one nobody has tried to lock yet), in one round trip where the
    /// store can; otherwise, or if the directory exists by now, this is
    /// [`lock_request`](Self::lock_request).
    pub async fn lock_new_request(
        &self,
        id: &str,
        wait: LockWait,
    ) -> Result<LockGuard, StoreError> {
        match lock::acquire_new(&self.inner, &paths::request_lock(id), b"").await? {
            Some(guard) => Ok(guard),
            None => self.lock_request(id, wait).await,
        }
    }

    /// Takes the lock at `dir`, which must not exist yet, and writes `key`
    /// (at `version`, when given) in the same transaction, one round trip
    /// for both: a record nobody has locked yet becomes ours and changes
    /// at once (see [`lock::acquire_new_with`]). Returns the lock and the
    /// record's new version; `Ok(None)` when nothing was done (`dir`
    /// exists, or the store has no transactions): lock and write one
    /// after the other then. A failed version check is a
    /// [`StoreError::Conflict`] on the record, and nothing is locked.
    pub async fn lock_new_and_write<T: WireRecord>(
        &self,
        dir: &str,
        key: &RecordKey<T>,
        value: &T,
        version: Option<i32>,
    ) -> Result<Option<(LockGuard, i32)>, StoreError> {
        Ok(self
            .lock_new_write_and_create_nodes(dir, key, value, version, &[])
            .await?
            .map(|(guard, version, _)| (guard, version)))
    }

    /// [`lock_new_and_write`](Self::lock_new_and_write), and in the same
    /// transaction creates `nodes` (sequential ids, as
    /// [`create_node`](Self::create_node)): a request accepted together
    /// with the `init` nodes it is to get, one round trip where three
    /// were. Returns the lock, the record's new version and the created
    /// nodes' ids in `nodes`' order; `Ok(None)` when nothing was done, as
    /// there. If the outcome is unknown (connection loss), what the
    /// transaction wrote may stay unlocked, as after a crash: a `pending`
    /// request nobody holds and `init` nodes allocated to it, which lost
    /// request clean-up resets and deletes (Python Nodepool's
    /// `_cleanupLostRequests` does the same).
    pub async fn lock_new_write_and_create_nodes<T: WireRecord>(
        &self,
        dir: &str,
        key: &RecordKey<T>,
        value: &T,
        version: Option<i32>,
        nodes: &[Node],
    ) -> Result<Option<(LockGuard, i32, Vec<String>)>, StoreError> {
        let data = value.to_json();
        let node_data: Vec<Vec<u8>> = nodes.iter().map(WireRecord::to_json).collect();
        let node_prefix = format!("{}/", paths::NODES);
        let mut ops = Vec::with_capacity(1 + nodes.len());
        ops.push(MultiOp::Set {
            path: key.path(),
            data: &data,
            version,
        });
        ops.extend(node_data.iter().map(|d| MultiOp::Create {
            path: &node_prefix,
            data: d,
            mode: CreateMode::PersistentSequential,
        }));
        let attempt = match lock::acquire_new_with(&self.inner, dir, b"", &ops).await {
            // A transaction makes no parents: on a store where no node was
            // ever created the nodes' parent is missing. Made (as a
            // create's makepath would) and tried once more.
            Err(StoreError::NotFound { path })
                if !nodes.is_empty() && path.trim_end_matches('/') == paths::NODES =>
            {
                match self
                    .inner
                    .create(paths::NODES, b"", CreateMode::Persistent)
                    .await
                {
                    Ok(_) | Err(StoreError::Conflict { .. }) => {}
                    Err(e) => return Err(e),
                }
                lock::acquire_new_with(&self.inner, dir, b"", &ops).await
            }
            other => other,
        };
        let Some((guard, results)) = attempt? else {
            return Ok(None);
        };
        let unexpected = |other: &dyn std::fmt::Debug| {
            StoreError::Other(format!(
                "{}: unexpected transaction result {other:?}",
                key.path()
            ))
        };
        let mut results = results.into_iter();
        let written = match results.next() {
            Some(MultiResult::Set(stat)) => stat.version,
            other => {
                let _ = guard.release().await;
                return Err(unexpected(&other));
            }
        };
        let mut ids = Vec::with_capacity(nodes.len());
        for r in results {
            match r {
                MultiResult::Created(path) => ids.push(super::split_path(&path).1.to_owned()),
                other => {
                    let _ = guard.release().await;
                    return Err(unexpected(&other));
                }
            }
        }
        if ids.len() != nodes.len() {
            let _ = guard.release().await;
            return Err(unexpected(&ids));
        }
        Ok(Some((guard, written, ids)))
    }

    /// Writes records under locks the caller holds, each at its version,
    /// and releases those locks, all in one transaction (one round trip:
    /// everything or nothing). Returns the records' new versions, or
    /// `Ok(None)` when nothing was written (the store has no
    /// transactions, or a connection loss left the outcome unknown and
    /// the record read back says it was not applied): write and release
    /// one at a time then. On success the guards are spent: `forget` them.
    /// A failed version check is a [`StoreError::Conflict`] on that record,
    /// and nothing is written.
    pub async fn write_and_release(
        &self,
        writes: &[(&str, &[u8], i32)],
        guards: &[&LockGuard],
    ) -> Result<Option<Vec<i32>>, StoreError> {
        for g in guards {
            if !g.wait_held().await {
                return Err(StoreError::SessionLost);
            }
        }
        let mut ops: Vec<MultiOp<'_>> = writes
            .iter()
            .map(|(path, data, version)| MultiOp::Set {
                path,
                data,
                version: Some(*version),
            })
            .collect();
        ops.extend(guards.iter().map(|g| MultiOp::Delete {
            path: g.contender(),
            version: None,
        }));
        let err = match self.inner.multi(&ops).await {
            Ok(None) => return Ok(None),
            Ok(Some(_)) => return Ok(Some(writes.iter().map(|(_, _, v)| v + 1).collect())),
            Err(e) if outcome_unknown(&e) => e,
            Err(e) => return Err(e),
        };
        // All or nothing: the first record tells whether it was applied.
        let Some((path, data, version)) = writes.first() else {
            return Err(err);
        };
        if !await_connected(self.inner.as_ref()).await {
            return Err(err);
        }
        match self.inner.get(path).await? {
            Some((current, stat)) if stat.version == version + 1 && current.as_ref() == *data => {
                Ok(Some(writes.iter().map(|(_, _, v)| v + 1).collect()))
            }
            Some((_, stat)) if stat.version == *version => Ok(None),
            Some(_) => Err(StoreError::Conflict {
                path: (*path).to_owned(),
                reason: "version changed".into(),
            }),
            None => Err(StoreError::NotFound {
                path: (*path).to_owned(),
            }),
        }
    }

    /// Locks a request (its lock lives under `/nodepool/requests-lock`).
    pub async fn lock_request(&self, id: &str, wait: LockWait) -> Result<LockGuard, StoreError> {
        self.lock(&paths::request_lock(id), wait).await
    }

    /// Whether a node's lock has any contender.
    pub async fn is_node_locked(&self, id: &str) -> Result<bool, StoreError> {
        lock::is_locked(self.inner.as_ref(), &paths::node_lock(id)).await
    }

    /// Breaks a node's lock (deletes its lowest contender).
    pub async fn force_unlock_node(&self, id: &str) -> Result<bool, StoreError> {
        lock::force_unlock(self.inner.as_ref(), &paths::node_lock(id)).await
    }

    // ----- nodes -------------------------------------------------------

    /// Creates a node record with the next sequential id.
    pub async fn create_node(&self, node: &Node) -> Result<String, StoreError> {
        let path = self
            .inner
            .create(
                &format!("{}/", paths::NODES),
                &node.to_json(),
                CreateMode::PersistentSequential,
            )
            .await?;
        Ok(super::split_path(&path).1.to_owned())
    }

    /// Reads one node; `Ok(None)` if it does not exist.
    pub async fn get_node(&self, id: &str) -> Result<Option<Versioned<Node>>, StoreError> {
        self.read(&RecordKey::node(id)).await
    }

    /// Writes a node if it is still at `version`; returns the new version.
    pub async fn update_node(
        &self,
        id: &str,
        node: &Node,
        version: i32,
    ) -> Result<i32, StoreError> {
        self.set_resolved(&paths::node(id), &node.to_json(), Some(version))
            .await
    }

    /// Writes a node regardless of version (only under its lock).
    pub async fn store_node(&self, id: &str, node: &Node) -> Result<i32, StoreError> {
        self.set_resolved(&paths::node(id), &node.to_json(), None)
            .await
    }

    /// Deletes a node record and its lock directory.
    pub async fn delete_node(&self, id: &str) -> Result<(), StoreError> {
        let path = paths::node(id);
        self.retry_unknown(|| self.inner.delete_tree(&path)).await
    }

    /// Scans several prefixes as one view where the store gives one
    /// ([`StateStore::scan_together`]).
    async fn scan_together<const N: usize>(
        &self,
        prefixes: [&str; N],
    ) -> Result<[Vec<Entry>; N], StoreError> {
        let scans = self.inner.scan_together(&prefixes).await?;
        scans.try_into().map_err(|got: Vec<Vec<Entry>>| {
            StoreError::Other(format!(
                "{}: {} scans for {N} prefixes",
                self.inner.describe(),
                got.len()
            ))
        })
    }

    /// What a planning pass reads, as one view where the store gives one
    /// (a ZooKeeper mirror: after one sync, from one state of the mirror),
    /// so that a request's state and its lock, or a node and the request
    /// it is allocated to, are never read at different times.
    pub async fn listings(&self) -> Result<Listings, StoreError> {
        let pools = paths::components(ComponentKind::Pool.as_str());
        let [nodes, requests, locks, pool_entries, images] = self
            .scan_together([
                paths::NODES,
                paths::REQUESTS,
                paths::REQUESTS_LOCK,
                pools.as_str(),
                paths::IMAGES,
            ])
            .await?;
        let lock_dirs = Self::lock_dirs_from(&locks);
        Ok(Listings {
            nodes: self.nodes_from(&nodes),
            requests: self.requests_from(&requests, &lock_dirs),
            request_lock_dirs: lock_dirs,
            pools: self.components_from(&pools, &pool_entries),
            images: Self::images_from(&images),
        })
    }

    /// Every node, with its lock state.
    pub async fn list_nodes(&self) -> Result<Listing<NodeRecord>, StoreError> {
        let entries = self.inner.scan(paths::NODES).await?;
        Ok(self.nodes_from(&entries))
    }

    /// The nodes of a scan of [`paths::NODES`].
    fn nodes_from(&self, entries: &[Entry]) -> Listing<NodeRecord> {
        let mut locked: HashSet<&str> = HashSet::new();
        for e in entries {
            if let Some(record) = contender_of(&e.path) {
                locked.insert(record);
            }
        }
        let mut out = Listing {
            records: Vec::new(),
            malformed: Vec::new(),
        };
        let mut caches = self.caches.lock().unwrap_or_else(|p| p.into_inner());
        let mut seen = HashSet::with_capacity(entries.len());
        for e in entries {
            let Some(id) = child_name(&e.path, paths::NODES) else {
                continue;
            };
            seen.insert(e.path.as_str());
            // A node znode without data is an empty leftover: cleanup deletes it.
            if e.data.is_empty() {
                out.malformed.push(Malformed {
                    path: e.path.clone(),
                    reason: "empty record".into(),
                });
                continue;
            }
            match decode_cached(&mut caches.nodes, e) {
                Ok(node) => out.records.push(NodeRecord {
                    id: id.to_owned(),
                    node,
                    version: e.stat.version,
                    locked: locked.contains(e.path.as_str()),
                }),
                Err(reason) => out.malformed.push(Malformed {
                    path: e.path.clone(),
                    reason,
                }),
            }
        }
        caches.nodes.retain(|k, _| seen.contains(k.as_str()));
        out
    }

    // ----- requests ----------------------------------------------------

    /// Submits a request with a priority prefix (`100`, `200`, `300`, `900`);
    /// returns its id `<prio>-<seq10>`.
    pub async fn submit_request(
        &self,
        request: &NodeRequest,
        priority: &str,
        ephemeral: bool,
    ) -> Result<String, StoreError> {
        let mode = if ephemeral {
            CreateMode::EphemeralSequential
        } else {
            CreateMode::PersistentSequential
        };
        let path = self
            .inner
            .create(&paths::request_prefix(priority), &request.to_json(), mode)
            .await?;
        Ok(super::split_path(&path).1.to_owned())
    }

    /// Reads one request; `Ok(None)` if it does not exist.
    pub async fn get_request(
        &self,
        id: &str,
    ) -> Result<Option<Versioned<NodeRequest>>, StoreError> {
        self.read(&RecordKey::request(id)).await
    }

    /// Writes a request if it is still at `version`; returns the new version.
    pub async fn update_request(
        &self,
        id: &str,
        request: &NodeRequest,
        version: i32,
    ) -> Result<i32, StoreError> {
        self.set_resolved(&paths::request(id), &request.to_json(), Some(version))
            .await
    }

    /// Deletes a request (its lock directory is left, as Nodepool does;
    /// cleanup removes stale ones).
    pub async fn delete_request(&self, id: &str) -> Result<(), StoreError> {
        let path = paths::request(id);
        self.retry_unknown(|| async {
            match self.inner.delete(&path, None).await {
                Ok(()) | Err(StoreError::NotFound { .. }) => Ok(()),
                Err(e) => Err(e),
            }
        })
        .await
    }

    /// Every request, with its lock state (requests and their locks as one
    /// view where the store gives one: see [`StateStore::scan_together`]).
    pub async fn list_requests(&self) -> Result<Listing<RequestRecord>, StoreError> {
        let [requests, locks] = self
            .scan_together([paths::REQUESTS, paths::REQUESTS_LOCK])
            .await?;
        Ok(self.requests_from(&requests, &Self::lock_dirs_from(&locks)))
    }

    /// The requests of a scan of [`paths::REQUESTS`], locked as `lock_dirs` say.
    fn requests_from(
        &self,
        entries: &[Entry],
        lock_dirs: &[RequestLockDir],
    ) -> Listing<RequestRecord> {
        let locked: HashSet<&str> = lock_dirs
            .iter()
            .filter(|d| d.locked)
            .map(|d| d.id.as_str())
            .collect();
        let mut out = Listing {
            records: Vec::new(),
            malformed: Vec::new(),
        };
        let mut caches = self.caches.lock().unwrap_or_else(|p| p.into_inner());
        let mut seen = HashSet::with_capacity(entries.len());
        for e in entries {
            let Some(id) = child_name(&e.path, paths::REQUESTS) else {
                continue;
            };
            seen.insert(e.path.as_str());
            match decode_cached(&mut caches.requests, e) {
                Ok(request) => out.records.push(RequestRecord {
                    id: id.to_owned(),
                    request,
                    version: e.stat.version,
                    ephemeral: e.stat.ephemeral_owner != 0,
                    ephemeral_owner: e.stat.ephemeral_owner,
                    locked: locked.contains(id),
                }),
                Err(reason) => out.malformed.push(Malformed {
                    path: e.path.clone(),
                    reason,
                }),
            }
        }
        caches.requests.retain(|k, _| seen.contains(k.as_str()));
        out
    }

    /// Request lock directories, for stale-lock cleanup.
    pub async fn list_request_lock_dirs(&self) -> Result<Vec<RequestLockDir>, StoreError> {
        let entries = self.inner.scan(paths::REQUESTS_LOCK).await?;
        Ok(Self::lock_dirs_from(&entries))
    }

    /// The lock directories of a scan of [`paths::REQUESTS_LOCK`].
    fn lock_dirs_from(entries: &[Entry]) -> Vec<RequestLockDir> {
        let mut dirs: BTreeMap<&str, RequestLockDir> = BTreeMap::new();
        for e in entries {
            if let Some(id) = child_name(&e.path, paths::REQUESTS_LOCK) {
                dirs.insert(
                    id,
                    RequestLockDir {
                        id: id.to_owned(),
                        mtime_ms: e.stat.mtime,
                        locked: false,
                    },
                );
            }
        }
        for e in entries {
            let (dir, name) = super::split_path(&e.path);
            if lock_contender_sequence(name).is_some()
                && let Some(id) = child_name(dir, paths::REQUESTS_LOCK)
                && let Some(d) = dirs.get_mut(id)
            {
                d.locked = true;
            }
        }
        dirs.into_values().collect()
    }

    /// Deletes a request lock directory (only if nobody holds it).
    pub async fn delete_request_lock_dir(&self, id: &str) -> Result<(), StoreError> {
        match self.inner.delete(&paths::request_lock(id), None).await {
            Ok(()) | Err(StoreError::NotFound { .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }

    // ----- images ------------------------------------------------------

    /// Everything under `/nodepool/images`.
    pub async fn image_state(&self) -> Result<ImageState, StoreError> {
        let entries = self.inner.scan(paths::IMAGES).await?;
        Ok(Self::images_from(&entries))
    }

    /// The image state of a scan of [`paths::IMAGES`].
    fn images_from(entries: &[Entry]) -> ImageState {
        let mut locked: BTreeSet<&str> = BTreeSet::new();
        for e in entries {
            if let Some(record) = contender_of(&e.path) {
                locked.insert(record);
            }
        }
        let mut st = ImageState::default();
        for record in &locked {
            if let Some(image) = record
                .strip_prefix(paths::IMAGES)
                .and_then(|r| r.strip_prefix('/'))
                .and_then(|r| r.strip_suffix("/builds"))
                .filter(|i| !i.contains('/'))
            {
                st.build_locked.insert(image.to_owned());
            }
        }
        for e in entries {
            match classify_image_path(&e.path) {
                ImagePath::Image(image) => {
                    st.images.insert(image.to_owned());
                }
                ImagePath::UploadRequest(image, provider) => {
                    st.upload_requests.insert(
                        (image.to_owned(), provider.to_owned()),
                        e.stat.ctime as f64 / 1000.0,
                    );
                }
                ImagePath::Pause(image) => {
                    st.paused.insert(image.to_owned());
                }
                ImagePath::BuildRequest(image) => {
                    st.build_requests
                        .insert(image.to_owned(), e.stat.ctime as f64 / 1000.0);
                }
                ImagePath::Build(image, build) => match ImageBuild::from_json(&e.data) {
                    Ok(b) => st.builds.push(BuildRecord {
                        image: image.to_owned(),
                        id: build.to_owned(),
                        build: b,
                        version: e.stat.version,
                        locked: locked.contains(e.path.as_str()),
                    }),
                    Err(err) => {
                        st.unreadable_builds
                            .insert((image.to_owned(), build.to_owned()));
                        st.malformed.push(Malformed {
                            path: e.path.clone(),
                            reason: err.to_string(),
                        })
                    }
                },
                ImagePath::Upload(image, build, provider, upload) => {
                    match ImageUpload::from_json(&e.data) {
                        Ok(u) => {
                            let uploads_dir = paths::uploads(image, build, provider);
                            st.uploads.push(UploadRecord {
                                image: image.to_owned(),
                                build_id: build.to_owned(),
                                provider: provider.to_owned(),
                                id: upload.to_owned(),
                                upload: u,
                                version: e.stat.version,
                                locked: locked.contains(e.path.as_str()),
                                uploads_locked: locked.contains(uploads_dir.as_str()),
                            })
                        }
                        Err(err) => {
                            st.unreadable_builds
                                .insert((image.to_owned(), build.to_owned()));
                            st.malformed.push(Malformed {
                                path: e.path.clone(),
                                reason: err.to_string(),
                            })
                        }
                    }
                }
                ImagePath::Other => {}
            }
        }
        for m in &st.malformed {
            tracing::warn!(path = %m.path, reason = %m.reason, "skipping malformed image record");
        }
        st
    }

    /// Creates a build record at `/nodepool/images/<image>/builds/<id>`.
    pub async fn create_build(
        &self,
        image: &str,
        id: &str,
        build: &ImageBuild,
    ) -> Result<(), StoreError> {
        self.inner
            .create(
                &paths::build(image, id),
                &build.to_json(),
                CreateMode::Persistent,
            )
            .await
            .map(|_| ())
    }

    /// Reads a build.
    pub async fn get_build(
        &self,
        image: &str,
        id: &str,
    ) -> Result<Option<Versioned<ImageBuild>>, StoreError> {
        self.read(&RecordKey::build(image, id)).await
    }

    /// Writes a build; with `version`, only at that version.
    pub async fn update_build(
        &self,
        image: &str,
        id: &str,
        build: &ImageBuild,
        version: Option<i32>,
    ) -> Result<i32, StoreError> {
        self.set_resolved(&paths::build(image, id), &build.to_json(), version)
            .await
    }

    /// Deletes a build and everything under it.
    pub async fn delete_build(&self, image: &str, id: &str) -> Result<(), StoreError> {
        self.inner.delete_tree(&paths::build(image, id)).await
    }

    /// Creates an upload record with the next sequential id for this build
    /// and provider.
    pub async fn create_upload(
        &self,
        image: &str,
        build: &str,
        provider: &str,
        upload: &ImageUpload,
    ) -> Result<String, StoreError> {
        let path = self
            .inner
            .create(
                &format!("{}/", paths::uploads(image, build, provider)),
                &upload.to_json(),
                CreateMode::PersistentSequential,
            )
            .await?;
        Ok(super::split_path(&path).1.to_owned())
    }

    /// Reads an upload.
    pub async fn get_upload(
        &self,
        image: &str,
        build: &str,
        provider: &str,
        id: &str,
    ) -> Result<Option<Versioned<ImageUpload>>, StoreError> {
        self.read(&RecordKey::upload(image, build, provider, id))
            .await
    }

    /// Writes an upload; with `version`, only at that version.
    #[allow(clippy::too_many_arguments)]
    pub async fn update_upload(
        &self,
        image: &str,
        build: &str,
        provider: &str,
        id: &str,
        upload: &ImageUpload,
        version: Option<i32>,
    ) -> Result<i32, StoreError> {
        self.set_resolved(
            &paths::upload(image, build, provider, id),
            &upload.to_json(),
            version,
        )
        .await
    }

    /// Deletes an upload record.
    pub async fn delete_upload(
        &self,
        image: &str,
        build: &str,
        provider: &str,
        id: &str,
    ) -> Result<(), StoreError> {
        self.inner
            .delete_tree(&paths::upload(image, build, provider, id))
            .await
    }

    /// Pauses or unpauses an image's builds (`image-pause`).
    pub async fn set_image_paused(&self, image: &str, paused: bool) -> Result<(), StoreError> {
        let path = paths::image_pause(image);
        if paused {
            match self.inner.create(&path, b"", CreateMode::Persistent).await {
                Ok(_) | Err(StoreError::Conflict { .. }) => Ok(()),
                Err(e) => Err(e),
            }
        } else {
            match self.inner.delete(&path, None).await {
                Ok(()) | Err(StoreError::NotFound { .. }) => Ok(()),
                Err(e) => Err(e),
            }
        }
    }

    /// Asks for a build of an image (`image-build`).
    pub async fn request_image_build(&self, image: &str) -> Result<(), StoreError> {
        match self
            .inner
            .create(
                &paths::image_build_request(image),
                b"",
                CreateMode::Persistent,
            )
            .await
        {
            Ok(_) | Err(StoreError::Conflict { .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Removes a build request (after a successful build).
    pub async fn clear_image_build_request(&self, image: &str) -> Result<(), StoreError> {
        match self
            .inner
            .delete(&paths::image_build_request(image), None)
            .await
        {
            Ok(()) | Err(StoreError::NotFound { .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Asks for a fresh upload of an image's newest ready build to a
    /// provider (`image-upload PROVIDER IMAGE`); see
    /// [`paths::image_upload_request`]. An existing request is kept as is.
    pub async fn request_image_upload(
        &self,
        image: &str,
        provider: &str,
    ) -> Result<(), StoreError> {
        match self
            .inner
            .create(
                &paths::image_upload_request(image, provider),
                b"",
                CreateMode::Persistent,
            )
            .await
        {
            Ok(_) | Err(StoreError::Conflict { .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Removes an upload request (after the upload, or when it cannot be served).
    pub async fn clear_image_upload_request(
        &self,
        image: &str,
        provider: &str,
    ) -> Result<(), StoreError> {
        match self
            .inner
            .delete(&paths::image_upload_request(image, provider), None)
            .await
        {
            Ok(()) | Err(StoreError::NotFound { .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }

    // ----- components --------------------------------------------------

    /// Registers this process's component: an ephemeral sequential record
    /// `/nodepool/components/<kind>/<hostname><seq10>`.
    pub async fn register_component(
        &self,
        component: &Component,
    ) -> Result<ComponentRegistration, StoreError> {
        let prefix = format!(
            "{}/{}",
            paths::components(component.kind.as_str()),
            component.hostname
        );
        let path = self
            .inner
            .create(
                &prefix,
                &component.to_json(),
                CreateMode::EphemeralSequential,
            )
            .await?;
        Ok(ComponentRegistration { path, version: 0 })
    }

    /// Updates a registration (compare-and-set on its version).
    pub async fn update_component(
        &self,
        reg: &mut ComponentRegistration,
        component: &Component,
    ) -> Result<(), StoreError> {
        reg.version = self
            .set_resolved(&reg.path, &component.to_json(), Some(reg.version))
            .await?;
        Ok(())
    }

    /// Removes a registration.
    pub async fn unregister_component(
        &self,
        reg: &ComponentRegistration,
    ) -> Result<(), StoreError> {
        match self.inner.delete(&reg.path, None).await {
            Ok(()) | Err(StoreError::NotFound { .. }) | Err(StoreError::SessionLost) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Registered components of one kind.
    pub async fn list_components(
        &self,
        kind: ComponentKind,
    ) -> Result<Listing<(String, Component)>, StoreError> {
        let dir = paths::components(kind.as_str());
        let entries = self.inner.scan(&dir).await?;
        Ok(self.components_from(&dir, &entries))
    }

    /// The components of a scan of their directory `dir`.
    fn components_from(&self, dir: &str, entries: &[Entry]) -> Listing<(String, Component)> {
        let mut out = Listing {
            records: Vec::new(),
            malformed: Vec::new(),
        };
        let mut caches = self.caches.lock().unwrap_or_else(|p| p.into_inner());
        let mut seen = HashSet::with_capacity(entries.len());
        for e in entries {
            let Some(name) = child_name(&e.path, dir) else {
                continue;
            };
            seen.insert(e.path.as_str());
            // An empty registration (a component that died between
            // creating its record and writing it, or a foreign writer) is
            // malformed too: warned about once, by the decode cache.
            match decode_cached(&mut caches.components, e) {
                Ok(c) => out.records.push((name.to_owned(), Component::clone(&c))),
                Err(reason) => out.malformed.push(Malformed {
                    path: e.path.clone(),
                    reason,
                }),
            }
        }
        let prefix = format!("{dir}/");
        caches
            .components
            .retain(|k, _| !k.starts_with(&prefix) || seen.contains(k.as_str()));
        out
    }
}
