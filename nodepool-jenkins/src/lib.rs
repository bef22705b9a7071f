//! A Nodepool [`NodeConsumer`] that
//! registers nodes as single-use Jenkins agents (seeds 002 and 003): the
//! `targets` of `nodepool.yaml`.
//!
//! Start with [`JenkinsConsumer`]: one per target, driven by the consumer
//! runtime of `nodepool_model::consumers` (which gets the nodes through
//! node requests and marks them `used` or `hold` when the consumer says
//! their job is done). [`consumer_factory`] is what the launcher daemon
//! hands that runtime.
//!
//! The HTTP layer is shaped sans-IO, like `nodepool-openstack`: every
//! Jenkins call is a value in [`api`] that builds an [`api::ApiRequest`]
//! and parses an [`api::ApiResponse`]; the one [`JenkinsClient`] sends
//! them all, adding API-token authentication, CSRF crumbs, timeouts,
//! retries with backoff, and mapping failures to `ConsumerError` meanings
//! ([`error`]).
//!
//! # Layout
//!
//! - [`consumer`]: [`JenkinsConsumer`] (agent naming, registration,
//!   finished-job detection, job holds).
//! - [`client`]: [`JenkinsClient`], the executor.
//! - [`api`]: the endpoints as values: crumb issuer, agent create / state /
//!   delete / list, an agent's builds, a build's result.
//! - [`error`]: [`ApiError`] and its mapping to `ConsumerError`.
//!
//! The API token never appears in logs, errors or `Debug` output.

pub mod api;
pub mod client;
pub mod consumer;
pub mod error;

use std::sync::Arc;

use nodepool_model::consumer::ConsumerFactory;
use nodepool_model::consumer::NodeConsumer;
use nodepool_model::store::Store;

pub use client::{ClientOptions, ClientStats, JenkinsClient, RetryPolicy};
pub use consumer::{JenkinsConsumer, JenkinsOptions, agent_name};
pub use error::ApiError;

/// The factory the consumer runtime builds target consumers with: a
/// [`JenkinsConsumer`] per target, reading job hold rules from `store`.
pub fn consumer_factory(store: Store, options: JenkinsOptions) -> ConsumerFactory {
    Arc::new(move |target| {
        JenkinsConsumer::new(target, store.clone(), options.clone())
            .map(|c| Arc::new(c) as Arc<dyn NodeConsumer>)
            .map_err(|e| e.to_string())
    })
}
