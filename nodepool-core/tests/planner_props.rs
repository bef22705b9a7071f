//! Property tests of the planner's invariants over generated installations.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use nodepool_core::model::{NodeRequest, NodeState, RequestState, Resources};
use nodepool_core::planner::{
    Action, DeleteReason, NodeSummaryCache, PoolKey, plan, request_order_key,
};
use nodepool_core::testing::World;
use proptest::prelude::*;

const LABELS: [&str; 3] = ["l0", "l1", "l2"];

#[derive(Clone, Debug)]
struct PoolSpec {
    max_servers: Option<i64>,
    max_cores: Option<i64>,
    labels: Vec<usize>,
}

#[derive(Clone, Debug)]
struct ProviderSpec {
    quota_instances: Option<i64>,
    priority: i64,
    pools: Vec<PoolSpec>,
}

#[derive(Clone, Debug)]
struct NodeSpec {
    provider: usize,
    pool: usize,
    label: usize,
    state: NodeState,
    locked: bool,
    allocate_to: Option<usize>,
    tenant: bool,
    age: f64,
    hold_expiration: Option<i64>,
}

#[derive(Clone, Debug)]
struct RequestSpec {
    labels: Vec<usize>, // index 3 = a label nobody serves
    priority: usize,
    relative: i64,
    tenant: bool,
    state: RequestState,
}

#[derive(Clone, Debug)]
struct Spec {
    min_ready: Vec<u32>,
    max_ready_age: Option<i64>,
    max_hold_age: Option<i64>,
    tenant_max_servers: Option<i64>,
    providers: Vec<ProviderSpec>,
    nodes: Vec<NodeSpec>,
    requests: Vec<RequestSpec>,
}

fn pool_spec() -> impl Strategy<Value = PoolSpec> {
    (
        prop::option::of(-1i64..6),
        prop::option::of(2i64..20),
        prop::collection::btree_set(0usize..3, 1..=3),
    )
        .prop_map(|(max_servers, max_cores, labels)| PoolSpec {
            max_servers,
            max_cores,
            labels: labels.into_iter().collect(),
        })
}

fn provider_spec() -> impl Strategy<Value = ProviderSpec> {
    (
        prop::option::of(0i64..10),
        prop_oneof![Just(50i64), Just(100)],
        prop::collection::vec(pool_spec(), 1..=2),
    )
        .prop_map(|(quota_instances, priority, pools)| ProviderSpec {
            quota_instances,
            priority,
            pools,
        })
}

fn state() -> impl Strategy<Value = NodeState> {
    prop::sample::select(vec![
        NodeState::Init,
        NodeState::Building,
        NodeState::Ready,
        NodeState::Ready,
        NodeState::Ready,
        NodeState::InUse,
        NodeState::Used,
        NodeState::Hold,
        NodeState::Deleting,
        NodeState::Failed,
        NodeState::Aborted,
    ])
}

fn spec(with_requests: bool) -> impl Strategy<Value = Spec> {
    let providers = prop::collection::vec(provider_spec(), 1..=3);
    providers.prop_flat_map(move |providers| {
        let np = providers.len();
        let node = (0..np, 0usize..2, 0usize..3, state(), any::<bool>(), prop::option::of(0usize..8), any::<bool>(), 0.0f64..20000.0, prop::option::of(0i64..5000))
            .prop_map(|(provider, pool, label, state, locked, allocate_to, tenant, age, hold_expiration)| NodeSpec {
                provider,
                pool,
                label,
                state,
                locked,
                allocate_to,
                tenant,
                age,
                hold_expiration,
            });
        let request = (
            prop::collection::vec(prop_oneof![8 => 0usize..3, 1 => Just(3usize)], 1..=3),
            0usize..3,
            -2i64..3,
            any::<bool>(),
            prop_oneof![6 => Just(RequestState::Requested), 1 => Just(RequestState::Pending), 1 => Just(RequestState::Fulfilled)],
        )
            .prop_map(|(labels, priority, relative, tenant, state)| RequestSpec {
                labels,
                priority,
                relative,
                tenant,
                state,
            });
        let max_requests = if with_requests { 8 } else { 0 };
        (
            prop::collection::vec(0u32..3, 3),
            prop::option::of(1000i64..10000),
            prop::option::of(1000i64..10000),
            prop::option::of(0i64..5),
            Just(providers),
            prop::collection::vec(node, 0..14),
            prop::collection::vec(request, 0..=max_requests),
        )
            .prop_map(|(min_ready, max_ready_age, max_hold_age, tenant_max_servers, providers, nodes, requests)| Spec {
                min_ready,
                max_ready_age,
                max_hold_age,
                tenant_max_servers,
                providers,
                nodes,
                requests,
            })
    })
}

fn yaml(s: &Spec) -> String {
    let mut y = String::new();
    if let Some(a) = s.max_hold_age {
        y += &format!("max-hold-age: {a}\n");
    }
    if let Some(t) = s.tenant_max_servers {
        y += &format!("tenant-resource-limits: [{{tenant-name: t1, max-servers: {t}}}]\n");
    }
    y += "labels:\n";
    for (i, l) in LABELS.iter().enumerate() {
        y += &format!("  - name: {l}\n    min-ready: {}\n", s.min_ready[i]);
        if let Some(a) = s.max_ready_age {
            y += &format!("    max-ready-age: {a}\n");
        }
    }
    y += "providers:\n";
    for (pi, p) in s.providers.iter().enumerate() {
        y += &format!(
            "  - name: p{pi}\n    driver: simulated\n    priority: {}\n",
            p.priority
        );
        y += "    simulation:\n      flavors: [{name: s, vcpus: 2, ram: 2048}, {name: l, vcpus: 4, ram: 8192}]\n";
        if let Some(q) = p.quota_instances {
            y += &format!("      quota: {{instances: {q}}}\n");
        }
        y += "    cloud-images: [{name: img}]\n    pools:\n";
        for (qi, q) in p.pools.iter().enumerate() {
            y += &format!("      - name: q{qi}\n");
            if let Some(m) = q.max_servers {
                y += &format!("        max-servers: {m}\n");
            }
            if let Some(m) = q.max_cores {
                y += &format!("        max-cores: {m}\n");
            }
            y += "        labels:\n";
            for &l in &q.labels {
                let flavor = if l == 2 { "l" } else { "s" };
                y += &format!(
                    "          - {{name: {}, cloud-image: img, flavor-name: {flavor}}}\n",
                    LABELS[l]
                );
            }
        }
    }
    y
}

fn world(s: &Spec) -> World {
    let mut w = World::new(&yaml(s));
    let mut request_ids = Vec::new();
    for r in &s.requests {
        let labels: Vec<String> = r
            .labels
            .iter()
            .map(|&l| {
                LABELS
                    .get(l)
                    .copied()
                    .unwrap_or("nobody-serves")
                    .to_string()
            })
            .collect();
        let mut req = NodeRequest::new(labels, "zuul", w.now - 100.0);
        req.relative_priority = r.relative;
        req.tenant_name = r.tenant.then(|| "t1".into());
        req.state = r.state;
        request_ids.push(w.push_request(req, ["100", "200", "300"][r.priority], 0));
    }
    for n in &s.nodes {
        let p = &s.providers[n.provider];
        let pool = n.pool.min(p.pools.len() - 1);
        let labels = &p.pools[pool].labels;
        let label = LABELS[labels[n.label % labels.len()]];
        let id = w.add_node(
            &format!("p{}", n.provider),
            &format!("q{pool}"),
            label,
            n.state,
        );
        // Only realistic allocations: launches belong to pending requests,
        // ready nodes may point anywhere (Zuul returns nodes unused).
        let alloc = n.allocate_to.and_then(|i| {
            let id = request_ids.get(i)?;
            let state = s.requests[i].state;
            let ok = match n.state {
                NodeState::Ready => true,
                NodeState::Init | NodeState::Building => state == RequestState::Pending,
                NodeState::InUse => state == RequestState::Fulfilled,
                _ => false,
            };
            ok.then(|| id.clone())
        });
        // Only an executor locks a ready allocated node, and only once its
        // request is fulfilled.
        let lockable = match (&n.state, n.allocate_to.and_then(|i| s.requests.get(i))) {
            (NodeState::Ready, Some(r)) => alloc.is_none() || r.state == RequestState::Fulfilled,
            _ => true,
        };
        w.edit_node(&id, |node, locked| {
            *locked = n.locked && lockable;
            node.state_time -= n.age;
            node.hold_expiration = n.hold_expiration;
            node.allocated_to = alloc;
            // Spare ready nodes carry no tenant (re-tagging one on reuse
            // would free tenant quota for the next pass, legitimately).
            if n.tenant && node.allocated_to.is_some() {
                node.tenant_name = Some("t1".into());
            }
        });
    }
    w
}

fn limits_of(w: &World) -> HashMap<PoolKey, nodepool_core::model::Limits> {
    let mut out = HashMap::new();
    for p in &w.config.providers {
        for pool in &p.pools {
            out.insert(PoolKey::new(&p.name, &pool.name), pool.limits());
        }
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 300,
        failure_persistence: Some(Box::new(prop::test_runner::FileFailurePersistence::Direct(
            "proptest-regressions/planner_props.txt",
        ))),
        ..ProptestConfig::default()
    })]

    /// The node and request summaries a launcher keeps from pass to pass
    /// change no decision: over passes that add, edit (in place) and
    /// remove nodes and requests, each plan equals the one made with an
    /// empty cache.
    #[test]
    fn kept_node_summaries_plan_as_fresh_ones(s in spec(true)) {
        let mut w = world(&s);
        for pass in 0..4 {
            let kept = w.plan();
            let mut fresh_local = w.local.clone();
            fresh_local.node_summaries = NodeSummaryCache::default();
            let fresh = plan(&w.snapshot, &w.config, w.now, &fresh_local);
            prop_assert_eq!(&kept, &fresh, "pass {}", pass);
            w.apply(&kept);
            if pass % 2 == 1 {
                w.finish_launches();
            }
            // A node changed in place (no new record): its summary must
            // follow.
            if let Some(id) = w.snapshot.nodes.first().map(|r| r.id.clone()) {
                w.edit_node(&id, |n, _| n.state = NodeState::Used);
            }
            // So must a request's: its labels reordered, then a decline.
            if let Some(r) = w.snapshot.requests.first_mut() {
                let req = std::sync::Arc::make_mut(&mut r.request);
                if pass % 2 == 0 {
                    req.node_types.reverse();
                } else {
                    req.declined_by.push("nobody-PoolWorker.x-y".into());
                }
            }
            w.now += 30.0;
        }
    }

    /// Launches never push a pool, a cloud or a tenant past its limit.
    #[test]
    fn launches_stay_within_every_limit(s in spec(true)) {
        let mut w = world(&s);
        let plan = w.plan();
        let pool_limits = limits_of(&w);
        let mut pool_used: HashMap<PoolKey, Resources> = HashMap::new();
        let mut cloud_used: HashMap<String, Resources> = HashMap::new();
        for rec in &w.snapshot.nodes {
            let r = rec.node.resources.clone().unwrap_or_default();
            pool_used.entry(PoolKey::new(&rec.node.provider, &rec.node.pool)).or_default().add(&r);
            cloud_used.entry(rec.node.provider.clone()).or_default().add(&r);
        }
        let mut t1_grows = false;
        for a in &plan.actions {
            if let Action::Launch { request, pool, resources, .. } = a {
                let used = pool_used.entry(pool.clone()).or_default();
                prop_assert!(pool_limits[pool].fits(used, resources), "pool {pool} over: {used:?} + {resources:?}");
                used.add(resources);
                let cloud = cloud_used.entry(pool.provider.clone()).or_default();
                let limits = &w.snapshot.providers[&pool.provider].limits;
                prop_assert!(limits.fits(cloud, resources), "cloud {} over", pool.provider);
                cloud.add(resources);
                t1_grows |= w.request(request).and_then(|r| r.tenant_name.as_deref()) == Some("t1");
            }
            if let Action::Allocate { request, .. } = a {
                t1_grows |= w.request(request).and_then(|r| r.tenant_name.as_deref()) == Some("t1");
            }
        }
        // Whatever a tenant was charged before, giving it more never takes
        // it past its limit.
        if let (true, Some(limit)) = (t1_grows, w.config.tenant_resource_limits.get("t1").cloned()) {
            w.apply(&plan);
            let mut used = Resources::new();
            for rec in &w.snapshot.nodes {
                if rec.node.tenant_name.as_deref() == Some("t1") {
                    used.add(&rec.node.resources.clone().unwrap_or_default());
                }
            }
            prop_assert!(limit.fits(&used, &Resources::new()), "tenant over: {used:?} vs {limit:?}");
        }
    }

    /// A node is allocated to at most one request, and only a free one.
    #[test]
    fn no_node_is_allocated_twice(s in spec(true)) {
        let mut w = world(&s);
        for _ in 0..3 {
            let plan = w.plan();
            let mut seen = HashSet::new();
            let mut freed = HashSet::new();
            for a in &plan.actions {
                if let Action::Deallocate { node } = a {
                    freed.insert(node.clone());
                }
                if let Action::ResetLost { request } = a {
                    for n in &w.snapshot.nodes {
                        if n.node.allocated_to.as_deref() == Some(request.as_str()) {
                            freed.insert(n.id.clone());
                        }
                    }
                }
                if let Action::Allocate { node, .. } = a {
                    prop_assert!(seen.insert(node.clone()), "{node} allocated twice in one pass");
                    let rec = w.snapshot.nodes.iter().find(|n| &n.id == node).expect("exists");
                    prop_assert_eq!(rec.node.state, NodeState::Ready);
                    prop_assert!(rec.node.allocated_to.is_none() || freed.contains(node), "{node} is allocated");
                    prop_assert!(!rec.locked);
                }
            }
            w.apply(&plan);
            w.finish_launches();
            // Every fulfilled request's nodes are allocated to it alone.
            let mut owner: BTreeMap<String, String> = BTreeMap::new();
            for r in &w.snapshot.requests {
                if r.request.state == RequestState::Fulfilled {
                    for n in &r.request.nodes {
                        prop_assert!(owner.insert(n.clone(), r.id.clone()).is_none(), "{n} in two requests");
                    }
                }
            }
        }
    }

    /// Locked nodes are never deleted; held nodes only when expired.
    #[test]
    fn locked_and_held_nodes_are_safe(s in spec(true)) {
        let w = world(&s);
        let plan = w.plan();
        for a in &plan.actions {
            if let Action::DeleteNode { node, reason } = a {
                let rec = w.snapshot.nodes.iter().find(|n| &n.id == node).expect("exists");
                prop_assert!(!rec.locked, "locked {node} deleted ({reason:?})");
                prop_assert!(rec.node.state != NodeState::InUse || !rec.locked);
                if rec.node.state == NodeState::Hold {
                    prop_assert_eq!(*reason, DeleteReason::HoldExpired);
                    let age = w.now - rec.node.state_time;
                    let own = rec.node.hold_expiration.filter(|e| *e > 0).map(|e| e as f64);
                    let max = w.config.max_hold_age.map(|d| d.as_secs_f64());
                    let limit = match (own, max) { (Some(a), Some(b)) => a.min(b), (a, b) => a.or(b).expect("some limit") };
                    prop_assert!(age > limit);
                }
            }
        }
    }

    /// Planning again on the state the plan produced plans nothing more
    /// for the same need.
    #[test]
    fn replanning_is_idempotent(s in spec(true)) {
        let mut w = world(&s);
        let first = w.plan();
        // Requests whose need the first pass already handled (a reset lost
        // request is a new need: it is taken again on the next pass).
        let reset: HashSet<&str> = first.actions.iter().filter_map(|a| match a {
            Action::ResetLost { request } => Some(request.as_str()),
            _ => None,
        }).collect();
        let before: HashSet<String> = w.snapshot.requests.iter()
            .map(|r| r.id.clone())
            .filter(|id| !reset.contains(id.as_str()))
            .collect();
        w.apply(&first);
        let second = w.plan();
        // A spare the second pass uses up may be replaced in that pass.
        let mut consumed: HashMap<String, usize> = HashMap::new();
        for a in &second.actions {
            if let Action::Allocate { node, .. } | Action::DeleteNode { node, .. } = a
                && let Some(n) = w.node(node)
                    && n.state == NodeState::Ready {
                        for l in &n.node_type {
                            *consumed.entry(l.clone()).or_default() += 1;
                        }
                    }
        }
        for a in &second.actions {
            let repeated = match a {
                Action::CreateMinReady { label } => match consumed.get_mut(label) {
                    Some(n) if *n > 0 => {
                        *n -= 1;
                        false
                    }
                    _ => true,
                },
                Action::Launch { request, .. } | Action::Accept { request, .. } | Action::Allocate { request, .. } => before.contains(request),
                _ => false,
            };
            prop_assert!(!repeated, "second pass planned {a:?}\nfirst: {:?}", first.actions);
        }
    }

    /// Requests are accepted in priority, relative priority, FIFO order.
    #[test]
    fn requests_are_served_in_order(s in spec(true)) {
        let mut s = s;
        // Same labels, no tenants, all waiting: order is the only difference.
        for r in &mut s.requests {
            r.labels = vec![0];
            r.tenant = false;
            r.state = RequestState::Requested;
        }
        for n in &mut s.nodes {
            n.allocate_to = None;
        }
        let w = world(&s);
        let plan = w.plan();
        let accepted: HashSet<&str> = plan.actions.iter().filter_map(|a| match a {
            Action::Accept { request, .. } => Some(request.as_str()),
            _ => None,
        }).collect();
        let mut order: Vec<(_, &str)> = w.snapshot.requests.iter()
            .map(|r| (request_order_key(&r.id, r.request.relative_priority), r.id.as_str()))
            .collect();
        order.sort();
        let flags: Vec<bool> = order.iter().map(|(_, id)| accepted.contains(id)).collect();
        // Accepted requests form a prefix of the order.
        let first_skipped = flags.iter().position(|a| !a).unwrap_or(flags.len());
        prop_assert!(flags[first_skipped..].iter().all(|a| !a), "order {flags:?}");
    }

    /// A request for a label nobody serves ends failed.
    #[test]
    fn unservable_requests_fail(s in spec(true)) {
        let mut w = world(&s);
        let waiting: HashSet<String> = w.requests_in(RequestState::Requested).into_iter().collect();
        w.run(30);
        for r in &w.snapshot.requests {
            if waiting.contains(&r.id) && r.request.node_types.iter().any(|l| l == "nobody-serves") {
                prop_assert_eq!(r.request.state, RequestState::Failed, "{}", r.id);
            }
        }
    }

    /// Min-ready is met when quota allows and no request waits, without
    /// overshooting.
    #[test]
    fn min_ready_is_met_without_overshoot(s in spec(false)) {
        let mut s = s;
        // Plenty of room everywhere, no leftovers that would be deleted.
        for p in &mut s.providers {
            p.quota_instances = None;
            for q in &mut p.pools {
                q.max_servers = None;
                q.max_cores = None;
            }
        }
        s.nodes.retain(|n| n.state == NodeState::Ready && !n.locked && n.allocate_to.is_none());
        s.max_ready_age = None;
        let mut w = world(&s);
        w.run(30);
        let served: BTreeSet<&str> = w.config.providers.iter()
            .flat_map(|p| p.pools.iter().flat_map(|q| q.labels.iter().map(|l| l.name.as_str())))
            .collect();
        for (i, label) in LABELS.iter().enumerate() {
            let free = w.snapshot.nodes.iter()
                .filter(|n| n.node.state == NodeState::Ready && n.node.allocated_to.is_none() && n.node.has_label(label))
                .count();
            let existing = s.nodes.iter().filter(|n| {
                let p = &s.providers[n.provider];
                let pool = n.pool.min(p.pools.len() - 1);
                let labels = &p.pools[pool].labels;
                labels[n.label % labels.len()] == i
            }).count();
            let want = s.min_ready[i] as usize;
            if served.contains(label) {
                prop_assert_eq!(free, want.max(existing), "label {}", label);
            }
        }
    }

    /// An unavailable provider gets no work: its pools report paused and
    /// accept nothing, nothing launches or is deleted there, requests held
    /// there are handed back (never declined or failed because of it)
    /// once nothing is in flight, and requests only it serves are not
    /// failed while waiting.
    #[test]
    fn an_unavailable_provider_gets_no_work_and_fails_nothing(
        s in spec(true),
        down in prop::collection::vec(any::<bool>(), 3),
        owned in prop::collection::vec((any::<bool>(), 0usize..8), 8),
    ) {
        let mut w = world(&s);
        let down: BTreeSet<String> = (0..s.providers.len())
            .filter(|&pi| down[pi])
            .map(|pi| format!("p{pi}"))
            .collect();
        for p in &down {
            w.set_outage(p, Some("timed out"));
        }
        // Some pending requests are held by one of our pools.
        let pools: Vec<PoolKey> = w.local.pool_ids.keys().cloned().collect();
        let pending: Vec<String> = w.requests_in(RequestState::Pending);
        for (i, id) in pending.iter().enumerate() {
            let (hold, pool) = owned[i % owned.len()];
            if hold {
                let key = pools[pool % pools.len()].clone();
                w.local.owned_requests.insert(id.clone(), key);
                if let Some(r) = w.snapshot.requests.iter_mut().find(|r| &r.id == id) {
                    r.locked = true;
                }
            }
        }
        let down_ids: BTreeSet<String> = w.local.pool_ids.iter()
            .filter(|(k, _)| down.contains(&k.provider))
            .map(|(_, id)| id.clone())
            .collect();
        // Requests whose labels every serving pool is in a down provider
        // (and some pool serves): they must wait.
        let only_down: BTreeSet<String> = w.snapshot.requests.iter()
            .filter(|r| {
                let serving: Vec<&PoolKey> = pools.iter().filter(|k| {
                    let pc = w.config.provider(&k.provider).expect("provider");
                    let pool = pc.pool(&k.pool).expect("pool");
                    r.request.node_types.iter().all(|l| pool.label(l).is_some())
                }).collect();
                !serving.is_empty() && serving.iter().all(|k| down.contains(&k.provider))
            })
            .map(|r| r.id.clone())
            .collect();
        for pass in 0..3 {
            let plan = w.plan();
            for st in &plan.pools {
                if down.contains(&st.pool.provider) {
                    prop_assert!(st.paused, "{} not paused", st.pool);
                }
            }
            for a in &plan.actions {
                match a {
                    Action::Accept { pool, .. } | Action::Launch { pool, .. } => {
                        prop_assert!(!down.contains(&pool.provider), "pass {pass}: {a:?}");
                    }
                    Action::DeleteNode { node, .. } => {
                        let n = w.node(node).expect("node");
                        prop_assert!(!down.contains(&n.provider), "pass {pass}: {a:?}");
                    }
                    Action::Allocate { request, .. } | Action::Fulfill { request, .. } => {
                        let held = w.local.owned_requests.get(request);
                        prop_assert!(held.is_none_or(|k| !down.contains(&k.provider)), "pass {pass}: {a:?}");
                    }
                    Action::Decline { request, by, reason, .. } => {
                        // A down pool may still decline what it can never
                        // serve (a permanent verdict), never because of
                        // the outage.
                        if by.iter().any(|id| down_ids.contains(id)) {
                            prop_assert!(reason.contains("can never fit") || reason.contains("not supported")
                                || reason.contains("no image") || reason.contains("disabled")
                                || reason.contains("max-concurrency 0"), "pass {pass}: {a:?}");
                        }
                        let held = w.local.owned_requests.get(request);
                        prop_assert!(held.is_none_or(|k| !down.contains(&k.provider)), "pass {pass}: {a:?}");
                    }
                    Action::HandBack { request, .. } => {
                        let held = w.local.owned_requests.get(request);
                        prop_assert!(held.is_some_and(|k| down.contains(&k.provider)), "pass {pass}: {a:?}");
                        let k = held.expect("held");
                        let in_flight = w.snapshot.nodes.iter().any(|n| {
                            n.node.allocated_to.as_deref() == Some(request.as_str())
                                && n.node.provider == k.provider && n.node.pool == k.pool
                                && (matches!(n.node.state, NodeState::Init | NodeState::Building)
                                    || (n.node.state == NodeState::Ready && n.locked))
                        });
                        prop_assert!(!in_flight, "pass {pass}: handed back with a launch in flight: {a:?}");
                    }
                    Action::Fail { request, .. } => {
                        // Unless pools declined it for good (e.g. it can
                        // never fit), which an outage does not change.
                        let declined = w.request(request).is_some_and(|r| !r.declined_by.is_empty());
                        prop_assert!(!only_down.contains(request) || declined, "pass {pass}: {a:?}");
                    }
                    _ => {}
                }
            }
            w.apply(&plan);
            w.finish_launches();
        }
        // Requests only the down providers serve, waiting at the start,
        // wait still: not failed, not declined by a down pool for the outage.
        for r in &w.snapshot.requests {
            if only_down.contains(&r.id) && r.request.declined_by.is_empty() {
                prop_assert_ne!(r.request.state, RequestState::Failed, "{}", r.id);
            }
        }
    }
}

/// Plans of 3,000 generated installations (deterministic seed) over five
/// passes each, applying each plan and keeping the summary cache, hashed:
/// a change meant to decide the same leaves the digest as it was (the one
/// below is that of the planner before the request summaries and after).
/// Ignored by default: `DefaultHasher` may hash differently under another
/// toolchain, so the digest is compared before and after a change with
/// `--ignored --nocapture`, on one toolchain.
#[test]
#[ignore = "a digest to compare before and after a change, on one toolchain"]
fn generated_installations_digest() {
    use proptest::strategy::ValueTree;
    use proptest::test_runner::TestRunner;
    use std::hash::{DefaultHasher, Hash, Hasher};
    let mut runner = TestRunner::deterministic();
    let strategy = spec(true);
    let mut h = DefaultHasher::new();
    let mut actions = 0;
    for _ in 0..3_000 {
        let s = strategy
            .new_tree(&mut runner)
            .expect("a generated installation")
            .current();
        let mut w = world(&s);
        for pass in 0..5 {
            let p = w.plan();
            actions += p.actions.len();
            format!("{p:?}").hash(&mut h);
            w.apply(&p);
            if pass % 2 == 1 {
                w.finish_launches();
            }
            w.now += 30.0;
        }
    }
    let got = format!("{actions} actions, digest {:016x}", h.finish());
    println!("{got}");
    assert_eq!(got, "53359 actions, digest cc21a854b2aa0aa4");
}
