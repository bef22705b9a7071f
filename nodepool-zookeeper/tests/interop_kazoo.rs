//! Mutual exclusion between our lock recipe and kazoo's (what Python
//! Nodepool and Zuul use), in both directions and in a mixed queue, on a
//! node lock path. The kazoo side runs as a subprocess
//! (`tests/py/kazoo_lock_peer.py`) driven line by line.

mod common;

use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use nodepool_core::model::{Node, NodeState};
use nodepool_core::store::{CreateMode, LockWait, RecordKey, Store, StoreError, paths};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};

/// Generous bound for one answer of the peer (python start-up included).
const ANSWER: Duration = Duration::from_secs(30);

struct Kazoo {
    child: Child,
    stdin: ChildStdin,
    lines: Lines<BufReader<ChildStdout>>,
}

impl Kazoo {
    async fn start(hosts: &str) -> Kazoo {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/py/kazoo_lock_peer.py");
        let mut child = Command::new(common::python())
            .arg(script)
            .arg(hosts)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("start the kazoo peer");
        let stdin = child.stdin.take().expect("stdin");
        let lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
        let mut k = Kazoo {
            child,
            stdin,
            lines,
        };
        assert_eq!(k.answer().await, "ready");
        k
    }

    async fn send(&mut self, cmd: &str) {
        self.stdin
            .write_all(format!("{cmd}\n").as_bytes())
            .await
            .expect("write to peer");
        self.stdin.flush().await.expect("flush");
    }

    async fn answer(&mut self) -> String {
        tokio::time::timeout(ANSWER, self.lines.next_line())
            .await
            .expect("peer answers in time")
            .expect("read from peer")
            .expect("peer alive")
    }

    async fn ask(&mut self, cmd: &str) -> String {
        self.send(cmd).await;
        self.answer().await
    }

    async fn quit(mut self) {
        assert_eq!(self.ask("quit").await, "bye");
        let _ = tokio::time::timeout(ANSWER, self.child.wait()).await;
    }
}

/// What every test starts from: a fresh chroot holding one ready node,
/// our store on it, and a kazoo peer on the same chroot.
struct Setup {
    store: Store,
    chroot: String,
    kazoo: Kazoo,
    /// The node's id and its lock directory.
    id: String,
    dir: String,
}

async fn setup() -> Setup {
    let chroot = common::fresh_chroot();
    let store = Store::new(Arc::new(common::connect(common::plain(&chroot)).await));
    let id = create_node(&store, NodeState::Ready).await;
    let kazoo = Kazoo::start(&format!("{}{chroot}", common::plain_hosts())).await;
    let dir = paths::node_lock(&id);
    Setup {
        store,
        chroot,
        kazoo,
        id,
        dir,
    }
}

/// A node in `state`; returns its id.
async fn create_node(store: &Store, state: NodeState) -> String {
    store
        .create_node(&Node::new(state, 1.0, "p", "main", vec!["x".into()]))
        .await
        .expect("create node")
}

async fn lock_children(store: &Store, dir: &str) -> Vec<String> {
    store.backend().children(dir).await.expect("children")
}

/// The lock's contenders, which must be exactly one named as kazoo names
/// them (`<32 hex uuid>__lock__<seq>`), so that Python sees a holder.
async fn sole_kazoo_named_contender(store: &Store, dir: &str) -> Vec<String> {
    let names = lock_children(store, dir).await;
    assert_eq!(names.len(), 1, "{names:?}");
    assert_eq!(
        names[0].find("__lock__"),
        Some(32),
        "kazoo's name: {names:?}"
    );
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rust_holder_excludes_kazoo() {
    let Setup {
        store,
        mut kazoo,
        id,
        dir,
        ..
    } = setup().await;
    let guard = store
        .lock_node(&id, LockWait::NonBlocking)
        .await
        .expect("we lock");
    assert_eq!(kazoo.ask(&format!("trylock {dir}")).await, "busy");
    assert_eq!(kazoo.ask(&format!("lock {dir} 0.3")).await, "timeout");
    // kazoo cleaned up its contenders; ours is the only one
    assert_eq!(lock_children(&store, &dir).await.len(), 1);
    // a kazoo waiter queues behind us and gets the lock when we release
    kazoo.send(&format!("lock {dir} 20")).await;
    common::eventually(Duration::from_secs(20), "kazoo queued", || async {
        lock_children(&store, &dir).await.len() == 2
    })
    .await;
    guard.release().await.expect("release");
    assert_eq!(kazoo.answer().await, "locked");
    assert!(
        store.is_node_locked(&id).await.expect("locked?"),
        "kazoo's lock shows"
    );
    kazoo.quit().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kazoo_holder_excludes_rust() {
    let Setup {
        store,
        mut kazoo,
        id,
        dir,
        ..
    } = setup().await;
    assert_eq!(kazoo.ask(&format!("trylock {dir}")).await, "locked");
    let names = sole_kazoo_named_contender(&store, &dir).await;
    let r = store.lock_node(&id, LockWait::NonBlocking).await;
    assert!(matches!(r, Err(StoreError::Locked { .. })), "{r:?}");
    let r = store
        .lock_node(&id, LockWait::Timeout(Duration::from_millis(300)))
        .await;
    assert!(matches!(r, Err(StoreError::Timeout { .. })), "{r:?}");
    assert_eq!(lock_children(&store, &dir).await, names, "we cleaned up");
    assert!(store.list_nodes().await.expect("list").records[0].locked);
    // we queue behind kazoo and get it when kazoo releases
    let waiter = {
        let store = store.clone();
        let id = id.clone();
        tokio::spawn(async move {
            store
                .lock_node(&id, LockWait::Timeout(Duration::from_secs(20)))
                .await
        })
    };
    common::eventually(Duration::from_secs(20), "we queued", || async {
        lock_children(&store, &dir).await.len() == 2
    })
    .await;
    assert!(!waiter.is_finished(), "we must not get a lock kazoo holds");
    assert_eq!(kazoo.ask(&format!("release {dir}")).await, "released");
    let guard = tokio::time::timeout(Duration::from_secs(20), waiter)
        .await
        .expect("waiter finishes")
        .expect("task")
        .expect("we get the lock");
    assert!(guard.is_held());
    assert_eq!(kazoo.ask(&format!("trylock {dir}")).await, "busy");
    guard.release().await.expect("release");
    kazoo.quit().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mixed_queue_is_served_in_order() {
    let Setup {
        store,
        mut kazoo,
        id,
        dir,
        chroot,
    } = setup().await;
    let other = Store::new(Arc::new(common::connect(common::plain(&chroot)).await));
    // rust A holds, kazoo waits, rust B waits: A → kazoo → B
    let a = store
        .lock_node(&id, LockWait::NonBlocking)
        .await
        .expect("A locks");
    kazoo.send(&format!("lock {dir} 20")).await;
    common::eventually(Duration::from_secs(20), "kazoo queued", || async {
        lock_children(&store, &dir).await.len() == 2
    })
    .await;
    let b = {
        let other = other.clone();
        let id = id.clone();
        tokio::spawn(async move {
            other
                .lock_node(&id, LockWait::Timeout(Duration::from_secs(20)))
                .await
        })
    };
    common::eventually(Duration::from_secs(20), "B queued", || async {
        lock_children(&store, &dir).await.len() == 3
    })
    .await;
    a.release().await.expect("A releases");
    assert_eq!(kazoo.answer().await, "locked", "kazoo is next");
    assert!(!b.is_finished(), "B waits behind kazoo");
    assert_eq!(kazoo.ask(&format!("release {dir}")).await, "released");
    let g = tokio::time::timeout(Duration::from_secs(20), b)
        .await
        .expect("B finishes")
        .expect("task")
        .expect("B gets it");
    g.release().await.expect("release");
    kazoo.quit().await;
}

/// The stats election (`/nodepool/elections/stats`) is kazoo's `Election`:
/// Python Nodepool sees our holder's identifier (`<hostname>-<pid>`) among
/// the contenders, and a Python holder keeps us out, so a mixed set of
/// launchers has one statsd reporter.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stats_election_is_kazoos_election() {
    let Setup {
        store, mut kazoo, ..
    } = setup().await;
    let path = paths::STATS_ELECTION;
    let ours = store
        .elect(path, LockWait::NonBlocking, "rust-host-4242")
        .await
        .expect("we win the free election");
    assert_eq!(
        kazoo.ask(&format!("contenders {path}")).await,
        r#"["rust-host-4242"]"#
    );
    assert_eq!(kazoo.ask(&format!("elect {path} py-host-7")).await, "busy");
    ours.release().await.expect("resign");
    assert_eq!(
        kazoo.ask(&format!("elect {path} py-host-7")).await,
        "elected"
    );
    let r = store
        .elect(path, LockWait::NonBlocking, "rust-host-4242")
        .await;
    assert!(matches!(r, Err(StoreError::Locked { .. })), "{r:?}");
    assert_eq!(
        kazoo.ask(&format!("contenders {path}")).await,
        r#"["py-host-7"]"#,
        "our failed attempt left no contender"
    );
    assert_eq!(kazoo.ask(&format!("resign {path}")).await, "resigned");
    kazoo.quit().await;
}

/// A new node's and a new request's lock are taken in one write (the lock
/// directory and our contender in one multi) with kazoo's layout, and
/// exclude kazoo; where kazoo took the lock first, the one-write path
/// finds the directory and falls back to the ordinary, queue-listing one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lock_made_with_its_directory_is_kazoos_lock() {
    let Setup {
        store,
        mut kazoo,
        id,
        dir,
        ..
    } = setup().await;
    let writes = || store.backend().health().writes;
    let before = writes();
    let guard = store
        .lock_new_node(&id, LockWait::NonBlocking)
        .await
        .expect("we lock the new node");
    assert_eq!(writes() - before, 1, "directory and contender in one write");
    sole_kazoo_named_contender(&store, &dir).await;
    assert_eq!(kazoo.ask(&format!("trylock {dir}")).await, "busy");
    guard.release().await.expect("release");
    assert_eq!(kazoo.ask(&format!("trylock {dir}")).await, "locked");
    // The directory exists now: the fallback finds kazoo's contender.
    let r = store.lock_new_node(&id, LockWait::NonBlocking).await;
    assert!(matches!(r, Err(StoreError::Locked { .. })), "{r:?}");
    assert_eq!(kazoo.ask(&format!("release {dir}")).await, "released");

    let request = "100-0000000001";
    let request_dir = paths::request_lock(request);
    // Their parent is there once any request was locked.
    store
        .backend()
        .create(paths::REQUESTS_LOCK, b"", CreateMode::Persistent)
        .await
        .expect("requests-lock");
    let before = writes();
    let guard = store
        .lock_new_request(request, LockWait::NonBlocking)
        .await
        .expect("we lock the request");
    assert_eq!(writes() - before, 1, "directory and contender in one write");
    assert_eq!(kazoo.ask(&format!("trylock {request_dir}")).await, "busy");
    let r = store.lock_new_request(request, LockWait::NonBlocking).await;
    assert!(matches!(r, Err(StoreError::Locked { .. })), "{r:?}");
    guard.release().await.expect("release");
    assert_eq!(kazoo.ask(&format!("trylock {request_dir}")).await, "locked");
    kazoo.quit().await;
}

/// A lock taken with its directory and a write in one transaction
/// (`Store::lock_new_and_write`, how the launcher accepts a request and
/// starts a node) is kazoo's lock; records written and locks released in
/// one transaction (`Store::write_and_release`, how it fulfils) leave
/// kazoo free to lock. A failed version check applies nothing: no lock
/// directory, no contender, the record unchanged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lock_taken_and_released_with_writes_in_one_transaction_is_kazoos_lock() {
    let Setup {
        store,
        mut kazoo,
        id,
        dir,
        ..
    } = setup().await;
    let writes = || store.backend().health().writes;
    let key = RecordKey::node(&id);
    let mut node = store.get_node(&id).await.expect("read").expect("node");
    node.value.set_state(NodeState::Building, 2.0);

    // A stale version: nothing happens.
    let r = store
        .lock_new_and_write(&dir, &key, &node.value, Some(node.version + 1))
        .await;
    assert!(
        matches!(&r, Err(StoreError::Conflict { path, .. }) if *path == paths::node(&id)),
        "{r:?}"
    );
    let r = store.backend().children(&dir).await;
    assert!(matches!(r, Err(StoreError::NotFound { .. })), "{r:?}");
    assert_eq!(kazoo.ask(&format!("trylock {dir}")).await, "locked");
    assert_eq!(kazoo.ask(&format!("release {dir}")).await, "released");
    // The directory exists now (kazoo made it): nothing done, fall back.
    let r = store
        .lock_new_and_write(&dir, &key, &node.value, Some(node.version))
        .await
        .expect("no error");
    assert!(r.is_none(), "{r:?}");

    // A fresh node: lock and write in one request.
    let id = create_node(&store, NodeState::Init).await;
    let (dir, key) = (paths::node_lock(&id), RecordKey::node(&id));
    let before = writes();
    let (guard, version) = store
        .lock_new_and_write(&dir, &key, &node.value, Some(0))
        .await
        .expect("no error")
        .expect("locked and written");
    assert_eq!(writes() - before, 1, "lock and write in one request");
    assert_eq!(version, 1);
    sole_kazoo_named_contender(&store, &dir).await;
    assert_eq!(kazoo.ask(&format!("trylock {dir}")).await, "busy");
    let read = store.get_node(&id).await.expect("read").expect("node");
    assert_eq!((read.value.state, read.version), (NodeState::Building, 1));

    // Written and released together; a stale version changes nothing.
    node.value.set_state(NodeState::Ready, 3.0);
    let json = nodepool_core::model::WireRecord::to_json(&node.value);
    let path = paths::node(&id);
    let r = store
        .write_and_release(&[(&path, &json, 0)], &[&guard])
        .await;
    assert!(matches!(r, Err(StoreError::Conflict { .. })), "{r:?}");
    assert_eq!(kazoo.ask(&format!("trylock {dir}")).await, "busy");
    let before = writes();
    let versions = store
        .write_and_release(&[(&path, &json, version)], &[&guard])
        .await
        .expect("no error")
        .expect("applied");
    guard.forget();
    assert_eq!(writes() - before, 1, "write and release in one request");
    assert_eq!(versions, [2]);
    let read = store.get_node(&id).await.expect("read").expect("node");
    assert_eq!((read.value.state, read.version), (NodeState::Ready, 2));
    assert!(lock_children(&store, &dir).await.is_empty());
    assert_eq!(kazoo.ask(&format!("trylock {dir}")).await, "locked");
    assert_eq!(kazoo.ask(&format!("release {dir}")).await, "released");
    kazoo.quit().await;
}
