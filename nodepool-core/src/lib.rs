//! The core of a Rust Nodepool: the domain model, the `nodepool.yaml`
//! configuration, the four traits the backends implement, and (in later
//! modules) the pure pool planner and the runtime loops.
//!
//! # Layout
//!
//! - [`model`]: nodes, requests, builds, uploads and components exactly as
//!   they are stored on the wire. Start here.
//! - [`config`]: loading and validating `nodepool.yaml`; every error comes
//!   with its path.
//! - [`store`]: the [`StateStore`](store::StateStore) trait (ZooKeeper's data
//!   model), the record layout, kazoo's lock recipe and the typed
//!   [`Store`](store::Store) facade.
//! - [`provider`]: the [`Provider`](provider::Provider) trait (clouds).
//! - [`image_builder`]: the [`ImageBuilder`](image_builder::ImageBuilder)
//!   trait (diskimage-builder).
//! - [`builder`]: the builder runtime (image builds, uploads, retention).
//! - [`consumer`]: the [`NodeConsumer`](consumer::NodeConsumer) trait
//!   (Jenkins).
//! - [`consumers`]: the runtime that keeps consumers (Jenkins targets)
//!   supplied with nodes, and job hold rules.
//! - [`simulated`]: the built-in simulated cloud
//!   ([`SimulatedProvider`](simulated::SimulatedProvider), `driver:
//!   simulated`) for tests, benchmarks and the quick start.
//! - `testing` (feature `testing`): an in-memory store and the shared
//!   conformance suites every backend runs.

pub mod builder;
pub mod config;
pub mod consumer;
pub mod consumers;
pub mod image_builder;
pub mod launcher;
pub mod model;
pub mod planner;
pub mod provider;
pub mod requestor;
pub mod simulated;
pub mod store;

#[cfg(feature = "testing")]
pub mod testing;

/// This implementation's version, as registered in components.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
