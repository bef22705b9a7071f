//! The executor: the one place that sends Jenkins requests.
//!
//! [`JenkinsClient::execute`] takes any [`Endpoint`] and, for each attempt:
//! authenticates with the user's API token (HTTP basic, header marked
//! sensitive), adds a CSRF crumb (and its session cookie) to changing
//! calls, sends with a per-call timeout, and then
//!
//! - expected status: hands the response to the endpoint's parser;
//! - 403 on a call with a crumb: the crumb may have expired (Jenkins
//!   restarted, session gone): fetches a new one and repeats once;
//! - 401 with a token file: the token may have been rotated: reads the file
//!   again and, if it changed, repeats once;
//! - 5xx, timeouts, connection failures: retries with exponential backoff;
//! - anything else: an [`ApiError`] (which maps to a `ConsumerError`).
//!
//! Retrying a `POST` whose answer was lost is safe here: creating an agent
//! twice answers "already exists" (which the consumer treats as adoption)
//! and deleting one twice answers 404 (gone is gone).
//!
//! Redirects are not followed: Jenkins answers its form posts with 302 to a
//! page we do not want.
//!
//! The API token never reaches a log line, an error or a `Debug` output.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use nodepool_model::config::{JenkinsConnection, Secret};
use reqwest::header::{COOKIE, HeaderValue};
use tracing::{debug, warn};

use crate::api::{ApiRequest, ApiResponse, Crumb, Endpoint, GetCrumb};
use crate::error::{ApiError, error_message};

/// When and how often to retry a call.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts in all, the first included.
    pub max_attempts: u32,
    /// Delay after the first failure; doubled after each further one.
    pub base_delay: Duration,
    /// Upper bound of the delay.
    pub max_delay: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 4,
            base_delay: Duration::from_millis(500),
            max_delay: Duration::from_secs(10),
        }
    }
}

impl RetryPolicy {
    /// The wait before attempt `failures + 1`, or `None` to give up.
    pub fn delay(&self, failures: u32) -> Option<Duration> {
        if failures == 0 || failures >= self.max_attempts {
            return None;
        }
        let factor = 2u32.saturating_pow((failures - 1).min(16));
        Some(self.base_delay.saturating_mul(factor).min(self.max_delay))
    }
}

/// Tunables of a [`JenkinsClient`]; `Default` gives production values.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientOptions {
    /// Per-call timeout.
    pub timeout: Duration,
    /// Retries of 5xx and connection failures.
    pub retry: RetryPolicy,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            timeout: Duration::from_secs(30),
            retry: RetryPolicy::default(),
        }
    }
}

/// Counters of a client (for metrics and tests).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ClientStats {
    /// HTTP requests sent (crumb requests included).
    pub requests: u64,
    /// Attempts repeated after 5xx/connection failures.
    pub retries: u64,
    /// Crumbs fetched.
    pub crumbs: u64,
}

/// What we know about the master's CSRF protection.
#[derive(Clone, Debug)]
enum CrumbState {
    /// Not asked yet (or the last crumb was refused).
    Unknown,
    /// The crumb issuer answered 404: CSRF protection is off.
    Disabled,
    /// A crumb to send.
    Have(Crumb),
}

/// A connection to one Jenkins master.
pub struct JenkinsClient {
    base: url::Url,
    user: Option<String>,
    token: std::sync::RwLock<Option<Secret>>,
    token_file: Option<PathBuf>,
    http: reqwest::Client,
    options: ClientOptions,
    crumb: tokio::sync::Mutex<CrumbState>,
    requests: AtomicU64,
    retries: AtomicU64,
    crumbs: AtomicU64,
}

impl std::fmt::Debug for JenkinsClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JenkinsClient")
            .field("url", &self.base.as_str())
            .field("user", &self.user)
            .field("token_file", &self.token_file)
            .field("timeout", &self.options.timeout)
            .finish_non_exhaustive()
    }
}

fn read_token_file(path: &std::path::Path) -> Result<Secret, ApiError> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        ApiError::Local(format!(
            "cannot read the API token file {}: {e}",
            path.display()
        ))
    })?;
    let token = text.trim();
    if token.is_empty() {
        return Err(ApiError::Local(format!(
            "the API token file {} is empty",
            path.display()
        )));
    }
    Ok(Secret::new(token))
}

impl JenkinsClient {
    /// A client for a target's `jenkins` section: reads the token file now.
    /// No call is made until the first request.
    pub fn new(conn: &JenkinsConnection, options: ClientOptions) -> Result<Self, ApiError> {
        let mut base = url::Url::parse(&conn.url)
            .map_err(|e| ApiError::Local(format!("jenkins url {:?}: {e}", conn.url)))?;
        if !matches!(base.scheme(), "http" | "https") {
            return Err(ApiError::Local(format!(
                "jenkins url {:?}: not http or https",
                conn.url
            )));
        }
        // Joining relative paths keeps the last segment only with a slash.
        if !base.path().ends_with('/') {
            let p = format!("{}/", base.path());
            base.set_path(&p);
        }
        let token = match (&conn.api_token, &conn.api_token_file) {
            (Some(t), _) => Some(t.clone()),
            (None, Some(path)) => Some(read_token_file(path)?),
            (None, None) => None,
        };
        let http = reqwest::Client::builder()
            .user_agent(concat!("nodepool-rs/", env!("CARGO_PKG_VERSION")))
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(options.timeout.min(Duration::from_secs(10)))
            .build()
            .map_err(|e| ApiError::Local(format!("cannot set up HTTP: {e}")))?;
        Ok(JenkinsClient {
            base,
            user: conn.user.clone(),
            token: std::sync::RwLock::new(token),
            token_file: conn.api_token_file.clone(),
            http,
            options,
            crumb: tokio::sync::Mutex::new(CrumbState::Unknown),
            requests: AtomicU64::new(0),
            retries: AtomicU64::new(0),
            crumbs: AtomicU64::new(0),
        })
    }

    /// The master's base URL.
    pub fn url(&self) -> &str {
        self.base.as_str()
    }

    /// Counters.
    pub fn stats(&self) -> ClientStats {
        ClientStats {
            requests: self.requests.load(Ordering::Relaxed),
            retries: self.retries.load(Ordering::Relaxed),
            crumbs: self.crumbs.load(Ordering::Relaxed),
        }
    }

    fn token(&self) -> Option<Secret> {
        self.token.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Sends an endpoint's request and parses the answer (see the module
    /// documentation for crumbs, retries and error mapping).
    pub async fn execute<E: Endpoint + ?Sized>(&self, endpoint: &E) -> Result<E::Output, ApiError> {
        let req = endpoint.request();
        let secret = self.token();
        let secrets: Vec<&str> = secret.iter().map(Secret::expose).collect();
        self.execute_request(&req)
            .await
            .and_then(|r| endpoint.parse(r))
            .map_err(|e| e.scrubbed(&secrets))
    }

    async fn execute_request(&self, req: &ApiRequest) -> Result<ApiResponse, ApiError> {
        let mut failures = 0u32;
        let mut fresh_crumb = false;
        let mut fresh_token = false;
        loop {
            let crumb = if req.needs_crumb {
                self.crumb().await?
            } else {
                None
            };
            let err = match self.send(req, crumb.as_ref()).await {
                Ok(resp) if req.expected.contains(&resp.status) => return Ok(resp),
                Ok(resp) => {
                    let err = ApiError::Status {
                        call: req.describe(),
                        status: resp.status,
                        message: error_message(&resp.body),
                    };
                    if resp.status == 403 && crumb.is_some() && !fresh_crumb {
                        debug!(call = %req.describe(), "crumb refused; fetching a new one");
                        fresh_crumb = true;
                        *self.crumb.lock().await = CrumbState::Unknown;
                        continue;
                    }
                    if resp.status == 401 && !fresh_token && self.reload_token() {
                        fresh_token = true;
                        continue;
                    }
                    err
                }
                Err(e) => e,
            };
            if !err.is_transient() {
                return Err(err);
            }
            failures += 1;
            match self.options.retry.delay(failures) {
                Some(wait) => {
                    self.retries.fetch_add(1, Ordering::Relaxed);
                    warn!(call = %req.describe(), error = %err, retry_in = ?wait, "Jenkins call failed; retrying");
                    tokio::time::sleep(wait).await;
                }
                None => return Err(err),
            }
        }
    }

    /// Reads the token file again; returns whether the token changed.
    fn reload_token(&self) -> bool {
        let Some(path) = &self.token_file else {
            return false;
        };
        match read_token_file(path) {
            Ok(new) => {
                let mut slot = self.token.write().unwrap_or_else(|p| p.into_inner());
                if slot.as_ref() == Some(&new) {
                    return false;
                }
                debug!(file = %path.display(), "API token file changed; using the new token");
                *slot = Some(new);
                true
            }
            Err(e) => {
                warn!(error = %e, "cannot re-read the API token file");
                false
            }
        }
    }

    /// The crumb to send, fetching one if needed; `None` when CSRF
    /// protection is off.
    async fn crumb(&self) -> Result<Option<Crumb>, ApiError> {
        let mut state = self.crumb.lock().await;
        match &*state {
            CrumbState::Have(c) => return Ok(Some(c.clone())),
            CrumbState::Disabled => return Ok(None),
            CrumbState::Unknown => {}
        }
        self.crumbs.fetch_add(1, Ordering::Relaxed);
        let req = GetCrumb.request();
        match Box::pin(self.execute_request(&req)).await {
            Ok(resp) => {
                let c = GetCrumb.parse(resp)?;
                *state = CrumbState::Have(c.clone());
                Ok(Some(c))
            }
            Err(e) if e.is_not_found() => {
                debug!("no crumb issuer: CSRF protection is off");
                *state = CrumbState::Disabled;
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    async fn send(&self, req: &ApiRequest, crumb: Option<&Crumb>) -> Result<ApiResponse, ApiError> {
        let mut url = self
            .base
            .join(&req.path)
            .map_err(|e| ApiError::Local(format!("{}: bad path: {e}", req.describe())))?;
        if !req.query.is_empty() {
            url.query_pairs_mut().extend_pairs(&req.query);
        }
        let mut rb = self
            .http
            .request(req.method.clone(), url)
            .timeout(self.options.timeout);
        if let Some(user) = &self.user {
            let token = self.token();
            // reqwest marks the Authorization header sensitive.
            rb = rb.basic_auth(user, token.as_ref().map(Secret::expose));
        }
        if let Some(c) = crumb {
            rb = rb.header(c.field.as_str(), c.value.as_str());
            if !c.cookies.is_empty()
                && let Ok(mut v) = HeaderValue::from_str(&c.cookies.join("; "))
            {
                v.set_sensitive(true);
                rb = rb.header(COOKIE, v);
            }
        }
        if let Some(form) = &req.form {
            let body = url::form_urlencoded::Serializer::new(String::new())
                .extend_pairs(form)
                .finish();
            rb = rb
                .header(
                    reqwest::header::CONTENT_TYPE,
                    "application/x-www-form-urlencoded",
                )
                .body(body);
        }
        self.requests.fetch_add(1, Ordering::Relaxed);
        let call = req.describe();
        let resp = rb
            .send()
            .await
            .map_err(|e| self.transport_error(&call, &e))?;
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let body = resp
            .bytes()
            .await
            .map_err(|e| self.transport_error(&call, &e))?;
        Ok(ApiResponse {
            status,
            headers,
            body,
        })
    }

    fn transport_error(&self, call: &str, e: &reqwest::Error) -> ApiError {
        if e.is_timeout() {
            ApiError::Timeout {
                call: call.to_owned(),
                timeout: self.options.timeout,
            }
        } else {
            // reqwest's message names the URL (never the credentials); the
            // source chain says why.
            let mut message = e.to_string();
            let mut source = std::error::Error::source(e);
            while let Some(s) = source {
                message.push_str(": ");
                message.push_str(&s.to_string());
                source = s.source();
            }
            ApiError::Transport {
                call: call.to_owned(),
                message,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_cap_and_gives_up() {
        let p = RetryPolicy {
            max_attempts: 5,
            base_delay: Duration::from_millis(100),
            max_delay: Duration::from_millis(250),
        };
        assert_eq!(p.delay(0), None);
        assert_eq!(p.delay(1), Some(Duration::from_millis(100)));
        assert_eq!(p.delay(2), Some(Duration::from_millis(200)));
        assert_eq!(p.delay(3), Some(Duration::from_millis(250)));
        assert_eq!(p.delay(4), Some(Duration::from_millis(250)));
        assert_eq!(p.delay(5), None);
    }

    fn conn(url: &str) -> JenkinsConnection {
        JenkinsConnection {
            url: url.into(),
            user: Some("nodepool".into()),
            api_token: Some(Secret::new("11aa22bb33cc44dd")),
            api_token_file: None,
            credentials_id: None,
            remote_fs_root: "/home/jenkins".into(),
        }
    }

    #[test]
    fn base_urls_are_checked_and_get_a_slash() {
        let c = JenkinsClient::new(
            &conn("https://ci.example/jenkins"),
            ClientOptions::default(),
        )
        .expect("client");
        assert_eq!(c.url(), "https://ci.example/jenkins/");
        let e = JenkinsClient::new(&conn("ftp://x"), ClientOptions::default()).expect_err("ftp");
        assert!(e.to_string().contains("not http"), "{e}");
        let e = JenkinsClient::new(&conn("not a url"), ClientOptions::default()).expect_err("bad");
        assert!(matches!(e, ApiError::Local(_)), "{e}");
    }

    #[test]
    fn the_token_is_not_in_debug_output() {
        let c = JenkinsClient::new(&conn("https://ci.example/"), ClientOptions::default())
            .expect("client");
        let dbg = format!("{c:?}");
        assert!(!dbg.contains("11aa22bb33cc44dd"), "{dbg}");
        assert!(dbg.contains("ci.example"), "{dbg}");
    }

    #[test]
    fn token_files_are_read_and_trimmed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("token");
        std::fs::write(&path, "  filetoken123\n").expect("write");
        let mut c = conn("https://ci.example/");
        c.api_token = None;
        c.api_token_file = Some(path.clone());
        let client = JenkinsClient::new(&c, ClientOptions::default()).expect("client");
        assert_eq!(
            client.token().as_ref().map(Secret::expose),
            Some("filetoken123")
        );
        assert!(!client.reload_token(), "unchanged");
        std::fs::write(&path, "rotated456").expect("write");
        assert!(client.reload_token(), "changed");
        assert_eq!(
            client.token().as_ref().map(Secret::expose),
            Some("rotated456")
        );
        std::fs::write(&path, "\n").expect("write");
        let e = JenkinsClient::new(&c, ClientOptions::default()).expect_err("empty");
        assert!(e.to_string().contains("empty"), "{e}");
        c.api_token_file = Some(dir.path().join("missing"));
        let e = JenkinsClient::new(&c, ClientOptions::default()).expect_err("missing");
        assert!(e.to_string().contains("cannot read"), "{e}");
    }
}
