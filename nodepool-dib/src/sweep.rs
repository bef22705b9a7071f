//! Removing what a build leaves behind, whatever way it ended.
//!
//! What leaks is measured (`dib-notes.md`): a diskimage-builder killed with
//! SIGKILL leaves about eight mounts under its `TMP_DIR` (the image's root
//! and the `/proc`, `/sys`, `/dev` binds into its chroot), an attached loop
//! device with partition nodes, `/dev/mapper/loopNpM` links made by the
//! kpartx replacement, its temp directories and a `<base>.<format>-new`
//! file. Because every build gets a `TMP_DIR` of its own, "under that
//! directory" identifies all of them without touching other builds.
//!
//! The order matters: processes first (they keep mounts busy), then mounts
//! deepest first (a bind mount inside the image root before the root), then
//! loop devices (a mounted one cannot be detached), and only then files —
//! and the directory is removed only when no mount is left under it, so
//! that a bind of the host's `/dev` can never be deleted through it.
//!
//! The sweep is synchronous (it runs in `spawn_blocking`, or on a thread of
//! its own when a build future is dropped) and never fails: it does what it
//! can and reports what it did and what it could not.

use std::ffi::OsString;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::mount::{MntFlags, umount2};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::procs;

/// How long the sweep waits for killed processes to disappear.
const PROCESS_WAIT: Duration = Duration::from_secs(10);
/// How long the sweep waits for detached loop devices to disappear.
const LOOP_WAIT: Duration = Duration::from_secs(10);

/// What one sweep did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SweepReport {
    /// Processes tied to the directory that were killed.
    pub killed: Vec<i32>,
    /// Mount points unmounted, in order.
    pub unmounted: Vec<PathBuf>,
    /// Loop devices detached (`/dev/loopN`).
    pub loops_detached: Vec<PathBuf>,
    /// `/dev/mapper` links removed.
    pub mapper_links_removed: Vec<PathBuf>,
    /// Partial output files (`*-new`, `*-intermediate`) removed.
    pub partials_removed: Vec<PathBuf>,
    /// Whether the temporary directory was removed (or was not there).
    pub dir_removed: bool,
    /// What could not be cleaned, one sentence each.
    pub problems: Vec<String>,
}

impl SweepReport {
    /// Whether anything was left behind by the build (killed, unmounted,
    /// detached, removed partial files).
    pub fn found_leftovers(&self) -> bool {
        !(self.killed.is_empty()
            && self.unmounted.is_empty()
            && self.loops_detached.is_empty()
            && self.mapper_links_removed.is_empty()
            && self.partials_removed.is_empty())
    }
}

/// Cleans up after the build whose `TMP_DIR` is `tmp_dir` and whose output
/// base path is `output_base` (for `<base>.*-new` files).
pub fn sweep(tmp_dir: &Path, output_base: Option<&Path>) -> SweepReport {
    let mut report = SweepReport::default();
    // The kernel reports canonical paths in mountinfo and sysfs.
    let dir = std::fs::canonicalize(tmp_dir).unwrap_or_else(|_| tmp_dir.to_path_buf());

    kill_tied_processes(&dir, &mut report);
    unmount_under(&dir, &mut report);
    detach_loops(&dir, &mut report);
    if let Some(base) = output_base {
        remove_partials(base, &mut report);
    }
    remove_dir(&dir, &mut report);
    report
}

fn kill_tied_processes(dir: &Path, report: &mut SweepReport) {
    let deadline = Instant::now() + PROCESS_WAIT;
    loop {
        let pids = procs::tied_to_dir(dir);
        if pids.is_empty() {
            return;
        }
        for &pid in &pids {
            if kill(Pid::from_raw(pid), Signal::SIGKILL).is_ok() && !report.killed.contains(&pid) {
                report.killed.push(pid);
            }
        }
        if Instant::now() >= deadline {
            report.problems.push(format!(
                "processes {pids:?} under {} survive SIGKILL",
                dir.display()
            ));
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Mount points at or under `dir`, from `/proc/self/mountinfo`, in mount
/// order.
pub fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let Ok(text) = std::fs::read("/proc/self/mountinfo") else {
        return Vec::new();
    };
    text.split(|&b| b == b'\n')
        .filter_map(|line| line.split(|&b| b == b' ').nth(4))
        .map(|field| PathBuf::from(OsString::from_vec(unescape_mountinfo(field))))
        .filter(|p| p.starts_with(dir))
        .collect()
}

/// mountinfo writes space, tab, newline and backslash as `\ooo`.
fn unescape_mountinfo(field: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(field.len());
    let mut i = 0;
    while i < field.len() {
        if field[i] == b'\\' && i + 3 < field.len() {
            let oct = &field[i + 1..i + 4];
            if oct.iter().all(|b| (b'0'..=b'7').contains(b)) {
                out.push((oct[0] - b'0') * 64 + (oct[1] - b'0') * 8 + (oct[2] - b'0'));
                i += 4;
                continue;
            }
        }
        out.push(field[i]);
        i += 1;
    }
    out
}

fn unmount_under(dir: &Path, report: &mut SweepReport) {
    // Stacked mounts and mounts revealed by an unmount need several rounds;
    // a round that unmounts nothing ends it.
    for _ in 0..16 {
        let found = mounts_under(dir);
        if found.is_empty() {
            return;
        }
        // Deepest first; among equals, the latest mounted first.
        let mut order: Vec<(usize, usize)> = found
            .iter()
            .enumerate()
            .map(|(i, p)| (p.components().count(), i))
            .collect();
        order.sort_by(|a, b| b.cmp(a));
        let mounts: Vec<&PathBuf> = order.iter().map(|&(_, i)| &found[i]).collect();
        let mut progress = false;
        for m in mounts {
            let r = umount2(m.as_path(), MntFlags::empty())
                .or_else(|_| umount2(m.as_path(), MntFlags::MNT_DETACH));
            match r {
                Ok(()) => {
                    progress = true;
                    report.unmounted.push(m.clone());
                }
                Err(e) => {
                    tracing::debug!(mount = %m.display(), error = %e, "umount failed; retrying")
                }
            }
        }
        if !progress {
            break;
        }
    }
    let left = mounts_under(dir);
    if !left.is_empty() {
        report.problems.push(format!(
            "could not unmount {}",
            left.iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
}

/// Loop devices whose backing file is under `dir`: `(/dev/loopN, loopN)`.
pub fn loops_backed_under(dir: &Path) -> Vec<(PathBuf, String)> {
    let Ok(entries) = std::fs::read_dir("/sys/block") else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !name.starts_with("loop") {
            continue;
        }
        let Ok(backing) = std::fs::read(e.path().join("loop/backing_file")) else {
            continue;
        };
        let mut backing = backing.as_slice();
        while backing.last() == Some(&b'\n') {
            backing = &backing[..backing.len() - 1];
        }
        // A deleted backing file is reported with this suffix.
        let backing = backing.strip_suffix(b" (deleted)").unwrap_or(backing);
        if Path::new(std::ffi::OsStr::from_bytes(backing)).starts_with(dir) {
            out.push((PathBuf::from(format!("/dev/{name}")), name));
        }
    }
    out.sort();
    out
}

fn run_tool(program: &str, args: &[&std::ffi::OsStr]) -> Result<(), String> {
    match std::process::Command::new(program)
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
    {
        Ok(o) if o.status.success() => Ok(()),
        Ok(o) => Err(format!(
            "{program} {}: {} {}",
            args.iter()
                .map(|a| a.to_string_lossy())
                .collect::<Vec<_>>()
                .join(" "),
            o.status,
            String::from_utf8_lossy(&o.stderr).trim()
        )),
        Err(e) => Err(format!("cannot run {program}: {e}")),
    }
}

fn detach_loops(dir: &Path, report: &mut SweepReport) {
    for (dev, name) in loops_backed_under(dir) {
        // Partition nodes first (partx made them; a detach does not always
        // remove them), then the links the kpartx replacement made.
        let _ = run_tool("partx", &[std::ffi::OsStr::new("-d"), dev.as_os_str()]);
        if let Ok(entries) = std::fs::read_dir("/dev/mapper") {
            for e in entries.flatten() {
                let fname = e.file_name();
                let is_ours = fname
                    .to_str()
                    .and_then(|f| f.strip_prefix(name.as_str()))
                    .is_some_and(|rest| {
                        rest.strip_prefix('p')
                            .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
                    });
                let is_link = e.file_type().map(|t| t.is_symlink()).unwrap_or(false);
                if is_ours && is_link {
                    match std::fs::remove_file(e.path()) {
                        Ok(()) => report.mapper_links_removed.push(e.path()),
                        Err(err) => report
                            .problems
                            .push(format!("cannot remove {}: {err}", e.path().display())),
                    }
                }
            }
        }
        match run_tool("losetup", &[std::ffi::OsStr::new("-d"), dev.as_os_str()]) {
            Ok(()) => report.loops_detached.push(dev),
            Err(e) => report.problems.push(e),
        }
    }
    // losetup -d on a device someone else has open (a concurrent
    // `losetup -f` probing it, blkid) only marks it for autoclear: it goes
    // when that holder closes it, normally within milliseconds.
    let deadline = Instant::now() + LOOP_WAIT;
    let mut left = loops_backed_under(dir);
    while !left.is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
        left = loops_backed_under(dir);
    }
    if !left.is_empty() {
        report.problems.push(format!(
            "loop devices still attached: {}",
            left.iter()
                .map(|(d, _)| d.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
}

fn remove_partials(base: &Path, report: &mut SweepReport) {
    let (Some(parent), Some(stem)) = (base.parent(), base.file_name()) else {
        return;
    };
    let mut prefix = stem.as_bytes().to_vec();
    prefix.push(b'.');
    let Ok(entries) = std::fs::read_dir(parent) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let n = name.as_bytes();
        if n.starts_with(&prefix) && (n.ends_with(b"-new") || n.ends_with(b"-intermediate")) {
            match std::fs::remove_file(e.path()) {
                Ok(()) => report.partials_removed.push(e.path()),
                Err(err) => report
                    .problems
                    .push(format!("cannot remove {}: {err}", e.path().display())),
            }
        }
    }
}

fn remove_dir(dir: &Path, report: &mut SweepReport) {
    let Ok(meta) = std::fs::symlink_metadata(dir) else {
        report.dir_removed = true;
        return;
    };
    if !mounts_under(dir).is_empty() {
        report.problems.push(format!(
            "{} not removed: mounts are left under it",
            dir.display()
        ));
        return;
    }
    match remove_tree(dir, meta.dev()) {
        Ok(()) => report.dir_removed = true,
        Err(e) => report
            .problems
            .push(format!("cannot remove {}: {e}", dir.display())),
    }
}

/// `rm -r --one-file-system`: never descends into another filesystem, as a
/// second guard after the mount check.
fn remove_tree(path: &Path, dev: u64) -> std::io::Result<()> {
    let meta = std::fs::symlink_metadata(path)?;
    if meta.is_dir() {
        if meta.dev() != dev {
            return Err(std::io::Error::other(format!(
                "{} is on another filesystem",
                path.display()
            )));
        }
        for e in std::fs::read_dir(path)? {
            remove_tree(&e?.path(), dev)?;
        }
        std::fs::remove_dir(path)
    } else {
        std::fs::remove_file(path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_escapes() {
        assert_eq!(unescape_mountinfo(br"/a\040b\011c\134d"), b"/a b\tc\\d");
        assert_eq!(unescape_mountinfo(br"/x\04"), br"/x\04");
        assert_eq!(unescape_mountinfo(br"/plain"), b"/plain");
    }

    #[test]
    fn removes_the_dir_and_partials_but_nothing_else() {
        let root = tempfile::tempdir().unwrap();
        let tmp = root.path().join("img-1");
        std::fs::create_dir_all(tmp.join("dib_build.x/mnt/etc")).unwrap();
        std::fs::write(tmp.join("dib_build.x/mnt/etc/hostname"), "x").unwrap();
        std::os::unix::fs::symlink("/etc", tmp.join("dib_build.x/link")).unwrap();
        let base = root.path().join("img-1");
        let out = |s: &str| root.path().join(format!("img-1{s}"));
        for s in [".qcow2-new", ".vhd-intermediate", ".raw", ".raw.md5", ".d"] {
            if s == ".d" {
                std::fs::create_dir(out(s)).unwrap();
            } else {
                std::fs::write(out(s), "x").unwrap();
            }
        }
        std::fs::write(root.path().join("img-10.qcow2-new"), "other build").unwrap();
        let r = sweep(&tmp, Some(&base));
        assert!(r.dir_removed, "{r:?}");
        assert!(r.problems.is_empty(), "{r:?}");
        assert!(!tmp.exists());
        assert!(Path::new("/etc/hostname").exists() || Path::new("/etc").exists());
        let mut partials = r.partials_removed.clone();
        partials.sort();
        assert_eq!(partials, [out(".qcow2-new"), out(".vhd-intermediate")]);
        assert!(out(".raw").exists() && out(".raw.md5").exists() && out(".d").exists());
        assert!(root.path().join("img-10.qcow2-new").exists());
        assert!(r.found_leftovers());
    }

    #[test]
    fn a_missing_dir_is_fine() {
        let root = tempfile::tempdir().unwrap();
        let r = sweep(&root.path().join("never-made"), None);
        assert!(r.dir_removed);
        assert!(r.problems.is_empty());
        assert!(!r.found_leftovers());
    }
}
