//! Helpers for whole-system tests: one test body runs against each state
//! store (a real ZooKeeper and a real SQLite file), with launchers built
//! exactly as the `nodepool-launcher` binary builds them.
//!
//! ZooKeeper comes from `scripts/zookeeper.sh` (the test command starts
//! it); a test that needs it and finds no `NODEPOOL_TEST_ZK_HOSTS` fails.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nodepool_core::config::{Config, Driver};
use nodepool_core::launcher::{
    Launcher, LauncherSettings, LauncherStatus, ObserverIntervals, ProviderFactory,
};
use nodepool_core::provider::Provider;
use nodepool_core::simulated::SimulatedProvider;
use nodepool_core::store::Store;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// Which state store a test runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// The real ZooKeeper of the test command.
    ZooKeeper,
    /// A SQLite file in a temporary directory.
    Sqlite,
}

/// `host:port` of the test ZooKeeper; panics (a failure, never a skip)
/// when the test command did not start it.
pub fn zk_hosts() -> String {
    std::env::var("NODEPOOL_TEST_ZK_HOSTS").unwrap_or_else(|_| {
        panic!(
            "NODEPOOL_TEST_ZK_HOSTS is not set: start ZooKeeper with `scripts/zookeeper.sh start` \
             and `eval \"$(scripts/zookeeper.sh env)\"`, or run `scripts/test.sh`"
        )
    })
}

/// Logs to the test output when `RUST_LOG` is set (once per process).
pub fn init_logging() {
    if std::env::var_os("RUST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
    }
}

/// One test's private store location.
pub struct TestEnv {
    /// The store kind.
    pub backend: Backend,
    /// Scratch space (SQLite file, config files).
    pub dir: tempfile::TempDir,
    chroot: String,
}

impl TestEnv {
    /// A fresh store location.
    pub fn new(backend: Backend) -> Self {
        init_logging();
        TestEnv {
            backend,
            dir: tempfile::tempdir().expect("tempdir"),
            chroot: format!("/nodepool-rs-system/{}", uuid::Uuid::new_v4().simple()),
        }
    }

    /// The `nodepool.yaml` store section for this environment.
    pub fn store_yaml(&self) -> String {
        match self.backend {
            Backend::ZooKeeper => {
                let hosts = zk_hosts();
                let (host, port) = hosts.rsplit_once(':').expect("host:port");
                format!(
                    "zookeeper-servers: [{{host: '{host}', port: {port}, chroot: '{}'}}]\nzookeeper-timeout: 3\n",
                    self.chroot
                )
            }
            Backend::Sqlite => format!(
                "state-store: {{driver: sqlite, path: '{}'}}\n",
                self.dir.path().join("state.db").display()
            ),
        }
    }

    /// A full configuration: the store section plus `body`.
    pub fn config(&self, body: &str) -> Config {
        let yaml = format!("{}{body}", self.store_yaml());
        Config::from_yaml(&yaml).unwrap_or_else(|e| panic!("test config: {e}\n{yaml}"))
    }

    /// Opens a store client (a new session) as the daemons do.
    pub async fn store(&self, cfg: &Config) -> Store {
        nodepool_cli::daemon::open_store(cfg)
            .await
            .expect("open store")
    }
}

/// Simulated clouds shared by the launchers of one test, by provider
/// name: like a real cloud, it outlives any one launcher.
pub type Clouds = Arc<Mutex<BTreeMap<String, Arc<SimulatedProvider>>>>;

/// A provider factory that builds (once) and shares simulated clouds.
pub fn shared_factory(clouds: &Clouds) -> ProviderFactory {
    let clouds = clouds.clone();
    Arc::new(move |pc| {
        if !matches!(pc.driver, Driver::Simulated(_)) {
            return Err(format!("provider {} is not simulated", pc.name));
        }
        let mut reg = clouds.lock().map_err(|_| "poisoned".to_string())?;
        if let Some(p) = reg.get(&pc.name) {
            return Ok(p.clone() as Arc<dyn Provider>);
        }
        let p = Arc::new(SimulatedProvider::new(pc).map_err(|e| e.to_string())?);
        reg.insert(pc.name.clone(), p.clone());
        Ok(p as Arc<dyn Provider>)
    })
}

/// A launcher running as a task.
pub struct RunningLauncher {
    /// Cancel to stop it gracefully.
    pub shutdown: CancellationToken,
    /// Send a new configuration to reload it.
    pub config: watch::Sender<Arc<Config>>,
    /// Its status.
    pub status: Arc<LauncherStatus>,
    task: tokio::task::JoinHandle<()>,
}

impl RunningLauncher {
    /// Starts a launcher on its own store session.
    pub async fn start(env: &TestEnv, cfg: &Config, host: &str, clouds: &Clouds) -> Self {
        let store = env.store(cfg).await;
        let launcher = Launcher::new(
            store.clone(),
            shared_factory(clouds),
            LauncherSettings {
                hostname: host.into(),
                observer: ObserverIntervals {
                    instances: Duration::from_secs(1),
                    ..ObserverIntervals::default()
                },
                shutdown_grace: Duration::from_secs(10),
                ..LauncherSettings::default()
            },
        );
        let status = launcher.status();
        let (tx, rx) = watch::channel(Arc::new(cfg.clone()));
        let shutdown = CancellationToken::new();
        let stop = shutdown.clone();
        let task = tokio::spawn(async move {
            launcher.run(rx, stop).await.expect("launcher runs");
            let _ = store.backend().close().await;
        });
        RunningLauncher {
            shutdown,
            config: tx,
            status,
            task,
        }
    }

    /// Reloads a configuration and waits until the launcher applied it.
    pub async fn reload(&self, cfg: Config) {
        let before = self.status.config_generation();
        self.config.send(Arc::new(cfg)).expect("launcher running");
        eventually("configuration applied", Duration::from_secs(30), || async {
            self.status.config_generation() > before
        })
        .await;
    }

    /// Stops it gracefully.
    pub async fn stop(self) {
        self.shutdown.cancel();
        self.task.await.expect("launcher task");
    }
}

/// Polls `f` every 50 ms until true, failing after `limit` (real time:
/// these tests run against real servers).
pub async fn eventually<F, Fut>(what: &str, limit: Duration, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if f().await {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: not reached within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The simulated cloud of a provider, once a launcher built it.
pub fn cloud(clouds: &Clouds, name: &str) -> Option<Arc<SimulatedProvider>> {
    clouds.lock().ok().and_then(|c| c.get(name).cloned())
}
