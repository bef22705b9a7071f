//! The `nodepool` admin command: every subcommand of Python Nodepool's
//! (reference §6.2) plus `alien-list`, `image-upload`, `label-list`,
//! `request` and `completions`.
//!
//! Each subcommand is one variant of [`Command`] and one arm of
//! [`execute`]; add a subcommand by adding both. Listings go through
//! [`crate::listing`], which the web app shares. Commands that need a
//! cloud get it from a [`ProviderFactory`], so tests can run them
//! in-process against a simulated cloud that outlives the command.
//!
//! Exit status: 0 on success; 1 with one `error: ...` line on stderr
//! otherwise (configuration errors list every problem, as
//! `config-validate` does). Confirmation prompts go to stderr, so stdout
//! stays a clean table or JSON document.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use clap::{Args, CommandFactory, Parser, Subcommand};
use nodepool_core::config::{Config, ConfigSource, StateStoreConfig};
use nodepool_core::launcher::{ProviderFactory, delete_locked_node};
use nodepool_core::model::{
    BuildState, ImageBuild, ImageUpload, NodeState, UploadState, WireRecord, epoch_now,
};
use nodepool_core::provider::{IMAGE_BUILD_ID, IMAGE_PROVIDER, Provider};
use nodepool_core::store::paths::{self, ImagePath, classify_image_path};
use nodepool_core::store::{CreateMode, LockWait, Store, StoreError};
use nodepool_requestor::{NewRequest, Outcome, Requestor};

use crate::listing::{self, Cell, Listing, Source};

/// Default configuration file, as Nodepool's.
pub const DEFAULT_CONFIG: &str = "/etc/nodepool/nodepool.yaml";

/// How long `delete` and `hold` wait for a node's lock (Nodepool: 5 s).
pub const NODE_LOCK_TIMEOUT: Duration = Duration::from_secs(5);

/// How long `delete --now` lets the cloud take to delete a server
/// (the launcher's default delete timeout).
pub const DELETE_TIMEOUT: Duration = Duration::from_secs(600);

/// How long one cloud listing may take before the command gives up on it.
pub const CLOUD_CALL_TIMEOUT: Duration = Duration::from_secs(120);

/// Inspect and steer a Nodepool installation: nodes, requests, images.
///
/// Reads the same configuration as the daemons and talks to the state
/// store it names (ZooKeeper or the SQLite file); works while the
/// launcher and builder run.
#[derive(Debug, Parser)]
#[command(name = "nodepool", version, about, arg_required_else_help = true)]
pub struct Cli {
    /// Configuration file.
    #[arg(short = 'c', long = "config", global = true, default_value = DEFAULT_CONFIG)]
    pub config: PathBuf,
    /// Secure configuration file (ZooKeeper servers and TLS, secret diskimage env-vars).
    #[arg(short = 's', long = "secure", global = true)]
    pub secure: Option<PathBuf>,
    /// Log debug messages to stderr.
    #[arg(long, global = true)]
    pub debug: bool,
    /// Print listings as JSON (the web app's keys) instead of tables.
    #[arg(long, global = true)]
    pub json: bool,
    /// Seconds to wait for the state store before giving up.
    #[arg(long = "connect-timeout", global = true, default_value_t = 10.0)]
    pub connect_timeout: f64,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Skips the confirmation prompt.
#[derive(Debug, Clone, Copy, Args)]
pub struct Confirm {
    /// Do not ask for confirmation.
    #[arg(short = 'y', long = "yes", visible_alias = "force")]
    pub yes: bool,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// List nodes: ID, Provider, Label, Server ID, addresses, State, Age, Locked.
    List {
        /// Also show pool, hostname, private IP, AZ, username, port,
        /// launcher, allocation, hold job, comment, user and driver data.
        #[arg(long)]
        detail: bool,
    },
    /// List node requests.
    RequestList,
    /// List the labels that some running launcher pool can serve.
    LabelList,
    /// List image uploads in providers.
    ImageList,
    /// List images built with diskimage-builder.
    DibImageList,
    /// Show per image whether it is paused and whether a build was requested.
    ImageStatus,
    /// Ask the builder to build an image now.
    ImageBuild {
        /// Diskimage name.
        image: String,
    },
    /// Ask the builder to upload the newest ready build of an image to a provider now.
    ImageUpload {
        /// Provider name.
        provider: String,
        /// Diskimage name.
        image: String,
    },
    /// Delete an image upload (the builder removes it from the cloud).
    ImageDelete {
        /// Provider name.
        #[arg(long)]
        provider: String,
        /// Diskimage name.
        #[arg(long)]
        image: String,
        /// Build id.
        #[arg(long = "build-id")]
        build_id: String,
        /// Upload id.
        #[arg(long = "upload-id")]
        upload_id: String,
        /// Skips the confirmation prompt.
        #[command(flatten)]
        confirm: Confirm,
    },
    /// Delete a diskimage build from disk along with all its cloud uploads.
    DibImageDelete {
        /// `<image>-<build id>`, as `dib-image-list` shows it.
        id: String,
        /// Skips the confirmation prompt.
        #[command(flatten)]
        confirm: Confirm,
    },
    /// Pause builds of an image.
    ImagePause {
        /// Diskimage name.
        image: String,
    },
    /// Resume builds of a paused image.
    ImageUnpause {
        /// Diskimage name.
        image: String,
    },
    /// List servers in providers that are tagged for Nodepool but unknown to it.
    AlienList {
        /// Only this provider.
        provider: Option<String>,
    },
    /// List images in providers that Nodepool uploaded but no longer knows.
    AlienImageList {
        /// Only this provider.
        provider: Option<String>,
    },
    /// Delete a node: mark it for deletion, or delete it now with --now.
    Delete {
        /// Node id.
        id: String,
        /// Delete the server and the record in the foreground.
        #[arg(long)]
        now: bool,
        /// Skips the confirmation prompt.
        #[command(flatten)]
        confirm: Confirm,
    },
    /// Hold a node: keep it (e.g. to investigate) until deleted or max-hold-age.
    Hold {
        /// Node id.
        id: String,
        /// Why it is held (shown in `list --detail`).
        #[arg(long)]
        reason: Option<String>,
    },
    /// Request nodes as Zuul would, wait for them and print them.
    ///
    /// The nodes are then held (state `hold`) until `nodepool delete`,
    /// unless --return gives them back at once (the launcher deletes them).
    Request {
        /// Labels, one node each.
        #[arg(required = true)]
        labels: Vec<String>,
        /// Prefer this provider.
        #[arg(long)]
        provider: Option<String>,
        /// Seconds to wait for the request (and, with --return, the deletion).
        #[arg(long, default_value_t = 300.0)]
        timeout: f64,
        /// Use and return the nodes at once, and wait until they are deleted.
        #[arg(long = "return")]
        return_nodes: bool,
    },
    /// Show the state store's data for a provider: its uploads and nodes.
    Info {
        /// Provider name.
        provider: String,
    },
    /// Erase a provider's data from the state store (uploads and nodes).
    Erase {
        /// Provider name.
        provider: String,
        /// Skips the confirmation prompt.
        #[command(flatten)]
        confirm: Confirm,
    },
    /// Export image build and upload records to a file (JSON, mode 0600).
    ExportImageData {
        /// File to write.
        path: PathBuf,
    },
    /// Import image build and upload records from an export.
    ImportImageData {
        /// File to read.
        path: PathBuf,
        /// Skips the confirmation prompt.
        #[command(flatten)]
        confirm: Confirm,
    },
    /// Hold up to N failed nodes of a Jenkins job instead of deleting them.
    JobCreate(crate::jobs::JobCreate),
    /// List job hold rules and the nodes held for each.
    JobList,
    /// Stop holding failed nodes of a Jenkins job.
    JobDelete(crate::jobs::JobDelete),
    /// Check the configuration file (and secure file) and report every problem.
    ///
    /// Also loads the clouds.yaml entry of every OpenStack provider the way
    /// the launcher does (OS_CLIENT_CONFIG_FILE, ./, ~/.config/openstack,
    /// /etc/openstack; secure.yaml merged; OS_CLOUD) and checks it.
    ConfigValidate {
        /// Skip the clouds.yaml checks (e.g. to check a configuration
        /// repository where no cloud credentials are).
        #[arg(long = "no-clouds")]
        no_clouds: bool,
    },
    /// Print a shell completion script.
    Completions {
        /// Shell.
        shell: clap_complete::Shell,
    },
}

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
    };
    let providers: ProviderFactory = Arc::new(crate::daemon::make_provider);
    runtime.block_on(run_with(cli, providers, &mut io))
}

/// Runs the CLI with these clouds and streams; returns the exit code.
pub async fn run_with(cli: Cli, providers: ProviderFactory, io: &mut Io<'_>) -> ExitCode {
    let result = match &cli.command {
        Command::ConfigValidate { no_clouds } => config_validate(&cli, *no_clouds, io),
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

    fn say(&mut self, line: &str) {
        let _ = writeln!(self.io.out, "{line}");
    }

    fn warn(&mut self, line: &str) {
        let _ = writeln!(self.io.err, "warning: {line}");
    }

    /// Asks `question [N/y]` on stderr unless `--yes`; anything but `y`
    /// (or end of input) aborts.
    fn confirm(&mut self, confirm: Confirm, question: &str) -> Result<(), Failure> {
        if confirm.yes {
            return Ok(());
        }
        let _ = write!(self.io.err, "{question} [N/y] ");
        let _ = self.io.err.flush();
        let mut answer = String::new();
        self.io
            .input
            .read_line(&mut answer)
            .context("reading the answer")?;
        if !self.io.interactive {
            // Nobody typed it, so echo it: the prompt then reads as a log.
            let _ = writeln!(self.io.err, "{}", answer.trim());
        }
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
            ctx.print(&l, fields);
        }
        Command::RequestList => listing_of(ctx, Source::Requests).await?,
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
        Command::LabelList => listing_of(ctx, Source::Labels).await?,
        Command::ImageList => listing_of(ctx, Source::Images).await?,
        Command::DibImageList => listing_of(ctx, Source::DibImages).await?,
        Command::ImageStatus => listing_of(ctx, Source::ImageStatus).await?,
        Command::ImageBuild { image } => {
            let Some(d) = ctx.config.diskimage(image) else {
                return Err(anyhow!("unknown diskimage {image:?}: not in the configuration's diskimages (only diskimages can be built)").into());
            };
            if d.pause {
                return Err(anyhow!(
                    "diskimage {image} is paused in the configuration; not requesting a build"
                )
                .into());
            }
            ctx.store.request_image_build(image).await?;
            ctx.say(&format!("build of {image} requested"));
        }
        Command::ImageUpload { provider, image } => {
            let build = request_image_upload(&ctx.config, &ctx.store, provider, image).await?;
            ctx.say(&format!(
                "upload of {image} build {build} to {provider} requested"
            ));
        }
        Command::ImageDelete {
            provider,
            image,
            build_id,
            upload_id,
            confirm,
        } => {
            let what = format!("upload {upload_id} of {image} build {build_id} to {provider}");
            let Some(v) = ctx
                .store
                .get_upload(image, build_id, provider, upload_id)
                .await?
            else {
                return Err(anyhow!("image {what} not found").into());
            };
            if v.value.state == UploadState::Uploading {
                return Err(
                    anyhow!("cannot delete image {what}: the upload is in progress").into(),
                );
            }
            ctx.confirm(*confirm, &format!("Delete image {what}?"))?;
            let mut upload = v.value;
            upload.set_state(UploadState::Deleting, epoch_now());
            ctx.store
                .update_upload(
                    image,
                    build_id,
                    provider,
                    upload_id,
                    &upload,
                    Some(v.version),
                )
                .await
                .with_context(|| format!("marking image {what} for deletion"))?;
            ctx.say(&format!("image {what} marked for deletion"));
        }
        Command::DibImageDelete { id, confirm } => {
            let Some((image, build_id)) = id.rsplit_once('-') else {
                return Err(anyhow!(
                    "{id:?} is not a dib image id (<image>-<build id>, as dib-image-list shows)"
                )
                .into());
            };
            let Some(v) = ctx.store.get_build(image, build_id).await? else {
                return Err(anyhow!("build {id} not found").into());
            };
            if v.value.state == BuildState::Building {
                return Err(anyhow!("cannot delete build {id}: it is still building").into());
            }
            ctx.confirm(
                *confirm,
                &format!("Delete build {id} and all its cloud uploads?"),
            )?;
            let mut build = v.value;
            build.set_state(BuildState::Deleting, epoch_now());
            ctx.store
                .update_build(image, build_id, &build, Some(v.version))
                .await
                .with_context(|| format!("marking build {id} for deletion"))?;
            ctx.say(&format!("build {id} marked for deletion"));
        }
        Command::ImagePause { image } | Command::ImageUnpause { image } => {
            let pause = matches!(command, Command::ImagePause { .. });
            known_image(ctx, image).await?;
            ctx.store.set_image_paused(image, pause).await?;
            ctx.say(&format!(
                "image {image} {}",
                if pause { "paused" } else { "unpaused" }
            ));
        }
        Command::AlienList { provider } => {
            let (l, errors) =
                alien_list(&ctx.config, &ctx.store, &ctx.providers, provider.as_deref()).await?;
            ctx.print(&l, None);
            report_partial(ctx, errors)?;
        }
        Command::AlienImageList { provider } => {
            let (l, errors) =
                alien_image_list(&ctx.config, &ctx.store, &ctx.providers, provider.as_deref())
                    .await?;
            ctx.print(&l, None);
            report_partial(ctx, errors)?;
        }
        Command::Delete { id, now, confirm } => {
            let Some(v) = ctx.store.get_node(id).await? else {
                return Err(anyhow!("node {id} not found").into());
            };
            let n = &v.value;
            ctx.confirm(
                *confirm,
                &format!(
                    "Delete node {id} ({}, {}, {}){}?",
                    n.provider,
                    n.node_type.join(","),
                    n.state,
                    if *now { " now" } else { "" }
                ),
            )?;
            delete_node(&ctx.config, &ctx.store, &ctx.providers, id, *now).await?;
            ctx.show_node(id).await?;
        }
        Command::Hold { id, reason } => {
            hold_node(&ctx.store, id, reason.as_deref()).await?;
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
        Command::Erase { provider, confirm } => {
            let (builds, nodes) = provider_data(&ctx.store, provider).await?;
            let _ = writeln!(ctx.io.err, "WARNING! This action is not reversible!");
            ctx.confirm(
                *confirm,
                &format!(
                    "Erase {} data for provider {provider} ({} upload directories, {} nodes)?",
                    ctx.store.describe(),
                    builds.len(),
                    nodes.len()
                ),
            )?;
            ctx.say(&format!("Erasing build data for {provider}..."));
            for dir in &builds {
                ctx.store
                    .backend()
                    .delete_tree(dir)
                    .await
                    .with_context(|| format!("erasing {dir}"))?;
            }
            ctx.say(&format!("Erasing node data for {provider}..."));
            for (id, _) in &nodes {
                ctx.store
                    .delete_node(id)
                    .await
                    .with_context(|| format!("erasing node {id}"))?;
            }
        }
        Command::ExportImageData { path } => {
            let data = export_image_data(&ctx.store).await?;
            write_private(path, &serde_json::to_vec(&data)?)?;
            ctx.say(&format!(
                "exported {} records to {}",
                data.len(),
                path.display()
            ));
        }
        Command::ImportImageData { path, confirm } => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            let data: BTreeMap<String, String> = serde_json::from_str(&text)
                .with_context(|| format!("{}: not an image data export", path.display()))?;
            check_import(&data).with_context(|| format!("{}", path.display()))?;
            ctx.confirm(
                *confirm,
                &format!(
                    "Import {} image records into {} (existing records at the same paths are overwritten)?",
                    data.len(),
                    ctx.store.describe()
                ),
            )?;
            import_image_data(&ctx.store, &data).await?;
            ctx.say(&format!(
                "imported {} records from {}",
                data.len(),
                path.display()
            ));
        }
        Command::ConfigValidate { .. } | Command::Completions { .. } => {}
    }
    Ok(())
}

async fn listing_of(ctx: &mut Ctx<'_, '_>, source: Source) -> Result<(), Failure> {
    let l = source.fetch(&ctx.store, epoch_now()).await?;
    ctx.print(&l, None);
    Ok(())
}

fn report_partial(ctx: &mut Ctx<'_, '_>, errors: Vec<String>) -> Result<(), Failure> {
    if errors.is_empty() {
        return Ok(());
    }
    for e in &errors {
        ctx.warn(e);
    }
    Err(anyhow!("the listing is incomplete: {}", errors.join("; ")).into())
}

/// An image name `image-pause` accepts: a configured diskimage, or one the
/// store has records of (an image removed from the configuration).
async fn known_image(ctx: &Ctx<'_, '_>, image: &str) -> anyhow::Result<()> {
    if ctx.config.diskimage(image).is_some() {
        return Ok(());
    }
    if ctx.store.image_state().await?.images.contains(image) {
        return Ok(());
    }
    bail!("unknown image {image:?}: not a configured diskimage and not in the state store")
}

/// `image-upload PROVIDER IMAGE`: checks that the provider takes the image
/// and that a ready build exists, then records an upload request (an
/// empty record at `/nodepool/images/<image>/upload-requests/<provider>`,
/// see [`paths::image_upload_request`]) that the builder serves with a
/// fresh upload of the newest ready build. Returns that build's id.
pub async fn request_image_upload(
    config: &Config,
    store: &Store,
    provider: &str,
    image: &str,
) -> anyhow::Result<String> {
    let Some(pc) = config.provider(provider) else {
        bail!("unknown provider {provider:?}");
    };
    let Some(pd) = pc.diskimage(image) else {
        bail!("provider {provider} does not take diskimage {image:?} (not in its diskimages)");
    };
    if pd.pause {
        bail!("diskimage {image} is paused for provider {provider} in the configuration");
    }
    let images = store.image_state().await?;
    let newest = images
        .builds
        .iter()
        .filter(|b| b.image == image && b.build.state == BuildState::Ready)
        .max_by(|a, b| a.build.state_time.total_cmp(&b.build.state_time));
    let Some(build) = newest else {
        bail!(
            "diskimage {image} has no ready build to upload (`nodepool image-build {image}` asks for one)"
        );
    };
    store.request_image_upload(image, provider).await?;
    Ok(build.id.clone())
}

/// `delete ID [--now]`: locks the node (5 s) and either marks it
/// `deleting` for the launcher, or deletes its server and record now the
/// way the launcher does ([`delete_locked_node`]).
pub async fn delete_node(
    config: &Config,
    store: &Store,
    providers: &ProviderFactory,
    id: &str,
    now: bool,
) -> anyhow::Result<()> {
    let guard = lock_node(store, id).await?;
    let result = async {
        let Some(v) = store.get_node(id).await? else {
            bail!("node {id} not found");
        };
        if now {
            let provider: Option<Arc<dyn Provider>> = match config.provider(&v.value.provider) {
                Some(pc) => Some(providers(pc).map_err(|e| {
                    anyhow!("provider {} of node {id}: {e}", v.value.provider)
                })?),
                None => None,
            };
            if provider.is_none() && v.value.external_id.is_some() {
                bail!(
                    "provider {} of node {id} is not in the configuration; cannot delete its server",
                    v.value.provider
                );
            }
            delete_locked_node(
                store,
                provider.as_deref(),
                id,
                &guard,
                DELETE_TIMEOUT,
                &epoch_now,
            )
            .await
            .map_err(|e| anyhow!("deleting node {id}: {e}"))?;
            return Ok(true);
        }
        let mut node = v.value;
        node.set_state(NodeState::Deleting, epoch_now());
        store
            .update_node(id, &node, v.version)
            .await
            .with_context(|| format!("marking node {id} deleting"))?;
        Ok(false)
    }
    .await;
    match result {
        // The lock directory went with the record.
        Ok(true) => guard.forget(),
        Ok(false) | Err(_) => {
            let _ = guard.release().await;
        }
    }
    result.map(|_| ())
}

/// `hold ID`: locks the node (5 s) and sets it `hold` (with the reason as
/// its comment, when given).
pub async fn hold_node(store: &Store, id: &str, reason: Option<&str>) -> anyhow::Result<()> {
    let guard = lock_node(store, id).await?;
    let result = async {
        let Some(v) = store.get_node(id).await? else {
            bail!("node {id} not found");
        };
        if matches!(v.value.state, NodeState::Deleting | NodeState::Deleted) {
            bail!("node {id} is {}; it cannot be held", v.value.state);
        }
        let mut node = v.value;
        node.set_state(NodeState::Hold, epoch_now());
        if let Some(r) = reason {
            node.comment = Some(r.to_owned());
        }
        store
            .update_node(id, &node, v.version)
            .await
            .with_context(|| format!("holding node {id}"))?;
        Ok(())
    }
    .await;
    let _ = guard.release().await;
    result
}

async fn lock_node(store: &Store, id: &str) -> anyhow::Result<nodepool_core::store::LockGuard> {
    if store.get_node(id).await?.is_none() {
        bail!("node {id} not found");
    }
    store
        .lock_node(id, LockWait::Timeout(NODE_LOCK_TIMEOUT))
        .await
        .map_err(|e| match e {
            StoreError::Timeout { .. } => anyhow!(
                "node {id} is locked by someone else (a launcher or Zuul); gave up after {} s",
                NODE_LOCK_TIMEOUT.as_secs()
            ),
            other => anyhow!("locking node {id}: {other}"),
        })
}

async fn cloud<T>(
    what: String,
    f: impl std::future::Future<Output = Result<T, nodepool_core::provider::ProviderError>>,
) -> Result<T, String> {
    match tokio::time::timeout(CLOUD_CALL_TIMEOUT, f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(format!("{what}: {e}")),
        Err(_) => Err(format!("{what}: no answer within {CLOUD_CALL_TIMEOUT:?}")),
    }
}

fn providers_of<'c>(
    config: &'c Config,
    only: Option<&str>,
) -> anyhow::Result<Vec<&'c nodepool_core::config::ProviderConfig>> {
    if let Some(p) = only
        && config.provider(p).is_none()
    {
        bail!("unknown provider {p:?}");
    }
    Ok(config
        .providers
        .iter()
        .filter(|p| only.is_none_or(|o| o == p.name))
        .collect())
}

/// `alien-list`: servers tagged for one of our providers (its name in
/// `nodepool_provider_name`) that the store does not know: no node with
/// their node id, or a node that has moved on to another server — the
/// launcher's leak rule, without its two-pass wait. Returns the listing
/// and the providers that could not be listed.
pub async fn alien_list(
    config: &Config,
    store: &Store,
    providers: &ProviderFactory,
    only: Option<&str>,
) -> anyhow::Result<(Listing, Vec<String>)> {
    let wanted = providers_of(config, only)?;
    let nodes = store.list_nodes().await?.records;
    let mut l = Listing::new(listing::ALIEN_COLUMNS);
    let mut errors = Vec::new();
    for pc in wanted {
        let instances = match providers(pc) {
            Ok(p) => {
                cloud(
                    format!("listing servers of {}", pc.name),
                    p.list_instances(),
                )
                .await
            }
            Err(e) => Err(format!("provider {}: {e}", pc.name)),
        };
        let instances = match instances {
            Ok(i) => i,
            Err(e) => {
                errors.push(e);
                continue;
            }
        };
        for inst in instances {
            if inst.provider_name().as_deref() != Some(pc.name.as_str()) {
                continue;
            }
            let known = inst.node_id().is_some_and(|id| {
                nodes.iter().any(|r| {
                    r.id == id
                        && r.node.provider == pc.name
                        && (r.node.external_id.is_none()
                            || r.node.external_id.as_deref() == Some(inst.external_id.as_str())
                            || matches!(r.node.state, NodeState::Init | NodeState::Building))
                })
            });
            if known {
                continue;
            }
            let ip = inst.public_ipv4.clone().or(inst.interface_ip.clone());
            l.rows.push(vec![
                Cell::Text(pc.name.clone()),
                Cell::Text(inst.name.clone()),
                Cell::Text(inst.external_id.clone()),
                Cell::opt(ip.as_deref()),
            ]);
        }
    }
    Ok((l, errors))
}

/// `alien-image-list`: images in a provider's cloud carrying
/// `nodepool_build_id` with no `ready` upload of that provider in the
/// store (Nodepool's rule). Images tagged with another provider's name
/// (`nodepool_provider_name`) are that provider's business and skipped,
/// so two providers on one cloud project do not list each other's.
pub async fn alien_image_list(
    config: &Config,
    store: &Store,
    providers: &ProviderFactory,
    only: Option<&str>,
) -> anyhow::Result<(Listing, Vec<String>)> {
    let wanted = providers_of(config, only)?;
    let state = store.image_state().await?;
    let mut l = Listing::new(listing::ALIEN_IMAGE_COLUMNS);
    let mut errors = Vec::new();
    for pc in wanted {
        let images = match providers(pc) {
            Ok(p) => cloud(format!("listing images of {}", pc.name), p.list_images()).await,
            Err(e) => Err(format!("provider {}: {e}", pc.name)),
        };
        let images = match images {
            Ok(i) => i,
            Err(e) => {
                errors.push(e);
                continue;
            }
        };
        let known: BTreeSet<&str> = state
            .uploads
            .iter()
            .filter(|u| {
                u.provider == pc.name
                    && u.upload.state == UploadState::Ready
                    && pc.diskimage(&u.image).is_some()
            })
            .filter_map(|u| u.upload.external_id.as_deref())
            .collect();
        for img in images {
            if !img.properties.contains_key(IMAGE_BUILD_ID) || known.contains(img.id.as_str()) {
                continue;
            }
            if img
                .properties
                .get(IMAGE_PROVIDER)
                .is_some_and(|p| *p != pc.name)
            {
                continue;
            }
            l.rows.push(vec![
                Cell::Text(pc.name.clone()),
                Cell::Text(img.name.clone()),
                Cell::Text(img.id.clone()),
            ]);
        }
    }
    Ok((l, errors))
}

/// A provider's upload directories
/// (`/nodepool/images/<i>/builds/<b>/providers/<p>`) and its nodes.
async fn provider_data(
    store: &Store,
    provider: &str,
) -> anyhow::Result<(Vec<String>, Vec<(String, Option<String>)>)> {
    let entries = match store.backend().scan(paths::IMAGES).await {
        Ok(e) => e,
        Err(e) if e.is_not_found() => Vec::new(),
        Err(e) => return Err(e.into()),
    };
    let mut dirs = Vec::new();
    for e in &entries {
        let Some(rest) = e.path.strip_prefix("/nodepool/images/") else {
            continue;
        };
        if let [_, "builds", _, "providers", p] = rest.split('/').collect::<Vec<_>>().as_slice()
            && *p == provider
        {
            dirs.push(e.path.clone());
        }
    }
    let nodes = store
        .list_nodes()
        .await?
        .records
        .into_iter()
        .filter(|r| r.node.provider == provider)
        .map(|r| (r.id, r.node.external_id.clone()))
        .collect();
    Ok((dirs, nodes))
}

async fn info(ctx: &mut Ctx<'_, '_>, provider: &str) -> Result<(), Failure> {
    let (dirs, nodes) = provider_data(&ctx.store, provider).await?;
    let state = ctx.store.image_state().await?;
    // image -> build -> upload ids; builds with a provider directory but
    // no upload are listed too, as Nodepool does.
    let mut uploads: BTreeMap<(String, String), Vec<String>> = BTreeMap::new();
    for dir in &dirs {
        let parts: Vec<&str> = dir.split('/').collect();
        if let [_, _, _, image, _, build, ..] = parts.as_slice() {
            uploads
                .entry(((*image).into(), (*build).into()))
                .or_default();
        }
    }
    for u in state.uploads.iter().filter(|u| u.provider == provider) {
        uploads
            .entry((u.image.clone(), u.build_id.clone()))
            .or_default()
            .push(u.id.clone());
    }
    let mut images = Listing::new(listing::INFO_IMAGE_COLUMNS);
    for ((image, build), mut ids) in uploads {
        ids.sort();
        images
            .rows
            .push(vec![Cell::Text(image), Cell::Text(build), Cell::List(ids)]);
    }
    let mut node_rows = Listing::new(listing::INFO_NODE_COLUMNS);
    for (id, server) in nodes {
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

/// `export-image-data`: `{path: record JSON text}` for every build,
/// upload and pause flag (`""`), as Python Nodepool exports.
pub async fn export_image_data(store: &Store) -> anyhow::Result<BTreeMap<String, String>> {
    let entries = match store.backend().scan(paths::IMAGES).await {
        Ok(e) => e,
        Err(e) if e.is_not_found() => Vec::new(),
        Err(e) => return Err(e.into()),
    };
    let mut out = BTreeMap::new();
    for e in entries {
        match classify_image_path(&e.path) {
            ImagePath::Pause(_) => {
                out.insert(e.path.clone(), String::new());
            }
            ImagePath::Build(..) | ImagePath::Upload(..) => {
                let text = String::from_utf8(e.data.to_vec())
                    .map_err(|_| anyhow!("{}: record is not UTF-8", e.path))?;
                out.insert(e.path.clone(), text);
            }
            _ => {}
        }
    }
    Ok(out)
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

/// Every path of an export must be a pause flag, a build or an upload,
/// and every record must decode, before anything is written.
fn check_import(data: &BTreeMap<String, String>) -> anyhow::Result<()> {
    for (path, text) in data {
        match classify_image_path(path) {
            ImagePath::Pause(_) => {}
            ImagePath::Build(..) => {
                ImageBuild::from_json(text.as_bytes())
                    .map_err(|e| anyhow!("{path}: not a build record: {e}"))?;
            }
            ImagePath::Upload(..) => {
                ImageUpload::from_json(text.as_bytes())
                    .map_err(|e| anyhow!("{path}: not an upload record: {e}"))?;
                let (_, seq) = nodepool_core::store::split_path(path);
                if seq.len() != 10 || !seq.bytes().all(|b| b.is_ascii_digit()) {
                    bail!("{path}: an upload id is a 10-digit sequence number");
                }
            }
            _ => bail!("{path}: not an image build, upload or pause record"),
        }
    }
    Ok(())
}

/// `import-image-data`: writes every record of an export. Upload ids are
/// sequence numbers, so first each upload directory's counter is moved
/// past the highest imported id (by creating and deleting sequential
/// children, as Nodepool does); otherwise the builder's next upload could
/// collide with an imported one.
pub async fn import_image_data(
    store: &Store,
    data: &BTreeMap<String, String>,
) -> anyhow::Result<()> {
    check_import(data)?;
    let backend = store.backend();
    let mut highest: BTreeMap<&str, i64> = BTreeMap::new();
    for path in data.keys() {
        if let ImagePath::Upload(..) = classify_image_path(path) {
            let (dir, seq) = nodepool_core::store::split_path(path);
            let n: i64 = seq.parse().unwrap_or(0);
            let h = highest.entry(dir).or_insert(n);
            *h = (*h).max(n);
        }
    }
    for (dir, top) in highest {
        // Bounded: each create advances the counter by at least one.
        for _ in 0..=top {
            let created = backend
                .create(&format!("{dir}/"), b"", CreateMode::PersistentSequential)
                .await
                .with_context(|| format!("advancing the upload counter of {dir}"))?;
            let (_, seq) = nodepool_core::store::split_path(&created);
            let n: i64 = seq.parse().unwrap_or(i64::MAX);
            if !data.contains_key(&created) {
                backend
                    .delete(&created, None)
                    .await
                    .with_context(|| format!("removing {created}"))?;
            }
            if n >= top {
                break;
            }
        }
    }
    for (path, text) in data {
        let bytes = text.as_bytes();
        match backend.create(path, bytes, CreateMode::Persistent).await {
            Ok(_) => {}
            Err(StoreError::Conflict { .. }) => {
                backend
                    .set(path, bytes, None)
                    .await
                    .with_context(|| format!("writing {path}"))?;
            }
            Err(e) => return Err(anyhow!("writing {path}: {e}")),
        }
    }
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
