//! Component registrations that cannot be read: listed as malformed and
//! warned about once per version, like malformed nodes and requests.

use std::io::Write;
use std::sync::{Arc, Mutex};

use nodepool_model::model::{Component, ComponentKind, WireRecord};
use nodepool_model::store::{CreateMode, MemoryStore, StateStore, Store};

/// Log lines written by the subscriber under test.
#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Capture {
    fn warnings_about(&self, path: &str) -> usize {
        let text =
            String::from_utf8_lossy(&self.0.lock().unwrap_or_else(|p| p.into_inner())).into_owned();
        text.lines()
            .filter(|l| l.contains("WARN") && l.contains(path))
            .count()
    }
}

#[tokio::test(flavor = "current_thread")]
async fn malformed_component_registrations_are_warned_about_once() {
    let capture = Capture::default();
    let writer = capture.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let mem = MemoryStore::new();
    let backend = mem.new_session();
    let store = Store::new(Arc::new(mem.new_session()));
    let good = Component::pool(
        "h1",
        "1",
        "h1-PoolWorker.p-main-1",
        "p",
        "main",
        vec![],
        100,
    );
    store.register_component(&good).await.expect("register");
    let empty = "/nodepool/components/pool/empty0000000001";
    let garbled = "/nodepool/components/pool/garbled0000000002";
    backend
        .create(empty, b"", CreateMode::Persistent)
        .await
        .expect("create");
    backend
        .create(garbled, b"{\"kind\": 7", CreateMode::Persistent)
        .await
        .expect("create");

    for _ in 0..3 {
        let listed = store
            .list_components(ComponentKind::Pool)
            .await
            .expect("list");
        assert_eq!(listed.records.len(), 1, "the good one is listed");
        let mut paths: Vec<&str> = listed.malformed.iter().map(|m| m.path.as_str()).collect();
        paths.sort_unstable();
        assert_eq!(paths, [empty, garbled]);
        let reason = |p: &str| {
            listed
                .malformed
                .iter()
                .find(|m| m.path == p)
                .map(|m| m.reason.clone())
                .unwrap_or_default()
        };
        assert_eq!(reason(empty), "empty record");
        assert!(!reason(garbled).is_empty());
    }
    assert_eq!(
        capture.warnings_about(empty),
        1,
        "one warning for the empty one"
    );
    assert_eq!(
        capture.warnings_about(garbled),
        1,
        "one warning for the garbled one"
    );

    // A new version is read (and warned about, if still bad) again.
    backend.set(garbled, b"[]", None).await.expect("rewrite");
    store
        .list_components(ComponentKind::Pool)
        .await
        .expect("list");
    assert_eq!(capture.warnings_about(garbled), 2);
    // Fixed, it is listed.
    backend
        .set(garbled, &good.to_json(), None)
        .await
        .expect("fix");
    let listed = store
        .list_components(ComponentKind::Pool)
        .await
        .expect("list");
    assert_eq!(listed.records.len(), 2);
    assert_eq!(capture.warnings_about(garbled), 2);
}
