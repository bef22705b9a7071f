//! The compact per-node summary the index reads instead of the node
//! records: a pass needs a few fields of every node, and reading them from
//! the ~1 KB records (and the provider and pool name strings behind them)
//! costs several cache misses per node, which dominates a pass at 100k
//! nodes. The summaries are packed in one array, aligned with the
//! snapshot's nodes, and kept from pass to pass: a node's summary is
//! computed again only when its record changed. Requests get the same
//! treatment ([`RequestSummary`]): a backlog pass looks at every waiting
//! request, and the fields pickup needs are spread over the request's
//! record, its label list and the label strings.
//!
//! A summary belongs to one `Arc<Node>` (`Arc<NodeRequest>`), and the
//! cache holds a clone of that `Arc`: a record that changes is a new
//! `Arc` (the store decodes a new version into a new one, and
//! `Arc::make_mut` on a record the cache shares copies it first), so a
//! summary can never describe an older version of its record. Whatever else a summary depends on (the
//! configuration's providers and pools, our launcher-pool ids) is compared
//! every pass, and the cache starts over when it differs.

use std::sync::{Arc, Mutex, MutexGuard};

use super::fast::{FastMap, FastSet, Key, bytes_eq};
use super::{LocalState, Snapshot};
use crate::config::Config;
use crate::model::{Node, NodeRequest, NodeState, RequestState, Resources};
use crate::store::{NodeRecord, RequestRecord};

/// What a pass reads of one node, packed in 24 bytes: the node's quota is
/// a number in the cache's table of distinct quotas ([`Quotas`]), as most
/// nodes share one of a few flavors' (a `Resources` inline is 72 bytes).
#[derive(Clone, Copy, Debug)]
pub(crate) struct NodeSummary {
    /// When it entered its state (epoch seconds).
    pub state_time: f64,
    /// Our pool position, or `u32::MAX`.
    pub pool: u32,
    /// Our provider position, or `u32::MAX`.
    pub provider: u32,
    /// The node's recorded quota, by number in [`Quotas`]; [`NO_QUOTA`]
    /// when the record has none (its quota then comes from the cloud's
    /// flavors, which may change without the node changing, so it is
    /// looked up every pass).
    pub quota: u32,
    /// Its state.
    pub state: NodeState,
    /// Whether it is allocated to anything.
    pub allocated: bool,
    /// Whether it is a launch in flight counted against its provider's
    /// `max-concurrency` (`init`/`building`, launched by one of our pools,
    /// of a provider with a limit).
    pub in_flight: bool,
}

/// [`NodeSummary::quota`] of a node without recorded resources.
pub(crate) const NO_QUOTA: u32 = u32::MAX;

/// The distinct quotas of the summarized nodes, numbered.
#[derive(Default)]
pub(crate) struct Quotas {
    list: Vec<Resources>,
    numbers: FastMap<Resources, u32>,
}

impl Quotas {
    /// The number of a quota, added if new.
    fn intern(&mut self, r: &Resources) -> u32 {
        if let Some(&k) = self.numbers.get(r) {
            return k;
        }
        // Past u32::MAX - 1 distinct quotas (never in practice) a node
        // would be read as having none; the cache starts over long before
        // (`MAX_STALE_QUOTAS`).
        let k = u32::try_from(self.list.len()).unwrap_or(NO_QUOTA);
        self.list.push(r.clone());
        self.numbers.insert(r.clone(), k);
        k
    }

    /// A quota by number.
    pub fn get(&self, k: u32) -> Option<&Resources> {
        self.list.get(k as usize)
    }

    fn len(&self) -> usize {
        self.list.len()
    }
}

/// What a pass reads of one request, packed in 32 bytes: a backlog pass
/// looks at every waiting request, and the fields pickup needs of most
/// of them are spread over the request's record, its label list and the
/// label strings.
#[derive(Clone, Copy, Debug)]
pub(crate) struct RequestSummary {
    /// When it entered its state (epoch seconds).
    pub state_time: f64,
    /// Its relative priority.
    pub relative_priority: i64,
    /// Its labels in order, by number in the cache's label table
    /// ([`Summaries::label_names`]), the first `label_count`.
    pub labels: [u32; 3],
    /// How many labels it asks for; [`MANY_LABELS`] for more than three
    /// (pickup then reads them from the record).
    pub label_count: u8,
    /// Its state.
    pub state: RequestState,
    /// Whether Nodepool created it for min-ready.
    pub min_ready: bool,
    /// Whether pickup needs nothing else of the record: its node types are
    /// a valid list, nobody declined it, and it names no provider and no
    /// tenant.
    pub plain: bool,
}

/// [`RequestSummary::label_count`] of a request for more than three labels.
pub(crate) const MANY_LABELS: u8 = u8::MAX;

impl RequestSummary {
    /// Its labels by number, if it asks for at most three.
    pub fn labels(&self) -> Option<&[u32]> {
        self.labels.get(..usize::from(self.label_count))
    }
}

/// The label names requests ask for, numbered.
#[derive(Default)]
struct Labels {
    names: Vec<Arc<str>>,
    numbers: FastMap<Arc<str>, u32>,
}

impl Labels {
    fn intern(&mut self, name: &str) -> Option<u32> {
        if let Some(&k) = self.numbers.get(name) {
            return Some(k);
        }
        let k = u32::try_from(self.names.len()).ok()?;
        let name: Arc<str> = Arc::from(name);
        self.names.push(Arc::clone(&name));
        self.numbers.insert(name, k);
        Some(k)
    }
}

fn summarize_request(r: &NodeRequest, labels: &mut Labels) -> RequestSummary {
    let mut numbers = [0; 3];
    let mut label_count = u8::try_from(r.node_types.len())
        .ok()
        .filter(|&n| n <= 3)
        .unwrap_or(MANY_LABELS);
    for (slot, l) in numbers.iter_mut().zip(&r.node_types) {
        match labels.intern(l) {
            Some(k) => *slot = k,
            None => label_count = MANY_LABELS,
        }
    }
    RequestSummary {
        state_time: r.state_time,
        relative_priority: r.relative_priority,
        labels: numbers,
        label_count,
        state: r.state,
        min_ready: r.is_min_ready(),
        plain: r.malformed_node_types.is_none()
            && r.declined_by.is_empty()
            && r.provider.is_none()
            && r.tenant_name.is_none(),
    }
}

/// The position of a node's provider and pool in the configuration.
pub(crate) struct Positions<'a> {
    provider_pos: FastMap<Key<'a>, usize>,
    first_pool: Vec<usize>,
    our_ids: FastSet<Key<'a>>,
    cfg: &'a Config,
}

impl<'a> Positions<'a> {
    /// Lookups for `cfg` and our pool ids.
    pub fn new(cfg: &'a Config, local: &'a LocalState) -> Self {
        // Provider names are unique in a (validated) configuration, and
        // pool names within a provider: a node's pool is found by hashing
        // its provider name only.
        let provider_pos = cfg
            .providers
            .iter()
            .enumerate()
            .map(|(pi, p)| (Key(&p.name), pi))
            .collect();
        let mut first_pool = Vec::with_capacity(cfg.providers.len());
        let mut n = 0;
        for p in &cfg.providers {
            first_pool.push(n);
            n += p.pools.len();
        }
        Positions {
            provider_pos,
            first_pool,
            our_ids: local.pool_ids.values().map(|id| Key(id)).collect(),
            cfg,
        }
    }

    fn summarize(&self, n: &Node, quotas: &mut Quotas) -> NodeSummary {
        let provider = self.provider_pos.get(&Key(&n.provider)).copied();
        let pool = provider.and_then(|pi| {
            let qi = self.cfg.providers[pi]
                .pools
                .iter()
                .position(|q| bytes_eq(q.name.as_bytes(), n.pool.as_bytes()))?;
            Some(self.first_pool[pi] + qi)
        });
        let pack = |p: Option<usize>| p.and_then(|p| u32::try_from(p).ok()).unwrap_or(u32::MAX);
        // Only counts of our providers with a concurrency limit are ever
        // asked for (matching launcher ids is not free).
        let in_flight = matches!(n.state, NodeState::Init | NodeState::Building)
            && provider.is_some_and(|pi| self.cfg.providers[pi].max_concurrency.is_some())
            && n.launcher
                .as_deref()
                .is_some_and(|l| self.our_ids.contains(&Key(l)));
        NodeSummary {
            quota: n.resources.as_ref().map_or(NO_QUOTA, |r| quotas.intern(r)),
            state_time: n.state_time,
            pool: pack(pool),
            provider: pack(provider),
            state: n.state,
            allocated: n.allocated_to.is_some(),
            in_flight,
        }
    }

    /// What the summaries depend on besides their nodes.
    fn context(&self, local: &LocalState) -> Context {
        Context {
            pools: self
                .cfg
                .providers
                .iter()
                .map(|p| {
                    (
                        p.name.clone(),
                        p.max_concurrency.is_some(),
                        p.pools.iter().map(|q| q.name.clone()).collect(),
                    )
                })
                .collect(),
            our_ids: local.pool_ids.values().cloned().collect(),
        }
    }

    /// Whether summaries computed for `ctx` hold for this configuration
    /// and these pool ids (compared without copying them).
    fn fits(&self, ctx: &Context, local: &LocalState) -> bool {
        ctx.pools.len() == self.cfg.providers.len()
            && ctx
                .pools
                .iter()
                .zip(&self.cfg.providers)
                .all(|((name, limited, pools), p)| {
                    *name == p.name
                        && *limited == p.max_concurrency.is_some()
                        && pools.len() == p.pools.len()
                        && pools.iter().zip(&p.pools).all(|(a, q)| *a == q.name)
                })
            && ctx.our_ids.len() == local.pool_ids.len()
            && ctx
                .our_ids
                .iter()
                .zip(local.pool_ids.values())
                .all(|(a, b)| a == b)
    }
}

/// The configuration and pool ids a cache's summaries were computed for.
#[derive(Clone, Debug, Default, PartialEq)]
struct Context {
    /// Per provider: its name, whether it has a `max-concurrency`, its
    /// pool names.
    pools: Vec<(String, bool, Vec<String>)>,
    our_ids: Vec<String>,
}

#[derive(Default)]
pub(crate) struct Entries {
    context: Context,
    /// The nodes summarized, aligned with the nodes of the last snapshot
    /// planned (apart from the summaries: a pass reads these only to
    /// compare them with the snapshot's).
    nodes: Vec<Arc<Node>>,
    /// Their summaries.
    summaries: Vec<NodeSummary>,
    /// The quotas the summaries refer to.
    quotas: Quotas,
    /// The requests summarized, aligned with the requests of the last
    /// snapshot planned.
    requests: Vec<Arc<NodeRequest>>,
    /// Their summaries.
    request_summaries: Vec<RequestSummary>,
    /// The labels the request summaries refer to.
    labels: Labels,
}

/// How many more distinct quotas than nodes (labels than three per
/// request) a cache may hold (those of nodes and requests gone, never
/// removed one by one) before it starts over.
const MAX_STALE: usize = 1024;

/// Per-node summaries kept from one planning pass to the next (see the
/// module documentation): [`LocalState::node_summaries`]. Clones share the
/// cache. It changes no decision, only how fast a pass reads the nodes; a
/// new (empty) one makes the next pass compute every summary.
#[derive(Clone, Default)]
pub struct NodeSummaryCache {
    entries: Arc<Mutex<Entries>>,
}

impl std::fmt::Debug for NodeSummaryCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("NodeSummaryCache")
    }
}

// A cache is not state: two local states that differ only in it plan the
// same.
impl PartialEq for NodeSummaryCache {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl NodeSummaryCache {
    /// The summaries of `s.nodes`, in order: those of unchanged records
    /// from the cache, the others computed (and kept for the next pass).
    /// While another pass holds the cache, this one computes its own.
    pub(crate) fn summaries(
        &self,
        s: &Snapshot,
        pos: &Positions<'_>,
        local: &LocalState,
    ) -> Summaries<'_> {
        let Ok(mut entries) = self.entries.try_lock() else {
            let mut own = Box::<Entries>::default();
            refresh(&mut own, &s.nodes, pos);
            refresh_requests(&mut own, &s.requests);
            return Summaries::Own(own);
        };
        if !pos.fits(&entries.context, local)
            || entries.quotas.len() > s.nodes.len().saturating_mul(2) + MAX_STALE
        {
            entries.context = pos.context(local);
            entries.nodes = Vec::new();
            entries.summaries = Vec::new();
            entries.quotas = Quotas::default();
        }
        if entries.labels.names.len() > s.requests.len().saturating_mul(3) + MAX_STALE {
            entries.requests = Vec::new();
            entries.request_summaries = Vec::new();
            entries.labels = Labels::default();
        }
        refresh(&mut entries, &s.nodes, pos);
        refresh_requests(&mut entries, &s.requests);
        Summaries::Cached(entries)
    }
}

/// The summaries of a snapshot's nodes, aligned with them.
pub(crate) enum Summaries<'c> {
    /// Read from (and kept in) the cache, locked while in use.
    Cached(MutexGuard<'c, Entries>),
    /// Computed for this pass only.
    Own(Box<Entries>),
}

impl Summaries<'_> {
    fn entries(&self) -> &Entries {
        match self {
            Summaries::Cached(e) => e,
            Summaries::Own(e) => e,
        }
    }

    /// The summaries, aligned with the snapshot's nodes.
    pub fn all(&self) -> &[NodeSummary] {
        &self.entries().summaries
    }

    /// A node's recorded quota ([`NodeSummary::quota`]); `None` when the
    /// record has none.
    pub fn quota(&self, k: u32) -> Option<&Resources> {
        self.entries().quotas.get(k)
    }

    /// The request summaries, aligned with the snapshot's requests.
    pub fn requests(&self) -> &[RequestSummary] {
        &self.entries().request_summaries
    }

    /// The label names [`RequestSummary::labels`] refers to, by number.
    pub fn label_names(&self) -> &[Arc<str>] {
        &self.entries().labels.names
    }
}

/// Makes `e` aligned with `nodes`, computing the summaries of records not
/// in it.
fn refresh(e: &mut Entries, nodes: &[NodeRecord], pos: &Positions<'_>) {
    let Entries {
        nodes: cached,
        summaries,
        quotas,
        ..
    } = e;
    if cached.len() == nodes.len() {
        // The usual pass: the same nodes, a few of them changed.
        for ((node, sum), rec) in cached.iter_mut().zip(summaries.iter_mut()).zip(nodes) {
            if !Arc::ptr_eq(node, &rec.node) {
                *node = Arc::clone(&rec.node);
                *sum = pos.summarize(&rec.node, quotas);
            }
        }
        return;
    }
    // Nodes came or went: find the unchanged ones by identity. The old
    // entries keep their nodes alive until the lookups are done, so no
    // address is reused meanwhile.
    let mut old: FastMap<*const Node, (Arc<Node>, NodeSummary)> = std::mem::take(cached)
        .into_iter()
        .zip(std::mem::take(summaries))
        .map(|entry| (Arc::as_ptr(&entry.0), entry))
        .collect();
    cached.reserve(nodes.len());
    summaries.reserve(nodes.len());
    for rec in nodes {
        let (node, sum) = match old.remove(&Arc::as_ptr(&rec.node)) {
            Some(entry) => entry,
            None => (Arc::clone(&rec.node), pos.summarize(&rec.node, quotas)),
        };
        cached.push(node);
        summaries.push(sum);
    }
}

/// Makes the request summaries of `e` aligned with `requests`, computing
/// those of records not in it.
fn refresh_requests(e: &mut Entries, requests: &[RequestRecord]) {
    let Entries {
        requests: cached,
        request_summaries: summaries,
        labels,
        ..
    } = e;
    if cached.len() == requests.len() {
        for ((req, sum), rec) in cached.iter_mut().zip(summaries.iter_mut()).zip(requests) {
            if !Arc::ptr_eq(req, &rec.request) {
                *req = Arc::clone(&rec.request);
                *sum = summarize_request(&rec.request, labels);
            }
        }
        return;
    }
    let mut old: FastMap<*const NodeRequest, (Arc<NodeRequest>, RequestSummary)> =
        std::mem::take(cached)
            .into_iter()
            .zip(std::mem::take(summaries))
            .map(|entry| (Arc::as_ptr(&entry.0), entry))
            .collect();
    cached.reserve(requests.len());
    summaries.reserve(requests.len());
    for rec in requests {
        let (req, sum) = match old.remove(&Arc::as_ptr(&rec.request)) {
            Some(entry) => entry,
            None => (
                Arc::clone(&rec.request),
                summarize_request(&rec.request, labels),
            ),
        };
        cached.push(req);
        summaries.push(sum);
    }
}
