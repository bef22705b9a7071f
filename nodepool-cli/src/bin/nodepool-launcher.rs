//! `nodepool-launcher`: keeps pools of ready nodes and serves node requests.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use nodepool_cli::cli::DaemonArgs;
use nodepool_cli::daemon;
use nodepool_core::config::ConfigSource;
use nodepool_core::launcher::{Launcher, LauncherSettings, Metrics, ProviderFactory};

/// Launch and delete nodes for Zuul (or any requestor), keeping min-ready
/// spares, within every pool's and cloud's limits.
#[derive(Debug, Parser)]
#[command(name = "nodepool-launcher", version)]
struct Args {
    #[command(flatten)]
    common: DaemonArgs,
    /// Do not serve the web app.
    #[arg(long = "no-webapp", display_order = 2)]
    no_webapp: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let (log_format, debug) = (args.common.log_format, args.common.debug);
    daemon::run_main("nodepool-launcher", log_format, debug, run(args))
}

async fn run(args: Args) -> anyhow::Result<()> {
    let _pid = args
        .common
        .pidfile
        .clone()
        .map(daemon::PidFile::create)
        .transpose()?;
    let status_slot: Arc<std::sync::Mutex<Option<Arc<nodepool_core::launcher::LauncherStatus>>>> =
        Arc::default();
    let dump_slot = status_slot.clone();
    let signals = daemon::handle_signals(move || {
        let report = dump_slot
            .lock()
            .ok()
            .and_then(|s| s.clone())
            .map(|s| s.report())
            .unwrap_or_else(|| "launcher not started yet".into());
        tracing::info!(target: "nodepool.stack_dump", "state dump (SIGUSR2):\n{report}");
    })?;
    let shutdown = signals.shutdown.clone();
    let source = ConfigSource::new(&args.common.config, args.common.secure.clone());
    let config = daemon::watch_config(
        source,
        Duration::from_secs(1),
        shutdown.clone(),
        signals.reload.clone(),
    )?;
    let initial = config.borrow().clone();
    let store = daemon::open_store(&initial).await?;
    tracing::info!(store = %store.describe(), "state store open");
    let factory: ProviderFactory = Arc::new(daemon::make_provider);
    let metrics = Arc::new(Metrics::from_env());
    let launcher = Launcher::new(
        store.clone(),
        factory,
        LauncherSettings {
            hostname: daemon::hostname(),
            ..LauncherSettings::default()
        },
    )
    .with_metrics(metrics.clone());
    let status = launcher.status();
    if let Ok(mut slot) = status_slot.lock() {
        *slot = Some(status.clone());
    }
    if !args.no_webapp {
        nodepool_cli::webapp::spawn(
            store.clone(),
            config.clone(),
            status.clone(),
            metrics.clone(),
            shutdown.clone(),
        )
        .await?;
    }
    // Jenkins targets: the consumer runtime beside the launcher, on the same
    // store. Always started, so a reload can add targets; idle without any.
    let consumers = tokio::spawn(
        nodepool_core::consumers::ConsumerRuntime::new(
            store.clone(),
            nodepool_jenkins::consumer_factory(store.clone(), Default::default()),
            Default::default(),
        )
        .run(config.clone(), shutdown.clone()),
    );
    launcher.run(config, shutdown).await?;
    consumers.await.ok();
    store.backend().close().await.ok();
    Ok(())
}
