//! The builder's plan (reference §5.2, §5.4, §5.5): which images to build,
//! which builds to upload where, and which builds, uploads and local files
//! to delete — as data.
//!
//! [`plan_images`] is the builder's counterpart of [`plan`](super::plan):
//! a plain function of an [`ImageSnapshot`] (the store's image records and
//! the builder's own image files), the configuration, `now` and the
//! builder's [`BuilderLocal`] state. No IO, no clock, no randomness; the
//! builder runtime executes the [`ImageAction`]s, taking the locks the
//! reference names and re-checking under them, so two builders planning
//! from the same state never both act.
//!
//! It is level-triggered like the launcher's planner: every decision comes
//! from the state alone, so planning again on the state the actions
//! produced asks for nothing new, and a builder that died half-way is
//! finished by whichever builder plans next.
//!
//! # Decisions
//!
//! - **Retention** keeps, per configured image, the two newest ready builds
//!   *and* the builds of the two newest ready uploads of every provider that
//!   takes the image (newest by `state_time`, the time they became ready,
//!   as the launcher picks the image to boot). The union matters: when the
//!   newest build never reached a provider, that provider's previous two
//!   images are older than the two newest builds, and Python's
//!   build-level rule alone would delete the provider's second image. So
//!   "never delete the current or previous ready image of any
//!   image-provider combination" (seed 000) holds as stated.
//! - **Backoff by record.** A failed build is kept for [`BUILD_RETRY_SECS`]
//!   and a failed upload of a kept build for [`UPLOAD_RETRY_SECS`]; while
//!   such a record exists no new build (upload) is planned for it, and when
//!   it is deleted the next pass retries. Python retries a failing build
//!   every 10 s forever; this bounds the churn with no local timers, and
//!   every builder sees the same backoff.
//! - **Responsibility.** A builder acts on the images in its configuration
//!   and on images it built (by `builder_id`) or has files of; another
//!   builder's images it does not know are left alone (as Python does).
//! - **Unknown providers.** Uploads to a provider that is not in the
//!   configuration cannot be deleted (its cloud cannot be reached); they
//!   are reported in [`ImagePlan::notes`] and left for `nodepool erase`, as
//!   in Python. Seed 001's way to remove a provider (every pool at
//!   `max-servers` ≤ 0) deletes them properly.
//! - **Snapshot images** (a provider's `images`, seed 002) are recorded as
//!   builds of their name with one upload each, to their provider: a
//!   [`ImageAction::Snapshot`] makes both at once. Retention keeps the
//!   builds of the kept uploads only (a build is nothing without its
//!   snapshot), so deleting the newest upload (`image-delete`) deletes its
//!   build too and the previous snapshot is current again.

use std::collections::{BTreeMap, BTreeSet};

use super::LaunchImage;
use super::leaks::leaked_images;
use crate::config::{Config, ImageSource, ProviderConfig, SnapshotImage};
use crate::model::{BuildState, UploadState};
use crate::provider::CloudImageInfo;
use crate::store::{BuildRecord, ImageState, UploadRecord};

/// A failed build blocks new builds of its image for this long, then it is
/// deleted and the image is built again (5 minutes).
pub const BUILD_RETRY_SECS: f64 = 300.0;

/// A failed upload of a kept build blocks a new upload of that build to
/// that provider for this long, then it is deleted (cloud image first) and
/// the upload is tried again (Python's cleanup interval, 60 s).
pub const UPLOAD_RETRY_SECS: f64 = 60.0;

/// Ready builds and ready uploads per provider kept of each image.
pub const KEEP: usize = 2;

/// (image, build id): the key of a build everywhere in this module.
pub type BuildKey = (String, String);

/// Everything the image planner looks at.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ImageSnapshot {
    /// Builds, uploads, flags, locks and requests from the store, and the
    /// builds it could not read (`unreadable_builds`, left alone).
    pub images: ImageState,
    /// Builds with files in this builder's images directory, and the image
    /// formats present (`qcow2`, `raw`, ...; checksum files not counted).
    pub local_files: BTreeMap<BuildKey, BTreeSet<String>>,
    /// Every image of a provider's cloud, for the providers whose leak
    /// check is due this pass (listed before `images` was read, so an
    /// upload listed here has its record there unless it leaked).
    pub cloud_images: BTreeMap<String, Vec<CloudImageInfo>>,
}

/// What only this builder process knows.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BuilderLocal {
    /// This builder's id (`<images-dir>/builder_id.txt`).
    pub builder_id: String,
    /// Builds this process is running now: never dead, their files never
    /// stale, whatever the store's lock view says this instant.
    pub running_builds: BTreeSet<BuildKey>,
    /// Cloud images that looked leaked at the previous leak check, by
    /// (provider, cloud image id).
    pub leak_suspects: BTreeSet<(String, String)>,
}

/// Why an image is built.
#[derive(Clone, Debug, PartialEq)]
pub enum BuildReason {
    /// `nodepool image-build` asked for it.
    Requested,
    /// The image has no ready build.
    NoReadyBuild,
    /// The newest ready build lacks formats a provider or the diskimage needs.
    MissingFormats(Vec<String>),
    /// The newest ready build is at least `rebuild-age` old.
    Stale {
        /// Its age, seconds.
        age: f64,
    },
}

impl std::fmt::Display for BuildReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BuildReason::Requested => f.write_str("build requested"),
            BuildReason::NoReadyBuild => f.write_str("no ready build"),
            BuildReason::MissingFormats(m) => write!(f, "missing formats {}", m.join(",")),
            BuildReason::Stale { age } => write!(f, "newest ready build is {age:.0} s old"),
        }
    }
}

/// Why something is deleted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ImageDeleteReason {
    /// Older than the kept builds / uploads.
    Retention,
    /// Already `deleting` (`dib-image-delete`, `image-delete`, or an earlier pass).
    Requested,
    /// The diskimage is no longer in the configuration.
    ImageRemoved,
    /// The provider no longer lists the diskimage.
    ImageRemovedFromProvider,
    /// A failed build or upload, after its retry delay.
    Failed,
    /// Left `building` / `uploading` by a builder that is gone (its lock is free).
    DeadBuilder,
    /// An upload of a build that is being deleted.
    BuildDeleted,
    /// The build record is gone or being deleted (local files).
    BuildGone,
    /// `delete-after-upload`: every provider has a ready upload.
    DeleteAfterUpload,
}

impl ImageDeleteReason {
    /// A short label for logs.
    pub fn as_str(self) -> &'static str {
        match self {
            ImageDeleteReason::Retention => "retention",
            ImageDeleteReason::Requested => "requested",
            ImageDeleteReason::ImageRemoved => "image removed",
            ImageDeleteReason::ImageRemovedFromProvider => "image removed from provider",
            ImageDeleteReason::Failed => "failed",
            ImageDeleteReason::DeadBuilder => "dead builder",
            ImageDeleteReason::BuildDeleted => "build deleted",
            ImageDeleteReason::BuildGone => "build gone",
            ImageDeleteReason::DeleteAfterUpload => "delete-after-upload",
        }
    }
}

impl std::fmt::Display for ImageDeleteReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The provider and configuration of a snapshot image (a provider's
/// `images` entry; a name belongs to one provider).
pub fn snapshot_image<'a>(
    config: &'a Config,
    image: &str,
) -> Option<(&'a ProviderConfig, &'a SnapshotImage)> {
    config
        .providers
        .iter()
        .find_map(|p| p.snapshot_image(image).map(|si| (p, si)))
}

/// Whether the builder makes `image`: a top-level diskimage or a snapshot
/// image.
fn configured(config: &Config, image: &str) -> bool {
    config.diskimage(image).is_some() || snapshot_image(config, image).is_some()
}

/// One thing for the builder to do. Each is independent of the others in
/// the same plan; the executor takes the named lock non-blocking and skips
/// the action if someone else holds it.
#[derive(Clone, Debug, PartialEq)]
pub enum ImageAction {
    /// Take the image's build lock, re-check that its newest ready build is
    /// still `newest_ready`, create a `building` record and build.
    Build {
        /// Diskimage name.
        image: String,
        /// Formats to build: the diskimage's plus every provider's.
        formats: Vec<String>,
        /// Why.
        reason: BuildReason,
        /// The newest ready build the decision was made on.
        newest_ready: Option<String>,
        /// A `request-build` was pending: remove it once the build is ready.
        requested: bool,
    },
    /// Make a snapshot image: take the image's build lock, re-check that
    /// its newest ready build is still `newest_ready`, create a `building`
    /// record and an `uploading` upload to `provider` under it (upload
    /// lock held), boot a server of `base`, run `setup` on it, snapshot it,
    /// delete it, validate the snapshot if configured, and mark both ready.
    Snapshot {
        /// Snapshot image name.
        image: String,
        /// Its provider.
        provider: String,
        /// What the setup server boots.
        base: LaunchImage,
        /// Why.
        reason: BuildReason,
        /// The newest ready build the decision was made on.
        newest_ready: Option<String>,
        /// A build request was pending: remove it once the snapshot is ready.
        requested: bool,
    },
    /// Take the upload lock of (build, provider), re-check, create an
    /// `uploading` record and upload the local file of `format`.
    Upload {
        /// Diskimage name.
        image: String,
        /// Build id.
        build: String,
        /// Provider name.
        provider: String,
        /// Disk format the provider takes.
        format: String,
        /// An upload request is pending: upload even if a ready upload of
        /// this build exists, and remove the request once ready.
        requested: bool,
    },
    /// Lock the upload, set it `deleting`, delete the cloud image, then the
    /// record.
    DeleteUpload {
        /// Diskimage name.
        image: String,
        /// Build id.
        build: String,
        /// Provider name.
        provider: String,
        /// Upload id.
        upload: String,
        /// Why.
        reason: ImageDeleteReason,
    },
    /// An `uploading` record whose upload lock is free (its uploader died):
    /// take the upload lock, re-check, delete any cloud image tagged with
    /// it, then the record.
    RemoveDeadUpload {
        /// Diskimage name.
        image: String,
        /// Build id.
        build: String,
        /// Provider name.
        provider: String,
        /// Upload id.
        upload: String,
    },
    /// A `building` record whose image build lock is free (its builder
    /// died): take the image build lock, re-check, set it `deleting`.
    MarkDeadBuild {
        /// Diskimage name.
        image: String,
        /// Build id.
        build: String,
    },
    /// Every upload of a build being deleted is `deleting`: set the build
    /// `deleting` too (its local files can go before the clouds finish).
    MarkBuildDeleting {
        /// Diskimage name.
        image: String,
        /// Build id.
        build: String,
        /// Why.
        reason: ImageDeleteReason,
    },
    /// A build to delete with no upload records left: lock it, set it
    /// `deleting`, re-check, delete its local files and its record tree.
    RemoveBuild {
        /// Diskimage name.
        image: String,
        /// Build id.
        build: String,
        /// Why.
        reason: ImageDeleteReason,
    },
    /// Delete files of a build from this builder's images directory: every
    /// file of it (`None`), or the listed formats with their checksums.
    DeleteLocalFiles {
        /// Diskimage name.
        image: String,
        /// Build id.
        build: String,
        /// Formats to delete; `None` = everything of the build.
        formats: Option<Vec<String>>,
        /// Why.
        reason: ImageDeleteReason,
    },
    /// Remove an upload request that is done or can never be served.
    ClearUploadRequest {
        /// Diskimage name.
        image: String,
        /// Provider name.
        provider: String,
        /// Why, for the log.
        reason: String,
    },
    /// Delete a cloud image tagged as an upload of ours that the store does
    /// not know (seen leaked by two checks in a row).
    DeleteLeakedImage {
        /// Provider name.
        provider: String,
        /// Cloud image id.
        external_id: String,
    },
}

impl ImageAction {
    /// A key naming the action and what it works on: the runtime skips a
    /// planned action whose key is still running, or failed recently (it
    /// backs off). Actions with different keys on the same records may run
    /// at once; their locks keep them apart.
    pub fn key(&self) -> String {
        match self {
            ImageAction::Build { image, .. } | ImageAction::Snapshot { image, .. } => {
                format!("build {image}")
            }
            ImageAction::Upload {
                image,
                build,
                provider,
                ..
            } => format!("upload {image}/{build}/{provider}"),
            ImageAction::DeleteUpload {
                image,
                build,
                provider,
                upload,
                ..
            }
            | ImageAction::RemoveDeadUpload {
                image,
                build,
                provider,
                upload,
            } => format!("delete-upload {image}/{build}/{provider}/{upload}"),
            ImageAction::MarkDeadBuild { image, build } => format!("mark-dead {image}/{build}"),
            ImageAction::MarkBuildDeleting { image, build, .. } => {
                format!("mark-deleting {image}/{build}")
            }
            ImageAction::RemoveBuild { image, build, .. } => {
                format!("remove-build {image}/{build}")
            }
            ImageAction::DeleteLocalFiles { image, build, .. } => {
                format!("delete-files {image}/{build}")
            }
            ImageAction::ClearUploadRequest {
                image, provider, ..
            } => format!("clear-upload-request {image}/{provider}"),
            ImageAction::DeleteLeakedImage {
                provider,
                external_id,
            } => format!("delete-leaked-image {provider}/{external_id}"),
        }
    }
}

/// The result of a planning pass.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ImagePlan {
    /// What to do: builds first, then uploads, then deletions.
    pub actions: Vec<ImageAction>,
    /// What the builder cannot act on, for the log (one line each).
    pub notes: Vec<String>,
    /// Cloud images that look leaked now (keep for the next leak check, as
    /// [`BuilderLocal::leak_suspects`]).
    pub leak_suspects: BTreeSet<(String, String)>,
}

/// Newest first: by `state_time`, ties by id (both descending).
fn newer_first<T>(a: (f64, &str, T), b: (f64, &str, T)) -> std::cmp::Ordering {
    b.0.total_cmp(&a.0).then_with(|| b.1.cmp(a.1))
}

/// Uploads a launcher may boot from: ready, with a cloud id, of a ready build.
fn usable_upload(u: &UploadRecord, ready_builds: &BTreeSet<&str>) -> bool {
    u.upload.state == UploadState::Ready
        && u.upload.external_id.is_some()
        && ready_builds.contains(u.build_id.as_str())
}

/// Whether existing uploads of `image` to the provider are wanted: it
/// lists the image and is not being removed. A paused image keeps its
/// uploads, and so does a provider whose every pool has `max-servers` ≤ 0
/// (the usual way to pause a cloud): only unlisting the image, or seed
/// 001's provider-level `max-servers: -1`, lets them go.
fn keeps_uploads(p: &ProviderConfig, image: &str) -> bool {
    (p.diskimage(image).is_some() || p.snapshot_image(image).is_some()) && !p.removing
}

/// The current and previous image of `image` per provider that keeps its
/// uploads: the newest usable upload (ready, with a cloud id, of a ready
/// build) of each of the two newest builds uploaded there, newest first.
/// Retention never deletes these (seed 000). Exposed for tests and tools.
pub fn kept_uploads<'a>(
    state: &'a ImageState,
    config: &Config,
    image: &str,
) -> BTreeMap<String, Vec<&'a UploadRecord>> {
    if !configured(config, image) {
        return BTreeMap::new();
    }
    let ready: BTreeSet<&str> = state
        .builds
        .iter()
        .filter(|b| b.image == image && b.build.state == BuildState::Ready)
        .map(|b| b.id.as_str())
        .collect();
    let keepers: BTreeSet<&str> = config
        .providers
        .iter()
        .filter(|p| keeps_uploads(p, image))
        .map(|p| p.name.as_str())
        .collect();
    select_kept(
        state.uploads.iter().filter(|u| u.image == image),
        &ready,
        &keepers,
    )
}

/// [`kept_uploads`] over one image's uploads, the ids of its ready builds
/// and the providers that keep its uploads.
fn select_kept<'a>(
    uploads: impl Iterator<Item = &'a UploadRecord>,
    ready: &BTreeSet<&str>,
    keepers: &BTreeSet<&str>,
) -> BTreeMap<String, Vec<&'a UploadRecord>> {
    let mut out: BTreeMap<String, Vec<&'a UploadRecord>> = keepers
        .iter()
        .map(|p| ((*p).to_owned(), Vec::new()))
        .collect();
    for u in uploads {
        if usable_upload(u, ready)
            && let Some(v) = out.get_mut(u.provider.as_str())
        {
            v.push(u);
        }
    }
    for ups in out.values_mut() {
        ups.sort_by(|a, b| {
            newer_first(
                (a.upload.state_time, a.id.as_str(), ()),
                (b.upload.state_time, b.id.as_str(), ()),
            )
            .then_with(|| b.build_id.cmp(&a.build_id))
        });
        // One upload per build: a fresh upload of the current build
        // (`image-upload`) must not push the previous image out.
        let mut seen: BTreeSet<&str> = BTreeSet::new();
        ups.retain(|u| seen.len() < KEEP && seen.insert(&u.build_id));
    }
    out
}

/// The newest ready builds of a configured image: the ones retention
/// never deletes. Exposed for tests and tools.
pub fn newest_ready_builds<'a>(
    state: &'a ImageState,
    config: &Config,
    image: &str,
) -> Vec<&'a BuildRecord> {
    if !configured(config, image) {
        return Vec::new();
    }
    let mut ready: Vec<&BuildRecord> = state
        .builds
        .iter()
        .filter(|b| b.image == image && b.build.state == BuildState::Ready)
        .collect();
    sort_builds(&mut ready);
    ready.truncate(KEEP);
    ready
}

fn sort_builds(v: &mut [&BuildRecord]) {
    v.sort_by(|a, b| {
        newer_first(
            (a.build.state_time, a.id.as_str(), ()),
            (b.build.state_time, b.id.as_str(), ()),
        )
    });
}

/// Plans one pass for this builder. See the module documentation.
///
/// ```no_run
/// use nodepool_core::config::Config;
/// use nodepool_core::planner::images::{BuilderLocal, ImageSnapshot, plan_images};
///
/// let config = Config::from_yaml(&std::fs::read_to_string("nodepool.yaml")?)?;
/// // A builder reads the image records from the store
/// // (`Store::image_state`) and lists its images directory.
/// let snapshot = ImageSnapshot::default();
/// let local = BuilderLocal {
///     builder_id: "0ee5ef49-5e9c-4d3e-8b36-0b2e0a1f6d3c".into(),
///     ..BuilderLocal::default()
/// };
/// let plan = plan_images(&snapshot, &config, 1_800_000_000.0, &local);
/// for action in &plan.actions {
///     println!("{}: {action:?}", action.key());
/// }
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn plan_images(
    snapshot: &ImageSnapshot,
    config: &Config,
    now: f64,
    local: &BuilderLocal,
) -> ImagePlan {
    let st = &snapshot.images;
    let mut builds_by_image: BTreeMap<&str, Vec<&BuildRecord>> = BTreeMap::new();
    for b in &st.builds {
        builds_by_image.entry(b.image.as_str()).or_default().push(b);
    }
    let mut uploads_by_build: BTreeMap<(&str, &str), Vec<&UploadRecord>> = BTreeMap::new();
    for u in &st.uploads {
        uploads_by_build
            .entry((u.image.as_str(), u.build_id.as_str()))
            .or_default()
            .push(u);
    }
    // Builds whose record (or one of whose uploads) cannot be read: we do
    // not know their state, so nothing of theirs is touched.
    let unreadable: BTreeSet<(&str, &str)> = st
        .unreadable_builds
        .iter()
        .map(|(i, b)| (i.as_str(), b.as_str()))
        .collect();

    // The images this builder is responsible for.
    let mut images: BTreeSet<&str> = config.diskimages.iter().map(|d| d.name.as_str()).collect();
    for p in &config.providers {
        images.extend(p.snapshot_images.iter().map(|i| i.name.as_str()));
    }
    for b in &st.builds {
        if b.build.builder_id.as_deref() == Some(local.builder_id.as_str()) {
            images.insert(&b.image);
        }
    }
    for (image, _) in snapshot.local_files.keys() {
        images.insert(image);
    }

    let mut builds = Vec::new();
    let mut uploads = Vec::new();
    let mut deletions = Vec::new();
    let mut notes = Vec::new();
    for image in images {
        let mut recs = builds_by_image.get(image).cloned().unwrap_or_default();
        sort_builds(&mut recs);
        let providers = config
            .providers
            .iter()
            .map(|p| {
                let d = p.diskimage(image);
                let si = p.snapshot_image(image);
                (
                    p.name.as_str(),
                    Relation {
                        provider: p,
                        listed: d.is_some() || si.is_some(),
                        paused: d.is_some_and(|d| d.pause) || si.is_some_and(|s| s.pause),
                    },
                )
            })
            .collect();
        let ctx = ImageCtx {
            image,
            providers,
            builds: recs,
            uploads_by_build: &uploads_by_build,
            unreadable: &unreadable,
            snapshot,
            config,
            now,
            local,
        };
        ctx.plan_build(&mut builds);
        ctx.plan_uploads(&mut uploads);
        ctx.plan_retention(&mut deletions, &mut notes);
        ctx.plan_local_files(&mut deletions);
    }
    plan_upload_requests(snapshot, config, &builds_by_image, &mut deletions);
    // Manual requests first, then images with nothing to boot, then the rest.
    builds.sort_by_key(|a: &ImageAction| match a {
        ImageAction::Build { reason, .. } | ImageAction::Snapshot { reason, .. } => match reason {
            BuildReason::Requested => 0,
            BuildReason::NoReadyBuild => 1,
            BuildReason::MissingFormats(_) => 2,
            BuildReason::Stale { .. } => 3,
        },
        _ => 4,
    });
    let leak_suspects = plan_leaked_images(snapshot, config, local, &mut deletions);
    let mut actions = builds;
    actions.extend(uploads);
    actions.extend(deletions);
    ImagePlan {
        actions,
        notes,
        leak_suspects,
    }
}

/// Cloud images tagged as uploads of ours that the store does not know
/// ([`leaked_images`]: failed or half-finished uploads, a builder killed
/// mid-upload), deleted when the previous check found them leaked too, as
/// the launcher does with servers: one listing may race an upload whose
/// record is being written, or a deletion. Returns the suspects to keep.
fn plan_leaked_images(
    snapshot: &ImageSnapshot,
    config: &Config,
    local: &BuilderLocal,
    deletions: &mut Vec<ImageAction>,
) -> BTreeSet<(String, String)> {
    let mut suspects = BTreeSet::new();
    for p in &config.providers {
        let Some(images) = snapshot.cloud_images.get(&p.name) else {
            // Not checked this pass: its suspects wait for the next check.
            suspects.extend(
                local
                    .leak_suspects
                    .iter()
                    .filter(|(sp, _)| *sp == p.name)
                    .cloned(),
            );
            continue;
        };
        for img in leaked_images(&p.name, images, &snapshot.images) {
            let key = (p.name.clone(), img.id.clone());
            if local.leak_suspects.contains(&key) {
                deletions.push(ImageAction::DeleteLeakedImage {
                    provider: key.0.clone(),
                    external_id: key.1.clone(),
                });
            }
            suspects.insert(key);
        }
    }
    suspects
}

/// How a configured provider relates to one image.
#[derive(Clone, Copy)]
struct Relation<'a> {
    provider: &'a ProviderConfig,
    /// The provider lists the image.
    listed: bool,
    /// Listed with `pause: true`.
    paused: bool,
}

impl Relation<'_> {
    /// Takes new uploads of the image: lists it unpaused, and some pool
    /// of the provider is enabled (a cloud paused with `max-servers: 0`
    /// everywhere gets the newest build once it is enabled again).
    fn uploads_to(&self) -> bool {
        self.listed && !self.paused && !self.provider.is_disabled()
    }

    /// Keeps existing uploads of the image: lists it (see
    /// [`keeps_uploads`]).
    fn keeps(&self) -> bool {
        self.listed && !self.provider.removing
    }
}

struct ImageCtx<'a> {
    image: &'a str,
    /// Every configured provider, by name, and how it relates to the image.
    providers: BTreeMap<&'a str, Relation<'a>>,
    /// This image's builds, newest first.
    builds: Vec<&'a BuildRecord>,
    uploads_by_build: &'a BTreeMap<(&'a str, &'a str), Vec<&'a UploadRecord>>,
    unreadable: &'a BTreeSet<(&'a str, &'a str)>,
    snapshot: &'a ImageSnapshot,
    config: &'a Config,
    now: f64,
    local: &'a BuilderLocal,
}

impl<'a> ImageCtx<'a> {
    fn uploads_of(&self, build: &'a str) -> &'a [&'a UploadRecord] {
        self.uploads_by_build
            .get(&(self.image, build))
            .map(Vec::as_slice)
            .unwrap_or(&[])
    }

    fn ready(&self) -> impl Iterator<Item = &'a BuildRecord> + '_ {
        self.builds
            .iter()
            .copied()
            .filter(|b| b.build.state == BuildState::Ready)
    }

    fn running_here(&self, build: &str) -> bool {
        self.local
            .running_builds
            .contains(&(self.image.to_owned(), build.to_owned()))
    }

    /// A `building` record is alive while the image build lock is held or
    /// this process runs it.
    fn build_alive(&self, b: &BuildRecord) -> bool {
        self.snapshot.images.build_locked.contains(self.image) || self.running_here(&b.id)
    }

    fn plan_build(&self, out: &mut Vec<ImageAction>) {
        let st = &self.snapshot.images;
        let (formats, rebuild_age, snapshot) = if let Some(di) = self.config.diskimage(self.image) {
            let formats = self.config.diskimage_formats(self.image);
            if formats.is_empty() || di.pause {
                return;
            }
            (formats, di.rebuild_age, None)
        } else if let Some((p, si)) = snapshot_image(self.config, self.image) {
            if si.pause || p.is_disabled() {
                return;
            }
            // A diskimage base with no ready upload here yet: later.
            let Some(base) = self.snapshot_base(p, si) else {
                return;
            };
            (BTreeSet::new(), si.rebuild_age, Some((p, base)))
        } else {
            return;
        };
        if st.paused.contains(self.image) {
            return;
        }
        // One build of an image at a time, across builders.
        if st.build_locked.contains(self.image)
            || self.builds.iter().any(|b| self.running_here(&b.id))
        {
            return;
        }
        let backoff = self.builds.iter().any(|b| {
            b.build.state == BuildState::Failed && self.now - b.build.state_time < BUILD_RETRY_SECS
        });
        if backoff {
            return;
        }
        let requested = st.build_requests.contains_key(self.image);
        let newest = self.ready().next();
        let reason = if requested {
            BuildReason::Requested
        } else {
            match newest {
                None => BuildReason::NoReadyBuild,
                Some(b) => {
                    let missing: Vec<String> = formats
                        .iter()
                        .filter(|f| !b.build.formats.contains(f))
                        .cloned()
                        .collect();
                    let age = self.now - b.build.state_time;
                    if !missing.is_empty() {
                        BuildReason::MissingFormats(missing)
                    } else if age >= rebuild_age.as_secs_f64() {
                        BuildReason::Stale { age }
                    } else {
                        return;
                    }
                }
            }
        };
        let newest_ready = newest.map(|b| b.id.clone());
        out.push(match snapshot {
            Some((p, base)) => ImageAction::Snapshot {
                image: self.image.to_owned(),
                provider: p.name.clone(),
                base,
                reason,
                newest_ready,
                requested,
            },
            None => ImageAction::Build {
                image: self.image.to_owned(),
                formats: formats.into_iter().collect(),
                reason,
                newest_ready,
                requested,
            },
        });
    }

    /// What a snapshot image's setup server boots: its cloud image, or the
    /// newest usable upload of its diskimage to its provider.
    fn snapshot_base(&self, p: &ProviderConfig, si: &SnapshotImage) -> Option<LaunchImage> {
        match p.snapshot_base(si)? {
            ImageSource::CloudImage(name) => Some(LaunchImage::Cloud { name }),
            ImageSource::DiskImage(d) => {
                let kept = kept_uploads(&self.snapshot.images, self.config, &d);
                let u = kept.get(&p.name)?.first()?;
                Some(LaunchImage::Upload {
                    image: d.clone(),
                    build: u.build_id.clone(),
                    upload: u.id.clone(),
                    external_id: u.upload.external_id.clone()?,
                })
            }
            // Never a snapshot base (`snapshot_base` gives neither).
            ImageSource::Static => None,
        }
    }

    fn plan_uploads(&self, out: &mut Vec<ImageAction>) {
        if self.config.diskimage(self.image).is_none() {
            return;
        }
        let Some(newest) = self.ready().next() else {
            return;
        };
        if self.unreadable.contains(&(self.image, newest.id.as_str())) {
            return;
        }
        let Some(files) = self
            .snapshot
            .local_files
            .get(&(self.image.to_owned(), newest.id.clone()))
        else {
            return;
        };
        let ups = self.uploads_of(&newest.id);
        for rel in self.providers.values() {
            if !rel.uploads_to() {
                continue;
            }
            let p = rel.provider;
            let format = p.upload_format();
            if !newest.build.formats.iter().any(|f| f == format) || !files.contains(format) {
                continue;
            }
            let mine: Vec<&&UploadRecord> = ups.iter().filter(|u| u.provider == p.name).collect();
            // In progress (or left by a dead uploader: removed first), or
            // failed recently (retried once the record is gone).
            if mine
                .iter()
                .any(|u| matches!(u.upload.state, UploadState::Uploading | UploadState::Failed))
            {
                continue;
            }
            let request = self
                .snapshot
                .images
                .upload_requests
                .get(&(self.image.to_owned(), p.name.clone()));
            let ready: Vec<f64> = mine
                .iter()
                .filter(|u| u.upload.state == UploadState::Ready)
                .map(|u| u.upload.state_time)
                .collect();
            let satisfied = match request {
                None => !ready.is_empty(),
                Some(&t) => ready.iter().any(|&r| r >= t),
            };
            if satisfied {
                continue;
            }
            out.push(ImageAction::Upload {
                image: self.image.to_owned(),
                build: newest.id.clone(),
                provider: p.name.clone(),
                format: format.to_owned(),
                requested: request.is_some(),
            });
        }
    }

    fn plan_retention(&self, out: &mut Vec<ImageAction>, notes: &mut Vec<String>) {
        let configured = configured(self.config, self.image);
        let mut keep_builds: BTreeSet<&str> = BTreeSet::new();
        let mut keep_uploads: BTreeSet<(&str, &str, &str)> = BTreeSet::new();
        if configured {
            // A snapshot build is kept for its upload only: one whose
            // snapshot was deleted (`image-delete`, a rollback) goes too.
            if self.config.diskimage(self.image).is_some() {
                keep_builds.extend(self.ready().take(KEEP).map(|b| b.id.as_str()));
            }
            let ready: BTreeSet<&str> = self.ready().map(|b| b.id.as_str()).collect();
            let keepers: BTreeSet<&str> = self
                .providers
                .iter()
                .filter(|(_, r)| r.keeps())
                .map(|(n, _)| *n)
                .collect();
            let mine = self
                .builds
                .iter()
                .flat_map(|b| self.uploads_of(&b.id).iter().copied());
            for (_, ups) in select_kept(mine, &ready, &keepers) {
                for u in ups {
                    keep_builds.insert(&u.build_id);
                    keep_uploads.insert((&u.build_id, &u.provider, &u.id));
                }
            }
        }
        for b in &self.builds {
            if self.unreadable.contains(&(self.image, b.id.as_str())) {
                continue;
            }
            let kept = keep_builds.contains(b.id.as_str());
            let ups = self.uploads_of(&b.id);
            for u in ups {
                let Some(rel) = self.providers.get(u.provider.as_str()) else {
                    notes.push(format!(
                        "upload {}/{}/{}/{} ({}) is for provider {:?}, which is not configured: \
                         left alone (`nodepool erase {}` removes its records)",
                        u.image,
                        u.build_id,
                        u.provider,
                        u.id,
                        u.upload.state,
                        u.provider,
                        u.provider
                    ));
                    continue;
                };
                let obsolete = if !configured {
                    Some(ImageDeleteReason::ImageRemoved)
                } else if !rel.listed {
                    Some(ImageDeleteReason::ImageRemovedFromProvider)
                } else {
                    None
                };
                let delete = |reason| ImageAction::DeleteUpload {
                    image: u.image.clone(),
                    build: u.build_id.clone(),
                    provider: u.provider.clone(),
                    upload: u.id.clone(),
                    reason,
                };
                match u.upload.state {
                    UploadState::Uploading => {
                        if !u.uploads_locked {
                            out.push(ImageAction::RemoveDeadUpload {
                                image: u.image.clone(),
                                build: u.build_id.clone(),
                                provider: u.provider.clone(),
                                upload: u.id.clone(),
                            });
                        }
                    }
                    // A snapshot being made: its upload is ready (or failed)
                    // just before its build; the snapshot task records both.
                    _ if b.build.state == BuildState::Building => {}
                    // Locked: someone is deleting it already.
                    _ if u.locked => {}
                    UploadState::Deleting => out.push(delete(ImageDeleteReason::Requested)),
                    UploadState::Failed => {
                        if let Some(r) = obsolete {
                            out.push(delete(r));
                        } else if b.build.state == BuildState::Failed {
                            // A failed snapshot: its upload says why for as
                            // long as its build blocks a new attempt, and
                            // goes with it.
                            if self.now - b.build.state_time >= BUILD_RETRY_SECS {
                                out.push(delete(ImageDeleteReason::Failed));
                            }
                        } else if !kept {
                            out.push(delete(ImageDeleteReason::BuildDeleted));
                        } else if self.now - u.upload.state_time >= UPLOAD_RETRY_SECS {
                            out.push(delete(ImageDeleteReason::Failed));
                        }
                    }
                    UploadState::Ready => {
                        if let Some(r) = obsolete {
                            out.push(delete(r));
                        } else if !kept {
                            out.push(delete(if b.build.state == BuildState::Ready {
                                ImageDeleteReason::Retention
                            } else {
                                ImageDeleteReason::BuildDeleted
                            }));
                        } else if !keep_uploads.contains(&(
                            u.build_id.as_str(),
                            u.provider.as_str(),
                            u.id.as_str(),
                        )) {
                            out.push(delete(ImageDeleteReason::Retention));
                        }
                    }
                }
            }
            // The build itself.
            let reason = match b.build.state {
                BuildState::Building => {
                    if !self.build_alive(b) {
                        out.push(ImageAction::MarkDeadBuild {
                            image: self.image.to_owned(),
                            build: b.id.clone(),
                        });
                    }
                    continue;
                }
                BuildState::Ready if kept => continue,
                BuildState::Ready if !configured => ImageDeleteReason::ImageRemoved,
                BuildState::Ready => ImageDeleteReason::Retention,
                BuildState::Failed => {
                    if configured && self.now - b.build.state_time < BUILD_RETRY_SECS {
                        continue;
                    }
                    ImageDeleteReason::Failed
                }
                BuildState::Deleting => ImageDeleteReason::Requested,
            };
            if b.locked {
                continue;
            }
            if ups.is_empty() {
                out.push(ImageAction::RemoveBuild {
                    image: self.image.to_owned(),
                    build: b.id.clone(),
                    reason,
                });
            } else if b.build.state != BuildState::Deleting
                && ups.iter().all(|u| u.upload.state == UploadState::Deleting)
            {
                out.push(ImageAction::MarkBuildDeleting {
                    image: self.image.to_owned(),
                    build: b.id.clone(),
                    reason,
                });
            }
        }
    }

    fn plan_local_files(&self, out: &mut Vec<ImageAction>) {
        let from = (self.image.to_owned(), String::new());
        for ((image, build), formats) in self.snapshot.local_files.range(from..) {
            if image != self.image {
                break;
            }
            if self.running_here(build) || self.unreadable.contains(&(self.image, build.as_str())) {
                continue;
            }
            let rec = self.builds.iter().find(|b| &b.id == build);
            let all = |reason| ImageAction::DeleteLocalFiles {
                image: image.clone(),
                build: build.clone(),
                formats: None,
                reason,
            };
            match rec.map(|b| b.build.state) {
                None | Some(BuildState::Deleting) => out.push(all(ImageDeleteReason::BuildGone)),
                Some(BuildState::Failed) => out.push(all(ImageDeleteReason::Failed)),
                Some(BuildState::Building) => {}
                Some(BuildState::Ready) => {
                    let Some(di) = self.config.diskimage(self.image) else {
                        continue;
                    };
                    if !di.delete_after_upload {
                        continue;
                    }
                    let targets: Vec<&ProviderConfig> = self
                        .providers
                        .values()
                        .filter(|r| r.uploads_to())
                        .map(|r| r.provider)
                        .collect();
                    let ups = self.uploads_of(build);
                    let everywhere = !targets.is_empty()
                        && targets.iter().all(|p| {
                            ups.iter().any(|u| {
                                u.provider == p.name && u.upload.state == UploadState::Ready
                            })
                        });
                    let prune: Vec<String> = formats
                        .iter()
                        .filter(|f| !di.keep_formats.contains(f))
                        .cloned()
                        .collect();
                    if everywhere && !prune.is_empty() {
                        out.push(ImageAction::DeleteLocalFiles {
                            image: image.clone(),
                            build: build.clone(),
                            formats: Some(prune),
                            reason: ImageDeleteReason::DeleteAfterUpload,
                        });
                    }
                }
            }
        }
    }
}

/// Upload requests that are done, or that no configuration change short of
/// adding the image to the provider could serve.
fn plan_upload_requests(
    snapshot: &ImageSnapshot,
    config: &Config,
    builds_by_image: &BTreeMap<&str, Vec<&BuildRecord>>,
    out: &mut Vec<ImageAction>,
) {
    for ((image, provider), &t) in &snapshot.images.upload_requests {
        // Another builder's image: its business.
        if config.diskimage(image).is_none() {
            continue;
        }
        let clear = |reason: String| ImageAction::ClearUploadRequest {
            image: image.clone(),
            provider: provider.clone(),
            reason,
        };
        match config.provider(provider) {
            None => {
                out.push(clear(format!("provider {provider} is not configured")));
                continue;
            }
            Some(p) if p.diskimage(image).is_none() => {
                out.push(clear(format!(
                    "provider {provider} does not list diskimage {image}"
                )));
                continue;
            }
            Some(p) if p.is_disabled() => {
                out.push(clear(format!(
                    "every pool of provider {provider} is disabled (max-servers <= 0)"
                )));
                continue;
            }
            Some(_) => {}
        }
        let mut ready: Vec<&BuildRecord> = builds_by_image
            .get(image.as_str())
            .map(|v| {
                v.iter()
                    .copied()
                    .filter(|b| b.build.state == BuildState::Ready)
                    .collect()
            })
            .unwrap_or_default();
        sort_builds(&mut ready);
        let Some(newest) = ready.first() else {
            continue;
        };
        let done = snapshot.images.uploads.iter().any(|u| {
            &u.image == image
                && u.build_id == newest.id
                && &u.provider == provider
                && u.upload.state == UploadState::Ready
                && u.upload.state_time >= t
        });
        if done {
            out.push(clear(format!(
                "build {} is uploaded to {provider}",
                newest.id
            )));
        }
    }
}
