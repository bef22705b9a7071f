//! What the daemons share: logging, signals, configuration hot reload,
//! and choosing backends (state store, providers) from the configuration.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use nodepool_core::config::{Config, ConfigSource, Driver, ProviderConfig, StateStoreConfig};
use nodepool_core::provider::Provider;
use nodepool_core::store::{StateStore, Store};
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;

/// How to log.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// The malloc arenas glibc may make, unless the operator set
/// `MALLOC_ARENA_MAX`. glibc gives each thread that allocates under
/// contention its own arena (up to 8 per core), and each keeps freed
/// memory; the daemons' threads (runtime workers, a store's writer,
/// reader and poller) then hold several MiB each for no speed: with the
/// SQLite store a 1,000-request backlog peaked at 41-43 MiB with the
/// default and 38.8 MiB with two arenas, at the same time and CPU
/// (BENCHMARKS.md). Called before the runtime starts its threads.
fn limit_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        // SAFETY: mallopt only changes a malloc tunable; it is called
        // before this process starts any other thread.
        #[allow(unsafe_code)]
        let _ = unsafe { libc::mallopt(libc::M_ARENA_MAX, 2) };
    }
}

/// A daemon's `main`: logging as asked, a multi-threaded runtime, and the
/// exit status of `body` (its error printed as `NAME: error`).
pub fn run_main(
    name: &str,
    log_format: LogFormat,
    debug: bool,
    body: impl std::future::Future<Output = anyhow::Result<()>>,
) -> std::process::ExitCode {
    limit_malloc_arenas();
    init_logging(log_format, debug);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("{name}: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(body) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{name}: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Sets up tracing to stderr. `RUST_LOG` overrides the level.
pub fn init_logging(format: LogFormat, debug: bool) {
    let default = if debug { "debug" } else { "info" };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    let result = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
    if let Err(e) = result {
        eprintln!("logging already initialised: {e}");
    }
}

/// The host name registered in components (the FQDN when resolvable).
pub fn hostname() -> String {
    hostname::get()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_else(|| "localhost".into())
}

/// What a daemon's signals ask of it.
#[derive(Clone, Debug)]
pub struct Signals {
    /// Cancelled on SIGINT or SIGTERM (graceful stop).
    pub shutdown: CancellationToken,
    /// Notified on SIGHUP: reload the configuration now
    /// ([`watch_config`]).
    pub reload: Arc<Notify>,
}

/// Installs the daemons' signal handlers: SIGINT and SIGTERM stop
/// gracefully, SIGUSR2 calls `on_dump` (state dump to the log), SIGHUP
/// reloads the configuration now, and SIGUSR1 is logged and ignored.
/// SIGHUP and SIGUSR1 would otherwise kill the process (their default
/// action): a stray `kill -HUP` (log rotation, a closed terminal) or
/// `kill -USR1` (Python Nodepool's builder once dumped stacks on it) must
/// not take a daemon down.
pub fn handle_signals(on_dump: impl Fn() + Send + 'static) -> anyhow::Result<Signals> {
    use tokio::signal::unix::{SignalKind, signal};
    let token = CancellationToken::new();
    let reload = Arc::new(Notify::new());
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut usr2 = signal(SignalKind::user_defined2()).context("installing the SIGUSR2 handler")?;
    let mut hup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
    let mut usr1 = signal(SignalKind::user_defined1()).context("installing the SIGUSR1 handler")?;
    let stop = token.clone();
    let reload_now = reload.clone();
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = int.recv() => { tracing::info!("SIGINT: stopping"); stop.cancel(); }
                _ = term.recv() => { tracing::info!("SIGTERM: stopping"); stop.cancel(); }
                _ = usr2.recv() => on_dump(),
                _ = hup.recv() => {
                    tracing::info!("SIGHUP: reloading the configuration");
                    reload_now.notify_one();
                }
                _ = usr1.recv() => {
                    tracing::info!("SIGUSR1: ignored (SIGUSR2 dumps the state, SIGHUP reloads the configuration)");
                }
            }
        }
    });
    Ok(Signals {
        shutdown: token,
        reload,
    })
}

/// Loads the configuration as the daemons run it: the files validated,
/// then every OpenStack provider's clouds.yaml entry loaded and checked
/// (as `nodepool config-validate` does) and its `image_format` filled in.
/// The error lists every problem, each with its file and key.
pub fn load_config(source: &ConfigSource) -> Result<Config, String> {
    let mut config = source.load().map_err(|e| e.to_string())?;
    for w in &config.warnings {
        tracing::warn!(file = %source.path.display(), "configuration: {w}");
    }
    nodepool_openstack::clouds::fill_image_formats(
        &nodepool_openstack::CloudsLoader::from_env(),
        &mut config,
    )
    .map_err(|e| e.to_string())?;
    Ok(config)
}

/// Loads the configuration ([`load_config`]) and keeps watching it: every
/// `interval` the files are fingerprinted, and a changed configuration
/// that loads is sent on the returned channel; when `reload` is notified
/// (SIGHUP) it is loaded and sent at once, changed or not (clouds.yaml,
/// which the fingerprint does not cover, is read again too). One that does
/// not load (a bad file, or a provider whose cloud cannot be loaded) is
/// logged with every error and the running configuration is kept.
pub fn watch_config(
    source: ConfigSource,
    interval: Duration,
    stop: CancellationToken,
    reload: Arc<Notify>,
) -> anyhow::Result<watch::Receiver<Arc<Config>>> {
    let initial = load_config(&source).map_err(|e| anyhow::anyhow!("{e}"))?;
    let (tx, rx) = watch::channel(Arc::new(initial));
    let mut seen = source.fingerprint();
    tokio::spawn(async move {
        loop {
            let forced = tokio::select! {
                _ = stop.cancelled() => return,
                _ = reload.notified() => true,
                _ = tokio::time::sleep(interval) => false,
            };
            let now = source.fingerprint();
            if now == seen && !forced {
                continue;
            }
            seen = now;
            let trigger = if forced { "SIGHUP" } else { "file changed" };
            match load_config(&source) {
                Ok(cfg) => {
                    tracing::info!(file = %source.path.display(), trigger, "configuration reloaded");
                    if tx.send(Arc::new(cfg)).is_err() {
                        return;
                    }
                }
                Err(e) => {
                    tracing::error!("new configuration rejected, keeping the running one:\n{e}")
                }
            }
        }
    });
    Ok(rx)
}

/// Opens the state store the configuration selects.
pub async fn open_store(config: &Config) -> anyhow::Result<Store> {
    let backend: Arc<dyn StateStore> = match &config.state_store {
        StateStoreConfig::ZooKeeper => Arc::new(
            nodepool_zookeeper::ZooKeeperStore::from_config(config)
                .await
                .map_err(|e| anyhow::anyhow!("ZooKeeper {}: {e}", config.zookeeper_hosts()))?,
        ),
        StateStoreConfig::Sqlite { path, .. } => Arc::new(
            nodepool_sqlite::SqliteStore::from_config(config, Default::default())
                .await
                .map_err(|e| anyhow::anyhow!("SQLite store {}: {e}", path.display()))?,
        ),
    };
    Ok(Store::new(backend))
}

/// Builds a provider for its configuration: OpenStack, the simulated
/// cloud, an external program, VMs on this host (qemu) or a static provider's (which has no
/// servers).
pub fn make_provider(pc: &ProviderConfig) -> Result<Arc<dyn Provider>, String> {
    match &pc.driver {
        Driver::OpenStack => nodepool_openstack::OpenStackProvider::from_config(pc)
            .map(|p| Arc::new(p) as Arc<dyn Provider>)
            .map_err(|e| e.to_string()),
        Driver::Simulated(_) => nodepool_simulated::SimulatedProvider::new(pc)
            .map(|p| Arc::new(p) as Arc<dyn Provider>)
            .map_err(|e| e.to_string()),
        Driver::External(_) => nodepool_external::ExternalProvider::new(pc)
            .map(|p| Arc::new(p) as Arc<dyn Provider>)
            .map_err(|e| e.to_string()),
        Driver::Qemu(_) => nodepool_qemu::QemuProvider::new(pc)
            .map(|p| Arc::new(p) as Arc<dyn Provider>)
            .map_err(|e| e.to_string()),
        Driver::Static(_) => Ok(Arc::new(
            nodepool_core::launcher::static_hosts::StaticProvider::new(pc),
        )),
    }
}

/// Writes the process id to a file (`-p`), removed on drop.
pub struct PidFile(PathBuf);

impl PidFile {
    /// Creates the pid file.
    pub fn create(path: PathBuf) -> anyhow::Result<Self> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        std::fs::write(&path, format!("{}\n", std::process::id()))
            .with_context(|| format!("writing pid file {}", path.display()))?;
        Ok(PidFile(path))
    }
}

impl Drop for PidFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}
