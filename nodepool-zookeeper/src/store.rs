//! [`ZooKeeperStore`]: the [`StateStore`] operations, and the session
//! supervisor that keeps the mirror of `/nodepool` fresh and replaces an
//! expired session.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::future::BoxFuture;
use futures::stream::FuturesOrdered;
use futures::{FutureExt, StreamExt};
use nodepool_model::store::{
    CreateMode, Entry, InFlight, MultiOp, MultiResult, SessionState, Stat, StateStore, StoreError,
    StoreEvent, StoreHealth, split_path, validate_path,
};
use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::{CancellationToken, DropGuard};
use zookeeper_client as zk;

use crate::cache::{self, Cached, TreeCache};
use crate::error::{self, is_connection, is_terminal};
use crate::options::{TlsFiles, ZooKeeperOptions};

/// Capacity of the change stream; a subscriber that falls further behind
/// gets `Lagged` and rescans (the lock recipe handles that).
const EVENT_CAPACITY: usize = 16_384;

/// Longest pause between attempts to open a new session after expiry.
const MAX_BACKOFF: Duration = Duration::from_secs(10);

/// A [`StateStore`] on ZooKeeper, wire-compatible with Python Nodepool and
/// Zuul. Cheap to clone; clones share one session. Dropping the last clone
/// ends the session (as [`StateStore::close`] does, but in the background).
///
/// `subscribe()` reports changes under the cached root only
/// ([`ZooKeeperOptions::cache_root`], `/nodepool`): a blocking lock wait on
/// a lock directory elsewhere (Zuul's `/zuul/...`) is not woken by its
/// predecessor's release; use non-blocking locks there.
#[derive(Clone)]
pub struct ZooKeeperStore {
    shared: Arc<Shared>,
    _stop: Arc<DropGuard>,
}

impl std::fmt::Debug for ZooKeeperStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("ZooKeeperStore")
            .field(&self.shared.describe)
            .finish()
    }
}

struct Shared {
    options: ZooKeeperOptions,
    describe: String,
    tls: Option<zk::TlsOptions>,
    /// The current session's client; replaced after expiry, `None` once closed.
    client: RwLock<Option<zk::Client>>,
    session_tx: watch::Sender<SessionState>,
    events: broadcast::Sender<StoreEvent>,
    cache: Mutex<TreeCache>,
    /// Freshness requests from `scan()`, answered by the supervisor once
    /// every watch event received so far is in the mirror.
    barriers: mpsc::UnboundedSender<oneshot::Sender<()>>,
    shutdown: CancellationToken,
    task: Mutex<Option<JoinHandle<()>>>,
    /// Requests sent and not answered yet (kazoo's connection queue).
    in_flight: AtomicU64,
    /// Watch events whose reads are not applied to the mirror yet.
    event_queue: AtomicU64,
    /// What this client sent and received, for [`StateStore::health`].
    traffic: Traffic,
    /// Our own data writes whose watch events may not be applied yet.
    own_writes: Mutex<OwnWrites>,
}

/// The answer to one of our own data writes: `None` until it is answered,
/// then the znode as written (`Some(Some(..))`) or `Some(None)` when it
/// failed. A dropped sender (the write's future was dropped) counts as
/// failed.
type WriteAnswer = watch::Receiver<Option<Option<Cached>>>;

/// Our own `set`s (alone or in a transaction) by path, from just before
/// they are sent until a watch event on their path takes them.
///
/// The mirror learns of every change from a watch event and used to read
/// the znode for each one; for a change we made ourselves that read
/// returns what we wrote, with the stat our write's answer carries. So an
/// event on a path with writes of ours registered takes them all (their
/// answers follow the event on the same connection) and applies the
/// newest that succeeded, reading only when none did. That is the read a
/// launcher would otherwise send for most of its changes (5 of ~7 per
/// request).
///
/// Why this is the same as reading: a write is registered before it is
/// sent, so the first event on its path processed after that is either
/// the write's own or one for an earlier change; the write's data is then
/// at least as new as that event's change, as a read sent at that moment
/// could have returned. Every successful write's own event comes after
/// its registration, so no successful write stays registered to be taken
/// by a later, newer change, unless events were lost: a reload (after a
/// reconnection or expiry) forgets every registration, and data older
/// than what the mirror holds is never applied.
/// A failed write has no event of its own: it takes itself out again, so
/// that writes to znodes that are gone for good do not pile up.
///
/// Creates are registered likewise, under the parent they create in: a
/// sequential create's name is only known from its answer. A creation
/// event under a parent with creates of ours registered waits for their
/// answers, oldest first (the server answers one session's requests in
/// order, and the event comes before its create's answer), and applies
/// the one that made the event's path; if none did (another client's
/// create), it reads.
#[derive(Default)]
struct OwnWrites {
    by_path: std::collections::HashMap<String, Vec<(u64, WriteAnswer)>>,
    creates_by_parent: std::collections::HashMap<String, Vec<(u64, CreateAnswer)>>,
    next_id: u64,
}

/// The answer to one of our own creates, as [`WriteAnswer`] with the path
/// made (a sequential name is known only from it).
type CreateAnswer = watch::Receiver<Option<Option<(String, Cached)>>>;

/// A registered create of ours: its answer for the mirror, and where to
/// take it out of [`OwnWrites`] once answered.
struct OwnCreate {
    answer: watch::Sender<Option<Option<(String, Cached)>>>,
    parent: String,
    id: u64,
}

/// A registered write of ours: its answer for the mirror, and where to
/// take it out of [`OwnWrites`] if it failed.
struct OwnWrite {
    answer: watch::Sender<Option<Option<Cached>>>,
    path: String,
    id: u64,
}

impl Shared {
    /// Registers a write of ours to `path` about to be sent, when its
    /// event will reach the mirror.
    fn own_write(&self, path: &str) -> Option<OwnWrite> {
        if !self.in_cache(path) {
            return None;
        }
        let (tx, rx) = watch::channel(None);
        let mut own = self.own_writes.lock().unwrap_or_else(|p| p.into_inner());
        own.next_id += 1;
        let id = own.next_id;
        own.by_path
            .entry(path.to_owned())
            .or_default()
            .push((id, rx));
        Some(OwnWrite {
            answer: tx,
            path: path.to_owned(),
            id,
        })
    }

    /// Takes the writes of ours registered for `path`.
    fn take_own_writes(&self, path: &str) -> Vec<WriteAnswer> {
        self.own_writes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .by_path
            .remove(path)
            .map(|writes| writes.into_iter().map(|(_, answer)| answer).collect())
            .unwrap_or_default()
    }

    /// Takes a failed write out, unless an event took it already.
    fn drop_own_write(&self, path: &str, id: u64) {
        let mut own = self.own_writes.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(writes) = own.by_path.get_mut(path) {
            writes.retain(|(i, _)| *i != id);
            if writes.is_empty() {
                own.by_path.remove(path);
            }
        }
    }

    /// Forgets every registration: their events may be lost.
    fn forget_own_writes(&self) {
        let mut own = self.own_writes.lock().unwrap_or_else(|p| p.into_inner());
        own.by_path.clear();
        own.creates_by_parent.clear();
    }

    /// Registers a create of ours at `path` (a prefix for sequential
    /// modes) about to be sent, when its event will reach the mirror and
    /// be read. Lock znodes are not read anyway.
    fn own_create(&self, path: &str) -> Option<OwnCreate> {
        // A lock contender is created from a prefix, its sequence to come
        // with the answer: tested as the name it will get, or it would
        // stay registered for good (its event is not read, and so never
        // takes it out).
        if !self.in_cache(path)
            || cache::is_unread_lock(path)
            || cache::is_unread_lock(&format!("{path}0000000000"))
        {
            return None;
        }
        let parent = nodepool_model::store::split_path(path).0.to_owned();
        let (tx, rx) = watch::channel(None);
        let mut own = self.own_writes.lock().unwrap_or_else(|p| p.into_inner());
        own.next_id += 1;
        let id = own.next_id;
        own.creates_by_parent
            .entry(parent.clone())
            .or_default()
            .push((id, rx));
        Some(OwnCreate {
            answer: tx,
            parent,
            id,
        })
    }

    /// The newest create of ours registered under `parent` so far: a
    /// creation event processed now can only be for one of these (a create
    /// is registered before it is sent), so later ones need not be waited
    /// for. `None` when there is none.
    fn own_creates_upto(&self, parent: &str) -> Option<u64> {
        let own = self.own_writes.lock().unwrap_or_else(|p| p.into_inner());
        own.creates_by_parent
            .get(parent)
            .and_then(|creates| creates.last())
            .map(|(id, _)| *id)
    }

    /// Looks for our create of `path` among those registered under
    /// `parent` up to `upto`, oldest first, without copying the registry:
    /// the match is taken out; the first one still unanswered before it is
    /// to be waited for (then search again). Creates whose future was
    /// dropped before their answer (a cancelled caller) never take
    /// themselves out and no event matches them: they go here.
    fn find_own_create(&self, parent: &str, path: &str, upto: u64) -> OwnCreateSearch {
        let mut own = self.own_writes.lock().unwrap_or_else(|p| p.into_inner());
        let Some(creates) = own.creates_by_parent.get_mut(parent) else {
            return OwnCreateSearch::NotOurs;
        };
        creates.retain(|(_, answer)| answer.borrow().is_some() || answer.has_changed().is_ok());
        let mut found = OwnCreateSearch::NotOurs;
        let mut matched = None;
        for (i, (id, answer)) in creates.iter().enumerate() {
            if *id > upto {
                break;
            }
            match &*answer.borrow() {
                None => {
                    found = OwnCreateSearch::Wait(answer.clone());
                    break;
                }
                Some(Some((made, cached))) if made == path => {
                    found = OwnCreateSearch::Found(cached.clone());
                    matched = Some(i);
                    break;
                }
                // Answered for another path (its own event takes it) or
                // failed (its answer took it out already).
                Some(_) => {}
            }
        }
        if let Some(i) = matched {
            creates.remove(i);
        }
        if creates.is_empty() {
            own.creates_by_parent.remove(parent);
        }
        found
    }

    /// Takes a create out: its event applied it, or it failed.
    fn drop_own_create(&self, parent: &str, id: u64) {
        let mut own = self.own_writes.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(creates) = own.creates_by_parent.get_mut(parent) {
            creates.retain(|(i, _)| *i != id);
            if creates.is_empty() {
                own.creates_by_parent.remove(parent);
            }
        }
    }
}

/// The stat of a znode created by the transaction whose change id and
/// time `txn` (another of its operations' stat) carries.
fn created_in(txn: &zk::Stat, mode: CreateMode, session: i64) -> Stat {
    Stat {
        version: 0,
        czxid: txn.mzxid,
        mzxid: txn.mzxid,
        ctime: txn.mtime,
        mtime: txn.mtime,
        ephemeral_owner: if mode.is_ephemeral() { session } else { 0 },
        num_children: 0,
    }
}

/// Records a create's answer for the mirror; a failed one is taken out of
/// the registry (it has no event), as is one whose stat the server did not
/// send (its event reads instead).
fn answer_create(shared: &Shared, create: Option<OwnCreate>, made: Option<(String, Cached)>) {
    let Some(c) = create else {
        return;
    };
    if made.is_none() {
        shared.drop_own_create(&c.parent, c.id);
    }
    c.answer.send_replace(Some(made));
}

/// Records a write's answer for the mirror; a failed write is taken out
/// of the registry (an event that took it meanwhile reads instead).
fn answer_write(shared: &Shared, write: Option<OwnWrite>, written: Option<Cached>) {
    let Some(w) = write else {
        return;
    };
    if written.is_none() {
        shared.drop_own_write(&w.path, w.id);
    }
    w.answer.send_replace(Some(written));
}

/// Requests and payload bytes a client sent and received, counted where
/// each request is made: cheap (relaxed atomics), and what the
/// `nodepool_zk_operations` / `nodepool_zk_bytes` counters report, so a
/// fleet's cost per request can be read from each launcher's `/metrics`.
#[derive(Debug, Default)]
pub(crate) struct Traffic {
    writes: AtomicU64,
    reads: AtomicU64,
    watch_events: AtomicU64,
    bytes_sent: AtomicU64,
    bytes_received: AtomicU64,
}

impl Traffic {
    /// A write request (create, set, delete) carrying `sent` payload bytes.
    pub(crate) fn write(&self, sent: usize) {
        self.writes.fetch_add(1, Ordering::Relaxed);
        self.bytes_sent.fetch_add(sent as u64, Ordering::Relaxed);
    }

    /// A read request of `sent` payload bytes (its path).
    pub(crate) fn read(&self, sent: usize) {
        self.reads.fetch_add(1, Ordering::Relaxed);
        self.bytes_sent.fetch_add(sent as u64, Ordering::Relaxed);
    }

    /// `n` payload bytes received (record data, child names).
    pub(crate) fn received(&self, n: usize) {
        self.bytes_received.fetch_add(n as u64, Ordering::Relaxed);
    }

    fn watch_event(&self) {
        self.watch_events.fetch_add(1, Ordering::Relaxed);
    }
}

impl Shared {
    fn client(&self) -> Result<zk::Client, StoreError> {
        self.client
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .ok_or(StoreError::SessionLost)
    }

    fn map(&self, err: zk::Error, path: &str) -> StoreError {
        error::map(err, path, &self.describe)
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, TreeCache> {
        self.cache.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn publish(&self, state: SessionState) {
        self.session_tx.send_if_modified(|s| {
            if *s == state {
                false
            } else {
                *s = state;
                true
            }
        });
    }

    fn in_cache(&self, prefix: &str) -> bool {
        let root = self.options.cache_root.as_str();
        prefix == root
            || prefix
                .strip_prefix(root)
                .is_some_and(|rest| rest.starts_with('/'))
    }
}

fn load_tls(files: &TlsFiles) -> Result<zk::TlsOptions, StoreError> {
    let read = |what: &str, path: &std::path::Path| {
        std::fs::read_to_string(path)
            .map_err(|e| StoreError::Other(format!("zookeeper-tls {what} {}: {e}", path.display())))
    };
    let ca = read("ca", &files.ca)?;
    let cert = read("cert", &files.cert)?;
    let key = read("key", &files.key)?;
    // Errors name the files, never their contents (the key is a secret).
    zk::TlsOptions::new()
        .with_pem_ca(&ca)
        .map_err(|e| StoreError::Other(format!("zookeeper-tls ca {}: {e}", files.ca.display())))?
        .with_pem_identity(&cert, &key)
        .map_err(|e| {
            StoreError::Other(format!(
                "zookeeper-tls cert {} / key {}: {e}",
                files.cert.display(),
                files.key.display()
            ))
        })
}

/// Opens a session (optionally re-attaching to `session`) and enters the
/// chroot, creating it when missing.
async fn open_client(
    options: &ZooKeeperOptions,
    tls: Option<&zk::TlsOptions>,
    session: Option<zk::SessionInfo>,
) -> Result<zk::Client, zk::Error> {
    let mut connector = zk::Client::connector().with_session_timeout(options.session_timeout);
    if let Some(info) = session {
        connector = connector.with_session(info);
    }
    let hosts = options.hosts();
    let client = match tls {
        Some(t) => connector.with_tls(t.clone()).secure_connect(&hosts).await?,
        None => connector.connect(&hosts).await?,
    };
    let Some(chroot) = &options.chroot else {
        return Ok(client);
    };
    // Python Nodepool expects the chroot to exist; we make it, like kazoo's
    // ensure_path would, so a fresh test chroot needs no setup.
    client
        .mkdir(chroot, &persistent_dir_options())
        .await
        .or_else(|e| {
            if e == zk::Error::NodeExists {
                Ok(())
            } else {
                Err(e)
            }
        })?;
    client
        .chroot(chroot.as_str())
        .map_err(|_| zk::Error::BadArguments(&"invalid chroot"))
}

fn persistent_dir_options() -> zk::CreateOptions<'static> {
    zk::CreateMode::Persistent.with_acls(zk::Acls::anyone_all())
}

fn zk_mode(mode: CreateMode) -> zk::CreateMode {
    match mode {
        CreateMode::Persistent => zk::CreateMode::Persistent,
        CreateMode::PersistentSequential => zk::CreateMode::PersistentSequential,
        CreateMode::Ephemeral => zk::CreateMode::Ephemeral,
        CreateMode::EphemeralSequential => zk::CreateMode::EphemeralSequential,
    }
}

impl ZooKeeperStore {
    /// Connects, sets the watch on the cached subtree, loads it, and starts
    /// the supervisor. Fails with [`StoreError::Unavailable`] naming the
    /// servers if no session could be opened within
    /// [`ZooKeeperOptions::connect_timeout`].
    pub async fn connect(options: ZooKeeperOptions) -> Result<Self, StoreError> {
        validate_path(&options.cache_root)?;
        if options.servers.is_empty() {
            return Err(StoreError::Other("zookeeper: no server configured".into()));
        }
        let tls = options.tls.as_ref().map(load_tls).transpose()?;
        let describe = options.describe();
        let unavailable = |reason: String| StoreError::Unavailable {
            store: describe.clone(),
            reason,
        };
        let deadline = tokio::time::Instant::now() + options.connect_timeout;
        let mut backoff = Duration::from_millis(100);
        let client = loop {
            let attempt =
                tokio::time::timeout_at(deadline, open_client(&options, tls.as_ref(), None)).await;
            match attempt {
                Ok(Ok(c)) => break c,
                Err(_) => {
                    return Err(unavailable(format!(
                        "no session within {:?}",
                        options.connect_timeout
                    )));
                }
                Ok(Err(e)) if tokio::time::Instant::now() + backoff >= deadline => {
                    return Err(unavailable(e.to_string()));
                }
                Ok(Err(e)) => {
                    tracing::debug!(store = %describe, error = %e, "connect failed; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        };
        let root = options.cache_root.clone();
        let traffic = Traffic::default();
        // Watch first, then load: every change after the load's reads is
        // reported by the watch, so nothing falls between the two.
        traffic.read(root.len());
        let watcher = client
            .watch(&root, zk::AddWatchMode::PersistentRecursive)
            .await
            .map_err(|e| error::map(e, &root, &describe))?;
        let tree = cache::load(&client, &root, &traffic)
            .await
            .map_err(|e| error::map(e, &root, &describe))?;
        let mut mirror = TreeCache::default();
        mirror.replace(tree);
        let id = client.session_id().0;
        tracing::info!(store = %describe, session = format!("{id:#x}"), cached = mirror.len(), "connected");
        let (session_tx, _) = watch::channel(SessionState::Connected { id });
        let (events, _) = broadcast::channel(EVENT_CAPACITY);
        let (barriers, barriers_rx) = mpsc::unbounded_channel();
        let shutdown = CancellationToken::new();
        let shared = Arc::new(Shared {
            options,
            describe,
            tls,
            client: RwLock::new(Some(client.clone())),
            session_tx,
            events,
            cache: Mutex::new(mirror),
            barriers,
            shutdown: shutdown.clone(),
            task: Mutex::new(None),
            in_flight: AtomicU64::new(0),
            event_queue: AtomicU64::new(0),
            traffic,
            own_writes: Mutex::new(OwnWrites::default()),
        });
        let supervisor = Supervisor {
            shared: shared.clone(),
            client,
            watcher: Some(watcher),
            barriers_rx,
            pipeline: FuturesOrdered::new(),
            enqueued: 0,
            applied: 0,
            waiting: VecDeque::new(),
            needs_load: false,
            rewatch: false,
            connected: true,
            backoff: Duration::from_millis(100),
        };
        let task = tokio::spawn(supervisor.run());
        *shared.task.lock().unwrap_or_else(|p| p.into_inner()) = Some(task);
        Ok(ZooKeeperStore {
            shared,
            _stop: Arc::new(shutdown.drop_guard()),
        })
    }

    /// Connects with the settings of `nodepool.yaml`.
    pub async fn from_config(config: &nodepool_model::config::Config) -> Result<Self, StoreError> {
        Self::connect(ZooKeeperOptions::from_config(config)?).await
    }

    /// The options this store was opened with.
    pub fn options(&self) -> &ZooKeeperOptions {
        &self.shared.options
    }

    /// Makes the server expire this client's current session, as a crashed
    /// process's session would, and waits until the store runs on a new
    /// session. For fault-injection tests.
    ///
    /// ZooKeeper has no "expire" call, so this does what Curator's and
    /// kazoo's test helpers do: a second connection attaches to the same
    /// session id and password and closes it. The server then deletes the
    /// session's ephemerals (locks included) and refuses our reconnection
    /// with "session expired". Our own client may win the session back
    /// between the two steps, so it retries until the session id changes.
    pub async fn expire_session(&self) -> Result<(), StoreError> {
        let old = self.shared.client()?;
        let old_id = old.session_id().0;
        let info = old.session().clone();
        drop(old);
        let deadline = tokio::time::Instant::now() + self.shared.options.session_timeout * 4;
        loop {
            if let Ok(Ok(stealer)) = tokio::time::timeout_at(
                deadline,
                open_client(
                    &ZooKeeperOptions {
                        chroot: None,
                        ..self.shared.options.clone()
                    },
                    self.shared.tls.as_ref(),
                    Some(info.clone()),
                ),
            )
            .await
            {
                let mut state = stealer.state_watcher();
                // Dropping the only handle sends CloseSession; `Closed` is
                // reported once the server answered it.
                drop(stealer);
                let _ = tokio::time::timeout_at(deadline, async {
                    while !state.peek_state().is_terminated() {
                        state.changed().await;
                    }
                })
                .await;
            }
            // Poke our client so it notices at once instead of at its next ping.
            let _ = self.get("/").await;
            let mut session = self.session();
            let renewed = tokio::time::timeout(Duration::from_secs(2), async {
                loop {
                    match *session.borrow_and_update() {
                        SessionState::Connected { id } if id != old_id => return true,
                        SessionState::Closed => return false,
                        _ => {}
                    }
                    if session.changed().await.is_err() {
                        return false;
                    }
                }
            })
            .await;
            match renewed {
                Ok(true) => return Ok(()),
                Ok(false) => return Err(StoreError::SessionLost),
                Err(_) if tokio::time::Instant::now() >= deadline => {
                    return Err(StoreError::Timeout {
                        what: format!("expiry of session {old_id:#x}"),
                    });
                }
                Err(_) => continue,
            }
        }
    }

    /// Writes and creates of this client whose watch events have not reached the
    /// mirror yet (each is applied from its answer instead of a read, see
    /// the crate documentation): a handful at most while writes are in
    /// flight, none once they are answered and applied. For tests and
    /// debugging.
    pub fn own_writes_pending(&self) -> usize {
        let own = self
            .shared
            .own_writes
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        own.by_path.values().map(Vec::len).sum::<usize>()
            + own.creates_by_parent.values().map(Vec::len).sum::<usize>()
    }

    async fn scan_direct(&self, prefix: &str) -> Result<Vec<Entry>, StoreError> {
        let client = self.shared.client()?;
        let tree = cache::load(&client, prefix, &self.shared.traffic)
            .await
            .map_err(|e| self.shared.map(e, prefix))?;
        Ok(tree
            .into_iter()
            .map(|(path, c)| Entry {
                path,
                data: c.data,
                stat: c.stat,
            })
            .collect())
    }

    /// Waits until the mirror holds every change the server made before
    /// this call. The `sync` round trip is ordered after every watch
    /// notification the server sent us before answering it (one connection,
    /// FIFO), including those for other clients' writes that completed
    /// before we asked; the barrier then waits until the supervisor has
    /// applied all events received so far.
    async fn freshen(&self) -> Result<(), StoreError> {
        let state = *self.shared.session_tx.borrow();
        match state {
            SessionState::Connected { .. } => {}
            // Like Nodepool's tree caches, a suspended session serves the
            // last known state; lock-guarded work is paused meanwhile.
            SessionState::Suspended { .. } => return Ok(()),
            SessionState::Expired => {
                return Err(StoreError::Unavailable {
                    store: self.shared.describe.clone(),
                    reason: "session expired; opening a new one".into(),
                });
            }
            SessionState::Closed => return Err(StoreError::SessionLost),
        }
        let timeout = self.shared.options.session_timeout;
        let client = self.shared.client()?;
        self.shared.traffic.read(1);
        match tokio::time::timeout(timeout, client.sync("/")).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) if is_terminal(&e) || is_connection(&e) => return Ok(()),
            Ok(Err(e)) => return Err(self.shared.map(e, "/")),
            Err(_) => return Ok(()),
        }
        let (tx, rx) = oneshot::channel();
        if self.shared.barriers.send(tx).is_err() {
            return Err(StoreError::SessionLost);
        }
        if tokio::time::timeout(timeout, rx).await.is_err() {
            tracing::warn!(store = %self.shared.describe, "cache did not catch up within {timeout:?}; serving it as is");
        }
        Ok(())
    }
}

#[async_trait]
impl StateStore for ZooKeeperStore {
    fn describe(&self) -> String {
        self.shared.describe.clone()
    }

    async fn create(
        &self,
        path: &str,
        data: &[u8],
        mode: CreateMode,
    ) -> Result<String, StoreError> {
        let (parent, name) = split_path(path);
        validate_path(parent)?;
        if name.is_empty() && !mode.is_sequential() {
            return Err(StoreError::Other(format!("invalid path {path:?}")));
        }
        let _in_flight = InFlight::new(&self.shared.in_flight);
        let client = self.shared.client()?;
        let options = zk_mode(mode).with_acls(zk::Acls::anyone_all());
        let mut made_parents = false;
        let mut own = self.shared.own_create(path);
        loop {
            self.shared.traffic.write(path.len() + data.len());
            match client.create(path, data, &options).await {
                Ok((stat, seq)) => {
                    let made = if mode.is_sequential() {
                        format!("{path}{seq}")
                    } else {
                        path.to_owned()
                    };
                    let cached = (!stat.is_invalid()).then(|| {
                        (
                            made.clone(),
                            Cached {
                                data: Bytes::copy_from_slice(data),
                                stat: cache::stat(&stat),
                            },
                        )
                    });
                    answer_create(&self.shared, own.take(), cached);
                    return Ok(made);
                }
                // kazoo's makepath: missing parents become empty persistent znodes.
                Err(zk::Error::NoNode) if !made_parents && parent != "/" => {
                    made_parents = true;
                    // Registered again below, after the parents' creates.
                    answer_create(&self.shared, own.take(), None);
                    self.shared.traffic.write(parent.len());
                    client
                        .mkdir(parent, &persistent_dir_options())
                        .await
                        .map_err(|e| self.shared.map(e, parent))?;
                    own = self.shared.own_create(path);
                }
                Err(e) => {
                    answer_create(&self.shared, own.take(), None);
                    return Err(self.shared.map(e, path));
                }
            }
        }
    }

    async fn create_dir_with_child(
        &self,
        dir: &str,
        child_prefix: &str,
        data: &[u8],
        child_mode: CreateMode,
    ) -> Result<Option<String>, StoreError> {
        validate_path(dir)?;
        let below = child_prefix.strip_prefix(dir).is_some_and(|rest| {
            rest.len() > 1 && rest.starts_with('/') && !rest[1..].contains('/')
        });
        if !below || !child_mode.is_sequential() {
            return Err(StoreError::Other(format!(
                "create_dir_with_child: {child_prefix:?} must be a sequential child of {dir:?}"
            )));
        }
        let _in_flight = InFlight::new(&self.shared.in_flight);
        let client = self.shared.client()?;
        let child_options = zk_mode(child_mode).with_acls(zk::Acls::anyone_all());
        let mut multi = client.new_multi_writer();
        multi
            .add_create(dir, &[], &persistent_dir_options())
            .map_err(|e| self.shared.map(e, dir))?;
        multi
            .add_create(child_prefix, data, &child_options)
            .map_err(|e| self.shared.map(e, child_prefix))?;
        // One round trip, as the server applies a multi as one transaction.
        self.shared
            .traffic
            .write(dir.len() + child_prefix.len() + data.len());
        match multi.commit().await {
            Ok(results) => match results.into_iter().nth(1) {
                Some(zk::MultiWriteResult::Create { path, .. }) => Ok(Some(path)),
                other => Err(StoreError::Other(format!(
                    "{child_prefix}: unexpected multi result {other:?}"
                ))),
            },
            // Nothing was created: the caller takes its ordinary path.
            Err(zk::MultiWriteError::OperationFailed {
                index: 0,
                source: zk::Error::NodeExists | zk::Error::NoNode,
            }) => Ok(None),
            Err(e) => Err(self.shared.map(e.into(), child_prefix)),
        }
    }

    async fn multi(&self, ops: &[MultiOp<'_>]) -> Result<Option<Vec<MultiResult>>, StoreError> {
        if ops.is_empty() {
            return Ok(Some(Vec::new()));
        }
        for op in ops {
            validate_path(op.path().trim_end_matches('/'))?;
        }
        let _in_flight = InFlight::new(&self.shared.in_flight);
        let client = self.shared.client()?;
        let mut multi = client.new_multi_writer();
        let mut sent = 0;
        for op in ops {
            let added = match *op {
                MultiOp::Create { path, data, mode } => {
                    sent += path.len() + data.len();
                    multi.add_create(path, data, &zk_mode(mode).with_acls(zk::Acls::anyone_all()))
                }
                MultiOp::Set {
                    path,
                    data,
                    version,
                } => {
                    sent += path.len() + data.len();
                    multi.add_set_data(path, data, version)
                }
                MultiOp::Delete { path, version } => {
                    sent += path.len();
                    multi.add_delete(path, version)
                }
            };
            added.map_err(|e| self.shared.map(e, op.path()))?;
        }
        // One request, one round trip: counted as one write.
        self.shared.traffic.write(sent);
        let answers: Vec<_> = ops
            .iter()
            .map(|op| match op {
                MultiOp::Set { path, .. } => self.shared.own_write(path),
                _ => None,
            })
            .collect();
        let creates: Vec<_> = ops
            .iter()
            .map(|op| match op {
                MultiOp::Create { path, .. } => self.shared.own_create(path),
                _ => None,
            })
            .collect();
        let committed = multi.commit().await;
        // ZooKeeper before 3.9 answers a create inside a transaction
        // without its stat (ZOOKEEPER-4026); every operation of a
        // transaction has its change id and time, so a set's stat in the
        // same answer gives them.
        let txn_stat = committed.as_ref().ok().and_then(|results| {
            results.iter().find_map(|r| match r {
                zk::MultiWriteResult::SetData { stat } if !stat.is_invalid() => Some(*stat),
                _ => None,
            })
        });
        let session = client.session_id().0;
        for (i, (op, create)) in ops.iter().zip(creates).enumerate() {
            let made = match (op, &committed) {
                (MultiOp::Create { data, mode, .. }, Ok(results)) => {
                    let stat = match results.get(i) {
                        Some(zk::MultiWriteResult::Create { path, stat }) if !stat.is_invalid() => {
                            Some((path, cache::stat(stat)))
                        }
                        Some(zk::MultiWriteResult::Create { path, .. }) => {
                            txn_stat.map(|t| (path, created_in(&t, *mode, session)))
                        }
                        _ => None,
                    };
                    stat.map(|(path, stat)| {
                        (
                            path.clone(),
                            Cached {
                                data: Bytes::copy_from_slice(data),
                                stat,
                            },
                        )
                    })
                }
                _ => None,
            };
            answer_create(&self.shared, create, made);
        }
        for (i, (op, answer)) in ops.iter().zip(answers).enumerate() {
            let written = match (op, &committed) {
                (MultiOp::Set { data, .. }, Ok(results)) => match results.get(i) {
                    Some(zk::MultiWriteResult::SetData { stat }) => Some(Cached {
                        data: Bytes::copy_from_slice(data),
                        stat: cache::stat(stat),
                    }),
                    _ => None,
                },
                _ => None,
            };
            answer_write(&self.shared, answer, written);
        }
        match committed {
            Ok(results) => Ok(Some(
                results
                    .into_iter()
                    .map(|r| match r {
                        zk::MultiWriteResult::Create { path, .. } => MultiResult::Created(path),
                        zk::MultiWriteResult::SetData { stat } => {
                            MultiResult::Set(cache::stat(&stat))
                        }
                        // No checks are sent: anything else is a delete.
                        _ => MultiResult::Deleted,
                    })
                    .collect(),
            )),
            Err(zk::MultiWriteError::OperationFailed { index, source }) => {
                let path = ops.get(index).map(MultiOp::path).unwrap_or_default();
                Err(self.shared.map(source, path))
            }
            Err(e) => {
                let path = ops.first().map(MultiOp::path).unwrap_or_default();
                Err(self.shared.map(e.into(), path))
            }
        }
    }

    async fn get(&self, path: &str) -> Result<Option<(Bytes, Stat)>, StoreError> {
        validate_path(path)?;
        let _in_flight = InFlight::new(&self.shared.in_flight);
        let client = self.shared.client()?;
        self.shared.traffic.read(path.len());
        match client.get_data(path).await {
            Ok((data, st)) => {
                self.shared.traffic.received(data.len());
                Ok(Some((Bytes::from(data), cache::stat(&st))))
            }
            Err(zk::Error::NoNode) => Ok(None),
            Err(e) => Err(self.shared.map(e, path)),
        }
    }

    async fn set(&self, path: &str, data: &[u8], version: Option<i32>) -> Result<Stat, StoreError> {
        validate_path(path)?;
        let _in_flight = InFlight::new(&self.shared.in_flight);
        let client = self.shared.client()?;
        self.shared.traffic.write(path.len() + data.len());
        let answer = self.shared.own_write(path);
        let result = client
            .set_data(path, data, version)
            .await
            .map(|s| cache::stat(&s));
        let written = result.as_ref().ok().map(|&stat| Cached {
            data: Bytes::copy_from_slice(data),
            stat,
        });
        answer_write(&self.shared, answer, written);
        result.map_err(|e| self.shared.map(e, path))
    }

    async fn delete(&self, path: &str, version: Option<i32>) -> Result<(), StoreError> {
        validate_path(path)?;
        let _in_flight = InFlight::new(&self.shared.in_flight);
        let client = self.shared.client()?;
        self.shared.traffic.write(path.len());
        client
            .delete(path, version)
            .await
            .map_err(|e| self.shared.map(e, path))
    }

    async fn children(&self, path: &str) -> Result<Vec<String>, StoreError> {
        validate_path(path)?;
        let _in_flight = InFlight::new(&self.shared.in_flight);
        let client = self.shared.client()?;
        self.shared.traffic.read(path.len());
        let mut children = client
            .list_children(path)
            .await
            .map_err(|e| self.shared.map(e, path))?;
        self.shared
            .traffic
            .received(children.iter().map(String::len).sum());
        children.sort();
        Ok(children)
    }

    async fn scan(&self, prefix: &str) -> Result<Vec<Entry>, StoreError> {
        validate_path(prefix)?;
        if !self.shared.in_cache(prefix) {
            return self.scan_direct(prefix).await;
        }
        self.freshen().await?;
        Ok(self.shared.cache().scan(prefix))
    }

    async fn scan_together(&self, prefixes: &[&str]) -> Result<Vec<Vec<Entry>>, StoreError> {
        for prefix in prefixes {
            validate_path(prefix)?;
        }
        if !prefixes.iter().all(|p| self.shared.in_cache(p)) {
            let mut scans = Vec::with_capacity(prefixes.len());
            for prefix in prefixes {
                scans.push(self.scan(prefix).await?);
            }
            return Ok(scans);
        }
        // One sync, and every prefix from the same state of the mirror.
        self.freshen().await?;
        let cache = self.shared.cache();
        Ok(prefixes.iter().map(|p| cache.scan(p)).collect())
    }

    fn subscribe(&self) -> broadcast::Receiver<StoreEvent> {
        self.shared.events.subscribe()
    }

    fn session(&self) -> watch::Receiver<SessionState> {
        self.shared.session_tx.subscribe()
    }

    fn health(&self) -> StoreHealth {
        let t = &self.shared.traffic;
        StoreHealth {
            requests_in_flight: self.shared.in_flight.load(Ordering::Relaxed),
            event_queue: self.shared.event_queue.load(Ordering::Relaxed),
            playback_queue: self.shared.events.len() as u64,
            cached_records: self.shared.cache().len() as u64,
            own_writes: self.own_writes_pending() as u64,
            writes: t.writes.load(Ordering::Relaxed),
            reads: t.reads.load(Ordering::Relaxed),
            watch_events: t.watch_events.load(Ordering::Relaxed),
            bytes_sent: t.bytes_sent.load(Ordering::Relaxed),
            bytes_received: t.bytes_received.load(Ordering::Relaxed),
        }
    }

    async fn close(&self) -> Result<(), StoreError> {
        self.shared.shutdown.cancel();
        let task = self
            .shared
            .task
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(task) = task {
            let _ = task.await;
        }
        let client = self
            .shared
            .client
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(client) = client {
            let mut state = client.state_watcher();
            // The session ends when the last handle is dropped; wait for the
            // server's answer so ephemerals are gone when close() returns.
            drop(client);
            let _ = tokio::time::timeout(self.shared.options.session_timeout, async {
                while !state.peek_state().is_terminated() {
                    state.changed().await;
                }
            })
            .await;
        }
        self.shared.publish(SessionState::Closed);
        Ok(())
    }
}

/// A watch event whose znode has been read (or needs no read).
struct Applied {
    event: StoreEvent,
    update: Update,
}

enum Update {
    Upsert(Cached),
    /// What one of our own writes wrote (see `OwnWrites`): applied unless
    /// the mirror holds newer data (after a reload).
    Written(Cached),
    /// A lock znode that is not read (`cache::is_unread_lock`): recorded
    /// if the mirror does not have it yet.
    Unread(Cached),
    Remove,
    /// The read failed for connection reasons: the mirror must be reloaded.
    Unknown,
}

/// The mirror's update from a read of the znode an event named.
async fn read_update(
    shared: &Shared,
    read: impl std::future::Future<Output = Result<(Vec<u8>, zk::Stat), zk::Error>>,
) -> Update {
    match read.await {
        Ok((data, st)) => {
            shared.traffic.received(data.len());
            Update::Upsert(Cached {
                data: Bytes::from(data),
                stat: cache::stat(&st),
            })
        }
        Err(zk::Error::NoNode) => Update::Remove,
        // A znode we may not read is left out of the mirror rather than
        // making it reload for ever.
        Err(zk::Error::NoAuth) => Update::Remove,
        Err(_) => Update::Unknown,
    }
}

/// The newest of our writes that succeeded, once all are answered.
async fn newest_written(answers: Vec<WriteAnswer>) -> Option<Cached> {
    let mut newest: Option<Cached> = None;
    for mut answer in answers {
        let written = match answer.wait_for(Option::is_some).await {
            Ok(a) => a.clone().flatten(),
            Err(_) => None,
        };
        if let Some(w) = written
            && newest.as_ref().is_none_or(|n| w.stat.mzxid > n.stat.mzxid)
        {
            newest = Some(w);
        }
    }
    newest
}

/// Where [`Shared::find_own_create`] got to.
enum OwnCreateSearch {
    /// Our create made the path: what it made.
    Found(Cached),
    /// An earlier create of ours is not answered yet: it may be the one.
    Wait(CreateAnswer),
    /// None of ours made it: another client's create.
    NotOurs,
}

/// What our create of `path` made, if one of ours registered under its
/// parent up to `upto` did: answers are awaited oldest first and the
/// search stops at the match, so a create of ours costs the wait for its
/// own answer, which follows its event on the connection. The match is
/// taken out of the registry.
async fn our_create(shared: &Shared, parent: &str, path: &str, upto: u64) -> Option<Cached> {
    loop {
        match shared.find_own_create(parent, path, upto) {
            OwnCreateSearch::Found(cached) => return Some(cached),
            OwnCreateSearch::NotOurs => return None,
            OwnCreateSearch::Wait(mut answer) => {
                // A dropped sender is pruned by the next search.
                let _ = answer.wait_for(Option::is_some).await;
            }
        }
    }
}

/// The background task: turns watch events into mirror updates and change
/// events, reloads after reconnection, replaces expired sessions.
struct Supervisor {
    shared: Arc<Shared>,
    client: zk::Client,
    /// `None` once the session ended (the watcher must not be polled then).
    watcher: Option<zk::PersistentWatcher>,
    barriers_rx: mpsc::UnboundedReceiver<oneshot::Sender<()>>,
    /// Reads for received events, applied strictly in event order so a
    /// slow read can never overwrite a newer one or resurrect a deletion.
    pipeline: FuturesOrdered<BoxFuture<'static, Applied>>,
    enqueued: u64,
    applied: u64,
    waiting: VecDeque<(u64, oneshot::Sender<()>)>,
    /// The mirror may have missed events (reconnection, failed read).
    needs_load: bool,
    /// The watch must be added again before reloading (see `reload`).
    rewatch: bool,
    connected: bool,
    backoff: Duration,
}

impl Supervisor {
    async fn run(mut self) {
        loop {
            if self.shared.shutdown.is_cancelled() {
                break;
            }
            if self.watcher.is_none() {
                if !self.renew_session().await {
                    break;
                }
                continue;
            }
            if self.needs_load && self.connected {
                self.reload().await;
                continue;
            }
            let Some(watcher) = self.watcher.as_mut() else {
                continue;
            };
            let can_answer = !self.needs_load;
            // Unbiased: a burst of events must not starve the application
            // of reads (or the other way round).
            tokio::select! {
                _ = self.shared.shutdown.cancelled() => break,
                ev = watcher.changed() => self.on_event(ev),
                Some(applied) = self.pipeline.next(), if !self.pipeline.is_empty() => self.apply(applied),
                Some(tx) = self.barriers_rx.recv(), if can_answer => self.on_barrier(tx),
            }
        }
        tracing::debug!(store = %self.shared.describe, "supervisor stopped");
    }

    fn on_event(&mut self, ev: zk::WatchedEvent) {
        match ev.event_type {
            zk::EventType::Session => self.on_session(ev.session_state),
            zk::EventType::NodeCreated => self.enqueue(StoreEvent::Created(ev.path), true),
            zk::EventType::NodeDataChanged => self.enqueue(StoreEvent::Changed(ev.path), true),
            zk::EventType::NodeDeleted => self.enqueue(StoreEvent::Deleted(ev.path), false),
            // Recursive watches do not report child changes; the mirror
            // counts children itself.
            zk::EventType::NodeChildrenChanged => {}
        }
    }

    fn on_session(&mut self, state: zk::SessionState) {
        match state {
            zk::SessionState::Disconnected => {
                tracing::warn!(store = %self.shared.describe, "connection lost; session suspended");
                self.connected = false;
                self.shared.publish(SessionState::Suspended {
                    id: self.client.session_id().0,
                });
            }
            zk::SessionState::SyncConnected | zk::SessionState::ConnectedReadOnly => {
                let id = self.client.session_id().0;
                tracing::info!(store = %self.shared.describe, session = format!("{id:#x}"), "reconnected");
                self.connected = true;
                // Persistent watches lose the events of the disconnected
                // period (ZOOKEEPER-4698): reload the mirror. And
                // zookeeper-client 0.11.2 does not re-register persistent
                // watches on reconnection (its SetWatches omits them), so
                // the watch is added again first.
                self.needs_load = true;
                self.rewatch = true;
                self.shared.publish(SessionState::Connected { id });
            }
            zk::SessionState::Expired | zk::SessionState::Closed | zk::SessionState::AuthFailed => {
                self.session_over(state)
            }
        }
    }

    fn session_over(&mut self, state: zk::SessionState) {
        if self.shared.shutdown.is_cancelled() {
            return;
        }
        tracing::warn!(store = %self.shared.describe, session = format!("{:#x}", self.client.session_id().0), %state, "session ended; its locks and ephemerals are gone");
        self.watcher = None;
        self.connected = false;
        self.needs_load = true;
        self.pipeline = FuturesOrdered::new();
        self.shared.forget_own_writes();
        self.publish_queue();
        self.applied = self.enqueued;
        self.shared.cache().loaded = false;
        self.shared.publish(SessionState::Expired);
    }

    /// Publishes the pipeline's length for [`StateStore::health`].
    fn publish_queue(&self) {
        self.shared
            .event_queue
            .store(self.pipeline.len() as u64, Ordering::Relaxed);
    }

    /// Queues `event` to be applied from what our own write made
    /// (`ours`, awaited in event order), or read when it made nothing:
    /// another client's change, or our write failed. The read is sent
    /// only then, so it is answered after the change.
    fn apply_ours_or_read(&mut self, event: StoreEvent, ours: BoxFuture<'static, Option<Cached>>) {
        let client = self.client.clone();
        let shared = self.shared.clone();
        self.pipeline.push_back(
            async move {
                let update = match ours.await {
                    Some(c) => Update::Written(c),
                    None => {
                        shared.traffic.read(event.path().len());
                        read_update(&shared, client.get_data(event.path())).await
                    }
                };
                Applied { event, update }
            }
            .boxed(),
        );
    }

    fn enqueue(&mut self, event: StoreEvent, read: bool) {
        self.enqueued += 1;
        let traffic = &self.shared.traffic;
        traffic.watch_event();
        // Counted before the push: the pipeline holds it from here on.
        self.shared.event_queue.fetch_add(1, Ordering::Relaxed);
        if !read {
            self.pipeline.push_back(
                futures::future::ready(Applied {
                    event,
                    update: Update::Remove,
                })
                .boxed(),
            );
            return;
        }
        if cache::is_unread_lock(event.path()) {
            let now_ms = (nodepool_model::model::epoch_now() * 1000.0) as i64;
            self.pipeline.push_back(
                futures::future::ready(Applied {
                    event,
                    update: Update::Unread(Cached::unread(now_ms)),
                })
                .boxed(),
            );
            return;
        }
        if matches!(event, StoreEvent::Created(_)) {
            let parent = nodepool_model::store::split_path(event.path()).0;
            if let Some(upto) = self.shared.own_creates_upto(parent) {
                let shared = self.shared.clone();
                let (parent, path) = (parent.to_owned(), event.path().to_owned());
                let ours = async move { our_create(&shared, &parent, &path, upto).await };
                self.apply_ours_or_read(event, ours.boxed());
                return;
            }
        }
        if matches!(event, StoreEvent::Changed(_)) {
            let written = self.shared.take_own_writes(event.path());
            if !written.is_empty() {
                self.apply_ours_or_read(event, newest_written(written).boxed());
                return;
            }
        }
        // The read is sent now (the client sends on call), so it is
        // answered after the change that triggered the event.
        traffic.read(event.path().len());
        let fut = self.client.get_data(event.path());
        let shared = self.shared.clone();
        self.pipeline.push_back(
            async move {
                let update = read_update(&shared, fut).await;
                Applied { event, update }
            }
            .boxed(),
        );
    }

    fn apply(&mut self, applied: Applied) {
        {
            let mut cache = self.shared.cache();
            match applied.update {
                Update::Upsert(c) => cache.upsert(applied.event.path(), c),
                Update::Unread(c) => cache.insert_if_absent(applied.event.path(), c),
                Update::Written(c) => cache.upsert_if_newer(applied.event.path(), c),
                Update::Remove => cache.remove(applied.event.path()),
                Update::Unknown => self.needs_load = true,
            }
        }
        let _ = self.shared.events.send(applied.event);
        self.applied += 1;
        self.publish_queue();
        self.answer_barriers();
    }

    fn answer_barriers(&mut self) {
        if self.needs_load {
            return;
        }
        while let Some((target, _)) = self.waiting.front() {
            if *target > self.applied {
                break;
            }
            if let Some((_, tx)) = self.waiting.pop_front() {
                let _ = tx.send(());
            }
        }
    }

    fn on_barrier(&mut self, tx: oneshot::Sender<()>) {
        // Everything the server sent before answering the caller's sync is
        // already in the watcher's queue: take it all without waiting.
        while let Some(w) = self.watcher.as_mut() {
            match w.changed().now_or_never() {
                Some(ev) => self.on_event(ev),
                None => break,
            }
        }
        self.waiting.push_back((self.enqueued, tx));
        self.answer_barriers();
    }

    async fn flush_pipeline(&mut self) {
        while let Some(applied) = self.pipeline.next().await {
            self.apply(applied);
        }
    }

    async fn reload(&mut self) {
        // Reads already under way are applied first, so none of them can
        // land on top of the fresh load with older data.
        self.flush_pipeline().await;
        let root = self.shared.options.cache_root.clone();
        if self.rewatch {
            // Adding the new watcher before dropping the old one keeps the
            // server-side registration (the client only asks the server to
            // remove a path's watch when its last local watcher goes).
            self.shared.traffic.read(root.len());
            match self
                .client
                .watch(&root, zk::AddWatchMode::PersistentRecursive)
                .await
            {
                Ok(w) => {
                    self.watcher = Some(w);
                    self.rewatch = false;
                }
                Err(e) => return self.load_failed(e).await,
            }
        }
        // Events of writes registered before now may be lost; later ones
        // reach the watch added above.
        self.shared.forget_own_writes();
        match cache::load(&self.client, &root, &self.shared.traffic).await {
            Ok(tree) => {
                let events = self.shared.cache().replace(tree);
                tracing::info!(store = %self.shared.describe, changed = events.len(), "cache reloaded");
                for e in events {
                    let _ = self.shared.events.send(e);
                }
                self.needs_load = false;
                self.applied = self.enqueued;
                self.answer_barriers();
            }
            Err(e) => self.load_failed(e).await,
        }
    }

    async fn load_failed(&mut self, e: zk::Error) {
        if is_terminal(&e) || is_connection(&e) {
            // The session event follows in the watcher; wait for it.
            self.connected = false;
            return;
        }
        tracing::warn!(store = %self.shared.describe, error = %e, "cache reload failed; retrying");
        tokio::select! {
            _ = self.shared.shutdown.cancelled() => {}
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }

    /// Opens a new session after expiry; retries until it works or the
    /// store shuts down (false).
    async fn renew_session(&mut self) -> bool {
        loop {
            let opened = tokio::select! {
                _ = self.shared.shutdown.cancelled() => return false,
                r = open_client(&self.shared.options, self.shared.tls.as_ref(), None) => r,
            };
            let root = self.shared.options.cache_root.clone();
            let result = match opened {
                Ok(client) => {
                    self.shared.traffic.read(root.len());
                    client
                        .watch(&root, zk::AddWatchMode::PersistentRecursive)
                        .await
                        .map(|w| (client, w))
                }
                Err(e) => Err(e),
            };
            match result {
                Ok((client, watcher)) => {
                    let id = client.session_id().0;
                    tracing::info!(store = %self.shared.describe, session = format!("{id:#x}"), "new session");
                    *self
                        .shared
                        .client
                        .write()
                        .unwrap_or_else(|p| p.into_inner()) = Some(client.clone());
                    self.client = client;
                    self.watcher = Some(watcher);
                    self.connected = true;
                    self.needs_load = true;
                    self.backoff = Duration::from_millis(100);
                    self.shared.publish(SessionState::Connected { id });
                    return true;
                }
                Err(e) => {
                    tracing::warn!(store = %self.shared.describe, error = %e, "cannot open a new session; retrying");
                    tokio::select! {
                        _ = self.shared.shutdown.cancelled() => return false,
                        _ = tokio::time::sleep(self.backoff) => {}
                    }
                    self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
    }
}
