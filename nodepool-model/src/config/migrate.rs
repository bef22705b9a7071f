//! `nodepool config-migrate`: a legacy (pre-Zuul v3) `nodepool.yaml`
//! rewritten into today's form.
//!
//! A pure function of the old text: credentials move into a generated
//! `clouds.yaml` (one cloud per provider, named after it), provider
//! `images:` become `cloud-images` (or `diskimages` when a top-level
//! diskimage of that name exists, or snapshot `images` over a cloud image
//! of their base when they have a `setup` script) and pool labels,
//! provider `max-servers`
//! becomes the pool's. Whatever cannot be carried over is named in the
//! report with the reason or the modern alternative; the report never
//! shows a credential.

use std::fmt;

use serde_yaml::{Mapping, Value};

/// The result of [`migrate`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Migration {
    /// The modern `nodepool.yaml` text.
    pub config: String,
    /// The generated `clouds.yaml` text (holds the credentials).
    pub clouds: String,
    /// One line per change an operator should know about.
    pub report: Vec<String>,
}

/// Why a legacy file could not be migrated at all.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MigrateError {
    /// 1-based line of the problem, when known.
    pub line: Option<usize>,
    /// 1-based column of the problem, when known.
    pub column: Option<usize>,
    /// A sentence for the operator.
    pub message: String,
}

impl fmt::Display for MigrateError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.line, self.column) {
            (Some(l), Some(c)) => write!(f, "{l}:{c}: {}", self.message),
            (Some(l), None) => write!(f, "{l}: {}", self.message),
            _ => f.write_str(&self.message),
        }
    }
}

impl std::error::Error for MigrateError {}

/// Top-level keys dropped because nothing does their job any more, each
/// with why.
const OBSOLETE: [(&str, &str); 5] = [
    (
        "dburi",
        "node state lives in the state store: ZooKeeper (`zookeeper-servers`) or the embedded SQLite file (`state-store`)",
    ),
    (
        "cron",
        "image builds follow each diskimage's `rebuild-age`, and cleanup runs continuously",
    ),
    (
        "zmq-publishers",
        "Jenkins is polled through its REST API; no ZeroMQ events are used",
    ),
    (
        "gearman-servers",
        "Zuul asks for nodes through node requests in the state store",
    ),
    (
        "targets",
        "nodes are handed to Zuul through node requests; each old target's `images` (labels and `min-ready`) were carried into `labels`",
    ),
];

/// Provider keys still valid today, copied as they are.
const PROVIDER_KEYS: [&str; 11] = [
    "driver",
    "max-concurrency",
    "priority",
    "boot-timeout",
    "launch-timeout",
    "rate",
    "launch-retries",
    "clean-floating-ips",
    "image-name-format",
    "post-upload-hook",
    "port-cleanup-interval",
];

/// Provider keys that moved into the pool.
const POOL_KEYS: [&str; 3] = ["networks", "availability-zones", "security-groups"];

/// Legacy credential keys and their clouds.yaml `auth` names.
const AUTH_KEYS: [(&str, &str); 5] = [
    ("username", "username"),
    ("password", "password"),
    ("auth-url", "auth_url"),
    ("project-id", "project_id"),
    ("project-name", "project_name"),
];

fn s(v: &str) -> Value {
    Value::String(v.to_owned())
}

fn get<'a>(m: &'a Mapping, key: &str) -> Option<&'a Value> {
    m.get(key)
}

fn get_str(m: &Mapping, key: &str) -> Option<String> {
    match m.get(key)? {
        Value::String(t) => Some(t.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

fn list(v: Option<&Value>) -> Vec<&Mapping> {
    match v {
        Some(Value::Sequence(items)) => items.iter().filter_map(Value::as_mapping).collect(),
        _ => Vec::new(),
    }
}

/// A legacy label: its name, image, min-ready and the providers it names.
struct OldLabel {
    name: String,
    image: String,
    min_ready: Option<Value>,
    ready_script: Option<Value>,
    providers: Vec<String>,
}

fn names(v: Option<&Value>) -> Vec<String> {
    list(v)
        .into_iter()
        .filter_map(|m| get_str(m, "name"))
        .collect()
}

/// Rewrites a legacy `nodepool.yaml` (see the module docs).
pub fn migrate(text: &str) -> Result<Migration, MigrateError> {
    let root: Value = serde_yaml::from_str(text).map_err(|e| MigrateError {
        line: e.location().map(|l| l.line()),
        column: e.location().map(|l| l.column()),
        message: format!("not valid YAML: {e}"),
    })?;
    let top = match root {
        Value::Mapping(m) => m,
        Value::Null => Mapping::new(),
        _ => {
            return Err(MigrateError {
                line: None,
                column: None,
                message: "the file is not a YAML mapping".into(),
            });
        }
    };
    let mut report = Vec::new();
    let mut out = Mapping::new();
    let mut clouds = Mapping::new();

    for (key, why) in OBSOLETE {
        if top.contains_key(key) {
            report.push(format!("{key}: dropped: {why}"));
        }
    }
    let diskimage_names = names(get(&top, "diskimages"));

    // Labels: the top-level list, or (older still) each target's images.
    let mut labels: Vec<OldLabel> = Vec::new();
    let mut take_label = |m: &Mapping, image_key: &str| {
        if let Some(name) = get_str(m, "name") {
            labels.push(OldLabel {
                image: get_str(m, image_key).unwrap_or_else(|| name.clone()),
                name,
                min_ready: get(m, "min-ready").cloned(),
                ready_script: get(m, "ready-script").cloned(),
                providers: names(get(m, "providers")),
            });
        }
    };
    for l in list(get(&top, "labels")) {
        take_label(l, "image");
    }
    for t in list(get(&top, "targets")) {
        for i in list(get(t, "images")) {
            take_label(i, "name");
        }
    }

    let mut providers = Vec::new();
    // Images no label names become labels of their own name.
    let mut extra_labels: Vec<String> = Vec::new();
    for (pi, p) in list(get(&top, "providers")).into_iter().enumerate() {
        let Some(name) = get_str(p, "name") else {
            report.push(format!("providers[{pi}]: dropped: it has no `name`"));
            continue;
        };
        let at = format!("providers[{pi}] ({name})");
        let mut np = Mapping::new();
        np.insert(s("name"), s(&name));
        let mut auth = Mapping::new();
        for (old, new) in AUTH_KEYS {
            if let Some(v) = get(p, old) {
                auth.insert(s(new), v.clone());
            }
        }
        if auth.is_empty() {
            if let Some(c) = get(p, "cloud") {
                np.insert(s("cloud"), c.clone());
            } else {
                report.push(format!(
                    "{at}: no credentials and no `cloud`: the launcher looks up cloud `{name}` in clouds.yaml"
                ));
                np.insert(s("cloud"), s(&name));
            }
        } else {
            let mut cloud = Mapping::new();
            let keys: Vec<&str> = auth.keys().filter_map(Value::as_str).collect();
            // Seed 003 writes "things you should replace" in shell syntax.
            let placeholders: Vec<&str> = auth
                .iter()
                .filter(|(_, v)| v.as_str().is_some_and(|t| t.starts_with('$')))
                .filter_map(|(k, _)| k.as_str())
                .collect();
            if !placeholders.is_empty() {
                report.push(format!(
                    "{at}: clouds.yaml `{name}` keeps the placeholders of {} as written: replace them with real values",
                    placeholders.join(", ")
                ));
            }
            report.push(format!(
                "{at}: credentials ({}) moved to clouds.yaml as cloud `{name}`",
                keys.join(", ")
            ));
            // Keystone v2 (what legacy files used) has no domains; v3
            // puts v2's users and projects in `Default`.
            if auth.contains_key("username") {
                auth.insert(s("user_domain_name"), s("Default"));
            }
            if auth.contains_key("project_name") || auth.contains_key("project_id") {
                auth.insert(s("project_domain_name"), s("Default"));
            }
            if auth.contains_key("user_domain_name") || auth.contains_key("project_domain_name") {
                report.push(format!(
                    "{at}: clouds.yaml `{name}` uses Keystone v3 domain `Default` (where v2 users and projects live); change it if yours differ"
                ));
            }
            cloud.insert(s("auth"), Value::Mapping(auth));
            if let Some(r) = get(p, "region-name") {
                cloud.insert(s("region_name"), r.clone());
            }
            clouds.insert(s(&name), Value::Mapping(cloud));
            np.insert(s("cloud"), s(&name));
        }
        if let Some(r) = get(p, "region-name") {
            np.insert(s("region-name"), r.clone());
        }
        for key in ["service-type", "service-name"] {
            if p.contains_key(key) {
                report.push(format!(
                    "{at}.{key}: dropped: the service catalog entry comes from clouds.yaml (e.g. `compute_service_type`)"
                ));
            }
        }
        for key in PROVIDER_KEYS {
            if let Some(v) = get(p, key) {
                np.insert(s(key), v.clone());
            }
        }
        for key in ["diskimages", "cloud-images", "pools"] {
            if p.contains_key(key) {
                report.push(format!(
                    "{at}.{key}: already in the modern form; left out, merge it by hand"
                ));
            }
        }

        let mut pool = Mapping::new();
        pool.insert(s("name"), s("main"));
        match get(p, "max-servers").and_then(Value::as_i64) {
            Some(-1) => {
                report.push(format!(
                    "{at}.max-servers: -1 (provider being removed) became the pool's `max-servers: 0`"
                ));
                pool.insert(s("max-servers"), Value::from(0));
            }
            Some(n) => {
                pool.insert(s("max-servers"), Value::from(n));
            }
            None => {}
        }
        for key in POOL_KEYS {
            if let Some(v) = get(p, key) {
                report.push(format!("{at}.{key}: moved to `pools[0].{key}`"));
                pool.insert(s(key), v.clone());
            }
        }
        for (key, alt) in [
            ("keypair", "set `key-name` on the pool labels"),
            ("api-timeout", "set `api_timeout` in clouds.yaml"),
            ("image-type", "set `image_format` in clouds.yaml"),
            (
                "template-hostname",
                "Nodepool names its servers, snapshot images' setup servers too",
            ),
            ("hostname-format", "servers are named np<node id>"),
        ] {
            if p.contains_key(key) {
                report.push(format!("{at}.{key}: dropped: {alt}"));
            }
        }

        let mut diskimages = Vec::new();
        let mut cloud_images = Vec::new();
        let mut snapshot_images = Vec::new();
        let mut pool_labels = Vec::new();
        for (ii, img) in list(get(p, "images")).into_iter().enumerate() {
            let Some(iname) = get_str(img, "name") else {
                report.push(format!("{at}.images[{ii}]: dropped: it has no `name`"));
                continue;
            };
            let iat = format!("{at}.images[{ii}] ({iname})");
            let is_dib = diskimage_names.contains(&iname);
            // Seed 002's snapshot images: a base cloud image, a setup
            // script and the login it runs as. They stay provider
            // `images`, over a cloud image of their base.
            let is_snapshot = !is_dib && img.contains_key("setup");
            if is_snapshot {
                let base = format!("{iname}-base");
                let mut c = Mapping::new();
                c.insert(s("name"), s(&base));
                match get(img, "base-image") {
                    Some(b) => {
                        c.insert(s("image-name"), b.clone());
                    }
                    None => report.push(format!(
                        "{iat}: no `base-image`; set `image-name` on cloud image `{base}`"
                    )),
                }
                cloud_images.push(Value::Mapping(c));
                let mut si = Mapping::new();
                si.insert(s("name"), s(&iname));
                si.insert(s("base-image"), s(&base));
                for key in ["setup", "username", "private-key", "min-ram"] {
                    if let Some(v) = get(img, key) {
                        si.insert(s(key), v.clone());
                    }
                }
                report.push(format!(
                    "{iat}: became snapshot image `{iname}` (provider `images`) over cloud image `{base}`; its labels boot it with `diskimage: {iname}`"
                ));
                snapshot_images.push(Value::Mapping(si));
            } else if is_dib {
                let mut d = Mapping::new();
                d.insert(s("name"), s(&iname));
                diskimages.push(Value::Mapping(d));
            } else {
                let mut c = Mapping::new();
                c.insert(s("name"), s(&iname));
                if let Some(b) = get(img, "base-image") {
                    c.insert(s("image-name"), b.clone());
                } else if img.contains_key("name-filter") {
                    report.push(format!(
                        "{iat}.name-filter: dropped: name the cloud image exactly with `image-name` or `image-id`"
                    ));
                }
                // The login ready scripts run as (seed 003).
                for key in ["username", "private-key"] {
                    if let Some(v) = get(img, key) {
                        c.insert(s(key), v.clone());
                    }
                }
                cloud_images.push(Value::Mapping(c));
            }
            if is_dib && img.contains_key("setup") {
                report.push(format!(
                    "{iat}.setup: not carried: diskimage `{iname}` is built by diskimage-builder; bake the script into an element"
                ));
            }
            if is_dib && img.contains_key("private-key") {
                report.push(format!(
                    "{iat}.private-key: set `private-key` on diskimage `{iname}` instead (ready scripts log in with it)"
                ));
            }
            if is_dib && img.contains_key("username") {
                report.push(format!(
                    "{iat}.username: set `username` on diskimage `{iname}` instead"
                ));
            }
            let mut users: Vec<String> = labels
                .iter()
                .filter(|l| {
                    l.image == iname && (l.providers.is_empty() || l.providers.contains(&name))
                })
                .map(|l| l.name.clone())
                .collect();
            if users.is_empty() {
                report.push(format!(
                    "{iat}: no label used it; label `{iname}` was made for it"
                ));
                extra_labels.push(iname.clone());
                users.push(iname.clone());
            }
            for lname in users {
                let mut pl = Mapping::new();
                pl.insert(s("name"), s(&lname));
                pl.insert(
                    s(if is_dib || is_snapshot {
                        "diskimage"
                    } else {
                        "cloud-image"
                    }),
                    s(&iname),
                );
                match get(img, "min-ram") {
                    Some(r) => {
                        pl.insert(s("min-ram"), r.clone());
                    }
                    None => {
                        report.push(format!(
                            "{iat}: no `min-ram`; set `flavor-name` or `min-ram` on pool label `{lname}`"
                        ));
                    }
                }
                if let Some(meta) = get(img, "meta") {
                    pl.insert(s("instance-properties"), meta.clone());
                }
                pool_labels.push(Value::Mapping(pl));
            }
        }
        if !diskimages.is_empty() {
            np.insert(s("diskimages"), Value::Sequence(diskimages));
        }
        if !cloud_images.is_empty() {
            np.insert(s("cloud-images"), Value::Sequence(cloud_images));
        }
        if !snapshot_images.is_empty() {
            np.insert(s("images"), Value::Sequence(snapshot_images));
        }
        pool.insert(s("labels"), Value::Sequence(pool_labels));
        np.insert(s("pools"), Value::Sequence(vec![Value::Mapping(pool)]));
        providers.push(Value::Mapping(np));
    }

    // Modern top-level keys carried as they are, in file order.
    for (k, v) in &top {
        let Some(key) = k.as_str() else { continue };
        let carried = matches!(
            key,
            "zookeeper-servers"
                | "zookeeper-tls"
                | "zookeeper-timeout"
                | "state-store"
                | "elements-dir"
                | "images-dir"
                | "build-log-dir"
                | "build-log-retention"
                | "max-hold-age"
                | "webapp"
                | "tenant-resource-limits"
                | "script-dir"
        );
        if carried {
            out.insert(k.clone(), v.clone());
        }
    }
    if !top.contains_key("zookeeper-servers") && !top.contains_key("state-store") {
        report.push(
            "state store: none configured, so the embedded SQLite file is used; add `zookeeper-servers` to serve Zuul".into(),
        );
    }

    let mut new_labels = Vec::new();
    let mut seen: Vec<String> = Vec::new();
    for l in &labels {
        if seen.contains(&l.name) {
            continue;
        }
        seen.push(l.name.clone());
        let mut m = Mapping::new();
        m.insert(s("name"), s(&l.name));
        if let Some(r) = &l.min_ready {
            m.insert(s("min-ready"), r.clone());
        }
        if let Some(r) = &l.ready_script {
            m.insert(s("ready-script"), r.clone());
        }
        new_labels.push(Value::Mapping(m));
    }
    for name in extra_labels {
        if !seen.contains(&name) {
            seen.push(name.clone());
            let mut m = Mapping::new();
            m.insert(s("name"), s(&name));
            new_labels.push(Value::Mapping(m));
        }
    }
    out.insert(s("labels"), Value::Sequence(new_labels));
    out.insert(s("providers"), Value::Sequence(providers));
    if let Some(d) = get(&top, "diskimages") {
        out.insert(s("diskimages"), d.clone());
    }
    for (k, _) in &top {
        if let Some(key) = k.as_str()
            && !out.contains_key(key)
            && !OBSOLETE.iter().any(|(o, _)| *o == key)
        {
            report.push(format!(
                "{key}: not carried: not a known legacy or modern key"
            ));
        }
    }

    let mut clouds_doc = Mapping::new();
    clouds_doc.insert(s("clouds"), Value::Mapping(clouds));
    let to_text = |v: &Mapping| {
        serde_yaml::to_string(v).map_err(|e| MigrateError {
            line: None,
            column: None,
            message: format!("could not write YAML: {e}"),
        })
    };
    Ok(Migration {
        config: format!(
            "# Migrated by `nodepool config-migrate`; credentials are in the generated clouds.yaml.\n{}",
            to_text(&out)?
        ),
        clouds: to_text(&clouds_doc)?,
        report,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, ImageSource};

    const LEGACY: &str = "\
script-dir: /etc/nodepool/scripts
dburi: 'mysql://nodepool@localhost/nodepool'
cron:
  cleanup: '*/5 * * * *'
zmq-publishers:
  - tcp://localhost:8888
gearman-servers:
  - host: zuul.example.org
providers:
  - name: cloud-a
    username: ci
    password: pw-legacy-1234
    auth-url: https://keystone.example.org/v2.0
    project-id: ci-project
    region-name: RegionOne
    max-servers: 7
    images:
      - name: precise
        base-image: 'Ubuntu Precise'
        min-ram: 8192
        setup: prepare_node.sh
        username: jenkins
        private-key: /home/np/.ssh/id_rsa
        meta:
          purpose: ci
      - name: trusty-dib
        min-ram: 4096
labels:
  - name: small
    image: precise
    min-ready: 2
    providers:
      - name: cloud-a
diskimages:
  - name: trusty-dib
    elements: [ubuntu-minimal]
";

    #[test]
    fn legacy_file_becomes_a_valid_modern_one() {
        let m = migrate(LEGACY).unwrap();
        // The setup script and key the snapshot image names must exist.
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("prepare_node.sh"), "true\n").unwrap();
        std::fs::write(dir.path().join("id_rsa"), "key\n").unwrap();
        let text = m
            .config
            .replace("/etc/nodepool/scripts", &dir.path().display().to_string())
            .replace(
                "/home/np/.ssh/id_rsa",
                &dir.path().join("id_rsa").display().to_string(),
            );
        let cfg = Config::from_yaml(&text).unwrap_or_else(|e| panic!("{e}\n{}", m.config));
        let p = &cfg.providers[0];
        assert_eq!(p.name, "cloud-a");
        assert_eq!(cfg.labels[0].name, "small");
        assert_eq!(cfg.labels[0].min_ready, 2);
        assert!(m.config.contains("max-servers: 7"), "{}", m.config);
        assert!(m.config.contains("instance-properties"), "{}", m.config);
        // The image with a top-level diskimage is a provider diskimage.
        assert!(m.config.contains("diskimage: trusty-dib"), "{}", m.config);
        assert!(!m.config.contains("pw-legacy-1234"));
        // Seed 002's snapshot image (it has a `setup` script) stays a
        // provider image, over a cloud image of its base; labels boot it
        // by name.
        assert!(m.config.contains("diskimage: precise"), "{}", m.config);
        let base = p.cloud_image("precise-base").unwrap();
        assert_eq!(base.image_name.as_deref(), Some("Ubuntu Precise"));
        let precise = p.snapshot_image("precise").unwrap();
        assert_eq!(precise.base_image, "precise-base");
        assert_eq!(precise.setup.name, "prepare_node.sh");
        assert_eq!(precise.setup.path, dir.path().join("prepare_node.sh"));
        assert_eq!(precise.username, "jenkins");
        assert_eq!(precise.private_key, dir.path().join("id_rsa"));
        assert_eq!(precise.min_ram, Some(8192));
        assert_eq!(
            p.snapshot_base(precise),
            Some(ImageSource::CloudImage("precise-base".into()))
        );
        assert!(
            m.report
                .iter()
                .any(|l| l.contains("(precise): became snapshot image `precise`")),
            "{:#?}",
            m.report
        );
    }

    #[test]
    fn credentials_go_to_clouds_yaml_and_never_into_the_report() {
        let m = migrate(LEGACY).unwrap();
        let clouds: Value = serde_yaml::from_str(&m.clouds).unwrap();
        let auth = &clouds["clouds"]["cloud-a"]["auth"];
        assert_eq!(auth["password"], s("pw-legacy-1234"));
        assert_eq!(auth["auth_url"], s("https://keystone.example.org/v2.0"));
        assert_eq!(clouds["clouds"]["cloud-a"]["region_name"], s("RegionOne"));
        assert!(m.report.iter().all(|l| !l.contains("pw-legacy-1234")));
        assert!(m.report.iter().any(|l| l.contains("moved to clouds.yaml")));
    }

    #[test]
    fn every_obsolete_key_and_uncarried_setting_is_reported() {
        let m = migrate(LEGACY).unwrap();
        for needle in [
            "dburi: dropped",
            "cron: dropped",
            "zmq-publishers: dropped",
            "gearman-servers: dropped",
        ] {
            assert!(
                m.report.iter().any(|l| l.contains(needle)),
                "{needle} missing from {:#?}",
                m.report
            );
        }
    }

    #[test]
    fn ready_scripts_and_their_login_are_carried() {
        let m = migrate(
            "script-dir: /etc/nodepool/scripts
providers:
  - name: cloud-a
    images:
      - {name: precise, min-ram: 512, username: jenkins, private-key: /keys/id}
      - {name: trusty-dib, min-ram: 512, private-key: /keys/id}
labels:
  - {name: small, image: precise, ready-script: ready.sh}
diskimages:
  - {name: trusty-dib, elements: [ubuntu-minimal]}
",
        )
        .unwrap();
        let doc: Value = serde_yaml::from_str(&m.config).unwrap();
        assert_eq!(doc["script-dir"], s("/etc/nodepool/scripts"));
        assert_eq!(doc["labels"][0]["ready-script"], s("ready.sh"));
        let ci = &doc["providers"][0]["cloud-images"][0];
        assert_eq!(ci["username"], s("jenkins"));
        assert_eq!(ci["private-key"], s("/keys/id"));
        assert!(
            m.report.iter().any(|l| l.contains(
                "(trusty-dib).private-key: set `private-key` on diskimage `trusty-dib` instead"
            )),
            "{:#?}",
            m.report
        );
    }

    #[test]
    fn unparsable_input_names_its_line() {
        let e = migrate("providers:\n  - name: a\n   bad: [\n").unwrap_err();
        assert!(e.line.is_some(), "{e:?}");
        assert!(e.to_string().contains("not valid YAML"), "{e}");
    }
}
