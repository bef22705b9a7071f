//! The harness the shared suites (the `StateStore` conformance suite and
//! the requestor's) run on: every client is its own handle (own
//! connections, own session, own worker thread) on one real database file,
//! as separate processes would be.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use nodepool_model::conformance::store::Harness;
use nodepool_model::store::{SessionState, StateStore};
use nodepool_sqlite::{SqliteOptions, SqliteStore};

/// One fresh database file in its own temporary directory.
pub struct Sqlite {
    _dir: tempfile::TempDir,
    path: PathBuf,
}

impl Sqlite {
    /// A new, empty store.
    pub fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("nodepool.db");
        Sqlite { _dir: dir, path }
    }
}

#[async_trait]
impl Harness for Sqlite {
    async fn client(&self) -> Arc<dyn StateStore> {
        // A lease long enough that a loaded test machine never lets it
        // lapse by accident; `expire` below makes it lapse on purpose.
        let options = SqliteOptions::default().with_lease(Duration::from_secs(3));
        Arc::new(
            SqliteStore::open(&self.path, options)
                .await
                .expect("open the store"),
        )
    }

    /// The lease runs out as if the process had stopped renewing it: its
    /// expiry is moved into the past in the file. The client's own worker
    /// (at its next renewal) or any other client's sweep then expires it
    /// for real; we wait until the client reports that its session is gone.
    async fn expire(&self, client: &Arc<dyn StateStore>) {
        let mut states = client.session();
        let id = states.borrow().id().expect("a connected client");
        let conn = rusqlite::Connection::open(&self.path).expect("open");
        conn.busy_timeout(Duration::from_secs(5))
            .expect("busy timeout");
        let n = conn
            .execute("UPDATE sessions SET expires_ms = 0 WHERE id = ?1", [id])
            .expect("lapse the lease");
        assert_eq!(n, 1, "session {id} has a row");
        tokio::time::timeout(
            Duration::from_secs(20),
            states.wait_for(|s| *s != SessionState::Connected { id }),
        )
        .await
        .expect("the client notices its lease lapsed")
        .expect("session watch");
    }
}
