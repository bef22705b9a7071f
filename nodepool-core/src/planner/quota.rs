//! Quota accounting for one planning pass (reference §4.2).
//!
//! Usage starts from the store's nodes (every state counts: a deleting
//! server still holds its quota until the cloud frees it) and grows with
//! every launch planned in the pass, so one pass never plans past a limit.
//! Cloud usage is the larger of "unmanaged servers + our nodes" and what the
//! cloud itself reports, so a launch is never planned into quota the cloud
//! already says is full.

use std::collections::HashMap;

use super::{PoolKey, Snapshot};
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

/// Usage and limits during one pass.
#[derive(Debug)]
pub struct QuotaState {
    pool_limits: HashMap<PoolKey, Limits>,
    ignore_cloud: HashMap<PoolKey, bool>,
    cloud_limits: HashMap<String, Limits>,
    unmanaged: HashMap<String, Resources>,
    reported: HashMap<String, Resources>,
    tenant_limits: HashMap<String, Limits>,
    pool_usage: HashMap<PoolKey, Resources>,
    provider_usage: HashMap<String, Resources>,
    tenant_usage: HashMap<String, Resources>,
}

impl QuotaState {
    /// Usage from the snapshot's nodes; `node_resources[i]` is the quota of
    /// `snapshot.nodes[i]`.
    pub fn new(snapshot: &Snapshot, config: &Config, node_resources: &[Resources]) -> Self {
        let mut q = QuotaState {
            pool_limits: HashMap::new(),
            ignore_cloud: HashMap::new(),
            cloud_limits: HashMap::new(),
            unmanaged: HashMap::new(),
            reported: HashMap::new(),
            tenant_limits: config
                .tenant_resource_limits
                .iter()
                .map(|(t, l)| (t.clone(), l.clone()))
                .collect(),
            pool_usage: HashMap::new(),
            provider_usage: HashMap::new(),
            tenant_usage: HashMap::new(),
        };
        for p in &config.providers {
            for pool in &p.pools {
                let key = PoolKey::new(&p.name, &pool.name);
                q.pool_limits.insert(key.clone(), pool.limits());
                q.ignore_cloud.insert(key, pool.ignore_provider_quota);
            }
            if let Some(view) = snapshot.providers.get(&p.name) {
                q.cloud_limits.insert(p.name.clone(), view.limits.clone());
                q.unmanaged.insert(p.name.clone(), view.unmanaged.clone());
                if let Some(r) = &view.reported_usage {
                    q.reported.insert(p.name.clone(), r.clone());
                }
            }
        }
        for (rec, res) in snapshot.nodes.iter().zip(node_resources) {
            let n = &rec.node;
            q.pool_usage
                .entry(PoolKey::new(&n.provider, &n.pool))
                .or_default()
                .add(res);
            q.provider_usage
                .entry(n.provider.clone())
                .or_default()
                .add(res);
            if let Some(t) = &n.tenant_name {
                q.tenant_usage.entry(t.clone()).or_default().add(res);
            }
        }
        q
    }

    fn cloud_used(&self, provider: &str) -> Resources {
        let mut used = self.unmanaged.get(provider).cloned().unwrap_or_default();
        if let Some(u) = self.provider_usage.get(provider) {
            used.add(u);
        }
        if let Some(reported) = self.reported.get(provider) {
            let mut out = Resources::new();
            let names: std::collections::BTreeSet<&str> = used
                .iter()
                .map(|(k, _)| k)
                .chain(reported.iter().map(|(k, _)| k))
                .collect();
            for name in names {
                out.set(name, used.get(name).max(reported.get(name)));
            }
            return out;
        }
        used
    }

    /// Whether one more node needing `need` fits now in the pool, the cloud
    /// and the tenant.
    pub fn can_launch(
        &self,
        pool: &PoolKey,
        tenant: Option<&str>,
        need: &Resources,
    ) -> Result<(), QuotaBlock> {
        let empty = Resources::new();
        if let Some(limits) = self.pool_limits.get(pool) {
            let used = self.pool_usage.get(pool).unwrap_or(&empty);
            if let Some(name) = limits.first_exceeded(used, need) {
                return Err(QuotaBlock::Pool(name.to_owned()));
            }
        }
        if !self.ignore_cloud.get(pool).copied().unwrap_or(false)
            && let Some(limits) = self.cloud_limits.get(&pool.provider)
        {
            let used = self.cloud_used(&pool.provider);
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
    pub fn could_ever_fit(&self, pool: &PoolKey, need: &Resources) -> Result<(), QuotaBlock> {
        let empty = Resources::new();
        if let Some(limits) = self.pool_limits.get(pool)
            && let Some(name) = limits.first_exceeded(&empty, need)
        {
            return Err(QuotaBlock::Pool(name.to_owned()));
        }
        if !self.ignore_cloud.get(pool).copied().unwrap_or(false)
            && let Some(limits) = self.cloud_limits.get(&pool.provider)
        {
            let unmanaged = self.unmanaged.get(&pool.provider).unwrap_or(&empty);
            if let Some(name) = limits.first_exceeded(unmanaged, need) {
                return Err(QuotaBlock::Cloud(name.to_owned()));
            }
        }
        Ok(())
    }

    /// Records a planned launch.
    pub fn add(&mut self, pool: &PoolKey, tenant: Option<&str>, need: &Resources) {
        self.pool_usage.entry(pool.clone()).or_default().add(need);
        self.provider_usage
            .entry(pool.provider.clone())
            .or_default()
            .add(need);
        if let Some(t) = tenant {
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
        if let Some(t) = from {
            self.tenant_usage
                .entry(t.to_owned())
                .or_default()
                .subtract(res);
        }
        if let Some(t) = to {
            self.tenant_usage.entry(t.to_owned()).or_default().add(res);
        }
    }

    /// Current usage of a pool.
    pub fn pool_usage(&self, pool: &PoolKey) -> Resources {
        self.pool_usage.get(pool).cloned().unwrap_or_default()
    }

    /// Current usage of a tenant.
    pub fn tenant_usage(&self, tenant: &str) -> Resources {
        self.tenant_usage.get(tenant).cloned().unwrap_or_default()
    }

    /// Current cloud usage of a provider (unmanaged + ours, or reported).
    pub fn cloud_usage(&self, provider: &str) -> Resources {
        self.cloud_used(provider)
    }
}

/// Quota of one node when nothing better is known.
pub fn one_instance() -> Resources {
    Resources::new().with(INSTANCES, 1)
}
