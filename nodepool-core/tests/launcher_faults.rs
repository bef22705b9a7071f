//! The launcher under store faults, on the in-memory store and the
//! simulated cloud, on tokio's paused clock: a store outage shorter than
//! the session (suspended, then back), a session lost mid-launch, a server
//! created just as the lock went, and writes whose outcome the store could
//! not report. In every case no launch is stranded, no node is `ready`
//! without a live server, and no server outlives its node — without the
//! leak sweep, which these launchers never run (its interval is a day).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use nodepool_core::config::{Config, PoolLabel};
use nodepool_core::launcher::{Launcher, LauncherSettings, Metrics, ObserverIntervals};
use nodepool_core::model::{Limits, NodeState, Resources};
use nodepool_core::provider::{
    CloudImageInfo, ImageUploadSpec, Instance, InstanceSpec, InstanceStatus, Provider,
    ProviderError,
};
use nodepool_core::runtime::ProviderFactory;
use nodepool_core::store::Store;
use nodepool_model::store::MemoryStore;
use nodepool_requestor::{NewRequest, Outcome, Requestor};
use nodepool_simulated::SimulatedProvider;
use tokio::sync::{Semaphore, watch};
use tokio_util::sync::CancellationToken;

const CONFIG: &str = r#"
labels:
  - name: small
providers:
  - name: sim
    driver: simulated
    simulation:
      boot-delay: 2
      flavors:
        - {name: s, vcpus: 2, ram: 2048}
    cloud-images: [{name: img}]
    pools:
      - name: main
        max-servers: 10
        labels:
          - {name: small, cloud-image: img, flavor-name: s}
"#;

/// The simulated cloud with a gate in front of server creates: a create
/// waits for a permit when the gate is closed, so a test can change the
/// store's state while a create is under way.
#[derive(Debug)]
struct Gated {
    inner: Arc<SimulatedProvider>,
    closed: std::sync::atomic::AtomicBool,
    permits: Semaphore,
    waiting: std::sync::atomic::AtomicUsize,
}

#[async_trait]
impl Provider for Gated {
    fn name(&self) -> &str {
        self.inner.name()
    }
    async fn quota_limits(&self) -> Result<Limits, ProviderError> {
        self.inner.quota_limits().await
    }
    async fn label_resources(&self, label: &PoolLabel) -> Result<Resources, ProviderError> {
        self.inner.label_resources(label).await
    }
    async fn create_instance(&self, spec: &InstanceSpec) -> Result<String, ProviderError> {
        if self.closed.load(std::sync::atomic::Ordering::SeqCst) {
            self.waiting
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let permit = self
                .permits
                .acquire()
                .await
                .map_err(|e| ProviderError::Other(e.to_string()))?;
            permit.forget();
        }
        self.inner.create_instance(spec).await
    }
    async fn wait_for_instance(
        &self,
        external_id: &str,
        spec: &InstanceSpec,
    ) -> Result<Instance, ProviderError> {
        self.inner.wait_for_instance(external_id, spec).await
    }
    async fn get_instance(&self, external_id: &str) -> Result<Option<Instance>, ProviderError> {
        self.inner.get_instance(external_id).await
    }
    async fn list_instances(&self) -> Result<Vec<Instance>, ProviderError> {
        self.inner.list_instances().await
    }
    async fn delete_instance(&self, external_id: &str) -> Result<(), ProviderError> {
        self.inner.delete_instance(external_id).await
    }
    async fn upload_image(&self, spec: &ImageUploadSpec) -> Result<String, ProviderError> {
        self.inner.upload_image(spec).await
    }
    async fn list_images(&self) -> Result<Vec<CloudImageInfo>, ProviderError> {
        self.inner.list_images().await
    }
    async fn delete_image(&self, external_id: &str) -> Result<(), ProviderError> {
        self.inner.delete_image(external_id).await
    }
    fn skip_nodescan(&self) -> bool {
        self.inner.skip_nodescan()
    }
}

struct Harness {
    /// The launcher's own store client (suspend, expire, ambiguous writes).
    launcher_client: MemoryStore,
    /// Zuul's view, on another session.
    zuul: Requestor,
    store: Store,
    cloud: Arc<Gated>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<()>,
    _config: watch::Sender<Arc<Config>>,
}

impl Harness {
    fn start() -> Self {
        let server = MemoryStore::new();
        let launcher_client = server.new_session();
        let cfg = Arc::new(Config::from_yaml(CONFIG).expect("valid config"));
        let sim = Arc::new(SimulatedProvider::new(&cfg.providers[0]).expect("simulated cloud"));
        let cloud = Arc::new(Gated {
            inner: sim,
            closed: Default::default(),
            permits: Semaphore::new(0),
            waiting: Default::default(),
        });
        let registry: Arc<Mutex<BTreeMap<String, Arc<Gated>>>> = Arc::default();
        registry
            .lock()
            .expect("lock")
            .insert("sim".into(), cloud.clone());
        let factory: ProviderFactory = Arc::new(move |pc| {
            registry
                .lock()
                .map_err(|_| "poisoned".to_string())?
                .get(&pc.name)
                .cloned()
                .map(|p| p as Arc<dyn Provider>)
                .ok_or_else(|| format!("no cloud {}", pc.name))
        });
        let launcher = Launcher::new(
            Store::new(Arc::new(launcher_client.clone())),
            factory,
            LauncherSettings {
                hostname: "l1".into(),
                observer: ObserverIntervals {
                    // The leak sweep never runs: whatever these tests see
                    // cleaned up was cleaned up by the launch itself.
                    instances: Duration::from_secs(86_400),
                    ..ObserverIntervals::default()
                },
                clock: nodepool_core::runtime::Clock::tokio(),
                ..LauncherSettings::default()
            },
        );
        let metrics = launcher.metrics();
        let (tx, rx) = watch::channel(cfg);
        let shutdown = CancellationToken::new();
        let stop = shutdown.clone();
        let task = tokio::spawn(async move {
            launcher.run(rx, stop).await.expect("launcher runs");
        });
        let store = Store::new(Arc::new(server.new_session()));
        Harness {
            launcher_client,
            zuul: Requestor::new(store.clone(), "zuul"),
            store,
            cloud,
            metrics,
            shutdown,
            task,
            _config: tx,
        }
    }

    async fn stop(self) {
        self.shutdown.cancel();
        self.task.await.expect("launcher task");
    }

    /// Nodes by id with (state, server id, locked).
    async fn nodes(&self) -> BTreeMap<String, (NodeState, Option<String>, bool)> {
        self.store
            .list_nodes()
            .await
            .expect("list nodes")
            .records
            .into_iter()
            .map(|r| (r.id, (r.node.state, r.node.external_id.clone(), r.locked)))
            .collect()
    }

    async fn servers(&self) -> BTreeMap<String, InstanceStatus> {
        self.cloud
            .inner
            .list_instances()
            .await
            .expect("list servers")
            .into_iter()
            .map(|i| (i.external_id, i.status))
            .collect()
    }

    /// No `ready` node without an ACTIVE server of its own.
    async fn assert_no_dead_ready_node(&self) {
        let servers = self.servers().await;
        for (id, (state, server, _)) in self.nodes().await {
            if state == NodeState::Ready {
                let server = server.unwrap_or_else(|| panic!("ready node {id} has no server"));
                assert_eq!(
                    servers.get(&server),
                    Some(&InstanceStatus::Active),
                    "ready node {id}: server {server}"
                );
            }
        }
    }

    /// Serves `ids` to the end (Zuul accepts, uses and returns them), then
    /// waits until every node and server is gone.
    async fn finish(&self, ids: &[String]) {
        for id in ids {
            let Outcome::Fulfilled(req) = self
                .zuul
                .wait(id, Duration::from_secs(600))
                .await
                .expect("wait")
            else {
                panic!("request {id} failed");
            };
            let mut set = self.zuul.accept(id, &req.value).await.expect("accept");
            self.zuul
                .use_nodes(&mut set, "org/project")
                .await
                .expect("use");
            self.zuul.return_nodes(set).await.expect("return");
        }
        until("every node and server gone", || async {
            self.nodes().await.is_empty() && self.servers().await.is_empty()
        })
        .await;
    }
}

/// Polls `f` on the paused clock until true (bounded in virtual time).
async fn until<F: FnMut() -> Fut, Fut: std::future::Future<Output = bool>>(what: &str, mut f: F) {
    for _ in 0..1200 {
        if f().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    panic!("{what}: not reached within 300 s of virtual time");
}

async fn submit(h: &Harness, n: usize) -> Vec<String> {
    let mut ids = Vec::new();
    for _ in 0..n {
        ids.push(
            h.zuul
                .submit(&NewRequest::new(vec!["small".into()]))
                .await
                .expect("submit"),
        );
    }
    ids
}

/// Waits until `n` nodes are `building` with their server recorded.
async fn booting(h: &Harness, n: usize) {
    until("servers booting", || async {
        h.nodes()
            .await
            .values()
            .filter(|(st, server, _)| *st == NodeState::Building && server.is_some())
            .count()
            == n
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn a_store_outage_shorter_than_the_session_loses_no_launch() {
    let h = Harness::start();
    let ids = submit(&h, 5).await;
    booting(&h, 5).await;
    // Three blips in a row, each while servers boot or become active: the
    // launches wait (their session and locks survive), then go on.
    for _ in 0..3 {
        h.launcher_client.suspend();
        tokio::time::sleep(Duration::from_secs(3)).await;
        h.launcher_client.resume();
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    for id in &ids {
        assert!(matches!(
            h.zuul
                .wait(id, Duration::from_secs(60))
                .await
                .expect("wait"),
            Outcome::Fulfilled(_)
        ));
    }
    h.assert_no_dead_ready_node().await;
    assert_eq!(
        h.cloud.inner.server_count(),
        5,
        "no server was deleted and made again"
    );
    assert_eq!(h.metrics.counter("nodepool.launch.attempt_failed"), 0);
    h.finish(&ids).await;
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_session_lost_mid_launch_gives_the_launches_up_and_serves_again() {
    let h = Harness::start();
    let ids = submit(&h, 4).await;
    booting(&h, 4).await;
    let first: Vec<String> = h.nodes().await.keys().cloned().collect();
    // The session expires under the launches: their locks are gone. They
    // write nothing more; the nodes (unlocked, `building`) are deleted with
    // their servers, and the requests are served with new nodes.
    h.launcher_client.suspend();
    tokio::time::sleep(Duration::from_secs(1)).await;
    h.launcher_client.expire_session();
    for id in &ids {
        let Outcome::Fulfilled(req) = h
            .zuul
            .wait(id, Duration::from_secs(120))
            .await
            .expect("wait")
        else {
            panic!("request {id} failed");
        };
        for n in &req.value.nodes {
            assert!(
                !first.contains(n),
                "request {id} got node {n} of the lost session"
            );
        }
    }
    until("the lost launches' nodes and servers gone", || async {
        let nodes = h.nodes().await;
        first.iter().all(|n| !nodes.contains_key(n)) && h.servers().await.len() == nodes.len()
    })
    .await;
    h.assert_no_dead_ready_node().await;
    h.finish(&ids).await;
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_server_made_as_the_lock_went_is_deleted_at_once() {
    let h = Harness::start();
    h.cloud
        .closed
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let ids = submit(&h, 1).await;
    until("the create under way", || async {
        h.cloud.waiting.load(std::sync::atomic::Ordering::SeqCst) == 1
    })
    .await;
    // The store goes away while the cloud creates the server; by the time
    // the launch can record it, the session (and the lock) is gone.
    h.launcher_client.suspend();
    h.cloud
        .closed
        .store(false, std::sync::atomic::Ordering::SeqCst);
    h.cloud.permits.add_permits(1);
    until("the server created", || async {
        h.cloud.inner.server_count() == 1
    })
    .await;
    let lost = h.servers().await.into_keys().next().expect("one server");
    h.launcher_client.expire_session();
    until("the unrecorded server deleted", || async {
        !h.servers().await.contains_key(&lost)
    })
    .await;
    assert_eq!(
        h.metrics.counter("nodepool.provider.sim.orphans_deleted"),
        1,
        "deleted by the launch that made it, not by a sweep"
    );
    h.assert_no_dead_ready_node().await;
    h.finish(&ids).await;
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn writes_whose_outcome_is_unknown_never_hand_out_a_dead_node() {
    let h = Harness::start();
    // Every write the launcher makes is applied and then reported as a
    // connection reset: each must be resolved by reading the record back.
    h.launcher_client.ambiguous_writes(u32::MAX);
    let ids = submit(&h, 5).await;
    for id in &ids {
        assert!(matches!(
            h.zuul
                .wait(id, Duration::from_secs(120))
                .await
                .expect("wait"),
            Outcome::Fulfilled(_)
        ));
        h.assert_no_dead_ready_node().await;
    }
    assert_eq!(h.cloud.inner.server_count(), 5);
    assert_eq!(h.metrics.counter("nodepool.launch.attempt_failed"), 0);
    h.finish(&ids).await;
    h.stop().await;
}
