//! The provider's `post-upload-hook`: `<hook> <provider> <external image
//! id> <local file>`, run after each successful upload (reference §5.4).
//!
//! As in Python Nodepool the hook is a program path (not a shell line)
//! and a non-zero exit fails the upload. Unlike Python it is bounded: it
//! runs in its own process group and the whole group is killed when it
//! outlives its time, so a hung hook leaves no process behind.

use std::path::Path;
use std::time::Duration;

use tokio::io::AsyncReadExt;

/// Output kept from a hook for the log, bytes (its tail).
const OUTPUT_LIMIT: usize = 64 * 1024;

/// Why a hook failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HookError {
    /// It could not be started.
    #[error("cannot run post-upload-hook {hook}: {reason}")]
    Spawn {
        /// The hook.
        hook: String,
        /// Why.
        reason: String,
    },
    /// It exited non-zero (or was killed by a signal).
    #[error("post-upload-hook {hook} failed ({status}): {output}")]
    Failed {
        /// The hook.
        hook: String,
        /// Its exit status.
        status: String,
        /// The tail of its output.
        output: String,
    },
    /// It ran past its time and was killed with its process group.
    #[error("post-upload-hook {hook} did not finish within {timeout:?}; killed")]
    Timeout {
        /// The hook.
        hook: String,
        /// Its time.
        timeout: Duration,
    },
}

/// Runs the hook; returns its output (stdout then stderr, the tail) when
/// it exits 0.
pub async fn run_post_upload_hook(
    hook: &str,
    provider: &str,
    external_id: &str,
    file: &Path,
    timeout: Duration,
) -> Result<String, HookError> {
    let mut cmd = tokio::process::Command::new(hook);
    cmd.arg(provider)
        .arg(external_id)
        .arg(file)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    let mut child = cmd.spawn().map_err(|e| HookError::Spawn {
        hook: hook.to_owned(),
        reason: e.to_string(),
    })?;
    let pgid = child.id();
    let (mut out, mut err) = (child.stdout.take(), child.stderr.take());
    let run = async {
        let mut o = Vec::new();
        let mut e = Vec::new();
        let read_o = async {
            if let Some(s) = out.as_mut() {
                let _ = s.read_to_end(&mut o).await;
            }
        };
        let read_e = async {
            if let Some(s) = err.as_mut() {
                let _ = s.read_to_end(&mut e).await;
            }
        };
        let (status, _, _) = tokio::join!(child.wait(), read_o, read_e);
        (status, o, e)
    };
    let result = tokio::time::timeout(timeout, run).await;
    let Ok((status, mut o, e)) = result else {
        // The whole group: a hook's children share its pipes and would
        // otherwise outlive it.
        if let Some(pgid) = pgid.and_then(|p| i32::try_from(p).ok()) {
            let _ = nix::sys::signal::killpg(
                nix::unistd::Pid::from_raw(pgid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        return Err(HookError::Timeout {
            hook: hook.to_owned(),
            timeout,
        });
    };
    o.extend_from_slice(&e);
    let start = o.len().saturating_sub(OUTPUT_LIMIT);
    let output = String::from_utf8_lossy(&o[start..]).trim_end().to_owned();
    match status {
        Ok(s) if s.success() => Ok(output),
        Ok(s) => Err(HookError::Failed {
            hook: hook.to_owned(),
            status: s.to_string(),
            output,
        }),
        Err(e) => Err(HookError::Failed {
            hook: hook.to_owned(),
            status: format!("wait failed: {e}"),
            output,
        }),
    }
}
