//! The OpenStack endpoints as values (no IO here).
//!
//! Each endpoint is a small struct implementing [`Endpoint`]: it builds an
//! [`ApiRequest`] (method, service, path, query, body, expected statuses)
//! and parses an [`ApiResponse`]. The [`Client`](crate::Client) is the one
//! place that sends them. So the request and response shapes are unit-tested
//! here without a network, and every call gets the same token handling,
//! rate limit, timeouts, retries and error mapping.

pub mod compute;
pub mod identity;
pub mod image;
pub mod network;

use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;
use reqwest::Method;
use reqwest::header::HeaderMap;
use serde_json::Value;

use crate::error::ApiError;
use crate::upload::UploadHashes;

/// The OpenStack services this crate talks to (catalog service types).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Service {
    /// Keystone (`identity`).
    Identity,
    /// Nova (`compute`).
    Compute,
    /// Glance (`image`).
    Image,
    /// Neutron (`network`).
    Network,
    /// Cinder (`block-storage`, `volumev3`, `volumev2`, `volume`).
    BlockStorage,
}

impl Service {
    /// The catalog service types that name this service, preferred first.
    pub fn catalog_types(self) -> &'static [&'static str] {
        match self {
            Service::Identity => &["identity"],
            Service::Compute => &["compute"],
            Service::Image => &["image"],
            Service::Network => &["network"],
            Service::BlockStorage => &["block-storage", "volumev3", "volumev2", "volume"],
        }
    }

    /// The canonical service type (for config keys and messages).
    pub fn name(self) -> &'static str {
        self.catalog_types()[0]
    }
}

/// Where a request goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// A path below the service's versioned endpoint (`servers/detail`).
    Service(Service, String),
    /// An absolute URL (Keystone's auth URL, version documents, `next` links).
    Url(String),
}

/// A request body.
#[derive(Clone)]
pub enum RequestBody {
    /// No body.
    Empty,
    /// A JSON document.
    Json(Value),
    /// A file, streamed from disk in fixed-size chunks (image uploads):
    /// memory use does not depend on its size. Reopened on every attempt,
    /// so a retried upload sends the whole file again.
    File {
        /// The file.
        path: PathBuf,
        /// Its size (sent as Content-Length).
        len: u64,
        /// Hashes computed while the bytes go out, reset on every attempt.
        hashes: Option<Arc<UploadHashes>>,
        /// Counts the bytes handed to the connection, reset on every attempt.
        sent: Option<nodepool_model::provider::UploadProgress>,
    },
}

/// A request, fully described, not yet sent. Its `Debug` shows neither
/// header values nor JSON bodies (they carry tokens and passwords).
#[derive(Clone)]
pub struct ApiRequest {
    /// HTTP method.
    pub method: Method,
    /// Service and path, or URL.
    pub target: Target,
    /// Query parameters.
    pub query: Vec<(String, String)>,
    /// Extra headers (the token and microversion are added by the client).
    pub headers: Vec<(&'static str, String)>,
    /// Body.
    pub body: RequestBody,
    /// Statuses that mean success; anything else is an error.
    pub expected: &'static [u16],
    /// Whether the request needs a token (false only for authentication).
    pub authenticated: bool,
    /// A longer per-call timeout than the default (uploads).
    pub timeout: Option<std::time::Duration>,
}

impl std::fmt::Debug for RequestBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RequestBody::Empty => f.write_str("Empty"),
            RequestBody::Json(_) => f.write_str("Json(<not shown>)"),
            RequestBody::File { path, len, .. } => {
                write!(f, "File({}, {len} bytes)", path.display())
            }
        }
    }
}

impl std::fmt::Debug for ApiRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiRequest")
            .field("call", &self.describe())
            .field("query", &self.query)
            .field(
                "headers",
                &self.headers.iter().map(|(k, _)| *k).collect::<Vec<_>>(),
            )
            .field("body", &self.body)
            .field("expected", &self.expected)
            .finish()
    }
}

impl ApiRequest {
    /// A request to a service path with no body.
    pub fn new(method: Method, service: Service, path: impl Into<String>) -> Self {
        ApiRequest {
            method,
            target: Target::Service(service, path.into()),
            query: Vec::new(),
            headers: Vec::new(),
            body: RequestBody::Empty,
            expected: &[200],
            authenticated: true,
            timeout: None,
        }
    }

    /// `GET service/path`.
    pub fn get(service: Service, path: impl Into<String>) -> Self {
        ApiRequest::new(Method::GET, service, path)
    }

    /// Adds a query parameter.
    pub fn query(mut self, k: &str, v: impl Into<String>) -> Self {
        self.query.push((k.to_owned(), v.into()));
        self
    }

    /// Sets a JSON body.
    pub fn json(mut self, body: Value) -> Self {
        self.body = RequestBody::Json(body);
        self
    }

    /// Sets the statuses that mean success.
    pub fn expect(mut self, statuses: &'static [u16]) -> Self {
        self.expected = statuses;
        self
    }

    /// A short description for messages: `compute GET servers/detail`.
    pub fn describe(&self) -> String {
        match &self.target {
            Target::Service(s, p) => format!("{} {} {}", s.name(), self.method, p),
            Target::Url(u) => format!("{} {}", self.method, strip_query(u)),
        }
    }
}

fn strip_query(u: &str) -> &str {
    u.split('?').next().unwrap_or(u)
}

/// A response as the client received it.
#[derive(Clone, Debug)]
pub struct ApiResponse {
    /// HTTP status.
    pub status: u16,
    /// Headers.
    pub headers: HeaderMap,
    /// Body.
    pub body: Bytes,
}

impl ApiResponse {
    /// The body as JSON.
    pub fn json(&self) -> Result<Value, ApiError> {
        serde_json::from_slice(&self.body)
            .map_err(|e| ApiError::Decode(format!("response is not JSON: {e}")))
    }

    /// The body as a typed value.
    pub fn parse<T: serde::de::DeserializeOwned>(&self) -> Result<T, ApiError> {
        serde_json::from_slice(&self.body)
            .map_err(|e| ApiError::Decode(format!("unexpected response: {e}")))
    }

    /// A header as a string.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// One API call: how to ask, and how to read the answer.
pub trait Endpoint {
    /// What a successful call returns.
    type Output;

    /// The request to send.
    fn request(&self) -> ApiRequest;

    /// Reads a response whose status was one of the expected ones.
    fn parse(&self, response: ApiResponse) -> Result<Self::Output, ApiError>;
}

/// Any request, answered with the raw response (tests and one-off calls).
#[derive(Clone, Debug)]
pub struct Raw(pub ApiRequest);

impl Endpoint for Raw {
    type Output = ApiResponse;

    fn request(&self) -> ApiRequest {
        self.0.clone()
    }

    fn parse(&self, response: ApiResponse) -> Result<ApiResponse, ApiError> {
        Ok(response)
    }
}

/// Percent-encodes one path segment (ids and names put into paths).
pub fn segment(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes())
        .collect::<String>()
        .replace('+', "%20")
}

/// The `marker` of a paginated list's `next` link, if there is one.
pub(crate) fn next_marker(links: Option<&Value>) -> Option<String> {
    let href = links?
        .as_array()?
        .iter()
        .find(|l| l.get("rel").and_then(Value::as_str) == Some("next"))?
        .get("href")?
        .as_str()?;
    let parsed = url::Url::parse(href)
        .or_else(|_| url::Url::parse("http://x/").and_then(|b| b.join(href)))
        .ok()?;
    parsed
        .query_pairs()
        .find(|(k, _)| k == "marker")
        .map(|(_, v)| v.into_owned())
}

/// A JSON string field, or `None`.
pub(crate) fn str_field(v: &Value, key: &str) -> Option<String> {
    v.get(key).and_then(Value::as_str).map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markers_and_segments() {
        let links = serde_json::json!([
            {"rel": "self", "href": "http://x/servers"},
            {"rel": "next", "href": "http://x/v2.1/servers/detail?limit=2&marker=abc-1"}
        ]);
        assert_eq!(next_marker(Some(&links)).as_deref(), Some("abc-1"));
        assert_eq!(next_marker(None), None);
        let rel = serde_json::json!([{"rel": "next", "href": "/v2/images?marker=i2"}]);
        assert_eq!(next_marker(Some(&rel)).as_deref(), Some("i2"));
        assert_eq!(segment("a b/c"), "a%20b%2Fc");
    }

    #[test]
    fn describe_never_shows_query() {
        let r = ApiRequest {
            target: Target::Url("http://k/v3/auth/tokens?nocatalog".into()),
            ..ApiRequest::get(Service::Identity, "")
        };
        assert_eq!(r.describe(), "GET http://k/v3/auth/tokens");
        assert_eq!(
            ApiRequest::get(Service::Compute, "servers/detail").describe(),
            "compute GET servers/detail"
        );
    }
}
