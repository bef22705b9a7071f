//! `nodepool-builder`: builds disk images with diskimage-builder, uploads
//! them to every provider that uses them, and keeps the current and the
//! previous image of each (reference §5, §6.1).

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use nodepool_cli::daemon::{self, LogFormat};
use nodepool_core::builder::{Builder, BuilderSettings, BuilderStatus};
use nodepool_core::config::{Config, ConfigSource};
use nodepool_core::launcher::ProviderFactory;
use nodepool_dib::{DibBuilder, DibOptions};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// Build disk images and keep them uploaded to every provider.
#[derive(Debug, Parser)]
#[command(name = "nodepool-builder", version, about)]
struct Args {
    /// Configuration file.
    #[arg(short = 'c', long = "config", default_value = nodepool_cli::admin::DEFAULT_CONFIG)]
    config: PathBuf,
    /// Secure configuration file.
    #[arg(short = 's', long = "secure")]
    secure: Option<PathBuf>,
    /// Builds running at once.
    #[arg(long = "build-workers", default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..))]
    build_workers: u16,
    /// Uploads running at once.
    #[arg(long = "upload-workers", default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..))]
    upload_workers: u16,
    /// Write the process id here.
    #[arg(short = 'p', long = "pidfile")]
    pidfile: Option<PathBuf>,
    /// Log format.
    #[arg(long = "log-format", value_enum, default_value = "text")]
    log_format: LogFormat,
    /// Debug logging.
    #[arg(short = 'd', long = "debug")]
    debug: bool,
    /// Stay in the foreground (always the case; accepted for compatibility).
    #[arg(short = 'f', long = "foreground")]
    foreground: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let (log_format, debug) = (args.log_format, args.debug);
    daemon::run_main("nodepool-builder", log_format, debug, run(args))
}

/// Fills what the builder needs from clouds.yaml (each OpenStack cloud's
/// `image_format`, which decides the format built and uploaded for it).
fn with_image_formats(mut cfg: Config) -> anyhow::Result<Config> {
    nodepool_openstack::clouds::fill_image_formats(
        &nodepool_openstack::CloudsLoader::from_env(),
        &mut cfg,
    )
    .map_err(|e| anyhow::anyhow!("clouds.yaml: {e}"))?;
    Ok(cfg)
}

/// The configuration channel the builder runs on: every configuration the
/// file watcher accepts, with image formats filled in. One whose clouds
/// cannot be read is rejected like an invalid file (the running one is
/// kept).
fn builder_config(
    mut raw: watch::Receiver<Arc<Config>>,
    stop: CancellationToken,
) -> anyhow::Result<watch::Receiver<Arc<Config>>> {
    let initial = with_image_formats((**raw.borrow_and_update()).clone())?;
    let (tx, rx) = watch::channel(Arc::new(initial));
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                r = raw.changed() => if r.is_err() { return },
            }
            let next = (**raw.borrow_and_update()).clone();
            match with_image_formats(next) {
                Ok(cfg) => {
                    if tx.send(Arc::new(cfg)).is_err() {
                        return;
                    }
                }
                Err(e) => {
                    tracing::error!("new configuration rejected, keeping the running one: {e}")
                }
            }
        }
    });
    Ok(rx)
}

async fn run(args: Args) -> anyhow::Result<()> {
    let _pid = args
        .pidfile
        .clone()
        .map(daemon::PidFile::create)
        .transpose()?;
    let status_slot: Arc<std::sync::Mutex<Option<Arc<BuilderStatus>>>> = Arc::default();
    let dump_slot = status_slot.clone();
    let shutdown = daemon::handle_signals(move || {
        let report = dump_slot
            .lock()
            .ok()
            .and_then(|s| s.clone())
            .map(|s| s.report())
            .unwrap_or_else(|| "builder not started yet".into());
        tracing::info!(target: "nodepool.stack_dump", "state dump (SIGUSR2):\n{report}");
    })?;
    let source = ConfigSource::new(&args.config, args.secure.clone());
    let raw = daemon::watch_config(source, Duration::from_secs(1), shutdown.clone())?;
    let config = builder_config(raw, shutdown.clone())?;
    let initial = config.borrow().clone();
    let images_dir = initial
        .images_dir
        .clone()
        .with_context(|| format!("{}: the builder needs `images-dir`", args.config.display()))?;
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
    );
    if let Ok(mut slot) = status_slot.lock() {
        *slot = Some(builder.status());
    }
    let result = builder.run(config, shutdown).await;
    store.backend().close().await.ok();
    result.map_err(Into::into)
}
