//! [`DibBuilder`]: the [`ImageBuilder`] that runs diskimage-builder.
//!
//! One build is: plan ([`crate::command`]), run (`crate::run`), sweep
//! ([`crate::sweep`](mod@crate::sweep), always, however the run ended), convert a vhd if
//! diskimage-builder did not make it, then collect and verify the files
//! ([`crate::output`]).

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::Duration;

use async_trait::async_trait;
use nodepool_model::image_builder::{BuildArtifacts, BuildError, BuildSpec, ImageBuilder};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::command::{
    DibCommand, PlanContext, PlanError, VhdConversion, VhdStrategy, plan, with_suffix,
};
use crate::output::collect_format;
use crate::run::{Ending, RunSpec, exit_code, run};
use crate::sweep::{SweepReport, sweep};

/// Default time between SIGTERM and SIGKILL: diskimage-builder's own
/// cleanup takes 1.5–4.4 s (measured), so 30 s is ample on a loaded host.
pub const DEFAULT_TERM_GRACE: Duration = Duration::from_secs(30);

/// Name of the default work directory, under the images directory.
pub const DEFAULT_WORK_DIR_NAME: &str = ".dib-tmp";

/// Settings of a [`DibBuilder`]; `Default` is what the daemon uses.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct DibOptions {
    /// Per-build temporary directories go under it. Default:
    /// `<images dir>/.dib-tmp` (the directory of the output base path),
    /// where space for images is anyway. An image's `env-vars` `TMP_DIR`
    /// (or `TMPDIR`) takes precedence for that image.
    pub work_dir: Option<PathBuf>,
    /// Time between SIGTERM to diskimage-builder and SIGKILL to its group.
    pub term_grace: Duration,
    /// Replaces `%p` in `dib-cmd`. Default: the running program's directory.
    pub package_dir: Option<PathBuf>,
    /// How vhd files are made.
    pub vhd: VhdStrategy,
}

impl Default for DibOptions {
    fn default() -> Self {
        DibOptions {
            work_dir: None,
            term_grace: DEFAULT_TERM_GRACE,
            package_dir: None,
            vhd: VhdStrategy::Auto,
        }
    }
}

impl DibOptions {
    /// Sets [`work_dir`](Self::work_dir).
    pub fn with_work_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.work_dir = Some(dir.into());
        self
    }

    /// Sets [`term_grace`](Self::term_grace).
    pub fn with_term_grace(mut self, grace: Duration) -> Self {
        self.term_grace = grace;
        self
    }

    /// Sets [`package_dir`](Self::package_dir).
    pub fn with_package_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.package_dir = Some(dir.into());
        self
    }

    /// Sets [`vhd`](Self::vhd).
    pub fn with_vhd(mut self, vhd: VhdStrategy) -> Self {
        self.vhd = vhd;
        self
    }
}

/// Runs diskimage-builder's `disk-image-create` (or the image's `dib-cmd`).
#[derive(Clone, Debug, Default)]
pub struct DibBuilder {
    options: DibOptions,
}

impl DibBuilder {
    /// A builder with these options.
    pub fn new(options: DibOptions) -> Self {
        DibBuilder { options }
    }

    /// Its options.
    pub fn options(&self) -> &DibOptions {
        &self.options
    }

    /// The work directory used for `spec` when its image sets no `TMP_DIR`.
    pub fn work_dir(&self, spec: &BuildSpec) -> PathBuf {
        self.options.work_dir.clone().unwrap_or_else(|| {
            spec.output_base
                .parent()
                .unwrap_or(Path::new("."))
                .join(DEFAULT_WORK_DIR_NAME)
        })
    }

    /// What `spec`'s build will run, with the daemon's current environment.
    pub fn plan(&self, spec: &BuildSpec) -> Result<DibCommand, PlanError> {
        let work_dir = self.work_dir(spec);
        let package_dir = self.options.package_dir.clone().unwrap_or_else(|| {
            std::env::current_exe()
                .ok()
                .and_then(|p| p.parent().map(Path::to_path_buf))
                .unwrap_or_else(|| PathBuf::from("."))
        });
        plan(
            spec,
            &PlanContext {
                base_env: std::env::vars_os().collect(),
                work_dir: &work_dir,
                package_dir: &package_dir,
                vhd: self.options.vhd,
            },
        )
    }

    /// The per-build `TMP_DIR` of `spec` (where its mounts and loop device
    /// backing files live while it runs).
    pub fn tmp_dir(&self, spec: &BuildSpec) -> Result<PathBuf, PlanError> {
        self.plan(spec).map(|c| c.tmp_dir)
    }

    /// Sweeps every per-build directory left in the default work directory
    /// of `images_dir` (or the configured one), e.g. after the daemon was
    /// killed mid-build: kills the processes tied to them, unmounts,
    /// detaches loop devices, removes them. Call at startup, before builds.
    pub fn sweep_work_dir(&self, images_dir: &Path) -> Vec<(PathBuf, SweepReport)> {
        let work = self
            .options
            .work_dir
            .clone()
            .unwrap_or_else(|| images_dir.join(DEFAULT_WORK_DIR_NAME));
        let Ok(entries) = std::fs::read_dir(&work) else {
            return Vec::new();
        };
        entries
            .flatten()
            .filter(|e| e.file_type().map(|t| t.is_dir()).unwrap_or(false))
            .map(|e| {
                let dir = e.path();
                let base = images_dir.join(e.file_name());
                let report = sweep(&dir, Some(&base));
                (dir, report)
            })
            .collect()
    }
}

fn failed(exit_code: Option<i32>, log_tail: impl Into<String>) -> BuildError {
    BuildError::Failed {
        exit_code,
        log_tail: log_tail.into(),
    }
}

fn io_err(what: &str, path: &Path, e: std::io::Error) -> BuildError {
    BuildError::Io(format!("{what} {}: {e}", path.display()))
}

/// Sweeps on a thread of its own if a build future is dropped before it
/// swept (the owner gave up on it without cancelling).
struct SweepGuard {
    tmp_dir: PathBuf,
    output_base: PathBuf,
    armed: bool,
}

impl Drop for SweepGuard {
    fn drop(&mut self) {
        if self.armed {
            let dir = self.tmp_dir.clone();
            let base = self.output_base.clone();
            let _ = std::thread::Builder::new()
                .name("dib-sweep".into())
                .spawn(move || {
                    let report = sweep(&dir, Some(&base));
                    tracing::warn!(dir = %dir.display(), ?report, "swept an abandoned build");
                });
        }
    }
}

async fn sweep_now(label: &str, tmp_dir: &Path, base: &Path) -> SweepReport {
    let (d, b) = (tmp_dir.to_path_buf(), base.to_path_buf());
    let report = match tokio::task::spawn_blocking(move || sweep(&d, Some(&b))).await {
        Ok(r) => r,
        Err(e) => SweepReport {
            problems: vec![format!("sweep task failed: {e}")],
            ..SweepReport::default()
        },
    };
    if !report.problems.is_empty() {
        tracing::error!(build = %label, problems = ?report.problems, ?report, "the sweep could not clean everything");
    } else if report.found_leftovers() {
        tracing::info!(build = %label, ?report, "swept what the build left");
    }
    report
}

impl DibBuilder {
    async fn prepare(&self, spec: &BuildSpec) -> Result<DibCommand, BuildError> {
        let mut cmd = self.plan(spec).map_err(|e| {
            let msg = e.to_string();
            // The operator looks in the build log first.
            if let Some(dir) = spec.log_path.parent() {
                let _ = std::fs::create_dir_all(dir);
            }
            let _ = std::fs::write(&spec.log_path, format!("{msg}\n"));
            failed(None, msg)
        })?;
        for dir in [spec.output_base.parent(), spec.log_path.parent()]
            .into_iter()
            .flatten()
            .filter(|d| !d.as_os_str().is_empty())
        {
            tokio::fs::create_dir_all(dir)
                .await
                .map_err(|e| io_err("cannot create directory", dir, e))?;
        }
        // The kernel reports canonical paths (mountinfo, loop backing
        // files, /proc/<pid>/root): give DIB one so the sweep matches.
        let parent = cmd.tmp_dir.parent().unwrap_or(Path::new("/")).to_path_buf();
        tokio::fs::create_dir_all(&parent)
            .await
            .map_err(|e| io_err("cannot create work directory", &parent, e))?;
        let parent = tokio::fs::canonicalize(&parent)
            .await
            .map_err(|e| io_err("cannot resolve work directory", &parent, e))?;
        let tmp = parent.join(crate::command::build_dir_name(spec));
        cmd.env
            .insert("TMP_DIR".into(), tmp.clone().into_os_string());
        cmd.env
            .insert("TMPDIR".into(), tmp.clone().into_os_string());
        cmd.tmp_dir = tmp;
        if tokio::fs::symlink_metadata(&cmd.tmp_dir).await.is_ok() {
            // Left by an earlier attempt of this very build.
            sweep_now(&label(spec), &cmd.tmp_dir, &spec.output_base).await;
        }
        tokio::fs::create_dir(&cmd.tmp_dir)
            .await
            .map_err(|e| io_err("cannot create build directory", &cmd.tmp_dir, e))?;
        Ok(cmd)
    }

    async fn convert_vhd(
        &self,
        spec: &BuildSpec,
        cmd: &DibCommand,
        vhd: &VhdConversion,
        deadline: Instant,
        cancel: &CancellationToken,
    ) -> Result<(), BuildError> {
        let new = with_suffix(&vhd.target, "-new");
        let args: Vec<OsString> = vec![
            "convert".into(),
            "-f".into(),
            "raw".into(),
            "-O".into(),
            "vpc".into(),
            // Dynamic, like vhd-util's; force_size keeps the exact virtual
            // size instead of rounding it to a CHS geometry.
            "-o".into(),
            "subformat=dynamic,force_size=on".into(),
            vhd.source.clone().into_os_string(),
            new.clone().into_os_string(),
        ];
        let env: Vec<(OsString, OsString)> = cmd.env.clone().into_iter().collect();
        {
            use tokio::io::AsyncWriteExt;
            let header = format!(
                "--- converting to vhd: qemu-img {}\n",
                args.iter()
                    .map(|a| crate::command::shell_quote(a))
                    .collect::<Vec<_>>()
                    .join(" ")
            );
            let mut f = tokio::fs::OpenOptions::new()
                .append(true)
                .create(true)
                .open(&spec.log_path)
                .await
                .map_err(|e| io_err("cannot open build log", &spec.log_path, e))?;
            f.write_all(header.as_bytes())
                .await
                .map_err(|e| io_err("cannot write build log", &spec.log_path, e))?;
        }
        let remaining = deadline.saturating_duration_since(Instant::now());
        let label = format!("{} vhd", label(spec));
        tracing::info!(build = %label, "converting {} to vhd with qemu-img", vhd.source.display());
        spec.progress
            .set(nodepool_model::image_builder::BuildPhase {
                phase: "vhd-convert".into(),
                step: None,
            });
        let r = run(
            &RunSpec {
                program: "qemu-img".as_ref(),
                args: &args,
                env: &env,
                log_path: &spec.log_path,
                append: true,
                label: &label,
                timeout: remaining,
                grace: self.options.term_grace,
                progress: None,
            },
            cancel,
        )
        .await;
        let result = match r {
            Err(crate::run::RunError::Spawn(msg)) => {
                Err(failed(None, format!("vhd conversion: {msg}")))
            }
            Err(e) => Err(e.into()),
            Ok(r) => match r.ending {
                Ending::TimedOut => Err(BuildError::Timeout(spec.timeout)),
                Ending::Cancelled => Err(BuildError::Cancelled),
                Ending::Exited => match r.status.as_ref().and_then(exit_code) {
                    Some(0) => tokio::fs::rename(&new, &vhd.target)
                        .await
                        .map_err(|e| io_err("cannot rename", &new, e)),
                    code => Err(failed(
                        code,
                        format!("vhd conversion (qemu-img convert) failed:\n{}", r.tail),
                    )),
                },
            },
        };
        if result.is_err() {
            let _ = tokio::fs::remove_file(&new).await;
        }
        if vhd.remove_source {
            for s in ["", ".md5", ".sha256"] {
                let _ = tokio::fs::remove_file(with_suffix(&vhd.source, s)).await;
            }
        }
        result
    }
}

fn label(spec: &BuildSpec) -> String {
    format!("{}-{}", spec.image.name, spec.build_id)
}

#[async_trait]
impl ImageBuilder for DibBuilder {
    async fn build(
        &self,
        spec: &BuildSpec,
        cancel: CancellationToken,
    ) -> Result<BuildArtifacts, BuildError> {
        let start = Instant::now();
        let deadline = start + spec.timeout;
        let label = label(spec);
        let cmd = self.prepare(spec).await?;
        tracing::info!(build = %label, command = %cmd.display(), log = %spec.log_path.display(), tmp_dir = %cmd.tmp_dir.display(), "running diskimage-builder");

        let mut guard = SweepGuard {
            tmp_dir: cmd.tmp_dir.clone(),
            output_base: spec.output_base.clone(),
            armed: true,
        };
        let env: Vec<(OsString, OsString)> = cmd.env.clone().into_iter().collect();
        let result = run(
            &RunSpec {
                program: &cmd.program,
                args: &cmd.args,
                env: &env,
                log_path: &spec.log_path,
                append: false,
                label: &label,
                timeout: spec.timeout,
                grace: self.options.term_grace,
                progress: Some(spec.progress.clone()),
            },
            &cancel,
        )
        .await;
        sweep_now(&label, &cmd.tmp_dir, &spec.output_base).await;
        guard.armed = false;

        let result = result.map_err(BuildError::from)?;
        tracing::debug!(build = %label, pgid = result.pgid, stragglers = ?result.stragglers, survivors = ?result.survivors, "build process group ended");
        match result.ending {
            Ending::TimedOut => {
                tracing::warn!(build = %label, "build timed out after {:?}", spec.timeout);
                return Err(BuildError::Timeout(spec.timeout));
            }
            Ending::Cancelled => {
                tracing::info!(build = %label, "build cancelled");
                return Err(BuildError::Cancelled);
            }
            Ending::Exited => {}
        }
        let code = result.status.as_ref().and_then(exit_code);
        if code != Some(0) {
            tracing::warn!(build = %label, ?code, "diskimage-builder failed");
            return Err(failed(code, result.tail));
        }
        tracing::info!(build = %label, elapsed = ?start.elapsed(), "diskimage-builder finished");

        if let Some(vhd) = &cmd.vhd {
            self.convert_vhd(spec, &cmd, vhd, deadline, &cancel).await?;
        }

        let mut artifacts = Vec::new();
        for format in &cmd.formats {
            if cancel.is_cancelled() {
                return Err(BuildError::Cancelled);
            }
            let ours = format == "vhd" && cmd.vhd.is_some();
            let (base, f) = (spec.output_base.clone(), format.clone());
            let a = tokio::task::spawn_blocking(move || collect_format(&base, &f, ours))
                .await
                .map_err(|e| BuildError::Io(format!("checksum task failed: {e}")))?
                .map_err(|msg| {
                    BuildError::BadOutput(format!("diskimage {}: {msg}", spec.image.name))
                })?;
            artifacts.push(a);
        }
        tracing::info!(build = %label, elapsed = ?start.elapsed(), files = ?artifacts.iter().map(|a| (&a.format, a.size)).collect::<Vec<_>>(), "build ready");
        Ok(BuildArtifacts { artifacts })
    }
}
