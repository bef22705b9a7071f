//! Interop with the real Python Nodepool 11.0.0 over ZooKeeper (TLS, the
//! only way it connects):
//!
//! * our `nodepool` lists records Python wrote: the golden samples its
//!   launcher wrote (nodes, a request, a pool registration; written raw)
//!   and image records written by its own builder code
//!   (`py/python_image_writer.py`);
//! * the Python `nodepool` CLI reads what our CLI changed, and the two
//!   `export-image-data` files agree and import into each other;
//! * Python's component registry reads our pool components, health key
//!   included (`py/python_component_reader.py`);
//! * the Python CLI lists the snapshot images our builder made (builds
//!   without formats, uploads without a format, a failed one).

mod common;

use std::path::PathBuf;

use common::{Backend, Fixture, Out, header, populate, row, var};
use nodepool_core::model::{Component, ComponentState, ProviderUnavailable};
use nodepool_core::store::CreateMode;

fn sample(name: &str) -> serde_json::Value {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../nodepool-model/tests/fixtures/zk-samples")
        .join(name);
    serde_json::from_str(&std::fs::read_to_string(&path).expect("read sample")).expect("JSON")
}

fn tls_hosts(f: &Fixture) -> String {
    let chroot = f.config.zookeeper_servers[0]
        .chroot
        .clone()
        .expect("a chroot");
    format!("{}{chroot}", var("NODEPOOL_TEST_ZK_TLS_HOSTS"))
}

/// Runs the Python CLI on the fixture's store. Its configuration has the
/// same ZooKeeper section and nothing else: Python knows no `simulated`
/// driver.
async fn py_nodepool(f: &Fixture, args: &[&str]) -> Out {
    let ours = std::fs::read_to_string(&f.config_path).expect("read config");
    // The store section comes first; what follows it is ours only.
    let end = ["images-dir:", "labels:"]
        .iter()
        .filter_map(|k| ours.find(k))
        .min()
        .expect("a ZooKeeper section first");
    let zk = &ours[..end];
    let config = f.dir.path().join("python-nodepool.yaml");
    std::fs::write(
        &config,
        format!("{zk}labels: []\nproviders: []\ndiskimages: []\n"),
    )
    .expect("write config");
    let mut cmd = tokio::process::Command::new(common::py_nodepool());
    cmd.arg("-c").arg(&config).args(args);
    common::run_process(cmd, "").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn our_cli_lists_what_python_nodepool_wrote() {
    let f = Fixture::new(Backend::ZooKeeperTls).await;
    let backend = f.store.backend();
    // The launcher's records, byte for byte as Python wrote them.
    for (file, path, mode) in [
        (
            "node-ready.json",
            "/nodepool/nodes/0000000000",
            CreateMode::Persistent,
        ),
        (
            "node-in-use.json",
            "/nodepool/nodes/0000000001",
            CreateMode::Persistent,
        ),
        (
            "request-pending.json",
            "/nodepool/requests/100-0000000000",
            CreateMode::Persistent,
        ),
        (
            "component-pool.json",
            "/nodepool/components/pool/vm0000000000",
            CreateMode::Ephemeral,
        ),
    ] {
        let data = serde_json::to_vec(&sample(file)["data"]).expect("encode");
        backend
            .create(path, &data, mode)
            .await
            .expect("write sample");
    }
    // Image records from Python's own builder code.
    let mut cmd = tokio::process::Command::new(common::python());
    cmd.arg(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/py/python_image_writer.py"
    ))
    .arg(tls_hosts(&f))
    .args([
        var("NODEPOOL_TEST_ZK_CA"),
        var("NODEPOOL_TEST_ZK_CERT"),
        var("NODEPOOL_TEST_ZK_KEY"),
    ]);
    let out = common::run_process(cmd, "").await;
    let ids: serde_json::Value = serde_json::from_str(out.ok()).expect("ids");
    let build = ids["build"].as_str().expect("build id");
    let upload = ids["upload"].as_str().expect("upload id");
    let paused_build = ids["paused_build"].as_str().expect("build id");

    let t = f.run(&["list"]).await.ok().to_owned();
    assert_eq!(
        row(&t, "0000000000")[..7],
        [
            "0000000000",
            "fake-provider",
            "fake-label",
            "3bba4f7101e14f0eb44043a125437fef",
            "fake",
            "",
            "ready"
        ],
        "{t}"
    );
    assert_eq!(row(&t, "0000000001")[6], "in-use");
    let t = f.run(&["list", "--detail"]).await.ok().to_owned();
    let r = row(&t, "0000000001");
    assert_eq!(r[12], "az2");
    assert_eq!(r[14], "22");
    assert_eq!(r[16], "100-0000000000");
    assert!(r[19].contains("bench/project"), "{t}");

    let t = f.run(&["request-list"]).await.ok().to_owned();
    assert_eq!(
        row(&t, "100-0000000000"),
        [
            "100-0000000000",
            "0",
            "pending",
            "zuul-sample-dumper",
            "fake-label,fake-label",
            "",
            "",
            "5dc93234cbac46e09846f1ad6ddb4bf9",
            ""
        ]
    );
    assert_eq!(
        f.run(&["--json", "label-list"]).await.ok(),
        "[{\"label\":\"fake-label\"},{\"label\":\"fake-label2\"}]\n"
    );

    let t = f.run(&["dib-image-list"]).await.ok().to_owned();
    assert_eq!(
        row(&t, &format!("py-image-{build}"))[1..5],
        ["py-image", "py-builder.example.org", "qcow2,raw", "ready"],
        "{t}"
    );
    assert_eq!(row(&t, &format!("py-paused-{paused_build}"))[4], "paused");
    let t = f.run(&["image-list"]).await.ok().to_owned();
    assert_eq!(
        row(&t, "py-glance-1")[..7],
        [
            build,
            upload,
            "sim",
            "py-image",
            "py-image-1700000000",
            "py-glance-1",
            "ready"
        ]
    );
    let t = f.run(&["image-status"]).await.ok().to_owned();
    assert_eq!(row(&t, "py-image")[1..3], ["False", "pending"]);
    assert_eq!(row(&t, "py-paused")[1], "True");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_cli_reads_what_our_cli_changed() {
    let f = Fixture::new(Backend::ZooKeeperTls).await;
    let d = populate(&f.store).await;
    f.run(&["hold", &d.ready, "--reason", "held by us"])
        .await
        .ok();
    f.run(&["delete", "--yes", &d.busy]).await.ok();
    f.run(&["image-pause", "ubuntu"]).await.ok();
    f.run(&["image-unpause", "centos"]).await.ok();
    f.run(&["image-build", "centos"]).await.ok();
    f.run(&[
        "dib-image-delete",
        "-y",
        &format!("centos-{}", d.centos_build),
    ])
    .await
    .ok();

    let t = py_nodepool(&f, &["list", "--detail"]).await.ok().to_owned();
    let r = row(&t, &d.ready);
    assert_eq!(r[6], "hold", "{t}");
    assert!(r.iter().any(|c| c == "held by us"), "{t}");
    assert_eq!(row(&t, &d.busy)[6], "deleting");
    assert!(!t.contains(common::SECRET), "Python redacts the port too");

    let t = py_nodepool(&f, &["image-status"]).await.ok().to_owned();
    assert_eq!(
        header(&t),
        ["Image", "Paused", "Build Request", "Build Request Age"]
    );
    assert_eq!(row(&t, "ubuntu")[1..3], ["True", "pending"]);
    assert_eq!(row(&t, "centos")[1..3], ["False", "pending"]);
    // Our image-status says the same.
    let ours = f.run(&["image-status"]).await.ok().to_owned();
    assert_eq!(row(&ours, "ubuntu")[..3], row(&t, "ubuntu")[..3]);
    assert_eq!(row(&ours, "centos")[..3], row(&t, "centos")[..3]);

    let t = py_nodepool(&f, &["dib-image-list"]).await.ok().to_owned();
    assert_eq!(
        row(&t, &format!("centos-{}", d.centos_build))[4],
        "deleting"
    );

    // Both exports of one tree agree.
    let ours = f.dir.path().join("ours.json");
    let theirs = f.dir.path().join("theirs.json");
    f.run(&["export-image-data", ours.to_str().expect("utf-8")])
        .await
        .ok();
    py_nodepool(&f, &["export-image-data", theirs.to_str().expect("utf-8")])
        .await
        .ok();
    let read = |p: &PathBuf| -> std::collections::BTreeMap<String, String> {
        serde_json::from_str(&std::fs::read_to_string(p).expect("read")).expect("JSON")
    };
    assert_eq!(read(&ours), read(&theirs));

    // Python imports our export; we import Python's.
    let g = Fixture::new(Backend::ZooKeeperTls).await;
    py_nodepool(&g, &["import-image-data", ours.to_str().expect("utf-8")])
        .await
        .ok();
    let h = Fixture::new(Backend::ZooKeeperTls).await;
    h.run(&["import-image-data", "-y", theirs.to_str().expect("utf-8")])
        .await
        .ok();
    let want = f.run(&["--json", "image-list"]).await.ok().to_owned();
    assert_eq!(g.run(&["--json", "image-list"]).await.ok(), want);
    assert_eq!(h.run(&["--json", "image-list"]).await.ok(), want);
    let t = py_nodepool(&h, &["dib-image-list"]).await.ok().to_owned();
    assert_eq!(row(&t, &format!("ubuntu-{}", d.ubuntu_build))[4], "paused");
}

/// Python's component registry, as its launchers use it, reads a pool
/// component carrying our `provider_unavailable` key like any other: the
/// key is kept in its content and changes nothing it reads (so a Python
/// launcher sharing the store routes around the pool by `paused`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_reads_pool_components_with_our_health_key() {
    let f = Fixture::new(Backend::ZooKeeperTls).await;
    let mut down = Component::pool(
        "launcher01",
        "0.1.0",
        "launcher01-PoolWorker.bad-main-1",
        "bad",
        "main",
        vec!["small".into()],
        100,
    );
    down.state = ComponentState::Paused;
    down.paused = Some(true);
    down.provider_unavailable = Some(ProviderUnavailable {
        reason: "timed out: provider bad: server list: no answer within 5.0 s".into(),
        since: 1_700_000_000.5,
    });
    let mut up = Component::pool(
        "launcher01",
        "0.1.0",
        "launcher01-PoolWorker.good-main-1",
        "good",
        "main",
        vec!["small".into()],
        100,
    );
    up.state = ComponentState::Running;
    f.store.register_component(&down).await.expect("register");
    f.store.register_component(&up).await.expect("register");
    let mut cmd = tokio::process::Command::new(common::python());
    cmd.arg(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/py/python_component_reader.py"
    ))
    .arg(tls_hosts(&f))
    .args([
        var("NODEPOOL_TEST_ZK_CA"),
        var("NODEPOOL_TEST_ZK_CERT"),
        var("NODEPOOL_TEST_ZK_KEY"),
    ])
    .arg("2");
    let out = common::run_process(cmd, "").await;
    let read: serde_json::Value = serde_json::from_str(out.ok()).expect("JSON");
    assert_eq!(
        read,
        serde_json::json!([
            {"id": "launcher01-PoolWorker.bad-main-1", "provider_name": "bad",
             "paused": true, "state": "paused", "supported_labels": ["small"],
             "model_api": 0,
             "provider_unavailable": {
                 "reason": "timed out: provider bad: server list: no answer within 5.0 s",
                 "since": 1_700_000_000.5}},
            {"id": "launcher01-PoolWorker.good-main-1", "provider_name": "good",
             "paused": false, "state": "running", "supported_labels": ["small"],
             "model_api": 0, "provider_unavailable": null}
        ])
    );
}

const STATIC_BODY: &str = "labels: [{name: small}]
providers:
  - name: lab
    driver: static
    pools:
      - name: main
        nodes:
          - {name: a.example.org, labels: small, connection-port: 2222, max-parallel-jobs: 2, host-key-checking: false, host-key: 'ssh-ed25519 AAAA'}
          - {name: b.example.org, labels: small, username: ci, host-key-checking: false}
";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_static_driver_sees_our_static_nodes_fill_its_slots() {
    let f = Fixture::with_body(Backend::ZooKeeperTls, STATIC_BODY).await;
    let pc = f.config.provider("lab").expect("provider").clone();
    let report = nodepool_core::launcher::static_hosts::sync(&f.store, &pc, &|| 1_700_000_000.0)
        .await
        .expect("sync")
        .expect("the registration lock is free");
    assert_eq!(report.registered.len(), 3, "{report:?}");
    let mut by_slot = std::collections::BTreeMap::new();
    for id in &report.registered {
        let n = f
            .store
            .get_node(id)
            .await
            .expect("get")
            .expect("node")
            .value;
        let port = match n.connection_port {
            Some(nodepool_core::model::Port::Number(p)) => p,
            other => panic!("port {other:?}"),
        };
        let key = format!(
            "{}|{}|{port}",
            n.hostname.expect("hostname"),
            n.username.expect("username")
        );
        let slot: usize = n.slot.expect("slot").decode().expect("a number");
        by_slot.insert((key, slot), id.clone());
    }
    let config = f.dir.path().join("python-static.yaml");
    std::fs::write(&config, STATIC_BODY).expect("write config");
    let mut cmd = tokio::process::Command::new(common::python());
    cmd.arg(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/py/python_static_slots.py"
    ))
    .arg(tls_hosts(&f))
    .args([
        var("NODEPOOL_TEST_ZK_CA"),
        var("NODEPOOL_TEST_ZK_CERT"),
        var("NODEPOOL_TEST_ZK_KEY"),
    ])
    .arg(&config)
    .arg("lab");
    let out = common::run_process(cmd, "").await;
    let seen: serde_json::Value = serde_json::from_str(out.ok()).expect("JSON");
    let slot = |key: &str, k: usize| by_slot[&(key.to_owned(), k)].clone();
    assert_eq!(
        seen,
        serde_json::json!({
            "a.example.org|zuul|2222": [slot("a.example.org|zuul|2222", 0), slot("a.example.org|zuul|2222", 1)],
            "b.example.org|ci|22": [slot("b.example.org|ci|22", 0)],
        })
    );
}

/// Python's CLI reads build and upload records carrying the progress our
/// builder publishes (`progress`, and `failure` on a failed upload) like
/// any others: it reads records with `dict.get`, so the keys change
/// nothing it shows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_reads_records_with_our_progress_keys() {
    use nodepool_core::model::{
        BuildProgressRecord, ImageBuild, ImageUpload, UploadProgressRecord, UploadState,
    };
    let f = Fixture::new(Backend::ZooKeeperTls).await;
    let build = "22222222222222222222222222222222";
    let mut b = ImageBuild::new(1_700_000_000.0, vec!["qcow2".into()]);
    b.builder = Some("builder03".into());
    b.set_progress(&BuildProgressRecord {
        phase: "install".into(),
        step: Some("10-apt".into()),
        time: 1_700_000_100.0,
    });
    f.store
        .create_build("ubuntu", build, &b)
        .await
        .expect("build");
    let mut sending = ImageUpload::new(1_700_000_000.0, Some("qcow2".into()));
    sending.external_name = Some("ubuntu-sending".into());
    sending.set_progress(&UploadProgressRecord {
        bytes_sent: 1 << 20,
        total_bytes: 4 << 20,
    });
    f.store
        .create_upload("ubuntu", build, "sim", &sending)
        .await
        .expect("upload");
    let mut failed = ImageUpload::new(1_700_000_000.0, Some("qcow2".into()));
    failed.external_name = Some("ubuntu-failed".into());
    failed.set_state(UploadState::Failed, 1_700_000_200.0);
    failed.set_failure("simulated upload failure");
    f.store
        .create_upload("ubuntu", build, "sim", &failed)
        .await
        .expect("upload");

    let t = py_nodepool(&f, &["dib-image-list"]).await.ok().to_owned();
    let r = row(&t, &format!("ubuntu-{build}"));
    assert_eq!(r[1..5], ["ubuntu", "builder03", "qcow2", "building"], "{t}");
    let t = py_nodepool(&f, &["image-list"]).await.ok().to_owned();
    assert_eq!(row(&t, "ubuntu-sending")[6], "uploading", "{t}");
    assert_eq!(row(&t, "ubuntu-failed")[6], "failed", "{t}");
    // And the keys are still there for us.
    let st = f.store.image_state().await.expect("image state");
    assert!(st.builds[0].build.progress().is_some());
    assert!(st.uploads.iter().any(|u| u.upload.failure().is_some()));
}

/// Snapshot images (seed 002) are builds without formats and uploads
/// without a format: the records the real `nodepool-builder` process
/// writes for a snapshot, ready and failed, are listed by Python's
/// `image-list` and `dib-image-list` like any others.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_lists_the_snapshots_our_builder_made() {
    use nodepool_core::model::{BuildState, UploadState};
    let sshd = common::sshd::Sshd::start_with_login();
    let f = Fixture::with_body_in(Backend::ZooKeeperTls, |d| {
        common::snapshot_body(d, &sshd, "sim", "prepared")
    })
    .await;
    let log = f.dir.path().join("builder.log");
    let mut builder = tokio::process::Command::new(env!("CARGO_BIN_EXE_nodepool-builder"))
        .arg("-c")
        .arg(&f.config_path)
        .arg("--no-webapp")
        .stderr(std::fs::File::create(&log).expect("log file"))
        .kill_on_drop(true)
        .spawn()
        .expect("start nodepool-builder");
    let limit = std::time::Duration::from_secs(60);
    let ready = |st: &nodepool_core::store::ImageState| {
        st.uploads
            .iter()
            .find(|u| u.image == "prepared" && u.upload.state == UploadState::Ready)
            .cloned()
    };
    let store = f.store.clone();
    common::eventually(limit, "a snapshot made", || {
        let store = store.clone();
        async move { ready(&store.image_state().await.expect("image state")).is_some() }
    })
    .await;
    // A second one, whose setup script fails.
    std::fs::write(f.dir.path().join("fail"), "").expect("make setup fail");
    f.run(&["image-update", "sim", "prepared"]).await.ok();
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let st = f.store.image_state().await.expect("image state");
        // Its upload is failed, then deleted at once: only the build stays.
        if st
            .builds
            .iter()
            .any(|b| b.build.state == BuildState::Failed)
        {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for a failed snapshot: {st:#?}\nbuilder log:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    builder.start_kill().expect("stop the builder");
    let _ = builder.wait().await;

    let st = f.store.image_state().await.expect("image state");
    let made = ready(&st).expect("the ready snapshot");
    let failed = st
        .builds
        .iter()
        .find(|b| b.build.state == BuildState::Failed)
        .expect("the failed build");
    assert!(made.upload.format.is_none() && failed.build.formats.is_empty());

    let t = py_nodepool(&f, &["dib-image-list"]).await.ok().to_owned();
    let host = nodepool_cli::daemon::hostname();
    let r = row(&t, &format!("prepared-{}", made.build_id));
    assert_eq!(r[1..5], ["prepared", host.as_str(), "", "ready"], "{t}");
    let r = row(&t, &format!("prepared-{}", failed.id));
    assert_eq!(r[4], "failed", "{t}");
    let t = py_nodepool(&f, &["image-list"]).await.ok().to_owned();
    let ext = made.upload.external_id.clone().expect("its cloud image");
    let r = row(&t, &ext);
    assert_eq!(
        [&r[..4], &r[5..7]].concat(),
        [
            made.build_id.as_str(),
            made.id.as_str(),
            "sim",
            "prepared",
            ext.as_str(),
            "ready"
        ],
        "{t}"
    );
    assert!(
        r[4].contains("prepared"),
        "the snapshot's cloud image name: {t}"
    );
    // The builder stopped: what the store has is what Python lists.
    for u in st.uploads.iter().filter(|u| u.build_id == failed.id) {
        let state = format!("{:?}", u.upload.state).to_lowercase();
        assert_eq!(row(&t, &failed.id)[6], state, "{t}");
    }
}
