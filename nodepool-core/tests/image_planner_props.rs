//! Property tests of the builder's planner over generated image histories.

mod images_common;

use std::collections::{BTreeMap, BTreeSet};

use images_common::*;
use nodepool_core::model::{BuildState, UploadState};
use nodepool_core::planner::images::{ImageAction, ImagePlan};
use proptest::prelude::*;

const IMAGES: [&str; 2] = ["deb", "cent"];
const PROVIDERS: [&str; 3] = ["p1", "p2", "p3"];

#[derive(Clone, Debug)]
struct ProviderSpec {
    /// Per image: not listed, listed, listed and paused.
    images: [u8; 2],
    disabled: bool,
    raw: bool,
}

#[derive(Clone, Debug)]
struct UploadSpec {
    provider: usize,
    state: UploadState,
    age: f64,
    locked: bool,
    uploads_locked: bool,
    external_id: bool,
}

#[derive(Clone, Debug)]
struct BuildSpec {
    image: usize, // 2 = "old", an image no longer configured
    state: BuildState,
    age: f64,
    raw: bool,
    files: bool,
    ours: bool,
    locked: bool,
    uploads: Vec<UploadSpec>,
}

#[derive(Clone, Debug)]
struct Spec {
    config_pause: [bool; 2],
    store_pause: [bool; 2],
    requested: [bool; 2],
    build_locked: [bool; 2],
    upload_requests: Vec<(usize, usize)>,
    delete_after_upload: bool,
    providers: Vec<ProviderSpec>,
    builds: Vec<BuildSpec>,
}

fn upload_state() -> impl Strategy<Value = UploadState> {
    prop_oneof![
        6 => Just(UploadState::Ready),
        1 => Just(UploadState::Uploading),
        1 => Just(UploadState::Failed),
        1 => Just(UploadState::Deleting),
    ]
}

fn build_state() -> impl Strategy<Value = BuildState> {
    prop_oneof![
        6 => Just(BuildState::Ready),
        1 => Just(BuildState::Building),
        1 => Just(BuildState::Failed),
        1 => Just(BuildState::Deleting),
    ]
}

fn upload_spec() -> impl Strategy<Value = UploadSpec> {
    (
        0..PROVIDERS.len() + 1, // the last one is a provider not configured
        upload_state(),
        0.0..200_000.0f64,
        prop::bool::weighted(0.1),
        prop::bool::weighted(0.2),
        prop::bool::weighted(0.95),
    )
        .prop_map(
            |(provider, state, age, locked, uploads_locked, external_id)| UploadSpec {
                provider,
                state,
                age,
                locked,
                uploads_locked,
                external_id,
            },
        )
}

fn build_spec() -> impl Strategy<Value = BuildSpec> {
    (
        prop_oneof![4 => 0..2usize, 1 => Just(2usize)],
        build_state(),
        0.0..200_000.0f64,
        prop::bool::weighted(0.3),
        prop::bool::weighted(0.8),
        prop::bool::weighted(0.8),
        prop::bool::weighted(0.1),
        prop::collection::vec(upload_spec(), 0..5),
    )
        .prop_map(
            |(image, state, age, raw, files, ours, locked, uploads)| BuildSpec {
                image,
                state,
                age,
                raw,
                files,
                ours,
                locked,
                uploads,
            },
        )
}

fn provider_spec() -> impl Strategy<Value = ProviderSpec> {
    (
        [0u8..3, 0u8..3],
        prop::bool::weighted(0.2),
        prop::bool::weighted(0.3),
    )
        .prop_map(|(images, disabled, raw)| ProviderSpec {
            images,
            disabled,
            raw,
        })
}

fn bools2(p: f64) -> impl Strategy<Value = [bool; 2]> {
    [prop::bool::weighted(p), prop::bool::weighted(p)]
}

fn spec() -> impl Strategy<Value = Spec> {
    (
        bools2(0.15),
        bools2(0.15),
        bools2(0.2),
        bools2(0.1),
        prop::collection::vec((0..2usize, 0..PROVIDERS.len() + 1), 0..3),
        prop::bool::weighted(0.3),
        prop::collection::vec(provider_spec(), 3),
        prop::collection::vec(build_spec(), 0..12),
    )
        .prop_map(
            |(
                config_pause,
                store_pause,
                requested,
                build_locked,
                upload_requests,
                delete_after_upload,
                providers,
                builds,
            )| Spec {
                config_pause,
                store_pause,
                requested,
                build_locked,
                upload_requests,
                delete_after_upload,
                providers,
                builds,
            },
        )
}

fn provider_name(i: usize) -> &'static str {
    PROVIDERS.get(i).copied().unwrap_or("retired")
}

fn world(spec: &Spec) -> ImageWorld {
    let mut y = String::from("labels:\n  - name: small\ndiskimages:\n");
    for (i, name) in IMAGES.iter().enumerate() {
        y += &format!(
            "  - name: {name}\n    pause: {}\n    delete-after-upload: {}\n    keep-formats: [raw]\n",
            spec.config_pause[i], spec.delete_after_upload
        );
    }
    y += "providers:\n";
    for (pi, p) in spec.providers.iter().enumerate() {
        y += &format!(
            "  - name: {}\n    driver: simulated\n    diskimages:\n",
            PROVIDERS[pi]
        );
        let mut listed = 0;
        for (ii, how) in p.images.iter().enumerate() {
            if *how > 0 {
                listed += 1;
                y += &format!("      - {{name: {}, pause: {}}}\n", IMAGES[ii], *how == 2);
            }
        }
        if listed == 0 {
            y = y.trim_end_matches("    diskimages:\n").to_owned() + "\n";
        }
        y += &format!(
            "    pools:\n      - name: main\n        max-servers: {}\n",
            if p.disabled { -1 } else { 5 }
        );
    }
    let mut w = ImageWorld::new(&y);
    for (pi, p) in spec.providers.iter().enumerate() {
        if p.raw {
            w.config.providers[pi].image_format = Some("raw".into());
        }
    }
    let now = w.now;
    for (i, b) in spec.builds.iter().enumerate() {
        let image = IMAGES.get(b.image).copied().unwrap_or("old");
        let formats: Vec<&str> = if b.raw {
            vec!["qcow2", "raw"]
        } else {
            vec!["qcow2"]
        };
        // Distinct times, so "newest" is never a tie between builds.
        let t = now - b.age - i as f64 * 1e-3;
        let id = w.add_build(image, b.state, t, &formats);
        {
            let rec = w.build_mut(image, &id);
            rec.locked = b.locked;
            if !b.ours {
                rec.build.builder_id = Some("another-builder".into());
            }
        }
        if !b.files {
            w.snapshot
                .local_files
                .remove(&(image.to_owned(), id.clone()));
        }
        for (j, u) in b.uploads.iter().enumerate() {
            let ut = (t + 10.0).max(now - u.age) - j as f64 * 1e-6;
            let uid = w.add_upload(image, &id, provider_name(u.provider), u.state, ut);
            let rec = w.upload_mut(&uid);
            rec.locked = u.locked;
            rec.uploads_locked = u.uploads_locked;
            if !u.external_id {
                rec.upload.external_id = None;
            }
        }
    }
    for (i, name) in IMAGES.iter().enumerate() {
        if spec.store_pause[i] {
            w.snapshot.images.paused.insert((*name).into());
        }
        if spec.requested[i] {
            w.snapshot
                .images
                .build_requests
                .insert((*name).into(), now - 30.0);
        }
        if spec.build_locked[i] {
            w.snapshot.images.build_locked.insert((*name).into());
        }
    }
    for (i, p) in &spec.upload_requests {
        w.snapshot
            .images
            .upload_requests
            .insert((IMAGES[*i].into(), provider_name(*p).into()), now - 20.0);
    }
    w
}

/// The current and previous ready build of each configured image (newest
/// by the time they became ready), computed here independently.
fn protected_builds(w: &ImageWorld) -> BTreeSet<(String, String)> {
    let mut out = BTreeSet::new();
    for d in &w.config.diskimages {
        let mut ready: Vec<_> = w
            .snapshot
            .images
            .builds
            .iter()
            .filter(|b| b.image == d.name && b.build.state == BuildState::Ready)
            .collect();
        ready.sort_by(|a, b| b.build.state_time.total_cmp(&a.build.state_time));
        for b in ready.into_iter().take(2) {
            out.insert((b.image.clone(), b.id.clone()));
        }
    }
    out
}

/// The image a launcher boots (the newest usable upload) and the one it
/// falls back to (the newest usable upload of another build), per
/// provider that lists the image (a provider whose every pool is disabled
/// keeps its images too).
fn protected_uploads(w: &ImageWorld) -> BTreeSet<String> {
    let ready: BTreeSet<(&str, &str)> = w
        .snapshot
        .images
        .builds
        .iter()
        .filter(|b| b.build.state == BuildState::Ready)
        .map(|b| (b.image.as_str(), b.id.as_str()))
        .collect();
    let mut out = BTreeSet::new();
    for p in &w.config.providers {
        for d in &p.diskimages {
            let mut ups: Vec<_> = w
                .snapshot
                .images
                .uploads
                .iter()
                .filter(|u| {
                    u.image == d.name
                        && u.provider == p.name
                        && u.upload.state == UploadState::Ready
                        && u.upload.external_id.is_some()
                        && ready.contains(&(u.image.as_str(), u.build_id.as_str()))
                })
                .collect();
            ups.sort_by(|a, b| b.upload.state_time.total_cmp(&a.upload.state_time));
            let Some(current) = ups.first() else { continue };
            out.insert(current.id.clone() + "@" + &current.build_id);
            if let Some(prev) = ups.iter().find(|u| u.build_id != current.build_id) {
                out.insert(prev.id.clone() + "@" + &prev.build_id);
            }
        }
    }
    out
}

fn deleted_upload_keys(plan: &ImagePlan) -> BTreeSet<String> {
    plan.actions
        .iter()
        .filter_map(|a| match a {
            ImageAction::DeleteUpload { upload, build, .. }
            | ImageAction::RemoveDeadUpload { upload, build, .. } => {
                Some(upload.clone() + "@" + build)
            }
            _ => None,
        })
        .collect()
}

fn owned_builds(plan: &ImagePlan) -> BTreeSet<(String, String)> {
    deleted_builds(plan)
        .into_iter()
        .map(|(i, b)| (i.to_owned(), b.to_owned()))
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 512,
        failure_persistence: Some(Box::new(prop::test_runner::FileFailurePersistence::Direct(
            "proptest-regressions/image_planner_props.txt",
        ))),
        ..ProptestConfig::default()
    })]

    /// Seed 000: the current and previous ready image of a configured
    /// image (per image, and per image-provider combination) are never
    /// deleted, neither the record nor its files.
    #[test]
    fn never_deletes_the_current_or_previous_ready_image(spec in spec()) {
        let w = world(&spec);
        let plan = w.plan();
        let builds = protected_builds(&w);
        let hit: Vec<_> = owned_builds(&plan).intersection(&builds).cloned().collect();
        prop_assert!(hit.is_empty(), "deletes protected builds {hit:?}: {plan:#?}");
        let uploads = protected_uploads(&w);
        let hit: Vec<_> = deleted_upload_keys(&plan).intersection(&uploads).cloned().collect();
        prop_assert!(hit.is_empty(), "deletes protected uploads {hit:?}: {plan:#?}");
    }

    /// Planning again on the applied result builds and uploads nothing it
    /// already did, and the installation settles.
    #[test]
    fn replanning_on_the_applied_result_repeats_nothing(spec in spec()) {
        let mut w = world(&spec);
        let first = w.plan();
        w.apply(&first);
        let second = w.plan();
        let built: BTreeSet<&str> = builds(&first).into_iter().collect();
        let again: Vec<&str> = builds(&second).into_iter().filter(|i| built.contains(i)).collect();
        prop_assert!(again.is_empty(), "builds {again:?} again: {second:#?}");
        let up: BTreeSet<_> = uploads(&first).into_iter().collect();
        let again: Vec<_> = uploads(&second).into_iter().filter(|u| up.contains(u)).collect();
        prop_assert!(again.is_empty(), "uploads {again:?} again: {second:#?}");
        // Everything that can happen at this instant happens in a few passes.
        let mut rounds = 0;
        loop {
            let p = w.plan();
            if p.actions.is_empty() {
                break;
            }
            rounds += 1;
            prop_assert!(rounds <= 6, "not settled: {p:#?}");
            w.apply(&p);
        }
    }

    /// A paused image (in the configuration or with `image-pause`) is
    /// never built, whatever is requested.
    #[test]
    fn a_paused_image_is_never_built(spec in spec()) {
        let w = world(&spec);
        let plan = w.plan();
        for (i, name) in IMAGES.iter().enumerate() {
            if spec.config_pause[i] || spec.store_pause[i] {
                prop_assert!(!builds(&plan).contains(name), "{name} is paused: {plan:#?}");
            }
        }
    }

    /// Uploads only go where the image is wanted, of the newest ready build,
    /// from files this builder has, in the format the provider takes; one
    /// build per image at a time.
    #[test]
    fn uploads_and_builds_respect_their_preconditions(spec in spec()) {
        let w = world(&spec);
        let plan = w.plan();
        let mut per_image: BTreeMap<&str, usize> = BTreeMap::new();
        for a in &plan.actions {
            match a {
                ImageAction::Upload { image, build, provider, format, .. } => {
                    let p = w.config.provider(provider).expect("configured provider");
                    let d = p.diskimage(image).expect("listed");
                    prop_assert!(!d.pause && !p.is_disabled());
                    prop_assert_eq!(format.as_str(), p.upload_format());
                    let files = &w.snapshot.local_files[&(image.clone(), build.clone())];
                    prop_assert!(files.contains(format));
                    let newest = w.snapshot.images.builds.iter()
                        .filter(|b| &b.image == image && b.build.state == BuildState::Ready)
                        .max_by(|a, b| a.build.state_time.total_cmp(&b.build.state_time))
                        .map(|b| b.id.clone());
                    prop_assert_eq!(newest.as_ref(), Some(build));
                }
                ImageAction::Build { image, .. } => {
                    *per_image.entry(image).or_default() += 1;
                    prop_assert!(!w.snapshot.images.build_locked.contains(image));
                }
                _ => {}
            }
        }
        prop_assert!(per_image.values().all(|n| *n == 1));
    }
}
