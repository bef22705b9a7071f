//! Real diskimage-builder builds (feature `real-dib`; ~2 minutes, root):
//! a build killed mid-way leaves nothing behind. The real build that is
//! verified and uploaded through the builder runtime (to simulated clouds
//! and the OpenStack testbed's Glance) is a whole-system test in
//! `nodepool-tests` (`tests/tests/real_dib.rs`); `scripts/test.d/40-dib.sh`
//! runs both.
//!
//! Set up by `testbed/dib/setup.sh` (run by `scripts/test.d/40-dib.sh`),
//! whose variables these tests read; a missing variable or tool is a
//! failure, never a skip. Figures (cancel-to-clean time) are printed for
//! BENCHMARKS.md; run with `--nocapture` to see them.

#![cfg(feature = "real-dib")]
// Helpers outside #[test] fns panic on purpose, like the tests themselves.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::real::*;
use common::*;
use nodepool_dib::{DibBuilder, DibOptions};
use nodepool_model::image_builder::{BuildError, ImageBuilder};
use tokio_util::sync::CancellationToken;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_build_killed_mid_way_leaves_nothing() {
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
