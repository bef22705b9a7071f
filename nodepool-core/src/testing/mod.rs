//! Test support (feature `testing`): an in-memory store, and the
//! conformance suites every backend runs against itself.

pub mod conformance;
mod memory_store;
mod world;

pub use crate::simulated::resolve_flavor;
pub use memory_store::MemoryStore;
pub use world::World;
