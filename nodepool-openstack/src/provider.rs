//! [`OpenStackProvider`]: the `Provider` trait on Nova, Glance and Neutron.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use nodepool_model::config::{PoolLabel, ProviderConfig};
use nodepool_model::model::{CORES, INSTANCES, Limits, RAM, Resources, VOLUME_GB, VOLUMES};
use nodepool_model::provider::{
    CloudImageInfo, CloudResource, ImageRef, ImageUploadSpec, Instance, InstanceSpec,
    InstanceStatus, Provider, ProviderError, ResourceKind, SnapshotSpec,
};
use serde_json::Value;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::api::compute::{
    BootVolume, ConsoleOutput, CreateServer, CreateServerImage, DeleteServer, Flavor, GetLimits,
    GetServer, ListFlavors, ListServers, Networks, Server,
};
use crate::api::image::{CreateImage, DeleteImage, GetImage, ListImages, UploadImageData};
use crate::api::network::{
    CreateFloatingIp, DeleteFloatingIp, DeletePort, ListFloatingIps, ListNetworks, ListPorts,
    Network,
};
use crate::api::{ApiRequest, Raw, Service, segment};
use crate::client::{Client, ClientOptions};
use crate::clouds::{CloudConfig, CloudConfigError, CloudsLoader};
use crate::error::{ApiError, is_quota_message};
use crate::upload::UploadHashes;
use nodepool_model::cloud::fit_metadata;

/// Tunables of an [`OpenStackProvider`]; `Default` gives production values.
#[derive(Clone, Debug, PartialEq)]
pub struct ProviderOptions {
    /// The API client's options (rate, timeouts, retries, token refresh).
    pub client: ClientOptions,
    /// How often waits (boot, delete, image active) look again.
    pub poll_interval: Duration,
    /// How long one server list is reused (Python Nodepool: 1 s).
    pub list_ttl: Duration,
    /// How long flavors, networks and image names are cached.
    pub lookup_ttl: Duration,
    /// Time allowed for a server to go away after its delete.
    pub delete_timeout: Duration,
}

impl Default for ProviderOptions {
    fn default() -> Self {
        ProviderOptions {
            client: ClientOptions::default(),
            poll_interval: Duration::from_secs(1),
            list_ttl: Duration::from_secs(1),
            lookup_ttl: Duration::from_secs(300),
            delete_timeout: Duration::from_secs(600),
        }
    }
}

type Cached<T> = Option<(Instant, Arc<T>)>;

/// How long a failed snapshot's reason is waited for at most in Nova's
/// instance actions (Nova records it just after it deleted the image),
/// within the snapshot's own timeout.
const SNAPSHOT_REASON_WAIT: Duration = Duration::from_secs(60);

/// The shared server list, and the last failure to get one: callers that
/// waited for a fetch that failed get its error instead of fetching again
/// one after the other (a hung API would cost each of them a timeout).
#[derive(Default)]
struct ServerList {
    list: Cached<Vec<Server>>,
    failure: Option<(Instant, ApiError)>,
}

/// A Nodepool provider on one OpenStack cloud region.
///
/// Built from a `ProviderConfig` ([`OpenStackProvider::from_config`]) or
/// from a loaded cloud ([`OpenStackProvider::new`]). Cheap to share: wrap it
/// in an `Arc`.
pub struct OpenStackProvider {
    name: String,
    client: Arc<Client>,
    options: ProviderOptions,
    servers: tokio::sync::Mutex<ServerList>,
    flavors: tokio::sync::Mutex<Cached<Vec<Flavor>>>,
    external: tokio::sync::Mutex<Cached<Vec<Network>>>,
    networks: std::sync::Mutex<HashMap<String, (Instant, String)>>,
    images: std::sync::Mutex<HashMap<String, (Instant, String)>>,
    /// Servers this process attached a floating IP to (Nova's address
    /// cache may not show it yet when the server is deleted).
    with_fip: std::sync::Mutex<HashSet<String>>,
}

impl std::fmt::Debug for OpenStackProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpenStackProvider")
            .field("name", &self.name)
            .field("client", &self.client)
            .finish_non_exhaustive()
    }
}

fn provider_err(e: ApiError) -> ProviderError {
    e.into()
}

impl OpenStackProvider {
    /// A provider for a `nodepool.yaml` provider entry: its cloud (or
    /// `OS_CLOUD`) is looked up in clouds.yaml, `region-name` and `rate`
    /// applied.
    pub fn from_config(config: &ProviderConfig) -> Result<Self, CloudConfigError> {
        Self::from_config_with(
            config,
            &CloudsLoader::from_env(),
            ProviderOptions::default(),
        )
    }

    /// [`from_config`](Self::from_config) with an explicit clouds.yaml
    /// loader and options.
    pub fn from_config_with(
        config: &ProviderConfig,
        loader: &CloudsLoader,
        mut options: ProviderOptions,
    ) -> Result<Self, CloudConfigError> {
        let place = format!("providers.{}", config.name);
        let cloud = crate::clouds::provider_cloud(loader, config)?;
        if !(config.rate.is_finite() && config.rate >= 0.0) {
            return Err(CloudConfigError {
                place: format!("{place}.rate"),
                message: format!("must be a number of seconds >= 0, not {}", config.rate),
            });
        }
        options.client.rate = Duration::from_secs_f64(config.rate);
        Self::new(&config.name, cloud, options).map_err(|e| CloudConfigError {
            place,
            message: e.to_string(),
        })
    }

    /// A provider named `name` on an already loaded cloud.
    pub fn new(name: &str, cloud: CloudConfig, options: ProviderOptions) -> Result<Self, ApiError> {
        let client = Client::new(cloud, options.client.clone())?;
        Ok(OpenStackProvider {
            name: name.to_owned(),
            client: Arc::new(client),
            options,
            servers: tokio::sync::Mutex::new(ServerList::default()),
            flavors: tokio::sync::Mutex::new(None),
            external: tokio::sync::Mutex::new(None),
            networks: std::sync::Mutex::new(HashMap::new()),
            images: std::sync::Mutex::new(HashMap::new()),
            with_fip: std::sync::Mutex::new(HashSet::new()),
        })
    }

    /// The API client (for calls the `Provider` trait does not cover).
    pub fn client(&self) -> &Arc<Client> {
        &self.client
    }

    /// The image format this cloud wants (clouds.yaml `image_format`).
    pub fn image_format(&self) -> &str {
        &self.client.cloud().image_format
    }

    fn fresh(&self, at: Instant, ttl: Duration) -> bool {
        at.elapsed() < ttl
    }

    /// The project's servers: one list for every caller within `list_ttl`
    /// (concurrent callers wait for the same fetch), fetched at or after
    /// `since` when given.
    async fn server_list(&self, since: Option<Instant>) -> Result<Arc<Vec<Server>>, ApiError> {
        let asked = Instant::now();
        let mut slot = self.servers.lock().await;
        if let Some((at, list)) = slot.list.as_ref()
            && self.fresh(*at, self.options.list_ttl)
            && since.is_none_or(|s| *at >= s)
        {
            return Ok(list.clone());
        }
        // The fetch we waited for failed: its answer is ours too.
        if let Some((at, e)) = &slot.failure
            && *at >= asked
        {
            return Err(e.clone());
        }
        let at = Instant::now();
        let mut all = Vec::new();
        let mut marker = None;
        loop {
            let (page, next) = match self.client.execute(&ListServers { marker }).await {
                Ok(p) => p,
                Err(e) => {
                    slot.failure = Some((Instant::now(), e.clone()));
                    return Err(e);
                }
            };
            let empty = page.is_empty();
            all.extend(page);
            match next {
                Some(m) if !empty => marker = Some(m),
                _ => break,
            }
        }
        let list = Arc::new(all);
        slot.list = Some((at, list.clone()));
        slot.failure = None;
        Ok(list)
    }

    async fn forget_server_list(&self) {
        self.servers.lock().await.list = None;
    }

    async fn flavor_list(&self, refresh: bool) -> Result<Arc<Vec<Flavor>>, ApiError> {
        let mut slot = self.flavors.lock().await;
        if let Some((at, list)) = slot.as_ref()
            && !refresh
            && self.fresh(*at, self.options.lookup_ttl)
        {
            return Ok(list.clone());
        }
        let at = Instant::now();
        let mut all = Vec::new();
        let mut marker = None;
        loop {
            let (page, next) = self.client.execute(&ListFlavors { marker }).await?;
            let empty = page.is_empty();
            all.extend(page);
            match next {
                Some(m) if !empty => marker = Some(m),
                _ => break,
            }
        }
        let list = Arc::new(all);
        *slot = Some((at, list.clone()));
        Ok(list)
    }

    /// The flavor for a label (reference §3.4): with `min-ram`, the
    /// smallest enabled flavor with at least that much RAM whose name
    /// contains `flavor-name` (if given); else the flavor whose name or id
    /// is `flavor-name`.
    pub async fn find_flavor(&self, label: &PoolLabel) -> Result<Flavor, ProviderError> {
        for refresh in [false, true] {
            let flavors = self.flavor_list(refresh).await.map_err(provider_err)?;
            if let Some(f) = choose_flavor(&flavors, label) {
                return Ok(f.clone());
            }
        }
        let flavors = self.flavor_list(false).await.map_err(provider_err)?;
        let names: Vec<&str> = flavors.iter().map(|f| f.name.as_str()).collect();
        Err(ProviderError::InvalidRequest(format!(
            "provider {}: label {}: no flavor matches {} (flavors: {})",
            self.name,
            label.name,
            match (&label.flavor_name, label.min_ram) {
                (Some(n), Some(r)) => format!("min-ram {r} with a name containing {n:?}"),
                (None, Some(r)) => format!("min-ram {r}"),
                (Some(n), None) => format!("flavor-name {n:?}"),
                (None, None) => "(no flavor-name or min-ram)".to_owned(),
            },
            names.join(", ")
        )))
    }

    /// The compute API microversion the catalog negotiated (2.1 when it
    /// said none).
    async fn compute_microversion(&self) -> Result<(u32, u32), ProviderError> {
        Ok(self
            .client
            .endpoint(Service::Compute)
            .await
            .map_err(provider_err)?
            .microversion
            .unwrap_or((2, 1)))
    }

    async fn network_id(&self, name: &str) -> Result<String, ProviderError> {
        if let Ok(cache) = self.networks.lock()
            && let Some((at, id)) = cache.get(name)
            && self.fresh(*at, self.options.lookup_ttl)
        {
            return Ok(id.clone());
        }
        let mut found = self
            .client
            .execute(&ListNetworks {
                name: Some(name.to_owned()),
                ..ListNetworks::default()
            })
            .await
            .map_err(provider_err)?;
        if found.is_empty() {
            found = self
                .client
                .execute(&ListNetworks {
                    id: Some(name.to_owned()),
                    ..ListNetworks::default()
                })
                .await
                .map_err(provider_err)?;
        }
        match found.as_slice() {
            [one] => {
                if let Ok(mut cache) = self.networks.lock() {
                    cache.insert(name.to_owned(), (Instant::now(), one.id.clone()));
                }
                Ok(one.id.clone())
            }
            [] => Err(ProviderError::InvalidRequest(format!(
                "provider {}: no network named {name:?}",
                self.name
            ))),
            many => Err(ProviderError::InvalidRequest(format!(
                "provider {}: {} networks are named {name:?}; use the id",
                self.name,
                many.len()
            ))),
        }
    }

    async fn image_id(&self, image: &ImageRef) -> Result<String, ProviderError> {
        let name = match image {
            ImageRef::Uploaded { external_id } => return Ok(external_id.clone()),
            ImageRef::Cloud { id: Some(id), .. } => return Ok(id.clone()),
            ImageRef::Cloud { id: None, name } => name,
        };
        if let Ok(cache) = self.images.lock()
            && let Some((at, id)) = cache.get(name)
            && self.fresh(*at, self.options.lookup_ttl)
        {
            return Ok(id.clone());
        }
        let (found, _) = self
            .client
            .execute(&ListImages {
                name: Some(name.clone()),
                ..ListImages::default()
            })
            .await
            .map_err(provider_err)?;
        let active: Vec<_> = found.iter().filter(|i| i.status == "active").collect();
        let id = match active.first() {
            Some(i) => i.id.clone(),
            None => {
                // An image id given as the name.
                match self.client.execute(&GetImage(name)).await {
                    Ok(i) if i.status == "active" => i.id,
                    _ => {
                        return Err(ProviderError::InvalidRequest(format!(
                            "provider {}: no active image named {name:?}",
                            self.name
                        )));
                    }
                }
            }
        };
        if let Ok(mut cache) = self.images.lock() {
            cache.insert(name.clone(), (Instant::now(), id.clone()));
        }
        Ok(id)
    }

    async fn has_network(&self) -> Result<bool, ProviderError> {
        self.client
            .has_service(Service::Network)
            .await
            .map_err(provider_err)
    }

    async fn external_networks(&self) -> Result<Arc<Vec<Network>>, ProviderError> {
        let mut slot = self.external.lock().await;
        if let Some((at, list)) = slot.as_ref()
            && self.fresh(*at, self.options.lookup_ttl)
        {
            return Ok(list.clone());
        }
        let list = if self.has_network().await? {
            self.client
                .execute(&ListNetworks {
                    external_only: true,
                    ..ListNetworks::default()
                })
                .await
                .map_err(provider_err)?
        } else {
            Vec::new()
        };
        let list = Arc::new(list);
        *slot = Some((Instant::now(), list.clone()));
        Ok(list)
    }

    async fn to_instance(&self, s: &Server) -> Result<Instance, ProviderError> {
        let external: HashSet<String> = self
            .external_networks()
            .await?
            .iter()
            .map(|n| n.name.clone())
            .collect();
        let mut inst = instance_from_server(s, &external, self.client.cloud());
        if inst.resources.is_none()
            && let Some(fid) = &s.flavor_id
            && let Some((_, flavors)) = self.flavors.lock().await.as_ref()
            && let Some(f) = flavors.iter().find(|f| &f.id == fid)
        {
            let mut r = Resources::server(f.vcpus, f.ram);
            if s.volumes_attached > 0 {
                r.set(VOLUMES, s.volumes_attached as i64);
            }
            inst.resources = Some(r);
        }
        Ok(inst)
    }

    /// Attaches a floating IP from the (first) external network to the
    /// server's first port. Returns the address, or `None` when the cloud
    /// has no external network to take one from.
    async fn attach_floating_ip(&self, server_id: &str) -> Result<Option<String>, ProviderError> {
        let external = self.external_networks().await?;
        let Some(net) = external.first() else {
            debug!(provider = %self.name, server_id, "no external network: no floating IP");
            return Ok(None);
        };
        let ports = self
            .client
            .execute(&ListPorts {
                device_id: Some(server_id.to_owned()),
                ..ListPorts::default()
            })
            .await
            .map_err(provider_err)?;
        let Some(port) = ports.first() else {
            return Err(ProviderError::ServerFailed(format!(
                "provider {}: server {server_id} has no port to attach a floating IP to",
                self.name
            )));
        };
        if let Ok(mut s) = self.with_fip.lock() {
            s.insert(server_id.to_owned());
        }
        let fip = self
            .client
            .execute(&CreateFloatingIp {
                network_id: net.id.clone(),
                port_id: port.id.clone(),
            })
            .await
            .map_err(provider_err)?;
        info!(provider = %self.name, server_id, address = %fip.address, "floating IP attached");
        Ok(Some(fip.address))
    }

    /// Releases the floating IPs on a server's ports.
    async fn release_floating_ips(&self, server_id: &str) -> Result<(), ProviderError> {
        let ports = self
            .client
            .execute(&ListPorts {
                device_id: Some(server_id.to_owned()),
                ..ListPorts::default()
            })
            .await
            .map_err(provider_err)?;
        for p in ports {
            let fips = self
                .client
                .execute(&ListFloatingIps {
                    port_id: Some(p.id.clone()),
                })
                .await
                .map_err(provider_err)?;
            for f in fips {
                match self.client.execute(&DeleteFloatingIp(&f.id)).await {
                    Ok(()) => {
                        debug!(provider = %self.name, server_id, address = %f.address, "floating IP released");
                    }
                    Err(e) if e.is_not_found() => {}
                    Err(e) => return Err(e.into()),
                }
            }
        }
        Ok(())
    }

    /// Deletes an image left behind by a failed upload or snapshot, logging
    /// failures.
    async fn discard_image(&self, id: &str) {
        if let Err(e) = self.client.execute(&DeleteImage(id)).await
            && !e.is_not_found()
        {
            warn!(provider = %self.name, image = id, error = %e, "could not delete a failed upload or snapshot");
        }
    }

    /// Polls a snapshot's image until Glance says `active` (`Ok(None)`) or
    /// that it failed (`Ok(Some(status))`). Nova deletes the image when
    /// the compute host's snapshot fails, so a vanished image is a failed
    /// snapshot, not a missing server.
    async fn wait_for_snapshot(&self, id: &str) -> Result<Option<String>, ProviderError> {
        loop {
            let status = match self.client.execute(&GetImage(id)).await {
                Ok(image) => image.status,
                Err(e) if e.is_not_found() => "deleted".to_owned(),
                Err(e) => return Err(e.into()),
            };
            match status.as_str() {
                "active" => return Ok(None),
                "killed" | "deleted" | "pending_delete" => return Ok(Some(status)),
                _ => tokio::time::sleep(self.options.poll_interval).await,
            }
        }
    }

    /// Why the newest `createImage` of a server failed, as far as Nova's
    /// instance actions tell ([`snapshot_action_outcome`]). Nova deletes the
    /// image before it records the failure, so this waits (within `limit`)
    /// while the action's events are unfinished. Best effort: when Nova
    /// does not say (Nova 34, at least, runs the snapshot as a task of its
    /// own, so the action's event succeeds and the reason is only in
    /// nova-compute's log), the answer says so.
    async fn snapshot_failure_reason(&self, server_id: &str, limit: Duration) -> String {
        let unknown = "the compute host's snapshot failed (Nova's instance actions give \
                       no reason; see nova-compute's log)"
            .to_owned();
        let give_up = Instant::now() + limit;
        let actions = ApiRequest::get(
            Service::Compute,
            format!("servers/{}/os-instance-actions", segment(server_id)),
        );
        let Ok(Ok(list)) = self.client.execute(&Raw(actions)).await.map(|r| r.json()) else {
            return unknown;
        };
        // Newest first.
        let Some(request_id) = list["instanceActions"]
            .as_array()
            .and_then(|a| a.iter().find(|a| a["action"] == "createImage"))
            .and_then(|a| a["request_id"].as_str())
        else {
            return unknown;
        };
        let path = format!(
            "servers/{}/os-instance-actions/{}",
            segment(server_id),
            segment(request_id)
        );
        loop {
            let detail = ApiRequest::get(Service::Compute, path.clone());
            let Ok(Ok(action)) = self.client.execute(&Raw(detail)).await.map(|r| r.json()) else {
                return unknown;
            };
            match snapshot_action_outcome(&action) {
                ActionOutcome::Failed(reason) => return reason,
                ActionOutcome::Succeeded => return unknown,
                ActionOutcome::Running if Instant::now() >= give_up => return unknown,
                ActionOutcome::Running => tokio::time::sleep(self.options.poll_interval).await,
            }
        }
    }

    async fn upload_steps(
        &self,
        id: &str,
        spec: &ImageUploadSpec,
        len: u64,
        deadline: Instant,
    ) -> Result<(), ProviderError> {
        // Glance computes the MD5 (`checksum`) and its os_hash of what it
        // stored, so a given MD5 is checked against Glance's without hashing
        // here. Only a SHA-256 without an MD5 needs a local hash (Glance's
        // os_hash is usually SHA-512): hashing 2 GiB costs a core for
        // seconds, which on a small machine slows the cloud side too.
        let hashes = (spec.md5.is_none() && spec.sha256.is_some())
            .then(|| Arc::new(UploadHashes::new(true)));
        let remaining = deadline.saturating_duration_since(Instant::now());
        self.client
            .execute(&UploadImageData {
                id: id.to_owned(),
                path: spec.path.clone(),
                len,
                hashes: hashes.clone(),
                sent: Some(spec.sent.clone()),
                timeout: remaining,
            })
            .await
            .map_err(provider_err)?;
        let image = loop {
            let image = self
                .client
                .execute(&GetImage(id))
                .await
                .map_err(provider_err)?;
            match image.status.as_str() {
                "active" => break image,
                "killed" | "deleted" | "pending_delete" => {
                    return Err(ProviderError::Other(format!(
                        "provider {}: image {id} went {} during the upload",
                        self.name, image.status
                    )));
                }
                _ => tokio::time::sleep(self.options.poll_interval).await,
            }
        };
        verify_upload(&self.name, id, spec, len, &image, hashes.as_deref())
    }
}

/// What an instance action's events say.
#[derive(Debug, PartialEq, Eq)]
enum ActionOutcome {
    /// An event is not finished yet.
    Running,
    /// Every event finished, none failed.
    Succeeded,
    /// Every event finished; the failed ones, with their details (shown
    /// from microversion 2.84 on, to admins).
    Failed(String),
}

/// Reads `GET /servers/{id}/os-instance-actions/{request_id}`.
fn snapshot_action_outcome(action: &Value) -> ActionOutcome {
    let events = action["instanceAction"]["events"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default();
    if events.iter().any(|e| e["finish_time"].is_null()) {
        return ActionOutcome::Running;
    }
    let failed: Vec<String> = events
        .iter()
        .filter(|e| e["result"] == "Error")
        .map(|e| {
            let what = e["event"].as_str().unwrap_or("event");
            match e["details"].as_str().filter(|d| !d.is_empty()) {
                Some(d) => format!("{what}: {d}"),
                None => format!("{what}: Error"),
            }
        })
        .collect();
    if failed.is_empty() {
        ActionOutcome::Succeeded
    } else {
        ActionOutcome::Failed(failed.join("; "))
    }
}

/// How a refused `createImage` maps: as any call (404: no such server;
/// 403/413 naming a quota: quota exceeded), except that a 409 because the
/// server is busy with another task (`while it is in task_state ...`) is
/// transient: it can be snapshotted once that task is done. A 409 for its
/// state (`vm_state error`) stays an invalid request.
fn snapshot_error(e: ApiError) -> ProviderError {
    match &e {
        ApiError::Status {
            status: 409,
            message,
            ..
        } if message.contains("task_state") => ProviderError::Transient(e.to_string()),
        _ => e.into(),
    }
}

/// Checks an uploaded image against what was asked: its size, Glance's MD5
/// against the given MD5, Glance's SHA-256 (when that is its os_hash)
/// against the given SHA-256, and a locally computed SHA-256 when that was
/// the only checksum given.
pub fn verify_upload(
    provider: &str,
    id: &str,
    spec: &ImageUploadSpec,
    len: u64,
    image: &crate::api::image::Image,
    local: Option<&UploadHashes>,
) -> Result<(), ProviderError> {
    let mismatch = |what: &str, want: &str, got: &str| {
        ProviderError::Other(format!(
            "provider {provider}: image {id} ({}): {what} checksum mismatch: expected {want}, got {got}",
            spec.path.display()
        ))
    };
    if let Some(size) = image.size
        && size != len
    {
        return Err(ProviderError::Other(format!(
            "provider {provider}: image {id}: Glance stored {size} bytes, the file has {len}"
        )));
    }
    if let Some(want) = &spec.md5 {
        match &image.checksum {
            Some(stored) if stored.eq_ignore_ascii_case(want) => {}
            Some(stored) => return Err(mismatch("md5 (Glance checksum)", want, stored)),
            None => return Err(mismatch("md5 (Glance checksum)", want, "none")),
        }
    }
    if let Some(want) = &spec.sha256 {
        if let (Some("sha256"), Some(stored)) = (image.hash_algo.as_deref(), &image.hash_value)
            && !stored.eq_ignore_ascii_case(want)
        {
            return Err(mismatch("sha256 (Glance os_hash_value)", want, stored));
        }
        if let Some(h) = local {
            let sent = h.digests().ok_or_else(|| {
                ProviderError::Other(format!(
                    "provider {provider}: image {id}: the upload ended before the whole file was read"
                ))
            })?;
            let got = sent.sha256.unwrap_or_default();
            if !got.eq_ignore_ascii_case(want) {
                return Err(mismatch("sha256 (of the file sent)", want, &got));
            }
        }
    }
    Ok(())
}

/// The flavor rule of reference §3.4 ([`nodepool_model::cloud::choose_flavor`]),
/// on Nova's flavor list.
pub fn choose_flavor<'a>(flavors: &'a [Flavor], label: &PoolLabel) -> Option<&'a Flavor> {
    nodepool_model::cloud::choose_flavor(flavors, label)
}

fn is_private_v4(ip: &str) -> bool {
    match ip.parse::<IpAddr>() {
        Ok(IpAddr::V4(v4)) => {
            let o = v4.octets();
            v4.is_private()
                || v4.is_loopback()
                || v4.is_link_local()
                // carrier-grade NAT 100.64.0.0/10
                || (o[0] == 100 && (o[1] & 0xc0) == 64)
        }
        _ => false,
    }
}

fn is_global_v6(ip: &str) -> bool {
    match ip.parse::<IpAddr>() {
        Ok(IpAddr::V6(v6)) => {
            let s = v6.segments()[0];
            // not link-local fe80::/10, not unique-local fc00::/7, not loopback
            (s & 0xffc0) != 0xfe80 && (s & 0xfe00) != 0xfc00 && !v6.is_loopback()
        }
        _ => false,
    }
}

/// A Nova server as a Nodepool instance. Addresses are public when they
/// are floating, on an external network, or (clouds without Neutron)
/// globally routable.
pub fn instance_from_server(
    s: &Server,
    external: &HashSet<String>,
    cloud: &CloudConfig,
) -> Instance {
    let (mut public_ipv4, mut private_ipv4, mut public_ipv6) = (None, None, None);
    // Floating addresses first: they win over a fixed public one.
    let mut addrs: Vec<_> = s.addresses.iter().collect();
    addrs.sort_by_key(|a| a.kind.as_deref() != Some("floating"));
    for a in addrs {
        let public = a.kind.as_deref() == Some("floating") || external.contains(&a.network);
        match a.version {
            4 if public || !is_private_v4(&a.addr) => {
                public_ipv4.get_or_insert_with(|| a.addr.clone());
            }
            4 => {
                private_ipv4.get_or_insert_with(|| a.addr.clone());
            }
            6 if public || is_global_v6(&a.addr) => {
                public_ipv6.get_or_insert_with(|| a.addr.clone());
            }
            _ => {}
        }
    }
    let status = match (s.status.as_str(), s.task_state.as_deref()) {
        (_, Some("deleting")) | ("DELETED" | "SOFT_DELETED", _) => InstanceStatus::Deleting,
        ("ACTIVE", _) => InstanceStatus::Active,
        ("BUILD", _) => InstanceStatus::Building,
        ("ERROR", _) => InstanceStatus::Error(s.fault.clone().unwrap_or_default()),
        (other, _) => InstanceStatus::Other(other.to_owned()),
    };
    let resources = s.flavor_size.map(|(vcpus, ram)| {
        let mut r = Resources::server(vcpus, ram);
        if s.volumes_attached > 0 {
            r.set(VOLUMES, s.volumes_attached as i64);
        }
        r
    });
    Instance {
        external_id: s.id.clone(),
        name: s.name.clone(),
        status,
        metadata: s.metadata.clone(),
        interface_ip: public_ipv4
            .clone()
            .or_else(|| public_ipv6.clone())
            .or_else(|| private_ipv4.clone()),
        public_ipv4,
        private_ipv4,
        public_ipv6,
        az: s.availability_zone.clone(),
        region: cloud.region_name.clone(),
        cloud: Some(cloud.name.clone()),
        host_id: s.host_id.clone(),
        resources,
    }
}

fn gone(s: &Server) -> bool {
    matches!(s.status.as_str(), "DELETED" | "SOFT_DELETED")
}

#[async_trait]
impl Provider for OpenStackProvider {
    fn name(&self) -> &str {
        &self.name
    }

    async fn quota_limits(&self) -> Result<Limits, ProviderError> {
        let abs = self
            .client
            .execute(&GetLimits)
            .await
            .map_err(provider_err)?;
        let mut limits = Limits::unlimited();
        for (name, v) in [
            (INSTANCES, abs.instances),
            (CORES, abs.cores),
            (RAM, abs.ram),
        ] {
            if let Some(v) = v {
                limits.set(name, v);
            }
        }
        // Cinder is optional; its limits matter only for boot-from-volume.
        let has_volume = self
            .client
            .has_service(Service::BlockStorage)
            .await
            .map_err(provider_err)?;
        if has_volume {
            let resp = self
                .client
                .execute(&Raw(ApiRequest::get(Service::BlockStorage, "limits")))
                .await
                .map_err(provider_err)?;
            let v = resp.json().map_err(provider_err)?;
            let abs = &v["limits"]["absolute"];
            for (name, key) in [
                (VOLUMES, "maxTotalVolumes"),
                (VOLUME_GB, "maxTotalVolumeGigabytes"),
            ] {
                if let Some(n) = abs.get(key).and_then(Value::as_i64).filter(|n| *n >= 0) {
                    limits.set(name, n);
                }
            }
        }
        Ok(limits)
    }

    async fn label_resources(&self, label: &PoolLabel) -> Result<Resources, ProviderError> {
        let f = self.find_flavor(label).await?;
        let mut r = Resources::server(f.vcpus, f.ram);
        if label.boot_from_volume {
            r.set(VOLUMES, 1);
            r.set(VOLUME_GB, label.volume_size);
        }
        Ok(r)
    }

    async fn create_instance(&self, spec: &InstanceSpec) -> Result<String, ProviderError> {
        let flavor = self.find_flavor(&spec.label).await?;
        let image_id = self.image_id(&spec.image).await?;
        let mut network_ids = Vec::new();
        for n in &spec.label.networks {
            network_ids.push(self.network_id(n).await?);
        }
        let microversion = self.compute_microversion().await?;
        let create = CreateServer {
            name: spec.name.clone(),
            flavor_id: flavor.id,
            image_id,
            boot_volume: spec.label.boot_from_volume.then_some(BootVolume {
                size_gb: spec.label.volume_size,
            }),
            metadata: fit_metadata(&spec.name, &spec.metadata),
            networks: if network_ids.is_empty() {
                Networks::Auto
            } else {
                Networks::Ids(network_ids)
            },
            security_groups: spec.security_groups.clone(),
            key_name: spec.label.key_name.clone(),
            availability_zone: spec.availability_zone.clone(),
            config_drive: spec.config_drive,
            user_data: spec.label.userdata.clone(),
            microversion,
        };
        let id = self.client.execute(&create).await.map_err(provider_err)?;
        info!(provider = %self.name, server = %spec.name, id = %id, "server create accepted");
        self.forget_server_list().await;
        Ok(id)
    }

    async fn wait_for_instance(
        &self,
        external_id: &str,
        spec: &InstanceSpec,
    ) -> Result<Instance, ProviderError> {
        let since = Instant::now();
        let server = loop {
            let list = self.server_list(Some(since)).await.map_err(provider_err)?;
            let found = match list.iter().find(|s| s.id == external_id) {
                Some(s) => Some(s.clone()),
                // Not in a list made after it was created: ask for it alone.
                None => match self.client.execute(&GetServer(external_id)).await {
                    Ok(s) if !gone(&s) => Some(s),
                    Ok(_) => None,
                    Err(e) if e.is_not_found() => None,
                    Err(e) => return Err(e.into()),
                },
            };
            let Some(s) = found else {
                return Err(ProviderError::ServerFailed(format!(
                    "provider {}: server {external_id} disappeared while booting",
                    self.name
                )));
            };
            match s.status.as_str() {
                "ACTIVE" => break s,
                "ERROR" => {
                    let fault = s.fault.clone().unwrap_or_else(|| "no fault given".into());
                    let msg = format!(
                        "provider {}: server {external_id} went ERROR: {fault}",
                        self.name
                    );
                    return Err(if is_quota_message(&fault) {
                        ProviderError::QuotaExceeded(msg)
                    } else {
                        ProviderError::ServerFailed(msg)
                    });
                }
                "DELETED" | "SOFT_DELETED" => {
                    return Err(ProviderError::ServerFailed(format!(
                        "provider {}: server {external_id} was deleted while booting",
                        self.name
                    )));
                }
                _ => tokio::time::sleep(self.options.poll_interval).await,
            }
        };
        let mut inst = self.to_instance(&server).await?;
        if spec.auto_floating_ip
            && inst.public_ipv4.is_none()
            && let Some(addr) = self.attach_floating_ip(external_id).await?
        {
            inst.public_ipv4 = Some(addr.clone());
            inst.interface_ip = Some(addr);
        }
        Ok(inst)
    }

    async fn get_instance(&self, external_id: &str) -> Result<Option<Instance>, ProviderError> {
        match self.client.execute(&GetServer(external_id)).await {
            Ok(s) if gone(&s) => Ok(None),
            Ok(s) => Ok(Some(self.to_instance(&s).await?)),
            Err(e) if e.is_not_found() => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    async fn list_instances(&self) -> Result<Vec<Instance>, ProviderError> {
        let list = self.server_list(None).await.map_err(provider_err)?;
        let mut out = Vec::with_capacity(list.len());
        for s in list.iter().filter(|s| !gone(s)) {
            out.push(self.to_instance(s).await?);
        }
        Ok(out)
    }

    async fn delete_instance(&self, external_id: &str) -> Result<(), ProviderError> {
        let started = Instant::now();
        // Floating IPs outlive their server in Neutron: release them first.
        // Only when there can be one, to spare two calls per delete.
        let had_fip = self
            .with_fip
            .lock()
            .map(|s| s.contains(external_id))
            .unwrap_or(true);
        let listed_fip = match self.servers.lock().await.list.as_ref() {
            Some((_, list)) => list.iter().find(|s| s.id == external_id).is_none_or(|s| {
                s.addresses
                    .iter()
                    .any(|a| a.kind.as_deref() == Some("floating"))
            }),
            None => true,
        };
        if (had_fip || listed_fip) && self.has_network().await? {
            self.release_floating_ips(external_id).await?;
        }
        match self.client.execute(&DeleteServer(external_id)).await {
            Ok(()) => {}
            Err(e) if e.is_not_found() => {
                self.forget_fip(external_id);
                return Ok(());
            }
            Err(e) => return Err(e.into()),
        }
        info!(provider = %self.name, id = external_id, "server delete accepted");
        let deadline = started + self.options.delete_timeout;
        // Any list made after the delete was accepted will do: concurrent
        // deletes then share one list per `list_ttl`.
        let since = Instant::now();
        loop {
            let list = self.server_list(Some(since)).await.map_err(provider_err)?;
            let listed = list.iter().any(|s| s.id == external_id && !gone(s));
            if !listed {
                // The list no longer has it; make sure a GET agrees (Nova
                // shows DELETED for a moment before the 404).
                match self.client.execute(&GetServer(external_id)).await {
                    Err(e) if e.is_not_found() => break,
                    Ok(s) if gone(&s) => break,
                    Ok(_) => {}
                    Err(e) => return Err(e.into()),
                }
            }
            if Instant::now() >= deadline {
                return Err(ProviderError::Timeout(format!(
                    "provider {}: server {external_id} still exists {} s after its delete",
                    self.name,
                    self.options.delete_timeout.as_secs()
                )));
            }
            tokio::time::sleep(self.options.poll_interval).await;
        }
        self.forget_fip(external_id);
        self.forget_server_list().await;
        Ok(())
    }

    async fn console_log(&self, external_id: &str) -> Result<String, ProviderError> {
        self.client
            .execute(&ConsoleOutput(external_id))
            .await
            .map_err(provider_err)
    }

    async fn upload_image(&self, spec: &ImageUploadSpec) -> Result<String, ProviderError> {
        let started = Instant::now();
        let deadline = started + spec.timeout;
        let len = std::fs::metadata(&spec.path)
            .map_err(|e| {
                ProviderError::Other(format!(
                    "provider {}: cannot read {}: {e}",
                    self.name,
                    spec.path.display()
                ))
            })?
            .len();
        let mut properties = spec.properties.clone();
        // What openstacksdk records, so SDK tools recognise the upload.
        if let Some(md5) = &spec.md5 {
            properties.insert("owner_specified.openstack.md5".into(), md5.clone());
        }
        if let Some(sha) = &spec.sha256 {
            properties.insert("owner_specified.openstack.sha256".into(), sha.clone());
        }
        let create = CreateImage {
            name: spec.name.clone(),
            disk_format: spec.format.clone(),
            properties,
        };
        let image = tokio::time::timeout_at(deadline, self.client.execute(&create))
            .await
            .map_err(|_| {
                ProviderError::Timeout(format!(
                    "provider {}: image {}: not created within {} s",
                    self.name,
                    spec.name,
                    spec.timeout.as_secs()
                ))
            })?
            .map_err(provider_err)?;
        info!(provider = %self.name, image = %spec.name, id = %image.id, bytes = len, "uploading image");
        let steps =
            tokio::time::timeout_at(deadline, self.upload_steps(&image.id, spec, len, deadline));
        let result = match steps.await {
            Ok(r) => r,
            Err(_) => Err(ProviderError::Timeout(format!(
                "provider {}: image {} ({}): not active within image-upload-timeout {} s",
                self.name,
                spec.name,
                image.id,
                spec.timeout.as_secs()
            ))),
        };
        match result {
            Ok(()) => {
                let secs = started.elapsed().as_secs_f64();
                info!(provider = %self.name, image = %spec.name, id = %image.id,
                    seconds = secs, mib_per_s = len as f64 / 1048576.0 / secs.max(1e-9), "image active");
                Ok(image.id)
            }
            Err(e) => {
                self.discard_image(&image.id).await;
                Err(e)
            }
        }
    }

    /// Nova's `createImage` action with the spec's properties as the
    /// image's (so `list_images` shows them as an upload's), then polls
    /// Glance until the image is `active`, within `spec.timeout` (each call
    /// also within the API timeout). An image that is not active in time,
    /// or that Glance shows `killed` or deleted (the compute host's
    /// snapshot failed; the reason comes from the server's instance
    /// actions), is deleted before the error is returned. Only when the
    /// `createImage` call itself gets no answer is the image's id unknown:
    /// an image made anyway carries the properties, so leak cleanup finds
    /// it.
    async fn snapshot_instance(
        &self,
        external_id: &str,
        spec: &SnapshotSpec,
    ) -> Result<String, ProviderError> {
        let started = Instant::now();
        let deadline = started + spec.timeout;
        let microversion = self.compute_microversion().await?;
        let create = CreateServerImage {
            server_id: external_id,
            name: spec.name.clone(),
            metadata: spec.properties.clone(),
            microversion,
        };
        let id = self.client.execute(&create).await.map_err(snapshot_error)?;
        info!(provider = %self.name, server = external_id, image = %spec.name, id = %id,
            "snapshot accepted");
        let result = match tokio::time::timeout_at(deadline, self.wait_for_snapshot(&id)).await {
            Ok(Ok(None)) => Ok(()),
            Ok(Ok(Some(status))) => {
                let reason = self
                    .snapshot_failure_reason(
                        external_id,
                        SNAPSHOT_REASON_WAIT
                            .min(deadline.saturating_duration_since(Instant::now())),
                    )
                    .await;
                Err(ProviderError::ServerFailed(format!(
                    "provider {}: snapshot {} ({id}) of server {external_id} went {status}: {reason}",
                    self.name, spec.name
                )))
            }
            Ok(Err(e)) => Err(e),
            Err(_) => Err(ProviderError::Timeout(format!(
                "provider {}: snapshot {} ({id}) of server {external_id}: not active within {} s",
                self.name,
                spec.name,
                spec.timeout.as_secs()
            ))),
        };
        match result {
            Ok(()) => {
                info!(provider = %self.name, server = external_id, image = %spec.name, id = %id,
                    seconds = started.elapsed().as_secs_f64(), "snapshot active");
                Ok(id)
            }
            Err(e) => {
                self.discard_image(&id).await;
                Err(e)
            }
        }
    }

    async fn list_images(&self) -> Result<Vec<CloudImageInfo>, ProviderError> {
        let mut out = Vec::new();
        let mut marker = None;
        loop {
            let (page, next) = self
                .client
                .execute(&ListImages { marker, name: None })
                .await
                .map_err(provider_err)?;
            let empty = page.is_empty();
            out.extend(page.into_iter().map(|i| CloudImageInfo {
                id: i.id,
                name: i.name,
                status: i.status,
                properties: i.properties,
            }));
            match next {
                Some(m) if !empty => marker = Some(m),
                _ => break,
            }
        }
        Ok(out)
    }

    async fn delete_image(&self, external_id: &str) -> Result<(), ProviderError> {
        match self.client.execute(&DeleteImage(external_id)).await {
            Ok(()) => Ok(()),
            Err(e) if e.is_not_found() => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    async fn list_resources(
        &self,
        kind: ResourceKind,
    ) -> Result<Vec<CloudResource>, ProviderError> {
        if !self.has_network().await? {
            return Ok(Vec::new());
        }
        match kind {
            ResourceKind::FloatingIp => Ok(self
                .client
                .execute(&ListFloatingIps::default())
                .await
                .map_err(provider_err)?
                .into_iter()
                .map(|f| CloudResource {
                    kind,
                    id: f.id,
                    status: f.status,
                    attached: f.port_id.is_some(),
                    device_owner: None,
                })
                .collect()),
            ResourceKind::Port => Ok(self
                .client
                .execute(&ListPorts {
                    status: Some("DOWN".into()),
                    ..ListPorts::default()
                })
                .await
                .map_err(provider_err)?
                .into_iter()
                .map(|p| CloudResource {
                    kind,
                    id: p.id,
                    status: p.status,
                    attached: !p.device_id.is_empty(),
                    device_owner: Some(p.device_owner),
                })
                .collect()),
        }
    }

    async fn delete_resource(&self, kind: ResourceKind, id: &str) -> Result<(), ProviderError> {
        let r = match kind {
            ResourceKind::FloatingIp => self.client.execute(&DeleteFloatingIp(id)).await,
            ResourceKind::Port => self.client.execute(&DeletePort(id)).await,
        };
        match r {
            Ok(()) => Ok(()),
            Err(e) if e.is_not_found() => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// clouds.yaml `api_timeout` (else the client's default), which also
    /// bounds each HTTP request the client sends.
    fn api_timeout(&self) -> Duration {
        self.client.options().timeout
    }
}

impl OpenStackProvider {
    fn forget_fip(&self, id: &str) {
        if let Ok(mut s) = self.with_fip.lock() {
            s.remove(id);
        }
    }
}

/// The metadata key/value limit, re-exported for callers that build specs.
pub use nodepool_model::cloud::NOVA_METADATA_LIMIT;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::compute::Address;
    use indexmap::IndexMap;
    use nodepool_model::config::ImageSource;

    fn flavor(id: &str, name: &str, vcpus: i64, ram: i64, disabled: bool) -> Flavor {
        Flavor {
            id: id.into(),
            name: name.into(),
            vcpus,
            ram,
            disk: 1,
            disabled,
        }
    }

    pub(crate) fn label(flavor_name: Option<&str>, min_ram: Option<i64>) -> PoolLabel {
        PoolLabel {
            name: "l".into(),
            image: ImageSource::CloudImage("img".into()),
            flavor_name: flavor_name.map(str::to_owned),
            min_ram,
            key_name: None,
            console_log: false,
            boot_from_volume: false,
            volume_size: 50,
            instance_properties: IndexMap::new(),
            dynamic_instance_properties: IndexMap::new(),
            userdata: None,
            networks: Vec::new(),
            host_key_checking: false,
        }
    }

    #[test]
    fn flavor_rules() {
        let fl = vec![
            flavor("1", "m1.large", 4, 8192, false),
            flavor("2", "m1.small", 1, 2048, false),
            flavor("3", "gpu.small", 1, 2048, false),
            flavor("4", "m1.tiny", 1, 512, true),
            flavor("5", "m1.medium", 2, 4096, false),
        ];
        let pick = |n: Option<&str>, r: Option<i64>| {
            choose_flavor(&fl, &label(n, r)).map(|f| f.id.as_str())
        };
        // smallest with enough RAM; ties broken by name
        assert_eq!(pick(None, Some(1000)), Some("3"));
        assert_eq!(pick(None, Some(3000)), Some("5"));
        // disabled flavors are never chosen
        assert_eq!(pick(None, Some(100)), Some("3"));
        // flavor-name with min-ram is a substring filter
        assert_eq!(pick(Some("m1"), Some(1000)), Some("2"));
        assert_eq!(pick(Some("gpu"), Some(4000)), None);
        // flavor-name alone: name, then id
        assert_eq!(pick(Some("m1.large"), None), Some("1"));
        assert_eq!(pick(Some("5"), None), Some("5"));
        assert_eq!(pick(Some("m1"), None), None);
        assert_eq!(pick(None, None), None);
    }

    fn cloud() -> CloudConfig {
        CloudConfig {
            name: "c".into(),
            source: "x".into(),
            auth: crate::clouds::Auth::Password {
                auth_url: "http://k/v3".into(),
                user: crate::clouds::UserRef::Id("u".into()),
                password: nodepool_model::config::Secret::new("p"),
                project: None,
            },
            region_name: Some("R".into()),
            interface: "public".into(),
            service_interfaces: Default::default(),
            endpoint_overrides: Default::default(),
            image_format: "qcow2".into(),
            api_timeout: None,
            verify: true,
            cacert: None,
        }
    }

    fn server(addresses: Vec<Address>) -> Server {
        Server {
            id: "s".into(),
            name: "np1".into(),
            status: "ACTIVE".into(),
            task_state: None,
            metadata: IndexMap::new(),
            addresses,
            availability_zone: Some("nova".into()),
            host_id: None,
            flavor_id: None,
            flavor_size: Some((2, 128)),
            fault: None,
            volumes_attached: 0,
        }
    }

    fn addr(net: &str, a: &str, v: u8, kind: &str) -> Address {
        Address {
            network: net.into(),
            addr: a.into(),
            version: v,
            kind: Some(kind.into()),
        }
    }

    #[test]
    fn addresses_classified() {
        let ext: HashSet<String> = ["public".to_owned()].into();
        let s = server(vec![
            addr("private", "10.20.0.5", 4, "fixed"),
            addr("private", "203.0.113.7", 4, "floating"),
            addr("private", "fe80::1", 6, "fixed"),
            addr("private", "2001:db8::5", 6, "fixed"),
        ]);
        let i = instance_from_server(&s, &ext, &cloud());
        assert_eq!(i.private_ipv4.as_deref(), Some("10.20.0.5"));
        assert_eq!(i.public_ipv4.as_deref(), Some("203.0.113.7"));
        assert_eq!(i.public_ipv6.as_deref(), Some("2001:db8::5"));
        assert_eq!(i.interface_ip.as_deref(), Some("203.0.113.7"));
        assert_eq!(i.status, InstanceStatus::Active);
        assert_eq!(i.resources, Some(Resources::server(2, 128)));
        assert_eq!(i.region.as_deref(), Some("R"));
        assert_eq!(i.cloud.as_deref(), Some("c"));
        // a fixed address on an external network is public
        let s = server(vec![addr("public", "192.168.5.5", 4, "fixed")]);
        let i = instance_from_server(&s, &ext, &cloud());
        assert_eq!(i.public_ipv4.as_deref(), Some("192.168.5.5"));
        // only private addresses: the interface is the private one
        let s = server(vec![addr("private", "100.64.1.1", 4, "fixed")]);
        let i = instance_from_server(&s, &ext, &cloud());
        assert_eq!(i.public_ipv4, None);
        assert_eq!(i.interface_ip.as_deref(), Some("100.64.1.1"));
    }

    const NODEPOOL_YAML: &str = r#"
zookeeper-servers: [{host: zk1.example.org}]
labels: [{name: small}]
providers:
  - name: cloud1
    cloud: mycloud
    region-name: RegionTwo
    rate: 2.5
    cloud-images: [{name: base}]
    pools:
      - name: main
        labels: [{name: small, cloud-image: base, min-ram: 512}]
  - name: cloud2
    cloud: nosuchcloud
    pools: []
"#;

    #[tokio::test]
    async fn from_config_applies_cloud_region_and_rate() {
        let dir = tempfile::tempdir().unwrap();
        let clouds = dir.path().join("clouds.yaml");
        std::fs::write(
            &clouds,
            "clouds:\n  mycloud:\n    auth: {auth_url: 'http://k:5000', user_id: u, password: pw, project_id: p}\n    image_format: vhd\n",
        )
        .unwrap();
        let mut config = nodepool_model::config::Config::from_yaml(NODEPOOL_YAML).unwrap();
        let loader = CloudsLoader::file(&clouds);
        let p = OpenStackProvider::from_config_with(
            &config.providers[0],
            &loader,
            ProviderOptions::default(),
        )
        .unwrap();
        assert_eq!(p.name(), "cloud1");
        assert_eq!(p.client().cloud().region_name.as_deref(), Some("RegionTwo"));
        assert_eq!(p.client().options().rate, Duration::from_millis(2500));
        assert_eq!(p.image_format(), "vhd");
        assert!(!format!("{p:?}").contains("pw"));
        let e = OpenStackProvider::from_config_with(
            &config.providers[1],
            &loader,
            ProviderOptions::default(),
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.starts_with("providers.cloud2 (cloud \"nosuchcloud\")"),
            "{e}"
        );
        assert!(
            e.contains("no cloud named \"nosuchcloud\" (clouds here: mycloud)"),
            "{e}"
        );
        // the builder's helper fills the upload format from clouds.yaml
        config.providers.truncate(1);
        crate::clouds::fill_image_formats(&loader, &mut config).unwrap();
        assert_eq!(config.providers[0].upload_format(), "vhd");
    }

    #[test]
    fn snapshot_action_outcomes() {
        let action = |events: Value| serde_json::json!({"instanceAction": {"events": events}});
        assert_eq!(
            snapshot_action_outcome(&action(serde_json::json!([
                {"event": "compute_snapshot_instance", "finish_time": null, "result": null}
            ]))),
            ActionOutcome::Running
        );
        assert_eq!(
            snapshot_action_outcome(&action(serde_json::json!([
                {"event": "compute_snapshot_instance", "finish_time": "t", "result": "Success"}
            ]))),
            ActionOutcome::Succeeded
        );
        assert_eq!(
            snapshot_action_outcome(&action(serde_json::json!([
                {"event": "compute_snapshot_instance", "finish_time": "t", "result": "Error",
                 "details": "Disk full"},
                {"event": "other", "finish_time": "t", "result": "Error"}
            ]))),
            ActionOutcome::Failed("compute_snapshot_instance: Disk full; other: Error".into())
        );
        assert_eq!(
            snapshot_action_outcome(&serde_json::json!({})),
            ActionOutcome::Succeeded
        );
    }

    #[test]
    fn snapshot_refusals_map_by_meaning() {
        let refused = |status: u16, message: &str| {
            snapshot_error(ApiError::Status {
                call: "compute POST servers/s/action".into(),
                status,
                message: message.into(),
            })
        };
        assert!(matches!(
            refused(
                409,
                "Cannot 'createImage' instance s while it is in task_state image_uploading"
            ),
            ProviderError::Transient(_)
        ));
        assert!(matches!(
            refused(
                409,
                "Cannot 'createImage' instance s while it is in vm_state error"
            ),
            ProviderError::InvalidRequest(_)
        ));
        assert!(matches!(
            refused(404, "Instance s could not be found."),
            ProviderError::NotFound(_)
        ));
        assert!(matches!(
            refused(403, "Quota exceeded for images"),
            ProviderError::QuotaExceeded(_)
        ));
        assert!(matches!(
            refused(413, "Maximum number of images exceeded: quota exceeded"),
            ProviderError::QuotaExceeded(_)
        ));
    }

    #[test]
    fn statuses() {
        let mut s = server(vec![]);
        s.status = "ERROR".into();
        s.fault = Some("No valid host".into());
        let i = instance_from_server(&s, &HashSet::new(), &cloud());
        assert_eq!(i.status, InstanceStatus::Error("No valid host".into()));
        s.status = "ACTIVE".into();
        s.task_state = Some("deleting".into());
        assert_eq!(
            instance_from_server(&s, &HashSet::new(), &cloud()).status,
            InstanceStatus::Deleting
        );
    }
}
