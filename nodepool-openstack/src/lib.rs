//! A Nodepool [`Provider`](nodepool_model::provider::Provider) on the
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
//!   snapshots, leak listings).
//! - [`client`]: [`Client`], the executor (auth, catalog, discovery, rate
//!   limit, retries, timeouts).
//! - [`api`]: the endpoints as values: [`api::identity`],
//!   [`api::compute`], [`api::image`], [`api::network`].
//! - [`clouds`]: clouds.yaml + secure.yaml loading.
//! - [`upload`]: streaming a file as a request body at constant memory.
//! - [`error`]: [`ApiError`] and its mapping to `ProviderError`.
//!
//! Secrets (passwords, application credential secrets, tokens) never appear
//! in logs, errors or `Debug` output.
//!
//! # Design notes
//!
//! - **Waits share one server list.** `wait_for_instance` and
//!   `delete_instance` poll the project's server list, fetched at most once
//!   per `list_ttl` (1 s) for all concurrent callers, never one GET per
//!   server per second; a server missing from a list made after it was
//!   created is confirmed with one GET (Nova shows `DELETED` for a moment
//!   before its 404).
//! - **Retries only where they are safe.** 429 and 503 (the request was not
//!   processed) are retried for every method with exponential backoff,
//!   waiting exactly `Retry-After` when the cloud sends one (up to a cap,
//!   beyond which the call fails as transient and the caller's next pass
//!   tries again). Connection failures are retried only for GET, PUT,
//!   DELETE: a POST may have reached the cloud. Other 5xx are `Transient`
//!   at once; every call has a timeout, so a hung endpoint costs at most
//!   that.
//! - **401 means one new token.** Tokens are renewed `refresh_margin`
//!   before they expire (by the server's own clock); a 401 anyway (revoked,
//!   Keystone restarted) drops the token, authenticates once more and
//!   repeats the call once. Concurrent callers wait for one new token.
//! - **Metadata never fails a launch** ([`nodepool_model::cloud`]): values over Nova's
//!   255 bytes are cut at a character boundary, with a warning.
//! - **Uploads check the cloud's own hashes.** A given MD5 is compared with
//!   Glance's `checksum` and a SHA-256 with `os_hash_value` when that is
//!   Glance's algorithm; only a lone SHA-256 is hashed locally (hashing
//!   costs a core that the cloud side may need). A failed or timed-out
//!   upload deletes its image.
//! - **Snapshots are Nova's `createImage`**, with the image properties as
//!   the action's metadata (so they list like an upload's), then the same
//!   wait for Glance's `active`. A vanished or `killed` image is a failed
//!   snapshot (Nova deletes the image when the compute host fails), not a
//!   missing server; a snapshot not active in time deletes its image.
//! - **Floating IPs are released before their server**, since Neutron keeps
//!   them (unattached) after the port goes; whether to look is decided from
//!   the server's addresses and the IPs this process attached, to spare two
//!   calls per delete.

pub mod api;
pub mod client;
pub mod clouds;
pub mod error;
pub mod provider;
pub mod upload;

pub use client::{Client, ClientOptions, ClientStats};
pub use clouds::{CloudConfig, CloudConfigError, CloudConfigErrors, CloudsLoader};
pub use error::ApiError;
pub use provider::{OpenStackProvider, ProviderOptions};
