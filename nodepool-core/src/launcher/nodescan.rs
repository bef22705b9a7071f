//! Nodescan (reference §4.4 step 5): wait until the node's SSH server
//! answers, then collect one host key per key type it offers, stored on
//! the node as `"<type> <base64>"` for Zuul to pin.
//!
//! A plain TCP connect is not enough: a forwarded port accepts connections
//! before the guest's sshd exists (measured in the DIB testbed), so the
//! scan waits for a real SSH key exchange.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use russh::keys::{Algorithm, EcdsaCurve, HashAlg};

/// Each connection attempt gives up after this long (Nodepool: 10 s).
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);
/// Pause between attempts while the node boots.
const RETRY_DELAY: Duration = Duration::from_secs(2);

struct KeyCatcher {
    key: Arc<Mutex<Option<String>>>,
}

impl russh::client::Handler for KeyCatcher {
    type Error = russh::Error;

    async fn check_server_key(
        &mut self,
        key: &russh::keys::PublicKey,
    ) -> Result<bool, Self::Error> {
        if let Ok(text) = key.to_openssh() {
            // "<type> <base64>" without a comment.
            let mut parts = text.split_whitespace();
            if let (Some(t), Some(b)) = (parts.next(), parts.next()) {
                *self.key.lock().unwrap_or_else(|p| p.into_inner()) = Some(format!("{t} {b}"));
            }
        }
        // We only wanted the key: end the handshake here.
        Ok(false)
    }
}

async fn key_for(
    host: &str,
    port: u16,
    algorithm: Algorithm,
    deadline: tokio::time::Instant,
) -> Result<Option<String>, String> {
    let key = Arc::new(Mutex::new(None));
    let config = russh::client::Config {
        preferred: russh::Preferred {
            key: std::borrow::Cow::Owned(vec![algorithm]),
            ..Default::default()
        },
        ..Default::default()
    };
    let handler = KeyCatcher { key: key.clone() };
    // Each attempt is capped, and never runs past the scan's deadline.
    let limit = deadline
        .saturating_duration_since(tokio::time::Instant::now())
        .min(ATTEMPT_TIMEOUT);
    let attempt = tokio::time::timeout(
        limit,
        russh::client::connect(Arc::new(config), (host, port), handler),
    )
    .await;
    let caught = key.lock().unwrap_or_else(|p| p.into_inner()).clone();
    match (caught, attempt) {
        (Some(k), _) => Ok(Some(k)),
        (None, Err(_)) => Err(format!("no SSH key exchange within {limit:?}")),
        (None, Ok(Err(e))) => {
            let text = e.to_string();
            // The server simply does not have a key of this type.
            if text.contains("No common") || text.contains("common algorithm") {
                Ok(None)
            } else {
                Err(text)
            }
        }
        (None, Ok(Ok(_))) => Ok(None),
    }
}

/// Scans a node until `timeout`. For SSH (and `network_cli`), returns the
/// host keys; for other connection types (WinRM), waits for the port only.
pub async fn scan(
    host: &str,
    port: u16,
    connection_type: &str,
    timeout: Duration,
) -> Result<Vec<String>, String> {
    let deadline = tokio::time::Instant::now() + timeout;
    let ssh = matches!(connection_type, "ssh" | "network_cli");
    let mut last_error;
    loop {
        if ssh {
            match key_for(host, port, Algorithm::Ed25519, deadline).await {
                Ok(first) => {
                    // The server is up: collect the other key types once.
                    let mut keys: Vec<String> = first.into_iter().collect();
                    for alg in [
                        Algorithm::Ecdsa {
                            curve: EcdsaCurve::NistP256,
                        },
                        Algorithm::Rsa {
                            hash: Some(HashAlg::Sha512),
                        },
                    ] {
                        if let Ok(Some(k)) = key_for(host, port, alg, deadline).await {
                            keys.push(k);
                        }
                    }
                    if !keys.is_empty() {
                        return Ok(keys);
                    }
                    last_error = "the SSH server offered no usable host key".into();
                }
                Err(e) => last_error = e,
            }
        } else {
            match tokio::time::timeout(
                ATTEMPT_TIMEOUT,
                tokio::net::TcpStream::connect((host, port)),
            )
            .await
            {
                Ok(Ok(_)) => return Ok(Vec::new()),
                Ok(Err(e)) => last_error = e.to_string(),
                Err(_) => last_error = "connect timed out".into(),
            }
        }
        if tokio::time::Instant::now() + RETRY_DELAY >= deadline {
            return Err(format!("gave up after {timeout:?}: {last_error}"));
        }
        tokio::time::sleep(RETRY_DELAY).await;
    }
}
