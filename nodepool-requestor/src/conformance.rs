//! The requestor's test bodies (feature `conformance`), run against every
//! store like the `StateStore` conformance suite: memory in this crate's
//! tests, SQLite in `nodepool-sqlite`'s, ZooKeeper in
//! `nodepool-zookeeper`'s. A store's tests give a
//! [`Harness`] (independent clients on one fresh store) to
//! [`requestor_tests!`](crate::requestor_tests).

use std::time::Duration;

pub use nodepool_model::conformance::store::Harness;
use nodepool_model::model::{Json, Node, NodeState, RequestState, epoch_now};
use nodepool_model::store::{LockWait, Store, StoreError, paths};

use crate::{Hold, NewRequest, Outcome, Precedence, Requestor, RequestorError};

/// Generates one `#[tokio::test]` per requestor test for a harness
/// expression (evaluated inside each async test, so it may `.await`), as
/// `nodepool_model::store_conformance_tests!` does for the store suite.
/// The calling crate needs `tokio` with the `macros` and `rt-multi-thread`
/// features.
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
                $crate::conformance::$name(&harness).await;
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
