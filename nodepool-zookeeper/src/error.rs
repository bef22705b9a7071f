//! The client crate's errors, mapped to [`StoreError`] meanings.

use nodepool_model::store::StoreError;
use zookeeper_client as zk;

/// Maps an error of an operation on `path`; `store` names the ensemble for
/// connection errors.
pub(crate) fn map(err: zk::Error, path: &str, store: &str) -> StoreError {
    match err {
        zk::Error::NoNode => StoreError::NotFound { path: path.into() },
        zk::Error::NodeExists => StoreError::Conflict {
            path: path.into(),
            reason: "already exists".into(),
        },
        zk::Error::BadVersion => StoreError::Conflict {
            path: path.into(),
            reason: "version changed".into(),
        },
        zk::Error::NotEmpty => StoreError::NotEmpty { path: path.into() },
        // A closed client behaves like the memory store after close():
        // the session is gone.
        zk::Error::SessionExpired | zk::Error::SessionMoved | zk::Error::ClientClosed => {
            StoreError::SessionLost
        }
        // `Custom` in an operation is the I/O error that broke the
        // connection ("Connection reset by peer" when the server stops):
        // the request may or may not have been applied, exactly as with
        // ConnectionLoss, so it must be resolved, not taken as a refusal.
        zk::Error::ConnectionLoss
        | zk::Error::Timeout
        | zk::Error::NoHosts
        | zk::Error::Custom(_) => StoreError::Unavailable {
            store: store.into(),
            reason: err.to_string(),
        },
        zk::Error::NoChildrenForEphemerals => {
            StoreError::Other(format!("{path}: ephemeral records cannot have children"))
        }
        other => StoreError::Other(format!("{path}: {other}")),
    }
}

/// Whether the error means "this connection is down, try again later"
/// (as opposed to an answer about the data).
pub(crate) fn is_connection(err: &zk::Error) -> bool {
    matches!(
        err,
        zk::Error::ConnectionLoss | zk::Error::Timeout | zk::Error::NoHosts | zk::Error::Custom(_)
    )
}

/// Whether the session is over for good.
pub(crate) fn is_terminal(err: &zk::Error) -> bool {
    matches!(
        err,
        zk::Error::SessionExpired
            | zk::Error::SessionMoved
            | zk::Error::ClientClosed
            | zk::Error::AuthFailed
    )
}
