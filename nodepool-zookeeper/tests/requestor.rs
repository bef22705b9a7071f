//! The requestor (Zuul's side of the protocol) on the real ZooKeeper.

mod common;

use std::sync::Arc;

use async_trait::async_trait;
use nodepool_model::store::StateStore;
use nodepool_requestor::conformance::Harness;
use nodepool_zookeeper::ZooKeeperOptions;

struct ZooKeeper(ZooKeeperOptions);

#[async_trait]
impl Harness for ZooKeeper {
    async fn client(&self) -> Arc<dyn StateStore> {
        Arc::new(common::connect(self.0.clone()).await)
    }

    async fn expire(&self, _client: &Arc<dyn StateStore>) {
        unreachable!("the requestor suite does not expire sessions")
    }
}

nodepool_requestor::requestor_tests!(ZooKeeper(common::plain(&common::fresh_chroot())));
