//! Quota accounting for one planning pass (reference §4.2).
//!
//! Usage starts from the store's nodes (every state counts: a deleting
//! server still holds its quota until the cloud frees it) and grows with
//! every launch planned in the pass, so one pass never plans past a limit.
//! Cloud usage is the larger of "unmanaged servers + our nodes" and what the
//! cloud itself reports, so a launch is never planned into quota the cloud
//! already says is full.
//!
//! Pools are addressed by their position in the configuration (providers in
//! order, then their pools), the same numbering the request planner uses.

use std::collections::HashMap;

use super::Snapshot;
use crate::config::Config;
use crate::model::{INSTANCES, Limits, Resources};

/// Which limit blocks a launch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum QuotaBlock {
    /// The pool's `max-*` limits.
    Pool(String),
    /// The cloud's limits.
    Cloud(String),
    /// The tenant's `tenant-resource-limits`.
    Tenant(String),
}

/// Whose limit a shortfall is of.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum QuotaScope {
    /// The pool's `max-*` limits.
    Pool,
    /// The cloud's limits (less what the cloud holds that is not ours).
    Cloud,
    /// This tenant's `tenant-resource-limits`.
    Tenant(String),
}

/// One limit that a launch would pass, in numbers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Shortfall {
    /// Whose limit.
    pub scope: QuotaScope,
    /// Which resource (`instances`, `cores`, `ram`, ...).
    pub resource: String,
    /// In use now (for a cloud: by our nodes and by servers that are not).
    pub used: i64,
    /// The limit.
    pub limit: i64,
    /// What the launch needs of it.
    pub need: i64,
}

#[derive(Debug)]
struct PoolQuota {
    provider: usize,
    limits: Limits,
    ignore_cloud: bool,
    used: Resources,
}

#[derive(Debug, Default)]
struct CloudQuota {
    limits: Limits,
    unmanaged: Resources,
    reported: Option<Resources>,
    ours: Resources,
}

/// Usage and limits during one pass.
#[derive(Debug)]
pub struct QuotaState {
    pools: Vec<PoolQuota>,
    clouds: Vec<CloudQuota>,
    tenant_limits: HashMap<String, Limits>,
    tenant_usage: HashMap<String, Resources>,
}

impl QuotaState {
    /// Usage from the snapshot's nodes: `pool_used[p]` is the quota used
    /// by the nodes of pool position `p`, `unpooled_used[i]` that of nodes
    /// of provider position `i` in pools no longer configured.
    /// `node_resources(i)` is the quota of `snapshot.nodes[i]` (for tenant
    /// usage).
    pub fn new<'s>(
        snapshot: &Snapshot,
        config: &Config,
        pool_used: &[Resources],
        unpooled_used: &[Resources],
        node_resources: impl Fn(usize) -> std::borrow::Cow<'s, Resources>,
    ) -> Self {
        let mut q = QuotaState {
            pools: Vec::new(),
            clouds: Vec::new(),
            tenant_limits: config
                .tenant_resource_limits
                .iter()
                .map(|(t, l)| (t.clone(), l.clone()))
                .collect(),
            tenant_usage: HashMap::new(),
        };
        for (pi, p) in config.providers.iter().enumerate() {
            let mut cloud = CloudQuota::default();
            if let Some(view) = snapshot.providers.get(&p.name) {
                cloud.limits = view.limits.clone();
                cloud.unmanaged = view.unmanaged.clone();
                cloud.reported = view.reported_usage.clone();
            }
            // A pool no longer configured: its nodes still use the cloud.
            if let Some(used) = unpooled_used.get(pi) {
                cloud.ours.add(used);
            }
            for pool in &p.pools {
                let used = pool_used.get(q.pools.len()).cloned().unwrap_or_default();
                cloud.ours.add(&used);
                q.pools.push(PoolQuota {
                    provider: pi,
                    limits: pool.limits(),
                    ignore_cloud: pool.ignore_provider_quota,
                    used,
                });
            }
            q.clouds.push(cloud);
        }
        if !q.tenant_limits.is_empty() {
            for (i, rec) in snapshot.nodes.iter().enumerate() {
                if let Some(t) = rec
                    .node
                    .tenant_name
                    .as_deref()
                    .filter(|t| q.tenant_limits.contains_key(*t))
                {
                    q.tenant_usage
                        .entry(t.to_owned())
                        .or_default()
                        .add(&node_resources(i));
                }
            }
        }
        q
    }

    fn cloud_used(&self, provider: usize) -> Resources {
        let c = &self.clouds[provider];
        let mut used = c.unmanaged.clone();
        used.add(&c.ours);
        if let Some(reported) = &c.reported {
            for (name, v) in reported.iter() {
                if v > used.get(name) {
                    used.set(name, v);
                }
            }
        }
        used
    }

    /// Whether one more node needing `need` fits now in the pool (by
    /// position), the cloud and the tenant.
    pub fn can_launch(
        &self,
        pool: usize,
        tenant: Option<&str>,
        need: &Resources,
    ) -> Result<(), QuotaBlock> {
        let p = &self.pools[pool];
        if let Some(name) = p.limits.first_exceeded(&p.used, need) {
            return Err(QuotaBlock::Pool(name.to_owned()));
        }
        let limits = &self.clouds[p.provider].limits;
        if !p.ignore_cloud && !limits.is_unlimited() {
            let used = self.cloud_used(p.provider);
            if let Some(name) = limits.first_exceeded(&used, need) {
                return Err(QuotaBlock::Cloud(name.to_owned()));
            }
        }
        self.tenant_fits(tenant, need)
    }

    /// Whether a tenant's limits allow `need` more.
    pub fn tenant_fits(&self, tenant: Option<&str>, need: &Resources) -> Result<(), QuotaBlock> {
        let Some(t) = tenant else { return Ok(()) };
        let Some(limits) = self.tenant_limits.get(t) else {
            return Ok(());
        };
        let empty = Resources::new();
        let used = self.tenant_usage.get(t).unwrap_or(&empty);
        match limits.first_exceeded(used, need) {
            Some(name) => Err(QuotaBlock::Tenant(name.to_owned())),
            None => Ok(()),
        }
    }

    /// Whether `need` could ever fit in the pool: its limits, and the
    /// cloud's limits minus unmanaged usage, with no nodes of ours at all.
    pub fn could_ever_fit(&self, pool: usize, need: &Resources) -> Result<(), QuotaBlock> {
        let p = &self.pools[pool];
        if let Some(name) = p.limits.first_exceeded(&Resources::new(), need) {
            return Err(QuotaBlock::Pool(name.to_owned()));
        }
        let c = &self.clouds[p.provider];
        if !p.ignore_cloud
            && let Some(name) = c.limits.first_exceeded(&c.unmanaged, need)
        {
            return Err(QuotaBlock::Cloud(name.to_owned()));
        }
        Ok(())
    }

    /// What [`can_launch`](Self::can_launch) refuses, in numbers: the
    /// first limit of the pool, the cloud or the tenant that one more node
    /// needing `need` would pass. With `ever`, the pool and cloud limits
    /// are checked against an empty pool, as
    /// [`could_ever_fit`](Self::could_ever_fit) does.
    pub fn shortfall(
        &self,
        pool: usize,
        tenant: Option<&str>,
        need: &Resources,
        ever: bool,
    ) -> Option<Shortfall> {
        let p = &self.pools[pool];
        let none = Resources::new();
        let short = |scope: QuotaScope, limits: &Limits, used: &Resources| {
            let resource = limits.first_exceeded(used, need)?;
            Some(Shortfall {
                scope,
                resource: resource.to_owned(),
                used: used.get(resource),
                limit: limits.get(resource).unwrap_or(i64::MAX),
                need: need.get(resource),
            })
        };
        let pool_used = if ever { &none } else { &p.used };
        if let Some(s) = short(QuotaScope::Pool, &p.limits, pool_used) {
            return Some(s);
        }
        let c = &self.clouds[p.provider];
        if !p.ignore_cloud && !c.limits.is_unlimited() {
            let used = if ever {
                c.unmanaged.clone()
            } else {
                self.cloud_used(p.provider)
            };
            if let Some(s) = short(QuotaScope::Cloud, &c.limits, &used) {
                return Some(s);
            }
        }
        if ever {
            return None;
        }
        let t = tenant?;
        let limits = self.tenant_limits.get(t)?;
        short(
            QuotaScope::Tenant(t.to_owned()),
            limits,
            self.tenant_usage.get(t).unwrap_or(&none),
        )
    }

    /// Records a planned launch.
    pub fn add(&mut self, pool: usize, tenant: Option<&str>, need: &Resources) {
        self.pools[pool].used.add(need);
        let provider = self.pools[pool].provider;
        self.clouds[provider].ours.add(need);
        if let Some(t) = tenant
            && self.tenant_limits.contains_key(t)
        {
            self.tenant_usage.entry(t.to_owned()).or_default().add(need);
        }
    }

    /// Moves a node's tenant charge: a spare given back stops counting
    /// against its old tenant, a reused node starts counting against the
    /// new one.
    pub fn retag(&mut self, from: Option<&str>, to: Option<&str>, res: &Resources) {
        if from == to {
            return;
        }
        if let Some(t) = from.filter(|t| self.tenant_limits.contains_key(*t)) {
            self.tenant_usage
                .entry(t.to_owned())
                .or_default()
                .subtract(res);
        }
        if let Some(t) = to.filter(|t| self.tenant_limits.contains_key(*t)) {
            self.tenant_usage.entry(t.to_owned()).or_default().add(res);
        }
    }

    /// Current usage of a pool (by position).
    pub fn pool_usage(&self, pool: usize) -> &Resources {
        &self.pools[pool].used
    }

    /// Current usage of a tenant.
    pub fn tenant_usage(&self, tenant: &str) -> Resources {
        self.tenant_usage.get(tenant).cloned().unwrap_or_default()
    }
}

/// Quota of one node when nothing better is known.
pub fn one_instance() -> Resources {
    Resources::new().with(INSTANCES, 1)
}
