//! The per-pass index: one look at every node and request of the
//! snapshot, and lookups by position built from it (where each node is,
//! what each of our pools uses, which spares are free, which requests
//! wait, which image each label would boot).

use std::borrow::Cow;

use super::fast::{FastMap, FastSet, Key, bytes_eq};
use super::quota::one_instance;
use super::summary::{Positions, RequestSummary};
use super::{LaunchImage, LocalState, PoolKey, Snapshot};
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
    /// A static pool's label: served by its hosts' ready nodes, never
    /// launched (the label counts as available, so the pool does not
    /// decline requests while every host is busy; they wait).
    Static,
}

impl ImageRef<'_> {
    /// What a launch boots; `None` for a static label, where nothing is
    /// ever launched.
    pub(super) fn to_launch_image(self) -> Option<LaunchImage> {
        Some(match self {
            ImageRef::Static => return None,
            ImageRef::Upload(u) => LaunchImage::Upload {
                image: u.image.clone(),
                build: u.build_id.clone(),
                upload: u.id.clone(),
                external_id: u.upload.external_id.clone().unwrap_or_default(),
            },
            ImageRef::Cloud(name) => LaunchImage::Cloud {
                name: name.to_owned(),
            },
        })
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
    /// The labels it can boot now, sorted ([`OurPool::launchable_now`]),
    /// computed once per pass (the registry and the pool's status both
    /// need them).
    pub launchable: Vec<&'a str>,
}

impl OurPool<'_> {
    /// The labels this pool can boot now, sorted: none while it is
    /// disabled or its provider handles no requests (`max-concurrency: 0`),
    /// else those whose image is ready.
    fn launchable_now<'c>(&self, cfg: &'c Config) -> Vec<&'c str> {
        let provider = &cfg.providers[self.provider];
        let pool = &provider.pools[self.pool];
        if pool.is_disabled() || provider.max_concurrency == Some(0) {
            return Vec::new();
        }
        let mut out: Vec<&str> = pool
            .labels
            .iter()
            .filter(|l| {
                self.labels
                    .get(&Key(&l.name))
                    .is_some_and(|info| info.image.is_some())
            })
            .map(|l| l.name.as_str())
            .collect();
        out.sort_unstable();
        out.dedup();
        out
    }
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
    /// Their summaries, aligned with `waiting`: pickup reads a waiting
    /// request's record only when its summary is not enough.
    pub waiting_summaries: Vec<RequestSummary>,
    /// The label names [`RequestSummary::labels`] refers to, by number.
    pub request_labels: Vec<std::sync::Arc<str>>,
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

/// Where a node is: our pool position and provider position, if ours, and
/// its state and lock (packed: there is one per node, and the index is
/// walked every pass; cleanup walks these instead of the records, and
/// reads the record only of a node whose state asks for it).
#[derive(Clone, Copy, Debug)]
struct Place {
    pool: u32,
    provider: u32,
    state: NodeState,
    allocated: bool,
    locked: bool,
}

impl Place {
    const NONE: u32 = u32::MAX;
}

impl<'a> Index<'a> {
    pub fn build(s: &'a Snapshot, cfg: &'a Config, local: &LocalState) -> Self {
        let mut idx = Index {
            places: Vec::with_capacity(s.nodes.len()),
            pool_used: Vec::new(),
            unpooled_used: vec![Resources::new(); cfg.providers.len()],
            ready_unallocated: Vec::new(),
            waiting: Vec::new(),
            waiting_summaries: Vec::new(),
            request_labels: Vec::new(),
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
        for (pi, p) in cfg.providers.iter().enumerate() {
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
                    launchable: Vec::new(),
                });
            }
        }
        // The few fields read of every node and request come from the
        // compact summaries (`summary`), not from the records.
        let positions = Positions::new(cfg, local);
        let summaries = local.node_summaries.summaries(s, &positions, local);
        // One look at every request.
        for (i, (r, sum)) in s.requests.iter().zip(summaries.requests()).enumerate() {
            if sum.min_ready {
                idx.min_ready_requests.push(i);
            }
            if !matches!(sum.state, RequestState::Requested | RequestState::Pending)
                || r.locked
                || local.owned_requests.contains_key(&r.id)
            {
                continue;
            }
            if sum.state == RequestState::Requested {
                idx.waiting.push(i);
                idx.waiting_summaries.push(*sum);
            } else {
                idx.lost.push(i);
            }
        }
        idx.request_labels = summaries.label_names().to_vec();
        idx.ready_free_in_pool = vec![Vec::new(); idx.our_pools.len()];
        idx.deleting_in_pool = vec![0; idx.our_pools.len()];
        idx.pool_used = vec![Resources::new(); idx.our_pools.len()];
        // Ready, free nodes of each of our pools: (age key, node).
        let mut ready: Vec<Vec<(f64, usize)>> = vec![Vec::new(); idx.our_pools.len()];
        for (i, (rec, sum)) in s.nodes.iter().zip(summaries.all()).enumerate() {
            let res = match summaries.quota(sum.quota) {
                Some(r) => Cow::Borrowed(r),
                None => node_resources(s, i),
            };
            // Only an allocated node's record is read for its request id.
            if sum.allocated
                && let Some(r) = &rec.node.allocated_to
            {
                idx.allocations.entry(r.as_str()).or_default().push(i);
            }
            let place = Place {
                pool: sum.pool,
                provider: sum.provider,
                state: sum.state,
                allocated: sum.allocated,
                locked: rec.locked,
            };
            idx.places.push(place);
            let (pos, provider) = (
                (place.pool != Place::NONE).then_some(place.pool as usize),
                (place.provider != Place::NONE).then_some(place.provider as usize),
            );
            // Usage is summed here, while the node is at hand; the cloud's
            // share of it is the sum over its pools (QuotaState).
            match (pos, provider) {
                (Some(pos), _) => idx.pool_used[pos].add(&res),
                (None, Some(pi)) => idx.unpooled_used[pi].add(&res),
                (None, None) => {}
            }
            if sum.state == NodeState::Ready && !sum.allocated {
                idx.ready_unallocated.push(i);
            }
            match (sum.state, pos) {
                (NodeState::Ready, Some(pos)) if !sum.allocated && !rec.locked => {
                    ready[pos].push((sum.state_time, i));
                }
                (NodeState::Deleting, Some(pos)) => idx.deleting_in_pool[pos] += 1,
                _ if sum.in_flight => {
                    if let Some(pi) = provider {
                        idx.in_flight[pi] += 1;
                    }
                }
                _ => {}
            }
        }
        drop(summaries);
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
            idx.our_pools[pos].launchable = idx.our_pools[pos].launchable_now(cfg);
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

    /// Whether node `i`'s lock has a contender.
    pub fn node_locked(&self, i: usize) -> bool {
        self.places[i].locked
    }

    /// Node `i`'s state, and whether it is allocated to anything.
    pub fn node_state(&self, i: usize) -> (NodeState, bool) {
        let p = &self.places[i];
        (p.state, p.allocated)
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
        ImageSource::Static => Some(ImageRef::Static),
    }
}
