//! Helpers of the real diskimage-builder tests (feature `real-dib`, here
//! and in `nodepool-tests`): the DIB testbed's variables, the testbed's
//! image as a spec, the build's processes, and why a build failed.

use std::path::Path;

use nodepool_model::image_builder::BuildSpec;

use super::{alive, config, is_root, spec_from_config};

/// A variable `testbed/dib/setup.sh` sets; missing is a failure, never a
/// skip.
pub fn need(var: &str) -> String {
    match std::env::var(var) {
        Ok(v) if !v.is_empty() => v,
        _ => panic!(
            "{var} is not set: the real-dib tests need the DIB testbed; run \
             `eval \"$(testbed/dib/setup.sh)\"` (as root) or scripts/test.d/40-dib.sh"
        ),
    }
}

/// Runs a program that must succeed; its standard output.
pub fn run_ok(program: &str, args: &[&str]) -> String {
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
pub fn site() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("nodepool-dib-real-")
        .tempdir_in("/var/tmp")
        .unwrap()
}

/// The testbed's image: Debian bookworm `debian-minimal vm` plus the
/// `tiny-ssh` element from `elements-dir`, mirrors from the testbed.
pub fn spec(site: &Path, image: &str, formats: &str) -> BuildSpec {
    spec_from_config(&config(&site_yaml(site, image, formats)), image, BUILD_ID)
}

/// The build id of the real builds (hex, as the builder runtime parses
/// build ids out of file names).
pub const BUILD_ID: &str = "5eed0001";

/// The configuration of [`spec`]'s image, as YAML (providers can be
/// appended).
pub fn site_yaml(site: &Path, image: &str, formats: &str) -> String {
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
pub fn why(log: &str) -> String {
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
pub fn build_processes(dir: &Path) -> Vec<i32> {
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
