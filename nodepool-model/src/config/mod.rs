//! The `nodepool.yaml` configuration.
//!
//! [`Config::load`] reads a file (with `%(NODEPOOL_x)` substitution and the
//! optional secure file), validates it completely and returns either a
//! [`Config`] or every problem found ([`ConfigErrors`]), each with its path,
//! e.g. `providers[0].pools[1].labels[2].diskimage: unknown diskimage "x"`.
//!
//! Defaults are those of Python Nodepool's code (not its docs; see the
//! reference §3.9). Layout: `yaml` (the only YAML reader), `parse` (tree to
//! types), `validate` (cross-checks), `load` (files, environment, secure
//! merge), `migrate` (legacy files rewritten, for `nodepool config-migrate`).

mod error;
mod external;
mod load;
pub mod migrate;
mod parse;
mod qemu;
pub mod reference;
mod static_nodes;
mod validate;
mod yaml;

use std::collections::BTreeSet;
use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use indexmap::IndexMap;

pub use error::{ConfigError, ConfigErrorKind, ConfigErrors};
pub use external::{DEFAULT_EXTERNAL_TIMEOUT, ExternalProgram};
pub use load::{ConfigSource, substitute_env};
pub use qemu::{Accelerator, DEFAULT_QEMU_BINARY, QemuHost, default_qemu_flavors};
pub use static_nodes::{StaticHost, StaticHosts};

use crate::model::{CORES, INSTANCES, Limits, RAM, VOLUME_GB, VOLUMES};

/// Default ZooKeeper client port in Nodepool's code (its docs say 2181).
pub const DEFAULT_ZOOKEEPER_PORT: u16 = 2281;

/// A whole, validated configuration.
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    /// ZooKeeper ensemble (empty when the SQLite store is used).
    pub zookeeper_servers: Vec<ZooKeeperServer>,
    /// TLS client settings for ZooKeeper.
    pub zookeeper_tls: Option<ZooKeeperTls>,
    /// ZooKeeper session timeout.
    pub zookeeper_timeout: Duration,
    /// Which state store to use.
    pub state_store: StateStoreConfig,
    /// Labels, in file order.
    pub labels: Vec<Label>,
    /// Providers, in file order.
    pub providers: Vec<ProviderConfig>,
    /// Diskimages after inheritance; abstract ones are not included.
    pub diskimages: Vec<DiskImage>,
    /// Hold limit for every held node; `None` = forever.
    pub max_hold_age: Option<Duration>,
    /// The launcher's web app.
    pub webapp: WebApp,
    /// diskimage-builder elements path (`ELEMENTS_PATH`).
    pub elements_dir: Option<PathBuf>,
    /// Where builds are written; required by the builder.
    pub images_dir: Option<PathBuf>,
    /// One log per build goes here.
    pub build_log_dir: PathBuf,
    /// Logs kept per image; `None` disables pruning.
    pub build_log_retention: Option<u32>,
    /// Per-tenant limits, keyed by tenant name.
    pub tenant_resource_limits: IndexMap<String, Limits>,
    /// Jenkins targets that take nodes as agents.
    pub targets: Vec<Target>,
    /// `script-dir`: where ready scripts (`ready-script`) are read from;
    /// relative to the configuration file's directory when loaded from one.
    pub script_dir: Option<PathBuf>,
    /// What loaded anyway but deserves the operator's eye, each with its
    /// place: old spellings read with their modern meaning, `%(NODEPOOL_x)`
    /// references to unset variables, an empty file. The daemons log them;
    /// `nodepool config-validate` prints them and fails on the kinds that
    /// are surely mistakes ([`ConfigErrorKind::fails_validation`]).
    pub warnings: Vec<ConfigError>,
}

/// One ZooKeeper server.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ZooKeeperServer {
    /// Host name or address.
    pub host: String,
    /// Client port (default 2281).
    pub port: u16,
    /// Chroot appended to the connect string.
    pub chroot: Option<String>,
}

/// ZooKeeper TLS client files (PEM).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ZooKeeperTls {
    /// Client certificate.
    pub cert: PathBuf,
    /// Client key.
    pub key: PathBuf,
    /// CA bundle.
    pub ca: PathBuf,
}

/// Which `StateStore` backs this installation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StateStoreConfig {
    /// ZooKeeper, from `zookeeper-servers`: the distributed, Zuul-compatible store.
    ZooKeeper,
    /// An embedded SQLite database file: the single-machine default.
    Sqlite {
        /// Database file (relative paths are resolved against the config file's directory).
        path: PathBuf,
        /// `lease`: how long a process's locks and ephemeral records outlive
        /// it (ZooKeeper's session timeout); `None` = the store's default.
        lease: Option<Duration>,
    },
}

/// Default SQLite database path when neither ZooKeeper nor a path is configured.
pub const DEFAULT_SQLITE_PATH: &str = "/var/lib/nodepool/nodepool.db";

/// A label: a kind of node that can be requested.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Label {
    /// Label name.
    pub name: String,
    /// Idle nodes to keep ready (negative values behave as 0).
    pub min_ready: u32,
    /// Delete ready nodes older than this; `None` = never.
    pub max_ready_age: Option<Duration>,
    /// `ready-script` (seed 002): a file in `script-dir` run on each new
    /// node of this label, wherever it is launched, unless a pool label
    /// names its own.
    pub ready_script: Option<String>,
}

/// Default `ready-script-timeout`.
pub const DEFAULT_READY_SCRIPT_TIMEOUT: Duration = Duration::from_secs(300);

/// The ready script a pool runs on each new node of one label, after
/// nodescan and before the node is `ready` (seeds 002 and 003): the
/// launcher logs in as the image's `username` with its `private-key` and
/// runs the file; a non-zero exit or a timeout fails the launch attempt.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReadyScript {
    /// The file name as configured.
    pub name: String,
    /// The file: `script-dir` joined with the name.
    pub path: PathBuf,
    /// The script must end within this (`ready-script-timeout`).
    pub timeout: Duration,
    /// Where the script was named, for errors: the pool label's or the
    /// top-level label's `ready-script`.
    pub configured_at: String,
}

/// The driver behind a provider.
// One per provider, read when providers are (re)built: a boxed variant
// would only make every match on it noisier.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq)]
pub enum Driver {
    /// A real OpenStack cloud.
    OpenStack,
    /// The built-in simulated cloud (tests, benchmarks, the quick start).
    Simulated(SimulatedCloud),
    /// A program speaking the external-provider protocol.
    External(ExternalProgram),
    /// QEMU virtual machines on the launcher's host (`driver: qemu`).
    Qemu(QemuHost),
    /// Existing hosts, registered as ready nodes and never launched or
    /// deleted (`driver: static`).
    Static(StaticHosts),
}

impl Driver {
    /// The config name of the driver.
    pub fn name(&self) -> &'static str {
        match self {
            Driver::OpenStack => "openstack",
            Driver::Simulated(_) => "simulated",
            Driver::External(_) => "external",
            Driver::Qemu(_) => "qemu",
            Driver::Static(_) => "static",
        }
    }
}

/// Knobs of the simulated cloud (`driver: simulated`).
#[derive(Clone, Debug, PartialEq)]
pub struct SimulatedCloud {
    /// Time from create to ACTIVE.
    pub boot_delay: Duration,
    /// Time a delete takes.
    pub delete_delay: Duration,
    /// Cloud quota; missing names are unlimited.
    pub quota: Limits,
    /// Probability that a server create fails.
    pub create_failure_rate: f64,
    /// Probability that a server delete fails.
    pub delete_failure_rate: f64,
    /// Probability that an image upload fails.
    pub upload_failure_rate: f64,
    /// Servers tagged for this provider but unknown to the store, created at start.
    pub leaked_servers: u32,
    /// Unattached floating IPs present from the start (`leaked-floating-ips`),
    /// for the launcher's `clean-floating-ips` cleanup.
    pub leaked_floating_ips: u32,
    /// DOWN ports owned by no live server (`compute:nova`) present from the
    /// start (`leaked-ports`), for the `port-cleanup-interval` cleanup.
    pub leaked_ports: u32,
    /// Flavors offered.
    pub flavors: Vec<SimulatedFlavor>,
    /// Whether nodes pass nodescan without a network (like Python's `fake` driver).
    pub skip_nodescan: bool,
    /// `data-plane-host` (a test aid): the `interface_ip` of every server,
    /// so a real SSH server there answers nodescan and runs ready scripts.
    /// `None`: addresses from a never-routed range.
    pub data_plane_host: Option<String>,
    /// Availability zones.
    pub availability_zones: Vec<String>,
    /// Seed of the failure dice, for reproducible runs.
    pub seed: u64,
    /// `state-file`: keep the cloud in this file instead of the process's
    /// memory, so every process that opens it (launchers, the `nodepool`
    /// CLI, tests) sees one cloud. Relative paths are resolved against the
    /// configuration file's directory.
    pub state_file: Option<PathBuf>,
    /// `api-timeout`: the longest one call to this cloud may take before
    /// the launcher counts it as failed (OpenStack's clouds.yaml
    /// `api_timeout`).
    pub api_timeout: Duration,
    /// `api-fault`: the cloud's API misbehaves from the start (failure
    /// drills; tests also set it at run time). `None`: it works.
    pub api_fault: Option<ApiFault>,
}

/// A way the simulated cloud's API can fail: every call, until cleared.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ApiFault {
    /// `hang`: calls get no answer (each is cut at `api-timeout`, as a
    /// client with that timeout would).
    Hang,
    /// `server-error`: calls answer HTTP 500.
    ServerError,
    /// `rate-limit`: calls answer HTTP 429 Too Many Requests, with a
    /// `Retry-After` when given (`{mode: rate-limit, retry-after: SECONDS}`).
    RateLimit {
        /// The `Retry-After` sent, if any.
        retry_after: Option<Duration>,
    },
}

impl ApiFault {
    /// The configuration name of the mode.
    pub fn mode(self) -> &'static str {
        match self {
            ApiFault::Hang => "hang",
            ApiFault::ServerError => "server-error",
            ApiFault::RateLimit { .. } => "rate-limit",
        }
    }
}

impl Default for SimulatedCloud {
    fn default() -> Self {
        SimulatedCloud {
            boot_delay: Duration::from_millis(100),
            delete_delay: Duration::from_millis(10),
            quota: Limits::unlimited(),
            create_failure_rate: 0.0,
            delete_failure_rate: 0.0,
            upload_failure_rate: 0.0,
            leaked_servers: 0,
            leaked_floating_ips: 0,
            leaked_ports: 0,
            flavors: vec![
                SimulatedFlavor {
                    name: "Fake Flavor".into(),
                    vcpus: 4,
                    ram: 8192,
                },
                SimulatedFlavor {
                    name: "Unreal Flavor".into(),
                    vcpus: 4,
                    ram: 8192,
                },
            ],
            skip_nodescan: true,
            data_plane_host: None,
            availability_zones: vec!["az1".into(), "az2".into()],
            seed: 0,
            state_file: None,
            api_timeout: crate::provider::DEFAULT_API_TIMEOUT,
            api_fault: None,
        }
    }
}

/// A flavor of the simulated cloud.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SimulatedFlavor {
    /// Flavor name.
    pub name: String,
    /// vCPUs.
    pub vcpus: i64,
    /// RAM in MiB.
    pub ram: i64,
}

/// A provider: one cloud region (OpenStack) or the simulated cloud.
#[derive(Clone, Debug, PartialEq)]
pub struct ProviderConfig {
    /// Provider name.
    pub name: String,
    /// Driver and driver-only settings.
    pub driver: Driver,
    /// Concurrent launches across its pools; `None` = unlimited, `Some(0)` = handle nothing.
    pub max_concurrency: Option<u32>,
    /// Priority; lower is preferred (default 100).
    pub priority: i64,
    /// clouds.yaml cloud name (required for OpenStack).
    pub cloud: Option<String>,
    /// Region.
    pub region_name: Option<String>,
    /// Time allowed for the node to answer SSH after ACTIVE.
    pub boot_timeout: Duration,
    /// Time allowed per server create attempt.
    pub launch_timeout: Duration,
    /// Attempts per node.
    pub launch_retries: u32,
    /// Time allowed for an image upload.
    pub image_upload_timeout: Duration,
    /// Seconds between API calls.
    pub rate: f64,
    /// Delete unattached floating IPs during cleanup.
    pub clean_floating_ips: bool,
    /// DOWN-port cleanup interval; `None` disables it.
    pub port_cleanup_interval: Option<Duration>,
    /// Cloud image name format: `{image_name}`, `{upload_id}`, `{timestamp}`.
    pub image_name_format: String,
    /// Program run after each upload: `<hook> <provider> <image id> <file>`.
    pub post_upload_hook: Option<String>,
    /// Image format this cloud wants (clouds.yaml `image_format`; qcow2 when unset).
    pub image_format: Option<String>,
    /// Built images uploaded here.
    pub diskimages: Vec<ProviderDiskImage>,
    /// Images the cloud already has.
    pub cloud_images: Vec<CloudImage>,
    /// `images`: images the builder makes by snapshotting a server of a
    /// base image after a setup script ran on it (seed 002).
    pub snapshot_images: Vec<SnapshotImage>,
    /// Pools.
    pub pools: Vec<Pool>,
    /// Seed 001's provider-level `max-servers: -1`: the provider is being
    /// removed. Every pool is disabled (its nodes live out their normal
    /// lifecycle, none is launched) and every image uploaded to it is
    /// deleted; the provider can be deleted from the file once its nodes
    /// are gone.
    pub removing: bool,
}

impl ProviderConfig {
    /// The image format uploads to this provider use.
    pub fn upload_format(&self) -> &str {
        self.image_format.as_deref().unwrap_or("qcow2")
    }

    /// A provider diskimage by name.
    pub fn diskimage(&self, name: &str) -> Option<&ProviderDiskImage> {
        self.diskimages.iter().find(|d| d.name == name)
    }

    /// A cloud image by name.
    pub fn cloud_image(&self, name: &str) -> Option<&CloudImage> {
        self.cloud_images.iter().find(|c| c.name == name)
    }

    /// A snapshot image (`images`) by name.
    pub fn snapshot_image(&self, name: &str) -> Option<&SnapshotImage> {
        self.snapshot_images.iter().find(|i| i.name == name)
    }

    /// What a snapshot image's setup server boots: a cloud image of this
    /// provider, else one of its diskimages (the configuration check
    /// refuses a name that is both or neither).
    pub fn snapshot_base(&self, image: &SnapshotImage) -> Option<ImageSource> {
        if self.cloud_image(&image.base_image).is_some() {
            Some(ImageSource::CloudImage(image.base_image.clone()))
        } else if self.diskimage(&image.base_image).is_some() {
            Some(ImageSource::DiskImage(image.base_image.clone()))
        } else {
            None
        }
    }

    /// Whether servers booting `image` (a diskimage, cloud image or
    /// snapshot image of this provider) get a config drive. A snapshot
    /// keeps its base's boot-time configuration (glean, cloud-init), so it
    /// needs what its base needed.
    pub fn config_drive_of(&self, image: &str) -> Option<bool> {
        if let Some(d) = self.diskimage(image) {
            d.config_drive
        } else if let Some(c) = self.cloud_image(image) {
            c.config_drive
        } else {
            let si = self.snapshot_image(image)?;
            // Never a snapshot image (the configuration check): no loop.
            if si.base_image == image {
                return None;
            }
            self.config_drive_of(&si.base_image)
        }
    }

    /// The connection type and port of servers booting `image` (a
    /// diskimage, cloud image or snapshot image of this provider). A
    /// snapshot is a copy of its base's disk, so it answers as its base.
    pub fn connection_of(&self, image: &str) -> Option<(&str, u16)> {
        if let Some(d) = self.diskimage(image) {
            Some((&d.connection_type, d.connection_port))
        } else if let Some(c) = self.cloud_image(image) {
            Some((&c.connection_type, c.connection_port))
        } else {
            let si = self.snapshot_image(image)?;
            // Never a snapshot image (the configuration check): no loop.
            if si.base_image == image {
                return None;
            }
            self.connection_of(&si.base_image)
        }
    }

    /// A pool by name.
    pub fn pool(&self, name: &str) -> Option<&Pool> {
        self.pools.iter().find(|p| p.name == name)
    }

    /// Whether every pool of the provider is disabled (`max-servers <= 0`,
    /// the usual way to pause a cloud, and part of seed 001's removal
    /// recipe): it takes no requests and no new image uploads. Its uploads
    /// stay until the provider stops listing their image.
    pub fn is_disabled(&self) -> bool {
        self.removing || (!self.pools.is_empty() && self.pools.iter().all(Pool::is_disabled))
    }
}

/// A built diskimage as a provider uses it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProviderDiskImage {
    /// Diskimage name (a top-level diskimage).
    pub name: String,
    /// Stop uploading it here.
    pub pause: bool,
    /// Boot with a config drive.
    pub config_drive: Option<bool>,
    /// Glance image properties.
    pub meta: IndexMap<String, String>,
    /// `ssh`, `winrm`, `network_cli`.
    pub connection_type: String,
    /// Port for the connection type (22, or 5986 for winrm).
    pub connection_port: u16,
    /// `validate`: the script the builder runs on a server booted from
    /// each new upload before the upload is `ready` (its `configured_at`
    /// is the `validate.script` path).
    pub validate: Option<ReadyScript>,
}

/// Default `setup-timeout` of a snapshot image.
pub const DEFAULT_SETUP_TIMEOUT: Duration = Duration::from_secs(3600);

/// A provider image made by the builder (seed 002's "snapshot"): it boots
/// a server of `base_image`, runs `setup` on it over SSH, snapshots the
/// server into a cloud image and deletes the server. Its builds and
/// uploads are recorded under its name like a diskimage's, so pool labels
/// boot it with `diskimage: NAME` and retention, `image-list` and
/// `image-delete` treat it alike.
#[derive(Clone, Debug, PartialEq)]
pub struct SnapshotImage {
    /// Image name (unique among diskimages and every provider's images).
    pub name: String,
    /// A cloud image or diskimage of this provider the setup server boots.
    pub base_image: String,
    /// The setup script (`setup` in `script-dir`, `setup-timeout`).
    pub setup: ReadyScript,
    /// Login the setup and validation scripts run as, and of the nodes.
    pub username: String,
    /// That login's SSH private key.
    pub private_key: PathBuf,
    /// The setup server's flavor (as pool labels choose one).
    pub flavor_name: Option<String>,
    /// The setup server's smallest RAM (MiB), as pool labels choose one.
    pub min_ram: Option<i64>,
    /// Make a new snapshot when the current one is older than this.
    pub rebuild_age: Duration,
    /// Make no new snapshots (the current one stays in use).
    pub pause: bool,
    /// Boot-test each new snapshot before it is `ready`.
    pub validate: Option<ReadyScript>,
    /// Where it is in the file (`providers[0].images[1]`), for errors.
    pub configured_at: String,
}

/// An image that exists in the cloud, not built by Nodepool.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CloudImage {
    /// Name used by pool labels.
    pub name: String,
    /// Cloud image id (exclusive with `image_name`).
    pub image_id: Option<String>,
    /// Cloud image name (exclusive with `image_id`).
    pub image_name: Option<String>,
    /// Boot with a config drive.
    pub config_drive: Option<bool>,
    /// Login user.
    pub username: Option<String>,
    /// `private-key`: the login user's SSH key, with which the launcher
    /// runs ready scripts.
    pub private_key: Option<PathBuf>,
    /// Python path on the node.
    pub python_path: String,
    /// Shell type.
    pub shell_type: Option<String>,
    /// `ssh`, `winrm`, `network_cli`.
    pub connection_type: String,
    /// Connection port.
    pub connection_port: u16,
}

impl CloudImage {
    /// What to look up in the cloud: the id, else the image name, else our name.
    pub fn external_name(&self) -> &str {
        self.image_id
            .as_deref()
            .or(self.image_name.as_deref())
            .unwrap_or(&self.name)
    }
}

/// A pool of a provider.
#[derive(Clone, Debug, PartialEq)]
pub struct Pool {
    /// Pool name.
    pub name: String,
    /// Server limit; `None` = unlimited; `<= 0` disables the pool.
    pub max_servers: Option<i64>,
    /// vCPU limit.
    pub max_cores: Option<i64>,
    /// RAM limit (MiB).
    pub max_ram: Option<i64>,
    /// Volume count limit.
    pub max_volumes: Option<i64>,
    /// Volume size limit (GB).
    pub max_volume_gb: Option<i64>,
    /// Skip the cloud quota check (pool limits still apply).
    pub ignore_provider_quota: bool,
    /// AZs to use; empty = the cloud's.
    pub availability_zones: Vec<String>,
    /// Network names.
    pub networks: Vec<String>,
    /// Security group names.
    pub security_groups: Vec<String>,
    /// Attach a floating IP.
    pub auto_floating_ip: bool,
    /// Scan host keys before a node is ready.
    pub host_key_checking: bool,
    /// Priority (overrides the provider's).
    pub priority: Option<i64>,
    /// Copied into each node's `attributes`.
    pub node_attributes: Option<IndexMap<String, serde_json::Value>>,
    /// Labels this pool serves.
    pub labels: Vec<PoolLabel>,
    /// The ready scripts of its labels, by label name (a label without
    /// one is absent). Kept beside `labels`, which every driver builds.
    pub ready_scripts: IndexMap<String, ReadyScript>,
}

impl Pool {
    /// Whether the pool takes no requests (`max-servers <= 0`).
    pub fn is_disabled(&self) -> bool {
        matches!(self.max_servers, Some(n) if n <= 0)
    }

    /// The pool's own limits as quota.
    pub fn limits(&self) -> Limits {
        let mut l = Limits::unlimited();
        for (name, v) in [
            (INSTANCES, self.max_servers),
            (CORES, self.max_cores),
            (RAM, self.max_ram),
            (VOLUMES, self.max_volumes),
            (VOLUME_GB, self.max_volume_gb),
        ] {
            if let Some(v) = v {
                l.set(name, v.max(0));
            }
        }
        l
    }

    /// A label of this pool.
    pub fn label(&self, name: &str) -> Option<&PoolLabel> {
        self.labels.iter().find(|l| l.name == name)
    }

    /// The ready script run on new nodes of a label of this pool.
    pub fn ready_script(&self, label: &str) -> Option<&ReadyScript> {
        self.ready_scripts.get(label)
    }
}

/// Where a pool label's image comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ImageSource {
    /// A built diskimage (by name).
    DiskImage(String),
    /// A provider cloud image (by name).
    CloudImage(String),
    /// Nothing to boot: a static pool's hosts exist already, so the
    /// label is served by their ready nodes only.
    Static,
}

/// A label as one pool offers it.
#[derive(Clone, Debug, PartialEq)]
pub struct PoolLabel {
    /// Label name (a top-level label).
    pub name: String,
    /// The image to boot.
    pub image: ImageSource,
    /// Flavor name or id (with `min_ram`, a substring filter).
    pub flavor_name: Option<String>,
    /// Smallest flavor with at least this much RAM (MiB).
    pub min_ram: Option<i64>,
    /// SSH key pair name.
    pub key_name: Option<String>,
    /// Dump the console log when nodescan fails.
    pub console_log: bool,
    /// Boot from a volume.
    pub boot_from_volume: bool,
    /// Volume size in GB.
    pub volume_size: i64,
    /// Nova metadata.
    pub instance_properties: IndexMap<String, String>,
    /// Nova metadata formatted from the request.
    pub dynamic_instance_properties: IndexMap<String, String>,
    /// Cloud-init user data.
    pub userdata: Option<String>,
    /// Networks (overrides the pool's).
    pub networks: Vec<String>,
    /// Scan host keys (overrides the pool's).
    pub host_key_checking: bool,
}

/// A diskimage after parent inheritance was applied.
#[derive(Clone, Debug, PartialEq)]
pub struct DiskImage {
    /// Diskimage name.
    pub name: String,
    /// Parent it inherits from.
    pub parent: Option<String>,
    /// diskimage-builder elements, parents' first.
    pub elements: Vec<String>,
    /// Environment for diskimage-builder, children override parents.
    pub env_vars: IndexMap<String, String>,
    /// Formats asked for explicitly (providers add theirs).
    pub formats: Vec<String>,
    /// `DIB_RELEASE`.
    pub release: String,
    /// Rebuild when the newest ready build is older than this.
    pub rebuild_age: Duration,
    /// Kill diskimage-builder after this.
    pub build_timeout: Duration,
    /// Do not build.
    pub pause: bool,
    /// Login user of nodes.
    pub username: String,
    /// `private-key`: the login user's SSH key, with which the launcher
    /// runs ready scripts.
    pub private_key: Option<PathBuf>,
    /// Python path on nodes.
    pub python_path: String,
    /// Shell type of nodes.
    pub shell_type: Option<String>,
    /// Build command.
    pub dib_cmd: String,
    /// Delete local files once every provider has a ready upload.
    pub delete_after_upload: bool,
    /// Formats never pruned by `delete_after_upload`.
    pub keep_formats: Vec<String>,
    /// Extra image properties on upload.
    pub metadata: IndexMap<String, String>,
}

/// The launcher's web app.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WebApp {
    /// TCP port (default 8005).
    pub port: u16,
    /// Listen address (default 0.0.0.0).
    pub listen_address: String,
}

impl Default for WebApp {
    fn default() -> Self {
        WebApp {
            port: 8005,
            listen_address: "0.0.0.0".into(),
        }
    }
}

/// A secret string (API tokens): never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret.
    pub fn new(s: impl Into<String>) -> Self {
        Secret(s.into())
    }

    /// The secret itself, for the one place that sends it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// A Jenkins master that takes nodes as single-use agents (seed 003).
#[derive(Clone, Debug, PartialEq)]
pub struct Target {
    /// Target name.
    pub name: String,
    /// Connection to the Jenkins master.
    pub jenkins: JenkinsConnection,
    /// Labels it takes, with their min-ready.
    pub labels: Vec<TargetLabel>,
}

/// How to reach a Jenkins master.
#[derive(Clone, Debug, PartialEq)]
pub struct JenkinsConnection {
    /// Base URL.
    pub url: String,
    /// User name.
    pub user: Option<String>,
    /// API token.
    pub api_token: Option<Secret>,
    /// File holding the API token.
    pub api_token_file: Option<PathBuf>,
    /// Jenkins credentials id for the SSH launcher.
    pub credentials_id: Option<String>,
    /// Remote FS root of agents.
    pub remote_fs_root: String,
}

/// A label a Jenkins target takes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TargetLabel {
    /// Label name.
    pub name: String,
    /// Idle agents to keep.
    pub min_ready: u32,
}

impl Config {
    /// A label by name.
    pub fn label(&self, name: &str) -> Option<&Label> {
        self.labels.iter().find(|l| l.name == name)
    }

    /// A provider by name.
    pub fn provider(&self, name: &str) -> Option<&ProviderConfig> {
        self.providers.iter().find(|p| p.name == name)
    }

    /// A diskimage by name.
    pub fn diskimage(&self, name: &str) -> Option<&DiskImage> {
        self.diskimages.iter().find(|d| d.name == name)
    }

    /// Formats a diskimage must be built in: its own plus the upload
    /// format of every provider that lists it. Empty = never built.
    pub fn diskimage_formats(&self, name: &str) -> BTreeSet<String> {
        let mut formats: BTreeSet<String> = self
            .diskimage(name)
            .map(|d| d.formats.iter().cloned().collect())
            .unwrap_or_default();
        for p in &self.providers {
            if p.diskimage(name).is_some() {
                formats.insert(p.upload_format().to_owned());
            }
        }
        formats
    }

    /// The ZooKeeper connect string: `host:port<chroot>` per server, comma-joined.
    pub fn zookeeper_hosts(&self) -> String {
        self.zookeeper_servers
            .iter()
            .map(|s| {
                let host = if s.host.contains(':') && !s.host.starts_with('[') {
                    format!("[{}]", s.host)
                } else {
                    s.host.clone()
                };
                format!("{host}:{}{}", s.port, s.chroot.as_deref().unwrap_or(""))
            })
            .collect::<Vec<_>>()
            .join(",")
    }
}
