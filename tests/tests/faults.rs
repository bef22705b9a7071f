//! Issue 12's fault drills as whole-system tests: real ZooKeeper servers
//! (a private one per test, stopped and started by the test, over TLS),
//! real SQLite files (one on a tmpfs the test fills), real
//! `nodepool-launcher` processes (an in-process launcher where the fault
//! needs a hook: ambiguous writes), and the simulated cloud shared through
//! its state file (two clouds, one per provider, for the drills where one
//! cloud's API hangs or answers 429). A Zuul-style client submits a burst of single-node
//! requests, checks every node it is given, uses it and gives it back; a
//! monitor watches the store and the cloud throughout.
//!
//! Every drill asserts the same properties (`Report::problems`): every
//! request fulfilled; no node handed out or `ready` unless its server
//! exists and is ACTIVE; no node given to two requests; and once every
//! node is given back, zero nodes and zero servers *without* the leak
//! sweep (the launcher lists the cloud every 60 s and deletes a server
//! unknown at two listings, so no sweep can delete anything within a
//! drill; the report also checks the launchers' logs and metrics for
//! "leaked server deleted"). A drill whose fault did not do what the
//! scenario is about (the session meant to survive expired, the disk never
//! filled) fails too.
//!
//! The drills take the machine for themselves (one at a time: they stop
//! servers and processes on a timetable, and two at once on 2 cores would
//! make each other's timeouts). The shared test ZooKeeper is never
//! touched.
//!
//! ```text
//! cargo test -p nodepool-tests --test faults
//! ```

use std::time::Duration;

use nodepool_core::config::ApiFault;
use nodepool_tests::drill::{self, FinishLimits, Params, Report};
use nodepool_tests::faults::Ambiguity;
use nodepool_tests::{Backend, workspace_binary};

/// One drill at a time (see the module documentation). A tokio mutex:
/// each test has its own runtime, and a panicking drill must not poison
/// the others.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The common parameters: boot 1 s as in the issue, bursts small enough
/// to keep each drill well under a minute.
async fn params(requests: usize) -> Params {
    let launcher_bin =
        tokio::task::spawn_blocking(|| workspace_binary("nodepool-cli", "nodepool-launcher"))
            .await
            .expect("build nodepool-launcher");
    Params {
        requests,
        boot_delay: 1.0,
        max_servers: 40,
        providers: 1,
        launcher_bin,
        // After the last fault. A launcher that lost nothing serves the
        // rest of the burst in a few seconds; what is not done by then is
        // stranded.
        settle: Duration::from_secs(20),
        limits: FinishLimits {
            nodes_gone: Duration::from_secs(20),
            servers_grace: Duration::from_secs(3),
            zero_servers: Duration::from_secs(3),
        },
    }
}

/// Fails with the whole report (timeline, stranded requests and their
/// nodes, launcher log counts) when any property did not hold. Set
/// `NODEPOOL_DRILL_KEEP=1` to keep the launchers' logs and ZooKeeper's
/// data directory.
fn check(report: &Report) {
    report.assert_clean();
    eprintln!("{report}");
}

/// (1) ZooKeeper stopped for 5 s mid-burst, three times, with
/// `zookeeper-timeout: 20`: the session survives, so nothing may be lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zookeeper_blips_shorter_than_the_session_timeout_lose_nothing() {
    let _one = ONE_AT_A_TIME.lock().await;
    let p = params(90).await;
    check(&drill::zookeeper_blips(&p, 3, Duration::from_secs(5)).await);
}

/// ZooKeeper stopped for 8 s with `zookeeper-timeout: 3`: the session
/// really expires; what the launcher held is given up and served again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zookeeper_outage_past_the_session_timeout_is_re_served_cleanly() {
    let _one = ONE_AT_A_TIME.lock().await;
    // A wide pool: the burst's creates take longest, so the outage is
    // likeliest to catch servers created but not yet recorded.
    let p = Params {
        max_servers: 80,
        ..params(80).await
    };
    check(&drill::zookeeper_outage_past_session_timeout(&p, Duration::from_secs(8)).await);
}

/// (2) One of two launchers SIGSTOPped past its session timeout, then
/// SIGCONTed, on ZooKeeper.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zookeeper_session_expiry_by_sigstop_leaks_nothing() {
    let _one = ONE_AT_A_TIME.lock().await;
    let p = Params {
        max_servers: 80,
        ..params(80).await
    };
    check(&drill::session_expiry_sigstop(&p, Backend::ZooKeeper).await);
}

/// (2) The same on SQLite (lease 3 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_session_expiry_by_sigstop_leaks_nothing() {
    let _one = ONE_AT_A_TIME.lock().await;
    let p = Params {
        max_servers: 80,
        ..params(80).await
    };
    check(&drill::session_expiry_sigstop(&p, Backend::Sqlite).await);
}

/// (3) The SQLite file's disk full for 6 s (two leases) mid-burst, then
/// freed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_disk_full_mid_burst_leaks_nothing() {
    let _one = ONE_AT_A_TIME.lock().await;
    let p = Params {
        max_servers: 80,
        ..params(80).await
    };
    check(&drill::sqlite_disk_full(&p, Duration::from_secs(6)).await);
}

/// (4) 10% of the launcher's node writes applied by ZooKeeper but seen
/// as failed: no dead node may be handed out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ambiguous_node_writes_never_hand_out_a_dead_node() {
    let _one = ONE_AT_A_TIME.lock().await;
    let p = params(60).await;
    check(&drill::ambiguous_writes(&p, Ambiguity::node_updates(12, 0.1)).await);
}

/// (4) Two providers serve the label; one's API hangs mid-burst (calls
/// time out after 10 s) for 30 s: it is marked unavailable, and the
/// healthy one serves the whole burst while the fault holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_cloud_fails_over_to_the_healthy_provider() {
    let _one = ONE_AT_A_TIME.lock().await;
    let p = params(60).await;
    check(&drill::cloud_fault(&p, ApiFault::Hang, Duration::from_secs(30)).await);
}

/// (4) The same with a cloud answering 429 with `Retry-After: 5`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rate_limited_cloud_fails_over_to_the_healthy_provider() {
    let _one = ONE_AT_A_TIME.lock().await;
    let p = params(60).await;
    let fault = ApiFault::RateLimit {
        retry_after: Some(Duration::from_secs(5)),
    };
    check(&drill::cloud_fault(&p, fault, Duration::from_secs(20)).await);
}

/// Issue 16: three launchers on a three-server ensemble, the leader
/// killed mid-burst and started again: the launchers reconnect to the
/// surviving servers without a restart, and nothing is lost, doubled or
/// left behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ensemble_whose_leader_is_killed_mid_burst_loses_nothing() {
    let _one = ONE_AT_A_TIME.lock().await;
    let mut p = params(120).await;
    p.max_servers = 20;
    check(&drill::ensemble_leader_killed(&p).await);
}

// ---------------------------------------------------------------------------
// The harness itself: the premises the drills stand on.
// ---------------------------------------------------------------------------

/// A private ZooKeeper stopped for 5 s and started again keeps a client's
/// session and its lock (what the blip drill assumes of a short outage),
/// over TLS as the launchers connect.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn harness_a_short_zookeeper_restart_keeps_the_session_and_its_locks() {
    use nodepool_core::store::{LockWait, SessionState, Store};
    let _one = ONE_AT_A_TIME.lock().await;
    let mut zk = nodepool_tests::faults::ZooKeeperServer::start_new().await;
    let yaml = format!(
        "{}labels: []\nproviders: []\n",
        zk.store_yaml("/harness", 10.0)
    );
    let cfg = nodepool_core::config::Config::from_yaml(&yaml).expect("config");
    let store: Store = drill::open_store(&cfg).await;
    let session = store.backend().session();
    let Some(id) = session.borrow().id() else {
        panic!("not connected: {:?}", *session.borrow())
    };
    let lock = store
        .lock("/nodepool/harness-lock", LockWait::NonBlocking)
        .await
        .expect("lock");
    zk.stop().await;
    drill::until(Duration::from_secs(10), || async {
        match *session.borrow() {
            SessionState::Suspended { .. } => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await
    .expect("the client notices the outage");
    // The outage's length, not a wait for an outcome.
    tokio::time::sleep(Duration::from_secs(5)).await;
    zk.start().await;
    let back = drill::until(Duration::from_secs(20), || async {
        match *session.borrow() {
            SessionState::Connected { id: now } => Ok(now),
            other => Err(format!("{other:?}")),
        }
    })
    .await
    .expect("the client reconnects");
    assert_eq!(back, id, "the session was replaced");
    assert!(lock.is_held(), "the lock guard says it was lost");
    let contenders = store
        .backend()
        .children("/nodepool/harness-lock")
        .await
        .expect("children");
    assert_eq!(
        contenders.len(),
        1,
        "our lock contender went: {contenders:?}"
    );
    lock.release().await.expect("release");
    let _ = store.backend().close().await;
}

/// The ambiguity decorator applies every write and reports a seeded share
/// of the matching ones as failed, leaving other paths alone.
#[tokio::test]
async fn harness_ambiguous_writes_are_applied_then_reported_failed() {
    use std::sync::Arc;

    use nodepool_core::store::{CreateMode, StateStore, StoreError};
    use nodepool_core::testing::MemoryStore;
    use nodepool_tests::faults::AmbiguousWrites;
    let inner: Arc<dyn StateStore> = Arc::new(MemoryStore::new());
    let store = AmbiguousWrites::new(inner.clone(), Ambiguity::node_updates(7, 0.25));
    let mut reported = 0;
    for i in 0..400 {
        let path = format!("/nodepool/nodes/{i:010}");
        store
            .create(&path, b"{}", CreateMode::Persistent)
            .await
            .expect("creates are not made ambiguous");
        let data = format!(r#"{{"state": "ready", "n": {i}}}"#);
        match store.set(&path, data.as_bytes(), Some(0)).await {
            Ok(_) => {}
            Err(StoreError::Unavailable { .. }) => reported += 1,
            Err(e) => panic!("{path}: {e}"),
        }
        let (now, stat) = inner.get(&path).await.expect("get").expect("exists");
        assert_eq!(now, data.as_bytes(), "{path}: the write was not applied");
        assert_eq!(stat.version, 1);
        // A lock contender below the node is not a node record.
        store
            .set(&path, data.as_bytes(), None)
            .await
            .map(|_| ())
            .or_else(|e| match e {
                StoreError::Unavailable { .. } => Ok(()),
                e => Err(e),
            })
            .expect("set");
        store
            .create(
                &format!("{path}/lock/x__lock__"),
                b"",
                CreateMode::PersistentSequential,
            )
            .await
            .expect("paths below a node are left alone");
    }
    let injected = store.injected();
    assert!(
        (60..=140).contains(&reported),
        "{reported} of 400 first writes reported failed at a 25% rate"
    );
    assert!(injected.len() >= reported);
    assert!(
        injected
            .iter()
            .all(|f| f.op == "set" && f.state.as_deref() == Some("ready")),
        "{injected:?}"
    );
}

/// A filled tmpfs refuses the next write; freeing it lets it through.
#[test]
fn harness_a_filled_tmpfs_is_full_until_freed() {
    use std::io::Write as _;
    let dir = tempfile::tempdir().expect("tempdir");
    let fs = nodepool_tests::faults::Tmpfs::mount(&dir.path().join("m"), 1 << 20)
        .unwrap_or_else(|e| panic!("{e}"));
    let filled = fs.fill().expect("fill");
    assert!(filled > 900_000, "only {filled} bytes filled 1 MiB");
    let write = || {
        std::fs::File::create(fs.path().join("probe")).and_then(|mut f| {
            f.write_all(&[1u8; 8192])?;
            f.sync_all()
        })
    };
    let err = write().expect_err("a write to a full disk");
    assert_eq!(err.raw_os_error(), Some(28), "{err}");
    fs.free().expect("free");
    write().expect("a write once space is freed");
}
