//! `StateStore` on ZooKeeper, wire-compatible with Python Nodepool and Zuul.
//!
//! [`ZooKeeperStore`] implements [`nodepool_model::store::StateStore`] with
//! the `zookeeper-client` crate: the same znodes, sequence numbers,
//! ephemerals and versions that kazoo produces, so the core's typed
//! [`Store`](nodepool_model::store::Store) and its kazoo lock recipe work on
//! it unchanged, side by side with Python launchers, the Python `nodepool`
//! CLI and Zuul.
//!
//! Start reading at [`ZooKeeperStore::connect`] and [`ZooKeeperOptions`].
//!
//! # Layout
//!
//! - `options`: servers, chroot, TLS files, session timeout (10 s like
//!   Nodepool, not the crate's 6 s), and parsing them from `nodepool.yaml`.
//! - `store`: the `StateStore` operations and the session supervisor:
//!   session states (`Disconnected` = suspended, `Expired` = a new session
//!   is opened and published), the watch-event pipeline and the
//!   read-your-writes barrier behind `scan()`.
//! - `cache`: the in-memory mirror of `/nodepool` that `scan()` reads,
//!   filled by one full load and one persistent recursive watch.
//! - `error`: the client's errors mapped to `StoreError` meanings.
//!
//! # The mirror, in short
//!
//! One persistent recursive watch on `/nodepool` is set *before* the
//! subtree is loaded, so no change falls between the two. Each watch event
//! triggers a read sent at once and applied in event order, so a slow read
//! never overwrites a newer one or resurrects a deleted znode. After a
//! reconnection (persistent watches lose events meanwhile, ZOOKEEPER-4698)
//! or a new session the subtree is reloaded and the difference is
//! published as change events. Two kinds of events need no read: request
//! and node locks (directories and contenders), whose existence is all
//! anyone uses, as Python Nodepool's and Zuul's caches do; and a change
//! this client just made with `set`, `create` or `multi`, whose data and
//! stat the write's answer carries (`OwnWrites` in `store` says why that
//! equals a read). `scan()` first does a `sync` round trip and
//! waits until every event received before its answer is applied, so it
//! sees every write that completed before it was called, ours or another
//! client's.

mod cache;
mod error;
mod options;
mod store;

pub use options::{DEFAULT_SESSION_TIMEOUT, ServerAddress, TlsFiles, ZooKeeperOptions};
pub use store::ZooKeeperStore;
