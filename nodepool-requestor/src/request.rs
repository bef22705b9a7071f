//! Submitting and following requests: what to ask for ([`NewRequest`],
//! [`Precedence`]), the [`Requestor`] itself, and how a request ended
//! ([`Outcome`]).

use std::time::Duration;

use nodepool_model::model::{Json, NodeRequest, RequestState, epoch_now};
use nodepool_model::store::{LockWait, Store, StoreError, StoreEvent, Versioned, paths};
use tokio::sync::broadcast::error::RecvError;

use crate::RequestorError;

/// How long Zuul's executor waits for each node lock.
pub const NODE_LOCK_TIMEOUT: Duration = Duration::from_secs(30);

/// Zuul's pipeline precedence, which becomes the request's priority prefix.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Precedence {
    /// `100`.
    High,
    /// `200` (check and most pipelines).
    Normal,
    /// `300`.
    Low,
}

impl Precedence {
    /// The three-digit prefix; one less (more urgent) for a job whose parent
    /// build is paused, as Zuul does (`199-`).
    pub fn prefix(self, parent_paused: bool) -> String {
        let base = match self {
            Precedence::High => 100,
            Precedence::Normal => 200,
            Precedence::Low => 300,
        };
        format!("{:03}", base - i32::from(parent_paused))
    }
}

/// What to ask for.
#[derive(Clone, Debug, PartialEq)]
pub struct NewRequest {
    /// Labels, in nodeset order (duplicates allowed).
    pub node_types: Vec<String>,
    /// Priority prefix, e.g. from [`Precedence::prefix`].
    pub priority: String,
    /// Lower is more urgent within a priority.
    pub relative_priority: i64,
    /// Preferred provider.
    pub provider: Option<String>,
    /// Tenant, for tenant quota.
    pub tenant_name: Option<String>,
    /// Event id for tracing; a uuid4 hex when `None`.
    pub event_id: Option<String>,
    /// Opaque data given back exactly; `{}` when `None` (Zuul never writes
    /// null here, and Python Nodepool reads it with `[]`).
    pub requestor_data: Option<Json>,
}

impl NewRequest {
    /// A normal-precedence request for these labels.
    pub fn new(node_types: Vec<String>) -> Self {
        NewRequest {
            node_types,
            priority: Precedence::Normal.prefix(false),
            relative_priority: 0,
            provider: None,
            tenant_name: None,
            event_id: None,
            requestor_data: None,
        }
    }
}

/// How a request ended.
#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    /// Nodes are allocated; [`Requestor::accept`] them.
    Fulfilled(Versioned<NodeRequest>),
    /// No launcher could serve it; [`Requestor::cancel`] it.
    Failed(Versioned<NodeRequest>),
}

/// A requestor with a stable system id (Zuul's: a uuid4 hex kept across
/// restarts). Cheap to clone.
#[derive(Clone, Debug)]
pub struct Requestor {
    pub(crate) store: Store,
    pub(crate) system_id: String,
    pub(crate) node_lock_timeout: Duration,
}

impl Requestor {
    /// A requestor writing `system_id` into requests and nodes.
    pub fn new(store: Store, system_id: impl Into<String>) -> Self {
        Requestor {
            store,
            system_id: system_id.into(),
            node_lock_timeout: NODE_LOCK_TIMEOUT,
        }
    }

    /// With another node lock timeout than Zuul's 30 s.
    pub fn with_node_lock_timeout(mut self, timeout: Duration) -> Self {
        self.node_lock_timeout = timeout;
        self
    }

    /// The system id.
    pub fn system_id(&self) -> &str {
        &self.system_id
    }

    /// The store.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Submits a request; returns its id (`<prio>-<seq10>`). Requests are
    /// persistent, as in Zuul ≥ 4: they survive our session.
    pub async fn submit(&self, new: &NewRequest) -> Result<String, RequestorError> {
        let now = epoch_now();
        let mut r = NodeRequest::new(new.node_types.clone(), &self.system_id, now);
        r.relative_priority = new.relative_priority;
        r.provider = new.provider.clone();
        r.tenant_name = new.tenant_name.clone();
        if let Some(e) = &new.event_id {
            r.event_id = Some(e.clone());
        }
        r.requestor_data = Some(
            new.requestor_data
                .clone()
                .unwrap_or_else(Json::empty_object),
        );
        Ok(self.store.submit_request(&r, &new.priority, false).await?)
    }

    /// Waits until the request is fulfilled or failed, at most `timeout`.
    pub async fn wait(&self, id: &str, timeout: Duration) -> Result<Outcome, RequestorError> {
        let deadline = tokio::time::Instant::now() + timeout;
        // Subscribe before reading, so no change between the two is missed.
        let mut events = self.store.backend().subscribe();
        let path = paths::request(id);
        loop {
            match self.store.get_request(id).await? {
                None => return Err(RequestorError::Gone { id: id.to_owned() }),
                Some(v) if v.value.state == RequestState::Fulfilled => {
                    return Ok(Outcome::Fulfilled(v));
                }
                Some(v) if v.value.state == RequestState::Failed => return Ok(Outcome::Failed(v)),
                Some(_) => {}
            }
            loop {
                match tokio::time::timeout_at(deadline, events.recv()).await {
                    Err(_) => {
                        return Err(RequestorError::Timeout {
                            id: id.to_owned(),
                            waited: timeout,
                        });
                    }
                    Ok(Ok(
                        StoreEvent::Created(p) | StoreEvent::Changed(p) | StoreEvent::Deleted(p),
                    )) if p == path => {
                        break;
                    }
                    Ok(Ok(_)) => {}
                    // Missed events: read again.
                    Ok(Err(RecvError::Lagged(_))) => break,
                    Ok(Err(RecvError::Closed)) => return Err(StoreError::SessionLost.into()),
                }
            }
        }
    }

    /// Withdraws a request (deletes it whatever its state or lock, as Zuul
    /// does). Deleting a missing request is fine.
    pub async fn cancel(&self, id: &str) -> Result<(), RequestorError> {
        Ok(self.store.delete_request(id).await?)
    }

    /// Sets a new `relative_priority`, the way Zuul does: take the request
    /// lock without waiting and write with a version check. Returns whether
    /// it was written; a locked (being handled), changed or missing request
    /// is silently left alone.
    pub async fn revise_priority(
        &self,
        id: &str,
        relative_priority: i64,
    ) -> Result<bool, RequestorError> {
        let lock = match self.store.lock_request(id, LockWait::NonBlocking).await {
            Ok(l) => l,
            Err(StoreError::Locked { .. }) => return Ok(false),
            Err(e) => return Err(e.into()),
        };
        let result = async {
            let Some(mut current) = self.store.get_request(id).await? else {
                return Ok(false);
            };
            if current.value.relative_priority == relative_priority {
                return Ok(true);
            }
            current.value.relative_priority = relative_priority;
            match self
                .store
                .update_request(id, &current.value, current.version)
                .await
            {
                Ok(_) => Ok(true),
                Err(StoreError::Conflict { .. } | StoreError::NotFound { .. }) => Ok(false),
                Err(e) => Err(e.into()),
            }
        }
        .await;
        let _ = lock.release().await;
        result
    }
}

#[cfg(test)]
mod tests {
    use super::Precedence;

    #[test]
    fn precedence_prefixes_are_zuuls() {
        assert_eq!(Precedence::High.prefix(false), "100");
        assert_eq!(Precedence::Normal.prefix(false), "200");
        assert_eq!(Precedence::Normal.prefix(true), "199");
        assert_eq!(Precedence::Low.prefix(false), "300");
    }
}
