//! The `ImageBuilder` trait: turns a diskimage definition into local image
//! files (one per format) with checksums.

use std::path::PathBuf;
use std::time::Duration;

use async_trait::async_trait;
use tokio_util::sync::CancellationToken;

use crate::config::DiskImage;

/// One build to run.
#[derive(Clone, Debug, PartialEq)]
pub struct BuildSpec {
    /// The diskimage, after inheritance.
    pub image: DiskImage,
    /// Build id (uuid4 hex).
    pub build_id: String,
    /// Formats to produce (the diskimage's plus every provider's).
    pub formats: Vec<String>,
    /// Output base path: files are `<base>.<format>`.
    pub output_base: PathBuf,
    /// The build log file.
    pub log_path: PathBuf,
    /// `ELEMENTS_PATH`.
    pub elements_dir: Option<PathBuf>,
    /// Kill the build after this long.
    pub timeout: Duration,
    /// Where the builder reports the build's phase as it runs.
    pub progress: BuildProgress,
}

/// One produced image file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Artifact {
    /// Format (`qcow2`, `raw`, `vhd`, ...).
    pub format: String,
    /// File path.
    pub path: PathBuf,
    /// Size in bytes.
    pub size: u64,
    /// MD5 hex digest, verified against the builder's checksum file.
    pub md5: Option<String>,
    /// SHA-256 hex digest, verified against the builder's checksum file.
    pub sha256: Option<String>,
}

/// The result of a successful build.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BuildArtifacts {
    /// One file per format.
    pub artifacts: Vec<Artifact>,
}

impl BuildArtifacts {
    /// The file of one format.
    pub fn get(&self, format: &str) -> Option<&Artifact> {
        self.artifacts.iter().find(|a| a.format == format)
    }
}

/// Errors of a build, by meaning.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BuildError {
    /// The build command failed.
    #[error("build failed (exit code {exit_code:?})")]
    Failed {
        /// Its exit code, if it exited.
        exit_code: Option<i32>,
        /// The last lines of its log.
        log_tail: String,
    },
    /// The build ran past its timeout and was killed.
    #[error("build timed out after {0:?}")]
    Timeout(Duration),
    /// The build was cancelled (shutdown).
    #[error("build cancelled")]
    Cancelled,
    /// The output is missing or does not match its checksum.
    #[error("bad build output: {0}")]
    BadOutput(String),
    /// Local I/O failed.
    #[error("I/O error: {0}")]
    Io(String),
}

/// Builds disk images. Object-safe; used as `Arc<dyn ImageBuilder>`.
///
/// # Example
///
/// A builder that "builds" by copying a prepared image file (handy where
/// images come from elsewhere); `nodepool-dib` runs diskimage-builder.
///
/// ```no_run
/// use std::path::PathBuf;
/// use async_trait::async_trait;
/// use nodepool_model::image_builder::{
///     Artifact, BuildArtifacts, BuildError, BuildSpec, ImageBuilder,
/// };
/// use tokio_util::sync::CancellationToken;
///
/// #[derive(Debug)]
/// struct Prebuilt {
///     qcow2: PathBuf,
/// }
///
/// #[async_trait]
/// impl ImageBuilder for Prebuilt {
///     async fn build(
///         &self,
///         spec: &BuildSpec,
///         _cancel: CancellationToken,
///     ) -> Result<BuildArtifacts, BuildError> {
///         let path = spec.output_base.with_extension("qcow2");
///         let size = std::fs::copy(&self.qcow2, &path).map_err(|e| BuildError::Io(e.to_string()))?;
///         Ok(BuildArtifacts {
///             artifacts: vec![Artifact { format: "qcow2".into(), path, size, md5: None, sha256: None }],
///         })
///     }
/// }
/// ```
#[async_trait]
pub trait ImageBuilder: Send + Sync + std::fmt::Debug {
    /// Runs one build to completion, honouring `spec.timeout` and `cancel`.
    /// On failure no process started by the build is left running.
    async fn build(
        &self,
        spec: &BuildSpec,
        cancel: CancellationToken,
    ) -> Result<BuildArtifacts, BuildError>;
}

/// Where a running build is: the diskimage-builder hook phase and the
/// element script in it, read from the build's output.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BuildPhase {
    /// The hook phase without `.d` (`root`, `install`, `finalise`).
    pub phase: String,
    /// The script running in it (`10-debootstrap`), once one started.
    pub step: Option<String>,
}

impl BuildPhase {
    /// The phase a line of diskimage-builder output announces, given the
    /// phase before it: `Running hooks from <dir>/<phase>.d` starts a phase,
    /// `dib-run-parts Running <dir>/<phase>.d/<script>` a script in one.
    /// Lines may carry DIB's `YYYY-MM-DD HH:MM:SS.mmm | ` prefix.
    pub fn from_dib_line(line: &str) -> Option<BuildPhase> {
        let text = match line.split_once(" | ") {
            Some((stamp, rest)) if stamp.len() == 23 && stamp.starts_with(['1', '2']) => rest,
            _ => line,
        };
        let text = text.trim_end();
        if let Some(dir) = text.strip_prefix("Running hooks from ") {
            let phase = dir.rsplit('/').next()?.strip_suffix(".d")?;
            return (!phase.is_empty()).then(|| BuildPhase {
                phase: phase.to_owned(),
                step: None,
            });
        }
        let script = text.strip_prefix("dib-run-parts Running ")?;
        let (dir, step) = script.rsplit_once('/')?;
        let phase = dir.rsplit('/').next()?.strip_suffix(".d")?;
        (!phase.is_empty() && !step.is_empty()).then(|| BuildPhase {
            phase: phase.to_owned(),
            step: Some(step.to_owned()),
        })
    }
}

/// A running build's phase, shared between the [`ImageBuilder`] (which
/// sets it from the build's output) and whoever publishes progress (which
/// watches it). Clones share one value; an implementation that cannot
/// tell the phase leaves it alone.
#[derive(Clone, Debug)]
pub struct BuildProgress(std::sync::Arc<tokio::sync::watch::Sender<BuildPhase>>);

impl Default for BuildProgress {
    fn default() -> Self {
        BuildProgress(std::sync::Arc::new(tokio::sync::watch::Sender::new(
            BuildPhase::default(),
        )))
    }
}

impl PartialEq for BuildProgress {
    /// The same handle (not the same phase): a spec's progress is where
    /// it reports, not what it asks for.
    fn eq(&self, other: &Self) -> bool {
        std::sync::Arc::ptr_eq(&self.0, &other.0)
    }
}

impl BuildProgress {
    /// Sets the phase; watchers wake only when it changed.
    pub fn set(&self, phase: BuildPhase) {
        self.0.send_if_modified(|cur| {
            let changed = *cur != phase;
            *cur = phase;
            changed
        });
    }

    /// The phase now.
    pub fn get(&self) -> BuildPhase {
        self.0.borrow().clone()
    }

    /// A receiver woken on every change.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<BuildPhase> {
        self.0.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phases_from_dib_output() {
        let p = |l| BuildPhase::from_dib_line(l);
        assert_eq!(
            p("2026-12-04 14:15:36.123 | Running hooks from /tmp/dib_build.Ab1/hooks/root.d"),
            Some(BuildPhase {
                phase: "root".into(),
                step: None
            })
        );
        assert_eq!(
            p("2026-12-04 14:15:36.123 | dib-run-parts Running /tmp/in_target.d/install.d/10-apt"),
            Some(BuildPhase {
                phase: "install".into(),
                step: Some("10-apt".into())
            })
        );
        assert_eq!(
            p("Running hooks from /tmp/x/hooks/finalise.d"),
            Some(BuildPhase {
                phase: "finalise".into(),
                step: None
            })
        );
        assert_eq!(p("2026-12-04 14:15:36.123 | Running apt-get update"), None);
        assert_eq!(p("dib-run-parts Running /tmp/x/hooks/root.d/"), None);
        assert_eq!(p("Running hooks from /tmp/x/hooks/root"), None);
    }

    #[test]
    fn progress_clones_share_one_phase_and_wake_on_change() {
        let p = BuildProgress::default();
        let mut rx = p.clone().subscribe();
        let root = BuildPhase {
            phase: "root".into(),
            step: None,
        };
        p.set(root.clone());
        assert!(rx.has_changed().expect("open"));
        rx.borrow_and_update();
        p.set(root.clone());
        assert!(
            !rx.has_changed().expect("open"),
            "the same phase is no change"
        );
        assert_eq!(p.get(), root);
        assert_eq!(p, p.clone());
        assert_ne!(p, BuildProgress::default());
    }
}
