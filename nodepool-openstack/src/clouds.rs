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
//! `/etc/openstack/clouds.yaml: clouds.peer.auth.auth_url: missing`.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nodepool_core::config::Secret;
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
        let path = self.find(&self.config_file, "clouds").ok_or_else(|| {
            let mut looked: Vec<String> = self
                .config_file
                .iter()
                .map(|p| p.display().to_string())
                .collect();
            looked.extend(
                self.search_dirs
                    .iter()
                    .map(|d| d.join("clouds.yaml").display().to_string()),
            );
            CloudConfigError::new(
                "clouds.yaml",
                format!("no clouds.yaml found (looked at {})", looked.join(", ")),
            )
        })?;
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
        let mut sources = path.display().to_string();
        if let Some(secure) = self.find(&self.secure_file, "secure") {
            let sec = read_doc(&secure)?;
            deep_merge(&mut doc, sec);
            sources = format!("{sources} (+ {})", secure.display());
        }
        CloudConfig::from_doc(&name, region, &doc, &path, &sources)
    }
}

fn read_doc(path: &Path) -> Result<Value, CloudConfigError> {
    let place = path.display().to_string();
    let text = std::fs::read_to_string(path)
        .map_err(|e| CloudConfigError::new(&place, format!("cannot read: {e}")))?;
    // YAML is a superset of JSON, so one parser reads all three suffixes.
    let v: Value = serde_yaml::from_str(&text)
        .map_err(|e| CloudConfigError::new(&place, format!("not valid YAML: {e}")))?;
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

struct Reader<'a> {
    file: &'a str,
    prefix: String,
    map: &'a Map<String, Value>,
}

impl<'a> Reader<'a> {
    fn place(&self, key: &str) -> String {
        format!("{}: {}.{key}", self.file, self.prefix)
    }

    fn string(&self, key: &str) -> Result<Option<String>, CloudConfigError> {
        match self.map.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            // Ids and ports are sometimes written as bare numbers.
            Some(Value::Number(n)) => Ok(Some(n.to_string())),
            Some(other) => Err(CloudConfigError::new(
                self.place(key),
                format!("expected a string, found {}", kind(other)),
            )),
        }
    }

    fn child(&self, key: &str) -> Result<Option<Reader<'a>>, CloudConfigError> {
        match self.map.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Object(m)) => Ok(Some(Reader {
                file: self.file,
                prefix: format!("{}.{key}", self.prefix),
                map: m,
            })),
            Some(other) => Err(CloudConfigError::new(
                self.place(key),
                format!("expected a mapping, found {}", kind(other)),
            )),
        }
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
        sources: &str,
    ) -> Result<CloudConfig, CloudConfigError> {
        let file = path.display().to_string();
        let root = doc
            .as_object()
            .ok_or_else(|| CloudConfigError::new(&file, "the top level must be a mapping"))?;
        let top = Reader {
            file: &file,
            prefix: String::new(),
            map: root,
        };
        let clouds = match root.get("clouds") {
            Some(Value::Object(m)) => m,
            Some(other) => {
                return Err(CloudConfigError::new(
                    format!("{file}: clouds"),
                    format!("expected a mapping, found {}", kind(other)),
                ));
            }
            None => return Err(CloudConfigError::new(format!("{file}: clouds"), "missing")),
        };
        let _ = top;
        let cloud = match clouds.get(name) {
            Some(Value::Object(m)) => Reader {
                file: &file,
                prefix: format!("clouds.{name}"),
                map: m,
            },
            Some(other) => {
                return Err(CloudConfigError::new(
                    format!("{file}: clouds.{name}"),
                    format!("expected a mapping, found {}", kind(other)),
                ));
            }
            None => {
                let known: Vec<&str> = clouds.keys().map(String::as_str).collect();
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
            }
        };
        if cloud.map.contains_key("profile") {
            return Err(CloudConfigError::new(
                cloud.place("profile"),
                "vendor profiles are not supported; write auth_url, region_name, ... out in full",
            ));
        }
        if let Some(v) = cloud.string("identity_api_version")?
            && !v.starts_with('3')
        {
            return Err(CloudConfigError::new(
                cloud.place("identity_api_version"),
                format!("only Keystone v3 is supported, not {v}"),
            ));
        }
        let auth = read_auth(&cloud)?;
        let region_name = region.map(str::to_owned).or(cloud.string("region_name")?);
        if let (Some(r), Some(Value::Array(regions))) = (&region_name, cloud.map.get("regions")) {
            let names: Vec<String> = regions
                .iter()
                .filter_map(|v| match v {
                    Value::String(s) => Some(s.clone()),
                    Value::Object(m) => m.get("name").and_then(Value::as_str).map(str::to_owned),
                    _ => None,
                })
                .collect();
            if !names.is_empty() && !names.contains(r) {
                return Err(CloudConfigError::new(
                    cloud.place("regions"),
                    format!("region {r:?} is not one of {}", names.join(", ")),
                ));
            }
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
                let secs = v
                    .as_f64()
                    .or_else(|| v.as_str().and_then(|s| s.parse().ok()))
                    .filter(|s| s.is_finite() && *s > 0.0)
                    .ok_or_else(|| {
                        CloudConfigError::new(
                            cloud.place("api_timeout"),
                            "expected a positive number of seconds",
                        )
                    })?;
                Some(Duration::from_secs_f64(secs))
            }
        };
        let verify = match cloud.map.get("verify") {
            None | Some(Value::Null) => true,
            Some(Value::Bool(b)) => *b,
            Some(other) => {
                return Err(CloudConfigError::new(
                    cloud.place("verify"),
                    format!("expected true or false, found {}", kind(other)),
                ));
            }
        };
        let cacert = cloud.string("cacert")?.map(PathBuf::from);
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
            cacert,
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

fn check_interface(i: &str, place: &str) -> Result<(), CloudConfigError> {
    match i.trim_end_matches("URL") {
        "public" | "internal" | "admin" => Ok(()),
        _ => Err(CloudConfigError::new(
            place,
            format!("interface must be public, internal or admin, not {i:?}"),
        )),
    }
}

fn read_auth(cloud: &Reader<'_>) -> Result<Auth, CloudConfigError> {
    let auth = cloud
        .child("auth")?
        .ok_or_else(|| CloudConfigError::new(cloud.place("auth"), "missing"))?;
    let auth_type = cloud
        .string("auth_type")?
        .unwrap_or_else(|| "password".to_owned());
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
    match auth_type.as_str() {
        "password" | "v3password" => {
            let user = user(true)?.ok_or_else(|| {
                CloudConfigError::new(auth.place("username"), "missing: give username or user_id")
            })?;
            let password = auth
                .string("password")?
                .ok_or_else(|| CloudConfigError::new(auth.place("password"), "missing"))?;
            let project = if let Some(id) = auth.string("project_id")?.or(auth.string("tenant_id")?)
            {
                Some(ProjectRef::Id(id))
            } else if let Some(name) = auth.string("project_name")?.or(auth.string("tenant_name")?)
            {
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
        }
        "v3applicationcredential" | "applicationcredential" | "application_credential" => {
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
        other => Err(CloudConfigError::new(
            cloud.place("auth_type"),
            format!("unsupported auth_type {other:?} (use password or v3applicationcredential)"),
        )),
    }
}

/// Normalises an `auth_url` to the Keystone v3 root (`.../v3`).
fn identity_v3_url(raw: &str) -> Result<String, String> {
    let parsed = url::Url::parse(raw).map_err(|e| format!("not a URL ({e}): {raw:?}"))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(format!("not an http(s) URL: {raw:?}"));
    }
    let trimmed = raw.trim_end_matches('/');
    if trimmed.ends_with("/v3") {
        Ok(trimmed.to_owned())
    } else if trimmed.ends_with("/v2.0") {
        Err(format!(
            "{raw:?} is Keystone v2.0, which is gone; use the v3 endpoint"
        ))
    } else {
        Ok(format!("{trimmed}/v3"))
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

/// Fills `image_format` of every OpenStack provider from its cloud's
/// clouds.yaml entry (providers that already have one are left alone).
pub fn fill_image_formats(
    loader: &CloudsLoader,
    config: &mut nodepool_core::config::Config,
) -> Result<(), CloudConfigError> {
    for p in &mut config.providers {
        if matches!(p.driver, nodepool_core::config::Driver::OpenStack) && p.image_format.is_none()
        {
            let cloud = loader
                .load(p.cloud.as_deref(), p.region_name.as_deref())
                .map_err(|e| {
                    CloudConfigError::new(format!("provider {}", p.name), e.to_string())
                })?;
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
