//! Test support: where the test ZooKeeper is, and fresh chroots.
//!
//! Tests need the real ZooKeeper that `scripts/zookeeper.sh start` runs;
//! they fail (never skip) when its variables are missing.

#![allow(dead_code)]

use std::path::PathBuf;
use std::time::Duration;

use nodepool_zookeeper::{TlsFiles, ZooKeeperOptions, ZooKeeperStore};

fn var(name: &str) -> String {
    match std::env::var(name) {
        Ok(v) if !v.is_empty() => v,
        _ => panic!(
            "{name} is not set: start the test ZooKeeper with \
             `scripts/zookeeper.sh start && eval \"$(scripts/zookeeper.sh env)\"` \
             (scripts/test.sh does both)"
        ),
    }
}

/// A chroot no other test uses.
pub fn fresh_chroot() -> String {
    format!("/nodepool-rs-test/{}", uuid::Uuid::new_v4().simple())
}

/// Plaintext options for a chroot.
pub fn plain(chroot: &str) -> ZooKeeperOptions {
    ZooKeeperOptions::from_connect_string(&var("NODEPOOL_TEST_ZK_HOSTS"))
        .expect("NODEPOOL_TEST_ZK_HOSTS parses")
        .with_chroot(chroot)
}

/// The TLS client files of the test ZooKeeper.
pub fn tls_files() -> TlsFiles {
    TlsFiles {
        ca: PathBuf::from(var("NODEPOOL_TEST_ZK_CA")),
        cert: PathBuf::from(var("NODEPOOL_TEST_ZK_CERT")),
        key: PathBuf::from(var("NODEPOOL_TEST_ZK_KEY")),
    }
}

/// TLS options for a chroot.
pub fn tls(chroot: &str) -> ZooKeeperOptions {
    ZooKeeperOptions::from_connect_string(&var("NODEPOOL_TEST_ZK_TLS_HOSTS"))
        .expect("NODEPOOL_TEST_ZK_TLS_HOSTS parses")
        .with_chroot(chroot)
        .with_tls(tls_files())
}

/// The TLS connect string (`host:port`), for Python peers.
pub fn tls_hosts() -> String {
    var("NODEPOOL_TEST_ZK_TLS_HOSTS")
}

/// The plaintext connect string (`host:port`), for Python peers.
pub fn plain_hosts() -> String {
    var("NODEPOOL_TEST_ZK_HOSTS")
}

/// Connects, failing the test with the reason.
pub async fn connect(options: ZooKeeperOptions) -> ZooKeeperStore {
    let what = options.describe();
    ZooKeeperStore::connect(options).await.unwrap_or_else(|e| {
        panic!("connect to {what}: {e} (is `scripts/zookeeper.sh start` running?)")
    })
}

/// Polls `f` until it returns true, for at most `limit`.
pub async fn eventually<F, Fut>(limit: Duration, what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if f().await {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The venv's python (from `scripts/python-env.sh`).
pub fn python() -> String {
    python_var("NODEPOOL_TEST_PYTHON")
}

/// The venv's `nodepool` CLI (Python Nodepool 11.0.0).
pub fn py_nodepool() -> String {
    python_var("NODEPOOL_TEST_PY_NODEPOOL")
}

fn python_var(name: &str) -> String {
    match std::env::var(name) {
        Ok(v) if !v.is_empty() && std::path::Path::new(&v).exists() => v,
        _ => panic!(
            "{name} is not set or does not exist: create the Python peers with \
             `eval \"$(scripts/python-env.sh)\"` (scripts/test.sh does it)"
        ),
    }
}
