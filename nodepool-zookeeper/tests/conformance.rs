//! The whole StateStore conformance suite against the real ZooKeeper,
//! plaintext, each test in a fresh random chroot.

mod common;

use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use nodepool_core::store::StateStore;
use nodepool_model::conformance::store::Harness;
use nodepool_zookeeper::{ZooKeeperOptions, ZooKeeperStore};

/// Clients of one chroot, so each test sees an empty store.
struct ZooKeeper {
    options: ZooKeeperOptions,
    clients: Mutex<Vec<ZooKeeperStore>>,
}

impl ZooKeeper {
    fn new(options: ZooKeeperOptions) -> Self {
        ZooKeeper {
            options,
            clients: Mutex::new(Vec::new()),
        }
    }
}

#[async_trait]
impl Harness for ZooKeeper {
    async fn client(&self) -> Arc<dyn StateStore> {
        let c = common::connect(self.options.clone()).await;
        self.clients.lock().expect("lock").push(c.clone());
        Arc::new(c)
    }

    /// A real server-side expiry: `ZooKeeperStore::expire_session` attaches
    /// a second connection to the session and closes it.
    async fn expire(&self, client: &Arc<dyn StateStore>) {
        let id = client.session().borrow().id();
        let clients = self.clients.lock().expect("lock").clone();
        for c in clients {
            if c.session().borrow().id() == id {
                c.expire_session().await.expect("session expires");
                return;
            }
        }
        panic!("unknown client");
    }
}

nodepool_model::store_conformance_tests!(ZooKeeper::new(common::plain(&common::fresh_chroot())));
