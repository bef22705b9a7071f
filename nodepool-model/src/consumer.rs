//! The `NodeConsumer` trait: something outside Nodepool that uses nodes
//! directly (a Jenkins master taking nodes as agents). Zuul needs no
//! consumer object: it speaks through node requests.

use async_trait::async_trait;

use crate::model::Node;

/// What happened to a node the consumer had.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NodeOutcome {
    /// Its job finished: delete it.
    Used,
    /// Keep it for inspection, with a reason.
    Hold {
        /// Why it is held (goes to the node's `comment`).
        comment: String,
        /// The job hold rule this counts against (goes to the node's
        /// `hold_job`): the runtime holds the node only while fewer nodes
        /// than the rule allows are held for that job, and deletes it
        /// otherwise. `None`: hold unconditionally.
        job: Option<String>,
    },
}

/// A node the consumer is done with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FinishedNode {
    /// Node id.
    pub node_id: String,
    /// What to do with it.
    pub outcome: NodeOutcome,
}

/// Errors of a consumer, by meaning.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConsumerError {
    /// The thing does not exist on the consumer's side.
    #[error("not found: {0}")]
    NotFound(String),
    /// Credentials were refused.
    #[error("authentication failed: {0}")]
    Unauthenticated(String),
    /// The consumer refused because of its own state.
    #[error("conflict: {0}")]
    Conflict(String),
    /// A temporary failure; try again later.
    #[error("temporary failure: {0}")]
    Transient(String),
    /// Anything else.
    #[error("{0}")]
    Other(String),
}

/// A user of nodes. Object-safe; used as `Arc<dyn NodeConsumer>`.
///
/// Driven by the consumer runtime (`nodepool_core::consumers`), which gets nodes
/// through node requests and keeps them allocated to the consumer while it
/// has them. `node_ready` must be idempotent: after a restart the runtime
/// calls it again for every node still allocated to the consumer, which
/// must then adopt what it registered before instead of failing.
///
/// # Example
///
/// A consumer that keeps one idle node of a label and gives every node
/// back as soon as it got it (the `custom_consumer` example program is a
/// fuller one):
///
/// ```no_run
/// use std::sync::Mutex;
/// use async_trait::async_trait;
/// use nodepool_model::consumer::{ConsumerError, FinishedNode, NodeConsumer, NodeOutcome};
/// use nodepool_model::model::Node;
///
/// #[derive(Debug, Default)]
/// struct Echo {
///     done: Mutex<Vec<String>>,
/// }
///
/// #[async_trait]
/// impl NodeConsumer for Echo {
///     fn name(&self) -> &str {
///         "echo"
///     }
///     fn wants(&self) -> Vec<(String, u32)> {
///         vec![("small".into(), 1)]
///     }
///     async fn node_ready(&self, node_id: &str, node: &Node) -> Result<(), ConsumerError> {
///         println!("got {node_id} at {:?}", node.interface_ip);
///         self.done.lock().expect("poisoned").push(node_id.to_owned());
///         Ok(())
///     }
///     async fn finished_nodes(&self) -> Result<Vec<FinishedNode>, ConsumerError> {
///         let done = std::mem::take(&mut *self.done.lock().expect("poisoned"));
///         Ok(done
///             .into_iter()
///             .map(|node_id| FinishedNode { node_id, outcome: NodeOutcome::Used })
///             .collect())
///     }
///     async fn node_gone(&self, _node_id: &str) -> Result<(), ConsumerError> {
///         Ok(())
///     }
/// }
/// ```
#[async_trait]
pub trait NodeConsumer: Send + Sync + std::fmt::Debug {
    /// Consumer name (a Jenkins target's name).
    fn name(&self) -> &str;

    /// Labels it takes, with how many idle nodes of each it wants.
    fn wants(&self) -> Vec<(String, u32)>;

    /// A ready node was allocated to it: make it usable (register an agent).
    async fn node_ready(&self, node_id: &str, node: &Node) -> Result<(), ConsumerError>;

    /// Nodes it is done with since the last call.
    async fn finished_nodes(&self) -> Result<Vec<FinishedNode>, ConsumerError>;

    /// A node it had is gone (deleted): forget it (remove the agent).
    async fn node_gone(&self, node_id: &str) -> Result<(), ConsumerError>;

    /// Called when the runtime starts serving the consumer (and after the
    /// consumer was rebuilt by a reload) with the ids of every node
    /// allocated to it: remove whatever belongs to other nodes (agents of
    /// nodes deleted while nobody served the target). Default: nothing.
    async fn reconcile(&self, live: &[String]) -> Result<(), ConsumerError> {
        let _ = live;
        Ok(())
    }

    /// Nodes running a job right now, as of the last `finished_nodes`
    /// call. They do not count as idle for `min-ready`, so a replacement is
    /// launched as soon as a job starts rather than when it ends.
    fn busy_nodes(&self) -> Vec<String> {
        Vec::new()
    }
}

/// Builds the consumer of a target (the daemon passes
/// `nodepool_jenkins::consumer_factory`). An error leaves the target
/// unserved until the next configuration change.
pub type ConsumerFactory = std::sync::Arc<
    dyn Fn(&crate::config::Target) -> Result<std::sync::Arc<dyn NodeConsumer>, String>
        + Send
        + Sync,
>;
