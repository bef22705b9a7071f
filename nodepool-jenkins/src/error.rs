//! This crate's own error, and how it maps to [`ConsumerError`] meanings.

use nodepool_model::consumer::ConsumerError;

/// What went wrong with a Jenkins call.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ApiError {
    /// Jenkins answered with an unexpected status.
    #[error("{call}: HTTP {status}: {message}")]
    Status {
        /// `POST /computer/doCreateItem`.
        call: String,
        /// HTTP status.
        status: u16,
        /// A short form of Jenkins' answer (scrubbed of secrets).
        message: String,
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
    /// The answer could not be read.
    #[error("{0}")]
    Decode(String),
    /// A local problem (token file unreadable, bad URL).
    #[error("{0}")]
    Local(String),
}

impl ApiError {
    /// HTTP status, if Jenkins answered.
    pub fn status(&self) -> Option<u16> {
        match self {
            ApiError::Status { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// Whether this is a 404.
    pub fn is_not_found(&self) -> bool {
        self.status() == Some(404)
    }

    /// Whether trying again later may help: 5xx, timeouts, connection
    /// failures.
    pub fn is_transient(&self) -> bool {
        match self {
            ApiError::Status { status, .. } => *status >= 500,
            ApiError::Timeout { .. } | ApiError::Transport { .. } => true,
            ApiError::Decode(_) | ApiError::Local(_) => false,
        }
    }

    /// A short stable label for metrics.
    pub fn metric_label(&self) -> &'static str {
        match self {
            ApiError::Status { status, .. } => match status {
                401 => "unauthorized",
                403 => "forbidden",
                404 => "not_found",
                400 | 409 => "conflict",
                s if *s >= 500 => "server_error",
                _ => "status",
            },
            ApiError::Timeout { .. } => "timeout",
            ApiError::Transport { .. } => "transport",
            ApiError::Decode(_) => "decode",
            ApiError::Local(_) => "local",
        }
    }

    /// The error with every secret replaced by `<redacted>`.
    pub(crate) fn scrubbed(self, secrets: &[&str]) -> ApiError {
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
            ApiError::Timeout { call, timeout } => ApiError::Timeout {
                call: s(call),
                timeout,
            },
            ApiError::Transport { call, message } => ApiError::Transport {
                call: s(call),
                message: s(message),
            },
            ApiError::Decode(m) => ApiError::Decode(s(m)),
            ApiError::Local(m) => ApiError::Local(s(m)),
        }
    }
}

/// Replaces every occurrence of a secret in `text`.
pub(crate) fn scrub(text: &str, secrets: &[&str]) -> String {
    let mut out = text.to_owned();
    for s in secrets {
        // Very short "secrets" would redact ordinary words.
        if s.len() >= 4 && out.contains(s) {
            out = out.replace(s, "<redacted>");
        }
    }
    out
}

/// A short, single-line form of an error page (Jenkins answers HTML; its
/// `<title>` or the first text says what went wrong).
pub fn error_message(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let title = text
        .split("<title>")
        .nth(1)
        .and_then(|t| t.split("</title>").next());
    // Jenkins' Failure pages (e.g. "Agent called ‘x’ already exists") put
    // the reason in the body, not the title; prefer the first <h1>/<p>.
    let heading = text
        .split("<h1>")
        .nth(1)
        .and_then(|t| t.split("</h1>").next())
        .or_else(|| {
            text.split("<p>")
                .nth(1)
                .and_then(|t| t.split("</p>").next())
        });
    let chosen = heading.or(title).unwrap_or(&text);
    let plain: String = strip_tags(chosen)
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ");
    let mut out: String = plain.chars().take(300).collect();
    if plain.chars().count() > 300 {
        out.push('…');
    }
    out
}

fn strip_tags(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut in_tag = false;
    for c in s.chars() {
        match c {
            '<' => in_tag = true,
            '>' => in_tag = false,
            c if !in_tag => out.push(c),
            _ => {}
        }
    }
    out
}

impl From<ApiError> for ConsumerError {
    fn from(e: ApiError) -> Self {
        let text = e.to_string();
        match &e {
            ApiError::Status { status: 401, .. } => ConsumerError::Unauthenticated(text),
            // Missing permission, or a crumb refused even after a fresh one.
            ApiError::Status { status: 403, .. } => ConsumerError::Unauthenticated(text),
            ApiError::Status { status: 404, .. } => ConsumerError::NotFound(text),
            ApiError::Status { status: 409, .. } => ConsumerError::Conflict(text),
            // Jenkins answers a taken agent name with 400 "already exists".
            ApiError::Status {
                status: 400,
                message,
                ..
            } if message.contains("already exists") => ConsumerError::Conflict(text),
            e if e.is_transient() => ConsumerError::Transient(text),
            _ => ConsumerError::Other(text),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(status: u16, message: &str) -> ApiError {
        ApiError::Status {
            call: "POST /computer/doCreateItem".into(),
            status,
            message: message.into(),
        }
    }

    #[test]
    fn statuses_map_to_meanings() {
        let m = |e: ApiError| ConsumerError::from(e);
        assert!(matches!(
            m(status(401, "")),
            ConsumerError::Unauthenticated(_)
        ));
        assert!(matches!(
            m(status(403, "No valid crumb")),
            ConsumerError::Unauthenticated(_)
        ));
        assert!(matches!(m(status(404, "")), ConsumerError::NotFound(_)));
        assert!(matches!(m(status(409, "")), ConsumerError::Conflict(_)));
        assert!(matches!(
            m(status(400, "Agent called ‘x’ already exists")),
            ConsumerError::Conflict(_)
        ));
        assert!(matches!(m(status(400, "No mode")), ConsumerError::Other(_)));
        for s in [500, 502, 503, 504] {
            assert!(
                matches!(m(status(s, "")), ConsumerError::Transient(_)),
                "{s}"
            );
        }
        assert!(matches!(
            m(ApiError::Transport {
                call: "GET /".into(),
                message: "connection refused".into()
            }),
            ConsumerError::Transient(_)
        ));
        assert!(matches!(
            m(ApiError::Timeout {
                call: "GET /".into(),
                timeout: std::time::Duration::from_secs(1)
            }),
            ConsumerError::Transient(_)
        ));
        assert!(matches!(
            m(ApiError::Decode("x".into())),
            ConsumerError::Other(_)
        ));
        assert_eq!(status(503, "").metric_label(), "server_error");
    }

    #[test]
    fn error_pages_are_shortened() {
        let page = "<html><head><title>Error 400 Bad Request</title></head><body><h1>Agent called &lsquo;x&rsquo; already\n exists</h1><p>more</p></body></html>";
        assert_eq!(
            error_message(page.as_bytes()),
            "Agent called &lsquo;x&rsquo; already exists"
        );
        assert_eq!(
            error_message(b"<html><title>Not Found</title></html>"),
            "Not Found"
        );
        assert_eq!(error_message(b"plain text"), "plain text");
        assert!(error_message("x".repeat(1000).as_bytes()).chars().count() <= 301);
    }

    #[test]
    fn secrets_are_scrubbed() {
        let e = status(401, "token s3cr3t-token refused").scrubbed(&["s3cr3t-token", "ab"]);
        assert_eq!(
            e.to_string(),
            "POST /computer/doCreateItem: HTTP 401: token <redacted> refused"
        );
    }
}
