//! Reading configuration files: environment substitution, the secure file,
//! relative paths, and change detection for hot reload.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};

use serde_yaml::Value;

use super::error::ConfigErrorKind as Kind;
use super::yaml::{self, At, Errors};
use super::{Config, ConfigError, ConfigErrors, Driver, StateStoreConfig, parse, validate};

/// Replaces `%(NODEPOOL_x)` with the value of environment variable
/// `NODEPOOL_x`, exactly as Nodepool does (plain text replacement; only
/// variables whose name starts with `NODEPOOL_`; unknown ones stay as written).
pub fn substitute_env<'a>(text: &str, env: impl IntoIterator<Item = (&'a str, &'a str)>) -> String {
    let mut out = text.to_owned();
    for (name, value) in env {
        if name.starts_with("NODEPOOL_") {
            out = out.replace(&format!("%({name})"), value);
        }
    }
    out
}

fn process_env() -> Vec<(String, String)> {
    std::env::vars_os()
        .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
        .filter(|(k, _)| k.starts_with("NODEPOOL_"))
        .collect()
}

/// Where a configuration comes from: the main file and the optional
/// secure file. Loading is repeatable, for hot reload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigSource {
    /// The main `nodepool.yaml`.
    pub path: PathBuf,
    /// The secure file (`-s`).
    pub secure: Option<PathBuf>,
    /// Environment for `%(NODEPOOL_x)` substitution; `None` = the process's.
    pub env: Option<Vec<(String, String)>>,
}

impl ConfigSource {
    /// A source with a main file and an optional secure file.
    pub fn new(path: impl Into<PathBuf>, secure: Option<PathBuf>) -> Self {
        ConfigSource {
            path: path.into(),
            secure,
            env: None,
        }
    }

    /// Uses these variables instead of the process environment.
    pub fn with_env(mut self, env: Vec<(String, String)>) -> Self {
        self.env = Some(env);
        self
    }

    /// A fingerprint of the files' current contents, to notice changes
    /// cheaply between passes (`None` when a file cannot be read).
    pub fn fingerprint(&self) -> Option<u64> {
        let mut h = DefaultHasher::new();
        std::fs::read(&self.path).ok()?.hash(&mut h);
        if let Some(s) = &self.secure {
            std::fs::read(s).ok()?.hash(&mut h);
        }
        Some(h.finish())
    }

    /// Reads, substitutes, merges and validates.
    pub fn load(&self) -> Result<Config, ConfigErrors> {
        let env = self.env.clone().unwrap_or_else(process_env);
        let env_ref = || env.iter().map(|(k, v)| (k.as_str(), v.as_str()));
        let main = read(&self.path)?;
        let main = substitute_env(&main, env_ref());
        let secure = match &self.secure {
            Some(p) => Some((p.clone(), substitute_env(&read(p)?, env_ref()))),
            None => None,
        };
        let base_dir = self.path.parent().map(Path::to_path_buf);
        let mut cfg = Config::from_yaml_with_secure(
            &main,
            secure.as_ref().map(|(p, t)| (p.as_path(), t.as_str())),
            base_dir.as_deref(),
        )
        // A syntax error in the secure file already names that file.
        .map_err(|e| match e.file {
            Some(_) => e,
            None => e.in_file(&self.path),
        })?;
        let mut unset = unset_variables(&main, "");
        if let Some((p, text)) = &secure {
            unset.extend(unset_variables(text, &format!("{}: ", p.display())));
        }
        cfg.warnings.splice(0..0, unset);
        Ok(cfg)
    }
}

/// `%(NODEPOOL_x)` references left after substitution: their variable is
/// not set (Python Nodepool keeps the text as written, silently). Each is
/// located by line, prefixed with `file` for the secure file.
fn unset_variables(text: &str, file: &str) -> Vec<ConfigError> {
    let mut found = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let mut rest = line;
        while let Some(at) = rest.find("%(NODEPOOL_") {
            let tail = &rest[at + 2..];
            let Some(end) = tail.find(')') else { break };
            let name = &tail[..end];
            if name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                found.push(ConfigError::new(
                    format!("{file}line {}", n + 1),
                    Kind::UnsetVariable,
                    format!(
                        "`%({name})` names an environment variable that is not set; the text is kept as written"
                    ),
                ));
            }
            rest = &tail[end..];
        }
    }
    found
}

fn read(path: &Path) -> Result<String, ConfigErrors> {
    std::fs::read_to_string(path).map_err(|e| {
        ConfigErrors::one(ConfigError::new(
            "",
            Kind::Io,
            format!("cannot read {}: {e}", path.display()),
        ))
        .in_file(path)
    })
}

impl Config {
    /// Loads and validates a file, with an optional secure file.
    pub fn load(path: impl AsRef<Path>, secure: Option<&Path>) -> Result<Config, ConfigErrors> {
        ConfigSource::new(path.as_ref(), secure.map(Path::to_path_buf)).load()
    }

    /// Parses and validates YAML text (no environment substitution).
    /// Relative paths stay relative.
    pub fn from_yaml(text: &str) -> Result<Config, ConfigErrors> {
        Config::from_yaml_with_secure(text, None, None)
    }

    /// Parses and validates YAML text plus an optional secure file's text;
    /// relative SQLite paths and simulated `state-file`s are resolved
    /// against `base_dir`.
    pub fn from_yaml_with_secure(
        text: &str,
        secure: Option<(&Path, &str)>,
        base_dir: Option<&Path>,
    ) -> Result<Config, ConfigErrors> {
        let mut root = yaml::parse(text)?;
        let mut errs = Errors::default();
        if root.as_mapping().is_some_and(|m| m.is_empty()) {
            errs.warn(
                "",
                Kind::Empty,
                "the configuration is empty: no labels, providers or diskimages",
            );
        }
        let mut secure_images = Vec::new();
        let mut from_secure = None;
        if let Some((secure_path, secure_text)) = secure {
            let secure_root = yaml::parse(secure_text).map_err(|e| e.in_file(secure_path))?;
            let label = secure_path.display().to_string();
            let replaced = merge_secure(
                &mut root,
                &secure_root,
                &label,
                &mut secure_images,
                &mut errs,
            );
            from_secure = Some((label, replaced));
        }
        let merged_from = errs.list.len();
        let (mut cfg, raw_images) = parse::config(&root, &mut errs);
        // The keys the secure file replaced are parsed with the main ones;
        // a problem in them is in the secure file, so say so.
        if let Some((label, replaced)) = &from_secure {
            for e in &mut errs.list[merged_from..] {
                let ours = replaced.iter().any(|k| {
                    e.path
                        .strip_prefix(k)
                        .is_some_and(|rest| rest.is_empty() || rest.starts_with(['.', '[']))
                });
                if ours {
                    e.path = format!("{label}: {}", e.path);
                }
            }
        }
        cfg.diskimages = validate::resolve_diskimages(&raw_images, &mut errs);
        for (path, name, env) in secure_images {
            match cfg.diskimages.iter_mut().find(|d| d.name == name) {
                Some(d) => d.env_vars.extend(env),
                None => errs.push(
                    &path,
                    Kind::UnknownReference,
                    format!("unknown diskimage {name:?}"),
                ),
            }
        }
        validate::cross_check(&cfg, &raw_images, &mut errs);
        validate::ready_scripts(&mut cfg, &raw_images, base_dir, &mut errs);
        if let (StateStoreConfig::Sqlite { path, .. }, Some(base)) =
            (&mut cfg.state_store, base_dir)
            && path.is_relative()
        {
            *path = base.join(&*path);
        }
        for p in &mut cfg.providers {
            if let Driver::External(program) = &mut p.driver {
                // Providers that failed to parse are left out of `cfg`: the
                // place is found by name in the file.
                let i = root
                    .get("providers")
                    .and_then(|v| v.as_sequence())
                    .and_then(|list| {
                        list.iter()
                            .position(|v| v.get("name").and_then(|n| n.as_str()) == Some(&p.name))
                    });
                let path = match i {
                    Some(i) => format!("providers[{i}].command"),
                    None => format!("providers[name={}].command", p.name),
                };
                super::external::check_program(program, base_dir, &path, &mut errs);
            }
        }
        // The simulated cloud's state file, like the SQLite path.
        if let Some(base) = base_dir {
            for p in &mut cfg.providers {
                if let Driver::Simulated(sim) = &mut p.driver
                    && let Some(f) = &mut sim.state_file
                    && f.is_relative()
                {
                    *f = base.join(&*f);
                }
                if let Driver::Qemu(host) = &mut p.driver {
                    for f in std::iter::once(&mut host.image_dir).chain(host.public_key.as_mut()) {
                        if f.is_relative() {
                            *f = base.join(&*f);
                        }
                    }
                }
            }
        }
        if errs.list.is_empty() {
            cfg.warnings = errs.warnings;
            Ok(cfg)
        } else {
            Err(ConfigErrors {
                file: None,
                errors: errs.list,
            })
        }
    }
}

/// The secure file may hold `zookeeper-servers` (replacing the main ones),
/// `zookeeper-tls`, and `diskimages: [{name, env-vars}]` merged into the
/// named images' env-vars after inheritance; any other key is an error.
/// Returns the top-level keys it put into `root`.
pub(super) fn merge_secure(
    root: &mut Value,
    secure: &Value,
    label: &str,
    images: &mut Vec<(String, String, indexmap::IndexMap<String, String>)>,
    errs: &mut Errors,
) -> Vec<&'static str> {
    let prefix = format!("{label}: ");
    let mut local = Errors::default();
    let Some(mut m) = (At {
        value: secure,
        path: "",
    })
    .fields(&mut local) else {
        prefix_errors(local, &prefix, errs);
        return Vec::new();
    };
    let servers = m.get("zookeeper-servers").map(|f| f.value.clone());
    let tls = m.get("zookeeper-tls").map(|f| f.value.clone());
    if let Some(f) = m.get("diskimages")
        && let Some(items) = f.at().list(&mut local)
    {
        for (path, v) in &items {
            let Some(mut d) = (At { value: v, path }).fields(&mut local) else {
                continue;
            };
            let name = d.required_string("name", &mut local);
            let env = d.string_map("env-vars", &mut local).unwrap_or_default();
            d.finish(&mut local);
            if let Some(name) = name {
                images.push((format!("{prefix}{path}.name"), name, env));
            }
        }
    }
    m.finish(&mut local);
    prefix_errors(local, &prefix, errs);
    let mut replaced = Vec::new();
    if let Value::Mapping(map) = root {
        if let Some(s) = servers {
            map.insert(Value::String("zookeeper-servers".into()), s);
            replaced.push("zookeeper-servers");
        }
        if let Some(t) = tls {
            map.insert(Value::String("zookeeper-tls".into()), t);
            replaced.push("zookeeper-tls");
        }
    }
    replaced
}

fn prefix_errors(local: Errors, prefix: &str, errs: &mut Errors) {
    for e in local.list {
        errs.list.push(ConfigError {
            path: format!("{prefix}{}", e.path),
            ..e
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_substitution_is_plain_text_and_nodepool_only() {
        let env = [("NODEPOOL_CLOUD", "mycloud"), ("HOME", "/root")];
        assert_eq!(
            substitute_env("cloud: %(NODEPOOL_CLOUD) %(HOME) %(NODEPOOL_MISSING)", env),
            "cloud: mycloud %(HOME) %(NODEPOOL_MISSING)"
        );
    }
}
