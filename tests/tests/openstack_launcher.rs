//! The launcher end to end against a REAL OpenStack: the project's testbed
//! (`testbed/openstack/`, started by `scripts/test.d/30-openstack.sh`).
//!
//! An in-process launcher on an in-memory store, with an `OpenStackProvider`
//! built from a `nodepool.yaml` provider entry exactly as the daemon builds
//! it, keeps two `min-ready` spares booted in Nova; a request made through
//! the Zuul-side requestor library is served from them; the used nodes are
//! deleted in Nova. Everything is checked against Nova's and Neutron's own
//! APIs, not only against the store.
//!
//! Feature `testbed` of `nodepool-tests` only (a whole-system test: the
//! launcher runtime and the OpenStack backend; `scripts/test.d/
//! 30-openstack.sh` runs it after the backend's own testbed tests). A
//! missing cloud FAILS the test (nothing is skipped). The clouds.yaml is `$NODEPOOL_TEST_CLOUDS_YAML`, else the one
//! the testbed writes (`/tmp/openstack-peer/clouds.yaml`).
//!
//! Quota: at most four `np.tiny` servers (1 vCPU each) exist at once (two
//! in use, two replacements), well within Nova's default 10 instances / 20
//! cores. The provider name is unique per run (`testbed-e2e-<random>`), so
//! the launcher's leak cleanup and this test's own cleanup only ever touch
//! servers of this run; the `testbed-` prefix lets the other testbed tests'
//! sweep remove what a killed run left behind.
//!
//! The leaked-resource test runs a launcher with `clean-floating-ips` and a
//! 5 s `port-cleanup-interval`, which (as in Python) delete every
//! unattached floating IP and every DOWN server port of what the cloud
//! user sees: the two tests of this file take turns ([`SERIAL`]), and no
//! other testbed test may run beside this file (30-openstack.sh runs it
//! after the others).
//!
//! The mixed-fleet test (issue 17, docs/migrating.md) runs the real Python
//! Nodepool 11 launcher (`NODEPOOL_TEST_PY_NODEPOOL`'s venv) and our
//! `nodepool-launcher` as processes on one configuration file, on the test
//! ZooKeeper over TLS (`NODEPOOL_TEST_ZK_TLS_HOSTS` and its certificates)
//! and this cloud, then switches the Python launcher off.
#![cfg(feature = "testbed")]

use std::collections::BTreeSet;
use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::FutureExt;
use nodepool_core::config::Config;
use nodepool_core::launcher::{Launcher, LauncherError, LauncherSettings, ProviderFactory};
use nodepool_core::model::{Node, NodeState};
use nodepool_core::provider::{Provider, ResourceKind};
use nodepool_core::store::Store;
use nodepool_model::store::MemoryStore;
use nodepool_openstack::api::{ApiRequest, Raw, Service};
use nodepool_openstack::{ClientOptions, CloudsLoader, OpenStackProvider, ProviderOptions};
use nodepool_requestor::{NewRequest, Outcome, Requestor};
use serde_json::Value;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// Every run's provider name starts with this (see the module docs).
const PREFIX: &str = "testbed-e2e-";
const LABEL: &str = "e2e-tiny";
const POOL: &str = "main";
const IMAGE: &str = "np-base";
/// Bound of each wait on the cloud: boots take 5–30 s on a loaded machine,
/// a launch is retried after a failure, so this leaves a wide margin.
const WAIT: Duration = Duration::from_secs(300);

/// The tests of this file take turns: the leak cleanup of one would delete
/// the other's DOWN ports and floating IPs.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn clouds_yaml() -> PathBuf {
    let p = std::env::var_os("NODEPOOL_TEST_CLOUDS_YAML")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/tmp/openstack-peer/clouds.yaml"));
    assert!(
        p.is_file(),
        "the OpenStack testbed is not running: {} is missing. Start it with \
         testbed/openstack/install.sh && testbed/openstack/start.sh \
         (scripts/test.d/30-openstack.sh does both), or set NODEPOOL_TEST_CLOUDS_YAML",
        p.display()
    );
    p
}

/// Production options, but with testbed.rs's client timeout: CI machines
/// are shared and Nova's API is slow there.
fn options() -> ProviderOptions {
    ProviderOptions {
        client: ClientOptions {
            timeout: Duration::from_secs(180),
            ..ClientOptions::default()
        },
        delete_timeout: Duration::from_secs(180),
        ..ProviderOptions::default()
    }
}

/// The launcher's configuration. `rate: 0.1`: the testbed serves only us,
/// and production's 1 s between calls would only make the test slower.
/// `launch-timeout` bounds a stuck boot well inside the test's waits, so a
/// launch is retried instead of the test timing out. The seeded `private`
/// network has a router to `public`, so floating IPs work.
fn config_yaml(provider: &str) -> String {
    format!(
        r#"
labels:
  - name: {LABEL}
    min-ready: 2
providers:
  - name: {provider}
    driver: openstack
    cloud: peer
    rate: 0.1
    launch-timeout: 120
    launch-retries: 3
    cloud-images:
      - name: {IMAGE}
    pools:
      - name: {POOL}
        max-servers: 4
        networks: [private]
        auto-floating-ip: true
        host-key-checking: false
        labels:
          - name: {LABEL}
            cloud-image: {IMAGE}
            flavor-name: np.tiny
"#
    )
}

fn checker() -> OpenStackProvider {
    let cloud = CloudsLoader::file(clouds_yaml())
        .load(Some("peer"), None)
        .unwrap_or_else(|e| panic!("{e}"));
    OpenStackProvider::new(&format!("{PREFIX}checker"), cloud, options())
        .unwrap_or_else(|e| panic!("{e}"))
}

/// Polls `f` (every 250 ms, bounded by `timeout`) until it gives `Ok`; on
/// timeout fails with the last `Err`, which says what was seen instead.
async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        match f().await {
            Ok(v) => return v,
            Err(seen) if tokio::time::Instant::now() >= deadline => {
                panic!("{what}: not within {timeout:?}; last seen: {seen}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(250)).await,
        }
    }
}

/// `GET /servers/{id}` straight from Nova: `None` on 404.
async fn nova_server(p: &OpenStackProvider, id: &str) -> Result<Option<Value>, String> {
    let req = ApiRequest::get(Service::Compute, format!("servers/{id}"));
    match p.client().execute(&Raw(req)).await {
        Ok(r) => Ok(Some(r.json().map_err(|e| e.to_string())?["server"].clone())),
        Err(e) if e.is_not_found() => Ok(None),
        Err(e) => Err(format!("GET servers/{id}: {e}")),
    }
}

/// Ids of the floating IPs Neutron has with this address.
async fn floating_ips_at(p: &OpenStackProvider, address: &str) -> Vec<String> {
    let req =
        ApiRequest::get(Service::Network, "floatingips").query("floating_ip_address", address);
    let r = p
        .client()
        .execute(&Raw(req))
        .await
        .unwrap_or_else(|e| panic!("list floating IPs: {e}"));
    let v = r.json().unwrap_or_else(|e| panic!("{e}"));
    v["floatingips"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|f| f["id"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// Server ids Nova lists tagged with this provider name.
async fn servers_of(p: &OpenStackProvider, provider: &str) -> Result<BTreeSet<String>, String> {
    Ok(p.list_instances()
        .await
        .map_err(|e| format!("list servers: {e}"))?
        .into_iter()
        .filter(|i| i.provider_name().as_deref() == Some(provider))
        .map(|i| i.external_id)
        .collect())
}

/// Deletes every server tagged with a provider name `matches` accepts, and
/// the floating IPs at `addresses`, until Nova lists none (bounded).
async fn delete_servers(
    p: &OpenStackProvider,
    matches: impl Fn(&str) -> bool,
    addresses: &BTreeSet<String>,
) -> Result<(), String> {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let left: Vec<String> = p
            .list_instances()
            .await
            .map_err(|e| format!("list servers: {e}"))?
            .into_iter()
            .filter(|i| i.provider_name().is_some_and(|n| matches(&n)))
            .map(|i| i.external_id)
            .collect();
        if left.is_empty() {
            break;
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(format!("servers still there after cleanup: {left:?}"));
        }
        // One at a time: a cleanup must not pile load on a struggling cloud.
        for id in left {
            if let Err(e) = p.delete_instance(&id).await {
                eprintln!("cleanup: deleting server {id}: {e}");
            }
        }
    }
    // The provider releases a server's floating IP with it; this catches
    // one Nova's address cache did not show yet.
    for a in addresses {
        for id in floating_ips_at(p, a).await {
            p.delete_resource(ResourceKind::FloatingIp, &id)
                .await
                .map_err(|e| format!("releasing floating IP {a}: {e}"))?;
        }
    }
    Ok(())
}

fn log_to_test_output() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("nodepool_core=info")),
        )
        .with_test_writer()
        .try_init();
}

/// The node records in `state`, by id.
async fn nodes_in(store: &Store, state: NodeState) -> Vec<(String, Node)> {
    store
        .list_nodes()
        .await
        .expect("list nodes")
        .records
        .into_iter()
        .filter(|r| r.node.state == state)
        .map(|r| (r.id, (*r.node).clone()))
        .collect()
}

fn summary(store_nodes: &[(String, Node)]) -> String {
    store_nodes
        .iter()
        .map(|(id, n)| {
            format!(
                "{id}: {:?} allocated to {:?}, server {:?}",
                n.state, n.allocated_to, n.external_id
            )
        })
        .collect::<Vec<_>>()
        .join("; ")
}

async fn all_nodes(store: &Store) -> Vec<(String, Node)> {
    store
        .list_nodes()
        .await
        .expect("list nodes")
        .records
        .into_iter()
        .map(|r| (r.id, (*r.node).clone()))
        .collect()
}

/// Unallocated `ready` nodes other than `except`, once there are `n`.
async fn spares(
    store: &Store,
    n: usize,
    except: &BTreeSet<String>,
) -> Result<Vec<(String, Node)>, String> {
    let ready: Vec<_> = nodes_in(store, NodeState::Ready)
        .await
        .into_iter()
        .filter(|(id, node)| node.allocated_to.is_none() && !except.contains(id))
        .collect();
    if ready.len() >= n {
        Ok(ready)
    } else {
        Err(summary(&all_nodes(store).await))
    }
}

/// Nova has the node's server ACTIVE, named and tagged as Nodepool tags it,
/// and the node's addresses are the ones Neutron gave it.
async fn check_in_nova(p: &OpenStackProvider, provider: &str, id: &str, node: &Node) {
    let server_id = node
        .external_id
        .as_deref()
        .unwrap_or_else(|| panic!("ready node {id} has no external_id"));
    let s = nova_server(p, server_id)
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .unwrap_or_else(|| panic!("node {id}: server {server_id} is not in Nova"));
    assert_eq!(s["status"], "ACTIVE", "node {id}: {s}");
    assert_eq!(s["name"], format!("np{id}"), "{s}");
    let meta = &s["metadata"];
    assert_eq!(meta["nodepool_node_id"], id, "{s}");
    assert_eq!(meta["nodepool_provider_name"], provider, "{s}");
    assert_eq!(meta["nodepool_pool_name"], POOL, "{s}");
    assert_eq!(meta["groups"], format!("{provider},{IMAGE},{LABEL}"), "{s}");
    assert_eq!(node.provider, provider);
    assert_eq!(node.pool, POOL);
    assert_eq!(node.node_type, vec![LABEL.to_owned()]);
    assert_eq!(node.cloud.as_deref(), Some("peer"));
    let fip = node
        .public_ipv4
        .as_deref()
        .unwrap_or_else(|| panic!("node {id} has no floating IP: {node:?}"));
    assert!(fip.starts_with("203.0.113."), "{fip}");
    assert_eq!(node.interface_ip.as_deref(), Some(fip), "{node:?}");
    assert!(
        node.private_ipv4
            .as_deref()
            .is_some_and(|a| a.starts_with("10.20.0.")),
        "{node:?}"
    );
    assert_eq!(
        floating_ips_at(p, fip).await.len(),
        1,
        "Neutron has the floating IP {fip}"
    );
}

struct Running {
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), LauncherError>>,
    status: Arc<nodepool_core::launcher::LauncherStatus>,
    metrics: Arc<nodepool_core::launcher::Metrics>,
    // Dropping it would read as "no more configuration"; keep it alive.
    _config: watch::Sender<Arc<Config>>,
}

fn start_launcher(store: Store, yaml: &str) -> Running {
    start_launcher_with(store, yaml, LauncherSettings::default())
}

fn start_launcher_with(store: Store, yaml: &str, settings: LauncherSettings) -> Running {
    let cfg = Arc::new(Config::from_yaml(yaml).unwrap_or_else(|e| panic!("config: {e}")));
    let loader = CloudsLoader::file(clouds_yaml());
    // As the daemon builds providers (`OpenStackProvider::from_config`),
    // but reading the testbed's clouds.yaml.
    let factory: ProviderFactory = Arc::new(move |pc| {
        let p = OpenStackProvider::from_config_with(pc, &loader, options())
            .map_err(|e| e.to_string())?;
        Ok(Arc::new(p) as Arc<dyn Provider>)
    });
    let launcher = Launcher::new(
        store,
        factory,
        LauncherSettings {
            hostname: "e2e-launcher".into(),
            delete_timeout: Duration::from_secs(180),
            ..settings
        },
    );
    let status = launcher.status();
    let metrics = launcher.metrics();
    let (tx, rx) = watch::channel(cfg);
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(launcher.run(rx, shutdown.clone()));
    Running {
        shutdown,
        task,
        status,
        metrics,
        _config: tx,
    }
}

/// What a run measured, printed at the end (`--nocapture` shows it).
#[derive(Default, Debug)]
struct Timings {
    spares_ready: Duration,
    request_fulfilled: Duration,
    replacements_ready: Duration,
    used_deleted: Duration,
}

async fn scenario(
    p: &OpenStackProvider,
    provider: &str,
    launcher_store: Store,
    zuul_store: Store,
    addresses: &std::sync::Mutex<BTreeSet<String>>,
    started: Instant,
    status: &nodepool_core::launcher::LauncherStatus,
) -> Timings {
    let mut t = Timings::default();
    let remember = |nodes: &[(String, Node)]| {
        if let Ok(mut a) = addresses.lock() {
            a.extend(nodes.iter().filter_map(|(_, n)| n.public_ipv4.clone()));
        }
    };

    // min-ready 2: two spares, ACTIVE in Nova with our metadata.
    let none = BTreeSet::new();
    let first = eventually("two ready spares", WAIT, || async {
        spares(&launcher_store, 2, &none)
            .await
            .map_err(|seen| format!("{seen} (launcher: {})", status.report()))
    })
    .await;
    t.spares_ready = started.elapsed();
    remember(&first);
    assert_eq!(first.len(), 2, "exactly min-ready: {}", summary(&first));
    for (id, node) in &first {
        check_in_nova(p, provider, id, node).await;
    }
    let first_ids: BTreeSet<String> = first.iter().map(|(id, _)| id.clone()).collect();
    let first_servers: BTreeSet<String> = first
        .iter()
        .filter_map(|(_, n)| n.external_id.clone())
        .collect();
    assert_eq!(
        servers_of(p, provider).await.expect("list"),
        first_servers,
        "Nova has exactly the spares' servers, and they are the nodes' external_id"
    );

    // A Zuul request for two nodes: served from the spares.
    let zuul = Requestor::new(zuul_store, "e2e5c0ffee0000000000000000000001");
    let asked = Instant::now();
    let rid = zuul
        .submit(&NewRequest::new(vec![LABEL.into(), LABEL.into()]))
        .await
        .expect("submit");
    let req = match zuul.wait(&rid, WAIT).await.expect("wait") {
        Outcome::Fulfilled(r) => r,
        Outcome::Failed(r) => panic!("request {rid} failed: {:?}", r.value),
    };
    t.request_fulfilled = asked.elapsed();
    let served: BTreeSet<String> = req.value.nodes.iter().cloned().collect();
    assert_eq!(served, first_ids, "the request got the two spares (reuse)");
    let mut set = zuul.accept(&rid, &req.value).await.expect("accept");
    for n in &set.nodes {
        assert_eq!(n.node.state, NodeState::Ready);
        assert_eq!(n.node.allocated_to.as_deref(), Some(rid.as_str()));
    }
    zuul.use_nodes(&mut set, "org/e2e").await.expect("in-use");

    // min-ready replaced: two new servers, ACTIVE and tagged.
    let second = eventually("two replacement spares", WAIT, || {
        spares(&launcher_store, 2, &first_ids)
    })
    .await;
    t.replacements_ready = asked.elapsed();
    remember(&second);
    assert_eq!(second.len(), 2, "{}", summary(&second));
    for (id, node) in &second {
        check_in_nova(p, provider, id, node).await;
        assert!(
            !first_servers.contains(node.external_id.as_deref().unwrap_or_default()),
            "a new server"
        );
    }
    let in_use = nodes_in(&launcher_store, NodeState::InUse).await;
    assert_eq!(
        in_use
            .iter()
            .map(|(id, _)| id.clone())
            .collect::<BTreeSet<_>>(),
        first_ids,
        "the used nodes stay in-use while locked"
    );
    for s in &first_servers {
        let server = nova_server(p, s)
            .await
            .unwrap_or_else(|e| panic!("{e}"))
            .expect("an in-use node's server stays");
        assert_eq!(server["status"], "ACTIVE");
    }

    // Returned: the used nodes' servers are deleted in Nova, their floating
    // IPs released and their records gone.
    let returned = Instant::now();
    zuul.return_nodes(set).await.expect("return");
    let used_fips: Vec<String> = first
        .iter()
        .filter_map(|(_, n)| n.public_ipv4.clone())
        .collect();
    eventually("used nodes deleted in Nova and the store", WAIT, || async {
        for s in &first_servers {
            // An error (a loaded Nova's 5xx) is only another look later.
            if let Some(server) = nova_server(p, s).await? {
                return Err(format!("server {s} is still {}", server["status"]));
            }
        }
        let nodes = all_nodes(&launcher_store).await;
        if nodes.iter().any(|(id, _)| first_ids.contains(id)) {
            return Err(summary(&nodes));
        }
        Ok(())
    })
    .await;
    t.used_deleted = returned.elapsed();
    for a in &used_fips {
        assert!(
            floating_ips_at(p, a).await.is_empty(),
            "the floating IP {a} was released with its server"
        );
    }
    // What is left: exactly the two replacement spares, in Nova and the store.
    let second_servers: BTreeSet<String> = second
        .iter()
        .filter_map(|(_, n)| n.external_id.clone())
        .collect();
    assert_eq!(servers_of(p, provider).await.expect("list"), second_servers);
    let left = all_nodes(&launcher_store).await;
    assert_eq!(left.len(), 2, "{}", summary(&left));
    assert!(left.iter().all(|(_, n)| n.state == NodeState::Ready));
    t
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn min_ready_spares_serve_a_zuul_request_and_used_nodes_are_deleted_in_nova() {
    let _turn = SERIAL.lock().await;
    log_to_test_output();
    let p = checker();
    // Earlier runs killed before their cleanup may have left servers (the
    // quota is 10 instances). One copy of the testbed suite runs at a time.
    delete_servers(&p, |n| n.starts_with(PREFIX), &BTreeSet::new())
        .await
        .unwrap_or_else(|e| panic!("sweeping earlier runs' servers: {e}"));

    let provider = format!(
        "{PREFIX}{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    );
    let mem = MemoryStore::new();
    // The launcher and Zuul are separate clients, each with its session
    // (node locks belong to sessions).
    let launcher_store = Store::new(Arc::new(mem.new_session()));
    let zuul_store = Store::new(Arc::new(mem.new_session()));
    let addresses = std::sync::Mutex::new(BTreeSet::new());
    let started = Instant::now();
    let l = start_launcher(launcher_store.clone(), &config_yaml(&provider));

    let outcome = std::panic::AssertUnwindSafe(scenario(
        &p,
        &provider,
        launcher_store,
        zuul_store,
        &addresses,
        started,
        &l.status,
    ))
    .catch_unwind()
    .await;

    // Whatever happened: stop the launcher, then delete every server of
    // this run (a leftover would eat the quota of later tests).
    l.shutdown.cancel();
    let stopped = tokio::time::timeout(Duration::from_secs(120), l.task).await;
    let addresses = addresses.into_inner().unwrap_or_else(|p| p.into_inner());
    let cleaned = delete_servers(&p, |n| n == provider, &addresses).await;
    let left = servers_of(&p, &provider).await;

    let timings = match outcome {
        Ok(t) => t,
        Err(panic) => {
            // The scenario's failure is the one to report; say what the
            // cleanup could not do beside it.
            if let Err(e) = &cleaned {
                eprintln!("cleanup after the failure: {e}");
            }
            if !matches!(&left, Ok(l) if l.is_empty()) {
                eprintln!("left in Nova after the failure: {left:?}");
            }
            std::panic::resume_unwind(panic)
        }
    };
    match stopped {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(e))) => panic!("the launcher stopped with an error: {e}"),
        Ok(Err(e)) => panic!("the launcher task failed: {e}"),
        Err(_) => panic!("the launcher did not stop within 120 s"),
    }
    cleaned.unwrap_or_else(|e| panic!("cleanup: {e}"));
    assert_eq!(
        left,
        Ok(BTreeSet::new()),
        "nothing of this run is left in Nova"
    );
    for a in &addresses {
        assert!(
            floating_ips_at(&p, a).await.is_empty(),
            "floating IP {a} left"
        );
    }
    eprintln!(
        "launcher e2e timings: launcher start → 2 ready spares {:.1} s; request → fulfilled {:.2} s; \
         request → 2 replacement spares {:.1} s; return → used servers 404 and records gone {:.1} s",
        timings.spares_ready.as_secs_f64(),
        timings.request_fulfilled.as_secs_f64(),
        timings.replacements_ready.as_secs_f64(),
        timings.used_deleted.as_secs_f64(),
    );
}

/// `GET` a Neutron resource (`ports/<id>`, `floatingips/<id>`): its JSON,
/// or `None` on 404.
async fn neutron_get(p: &OpenStackProvider, path: &str) -> Result<Option<Value>, String> {
    match p
        .client()
        .execute(&Raw(ApiRequest::get(Service::Network, path)))
        .await
    {
        Ok(r) => Ok(Some(r.json().map_err(|e| e.to_string())?)),
        Err(e) if e.is_not_found() => Ok(None),
        Err(e) => Err(format!("GET {path}: {e}")),
    }
}

/// A Neutron call that must succeed; its JSON.
async fn neutron(p: &OpenStackProvider, req: ApiRequest) -> Value {
    let what = req.describe();
    let r = p
        .client()
        .execute(&Raw(req))
        .await
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    r.json().unwrap_or_else(|e| panic!("{what}: {e}"))
}

/// The id of the network named `name`.
async fn network_id(p: &OpenStackProvider, name: &str) -> String {
    let v = neutron(
        p,
        ApiRequest::get(Service::Network, "networks").query("name", name),
    )
    .await;
    v["networks"][0]["id"]
        .as_str()
        .unwrap_or_else(|| panic!("network {name}: {v}"))
        .to_owned()
}

/// Every port Neutron lists: (id, status, device_owner).
async fn all_ports(p: &OpenStackProvider) -> Vec<(String, String, String)> {
    let v = neutron(p, ApiRequest::get(Service::Network, "ports")).await;
    v["ports"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|p| {
                    let s = |k: &str| p[k].as_str().unwrap_or_default().to_owned();
                    (s("id"), s("status"), s("device_owner"))
                })
                .collect()
        })
        .unwrap_or_default()
}

async fn leak_scenario(
    p: &OpenStackProvider,
    l: &Running,
    port_id: &str,
    fip_id: &str,
    kept: &[(String, String, String)],
    started: Instant,
) {
    eventually("the stray floating IP deleted", WAIT, || async {
        match neutron_get(p, &format!("floatingips/{fip_id}")).await? {
            None => Ok(()),
            Some(f) => Err(format!("{f} (launcher: {})", l.status.report())),
        }
    })
    .await;
    eventually("the DOWN port deleted", WAIT, || async {
        match neutron_get(p, &format!("ports/{port_id}")).await? {
            None => Ok(()),
            Some(port) => Err(format!("{port} (launcher: {})", l.status.report())),
        }
    })
    .await;
    // Seen DOWN at a first listing, deleted at one at least 5 s later.
    assert!(
        started.elapsed() >= Duration::from_secs(5),
        "the port went {:?} after the launcher started, before port-cleanup-interval",
        started.elapsed()
    );
    // Counted as Python counts them (other strays, e.g. of a killed
    // earlier run, count too). Counted once the cloud has answered the
    // delete, which can be after the resource is already gone from a
    // listing: waited for, not read once.
    for kind in ["floatingips", "ports"] {
        let name = format!("nodepool.provider.{}.leaked.{kind}", "testbed-e2e-leaks");
        eventually(&format!("{name} counted"), WAIT, || async {
            match l.metrics.counter(&name) {
                0 => Err("0".to_owned()),
                _ => Ok(()),
            }
        })
        .await;
    }
    // The testbed's own DOWN ports (the router's: not a server's, and
    // never a leak) are all still there.
    let now = all_ports(p).await;
    for k in kept {
        assert!(
            now.iter().any(|n| n.0 == k.0),
            "port {k:?} is not a server's and was kept; ports now: {now:?}"
        );
    }
}

/// A stray floating IP and a DOWN port made in the testbed (as a server
/// deletion that went wrong leaves them) are deleted by the launcher's
/// cleanup; the router's DOWN ports stay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stray_floating_ips_and_down_ports_are_deleted_by_the_launcher() {
    let _turn = SERIAL.lock().await;
    log_to_test_output();
    let p = checker();
    let private = network_id(&p, "private").await;
    let public = network_id(&p, "public").await;
    // What the cleanup must leave alone: the ports that are not a server's
    // (the router's interface and gateway; DOWN, as no agent runs).
    let kept: Vec<(String, String, String)> = all_ports(&p)
        .await
        .into_iter()
        .filter(|(_, _, owner)| !owner.is_empty() && !owner.starts_with("compute:"))
        .collect();
    assert!(
        !kept.is_empty(),
        "the testbed has its router's ports (seed.py)"
    );
    let port = neutron(
        &p,
        ApiRequest::new(reqwest::Method::POST, Service::Network, "ports")
            .json(serde_json::json!({"port": {"network_id": private, "name": "testbed-e2e-leaked-port"}}))
            .expect(&[201]),
    )
    .await;
    let port_id = port["port"]["id"].as_str().expect("port id").to_owned();
    assert_eq!(port["port"]["status"], "DOWN", "{port}");
    let fip = neutron(
        &p,
        ApiRequest::new(reqwest::Method::POST, Service::Network, "floatingips")
            .json(serde_json::json!({"floatingip": {"floating_network_id": public}}))
            .expect(&[201]),
    )
    .await;
    let fip_id = fip["floatingip"]["id"].as_str().expect("fip id").to_owned();
    let yaml = format!(
        r#"
labels:
  - name: {LABEL}
providers:
  - name: testbed-e2e-leaks
    driver: openstack
    cloud: peer
    rate: 0.1
    clean-floating-ips: true
    port-cleanup-interval: 5
    cloud-images:
      - name: {IMAGE}
    pools:
      - name: {POOL}
        max-servers: 1
        networks: [private]
        labels:
          - name: {LABEL}
            cloud-image: {IMAGE}
            flavor-name: np.tiny
"#
    );
    let started = Instant::now();
    let l = start_launcher_with(
        Store::new(Arc::new(MemoryStore::new())),
        &yaml,
        LauncherSettings {
            observer: nodepool_core::launcher::ObserverIntervals {
                instances: Duration::from_secs(2),
                ..Default::default()
            },
            ..LauncherSettings::default()
        },
    );
    let outcome =
        std::panic::AssertUnwindSafe(leak_scenario(&p, &l, &port_id, &fip_id, &kept, started))
            .catch_unwind()
            .await;
    l.shutdown.cancel();
    let stopped = tokio::time::timeout(Duration::from_secs(120), l.task).await;
    if let Err(panic) = outcome {
        // Leave the testbed as it was.
        let _ = p.delete_resource(ResourceKind::Port, &port_id).await;
        let _ = p.delete_resource(ResourceKind::FloatingIp, &fip_id).await;
        std::panic::resume_unwind(panic)
    }
    match stopped {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(e))) => panic!("the launcher stopped with an error: {e}"),
        Ok(Err(e)) => panic!("the launcher task failed: {e}"),
        Err(_) => panic!("the launcher did not stop within 120 s"),
    }
}

// Issue 17: migrating from Python Nodepool step by step, as
// docs/migrating.md describes it: the real Python Nodepool 11 launcher and
// our `nodepool-launcher`, as processes, on one configuration file, one
// ZooKeeper (over TLS, the only way Python connects) and this cloud; then
// the Python launcher is switched off while it holds requests.

/// Zuul's system id for the mixed-fleet requests.
const MIXED_ZUUL: &str = "m1xedf1ee70000000000000000000017";

/// Bound of the last wait: a server Python created but never recorded is
/// found only by our leak cleanup, which needs two cloud listings 60 s
/// apart (the daemon's interval, which no configuration key shortens).
const LEAK_WAIT: Duration = Duration::from_secs(480);

/// A variable the test command exports; missing is a failure.
fn test_var(name: &str, how: &str) -> String {
    std::env::var(name)
        .unwrap_or_else(|_| panic!("{name} is not set: {how} (scripts/test.sh does it)"))
}

/// The Python Nodepool 11 launcher of the reference venv.
fn python_launcher() -> PathBuf {
    let cli = test_var(
        "NODEPOOL_TEST_PY_NODEPOOL",
        "eval \"$(scripts/python-env.sh)\" installs Python Nodepool 11",
    );
    let bin = std::path::Path::new(&cli).with_file_name("nodepool-launcher");
    assert!(
        bin.is_file(),
        "{} is missing beside NODEPOOL_TEST_PY_NODEPOOL",
        bin.display()
    );
    bin
}

/// The one `nodepool.yaml` both launchers read. `zookeeper-timeout: 30`:
/// the test pauses our launcher for a few seconds (see
/// [`python_holds_requests`]) and its session must outlive that.
/// `max-servers` is shared: both launchers count the pool's nodes in the
/// store, so at most five servers exist at once, within Nova's quota.
/// `ignore-provider-quota`: Python Nodepool 11's quota check asks for the
/// block-storage limits, and with openstacksdk 4 a cloud without Cinder
/// (this one) makes that an error (`ServiceDisabledException`, where
/// Nodepool expects `EndpointNotFound`), so the Python launcher would
/// take no request at all. `auto-floating-ip: false`: openstacksdk waits
/// for a new floating IP to go ACTIVE, which never happens on this cloud
/// (no L3 agent), so every Python launch would time out.
fn mixed_config_yaml(provider: &str, chroot: &str) -> String {
    let how = "eval \"$(scripts/zookeeper.sh env)\"";
    let hosts = test_var("NODEPOOL_TEST_ZK_TLS_HOSTS", how);
    let (host, port) = hosts.rsplit_once(':').expect("host:port");
    let cert = test_var("NODEPOOL_TEST_ZK_CERT", how);
    let key = test_var("NODEPOOL_TEST_ZK_KEY", how);
    let ca = test_var("NODEPOOL_TEST_ZK_CA", how);
    format!(
        r#"zookeeper-servers:
  - host: {host}
    port: {port}
    chroot: {chroot}
zookeeper-tls:
  cert: {cert}
  key: {key}
  ca: {ca}
zookeeper-timeout: 30.0
labels:
  - name: {LABEL}
    min-ready: 0
providers:
  - name: {provider}
    driver: openstack
    cloud: peer
    rate: 0.1
    boot-timeout: 120
    launch-retries: 3
    cloud-images:
      - name: {IMAGE}
    pools:
      - name: {POOL}
        max-servers: 5
        ignore-provider-quota: true
        networks: [private]
        auto-floating-ip: false
        host-key-checking: false
        labels:
          - name: {LABEL}
            cloud-image: {IMAGE}
            flavor-name: np.tiny
"#
    )
}

/// The testbed's clouds.yaml with openstacksdk's `private: true` on the
/// `peer` cloud, for the Python launcher: without a floating IP the server
/// has no public address, and Python Nodepool 11 then resolves an empty
/// `interface_ip` and fails the launch (even with `host-key-checking:
/// false`). `private` makes openstacksdk give the private address instead.
fn python_clouds(clouds: &std::path::Path, dir: &std::path::Path) -> PathBuf {
    let text = std::fs::read_to_string(clouds)
        .unwrap_or_else(|e| panic!("read {}: {e}", clouds.display()));
    assert!(
        text.contains("\n  peer:\n"),
        "{}: no cloud `peer`",
        clouds.display()
    );
    let path = dir.join("python-clouds.yaml");
    std::fs::write(
        &path,
        text.replacen("\n  peer:\n", "\n  peer:\n    private: true\n", 1),
    )
    .expect("write python-clouds.yaml");
    path
}

/// The two launcher processes (dropping a [`nodepool_tests::Daemon`] kills it).
#[derive(Default)]
struct Fleet {
    python: Option<nodepool_tests::Daemon>,
    ours: Option<nodepool_tests::Daemon>,
}

/// Pool worker ids registered in the store.
async fn pool_ids(store: &Store) -> Result<BTreeSet<String>, String> {
    Ok(store
        .list_components(nodepool_core::model::ComponentKind::Pool)
        .await
        .map_err(|e| format!("list pool components: {e}"))?
        .records
        .into_iter()
        .map(|(name, c)| c.id.unwrap_or(name))
        .collect())
}

/// Waits until exactly `n` pool workers are registered; the ids.
async fn registered_pools(store: &Store, n: usize) -> BTreeSet<String> {
    eventually("pool workers registered", WAIT, || async {
        let ids = pool_ids(store).await?;
        if ids.len() == n {
            Ok(ids)
        } else {
            Err(format!("{ids:?}"))
        }
    })
    .await
}

/// A node request Zuul got, with who launched each node.
struct Served {
    request: String,
    set: nodepool_requestor::NodeSet,
}

impl Served {
    fn launchers(&self) -> BTreeSet<String> {
        self.set
            .nodes
            .iter()
            .filter_map(|n| n.node.launcher.clone())
            .collect()
    }
}

/// Waits for each request, accepts its nodes and marks them in use, as
/// Zuul does; checks each node's server is ACTIVE in Nova and tagged with
/// the node.
async fn fulfil_and_use(
    p: &OpenStackProvider,
    provider: &str,
    zuul: &Requestor,
    requests: &[String],
    addresses: &std::sync::Mutex<BTreeSet<String>>,
) -> Vec<Served> {
    let mut out = Vec::new();
    for rid in requests {
        let req = match zuul.wait(rid, WAIT).await.expect("wait") {
            Outcome::Fulfilled(r) => r,
            Outcome::Failed(r) => panic!("request {rid} failed: {:?}", r.value),
        };
        let mut set = zuul.accept(rid, &req.value).await.expect("accept");
        for n in &set.nodes {
            if let (Ok(mut a), Some(ip)) = (addresses.lock(), n.node.public_ipv4.clone()) {
                a.insert(ip);
            }
            assert_eq!(n.node.state, NodeState::Ready, "{}: {:?}", n.id, n.node);
            assert_eq!(n.node.provider, provider);
            let server_id = n
                .node
                .external_id
                .as_deref()
                .unwrap_or_else(|| panic!("ready node {} has no server: {:?}", n.id, n.node));
            let s = nova_server(p, server_id)
                .await
                .unwrap_or_else(|e| panic!("{e}"))
                .unwrap_or_else(|| panic!("node {}: server {server_id} is not in Nova", n.id));
            assert_eq!(s["status"], "ACTIVE", "node {}: {s}", n.id);
            assert_eq!(s["metadata"]["nodepool_node_id"], n.id.as_str(), "{s}");
            assert_eq!(s["metadata"]["nodepool_provider_name"], provider, "{s}");
        }
        zuul.use_nodes(&mut set, "org/mixed-fleet")
            .await
            .expect("in-use");
        out.push(Served {
            request: rid.clone(),
            set,
        });
    }
    out
}

/// Submits `n` one-node requests.
async fn submit(zuul: &Requestor, n: usize) -> Vec<String> {
    let mut ids = Vec::new();
    for _ in 0..n {
        ids.push(
            zuul.submit(&NewRequest::new(vec![LABEL.into()]))
                .await
                .expect("submit"),
        );
    }
    ids
}

/// Whether each request is taken (pending or further) and, when
/// `launcher` is given, has a node record of that launcher allocated to it.
async fn taken(store: &Store, requests: &[String], launcher: Option<&str>) -> Result<(), String> {
    let nodes = all_nodes(store).await;
    for rid in requests {
        let r = store
            .get_request(rid)
            .await
            .map_err(|e| format!("read {rid}: {e}"))?
            .ok_or_else(|| format!("request {rid} is gone"))?;
        if r.value.state == nodepool_core::model::RequestState::Requested {
            return Err(format!("{rid} is still requested"));
        }
        if let Some(l) = launcher
            && !nodes.iter().any(|(_, n)| {
                n.allocated_to.as_deref() == Some(rid.as_str()) && n.launcher.as_deref() == Some(l)
            })
        {
            return Err(format!("{rid} has no node of {l} yet: {}", summary(&nodes)));
        }
    }
    Ok(())
}

/// Returns the nodes and waits until they are deleted: records gone and
/// servers 404 in Nova.
async fn return_and_wait_deleted(
    p: &OpenStackProvider,
    store: &Store,
    zuul: &Requestor,
    served: Vec<Served>,
) {
    let mut ids = BTreeSet::new();
    let mut servers = BTreeSet::new();
    for s in served {
        for n in &s.set.nodes {
            ids.insert(n.id.clone());
            servers.extend(n.node.external_id.clone());
        }
        zuul.return_nodes(s.set).await.expect("return");
    }
    eventually(
        "returned nodes deleted in Nova and the store",
        WAIT,
        || async {
            for s in &servers {
                if let Some(server) = nova_server(p, s).await? {
                    return Err(format!("server {s} is still {}", server["status"]));
                }
            }
            let nodes = all_nodes(store).await;
            if nodes.iter().any(|(id, _)| ids.contains(id)) {
                return Err(summary(&nodes));
            }
            Ok(())
        },
    )
    .await;
}

/// Our launcher is paused (SIGSTOP) while the requests are submitted, so
/// that the Python launcher, the only one left looking, takes them all and
/// starts their nodes: switching it off then leaves requests pending and
/// nodes building for ours to take over. Bounded well inside our
/// launcher's 30 s ZooKeeper session; ours is resumed whatever happens.
async fn python_holds_requests(
    store: &Store,
    zuul: &Requestor,
    ours: &nodepool_tests::Daemon,
    python_id: &str,
    n: usize,
) -> Vec<String> {
    ours.pause();
    let requests = submit(zuul, n).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    let held = loop {
        match taken(store, &requests, Some(python_id)).await {
            Ok(()) => break Ok(()),
            Err(seen) if tokio::time::Instant::now() >= deadline => break Err(seen),
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    };
    if let Err(seen) = held {
        ours.resume();
        panic!("the Python launcher did not take the requests within 15 s: {seen}");
    }
    requests
}

/// What the mixed-fleet run saw, printed at the end.
#[derive(Debug, Default)]
struct MixedReport {
    by_python: usize,
    by_ours: usize,
    python_nodes_at_stop: String,
    python_exit: String,
    takeover: Duration,
    clean: Duration,
}

#[allow(clippy::too_many_arguments)]
async fn mixed_scenario(
    p: &OpenStackProvider,
    provider: &str,
    dir: &std::path::Path,
    config: &std::path::Path,
    ours_bin: &std::path::Path,
    zuul_store: Store,
    fleet: &mut Fleet,
    addresses: &std::sync::Mutex<BTreeSet<String>>,
) -> MixedReport {
    let mut report = MixedReport::default();
    let zuul = Requestor::new(zuul_store.clone(), MIXED_ZUUL);
    let clouds = clouds_yaml();

    // The Python launcher first, alone: it registers its pool and takes
    // the first requests.
    let mut cmd = std::process::Command::new(python_launcher());
    cmd.arg("-d")
        .arg("-c")
        .arg(config)
        .arg("--no-webapp")
        .arg("-p")
        .arg(dir.join("python-launcher.pid"))
        .env("OS_CLIENT_CONFIG_FILE", python_clouds(&clouds, dir))
        .current_dir(dir);
    fleet.python = Some(nodepool_tests::Daemon::spawn(
        "python-launcher",
        cmd,
        &dir.join("python-launcher.log"),
    ));
    let python_id = registered_pools(&zuul_store, 1)
        .await
        .pop_first()
        .expect("one pool");
    let first = submit(&zuul, 2).await;
    eventually("the Python launcher takes the first requests", WAIT, || {
        taken(&zuul_store, &first, None)
    })
    .await;

    // Step 2 of docs/migrating.md: ours beside it, same file.
    let mut cmd = std::process::Command::new(ours_bin);
    cmd.arg("-c")
        .arg(config)
        .arg("--no-webapp")
        .env("OS_CLIENT_CONFIG_FILE", &clouds)
        .env(
            "RUST_LOG",
            std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
        )
        .current_dir(dir);
    fleet.ours = Some(nodepool_tests::Daemon::spawn(
        "nodepool-launcher",
        cmd,
        &dir.join("nodepool-launcher.log"),
    ));
    let mut both = registered_pools(&zuul_store, 2).await;
    both.remove(&python_id);
    let ours_id = both.pop_first().expect("our pool");

    // Phase 1, the mixed fleet: more requests while both serve.
    // Three more: five in all, `max-servers`. Zuul here holds every node
    // until all requests are served, so a sixth would wait for quota
    // forever (a launcher pauses on it, as Python's does).
    let second = submit(&zuul, 3).await;
    let requests: Vec<String> = first.iter().chain(&second).cloned().collect();
    let served = fulfil_and_use(p, provider, &zuul, &requests, addresses).await;
    let mut handed_out = BTreeSet::new();
    let mut server_ids = BTreeSet::new();
    for s in &served {
        let l = s.launchers();
        assert_eq!(l.len(), 1, "{}: one launcher per request: {l:?}", s.request);
        if l.contains(&python_id) {
            report.by_python += 1;
        } else {
            assert!(l.contains(&ours_id), "{}: launched by {l:?}", s.request);
            report.by_ours += 1;
        }
        for n in &s.set.nodes {
            assert!(
                handed_out.insert(n.id.clone()),
                "node {} handed out twice",
                n.id
            );
            assert!(
                server_ids.insert(n.node.external_id.clone()),
                "server {:?} in two nodes",
                n.node.external_id
            );
        }
    }
    assert!(
        first.iter().all(|r| served
            .iter()
            .any(|s| &s.request == r && s.launchers().contains(&python_id))),
        "the Python launcher fulfilled the requests it took alone"
    );
    // Ours usually serves some of these too, but which launcher locks a
    // request first is a race; phase 2 below has ours serve every request.
    return_and_wait_deleted(p, &zuul_store, &zuul, served).await;

    // Phase 2, step 4 of docs/migrating.md: the Python launcher is switched
    // off while it holds requests and builds their nodes.
    let ours = fleet.ours.as_ref().expect("ours runs");
    let held = python_holds_requests(&zuul_store, &zuul, ours, &python_id, 3).await;
    let python = fleet.python.as_mut().expect("Python runs");
    // SIGTERM, as its service stops it: Nodepool 11's handler is
    // `os._exit(0)`, so nothing is released; its locks go with its
    // ZooKeeper session, `zookeeper-timeout` later.
    let status = python.terminate(Duration::from_secs(60)).await;
    report.python_exit = format!("{status}");
    assert!(status.success(), "the Python launcher exited with {status}");
    let stopped = Instant::now();
    report.python_nodes_at_stop = summary(
        &all_nodes(&zuul_store)
            .await
            .into_iter()
            .filter(|(_, n)| n.launcher.as_deref() == Some(python_id.as_str()))
            .collect::<Vec<_>>(),
    );
    ours.resume();

    let served = fulfil_and_use(p, provider, &zuul, &held, addresses).await;
    report.takeover = stopped.elapsed();
    report.by_ours += served.len();
    for s in &served {
        assert_eq!(
            s.launchers(),
            BTreeSet::from([ours_id.clone()]),
            "{}: fulfilled by ours after Python stopped",
            s.request
        );
        for n in &s.set.nodes {
            assert!(
                handed_out.insert(n.id.clone()),
                "node {} handed out twice",
                n.id
            );
            assert!(
                server_ids.insert(n.node.external_id.clone()),
                "server {:?} in two nodes",
                n.node.external_id
            );
        }
    }
    // What Python left building is deleted (its records were unlocked when
    // its session ended).
    eventually("the Python launcher's nodes deleted", WAIT, || async {
        let left: Vec<_> = all_nodes(&zuul_store)
            .await
            .into_iter()
            .filter(|(_, n)| n.launcher.as_deref() == Some(python_id.as_str()))
            .collect();
        if left.is_empty() {
            Ok(())
        } else {
            Err(summary(&left))
        }
    })
    .await;
    return_and_wait_deleted(p, &zuul_store, &zuul, served).await;

    // In the end the cloud has no server the store does not know: a server
    // Python created but had not recorded yet is our leak cleanup's.
    eventually("no server of this run left in Nova", LEAK_WAIT, || async {
        let servers = servers_of(p, provider).await?;
        let nodes = all_nodes(&zuul_store).await;
        if servers.is_empty() && nodes.is_empty() {
            Ok(())
        } else {
            Err(format!("servers {servers:?}; nodes {}", summary(&nodes)))
        }
    })
    .await;
    report.clean = stopped.elapsed();
    report
}

/// Issue 17: the Python launcher and ours serve one store and one cloud
/// side by side; then the Python launcher is switched off while it holds
/// requests, and ours finishes its work and cleans up after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mixed_python_and_rust_fleet_then_python_switched_off() {
    let _turn = SERIAL.lock().await;
    log_to_test_output();
    let p = checker();
    delete_servers(&p, |n| n.starts_with(PREFIX), &BTreeSet::new())
        .await
        .unwrap_or_else(|e| panic!("sweeping earlier runs' servers: {e}"));
    let ours_bin = tokio::task::spawn_blocking(|| {
        nodepool_tests::workspace_binary("nodepool-cli", "nodepool-launcher")
    })
    .await
    .expect("build nodepool-launcher");
    let provider = format!(
        "{PREFIX}mixed-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let chroot = format!("/nodepool-rs-mixed/{}", uuid::Uuid::new_v4().simple());
    let yaml = mixed_config_yaml(&provider, &chroot);
    let config = dir.path().join("nodepool.yaml");
    std::fs::write(&config, &yaml).expect("write nodepool.yaml");
    let cfg = Config::from_yaml(&yaml).unwrap_or_else(|e| panic!("config: {e}"));
    // Zuul's own session; opening it also creates the chroot Python needs.
    let zuul_store = nodepool_cli::daemon::open_store(&cfg)
        .await
        .unwrap_or_else(|e| panic!("open the store over TLS: {e:#}"));
    let addresses = std::sync::Mutex::new(BTreeSet::new());
    let mut fleet = Fleet::default();

    let outcome = std::panic::AssertUnwindSafe(mixed_scenario(
        &p,
        &provider,
        dir.path(),
        &config,
        &ours_bin,
        zuul_store,
        &mut fleet,
        &addresses,
    ))
    .catch_unwind()
    .await;

    // Whatever happened: stop both launchers, then delete every server of
    // this run (a leftover would eat the quota of later tests).
    if let Some(ours) = fleet.ours.as_mut() {
        ours.resume();
    }
    let mut ours_stop = None;
    if let Some(d) = fleet.ours.as_mut()
        && d.running()
    {
        ours_stop = Some(d.terminate(Duration::from_secs(120)).await);
    }
    if let Some(py) = fleet.python.as_mut()
        && py.running()
    {
        py.kill();
    }
    let addresses = addresses.into_inner().unwrap_or_else(|p| p.into_inner());
    let cleaned = delete_servers(&p, |n| n == provider, &addresses).await;
    let left = servers_of(&p, &provider).await;
    let report = match outcome {
        Ok(r) => r,
        Err(panic) => {
            if let Err(e) = &cleaned {
                eprintln!("cleanup after the failure: {e}");
            }
            for d in [&fleet.python, &fleet.ours].into_iter().flatten() {
                let log = d.log();
                // Python's debug log is mostly registry and ZooKeeper noise.
                let tail: Vec<&str> = log
                    .lines()
                    .filter(|l| !l.contains("ComponentRegistry") && !l.contains("kazoo"))
                    .rev()
                    .take(60)
                    .collect();
                eprintln!("--- end of {} ---", d.name());
                for l in tail.into_iter().rev() {
                    eprintln!("{l}");
                }
            }
            std::panic::resume_unwind(panic)
        }
    };
    if let Some(status) = ours_stop {
        assert!(status.success(), "our launcher exited with {status}");
    }
    cleaned.unwrap_or_else(|e| panic!("cleanup: {e}"));
    assert_eq!(
        left,
        Ok(BTreeSet::new()),
        "nothing of this run is left in Nova"
    );
    eprintln!("mixed fleet: {report:?}");
}
