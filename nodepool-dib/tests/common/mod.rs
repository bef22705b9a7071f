//! Helpers shared by the test binaries: specs from real `nodepool.yaml`
//! text, independent procfs/mountinfo/sysfs checks, bounded polling; and
//! (`real`) what the real diskimage-builder tests share. `nodepool-tests`
//! includes this module too, for its builder runtime and real-DIB tests.

#![allow(dead_code, clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use nodepool_model::config::Config;
use nodepool_model::image_builder::BuildSpec;

pub mod real;

/// A spec for `image` of a configuration, laid out as the builder runtime
/// does: `<images-dir>/<image>-<id>`, `<build-log-dir>/<image>-<id>.log`,
/// formats from the diskimage and its providers.
pub fn spec_from_config(config: &Config, image: &str, build_id: &str) -> BuildSpec {
    let di = config
        .diskimage(image)
        .unwrap_or_else(|| panic!("no diskimage {image}"))
        .clone();
    let images = config.images_dir.clone().expect("images-dir");
    BuildSpec {
        formats: config.diskimage_formats(image).into_iter().collect(),
        build_id: build_id.into(),
        output_base: images.join(format!("{image}-{build_id}")),
        log_path: config.build_log_dir.join(format!("{image}-{build_id}.log")),
        elements_dir: config.elements_dir.clone(),
        timeout: di.build_timeout,
        progress: Default::default(),
        image: di,
    }
}

/// Parses YAML, panicking with every error.
pub fn config(yaml: &str) -> Config {
    match Config::from_yaml(yaml) {
        Ok(c) => c,
        Err(e) => panic!("bad test config: {e}\n{yaml}"),
    }
}

/// Live (non-zombie) processes of a group, read from procfs here rather
/// than through the crate's own code.
pub fn live_group_members(pgid: i32) -> Vec<i32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let Some(close) = stat.rfind(')') else {
            continue;
        };
        let f: Vec<&str> = stat[close + 1..].split_whitespace().collect();
        if f.len() > 2 && f[2].parse::<i32>() == Ok(pgid) && f[0] != "Z" && f[0] != "X" {
            out.push(pid);
        }
    }
    out
}

/// Whether a pid is a live (non-zombie) process.
pub fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            let close = s.rfind(')')?;
            s[close + 1..]
                .split_whitespace()
                .next()
                .map(|st| st != "Z" && st != "X")
        })
        .unwrap_or(false)
}

/// Mount points at or under `dir` (mountinfo, unescaped for spaces only).
pub fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|m| PathBuf::from(m.replace("\\040", " ")))
        .filter(|m| m.starts_with(dir))
        .collect()
}

/// Loop devices whose backing file is under `dir`.
pub fn loops_under(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/sys/block").unwrap().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if let Ok(b) = std::fs::read_to_string(e.path().join("loop/backing_file")) {
            let b = b.trim_end().trim_end_matches(" (deleted)");
            if Path::new(b).starts_with(dir) {
                out.push(name);
            }
        }
    }
    out
}

/// Whether this process runs as root (`/proc/self` belongs to the euid).
pub fn is_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self")
        .map(|m| m.uid() == 0)
        .unwrap_or(false)
}

/// Polls `cond` every 10 ms until it holds; panics naming `what` after
/// `limit`. Waits on a real condition, never a fixed sleep.
pub async fn wait_for(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + limit;
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// `pid N pgid G` and `child C` as the fake prints them.
pub fn fake_pids(log: &str) -> (Option<i32>, Option<i32>) {
    let num_after = |key: &str| {
        log.lines().find_map(|l| {
            let i = l.find(key)?;
            l[i + key.len()..].split_whitespace().next()?.parse().ok()
        })
    };
    (num_after(" pgid "), num_after(", child "))
}

/// Lowercase hex SHA-256 of a file, computed here.
pub fn sha256_of(path: &Path) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(std::fs::read(path).unwrap()))
}
