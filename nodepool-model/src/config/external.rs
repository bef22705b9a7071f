//! `driver: external`: a provider implemented by any program that speaks
//! the JSON-lines protocol of `docs/external-provider.md`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use indexmap::IndexMap;

use super::ConfigErrorKind as Kind;
use super::yaml::{At, Errors, Fields};

/// The per-call timeout of an external program when `timeout` is absent.
pub const DEFAULT_EXTERNAL_TIMEOUT: Duration = Duration::from_secs(60);

/// The program behind a `driver: external` provider.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExternalProgram {
    /// `command`: the program and its arguments (a single string is the
    /// program alone). A relative program path containing `/` is resolved
    /// against the configuration file's directory.
    pub command: Vec<String>,
    /// `timeout`: the longest one call may take before the program is
    /// counted as hung, killed and restarted at the next call.
    pub timeout: Duration,
    /// `environment`: variables set for the program (beside the launcher's
    /// own environment).
    pub environment: IndexMap<String, String>,
}

impl ExternalProgram {
    /// The program (first word of `command`).
    pub fn program(&self) -> &str {
        self.command.first().map(String::as_str).unwrap_or_default()
    }
}

/// Reads the external keys of a provider mapping (only called for
/// `driver: external`).
pub(crate) fn external(m: &mut Fields<'_>, errs: &mut Errors) -> Option<ExternalProgram> {
    let command = m
        .required("command", errs)
        .and_then(|f| command(f.at(), errs));
    let timeout = match m.float("timeout", errs) {
        Some(t) if t > 0.0 && t.is_finite() => Duration::from_secs_f64(t),
        Some(t) => {
            errs.push(
                &m.path_of("timeout"),
                Kind::InvalidValue,
                format!("must be a positive number of seconds, found {t}"),
            );
            DEFAULT_EXTERNAL_TIMEOUT
        }
        None => DEFAULT_EXTERNAL_TIMEOUT,
    };
    let environment = m.string_map("environment", errs).unwrap_or_default();
    Some(ExternalProgram {
        command: command?,
        timeout,
        environment,
    })
}

fn command(at: At<'_>, errs: &mut Errors) -> Option<Vec<String>> {
    let words = match at.value {
        serde_yaml::Value::String(s) => vec![s.clone()],
        _ => at.string_list(errs)?,
    };
    if words.first().is_none_or(|w| w.trim().is_empty()) {
        errs.push(
            at.path,
            Kind::InvalidValue,
            "must name a program (a string, or a list whose first item is the program)",
        );
        return None;
    }
    Some(words)
}

/// Resolves a relative program path against the configuration file's
/// directory and checks that the program can be run, so that a typo is a
/// located error at load time rather than a launch failure later.
pub(crate) fn check_program(
    program: &mut ExternalProgram,
    base_dir: Option<&Path>,
    path: &str,
    errs: &mut Errors,
) {
    let Some(first) = program.command.first_mut() else {
        return;
    };
    if first.contains('/') {
        let p = PathBuf::from(&*first);
        if p.is_relative()
            && let Some(base) = base_dir
        {
            *first = base.join(p).to_string_lossy().into_owned();
        }
        if let Err(why) = runnable(Path::new(&*first)) {
            errs.push(path, Kind::InvalidValue, format!("program {first:?} {why}"));
        }
        return;
    }
    let on_path = std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).any(|dir| runnable(&dir.join(&*first)).is_ok()))
        .unwrap_or(false);
    if !on_path {
        errs.push(
            path,
            Kind::InvalidValue,
            format!("program {first:?} is not found on PATH"),
        );
    }
}

fn runnable(p: &Path) -> Result<(), &'static str> {
    use std::os::unix::fs::PermissionsExt;
    match std::fs::metadata(p) {
        Err(_) => Err("does not exist"),
        Ok(m) if !m.is_file() => Err("is not a file"),
        Ok(m) if m.permissions().mode() & 0o111 == 0 => Err("is not executable"),
        Ok(_) => Ok(()),
    }
}
