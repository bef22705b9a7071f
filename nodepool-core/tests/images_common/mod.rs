//! A small model of the builder's world for image planner tests: store
//! records, local files, planning, and applying a plan the way the builder
//! runtime would (builds and uploads finish when told).

#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};

use nodepool_core::config::Config;
use nodepool_core::model::{BuildState, ImageBuild, ImageUpload, UploadState};
use nodepool_core::planner::images::{
    BuilderLocal, ImageAction, ImagePlan, ImageSnapshot, plan_images,
};
use nodepool_core::store::{BuildRecord, UploadRecord};

/// Our builder's id.
pub const ME: &str = "11111111-1111-1111-1111-111111111111";

/// A modelled builder and store.
#[derive(Clone, Debug)]
pub struct ImageWorld {
    pub config: Config,
    pub snapshot: ImageSnapshot,
    pub local: BuilderLocal,
    pub now: f64,
    next_build: u64,
    next_upload: u64,
}

impl ImageWorld {
    pub fn new(yaml: &str) -> Self {
        let config = match Config::from_yaml(yaml) {
            Ok(c) => c,
            Err(e) => panic!("test config is invalid: {e}\n{yaml}"),
        };
        ImageWorld {
            config,
            snapshot: ImageSnapshot::default(),
            local: BuilderLocal {
                builder_id: ME.into(),
                ..BuilderLocal::default()
            },
            now: 1_800_000_000.0,
            next_build: 0,
            next_upload: 0,
        }
    }

    pub fn plan(&self) -> ImagePlan {
        plan_images(&self.snapshot, &self.config, self.now, &self.local)
    }

    /// A build id like the runtime's (32 hex digits), in creation order.
    pub fn new_build_id(&mut self) -> String {
        self.next_build += 1;
        format!("{:032x}", self.next_build)
    }

    /// Adds a build of ours in `state` at `t` with `formats`, with local
    /// files of those formats when ready.
    pub fn add_build(
        &mut self,
        image: &str,
        state: BuildState,
        t: f64,
        formats: &[&str],
    ) -> String {
        let id = self.new_build_id();
        let mut b = ImageBuild::new(t, formats.iter().map(|f| f.to_string()).collect());
        b.set_state(state, t);
        b.builder_id = Some(ME.into());
        self.snapshot.images.builds.push(BuildRecord {
            image: image.into(),
            id: id.clone(),
            build: b,
            version: 1,
            locked: false,
        });
        if state == BuildState::Ready {
            self.snapshot.local_files.insert(
                (image.into(), id.clone()),
                formats.iter().map(|f| f.to_string()).collect(),
            );
        }
        id
    }

    /// Adds an upload record.
    pub fn add_upload(
        &mut self,
        image: &str,
        build: &str,
        provider: &str,
        state: UploadState,
        t: f64,
    ) -> String {
        self.next_upload += 1;
        let id = format!("{:010}", self.next_upload);
        let mut u = ImageUpload::new(t, Some("qcow2".into()));
        u.set_state(state, t);
        if state != UploadState::Uploading {
            u.external_id = Some(format!("ext-{id}"));
        }
        self.snapshot.images.uploads.push(UploadRecord {
            image: image.into(),
            build_id: build.into(),
            provider: provider.into(),
            id: id.clone(),
            upload: u,
            version: 1,
            locked: false,
            uploads_locked: false,
        });
        id
    }

    pub fn build(&self, image: &str, id: &str) -> Option<&BuildRecord> {
        self.snapshot
            .images
            .builds
            .iter()
            .find(|b| b.image == image && b.id == id)
    }

    pub fn build_mut(&mut self, image: &str, id: &str) -> &mut BuildRecord {
        self.snapshot
            .images
            .builds
            .iter_mut()
            .find(|b| b.image == image && b.id == id)
            .unwrap_or_else(|| panic!("no build {image}/{id}"))
    }

    pub fn upload_mut(&mut self, id: &str) -> &mut UploadRecord {
        self.snapshot
            .images
            .uploads
            .iter_mut()
            .find(|u| u.id == id)
            .unwrap_or_else(|| panic!("no upload {id}"))
    }

    pub fn has_upload(&self, id: &str) -> bool {
        self.snapshot.images.uploads.iter().any(|u| u.id == id)
    }

    /// Applies a plan as the runtime would if every action succeeded at
    /// once: builds end ready (with files), uploads end ready, deletions
    /// complete.
    pub fn apply(&mut self, plan: &ImagePlan) {
        let now = self.now;
        for a in &plan.actions {
            match a {
                ImageAction::Build {
                    image,
                    formats,
                    requested,
                    ..
                } => {
                    let f: Vec<&str> = formats.iter().map(String::as_str).collect();
                    self.add_build(image, BuildState::Ready, now, &f);
                    if *requested {
                        self.snapshot.images.build_requests.remove(image);
                    }
                }
                ImageAction::Snapshot {
                    image,
                    provider,
                    requested,
                    ..
                } => {
                    let b = self.add_build(image, BuildState::Ready, now, &[]);
                    self.add_upload(image, &b, provider, UploadState::Ready, now);
                    if *requested {
                        self.snapshot.images.build_requests.remove(image);
                    }
                }
                ImageAction::Upload {
                    image,
                    build,
                    provider,
                    requested,
                    ..
                } => {
                    self.add_upload(image, build, provider, UploadState::Ready, now);
                    if *requested {
                        self.snapshot
                            .images
                            .upload_requests
                            .remove(&(image.clone(), provider.clone()));
                    }
                }
                ImageAction::DeleteUpload { upload, build, .. }
                | ImageAction::RemoveDeadUpload { upload, build, .. } => {
                    let (u, b) = (upload.clone(), build.clone());
                    self.snapshot
                        .images
                        .uploads
                        .retain(|x| !(x.id == u && x.build_id == b));
                }
                ImageAction::MarkDeadBuild { image, build }
                | ImageAction::MarkBuildDeleting { image, build, .. } => {
                    self.build_mut(image, build)
                        .build
                        .set_state(BuildState::Deleting, now);
                }
                ImageAction::RemoveBuild { image, build, .. } => {
                    let (i, b) = (image.clone(), build.clone());
                    self.snapshot
                        .images
                        .builds
                        .retain(|x| !(x.image == i && x.id == b));
                    self.snapshot.local_files.remove(&(i, b));
                }
                ImageAction::DeleteLocalFiles {
                    image,
                    build,
                    formats,
                    ..
                } => {
                    let key = (image.clone(), build.clone());
                    match formats {
                        None => {
                            self.snapshot.local_files.remove(&key);
                        }
                        Some(fs) => {
                            if let Some(have) = self.snapshot.local_files.get_mut(&key) {
                                for f in fs {
                                    have.remove(f);
                                }
                            }
                        }
                    }
                }
                ImageAction::ClearUploadRequest {
                    image, provider, ..
                } => {
                    self.snapshot
                        .images
                        .upload_requests
                        .remove(&(image.clone(), provider.clone()));
                }
                ImageAction::DeleteLeakedImage {
                    provider,
                    external_id,
                } => {
                    if let Some(list) = self.snapshot.cloud_images.get_mut(provider) {
                        list.retain(|i| &i.id != external_id);
                    }
                }
            }
        }
        self.local.leak_suspects = plan.leak_suspects.clone();
    }

    /// Plans and applies until nothing is left to do (or `max` rounds);
    /// returns the number of rounds that did something.
    pub fn settle(&mut self, max: usize) -> usize {
        for round in 0..max {
            let p = self.plan();
            if p.actions.is_empty() {
                return round;
            }
            self.apply(&p);
        }
        panic!("not settled after {max} rounds: {:#?}", self.plan());
    }
}

/// The builds a plan builds.
pub fn builds(plan: &ImagePlan) -> Vec<&str> {
    plan.actions
        .iter()
        .filter_map(|a| match a {
            ImageAction::Build { image, .. } => Some(image.as_str()),
            _ => None,
        })
        .collect()
}

/// The uploads a plan starts, as (image, build, provider).
pub fn uploads(plan: &ImagePlan) -> Vec<(&str, &str, &str)> {
    plan.actions
        .iter()
        .filter_map(|a| match a {
            ImageAction::Upload {
                image,
                build,
                provider,
                ..
            } => Some((image.as_str(), build.as_str(), provider.as_str())),
            _ => None,
        })
        .collect()
}

/// Upload ids a plan deletes (any way).
pub fn deleted_uploads(plan: &ImagePlan) -> BTreeSet<&str> {
    plan.actions
        .iter()
        .filter_map(|a| match a {
            ImageAction::DeleteUpload { upload, .. }
            | ImageAction::RemoveDeadUpload { upload, .. } => Some(upload.as_str()),
            _ => None,
        })
        .collect()
}

/// Builds a plan deletes or starts deleting, as (image, build).
pub fn deleted_builds(plan: &ImagePlan) -> BTreeSet<(&str, &str)> {
    plan.actions
        .iter()
        .filter_map(|a| match a {
            ImageAction::MarkDeadBuild { image, build }
            | ImageAction::MarkBuildDeleting { image, build, .. }
            | ImageAction::RemoveBuild { image, build, .. } => {
                Some((image.as_str(), build.as_str()))
            }
            ImageAction::DeleteLocalFiles {
                image,
                build,
                formats: None,
                ..
            } => Some((image.as_str(), build.as_str())),
            _ => None,
        })
        .collect()
}

/// Files per build, for tests that set them by hand.
pub fn files(formats: &[&str]) -> BTreeSet<String> {
    formats
        .iter()
        .map(|f| f.to_string())
        .collect::<BTreeSet<_>>()
}

/// Lets a test name the build map type.
pub type Files = BTreeMap<(String, String), BTreeSet<String>>;
