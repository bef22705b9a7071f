//! The requestor side of the node-request protocol, exactly as Zuul does it
//! (reference §2.6), for CI systems that want nodes from Nodepool.
//!
//! Works on any [`Store`] (ZooKeeper, SQLite, memory). The life of a
//! request:
//!
//! 1. [`Requestor::submit`] creates `/nodepool/requests/<prio>-<seq>` with
//!    Zuul's fields (requestor id, `requestor_data`, `event_id`,
//!    `created_time`, tenant, provider, `relative_priority`);
//! 2. [`Requestor::wait`] follows it (through the store's change stream,
//!    with a deadline) until it is `fulfilled` or `failed`;
//! 3. [`Requestor::accept`] locks every allocated node (30 s each, like
//!    Zuul's executor), re-checks `allocated_to` under the lock and deletes
//!    the request (always, even when locking failed, as Zuul does);
//! 4. [`Requestor::use_nodes`] marks them `in-use` with Zuul's `user_data`;
//! 5. [`Requestor::return_nodes`] marks `in-use` nodes `used` and unlocks
//!    (nodes that were never used are only unlocked), or
//!    [`Requestor::hold`] keeps them for a person to look at.
//!
//! [`Requestor::cancel`] withdraws a request and
//! [`Requestor::revise_priority`] changes its `relative_priority` the way
//! Zuul does: only if the request lock is free, else silently not.

use std::time::Duration;

use serde::Serialize;
use tokio::sync::broadcast::error::RecvError;

use crate::model::{Json, Node, NodeRequest, NodeState, RequestState, epoch_now};
use crate::store::{LockGuard, LockWait, Store, StoreError, StoreEvent, Versioned, paths};

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

/// A requestor with a stable system id (Zuul's: a uuid4 hex kept across
/// restarts). Cheap to clone.
#[derive(Clone, Debug)]
pub struct Requestor {
    store: Store,
    system_id: String,
    node_lock_timeout: Duration,
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

/// The requestor's test bodies, run against every store (like the
/// `StateStore` conformance suite): memory in this crate's unit tests,
/// ZooKeeper in `nodepool-zookeeper`'s.
#[cfg(feature = "testing")]
pub mod suite {
    use std::time::Duration;

    use super::*;
    use crate::testing::conformance::store::Harness;

    /// Generates one `#[tokio::test]` per requestor test for a harness
    /// expression (see `store_conformance_tests!`).
    #[macro_export]
    macro_rules! requestor_tests {
        ($harness:expr) => {
            $crate::requestor_tests!(@each $harness;
                submit_writes_zuul_fields,
                fulfilled_request_full_cycle,
                failed_request_is_reported_and_cancelled,
                wait_times_out_and_notices_deletion,
                accept_rejects_nodes_of_other_requests,
                accept_gives_up_on_a_locked_node,
                hold_marks_and_unlocks,
                revise_priority_only_when_unlocked
            );
        };
        (@each $harness:expr; $($name:ident),* $(,)?) => {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let harness = $harness;
                    $crate::requestor::suite::$name(&harness).await;
                }
            )*
        };
    }

    const SYSTEM: &str = "0123456789abcdef0123456789abcdef";
    const LONG: Duration = Duration::from_secs(20);

    /// A stand-in launcher: allocates ready nodes and fulfils (or fails)
    /// requests under their lock, as Nodepool does.
    struct Launcher {
        store: Store,
    }

    impl Launcher {
        async fn fulfil(&self, id: &str) -> Vec<String> {
            let lock = self
                .store
                .lock_request(id, LockWait::Timeout(LONG))
                .await
                .expect("launcher locks the request");
            let mut r = self
                .store
                .get_request(id)
                .await
                .expect("read")
                .expect("request exists");
            let mut nodes = Vec::new();
            for label in r.value.node_types.clone() {
                let mut n = Node::new(NodeState::Ready, epoch_now(), "cloud", "main", vec![label]);
                n.allocated_to = Some(id.to_owned());
                nodes.push(self.store.create_node(&n).await.expect("create node"));
            }
            r.value.nodes = nodes.clone();
            r.value.set_state(RequestState::Fulfilled, epoch_now());
            self.store
                .update_request(id, &r.value, r.version)
                .await
                .expect("fulfil");
            lock.release().await.expect("unlock");
            nodes
        }

        async fn fail(&self, id: &str) {
            let mut r = self
                .store
                .get_request(id)
                .await
                .expect("read")
                .expect("request exists");
            r.value
                .declined_by
                .push("host-PoolWorker.cloud-main-x".into());
            r.value.set_state(RequestState::Failed, epoch_now());
            self.store
                .update_request(id, &r.value, r.version)
                .await
                .expect("fail");
        }
    }

    async fn actors(h: &dyn Harness) -> (Requestor, Launcher) {
        let requestor = Requestor::new(Store::new(h.client().await), SYSTEM);
        let launcher = Launcher {
            store: Store::new(h.client().await),
        };
        (requestor, launcher)
    }

    /// The request carries every field Zuul writes, and `requestor_data`
    /// (with Zuul's 128-bit trace ids) comes back byte for byte.
    pub async fn submit_writes_zuul_fields(h: &dyn Harness) {
        let (rq, launcher) = actors(h).await;
        let data = r#"{"build_set_uuid": "b1", "tenant_name": "t", "span_info": {"trace_id": 340282366920938463463374607431768211455, "span_id": 18446744073709551615, "start_time": 1700000000123456789}}"#;
        let mut new = NewRequest::new(vec!["small".into(), "small".into()]);
        new.priority = Precedence::High.prefix(true);
        new.relative_priority = 3;
        new.provider = Some("cloud".into());
        new.tenant_name = Some("t".into());
        new.event_id = Some("ev1".into());
        new.requestor_data = Some(Json::from_text(data).expect("json"));
        let id = rq.submit(&new).await.expect("submit");
        assert!(id.starts_with("099-"), "{id}");
        let (raw, stat) = launcher
            .store
            .backend()
            .get(&paths::request(&id))
            .await
            .expect("get")
            .expect("exists");
        assert_eq!(stat.ephemeral_owner, 0, "Zuul's requests are persistent");
        let v: serde_json::Value = serde_json::from_slice(&raw).expect("json");
        for key in [
            "state",
            "state_time",
            "event_id",
            "requestor",
            "requestor_data",
            "node_types",
            "provider",
            "created_time",
            "relative_priority",
            "tenant_name",
        ] {
            assert!(v.get(key).is_some(), "{key} missing in {v}");
        }
        assert_eq!(v["requestor"], SYSTEM);
        assert_eq!(v["state"], "requested");
        assert_eq!(v["event_id"], "ev1");
        assert_eq!(v["relative_priority"], 3);
        let text = String::from_utf8_lossy(&raw);
        assert!(
            text.contains("340282366920938463463374607431768211455"),
            "trace id kept exactly: {text}"
        );
        let got = launcher
            .store
            .get_request(&id)
            .await
            .expect("get")
            .expect("exists");
        assert_eq!(
            got.value.requestor_data.as_ref().map(Json::as_text),
            Some(data)
        );
        // Without data, `{}` is written (never null).
        let id2 = rq
            .submit(&NewRequest::new(vec!["x".into()]))
            .await
            .expect("submit");
        assert!(id2.starts_with("200-"), "{id2}");
        let got = launcher
            .store
            .get_request(&id2)
            .await
            .expect("get")
            .expect("exists");
        assert_eq!(
            got.value.requestor_data.map(|j| j.as_text().to_owned()),
            Some("{}".to_owned())
        );
        assert!(got.value.event_id.is_some_and(|e| e.len() == 32));
    }

    /// submit → fulfilled → accept (locks, request deleted) → in-use → used.
    pub async fn fulfilled_request_full_cycle(h: &dyn Harness) {
        let (rq, launcher) = actors(h).await;
        let id = rq
            .submit(&NewRequest::new(vec!["small".into(), "large".into()]))
            .await
            .expect("submit");
        let waiter = {
            let rq = rq.clone();
            let id = id.clone();
            tokio::spawn(async move { rq.wait(&id, LONG).await })
        };
        let nodes = launcher.fulfil(&id).await;
        let outcome = waiter.await.expect("task").expect("wait");
        let Outcome::Fulfilled(request) = outcome else {
            panic!("not fulfilled: {outcome:?}");
        };
        assert_eq!(request.value.nodes, nodes);
        let mut set = rq.accept(&id, &request.value).await.expect("accept");
        assert_eq!(
            set.nodes.iter().map(|n| n.id.clone()).collect::<Vec<_>>(),
            nodes
        );
        assert!(
            launcher
                .store
                .get_request(&id)
                .await
                .expect("get")
                .is_none(),
            "accept deletes the request"
        );
        for n in &nodes {
            assert!(launcher.store.is_node_locked(n).await.expect("locked?"));
            let r = launcher.store.lock_node(n, LockWait::NonBlocking).await;
            assert!(matches!(r, Err(StoreError::Locked { .. })), "{r:?}");
        }
        rq.use_nodes(&mut set, "review.example.org/org/project")
            .await
            .expect("use");
        for n in &nodes {
            let node = launcher
                .store
                .get_node(n)
                .await
                .expect("get")
                .expect("exists")
                .value;
            assert_eq!(node.state, NodeState::InUse);
            let ud: serde_json::Value = node.user_data.expect("user_data").decode().expect("json");
            assert_eq!(ud["zuul_system"], SYSTEM);
            assert_eq!(ud["project_name"], "review.example.org/org/project");
        }
        rq.return_nodes(set).await.expect("return");
        for n in &nodes {
            let node = launcher
                .store
                .get_node(n)
                .await
                .expect("get")
                .expect("exists")
                .value;
            assert_eq!(node.state, NodeState::Used);
            assert!(!launcher.store.is_node_locked(n).await.expect("locked?"));
        }
    }

    /// A failed request is reported as such; cancelling deletes it.
    pub async fn failed_request_is_reported_and_cancelled(h: &dyn Harness) {
        let (rq, launcher) = actors(h).await;
        let id = rq
            .submit(&NewRequest::new(vec!["nope".into()]))
            .await
            .expect("submit");
        launcher.fail(&id).await;
        let outcome = rq.wait(&id, LONG).await.expect("wait");
        let Outcome::Failed(r) = &outcome else {
            panic!("not failed: {outcome:?}");
        };
        let err = rq
            .accept(&id, &r.value)
            .await
            .expect_err("cannot accept a failed request");
        assert!(matches!(err, RequestorError::NotFulfilled { .. }), "{err}");
        rq.cancel(&id).await.expect("cancel");
        rq.cancel(&id).await.expect("cancel twice");
        assert!(
            launcher
                .store
                .get_request(&id)
                .await
                .expect("get")
                .is_none()
        );
    }

    /// A deadline gives `Timeout`; a deleted request gives `Gone`.
    pub async fn wait_times_out_and_notices_deletion(h: &dyn Harness) {
        let (rq, launcher) = actors(h).await;
        let id = rq
            .submit(&NewRequest::new(vec!["x".into()]))
            .await
            .expect("submit");
        let err = rq
            .wait(&id, Duration::from_millis(300))
            .await
            .expect_err("nobody fulfils it");
        assert!(matches!(err, RequestorError::Timeout { .. }), "{err}");
        let waiter = {
            let rq = rq.clone();
            let id = id.clone();
            tokio::spawn(async move { rq.wait(&id, LONG).await })
        };
        launcher.store.delete_request(&id).await.expect("delete");
        let err = waiter.await.expect("task").expect_err("deleted");
        assert!(matches!(err, RequestorError::Gone { .. }), "{err}");
    }

    /// A node allocated to another request fails the accept: nothing stays
    /// locked, and the request is deleted anyway (as Zuul does).
    pub async fn accept_rejects_nodes_of_other_requests(h: &dyn Harness) {
        let (rq, launcher) = actors(h).await;
        let id = rq
            .submit(&NewRequest::new(vec!["a".into(), "b".into()]))
            .await
            .expect("submit");
        let nodes = launcher.fulfil(&id).await;
        let mut stolen = launcher
            .store
            .get_node(&nodes[1])
            .await
            .expect("get")
            .expect("exists");
        stolen.value.allocated_to = Some("200-0000099999".into());
        launcher
            .store
            .update_node(&nodes[1], &stolen.value, stolen.version)
            .await
            .expect("reallocate");
        let Outcome::Fulfilled(r) = rq.wait(&id, LONG).await.expect("wait") else {
            panic!("not fulfilled");
        };
        let err = rq.accept(&id, &r.value).await.expect_err("foreign node");
        assert!(
            matches!(&err, RequestorError::BadNode { node, .. } if *node == nodes[1]),
            "{err}"
        );
        assert!(err.to_string().contains("200-0000099999"), "{err}");
        for n in &nodes {
            assert!(
                !launcher.store.is_node_locked(n).await.expect("locked?"),
                "{n} left locked"
            );
        }
        assert!(
            launcher
                .store
                .get_request(&id)
                .await
                .expect("get")
                .is_none()
        );
    }

    /// A node someone else keeps locked makes accept give up after the lock
    /// timeout, releasing what it had.
    pub async fn accept_gives_up_on_a_locked_node(h: &dyn Harness) {
        let (rq, launcher) = actors(h).await;
        let rq = rq.with_node_lock_timeout(Duration::from_millis(300));
        let id = rq
            .submit(&NewRequest::new(vec!["a".into(), "b".into()]))
            .await
            .expect("submit");
        let nodes = launcher.fulfil(&id).await;
        let guard = launcher
            .store
            .lock_node(&nodes[1], LockWait::NonBlocking)
            .await
            .expect("launcher keeps node 2 locked");
        let Outcome::Fulfilled(r) = rq.wait(&id, LONG).await.expect("wait") else {
            panic!("not fulfilled");
        };
        let err = rq.accept(&id, &r.value).await.expect_err("locked node");
        assert!(
            matches!(&err, RequestorError::Lock { node, source: StoreError::Timeout { .. }, .. } if *node == nodes[1]),
            "{err}"
        );
        assert!(
            !launcher
                .store
                .is_node_locked(&nodes[0])
                .await
                .expect("locked?")
        );
        assert!(
            launcher
                .store
                .get_request(&id)
                .await
                .expect("get")
                .is_none()
        );
        guard.release().await.expect("release");
    }

    /// Holding sets Zuul's hold fields and unlocks.
    pub async fn hold_marks_and_unlocks(h: &dyn Harness) {
        let (rq, launcher) = actors(h).await;
        let id = rq
            .submit(&NewRequest::new(vec!["a".into()]))
            .await
            .expect("submit");
        let nodes = launcher.fulfil(&id).await;
        let Outcome::Fulfilled(r) = rq.wait(&id, LONG).await.expect("wait") else {
            panic!("not fulfilled");
        };
        let mut set = rq.accept(&id, &r.value).await.expect("accept");
        rq.use_nodes(&mut set, "p").await.expect("use");
        let hold = Hold {
            job: "tenant org/project job refs/heads/main".into(),
            comment: "debug the flaky test".into(),
            expiration: Some(86_400),
        };
        rq.hold(set, &hold).await.expect("hold");
        let node = launcher
            .store
            .get_node(&nodes[0])
            .await
            .expect("get")
            .expect("exists")
            .value;
        assert_eq!(node.state, NodeState::Hold);
        assert_eq!(node.hold_job.as_deref(), Some(hold.job.as_str()));
        assert_eq!(node.comment.as_deref(), Some(hold.comment.as_str()));
        assert_eq!(node.hold_expiration, Some(86_400));
        assert!(
            !launcher
                .store
                .is_node_locked(&nodes[0])
                .await
                .expect("locked?")
        );
        // returning unused nodes only unlocks them: they stay ready
        let id = rq
            .submit(&NewRequest::new(vec!["b".into()]))
            .await
            .expect("submit");
        let nodes = launcher.fulfil(&id).await;
        let Outcome::Fulfilled(r) = rq.wait(&id, LONG).await.expect("wait") else {
            panic!("not fulfilled");
        };
        let set = rq.accept(&id, &r.value).await.expect("accept");
        rq.return_nodes(set).await.expect("return");
        let node = launcher
            .store
            .get_node(&nodes[0])
            .await
            .expect("get")
            .expect("exists")
            .value;
        assert_eq!(node.state, NodeState::Ready);
        assert_eq!(node.allocated_to.as_deref(), Some(id.as_str()));
    }

    /// Revising takes the request lock without waiting; a launcher holding
    /// it makes the revision a silent no-op.
    pub async fn revise_priority_only_when_unlocked(h: &dyn Harness) {
        let (rq, launcher) = actors(h).await;
        let id = rq
            .submit(&NewRequest::new(vec!["a".into()]))
            .await
            .expect("submit");
        assert!(rq.revise_priority(&id, 5).await.expect("revise"));
        let got = launcher
            .store
            .get_request(&id)
            .await
            .expect("get")
            .expect("exists");
        assert_eq!(got.value.relative_priority, 5);
        let guard = launcher
            .store
            .lock_request(&id, LockWait::NonBlocking)
            .await
            .expect("launcher locks");
        assert!(!rq.revise_priority(&id, 9).await.expect("revise"));
        let got = launcher
            .store
            .get_request(&id)
            .await
            .expect("get")
            .expect("exists");
        assert_eq!(got.value.relative_priority, 5, "unchanged while locked");
        guard.release().await.expect("release");
        assert!(
            !rq.revise_priority("200-0000099999", 1)
                .await
                .expect("missing request")
        );
    }
}

#[cfg(all(test, feature = "testing"))]
mod tests {
    use std::sync::Arc;

    use async_trait::async_trait;

    use crate::store::StateStore;
    use crate::testing::MemoryStore;
    use crate::testing::conformance::store::Harness;

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

    crate::requestor_tests!(Memory(MemoryStore::new()));

    #[test]
    fn precedence_prefixes_are_zuuls() {
        use super::Precedence;
        assert_eq!(Precedence::High.prefix(false), "100");
        assert_eq!(Precedence::Normal.prefix(false), "200");
        assert_eq!(Precedence::Normal.prefix(true), "199");
        assert_eq!(Precedence::Low.prefix(false), "300");
    }
}
