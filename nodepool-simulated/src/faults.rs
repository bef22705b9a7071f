//! A fault-injecting [`Provider`] decorator for any provider: latency,
//! errors, hangs, Nova's quota 403, rate-limit 429 with a `Retry-After`,
//! and a limit on calls in flight (the `object_store` crate's
//! `ThrottledStore` and `LimitStore`, for clouds).
//!
//! The simulated cloud fails the way a cloud does on its own (failure
//! dice, `api-fault`), for every caller alike. [`FaultyProvider`] instead
//! fails exactly the calls a test names, around whatever provider it
//! wraps (the simulated cloud, OpenStack, an embedder's own), and counts
//! what it did, so a test can say "the next two creates are refused for
//! quota" and check that they were:
//!
//! ```
//! # use std::sync::Arc;
//! # use nodepool_model::config::Config;
//! # use nodepool_model::provider::Provider;
//! use nodepool_simulated::SimulatedProvider;
//! use nodepool_simulated::faults::{Fault, FaultyProvider, Operation};
//! # let config = Config::from_yaml(
//! #     "labels: [{name: l}]\nproviders: [{name: sim, driver: simulated, cloud-images: [{name: i}], \
//! #      pools: [{name: main, labels: [{name: l, cloud-image: i, min-ram: 1}]}]}]",
//! # )?;
//! let cloud = SimulatedProvider::new(&config.providers[0])?;
//! let faulty = FaultyProvider::new(Arc::new(cloud));
//! faulty.set_next(Operation::CreateInstance, Fault::QuotaExceeded, 2);
//! // Hand `Arc::new(faulty.clone())` to the launcher; keep `faulty` to
//! // change faults while it runs and to read the counters.
//! assert_eq!(faulty.injected(Operation::CreateInstance), 0);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! Every call goes: wait for a permit when a concurrency limit is set
//! (single calls only: the long waits `wait_for_instance` and
//! `delete_instance` are many calls inside a provider, not one), then the
//! operation's latency (tokio's clock, so exact on a paused clock), then
//! its fault if one is set: an error is returned without calling the
//! provider, a hang waits until the faults change and is then decided
//! again. Without a fault, the call goes to the provider unchanged; a
//! decorator with nothing set passes the provider conformance suite
//! exactly when the provider does.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::{Semaphore, watch};

use nodepool_model::config::PoolLabel;
use nodepool_model::model::{Limits, Resources};
use nodepool_model::provider::{
    CloudImageInfo, CloudResource, ImageUploadSpec, Instance, InstanceSpec, Provider,
    ProviderError, ResourceKind, SnapshotSpec,
};

/// One method of the [`Provider`] trait that makes a call to the cloud.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Operation {
    /// [`Provider::quota_limits`].
    QuotaLimits,
    /// [`Provider::label_resources`].
    LabelResources,
    /// [`Provider::create_instance`].
    CreateInstance,
    /// [`Provider::wait_for_instance`].
    WaitForInstance,
    /// [`Provider::get_instance`].
    GetInstance,
    /// [`Provider::list_instances`].
    ListInstances,
    /// [`Provider::delete_instance`].
    DeleteInstance,
    /// [`Provider::console_log`].
    ConsoleLog,
    /// [`Provider::upload_image`].
    UploadImage,
    /// [`Provider::list_images`].
    ListImages,
    /// [`Provider::delete_image`].
    DeleteImage,
    /// [`Provider::snapshot_instance`].
    SnapshotInstance,
    /// [`Provider::list_resources`].
    ListResources,
    /// [`Provider::delete_resource`].
    DeleteResource,
}

impl Operation {
    /// Every operation.
    pub const ALL: [Operation; 14] = [
        Operation::QuotaLimits,
        Operation::LabelResources,
        Operation::CreateInstance,
        Operation::WaitForInstance,
        Operation::GetInstance,
        Operation::ListInstances,
        Operation::DeleteInstance,
        Operation::ConsoleLog,
        Operation::UploadImage,
        Operation::ListImages,
        Operation::DeleteImage,
        Operation::SnapshotInstance,
        Operation::ListResources,
        Operation::DeleteResource,
    ];

    /// The trait method's name, as error messages give it.
    pub fn name(self) -> &'static str {
        match self {
            Operation::QuotaLimits => "quota_limits",
            Operation::LabelResources => "label_resources",
            Operation::CreateInstance => "create_instance",
            Operation::WaitForInstance => "wait_for_instance",
            Operation::GetInstance => "get_instance",
            Operation::ListInstances => "list_instances",
            Operation::DeleteInstance => "delete_instance",
            Operation::ConsoleLog => "console_log",
            Operation::UploadImage => "upload_image",
            Operation::ListImages => "list_images",
            Operation::DeleteImage => "delete_image",
            Operation::SnapshotInstance => "snapshot_instance",
            Operation::ListResources => "list_resources",
            Operation::DeleteResource => "delete_resource",
        }
    }

    /// Whether it waits on the cloud rather than making one call (the
    /// concurrency limit does not hold these).
    pub fn is_wait(self) -> bool {
        matches!(self, Operation::WaitForInstance | Operation::DeleteInstance)
    }

    fn index(self) -> usize {
        self as usize
    }
}

impl std::fmt::Display for Operation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// What an injected fault does to a call.
#[derive(Clone, Debug, PartialEq)]
pub enum Fault {
    /// Fails with this error.
    Error(ProviderError),
    /// HTTP 500: [`ProviderError::Transient`].
    ServerError,
    /// Nova's 403 quota refusal: [`ProviderError::QuotaExceeded`], with a
    /// message [`nodepool_model::cloud::is_quota_message`] recognises.
    QuotaExceeded,
    /// HTTP 429: [`ProviderError::RateLimited`] with this `Retry-After`.
    RateLimited {
        /// How long the cloud asks callers to wait.
        retry_after: Option<Duration>,
    },
    /// No answer: the call waits until the faults are next changed (a
    /// `set*` or `clear*` of any operation), then is decided again by what
    /// its operation has then (still a hang: it waits on; an error: that
    /// error; nothing: it goes through), or until its caller gives up.
    /// The launcher bounds every call by the provider's `api_timeout`.
    Hang,
}

impl Fault {
    /// The error a call of `op` on `provider` gets; `None` for a hang.
    fn error(&self, provider: &str, op: Operation) -> Option<ProviderError> {
        let at = format!("provider {provider}: {op}");
        Some(match self {
            Fault::Error(e) => e.clone(),
            Fault::ServerError => ProviderError::Transient(format!(
                "{at}: HTTP 500 Internal Server Error (injected fault)"
            )),
            Fault::QuotaExceeded => ProviderError::QuotaExceeded(format!(
                "{at}: HTTP 403 Quota exceeded for instances (injected fault)"
            )),
            Fault::RateLimited { retry_after } => ProviderError::RateLimited {
                message: format!(
                    "{at}: HTTP 429 Too Many Requests (injected fault{})",
                    retry_after
                        .map(|d| format!(", Retry-After: {}", d.as_secs()))
                        .unwrap_or_default()
                ),
                retry_after: *retry_after,
            },
            Fault::Hang => return None,
        })
    }
}

/// A fault set on an operation, for every call or the next few.
#[derive(Clone, Debug)]
struct Rule {
    fault: Fault,
    /// Calls it still applies to; `None`: until cleared.
    remaining: Option<u32>,
}

const OPS: usize = Operation::ALL.len();

/// The mutable part, behind one lock never held across an `.await`.
#[derive(Debug, Default)]
struct Table {
    rules: [Option<Rule>; OPS],
    latency: [Duration; OPS],
    calls: [u64; OPS],
    injected: [u64; OPS],
}

#[derive(Debug)]
struct Shared {
    table: Mutex<Table>,
    /// Bumped by every change of faults, so hung calls look again.
    changed: watch::Sender<u64>,
    limit: Option<(usize, Semaphore)>,
    in_flight: AtomicUsize,
    peak_in_flight: AtomicUsize,
}

/// A [`Provider`] decorator that injects faults and latency (see the
/// [module documentation](self)). Cheap to clone: clones share the
/// faults and counters, so a test keeps one while the launcher holds
/// another as `Arc<dyn Provider>`.
#[derive(Clone, Debug)]
pub struct FaultyProvider {
    inner: Arc<dyn Provider>,
    shared: Arc<Shared>,
}

impl FaultyProvider {
    /// `inner` with no fault, no latency and no concurrency limit.
    pub fn new(inner: Arc<dyn Provider>) -> Self {
        Self::build(inner, None)
    }

    /// `inner` letting at most `n` single calls (every operation but the
    /// waits, see [`Operation::is_wait`]) run at once; the others wait
    /// their turn, in order. `n` is at least one.
    pub fn with_concurrency_limit(inner: Arc<dyn Provider>, n: usize) -> Self {
        let n = n.max(1);
        Self::build(inner, Some((n, Semaphore::new(n))))
    }

    fn build(inner: Arc<dyn Provider>, limit: Option<(usize, Semaphore)>) -> Self {
        FaultyProvider {
            inner,
            shared: Arc::new(Shared {
                table: Mutex::new(Table::default()),
                changed: watch::Sender::new(0),
                limit,
                in_flight: AtomicUsize::new(0),
                peak_in_flight: AtomicUsize::new(0),
            }),
        }
    }

    /// The decorated provider.
    pub fn inner(&self) -> &Arc<dyn Provider> {
        &self.inner
    }

    /// The concurrency limit, if one is set.
    pub fn concurrency_limit(&self) -> Option<usize> {
        self.shared.limit.as_ref().map(|(n, _)| *n)
    }

    fn table(&self) -> MutexGuard<'_, Table> {
        // The table is plain data: a panic elsewhere cannot leave it half
        // updated in a way that matters to a test.
        self.shared.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn changed(&self) {
        self.shared.changed.send_modify(|g| *g = g.wrapping_add(1));
    }

    /// Every call of `op` gets `fault` until [`clear`](Self::clear)ed
    /// (replacing what `op` had).
    pub fn set(&self, op: Operation, fault: Fault) {
        self.table().rules[op.index()] = Some(Rule {
            fault,
            remaining: None,
        });
        self.changed();
    }

    /// The next `times` calls of `op` get `fault`; later ones go through
    /// (replacing what `op` had). `times == 0` clears `op`.
    pub fn set_next(&self, op: Operation, fault: Fault, times: u32) {
        self.table().rules[op.index()] = (times > 0).then_some(Rule {
            fault,
            remaining: Some(times),
        });
        self.changed();
    }

    /// Every call of every operation gets `fault` until cleared.
    pub fn set_all(&self, fault: Fault) {
        {
            let mut t = self.table();
            for rule in &mut t.rules {
                *rule = Some(Rule {
                    fault: fault.clone(),
                    remaining: None,
                });
            }
        }
        self.changed();
    }

    /// Calls of `op` go through again (a hung one among them too).
    pub fn clear(&self, op: Operation) {
        self.table().rules[op.index()] = None;
        self.changed();
    }

    /// Every operation goes through again, and latencies are removed.
    pub fn clear_all(&self) {
        {
            let mut t = self.table();
            t.rules = Default::default();
            t.latency = Default::default();
        }
        self.changed();
    }

    /// The fault `op` has now, if any.
    pub fn fault(&self, op: Operation) -> Option<Fault> {
        self.table().rules[op.index()]
            .as_ref()
            .map(|r| r.fault.clone())
    }

    /// Every call of `op` first waits `latency` (zero: none).
    pub fn set_latency(&self, op: Operation, latency: Duration) {
        self.table().latency[op.index()] = latency;
    }

    /// Every call of every operation first waits `latency`.
    pub fn set_latency_all(&self, latency: Duration) {
        self.table().latency = [latency; OPS];
    }

    /// Calls of `op` made so far (injected, hung and passed through).
    pub fn calls(&self, op: Operation) -> u64 {
        self.table().calls[op.index()]
    }

    /// Calls of `op` that got a fault so far (a hung call answered later
    /// by another fault counts once).
    pub fn injected(&self, op: Operation) -> u64 {
        self.table().injected[op.index()]
    }

    /// Faults injected into calls of any operation so far.
    pub fn injected_total(&self) -> u64 {
        self.table().injected.iter().sum()
    }

    /// Calls running now (waiting for a permit, latency or a hang included).
    pub fn in_flight(&self) -> usize {
        self.shared.in_flight.load(Ordering::SeqCst)
    }

    /// The most calls that held a permit at once (with a concurrency
    /// limit), or were running at once (without).
    pub fn peak_in_flight(&self) -> usize {
        self.shared.peak_in_flight.load(Ordering::SeqCst)
    }

    /// Counts a call and takes its fault.
    fn begin(&self, op: Operation) -> (Duration, Option<Fault>) {
        let mut t = self.table();
        let i = op.index();
        t.calls[i] += 1;
        let latency = t.latency[i];
        let fault = take(&mut t.rules[i]);
        if fault.is_some() {
            t.injected[i] += 1;
        }
        (latency, fault)
    }

    /// Decides a hung call of `op` again: `Some(Hang)` while `op` still
    /// hangs (taking nothing: the call already counted), another fault
    /// (taken, so a `set_next` is spent by the calls it answers), or none.
    fn decide_again(&self, op: Operation) -> Option<Fault> {
        let mut t = self.table();
        let rule = &mut t.rules[op.index()];
        match rule {
            Some(Rule {
                fault: Fault::Hang, ..
            }) => Some(Fault::Hang),
            _ => take(rule),
        }
    }

    /// Runs one call of `op` through the limit, latency and fault, then
    /// `call` on the provider.
    async fn call<T, Fut>(
        &self,
        op: Operation,
        call: impl FnOnce() -> Fut,
    ) -> Result<T, ProviderError>
    where
        Fut: Future<Output = Result<T, ProviderError>>,
    {
        let _flight = InFlight::enter(&self.shared.in_flight);
        let _permit = match &self.shared.limit {
            Some((_, semaphore)) if !op.is_wait() => {
                Some(semaphore.acquire().await.map_err(|e| {
                    ProviderError::Other(format!("{op}: concurrency limit closed: {e}"))
                })?)
            }
            _ => None,
        };
        let held = match &self.shared.limit {
            Some((n, semaphore)) => n - semaphore.available_permits(),
            None => self.shared.in_flight.load(Ordering::SeqCst),
        };
        self.shared.peak_in_flight.fetch_max(held, Ordering::SeqCst);
        // Subscribed before the fault is taken, so a change made right
        // after it wakes a hang.
        let mut changes = self.shared.changed.subscribe();
        let (latency, fault) = self.begin(op);
        if !latency.is_zero() {
            tokio::time::sleep(latency).await;
        }
        if let Some(fault) = fault {
            match fault.error(self.inner.name(), op) {
                Some(e) => return Err(e),
                None => loop {
                    // The sender lives as long as `self`: this never ends
                    // with an error while the call is alive.
                    if changes.changed().await.is_err() {
                        break;
                    }
                    match self.decide_again(op) {
                        Some(Fault::Hang) => continue,
                        Some(other) => {
                            // Decided again: the new fault answers.
                            if let Some(e) = other.error(self.inner.name(), op) {
                                return Err(e);
                            }
                        }
                        None => break,
                    }
                },
            }
        }
        call().await
    }
}

/// The fault of a rule, spending one of a `set_next` (and removing the
/// rule with its last).
fn take(rule: &mut Option<Rule>) -> Option<Fault> {
    let r = rule.as_mut()?;
    let fault = r.fault.clone();
    if let Some(n) = &mut r.remaining {
        *n = n.saturating_sub(1);
        if *n == 0 {
            *rule = None;
        }
    }
    Some(fault)
}

/// Counts a call in flight for as long as it lives (a cancelled call
/// included).
struct InFlight<'a>(&'a AtomicUsize);

impl<'a> InFlight<'a> {
    fn enter(n: &'a AtomicUsize) -> Self {
        n.fetch_add(1, Ordering::SeqCst);
        InFlight(n)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

#[async_trait]
impl Provider for FaultyProvider {
    fn name(&self) -> &str {
        self.inner.name()
    }

    async fn quota_limits(&self) -> Result<Limits, ProviderError> {
        self.call(Operation::QuotaLimits, || self.inner.quota_limits())
            .await
    }

    async fn label_resources(&self, label: &PoolLabel) -> Result<Resources, ProviderError> {
        self.call(Operation::LabelResources, || {
            self.inner.label_resources(label)
        })
        .await
    }

    async fn create_instance(&self, spec: &InstanceSpec) -> Result<String, ProviderError> {
        self.call(Operation::CreateInstance, || {
            self.inner.create_instance(spec)
        })
        .await
    }

    async fn wait_for_instance(
        &self,
        external_id: &str,
        spec: &InstanceSpec,
    ) -> Result<Instance, ProviderError> {
        self.call(Operation::WaitForInstance, || {
            self.inner.wait_for_instance(external_id, spec)
        })
        .await
    }

    async fn get_instance(&self, external_id: &str) -> Result<Option<Instance>, ProviderError> {
        self.call(Operation::GetInstance, || {
            self.inner.get_instance(external_id)
        })
        .await
    }

    async fn list_instances(&self) -> Result<Vec<Instance>, ProviderError> {
        self.call(Operation::ListInstances, || self.inner.list_instances())
            .await
    }

    async fn delete_instance(&self, external_id: &str) -> Result<(), ProviderError> {
        self.call(Operation::DeleteInstance, || {
            self.inner.delete_instance(external_id)
        })
        .await
    }

    async fn console_log(&self, external_id: &str) -> Result<String, ProviderError> {
        self.call(Operation::ConsoleLog, || {
            self.inner.console_log(external_id)
        })
        .await
    }

    async fn upload_image(&self, spec: &ImageUploadSpec) -> Result<String, ProviderError> {
        self.call(Operation::UploadImage, || self.inner.upload_image(spec))
            .await
    }

    async fn list_images(&self) -> Result<Vec<CloudImageInfo>, ProviderError> {
        self.call(Operation::ListImages, || self.inner.list_images())
            .await
    }

    async fn delete_image(&self, external_id: &str) -> Result<(), ProviderError> {
        self.call(Operation::DeleteImage, || {
            self.inner.delete_image(external_id)
        })
        .await
    }

    async fn snapshot_instance(
        &self,
        external_id: &str,
        spec: &SnapshotSpec,
    ) -> Result<String, ProviderError> {
        self.call(Operation::SnapshotInstance, || {
            self.inner.snapshot_instance(external_id, spec)
        })
        .await
    }

    async fn list_resources(
        &self,
        kind: ResourceKind,
    ) -> Result<Vec<CloudResource>, ProviderError> {
        self.call(Operation::ListResources, || self.inner.list_resources(kind))
            .await
    }

    async fn delete_resource(&self, kind: ResourceKind, id: &str) -> Result<(), ProviderError> {
        self.call(Operation::DeleteResource, || {
            self.inner.delete_resource(kind, id)
        })
        .await
    }

    fn skip_nodescan(&self) -> bool {
        self.inner.skip_nodescan()
    }

    fn connection_port(&self, instance: &Instance) -> Option<u16> {
        self.inner.connection_port(instance)
    }

    fn api_timeout(&self) -> Duration {
        self.inner.api_timeout()
    }
}
