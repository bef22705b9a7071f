//! The launcher runtime end to end on the in-memory store and the
//! simulated cloud, driven through the Zuul-side requestor library, on
//! tokio's paused clock (no real sleeping).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nodepool_core::config::{ApiFault, Config};
use nodepool_core::launcher::{Launcher, LauncherSettings, ObserverIntervals};
use nodepool_core::model::{ComponentKind, Node, NodeState, RequestState};
use nodepool_core::provider::{Provider, ResourceKind};
use nodepool_core::runtime::ProviderFactory;
use nodepool_core::store::Store;
use nodepool_model::store::MemoryStore;
use nodepool_requestor::{NewRequest, Outcome, Requestor};
use nodepool_simulated::SimulatedProvider;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

const BASE: &str = r#"
labels:
  - name: small
  - name: large
providers:
  - name: sim
    driver: simulated
    simulation:
      boot-delay: 2
      flavors:
        - {name: s, vcpus: 2, ram: 2048}
        - {name: l, vcpus: 8, ram: 16384}
    cloud-images: [{name: img}]
    pools:
      - name: main
        max-servers: 10
        labels:
          - {name: small, cloud-image: img, flavor-name: s}
          - {name: large, cloud-image: img, flavor-name: l}
"#;

type Clouds = Arc<Mutex<BTreeMap<String, Arc<SimulatedProvider>>>>;

struct Running {
    shutdown: CancellationToken,
    config: watch::Sender<Arc<Config>>,
    task: tokio::task::JoinHandle<()>,
    clouds: Clouds,
    status: Arc<nodepool_core::launcher::LauncherStatus>,
    metrics: Arc<nodepool_core::launcher::Metrics>,
}

fn settings(host: &str) -> LauncherSettings {
    LauncherSettings {
        hostname: host.into(),
        observer: ObserverIntervals {
            instances: Duration::from_secs(5),
            ..ObserverIntervals::default()
        },
        clock: nodepool_core::runtime::Clock::tokio(),
        ..LauncherSettings::default()
    }
}

fn start(store: Store, yaml: &str, host: &str) -> Running {
    let cfg = Arc::new(Config::from_yaml(yaml).expect("valid config"));
    let clouds: Clouds = Arc::default();
    let registry = clouds.clone();
    let factory: ProviderFactory = Arc::new(move |pc| {
        let mut reg = registry.lock().expect("lock");
        if let Some(p) = reg.get(&pc.name) {
            // The same cloud across reloads (a real cloud does not forget its servers).
            return Ok(p.clone() as Arc<dyn Provider>);
        }
        let p = Arc::new(SimulatedProvider::new(pc).map_err(|e| e.to_string())?);
        reg.insert(pc.name.clone(), p.clone());
        Ok(p as Arc<dyn Provider>)
    });
    let launcher = Launcher::new(store, factory, settings(host));
    let status = launcher.status();
    let metrics = launcher.metrics();
    let (tx, rx) = watch::channel(cfg);
    let shutdown = CancellationToken::new();
    let stop = shutdown.clone();
    let task = tokio::spawn(async move {
        launcher.run(rx, stop).await.expect("launcher runs");
    });
    Running {
        shutdown,
        config: tx,
        task,
        clouds,
        status,
        metrics,
    }
}

impl Running {
    fn cloud(&self, name: &str) -> Arc<SimulatedProvider> {
        self.clouds
            .lock()
            .expect("lock")
            .get(name)
            .cloned()
            .expect("cloud exists")
    }

    async fn stop(self) {
        self.shutdown.cancel();
        self.task.await.expect("launcher task");
    }

    /// Waits for `n` more completed planning passes.
    async fn passes(&self, n: u64) {
        self.status
            .passes()
            .more(n)
            .await
            .expect("the launcher runs");
    }

    /// Sends a configuration and waits for a pass that planned with it.
    async fn reload(&self, yaml: &str) {
        let before = self.status.config_generation();
        self.config
            .send(Arc::new(Config::from_yaml(yaml).expect("valid")))
            .expect("send");
        until("configuration applied", || async {
            self.status.config_generation() > before
        })
        .await;
        // The first may have planned with the old one.
        self.passes(2).await;
    }
}

/// Polls `f` on the paused clock until true (bounded in virtual time).
async fn until<F: FnMut() -> Fut, Fut: std::future::Future<Output = bool>>(what: &str, mut f: F) {
    for _ in 0..600 {
        if f().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    panic!("{what}: not reached within 300 s of virtual time");
}

async fn nodes_in(store: &Store, state: NodeState) -> usize {
    store
        .list_nodes()
        .await
        .expect("list")
        .records
        .iter()
        .filter(|n| n.node.state == state)
        .count()
}

fn store() -> (MemoryStore, Store) {
    let mem = MemoryStore::new();
    (mem.clone(), Store::new(Arc::new(mem.new_session())))
}

#[tokio::test(start_paused = true)]
async fn a_request_is_fulfilled_used_and_deleted() {
    let (_mem, store) = store();
    let l = start(store.clone(), BASE, "l1");
    let zuul = Requestor::new(store.clone(), "zuul-system-id");
    let id = zuul
        .submit(&NewRequest::new(vec!["small".into(), "large".into()]))
        .await
        .expect("submit");
    let Outcome::Fulfilled(req) = zuul
        .wait(&id, Duration::from_secs(300))
        .await
        .expect("wait")
    else {
        panic!("request failed")
    };
    assert_eq!(req.value.nodes.len(), 2);
    // The second launch to finish fulfilled it, not a later pass.
    assert_eq!(l.status.fulfilled_on_ready(), 1);
    let mut set = zuul.accept(&id, &req.value).await.expect("accept");
    assert!(
        store.get_request(&id).await.expect("get").is_none(),
        "the requestor deleted it"
    );
    for n in &set.nodes {
        let node = store.get_node(&n.id).await.expect("get").expect("node");
        assert_eq!(node.value.state, NodeState::Ready);
        assert_eq!(node.value.allocated_to.as_deref(), Some(id.as_str()));
        assert!(node.value.external_id.is_some());
        assert!(node.value.interface_ip.is_some());
    }
    assert_eq!(l.cloud("sim").server_count().await, 2);
    zuul.use_nodes(&mut set, "example/project")
        .await
        .expect("in-use");
    zuul.return_nodes(set).await.expect("used");
    until("used nodes deleted with their servers", || async {
        store.list_nodes().await.expect("list").records.is_empty()
            && l.cloud("sim").server_count().await == 0
    })
    .await;
    assert!(l.status.is_ready());
    l.stop().await;
}

/// A transaction makes no parents: on a new store the first wave of
/// accepts (each creating its request's lock directory and its nodes in
/// one transaction) would all fail and go the slower way. The launcher
/// makes those parents when it registers.
#[tokio::test(start_paused = true)]
async fn a_launcher_on_a_new_store_makes_the_parents_its_transactions_create_in() {
    let (_mem, store) = store();
    for root in ["/nodepool/requests-lock", "/nodepool/nodes"] {
        assert!(store.backend().get(root).await.expect("get").is_none());
    }
    let l = start(store.clone(), BASE, "l1");
    l.passes(1).await;
    for root in ["/nodepool/requests-lock", "/nodepool/nodes"] {
        assert!(
            store.backend().get(root).await.expect("get").is_some(),
            "{root} not made"
        );
    }
    l.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_request_served_by_a_spare_and_a_launch_is_fulfilled_by_the_launch() {
    let (_mem, store) = store();
    let cfg = BASE.replace("  - name: small\n", "  - name: small\n    min-ready: 1\n");
    let l = start(store.clone(), &cfg, "l1");
    until("a ready spare", || async {
        nodes_in(&store, NodeState::Ready).await == 1
    })
    .await;
    let spare = store.list_nodes().await.expect("list").records[0]
        .id
        .clone();
    let zuul = Requestor::new(store.clone(), "zuul-system-id");
    let id = zuul
        .submit(&NewRequest::new(vec!["large".into(), "small".into()]))
        .await
        .expect("submit");
    let Outcome::Fulfilled(req) = zuul
        .wait(&id, Duration::from_secs(300))
        .await
        .expect("wait")
    else {
        panic!("request failed")
    };
    // In node_types order: the launched large node, then the spare.
    assert_eq!(req.value.nodes.len(), 2);
    assert_eq!(req.value.nodes[1], spare);
    assert_ne!(req.value.nodes[0], spare);
    // The spare's min-ready request, then this one: each by its launch.
    assert_eq!(l.status.fulfilled_on_ready(), 2);
    l.stop().await;
}

#[tokio::test(start_paused = true)]
async fn min_ready_nodes_appear_without_overshoot() {
    let (_mem, store) = store();
    let cfg = BASE.replace("  - name: small\n", "  - name: small\n    min-ready: 3\n");
    let l = start(store.clone(), &cfg, "l1");
    until("three ready spares", || async {
        nodes_in(&store, NodeState::Ready).await == 3
    })
    .await;
    // Let many passes go by: still exactly three, and no request left over.
    l.passes(30).await;
    assert_eq!(nodes_in(&store, NodeState::Ready).await, 3);
    assert_eq!(store.list_nodes().await.expect("list").records.len(), 3);
    assert_eq!(l.cloud("sim").server_count().await, 3);
    assert!(
        store
            .list_requests()
            .await
            .expect("list")
            .records
            .is_empty()
    );
    l.stop().await;
}

#[tokio::test(start_paused = true)]
async fn an_unknown_label_fails_at_once() {
    let (_mem, store) = store();
    let l = start(store.clone(), BASE, "l1");
    let zuul = Requestor::new(store.clone(), "zuul");
    let id = zuul
        .submit(&NewRequest::new(vec!["gpu".into()]))
        .await
        .expect("submit");
    let outcome = zuul.wait(&id, Duration::from_secs(60)).await.expect("wait");
    assert!(matches!(outcome, Outcome::Failed(_)));
    l.stop().await;
}

/// A request record written by someone else, as raw JSON; its id.
async fn raw_request(store: &Store, json: &str) -> String {
    let path = store
        .backend()
        .create(
            &nodepool_core::store::paths::request_prefix("200"),
            json.as_bytes(),
            nodepool_core::store::CreateMode::PersistentSequential,
        )
        .await
        .expect("create");
    path.rsplit('/').next().expect("id").to_owned()
}

/// A request record as stored, as generic JSON.
async fn raw_record(store: &Store, id: &str) -> serde_json::Value {
    let (data, _) = store
        .backend()
        .get(&nodepool_core::store::paths::request(id))
        .await
        .expect("get")
        .expect("exists");
    serde_json::from_slice(&data).expect("json")
}

#[tokio::test(start_paused = true)]
async fn a_request_whose_node_types_is_not_a_list_fails_and_one_without_is_fulfilled_empty() {
    let (_mem, store) = store();
    let bad = raw_request(
        &store,
        r#"{"state": "requested", "node_types": "small", "requestor": "someone", "state_time": 1.0}"#,
    )
    .await;
    let none = raw_request(
        &store,
        r#"{"state": "requested", "requestor": "someone", "state_time": 1.0}"#,
    )
    .await;
    // Both are listed (not skipped as unreadable).
    let listed = store.list_requests().await.expect("list");
    assert!(listed.malformed.is_empty(), "{:?}", listed.malformed);
    assert_eq!(listed.records.len(), 2);
    let l = start(store.clone(), BASE, "l1");
    until("the malformed request failed", || async {
        raw_record(&store, &bad).await["state"] == "failed"
    })
    .await;
    // Its node_types is written back as it was.
    assert_eq!(raw_record(&store, &bad).await["node_types"], "small");
    until("the empty request fulfilled", || async {
        raw_record(&store, &none).await["state"] == "fulfilled"
    })
    .await;
    assert_eq!(
        raw_record(&store, &none).await["nodes"],
        serde_json::json!([])
    );
    assert_eq!(
        l.cloud("sim").server_count().await,
        0,
        "nothing was launched"
    );
    l.stop().await;
}

#[tokio::test(start_paused = true)]
async fn launch_failures_are_retried_then_the_request_fails() {
    let (_mem, store) = store();
    let cfg = BASE.replace(
        "      boot-delay: 2\n",
        "      boot-delay: 2\n      failure-rates: {create: 1.0}\n",
    );
    let l = start(store.clone(), &cfg, "l1");
    let zuul = Requestor::new(store.clone(), "zuul");
    let id = zuul
        .submit(&NewRequest::new(vec!["small".into()]))
        .await
        .expect("submit");
    let outcome = zuul
        .wait(&id, Duration::from_secs(300))
        .await
        .expect("wait");
    let Outcome::Failed(req) = outcome else {
        panic!("should fail")
    };
    assert_eq!(req.value.declined_by.len(), 1);
    // The failed node and its servers are cleaned up.
    until("failed node deleted", || async {
        store.list_nodes().await.expect("list").records.is_empty()
            && l.cloud("sim").server_count().await == 0
    })
    .await;
    l.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_quota_error_aborts_and_relaunches_once_quota_frees() {
    let (_mem, store) = store();
    let l = start(store.clone(), BASE, "l1");
    let zuul = Requestor::new(store.clone(), "zuul");
    // The cloud is full for something we do not manage.
    until("cloud set up", || async {
        l.clouds.lock().expect("lock").contains_key("sim")
    })
    .await;
    l.cloud("sim")
        .set_quota(nodepool_core::model::Limits::unlimited().with("instances", 0))
        .await;
    let id = zuul
        .submit(&NewRequest::new(vec!["small".into()]))
        .await
        .expect("submit");
    until("an aborted launch", || async {
        l.cloud("sim").server_count().await == 0
            && store
                .get_request(&id)
                .await
                .expect("get")
                .is_some_and(|r| r.value.state == RequestState::Pending)
    })
    .await;
    l.passes(20).await;
    assert_eq!(
        store
            .get_request(&id)
            .await
            .expect("get")
            .map(|r| r.value.state),
        Some(RequestState::Pending),
        "a quota error does not fail the request"
    );
    l.cloud("sim")
        .set_quota(nodepool_core::model::Limits::unlimited())
        .await;
    let outcome = zuul
        .wait(&id, Duration::from_secs(600))
        .await
        .expect("wait");
    assert!(matches!(outcome, Outcome::Fulfilled(_)));
    l.stop().await;
}

#[tokio::test(start_paused = true)]
async fn leaked_servers_are_deleted_after_two_listings() {
    let (_mem, store) = store();
    let l = start(store.clone(), BASE, "l1");
    until("cloud set up", || async {
        l.clouds.lock().expect("lock").contains_key("sim")
    })
    .await;
    let leaked = l.cloud("sim").inject_leaked_server("0000099999").await;
    until("leaked server deleted", || async {
        l.cloud("sim").server_count().await == 0
    })
    .await;
    assert!(!leaked.is_empty());
    l.stop().await;
}

#[tokio::test(start_paused = true)]
async fn servers_tagged_the_legacy_way_are_ours_kept_with_their_node_and_leaked_without() {
    let (_mem, store) = store();
    let l = start(store.clone(), BASE, "l1");
    until("cloud set up", || async {
        l.clouds.lock().expect("lock").contains_key("sim")
    })
    .await;
    let sim = l.cloud("sim");
    // A held node whose server carries the pre-2019 JSON `nodepool` tag.
    let node = Node::new(NodeState::Hold, 0.0, "sim", "main", vec!["small".into()]);
    let id = store.create_node(&node).await.expect("create node");
    let kept = sim.inject_legacy_tagged_server(&id).await;
    let mut v = store.get_node(&id).await.expect("read").expect("node");
    v.value.external_id = Some(kept.clone());
    store
        .update_node(&id, &v.value, v.version)
        .await
        .expect("record the server");
    // The same tag for a node that does not exist: leaked.
    let leaked = sim.inject_legacy_tagged_server("0000088888").await;
    until("the legacy-tagged leaked server deleted", || async {
        !sim.instances()
            .await
            .iter()
            .any(|i| i.external_id == leaked)
    })
    .await;
    assert!(
        sim.instances().await.iter().any(|i| i.external_id == kept),
        "the held node's legacy-tagged server was deleted"
    );
    assert_eq!(
        l.metrics.counter("nodepool.provider.sim.leaked.instances"),
        1
    );
    l.stop().await;
}

/// The simulated provider of [`BASE`] with extra provider keys and
/// simulation knobs.
fn base_with(provider: &str, simulation: &str) -> String {
    BASE.replace(
        "    driver: simulated\n",
        &format!("    driver: simulated\n{provider}"),
    )
    .replace(
        "      boot-delay: 2\n",
        &format!("      boot-delay: 2\n{simulation}"),
    )
}

async fn resource_ids(l: &Running, kind: ResourceKind) -> Vec<String> {
    let mut v: Vec<String> = l
        .cloud("sim")
        .list_resources(kind)
        .await
        .expect("list")
        .into_iter()
        .map(|r| r.id)
        .collect();
    v.sort();
    v
}

#[tokio::test(start_paused = true)]
async fn leaked_floating_ips_and_down_ports_are_deleted_and_counted() {
    let (_mem, store) = store();
    let cfg = base_with(
        "    clean-floating-ips: true\n    port-cleanup-interval: 120\n",
        "      leaked-floating-ips: 2\n      leaked-ports: 3\n",
    );
    let started = tokio::time::Instant::now();
    let l = start(store.clone(), &cfg, "l1");
    until("cloud set up", || async {
        l.clouds.lock().expect("lock").contains_key("sim")
    })
    .await;
    let cloud = l.cloud("sim");
    let leaked_ports = resource_ids(&l, ResourceKind::Port).await;
    assert_eq!(leaked_ports.len(), 3);
    // Not ours to delete: an attached floating IP and a DHCP port.
    let attached = cloud.inject_floating_ip(true).await;
    let dhcp = cloud.inject_down_port("network:dhcp").await;
    until("unattached floating IPs deleted", || async {
        resource_ids(&l, ResourceKind::FloatingIp).await == [attached.clone()]
    })
    .await;
    assert_eq!(
        l.metrics
            .counter("nodepool.provider.sim.leaked.floatingips"),
        2
    );
    // A port that goes DOWN later is younger than the interval when the
    // first ones go.
    tokio::time::sleep(Duration::from_secs(60)).await;
    let now = resource_ids(&l, ResourceKind::Port).await;
    assert!(
        leaked_ports.iter().all(|p| now.contains(p)),
        "ports DOWN for less than port-cleanup-interval stay: {now:?}"
    );
    let young = cloud.inject_down_port("").await;
    until("ports DOWN for the interval deleted", || async {
        let now = resource_ids(&l, ResourceKind::Port).await;
        leaked_ports.iter().all(|p| !now.contains(p))
    })
    .await;
    assert!(
        started.elapsed() >= Duration::from_secs(120),
        "deleted after {:?}, before port-cleanup-interval",
        started.elapsed()
    );
    let mut left = vec![dhcp.clone(), young.clone()];
    left.sort();
    assert_eq!(resource_ids(&l, ResourceKind::Port).await, left);
    assert_eq!(l.metrics.counter("nodepool.provider.sim.leaked.ports"), 3);
    until("the younger port deleted an interval later", || async {
        resource_ids(&l, ResourceKind::Port).await == [dhcp.clone()]
    })
    .await;
    assert_eq!(l.metrics.counter("nodepool.provider.sim.leaked.ports"), 4);
    assert_eq!(resource_ids(&l, ResourceKind::FloatingIp).await, [attached]);
    assert_eq!(
        l.metrics
            .counter("nodepool.provider.sim.leaked.floatingips"),
        2
    );
    l.stop().await;
}

#[tokio::test(start_paused = true)]
async fn floating_ips_and_ports_stay_without_the_options() {
    let (_mem, store) = store();
    let cfg = base_with(
        "    port-cleanup-interval: 0\n",
        "      leaked-floating-ips: 2\n      leaked-ports: 2\n",
    );
    let l = start(store.clone(), &cfg, "l1");
    until("cloud set up", || async {
        l.clouds.lock().expect("lock").contains_key("sim")
    })
    .await;
    let fips = resource_ids(&l, ResourceKind::FloatingIp).await;
    let ports = resource_ids(&l, ResourceKind::Port).await;
    assert_eq!((fips.len(), ports.len()), (2, 2));
    // Many leak checks (every 5 s) and passes later.
    tokio::time::sleep(Duration::from_secs(300)).await;
    l.passes(5).await;
    assert_eq!(resource_ids(&l, ResourceKind::FloatingIp).await, fips);
    assert_eq!(resource_ids(&l, ResourceKind::Port).await, ports);
    assert_eq!(
        l.metrics
            .counter("nodepool.provider.sim.leaked.floatingips"),
        0
    );
    assert_eq!(l.metrics.counter("nodepool.provider.sim.leaked.ports"), 0);
    l.stop().await;
}

#[tokio::test(start_paused = true)]
async fn two_launchers_share_a_store_without_double_allocation_or_overshoot() {
    let (mem, store) = store();
    let cfg = BASE.replace("  - name: small\n", "  - name: small\n    min-ready: 4\n");
    let a = start(store.clone(), &cfg, "la");
    let b = start(Store::new(Arc::new(mem.new_session())), &cfg, "lb");
    let zuul = Requestor::new(store.clone(), "zuul");
    let mut ids = Vec::new();
    for _ in 0..6 {
        ids.push(
            zuul.submit(&NewRequest::new(vec!["small".into()]))
                .await
                .expect("submit"),
        );
    }
    let mut seen = std::collections::BTreeSet::new();
    for id in &ids {
        let Outcome::Fulfilled(req) = zuul.wait(id, Duration::from_secs(300)).await.expect("wait")
        else {
            panic!("failed")
        };
        for n in &req.value.nodes {
            assert!(seen.insert(n.clone()), "node {n} given to two requests");
        }
    }
    until("min-ready restored", || async {
        let nodes = store.list_nodes().await.expect("list").records;
        nodes
            .iter()
            .filter(|n| n.node.state == NodeState::Ready && n.node.allocated_to.is_none())
            .count()
            == 4
    })
    .await;
    a.passes(20).await;
    b.passes(20).await;
    let spares = store
        .list_nodes()
        .await
        .expect("list")
        .records
        .iter()
        .filter(|n| n.node.allocated_to.is_none())
        .count();
    assert_eq!(spares, 4, "min-ready overshot with two launchers");
    a.stop().await;
    b.stop().await;
}

#[tokio::test(start_paused = true)]
async fn held_nodes_expire_with_max_hold_age() {
    let (_mem, store) = store();
    let cfg = format!("max-hold-age: 3600\n{BASE}");
    let l = start(store.clone(), &cfg, "l1");
    let zuul = Requestor::new(store.clone(), "zuul");
    let id = zuul
        .submit(&NewRequest::new(vec!["small".into()]))
        .await
        .expect("submit");
    let Outcome::Fulfilled(req) = zuul
        .wait(&id, Duration::from_secs(300))
        .await
        .expect("wait")
    else {
        panic!("failed")
    };
    let mut set = zuul.accept(&id, &req.value).await.expect("accept");
    zuul.use_nodes(&mut set, "p").await.expect("use");
    let held = set.nodes[0].id.clone();
    zuul.hold(
        set,
        &nodepool_requestor::Hold {
            job: "tenant project job .*".into(),
            comment: "debugging".into(),
            expiration: None,
        },
    )
    .await
    .expect("hold");
    tokio::time::sleep(Duration::from_secs(3500)).await;
    assert_eq!(
        store
            .get_node(&held)
            .await
            .expect("get")
            .map(|n| n.value.state),
        Some(NodeState::Hold),
        "kept before max-hold-age"
    );
    until("held node deleted after max-hold-age", || async {
        store.get_node(&held).await.expect("get").is_none()
    })
    .await;
    l.stop().await;
}

#[tokio::test(start_paused = true)]
async fn reload_adds_a_label_and_drains_a_removed_provider() {
    let (_mem, store) = store();
    let l = start(store.clone(), BASE, "l1");
    let zuul = Requestor::new(store.clone(), "zuul");
    let with_medium = BASE
        .replace("  - name: large\n", "  - name: large\n  - name: medium\n")
        .replace(
            "          - {name: large, cloud-image: img, flavor-name: l}\n",
            "          - {name: large, cloud-image: img, flavor-name: l}\n          - {name: medium, cloud-image: img, flavor-name: s}\n",
        );
    l.config
        .send(Arc::new(Config::from_yaml(&with_medium).expect("valid")))
        .expect("send");
    let id = zuul
        .submit(&NewRequest::new(vec!["medium".into()]))
        .await
        .expect("submit");
    assert!(matches!(
        zuul.wait(&id, Duration::from_secs(300))
            .await
            .expect("wait"),
        Outcome::Fulfilled(_)
    ));
    // Drain: max-servers -1 launches nothing more.
    let drained = with_medium.replace("max-servers: 10", "max-servers: -1");
    l.reload(&drained).await;
    let id2 = zuul
        .submit(&NewRequest::new(vec!["small".into()]))
        .await
        .expect("submit");
    assert!(matches!(
        zuul.wait(&id2, Duration::from_secs(60))
            .await
            .expect("wait"),
        Outcome::Failed(_)
    ));
    l.stop().await;
}

#[tokio::test(start_paused = true)]
async fn shutdown_unregisters_components() {
    let (mem, store) = store();
    let l = start(store.clone(), BASE, "l1");
    let observer = Store::new(Arc::new(mem.new_session()));
    until("pool registered", || async {
        !observer
            .list_components(nodepool_core::model::ComponentKind::Pool)
            .await
            .expect("list")
            .records
            .is_empty()
    })
    .await;
    let pools = observer
        .list_components(nodepool_core::model::ComponentKind::Pool)
        .await
        .expect("list");
    let id = pools.records[0].1.id.clone().expect("pool id");
    assert!(id.starts_with("l1-PoolWorker.sim-main-"), "{id}");
    l.stop().await;
    let pools = observer
        .list_components(nodepool_core::model::ComponentKind::Pool)
        .await
        .expect("list");
    assert!(pools.records.is_empty());
}

/// `bad` is preferred and the only one serving `gpu`; its API answers
/// within 5 s or is counted as failed.
const BAD_AND_GOOD: &str = r#"
labels:
  - name: small
  - name: gpu
providers:
  - name: bad
    driver: simulated
    priority: 50
    simulation:
      api-timeout: 5
      boot-delay: 2
      flavors: [{name: s, vcpus: 1, ram: 1024}]
    cloud-images: [{name: img}]
    pools:
      - name: main
        max-servers: 50
        labels:
          - {name: small, cloud-image: img, flavor-name: s}
          - {name: gpu, cloud-image: img, flavor-name: s}
  - name: good
    driver: simulated
    priority: 100
    simulation:
      boot-delay: 2
      flavors: [{name: s, vcpus: 1, ram: 1024}]
    cloud-images: [{name: img}]
    pools:
      - name: main
        max-servers: 50
        labels: [{name: small, cloud-image: img, flavor-name: s}]
"#;

/// A burst while the preferred cloud's API fails: every request the
/// healthy cloud can serve is served there, fast (virtual time, so the
/// bound is exact: the old behaviour took nodes x retries x api-timeout);
/// requests only the failing cloud serves wait, unfailed, and are served
/// once it recovers; nothing is left behind in either cloud.
async fn a_failing_cloud_is_routed_around(fault: ApiFault) {
    let (_mem, store) = store();
    let l = start(store.clone(), BAD_AND_GOOD, "l1");
    until("first pass", || async { l.status.is_ready() }).await;
    let bad = l.cloud("bad");
    let good = l.cloud("good");
    bad.set_api_fault(Some(fault)).await;
    let zuul = Requestor::new(store.clone(), "zuul");
    let t0 = tokio::time::Instant::now();
    let mut small = Vec::new();
    for _ in 0..20 {
        small.push(
            zuul.submit(&NewRequest::new(vec!["small".into()]))
                .await
                .expect("submit"),
        );
    }
    let mut gpu = Vec::new();
    for _ in 0..2 {
        gpu.push(
            zuul.submit(&NewRequest::new(vec!["gpu".into()]))
                .await
                .expect("submit"),
        );
    }
    let mut sets = Vec::new();
    for id in &small {
        let Outcome::Fulfilled(req) = zuul.wait(id, Duration::from_secs(600)).await.expect("wait")
        else {
            panic!("{fault:?}: request {id} failed")
        };
        for n in &req.value.nodes {
            let node = store.get_node(n).await.expect("get").expect("node");
            assert_eq!(node.value.provider, "good", "{fault:?}: node {n} of {id}");
        }
        sets.push(zuul.accept(id, &req.value).await.expect("accept"));
    }
    let took = t0.elapsed();
    assert!(
        took < Duration::from_secs(60),
        "{fault:?}: the burst took {took:?} of virtual time"
    );
    // The bad cloud is marked unavailable, visibly.
    assert_eq!(
        l.metrics.counter("nodepool.provider.bad.outages"),
        1,
        "{fault:?}"
    );
    assert_eq!(
        l.metrics.gauge_value("nodepool.provider.bad.health"),
        Some(0.0)
    );
    assert_eq!(
        l.metrics.gauge_value("nodepool.provider.good.health"),
        Some(1.0)
    );
    let down = l.status.unavailable_providers();
    assert_eq!(down.len(), 1, "{down:?}");
    assert_eq!(down[0].provider, "bad");
    assert!(
        l.status.readiness().is_ready(),
        "an outage is no readiness problem"
    );
    let pools = store
        .list_components(ComponentKind::Pool)
        .await
        .expect("pools")
        .records;
    let bad_pool = pools
        .iter()
        .map(|(_, c)| c)
        .find(|c| c.provider_name.as_deref() == Some("bad"))
        .expect("bad's pool component");
    assert_eq!(bad_pool.paused, Some(true));
    let why = bad_pool.provider_unavailable.as_ref().expect("says why");
    assert!(!why.reason.is_empty());
    // Requests only the bad cloud serves wait; they are not failed.
    tokio::time::sleep(Duration::from_secs(120)).await;
    for id in &gpu {
        let r = store.get_request(id).await.expect("get").expect("request");
        assert_eq!(r.value.state, RequestState::Requested, "{fault:?}: {id}");
        assert!(r.value.declined_by.is_empty(), "{fault:?}: {id}");
    }
    // The cloud recovers: a probe finds it, and the waiting requests are
    // served there.
    bad.set_api_fault(None).await;
    for id in &gpu {
        let Outcome::Fulfilled(req) = zuul.wait(id, Duration::from_secs(300)).await.expect("wait")
        else {
            panic!("{fault:?}: request {id} failed after the recovery")
        };
        sets.push(zuul.accept(id, &req.value).await.expect("accept"));
    }
    assert!(l.status.unavailable_providers().is_empty());
    // Every node returned; both clouds end empty (the launches the fault
    // cut short are cleaned up too).
    for mut set in sets {
        zuul.use_nodes(&mut set, "org/project")
            .await
            .expect("in-use");
        zuul.return_nodes(set).await.expect("used");
    }
    until("every node and server deleted", || async {
        store.list_nodes().await.expect("list").records.is_empty()
            && bad.server_count().await == 0
            && good.server_count().await == 0
    })
    .await;
    l.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_hung_cloud_is_routed_around() {
    a_failing_cloud_is_routed_around(ApiFault::Hang).await;
}

#[tokio::test(start_paused = true)]
async fn a_cloud_answering_500_is_routed_around() {
    a_failing_cloud_is_routed_around(ApiFault::ServerError).await;
}

#[tokio::test(start_paused = true)]
async fn a_rate_limited_cloud_is_routed_around() {
    a_failing_cloud_is_routed_around(ApiFault::RateLimit {
        retry_after: Some(Duration::from_secs(20)),
    })
    .await;
}
