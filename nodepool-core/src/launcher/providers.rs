//! The launcher's clouds: one [`Provider`] per configured provider, and a
//! background observer per provider that keeps what planning needs to know
//! about the cloud (limits, flavors, missing cloud images, the server list
//! for leak checks) fresh — so that a planning pass never waits on a cloud
//! API, and a hung API never wedges the launcher.
//!
//! Every provider is wrapped in its [breaker](super::health): the
//! observer stops refreshing while the provider is unavailable, and makes
//! the probe that brings it back when no other call does.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::health::{HealthCheckedProvider, HealthMonitor, HealthPolicy};
use super::metrics::Metrics;
use crate::config::{ImageSource, ProviderConfig};
use crate::model::{Limits, Resources};
use crate::planner::{ProviderOutage, ProviderView};
use crate::provider::{CloudResource, Instance, Provider, ResourceKind};
use crate::store::NodeRecord;

/// How often the observer refreshes each kind of information.
#[derive(Clone, Debug)]
pub struct ObserverIntervals {
    /// Cloud limits (Nodepool caches them 5 minutes).
    pub limits: Duration,
    /// Server listing for leak checks and unmanaged usage, and the
    /// floating IP and port listings of the leaked-resource cleanup when
    /// the provider asks for it (Nodepool's cleanup interval: 60 s).
    pub instances: Duration,
    /// Cloud image lookups (Nodepool re-checks a missing one after 300 s).
    pub cloud_images: Duration,
    /// Retry after a failed call.
    pub retry: Duration,
    /// Timeout of each cloud call made by the observer.
    pub call_timeout: Duration,
}

impl Default for ObserverIntervals {
    fn default() -> Self {
        ObserverIntervals {
            limits: Duration::from_secs(300),
            instances: Duration::from_secs(60),
            cloud_images: Duration::from_secs(300),
            retry: Duration::from_secs(10),
            call_timeout: Duration::from_secs(60),
        }
    }
}

#[derive(Debug, Default)]
struct Observed {
    limits: Option<Limits>,
    limits_due: Option<Instant>,
    label_resources: BTreeMap<String, BTreeMap<String, Resources>>,
    flavors_known: bool,
    missing_cloud_images: BTreeSet<String>,
    images_due: Option<Instant>,
    fresh_instances: Option<Vec<Instance>>,
    /// When the call that made `fresh_instances` started.
    instances_listed: Option<Instant>,
    instances_due: Option<Instant>,
    fresh_floating_ips: Option<Vec<CloudResource>>,
    fresh_ports: Option<Vec<CloudResource>>,
    /// When the call that made `fresh_ports` started.
    ports_listed: Option<Instant>,
    unmanaged: Resources,
    reported: Option<Resources>,
    last_error: Option<String>,
}

/// One configured provider and what is known about its cloud.
#[derive(Debug)]
pub(crate) struct ProviderHandle {
    pub config: ProviderConfig,
    /// The cloud behind its breaker: every call the launcher makes goes
    /// through it.
    pub provider: Arc<dyn Provider>,
    /// The breaker.
    pub health: Arc<HealthMonitor>,
    observed: Arc<Mutex<Observed>>,
    stop: CancellationToken,
}

impl Drop for ProviderHandle {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn bounded<T, E: std::fmt::Display>(
    limit: Duration,
    what: &str,
    f: impl std::future::Future<Output = Result<T, E>>,
) -> Result<T, String> {
    match tokio::time::timeout(limit, f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(format!("{what}: {e}")),
        Err(_) => Err(format!("{what}: timed out after {limit:?}")),
    }
}

impl ProviderHandle {
    /// Puts the provider behind a breaker and starts its observer.
    pub fn start(
        config: ProviderConfig,
        provider: Arc<dyn Provider>,
        intervals: ObserverIntervals,
        policy: HealthPolicy,
        metrics: Arc<Metrics>,
    ) -> Self {
        let health = Arc::new(HealthMonitor::new(&config.name, policy, metrics));
        let provider: Arc<dyn Provider> =
            Arc::new(HealthCheckedProvider::new(provider, health.clone()));
        let observed = Arc::new(Mutex::new(Observed::default()));
        let stop = CancellationToken::new();
        let handle = ProviderHandle {
            config: config.clone(),
            provider: provider.clone(),
            health: health.clone(),
            observed: observed.clone(),
            stop: stop.clone(),
        };
        tokio::spawn(observe(config, provider, health, observed, intervals, stop));
        handle
    }

    /// Whether the provider is unavailable now (its breaker is open).
    pub fn unavailable(&self) -> bool {
        self.health.outage().is_some()
    }

    fn observed(&self) -> std::sync::MutexGuard<'_, Observed> {
        self.observed.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Forces a limits refresh (after the cloud refused a launch for quota).
    pub fn invalidate_limits(&self) {
        self.observed().limits_due = None;
    }

    /// The planner's view of this cloud. A fresh server listing is handed
    /// out once (it drives the two-pass leak rule) and also updates the
    /// unmanaged usage, computed against the store's nodes. `now` (epoch
    /// seconds) dates an outage.
    pub fn view(&self, nodes: &[NodeRecord], now: f64) -> ProviderView {
        let outage = self.health.outage().map(|o| ProviderOutage {
            since: now - o.since.elapsed().as_secs_f64(),
            reason: o.reason,
        });
        let mut o = self.observed();
        let instances = o.fresh_instances.take();
        let floating_ips = o.fresh_floating_ips.take();
        let ports = o.fresh_ports.take();
        let ports_listed_at = ports
            .as_ref()
            .and(o.ports_listed)
            .map(|at| now - at.elapsed().as_secs_f64());
        let instances_listed_at = instances
            .as_ref()
            .and(o.instances_listed)
            .map(|at| now - at.elapsed().as_secs_f64());
        if let Some(list) = &instances {
            let (unmanaged, total) = cloud_usage(&self.config.name, list, nodes);
            o.unmanaged = unmanaged;
            o.reported = Some(total);
        }
        ProviderView {
            limits: o.limits.clone().unwrap_or_default(),
            unmanaged: o.unmanaged.clone(),
            reported_usage: o.reported.clone(),
            label_resources: o.label_resources.clone(),
            availability_zones: Vec::new(),
            missing_cloud_images: o.missing_cloud_images.clone(),
            instances,
            instances_listed_at,
            floating_ips,
            ports,
            ports_listed_at,
            outage,
        }
    }

    /// The last error the observer met, for the state dump.
    pub fn last_error(&self) -> Option<String> {
        self.observed().last_error.clone()
    }
}

/// The cloud images the provider's pool labels boot from.
pub(crate) fn wanted_cloud_images(config: &ProviderConfig) -> Vec<&crate::config::CloudImage> {
    let names: BTreeSet<&str> = config
        .pools
        .iter()
        .flat_map(|p| p.labels.iter())
        .filter_map(|l| match &l.image {
            ImageSource::CloudImage(c) => Some(c.as_str()),
            ImageSource::DiskImage(_) | ImageSource::Static => None,
        })
        .collect();
    names
        .into_iter()
        .filter_map(|n| config.cloud_image(n))
        .collect()
}

/// Those of `wanted` (by config name) that the cloud's image list lacks,
/// matched by id or name as Nodepool does.
pub(crate) fn missing_cloud_images(
    wanted: &[&crate::config::CloudImage],
    images: &[crate::provider::CloudImageInfo],
) -> BTreeSet<String> {
    wanted
        .iter()
        .filter(|c| {
            let key = c.external_name();
            !images.iter().any(|i| i.id == key || i.name == key)
        })
        .map(|c| c.name.clone())
        .collect()
}

/// Quota the servers of a cloud use: those that are not live nodes of
/// provider `provider` (unmanaged), and all of them (what the cloud
/// reports as in use).
pub(crate) fn cloud_usage(
    provider: &str,
    servers: &[Instance],
    nodes: &[NodeRecord],
) -> (Resources, Resources) {
    let ours: BTreeSet<&str> = nodes
        .iter()
        .filter(|n| n.node.provider == provider)
        .map(|n| n.id.as_str())
        .collect();
    let mut unmanaged = Resources::new();
    let mut total = Resources::new();
    for inst in servers {
        let res = inst
            .resources
            .clone()
            .unwrap_or_else(|| Resources::new().with(crate::model::INSTANCES, 1));
        total.add(&res);
        let managed = inst.provider_name().as_deref() == Some(provider)
            && inst.node_id().is_some_and(|id| ours.contains(id.as_str()));
        if !managed {
            unmanaged.add(&res);
        }
    }
    (unmanaged, total)
}

async fn observe(
    config: ProviderConfig,
    provider: Arc<dyn Provider>,
    health: Arc<HealthMonitor>,
    observed: Arc<Mutex<Observed>>,
    iv: ObserverIntervals,
    stop: CancellationToken,
) {
    let lock = || observed.lock().unwrap_or_else(|p| p.into_inner());
    loop {
        if health.outage().is_some() {
            // Unavailable: every refresh would fail fast (and warn). Only
            // the probe is made, when due and no other call made it; a
            // cheap call that caches nothing.
            if health.probe_due()
                && let Ok(Ok(l)) =
                    tokio::time::timeout(iv.call_timeout, provider.quota_limits()).await
            {
                let mut o = lock();
                o.limits = Some(l);
                o.limits_due = Some(Instant::now() + iv.limits);
            }
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_millis(200)) => {}
            }
            continue;
        }
        let now = Instant::now();
        let (need_limits, need_flavors, need_images, need_instances) = {
            let o = lock();
            (
                o.limits_due.is_none_or(|d| d <= now),
                !o.flavors_known,
                o.images_due.is_none_or(|d| d <= now),
                o.instances_due.is_none_or(|d| d <= now),
            )
        };
        let mut error = None;
        if need_limits {
            match bounded(iv.call_timeout, "quota limits", provider.quota_limits()).await {
                Ok(l) => {
                    let mut o = lock();
                    o.limits = Some(l);
                    o.limits_due = Some(Instant::now() + iv.limits);
                }
                Err(e) => {
                    // The stale value (if any) stays in use, as Nodepool does.
                    lock().limits_due = Some(Instant::now() + iv.retry);
                    error = Some(e);
                }
            }
        }
        if need_flavors {
            let mut all = BTreeMap::new();
            let mut ok = true;
            for pool in &config.pools {
                let mut labels = BTreeMap::new();
                for label in &pool.labels {
                    match bounded(
                        iv.call_timeout,
                        "flavor lookup",
                        provider.label_resources(label),
                    )
                    .await
                    {
                        Ok(r) => {
                            labels.insert(label.name.clone(), r);
                        }
                        Err(e) => {
                            ok = false;
                            error =
                                Some(format!("label {} in pool {}: {e}", label.name, pool.name));
                        }
                    }
                }
                all.insert(pool.name.clone(), labels);
            }
            let mut o = lock();
            o.label_resources = all;
            o.flavors_known = ok;
        }
        if need_images {
            let wanted = wanted_cloud_images(&config);
            if wanted.is_empty() {
                lock().images_due = Some(Instant::now() + iv.cloud_images);
            } else {
                match bounded(iv.call_timeout, "image list", provider.list_images()).await {
                    Ok(images) => {
                        let missing = missing_cloud_images(&wanted, &images);
                        let mut o = lock();
                        o.missing_cloud_images = missing;
                        o.images_due = Some(Instant::now() + iv.cloud_images);
                    }
                    Err(e) => {
                        lock().images_due = Some(Instant::now() + iv.retry);
                        error = Some(e);
                    }
                }
            }
        }
        if need_instances {
            let started = Instant::now();
            match bounded(iv.call_timeout, "server list", provider.list_instances()).await {
                Ok(list) => {
                    let mut o = lock();
                    o.fresh_instances = Some(list);
                    o.instances_listed = Some(started);
                    o.instances_due = Some(Instant::now() + iv.instances);
                }
                Err(e) => {
                    lock().instances_due = Some(Instant::now() + iv.retry);
                    error = Some(e);
                }
            }
            // The leaked-resource cleanup's listings, at the same pace
            // (Python's cleanup worker does all three every 60 s). A
            // failed one is skipped until the next round.
            if config.clean_floating_ips {
                match bounded(
                    iv.call_timeout,
                    "floating IP list",
                    provider.list_resources(ResourceKind::FloatingIp),
                )
                .await
                {
                    Ok(list) => lock().fresh_floating_ips = Some(list),
                    Err(e) => error = Some(e),
                }
            }
            if config.port_cleanup_interval.is_some() {
                let started = Instant::now();
                match bounded(
                    iv.call_timeout,
                    "port list",
                    provider.list_resources(ResourceKind::Port),
                )
                .await
                {
                    Ok(list) => {
                        let mut o = lock();
                        o.fresh_ports = Some(list);
                        o.ports_listed = Some(started);
                    }
                    Err(e) => error = Some(e),
                }
            }
        }
        if let Some(e) = &error {
            tracing::warn!(provider = %config.name, error = %e, "cloud information could not be refreshed");
        }
        lock().last_error = error;
        let next = {
            let o = lock();
            [o.limits_due, o.images_due, o.instances_due]
                .into_iter()
                .flatten()
                .min()
                .unwrap_or_else(|| Instant::now() + iv.retry)
                .min(Instant::now() + Duration::from_secs(1))
        };
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep_until(next) => {}
        }
    }
}
