//! The in-memory store passes the StateStore conformance suite.

use std::sync::Arc;

use async_trait::async_trait;
use nodepool_model::conformance::store::Harness;
use nodepool_model::store::MemoryStore;
use nodepool_model::store::StateStore;

struct Memory {
    root: MemoryStore,
    clients: std::sync::Mutex<Vec<MemoryStore>>,
}

impl Memory {
    fn new() -> Self {
        Memory {
            root: MemoryStore::new(),
            clients: std::sync::Mutex::new(Vec::new()),
        }
    }
}

#[async_trait]
impl Harness for Memory {
    async fn client(&self) -> Arc<dyn StateStore> {
        let c = self.root.new_session();
        self.clients.lock().expect("lock").push(c.clone());
        Arc::new(c)
    }

    async fn expire(&self, client: &Arc<dyn StateStore>) {
        // Clients are clones sharing a session; find ours by its session id.
        let id = client.session().borrow().id();
        let clients = self.clients.lock().expect("lock").clone();
        for c in clients {
            if c.session().borrow().id() == id {
                c.expire_session();
                return;
            }
        }
        panic!("unknown client");
    }
}

nodepool_model::store_conformance_tests!(Memory::new());
