//! A separate process for the multi-process tests (`tests/multiprocess.rs`):
//! it opens the same database file as the test and plays one role, telling
//! the test what it did on stdout, one line per fact, flushed at once (a
//! line is printed only after the operation it reports has returned).
//!
//! Built only with the `test-helper` feature, which this crate's tests
//! enable.
//!
//! ```text
//! nodepool-sqlite-test-helper <role> <database> [arguments]
//!   hold <lock-dir> <ephemeral>        lock, create an ephemeral, print READY <session>,
//!                                      then hold until stdin closes
//!   try-lock <lock-dir>                print ACQUIRED or LOCKED (non-blocking attempt)
//!   count <lock-dir> <counter> <n>     n times: lock, read the counter, write it + 1, unlock
//!   write-stream <prefix>              create sequential records forever, printing
//!                                      COMMITTED <path> after each
//!   write-batches <prefix> <n>        the same from n concurrent writers (their writes
//!                                      share transactions: group commit)
//!   session-watch <ephemeral>          print every session state change; recreate the
//!                                      ephemeral after each new session; until stdin closes
//!   write-events <path>                create, change and delete a record, print DONE
//! ```
//!
//! `NODEPOOL_SQLITE_LEASE_MS` sets the session lease (default 500 ms).

use std::error::Error;
use std::io::{Read, Write};
use std::sync::Arc;
use std::time::Duration;

use nodepool_model::store::{CreateMode, LockWait, SessionState, StateStore, Store, StoreError};
use nodepool_sqlite::{SqliteOptions, SqliteStore};

type Result<T> = std::result::Result<T, Box<dyn Error>>;

fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    // The test reads these lines; if it went away there is nobody to tell.
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

fn arg(args: &[String], i: usize, what: &str) -> Result<String> {
    args.get(i)
        .cloned()
        .ok_or_else(|| format!("missing argument {i}: {what}").into())
}

/// Waits until stdin is closed (the test dropped its end, or died).
async fn until_stdin_closes() {
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    // A detached thread, so a process that ends otherwise does not wait for it.
    std::thread::spawn(move || {
        let mut buf = [0u8; 64];
        while matches!(std::io::stdin().read(&mut buf), Ok(n) if n > 0) {}
        let _ = tx.send(());
    });
    let _ = rx.await;
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let role = arg(&args, 0, "role")?;
    let db = arg(&args, 1, "database")?;
    let lease_ms: u64 = match std::env::var("NODEPOOL_SQLITE_LEASE_MS") {
        Ok(v) => v.parse()?,
        Err(_) => 500,
    };
    let options = SqliteOptions::default().with_lease(Duration::from_millis(lease_ms));
    let sqlite = SqliteStore::open(&db, options).await?;
    let backend: Arc<dyn StateStore> = Arc::new(sqlite.clone());
    let store = Store::new(backend.clone());
    match role.as_str() {
        "hold" => {
            let dir = arg(&args, 2, "lock dir")?;
            let eph = arg(&args, 3, "ephemeral path")?;
            let guard = store
                .lock(&dir, LockWait::Timeout(Duration::from_secs(30)))
                .await?;
            backend.create(&eph, b"held", CreateMode::Ephemeral).await?;
            let id = backend.session().borrow().id().unwrap_or(0);
            say(&format!("READY {id}"));
            until_stdin_closes().await;
            guard.release().await?;
            backend.close().await?;
        }
        "try-lock" => {
            let dir = arg(&args, 2, "lock dir")?;
            match store.lock(&dir, LockWait::NonBlocking).await {
                Ok(guard) => {
                    say("ACQUIRED");
                    guard.release().await?;
                }
                Err(StoreError::Locked { .. }) => say("LOCKED"),
                Err(e) => return Err(e.into()),
            }
            backend.close().await?;
        }
        "count" => {
            let dir = arg(&args, 2, "lock dir")?;
            let counter = arg(&args, 3, "counter path")?;
            let rounds: u32 = arg(&args, 4, "rounds")?.parse()?;
            for _ in 0..rounds {
                let guard = store
                    .lock(&dir, LockWait::Timeout(Duration::from_secs(30)))
                    .await?;
                let (data, _) = backend
                    .get(&counter)
                    .await?
                    .ok_or_else(|| format!("{counter} is missing"))?;
                let n: u64 = std::str::from_utf8(&data)?.parse()?;
                // Widen the read-modify-write window so that without
                // mutual exclusion the other process's update would be lost.
                tokio::time::sleep(Duration::from_millis(2)).await;
                backend
                    .set(&counter, (n + 1).to_string().as_bytes(), None)
                    .await?;
                guard.release().await?;
            }
            say("DONE");
            backend.close().await?;
        }
        "write-stream" => {
            let prefix = arg(&args, 2, "prefix")?;
            let mut i: u64 = 0;
            loop {
                let path = backend
                    .create(
                        &format!("{prefix}/"),
                        i.to_string().as_bytes(),
                        CreateMode::PersistentSequential,
                    )
                    .await?;
                say(&format!("COMMITTED {path} {i}"));
                i += 1;
            }
        }
        "write-batches" => {
            let prefix = arg(&args, 2, "prefix")?;
            let writers: usize = arg(&args, 3, "writers")?.parse()?;
            let mut tasks = tokio::task::JoinSet::new();
            for w in 0..writers {
                let backend = backend.clone();
                let prefix = format!("{prefix}/{w}");
                tasks.spawn(async move {
                    let mut i: u64 = 0;
                    loop {
                        let path = backend
                            .create(
                                &format!("{prefix}-"),
                                i.to_string().as_bytes(),
                                CreateMode::PersistentSequential,
                            )
                            .await?;
                        say(&format!("COMMITTED {path} {i}"));
                        i += 1;
                    }
                    #[allow(unreachable_code)]
                    Ok::<(), StoreError>(())
                });
            }
            while let Some(done) = tasks.join_next().await {
                done??;
            }
        }
        "session-watch" => {
            let eph = arg(&args, 2, "ephemeral path")?;
            let mut states = backend.session();
            let first = *states.borrow_and_update();
            backend.create(&eph, b"", CreateMode::Ephemeral).await?;
            say(&format!("SESSION {}", describe(first)));
            let watch = async {
                while states.changed().await.is_ok() {
                    let s = *states.borrow_and_update();
                    say(&format!("SESSION {}", describe(s)));
                    if let SessionState::Connected { .. } = s {
                        match backend.create(&eph, b"", CreateMode::Ephemeral).await {
                            Ok(p) => say(&format!("EPHEMERAL {p}")),
                            Err(e) => say(&format!("EPHEMERAL-FAILED {e}")),
                        }
                    }
                }
            };
            tokio::select! {
                () = watch => {}
                () = until_stdin_closes() => {}
            }
            backend.close().await?;
        }
        "write-events" => {
            let path = arg(&args, 2, "path")?;
            backend.create(&path, b"1", CreateMode::Persistent).await?;
            backend.set(&path, b"2", None).await?;
            backend.delete(&path, None).await?;
            say("DONE");
            backend.close().await?;
        }
        other => return Err(format!("unknown role {other:?}").into()),
    }
    Ok(())
}

fn describe(s: SessionState) -> String {
    match s {
        SessionState::Connected { id } => format!("connected {id}"),
        SessionState::Suspended { .. } => "suspended".into(),
        SessionState::Expired => "expired".into(),
        SessionState::Closed => "closed".into(),
    }
}
