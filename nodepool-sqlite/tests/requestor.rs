//! The requestor (Zuul's side of the protocol) on the SQLite store, the
//! requestor and the stand-in launcher each with its own handle on one real
//! database file (see `common`).

mod common;

nodepool_requestor::requestor_tests!(common::Sqlite::new());
