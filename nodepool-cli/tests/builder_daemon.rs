//! The `nodepool-builder` binary as a process: it builds with the image's
//! `dib-cmd` (here a small real script standing in for diskimage-builder),
//! uploads to the simulated cloud, records everything in the SQLite file
//! this test reads from another process, reloads its configuration when
//! the file changes, dumps its state on SIGUSR2 and stops on SIGTERM.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use nodepool_core::model::{BuildState, ComponentKind, UploadState};
use nodepool_core::store::{ImageState, Store};
use nodepool_sqlite::{SqliteOptions, SqliteStore};

const BIN: &str = env!("CARGO_BIN_EXE_nodepool-builder");
const LIMIT: Duration = Duration::from_secs(60);

/// A stand-in for `disk-image-create`: writes the qcow2 file and the
/// checksum files diskimage-builder writes with `--checksum`.
const FAKE_DIB: &str = r#"#!/bin/sh
set -e
[ "$1" = -x ] || { echo "unexpected arguments: $*" >&2; exit 2; }
echo "building $DIB_IMAGE_NAME into $DIB_IMAGE_FILENAME"
head -c 65536 /dev/urandom > "$DIB_IMAGE_FILENAME.qcow2"
md5sum "$DIB_IMAGE_FILENAME.qcow2" > "$DIB_IMAGE_FILENAME.qcow2.md5"
sha256sum "$DIB_IMAGE_FILENAME.qcow2" > "$DIB_IMAGE_FILENAME.qcow2.sha256"
echo "Build completed successfully"
"#;

fn config(dir: &Path, providers: &[&str]) -> String {
    let mut y = format!(
        r#"state-store:
  driver: sqlite
  path: {dir}/nodepool.db
images-dir: {dir}/images
build-log-dir: {dir}/logs
labels:
  - name: small
diskimages:
  - name: deb
    dib-cmd: {dir}/fake-dib
    elements: [debian-minimal]
providers:
"#,
        dir = dir.display()
    );
    for p in providers {
        y += &format!(
            "  - name: {p}\n    driver: simulated\n    diskimages: [{{name: deb}}]\n    pools:\n      - name: main\n        max-servers: 2\n        labels: [{{name: small, diskimage: deb, flavor-name: \"Fake Flavor\"}}]\n"
        );
    }
    y
}

fn write_config(path: &Path, text: &str) {
    // Written aside and renamed, so the watcher never reads half a file.
    let tmp = path.with_extension("new");
    std::fs::write(&tmp, text).expect("write config");
    std::fs::rename(&tmp, path).expect("rename config");
}

async fn images(store: &Store) -> ImageState {
    store.image_state().await.expect("image state")
}

async fn until<F: Fn(&ImageState) -> bool>(
    store: &Store,
    what: &str,
    log: &Path,
    f: F,
) -> ImageState {
    let deadline = tokio::time::Instant::now() + LIMIT;
    loop {
        let st = images(store).await;
        if f(&st) {
            return st;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}: {st:#?}\n--- builder log:\n{}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn until_log(log: &Path, needle: &str) {
    let deadline = tokio::time::Instant::now() + LIMIT;
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if text.contains(needle) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {needle:?} in the log:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn ready_upload_to(st: &ImageState, provider: &str) -> bool {
    st.uploads.iter().any(|u| {
        u.provider == provider
            && u.upload.state == UploadState::Ready
            && u.upload.external_id.is_some()
    })
}

fn signal(child: &tokio::process::Child, sig: &str) {
    let pid = child.id().expect("running").to_string();
    let ok = std::process::Command::new("kill")
        .args([&format!("-{sig}"), &pid])
        .status()
        .expect("run kill");
    assert!(ok.success(), "kill -{sig} {pid}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_builder_daemon_builds_uploads_reloads_dumps_and_stops() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let dib = d.join("fake-dib");
    std::fs::write(&dib, FAKE_DIB).expect("write fake dib");
    std::fs::set_permissions(&dib, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let cfg: PathBuf = d.join("nodepool.yaml");
    write_config(&cfg, &config(d, &["p1"]));
    let log = d.join("builder.log");
    let pidfile = d.join("builder.pid");
    let mut child = tokio::process::Command::new(BIN)
        .args(["-c", &cfg.display().to_string()])
        .args(["-p", &pidfile.display().to_string()])
        .args(["--upload-workers", "2", "--log-format", "json", "-d"])
        .stderr(std::fs::File::create(&log).expect("log file"))
        .kill_on_drop(true)
        .spawn()
        .expect("start nodepool-builder");

    // The daemon creates the database; open it once it exists.
    let db = d.join("nodepool.db");
    let deadline = tokio::time::Instant::now() + LIMIT;
    while !db.exists() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no database created"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let store = Store::new(Arc::new(
        SqliteStore::open(&db, SqliteOptions::default())
            .await
            .expect("open the daemon's database"),
    ));
    let st = until(&store, "an upload to p1", &log, |st| {
        ready_upload_to(st, "p1")
    })
    .await;
    assert_eq!(st.builds.len(), 1);
    assert_eq!(st.builds[0].build.state, BuildState::Ready);
    assert_eq!(st.builds[0].build.formats, ["qcow2"]);
    let pid: u32 = std::fs::read_to_string(&pidfile)
        .expect("pid file")
        .trim()
        .parse()
        .expect("a pid");
    assert_eq!(Some(pid), child.id());
    let comps = store
        .list_components(ComponentKind::Builder)
        .await
        .expect("components");
    assert_eq!(comps.records.len(), 1);

    // Hot reload: a second provider gets the image.
    write_config(&cfg, &config(d, &["p1", "p2"]));
    until(&store, "an upload to p2 after the reload", &log, |st| {
        ready_upload_to(st, "p2")
    })
    .await;

    signal(&child, "USR2");
    until_log(&log, "state dump (SIGUSR2)").await;

    signal(&child, "TERM");
    let status = tokio::time::timeout(LIMIT, child.wait())
        .await
        .expect("stops within the limit")
        .expect("wait");
    assert!(status.success(), "{status}");
    assert!(!pidfile.exists(), "pid file removed");
    let comps = store
        .list_components(ComponentKind::Builder)
        .await
        .expect("components");
    assert!(comps.records.is_empty(), "unregistered");
    assert!(d.join("images/builder_id.txt").exists());
    store.backend().close().await.ok();
}

#[tokio::test]
async fn the_builder_daemon_needs_an_images_dir() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = dir.path().join("nodepool.yaml");
    let text = config(dir.path(), &["p1"]).replace(
        &format!("images-dir: {}/images\n", dir.path().display()),
        "",
    );
    write_config(&cfg, &text);
    let out = tokio::process::Command::new(BIN)
        .args(["-c", &cfg.display().to_string()])
        .output()
        .await
        .expect("run");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("images-dir"), "{err}");
}

#[tokio::test]
async fn the_builder_daemon_refuses_a_provider_whose_cloud_cannot_be_loaded() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let cfg = d.join("nodepool.yaml");
    write_config(
        &cfg,
        &format!(
            "{}  - name: os\n    cloud: mycloud\n    diskimages: [{{name: deb}}]\n    pools: [{{name: main, labels: [{{name: small, diskimage: deb, min-ram: 512}}]}}]\n",
            config(d, &["p1"])
        ),
    );
    let clouds = d.join("clouds.yaml");
    std::fs::write(
        &clouds,
        "clouds:\n  mycloud:\n    image_format: [raw]\n    auth: {auth_url: 'http://k/v3', user_id: u, password: pw-never-shown}\n",
    )
    .expect("write clouds.yaml");
    let out = tokio::process::Command::new(BIN)
        .args(["-c", &cfg.display().to_string()])
        .current_dir(d)
        .env("HOME", d)
        .env_remove("XDG_CONFIG_HOME")
        .env_remove("OS_CLOUD")
        .env_remove("OS_CLIENT_SECURE_FILE")
        .env("OS_CLIENT_CONFIG_FILE", &clouds)
        .output()
        .await
        .expect("run");
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        format!(
            "nodepool-builder: 1 cloud configuration error:\n  \
             providers.os (cloud \"mycloud\"): {}: clouds.mycloud.image_format: expected a string, found a list\n",
            clouds.display()
        )
    );
    assert!(!d.join("nodepool.db").exists(), "nothing created");
    assert!(!d.join("images").exists(), "nothing created");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_builders_configuration_and_sigusr1_is_ignored() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let dib = d.join("fake-dib");
    std::fs::write(&dib, FAKE_DIB).expect("write fake dib");
    std::fs::set_permissions(&dib, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let cfg: PathBuf = d.join("nodepool.yaml");
    write_config(&cfg, &config(d, &["p1"]));
    let log = d.join("builder.log");
    let mut child = tokio::process::Command::new(BIN)
        .args(["-c", &cfg.display().to_string()])
        .args(["--log-format", "json"])
        .stderr(std::fs::File::create(&log).expect("log file"))
        .kill_on_drop(true)
        .spawn()
        .expect("start nodepool-builder");
    // Signal handlers are in place before the store is opened.
    until_log(&log, "state store open").await;

    signal(&child, "USR1");
    until_log(&log, "SIGUSR1: ignored").await;
    assert!(
        child.try_wait().expect("poll").is_none(),
        "SIGUSR1 killed it"
    );
    assert!(
        !std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("configuration reloaded"),
        "nothing reloaded yet"
    );

    signal(&child, "HUP");
    until_log(&log, "\"trigger\":\"SIGHUP\"").await;
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        text.lines()
            .any(|l| l.contains("configuration reloaded") && l.contains("\"trigger\":\"SIGHUP\"")),
        "{text}"
    );
    assert!(
        child.try_wait().expect("poll").is_none(),
        "SIGHUP killed it"
    );

    signal(&child, "TERM");
    let status = tokio::time::timeout(LIMIT, child.wait())
        .await
        .expect("stops within the limit")
        .expect("wait");
    assert!(status.success(), "{status}");
}
