//! The launcher test rig shared by the whole-launcher tests: one launcher
//! on the in-memory store (with its own session, which tests suspend,
//! expire or make ambiguous), whose one cloud is the simulated cloud
//! behind the fault-injecting decorator, and Zuul's side on another
//! session. Everything runs on tokio's paused clock; the leak sweep never
//! runs (its interval is a day), so whatever a test sees cleaned up was
//! cleaned up by the launch or delete that made it.

#![allow(dead_code)] // Each test file uses its own part of the rig.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nodepool_core::config::Config;
use nodepool_core::launcher::{
    Launcher, LauncherSettings, LauncherStatus, Metrics, ObserverIntervals,
};
use nodepool_core::model::{NodeState, RequestState};
use nodepool_core::provider::{InstanceStatus, Provider};
use nodepool_core::runtime::{Clock, ProviderFactory};
use nodepool_core::store::Store;
use nodepool_model::store::MemoryStore;
use nodepool_requestor::{NewRequest, Outcome, Requestor};
use nodepool_simulated::SimulatedProvider;
use nodepool_simulated::faults::{FaultyProvider, Operation};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// A launcher on the in-memory store whose one cloud is `faulty`.
pub struct Rig {
    /// The launcher's own store client (suspend, expire, ambiguous writes).
    pub launcher_client: MemoryStore,
    /// The cloud itself, read past any injected fault.
    pub cloud: SimulatedProvider,
    /// The decorator the launcher calls the cloud through.
    pub faulty: FaultyProvider,
    /// Zuul's side, on another session.
    pub zuul: Requestor,
    /// A store client on another session, for reading what happened.
    pub store: Store,
    pub metrics: Arc<Metrics>,
    pub status: Arc<LauncherStatus>,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<()>,
    _config: watch::Sender<Arc<Config>>,
}

impl Rig {
    /// Starts a launcher on `yaml` (one simulated provider) and waits for
    /// its first pass.
    pub async fn start(yaml: &str) -> Self {
        let server = MemoryStore::new();
        let launcher_client = server.new_session();
        let cfg = Arc::new(Config::from_yaml(yaml).expect("valid config"));
        let cloud = SimulatedProvider::new(&cfg.providers[0]).expect("simulated cloud");
        let faulty = FaultyProvider::new(Arc::new(cloud.clone()));
        // One decorator across reloads, as a real cloud is one cloud.
        let clouds: Arc<Mutex<BTreeMap<String, FaultyProvider>>> = Arc::default();
        clouds
            .lock()
            .expect("lock")
            .insert(cloud.name().to_owned(), faulty.clone());
        let factory: ProviderFactory = Arc::new(move |pc| {
            clouds
                .lock()
                .map_err(|_| "poisoned".to_string())?
                .get(&pc.name)
                .cloned()
                .map(|p| Arc::new(p) as Arc<dyn Provider>)
                .ok_or_else(|| format!("no cloud {}", pc.name))
        });
        let launcher = Launcher::new(
            Store::new(Arc::new(launcher_client.clone())),
            factory,
            LauncherSettings {
                hostname: "l1".into(),
                observer: ObserverIntervals {
                    instances: Duration::from_secs(86_400),
                    ..ObserverIntervals::default()
                },
                clock: Clock::tokio(),
                ..LauncherSettings::default()
            },
        );
        let metrics = launcher.metrics();
        let status = launcher.status();
        let (tx, rx) = watch::channel(cfg);
        let shutdown = CancellationToken::new();
        let stop = shutdown.clone();
        let task = tokio::spawn(async move {
            launcher.run(rx, stop).await.expect("launcher runs");
        });
        let store = Store::new(Arc::new(server.new_session()));
        let rig = Rig {
            launcher_client,
            cloud,
            faulty,
            zuul: Requestor::new(store.clone(), "zuul"),
            store,
            metrics,
            status,
            shutdown,
            task,
            _config: tx,
        };
        rig.status
            .passes()
            .reached(1)
            .await
            .expect("the launcher's first pass");
        rig
    }

    /// Stops the launcher and waits for it.
    pub async fn stop(self) {
        self.shutdown.cancel();
        self.task.await.expect("launcher task");
    }

    /// Submits one request for a `small` node.
    pub async fn submit(&self) -> String {
        self.zuul
            .submit(&NewRequest::new(vec!["small".into()]))
            .await
            .expect("submit")
    }

    /// Submits `n` requests for a `small` node each.
    pub async fn submit_many(&self, n: usize) -> Vec<String> {
        let mut ids = Vec::new();
        for _ in 0..n {
            ids.push(self.submit().await);
        }
        ids
    }

    /// A request's state.
    pub async fn request_state(&self, id: &str) -> RequestState {
        self.store
            .get_request(id)
            .await
            .expect("read request")
            .expect("request exists")
            .value
            .state
    }

    /// Waits (in virtual time) until `id` is fulfilled, then uses its
    /// nodes and gives them back, as Zuul does.
    pub async fn served(&self, id: &str) {
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

    /// Serves `ids` to the end, then waits until every node and server is
    /// gone.
    pub async fn finish(&self, ids: &[String]) {
        for id in ids {
            self.served(id).await;
        }
        until("every node and server gone", || async {
            self.nodes().await.is_empty() && self.servers().await.is_empty()
        })
        .await;
    }

    /// Nodes by id with (state, server id, locked).
    pub async fn nodes(&self) -> BTreeMap<String, (NodeState, Option<String>, bool)> {
        self.store
            .list_nodes()
            .await
            .expect("list nodes")
            .records
            .into_iter()
            .map(|r| (r.id, (r.node.state, r.node.external_id.clone(), r.locked)))
            .collect()
    }

    /// Every server the cloud holds, past any injected fault.
    pub async fn servers(&self) -> BTreeMap<String, InstanceStatus> {
        self.cloud
            .instances()
            .await
            .into_iter()
            .map(|i| (i.external_id, i.status))
            .collect()
    }

    /// No `ready` node without an ACTIVE server of its own.
    pub async fn assert_no_dead_ready_node(&self) {
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

    /// Calls of every operation that reached the decorator.
    pub fn calls(&self) -> u64 {
        Operation::ALL.iter().map(|&op| self.faulty.calls(op)).sum()
    }
}

/// Polls `f` every 50 ms of virtual time until true (bounded).
pub async fn until<F: FnMut() -> Fut, Fut: std::future::Future<Output = bool>>(
    what: &str,
    mut f: F,
) {
    for _ in 0..12_000 {
        if f().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{what}: not reached within 600 s of virtual time");
}
