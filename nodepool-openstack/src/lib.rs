//! A Nodepool [`Provider`](nodepool_core::provider::Provider) on the
//! OpenStack REST APIs: Keystone v3, Nova, Glance and Neutron, over reqwest.
//!
//! Start with [`OpenStackProvider`]: `OpenStackProvider::from_config(&provider)`
//! turns a `nodepool.yaml` provider entry into a provider, reading the
//! cloud's credentials from clouds.yaml ([`clouds`]).
//!
//! The HTTP layer is shaped sans-IO, as kube-rs does it: every OpenStack
//! call is a value in [`api`] that builds an [`api::ApiRequest`] and parses
//! an [`api::ApiResponse`]; the one [`Client`] sends them all, adding the
//! token, the provider's rate limit, per-call timeouts, retries with backoff
//! (honouring `Retry-After`), and mapping failures to `ProviderError`
//! meanings ([`error`]).
//!
//! # Layout
//!
//! - [`provider`]: [`OpenStackProvider`], the `Provider` implementation
//!   (flavor choice, server create/wait/delete, floating IPs, uploads,
//!   leak listings).
//! - [`client`]: [`Client`], the executor (auth, catalog, discovery, rate
//!   limit, retries, timeouts).
//! - [`api`]: the endpoints as values: [`api::identity`],
//!   [`api::compute`], [`api::image`], [`api::network`].
//! - [`clouds`]: clouds.yaml + secure.yaml loading.
//! - [`metadata`]: Nova's 255-byte metadata rule.
//! - [`upload`]: streaming a file as a request body at constant memory.
//! - [`error`]: [`ApiError`] and its mapping to `ProviderError`.
//!
//! Secrets (passwords, application credential secrets, tokens) never appear
//! in logs, errors or `Debug` output.

pub mod api;
pub mod client;
pub mod clouds;
pub mod error;
pub mod metadata;
pub mod provider;
pub mod upload;

pub use client::{Client, ClientOptions, ClientStats};
pub use clouds::{CloudConfig, CloudConfigError, CloudsLoader};
pub use error::ApiError;
pub use provider::{OpenStackProvider, ProviderOptions};
