//! The pure pool planner: what a launcher should do next, as data.
//!
//! [`plan`] takes an immutable [`Snapshot`] of the store and the clouds, the
//! configuration, `now` and this launcher's [`LocalState`], and returns a
//! [`Plan`]: a list of [`Action`]s for the runtime to execute. It does no
//! IO, reads no clock and draws no random numbers, so every decision can be
//! tested (and property-tested) as a function. It is level-triggered: it
//! decides from the state alone, never from the event that woke the loop,
//! so running it again on the state its actions produced plans nothing new
//! for the same need.
//!
//! Decisions follow Python Nodepool (reference §2.3–2.5, §4) with the
//! improvements of reference §10: min-ready has one owner per label
//! (rendezvous hashing), a request no registered pool can serve fails in one
//! pass, and quota counts both the store's nodes and what the cloud reports.
//!
//! Layout: `index` (the per-pass index of the snapshot), `summary` (the
//! compact per-node summaries it reads, kept from pass to pass in
//! [`LocalState::node_summaries`]), `registry` (the
//! registered pools and the labels they serve), `queue` (waiting requests
//! in pickup order), [`quota`] (usage accounting), `requests` (pickup and
//! fulfilment), `cleanup` (deletions, lost requests, leaks, min-ready),
//! [`leaks`] (the rules that find leaked servers, images, floating IPs and
//! ports, shared with the admin commands), [`images`] (the builder's plan:
//! builds, uploads, retention), [`explain`] (why a request waits, pool by
//! pool).

mod cleanup;
pub mod explain;
mod fast;
pub mod fulfilment;
pub mod images;
mod index;
pub mod leaks;
mod queue;
pub mod quota;
mod registry;
mod rendezvous;
mod requests;
mod summary;

use std::collections::{BTreeMap, BTreeSet};

use crate::config::Config;
use crate::model::{Component, Resources, parse_request_id};
use crate::provider::{CloudResource, Instance, ResourceKind};
use crate::store::{ImageState, NodeRecord, RequestLockDir, RequestRecord};

pub use rendezvous::rendezvous_owner;
pub use requests::HANDOFF_SECS;
pub use summary::NodeSummaryCache;

/// A provider pool, by provider and pool name.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PoolKey {
    /// Provider name.
    pub provider: String,
    /// Pool name.
    pub pool: String,
}

impl PoolKey {
    /// A key.
    pub fn new(provider: &str, pool: &str) -> Self {
        PoolKey {
            provider: provider.to_owned(),
            pool: pool.to_owned(),
        }
    }
}

impl std::fmt::Display for PoolKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.provider, self.pool)
    }
}

/// A registered pool component (of any launcher, ours included).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PoolInfo {
    /// Launcher-pool id (`<fqdn>-PoolWorker.<provider>-<pool>-<uuid>`).
    pub id: String,
    /// Provider name.
    pub provider: String,
    /// Pool name.
    pub pool: String,
    /// Labels it can serve.
    pub labels: Vec<String>,
    /// Priority; lower is preferred.
    pub priority: i64,
    /// Whether it is paused (waiting for quota, or its provider is
    /// unavailable).
    pub paused: bool,
    /// Whether its provider is unavailable: its API is failing and the
    /// launcher stopped calling it (our own component key
    /// `provider_unavailable`).
    pub unavailable: bool,
    /// The labels it can boot now (enabled, image ready) as its launcher
    /// last published them (our own component key `launchable_labels`);
    /// `None` when its launcher does not publish them (Python Nodepool),
    /// which counts as every label it serves.
    pub launchable: Option<Vec<String>>,
}

impl PoolInfo {
    /// A pool component as the planner sees it; `None` for a component
    /// without a launcher-pool id (not a pool). Missing keys take
    /// Nodepool's defaults (priority 100, not paused).
    ///
    /// ```no_run
    /// use nodepool_core::model::ComponentKind;
    /// use nodepool_core::planner::PoolInfo;
    /// # async fn pools(store: &nodepool_core::store::Store) -> Result<(), nodepool_core::store::StoreError> {
    /// let registered: Vec<PoolInfo> = store
    ///     .list_components(ComponentKind::Pool)
    ///     .await?
    ///     .records
    ///     .iter()
    ///     .filter_map(|(_, c)| PoolInfo::from_component(c))
    ///     .collect();
    /// # Ok(()) }
    /// ```
    pub fn from_component(c: &Component) -> Option<PoolInfo> {
        Some(PoolInfo {
            id: c.id.clone()?,
            provider: c.provider_name.clone().unwrap_or_default(),
            pool: c.name.clone().unwrap_or_default(),
            labels: c.supported_labels.clone().unwrap_or_default(),
            priority: c.priority.unwrap_or(100),
            paused: c.paused.unwrap_or(false),
            unavailable: c.provider_unavailable.is_some(),
            launchable: c.launchable_labels.clone(),
        })
    }
}

/// What the launcher knows about one of its clouds this pass.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ProviderView {
    /// The cloud's absolute limits (unlimited names are absent).
    pub limits: crate::model::Limits,
    /// Quota used by servers that are not this provider's live nodes.
    pub unmanaged: Resources,
    /// The cloud's own in-use totals, when it reports them.
    pub reported_usage: Option<Resources>,
    /// Quota of one node, by pool then label, from the flavors.
    pub label_resources: BTreeMap<String, BTreeMap<String, Resources>>,
    /// Availability zones of the cloud (used when a pool names none).
    pub availability_zones: Vec<String>,
    /// Cloud images (by config name) that the cloud does not have.
    pub missing_cloud_images: BTreeSet<String>,
    /// Every server of the cloud, present only on passes where a leak
    /// check is due.
    pub instances: Option<Vec<Instance>>,
    /// When the listing in `instances` was asked for (epoch seconds): a
    /// server that existed then is in it, if it still exists.
    pub instances_listed_at: Option<f64>,
    /// Every floating IP of the cloud, present only on passes where a
    /// check is due and the provider has `clean-floating-ips`.
    pub floating_ips: Option<Vec<CloudResource>>,
    /// The cloud's DOWN ports, present only on passes where a check is due
    /// and the provider has a `port-cleanup-interval`.
    pub ports: Option<Vec<CloudResource>>,
    /// When the listing in `ports` was asked for (epoch seconds).
    pub ports_listed_at: Option<f64>,
    /// Set while the cloud's API is failing and the launcher has stopped
    /// calling it (`launcher::health`): its pools take nothing, requests
    /// held there go back to the queue, its nodes wait for deletion.
    pub outage: Option<ProviderOutage>,
}

/// Why and since when a provider is unavailable.
#[derive(Clone, Debug, PartialEq)]
pub struct ProviderOutage {
    /// Epoch seconds it was marked unavailable.
    pub since: f64,
    /// The latest API failure.
    pub reason: String,
}

/// Everything the planner looks at.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Snapshot {
    /// Every node.
    pub nodes: Vec<NodeRecord>,
    /// Every request.
    pub requests: Vec<RequestRecord>,
    /// Registered pools of every launcher.
    pub pools: Vec<PoolInfo>,
    /// Builds, uploads and image flags.
    pub images: ImageState,
    /// Per configured provider.
    pub providers: BTreeMap<String, ProviderView>,
    /// Request lock directories.
    pub request_lock_dirs: Vec<RequestLockDir>,
    /// Node records without data (leftovers to delete).
    pub empty_nodes: Vec<String>,
}

/// What only this launcher process knows.
#[derive(Clone, Debug, PartialEq)]
pub struct LocalState {
    /// Our launcher-pool ids, by pool.
    pub pool_ids: BTreeMap<PoolKey, String>,
    /// Requests we accepted and hold the lock of.
    pub owned_requests: BTreeMap<String, PoolKey>,
    /// Our store session (min-ready requests are ephemeral records of it).
    pub session_id: i64,
    /// Cloud servers that looked leaked at the previous leak check, by
    /// (provider, external id).
    pub leak_suspects: BTreeSet<(String, String)>,
    /// Each provider's DOWN ports at the listing the next one is compared
    /// with (the port cleanup's first sighting).
    pub down_ports: BTreeMap<String, leaks::DownPorts>,
    /// Whether the set of registered pools has been stable long enough for
    /// every launcher to agree on who owns each label's min-ready. While a
    /// launcher joins or leaves, views differ for a moment and two could
    /// each believe they own a label; no min-ready request is created then.
    pub registry_settled: bool,
    /// The per-node summaries of the previous pass (`planner::summary`):
    /// keep one cache from pass to pass so a pass reads only the nodes that
    /// changed. It changes no decision; an empty one costs one full read.
    pub node_summaries: NodeSummaryCache,
}

impl Default for LocalState {
    fn default() -> Self {
        LocalState {
            pool_ids: BTreeMap::new(),
            owned_requests: BTreeMap::new(),
            session_id: 0,
            leak_suspects: BTreeSet::new(),
            down_ports: BTreeMap::new(),
            registry_settled: true,
            node_summaries: NodeSummaryCache::default(),
        }
    }
}

/// The image a node is booted from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LaunchImage {
    /// The newest ready upload of a diskimage to the provider.
    Upload {
        /// Diskimage name.
        image: String,
        /// Build id.
        build: String,
        /// Upload id.
        upload: String,
        /// Cloud image id.
        external_id: String,
    },
    /// A cloud image from the provider's `cloud-images`.
    Cloud {
        /// Its config name.
        name: String,
    },
}

/// Why a node is deleted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DeleteReason {
    /// An unlocked node in a state that means "done" (used, failed, ...).
    Unlocked,
    /// Ready for longer than its label's `max-ready-age`.
    MaxReadyAge,
    /// Held longer than `max-hold-age` or its `hold_expiration`.
    HoldExpired,
    /// An `init` node whose request is gone.
    LostInit,
    /// The oldest unused ready node, evicted to free quota for another label.
    Evicted,
    /// An unused ready node whose server is not in the cloud's listing.
    ServerGone,
}

impl DeleteReason {
    /// A short label for logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            DeleteReason::Unlocked => "unlocked",
            DeleteReason::MaxReadyAge => "max-ready-age",
            DeleteReason::HoldExpired => "hold-expired",
            DeleteReason::LostInit => "lost-init",
            DeleteReason::Evicted => "evicted",
            DeleteReason::ServerGone => "server-gone",
        }
    }
}

/// One thing to do. Actions about the same request must be executed in
/// order, and the rest of a request's actions skipped if one fails (e.g.
/// another launcher took the request lock first).
#[derive(Clone, Debug, PartialEq)]
pub enum Action {
    /// Lock the request (non-blocking), re-check it is `requested` and not
    /// declined by this pool, set it `pending`; it is ours from then on.
    Accept {
        /// Request id.
        request: String,
        /// The pool taking it.
        pool: PoolKey,
    },
    /// Add our pool ids to `declined_by`; set `failed` if `fail`, else
    /// back to `requested`. Deallocate the listed nodes first. Release our
    /// lock if we held it.
    Decline {
        /// Request id.
        request: String,
        /// Our pool ids declining it.
        by: Vec<String>,
        /// Whether every registered pool has now declined it.
        fail: bool,
        /// Ready nodes to give back.
        deallocate: Vec<String>,
        /// Why, for the log.
        reason: String,
    },
    /// Fail a request no registered pool can serve.
    Fail {
        /// Request id.
        request: String,
        /// Why, for the log.
        reason: String,
    },
    /// Reuse a ready, unallocated node for an owned request.
    Allocate {
        /// Request id.
        request: String,
        /// Node id.
        node: String,
    },
    /// Create a node record (`init`, allocated to the request), lock it, set
    /// it `building` and launch a server for it.
    Launch {
        /// The request it is for.
        request: String,
        /// Pool to launch in.
        pool: PoolKey,
        /// Label.
        label: String,
        /// Image to boot.
        image: LaunchImage,
        /// Availability zone for the whole node set, if chosen.
        az: Option<String>,
        /// Quota it will use.
        resources: Resources,
    },
    /// Every node is ready: record them in order, set `fulfilled`, release
    /// the request lock. The nodes stay allocated to the request.
    Fulfill {
        /// Request id.
        request: String,
        /// Node ids in `node_types` order.
        nodes: Vec<String>,
    },
    /// Give a request we hold back to the queue without declining it:
    /// its ready nodes back to the spares, its `init` nodes deleted, the
    /// request `requested` with no nodes, our lock released. For requests
    /// held on a pool whose provider became unavailable: another provider
    /// may take them, or they wait for this one to recover.
    HandBack {
        /// Request id.
        request: String,
        /// Why, for the log.
        reason: String,
    },
    /// Drop our hold on a request that vanished or is no longer pending.
    Release {
        /// Request id.
        request: String,
    },
    /// A pending request nobody holds the lock of: lock it, reset it to
    /// `requested` with no nodes, deallocate its nodes.
    ResetLost {
        /// Request id.
        request: String,
    },
    /// Submit one min-ready request (one node, `reuse: false`, priority
    /// 900, ephemeral).
    CreateMinReady {
        /// Label.
        label: String,
    },
    /// A finished min-ready request of ours: deallocate its nodes (they
    /// become ready spares) and delete it.
    CompleteMinReady {
        /// Request id.
        request: String,
    },
    /// Clear a ready node's `allocated_to` (its request is gone or back in
    /// the queue).
    Deallocate {
        /// Node id.
        node: String,
    },
    /// Lock the node, set it `deleting`, delete its server, delete the record.
    DeleteNode {
        /// Node id.
        node: String,
        /// Why.
        reason: DeleteReason,
    },
    /// Remove a stale request lock directory.
    DeleteRequestLockDir {
        /// Request id.
        request: String,
    },
    /// Remove a node record without data.
    DeleteEmptyNode {
        /// Node id.
        node: String,
    },
    /// Delete a server the store does not know (seen leaked twice).
    DeleteLeakedInstance {
        /// Provider.
        provider: String,
        /// Cloud server id.
        external_id: String,
    },
    /// Delete an unattached floating IP (`clean-floating-ips`) or a port
    /// DOWN for `port-cleanup-interval`.
    DeleteLeakedResource {
        /// Provider.
        provider: String,
        /// Floating IP or port.
        kind: ResourceKind,
        /// Its cloud id.
        id: String,
    },
}

impl Action {
    /// The request an action is about, if any.
    pub fn request(&self) -> Option<&str> {
        match self {
            Action::Accept { request, .. }
            | Action::Decline { request, .. }
            | Action::Fail { request, .. }
            | Action::Allocate { request, .. }
            | Action::Launch { request, .. }
            | Action::Fulfill { request, .. }
            | Action::HandBack { request, .. }
            | Action::Release { request }
            | Action::ResetLost { request }
            | Action::CompleteMinReady { request } => Some(request),
            _ => None,
        }
    }
}

/// A pool's state after this pass.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PoolStatus {
    /// Which pool.
    pub pool: PoolKey,
    /// Whether it is waiting for quota (it takes no new requests).
    pub paused: bool,
    /// Requests it could take (Nodepool's `addressable_requests` gauge).
    pub addressable_requests: usize,
    /// The labels it can boot now: none if it is disabled or its provider
    /// handles no requests, else those whose image is ready; sorted. The
    /// launcher publishes them in the pool's component
    /// ([`PoolInfo::launchable`]) so that every launcher picks a label's
    /// min-ready owner among the pools that can boot it.
    pub launchable: Vec<String>,
}

/// The result of a planning pass.
#[derive(Clone, Default, PartialEq)]
pub struct Plan {
    /// What to do, in order.
    pub actions: Vec<Action>,
    /// Our pools' states.
    pub pools: Vec<PoolStatus>,
    /// Servers that look leaked now (keep for the next leak check).
    pub leak_suspects: BTreeSet<(String, String)>,
    /// Each provider's DOWN ports to compare the next listing with (keep
    /// for the next pass, as [`LocalState::down_ports`]).
    pub down_ports: BTreeMap<String, leaks::DownPorts>,
}

// By hand so that a plan without port cleanup state prints as it did
// before the field existed: the planner benchmark's digest (the `Debug`
// text of a plan) stays comparable across versions.
impl std::fmt::Debug for Plan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut d = f.debug_struct("Plan");
        d.field("actions", &self.actions)
            .field("pools", &self.pools)
            .field("leak_suspects", &self.leak_suspects);
        if !self.down_ports.is_empty() {
            d.field("down_ports", &self.down_ports);
        }
        d.finish()
    }
}

/// A ready node missing from a server listing is taken for dead only if it
/// was ready this long before the listing was asked for: listings may be
/// served from a cache a moment old, and clocks of hosts differ.
pub const SERVER_GONE_MARGIN_SECS: f64 = 60.0;

/// Unlocked `init` nodes younger than this are left alone: their creator may
/// be about to lock them.
pub const INIT_GRACE_SECS: f64 = 60.0;
/// Request lock directories of missing requests are removed after this (8 h).
pub const REQUEST_LOCK_CLEANUP_SECS: f64 = 8.0 * 3600.0;

/// The sort key of a request: priority prefix, relative priority, sequence.
pub fn request_order_key(id: &str, relative_priority: i64) -> (String, i64, String) {
    match parse_request_id(id) {
        Some((prio, seq)) => (prio.to_owned(), relative_priority, seq.to_owned()),
        None => ("~".to_owned(), relative_priority, id.to_owned()),
    }
}

/// [`request_order_key`] without allocating.
pub(crate) fn request_order(id: &str, relative_priority: i64) -> (&str, i64, &str) {
    match parse_request_id(id) {
        Some((prio, seq)) => (prio, relative_priority, seq),
        None => ("~", relative_priority, id),
    }
}

/// Plans one pass for this launcher: what to do about every request,
/// node and leaked server in `snapshot`, given the configuration, the time
/// and what only this launcher knows. Pure: the same arguments give the
/// same plan, and nothing is read or changed anywhere.
///
/// ```no_run
/// use nodepool_core::config::Config;
/// use nodepool_core::planner::{LocalState, Snapshot, plan};
///
/// let config = Config::from_yaml(&std::fs::read_to_string("nodepool.yaml")?)?;
/// // A launcher reads the snapshot from the store and its clouds
/// // (`examples/programs/what_if.rs` builds one from a store export).
/// let snapshot = Snapshot::default();
/// let now = 1_800_000_000.0;
/// let plan = plan(&snapshot, &config, now, &LocalState::default());
/// for action in &plan.actions {
///     println!("{action:?}");
/// }
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn plan(snapshot: &Snapshot, config: &Config, now: f64, local: &LocalState) -> Plan {
    let mut plan = Plan::default();
    let mut index = index::Index::build(snapshot, config, local);
    let mut quota = quota::QuotaState::new(
        snapshot,
        config,
        &index.pool_used,
        &index.unpooled_used,
        |i| index::node_resources(snapshot, i),
    );
    let mut freed = cleanup::lost_requests(snapshot, &index, &mut plan);
    let (deallocated, deleted) = cleanup::nodes(snapshot, config, now, local, &index, &mut plan);
    freed.extend(deallocated);
    // Given-back nodes stop counting against their tenant.
    for &i in &freed {
        let n = &snapshot.nodes[i].node;
        quota.retag(
            n.tenant_name.as_deref(),
            None,
            &index::node_resources(snapshot, i),
        );
    }
    index.update_free(snapshot, &freed, &deleted);
    let registry = registry::Registry::build(snapshot, config, &index);
    requests::plan_requests(
        snapshot, config, now, local, &index, &registry, &mut quota, &mut plan,
    );
    cleanup::min_ready(snapshot, config, local, &index, &registry, &mut plan);
    cleanup::housekeeping(snapshot, config, now, local, &index, &mut plan);
    plan
}

#[cfg(test)]
mod tests {
    use super::{Plan, PoolInfo};

    #[test]
    fn a_plan_without_port_state_prints_as_before_the_field() {
        // The derived `Debug` of the three fields: the planner benchmark's
        // digests from before the port cleanup stay comparable.
        let mut p = Plan::default();
        p.leak_suspects.insert(("p1".into(), "srv".into()));
        assert_eq!(
            format!("{p:?}"),
            r#"Plan { actions: [], pools: [], leak_suspects: {("p1", "srv")} }"#
        );
        p.down_ports
            .insert("p1".into(), super::leaks::DownPorts::default());
        assert!(format!("{p:?}").contains("down_ports: {\"p1\": DownPorts"));
    }
    use crate::model::{Component, ComponentKind, ProviderUnavailable};

    #[test]
    fn pool_components_become_pool_infos() {
        let mut c = Component::new(ComponentKind::Pool, "host1", "1.0");
        assert_eq!(PoolInfo::from_component(&c), None, "no launcher-pool id");
        c.id = Some("host1-PoolWorker.p1-main-abc".into());
        c.provider_name = Some("p1".into());
        c.name = Some("main".into());
        c.supported_labels = Some(vec!["small".into()]);
        assert_eq!(
            PoolInfo::from_component(&c),
            Some(PoolInfo {
                id: "host1-PoolWorker.p1-main-abc".into(),
                provider: "p1".into(),
                pool: "main".into(),
                labels: vec!["small".into()],
                priority: 100,
                paused: false,
                unavailable: false,
                launchable: None,
            })
        );
        c.priority = Some(50);
        c.paused = Some(true);
        c.provider_unavailable = Some(ProviderUnavailable {
            reason: "timed out".into(),
            since: 1.0,
        });
        let p = PoolInfo::from_component(&c).expect("a pool");
        assert_eq!((p.priority, p.paused, p.unavailable), (50, true, true));
    }
}
