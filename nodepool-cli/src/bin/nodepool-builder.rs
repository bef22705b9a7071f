//! `nodepool-builder`: builds disk images with diskimage-builder, uploads
//! them to every provider that uses them, and keeps the current and the
//! previous image of each (reference §5, §6.1).

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use nodepool_cli::cli::DaemonArgs;
use nodepool_cli::daemon;
use nodepool_core::builder::{Builder, BuilderSettings, BuilderStatus};
use nodepool_core::config::ConfigSource;
use nodepool_core::launcher::{Metrics, ProviderFactory};
use nodepool_dib::{DibBuilder, DibOptions};

/// Build disk images and keep them uploaded to every provider.
#[derive(Debug, Parser)]
#[command(name = "nodepool-builder", version)]
struct Args {
    #[command(flatten)]
    common: DaemonArgs,
    /// Builds running at once.
    #[arg(long = "build-workers", default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..), display_order = 2)]
    build_workers: u16,
    /// Uploads running at once.
    #[arg(long = "upload-workers", default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..), display_order = 3)]
    upload_workers: u16,
    /// Do not serve the web app (the listings, `/metrics` and `/ready`).
    #[arg(long = "no-webapp", display_order = 4)]
    no_webapp: bool,
    /// Port of the web app (the launcher's uses the
    /// configuration's `webapp.port`, 8005 by default).
    #[arg(long = "webapp-port", default_value_t = 8006, display_order = 5)]
    webapp_port: u16,
    /// Address the web app listens on.
    #[arg(
        long = "webapp-listen-address",
        default_value = "0.0.0.0",
        display_order = 6
    )]
    webapp_listen_address: String,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let (log_format, debug) = (args.common.log_format, args.common.debug);
    daemon::run_main("nodepool-builder", log_format, debug, run(args))
}

async fn run(args: Args) -> anyhow::Result<()> {
    let _pid = args
        .common
        .pidfile
        .clone()
        .map(daemon::PidFile::create)
        .transpose()?;
    let status_slot: Arc<std::sync::Mutex<Option<Arc<BuilderStatus>>>> = Arc::default();
    let dump_slot = status_slot.clone();
    let signals = daemon::handle_signals(move || {
        let report = dump_slot
            .lock()
            .ok()
            .and_then(|s| s.clone())
            .map(|s| s.report())
            .unwrap_or_else(|| "builder not started yet".into());
        tracing::info!(target: "nodepool.stack_dump", "state dump (SIGUSR2):\n{report}");
    })?;
    let shutdown = signals.shutdown.clone();
    let source = ConfigSource::new(&args.common.config, args.common.secure.clone());
    // Each OpenStack provider's upload format (clouds.yaml `image_format`)
    // is filled in by the loader, on every reload.
    let config = daemon::watch_config(
        source,
        Duration::from_secs(1),
        shutdown.clone(),
        signals.reload.clone(),
    )?;
    let initial = config.borrow().clone();
    let images_dir = initial.images_dir.clone().with_context(|| {
        format!(
            "{}: the builder needs `images-dir`",
            args.common.config.display()
        )
    })?;
    std::fs::create_dir_all(&images_dir)
        .with_context(|| format!("creating images-dir {}", images_dir.display()))?;

    // A builder killed mid-build (SIGKILL, a crash, a reboot) leaves
    // diskimage-builder's processes, mounts and loop devices behind;
    // nothing is building yet, so whatever is in the work directory is
    // left over.
    let dib = DibBuilder::new(DibOptions::default());
    let sweeper = dib.clone();
    let dir = images_dir.clone();
    let swept = tokio::task::spawn_blocking(move || sweeper.sweep_work_dir(&dir))
        .await
        .context("sweeping the DIB work directory")?;
    for (dir, report) in swept {
        if report.problems.is_empty() {
            tracing::info!(dir = %dir.display(), ?report, "swept a build left by an earlier run");
        } else {
            tracing::error!(dir = %dir.display(), problems = ?report.problems, "could not clean everything an earlier build left");
        }
    }

    let store = daemon::open_store(&initial).await?;
    tracing::info!(store = %store.describe(), "state store open");
    let factory: ProviderFactory = Arc::new(daemon::make_provider);
    let metrics = Arc::new(Metrics::from_env());
    let builder = Builder::new(
        store.clone(),
        factory,
        Arc::new(dib),
        BuilderSettings {
            hostname: daemon::hostname(),
            build_workers: usize::from(args.build_workers),
            upload_workers: usize::from(args.upload_workers),
            log_pruner: Some(Arc::new(nodepool_dib::prune_build_logs)),
            ..BuilderSettings::default()
        },
    )
    .with_metrics(metrics.clone());
    if let Ok(mut slot) = status_slot.lock() {
        *slot = Some(builder.status());
    }
    if !args.no_webapp {
        nodepool_cli::webapp::spawn_builder(
            &nodepool_cli::webapp::BuilderWebapp {
                listen_address: args.webapp_listen_address.clone(),
                port: args.webapp_port,
            },
            store.clone(),
            builder.status(),
            metrics,
            shutdown.clone(),
        )
        .await?;
    }
    let result = builder.run(config, shutdown).await;
    store.backend().close().await.ok();
    result.map_err(Into::into)
}
