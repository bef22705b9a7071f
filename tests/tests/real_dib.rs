//! A real diskimage-builder build (feature `real-dib` of this package;
//! ~3 minutes, root), verified, then uploaded through the builder runtime
//! to two simulated clouds (one taking qcow2, one raw) and to the real
//! Glance of the OpenStack testbed: a whole-system test (DIB, the builder
//! runtime, the simulated cloud, the OpenStack backend).
//! `scripts/test.d/40-dib.sh` runs it after `nodepool-dib`'s own real-DIB
//! tests.
//!
//! Set up by `testbed/dib/setup.sh` and the OpenStack testbed (both started
//! by `scripts/test.d/40-dib.sh`), whose variables this test reads; a
//! missing variable or tool is a failure, never a skip. Figures (wall time,
//! peak memory, upload rates) are printed for BENCHMARKS.md; run with
//! `--nocapture` to see them.

#![cfg(feature = "real-dib")]
// Helpers outside #[test] fns panic on purpose, like the tests themselves.
#![allow(clippy::unwrap_used)]

// nodepool-dib's own test helpers, shared rather than copied.
#[path = "../../nodepool-dib/tests/common/mod.rs"]
mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::real::*;
use common::*;
use nodepool_dib::DibBuilder;
use nodepool_model::image_builder::ImageBuilder;
use tokio_util::sync::CancellationToken;

/// Resident memory of the build's processes, bytes.
fn build_rss(dir: &Path) -> u64 {
    build_processes(dir)
        .into_iter()
        .filter_map(|pid| {
            let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
            let kb: u64 = status
                .lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))?
                .split_whitespace()
                .next()?
                .parse()
                .ok()?;
            Some(kb * 1024)
        })
        .sum()
}

/// Host memory in use (MemTotal - MemAvailable), bytes.
fn host_used() -> u64 {
    let text = std::fs::read_to_string("/proc/meminfo").unwrap();
    let kb = |key: &str| -> u64 {
        text.lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|r| r.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    };
    (kb("MemTotal:") - kb("MemAvailable:")) * 1024
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_debian_image_is_built_and_verified() {
    let site = site();
    let spec = spec(site.path(), "tiny", "qcow2, raw");
    let builder = DibBuilder::default();

    // Peak memory, sampled while it builds: the host's (page cache and
    // tmpfs included, other load too) and the build processes' RSS.
    let baseline = host_used();
    let tmp = builder.tmp_dir(&spec).unwrap();
    let done = CancellationToken::new();
    let sampler = {
        let (done, tmp) = (done.clone(), tmp.clone());
        tokio::spawn(async move {
            let (mut host, mut rss) = (0u64, 0u64);
            while !done.is_cancelled() {
                host = host.max(host_used());
                rss = rss.max(build_rss(&tmp));
                tokio::select! {
                    _ = done.cancelled() => {}
                    _ = tokio::time::sleep(Duration::from_millis(250)) => {}
                }
            }
            (host, rss)
        })
    };
    let start = Instant::now();
    let result = builder.build(&spec, CancellationToken::new()).await;
    let elapsed = start.elapsed();
    done.cancel();
    let (peak, rss) = sampler.await.unwrap();
    let log = std::fs::read_to_string(&spec.log_path).unwrap();
    let out = result.unwrap_or_else(|e| {
        panic!(
            "real build failed: {e:?}\n--- {}: {}",
            spec.log_path.display(),
            why(&log)
        )
    });
    println!(
        "real-dib: qcow2+raw build took {:.1} s, peak RSS of its processes {} MiB, peak host memory +{} MiB (baseline {} MiB), {} log lines",
        elapsed.as_secs_f64(),
        rss >> 20,
        peak.saturating_sub(baseline) >> 20,
        baseline >> 20,
        log.lines().count()
    );
    assert!(log.contains("Build completed successfully\n"), "{log}");
    assert!(log.ends_with("Exit code: 0\n"));

    let qcow2 = out.get("qcow2").unwrap();
    let raw = out.get("raw").unwrap();
    for a in [qcow2, raw] {
        // Checksums recomputed by coreutils, and DIB's own files agree.
        let sha = run_ok("sha256sum", &[a.path.to_str().unwrap()]);
        assert_eq!(
            a.sha256.as_deref(),
            sha.split_whitespace().next(),
            "{}",
            a.path.display()
        );
        let md5 = run_ok("md5sum", &[a.path.to_str().unwrap()]);
        assert_eq!(a.md5.as_deref(), md5.split_whitespace().next());
        assert_eq!(a.size, std::fs::metadata(&a.path).unwrap().len());
        println!(
            "real-dib: {} {} bytes sha256 {}",
            a.format,
            a.size,
            a.sha256.as_deref().unwrap_or("")
        );
    }
    let info = run_ok("qemu-img", &["info", qcow2.path.to_str().unwrap()]);
    assert!(info.contains("file format: qcow2"), "{info}");
    assert!(
        info.contains("compat: 0.10"),
        "--qemu-img-options compat=0.10 not applied: {info}"
    );
    run_ok("qemu-img", &["check", qcow2.path.to_str().unwrap()]);
    let same = std::process::Command::new("qemu-img")
        .args(["compare", "-f", "qcow2", "-F", "raw"])
        .args([&qcow2.path, &raw.path])
        .status()
        .unwrap();
    assert!(same.success(), "qcow2 and raw differ");

    assert!(!tmp.exists(), "{} left", tmp.display());
    assert_eq!(mounts_under(&tmp), Vec::<PathBuf>::new());
    assert_eq!(loops_under(&tmp), Vec::<String>::new());

    upload_through_the_builder_runtime(site.path(), &out).await;
}

/// Uploads the real build through the builder runtime to two simulated
/// clouds, one taking qcow2 and one raw, and checks that each cloud got
/// exactly the bytes diskimage-builder wrote (the cloud hashes what it
/// receives and checks the builder's MD5 and SHA-256; here they are
/// compared again with coreutils' sums of the files).
async fn upload_through_the_builder_runtime(
    site: &Path,
    out: &nodepool_core::image_builder::BuildArtifacts,
) {
    use std::collections::BTreeMap;
    use std::sync::{Arc, Mutex};

    use nodepool_core::builder::{Builder, BuilderSettings};
    use nodepool_core::config::Driver;
    use nodepool_core::launcher::ProviderFactory;
    use nodepool_core::model::{BuildState, ImageBuild, UploadState, epoch_now};
    use nodepool_core::provider::Provider;
    use nodepool_core::store::Store;
    use nodepool_model::store::MemoryStore;
    use nodepool_openstack::api::{ApiRequest, Raw, Service};
    use nodepool_openstack::{ClientOptions, CloudsLoader, OpenStackProvider, ProviderOptions};
    use nodepool_simulated::SimulatedProvider;

    let mut yaml = site_yaml(site, "tiny", "qcow2, raw");
    yaml += "labels:\n  - name: small\nproviders:\n";
    for p in ["sim-qcow2", "sim-raw"] {
        yaml += &format!(
            "  - name: {p}\n    driver: simulated\n    image-upload-timeout: 900\n    diskimages: [{{name: tiny}}]\n    pools:\n      - name: main\n        max-servers: 1\n        labels: [{{name: small, diskimage: tiny, flavor-name: \"Fake Flavor\"}}]\n"
        );
    }
    // And the real Glance of the OpenStack testbed. The provider name is
    // unique per run: only this run's image is looked at and deleted.
    let glance_name = format!(
        "dib-glance-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    );
    yaml += &format!(
        "  - name: {glance_name}\n    driver: openstack\n    cloud: peer\n    rate: 0.1\n    image-upload-timeout: 900\n    diskimages: [{{name: tiny}}]\n    pools:\n      - name: main\n        max-servers: 1\n        labels: [{{name: small, diskimage: tiny, flavor-name: np.tiny}}]\n"
    );
    let clouds_yaml = PathBuf::from(need("NODEPOOL_TEST_CLOUDS_YAML"));
    assert!(
        clouds_yaml.is_file(),
        "{} is missing: the OpenStack testbed is not running (scripts/test.d/40-dib.sh starts it)",
        clouds_yaml.display()
    );
    let mut cfg = config(&yaml);
    // As clouds.yaml `image_format: raw` would.
    cfg.providers[1].image_format = Some("raw".into());
    cfg.providers[2].image_format = Some("qcow2".into());
    // The build DibBuilder just made, recorded as the runtime records its own.
    let store = Store::new(Arc::new(MemoryStore::new()));
    let now = epoch_now();
    let mut rec = ImageBuild::new(now, vec!["qcow2".into(), "raw".into()]);
    rec.set_state(BuildState::Ready, now);
    store.create_build("tiny", BUILD_ID, &rec).await.unwrap();

    let clouds: Arc<Mutex<BTreeMap<String, Arc<SimulatedProvider>>>> = Arc::default();
    let registry = clouds.clone();
    let glance: Arc<Mutex<Option<Arc<OpenStackProvider>>>> = Arc::default();
    let glance_slot = glance.clone();
    let loader = CloudsLoader::file(clouds_yaml);
    let factory: ProviderFactory = Arc::new(move |pc| {
        if matches!(pc.driver, Driver::OpenStack) {
            let options = ProviderOptions {
                client: ClientOptions {
                    // Glance hashes what it stores; a shared CI machine is slow.
                    timeout: Duration::from_secs(600),
                    ..ClientOptions::default()
                },
                ..ProviderOptions::default()
            };
            let p = Arc::new(
                OpenStackProvider::from_config_with(pc, &loader, options)
                    .map_err(|e| e.to_string())?,
            );
            *glance_slot.lock().unwrap() = Some(p.clone());
            return Ok(p as Arc<dyn Provider>);
        }
        let p = Arc::new(SimulatedProvider::new(pc).map_err(|e| e.to_string())?);
        registry.lock().unwrap().insert(pc.name.clone(), p.clone());
        Ok(p as Arc<dyn Provider>)
    });
    let builder = Builder::new(
        store.clone(),
        factory,
        Arc::new(DibBuilder::default()),
        BuilderSettings {
            // One at a time, so each upload's time is its own.
            upload_workers: 1,
            max_pass_interval: Duration::from_millis(500),
            ..BuilderSettings::default()
        },
    );
    let (_tx, rx) = tokio::sync::watch::channel(std::sync::Arc::new(cfg));
    let stop = CancellationToken::new();
    let start = Instant::now();
    let task = tokio::spawn(builder.run(rx, stop.clone()));
    let mut ready_at: BTreeMap<String, f64> = BTreeMap::new();
    let deadline = Instant::now() + Duration::from_secs(900);
    while ready_at.len() < 3 {
        assert!(Instant::now() < deadline, "uploads not ready within 900 s");
        let st = store.image_state().await.unwrap();
        assert!(st.builds.len() == 1, "the runtime built again: {st:#?}");
        for u in &st.uploads {
            assert_ne!(u.upload.state, UploadState::Failed, "{u:#?}");
            if u.upload.state == UploadState::Ready {
                ready_at
                    .entry(u.provider.clone())
                    .or_insert_with(|| start.elapsed().as_secs_f64());
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.cancel();
    task.await.unwrap().unwrap();
    let st = store.image_state().await.unwrap();
    let mut first_done = 0.0f64;
    let mut order: Vec<(&String, &f64)> = ready_at.iter().collect();
    order.sort_by(|a, b| a.1.total_cmp(b.1));
    for (provider, at) in order {
        let fmt = if provider == "sim-raw" {
            "raw"
        } else {
            "qcow2"
        };
        let a = out.get(fmt).unwrap();
        let u = st.uploads.iter().find(|u| &u.provider == provider).unwrap();
        assert_eq!(u.upload.format.as_deref(), Some(fmt));
        let secs = at - first_done;
        first_done = *at;
        if *provider == glance_name {
            // Glance's own record of what it stored: its MD5 and size of
            // the bytes it received, and our properties.
            let p = glance.lock().unwrap().clone().unwrap();
            let id = u.upload.external_id.clone().unwrap();
            let shown = p
                .client()
                .execute(&Raw(ApiRequest::get(
                    Service::Image,
                    format!("images/{id}"),
                )))
                .await
                .unwrap_or_else(|e| panic!("GET images/{id}: {e}"))
                .json()
                .unwrap();
            // Removed before the checks, so a failed check leaves no image.
            p.delete_image(&id).await.unwrap();
            let md5 = run_ok("md5sum", &[a.path.to_str().unwrap()]);
            assert_eq!(shown["status"], "active", "{shown}");
            assert_eq!(shown["checksum"].as_str(), md5.split_whitespace().next());
            assert_eq!(shown["size"].as_u64(), Some(a.size));
            assert_eq!(shown["disk_format"], "qcow2");
            assert_eq!(shown["nodepool_build_id"], BUILD_ID);
            assert_eq!(shown["nodepool_provider_name"], glance_name.as_str());
            println!(
                "real-dib: builder runtime uploaded {fmt} ({} bytes) to the testbed's Glance in {secs:.1} s ({:.0} MiB/s, Glance's MD5 verified)",
                a.size,
                a.size as f64 / 1048576.0 / secs.max(0.001)
            );
            continue;
        }
        let cloud = clouds.lock().unwrap().get(provider).cloned().unwrap();
        let images = cloud.list_images().await.unwrap();
        assert_eq!(images.len(), 1);
        let img = &images[0];
        assert_eq!(u.upload.external_id.as_deref(), Some(img.id.as_str()));
        let sha = run_ok("sha256sum", &[a.path.to_str().unwrap()]);
        assert_eq!(
            img.properties
                .get("owner_specified.openstack.sha256")
                .map(String::as_str),
            sha.split_whitespace().next(),
            "{provider}"
        );
        let md5 = run_ok("md5sum", &[a.path.to_str().unwrap()]);
        assert_eq!(
            img.properties
                .get("owner_specified.openstack.md5")
                .map(String::as_str),
            md5.split_whitespace().next()
        );
        assert_eq!(img.properties["nodepool_build_id"], BUILD_ID);
        println!(
            "real-dib: builder runtime uploaded {fmt} ({} bytes) to the simulated cloud in {secs:.1} s ({:.0} MiB/s, checksums verified)",
            a.size,
            a.size as f64 / 1048576.0 / secs.max(0.001)
        );
    }
}
