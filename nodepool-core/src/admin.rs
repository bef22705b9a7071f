//! Operations on a running installation, the domain half of the `nodepool`
//! admin command: delete or hold a node, mark builds and uploads for
//! deletion, ask for builds and uploads, pause images, find what leaked in
//! the clouds, show and erase a provider's records, export and import image
//! data.
//!
//! Each is a function over the typed [`Store`] (and the clouds, through a
//! [`ProviderFactory`]) that prints nothing and asks nothing, so the CLI,
//! the web app and embedders share one implementation. They take the locks
//! Nodepool takes and re-read records under them, so they are safe while
//! launchers and builders run. Errors are [`AdminError`]s whose messages
//! read as one line for an operator.
//!
//! Operations that want a confirmation come in two steps: one reads and
//! checks (e.g. [`upload_to_delete`]), the other acts on what was read
//! (e.g. [`mark_upload_deleting`], a compare-and-set: a record changed in
//! between is not overwritten).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use crate::config::{Config, ProviderConfig};
use crate::launcher::{ProviderFactory, delete_locked_node};
use crate::model::{
    BuildState, ImageBuild, ImageUpload, Node, NodeState, UploadState, WireRecord, epoch_now,
};
use crate::planner::leaks::{self, KnownNodes, LeakReason};
use crate::provider::{Provider, ProviderError};
use crate::store::paths::{self, ImagePath, classify_image_path};
use crate::store::{
    CreateMode, Held, ImageState, LockGuard, LockWait, Store, StoreError, Versioned, split_path,
};

/// How long `delete` and `hold` wait for a node's lock (Nodepool: 5 s).
pub const NODE_LOCK_TIMEOUT: Duration = Duration::from_secs(5);

/// How long `delete --now` lets the cloud take to delete a server
/// (the launcher's default delete timeout).
pub const DELETE_TIMEOUT: Duration = Duration::from_secs(600);

/// How long one cloud listing may take before the operation gives up on it.
pub const CLOUD_CALL_TIMEOUT: Duration = Duration::from_secs(120);

/// Why an operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AdminError {
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// No such provider in the configuration.
    #[error("unknown provider {0:?}")]
    UnknownProvider(String),
    /// A build was asked for an image that is not a configured diskimage.
    #[error(
        "unknown diskimage {0:?}: not in the configuration's diskimages (only diskimages can be built)"
    )]
    UnknownDiskimage(String),
    /// A build was asked for a diskimage paused in the configuration.
    #[error("diskimage {0} is paused in the configuration; not requesting a build")]
    DiskimagePaused(String),
    /// `image-update` named an image that is not one of the provider's
    /// snapshot images.
    #[error("provider {provider} has no snapshot image {image:?} (not in its images)")]
    NotProvidersSnapshotImage {
        /// Provider name.
        provider: String,
        /// Image name.
        image: String,
    },
    /// `image-update` of a snapshot image paused in the configuration.
    #[error("snapshot image {0} is paused in the configuration; not requesting a snapshot")]
    SnapshotImagePaused(String),
    /// Neither a configured diskimage nor an image with records.
    #[error("unknown image {0:?}: not a configured diskimage and not in the state store")]
    UnknownImage(String),
    /// An upload was asked to a provider that does not list the diskimage.
    #[error("provider {provider} does not take diskimage {image:?} (not in its diskimages)")]
    NotProvidersImage {
        /// Provider name.
        provider: String,
        /// Diskimage name.
        image: String,
    },
    /// An upload was asked to a provider where the diskimage is paused.
    #[error("diskimage {image} is paused for provider {provider} in the configuration")]
    PausedForProvider {
        /// Provider name.
        provider: String,
        /// Diskimage name.
        image: String,
    },
    /// An upload was asked of an image with no ready build.
    #[error("diskimage {0} has no ready build to upload (`nodepool image-build {0}` asks for one)")]
    NoReadyBuild(String),
    /// No such upload record.
    #[error("image {0} not found")]
    UploadNotFound(Box<UploadRef>),
    /// The upload is running; deleting its record would leak its image.
    #[error("cannot delete image {0}: the upload is in progress")]
    UploadInProgress(Box<UploadRef>),
    /// Not `<image>-<build id>`.
    #[error("{0:?} is not a dib image id (<image>-<build id>, as dib-image-list shows)")]
    NotABuildId(String),
    /// No such build record.
    #[error("build {0} not found")]
    BuildNotFound(BuildRef),
    /// The build is running.
    #[error("cannot delete build {0}: it is still building")]
    StillBuilding(BuildRef),
    /// No such node.
    #[error("node {0} not found")]
    NodeNotFound(String),
    /// No such request.
    #[error("request {0} not found")]
    RequestNotFound(String),
    /// Someone held the node's lock for all of [`NODE_LOCK_TIMEOUT`].
    #[error(
        "node {0} is locked by someone else (a launcher or Zuul); gave up after {secs} s",
        secs = NODE_LOCK_TIMEOUT.as_secs()
    )]
    NodeLocked(String),
    /// Locking the node failed otherwise.
    #[error("locking node {id}")]
    LockNode {
        /// Node id.
        id: String,
        /// The store's error.
        source: StoreError,
    },
    /// A node being deleted cannot be held.
    #[error("node {id} is {state}; it cannot be held")]
    NotHoldable {
        /// Node id.
        id: String,
        /// Its state.
        state: NodeState,
    },
    /// The node's provider could not be built from the configuration.
    #[error("provider {provider} of node {id}: {reason}")]
    NodeProvider {
        /// Provider name.
        provider: String,
        /// Node id.
        id: String,
        /// Why.
        reason: String,
    },
    /// The node has a server in a provider the configuration does not have.
    #[error(
        "provider {provider} of node {id} is not in the configuration; cannot delete its server"
    )]
    NodeProviderUnknown {
        /// Provider name.
        provider: String,
        /// Node id.
        id: String,
    },
    /// Deleting the node's server or record failed.
    #[error("deleting node {id}: {source}")]
    DeleteNode {
        /// Node id.
        id: String,
        /// Why.
        source: crate::launcher::DeleteError,
    },
    /// Writing `deleting` on a node failed (e.g. it changed meanwhile).
    #[error("marking node {id} deleting")]
    MarkNode {
        /// Node id.
        id: String,
        /// The store's error.
        source: StoreError,
    },
    /// Writing `hold` on a node failed.
    #[error("holding node {id}")]
    HoldNode {
        /// Node id.
        id: String,
        /// The store's error.
        source: StoreError,
    },
    /// Writing `deleting` on an upload failed.
    #[error("marking image {upload} for deletion")]
    MarkUpload {
        /// The upload.
        upload: Box<UploadRef>,
        /// The store's error.
        source: StoreError,
    },
    /// Writing `deleting` on a build failed.
    #[error("marking build {build} for deletion")]
    MarkBuild {
        /// The build.
        build: BuildRef,
        /// The store's error.
        source: StoreError,
    },
    /// Deleting an upload directory of the provider failed.
    #[error("erasing {path}")]
    EraseUploads {
        /// The directory.
        path: String,
        /// The store's error.
        source: StoreError,
    },
    /// Deleting a node record of the provider failed.
    #[error("erasing node {id}")]
    EraseNode {
        /// Node id.
        id: String,
        /// The store's error.
        source: StoreError,
    },
    /// An image record to export is not UTF-8.
    #[error("{path}: record is not UTF-8")]
    NotUtf8 {
        /// Its path.
        path: String,
    },
    /// An image data record does not decode.
    #[error("{path}: not {kind} record: {reason}")]
    BadRecord {
        /// Its path.
        path: String,
        /// `a build` or `an upload`.
        kind: &'static str,
        /// The decoding error.
        reason: String,
    },
    /// An upload path whose last part is not a sequence number.
    #[error("{path}: an upload id is a 10-digit sequence number")]
    BadUploadId {
        /// Its path.
        path: String,
    },
    /// A path that is no build, upload or pause record.
    #[error("{path}: not an image build, upload or pause record")]
    NotImageData {
        /// Its path.
        path: String,
    },
    /// Moving an upload directory's sequence counter failed.
    #[error("advancing the upload counter of {path}")]
    AdvanceCounter {
        /// The upload directory.
        path: String,
        /// The store's error.
        source: StoreError,
    },
    /// Removing a record made only to move a sequence counter failed.
    #[error("removing {path}")]
    RemoveCounterRecord {
        /// Its path.
        path: String,
        /// The store's error.
        source: StoreError,
    },
    /// Writing an imported record failed.
    #[error("writing {path}")]
    ImportRecord {
        /// Its path.
        path: String,
        /// The store's error.
        source: StoreError,
    },
}

/// One upload, as the operator names it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UploadRef {
    /// Diskimage name.
    pub image: String,
    /// Build id.
    pub build: String,
    /// Provider name.
    pub provider: String,
    /// Upload id.
    pub upload: String,
}

impl std::fmt::Display for UploadRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "upload {} of {} build {} to {}",
            self.upload, self.image, self.build, self.provider
        )
    }
}

/// One build, as `dib-image-list` names it: `<image>-<build id>`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BuildRef {
    /// Diskimage name.
    pub image: String,
    /// Build id.
    pub build: String,
}

impl BuildRef {
    /// Parses `<image>-<build id>` (build ids have no `-`; image names may).
    pub fn parse(id: &str) -> Result<Self, AdminError> {
        match id.rsplit_once('-') {
            Some((image, build)) => Ok(BuildRef {
                image: image.to_owned(),
                build: build.to_owned(),
            }),
            None => Err(AdminError::NotABuildId(id.to_owned())),
        }
    }
}

impl std::fmt::Display for BuildRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-{}", self.image, self.build)
    }
}

// ----- images ----------------------------------------------------------

/// `image-build IMAGE`: asks the builder to build a configured, unpaused
/// diskimage now, or to make a new snapshot of a snapshot image.
pub async fn request_image_build(
    config: &Config,
    store: &Store,
    image: &str,
) -> Result<(), AdminError> {
    // A snapshot image's new snapshot is asked for the same way.
    let paused = match config.diskimage(image) {
        Some(d) => d.pause,
        None => match crate::planner::images::snapshot_image(config, image) {
            Some((_, si)) => si.pause,
            None => return Err(AdminError::UnknownDiskimage(image.to_owned())),
        },
    };
    if paused {
        return Err(AdminError::DiskimagePaused(image.to_owned()));
    }
    store.request_image_build(image).await?;
    Ok(())
}

/// `image-update PROVIDER IMAGE` (seed 002): asks the builder for a new
/// snapshot of one of the provider's snapshot images now (the build
/// request `image-build` makes; a snapshot is recorded as a build).
pub async fn request_snapshot(
    config: &Config,
    store: &Store,
    provider: &str,
    image: &str,
) -> Result<(), AdminError> {
    let Some(pc) = config.provider(provider) else {
        return Err(AdminError::UnknownProvider(provider.to_owned()));
    };
    let Some(si) = pc.snapshot_image(image) else {
        return Err(AdminError::NotProvidersSnapshotImage {
            provider: provider.to_owned(),
            image: image.to_owned(),
        });
    };
    if si.pause {
        return Err(AdminError::SnapshotImagePaused(image.to_owned()));
    }
    store.request_image_build(image).await?;
    Ok(())
}

/// `image-upload PROVIDER IMAGE`: checks that the provider takes the image
/// and that a ready build exists, then records an upload request (an
/// empty record at `/nodepool/images/<image>/upload-requests/<provider>`,
/// see [`paths::image_upload_request`]) that the builder serves with a
/// fresh upload of the newest ready build. Returns that build's id.
pub async fn request_image_upload(
    config: &Config,
    store: &Store,
    provider: &str,
    image: &str,
) -> Result<String, AdminError> {
    let Some(pc) = config.provider(provider) else {
        return Err(AdminError::UnknownProvider(provider.to_owned()));
    };
    let Some(pd) = pc.diskimage(image) else {
        return Err(AdminError::NotProvidersImage {
            provider: provider.to_owned(),
            image: image.to_owned(),
        });
    };
    if pd.pause {
        return Err(AdminError::PausedForProvider {
            provider: provider.to_owned(),
            image: image.to_owned(),
        });
    }
    let images = store.image_state().await?;
    let newest = images
        .builds
        .iter()
        .filter(|b| b.image == image && b.build.state == BuildState::Ready)
        .max_by(|a, b| a.build.state_time.total_cmp(&b.build.state_time));
    let Some(build) = newest else {
        return Err(AdminError::NoReadyBuild(image.to_owned()));
    };
    store.request_image_upload(image, provider).await?;
    Ok(build.id.clone())
}

/// `image-pause` / `image-unpause`: pauses (or resumes) builds of an image
/// that is configured or has records in the store (an image removed from
/// the configuration).
pub async fn set_image_paused(
    config: &Config,
    store: &Store,
    image: &str,
    paused: bool,
) -> Result<(), AdminError> {
    // A snapshot image has no record before its first snapshot, and may be
    // paused before it (so that the builder makes it only when asked).
    let known = config.diskimage(image).is_some()
        || crate::planner::images::snapshot_image(config, image).is_some()
        || store.image_state().await?.images.contains(image);
    if !known {
        return Err(AdminError::UnknownImage(image.to_owned()));
    }
    store.set_image_paused(image, paused).await?;
    Ok(())
}

/// `image-delete`, first step: the upload, if it exists and is not being
/// uploaded right now.
pub async fn upload_to_delete(
    store: &Store,
    upload: &UploadRef,
) -> Result<Versioned<ImageUpload>, AdminError> {
    let Some(v) = store
        .get_upload(
            &upload.image,
            &upload.build,
            &upload.provider,
            &upload.upload,
        )
        .await?
    else {
        return Err(AdminError::UploadNotFound(Box::new(upload.clone())));
    };
    if v.value.state == UploadState::Uploading {
        return Err(AdminError::UploadInProgress(Box::new(upload.clone())));
    }
    Ok(v)
}

/// `image-delete`, second step: marks the upload read by
/// [`upload_to_delete`] `deleting`; the builder deletes its cloud image and
/// then the record.
pub async fn mark_upload_deleting(
    store: &Store,
    upload: &UploadRef,
    read: Versioned<ImageUpload>,
) -> Result<(), AdminError> {
    let mut record = read.value;
    record.set_state(UploadState::Deleting, epoch_now());
    store
        .update_upload(
            &upload.image,
            &upload.build,
            &upload.provider,
            &upload.upload,
            &record,
            Some(read.version),
        )
        .await
        .map_err(|source| AdminError::MarkUpload {
            upload: Box::new(upload.clone()),
            source,
        })?;
    Ok(())
}

/// `dib-image-delete`, first step: the build, if it exists and is not
/// building.
pub async fn build_to_delete(
    store: &Store,
    build: &BuildRef,
) -> Result<Versioned<ImageBuild>, AdminError> {
    let Some(v) = store.get_build(&build.image, &build.build).await? else {
        return Err(AdminError::BuildNotFound(build.clone()));
    };
    if v.value.state == BuildState::Building {
        return Err(AdminError::StillBuilding(build.clone()));
    }
    Ok(v)
}

/// `dib-image-delete`, second step: marks the build read by
/// [`build_to_delete`] `deleting`; the builder deletes its uploads, files
/// and record.
pub async fn mark_build_deleting(
    store: &Store,
    build: &BuildRef,
    read: Versioned<ImageBuild>,
) -> Result<(), AdminError> {
    let mut record = read.value;
    record.set_state(BuildState::Deleting, epoch_now());
    store
        .update_build(&build.image, &build.build, &record, Some(read.version))
        .await
        .map_err(|source| AdminError::MarkBuild {
            build: build.clone(),
            source,
        })?;
    Ok(())
}

// ----- nodes -----------------------------------------------------------

/// A node record, or [`AdminError::NodeNotFound`].
pub async fn node(store: &Store, id: &str) -> Result<Versioned<Node>, AdminError> {
    store
        .get_node(id)
        .await?
        .ok_or_else(|| AdminError::NodeNotFound(id.to_owned()))
}

/// `delete ID [--now]`: locks the node ([`NODE_LOCK_TIMEOUT`]) and either
/// marks it `deleting` for the launcher, or deletes its server and record
/// now the way the launcher does ([`delete_locked_node`]).
pub async fn delete_node(
    config: &Config,
    store: &Store,
    providers: &ProviderFactory,
    id: &str,
    now: bool,
) -> Result<(), AdminError> {
    let guard = lock_node(store, id).await?;
    guard
        .hold(async |guard: &LockGuard| -> Result<Held<()>, AdminError> {
            let v = node(store, id).await?;
            if now {
                let provider: Option<Arc<dyn Provider>> = match config.provider(&v.value.provider) {
                    Some(pc) => Some(providers(pc).map_err(|reason| AdminError::NodeProvider {
                        provider: v.value.provider.clone(),
                        id: id.to_owned(),
                        reason,
                    })?),
                    None => None,
                };
                if provider.is_none() && v.value.external_id.is_some() {
                    return Err(AdminError::NodeProviderUnknown {
                        provider: v.value.provider.clone(),
                        id: id.to_owned(),
                    });
                }
                delete_locked_node(
                    store,
                    provider.as_deref(),
                    id,
                    guard,
                    DELETE_TIMEOUT,
                    &epoch_now,
                )
                .await
                .map_err(|source| AdminError::DeleteNode {
                    id: id.to_owned(),
                    source,
                })?;
                // The lock directory went with the record.
                return Ok(Held::Removed(()));
            }
            let mut record = v.value;
            record.set_state(NodeState::Deleting, epoch_now());
            store
                .update_node(id, &record, v.version)
                .await
                .map_err(|source| AdminError::MarkNode {
                    id: id.to_owned(),
                    source,
                })?;
            Ok(Held::Kept(()))
        })
        .await
}

/// `hold ID`: locks the node ([`NODE_LOCK_TIMEOUT`]) and sets it `hold`
/// (with the reason as its comment, when given). Nodes being deleted
/// cannot be held.
pub async fn hold_node(store: &Store, id: &str, reason: Option<&str>) -> Result<(), AdminError> {
    let guard = lock_node(store, id).await?;
    guard
        .hold(async |_: &LockGuard| -> Result<Held<()>, AdminError> {
            let v = node(store, id).await?;
            if matches!(v.value.state, NodeState::Deleting | NodeState::Deleted) {
                return Err(AdminError::NotHoldable {
                    id: id.to_owned(),
                    state: v.value.state,
                });
            }
            let mut record = v.value;
            record.set_state(NodeState::Hold, epoch_now());
            if let Some(r) = reason {
                record.comment = Some(r.to_owned());
            }
            store
                .update_node(id, &record, v.version)
                .await
                .map_err(|source| AdminError::HoldNode {
                    id: id.to_owned(),
                    source,
                })?;
            Ok(Held::Kept(()))
        })
        .await
}

async fn lock_node(store: &Store, id: &str) -> Result<LockGuard, AdminError> {
    node(store, id).await?;
    store
        .lock_node(id, LockWait::Timeout(NODE_LOCK_TIMEOUT))
        .await
        .map_err(|e| match e {
            StoreError::Timeout { .. } => AdminError::NodeLocked(id.to_owned()),
            source => AdminError::LockNode {
                id: id.to_owned(),
                source,
            },
        })
}

// ----- leaks -----------------------------------------------------------

/// What a leak search found, and the providers it could not look at.
#[derive(Clone, Debug, PartialEq)]
pub struct Aliens<T> {
    /// What was found, provider by provider in configuration order, each
    /// in listing order.
    pub found: Vec<T>,
    /// One line per provider whose cloud could not be listed.
    pub unlisted: Vec<String>,
}

/// A server that [`leaks::leaked_servers`] finds leaked.
#[derive(Clone, Debug, PartialEq)]
pub struct AlienServer {
    /// Provider name.
    pub provider: String,
    /// Server name.
    pub name: String,
    /// Cloud server id.
    pub external_id: String,
    /// Its public IPv4, else the address to connect to.
    pub ip: Option<String>,
    /// Why it is leaked.
    pub reason: LeakReason,
}

/// An image that [`leaks::alien_images`] finds leaked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AlienImage {
    /// Provider name.
    pub provider: String,
    /// Image name.
    pub name: String,
    /// Cloud image id.
    pub id: String,
}

/// `alien-list`: the servers of every provider (or only `only`) that the
/// launcher's leak rule finds leaked in one listing (the launcher deletes
/// them once a second listing confirms it).
pub async fn alien_servers(
    config: &Config,
    store: &Store,
    providers: &ProviderFactory,
    only: Option<&str>,
) -> Result<Aliens<AlienServer>, AdminError> {
    let wanted = providers_of(config, only)?;
    let nodes = store.list_nodes().await?.records;
    let uploads = store.image_state().await?.uploads;
    let known = KnownNodes::new(&nodes).with_uploads(&uploads);
    let mut out = Aliens {
        found: Vec::new(),
        unlisted: Vec::new(),
    };
    for pc in wanted {
        let instances = match providers(pc) {
            Ok(p) => {
                cloud(
                    format!("listing servers of {}", pc.name),
                    p.list_instances(),
                )
                .await
            }
            Err(e) => Err(format!("provider {}: {e}", pc.name)),
        };
        let instances = match instances {
            Ok(i) => i,
            Err(e) => {
                out.unlisted.push(e);
                continue;
            }
        };
        for leak in leaks::leaked_servers(&pc.name, &instances, &known) {
            let inst = leak.instance;
            out.found.push(AlienServer {
                provider: pc.name.clone(),
                name: inst.name.clone(),
                external_id: inst.external_id.clone(),
                ip: inst.public_ipv4.clone().or(inst.interface_ip.clone()),
                reason: leak.reason,
            });
        }
    }
    Ok(out)
}

/// `alien-image-list`: the images of every provider (or only `only`) that
/// [`leaks::alien_images`] finds leaked.
pub async fn alien_images(
    config: &Config,
    store: &Store,
    providers: &ProviderFactory,
    only: Option<&str>,
) -> Result<Aliens<AlienImage>, AdminError> {
    let wanted = providers_of(config, only)?;
    let state = store.image_state().await?;
    let mut out = Aliens {
        found: Vec::new(),
        unlisted: Vec::new(),
    };
    for pc in wanted {
        let images = match providers(pc) {
            Ok(p) => cloud(format!("listing images of {}", pc.name), p.list_images()).await,
            Err(e) => Err(format!("provider {}: {e}", pc.name)),
        };
        let images = match images {
            Ok(i) => i,
            Err(e) => {
                out.unlisted.push(e);
                continue;
            }
        };
        for img in leaks::alien_images(pc, &images, &state.uploads) {
            out.found.push(AlienImage {
                provider: pc.name.clone(),
                name: img.name.clone(),
                id: img.id.clone(),
            });
        }
    }
    Ok(out)
}

// ----- explain -----------------------------------------------------------

/// `request-explain ID`: the planner's answer for one request
/// ([`explain_request`](crate::planner::explain::explain_request)) on the
/// store as it is now, with every provider's limits, flavors, cloud
/// images and servers asked of its cloud as a launcher would. A cloud that
/// cannot be asked is named in `unlisted` and taken as unlimited, with
/// flavors unknown.
pub async fn explain_request(
    config: &Config,
    store: &Store,
    providers: &ProviderFactory,
    id: &str,
) -> Result<Aliens<crate::planner::explain::RequestExplanation>, AdminError> {
    let snapshot = crate::launcher::read_snapshot(store).await?;
    if !snapshot.requests.iter().any(|r| r.id == id) {
        return Err(AdminError::RequestNotFound(id.to_owned()));
    }
    let (snapshot, unlisted) = with_provider_views(snapshot, config, providers).await;
    let found = crate::planner::explain::explain_request(&snapshot, config, epoch_now(), id)
        .into_iter()
        .collect();
    Ok(Aliens { found, unlisted })
}

/// Why every request that is neither fulfilled nor failed waits, one line
/// each (`nodepool request-list --detail`): the planner's view is built
/// once for all of them, from the store and the clouds asked now.
pub async fn explain_waiting(
    config: &Config,
    store: &Store,
    providers: &ProviderFactory,
) -> Result<Aliens<(String, String)>, AdminError> {
    let snapshot = crate::launcher::read_snapshot(store).await?;
    let (snapshot, unlisted) = with_provider_views(snapshot, config, providers).await;
    let found = crate::planner::explain::explain_waiting(&snapshot, config, epoch_now());
    Ok(Aliens { found, unlisted })
}

/// A label's min-ready standing (`nodepool label-list --detail`).
#[derive(Clone, Debug, PartialEq)]
pub struct LabelReadiness {
    /// Label name.
    pub label: String,
    /// Its `min-ready`.
    pub min_ready: u32,
    /// Its ready nodes no request holds.
    pub ready: usize,
    /// Why it has fewer ready nodes than `min-ready`; `None` when it has
    /// enough.
    pub short_because: Option<String>,
}

/// Every configured label's min-ready standing: for a label short of its
/// `min-ready`, the planner's one line on the min-ready request that
/// would fill it (as `request-explain` says it), or why there is none.
pub async fn label_readiness(
    config: &Config,
    store: &Store,
    providers: &ProviderFactory,
) -> Result<Aliens<LabelReadiness>, AdminError> {
    use crate::model::{MIN_READY_REQUESTOR, NodeState};
    let snapshot = crate::launcher::read_snapshot(store).await?;
    let (snapshot, unlisted) = with_provider_views(snapshot, config, providers).await;
    let why: BTreeMap<String, String> =
        crate::planner::explain::explain_waiting(&snapshot, config, epoch_now())
            .into_iter()
            .collect();
    let found = config
        .labels
        .iter()
        .map(|l| {
            let ready = snapshot
                .nodes
                .iter()
                .filter(|n| {
                    n.node.state == NodeState::Ready
                        && n.node.allocated_to.is_none()
                        && n.node.has_label(&l.name)
                })
                .count();
            let served = config
                .providers
                .iter()
                .any(|p| p.pools.iter().any(|pool| pool.label(&l.name).is_some()));
            let short_because = (ready < l.min_ready as usize).then(|| {
                if !served {
                    return "no pool in the configuration serves it".to_owned();
                }
                snapshot
                    .requests
                    .iter()
                    .filter(|r| {
                        r.request.requestor.as_deref() == Some(MIN_READY_REQUESTOR)
                            && r.request.node_types.contains(&l.name)
                    })
                    .find_map(|r| why.get(&r.id).cloned())
                    .unwrap_or_else(|| {
                        "no min-ready request waits for it yet: a launcher serving it makes one on its next pass".to_owned()
                    })
            });
            LabelReadiness {
                label: l.name.clone(),
                min_ready: l.min_ready,
                ready,
                short_because,
            }
        })
        .collect();
    Ok(Aliens { found, unlisted })
}

/// The snapshot with what a launcher's observer would know of each
/// cloud; the clouds that could not be asked are returned as errors.
async fn with_provider_views(
    mut snapshot: crate::planner::Snapshot,
    config: &Config,
    providers: &ProviderFactory,
) -> (crate::planner::Snapshot, Vec<String>) {
    let mut unlisted = Vec::new();
    for pc in &config.providers {
        match provider_view(pc, providers, &snapshot.nodes).await {
            Ok(view) => {
                snapshot.providers.insert(pc.name.clone(), view);
            }
            Err(e) => unlisted.push(e),
        }
    }
    (snapshot, unlisted)
}

/// What a launcher's observer knows of one cloud, asked now.
async fn provider_view(
    pc: &ProviderConfig,
    providers: &ProviderFactory,
    nodes: &[crate::store::NodeRecord],
) -> Result<crate::planner::ProviderView, String> {
    let p = providers(pc).map_err(|e| format!("provider {}: {e}", pc.name))?;
    let mut view = crate::planner::ProviderView {
        limits: cloud(format!("quota of {}", pc.name), p.quota_limits()).await?,
        ..Default::default()
    };
    for pool in &pc.pools {
        for label in &pool.labels {
            let r = cloud(
                format!(
                    "flavor of label {} in {}/{}",
                    label.name, pc.name, pool.name
                ),
                p.label_resources(label),
            )
            .await?;
            view.label_resources
                .entry(pool.name.clone())
                .or_default()
                .insert(label.name.clone(), r);
        }
    }
    let wanted = crate::launcher::wanted_cloud_images(pc);
    if !wanted.is_empty() {
        let images = cloud(format!("images of {}", pc.name), p.list_images()).await?;
        view.missing_cloud_images = crate::launcher::missing_cloud_images(&wanted, &images);
    }
    let servers = cloud(format!("servers of {}", pc.name), p.list_instances()).await?;
    let (unmanaged, total) = crate::launcher::cloud_usage(&pc.name, &servers, nodes);
    view.unmanaged = unmanaged;
    view.reported_usage = Some(total);
    Ok(view)
}

/// One cloud call, bounded by [`CLOUD_CALL_TIMEOUT`]; a failure is one
/// line saying what was asked.
async fn cloud<T>(
    what: String,
    f: impl std::future::Future<Output = Result<T, ProviderError>>,
) -> Result<T, String> {
    match tokio::time::timeout(CLOUD_CALL_TIMEOUT, f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(format!("{what}: {e}")),
        Err(_) => Err(format!("{what}: no answer within {CLOUD_CALL_TIMEOUT:?}")),
    }
}

fn providers_of<'c>(
    config: &'c Config,
    only: Option<&str>,
) -> Result<Vec<&'c ProviderConfig>, AdminError> {
    if let Some(p) = only
        && config.provider(p).is_none()
    {
        return Err(AdminError::UnknownProvider(p.to_owned()));
    }
    Ok(config
        .providers
        .iter()
        .filter(|p| only.is_none_or(|o| o == p.name))
        .collect())
}

// ----- a provider's records ---------------------------------------------

/// A provider's records in the store (`info`, `erase`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ProviderData {
    /// Its upload directories, `/nodepool/images/<image>/builds/<build>/providers/<provider>`.
    pub upload_dirs: Vec<UploadDir>,
    /// Its nodes: id and server id.
    pub nodes: Vec<(String, Option<String>)>,
}

/// An upload directory of a provider.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UploadDir {
    /// Its path.
    pub path: String,
    /// Diskimage name.
    pub image: String,
    /// Build id.
    pub build: String,
}

impl ProviderData {
    /// Upload ids by (image, build), sorted; builds with an upload
    /// directory but no upload are listed too, as Nodepool does.
    pub fn uploads_by_build(
        &self,
        provider: &str,
        state: &ImageState,
    ) -> BTreeMap<(String, String), Vec<String>> {
        let mut out: BTreeMap<(String, String), Vec<String>> = BTreeMap::new();
        for dir in &self.upload_dirs {
            out.entry((dir.image.clone(), dir.build.clone()))
                .or_default();
        }
        for u in state.uploads.iter().filter(|u| u.provider == provider) {
            out.entry((u.image.clone(), u.build_id.clone()))
                .or_default()
                .push(u.id.clone());
        }
        for ids in out.values_mut() {
            ids.sort();
        }
        out
    }
}

/// A provider's upload directories and nodes.
pub async fn provider_data(store: &Store, provider: &str) -> Result<ProviderData, AdminError> {
    let entries = match store.backend().scan(paths::IMAGES).await {
        Ok(e) => e,
        Err(e) if e.is_not_found() => Vec::new(),
        Err(e) => return Err(e.into()),
    };
    let mut upload_dirs = Vec::new();
    for e in &entries {
        let Some(rest) = e.path.strip_prefix("/nodepool/images/") else {
            continue;
        };
        if let [image, "builds", build, "providers", p] =
            rest.split('/').collect::<Vec<_>>().as_slice()
            && *p == provider
        {
            upload_dirs.push(UploadDir {
                path: e.path.clone(),
                image: (*image).to_owned(),
                build: (*build).to_owned(),
            });
        }
    }
    let nodes = store
        .list_nodes()
        .await?
        .records
        .into_iter()
        .filter(|r| r.node.provider == provider)
        .map(|r| (r.id, r.node.external_id.clone()))
        .collect();
    Ok(ProviderData { upload_dirs, nodes })
}

/// `erase`, first half: deletes the provider's upload directories (records
/// and all below them).
pub async fn erase_uploads(store: &Store, data: &ProviderData) -> Result<(), AdminError> {
    for dir in &data.upload_dirs {
        store
            .backend()
            .delete_tree(&dir.path)
            .await
            .map_err(|source| AdminError::EraseUploads {
                path: dir.path.clone(),
                source,
            })?;
    }
    Ok(())
}

/// `erase`, second half: deletes the provider's node records.
pub async fn erase_nodes(store: &Store, data: &ProviderData) -> Result<(), AdminError> {
    for (id, _) in &data.nodes {
        store
            .delete_node(id)
            .await
            .map_err(|source| AdminError::EraseNode {
                id: id.clone(),
                source,
            })?;
    }
    Ok(())
}

// ----- image data --------------------------------------------------------

/// An image data export: `{path: record JSON text}` for every build,
/// upload and pause flag (`""`), as Python Nodepool exports.
pub type ImageData = BTreeMap<String, String>;

/// `export-image-data`: every build, upload and pause flag.
pub async fn export_image_data(store: &Store) -> Result<ImageData, AdminError> {
    let entries = match store.backend().scan(paths::IMAGES).await {
        Ok(e) => e,
        Err(e) if e.is_not_found() => Vec::new(),
        Err(e) => return Err(e.into()),
    };
    let mut out = BTreeMap::new();
    for e in entries {
        match classify_image_path(&e.path) {
            ImagePath::Pause(_) => {
                out.insert(e.path.clone(), String::new());
            }
            ImagePath::Build(..) | ImagePath::Upload(..) => {
                let text = String::from_utf8(e.data.to_vec()).map_err(|_| AdminError::NotUtf8 {
                    path: e.path.clone(),
                })?;
                out.insert(e.path.clone(), text);
            }
            _ => {}
        }
    }
    Ok(out)
}

/// Checks an export before anything is written: every path must be a
/// pause flag, a build or an upload (with a sequence number as its id),
/// and every record must decode.
pub fn check_image_data(data: &ImageData) -> Result<(), AdminError> {
    for (path, text) in data {
        match classify_image_path(path) {
            ImagePath::Pause(_) => {}
            ImagePath::Build(..) => {
                ImageBuild::from_json(text.as_bytes()).map_err(|e| AdminError::BadRecord {
                    path: path.clone(),
                    kind: "a build",
                    reason: e.to_string(),
                })?;
            }
            ImagePath::Upload(..) => {
                ImageUpload::from_json(text.as_bytes()).map_err(|e| AdminError::BadRecord {
                    path: path.clone(),
                    kind: "an upload",
                    reason: e.to_string(),
                })?;
                let (_, seq) = split_path(path);
                if seq.len() != 10 || !seq.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(AdminError::BadUploadId { path: path.clone() });
                }
            }
            _ => return Err(AdminError::NotImageData { path: path.clone() }),
        }
    }
    Ok(())
}

/// `import-image-data`: checks ([`check_image_data`]), then writes every
/// record of an export, overwriting records at the same paths. Upload ids
/// are sequence numbers, so first each upload directory's counter is moved
/// past the highest imported id (by creating and deleting sequential
/// children, as Nodepool does); otherwise the builder's next upload could
/// collide with an imported one.
pub async fn import_image_data(store: &Store, data: &ImageData) -> Result<(), AdminError> {
    check_image_data(data)?;
    let backend = store.backend();
    let mut highest: BTreeMap<&str, i64> = BTreeMap::new();
    for path in data.keys() {
        if let ImagePath::Upload(..) = classify_image_path(path) {
            let (dir, seq) = split_path(path);
            let n: i64 = seq.parse().unwrap_or(0);
            let h = highest.entry(dir).or_insert(n);
            *h = (*h).max(n);
        }
    }
    for (dir, top) in highest {
        // Bounded: each create advances the counter by at least one.
        for _ in 0..=top {
            let created = backend
                .create(&format!("{dir}/"), b"", CreateMode::PersistentSequential)
                .await
                .map_err(|source| AdminError::AdvanceCounter {
                    path: dir.to_owned(),
                    source,
                })?;
            let (_, seq) = split_path(&created);
            let n: i64 = seq.parse().unwrap_or(i64::MAX);
            if !data.contains_key(&created) {
                backend.delete(&created, None).await.map_err(|source| {
                    AdminError::RemoveCounterRecord {
                        path: created.clone(),
                        source,
                    }
                })?;
            }
            if n >= top {
                break;
            }
        }
    }
    for (path, text) in data {
        let bytes = text.as_bytes();
        let written = match backend.create(path, bytes, CreateMode::Persistent).await {
            Ok(_) => Ok(()),
            Err(StoreError::Conflict { .. }) => backend.set(path, bytes, None).await.map(|_| ()),
            Err(e) => Err(e),
        };
        written.map_err(|source| AdminError::ImportRecord {
            path: path.clone(),
            source,
        })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn build_ids_split_at_the_last_dash() {
        let b = BuildRef::parse("ubuntu-jammy-0123abcd").expect("parses");
        assert_eq!(
            (b.image.as_str(), b.build.as_str()),
            ("ubuntu-jammy", "0123abcd")
        );
        assert_eq!(b.to_string(), "ubuntu-jammy-0123abcd");
        assert_eq!(
            BuildRef::parse("nodash").map_err(|e| e.to_string()),
            Err(
                "\"nodash\" is not a dib image id (<image>-<build id>, as dib-image-list shows)"
                    .to_owned()
            )
        );
    }

    #[test]
    fn image_data_is_checked_before_anything_is_written() {
        let build = ImageBuild::new(1.0, vec!["qcow2".into()]).to_json();
        let upload = ImageUpload::new(1.0, None).to_json();
        let text = |b: &[u8]| String::from_utf8(b.to_vec()).expect("utf-8");
        let good: ImageData = [
            ("/nodepool/images/deb/pause".to_owned(), String::new()),
            ("/nodepool/images/deb/builds/b1".to_owned(), text(&build)),
            (
                "/nodepool/images/deb/builds/b1/providers/p1/images/0000000003".to_owned(),
                text(&upload),
            ),
        ]
        .into();
        assert!(check_image_data(&good).is_ok());
        let problem = |path: &str, record: &str| {
            let mut d = good.clone();
            d.insert(path.to_owned(), record.to_owned());
            check_image_data(&d).map_err(|e| e.to_string()).err()
        };
        assert_eq!(
            problem("/nodepool/nodes/0000000001", "{}").as_deref(),
            Some("/nodepool/nodes/0000000001: not an image build, upload or pause record")
        );
        assert_eq!(
            problem(
                "/nodepool/images/deb/builds/b1/providers/p1/images/7",
                &text(&upload)
            )
            .as_deref(),
            Some(
                "/nodepool/images/deb/builds/b1/providers/p1/images/7: an upload id is a 10-digit sequence number"
            )
        );
        let bad_build = problem("/nodepool/images/deb/builds/b2", "[]").unwrap_or_default();
        assert!(
            bad_build.starts_with("/nodepool/images/deb/builds/b2: not a build record: "),
            "{bad_build}"
        );
    }
}
