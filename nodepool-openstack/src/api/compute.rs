//! Nova (compute v2.1): flavors, servers, console output, limits.

use indexmap::IndexMap;
use reqwest::Method;
use serde_json::{Value, json};

use super::{ApiRequest, ApiResponse, Endpoint, Service, next_marker, segment, str_field};
use crate::error::ApiError;

/// The newest compute microversion this crate was written against; the
/// client asks for min(this, the cloud's maximum).
pub const MAX_MICROVERSION: (u32, u32) = (2, 96);
/// From this microversion on, servers embed their flavor (vcpus, ram).
pub const FLAVOR_EMBEDDED: (u32, u32) = (2, 47);
/// From this microversion on, `networks` is required (`auto`, `none` or a list).
pub const NETWORKS_REQUIRED: (u32, u32) = (2, 37);
/// From this microversion on, `createImage` answers with the image id in
/// its body; before, only its `Location` header (an image URL) names it.
pub const IMAGE_ID_IN_BODY: (u32, u32) = (2, 45);

/// A flavor.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Flavor {
    /// Id.
    pub id: String,
    /// Name.
    pub name: String,
    /// vCPUs.
    pub vcpus: i64,
    /// RAM in MiB.
    pub ram: i64,
    /// Root disk in GB.
    pub disk: i64,
    /// `OS-FLV-DISABLED:disabled`.
    pub disabled: bool,
}

impl nodepool_model::cloud::Flavor for Flavor {
    fn name(&self) -> &str {
        &self.name
    }
    fn id(&self) -> &str {
        &self.id
    }
    fn ram(&self) -> i64 {
        self.ram
    }
    fn disabled(&self) -> bool {
        self.disabled
    }
}

/// `GET /flavors/detail` (one page).
#[derive(Clone, Debug, Default)]
pub struct ListFlavors {
    /// Start after this flavor id.
    pub marker: Option<String>,
}

impl Endpoint for ListFlavors {
    type Output = (Vec<Flavor>, Option<String>);

    fn request(&self) -> ApiRequest {
        let mut r = ApiRequest::get(Service::Compute, "flavors/detail");
        if let Some(m) = &self.marker {
            r = r.query("marker", m.clone());
        }
        r
    }

    fn parse(&self, response: ApiResponse) -> Result<Self::Output, ApiError> {
        let v = response.json()?;
        let flavors = v
            .get("flavors")
            .and_then(Value::as_array)
            .ok_or_else(|| ApiError::Decode("no `flavors` in the flavor list".into()))?
            .iter()
            .filter_map(|f| {
                Some(Flavor {
                    id: str_field(f, "id")?,
                    name: str_field(f, "name")?,
                    vcpus: f.get("vcpus").and_then(Value::as_i64).unwrap_or(0),
                    ram: f.get("ram").and_then(Value::as_i64).unwrap_or(0),
                    disk: f.get("disk").and_then(Value::as_i64).unwrap_or(0),
                    disabled: f
                        .get("OS-FLV-DISABLED:disabled")
                        .and_then(Value::as_bool)
                        .unwrap_or(false),
                })
            })
            .collect();
        Ok((flavors, next_marker(v.get("flavors_links"))))
    }
}

/// One address of a server.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Address {
    /// Network name (the key of `addresses`).
    pub network: String,
    /// The address.
    pub addr: String,
    /// 4 or 6.
    pub version: u8,
    /// `OS-EXT-IPS:type`: `fixed` or `floating`.
    pub kind: Option<String>,
}

/// A server as Nova shows it.
#[derive(Clone, Debug, PartialEq)]
pub struct Server {
    /// Id.
    pub id: String,
    /// Name.
    pub name: String,
    /// `ACTIVE`, `BUILD`, `ERROR`, `DELETED`, ...
    pub status: String,
    /// `OS-EXT-STS:task_state`.
    pub task_state: Option<String>,
    /// Metadata.
    pub metadata: IndexMap<String, String>,
    /// Addresses, network by network.
    pub addresses: Vec<Address>,
    /// `OS-EXT-AZ:availability_zone`.
    pub availability_zone: Option<String>,
    /// `hostId`.
    pub host_id: Option<String>,
    /// Flavor id (before microversion 2.47).
    pub flavor_id: Option<String>,
    /// vCPUs and RAM of the embedded flavor (2.47 and later).
    pub flavor_size: Option<(i64, i64)>,
    /// The fault message of an ERROR server.
    pub fault: Option<String>,
    /// Number of attached volumes.
    pub volumes_attached: usize,
}

impl Server {
    /// Reads one server object.
    pub fn from_json(v: &Value) -> Option<Server> {
        let metadata = v
            .get("metadata")
            .and_then(Value::as_object)
            .map(|m| {
                m.iter()
                    .map(|(k, v)| {
                        let s = match v {
                            Value::String(s) => s.clone(),
                            other => other.to_string(),
                        };
                        (k.clone(), s)
                    })
                    .collect()
            })
            .unwrap_or_default();
        let mut addresses = Vec::new();
        if let Some(nets) = v.get("addresses").and_then(Value::as_object) {
            for (net, list) in nets {
                for a in list.as_array().into_iter().flatten() {
                    if let Some(addr) = str_field(a, "addr") {
                        addresses.push(Address {
                            network: net.clone(),
                            addr,
                            version: a.get("version").and_then(Value::as_u64).unwrap_or(4) as u8,
                            kind: str_field(a, "OS-EXT-IPS:type"),
                        });
                    }
                }
            }
        }
        let flavor = v.get("flavor");
        let flavor_size = flavor.and_then(|f| {
            Some((
                f.get("vcpus").and_then(Value::as_i64)?,
                f.get("ram").and_then(Value::as_i64)?,
            ))
        });
        Some(Server {
            id: str_field(v, "id")?,
            name: str_field(v, "name").unwrap_or_default(),
            status: str_field(v, "status").unwrap_or_default(),
            task_state: str_field(v, "OS-EXT-STS:task_state"),
            metadata,
            addresses,
            availability_zone: str_field(v, "OS-EXT-AZ:availability_zone")
                .filter(|s| !s.is_empty()),
            host_id: str_field(v, "hostId").filter(|s| !s.is_empty()),
            flavor_id: flavor.and_then(|f| str_field(f, "id")),
            flavor_size,
            fault: v
                .get("fault")
                .and_then(|f| str_field(f, "message"))
                .filter(|s| !s.is_empty()),
            volumes_attached: v
                .get("os-extended-volumes:volumes_attached")
                .and_then(Value::as_array)
                .map_or(0, Vec::len),
        })
    }
}

/// `GET /servers/detail` (one page of the project's servers).
#[derive(Clone, Debug, Default)]
pub struct ListServers {
    /// Start after this server id.
    pub marker: Option<String>,
}

impl Endpoint for ListServers {
    type Output = (Vec<Server>, Option<String>);

    fn request(&self) -> ApiRequest {
        let mut r = ApiRequest::get(Service::Compute, "servers/detail");
        if let Some(m) = &self.marker {
            r = r.query("marker", m.clone());
        }
        r
    }

    fn parse(&self, response: ApiResponse) -> Result<Self::Output, ApiError> {
        let v = response.json()?;
        let servers = v
            .get("servers")
            .and_then(Value::as_array)
            .ok_or_else(|| ApiError::Decode("no `servers` in the server list".into()))?
            .iter()
            .filter_map(Server::from_json)
            .collect();
        Ok((servers, next_marker(v.get("servers_links"))))
    }
}

/// `GET /servers/{id}`.
#[derive(Clone, Debug)]
pub struct GetServer<'a>(pub &'a str);

impl Endpoint for GetServer<'_> {
    type Output = Server;

    fn request(&self) -> ApiRequest {
        ApiRequest::get(Service::Compute, format!("servers/{}", segment(self.0)))
    }

    fn parse(&self, response: ApiResponse) -> Result<Server, ApiError> {
        let v = response.json()?;
        v.get("server")
            .and_then(Server::from_json)
            .ok_or_else(|| ApiError::Decode("no `server` in the answer".into()))
    }
}

/// `DELETE /servers/{id}`.
#[derive(Clone, Debug)]
pub struct DeleteServer<'a>(pub &'a str);

impl Endpoint for DeleteServer<'_> {
    type Output = ();

    fn request(&self) -> ApiRequest {
        ApiRequest::new(
            Method::DELETE,
            Service::Compute,
            format!("servers/{}", segment(self.0)),
        )
        .expect(&[204, 202])
    }

    fn parse(&self, _: ApiResponse) -> Result<(), ApiError> {
        Ok(())
    }
}

/// How the server boots from a volume.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BootVolume {
    /// Volume size in GB.
    pub size_gb: i64,
}

/// Networks of a new server.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Networks {
    /// Leave it to Nova (`auto` from 2.37 on, nothing before).
    Auto,
    /// These network ids.
    Ids(Vec<String>),
}

/// `POST /servers`.
#[derive(Clone, Debug, PartialEq)]
pub struct CreateServer {
    /// Name.
    pub name: String,
    /// Flavor id.
    pub flavor_id: String,
    /// Image id.
    pub image_id: String,
    /// Boot from a new volume made from the image instead.
    pub boot_volume: Option<BootVolume>,
    /// Metadata (already within Nova's limits).
    pub metadata: IndexMap<String, String>,
    /// Networks.
    pub networks: Networks,
    /// Security group names.
    pub security_groups: Vec<String>,
    /// Key pair.
    pub key_name: Option<String>,
    /// Availability zone.
    pub availability_zone: Option<String>,
    /// Config drive.
    pub config_drive: Option<bool>,
    /// User data (sent base64-encoded).
    pub user_data: Option<String>,
    /// The microversion the call is made with.
    pub microversion: (u32, u32),
}

impl Endpoint for CreateServer {
    type Output = String;

    fn request(&self) -> ApiRequest {
        let mut s = serde_json::Map::new();
        s.insert("name".into(), json!(self.name));
        s.insert("flavorRef".into(), json!(self.flavor_id));
        s.insert("min_count".into(), json!(1));
        s.insert("max_count".into(), json!(1));
        match &self.boot_volume {
            None => {
                s.insert("imageRef".into(), json!(self.image_id));
            }
            Some(v) => {
                s.insert("imageRef".into(), json!(""));
                s.insert(
                    "block_device_mapping_v2".into(),
                    json!([{
                        "boot_index": 0,
                        "uuid": self.image_id,
                        "source_type": "image",
                        "destination_type": "volume",
                        "volume_size": v.size_gb,
                        "delete_on_termination": true,
                    }]),
                );
            }
        }
        s.insert("metadata".into(), json!(self.metadata));
        match &self.networks {
            Networks::Ids(ids) if !ids.is_empty() => {
                let list: Vec<Value> = ids.iter().map(|id| json!({ "uuid": id })).collect();
                s.insert("networks".into(), Value::Array(list));
            }
            _ if self.microversion >= NETWORKS_REQUIRED => {
                s.insert("networks".into(), json!("auto"));
            }
            _ => {}
        }
        if !self.security_groups.is_empty() {
            let list: Vec<Value> = self
                .security_groups
                .iter()
                .map(|g| json!({ "name": g }))
                .collect();
            s.insert("security_groups".into(), Value::Array(list));
        }
        if let Some(k) = &self.key_name {
            s.insert("key_name".into(), json!(k));
        }
        if let Some(az) = &self.availability_zone {
            s.insert("availability_zone".into(), json!(az));
        }
        if let Some(cd) = self.config_drive {
            s.insert("config_drive".into(), json!(cd));
        }
        if let Some(u) = &self.user_data {
            s.insert("user_data".into(), json!(base64(u.as_bytes())));
        }
        ApiRequest::new(Method::POST, Service::Compute, "servers")
            .json(json!({ "server": s }))
            .expect(&[202, 200])
    }

    fn parse(&self, response: ApiResponse) -> Result<String, ApiError> {
        // Only the id is read: the answer also holds adminPass, which must
        // not end up anywhere.
        let v = response.json()?;
        v.get("server")
            .and_then(|s| str_field(s, "id"))
            .ok_or_else(|| ApiError::Decode("no server id in the create answer".into()))
    }
}

/// `POST /servers/{id}/action` `createImage`: snapshots the server into a
/// new Glance image (created `queued` at once; the compute host uploads the
/// data and Glance makes it `active` later). Answers the image id.
#[derive(Clone, Debug)]
pub struct CreateServerImage<'a> {
    /// The server.
    pub server_id: &'a str,
    /// Image name.
    pub name: String,
    /// Image properties (Nova's "metadata" of the action).
    pub metadata: IndexMap<String, String>,
    /// The microversion the call is made with.
    pub microversion: (u32, u32),
}

impl Endpoint for CreateServerImage<'_> {
    type Output = String;

    fn request(&self) -> ApiRequest {
        ApiRequest::new(
            Method::POST,
            Service::Compute,
            format!("servers/{}/action", segment(self.server_id)),
        )
        .json(json!({ "createImage": { "name": self.name, "metadata": self.metadata } }))
        .expect(&[202, 200])
    }

    fn parse(&self, response: ApiResponse) -> Result<String, ApiError> {
        if self.microversion >= IMAGE_ID_IN_BODY
            && let Some(id) = response.json()?.get("image_id").and_then(Value::as_str)
        {
            return Ok(id.to_owned());
        }
        // Before 2.45: `Location: http://glance/v2/images/{id}`.
        response
            .header("location")
            .and_then(|l| l.trim_end_matches('/').rsplit('/').next())
            .filter(|id| !id.is_empty())
            .map(str::to_owned)
            .ok_or_else(|| {
                ApiError::Decode(format!(
                    "createImage of server {}: no image id in the answer (microversion {}.{})",
                    self.server_id, self.microversion.0, self.microversion.1
                ))
            })
    }
}

/// `POST /servers/{id}/action` `os-getConsoleOutput`.
#[derive(Clone, Debug)]
pub struct ConsoleOutput<'a>(pub &'a str);

impl Endpoint for ConsoleOutput<'_> {
    type Output = String;

    fn request(&self) -> ApiRequest {
        ApiRequest::new(
            Method::POST,
            Service::Compute,
            format!("servers/{}/action", segment(self.0)),
        )
        .json(json!({ "os-getConsoleOutput": {} }))
    }

    fn parse(&self, response: ApiResponse) -> Result<String, ApiError> {
        let v = response.json()?;
        Ok(str_field(&v, "output").unwrap_or_default())
    }
}

/// Absolute limits (`-1` = unlimited is kept as `None`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AbsoluteLimits {
    /// `maxTotalInstances`.
    pub instances: Option<i64>,
    /// `maxTotalCores`.
    pub cores: Option<i64>,
    /// `maxTotalRAMSize` (MiB).
    pub ram: Option<i64>,
    /// `totalInstancesUsed`.
    pub instances_used: Option<i64>,
    /// `totalCoresUsed`.
    pub cores_used: Option<i64>,
    /// `totalRAMUsed`.
    pub ram_used: Option<i64>,
}

/// `GET /limits`.
#[derive(Clone, Debug, Default)]
pub struct GetLimits;

fn limit(abs: &Value, key: &str) -> Option<i64> {
    abs.get(key).and_then(Value::as_i64).filter(|v| *v >= 0)
}

impl Endpoint for GetLimits {
    type Output = AbsoluteLimits;

    fn request(&self) -> ApiRequest {
        ApiRequest::get(Service::Compute, "limits")
    }

    fn parse(&self, response: ApiResponse) -> Result<AbsoluteLimits, ApiError> {
        let v = response.json()?;
        let abs = v
            .get("limits")
            .and_then(|l| l.get("absolute"))
            .ok_or_else(|| ApiError::Decode("no `limits.absolute` in the answer".into()))?;
        Ok(AbsoluteLimits {
            instances: limit(abs, "maxTotalInstances"),
            cores: limit(abs, "maxTotalCores"),
            ram: limit(abs, "maxTotalRAMSize"),
            instances_used: limit(abs, "totalInstancesUsed"),
            cores_used: limit(abs, "totalCoresUsed"),
            ram_used: limit(abs, "totalRAMUsed"),
        })
    }
}

/// Standard base64 (RFC 4648, with padding), for Nova's `user_data`.
pub fn base64(data: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for c in data.chunks(3) {
        let b = [c[0], *c.get(1).unwrap_or(&0), *c.get(2).unwrap_or(&0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= c.len() {
                out.push(T[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Parses `2.96` into `(2, 96)`.
pub fn parse_microversion(s: &str) -> Option<(u32, u32)> {
    let (a, b) = s.trim().split_once('.')?;
    Some((a.parse().ok()?, b.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::RequestBody;

    #[test]
    fn base64_matches_rfc4648_vectors() {
        for (i, o) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(i.as_bytes()), o);
        }
    }

    fn create() -> CreateServer {
        CreateServer {
            name: "np0000000001".into(),
            flavor_id: "f1".into(),
            image_id: "img".into(),
            boot_volume: None,
            metadata: [("nodepool_node_id".to_owned(), "0000000001".to_owned())]
                .into_iter()
                .collect(),
            networks: Networks::Ids(vec!["n1".into()]),
            security_groups: vec!["default".into()],
            key_name: Some("k".into()),
            availability_zone: Some("nova".into()),
            config_drive: Some(true),
            user_data: Some("#cloud-config\n".into()),
            microversion: (2, 96),
        }
    }

    fn body(r: ApiRequest) -> Value {
        match r.body {
            RequestBody::Json(v) => v,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn create_server_shape() {
        let r = create().request();
        assert_eq!(r.method, Method::POST);
        assert_eq!(r.describe(), "compute POST servers");
        assert_eq!(
            body(r),
            json!({"server": {
                "name": "np0000000001", "flavorRef": "f1", "min_count": 1, "max_count": 1,
                "imageRef": "img", "metadata": {"nodepool_node_id": "0000000001"},
                "networks": [{"uuid": "n1"}], "security_groups": [{"name": "default"}],
                "key_name": "k", "availability_zone": "nova", "config_drive": true,
                "user_data": "I2Nsb3VkLWNvbmZpZwo="
            }})
        );
    }

    #[test]
    fn create_server_boot_from_volume_and_auto_networks() {
        let mut c = create();
        c.boot_volume = Some(BootVolume { size_gb: 50 });
        c.networks = Networks::Auto;
        let b = body(c.request());
        assert_eq!(b["server"]["imageRef"], json!(""));
        assert_eq!(
            b["server"]["block_device_mapping_v2"],
            json!([{"boot_index": 0, "uuid": "img", "source_type": "image",
                "destination_type": "volume", "volume_size": 50, "delete_on_termination": true}])
        );
        assert_eq!(b["server"]["networks"], json!("auto"));
        c.microversion = (2, 1);
        assert!(body(c.request())["server"].get("networks").is_none());
    }

    #[test]
    fn server_parsed() {
        let v = json!({
            "id": "s1", "name": "np1", "status": "ERROR", "OS-EXT-STS:task_state": null,
            "metadata": {"a": "b"},
            "addresses": {"private": [
                {"addr": "10.0.0.5", "version": 4, "OS-EXT-IPS:type": "fixed"},
                {"addr": "203.0.113.9", "version": 4, "OS-EXT-IPS:type": "floating"}]},
            "OS-EXT-AZ:availability_zone": "nova", "hostId": "",
            "flavor": {"vcpus": 2, "ram": 128, "original_name": "np.small"},
            "fault": {"message": "Quota exceeded", "code": 500},
            "os-extended-volumes:volumes_attached": [{"id": "v"}]
        });
        let s = Server::from_json(&v).unwrap();
        assert_eq!(s.addresses.len(), 2);
        assert_eq!(s.addresses[1].kind.as_deref(), Some("floating"));
        assert_eq!(s.host_id, None);
        assert_eq!(s.flavor_size, Some((2, 128)));
        assert_eq!(s.fault.as_deref(), Some("Quota exceeded"));
        assert_eq!(s.volumes_attached, 1);
    }

    #[test]
    fn limits_parsed_with_unlimited() {
        let r = ApiResponse {
            status: 200,
            headers: Default::default(),
            body: serde_json::to_vec(&json!({"limits": {"absolute": {
                "maxTotalInstances": 10, "maxTotalCores": -1, "maxTotalRAMSize": 51200,
                "totalInstancesUsed": 2}}}))
            .unwrap()
            .into(),
        };
        let l = GetLimits.parse(r).unwrap();
        assert_eq!(l.instances, Some(10));
        assert_eq!(l.cores, None);
        assert_eq!(l.ram, Some(51200));
        assert_eq!(l.instances_used, Some(2));
    }

    fn answer(body: Value, location: Option<&str>) -> ApiResponse {
        let mut headers = reqwest::header::HeaderMap::new();
        if let Some(l) = location {
            headers.insert("location", l.parse().unwrap());
        }
        ApiResponse {
            status: 202,
            headers,
            body: if body.is_null() {
                Default::default()
            } else {
                serde_json::to_vec(&body).unwrap().into()
            },
        }
    }

    #[test]
    fn create_server_image_shape_and_answers() {
        let c = CreateServerImage {
            server_id: "s 1",
            name: "snap".into(),
            metadata: [("nodepool_build_id".to_owned(), "b1".to_owned())]
                .into_iter()
                .collect(),
            microversion: (2, 96),
        };
        let r = c.request();
        assert_eq!(r.describe(), "compute POST servers/s%201/action");
        assert_eq!(
            body(r),
            json!({"createImage": {"name": "snap", "metadata": {"nodepool_build_id": "b1"}}})
        );
        // 2.45 and later: the id is in the body
        assert_eq!(
            c.parse(answer(json!({"image_id": "i1"}), None)).unwrap(),
            "i1"
        );
        // before: only the Location header names it (and the body is empty)
        let old = CreateServerImage {
            microversion: (2, 1),
            ..c.clone()
        };
        assert_eq!(
            old.parse(answer(Value::Null, Some("http://g:9292/v2/images/i2")))
                .unwrap(),
            "i2"
        );
        let e = old
            .parse(answer(Value::Null, None))
            .unwrap_err()
            .to_string();
        assert!(e.contains("no image id") && e.contains("2.1"), "{e}");
    }

    #[test]
    fn microversions() {
        assert_eq!(parse_microversion("2.100"), Some((2, 100)));
        assert!((2, 100) > MAX_MICROVERSION);
        assert_eq!(parse_microversion("x"), None);
    }
}
