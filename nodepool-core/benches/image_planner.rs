//! One pass of the builder's planner: 20 images × 10 providers with a
//! realistic history (per image three ready builds uploaded everywhere —
//! one past retention — a failed build, a build being deleted, a failed
//! and an in-progress upload), and 10× the images.
//!
//! `cargo bench -p nodepool-core --bench image_planner`

use std::collections::{BTreeMap, BTreeSet};
use std::hint::black_box;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use nodepool_core::config::Config;
use nodepool_core::model::{BuildState, ImageBuild, ImageUpload, UploadState};
use nodepool_core::planner::images::{BuilderLocal, ImageSnapshot, plan_images};
use nodepool_core::store::{BuildRecord, UploadRecord};

const NOW: f64 = 1_800_000_000.0;

fn setup(images: usize, providers: usize) -> (Config, ImageSnapshot, BuilderLocal) {
    let mut y = String::from("labels:\n  - name: small\ndiskimages:\n");
    for i in 0..images {
        y += &format!("  - name: image-{i}\n");
    }
    y += "providers:\n";
    for p in 0..providers {
        y += &format!("  - name: cloud-{p}\n    driver: simulated\n    diskimages:\n");
        for i in 0..images {
            y += &format!("      - name: image-{i}\n");
        }
        y += "    pools:\n      - name: main\n        max-servers: 10\n";
    }
    let config = match Config::from_yaml(&y) {
        Ok(c) => c,
        Err(e) => panic!("bench config: {e}"),
    };
    let mut snap = ImageSnapshot::default();
    let mut upload_seq = 0u64;
    for i in 0..images {
        let image = format!("image-{i}");
        let mut add_build = |n: usize, state: BuildState, t: f64| {
            let id = format!("{i:016x}{n:016x}");
            let mut b = ImageBuild::new(t, vec!["qcow2".into()]);
            b.set_state(state, t);
            snap.images.builds.push(BuildRecord {
                image: image.clone(),
                id: id.clone(),
                build: b,
                version: 1,
                locked: false,
            });
            id
        };
        let ready: Vec<String> = (0..3)
            .map(|n| add_build(n, BuildState::Ready, NOW - 86_000.0 * (3 - n) as f64 / 3.0))
            .collect();
        add_build(3, BuildState::Failed, NOW - 60.0);
        let deleting = add_build(4, BuildState::Deleting, NOW - 200_000.0);
        for b in &ready {
            snap.local_files.insert(
                (image.clone(), b.clone()),
                BTreeSet::from(["qcow2".to_owned()]),
            );
        }
        for p in 0..providers {
            let mut up = |build: &str, state: UploadState, t: f64, uploads_locked: bool| {
                upload_seq += 1;
                let mut u = ImageUpload::new(t, Some("qcow2".into()));
                u.set_state(state, t);
                u.external_id = Some(format!("ext-{upload_seq}"));
                snap.images.uploads.push(UploadRecord {
                    image: image.clone(),
                    build_id: build.to_owned(),
                    provider: format!("cloud-{p}"),
                    id: format!("{upload_seq:010}"),
                    upload: u,
                    version: 1,
                    locked: false,
                    uploads_locked,
                });
            };
            for (n, b) in ready.iter().enumerate() {
                up(
                    b,
                    UploadState::Ready,
                    NOW - 85_000.0 * (3 - n) as f64 / 3.0,
                    false,
                );
            }
            up(&deleting, UploadState::Deleting, NOW - 100.0, false);
            if p % 3 == 0 {
                up(&ready[2], UploadState::Failed, NOW - 30.0, false);
            }
            if p % 5 == 0 {
                up(&ready[1], UploadState::Uploading, NOW - 10.0, true);
            }
        }
    }
    let local = BuilderLocal {
        builder_id: "bench".into(),
        running_builds: BTreeSet::new(),
        leak_suspects: BTreeSet::new(),
    };
    (config, snap, local)
}

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("plan_images");
    group.sample_size(30);
    for (name, images, providers) in [("base", 20, 10), ("ten_x", 200, 10)] {
        let cell = std::sync::OnceLock::new();
        group.throughput(Throughput::Elements((images * providers) as u64));
        group.bench_function(BenchmarkId::from_parameter(name), |b| {
            let (config, snap, local) = cell.get_or_init(|| {
                let s = setup(images, providers);
                let p = plan_images(&s.1, &s.0, NOW, &s.2);
                let mut kinds: BTreeMap<String, usize> = BTreeMap::new();
                for a in &p.actions {
                    let k = format!("{a:?}");
                    let k = k.split([' ', '{']).next().unwrap_or("").to_owned();
                    *kinds.entry(k).or_default() += 1;
                }
                eprintln!(
                    "{name}: {} builds, {} uploads -> {} actions {kinds:?}",
                    s.1.images.builds.len(),
                    s.1.images.uploads.len(),
                    p.actions.len()
                );
                s
            });
            b.iter(|| black_box(plan_images(snap, config, NOW, local)))
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
