//! The executor: the one place that sends requests.
//!
//! [`Client::execute`] takes any [`Endpoint`], and for each attempt: gets a
//! token (authenticating, or re-authenticating shortly before expiry),
//! resolves the service's endpoint (catalog, interface, region, version
//! discovery, compute microversion), waits for the provider's rate limit,
//! sends with a per-call timeout, and then
//!
//! - expected status: hands the response to the endpoint's parser;
//! - 401: drops the token, authenticates again and retries once;
//! - 429 / 503: retries with exponential backoff, honouring `Retry-After`
//!   when it is no longer than the per-call timeout (a longer one fails the
//!   call at once: a 429 as [`ApiError::RateLimited`] with its
//!   `Retry-After`, which the launcher's breaker honours);
//! - connection failures of idempotent calls: retries with backoff;
//! - anything else: an [`ApiError`] that maps to a `ProviderError` meaning.
//!
//! Every HTTP request, token requests included, is bounded by the per-call
//! timeout (clouds.yaml `api_timeout`). Calls that need a token while
//! another call is getting one wait for it at most that long, and share its
//! failure: a hung Keystone costs every waiting call one timeout, not one
//! each in turn.
//!
//! Secrets (password, application credential secret, tokens) never reach a
//! log line, an error or a `Debug` output: the token header is marked
//! sensitive and every error message is scrubbed before it leaves.

pub mod catalog;
pub mod retry;

#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use nodepool_model::config::Secret;
use reqwest::header::{HeaderMap, HeaderValue};
use tokio::time::Instant;
use tracing::{debug, warn};

use crate::api::identity::{Authenticate, CatalogEntry};
use crate::api::{ApiRequest, ApiResponse, Endpoint, Raw, RequestBody, Service, Target};
use crate::clouds::CloudConfig;
use crate::error::{ApiError, error_message};
pub use catalog::Resolved;
pub use retry::{RateLimiter, RetryPolicy};

/// Tunables of a [`Client`]; `Default` gives production values.
#[derive(Clone, Debug, PartialEq)]
pub struct ClientOptions {
    /// Seconds between calls (the provider's `rate`).
    pub rate: Duration,
    /// Per-call timeout (clouds.yaml `api_timeout` overrides the default).
    pub timeout: Duration,
    /// Retry policy for 429/503 and connection failures.
    pub retry: RetryPolicy,
    /// Re-authenticate this long before the token expires (at most half
    /// its lifetime).
    pub refresh_margin: Duration,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            rate: Duration::ZERO,
            timeout: Duration::from_secs(60),
            retry: RetryPolicy::default(),
            refresh_margin: Duration::from_secs(120),
        }
    }
}

/// Counters of a client (for metrics and tests).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ClientStats {
    /// HTTP requests sent (authentication included).
    pub requests: u64,
    /// Tokens issued.
    pub authentications: u64,
    /// Attempts repeated after 429/503/connection failures.
    pub retries: u64,
}

type SleepFn = Arc<dyn Fn(Duration) -> Pin<Box<dyn Future<Output = ()> + Send>> + Send + Sync>;

/// The token, and the last failure to get one.
#[derive(Default)]
struct TokenSlot {
    token: Option<Arc<TokenState>>,
    /// When the last token request failed, and how: callers that were
    /// waiting for it get the same answer instead of asking again.
    failure: Option<(Instant, ApiError)>,
}

struct TokenState {
    token: Secret,
    refresh_at: Instant,
    catalog: Vec<CatalogEntry>,
    project_id: Option<String>,
    generation: u64,
}

/// An authenticated connection to one cloud region.
pub struct Client {
    cloud: CloudConfig,
    http: reqwest::Client,
    options: ClientOptions,
    limiter: RateLimiter,
    token: tokio::sync::Mutex<TokenSlot>,
    endpoints: tokio::sync::Mutex<HashMap<Service, Resolved>>,
    generation: AtomicU64,
    requests: AtomicU64,
    authentications: AtomicU64,
    retries: AtomicU64,
    /// Current token text, kept only to scrub messages.
    current_token: std::sync::Mutex<Option<String>>,
    sleep: SleepFn,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("cloud", &self.cloud.name)
            .field("region", &self.cloud.region_name)
            .field("auth_url", &self.cloud.auth.auth_url())
            .field("rate", &self.options.rate)
            .finish_non_exhaustive()
    }
}

impl Client {
    /// A client for one cloud. No call is made until the first request.
    pub fn new(cloud: CloudConfig, options: ClientOptions) -> Result<Client, ApiError> {
        let mut builder = reqwest::Client::builder()
            .user_agent(concat!("nodepool-rs/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(options.timeout.min(Duration::from_secs(30)))
            .pool_idle_timeout(Duration::from_secs(50));
        if !cloud.verify {
            builder = builder.tls_danger_accept_invalid_certs(true);
        }
        if let Some(ca) = &cloud.cacert {
            let pem = std::fs::read(ca).map_err(|e| {
                ApiError::Local(format!(
                    "{}: clouds.{}.cacert: cannot read {}: {e}",
                    cloud.source,
                    cloud.name,
                    ca.display()
                ))
            })?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| {
                ApiError::Local(format!(
                    "{}: clouds.{}.cacert: {} is not a PEM bundle: {e}",
                    cloud.source,
                    cloud.name,
                    ca.display()
                ))
            })?;
            for c in certs {
                builder = builder.add_root_certificate(c);
            }
        }
        let http = builder
            .build()
            .map_err(|e| ApiError::Local(format!("cannot build the HTTP client: {e}")))?;
        let mut options = options;
        if let Some(t) = cloud.api_timeout {
            options.timeout = t;
        }
        Ok(Client {
            limiter: RateLimiter::new(options.rate),
            cloud,
            http,
            options,
            token: tokio::sync::Mutex::new(TokenSlot::default()),
            endpoints: tokio::sync::Mutex::new(HashMap::new()),
            generation: AtomicU64::new(0),
            requests: AtomicU64::new(0),
            authentications: AtomicU64::new(0),
            retries: AtomicU64::new(0),
            current_token: std::sync::Mutex::new(None),
            sleep: Arc::new(|d| Box::pin(tokio::time::sleep(d))),
        })
    }

    /// The cloud this client talks to.
    pub fn cloud(&self) -> &CloudConfig {
        &self.cloud
    }

    /// The options in force.
    pub fn options(&self) -> &ClientOptions {
        &self.options
    }

    /// Counters since the client was made.
    pub fn stats(&self) -> ClientStats {
        ClientStats {
            requests: self.requests.load(Ordering::Relaxed),
            authentications: self.authentications.load(Ordering::Relaxed),
            retries: self.retries.load(Ordering::Relaxed),
        }
    }

    /// Replaces how backoff waits are slept (tests record them instead).
    #[cfg(test)]
    pub(crate) fn set_sleep(&mut self, sleep: SleepFn) {
        self.sleep = sleep;
    }

    /// The project the token is scoped to (authenticates if needed).
    pub async fn project_id(&self) -> Result<Option<String>, ApiError> {
        Ok(self.token_state().await?.project_id.clone())
    }

    /// The endpoint (after discovery) of a service, e.g. to check whether
    /// the cloud has it at all.
    pub async fn endpoint(&self, service: Service) -> Result<Resolved, ApiError> {
        let ts = self.token_state().await?;
        self.resolve(service, &ts).await
    }

    /// Whether the catalog has the service (Neutron, Cinder are optional).
    pub async fn has_service(&self, service: Service) -> Result<bool, ApiError> {
        match self.endpoint(service).await {
            Ok(_) => Ok(true),
            Err(ApiError::NoEndpoint(_)) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// The secrets to scrub from messages.
    fn secrets(&self) -> Vec<String> {
        let mut s = self.cloud.auth.secrets();
        if let Ok(t) = self.current_token.lock()
            && let Some(t) = t.as_ref()
        {
            s.push(t.clone());
        }
        s
    }

    /// Sends one endpoint's request and parses its answer.
    pub async fn execute<E: Endpoint>(&self, endpoint: &E) -> Result<E::Output, ApiError> {
        let req = endpoint.request();
        let result = match self.run(&req).await {
            Ok(resp) => endpoint.parse(resp),
            Err(e) => Err(e),
        };
        result.map_err(|e| e.scrubbed(&self.secrets()))
    }

    /// Authenticates now (normally done lazily), returning a new token's
    /// generation number.
    pub async fn authenticate(&self) -> Result<u64, ApiError> {
        let mut slot = self.token_slot().await?;
        let ts = self.issue_token().await?;
        let g = ts.generation;
        slot.token = Some(ts);
        slot.failure = None;
        Ok(g)
    }

    /// The token slot, waited for at most one per-call timeout (another
    /// call may be getting a token from a hung Keystone).
    async fn token_slot(&self) -> Result<tokio::sync::MutexGuard<'_, TokenSlot>, ApiError> {
        let timeout = self.options.timeout;
        tokio::time::timeout(timeout, self.token.lock())
            .await
            .map_err(|_| ApiError::Timeout {
                call: format!(
                    "identity POST auth/tokens (cloud {}: waiting for another call's token request)",
                    self.cloud.name
                ),
                timeout,
            })
    }

    /// Revokes the current token in Keystone (`DELETE /v3/auth/tokens`)
    /// but keeps using it, so the next call learns of it from a 401 and
    /// authenticates again, exactly as after a revocation by someone else.
    /// For re-authentication tests and drills.
    pub async fn revoke_token(&self) -> Result<(), ApiError> {
        let ts = self.token_state().await?;
        let mut req = ApiRequest {
            method: reqwest::Method::DELETE,
            target: Target::Url(format!("{}/auth/tokens", self.cloud.auth.auth_url())),
            ..ApiRequest::get(Service::Identity, "")
        };
        req.headers
            .push(("x-subject-token", ts.token.expose().to_owned()));
        req.expected = &[204, 200];
        self.run_attempts(&req, Some(&ts))
            .await
            .map(|_| ())
            .map_err(|e| e.scrubbed(&self.secrets()))
    }

    async fn token_state(&self) -> Result<Arc<TokenState>, ApiError> {
        let asked = Instant::now();
        // Holding the lock while authenticating makes concurrent callers
        // wait for one new token instead of each asking for their own.
        let mut slot = self.token_slot().await?;
        if let Some(ts) = slot.token.as_ref()
            && Instant::now() < ts.refresh_at
        {
            return Ok(ts.clone());
        }
        // The request we waited for failed: its answer is ours too.
        if let Some((at, e)) = &slot.failure
            && *at >= asked
        {
            return Err(e.clone());
        }
        match self.issue_token().await {
            Ok(ts) => {
                slot.token = Some(ts.clone());
                slot.failure = None;
                Ok(ts)
            }
            Err(e) => {
                let e = e.scrubbed(&self.secrets());
                slot.failure = Some((Instant::now(), e.clone()));
                Err(e)
            }
        }
    }

    async fn issue_token(&self) -> Result<Arc<TokenState>, ApiError> {
        let auth = Authenticate {
            auth: &self.cloud.auth,
        };
        let started = Instant::now();
        let resp = match self.run_attempts(&auth.request(), None).await {
            Ok(r) => r,
            Err(ApiError::Status {
                status: 401,
                message,
                ..
            }) => {
                return Err(ApiError::Unauthenticated(format!(
                    "cloud {}: Keystone at {} refused the credentials: {message}",
                    self.cloud.name,
                    self.cloud.auth.auth_url()
                )));
            }
            Err(e) => return Err(e),
        };
        let issued = auth.parse(resp)?;
        self.authentications.fetch_add(1, Ordering::Relaxed);
        let generation = self.generation.fetch_add(1, Ordering::Relaxed) + 1;
        if let Ok(mut t) = self.current_token.lock() {
            *t = Some(issued.token.expose().to_owned());
        }
        debug!(
            cloud = %self.cloud.name,
            lifetime_s = issued.lifetime.as_secs(),
            generation,
            "token issued"
        );
        Ok(Arc::new(TokenState {
            token: issued.token,
            refresh_at: refresh_at(started, issued.lifetime, self.options.refresh_margin),
            catalog: issued.catalog,
            project_id: issued.project_id,
            generation,
        }))
    }

    async fn invalidate(&self, generation: u64) {
        // Bounded like any wait for the slot; on timeout the next caller
        // finds the revoked token, gets a 401 and invalidates it then.
        if let Ok(mut slot) = self.token_slot().await
            && slot
                .token
                .as_ref()
                .is_some_and(|t| t.generation == generation)
        {
            slot.token = None;
        }
    }

    async fn resolve(&self, service: Service, ts: &TokenState) -> Result<Resolved, ApiError> {
        // Bounded: another call may be discovering the service's versions
        // on a hung endpoint.
        let timeout = self.options.timeout;
        let mut cache = tokio::time::timeout(timeout, self.endpoints.lock())
            .await
            .map_err(|_| ApiError::Timeout {
                call: format!(
                    "{} version discovery (cloud {}: waiting for another call's)",
                    service.name(),
                    self.cloud.name
                ),
                timeout,
            })?;
        if let Some(r) = cache.get(&service) {
            return Ok(r.clone());
        }
        let catalog_url = match self.cloud.endpoint_overrides.get(service.name()) {
            Some(u) => u.clone(),
            None => catalog::select(
                &ts.catalog,
                service,
                self.cloud.interface_for(service.name()),
                self.cloud.region_name.as_deref(),
                &self.cloud.name,
            )?,
        };
        let resolved =
            if service == Service::Compute || !catalog::is_versioned(service, &catalog_url) {
                self.discover(service, &catalog_url, ts).await
            } else {
                catalog::fallback(service, &catalog_url)
            };
        debug!(cloud = %self.cloud.name, service = service.name(), url = %resolved.url,
            microversion = ?resolved.microversion, "endpoint resolved");
        cache.insert(service, resolved.clone());
        Ok(resolved)
    }

    async fn discover(&self, service: Service, catalog_url: &str, ts: &TokenState) -> Resolved {
        let mut req = Raw(ApiRequest {
            target: Target::Url(catalog_url.to_owned()),
            ..ApiRequest::get(service, "")
        })
        .request();
        req.expected = &[200, 300];
        // Boxed: discovery is reached from run_attempts itself.
        match Box::pin(self.run_attempts(&req, Some(ts))).await {
            Ok(resp) => match resp.json() {
                Ok(doc) => catalog::from_version_document(service, catalog_url, &doc)
                    .unwrap_or_else(|| catalog::fallback(service, catalog_url)),
                Err(_) => catalog::fallback(service, catalog_url),
            },
            Err(e) => {
                warn!(cloud = %self.cloud.name, service = service.name(),
                    error = %e.scrubbed(&self.secrets()), "version discovery failed; using the catalog URL");
                catalog::fallback(service, catalog_url)
            }
        }
    }

    async fn run(&self, req: &ApiRequest) -> Result<ApiResponse, ApiError> {
        if !req.authenticated {
            return self.run_attempts(req, None).await;
        }
        let ts = self.token_state().await?;
        match self.run_attempts(req, Some(&ts)).await {
            Err(ApiError::Status { status: 401, .. }) => {
                // The token was revoked or expired early: one new token,
                // one more try.
                debug!(cloud = %self.cloud.name, call = %req.describe(), "401: authenticating again");
                self.invalidate(ts.generation).await;
                let ts = self.token_state().await?;
                match self.run_attempts(req, Some(&ts)).await {
                    Err(ApiError::Status {
                        status: 401,
                        message,
                        call,
                    }) => Err(ApiError::Unauthenticated(format!(
                        "{call}: a fresh token was refused too: {message}"
                    ))),
                    other => other,
                }
            }
            other => other,
        }
    }

    async fn run_attempts(
        &self,
        req: &ApiRequest,
        ts: Option<&TokenState>,
    ) -> Result<ApiResponse, ApiError> {
        let (url, microversion) = match &req.target {
            Target::Url(u) => (u.clone(), None),
            Target::Service(service, path) => {
                let ts = ts.ok_or_else(|| {
                    ApiError::Local(format!("{}: no token for a service call", req.describe()))
                })?;
                let r = self.resolve(*service, ts).await?;
                let url = if path.is_empty() {
                    r.url.clone()
                } else {
                    format!("{}/{}", r.url, path)
                };
                (url, r.microversion)
            }
        };
        let idempotent = matches!(
            req.method,
            reqwest::Method::GET
                | reqwest::Method::HEAD
                | reqwest::Method::DELETE
                | reqwest::Method::PUT
        );
        let mut failures = 0u32;
        loop {
            self.limiter.acquire().await;
            let outcome = self.send_once(req, &url, ts, microversion).await;
            let retry_after = match &outcome {
                Ok(resp) if resp.status == 429 || resp.status == 503 => Some(
                    resp.header("retry-after")
                        .and_then(|v| retry::parse_retry_after(v, SystemTime::now())),
                ),
                Err(ApiError::Transport { .. }) if idempotent => Some(None),
                _ => None,
            };
            let Some(retry_after) = retry_after else {
                return outcome.and_then(|resp| self.check(req, resp));
            };
            failures += 1;
            // A Retry-After longer than the call may take is not waited
            // for: the call fails now, and the caller (the launcher's
            // breaker) stays away for that long.
            let retry = RetryPolicy {
                max_retry_after: self.options.retry.max_retry_after.min(self.options.timeout),
                ..self.options.retry.clone()
            };
            match retry.delay(failures, retry_after) {
                Some(delay) => {
                    self.retries.fetch_add(1, Ordering::Relaxed);
                    debug!(cloud = %self.cloud.name, call = %req.describe(), failures,
                        delay_ms = delay.as_millis() as u64, "retrying");
                    (self.sleep)(delay).await;
                }
                None => return outcome.and_then(|resp| self.check(req, resp)),
            }
        }
    }

    fn check(&self, req: &ApiRequest, resp: ApiResponse) -> Result<ApiResponse, ApiError> {
        if req.expected.contains(&resp.status) {
            return Ok(resp);
        }
        let mut message = error_message(&resp.body);
        let retry_after = resp.header("retry-after").map(|ra| {
            message = format!("{message} (Retry-After: {ra})");
            retry::parse_retry_after(ra, SystemTime::now())
        });
        if resp.status == 429 {
            return Err(ApiError::RateLimited {
                call: req.describe(),
                message,
                retry_after: retry_after.flatten(),
            });
        }
        Err(ApiError::Status {
            call: req.describe(),
            status: resp.status,
            message,
        })
    }

    async fn send_once(
        &self,
        req: &ApiRequest,
        url: &str,
        ts: Option<&TokenState>,
        microversion: Option<(u32, u32)>,
    ) -> Result<ApiResponse, ApiError> {
        let mut rb = self
            .http
            .request(req.method.clone(), url)
            .header("accept", "application/json");
        if !req.query.is_empty() {
            rb = rb.query(&req.query);
        }
        if let (true, Some(ts)) = (req.authenticated, ts) {
            let mut v = HeaderValue::from_str(ts.token.expose()).map_err(|_| {
                ApiError::Decode("Keystone issued a token that is not a valid header".into())
            })?;
            v.set_sensitive(true);
            rb = rb.header("x-auth-token", v);
        }
        if let Some((major, minor)) = microversion {
            rb = rb
                .header("openstack-api-version", format!("compute {major}.{minor}"))
                .header("x-openstack-nova-api-version", format!("{major}.{minor}"));
        }
        for (k, v) in &req.headers {
            let mut value = HeaderValue::from_str(v).map_err(|_| {
                ApiError::Local(format!("{}: header {k} is not valid", req.describe()))
            })?;
            value.set_sensitive(k.ends_with("-token"));
            rb = rb.header(*k, value);
        }
        rb = match &req.body {
            RequestBody::Empty => rb,
            RequestBody::Json(v) => rb.json(v),
            RequestBody::File {
                path,
                len,
                hashes,
                sent,
            } => rb
                .header("content-length", len.to_string())
                .body(crate::upload::file_body(
                    path.clone(),
                    *len,
                    hashes.clone(),
                    sent.clone(),
                )),
        };
        let timeout = req.timeout.unwrap_or(self.options.timeout);
        self.requests.fetch_add(1, Ordering::Relaxed);
        let started = Instant::now();
        let call = req.describe();
        let fut = async {
            let resp = rb.send().await?;
            let status = resp.status().as_u16();
            let headers: HeaderMap = resp.headers().clone();
            let body = resp.bytes().await?;
            Ok::<_, reqwest::Error>(ApiResponse {
                status,
                headers,
                body,
            })
        };
        let result = match tokio::time::timeout(timeout, fut).await {
            Err(_) => Err(ApiError::Timeout {
                call: call.clone(),
                timeout,
            }),
            Ok(Err(e)) if e.is_timeout() => Err(ApiError::Timeout {
                call: call.clone(),
                timeout,
            }),
            Ok(Err(e)) => Err(ApiError::Transport {
                call: call.clone(),
                message: transport_message(&e),
            }),
            Ok(Ok(r)) => Ok(r),
        };
        let elapsed_ms = started.elapsed().as_millis() as u64;
        match &result {
            Ok(r) => {
                debug!(cloud = %self.cloud.name, %call, status = r.status, elapsed_ms, "api call")
            }
            Err(e) => {
                debug!(cloud = %self.cloud.name, %call, error = %e.clone().scrubbed(&self.secrets()), elapsed_ms, "api call failed")
            }
        }
        result
    }
}

/// When a token issued at `issued` for `lifetime` is renewed: `margin`
/// before it expires, but never earlier than half-way through its life.
pub fn refresh_at(issued: Instant, lifetime: Duration, margin: Duration) -> Instant {
    issued + lifetime.saturating_sub(margin.min(lifetime / 2))
}

/// A transport error's message with its causes, without the URL's query.
fn transport_message(e: &reqwest::Error) -> String {
    let mut parts = Vec::new();
    let mut src: Option<&dyn std::error::Error> = Some(e);
    while let Some(s) = src {
        let text = s.to_string();
        if !parts.iter().any(|p: &String| p.contains(&text)) {
            parts.push(text);
        }
        src = s.source();
    }
    parts.join(": ")
}
