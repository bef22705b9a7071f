//! `driver: static`: existing hosts registered as ready nodes (Python
//! Nodepool's `nodepool/driver/static/provider.py`).
//!
//! Nothing is ever launched in a static pool (the planner serves its
//! labels from ready nodes only). Instead, [`sync`] runs beside the passes
//! and keeps the store in line with the configuration:
//!
//! - every host gets one `ready` node per free slot (`max-parallel-jobs`),
//!   with the fields Python's driver writes, after a nodescan that
//!   collects its host keys when `host-key-checking` is on;
//! - a returned node is deleted like any other (the [`StaticProvider`]
//!   has no server to delete), which frees its slot, and the next sync
//!   registers the host again: Python deletes and re-registers too;
//! - nodes of hosts no longer configured, or of slots beyond
//!   `max-parallel-jobs`, are deregistered (set `deleting`) once unused;
//! - a host whose SSH server stops answering has its unused nodes
//!   deregistered, so they are not handed out, and is registered again
//!   once it answers.
//!
//! Registration happens under a store lock per provider, so several
//! launchers serving one static pool never register a slot twice.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use crate::config::{Driver, ProviderConfig, StaticHost};
use crate::model::{Json, Limits, Node, NodeState, Port, Resources};
use crate::provider::{
    CloudImageInfo, ImageUploadSpec, Instance, InstanceSpec, Provider, ProviderError,
};
use crate::store::{LockWait, NodeRecord, Store, StoreError};

/// The `launcher` Python's static driver writes into its nodes.
pub const STATIC_LAUNCHER: &str = "static driver";

/// Our own extension: one registration lock per static provider.
pub const REGISTRATION_LOCKS: &str = "/nodepool/static-registration";

/// The registration lock directory of a static provider.
pub fn registration_lock(provider: &str) -> String {
    format!("{REGISTRATION_LOCKS}/{provider}")
}

/// The cloud of a static provider: there is none. It lists no servers
/// and no images (so leak cleanup and `alien-list` find nothing), refuses
/// to create anything, and "deletes" a host's server by doing nothing, so
/// a returned node's record is removed and its slot freed.
#[derive(Debug)]
pub struct StaticProvider {
    name: String,
}

impl StaticProvider {
    /// The provider object of a static provider configuration.
    pub fn new(pc: &ProviderConfig) -> Self {
        StaticProvider {
            name: pc.name.clone(),
        }
    }
}

fn no_launches() -> ProviderError {
    ProviderError::Unsupported(
        "a static provider's hosts exist already: nothing is launched or uploaded".into(),
    )
}

#[async_trait]
impl Provider for StaticProvider {
    fn name(&self) -> &str {
        &self.name
    }

    async fn quota_limits(&self) -> Result<Limits, ProviderError> {
        Ok(Limits::unlimited())
    }

    async fn label_resources(
        &self,
        _label: &crate::config::PoolLabel,
    ) -> Result<Resources, ProviderError> {
        // As Python's static driver: one instance, no cores or RAM.
        Ok(crate::planner::quota::one_instance())
    }

    async fn create_instance(&self, _spec: &InstanceSpec) -> Result<String, ProviderError> {
        Err(no_launches())
    }

    async fn wait_for_instance(
        &self,
        _external_id: &str,
        _spec: &InstanceSpec,
    ) -> Result<Instance, ProviderError> {
        Err(no_launches())
    }

    async fn get_instance(&self, _external_id: &str) -> Result<Option<Instance>, ProviderError> {
        Ok(None)
    }

    async fn list_instances(&self) -> Result<Vec<Instance>, ProviderError> {
        Ok(Vec::new())
    }

    async fn delete_instance(&self, _external_id: &str) -> Result<(), ProviderError> {
        Ok(())
    }

    async fn upload_image(&self, _spec: &ImageUploadSpec) -> Result<String, ProviderError> {
        Err(no_launches())
    }

    async fn list_images(&self) -> Result<Vec<CloudImageInfo>, ProviderError> {
        Ok(Vec::new())
    }

    async fn delete_image(&self, _external_id: &str) -> Result<(), ProviderError> {
        Ok(())
    }

    fn skip_nodescan(&self) -> bool {
        true
    }
}

/// What identifies a host's nodes: Python's `nodeTuple` (host name, user,
/// port).
type Identity = (String, String, u16);

fn identity_of_node(n: &Node) -> Option<Identity> {
    let port = match n.connection_port.as_ref()? {
        Port::Number(p) => u16::try_from(*p).ok()?,
        Port::Other(_) => return None,
    };
    Some((n.hostname.clone()?, n.username.clone()?, port))
}

fn identity_of_host(h: &StaticHost) -> Identity {
    (h.name.clone(), h.username.clone(), h.connection_port)
}

fn slot_of(n: &Node) -> Option<usize> {
    n.slot
        .as_ref()
        .and_then(|s| s.decode::<u64>().ok())
        .and_then(|s| usize::try_from(s).ok())
}

/// What one sync did, for logs and tests.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SyncReport {
    /// Nodes registered (ids).
    pub registered: Vec<String>,
    /// Nodes deregistered (ids).
    pub deregistered: Vec<String>,
    /// Hosts that did not answer, with why.
    pub unreachable: Vec<(String, String)>,
}

/// Why a host cannot be registered now.
async fn check_host(h: &StaticHost) -> Result<Vec<String>, String> {
    let ssh = matches!(h.connection_type.as_str(), "ssh" | "network_cli");
    if ssh && !h.host_key_checking {
        return Ok(h.host_keys.clone());
    }
    let keys =
        super::nodescan::scan(&h.name, h.connection_port, &h.connection_type, h.timeout).await?;
    if !ssh {
        return Ok(Vec::new());
    }
    if let Some(missing) = h.host_keys.iter().find(|k| !keys.contains(k)) {
        return Err(format!(
            "host key mismatch: {missing:?} is not among the keys it offers ({})",
            keys.len()
        ));
    }
    Ok(keys)
}

/// Whether a registered host still answers (Python's `checkNodeLiveness`:
/// only checked when `host-key-checking` is on): its SSH server sends its
/// banner, or for other connection types the port accepts a connection.
async fn is_alive(h: &StaticHost) -> bool {
    if !h.host_key_checking {
        return true;
    }
    let attempt = async {
        let mut stream = tokio::net::TcpStream::connect((h.name.as_str(), h.connection_port))
            .await
            .ok()?;
        if !matches!(h.connection_type.as_str(), "ssh" | "network_cli") {
            return Some(());
        }
        use tokio::io::AsyncReadExt;
        let mut buf = [0u8; 4];
        stream.read_exact(&mut buf).await.ok()?;
        (&buf == b"SSH-").then_some(())
    };
    matches!(tokio::time::timeout(h.timeout, attempt).await, Ok(Some(())))
}

/// The node Python's static driver registers for a host slot.
fn node_for(
    pc: &ProviderConfig,
    pool: &str,
    h: &StaticHost,
    slot: usize,
    host_keys: Vec<String>,
    now: f64,
) -> Node {
    let mut node = Node::new(NodeState::Ready, now, &pc.name, pool, h.labels.clone());
    node.launcher = Some(STATIC_LAUNCHER.into());
    node.external_id = Some(h.name.clone());
    node.hostname = Some(h.name.clone());
    node.username = Some(h.username.clone());
    node.interface_ip = Some(h.name.clone());
    node.connection_port = Some(Port::Number(i64::from(h.connection_port)));
    node.ssh_port = node.connection_port.clone();
    node.connection_type = Some(h.connection_type.clone());
    node.python_path = Some(h.python_path.clone());
    node.shell_type = h.shell_type.clone();
    // Python's set_node_ip: an address literal is also the node's IP.
    match h.name.parse::<std::net::IpAddr>() {
        Ok(std::net::IpAddr::V4(_)) => node.public_ipv4 = Some(h.name.clone()),
        Ok(std::net::IpAddr::V6(_)) => node.public_ipv6 = Some(h.name.clone()),
        Err(_) => {}
    }
    node.host_keys = host_keys;
    node.attributes = pc
        .pool(pool)
        .and_then(|p| p.node_attributes.as_ref())
        .map(Json::encode);
    node.slot = Some(Json::encode(&slot));
    node
}

/// Sets an unused ready node `deleting` under its lock (Python's
/// `deregisterNode`); the launcher's cleanup removes it. A node that is
/// locked or no longer ready and unallocated is left alone.
async fn deregister(store: &Store, id: &str, now: f64) -> Result<bool, StoreError> {
    let guard = match store.lock_node(id, LockWait::NonBlocking).await {
        Ok(g) => g,
        Err(StoreError::Locked { .. } | StoreError::NotFound { .. }) => return Ok(false),
        Err(e) => return Err(e),
    };
    let result = async {
        let Some(cur) = store.get_node(id).await? else {
            return Ok(false);
        };
        let mut node = cur.value;
        if node.state != NodeState::Ready || node.allocated_to.is_some() {
            return Ok(false);
        }
        node.set_state(NodeState::Deleting, now);
        store.update_node(id, &node, cur.version).await?;
        Ok(true)
    }
    .await;
    guard.release_logged().await;
    result
}

fn unused(rec: &NodeRecord) -> bool {
    rec.node.state == NodeState::Ready && rec.node.allocated_to.is_none() && !rec.locked
}

/// One synchronisation of a static provider's nodes with its
/// configuration (Python's `cleanupLeakedResources` and
/// `nodeDeletedNotification` in one). Returns `Ok(None)` when another
/// launcher holds the registration lock (it is doing the same work).
pub async fn sync(
    store: &Store,
    pc: &ProviderConfig,
    now: &(dyn Fn() -> f64 + Send + Sync),
) -> Result<Option<SyncReport>, StoreError> {
    let Driver::Static(hosts) = &pc.driver else {
        return Ok(Some(SyncReport::default()));
    };
    let guard = match store
        .lock(&registration_lock(&pc.name), LockWait::NonBlocking)
        .await
    {
        Ok(g) => g,
        Err(StoreError::Locked { .. }) => return Ok(None),
        Err(e) => return Err(e),
    };
    let result = sync_locked(store, pc, hosts, now).await;
    guard.release_logged().await;
    result.map(Some)
}

async fn sync_locked(
    store: &Store,
    pc: &ProviderConfig,
    hosts: &crate::config::StaticHosts,
    now: &(dyn Fn() -> f64 + Send + Sync),
) -> Result<SyncReport, StoreError> {
    let mut report = SyncReport::default();
    let nodes = store.list_nodes().await?.records;
    // Slots of every configured host, then the nodes that fill them
    // (Python's getRegisteredNodes): a node with a free slot number takes
    // it, others take the first free slot, the rest are excess.
    let mut slots: HashMap<Identity, Vec<Option<&NodeRecord>>> = HashMap::new();
    for (_, h) in hosts.all() {
        slots.insert(
            identity_of_host(h),
            vec![None; h.max_parallel_jobs as usize],
        );
    }
    let mut excess: Vec<&NodeRecord> = Vec::new();
    let mut unslotted: Vec<(Identity, &NodeRecord)> = Vec::new();
    for rec in &nodes {
        let n = &rec.node;
        if n.provider != pc.name
            || matches!(
                n.state,
                NodeState::Building | NodeState::Deleting | NodeState::Deleted
            )
        {
            continue;
        }
        let Some(id) = identity_of_node(n) else {
            excess.push(rec);
            continue;
        };
        match (slots.get_mut(&id), slot_of(n)) {
            (Some(s), Some(k)) if k < s.len() && s[k].is_none() => s[k] = Some(rec),
            (Some(_), _) => unslotted.push((id, rec)),
            (None, _) => excess.push(rec),
        }
    }
    for (id, rec) in unslotted {
        match slots
            .get_mut(&id)
            .and_then(|s| s.iter_mut().find(|x| x.is_none()))
        {
            Some(free) => *free = Some(rec),
            None => excess.push(rec),
        }
    }
    for rec in excess {
        if unused(rec) && deregister(store, &rec.id, now()).await? {
            tracing::info!(provider = %pc.name, node = %rec.id, host = ?rec.node.hostname, "static node deregistered: its host or slot is no longer configured");
            report.deregistered.push(rec.id.clone());
        }
    }

    // Hosts with free slots are scanned (and registered); hosts with
    // unused nodes are checked for life. All at once: a host that does
    // not answer costs its timeout, not everyone's.
    let checks = hosts.all().map(|(pool, h)| {
        let filled = &slots[&identity_of_host(h)];
        let free: Vec<usize> = (0..filled.len()).filter(|&k| filled[k].is_none()).collect();
        let idle: Vec<&NodeRecord> = filled
            .iter()
            .flatten()
            .copied()
            .filter(|r| unused(r))
            .collect();
        async move {
            let scan = if free.is_empty() {
                None
            } else {
                Some(check_host(h).await)
            };
            let alive = match &scan {
                Some(Ok(_)) => true,
                Some(Err(_)) => false,
                None if idle.is_empty() => true,
                None => is_alive(h).await,
            };
            (pool, h, free, idle, scan, alive)
        }
    });
    let results = futures::future::join_all(checks).await;
    for (pool, h, free, idle, scan, alive) in results {
        if !alive {
            let why = match &scan {
                Some(Err(e)) => e.clone(),
                _ => "its SSH server does not answer".into(),
            };
            if !idle.is_empty() || !free.is_empty() {
                tracing::warn!(provider = %pc.name, host = %h.name, error = %why, "static host unreachable; its unused nodes are withdrawn and it is tried again later");
            }
            report.unreachable.push((h.name.clone(), why));
            for rec in idle {
                if deregister(store, &rec.id, now()).await? {
                    report.deregistered.push(rec.id.clone());
                }
            }
            continue;
        }
        if let Some(Ok(keys)) = scan {
            for k in free {
                let node = node_for(pc, pool, h, k, keys.clone(), now());
                let id = store.create_node(&node).await?;
                tracing::info!(provider = %pc.name, pool, host = %h.name, slot = k, node = %id, "static node registered");
                report.registered.push(id);
            }
        }
    }
    Ok(report)
}

/// Runs [`sync`] for every static provider beside the launcher's passes,
/// one run at a time and at most once per [`SYNC_INTERVAL`].
#[derive(Default)]
pub(crate) struct Syncer {
    running: Arc<std::sync::atomic::AtomicBool>,
    next: Option<tokio::time::Instant>,
}

/// Shortest time between two syncs of the static providers.
pub const SYNC_INTERVAL: Duration = Duration::from_secs(1);

impl Syncer {
    /// Starts a sync of the static providers of `cfg` on `tasks` if one
    /// is due and none runs.
    pub(crate) fn maybe_start(
        &mut self,
        tasks: &tokio_util::task::TaskTracker,
        shared: &Arc<super::Shared>,
        cfg: &crate::config::Config,
    ) {
        use std::sync::atomic::Ordering;
        if !cfg
            .providers
            .iter()
            .any(|p| matches!(p.driver, Driver::Static(_)))
        {
            return;
        }
        let at = tokio::time::Instant::now();
        if self.next.is_some_and(|t| at < t) || self.running.swap(true, Ordering::AcqRel) {
            return;
        }
        self.next = Some(at + SYNC_INTERVAL);
        let providers = static_providers(cfg);
        let running = self.running.clone();
        let shared = shared.clone();
        tasks.spawn(async move {
            let clock = shared.settings.clock;
            let now = move || clock.now();
            let mut changed = false;
            for pc in &providers {
                match sync(&shared.store, pc, &now).await {
                    Ok(Some(r)) => {
                        changed |= !r.registered.is_empty() || !r.deregistered.is_empty();
                    }
                    Ok(None) => {}
                    Err(e) => {
                        tracing::warn!(provider = %pc.name, error = %e, "static node sync failed; retrying")
                    }
                }
            }
            running.store(false, Ordering::Release);
            if changed {
                shared.wake.notify_one();
            }
        });
    }
}

/// The static providers of a configuration, by name.
fn static_providers(cfg: &crate::config::Config) -> Vec<ProviderConfig> {
    let by_name: BTreeMap<&str, &ProviderConfig> = cfg
        .providers
        .iter()
        .filter(|p| matches!(p.driver, Driver::Static(_)))
        .map(|p| (p.name.as_str(), p))
        .collect();
    by_name.into_values().cloned().collect()
}
