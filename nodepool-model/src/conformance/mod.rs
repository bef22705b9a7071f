//! Shared conformance suites: plain `pub async fn` test bodies that every
//! backend's own tests call (the object_store `integration.rs` pattern).

pub mod provider;
pub mod store;
