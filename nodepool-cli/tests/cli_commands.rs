//! The changing subcommands as real processes, on a populated SQLite file
//! and ZooKeeper chroot: effects in the store, prompts, refusals, errors.

mod common;

use std::os::unix::fs::PermissionsExt;

use common::{Backend, Fixture, populate, row};
use nodepool_core::model::{BuildState, NodeState, UploadState};
use nodepool_core::store::LockWait;

async fn image_build_requests_a_build(backend: Backend) {
    let f = Fixture::new(backend).await;
    let out = f.run(&["image-build", "centos"]).await;
    assert_eq!(out.ok(), "build of centos requested\n");
    let st = f.store.image_state().await.expect("images");
    assert!(st.build_requests.contains_key("centos"));
    let t = f.run(&["image-status"]).await.ok().to_owned();
    assert_eq!(row(&t, "centos")[2], "pending");

    f.run(&["image-build", "nonesuch"])
        .await
        .fails_with("unknown diskimage \"nonesuch\"");
    f.run(&["image-build", "frozen"])
        .await
        .fails_with("paused in the configuration");
    assert!(
        !f.store
            .image_state()
            .await
            .expect("images")
            .build_requests
            .contains_key("frozen")
    );
}
both_stores!(image_build_requests_a_build);

/// Seed 002's "Manually generate a new snapshot": `image-update PROVIDER
/// IMAGE` records the build request the builder serves for snapshot
/// images; other images and providers are refused by name.
async fn image_update_requests_a_new_snapshot(backend: Backend) {
    let f = Fixture::with_body_in(backend, |dir| {
        std::fs::write(dir.join("setup.sh"), "true\n").expect("script");
        std::fs::write(dir.join("id_test"), "key\n").expect("key");
        let images = format!(
            "    images:\n      - {{name: prepared, base-image: plain, setup: setup.sh, username: jenkins, private-key: {}, min-ram: 1}}\n      - {{name: held, base-image: plain, setup: setup.sh, username: jenkins, private-key: {}, min-ram: 1, pause: true}}\n    cloud-images:",
            dir.join("id_test").display(),
            dir.join("id_test").display()
        );
        format!(
            "script-dir: {}\n{}",
            dir.display(),
            common::BODY.replacen("    cloud-images:", &images, 1)
        )
    })
    .await;
    let out = f.run(&["image-update", "sim", "prepared"]).await;
    assert_eq!(out.ok(), "snapshot of prepared in sim requested\n");
    let st = f.store.image_state().await.expect("images");
    assert!(st.build_requests.contains_key("prepared"));
    // Paused in the store before its first snapshot (it has no record
    // yet): the builder makes none until it is unpaused, and a request
    // made meanwhile is kept for then.
    assert_eq!(
        f.run(&["image-pause", "prepared"]).await.ok(),
        "image prepared paused\n"
    );
    let st = f.store.image_state().await.expect("images");
    assert!(st.paused.contains("prepared"));
    f.run(&["image-update", "sim", "prepared"]).await.ok();
    f.run(&["image-update", "nowhere", "prepared"])
        .await
        .fails_with("unknown provider \"nowhere\"");
    f.run(&["image-update", "sim", "ubuntu"])
        .await
        .fails_with("provider sim has no snapshot image \"ubuntu\"");
    f.run(&["image-update", "sim", "held"])
        .await
        .fails_with("snapshot image held is paused");
    let st = f.store.image_state().await.expect("images");
    assert!(!st.build_requests.contains_key("held"));
}
both_stores!(image_update_requests_a_new_snapshot);

async fn image_upload_records_an_upload_request(backend: Backend) {
    let f = Fixture::new(backend).await;
    f.run(&["image-upload", "sim", "ubuntu"])
        .await
        .fails_with("no ready build");
    let d = populate(&f.store).await;
    let out = f.run(&["image-upload", "sim", "ubuntu"]).await;
    assert_eq!(
        out.ok(),
        format!(
            "upload of ubuntu build {} to sim requested\n",
            d.ubuntu_build
        )
    );
    let st = f.store.image_state().await.expect("images");
    assert!(
        st.upload_requests
            .contains_key(&("ubuntu".to_owned(), "sim".to_owned())),
        "{:?}",
        st.upload_requests
    );
    f.run(&["image-upload", "nowhere", "ubuntu"])
        .await
        .fails_with("unknown provider \"nowhere\"");
    f.run(&["image-upload", "sim", "frozen"])
        .await
        .fails_with("does not take diskimage \"frozen\"");
}
both_stores!(image_upload_records_an_upload_request);

async fn image_delete_refuses_uploads_in_progress_and_does_not_ask(backend: Backend) {
    let f = Fixture::new(backend).await;
    let d = populate(&f.store).await;
    let args = |upload: &str| {
        vec![
            "image-delete".to_owned(),
            "--provider".into(),
            "sim".into(),
            "--image".into(),
            "ubuntu".into(),
            "--build-id".into(),
            d.ubuntu_build.clone(),
            "--upload-id".into(),
            upload.to_owned(),
        ]
    };
    let a = args(&d.uploading_upload);
    let a: Vec<&str> = a.iter().map(String::as_str).collect();
    f.run(&a).await.fails_with("the upload is in progress");

    let a = args(&d.ready_upload);
    let a: Vec<&str> = a.iter().map(String::as_str).collect();
    let state = |f: &Fixture| {
        let (b, u) = (d.ubuntu_build.clone(), d.ready_upload.clone());
        let store = f.store.clone();
        async move {
            store
                .get_upload("ubuntu", &b, "sim", &u)
                .await
                .expect("read")
                .expect("exists")
                .value
                .state
        }
    };
    assert_eq!(state(&f).await, UploadState::Ready);
    // Python's image-delete does not ask, so neither does ours (a
    // script's stdin is never read).
    let out = f.run_with_input(&a, "n\n").await;
    assert!(out.ok().contains("marked for deletion"));
    assert!(!out.stderr.contains("[N/y]"), "{}", out.stderr);
    assert_eq!(state(&f).await, UploadState::Deleting);

    let a = args("0000000077");
    let mut a: Vec<&str> = a.iter().map(String::as_str).collect();
    a.push("--yes");
    f.run(&a).await.fails_with("not found");
}
both_stores!(image_delete_refuses_uploads_in_progress_and_does_not_ask);

async fn dib_image_delete_refuses_builds_in_progress(backend: Backend) {
    let f = Fixture::new(backend).await;
    let d = populate(&f.store).await;
    f.run(&["dib-image-delete", &format!("ubuntu-{}", d.building_build)])
        .await
        .fails_with("still building");
    let out = f
        .run(&[
            "dib-image-delete",
            "--yes",
            &format!("ubuntu-{}", d.ubuntu_build),
        ])
        .await;
    out.ok();
    let b = f
        .store
        .get_build("ubuntu", &d.ubuntu_build)
        .await
        .expect("read")
        .expect("exists");
    assert_eq!(b.value.state, BuildState::Deleting);
    f.run(&["dib-image-delete", "-y", "ubuntu-ffff"])
        .await
        .fails_with("build ubuntu-ffff not found");
    f.run(&["dib-image-delete", "-y", "nodash"])
        .await
        .fails_with("not a dib image id");
}
both_stores!(dib_image_delete_refuses_builds_in_progress);

async fn image_pause_and_unpause(backend: Backend) {
    let f = Fixture::new(backend).await;
    assert_eq!(
        f.run(&["image-pause", "ubuntu"]).await.ok(),
        "image ubuntu paused\n"
    );
    assert!(
        f.store
            .image_state()
            .await
            .expect("images")
            .paused
            .contains("ubuntu")
    );
    let t = f.run(&["image-status"]).await.ok().to_owned();
    assert_eq!(row(&t, "ubuntu")[1], "True", "{t}");
    f.run(&["image-unpause", "ubuntu"]).await.ok();
    assert!(
        !f.store
            .image_state()
            .await
            .expect("images")
            .paused
            .contains("ubuntu")
    );
    f.run(&["image-pause", "nonesuch"])
        .await
        .fails_with("unknown image \"nonesuch\"");
}
both_stores!(image_pause_and_unpause);

async fn delete_marks_a_node_deleting_under_its_lock(backend: Backend) {
    let f = Fixture::new(backend).await;
    let d = populate(&f.store).await;
    f.run(&["delete", "--yes", "0000009999"])
        .await
        .fails_with("node 0000009999 not found");

    let node = |id: String| {
        let store = f.store.clone();
        async move {
            store
                .get_node(&id)
                .await
                .expect("read")
                .expect("exists")
                .value
        }
    };
    assert_eq!(node(d.ready.clone()).await.state, NodeState::Ready);

    // Locked by someone else: gives up after the lock timeout.
    let guard = f
        .store
        .lock_node(&d.ready, LockWait::NonBlocking)
        .await
        .expect("lock");
    let started = std::time::Instant::now();
    f.run(&["delete", "--yes", &d.ready])
        .await
        .fails_with(&format!("node {} is locked", d.ready));
    assert!(started.elapsed() >= std::time::Duration::from_secs(5));
    assert_eq!(node(d.ready.clone()).await.state, NodeState::Ready);
    guard.release().await.expect("release");

    let out = f.run_with_input(&["delete", &d.ready], "n\n").await;
    let t = out.ok();
    let r = row(t, &d.ready);
    assert_eq!(r[6], "deleting", "prints the node:\n{t}");
    assert_eq!(r[8], "unlocked", "and unlocked it");
    assert_eq!(node(d.ready.clone()).await.state, NodeState::Deleting);
    assert!(
        !f.store.is_node_locked(&d.ready).await.expect("lock state"),
        "no lock left behind"
    );
}
both_stores!(delete_marks_a_node_deleting_under_its_lock);

async fn hold_keeps_a_node(backend: Backend) {
    let f = Fixture::new(backend).await;
    let d = populate(&f.store).await;
    let out = f
        .run(&["hold", &d.ready, "--reason", "look at the logs"])
        .await;
    assert_eq!(row(out.ok(), &d.ready)[6], "hold");
    let n = f
        .store
        .get_node(&d.ready)
        .await
        .expect("read")
        .expect("exists")
        .value;
    assert_eq!(n.state, NodeState::Hold);
    assert_eq!(n.comment.as_deref(), Some("look at the logs"));
    f.run(&["hold", "0000009999"])
        .await
        .fails_with("node 0000009999 not found");
    f.run(&["delete", "-y", &d.busy]).await.ok();
    f.run(&["hold", &d.busy])
        .await
        .fails_with("is deleting; it cannot be held");
}
both_stores!(hold_keeps_a_node);

async fn erase_removes_a_providers_data_after_asking(backend: Backend) {
    let f = Fixture::new(backend).await;
    let d = populate(&f.store).await;
    // Only erase asks (as Python's does); with no terminal to answer
    // on, that is an error naming the flag, whatever stdin holds.
    let out = f.run_with_input(&["erase", "sim"], "y\n").await;
    out.fails_with("stdin is not a terminal; pass --yes (or --force");
    assert!(out.stderr.contains("not reversible"), "{}", out.stderr);
    assert_eq!(f.store.list_nodes().await.expect("nodes").records.len(), 3);

    let out = f.run(&["erase", "sim", "--force"]).await;
    assert_eq!(
        out.ok(),
        "Erasing build data for sim...\nErasing node data for sim...\n"
    );
    assert!(
        f.store
            .list_nodes()
            .await
            .expect("nodes")
            .records
            .is_empty()
    );
    let st = f.store.image_state().await.expect("images");
    assert!(st.uploads.is_empty(), "uploads of sim are gone");
    assert!(
        st.builds.iter().any(|b| b.id == d.ubuntu_build),
        "builds stay"
    );
}
both_stores!(erase_removes_a_providers_data_after_asking);

async fn export_and_import_image_data(backend: Backend) {
    let f = Fixture::new(backend).await;
    let d = populate(&f.store).await;
    let file = f.dir.path().join("export.json");
    let out = f
        .run(&["export-image-data", file.to_str().expect("utf-8")])
        .await;
    assert!(out.ok().starts_with("exported 6 records"), "{}", out.stdout);
    let mode = std::fs::metadata(&file).expect("file").permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    let data: std::collections::BTreeMap<String, String> =
        serde_json::from_str(&std::fs::read_to_string(&file).expect("read")).expect("JSON");
    assert_eq!(data["/nodepool/images/centos/pause"], "");
    let upload_path = format!(
        "/nodepool/images/ubuntu/builds/{}/providers/sim/images/{}",
        d.ubuntu_build, d.uploading_upload
    );
    assert!(data[&upload_path].contains("\"uploading\""));

    // Into an empty store of the same kind.
    let g = Fixture::new(backend).await;
    let import = ["import-image-data", file.to_str().expect("utf-8")];
    // It does not ask (Python's does not); `--yes` is still accepted.
    g.run_with_input(&import, "").await.ok();
    let mut yes = import.to_vec();
    yes.push("--yes");
    g.run(&yes).await.ok();
    let before = f.run(&["--json", "dib-image-list"]).await.ok().to_owned();
    let after = g.run(&["--json", "dib-image-list"]).await.ok().to_owned();
    assert_eq!(before, after);
    assert_eq!(
        f.run(&["--json", "image-list"]).await.ok(),
        g.run(&["--json", "image-list"]).await.ok()
    );
    // The upload counter was moved past the imported ids.
    let next = g
        .store
        .create_upload(
            "ubuntu",
            &d.ubuntu_build,
            "sim",
            &nodepool_core::model::ImageUpload::new(0.0, None),
        )
        .await
        .expect("a new upload does not collide");
    assert!(
        next > d.uploading_upload,
        "{next} after {}",
        d.uploading_upload
    );

    std::fs::write(&file, r#"{"/nodepool/nodes/0000000001": "{}"}"#).expect("write");
    g.run(&yes)
        .await
        .fails_with("not an image build, upload or pause record");
}
both_stores!(export_and_import_image_data);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_zookeeper_is_named() {
    let dir = tempfile::tempdir().expect("temp dir");
    let config = dir.path().join("nodepool.yaml");
    std::fs::write(
        &config,
        format!(
            "zookeeper-servers:\n  - host: 127.0.0.1\n    port: 1\n    chroot: /x\n{}",
            common::BODY
        ),
    )
    .expect("write");
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_nodepool"));
    cmd.arg("-c")
        .arg(&config)
        .args(["--connect-timeout", "1", "list"]);
    let out = common::run_process(cmd, "").await;
    let line = out.fails_with("127.0.0.1:1");
    assert!(line.contains("unreachable"), "{line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unusable_sqlite_file_is_named() {
    let dir = tempfile::tempdir().expect("temp dir");
    let config = dir.path().join("nodepool.yaml");
    // A directory that cannot be created: its parent is a file.
    let blocker = dir.path().join("a-file");
    std::fs::write(&blocker, "").expect("write");
    let db = blocker.join("np.db");
    std::fs::write(
        &config,
        format!(
            "state-store:\n  driver: sqlite\n  path: {}\n{}",
            db.display(),
            common::BODY
        ),
    )
    .expect("write");
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_nodepool"));
    cmd.arg("-c").arg(&config).arg("list");
    common::run_process(cmd, "")
        .await
        .fails_with(&db.display().to_string());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_config_lists_its_errors() {
    let dir = tempfile::tempdir().expect("temp dir");
    let config = dir.path().join("nodepool.yaml");
    std::fs::write(&config, "labels:\n  - name: a\n    min_ready: 1\n").expect("write");
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_nodepool"));
    cmd.arg("-c").arg(&config).arg("list");
    let out = common::run_process(cmd, "").await;
    assert_eq!(out.code, Some(1));
    assert!(out.stderr.contains("min_ready"), "{}", out.stderr);
}

#[tokio::test]
async fn completions_for_every_shell() {
    for (shell, marker) in [
        ("bash", "complete -F"),
        ("zsh", "#compdef nodepool"),
        ("fish", "complete -c nodepool"),
    ] {
        let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_nodepool"));
        cmd.args(["completions", shell]);
        let out = common::run_process(cmd, "").await;
        let script = out.ok();
        assert!(script.contains(marker), "{shell}: {script}");
        for sub in [
            "dib-image-delete",
            "alien-list",
            "image-upload",
            "export-image-data",
        ] {
            assert!(script.contains(sub), "{shell} completes {sub}");
        }
    }
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_nodepool"));
    cmd.args(["completions", "tcsh"]);
    assert_eq!(common::run_process(cmd, "").await.code, Some(1));
}

#[tokio::test]
async fn help_says_what_each_command_does() {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_nodepool"));
    cmd.arg("--help");
    let out = common::run_process(cmd, "").await;
    let help = out.ok();
    for line in [
        "list               List nodes",
        "alien-list         List servers in providers that are tagged for Nodepool but unknown to it",
        "image-upload       Ask the builder to upload the newest ready build",
        "request            Request nodes as Zuul would",
    ] {
        assert!(help.contains(line), "{line:?} in:\n{help}");
    }
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_nodepool"));
    cmd.args(["request", "--help"]);
    let out = common::run_process(cmd, "").await;
    assert!(
        out.ok().contains("until `nodepool delete`"),
        "{}",
        out.stdout
    );
    // Each daemon opens with what it is, not the package's description.
    for (bin, first) in [
        (
            env!("CARGO_BIN_EXE_nodepool-launcher"),
            "Launch and delete nodes for Zuul (or any requestor)",
        ),
        (
            env!("CARGO_BIN_EXE_nodepool-builder"),
            "Build disk images and keep them uploaded to every provider",
        ),
    ] {
        let mut cmd = tokio::process::Command::new(bin);
        cmd.arg("--help");
        let out = common::run_process(cmd, "").await;
        assert!(out.ok().starts_with(first), "{bin}:\n{}", out.stdout);
    }
}

async fn a_static_provider_has_no_aliens(backend: Backend) {
    let f = common::Fixture::with_body(
        backend,
        "labels: [{name: small}]
providers:
  - name: lab
    driver: static
    pools:
      - name: main
        nodes: [{name: host1.example.org, labels: small}]
",
    )
    .await;
    // A registered static node, as the launcher writes it: its
    // `external_id` is the host, which no listing shows.
    let mut node = nodepool_core::model::Node::new(
        NodeState::Ready,
        1_700_000_000.0,
        "lab",
        "main",
        vec!["small".into()],
    );
    node.external_id = Some("host1.example.org".into());
    node.hostname = Some("host1.example.org".into());
    node.launcher = Some("static driver".into());
    let id = f.store.create_node(&node).await.expect("create node");
    let out = f.run(&["alien-list"]).await;
    let t = out.ok();
    assert_eq!(common::row_count(t), 0, "{t}");
    let out = f.run(&["alien-list", "lab"]).await;
    assert_eq!(common::row_count(out.ok()), 0);
    let out = f.run(&["list"]).await;
    assert_eq!(row(out.ok(), &id)[1], "lab", "{}", out.ok());
}
both_stores!(a_static_provider_has_no_aliens);
