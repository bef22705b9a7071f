//! Request pickup (reference §2.3), decline (§2.4) and fulfilment (§2.5).

use std::borrow::Cow;

use super::fast::{FastMap, FastSet, Key, bytes_eq};
use super::rendezvous_owner;

use super::quota::{QuotaBlock, QuotaState, one_instance};
use super::{
    Action, DeleteReason, LaunchImage, LocalState, Plan, PoolKey, PoolStatus, Snapshot,
    request_order, request_order_key,
};
use crate::config::{Config, ImageSource};
use crate::model::{BuildState, NodeState, RequestState, Resources, UploadState};
use crate::store::RequestRecord;

/// What one of our pools needs to know about a label it serves.
#[derive(Debug)]
pub(crate) struct LabelInfo<'a> {
    /// Quota of one node.
    pub resources: Cow<'a, Resources>,
    /// The image a launch would boot now, if any.
    pub image: Option<ImageRef<'a>>,
}

/// The image a launch would boot, by reference: a [`LaunchImage`] is built
/// only when a launch is planned, not for every label of every pass.
#[derive(Clone, Copy, Debug)]
pub(crate) enum ImageRef<'a> {
    /// The newest ready upload of a diskimage to the provider.
    Upload(&'a crate::store::UploadRecord),
    /// A cloud image, by config name.
    Cloud(&'a str),
}

impl ImageRef<'_> {
    fn to_launch_image(self) -> LaunchImage {
        match self {
            ImageRef::Upload(u) => LaunchImage::Upload {
                image: u.image.clone(),
                build: u.build_id.clone(),
                upload: u.id.clone(),
                external_id: u.upload.external_id.clone().unwrap_or_default(),
            },
            ImageRef::Cloud(name) => LaunchImage::Cloud {
                name: name.to_owned(),
            },
        }
    }
}

/// One of this launcher's pools.
#[derive(Debug)]
pub(crate) struct OurPool<'a> {
    pub key: PoolKey,
    pub id: String,
    pub provider: usize,
    pub pool: usize,
    pub priority: i64,
    /// The labels it serves.
    pub labels: FastMap<Key<'a>, LabelInfo<'a>>,
}

/// Lookups built once per pass. Pools are addressed by position in the
/// configuration (`our_pools`), labels by `&str` into the snapshot and
/// the configuration.
#[derive(Debug)]
pub(crate) struct Index<'a> {
    /// Where each node is, aligned with `snapshot.nodes`.
    places: Vec<Place>,
    /// Quota used by the nodes of each of our pools.
    pub pool_used: Vec<Resources>,
    /// Quota used per provider position by nodes of pools no longer
    /// configured.
    pub unpooled_used: Vec<Resources>,
    /// Ready nodes allocated to nothing (any pool, locked or not).
    pub ready_unallocated: Vec<usize>,
    /// Requests waiting for a launcher (`requested`, unlocked, not ours).
    pub waiting: Vec<usize>,
    /// Pending requests nobody holds (unlocked, not ours).
    pub lost: Vec<usize>,
    /// Requests Nodepool made for min-ready.
    pub min_ready_requests: Vec<usize>,
    /// Node indices allocated to each request.
    pub allocations: FastMap<&'a str, Vec<usize>>,
    /// Ready, unallocated, unlocked nodes per (pool position, label), oldest first.
    pub ready_free: FastMap<(usize, &'a str), Vec<usize>>,
    /// Ready, unallocated, unlocked nodes per pool position, oldest first.
    pub ready_free_in_pool: Vec<Vec<usize>>,
    /// Nodes being deleted per pool position.
    pub deleting_in_pool: Vec<usize>,
    /// Launches in flight per provider position (init/building nodes
    /// launched by our pools), counted for providers with a
    /// `max-concurrency` only.
    pub in_flight: Vec<usize>,
    /// Per provider position: why it is unavailable (its API is failing),
    /// if it is.
    pub outage: Vec<Option<&'a super::ProviderOutage>>,
    /// This launcher's pools, in configuration order.
    pub our_pools: Vec<OurPool<'a>>,
    /// The newest ready upload per (provider, diskimage).
    pub newest_upload: FastMap<(Key<'a>, Key<'a>), &'a crate::store::UploadRecord>,
    /// Request index by id, built on first use: most passes look up few
    /// requests or none.
    requests: std::cell::OnceCell<FastMap<&'a str, usize>>,
    all_requests: &'a [RequestRecord],
    /// Nodes given back this pass (deallocated or freed from a lost request).
    pub freed: FastSet<usize>,
}

fn label_resources(s: &Snapshot, provider: &str, pool: &str, label: &str) -> Option<Resources> {
    s.providers
        .get(provider)?
        .label_resources
        .get(pool)?
        .get(label)
        .cloned()
}

/// The quota of node `i`: its recorded resources, else its label's flavor
/// in its pool, else one instance.
pub(crate) fn node_resources(s: &Snapshot, i: usize) -> Cow<'_, Resources> {
    let n = &s.nodes[i].node;
    match &n.resources {
        Some(r) => Cow::Borrowed(r),
        None => Cow::Owned(
            n.node_type
                .first()
                .and_then(|l| label_resources(s, &n.provider, &n.pool, l))
                .unwrap_or_else(one_instance),
        ),
    }
}

/// Where a node is: our pool position and provider position, if ours
/// (packed: there is one per node, and the index is walked every pass).
#[derive(Clone, Copy, Debug)]
struct Place {
    pool: u32,
    provider: u32,
}

impl Place {
    const NONE: u32 = u32::MAX;

    fn new(pool: Option<usize>, provider: Option<usize>) -> Self {
        let pack = |p: Option<usize>| p.and_then(|p| u32::try_from(p).ok()).unwrap_or(Self::NONE);
        Place {
            pool: pack(pool),
            provider: pack(provider),
        }
    }
}

impl<'a> Index<'a> {
    pub fn build(s: &'a Snapshot, cfg: &'a Config, local: &LocalState) -> Self {
        let our_ids: FastSet<Key<'_>> = local.pool_ids.values().map(|id| Key(id)).collect();
        let mut idx = Index {
            places: Vec::with_capacity(s.nodes.len()),
            pool_used: Vec::new(),
            unpooled_used: vec![Resources::new(); cfg.providers.len()],
            ready_unallocated: Vec::new(),
            waiting: Vec::new(),
            lost: Vec::new(),
            min_ready_requests: Vec::new(),
            allocations: FastMap::default(),
            ready_free: FastMap::default(),
            ready_free_in_pool: Vec::new(),
            deleting_in_pool: Vec::new(),
            in_flight: vec![0; cfg.providers.len()],
            outage: cfg
                .providers
                .iter()
                .map(|p| s.providers.get(&p.name).and_then(|v| v.outage.as_ref()))
                .collect(),
            our_pools: Vec::new(),
            newest_upload: FastMap::default(),
            requests: std::cell::OnceCell::new(),
            all_requests: &s.requests,
            freed: FastSet::default(),
        };
        // Provider names are unique in a (validated) configuration, and
        // pool names within a provider: a node's pool is found by hashing
        // its provider name only.
        let provider_pos: FastMap<Key<'_>, usize> = cfg
            .providers
            .iter()
            .enumerate()
            .map(|(pi, p)| (Key(&p.name), pi))
            .collect();
        let mut first_pool = Vec::with_capacity(cfg.providers.len());
        for (pi, p) in cfg.providers.iter().enumerate() {
            first_pool.push(idx.our_pools.len());
            for (qi, pool) in p.pools.iter().enumerate() {
                let key = PoolKey::new(&p.name, &pool.name);
                let id = local
                    .pool_ids
                    .get(&key)
                    .cloned()
                    .unwrap_or_else(|| format!("local-PoolWorker.{}-{}", p.name, pool.name));
                idx.our_pools.push(OurPool {
                    key,
                    id,
                    provider: pi,
                    pool: qi,
                    priority: pool.priority.unwrap_or(p.priority),
                    labels: FastMap::default(),
                });
            }
        }
        // One look at every request.
        for (i, r) in s.requests.iter().enumerate() {
            let req = &r.request;
            if req.is_min_ready() {
                idx.min_ready_requests.push(i);
            }
            let queue = match req.state {
                RequestState::Requested => &mut idx.waiting,
                RequestState::Pending => &mut idx.lost,
                _ => continue,
            };
            if !r.locked && !local.owned_requests.contains_key(&r.id) {
                queue.push(i);
            }
        }
        idx.ready_free_in_pool = vec![Vec::new(); idx.our_pools.len()];
        idx.deleting_in_pool = vec![0; idx.our_pools.len()];
        idx.pool_used = vec![Resources::new(); idx.our_pools.len()];
        // Ready, free nodes of each of our pools: (age key, node).
        let mut ready: Vec<Vec<(f64, usize)>> = vec![Vec::new(); idx.our_pools.len()];
        for (i, rec) in s.nodes.iter().enumerate() {
            let n = &rec.node;
            let res = match &n.resources {
                Some(r) => Cow::Borrowed(r),
                None => node_resources(s, i),
            };
            if let Some(r) = &n.allocated_to {
                idx.allocations.entry(r.as_str()).or_default().push(i);
            }
            let provider = provider_pos.get(&Key(&n.provider)).copied();
            let pos = provider.and_then(|pi| {
                let qi = cfg.providers[pi]
                    .pools
                    .iter()
                    .position(|q| bytes_eq(q.name.as_bytes(), n.pool.as_bytes()))?;
                Some(first_pool[pi] + qi)
            });
            idx.places.push(Place::new(pos, provider));
            // Usage is summed here, while the node is at hand; the cloud's
            // share of it is the sum over its pools (QuotaState).
            match (pos, provider) {
                (Some(pos), _) => idx.pool_used[pos].add(&res),
                (None, Some(pi)) => idx.unpooled_used[pi].add(&res),
                (None, None) => {}
            }
            if n.state == NodeState::Ready && n.allocated_to.is_none() {
                idx.ready_unallocated.push(i);
            }
            match (n.state, pos) {
                (NodeState::Ready, Some(pos)) if n.allocated_to.is_none() && !rec.locked => {
                    ready[pos].push((n.state_time, i));
                }
                (NodeState::Deleting, Some(pos)) => idx.deleting_in_pool[pos] += 1,
                // Only counts of our providers with a concurrency limit are
                // ever asked for (matching launcher ids is not free).
                (NodeState::Init | NodeState::Building, _)
                    if provider.is_some_and(|pi| cfg.providers[pi].max_concurrency.is_some())
                        && n.launcher
                            .as_deref()
                            .is_some_and(|l| our_ids.contains(&Key(l))) =>
                {
                    if let Some(pi) = provider {
                        idx.in_flight[pi] += 1;
                    }
                }
                _ => {}
            }
        }
        // Oldest first; listings come sorted by id, so the index breaks
        // ties by id. Per-label lists filled from the sorted pool lists are
        // sorted too.
        idx.ready_free.reserve(ready.iter().map(Vec::len).sum());
        for (pos, mut nodes) in ready.into_iter().enumerate() {
            nodes.sort_unstable_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
            for &(_, i) in &nodes {
                for l in &s.nodes[i].node.node_type {
                    idx.ready_free.entry((pos, l.as_str())).or_default().push(i);
                }
            }
            idx.ready_free_in_pool[pos] = nodes.into_iter().map(|(_, i)| i).collect();
        }

        // Newest ready upload of a ready build, per provider and image.
        let ready_builds: FastSet<(&str, &str)> = s
            .images
            .builds
            .iter()
            .filter(|b| b.build.state == BuildState::Ready)
            .map(|b| (b.image.as_str(), b.id.as_str()))
            .collect();
        let mut best: FastMap<(Key<'_>, Key<'_>), (f64, &crate::store::UploadRecord)> =
            FastMap::with_capacity_and_hasher(s.images.uploads.len(), Default::default());
        for u in &s.images.uploads {
            if u.upload.state != UploadState::Ready
                || u.upload.external_id.is_none()
                || !ready_builds.contains(&(u.image.as_str(), u.build_id.as_str()))
            {
                continue;
            }
            let k = (Key(&u.provider), Key(&u.image));
            let t = u.upload.state_time;
            match best.get(&k) {
                Some((bt, bu)) if (*bt, bu.id.as_str()) >= (t, u.id.as_str()) => {}
                _ => {
                    best.insert(k, (t, u));
                }
            }
        }
        idx.newest_upload = best.into_iter().map(|(k, (_, u))| (k, u)).collect();
        for pos in 0..idx.our_pools.len() {
            let (pi, qi) = (idx.our_pools[pos].provider, idx.our_pools[pos].pool);
            let provider = &cfg.providers[pi];
            let pool = &provider.pools[qi];
            let flavors = s
                .providers
                .get(&provider.name)
                .and_then(|v| v.label_resources.get(&pool.name));
            // A pool has a handful of labels: scanning its flavors beats a
            // string-ordered tree search per label.
            let small: Option<Vec<(&String, &Resources)>> = flavors
                .filter(|f| f.len() <= 32)
                .map(|f| f.iter().collect());
            let flavor = |name: &str| match &small {
                Some(v) => v
                    .iter()
                    .find(|(k, _)| bytes_eq(k.as_bytes(), name.as_bytes()))
                    .map(|(_, r)| *r),
                None => flavors.and_then(|f| f.get(name)),
            };
            let labels = pool
                .labels
                .iter()
                .map(|l| {
                    let info = LabelInfo {
                        resources: match flavor(&l.name) {
                            Some(r) => Cow::Borrowed(r),
                            None => Cow::Owned(one_instance()),
                        },
                        image: launch_image(s, &idx, &provider.name, l),
                    };
                    (Key(&l.name), info)
                })
                .collect();
            idx.our_pools[pos].labels = labels;
        }
        idx
    }

    /// Our pool position of node `i`, if it is in one of our pools.
    pub fn node_pool(&self, i: usize) -> Option<usize> {
        let p = self.places[i].pool;
        (p != Place::NONE).then_some(p as usize)
    }

    /// The configuration position of node `i`'s provider, if it is ours.
    pub fn node_provider(&self, i: usize) -> Option<usize> {
        let p = self.places[i].provider;
        (p != Place::NONE).then_some(p as usize)
    }

    /// The position of a request in the snapshot, by id.
    pub fn request(&self, id: &str) -> Option<usize> {
        self.requests
            .get_or_init(|| {
                let mut m =
                    FastMap::with_capacity_and_hasher(self.all_requests.len(), Default::default());
                for (i, r) in self.all_requests.iter().enumerate() {
                    m.insert(r.id.as_str(), i);
                }
                m
            })
            .get(id)
            .copied()
    }

    fn sort_free(&mut self, s: &Snapshot) {
        let oldest_first = |v: &mut Vec<usize>| {
            v.sort_by(|a, b| {
                s.nodes[*a]
                    .node
                    .state_time
                    .total_cmp(&s.nodes[*b].node.state_time)
                    // Listings come sorted by id, so the index breaks ties by id.
                    .then(a.cmp(b))
            })
        };
        self.ready_free.values_mut().for_each(oldest_first);
        self.ready_free_in_pool.iter_mut().for_each(oldest_first);
    }

    /// Nodes deallocated this pass become reusable; nodes deleted this pass
    /// are not.
    pub fn update_free(&mut self, s: &'a Snapshot, freed: &[usize], deleted: &FastSet<usize>) {
        if !deleted.is_empty() {
            for v in self.ready_free.values_mut() {
                v.retain(|i| !deleted.contains(i));
            }
            for v in self.ready_free_in_pool.iter_mut() {
                v.retain(|i| !deleted.contains(i));
            }
        }
        if freed.is_empty() {
            return;
        }
        self.freed.extend(freed.iter().copied());
        for &i in freed {
            let Some(pos) = self.node_pool(i) else {
                continue;
            };
            for l in &s.nodes[i].node.node_type {
                self.ready_free
                    .entry((pos, l.as_str()))
                    .or_default()
                    .push(i);
            }
            self.ready_free_in_pool[pos].push(i);
        }
        self.sort_free(s);
    }
}

/// A fixed-size set of registered-pool indices.
#[derive(Clone, Debug, PartialEq, Eq)]
struct PoolSet(Vec<u64>);

impl PoolSet {
    fn empty(n: usize) -> Self {
        PoolSet(vec![0; n.div_ceil(64).max(1)])
    }
    fn full(n: usize) -> Self {
        let mut s = PoolSet::empty(n);
        for i in 0..n {
            s.insert(i);
        }
        s
    }
    fn insert(&mut self, i: usize) {
        self.0[i / 64] |= 1 << (i % 64);
    }
    #[cfg(test)]
    fn contains(&self, i: usize) -> bool {
        self.0[i / 64] & (1 << (i % 64)) != 0
    }
    fn and(&mut self, o: &PoolSet) {
        for (a, b) in self.0.iter_mut().zip(&o.0) {
            *a &= b;
        }
    }
    fn and_not(&mut self, o: &PoolSet) {
        for (a, b) in self.0.iter_mut().zip(&o.0) {
            *a &= !b;
        }
    }
    fn is_empty(&self) -> bool {
        self.0.iter().all(|w| *w == 0)
    }
    fn is_superset(&self, o: &PoolSet) -> bool {
        self.0.iter().zip(&o.0).all(|(a, b)| a & b == *b)
    }
    /// Makes this set a copy of `o` (same size), keeping its allocation.
    fn copy_from(&mut self, o: &PoolSet) {
        self.0.copy_from_slice(&o.0);
    }
    fn clear(&mut self) {
        self.0.fill(0);
    }
    fn iter(&self) -> PoolSetIter<'_> {
        PoolSetIter {
            words: &self.0,
            word: 0,
            bits: self.0.first().copied().unwrap_or(0),
        }
    }
}

/// The members of a [`PoolSet`] in ascending order, a set bit at a time
/// (a scan of every bit position cost more than the rest of pickup).
struct PoolSetIter<'s> {
    words: &'s [u64],
    word: usize,
    bits: u64,
}

impl Iterator for PoolSetIter<'_> {
    type Item = usize;

    #[inline]
    fn next(&mut self) -> Option<usize> {
        while self.bits == 0 {
            self.word += 1;
            self.bits = *self.words.get(self.word)?;
        }
        let b = self.bits.trailing_zeros() as usize;
        self.bits &= self.bits - 1;
        Some(self.word * 64 + b)
    }
}

/// How long another launcher's preferred request is left to it.
pub const HANDOFF_SECS: f64 = 5.0;

/// A registered pool, as far as pickup needs it.
#[derive(Clone, Copy)]
struct RegPool<'r> {
    provider: &'r str,
    priority: i64,
    paused: bool,
    /// Its provider's API is failing (our pools: the provider's outage;
    /// other launchers': what their pool component says).
    unavailable: bool,
}

/// Registered pools and how to find them.
pub(crate) struct Registry<'r> {
    pools: Vec<RegPool<'r>>,
    ids: Vec<&'r str>,
    by_id: FastMap<&'r str, usize>,
    /// A number for every label some registered pool serves: a request's
    /// labels are looked up by name once, and by number after that.
    label_ids: FastMap<Key<'r>, usize>,
    /// The registered pools serving each label, by label number.
    by_label: Vec<PoolSet>,
    all: PoolSet,
    none: PoolSet,
    /// Registered index of each of our pools (aligned with `Index::our_pools`).
    ours: Vec<usize>,
    /// Our pool position of each registered pool, if it is ours.
    our_pos: Vec<Option<usize>>,
    /// The registered pools that are ours.
    ours_set: PoolSet,
    /// Other launchers' pools that are not paused.
    others_unpaused: PoolSet,
    /// Other launchers' pools that are paused.
    others_paused: PoolSet,
}

impl<'r> Registry<'r> {
    pub fn build(s: &'r Snapshot, cfg: &'r Config, idx: &'r Index<'_>) -> Self {
        // Entries in listing order, then renumbered below.
        let mut pools = Vec::with_capacity(s.pools.len() + idx.our_pools.len());
        let mut ids = Vec::with_capacity(pools.capacity());
        let mut by_id: FastMap<&'r str, usize> = FastMap::default();
        let mut labels: Vec<Vec<&'r str>> = Vec::new();
        for p in &s.pools {
            by_id.insert(p.id.as_str(), pools.len());
            ids.push(p.id.as_str());
            pools.push(RegPool {
                provider: p.provider.as_str(),
                priority: p.priority,
                paused: p.paused,
                unavailable: p.unavailable,
            });
            labels.push(p.labels.iter().map(String::as_str).collect());
        }
        // Our own pools count even before their registration is visible.
        for ours in &idx.our_pools {
            if !by_id.contains_key(ours.id.as_str()) {
                let pc = &cfg.providers[ours.provider].pools[ours.pool];
                by_id.insert(ours.id.as_str(), pools.len());
                ids.push(ours.id.as_str());
                pools.push(RegPool {
                    provider: ours.key.provider.as_str(),
                    priority: ours.priority,
                    paused: false,
                    unavailable: false,
                });
                labels.push(pc.labels.iter().map(|l| l.name.as_str()).collect());
            }
        }
        let n = pools.len();
        let mut our_pos = vec![None; n];
        for (pos, ours) in idx.our_pools.iter().enumerate() {
            let i = by_id[ours.id.as_str()];
            our_pos[i] = Some(pos);
            // What we know now beats what our component said last pass.
            pools[i].unavailable = idx.outage[ours.provider].is_some();
        }
        // Renumber: our pools first, in the order they take requests
        // (priority, then position), then the others. Sets of pools then
        // list our candidates in pickup order, with nothing to sort.
        let mut order: Vec<usize> = (0..n).collect();
        order.sort_unstable_by_key(|&i| match our_pos[i] {
            Some(pos) => (false, idx.our_pools[pos].priority, pos),
            None => (true, 0, i),
        });
        let mut renumbered = vec![0; n];
        for (new, &old) in order.iter().enumerate() {
            renumbered[old] = new;
        }
        let pools: Vec<RegPool<'r>> = order.iter().map(|&old| pools[old]).collect();
        let ids: Vec<&'r str> = order.iter().map(|&old| ids[old]).collect();
        let labels: Vec<Vec<&'r str>> = order
            .iter()
            .map(|&old| std::mem::take(&mut labels[old]))
            .collect();
        let our_pos: Vec<Option<usize>> = order.iter().map(|&old| our_pos[old]).collect();
        for i in by_id.values_mut() {
            *i = renumbered[*i];
        }
        let mut label_ids: FastMap<Key<'r>, usize> = FastMap::default();
        let mut by_label: Vec<PoolSet> = Vec::new();
        for (i, ls) in labels.iter().enumerate() {
            for l in ls {
                let id = *label_ids.entry(Key(l)).or_insert_with(|| {
                    by_label.push(PoolSet::empty(n));
                    by_label.len() - 1
                });
                by_label[id].insert(i);
            }
        }
        let ours: Vec<usize> = idx.our_pools.iter().map(|o| by_id[o.id.as_str()]).collect();
        let mut ours_set = PoolSet::empty(n);
        let mut others_unpaused = PoolSet::empty(n);
        let mut others_paused = PoolSet::empty(n);
        for (i, p) in pools.iter().enumerate() {
            match (our_pos[i], p.paused) {
                (Some(_), _) => ours_set.insert(i),
                (None, false) => others_unpaused.insert(i),
                (None, true) => others_paused.insert(i),
            }
        }
        Registry {
            ours_set,
            others_unpaused,
            others_paused,
            ids,
            our_pos,
            all: PoolSet::full(n),
            none: PoolSet::empty(n),
            pools,
            by_id,
            label_ids,
            by_label,
            ours,
        }
    }

    /// The registered pools serving a label.
    pub fn serving<'s>(&'s self, label: &str) -> impl Iterator<Item = usize> + use<'s, 'r> {
        let pools = self
            .label_ids
            .get(&Key(label))
            .map(|&id| &self.by_label[id]);
        pools.into_iter().flat_map(PoolSet::iter)
    }

    /// A registered pool's id.
    pub fn id(&self, i: usize) -> &'r str {
        self.ids[i]
    }

    /// Whether a registered pool id is one of this launcher's pools.
    pub fn is_ours(&self, id: &str) -> bool {
        self.by_id
            .get(id)
            .is_some_and(|&i| self.our_pos[i].is_some())
    }

    fn declined(&self, req: &RequestRecord) -> PoolSet {
        let mut d = self.none.clone();
        self.declined_into(req, &mut d);
        d
    }

    /// The registered pools that declined the request, into `d`.
    fn declined_into(&self, req: &RequestRecord, d: &mut PoolSet) {
        d.clear();
        for id in &req.request.declined_by {
            if let Some(&i) = self.by_id.get(id.as_str()) {
                d.insert(i);
            }
        }
    }

    /// The numbers of the labels, into `ids`; false if a label is served
    /// by no registered pool.
    fn label_ids_into(&self, labels: &[String], ids: &mut Vec<usize>) -> bool {
        ids.clear();
        for l in labels {
            match self.label_ids.get(&Key(l)) {
                Some(&id) => ids.push(id),
                None => return false,
            }
        }
        true
    }

    /// Candidates split in one pass over the words: the unpaused ones, other
    /// launchers' unpaused ones, and ours. Returns whether any of ours is
    /// unpaused.
    fn split(
        &self,
        cand: &PoolSet,
        paused: &PoolSet,
        unpaused: &mut PoolSet,
        others: &mut PoolSet,
        ours: &mut PoolSet,
    ) -> bool {
        let mut any = 0;
        for (w, &c) in cand.0.iter().enumerate() {
            let up = c & !paused.0[w];
            unpaused.0[w] = up;
            others.0[w] = c & self.others_unpaused.0[w];
            ours.0[w] = c & self.ours_set.0[w];
            any |= up & self.ours_set.0[w];
        }
        any != 0
    }

    /// The registered pools serving every label (by number) that have not
    /// declined, into `c`.
    fn candidates_into(&self, ids: &[usize], declined: &PoolSet, c: &mut PoolSet) {
        c.copy_from(&self.all);
        for &id in ids {
            c.and(&self.by_label[id]);
        }
        c.and_not(declined);
    }
}

/// Why one of our pools declines a request, if it does.
fn decline_reason(
    cfg: &Config,
    quota: &QuotaState,
    pos: usize,
    ours: &OurPool,
    req: &RequestRecord,
) -> Option<String> {
    let provider = &cfg.providers[ours.provider];
    let pool = &provider.pools[ours.pool];
    if pool.is_disabled() {
        return Some("pool is disabled".into());
    }
    if provider.max_concurrency == Some(0) {
        return Some("provider handles no requests (max-concurrency 0)".into());
    }
    // The quota of the whole node set: borrowed for one node, summed
    // into a copy of the first node's for more.
    let mut one: Option<&Resources> = None;
    let mut total: Option<Resources> = None;
    for label in &req.request.node_types {
        let Some(info) = ours.labels.get(&Key(label)) else {
            return Some(format!("label {label} is not supported"));
        };
        if info.image.is_none() {
            return Some(format!("no image available for label {label}"));
        }
        match (&mut total, one) {
            (Some(t), _) => t.add(&info.resources),
            (None, Some(first)) => {
                let mut t = first.clone();
                t.add(&info.resources);
                total = Some(t);
            }
            (None, None) => one = Some(&info.resources),
        }
    }
    let fit = match (&total, one) {
        (Some(t), _) => quota.could_ever_fit(pos, t),
        (None, Some(r)) => quota.could_ever_fit(pos, r),
        (None, None) => quota.could_ever_fit(pos, &Resources::new()),
    };
    match fit {
        Ok(()) => None,
        Err(QuotaBlock::Pool(q)) => Some(format!("request can never fit the pool's {q} limit")),
        Err(QuotaBlock::Cloud(q)) => Some(format!("request can never fit the cloud's {q} quota")),
        Err(QuotaBlock::Tenant(_)) => None,
    }
}

fn launch_image<'a>(
    s: &'a Snapshot,
    idx: &Index<'a>,
    provider: &'a str,
    label: &'a crate::config::PoolLabel,
) -> Option<ImageRef<'a>> {
    match &label.image {
        ImageSource::DiskImage(d) => idx
            .newest_upload
            .get(&(Key(provider), Key(d)))
            .map(|u| ImageRef::Upload(u)),
        ImageSource::CloudImage(c) => {
            let missing = s
                .providers
                .get(provider)
                .is_some_and(|v| v.missing_cloud_images.contains(c));
            (!missing).then_some(ImageRef::Cloud(c))
        }
    }
}

/// Per-pass mutable state.
struct Pass<'p, 'a, 'r> {
    s: &'a Snapshot,
    cfg: &'p Config,
    idx: &'p Index<'a>,
    reg: &'p Registry<'r>,
    quota: &'p mut QuotaState,
    plan: &'p mut Plan,
    /// Nodes allocated or evicted this pass.
    taken: FastSet<usize>,
    /// Our pools paused this pass (by our-pool position).
    paused: Vec<bool>,
    /// Registered pools that take no requests now: other launchers' paused
    /// pools and our pools paused this pass.
    paused_reg: PoolSet,
    /// Launches planned this pass per provider position.
    launches: Vec<usize>,
    /// Our pools that evicted a node this pass.
    evicted: Vec<bool>,
    addressable: Vec<usize>,
}

enum Progress {
    Done,
    Waiting,
    Paused,
    Declined,
}

impl Pass<'_, '_, '_> {
    fn concurrency_ok(&self, ours: &OurPool) -> bool {
        let provider = &self.cfg.providers[ours.provider];
        match provider.max_concurrency {
            None => true,
            Some(limit) => {
                let now = self.idx.in_flight[ours.provider] + self.launches[ours.provider];
                now < limit as usize
            }
        }
    }

    fn pause(&mut self, pos: usize) {
        self.paused[pos] = true;
        let i = self.reg.ours[pos];
        // The registered pool's state is that of the pool it maps back to.
        if self.reg.our_pos[i] == Some(pos) {
            self.paused_reg.insert(i);
        }
    }

    /// A request we hold on a pool whose provider is unavailable goes back
    /// to the queue once nothing of it is in flight there (the breaker cuts
    /// launches short within seconds). It is not declined: declines by
    /// every pool fail a request, and an outage is not the request's fault.
    /// Another provider may take it, or it waits for this one to recover.
    fn hand_back(&mut self, pos: usize, req: &RequestRecord, outage: &super::ProviderOutage) {
        let ours = &self.idx.our_pools[pos];
        let nodes = &self.s.nodes;
        let in_flight = self
            .idx
            .allocations
            .get(req.id.as_str())
            .into_iter()
            .flatten()
            .any(|&i| {
                let n = &nodes[i].node;
                n.provider == ours.key.provider
                    && n.pool == ours.key.pool
                    && match n.state {
                        NodeState::Init | NodeState::Building => true,
                        NodeState::Ready => nodes[i].locked,
                        _ => false,
                    }
            });
        if in_flight {
            return;
        }
        self.plan.actions.push(Action::HandBack {
            request: req.id.clone(),
            reason: format!(
                "provider {} is unavailable: {}",
                ours.key.provider, outage.reason
            ),
        });
    }

    fn fail_if_all_declined(&self, req: &RequestRecord, extra: &[usize]) -> bool {
        let mut declined = self.reg.declined(req);
        for &i in extra {
            declined.insert(i);
        }
        declined.is_superset(&self.reg.all)
    }

    /// Plans the next steps of a request this launcher holds. A request
    /// accepted in this very pass (`fresh`) has no allocations of its own
    /// yet: nodes still pointing at it are leftovers that cleanup frees.
    fn fulfil(&mut self, pos: usize, req: &RequestRecord, fresh: bool) -> Progress {
        let ours = &self.idx.our_pools[pos];
        let provider = &self.cfg.providers[ours.provider];
        let pool = &provider.pools[ours.pool];
        let r = &req.request;
        let nodes = &self.s.nodes;
        let allocated: Vec<usize> = self
            .idx
            .allocations
            .get(req.id.as_str())
            .filter(|_| !fresh)
            .map(|v| {
                v.iter()
                    .copied()
                    .filter(|&i| {
                        let n = &nodes[i].node;
                        n.provider == ours.key.provider
                            && n.pool == ours.key.pool
                            && !matches!(n.state, NodeState::Deleting | NodeState::Deleted)
                    })
                    .collect()
            })
            .unwrap_or_default();
        // A ready node that is still locked is one our launch task marked
        // ready a moment ago and has not unlocked yet (nobody else locks
        // nodes of a pending request): still in flight, not missing.
        let busy = |i: usize| match nodes[i].node.state {
            NodeState::Init | NodeState::Building => true,
            NodeState::Ready => nodes[i].locked,
            _ => false,
        };
        let in_flight = allocated.iter().any(|&i| busy(i));
        let failed = allocated
            .iter()
            .any(|&i| nodes[i].node.state == NodeState::Failed);
        let mut usable: Vec<usize> = allocated
            .iter()
            .copied()
            .filter(|&i| {
                matches!(
                    nodes[i].node.state,
                    NodeState::Ready | NodeState::Init | NodeState::Building
                )
            })
            .collect();
        // Ready first, so a slot is filled by a finished node when it can be.
        usable.sort_by_key(|&i| (nodes[i].node.state != NodeState::Ready, nodes[i].id.clone()));

        if failed {
            if in_flight {
                return Progress::Waiting;
            }
            let ready: Vec<String> = usable
                .iter()
                .filter(|&&i| nodes[i].node.state == NodeState::Ready)
                .map(|&i| nodes[i].id.clone())
                .collect();
            let reg_idx = self.reg.ours[pos];
            let fail = self.fail_if_all_declined(req, &[reg_idx]);
            self.plan.actions.push(Action::Decline {
                request: req.id.clone(),
                by: vec![ours.id.clone()],
                fail,
                deallocate: ready,
                reason: "a node launch failed".into(),
            });
            return Progress::Declined;
        }

        // Fill slots in node_types order with allocated nodes.
        let mut slots: Vec<Option<usize>> = vec![None; r.node_types.len()];
        let mut used = vec![false; usable.len()];
        for (slot, label) in r.node_types.iter().enumerate() {
            if let Some(k) =
                (0..usable.len()).find(|&k| !used[k] && nodes[usable[k]].node.has_label(label))
            {
                used[k] = true;
                slots[slot] = Some(usable[k]);
            }
        }
        for (k, &i) in usable.iter().enumerate() {
            if !used[k] && nodes[i].node.state == NodeState::Ready {
                self.plan.actions.push(Action::Deallocate {
                    node: nodes[i].id.clone(),
                });
            }
        }
        let mut az: Option<String> = slots
            .iter()
            .flatten()
            .find_map(|&i| nodes[i].node.az.clone());

        for slot in 0..slots.len() {
            if slots[slot].is_some() {
                continue;
            }
            let label = r.node_types[slot].as_str();
            if r.reuse
                && let Some(&i) = self.idx.ready_free.get(&(pos, label)).and_then(|v| {
                    v.iter().find(|&&i| {
                        !self.taken.contains(&i)
                            && (az.is_none()
                                || nodes[i].node.az.is_none()
                                || nodes[i].node.az == az)
                    })
                })
            {
                self.taken.insert(i);
                if az.is_none() {
                    az = nodes[i].node.az.clone();
                }
                slots[slot] = Some(i);
                // A freed node's old tenant was already uncharged.
                let old = if self.idx.freed.contains(&i) {
                    None
                } else {
                    nodes[i].node.tenant_name.as_deref()
                };
                self.quota
                    .retag(old, r.tenant_name.as_deref(), &node_resources(self.s, i));
                self.plan.actions.push(Action::Allocate {
                    request: req.id.clone(),
                    node: nodes[i].id.clone(),
                });
                continue;
            }
            let Some(info) = ours.labels.get(&Key(label)) else {
                return Progress::Waiting;
            };
            let Some(image) = info.image.map(ImageRef::to_launch_image) else {
                return Progress::Waiting;
            };
            if !self.concurrency_ok(ours) {
                return Progress::Waiting;
            }
            let need = info.resources.clone().into_owned();
            match self.quota.can_launch(pos, r.tenant_name.as_deref(), &need) {
                Ok(()) => {
                    if az.is_none() {
                        az = choose_az(self.s, pool, &provider.name, &req.id);
                    }
                    self.quota.add(pos, r.tenant_name.as_deref(), &need);
                    self.launches[ours.provider] += 1;
                    tracing::trace!(
                        request = %req.id,
                        fresh,
                        slot,
                        allocated = ?allocated.iter().map(|&i| (&nodes[i].id, nodes[i].node.state)).collect::<Vec<_>>(),
                        "planning a launch"
                    );
                    self.plan.actions.push(Action::Launch {
                        request: req.id.clone(),
                        pool: ours.key.clone(),
                        label: label.to_owned(),
                        image,
                        az: az.clone(),
                        resources: need,
                    });
                }
                Err(block) => {
                    if r.is_min_ready() {
                        if in_flight {
                            return Progress::Waiting;
                        }
                        let ready: Vec<String> = slots
                            .iter()
                            .flatten()
                            .filter(|&&i| nodes[i].node.state == NodeState::Ready)
                            .map(|&i| nodes[i].id.clone())
                            .collect();
                        let reg_idx = self.reg.ours[pos];
                        let fail = self.fail_if_all_declined(req, &[reg_idx]);
                        self.plan.actions.push(Action::Decline {
                            request: req.id.clone(),
                            by: vec![ours.id.clone()],
                            fail,
                            deallocate: ready,
                            reason: format!("min-ready request at quota ({block:?})"),
                        });
                        return Progress::Declined;
                    }
                    self.pause(pos);
                    if !matches!(block, QuotaBlock::Tenant(_)) {
                        self.evict(pos);
                    }
                    return Progress::Paused;
                }
            }
        }
        let all_ready = slots.iter().all(|s| {
            s.is_some_and(|i| nodes[i].node.state == NodeState::Ready && !nodes[i].locked)
        });
        if all_ready && !in_flight {
            self.plan.actions.push(Action::Fulfill {
                request: req.id.clone(),
                nodes: slots
                    .iter()
                    .flatten()
                    .map(|&i| nodes[i].id.clone())
                    .collect(),
            });
            return Progress::Done;
        }
        Progress::Waiting
    }

    /// Frees quota for a waiting request by deleting the oldest unused ready
    /// node of the pool — unless a deletion there is already under way.
    fn evict(&mut self, pos: usize) {
        if self.evicted[pos] || self.idx.deleting_in_pool[pos] > 0 {
            return;
        }
        if let Some(&i) = self.idx.ready_free_in_pool[pos]
            .iter()
            .find(|&&i| !self.taken.contains(&i))
        {
            self.taken.insert(i);
            self.evicted[pos] = true;
            self.plan.actions.push(Action::DeleteNode {
                node: self.s.nodes[i].id.clone(),
                reason: DeleteReason::Evicted,
            });
        }
    }
}

/// A deterministic AZ for a node set: spread by request id over the pool's
/// (or else the cloud's) zones; `None` lets the cloud choose.
fn choose_az(
    s: &Snapshot,
    pool: &crate::config::Pool,
    provider: &str,
    request: &str,
) -> Option<String> {
    let zones: &[String] = if pool.availability_zones.is_empty() {
        s.providers
            .get(provider)
            .map(|v| v.availability_zones.as_slice())
            .unwrap_or(&[])
    } else {
        &pool.availability_zones
    };
    if zones.is_empty() {
        return None;
    }
    let h = super::rendezvous::fnv1a(request.as_bytes());
    Some(zones[(h % zones.len() as u64) as usize].clone())
}

/// `prefix` followed by a request's labels as a set, written like
/// `{"a", "b"}` (the `Debug` of a `BTreeSet`, without building one and
/// formatting it for every unservable request).
fn with_label_set(prefix: &str, labels: &[String]) -> String {
    use std::fmt::Write;
    let mut sorted: Vec<&str> = labels.iter().map(String::as_str).collect();
    sorted.sort_unstable();
    sorted.dedup();
    let len = sorted.iter().map(|l| l.len() + 4).sum::<usize>();
    let mut out = String::with_capacity(prefix.len() + len + 2);
    out.push_str(prefix);
    out.push('{');
    for (k, l) in sorted.iter().enumerate() {
        if k > 0 {
            out.push_str(", ");
        }
        // `Debug` leaves printable ASCII other than quote and backslash as is.
        if l.bytes()
            .all(|b| (b' '..=b'~').contains(&b) && b != b'"' && b != b'\\')
        {
            out.push('"');
            out.push_str(l);
            out.push('"');
        } else {
            // Writing to a String cannot fail.
            let _ = write!(out, "{l:?}");
        }
    }
    out.push('}');
    out
}

/// Up to three label numbers as one key, with their count.
fn pack_ids(ids: &[usize]) -> Option<u128> {
    if ids.len() > 3 {
        return None;
    }
    let mut key = ids.len() as u128;
    for (k, &id) in ids.iter().enumerate() {
        key |= u128::from(u32::try_from(id).ok()?) << (8 + 32 * k);
    }
    Some(key)
}

/// A key for a request's labels in order (short lists only).
fn sequence_key(ids: &[usize]) -> Option<u128> {
    pack_ids(ids)
}

/// A key for the set of a request's labels (small sets only).
fn set_key(ids: &[usize]) -> Option<u128> {
    let mut set = [0; 3];
    let mut n = 0;
    for &id in ids {
        if !set[..n].contains(&id) {
            *set.get_mut(n)? = id;
            n += 1;
        }
    }
    set[..n].sort_unstable();
    pack_ids(&set[..n])
}

/// A string of fewer than `width` (at most 16) bytes as an integer of
/// `width` bytes that compares like the string: its bytes from the top,
/// zero-padded, then its length in the last byte (equal padded bytes mean
/// one string is the other plus NULs, and the shorter sorts first).
fn packed(s: &str, width: usize) -> Option<u128> {
    let b = s.as_bytes();
    let n = b.len();
    if n >= width || width > 16 {
        return None;
    }
    let (head, tail) = b.split_at(n.min(8));
    let v = u128::from(be_prefix(head)) << 64 | u128::from(be_prefix(tail));
    Some(v >> (8 * (16 - width)) | n as u128)
}

/// Up to 8 bytes from the top of a big-endian word, zero-padded.
fn be_prefix(b: &[u8]) -> u64 {
    match b.first_chunk::<8>() {
        Some(w) => u64::from_be_bytes(*w),
        // Shifted in byte by byte: a copying loop would become a memcpy call.
        None => b
            .iter()
            .enumerate()
            .fold(0, |v, (k, &c)| v | u64::from(c) << (56 - 8 * k)),
    }
}

/// Sorts requests into queue order ([`request_order`]), stably.
///
/// Request ids are short, so the order is usually a tuple of integers
/// (comparing thousands of ids as strings was a tenth of a pass). There are
/// few (priority, relative priority) groups, and listings come in sequence
/// order, so requests are bucketed by group and each bucket is usually
/// sorted already.
fn sort_queue(reqs: &mut Vec<&RequestRecord>) {
    /// Beyond this many groups a plain sort is as good.
    const MAX_GROUPS: usize = 16;
    let by_string = |reqs: &mut Vec<&RequestRecord>| {
        reqs.sort_by(|a, b| {
            request_order(&a.id, a.request.relative_priority)
                .cmp(&request_order(&b.id, b.request.relative_priority))
        })
    };
    let mut keys: Vec<(u64, i64, u128)> = Vec::with_capacity(reqs.len());
    for r in reqs.iter() {
        let (prio, rp, seq) = request_order(&r.id, r.request.relative_priority);
        let prio = packed(prio, 8).and_then(|p| u64::try_from(p).ok());
        let (Some(prio), Some(seq)) = (prio, packed(seq, 16)) else {
            return by_string(reqs);
        };
        keys.push((prio, rp, seq));
    }
    let mut groups: Vec<(u64, i64)> = Vec::new();
    let mut group_of: Vec<usize> = Vec::with_capacity(keys.len());
    for &(prio, rp, _) in &keys {
        let g = match groups.iter().position(|&g| g == (prio, rp)) {
            Some(g) => g,
            None if groups.len() < MAX_GROUPS => {
                groups.push((prio, rp));
                groups.len() - 1
            }
            None => {
                // Positions last: the keys are distinct, so unstable is stable.
                let mut all: Vec<(u64, i64, u128, usize)> = keys
                    .iter()
                    .enumerate()
                    .map(|(i, &(p, rp, seq))| (p, rp, seq, i))
                    .collect();
                all.sort_unstable();
                *reqs = all.iter().map(|k| reqs[k.3]).collect();
                return;
            }
        };
        group_of.push(g);
    }
    // Where each group starts in the sorted queue.
    let mut rank: Vec<usize> = (0..groups.len()).collect();
    rank.sort_unstable_by_key(|&g| groups[g]);
    let mut start = vec![0; groups.len()];
    let mut sizes = vec![0; groups.len()];
    for &g in &group_of {
        sizes[g] += 1;
    }
    let mut at = 0;
    for &g in &rank {
        start[g] = at;
        at += sizes[g];
    }
    let mut next = start.clone();
    let mut queue: Vec<(u128, usize)> = vec![(0, 0); keys.len()];
    for (i, (&g, &(_, _, seq))) in group_of.iter().zip(&keys).enumerate() {
        queue[next[g]] = (seq, i);
        next[g] += 1;
    }
    for g in 0..groups.len() {
        let bucket = &mut queue[start[g]..start[g] + sizes[g]];
        if !bucket.is_sorted() {
            bucket.sort_unstable();
        }
    }
    *reqs = queue.iter().map(|&(_, i)| reqs[i]).collect();
}

/// Plans every request-related action of this pass.
#[allow(clippy::too_many_arguments)]
pub(crate) fn plan_requests<'a>(
    s: &'a Snapshot,
    cfg: &Config,
    now: f64,
    local: &LocalState,
    idx: &Index<'a>,
    reg: &Registry<'_>,
    quota: &mut QuotaState,
    plan: &mut Plan,
) {
    let our_by_key: FastMap<&PoolKey, usize> = idx
        .our_pools
        .iter()
        .enumerate()
        .map(|(i, o)| (&o.key, i))
        .collect();
    let mut pass = Pass {
        s,
        cfg,
        idx,
        reg,
        quota,
        plan,
        taken: FastSet::default(),
        paused: vec![false; idx.our_pools.len()],
        paused_reg: reg.others_paused.clone(),
        launches: vec![0; cfg.providers.len()],
        evicted: vec![false; idx.our_pools.len()],
        addressable: vec![0; idx.our_pools.len()],
    };
    // Pools of an unavailable provider are paused from the start: they
    // take nothing, and other pools (ours, other launchers') take the
    // requests they would have.
    for pos in 0..idx.our_pools.len() {
        if idx.outage[idx.our_pools[pos].provider].is_some() {
            pass.pause(pos);
        }
    }

    // 1. Requests we hold, most urgent first (Nodepool re-runs paused
    //    handlers before taking new requests).
    let mut owned: Vec<(&String, &PoolKey)> = local.owned_requests.iter().collect();
    owned.sort_by_cached_key(|(id, _)| {
        let rp = idx
            .request(id)
            .map(|i| s.requests[i].request.relative_priority)
            .unwrap_or(0);
        request_order_key(id, rp)
    });
    for (id, key) in owned {
        let Some(ri) = idx.request(id) else {
            pass.plan.actions.push(Action::Release {
                request: id.clone(),
            });
            continue;
        };
        let req = &s.requests[ri];
        let Some(&pos) = our_by_key.get(key) else {
            pass.plan.actions.push(Action::Release {
                request: id.clone(),
            });
            continue;
        };
        if req.request.state != RequestState::Pending {
            pass.plan.actions.push(Action::Release {
                request: id.clone(),
            });
            continue;
        }
        if let Some(outage) = idx.outage[idx.our_pools[pos].provider] {
            pass.hand_back(pos, req, outage);
            continue;
        }
        pass.fulfil(pos, req, false);
    }

    // 2. New requests, in priority / relative priority / FIFO order.
    if idx.our_pools.is_empty() {
        return;
    }
    let mut waiting: Vec<&RequestRecord> = idx.waiting.iter().map(|&i| &s.requests[i]).collect();
    sort_queue(&mut waiting);

    // Scratch space reused for every request: a backlog runs this loop
    // thousands of times per pass.
    let mut declined = reg.none.clone();
    let mut cand = reg.none.clone();
    let mut of_provider = reg.none.clone();
    // Positions of our pools that may take the request, in pickup order
    // (registered pools are numbered so that a set lists ours in that
    // order: sorting them for every waiting request was a tenth of a pass).
    let mut eligible: Vec<usize> = Vec::new();
    let mut unpaused = reg.none.clone();
    let mut others = reg.none.clone();
    let mut ours = reg.none.clone();
    let mut decliners: Vec<(usize, String)> = Vec::new();
    let mut ids: Vec<usize> = Vec::new();
    let mut fail_reasons: FastMap<u128, String> = FastMap::default();
    let mut decline_reasons: FastMap<(usize, u128), Option<String>> = FastMap::default();
    for req in waiting {
        let r = &req.request;
        reg.declined_into(req, &mut declined);
        if declined.is_superset(&reg.all) {
            pass.plan.actions.push(Action::Fail {
                request: req.id.clone(),
                reason: "every registered pool declined it".into(),
            });
            continue;
        }
        let known = reg.label_ids_into(&r.node_types, &mut ids);
        if known {
            reg.candidates_into(&ids, &declined, &mut cand);
        } else {
            cand.clear();
        }
        if cand.is_empty() {
            let why = |labels: &[String]| with_label_set("no registered pool can serve ", labels);
            // A backlog holds many requests for the same unservable set.
            let reason = match set_key(&ids).filter(|_| known) {
                Some(k) => fail_reasons
                    .entry(k)
                    .or_insert_with(|| why(&r.node_types))
                    .clone(),
                None => why(&r.node_types),
            };
            pass.plan.actions.push(Action::Fail {
                request: req.id.clone(),
                reason,
            });
            continue;
        }
        // Whether a pool declines depends only on the pool and the labels
        // in order (not on usage), so it is the same for the whole pass.
        let labels_key = sequence_key(&ids);
        let mut cand = &cand;
        if let Some(p) = &r.provider {
            of_provider.clear();
            let mut usable = false;
            for i in cand.iter() {
                if reg.pools[i].provider == p {
                    of_provider.insert(i);
                    usable |= !reg.pools[i].unavailable;
                }
            }
            // The preferred provider is no place to wait while its API is
            // failing: the preference holds only while one of its pools is
            // available.
            if usable {
                cand = &of_provider;
            }
        }
        // The best priority among other launchers' unpaused candidates, and
        // among all unpaused candidates (in a backlog every pool is paused
        // and these sets are empty).
        let any_unpaused = reg.split(
            cand,
            &pass.paused_reg,
            &mut unpaused,
            &mut others,
            &mut ours,
        );
        let best = unpaused.iter().map(|i| reg.pools[i].priority).min();
        let best_other = others.iter().map(|i| reg.pools[i].priority).min();
        eligible.clear();
        eligible.extend(
            ours.iter()
                .filter_map(|i| reg.our_pos[i])
                .filter(|&pos| best_other.is_none_or(|b| idx.our_pools[pos].priority <= b)),
        );
        if eligible.is_empty() {
            continue;
        }
        // Spread requests over the best unpaused candidates, ours and other
        // launchers' alike: each request has one preferred pool
        // (rendezvous hashing on its id), so equal launchers share the load
        // instead of racing for every lock. Another launcher's preferred
        // request is left to it for a short hand-off time, after which
        // anyone may take it (its owner may be stuck or gone).
        let preferred = best.and_then(|best| {
            rendezvous_owner(
                &req.id,
                unpaused
                    .iter()
                    .filter(|&i| reg.pools[i].priority == best)
                    .map(|i| reg.ids[i]),
            )
            .and_then(|id| reg.by_id.get(id).copied())
        });
        if let Some(p) = preferred
            && reg.our_pos[p].is_none()
            && now - r.state_time < HANDOFF_SECS
        {
            continue;
        }
        let preferred_pos = preferred.and_then(|p| reg.our_pos[p]);
        // The preferred pool first, then by priority and position.
        if let Some(first) = preferred_pos
            && let Some(k) = eligible.iter().position(|&pos| pos == first)
        {
            eligible[..=k].rotate_right(1);
        }
        for &pos in &eligible {
            pass.addressable[pos] += 1;
        }

        // A paused pool is blocked; with none of ours unpaused, nothing
        // after the first wait can take the request.
        decliners.clear();
        let mut taker = None;
        let mut deferred = false;
        for &pos in &eligible {
            if deferred && !any_unpaused {
                break;
            }
            let blocked = pass.paused[pos] || !pass.concurrency_ok(&idx.our_pools[pos]);
            // Once the request waits anyway, a blocked pool's verdict changes
            // nothing: skip it (a backlog would otherwise re-check every
            // paused pool for every waiting request).
            if blocked && deferred {
                continue;
            }
            let verdict =
                |quota: &QuotaState| decline_reason(cfg, quota, pos, &idx.our_pools[pos], req);
            let declines = match labels_key {
                Some(k) => decline_reasons
                    .entry((pos, k))
                    .or_insert_with(|| verdict(pass.quota))
                    .clone(),
                None => verdict(pass.quota),
            };
            if let Some(reason) = declines {
                decliners.push((pos, reason));
                continue;
            }
            if blocked {
                deferred = true;
                continue;
            }
            let tenant_blocked = r.tenant_name.is_some() && {
                let mut total = Resources::new();
                for l in &r.node_types {
                    if let Some(info) = idx.our_pools[pos].labels.get(&Key(l)) {
                        total.add(&info.resources);
                    }
                }
                pass.quota
                    .tenant_fits(r.tenant_name.as_deref(), &total)
                    .is_err()
            };
            if tenant_blocked {
                deferred = true;
                continue;
            }
            taker = Some(pos);
            break;
        }
        match taker {
            Some(pos) => {
                pass.plan.actions.push(Action::Accept {
                    request: req.id.clone(),
                    pool: idx.our_pools[pos].key.clone(),
                });
                pass.fulfil(pos, req, true);
            }
            None if !deferred && !decliners.is_empty() => {
                let regs: Vec<usize> = decliners.iter().map(|(pos, _)| reg.ours[*pos]).collect();
                let fail = pass.fail_if_all_declined(req, &regs);
                pass.plan.actions.push(Action::Decline {
                    request: req.id.clone(),
                    by: decliners
                        .iter()
                        .map(|(pos, _)| idx.our_pools[*pos].id.clone())
                        .collect(),
                    fail,
                    deallocate: Vec::new(),
                    reason: decliners
                        .iter()
                        .map(|(pos, why)| format!("{}: {why}", idx.our_pools[*pos].key))
                        .collect::<Vec<_>>()
                        .join("; "),
                });
            }
            None => {}
        }
    }

    for (pos, ours) in idx.our_pools.iter().enumerate() {
        pass.plan.pools.push(PoolStatus {
            pool: ours.key.clone(),
            paused: pass.paused[pos],
            addressable_requests: pass.addressable[pos],
        });
    }
}

#[cfg(test)]
mod tests {
    use super::{PoolSet, packed, sequence_key, set_key, sort_queue, with_label_set};
    use crate::planner::request_order;
    use std::collections::BTreeSet;

    #[test]
    fn pool_sets() {
        let mut a = PoolSet::full(70);
        let mut b = PoolSet::empty(70);
        b.insert(3);
        b.insert(65);
        assert!(a.is_superset(&b));
        a.and(&b);
        assert_eq!(a.iter().collect::<Vec<_>>(), [3, 65]);
        a.and_not(&b);
        assert!(a.is_empty());
        assert!(!a.contains(3));
        let mut c = PoolSet::full(130);
        assert_eq!(c.iter().count(), 130);
        assert_eq!(c.iter().last(), Some(129));
        c.clear();
        assert_eq!(c.iter().next(), None);
        assert_eq!(PoolSet::empty(0).iter().next(), None);
    }

    #[test]
    fn packed_strings_order_like_strings() {
        let words = [
            "",
            "\0",
            "\0\0",
            "a",
            "a\0",
            "a\0\0",
            "ab",
            "~",
            "100",
            "0000000001",
            "0000000001\0",
            "0123456789abcde",
            "0123456789abcdf",
            "é",
            "\u{10ffff}",
        ];
        for a in words {
            for b in words {
                let (pa, pb) = (packed(a, 16), packed(b, 16));
                assert_eq!(pa.cmp(&pb), a.cmp(b), "{a:?} {b:?}");
            }
        }
        assert_eq!(packed("0123456789abcdef", 16), None);
        assert_eq!(
            packed("1234567", 8),
            Some(u128::from(u64::from_be_bytes(*b"1234567\x07")))
        );
        assert_eq!(packed("12345678", 8), None);
        for a in ["", "a", "ab", "~", "100", "1234567"] {
            for b in ["", "a", "ab", "~", "100", "1234567", "\0"] {
                assert_eq!(packed(a, 8).cmp(&packed(b, 8)), a.cmp(b), "{a:?} {b:?}");
            }
        }
    }

    #[test]
    fn queue_order_is_a_stable_sort_by_request_order() {
        use crate::model::NodeRequest;
        use crate::store::RequestRecord;
        use std::sync::Arc;
        let rec = |id: &str, rp: i64| {
            let mut req = NodeRequest::new(vec![], "r", 0.0);
            req.relative_priority = rp;
            RequestRecord {
                id: id.into(),
                request: Arc::new(req),
                version: 0,
                ephemeral: false,
                ephemeral_owner: 0,
                locked: false,
            }
        };
        let short = [
            rec("200-0000000001", 0),
            rec("100-0000000003", 1),
            rec("100-0000000002", 1),
            rec("100-0000000004", 0),
            rec("x", 0),
            rec("100-0000000002", 1),
            rec("~", -1),
        ];
        let mut long = short.to_vec();
        long.push(rec("100-00000000000000000001", 0));
        long.push(rec("a-long-id-without-a-priority", 0));
        long.push(rec("1000-0000000001", 0));
        // More (priority, relative priority) groups than buckets.
        let many: Vec<RequestRecord> = (0..60)
            .map(|i| rec(&format!("{}-{:010}", 100 + i % 3, 60 - i), i % 20 - 10))
            .collect();
        let mut few = many.clone();
        for r in &mut few {
            Arc::make_mut(&mut r.request).relative_priority %= 3;
        }
        for records in [&short[..], &long[..], &many[..], &few[..]] {
            let mut got: Vec<&RequestRecord> = records.iter().collect();
            sort_queue(&mut got);
            let mut want: Vec<&RequestRecord> = records.iter().collect();
            want.sort_by_key(|r| request_order(&r.id, r.request.relative_priority));
            assert!(got.iter().zip(&want).all(|(a, b)| std::ptr::eq(*a, *b)));
            assert_eq!(got.len(), want.len());
        }
    }

    #[test]
    fn label_keys() {
        assert_eq!(set_key(&[3, 1, 3]), set_key(&[1, 3]));
        assert_ne!(set_key(&[1]), set_key(&[1, 3]));
        assert_eq!(set_key(&[1, 2, 3, 3, 2]), set_key(&[3, 2, 1]));
        assert_eq!(set_key(&[1, 2, 3, 4]), None);
        assert_ne!(sequence_key(&[1, 3]), sequence_key(&[3, 1]));
        assert_ne!(sequence_key(&[1]), sequence_key(&[1, 1]));
        assert_ne!(sequence_key(&[]), sequence_key(&[0]));
        assert_eq!(sequence_key(&[1, 1, 1, 1]), None);
    }

    #[test]
    fn label_sets_read_like_btree_sets() {
        for labels in [
            vec![],
            vec!["b", "a", "b"],
            vec!["quote\"d", "back\\slash", "\u{1f600}", "tab\t", "~ok ok"],
        ] {
            let owned: Vec<String> = labels.iter().map(|l| l.to_string()).collect();
            let set: BTreeSet<&String> = owned.iter().collect();
            assert_eq!(with_label_set("x ", &owned), format!("x {set:?}"));
        }
    }
}
