//! One VM's files and process.
//!
//! Each server is a directory `<image-dir>/servers/<id>/`: `server.json`
//! (what was asked: name, metadata, flavor, forwarded port), the overlay
//! `disk.qcow2` over its image, `config-drive.img`, `console.log` (the
//! serial port), `qemu.pid` (written by QEMU) and `started` (written once
//! QEMU reported a successful start). QEMU daemonizes into its own session,
//! so a VM outlives the launcher that started it; everything about it can
//! be read back from the directory and `/proc`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use indexmap::IndexMap;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};

/// `server.json`: what a server was created with.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct ServerRecord {
    pub id: String,
    pub name: String,
    pub metadata: IndexMap<String, String>,
    pub flavor: String,
    pub vcpus: i64,
    pub ram: i64,
    /// The host port forwarded to the guest's SSH port.
    pub port: u16,
    /// Image id it boots.
    pub image: String,
}

/// A server directory's file names.
pub(crate) const RECORD: &str = "server.json";
pub(crate) const OVERLAY: &str = "disk.qcow2";
pub(crate) const CONSOLE: &str = "console.log";
pub(crate) const PIDFILE: &str = "qemu.pid";
pub(crate) const STARTED: &str = "started";
pub(crate) const CONFIG_DRIVE: &str = "config-drive.img";

/// What a server's process is doing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Liveness {
    /// Not started yet (a create in progress, or one interrupted).
    NotStarted,
    /// Our QEMU process runs, in this process group.
    Running { pid: i32, pgid: i32 },
    /// It was started and is gone.
    Gone,
}

/// Reads a server's record; `None` when the directory has none.
pub(crate) fn read_record(dir: &Path) -> Option<ServerRecord> {
    let text = std::fs::read_to_string(dir.join(RECORD)).ok()?;
    serde_json::from_str(&text).ok()
}

/// Whether the server's QEMU runs: the pid of its pid file is alive and
/// its command line names this directory (a reused pid is someone else's).
pub(crate) fn liveness(dir: &Path) -> Liveness {
    let pid = std::fs::read_to_string(dir.join(PIDFILE))
        .ok()
        .and_then(|s| s.trim().parse::<i32>().ok());
    if let Some(pid) = pid
        && let Some(pgid) = our_qemu(pid, dir)
    {
        return Liveness::Running { pid, pgid };
    }
    if dir.join(STARTED).exists() {
        Liveness::Gone
    } else {
        Liveness::NotStarted
    }
}

/// The process group of `pid` when it is a live process whose command
/// line names `dir` (a zombie's command line is empty).
fn our_qemu(pid: i32, dir: &Path) -> Option<i32> {
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let needle = dir.join(OVERLAY);
    let needle = needle.to_string_lossy();
    let cmdline = String::from_utf8_lossy(&cmdline);
    if !cmdline.split('\0').any(|arg| arg.contains(needle.as_ref())) {
        return None;
    }
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // `pid (comm) state ppid pgrp ...`: comm may contain spaces.
    let after = &stat[stat.rfind(')')? + 1..];
    let mut fields = after.split_whitespace();
    let state = fields.next()?;
    if state == "Z" || state == "X" {
        return None;
    }
    fields.nth(1)?.parse().ok()
}

/// Stops a server's QEMU: SIGTERM to its process group, SIGKILL if it is
/// still there after `grace`, then waits (up to `limit`) until it is gone.
pub(crate) async fn stop(dir: &Path, grace: Duration, limit: Duration) -> Result<(), String> {
    let start = tokio::time::Instant::now();
    let mut killed = false;
    let mut termed = false;
    loop {
        let Liveness::Running { pid, pgid } = liveness(dir) else {
            return Ok(());
        };
        if !termed {
            signal_group(pgid, pid, Signal::SIGTERM);
            termed = true;
        } else if !killed && start.elapsed() >= grace {
            signal_group(pgid, pid, Signal::SIGKILL);
            killed = true;
        }
        if start.elapsed() >= limit {
            return Err(format!(
                "qemu process {pid} of {} is still running after {} s",
                dir.display(),
                limit.as_secs()
            ));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A VM frozen with SIGSTOP (every thread of the process) until dropped,
/// which sends SIGCONT.
pub(crate) struct Paused(Pid);

impl Paused {
    /// Stops process `pid` and returns once every one of its threads is
    /// stopped (a thread in the middle of a write finishes it first).
    pub(crate) async fn new(pid: i32, limit: Duration) -> Result<Self, String> {
        let raw = pid;
        let pid = Pid::from_raw(pid);
        nix::sys::signal::kill(pid, Signal::SIGSTOP)
            .map_err(|e| format!("cannot pause qemu process {pid}: {e}"))?;
        let paused = Paused(pid);
        let start = tokio::time::Instant::now();
        while !all_threads_stopped(raw) {
            if start.elapsed() >= limit {
                return Err(format!(
                    "qemu process {pid} did not stop within {} s",
                    limit.as_secs()
                ));
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        Ok(paused)
    }
}

/// Whether every thread of `pid` is in state `T` (stopped); a process
/// that is gone counts as stopped (nothing writes its disk).
fn all_threads_stopped(pid: i32) -> bool {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return true;
    };
    tasks.filter_map(Result::ok).all(|t| {
        std::fs::read_to_string(t.path().join("stat")).map_or(true, |stat| {
            stat.rfind(')')
                .and_then(|i| stat[i + 1..].split_whitespace().next())
                .is_none_or(|state| state == "T" || state == "t")
        })
    })
}

impl Drop for Paused {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(self.0, Signal::SIGCONT);
    }
}

fn signal_group(pgid: i32, pid: i32, signal: Signal) {
    // The group is QEMU's own session (it daemonized); never ours.
    if pgid > 1 && pgid != nix::unistd::getpgrp().as_raw() {
        let _ = killpg(Pid::from_raw(pgid), signal);
    } else {
        let _ = nix::sys::signal::kill(Pid::from_raw(pid), signal);
    }
}

/// Kills QEMU processes running a server of `servers` whose directory
/// (with its record) is gone: nothing can list or delete them any more.
/// A directory is created before its VM starts and removed after it
/// stopped, so a VM being created or deleted is never taken for one.
/// Returns the pids killed.
pub(crate) fn reap_orphans(servers: &Path) -> Vec<i32> {
    let prefix = format!("{}/", servers.display());
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut reaped = Vec::new();
    for entry in procs.filter_map(Result::ok) {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&cmdline);
        // `-drive file=<servers>/<id>/disk.qcow2,...`
        let Some(id) = cmdline.split('\0').find_map(|arg| {
            let rest = &arg[arg.find(&prefix)? + prefix.len()..];
            let (id, tail) = rest.split_once('/')?;
            tail.starts_with(OVERLAY).then(|| id.to_owned())
        }) else {
            continue;
        };
        let dir = servers.join(&id);
        if dir.join(RECORD).exists() {
            continue;
        }
        if let Some(pgid) = our_qemu(pid, &dir) {
            tracing::warn!(pid, server = %id, "killing a qemu VM whose server directory is gone");
            signal_group(pgid, pid, Signal::SIGKILL);
            reaped.push(pid);
        }
    }
    reaped
}

/// The directory of every server under `servers`.
pub(crate) fn server_dirs(servers: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(servers) else {
        return Vec::new();
    };
    let mut dirs: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .map(|e| e.path())
        .collect();
    dirs.sort();
    dirs
}

/// The last `max` bytes of the serial console, as text.
pub(crate) fn console_tail(dir: &Path, max: u64) -> std::io::Result<String> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open(dir.join(CONSOLE))?;
    let len = f.metadata()?.len();
    if len > max {
        f.seek(SeekFrom::Start(len - max))?;
    }
    let mut bytes = Vec::new();
    f.read_to_end(&mut bytes)?;
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

/// A stable locally administered MAC address for a server, so the config
/// drive's `network_data.json` can name the interface the VM gets.
pub(crate) fn mac_for(id: &str) -> String {
    let h = id.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    let b = h.to_be_bytes();
    format!("52:54:00:{:02x}:{:02x}:{:02x}", b[0], b[1], b[2])
}
