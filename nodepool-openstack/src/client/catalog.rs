//! Picking a service's endpoint from the catalog, and reading version
//! documents (endpoint version discovery, compute microversions). Pure.

use serde_json::Value;

use crate::api::Service;
use crate::api::compute::{MAX_MICROVERSION, parse_microversion};
use crate::api::identity::CatalogEntry;
use crate::error::ApiError;

/// The catalog URL of a service for an interface and region.
pub fn select(
    catalog: &[CatalogEntry],
    service: Service,
    interface: &str,
    region: Option<&str>,
    cloud: &str,
) -> Result<String, ApiError> {
    let want = interface.trim_end_matches("URL");
    let mut seen_regions = Vec::new();
    for t in service.catalog_types() {
        let Some(entry) = catalog.iter().find(|e| e.service_type == *t) else {
            continue;
        };
        for e in &entry.endpoints {
            if e.interface.trim_end_matches("URL") != want {
                continue;
            }
            match (region, &e.region) {
                (Some(r), Some(er)) if r != er => seen_regions.push(er.clone()),
                _ => return Ok(e.url.clone()),
            }
        }
    }
    let region_text = region.map_or(String::new(), |r| format!(" in region {r}"));
    let extra = if seen_regions.is_empty() {
        String::new()
    } else {
        seen_regions.sort();
        seen_regions.dedup();
        format!(" (it has regions {})", seen_regions.join(", "))
    };
    Err(ApiError::NoEndpoint(format!(
        "cloud {cloud}: the catalog has no {want} {} endpoint{region_text}{extra}",
        service.name()
    )))
}

/// A service endpoint after version discovery.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Resolved {
    /// Versioned base URL, without a trailing slash.
    pub url: String,
    /// Compute microversion to send (`None`: send none, i.e. 2.1).
    pub microversion: Option<(u32, u32)>,
}

/// The version a service's URL must end in, and the id prefix in version
/// documents.
fn version_for(service: Service) -> Option<(&'static str, &'static str)> {
    match service {
        Service::Image => Some(("/v2", "v2")),
        Service::Network => Some(("/v2.0", "v2.0")),
        Service::Compute => Some(("/v2.1", "v2.1")),
        Service::Identity | Service::BlockStorage => None,
    }
}

/// Whether the catalog URL already names the version this crate speaks, so
/// no discovery call is needed.
pub fn is_versioned(service: Service, url: &str) -> bool {
    let path = url
        .split("://")
        .nth(1)
        .and_then(|rest| rest.find('/').map(|i| &rest[i..]))
        .unwrap_or("");
    match version_for(service) {
        None => true,
        Some((suffix, _)) => path
            .trim_end_matches('/')
            .split('/')
            .any(|seg| format!("/{seg}").starts_with(suffix)),
    }
}

/// Reads the answer to `GET <catalog url>` (a version document or a list
/// of versions) into the endpoint to use. `None` when the document says
/// nothing useful: the caller falls back to [`fallback`].
pub fn from_version_document(service: Service, catalog_url: &str, doc: &Value) -> Option<Resolved> {
    let (_, id_prefix) = version_for(service)?;
    // A single version document: `{"version": {...}}` (compute /v2.1).
    if let Some(v) = doc.get("version") {
        return Some(resolved(service, catalog_url, catalog_url, v));
    }
    let list = match doc.get("versions") {
        Some(Value::Array(a)) => a.clone(),
        Some(Value::Object(o)) => o.get("values")?.as_array()?.clone(),
        _ => return None,
    };
    let mut candidates: Vec<&Value> = list
        .iter()
        .filter(|v| {
            v.get("id")
                .and_then(Value::as_str)
                .is_some_and(|id| id.starts_with(id_prefix))
        })
        .collect();
    // CURRENT first, then SUPPORTED, then anything.
    candidates.sort_by_key(|v| match v.get("status").and_then(Value::as_str) {
        Some("CURRENT") | Some("stable") => 0,
        Some("SUPPORTED") => 1,
        _ => 2,
    });
    let v = candidates.first()?;
    let href = v
        .get("links")
        .and_then(Value::as_array)
        .and_then(|l| {
            l.iter()
                .find(|l| l.get("rel").and_then(Value::as_str) == Some("self"))
        })
        .and_then(|l| l.get("href"))
        .and_then(Value::as_str)?;
    Some(resolved(service, catalog_url, href, v))
}

fn resolved(service: Service, catalog_url: &str, href: &str, v: &Value) -> Resolved {
    // Keep the catalog's scheme, host and port: version documents often
    // carry the service's internal host name.
    let url = match (url::Url::parse(catalog_url), url::Url::parse(href)) {
        (Ok(base), Ok(h)) => {
            let mut u = base.clone();
            u.set_path(h.path());
            u.to_string()
        }
        _ => href.to_owned(),
    };
    let microversion = if service == Service::Compute {
        v.get("version")
            .and_then(Value::as_str)
            .and_then(parse_microversion)
            .map(|max| max.min(MAX_MICROVERSION))
            .filter(|mv| *mv > (2, 1))
    } else {
        None
    };
    Resolved {
        url: url.trim_end_matches('/').to_owned(),
        microversion,
    }
}

/// The endpoint to use when discovery failed or was not needed.
pub fn fallback(service: Service, catalog_url: &str) -> Resolved {
    let base = catalog_url.trim_end_matches('/');
    let url = match version_for(service) {
        Some((suffix, _)) if !is_versioned(service, base) => format!("{base}{suffix}"),
        _ => base.to_owned(),
    };
    Resolved {
        url,
        microversion: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::identity::CatalogEndpoint;
    use serde_json::json;

    fn catalog() -> Vec<CatalogEntry> {
        let ep = |i: &str, r: &str, u: &str| CatalogEndpoint {
            interface: i.into(),
            region: Some(r.into()),
            url: u.into(),
        };
        vec![
            CatalogEntry {
                service_type: "compute".into(),
                endpoints: vec![
                    ep("public", "R1", "http://pub1:8774/v2.1"),
                    ep("internal", "R1", "http://int1:8774/v2.1"),
                    ep("public", "R2", "http://pub2:8774/v2.1"),
                ],
            },
            CatalogEntry {
                service_type: "volumev3".into(),
                endpoints: vec![ep("public", "R1", "http://cinder/v3/p")],
            },
        ]
    }

    #[test]
    fn select_by_interface_and_region() {
        let c = catalog();
        assert_eq!(
            select(&c, Service::Compute, "public", Some("R2"), "x").unwrap(),
            "http://pub2:8774/v2.1"
        );
        assert_eq!(
            select(&c, Service::Compute, "internal", Some("R1"), "x").unwrap(),
            "http://int1:8774/v2.1"
        );
        assert_eq!(
            select(&c, Service::Compute, "publicURL", None, "x").unwrap(),
            "http://pub1:8774/v2.1"
        );
        assert_eq!(
            select(&c, Service::BlockStorage, "public", Some("R1"), "x").unwrap(),
            "http://cinder/v3/p"
        );
        let e = select(&c, Service::Compute, "public", Some("R9"), "peer").unwrap_err();
        assert_eq!(
            e.to_string(),
            "cloud peer: the catalog has no public compute endpoint in region R9 (it has regions R1, R2)"
        );
        let e = select(&c, Service::Image, "public", None, "peer").unwrap_err();
        assert_eq!(
            e.to_string(),
            "cloud peer: the catalog has no public image endpoint"
        );
    }

    #[test]
    fn compute_version_document_negotiates_microversion() {
        let doc = json!({"version": {"id": "v2.1", "status": "CURRENT", "version": "2.100",
            "min_version": "2.1", "links": [{"rel": "self", "href": "http://nova-internal:8774/v2.1/"}]}});
        let r =
            from_version_document(Service::Compute, "http://127.0.0.1:8774/v2.1", &doc).unwrap();
        assert_eq!(r.url, "http://127.0.0.1:8774/v2.1");
        assert_eq!(r.microversion, Some(MAX_MICROVERSION));
        let old = json!({"version": {"id": "v2.1", "version": "2.40"}});
        let r = from_version_document(Service::Compute, "http://n/v2.1", &old).unwrap();
        assert_eq!(r.microversion, Some((2, 40)));
    }

    #[test]
    fn image_and_network_version_lists() {
        let glance = json!({"versions": [
            {"id": "v2.15", "status": "SUPPORTED", "links": [{"rel": "self", "href": "http://g:9292/v2/"}]},
            {"id": "v2.16", "status": "CURRENT", "links": [{"rel": "self", "href": "http://g:9292/v2/"}]},
            {"id": "v1.0", "status": "DEPRECATED", "links": [{"rel": "self", "href": "http://g:9292/v1/"}]}]});
        let r = from_version_document(Service::Image, "https://cloud:443/image", &glance).unwrap();
        assert_eq!(r.url, "https://cloud/v2");
        assert_eq!(r.microversion, None);
        let neutron = json!({"versions": [{"id": "v2.0", "status": "CURRENT",
            "links": [{"href": "http://127.0.0.1:9696/v2.0/", "rel": "self"}]}]});
        let r = from_version_document(Service::Network, "http://127.0.0.1:9696", &neutron).unwrap();
        assert_eq!(r.url, "http://127.0.0.1:9696/v2.0");
        assert!(from_version_document(Service::Network, "http://x", &json!({})).is_none());
    }

    #[test]
    fn versioned_urls_and_fallbacks() {
        assert!(is_versioned(Service::Image, "http://g:9292/v2/"));
        assert!(is_versioned(Service::Network, "http://n/network/v2.0"));
        assert!(!is_versioned(Service::Image, "http://g:9292"));
        assert!(!is_versioned(Service::Network, "http://n:9696/"));
        assert_eq!(
            fallback(Service::Image, "http://g:9292/").url,
            "http://g:9292/v2"
        );
        assert_eq!(
            fallback(Service::Network, "http://n:9696").url,
            "http://n:9696/v2.0"
        );
        assert_eq!(
            fallback(Service::Compute, "http://c:8774/v2.1/proj").url,
            "http://c:8774/v2.1/proj"
        );
    }
}
