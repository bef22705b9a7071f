//! Issue 12's fault drills, as functions shared by the whole-system tests
//! (`tests/tests/faults.rs`, which assert on the [`Report`]) and the
//! `drill` benchmark (which prints it as a table).
//!
//! A [`Drill`] is one scenario's world: a store (a private ZooKeeper over
//! TLS that the drill may stop, or a SQLite file, possibly on a small
//! tmpfs), the simulated cloud in a state file every process shares,
//! `nodepool-launcher` processes (or an in-process launcher on a
//! fault-injecting store), a Zuul-style client ([`Zuul`]) that submits a
//! burst of single-node requests, checks every node it is given, uses it
//! and gives it back, and a [`Monitor`] watching the store and the cloud
//! throughout. [`Drill::finish`] then waits for every node to go and
//! counts the servers left, *before* the launcher's leak sweep (two cloud
//! listings 60 s apart) could have run, and checks the launchers' logs
//! and metrics that the sweep deleted nothing: a server that outlived its
//! node is a leak even if the sweep would have found it a minute later.
//!
//! Each scenario is a small function (`zookeeper_blips`,
//! `session_expiry_sigstop`, ...) returning a [`Report`]. Waits are for
//! conditions with deadlines; the only fixed delays are the faults'
//! own lengths (an outage of 5 s, a disk full for 6 s) and the cloud's
//! boot and delete times.
//!
//! # Reading the evidence
//!
//! With `NODEPOOL_DRILL_KEEP=1` the drill's directory (launcher logs,
//! configuration, the cloud's state file) and the private ZooKeeper's
//! data directory (both named in the report) outlive the drill.
//! ZooKeeper's transaction log then shows every write in order, with its
//! session and the node's version, which tells an ambiguous write (applied
//! although the client saw an error) from a failed one:
//!
//! ```text
//! java -cp /usr/share/java/zookeeper.jar:/usr/share/java/zookeeper-jute.jar:\
//! /usr/share/java/slf4j-api.jar:/usr/share/java/slf4j-nop.jar \
//!   org.apache.zookeeper.server.persistence.TxnLogToolkit -d DIR/data/version-2/log.1
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nodepool_core::config::{ApiFault, Config};
use nodepool_core::launcher::{LauncherSettings, ProviderFactory};
use nodepool_core::model::{ComponentKind, NodeRequest, NodeState, RequestState, epoch_now};
use nodepool_core::provider::InstanceStatus;
use nodepool_core::store::{LockWait, StateStore, Store, StoreError};
use nodepool_requestor::{HeldNode, NewRequest, Requestor, RequestorError};
use nodepool_simulated::SimulatedProvider;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::faults::{
    Ambiguity, AmbiguousWrites, Clouds, Monitor, MonitorReport, Tmpfs, ZooKeeperEnsemble,
    ZooKeeperServer,
};
use crate::{Daemon, RunningLauncher};

/// Polls `check` every 50 ms until it returns `Ok`; after `limit`, returns
/// the last look's `Err` (the caller decides whether that fails the test).
pub async fn until<F, Fut, T>(limit: Duration, mut check: F) -> Result<T, String>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, String>>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        match check().await {
            Ok(v) => return Ok(v),
            Err(why) if tokio::time::Instant::now() >= deadline => {
                return Err(format!("not reached within {limit:?}; last look: {why}"));
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// Which store a drill runs on.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum DrillStore {
    /// A private ZooKeeper over TLS, with this `zookeeper-timeout` (s).
    ZooKeeper {
        /// Session timeout, seconds.
        session_timeout: f64,
    },
    /// A private ensemble of `members` ZooKeeper servers over TLS, with
    /// this `zookeeper-timeout` (s).
    ZooKeeperEnsemble {
        /// Servers in the ensemble.
        members: usize,
        /// Session timeout, seconds.
        session_timeout: f64,
    },
    /// A SQLite file with this `state-store.lease` (s), on a tmpfs of
    /// `tmpfs_bytes` when given (to fill it).
    Sqlite {
        /// Lease, seconds.
        lease: f64,
        /// Size of the tmpfs the file lives on; `None`: the temp dir.
        tmpfs_bytes: Option<u64>,
    },
}

impl DrillStore {
    /// "ZooKeeper" or "SQLite".
    pub fn label(&self) -> &'static str {
        match self {
            DrillStore::ZooKeeper { .. } => "ZooKeeper",
            DrillStore::ZooKeeperEnsemble { .. } => "ZooKeeper x3",
            DrillStore::Sqlite { .. } => "SQLite",
        }
    }
}

/// How long the end of a drill may take.
#[derive(Clone, Copy, Debug)]
pub struct FinishLimits {
    /// After the last request was given back: until no node is left.
    pub nodes_gone: Duration,
    /// After the nodes are gone: until no server is left. A server's
    /// delete is done before its node record goes, so this only covers
    /// the cloud's delete delay; far below the leak sweep's 60 s.
    pub servers_grace: Duration,
    /// The benchmark waits this long for zero servers (the leak sweep
    /// included) to report how long it took; tests pass `servers_grace`.
    pub zero_servers: Duration,
}

/// What every scenario takes.
#[derive(Clone, Debug)]
pub struct Params {
    /// Single-node requests in the burst.
    pub requests: usize,
    /// The simulated cloud's boot delay, seconds.
    pub boot_delay: f64,
    /// `max-servers` of each provider's one pool.
    pub max_servers: u32,
    /// Simulated providers serving the label (each its own cloud).
    pub providers: usize,
    /// The `nodepool-launcher` binary.
    pub launcher_bin: PathBuf,
    /// After the last fault: until every request is fulfilled or failed.
    pub settle: Duration,
    /// The end.
    pub limits: FinishLimits,
}

/// The configuration body (everything but the store): one label, served
/// by `p.providers` simulated providers (`sim`, `sim2`, ...), each a cloud
/// in its own state file in `dir` with one pool of `p.max_servers`.
/// Calls to a hung cloud time out after 10 s (`api-timeout`), as a
/// short clouds.yaml `api_timeout` would.
fn body(p: &Params, dir: &Path) -> String {
    let mut out = String::from("labels:\n  - name: small\nproviders:\n");
    for i in 1..=p.providers.max(1) {
        let name = provider_name(i);
        out.push_str(&format!(
            r#"  - name: {name}
    driver: simulated
    simulation:
      boot-delay: {boot}
      delete-delay: 0.1
      api-timeout: 10
      seed: {i}
      state-file: '{file}'
      flavors:
        - {{name: s, vcpus: 1, ram: 1024}}
    cloud-images: [{{name: img}}]
    pools:
      - name: main
        max-servers: {max}
        labels:
          - {{name: small, cloud-image: img, flavor-name: s}}
"#,
            boot = p.boot_delay,
            file = dir.join(format!("{name}.json")).display(),
            max = p.max_servers,
        ));
    }
    out
}

/// The name of the `i`-th (from 1) simulated provider of a drill.
pub fn provider_name(i: usize) -> String {
    if i <= 1 {
        "sim".to_owned()
    } else {
        format!("sim{i}")
    }
}

/// Log lines of the launchers that tell what happened (counted into
/// [`Report::log_counts`]).
pub const LOG_MARKERS: [&str; 11] = [
    "launch attempt failed",
    "launch failed",
    "launch abandoned",
    "node deletion failed",
    "lost the lock of a held request",
    "connection lost; session suspended",
    "session ended",
    "session lease lapsed",
    "database or disk is full",
    "planning pass failed",
    LEAK_DELETED,
];

/// What the launcher logs for each server its leak sweep deletes.
const LEAK_DELETED: &str = "leaked server deleted";

/// One scenario's world. See the module documentation.
pub struct Drill {
    /// Scenario name.
    pub name: String,
    params: Params,
    // Field order is drop order: processes die first, then the Zuul and
    // monitor tasks' stores, ZooKeeper, the tmpfs, the directory.
    launchers: Vec<Daemon>,
    killed: BTreeSet<String>,
    inproc: Vec<(String, RunningLauncher)>,
    zuul: Zuul,
    monitor: Option<Monitor>,
    /// The test's own session (observations, preconditions).
    pub store: Store,
    /// The test's own handles on the shared clouds (one per provider).
    pub clouds: Clouds,
    /// The configuration every launcher runs.
    pub config: Config,
    config_path: PathBuf,
    kind: DrillStore,
    zk: Option<ZooKeeperServer>,
    ensemble: Option<ZooKeeperEnsemble>,
    tmpfs: Option<Tmpfs>,
    dir: tempfile::TempDir,
    started: Instant,
    faults: Vec<String>,
    preconditions: Vec<String>,
    failures: Vec<String>,
}

impl Drill {
    /// Sets up the store, the cloud, the Zuul client and the monitor. No
    /// launcher runs yet.
    pub async fn new(name: &str, params: &Params, kind: DrillStore) -> Self {
        crate::init_logging();
        let started = Instant::now();
        let dir = tempfile::Builder::new()
            .prefix("nodepool-rs-drill-")
            .tempdir()
            .expect("tempdir");
        let mut setup = Vec::new();
        let mut ensemble = None;
        let (zk, tmpfs, store_yaml) = match kind {
            DrillStore::ZooKeeper { session_timeout } => {
                let zk = ZooKeeperServer::start_new().await;
                setup.push(format!("{zk:?}"));
                let yaml = zk.store_yaml("/nodepool-drill", session_timeout);
                (Some(zk), None, yaml)
            }
            DrillStore::ZooKeeperEnsemble {
                members,
                session_timeout,
            } => {
                let e = ZooKeeperEnsemble::start_new(members).await;
                for s in &e.servers {
                    setup.push(format!("{s:?}"));
                }
                let yaml = e.store_yaml("/nodepool-drill", session_timeout);
                ensemble = Some(e);
                (None, None, yaml)
            }
            DrillStore::Sqlite { lease, tmpfs_bytes } => {
                let db_dir = dir.path().join("db");
                let tmpfs = tmpfs_bytes
                    .map(|size| Tmpfs::mount(&db_dir, size).unwrap_or_else(|e| panic!("{e}")));
                std::fs::create_dir_all(&db_dir).expect("db dir");
                let yaml = format!(
                    "state-store: {{driver: sqlite, path: '{}', lease: {lease}}}\n",
                    db_dir.join("state.db").display()
                );
                (None, tmpfs, yaml)
            }
        };
        let config_path = dir.path().join("nodepool.yaml");
        std::fs::write(
            &config_path,
            format!("{store_yaml}{}", body(params, dir.path())),
        )
        .expect("write the configuration");
        let config = Config::load(&config_path, None).expect("valid configuration");
        // The same clouds the launchers open: this process sees what they do.
        let clouds = Clouds(
            config
                .providers
                .iter()
                .map(|p| Arc::new(SimulatedProvider::new(p).expect("the state file opens")))
                .collect(),
        );
        let store = open_store(&config).await;
        let zuul_store = open_store(&config).await;
        let zuul = Zuul::start(
            Requestor::new(zuul_store, "8d0f7c1e6b2a4f3c9e5d7a1b2c3d4e5f")
                .with_node_lock_timeout(Duration::from_secs(5)),
            clouds.clone(),
        );
        let monitor = Monitor::start(store.clone(), clouds.clone(), Duration::from_millis(200));
        Drill {
            name: name.to_owned(),
            params: params.clone(),
            launchers: Vec::new(),
            killed: BTreeSet::new(),
            inproc: Vec::new(),
            zuul,
            monitor: Some(monitor),
            store,
            clouds,
            config,
            config_path,
            kind,
            zk,
            ensemble,
            tmpfs,
            dir,
            started,
            faults: setup,
            preconditions: Vec::new(),
            failures: Vec::new(),
        }
    }

    /// Records a step of the scenario with its time, for the report.
    pub fn note(&mut self, what: impl Into<String>) {
        let line = format!(
            "{:6.1} s  {}",
            self.started.elapsed().as_secs_f64(),
            what.into()
        );
        tracing::info!(drill = %self.name, "{line}");
        self.faults.push(line);
    }

    /// Records a way the system failed the drill that the common
    /// properties do not cover (e.g. a stopped launcher's session never
    /// expired).
    pub fn fail(&mut self, what: impl Into<String>) {
        self.failures.push(what.into());
    }

    /// Records that the fault did not have the effect the scenario is
    /// about (the drill then proves nothing, and its test fails).
    pub fn precondition(&mut self, holds: bool, what: impl Into<String>) {
        if !holds {
            self.preconditions.push(what.into());
        }
    }

    /// The private ZooKeeper (ZooKeeper drills only).
    pub fn zookeeper(&mut self) -> &mut ZooKeeperServer {
        self.zk
            .as_mut()
            .expect("this drill runs on a private ZooKeeper")
    }

    /// The private ensemble (ensemble drills only).
    pub fn ensemble(&mut self) -> &mut ZooKeeperEnsemble {
        self.ensemble
            .as_mut()
            .expect("this drill runs on a private ZooKeeper ensemble")
    }

    /// The tmpfs under the SQLite file (disk-full drills only).
    pub fn tmpfs(&self) -> &Tmpfs {
        self.tmpfs
            .as_ref()
            .expect("this drill's SQLite file is on a tmpfs")
    }

    /// The launcher process called `name`.
    pub fn launcher(&mut self, name: &str) -> &mut Daemon {
        self.launchers
            .iter_mut()
            .find(|d| d.name() == name)
            .unwrap_or_else(|| panic!("no launcher {name}"))
    }

    /// Registered pool worker ids.
    pub async fn pools(&self) -> Result<BTreeSet<String>, String> {
        Ok(self
            .store
            .list_components(ComponentKind::Pool)
            .await
            .map_err(|e| e.to_string())?
            .records
            .into_iter()
            .filter_map(|(_, c)| c.id)
            .collect())
    }

    /// Waits until a pool worker id not in `known` registers.
    async fn new_pool(&self, known: &BTreeSet<String>) -> String {
        until(Duration::from_secs(60), || async {
            let now = self.pools().await?;
            now.difference(known)
                .next()
                .cloned()
                .ok_or_else(|| format!("pools {now:?}"))
        })
        .await
        .unwrap_or_else(|e| panic!("{}: a new launcher's pool never registered: {e}", self.name))
    }

    /// Starts a `nodepool-launcher` process and returns its pool worker
    /// id once registered (pools are told apart by registration order,
    /// since every process registers the machine's host name).
    pub async fn spawn_launcher(&mut self, name: &str) -> String {
        let known = self.pools().await.unwrap_or_default();
        let mut cmd = Command::new(&self.params.launcher_bin);
        cmd.arg("-c")
            .arg(&self.config_path)
            .arg("--no-webapp")
            .current_dir(self.dir.path())
            // INFO at least: the report counts the launcher's log lines.
            .env("RUST_LOG", "info");
        let log = self.dir.path().join(format!("launcher-{name}.log"));
        self.launchers.push(Daemon::spawn(name, cmd, &log));
        let pool = self.new_pool(&known).await;
        self.note(format!("launcher {name} up (pool {pool})"));
        pool
    }

    /// Starts an in-process launcher on `store` (for faults a release
    /// binary has no hook for) with the daemon's providers and the
    /// daemon's default settings (cloud listing every 60 s, so the leak
    /// sweep cannot delete anything before the drill counts servers).
    pub async fn start_inproc(&mut self, name: &str, store: Store) -> String {
        let known = self.pools().await.unwrap_or_default();
        let factory: ProviderFactory = Arc::new(nodepool_cli::daemon::make_provider);
        let launcher = RunningLauncher::start_on(
            store,
            &self.config,
            LauncherSettings {
                hostname: format!("drill-{name}"),
                shutdown_grace: Duration::from_secs(5),
                ..LauncherSettings::default()
            },
            factory,
        );
        self.inproc.push((name.to_owned(), launcher));
        let pool = self.new_pool(&known).await;
        self.note(format!("in-process launcher {name} up (pool {pool})"));
        pool
    }

    /// Submits `n` single-node requests through the Zuul client.
    pub async fn submit(&mut self, n: usize) {
        self.zuul.submit(n).await;
        self.note(format!("{n} requests submitted"));
    }

    /// Launches in flight (of `pool` when given): nodes `building` whose
    /// server is recorded and still booting in the cloud. A node left
    /// `building` by an abandoned launch has an ACTIVE server, so it does
    /// not count: a fault must hit launches that are really under way.
    pub async fn in_flight(&self, pool: Option<&str>) -> Result<usize, String> {
        let nodes = self
            .store
            .list_nodes()
            .await
            .map_err(|e| e.to_string())?
            .records;
        let booting: BTreeSet<String> = crate::faults::servers(&self.clouds)
            .await
            .into_iter()
            .filter(|(_, _, status)| *status == InstanceStatus::Building)
            .map(|(id, _, _)| id)
            .collect();
        Ok(nodes
            .iter()
            .filter(|n| n.node.state == NodeState::Building)
            .filter(|n| {
                n.node
                    .external_id
                    .as_ref()
                    .is_some_and(|s| booting.contains(s))
            })
            .filter(|n| pool.is_none_or(|p| n.node.launcher.as_deref() == Some(p)))
            .count())
    }

    /// Waits up to 10 s until at least `min` launches are in flight (see
    /// [`in_flight`](Self::in_flight)); returns how many there are. When
    /// they never are (a launcher that stopped launching: its pool full of
    /// abandoned nodes), the timeline says so and the drill goes on: the
    /// fault then hits an idle launcher, and the report shows why.
    pub async fn until_in_flight(&mut self, min: usize, pool: Option<&str>) -> usize {
        let found = until(Duration::from_secs(10), || async {
            let n = self.in_flight(pool).await?;
            if n >= min {
                Ok(n)
            } else {
                Err(format!("{n} launches in flight"))
            }
        })
        .await;
        match found {
            Ok(n) => n,
            Err(e) => {
                self.note(format!("waiting for {min} launches in flight: {e}"));
                0
            }
        }
    }

    /// Waits until every request is fulfilled and given back, or failed,
    /// for at most `limit`; false if some were not.
    pub async fn settle(&self, limit: Duration) -> bool {
        until(limit, || async {
            let (done, total) = self.zuul.progress();
            if done == total {
                Ok(())
            } else {
                Err(format!("{done} of {total} requests done"))
            }
        })
        .await
        .is_ok()
    }

    /// Counts a marker in every launcher process's log.
    pub fn log_count(&self, marker: &str) -> usize {
        self.launchers
            .iter()
            .map(|d| d.log().matches(marker).count())
            .sum()
    }

    /// Counts a marker in one launcher's log.
    pub fn log_count_of(&self, name: &str, marker: &str) -> usize {
        self.launchers
            .iter()
            .filter(|d| d.name() == name)
            .map(|d| d.log().matches(marker).count())
            .sum()
    }

    /// `kill -9` of a launcher (it is then not reported as crashed).
    pub fn kill(&mut self, name: &str) {
        self.killed.insert(name.to_owned());
        self.launcher(name).kill();
    }

    /// Ends the drill: withdraws what was never fulfilled (as Zuul does
    /// after its timeout), waits until every node is gone, counts the
    /// servers left, and gathers the evidence into a [`Report`].
    pub async fn finish(mut self) -> Report {
        let limits = self.params.limits;
        let stranded = self.stranded_details().await;
        for id in self.zuul.give_up() {
            let _ = until(Duration::from_secs(10), || async {
                self.zuul
                    .requestor()
                    .cancel(&id)
                    .await
                    .map_err(|e| e.to_string())
            })
            .await;
        }
        let zuul = self.zuul.stop().await;
        let returned_at = Instant::now();
        let nodes_gone = until(limits.nodes_gone, || async {
            let nodes = self
                .store
                .list_nodes()
                .await
                .map_err(|e| e.to_string())?
                .records;
            if nodes.is_empty() {
                Ok(())
            } else {
                Err(nodes
                    .iter()
                    .map(|n| {
                        format!(
                            "{} {} locked={} launcher={} server={} allocated_to={}",
                            n.id,
                            n.node.state.as_str(),
                            n.locked,
                            n.node.launcher.as_deref().unwrap_or("-"),
                            n.node.external_id.as_deref().unwrap_or("null"),
                            n.node.allocated_to.as_deref().unwrap_or("-"),
                        )
                    })
                    .collect::<Vec<_>>()
                    .join("\n"))
            }
        })
        .await;
        let nodes_left = last_look(&nodes_gone);
        let describe = |live: &[(String, Option<String>, InstanceStatus)]| {
            live.iter()
                .map(|(id, node, status)| {
                    format!(
                        "server {id} of node {} ({status:?})",
                        node.as_deref().unwrap_or("?")
                    )
                })
                .collect::<Vec<_>>()
                .join("\n")
        };
        // Servers no node records: they outlived their node. (A server of
        // a node still there is accounted for by `nodes_left`.)
        let orphans = || async {
            let nodes = self
                .store
                .list_nodes()
                .await
                .map_err(|e| e.to_string())?
                .records;
            let recorded: BTreeSet<&str> = nodes
                .iter()
                .filter_map(|n| n.node.external_id.as_deref())
                .collect();
            let mut live = crate::faults::servers(&self.clouds).await;
            live.retain(|(id, _, _)| !recorded.contains(id.as_str()));
            if live.is_empty() {
                Ok(())
            } else {
                Err(describe(&live))
            }
        };
        // Counted at the end of the grace, before any longer wait could
        // let the leak sweep hide them.
        let servers_left = last_look(&until(limits.servers_grace, orphans).await);
        // Zero servers at all, only possible once every node is gone.
        let seconds_to_zero_servers = if nodes_left.is_empty() {
            until(limits.zero_servers, || async {
                let live = crate::faults::servers(&self.clouds).await;
                if live.is_empty() {
                    Ok(())
                } else {
                    Err(describe(&live))
                }
            })
            .await
            .ok()
            .map(|()| returned_at.elapsed().as_secs_f64())
        } else {
            None
        };
        let monitor = match self.monitor.take() {
            Some(m) => m.finish().await,
            None => MonitorReport::default(),
        };
        let mut log_counts: BTreeMap<&'static str, usize> = LOG_MARKERS
            .iter()
            .map(|m| (*m, self.log_count(m)))
            .collect();
        let mut leak_sweep_deleted = self.log_count(LEAK_DELETED) as u64;
        let mut metrics = BTreeMap::new();
        for (_, l) in &self.inproc {
            leak_sweep_deleted += l.metrics.counter("nodepool.provider.sim.leaked.instances");
            // Launch results by statsd name (`nodepool.launch.<result>`),
            // reported under their flattened names as before.
            for (name, v) in l.metrics.counters() {
                if let Some(result) = name.strip_prefix("nodepool.launch.")
                    && !result.starts_with("provider.")
                    && !result.starts_with("requestor.")
                {
                    let flat = format!("nodepool_launch_{}_total", result.replace('.', "_"));
                    *metrics.entry(flat).or_insert(0) += v;
                }
            }
        }
        log_counts.insert(LEAK_DELETED, leak_sweep_deleted as usize);
        let killed = self.killed.clone();
        let crashed: Vec<String> = self
            .launchers
            .iter_mut()
            .filter(|d| !killed.contains(d.name()))
            .filter_map(|d| (!d.running()).then(|| format!("launcher {} exited", d.name())))
            .collect();
        for (_, l) in std::mem::take(&mut self.inproc) {
            l.shutdown.cancel();
            let _ = tokio::time::timeout(Duration::from_secs(15), l.stop()).await;
        }
        let _ = self.store.backend().close().await;
        let kept = keep_requested().then(|| {
            if let Some(zk) = self.zk.as_mut() {
                zk.keep();
            }
            if let Some(e) = self.ensemble.as_mut() {
                for s in &mut e.servers {
                    s.keep();
                }
            }
            let dir = std::mem::replace(&mut self.dir, tempfile::tempdir().expect("tempdir"));
            dir.keep()
        });
        Report {
            scenario: self.name.clone(),
            store: self.kind.label(),
            requests: zuul.requests,
            fulfilled: zuul.returned,
            fulfilled_not_returned: zuul.not_returned,
            failed: zuul.failed,
            stranded,
            resubmitted: zuul.resubmitted,
            dead_served: zuul.dead_served,
            double_allocations: zuul.double_allocations,
            monitor,
            nodes_left,
            servers_left,
            leak_sweep_deleted,
            seconds_to_zero_servers,
            log_counts,
            launch_metrics: metrics,
            crashed,
            preconditions: self.preconditions.clone(),
            failures: self.failures.clone(),
            timeline: self.faults.clone(),
            wall: self.started.elapsed(),
            kept,
        }
    }

    /// For each request never fulfilled: its state and its nodes, with
    /// their state, lock and server — the evidence of a stranded request.
    async fn stranded_details(&self) -> Vec<String> {
        let waiting = self.zuul.waiting();
        if waiting.is_empty() {
            return Vec::new();
        }
        let nodes = self
            .store
            .list_nodes()
            .await
            .map(|l| l.records)
            .unwrap_or_default();
        let requests = self
            .store
            .list_requests()
            .await
            .map(|l| l.records)
            .unwrap_or_default();
        let live: BTreeMap<String, InstanceStatus> = crate::faults::servers(&self.clouds)
            .await
            .into_iter()
            .map(|(id, _, status)| (id, status))
            .collect();
        waiting
            .iter()
            .map(|id| {
                let req = requests.iter().find(|r| &r.id == id);
                let state = req.map_or("gone".to_owned(), |r| {
                    format!(
                        "{} locked={} declined_by={:?}",
                        r.request.state.as_str(),
                        r.locked,
                        r.request.declined_by
                    )
                });
                let mine: Vec<String> = nodes
                    .iter()
                    .filter(|n| n.node.allocated_to.as_deref() == Some(id.as_str()))
                    .map(|n| {
                        let server = n.node.external_id.as_deref();
                        format!(
                            "node {} {} locked={} launcher={} server={} ({})",
                            n.id,
                            n.node.state.as_str(),
                            n.locked,
                            n.node.launcher.as_deref().unwrap_or("-"),
                            server.unwrap_or("null"),
                            server
                                .and_then(|s| live.get(s))
                                .map_or("not in the cloud".to_owned(), |st| format!("{st:?}"))
                        )
                    })
                    .collect();
                format!("request {id}: {state}; nodes: [{}]", mine.join("; "))
            })
            .collect()
    }
}

/// Whether the drill's directory should outlive it (`NODEPOOL_DRILL_KEEP`
/// set and not empty or `0`), to read the launchers' logs afterwards.
fn keep_requested() -> bool {
    std::env::var("NODEPOOL_DRILL_KEEP").is_ok_and(|v| !v.is_empty() && v != "0")
}

/// The lines of an [`until`] failure's last look (one item per line).
fn last_look(r: &Result<(), String>) -> Vec<String> {
    match r {
        Ok(()) => Vec::new(),
        Err(why) => why
            .split_once("last look: ")
            .map_or(why.as_str(), |(_, list)| list)
            .lines()
            .map(str::to_owned)
            .collect(),
    }
}

/// Opens a store client (a new session) as the daemons do.
pub async fn open_store(cfg: &Config) -> Store {
    nodepool_cli::daemon::open_store(cfg)
        .await
        .unwrap_or_else(|e| panic!("open the drill's store: {e:#}"))
}

// ---------------------------------------------------------------------------
// The Zuul-style client
// ---------------------------------------------------------------------------

/// Where one request of the burst is.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Fate {
    /// Submitted, not yet fulfilled or failed.
    Waiting,
    /// Fulfilled; being checked, accepted, used and given back.
    Handling,
    /// Its nodes were used and given back.
    Returned,
    /// The launcher failed it.
    Failed,
    /// Never fulfilled; withdrawn at the end of the drill.
    Stranded,
}

/// One request of the burst: its current request id (a new one after a
/// resubmission) and where it is.
#[derive(Debug)]
struct Origin {
    request: String,
    fate: Fate,
    /// The last store error met while handling it (evidence).
    last_error: Option<String>,
}

#[derive(Debug, Default)]
struct ZuulState {
    origins: Vec<Origin>,
    /// Request id → origin index.
    by_request: BTreeMap<String, usize>,
    /// Node id → the request that was given it.
    allocations: BTreeMap<String, String>,
    dead_served: Vec<String>,
    double_allocations: Vec<String>,
}

struct ZuulShared {
    zuul: Requestor,
    clouds: Clouds,
    state: Mutex<ZuulState>,
    resubmitted: AtomicU64,
    stop: CancellationToken,
    tasks: TaskTracker,
}

impl ZuulShared {
    fn state(&self) -> std::sync::MutexGuard<'_, ZuulState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// What the Zuul client saw, at its end.
#[derive(Debug)]
struct ZuulOutcome {
    requests: usize,
    returned: usize,
    not_returned: Vec<String>,
    failed: usize,
    resubmitted: u64,
    dead_served: Vec<String>,
    double_allocations: Vec<String>,
}

/// A Zuul-style client, as Zuul drives Nodepool: submits requests, and
/// for every fulfilled one checks each node it was given (it must be
/// `ready`, allocated to the request, with an ACTIVE server in the
/// cloud), accepts it (locks the nodes, deletes the request), marks the
/// nodes `in-use`, then `used`, and unlocks them. Store errors (a
/// ZooKeeper outage, a full disk) are retried as Zuul retries them; a
/// request deleted by a failed accept is submitted again.
pub struct Zuul {
    shared: Arc<ZuulShared>,
}

impl Zuul {
    fn start(zuul: Requestor, clouds: Clouds) -> Self {
        let shared = Arc::new(ZuulShared {
            zuul,
            clouds,
            state: Mutex::new(ZuulState::default()),
            resubmitted: AtomicU64::new(0),
            stop: CancellationToken::new(),
            tasks: TaskTracker::new(),
        });
        shared.tasks.spawn(watch_requests(shared.clone()));
        Zuul { shared }
    }

    fn requestor(&self) -> &Requestor {
        &self.shared.zuul
    }

    /// Submits `n` requests, up to 64 at once as a busy Zuul does.
    async fn submit(&self, n: usize) {
        let mut set = tokio::task::JoinSet::new();
        for _ in 0..n {
            let shared = self.shared.clone();
            set.spawn(async move { submit_one(&shared).await });
            if set.len() >= 64
                && let Some(r) = set.join_next().await
            {
                self.record_submit(r);
            }
        }
        while let Some(r) = set.join_next().await {
            self.record_submit(r);
        }
    }

    fn record_submit(&self, r: Result<Option<String>, tokio::task::JoinError>) {
        if let Ok(Some(id)) = r {
            let mut st = self.shared.state();
            let idx = st.origins.len();
            st.origins.push(Origin {
                request: id.clone(),
                fate: Fate::Waiting,
                last_error: None,
            });
            st.by_request.insert(id, idx);
        }
    }

    /// (requests done, requests submitted).
    fn progress(&self) -> (usize, usize) {
        let st = self.shared.state();
        let done = st
            .origins
            .iter()
            .filter(|o| matches!(o.fate, Fate::Returned | Fate::Failed))
            .count();
        (done, st.origins.len())
    }

    /// Gives up on every request not yet fulfilled (their withdrawal
    /// must not look like a vanished request to resubmit); returns their
    /// ids.
    fn give_up(&self) -> Vec<String> {
        let mut st = self.shared.state();
        st.origins
            .iter_mut()
            .filter(|o| o.fate == Fate::Waiting)
            .map(|o| {
                o.fate = Fate::Stranded;
                o.request.clone()
            })
            .collect()
    }

    /// Request ids never fulfilled.
    fn waiting(&self) -> Vec<String> {
        self.shared
            .state()
            .origins
            .iter()
            .filter(|o| o.fate == Fate::Waiting)
            .map(|o| o.request.clone())
            .collect()
    }

    /// Stops (waiting up to 10 s for the tasks to see it) and reports.
    async fn stop(&self) -> ZuulOutcome {
        self.shared.stop.cancel();
        self.shared.tasks.close();
        let _ = tokio::time::timeout(Duration::from_secs(10), self.shared.tasks.wait()).await;
        let _ = self.shared.zuul.store().backend().close().await;
        let st = self.shared.state();
        let count = |f: Fate| st.origins.iter().filter(|o| o.fate == f).count();
        ZuulOutcome {
            requests: st.origins.len(),
            returned: count(Fate::Returned),
            not_returned: st
                .origins
                .iter()
                .filter(|o| o.fate == Fate::Handling)
                .map(|o| {
                    format!(
                        "request {}: last error {}",
                        o.request,
                        o.last_error.as_deref().unwrap_or("none")
                    )
                })
                .collect(),
            failed: count(Fate::Failed),
            resubmitted: self.shared.resubmitted.load(Ordering::SeqCst),
            dead_served: st.dead_served.clone(),
            double_allocations: st.double_allocations.clone(),
        }
    }
}

/// Submits one request, retrying store errors for up to 60 s.
async fn submit_one(shared: &ZuulShared) -> Option<String> {
    until(Duration::from_secs(60), || async {
        if shared.stop.is_cancelled() {
            return Ok(None);
        }
        shared
            .zuul
            .submit(&NewRequest::new(vec!["small".into()]))
            .await
            .map(Some)
            .map_err(|e| e.to_string())
    })
    .await
    .unwrap_or_else(|e| panic!("submitting a request: {e}"))
}

/// The client's main loop: looks at every request every 150 ms and hands
/// fulfilled and failed ones to their own tasks.
async fn watch_requests(shared: Arc<ZuulShared>) {
    let store = shared.zuul.store().clone();
    loop {
        tokio::select! {
            _ = shared.stop.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_millis(150)) => {}
        }
        let Ok(listing) = store.list_requests().await else {
            continue;
        };
        let found: BTreeMap<&str, &NodeRequest> = listing
            .records
            .iter()
            .map(|r| (r.id.as_str(), &*r.request))
            .collect();
        let waiting: Vec<(usize, String)> = shared
            .state()
            .origins
            .iter()
            .enumerate()
            .filter(|(_, o)| o.fate == Fate::Waiting)
            .map(|(i, o)| (i, o.request.clone()))
            .collect();
        for (idx, id) in waiting {
            match found.get(id.as_str()) {
                Some(r) if r.state == RequestState::Fulfilled => {
                    shared.state().origins[idx].fate = Fate::Handling;
                    let (s, req) = (shared.clone(), (*r).clone());
                    shared.tasks.spawn(handle_fulfilled(s, idx, id, req));
                }
                Some(r) if r.state == RequestState::Failed => {
                    shared.state().origins[idx].fate = Fate::Failed;
                    let s = shared.clone();
                    shared.tasks.spawn(async move {
                        let _ = until(Duration::from_secs(30), || async {
                            s.zuul.cancel(&id).await.map_err(|e| e.to_string())
                        })
                        .await;
                    });
                }
                Some(_) => {}
                // Not listed: make sure it is really gone (only we delete
                // requests), then submit it again.
                None => {
                    if let Ok(None) = store.get_request(&id).await {
                        shared.state().origins[idx].fate = Fate::Handling;
                        let s = shared.clone();
                        shared.tasks.spawn(async move { resubmit(&s, idx).await });
                    }
                }
            }
        }
    }
}

/// Submits origin `idx` again under a new request id.
async fn resubmit(shared: &ZuulShared, idx: usize) {
    if let Some(id) = submit_one(shared).await {
        shared.resubmitted.fetch_add(1, Ordering::SeqCst);
        let mut st = shared.state();
        st.by_request.insert(id.clone(), idx);
        st.origins[idx].request = id;
        st.origins[idx].fate = Fate::Waiting;
    }
}

/// A fulfilled request: check its nodes, accept, use, give back.
async fn handle_fulfilled(shared: Arc<ZuulShared>, idx: usize, id: String, req: NodeRequest) {
    for node in &req.nodes {
        check_node(&shared, &id, node).await;
    }
    let store = shared.zuul.store().clone();
    let set = loop {
        if shared.stop.is_cancelled() {
            return;
        }
        match shared.zuul.accept(&id, &req).await {
            Ok(set) => break set,
            Err(e) => {
                shared.state().origins[idx].last_error = Some(format!("accept: {e}"));
                match store.get_request(&id).await {
                    // Still there: a store error; try again.
                    Ok(Some(_)) | Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
                    // accept deleted it (as Zuul does when it cannot take
                    // the nodes, e.g. a node lock timed out during an
                    // outage): Zuul submits a new request, and the launcher
                    // may give the unlocked ready node to another request,
                    // which is correct.
                    Ok(None) => {
                        if let RequestorError::BadNode { .. } = e {
                            shared
                                .state()
                                .dead_served
                                .push(format!("request {id} could not be accepted: {e}"));
                        }
                        resubmit(&shared, idx).await;
                        return;
                    }
                }
            }
        }
    };
    {
        // Only nodes we hold count: a node is ours from a successful
        // accept until it is deleted, so no other request may hold it.
        let mut st = shared.state();
        for n in &set.nodes {
            if let Some(other) = st.allocations.insert(n.id.clone(), id.clone())
                && other != id
            {
                st.double_allocations
                    .push(format!("node {} accepted for {other} and for {id}", n.id));
            }
        }
    }
    for n in set.nodes {
        if let Err(e) = give_back(&shared, n).await {
            shared.state().origins[idx].last_error = Some(e);
            return;
        }
    }
    shared.state().origins[idx].fate = Fate::Returned;
}

/// Checks a node handed to request `id`: it must be `ready`, allocated to
/// the request, with a server that exists and is ACTIVE.
async fn check_node(shared: &ZuulShared, id: &str, node_id: &str) {
    let store = shared.zuul.store();
    let read = until(Duration::from_secs(30), || async {
        store.get_node(node_id).await.map_err(|e| e.to_string())
    })
    .await;
    let mut problems = Vec::new();
    match read {
        Err(e) => problems.push(format!("could not be read: {e}")),
        Ok(None) => problems.push("does not exist".to_owned()),
        Ok(Some(v)) => {
            let n = v.value;
            if n.state != NodeState::Ready {
                problems.push(format!("is {}", n.state.as_str()));
            }
            if n.allocated_to.as_deref() != Some(id) {
                problems.push(format!("is allocated to {:?}", n.allocated_to));
            }
            match n.external_id.as_deref() {
                None => problems.push("has external_id null".to_owned()),
                Some(ext) => {
                    let live = crate::faults::servers(&shared.clouds).await;
                    match live.iter().find(|(s, _, _)| s == ext) {
                        None => problems.push(format!("server {ext} does not exist")),
                        Some((_, _, InstanceStatus::Active)) => {}
                        Some((_, _, status)) => {
                            problems.push(format!("server {ext} is {status:?}"))
                        }
                    }
                }
            }
            if !problems.is_empty() {
                problems.push(format!("launcher {:?}", n.launcher));
            }
        }
    }
    if !problems.is_empty() {
        shared.state().dead_served.push(format!(
            "request {id} was given node {node_id}, which {}",
            problems.join(", ")
        ));
    }
}

/// Marks a held node `in-use`, then `used`, and unlocks it; retries store
/// errors for up to 60 s (or until the client stops), taking the lock
/// again when our session lost it. Errs with the last error when it gave up.
async fn give_back(shared: &ZuulShared, mut n: HeldNode) -> Result<(), String> {
    let store = shared.zuul.store();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let mut last = String::new();
    for target in [NodeState::InUse, NodeState::Used] {
        loop {
            if tokio::time::Instant::now() >= deadline || shared.stop.is_cancelled() {
                return Err(format!(
                    "could not mark node {} {}: {last}",
                    n.id,
                    target.as_str()
                ));
            }
            if !n.lock.is_held() {
                match store
                    .lock_node(&n.id, LockWait::Timeout(Duration::from_secs(5)))
                    .await
                {
                    Ok(guard) => std::mem::replace(&mut n.lock, guard).forget(),
                    Err(e) => {
                        last = format!("relocking: {e}");
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        continue;
                    }
                }
                match store.get_node(&n.id).await {
                    // Still ours: carry on.
                    Ok(Some(v)) if v.value.allocated_to == n.node.allocated_to => {
                        n.node = v.value;
                    }
                    // Deleted, or given to another request, while our
                    // lock was gone (our session expired and the launcher
                    // rightly reused or deleted the unlocked node): it is
                    // not ours to give back any more.
                    Ok(_) => {
                        let _ = n.lock.release().await;
                        return Ok(());
                    }
                    Err(e) => {
                        last = format!("reading: {e}");
                        continue;
                    }
                }
            }
            n.node.set_state(target, epoch_now());
            match store.store_node(&n.id, &n.node).await {
                Ok(_) => break,
                Err(e) => {
                    last = format!("writing: {e}");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
    }
    // Unlock by deleting our contender, retried: a lock left behind would
    // keep the launcher from deleting the node for as long as we live.
    let contender = n.lock.contender().to_owned();
    let backend = store.backend().clone();
    let _ = until(Duration::from_secs(30), || async {
        match backend.delete(&contender, None).await {
            Ok(()) | Err(StoreError::NotFound { .. }) | Err(StoreError::SessionLost) => Ok(()),
            Err(e) => Err(e.to_string()),
        }
    })
    .await;
    n.lock.forget();
    Ok(())
}

// ---------------------------------------------------------------------------
// The report
// ---------------------------------------------------------------------------

/// What a drill found. [`problems`](Self::problems) lists every property
/// that did not hold; `Display` prints everything, for a test failure or
/// the benchmark's details.
#[derive(Clone, Debug)]
pub struct Report {
    /// Scenario name.
    pub scenario: String,
    /// "ZooKeeper" or "SQLite".
    pub store: &'static str,
    /// Requests in the burst.
    pub requests: usize,
    /// Fulfilled, used and given back.
    pub fulfilled: usize,
    /// Fulfilled but not accepted and given back by the end, with the
    /// client's last error.
    pub fulfilled_not_returned: Vec<String>,
    /// Failed by the launcher.
    pub failed: usize,
    /// Never fulfilled nor failed: the request and its nodes.
    pub stranded: Vec<String>,
    /// Requests submitted again after a failed accept.
    pub resubmitted: u64,
    /// Nodes handed to a request that were not `ready` with an ACTIVE server.
    pub dead_served: Vec<String>,
    /// Nodes handed to two requests.
    pub double_allocations: Vec<String>,
    /// What the monitor saw during the whole scenario.
    pub monitor: MonitorReport,
    /// Nodes still there after every node was given back and waited for.
    pub nodes_left: Vec<String>,
    /// Servers that no node records, at the end of the grace after the
    /// nodes went (or after the wait for them): servers that outlived
    /// their node.
    pub servers_left: Vec<String>,
    /// Servers the leak sweep deleted (launcher logs and metrics).
    pub leak_sweep_deleted: u64,
    /// From the last hand-back until the cloud held no server; `None`
    /// when it never did within the limit, or nodes were left.
    pub seconds_to_zero_servers: Option<f64>,
    /// Counts of [`LOG_MARKERS`] in the launcher processes' logs.
    pub log_counts: BTreeMap<&'static str, usize>,
    /// In-process launchers' `nodepool.launch.*` counters.
    pub launch_metrics: BTreeMap<String, u64>,
    /// Launcher processes that died by themselves.
    pub crashed: Vec<String>,
    /// Ways the fault did not do what the scenario is about.
    pub preconditions: Vec<String>,
    /// Scenario-specific failures (see [`Drill::fail`]).
    pub failures: Vec<String>,
    /// The scenario's steps with their times.
    pub timeline: Vec<String>,
    /// Wall time of the whole drill.
    pub wall: Duration,
    /// The drill's directory (launcher logs, configuration, cloud state),
    /// kept when `NODEPOOL_DRILL_KEEP` is set.
    pub kept: Option<PathBuf>,
}

impl Report {
    /// Requests never fulfilled nor failed.
    pub fn stranded_count(&self) -> usize {
        self.stranded.len()
    }

    /// Dead nodes served: handed to a request (client's check) or seen
    /// `ready` without a live server (monitor), counted once per node.
    pub fn dead_nodes_served(&self) -> usize {
        self.dead_served.len()
            + self.monitor.dead_ready.len()
            + self.monitor.ready_without_server.len()
    }

    /// Double allocations seen by the client or the monitor.
    pub fn double_allocation_count(&self) -> usize {
        self.double_allocations.len() + self.monitor.double_allocations.len()
    }

    /// Every property that did not hold, one line each.
    pub fn problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        for c in &self.preconditions {
            p.push(format!("the fault did not bite: {c}"));
        }
        if self.requests == 0 {
            p.push("no request was submitted".into());
        }
        if self.fulfilled != self.requests {
            p.push(format!(
                "{} of {} requests fulfilled and given back ({} failed, {} stranded, {} fulfilled but not given back)",
                self.fulfilled,
                self.requests,
                self.failed,
                self.stranded.len(),
                self.fulfilled_not_returned.len()
            ));
        }
        for d in &self.dead_served {
            p.push(format!("dead node served: {d}"));
        }
        for d in &self.double_allocations {
            p.push(format!("double allocation: {d}"));
        }
        for v in self.monitor.violations() {
            p.push(format!("monitor: {v}"));
        }
        if !self.nodes_left.is_empty() {
            p.push(format!(
                "{} nodes left after every node was given back",
                self.nodes_left.len()
            ));
        }
        if !self.servers_left.is_empty() {
            p.push(format!(
                "{} servers left that no node records (before any leak sweep)",
                self.servers_left.len()
            ));
        }
        if self.leak_sweep_deleted > 0 {
            p.push(format!(
                "the leak sweep deleted {} servers (they outlived their nodes)",
                self.leak_sweep_deleted
            ));
        }
        for c in &self.crashed {
            p.push(c.clone());
        }
        p.extend(self.failures.iter().cloned());
        p
    }

    /// Panics with the whole report when any property did not hold.
    pub fn assert_clean(&self) {
        let problems = self.problems();
        assert!(
            problems.is_empty(),
            "{}: {} problems:\n  - {}\n\n{self}",
            self.scenario,
            problems.len(),
            problems.join("\n  - ")
        );
    }

    /// The benchmark table's header.
    pub fn table_header() -> &'static str {
        "| scenario | store | requests | fulfilled | stranded | failed | dead nodes served | double allocations | servers left | s until zero servers | wall s |\n\
         |---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    }

    /// One row of the benchmark table.
    pub fn table_row(&self) -> String {
        format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {:.0} |",
            self.scenario,
            self.store,
            self.requests,
            self.fulfilled,
            self.stranded.len(),
            self.failed,
            self.dead_nodes_served(),
            self.double_allocation_count(),
            self.servers_left.len(),
            self.seconds_to_zero_servers
                .map_or("never".to_owned(), |s| format!("{s:.1}")),
            self.wall.as_secs_f64()
        )
    }
}

fn list(f: &mut fmt::Formatter<'_>, title: &str, items: &[String]) -> fmt::Result {
    if items.is_empty() {
        return Ok(());
    }
    writeln!(f, "{title} ({}):", items.len())?;
    for i in items.iter().take(40) {
        writeln!(f, "    {i}")?;
    }
    if items.len() > 40 {
        writeln!(f, "    ... and {} more", items.len() - 40)?;
    }
    Ok(())
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "drill {:?} on {} ({:.1} s):",
            self.scenario,
            self.store,
            self.wall.as_secs_f64()
        )?;
        list(f, "  timeline", &self.timeline)?;
        writeln!(
            f,
            "  requests {}: fulfilled {}, failed {}, stranded {}, fulfilled but not given back {}, resubmitted {}",
            self.requests,
            self.fulfilled,
            self.failed,
            self.stranded.len(),
            self.fulfilled_not_returned.len(),
            self.resubmitted
        )?;
        list(f, "  stranded", &self.stranded)?;
        list(
            f,
            "  fulfilled but not given back",
            &self.fulfilled_not_returned,
        )?;
        list(f, "  dead nodes served", &self.dead_served)?;
        list(f, "  double allocations", &self.double_allocations)?;
        list(f, "  monitor", &self.monitor.violations())?;
        writeln!(
            f,
            "  monitor samples {} (skipped {}); peak servers {}, of which without a node {}",
            self.monitor.samples,
            self.monitor.skipped,
            self.monitor.peak_servers,
            self.monitor.peak_unowned_servers
        )?;
        list(f, "  nodes left", &self.nodes_left)?;
        list(f, "  servers left", &self.servers_left)?;
        writeln!(
            f,
            "  leak sweep deleted {}; seconds until zero servers: {}",
            self.leak_sweep_deleted,
            self.seconds_to_zero_servers
                .map_or("never (within the limit)".to_owned(), |s| format!("{s:.1}"))
        )?;
        let logs: Vec<String> = self
            .log_counts
            .iter()
            .filter(|(_, n)| **n > 0)
            .map(|(m, n)| format!("{m:?} ×{n}"))
            .collect();
        list(f, "  launcher log lines", &logs)?;
        let metrics: Vec<String> = self
            .launch_metrics
            .iter()
            .map(|(m, n)| format!("{m} {n}"))
            .collect();
        list(f, "  in-process launch counters", &metrics)?;
        list(f, "  crashed", &self.crashed)?;
        list(f, "  preconditions not met", &self.preconditions)?;
        list(f, "  failures", &self.failures)?;
        match &self.kept {
            Some(dir) => writeln!(f, "  logs kept in {}", dir.display()),
            None => writeln!(f, "  (set NODEPOOL_DRILL_KEEP=1 to keep the logs)"),
        }
    }
}

// ---------------------------------------------------------------------------
// The scenarios
// ---------------------------------------------------------------------------

/// Splits `n` into `parts` nearly equal waves.
fn waves(n: usize, parts: usize) -> Vec<usize> {
    let parts = parts.max(1);
    (0..parts)
        .map(|i| n / parts + usize::from(i < n % parts))
        .collect()
}

/// Issue 12 (1): ZooKeeper stopped for `outage` mid-burst and started
/// again, `blips` times, with `zookeeper-timeout: 20` and one launcher.
/// (ZooKeeper's JVM takes up to ~7 s to answer again on a loaded 2-core
/// machine: 10 s left too little room.)
/// The outage is shorter than the session timeout, so the launcher's
/// session, its locks and its launches must all survive: nothing may be
/// lost or launched twice. Each blip has its own wave of the burst, so
/// launches are in flight every time.
pub async fn zookeeper_blips(p: &Params, blips: usize, outage: Duration) -> Report {
    let name = format!("ZooKeeper stop {}s x{blips}", outage.as_secs_f64());
    let mut d = Drill::new(
        &name,
        p,
        DrillStore::ZooKeeper {
            session_timeout: 20.0,
        },
    )
    .await;
    d.spawn_launcher("a").await;
    for (i, wave) in waves(p.requests, blips).into_iter().enumerate() {
        d.submit(wave).await;
        // Many launches in flight, so the outage hits them at every stage.
        let n = d.until_in_flight((wave / 2).clamp(1, 10), None).await;
        d.zookeeper().stop().await;
        d.note(format!(
            "blip {}: ZooKeeper stopped with {n} launches in flight",
            i + 1
        ));
        // The fault's length, not a wait for an outcome.
        tokio::time::sleep(outage).await;
        d.zookeeper().start().await;
        d.note(format!("blip {}: ZooKeeper answers again", i + 1));
    }
    let settled = d.settle(p.settle).await;
    d.note(format!("settled: {settled}"));
    let suspended = d.log_count("connection lost; session suspended");
    d.precondition(
        suspended >= blips,
        format!("the launcher noticed {suspended} of {blips} outages"),
    );
    let expired = d.log_count("session ended");
    d.precondition(
        expired == 0,
        format!("the launcher's session expired {expired} times; the outages were meant to be shorter than the session timeout"),
    );
    // The session survived, so every launch in flight keeps its lock: a
    // write cut off by the outage is resolved when the store is back,
    // never taken as a refusal that ends the launch.
    let abandoned = d.log_count("launch abandoned");
    if expired == 0 && abandoned > 0 {
        d.fail(format!(
            "{abandoned} launches abandoned although the session survived every outage"
        ));
    }
    d.finish().await
}

/// ZooKeeper stopped for longer than the session timeout
/// (`zookeeper-timeout: 3`, an 8 s outage): the launcher's session really
/// expires, so everything it held must be given up cleanly and served
/// again on its new session.
pub async fn zookeeper_outage_past_session_timeout(p: &Params, outage: Duration) -> Report {
    let mut d = Drill::new(
        &format!("ZooKeeper stop {}s (session expires)", outage.as_secs_f64()),
        p,
        DrillStore::ZooKeeper {
            session_timeout: 3.0,
        },
    )
    .await;
    d.spawn_launcher("a").await;
    d.submit(p.requests).await;
    // The first launch booting: the burst's other servers are being
    // created right now, the moment a lost lock is most expensive.
    let n = d.until_in_flight(1, None).await;
    d.zookeeper().stop().await;
    d.note(format!("ZooKeeper stopped with {n} launches in flight"));
    tokio::time::sleep(outage).await;
    d.zookeeper().start().await;
    d.note("ZooKeeper answers again");
    let ended = until(Duration::from_secs(30), || async {
        match d.log_count("session ended") {
            0 => Err("no expiry logged".to_owned()),
            n => Ok(n),
        }
    })
    .await;
    d.precondition(
        ended.is_ok(),
        format!("the launcher's session did not expire: {ended:?}"),
    );
    let settled = d.settle(p.settle).await;
    d.note(format!("settled: {settled}"));
    d.finish().await
}

/// The store of the two-launcher drills, with short timeouts so a
/// session expires within seconds.
fn short_session(store: crate::Backend) -> DrillStore {
    match store {
        crate::Backend::ZooKeeper => DrillStore::ZooKeeper {
            session_timeout: 3.0,
        },
        crate::Backend::Sqlite => DrillStore::Sqlite {
            lease: 3.0,
            tmpfs_bytes: None,
        },
    }
}

/// Issue 12 (3): one of two launchers stopped (SIGSTOP) mid-burst until
/// its session expired (its registration is gone from the store), then
/// continued (SIGCONT). The other launcher re-serves what it held; the
/// stopped one must give up what it no longer owns without leaving a
/// server behind.
pub async fn session_expiry_sigstop(p: &Params, store: crate::Backend) -> Report {
    let mut d = Drill::new("session expiry (SIGSTOP 1 of 2)", p, short_session(store)).await;
    let a = d.spawn_launcher("a").await;
    d.spawn_launcher("b").await;
    d.submit(p.requests).await;
    // a's first launch booting: its other servers are being created.
    let n = d.until_in_flight(1, Some(&a)).await;
    d.launcher("a").pause();
    d.note(format!("SIGSTOP of launcher a with {n} launches in flight"));
    // Three session timeouts and then some.
    let expired = until(Duration::from_secs(20), || async {
        let pools = d.pools().await?;
        if pools.contains(&a) {
            Err("a's pool is still registered".to_owned())
        } else {
            Ok(())
        }
    })
    .await;
    d.note(format!(
        "a's session expired (its registration is gone): {expired:?}"
    ));
    match &expired {
        Ok(()) => {}
        // SQLite has one writer: a process stopped inside a write
        // transaction holds the database's write lock, so nobody can
        // write, expire its lease, or renew their own (the drill's own
        // session lapses too). Nothing can break a live process's lock;
        // what must hold is that everything recovers once it runs again
        // (checked by the report), so this is noted, not failed.
        Err(e) if matches!(store, crate::Backend::Sqlite) && e.contains("session lost") => {
            d.note(format!(
                "launcher a was stopped holding SQLite's write lock: every process's writes waited ({e})"
            ));
        }
        // Not the fault missing its mark: the store did not expire a
        // stopped process.
        Err(e) => d.fail(format!(
            "launcher a was stopped, but its session never expired: {e}"
        )),
    }
    d.launcher("a").resume();
    d.note("SIGCONT of launcher a");
    let noticed = until(Duration::from_secs(30), || async {
        match d.log_count_of("a", "session ended") + d.log_count_of("a", "session lease lapsed") {
            0 => Err("a logged no expiry".to_owned()),
            n => Ok(n),
        }
    })
    .await;
    d.precondition(
        noticed.is_ok(),
        format!("launcher a never noticed its session expired: {noticed:?}"),
    );
    let settled = d.settle(p.settle).await;
    d.note(format!("settled: {settled}"));
    d.finish().await
}

/// `kill -9` of one of two launchers mid-burst (issue 5's drill, which
/// works: the benchmark's baseline).
pub async fn kill_9(p: &Params, store: crate::Backend) -> Report {
    let mut d = Drill::new("kill -9 (1 of 2)", p, short_session(store)).await;
    let a = d.spawn_launcher("a").await;
    d.spawn_launcher("b").await;
    d.submit(p.requests).await;
    // a's first launch booting: its other servers are being created.
    let n = d.until_in_flight(1, Some(&a)).await;
    d.kill("a");
    d.note(format!("kill -9 of launcher a with {n} launches in flight"));
    let settled = d.settle(p.settle).await;
    d.note(format!("settled: {settled}"));
    d.finish().await
}

/// Issue 12 (3): the SQLite file's disk is full for `full_for` mid-burst
/// (a filler file takes every free byte of its tmpfs), then freed.
pub async fn sqlite_disk_full(p: &Params, full_for: Duration) -> Report {
    let mut d = Drill::new(
        &format!("SQLite disk full {}s", full_for.as_secs_f64()),
        p,
        DrillStore::Sqlite {
            lease: 3.0,
            tmpfs_bytes: Some(64 << 20),
        },
    )
    .await;
    d.spawn_launcher("a").await;
    d.submit(p.requests).await;
    // The first launch booting: the burst's other servers are being
    // created right now.
    let n = d.until_in_flight(1, None).await;
    let filled = d.tmpfs().fill();
    d.note(format!(
        "disk full ({filled:?} bytes of filler) with {n} launches in flight"
    ));
    d.precondition(filled.is_ok(), format!("filling the disk: {filled:?}"));
    // The fault's length, not a wait for an outcome...
    tokio::time::sleep(full_for).await;
    // ...but kept up until the launcher's lease lapsed (a lease renewal
    // may still fit in pages SQLite already has), since the drill is
    // about what a full disk takes away: the launcher's locks.
    let lapsed = until(Duration::from_secs(15), || async {
        match d.log_count("session lease lapsed") {
            0 => Err("the launcher's lease has not lapsed".to_owned()),
            n => Ok(n),
        }
    })
    .await;
    d.note(format!("launcher's lease lapsed: {lapsed:?}"));
    let freed = d.tmpfs().free();
    d.note(format!("disk space freed: {freed:?}"));
    let full = d.log_count("database or disk is full");
    d.precondition(
        full > 0,
        "the launcher never logged \"database or disk is full\": the fault did not reach it",
    );
    let settled = d.settle(p.settle).await;
    d.note(format!("settled: {settled}"));
    d.finish().await
}

/// Issue 12 (2): node writes that ZooKeeper applied but the launcher saw
/// fail ("connection reset"), through [`AmbiguousWrites`] under an
/// in-process launcher. The launcher must find out what really happened
/// before it acts: never hand out a node whose server it deleted.
pub async fn ambiguous_writes(p: &Params, plan: Ambiguity) -> Report {
    let mut d = Drill::new(
        &format!("ambiguous node writes ({:.0}%)", plan.fraction * 100.0),
        p,
        DrillStore::ZooKeeper {
            session_timeout: 10.0,
        },
    )
    .await;
    let real = open_store(&d.config).await;
    let faulty = Arc::new(AmbiguousWrites::new(real.backend().clone(), plan));
    d.start_inproc("a", Store::new(faulty.clone() as Arc<dyn StateStore>))
        .await;
    d.submit(p.requests).await;
    let settled = d.settle(p.settle).await;
    let injected = faulty.injected();
    let mut by_state: BTreeMap<String, usize> = BTreeMap::new();
    for f in &injected {
        let key = match (&f.state, f.op) {
            (Some(state), "multi") => format!("{state} (in a transaction)"),
            (Some(state), _) => state.clone(),
            (None, op) => op.to_owned(),
        };
        *by_state.entry(key).or_default() += 1;
    }
    d.note(format!(
        "settled: {settled}; {} node writes applied but reported failed, by state written: {by_state:?}",
        injected.len()
    ));
    d.precondition(
        !injected.is_empty(),
        "no write was made ambiguous: raise the fraction or the burst",
    );
    d.finish().await
}

/// Whether some pool of provider `name` says its provider is unavailable.
async fn provider_marked_unavailable(d: &Drill, name: &str) -> Result<bool, String> {
    Ok(d.store
        .list_components(ComponentKind::Pool)
        .await
        .map_err(|e| e.to_string())?
        .records
        .into_iter()
        .any(|(_, c)| c.provider_name.as_deref() == Some(name) && c.provider_unavailable.is_some()))
}

/// Issue 12 (4): two providers serve the label; the first one's API
/// starts failing as `fault` says (hangs, or answers 429) mid-burst and
/// keeps failing for `fault_for`, then works again. The launcher must
/// mark it unavailable, give back what waited on it, and have the healthy
/// provider serve the whole burst *while the fault holds* (a drill
/// failure otherwise); then, once the cloud is back, delete what the
/// aborted launches left there.
pub async fn cloud_fault(p: &Params, fault: ApiFault, fault_for: Duration) -> Report {
    let title = match fault {
        ApiFault::Hang => "hung cloud (1 of 2 providers)".to_owned(),
        ApiFault::ServerError => "cloud answering 500 (1 of 2 providers)".to_owned(),
        ApiFault::RateLimit { retry_after } => format!(
            "429 cloud (1 of 2 providers{})",
            retry_after.map_or(String::new(), |r| format!(
                ", Retry-After {} s",
                r.as_secs()
            ))
        ),
    };
    let p = Params {
        providers: p.providers.max(2),
        ..p.clone()
    };
    let mut d = Drill::new(
        &title,
        &p,
        DrillStore::ZooKeeper {
            session_timeout: 10.0,
        },
    )
    .await;
    let bad = provider_name(1);
    d.spawn_launcher("a").await;
    d.submit(p.requests).await;
    // Launches of the bad provider under way, so the fault hits them.
    let n = d.until_in_flight(1, None).await;
    d.clouds.get(&bad).set_api_fault(Some(fault)).await;
    let fault_at = Instant::now();
    d.note(format!(
        "{bad}'s API fails ({fault:?}) with {n} launches in flight"
    ));
    let marked = until(Duration::from_secs(60), || async {
        match provider_marked_unavailable(&d, &bad).await? {
            true => Ok(()),
            false => Err(format!("{bad} not marked unavailable")),
        }
    })
    .await;
    d.note(format!("{bad} marked unavailable: {marked:?}"));
    d.precondition(
        marked.is_ok(),
        format!("the launcher never marked {bad} unavailable: {marked:?}"),
    );
    // The whole burst, served by the healthy provider while the fault
    // holds.
    let during = d.settle(fault_for.saturating_sub(fault_at.elapsed())).await;
    let (done, total) = d.zuul.progress();
    d.note(format!(
        "while {bad} failed: {done} of {total} requests done ({:.1} s after the fault)",
        fault_at.elapsed().as_secs_f64()
    ));
    if !during {
        d.fail(format!(
            "only {done} of {total} requests were served while {bad} failed for {} s: the healthy provider did not take them",
            fault_for.as_secs()
        ));
    }
    // The fault's length, not a wait for an outcome.
    tokio::time::sleep(fault_for.saturating_sub(fault_at.elapsed())).await;
    d.clouds.get(&bad).set_api_fault(None).await;
    d.note(format!("{bad}'s API works again"));
    let back = until(Duration::from_secs(90), || async {
        match provider_marked_unavailable(&d, &bad).await? {
            false => Ok(()),
            true => Err(format!("{bad} still marked unavailable")),
        }
    })
    .await;
    d.note(format!("{bad} available again: {back:?}"));
    let settled = d.settle(p.settle).await;
    d.note(format!("settled: {settled}"));
    d.finish().await
}

/// Issue 16: three launchers on a three-server ZooKeeper ensemble
/// (`zookeeper-timeout: 10`, every member in each launcher's server
/// list), a burst, and the ensemble's leader killed (SIGKILL) while
/// launches are in flight, then started again once the other two elected
/// a new leader. The launchers connected to the dead server reconnect to
/// a surviving one within their session, without a restart: every
/// request is served, no node twice, nothing left behind.
pub async fn ensemble_leader_killed(p: &Params) -> Report {
    let mut d = Drill::new(
        "ZooKeeper x3: leader killed",
        p,
        DrillStore::ZooKeeperEnsemble {
            members: 3,
            session_timeout: 10.0,
        },
    )
    .await;
    d.spawn_launcher("a").await;
    d.spawn_launcher("b").await;
    d.spawn_launcher("c").await;
    d.submit(p.requests).await;
    let n = d.until_in_flight((p.requests / 4).clamp(1, 20), None).await;
    let Some(old) = d.ensemble().leader().await else {
        d.precondition(false, "the ensemble had no leader before the fault");
        return d.finish().await;
    };
    d.ensemble().servers[old].kill();
    d.note(format!(
        "leader (server {}) killed with {n} launches in flight",
        old + 1
    ));
    let elected = until(Duration::from_secs(60), || async {
        match d.ensemble.as_ref().map(|e| e.leader()) {
            Some(f) => f.await.ok_or_else(|| "no leader yet".to_owned()),
            None => Err("no ensemble".to_owned()),
        }
    })
    .await;
    match &elected {
        Ok(i) => d.note(format!("server {} leads now", i + 1)),
        Err(e) => d.precondition(false, format!("no new leader within 60 s: {e}")),
    }
    d.ensemble().servers[old].start().await;
    d.note(format!("server {} back, following", old + 1));
    let settled = d.settle(p.settle).await;
    d.note(format!("settled: {settled}"));
    // Followers drop their clients while they elect a new leader, so the
    // launchers on them notice too, not only those on the dead leader.
    let noticed: Vec<usize> = ["a", "b", "c"]
        .iter()
        .map(|l| d.log_count_of(l, "connection lost; session suspended"))
        .collect();
    d.note(format!(
        "connection losses seen by launchers a, b, c: {noticed:?}"
    ));
    d.precondition(
        noticed.iter().any(|&n| n > 0),
        "no launcher lost its connection: the fault did not reach them",
    );
    let expired = d.log_count("session ended");
    d.precondition(
        expired == 0,
        format!("launcher sessions expired {expired} times; a leader change must not end them"),
    );
    let abandoned = d.log_count("launch abandoned");
    if expired == 0 && abandoned > 0 {
        d.fail(format!(
            "{abandoned} launches abandoned although every session survived the leader change"
        ));
    }
    d.finish().await
}
