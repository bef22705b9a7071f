//! The thin binaries of a Rust Nodepool: `nodepool` (the admin CLI),
//! `nodepool-launcher` and `nodepool-builder`. They parse arguments, load
//! the configuration, pick backends and call into `nodepool-core`.
//!
//! Start at [`admin`] for the `nodepool` command; [`listing`] holds the
//! listings it shares with the launcher's [`webapp`].

pub mod admin;
pub mod daemon;
pub mod jobs;
pub mod listing;
pub mod webapp;
