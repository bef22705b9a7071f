//! Sample configurations and example programs; `tests/examples.rs` parses every config here.
