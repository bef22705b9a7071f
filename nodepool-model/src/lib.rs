//! The contract of a Rust Nodepool: what every part agrees on, and
//! nothing that runs.
//!
//! An embedder that only wants to submit node requests, implement a cloud
//! ([`Provider`](provider::Provider)), a state store
//! ([`StateStore`](store::StateStore)), an image builder or a node
//! consumer, or read `nodepool.yaml`, depends on this crate alone: no
//! planner, no runtime loops, no SSH, no process control. Async code runs
//! on the embedder's tokio runtime; this crate uses only tokio's channels
//! and timers.
//!
//! # Layout
//!
//! - [`model`]: nodes, requests, builds, uploads and components exactly as
//!   they are stored on the wire (Python Nodepool's and Zuul's JSON).
//!   Start here.
//! - [`config`]: loading and validating `nodepool.yaml`; every error comes
//!   with its path.
//! - [`store`]: the [`StateStore`](store::StateStore) trait (ZooKeeper's
//!   data model), the record layout ([`store::paths`]), kazoo's lock recipe
//!   ([`store::lock`]), the typed [`Store`](store::Store) facade and
//!   [`MemoryStore`](store::MemoryStore), a complete in-memory store.
//! - [`provider`]: the [`Provider`](provider::Provider) trait (clouds) and
//!   [`cloud`]: the rules every cloud backend shares (flavor choice,
//!   Nova's metadata limits, quota messages).
//! - [`image_builder`]: the [`ImageBuilder`](image_builder::ImageBuilder)
//!   trait (diskimage-builder).
//! - [`consumer`]: the [`NodeConsumer`](consumer::NodeConsumer) trait
//!   (Jenkins and other systems that take ready nodes).
//! - `conformance` (feature `conformance`): the suites every
//!   `StateStore` and `Provider` implementation runs against itself.
//!
//! # Example
//!
//! Read a configuration and keep a node in an in-memory store:
//!
//! ```
//! use std::sync::Arc;
//! use nodepool_model::config::Config;
//! use nodepool_model::model::{Node, NodeState};
//! use nodepool_model::store::{MemoryStore, Store};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let config = Config::from_yaml("labels: [{name: small}]\n")?;
//! assert_eq!(config.labels[0].name, "small");
//!
//! let store = Store::new(Arc::new(MemoryStore::new()));
//! let node = Node::new(NodeState::Ready, 0.0, "cloud", "main", vec!["small".into()]);
//! let id = store.create_node(&node).await?;
//! assert_eq!(store.get_node(&id).await?.map(|n| n.value.state), Some(NodeState::Ready));
//! # Ok(())
//! # }
//! ```

pub mod cloud;
pub mod config;
pub mod consumer;
pub mod image_builder;
pub mod model;
pub mod provider;
pub mod store;

#[cfg(feature = "conformance")]
pub mod conformance;

/// This implementation's version, as registered in components.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
