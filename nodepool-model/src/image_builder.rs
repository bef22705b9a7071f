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
