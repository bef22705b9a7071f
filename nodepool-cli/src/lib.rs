//! The thin binaries of a Rust Nodepool: `nodepool` (the admin CLI),
//! `nodepool-launcher` and `nodepool-builder`. They parse arguments, load
//! the configuration, pick backends and call into `nodepool-core`.
//!
//! Start at [`admin`] for the `nodepool` command.

pub mod admin;
pub mod daemon;
pub mod webapp;
