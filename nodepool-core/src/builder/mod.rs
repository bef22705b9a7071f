//! The builder runtime: builds disk images and keeps every provider's
//! images current, by running the [image planner](crate::planner::images)
//! in a loop and executing its plan through a
//! [`StateStore`](crate::store::StateStore), an
//! [`ImageBuilder`] and the configured
//! [`Provider`]s (reference §5).
//!
//! Embedding mirrors the [launcher](crate::launcher): build a [`Builder`]
//! with a store, a provider factory, an image builder and
//! [`BuilderSettings`], then [`run`](Builder::run) it with a configuration
//! channel (send a new config to reload) and a cancellation token (cancel
//! to stop: running builds are cancelled, which makes `DibBuilder` kill
//! diskimage-builder and sweep; uploads are marked failed). Signals,
//! config files and the DIB work-directory sweep at startup belong to the
//! binary (`nodepool-builder`).
//!
//! Each pass lists this builder's image files (before reading the store,
//! so a file seen always has its record in the snapshot), reads the
//! store's image records, plans, and starts what the plan asks for: builds
//! on up to [`BuilderSettings::build_workers`] workers, uploads on up to
//! [`BuilderSettings::upload_workers`], deletions on up to
//! [`BuilderSettings::cleanup_workers`]; each action takes its lock
//! non-blocking and re-checks under it, so builders sharing a store never
//! both act. Passes run (on the [pass loop](crate::runtime) every runtime
//! shares) when image records change, when a task ends, on a reload, and
//! at least every [`BuilderSettings::max_pass_interval`];
//! [`BuilderStatus::passes`] counts them.
//!
//! Every [`BuilderSettings::leak_check_interval`] each provider's cloud
//! images are listed in a task of their own (a hung cloud never holds up a
//! pass); the next pass plans with the listing, read before the store, and
//! deletes images tagged as uploads of ours that the store does not know
//! once two listings in a row found them (`planner::leaks::leaked_images`).
//!
//! Layout: `local` (the images directory: id file, file scan, deletions,
//! checksums, image names), `hook` (`post-upload-hook`), `tasks` (build,
//! upload and delete tasks, snapshot images), `validate` (boot a server
//! and run a script on it: boot tests of new uploads, snapshot setup).

mod hook;
pub mod local;
mod tasks;
mod validate;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use hook::{HookError, run_post_upload_hook};

use crate::config::{Config, ProviderConfig};
use crate::image_builder::ImageBuilder;
use crate::launcher::metrics::{Metrics, families, sanitize_component};
use crate::model::{Component, ComponentKind, ComponentState};
use crate::planner::images::{
    BuildKey, BuilderLocal, ImageAction, ImagePlan, ImageSnapshot, plan_images,
};
use crate::provider::{CloudImageInfo, Provider};
use crate::runtime::{
    Clock, PassCounter, PassRunner, Passed, ProviderFactory, Wakeups, run_passes,
};
use crate::store::{ComponentRegistration, Store, StoreError, paths};

/// Prunes old build logs of an image before a build: `(log dir, image,
/// build-log-retention)`. The daemon passes `nodepool_dib::prune_build_logs`.
pub type LogPruner =
    Arc<dyn Fn(&Path, &str, Option<u32>) -> std::io::Result<Vec<PathBuf>> + Send + Sync>;

/// Tunables of the builder. `Default` gives Nodepool's values.
#[derive(Clone)]
pub struct BuilderSettings {
    /// Host name recorded in builds and the component registration.
    pub hostname: String,
    /// Version string registered in the component.
    pub version: String,
    /// Builds running at once (`--build-workers`, Nodepool's default 1).
    pub build_workers: usize,
    /// Uploads running at once (`--upload-workers`, default 4).
    pub upload_workers: usize,
    /// Deletions (cloud images, records) running at once.
    pub cleanup_workers: usize,
    /// Longest time between two passes (Nodepool's workers poll every 10 s).
    pub max_pass_interval: Duration,
    /// Shortest time between two passes (coalesces bursts of events).
    pub min_pass_interval: Duration,
    /// How often a running upload reports its progress in the log.
    pub upload_progress_interval: Duration,
    /// Time allowed to delete one cloud image.
    pub delete_timeout: Duration,
    /// An action that succeeded is not started again for this long (so a
    /// no-op, e.g. a lock another builder holds, cannot spin).
    pub repeat_delay: Duration,
    /// An action that failed is retried after this, doubling with each
    /// failure in a row (Nodepool's workers sleep 10 s after an error).
    pub retry_delay: Duration,
    /// The longest retry delay.
    pub max_retry_delay: Duration,
    /// Time allowed at shutdown for cancelled builds to be killed and swept
    /// and for uploads to record their failure.
    pub shutdown_grace: Duration,
    /// How often each provider's cloud images are listed to find leaked
    /// uploads (Nodepool's cleanup interval, 60 s). An image is deleted
    /// after two listings in a row find it leaked.
    pub leak_check_interval: Duration,
    /// Prunes build logs before each build (`build-log-retention`).
    pub log_pruner: Option<LogPruner>,
    /// How often the builder's gauges are sent (build and upload states,
    /// build requests, workers). Build and upload results go out as they
    /// happen.
    pub stats_interval: Duration,
    /// Where "now" comes from.
    pub clock: Clock,
}

impl std::fmt::Debug for BuilderSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BuilderSettings")
            .field("hostname", &self.hostname)
            .field("version", &self.version)
            .field("build_workers", &self.build_workers)
            .field("upload_workers", &self.upload_workers)
            .field("cleanup_workers", &self.cleanup_workers)
            .field("max_pass_interval", &self.max_pass_interval)
            .field("min_pass_interval", &self.min_pass_interval)
            .field("upload_progress_interval", &self.upload_progress_interval)
            .field("delete_timeout", &self.delete_timeout)
            .field("repeat_delay", &self.repeat_delay)
            .field("retry_delay", &self.retry_delay)
            .field("max_retry_delay", &self.max_retry_delay)
            .field("shutdown_grace", &self.shutdown_grace)
            .field("leak_check_interval", &self.leak_check_interval)
            .field("log_pruner", &self.log_pruner.is_some())
            .field("stats_interval", &self.stats_interval)
            .field("clock", &self.clock)
            .finish()
    }
}

impl Default for BuilderSettings {
    fn default() -> Self {
        BuilderSettings {
            hostname: "localhost".into(),
            version: crate::VERSION.into(),
            build_workers: 1,
            upload_workers: 4,
            cleanup_workers: 4,
            max_pass_interval: Duration::from_secs(10),
            min_pass_interval: Duration::from_millis(5),
            upload_progress_interval: Duration::from_secs(60),
            delete_timeout: Duration::from_secs(600),
            repeat_delay: Duration::from_secs(1),
            retry_delay: Duration::from_secs(10),
            max_retry_delay: Duration::from_secs(300),
            // DibBuilder's SIGTERM grace (30 s) plus the sweep.
            shutdown_grace: Duration::from_secs(60),
            leak_check_interval: Duration::from_secs(60),
            log_pruner: None,
            stats_interval: Duration::from_secs(10),
            clock: Clock::System,
        }
    }
}

/// Errors that stop the builder.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BuilderError {
    /// The configuration has no `images-dir`.
    #[error("the builder needs `images-dir` in the configuration")]
    NoImagesDir,
    /// The images directory or the builder id file cannot be used.
    #[error("images directory: {0}")]
    ImagesDir(#[from] std::io::Error),
}

/// What the builder is doing, for state dumps (SIGUSR2).
#[derive(Debug, Default)]
pub struct BuilderStatus {
    ready: std::sync::atomic::AtomicBool,
    passes: PassCounter,
    report: Mutex<String>,
    builder_id: Mutex<String>,
}

impl BuilderStatus {
    /// Whether the first pass completed.
    pub fn is_ready(&self) -> bool {
        self.ready.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// The builder's completed passes: wait for some to see that
    /// something did not happen.
    pub fn passes(&self) -> &PassCounter {
        &self.passes
    }

    /// A human-readable dump of the builder's state.
    pub fn report(&self) -> String {
        self.report
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// This builder's id (empty until it started).
    pub fn builder_id(&self) -> String {
        self.builder_id
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

/// Which worker pool a task runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Build,
    Upload,
    Cleanup,
}

/// What the tasks share with the loop.
pub(crate) struct Shared {
    store: Store,
    metrics: Arc<Metrics>,
    settings: BuilderSettings,
    image_builder: Arc<dyn ImageBuilder>,
    builder_id: String,
    wake: Notify,
    /// Running tasks by action key.
    running: Mutex<HashMap<String, Kind>>,
    /// Builds this process runs, for the planner.
    running_builds: Mutex<BTreeSet<BuildKey>>,
    /// When each recently ended action may start again, and how many
    /// times in a row it failed.
    cooldown: Mutex<HashMap<String, (tokio::time::Instant, u32)>>,
    /// Cancelled at shutdown: builds stop, uploads give up.
    work: CancellationToken,
    /// Cloud image listings made since the last pass, by provider, for
    /// the leak check.
    listings: Mutex<BTreeMap<String, Vec<CloudImageInfo>>>,
    /// Providers whose listing is under way.
    listing: Mutex<BTreeSet<String>>,
}

impl Shared {
    /// The current time (epoch seconds) on the builder's clock.
    pub(crate) fn now(&self) -> f64 {
        self.settings.clock.now()
    }

    /// Records how an action ended: it may start again after the repeat
    /// delay, or after the (growing) retry delay when it failed.
    fn finished(&self, key: &str, ok: bool) {
        let s = &self.settings;
        let now = tokio::time::Instant::now();
        let mut m = self.cooldown.lock().unwrap_or_else(|p| p.into_inner());
        let failures = if ok {
            0
        } else {
            m.get(key).map_or(0, |e| e.1).saturating_add(1)
        };
        let delay = if ok {
            s.repeat_delay
        } else {
            let doubled = s
                .retry_delay
                .saturating_mul(1u32 << failures.saturating_sub(1).min(16));
            doubled.min(s.max_retry_delay.max(s.retry_delay))
        };
        m.insert(key.to_owned(), (now + delay, failures));
        // Entries long past are of actions no longer planned.
        let horizon = s.max_retry_delay.saturating_mul(2);
        m.retain(|_, (at, _)| now.saturating_duration_since(*at) < horizon);
    }

    /// Whether an action must wait (it ended too recently).
    fn cooling(&self, key: &str) -> bool {
        self.cooldown
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(key)
            .is_some_and(|(at, _)| *at > tokio::time::Instant::now())
    }

    fn count(&self, kind: Kind) -> usize {
        self.running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .filter(|k| **k == kind)
            .count()
    }
}

/// Removes a task's key when it ends (however it ends) and wakes the loop.
pub(crate) struct TaskSlot {
    shared: Arc<Shared>,
    key: String,
}

impl Drop for TaskSlot {
    fn drop(&mut self) {
        self.shared
            .running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.key);
        self.shared.wake.notify_one();
    }
}

/// A configured provider and its cloud.
#[derive(Clone, Debug)]
pub(crate) struct ProviderEntry {
    pub config: ProviderConfig,
    pub provider: Arc<dyn Provider>,
}

/// A builder. See the module documentation.
pub struct Builder {
    store: Store,
    factory: ProviderFactory,
    image_builder: Arc<dyn ImageBuilder>,
    settings: BuilderSettings,
    status: Arc<BuilderStatus>,
    metrics: Arc<Metrics>,
}

impl Builder {
    /// A builder on a store, building images with `image_builder` and
    /// reaching clouds through providers made by `factory`.
    pub fn new(
        store: Store,
        factory: ProviderFactory,
        image_builder: Arc<dyn ImageBuilder>,
        settings: BuilderSettings,
    ) -> Self {
        Builder {
            store,
            factory,
            image_builder,
            settings,
            status: Arc::new(BuilderStatus::default()),
            metrics: Arc::new(Metrics::in_memory()),
        }
    }

    /// Uses this metrics sink (statsd and `/metrics`).
    pub fn with_metrics(mut self, metrics: Arc<Metrics>) -> Self {
        self.metrics = metrics;
        self
    }

    /// The metrics sink.
    pub fn metrics(&self) -> Arc<Metrics> {
        self.metrics.clone()
    }

    /// The status, readable while it runs.
    pub fn status(&self) -> Arc<BuilderStatus> {
        self.status.clone()
    }

    /// Runs until `shutdown` is cancelled. A new value on `config` is a
    /// reload: providers whose configuration changed are rebuilt and the
    /// next pass plans with it. The builder id is read (or created) in the
    /// initial configuration's `images-dir`.
    pub async fn run(
        self,
        mut config: watch::Receiver<Arc<Config>>,
        shutdown: CancellationToken,
    ) -> Result<(), BuilderError> {
        let initial = config.borrow_and_update().clone();
        let images_dir = initial
            .images_dir
            .clone()
            .ok_or(BuilderError::NoImagesDir)?;
        let builder_id = {
            let dir = images_dir.clone();
            tokio::task::spawn_blocking(move || local::builder_id(&dir))
                .await
                .map_err(|e| std::io::Error::other(e.to_string()))??
        };
        *self
            .status
            .builder_id
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = builder_id.clone();
        tracing::info!(builder_id = %builder_id, images_dir = %images_dir.display(), "builder starting");
        let shared = Arc::new(Shared {
            store: self.store.clone(),
            metrics: self.metrics.clone(),
            settings: self.settings.clone(),
            image_builder: self.image_builder.clone(),
            builder_id,
            wake: Notify::new(),
            running: Mutex::default(),
            running_builds: Mutex::default(),
            cooldown: Mutex::default(),
            work: CancellationToken::new(),
            listings: Mutex::default(),
            listing: Mutex::default(),
        });
        let mut rt = Runtime {
            shared: shared.clone(),
            factory: self.factory.clone(),
            config: initial,
            providers: BTreeMap::new(),
            registration: None,
            session_id: 0,
            tasks: TaskTracker::new(),
            status: self.status.clone(),
            pass_count: 0,
            last_notes: BTreeSet::new(),
            stats_next: None,
            leak_suspects: BTreeSet::new(),
            listing_due: BTreeMap::new(),
        };
        rt.apply_config();
        let wakeups = Wakeups {
            max_interval: self.settings.max_pass_interval,
            min_interval: self.settings.min_pass_interval,
            store: Some(self.store.backend()),
            relevant: image_path,
            wake: Some(&shared.wake),
        };
        let Ok(()) = run_passes(
            &mut rt,
            wakeups,
            &mut config,
            &shutdown,
            &self.status.passes,
        )
        .await;
        rt.shutdown().await;
        Ok(())
    }
}

/// Only image records concern the builder.
fn image_path(path: &str) -> bool {
    path.starts_with(paths::IMAGES)
}

struct Runtime {
    shared: Arc<Shared>,
    factory: ProviderFactory,
    config: Arc<Config>,
    providers: BTreeMap<String, ProviderEntry>,
    registration: Option<ComponentRegistration>,
    session_id: i64,
    tasks: TaskTracker,
    status: Arc<BuilderStatus>,
    pass_count: u64,
    /// Notes logged at the last pass (each is logged when it first appears).
    last_notes: BTreeSet<String>,
    /// When the gauges are due next (`None`: at once).
    stats_next: Option<tokio::time::Instant>,
    /// Cloud images found leaked by the last leak check (the planner's).
    leak_suspects: BTreeSet<(String, String)>,
    /// When each provider's next cloud image listing is due.
    listing_due: BTreeMap<String, tokio::time::Instant>,
}

impl Runtime {
    /// Builds providers for new or changed provider configurations.
    fn apply_config(&mut self) {
        let mut next = BTreeMap::new();
        for pc in &self.config.providers {
            match self.providers.remove(&pc.name) {
                Some(e) if e.config == *pc => {
                    next.insert(pc.name.clone(), e);
                }
                _ => match (self.factory)(pc) {
                    Ok(p) => {
                        next.insert(
                            pc.name.clone(),
                            ProviderEntry {
                                config: pc.clone(),
                                provider: p,
                            },
                        );
                    }
                    Err(e) => {
                        tracing::error!(provider = %pc.name, error = %e, "cannot set up provider")
                    }
                },
            }
        }
        self.providers = next;
    }

    /// Registers the builder component: at start and after a session was
    /// replaced (its ephemeral record went with the old session).
    async fn ensure_registered(&mut self) -> Result<(), StoreError> {
        let store = self.shared.store.clone();
        let current = *store.backend().session().borrow();
        let Some(id) = current.id() else {
            return Ok(());
        };
        if id != self.session_id {
            if self.session_id != 0 {
                tracing::warn!("store session replaced; registering the builder again");
            }
            self.registration = None;
            self.session_id = id;
        }
        if self.registration.is_none() {
            let mut c = Component::new(
                ComponentKind::Builder,
                &self.shared.settings.hostname,
                &self.shared.settings.version,
            );
            c.state = ComponentState::Running;
            self.registration = Some(store.register_component(&c).await?);
        }
        Ok(())
    }

    async fn snapshot(&self) -> Result<ImageSnapshot, StoreError> {
        // Files first: a build's record is created before its files, so
        // every file listed here has its record in the store read below.
        let local_files = match &self.config.images_dir {
            Some(dir) => {
                let dir = dir.clone();
                match tokio::task::spawn_blocking(move || local::scan(&dir)).await {
                    Ok(Ok(f)) => f,
                    Ok(Err(e)) => {
                        tracing::warn!(error = %e, "cannot list the images directory");
                        BTreeMap::new()
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "image directory scan failed");
                        BTreeMap::new()
                    }
                }
            }
            None => BTreeMap::new(),
        };
        // Listings before the store too: an upload's record exists before
        // its cloud image, so an image listed here that has no record in
        // the store read below has leaked (or its record is being
        // deleted, which the second sighting rules out).
        let cloud_images = std::mem::take(
            &mut *self
                .shared
                .listings
                .lock()
                .unwrap_or_else(|p| p.into_inner()),
        );
        let images = self.shared.store.image_state().await?;
        Ok(ImageSnapshot {
            images,
            local_files,
            cloud_images,
        })
    }

    /// Starts the cloud image listings that are due, each in its own task
    /// so a slow or hung cloud never holds up a pass; a finished listing
    /// wakes the loop and is planned with at the next pass.
    fn start_listings(&mut self) {
        let now = tokio::time::Instant::now();
        let interval = self.shared.settings.leak_check_interval;
        self.listing_due
            .retain(|p, _| self.providers.contains_key(p));
        for (name, entry) in &self.providers {
            if self.listing_due.get(name).is_some_and(|d| *d > now) {
                continue;
            }
            if !self
                .shared
                .listing
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(name.clone())
            {
                continue;
            }
            self.listing_due.insert(name.clone(), now + interval);
            let shared = self.shared.clone();
            let (name, provider) = (name.clone(), entry.provider.clone());
            let limit = provider.api_timeout();
            self.tasks.spawn(async move {
                let listed = tokio::select! {
                    r = tokio::time::timeout(limit, provider.list_images()) => r,
                    _ = shared.work.cancelled() => return,
                };
                match listed {
                    Ok(Ok(images)) => {
                        shared
                            .listings
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .insert(name.clone(), images);
                    }
                    Ok(Err(e)) => {
                        tracing::warn!(provider = %name, error = %e, "cannot list cloud images for the leak check")
                    }
                    Err(_) => {
                        tracing::warn!(provider = %name, "listing cloud images for the leak check timed out")
                    }
                }
                shared
                    .listing
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&name);
                shared.wake.notify_one();
            });
        }
    }

    fn local(&self) -> BuilderLocal {
        BuilderLocal {
            builder_id: self.shared.builder_id.clone(),
            running_builds: self
                .shared
                .running_builds
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
            leak_suspects: self.leak_suspects.clone(),
        }
    }

    /// Plans from a fresh snapshot and starts what the plan asks for.
    async fn plan_and_execute(&mut self) -> Result<Passed, StoreError> {
        if self
            .shared
            .store
            .backend()
            .session()
            .borrow()
            .id()
            .is_none()
        {
            // Suspended or expired: do nothing that needs locks.
            return Ok(Passed::Skipped);
        }
        self.start_listings();
        let snapshot = self.snapshot().await?;
        let local = self.local();
        let plan = plan_images(&snapshot, &self.config, self.shared.now(), &local);
        self.leak_suspects = plan.leak_suspects.clone();
        let notes: BTreeSet<String> = plan.notes.iter().cloned().collect();
        for n in notes.difference(&self.last_notes) {
            tracing::warn!("{n}");
        }
        self.last_notes = notes;
        self.execute(&plan).await;
        let now = tokio::time::Instant::now();
        if self.stats_next.is_none_or(|t| now >= t) {
            self.stats_next = Some(now + self.shared.settings.stats_interval);
            self.report_stats(&snapshot);
        }
        self.pass_count += 1;
        self.status
            .ready
            .store(true, std::sync::atomic::Ordering::SeqCst);
        self.update_report(&plan);
        Ok(Passed::Completed)
    }

    /// Starts the plan's actions that are not running yet, within the
    /// worker limits.
    async fn execute(&mut self, plan: &ImagePlan) {
        let s = &self.shared.settings;
        for action in &plan.actions {
            let key = action.key();
            if self
                .shared
                .running
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .contains_key(&key)
                || self.shared.cooling(&key)
            {
                continue;
            }
            let kind = match action {
                ImageAction::Build { .. } | ImageAction::Snapshot { .. } => Kind::Build,
                ImageAction::Upload { .. } => Kind::Upload,
                ImageAction::ClearUploadRequest {
                    image,
                    provider,
                    reason,
                } => {
                    tracing::info!(image = %image, provider = %provider, "removing upload request: {reason}");
                    if let Err(e) = self
                        .shared
                        .store
                        .clear_image_upload_request(image, provider)
                        .await
                    {
                        tracing::warn!(image = %image, provider = %provider, error = %e, "cannot remove upload request");
                    }
                    continue;
                }
                _ => Kind::Cleanup,
            };
            let limit = match kind {
                Kind::Build => s.build_workers,
                Kind::Upload => s.upload_workers,
                Kind::Cleanup => s.cleanup_workers,
            };
            if self.shared.count(kind) >= limit.max(1) {
                continue;
            }
            let provider = match action {
                ImageAction::Upload { provider, .. }
                | ImageAction::Snapshot { provider, .. }
                | ImageAction::DeleteUpload { provider, .. }
                | ImageAction::RemoveDeadUpload { provider, .. }
                | ImageAction::DeleteLeakedImage { provider, .. } => {
                    match self.providers.get(provider) {
                        Some(p) => Some(p.clone()),
                        None => {
                            tracing::debug!(provider = %provider, "provider not set up; skipping {key}");
                            continue;
                        }
                    }
                }
                _ => None,
            };
            self.shared
                .running
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(key.clone(), kind);
            let slot = TaskSlot {
                shared: self.shared.clone(),
                key,
            };
            let task = tasks::Task {
                shared: self.shared.clone(),
                config: self.config.clone(),
                provider,
                action: action.clone(),
            };
            self.tasks.spawn(async move {
                let ok = task.run().await;
                slot.shared.finished(&slot.key, ok);
                drop(slot);
            });
        }
    }

    /// The builder's gauges (Python's cleanup worker sends them): build
    /// requests, and what this builder does with each image and upload
    /// (0 idle, 1 building, 2 uploading, 3 paused), plus its tasks.
    fn report_stats(&self, snapshot: &ImageSnapshot) {
        let m = &self.shared.metrics;
        let host = sanitize_component(&self.shared.settings.hostname);
        let running: Vec<String> = self
            .shared
            .running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .keys()
            .cloned()
            .collect();
        let building: BTreeSet<&str> = running
            .iter()
            .filter_map(|k| k.strip_prefix("build "))
            .collect();
        // "upload <image>/<build>/<provider>"
        let uploading: BTreeSet<(&str, &str)> = running
            .iter()
            .filter_map(|k| k.strip_prefix("upload "))
            .filter_map(|k| {
                let mut parts = k.split('/');
                let image = parts.next()?;
                let provider = parts.nth(1)?;
                Some((image, provider))
            })
            .collect();
        let requests = &snapshot.images.build_requests;
        let mut waiting = 0;
        for di in &self.config.diskimages {
            let name = di.name.as_str();
            let requested = requests.contains_key(name);
            waiting += usize::from(requested);
            m.gauge_as(
                &format!("nodepool.image.{name}.image_build_requests"),
                &families::IMAGE_BUILD_REQUESTS,
                &[("image", name)],
                if requested { 1.0 } else { 0.0 },
            );
            let state = if di.pause || snapshot.images.paused.contains(name) {
                3.0
            } else if building.contains(name) {
                1.0
            } else {
                0.0
            };
            m.gauge_as(
                &format!("nodepool.builder.{host}.image.{name}.build.state"),
                &families::BUILDER_BUILD_STATE,
                &[("image", name)],
                state,
            );
            for pc in &self.config.providers {
                if pc.diskimage(name).is_none() {
                    continue;
                }
                let p = pc.name.as_str();
                m.gauge_as(
                    &format!("nodepool.builder.{host}.image.{name}.provider.{p}.upload.state"),
                    &families::BUILDER_UPLOAD_STATE,
                    &[("image", name), ("provider", p)],
                    if uploading.contains(&(name, p)) {
                        2.0
                    } else {
                        0.0
                    },
                );
            }
        }
        // Prometheus sums the per-image series; a total series in the
        // same family would be counted twice.
        m.gauge_statsd_only("nodepool.image_build_requests", waiting as f64);
        let s = &self.shared.settings;
        for (what, n) in [
            ("current_builds", self.shared.count(Kind::Build)),
            ("current_uploads", self.shared.count(Kind::Upload)),
            ("build_workers", s.build_workers),
            ("upload_workers", s.upload_workers),
        ] {
            m.gauge_as(
                &format!("nodepool.builder.{host}.{what}"),
                &families::BUILDER_WORKERS,
                &[("kind", what)],
                n as f64,
            );
        }
    }

    fn update_report(&self, plan: &ImagePlan) {
        use std::fmt::Write as _;
        let mut r = String::new();
        let _ = writeln!(
            r,
            "builder {} id={} (pass {})",
            self.shared.settings.hostname, self.shared.builder_id, self.pass_count
        );
        let mut running: Vec<String> = self
            .shared
            .running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .keys()
            .cloned()
            .collect();
        running.sort();
        for k in running {
            let _ = writeln!(r, "  running: {k}");
        }
        let _ = writeln!(r, "  planned actions: {}", plan.actions.len());
        for n in &plan.notes {
            let _ = writeln!(r, "  note: {n}");
        }
        for name in self.providers.keys() {
            let _ = writeln!(r, "  provider {name}");
        }
        *self.status.report.lock().unwrap_or_else(|p| p.into_inner()) = r;
    }

    /// Cancels running builds and uploads, lets them record how they
    /// ended within the grace, and unregisters.
    async fn shutdown(mut self) {
        tracing::info!("builder stopping");
        self.shared.work.cancel();
        self.tasks.close();
        if tokio::time::timeout(self.shared.settings.shutdown_grace, self.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                "work did not finish within the shutdown grace; another builder's cleanup will finish it"
            );
        }
        if let Some(reg) = self.registration.take() {
            let _ = self.shared.store.unregister_component(&reg).await;
        }
        tracing::info!("builder stopped");
    }
}

impl PassRunner for Runtime {
    type Fatal = std::convert::Infallible;

    async fn pass(&mut self) -> Result<Passed, Self::Fatal> {
        if let Err(e) = self.ensure_registered().await {
            tracing::warn!(error = %e, "builder registration failed; retrying");
        }
        Ok(self.plan_and_execute().await.unwrap_or_else(|e| {
            tracing::warn!(error = %e, "builder pass failed; retrying");
            Passed::Skipped
        }))
    }

    async fn reload(&mut self, config: Arc<Config>) {
        self.config = config;
        tracing::info!("configuration reloaded");
        self.apply_config();
    }
}
