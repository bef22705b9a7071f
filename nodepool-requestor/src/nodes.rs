//! Taking the nodes of a fulfilled request, using them and giving them
//! back: [`Requestor::accept`], [`Requestor::use_nodes`],
//! [`Requestor::return_nodes`] and [`Requestor::hold`].

use nodepool_model::model::{Json, Node, NodeRequest, NodeState, RequestState, epoch_now};
use nodepool_model::store::{LockGuard, LockWait, StoreError};
use serde::Serialize;

use crate::{Requestor, RequestorError};

/// A node we hold: locked, with the version we last wrote.
#[derive(Debug)]
pub struct HeldNode {
    /// Node id.
    pub id: String,
    /// The node as we last read or wrote it.
    pub node: Node,
    /// Its lock.
    pub lock: LockGuard,
}

/// The nodes of an accepted request, all locked by us.
#[derive(Debug)]
pub struct NodeSet {
    /// The request they were allocated to (already deleted).
    pub request_id: String,
    /// Nodes in `node_types` order.
    pub nodes: Vec<HeldNode>,
}

/// An autohold: what Zuul writes on held nodes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hold {
    /// `"<tenant> <project> <job> <ref filter>"`.
    pub job: String,
    /// The reason, shown by `nodepool list --detail`.
    pub comment: String,
    /// Seconds after which the launcher deletes the node (`None`: never).
    pub expiration: Option<i64>,
}

#[derive(Serialize)]
struct UserData<'a> {
    zuul_system: &'a str,
    project_name: &'a str,
}

impl Requestor {
    /// Takes the nodes of a fulfilled request: reads each node and checks it
    /// is allocated to the request, locks it (blocking, the node lock
    /// timeout), checks again under the lock. Then deletes the request —
    /// also when something failed, as Zuul does, after unlocking whatever
    /// it had locked.
    pub async fn accept(&self, id: &str, request: &NodeRequest) -> Result<NodeSet, RequestorError> {
        if request.state != RequestState::Fulfilled {
            return Err(RequestorError::NotFulfilled {
                id: id.to_owned(),
                state: request.state,
            });
        }
        let locked = self.lock_nodes(id, request).await;
        let deleted = self.store.delete_request(id).await;
        match (locked, deleted) {
            (Ok(nodes), Ok(())) => Ok(NodeSet {
                request_id: id.to_owned(),
                nodes,
            }),
            (Ok(nodes), Err(e)) => {
                Self::unlock_all(nodes).await;
                Err(e.into())
            }
            (Err(e), _) => Err(e),
        }
    }

    async fn lock_nodes(
        &self,
        id: &str,
        request: &NodeRequest,
    ) -> Result<Vec<HeldNode>, RequestorError> {
        let mut held = Vec::with_capacity(request.nodes.len());
        for node_id in &request.nodes {
            match self.lock_node(id, node_id).await {
                Ok(n) => held.push(n),
                Err(e) => {
                    Self::unlock_all(held).await;
                    return Err(e);
                }
            }
        }
        Ok(held)
    }

    async fn lock_node(&self, request: &str, node_id: &str) -> Result<HeldNode, RequestorError> {
        self.check_allocation(request, node_id).await?;
        let lock = self
            .store
            .lock_node(node_id, LockWait::Timeout(self.node_lock_timeout))
            .await
            .map_err(|source| RequestorError::Lock {
                request: request.to_owned(),
                node: node_id.to_owned(),
                source,
            })?;
        match self.check_allocation(request, node_id).await {
            Ok(node) => Ok(HeldNode {
                id: node_id.to_owned(),
                node,
                lock,
            }),
            Err(e) => {
                let _ = lock.release().await;
                Err(e)
            }
        }
    }

    async fn check_allocation(&self, request: &str, node_id: &str) -> Result<Node, RequestorError> {
        let bad = |reason: String| RequestorError::BadNode {
            request: request.to_owned(),
            node: node_id.to_owned(),
            reason,
        };
        let node = match self.store.get_node(node_id).await {
            Ok(Some(v)) => v.value,
            Ok(None) => return Err(bad("does not exist".into())),
            Err(StoreError::Malformed { reason, .. }) => {
                return Err(bad(format!("is malformed: {reason}")));
            }
            Err(e) => return Err(e.into()),
        };
        if node.allocated_to.as_deref() != Some(request) {
            return Err(bad(format!(
                "is allocated to {:?}",
                node.allocated_to.as_deref().unwrap_or("nothing")
            )));
        }
        Ok(node)
    }

    async fn unlock_all(nodes: Vec<HeldNode>) {
        for n in nodes {
            if let Err(e) = n.lock.release().await {
                tracing::warn!(node = %n.id, error = %e, "cannot unlock node");
            }
        }
    }

    async fn store_held(&self, n: &HeldNode) -> Result<(), RequestorError> {
        // Zuul writes under the lock without a version check; we refuse to
        // write once the lock is gone (waiting out a suspended session).
        if !n.lock.wait_held().await {
            return Err(RequestorError::LockLost { node: n.id.clone() });
        }
        self.store.store_node(&n.id, &n.node).await?;
        Ok(())
    }

    /// Marks every node `in-use` with Zuul's `user_data`
    /// (`{"zuul_system": <system id>, "project_name": <project>}`).
    pub async fn use_nodes(
        &self,
        set: &mut NodeSet,
        project_name: &str,
    ) -> Result<(), RequestorError> {
        let user_data = Json::encode(&UserData {
            zuul_system: &self.system_id,
            project_name,
        });
        for n in &mut set.nodes {
            n.node.set_state(NodeState::InUse, epoch_now());
            n.node.user_data = Some(user_data.clone());
            self.store_held(n).await?;
        }
        Ok(())
    }

    /// Gives the nodes back: `in-use` ones become `used` (the launcher then
    /// deletes them); others are only unlocked and stay as they are.
    pub async fn return_nodes(&self, set: NodeSet) -> Result<(), RequestorError> {
        let mut first_error = None;
        for mut n in set.nodes {
            if n.node.state == NodeState::InUse {
                n.node.set_state(NodeState::Used, epoch_now());
                if let Err(e) = self.store_held(&n).await {
                    first_error.get_or_insert(e);
                }
            }
            if let Err(e) = n.lock.release().await {
                first_error.get_or_insert(e.into());
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// Holds the nodes (Zuul's autohold): state `hold` with the job, the
    /// reason and the expiry, then unlocks them.
    pub async fn hold(&self, set: NodeSet, hold: &Hold) -> Result<(), RequestorError> {
        let mut first_error = None;
        for mut n in set.nodes {
            n.node.set_state(NodeState::Hold, epoch_now());
            n.node.hold_job = Some(hold.job.clone());
            n.node.comment = Some(hold.comment.clone());
            n.node.hold_expiration = hold.expiration;
            if let Err(e) = self.store_held(&n).await {
                first_error.get_or_insert(e);
            }
            if let Err(e) = n.lock.release().await {
                first_error.get_or_insert(e.into());
            }
        }
        first_error.map_or(Ok(()), Err)
    }
}
