//! What can go wrong on the requestor side.

use std::time::Duration;

use nodepool_model::model::RequestState;
use nodepool_model::store::StoreError;

/// What can go wrong on the requestor side.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RequestorError {
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The request did not finish in time.
    #[error("request {id}: not fulfilled within {waited:?}")]
    Timeout {
        /// Request id.
        id: String,
        /// How long we waited.
        waited: Duration,
    },
    /// The request disappeared (someone cancelled it, or its session ended).
    #[error("request {id}: deleted")]
    Gone {
        /// Request id.
        id: String,
    },
    /// `accept` was called on a request that is not fulfilled.
    #[error("request {id}: is {state}, not fulfilled")]
    NotFulfilled {
        /// Request id.
        id: String,
        /// Its state.
        state: RequestState,
    },
    /// A node of the request is missing or allocated elsewhere.
    #[error("request {request}: node {node} {reason}")]
    BadNode {
        /// Request id.
        request: String,
        /// Node id.
        node: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A node could not be locked.
    #[error("request {request}: cannot lock node {node}: {source}")]
    Lock {
        /// Request id.
        request: String,
        /// Node id.
        node: String,
        /// Why.
        source: StoreError,
    },
    /// Our node lock was lost (session suspended or expired) before a write.
    #[error("node {node}: lock lost")]
    LockLost {
        /// Node id.
        node: String,
    },
}
