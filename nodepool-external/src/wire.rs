//! The protocol's JSON shapes, to and from the model's types.

use indexmap::IndexMap;
use nodepool_model::config::{ImageSource, PoolLabel};
use nodepool_model::model::{Limits, Resources};
use nodepool_model::provider::{
    CloudImageInfo, CloudResource, ImageRef, ImageUploadSpec, Instance, InstanceSpec,
    InstanceStatus, ProviderError, ResourceKind,
};
use serde_json::{Map, Value, json};

/// The error of an answer with `ok: false`, by its `error.kind`.
pub(crate) fn refusal(provider: &str, op: &str, answer: &Value) -> ProviderError {
    let kind = answer
        .get("error")
        .and_then(|e| e.get("kind"))
        .and_then(Value::as_str)
        .unwrap_or("other");
    let message = format!(
        "external provider {provider}, op {op}: {}",
        crate::program::error_message(answer)
    );
    match kind {
        "quota" => ProviderError::QuotaExceeded(message),
        "not_found" => ProviderError::NotFound(message),
        "invalid" => ProviderError::InvalidRequest(message),
        "transient" => ProviderError::Transient(message),
        "unauthenticated" => ProviderError::Unauthenticated(message),
        "unsupported" => ProviderError::Unsupported(message),
        _ => ProviderError::Other(message),
    }
}

/// A pool label as the program sees it.
pub(crate) fn label(l: &PoolLabel) -> Value {
    let (diskimage, cloud_image) = match &l.image {
        ImageSource::DiskImage(d) => (Some(d), None),
        ImageSource::CloudImage(c) => (None, Some(c)),
        // Only static pools have these; an external provider has none.
        ImageSource::Static => (None, None),
    };
    json!({
        "name": l.name,
        "diskimage": diskimage,
        "cloud_image": cloud_image,
        "flavor_name": l.flavor_name,
        "min_ram": l.min_ram,
        "key_name": l.key_name,
        "boot_from_volume": l.boot_from_volume,
        "volume_size": l.volume_size,
        "userdata": l.userdata,
        "networks": l.networks,
    })
}

/// A server create request.
pub(crate) fn spec(s: &InstanceSpec) -> Value {
    let image = match &s.image {
        ImageRef::Uploaded { external_id } => json!({"uploaded": external_id}),
        ImageRef::Cloud { id, name } => json!({"cloud": {"id": id, "name": name}}),
    };
    json!({
        "name": s.name,
        "node_id": s.node_id,
        "provider": s.provider,
        "pool": s.pool,
        "label": label(&s.label),
        "image": image,
        "availability_zone": s.availability_zone,
        "security_groups": s.security_groups,
        "config_drive": s.config_drive,
        "auto_floating_ip": s.auto_floating_ip,
        "metadata": s.metadata,
    })
}

/// An upload request.
pub(crate) fn upload(s: &ImageUploadSpec) -> Value {
    json!({
        "name": s.name,
        "path": s.path,
        "format": s.format,
        "properties": s.properties,
        "md5": s.md5,
        "sha256": s.sha256,
    })
}

/// The protocol's name of a leak-cleanup resource kind.
pub(crate) fn kind_name(kind: ResourceKind) -> &'static str {
    match kind {
        ResourceKind::FloatingIp => "floating_ip",
        ResourceKind::Port => "port",
    }
}

fn object(v: &Value) -> Result<&Map<String, Value>, String> {
    v.as_object()
        .ok_or_else(|| format!("expected an object, found {v}"))
}

/// A required string member.
pub(crate) fn string_field(v: &Value, key: &str) -> Result<String, String> {
    object(v)?
        .get(key)
        .and_then(Value::as_str)
        .map(str::to_owned)
        .ok_or_else(|| format!("`{key}` must be a string in {v}"))
}

fn opt_string(o: &Map<String, Value>, key: &str) -> Result<Option<String>, String> {
    match o.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(other) => Err(format!("`{key}` must be a string, found {other}")),
    }
}

fn string_map(o: &Map<String, Value>, key: &str) -> Result<IndexMap<String, String>, String> {
    match o.get(key) {
        None | Some(Value::Null) => Ok(IndexMap::new()),
        Some(Value::Object(m)) => m
            .iter()
            .map(|(k, v)| match v {
                Value::String(s) => Ok((k.clone(), s.clone())),
                other => Err(format!("`{key}.{k}` must be a string, found {other}")),
            })
            .collect(),
        Some(other) => Err(format!("`{key}` must be an object, found {other}")),
    }
}

fn amounts(v: &Value) -> Result<Vec<(String, i64)>, String> {
    object(v)?
        .iter()
        .map(|(k, n)| {
            n.as_i64()
                .map(|n| (k.clone(), n))
                .ok_or_else(|| format!("`{k}` must be an integer, found {n}"))
        })
        .collect()
}

/// `{"instances": 10, "cores": 40}`: absent names are unlimited.
pub(crate) fn limits(v: &Value) -> Result<Limits, String> {
    let mut l = Limits::unlimited();
    for (k, n) in amounts(v)? {
        l.set(&k, n);
    }
    Ok(l)
}

/// `{"instances": 1, "cores": 2, "ram": 2048}`.
pub(crate) fn resources(v: &Value) -> Result<Resources, String> {
    let mut r = Resources::new();
    for (k, n) in amounts(v)? {
        r.set(&k, n);
    }
    Ok(r)
}

/// A list whose items decode with `item`.
pub(crate) fn list<T>(
    v: &Value,
    item: impl Fn(&Value) -> Result<T, String>,
) -> Result<Vec<T>, String> {
    v.as_array()
        .ok_or_else(|| format!("expected a list, found {v}"))?
        .iter()
        .map(item)
        .collect()
}

/// A server.
pub(crate) fn instance(v: &Value) -> Result<Instance, String> {
    let o = object(v)?;
    let status = match string_field(v, "status")?.as_str() {
        "building" => InstanceStatus::Building,
        "active" => InstanceStatus::Active,
        "error" => InstanceStatus::Error(
            opt_string(o, "fault")?.unwrap_or_else(|| "the server failed".into()),
        ),
        "deleting" => InstanceStatus::Deleting,
        other => InstanceStatus::Other(other.to_owned()),
    };
    let resources = match o.get("resources") {
        None | Some(Value::Null) => None,
        Some(r) => Some(resources(r)?),
    };
    Ok(Instance {
        external_id: string_field(v, "id")?,
        name: string_field(v, "name")?,
        status,
        metadata: string_map(o, "metadata")?,
        public_ipv4: opt_string(o, "public_ipv4")?,
        private_ipv4: opt_string(o, "private_ipv4")?,
        public_ipv6: opt_string(o, "public_ipv6")?,
        interface_ip: opt_string(o, "interface_ip")?,
        az: opt_string(o, "az")?,
        region: opt_string(o, "region")?,
        cloud: opt_string(o, "cloud")?,
        host_id: opt_string(o, "host_id")?,
        resources,
    })
}

/// An image.
pub(crate) fn image(v: &Value) -> Result<CloudImageInfo, String> {
    let o = object(v)?;
    Ok(CloudImageInfo {
        id: string_field(v, "id")?,
        name: string_field(v, "name")?,
        status: string_field(v, "status")?,
        properties: string_map(o, "properties")?,
    })
}

/// A floating IP or port.
pub(crate) fn resource(kind: ResourceKind, v: &Value) -> Result<CloudResource, String> {
    let o = object(v)?;
    Ok(CloudResource {
        kind,
        id: string_field(v, "id")?,
        status: opt_string(o, "status")?.unwrap_or_default(),
        attached: o.get("attached").and_then(Value::as_bool).unwrap_or(false),
        device_owner: opt_string(o, "device_owner")?,
    })
}
