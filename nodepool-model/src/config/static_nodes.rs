//! `driver: static`: pools of existing hosts (Python Nodepool's static
//! driver, `nodepool/driver/static/config.py`).
//!
//! A static pool lists `nodes` instead of `labels`; the labels it serves
//! are the union of its hosts' labels, each entered in the pool as a
//! [`PoolLabel`] whose image is [`ImageSource::Static`], so the planner
//! treats the pool like any other but never launches in it.

use std::collections::HashMap;
use std::time::Duration;

use indexmap::IndexMap;

use super::error::ConfigErrorKind as Kind;
use super::parse::{port_number, yaml_to_json};
use super::yaml::{At, Errors, index, join};
use super::*;

/// The hosts of a static provider, by pool name.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct StaticHosts {
    /// Each pool's hosts, in file order, keyed by pool name.
    pub pools: IndexMap<String, Vec<StaticHost>>,
}

impl StaticHosts {
    /// The hosts of a pool (none for an unknown pool).
    pub fn hosts(&self, pool: &str) -> &[StaticHost] {
        self.pools.get(pool).map(Vec::as_slice).unwrap_or(&[])
    }

    /// Every host with its pool name.
    pub fn all(&self) -> impl Iterator<Item = (&str, &StaticHost)> {
        self.pools
            .iter()
            .flat_map(|(pool, hosts)| hosts.iter().map(move |h| (pool.as_str(), h)))
    }
}

/// One existing host of a static pool (`providers[].pools[].nodes[]`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StaticHost {
    /// Host name or address: the node's `hostname`, `interface_ip` and
    /// `external_id`.
    pub name: String,
    /// Labels it serves (a string is split on whitespace, as in Nodepool).
    pub labels: Vec<String>,
    /// Login user (default `zuul`).
    pub username: String,
    /// `ssh` (default), `network_cli`, `winrm`, ...
    pub connection_type: String,
    /// Port for the connection type (default 22).
    pub connection_port: u16,
    /// Scan the host's keys (and check `host_keys` among them) before it
    /// is registered, and check it answers before it is handed out.
    pub host_key_checking: bool,
    /// Keys the host must offer (`"<type> <base64>"`); with checking off,
    /// these are the node's `host_keys`.
    pub host_keys: Vec<String>,
    /// Nodes registered for it at once (default 1).
    pub max_parallel_jobs: u32,
    /// Python interpreter path (default `auto`).
    pub python_path: String,
    /// Shell type.
    pub shell_type: Option<String>,
    /// How long the connection check may take (default 5 s).
    pub timeout: Duration,
    /// Its position in the pool's `nodes` list, for located errors (hosts
    /// that failed to parse are left out of the list).
    pub index: usize,
}

impl StaticHost {
    /// What identifies a host across launchers and configuration changes,
    /// as Python Nodepool's `nodeTuple`: name, user and port.
    pub fn identity(&self) -> (&str, &str, u16) {
        (&self.name, &self.username, self.connection_port)
    }
}

/// Reads a static pool: the common pool keys and `nodes`.
pub(crate) fn pool(at: At<'_>, errs: &mut Errors) -> Option<(Pool, Vec<StaticHost>)> {
    let mut m = at.fields(errs)?;
    let name = m.required_string("name", errs);
    let max_servers = m.int("max-servers", errs);
    let priority = m.int("priority", errs);
    let node_attributes = m.get("node-attributes").and_then(|f| match f.value {
        serde_yaml::Value::Mapping(map) => Some(
            map.iter()
                .filter_map(|(k, v)| Some((k.as_str()?.to_owned(), yaml_to_json(v))))
                .collect::<IndexMap<_, _>>(),
        ),
        _ => {
            f.at().fields(errs);
            None
        }
    });
    let mut hosts = Vec::new();
    if let Some(f) = m.get("nodes")
        && let Some(items) = f.at().list(errs)
    {
        for (i, (path, v)) in items.iter().enumerate() {
            if let Some(mut h) = host(At { value: v, path }, errs) {
                h.index = i;
                hosts.push(h);
            }
        }
    }
    m.finish(errs);
    let mut labels: Vec<PoolLabel> = Vec::new();
    for h in &hosts {
        for l in &h.labels {
            if !labels.iter().any(|x| &x.name == l) {
                labels.push(static_label(l));
            }
        }
    }
    Some((
        Pool {
            name: name?,
            max_servers,
            max_cores: None,
            max_ram: None,
            max_volumes: None,
            max_volume_gb: None,
            ignore_provider_quota: false,
            availability_zones: Vec::new(),
            networks: Vec::new(),
            security_groups: Vec::new(),
            auto_floating_ip: false,
            host_key_checking: true,
            priority,
            node_attributes,
            labels,
            ready_scripts: IndexMap::new(),
        },
        hosts,
    ))
}

/// A label served by a static pool: nothing to boot.
fn static_label(name: &str) -> PoolLabel {
    PoolLabel {
        name: name.to_owned(),
        image: ImageSource::Static,
        flavor_name: None,
        min_ram: None,
        key_name: None,
        console_log: false,
        boot_from_volume: false,
        volume_size: 0,
        instance_properties: IndexMap::new(),
        dynamic_instance_properties: IndexMap::new(),
        userdata: None,
        networks: Vec::new(),
        host_key_checking: true,
    }
}

fn host(at: At<'_>, errs: &mut Errors) -> Option<StaticHost> {
    let mut m = at.fields(errs)?;
    let name = m.required_string("name", errs);
    let labels = m.required("labels", errs).and_then(|f| match f.value {
        serde_yaml::Value::String(s) => Some(s.split_whitespace().map(str::to_owned).collect()),
        _ => f.at().string_list(errs),
    });
    let labels: Option<Vec<String>> = labels.and_then(|l: Vec<String>| {
        if l.is_empty() {
            errs.push(
                &m.path_of("labels"),
                Kind::InvalidValue,
                "a static host must serve at least one label",
            );
            None
        } else {
            Some(l)
        }
    });
    let username = m.string("username", errs).unwrap_or_else(|| "zuul".into());
    let connection_type = m
        .string("connection-type", errs)
        .unwrap_or_else(|| "ssh".into());
    let connection_port = m
        .get("connection-port")
        .and_then(|f| port_number(f.at(), errs))
        .unwrap_or(22);
    let host_key_checking = m.bool("host-key-checking", errs).unwrap_or(true);
    let host_keys = m
        .get("host-key")
        .and_then(|f| match f.value {
            serde_yaml::Value::String(s) => Some(vec![s.clone()]),
            _ => f.at().string_list(errs),
        })
        .unwrap_or_default();
    let max_parallel_jobs = match m.int("max-parallel-jobs", errs) {
        Some(n) if n >= 1 => n.min(i64::from(u32::MAX)) as u32,
        Some(n) => {
            errs.push(
                &m.path_of("max-parallel-jobs"),
                Kind::InvalidValue,
                format!("must be at least 1, found {n}"),
            );
            1
        }
        None => 1,
    };
    let python_path = m
        .string("python-path", errs)
        .unwrap_or_else(|| "auto".into());
    let shell_type = m.string("shell-type", errs);
    let timeout = match m.int("timeout", errs) {
        Some(n) if n > 0 => Duration::from_secs(n as u64),
        Some(n) => {
            errs.push(
                &m.path_of("timeout"),
                Kind::InvalidValue,
                format!("must be a positive number of seconds, found {n}"),
            );
            Duration::from_secs(5)
        }
        None => Duration::from_secs(5),
    };
    m.finish(errs);
    Some(StaticHost {
        name: name?,
        labels: labels?,
        username,
        connection_type,
        connection_port,
        host_key_checking,
        host_keys,
        max_parallel_jobs,
        python_path,
        shell_type,
        timeout,
        index: 0,
    })
}

/// Cross-checks of a static provider: every host label is a top-level
/// label, and no host (name, user, port) is listed twice in the provider
/// (its nodes would be indistinguishable, as in Nodepool).
pub(crate) fn validate(
    p: &ProviderConfig,
    hosts: &StaticHosts,
    ppath: &str,
    label_names: &std::collections::HashSet<&str>,
    errs: &mut Errors,
) {
    let mut seen: HashMap<(&str, &str, u16), String> = HashMap::new();
    for (qi, pool) in p.pools.iter().enumerate() {
        let qpath = index(&join(ppath, "pools"), qi);
        for h in hosts.hosts(&pool.name) {
            let hpath = index(&join(&qpath, "nodes"), h.index);
            for (li, l) in h.labels.iter().enumerate() {
                if !label_names.contains(l.as_str()) {
                    errs.push(
                        &index(&join(&hpath, "labels"), li),
                        Kind::UnknownReference,
                        format!("unknown label {l:?} (not in the top-level `labels`)"),
                    );
                }
            }
            let name_path = join(&hpath, "name");
            if let Some(first) = seen.get(&h.identity()) {
                errs.push(
                    &name_path,
                    Kind::Duplicate,
                    format!(
                        "host {:?} (user {:?}, port {}) is already listed at {first}",
                        h.name, h.username, h.connection_port
                    ),
                );
            } else {
                seen.insert(h.identity(), name_path);
            }
        }
    }
}
