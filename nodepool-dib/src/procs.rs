//! Finding a build's processes through procfs.
//!
//! Two ways, because a build's processes can leave its process group
//! (`setsid`, a daemon started in the chroot): members of the group, and
//! processes tied to the build's `TMP_DIR` (their root or working directory
//! is under it, as for everything chrooted into the image, or their
//! environment carries that `TMP_DIR`). Zombies are dead already and are
//! not counted: they hold no mounts and no files, only a pid until their
//! parent (or init) reaps them.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// State letter and process group of a live (non-zombie) process.
fn stat(pid: i32) -> Option<(u8, i32)> {
    let text = std::fs::read(format!("/proc/{pid}/stat")).ok()?;
    // "pid (comm) S ppid pgrp ...": comm may hold spaces and parentheses,
    // so fields are counted from the last ')'.
    let close = text.iter().rposition(|&b| b == b')')?;
    let rest = std::str::from_utf8(&text[close + 1..]).ok()?;
    let mut fields = rest.split_ascii_whitespace();
    let state = fields.next()?.bytes().next()?;
    let _ppid = fields.next()?;
    let pgrp = fields.next()?.parse().ok()?;
    Some((state, pgrp))
}

fn pids() -> Vec<i32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect()
}

fn alive(state: u8) -> bool {
    state != b'Z' && state != b'X'
}

/// Live processes whose process group is `pgid`.
pub fn group_members(pgid: i32) -> Vec<i32> {
    pids()
        .into_iter()
        .filter(|&pid| matches!(stat(pid), Some((s, g)) if g == pgid && alive(s)))
        .collect()
}

/// Live processes (other than this one) rooted in, working in, or carrying
/// a `TMP_DIR` under `dir`.
pub fn tied_to_dir(dir: &Path) -> Vec<i32> {
    let me = std::process::id() as i32;
    pids()
        .into_iter()
        .filter(|&pid| pid != me)
        .filter(|&pid| matches!(stat(pid), Some((s, _)) if alive(s)))
        .filter(|&pid| {
            let under = |link: &str| {
                std::fs::read_link(format!("/proc/{pid}/{link}"))
                    .map(|p| p.starts_with(dir))
                    .unwrap_or(false)
            };
            under("root") || under("cwd") || env_mentions(pid, dir)
        })
        .collect()
}

fn env_mentions(pid: i32, dir: &Path) -> bool {
    let Ok(env) = std::fs::read(format!("/proc/{pid}/environ")) else {
        return false;
    };
    env.split(|&b| b == 0).any(|kv| {
        kv.strip_prefix(b"TMP_DIR=")
            .is_some_and(|v| Path::new(OsStr::from_bytes(v)).starts_with(dir))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_a_process_by_group_and_by_tmp_dir() {
        use std::os::unix::process::CommandExt;
        let dir = tempfile::tempdir().unwrap();
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .env("TMP_DIR", dir.path().join("sub"))
            .process_group(0)
            .spawn()
            .unwrap();
        let pid = child.id() as i32;
        assert_eq!(group_members(pid), [pid]);
        // spawn returns once the child's exec has replaced its memory, but
        // the kernel fills in the new environment's bounds a moment later:
        // until then /proc/PID/environ reads empty. Poll for it (bounded).
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let mut tied = tied_to_dir(dir.path());
        while tied.is_empty() && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(10));
            tied = tied_to_dir(dir.path());
        }
        assert_eq!(tied, [pid]);
        assert!(tied_to_dir(&dir.path().join("other")).is_empty());
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(group_members(pid).is_empty());
    }

    #[test]
    fn finds_a_process_by_working_directory() {
        let dir = tempfile::tempdir().unwrap();
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .current_dir(dir.path())
            .spawn()
            .unwrap();
        let pid = child.id() as i32;
        assert!(tied_to_dir(dir.path()).contains(&pid));
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(!tied_to_dir(dir.path()).contains(&pid));
    }
}
