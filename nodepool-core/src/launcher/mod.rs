//! The launcher runtime: keeps pools of ready nodes and serves node
//! requests, by running the [planner] in a loop and
//! executing its plan through a [`StateStore`](crate::store::StateStore)
//! and the configured [`Provider`](crate::provider::Provider)s.
//!
//! Embedding: build a [`Launcher`] with a store, a provider factory and
//! settings, then `run` it with a configuration channel (send a new config
//! to reload) and a cancellation token (cancel to stop). Signals, config
//! files and web endpoints belong to the binary.
//!
//! Each pass reads a snapshot (the stores keep caches fresh by watches),
//! plans, and executes, on the [pass loop](crate::runtime) every runtime
//! shares. Passes run when the store changes (a new request is picked up
//! within milliseconds), when a task finishes, and at least every second
//! for time-based rules; [`LauncherStatus::passes`] counts them.
//!
//! Layout: `providers` (clouds and their observers), [`health`] (a
//! circuit breaker per cloud), `executor` (actions), `tasks` (launch and
//! delete), `nodescan`, [`static_hosts`] (`driver: static`), [`metrics`].

mod executor;
pub mod health;
pub mod metrics;
pub mod nodescan;
mod providers;
pub(crate) mod ready_script;
pub mod static_hosts;
pub(crate) mod tasks;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use health::HealthPolicy;
pub use metrics::Metrics;
pub use providers::ObserverIntervals;
pub(crate) use providers::{cloud_usage, missing_cloud_images, wanted_cloud_images};
// Shared by every runtime; re-exported where embedders have found them.
pub use crate::runtime::{Clock, PassCounter, ProviderFactory};
pub use tasks::{DeleteError, delete_locked_node};

/// Requests a launcher works on at once within a pass (accept, allocate,
/// launch): each costs a few sequential store round trips, so this is how
/// many of them are in flight. The load benchmark's ZooKeeper floor
/// (`burst --floor`) pipelines the same number.
pub const REQUESTS_IN_FLIGHT: usize = 64;

use crate::config::Config;
use crate::model::{
    Component, ComponentKind, ComponentState, NodeRequest, NodeState, RequestState,
};
use crate::planner::{self, LocalState, PoolInfo, PoolKey, ProviderView, Snapshot};
use crate::runtime::{PassRunner, Passed, Wakeups, run_passes};
use crate::store::{
    ComponentRegistration, LockGuard, LockWait, SessionState, Store, StoreError, Versioned, paths,
};
use metrics::{LabelSetRef, families, sanitize_component};
use providers::ProviderHandle;

/// Tunables of the launcher. `Default` gives Nodepool's values.
#[derive(Clone, Debug)]
pub struct LauncherSettings {
    /// Host name registered in components and launcher ids.
    pub hostname: String,
    /// Version string registered in components.
    pub version: String,
    /// Longest time between two passes.
    pub max_pass_interval: Duration,
    /// Shortest time between two passes (coalesces bursts of events).
    pub min_pass_interval: Duration,
    /// Time allowed to delete a server (Nodepool: 600 s).
    pub delete_timeout: Duration,
    /// Deletions running at once.
    pub max_parallel_deletes: usize,
    /// Cloud observation intervals.
    pub observer: ObserverIntervals,
    /// Grace for in-flight work at shutdown.
    pub shutdown_grace: Duration,
    /// How long the set of registered pools must stay unchanged before
    /// min-ready requests are created (so launchers agree on label owners).
    pub registry_settle: Duration,
    /// When a cloud whose API keeps failing is marked unavailable, and how
    /// often it is probed then.
    pub provider_health: HealthPolicy,
    /// How often gauges are sent (Nodepool: 10 s). Passes can run every
    /// few milliseconds under load; gauges sent on every pass would flood
    /// statsd. Counters and timers go out as things happen.
    pub stats_interval: Duration,
    /// Where "now" comes from.
    pub clock: Clock,
}

impl Default for LauncherSettings {
    fn default() -> Self {
        LauncherSettings {
            hostname: "localhost".into(),
            version: crate::VERSION.into(),
            max_pass_interval: Duration::from_secs(1),
            min_pass_interval: Duration::from_millis(5),
            delete_timeout: Duration::from_secs(600),
            max_parallel_deletes: 100,
            observer: ObserverIntervals::default(),
            shutdown_grace: Duration::from_secs(30),
            registry_settle: Duration::from_secs(2),
            provider_health: HealthPolicy::default(),
            stats_interval: Duration::from_secs(10),
            clock: Clock::System,
        }
    }
}

/// Errors that stop the launcher.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LauncherError {
    /// The store failed in a way the launcher cannot work around.
    #[error("state store: {0}")]
    Store(#[from] StoreError),
    /// A newer component registered with a higher model API.
    #[error("a newer component (model API {0}) is registered; this one stops")]
    NewerModel(i64),
}

/// What the launcher is doing, for `/ready` and state dumps.
#[derive(Debug, Default)]
pub struct LauncherStatus {
    ready: std::sync::atomic::AtomicBool,
    config_generation: std::sync::atomic::AtomicU64,
    report: Mutex<String>,
    /// The store session, read live (a lost session must show at once,
    /// even while a pass is stuck).
    session: Mutex<Option<watch::Receiver<SessionState>>>,
    /// Why the last planning pass failed; `None` after one that worked.
    pass_error: Mutex<Option<String>>,
    /// The providers that were unavailable at the last pass.
    unavailable: Mutex<Vec<UnavailableProvider>>,
    /// Completed passes.
    passes: PassCounter,
    /// What the last pass knew of each cloud (without server listings),
    /// for the web app's `/request-explain`.
    views: Mutex<BTreeMap<String, ProviderView>>,
    /// Requests fulfilled by a launch task the moment their last node was
    /// ready (the others were fulfilled by a planning pass).
    fulfilled_on_ready: std::sync::atomic::AtomicU64,
}

/// A provider the launcher stopped calling because its API kept failing.
#[derive(Clone, Debug, PartialEq)]
pub struct UnavailableProvider {
    /// Provider name.
    pub provider: String,
    /// The latest API failure.
    pub reason: String,
    /// Epoch seconds it was marked unavailable.
    pub since: f64,
}

/// Whether the launcher works, for the web app's `/ready`.
#[derive(Clone, Debug, PartialEq)]
pub struct Readiness {
    /// Why it does not work; empty when it does.
    pub problems: Vec<String>,
    /// Providers it routes around. They do not make the launcher unready:
    /// it works as designed (other providers take the work, requests only
    /// they serve wait), and restarting it or taking it out of a load
    /// balancer would not bring a cloud back.
    pub unavailable: Vec<UnavailableProvider>,
}

impl Readiness {
    /// Whether `/ready` answers 200.
    pub fn is_ready(&self) -> bool {
        self.problems.is_empty()
    }
}

impl LauncherStatus {
    /// Whether the first pass completed.
    pub fn is_ready(&self) -> bool {
        self.ready.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// What `/ready` reports: not ready before the first pass completed,
    /// while the store session is not connected, and after a planning pass
    /// failed (until one works); unavailable providers are listed but do
    /// not make it unready (see [`Readiness::unavailable`]).
    pub fn readiness(&self) -> Readiness {
        let mut problems = Vec::new();
        if !self.is_ready() {
            problems.push("the first planning pass has not completed".to_owned());
        }
        let session = self
            .session
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(|rx| *rx.borrow());
        if let Some(st) = session
            && st.id().is_none()
        {
            problems.push(format!(
                "the state store session is not connected ({})",
                match st {
                    SessionState::Suspended { .. } => "suspended: connection lost",
                    SessionState::Expired => "expired",
                    SessionState::Closed => "closed",
                    SessionState::Connected { .. } => "connected",
                }
            ));
        }
        if let Some(e) = self
            .pass_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
        {
            problems.push(format!("the last planning pass failed: {e}"));
        }
        Readiness {
            problems,
            unavailable: self.unavailable_providers(),
        }
    }

    /// The providers unavailable at the last pass.
    pub fn unavailable_providers(&self) -> Vec<UnavailableProvider> {
        self.unavailable
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn set_pass_error(&self, e: Option<String>) {
        *self.pass_error.lock().unwrap_or_else(|p| p.into_inner()) = e;
    }

    /// The launcher's completed passes: wait for some to see that
    /// something did not happen.
    pub fn passes(&self) -> &PassCounter {
        &self.passes
    }

    /// How many requests were fulfilled by their last launch as it
    /// finished, without waiting for a planning pass.
    pub fn fulfilled_on_ready(&self) -> u64 {
        self.fulfilled_on_ready
            .load(std::sync::atomic::Ordering::SeqCst)
    }

    /// How many configurations were applied (1 after start, +1 per reload).
    pub fn config_generation(&self) -> u64 {
        self.config_generation
            .load(std::sync::atomic::Ordering::SeqCst)
    }

    /// What the last pass knew of each cloud (limits, flavors, missing
    /// cloud images, unmanaged usage, outage; no server listings).
    pub fn provider_views(&self) -> BTreeMap<String, ProviderView> {
        self.views.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// A human-readable dump of the launcher's state (SIGUSR2).
    pub fn report(&self) -> String {
        self.report
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

/// What launch and delete tasks share with the loop.
pub(crate) struct Shared {
    store: Store,
    metrics: Arc<Metrics>,
    settings: LauncherSettings,
    wake: Notify,
    deletes: tokio::sync::Semaphore,
    /// Servers whose launch ended without a lock or a record, and that
    /// could not be settled yet (see [`tasks::settle_server`]).
    orphans: Mutex<Vec<Orphan>>,
    /// The requests this launcher accepted and holds, shared with launch
    /// tasks so the last one to finish fulfils its request at once.
    owned: Arc<Mutex<HashMap<String, Owned>>>,
    /// Nodes whose launch task is still running: a request is not
    /// fulfilled while one of its nodes is among them.
    launching: Mutex<std::collections::HashSet<String>>,
    status: Arc<LauncherStatus>,
}

/// A server this launcher made that no launch keeps any more.
#[derive(Clone, Debug)]
pub(crate) struct Orphan {
    provider: String,
    node_id: String,
    external_id: String,
    /// Not tried again before this (the store or cloud just failed).
    due: tokio::time::Instant,
}

/// Pause before an orphan server is tried again.
const ORPHAN_RETRY: Duration = Duration::from_secs(2);

impl Shared {
    /// The current time (epoch seconds) on the launcher's clock.
    pub(crate) fn now(&self) -> f64 {
        self.settings.clock.now()
    }

    /// Remembers a server to settle on a pass a moment from now.
    pub(crate) fn add_orphan(&self, provider: &str, node_id: &str, external_id: &str) {
        let mut list = self.orphans.lock().unwrap_or_else(|p| p.into_inner());
        if list
            .iter()
            .any(|o| o.provider == provider && o.external_id == external_id)
        {
            return;
        }
        list.push(Orphan {
            provider: provider.to_owned(),
            node_id: node_id.to_owned(),
            external_id: external_id.to_owned(),
            due: tokio::time::Instant::now() + ORPHAN_RETRY,
        });
    }

    /// The orphans due for another try.
    fn take_orphans(&self) -> Vec<Orphan> {
        let now = tokio::time::Instant::now();
        let mut list = self.orphans.lock().unwrap_or_else(|p| p.into_inner());
        let (due, later) = std::mem::take(&mut *list)
            .into_iter()
            .partition(|o| o.due <= now);
        *list = later;
        due
    }

    /// Servers waiting to be settled, for the state dump and tests.
    pub(crate) fn orphan_count(&self) -> usize {
        self.orphans.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

/// What the planner needs from the store: nodes, requests, registered
/// pools, images and request lock directories (the provider views come
/// from the clouds; they are left empty).
pub async fn read_snapshot(store: &Store) -> Result<Snapshot, StoreError> {
    let crate::store::Listings {
        nodes,
        requests,
        request_lock_dirs: lock_dirs,
        pools,
        images,
    } = store.listings().await?;
    let mut model_api = None;
    for (_, c) in &pools.records {
        if c.model_api > crate::model::MODEL_API {
            model_api = Some(c.model_api);
        }
    }
    if let Some(v) = model_api {
        tracing::error!(
            model_api = v,
            "a component with a newer model API is registered"
        );
    }
    Ok(Snapshot {
        empty_nodes: nodes
            .malformed
            .iter()
            .filter(|m| m.reason == "empty record")
            .filter_map(|m| m.path.rsplit('/').next().map(str::to_owned))
            .collect(),
        nodes: nodes.records,
        requests: requests.records,
        pools: pools
            .records
            .iter()
            .filter_map(|(_, c)| PoolInfo::from_component(c))
            .collect(),
        images,
        providers: BTreeMap::new(),
        request_lock_dirs: lock_dirs,
    })
}

/// A request this launcher accepted and holds the lock of.
struct Owned {
    pool: PoolKey,
    guard: LockGuard,
    /// The request's `node_types`, as accepted.
    labels: Vec<String>,
    /// The nodes allocated or launched for it since it was accepted.
    nodes: Vec<String>,
    /// The request as we wrote it `pending`, and the version that write
    /// made: fulfilling writes at that version without reading it again
    /// (a change meanwhile fails the version check and is read then).
    accepted: Versioned<NodeRequest>,
}

/// A launcher. See the module documentation.
///
/// # Example
///
/// A launcher embedded in another program, on an in-memory store and the
/// simulated cloud (the `embedded_ci` example program runs one on SQLite
/// and gets a node from it through the requestor):
///
/// ```no_run
/// use std::sync::Arc;
/// use nodepool_core::config::Config;
/// use nodepool_core::launcher::{Launcher, LauncherSettings};
/// use nodepool_core::provider::Provider;
/// use nodepool_core::runtime::ProviderFactory;
/// use nodepool_core::store::{MemoryStore, Store};
/// use nodepool_simulated::SimulatedProvider;
/// use tokio::sync::watch;
/// use tokio_util::sync::CancellationToken;
///
/// # async fn example(yaml: &str) -> Result<(), Box<dyn std::error::Error>> {
/// let config = Config::from_yaml(yaml).map_err(|e| e.to_string())?;
/// let store = Store::new(Arc::new(MemoryStore::new()));
/// let clouds: ProviderFactory = Arc::new(|pc| {
///     SimulatedProvider::new(pc)
///         .map(|p| Arc::new(p) as Arc<dyn Provider>)
///         .map_err(|e| e.to_string())
/// });
/// let launcher = Launcher::new(store, clouds, LauncherSettings::default());
/// let passes = launcher.status();
/// // Sending a new configuration on the channel reloads the launcher.
/// let (_reload, config) = watch::channel(Arc::new(config));
/// let stop = CancellationToken::new();
/// let running = tokio::spawn(launcher.run(config, stop.clone()));
/// passes.passes().reached(1).await?;
/// stop.cancel();
/// running.await??;
/// # Ok(())
/// # }
/// ```
pub struct Launcher {
    store: Store,
    factory: ProviderFactory,
    settings: LauncherSettings,
    metrics: Arc<Metrics>,
    status: Arc<LauncherStatus>,
}

impl Launcher {
    /// A launcher on a store, building providers with `factory`.
    pub fn new(store: Store, factory: ProviderFactory, settings: LauncherSettings) -> Self {
        let status = LauncherStatus::default();
        *status.session.lock().unwrap_or_else(|p| p.into_inner()) = Some(store.backend().session());
        Launcher {
            store,
            factory,
            settings,
            metrics: Arc::new(Metrics::in_memory()),
            status: Arc::new(status),
        }
    }

    /// Uses this metrics sink.
    pub fn with_metrics(mut self, metrics: Arc<Metrics>) -> Self {
        self.metrics = metrics;
        self
    }

    /// The status, readable while it runs.
    pub fn status(&self) -> Arc<LauncherStatus> {
        self.status.clone()
    }

    /// The metrics sink.
    pub fn metrics(&self) -> Arc<Metrics> {
        self.metrics.clone()
    }

    /// Runs until `shutdown` is cancelled. A new value on `config` is a
    /// reload: providers whose configuration changed are rebuilt, pools
    /// re-registered.
    pub async fn run(
        self,
        mut config: watch::Receiver<Arc<Config>>,
        shutdown: CancellationToken,
    ) -> Result<(), LauncherError> {
        let owned: Arc<Mutex<HashMap<String, Owned>>> = Arc::default();
        let shared = Arc::new(Shared {
            owned: owned.clone(),
            launching: Mutex::default(),
            status: self.status.clone(),
            store: self.store.clone(),
            metrics: self.metrics.clone(),
            deletes: tokio::sync::Semaphore::new(self.settings.max_parallel_deletes.max(1)),
            settings: self.settings.clone(),
            wake: Notify::new(),
            orphans: Mutex::new(Vec::new()),
        });
        let mut rt = Runtime {
            shared: shared.clone(),
            factory: self.factory.clone(),
            config: config.borrow_and_update().clone(),
            providers: BTreeMap::new(),
            pool_ids: BTreeMap::new(),
            owned,
            launcher_reg: None,
            pool_regs: BTreeMap::new(),
            session_id: 0,
            leak_suspects: Default::default(),
            down_ports: Default::default(),
            node_summaries: Default::default(),
            tasks: TaskTracker::new(),
            status: self.status.clone(),
            pass_count: 0,
            registry: (Vec::new(), tokio::time::Instant::now()),
            stats: StatsState::default(),
            static_sync: static_hosts::Syncer::default(),
        };
        rt.apply_config();
        let wakeups = Wakeups {
            max_interval: self.settings.max_pass_interval,
            min_interval: self.settings.min_pass_interval,
            store: Some(self.store.backend()),
            relevant: Wakeups::any_path,
            wake: Some(&shared.wake),
        };
        let result = run_passes(
            &mut rt,
            wakeups,
            &mut config,
            &shutdown,
            &self.status.passes,
        )
        .await;
        rt.shutdown().await;
        result
    }
}

/// Makes the parents the launcher's transactions create in, where missing
/// (a new installation): a transaction makes no parents, so on a store
/// where no request was ever locked and no node ever made, every accept
/// of the first wave would fail and be sent again by the slower path.
/// Read from the store's cache where it has one; made as kazoo's makepath
/// would, so Python launchers and Zuul see the usual tree.
async fn ensure_roots(store: &Arc<dyn crate::store::StateStore>) -> Result<(), StoreError> {
    use crate::store::paths::{NODES, REQUESTS_LOCK};
    for root in [REQUESTS_LOCK, NODES] {
        if store.get(root).await?.is_none() {
            match store
                .create(root, b"", crate::store::CreateMode::Persistent)
                .await
            {
                Ok(_) | Err(StoreError::Conflict { .. }) => {}
                Err(e) => return Err(e),
            }
        }
    }
    Ok(())
}

struct Runtime {
    shared: Arc<Shared>,
    factory: ProviderFactory,
    config: Arc<Config>,
    providers: BTreeMap<String, Arc<ProviderHandle>>,
    pool_ids: BTreeMap<PoolKey, String>,
    owned: Arc<Mutex<HashMap<String, Owned>>>,
    launcher_reg: Option<ComponentRegistration>,
    pool_regs: BTreeMap<PoolKey, (ComponentRegistration, Component)>,
    session_id: i64,
    leak_suspects: std::collections::BTreeSet<(String, String)>,
    /// The port cleanup's first sightings, by provider (the planner's).
    down_ports: BTreeMap<String, crate::planner::leaks::DownPorts>,
    /// The planner's per-node summaries, kept from pass to pass.
    node_summaries: crate::planner::NodeSummaryCache,
    tasks: TaskTracker,
    status: Arc<LauncherStatus>,
    pass_count: u64,
    /// The registered pool ids last seen, and since when.
    registry: (Vec<String>, tokio::time::Instant),
    stats: StatsState,
    /// Registers the hosts of static providers.
    static_sync: static_hosts::Syncer,
}

/// The stats election and when gauges are due.
#[derive(Default)]
struct StatsState {
    /// Held while this launcher reports the global gauges.
    election: Option<LockGuard>,
    /// When the planning gauges are due next (`None`: at once).
    next: Option<tokio::time::Instant>,
    /// When the store health gauges are due next.
    next_store: Option<tokio::time::Instant>,
    /// Whether "another launcher reports" was logged since we lost it.
    told_not_leader: bool,
}

/// Whether a statsd gauge is one of the stats election winner's.
fn is_global_gauge(name: &str) -> bool {
    name.starts_with("nodepool.nodes.")
        || name.starts_with("nodepool.label.")
        || name.starts_with("nodepool.requests.")
        || (name.starts_with("nodepool.provider.") && name.contains(".nodes."))
}

/// Whether a gauge is due at `next`; if so, schedules the next one.
fn due(next: &mut Option<tokio::time::Instant>, interval: Duration) -> bool {
    let now = tokio::time::Instant::now();
    if next.is_some_and(|t| now < t) {
        return false;
    }
    *next = Some(now + interval);
    true
}

impl Runtime {
    fn owned_map(&self) -> std::sync::MutexGuard<'_, HashMap<String, Owned>> {
        self.owned.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Builds providers for new or changed provider configurations and
    /// gives every pool a launcher id.
    fn apply_config(&mut self) {
        let cfg = self.config.clone();
        let mut next = BTreeMap::new();
        for pc in &cfg.providers {
            match self.providers.remove(&pc.name) {
                Some(h) if h.config == *pc => {
                    next.insert(pc.name.clone(), h);
                }
                // A static provider has no cloud behind it: the launcher
                // serves it itself, whatever clouds the factory builds.
                _ => match if matches!(pc.driver, crate::config::Driver::Static(_)) {
                    Ok(Arc::new(static_hosts::StaticProvider::new(pc))
                        as Arc<dyn crate::provider::Provider>)
                } else {
                    (self.factory)(pc)
                } {
                    Ok(p) => {
                        next.insert(
                            pc.name.clone(),
                            Arc::new(ProviderHandle::start(
                                pc.clone(),
                                p,
                                self.shared.settings.observer.clone(),
                                self.shared.settings.provider_health.clone(),
                                self.shared.metrics.clone(),
                            )),
                        );
                    }
                    Err(e) => {
                        tracing::error!(provider = %pc.name, error = %e, "cannot set up provider")
                    }
                },
            }
        }
        self.providers = next;
        let mut ids = BTreeMap::new();
        for pc in &cfg.providers {
            for pool in &pc.pools {
                let key = PoolKey::new(&pc.name, &pool.name);
                let id = self.pool_ids.remove(&key).unwrap_or_else(|| {
                    format!(
                        "{}-PoolWorker.{}-{}-{}",
                        self.shared.settings.hostname,
                        pc.name,
                        pool.name,
                        uuid::Uuid::new_v4().simple()
                    )
                });
                ids.insert(key, id);
            }
        }
        self.pool_ids = ids;
        self.status
            .config_generation
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }

    /// (Re-)registers the launcher and pool components: at start, after a
    /// session was replaced, and when pools change.
    async fn ensure_registered(&mut self) -> Result<(), StoreError> {
        let store = self.shared.store.clone();
        let current = *store.backend().session().borrow();
        let Some(id) = current.id() else {
            return Ok(());
        };
        if id != self.session_id {
            // A new session: every ephemeral record of the old one is gone.
            self.launcher_reg = None;
            self.pool_regs.clear();
            if self.session_id != 0 {
                tracing::warn!(
                    "store session replaced; registering again and dropping held requests"
                );
                // Our request locks died with the session.
                for (_, o) in self.owned_map().drain() {
                    o.guard.forget();
                }
            }
            self.session_id = id;
        }
        if self.launcher_reg.is_none() {
            ensure_roots(store.backend()).await?;
            let mut c = Component::new(
                ComponentKind::Launcher,
                &self.shared.settings.hostname,
                &self.shared.settings.version,
            );
            c.state = ComponentState::Running;
            self.launcher_reg = Some(store.register_component(&c).await?);
        }
        // Pools that went away.
        let gone: Vec<PoolKey> = self
            .pool_regs
            .keys()
            .filter(|k| !self.pool_ids.contains_key(*k))
            .cloned()
            .collect();
        for k in gone {
            if let Some((reg, _)) = self.pool_regs.remove(&k) {
                store.unregister_component(&reg).await?;
            }
        }
        let cfg = self.config.clone();
        for pc in &cfg.providers {
            for pool in &pc.pools {
                let key = PoolKey::new(&pc.name, &pool.name);
                let Some(pid) = self.pool_ids.get(&key).cloned() else {
                    continue;
                };
                let mut want = Component::pool(
                    &self.shared.settings.hostname,
                    &self.shared.settings.version,
                    &pid,
                    &pc.name,
                    &pool.name,
                    pool.labels.iter().map(|l| l.name.clone()).collect(),
                    pool.priority.unwrap_or(pc.priority),
                );
                want.state = ComponentState::Running;
                match self.pool_regs.get_mut(&key) {
                    None => {
                        let reg = store.register_component(&want).await?;
                        self.pool_regs.insert(key, (reg, want));
                    }
                    Some((reg, have)) => {
                        want.paused = have.paused;
                        want.state = have.state;
                        want.provider_unavailable = have.provider_unavailable.clone();
                        if *have != want {
                            store.update_component(reg, &want).await?;
                            *have = want;
                        }
                    }
                }
            }
        }
        Ok(())
    }

    async fn snapshot(&self) -> Result<Snapshot, StoreError> {
        let mut snap = read_snapshot(&self.shared.store).await?;
        let now = self.shared.now();
        for (name, h) in &self.providers {
            snap.providers
                .insert(name.clone(), h.view(&snap.nodes, now));
        }
        *self.status.views.lock().unwrap_or_else(|p| p.into_inner()) = snap
            .providers
            .iter()
            .map(|(name, v)| {
                // Without the cloud listings: no copy of them each pass.
                let copy = ProviderView {
                    limits: v.limits.clone(),
                    unmanaged: v.unmanaged.clone(),
                    reported_usage: v.reported_usage.clone(),
                    label_resources: v.label_resources.clone(),
                    availability_zones: v.availability_zones.clone(),
                    missing_cloud_images: v.missing_cloud_images.clone(),
                    outage: v.outage.clone(),
                    ..ProviderView::default()
                };
                (name.clone(), copy)
            })
            .collect();
        Ok(snap)
    }

    fn local_state(&mut self, snapshot: &Snapshot) -> LocalState {
        let mut ids: Vec<String> = snapshot.pools.iter().map(|p| p.id.clone()).collect();
        ids.sort();
        if ids != self.registry.0 {
            self.registry = (ids, tokio::time::Instant::now());
        }
        let registry_settled = self.registry.1.elapsed() >= self.shared.settings.registry_settle;
        LocalState {
            registry_settled,
            pool_ids: self.pool_ids.clone(),
            owned_requests: self
                .owned_map()
                .iter()
                .map(|(k, o)| (k.clone(), o.pool.clone()))
                .collect(),
            session_id: self.session_id,
            leak_suspects: self.leak_suspects.clone(),
            down_ports: self.down_ports.clone(),
            node_summaries: self.node_summaries.clone(),
        }
    }

    /// Plans from a fresh snapshot and executes the plan.
    async fn plan_and_execute(&mut self) -> Result<Passed, LauncherError> {
        if self
            .shared
            .store
            .backend()
            .session()
            .borrow()
            .id()
            .is_none()
        {
            // Suspended or expired: do nothing that needs locks.
            return Ok(Passed::Skipped);
        }
        // Drop requests whose lock is gone with its session.
        self.owned_map().retain(|id, o| {
            let lost = o.guard.is_lost();
            if lost {
                tracing::warn!(request = %id, "lost the lock of a held request");
            }
            !lost
        });
        self.settle_orphans();
        let snapshot = self.snapshot().await?;
        let local = self.local_state(&snapshot);
        let plan = planner::plan(
            &snapshot,
            &self.config,
            self.shared.settings.clock.now(),
            &local,
        );
        self.leak_suspects = plan.leak_suspects.clone();
        self.down_ports = plan.down_ports.clone();
        if !plan.actions.is_empty() && tracing::enabled!(tracing::Level::DEBUG) {
            let mut kinds: BTreeMap<&str, usize> = BTreeMap::new();
            for a in &plan.actions {
                *kinds.entry(executor::action_name(a)).or_default() += 1;
            }
            tracing::debug!(actions = plan.actions.len(), ?kinds, "executing plan");
        }
        executor::execute(self.exec_context(), &snapshot, &plan).await;
        self.update_pool_status(&snapshot, &plan).await;
        if due(&mut self.stats.next, self.shared.settings.stats_interval) {
            self.report_stats(&snapshot, &plan).await;
        }
        self.update_unavailable(&snapshot);
        self.pass_count += 1;
        self.status.set_pass_error(None);
        self.status
            .ready
            .store(true, std::sync::atomic::Ordering::SeqCst);
        self.update_report(&plan);
        Ok(Passed::Completed)
    }

    /// Settles the servers that launches left behind (deletes the ones no
    /// node record owns), each in its own task so a slow cloud delays
    /// nothing else.
    fn settle_orphans(&self) {
        for o in self.shared.take_orphans() {
            let Some(handle) = self.providers.get(&o.provider).cloned() else {
                tracing::warn!(provider = %o.provider, server = %o.external_id, "provider gone; the leak sweep of a launcher that has it deletes the server");
                continue;
            };
            let shared = self.shared.clone();
            self.tasks.spawn(async move {
                let _permit = shared.deletes.acquire().await;
                tasks::settle_server(&shared, &handle, &o.node_id, &o.external_id).await;
            });
        }
    }

    fn exec_context(&self) -> executor::ExecContext {
        executor::ExecContext {
            shared: self.shared.clone(),
            owned: self.owned.clone(),
            providers: self.providers.clone(),
            pool_ids: self.pool_ids.clone(),
            config: self.config.clone(),
            tasks: self.tasks.clone(),
        }
    }

    /// Writes our pools' states to their components: `paused` (at quota,
    /// or its provider unavailable), why the provider is unavailable, and
    /// the labels the pool can boot now, so other launchers and the CLI
    /// see it (launchers pick min-ready owners by them).
    async fn update_pool_status(&mut self, snapshot: &Snapshot, plan: &planner::Plan) {
        let store = self.shared.store.clone();
        for st in &plan.pools {
            if let Some((reg, c)) = self.pool_regs.get_mut(&st.pool) {
                let paused = Some(st.paused);
                let unavailable = snapshot
                    .providers
                    .get(&st.pool.provider)
                    .and_then(|v| v.outage.as_ref())
                    .map(|o| crate::model::ProviderUnavailable {
                        reason: o.reason.clone(),
                        since: o.since,
                    });
                // The outage's start is computed from two clocks each
                // pass; it is rewritten only when the outage changes.
                let same_outage = match (&c.provider_unavailable, &unavailable) {
                    (None, None) => true,
                    (Some(a), Some(b)) => a.reason == b.reason && (a.since - b.since).abs() < 1.0,
                    _ => false,
                };
                let launchable = Some(st.launchable.clone());
                if c.paused != paused || !same_outage || c.launchable_labels != launchable {
                    let mut next = c.clone();
                    next.paused = paused;
                    next.provider_unavailable = unavailable;
                    next.launchable_labels = launchable;
                    next.state = if st.paused {
                        ComponentState::Paused
                    } else {
                        ComponentState::Running
                    };
                    match store.update_component(reg, &next).await {
                        Ok(()) => *c = next,
                        Err(e) => {
                            tracing::warn!(pool = %st.pool, error = %e, "could not update pool component")
                        }
                    }
                }
            }
        }
    }

    /// Takes the stats election if it is free (kazoo's `Election` at
    /// `/nodepool/elections/stats`, identifier `<hostname>-<pid>`); true
    /// while this launcher holds it. A suspended session keeps it.
    async fn ensure_stats_leader(&mut self) -> bool {
        if let Some(g) = &self.stats.election {
            if !g.is_lost() {
                return true;
            }
            tracing::warn!("lost the stats election with the store session");
            self.stats.election = None;
        }
        let identifier = format!("{}-{}", self.shared.settings.hostname, std::process::id());
        match self
            .shared
            .store
            .elect(paths::STATS_ELECTION, LockWait::NonBlocking, &identifier)
            .await
        {
            Ok(g) => {
                tracing::info!(%identifier, "won the stats election; reporting the global gauges");
                self.stats.election = Some(g);
                self.stats.told_not_leader = false;
                true
            }
            Err(StoreError::Locked { .. }) => {
                if !self.stats.told_not_leader {
                    tracing::info!("another launcher reports the global gauges");
                    self.stats.told_not_leader = true;
                }
                false
            }
            Err(e) => {
                // Tried again when the gauges are next due.
                tracing::warn!(error = %e, "cannot take part in the stats election");
                false
            }
        }
    }

    /// Sends the gauges, once per `stats_interval`: the global ones (nodes
    /// by state, provider and label; requests by state) if this launcher
    /// won the stats election, and its own (pools, providers, tenants).
    async fn report_stats(&mut self, snapshot: &Snapshot, plan: &planner::Plan) {
        let m = self.shared.metrics.clone();
        let leader = self.ensure_stats_leader().await;
        m.set(&families::STATS_LEADER, &[], if leader { 1.0 } else { 0.0 });
        if leader {
            self.report_global(snapshot);
        } else {
            // Another launcher reports them; stale copies here would be
            // counted twice by Prometheus.
            m.clear(&families::NODES);
            m.clear(&families::REQUESTS);
            m.clear_gauges(is_global_gauge);
        }
        for pc in &self.config.providers {
            let max: i64 = pc
                .pools
                .iter()
                .map(|p| p.max_servers.unwrap_or(0).max(0))
                .sum();
            m.gauge_as(
                &format!("nodepool.provider.{}.max_servers", pc.name),
                &families::MAX_SERVERS,
                &[("provider", &pc.name)],
                max as f64,
            );
        }
        for st in &plan.pools {
            m.gauge_as(
                &format!(
                    "nodepool.provider.{}.pool.{}.addressable_requests",
                    st.pool.provider, st.pool.pool
                ),
                &families::ADDRESSABLE_REQUESTS,
                &[("provider", &st.pool.provider), ("pool", &st.pool.pool)],
                st.addressable_requests as f64,
            );
        }
        for (tenant, limits) in &self.config.tenant_resource_limits {
            for (name, v) in limits.iter() {
                m.gauge_as(
                    &format!("nodepool.tenant_limits.{tenant}.{name}"),
                    &families::TENANT_LIMITS,
                    &[("tenant", tenant), ("resource", name)],
                    v as f64,
                );
            }
        }
        for (name, view) in &snapshot.providers {
            m.gauge_as(
                &health::health_gauge(name),
                &families::PROVIDER_HEALTH,
                &[("provider", name)],
                if view.outage.is_some() { 0.0 } else { 1.0 },
            );
        }
    }

    /// The stats election winner's gauges, as Python's `updateNodeStats`:
    /// every state zero-filled for every provider and label a registered
    /// pool (any launcher's) or our configuration knows.
    fn report_global(&self, snapshot: &Snapshot) {
        let m = &self.shared.metrics;
        let mut providers: std::collections::BTreeSet<&str> = std::collections::BTreeSet::new();
        let mut labels: std::collections::BTreeSet<&str> = std::collections::BTreeSet::new();
        // (provider, label) pairs some pool serves, zero-filled in the
        // labelled family.
        let mut served: std::collections::BTreeSet<(&str, &str)> =
            std::collections::BTreeSet::new();
        for p in &snapshot.pools {
            providers.insert(p.provider.as_str());
            for l in &p.labels {
                labels.insert(l.as_str());
                served.insert((p.provider.as_str(), l.as_str()));
            }
        }
        for pc in &self.config.providers {
            providers.insert(pc.name.as_str());
            for pool in &pc.pools {
                for l in &pool.labels {
                    served.insert((pc.name.as_str(), l.name.as_str()));
                }
            }
        }
        for l in &self.config.labels {
            labels.insert(l.name.as_str());
        }
        let mut flat: BTreeMap<String, usize> = BTreeMap::new();
        let mut labelled: BTreeMap<(&str, &str, &str), usize> = BTreeMap::new();
        for st in NodeState::ALL {
            let st = st.as_str();
            flat.insert(format!("nodepool.nodes.{st}"), 0);
            for p in &providers {
                flat.insert(format!("nodepool.provider.{p}.nodes.{st}"), 0);
            }
            for l in &labels {
                flat.insert(format!("nodepool.label.{l}.nodes.{st}"), 0);
            }
            for (p, l) in &served {
                labelled.insert((st, p, l), 0);
            }
        }
        for rec in &snapshot.nodes {
            let st = rec.node.state.as_str();
            let p = rec.node.provider.as_str();
            *flat.entry(format!("nodepool.nodes.{st}")).or_default() += 1;
            *flat
                .entry(format!("nodepool.provider.{p}.nodes.{st}"))
                .or_default() += 1;
            for l in &rec.node.node_type {
                *flat
                    .entry(format!("nodepool.label.{l}.nodes.{st}"))
                    .or_default() += 1;
                *labelled.entry((st, p, l.as_str())).or_default() += 1;
            }
        }
        for (name, n) in &flat {
            m.gauge_statsd_only(name, *n as f64);
        }
        m.replace(
            &families::NODES,
            labelled
                .into_iter()
                .map(|((st, p, l), n)| {
                    (
                        LabelSetRef::new(&[("state", st), ("provider", p), ("label", l)]),
                        n as f64,
                    )
                })
                .collect(),
        );
        let mut requests: BTreeMap<&str, usize> = [
            RequestState::Requested,
            RequestState::Pending,
            RequestState::Fulfilled,
            RequestState::Failed,
        ]
        .iter()
        .map(|s| (s.as_str(), 0))
        .collect();
        for r in &snapshot.requests {
            *requests.entry(r.request.state.as_str()).or_default() += 1;
        }
        for (st, n) in &requests {
            m.gauge_statsd_only(&format!("nodepool.requests.{st}"), *n as f64);
        }
        m.replace(
            &families::REQUESTS,
            requests
                .iter()
                .map(|(st, n)| (LabelSetRef::new(&[("state", st)]), *n as f64))
                .collect(),
        );
    }

    /// The store client's health gauges, `nodepool.launcher.<host>.zk.*`
    /// as Python's (one cache serves nodes, requests and images here, so
    /// the three caches' gauges carry the same numbers), plus whether the
    /// session is connected. Sent even while passes are skipped. The
    /// traffic counters (Prometheus only) are updated on every pass.
    fn report_store_health(&mut self) {
        self.shared
            .metrics
            .record_store_traffic(&self.shared.store.backend().health());
        if !due(
            &mut self.stats.next_store,
            self.shared.settings.stats_interval,
        ) {
            return;
        }
        let m = &self.shared.metrics;
        let backend = self.shared.store.backend();
        let h = backend.health();
        let connected = backend.session().borrow().id().is_some();
        let prefix = format!(
            "nodepool.launcher.{}.zk",
            sanitize_component(&self.shared.settings.hostname)
        );
        m.gauge_as(
            &format!("{prefix}.client.connection_queue"),
            &families::STORE_QUEUE,
            &[("queue", "connection")],
            h.requests_in_flight as f64,
        );
        m.gauge_as(
            &format!("{prefix}.client.own_writes_queue"),
            &families::STORE_QUEUE,
            &[("queue", "own_writes")],
            h.own_writes as f64,
        );
        for cache in ["node_cache", "request_cache", "image_cache"] {
            m.gauge_as(
                &format!("{prefix}.{cache}.event_queue"),
                &families::STORE_QUEUE,
                &[("queue", "event")],
                h.event_queue as f64,
            );
            m.gauge_as(
                &format!("{prefix}.{cache}.playback_queue"),
                &families::STORE_QUEUE,
                &[("queue", "playback")],
                h.playback_queue as f64,
            );
        }
        m.gauge_as(
            &format!("{prefix}.connected"),
            &families::STORE_CONNECTED,
            &[],
            if connected { 1.0 } else { 0.0 },
        );
    }

    /// Publishes the unavailable providers for `/ready` (every pass; the
    /// `health` gauges go out with the other gauges).
    fn update_unavailable(&self, snapshot: &Snapshot) {
        let mut unavailable = Vec::new();
        for (name, view) in &snapshot.providers {
            if let Some(o) = &view.outage {
                unavailable.push(UnavailableProvider {
                    provider: name.clone(),
                    reason: o.reason.clone(),
                    since: o.since,
                });
            }
        }
        *self
            .status
            .unavailable
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = unavailable;
    }

    fn update_report(&self, plan: &planner::Plan) {
        let mut r = String::new();
        use std::fmt::Write as _;
        let _ = writeln!(
            r,
            "launcher {} (pass {})",
            self.shared.settings.hostname, self.pass_count
        );
        for st in &plan.pools {
            let id = self.pool_ids.get(&st.pool).cloned().unwrap_or_default();
            let _ = writeln!(
                r,
                "  pool {} id={id} paused={} addressable={}",
                st.pool, st.paused, st.addressable_requests
            );
        }
        for (id, o) in self.owned_map().iter() {
            let _ = writeln!(r, "  holding request {id} for {}", o.pool);
        }
        for (name, h) in &self.providers {
            let health = match h.health.outage() {
                Some(o) => format!(
                    "unavailable for {:.0} s ({})",
                    o.since.elapsed().as_secs_f64(),
                    o.reason
                ),
                None => "available".into(),
            };
            let _ = writeln!(
                r,
                "  provider {name}: {health}; last error {}",
                h.last_error().unwrap_or_else(|| "none".into())
            );
        }
        let _ = writeln!(r, "  tasks in flight: {}", self.tasks.len());
        let _ = writeln!(r, "  servers to settle: {}", self.shared.orphan_count());
        *self.status.report.lock().unwrap_or_else(|p| p.into_inner()) = r;
    }

    /// Stops taking requests, hands back the ones held, lets in-flight
    /// work finish within the grace period, and unregisters.
    async fn shutdown(mut self) {
        tracing::info!("launcher stopping");
        let store = self.shared.store.clone();
        let held: Vec<(String, Owned)> = self.owned_map().drain().collect();
        for (id, o) in held {
            if let Err(e) =
                executor::hand_back(&store, &id, o.guard, self.shared.settings.clock).await
            {
                tracing::warn!(request = %id, error = %e, "could not hand back a request");
            }
        }
        self.tasks.close();
        if tokio::time::timeout(self.shared.settings.shutdown_grace, self.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                "in-flight work did not finish within the shutdown grace; leaving it to cleanup"
            );
        }
        for (_, (reg, _)) in std::mem::take(&mut self.pool_regs) {
            let _ = store.unregister_component(&reg).await;
        }
        if let Some(reg) = self.launcher_reg.take() {
            let _ = store.unregister_component(&reg).await;
        }
        if let Some(g) = self.stats.election.take() {
            // Another launcher takes over the global gauges at once.
            let _ = g.release().await;
        }
        tracing::info!("launcher stopped");
    }
}

impl PassRunner for Runtime {
    type Fatal = LauncherError;

    async fn pass(&mut self) -> Result<Passed, LauncherError> {
        if let Err(e) = self.ensure_registered().await {
            tracing::warn!(error = %e, "registration failed; retrying");
        }
        self.report_store_health();
        self.static_sync
            .maybe_start(&self.tasks, &self.shared, &self.config);
        match self.plan_and_execute().await {
            Err(LauncherError::Store(err)) => {
                tracing::warn!(error = %err, "planning pass failed; retrying");
                self.status.set_pass_error(Some(err.to_string()));
                Ok(Passed::Skipped)
            }
            other => other,
        }
    }

    async fn reload(&mut self, config: Arc<Config>) {
        self.config = config;
        tracing::info!("configuration reloaded");
        self.apply_config();
    }
}

/// Whether a request is still in a state where a pass acts on it.
pub(crate) fn is_open(state: RequestState) -> bool {
    matches!(state, RequestState::Requested | RequestState::Pending)
}

/// The session state, for tests.
pub fn session_of(store: &Store) -> SessionState {
    *store.backend().session().borrow()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readiness_says_why_it_is_not_ready() {
        let status = LauncherStatus::default();
        let (session, rx) = watch::channel(SessionState::Connected { id: 7 });
        *status.session.lock().unwrap_or_else(|p| p.into_inner()) = Some(rx);
        assert_eq!(
            status.readiness().problems,
            ["the first planning pass has not completed"]
        );
        status
            .ready
            .store(true, std::sync::atomic::Ordering::SeqCst);
        assert!(status.readiness().is_ready());
        session.send_replace(SessionState::Suspended { id: 1 });
        status.set_pass_error(Some("/nodepool/requests: connection lost".into()));
        assert_eq!(
            status.readiness().problems,
            [
                "the state store session is not connected (suspended: connection lost)",
                "the last planning pass failed: /nodepool/requests: connection lost"
            ]
        );
        session.send_replace(SessionState::Connected { id: 8 });
        status.set_pass_error(None);
        // Unavailable providers are listed, but the launcher is ready.
        *status.unavailable.lock().unwrap_or_else(|p| p.into_inner()) = vec![UnavailableProvider {
            provider: "bad".into(),
            reason: "timed out".into(),
            since: 1.0,
        }];
        let r = status.readiness();
        assert!(r.is_ready());
        assert_eq!(r.unavailable.len(), 1);
        session.send_replace(SessionState::Expired);
        assert!(!status.readiness().is_ready());
    }
}
