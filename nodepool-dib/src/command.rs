//! The `disk-image-create` command line and environment of one build,
//! computed without touching the system (reference §5.3).
//!
//! Everything the build will do is decided here, as a value: the argument
//! vector, the whole environment, the per-build temporary directory and
//! which formats diskimage-builder makes versus which we convert afterwards.
//! The process runner and the output collector only carry the plan out.

use std::collections::BTreeMap;
use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};

use nodepool_model::image_builder::BuildSpec;

/// `--qemu-img-options` value Nodepool passes when qcow2 is built: images
/// stay readable by old qemu versions still found in clouds.
pub const QEMU_IMG_COMPAT_OPTIONS: &str = "compat=0.10";

/// How a `vhd` file is produced when a build asks for one.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum VhdStrategy {
    /// diskimage-builder makes it when `vhd-util` is on the build's `PATH`
    /// (DIB refuses `-t vhd` without it, and the patched `vhd-util` is what
    /// Rackspace-style clouds need); otherwise `qemu-img convert -O vpc`.
    #[default]
    Auto,
    /// Always pass `vhd` to diskimage-builder (it fails without `vhd-util`).
    Dib,
    /// Always convert the raw image with `qemu-img convert -O vpc`.
    QemuImg,
}

/// A `vhd` made by us after the build, from the raw image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VhdConversion {
    /// The raw image DIB writes (`<base>.raw`).
    pub source: PathBuf,
    /// The vhd file to write (`<base>.vhd`).
    pub target: PathBuf,
    /// `raw` was added to DIB's formats only as the conversion source: its
    /// file and checksums are removed after the conversion.
    pub remove_source: bool,
}

/// Everything one build runs, decided up front.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DibCommand {
    /// The program (first word of `dib-cmd`).
    pub program: OsString,
    /// Its arguments, in order.
    pub args: Vec<OsString>,
    /// The complete environment of the build (the child's environment is
    /// cleared and set to exactly this).
    pub env: BTreeMap<OsString, OsString>,
    /// The per-build `TMP_DIR` (also `TMPDIR`): every mount, loop device
    /// backing file and temporary file of the build lives under it, which
    /// is what lets the sweep find them.
    pub tmp_dir: PathBuf,
    /// Formats requested by the spec, in its order, deduplicated.
    pub formats: Vec<String>,
    /// Formats passed to diskimage-builder with `-t`.
    pub dib_formats: Vec<String>,
    /// The vhd file we convert ourselves, if any.
    pub vhd: Option<VhdConversion>,
}

impl DibCommand {
    /// The command line as one shell-quoted string, for logs.
    pub fn display(&self) -> String {
        std::iter::once(&self.program)
            .chain(self.args.iter())
            .map(|a| shell_quote(a))
            .collect::<Vec<_>>()
            .join(" ")
    }
}

/// Why a build could not even be planned: bad configuration.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    /// `dib-cmd` is empty or not valid shell words.
    #[error("diskimage {image}: dib-cmd {cmd:?}: {reason}")]
    DibCmd {
        /// Diskimage name.
        image: String,
        /// The configured `dib-cmd`.
        cmd: String,
        /// What is wrong.
        reason: String,
    },
    /// No formats, or a format that is not a plain word.
    #[error("diskimage {image}: {reason}")]
    Formats {
        /// Diskimage name.
        image: String,
        /// What is wrong.
        reason: String,
    },
    /// No elements: diskimage-builder needs at least a distro element.
    #[error("diskimage {image}: no elements to build")]
    NoElements {
        /// Diskimage name.
        image: String,
    },
}

/// Inputs of [`plan`] that do not come from the spec.
#[derive(Clone, Debug)]
pub struct PlanContext<'a> {
    /// The daemon's environment (the build inherits it).
    pub base_env: Vec<(OsString, OsString)>,
    /// Where per-build temporary directories go unless the image's
    /// `env-vars` name a `TMP_DIR`/`TMPDIR`.
    pub work_dir: &'a Path,
    /// Replaces `%p` in `dib-cmd`.
    pub package_dir: &'a Path,
    /// vhd policy.
    pub vhd: VhdStrategy,
}

/// Computes the command line and environment of `spec`'s build.
///
/// The environment is built in the reference's order, each step overriding
/// the previous one: the daemon's environment; `DIB_RELEASE`,
/// `DIB_IMAGE_NAME`, `DIB_IMAGE_FILENAME`; `ELEMENTS_PATH`; the image's
/// `env-vars`. Last come `TMP_DIR` and `TMPDIR`, set to the per-build
/// directory: if the image's `env-vars` set them, their value becomes the
/// parent of the per-build directory instead, so the operator's choice of
/// disk is kept and the build still gets a directory of its own to sweep.
pub fn plan(spec: &BuildSpec, ctx: &PlanContext<'_>) -> Result<DibCommand, PlanError> {
    let image = &spec.image;
    let cmd_text = image
        .dib_cmd
        .replace("%p", &ctx.package_dir.to_string_lossy());
    let mut words = shell_split(&cmd_text).map_err(|reason| PlanError::DibCmd {
        image: image.name.clone(),
        cmd: image.dib_cmd.clone(),
        reason,
    })?;
    if words.is_empty() {
        return Err(PlanError::DibCmd {
            image: image.name.clone(),
            cmd: image.dib_cmd.clone(),
            reason: "empty command".into(),
        });
    }
    let program = OsString::from(words.remove(0));

    let mut formats: Vec<String> = Vec::new();
    for f in &spec.formats {
        if f.is_empty() || !f.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
            return Err(PlanError::Formats {
                image: image.name.clone(),
                reason: format!("format {f:?} is not a plain word"),
            });
        }
        if !formats.contains(f) {
            formats.push(f.clone());
        }
    }
    if formats.is_empty() {
        return Err(PlanError::Formats {
            image: image.name.clone(),
            reason: "no formats to build".into(),
        });
    }
    let elements: Vec<String> = image
        .elements
        .iter()
        .flat_map(|e| e.split_whitespace())
        .map(str::to_owned)
        .collect();
    if elements.is_empty() {
        return Err(PlanError::NoElements {
            image: image.name.clone(),
        });
    }

    // Environment, in the reference's order.
    let mut env: BTreeMap<OsString, OsString> = ctx.base_env.iter().cloned().collect();
    env.insert("DIB_RELEASE".into(), image.release.clone().into());
    env.insert("DIB_IMAGE_NAME".into(), image.name.clone().into());
    env.insert(
        "DIB_IMAGE_FILENAME".into(),
        spec.output_base.clone().into_os_string(),
    );
    if let Some(dir) = &spec.elements_dir {
        env.insert("ELEMENTS_PATH".into(), dir.clone().into_os_string());
    }
    for (k, v) in &image.env_vars {
        env.insert(k.into(), v.into());
    }
    let tmp_parent = image
        .env_vars
        .get("TMP_DIR")
        .or_else(|| image.env_vars.get("TMPDIR"))
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| ctx.work_dir.to_path_buf());
    let tmp_dir = tmp_parent.join(build_dir_name(spec));
    env.insert("TMP_DIR".into(), tmp_dir.clone().into_os_string());
    env.insert("TMPDIR".into(), tmp_dir.clone().into_os_string());

    // vhd: by DIB (needs vhd-util) or converted by us from raw.
    let mut dib_formats = formats.clone();
    let mut vhd = None;
    if formats.iter().any(|f| f == "vhd") {
        let by_dib = match ctx.vhd {
            VhdStrategy::Dib => true,
            VhdStrategy::QemuImg => false,
            VhdStrategy::Auto => find_in_path("vhd-util", env.get(OsStr::new("PATH"))).is_some(),
        };
        if !by_dib {
            dib_formats.retain(|f| f != "vhd");
            let remove_source = !dib_formats.iter().any(|f| f == "raw");
            if remove_source {
                dib_formats.push("raw".into());
            }
            vhd = Some(VhdConversion {
                source: with_suffix(&spec.output_base, ".raw"),
                target: with_suffix(&spec.output_base, ".vhd"),
                remove_source,
            });
        }
    }

    let mut args: Vec<OsString> = words.into_iter().map(OsString::from).collect();
    args.push("-x".into());
    args.push("-t".into());
    args.push(dib_formats.join(",").into());
    args.push("--checksum".into());
    args.push("--no-tmpfs".into());
    if dib_formats.iter().any(|f| f == "qcow2") {
        args.push("--qemu-img-options".into());
        args.push(QEMU_IMG_COMPAT_OPTIONS.into());
    }
    args.push("-o".into());
    args.push(spec.output_base.clone().into_os_string());
    args.extend(elements.into_iter().map(OsString::from));

    Ok(DibCommand {
        program,
        args,
        env,
        tmp_dir,
        formats,
        dib_formats,
        vhd,
    })
}

/// The per-build directory's name: `<image>-<build id>`, like its log.
pub fn build_dir_name(spec: &BuildSpec) -> String {
    format!("{}-{}", spec.image.name, spec.build_id)
}

/// `<base><suffix>` (`Path::with_extension` would cut a dotted image name).
pub fn with_suffix(base: &Path, suffix: &str) -> PathBuf {
    let mut s = base.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

/// The first executable `name` in a `PATH` value.
pub fn find_in_path(name: &str, path: Option<&OsString>) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let path = path?;
    std::env::split_paths(path).map(|d| d.join(name)).find(|p| {
        std::fs::metadata(p)
            .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
            .unwrap_or(false)
    })
}

/// Splits a command with POSIX shell quoting rules, as Python's
/// `shlex.split` does (which is what Nodepool uses): whitespace separates
/// words, single quotes are literal, double quotes allow `\"` and `\\`, a
/// backslash outside quotes escapes the next character. No expansion.
pub fn shell_split(s: &str) -> Result<Vec<String>, String> {
    let mut words = Vec::new();
    let mut cur = String::new();
    let mut in_word = false;
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        match c {
            c if c.is_whitespace() => {
                if in_word {
                    words.push(std::mem::take(&mut cur));
                    in_word = false;
                }
            }
            '\'' => {
                in_word = true;
                loop {
                    match chars.next() {
                        Some('\'') => break,
                        Some(c) => cur.push(c),
                        None => return Err("no closing single quote".into()),
                    }
                }
            }
            '"' => {
                in_word = true;
                loop {
                    match chars.next() {
                        Some('"') => break,
                        Some('\\') => match chars.next() {
                            Some(e @ ('"' | '\\')) => cur.push(e),
                            Some(e) => {
                                cur.push('\\');
                                cur.push(e);
                            }
                            None => return Err("no closing double quote".into()),
                        },
                        Some(c) => cur.push(c),
                        None => return Err("no closing double quote".into()),
                    }
                }
            }
            '\\' => {
                in_word = true;
                match chars.next() {
                    Some(e) => cur.push(e),
                    None => return Err("backslash at the end".into()),
                }
            }
            c => {
                in_word = true;
                cur.push(c);
            }
        }
    }
    if in_word {
        words.push(cur);
    }
    Ok(words)
}

/// Quotes one word for display so that [`shell_split`] reads it back.
pub fn shell_quote(word: &OsStr) -> String {
    let s = word.to_string_lossy();
    let plain = !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./=:,+%@".contains(&b));
    if plain {
        s.into_owned()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::{diskimage, spec};

    fn ctx<'a>(work: &'a Path, pkg: &'a Path) -> PlanContext<'a> {
        PlanContext {
            base_env: vec![
                ("PATH".into(), "/usr/bin:/bin".into()),
                ("HOME".into(), "/root".into()),
                ("DIB_RELEASE".into(), "from-daemon".into()),
            ],
            work_dir: work,
            package_dir: pkg,
            vhd: VhdStrategy::Auto,
        }
    }

    fn strs(v: &[OsString]) -> Vec<&str> {
        v.iter().map(|s| s.to_str().unwrap()).collect()
    }

    #[test]
    fn command_line_is_the_references() {
        let mut s = spec(diskimage("ubuntu"), &["qcow2", "raw"], "/images/ubuntu-abc");
        s.image.elements = vec!["ubuntu-minimal".into(), "vm simple-init".into()];
        let c = plan(&s, &ctx(Path::new("/work"), Path::new("/pkg"))).unwrap();
        assert_eq!(c.program, "disk-image-create");
        assert_eq!(
            strs(&c.args),
            [
                "-x",
                "-t",
                "qcow2,raw",
                "--checksum",
                "--no-tmpfs",
                "--qemu-img-options",
                "compat=0.10",
                "-o",
                "/images/ubuntu-abc",
                "ubuntu-minimal",
                "vm",
                "simple-init"
            ]
        );
        assert_eq!(c.dib_formats, ["qcow2", "raw"]);
        assert_eq!(c.vhd, None);
        assert_eq!(
            c.display(),
            "disk-image-create -x -t qcow2,raw --checksum --no-tmpfs --qemu-img-options compat=0.10 -o /images/ubuntu-abc ubuntu-minimal vm simple-init"
        );
    }

    #[test]
    fn no_qemu_options_without_qcow2_and_formats_deduplicated() {
        let s = spec(diskimage("d"), &["raw", "tar", "raw"], "/i/d-1");
        let c = plan(&s, &ctx(Path::new("/w"), Path::new("/p"))).unwrap();
        assert_eq!(
            strs(&c.args),
            [
                "-x",
                "-t",
                "raw,tar",
                "--checksum",
                "--no-tmpfs",
                "-o",
                "/i/d-1",
                "debian-minimal"
            ]
        );
    }

    #[test]
    fn dib_cmd_is_split_with_shell_rules_and_percent_p_replaced() {
        let mut s = spec(diskimage("d"), &["raw"], "/i/d-1");
        s.image.dib_cmd = r#"env 'A=x y' "B=\"q\"" C=a\ b %p/fake-dib"#.into();
        let c = plan(&s, &ctx(Path::new("/w"), Path::new("/opt/pkg"))).unwrap();
        assert_eq!(c.program, "env");
        assert_eq!(
            strs(&c.args[..4]),
            ["A=x y", "B=\"q\"", "C=a b", "/opt/pkg/fake-dib"]
        );
        assert_eq!(c.args[4], "-x");
    }

    #[test]
    fn bad_dib_cmd_names_the_image_and_the_command() {
        for (cmd, why) in [
            ("  ", "empty command"),
            ("dib 'open", "no closing single quote"),
            ("dib \"open", "no closing double quote"),
            ("dib \\", "backslash at the end"),
        ] {
            let mut s = spec(diskimage("fedora"), &["raw"], "/i/f-1");
            s.image.dib_cmd = cmd.into();
            let e = plan(&s, &ctx(Path::new("/w"), Path::new("/p"))).unwrap_err();
            let msg = e.to_string();
            assert!(msg.starts_with("diskimage fedora: dib-cmd"), "{msg}");
            assert!(msg.contains(why), "{msg}");
            assert!(msg.contains(&format!("{cmd:?}")), "{msg}");
        }
    }

    #[test]
    fn bad_formats_and_elements_are_rejected() {
        let s = spec(diskimage("x"), &[], "/i/x-1");
        let e = plan(&s, &ctx(Path::new("/w"), Path::new("/p"))).unwrap_err();
        assert_eq!(e.to_string(), "diskimage x: no formats to build");
        let s = spec(diskimage("x"), &["qcow2,raw"], "/i/x-1");
        let e = plan(&s, &ctx(Path::new("/w"), Path::new("/p"))).unwrap_err();
        assert!(
            e.to_string().contains("\"qcow2,raw\" is not a plain word"),
            "{e}"
        );
        let mut s = spec(diskimage("x"), &["raw"], "/i/x-1");
        s.image.elements = vec![" ".into()];
        let e = plan(&s, &ctx(Path::new("/w"), Path::new("/p"))).unwrap_err();
        assert_eq!(e.to_string(), "diskimage x: no elements to build");
    }

    #[test]
    fn environment_order_and_overrides() {
        let mut s = spec(diskimage("deb"), &["raw"], "/i/deb-7");
        s.image.release = "bookworm".into();
        s.elements_dir = Some("/etc/nodepool/elements".into());
        s.image.env_vars.insert("DIB_CHECKSUM".into(), "1".into());
        // an image env-var overrides what the builder set before it
        s.image
            .env_vars
            .insert("DIB_IMAGE_NAME".into(), "renamed".into());
        let c = plan(&s, &ctx(Path::new("/work"), Path::new("/p"))).unwrap();
        let get = |k: &str| c.env.get(OsStr::new(k)).map(|v| v.to_str().unwrap());
        assert_eq!(get("HOME"), Some("/root"));
        assert_eq!(get("DIB_RELEASE"), Some("bookworm"));
        assert_eq!(get("DIB_IMAGE_NAME"), Some("renamed"));
        assert_eq!(get("DIB_IMAGE_FILENAME"), Some("/i/deb-7"));
        assert_eq!(get("ELEMENTS_PATH"), Some("/etc/nodepool/elements"));
        assert_eq!(get("DIB_CHECKSUM"), Some("1"));
        assert_eq!(get("TMP_DIR"), Some("/work/deb-7"));
        assert_eq!(get("TMPDIR"), Some("/work/deb-7"));
        assert_eq!(c.tmp_dir, Path::new("/work/deb-7"));
    }

    #[test]
    fn release_is_set_even_when_empty_and_elements_path_only_when_configured() {
        let s = spec(diskimage("deb"), &["raw"], "/i/deb-7");
        let c = plan(&s, &ctx(Path::new("/work"), Path::new("/p"))).unwrap();
        assert_eq!(c.env.get(OsStr::new("DIB_RELEASE")).unwrap(), "");
        assert!(!c.env.contains_key(OsStr::new("ELEMENTS_PATH")));
    }

    #[test]
    fn image_tmp_dir_becomes_the_parent_of_the_build_dir() {
        let mut s = spec(diskimage("deb"), &["raw"], "/i/deb-7");
        s.image
            .env_vars
            .insert("TMPDIR".into(), "/opt/dib_tmp".into());
        let c = plan(&s, &ctx(Path::new("/work"), Path::new("/p"))).unwrap();
        assert_eq!(c.tmp_dir, Path::new("/opt/dib_tmp/deb-7"));
        assert_eq!(
            c.env.get(OsStr::new("TMPDIR")).unwrap(),
            "/opt/dib_tmp/deb-7"
        );
        s.image.env_vars.insert("TMP_DIR".into(), "/big".into());
        let c = plan(&s, &ctx(Path::new("/work"), Path::new("/p"))).unwrap();
        assert_eq!(c.tmp_dir, Path::new("/big/deb-7"));
        assert_eq!(c.env.get(OsStr::new("TMP_DIR")).unwrap(), "/big/deb-7");
    }

    #[test]
    fn vhd_without_vhd_util_is_converted_from_raw() {
        let s = spec(diskimage("r"), &["qcow2", "vhd"], "/i/r-1");
        let c = plan(&s, &ctx(Path::new("/w"), Path::new("/p"))).unwrap();
        assert_eq!(c.formats, ["qcow2", "vhd"]);
        assert_eq!(c.dib_formats, ["qcow2", "raw"]);
        assert_eq!(
            c.vhd,
            Some(VhdConversion {
                source: "/i/r-1.raw".into(),
                target: "/i/r-1.vhd".into(),
                remove_source: true,
            })
        );
        let s = spec(diskimage("r"), &["vhd", "raw"], "/i/r-1");
        let c = plan(&s, &ctx(Path::new("/w"), Path::new("/p"))).unwrap();
        assert_eq!(c.dib_formats, ["raw"]);
        assert!(!c.vhd.unwrap().remove_source);
    }

    #[test]
    fn vhd_with_vhd_util_on_the_build_path_is_made_by_dib() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let tool = dir.path().join("vhd-util");
        std::fs::write(&tool, "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(&tool, std::fs::Permissions::from_mode(0o755)).unwrap();
        let mut s = spec(diskimage("r"), &["vhd"], "/i/r-1");
        let path = format!("/nonexistent:{}", dir.path().display());
        s.image.env_vars.insert("PATH".into(), path);
        let c = plan(&s, &ctx(Path::new("/w"), Path::new("/p"))).unwrap();
        assert_eq!(c.dib_formats, ["vhd"]);
        assert_eq!(c.vhd, None);
        // ...unless qemu-img is forced.
        let mut cx = ctx(Path::new("/w"), Path::new("/p"));
        cx.vhd = VhdStrategy::QemuImg;
        let c = plan(&s, &cx).unwrap();
        assert_eq!(c.dib_formats, ["raw"]);
        // A non-executable file of that name does not count.
        std::fs::set_permissions(&tool, std::fs::Permissions::from_mode(0o644)).unwrap();
        let c = plan(&s, &ctx(Path::new("/w"), Path::new("/p"))).unwrap();
        assert_eq!(c.dib_formats, ["raw"]);
    }

    #[test]
    fn shell_quote_round_trips() {
        for w in ["plain", "a b", "it's", "", "$HOME", "x\"y"] {
            let q = shell_quote(OsStr::new(w));
            assert_eq!(shell_split(&q).unwrap(), [w], "{q}");
        }
    }
}
