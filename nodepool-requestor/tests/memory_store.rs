//! The requestor suite on the in-memory store: every client is its own
//! session on one shared tree.

use std::sync::Arc;

use async_trait::async_trait;
use nodepool_model::store::{MemoryStore, StateStore};
use nodepool_requestor::conformance::Harness;

struct Memory(MemoryStore);

#[async_trait]
impl Harness for Memory {
    async fn client(&self) -> Arc<dyn StateStore> {
        Arc::new(self.0.new_session())
    }

    async fn expire(&self, _client: &Arc<dyn StateStore>) {
        unreachable!("the requestor suite does not expire sessions")
    }
}

nodepool_requestor::requestor_tests!(Memory(MemoryStore::new()));
