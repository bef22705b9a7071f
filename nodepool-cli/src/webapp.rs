//! The launcher's web app (reference §7.1): the listings of the `nodepool`
//! CLI over HTTP, `/ready`, and Prometheus `/metrics`.
//!
//! Paths: `/node-list` (`?node_id=`), `/request-list`, `/label-list`,
//! `/image-list`, `/dib-image-list`, `/image-status`, `/ready`,
//! `/metrics`, `/dashboard` and `/dashboard.json` (the live page, see
//! [`crate::dashboard`]), and `/request-explain/<id>` (why a request waits, as
//! `nodepool request-explain` says it, from what the launcher's last pass
//! knew of its clouds; not cached); anything else is 404. The format is chosen by `Accept`
//! only: JSON when `application/json` is preferred over `text/html` and
//! `text/plain`, else the text table; `?fields=a,b` picks table columns.
//! As Nodepool's, responses are cached for one second per path, query and
//! format, carry `Access-Control-Allow-Origin: *`, `Cache-Control: public,
//! max-age=1`, `Last-Modified` and `Expires`, and answer a matching
//! `If-Modified-Since` with 304. Records a listing left out because
//! they could not be read are named in the `X-Nodepool-Skipped` header
//! (a JSON list of `{"path", "reason"}`); the body stays Python's bare list.
//!
//! `/ready` answers `OK` (200) once the launcher's first pass completed,
//! and 503 with one line per reason while it does not work: before the
//! first pass, while its store session is not connected, after a planning
//! pass failed (until one works). Providers it stopped calling because
//! their API kept failing are listed after `OK`, but never make it 503,
//! not even all of them: the launcher works as designed then (requests
//! wait for the clouds), and taking it out of service or restarting it
//! would bring no cloud back.
//!
//! The builder serves the same app ([`spawn_builder`]) on its own port:
//! the same listings (they read the shared store), `/metrics` with the
//! builder's families, and its own `/ready` (503 before its first pass and
//! while its store session is not connected). `/request-explain/<id>` is
//! the launcher's only: the builder does not plan requests. Both are
//! described with examples in `docs/web-api.md` and `docs/metrics.md`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::extract::{Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use nodepool_core::builder::BuilderStatus;
use nodepool_core::config::Config;
use nodepool_core::launcher::{LauncherStatus, Metrics, Readiness};
use nodepool_core::model::{epoch_now, format_age};
use nodepool_core::planner::explain::explain_request;
use nodepool_core::store::Store;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::dashboard::Dashboard;
use crate::listing::Source;

/// How long a rendered listing is served from the cache (Nodepool: 1 s).
pub const CACHE_EXPIRY: Duration = Duration::from_secs(1);

#[derive(Clone)]
struct AppState {
    store: Store,
    role: Role,
    metrics: Arc<Metrics>,
    cache: Arc<Mutex<HashMap<String, Rendered>>>,
}

/// Which daemon serves the app: the listings are the same, `/ready` is
/// each daemon's own, and only the launcher (which plans) explains
/// requests.
#[derive(Clone)]
enum Role {
    Launcher {
        config: watch::Receiver<Arc<Config>>,
        status: Arc<LauncherStatus>,
        dashboard: Arc<Dashboard>,
    },
    Builder {
        status: Arc<BuilderStatus>,
    },
}

/// A rendered listing: when, the body, and the `X-Nodepool-Skipped` value.
#[derive(Clone)]
struct Rendered {
    at: SystemTime,
    body: String,
    skipped: Option<HeaderValue>,
}

/// The header that lists the records a listing left out because they
/// could not be read. The body stays Python's format (a bare JSON list, or
/// the table), so its consumers are unaffected.
pub const SKIPPED_HEADER: &str = "x-nodepool-skipped";

/// Most records named in the header (a header has a size limit; the
/// launcher's log names them all).
const SKIPPED_IN_HEADER: usize = 20;

/// `X-Nodepool-Skipped`: a JSON list of `{"path", "reason"}` for the
/// records left out (the first [`SKIPPED_IN_HEADER`], then `{"more": n}`),
/// ASCII only; `None` when nothing was.
fn skipped_header(skipped: &[nodepool_core::store::Malformed]) -> Option<HeaderValue> {
    if skipped.is_empty() {
        return None;
    }
    let mut items: Vec<serde_json::Value> = skipped
        .iter()
        .take(SKIPPED_IN_HEADER)
        .map(|m| serde_json::json!({"path": m.path, "reason": m.reason}))
        .collect();
    if skipped.len() > SKIPPED_IN_HEADER {
        items.push(serde_json::json!({"more": skipped.len() - SKIPPED_IN_HEADER}));
    }
    let text = serde_json::Value::Array(items).to_string();
    // Header values are visible ASCII: escape the rest as JSON does.
    let mut ascii = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            ' '..='~' => ascii.push(c),
            c => {
                let mut buf = [0u16; 2];
                for unit in c.encode_utf16(&mut buf) {
                    ascii.push_str(&format!("\\u{unit:04x}"));
                }
            }
        }
    }
    HeaderValue::from_str(&ascii).ok()
}

/// Binds the configured address and serves until `shutdown`. Returns the
/// bound address (useful with port 0).
pub async fn spawn(
    store: Store,
    config: watch::Receiver<Arc<Config>>,
    status: Arc<LauncherStatus>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) -> anyhow::Result<SocketAddr> {
    let web = config.borrow().webapp.clone();
    let addr = format!("{}:{}", web.listen_address, web.port);
    let state = AppState {
        store,
        role: Role::Launcher {
            config,
            status,
            dashboard: Arc::default(),
        },
        metrics,
        cache: Arc::default(),
    };
    listen_and_serve(&addr, "web app", state, shutdown).await
}

/// Binds `addr`, logs `"{what} listening"` with the bound address, and
/// serves the app on it until `shutdown`.
async fn listen_and_serve(
    addr: &str,
    what: &str,
    state: AppState,
    shutdown: CancellationToken,
) -> anyhow::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("{what} cannot listen on {addr}: {e}"))?;
    let bound = listener
        .local_addr()
        .map_err(|e| anyhow::anyhow!("{what} on {addr}: {e}"))?;
    tracing::info!(addr = %bound, "{what} listening");
    let app = axum::Router::new().fallback(serve).with_state(state);
    let what = what.to_owned();
    tokio::spawn(async move {
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await;
        if let Err(e) = served {
            tracing::error!(error = %e, "{what} stopped");
        }
    });
    Ok(bound)
}

/// Where the builder's web app listens: `--webapp-listen-address` and
/// `--webapp-port` of `nodepool-builder` (the launcher's are the
/// configuration's `webapp` section).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BuilderWebapp {
    /// Address to bind.
    pub listen_address: String,
    /// Port to bind (0: any free port).
    pub port: u16,
}

/// The builder's `/ready`: 503 before its first pass and while its store
/// session is not connected.
fn builder_readiness(store: &Store, status: &BuilderStatus) -> Readiness {
    let mut problems = Vec::new();
    if !status.is_ready() {
        problems.push("the first planning pass has not completed".to_owned());
    }
    if store.backend().session().borrow().id().is_none() {
        problems.push("the state store session is not connected".to_owned());
    }
    Readiness {
        problems,
        unavailable: Vec::new(),
    }
}

/// Serves the builder's web app on `web` until `shutdown`: the same
/// listings as the launcher's, `/metrics` and its own `/ready`. Returns
/// the bound address (useful with port 0).
pub async fn spawn_builder(
    web: &BuilderWebapp,
    store: Store,
    status: Arc<BuilderStatus>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) -> anyhow::Result<SocketAddr> {
    let addr = format!("{}:{}", web.listen_address, web.port);
    let state = AppState {
        store,
        role: Role::Builder { status },
        metrics,
        cache: Arc::default(),
    };
    listen_and_serve(&addr, "builder web app", state, shutdown).await
}

/// The Prometheus text exposition.
fn metrics_response(metrics: &Metrics) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        metrics.prometheus(),
    )
        .into_response()
}

/// The response formats.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// The text table.
    Pretty,
    /// JSON.
    Json,
}

impl Format {
    fn name(self) -> &'static str {
        match self {
            Format::Pretty => "pretty",
            Format::Json => "json",
        }
    }

    fn content_type(self) -> &'static str {
        match self {
            Format::Pretty => "text/plain; charset=UTF-8",
            Format::Json => "application/json; charset=UTF-8",
        }
    }
}

/// Picks the format from an `Accept` header as webob's
/// `acceptable_offers(['text/html', 'text/plain', 'application/json'])`
/// does: each offer gets the quality of the most specific matching media
/// range; JSON wins only if it has the highest quality and no earlier
/// offer ties with it. No header (or nothing acceptable) means text.
pub fn negotiate(accept: Option<&str>) -> Format {
    const OFFERS: [&str; 3] = ["text/html", "text/plain", "application/json"];
    let Some(accept) = accept else {
        return Format::Pretty;
    };
    let mut ranges: Vec<(String, f32)> = Vec::new();
    for part in accept.split(',') {
        let mut pieces = part.split(';');
        let range = pieces.next().unwrap_or("").trim().to_ascii_lowercase();
        if range.is_empty() {
            continue;
        }
        let mut q = 1.0f32;
        for p in pieces {
            if let Some((k, v)) = p.split_once('=')
                && k.trim().eq_ignore_ascii_case("q")
            {
                q = v.trim().parse().unwrap_or(0.0);
            }
        }
        ranges.push((range, q));
    }
    let quality = |offer: &str| -> f32 {
        let (otype, _) = offer.split_once('/').unwrap_or((offer, ""));
        let mut best: Option<(u8, f32)> = None;
        for (range, q) in &ranges {
            let specificity = if range == offer {
                3
            } else if range.strip_suffix("/*") == Some(otype) {
                2
            } else if range == "*/*" {
                1
            } else {
                continue;
            };
            if best.is_none_or(|(s, _)| specificity > s) {
                best = Some((specificity, *q));
            }
        }
        best.map_or(0.0, |(_, q)| q)
    };
    let mut winner: Option<(&str, f32)> = None;
    for offer in OFFERS {
        let q = quality(offer);
        if q > 0.0 && winner.is_none_or(|(_, wq)| q > wq) {
            winner = Some((offer, q));
        }
    }
    match winner {
        Some(("application/json", _)) => Format::Json,
        _ => Format::Pretty,
    }
}

/// The `/ready` answer (see the module documentation).
fn ready(r: &Readiness) -> Response {
    use std::fmt::Write as _;
    if !r.is_ready() {
        let mut body = String::from("Service Unavailable\n");
        for p in &r.problems {
            let _ = writeln!(body, "{p}");
        }
        return (StatusCode::SERVICE_UNAVAILABLE, body).into_response();
    }
    let mut body = String::from("OK");
    if !r.unavailable.is_empty() {
        body.push_str("\nunavailable providers (requests go to others or wait):");
        let now = epoch_now();
        for u in &r.unavailable {
            let _ = write!(
                body,
                "\n  {}: for {}: {}",
                u.provider,
                format_age(now - u.since),
                u.reason
            );
        }
        body.push('\n');
    }
    body.into_response()
}

/// `/request-explain/<id>`: why a request waits, from the store as it is
/// and what the launcher's last pass knew of its clouds (never cached:
/// it is asked about while watching a request move).
async fn request_explain(s: &AppState, id: &str, format: Format) -> Response {
    let Role::Launcher { config, status, .. } = &s.role else {
        return (
            StatusCode::NOT_FOUND,
            "the builder does not plan requests: ask a launcher's web app\n",
        )
            .into_response();
    };
    let mut snapshot = match nodepool_core::launcher::read_snapshot(&s.store).await {
        Ok(snap) => snap,
        Err(e) => {
            tracing::warn!(error = %e, "web app cannot read the state store");
            return (
                StatusCode::SERVICE_UNAVAILABLE,
                format!("state store unavailable: {e}\n"),
            )
                .into_response();
        }
    };
    snapshot.providers = status.provider_views();
    let config = config.borrow().clone();
    let Some(x) = explain_request(&snapshot, &config, epoch_now(), id) else {
        return (StatusCode::NOT_FOUND, format!("request {id} not found\n")).into_response();
    };
    let body = match format {
        Format::Json => x.to_json().to_string(),
        Format::Pretty => format!("{}\n", x.to_text()),
    };
    let mut resp = body.into_response();
    if let Ok(v) = HeaderValue::from_str(format.content_type()) {
        resp.headers_mut().insert(header::CONTENT_TYPE, v);
    }
    resp
}

fn source_for(path: &str, params: &[(String, String)]) -> Option<Source> {
    Some(match path {
        "/node-list" => Source::Nodes {
            node_id: params
                .iter()
                .find(|(k, _)| k == "node_id")
                .map(|(_, v)| v.clone()),
        },
        "/request-list" => Source::Requests,
        "/label-list" => Source::Labels,
        "/image-list" => Source::Images,
        "/dib-image-list" => Source::DibImages,
        "/image-status" => Source::ImageStatus,
        _ => return None,
    })
}

fn with_cache_headers(mut resp: Response, format: Format, modified: SystemTime) -> Response {
    let h = resp.headers_mut();
    let set = |h: &mut HeaderMap, k: header::HeaderName, v: String| {
        if let Ok(v) = HeaderValue::from_str(&v) {
            h.insert(k, v);
        }
    };
    set(h, header::CONTENT_TYPE, format.content_type().into());
    set(h, header::ACCESS_CONTROL_ALLOW_ORIGIN, "*".into());
    set(
        h,
        header::CACHE_CONTROL,
        format!("public, max-age={}", CACHE_EXPIRY.as_secs()),
    );
    set(h, header::LAST_MODIFIED, httpdate::fmt_http_date(modified));
    set(
        h,
        header::EXPIRES,
        httpdate::fmt_http_date(modified + CACHE_EXPIRY),
    );
    resp
}

async fn serve(
    State(s): State<AppState>,
    uri: Uri,
    headers: HeaderMap,
    Query(params): Query<Vec<(String, String)>>,
) -> Response {
    let path = uri.path();
    if path == "/metrics" {
        // The store client's traffic counters as of this scrape.
        s.metrics.record_store_traffic(&s.store.backend().health());
        return metrics_response(&s.metrics);
    }
    let format = negotiate(headers.get(header::ACCEPT).and_then(|v| v.to_str().ok()));
    if path == "/ready" {
        let readiness = match &s.role {
            Role::Launcher { status, .. } => status.readiness(),
            Role::Builder { status } => builder_readiness(&s.store, status),
        };
        return with_cache_headers(ready(&readiness), format, SystemTime::now());
    }
    if let Role::Launcher {
        config,
        status,
        dashboard,
    } = &s.role
    {
        match path {
            "/dashboard" => {
                return (
                    [(header::CONTENT_TYPE, "text/html; charset=UTF-8")],
                    crate::dashboard::PAGE,
                )
                    .into_response();
            }
            "/dashboard.json" => {
                let config = config.borrow().clone();
                return match dashboard
                    .document(&s.store, &config, status, epoch_now())
                    .await
                {
                    Ok(doc) => (
                        [(header::CONTENT_TYPE, Format::Json.content_type())],
                        doc.as_str().to_owned(),
                    )
                        .into_response(),
                    Err(e) => {
                        tracing::warn!(error = %e, "dashboard cannot read the state store");
                        (
                            StatusCode::SERVICE_UNAVAILABLE,
                            format!("state store unavailable: {e}\n"),
                        )
                            .into_response()
                    }
                };
            }
            _ => {}
        }
    }
    if let Some(id) = path.strip_prefix("/request-explain/") {
        return request_explain(&s, id, format).await;
    }
    let Some(source) = source_for(path, &params) else {
        return (StatusCode::NOT_FOUND, "Not Found\n").into_response();
    };
    let mut sorted = params.clone();
    sorted.sort();
    let key = format!("{path}?{sorted:?}.{}", format.name());
    let cached = {
        let mut cache = s.cache.lock().unwrap_or_else(|p| p.into_inner());
        let now = SystemTime::now();
        cache.retain(|_, r| now.duration_since(r.at).unwrap_or_default() <= CACHE_EXPIRY);
        cache.get(&key).cloned()
    };
    let rendered = match cached {
        Some(hit) => hit,
        None => {
            let listing = match source.fetch(&s.store, epoch_now()).await {
                Ok(l) => l,
                Err(e) => {
                    tracing::warn!(path, error = %e, "web app cannot read the state store");
                    return (
                        StatusCode::SERVICE_UNAVAILABLE,
                        format!("state store unavailable: {e}\n"),
                    )
                        .into_response();
                }
            };
            let body = match format {
                Format::Json => listing.to_json(),
                Format::Pretty => {
                    let fields: Option<Vec<&str>> = params
                        .iter()
                        .find(|(k, v)| k == "fields" && !v.is_empty())
                        .map(|(_, v)| v.split(',').collect());
                    listing.to_table(fields.as_deref(), epoch_now())
                }
            };
            if !listing.skipped.is_empty() {
                tracing::debug!(
                    path,
                    skipped = listing.skipped.len(),
                    "listing left out unreadable records"
                );
            }
            let rendered = Rendered {
                at: SystemTime::now(),
                body,
                skipped: skipped_header(&listing.skipped),
            };
            s.cache
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(key, rendered.clone());
            rendered
        }
    };
    let Rendered {
        at: modified,
        body,
        skipped,
    } = rendered;
    let with_skipped = |mut resp: Response| {
        if let Some(v) = skipped {
            resp.headers_mut()
                .insert(header::HeaderName::from_static(SKIPPED_HEADER), v);
        }
        resp
    };
    // Conditional GET: HTTP dates have whole seconds.
    let since = headers
        .get(header::IF_MODIFIED_SINCE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| httpdate::parse_http_date(v).ok());
    if let Some(since) = since {
        let secs = |t: SystemTime| t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        if secs(modified) <= secs(since) {
            return with_skipped(with_cache_headers(
                StatusCode::NOT_MODIFIED.into_response(),
                format,
                modified,
            ));
        }
    }
    with_skipped(with_cache_headers(body.into_response(), format, modified))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_negotiation_follows_webob() {
        assert_eq!(negotiate(None), Format::Pretty);
        assert_eq!(negotiate(Some("application/json")), Format::Json);
        assert_eq!(negotiate(Some("*/*")), Format::Pretty);
        assert_eq!(
            negotiate(Some("text/html;q=0.5, application/json")),
            Format::Json
        );
        assert_eq!(
            negotiate(Some("application/json, text/plain")),
            Format::Pretty,
            "a tie goes to the earlier offer"
        );
        assert_eq!(
            negotiate(Some("application/*;q=0.9, text/*;q=0.1")),
            Format::Json
        );
        assert_eq!(negotiate(Some("application/json;q=0, */*")), Format::Pretty);
        assert_eq!(negotiate(Some("image/png")), Format::Pretty);
    }
}
