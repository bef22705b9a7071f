//! Named scenarios of the builder's planner (reference §5.2, §5.4, §5.5,
//! seeds 000 and 001): when to build, where to upload, what to keep and
//! what to delete.

use std::collections::BTreeSet;

mod images_common;

use images_common::*;
use nodepool_core::model::{BuildState, UploadState};
use nodepool_core::planner::images::{
    BUILD_RETRY_SECS, BuildReason, ImageAction, ImageDeleteReason, UPLOAD_RETRY_SECS,
};
use nodepool_core::planner::{Action, LaunchImage};
use nodepool_core::store::Malformed;
use nodepool_core::testing::World;

/// Two images, two providers taking both.
const TWO: &str = r#"
labels:
  - name: small
diskimages:
  - name: deb
    rebuild-age: 86400
  - name: cent
providers:
  - name: p1
    driver: simulated
    diskimages: [{name: deb}, {name: cent}]
    pools:
      - name: main
        max-servers: 10
        labels: [{name: small, diskimage: deb, flavor-name: "Fake Flavor"}]
  - name: p2
    driver: simulated
    diskimages: [{name: deb}, {name: cent}]
    pools:
      - name: main
        max-servers: 10
        labels: [{name: small, diskimage: deb, flavor-name: "Fake Flavor"}]
"#;

const DAY: f64 = 86400.0;

fn world() -> ImageWorld {
    ImageWorld::new(TWO)
}

/// deb with builds b1 (older) and b2 (newer), both uploaded to p1 and p2.
fn deb_two_builds(w: &mut ImageWorld) -> (String, String) {
    let t = w.now;
    let b1 = w.add_build("deb", BuildState::Ready, t - 2.0 * 3600.0, &["qcow2"]);
    let b2 = w.add_build("deb", BuildState::Ready, t - 3600.0, &["qcow2"]);
    for (b, dt) in [(&b1, 7000.0), (&b2, 3000.0)] {
        for p in ["p1", "p2"] {
            w.add_upload("deb", b, p, UploadState::Ready, t - dt);
        }
    }
    (b1, b2)
}

fn build_of<'a>(
    plan: &'a nodepool_core::planner::images::ImagePlan,
    image: &str,
) -> Option<&'a ImageAction> {
    plan.actions
        .iter()
        .find(|a| matches!(a, ImageAction::Build { image: i, .. } if i == image))
}

#[test]
fn every_configured_image_is_built_when_it_has_no_ready_build() {
    let w = world();
    let p = w.plan();
    assert_eq!(builds(&p), ["cent", "deb"]);
    match build_of(&p, "deb") {
        Some(ImageAction::Build {
            formats,
            reason,
            newest_ready,
            requested,
            ..
        }) => {
            assert_eq!(formats, &["qcow2"]);
            assert_eq!(reason, &BuildReason::NoReadyBuild);
            assert_eq!(newest_ready, &None);
            assert!(!requested);
        }
        other => panic!("{other:?}"),
    }
    assert!(uploads(&p).is_empty());
}

#[test]
fn an_image_no_provider_uses_and_without_formats_is_never_built() {
    let mut w = ImageWorld::new(&TWO.replace(
        "  - name: cent\nproviders:",
        "  - name: cent\n  - name: lonely\nproviders:",
    ));
    w.now += 1.0;
    assert!(!builds(&w.plan()).contains(&"lonely"));
}

#[test]
fn a_build_is_due_at_rebuild_age_or_when_formats_are_missing() {
    let mut w = world();
    let t = w.now;
    let b = w.add_build("deb", BuildState::Ready, t - DAY + 10.0, &["qcow2"]);
    w.add_build("cent", BuildState::Ready, t - 10.0, &["raw"]);
    let p = w.plan();
    assert_eq!(builds(&p), ["cent"], "deb is fresh; cent lacks qcow2");
    assert!(matches!(
        build_of(&p, "cent"),
        Some(ImageAction::Build { reason: BuildReason::MissingFormats(m), .. }) if m == &["qcow2"]
    ));
    w.now += 10.0;
    let p = w.plan();
    match build_of(&p, "deb") {
        Some(ImageAction::Build {
            reason: BuildReason::Stale { age },
            newest_ready,
            ..
        }) => {
            assert!((age - DAY).abs() < 1e-6);
            assert_eq!(newest_ready.as_deref(), Some(b.as_str()));
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_provider_format_joins_the_build_formats() {
    let mut w = world();
    w.config.providers[1].image_format = Some("raw".into());
    let p = w.plan();
    match build_of(&p, "deb") {
        Some(ImageAction::Build { formats, .. }) => assert_eq!(formats, &["qcow2", "raw"]),
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_manual_request_builds_a_fresh_image_and_comes_first() {
    let mut w = world();
    let t = w.now;
    w.add_build("deb", BuildState::Ready, t - 60.0, &["qcow2"]);
    w.add_build("cent", BuildState::Ready, t - 60.0, &["qcow2"]);
    assert!(builds(&w.plan()).is_empty());
    w.snapshot
        .images
        .build_requests
        .insert("deb".into(), t - 5.0);
    let p = w.plan();
    assert!(matches!(
        p.actions.first(),
        Some(ImageAction::Build { image, reason: BuildReason::Requested, requested: true, .. }) if image == "deb"
    ));
    w.apply(&p);
    assert!(builds(&w.plan()).is_empty(), "the request is served");
}

#[test]
fn a_paused_image_is_not_built_even_on_request() {
    let mut w = world();
    w.snapshot.images.paused.insert("deb".into());
    w.snapshot.images.build_requests.insert("deb".into(), w.now);
    assert_eq!(builds(&w.plan()), ["cent"]);

    let mut w = ImageWorld::new(&TWO.replace(
        "  - name: cent\nproviders",
        "  - name: cent\n    pause: true\nproviders",
    ));
    w.snapshot
        .images
        .build_requests
        .insert("cent".into(), w.now);
    assert_eq!(builds(&w.plan()), ["deb"]);
}

#[test]
fn one_build_of_an_image_at_a_time() {
    let mut w = world();
    w.snapshot.images.build_locked.insert("deb".into());
    assert_eq!(builds(&w.plan()), ["cent"]);
    let mut w = world();
    let b = w.add_build("deb", BuildState::Building, w.now, &["qcow2"]);
    w.local.running_builds.insert(("deb".into(), b));
    assert_eq!(builds(&w.plan()), ["cent"]);
}

#[test]
fn a_failed_build_backs_off_then_is_deleted_and_retried() {
    let mut w = world();
    let f = w.add_build("deb", BuildState::Failed, w.now - 10.0, &["qcow2"]);
    let p = w.plan();
    assert_eq!(builds(&p), ["cent"]);
    assert!(deleted_builds(&p).is_empty(), "kept as the backoff marker");
    w.now += BUILD_RETRY_SECS;
    let p = w.plan();
    assert_eq!(builds(&p), ["cent", "deb"]);
    assert!(p.actions.contains(&ImageAction::RemoveBuild {
        image: "deb".into(),
        build: f,
        reason: ImageDeleteReason::Failed
    }));
}

#[test]
fn the_newest_ready_build_goes_to_each_provider_lacking_it() {
    let mut w = world();
    let t = w.now;
    let (_, b2) = deb_two_builds(&mut w);
    let b3 = w.add_build("deb", BuildState::Ready, t - 60.0, &["qcow2"]);
    w.add_upload("deb", &b3, "p1", UploadState::Ready, t - 30.0);
    w.add_build("cent", BuildState::Ready, t - 60.0, &["qcow2"]);
    let p = w.plan();
    let mut ups = uploads(&p);
    ups.sort();
    let cent = ups.iter().filter(|u| u.0 == "cent").count();
    assert_eq!(cent, 2);
    assert!(ups.contains(&("deb", b3.as_str(), "p2")));
    assert!(
        !ups.iter().any(|u| u.1 == b2),
        "only the newest build is uploaded"
    );
    assert!(!ups.contains(&("deb", b3.as_str(), "p1")));
    w.apply(&p);
    assert!(uploads(&w.plan()).iter().all(|u| u.0 != "deb"));
}

#[test]
fn no_upload_without_the_local_file_of_the_provider_format() {
    let mut w = world();
    let t = w.now;
    let b = w.add_build("deb", BuildState::Ready, t - 60.0, &["qcow2"]);
    w.config.providers[1].image_format = Some("raw".into());
    // The build lacks raw: p2 gets nothing (a build for raw is due instead).
    let p = w.plan();
    assert_eq!(uploads(&p).iter().filter(|u| u.0 == "deb").count(), 1);
    assert!(build_of(&p, "deb").is_some());
    // Another builder's build: no files here, so no upload from us.
    w.snapshot
        .local_files
        .remove(&("deb".to_owned(), b.clone()));
    assert!(uploads(&w.plan()).iter().all(|u| u.0 != "deb"));
}

#[test]
fn no_upload_where_the_image_is_paused_or_the_provider_is_being_removed() {
    let yaml = TWO.replacen(
        "diskimages: [{name: deb}, {name: cent}]",
        "diskimages: [{name: deb, pause: true}, {name: cent}]",
        1,
    );
    let mut w = ImageWorld::new(&yaml);
    let t = w.now;
    w.add_build("deb", BuildState::Ready, t - 60.0, &["qcow2"]);
    let plan = w.plan();
    let ups = uploads(&plan);
    assert_eq!(ups.len(), 1);
    assert_eq!(ups[0].2, "p2", "deb is paused in p1");
    let mut w = ImageWorld::new(&TWO.replace("max-servers: 10", "max-servers: -1"));
    w.add_build("deb", BuildState::Ready, t - 60.0, &["qcow2"]);
    assert!(
        uploads(&w.plan()).is_empty(),
        "every pool of every provider is disabled"
    );
}

#[test]
fn retention_keeps_the_two_newest_builds_and_uploads() {
    let mut w = world();
    let t = w.now;
    let mut ids = Vec::new();
    for i in 0..4 {
        let b = w.add_build(
            "deb",
            BuildState::Ready,
            t - 5000.0 + i as f64 * 1000.0,
            &["qcow2"],
        );
        for p in ["p1", "p2"] {
            w.add_upload(
                "deb",
                &b,
                p,
                UploadState::Ready,
                t - 4900.0 + i as f64 * 1000.0,
            );
        }
        ids.push(b);
    }
    let p = w.plan();
    let gone = deleted_uploads(&p);
    assert_eq!(gone.len(), 4, "{p:#?}");
    for u in &w.snapshot.images.uploads {
        let old = u.build_id == ids[0] || u.build_id == ids[1];
        assert_eq!(gone.contains(u.id.as_str()), old, "{u:?}");
    }
    assert!(
        p.actions
            .iter()
            .all(|a| !matches!(a, ImageAction::RemoveBuild { .. }))
    );
    w.apply(&p);
    let p = w.plan();
    assert_eq!(
        deleted_builds(&p),
        [("deb", ids[0].as_str()), ("deb", ids[1].as_str())].into()
    );
    w.apply(&p);
    w.settle(5);
    let left: Vec<&str> = w
        .snapshot
        .images
        .builds
        .iter()
        .filter(|b| b.image == "deb")
        .map(|b| b.id.as_str())
        .collect();
    assert_eq!(left, [ids[2].as_str(), ids[3].as_str()]);
    assert!(
        !w.snapshot
            .local_files
            .contains_key(&("deb".to_owned(), ids[0].clone()))
    );
}

#[test]
fn a_providers_previous_image_is_kept_even_when_the_newest_never_reached_it() {
    let mut w = world();
    let t = w.now;
    let (b1, b2) = deb_two_builds(&mut w);
    // b3 is ready and on p1, but its p2 upload keeps failing.
    let b3 = w.add_build("deb", BuildState::Ready, t - 600.0, &["qcow2"]);
    w.add_upload("deb", &b3, "p1", UploadState::Ready, t - 500.0);
    w.add_upload("deb", &b3, "p2", UploadState::Failed, t - 10.0);
    let p = w.plan();
    // p1's images are b3 and b2: b1's p1 upload goes; p2's are b2 and b1.
    let b1_p1 = w
        .snapshot
        .images
        .uploads
        .iter()
        .find(|u| u.build_id == b1 && u.provider == "p1")
        .map(|u| u.id.clone())
        .unwrap();
    assert_eq!(deleted_uploads(&p), [b1_p1.as_str()].into());
    assert!(deleted_builds(&p).is_empty());
    let _ = b2;
}

#[test]
fn rollback_deleting_the_newest_build_falls_back_to_the_previous_one() {
    // Seed 000: pause the image, dib-image-delete the newest build; the
    // launchers boot the previous one, and nothing is rebuilt.
    let yaml = TWO.replace(
        "  - name: deb\n    rebuild-age: 86400",
        "  - name: deb\n    rebuild-age: 86400\n    pause: true",
    );
    let mut w = ImageWorld::new(&yaml);
    let (b1, b2) = deb_two_builds(&mut w);
    assert!(
        w.plan()
            .actions
            .iter()
            .all(|a| !matches!(a, ImageAction::DeleteUpload { image, .. } if image == "deb"))
    );
    let mut launcher = World::new(&yaml);
    launcher.now = w.now;
    launcher.snapshot.images = w.snapshot.images.clone();
    let boots = |l: &World| -> Vec<String> {
        l.plan()
            .actions
            .iter()
            .filter_map(|a| match a {
                Action::Launch {
                    image: LaunchImage::Upload { build, .. },
                    ..
                } => Some(build.clone()),
                _ => None,
            })
            .collect()
    };
    launcher.add_request(&["small"], "100");
    assert_eq!(boots(&launcher), std::slice::from_ref(&b2));

    // nodepool dib-image-delete deb-<b2>
    let now = w.now;
    w.build_mut("deb", &b2)
        .build
        .set_state(BuildState::Deleting, now);
    launcher.snapshot.images = w.snapshot.images.clone();
    assert_eq!(
        boots(&launcher),
        std::slice::from_ref(&b1),
        "launchers fall back at once"
    );
    let p = w.plan();
    assert!(builds(&p).iter().all(|i| *i != "deb"), "paused: no rebuild");
    assert!(
        !p.actions.iter().any(|a| matches!(
            a,
            ImageAction::RemoveBuild { .. } | ImageAction::MarkBuildDeleting { .. }
        )),
        "uploads first"
    );
    assert!(
        p.actions.contains(&ImageAction::DeleteLocalFiles {
            image: "deb".into(),
            build: b2.clone(),
            formats: None,
            reason: ImageDeleteReason::BuildGone
        }),
        "its files go at once"
    );
    let gone = deleted_uploads(&p);
    assert_eq!(gone.len(), 2);
    assert!(p.actions.iter().all(|a| match a {
        ImageAction::DeleteUpload { build, reason, .. } =>
            build == &b2 && *reason == ImageDeleteReason::BuildDeleted,
        _ => true,
    }));
    w.apply(&p);
    let p = w.plan();
    assert!(p.actions.contains(&ImageAction::RemoveBuild {
        image: "deb".into(),
        build: b2.clone(),
        reason: ImageDeleteReason::Requested
    }));
    w.settle(5);
    assert!(w.build("deb", &b1).is_some(), "the previous image stays");
    launcher.snapshot.images = w.snapshot.images.clone();
    assert_eq!(boots(&launcher), std::slice::from_ref(&b1));
    // A new build later keeps b1 as the previous image.
    w.config.diskimages[0].pause = false;
    w.snapshot.images.build_requests.insert("deb".into(), w.now);
    w.now += 60.0;
    w.settle(5);
    let deb: Vec<&str> = w
        .snapshot
        .images
        .builds
        .iter()
        .filter(|b| b.image == "deb")
        .map(|b| b.id.as_str())
        .collect();
    assert_eq!(deb.len(), 2);
    assert!(deb.contains(&b1.as_str()));
}

#[test]
fn an_operator_image_delete_removes_that_upload_and_it_is_uploaded_again() {
    let mut w = world();
    let (_, b2) = deb_two_builds(&mut w);
    let u = w
        .snapshot
        .images
        .uploads
        .iter()
        .find(|u| u.build_id == b2 && u.provider == "p2")
        .map(|u| u.id.clone())
        .unwrap();
    let now = w.now;
    w.upload_mut(&u)
        .upload
        .set_state(UploadState::Deleting, now);
    let p = w.plan();
    assert!(p.actions.contains(&ImageAction::DeleteUpload {
        image: "deb".into(),
        build: b2.clone(),
        provider: "p2".into(),
        upload: u.clone(),
        reason: ImageDeleteReason::Requested
    }));
    // As Python's upload worker: p2 lacks a ready upload of the newest
    // build, so it is uploaded again while the old one is deleted.
    assert!(uploads(&p).contains(&("deb", b2.as_str(), "p2")));
    w.apply(&p);
    assert!(uploads(&w.plan()).iter().all(|u| u.0 != "deb"));
}

#[test]
fn removing_a_provider_deletes_its_uploads_and_uploads_nothing_new() {
    // Seed 001: remove the provider's images and set max-servers -1.
    let yaml = r#"
labels:
  - name: small
diskimages:
  - name: deb
  - name: cent
providers:
  - name: p1
    driver: simulated
    diskimages: [{name: deb}, {name: cent}]
    pools:
      - name: main
        max-servers: 10
        labels: [{name: small, diskimage: deb, flavor-name: "Fake Flavor"}]
  - name: p2
    driver: simulated
    pools:
      - name: main
        max-servers: -1
"#;
    let mut w = ImageWorld::new(yaml);
    let mut before = world();
    deb_two_builds(&mut before);
    let t = w.now;
    let c = before.add_build("cent", BuildState::Ready, t - 100.0, &["qcow2"]);
    before.add_upload("cent", &c, "p2", UploadState::Ready, t - 50.0);
    before.add_upload("cent", &c, "p1", UploadState::Ready, t - 50.0);
    w.snapshot = before.snapshot.clone();
    let p = w.plan();
    let mut reasons: Vec<(String, ImageDeleteReason)> = p
        .actions
        .iter()
        .filter_map(|a| match a {
            ImageAction::DeleteUpload {
                image,
                provider,
                reason,
                ..
            } => Some((format!("{image}@{provider}"), *reason)),
            _ => None,
        })
        .collect();
    reasons.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(
        reasons,
        [
            (
                "cent@p2".to_owned(),
                ImageDeleteReason::ImageRemovedFromProvider
            ),
            ("deb@p2".into(), ImageDeleteReason::ImageRemovedFromProvider),
            ("deb@p2".into(), ImageDeleteReason::ImageRemovedFromProvider),
        ]
    );
    assert!(uploads(&p).is_empty());
    assert!(deleted_builds(&p).is_empty(), "p1 keeps its images");
    w.settle(5);
    assert!(w.snapshot.images.uploads.iter().all(|u| u.provider == "p1"));
    assert_eq!(w.snapshot.images.uploads.len(), 3);
}

#[test]
fn a_cloud_paused_with_max_servers_zero_keeps_its_uploads() {
    // `max-servers: 0` on every pool pauses a cloud; its images stay for
    // when it is enabled again. Only unlisting them removes them.
    let yaml = TWO.replace(
        "  - name: p2\n    driver: simulated\n    diskimages: [{name: deb}, {name: cent}]\n    pools:\n      - name: main\n        max-servers: 10",
        "  - name: p2\n    driver: simulated\n    diskimages: [{name: deb}, {name: cent}]\n    pools:\n      - name: main\n        max-servers: 0",
    );
    assert_ne!(yaml, TWO, "p2 is paused");
    let mut w = ImageWorld::new(&yaml);
    let (b1, b2) = deb_two_builds(&mut w);
    // A third, newest build, uploaded to p1 only (p2 takes no uploads
    // while paused): p2's current and previous images are b2 and b1.
    let t = w.now;
    let b3 = w.add_build("deb", BuildState::Ready, t - 600.0, &["qcow2"]);
    w.add_upload("deb", &b3, "p1", UploadState::Ready, t - 500.0);
    let p = w.plan();
    let deleted = deleted_uploads(&p);
    for u in &w.snapshot.images.uploads {
        if u.provider == "p2" {
            assert!(
                !deleted.contains(u.id.as_str()),
                "p2's upload of {} deleted: {:?}",
                u.build_id,
                p.actions
            );
        }
    }
    assert!(
        uploads(&p).iter().all(|u| u.2 != "p2"),
        "a paused cloud gets no new uploads: {:?}",
        p.actions
    );
    let gone = deleted_builds(&p);
    assert!(
        !gone.contains(&("deb", b1.as_str())) && !gone.contains(&("deb", b2.as_str())),
        "builds p2 boots from are kept: {gone:?}"
    );
    w.settle(5);
    let p2: BTreeSet<&str> = w
        .snapshot
        .images
        .uploads
        .iter()
        .filter(|u| u.provider == "p2")
        .map(|u| u.build_id.as_str())
        .collect();
    assert_eq!(p2, BTreeSet::from([b1.as_str(), b2.as_str()]));
    // Unlisting the images (seed 001's removal) lets them go.
    for pc in &mut w.config.providers {
        if pc.name == "p2" {
            pc.diskimages.clear();
        }
    }
    w.settle(5);
    assert!(
        w.snapshot.images.uploads.iter().all(|u| u.provider != "p2"),
        "{:?}",
        w.snapshot.images.uploads
    );
}

#[test]
fn an_image_removed_from_the_configuration_is_deleted_entirely_by_its_builder() {
    let mut w = world();
    let (b1, b2) = deb_two_builds(&mut w);
    // Another builder's image we never had: not ours to touch.
    let theirs = w.add_build("fedora", BuildState::Ready, w.now, &["qcow2"]);
    w.build_mut("fedora", &theirs).build.builder_id = Some("someone-else".into());
    w.snapshot
        .local_files
        .remove(&("fedora".to_owned(), theirs.clone()));
    w.config.diskimages.retain(|d| d.name != "deb");
    for p in &mut w.config.providers {
        p.diskimages.retain(|d| d.name != "deb");
        p.pools.clear();
    }
    let p = w.plan();
    assert_eq!(deleted_uploads(&p).len(), 4);
    assert!(
        p.actions
            .iter()
            .all(|a| !format!("{a:?}").contains(&theirs)),
        "{p:#?}"
    );
    w.settle(5);
    assert!(w.build("deb", &b1).is_none() && w.build("deb", &b2).is_none());
    assert!(w.build("fedora", &theirs).is_some());
    assert!(w.snapshot.local_files.keys().all(|(i, _)| i != "deb"));
}

#[test]
fn a_dead_builders_build_and_upload_are_recovered() {
    let mut w = world();
    let t = w.now;
    let (_, b2) = deb_two_builds(&mut w);
    // A build left `building` and an upload left `uploading` by a builder
    // whose session (and locks) are gone.
    let dead = w.add_build("deb", BuildState::Building, t - 900.0, &["qcow2"]);
    w.build_mut("deb", &dead).build.builder_id = Some("gone".into());
    let c = w.add_build("cent", BuildState::Ready, t - 100.0, &["qcow2"]);
    let stale = w.add_upload("cent", &c, "p1", UploadState::Uploading, t - 90.0);
    // While their locks are held they are in progress.
    w.snapshot.images.build_locked.insert("deb".into());
    w.upload_mut(&stale).uploads_locked = true;
    let p = w.plan();
    assert!(deleted_builds(&p).is_empty());
    assert!(deleted_uploads(&p).is_empty());
    assert!(!uploads(&p).contains(&("cent", c.as_str(), "p1")));
    // The builder dies.
    w.snapshot.images.build_locked.clear();
    w.upload_mut(&stale).uploads_locked = false;
    let p = w.plan();
    assert!(p.actions.contains(&ImageAction::MarkDeadBuild {
        image: "deb".into(),
        build: dead.clone()
    }));
    assert!(p.actions.contains(&ImageAction::RemoveDeadUpload {
        image: "cent".into(),
        build: c.clone(),
        provider: "p1".into(),
        upload: stale.clone()
    }));
    assert!(
        !uploads(&p).contains(&("cent", c.as_str(), "p1")),
        "record first"
    );
    w.apply(&p);
    let p = w.plan();
    assert!(uploads(&p).contains(&("cent", c.as_str(), "p1")));
    assert!(p.actions.contains(&ImageAction::RemoveBuild {
        image: "deb".into(),
        build: dead.clone(),
        reason: ImageDeleteReason::Requested
    }));
    w.settle(5);
    assert!(w.build("deb", &dead).is_none());
    assert!(w.build("deb", &b2).is_some());
}

#[test]
fn our_own_running_build_is_never_taken_for_dead() {
    let mut w = world();
    let b = w.add_build("deb", BuildState::Building, w.now, &["qcow2"]);
    w.snapshot
        .local_files
        .insert(("deb".into(), b.clone()), files(&["qcow2"]));
    w.local.running_builds.insert(("deb".into(), b.clone()));
    let p = w.plan();
    assert!(deleted_builds(&p).is_empty(), "{p:#?}");
}

#[test]
fn a_failed_upload_is_retried_after_its_delay() {
    let mut w = world();
    let t = w.now;
    let b = w.add_build("deb", BuildState::Ready, t - 100.0, &["qcow2"]);
    w.add_upload("deb", &b, "p1", UploadState::Ready, t - 90.0);
    let f = w.add_upload("deb", &b, "p2", UploadState::Failed, t - 10.0);
    let p = w.plan();
    assert!(!uploads(&p).iter().any(|u| u.0 == "deb"));
    assert!(deleted_uploads(&p).is_empty());
    w.now += UPLOAD_RETRY_SECS;
    let p = w.plan();
    assert!(p.actions.contains(&ImageAction::DeleteUpload {
        image: "deb".into(),
        build: b.clone(),
        provider: "p2".into(),
        upload: f,
        reason: ImageDeleteReason::Failed
    }));
    w.apply(&p);
    assert_eq!(
        uploads(&w.plan())
            .into_iter()
            .filter(|u| u.0 == "deb")
            .collect::<Vec<_>>(),
        [("deb", b.as_str(), "p2")]
    );
}

#[test]
fn delete_after_upload_prunes_files_once_every_provider_has_the_build() {
    let yaml = TWO.replace(
        "  - name: deb\n    rebuild-age: 86400",
        "  - name: deb\n    rebuild-age: 86400\n    formats: [qcow2, raw, vhd]\n    delete-after-upload: true\n    keep-formats: [vhd]",
    );
    let mut w = ImageWorld::new(&yaml);
    let t = w.now;
    let b = w.add_build(
        "deb",
        BuildState::Ready,
        t - 100.0,
        &["qcow2", "raw", "vhd"],
    );
    w.add_upload("deb", &b, "p1", UploadState::Ready, t - 90.0);
    let prune = |w: &ImageWorld| {
        w.plan()
            .actions
            .into_iter()
            .filter(|a| matches!(a, ImageAction::DeleteLocalFiles { .. }))
            .collect::<Vec<_>>()
    };
    assert!(prune(&w).is_empty(), "p2 still needs it");
    w.add_upload("deb", &b, "p2", UploadState::Ready, t - 80.0);
    assert_eq!(
        prune(&w),
        [ImageAction::DeleteLocalFiles {
            image: "deb".into(),
            build: b.clone(),
            formats: Some(vec!["qcow2".into(), "raw".into()]),
            reason: ImageDeleteReason::DeleteAfterUpload
        }]
    );
    w.settle(3);
    assert_eq!(
        w.snapshot.local_files[&("deb".to_owned(), b.clone())],
        files(&["vhd"])
    );
    assert!(w.build("deb", &b).is_some());
}

#[test]
fn files_of_builds_that_are_gone_failed_or_deleting_are_removed() {
    let mut w = world();
    let t = w.now;
    let gone = "0123456789abcdef0123456789abcdef".to_owned();
    w.snapshot
        .local_files
        .insert(("deb".into(), gone.clone()), files(&["qcow2"]));
    let failed = w.add_build("cent", BuildState::Failed, t - 5.0, &["qcow2"]);
    w.snapshot
        .local_files
        .insert(("cent".into(), failed.clone()), files(&[]));
    let p = w.plan();
    let deleted: Vec<(&str, &str)> = p
        .actions
        .iter()
        .filter_map(|a| match a {
            ImageAction::DeleteLocalFiles {
                image,
                build,
                formats: None,
                ..
            } => Some((image.as_str(), build.as_str())),
            _ => None,
        })
        .collect();
    assert_eq!(deleted, [("cent", failed.as_str()), ("deb", gone.as_str())]);
}

#[test]
fn malformed_records_are_left_alone() {
    let mut w = world();
    let b = "0123456789abcdef0123456789abcdef".to_owned();
    w.snapshot
        .local_files
        .insert(("deb".into(), b.clone()), files(&["qcow2"]));
    w.snapshot.images.malformed.push(Malformed {
        path: format!("/nodepool/images/deb/builds/{b}"),
        reason: "bad json".into(),
    });
    w.snapshot
        .images
        .unreadable_builds
        .insert(("deb".into(), b.clone()));
    assert!(deleted_builds(&w.plan()).is_empty());
    // Known to be unreadable, its files would be swept as a build's that
    // is gone: the planner goes by `unreadable_builds`.
    w.snapshot.images.unreadable_builds.clear();
    assert_eq!(deleted_builds(&w.plan()), [("deb", b.as_str())].into());
}

#[test]
fn an_upload_request_forces_a_fresh_upload_then_is_cleared() {
    let mut w = world();
    let t = w.now;
    let (b1, b2) = deb_two_builds(&mut w);
    w.snapshot
        .images
        .upload_requests
        .insert(("deb".into(), "p1".into()), t - 1.0);
    let p = w.plan();
    assert!(p.actions.iter().any(|a| matches!(a,
        ImageAction::Upload { image, build, provider, requested: true, .. }
            if image == "deb" && build == &b2 && provider == "p1")));
    // The fresh upload lands; the previous image of p1 (b1) is still kept.
    w.add_upload("deb", &b2, "p1", UploadState::Ready, t);
    let p = w.plan();
    assert!(p.actions.contains(&ImageAction::ClearUploadRequest {
        image: "deb".into(),
        provider: "p1".into(),
        reason: format!("build {b2} is uploaded to p1")
    }));
    let older_b2 = w
        .snapshot
        .images
        .uploads
        .iter()
        .find(|u| u.build_id == b2 && u.provider == "p1")
        .map(|u| u.id.clone())
        .unwrap();
    assert_eq!(
        deleted_uploads(&p),
        [older_b2.as_str()].into(),
        "the older copy of b2 goes, b1 stays"
    );
    assert!(uploads(&p).is_empty());
    let _ = b1;
}

#[test]
fn an_upload_request_that_cannot_be_served_is_cleared() {
    let mut w = world();
    w.config.providers[1].diskimages.retain(|d| d.name != "deb");
    for (img, prov) in [("deb", "p2"), ("deb", "nowhere"), ("unknown", "p1")] {
        w.snapshot
            .images
            .upload_requests
            .insert((img.into(), prov.into()), w.now);
    }
    let cleared: Vec<(String, String)> = w
        .plan()
        .actions
        .into_iter()
        .filter_map(|a| match a {
            ImageAction::ClearUploadRequest {
                image, provider, ..
            } => Some((image, provider)),
            _ => None,
        })
        .collect();
    assert_eq!(
        cleared,
        [
            ("deb".to_owned(), "nowhere".to_owned()),
            ("deb".into(), "p2".into())
        ],
        "a request for an image this builder does not know is another builder's"
    );
}

#[test]
fn uploads_to_unknown_providers_are_reported_not_deleted() {
    let mut w = world();
    let (b1, _) = deb_two_builds(&mut w);
    w.add_upload("deb", &b1, "old-cloud", UploadState::Ready, w.now);
    let p = w.plan();
    assert_eq!(p.notes.len(), 1, "{:?}", p.notes);
    assert!(p.notes[0].contains("old-cloud"));
    assert!(deleted_uploads(&p).is_empty());
}

#[test]
fn seed_001s_provider_max_servers_minus_one_deletes_its_uploads_while_it_drains() {
    // As seed 001 words it, with the images still listed: the provider-
    // level `max-servers: -1` alone removes its uploads and uploads nothing.
    let yaml = r#"
labels:
  - name: small
diskimages:
  - name: deb
  - name: cent
providers:
  - name: p1
    driver: simulated
    diskimages: [{name: deb}, {name: cent}]
    pools:
      - name: main
        max-servers: 10
        labels: [{name: small, diskimage: deb, flavor-name: "Fake Flavor"}]
  - name: p2
    driver: simulated
    max-servers: -1
    diskimages: [{name: deb}, {name: cent}]
    pools:
      - name: main
        max-servers: 10
        labels: [{name: small, diskimage: deb, flavor-name: "Fake Flavor"}]
"#;
    let mut w = ImageWorld::new(yaml);
    let mut before = world();
    deb_two_builds(&mut before);
    w.snapshot = before.snapshot.clone();
    let p = w.plan();
    let deleted: Vec<String> = p
        .actions
        .iter()
        .filter_map(|a| match a {
            ImageAction::DeleteUpload { provider, .. } => Some(provider.clone()),
            _ => None,
        })
        .collect();
    assert!(!deleted.is_empty(), "{:?}", p.actions);
    assert!(deleted.iter().all(|p| p == "p2"), "{deleted:?}");
    assert!(uploads(&p).iter().all(|u| u.2 != "p2"), "{:?}", p.actions);
    w.settle(5);
    assert!(w.snapshot.images.uploads.iter().all(|u| u.provider == "p1"));
}

/// A cloud image with these properties.
fn cloud_image(id: &str, props: &[(&str, &str)]) -> nodepool_core::provider::CloudImageInfo {
    nodepool_core::provider::CloudImageInfo {
        id: id.into(),
        name: id.into(),
        status: "active".into(),
        properties: props
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect(),
    }
}

/// A cloud image tagged as upload `upload` of `build` to p1.
fn p1_upload_image(id: &str, build: &str, upload: &str) -> nodepool_core::provider::CloudImageInfo {
    use nodepool_core::provider::{IMAGE_BUILD_ID, IMAGE_PROVIDER, IMAGE_UPLOAD_ID};
    cloud_image(
        id,
        &[
            (IMAGE_BUILD_ID, build),
            (IMAGE_UPLOAD_ID, upload),
            (IMAGE_PROVIDER, "p1"),
        ],
    )
}

#[test]
fn cloud_images_tagged_as_ours_and_unknown_are_deleted_on_the_second_sighting() {
    let mut w = ImageWorld::new(TWO);
    let t = w.now - 100.0;
    for image in ["deb", "cent"] {
        let b = w.add_build(image, BuildState::Ready, t, &["qcow2"]);
        for p in ["p1", "p2"] {
            w.add_upload(image, &b, p, UploadState::Ready, t);
        }
    }
    // Nothing else to do: the leak check is all this test plans.
    assert_eq!(w.settle(5), 0, "{:#?}", w.plan());
    let build = w.snapshot.images.uploads[0].build_id.clone();
    let known = w.snapshot.images.uploads[0].id.clone();
    let listing = vec![
        p1_upload_image("img-known", &build, &known),
        p1_upload_image("img-leaked", &build, "0000000099"),
        cloud_image(
            "img-alien",
            &[(nodepool_core::provider::IMAGE_BUILD_ID, "elsewhere")],
        ),
        cloud_image("img-plain", &[]),
    ];
    let leaked = ImageAction::DeleteLeakedImage {
        provider: "p1".into(),
        external_id: "img-leaked".into(),
    };
    w.snapshot.cloud_images.insert("p1".into(), listing.clone());
    let p = w.plan();
    assert!(p.actions.is_empty(), "first sighting: {:?}", p.actions);
    assert_eq!(
        p.leak_suspects.iter().cloned().collect::<Vec<_>>(),
        [("p1".to_owned(), "img-leaked".to_owned())]
    );
    w.apply(&p);
    // A pass without a fresh listing keeps the suspect and deletes nothing.
    w.snapshot.cloud_images.clear();
    let p = w.plan();
    assert!(p.actions.is_empty());
    assert_eq!(p.leak_suspects.len(), 1);
    w.apply(&p);
    // An upload record appearing between the sightings (a slow writer)
    // saves it: the image is no longer unknown.
    let mut late = w.clone();
    let id = late.add_upload("deb", &build, "p1", UploadState::Uploading, w.now);
    // Its uploader is at work.
    let rec = late.upload_mut(&id);
    rec.locked = true;
    rec.uploads_locked = true;
    late.snapshot.cloud_images.insert(
        "p1".into(),
        vec![p1_upload_image("img-leaked", &build, &id)],
    );
    assert!(late.plan().actions.is_empty(), "{:?}", late.plan().actions);
    // The second listing: deleted, and only that one.
    w.snapshot.cloud_images.insert("p1".into(), listing);
    let p = w.plan();
    assert_eq!(p.actions, std::slice::from_ref(&leaked));
    assert_eq!(leaked.key(), "delete-leaked-image p1/img-leaked");
    w.apply(&p);
    let left: Vec<&str> = w.snapshot.cloud_images["p1"]
        .iter()
        .map(|i| i.id.as_str())
        .collect();
    assert_eq!(left, ["img-known", "img-alien", "img-plain"]);
    // p2 was never listed: it has no suspects of its own.
    assert!(p.leak_suspects.iter().all(|(p, _)| p == "p1"));
}

/// A world whose provider `sim` makes snapshot image `prepared` of cloud
/// image `base` (its scripts in the returned directory).
// A helper outside #[test] fns that panics on purpose, like the tests.
#[allow(clippy::unwrap_used)]
fn snapshot_world() -> (tempfile::TempDir, ImageWorld) {
    let d = tempfile::tempdir().unwrap();
    std::fs::write(d.path().join("setup.sh"), "true\n").unwrap();
    std::fs::write(d.path().join("id_test"), "key\n").unwrap();
    let yaml = format!(
        "script-dir: {dir:?}
labels: [{{name: small}}]
providers:
  - name: sim
    driver: simulated
    cloud-images: [{{name: base}}]
    images:
      - {{name: prepared, base-image: base, setup: setup.sh, username: jenkins, private-key: id_test, min-ram: 1}}
    pools:
      - name: main
        labels: [{{name: small, diskimage: prepared, min-ram: 1}}]
",
        dir = d.path().display().to_string()
    );
    let mut w = world();
    w.config = nodepool_core::config::Config::from_yaml_with_secure(&yaml, None, Some(d.path()))
        .unwrap_or_else(|e| panic!("{e}"));
    (d, w)
}

/// Snapshot images (seed 002): one is made when there is none, booting
/// the base cloud image; the upload of a snapshot being made is its
/// task's; a snapshot's build is kept with its upload only, so deleting
/// the newest upload (`image-delete`) takes its build too.
#[test]
fn snapshot_images_are_made_and_kept_with_their_upload_only() {
    let (_d, mut w) = snapshot_world();
    let p = w.plan();
    assert!(
        matches!(
            &p.actions[..],
            [ImageAction::Snapshot {
                image,
                provider,
                base: LaunchImage::Cloud { name },
                reason: BuildReason::NoReadyBuild,
                newest_ready: None,
                requested: false,
            }] if image == "prepared" && provider == "sim" && name == "base"
        ),
        "{p:?}"
    );
    // Being made: its upload is ready just before its build.
    let t = w.now;
    let b = w.add_build("prepared", BuildState::Building, t - 5.0, &[]);
    let u = w.add_upload("prepared", &b, "sim", UploadState::Ready, t - 1.0);
    w.snapshot.images.build_locked.insert("prepared".into());
    assert_eq!(w.plan().actions, [], "the snapshot's task records it");
    // Made: kept, nothing to do while it is young.
    w.snapshot.images.build_locked.clear();
    w.snapshot.images.builds[0]
        .build
        .set_state(BuildState::Ready, t);
    assert_eq!(w.plan().actions, []);
    // `image-delete` of its upload: the build goes with it.
    w.snapshot.images.uploads[0]
        .upload
        .set_state(UploadState::Deleting, t);
    let p = w.plan();
    assert!(p.actions.contains(&ImageAction::DeleteUpload {
        image: "prepared".into(),
        build: b.clone(),
        provider: "sim".into(),
        upload: u,
        reason: ImageDeleteReason::Requested,
    }));
    assert!(
        p.actions.iter().any(|a| matches!(a,
            ImageAction::MarkBuildDeleting { build, .. } if *build == b)),
        "{p:?}"
    );
}

/// A failed snapshot (its build and upload both failed, as its task
/// records them) stays whole, saying why, while it blocks a new attempt;
/// then its upload and build go and a new one is made.
#[test]
fn a_failed_snapshot_keeps_its_failed_upload_until_its_retry() {
    let (_d, mut w) = snapshot_world();
    let t = w.now;
    let b = w.add_build("prepared", BuildState::Failed, t - 10.0, &[]);
    let u = w.add_upload("prepared", &b, "sim", UploadState::Failed, t - 10.0);
    assert_eq!(w.plan().actions, [], "kept while it blocks a new attempt");
    w.now = t + BUILD_RETRY_SECS;
    let p = w.plan();
    assert!(
        p.actions.contains(&ImageAction::DeleteUpload {
            image: "prepared".into(),
            build: b.clone(),
            provider: "sim".into(),
            upload: u,
            reason: ImageDeleteReason::Failed,
        }),
        "{p:?}"
    );
    assert!(
        p.actions
            .iter()
            .any(|a| matches!(a, ImageAction::Snapshot { .. })),
        "made again: {p:?}"
    );
    w.snapshot.images.uploads.clear();
    let p = w.plan();
    assert!(
        p.actions.contains(&ImageAction::RemoveBuild {
            image: "prepared".into(),
            build: b,
            reason: ImageDeleteReason::Failed,
        }),
        "{p:?}"
    );
}
