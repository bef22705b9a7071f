//! Real diskimage-builder builds (feature `real-dib`; ~5 minutes, root).
//!
//! Set up by `testbed/dib/setup.sh` (run by `scripts/test.d/40-dib.sh`),
//! whose variables these tests read; a missing variable or tool is a
//! failure, never a skip. Figures (wall time, peak memory, cancel-to-clean
//! time) are printed for BENCHMARKS.md; run with `--nocapture` to see them.

#![cfg(feature = "real-dib")]
// Helpers outside #[test] fns panic on purpose, like the tests themselves.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;
use nodepool_core::image_builder::{BuildError, BuildSpec, ImageBuilder};
use nodepool_dib::{DibBuilder, DibOptions};
use tokio_util::sync::CancellationToken;

/// Real builds share two cores and the debootstrap cache: one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn need(var: &str) -> String {
    match std::env::var(var) {
        Ok(v) if !v.is_empty() => v,
        _ => panic!(
            "{var} is not set: the real-dib tests need the DIB testbed; run \
             `eval \"$(testbed/dib/setup.sh)\"` (as root) or scripts/test.d/40-dib.sh"
        ),
    }
}

fn run_ok(program: &str, args: &[&str]) -> String {
    let o = std::process::Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program} (missing tooling?): {e}"));
    assert!(
        o.status.success(),
        "{program} {args:?}: {}\n{}",
        o.status,
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// A work area on disk (a qcow2 and a 1.6 GiB raw are written).
fn site() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("nodepool-dib-real-")
        .tempdir_in("/var/tmp")
        .unwrap()
}

/// The testbed's image: Debian bookworm `debian-minimal vm` plus the
/// `tiny-ssh` element from `elements-dir`, mirrors from the testbed.
fn spec(site: &Path, image: &str, formats: &str) -> BuildSpec {
    spec_from_config(&config(&site_yaml(site, image, formats)), image, BUILD_ID)
}

/// The build id of the real builds (hex, as the builder runtime parses
/// build ids out of file names).
const BUILD_ID: &str = "5eed0001";

/// The configuration of [`spec`]'s image, as YAML (providers can be
/// appended).
fn site_yaml(site: &Path, image: &str, formats: &str) -> String {
    assert!(
        is_root(),
        "real diskimage-builder builds need root (loop devices, mount, chroot)"
    );
    let cmd = need("NODEPOOL_TEST_DIB_CMD");
    assert!(
        Path::new(&cmd).is_file(),
        "{cmd} is missing: rerun testbed/dib/setup.sh"
    );
    run_ok("qemu-img", &["--version"]);
    format!(
        r#"images-dir: {site}/images
build-log-dir: {site}/logs
elements-dir: {elements}
diskimages:
  - name: {image}
    dib-cmd: {cmd}
    elements: [debian-minimal, vm, tiny-ssh]
    release: bookworm
    formats: [{formats}]
    build-timeout: 1500
    env-vars:
      PATH: "{path}"
      DIB_DISTRIBUTION_MIRROR: "{mirror}"
      DIB_DEBIAN_SECURITY_MIRROR: "{security}"
      DIB_DEBOOTSTRAP_CACHE: "1"
      DIB_DEBIAN_USE_DEBOOTSTRAP_CACHE: "1"
"#,
        site = site.display(),
        elements = need("NODEPOOL_TEST_DIB_ELEMENTS"),
        path = need("NODEPOOL_TEST_DIB_PATH"),
        mirror = need("NODEPOOL_TEST_DIB_MIRROR"),
        security = need("NODEPOOL_TEST_DIB_SECURITY_MIRROR"),
    )
}

/// The lines of a failed DIB log that say why: errors, and what ran just
/// before the EXIT trap (with `-x` the log is ~20k lines).
fn why(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    let errors: Vec<usize> = (0..lines.len())
        .filter(|&i| {
            let l = lines[i];
            (l.contains("| E: ") && !l.contains("Can not write log"))
                || l.contains("ERROR")
                || l.contains("rror:")
        })
        .collect();
    // What ran up to the first real error, else up to the EXIT trap.
    let end = errors.first().map(|&i| i + 1).unwrap_or_else(|| {
        lines
            .iter()
            .rposition(|l| l.contains("trap_cleanup:"))
            .unwrap_or(lines.len())
    });
    let mut out: Vec<&str> = errors.iter().take(20).map(|&i| lines[i]).collect();
    out.push("--- before the first error:");
    out.extend(&lines[end.saturating_sub(80)..end]);
    out.join("\n")
}

/// Processes whose environment has `TMP_DIR` under `dir`: the build's.
fn build_processes(dir: &Path) -> Vec<i32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(env) = std::fs::read(format!("/proc/{pid}/environ")) else {
            continue;
        };
        let ours = env.split(|&b| b == 0).any(|kv| {
            kv.strip_prefix(b"TMP_DIR=")
                .is_some_and(|v| Path::new(&*String::from_utf8_lossy(v)).starts_with(dir))
        });
        if ours && alive(pid) {
            out.push(pid);
        }
    }
    out
}

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
    let _one = SERIAL.lock().await;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_build_killed_mid_way_leaves_nothing() {
    let _one = SERIAL.lock().await;
    let site = site();
    let spec = spec(site.path(), "killed", "qcow2");
    // No grace: SIGKILL at once, the case where DIB's own trap cleans
    // nothing (8 mounts, a loop device, partition nodes) and the sweep
    // must do it all.
    let grace = std::env::var("NODEPOOL_TEST_DIB_GRACE_S")
        .ok()
        .and_then(|s| s.parse().ok())
        .map_or(Duration::ZERO, Duration::from_secs);
    let builder = DibBuilder::new(DibOptions::default().with_term_grace(grace));
    let tmp = builder.tmp_dir(&spec).unwrap();
    let cancel = CancellationToken::new();
    let start = Instant::now();
    let task = {
        let (b, s, c) = (builder.clone(), spec.clone(), cancel.clone());
        tokio::spawn(async move { b.build(&s, c).await })
    };
    // Mid-way = while it finalises the image: on a loop device, mounted,
    // with /proc, /sys, /dev bound into its chroot (the most there is to
    // leak).
    let log_path = spec.log_path.clone();
    wait_for(
        "a loop device and mounts under the build's TMP_DIR",
        Duration::from_secs(900),
        || {
            if task.is_finished() {
                let log = std::fs::read_to_string(&log_path).unwrap_or_default();
                panic!(
                    "the build ended before it attached a loop device: {}",
                    why(&log)
                );
            }
            !loops_under(&tmp).is_empty() && mounts_under(&tmp).len() >= 4
        },
    )
    .await;
    let mounts = mounts_under(&tmp);
    let loops = loops_under(&tmp);
    let procs = build_processes(&tmp);
    assert!(!procs.is_empty());
    println!(
        "real-dib: cancelling after {:.1} s with {} mounts {mounts:?}, loop devices {loops:?}, {} processes",
        start.elapsed().as_secs_f64(),
        mounts.len(),
        procs.len()
    );

    let t0 = Instant::now();
    cancel.cancel();
    let e = task.await.unwrap().unwrap_err();
    let cleaned = t0.elapsed();
    assert_eq!(e, BuildError::Cancelled);
    println!(
        "real-dib: cancel to everything cleaned up: {:.2} s (grace {grace:?})",
        cleaned.as_secs_f64()
    );
    assert_eq!(mounts_under(&tmp), Vec::<PathBuf>::new(), "mounts left");
    assert_eq!(loops_under(&tmp), Vec::<String>::new(), "loop devices left");
    for l in &loops {
        let links: Vec<_> = std::fs::read_dir("/dev/mapper")
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| n.starts_with(&format!("{l}p")))
                    .collect()
            })
            .unwrap_or_default();
        assert!(links.is_empty(), "/dev/mapper links left: {links:?}");
    }
    let survivors: Vec<_> = procs.iter().copied().filter(|&p| alive(p)).collect();
    assert_eq!(survivors, Vec::<i32>::new(), "build processes survived");
    assert_eq!(build_processes(&tmp), Vec::<i32>::new());
    assert!(!tmp.exists(), "{} left", tmp.display());
    let log = std::fs::read_to_string(&spec.log_path).unwrap();
    assert!(
        // SIGKILL, or SIGTERM after DIB's trap ran (a shell shows it as 143).
        ["Exit code: -9\n", "Exit code: -15\n", "Exit code: 143\n"]
            .iter()
            .any(|e| log.ends_with(e)),
        "{}",
        &log[log.len().saturating_sub(500)..]
    );
}
