//! `StateStore` on an embedded SQLite file: the single-machine default.
//!
//! The launcher, the builder and the `nodepool` CLI of one machine open the
//! same database file; together they see one tree of versioned records with
//! ZooKeeper's semantics (sequential names, compare-and-set, ephemeral
//! records, watches), so `nodepool_model::store` (layout, kazoo lock recipe,
//! typed records) works on it unchanged and the conformance suite passes as
//! it does for ZooKeeper and memory. No server to install.
//!
//! Start with [`SqliteStore`] (`store.rs`), then:
//!
//! # Layout
//!
//! * `store.rs`: the handle; writes go to its writer thread, reads to its
//!   reader thread.
//! * `queue.rs`: those two threads; writes queued together share one
//!   transaction and one commit (group commit), each in its own savepoint.
//! * `db.rs`: the schema and every SQL statement; read its header for the
//!   tables and why they look as they do.
//! * `session.rs`: sessions as leased rows; how a dead process's session
//!   expires and how a process notices that its own lease lapsed.
//! * `worker.rs`: each handle's background thread: lease renewal, sweeping
//!   of expired sessions, the change feed that delivers watch events.
//! * `cache.rs`: the in-process copy of the tree that serves `scan`.
//! * `options.rs`: [`SqliteOptions`] (lease, poll interval, durability...).
//!
//! # Guarantees
//!
//! * Durability: WAL mode with `synchronous = FULL` by default: a write
//!   whose call returned survives the death of any process (and, with
//!   `FULL`, power loss). See [`Synchronous`].
//! * Sessions: a handle's session lives while its thread renews a lease
//!   (10 s by default). When a process dies, any other process expires its
//!   session once the lease lapses, deleting its ephemeral records and so
//!   releasing its locks. A process whose own lease lapsed reports
//!   `SessionState::Expired` and starts a new session.
//! * Watches: every process polls the change feed (default every 20 ms), so
//!   `subscribe` sees the changes of every process, in commit order. The
//!   feed keeps 5 minutes (and at most 100,000 entries) of history.
//! * Scans: served from an in-process copy of the tree that the same feed
//!   keeps fresh; a scan first catches up with every commit made before it.
//!
//! Leases are measured on the wall clock, which every process of the
//! machine shares; a forward clock step larger than the lease expires
//! sessions early (they are then re-established, as after a ZooKeeper
//! session expiry). The file must be on a local filesystem (WAL needs
//! shared memory between the processes).

mod cache;
mod db;
mod options;
mod queue;
mod session;
mod store;
mod worker;

pub use options::{SqliteOptions, Synchronous};
pub use store::SqliteStore;

/// The database schema version this crate reads and writes.
pub const SCHEMA_VERSION: i64 = db::SCHEMA_VERSION;
