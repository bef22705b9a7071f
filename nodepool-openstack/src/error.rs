//! This crate's own error, and how it maps to [`ProviderError`] meanings.

use nodepool_model::provider::ProviderError;
use serde_json::Value;

/// What went wrong with an API call.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ApiError {
    /// The cloud answered with an unexpected status.
    #[error("{call}: HTTP {status}: {message}")]
    Status {
        /// `compute POST servers`.
        call: String,
        /// HTTP status.
        status: u16,
        /// The cloud's message (scrubbed of secrets).
        message: String,
    },
    /// The cloud refused the call for its request rate (HTTP 429), and
    /// its `Retry-After` was too long to wait for within the call.
    #[error("{call}: HTTP 429: {message}")]
    RateLimited {
        /// The call.
        call: String,
        /// The cloud's message (scrubbed of secrets).
        message: String,
        /// The cloud's `Retry-After`, when it sent one.
        retry_after: Option<std::time::Duration>,
    },
    /// The call took longer than its timeout.
    #[error("{call}: no answer within {:.1} s", .timeout.as_secs_f64())]
    Timeout {
        /// The call.
        call: String,
        /// The timeout.
        timeout: std::time::Duration,
    },
    /// The connection failed (refused, reset, DNS, TLS).
    #[error("{call}: {message}")]
    Transport {
        /// The call.
        call: String,
        /// What happened.
        message: String,
    },
    /// Keystone refused the credentials, or a fresh token was refused.
    #[error("{0}")]
    Unauthenticated(String),
    /// The catalog has no usable endpoint for a service.
    #[error("{0}")]
    NoEndpoint(String),
    /// The answer could not be read.
    #[error("{0}")]
    Decode(String),
    /// A local problem (file not readable, ...).
    #[error("{0}")]
    Local(String),
}

impl ApiError {
    /// HTTP status, if the cloud answered.
    pub fn status(&self) -> Option<u16> {
        match self {
            ApiError::Status { status, .. } => Some(*status),
            ApiError::RateLimited { .. } => Some(429),
            _ => None,
        }
    }

    /// Whether this is a 404.
    pub fn is_not_found(&self) -> bool {
        self.status() == Some(404)
    }

    /// The error with every secret replaced by `<redacted>`.
    pub(crate) fn scrubbed(self, secrets: &[String]) -> ApiError {
        let s = |m: String| scrub(&m, secrets);
        match self {
            ApiError::Status {
                call,
                status,
                message,
            } => ApiError::Status {
                call: s(call),
                status,
                message: s(message),
            },
            ApiError::RateLimited {
                call,
                message,
                retry_after,
            } => ApiError::RateLimited {
                call: s(call),
                message: s(message),
                retry_after,
            },
            ApiError::Timeout { call, timeout } => ApiError::Timeout {
                call: s(call),
                timeout,
            },
            ApiError::Transport { call, message } => ApiError::Transport {
                call: s(call),
                message: s(message),
            },
            ApiError::Unauthenticated(m) => ApiError::Unauthenticated(s(m)),
            ApiError::NoEndpoint(m) => ApiError::NoEndpoint(s(m)),
            ApiError::Decode(m) => ApiError::Decode(s(m)),
            ApiError::Local(m) => ApiError::Local(s(m)),
        }
    }
}

/// Replaces every occurrence of a secret in `text`.
pub(crate) fn scrub(text: &str, secrets: &[String]) -> String {
    let mut out = text.to_owned();
    for s in secrets {
        // Very short "secrets" would redact ordinary words.
        if s.len() >= 4 && out.contains(s.as_str()) {
            out = out.replace(s.as_str(), "<redacted>");
        }
    }
    out
}

pub use nodepool_model::cloud::is_quota_message;

/// The human message of an OpenStack error body: Nova's
/// `{"forbidden": {"message": ...}}`, Neutron's `{"NeutronError":
/// {"message": ...}}`, Keystone's `{"error": {"message": ...}}`, or the
/// text itself (Glance answers with HTML/plain text), shortened.
pub fn error_message(body: &[u8]) -> String {
    if let Ok(v) = serde_json::from_slice::<Value>(body)
        && let Some(m) = find_message(&v, 0)
    {
        return shorten(&m);
    }
    let text = String::from_utf8_lossy(body);
    let text: String = text.split_whitespace().collect::<Vec<_>>().join(" ");
    if text.is_empty() {
        "(empty body)".to_owned()
    } else {
        shorten(&text)
    }
}

fn find_message(v: &Value, depth: u8) -> Option<String> {
    match v {
        Value::Object(m) => {
            for key in ["message", "faultstring", "title"] {
                if let Some(Value::String(s)) = m.get(key) {
                    return Some(s.clone());
                }
            }
            if depth < 2 {
                m.values().find_map(|v| find_message(v, depth + 1))
            } else {
                None
            }
        }
        _ => None,
    }
}

fn shorten(s: &str) -> String {
    const MAX: usize = 500;
    if s.len() <= MAX {
        return s.to_owned();
    }
    let mut end = MAX;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &s[..end])
}

impl From<ApiError> for ProviderError {
    fn from(e: ApiError) -> Self {
        let text = e.to_string();
        match &e {
            ApiError::Status {
                status, message, ..
            } => match *status {
                404 => ProviderError::NotFound(text),
                401 => ProviderError::Unauthenticated(text),
                403 | 409 | 413 if is_quota_message(message) => ProviderError::QuotaExceeded(text),
                400 | 403 | 409 | 413 | 422 => ProviderError::InvalidRequest(text),
                429 => ProviderError::RateLimited {
                    message: text,
                    retry_after: None,
                },
                500..=599 => ProviderError::Transient(text),
                _ => ProviderError::Other(text),
            },
            ApiError::RateLimited { retry_after, .. } => ProviderError::RateLimited {
                message: text,
                retry_after: *retry_after,
            },
            ApiError::Timeout { .. } => ProviderError::Timeout(text),
            ApiError::Transport { .. } => ProviderError::Transient(text),
            ApiError::Unauthenticated(_) => ProviderError::Unauthenticated(text),
            ApiError::NoEndpoint(_) => ProviderError::InvalidRequest(text),
            ApiError::Decode(_) | ApiError::Local(_) => ProviderError::Other(text),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(status: u16, message: &str) -> ProviderError {
        ApiError::Status {
            call: "compute POST servers".into(),
            status,
            message: message.into(),
        }
        .into()
    }

    #[test]
    fn statuses_map_to_meanings() {
        let q = "Quota exceeded for instances: Requested 1, but already used 10 of 10 instances";
        assert!(matches!(status(403, q), ProviderError::QuotaExceeded(_)));
        assert!(matches!(status(413, q), ProviderError::QuotaExceeded(_)));
        assert!(matches!(
            status(409, "Quota exceeded for resources: ['floatingip']."),
            ProviderError::QuotaExceeded(_)
        ));
        assert!(matches!(
            status(403, "Policy doesn't allow os_compute_api:servers:create"),
            ProviderError::InvalidRequest(_)
        ));
        assert!(matches!(status(404, "x"), ProviderError::NotFound(_)));
        assert!(matches!(
            status(401, "x"),
            ProviderError::Unauthenticated(_)
        ));
        assert!(matches!(
            status(400, "bad"),
            ProviderError::InvalidRequest(_)
        ));
        assert!(matches!(status(500, "boom"), ProviderError::Transient(_)));
        assert!(matches!(status(503, "busy"), ProviderError::Transient(_)));
        assert!(matches!(
            status(429, "slow"),
            ProviderError::RateLimited {
                retry_after: None,
                ..
            }
        ));
        let limited: ProviderError = ApiError::RateLimited {
            call: "compute GET limits".into(),
            message: "slow down (Retry-After: 30)".into(),
            retry_after: Some(std::time::Duration::from_secs(30)),
        }
        .into();
        assert_eq!(
            limited.retry_after(),
            Some(std::time::Duration::from_secs(30))
        );
        assert_eq!(
            limited.to_string(),
            "rate limited: compute GET limits: HTTP 429: slow down (Retry-After: 30)"
        );
        assert!(limited.is_api_failure());
        let t: ProviderError = ApiError::Timeout {
            call: "c".into(),
            timeout: std::time::Duration::from_secs(1),
        }
        .into();
        assert!(matches!(t, ProviderError::Timeout(_)));
        assert_eq!(
            status(403, q).to_string(),
            format!("quota exceeded: compute POST servers: HTTP 403: {q}")
        );
    }

    #[test]
    fn messages_from_each_service() {
        assert_eq!(
            error_message(br#"{"forbidden": {"message": "Quota exceeded", "code": 403}}"#),
            "Quota exceeded"
        );
        assert_eq!(
            error_message(br#"{"NeutronError": {"type": "OverQuota", "message": "Quota exceeded for resources", "detail": ""}}"#),
            "Quota exceeded for resources"
        );
        assert_eq!(
            error_message(br#"{"error": {"code": 401, "title": "Unauthorized", "message": "The request you have made requires authentication."}}"#),
            "The request you have made requires authentication."
        );
        assert_eq!(
            error_message(b"<html>\n<h1>413 Request Entity Too Large</h1>\n</html>"),
            "<html> <h1>413 Request Entity Too Large</h1> </html>"
        );
        assert_eq!(error_message(b""), "(empty body)");
        let long = "é".repeat(400);
        assert!(error_message(long.as_bytes()).len() <= 503);
    }

    #[test]
    fn scrub_replaces_secrets() {
        let e = ApiError::Status {
            call: "c".into(),
            status: 400,
            message: "bad password hunter2 for token gAAAAtok".into(),
        }
        .scrubbed(&["hunter2".into(), "gAAAAtok".into(), "ab".into()]);
        assert_eq!(
            e.to_string(),
            "c: HTTP 400: bad password <redacted> for token <redacted>"
        );
    }
}
