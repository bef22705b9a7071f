//! The launcher driven through faults injected into single calls of a real
//! cloud (the simulated one behind `nodepool_simulated::faults::
//! FaultyProvider`), on the in-memory store and tokio's paused clock: a
//! create that hangs is cut off by `api-timeout` and retried; creates
//! refused with Nova's quota 403 are given up without failing the request;
//! a cloud answering 429 with a `Retry-After` is left alone for as long as
//! it asked, probed once, and serves the request once it recovers. The
//! decorator's counters say which calls reached the cloud.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nodepool_core::config::Config;
use nodepool_core::launcher::{
    Launcher, LauncherSettings, LauncherStatus, Metrics, ObserverIntervals, ProviderFactory,
};
use nodepool_core::model::RequestState;
use nodepool_core::provider::Provider;
use nodepool_core::store::Store;
use nodepool_model::store::MemoryStore;
use nodepool_requestor::{NewRequest, Outcome, Requestor};
use nodepool_simulated::SimulatedProvider;
use nodepool_simulated::faults::{Fault, FaultyProvider, Operation};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

const CONFIG: &str = r#"
labels:
  - name: small
providers:
  - name: sim
    driver: simulated
    simulation:
      api-timeout: 5
      boot-delay: 2
      flavors:
        - {name: s, vcpus: 2, ram: 2048}
    cloud-images: [{name: img}]
    pools:
      - name: main
        max-servers: 5
        labels:
          - {name: small, cloud-image: img, flavor-name: s}
"#;

/// A launcher on the in-memory store whose one cloud is `faulty`.
struct Rig {
    cloud: SimulatedProvider,
    faulty: FaultyProvider,
    zuul: Requestor,
    store: Store,
    metrics: Arc<Metrics>,
    status: Arc<LauncherStatus>,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<()>,
    _config: watch::Sender<Arc<Config>>,
}

impl Rig {
    async fn start() -> Self {
        let server = MemoryStore::new();
        let cfg = Arc::new(Config::from_yaml(CONFIG).expect("valid config"));
        let cloud = SimulatedProvider::new(&cfg.providers[0]).expect("simulated cloud");
        let faulty = FaultyProvider::new(Arc::new(cloud.clone()));
        // One decorator across reloads, as a real cloud is one cloud.
        let clouds: Arc<Mutex<BTreeMap<String, FaultyProvider>>> = Arc::default();
        clouds
            .lock()
            .expect("lock")
            .insert("sim".into(), faulty.clone());
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
            Store::new(Arc::new(server.new_session())),
            factory,
            LauncherSettings {
                hostname: "l1".into(),
                observer: ObserverIntervals {
                    // No leak sweep: what these tests see cleaned up was
                    // cleaned up by the launch itself.
                    instances: Duration::from_secs(86_400),
                    ..ObserverIntervals::default()
                },
                clock: nodepool_core::runtime::Clock::tokio(),
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
        until("the launcher's first pass", || async {
            rig.status.is_ready()
        })
        .await;
        rig
    }

    async fn stop(self) {
        self.shutdown.cancel();
        self.task.await.expect("launcher task");
    }

    async fn submit(&self) -> String {
        self.zuul
            .submit(&NewRequest::new(vec!["small".into()]))
            .await
            .expect("submit")
    }

    async fn request_state(&self, id: &str) -> RequestState {
        self.store
            .get_request(id)
            .await
            .expect("read request")
            .expect("request exists")
            .value
            .state
    }

    /// Waits (in virtual time) until `id` is fulfilled; uses the node and
    /// gives it back.
    async fn served(&self, id: &str) {
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

    /// Calls of every operation that reached the decorator.
    fn calls(&self) -> u64 {
        Operation::ALL.iter().map(|&op| self.faulty.calls(op)).sum()
    }
}

/// Polls `f` every 50 ms of virtual time until true (bounded).
async fn until<F: FnMut() -> Fut, Fut: std::future::Future<Output = bool>>(what: &str, mut f: F) {
    for _ in 0..12_000 {
        if f().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{what}: not reached within 600 s of virtual time");
}

#[tokio::test(start_paused = true)]
async fn a_hung_create_is_cut_off_by_api_timeout_and_the_launch_retried() {
    let rig = Rig::start().await;
    rig.faulty
        .set_next(Operation::CreateInstance, Fault::Hang, 1);
    let t0 = Instant::now();
    let id = rig.submit().await;
    rig.served(&id).await;
    let took = t0.elapsed();
    // The hung create is given up after api-timeout (not launch-timeout,
    // an hour); the retry's server boots in 2 s.
    assert!(
        took >= Duration::from_secs(7) && took < Duration::from_secs(15),
        "served after {took:?}"
    );
    assert_eq!(rig.faulty.injected(Operation::CreateInstance), 1);
    assert_eq!(rig.faulty.calls(Operation::CreateInstance), 2, "one retry");
    assert_eq!(rig.metrics.counter("nodepool.launch.attempt_failed"), 1);
    assert_eq!(
        rig.metrics.counter("nodepool.provider.sim.outages"),
        0,
        "one timeout is no outage"
    );
    until("the used node's server deleted", || async {
        rig.cloud.server_count() == 0
    })
    .await;
    assert_eq!(rig.faulty.in_flight(), 0, "the hung call was dropped");
    rig.stop().await;
}

#[tokio::test(start_paused = true)]
async fn creates_refused_for_quota_do_not_fail_the_request() {
    let rig = Rig::start().await;
    rig.faulty
        .set_next(Operation::CreateInstance, Fault::QuotaExceeded, 2);
    let id = rig.submit().await;
    rig.served(&id).await;
    assert_eq!(rig.faulty.injected(Operation::CreateInstance), 2);
    assert_eq!(rig.faulty.calls(Operation::CreateInstance), 3);
    assert_eq!(
        rig.metrics.counter("nodepool.launch.error.quota"),
        2,
        "each refusal ends its launch as a quota error"
    );
    assert_eq!(
        rig.metrics.counter("nodepool.provider.sim.outages"),
        0,
        "a quota answer is no API failure"
    );
    until("the used node's server deleted", || async {
        rig.cloud.server_count() == 0
    })
    .await;
    rig.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_rate_limited_cloud_is_left_alone_for_its_retry_after_then_serves() {
    let rig = Rig::start().await;
    let retry_after = Duration::from_secs(30);
    let healthy = rig.calls();
    rig.faulty.set_all(Fault::RateLimited {
        retry_after: Some(retry_after),
    });
    let id = rig.submit().await;
    until("the provider marked unavailable", || async {
        rig.metrics.counter("nodepool.provider.sim.outages") == 1
    })
    .await;
    let opened = Instant::now();
    let reached = rig.calls();
    assert_eq!(
        rig.faulty.injected_total(),
        reached - healthy,
        "every call since got a 429"
    );
    until("the outage listed", || async {
        !rig.status.unavailable_providers().is_empty()
    })
    .await;
    let outage = &rig.status.unavailable_providers()[0];
    assert_eq!(outage.provider, "sim");
    assert!(outage.reason.contains("429"), "{}", outage.reason);

    // For as long as the cloud asked, nothing reaches it, and the request
    // waits rather than failing.
    tokio::time::sleep(retry_after - Duration::from_secs(1)).await;
    assert_eq!(rig.calls(), reached, "no call before Retry-After");
    assert_ne!(rig.request_state(&id).await, RequestState::Failed);

    // Then one probe, answered 429 again: unavailable for another 30 s.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(rig.calls(), reached + 1, "exactly one probe");
    assert!(rig.faulty.injected(Operation::QuotaLimits) > 0, "the probe");
    rig.faulty.clear_all();
    let cleared = Instant::now();
    rig.served(&id).await;
    // Served only after the next probe, Retry-After after the first.
    assert!(
        opened.elapsed() >= retry_after * 2,
        "served {:?} after the opening",
        opened.elapsed()
    );
    assert!(cleared.elapsed() < retry_after + Duration::from_secs(10));
    assert!(rig.status.unavailable_providers().is_empty());
    assert_eq!(rig.metrics.counter("nodepool.provider.sim.outages"), 1);
    assert_eq!(
        rig.metrics.gauge_value("nodepool.provider.sim.health"),
        Some(1.0)
    );
    until("the used node's server deleted", || async {
        rig.cloud.server_count() == 0
    })
    .await;
    rig.stop().await;
}
