//! The `StateStore` conformance suite.
//!
//! Each function is one test body. A backend runs them all with
//! [`store_conformance_tests!`](crate::store_conformance_tests), giving a
//! [`Harness`] that makes independent clients on one fresh store.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use crate::model::{
    BuildState, Component, ComponentKind, ImageBuild, ImageUpload, Node, NodeRequest, NodeState,
    RequestState, UploadState,
};
use crate::store::{CreateMode, LockWait, StateStore, Store, StoreError, StoreEvent, paths};

/// Makes clients of one fresh store.
#[async_trait]
pub trait Harness: Send + Sync {
    /// A new client with its own session on the same store.
    async fn client(&self) -> Arc<dyn StateStore>;

    /// Ends the client's session the way a crashed process's ends (expiry,
    /// not a clean close): its ephemeral records and locks must vanish.
    async fn expire(&self, client: &Arc<dyn StateStore>);
}

/// Generates one `#[tokio::test]` per conformance test for a harness
/// expression (evaluated inside each async test, so it may `.await`).
#[macro_export]
macro_rules! store_conformance_tests {
    ($harness:expr) => {
        $crate::store_conformance_tests!(@each $harness;
            crud_and_versions,
            create_makes_parents_and_rejects_duplicates,
            sequential_ids_increase_per_parent,
            delete_checks_version_and_children,
            children_and_scan_are_sorted,
            delete_tree_removes_everything,
            typed_records_round_trip,
            stale_typed_writes_conflict,
            malformed_records_are_skipped,
            listing_shows_node_locks,
            listings_together_match_each_listing,
            accepting_creates_nodes_in_the_same_transaction,
            lock_excludes_other_clients,
            lock_nonblocking_and_timeout,
            lock_waiter_gets_it_after_release,
            locks_released_on_close,
            locks_released_on_expiry,
            ephemerals_vanish_with_session,
            watches_deliver_create_change_delete,
            requests_use_priority_prefixes,
            image_flags_and_components
        );
    };
    (@each $harness:expr; $($name:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                let harness = $harness;
                $crate::conformance::store::$name(&harness).await;
            }
        )*
    };
}

fn node(state: NodeState, label: &str) -> Node {
    Node::new(state, 1_700_000_000.5, "prov", "main", vec![label.into()])
}

/// get/set with versions; stale versions conflict; missing records.
pub async fn crud_and_versions(h: &dyn Harness) {
    let c = h.client().await;
    assert_eq!(c.get("/nodepool/x/t/a").await.expect("get"), None);
    let p = c
        .create("/nodepool/x/t/a", b"one", CreateMode::Persistent)
        .await
        .expect("create");
    assert_eq!(p, "/nodepool/x/t/a");
    let (data, stat) = c
        .get("/nodepool/x/t/a")
        .await
        .expect("get")
        .expect("exists");
    assert_eq!(&data[..], b"one");
    assert_eq!(stat.version, 0);
    assert_eq!(stat.ephemeral_owner, 0);
    let s1 = c
        .set("/nodepool/x/t/a", b"two", Some(0))
        .await
        .expect("set at version 0");
    assert_eq!(s1.version, 1);
    assert!(s1.mzxid > stat.mzxid, "mzxid increases on change");
    let stale = c.set("/nodepool/x/t/a", b"three", Some(0)).await;
    assert!(
        matches!(stale, Err(StoreError::Conflict { .. })),
        "{stale:?}"
    );
    assert_eq!(
        &c.get("/nodepool/x/t/a")
            .await
            .expect("get")
            .expect("exists")
            .0[..],
        b"two"
    );
    c.set("/nodepool/x/t/a", b"four", None)
        .await
        .expect("unconditional set");
    let missing = c.set("/nodepool/x/t/missing", b"x", None).await;
    assert!(
        matches!(missing, Err(StoreError::NotFound { .. })),
        "{missing:?}"
    );
    // an empty record is allowed
    c.create("/nodepool/x/t/empty", b"", CreateMode::Persistent)
        .await
        .expect("create");
    assert!(
        c.get("/nodepool/x/t/empty")
            .await
            .expect("get")
            .expect("exists")
            .0
            .is_empty()
    );
}

/// Missing parents are created; an existing path conflicts.
pub async fn create_makes_parents_and_rejects_duplicates(h: &dyn Harness) {
    let c = h.client().await;
    c.create(
        "/nodepool/x/deep/er/still/leaf",
        b"x",
        CreateMode::Persistent,
    )
    .await
    .expect("create with parents");
    let (parent, stat) = c
        .get("/nodepool/x/deep/er")
        .await
        .expect("get")
        .expect("parent exists");
    assert!(parent.is_empty());
    assert_eq!(stat.ephemeral_owner, 0);
    let dup = c
        .create(
            "/nodepool/x/deep/er/still/leaf",
            b"y",
            CreateMode::Persistent,
        )
        .await;
    assert!(matches!(dup, Err(StoreError::Conflict { .. })), "{dup:?}");
}

/// Sequential names get 10 digits, increasing per parent, after any prefix.
pub async fn sequential_ids_increase_per_parent(h: &dyn Harness) {
    let c = h.client().await;
    let mut last = String::new();
    for _ in 0..5 {
        let p = c
            .create(
                "/nodepool/x/seq/items/",
                b"",
                CreateMode::PersistentSequential,
            )
            .await
            .expect("create");
        let name = p.rsplit('/').next().expect("name").to_owned();
        assert_eq!(name.len(), 10, "{p}");
        assert!(name.bytes().all(|b| b.is_ascii_digit()), "{p}");
        assert!(name > last, "{name} after {last}");
        last = name;
    }
    let a = c
        .create(
            "/nodepool/x/seq/items/200-",
            b"",
            CreateMode::PersistentSequential,
        )
        .await
        .expect("create");
    let b = c
        .create(
            "/nodepool/x/seq/items/100-",
            b"",
            CreateMode::PersistentSequential,
        )
        .await
        .expect("create");
    let seq = |p: &str| p[p.len() - 10..].to_owned();
    assert!(a.starts_with("/nodepool/x/seq/items/200-"), "{a}");
    assert!(
        seq(&b) > seq(&a),
        "the counter is per parent, not per prefix"
    );
    assert!(seq(&a) > last);
    // another parent has its own counter
    let other = c
        .create(
            "/nodepool/x/seq/other/",
            b"",
            CreateMode::PersistentSequential,
        )
        .await
        .expect("create");
    assert!(other.ends_with("0000000000"), "{other}");
}

/// Deletes honour versions and refuse records with children.
pub async fn delete_checks_version_and_children(h: &dyn Harness) {
    let c = h.client().await;
    c.create("/nodepool/x/d/a/child", b"", CreateMode::Persistent)
        .await
        .expect("create");
    let r = c.delete("/nodepool/x/d/a", None).await;
    assert!(matches!(r, Err(StoreError::NotEmpty { .. })), "{r:?}");
    c.set("/nodepool/x/d/a/child", b"v1", None)
        .await
        .expect("set");
    let r = c.delete("/nodepool/x/d/a/child", Some(0)).await;
    assert!(matches!(r, Err(StoreError::Conflict { .. })), "{r:?}");
    c.delete("/nodepool/x/d/a/child", Some(1))
        .await
        .expect("delete at version");
    c.delete("/nodepool/x/d/a", None).await.expect("now empty");
    let r = c.delete("/nodepool/x/d/a", None).await;
    assert!(matches!(r, Err(StoreError::NotFound { .. })), "{r:?}");
}

/// `children` lists names, sorted; `scan` lists the subtree, sorted by path.
pub async fn children_and_scan_are_sorted(h: &dyn Harness) {
    let c = h.client().await;
    for p in [
        "/nodepool/x/s/b",
        "/nodepool/x/s/a/x",
        "/nodepool/x/s/c",
        "/nodepool/x/s/a/y/z",
        "/nodepool/x/sx/not-below",
    ] {
        c.create(p, p.as_bytes(), CreateMode::Persistent)
            .await
            .expect("create");
    }
    assert_eq!(
        c.children("/nodepool/x/s").await.expect("children"),
        ["a", "b", "c"]
    );
    assert_eq!(
        c.children("/nodepool/x/s/b").await.expect("children"),
        Vec::<String>::new()
    );
    let missing = c.children("/nodepool/x/nope").await;
    assert!(
        matches!(missing, Err(StoreError::NotFound { .. })),
        "{missing:?}"
    );
    let paths: Vec<String> = c
        .scan("/nodepool/x/s")
        .await
        .expect("scan")
        .into_iter()
        .map(|e| e.path)
        .collect();
    assert_eq!(
        paths,
        [
            "/nodepool/x/s",
            "/nodepool/x/s/a",
            "/nodepool/x/s/a/x",
            "/nodepool/x/s/a/y",
            "/nodepool/x/s/a/y/z",
            "/nodepool/x/s/b",
            "/nodepool/x/s/c"
        ]
    );
    let entries = c.scan("/nodepool/x/s/a/y").await.expect("scan");
    assert_eq!(entries.len(), 2);
    assert_eq!(&entries[1].data[..], b"/nodepool/x/s/a/y/z");
    assert!(c.scan("/nodepool/x/absent").await.expect("scan").is_empty());
}

/// `delete_tree` removes a record and all descendants.
pub async fn delete_tree_removes_everything(h: &dyn Harness) {
    let c = h.client().await;
    for p in [
        "/nodepool/x/tree/n/lock/x",
        "/nodepool/x/tree/n/a",
        "/nodepool/x/tree/n/a/b",
        "/nodepool/x/tree/keep",
    ] {
        c.create(p, b"", CreateMode::Persistent)
            .await
            .expect("create");
    }
    c.delete_tree("/nodepool/x/tree/n")
        .await
        .expect("delete tree");
    assert_eq!(c.get("/nodepool/x/tree/n").await.expect("get"), None);
    assert!(c.get("/nodepool/x/tree/keep").await.expect("get").is_some());
    c.delete_tree("/nodepool/x/tree/n")
        .await
        .expect("deleting a missing tree is fine");
}

/// Every typed record type survives create → get → update → list.
pub async fn typed_records_round_trip(h: &dyn Harness) {
    let store = Store::new(h.client().await);
    // nodes
    let n = node(NodeState::Init, "small");
    let id = store.create_node(&n).await.expect("create node");
    assert_eq!(id.len(), 10);
    let got = store.get_node(&id).await.expect("get").expect("exists");
    assert_eq!(got.value, n);
    let mut ready = got.value.clone();
    ready.set_state(NodeState::Ready, 1_700_000_001.0);
    let v = store
        .update_node(&id, &ready, got.version)
        .await
        .expect("update");
    assert_eq!(v, got.version + 1);
    let listed = store.list_nodes().await.expect("list");
    assert_eq!(listed.records.len(), 1);
    assert_eq!(*listed.records[0].node, ready);
    assert_eq!(listed.records[0].version, v);
    assert!(!listed.records[0].locked);
    store.delete_node(&id).await.expect("delete");
    assert!(store.get_node(&id).await.expect("get").is_none());
    assert!(store.list_nodes().await.expect("list").records.is_empty());

    // requests
    let r = NodeRequest::new(
        vec!["small".into(), "small".into()],
        "zuul",
        1_700_000_000.0,
    );
    let rid = store
        .submit_request(&r, "200", false)
        .await
        .expect("submit");
    assert!(rid.starts_with("200-"), "{rid}");
    let got = store.get_request(&rid).await.expect("get").expect("exists");
    assert_eq!(got.value, r);
    let mut pending = got.value.clone();
    pending.set_state(RequestState::Pending, 1_700_000_002.0);
    store
        .update_request(&rid, &pending, got.version)
        .await
        .expect("update");
    let listed = store.list_requests().await.expect("list");
    assert_eq!(listed.records.len(), 1);
    assert_eq!(listed.records[0].request.state, RequestState::Pending);
    assert!(!listed.records[0].ephemeral);
    store.delete_request(&rid).await.expect("delete");
    store
        .delete_request(&rid)
        .await
        .expect("deleting twice is fine");

    // builds and uploads
    let b = ImageBuild::new(1_700_000_000.0, vec!["qcow2".into(), "raw".into()]);
    store
        .create_build("jammy", "abc123", &b)
        .await
        .expect("create build");
    let u = ImageUpload::new(1_700_000_000.0, Some("qcow2".into()));
    let uid = store
        .create_upload("jammy", "abc123", "cloud1", &u)
        .await
        .expect("create upload");
    assert_eq!(uid.len(), 10);
    let uid2 = store
        .create_upload("jammy", "abc123", "cloud1", &u)
        .await
        .expect("create upload");
    assert!(uid2 > uid);
    let mut ready_upload = u.clone();
    ready_upload.set_state(UploadState::Ready, 1_700_000_003.0);
    ready_upload.external_id = Some("img-1".into());
    store
        .update_upload("jammy", "abc123", "cloud1", &uid, &ready_upload, Some(0))
        .await
        .expect("update upload");
    let st = store.image_state().await.expect("images");
    assert_eq!(st.builds.len(), 1);
    assert_eq!(st.builds[0].build.formats, ["qcow2", "raw"]);
    assert_eq!(st.builds[0].image, "jammy");
    assert_eq!(st.uploads.len(), 2);
    let first = st
        .uploads
        .iter()
        .find(|x| x.id == uid)
        .expect("first upload");
    assert_eq!(first.upload.state, UploadState::Ready);
    assert_eq!(first.provider, "cloud1");
    assert_eq!(first.build_id, "abc123");
    let mut done = b.clone();
    done.set_state(BuildState::Ready, 1_700_000_004.0);
    store
        .update_build("jammy", "abc123", &done, Some(0))
        .await
        .expect("update build");
    assert_eq!(
        store
            .get_build("jammy", "abc123")
            .await
            .expect("get")
            .expect("exists")
            .value
            .state,
        BuildState::Ready
    );
    store
        .delete_build("jammy", "abc123")
        .await
        .expect("delete build");
    let st = store.image_state().await.expect("images");
    assert!(st.builds.is_empty() && st.uploads.is_empty());
}

/// Typed writes with a stale version are conflicts.
pub async fn stale_typed_writes_conflict(h: &dyn Harness) {
    let a = Store::new(h.client().await);
    let b = Store::new(h.client().await);
    let id = a
        .create_node(&node(NodeState::Ready, "x"))
        .await
        .expect("create");
    let va = a.get_node(&id).await.expect("get").expect("exists");
    let vb = b.get_node(&id).await.expect("get").expect("exists");
    let mut na = va.value.clone();
    na.comment = Some("a".into());
    a.update_node(&id, &na, va.version)
        .await
        .expect("first writer wins");
    let mut nb = vb.value.clone();
    nb.comment = Some("b".into());
    let r = b.update_node(&id, &nb, vb.version).await;
    assert!(matches!(r, Err(StoreError::Conflict { .. })), "{r:?}");
    let rid = a
        .submit_request(&NodeRequest::new(vec!["x".into()], "z", 1.0), "100", false)
        .await
        .expect("submit");
    let r = b
        .update_request(&rid, &NodeRequest::new(vec![], "z", 1.0), 7)
        .await;
    assert!(matches!(r, Err(StoreError::Conflict { .. })), "{r:?}");
}

/// Malformed records are reported per record and skipped, never fatal.
pub async fn malformed_records_are_skipped(h: &dyn Harness) {
    let c = h.client().await;
    let store = Store::new(c.clone());
    let good = store
        .create_node(&node(NodeState::Ready, "x"))
        .await
        .expect("create");
    c.create(
        &paths::node("0000009998"),
        b"{not json",
        CreateMode::Persistent,
    )
    .await
    .expect("create");
    c.create(
        &paths::node("0000009999"),
        br#"{"state": "exploded"}"#,
        CreateMode::Persistent,
    )
    .await
    .expect("create");
    c.create(&paths::node("0000009997"), b"", CreateMode::Persistent)
        .await
        .expect("create");
    let listed = store.list_nodes().await.expect("listing succeeds");
    assert_eq!(listed.records.len(), 1);
    assert_eq!(listed.records[0].id, good);
    assert_eq!(listed.malformed.len(), 3);
    let r = store.get_node("0000009998").await;
    assert!(matches!(r, Err(StoreError::Malformed { .. })), "{r:?}");
    c.create(
        &paths::request("100-0000000001"),
        b"[]",
        CreateMode::Persistent,
    )
    .await
    .expect("create");
    let listed = store.list_requests().await.expect("listing succeeds");
    assert!(listed.records.is_empty());
    assert_eq!(listed.malformed.len(), 1);
    c.create(&paths::build("img", "b1"), b"nope", CreateMode::Persistent)
        .await
        .expect("create");
    // A readable build with an unreadable upload is unreadable as a whole.
    store
        .create_build("img", "b2", &ImageBuild::new(1.0, vec!["qcow2".into()]))
        .await
        .expect("create");
    c.create(
        &paths::upload("img", "b2", "p1", "0000000001"),
        b"{",
        CreateMode::Persistent,
    )
    .await
    .expect("create");
    let st = store.image_state().await.expect("image listing succeeds");
    assert_eq!(st.builds.len(), 1);
    assert!(st.uploads.is_empty());
    assert_eq!(st.malformed.len(), 2);
    let unreadable: Vec<(&str, &str)> = st
        .unreadable_builds
        .iter()
        .map(|(i, b)| (i.as_str(), b.as_str()))
        .collect();
    assert_eq!(unreadable, [("img", "b1"), ("img", "b2")]);
}

/// Listings show whether a node's lock has a contender.
pub async fn listing_shows_node_locks(h: &dyn Harness) {
    let store = Store::new(h.client().await);
    let id = store
        .create_node(&node(NodeState::Ready, "x"))
        .await
        .expect("create");
    let guard = store
        .lock_node(&id, LockWait::NonBlocking)
        .await
        .expect("lock");
    let contender = guard
        .contender()
        .rsplit('/')
        .next()
        .expect("name")
        .to_owned();
    assert!(
        crate::store::paths::lock_contender_sequence(&contender).is_some(),
        "kazoo-style contender name: {contender}"
    );
    assert_eq!(
        contender.find("__lock__"),
        Some(32),
        "uuid4 hex prefix: {contender}"
    );
    assert!(store.list_nodes().await.expect("list").records[0].locked);
    assert!(store.is_node_locked(&id).await.expect("is locked"));
    guard.release().await.expect("release");
    assert!(!store.list_nodes().await.expect("list").records[0].locked);
}

/// `scan_together` gives each prefix's scan, in order, and the planning
/// pass's `listings` (read through it) match the listings read one by one:
/// lock states, pools and images included.
pub async fn listings_together_match_each_listing(h: &dyn Harness) {
    let client = h.client().await;
    let store = Store::new(client.clone());
    let locked_node = store
        .create_node(&node(NodeState::Ready, "x"))
        .await
        .expect("create");
    store
        .create_node(&node(NodeState::Building, "y"))
        .await
        .expect("create");
    let request = NodeRequest::new(vec!["x".into()], "zuul", 1_700_000_000.0);
    let locked_request = store
        .submit_request(&request, "200", false)
        .await
        .expect("submit");
    store
        .submit_request(&request, "100", false)
        .await
        .expect("submit");
    let _node_lock = store
        .lock_node(&locked_node, LockWait::NonBlocking)
        .await
        .expect("lock node");
    let _request_lock = store
        .lock_request(&locked_request, LockWait::NonBlocking)
        .await
        .expect("lock request");
    let pool = Component::pool(
        "host",
        "1.0",
        "host-p-main",
        "p",
        "main",
        vec!["x".into()],
        9,
    );
    store.register_component(&pool).await.expect("register");
    store.set_image_paused("jammy", true).await.expect("pause");

    let prefixes = [paths::NODES, paths::REQUESTS, "/nodepool/absent"];
    let together = client.scan_together(&prefixes).await.expect("together");
    assert_eq!(together.len(), 3);
    for (prefix, scan) in prefixes.iter().zip(&together) {
        let alone = client.scan(prefix).await.expect("scan");
        let paths =
            |s: &[crate::store::Entry]| s.iter().map(|e| e.path.clone()).collect::<Vec<_>>();
        assert_eq!(paths(scan), paths(&alone), "{prefix}");
    }
    assert!(together[2].is_empty());

    let all = store.listings().await.expect("listings");
    let nodes: Vec<(String, bool)> = all
        .nodes
        .records
        .iter()
        .map(|r| (r.id.clone(), r.locked))
        .collect();
    let one: Vec<(String, bool)> = store
        .list_nodes()
        .await
        .expect("nodes")
        .records
        .iter()
        .map(|r| (r.id.clone(), r.locked))
        .collect();
    assert_eq!(nodes, one);
    assert_eq!(nodes.iter().filter(|(_, l)| *l).count(), 1, "{nodes:?}");
    let requests: Vec<(String, bool)> = all
        .requests
        .records
        .iter()
        .map(|r| (r.id.clone(), r.locked))
        .collect();
    assert_eq!(
        requests,
        [
            ("100-0000000001".to_owned(), false),
            (locked_request.clone(), true)
        ]
    );
    assert_eq!(all.request_lock_dirs.len(), 1);
    assert_eq!(all.request_lock_dirs[0].id, locked_request);
    assert!(all.request_lock_dirs[0].locked);
    assert_eq!(all.pools.records.len(), 1);
    assert!(all.images.paused.contains("jammy"));
}

/// A request is locked, written `pending` and given new `init` nodes in one
/// transaction (`Store::lock_new_write_and_create_nodes`), all or nothing:
/// at a stale version nothing is locked or created. A store without
/// transactions does nothing and says so (`Ok(None)`).
pub async fn accepting_creates_nodes_in_the_same_transaction(h: &dyn Harness) {
    use crate::store::RecordKey;
    let client = h.client().await;
    let other = Store::new(h.client().await);
    let store = Store::new(client.clone());
    let request = NodeRequest::new(vec!["x".into(), "y".into()], "zuul", 1_700_000_000.0);
    let id = store
        .submit_request(&request, "200", false)
        .await
        .expect("submit");
    let at = store
        .get_request(&id)
        .await
        .expect("get")
        .expect("exists")
        .version;
    let mut pending = request.clone();
    pending.set_state(RequestState::Pending, 1_700_000_001.0);
    let new_nodes = [node(NodeState::Init, "x"), node(NodeState::Init, "y")];
    let key = RecordKey::request(&id);
    let dir = paths::request_lock(&id);
    let stale = store
        .lock_new_write_and_create_nodes(&dir, &key, &pending, Some(at + 7), &new_nodes)
        .await;
    assert!(
        matches!(stale, Err(StoreError::Conflict { .. }) | Ok(None)),
        "{stale:?}"
    );
    assert!(store.list_nodes().await.expect("list").records.is_empty());
    let guard = other
        .lock_request(&id, LockWait::NonBlocking)
        .await
        .expect("nothing holds the request after a refused transaction");
    guard.release().await.expect("release");
    // The lock directory exists now (the other client's lock made it), so
    // a second request is accepted on a fresh one.
    let id = store
        .submit_request(&request, "200", false)
        .await
        .expect("submit");
    let key = RecordKey::request(&id);
    let dir = paths::request_lock(&id);
    let Some((guard, version, ids)) = store
        .lock_new_write_and_create_nodes(&dir, &key, &pending, Some(at), &new_nodes)
        .await
        .expect("accept")
    else {
        // No transactions: nothing was done.
        assert!(store.list_nodes().await.expect("list").records.is_empty());
        assert_eq!(
            store
                .get_request(&id)
                .await
                .expect("get")
                .map(|r| r.value.state),
            Some(RequestState::Requested)
        );
        return;
    };
    assert_eq!(version, at + 1);
    let read = store.get_request(&id).await.expect("get").expect("exists");
    assert_eq!(read.value.state, RequestState::Pending);
    assert_eq!(read.version, version);
    assert_eq!(ids.len(), 2);
    for (made, want) in ids.iter().zip(&new_nodes) {
        let got = store.get_node(made).await.expect("get").expect("created");
        assert_eq!(&got.value, want);
        assert_eq!(got.version, 0);
    }
    assert!(ids[0] < ids[1], "sequential ids in order: {ids:?}");
    let r = other.lock_request(&id, LockWait::NonBlocking).await;
    assert!(r.is_err(), "the accepting client holds the request");
    guard.release().await.expect("release");
}

/// A lock held by one client cannot be taken by another.
pub async fn lock_excludes_other_clients(h: &dyn Harness) {
    let a = Store::new(h.client().await);
    let b = Store::new(h.client().await);
    let guard = a
        .lock("/nodepool/x/locks/x", LockWait::NonBlocking)
        .await
        .expect("a locks");
    assert!(guard.is_held());
    let r = b.lock("/nodepool/x/locks/x", LockWait::NonBlocking).await;
    assert!(matches!(r, Err(StoreError::Locked { .. })), "{r:?}");
    // the failed attempt left no contender behind
    let children = b
        .backend()
        .children("/nodepool/x/locks/x")
        .await
        .expect("children");
    assert_eq!(children.len(), 1, "{children:?}");
    guard.release().await.expect("release");
    let g2 = b
        .lock("/nodepool/x/locks/x", LockWait::NonBlocking)
        .await
        .expect("b locks after release");
    g2.release().await.expect("release");
}

/// Non-blocking fails at once; a timeout gives up and cleans up.
pub async fn lock_nonblocking_and_timeout(h: &dyn Harness) {
    let a = Store::new(h.client().await);
    let b = Store::new(h.client().await);
    let _guard = a
        .lock("/nodepool/x/locks/t", LockWait::NonBlocking)
        .await
        .expect("a locks");
    let r = b
        .lock(
            "/nodepool/x/locks/t",
            LockWait::Timeout(Duration::from_millis(300)),
        )
        .await;
    assert!(matches!(r, Err(StoreError::Timeout { .. })), "{r:?}");
    let children = b
        .backend()
        .children("/nodepool/x/locks/t")
        .await
        .expect("children");
    assert_eq!(
        children.len(),
        1,
        "timed-out waiter removed its contender: {children:?}"
    );
}

/// A blocked waiter acquires the lock once the holder releases it.
pub async fn lock_waiter_gets_it_after_release(h: &dyn Harness) {
    let a = Store::new(h.client().await);
    let b = Store::new(h.client().await);
    let guard = a
        .lock("/nodepool/x/locks/w", LockWait::NonBlocking)
        .await
        .expect("a locks");
    let waiter = tokio::spawn(async move {
        b.lock(
            "/nodepool/x/locks/w",
            LockWait::Timeout(Duration::from_secs(20)),
        )
        .await
        .map(|g| g.is_held())
    });
    // The waiter queues behind us: wait until its contender shows up.
    let probe = h.client().await;
    let mut queued = false;
    for _ in 0..200 {
        if probe
            .children("/nodepool/x/locks/w")
            .await
            .expect("children")
            .len()
            == 2
        {
            queued = true;
            break;
        }
        tokio::task::yield_now().await;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(queued, "waiter never queued");
    assert!(!waiter.is_finished(), "waiter must not get a held lock");
    guard.release().await.expect("release");
    let held = tokio::time::timeout(Duration::from_secs(20), waiter)
        .await
        .expect("waiter finishes")
        .expect("task")
        .expect("waiter acquires");
    assert!(held);
}

/// Closing a session releases its locks.
pub async fn locks_released_on_close(h: &dyn Harness) {
    let a = h.client().await;
    let b = Store::new(h.client().await);
    let guard = Store::new(a.clone())
        .lock("/nodepool/x/locks/c", LockWait::NonBlocking)
        .await
        .expect("a locks");
    a.close().await.expect("close");
    assert!(!guard.is_held());
    guard.forget();
    let g = b
        .lock(
            "/nodepool/x/locks/c",
            LockWait::Timeout(Duration::from_secs(20)),
        )
        .await
        .expect("b locks after a's session ended");
    g.release().await.expect("release");
}

/// Session expiry (a crashed holder) releases its locks.
pub async fn locks_released_on_expiry(h: &dyn Harness) {
    let a = h.client().await;
    let b = Store::new(h.client().await);
    let guard = Store::new(a.clone())
        .lock("/nodepool/x/locks/e", LockWait::NonBlocking)
        .await
        .expect("a locks");
    h.expire(&a).await;
    assert!(!guard.is_held(), "a lock of an expired session is not held");
    guard.forget();
    let g = b
        .lock(
            "/nodepool/x/locks/e",
            LockWait::Timeout(Duration::from_secs(30)),
        )
        .await
        .expect("b locks after a's session expired");
    g.release().await.expect("release");
}

/// Ephemeral records go with their session; persistent ones stay.
pub async fn ephemerals_vanish_with_session(h: &dyn Harness) {
    let a = h.client().await;
    let b = h.client().await;
    let e = a
        .create("/nodepool/x/eph/one", b"x", CreateMode::Ephemeral)
        .await
        .expect("create");
    let s = a
        .create(
            "/nodepool/x/eph/seq-",
            b"x",
            CreateMode::EphemeralSequential,
        )
        .await
        .expect("create");
    a.create("/nodepool/x/eph/kept", b"x", CreateMode::Persistent)
        .await
        .expect("create");
    let (_, stat) = b.get(&e).await.expect("get").expect("visible to others");
    assert_ne!(stat.ephemeral_owner, 0);
    a.close().await.expect("close");
    assert_eq!(b.get(&e).await.expect("get"), None);
    assert_eq!(b.get(&s).await.expect("get"), None);
    assert!(b.get("/nodepool/x/eph/kept").await.expect("get").is_some());
    let c = h.client().await;
    c.create("/nodepool/x/eph/two", b"x", CreateMode::Ephemeral)
        .await
        .expect("create");
    h.expire(&c).await;
    assert_eq!(b.get("/nodepool/x/eph/two").await.expect("get"), None);
}

/// Subscribers see creations, changes and deletions (also of other clients).
pub async fn watches_deliver_create_change_delete(h: &dyn Harness) {
    let watcher = h.client().await;
    let writer = h.client().await;
    let mut events = watcher.subscribe();
    writer
        .create("/nodepool/x/w/x", b"1", CreateMode::Persistent)
        .await
        .expect("create");
    writer
        .set("/nodepool/x/w/x", b"2", None)
        .await
        .expect("set");
    writer
        .delete("/nodepool/x/w/x", None)
        .await
        .expect("delete");
    let mut seen = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !seen.contains(&StoreEvent::Deleted("/nodepool/x/w/x".into())) {
        match tokio::time::timeout_at(deadline, events.recv()).await {
            Ok(Ok(e)) if e.path().starts_with("/nodepool/x/w") => seen.push(e),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => panic!("watch failed: {e}"),
            Err(_) => panic!("no delete event; saw {seen:?}"),
        }
    }
    let pos = |e: &StoreEvent| seen.iter().position(|x| x == e);
    let created = pos(&StoreEvent::Created("/nodepool/x/w/x".into())).expect("created event");
    let changed = pos(&StoreEvent::Changed("/nodepool/x/w/x".into())).expect("changed event");
    let deleted = pos(&StoreEvent::Deleted("/nodepool/x/w/x".into())).expect("deleted event");
    assert!(created < changed && changed < deleted, "{seen:?}");
}

/// Requests are `<prio>-<seq>`; min-ready ones are ephemeral.
pub async fn requests_use_priority_prefixes(h: &dyn Harness) {
    let a = h.client().await;
    let store = Store::new(a.clone());
    let other = Store::new(h.client().await);
    let r = NodeRequest::new(vec!["x".into()], "zuul", 1.0);
    let high = store
        .submit_request(&r, "100", false)
        .await
        .expect("submit");
    let min_ready = store.submit_request(&r, "900", true).await.expect("submit");
    assert!(high.starts_with("100-") && min_ready.starts_with("900-"));
    assert!(min_ready[4..] > high[4..], "one sequence across priorities");
    let listed = other.list_requests().await.expect("list");
    let eph: Vec<bool> = listed.records.iter().map(|r| r.ephemeral).collect();
    assert_eq!(eph, [false, true]);
    a.close().await.expect("close");
    let listed = other.list_requests().await.expect("list");
    assert_eq!(
        listed.records.len(),
        1,
        "ephemeral min-ready request went with its session"
    );
}

/// Pause flags, build requests and component registrations.
pub async fn image_flags_and_components(h: &dyn Harness) {
    let a = h.client().await;
    let store = Store::new(a.clone());
    let other = Store::new(h.client().await);
    store.set_image_paused("jammy", true).await.expect("pause");
    store
        .set_image_paused("jammy", true)
        .await
        .expect("pausing twice is fine");
    store.request_image_build("focal").await.expect("request");
    let st = other.image_state().await.expect("images");
    assert!(st.paused.contains("jammy"));
    assert!(st.build_requests.contains_key("focal"));
    store
        .set_image_paused("jammy", false)
        .await
        .expect("unpause");
    store
        .clear_image_build_request("focal")
        .await
        .expect("clear");
    let st = other.image_state().await.expect("images");
    assert!(st.paused.is_empty() && st.build_requests.is_empty());

    let mut c = Component::pool(
        "host",
        "1.0",
        "host-PoolWorker.p-main-abc",
        "p",
        "main",
        vec!["x".into()],
        100,
    );
    let mut reg = store.register_component(&c).await.expect("register");
    assert!(
        reg.path.starts_with("/nodepool/components/pool/host"),
        "{}",
        reg.path
    );
    c.paused = Some(true);
    store.update_component(&mut reg, &c).await.expect("update");
    let stale = crate::store::ComponentRegistration {
        path: reg.path.clone(),
        version: 0,
    };
    let r = store.update_component(&mut stale.clone(), &c).await;
    assert!(matches!(r, Err(StoreError::Conflict { .. })), "{r:?}");
    let listed = other
        .list_components(ComponentKind::Pool)
        .await
        .expect("list");
    assert_eq!(listed.records.len(), 1);
    assert_eq!(listed.records[0].1.paused, Some(true));
    a.close().await.expect("close");
    let listed = other
        .list_components(ComponentKind::Pool)
        .await
        .expect("list");
    assert!(
        listed.records.is_empty(),
        "component registrations are ephemeral"
    );
}
