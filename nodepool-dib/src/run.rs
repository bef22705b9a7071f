//! Running one build command: its own process group, output streamed to the
//! log, a timeout, cancellation, and a kill sequence that leaves no process.
//!
//! # Kill sequence
//!
//! On timeout or cancel: SIGTERM to the main process only — diskimage-builder
//! is a bash script whose EXIT trap unmounts and detaches what it made,
//! which signalling the whole group would prevent (measured: a group-wide
//! signal leaks eight mounts and a loop device). Then up to `grace` for it
//! to exit, then SIGKILL to the whole group. The group is SIGKILLed after
//! every run, successful or not, so nothing started by the build outlives
//! it; then the runner polls procfs until the group has no live member
//! (re-sending SIGKILL, in case a member forked meanwhile).
//!
//! stdout and stderr share one pipe, as with Python's
//! `stderr=subprocess.STDOUT`, so the log keeps their interleaving.

use std::ffi::{OsStr, OsString};
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use nix::errno::Errno;
use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::Pid;
use nodepool_model::image_builder::{BuildError, BuildProgress};
use tokio::io::AsyncWriteExt;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::procs;
use crate::stream::{PumpEnd, pump};

/// How long to wait for the main process to be reaped and the group to
/// empty after SIGKILL (a process in uninterruptible I/O can take a while).
const REAP_WAIT: Duration = Duration::from_secs(30);
/// How long to wait for the output pipe's end of file once the group is
/// gone (a process that left the group may still hold it).
const DRAIN_WAIT: Duration = Duration::from_secs(5);
/// How long processes left in the group by a command that exited by
/// itself get to finish before they are killed.
const STRAGGLER_WAIT: Duration = Duration::from_secs(2);
/// Poll interval while waiting for processes to go.
const POLL: Duration = Duration::from_millis(20);

/// One command to run.
#[derive(Debug)]
pub struct RunSpec<'a> {
    /// Program.
    pub program: &'a OsStr,
    /// Arguments.
    pub args: &'a [OsString],
    /// The complete environment.
    pub env: &'a [(OsString, OsString)],
    /// Output goes here, then `Exit code: N`.
    pub log_path: &'a Path,
    /// Append to the log instead of truncating it.
    pub append: bool,
    /// Label for tracing (`image-build id`).
    pub label: &'a str,
    /// Kill after this long.
    pub timeout: Duration,
    /// Between SIGTERM and SIGKILL.
    pub grace: Duration,
    /// Set from diskimage-builder's phase lines in the output, when given.
    pub progress: Option<BuildProgress>,
}

/// How a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// The command exited by itself.
    Exited,
    /// It ran past its timeout and was killed.
    TimedOut,
    /// It was cancelled and killed.
    Cancelled,
}

/// The result of a run.
#[derive(Debug)]
pub struct RunResult {
    /// How it ended.
    pub ending: Ending,
    /// The main process's status, if it was reaped.
    pub status: Option<ExitStatus>,
    /// Its process group id (its pid).
    pub pgid: i32,
    /// The last lines of its output.
    pub tail: String,
    /// Members of the group that were still alive when the main process
    /// exited by itself (killed then).
    pub stragglers: Vec<i32>,
    /// Members still alive after everything (should be empty).
    pub survivors: Vec<i32>,
}

/// `Exit code` value as Python's `Popen.returncode` gives it: the exit
/// status, or minus the signal number.
pub fn exit_code(status: &ExitStatus) -> Option<i32> {
    status.code().or_else(|| status.signal().map(|s| -s))
}

/// Why a command did not run at all.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunError {
    /// Local I/O: the log file or the output pipe (names the file).
    Io(String),
    /// The program could not be started (names the program).
    Spawn(String),
}

impl From<RunError> for BuildError {
    fn from(e: RunError) -> Self {
        match e {
            RunError::Io(msg) => BuildError::Io(msg),
            RunError::Spawn(msg) => BuildError::Failed {
                exit_code: None,
                log_tail: msg,
            },
        }
    }
}

/// Spawns the command and runs it to its end (see the module doc).
/// `Err` only when it could not be started.
pub async fn run(spec: &RunSpec<'_>, cancel: &CancellationToken) -> Result<RunResult, RunError> {
    let log = tokio::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .append(spec.append)
        .truncate(!spec.append)
        .open(spec.log_path)
        .await
        .map_err(|e| {
            RunError::Io(format!(
                "cannot create build log {}: {e}",
                spec.log_path.display()
            ))
        })?;
    let pipe_err = |e: std::io::Error| RunError::Io(format!("cannot create the output pipe: {e}"));
    let (reader, writer) = std::io::pipe().map_err(pipe_err)?;
    let writer2 = writer.try_clone().map_err(pipe_err)?;
    let rx = tokio::net::unix::pipe::Receiver::from_owned_fd(reader.into()).map_err(pipe_err)?;

    let mut cmd = tokio::process::Command::new(spec.program);
    cmd.args(spec.args)
        .env_clear()
        .envs(spec.env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(Stdio::from(writer))
        .stderr(Stdio::from(writer2))
        .process_group(0);
    let spawned = cmd.spawn();
    // The command holds our copies of the pipe's write end: drop it now,
    // or the pipe never reaches end of file.
    drop(cmd);
    let mut child = match spawned {
        Ok(c) => c,
        Err(e) => {
            let msg = format!(
                "cannot run {}: {e}",
                crate::command::shell_quote(spec.program)
            );
            let mut log = log;
            let _ = log
                .write_all(format!("{msg}\nExit code: None\n").as_bytes())
                .await;
            return Err(RunError::Spawn(msg));
        }
    };
    let Some(pid) = child.id() else {
        return Err(RunError::Spawn(
            "the build process vanished before it had a pid".into(),
        ));
    };
    let pgid = pid as i32;
    let guard = GroupGuard { pgid, armed: true };

    let stop = CancellationToken::new();
    let pump = tokio::spawn(pump(
        rx,
        log,
        spec.label.to_owned(),
        spec.progress.clone(),
        stop.clone(),
    ));

    let deadline = Instant::now() + spec.timeout;
    let (ending, mut status) = tokio::select! {
        s = child.wait() => (Ending::Exited, s.ok()),
        _ = tokio::time::sleep_until(deadline) => (Ending::TimedOut, None),
        _ = cancel.cancelled() => (Ending::Cancelled, None),
    };

    let mut stragglers = Vec::new();
    if ending == Ending::Exited {
        // DIB's output filter may still be flushing its last lines (DIB
        // sleeps a second for it before exiting): a moment to finish.
        let settle = Instant::now() + STRAGGLER_WAIT;
        stragglers = procs::group_members(pgid);
        while !stragglers.is_empty() && Instant::now() < settle {
            tokio::time::sleep(POLL).await;
            stragglers = procs::group_members(pgid);
        }
        if !stragglers.is_empty() {
            tracing::warn!(build = %spec.label, pids = ?stragglers, "build exited and left processes in its group; killing them");
        }
    } else {
        tracing::info!(build = %spec.label, ?ending, "stopping the build: SIGTERM, then SIGKILL to its group after {:?}", spec.grace);
        let _ = kill(Pid::from_raw(pgid), Signal::SIGTERM);
        if let Ok(s) = tokio::time::timeout(spec.grace, child.wait()).await {
            status = s.ok();
        }
    }
    let _ = killpg(Pid::from_raw(pgid), Signal::SIGKILL);
    if status.is_none() {
        match tokio::time::timeout(REAP_WAIT, child.wait()).await {
            Ok(s) => status = s.ok(),
            Err(_) => {
                tracing::error!(build = %spec.label, pid, "the build's main process did not die within {REAP_WAIT:?} of SIGKILL")
            }
        }
    }
    let survivors = wait_group_empty(pgid).await;
    if survivors.is_empty() {
        drop(guard.disarm());
    } else {
        tracing::error!(build = %spec.label, pids = ?survivors, "processes of the build survive SIGKILL");
    }

    // Normally the pipe is at end of file by now; a process that left the
    // group may still hold it, and is not worth hanging the build for.
    let mut pump = pump;
    let end: Option<PumpEnd> = match tokio::time::timeout(DRAIN_WAIT, &mut pump).await {
        Ok(r) => r.ok(),
        Err(_) => {
            tracing::warn!(build = %spec.label, "the build's output pipe is still open (a process left its group?); not waiting for it");
            stop.cancel();
            pump.await.ok()
        }
    };
    let tail = match end {
        Some(mut end) => {
            tracing::debug!(build = %spec.label, bytes = end.bytes, eof = end.eof, "build output ended");
            let code = status
                .as_ref()
                .and_then(exit_code)
                .map_or_else(|| "None".to_owned(), |c| c.to_string());
            let sep = if end.ended_with_newline { "" } else { "\n" };
            let line = format!("{sep}Exit code: {code}\n");
            let r = match end.log.write_all(line.as_bytes()).await {
                Ok(()) => end.log.flush().await,
                Err(e) => Err(e),
            };
            if let Err(e) = r {
                tracing::warn!(build = %spec.label, error = %e, "cannot write the exit code to the build log");
            }
            end.tail.text()
        }
        None => String::new(),
    };
    Ok(RunResult {
        ending,
        status,
        pgid,
        tail,
        stragglers,
        survivors,
    })
}

/// Polls until the group has no live member, SIGKILLing it each round;
/// returns the members left at the deadline.
async fn wait_group_empty(pgid: i32) -> Vec<i32> {
    let deadline = Instant::now() + REAP_WAIT;
    loop {
        let members = procs::group_members(pgid);
        if members.is_empty() || Instant::now() >= deadline {
            return members;
        }
        match killpg(Pid::from_raw(pgid), Signal::SIGKILL) {
            Ok(()) | Err(Errno::ESRCH) => {}
            Err(e) => tracing::warn!(pgid, error = %e, "killpg failed"),
        }
        tokio::time::sleep(POLL).await;
    }
}

/// SIGKILLs the group if the run future is dropped half-way (the caller
/// gave up on it without cancelling), so no build outlives its owner.
struct GroupGuard {
    pgid: i32,
    armed: bool,
}

impl GroupGuard {
    fn disarm(mut self) -> Self {
        self.armed = false;
        self
    }
}

impl Drop for GroupGuard {
    fn drop(&mut self) {
        if self.armed {
            let _ = killpg(Pid::from_raw(self.pgid), Signal::SIGKILL);
        }
    }
}
