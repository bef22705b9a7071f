//! Keystone v3: issuing a token (password or application credential) and
//! reading its service catalog.

use std::time::Duration;

use nodepool_model::config::Secret;
use reqwest::Method;
use serde_json::{Value, json};

use super::{ApiRequest, ApiResponse, Endpoint, RequestBody, Target, str_field};
use crate::clouds::{Auth, DomainRef, ProjectRef, UserRef};
use crate::error::ApiError;

/// `POST /v3/auth/tokens`.
#[derive(Clone, Debug)]
pub struct Authenticate<'a> {
    /// Credentials.
    pub auth: &'a Auth,
}

/// A token, with what came with it.
#[derive(Clone, Debug)]
pub struct IssuedToken {
    /// The token (`X-Subject-Token`).
    pub token: Secret,
    /// How long it is valid, by the server's own clock (`expires_at - issued_at`).
    pub lifetime: Duration,
    /// Service catalog.
    pub catalog: Vec<CatalogEntry>,
    /// The scoped project's id.
    pub project_id: Option<String>,
}

/// One service of the catalog.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CatalogEntry {
    /// Service type (`compute`, `image`, ...).
    pub service_type: String,
    /// Endpoints.
    pub endpoints: Vec<CatalogEndpoint>,
}

/// One endpoint of a catalog service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CatalogEndpoint {
    /// `public`, `internal` or `admin`.
    pub interface: String,
    /// Region id.
    pub region: Option<String>,
    /// URL.
    pub url: String,
}

fn domain(d: &DomainRef) -> Value {
    match d {
        DomainRef::Id(id) => json!({ "id": id }),
        DomainRef::Name(n) => json!({ "name": n }),
    }
}

fn user(u: &UserRef) -> Value {
    match u {
        UserRef::Id(id) => json!({ "id": id }),
        UserRef::Name { name, domain: d } => json!({ "name": name, "domain": domain(d) }),
    }
}

impl Endpoint for Authenticate<'_> {
    type Output = IssuedToken;

    fn request(&self) -> ApiRequest {
        let body = match self.auth {
            Auth::Password {
                user: u,
                password,
                project,
                ..
            } => {
                let mut pw = user(u);
                if let Value::Object(m) = &mut pw {
                    m.insert("password".into(), json!(password.expose()));
                }
                let mut auth = json!({
                    "identity": { "methods": ["password"], "password": { "user": pw } }
                });
                if let (Some(p), Value::Object(m)) = (project, &mut auth) {
                    let project = match p {
                        ProjectRef::Id(id) => json!({ "id": id }),
                        ProjectRef::Name { name, domain: d } => {
                            json!({ "name": name, "domain": domain(d) })
                        }
                    };
                    m.insert("scope".into(), json!({ "project": project }));
                }
                json!({ "auth": auth })
            }
            Auth::ApplicationCredential {
                id,
                name,
                user: u,
                secret,
                ..
            } => {
                let mut cred = serde_json::Map::new();
                if let Some(id) = id {
                    cred.insert("id".into(), json!(id));
                } else if let Some(n) = name {
                    cred.insert("name".into(), json!(n));
                    if let Some(u) = u {
                        cred.insert("user".into(), user(u));
                    }
                }
                cred.insert("secret".into(), json!(secret.expose()));
                json!({ "auth": { "identity": {
                    "methods": ["application_credential"],
                    "application_credential": cred,
                } } })
            }
        };
        ApiRequest {
            method: Method::POST,
            target: Target::Url(format!("{}/auth/tokens", self.auth.auth_url())),
            query: Vec::new(),
            headers: Vec::new(),
            body: RequestBody::Json(body),
            expected: &[201],
            authenticated: false,
            timeout: None,
        }
    }

    fn parse(&self, response: ApiResponse) -> Result<IssuedToken, ApiError> {
        let token = response
            .header("x-subject-token")
            .ok_or_else(|| ApiError::Decode("keystone sent no X-Subject-Token".into()))?
            .to_owned();
        let v = response.json()?;
        let t = v
            .get("token")
            .ok_or_else(|| ApiError::Decode("keystone's answer has no `token`".into()))?;
        let expires = t
            .get("expires_at")
            .and_then(Value::as_str)
            .and_then(parse_iso8601)
            .ok_or_else(|| ApiError::Decode("token has no valid `expires_at`".into()))?;
        // Lifetime by the server's clock, so that a skewed local clock does
        // not make us use a token Keystone considers expired.
        let issued = t
            .get("issued_at")
            .and_then(Value::as_str)
            .and_then(parse_iso8601);
        let lifetime = match issued {
            Some(i) => expires - i,
            None => {
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_secs_f64())
                    .unwrap_or(0.0);
                expires - now
            }
        };
        let catalog = t
            .get("catalog")
            .and_then(Value::as_array)
            .map(|services| services.iter().filter_map(catalog_entry).collect())
            .unwrap_or_default();
        Ok(IssuedToken {
            token: Secret::new(token),
            lifetime: Duration::from_secs_f64(lifetime.max(0.0)),
            catalog,
            project_id: t.get("project").and_then(|p| str_field(p, "id")),
        })
    }
}

fn catalog_entry(s: &Value) -> Option<CatalogEntry> {
    Some(CatalogEntry {
        service_type: str_field(s, "type")?,
        endpoints: s
            .get("endpoints")?
            .as_array()?
            .iter()
            .filter_map(|e| {
                Some(CatalogEndpoint {
                    interface: str_field(e, "interface")?,
                    region: str_field(e, "region_id").or_else(|| str_field(e, "region")),
                    url: str_field(e, "url")?,
                })
            })
            .collect(),
    })
}

/// Seconds since the epoch of an ISO 8601 UTC timestamp as Keystone writes
/// them (`2026-05-01T12:00:00.000000Z`, also `+00:00` or no zone).
pub fn parse_iso8601(s: &str) -> Option<f64> {
    let s = s.trim();
    let (date, time) = s.split_once('T')?;
    let mut d = date.split('-');
    let y: i64 = d.next()?.parse().ok()?;
    let m: i64 = d.next()?.parse().ok()?;
    let day: i64 = d.next()?.parse().ok()?;
    let time = time
        .trim_end_matches('Z')
        .trim_end_matches("+00:00")
        .trim_end_matches("+0000");
    let mut t = time.split(':');
    let hh: i64 = t.next()?.parse().ok()?;
    let mm: i64 = t.next()?.parse().ok()?;
    let ss: f64 = t.next().unwrap_or("0").parse().ok()?;
    if !(1..=12).contains(&m) || !(1..=31).contains(&day) || hh > 23 || mm > 59 {
        return None;
    }
    // days from civil (Howard Hinnant's algorithm)
    let y = if m <= 2 { y - 1 } else { y };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some((days * 86_400 + hh * 3_600 + mm * 60) as f64 + ss)
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::header::{HeaderMap, HeaderValue};

    #[test]
    fn iso8601() {
        assert_eq!(parse_iso8601("1970-01-01T00:00:00Z"), Some(0.0));
        assert_eq!(
            parse_iso8601("2026-03-01T12:30:15.500000Z"),
            Some(1_772_368_215.5)
        );
        assert_eq!(
            parse_iso8601("2000-02-29T00:00:00+00:00"),
            Some(951_782_400.0)
        );
        assert_eq!(parse_iso8601("garbage"), None);
        assert_eq!(parse_iso8601("2020-13-01T00:00:00Z"), None);
    }

    fn pw_auth() -> Auth {
        Auth::Password {
            auth_url: "http://k:5000/v3".into(),
            user: UserRef::Name {
                name: "admin".into(),
                domain: DomainRef::Name("Default".into()),
            },
            password: Secret::new("pw"),
            project: Some(ProjectRef::Name {
                name: "admin".into(),
                domain: DomainRef::Id("default".into()),
            }),
        }
    }

    #[test]
    fn password_request_shape() {
        let auth = pw_auth();
        let r = Authenticate { auth: &auth }.request();
        assert_eq!(r.method, Method::POST);
        assert_eq!(r.target, Target::Url("http://k:5000/v3/auth/tokens".into()));
        assert!(!r.authenticated);
        assert_eq!(r.expected, &[201]);
        let RequestBody::Json(body) = r.body else {
            panic!("json body")
        };
        assert_eq!(
            body,
            json!({"auth": {
                "identity": {"methods": ["password"], "password": {"user": {
                    "name": "admin", "domain": {"name": "Default"}, "password": "pw"}}},
                "scope": {"project": {"name": "admin", "domain": {"id": "default"}}}
            }})
        );
    }

    #[test]
    fn application_credential_request_shape() {
        let auth = Auth::ApplicationCredential {
            auth_url: "http://k/v3".into(),
            id: None,
            name: Some("ci".into()),
            user: Some(UserRef::Id("u1".into())),
            secret: Secret::new("sec"),
        };
        let RequestBody::Json(body) = Authenticate { auth: &auth }.request().body else {
            panic!("json body")
        };
        assert_eq!(
            body,
            json!({"auth": {"identity": {"methods": ["application_credential"],
                "application_credential": {"name": "ci", "user": {"id": "u1"}, "secret": "sec"}}}})
        );
    }

    #[test]
    fn token_response_parsed() {
        let auth = pw_auth();
        let mut headers = HeaderMap::new();
        headers.insert("x-subject-token", HeaderValue::from_static("gAAAA-token"));
        let body = json!({"token": {
        "issued_at": "2026-01-01T00:00:00.000000Z",
        "expires_at": "2026-01-01T01:00:00.000000Z",
        "project": {"id": "p1", "name": "admin"},
        "catalog": [
            {"type": "compute", "endpoints": [
                {"interface": "public", "region_id": "RegionOne", "url": "http://n:8774/v2.1"},
                {"interface": "internal", "region": "RegionOne", "url": "http://i:8774/v2.1"}]},
            {"type": "broken"}
        ]}});
        let t = Authenticate { auth: &auth }
            .parse(ApiResponse {
                status: 201,
                headers,
                body: serde_json::to_vec(&body).unwrap().into(),
            })
            .unwrap();
        assert_eq!(t.token.expose(), "gAAAA-token");
        assert_eq!(t.lifetime, Duration::from_secs(3600));
        assert_eq!(t.project_id.as_deref(), Some("p1"));
        assert_eq!(t.catalog.len(), 1);
        assert_eq!(
            t.catalog[0].endpoints[1].region.as_deref(),
            Some("RegionOne")
        );
    }
}
