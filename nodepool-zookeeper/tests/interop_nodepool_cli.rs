//! The real Python Nodepool 11.0.0 CLI reads what our store wrote: `list`,
//! `request-list`, `dib-image-list` and `image-list`, over TLS (the only
//! way it connects).

mod common;

use std::sync::Arc;
use std::time::Duration;

use nodepool_core::model::{
    BuildState, ImageBuild, ImageUpload, Json, Node, NodeRequest, NodeState, RequestState,
    UploadState,
};
use nodepool_core::store::{LockWait, Store};

/// Runs `nodepool -c <config> <args>` and returns its stdout.
async fn nodepool(config: &std::path::Path, args: &[&str]) -> String {
    let out = tokio::time::timeout(
        Duration::from_secs(120),
        tokio::process::Command::new(common::py_nodepool())
            .arg("-c")
            .arg(config)
            .args(args)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("the CLI finishes")
    .expect("run the Python nodepool CLI");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "nodepool {args:?} failed: {}\nstdout:\n{stdout}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// The table row that contains `needle`, split into trimmed cells.
fn row(table: &str, needle: &str) -> Vec<String> {
    let line = table
        .lines()
        .find(|l| l.contains(needle))
        .unwrap_or_else(|| panic!("no row with {needle:?} in:\n{table}"));
    line.trim()
        .trim_matches('|')
        .split('|')
        .map(|c| c.trim().to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_cli_lists_what_we_wrote() {
    let chroot = common::fresh_chroot();
    let store = Store::new(Arc::new(common::connect(common::tls(&chroot)).await));

    // nodes: one ready and locked by us, one in use by Zuul
    let mut ready = Node::new(
        NodeState::Ready,
        1_700_000_000.0,
        "cloud1",
        "main",
        vec!["small".into()],
    );
    ready.external_id = Some("server-uuid-1".into());
    ready.public_ipv4 = Some("203.0.113.5".into());
    ready.interface_ip = Some("203.0.113.5".into());
    let ready_id = store.create_node(&ready).await.expect("create");
    let mut busy = Node::new(
        NodeState::InUse,
        1_700_000_000.0,
        "cloud2",
        "main",
        vec!["large".into()],
    );
    busy.external_id = Some("server-uuid-2".into());
    busy.public_ipv6 = Some("2001:db8::7".into());
    busy.allocated_to = Some("200-0000000000".into());
    busy.user_data =
        Some(Json::from_text(r#"{"zuul_system": "abc", "project_name": "p"}"#).expect("json"));
    let busy_id = store.create_node(&busy).await.expect("create");
    let guard = store
        .lock_node(&ready_id, LockWait::NonBlocking)
        .await
        .expect("lock");

    // requests
    let mut r = NodeRequest::new(
        vec!["small".into(), "large".into()],
        "zuul-system-id",
        1_700_000_000.0,
    );
    r.relative_priority = 4;
    r.event_id = Some("ev-42".into());
    r.declined_by = vec!["launcher-a".into()];
    r.set_state(RequestState::Pending, 1_700_000_001.0);
    let request_id = store
        .submit_request(&r, "100", false)
        .await
        .expect("submit");

    // an image build with two uploads, and a paused image
    let mut build = ImageBuild::new(1_700_000_000.0, vec!["qcow2".into(), "raw".into()]);
    build.set_state(BuildState::Ready, 1_700_000_010.0);
    build.builder = Some("builder01.example.org".into());
    let build_id = "0123456789abcdef0123456789abcdef";
    store
        .create_build("ubuntu-jammy", build_id, &build)
        .await
        .expect("build");
    let mut upload = ImageUpload::new(1_700_000_020.0, Some("qcow2".into()));
    upload.set_state(UploadState::Ready, 1_700_000_030.0);
    upload.external_id = Some("glance-image-1".into());
    upload.external_name = Some("ubuntu-jammy-1700000000".into());
    let upload_id = store
        .create_upload("ubuntu-jammy", build_id, "cloud1", &upload)
        .await
        .expect("upload");
    let mut building = ImageBuild::new(1_700_000_000.0, vec![]);
    building.builder = Some("builder02".into());
    store
        .create_build("centos-9", "fedcba9876543210fedcba9876543210", &building)
        .await
        .expect("build");
    store
        .set_image_paused("centos-9", true)
        .await
        .expect("pause");

    let dir = tempfile::tempdir().expect("temp dir");
    let tls = common::tls_files();
    let (host, port) = common::tls_hosts()
        .rsplit_once(':')
        .map(|(h, p)| (h.to_owned(), p.to_owned()))
        .expect("host:port");
    let config = dir.path().join("nodepool.yaml");
    std::fs::write(
        &config,
        format!(
            "zookeeper-servers:\n  - host: {host}\n    port: {port}\n    chroot: {chroot}\n\
             zookeeper-tls:\n  cert: {}\n  key: {}\n  ca: {}\n\
             labels: []\nproviders: []\ndiskimages: []\n",
            tls.cert.display(),
            tls.key.display(),
            tls.ca.display()
        ),
    )
    .expect("write config");

    let list = nodepool(&config, &["list"]).await;
    let cells = row(&list, &ready_id);
    assert_eq!(
        cells,
        [
            ready_id.as_str(),
            "cloud1",
            "small",
            "server-uuid-1",
            "203.0.113.5",
            "",
            "ready",
            cells[7].as_str(),
            "locked"
        ],
        "{list}"
    );
    let cells = row(&list, &busy_id);
    assert_eq!(
        cells[1..7],
        [
            "cloud2",
            "large",
            "server-uuid-2",
            "",
            "2001:db8::7",
            "in-use"
        ],
        "{list}"
    );
    assert_eq!(cells[8], "unlocked", "{list}");

    let detail = nodepool(&config, &["list", "--detail"]).await;
    let cells = row(&detail, &busy_id);
    assert!(
        cells.iter().any(|c| c == "200-0000000000"),
        "allocated to: {detail}"
    );
    assert!(
        cells.iter().any(|c| c.contains("zuul_system")),
        "user data: {detail}"
    );

    let requests = nodepool(&config, &["request-list"]).await;
    let cells = row(&requests, &request_id);
    assert_eq!(
        cells,
        [
            request_id.as_str(),
            "4",
            "pending",
            "zuul-system-id",
            "small,large",
            "",
            "launcher-a",
            "ev-42"
        ],
        "{requests}"
    );

    let dib = nodepool(&config, &["dib-image-list"]).await;
    let cells = row(&dib, &format!("ubuntu-jammy-{build_id}"));
    assert_eq!(
        cells[1..5],
        [
            "ubuntu-jammy",
            "builder01.example.org",
            "qcow2,raw",
            "ready"
        ],
        "{dib}"
    );
    let cells = row(&dib, "centos-9-fedcba9876543210fedcba9876543210");
    assert_eq!(cells[4], "paused", "{dib}");

    let images = nodepool(&config, &["image-list"]).await;
    let cells = row(&images, "glance-image-1");
    assert_eq!(
        cells[..7],
        [
            build_id,
            upload_id.as_str(),
            "cloud1",
            "ubuntu-jammy",
            "ubuntu-jammy-1700000000",
            "glance-image-1",
            "ready"
        ],
        "{images}"
    );

    // Locks are live: once released, the CLI sees the node unlocked.
    guard.release().await.expect("release");
    let list = nodepool(&config, &["list"]).await;
    assert_eq!(row(&list, &ready_id)[8], "unlocked", "{list}");
}
