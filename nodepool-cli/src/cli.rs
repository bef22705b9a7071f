//! What the binaries accept: the clap definitions of the `nodepool`
//! command ([`Cli`], one [`Command`] variant per subcommand) and of the
//! flags both daemons take ([`DaemonArgs`]).
//!
//! Definitions only: [`crate::admin`] carries the `nodepool` commands out,
//! the daemons' `main`s theirs. Help texts are the doc comments here.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::daemon::LogFormat;

/// Default configuration file, as Nodepool's.
pub const DEFAULT_CONFIG: &str = "/etc/nodepool/nodepool.yaml";

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

/// `--yes`/`--force` on a command that does not ask (as Python Nodepool's
/// does not): accepted and ignored, so scripts written for versions that
/// asked keep working.
#[derive(Debug, Clone, Copy, Args)]
pub struct NeverAsks {
    /// Accepted for compatibility; the command does not ask.
    #[arg(short = 'y', long = "yes", alias = "force", hide = true)]
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
    RequestList {
        /// Also say why each waiting request waits (as `request-explain`
        /// does, one line per request; asks the clouds for their quota).
        #[arg(long)]
        detail: bool,
    },
    /// List the labels that some running launcher pool can serve.
    LabelList {
        /// Instead, every configured label with its min-ready, its ready
        /// nodes and why it is short of min-ready (asks the clouds).
        #[arg(long)]
        detail: bool,
    },
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
        /// Whether and how long to follow the request.
        #[command(flatten)]
        wait: WaitArgs,
    },
    /// Ask the builder for a new snapshot of a provider's snapshot image now.
    ImageUpdate {
        /// Provider name.
        provider: String,
        /// Snapshot image name (one of the provider's `images`).
        image: String,
        /// Whether and how long to follow the request.
        #[command(flatten)]
        wait: WaitArgs,
    },
    /// Ask the builder to upload the newest ready build of an image to a provider now.
    ImageUpload {
        /// Provider name.
        provider: String,
        /// Diskimage name.
        image: String,
        /// Whether and how long to follow the request.
        #[command(flatten)]
        wait: WaitArgs,
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
        /// Accepted for compatibility.
        #[command(flatten)]
        yes: NeverAsks,
    },
    /// Delete a diskimage build from disk along with all its cloud uploads.
    DibImageDelete {
        /// `<image>-<build id>`, as `dib-image-list` shows it.
        id: String,
        /// Accepted for compatibility.
        #[command(flatten)]
        yes: NeverAsks,
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
        /// Accepted for compatibility.
        #[command(flatten)]
        yes: NeverAsks,
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
    /// Say why a request waits: one line per pool, from the planner's own
    /// rules (label not served, image not ready, quota full and by how
    /// much, max-concurrency, declined, unavailable, ...).
    RequestExplain {
        /// Request id, as `request-list` shows it.
        id: String,
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
        /// Accepted for compatibility.
        #[command(flatten)]
        yes: NeverAsks,
    },
    /// Hold up to N failed nodes of a Jenkins job instead of deleting them.
    JobCreate(JobCreate),
    /// List job hold rules and the nodes held for each.
    JobList,
    /// Stop holding failed nodes of a Jenkins job.
    JobDelete(JobDelete),
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
    /// Rewrite a legacy (pre-Zuul v3) nodepool.yaml into today's form.
    ///
    /// Credentials go into a generated clouds.yaml (one cloud per
    /// provider); what cannot be carried over is reported on stderr with
    /// the reason. Never overwrites a file unless --force is given.
    ConfigMigrate(ConfigMigrate),
    /// Print a shell completion script.
    Completions {
        /// Shell.
        shell: clap_complete::Shell,
    },
}

/// `nodepool job-create` arguments.
#[derive(Clone, Debug, PartialEq, Eq, clap::Args)]
pub struct JobCreate {
    /// Jenkins job name (`folder/job` for jobs in folders).
    pub job: String,
    /// How many failed nodes of the job to keep held at once.
    #[arg(long = "hold", visible_alias = "hold-on-failure", value_name = "N")]
    pub hold: u32,
}

/// `nodepool config-migrate` arguments.
#[derive(Clone, Debug, PartialEq, Eq, clap::Args)]
pub struct ConfigMigrate {
    /// The legacy nodepool.yaml.
    pub old: PathBuf,
    /// Where to write the new nodepool.yaml (default: stdout).
    #[arg(short = 'o', long = "output")]
    pub output: Option<PathBuf>,
    /// Where to write the generated clouds.yaml (default: `clouds.yaml`
    /// beside --output, or in the current directory).
    #[arg(long = "clouds-output")]
    pub clouds_output: Option<PathBuf>,
    /// Overwrite existing output files.
    #[arg(long)]
    pub force: bool,
}

/// `nodepool job-delete` arguments.
#[derive(Clone, Debug, PartialEq, Eq, clap::Args)]
pub struct JobDelete {
    /// Jenkins job name.
    pub job: String,
}

/// The flags `nodepool-launcher` and `nodepool-builder` share (flattened
/// into each daemon's own arguments).
///
/// The explicit display orders keep `--help` as it was before the flags
/// were shared: each daemon's own flags (display order 2 to 9) come
/// between `--secure` and `--pidfile`.
#[derive(Clone, Debug, Args)]
pub struct DaemonArgs {
    /// Configuration file.
    #[arg(short = 'c', long = "config", default_value = DEFAULT_CONFIG, display_order = 0)]
    pub config: PathBuf,
    /// Secure configuration file.
    #[arg(short = 's', long = "secure", display_order = 1)]
    pub secure: Option<PathBuf>,
    /// Write the process id here.
    #[arg(short = 'p', long = "pidfile", display_order = 10)]
    pub pidfile: Option<PathBuf>,
    /// Log format.
    #[arg(
        long = "log-format",
        value_enum,
        default_value = "text",
        display_order = 11
    )]
    pub log_format: LogFormat,
    /// Debug logging.
    #[arg(short = 'd', long = "debug", display_order = 12)]
    pub debug: bool,
    /// Stay in the foreground (always the case; accepted for compatibility).
    #[arg(short = 'f', long = "foreground", display_order = 13)]
    pub foreground: bool,
}

/// `--wait` and `--timeout` of `image-build` and `image-upload`.
#[derive(Args, Debug, Clone, PartialEq)]
pub struct WaitArgs {
    /// Follow the build (or upload) the builder makes for this request
    /// until it is ready (exit 0) or failed (exit 1 with the reason),
    /// showing its progress on stderr.
    #[arg(long)]
    pub wait: bool,
    /// With --wait: give up after this many seconds (the work goes on).
    /// Default: the diskimage's build-timeout (the provider's
    /// image-upload-timeout for an upload, the snapshot image's
    /// setup-timeout for image-update) plus 5 minutes.
    #[arg(long, value_name = "SECONDS", requires = "wait")]
    pub timeout: Option<u64>,
}
