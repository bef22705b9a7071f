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
    // earlier run, count too).
    for kind in ["floatingips", "ports"] {
        let name = format!("nodepool.provider.{}.leaked.{kind}", "testbed-e2e-leaks");
        assert!(l.metrics.counter(&name) >= 1, "{name} counted");
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
