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
    let yaml = format!(
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
    );
    spec_from_config(&config(&yaml), image, "5eed0001")
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
