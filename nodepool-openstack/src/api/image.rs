//! Glance (image v2): create, upload data, show, list, delete.

use std::path::PathBuf;
use std::sync::Arc;

use indexmap::IndexMap;
use reqwest::Method;
use serde_json::{Value, json};

use super::{
    ApiRequest, ApiResponse, Endpoint, RequestBody, Service, next_marker, segment, str_field,
};
use crate::error::ApiError;
use crate::upload::UploadHashes;

/// Image fields that are Glance's own, not custom properties.
const CORE_FIELDS: &[&str] = &[
    "id",
    "name",
    "status",
    "visibility",
    "protected",
    "checksum",
    "os_hash_algo",
    "os_hash_value",
    "owner",
    "size",
    "virtual_size",
    "min_ram",
    "min_disk",
    "disk_format",
    "container_format",
    "created_at",
    "updated_at",
    "tags",
    "self",
    "file",
    "schema",
    "os_hidden",
    "locations",
    "direct_url",
    "stores",
];

/// An image as Glance shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Image {
    /// Id.
    pub id: String,
    /// Name.
    pub name: String,
    /// `queued`, `saving`, `active`, `killed`, `deleted`, ...
    pub status: String,
    /// MD5 of the data (`checksum`).
    pub checksum: Option<String>,
    /// `os_hash_algo` (usually sha512).
    pub hash_algo: Option<String>,
    /// `os_hash_value`.
    pub hash_value: Option<String>,
    /// Size in bytes.
    pub size: Option<u64>,
    /// Custom properties (string values).
    pub properties: IndexMap<String, String>,
}

impl Image {
    /// Reads one image object.
    pub fn from_json(v: &Value) -> Option<Image> {
        let properties = v
            .as_object()?
            .iter()
            .filter(|(k, _)| !CORE_FIELDS.contains(&k.as_str()))
            .filter_map(|(k, v)| match v {
                Value::String(s) => Some((k.clone(), s.clone())),
                Value::Null => None,
                other => Some((k.clone(), other.to_string())),
            })
            .collect();
        Some(Image {
            id: str_field(v, "id")?,
            name: str_field(v, "name").unwrap_or_default(),
            status: str_field(v, "status").unwrap_or_default(),
            checksum: str_field(v, "checksum"),
            hash_algo: str_field(v, "os_hash_algo"),
            hash_value: str_field(v, "os_hash_value"),
            size: v.get("size").and_then(Value::as_u64),
            properties,
        })
    }
}

/// `POST /v2/images`: the image record, without data.
#[derive(Clone, Debug)]
pub struct CreateImage {
    /// Name.
    pub name: String,
    /// `qcow2`, `raw`, `vhd`, ...
    pub disk_format: String,
    /// Custom properties.
    pub properties: IndexMap<String, String>,
}

impl CreateImage {
    /// The container format for a disk format: `ovf` for vhd (what
    /// Rackspace-style clouds want for VHDs), `bare` otherwise.
    pub fn container_format(&self) -> &'static str {
        if self.disk_format == "vhd" {
            "ovf"
        } else {
            "bare"
        }
    }
}

impl Endpoint for CreateImage {
    type Output = Image;

    fn request(&self) -> ApiRequest {
        let mut body = serde_json::Map::new();
        for (k, v) in &self.properties {
            body.insert(k.clone(), json!(v));
        }
        // Core fields last so that a property cannot override them.
        body.insert("name".into(), json!(self.name));
        body.insert("disk_format".into(), json!(self.disk_format));
        body.insert("container_format".into(), json!(self.container_format()));
        body.insert("visibility".into(), json!("private"));
        ApiRequest::new(Method::POST, Service::Image, "images")
            .json(Value::Object(body))
            .expect(&[201])
    }

    fn parse(&self, response: ApiResponse) -> Result<Image, ApiError> {
        Image::from_json(&response.json()?)
            .ok_or_else(|| ApiError::Decode("no image id in the create answer".into()))
    }
}

/// `PUT /v2/images/{id}/file`: the data, streamed from a file.
#[derive(Clone, Debug)]
pub struct UploadImageData {
    /// Image id.
    pub id: String,
    /// Local file.
    pub path: PathBuf,
    /// Its size.
    pub len: u64,
    /// Hashes computed on the way out.
    pub hashes: Option<Arc<UploadHashes>>,
    /// Counts the bytes sent, for progress reports.
    pub sent: Option<nodepool_model::provider::UploadProgress>,
    /// Time allowed for the transfer.
    pub timeout: std::time::Duration,
}

impl Endpoint for UploadImageData {
    type Output = ();

    fn request(&self) -> ApiRequest {
        let mut r = ApiRequest::new(
            Method::PUT,
            Service::Image,
            format!("images/{}/file", segment(&self.id)),
        )
        .expect(&[204, 201, 200]);
        r.headers
            .push(("content-type", "application/octet-stream".into()));
        r.body = RequestBody::File {
            path: self.path.clone(),
            len: self.len,
            hashes: self.hashes.clone(),
            sent: self.sent.clone(),
        };
        r.timeout = Some(self.timeout);
        r
    }

    fn parse(&self, _: ApiResponse) -> Result<(), ApiError> {
        Ok(())
    }
}

/// `GET /v2/images/{id}`.
#[derive(Clone, Debug)]
pub struct GetImage<'a>(pub &'a str);

impl Endpoint for GetImage<'_> {
    type Output = Image;

    fn request(&self) -> ApiRequest {
        ApiRequest::get(Service::Image, format!("images/{}", segment(self.0)))
    }

    fn parse(&self, response: ApiResponse) -> Result<Image, ApiError> {
        Image::from_json(&response.json()?)
            .ok_or_else(|| ApiError::Decode("no image in the answer".into()))
    }
}

/// `GET /v2/images` (one page).
#[derive(Clone, Debug, Default)]
pub struct ListImages {
    /// Start after this image id.
    pub marker: Option<String>,
    /// Only images with this name.
    pub name: Option<String>,
}

impl Endpoint for ListImages {
    type Output = (Vec<Image>, Option<String>);

    fn request(&self) -> ApiRequest {
        let mut r = ApiRequest::get(Service::Image, "images").query("limit", "1000");
        if let Some(m) = &self.marker {
            r = r.query("marker", m.clone());
        }
        if let Some(n) = &self.name {
            r = r.query("name", n.clone());
        }
        r
    }

    fn parse(&self, response: ApiResponse) -> Result<Self::Output, ApiError> {
        let v = response.json()?;
        let images = v
            .get("images")
            .and_then(Value::as_array)
            .ok_or_else(|| ApiError::Decode("no `images` in the image list".into()))?
            .iter()
            .filter_map(Image::from_json)
            .collect();
        // Glance's `next` is a bare link, not a links list.
        let next = v
            .get("next")
            .and_then(Value::as_str)
            .and_then(|href| next_marker(Some(&json!([{"rel": "next", "href": href}]))));
        Ok((images, next))
    }
}

/// `DELETE /v2/images/{id}`.
#[derive(Clone, Debug)]
pub struct DeleteImage<'a>(pub &'a str);

impl Endpoint for DeleteImage<'_> {
    type Output = ();

    fn request(&self) -> ApiRequest {
        ApiRequest::new(
            Method::DELETE,
            Service::Image,
            format!("images/{}", segment(self.0)),
        )
        .expect(&[204, 200])
    }

    fn parse(&self, _: ApiResponse) -> Result<(), ApiError> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_image_shape() {
        let c = CreateImage {
            name: "ubuntu-123".into(),
            disk_format: "vhd".into(),
            properties: [
                ("nodepool_build_id".to_owned(), "b1".to_owned()),
                ("name".to_owned(), "evil".to_owned()),
            ]
            .into_iter()
            .collect(),
        };
        let r = c.request();
        assert_eq!(r.describe(), "image POST images");
        let RequestBody::Json(b) = r.body else {
            panic!()
        };
        assert_eq!(
            b,
            json!({"nodepool_build_id": "b1", "name": "ubuntu-123", "disk_format": "vhd",
                "container_format": "ovf", "visibility": "private"})
        );
    }

    #[test]
    fn upload_streams_a_file() {
        let u = UploadImageData {
            id: "i1".into(),
            path: "/x/img.qcow2".into(),
            len: 42,
            hashes: None,
            sent: None,
            timeout: std::time::Duration::from_secs(5),
        };
        let r = u.request();
        assert_eq!(r.method, Method::PUT);
        assert_eq!(r.describe(), "image PUT images/i1/file");
        assert!(matches!(r.body, RequestBody::File { len: 42, .. }));
        assert_eq!(r.timeout, Some(std::time::Duration::from_secs(5)));
        assert!(
            r.headers
                .contains(&("content-type", "application/octet-stream".to_owned()))
        );
    }

    #[test]
    fn image_properties_exclude_core_fields() {
        let v = json!({"id": "i", "name": "n", "status": "active", "checksum": "abc",
            "os_hash_algo": "sha512", "os_hash_value": "def", "size": 5, "tags": [],
            "nodepool_build_id": "b", "min_ram": 0, "hw_disk_bus": "scsi", "kernel_id": null});
        let i = Image::from_json(&v).unwrap();
        assert_eq!(i.properties.len(), 2);
        assert_eq!(i.properties["nodepool_build_id"], "b");
        assert_eq!(i.checksum.as_deref(), Some("abc"));
        assert_eq!(i.size, Some(5));
    }

    #[test]
    fn list_next_marker() {
        let r = ApiResponse {
            status: 200,
            headers: Default::default(),
            body: serde_json::to_vec(
                &json!({"images": [{"id": "a"}], "next": "/v2/images?limit=1000&marker=a"}),
            )
            .unwrap()
            .into(),
        };
        let (imgs, next) = ListImages::default().parse(r).unwrap();
        assert_eq!(imgs.len(), 1);
        assert_eq!(next.as_deref(), Some("a"));
    }
}
