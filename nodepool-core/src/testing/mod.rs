//! Test support (feature `testing`): the planner's model installation
//! ([`World`]), and the contract's in-memory store and conformance suites
//! under their old names.

mod world;

pub use nodepool_model::conformance;
pub use nodepool_model::store::MemoryStore;
pub use world::World;
