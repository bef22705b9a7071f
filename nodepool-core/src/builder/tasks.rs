//! The builder's tasks: one per planned action. Each takes the lock the
//! reference names (non-blocking: someone else holding it means someone
//! else is doing it), re-reads the records under it, and only then acts.

use std::path::Path;
use std::time::{Duration, Instant};

use indexmap::IndexMap;

use super::{ProviderEntry, Shared, hook, local, validate};
use crate::config::{Config, DiskImage, SnapshotImage};
use crate::image_builder::{BuildError, BuildPhase, BuildSpec};
use crate::launcher::metrics::families;
use crate::model::{
    BUILD_PROGRESS_KEY, BuildProgressRecord, BuildState, ImageBuild, ImageUpload, Json,
    UploadProgressRecord, UploadState,
};
use crate::planner::LaunchImage;
use crate::planner::images::{BuildReason, ImageAction, ImageDeleteReason};
use crate::planner::leaks::validation_tag;
use crate::provider::ProviderError;
use crate::provider::{
    IMAGE_BUILD_ID, IMAGE_PROVIDER, IMAGE_UPLOAD_ID, ImageUploadSpec, SnapshotSpec,
};
use crate::store::paths::{self, ImagePath, classify_image_path};
use crate::store::{
    Decision, Held, LockGuard, LockOf, LockWait, RecordKey, Store, StoreError, Versioned,
};

/// Lines and bytes of a failed build's log kept in its record.
const LOG_TAIL_LINES: usize = 20;
const LOG_TAIL_BYTES: usize = 4096;

/// Key of the failed build's log tail in its record. Python Nodepool
/// ignores keys it does not know when reading.
pub(crate) const LOG_TAIL_KEY: &str = crate::model::BUILD_LOG_TAIL_KEY;

/// Extra time given to a provider past `image-upload-timeout` before the
/// builder gives up on it (providers enforce the timeout themselves; this
/// bounds one that does not).
const UPLOAD_TIMEOUT_MARGIN: Duration = Duration::from_secs(60);

/// Least time between two progress writes to one build or upload record:
/// a build prints thousands of lines and a cloud takes bytes fast, but a
/// person watching needs a fresh view only every few seconds.
const PROGRESS_WRITE_INTERVAL: Duration = Duration::from_secs(2);

type TaskResult = Result<(), TaskError>;

/// Why a builder task did not finish; the runtime logs it and backs off
/// before trying the action again.
#[derive(Debug, thiserror::Error)]
pub(crate) enum TaskError {
    /// The store refused or failed.
    #[error("{what}: {source}")]
    Store {
        /// What was being done.
        what: String,
        /// The store's error.
        source: StoreError,
    },
    /// The cloud refused or failed.
    #[error("{what}: {source}")]
    Cloud {
        /// What was being done.
        what: String,
        /// The provider's error.
        source: ProviderError,
    },
    /// The cloud did not answer in time.
    #[error("{0} timed out")]
    Timeout(String),
    /// Something this builder needs is not configured.
    #[error("{0}")]
    NotConfigured(&'static str),
    /// The image files could not be read or deleted.
    #[error("{0}")]
    Files(String),
    /// An image file to upload is missing.
    #[error("{} is missing: cannot upload build {build} to {provider}", path.display())]
    MissingFile {
        /// The file.
        path: std::path::PathBuf,
        /// Its build.
        build: String,
        /// Where it was to go.
        provider: String,
    },
    /// The store session (and the lock with it) was lost during long work,
    /// whose result was discarded.
    #[error("the store session was lost during {0}; discarded it")]
    SessionLost(String),
    /// An upload failed (and was recorded failed).
    #[error("upload {upload} of build {build} to {provider} failed: {source}")]
    Upload {
        /// The upload.
        upload: String,
        /// Its build.
        build: String,
        /// Where it was to go.
        provider: String,
        /// Why (boxed: a hook's output makes it large).
        source: Box<UploadError>,
    },
}

impl From<StoreError> for TaskError {
    fn from(source: StoreError) -> Self {
        TaskError::Store {
            what: "store".into(),
            source,
        }
    }
}

/// Why an upload to a cloud failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum UploadError {
    /// The cloud refused or failed.
    #[error("{0}")]
    Cloud(#[from] ProviderError),
    /// The provider gave no result in time.
    #[error("no result within image-upload-timeout ({0} s)")]
    Timeout(u64),
    /// The builder was stopped meanwhile.
    #[error("the builder is stopping")]
    Stopping,
    /// The post-upload hook refused the image (and it was deleted).
    #[error("{0}")]
    Hook(#[from] hook::HookError),
    /// The boot test (`validate`) failed (and the image was deleted).
    #[error("validation failed: {0}")]
    Validation(String),
}

fn store_err(what: &str) -> impl Fn(StoreError) -> TaskError + '_ {
    move |source| TaskError::Store {
        what: what.to_owned(),
        source,
    }
}

/// One planned action, with what it needs.
pub(crate) struct Task {
    pub shared: std::sync::Arc<Shared>,
    pub config: std::sync::Arc<Config>,
    pub provider: Option<ProviderEntry>,
    pub action: ImageAction,
}

/// Changes a build's state under `lock` if it is in one of `from`;
/// returns the build as it was when changed, `None` when it was not
/// (missing, in another state, or the lock held by someone else).
async fn transition_build(
    store: &Store,
    lock: &str,
    image: &str,
    build: &str,
    from: &[BuildState],
    to: (BuildState, f64),
) -> Result<Option<ImageBuild>, TaskError> {
    let changed = store
        .with_locked(
            LockOf::Dir(lock),
            LockWait::NonBlocking,
            &RecordKey::build(image, build),
            |cur| match cur {
                Some(v) if from.contains(&v.value.state) => {
                    let before = v.value.clone();
                    let mut b = v.value;
                    b.set_state(to.0, to.1);
                    Decision::Write(b, Some(before))
                }
                _ => Decision::Leave(None),
            },
        )
        .await;
    match changed {
        Ok(c) => Ok(c),
        Err(StoreError::Locked { .. }) => Ok(None),
        Err(source) => Err(TaskError::Store {
            what: format!("cannot mark build {build} {}", to.0.as_str()),
            source,
        }),
    }
}

/// Every build of an image, read from the store (not the scan cache).
async fn read_builds(
    store: &Store,
    image: &str,
) -> Result<Vec<(String, Versioned<ImageBuild>)>, StoreError> {
    let names = match store.backend().children(&paths::builds(image)).await {
        Ok(n) => n,
        Err(e) if e.is_not_found() => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut out = Vec::new();
    for n in names.into_iter().filter(|n| n != paths::LOCK) {
        match store.get_build(image, &n).await {
            Ok(Some(b)) => out.push((n, b)),
            Ok(None) => {}
            Err(StoreError::Malformed { path, reason }) => {
                tracing::warn!(path = %path, reason = %reason, "skipping malformed build record")
            }
            Err(e) => return Err(e),
        }
    }
    Ok(out)
}

/// The id of the newest ready build among `builds`.
fn newest_ready_id(builds: &[(String, Versioned<ImageBuild>)]) -> Option<&str> {
    builds
        .iter()
        .filter(|(_, b)| b.value.state == BuildState::Ready)
        .max_by(|a, b| {
            a.1.value
                .state_time
                .total_cmp(&b.1.value.state_time)
                .then_with(|| a.0.cmp(&b.0))
        })
        .map(|(id, _)| id.as_str())
}

/// Every upload of a build to a provider, read from the store.
async fn read_uploads(
    store: &Store,
    image: &str,
    build: &str,
    provider: &str,
) -> Result<Vec<(String, ImageUpload)>, StoreError> {
    let names = match store
        .backend()
        .children(&paths::uploads(image, build, provider))
        .await
    {
        Ok(n) => n,
        Err(e) if e.is_not_found() => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut out = Vec::new();
    for n in names.into_iter().filter(|n| n != paths::LOCK) {
        if let Ok(Some(u)) = store.get_upload(image, build, provider, &n).await {
            out.push((n, u.value));
        }
    }
    Ok(out)
}

/// Whether any upload record is left under a build.
async fn build_has_uploads(store: &Store, image: &str, build: &str) -> Result<bool, StoreError> {
    let entries = store.backend().scan(&paths::build(image, build)).await?;
    Ok(entries
        .iter()
        .any(|e| matches!(classify_image_path(&e.path), ImagePath::Upload(..))))
}

fn tail(text: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    let mut out = lines[lines.len().saturating_sub(LOG_TAIL_LINES)..].join("\n");
    if out.len() > LOG_TAIL_BYTES {
        let mut cut = out.len() - LOG_TAIL_BYTES;
        while !out.is_char_boundary(cut) {
            cut += 1;
        }
        out = out[cut..].to_owned();
    }
    out
}

impl Task {
    /// Runs the action; `false` when it failed (the runtime backs off
    /// before trying it again).
    pub async fn run(self) -> bool {
        let key = self.action.key();
        let r = match &self.action {
            ImageAction::Build {
                image,
                formats,
                reason,
                newest_ready,
                requested,
            } => {
                self.build(image, formats, reason, newest_ready.as_deref(), *requested)
                    .await
            }
            ImageAction::Snapshot {
                image,
                base,
                reason,
                newest_ready,
                requested,
                ..
            } => {
                self.snapshot(image, base, reason, newest_ready.as_deref(), *requested)
                    .await
            }
            ImageAction::Upload {
                image,
                build,
                provider,
                format,
                requested,
            } => {
                self.upload(image, build, provider, format, *requested)
                    .await
            }
            ImageAction::DeleteUpload {
                image,
                build,
                provider,
                upload,
                reason,
            } => {
                self.delete_upload(image, build, provider, upload, *reason)
                    .await
            }
            ImageAction::RemoveDeadUpload {
                image,
                build,
                provider,
                upload,
            } => {
                self.remove_dead_upload(image, build, provider, upload)
                    .await
            }
            ImageAction::MarkDeadBuild { image, build } => self.mark_dead_build(image, build).await,
            ImageAction::MarkBuildDeleting {
                image,
                build,
                reason,
            } => self.mark_build_deleting(image, build, *reason).await,
            ImageAction::RemoveBuild {
                image,
                build,
                reason,
            } => self.remove_build(image, build, *reason).await,
            ImageAction::DeleteLocalFiles {
                image,
                build,
                formats,
                reason,
            } => {
                self.delete_local_files(image, build, formats.clone(), *reason)
                    .await
            }
            ImageAction::ClearUploadRequest { .. } => Ok(()),
            ImageAction::DeleteLeakedImage { external_id, .. } => {
                self.delete_leaked_image(external_id).await
            }
        };
        match r {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(task = %key, "{e}");
                false
            }
        }
    }

    fn images_dir(&self) -> Result<&Path, TaskError> {
        self.config
            .images_dir
            .as_deref()
            .ok_or(TaskError::NotConfigured("no images-dir configured"))
    }

    async fn delete_files(
        &self,
        image: &str,
        build: &str,
        formats: Option<Vec<String>>,
    ) -> TaskResult {
        let dir = self.images_dir()?.to_path_buf();
        let (i, b) = (image.to_owned(), build.to_owned());
        let deleted = tokio::task::spawn_blocking(move || {
            local::delete_build_files(&dir, &i, &b, formats.as_deref())
        })
        .await
        .map_err(|e| TaskError::Files(format!("file deletion task failed: {e}")))?
        .map_err(|e| TaskError::Files(e.to_string()))?;
        if !deleted.is_empty() {
            tracing::info!(image = %image, build = %build, files = deleted.len(), "deleted local image files");
        }
        Ok(())
    }

    // ----- builds ------------------------------------------------------

    async fn build(
        &self,
        image: &str,
        formats: &[String],
        reason: &BuildReason,
        newest_ready: Option<&str>,
        requested: bool,
    ) -> TaskResult {
        let Some(di) = self.config.diskimage(image).cloned() else {
            return Ok(());
        };
        let lock = paths::builds_lock(image);
        let built = self
            .shared
            .store
            .try_holding(
                LockOf::Dir(&lock),
                async |guard: &LockGuard| -> Result<Held<()>, TaskError> {
                    self.build_locked(guard, &di, formats, reason, newest_ready, requested)
                        .await
                        .map(Held::Kept)
                },
            )
            .await?;
        if built.is_none() {
            tracing::debug!(image = %image, "another builder is building it");
        }
        Ok(())
    }

    async fn build_locked(
        &self,
        guard: &LockGuard,
        di: &DiskImage,
        formats: &[String],
        reason: &BuildReason,
        newest_ready: Option<&str>,
        requested: bool,
    ) -> TaskResult {
        let image = di.name.as_str();
        let store = &self.shared.store;
        let images_dir = self.images_dir()?.to_path_buf();
        let rec = ImageBuild::new(self.shared.now(), formats.to_vec());
        let Some((id, _running)) = self
            .begin_build(image, newest_ready, requested, rec)
            .await?
        else {
            return Ok(());
        };
        if let Some(prune) = &self.shared.settings.log_pruner {
            let (prune, dir, img, keep) = (
                prune.clone(),
                self.config.build_log_dir.clone(),
                image.to_owned(),
                self.config.build_log_retention,
            );
            match tokio::task::spawn_blocking(move || prune(&dir, &img, keep)).await {
                Ok(Err(e)) => tracing::warn!(image = %image, error = %e, "cannot prune build logs"),
                Err(e) => tracing::warn!(image = %image, error = %e, "log pruning failed"),
                Ok(Ok(_)) => {}
            }
        }
        let spec = BuildSpec {
            image: di.clone(),
            build_id: id.clone(),
            formats: formats.to_vec(),
            output_base: local::output_base(&images_dir, image, &id),
            log_path: local::log_path(&self.config.build_log_dir, image, &id),
            elements_dir: self.config.elements_dir.clone(),
            timeout: di.build_timeout,
            progress: Default::default(),
        };
        tracing::info!(image = %image, build = %id, %reason, formats = %formats.join(","), log = %spec.log_path.display(), "building image");
        let started = Instant::now();
        let result = {
            let build = self
                .shared
                .image_builder
                .build(&spec, self.shared.work.child_token());
            let publish = self.publish_build_progress(image, &id, spec.progress.subscribe());
            tokio::select! {
                r = build => r,
                never = publish => match never {},
            }
        };
        let now = self.shared.now();
        self.report_build(image, started.elapsed(), &result, now);
        // A suspended session is waited for: a ZooKeeper blip at the end
        // of a long build must not throw the build away.
        if !guard.wait_held().await {
            // The session (and with it the lock) was lost: another builder
            // may already have taken the record for a dead builder's.
            tracing::error!(image = %image, build = %id, "the store session was lost during the build; discarding it");
            if let Ok(Some(mut v)) = store.get_build(image, &id).await
                && v.value.state == BuildState::Building
            {
                v.value.set_state(BuildState::Failed, now);
                let _ = store
                    .update_build(image, &id, &v.value, Some(v.version))
                    .await;
            }
            return self.delete_files(image, &id, None).await;
        }
        let Some(Versioned { mut value, version }) = store
            .get_build(image, &id)
            .await
            .map_err(store_err("cannot read the build record"))?
        else {
            tracing::error!(image = %image, build = %id, "the build record vanished during the build; discarding it");
            return self.delete_files(image, &id, None).await;
        };
        match result {
            Ok(artifacts) => {
                let mut got: Vec<String> = artifacts
                    .artifacts
                    .iter()
                    .map(|a| a.format.clone())
                    .collect();
                got.sort();
                got.dedup();
                value.formats = got;
                value.username = Some(di.username.clone());
                value.python_path = Some(di.python_path.clone());
                value.shell_type = di.shell_type.clone();
                value.extra.shift_remove(BUILD_PROGRESS_KEY);
                value.set_state(BuildState::Ready, now);
                let key = RecordKey::build(image, &id);
                if let Err(e) = store.write_locked(guard, &key, &value, Some(version)).await {
                    // Without a ready record nobody will use the files.
                    self.delete_files(image, &id, None).await?;
                    return Err(TaskError::Store {
                        what: format!("cannot record build {id} ready"),
                        source: e,
                    });
                }
                tracing::info!(
                    image = %image,
                    build = %id,
                    elapsed_s = started.elapsed().as_secs(),
                    files = ?artifacts.artifacts.iter().map(|a| (&a.format, a.size)).collect::<Vec<_>>(),
                    "build ready"
                );
                if requested && let Err(e) = store.clear_image_build_request(image).await {
                    tracing::warn!(image = %image, error = %e, "cannot remove the build request");
                }
                Ok(())
            }
            Err(e) => {
                let why = match &e {
                    BuildError::Failed { log_tail, .. } => {
                        format!("{e}\n{}", tail(log_tail))
                    }
                    other => other.to_string(),
                };
                value.set_state(BuildState::Failed, now);
                value
                    .extra
                    .insert(LOG_TAIL_KEY.to_owned(), Json::encode(&tail(&why)));
                let written = store
                    .write_locked(guard, &RecordKey::build(image, &id), &value, Some(version))
                    .await;
                if matches!(e, BuildError::Cancelled) {
                    tracing::info!(image = %image, build = %id, "build cancelled; recorded failed");
                } else {
                    tracing::warn!(image = %image, build = %id, log = %spec.log_path.display(), "build failed: {why}");
                }
                self.delete_files(image, &id, None).await?;
                written
                    .map(|_| ())
                    .map_err(store_err("cannot record the failed build"))
            }
        }
    }

    /// Under `image`'s build lock, re-checks that the planned build is
    /// still wanted and records `rec` as this builder's new `building`
    /// build; returns its id and the mark that it runs here, or `None`
    /// when it is not wanted any more (or the builder is stopping).
    async fn begin_build(
        &self,
        image: &str,
        newest_ready: Option<&str>,
        requested: bool,
        mut rec: ImageBuild,
    ) -> Result<Option<(String, RunningBuild)>, TaskError> {
        let store = &self.shared.store;
        // Another builder may have just built it.
        let builds = read_builds(store, image)
            .await
            .map_err(store_err("cannot read builds"))?;
        if newest_ready_id(&builds) != newest_ready {
            tracing::info!(image = %image, "its newest ready build changed meanwhile; not building");
            return Ok(None);
        }
        // A pass that read the state between the last build becoming ready
        // and its request being removed (both under this lock) plans the
        // request again: it is gone now.
        if requested
            && store
                .backend()
                .get(&paths::image_build_request(image))
                .await
                .map_err(store_err("cannot read the build request"))?
                .is_none()
        {
            return Ok(None);
        }
        if self.shared.work.is_cancelled() {
            return Ok(None);
        }
        let id = uuid::Uuid::new_v4().simple().to_string();
        // Ours before the record exists: no pass may take the record or
        // its files for a dead builder's.
        let running = RunningBuild::new(&self.shared, (image.to_owned(), id.clone()));
        rec.builder = Some(self.shared.settings.hostname.clone());
        rec.builder_id = Some(self.shared.builder_id.clone());
        store
            .create_build(image, &id, &rec)
            .await
            .map_err(store_err("cannot create the build record"))?;
        Ok(Some((id, running)))
    }

    // ----- snapshot images ---------------------------------------------

    /// Makes a snapshot image (see [`ImageAction::Snapshot`]) under the
    /// image's build lock, as a build of it with one upload.
    async fn snapshot(
        &self,
        image: &str,
        base: &LaunchImage,
        reason: &BuildReason,
        newest_ready: Option<&str>,
        requested: bool,
    ) -> TaskResult {
        let entry = self.entry()?;
        let Some(si) = entry.config.snapshot_image(image).cloned() else {
            return Ok(());
        };
        let lock = paths::builds_lock(image);
        let made = self
            .shared
            .store
            .try_holding(
                LockOf::Dir(&lock),
                async |guard: &LockGuard| -> Result<Held<()>, TaskError> {
                    self.snapshot_locked(guard, entry, &si, base, reason, newest_ready, requested)
                        .await
                        .map(Held::Kept)
                },
            )
            .await?;
        if made.is_none() {
            tracing::debug!(image = %image, "another builder is making it");
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    async fn snapshot_locked(
        &self,
        guard: &LockGuard,
        entry: &ProviderEntry,
        si: &SnapshotImage,
        base: &LaunchImage,
        reason: &BuildReason,
        newest_ready: Option<&str>,
        requested: bool,
    ) -> TaskResult {
        let image = si.name.as_str();
        let provider = entry.config.name.as_str();
        let store = &self.shared.store;
        // No formats: a snapshot has no local files to upload.
        let mut rec = ImageBuild::new(self.shared.now(), Vec::new());
        rec.username = Some(si.username.clone());
        let Some((id, _running)) = self
            .begin_build(image, newest_ready, requested, rec)
            .await?
        else {
            return Ok(());
        };
        tracing::info!(image = %image, build = %id, provider = %provider, %reason, "making a snapshot image");
        let started = Instant::now();
        let lock = paths::uploads_lock(image, &id, provider);
        let outcome = store
            .try_holding(
                LockOf::Dir(&lock),
                async |up: &LockGuard| -> Result<Held<Result<(), String>>, TaskError> {
                    self.snapshot_upload(up, entry, si, &id, base)
                        .await
                        .map(Held::Kept)
                },
            )
            .await;
        let outcome = match outcome {
            Ok(Some(r)) => r,
            Ok(None) => Err("its upload lock was taken".to_owned()),
            Err(e) => Err(e.to_string()),
        };
        let now = self.shared.now();
        if !guard.wait_held().await {
            return Err(TaskError::SessionLost(format!("snapshot {id} of {image}")));
        }
        let Some(Versioned { mut value, version }) = store
            .get_build(image, &id)
            .await
            .map_err(store_err("cannot read the build record"))?
        else {
            tracing::error!(image = %image, build = %id, "the build record vanished during the snapshot");
            return Ok(());
        };
        let key = RecordKey::build(image, &id);
        match outcome {
            Ok(()) => {
                value.set_state(BuildState::Ready, now);
                store
                    .write_locked(guard, &key, &value, Some(version))
                    .await
                    .map_err(store_err(&format!("cannot record build {id} ready")))?;
                tracing::info!(image = %image, build = %id, provider = %provider, elapsed_s = started.elapsed().as_secs(), "snapshot image ready");
                if requested && let Err(e) = store.clear_image_build_request(image).await {
                    tracing::warn!(image = %image, error = %e, "cannot remove the build request");
                }
                Ok(())
            }
            Err(why) => {
                tracing::warn!(image = %image, build = %id, provider = %provider, "snapshot failed: {why}");
                value.set_state(BuildState::Failed, now);
                value
                    .extra
                    .insert(LOG_TAIL_KEY.to_owned(), Json::encode(&tail(&why)));
                store
                    .write_locked(guard, &key, &value, Some(version))
                    .await
                    .map_err(store_err("cannot record the failed snapshot"))?;
                Ok(())
            }
        }
    }

    /// The upload of a snapshot build, under its upload lock: boots the
    /// setup server, runs `setup`, snapshots it and deletes it, validates
    /// the snapshot, and records the upload ready or failed. `Ok(Err)` is
    /// a snapshot that failed (recorded so); `Err` a store failure.
    async fn snapshot_upload(
        &self,
        guard: &LockGuard,
        entry: &ProviderEntry,
        si: &SnapshotImage,
        build: &str,
        base: &LaunchImage,
    ) -> Result<Result<(), String>, TaskError> {
        let image = si.name.as_str();
        let pc = &entry.config;
        let provider = pc.name.as_str();
        let store = &self.shared.store;
        let now = self.shared.now();
        let mut rec = ImageUpload::new(now, None);
        rec.username = Some(si.username.clone());
        let upload_id = store
            .create_upload(image, build, provider, &rec)
            .await
            .map_err(store_err("cannot create the upload record"))?;
        let name = local::format_image_name(&pc.image_name_format, image, &upload_id, now as i64);
        rec.external_name = Some(name.clone());
        let version = store
            .update_upload(image, build, provider, &upload_id, &rec, Some(0))
            .await
            .map_err(store_err("cannot update the upload record"))?;
        let mut properties = IndexMap::new();
        properties.insert(IMAGE_BUILD_ID.to_owned(), build.to_owned());
        properties.insert(IMAGE_UPLOAD_ID.to_owned(), upload_id.clone());
        properties.insert(IMAGE_PROVIDER.to_owned(), provider.to_owned());
        let spec = SnapshotSpec {
            name,
            properties,
            timeout: pc.image_upload_timeout,
        };
        let job = validate::Job {
            purpose: "setup",
            image,
            name: format!("np-setup-{image}-{upload_id}"),
            boot: base.clone(),
            // The setup server works for this upload: the leak rule leaves
            // it while the upload is `uploading`, as a boot test's.
            tag: validation_tag(image, build, &upload_id),
            script: &si.setup,
            size: Some((si.flavor_name.clone(), si.min_ram)),
        };
        let mut made: Option<String> = None;
        let mut outcome = validate::boot_and_run(
            &self.shared,
            &self.config,
            entry,
            &job,
            async |server: &str| -> Result<String, String> {
                let limit = spec.timeout + UPLOAD_TIMEOUT_MARGIN;
                let ext =
                    tokio::time::timeout(limit, entry.provider.snapshot_instance(server, &spec))
                        .await
                        .map_err(|_| format!("the snapshot took longer than {limit:?}"))?
                        .map_err(|e| format!("cannot snapshot the setup server: {e}"))?;
                made = Some(ext.clone());
                Ok(ext)
            },
        )
        .await;
        if outcome.is_err()
            && let Some(ext) = &made
        {
            // Its server could not be deleted: the snapshot is not used.
            self.delete_cloud_image(entry, ext).await;
        }
        if let (Ok(ext), Some(script)) = (&outcome, &si.validate) {
            let candidate = validate::Candidate {
                image,
                build,
                upload: &upload_id,
                external_id: ext,
            };
            if let Err(why) = self.boot_test(entry, &candidate, script).await {
                outcome = Err(UploadError::Validation(why).to_string());
            }
        }
        let key = RecordKey::upload(image, build, provider, &upload_id);
        if !guard.wait_held().await {
            if let Ok(ext) = &outcome {
                self.delete_cloud_image(entry, ext).await;
            }
            return Err(TaskError::SessionLost(format!(
                "snapshot upload {upload_id} of {image}"
            )));
        }
        let now = self.shared.now();
        match outcome {
            Ok(ext) => {
                rec.external_id = Some(ext.clone());
                rec.set_state(UploadState::Ready, now);
                if let Err(e) = store.write_locked(guard, &key, &rec, Some(version)).await {
                    self.delete_cloud_image(entry, &ext).await;
                    return Err(TaskError::Store {
                        what: format!("cannot record upload {upload_id} ready"),
                        source: e,
                    });
                }
                tracing::info!(image = %image, build = %build, provider = %provider, upload = %upload_id, external_id = %ext, "snapshot ready");
                Ok(Ok(()))
            }
            Err(why) => {
                rec.set_state(UploadState::Failed, now);
                rec.set_failure(&why);
                store
                    .write_locked(guard, &key, &rec, Some(version))
                    .await
                    .map_err(store_err("cannot record the failed snapshot"))?;
                Ok(Err(why))
            }
        }
    }

    /// Writes the running build's phase into its record as it changes, at
    /// most once per [`PROGRESS_WRITE_INTERVAL`] (changes meanwhile are
    /// coalesced into the next write). Runs until dropped with the build.
    async fn publish_build_progress(
        &self,
        image: &str,
        id: &str,
        mut phases: tokio::sync::watch::Receiver<BuildPhase>,
    ) -> std::convert::Infallible {
        let store = &self.shared.store;
        loop {
            if phases.changed().await.is_err() {
                // The build dropped its progress: nothing more to say.
                return std::future::pending().await;
            }
            let BuildPhase { phase, step } = phases.borrow_and_update().clone();
            let progress = BuildProgressRecord {
                phase,
                step,
                time: self.shared.now(),
            };
            // Versioned, so a record changed meanwhile (marked deleting by
            // an operator) is not overwritten; progress is best effort.
            let written = match store.get_build(image, id).await {
                Ok(Some(Versioned { mut value, version }))
                    if value.state == BuildState::Building =>
                {
                    value.set_progress(&progress);
                    store
                        .update_build(image, id, &value, Some(version))
                        .await
                        .map(|_| ())
                }
                Ok(_) => Ok(()),
                Err(e) => Err(e),
            };
            if let Err(e) = written {
                tracing::debug!(image = %image, build = %id, error = %e, "cannot publish build progress");
            }
            tokio::time::sleep(PROGRESS_WRITE_INTERVAL).await;
        }
    }

    /// Python's build metrics: `nodepool.dib_image_build.<image>.<format>.size`
    /// (bytes allocated on disk, as images are sparse), and the
    /// `.status.duration` timer, `.status.rc` and `.status.last_build`
    /// gauges. A cancelled build (shutdown) reports nothing.
    fn report_build(
        &self,
        image: &str,
        elapsed: Duration,
        result: &Result<crate::image_builder::BuildArtifacts, BuildError>,
        now: f64,
    ) {
        let m = &self.shared.metrics;
        let rc = match result {
            Ok(artifacts) => {
                for a in &artifacts.artifacts {
                    use std::os::unix::fs::MetadataExt as _;
                    let size = std::fs::metadata(&a.path).map_or(a.size, |md| md.blocks() * 512);
                    m.gauge_as(
                        &format!("nodepool.dib_image_build.{image}.{}.size", a.format),
                        &families::IMAGE_SIZE,
                        &[("image", image), ("format", &a.format)],
                        size as f64,
                    );
                }
                0
            }
            Err(BuildError::Cancelled) => return,
            Err(BuildError::Failed {
                exit_code: Some(rc),
                ..
            }) => *rc,
            // Killed (timeout) or no usable output: a failure all the same.
            Err(_) => 1,
        };
        let base = format!("nodepool.dib_image_build.{image}.status");
        m.timer_as(
            &format!("{base}.duration"),
            &families::IMAGE_BUILD,
            &[
                ("image", image),
                ("status", if rc == 0 { "success" } else { "failure" }),
            ],
            elapsed,
        );
        m.gauge_as(
            &format!("{base}.rc"),
            &families::IMAGE_BUILD_RC,
            &[("image", image)],
            f64::from(rc),
        );
        m.gauge_as(
            &format!("{base}.last_build"),
            &families::IMAGE_BUILD_LAST,
            &[("image", image)],
            now.trunc(),
        );
    }

    async fn mark_dead_build(&self, image: &str, build: &str) -> TaskResult {
        // The image build lock is what a live builder holds while building.
        let marked = transition_build(
            &self.shared.store,
            &paths::builds_lock(image),
            image,
            build,
            &[BuildState::Building],
            (BuildState::Deleting, self.shared.now()),
        )
        .await?;
        if let Some(b) = marked {
            tracing::warn!(image = %image, build = %build, builder = ?b.builder, "build left by a builder that is gone; deleting it");
        }
        Ok(())
    }

    async fn mark_build_deleting(
        &self,
        image: &str,
        build: &str,
        reason: ImageDeleteReason,
    ) -> TaskResult {
        let marked = transition_build(
            &self.shared.store,
            &paths::build_lock(image, build),
            image,
            build,
            &[BuildState::Ready, BuildState::Failed],
            (BuildState::Deleting, self.shared.now()),
        )
        .await?;
        if marked.is_some() {
            tracing::info!(image = %image, build = %build, %reason, "build marked deleting; its uploads are being deleted");
        }
        Ok(())
    }

    async fn remove_build(
        &self,
        image: &str,
        build: &str,
        reason: ImageDeleteReason,
    ) -> TaskResult {
        let store = &self.shared.store;
        let lock = paths::build_lock(image, build);
        let now = self.shared.now();
        store
            .try_holding(
                LockOf::Dir(&lock),
                async |guard: &LockGuard| -> Result<Held<()>, TaskError> {
                    let marked = store
                        .update_locked(guard, &RecordKey::build(image, build), |cur| match cur {
                            None => Decision::Leave(false),
                            Some(v) if v.value.state == BuildState::Building => {
                                Decision::Leave(false)
                            }
                            Some(v) if v.value.state == BuildState::Deleting => {
                                Decision::Leave(true)
                            }
                            Some(v) => {
                                let mut b = v.value;
                                b.set_state(BuildState::Deleting, now);
                                Decision::Write(b, true)
                            }
                        })
                        .await
                        .map_err(store_err(&format!("cannot mark build {build} deleting")))?;
                    // Gone, or being built.
                    if !marked {
                        return Ok(Held::Kept(()));
                    }
                    if build_has_uploads(store, image, build)
                        .await
                        .map_err(store_err("cannot list uploads"))?
                    {
                        // An upload appeared meanwhile: the next pass deletes it first.
                        return Ok(Held::Kept(()));
                    }
                    self.delete_files(image, build, None).await?;
                    store
                        .delete_build(image, build)
                        .await
                        .map_err(store_err("cannot delete the build record"))?;
                    tracing::info!(image = %image, build = %build, %reason, "deleted build");
                    Ok(Held::Removed(()))
                },
            )
            .await?;
        Ok(())
    }

    async fn delete_local_files(
        &self,
        image: &str,
        build: &str,
        formats: Option<Vec<String>>,
        reason: ImageDeleteReason,
    ) -> TaskResult {
        tracing::info!(image = %image, build = %build, ?formats, %reason, "deleting local image files");
        self.delete_files(image, build, formats).await
    }

    // ----- uploads -----------------------------------------------------

    fn entry(&self) -> Result<&ProviderEntry, TaskError> {
        self.provider
            .as_ref()
            .ok_or(TaskError::NotConfigured("provider not set up"))
    }

    /// Deletes a cloud image the planner found leaked twice. No record
    /// to lock: the store knows nothing of it, and deleting an image that
    /// is already gone (another builder's cleanup) succeeds.
    async fn delete_leaked_image(&self, external_id: &str) -> TaskResult {
        let entry = self.entry()?;
        let t = self.shared.settings.delete_timeout;
        tokio::time::timeout(t, entry.provider.delete_image(external_id))
            .await
            .map_err(|_| TaskError::Timeout(format!("deleting leaked cloud image {external_id}")))?
            .map_err(|source| TaskError::Cloud {
                what: format!("cannot delete leaked cloud image {external_id}"),
                source,
            })?;
        tracing::info!(provider = %entry.config.name, image = %external_id, "deleted leaked cloud image (tagged as ours, unknown to the store)");
        self.shared.metrics.incr(&format!(
            "nodepool.provider.{}.leaked.images",
            entry.config.name
        ));
        Ok(())
    }

    async fn upload(
        &self,
        image: &str,
        build: &str,
        provider: &str,
        format: &str,
        requested: bool,
    ) -> TaskResult {
        let lock = paths::uploads_lock(image, build, provider);
        self.shared
            .store
            .try_holding(
                LockOf::Dir(&lock),
                async |guard: &LockGuard| -> Result<Held<()>, TaskError> {
                    self.upload_locked(guard, image, build, provider, format, requested)
                        .await
                        .map(Held::Kept)
                },
            )
            .await?;
        Ok(())
    }

    async fn upload_locked(
        &self,
        guard: &LockGuard,
        image: &str,
        build: &str,
        provider: &str,
        format: &str,
        mut requested: bool,
    ) -> TaskResult {
        let store = &self.shared.store;
        let entry = self.entry()?;
        let pc = &entry.config;
        let Some(di) = self.config.diskimage(image) else {
            return Ok(());
        };
        let images_dir = self.images_dir()?;
        // Re-check under the lock.
        let Some(b) = store
            .get_build(image, build)
            .await
            .map_err(store_err("cannot read build"))?
        else {
            return Ok(());
        };
        if b.value.state != BuildState::Ready {
            return Ok(());
        }
        let existing = read_uploads(store, image, build, provider)
            .await
            .map_err(store_err("cannot read uploads"))?;
        if existing
            .iter()
            .any(|(_, u)| u.state == UploadState::Uploading)
        {
            // Left by a dead uploader (we hold the lock): cleanup first.
            return Ok(());
        }
        let mut since = None;
        if requested {
            match store
                .backend()
                .get(&paths::image_upload_request(image, provider))
                .await
            {
                Ok(Some((_, stat))) => since = Some(stat.ctime as f64 / 1000.0),
                _ => requested = false,
            }
        }
        if existing
            .iter()
            .any(|(_, u)| u.state == UploadState::Ready && since.is_none_or(|t| u.state_time >= t))
        {
            return Ok(());
        }
        let path = local::image_file(images_dir, image, build, format);
        let size = match std::fs::metadata(&path) {
            Ok(m) if m.is_file() => m.len(),
            _ => {
                return Err(TaskError::MissingFile {
                    path,
                    build: build.to_owned(),
                    provider: provider.to_owned(),
                });
            }
        };
        let md5 = local::read_checksum(
            &local::image_file(images_dir, image, build, &format!("{format}.md5")),
            32,
        );
        let sha256 = local::read_checksum(
            &local::image_file(images_dir, image, build, &format!("{format}.sha256")),
            64,
        );
        let now = self.shared.now();
        let mut rec = ImageUpload::new(now, Some(format.to_owned()));
        rec.username = b.value.username.clone();
        rec.python_path = b.value.python_path.clone();
        rec.shell_type = b.value.shell_type.clone();
        let upload_id = store
            .create_upload(image, build, provider, &rec)
            .await
            .map_err(store_err("cannot create the upload record"))?;
        let name = local::format_image_name(&pc.image_name_format, image, &upload_id, now as i64);
        // Recorded before the upload, so a cloud image left by a crash can
        // be found by name as well as by its tags.
        rec.external_name = Some(name.clone());
        let version = store
            .update_upload(image, build, provider, &upload_id, &rec, Some(0))
            .await
            .map_err(store_err("cannot update the upload record"))?;
        let mut properties: IndexMap<String, String> = di.metadata.clone();
        if let Some(pdi) = pc.diskimage(image) {
            for (k, v) in &pdi.meta {
                properties.insert(k.clone(), v.clone());
            }
        }
        properties.insert(IMAGE_BUILD_ID.into(), build.to_owned());
        properties.insert(IMAGE_UPLOAD_ID.into(), upload_id.clone());
        properties.insert(IMAGE_PROVIDER.into(), provider.to_owned());
        // Glance's disk_format travels as `format` (Python passes it as
        // the `disk_format` keyword of create_image).
        let spec = ImageUploadSpec {
            name: name.clone(),
            path: path.clone(),
            format: format.to_owned(),
            properties,
            md5,
            sha256,
            timeout: pc.image_upload_timeout,
            sent: Default::default(),
        };
        tracing::info!(image = %image, build = %build, provider = %provider, upload = %upload_id, file = %path.display(), bytes = size, name = %name, "uploading image");
        let started = Instant::now();
        let mut version = version;
        let mut record = UploadRecord {
            image,
            build,
            provider,
            upload: &upload_id,
            rec: &mut rec,
            version: &mut version,
        };
        let mut outcome = self.timed_upload(entry, &spec, size, &mut record).await;
        rec.set_progress(&UploadProgressRecord {
            bytes_sent: spec.sent.get(),
            total_bytes: size,
        });
        if let (Ok(ext), Some(hook)) = (&outcome, &pc.post_upload_hook) {
            tracing::info!(provider = %provider, image = %name, hook = %hook, "running post-upload-hook");
            match hook::run_post_upload_hook(hook, provider, ext, &path, pc.image_upload_timeout)
                .await
            {
                Ok(output) => {
                    tracing::info!(provider = %provider, image = %name, "post-upload-hook succeeded: {output}")
                }
                Err(e) => {
                    self.delete_cloud_image(entry, ext).await;
                    outcome = Err(e.into());
                }
            }
        }
        if let (Ok(ext), Some(script)) = (
            &outcome,
            pc.diskimage(image).and_then(|d| d.validate.as_ref()),
        ) {
            let candidate = validate::Candidate {
                image,
                build,
                upload: &upload_id,
                external_id: ext,
            };
            if let Err(why) = self.boot_test(entry, &candidate, script).await {
                outcome = Err(UploadError::Validation(why));
            }
        }
        let now = self.shared.now();
        let key = RecordKey::upload(image, build, provider, &upload_id);
        if !guard.wait_held().await {
            if let Ok(ext) = &outcome {
                self.delete_cloud_image(entry, ext).await;
            }
            return Err(TaskError::SessionLost(format!(
                "upload {upload_id} of build {build} to {provider}"
            )));
        }
        match outcome {
            Ok(ext) => {
                rec.external_id = Some(ext.clone());
                rec.set_state(UploadState::Ready, now);
                if let Err(e) = store.write_locked(guard, &key, &rec, Some(version)).await {
                    self.delete_cloud_image(entry, &ext).await;
                    return Err(TaskError::Store {
                        what: format!("cannot record upload {upload_id} ready"),
                        source: e,
                    });
                }
                // Python: a timer and a counter per successful upload.
                self.shared.metrics.timing_as(
                    &[format!("nodepool.image_update.{image}.{provider}")],
                    &families::IMAGE_UPLOAD,
                    &[
                        ("image", image),
                        ("provider", provider),
                        ("status", "success"),
                    ],
                    started.elapsed(),
                );
                let secs = started.elapsed().as_secs_f64();
                tracing::info!(
                    image = %image, build = %build, provider = %provider, upload = %upload_id,
                    external_id = %ext, elapsed_s = format!("{secs:.1}"),
                    mib_per_s = format!("{:.1}", size as f64 / 1048576.0 / secs.max(0.001)),
                    "upload ready"
                );
                if requested && let Err(e) = store.clear_image_upload_request(image, provider).await
                {
                    tracing::warn!(image = %image, provider = %provider, error = %e, "cannot remove the upload request");
                }
                Ok(())
            }
            Err(e) => {
                self.shared.metrics.observe(
                    &families::IMAGE_UPLOAD,
                    &[
                        ("image", image),
                        ("provider", provider),
                        ("status", "failure"),
                    ],
                    started.elapsed(),
                );
                rec.set_state(UploadState::Failed, now);
                rec.set_failure(&e.to_string());
                store
                    .write_locked(guard, &key, &rec, Some(version))
                    .await
                    .map_err(store_err("cannot record the failed upload"))?;
                Err(TaskError::Upload {
                    upload: upload_id,
                    build: build.to_owned(),
                    provider: provider.to_owned(),
                    source: Box::new(e),
                })
            }
        }
    }

    /// Boot-tests a new upload (a diskimage's or a snapshot's) with its
    /// `validate` script; one that fails has its cloud image deleted.
    /// Python's timer `nodepool.image_update.<image>.<provider>.validate.<status>`
    /// and the log say how it went; `Err` is why it failed.
    async fn boot_test(
        &self,
        entry: &ProviderEntry,
        candidate: &validate::Candidate<'_>,
        script: &crate::config::ReadyScript,
    ) -> Result<(), String> {
        let (image, build, upload) = (candidate.image, candidate.build, candidate.upload);
        let provider = entry.config.name.as_str();
        let testing = Instant::now();
        let tested = validate::validate(&self.shared, &self.config, entry, candidate, script).await;
        let status = if tested.is_ok() { "success" } else { "failure" };
        self.shared.metrics.timing_as(
            &[format!(
                "nodepool.image_update.{image}.{provider}.validate.{status}"
            )],
            &families::IMAGE_VALIDATION,
            &[("image", image), ("provider", provider), ("status", status)],
            testing.elapsed(),
        );
        match &tested {
            Ok(()) => {
                tracing::info!(image = %image, build = %build, provider = %provider, upload = %upload, script = %script.name, "upload validated")
            }
            Err(why) => {
                tracing::warn!(image = %image, build = %build, provider = %provider, upload = %upload, script = %script.name, reason = %why, "upload failed validation; deleting its cloud image");
                self.delete_cloud_image(entry, candidate.external_id).await;
            }
        }
        tested
    }

    /// Runs the provider's upload, logging progress, bounded by the upload
    /// timeout (plus a margin) and by shutdown.
    async fn timed_upload(
        &self,
        entry: &ProviderEntry,
        spec: &ImageUploadSpec,
        size: u64,
        record: &mut UploadRecord<'_>,
    ) -> Result<String, UploadError> {
        let upload = entry.provider.upload_image(spec);
        tokio::pin!(upload);
        let limit = tokio::time::sleep(spec.timeout + UPLOAD_TIMEOUT_MARGIN);
        tokio::pin!(limit);
        let every = self.shared.settings.upload_progress_interval;
        let mut progress = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        let started = tokio::time::Instant::now();
        let mut publish = tokio::time::interval(PROGRESS_WRITE_INTERVAL);
        let mut published = None;
        loop {
            tokio::select! {
                r = &mut upload => return r.map_err(UploadError::Cloud),
                _ = publish.tick() => {
                    let sent = spec.sent.get();
                    if published != Some(sent) {
                        published = Some(sent);
                        record.publish(&self.shared.store, sent, size).await;
                    }
                }
                _ = &mut limit => return Err(UploadError::Timeout(spec.timeout.as_secs())),
                _ = self.shared.work.cancelled() => return Err(UploadError::Stopping),
                _ = progress.tick() => {
                    tracing::info!(
                        provider = %entry.config.name, image = %spec.name, bytes = size,
                        bytes_sent = spec.sent.get(),
                        elapsed_s = started.elapsed().as_secs(),
                        timeout_s = spec.timeout.as_secs(),
                        "still uploading"
                    );
                }
            }
        }
    }

    async fn delete_cloud_image(&self, entry: &ProviderEntry, external_id: &str) {
        let t = self.shared.settings.delete_timeout;
        match tokio::time::timeout(t, entry.provider.delete_image(external_id)).await {
            Ok(Ok(())) => {
                tracing::info!(provider = %entry.config.name, image = %external_id, "deleted cloud image")
            }
            Ok(Err(e)) => {
                tracing::warn!(provider = %entry.config.name, image = %external_id, error = %e, "cannot delete cloud image")
            }
            Err(_) => {
                tracing::warn!(provider = %entry.config.name, image = %external_id, "cloud image deletion timed out")
            }
        }
    }

    /// Deletes the cloud image of an upload: by id when known, else every
    /// image tagged with its build and upload ids.
    async fn delete_upload_image(
        &self,
        entry: &ProviderEntry,
        build: &str,
        upload: &str,
        external_id: Option<&str>,
    ) -> TaskResult {
        let p = &entry.provider;
        let t = self.shared.settings.delete_timeout;
        let ids: Vec<String> = match external_id {
            Some(id) => vec![id.to_owned()],
            None => tokio::time::timeout(t, p.list_images())
                .await
                .map_err(|_| TaskError::Timeout("listing cloud images".into()))?
                .map_err(|source| TaskError::Cloud {
                    what: "cannot list cloud images".into(),
                    source,
                })?
                .into_iter()
                .filter(|i| {
                    i.properties.get(IMAGE_BUILD_ID).map(String::as_str) == Some(build)
                        && i.properties.get(IMAGE_UPLOAD_ID).map(String::as_str) == Some(upload)
                        && i.properties
                            .get(IMAGE_PROVIDER)
                            .is_none_or(|n| n == &entry.config.name)
                })
                .map(|i| i.id)
                .collect(),
        };
        for id in ids {
            tokio::time::timeout(t, p.delete_image(&id))
                .await
                .map_err(|_| TaskError::Timeout(format!("deleting cloud image {id}")))?
                .map_err(|source| TaskError::Cloud {
                    what: format!("cannot delete cloud image {id}"),
                    source,
                })?;
            tracing::info!(provider = %entry.config.name, image = %id, "deleted cloud image");
        }
        Ok(())
    }

    async fn delete_upload(
        &self,
        image: &str,
        build: &str,
        provider: &str,
        upload: &str,
        reason: ImageDeleteReason,
    ) -> TaskResult {
        let store = &self.shared.store;
        let entry = self.entry()?;
        let lock = paths::upload_lock(image, build, provider, upload);
        let now = self.shared.now();
        store
            .try_holding(LockOf::Dir(&lock), async |guard: &LockGuard| -> Result<Held<()>, TaskError> {
                let marked = store
                    .update_locked(
                        guard,
                        &RecordKey::upload(image, build, provider, upload),
                        |cur| match cur {
                            None => Decision::Leave(None),
                            Some(v) if v.value.state == UploadState::Uploading => {
                                Decision::Leave(None)
                            }
                            Some(v) if v.value.state == UploadState::Deleting => {
                                Decision::Leave(Some(v.value))
                            }
                            Some(v) => {
                                let mut u = v.value;
                                u.set_state(UploadState::Deleting, now);
                                Decision::Write(u.clone(), Some(u))
                            }
                        },
                    )
                    .await
                    .map_err(store_err("cannot mark upload deleting"))?;
                let Some(u) = marked else {
                    return Ok(Held::Kept(()));
                };
                tracing::info!(image = %image, build = %build, provider = %provider, upload = %upload, external_id = ?u.external_id, %reason, "deleting upload");
                self.delete_upload_image(entry, build, upload, u.external_id.as_deref())
                    .await?;
                store
                    .delete_upload(image, build, provider, upload)
                    .await
                    .map_err(store_err("cannot delete the upload record"))?;
                Ok(Held::Removed(()))
            })
            .await?;
        Ok(())
    }

    async fn remove_dead_upload(
        &self,
        image: &str,
        build: &str,
        provider: &str,
        upload: &str,
    ) -> TaskResult {
        let store = &self.shared.store;
        let entry = self.entry()?;
        // The lock a live uploader holds; it is not under the upload record.
        let lock = paths::uploads_lock(image, build, provider);
        store
            .try_holding(LockOf::Dir(&lock), async |_: &LockGuard| -> Result<Held<()>, TaskError> {
                let Some(v) = store
                    .get_upload(image, build, provider, upload)
                    .await
                    .map_err(store_err("cannot read upload"))?
                else {
                    return Ok(Held::Kept(()));
                };
                if v.value.state != UploadState::Uploading {
                    return Ok(Held::Kept(()));
                }
                tracing::warn!(image = %image, build = %build, provider = %provider, upload = %upload, "upload left by a builder that is gone; removing it");
                self.delete_upload_image(entry, build, upload, v.value.external_id.as_deref())
                    .await?;
                store
                    .delete_upload(image, build, provider, upload)
                    .await
                    .map_err(store_err("cannot delete the upload record"))?;
                Ok(Held::Kept(()))
            })
            .await?;
        Ok(())
    }
}

/// Marks a build as running in this process for as long as it lives.
struct RunningBuild {
    shared: std::sync::Arc<Shared>,
    key: (String, String),
}

impl RunningBuild {
    fn new(shared: &std::sync::Arc<Shared>, key: (String, String)) -> Self {
        shared
            .running_builds
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key.clone());
        RunningBuild {
            shared: shared.clone(),
            key,
        }
    }
}

impl Drop for RunningBuild {
    fn drop(&mut self) {
        self.shared
            .running_builds
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.key);
    }
}

/// An upload's record while the upload runs, for progress writes: the
/// version moves with each write, so the final write still checks it.
struct UploadRecord<'a> {
    image: &'a str,
    build: &'a str,
    provider: &'a str,
    upload: &'a str,
    rec: &'a mut ImageUpload,
    version: &'a mut i32,
}

impl UploadRecord<'_> {
    /// Writes the bytes sent into the record; best effort (a failure is
    /// logged and the upload goes on).
    async fn publish(&mut self, store: &Store, bytes_sent: u64, total_bytes: u64) {
        self.rec.set_progress(&UploadProgressRecord {
            bytes_sent,
            total_bytes,
        });
        match store
            .update_upload(
                self.image,
                self.build,
                self.provider,
                self.upload,
                self.rec,
                Some(*self.version),
            )
            .await
        {
            Ok(v) => *self.version = v,
            Err(e) => {
                tracing::debug!(image = %self.image, build = %self.build, provider = %self.provider, upload = %self.upload, error = %e, "cannot publish upload progress")
            }
        }
    }
}
