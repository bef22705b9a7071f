//! The `Provider` trait: a cloud that runs servers and stores images.
//!
//! A provider knows nothing of requests or the state store. The launcher
//! runtime drives it: create a server, wait for it, delete it; the builder
//! uploads images through it; cleanup lists what it has and deletes leaks.
//! Servers are tagged with metadata (`nodepool_node_id`,
//! `nodepool_provider_name`, `nodepool_pool_name`, `groups`) so that leaked
//! ones can be recognised later.

use std::path::PathBuf;
use std::time::Duration;

use async_trait::async_trait;
use indexmap::IndexMap;

use crate::config::PoolLabel;
use crate::model::{Limits, Resources};

/// Server metadata key: the node id.
pub const META_NODE_ID: &str = "nodepool_node_id";
/// Server metadata key: the provider name.
pub const META_PROVIDER: &str = "nodepool_provider_name";
/// Server metadata key: the pool name.
pub const META_POOL: &str = "nodepool_pool_name";
/// Server metadata key: `<provider>,<image>,<label>` for Ansible inventories.
pub const META_GROUPS: &str = "groups";
/// Legacy server metadata key: one JSON object (seed 001), still read.
pub const META_LEGACY_JSON: &str = "nodepool";
/// Server metadata key of the builder's boot test of a new upload
/// (`validate`): `<image>/<build>/<upload>`. Such a server has no node;
/// it is a leak once its upload is no longer `uploading`.
pub const META_VALIDATION: &str = "nodepool_image_validation";
/// Image property: the build id.
pub const IMAGE_BUILD_ID: &str = "nodepool_build_id";
/// Image property: the upload id.
pub const IMAGE_UPLOAD_ID: &str = "nodepool_upload_id";
/// Image property: the provider name.
pub const IMAGE_PROVIDER: &str = "nodepool_provider_name";

/// Which image a server boots.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ImageRef {
    /// An image Nodepool uploaded, by cloud id.
    Uploaded {
        /// Cloud image id.
        external_id: String,
    },
    /// An image the cloud already has: by id, else by name.
    Cloud {
        /// Cloud image id.
        id: Option<String>,
        /// Cloud image name.
        name: String,
    },
}

/// Everything needed to create one server.
#[derive(Clone, Debug, PartialEq)]
pub struct InstanceSpec {
    /// Server name: `np<node id>`.
    pub name: String,
    /// Node id it is launched for.
    pub node_id: String,
    /// Provider name.
    pub provider: String,
    /// Pool name.
    pub pool: String,
    /// The pool label (flavor, key, volumes, userdata, networks...).
    pub label: PoolLabel,
    /// Image to boot.
    pub image: ImageRef,
    /// Availability zone, if chosen.
    pub availability_zone: Option<String>,
    /// Security groups.
    pub security_groups: Vec<String>,
    /// Boot with a config drive.
    pub config_drive: Option<bool>,
    /// Attach a floating IP when the server has no public address.
    pub auto_floating_ip: bool,
    /// Complete server metadata (tags and instance properties), each value
    /// within Nova's 255-byte limit.
    pub metadata: IndexMap<String, String>,
}

/// Lifecycle of a server as the cloud reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum InstanceStatus {
    /// Being created.
    Building,
    /// Running.
    Active,
    /// Failed, with the cloud's fault message.
    Error(String),
    /// Being deleted.
    Deleting,
    /// Any other status string.
    Other(String),
}

/// A server in the cloud.
#[derive(Clone, Debug, PartialEq)]
pub struct Instance {
    /// Cloud server id.
    pub external_id: String,
    /// Server name.
    pub name: String,
    /// Status.
    pub status: InstanceStatus,
    /// Server metadata.
    pub metadata: IndexMap<String, String>,
    /// Public IPv4.
    pub public_ipv4: Option<String>,
    /// Private IPv4.
    pub private_ipv4: Option<String>,
    /// Public IPv6.
    pub public_ipv6: Option<String>,
    /// The address to connect to.
    pub interface_ip: Option<String>,
    /// Availability zone.
    pub az: Option<String>,
    /// Region.
    pub region: Option<String>,
    /// Cloud name.
    pub cloud: Option<String>,
    /// Hypervisor host id.
    pub host_id: Option<String>,
    /// Quota it uses (from its flavor), if known.
    pub resources: Option<Resources>,
}

impl Instance {
    /// The node id it was tagged with (new metadata keys, or the legacy
    /// JSON `nodepool` key of older versions).
    pub fn node_id(&self) -> Option<String> {
        if let Some(id) = self.metadata.get(META_NODE_ID) {
            return Some(id.clone());
        }
        self.legacy_meta("node_id")
    }

    /// The provider name it was tagged with.
    pub fn provider_name(&self) -> Option<String> {
        if let Some(p) = self.metadata.get(META_PROVIDER) {
            return Some(p.clone());
        }
        self.legacy_meta("provider_name")
    }

    fn legacy_meta(&self, key: &str) -> Option<String> {
        let raw = self.metadata.get(META_LEGACY_JSON)?;
        let v: serde_json::Value = serde_json::from_str(raw).ok()?;
        match v.get(key)? {
            serde_json::Value::String(s) => Some(s.clone()),
            serde_json::Value::Number(n) => Some(match n.as_u64() {
                // Old node ids were integers; znode names are 10-digit.
                Some(i) => format!("{i:010}"),
                None => n.to_string(),
            }),
            _ => None,
        }
    }
}

/// What a snapshot of a server becomes (seed 002's setup-script images:
/// boot a base image, run the setup script, snapshot the server).
#[derive(Clone, Debug, PartialEq)]
pub struct SnapshotSpec {
    /// Cloud image name.
    pub name: String,
    /// Image properties (`nodepool_build_id`, `nodepool_upload_id`, ...),
    /// as an upload's: `list_images` shows them, so leak cleanup and
    /// `alien-image-list` treat snapshots like uploaded images.
    pub properties: IndexMap<String, String>,
    /// Give up after this long (the image must be active by then).
    pub timeout: Duration,
}

/// What to upload.
#[derive(Clone, Debug, PartialEq)]
pub struct ImageUploadSpec {
    /// Cloud image name.
    pub name: String,
    /// Local file.
    pub path: PathBuf,
    /// Disk format (`qcow2`, `raw`, `vhd`).
    pub format: String,
    /// Image properties (`nodepool_build_id`, `nodepool_upload_id`, ...).
    pub properties: IndexMap<String, String>,
    /// Expected MD5 of the file, if known.
    pub md5: Option<String>,
    /// Expected SHA-256 of the file, if known.
    pub sha256: Option<String>,
    /// Give up after this long.
    pub timeout: Duration,
    /// Bytes of the file sent so far: the provider adds to it as it sends,
    /// the caller reads it to report progress. A provider that cannot tell
    /// leaves it at 0. Clones share one counter.
    pub sent: UploadProgress,
}

/// A counter of bytes an upload has sent, shared between the provider
/// (which adds) and the caller (which reads).
#[derive(Clone, Debug, Default)]
pub struct UploadProgress(std::sync::Arc<std::sync::atomic::AtomicU64>);

impl PartialEq for UploadProgress {
    /// The same counter (not the same count): a spec's counter is where
    /// it reports, not what it asks for.
    fn eq(&self, other: &Self) -> bool {
        std::sync::Arc::ptr_eq(&self.0, &other.0)
    }
}

impl UploadProgress {
    /// Counts `n` more bytes sent.
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
    }

    /// Bytes sent so far.
    pub fn get(&self) -> u64 {
        self.0.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Starts over (an upload retried from the beginning).
    pub fn reset(&self) {
        self.0.store(0, std::sync::atomic::Ordering::Relaxed);
    }
}

/// An image in the cloud.
#[derive(Clone, Debug, PartialEq)]
pub struct CloudImageInfo {
    /// Cloud image id.
    pub id: String,
    /// Name.
    pub name: String,
    /// Status (`active`, `queued`, ...).
    pub status: String,
    /// Properties.
    pub properties: IndexMap<String, String>,
}

/// Cloud resources that leak on their own.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ResourceKind {
    /// A floating IP.
    FloatingIp,
    /// A network port.
    Port,
}

impl ResourceKind {
    /// Plural name used in `nodepool.provider.<p>.leaked.<kind>` metrics.
    pub fn metric_name(self) -> &'static str {
        match self {
            ResourceKind::FloatingIp => "floatingips",
            ResourceKind::Port => "ports",
        }
    }
}

/// A floating IP or port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CloudResource {
    /// Kind.
    pub kind: ResourceKind,
    /// Cloud id.
    pub id: String,
    /// Status (`DOWN`, `ACTIVE`, ...).
    pub status: String,
    /// Whether it is attached to a server.
    pub attached: bool,
    /// Port device owner (`compute:nova`, empty, ...).
    pub device_owner: Option<String>,
}

/// Errors of a provider, by meaning.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ProviderError {
    /// The server, image or resource does not exist.
    #[error("not found: {0}")]
    NotFound(String),
    /// The cloud refused for lack of quota.
    #[error("quota exceeded: {0}")]
    QuotaExceeded(String),
    /// Credentials were refused.
    #[error("authentication failed: {0}")]
    Unauthenticated(String),
    /// The request was rejected as invalid (a configuration problem).
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// A temporary failure; try again later.
    #[error("temporary failure: {0}")]
    Transient(String),
    /// A call or a wait took too long.
    #[error("timed out: {0}")]
    Timeout(String),
    /// The cloud refused the call for now because of its request rate
    /// (HTTP 429), asking to wait `retry_after` (its `Retry-After`) first.
    #[error("rate limited: {message}")]
    RateLimited {
        /// The cloud's answer.
        message: String,
        /// How long the cloud asked to wait, when it said.
        retry_after: Option<Duration>,
    },
    /// The call was not made: the launcher marked the provider unavailable
    /// after its API kept failing, and fails calls fast until a probe
    /// succeeds (see `launcher::health`).
    #[error("provider unavailable: {0}")]
    Unavailable(String),
    /// The server went into an error state.
    #[error("server failed: {0}")]
    ServerFailed(String),
    /// The provider does not support this operation.
    #[error("not supported: {0}")]
    Unsupported(String),
    /// Anything else.
    #[error("{0}")]
    Other(String),
}

impl ProviderError {
    /// A short stable label for metrics (`error.<label>` in launch results).
    pub fn metric_label(&self) -> &'static str {
        match self {
            ProviderError::NotFound(_) => "notfound",
            ProviderError::QuotaExceeded(_) => "quota",
            ProviderError::Unauthenticated(_) => "auth",
            ProviderError::InvalidRequest(_) => "invalid",
            ProviderError::Transient(_) => "transient",
            ProviderError::Timeout(_) => "timeout",
            ProviderError::RateLimited { .. } => "ratelimit",
            ProviderError::Unavailable(_) => "unavailable",
            ProviderError::ServerFailed(_) => "status",
            ProviderError::Unsupported(_) => "unsupported",
            ProviderError::Other(_) => "unknown",
        }
    }

    /// Whether the error says the cloud's API is unwell (no answer in
    /// time, a 5xx or connection failure, rate limiting), as opposed to an
    /// answer about the request itself (not found, quota, invalid, a
    /// server that went ERROR). Only these count towards marking a
    /// provider unavailable.
    pub fn is_api_failure(&self) -> bool {
        matches!(
            self,
            ProviderError::Timeout(_)
                | ProviderError::Transient(_)
                | ProviderError::RateLimited { .. }
        )
    }

    /// How long the cloud asked callers to wait, when it said.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            ProviderError::RateLimited { retry_after, .. } => *retry_after,
            _ => None,
        }
    }
}

/// The per-call timeout of a provider that does not say otherwise
/// ([`Provider::api_timeout`]).
pub const DEFAULT_API_TIMEOUT: Duration = Duration::from_secs(60);

/// A cloud. Object-safe; used as `Arc<dyn Provider>`.
///
/// Every implementation must pass the conformance suite in
/// `nodepool_model::conformance::provider` (feature `conformance`).
///
/// # Example
///
/// One server's life as the launcher drives it (a sketch: the launcher
/// also records the server id in its node before waiting, and bounds each
/// wait by the pool's timeouts). The `custom_provider` example program
/// implements the trait.
///
/// ```no_run
/// use nodepool_model::provider::{InstanceSpec, Provider, ProviderError};
///
/// async fn boot_and_delete(
///     cloud: &dyn Provider,
///     spec: &InstanceSpec,
/// ) -> Result<(), ProviderError> {
///     let id = cloud.create_instance(spec).await?;
///     let server = cloud.wait_for_instance(&id, spec).await?;
///     println!("{id} is {:?} at {:?}", server.status, server.interface_ip);
///     cloud.delete_instance(&id).await
/// }
/// ```
#[async_trait]
pub trait Provider: Send + Sync + std::fmt::Debug {
    /// Provider name (from the config).
    fn name(&self) -> &str;

    /// The cloud's absolute limits (`instances`, `cores`, `ram`, ...);
    /// missing names are unlimited.
    async fn quota_limits(&self) -> Result<Limits, ProviderError>;

    /// Quota one server of this label uses (from its flavor, plus volumes
    /// when booting from volume).
    async fn label_resources(&self, label: &PoolLabel) -> Result<Resources, ProviderError>;

    /// Starts creating a server; returns its cloud id as soon as the cloud
    /// accepted it (so that it is recorded before anything else can fail).
    async fn create_instance(&self, spec: &InstanceSpec) -> Result<String, ProviderError>;

    /// Waits until the server is ACTIVE (and has its floating IP, when
    /// asked for). The caller bounds this with `launch-timeout`.
    async fn wait_for_instance(
        &self,
        external_id: &str,
        spec: &InstanceSpec,
    ) -> Result<Instance, ProviderError>;

    /// One server; `Ok(None)` when it does not exist.
    async fn get_instance(&self, external_id: &str) -> Result<Option<Instance>, ProviderError>;

    /// Every server of the cloud project (cached briefly by implementations).
    async fn list_instances(&self) -> Result<Vec<Instance>, ProviderError>;

    /// Deletes a server and waits until it is gone. A server that does not
    /// exist counts as deleted.
    async fn delete_instance(&self, external_id: &str) -> Result<(), ProviderError>;

    /// The server's console output (for failed nodescans).
    async fn console_log(&self, external_id: &str) -> Result<String, ProviderError> {
        let _ = external_id;
        Err(ProviderError::Unsupported("console log".into()))
    }

    /// Uploads an image file; returns the cloud image id once it is active.
    async fn upload_image(&self, spec: &ImageUploadSpec) -> Result<String, ProviderError>;

    /// Every image of the cloud project.
    async fn list_images(&self) -> Result<Vec<CloudImageInfo>, ProviderError>;

    /// Deletes an image. An image that does not exist counts as deleted.
    async fn delete_image(&self, external_id: &str) -> Result<(), ProviderError>;

    /// Snapshots the disk of a server (stopped or running) into a new
    /// image and returns the image's cloud id once it is active; the
    /// server is left as it was (the caller deletes it). OpenStack: Nova's
    /// `createImage` server action; a provider without snapshots answers
    /// [`ProviderError::Unsupported`].
    async fn snapshot_instance(
        &self,
        external_id: &str,
        spec: &SnapshotSpec,
    ) -> Result<String, ProviderError> {
        let _ = (external_id, spec);
        Err(ProviderError::Unsupported("snapshots".into()))
    }

    /// Floating IPs or ports, for leak cleanup.
    async fn list_resources(
        &self,
        kind: ResourceKind,
    ) -> Result<Vec<CloudResource>, ProviderError> {
        let _ = kind;
        Ok(Vec::new())
    }

    /// Deletes a floating IP or port. One that does not exist counts as deleted.
    async fn delete_resource(&self, kind: ResourceKind, id: &str) -> Result<(), ProviderError> {
        let _ = (kind, id);
        Ok(())
    }

    /// The port that reaches the server's connection (SSH) when the
    /// provider decides it per server, as a QEMU VM's forwarded host port
    /// does; `None` keeps the image's `connection-port`. Called once the
    /// server is ACTIVE, before nodescan.
    fn connection_port(&self, instance: &Instance) -> Option<u16> {
        let _ = instance;
        None
    }

    /// Whether nodes of this provider must skip nodescan (the simulated
    /// cloud's servers have no network).
    fn skip_nodescan(&self) -> bool {
        false
    }

    /// The longest one API call may take (OpenStack: clouds.yaml
    /// `api_timeout`; simulated: `simulation.api-timeout`). The launcher
    /// bounds every single call by it and counts an overrun as a timeout;
    /// long waits (`wait_for_instance`, `delete_instance`, uploads) are
    /// bounded by their own timeouts, but each call they make should be
    /// bounded by this.
    fn api_timeout(&self) -> Duration {
        DEFAULT_API_TIMEOUT
    }
}

/// The `wait_for_instance` of a provider that can only poll: asks
/// `get_instance` every `interval` until the server is ACTIVE. A server that
/// disappears is [`ProviderError::NotFound`], one in ERROR is
/// [`ProviderError::ServerFailed`] with its fault. The caller bounds the
/// whole wait (the launcher's boot timeout).
pub async fn poll_until_active<P: Provider + ?Sized>(
    provider: &P,
    external_id: &str,
    interval: Duration,
) -> Result<Instance, ProviderError> {
    loop {
        match provider.get_instance(external_id).await? {
            None => {
                return Err(ProviderError::NotFound(format!(
                    "server {external_id} vanished while booting"
                )));
            }
            Some(i) => match &i.status {
                InstanceStatus::Active => return Ok(i),
                InstanceStatus::Error(fault) => {
                    return Err(ProviderError::ServerFailed(format!(
                        "server {external_id}: {fault}"
                    )));
                }
                _ => tokio::time::sleep(interval).await,
            },
        }
    }
}
