//! Behaviour of the SQLite store beyond the shared conformance suite:
//! opening errors, configuration, malformed rows, sessions, the change
//! feed and the scan cache. Real files in temporary directories.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use nodepool_core::config::Config;
use nodepool_core::model::{Node, NodeState};
use nodepool_core::store::{
    CreateMode, SessionState, StateStore, Store, StoreError, StoreEvent, paths,
};
use nodepool_sqlite::{SqliteOptions, SqliteStore};

const DEADLINE: Duration = Duration::from_secs(20);

fn options() -> SqliteOptions {
    SqliteOptions::default().with_lease(Duration::from_secs(5))
}

async fn open(db: &Path) -> SqliteStore {
    SqliteStore::open(db, options()).await.expect("open")
}

fn raw(db: &Path) -> rusqlite::Connection {
    let conn = rusqlite::Connection::open(db).expect("open");
    conn.busy_timeout(Duration::from_secs(5))
        .expect("busy timeout");
    conn
}

fn assert_unavailable_naming(r: Result<SqliteStore, StoreError>, path: &Path, why: &str) {
    match r {
        Err(e @ StoreError::Unavailable { .. }) => {
            let msg = e.to_string();
            assert!(
                msg.contains(&path.display().to_string()),
                "names the path: {msg}"
            );
            assert!(msg.contains(why), "says why ({why}): {msg}");
        }
        other => panic!("expected Unavailable, got {other:?}"),
    }
}

#[tokio::test]
async fn unusable_files_are_reported_with_their_path() {
    let dir = tempfile::tempdir().expect("tempdir");

    let blocker = dir.path().join("a-file");
    std::fs::write(&blocker, b"x").expect("write");
    let under_file = blocker.join("sub").join("nodepool.db");
    assert_unavailable_naming(
        SqliteStore::open(&under_file, options()).await,
        &under_file,
        "cannot create the directory",
    );

    let garbage = dir.path().join("garbage.db");
    std::fs::write(&garbage, vec![b'z'; 8192]).expect("write");
    assert_unavailable_naming(
        SqliteStore::open(&garbage, options()).await,
        &garbage,
        "not a database",
    );

    let a_dir = dir.path().join("is-a-directory");
    std::fs::create_dir(&a_dir).expect("mkdir");
    assert_unavailable_naming(
        SqliteStore::open(&a_dir, options()).await,
        &a_dir,
        "cannot open",
    );

    let newer = dir.path().join("newer.db");
    drop(open(&newer).await);
    raw(&newer)
        .execute(
            "UPDATE meta SET value = 99 WHERE key = 'schema_version'",
            [],
        )
        .expect("update");
    assert_unavailable_naming(
        SqliteStore::open(&newer, options()).await,
        &newer,
        "schema version 99",
    );
}

#[tokio::test]
async fn opens_the_configured_file_creating_its_directories() {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = dir.path().join("var/lib/nodepool/nodepool.db");
    let yaml = format!(
        "state-store:\n  driver: sqlite\n  path: {}\nlabels: []\nproviders: []\n",
        db.display()
    );
    let config = Config::from_yaml(&yaml).expect("config");
    let store = SqliteStore::from_config(&config, options())
        .await
        .expect("open from config");
    assert_eq!(store.path(), db);
    assert!(db.is_file());
    let mode: String = raw(&db)
        .query_row("PRAGMA journal_mode", [], |r| r.get(0))
        .expect("journal mode");
    assert_eq!(mode, "wal");
    store.close().await.expect("close");

    let zk = Config::from_yaml("zookeeper-servers:\n  - host: zk1\nlabels: []\nproviders: []\n")
        .expect("config");
    let r = SqliteStore::from_config(&zk, options()).await;
    assert!(
        matches!(&r, Err(StoreError::Other(m)) if m.contains("ZooKeeper")),
        "{r:?}"
    );
}

#[tokio::test]
async fn malformed_rows_are_reported_per_record_and_skipped() {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = dir.path().join("nodepool.db");
    let sqlite = open(&db).await;
    let store = Store::new(Arc::new(sqlite.clone()));
    let node = Node::new(NodeState::Ready, 1.0, "p", "main", vec!["x".into()]);
    let good = store.create_node(&node).await.expect("create");
    // Rows no writer of ours produces: a hand edit, a damaged file.
    let conn = raw(&db);
    for (path, data, version) in [
        ("/nodepool/nodes/0000000100", "x'7b7d'", "'seven'"),
        ("/nodepool/nodes/0000000101", "3.5", "0"),
    ] {
        conn.execute(
            &format!(
                "INSERT INTO records (path, parent, data, version, czxid, mzxid, ctime, mtime,
                     owner, num_children, cversion)
                 VALUES ('{path}', '/nodepool/nodes', {data}, {version}, 0, 0, 0, 0, 0, 0, 0)"
            ),
            [],
        )
        .expect("insert");
    }
    // A direct read of the file and the cached copy agree.
    for s in [
        sqlite.clone(),
        SqliteStore::open(&db, options().with_scan_cache(false))
            .await
            .expect("open"),
    ] {
        let listed = Store::new(Arc::new(s.clone()))
            .list_nodes()
            .await
            .expect("the listing still works");
        let ids: Vec<&str> = listed.records.iter().map(|r| r.id.as_str()).collect();
        assert_eq!(ids, [good.as_str()]);
        let r = s.get("/nodepool/nodes/0000000100").await;
        assert!(
            matches!(&r, Err(StoreError::Malformed { path, reason })
                if path == "/nodepool/nodes/0000000100" && reason.contains("version")),
            "{r:?}"
        );
        let r = s.get("/nodepool/nodes/0000000101").await;
        assert!(
            matches!(&r, Err(StoreError::Malformed { reason, .. }) if reason.contains("data")),
            "{r:?}"
        );
        let scanned: Vec<String> = s
            .scan(paths::NODES)
            .await
            .expect("scan")
            .into_iter()
            .map(|e| e.path)
            .collect();
        assert_eq!(scanned, [paths::NODES.to_owned(), paths::node(&good)]);
    }
}

#[tokio::test]
async fn a_closed_store_refuses_work_and_its_ephemerals_are_gone() {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = dir.path().join("nodepool.db");
    let a = open(&db).await;
    let b = open(&db).await;
    a.create("/nodepool/x/e", b"", CreateMode::Ephemeral)
        .await
        .expect("create");
    a.close().await.expect("close");
    a.close().await.expect("closing twice is fine");
    assert_eq!(*a.session().borrow(), SessionState::Closed);
    assert!(matches!(
        a.get("/nodepool/x").await,
        Err(StoreError::SessionLost)
    ));
    assert!(matches!(
        a.create("/nodepool/x/y", b"", CreateMode::Persistent).await,
        Err(StoreError::SessionLost)
    ));
    assert_eq!(b.get("/nodepool/x/e").await.expect("get"), None);
}

#[tokio::test]
async fn dropping_the_last_handle_ends_its_session() {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = dir.path().join("nodepool.db");
    let watcher = open(&db).await;
    let mut events = watcher.subscribe();
    let a = open(&db).await;
    let clone = a.clone();
    a.create("/nodepool/x/e", b"", CreateMode::Ephemeral)
        .await
        .expect("create");
    drop(a);
    assert!(
        clone.get("/nodepool/x/e").await.expect("get").is_some(),
        "a clone keeps the session"
    );
    drop(clone);
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        match tokio::time::timeout_at(deadline, events.recv()).await {
            Ok(Ok(StoreEvent::Deleted(p))) if p == "/nodepool/x/e" => break,
            Ok(Ok(_)) => {}
            other => panic!("no deletion of the ephemeral: {other:?}"),
        }
    }
}

#[tokio::test]
async fn a_session_expired_by_another_process_fails_the_next_write_then_comes_back() {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = dir.path().join("nodepool.db");
    // A lease long enough that only the sweep below can end the session.
    let a = SqliteStore::open(
        &db,
        SqliteOptions::default().with_lease(Duration::from_secs(60)),
    )
    .await
    .expect("open");
    let mut states = a.session();
    let id = states.borrow().id().expect("connected");
    a.create("/nodepool/x/e", b"", CreateMode::Ephemeral)
        .await
        .expect("create");
    // What another process's sweep does to a lapsed session.
    {
        let mut conn = raw(&db);
        let tx = conn.transaction().expect("begin");
        tx.execute("DELETE FROM records WHERE owner = ?1", [id])
            .expect("delete ephemerals");
        tx.execute("DELETE FROM sessions WHERE id = ?1", [id])
            .expect("delete session");
        tx.commit().expect("commit");
    }
    let r = a.create("/nodepool/x/f", b"", CreateMode::Ephemeral).await;
    assert!(matches!(r, Err(StoreError::SessionLost)), "{r:?}");
    let new = tokio::time::timeout(
        DEADLINE,
        states.wait_for(|s| matches!(s, SessionState::Connected { id: n } if *n != id)),
    )
    .await
    .expect("a new session")
    .expect("watch")
    .id()
    .expect("connected");
    let p = a
        .create("/nodepool/x/f", b"", CreateMode::Ephemeral)
        .await
        .expect("create under the new session");
    let (_, stat) = a.get(&p).await.expect("get").expect("exists");
    assert_eq!(stat.ephemeral_owner, new);
}

#[tokio::test]
async fn the_change_feed_is_pruned_and_readers_still_see_the_latest_data() {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = dir.path().join("nodepool.db");
    let pruner = SqliteStore::open(
        &db,
        options().with_change_retention(Duration::from_millis(50)),
    )
    .await
    .expect("open");
    let reader = open(&db).await;
    for i in 0..20 {
        pruner
            .create(
                &format!("/nodepool/x/r{i:02}"),
                b"1",
                CreateMode::Persistent,
            )
            .await
            .expect("create");
    }
    assert_eq!(reader.scan("/nodepool/x").await.expect("scan").len(), 21);
    for i in 0..20 {
        pruner
            .set(&format!("/nodepool/x/r{i:02}"), b"2", None)
            .await
            .expect("set");
    }
    let conn = raw(&db);
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let rows: i64 = conn
            .query_row("SELECT count(*) FROM changes", [], |r| r.get(0))
            .expect("count");
        if rows == 0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the feed was never pruned ({rows} rows)"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Whether the reader caught up before the pruning or reloads after it,
    // it shows the latest data.
    let entries = reader.scan("/nodepool/x").await.expect("scan");
    assert_eq!(entries.len(), 21);
    assert!(entries[1..].iter().all(|e| &e.data[..] == b"2"));
}

#[tokio::test]
async fn cached_and_direct_scans_agree_under_writes_from_another_handle() {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = dir.path().join("nodepool.db");
    let writer = open(&db).await;
    let cached = open(&db).await;
    let direct = SqliteStore::open(&db, options().with_scan_cache(false))
        .await
        .expect("open");
    // Load the cache first so the rest goes through its catch-up.
    assert!(cached.scan("/nodepool").await.expect("scan").is_empty());
    let mut made = Vec::new();
    for i in 0..30 {
        let p = writer
            .create(
                "/nodepool/nodes/",
                format!("{i}").as_bytes(),
                CreateMode::PersistentSequential,
            )
            .await
            .expect("create");
        if i % 3 == 0 {
            writer.set(&p, b"changed", None).await.expect("set");
        }
        if i % 5 == 0 {
            writer
                .create(&format!("{p}/lock/c"), b"", CreateMode::Ephemeral)
                .await
                .expect("lock child");
        }
        if i % 7 == 0 && i % 5 != 0 {
            writer.delete(&p, None).await.expect("delete");
        } else {
            made.push(p);
        }
        // Every scan sees every write committed before it.
        let a = cached.scan("/nodepool/nodes").await.expect("scan");
        let b = direct.scan("/nodepool/nodes").await.expect("scan");
        assert_eq!(a, b, "after write {i}");
    }
    let all = cached.scan("/").await.expect("scan");
    assert_eq!(all[0].path, "/");
    let nodes = cached.scan("/nodepool/nodes").await.expect("scan");
    assert_eq!(nodes[0].stat.num_children as usize, made.len());
}

/// Polls `f` once, so that every write it starts is queued, and hands it back.
async fn queue_all<F: std::future::Future>(f: F) -> std::pin::Pin<Box<F>> {
    let mut f = Box::pin(f);
    std::future::poll_fn(|cx| {
        assert!(
            f.as_mut().poll(cx).is_pending(),
            "the writes wait for the lock"
        );
        std::task::Poll::Ready(())
    })
    .await;
    f
}

#[tokio::test]
async fn writes_queued_together_commit_together_each_with_its_own_result() {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = dir.path().join("nodepool.db");
    let store = open(&db).await;
    let watcher = open(&db).await;
    let mut events = watcher.subscribe();
    store
        .create("/b/x", b"0", CreateMode::Persistent)
        .await
        .expect("create");
    // Another process holds the write lock: every write below is queued
    // before the writer can start a transaction, so they form batches.
    let mut other = raw(&db);
    let lock = other
        .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
        .expect("take the write lock");
    let all = queue_all(async {
        tokio::join!(
            store.set("/b/x", b"1", Some(0)),
            store.set("/b/x", b"stale", Some(0)),
            store.create("/b/q-", b"", CreateMode::PersistentSequential),
            store.create("/b/y/z", b"", CreateMode::Persistent),
            store.create("/b/y/z", b"again", CreateMode::Persistent),
            store.delete("/b/missing", None),
            store.create("/b/q-", b"", CreateMode::PersistentSequential),
            store.create_dir_with_child("/b/d", "/b/d/c-", b"", CreateMode::EphemeralSequential),
            store.create_dir_with_child("/b/d", "/b/d/c-", b"", CreateMode::EphemeralSequential),
        )
    })
    .await;
    lock.commit().expect("release the write lock");
    let (set, stale, q1, z, z_again, missing, q2, d1, d2) = all.await;
    assert_eq!(set.expect("set").version, 1);
    assert!(
        matches!(stale, Err(StoreError::Conflict { .. })),
        "{stale:?}"
    );
    assert_eq!(q1.expect("sequential"), "/b/q-0000000001");
    assert_eq!(z.expect("create"), "/b/y/z");
    assert!(
        matches!(z_again, Err(StoreError::Conflict { .. })),
        "{z_again:?}"
    );
    assert!(
        matches!(missing, Err(StoreError::NotFound { .. })),
        "{missing:?}"
    );
    // The failed create of /b/y/z made no parent and took no number.
    assert_eq!(q2.expect("sequential"), "/b/q-0000000003");
    assert_eq!(d1.expect("dir and child"), Some("/b/d/c-0000000000".into()));
    assert_eq!(d2.expect("dir exists"), None);

    let (data, stat) = store.get("/b/x").await.expect("get").expect("exists");
    assert_eq!((&data[..], stat.version), (&b"1"[..], 1));
    assert_eq!(store.children("/b/y").await.expect("children"), ["z"]);
    let (data, _) = store.get("/b/y/z").await.expect("get").expect("exists");
    assert!(data.is_empty(), "the failed create wrote nothing");
    // Another handle sees the changes in the order they were made, with
    // dense change ids.
    let want = [
        StoreEvent::Created("/b".into()),
        StoreEvent::Created("/b/x".into()),
        StoreEvent::Changed("/b/x".into()),
        StoreEvent::Created("/b/q-0000000001".into()),
        StoreEvent::Created("/b/y".into()),
        StoreEvent::Created("/b/y/z".into()),
        StoreEvent::Created("/b/q-0000000003".into()),
        StoreEvent::Created("/b/d".into()),
        StoreEvent::Created("/b/d/c-0000000000".into()),
    ];
    for w in &want {
        let got = tokio::time::timeout(DEADLINE, events.recv())
            .await
            .expect("event in time")
            .expect("event");
        assert_eq!(&got, w);
    }
    let (n, hi): (i64, i64) = raw(&db)
        .query_row("SELECT count(*), max(zxid) FROM changes", [], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })
        .expect("feed");
    assert_eq!((n, hi), (want.len() as i64, want.len() as i64));
    // The ephemeral child belongs to the writer's session.
    store.close().await.expect("close");
    assert_eq!(watcher.get("/b/d/c-0000000000").await.expect("get"), None);
}
