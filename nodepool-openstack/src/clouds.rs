//! `clouds.yaml` and `secure.yaml`: which cloud, where, with which
//! credentials.
//!
//! The files are found and merged the way openstacksdk does it:
//! `OS_CLIENT_CONFIG_FILE` first, then `clouds.{yaml,yml,json}` in the
//! current directory, `~/.config/openstack` (`$XDG_CONFIG_HOME/openstack`)
//! and `/etc/openstack`; the first file found wins. `secure.yaml`
//! (`OS_CLIENT_SECURE_FILE`, then the same directories) is deep-merged over
//! it, so passwords can live in a file of their own. `OS_CLOUD` names the
//! cloud when the provider does not.
//!
//! Every error names the file and the key, e.g.
//! `/etc/openstack/clouds.yaml: clouds.peer.auth.auth_url: missing` (a
//! key secure.yaml set names secure.yaml; a syntax error names the line
//! and column). A value of the wrong type is described by its kind, never
//! echoed, so a misplaced password cannot leak into a message; only
//! values that are not secret (URLs, region and interface names) are.
//!
//! [`provider_clouds`] loads the cloud of every OpenStack provider of a
//! configuration and reports every provider's problem at once: the check
//! `nodepool config-validate` and every daemon (re)load make.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nodepool_model::config::{Config, Driver, ProviderConfig, Secret};
use serde_json::{Map, Value};

/// The image format a cloud wants when clouds.yaml does not say.
pub const DEFAULT_IMAGE_FORMAT: &str = "qcow2";

/// A problem in clouds.yaml / secure.yaml, with the place it was found.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{place}: {message}")]
pub struct CloudConfigError {
    /// File and key, e.g. `/etc/openstack/clouds.yaml: clouds.peer.auth`.
    pub place: String,
    /// What is wrong.
    pub message: String,
}

impl CloudConfigError {
    fn new(place: impl Into<String>, message: impl Into<String>) -> Self {
        CloudConfigError {
            place: place.into(),
            message: message.into(),
        }
    }
}

/// Where to look for the files and which cloud to pick when none is named.
///
/// [`CloudsLoader::from_env`] reads the process environment; tests build one
/// by hand so that they do not depend on it.
#[derive(Clone, Debug, Default)]
pub struct CloudsLoader {
    /// `OS_CLIENT_CONFIG_FILE`: looked at before the search directories.
    pub config_file: Option<PathBuf>,
    /// `OS_CLIENT_SECURE_FILE`: looked at before the search directories.
    pub secure_file: Option<PathBuf>,
    /// Directories searched in order (cwd, user config dir, /etc/openstack).
    pub search_dirs: Vec<PathBuf>,
    /// `OS_CLOUD`: the cloud used when the caller names none.
    pub default_cloud: Option<String>,
}

impl CloudsLoader {
    /// The loader openstacksdk would use in this process.
    pub fn from_env() -> Self {
        let env = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty());
        let mut search_dirs = Vec::new();
        if let Ok(cwd) = std::env::current_dir() {
            search_dirs.push(cwd);
        }
        if let Some(xdg) = env("XDG_CONFIG_HOME") {
            search_dirs.push(PathBuf::from(xdg).join("openstack"));
        } else if let Some(home) = env("HOME") {
            search_dirs.push(PathBuf::from(home).join(".config").join("openstack"));
        }
        search_dirs.push(PathBuf::from("/etc/openstack"));
        CloudsLoader {
            config_file: env("OS_CLIENT_CONFIG_FILE").map(PathBuf::from),
            secure_file: env("OS_CLIENT_SECURE_FILE").map(PathBuf::from),
            search_dirs,
            default_cloud: env("OS_CLOUD").and_then(|v| v.into_string().ok()),
        }
    }

    /// A loader that reads exactly this clouds.yaml (and no secure file
    /// unless set), e.g. for tests and the testbed.
    pub fn file(path: impl Into<PathBuf>) -> Self {
        CloudsLoader {
            config_file: Some(path.into()),
            ..CloudsLoader::default()
        }
    }

    fn find(&self, explicit: &Option<PathBuf>, stem: &str) -> Option<PathBuf> {
        if let Some(p) = explicit
            && p.is_file()
        {
            return Some(p.clone());
        }
        self.search_dirs
            .iter()
            .flat_map(|d| ["yaml", "yml", "json"].map(|ext| d.join(format!("{stem}.{ext}"))))
            .find(|p| p.is_file())
    }

    /// Loads one cloud (`cloud`, else `OS_CLOUD`) with `region` overriding
    /// its `region_name`.
    pub fn load(
        &self,
        cloud: Option<&str>,
        region: Option<&str>,
    ) -> Result<CloudConfig, CloudConfigError> {
        let path = self
            .find(&self.config_file, "clouds")
            .ok_or_else(|| CloudConfigError::new("clouds.yaml", self.not_found()))?;
        let name = cloud
            .map(str::to_owned)
            .or_else(|| self.default_cloud.clone())
            .ok_or_else(|| {
                CloudConfigError::new(
                    path.display().to_string(),
                    "no cloud named: set the provider's `cloud` or OS_CLOUD",
                )
            })?;
        let mut doc = read_doc(&path)?;
        let secure = match self.find(&self.secure_file, "secure") {
            Some(p) => {
                let sec = read_doc(&p)?;
                deep_merge(&mut doc, sec.clone());
                Some((p, sec))
            }
            None => None,
        };
        let sources = match &secure {
            Some((s, _)) => format!("{} (+ {})", path.display(), s.display()),
            None => path.display().to_string(),
        };
        let secure = secure.as_ref().map(|(p, v)| (p.as_path(), v));
        CloudConfig::from_doc(&name, region, &doc, &path, secure, &sources)
    }

    /// Every path [`load`](Self::load) looks at for clouds.yaml, in order,
    /// for the message when none exists.
    fn not_found(&self) -> String {
        let mut looked: Vec<String> = self
            .config_file
            .iter()
            .map(|p| format!("{} (OS_CLIENT_CONFIG_FILE)", p.display()))
            .collect();
        for d in &self.search_dirs {
            for ext in ["yaml", "yml", "json"] {
                looked.push(d.join(format!("clouds.{ext}")).display().to_string());
            }
        }
        if looked.is_empty() {
            "no clouds.yaml found (no place to look: set OS_CLIENT_CONFIG_FILE)".to_owned()
        } else {
            format!("no clouds.yaml found (looked at {})", looked.join(", "))
        }
    }
}

fn read_doc(path: &Path) -> Result<Value, CloudConfigError> {
    let place = path.display().to_string();
    let text = std::fs::read_to_string(path)
        .map_err(|e| CloudConfigError::new(&place, format!("cannot read: {e}")))?;
    // YAML is a superset of JSON, so one parser reads all three suffixes.
    let v: Value = serde_yaml::from_str(&text).map_err(|e| {
        // libyaml's messages name positions and expectations, never the
        // text itself, so a password on a broken line is not echoed.
        let at = match e.location() {
            Some(l) => format!("{place}: line {} column {}", l.line(), l.column()),
            None => place.clone(),
        };
        CloudConfigError::new(at, format!("not valid YAML: {e}"))
    })?;
    match v {
        Value::Object(_) => Ok(v),
        Value::Null => Ok(Value::Object(Map::new())),
        _ => Err(CloudConfigError::new(
            place,
            "the top level must be a mapping",
        )),
    }
}

/// Merges `over` into `base`: mappings key by key, anything else replaced
/// (secure.yaml's semantics in openstacksdk).
fn deep_merge(base: &mut Value, over: Value) {
    match (base, over) {
        (Value::Object(b), Value::Object(o)) => {
            for (k, v) in o {
                match b.get_mut(&k) {
                    Some(slot) => deep_merge(slot, v),
                    None => {
                        b.insert(k, v);
                    }
                }
            }
        }
        (slot, v) => *slot = v,
    }
}

/// How to authenticate to Keystone v3.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Auth {
    /// `auth_type: password` (the default).
    Password {
        /// Identity endpoint (with `/v3`).
        auth_url: String,
        /// User by name (with a domain) or by id.
        user: UserRef,
        /// The password.
        password: Secret,
        /// Project scope; `None` = unscoped (rarely useful).
        project: Option<ProjectRef>,
    },
    /// `auth_type: v3applicationcredential`.
    ApplicationCredential {
        /// Identity endpoint (with `/v3`).
        auth_url: String,
        /// Credential id, or its name (then `user` is needed).
        id: Option<String>,
        /// Credential name.
        name: Option<String>,
        /// Its owner, when the credential is named rather than by id.
        user: Option<UserRef>,
        /// The secret.
        secret: Secret,
    },
}

impl Auth {
    /// The identity endpoint.
    pub fn auth_url(&self) -> &str {
        match self {
            Auth::Password { auth_url, .. } | Auth::ApplicationCredential { auth_url, .. } => {
                auth_url
            }
        }
    }

    /// The secret strings, so that messages can be scrubbed of them.
    pub(crate) fn secrets(&self) -> Vec<String> {
        match self {
            Auth::Password { password, .. } => vec![password.expose().to_owned()],
            Auth::ApplicationCredential { secret, .. } => vec![secret.expose().to_owned()],
        }
    }
}

/// A domain by name or id.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DomainRef {
    /// `*_domain_id`.
    Id(String),
    /// `*_domain_name`.
    Name(String),
}

/// A user by id, or by name within a domain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum UserRef {
    /// `user_id`.
    Id(String),
    /// `username` + user domain.
    Name {
        /// User name.
        name: String,
        /// Its domain.
        domain: DomainRef,
    },
}

/// A project by id, or by name within a domain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ProjectRef {
    /// `project_id` (or `tenant_id`).
    Id(String),
    /// `project_name` (or `tenant_name`) + project domain.
    Name {
        /// Project name.
        name: String,
        /// Its domain.
        domain: DomainRef,
    },
}

/// One cloud of clouds.yaml, resolved.
#[derive(Clone, Debug, PartialEq)]
pub struct CloudConfig {
    /// The cloud's name in clouds.yaml.
    pub name: String,
    /// The file(s) it came from, for messages.
    pub source: String,
    /// Credentials.
    pub auth: Auth,
    /// Region (the provider's `region-name` wins over `region_name`).
    pub region_name: Option<String>,
    /// Endpoint interface: `public` (default), `internal` or `admin`.
    pub interface: String,
    /// Per-service interface (`compute_interface: internal`), by service type.
    pub service_interfaces: BTreeMap<String, String>,
    /// Per-service endpoint (`image_endpoint_override: http://...`), by service type.
    pub endpoint_overrides: BTreeMap<String, String>,
    /// Image format uploads use (`image_format`, default qcow2).
    pub image_format: String,
    /// Per-call timeout (`api_timeout`), when set.
    pub api_timeout: Option<Duration>,
    /// Verify TLS certificates (`verify`, default true).
    pub verify: bool,
    /// Extra CA bundle (`cacert`).
    pub cacert: Option<PathBuf>,
}

/// One mapping of the merged document, with the path to it, for located
/// errors.
struct Reader<'a> {
    file: &'a str,
    /// The secure file and its mapping at the same path: a key found there
    /// came from it (secure.yaml wins the merge), so errors about it name
    /// that file.
    secure: Option<(&'a str, &'a Map<String, Value>)>,
    prefix: String,
    map: &'a Map<String, Value>,
}

impl<'a> Reader<'a> {
    fn place(&self, key: &str) -> String {
        let file = match self.secure {
            Some((secure, m)) if m.contains_key(key) => secure,
            _ => self.file,
        };
        format!("{file}: {}", join(&self.prefix, key))
    }

    fn error(&self, key: &str, message: impl Into<String>) -> CloudConfigError {
        CloudConfigError::new(self.place(key), message)
    }

    fn string(&self, key: &str) -> Result<Option<String>, CloudConfigError> {
        match self.map.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            // Ids and ports are sometimes written as bare numbers.
            Some(Value::Number(n)) => Ok(Some(n.to_string())),
            Some(other) => {
                Err(self.error(key, format!("expected a string, found {}", kind(other))))
            }
        }
    }

    fn boolean(&self, key: &str) -> Result<Option<bool>, CloudConfigError> {
        match self.map.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(other) => Err(self.error(
                key,
                format!("expected true or false, found {}", kind(other)),
            )),
        }
    }

    fn child(&self, key: &str) -> Result<Option<Reader<'a>>, CloudConfigError> {
        match self.map.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Object(m)) => Ok(Some(Reader {
                file: self.file,
                secure: self.secure.and_then(|(f, s)| match s.get(key) {
                    Some(Value::Object(sm)) => Some((f, sm)),
                    _ => None,
                }),
                prefix: join(&self.prefix, key),
                map: m,
            })),
            Some(other) => {
                Err(self.error(key, format!("expected a mapping, found {}", kind(other))))
            }
        }
    }
}

/// `a.b` + `c` → `a.b.c`; the top level has no prefix.
fn join(prefix: &str, key: &str) -> String {
    if prefix.is_empty() {
        key.to_owned()
    } else {
        format!("{prefix}.{key}")
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "a mapping",
    }
}

impl CloudConfig {
    fn from_doc(
        name: &str,
        region: Option<&str>,
        doc: &Value,
        path: &Path,
        secure: Option<(&Path, &Value)>,
        sources: &str,
    ) -> Result<CloudConfig, CloudConfigError> {
        let file = path.display().to_string();
        let secure_file = secure.map(|(p, _)| p.display().to_string());
        let root = doc
            .as_object()
            .ok_or_else(|| CloudConfigError::new(&file, "the top level must be a mapping"))?;
        let top = Reader {
            file: &file,
            secure: secure_file
                .as_deref()
                .zip(secure.and_then(|(_, v)| v.as_object())),
            prefix: String::new(),
            map: root,
        };
        let clouds = match top.child("clouds")? {
            Some(c) => c,
            None => return Err(CloudConfigError::new(format!("{file}: clouds"), "missing")),
        };
        if matches!(clouds.map.get(name), Some(Value::Null)) {
            return Err(clouds.error(name, "expected a mapping, found null"));
        }
        let Some(cloud) = clouds.child(name)? else {
            let known: Vec<&str> = clouds.map.keys().map(String::as_str).collect();
            return Err(CloudConfigError::new(
                format!("{file}: clouds"),
                format!(
                    "no cloud named {name:?} (clouds here: {})",
                    if known.is_empty() {
                        "none".to_owned()
                    } else {
                        known.join(", ")
                    }
                ),
            ));
        };
        if cloud.map.contains_key("profile") {
            return Err(cloud.error(
                "profile",
                "vendor profiles are not supported; write auth_url, region_name, ... out in full",
            ));
        }
        if let Some(v) = cloud.string("identity_api_version")?
            && !v.starts_with('3')
        {
            return Err(cloud.error(
                "identity_api_version",
                format!("only Keystone v3 is supported, not {v}"),
            ));
        }
        let auth = read_auth(&cloud)?;
        // Type-checked even when the provider's region-name overrides it.
        let own_region = cloud.string("region_name")?;
        let region_name = region.map(str::to_owned).or(own_region);
        let regions = match cloud.map.get("regions") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(list)) => list
                .iter()
                .map(|v| match v {
                    Value::String(s) => Ok(s.clone()),
                    Value::Object(m) => match m.get("name") {
                        Some(Value::String(s)) => Ok(s.clone()),
                        _ => Err(cloud.error(
                            "regions",
                            "a region given as a mapping needs a `name` string",
                        )),
                    },
                    other => Err(cloud.error(
                        "regions",
                        format!(
                            "expected region names or {{name: ...}} mappings, found {}",
                            kind(other)
                        ),
                    )),
                })
                .collect::<Result<_, _>>()?,
            Some(other) => {
                return Err(
                    cloud.error("regions", format!("expected a list, found {}", kind(other)))
                );
            }
        };
        if let Some(r) = &region_name
            && !regions.is_empty()
            && !regions.contains(r)
        {
            // Say which file the wrong name is in: nodepool.yaml's
            // `region-name` wins over clouds.yaml's `region_name`.
            let from = if region.is_some() {
                " (the provider's region-name)"
            } else {
                ""
            };
            return Err(cloud.error(
                "regions",
                format!("region {r:?}{from} is not one of {}", regions.join(", ")),
            ));
        }
        let interface = cloud
            .string("interface")?
            .or(cloud.string("endpoint_type")?)
            .unwrap_or_else(|| "public".to_owned());
        check_interface(&interface, &cloud.place("interface"))?;
        let mut service_interfaces = BTreeMap::new();
        let mut endpoint_overrides = BTreeMap::new();
        for key in cloud.map.keys() {
            if let Some(svc) = key.strip_suffix("_endpoint_override") {
                if let Some(url) = cloud.string(key)? {
                    endpoint_overrides.insert(svc.replace('_', "-"), url);
                }
            } else if let Some(svc) = key.strip_suffix("_interface")
                && let Some(i) = cloud.string(key)?
            {
                check_interface(&i, &cloud.place(key))?;
                service_interfaces.insert(svc.replace('_', "-"), i);
            }
        }
        let image_format = cloud
            .string("image_format")?
            .unwrap_or_else(|| DEFAULT_IMAGE_FORMAT.to_owned());
        let api_timeout = match cloud.map.get("api_timeout") {
            None | Some(Value::Null) => None,
            Some(v) => {
                let secs = match v {
                    Value::Number(n) => n.as_f64(),
                    Value::String(s) => s.trim().parse::<f64>().ok(),
                    _ => None,
                };
                let found = match v {
                    Value::Number(n) => n.to_string(),
                    // Not echoed: a misplaced line could hold anything.
                    other => kind(other).to_owned(),
                };
                // try_from: a huge number is an error here, not a panic.
                let timeout = secs
                    .filter(|s| *s > 0.0)
                    .and_then(|s| Duration::try_from_secs_f64(s).ok())
                    .ok_or_else(|| {
                        cloud.error(
                            "api_timeout",
                            format!("expected a positive number of seconds, found {found}"),
                        )
                    })?;
                Some(timeout)
            }
        };
        // openstacksdk (get_requests_verify_args): `insecure: true` turns
        // verification off; `verify` is a boolean or, as in requests, the
        // path of a CA bundle; with verification on, `cacert` wins over
        // that path, and with it off neither file is read.
        let insecure = cloud.boolean("insecure")?.unwrap_or(false);
        let (verify, verify_ca) = match cloud.map.get("verify") {
            None | Some(Value::Null) => (true, None),
            Some(Value::Bool(b)) => (*b, None),
            Some(Value::String(p)) => (true, Some(p.clone())),
            Some(other) => {
                return Err(cloud.error(
                    "verify",
                    format!(
                        "expected true, false or the path of a CA bundle, found {}",
                        kind(other)
                    ),
                ));
            }
        };
        let verify = verify && !insecure;
        let cacert_key = cloud.string("cacert")?;
        let cacert = match (verify, cacert_key, verify_ca) {
            (false, _, _) => None,
            (true, Some(c), _) => Some((expand_home(&c), "cacert")),
            (true, None, Some(v)) => Some((expand_home(&v), "verify")),
            (true, None, None) => None,
        };
        if let Some((ca, key)) = &cacert {
            check_ca_bundle(ca).map_err(|m| cloud.error(key, m))?;
        }
        Ok(CloudConfig {
            name: name.to_owned(),
            source: sources.to_owned(),
            auth,
            region_name,
            interface,
            service_interfaces,
            endpoint_overrides,
            image_format,
            api_timeout,
            verify,
            cacert: cacert.map(|(p, _)| p),
        })
    }

    /// The interface to use for one service type.
    pub fn interface_for(&self, service_type: &str) -> &str {
        self.service_interfaces
            .get(service_type)
            .map(String::as_str)
            .unwrap_or(&self.interface)
    }
}

/// `~/x` → `$HOME/x`, as openstacksdk expands `cacert`.
fn expand_home(path: &str) -> PathBuf {
    match (path.strip_prefix("~/"), std::env::var_os("HOME")) {
        (Some(rest), Some(home)) if !home.is_empty() => PathBuf::from(home).join(rest),
        _ => PathBuf::from(path),
    }
}

/// Whether a CA bundle can be used: readable, with at least one PEM
/// certificate (the client reads it again when it is built).
fn check_ca_bundle(path: &Path) -> Result<(), String> {
    let pem = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    match reqwest::Certificate::from_pem_bundle(&pem) {
        Ok(certs) if !certs.is_empty() => Ok(()),
        Ok(_) => Err(format!("{} holds no PEM certificate", path.display())),
        Err(e) => Err(format!("{} is not a PEM bundle: {e}", path.display())),
    }
}

fn check_interface(i: &str, place: &str) -> Result<(), CloudConfigError> {
    match i.trim_end_matches("URL") {
        "public" | "internal" | "admin" => Ok(()),
        _ => Err(CloudConfigError::new(
            place,
            format!("interface must be public, internal or admin, not {i:?}"),
        )),
    }
}

/// The `auth_type`s of a user and password (the client's other type is
/// [`APPCRED_AUTH`]; anything else, e.g. `token`, it cannot use).
const PASSWORD_AUTH: [&str; 2] = ["password", "v3password"];
/// The `auth_type`s of an application credential.
const APPCRED_AUTH: [&str; 3] = [
    "v3applicationcredential",
    "applicationcredential",
    "application_credential",
];

fn read_auth(cloud: &Reader<'_>) -> Result<Auth, CloudConfigError> {
    let auth_type = cloud
        .string("auth_type")?
        .unwrap_or_else(|| "password".to_owned());
    // The type decides which keys are required, so it is checked first.
    if !PASSWORD_AUTH.contains(&auth_type.as_str()) && !APPCRED_AUTH.contains(&auth_type.as_str()) {
        return Err(cloud.error(
            "auth_type",
            format!(
                "unsupported auth_type {auth_type:?} (use password or v3applicationcredential)"
            ),
        ));
    }
    let auth = cloud
        .child("auth")?
        .ok_or_else(|| CloudConfigError::new(cloud.place("auth"), "missing"))?;
    let raw_url = auth
        .string("auth_url")?
        .ok_or_else(|| CloudConfigError::new(auth.place("auth_url"), "missing"))?;
    let auth_url =
        identity_v3_url(&raw_url).map_err(|m| CloudConfigError::new(auth.place("auth_url"), m))?;
    let domain = |id_key: &str, name_key: &str| -> Result<Option<DomainRef>, CloudConfigError> {
        if let Some(id) = auth.string(id_key)? {
            return Ok(Some(DomainRef::Id(id)));
        }
        if let Some(n) = auth.string(name_key)? {
            return Ok(Some(DomainRef::Name(n)));
        }
        // openstacksdk: a bare domain_id/domain_name applies to both.
        if let Some(id) = auth.string("domain_id")? {
            return Ok(Some(DomainRef::Id(id)));
        }
        Ok(auth.string("domain_name")?.map(DomainRef::Name))
    };
    let user = |required: bool| -> Result<Option<UserRef>, CloudConfigError> {
        if let Some(id) = auth.string("user_id")? {
            return Ok(Some(UserRef::Id(id)));
        }
        match auth.string("username")? {
            Some(name) => {
                let domain = domain("user_domain_id", "user_domain_name")?.ok_or_else(|| {
                    CloudConfigError::new(
                        auth.place("user_domain_name"),
                        "missing: a user given by name needs user_domain_name or user_domain_id",
                    )
                })?;
                Ok(Some(UserRef::Name { name, domain }))
            }
            None if required => Err(CloudConfigError::new(
                auth.place("username"),
                "missing: give username or user_id",
            )),
            None => Ok(None),
        }
    };
    if PASSWORD_AUTH.contains(&auth_type.as_str()) {
        let user = user(true)?.ok_or_else(|| {
            CloudConfigError::new(auth.place("username"), "missing: give username or user_id")
        })?;
        let password = auth
            .string("password")?
            .ok_or_else(|| CloudConfigError::new(auth.place("password"), "missing"))?;
        let project = if let Some(id) = auth.string("project_id")?.or(auth.string("tenant_id")?) {
            Some(ProjectRef::Id(id))
        } else if let Some(name) = auth.string("project_name")?.or(auth.string("tenant_name")?) {
            let domain =
                    domain("project_domain_id", "project_domain_name")?.ok_or_else(|| {
                        CloudConfigError::new(
                            auth.place("project_domain_name"),
                            "missing: a project given by name needs project_domain_name or project_domain_id",
                        )
                    })?;
            Some(ProjectRef::Name { name, domain })
        } else {
            None
        };
        Ok(Auth::Password {
            auth_url,
            user,
            password: Secret::new(password),
            project,
        })
    } else {
        let secret = auth
            .string("application_credential_secret")?
            .ok_or_else(|| {
                CloudConfigError::new(auth.place("application_credential_secret"), "missing")
            })?;
        let id = auth.string("application_credential_id")?;
        let name = auth.string("application_credential_name")?;
        let user = if id.is_none() {
            if name.is_none() {
                return Err(CloudConfigError::new(
                    auth.place("application_credential_id"),
                    "missing: give application_credential_id, or application_credential_name with the user",
                ));
            }
            Some(
                user(true)?
                    .ok_or_else(|| CloudConfigError::new(auth.place("username"), "missing"))?,
            )
        } else {
            None
        };
        Ok(Auth::ApplicationCredential {
            auth_url,
            id,
            name,
            user,
            secret: Secret::new(secret),
        })
    }
}

/// Normalises an `auth_url` to the Keystone v3 root (`.../v3`).
fn identity_v3_url(raw: &str) -> Result<String, String> {
    let shown = without_userinfo(raw);
    let parsed = url::Url::parse(raw).map_err(|e| format!("not a URL ({e}): {shown:?}"))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(format!("not an http(s) URL: {shown:?}"));
    }
    let trimmed = raw.trim_end_matches('/');
    if trimmed.ends_with("/v3") {
        Ok(trimmed.to_owned())
    } else if trimmed.ends_with("/v2.0") {
        Err(format!(
            "{shown:?} is Keystone v2.0, which is gone; use the v3 endpoint"
        ))
    } else {
        Ok(format!("{trimmed}/v3"))
    }
}

/// A URL as it may be shown in a message: `user:password@` before the host
/// is cut out (a password written into an `auth_url` is still a secret).
fn without_userinfo(raw: &str) -> String {
    let Some(scheme_end) = raw.find("://") else {
        return raw.to_owned();
    };
    let rest = &raw[scheme_end + 3..];
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) => format!("{}***@{}", &raw[..scheme_end + 3], &rest[at + 1..]),
        None => raw.to_owned(),
    }
}

/// The image format of a cloud (clouds.yaml `image_format`, default
/// `qcow2`), for the builder to fill `ProviderConfig::image_format`.
pub fn image_format(
    loader: &CloudsLoader,
    cloud: Option<&str>,
) -> Result<String, CloudConfigError> {
    Ok(loader.load(cloud, None)?.image_format)
}

/// Every problem found in the clouds of one configuration (never empty).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub struct CloudConfigErrors {
    /// The problems, one per provider at most, in provider order.
    pub errors: Vec<CloudConfigError>,
}

impl fmt::Display for CloudConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.errors.len();
        write!(
            f,
            "{n} cloud configuration error{}:",
            if n == 1 { "" } else { "s" }
        )?;
        for e in &self.errors {
            write!(f, "\n  {e}")?;
        }
        Ok(())
    }
}

/// Loads the cloud of one OpenStack provider (its `cloud`, else
/// `OS_CLOUD`, in its `region-name`) the way the launcher and the builder
/// do; an error says which provider, then the file and key, e.g.
/// `providers.p1 (cloud "c"): /etc/openstack/clouds.yaml: clouds.c.auth.auth_url: missing`.
pub fn provider_cloud(
    loader: &CloudsLoader,
    provider: &ProviderConfig,
) -> Result<CloudConfig, CloudConfigError> {
    loader
        .load(provider.cloud.as_deref(), provider.region_name.as_deref())
        .map_err(|e| CloudConfigError {
            place: format!(
                "providers.{} (cloud {:?}): {}",
                provider.name,
                provider.cloud.as_deref().unwrap_or("OS_CLOUD"),
                e.place
            ),
            message: e.message,
        })
}

/// The cloud of every OpenStack provider of `config`, by provider name in
/// configuration order, or every provider's problem at once. This is the
/// check `nodepool config-validate` and every daemon (re)load make.
pub fn provider_clouds(
    loader: &CloudsLoader,
    config: &Config,
) -> Result<Vec<(String, CloudConfig)>, CloudConfigErrors> {
    let mut clouds = Vec::new();
    let mut errors = Vec::new();
    for p in &config.providers {
        if !matches!(p.driver, Driver::OpenStack) {
            continue;
        }
        match provider_cloud(loader, p) {
            Ok(c) => clouds.push((p.name.clone(), c)),
            Err(e) => errors.push(e),
        }
    }
    if errors.is_empty() {
        Ok(clouds)
    } else {
        Err(CloudConfigErrors { errors })
    }
}

/// Fills `image_format` of every OpenStack provider from its cloud's
/// clouds.yaml entry (providers that already have one are left alone),
/// checking every provider's cloud on the way ([`provider_clouds`]).
pub fn fill_image_formats(
    loader: &CloudsLoader,
    config: &mut Config,
) -> Result<(), CloudConfigErrors> {
    let clouds = provider_clouds(loader, config)?;
    for (name, cloud) in clouds {
        if let Some(p) = config.providers.iter_mut().find(|p| p.name == name)
            && p.image_format.is_none()
        {
            p.image_format = Some(cloud.image_format);
        }
    }
    Ok(())
}

impl fmt::Display for DomainRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DomainRef::Id(i) => write!(f, "domain id {i}"),
            DomainRef::Name(n) => write!(f, "domain {n}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_password_in_an_auth_url_is_never_shown() {
        let err = identity_v3_url("ftp://admin:hunter2@keystone.example/v3").expect_err("not http");
        assert!(
            !err.contains("hunter2") && err.contains("ftp://***@keystone.example/v3"),
            "{err}"
        );
        let err = identity_v3_url("https://u:hunter2@k.example/v2.0").expect_err("v2");
        assert!(!err.contains("hunter2"), "{err}");
        assert_eq!(
            without_userinfo("https://k.example/v3"),
            "https://k.example/v3"
        );
    }

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    const CLOUDS: &str = r#"
clouds:
  peer:
    auth:
      auth_url: http://127.0.0.1:5000
      username: admin
      project_name: admin
      user_domain_name: Default
      project_domain_name: Default
    region_name: RegionOne
    image_format: raw
    compute_interface: internal
    image_endpoint_override: http://glance.example/
    api_timeout: 30
  appcred:
    auth_type: v3applicationcredential
    auth:
      auth_url: https://keystone.example/v3/
      application_credential_id: abc
      application_credential_secret: s3cr3t
"#;

    #[test]
    fn search_order_secure_merge_and_keys() {
        let dir = tempfile::tempdir().unwrap();
        let etc = dir.path().join("etc");
        std::fs::create_dir(&etc).unwrap();
        write(dir.path(), "clouds.yaml", CLOUDS);
        // a clouds.yaml later in the search path is not read
        write(&etc, "clouds.yaml", "clouds: {}\n");
        write(
            &etc,
            "secure.yaml",
            "clouds:\n  peer:\n    auth:\n      password: hunter2\n",
        );
        let loader = CloudsLoader {
            search_dirs: vec![dir.path().to_owned(), etc.clone()],
            default_cloud: Some("peer".into()),
            ..CloudsLoader::default()
        };
        let c = loader.load(None, None).unwrap();
        assert_eq!(c.name, "peer");
        assert_eq!(c.region_name.as_deref(), Some("RegionOne"));
        assert_eq!(c.image_format, "raw");
        assert_eq!(c.interface, "public");
        assert_eq!(c.interface_for("compute"), "internal");
        assert_eq!(c.interface_for("image"), "public");
        assert_eq!(
            c.endpoint_overrides.get("image").map(String::as_str),
            Some("http://glance.example/")
        );
        assert_eq!(c.api_timeout, Some(Duration::from_secs(30)));
        match &c.auth {
            Auth::Password {
                auth_url,
                user,
                password,
                project,
            } => {
                assert_eq!(auth_url, "http://127.0.0.1:5000/v3");
                assert_eq!(
                    user,
                    &UserRef::Name {
                        name: "admin".into(),
                        domain: DomainRef::Name("Default".into())
                    }
                );
                assert_eq!(password.expose(), "hunter2");
                assert!(matches!(project, Some(ProjectRef::Name { .. })));
            }
            other => panic!("{other:?}"),
        }
        // the password never shows in Debug
        assert!(!format!("{c:?}").contains("hunter2"));
        // region-name from the provider wins
        let c = loader.load(Some("peer"), Some("Other")).unwrap();
        assert_eq!(c.region_name.as_deref(), Some("Other"));
        let a = loader.load(Some("appcred"), None).unwrap();
        assert!(
            matches!(a.auth, Auth::ApplicationCredential { ref id, .. } if id.as_deref() == Some("abc"))
        );
        assert_eq!(a.auth.auth_url(), "https://keystone.example/v3");
        assert_eq!(a.image_format, DEFAULT_IMAGE_FORMAT);
        assert!(!format!("{a:?}").contains("s3cr3t"));
    }

    #[test]
    fn explicit_file_wins_over_search_path() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "clouds.yaml", "clouds: {}\n");
        let other = write(dir.path(), "other.yaml", CLOUDS);
        let loader = CloudsLoader {
            config_file: Some(other),
            search_dirs: vec![dir.path().to_owned()],
            ..CloudsLoader::default()
        };
        assert!(loader.load(Some("appcred"), None).is_ok());
    }

    #[test]
    fn errors_name_the_file_and_key() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(
            dir.path(),
            "clouds.yaml",
            "clouds:\n  a:\n    auth:\n      username: u\n      password: p\n  b:\n    auth:\n      auth_url: http://k/v3\n      username: u\n      password: p\n  c:\n    auth:\n      auth_url: http://k/v3\n      user_id: u\n      password: p\n    region_name: R2\n    regions: [R1]\n  d: 3\n",
        );
        let loader = CloudsLoader::file(&p);
        let f = p.display().to_string();
        let e = loader.load(Some("a"), None).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!("{f}: clouds.a.auth.auth_url: missing")
        );
        let e = loader.load(Some("b"), None).unwrap_err();
        assert!(
            e.to_string()
                .starts_with(&format!("{f}: clouds.b.auth.user_domain_name: missing")),
            "{e}"
        );
        let e = loader.load(Some("c"), None).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!("{f}: clouds.c.regions: region \"R2\" is not one of R1")
        );
        let e = loader.load(Some("d"), None).unwrap_err();
        assert!(
            e.to_string().contains("clouds.d: expected a mapping"),
            "{e}"
        );
        let e = loader.load(Some("zz"), None).unwrap_err();
        assert!(e.to_string().contains("no cloud named \"zz\""), "{e}");
        let e = loader.load(None, None).unwrap_err();
        assert!(e.to_string().contains("OS_CLOUD"), "{e}");
        let e = CloudsLoader::default().load(Some("x"), None).unwrap_err();
        assert!(e.to_string().contains("no clouds.yaml found"), "{e}");
    }

    /// A self-signed certificate (`openssl req -x509`; any will do: the
    /// bundle is only parsed, never used for a handshake here).
    const CA_PEM: &str = "-----BEGIN CERTIFICATE-----
MIIBjTCCATOgAwIBAgIUOuU3SOCO6tkop+WcQSPNR7CWY9kwCgYIKoZIzj0EAwIw
GzEZMBcGA1UEAwwQbm9kZXBvb2wtdGVzdC1jYTAgFw0yNjEyMDMxNzQ3MDdaGA8y
MTI2MTEwOTE3NDcwN1owGzEZMBcGA1UEAwwQbm9kZXBvb2wtdGVzdC1jYTBZMBMG
ByqGSM49AgEGCCqGSM49AwEHA0IABOmYzuOAaQ+4JnPu9ALcf3mriazbD4HcbLEK
kB8CwAUs/89D1OlxSMs1JaDTUx+RmzmQcg+UiPgA4xSylZf+0s6jUzBRMB0GA1Ud
DgQWBBTv/1bzOFG17Pwx3BGiwJIEquRZKzAfBgNVHSMEGDAWgBTv/1bzOFG17Pwx
3BGiwJIEquRZKzAPBgNVHRMBAf8EBTADAQH/MAoGCCqGSM49BAMCA0gAMEUCIEE0
8qxud8G9ZOpcJtY8GA8ugNpAok93kg40zPtogd+EAiEApg8UpVEXA8buroxC+SB5
JkjdsJ/NRKuLK4ivl5imqgI=
-----END CERTIFICATE-----
";

    fn cloud_with(extra: &str) -> String {
        format!(
            "clouds:\n  c:\n    auth:\n      auth_url: http://k/v3\n      user_id: u\n      password: hunter2\n{extra}"
        )
    }

    #[test]
    fn value_types_tls_and_auth_type_are_checked_with_their_place() {
        let dir = tempfile::tempdir().unwrap();
        let ca = write(dir.path(), "ca.pem", CA_PEM);
        let junk = write(dir.path(), "junk.pem", "not a certificate\n");
        let case = |extra: &str| {
            let p = write(dir.path(), "clouds.yaml", &cloud_with(extra));
            let r = CloudsLoader::file(&p).load(Some("c"), None);
            (p.display().to_string(), r)
        };
        let err = |extra: &str| {
            let (f, r) = case(extra);
            let e = r.expect_err(extra).to_string();
            assert!(!e.contains("hunter2"), "{e}");
            e.replace(&f, "F")
        };
        assert_eq!(
            err("    api_timeout: soon\n"),
            "F: clouds.c.api_timeout: expected a positive number of seconds, found a string"
        );
        assert_eq!(
            err("    api_timeout: -1\n"),
            "F: clouds.c.api_timeout: expected a positive number of seconds, found -1"
        );
        // Too big for a Duration: an error, not a panic.
        assert_eq!(
            err("    api_timeout: 1e300\n"),
            "F: clouds.c.api_timeout: expected a positive number of seconds, found 1e+300"
        );
        assert_eq!(
            err("    verify: [x]\n"),
            "F: clouds.c.verify: expected true, false or the path of a CA bundle, found a list"
        );
        assert_eq!(
            err("    insecure: sometimes\n"),
            "F: clouds.c.insecure: expected true or false, found a string"
        );
        let missing = dir.path().join("nope.pem");
        assert_eq!(
            err(&format!("    cacert: {}\n", missing.display())),
            format!(
                "F: clouds.c.cacert: cannot read {}: No such file or directory (os error 2)",
                missing.display()
            )
        );
        assert_eq!(
            err(&format!("    verify: {}\n", junk.display())),
            format!(
                "F: clouds.c.verify: {} holds no PEM certificate",
                junk.display()
            )
        );
        assert_eq!(
            err("    regions: RegionOne\n"),
            "F: clouds.c.regions: expected a list, found a string"
        );
        // The type is checked before the keys it requires.
        assert_eq!(
            err("    auth_type: token\n"),
            "F: clouds.c.auth_type: unsupported auth_type \"token\" (use password or v3applicationcredential)"
        );
        // Good values.
        let (_, ok) = case(&format!(
            "    api_timeout: '2.5'\n    verify: {}\n",
            ca.display()
        ));
        let ok = ok.unwrap();
        assert_eq!(ok.api_timeout, Some(Duration::from_millis(2500)));
        assert!(ok.verify);
        assert_eq!(ok.cacert.as_deref(), Some(ca.as_path()));
        // cacert wins over a path in verify; verification off reads neither.
        let (_, ok) = case(&format!(
            "    verify: {}\n    cacert: {}\n",
            missing.display(),
            ca.display()
        ));
        assert_eq!(ok.unwrap().cacert.as_deref(), Some(ca.as_path()));
        let (_, ok) = case(&format!(
            "    insecure: true\n    cacert: {}\n",
            missing.display()
        ));
        let ok = ok.unwrap();
        assert!(!ok.verify);
        assert_eq!(ok.cacert, None);
    }

    #[test]
    fn syntax_errors_have_a_line_and_keys_from_secure_yaml_name_it() {
        let dir = tempfile::tempdir().unwrap();
        let bad = write(
            dir.path(),
            "clouds.yaml",
            "clouds:\n  c:\n    auth:\n      password: hunter2: x\n",
        );
        let e = CloudsLoader::file(&bad)
            .load(Some("c"), None)
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with(&format!(
                "{}: line 4 column 24: not valid YAML: ",
                bad.display()
            )),
            "{e}"
        );
        assert!(!e.contains("hunter2"), "{e}");

        let clouds = write(dir.path(), "clouds.yaml", &cloud_with(""));
        let secure = write(
            dir.path(),
            "secure.yaml",
            "clouds:\n  c:\n    auth:\n      password: [hunter2]\n",
        );
        let loader = CloudsLoader {
            config_file: Some(clouds.clone()),
            secure_file: Some(secure.clone()),
            ..CloudsLoader::default()
        };
        assert_eq!(
            loader.load(Some("c"), None).unwrap_err().to_string(),
            format!(
                "{}: clouds.c.auth.password: expected a string, found a list",
                secure.display()
            )
        );
        // A key only clouds.yaml has is still placed there.
        write(
            dir.path(),
            "secure.yaml",
            "clouds:\n  c:\n    auth:\n      password: fine\n",
        );
        write(
            dir.path(),
            "clouds.yaml",
            &cloud_with("    api_timeout: [1]\n"),
        );
        assert_eq!(
            loader.load(Some("c"), None).unwrap_err().to_string(),
            format!(
                "{}: clouds.c.api_timeout: expected a positive number of seconds, found a list",
                clouds.display()
            )
        );
    }

    #[test]
    fn a_missing_clouds_yaml_names_every_path_searched() {
        let dir = tempfile::tempdir().unwrap();
        let given = dir.path().join("given.yaml");
        let loader = CloudsLoader {
            config_file: Some(given.clone()),
            search_dirs: vec![dir.path().join("a"), dir.path().join("b")],
            ..CloudsLoader::default()
        };
        let d = dir.path().display();
        assert_eq!(
            loader.load(Some("c"), None).unwrap_err().to_string(),
            format!(
                "clouds.yaml: no clouds.yaml found (looked at {} (OS_CLIENT_CONFIG_FILE), \
                 {d}/a/clouds.yaml, {d}/a/clouds.yml, {d}/a/clouds.json, \
                 {d}/b/clouds.yaml, {d}/b/clouds.yml, {d}/b/clouds.json)",
                given.display()
            )
        );
    }

    #[test]
    fn provider_clouds_reports_every_provider_and_fills_formats() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(dir.path(), "clouds.yaml", CLOUDS);
        let mut config = nodepool_model::config::Config::from_yaml(
            "labels: [{name: l}]
providers:
  - {name: good, cloud: peer, region-name: RegionOne, cloud-images: [{name: i}], pools: [{name: m, labels: [{name: l, cloud-image: i, min-ram: 1}]}]}
  - {name: gone, cloud: nosuch, cloud-images: [{name: i}], pools: [{name: m, labels: [{name: l, cloud-image: i, min-ram: 1}]}]}
  - {name: sim, driver: simulated, cloud-images: [{name: i}], pools: [{name: m, labels: [{name: l, cloud-image: i, min-ram: 1}]}]}
",
        )
        .unwrap();
        let secure = write(
            dir.path(),
            "secure.yaml",
            "clouds:\n  peer:\n    auth:\n      password: hunter2\n",
        );
        let loader = CloudsLoader {
            config_file: Some(p.clone()),
            secure_file: Some(secure),
            ..CloudsLoader::default()
        };
        let e = provider_clouds(&loader, &config).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!(
                "1 cloud configuration error:\n  providers.gone (cloud \"nosuch\"): {}: clouds: \
                 no cloud named \"nosuch\" (clouds here: peer, appcred)",
                p.display()
            )
        );
        assert!(fill_image_formats(&loader, &mut config).is_err());
        config.providers.retain(|p| p.name != "gone");
        fill_image_formats(&loader, &mut config).unwrap();
        assert_eq!(config.providers[0].image_format.as_deref(), Some("raw"));
        assert_eq!(config.providers[1].image_format, None, "not OpenStack");
    }

    #[test]
    fn deep_merge_replaces_scalars_and_merges_maps() {
        let mut a: Value = serde_json::json!({"x": {"y": 1, "z": [1]}, "k": "v"});
        deep_merge(
            &mut a,
            serde_json::json!({"x": {"z": [2], "w": true}, "k": {"n": 1}}),
        );
        assert_eq!(
            a,
            serde_json::json!({"x": {"y": 1, "z": [2], "w": true}, "k": {"n": 1}})
        );
    }
}
