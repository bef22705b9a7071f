//! Over TLS: a smoke subset of the conformance suite (the same code paths
//! run in plaintext in `conformance.rs`), and connection errors.

mod common;

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use nodepool_core::store::{StateStore, StoreError};
use nodepool_model::conformance::store::{self as suite, Harness};
use nodepool_zookeeper::{TlsFiles, ZooKeeperOptions, ZooKeeperStore};

struct Tls {
    options: ZooKeeperOptions,
    clients: Mutex<Vec<ZooKeeperStore>>,
}

impl Tls {
    fn new() -> Self {
        Tls {
            options: common::tls(&common::fresh_chroot()),
            clients: Mutex::new(Vec::new()),
        }
    }
}

#[async_trait]
impl Harness for Tls {
    async fn client(&self) -> Arc<dyn StateStore> {
        let c = common::connect(self.options.clone()).await;
        self.clients.lock().expect("lock").push(c.clone());
        Arc::new(c)
    }

    async fn expire(&self, client: &Arc<dyn StateStore>) {
        let id = client.session().borrow().id();
        let clients = self.clients.lock().expect("lock").clone();
        for c in clients {
            if c.session().borrow().id() == id {
                c.expire_session().await.expect("session expires");
                return;
            }
        }
        panic!("unknown client");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_crud_and_versions() {
    suite::crud_and_versions(&Tls::new()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_typed_records_round_trip() {
    suite::typed_records_round_trip(&Tls::new()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_lock_waiter_gets_it_after_release() {
    suite::lock_waiter_gets_it_after_release(&Tls::new()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_locks_released_on_expiry() {
    suite::locks_released_on_expiry(&Tls::new()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_watches_deliver_create_change_delete() {
    suite::watches_deliver_create_change_delete(&Tls::new()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_and_plaintext_see_the_same_tree() {
    let chroot = common::fresh_chroot();
    let secure = common::connect(common::tls(&chroot)).await;
    let plain = common::connect(common::plain(&chroot)).await;
    secure
        .create(
            "/nodepool/nodes/0000000001",
            b"{}",
            nodepool_core::store::CreateMode::Persistent,
        )
        .await
        .expect("create over TLS");
    let entries = plain.scan("/nodepool/nodes").await.expect("scan");
    assert_eq!(entries.len(), 2, "{entries:?}");
    assert!(
        secure.describe().ends_with("(tls)"),
        "{}",
        secure.describe()
    );
}

#[tokio::test]
async fn unreachable_server_is_reported_with_its_address() {
    // A port nothing listens on: bind one, then free it.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let mut options =
        ZooKeeperOptions::from_connect_string(&format!("127.0.0.1:{port}/x")).expect("parses");
    options.connect_timeout = Duration::from_millis(500);
    let err = ZooKeeperStore::connect(options)
        .await
        .expect_err("nothing listens there");
    match &err {
        StoreError::Unavailable { store, .. } => {
            assert!(store.contains(&format!("127.0.0.1:{port}")), "{err}")
        }
        other => panic!("not Unavailable: {other}"),
    }
}

#[tokio::test]
async fn missing_tls_files_are_named() {
    let mut files = common::tls_files();
    files.key = PathBuf::from("/nonexistent/client.key");
    let options = common::tls(&common::fresh_chroot()).with_tls(files);
    let err = ZooKeeperStore::connect(options)
        .await
        .expect_err("no key file");
    assert!(err.to_string().contains("/nonexistent/client.key"), "{err}");
    let garbage = tempfile::NamedTempFile::new().expect("temp file");
    std::fs::write(garbage.path(), "not a certificate").expect("write");
    let files = TlsFiles {
        ca: garbage.path().to_owned(),
        ..common::tls_files()
    };
    let err = ZooKeeperStore::connect(common::tls("/x").with_tls(files))
        .await
        .expect_err("bad CA");
    assert!(
        err.to_string()
            .contains(&garbage.path().display().to_string()),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connects_from_a_nodepool_yaml() {
    let chroot = common::fresh_chroot();
    let tls = common::tls_files();
    let (host, port) = common::tls_hosts()
        .rsplit_once(':')
        .map(|(h, p)| (h.to_owned(), p.to_owned()))
        .expect("host:port");
    let config = nodepool_core::config::Config::from_yaml(&format!(
        "zookeeper-servers:\n  - host: {host}\n    port: {port}\n    chroot: {chroot}\n\
         zookeeper-tls:\n  cert: {}\n  key: {}\n  ca: {}\n\
         labels: []\nproviders: []\n",
        tls.cert.display(),
        tls.key.display(),
        tls.ca.display()
    ))
    .expect("config parses");
    let store = ZooKeeperStore::from_config(&config)
        .await
        .expect("connects over TLS");
    assert_eq!(store.options().session_timeout, Duration::from_secs(10));
    store
        .create(
            "/nodepool/hello",
            b"x",
            nodepool_core::store::CreateMode::Ephemeral,
        )
        .await
        .expect("create");
    assert_eq!(store.scan("/nodepool").await.expect("scan").len(), 2);
    store.close().await.expect("close");
}
