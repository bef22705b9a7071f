//! Named planner scenarios, after the behaviours Python Nodepool's test
//! suite checks (reference §8).

use nodepool_core::model::{MIN_READY_REQUESTOR, NodeRequest, NodeState, RequestState, WireRecord};
use nodepool_core::planner::{Action, DeleteReason, PoolInfo, PoolKey, rendezvous_owner};
use nodepool_core::provider::{CloudResource, Instance, ResourceKind};
use nodepool_core::store::RequestLockDir;
use nodepool_core::testing::World;

const ONE_POOL: &str = r#"
labels:
  - name: small
  - name: large
providers:
  - name: cloud1
    driver: simulated
    simulation:
      flavors:
        - {name: s, vcpus: 2, ram: 2048}
        - {name: l, vcpus: 8, ram: 16384}
    cloud-images: [{name: img}]
    pools:
      - name: main
        max-servers: 4
        labels:
          - {name: small, cloud-image: img, flavor-name: s}
          - {name: large, cloud-image: img, flavor-name: l}
"#;

fn count(plan: &nodepool_core::planner::Plan, f: impl Fn(&Action) -> bool) -> usize {
    plan.actions.iter().filter(|a| f(a)).count()
}

fn is_launch(a: &Action) -> bool {
    matches!(a, Action::Launch { .. })
}

#[test]
fn a_request_is_accepted_launched_and_fulfilled() {
    let mut w = World::new(ONE_POOL);
    let r = w.add_request(&["small"], "200");
    let p = w.plan();
    assert!(matches!(&p.actions[0], Action::Accept { request, .. } if request == &r));
    assert_eq!(count(&p, is_launch), 1);
    w.apply(&p);
    assert_eq!(w.request(&r).map(|r| r.state), Some(RequestState::Pending));
    // While the server builds, nothing new is planned for it.
    let again = w.plan();
    assert_eq!(count(&again, is_launch), 0, "{:?}", again.actions);
    w.finish_launches();
    let p = w.plan();
    let Some(Action::Fulfill { nodes, .. }) = p
        .actions
        .iter()
        .find(|a| matches!(a, Action::Fulfill { .. }))
    else {
        panic!("not fulfilled: {:?}", p.actions)
    };
    assert_eq!(nodes.len(), 1);
    w.apply(&p);
    let req = w.request(&r).expect("request");
    assert_eq!(req.state, RequestState::Fulfilled);
    assert_eq!(
        w.node(&req.nodes[0]).and_then(|n| n.allocated_to.clone()),
        Some(r.clone())
    );
    // Fulfilled requests are left alone until the requestor deletes them.
    assert!(w.plan().actions.is_empty(), "{:?}", w.plan().actions);
}

#[test]
fn multi_node_requests_get_nodes_in_label_order() {
    let mut w = World::new(ONE_POOL);
    let r = w.add_request(&["large", "small", "small"], "200");
    w.run(10);
    let req = w.request(&r).expect("request");
    assert_eq!(req.state, RequestState::Fulfilled);
    let labels: Vec<String> = req
        .nodes
        .iter()
        .map(|n| w.node(n).expect("node").node_type[0].clone())
        .collect();
    assert_eq!(labels, ["large", "small", "small"]);
}

#[test]
fn ready_nodes_are_reused_in_the_same_pool_and_az() {
    let mut w = World::new(ONE_POOL);
    let a = w.add_node("cloud1", "main", "small", NodeState::Ready);
    w.edit_node(&a, |n, _| n.az = Some("az1".into()));
    let b = w.add_node("cloud1", "main", "small", NodeState::Ready);
    w.edit_node(&b, |n, _| n.az = Some("az2".into()));
    let c = w.add_node("cloud1", "main", "small", NodeState::Ready);
    w.edit_node(&c, |n, _| n.az = Some("az1".into()));
    let r = w.add_request(&["small", "small"], "200");
    let p = w.plan();
    let allocated: Vec<&String> = p
        .actions
        .iter()
        .filter_map(|a| match a {
            Action::Allocate { node, .. } => Some(node),
            _ => None,
        })
        .collect();
    assert_eq!(allocated, [&a, &c], "the first reused node pins the AZ");
    assert_eq!(count(&p, is_launch), 0);
    // Reused nodes are ready, so the request is fulfilled in the same pass.
    assert_eq!(
        p.actions.last(),
        Some(&Action::Fulfill {
            request: r.clone(),
            nodes: vec![a.clone(), c.clone()]
        })
    );
    w.apply(&p);
    assert!(w.plan().actions.is_empty());
}

#[test]
fn min_ready_requests_never_reuse() {
    let mut w = World::new(ONE_POOL);
    w.add_node("cloud1", "main", "small", NodeState::Ready);
    let mut req = NodeRequest::new(vec!["small".into()], MIN_READY_REQUESTOR, w.now);
    req.reuse = false;
    w.push_request(req, "900", 1);
    let p = w.plan();
    assert_eq!(count(&p, |a| matches!(a, Action::Allocate { .. })), 0);
    assert_eq!(count(&p, is_launch), 1);
}

#[test]
fn pool_max_servers_pauses_the_pool_and_waits() {
    let mut w = World::new(ONE_POOL);
    for _ in 0..4 {
        let n = w.add_node("cloud1", "main", "small", NodeState::InUse);
        w.edit_node(&n, |_, locked| *locked = true);
    }
    let r1 = w.add_request(&["small"], "200");
    let r2 = w.add_request(&["small"], "200");
    let p = w.plan();
    assert_eq!(count(&p, is_launch), 0);
    assert_eq!(
        count(&p, |a| matches!(a, Action::Accept { .. })),
        1,
        "the pool takes one, then pauses"
    );
    assert!(p.pools[0].paused);
    w.apply(&p);
    assert_eq!(w.request(&r1).map(|r| r.state), Some(RequestState::Pending));
    assert_eq!(
        w.request(&r2).map(|r| r.state),
        Some(RequestState::Requested)
    );
    // A node frees up: the waiting request launches first.
    let used = w.snapshot.nodes[0].id.clone();
    w.snapshot.nodes.retain(|n| n.id != used);
    w.finish_deletes();
    let p = w.plan();
    assert!(
        matches!(p.actions.iter().find(|a| is_launch(a)), Some(Action::Launch { request, .. }) if request == &r1)
    );
    // The next request is taken and waits in turn.
    assert!(
        p.actions
            .iter()
            .any(|a| matches!(a, Action::Accept { request, .. } if request == &r2))
    );
    assert!(p.pools[0].paused);
}

#[test]
fn core_and_ram_limits_of_the_pool() {
    let cfg = ONE_POOL.replace("max-servers: 4", "max-cores: 10\n        max-ram: 100000");
    let mut w = World::new(&cfg);
    let _l = w.add_request(&["large"], "200");
    let _s = w.add_request(&["small"], "200");
    let _t = w.add_request(&["small"], "200");
    // 8 + 2 cores fit; the third (2 more) does not.
    let p = w.plan();
    assert_eq!(count(&p, is_launch), 2);
    w.apply(&p);
    let usage = w.usage_by_pool();
    assert_eq!(usage[&PoolKey::new("cloud1", "main")].get("cores"), 10);
}

#[test]
fn cloud_quota_minus_unmanaged_usage() {
    let cfg = ONE_POOL.replace(
        "      flavors:",
        "      quota: {instances: 3}\n      flavors:",
    );
    let mut w = World::new(&cfg);
    w.snapshot
        .providers
        .get_mut("cloud1")
        .expect("view")
        .unmanaged = nodepool_core::model::Resources::new().with("instances", 1);
    for _ in 0..3 {
        w.add_request(&["small"], "200");
    }
    let p = w.plan();
    assert_eq!(count(&p, is_launch), 2, "3 instances minus 1 unmanaged");
}

#[test]
fn reported_cloud_usage_is_respected() {
    let cfg = ONE_POOL.replace(
        "      flavors:",
        "      quota: {instances: 3}\n      flavors:",
    );
    let mut w = World::new(&cfg);
    w.snapshot
        .providers
        .get_mut("cloud1")
        .expect("view")
        .reported_usage = Some(nodepool_core::model::Resources::new().with("instances", 3));
    w.add_request(&["small"], "200");
    assert_eq!(count(&w.plan(), is_launch), 0, "the cloud says it is full");
}

#[test]
fn ignore_provider_quota_skips_the_cloud_check() {
    let cfg = ONE_POOL
        .replace(
            "      flavors:",
            "      quota: {instances: 0}\n      flavors:",
        )
        .replace(
            "max-servers: 4",
            "max-servers: 4\n        ignore-provider-quota: true",
        );
    let mut w = World::new(&cfg);
    w.add_request(&["small"], "200");
    assert_eq!(count(&w.plan(), is_launch), 1);
}

#[test]
fn tenant_limits_defer_requests() {
    let cfg = format!("tenant-resource-limits: [{{tenant-name: t1, max-servers: 1}}]\n{ONE_POOL}");
    let mut w = World::new(&cfg);
    let n = w.add_node("cloud1", "main", "small", NodeState::InUse);
    w.edit_node(&n, |n, l| {
        n.tenant_name = Some("t1".into());
        *l = true;
    });
    let mut req = NodeRequest::new(vec!["small".into()], "zuul", w.now);
    req.tenant_name = Some("t1".into());
    let t1 = w.push_request(req, "200", 0);
    let other = w.add_request(&["small"], "200");
    let p = w.plan();
    assert!(
        !p.actions.iter().any(|a| a.request() == Some(t1.as_str())),
        "{:?}",
        p.actions
    );
    assert!(
        p.actions
            .iter()
            .any(|a| matches!(a, Action::Accept { request, .. } if request == &other))
    );
}

#[test]
fn a_request_that_can_never_fit_is_declined_and_fails() {
    let cfg = ONE_POOL.replace("max-servers: 4", "max-servers: 4\n        max-cores: 4");
    let mut w = World::new(&cfg);
    let r = w.add_request(&["large"], "200");
    let p = w.plan();
    assert!(
        matches!(&p.actions[..], [Action::Decline { request, fail: true, reason, .. }] if request == &r && reason.contains("cores")),
        "{:?}",
        p.actions
    );
}

#[test]
fn min_ready_requests_are_declined_at_quota() {
    let mut w = World::new(ONE_POOL);
    for _ in 0..4 {
        let n = w.add_node("cloud1", "main", "large", NodeState::InUse);
        w.edit_node(&n, |_, l| *l = true);
    }
    let mut req = NodeRequest::new(vec!["small".into()], MIN_READY_REQUESTOR, w.now);
    req.reuse = false;
    let r = w.push_request(req, "900", 1);
    let p = w.plan();
    assert!(
        p.actions
            .iter()
            .any(|a| matches!(a, Action::Decline { request, .. } if request == &r)),
        "{:?}",
        p.actions
    );
    assert!(!p.pools[0].paused, "min-ready requests never pause a pool");
}

#[test]
fn a_paused_pool_evicts_the_oldest_unused_node_of_another_label() {
    let mut w = World::new(ONE_POOL);
    for _ in 0..2 {
        let n = w.add_node("cloud1", "main", "large", NodeState::InUse);
        w.edit_node(&n, |_, l| *l = true);
    }
    let old = w.add_node("cloud1", "main", "large", NodeState::Ready);
    w.edit_node(&old, |n, _| n.state_time -= 100.0);
    let _newer = w.add_node("cloud1", "main", "large", NodeState::Ready);
    let r = w.add_request(&["small"], "200");
    let p = w.plan();
    assert!(
        p.actions
            .iter()
            .any(|a| matches!(a, Action::Accept { request, .. } if request == &r))
    );
    assert!(
        p.actions.contains(&Action::DeleteNode {
            node: old.clone(),
            reason: DeleteReason::Evicted
        }),
        "{:?}",
        p.actions
    );
    w.apply(&p);
    // While that deletion runs nothing more is evicted.
    let mut w2 = w.clone();
    let del = w2.add_node("cloud1", "main", "large", NodeState::Deleting);
    w2.edit_node(&del, |_, l| *l = true);
    let p = w2.plan();
    assert_eq!(
        count(&p, |a| matches!(
            a,
            Action::DeleteNode {
                reason: DeleteReason::Evicted,
                ..
            }
        )),
        0
    );
    // Once freed, the request launches.
    w.finish_deletes();
    let p = w.plan();
    assert_eq!(count(&p, is_launch), 1, "{:?}", p.actions);
}

const TWO_PROVIDERS: &str = r#"
labels:
  - name: small
providers:
  - name: cheap
    driver: simulated
    priority: 50
    cloud-images: [{name: img}]
    pools:
      - name: main
        max-servers: 10
        labels: [{name: small, cloud-image: img, min-ram: 1}]
  - name: dear
    driver: simulated
    priority: 100
    cloud-images: [{name: img}]
    pools:
      - name: main
        max-servers: 10
        labels: [{name: small, cloud-image: img, min-ram: 1}]
"#;

#[test]
fn the_higher_priority_provider_takes_requests() {
    let mut w = World::new(TWO_PROVIDERS);
    w.add_request(&["small"], "200");
    let p = w.plan();
    assert!(matches!(&p.actions[0], Action::Accept { pool, .. } if pool.provider == "cheap"));
}

#[test]
fn another_launchers_better_pool_is_yielded_to() {
    let one = ONE_POOL.replace(
        "        max-servers: 4",
        "        max-servers: 4\n        priority: 100",
    );
    let mut w = World::new(&one);
    w.snapshot.pools.push(PoolInfo {
        id: "other-PoolWorker.fast-main-1".into(),
        provider: "fast".into(),
        pool: "main".into(),
        labels: vec!["small".into()],
        priority: 10,
        paused: false,
        unavailable: false,
        launchable: None,
    });
    w.add_request(&["small"], "200");
    assert!(w.plan().actions.is_empty(), "{:?}", w.plan().actions);
    // Unless it is paused.
    w.snapshot.pools.last_mut().expect("pool").paused = true;
    assert!(matches!(&w.plan().actions[0], Action::Accept { .. }));
}

#[test]
fn a_request_naming_a_provider_goes_there() {
    let mut w = World::new(TWO_PROVIDERS);
    let mut req = NodeRequest::new(vec!["small".into()], "zuul", w.now);
    req.provider = Some("dear".into());
    w.push_request(req, "200", 0);
    let p = w.plan();
    assert!(matches!(&p.actions[0], Action::Accept { pool, .. } if pool.provider == "dear"));
    // An unknown provider name is ignored.
    let mut w = World::new(TWO_PROVIDERS);
    let mut req = NodeRequest::new(vec!["small".into()], "zuul", w.now);
    req.provider = Some("nowhere".into());
    w.push_request(req, "200", 0);
    assert!(
        matches!(&w.plan().actions[0], Action::Accept { pool, .. } if pool.provider == "cheap")
    );
}

#[test]
fn a_failed_launch_declines_and_the_last_decliner_fails_it() {
    let mut w = World::new(TWO_PROVIDERS);
    let r = w.add_request(&["small"], "200");
    let p = w.plan();
    w.apply(&p);
    // The launch (in "cheap") failed after its retries.
    let n = w.snapshot.nodes[0].id.clone();
    w.edit_node(&n, |n, l| {
        n.state = NodeState::Failed;
        *l = false;
    });
    let p = w.plan();
    assert!(
        p.actions
            .iter()
            .any(|a| matches!(a, Action::Decline { request, fail: false, .. } if request == &r)),
        "{:?}",
        p.actions
    );
    assert!(p.actions.contains(&Action::DeleteNode {
        node: n.clone(),
        reason: DeleteReason::Unlocked
    }));
    w.apply(&p);
    // "dear" takes it next; its launch fails too: now every pool declined.
    let p = w.plan();
    assert!(
        matches!(&p.actions[0], Action::Accept { pool, .. } if pool.provider == "dear"),
        "{:?}",
        p.actions
    );
    w.apply(&p);
    let n2 = w
        .snapshot
        .nodes
        .iter()
        .find(|n| n.node.provider == "dear")
        .expect("launched")
        .id
        .clone();
    w.edit_node(&n2, |n, l| {
        n.state = NodeState::Failed;
        *l = false;
    });
    let p = w.plan();
    assert!(
        p.actions
            .iter()
            .any(|a| matches!(a, Action::Decline { fail: true, .. })),
        "{:?}",
        p.actions
    );
    w.apply(&p);
    assert_eq!(w.request(&r).map(|r| r.state), Some(RequestState::Failed));
}

#[test]
fn an_aborted_launch_is_replaced_without_declining() {
    let mut w = World::new(ONE_POOL);
    let r = w.add_request(&["small"], "200");
    let p = w.plan();
    w.apply(&p);
    let n = w.snapshot.nodes[0].id.clone();
    w.edit_node(&n, |n, l| {
        n.state = NodeState::Aborted;
        *l = false;
    });
    let p = w.plan();
    assert!(
        p.actions
            .iter()
            .any(|a| matches!(a, Action::Launch { request, .. } if request == &r)),
        "{:?}",
        p.actions
    );
    assert!(
        !p.actions
            .iter()
            .any(|a| matches!(a, Action::Decline { .. }))
    );
}

#[test]
fn unknown_labels_fail_in_one_pass() {
    let mut w = World::new(ONE_POOL);
    let r = w.add_request(&["small", "gpu"], "200");
    let p = w.plan();
    assert!(
        matches!(&p.actions[..], [Action::Fail { request, reason }] if request == &r && reason.contains("gpu"))
    );
}

#[test]
fn a_request_whose_node_types_is_not_a_list_of_strings_fails_with_the_reason() {
    let mut w = World::new(ONE_POOL);
    let bad = NodeRequest::from_json(br#"{"state": "requested", "node_types": "small"}"#)
        .expect("reads with its fault noted");
    let r = w.push_request(bad, "200", 0);
    let p = w.plan();
    assert!(
        matches!(&p.actions[..], [Action::Fail { request, reason }]
            if request == &r && reason.contains("node_types is not a list of strings")),
        "{:?}",
        p.actions
    );
    w.apply(&p);
    assert_eq!(w.request(&r).map(|r| r.state), Some(RequestState::Failed));
    assert!(w.plan().actions.is_empty());
}

#[test]
fn a_request_without_node_types_is_fulfilled_empty_as_python_does() {
    let mut w = World::new(ONE_POOL);
    let none =
        NodeRequest::from_json(br#"{"state": "requested", "requestor": "zuul"}"#).expect("reads");
    let r = w.push_request(none, "200", 0);
    w.run(5);
    let req = w.request(&r).expect("request");
    assert_eq!(req.state, RequestState::Fulfilled);
    assert!(req.nodes.is_empty());
    assert_eq!(count(&w.plan(), is_launch), 0);
}

#[test]
fn requests_are_taken_by_priority_relative_priority_then_age() {
    let cfg = ONE_POOL.replace("max-servers: 4", "max-servers: 2");
    let mut w = World::new(&cfg);
    let low = w.add_request(&["small"], "300");
    let normal_late = w.add_request(&["small"], "200");
    let mut urgent = NodeRequest::new(vec!["small".into()], "zuul", w.now);
    urgent.relative_priority = -1;
    let normal_urgent = w.push_request(urgent, "200", 0);
    let high = w.add_request(&["small"], "100");
    let p = w.plan();
    let accepted: Vec<&String> = p
        .actions
        .iter()
        .filter_map(|a| match a {
            Action::Accept { request, .. } => Some(request),
            _ => None,
        })
        .collect();
    // Two fit, the third is accepted and waits (pausing the pool), the fourth waits outside.
    assert_eq!(accepted, [&high, &normal_urgent, &normal_late]);
    assert!(!accepted.contains(&&low));
}

#[test]
fn max_ready_age_deletes_old_unused_nodes() {
    let cfg = ONE_POOL.replace(
        "  - name: small\n",
        "  - name: small\n    max-ready-age: 3600\n",
    );
    let mut w = World::new(&cfg);
    let old = w.add_node("cloud1", "main", "small", NodeState::Ready);
    w.edit_node(&old, |n, _| n.state_time -= 3601.0);
    let young = w.add_node("cloud1", "main", "small", NodeState::Ready);
    let allocated = w.add_node("cloud1", "main", "small", NodeState::Ready);
    let r = w.add_request(&["small"], "200");
    w.edit_request(&r, |r| r.state = RequestState::Fulfilled);
    w.edit_node(&allocated, |n, _| {
        n.state_time -= 9999.0;
        n.allocated_to = Some(r.clone());
    });
    let p = w.plan();
    assert!(p.actions.contains(&Action::DeleteNode {
        node: old,
        reason: DeleteReason::MaxReadyAge
    }));
    assert!(!p.actions.iter().any(
        |a| matches!(a, Action::DeleteNode { node, .. } if node == &young || node == &allocated)
    ));
}

#[test]
fn held_nodes_expire_by_max_hold_age_or_their_own_expiration() {
    let cfg = format!("max-hold-age: 7200\n{ONE_POOL}");
    let mut w = World::new(&cfg);
    let forever = w.add_node("cloud1", "main", "small", NodeState::Hold);
    w.edit_node(&forever, |n, _| n.state_time -= 3600.0);
    let old = w.add_node("cloud1", "main", "small", NodeState::Hold);
    w.edit_node(&old, |n, _| n.state_time -= 7201.0);
    let short = w.add_node("cloud1", "main", "small", NodeState::Hold);
    w.edit_node(&short, |n, _| {
        n.state_time -= 61.0;
        n.hold_expiration = Some(60);
    });
    let p = w.plan();
    let deleted: Vec<&String> = p
        .actions
        .iter()
        .filter_map(|a| match a {
            Action::DeleteNode {
                node,
                reason: DeleteReason::HoldExpired,
            } => Some(node),
            _ => None,
        })
        .collect();
    assert_eq!(deleted, [&old, &short]);
    // Without max-hold-age a hold without expiration is kept forever.
    let mut w = World::new(ONE_POOL);
    let n = w.add_node("cloud1", "main", "small", NodeState::Hold);
    w.edit_node(&n, |n, _| n.state_time -= 1e9);
    assert!(w.plan().actions.is_empty());
}

#[test]
fn unlocked_finished_nodes_are_deleted_and_locked_ones_are_not() {
    let mut w = World::new(ONE_POOL);
    let mut expect = Vec::new();
    for st in [
        NodeState::Used,
        NodeState::InUse,
        NodeState::Building,
        NodeState::Failed,
        NodeState::Aborted,
        NodeState::Deleting,
        NodeState::Deleted,
    ] {
        expect.push(w.add_node("cloud1", "main", "small", st));
        let locked = w.add_node("cloud1", "main", "small", st);
        w.edit_node(&locked, |_, l| *l = true);
    }
    let young_init = w.add_node("cloud1", "main", "small", NodeState::Init);
    let other = w.add_node("elsewhere", "main", "small", NodeState::Used);
    let p = w.plan();
    let deleted: Vec<String> = p
        .actions
        .iter()
        .filter_map(|a| match a {
            Action::DeleteNode { node, .. } => Some(node.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(deleted, expect);
    assert!(!deleted.contains(&young_init) && !deleted.contains(&other));
}

#[test]
fn init_nodes_of_lost_requests_are_deleted_after_a_grace() {
    let mut w = World::new(ONE_POOL);
    let n = w.add_node("cloud1", "main", "small", NodeState::Init);
    w.edit_node(&n, |n, _| n.allocated_to = Some("200-0000000099".into()));
    assert!(w.plan().actions.is_empty());
    w.now += 61.0;
    assert_eq!(
        w.plan().actions,
        vec![Action::DeleteNode {
            node: n,
            reason: DeleteReason::LostInit
        }]
    );
}

#[test]
fn an_unlocked_init_node_of_a_request_we_hold_is_deleted_at_once() {
    // A node create whose outcome the store could not report leaves an
    // unlocked `init` node on our request; counted as in flight, it would
    // keep the request waiting for ever.
    let mut w = World::new(ONE_POOL);
    let r = w.add_request(&["small"], "200");
    w.edit_request(&r, |r| r.state = RequestState::Pending);
    w.snapshot.requests[0].locked = true;
    w.local
        .owned_requests
        .insert(r.clone(), PoolKey::new("cloud1", "main"));
    let n = w.add_node("cloud1", "main", "small", NodeState::Init);
    w.edit_node(&n, |n, _| n.allocated_to = Some(r.clone()));
    let p = w.plan();
    assert!(
        p.actions.contains(&Action::DeleteNode {
            node: n.clone(),
            reason: DeleteReason::LostInit
        }),
        "{:?}",
        p.actions
    );
    // Locked, it is our launch in progress: left alone.
    w.edit_node(&n, |_, locked| *locked = true);
    assert!(
        !w.plan()
            .actions
            .iter()
            .any(|a| matches!(a, Action::DeleteNode { .. })),
    );
}

#[test]
fn lost_requests_are_reset() {
    let mut w = World::new(ONE_POOL);
    let r = w.add_request(&["small"], "200");
    w.edit_request(&r, |r| r.state = RequestState::Pending);
    let p = w.plan();
    assert!(
        p.actions
            .contains(&Action::ResetLost { request: r.clone() })
    );
    // A pending request somebody holds is not lost.
    let mut w2 = w.clone();
    w2.snapshot.requests[0].locked = true;
    assert!(w2.plan().actions.is_empty());
}

#[test]
fn nodes_zuul_gave_back_unused_are_deallocated_once_the_request_is_gone() {
    let mut w = World::new(ONE_POOL);
    let n = w.add_node("cloud1", "main", "small", NodeState::Ready);
    w.edit_node(&n, |n, _| n.allocated_to = Some("200-0000000042".into()));
    assert_eq!(
        w.plan().actions,
        vec![Action::Deallocate { node: n.clone() }]
    );
    // Still locked by an executor: leave it.
    w.edit_node(&n, |_, l| *l = true);
    assert!(w.plan().actions.is_empty());
    // A consumer's allocation (not a request id) is not ours to undo.
    w.edit_node(&n, |n, l| {
        *l = false;
        n.allocated_to = Some("jenkins:wmf".into());
    });
    assert!(w.plan().actions.is_empty());
}

#[test]
fn disabled_providers_launch_nothing_and_drain() {
    let cfg = ONE_POOL.replace("max-servers: 4", "max-servers: -1");
    let mut w = World::new(&cfg);
    let used = w.add_node("cloud1", "main", "small", NodeState::Used);
    let busy = w.add_node("cloud1", "main", "small", NodeState::InUse);
    w.edit_node(&busy, |_, l| *l = true);
    let r = w.add_request(&["small"], "200");
    let p = w.plan();
    assert!(p.actions.iter().any(|a| matches!(a, Action::Decline { request, fail: true, reason, .. } if request == &r && reason.contains("disabled"))), "{:?}", p.actions);
    assert!(p.actions.contains(&Action::DeleteNode {
        node: used,
        reason: DeleteReason::Unlocked
    }));
    assert_eq!(count(&p, is_launch), 0);
}

#[test]
fn max_concurrency_limits_launches_in_flight() {
    let cfg = ONE_POOL.replace(
        "    driver: simulated\n",
        "    driver: simulated\n    max-concurrency: 2\n",
    );
    let mut w = World::new(&cfg);
    for _ in 0..4 {
        w.add_request(&["small"], "200");
    }
    let p = w.plan();
    assert_eq!(count(&p, is_launch), 2);
    w.apply(&p);
    assert_eq!(count(&w.plan(), is_launch), 0, "two still building");
    w.finish_launches();
    assert_eq!(count(&w.plan(), is_launch), 2);
}

#[test]
fn min_ready_creates_the_deficit_once() {
    let cfg = ONE_POOL.replace("  - name: small\n", "  - name: small\n    min-ready: 3\n");
    let mut w = World::new(&cfg);
    w.add_node("cloud1", "main", "small", NodeState::Ready);
    let p = w.plan();
    assert_eq!(
        count(
            &p,
            |a| matches!(a, Action::CreateMinReady { label } if label == "small")
        ),
        2
    );
    w.apply(&p);
    assert_eq!(
        count(&w.plan(), |a| matches!(a, Action::CreateMinReady { .. })),
        0
    );
    w.run(10);
    let ready_free = w
        .snapshot
        .nodes
        .iter()
        .filter(|n| n.node.state == NodeState::Ready && n.node.allocated_to.is_none())
        .count();
    assert_eq!(ready_free, 3);
    assert!(
        w.snapshot.requests.is_empty(),
        "finished min-ready requests are deleted"
    );
}

#[test]
fn min_ready_has_one_owner_among_launchers() {
    let cfg = ONE_POOL.replace("  - name: small\n", "  - name: small\n    min-ready: 2\n");
    let a = World::new(&cfg);
    let mut b = World::new(&cfg);
    // b is a second launcher for the same provider: its pool id differs.
    let key = PoolKey::new("cloud1", "main");
    b.local
        .pool_ids
        .insert(key, "second-PoolWorker.cloud1-main-1".into());
    let mut both = a.snapshot.pools.clone();
    both.push(PoolInfo {
        id: "second-PoolWorker.cloud1-main-1".into(),
        ..a.snapshot.pools[0].clone()
    });
    let mut a = a;
    a.snapshot.pools = both.clone();
    b.snapshot.pools = both;
    let created = |w: &World| count(&w.plan(), |a| matches!(a, Action::CreateMinReady { .. }));
    assert_eq!(
        created(&a) + created(&b),
        2,
        "exactly one launcher creates the two requests"
    );
}

#[test]
fn a_new_min_ready_owner_does_not_top_up_what_the_old_owner_covers() {
    let cfg = ONE_POOL.replace("  - name: small\n", "  - name: small\n    min-ready: 3\n");
    let mut old = World::new(&cfg);
    let created = |w: &World| count(&w.plan(), |a| matches!(a, Action::CreateMinReady { .. }));
    // The old owner, alone, tops the label up and serves its requests.
    let p = old.plan();
    assert_eq!(count(&p, |a| matches!(a, Action::CreateMinReady { .. })), 3);
    old.apply(&p);
    let p = old.plan();
    old.apply(&p);
    old.finish_launches();
    let p = old.plan();
    old.apply(&p);
    let fulfilled = old.requests_in(RequestState::Fulfilled);
    assert_eq!(fulfilled.len(), 3, "{:?}", old.snapshot.requests);
    // One request completed; one deleted while its node still shows the
    // allocation (the launcher completing it deallocates, then deletes,
    // and another launcher's deallocation may fail or not be seen yet);
    // one fulfilled, not completed yet.
    old.apply(&nodepool_core::planner::Plan {
        actions: vec![Action::CompleteMinReady {
            request: fulfilled[0].clone(),
        }],
        ..Default::default()
    });
    old.snapshot.requests.retain(|r| r.id != fulfilled[1]);
    // A second launcher with a pool for the same cloud registers, and the
    // label moves to it.
    let first = old.snapshot.pools[0].id.clone();
    let second = (0..)
        .map(|i| format!("second{i}-PoolWorker.cloud1-main-1"))
        .find(|id| rendezvous_owner("small", [first.as_str(), id.as_str()]) == Some(id.as_str()))
        .expect("some pool id takes the label");
    old.snapshot.pools.push(PoolInfo {
        id: second.clone(),
        ..old.snapshot.pools[0].clone()
    });
    let mut new = World::new(&cfg);
    new.snapshot = old.snapshot.clone();
    new.now = old.now;
    new.local
        .pool_ids
        .insert(PoolKey::new("cloud1", "main"), second);
    new.local.session_id = old.local.session_id + 1;
    assert_eq!(created(&old), 0, "the old owner no longer owns the label");
    assert_eq!(
        created(&new),
        0,
        "a spare, a node about to be one and a fulfilled request cover min-ready"
    );
    // Without the old owner's work the new owner does top the label up.
    let mut bare = World::new(&cfg);
    bare.snapshot.pools = new.snapshot.pools.clone();
    bare.local = new.local.clone();
    assert_eq!(created(&bare), 3);
}

#[test]
fn a_spare_whose_server_left_the_cloud_is_deleted_not_handed_out() {
    let mut w = World::new(ONE_POOL);
    let server = |id: &str| Instance {
        external_id: id.into(),
        name: id.into(),
        status: nodepool_core::provider::InstanceStatus::Active,
        metadata: Default::default(),
        public_ipv4: None,
        private_ipv4: None,
        public_ipv6: None,
        interface_ip: None,
        az: None,
        region: None,
        cloud: None,
        host_id: None,
        resources: None,
    };
    let with_server = |w: &mut World, ext: &str| {
        let n = w.add_node("cloud1", "main", "small", NodeState::Ready);
        w.edit_node(&n, |n, _| n.external_id = Some(ext.into()));
        n
    };
    let gone = with_server(&mut w, "srv-gone");
    let alive = with_server(&mut w, "srv-alive");
    let taken = with_server(&mut w, "srv-taken-gone");
    w.edit_node(&taken, |n, _| {
        n.allocated_to = Some("200-0000000001".into())
    });
    // Ready only a moment before the listing: a cached listing may not
    // show its server yet.
    w.now += 120.0;
    let fresh = with_server(&mut w, "srv-fresh");
    let view = w.snapshot.providers.get_mut("cloud1").expect("view");
    view.instances = Some(vec![server("srv-alive")]);
    view.instances_listed_at = Some(w.now + 10.0);
    let deleted: Vec<(String, DeleteReason)> = w
        .plan()
        .actions
        .into_iter()
        .filter_map(|a| match a {
            Action::DeleteNode { node, reason } => Some((node, reason)),
            _ => None,
        })
        .collect();
    assert_eq!(deleted, vec![(gone, DeleteReason::ServerGone)]);
    let _ = (alive, fresh);
}

#[test]
fn leaked_servers_are_deleted_on_the_second_sighting() {
    let mut w = World::new(ONE_POOL);
    let known = w.add_node("cloud1", "main", "small", NodeState::Ready);
    let server = |id: &str, node: &str, provider: &str| Instance {
        external_id: id.into(),
        name: format!("np{node}"),
        status: nodepool_core::provider::InstanceStatus::Active,
        metadata: [
            ("nodepool_node_id".to_string(), node.to_string()),
            ("nodepool_provider_name".to_string(), provider.to_string()),
        ]
        .into_iter()
        .collect(),
        public_ipv4: None,
        private_ipv4: None,
        public_ipv6: None,
        interface_ip: None,
        az: None,
        region: None,
        cloud: None,
        host_id: None,
        resources: None,
    };
    w.snapshot
        .providers
        .get_mut("cloud1")
        .expect("view")
        .instances = Some(vec![
        server("srv-known", &known, "cloud1"),
        server("srv-leaked", "0000009999", "cloud1"),
        server("srv-other", "0000009998", "someone-else"),
    ]);
    let p = w.plan();
    assert!(
        !p.actions
            .iter()
            .any(|a| matches!(a, Action::DeleteLeakedInstance { .. }))
    );
    assert!(
        p.leak_suspects
            .contains(&("cloud1".to_string(), "srv-leaked".to_string()))
    );
    assert_eq!(p.leak_suspects.len(), 1);
    w.apply(&p);
    let p = w.plan();
    assert_eq!(
        p.actions,
        vec![Action::DeleteLeakedInstance {
            provider: "cloud1".into(),
            external_id: "srv-leaked".into()
        }]
    );
    // Without a fresh listing the suspects are kept, nothing is deleted.
    w.snapshot
        .providers
        .get_mut("cloud1")
        .expect("view")
        .instances = None;
    let p = w.plan();
    assert!(p.actions.is_empty());
    assert_eq!(p.leak_suspects.len(), 1);
}

fn resource(
    kind: ResourceKind,
    id: &str,
    status: &str,
    attached: bool,
    owner: &str,
) -> CloudResource {
    CloudResource {
        kind,
        id: id.into(),
        status: status.into(),
        attached,
        device_owner: Some(owner.into()),
    }
}

fn leaked_resources(p: &nodepool_core::planner::Plan) -> Vec<(ResourceKind, String)> {
    p.actions
        .iter()
        .filter_map(|a| match a {
            Action::DeleteLeakedResource { provider, kind, id } => {
                assert_eq!(provider, "cloud1");
                Some((*kind, id.clone()))
            }
            _ => None,
        })
        .collect()
}

#[test]
fn unattached_floating_ips_go_at_once_only_with_clean_floating_ips() {
    let fips = vec![
        resource(ResourceKind::FloatingIp, "fip-free", "DOWN", false, ""),
        resource(ResourceKind::FloatingIp, "fip-used", "ACTIVE", true, ""),
    ];
    // Off (Python's default in code): listed or not, nothing is deleted.
    let mut w = World::new(ONE_POOL);
    w.snapshot
        .providers
        .get_mut("cloud1")
        .expect("view")
        .floating_ips = Some(fips.clone());
    assert_eq!(leaked_resources(&w.plan()), []);
    let mut w = World::new(&ONE_POOL.replace(
        "    driver: simulated\n",
        "    driver: simulated\n    clean-floating-ips: true\n",
    ));
    w.snapshot
        .providers
        .get_mut("cloud1")
        .expect("view")
        .floating_ips = Some(fips);
    let p = w.plan();
    assert_eq!(
        leaked_resources(&p),
        [(ResourceKind::FloatingIp, "fip-free".to_owned())]
    );
    // Not while the cloud's API is failing: the deletion would fail fast.
    w.snapshot.providers.get_mut("cloud1").expect("view").outage =
        Some(nodepool_core::planner::ProviderOutage {
            since: w.now,
            reason: "down".into(),
        });
    assert_eq!(leaked_resources(&w.plan()), []);
}

#[test]
fn down_ports_go_when_seen_in_two_listings_an_interval_apart() {
    let mut w = World::new(&ONE_POOL.replace(
        "    driver: simulated\n",
        "    driver: simulated\n    port-cleanup-interval: 600\n",
    ));
    let listing = |ids: &[(&str, &str, &str)]| {
        ids.iter()
            .map(|(id, status, owner)| resource(ResourceKind::Port, id, status, false, owner))
            .collect::<Vec<_>>()
    };
    let list = |w: &mut World, ports: Vec<CloudResource>, at: f64| {
        let v = w.snapshot.providers.get_mut("cloud1").expect("view");
        v.ports = Some(ports);
        v.ports_listed_at = Some(at);
        let p = w.plan();
        w.apply(&p);
        // A listing is handed to one pass only.
        let v = w.snapshot.providers.get_mut("cloud1").expect("view");
        v.ports = None;
        v.ports_listed_at = None;
        p
    };
    let t0 = w.now;
    let first = listing(&[
        ("p-old", "DOWN", "compute:nova"),
        ("p-unowned", "DOWN", ""),
        ("p-router", "DOWN", "network:router_interface"),
        ("p-dhcp", "DOWN", "network:dhcp"),
        ("p-up", "ACTIVE", "compute:nova"),
        ("p-comes-back", "DOWN", "compute:az1"),
    ]);
    let p = list(&mut w, first, t0);
    assert_eq!(leaked_resources(&p), [], "the first listing only records");
    assert_eq!(
        p.down_ports["cloud1"]
            .ids
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
        ["p-comes-back", "p-old", "p-unowned"]
    );
    let second = listing(&[
        ("p-old", "DOWN", "compute:nova"),
        ("p-unowned", "DOWN", ""),
        ("p-router", "DOWN", "network:router_interface"),
        ("p-dhcp", "DOWN", "network:dhcp"),
        ("p-up", "DOWN", "compute:nova"),
        ("p-new", "DOWN", "compute:nova"),
    ]);
    // Too soon: nothing, and the first listing stays the reference.
    let p = list(&mut w, second.clone(), t0 + 599.0);
    assert_eq!(leaked_resources(&p), []);
    assert_eq!(p.down_ports["cloud1"].listed_at, t0);
    // An interval later: DOWN in both listings and not a service port.
    let p = list(&mut w, second, t0 + 600.0);
    assert_eq!(
        leaked_resources(&p),
        [
            (ResourceKind::Port, "p-old".to_owned()),
            (ResourceKind::Port, "p-unowned".to_owned())
        ]
    );
    // The new reference is that listing: p-up and p-new go next time.
    assert_eq!(p.down_ports["cloud1"].listed_at, t0 + 600.0);
    let third = listing(&[
        ("p-up", "DOWN", "compute:nova"),
        ("p-new", "DOWN", "compute:nova"),
    ]);
    let p = list(&mut w, third, t0 + 1200.0);
    assert_eq!(
        leaked_resources(&p),
        [
            (ResourceKind::Port, "p-up".to_owned()),
            (ResourceKind::Port, "p-new".to_owned())
        ]
    );
    // `port-cleanup-interval: 0` disables it, and the reference is dropped.
    let mut off = World::new(&ONE_POOL.replace(
        "    driver: simulated\n",
        "    driver: simulated\n    port-cleanup-interval: 0\n",
    ));
    off.local.down_ports = w.local.down_ports.clone();
    let v = off.snapshot.providers.get_mut("cloud1").expect("view");
    v.ports = Some(listing(&[("p-up", "DOWN", "compute:nova")]));
    v.ports_listed_at = Some(t0 + 5000.0);
    let p = off.plan();
    assert_eq!(leaked_resources(&p), []);
    assert!(p.down_ports.is_empty());
}

#[test]
fn stale_request_lock_dirs_and_empty_nodes_are_removed() {
    let mut w = World::new(ONE_POOL);
    let live = w.add_request(&["small"], "200");
    w.edit_request(&live, |r| r.state = RequestState::Fulfilled);
    let old_ms = ((w.now - 9.0 * 3600.0) * 1000.0) as i64;
    w.snapshot.request_lock_dirs = vec![
        RequestLockDir {
            id: "200-0000000001".into(),
            mtime_ms: old_ms,
            locked: false,
        },
        RequestLockDir {
            id: "200-0000000002".into(),
            mtime_ms: (w.now * 1000.0) as i64,
            locked: false,
        },
        RequestLockDir {
            id: live.clone(),
            mtime_ms: old_ms,
            locked: false,
        },
    ];
    w.snapshot.empty_nodes = vec!["0000000777".into()];
    let p = w.plan();
    assert_eq!(
        p.actions,
        vec![
            Action::DeleteRequestLockDir {
                request: "200-0000000001".into()
            },
            Action::DeleteEmptyNode {
                node: "0000000777".into()
            },
        ]
    );
}

#[test]
fn diskimage_labels_wait_for_a_ready_upload() {
    let cfg = r#"
labels: [{name: small}]
diskimages: [{name: jammy}]
providers:
  - name: cloud1
    driver: simulated
    diskimages: [{name: jammy}]
    pools:
      - name: main
        labels: [{name: small, diskimage: jammy, min-ram: 1}]
"#;
    let mut w = World::new(cfg);
    let r = w.add_request(&["small"], "200");
    let p = w.plan();
    assert!(
        matches!(&p.actions[..], [Action::Decline { request, reason, fail: true, .. }] if request == &r && reason.contains("no image"))
    );
    let mut w = World::new(cfg).with_ready_images();
    w.add_ready_upload("cloud1", "jammy", "build1", w.now - 10.0);
    w.add_request(&["small"], "200");
    let p = w.plan();
    let Some(Action::Launch { image, .. }) = p.actions.iter().find(|a| is_launch(a)) else {
        panic!("no launch: {:?}", p.actions)
    };
    assert!(
        matches!(image, nodepool_core::planner::LaunchImage::Upload { build, .. } if build == "build1"),
        "the newest upload is used: {image:?}"
    );
}

#[test]
fn an_owned_request_that_vanished_is_released() {
    let mut w = World::new(ONE_POOL);
    let r = w.add_request(&["small"], "200");
    let p = w.plan();
    w.apply(&p);
    w.snapshot.requests.clear();
    let p = w.plan();
    assert!(p.actions.contains(&Action::Release { request: r }));
}

/// `bad` is preferred (priority 50) and the only one serving `gpu`.
const BAD_AND_GOOD: &str = r#"
labels:
  - name: small
  - name: gpu
providers:
  - name: bad
    driver: simulated
    priority: 50
    cloud-images: [{name: img}]
    pools:
      - name: main
        max-servers: 10
        labels:
          - {name: small, cloud-image: img, min-ram: 1}
          - {name: gpu, cloud-image: img, min-ram: 1}
  - name: good
    driver: simulated
    priority: 100
    cloud-images: [{name: img}]
    pools:
      - name: main
        max-servers: 10
        labels: [{name: small, cloud-image: img, min-ram: 1}]
"#;

fn touches_provider(a: &Action, provider: &str) -> bool {
    match a {
        Action::Accept { pool, .. } | Action::Launch { pool, .. } => pool.provider == provider,
        _ => false,
    }
}

#[test]
fn an_unavailable_providers_pools_take_nothing_and_a_healthy_one_takes_its_work_in_the_same_pass() {
    let mut w = World::new(BAD_AND_GOOD);
    w.set_outage("bad", Some("timed out: server list"));
    let reqs: Vec<String> = (0..5).map(|_| w.add_request(&["small"], "200")).collect();
    let p = w.plan();
    assert!(
        !p.actions.iter().any(|a| touches_provider(a, "bad")),
        "{:?}",
        p.actions
    );
    for r in &reqs {
        assert!(
            p.actions
                .iter()
                .any(|a| matches!(a, Action::Accept { request, pool }
                if request == r && pool.provider == "good")),
            "{r} not taken by good: {:?}",
            p.actions
        );
    }
    assert_eq!(count(&p, is_launch), 5);
    assert!(
        !p.actions
            .iter()
            .any(|a| matches!(a, Action::Decline { .. } | Action::Fail { .. }))
    );
    let bad = p
        .pools
        .iter()
        .find(|s| s.pool.provider == "bad")
        .expect("bad's pool");
    assert!(bad.paused, "an unavailable provider's pool reports paused");
    assert!(
        !p.pools
            .iter()
            .find(|s| s.pool.provider == "good")
            .expect("good's pool")
            .paused
    );
    // The same without the outage: the preferred provider takes them.
    w.set_outage("bad", None);
    assert!(w.plan().actions.iter().any(|a| touches_provider(a, "bad")));
}

#[test]
fn requests_only_an_unavailable_provider_serves_wait_and_are_not_failed() {
    let mut w = World::new(BAD_AND_GOOD);
    w.set_outage("bad", Some("HTTP 500"));
    let gpu = w.add_request(&["gpu"], "200");
    for _ in 0..5 {
        let p = w.plan();
        assert!(
            !p.actions.iter().any(|a| a.request() == Some(gpu.as_str())),
            "{:?}",
            p.actions
        );
        w.apply(&p);
        w.now += 60.0;
    }
    let r = w.request(&gpu).expect("request");
    assert_eq!(r.state, RequestState::Requested);
    assert!(r.declined_by.is_empty(), "{:?}", r.declined_by);
    // A request naming the unavailable provider goes elsewhere.
    let mut req = NodeRequest::new(vec!["small".into()], "zuul", w.now);
    req.provider = Some("bad".into());
    let named = w.push_request(req, "200", 0);
    let p = w.plan();
    assert!(
        p.actions
            .iter()
            .any(|a| matches!(a, Action::Accept { request, pool }
            if request == &named && pool.provider == "good")),
        "{:?}",
        p.actions
    );
}

#[test]
fn requests_held_on_an_unavailable_provider_are_handed_back_once_nothing_is_in_flight() {
    let mut w = World::new(BAD_AND_GOOD);
    let small = w.add_request(&["small"], "200");
    let gpu = w.add_request(&["gpu"], "200");
    let p = w.plan();
    assert_eq!(
        count(&p, |a| touches_provider(a, "bad")),
        4,
        "{:?}",
        p.actions
    );
    w.apply(&p);
    // The cloud's API starts failing while both launches build.
    w.set_outage("bad", Some("timed out: server create"));
    let p = w.plan();
    assert!(
        !p.actions
            .iter()
            .any(|a| matches!(a, Action::HandBack { .. } | Action::Decline { .. })),
        "launches in flight are waited for (the breaker cuts them short): {:?}",
        p.actions
    );
    // The breaker cut them short: one aborted, one failed (a launch that
    // ended before the provider was marked unavailable).
    let nodes: Vec<String> = w.snapshot.nodes.iter().map(|n| n.id.clone()).collect();
    w.edit_node(&nodes[0], |n, l| {
        n.state = NodeState::Aborted;
        *l = false;
    });
    w.edit_node(&nodes[1], |n, l| {
        n.state = NodeState::Failed;
        *l = false;
    });
    let p = w.plan();
    for r in [&small, &gpu] {
        assert!(
            p.actions
                .iter()
                .any(|a| matches!(a, Action::HandBack { request, .. } if request == r)),
            "{r}: {:?}",
            p.actions
        );
    }
    assert!(
        !p.actions.iter().any(|a| matches!(
            a,
            Action::Decline { .. } | Action::Fail { .. } | Action::DeleteNode { .. }
        )),
        "no decline, and the bad cloud's nodes wait for it to recover: {:?}",
        p.actions
    );
    w.apply(&p);
    for r in [&small, &gpu] {
        let req = w.request(r).expect("request");
        assert_eq!(req.state, RequestState::Requested);
        assert!(req.declined_by.is_empty());
    }
    assert!(w.local.owned_requests.is_empty());
    // The next pass: `small` goes to the healthy provider, `gpu` waits.
    let p = w.plan();
    assert!(
        p.actions
            .iter()
            .any(|a| matches!(a, Action::Accept { request, pool }
            if request == &small && pool.provider == "good")),
        "{:?}",
        p.actions
    );
    assert!(!p.actions.iter().any(|a| a.request() == Some(gpu.as_str())));
    w.apply(&p);
    w.finish_launches();
    w.run(5);
    assert_eq!(
        w.request(&small).map(|r| r.state),
        Some(RequestState::Fulfilled)
    );
    assert_eq!(
        w.request(&gpu).map(|r| r.state),
        Some(RequestState::Requested)
    );
}

#[test]
fn service_resumes_when_the_provider_recovers() {
    let mut w = World::new(BAD_AND_GOOD);
    w.set_outage("bad", Some("rate limited"));
    let gpu = w.add_request(&["gpu"], "200");
    let stale = w.add_node("bad", "main", "small", NodeState::Used);
    w.run(5);
    assert_eq!(
        w.request(&gpu).map(|r| r.state),
        Some(RequestState::Requested)
    );
    assert!(w.node(&stale).is_some(), "deletion waits for the cloud");
    w.set_outage("bad", None);
    let p = w.plan();
    assert!(
        p.actions
            .iter()
            .any(|a| matches!(a, Action::Accept { request, pool }
            if request == &gpu && pool.provider == "bad")),
        "{:?}",
        p.actions
    );
    assert!(p.actions.contains(&Action::DeleteNode {
        node: stale.clone(),
        reason: DeleteReason::Unlocked
    }));
    assert!(!p.pools.iter().any(|s| s.paused));
    w.apply(&p);
    w.finish_launches();
    w.run(5);
    assert_eq!(
        w.request(&gpu).map(|r| r.state),
        Some(RequestState::Fulfilled)
    );
}

const STATIC_POOL: &str = r#"
labels:
  - name: small
providers:
  - name: lab
    driver: static
    pools:
      - name: main
        nodes:
          - {name: a.example.org, labels: small}
          - {name: b.example.org, labels: small}
"#;

#[test]
fn a_static_pool_serves_ready_nodes_and_never_launches() {
    let mut w = World::new(STATIC_POOL);
    let a = w.add_node("lab", "main", "small", NodeState::Ready);
    let b = w.add_node("lab", "main", "small", NodeState::InUse);
    w.edit_node(&b, |n, _| n.allocated_to = Some("someone-else".into()));
    // One host is free: the first request gets it.
    let first = w.add_request(&["small"], "200");
    w.run(10);
    let req = w.request(&first).expect("request");
    assert_eq!(req.state, RequestState::Fulfilled);
    assert_eq!(req.nodes, [a]);
    // Every host is busy now: the next request waits, neither launched
    // for nor declined.
    let second = w.add_request(&["small"], "200");
    for _ in 0..5 {
        let p = w.plan();
        assert_eq!(count(&p, is_launch), 0, "{:?}", p.actions);
        assert!(
            !p.actions
                .iter()
                .any(|x| matches!(x, Action::Decline { .. })),
            "{:?}",
            p.actions
        );
        w.apply(&p);
    }
    assert_ne!(
        w.request(&second).map(|r| r.state),
        Some(RequestState::Failed)
    );
    // A host registered again (as the static sync does) serves it.
    let c = w.add_node("lab", "main", "small", NodeState::Ready);
    w.run(10);
    let req = w.request(&second).expect("request");
    assert_eq!(req.state, RequestState::Fulfilled);
    assert_eq!(req.nodes, [c]);
}
