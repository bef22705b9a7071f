//! The handle's two operation threads: one runs every write, one every
//! single-record read, each on its own connection.
//!
//! Why threads with queues rather than a blocking task per operation: with
//! the launcher's 64 requests in flight, a task per operation had dozens of
//! blocking-pool threads queueing on the connection's mutex, and the
//! hand-offs and lock contention cost as much CPU as SQLite itself.
//!
//! Group commit: the writer takes every write queued at the moment it
//! starts a transaction (up to [`MAX_BATCH`]), so writes that arrive while
//! a commit is in progress go together into the next transaction and share
//! its commit and fsync. Each write runs in its own savepoint: one that
//! fails (a version check, an existing path) is undone alone and reports
//! its own error, the others are committed. A caller gets its result only
//! after the transaction committed (so durability is that of a single
//! write, at the configured `synchronous` level); if the commit fails,
//! every write of the batch reports that failure and none was applied.
//! Change ids, sequential names and watch events follow the order in which
//! the writes were queued.
//!
//! The reader likewise answers every read queued when it starts from one
//! read transaction: its snapshot is taken after each of them was asked,
//! so each still sees every write committed before it was made.

use std::sync::Arc;
use std::sync::mpsc::{Receiver, TryRecvError};

use nodepool_model::store::StoreError;
use rusqlite::Connection;
use tokio::sync::oneshot;

use crate::db::{DbError, Txn};
use crate::store::Shared;

/// At most this many operations share one transaction, so that another
/// process waiting for the write lock waits for a bounded batch.
pub(crate) const MAX_BATCH: usize = 256;

/// One queued write.
pub(crate) trait WriteJob: Send {
    /// Runs the write in the batch's transaction, inside its own savepoint.
    /// An error means the transaction is broken and the batch must fail.
    fn run(&mut self, t: &mut Txn<'_>, session: i64, label: &str) -> Result<(), rusqlite::Error>;

    /// Hands the caller its result: its own once the batch committed
    /// (`Ok`), the batch's failure otherwise.
    fn finish(self: Box<Self>, committed: Result<(), StoreError>);
}

/// A typed write and where its result goes.
pub(crate) struct Write<T, F> {
    op: Option<F>,
    result: Option<Result<T, StoreError>>,
    reply: oneshot::Sender<Result<T, StoreError>>,
}

impl<T, F> Write<T, F> {
    /// A write to queue, and the receiver of its result.
    pub(crate) fn new(op: F) -> (Self, oneshot::Receiver<Result<T, StoreError>>) {
        let (reply, rx) = oneshot::channel();
        (
            Write {
                op: Some(op),
                result: None,
                reply,
            },
            rx,
        )
    }
}

impl<T, F> WriteJob for Write<T, F>
where
    T: Send,
    F: FnOnce(&mut Txn<'_>, i64) -> Result<T, DbError> + Send,
{
    fn run(&mut self, t: &mut Txn<'_>, session: i64, label: &str) -> Result<(), rusqlite::Error> {
        if let Some(op) = self.op.take() {
            let r = t.attempt(|t| op(t, session))?;
            self.result = Some(r.map_err(|e| e.into_store(label)));
        }
        Ok(())
    }

    fn finish(self: Box<Self>, committed: Result<(), StoreError>) {
        let r = match (committed, self.result) {
            (Err(e), _) => Err(e),
            (Ok(()), Some(r)) => r,
            (Ok(()), None) => Err(StoreError::Other(
                "sqlite: a write was not run in its batch".into(),
            )),
        };
        // The caller may have given up waiting: nothing to tell then.
        let _ = self.reply.send(r);
    }
}

/// One queued read: it answers its caller from the batch's snapshot, or
/// with the error that kept the batch from starting.
pub(crate) trait ReadJob: Send {
    /// Runs the read on the batch's snapshot and answers the caller.
    fn run(self: Box<Self>, conn: Result<&Connection, StoreError>, label: &str);
}

/// A typed read and where its result goes.
pub(crate) struct Read<T, F> {
    op: F,
    reply: oneshot::Sender<Result<T, StoreError>>,
}

impl<T, F> Read<T, F> {
    /// A read to queue, and the receiver of its result.
    pub(crate) fn new(op: F) -> (Self, oneshot::Receiver<Result<T, StoreError>>) {
        let (reply, rx) = oneshot::channel();
        (Read { op, reply }, rx)
    }
}

impl<T, F> ReadJob for Read<T, F>
where
    T: Send,
    F: FnOnce(&Connection) -> Result<T, DbError> + Send,
{
    fn run(self: Box<Self>, conn: Result<&Connection, StoreError>, label: &str) {
        let Read { op, reply } = *self;
        let r = conn.and_then(|c| op(c).map_err(|e| e.into_store(label)));
        let _ = reply.send(r);
    }
}

/// Takes the next batch: waits for one job, then takes whatever else is
/// queued. `None` once every sender is gone (the handle was dropped).
fn next_batch<J>(jobs: &Receiver<J>) -> Option<Vec<J>> {
    let first = jobs.recv().ok()?;
    let mut batch = vec![first];
    while batch.len() < MAX_BATCH {
        match jobs.try_recv() {
            Ok(j) => batch.push(j),
            Err(TryRecvError::Empty | TryRecvError::Disconnected) => break,
        }
    }
    Some(batch)
}

/// Starts the writer thread; it ends when the handle's sender is dropped.
pub(crate) fn spawn_writer(
    shared: Arc<Shared>,
    jobs: Receiver<Box<dyn WriteJob>>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("nodepool-sqlite-w".into())
        .spawn(move || {
            while let Some(batch) = next_batch(&jobs) {
                shared.write_batch(batch);
            }
        })
}

/// Starts the reader thread; it ends when the handle's sender is dropped.
pub(crate) fn spawn_reader(
    shared: Arc<Shared>,
    jobs: Receiver<Box<dyn ReadJob>>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("nodepool-sqlite-r".into())
        .spawn(move || {
            while let Some(batch) = next_batch(&jobs) {
                shared.read_batch(batch);
            }
        })
}
