//! Several real processes on one database file: the test process and
//! `nodepool-sqlite-test-helper` children (see `src/bin/test_helper.rs`),
//! which are killed with SIGKILL or stopped with SIGSTOP as a crash or a
//! hang would. Every wait is for a real condition with a deadline.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use nodepool_core::store::{CreateMode, LockWait, StateStore, Store, StoreError, StoreEvent};
use nodepool_sqlite::{SqliteOptions, SqliteStore};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};

const HELPER: &str = env!("CARGO_BIN_EXE_nodepool-sqlite-test-helper");
/// Generous: the machine running the tests may be busy.
const DEADLINE: Duration = Duration::from_secs(30);
/// The lease of the helper processes: short, so a killed one's session
/// lapses quickly.
const CHILD_LEASE_MS: u64 = 500;

/// A running helper process.
struct Helper {
    role: String,
    child: Child,
    out: Lines<BufReader<ChildStdout>>,
    stdin: Option<ChildStdin>,
    stderr: Arc<Mutex<String>>,
}

impl Helper {
    fn spawn(db: &Path, role: &str, args: &[&str]) -> Helper {
        let mut child = Command::new(HELPER)
            .arg(role)
            .arg(db)
            .args(args)
            .env("NODEPOOL_SQLITE_LEASE_MS", CHILD_LEASE_MS.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("start the helper process");
        let out = BufReader::new(child.stdout.take().expect("stdout")).lines();
        let stdin = child.stdin.take();
        let stderr = Arc::new(Mutex::new(String::new()));
        let mut err_pipe = child.stderr.take().expect("stderr");
        let sink = stderr.clone();
        tokio::spawn(async move {
            let mut s = String::new();
            let _ = err_pipe.read_to_string(&mut s).await;
            sink.lock().expect("stderr").push_str(&s);
        });
        Helper {
            role: role.to_owned(),
            child,
            out,
            stdin,
            stderr,
        }
    }

    fn pid(&self) -> Pid {
        Pid::from_raw(i32::try_from(self.child.id().expect("running")).expect("pid"))
    }

    fn signal(&self, sig: Signal) {
        kill(self.pid(), sig).expect("signal the helper");
    }

    /// The next line, or `None` at end of output.
    async fn next_line(&mut self) -> Option<String> {
        match tokio::time::timeout(DEADLINE, self.out.next_line()).await {
            Ok(r) => r.expect("read the helper's output"),
            Err(_) => panic!(
                "helper {} printed nothing for {DEADLINE:?}; stderr: {}",
                self.role,
                self.stderr.lock().expect("stderr")
            ),
        }
    }

    /// The next line, which must start with `prefix`; returns the rest.
    async fn expect(&mut self, prefix: &str) -> String {
        match self.next_line().await {
            Some(l) if l.starts_with(prefix) => l[prefix.len()..].trim().to_owned(),
            other => {
                // Give stderr a moment to arrive through its pipe.
                let _ = tokio::time::timeout(Duration::from_secs(2), self.child.wait()).await;
                panic!(
                    "helper {}: expected {prefix:?}, got {other:?}; stderr: {}",
                    self.role,
                    self.stderr.lock().expect("stderr")
                )
            }
        }
    }

    /// Closes stdin (the signal to finish) and waits for a clean exit.
    async fn finish(mut self) {
        drop(self.stdin.take());
        let status = tokio::time::timeout(DEADLINE, self.child.wait())
            .await
            .expect("the helper exits")
            .expect("wait");
        assert!(
            status.success(),
            "helper {} failed: {status}; stderr: {}",
            self.role,
            self.stderr.lock().expect("stderr")
        );
    }

    /// SIGKILL, and wait until the process is gone.
    async fn kill9(&mut self) {
        self.signal(Signal::SIGKILL);
        tokio::time::timeout(DEADLINE, self.child.wait())
            .await
            .expect("the helper dies")
            .expect("wait");
    }

    /// SIGKILL a writer, then the `path value` of the `COMMITTED` lines
    /// still in its pipe: what it printed before dying was committed too.
    async fn kill9_and_drain_committed(&mut self) -> Vec<String> {
        self.kill9().await;
        let mut committed = Vec::new();
        while let Some(line) = self.next_line().await {
            committed.push(
                line.strip_prefix("COMMITTED ")
                    .expect("only COMMITTED lines")
                    .to_owned(),
            );
        }
        committed
    }
}

fn db_in(dir: &tempfile::TempDir) -> PathBuf {
    dir.path().join("nodepool.db")
}

/// After writers were killed: opens the file with plain SQLite (for the
/// caller's further reads) once it passes SQLite's own integrity check.
fn integrity_checked(db: &Path) -> rusqlite::Connection {
    let conn = rusqlite::Connection::open(db).expect("open");
    let check: String = conn
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .expect("integrity check");
    assert_eq!(check, "ok");
    conn
}

/// Every `path value` a killed writer reported committed reads back, with
/// its value, through a new client.
async fn assert_committed(db: &Path, committed: &[String]) {
    let me = open(db).await;
    for c in committed {
        let (path, value) = c.split_once(' ').expect("path and value");
        let (data, _) = me
            .get(path)
            .await
            .expect("get")
            .unwrap_or_else(|| panic!("{path} was reported committed but is missing"));
        assert_eq!(std::str::from_utf8(&data).expect("utf-8"), value, "{path}");
    }
}

/// The test process's own client: a long lease, so that it never lapses
/// by accident on a busy machine.
async fn open(db: &Path) -> Arc<dyn StateStore> {
    let options = SqliteOptions::default().with_lease(Duration::from_secs(10));
    Arc::new(SqliteStore::open(db, options).await.expect("open"))
}

/// Waits for an event about `path` that `want` accepts.
async fn wait_event(
    events: &mut tokio::sync::broadcast::Receiver<StoreEvent>,
    want: impl Fn(&StoreEvent) -> bool,
) -> StoreEvent {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        match tokio::time::timeout_at(deadline, events.recv()).await {
            Ok(Ok(e)) if want(&e) => return e,
            Ok(Ok(_)) => {}
            Ok(Err(e)) => panic!("watch failed: {e}"),
            Err(_) => panic!("no such event within {DEADLINE:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lock_excludes_the_other_process_both_ways() {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = db_in(&dir);
    let me = Store::new(open(&db).await);
    let lock = "/nodepool/nodes/0000000001/lock";

    // We hold it: the other process cannot take it.
    let guard = me.lock(lock, LockWait::NonBlocking).await.expect("lock");
    let mut other = Helper::spawn(&db, "try-lock", &[lock]);
    other.expect("LOCKED").await;
    other.finish().await;

    // It holds it: we cannot take it.
    guard.release().await.expect("release");
    let mut holder = Helper::spawn(&db, "hold", &[lock, "/nodepool/x/holder"]);
    holder.expect("READY").await;
    let r = me.lock(lock, LockWait::NonBlocking).await;
    assert!(matches!(r, Err(StoreError::Locked { .. })), "{r:?}");
    assert!(
        me.backend()
            .get("/nodepool/x/holder")
            .await
            .expect("get")
            .is_some()
    );

    // It lets go cleanly: ours at once, and its ephemeral is gone.
    holder.finish().await;
    let guard = me
        .lock(lock, LockWait::NonBlocking)
        .await
        .expect("lock after release");
    assert_eq!(
        me.backend().get("/nodepool/x/holder").await.expect("get"),
        None
    );
    guard.release().await.expect("release");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn processes_counting_under_the_lock_lose_no_update() {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = db_in(&dir);
    let me = open(&db).await;
    let counter = "/nodepool/x/counter";
    me.create(counter, b"0", CreateMode::Persistent)
        .await
        .expect("create the counter");
    let rounds = 15;
    let lock = "/nodepool/x/counter-lock";
    let mut a = Helper::spawn(&db, "count", &[lock, counter, &rounds.to_string()]);
    let mut b = Helper::spawn(&db, "count", &[lock, counter, &rounds.to_string()]);
    a.expect("DONE").await;
    b.expect("DONE").await;
    a.finish().await;
    b.finish().await;
    let (data, stat) = me.get(counter).await.expect("get").expect("exists");
    assert_eq!(
        std::str::from_utf8(&data).expect("utf-8"),
        (2 * rounds).to_string(),
        "every read-modify-write ran alone"
    );
    assert_eq!(stat.version, 2 * rounds);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_holder_loses_its_lock_and_ephemerals_after_its_lease() {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = db_in(&dir);
    let me = Store::new(open(&db).await);
    let lock = "/nodepool/requests-lock/100-0000000007";
    let eph = "/nodepool/components/launcher/host0000000001";
    let mut holder = Helper::spawn(&db, "hold", &[lock, eph]);
    let session: i64 = holder.expect("READY").await.parse().expect("session id");
    let (_, stat) = me.backend().get(eph).await.expect("get").expect("exists");
    assert_eq!(stat.ephemeral_owner, session);
    let r = me.lock(lock, LockWait::NonBlocking).await;
    assert!(matches!(r, Err(StoreError::Locked { .. })), "{r:?}");

    let mut events = me.backend().subscribe();
    holder.kill9().await;
    // Nobody releases anything: the lock frees up when the dead process's
    // lease lapses and a sweep (ours, here) expires its session.
    let guard = me
        .lock(lock, LockWait::Timeout(DEADLINE))
        .await
        .expect("the lock frees up after the lease");
    assert_eq!(me.backend().get(eph).await.expect("get"), None);
    wait_event(&mut events, |e| *e == StoreEvent::Deleted(eph.into())).await;
    let rows: i64 = rusqlite::Connection::open(&db)
        .expect("open")
        .query_row(
            "SELECT count(*) FROM sessions WHERE id = ?1",
            [session],
            |r| r.get(0),
        )
        .expect("query");
    assert_eq!(rows, 0, "the dead session's row is gone");
    guard.release().await.expect("release");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_writes_loses_no_committed_record() {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = db_in(&dir);
    // Two writers at once, killed at different points of their streams.
    let mut a = Helper::spawn(&db, "write-stream", &["/nodepool/x/a"]);
    let mut b = Helper::spawn(&db, "write-stream", &["/nodepool/x/b"]);
    let mut committed = Vec::new();
    for (writer, kill_after) in [(&mut a, 40), (&mut b, 90)] {
        let mut seen = 0;
        while seen < kill_after {
            let rest = writer.expect("COMMITTED").await;
            committed.push(rest);
            seen += 1;
        }
        committed.extend(writer.kill9_and_drain_committed().await);
    }

    drop(integrity_checked(&db));
    assert_committed(&db, &committed).await;
    assert!(committed.len() >= 130, "{} writes", committed.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_group_commits_loses_no_acknowledged_write() {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = db_in(&dir);
    // 32 writers in one process: their writes queue while a commit is in
    // progress and go into the next transaction together.
    let mut w = Helper::spawn(&db, "write-batches", &["/nodepool/y", "32"]);
    let mut acknowledged = Vec::new();
    while acknowledged.len() < 500 {
        acknowledged.push(w.expect("COMMITTED").await);
    }
    acknowledged.extend(w.kill9_and_drain_committed().await);

    let conn = integrity_checked(&db);
    // Change ids stay dense across the batches (a gap would read as
    // pruned changes to every watcher).
    let (n, lo, hi): (i64, i64, i64) = conn
        .query_row(
            "SELECT count(*), min(zxid), max(zxid) FROM changes",
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .expect("feed");
    assert_eq!(n, hi - lo + 1, "change ids {lo}..{hi} are dense");
    drop(conn);
    assert_committed(&db, &acknowledged).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_process_notices_its_lease_lapsed_and_starts_a_new_session() {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = db_in(&dir);
    let me = open(&db).await;
    let eph = "/nodepool/components/pool/sleepy0000000001";
    let mut sleepy = Helper::spawn(&db, "session-watch", &[eph]);
    let first = sleepy.expect("SESSION connected").await;
    let mut events = me.subscribe();
    assert!(me.get(eph).await.expect("get").is_some());

    // Stopped (as by SIGSTOP, or a hung host) for longer than its lease:
    // another process (us) expires its session.
    sleepy.signal(Signal::SIGSTOP);
    wait_event(&mut events, |e| *e == StoreEvent::Deleted(eph.into())).await;
    sleepy.signal(Signal::SIGCONT);

    // On waking it must see that its lease lapsed, say so, and start anew.
    sleepy.expect("SESSION expired").await;
    let second = sleepy.expect("SESSION connected").await;
    assert_ne!(first, second, "a new session id");
    let path = sleepy.expect("EPHEMERAL").await;
    assert_eq!(path, eph);
    let (_, stat) = me.get(eph).await.expect("get").expect("recreated");
    assert_eq!(stat.ephemeral_owner.to_string(), second);
    sleepy.finish().await;
    assert_eq!(me.get(eph).await.expect("get"), None, "closed cleanly");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watches_see_another_process_write() {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = db_in(&dir);
    let me = open(&db).await;
    let mut events = me.subscribe();
    let path = "/nodepool/x/watched";
    let mut writer = Helper::spawn(&db, "write-events", &[path]);
    writer.expect("DONE").await;
    writer.finish().await;
    let mut seen = Vec::new();
    while seen.last() != Some(&StoreEvent::Deleted(path.into())) {
        seen.push(wait_event(&mut events, |e| e.path() == path).await);
    }
    assert_eq!(
        seen,
        [
            StoreEvent::Created(path.into()),
            StoreEvent::Changed(path.into()),
            StoreEvent::Deleted(path.into()),
        ]
    );
}
