//! Provider health: a circuit breaker per cloud, so that a cloud whose API
//! hangs, times out or answers 5xx/429 stops holding work hostage.
//!
//! Two parts:
//!
//! - [`ProviderHealth`], a pure state machine (no IO; the caller passes
//!   tokio's `now`): closed (calls go through) until
//!   [`HealthPolicy::failure_threshold`] consecutive API failures, then
//!   open (calls fail fast) for a backoff that doubles with every failed
//!   probe, never shorter than the cloud's `Retry-After`; then half-open:
//!   one call, the probe, goes through, and its answer closes the breaker
//!   or opens it again.
//! - [`HealthCheckedProvider`], a [`Provider`] decorator the launcher puts
//!   around every cloud it builds: every single call is bounded by the
//!   provider's [`api_timeout`](Provider::api_timeout) and its result
//!   classified ([`ProviderError::is_api_failure`]: timeouts, 5xx and
//!   connection failures, rate limiting count; not-found, quota, invalid
//!   requests, failed servers are answers and do not); long waits
//!   (`wait_for_instance`, `delete_instance`) are cut short the moment the
//!   breaker opens, so launches on a failing cloud end within seconds
//!   instead of after `launch-timeout`.
//!
//! The planner sees an open (or half-open) breaker as the provider's
//! [`outage`](crate::planner::ProviderView::outage): its pools take no
//! requests, requests held there are handed back, and other providers take
//! the work (see `planner::requests`).

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::Notify;
use tokio::time::Instant;

use super::metrics::{Metrics, families};
use crate::config::PoolLabel;
use crate::model::{Limits, Resources};
use crate::provider::{
    CloudImageInfo, CloudResource, ImageUploadSpec, Instance, InstanceSpec, Provider,
    ProviderError, ResourceKind,
};

/// Tunables of the breaker. `Default` gives production values.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthPolicy {
    /// Consecutive API failures that mark the provider unavailable.
    pub failure_threshold: u32,
    /// How long it stays unavailable after the first opening; doubled after
    /// each failed probe.
    pub initial_backoff: Duration,
    /// Upper bound of the doubling (one probe per this long at worst).
    pub max_backoff: Duration,
    /// The longest `Retry-After` honoured: a misconfigured proxy asking
    /// for a day must not take a cloud out for a day.
    pub max_retry_after: Duration,
}

impl Default for HealthPolicy {
    fn default() -> Self {
        HealthPolicy {
            failure_threshold: 3,
            initial_backoff: Duration::from_secs(2),
            max_backoff: Duration::from_secs(60),
            max_retry_after: Duration::from_secs(600),
        }
    }
}

/// What the breaker lets a caller do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admission {
    /// Go ahead (the breaker is closed).
    Call,
    /// Go ahead as the one probe of a half-open breaker: its answer
    /// decides whether the provider is available again.
    Probe,
    /// Do not call: the provider is unavailable.
    Refuse,
}

/// What a call's outcome says about the cloud's API.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CallResult {
    /// The API answered (successfully or with an answer about the request).
    Answered,
    /// The API failed: no answer in time, 5xx, connection failure, 429.
    Failed {
        /// What happened, for logs and listings.
        reason: String,
        /// How long the cloud asked to wait, when it said.
        retry_after: Option<Duration>,
    },
}

impl CallResult {
    /// The meaning of a call's outcome.
    pub fn of<T>(r: &Result<T, ProviderError>) -> Self {
        match r {
            Err(e) if e.is_api_failure() => CallResult::Failed {
                reason: e.to_string(),
                retry_after: e.retry_after(),
            },
            _ => CallResult::Answered,
        }
    }
}

/// A change of availability, for logs and metrics.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    /// The provider became unavailable.
    Opened {
        /// The last failure.
        reason: String,
        /// Consecutive failures that led to it.
        failures: u32,
        /// Until the first probe.
        retry_in: Duration,
    },
    /// A probe failed: unavailable for longer.
    Reopened {
        /// The probe's failure.
        reason: String,
        /// Until the next probe.
        retry_in: Duration,
    },
    /// A probe succeeded: available again.
    Closed {
        /// How long it was unavailable.
        unavailable_for: Duration,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Breaker {
    Closed,
    Open { until: Instant },
    HalfOpen { probing: bool },
}

/// Why and since when a provider is unavailable.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outage {
    /// When it was marked unavailable.
    pub since: Instant,
    /// The latest failure.
    pub reason: String,
}

/// The breaker of one provider. Pure: every method takes `now` (tokio's
/// clock) and nothing else, so it is tested on a paused clock.
#[derive(Clone, Debug)]
pub struct ProviderHealth {
    policy: HealthPolicy,
    breaker: Breaker,
    /// Consecutive API failures while closed.
    failures: u32,
    /// Openings since the provider was last available (the backoff's
    /// exponent).
    openings: u32,
    outage: Option<Outage>,
}

impl ProviderHealth {
    /// An available provider.
    pub fn new(policy: HealthPolicy) -> Self {
        ProviderHealth {
            policy,
            breaker: Breaker::Closed,
            failures: 0,
            openings: 0,
            outage: None,
        }
    }

    /// Whether a call may be made now. `may_probe`: whether this call can
    /// serve as the probe (long waits cannot: a probe must answer soon).
    pub fn admit(&mut self, now: Instant, may_probe: bool) -> Admission {
        match self.breaker {
            Breaker::Closed => Admission::Call,
            Breaker::Open { until } if now >= until && may_probe => {
                self.breaker = Breaker::HalfOpen { probing: true };
                Admission::Probe
            }
            Breaker::HalfOpen { probing: false } if may_probe => {
                self.breaker = Breaker::HalfOpen { probing: true };
                Admission::Probe
            }
            _ => Admission::Refuse,
        }
    }

    /// Whether a probe should be made now (the observer makes one when no
    /// other call does).
    pub fn probe_due(&self, now: Instant) -> bool {
        match self.breaker {
            Breaker::Closed | Breaker::HalfOpen { probing: true } => false,
            Breaker::Open { until } => now >= until,
            Breaker::HalfOpen { probing: false } => true,
        }
    }

    /// The probe was dropped before it answered: the next call probes.
    pub fn abandon_probe(&mut self) {
        if self.breaker == (Breaker::HalfOpen { probing: true }) {
            self.breaker = Breaker::HalfOpen { probing: false };
        }
    }

    /// Records the outcome of an admitted call.
    pub fn record(
        &mut self,
        admission: Admission,
        result: &CallResult,
        now: Instant,
    ) -> Option<Change> {
        match (admission, self.breaker, result) {
            (Admission::Refuse, ..) => None,
            (Admission::Call, Breaker::Closed, CallResult::Answered) => {
                self.failures = 0;
                None
            }
            (
                Admission::Call,
                Breaker::Closed,
                CallResult::Failed {
                    reason,
                    retry_after,
                },
            ) => {
                self.failures += 1;
                if self.failures < self.policy.failure_threshold.max(1) {
                    return None;
                }
                let failures = std::mem::take(&mut self.failures);
                self.openings = 1;
                let retry_in = self.backoff(*retry_after);
                self.breaker = Breaker::Open {
                    until: now + retry_in,
                };
                self.outage = Some(Outage {
                    since: now,
                    reason: reason.clone(),
                });
                Some(Change::Opened {
                    reason: reason.clone(),
                    failures,
                    retry_in,
                })
            }
            // A call admitted before the breaker opened, answering late: it
            // proves nothing, but a longer Retry-After is still honoured.
            (
                Admission::Call,
                Breaker::Open { until },
                CallResult::Failed {
                    retry_after: Some(d),
                    ..
                },
            ) => {
                let asked = now + (*d).min(self.policy.max_retry_after);
                if asked > until {
                    self.breaker = Breaker::Open { until: asked };
                }
                None
            }
            (Admission::Call, ..) => None,
            (Admission::Probe, Breaker::HalfOpen { probing: true }, CallResult::Answered) => {
                let since = self.outage.take().map_or(now, |o| o.since);
                self.breaker = Breaker::Closed;
                self.failures = 0;
                self.openings = 0;
                Some(Change::Closed {
                    unavailable_for: now.saturating_duration_since(since),
                })
            }
            (
                Admission::Probe,
                Breaker::HalfOpen { probing: true },
                CallResult::Failed {
                    reason,
                    retry_after,
                },
            ) => {
                self.openings = self.openings.saturating_add(1);
                let retry_in = self.backoff(*retry_after);
                self.breaker = Breaker::Open {
                    until: now + retry_in,
                };
                match &mut self.outage {
                    Some(o) => o.reason = reason.clone(),
                    None => {
                        self.outage = Some(Outage {
                            since: now,
                            reason: reason.clone(),
                        })
                    }
                }
                Some(Change::Reopened {
                    reason: reason.clone(),
                    retry_in,
                })
            }
            (Admission::Probe, ..) => None,
        }
    }

    /// The open time after the `openings`-th opening: the doubled backoff,
    /// or the cloud's `Retry-After` when that is longer.
    fn backoff(&self, retry_after: Option<Duration>) -> Duration {
        let exp = self.openings.saturating_sub(1).min(20);
        let doubled = self
            .policy
            .initial_backoff
            .saturating_mul(1 << exp)
            .min(self.policy.max_backoff);
        match retry_after {
            Some(d) => doubled.max(d.min(self.policy.max_retry_after)),
            None => doubled,
        }
    }

    /// Why and since when the provider is unavailable; `None` while it is
    /// available. A half-open breaker still counts: its probe has not
    /// answered yet.
    pub fn outage(&self) -> Option<&Outage> {
        self.outage.as_ref()
    }

    /// When the next probe may go, while unavailable.
    pub fn next_probe(&self) -> Option<Instant> {
        match self.breaker {
            Breaker::Open { until } => Some(until),
            _ => None,
        }
    }
}

/// A provider's breaker, shared by its decorator, its observer and the
/// launcher's planning passes.
#[derive(Debug)]
pub struct HealthMonitor {
    name: String,
    state: Mutex<ProviderHealth>,
    /// Woken when the breaker opens, to cut long waits short.
    opened: Notify,
    metrics: Arc<Metrics>,
}

impl HealthMonitor {
    /// A monitor for provider `name`, reporting to `metrics`.
    pub fn new(name: &str, policy: HealthPolicy, metrics: Arc<Metrics>) -> Self {
        metrics.gauge_as(
            &health_gauge(name),
            &families::PROVIDER_HEALTH,
            &[("provider", name)],
            1.0,
        );
        HealthMonitor {
            name: name.to_owned(),
            state: Mutex::new(ProviderHealth::new(policy)),
            opened: Notify::new(),
            metrics,
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, ProviderHealth> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Why and since when the provider is unavailable, if it is.
    pub fn outage(&self) -> Option<Outage> {
        self.state().outage().cloned()
    }

    /// Whether a probe should be made now.
    pub fn probe_due(&self) -> bool {
        self.state().probe_due(Instant::now())
    }

    fn admit(&self, what: &str, may_probe: bool) -> Result<Admission, ProviderError> {
        let mut st = self.state();
        match st.admit(Instant::now(), may_probe) {
            Admission::Refuse => {
                let reason = st
                    .outage()
                    .map(|o| o.reason.clone())
                    .unwrap_or_else(|| "its API keeps failing".into());
                Err(ProviderError::Unavailable(format!(
                    "provider {}: {what} not attempted while the provider is unavailable ({reason})",
                    self.name
                )))
            }
            a => Ok(a),
        }
    }

    fn record(&self, admission: Admission, result: &CallResult) {
        let change = self.state().record(admission, result, Instant::now());
        let Some(change) = change else { return };
        let p = &self.name;
        match change {
            Change::Opened {
                reason,
                failures,
                retry_in,
            } => {
                tracing::warn!(provider = %p, %reason, failures, probe_in_s = retry_in.as_secs_f64(),
                    "provider marked unavailable: its API keeps failing; its pools take no requests until a probe succeeds");
                self.metrics.incr_as(
                    &format!("nodepool.provider.{p}.outages"),
                    &families::PROVIDER_OUTAGES,
                    &[("provider", p)],
                );
                self.metrics.gauge_as(
                    &health_gauge(p),
                    &families::PROVIDER_HEALTH,
                    &[("provider", p)],
                    0.0,
                );
                self.opened.notify_waiters();
            }
            Change::Reopened { reason, retry_in } => {
                tracing::debug!(provider = %p, %reason, probe_in_s = retry_in.as_secs_f64(),
                    "provider still unavailable: the probe failed");
            }
            Change::Closed { unavailable_for } => {
                tracing::info!(provider = %p, unavailable_s = unavailable_for.as_secs_f64(),
                    "provider available again: a probe succeeded");
                self.metrics.gauge_as(
                    &health_gauge(p),
                    &families::PROVIDER_HEALTH,
                    &[("provider", p)],
                    1.0,
                );
            }
        }
    }

    /// Runs one API call: fails fast while unavailable (unless it is the
    /// probe), bounds it by `timeout`, and records what its outcome says.
    pub async fn call<T>(
        &self,
        what: &str,
        timeout: Duration,
        fut: impl Future<Output = Result<T, ProviderError>>,
    ) -> Result<T, ProviderError> {
        let admission = self.admit(what, true)?;
        let mut probe = ProbeGuard {
            monitor: self,
            armed: admission == Admission::Probe,
        };
        let result = match tokio::time::timeout(timeout, fut).await {
            Ok(r) => r,
            Err(_) => Err(ProviderError::Timeout(format!(
                "provider {}: {what}: no answer within {:.1} s",
                self.name,
                timeout.as_secs_f64()
            ))),
        };
        probe.armed = false;
        self.record(admission, &CallResult::of(&result));
        result
    }

    /// Runs a long wait (a boot, a delete): fails fast while unavailable,
    /// and ends with [`ProviderError::Unavailable`] the moment the breaker
    /// opens. Never a probe.
    pub async fn wait<T>(
        &self,
        what: &str,
        fut: impl Future<Output = Result<T, ProviderError>>,
    ) -> Result<T, ProviderError> {
        // Registered before the check, so an opening in between is seen.
        let opened = self.opened.notified();
        let admission = self.admit(what, false)?;
        tokio::select! {
            r = fut => {
                self.record(admission, &CallResult::of(&r));
                r
            }
            _ = opened => {
                let reason = self
                    .outage()
                    .map(|o| o.reason)
                    .unwrap_or_else(|| "its API keeps failing".into());
                Err(ProviderError::Unavailable(format!(
                    "provider {}: {what} cut short: the provider became unavailable ({reason})",
                    self.name
                )))
            }
        }
    }
}

/// The metric of a provider's availability: 1 available, 0 not.
pub(crate) fn health_gauge(provider: &str) -> String {
    format!("nodepool.provider.{provider}.health")
}

/// Hands the probe on when the probing call is dropped before it answered
/// (its caller timed out or was cancelled); otherwise the breaker would
/// wait for an answer that never comes.
struct ProbeGuard<'m> {
    monitor: &'m HealthMonitor,
    armed: bool,
}

impl Drop for ProbeGuard<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.monitor.state().abandon_probe();
        }
    }
}

/// A provider behind its breaker (see the module documentation).
#[derive(Debug)]
pub struct HealthCheckedProvider {
    inner: Arc<dyn Provider>,
    monitor: Arc<HealthMonitor>,
    timeout: Duration,
}

impl HealthCheckedProvider {
    /// Wraps `inner`; every single call is bounded by its `api_timeout`.
    pub fn new(inner: Arc<dyn Provider>, monitor: Arc<HealthMonitor>) -> Self {
        let timeout = inner.api_timeout();
        HealthCheckedProvider {
            inner,
            monitor,
            timeout,
        }
    }

    /// The breaker.
    pub fn monitor(&self) -> &Arc<HealthMonitor> {
        &self.monitor
    }

    async fn call<T>(
        &self,
        what: &str,
        fut: impl Future<Output = Result<T, ProviderError>>,
    ) -> Result<T, ProviderError> {
        self.monitor.call(what, self.timeout, fut).await
    }
}

#[async_trait]
impl Provider for HealthCheckedProvider {
    fn name(&self) -> &str {
        self.inner.name()
    }

    async fn quota_limits(&self) -> Result<Limits, ProviderError> {
        self.call("quota limits", self.inner.quota_limits()).await
    }

    async fn label_resources(&self, label: &PoolLabel) -> Result<Resources, ProviderError> {
        self.call("flavor lookup", self.inner.label_resources(label))
            .await
    }

    async fn create_instance(&self, spec: &InstanceSpec) -> Result<String, ProviderError> {
        self.call("server create", self.inner.create_instance(spec))
            .await
    }

    async fn wait_for_instance(
        &self,
        external_id: &str,
        spec: &InstanceSpec,
    ) -> Result<Instance, ProviderError> {
        self.monitor
            .wait(
                "waiting for a server",
                self.inner.wait_for_instance(external_id, spec),
            )
            .await
    }

    async fn get_instance(&self, external_id: &str) -> Result<Option<Instance>, ProviderError> {
        self.call("server lookup", self.inner.get_instance(external_id))
            .await
    }

    async fn list_instances(&self) -> Result<Vec<Instance>, ProviderError> {
        self.call("server list", self.inner.list_instances()).await
    }

    async fn delete_instance(&self, external_id: &str) -> Result<(), ProviderError> {
        self.monitor
            .wait("server delete", self.inner.delete_instance(external_id))
            .await
    }

    async fn console_log(&self, external_id: &str) -> Result<String, ProviderError> {
        self.call("console log", self.inner.console_log(external_id))
            .await
    }

    /// Passed through: uploads are the builder's, bounded by
    /// `image-upload-timeout`, and the launcher does not make them.
    async fn upload_image(&self, spec: &ImageUploadSpec) -> Result<String, ProviderError> {
        self.inner.upload_image(spec).await
    }

    async fn list_images(&self) -> Result<Vec<CloudImageInfo>, ProviderError> {
        self.call("image list", self.inner.list_images()).await
    }

    async fn delete_image(&self, external_id: &str) -> Result<(), ProviderError> {
        self.call("image delete", self.inner.delete_image(external_id))
            .await
    }

    async fn list_resources(
        &self,
        kind: ResourceKind,
    ) -> Result<Vec<CloudResource>, ProviderError> {
        self.call("resource list", self.inner.list_resources(kind))
            .await
    }

    async fn delete_resource(&self, kind: ResourceKind, id: &str) -> Result<(), ProviderError> {
        self.call("resource delete", self.inner.delete_resource(kind, id))
            .await
    }

    fn skip_nodescan(&self) -> bool {
        self.inner.skip_nodescan()
    }

    fn connection_port(&self, instance: &Instance) -> Option<u16> {
        self.inner.connection_port(instance)
    }

    fn api_timeout(&self) -> Duration {
        self.timeout
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn failed(reason: &str) -> CallResult {
        CallResult::Failed {
            reason: reason.into(),
            retry_after: None,
        }
    }

    fn policy() -> HealthPolicy {
        HealthPolicy {
            failure_threshold: 3,
            initial_backoff: Duration::from_secs(2),
            max_backoff: Duration::from_secs(10),
            max_retry_after: Duration::from_secs(100),
        }
    }

    /// One call admitted and recorded.
    fn call(h: &mut ProviderHealth, result: CallResult) -> (Admission, Option<Change>) {
        let now = Instant::now();
        let a = h.admit(now, true);
        let c = h.record(a, &result, now);
        (a, c)
    }

    #[tokio::test(start_paused = true)]
    async fn opens_after_consecutive_failures_only() {
        let mut h = ProviderHealth::new(policy());
        call(&mut h, failed("a"));
        call(&mut h, failed("b"));
        // An answer in between resets the count.
        call(&mut h, CallResult::Answered);
        call(&mut h, failed("c"));
        assert_eq!(call(&mut h, failed("d")).1, None);
        assert!(h.outage().is_none());
        let (a, c) = call(&mut h, failed("e"));
        assert_eq!(a, Admission::Call);
        assert_eq!(
            c,
            Some(Change::Opened {
                reason: "e".into(),
                failures: 3,
                retry_in: Duration::from_secs(2)
            })
        );
        let o = h.outage().expect("unavailable");
        assert_eq!((o.reason.as_str(), o.since), ("e", Instant::now()));
        // While open, every call is refused, long waits included.
        assert_eq!(h.admit(Instant::now(), true), Admission::Refuse);
        assert_eq!(h.admit(Instant::now(), false), Admission::Refuse);
        assert!(!h.probe_due(Instant::now()));
    }

    #[tokio::test(start_paused = true)]
    async fn one_probe_after_the_backoff_closes_it() {
        let mut h = ProviderHealth::new(policy());
        for _ in 0..3 {
            call(&mut h, failed("down"));
        }
        let since = Instant::now();
        tokio::time::advance(Duration::from_millis(1999)).await;
        assert_eq!(h.admit(Instant::now(), true), Admission::Refuse);
        tokio::time::advance(Duration::from_millis(1)).await;
        assert!(h.probe_due(Instant::now()));
        // A long wait never probes.
        assert_eq!(h.admit(Instant::now(), false), Admission::Refuse);
        assert_eq!(h.admit(Instant::now(), true), Admission::Probe);
        // Only one probe at a time; it is still unavailable meanwhile.
        assert_eq!(h.admit(Instant::now(), true), Admission::Refuse);
        assert!(!h.probe_due(Instant::now()));
        assert!(h.outage().is_some());
        // A call admitted before the opening answering now proves nothing.
        assert_eq!(
            h.record(Admission::Call, &CallResult::Answered, Instant::now()),
            None
        );
        assert!(h.outage().is_some());
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(
            h.record(Admission::Probe, &CallResult::Answered, Instant::now()),
            Some(Change::Closed {
                unavailable_for: Instant::now() - since
            })
        );
        assert!(h.outage().is_none());
        assert_eq!(h.admit(Instant::now(), false), Admission::Call);
        // Closed again from zero: it takes the whole threshold to reopen.
        call(&mut h, failed("x"));
        call(&mut h, failed("y"));
        assert!(h.outage().is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn failed_probes_double_the_backoff_up_to_the_cap() {
        let mut h = ProviderHealth::new(policy());
        for _ in 0..3 {
            call(&mut h, failed("down"));
        }
        let since = Instant::now();
        let mut waits = Vec::new();
        for _ in 0..5 {
            let until = h.next_probe().expect("open");
            waits.push(until - Instant::now());
            tokio::time::advance(until - Instant::now()).await;
            let (a, c) = call(&mut h, failed("still down"));
            assert_eq!(a, Admission::Probe);
            assert!(matches!(c, Some(Change::Reopened { .. })), "{c:?}");
        }
        assert_eq!(waits, [2, 4, 8, 10, 10].map(Duration::from_secs));
        let o = h.outage().expect("unavailable");
        assert_eq!(o.since, since, "the outage started at the first opening");
        assert_eq!(o.reason, "still down");
    }

    #[tokio::test(start_paused = true)]
    async fn retry_after_is_honoured_when_longer_and_capped() {
        let mut h = ProviderHealth::new(policy());
        let limited = |secs| CallResult::Failed {
            reason: "429".into(),
            retry_after: Some(Duration::from_secs(secs)),
        };
        call(&mut h, limited(1));
        call(&mut h, limited(1));
        let (_, c) = call(&mut h, limited(30));
        assert_eq!(
            c,
            Some(Change::Opened {
                reason: "429".into(),
                failures: 3,
                retry_in: Duration::from_secs(30)
            })
        );
        // A late answer asking for longer pushes the probe back.
        let now = Instant::now();
        assert_eq!(h.record(Admission::Call, &limited(50), now), None);
        assert_eq!(h.next_probe(), Some(now + Duration::from_secs(50)));
        // ... but a shorter one does not bring it forward.
        assert_eq!(h.record(Admission::Call, &limited(5), now), None);
        assert_eq!(h.next_probe(), Some(now + Duration::from_secs(50)));
        tokio::time::advance(Duration::from_secs(50)).await;
        // Beyond max-retry-after, the cap applies.
        let (a, c) = call(&mut h, limited(100_000));
        assert_eq!(a, Admission::Probe);
        assert_eq!(
            c,
            Some(Change::Reopened {
                reason: "429".into(),
                retry_in: Duration::from_secs(100)
            })
        );
    }

    #[tokio::test(start_paused = true)]
    async fn an_abandoned_probe_hands_the_probe_on() {
        let mut h = ProviderHealth::new(policy());
        for _ in 0..3 {
            call(&mut h, failed("down"));
        }
        tokio::time::advance(Duration::from_secs(2)).await;
        assert_eq!(h.admit(Instant::now(), true), Admission::Probe);
        h.abandon_probe();
        assert!(h.probe_due(Instant::now()));
        assert_eq!(h.admit(Instant::now(), false), Admission::Refuse);
        assert_eq!(h.admit(Instant::now(), true), Admission::Probe);
        // Abandoning when nothing probes changes nothing.
        let mut fresh = ProviderHealth::new(policy());
        fresh.abandon_probe();
        assert_eq!(fresh.admit(Instant::now(), false), Admission::Call);
    }

    #[test]
    fn only_api_failures_count() {
        let api = [
            ProviderError::Timeout("t".into()),
            ProviderError::Transient("500".into()),
            ProviderError::RateLimited {
                message: "429".into(),
                retry_after: Some(Duration::from_secs(7)),
            },
        ];
        for e in api {
            let r: Result<(), _> = Err(e.clone());
            assert!(
                matches!(CallResult::of(&r), CallResult::Failed { .. }),
                "{e:?}"
            );
        }
        let r: Result<(), _> = Err(ProviderError::RateLimited {
            message: "429".into(),
            retry_after: Some(Duration::from_secs(7)),
        });
        assert_eq!(
            CallResult::of(&r),
            CallResult::Failed {
                reason: "rate limited: 429".into(),
                retry_after: Some(Duration::from_secs(7))
            }
        );
        let answers = [
            ProviderError::NotFound("x".into()),
            ProviderError::QuotaExceeded("x".into()),
            ProviderError::InvalidRequest("x".into()),
            ProviderError::ServerFailed("x".into()),
            ProviderError::Unauthenticated("x".into()),
            // Our own fail-fast must not feed itself.
            ProviderError::Unavailable("x".into()),
        ];
        for e in answers {
            let r: Result<(), _> = Err(e.clone());
            assert_eq!(CallResult::of(&r), CallResult::Answered, "{e:?}");
        }
        assert_eq!(
            CallResult::of(&Ok::<_, ProviderError>(1)),
            CallResult::Answered
        );
    }
}
