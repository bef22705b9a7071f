//! An in-memory [`StateStore`] with ZooKeeper's semantics: for embedding
//! (a launcher and its clients in one process, nothing to install), for
//! planning on a copy of real state, and for fast tests.
//!
//! One [`MemoryStore::new`] is one "server"; [`MemoryStore::new_session`]
//! opens another client session on it, so several clients (a launcher and
//! a requestor, two launchers) share records, locks and ephemeral records
//! as they would on ZooKeeper. Fault knobs ([`MemoryStore::suspend`],
//! [`MemoryStore::expire_session`], [`MemoryStore::ambiguous_writes`])
//! reproduce what a real store does to its clients.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI64, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use bytes::Bytes;
use tokio::sync::{broadcast, watch};

use crate::store::{
    CreateMode, Entry, SessionState, Stat, StateStore, StoreError, StoreEvent, split_path,
    validate_path,
};

#[derive(Debug)]
struct Record {
    data: Bytes,
    stat: Stat,
    /// Next sequence number for sequential children.
    next_seq: i64,
}

#[derive(Debug, Default)]
struct Tree {
    records: BTreeMap<String, Record>,
    zxid: i64,
}

#[derive(Debug)]
struct Backend {
    tree: Mutex<Tree>,
    events: broadcast::Sender<StoreEvent>,
    next_session: AtomicI64,
}

/// An in-memory store client. Cheap to clone (clones share the session).
#[derive(Clone, Debug)]
pub struct MemoryStore {
    backend: Arc<Backend>,
    session: Arc<Mutex<i64>>,
    session_tx: Arc<watch::Sender<SessionState>>,
    /// Writes still to apply and then report as failed (see
    /// [`MemoryStore::ambiguous_writes`]).
    ambiguous: Arc<AtomicU32>,
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryStore {
    /// A new empty store with one client session.
    pub fn new() -> Self {
        let (events, _) = broadcast::channel(16_384);
        let backend = Arc::new(Backend {
            tree: Mutex::new(Tree::default()),
            events,
            next_session: AtomicI64::new(1),
        });
        Self::session_on(backend)
    }

    fn session_on(backend: Arc<Backend>) -> Self {
        let id = backend.next_session.fetch_add(1, Ordering::SeqCst);
        let (tx, _) = watch::channel(SessionState::Connected { id });
        MemoryStore {
            backend,
            session: Arc::new(Mutex::new(id)),
            session_tx: Arc::new(tx),
            ambiguous: Arc::new(AtomicU32::new(0)),
        }
    }

    /// Another client session on the same store.
    pub fn new_session(&self) -> Self {
        Self::session_on(self.backend.clone())
    }

    fn tree(&self) -> std::sync::MutexGuard<'_, Tree> {
        self.backend.tree.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn session_id(&self) -> Result<i64, StoreError> {
        match *self.session_tx.borrow() {
            SessionState::Connected { id } => Ok(id),
            SessionState::Suspended { .. } => Err(self.unavailable("connection lost")),
            _ => Err(StoreError::SessionLost),
        }
    }

    fn unavailable(&self, reason: &str) -> StoreError {
        StoreError::Unavailable {
            store: "memory store".into(),
            reason: reason.into(),
        }
    }

    /// Simulates a lost connection (ZooKeeper stopped): the session is
    /// suspended and every operation fails with
    /// [`StoreError::Unavailable`] until [`resume`](Self::resume).
    pub fn suspend(&self) {
        let id = *self.session.lock().unwrap_or_else(|p| p.into_inner());
        self.session_tx.send_replace(SessionState::Suspended { id });
    }

    /// Reconnects a suspended session: its locks and ephemerals survived.
    pub fn resume(&self) {
        let id = *self.session.lock().unwrap_or_else(|p| p.into_inner());
        self.session_tx.send_replace(SessionState::Connected { id });
    }

    /// The next `n` record writes (`set`) are applied and then reported as
    /// [`StoreError::Unavailable`], as when ZooKeeper applied a write and
    /// the connection broke before its answer arrived.
    pub fn ambiguous_writes(&self, n: u32) {
        self.ambiguous.store(n, Ordering::SeqCst);
    }

    fn emit(&self, events: Vec<StoreEvent>) {
        for e in events {
            let _ = self.backend.events.send(e);
        }
    }

    /// Deletes every ephemeral record of a session.
    fn drop_ephemerals(&self, session: i64) {
        let mut events = Vec::new();
        {
            let mut tree = self.tree();
            let doomed: Vec<String> = tree
                .records
                .iter()
                .filter(|(_, r)| r.stat.ephemeral_owner == session)
                .map(|(p, _)| p.clone())
                .collect();
            for path in doomed {
                tree.records.remove(&path);
                let (parent, _) = split_path(&path);
                if let Some(p) = tree.records.get_mut(parent) {
                    p.stat.num_children -= 1;
                }
                events.push(StoreEvent::Deleted(path));
            }
        }
        self.emit(events);
    }

    /// Simulates session expiry: the session's ephemerals and locks go,
    /// and the client reconnects with a new session (as the ZooKeeper
    /// store does).
    pub fn expire_session(&self) {
        let old = *self.session.lock().unwrap_or_else(|p| p.into_inner());
        self.session_tx.send_replace(SessionState::Expired);
        self.drop_ephemerals(old);
        let id = self.backend.next_session.fetch_add(1, Ordering::SeqCst);
        *self.session.lock().unwrap_or_else(|p| p.into_inner()) = id;
        self.session_tx.send_replace(SessionState::Connected { id });
    }
}

#[async_trait]
impl StateStore for MemoryStore {
    fn describe(&self) -> String {
        "memory store".into()
    }

    async fn create(
        &self,
        path: &str,
        data: &[u8],
        mode: CreateMode,
    ) -> Result<String, StoreError> {
        let session = self.session_id()?;
        let (parent, name) = split_path(path);
        validate_path(parent)?;
        if name.is_empty() && !mode.is_sequential() {
            return Err(StoreError::Other(format!("invalid path {path:?}")));
        }
        let mut events = Vec::new();
        let created = {
            let mut tree = self.tree();
            // Ensure ancestors exist (persistent, empty).
            let mut missing = Vec::new();
            let mut cur = parent;
            while cur != "/" && !tree.records.contains_key(cur) {
                missing.push(cur.to_owned());
                cur = split_path(cur).0;
            }
            for p in missing.into_iter().rev() {
                tree.zxid += 1;
                let z = tree.zxid;
                let t = now_ms();
                if let Some(pp) = tree.records.get_mut(split_path(&p).0) {
                    pp.stat.num_children += 1;
                }
                tree.records.insert(
                    p.clone(),
                    Record {
                        data: Bytes::new(),
                        stat: Stat {
                            czxid: z,
                            mzxid: z,
                            ctime: t,
                            mtime: t,
                            ..Stat::default()
                        },
                        next_seq: 0,
                    },
                );
                events.push(StoreEvent::Created(p));
            }
            if let Some(p) = tree.records.get(parent)
                && p.stat.ephemeral_owner != 0
            {
                return Err(StoreError::Other(format!(
                    "{parent}: ephemeral records cannot have children"
                )));
            }
            let full = if mode.is_sequential() {
                let seq = match tree.records.get_mut(parent) {
                    Some(p) => {
                        let s = p.next_seq;
                        p.next_seq += 1;
                        s
                    }
                    None => 0,
                };
                format!("{path}{seq:010}")
            } else {
                path.to_owned()
            };
            if tree.records.contains_key(&full) {
                return Err(StoreError::Conflict {
                    path: full,
                    reason: "already exists".into(),
                });
            }
            tree.zxid += 1;
            let z = tree.zxid;
            let t = now_ms();
            if let Some(p) = tree.records.get_mut(parent) {
                p.stat.num_children += 1;
                if !mode.is_sequential() {
                    // Keep sequence numbers moving like ZooKeeper's cversion.
                    p.next_seq += 1;
                }
            }
            tree.records.insert(
                full.clone(),
                Record {
                    data: Bytes::copy_from_slice(data),
                    stat: Stat {
                        czxid: z,
                        mzxid: z,
                        ctime: t,
                        mtime: t,
                        ephemeral_owner: if mode.is_ephemeral() { session } else { 0 },
                        ..Stat::default()
                    },
                    next_seq: 0,
                },
            );
            events.push(StoreEvent::Created(full.clone()));
            full
        };
        self.emit(events);
        Ok(created)
    }

    async fn get(&self, path: &str) -> Result<Option<(Bytes, Stat)>, StoreError> {
        self.session_id()?;
        let tree = self.tree();
        Ok(tree.records.get(path).map(|r| (r.data.clone(), r.stat)))
    }

    async fn set(&self, path: &str, data: &[u8], version: Option<i32>) -> Result<Stat, StoreError> {
        self.session_id()?;
        let stat = {
            let mut tree = self.tree();
            tree.zxid += 1;
            let z = tree.zxid;
            let Some(r) = tree.records.get_mut(path) else {
                return Err(StoreError::NotFound { path: path.into() });
            };
            if let Some(v) = version
                && r.stat.version != v
            {
                return Err(StoreError::Conflict {
                    path: path.into(),
                    reason: format!("version is {}, not {v}", r.stat.version),
                });
            }
            r.data = Bytes::copy_from_slice(data);
            r.stat.version += 1;
            r.stat.mzxid = z;
            r.stat.mtime = now_ms();
            r.stat
        };
        self.emit(vec![StoreEvent::Changed(path.into())]);
        let lie = self
            .ambiguous
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        if lie {
            return Err(self.unavailable("connection reset after the write was sent"));
        }
        Ok(stat)
    }

    async fn delete(&self, path: &str, version: Option<i32>) -> Result<(), StoreError> {
        self.session_id()?;
        {
            let mut tree = self.tree();
            let Some(r) = tree.records.get(path) else {
                return Err(StoreError::NotFound { path: path.into() });
            };
            if let Some(v) = version
                && r.stat.version != v
            {
                return Err(StoreError::Conflict {
                    path: path.into(),
                    reason: format!("version is {}, not {v}", r.stat.version),
                });
            }
            if r.stat.num_children > 0 {
                return Err(StoreError::NotEmpty { path: path.into() });
            }
            tree.records.remove(path);
            tree.zxid += 1;
            if let Some(p) = tree.records.get_mut(split_path(path).0) {
                p.stat.num_children -= 1;
                p.next_seq += 1;
            }
        }
        self.emit(vec![StoreEvent::Deleted(path.into())]);
        Ok(())
    }

    async fn children(&self, path: &str) -> Result<Vec<String>, StoreError> {
        self.session_id()?;
        let tree = self.tree();
        if !tree.records.contains_key(path) {
            return Err(StoreError::NotFound { path: path.into() });
        }
        let prefix = if path == "/" {
            "/".to_owned()
        } else {
            format!("{path}/")
        };
        Ok(tree
            .records
            .range(prefix.clone()..)
            .take_while(|(p, _)| p.starts_with(&prefix))
            .filter(|(p, _)| !p[prefix.len()..].contains('/'))
            .map(|(p, _)| p[prefix.len()..].to_owned())
            .collect())
    }

    async fn scan(&self, prefix: &str) -> Result<Vec<Entry>, StoreError> {
        self.session_id()?;
        let tree = self.tree();
        let below = format!("{prefix}/");
        let mut out = Vec::new();
        if let Some(r) = tree.records.get(prefix) {
            out.push(Entry {
                path: prefix.to_owned(),
                data: r.data.clone(),
                stat: r.stat,
            });
        }
        for (p, r) in tree.records.range(below.clone()..) {
            if !p.starts_with(&below) {
                break;
            }
            out.push(Entry {
                path: p.clone(),
                data: r.data.clone(),
                stat: r.stat,
            });
        }
        Ok(out)
    }

    fn subscribe(&self) -> broadcast::Receiver<StoreEvent> {
        self.backend.events.subscribe()
    }

    fn session(&self) -> watch::Receiver<SessionState> {
        self.session_tx.subscribe()
    }

    async fn close(&self) -> Result<(), StoreError> {
        let id = *self.session.lock().unwrap_or_else(|p| p.into_inner());
        self.session_tx.send_replace(SessionState::Closed);
        self.drop_ephemerals(id);
        Ok(())
    }
}
