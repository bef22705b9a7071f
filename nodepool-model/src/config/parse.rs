//! From the YAML tree to the typed [`Config`], collecting every error.

use std::path::PathBuf;
use std::time::Duration;

use indexmap::IndexMap;
use serde_yaml::Value;

use super::error::ConfigErrorKind as Kind;
use super::yaml::{At, Errors, Fields, index, join};
use super::*;

/// Parses a document; `errs` receives every problem. The returned config
/// is only meaningful when `errs` stayed empty.
pub(crate) fn config(root: &Value, errs: &mut Errors) -> (Config, Vec<RawDiskImage>) {
    let mut cfg = Config {
        zookeeper_servers: Vec::new(),
        zookeeper_tls: None,
        zookeeper_timeout: Duration::from_secs(10),
        state_store: StateStoreConfig::Sqlite {
            path: PathBuf::from(DEFAULT_SQLITE_PATH),
            lease: None,
        },
        labels: Vec::new(),
        providers: Vec::new(),
        diskimages: Vec::new(),
        max_hold_age: None,
        webapp: WebApp::default(),
        elements_dir: None,
        images_dir: None,
        build_log_dir: PathBuf::from("/var/log/nodepool/builds"),
        build_log_retention: Some(7),
        tenant_resource_limits: IndexMap::new(),
        targets: Vec::new(),
        script_dir: None,
        warnings: Vec::new(),
    };
    let mut raw_images = Vec::new();
    let Some(mut top) = (At {
        value: root,
        path: "",
    })
    .fields(errs) else {
        return (cfg, raw_images);
    };

    cfg.zookeeper_servers
        .extend(top.list_of("zookeeper-servers", errs, |at, errs| {
            zookeeper_server(at, errs)
        }));
    if let Some(f) = top.get("zookeeper-tls")
        && let Some(mut m) = f.at().fields(errs)
    {
        let cert = m.required_string("cert", errs);
        let key = m.required_string("key", errs);
        let ca = m.required_string("ca", errs);
        m.finish(errs);
        if let (Some(cert), Some(key), Some(ca)) = (cert, key, ca) {
            cfg.zookeeper_tls = Some(ZooKeeperTls {
                cert: cert.into(),
                key: key.into(),
                ca: ca.into(),
            });
        }
    }
    if let Some(t) = top.float("zookeeper-timeout", errs) {
        if t > 0.0 && t.is_finite() {
            cfg.zookeeper_timeout = Duration::from_secs_f64(t);
        } else {
            errs.push(
                "zookeeper-timeout",
                Kind::InvalidValue,
                format!("must be a positive number of seconds, found {t}"),
            );
        }
    }
    cfg.state_store = state_store(&mut top, !cfg.zookeeper_servers.is_empty(), errs);

    cfg.labels.extend(top.list_of("labels", errs, label));
    raw_images.extend(top.list_of("diskimages", errs, raw_diskimage));
    // Pool labels inherit the top-level label's ready script.
    let label_scripts: LabelScripts = cfg
        .labels
        .iter()
        .enumerate()
        .filter_map(|(i, l)| {
            let script = l.ready_script.clone()?;
            let path = join(&index("labels", i), "ready-script");
            Some((l.name.clone(), (script, path)))
        })
        .collect();
    cfg.providers
        .extend(top.list_of("providers", errs, |at, errs| {
            provider(at, &label_scripts, errs)
        }));
    if let Some(age) = top.int("max-hold-age", errs) {
        cfg.max_hold_age = (age > 0).then(|| Duration::from_secs(age as u64));
    }
    if let Some(f) = top.get("webapp")
        && let Some(mut m) = f.at().fields(errs)
    {
        if let Some(port) = m.get("port") {
            // 0 asks the system for a free port (the bound address is
            // logged): handy for embedding and for tests.
            if port.at().value.as_i64() == Some(0) {
                cfg.webapp.port = 0;
            } else if let Some(p) = port_number(port.at(), errs) {
                cfg.webapp.port = p;
            }
        }
        if let Some(addr) = m.string("listen_address", errs) {
            cfg.webapp.listen_address = addr;
        }
        m.finish(errs);
    }
    cfg.elements_dir = top.string("elements-dir", errs).map(PathBuf::from);
    cfg.images_dir = top.string("images-dir", errs).map(PathBuf::from);
    if let Some(d) = top.string("build-log-dir", errs) {
        cfg.build_log_dir = d.into();
    }
    if let Some(n) = top.int("build-log-retention", errs) {
        // -1 disables pruning; otherwise at least one log is kept.
        cfg.build_log_retention = (n >= 0).then(|| n.clamp(1, i64::from(u32::MAX)) as u32);
    }
    if let Some(f) = top.get("tenant-resource-limits")
        && let Some(items) = f.at().list(errs)
    {
        for (path, v) in &items {
            tenant_limits(At { value: v, path }, &mut cfg.tenant_resource_limits, errs);
        }
    }
    cfg.targets.extend(top.list_of("targets", errs, target));

    top.removed(
        "dburi",
        "node state lives in the state store: ZooKeeper (`zookeeper-servers`) or the embedded SQLite file (`state-store`)",
        errs,
    );
    cfg.script_dir = top.string("script-dir", errs).map(PathBuf::from);
    top.removed(
        "cron",
        "image builds follow each diskimage's `rebuild-age`, and cleanup runs continuously",
        errs,
    );
    top.removed(
        "zmq-publishers",
        "Jenkins is polled through its REST API (`targets`); no ZeroMQ events are used",
        errs,
    );
    top.removed(
        "gearman-servers",
        "Zuul asks for nodes through node requests in the state store",
        errs,
    );
    top.finish(errs);
    (cfg, raw_images)
}

pub(crate) fn port_number(at: At<'_>, errs: &mut Errors) -> Option<u16> {
    let n = at.int(errs)?;
    match u16::try_from(n) {
        Ok(p) if p > 0 => Some(p),
        _ => {
            errs.push(
                at.path,
                Kind::InvalidValue,
                format!("must be a TCP port (1-65535), found {n}"),
            );
            None
        }
    }
}

fn positive_secs(
    m: &mut Fields<'_>,
    key: &'static str,
    default: u64,
    errs: &mut Errors,
) -> Duration {
    match m.int(key, errs) {
        Some(n) if n > 0 => Duration::from_secs(n as u64),
        Some(n) => {
            errs.push(
                &m.path_of(key),
                Kind::InvalidValue,
                format!("must be a positive number of seconds, found {n}"),
            );
            Duration::from_secs(default)
        }
        None => Duration::from_secs(default),
    }
}

fn zookeeper_server(at: At<'_>, errs: &mut Errors) -> Option<ZooKeeperServer> {
    let mut m = at.fields(errs)?;
    let host = m.required_string("host", errs);
    let port = m
        .get("port")
        .and_then(|p| port_number(p.at(), errs))
        .unwrap_or(DEFAULT_ZOOKEEPER_PORT);
    let chroot = m.string("chroot", errs);
    if let Some(c) = &chroot
        && (!c.starts_with('/') || (c.len() > 1 && c.ends_with('/')))
    {
        errs.push(
            &m.path_of("chroot"),
            Kind::InvalidValue,
            format!("must be an absolute path like /nodepool, found {c:?}"),
        );
    }
    m.finish(errs);
    Some(ZooKeeperServer {
        host: host?,
        port,
        chroot,
    })
}

fn state_store(top: &mut Fields<'_>, have_zookeeper: bool, errs: &mut Errors) -> StateStoreConfig {
    let default = if have_zookeeper {
        StateStoreConfig::ZooKeeper
    } else {
        StateStoreConfig::Sqlite {
            path: DEFAULT_SQLITE_PATH.into(),
            lease: None,
        }
    };
    let Some(f) = top.get("state-store") else {
        return default;
    };
    let Some(mut m) = f.at().fields(errs) else {
        return default;
    };
    let driver = m.string("driver", errs);
    let path = m.string("path", errs);
    let lease = m.float("lease", errs);
    let driver_path = m.path_of("driver");
    let path_path = m.path_of("path");
    let lease_path = m.path_of("lease");
    m.finish(errs);
    let lease = lease.and_then(|t| {
        // Renewed every third of it: under a second leaves no room for a
        // slow disk between renewals.
        if t >= 1.0 && t.is_finite() {
            Some(Duration::from_secs_f64(t))
        } else {
            errs.push(
                &lease_path,
                Kind::InvalidValue,
                format!("must be a number of seconds, at least 1, found {t}"),
            );
            None
        }
    });
    match driver.as_deref() {
        Some("zookeeper") => {
            if !have_zookeeper {
                errs.push(
                    "zookeeper-servers",
                    Kind::MissingKey,
                    "state-store.driver is zookeeper but no zookeeper-servers are configured",
                );
            }
            if path.is_some() {
                errs.push(
                    &path_path,
                    Kind::Conflict,
                    "`path` only applies to the sqlite driver",
                );
            }
            if lease.is_some() {
                errs.push(
                    &lease_path,
                    Kind::Conflict,
                    "`lease` only applies to the sqlite driver (ZooKeeper's is zookeeper-timeout)",
                );
            }
            StateStoreConfig::ZooKeeper
        }
        Some("sqlite") | None => {
            if have_zookeeper {
                errs.push(
                    &driver_path,
                    Kind::Conflict,
                    "the sqlite store is selected but zookeeper-servers is also set; remove one of them",
                );
            }
            StateStoreConfig::Sqlite {
                path: path.unwrap_or_else(|| DEFAULT_SQLITE_PATH.into()).into(),
                lease,
            }
        }
        Some(other) => {
            errs.push(
                &driver_path,
                Kind::InvalidValue,
                format!("unknown state store `{other}` (expected `sqlite` or `zookeeper`)"),
            );
            default
        }
    }
}

fn label(at: At<'_>, errs: &mut Errors) -> Option<Label> {
    let mut m = at.fields(errs)?;
    let name = m.required_string("name", errs);
    let min_ready = m.int("min-ready", errs).unwrap_or(0);
    let max_ready_age = m.int("max-ready-age", errs).unwrap_or(0);
    let replaced = "labels are mapped to images in `providers[].pools[].labels`";
    m.removed("image", replaced, errs);
    m.removed("providers", replaced, errs);
    m.removed(
        "subnodes",
        "multi-node sets are requested by listing a label several times",
        errs,
    );
    let ready_script = m.string("ready-script", errs);
    m.finish(errs);
    Some(Label {
        name: name?,
        ready_script,
        // Nodepool treats negative min-ready like 0 (its docs say -1 disables the label).
        min_ready: min_ready.clamp(0, i64::from(u32::MAX)) as u32,
        max_ready_age: (max_ready_age > 0).then(|| Duration::from_secs(max_ready_age as u64)),
    })
}

/// A diskimage as written, before inheritance.
pub(crate) struct RawDiskImage {
    pub path: String,
    pub name: String,
    pub is_abstract: bool,
    pub parent: Option<String>,
    pub elements: Vec<String>,
    pub env_vars: IndexMap<String, String>,
    pub formats: Option<Vec<String>>,
    pub release: Option<String>,
    pub rebuild_age: Option<Duration>,
    pub build_timeout: Option<Duration>,
    pub pause: Option<bool>,
    pub username: Option<String>,
    pub private_key: Option<PathBuf>,
    pub python_path: Option<String>,
    pub shell_type: Option<String>,
    pub dib_cmd: Option<String>,
    pub delete_after_upload: Option<bool>,
    pub keep_formats: Option<Vec<String>>,
    pub metadata: IndexMap<String, String>,
}

/// A server's size, by `flavor-name` and/or `min-ram` (one is required);
/// `what` says whose size it is in the error.
fn server_size(
    at: At<'_>,
    m: &mut Fields<'_>,
    what: &str,
    errs: &mut Errors,
) -> (Option<String>, Option<i64>) {
    let flavor_name = m.string("flavor-name", errs);
    let min_ram = m.int("min-ram", errs);
    if flavor_name.is_none() && min_ram.is_none() && !m.has("flavor-name") && !m.has("min-ram") {
        errs.push(
            at.path,
            Kind::Conflict,
            format!("at least one of `min-ram` or `flavor-name` is required{what}"),
        );
    }
    (flavor_name, min_ram)
}

fn optional_secs(m: &mut Fields<'_>, key: &'static str, errs: &mut Errors) -> Option<Duration> {
    let n = m.int(key, errs)?;
    if n <= 0 {
        errs.push(
            &m.path_of(key),
            Kind::InvalidValue,
            format!("must be a positive number of seconds, found {n}"),
        );
        return None;
    }
    Some(Duration::from_secs(n as u64))
}

fn raw_diskimage(at: At<'_>, errs: &mut Errors) -> Option<RawDiskImage> {
    let mut m = at.fields(errs)?;
    let name = m.required_string("name", errs);
    let d = RawDiskImage {
        path: at.path.to_owned(),
        name: name.clone().unwrap_or_default(),
        is_abstract: m.bool("abstract", errs).unwrap_or(false),
        parent: m.string("parent", errs),
        elements: m.string_list("elements", errs).unwrap_or_default(),
        env_vars: m.string_map("env-vars", errs).unwrap_or_default(),
        formats: m.string_list("formats", errs),
        release: m.get("release").and_then(|f| f.at().scalar_string(errs)),
        rebuild_age: optional_secs(&mut m, "rebuild-age", errs),
        build_timeout: optional_secs(&mut m, "build-timeout", errs),
        pause: m.bool_or_old("pause", "paused", errs),
        username: m.string("username", errs),
        private_key: m.string("private-key", errs).map(PathBuf::from),
        python_path: m.string("python-path", errs),
        shell_type: m.string("shell-type", errs),
        dib_cmd: m.string("dib-cmd", errs),
        delete_after_upload: m.bool("delete-after-upload", errs),
        keep_formats: m.string_list("keep-formats", errs),
        metadata: m.string_map("metadata", errs).unwrap_or_default(),
    };
    m.finish(errs);
    name.map(|_| d)
}

/// The top-level labels' ready scripts: label name → (script, its path).
type LabelScripts = IndexMap<String, (String, String)>;

fn provider(at: At<'_>, label_scripts: &LabelScripts, errs: &mut Errors) -> Option<ProviderConfig> {
    let mut m = at.fields(errs)?;
    let name = m.required_string("name", errs);
    let driver_name = m
        .string("driver", errs)
        .unwrap_or_else(|| "openstack".into());
    let driver = match driver_name.as_str() {
        "openstack" => Some(Driver::OpenStack),
        "simulated" => Some(Driver::Simulated(
            m.get("simulation")
                .and_then(|f| simulation(f.at(), errs))
                .unwrap_or_default(),
        )),
        "external" => super::external::external(&mut m, errs).map(Driver::External),
        "qemu" => super::qemu::qemu(&mut m, errs).map(Driver::Qemu),
        "static" => Some(Driver::Static(StaticHosts::default())),
        "aws" | "azure" | "gce" | "ibmvpc" | "kubernetes" | "openshift" | "openshiftpods"
        | "metastatic" | "fake" | "test" | "example" => {
            errs.push(
                &m.path_of("driver"),
                Kind::InvalidValue,
                format!(
                    "driver `{driver_name}` is not supported by this implementation (supported: openstack, simulated, static, external, qemu)"
                ),
            );
            None
        }
        other => {
            let hint = super::yaml::suggest(
                other,
                &["openstack", "simulated", "static", "external", "qemu"],
            )
            .map(|s| format!("; did you mean `{s}`?"))
            .unwrap_or_default();
            errs.push(
                &m.path_of("driver"),
                Kind::InvalidValue,
                format!(
                    "unknown driver `{other}` (supported: openstack, simulated, static, external, qemu){hint}"
                ),
            );
            None
        }
    };
    if !matches!(driver, Some(Driver::Simulated(_))) && m.has("simulation") {
        m.allow(&["simulation"]);
        errs.push(
            &m.path_of("simulation"),
            Kind::Conflict,
            "`simulation` only applies to providers with `driver: simulated`",
        );
    }
    let cloud = if matches!(driver, Some(Driver::OpenStack)) {
        m.required_string("cloud", errs)
    } else {
        m.string("cloud", errs)
    };
    let max_concurrency = m.int("max-concurrency", errs).unwrap_or(-1);
    let priority = m.int("priority", errs).unwrap_or(100);
    let region_name = m.string("region-name", errs);
    let boot_timeout = positive_secs(&mut m, "boot-timeout", 60, errs);
    let launch_timeout = positive_secs(&mut m, "launch-timeout", 3600, errs);
    let launch_retries = match m.int("launch-retries", errs) {
        Some(n) if n >= 1 => n.min(i64::from(u32::MAX)) as u32,
        Some(n) => {
            errs.push(
                &m.path_of("launch-retries"),
                Kind::InvalidValue,
                format!("must be at least 1, found {n}"),
            );
            3
        }
        None => 3,
    };
    let image_upload_timeout = positive_secs(&mut m, "image-upload-timeout", 3600, errs);
    let rate = match m.float("rate", errs) {
        Some(r) if r >= 0.0 && r.is_finite() => r,
        Some(r) => {
            errs.push(
                &m.path_of("rate"),
                Kind::InvalidValue,
                format!("must be a non-negative number of seconds, found {r}"),
            );
            1.0
        }
        None => 1.0,
    };
    let clean_floating_ips = m.bool("clean-floating-ips", errs).unwrap_or(false);
    let port_cleanup_interval = match m.int("port-cleanup-interval", errs) {
        Some(n) if n > 0 => Some(Duration::from_secs(n as u64)),
        Some(_) => None,
        None => Some(Duration::from_secs(600)),
    };
    let image_name_format = m
        .string("image-name-format", errs)
        .unwrap_or_else(|| "{image_name}-{timestamp}".into());
    check_format_fields(
        &image_name_format,
        &["image_name", "upload_id", "timestamp"],
        &m.path_of("image-name-format"),
        errs,
    );
    let post_upload_hook = m.string("post-upload-hook", errs);
    m.string("nodepool-id", errs); // accepted, unused (as in Nodepool)

    let mut diskimages = Vec::new();
    diskimages.extend(m.list_of("diskimages", errs, provider_diskimage));
    let mut cloud_images = Vec::new();
    cloud_images.extend(m.list_of("cloud-images", errs, cloud_image));
    let mut snapshot_images = Vec::new();
    snapshot_images.extend(m.list_of("images", errs, snapshot_image));
    let mut pools = Vec::new();
    let mut driver = driver;
    if let Some(Driver::Static(hosts)) = &mut driver {
        for (p, h) in m.list_of("pools", errs, super::static_nodes::pool) {
            hosts.pools.insert(p.name.clone(), h);
            pools.push(p);
        }
    } else {
        pools.extend(m.list_of("pools", errs, |at, errs| pool(at, label_scripts, errs)));
    }

    // Seed 001: "set that provider's max-servers to -1" to remove it.
    let mut removing = false;
    if let Some(f) = m.get("max-servers") {
        match f.at().int(errs) {
            Some(-1) => {
                removing = true;
                errs.warn(
                    &m.path_of("max-servers"),
                    Kind::Deprecated,
                    "provider-level `max-servers: -1` (the old removal recipe) is read as: this provider is being removed; its pools launch nothing and its image uploads are deleted. Today's spelling: `max-servers: 0` on every pool, remove its `diskimages`, then the provider once its nodes are gone",
                );
            }
            Some(_) => errs.push(
                &m.path_of("max-servers"),
                Kind::Removed,
                "`max-servers` is no longer supported: it moved to `pools[].max-servers` (only `-1`, seed 001's removal recipe, is still read)",
            ),
            None => {}
        }
    }
    m.removed(
        "hostname-format",
        "servers are named np<node id> (removed in Nodepool in 2024)",
        errs,
    );
    m.removed(
        "template-hostname",
        "Nodepool names its servers, snapshot images' setup servers too",
        errs,
    );
    m.removed(
        "image-type",
        "the upload format comes from clouds.yaml (`image_format`)",
        errs,
    );
    m.removed("networks", "it moved to `pools[].networks`", errs);
    m.removed(
        "availability-zones",
        "it moved to `pools[].availability-zones`",
        errs,
    );
    m.removed("keypair", "use `key-name` on pool labels", errs);
    m.removed("api-timeout", "set `api_timeout` in clouds.yaml", errs);
    for key in [
        "username",
        "password",
        "auth-url",
        "project-id",
        "project-name",
        "service-type",
        "service-name",
    ] {
        m.removed(
            key,
            "cloud credentials live in clouds.yaml, named by `cloud`",
            errs,
        );
    }
    m.finish(errs);
    Some(ProviderConfig {
        name: name?,
        driver: driver?,
        max_concurrency: (max_concurrency >= 0)
            .then(|| max_concurrency.min(i64::from(u32::MAX)) as u32),
        priority,
        cloud,
        region_name,
        boot_timeout,
        launch_timeout,
        launch_retries,
        image_upload_timeout,
        rate,
        clean_floating_ips,
        port_cleanup_interval,
        image_name_format,
        post_upload_hook,
        image_format: None,
        diskimages,
        cloud_images,
        snapshot_images,
        pools: pools
            .into_iter()
            .map(|mut p| {
                if removing {
                    // Draining: no launches; existing nodes live on.
                    p.max_servers = Some(0);
                }
                p
            })
            .collect(),
        removing,
    })
}

/// Checks that a `{field}` format string only uses the given fields.
fn check_format_fields(format: &str, fields: &[&str], path: &str, errs: &mut Errors) {
    let mut rest = format;
    while let Some(start) = rest.find('{') {
        if rest[start..].starts_with("{{") {
            rest = &rest[start + 2..];
            continue;
        }
        let Some(end) = rest[start..].find('}') else {
            errs.push(path, Kind::InvalidValue, "unclosed `{` in format string");
            return;
        };
        let inner = &rest[start + 1..start + end];
        let field = inner.split([':', '!', '.', '[']).next().unwrap_or("");
        if !fields.contains(&field) {
            errs.push(
                path,
                Kind::InvalidValue,
                format!(
                    "unknown field `{{{field}}}` (available: {})",
                    fields
                        .iter()
                        .map(|f| format!("{{{f}}}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            );
        }
        rest = &rest[start + end + 1..];
    }
}

fn simulation(at: At<'_>, errs: &mut Errors) -> Option<SimulatedCloud> {
    let mut m = at.fields(errs)?;
    let mut sim = SimulatedCloud::default();
    if let Some(d) = m.float("boot-delay", errs) {
        sim.boot_delay = non_negative_duration(d, &m.path_of("boot-delay"), errs);
    }
    if let Some(d) = m.float("delete-delay", errs) {
        sim.delete_delay = non_negative_duration(d, &m.path_of("delete-delay"), errs);
    }
    if let Some(f) = m.get("quota")
        && let Some(mut q) = f.at().fields(errs)
    {
        for (key, name) in [("instances", INSTANCES), ("cores", CORES), ("ram", RAM)] {
            if let Some(n) = q.int(key, errs) {
                sim.quota.set(name, n);
            }
        }
        q.finish(errs);
    }
    if let Some(f) = m.get("failure-rates")
        && let Some(mut r) = f.at().fields(errs)
    {
        for (key, slot) in [
            ("create", &mut sim.create_failure_rate),
            ("delete", &mut sim.delete_failure_rate),
            ("upload", &mut sim.upload_failure_rate),
        ] {
            if let Some(p) = r.float(key, errs) {
                if (0.0..=1.0).contains(&p) {
                    *slot = p;
                } else {
                    errs.push(
                        &r.path_of(key),
                        Kind::InvalidValue,
                        format!("must be a probability between 0 and 1, found {p}"),
                    );
                }
            }
        }
        r.finish(errs);
    }
    for (key, slot) in [
        ("leaked-servers", &mut sim.leaked_servers),
        ("leaked-floating-ips", &mut sim.leaked_floating_ips),
        ("leaked-ports", &mut sim.leaked_ports),
    ] {
        if let Some(n) = m.uint(key, errs) {
            *slot = n.min(u64::from(u32::MAX)) as u32;
        }
    }
    if let Some(f) = m.get("flavors")
        && let Some(items) = f.at().list(errs)
    {
        sim.flavors.clear();
        for (path, v) in &items {
            let Some(mut fl) = (At { value: v, path }).fields(errs) else {
                continue;
            };
            let name = fl.required_string("name", errs);
            let vcpus = fl.required("vcpus", errs).and_then(|f| f.at().int(errs));
            let ram = fl.required("ram", errs).and_then(|f| f.at().int(errs));
            fl.finish(errs);
            if let (Some(name), Some(vcpus), Some(ram)) = (name, vcpus, ram) {
                sim.flavors.push(SimulatedFlavor { name, vcpus, ram });
            }
        }
    }
    if let Some(b) = m.bool("skip-nodescan", errs) {
        sim.skip_nodescan = b;
    }
    sim.data_plane_host = m.string("data-plane-host", errs);
    if let Some(azs) = m.string_list("availability-zones", errs) {
        sim.availability_zones = azs;
    }
    if let Some(s) = m.uint("seed", errs) {
        sim.seed = s;
    }
    if let Some(d) = m.float("api-timeout", errs) {
        let path = m.path_of("api-timeout");
        if d > 0.0 && d.is_finite() {
            sim.api_timeout = Duration::from_secs_f64(d);
        } else {
            errs.push(
                &path,
                Kind::InvalidValue,
                format!("must be a positive number of seconds, found {d}"),
            );
        }
    }
    if let Some(f) = m.get("api-fault") {
        sim.api_fault = api_fault(f.at(), errs);
    }
    if let Some(f) = m.string("state-file", errs) {
        // A file name is needed: the lock and temporary files go beside it.
        if f.trim().is_empty() || f.ends_with('/') {
            errs.push(
                &m.path_of("state-file"),
                Kind::InvalidValue,
                format!("must be the path of a file, found {f:?}"),
            );
        } else {
            sim.state_file = Some(f.into());
        }
    }
    m.finish(errs);
    Some(sim)
}

/// `api-fault`: a mode (`hang`, `server-error`, `rate-limit`, `none`), or
/// `{mode: rate-limit, retry-after: SECONDS}`.
fn api_fault(at: At<'_>, errs: &mut Errors) -> Option<ApiFault> {
    const MODES: [&str; 4] = ["hang", "server-error", "rate-limit", "none"];
    let (mode, mode_path, retry_after) = match at.value {
        Value::Mapping(_) => {
            let mut m = at.fields(errs)?;
            let mode_path = m.path_of("mode");
            let mode = m.required_string("mode", errs);
            let retry_after = m
                .float("retry-after", errs)
                .map(|d| (d, m.path_of("retry-after")));
            m.finish(errs);
            (mode?, mode_path, retry_after)
        }
        _ => (at.string(errs)?, at.path.to_owned(), None),
    };
    let fault = match mode.as_str() {
        "hang" => Some(ApiFault::Hang),
        "server-error" => Some(ApiFault::ServerError),
        "rate-limit" => Some(ApiFault::RateLimit { retry_after: None }),
        "none" => None,
        other => {
            let hint = super::yaml::suggest(other, &MODES)
                .map(|s| format!("; did you mean `{s}`?"))
                .unwrap_or_default();
            errs.push(
                &mode_path,
                Kind::InvalidValue,
                format!(
                    "unknown api-fault mode `{other}` (one of: {}){hint}",
                    MODES.join(", ")
                ),
            );
            return None;
        }
    };
    match (fault, retry_after) {
        (f, None) => f,
        (Some(ApiFault::RateLimit { .. }), Some((d, path))) => Some(ApiFault::RateLimit {
            retry_after: Some(non_negative_duration(d, &path, errs)),
        }),
        (f, Some((_, path))) => {
            errs.push(
                &path,
                Kind::Conflict,
                "`retry-after` only applies to `mode: rate-limit`",
            );
            f
        }
    }
}

fn non_negative_duration(secs: f64, path: &str, errs: &mut Errors) -> Duration {
    if secs >= 0.0 && secs.is_finite() {
        Duration::from_secs_f64(secs)
    } else {
        errs.push(
            path,
            Kind::InvalidValue,
            format!("must be a non-negative number of seconds, found {secs}"),
        );
        Duration::ZERO
    }
}

fn default_port_for(connection_type: &str) -> u16 {
    if connection_type == "winrm" { 5986 } else { 22 }
}

fn provider_diskimage(at: At<'_>, errs: &mut Errors) -> Option<ProviderDiskImage> {
    let mut m = at.fields(errs)?;
    let name = m.required_string("name", errs);
    let pause = m.bool_or_old("pause", "paused", errs).unwrap_or(false);
    let config_drive = m.bool("config-drive", errs);
    let meta = m.string_map("meta", errs).unwrap_or_default();
    let connection_type = m
        .string("connection-type", errs)
        .unwrap_or_else(|| "ssh".into());
    let connection_port = m
        .get("connection-port")
        .and_then(|f| port_number(f.at(), errs))
        .unwrap_or_else(|| default_port_for(&connection_type));
    let validate = m
        .get("validate")
        .and_then(|f| image_validation(f.at(), errs));
    m.finish(errs);
    Some(ProviderDiskImage {
        name: name?,
        pause,
        config_drive,
        meta,
        connection_type,
        connection_port,
        validate,
    })
}

/// `validate: {script, timeout}`; the script's path is resolved against
/// `script-dir` once the whole file is read.
fn image_validation(at: At<'_>, errs: &mut Errors) -> Option<ReadyScript> {
    let mut m = at.fields(errs)?;
    let script = m.required_string("script", errs);
    let configured_at = m.path_of("script");
    let timeout = optional_secs(&mut m, "timeout", errs);
    m.finish(errs);
    let script = script?;
    Some(ReadyScript {
        path: PathBuf::from(&script),
        name: script,
        timeout: timeout.unwrap_or(DEFAULT_READY_SCRIPT_TIMEOUT),
        configured_at,
    })
}

/// A provider `images` entry: a snapshot image (seed 002). Its scripts'
/// paths are resolved against `script-dir` once the whole file is read.
fn snapshot_image(at: At<'_>, errs: &mut Errors) -> Option<SnapshotImage> {
    let mut m = at.fields(errs)?;
    let name = m.required_string("name", errs);
    let base_image = m.required_string("base-image", errs);
    let setup = m.required_string("setup", errs);
    let setup_at = m.path_of("setup");
    let setup_timeout = optional_secs(&mut m, "setup-timeout", errs);
    let username = m.required_string("username", errs);
    let private_key = m.required_string("private-key", errs).map(PathBuf::from);
    let (flavor_name, min_ram) = server_size(at, &mut m, " (the setup server's size)", errs);
    let rebuild_age = optional_secs(&mut m, "rebuild-age", errs);
    let pause = m.bool_or_old("pause", "paused", errs).unwrap_or(false);
    let validate = m
        .get("validate")
        .and_then(|f| image_validation(f.at(), errs));
    m.finish(errs);
    let setup = setup?;
    Some(SnapshotImage {
        name: name?,
        base_image: base_image?,
        setup: ReadyScript {
            path: PathBuf::from(&setup),
            name: setup,
            timeout: setup_timeout.unwrap_or(DEFAULT_SETUP_TIMEOUT),
            configured_at: setup_at,
        },
        username: username?,
        private_key: private_key?,
        flavor_name,
        min_ram,
        rebuild_age: rebuild_age.unwrap_or(Duration::from_secs(86_400)),
        pause,
        validate,
        configured_at: at.path.to_owned(),
    })
}

fn cloud_image(at: At<'_>, errs: &mut Errors) -> Option<CloudImage> {
    let mut m = at.fields(errs)?;
    let name = m.required_string("name", errs);
    let image_id = m.string("image-id", errs);
    let image_name = m.string("image-name", errs);
    if image_id.is_some() && image_name.is_some() {
        errs.push(
            at.path,
            Kind::Conflict,
            "`image-id` and `image-name` are exclusive; give one",
        );
    }
    let config_drive = m.bool("config-drive", errs);
    let username = m.string("username", errs);
    let private_key = m.string("private-key", errs).map(PathBuf::from);
    let python_path = m
        .string("python-path", errs)
        .unwrap_or_else(|| "auto".into());
    let shell_type = m.string("shell-type", errs);
    let connection_type = m
        .string("connection-type", errs)
        .unwrap_or_else(|| "ssh".into());
    let connection_port = m
        .get("connection-port")
        .and_then(|f| port_number(f.at(), errs))
        .unwrap_or_else(|| default_port_for(&connection_type));
    m.finish(errs);
    Some(CloudImage {
        name: name?,
        image_id,
        image_name,
        config_drive,
        username,
        private_key,
        python_path,
        shell_type,
        connection_type,
        connection_port,
    })
}

fn pool(at: At<'_>, label_scripts: &LabelScripts, errs: &mut Errors) -> Option<Pool> {
    let mut m = at.fields(errs)?;
    let name = m.required_string("name", errs);
    let max_servers = m.int("max-servers", errs);
    let max_cores = m.int("max-cores", errs);
    let max_ram = m.int("max-ram", errs);
    let max_volumes = m.int("max-volumes", errs);
    let max_volume_gb = m.int("max-volume-gb", errs);
    let ignore_provider_quota = m.bool("ignore-provider-quota", errs).unwrap_or(false);
    let availability_zones = m
        .string_list("availability-zones", errs)
        .unwrap_or_default();
    let networks = m.string_list("networks", errs).unwrap_or_default();
    let security_groups = m.string_list("security-groups", errs).unwrap_or_default();
    let auto_floating_ip = m.bool("auto-floating-ip", errs).unwrap_or(true);
    let host_key_checking = m.bool("host-key-checking", errs).unwrap_or(true);
    let priority = m.int("priority", errs);
    let node_attributes = m.get("node-attributes").and_then(|f| match f.value {
        Value::Mapping(map) => Some(
            map.iter()
                .filter_map(|(k, v)| Some((k.as_str()?.to_owned(), yaml_to_json(v))))
                .collect::<IndexMap<_, _>>(),
        ),
        _ => {
            f.at().fields(errs);
            None
        }
    });
    let mut labels = Vec::new();
    let mut ready_scripts = IndexMap::new();
    for (l, script) in m.list_of("labels", errs, |at, errs| {
        pool_label(at, &networks, host_key_checking, label_scripts, errs)
    }) {
        if let Some(s) = script {
            ready_scripts.insert(l.name.clone(), s);
        }
        labels.push(l);
    }
    m.finish(errs);
    Some(Pool {
        name: name?,
        max_servers,
        max_cores,
        max_ram,
        max_volumes,
        max_volume_gb,
        ignore_provider_quota,
        availability_zones,
        networks,
        security_groups,
        auto_floating_ip,
        host_key_checking,
        priority,
        node_attributes,
        labels,
        ready_scripts,
    })
}

/// Nova rejects metadata keys and values longer than this many bytes.
pub const NOVA_METADATA_LIMIT: usize = 255;

fn check_metadata(map: &IndexMap<String, String>, path: &str, errs: &mut Errors) {
    for (k, v) in map {
        if k.len() > NOVA_METADATA_LIMIT {
            errs.push(
                &join(path, k),
                Kind::InvalidValue,
                format!(
                    "Nova metadata keys are limited to {NOVA_METADATA_LIMIT} bytes; this one has {}",
                    k.len()
                ),
            );
        }
        if v.len() > NOVA_METADATA_LIMIT {
            errs.push(
                &join(path, k),
                Kind::InvalidValue,
                format!(
                    "Nova metadata values are limited to {NOVA_METADATA_LIMIT} bytes; this one has {}",
                    v.len()
                ),
            );
        }
    }
}

fn pool_label(
    at: At<'_>,
    pool_networks: &[String],
    pool_host_key_checking: bool,
    label_scripts: &LabelScripts,
    errs: &mut Errors,
) -> Option<(PoolLabel, Option<ReadyScript>)> {
    let mut m = at.fields(errs)?;
    let name = m.required_string("name", errs);
    let diskimage = m.string("diskimage", errs);
    let cloud_image = m.string("cloud-image", errs);
    let image = match (diskimage, cloud_image) {
        (Some(d), None) => Some(ImageSource::DiskImage(d)),
        (None, Some(c)) => Some(ImageSource::CloudImage(c)),
        (Some(_), Some(_)) => {
            errs.push(
                at.path,
                Kind::Conflict,
                "`diskimage` and `cloud-image` are exclusive; give one",
            );
            None
        }
        (None, None) => {
            errs.push(
                at.path,
                Kind::Conflict,
                "one of `diskimage` or `cloud-image` is required",
            );
            None
        }
    };
    let (flavor_name, min_ram) = server_size(at, &mut m, "", errs);
    let key_name = m.string("key-name", errs);
    let console_log = m.bool("console-log", errs).unwrap_or(false);
    let boot_from_volume = m.bool("boot-from-volume", errs).unwrap_or(false);
    let volume_size = match m.int("volume-size", errs) {
        Some(n) if n > 0 => n,
        Some(n) => {
            errs.push(
                &m.path_of("volume-size"),
                Kind::InvalidValue,
                format!("must be a positive number of GB, found {n}"),
            );
            50
        }
        None => 50,
    };
    let instance_properties = m
        .string_map("instance-properties", errs)
        .unwrap_or_default();
    check_metadata(
        &instance_properties,
        &m.path_of("instance-properties"),
        errs,
    );
    let dynamic_instance_properties = m
        .string_map("dynamic-instance-properties", errs)
        .unwrap_or_default();
    for (k, v) in &dynamic_instance_properties {
        let path = join(&m.path_of("dynamic-instance-properties"), k);
        if k.len() > NOVA_METADATA_LIMIT {
            errs.push(
                &path,
                Kind::InvalidValue,
                format!("Nova metadata keys are limited to {NOVA_METADATA_LIMIT} bytes"),
            );
        }
        check_format_fields(v, &["request"], &path, errs);
    }
    let userdata = m.string("userdata", errs);
    let networks = m
        .string_list("networks", errs)
        .unwrap_or_else(|| pool_networks.to_vec());
    let host_key_checking = m
        .bool("host-key-checking", errs)
        .unwrap_or(pool_host_key_checking);
    let own_script = m
        .string("ready-script", errs)
        .map(|s| (s, m.path_of("ready-script")));
    let timeout = optional_secs(&mut m, "ready-script-timeout", errs);
    m.finish(errs);
    let name = name?;
    // The pool label's own script, else the top-level label's.
    let inherited = || label_scripts.get(&name).cloned();
    let ready_script = own_script
        .or_else(inherited)
        .map(|(script, configured_at)| ReadyScript {
            path: PathBuf::from(&script),
            name: script,
            timeout: timeout.unwrap_or(DEFAULT_READY_SCRIPT_TIMEOUT),
            configured_at,
        });
    let label = PoolLabel {
        name,
        image: image?,
        flavor_name,
        min_ram,
        key_name,
        console_log,
        boot_from_volume,
        volume_size,
        instance_properties,
        dynamic_instance_properties,
        userdata,
        networks,
        host_key_checking,
    };
    Some((label, ready_script))
}

fn tenant_limits(at: At<'_>, out: &mut IndexMap<String, Limits>, errs: &mut Errors) {
    let Value::Mapping(map) = at.value else {
        at.fields(errs);
        return;
    };
    let mut tenant = None;
    let mut limits = Limits::unlimited();
    for (k, v) in map {
        let Some(key) = k.as_str() else {
            errs.push(at.path, Kind::WrongType, "keys must be strings");
            continue;
        };
        let path = join(at.path, key);
        let value = At {
            value: v,
            path: &path,
        };
        // Read key by key (any other key limits the resource of that
        // name), so the reference recorder is told about the named ones.
        if matches!(
            key,
            "tenant-name"
                | "max-servers"
                | "max-cores"
                | "max-ram"
                | "max-volumes"
                | "max-volume-gb"
        ) {
            super::yaml::recorder::record(at.path, key, super::yaml::recorder::Use::Read);
        }
        match key {
            "tenant-name" => tenant = value.string(errs),
            _ => {
                let name = match key {
                    "max-servers" => INSTANCES,
                    "max-cores" => CORES,
                    "max-ram" => RAM,
                    "max-volumes" => VOLUMES,
                    "max-volume-gb" => VOLUME_GB,
                    other => other,
                };
                if let Some(n) = value.int(errs) {
                    limits.set(name, n);
                }
            }
        }
    }
    match tenant {
        Some(t) if out.contains_key(&t) => errs.push(
            &join(at.path, "tenant-name"),
            Kind::Duplicate,
            format!("tenant {t:?} already has limits"),
        ),
        Some(t) => {
            out.insert(t, limits);
        }
        None => errs.push(
            &join(at.path, "tenant-name"),
            Kind::MissingKey,
            "required key `tenant-name` is missing",
        ),
    }
}

fn target(at: At<'_>, errs: &mut Errors) -> Option<Target> {
    let mut m = at.fields(errs)?;
    let name = m.required_string("name", errs);
    let jenkins = m.required("jenkins", errs).and_then(|f| {
        let mut j = f.at().fields(errs)?;
        let url = j.required_string("url", errs);
        let user = j.string("user", errs);
        let token = j.string("api-token", errs);
        let apikey = j.string("apikey", errs);
        if token.is_some() && apikey.is_some() {
            errs.push(
                &j.path,
                Kind::Conflict,
                "give `api-token` or `apikey`, not both",
            );
        }
        let api_token_file = j.string("api-token-file", errs).map(PathBuf::from);
        if api_token_file.is_some() && (token.is_some() || apikey.is_some()) {
            errs.push(
                &j.path,
                Kind::Conflict,
                "give the API token inline or as `api-token-file`, not both",
            );
        }
        let credentials_id = j.string("credentials-id", errs);
        let remote_fs_root = j
            .string("remote-fs-root", errs)
            .unwrap_or_else(|| "/home/jenkins".into());
        j.removed("test-job", "test jobs are not run by the launcher", errs);
        j.finish(errs);
        Some(JenkinsConnection {
            url: url?,
            user,
            api_token: token.or(apikey).map(Secret::new),
            api_token_file,
            credentials_id,
            remote_fs_root,
        })
    });
    let mut labels = Vec::new();
    for key in ["labels", "images"] {
        if let Some(f) = m.get(key)
            && let Some(items) = f.at().list(errs)
        {
            for (path, v) in &items {
                let Some(mut l) = (At { value: v, path }).fields(errs) else {
                    continue;
                };
                let lname = l.required_string("name", errs);
                let min_ready = l.int("min-ready", errs).unwrap_or(0);
                // seed 003's form lists providers per image; any provider may serve.
                l.allow(&["providers"]);
                l.finish(errs);
                if let Some(lname) = lname {
                    labels.push(TargetLabel {
                        name: lname,
                        min_ready: min_ready.clamp(0, i64::from(u32::MAX)) as u32,
                    });
                }
            }
        }
    }
    m.removed("hostname", "agents are named after their node", errs);
    m.removed("subnode-hostname", "subnodes are not supported", errs);
    m.removed("rate", "Jenkins calls are made as needed", errs);
    m.finish(errs);
    Some(Target {
        name: name?,
        jenkins: jenkins?,
        labels,
    })
}

/// Converts a YAML value into JSON (for `node-attributes`).
pub(crate) fn yaml_to_json(v: &Value) -> serde_json::Value {
    match v {
        Value::Null => serde_json::Value::Null,
        Value::Bool(b) => serde_json::Value::Bool(*b),
        Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                serde_json::Value::from(i)
            } else if let Some(u) = n.as_u64() {
                serde_json::Value::from(u)
            } else {
                n.as_f64()
                    .and_then(serde_json::Number::from_f64)
                    .map(serde_json::Value::Number)
                    .unwrap_or(serde_json::Value::Null)
            }
        }
        Value::String(s) => serde_json::Value::String(s.clone()),
        Value::Sequence(items) => {
            serde_json::Value::Array(items.iter().map(yaml_to_json).collect())
        }
        Value::Mapping(m) => serde_json::Value::Object(
            m.iter()
                .filter_map(|(k, v)| {
                    let key = match k {
                        Value::String(s) => s.clone(),
                        Value::Number(n) => n.to_string(),
                        Value::Bool(b) => b.to_string(),
                        _ => return None,
                    };
                    Some((key, yaml_to_json(v)))
                })
                .collect(),
        ),
        Value::Tagged(t) => yaml_to_json(&t.value),
    }
}
