//! The compact per-node summary the index reads instead of the node
//! records: a pass needs a few fields of every node, and reading them from
//! the ~1 KB records (and the provider and pool name strings behind them)
//! costs several cache misses per node, which dominates a pass at 100k
//! nodes. The summaries are packed in one array, aligned with the
//! snapshot's nodes, and kept from pass to pass: a node's summary is
//! computed again only when its record changed.
//!
//! A summary belongs to one `Arc<Node>`, and the cache holds a clone of
//! that `Arc`: a record that changes is a new `Arc` (the store decodes a
//! new version into a new one, and `Arc::make_mut` on a node the cache
//! shares copies it first), so a summary can never describe an older
//! version of its node. Whatever else a summary depends on (the
//! configuration's providers and pools, our launcher-pool ids) is compared
//! every pass, and the cache starts over when it differs.

use std::sync::{Arc, Mutex, MutexGuard};

use super::fast::{FastMap, FastSet, Key, bytes_eq};
use super::{LocalState, Snapshot};
use crate::config::Config;
use crate::model::{Node, NodeState, Resources};
use crate::store::NodeRecord;

/// What a pass reads of one node, packed.
#[derive(Clone, Debug)]
pub(crate) struct NodeSummary {
    /// The node's recorded quota; `None` when the record has none (its
    /// quota then comes from the cloud's flavors, which may change without
    /// the node changing, so it is looked up every pass).
    pub resources: Option<Resources>,
    /// When it entered its state (epoch seconds).
    pub state_time: f64,
    /// Our pool position, or `u32::MAX`.
    pub pool: u32,
    /// Our provider position, or `u32::MAX`.
    pub provider: u32,
    /// Its state.
    pub state: NodeState,
    /// Whether it is allocated to anything.
    pub allocated: bool,
    /// Whether it is a launch in flight counted against its provider's
    /// `max-concurrency` (`init`/`building`, launched by one of our pools,
    /// of a provider with a limit).
    pub in_flight: bool,
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

    fn summarize(&self, n: &Node) -> NodeSummary {
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
            resources: n.resources.clone(),
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
    /// Aligned with the nodes of the last snapshot planned.
    nodes: Vec<(Arc<Node>, NodeSummary)>,
}

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
            return Summaries::Own(s.nodes.iter().map(|r| pos.summarize(&r.node)).collect());
        };
        if !pos.fits(&entries.context, local) {
            *entries = Entries {
                context: pos.context(local),
                nodes: Vec::new(),
            };
        }
        refresh(&mut entries.nodes, &s.nodes, pos);
        Summaries::Cached(entries)
    }
}

/// The summaries of a snapshot's nodes, aligned with them.
pub(crate) enum Summaries<'c> {
    /// Read from (and kept in) the cache, locked while in use.
    Cached(MutexGuard<'c, Entries>),
    /// Computed for this pass only.
    Own(Vec<NodeSummary>),
}

impl Summaries<'_> {
    /// The summary of node `i`.
    pub fn get(&self, i: usize) -> &NodeSummary {
        match self {
            Summaries::Cached(e) => &e.nodes[i].1,
            Summaries::Own(v) => &v[i],
        }
    }
}

/// Makes `cached` aligned with `nodes`, computing the summaries of
/// records not in it.
fn refresh(cached: &mut Vec<(Arc<Node>, NodeSummary)>, nodes: &[NodeRecord], pos: &Positions<'_>) {
    if cached.len() == nodes.len() {
        // The usual pass: the same nodes, a few of them changed.
        for (entry, rec) in cached.iter_mut().zip(nodes) {
            if !Arc::ptr_eq(&entry.0, &rec.node) {
                *entry = (Arc::clone(&rec.node), pos.summarize(&rec.node));
            }
        }
        return;
    }
    // Nodes came or went: find the unchanged ones by identity. The old
    // entries keep their nodes alive until the lookups are done, so no
    // address is reused meanwhile.
    let mut old: FastMap<*const Node, (Arc<Node>, NodeSummary)> = std::mem::take(cached)
        .into_iter()
        .map(|entry| (Arc::as_ptr(&entry.0), entry))
        .collect();
    cached.reserve(nodes.len());
    for rec in nodes {
        let entry = match old.remove(&Arc::as_ptr(&rec.node)) {
            Some(entry) => entry,
            None => (Arc::clone(&rec.node), pos.summarize(&rec.node)),
        };
        cached.push(entry);
    }
}
