//! Helpers for whole-system tests: one test body runs against each state
//! store (a real ZooKeeper and a real SQLite file), with launchers built
//! exactly as the `nodepool-launcher` binary builds them.
//!
//! ZooKeeper comes from `scripts/zookeeper.sh` (the test command starts
//! it); a test that needs it and finds no `NODEPOOL_TEST_ZK_HOSTS` fails.
//!
//! Tests that run the daemons as processes find them with
//! [`workspace_binary`] and keep them in a [`Daemon`], which kills them
//! when the test ends, even by a panic.
//!
//! # Layout
//!
//! - this file: [`TestEnv`] (a store location), [`RunningLauncher`]
//!   (in-process launchers), [`Daemon`] (daemons as processes),
//!   [`workspace_binary`].
//! - [`faults`]: fault injection — a private ZooKeeper to stop and start,
//!   a tmpfs to fill, ambiguous writes, and the monitor of what must
//!   never be seen.
//! - [`drill`]: issue 12's fault drills as functions (a burst, a fault, a
//!   Zuul-style client, a [`drill::Report`]), shared by
//!   `tests/tests/faults.rs` and the `drill` benchmark.
//! - [`scale`]: issue 16's scale simulation (a fleet of launcher
//!   processes on one ZooKeeper, the cost per request), shared by
//!   `tests/tests/scale.rs` and the `scale` benchmark.
//! - [`sshd`]: private SSH servers for the static driver's and the ready
//!   scripts' tests.

pub mod drill;
pub mod faults;
pub mod scale;
pub mod sshd;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nodepool_core::config::{Config, Driver};
use nodepool_core::launcher::{
    Launcher, LauncherSettings, LauncherStatus, Metrics, ObserverIntervals, ProviderFactory,
};
use nodepool_core::provider::Provider;
use nodepool_core::store::Store;
use nodepool_simulated::SimulatedProvider;
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
                "state-store: {{driver: sqlite, path: '{}', lease: 3}}\n",
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
    /// Its metrics (counters such as `nodepool.provider.<p>.leaked.instances`).
    pub metrics: Arc<Metrics>,
    task: tokio::task::JoinHandle<()>,
}

impl RunningLauncher {
    /// Starts a launcher on its own store session.
    pub async fn start(env: &TestEnv, cfg: &Config, host: &str, clouds: &Clouds) -> Self {
        let store = env.store(cfg).await;
        Self::start_on(
            store,
            cfg,
            LauncherSettings {
                hostname: host.into(),
                observer: ObserverIntervals {
                    instances: Duration::from_secs(1),
                    ..ObserverIntervals::default()
                },
                shutdown_grace: Duration::from_secs(10),
                ..LauncherSettings::default()
            },
            shared_factory(clouds),
        )
    }

    /// Starts a launcher on `store` (which may be a fault-injecting
    /// decorator of a real store) with these settings and providers.
    /// The store is closed when the launcher stops.
    pub fn start_on(
        store: Store,
        cfg: &Config,
        settings: LauncherSettings,
        factory: ProviderFactory,
    ) -> Self {
        let launcher = Launcher::new(store.clone(), factory, settings);
        let status = launcher.status();
        let metrics = launcher.metrics();
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
            metrics,
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

    /// Waits for `n` more completed planning passes (to see that
    /// something did not happen); fails after `limit` of real time.
    pub async fn passes(&self, n: u64, limit: Duration) {
        tokio::time::timeout(limit, self.status.passes().more(n))
            .await
            .unwrap_or_else(|_| panic!("{n} planning passes: not within {limit:?}"))
            .expect("the launcher runs");
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

/// The path of binary `name` of workspace package `package` (e.g.
/// `nodepool-cli`, `nodepool-launcher`), built with the profile of the
/// running test, for tests that run the daemons as processes.
///
/// `env!("CARGO_BIN_EXE_<name>")` exists only in the tests of the binary's
/// own package, and a binary found lying in `target/` may be stale, so this
/// asks Cargo: `cargo build -p PACKAGE --bin NAME --message-format=json`,
/// a no-op when the binary is up to date, and takes the path from the
/// `executable` field of its `compiler-artifact` message (the interface
/// Cargo documents for tools). It uses the Cargo that built the tests (the
/// `CARGO` variable) and the environment's `CARGO_TARGET_DIR`, so the
/// binary lands beside the test's own. Each binary is built once per test
/// process. With `NODEPOOL_TEST_BIN_DIR` set, the binary is taken from that
/// directory and nothing is built.
///
/// Blocking (it may compile): call it through `spawn_blocking` in async
/// tests. Panics with Cargo's output when the build fails.
pub fn workspace_binary(package: &str, name: &str) -> PathBuf {
    static BUILT: Mutex<BTreeMap<String, PathBuf>> = Mutex::new(BTreeMap::new());
    if let Some(dir) = std::env::var_os("NODEPOOL_TEST_BIN_DIR") {
        let path = Path::new(&dir).join(name);
        assert!(
            path.is_file(),
            "NODEPOOL_TEST_BIN_DIR is set but {} does not exist",
            path.display()
        );
        return path;
    }
    // One build at a time; the lock also makes concurrent tests wait for it.
    let mut built = BUILT.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(path) = built.get(name) {
        return path.clone();
    }
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| env!("CARGO").into());
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("../Cargo.toml");
    let mut cmd = Command::new(&cargo);
    cmd.arg("build")
        .arg("--manifest-path")
        .arg(&manifest)
        .args(["-p", package, "--bin", name])
        .arg("--message-format=json-render-diagnostics")
        .args(profile_args());
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", Path::new(&cargo).display()));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "building {name} failed ({:?}):\n{stderr}",
        out.status
    );
    let path = stdout
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|m| m["reason"] == "compiler-artifact" && m["target"]["name"] == name)
        .find_map(|m| m["executable"].as_str().map(PathBuf::from))
        .unwrap_or_else(|| panic!("cargo built no executable {name}:\n{stderr}"));
    assert!(
        path.is_file(),
        "{} is missing after the build",
        path.display()
    );
    built.insert(name.to_owned(), path.clone());
    path
}

/// Cargo's profile flags for the profile the running test was built with,
/// read from where the test binary is (`target/<profile dir>/deps/`).
fn profile_args() -> Vec<String> {
    let exe = std::env::current_exe().ok();
    let dir = exe
        .as_deref()
        .and_then(Path::parent)
        .filter(|d| d.file_name().is_some_and(|n| n == "deps"))
        .and_then(Path::parent)
        .and_then(Path::file_name)
        .and_then(|n| n.to_str());
    match dir {
        None | Some("debug") => vec!["--profile".into(), "dev".into()],
        Some("release") => vec!["--release".into()],
        Some(custom) => vec!["--profile".into(), custom.into()],
    }
}

/// A daemon running as a child process, its stdout and stderr going to a
/// log file. Dropping it kills the process (SIGKILL) if it still runs, so
/// a failing test leaves no process behind; when the test is panicking,
/// the end of the log is printed to help explain why.
pub struct Daemon {
    name: String,
    child: std::process::Child,
    log: PathBuf,
}

impl Daemon {
    /// Starts `cmd` with its output appended to `log`.
    pub fn spawn(name: &str, mut cmd: Command, log: &Path) -> Self {
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap_or_else(|e| panic!("{name}: log file {}: {e}", log.display()));
        let err = out.try_clone().expect("log file handle");
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("{name}: cannot start {cmd:?}: {e}"));
        Daemon {
            name: name.to_owned(),
            child,
            log: log.to_owned(),
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Its name, as given to [`spawn`](Self::spawn).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Where its output goes.
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// `SIGSTOP`: the process stops dead, as in a long GC pause, a
    /// swapped-out VM or a debugger — its session is not renewed, so it
    /// expires, while the process itself lives on with everything it held
    /// in memory.
    pub fn pause(&self) {
        self.signal(nix::sys::signal::Signal::SIGSTOP);
    }

    /// `SIGCONT`: a [`pause`](Self::pause)d process runs on, finding out
    /// only now what happened meanwhile.
    pub fn resume(&self) {
        self.signal(nix::sys::signal::Signal::SIGCONT);
    }

    /// What it logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Whether it still runs (reaps it if it ended).
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// `kill -9`: SIGKILL, then reaps it. The process gets no chance to
    /// clean up, exactly as in a crash or an OOM kill.
    pub fn kill(&mut self) {
        self.signal(nix::sys::signal::Signal::SIGKILL);
        let status = self.child.wait().expect("wait for the killed process");
        assert!(
            status.code().is_none(),
            "{}: ended by itself ({status}) before the SIGKILL",
            self.name
        );
    }

    /// Graceful stop: SIGTERM, then waits up to `limit` for it to exit.
    /// Panics (with its log) when it does not.
    pub async fn terminate(&mut self, limit: Duration) -> ExitStatus {
        self.signal(nix::sys::signal::Signal::SIGTERM);
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{}: still running {limit:?} after SIGTERM",
                self.name
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn signal(&self, sig: nix::sys::signal::Signal) {
        let Ok(pid) = i32::try_from(self.child.id()) else {
            panic!("{}: pid {} out of range", self.name, self.child.id());
        };
        // ESRCH only when it already ended and was reaped; then the caller's
        // wait reports how it ended.
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig);
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if std::thread::panicking() {
            let log = self.log();
            let tail: Vec<&str> = log.lines().rev().take(60).collect();
            eprintln!(
                "----- last lines of {} ({}) -----",
                self.name,
                self.log.display()
            );
            for l in tail.iter().rev() {
                eprintln!("{l}");
            }
        }
    }
}
