//! The thin binaries of a Rust Nodepool: `nodepool` (the admin CLI),
//! `nodepool-launcher` and `nodepool-builder`. They parse arguments, load
//! the configuration, pick backends and call into `nodepool-core`.
//!
//! Start at [`cli`] for what the binaries accept and [`admin`] for what
//! the `nodepool` command does with it (its domain operations are in
//! `nodepool_core::admin`); [`listing`] holds the listings it shares with
//! the launcher's [`webapp`], whose live page is the [`dashboard`].

pub mod admin;
pub mod cli;
pub mod daemon;
pub mod dashboard;
pub mod jobs;
pub mod listing;
pub mod migrate;
pub mod wait;
pub mod webapp;
