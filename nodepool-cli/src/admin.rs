//! The `nodepool` admin command: every subcommand of Python Nodepool's
//! (reference §6.2) plus `alien-list`, `image-upload`, `label-list`,
//! `request` and `completions`.
//!
//! Each subcommand is one variant of [`Command`] (defined in
//! [`crate::cli`]) and one arm of `execute`; add a subcommand by adding
//! both. The arms are thin: what a command does to the installation is in
//! [`nodepool_core::admin`] (shared with the web app and embedders), what
//! it prints is here. Listings go through [`crate::listing`], which the web
//! app shares. Commands that need a cloud get it from a
//! [`ProviderFactory`], so tests can run them in-process against a
//! simulated cloud that outlives the command.
//!
//! Exit status: 0 on success; 1 with one `error: ...` line on stderr
//! otherwise (configuration errors list every problem, as
//! `config-validate` does). Confirmation prompts go to stderr, so stdout
//! stays a clean table or JSON document.

use std::io::{BufRead, Write};
use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, anyhow};
use clap::CommandFactory;
use nodepool_core::admin::{self, Aliens, BuildRef, UploadRef};
use nodepool_core::config::{Config, ConfigSource, StateStoreConfig};
use nodepool_core::launcher::ProviderFactory;
use nodepool_core::model::{NodeState, epoch_now};
use nodepool_core::planner::explain::RequestExplanation;
use nodepool_core::store::{Store, StoreError};
use nodepool_requestor::{NewRequest, Outcome, Requestor};

pub use crate::cli::{Cli, Command, Confirm, DEFAULT_CONFIG};
use crate::listing::{self, Cell, Listing, Source};

/// Where a command reads answers and writes output.
pub struct Io<'a> {
    /// Listings and results.
    pub out: &'a mut dyn Write,
    /// Errors, warnings, prompts and progress.
    pub err: &'a mut dyn Write,
    /// Answers to confirmation prompts.
    pub input: &'a mut dyn BufRead,
    /// Whether `input` is a terminal (which echoes the answer itself).
    pub interactive: bool,
    /// Whether `err` is a terminal: progress (`--wait`) is redrawn in
    /// place there, written as plain lines otherwise.
    pub terminal: bool,
}

/// Runs the CLI as the `nodepool` binary does: real clouds, stdin for
/// prompts. Returns the exit code.
pub fn run(cli: Cli, out: &mut dyn Write, err: &mut dyn Write) -> ExitCode {
    if cli.debug {
        crate::daemon::init_logging(crate::daemon::LogFormat::Text, true);
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            let _ = writeln!(err, "error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let stdin = std::io::stdin();
    let interactive = std::io::IsTerminal::is_terminal(&stdin);
    let mut input = stdin.lock();
    let mut io = Io {
        out,
        err,
        input: &mut input,
        interactive,
        terminal: std::io::IsTerminal::is_terminal(&std::io::stderr()),
    };
    let providers: ProviderFactory = Arc::new(crate::daemon::make_provider);
    runtime.block_on(run_with(cli, providers, &mut io))
}

/// Runs the CLI with these clouds and streams; returns the exit code.
pub async fn run_with(cli: Cli, providers: ProviderFactory, io: &mut Io<'_>) -> ExitCode {
    let result = match &cli.command {
        Command::ConfigValidate { no_clouds } => config_validate(&cli, *no_clouds, io),
        Command::ConfigMigrate(args) => {
            crate::migrate::run(args, io.out, io.err).map_err(Failure::from)
        }
        Command::Completions { shell } => {
            clap_complete::generate(*shell, &mut Cli::command(), "nodepool", io.out);
            Ok(())
        }
        _ => with_store(&cli, providers, io).await,
    };
    let _ = io.out.flush();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Message(e)) => {
            // One line, whatever the cause chain held.
            let msg = format!("{e:#}")
                .lines()
                .map(str::trim)
                .collect::<Vec<_>>()
                .join(" ");
            let _ = writeln!(io.err, "error: {msg}");
            ExitCode::FAILURE
        }
        Err(Failure::Reported) => ExitCode::FAILURE,
    }
}

/// Why a command failed.
enum Failure {
    /// Print this as the one-line error.
    Message(anyhow::Error),
    /// Already reported on stderr (configuration errors, partial listings).
    Reported,
}

impl<E: Into<anyhow::Error>> From<E> for Failure {
    fn from(e: E) -> Self {
        Failure::Message(e.into())
    }
}

fn config_validate(cli: &Cli, no_clouds: bool, io: &mut Io<'_>) -> Result<(), Failure> {
    let cfg = load_config(cli, io)?;
    // The daemons refuse a configuration whose clouds they cannot load
    // (crate::daemon::load_config), so a "valid" here must mean that too.
    let clouds = if no_clouds {
        None
    } else {
        let loader = nodepool_openstack::CloudsLoader::from_env();
        match nodepool_openstack::clouds::provider_clouds(&loader, &cfg) {
            Ok(c) => Some(c),
            Err(e) => {
                let _ = writeln!(io.err, "{e}");
                return Err(Failure::Reported);
            }
        }
    };
    let files = match &cli.secure {
        Some(s) => format!("{} (+ {})", cli.config.display(), s.display()),
        None => cli.config.display().to_string(),
    };
    for w in &cfg.warnings {
        let what = if w.kind.fails_validation() {
            "error"
        } else {
            "warning"
        };
        let _ = writeln!(io.err, "{}: {what}: {w}", cli.config.display());
    }
    let mistakes = cfg
        .warnings
        .iter()
        .filter(|w| w.kind.fails_validation())
        .count();
    if mistakes > 0 {
        let _ = writeln!(
            io.err,
            "{files}: not valid ({mistakes} error{}; the daemons would run with it, logging the same)",
            if mistakes == 1 { "" } else { "s" }
        );
        return Err(Failure::Reported);
    }
    let _ = writeln!(
        io.out,
        "{files}: valid ({} labels, {} providers, {} diskimages)",
        cfg.labels.len(),
        cfg.providers.len(),
        cfg.diskimages.len()
    );
    for (provider, cloud) in clouds.iter().flatten() {
        // Which file was used matters: the search path depends on the
        // directory and user the command runs as.
        let region = cloud
            .region_name
            .as_deref()
            .map(|r| format!(" region {r:?}"))
            .unwrap_or_default();
        let _ = writeln!(
            io.out,
            "  providers.{provider}: cloud {:?}{region} from {}",
            cloud.name, cloud.source
        );
    }
    Ok(())
}

fn load_config(cli: &Cli, io: &mut Io<'_>) -> Result<Config, Failure> {
    ConfigSource::new(&cli.config, cli.secure.clone())
        .load()
        .map_err(|e| {
            let _ = write!(io.err, "{e}");
            if !e.to_string().ends_with('\n') {
                let _ = writeln!(io.err);
            }
            Failure::Reported
        })
}

/// Opens the state store the configuration names, giving up on an
/// unreachable one after `connect_timeout` with its address in the error.
pub async fn open_store(config: &Config, connect_timeout: Duration) -> anyhow::Result<Store> {
    let backend: Arc<dyn nodepool_core::store::StateStore> = match &config.state_store {
        StateStoreConfig::ZooKeeper => {
            let mut options = nodepool_zookeeper::ZooKeeperOptions::from_config(config)
                .map_err(|e| anyhow!("zookeeper {}: {e}", config.zookeeper_hosts()))?;
            options.connect_timeout = connect_timeout;
            let what = options.describe();
            Arc::new(
                nodepool_zookeeper::ZooKeeperStore::connect(options)
                    .await
                    .map_err(|e| match e {
                        StoreError::Unavailable { .. } => anyhow!("{e}"),
                        other => anyhow!("{what}: {other}"),
                    })?,
            )
        }
        StateStoreConfig::Sqlite { path, .. } => Arc::new(
            nodepool_sqlite::SqliteStore::from_config(config, Default::default())
                .await
                .map_err(|e| anyhow!("SQLite store {} is unreachable: {e}", path.display()))?,
        ),
    };
    Ok(Store::new(backend))
}

async fn with_store(cli: &Cli, providers: ProviderFactory, io: &mut Io<'_>) -> Result<(), Failure> {
    let config = Arc::new(load_config(cli, io)?);
    let timeout = Duration::try_from_secs_f64(cli.connect_timeout)
        .map_err(|_| anyhow!("--connect-timeout must be a positive number of seconds"))?;
    let store = open_store(&config, timeout).await?;
    let mut ctx = Ctx {
        config,
        store: store.clone(),
        providers,
        json: cli.json,
        io,
    };
    let result = execute(&mut ctx, &cli.command).await;
    // Ends our session: any lock we still hold goes with it.
    let _ = store.backend().close().await;
    result
}

/// What a command works with.
struct Ctx<'a, 'b> {
    config: Arc<Config>,
    store: Store,
    providers: ProviderFactory,
    json: bool,
    io: &'a mut Io<'b>,
}

impl Ctx<'_, '_> {
    fn print(&mut self, listing: &Listing, fields: Option<&[&str]>) {
        let text = if self.json {
            listing.to_json()
        } else {
            listing.to_table(fields, epoch_now())
        };
        let _ = writeln!(self.io.out, "{text}");
    }

    /// Prints a listing read from the store, then one warning per record
    /// it had to leave out (the JSON stays the web app's bare list).
    fn print_store_listing(&mut self, listing: &Listing, fields: Option<&[&str]>) {
        self.print(listing, fields);
        for m in &listing.skipped {
            let line = format!("skipped unreadable record {}: {}", m.path, m.reason);
            self.warn(&line);
        }
    }

    fn say(&mut self, line: &str) {
        let _ = writeln!(self.io.out, "{line}");
    }

    fn warn(&mut self, line: &str) {
        let _ = writeln!(self.io.err, "warning: {line}");
    }

    /// Asks `question [N/y]` on stderr unless `--yes`; anything but `y`
    /// (or end of input) aborts. Only `erase` asks, as in Python
    /// Nodepool. Without a terminal nobody can answer, so that is an error
    /// naming the flag rather than an answer read from a pipe or a silent
    /// abort.
    fn confirm(&mut self, confirm: Confirm, question: &str) -> Result<(), Failure> {
        if confirm.yes {
            return Ok(());
        }
        if !self.io.interactive {
            return Err(anyhow!(
                "cannot ask \"{question}\": stdin is not a terminal; pass --yes (or --force, as for Python Nodepool) to go ahead"
            )
            .into());
        }
        let _ = write!(self.io.err, "{question} [N/y] ");
        let _ = self.io.err.flush();
        let mut answer = String::new();
        self.io
            .input
            .read_line(&mut answer)
            .context("reading the answer")?;
        if matches!(answer.trim().to_ascii_lowercase().as_str(), "y" | "yes") {
            Ok(())
        } else {
            Err(anyhow!("aborted: nothing was changed (pass --yes to skip the question)").into())
        }
    }

    async fn show_node(&mut self, id: &str) -> Result<(), Failure> {
        let l = Source::Nodes {
            node_id: Some(id.to_owned()),
        }
        .fetch(&self.store, epoch_now())
        .await?;
        self.print(&l, Some(listing::NODE_BRIEF_FIELDS));
        Ok(())
    }
}

async fn execute(ctx: &mut Ctx<'_, '_>, command: &Command) -> Result<(), Failure> {
    match command {
        Command::List { detail } => {
            let l = Source::Nodes { node_id: None }
                .fetch(&ctx.store, epoch_now())
                .await?;
            let fields = (!*detail).then_some(listing::NODE_BRIEF_FIELDS);
            ctx.print_store_listing(&l, fields);
        }
        Command::RequestList { detail: false } => listing_of(ctx, Source::Requests).await?,
        Command::RequestList { detail: true } => {
            let l = Source::Requests.fetch(&ctx.store, epoch_now()).await?;
            let why = admin::explain_waiting(&ctx.config, &ctx.store, &ctx.providers).await?;
            for e in &why.unlisted {
                ctx.warn(&format!("{e}; its quota and images are taken as unknown"));
            }
            let reasons = why.found.into_iter().collect();
            ctx.print_store_listing(&listing::with_waiting_reasons(l, &reasons), None);
        }
        Command::JobCreate(args) => {
            let line = crate::jobs::create(&ctx.store, args).await?;
            ctx.say(&line);
        }
        Command::JobList => {
            let l = crate::jobs::list(&ctx.store).await?;
            ctx.print(&l, None);
        }
        Command::JobDelete(args) => {
            let line = crate::jobs::delete(&ctx.store, args).await?;
            ctx.say(&line);
        }
        Command::LabelList { detail: false } => listing_of(ctx, Source::Labels).await?,
        Command::LabelList { detail: true } => {
            let r = admin::label_readiness(&ctx.config, &ctx.store, &ctx.providers).await?;
            for e in &r.unlisted {
                ctx.warn(&format!("{e}; its quota and images are taken as unknown"));
            }
            ctx.print_store_listing(&listing::label_readiness(&r.found), None);
        }
        Command::ImageList => listing_of(ctx, Source::Images).await?,
        Command::DibImageList => listing_of(ctx, Source::DibImages).await?,
        Command::ImageStatus => listing_of(ctx, Source::ImageStatus).await?,
        Command::ImageBuild { image, wait } => {
            // Before the request: the build it makes is one not seen here.
            let known = match wait.wait {
                true => Some(crate::wait::build_ids(&ctx.store, image).await?),
                false => None,
            };
            admin::request_image_build(&ctx.config, &ctx.store, image).await?;
            ctx.say(&format!("build of {image} requested"));
            if let Some(known) = known {
                let limit = wait_limit(wait, || {
                    ctx.config.diskimage(image).map(|d| d.build_timeout)
                });
                let _ = ctx.io.out.flush();
                let mut progress = crate::wait::Progress::new(ctx.io.err, ctx.io.terminal);
                let id = crate::wait::follow_build(&ctx.store, image, &known, limit, &mut progress)
                    .await?;
                ctx.say(&format!("build {id} of {image} ready"));
            }
        }
        Command::ImageUpdate {
            provider,
            image,
            wait,
        } => {
            // Before the request: the snapshot it makes is one not seen here.
            let known = match wait.wait {
                true => Some(crate::wait::build_ids(&ctx.store, image).await?),
                false => None,
            };
            admin::request_snapshot(&ctx.config, &ctx.store, provider, image).await?;
            ctx.say(&format!("snapshot of {image} in {provider} requested"));
            if let Some(known) = known {
                let limit = wait_limit(wait, || {
                    ctx.config
                        .provider(provider)
                        .and_then(|p| p.snapshot_image(image))
                        .map(|s| s.setup.timeout)
                });
                let _ = ctx.io.out.flush();
                let mut progress = crate::wait::Progress::new(ctx.io.err, ctx.io.terminal);
                let id = crate::wait::follow_build(&ctx.store, image, &known, limit, &mut progress)
                    .await?;
                // The build is marked ready after its one upload, so the
                // snapshot's cloud image is known by now.
                let made = crate::wait::ready_upload(&ctx.store, image, &id, provider).await?;
                ctx.say(&match made {
                    Some((upload, ext)) => format!(
                        "snapshot {id} of {image} in {provider} ready: upload {upload}, cloud image {ext}"
                    ),
                    None => format!("snapshot {id} of {image} in {provider} ready"),
                });
            }
        }
        Command::ImageUpload {
            provider,
            image,
            wait,
        } => {
            let known = match wait.wait {
                true => Some(crate::wait::upload_ids(&ctx.store, image, provider).await?),
                false => None,
            };
            let build =
                admin::request_image_upload(&ctx.config, &ctx.store, provider, image).await?;
            ctx.say(&format!(
                "upload of {image} build {build} to {provider} requested"
            ));
            if let Some(known) = known {
                let limit = wait_limit(wait, || {
                    ctx.config
                        .provider(provider)
                        .map(|p| p.image_upload_timeout)
                });
                let _ = ctx.io.out.flush();
                let mut progress = crate::wait::Progress::new(ctx.io.err, ctx.io.terminal);
                let done = crate::wait::follow_upload(
                    &ctx.store,
                    image,
                    provider,
                    &known,
                    limit,
                    &mut progress,
                )
                .await?;
                let size = done
                    .bytes
                    .map(|b| format!(" ({})", crate::wait::human_bytes(b)))
                    .unwrap_or_default();
                ctx.say(&format!(
                    "upload {} of {image} build {} to {provider} ready{size}: cloud image {}",
                    done.upload, done.build, done.external_id
                ));
            }
        }
        Command::ImageDelete {
            provider,
            image,
            build_id,
            upload_id,
            ..
        } => {
            let upload = UploadRef {
                image: image.clone(),
                build: build_id.clone(),
                provider: provider.clone(),
                upload: upload_id.clone(),
            };
            let read = admin::upload_to_delete(&ctx.store, &upload).await?;
            admin::mark_upload_deleting(&ctx.store, &upload, read).await?;
            ctx.say(&format!("image {upload} marked for deletion"));
        }
        Command::DibImageDelete { id, .. } => {
            let build = BuildRef::parse(id)?;
            let read = admin::build_to_delete(&ctx.store, &build).await?;
            admin::mark_build_deleting(&ctx.store, &build, read).await?;
            ctx.say(&format!("build {build} marked for deletion"));
        }
        Command::ImagePause { image } | Command::ImageUnpause { image } => {
            let pause = matches!(command, Command::ImagePause { .. });
            admin::set_image_paused(&ctx.config, &ctx.store, image, pause).await?;
            ctx.say(&format!(
                "image {image} {}",
                if pause { "paused" } else { "unpaused" }
            ));
        }
        Command::AlienList { provider } => {
            let aliens =
                admin::alien_servers(&ctx.config, &ctx.store, &ctx.providers, provider.as_deref())
                    .await?;
            let mut l = Listing::new(listing::ALIEN_COLUMNS);
            for a in &aliens.found {
                l.rows.push(vec![
                    Cell::Text(a.provider.clone()),
                    Cell::Text(a.name.clone()),
                    Cell::Text(a.external_id.clone()),
                    Cell::opt(a.ip.as_deref()),
                ]);
            }
            ctx.print(&l, None);
            report_partial(ctx, aliens)?;
        }
        Command::AlienImageList { provider } => {
            let aliens =
                admin::alien_images(&ctx.config, &ctx.store, &ctx.providers, provider.as_deref())
                    .await?;
            let mut l = Listing::new(listing::ALIEN_IMAGE_COLUMNS);
            for a in &aliens.found {
                l.rows.push(vec![
                    Cell::Text(a.provider.clone()),
                    Cell::Text(a.name.clone()),
                    Cell::Text(a.id.clone()),
                ]);
            }
            ctx.print(&l, None);
            report_partial(ctx, aliens)?;
        }
        Command::Delete { id, now, .. } => {
            admin::delete_node(&ctx.config, &ctx.store, &ctx.providers, id, *now).await?;
            ctx.show_node(id).await?;
        }
        Command::Hold { id, reason } => {
            admin::hold_node(&ctx.store, id, reason.as_deref()).await?;
            ctx.show_node(id).await?;
        }
        Command::Request {
            labels,
            provider,
            timeout,
            return_nodes,
        } => {
            let timeout = Duration::try_from_secs_f64(*timeout)
                .map_err(|_| anyhow!("--timeout must be a positive number of seconds"))?;
            request(ctx, labels, provider.clone(), timeout, *return_nodes).await?;
        }
        Command::Info { provider } => info(ctx, provider).await?,
        Command::RequestExplain { id } => {
            let why = admin::explain_request(&ctx.config, &ctx.store, &ctx.providers, id).await?;
            for e in &why.unlisted {
                ctx.warn(&format!("{e}; its quota and images are taken as unknown"));
            }
            for x in &why.found {
                explain(ctx, x);
            }
        }
        Command::Erase { provider, confirm } => {
            let data = admin::provider_data(&ctx.store, provider).await?;
            let _ = writeln!(ctx.io.err, "WARNING! This action is not reversible!");
            ctx.confirm(
                *confirm,
                &format!(
                    "Erase {} data for provider {provider} ({} upload directories, {} nodes)?",
                    ctx.store.describe(),
                    data.upload_dirs.len(),
                    data.nodes.len()
                ),
            )?;
            ctx.say(&format!("Erasing build data for {provider}..."));
            admin::erase_uploads(&ctx.store, &data).await?;
            ctx.say(&format!("Erasing node data for {provider}..."));
            admin::erase_nodes(&ctx.store, &data).await?;
        }
        Command::ExportImageData { path } => {
            let data = admin::export_image_data(&ctx.store).await?;
            write_private(path, &serde_json::to_vec(&data)?)?;
            ctx.say(&format!(
                "exported {} records to {}",
                data.len(),
                path.display()
            ));
        }
        Command::ImportImageData { path, .. } => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            let data: admin::ImageData = serde_json::from_str(&text)
                .with_context(|| format!("{}: not an image data export", path.display()))?;
            admin::check_image_data(&data).with_context(|| format!("{}", path.display()))?;
            admin::import_image_data(&ctx.store, &data).await?;
            ctx.say(&format!(
                "imported {} records from {}",
                data.len(),
                path.display()
            ));
        }
        Command::ConfigValidate { .. }
        | Command::ConfigMigrate(_)
        | Command::Completions { .. } => {}
    }
    Ok(())
}

async fn listing_of(ctx: &mut Ctx<'_, '_>, source: Source) -> Result<(), Failure> {
    let l = source.fetch(&ctx.store, epoch_now()).await?;
    ctx.print_store_listing(&l, None);
    Ok(())
}

/// Prints one warning per provider that could not be listed and fails
/// the command if there was any: a partial listing must not pass for a
/// complete one in a script.
fn report_partial<T>(ctx: &mut Ctx<'_, '_>, aliens: Aliens<T>) -> Result<(), Failure> {
    let errors = aliens.unlisted;
    if errors.is_empty() {
        return Ok(());
    }
    for e in &errors {
        ctx.warn(e);
    }
    Err(anyhow!("the listing is incomplete: {}", errors.join("; ")).into())
}

async fn info(ctx: &mut Ctx<'_, '_>, provider: &str) -> Result<(), Failure> {
    let data = admin::provider_data(&ctx.store, provider).await?;
    let state = ctx.store.image_state().await?;
    let mut images = Listing::new(listing::INFO_IMAGE_COLUMNS);
    for ((image, build), ids) in data.uploads_by_build(provider, &state) {
        images
            .rows
            .push(vec![Cell::Text(image), Cell::Text(build), Cell::List(ids)]);
    }
    let mut node_rows = Listing::new(listing::INFO_NODE_COLUMNS);
    for (id, server) in data.nodes {
        node_rows
            .rows
            .push(vec![Cell::Text(id), Cell::opt(server.as_deref())]);
    }
    if ctx.json {
        let doc = serde_json::json!({
            "provider": provider,
            "images": images,
            "nodes": node_rows,
        });
        ctx.say(&doc.to_string());
    } else {
        let now = epoch_now();
        let text = format!(
            "State store data for provider {provider}\n\nImage data:\n{}\n\nNodes:\n{}",
            images.to_table(None, now),
            node_rows.to_table(None, now)
        );
        ctx.say(&text);
    }
    Ok(())
}

fn explain(ctx: &mut Ctx<'_, '_>, x: &RequestExplanation) {
    let text = if ctx.json {
        x.to_json().to_string()
    } else {
        x.to_text()
    };
    ctx.say(&text);
}

fn write_private(path: &Path, data: &[u8]) -> anyhow::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    f.write_all(data)
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// `request LABEL...`: a request as Zuul makes it, through the requestor
/// library.
async fn request(
    ctx: &mut Ctx<'_, '_>,
    labels: &[String],
    provider: Option<String>,
    timeout: Duration,
    return_nodes: bool,
) -> Result<(), Failure> {
    let system_id = format!("nodepool-cli@{}", crate::daemon::hostname());
    let requestor = Requestor::new(ctx.store.clone(), system_id);
    let mut new = NewRequest::new(labels.to_vec());
    new.provider = provider;
    let id = requestor.submit(&new).await?;
    let _ = writeln!(
        ctx.io.err,
        "request {id} for {} submitted; waiting",
        labels.join(",")
    );
    let outcome = tokio::select! {
        r = requestor.wait(&id, timeout) => r,
        _ = tokio::signal::ctrl_c() => {
            let _ = requestor.cancel(&id).await;
            return Err(anyhow!("interrupted; request {id} withdrawn").into());
        }
    };
    let request = match outcome {
        Ok(Outcome::Fulfilled(v)) => v.value,
        Ok(Outcome::Failed(v)) => {
            let _ = requestor.cancel(&id).await;
            return Err(anyhow!(
                "request {id} failed (declined by {})",
                if v.value.declined_by.is_empty() {
                    "every launcher".to_owned()
                } else {
                    v.value.declined_by.join(", ")
                }
            )
            .into());
        }
        Err(e) => {
            let _ = requestor.cancel(&id).await;
            return Err(anyhow!("{e}; request withdrawn").into());
        }
    };
    let mut set = requestor.accept(&id, &request).await?;
    let ids: Vec<String> = set.nodes.iter().map(|n| n.id.clone()).collect();
    let all = Source::Nodes { node_id: None }
        .fetch(&ctx.store, epoch_now())
        .await?;
    let mut mine = Listing::new(all.columns);
    mine.rows = all
        .rows
        .into_iter()
        .filter(|r| matches!(&r[0], Cell::Text(id) if ids.contains(id)))
        .collect();
    ctx.print(&mine, Some(listing::NODE_BRIEF_FIELDS));
    if return_nodes {
        requestor.use_nodes(&mut set, "nodepool-cli").await?;
        requestor.return_nodes(set).await?;
        let _ = writeln!(
            ctx.io.err,
            "returned {}; waiting for the launcher to delete them",
            ids.join(",")
        );
        let deadline = tokio::time::Instant::now() + timeout;
        for node in &ids {
            loop {
                if ctx.store.get_node(node).await?.is_none() {
                    let _ = writeln!(ctx.io.err, "node {node} deleted");
                    break;
                }
                if tokio::time::Instant::now() >= deadline {
                    return Err(anyhow!(
                        "node {node} was returned but not deleted within {timeout:?}"
                    )
                    .into());
                }
                // The launcher deletes within a pass or two; a short poll
                // of the record keeps this simple on every store.
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    } else {
        for mut n in set.nodes {
            n.node.set_state(NodeState::Hold, epoch_now());
            n.node.comment = Some("requested with `nodepool request`".into());
            if n.lock.is_held() {
                ctx.store.store_node(&n.id, &n.node).await?;
            }
            let _ = n.lock.release().await;
        }
        let _ = writeln!(
            ctx.io.err,
            "holding {} for you; `nodepool delete <id>` when done",
            ids.join(",")
        );
    }
    Ok(())
}

/// `--timeout`, or the builder's own limit for the job plus a margin.
fn wait_limit(
    wait: &crate::cli::WaitArgs,
    builder_limit: impl FnOnce() -> Option<Duration>,
) -> Duration {
    match wait.timeout {
        Some(s) => Duration::from_secs(s),
        None => {
            crate::wait::default_timeout(builder_limit().unwrap_or(Duration::from_secs(8 * 3600)))
        }
    }
}
