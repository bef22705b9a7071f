//! The SQLite store passes the StateStore conformance suite, each client
//! its own handle on one real database file (see `common`).

mod common;

nodepool_model::store_conformance_tests!(common::Sqlite::new());
