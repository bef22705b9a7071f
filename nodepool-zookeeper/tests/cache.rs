//! The mirror of `/nodepool`: it matches ZooKeeper after concurrent churn,
//! shows other clients' completed writes at once, reloads after a
//! reconnection whose watch events were lost (reporting what changed), and
//! drops an expired session's ephemerals.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use nodepool_core::store::{CreateMode, Entry, SessionState, StateStore, StoreError, StoreEvent};
use nodepool_zookeeper::{ServerAddress, ZooKeeperStore};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::broadcast;
use tokio::task::JoinHandle;

/// A client whose `scan("/nodepool")` reads ZooKeeper directly (its mirror
/// is elsewhere): the reference the mirror is compared with.
async fn direct(chroot: &str) -> ZooKeeperStore {
    let mut options = common::plain(chroot);
    options.cache_root = "/not-nodepool".into();
    common::connect(options).await
}

/// A fresh chroot and two clients of it: the one whose mirror a test
/// looks at, and another.
async fn two_clients() -> (String, ZooKeeperStore, ZooKeeperStore) {
    let chroot = common::fresh_chroot();
    let first = common::connect(common::plain(&chroot)).await;
    let second = common::connect(common::plain(&chroot)).await;
    (chroot, first, second)
}

/// Path, data, version, czxid, mzxid, ephemeral owner, children.
type Comparable = (String, Vec<u8>, i32, i64, i64, i64, i32);

fn comparable(entries: Vec<Entry>) -> Vec<Comparable> {
    entries
        .into_iter()
        .map(|e| {
            (
                e.path,
                e.data.to_vec(),
                e.stat.version,
                e.stat.czxid,
                e.stat.mzxid,
                e.stat.ephemeral_owner,
                e.stat.num_children,
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mirror_matches_zookeeper_after_concurrent_churn() {
    let chroot = common::fresh_chroot();
    let cached = common::connect(common::plain(&chroot)).await;
    let writers: Vec<ZooKeeperStore> =
        futures::future::join_all((0..3).map(|_| common::connect(common::plain(&chroot)))).await;
    // Each writer hammers its own paths and some shared ones, 64 ops in
    // flight: creates with parents, sequential and ephemeral creates,
    // versioned and blind sets, deletes that may race with creates.
    futures::stream::iter(0..1_500usize)
        .map(|i| {
            let w = writers[i % writers.len()].clone();
            async move {
                let k = i % 37;
                let p = format!("/nodepool/churn/{}/k{k}", i % 5);
                let _ = match i % 6 {
                    0 | 1 => w
                        .create(&p, format!("c{i}").as_bytes(), CreateMode::Persistent)
                        .await
                        .map(|_| ()),
                    2 => w
                        .set(&p, format!("s{i}").as_bytes(), None)
                        .await
                        .map(|_| ()),
                    3 => w.delete(&p, None).await,
                    4 => w
                        .create(
                            "/nodepool/churn/seq/",
                            b"q",
                            CreateMode::PersistentSequential,
                        )
                        .await
                        .map(|_| ()),
                    _ => w
                        .create(&format!("{p}-eph"), b"e", CreateMode::Ephemeral)
                        .await
                        .map(|_| ()),
                };
            }
        })
        .buffer_unordered(64)
        .collect::<Vec<()>>()
        .await;
    // one writer leaves: its ephemerals go
    writers[0].close().await.expect("close");
    let reference = direct(&chroot).await;
    let want = comparable(reference.scan("/nodepool").await.expect("direct scan"));
    let got = comparable(cached.scan("/nodepool").await.expect("mirror scan"));
    assert!(want.len() > 50, "the churn left a tree: {}", want.len());
    assert_eq!(got.len(), want.len());
    for (g, w) in got.iter().zip(&want) {
        assert_eq!(g, w);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scan_shows_every_write_completed_before_it() {
    let (_, reader, writer) = two_clients().await;
    writer
        .create("/nodepool/x", b"0", CreateMode::Persistent)
        .await
        .expect("create");
    for i in 1..=200 {
        let data = i.to_string();
        writer
            .set("/nodepool/x", data.as_bytes(), None)
            .await
            .expect("set");
        let seen = reader.scan("/nodepool/x").await.expect("scan");
        assert_eq!(&seen[0].data[..], data.as_bytes(), "round {i}");
        // and our own writes, through the same client
        reader
            .create(&format!("/nodepool/own/{i}"), b"", CreateMode::Persistent)
            .await
            .expect("create");
        assert_eq!(
            reader.scan("/nodepool/own").await.expect("scan").len(),
            i + 1
        );
    }
}

/// A TCP proxy to the test ZooKeeper that can cut and refuse connections,
/// to make our client lose its connection while its session lives on.
struct Proxy {
    port: u16,
    conns: Arc<Mutex<Vec<JoinHandle<()>>>>,
    refuse: Arc<std::sync::atomic::AtomicBool>,
    _accept: JoinHandle<()>,
}

impl Proxy {
    async fn start() -> Proxy {
        let upstream = common::plain_hosts();
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let conns: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let refuse = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let accept = {
            let conns = conns.clone();
            let refuse = refuse.clone();
            tokio::spawn(async move {
                while let Ok((mut down, _)) = listener.accept().await {
                    if refuse.load(std::sync::atomic::Ordering::SeqCst) {
                        drop(down);
                        continue;
                    }
                    let upstream = upstream.clone();
                    let task = tokio::spawn(async move {
                        if let Ok(mut up) = TcpStream::connect(upstream).await {
                            let _ = tokio::io::copy_bidirectional(&mut down, &mut up).await;
                        }
                    });
                    conns.lock().expect("lock").push(task);
                }
            })
        };
        Proxy {
            port,
            conns,
            refuse,
            _accept: accept,
        }
    }

    /// Cuts every connection and refuses new ones until `heal`.
    fn cut(&self) {
        self.refuse.store(true, std::sync::atomic::Ordering::SeqCst);
        for c in self.conns.lock().expect("lock").drain(..) {
            c.abort();
        }
    }

    fn heal(&self) {
        self.refuse
            .store(false, std::sync::atomic::Ordering::SeqCst);
    }
}

async fn wait_state(store: &ZooKeeperStore, what: &str, f: impl Fn(SessionState) -> bool) {
    let mut rx = store.session();
    tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            if f(*rx.borrow_and_update()) {
                return;
            }
            rx.changed().await.expect("session watch");
        }
    })
    .await
    .unwrap_or_else(|_| panic!("timed out waiting for {what}; state {:?}", *rx.borrow()));
}

async fn collect_until(
    events: &mut broadcast::Receiver<StoreEvent>,
    want: &[StoreEvent],
) -> Vec<StoreEvent> {
    let mut seen = Vec::new();
    let r = tokio::time::timeout(Duration::from_secs(20), async {
        while !want.iter().all(|w| seen.contains(w)) {
            match events.recv().await {
                Ok(e) => seen.push(e),
                Err(broadcast::error::RecvError::Lagged(_)) => {}
                Err(e) => panic!("events: {e}"),
            }
        }
    })
    .await;
    assert!(r.is_ok(), "missing some of {want:?}; saw {seen:?}");
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnection_reloads_the_mirror_and_reports_missed_changes() {
    let chroot = common::fresh_chroot();
    let proxy = Proxy::start().await;
    let mut options = common::plain(&chroot);
    options.servers = vec![ServerAddress {
        host: "127.0.0.1".into(),
        port: proxy.port,
    }];
    let a = common::connect(options).await;
    let b = common::connect(common::plain(&chroot)).await;
    let id = a.session().borrow().id().expect("connected");
    b.create("/nodepool/r/keep", b"1", CreateMode::Persistent)
        .await
        .expect("create");
    b.create("/nodepool/r/gone", b"1", CreateMode::Persistent)
        .await
        .expect("create");
    let lock = nodepool_core::store::Store::new(Arc::new(a.clone()))
        .lock(
            "/nodepool/r/lock",
            nodepool_core::store::LockWait::NonBlocking,
        )
        .await
        .expect("lock");
    assert_eq!(a.scan("/nodepool/r").await.expect("scan").len(), 5);
    let mut events = a.subscribe();

    proxy.cut();
    wait_state(&a, "suspended", |s| {
        matches!(s, SessionState::Suspended { .. })
    })
    .await;
    assert!(!lock.is_held(), "a suspended lock must not guard work");
    // changes A cannot hear about
    b.set("/nodepool/r/keep", b"2", None).await.expect("set");
    b.delete("/nodepool/r/gone", None).await.expect("delete");
    b.create("/nodepool/r/new", b"3", CreateMode::Persistent)
        .await
        .expect("create");
    // suspended: the last known state is served
    let stale = a.scan("/nodepool/r").await.expect("stale scan");
    assert!(
        stale.iter().any(|e| e.path == "/nodepool/r/gone"),
        "{stale:?}"
    );

    proxy.heal();
    wait_state(&a, "reconnected", |s| s == SessionState::Connected { id }).await;
    let seen = collect_until(
        &mut events,
        &[
            StoreEvent::Changed("/nodepool/r/keep".into()),
            StoreEvent::Deleted("/nodepool/r/gone".into()),
            StoreEvent::Created("/nodepool/r/new".into()),
        ],
    )
    .await;
    assert!(!seen.is_empty());
    let fresh = a.scan("/nodepool/r").await.expect("scan");
    let paths: Vec<&str> = fresh.iter().map(|e| e.path.as_str()).collect();
    assert_eq!(
        paths,
        [
            "/nodepool/r",
            "/nodepool/r/keep",
            "/nodepool/r/lock",
            lock.contender(),
            "/nodepool/r/new"
        ]
    );
    assert_eq!(&fresh[1].data[..], b"2");
    assert!(lock.is_held(), "same session: the lock survived");
    // and the watch still works
    b.set("/nodepool/r/new", b"4", None).await.expect("set");
    collect_until(
        &mut events,
        &[StoreEvent::Changed("/nodepool/r/new".into())],
    )
    .await;
    lock.release().await.expect("release");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expiry_drops_our_ephemerals_from_the_mirror() {
    let chroot = common::fresh_chroot();
    let a = common::connect(common::plain(&chroot)).await;
    let old = a.session().borrow().id().expect("connected");
    a.create(
        "/nodepool/components/pool/host",
        b"{}",
        CreateMode::EphemeralSequential,
    )
    .await
    .expect("register");
    a.create("/nodepool/p", b"x", CreateMode::Persistent)
        .await
        .expect("create");
    let mut events = a.subscribe();
    a.expire_session().await.expect("expire");
    let new = a.session().borrow().id().expect("a new session");
    assert_ne!(new, old);
    collect_until(
        &mut events,
        &[StoreEvent::Deleted(
            "/nodepool/components/pool/host0000000000".into(),
        )],
    )
    .await;
    let paths: Vec<String> = a
        .scan("/nodepool")
        .await
        .expect("scan")
        .into_iter()
        .map(|e| e.path)
        .collect();
    assert_eq!(
        paths,
        [
            "/nodepool",
            "/nodepool/components",
            "/nodepool/components/pool",
            "/nodepool/p"
        ]
    );
    // the new session works and is watched
    a.create("/nodepool/q", b"", CreateMode::Ephemeral)
        .await
        .expect("create");
    let (_, stat) = a.get("/nodepool/q").await.expect("get").expect("exists");
    assert_eq!(stat.ephemeral_owner, new);
    collect_until(&mut events, &[StoreEvent::Created("/nodepool/q".into())]).await;
    a.close().await.expect("close");
    assert_eq!(*a.session().borrow(), SessionState::Closed);
    let r = a.scan("/nodepool").await;
    assert!(matches!(r, Err(StoreError::SessionLost)), "{r:?}");
}

/// The client's health gauges (`nodepool.launcher.<host>.zk.*`): the
/// mirror's size, changes a subscriber has not taken yet (the playback
/// queue), and empty queues once everything is answered and applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_reports_the_mirror_and_its_queues() {
    use nodepool_core::store::StoreHealth;
    let (_, a, b) = two_clients().await;
    let before = a.health();
    // A subscriber that reads nothing: every change waits for it.
    let _slow = a.subscribe();
    for i in 0..20 {
        b.create(&format!("/nodepool/h/{i}"), b"x", CreateMode::Persistent)
            .await
            .expect("create");
    }
    // The scan returns once every change made before it is in the mirror.
    assert_eq!(a.scan("/nodepool/h").await.expect("scan").len(), 21);
    let h = a.health();
    assert!(
        h.cached_records >= before.cached_records + 21,
        "{before:?} then {h:?}"
    );
    assert!(h.playback_queue >= 21, "{h:?}");
    // The traffic counters: b sent the 20 creates (and their parent),
    // each path and byte of data; a heard of each and read it into its
    // mirror (one read per created record).
    let w = b.health();
    assert!(w.writes >= 20, "{w:?}");
    assert!(
        w.bytes_sent >= 20 * ("/nodepool/h/0".len() as u64 + 1),
        "{w:?}"
    );
    assert!(
        h.watch_events >= before.watch_events + 21,
        "{before:?} then {h:?}"
    );
    assert!(h.reads >= before.reads + 21, "{before:?} then {h:?}");
    assert!(
        h.bytes_received >= before.bytes_received + 20,
        "{before:?} then {h:?}"
    );
    assert_eq!(
        h.writes, before.writes,
        "a only read: {before:?} then {h:?}"
    );
    assert_eq!(
        StoreHealth {
            requests_in_flight: h.requests_in_flight,
            event_queue: h.event_queue,
            ..StoreHealth::default()
        },
        StoreHealth::default(),
        "nothing in flight or unapplied at rest: {h:?}"
    );
}

/// Request and node locks are mirrored from their watch events alone: a
/// scan shows them (a record is locked while its contender exists) but
/// the mirror sends no read for them, as Python Nodepool's and Zuul's
/// caches do not. Other records are still read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lock_znodes_are_mirrored_without_being_read() {
    let (_, cached, other) = two_clients().await;
    for dir in ["/nodepool/nodes/0000000001", "/nodepool/requests-lock"] {
        other
            .create(dir, b"{}", CreateMode::Persistent)
            .await
            .expect("create");
    }
    assert_eq!(cached.scan("/nodepool").await.expect("scan").len(), 4);
    let before = cached.health();
    let locks = [
        "/nodepool/nodes/0000000001/lock",
        "/nodepool/requests-lock/200-0000000001",
    ];
    let mut contenders = Vec::new();
    for dir in locks {
        other
            .create(dir, b"", CreateMode::Persistent)
            .await
            .expect("create lock dir");
        let c = other
            .create(
                &format!("{dir}/0b1f__lock__"),
                b"zuul",
                CreateMode::EphemeralSequential,
            )
            .await
            .expect("create contender");
        contenders.push(c);
    }
    let seen: Vec<String> = cached
        .scan("/nodepool")
        .await
        .expect("scan")
        .into_iter()
        .map(|e| e.path)
        .collect();
    for p in locks
        .iter()
        .map(|p| p.to_string())
        .chain(contenders.clone())
    {
        assert!(seen.contains(&p), "{p} missing from {seen:?}");
    }
    let after = cached.health();
    assert_eq!(after.watch_events, before.watch_events + 4, "{after:?}");
    // The scan's sync is its only read.
    assert_eq!(after.reads, before.reads + 1, "{before:?} then {after:?}");
    // A released lock is gone from the mirror; a record is read as before.
    other.delete(&contenders[0], None).await.expect("release");
    other
        .set(
            "/nodepool/nodes/0000000001",
            b"{\"state\": \"ready\"}",
            None,
        )
        .await
        .expect("set");
    let seen = cached.scan("/nodepool/nodes").await.expect("scan");
    assert!(seen.iter().all(|e| e.path != contenders[0]), "{seen:?}");
    assert_eq!(&seen[1].data[..], b"{\"state\": \"ready\"}");
    let last = cached.health();
    assert_eq!(last.reads, after.reads + 2, "{after:?} then {last:?}");
}

/// A planning pass reads requests and their locks as one view: while
/// another client fulfils requests and releases their locks in one
/// transaction each, no listing shows a request still `pending` whose lock
/// is already gone (which a pass would take for a request whose launcher
/// died).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listings_never_show_a_request_pending_after_its_lock_went() {
    use nodepool_core::model::{NodeRequest, RequestState, WireRecord};
    use nodepool_core::store::{LockWait, MultiOp, Store, paths};
    let chroot = common::fresh_chroot();
    let reader = Store::new(Arc::new(common::connect(common::plain(&chroot)).await));
    let raw = common::connect(common::plain(&chroot)).await;
    let writer = Store::new(Arc::new(raw.clone()));
    const REQUESTS: usize = 150;
    let mut held = Vec::new();
    let mut guards = Vec::new();
    for _ in 0..REQUESTS {
        let mut request = NodeRequest::new(vec!["x".into()], "zuul", 1_700_000_000.0);
        request.state = RequestState::Pending;
        let id = writer
            .submit_request(&request, "200", false)
            .await
            .expect("submit");
        let guard = writer
            .lock_request(&id, LockWait::NonBlocking)
            .await
            .expect("lock");
        let lock = guard.contender().to_owned();
        // Kept until the end: the transaction below deletes the contender.
        guards.push(guard);
        request.state = RequestState::Fulfilled;
        held.push((id, lock, request.to_json()));
    }
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let fulfil = {
        let done = done.clone();
        tokio::spawn(async move {
            for (id, lock, fulfilled) in &held {
                let path = paths::request(id);
                let ops = [
                    MultiOp::Set {
                        path: &path,
                        data: fulfilled,
                        version: None,
                    },
                    MultiOp::Delete {
                        path: lock,
                        version: None,
                    },
                ];
                raw.multi(&ops).await.expect("multi").expect("applied");
            }
            done.store(true, std::sync::atomic::Ordering::SeqCst);
        })
    };
    let mut listings = 0;
    let mut seen_mixed = false;
    while !done.load(std::sync::atomic::Ordering::SeqCst) || listings == 0 {
        let all = reader.listings().await.expect("listings");
        listings += 1;
        let states: Vec<RequestState> = all
            .requests
            .records
            .iter()
            .map(|r| r.request.state)
            .collect();
        seen_mixed |=
            states.contains(&RequestState::Pending) && states.contains(&RequestState::Fulfilled);
        for r in &all.requests.records {
            assert!(
                r.request.state != RequestState::Pending || r.locked,
                "listing {listings}: {} pending without its lock",
                r.id
            );
        }
    }
    fulfil.await.expect("fulfil task");
    assert!(
        seen_mixed,
        "no listing was taken while requests were being fulfilled ({listings} listings)"
    );
}

/// The mirror takes our own writes' data from their answers instead of
/// reading each changed znode, and still matches ZooKeeper: concurrent
/// sets of one znode from this client (versioned ones failing), sets in
/// transactions, and another client's sets of the same znodes in between.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn own_writes_reach_the_mirror_without_reads_and_it_matches_zookeeper() {
    use nodepool_core::store::MultiOp;
    let (chroot, cached, other) = two_clients().await;
    const KEYS: usize = 8;
    for k in 0..KEYS {
        cached
            .create(&format!("/nodepool/own/k{k}"), b"0", CreateMode::Persistent)
            .await
            .expect("create");
    }
    assert_eq!(
        cached.scan("/nodepool/own").await.expect("scan").len(),
        KEYS + 1
    );
    // Our writes alone: no read for any of them.
    let before = cached.health();
    for i in 0..40usize {
        let p = format!("/nodepool/own/k{}", i % KEYS);
        cached
            .set(&p, format!("alone{i}").as_bytes(), None)
            .await
            .expect("set");
    }
    let seen = cached.scan("/nodepool/own").await.expect("scan");
    assert_eq!(&seen[1].data[..], b"alone32");
    let after = cached.health();
    assert_eq!(
        after.reads,
        before.reads + 1,
        "only the scan's sync: {before:?} then {after:?}"
    );

    // Now everything at once.
    futures::stream::iter(0..1_200usize)
        .map(|i| {
            let (cached, other) = (cached.clone(), other.clone());
            async move {
                let k = i % KEYS;
                let p = format!("/nodepool/own/k{k}");
                let q = format!("/nodepool/own/k{}", (k + 1) % KEYS);
                let data = format!("d{i}");
                let _ = match i % 5 {
                    0 => cached.set(&p, data.as_bytes(), None).await.map(|_| ()),
                    // A versioned set that often fails: another write won.
                    1 => match cached.get(&p).await {
                        Ok(Some((_, st))) => cached
                            .set(&p, data.as_bytes(), Some(st.version))
                            .await
                            .map(|_| ()),
                        _ => Ok(()),
                    },
                    2 => cached
                        .multi(&[
                            MultiOp::Set {
                                path: &p,
                                data: data.as_bytes(),
                                version: None,
                            },
                            MultiOp::Set {
                                path: &q,
                                data: data.as_bytes(),
                                version: None,
                            },
                        ])
                        .await
                        .map(|_| ()),
                    // A transaction that fails as a whole: nothing of it applies.
                    3 => cached
                        .multi(&[
                            MultiOp::Set {
                                path: &p,
                                data: b"never",
                                version: None,
                            },
                            MultiOp::Set {
                                path: &q,
                                data: b"never",
                                version: Some(-5),
                            },
                        ])
                        .await
                        .map(|_| ()),
                    _ => other.set(&p, data.as_bytes(), None).await.map(|_| ()),
                };
            }
        })
        .buffer_unordered(64)
        .collect::<Vec<()>>()
        .await;
    let reference = direct(&chroot).await;
    let want = comparable(reference.scan("/nodepool/own").await.expect("direct scan"));
    let got = comparable(cached.scan("/nodepool/own").await.expect("mirror scan"));
    assert_eq!(got, want);
    assert!(got.iter().all(|(_, data, ..)| data != b"never"));
    // Every write is answered and every event applied: none is left
    // registered, the failed ones included.
    assert_eq!(cached.own_writes_pending(), 0);
    // Failed writes to a znode that is gone have no event to take them.
    for i in 0..10 {
        let r = cached
            .set("/nodepool/own/gone", format!("{i}").as_bytes(), None)
            .await;
        assert!(matches!(r, Err(StoreError::NotFound { .. })), "{r:?}");
    }
    assert_eq!(cached.own_writes_pending(), 0);
}

/// As [`comparable`], with the creation and change times: a create's stat
/// inside a transaction is made from the transaction's other stat.
fn with_times(entries: Vec<Entry>) -> Vec<(Comparable, i64, i64)> {
    entries
        .into_iter()
        .map(|e| {
            let times = (e.stat.ctime, e.stat.mtime);
            (comparable(vec![e]).remove(0), times.0, times.1)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn own_creates_reach_the_mirror_without_reads_and_it_matches_zookeeper() {
    use nodepool_core::store::MultiOp;
    let (chroot, cached, other) = two_clients().await;
    cached
        .create("/nodepool/made/key", b"0", CreateMode::Persistent)
        .await
        .expect("create");
    assert_eq!(cached.scan("/nodepool/made").await.expect("scan").len(), 2);
    // Our creates alone, plain and in transactions (sequential names, as
    // nodes get): no read for any of them.
    let before = cached.health();
    for i in 0..20usize {
        cached
            .create(
                "/nodepool/made/n-",
                format!("alone{i}").as_bytes(),
                CreateMode::PersistentSequential,
            )
            .await
            .expect("create");
        let data = format!("txn{i}");
        cached
            .multi(&[
                MultiOp::Set {
                    path: "/nodepool/made/key",
                    data: data.as_bytes(),
                    version: None,
                },
                MultiOp::Create {
                    path: "/nodepool/made/n-",
                    data: data.as_bytes(),
                    mode: CreateMode::PersistentSequential,
                },
            ])
            .await
            .expect("multi");
    }
    let seen = cached.scan("/nodepool/made").await.expect("scan");
    assert_eq!(seen.len(), 2 + 40);
    let after = cached.health();
    assert_eq!(
        after.reads,
        before.reads + 1,
        "only the scan's sync: {before:?} then {after:?}"
    );
    let reference = direct(&chroot).await;
    assert_eq!(
        with_times(seen),
        with_times(reference.scan("/nodepool/made").await.expect("direct scan"))
    );

    // Now everything at once, with another client creating beside us.
    futures::stream::iter(0..900usize)
        .map(|i| {
            let (cached, other) = (cached.clone(), other.clone());
            async move {
                let data = format!("d{i}");
                let seq = CreateMode::PersistentSequential;
                let _ = match i % 6 {
                    0 => cached
                        .create("/nodepool/made/n-", data.as_bytes(), seq)
                        .await
                        .map(drop),
                    1 => cached
                        .multi(&[
                            MultiOp::Set {
                                path: "/nodepool/made/key",
                                data: data.as_bytes(),
                                version: None,
                            },
                            MultiOp::Create {
                                path: "/nodepool/made/n-",
                                data: data.as_bytes(),
                                mode: seq,
                            },
                        ])
                        .await
                        .map(drop),
                    // A transaction that fails as a whole: nothing is made.
                    2 => cached
                        .multi(&[
                            MultiOp::Create {
                                path: "/nodepool/made/n-",
                                data: b"never",
                                mode: seq,
                            },
                            MultiOp::Set {
                                path: "/nodepool/made/key",
                                data: b"never",
                                version: Some(-5),
                            },
                        ])
                        .await
                        .map(drop),
                    // A create that fails: the path exists.
                    3 => cached
                        .create("/nodepool/made/key", b"never", CreateMode::Persistent)
                        .await
                        .map(drop),
                    // Missing parents are made first (the create is sent twice).
                    4 => cached
                        .create(
                            &format!("/nodepool/made/dir{i}/n"),
                            data.as_bytes(),
                            CreateMode::Persistent,
                        )
                        .await
                        .map(drop),
                    _ => other
                        .create("/nodepool/made/n-", data.as_bytes(), seq)
                        .await
                        .map(drop),
                };
            }
        })
        .buffer_unordered(64)
        .collect::<Vec<()>>()
        .await;
    let want = with_times(reference.scan("/nodepool/made").await.expect("direct scan"));
    let got = with_times(cached.scan("/nodepool/made").await.expect("mirror scan"));
    assert_eq!(got.len(), 2 + 40 + 3 * 150 + 2 * 150, "{got:?}");
    assert_eq!(got, want);
    assert!(got.iter().all(|((_, data, ..), ..)| data != b"never"));
    // Every create is answered and every event applied: none is left
    // registered, the failed ones included.
    assert_eq!(cached.own_writes_pending(), 0);
    // Creates whose callers gave up before the answer (sent, then the
    // future dropped): their events read, and they do not stay registered.
    for i in 0..10 {
        // Polled once (sent), then dropped.
        let gave_up = futures::FutureExt::now_or_never(cached.create(
            "/nodepool/made/n-",
            format!("cancelled{i}").as_bytes(),
            CreateMode::PersistentSequential,
        ));
        assert!(gave_up.is_none(), "{gave_up:?}");
    }
    let got = with_times(cached.scan("/nodepool/made").await.expect("mirror scan"));
    let want = with_times(reference.scan("/nodepool/made").await.expect("direct scan"));
    assert_eq!(got.len(), 2 + 40 + 3 * 150 + 2 * 150 + 10);
    assert_eq!(got, want);
    assert_eq!(cached.own_writes_pending(), 0);

    // Lock contenders are created from a prefix (the sequence comes with
    // the answer) and their events are not read: they must not be
    // registered either, or every lock taken stays registered for good.
    for i in 0..10 {
        let request_lock = format!("/nodepool/requests-lock/200-{i:010}");
        cached
            .create(&request_lock, b"", CreateMode::Persistent)
            .await
            .expect("request lock directory");
        cached
            .create(
                &format!("{request_lock}/{i:032x}__lock__"),
                b"",
                CreateMode::EphemeralSequential,
            )
            .await
            .expect("request lock contender");
        let node = format!("/nodepool/nodes/{i:010}");
        cached
            .create(&node, b"{}", CreateMode::Persistent)
            .await
            .expect("node");
        cached
            .multi(&[
                MultiOp::Create {
                    path: &format!("{node}/lock"),
                    data: b"",
                    mode: CreateMode::Persistent,
                },
                MultiOp::Create {
                    path: &format!("{node}/lock/{i:032x}__lock__"),
                    data: b"",
                    mode: CreateMode::EphemeralSequential,
                },
            ])
            .await
            .expect("node lock");
    }
    let got = cached.scan("/nodepool").await.expect("mirror scan");
    assert!(got.iter().any(|e| e.path.contains("/lock/")), "{got:?}");
    assert_eq!(cached.own_writes_pending(), 0);
    // What the launcher's `nodepool_zk_queue{queue="own_writes"}` shows.
    assert_eq!(cached.health().own_writes, 0);
}
