//! Sample configurations and example programs; nothing to link against.
//!
//! Start with `quickstart.yaml` (the embedded default), then the programs:
//! `programs/embedded_ci.rs` (a CI that embeds the launcher and asks for
//! nodes through `nodepool-requestor`) and `programs/custom_consumer.rs` (a
//! `NodeConsumer` that is not Jenkins). `tests/configs.rs` validates every
//! configuration here; `scripts/test.d/20-examples.sh` runs every program.
