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
//! - [`admin`]: operations on a running installation (delete or hold a
//!   node, image requests and deletions, leak listings, image data
//!   export and import), the domain half of the `nodepool` CLI.
//! - [`requestor`]: the Zuul-side client (re-exported `nodepool-requestor`,
//!   which CI systems that only ask for nodes depend on alone).
//! - [`runtime`]: what the launcher, builder and consumer runtimes share:
//!   the pass loop, the clock, the provider factory, pass counters.
//! - `testing` (feature `testing`): an in-memory store and the shared
//!   conformance suites every backend runs.

pub mod admin;
pub mod builder;
pub mod consumers;
pub mod launcher;
pub mod planner;
pub mod runtime;

// The contract, re-exported so one dependency gives the whole picture.
pub use nodepool_model::{VERSION, cloud, config, consumer, image_builder, model, provider, store};
/// The Zuul-side client (the `nodepool-requestor` crate), under the path it
/// had before it became its own crate.
pub use nodepool_requestor as requestor;

#[cfg(feature = "testing")]
pub mod testing;
