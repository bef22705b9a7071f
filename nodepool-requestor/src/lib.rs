//! The Zuul side of the node-request protocol, for CI systems that want
//! nodes from Nodepool: submit a request, wait for it, lock the nodes,
//! use them, give them back (or hold them). It is exactly what Zuul does
//! (reference §2.6), so a launcher (ours or Python Nodepool's) cannot tell
//! the difference.
//!
//! Depends on the contract (`nodepool-model`) alone: no planner, no
//! launcher. It works on any [`Store`](nodepool_model::store::Store):
//! ZooKeeper (`nodepool-zookeeper`), SQLite (`nodepool-sqlite`) or
//! [`MemoryStore`](nodepool_model::store::MemoryStore), and runs on the
//! embedder's tokio runtime.
//!
//! # Where to start reading
//!
//! [`Requestor`] is the whole API. The life of a request:
//!
//! 1. [`Requestor::submit`] creates `/nodepool/requests/<prio>-<seq>` with
//!    Zuul's fields (requestor id, `requestor_data`, `event_id`,
//!    `created_time`, tenant, provider, `relative_priority`);
//! 2. [`Requestor::wait`] follows it (through the store's change stream,
//!    with a deadline) until it is `fulfilled` or `failed`;
//! 3. [`Requestor::accept`] locks every allocated node (30 s each, like
//!    Zuul's executor), re-checks `allocated_to` under the lock and deletes
//!    the request (always, even when locking failed, as Zuul does);
//! 4. [`Requestor::use_nodes`] marks them `in-use` with Zuul's `user_data`;
//! 5. [`Requestor::return_nodes`] marks `in-use` nodes `used` and unlocks
//!    (nodes that were never used are only unlocked), or
//!    [`Requestor::hold`] keeps them for a person to look at.
//!
//! [`Requestor::cancel`] withdraws a request and
//! [`Requestor::revise_priority`] changes its `relative_priority` the way
//! Zuul does: only if the request lock is free, else silently not.
//!
//! Modules: `request` (submitting and following requests), `nodes`
//! (accepting, using, returning, holding), `error` ([`RequestorError`]);
//! everything is re-exported here. The feature `conformance` adds the
//! `conformance` module: the test bodies every store runs this crate
//! against.
//!
//! # Example
//!
//! Submit → wait → use → return, on whatever store the launchers share
//! (see the `embedded_ci` example program for a complete CI with the
//! launcher in-process):
//!
//! ```no_run
//! use std::sync::Arc;
//! use std::time::Duration;
//!
//! use nodepool_model::store::{MemoryStore, Store};
//! use nodepool_requestor::{NewRequest, Outcome, Requestor};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! // In real use: a ZooKeeperStore or SqliteStore shared with the launchers.
//! let store = Store::new(Arc::new(MemoryStore::new()));
//! // A stable id of this CI system, kept across restarts.
//! let ci = Requestor::new(store, "5f0c0ffee0000000000000000000beef");
//!
//! let id = ci.submit(&NewRequest::new(vec!["ubuntu-jammy".into()])).await?;
//! let request = match ci.wait(&id, Duration::from_secs(600)).await? {
//!     Outcome::Fulfilled(request) => request,
//!     Outcome::Failed(_) => {
//!         ci.cancel(&id).await?;
//!         return Err(format!("request {id}: no launcher can serve it").into());
//!     }
//! };
//! let mut nodes = ci.accept(&id, &request.value).await?;
//! ci.use_nodes(&mut nodes, "example.org/project").await?;
//! for n in &nodes.nodes {
//!     println!("running the job on node {} at {:?}", n.id, n.node.interface_ip);
//! }
//! // The nodes become `used`; the launcher deletes them.
//! ci.return_nodes(nodes).await?;
//! # Ok(())
//! # }
//! ```

mod error;
mod nodes;
mod request;

#[cfg(feature = "conformance")]
pub mod conformance;

pub use error::RequestorError;
pub use nodes::{HeldNode, Hold, NodeSet};
pub use request::{NODE_LOCK_TIMEOUT, NewRequest, Outcome, Precedence, Requestor};
