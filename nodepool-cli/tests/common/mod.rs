//! Test support for the `nodepool` CLI: a configuration on a fresh store
//! (a SQLite file in a temp dir, or a random chroot of the real test
//! ZooKeeper), a populated data set, and running the real binary.
//!
//! ZooKeeper tests need `scripts/zookeeper.sh start` and its variables;
//! they fail (never skip) when it is missing.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::Arc;
use std::time::Duration;

use nodepool_core::config::{Config, ConfigSource};
use nodepool_core::model::{
    BuildState, Component, ImageBuild, ImageUpload, Json, Node, NodeRequest, NodeState, Port,
    RequestState, UploadState, epoch_now,
};
use nodepool_core::store::Store;
use tokio::io::AsyncWriteExt;

/// Which store a test runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// A SQLite file in the test's temp dir.
    Sqlite,
    /// A fresh chroot of the test ZooKeeper (plaintext).
    ZooKeeper,
    /// A fresh chroot of the test ZooKeeper over TLS (what Python needs).
    ZooKeeperTls,
}

/// Runs a test body on the SQLite store and on ZooKeeper.
#[macro_export]
macro_rules! both_stores {
    ($name:ident) => {
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() {
                super::$name(super::common::Backend::Sqlite).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn zookeeper() {
                super::$name(super::common::Backend::ZooKeeper).await
            }
        }
    };
}

pub fn var(name: &str) -> String {
    match std::env::var(name) {
        Ok(v) if !v.is_empty() => v,
        _ => panic!(
            "{name} is not set: start the test ZooKeeper with \
             `scripts/zookeeper.sh start && eval \"$(scripts/zookeeper.sh env)\"` \
             (scripts/test.sh does both)"
        ),
    }
}

/// The venv's `nodepool` CLI (Python Nodepool 11.0.0).
pub fn py_nodepool() -> String {
    python_var("NODEPOOL_TEST_PY_NODEPOOL")
}

/// The venv's python.
pub fn python() -> String {
    python_var("NODEPOOL_TEST_PYTHON")
}

fn python_var(name: &str) -> String {
    match std::env::var(name) {
        Ok(v) if !v.is_empty() && Path::new(&v).exists() => v,
        _ => panic!(
            "{name} is not set or does not exist: create the Python peers with \
             `eval \"$(scripts/python-env.sh)\"` (scripts/test.sh does it)"
        ),
    }
}

/// The part of the configuration every test shares: two labels, a
/// simulated provider taking two diskimages, and three diskimages (one
/// paused in the configuration).
pub const BODY: &str = "\
labels:
  - name: small
  - name: large
providers:
  - name: sim
    driver: simulated
    simulation:
      boot-delay: 0.05
    diskimages:
      - name: ubuntu
      - name: centos
    cloud-images:
      - name: plain
        image-name: Plain Image
    pools:
      - name: main
        max-servers: 10
        labels:
          - name: small
            diskimage: ubuntu
            flavor-name: Fake Flavor
          - name: large
            cloud-image: plain
            flavor-name: Fake Flavor
diskimages:
  - name: ubuntu
    elements: [ubuntu-minimal]
  - name: centos
    elements: [centos]
  - name: frozen
    elements: [fedora]
    pause: true
";

/// A store section for a backend, plus its chroot (ZooKeeper).
pub fn store_section(backend: Backend, dir: &Path) -> (String, Option<String>) {
    let chroot = format!("/nodepool-cli-test/{}", uuid::Uuid::new_v4().simple());
    let zk = |hosts: &str| {
        let (host, port) = hosts.rsplit_once(':').expect("host:port");
        format!("zookeeper-servers:\n  - host: {host}\n    port: {port}\n    chroot: {chroot}\n")
    };
    match backend {
        Backend::Sqlite => (
            format!(
                "state-store:\n  driver: sqlite\n  path: {}\n",
                dir.join("nodepool.db").display()
            ),
            None,
        ),
        Backend::ZooKeeper => (zk(&var("NODEPOOL_TEST_ZK_HOSTS")), Some(chroot.clone())),
        Backend::ZooKeeperTls => (
            format!(
                "{}zookeeper-tls:\n  cert: {}\n  key: {}\n  ca: {}\n",
                zk(&var("NODEPOOL_TEST_ZK_TLS_HOSTS")),
                var("NODEPOOL_TEST_ZK_CERT"),
                var("NODEPOOL_TEST_ZK_KEY"),
                var("NODEPOOL_TEST_ZK_CA")
            ),
            Some(chroot.clone()),
        ),
    }
}

/// A configuration file on a fresh store, and that store opened.
pub struct Fixture {
    pub dir: tempfile::TempDir,
    pub config_path: PathBuf,
    pub config: Arc<Config>,
    pub store: Store,
    pub backend: Backend,
}

impl Fixture {
    pub async fn new(backend: Backend) -> Self {
        Self::with_body(backend, BODY).await
    }

    pub async fn with_body(backend: Backend, body: &str) -> Self {
        Self::with_body_in(backend, |_| body.to_owned()).await
    }

    /// A configuration whose body names paths in the fixture's temp dir
    /// (`images-dir`, a `dib-cmd`, ...): `body` gets that dir.
    pub async fn with_body_in(backend: Backend, body: impl FnOnce(&Path) -> String) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let body = body(dir.path());
        let (section, _) = store_section(backend, dir.path());
        let config_path = dir.path().join("nodepool.yaml");
        std::fs::write(&config_path, format!("{section}{body}")).expect("write config");
        let config = Arc::new(
            ConfigSource::new(&config_path, None)
                .load()
                .unwrap_or_else(|e| panic!("test config: {e}")),
        );
        let store = nodepool_cli::admin::open_store(&config, Duration::from_secs(20))
            .await
            .unwrap_or_else(|e| panic!("open the test store ({backend:?}): {e:#}"));
        Fixture {
            dir,
            config_path,
            config,
            store,
            backend,
        }
    }

    /// Runs `nodepool -c <config> <args>` as a real process.
    pub async fn run(&self, args: &[&str]) -> Out {
        self.run_with_input(args, "").await
    }

    /// Runs the CLI with `input` on its stdin.
    pub async fn run_with_input(&self, args: &[&str], input: &str) -> Out {
        let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_nodepool"));
        cmd.arg("-c").arg(&self.config_path).args(args);
        run_process(cmd, input).await
    }
}

/// A stand-in for `disk-image-create`: writes the qcow2 file and the
/// checksum files diskimage-builder writes with `--checksum`. While a file
/// `hold-builds` exists beside it, it waits before writing anything, so a
/// test can look at a build in progress for as long as it needs.
pub const FAKE_DIB: &str = r#"#!/bin/sh
set -e
[ "$1" = -x ] || { echo "unexpected arguments: $*" >&2; exit 2; }
echo "building $DIB_IMAGE_NAME into $DIB_IMAGE_FILENAME"
while [ -e "$(dirname "$0")/hold-builds" ]; do sleep 0.05; done
head -c 65536 /dev/urandom > "$DIB_IMAGE_FILENAME.qcow2"
md5sum "$DIB_IMAGE_FILENAME.qcow2" > "$DIB_IMAGE_FILENAME.qcow2.md5"
sha256sum "$DIB_IMAGE_FILENAME.qcow2" > "$DIB_IMAGE_FILENAME.qcow2.sha256"
echo "Build completed successfully"
"#;

/// Writes [`FAKE_DIB`] to `dir/fake-dib` (executable) and returns its path,
/// for a diskimage's `dib-cmd`.
pub fn install_fake_dib(dir: &Path) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join("fake-dib");
    std::fs::write(&path, FAKE_DIB).expect("write the fake disk-image-create");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    path
}

/// A finished process.
pub struct Out {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Out {
    /// Asserts exit 0 and returns stdout.
    pub fn ok(&self) -> &str {
        assert_eq!(
            self.code,
            Some(0),
            "expected success\nstdout:\n{}\nstderr:\n{}",
            self.stdout,
            self.stderr
        );
        &self.stdout
    }

    /// Asserts exit 1 with one `error: ...` line on stderr that contains
    /// `needle`; returns that line.
    pub fn fails_with(&self, needle: &str) -> String {
        assert_eq!(
            self.code,
            Some(1),
            "expected failure\nstdout:\n{}\nstderr:\n{}",
            self.stdout,
            self.stderr
        );
        let lines: Vec<&str> = self
            .stderr
            .lines()
            .filter(|l| l.starts_with("error: "))
            .collect();
        assert_eq!(lines.len(), 1, "one error line: {}", self.stderr);
        assert!(
            lines[0].contains(needle),
            "error {:?} does not mention {needle:?}",
            lines[0]
        );
        lines[0].to_owned()
    }
}

pub async fn run_process(mut cmd: tokio::process::Command, input: &str) -> Out {
    cmd.stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    let mut child = cmd.spawn().expect("spawn");
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(input.as_bytes()).await.expect("stdin");
        drop(stdin);
    }
    let out: Output = tokio::time::timeout(Duration::from_secs(120), child.wait_with_output())
        .await
        .expect("the command finishes within 120 s")
        .expect("wait");
    Out {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// The cells of the table row containing `needle`.
pub fn row(table: &str, needle: &str) -> Vec<String> {
    let line = table
        .lines()
        .find(|l| l.starts_with('|') && l.contains(needle))
        .unwrap_or_else(|| panic!("no row with {needle:?} in:\n{table}"));
    cells(line)
}

/// The header cells of a table.
pub fn header(table: &str) -> Vec<String> {
    cells(
        table
            .lines()
            .find(|l| l.starts_with('|'))
            .unwrap_or_else(|| panic!("no header in:\n{table}")),
    )
}

fn cells(line: &str) -> Vec<String> {
    line.trim()
        .trim_matches('|')
        .split('|')
        .map(|c| c.trim().to_owned())
        .collect()
}

/// Number of data rows of a table.
pub fn row_count(table: &str) -> usize {
    table.lines().filter(|l| l.starts_with('|')).count() - 1
}

/// What [`populate`] created.
pub struct Data {
    /// Ready node of `sim`, label small, server `srv-ready`.
    pub ready: String,
    /// In-use node with user data, a secret in its port, label large.
    pub busy: String,
    /// Held node.
    pub held: String,
    /// A pending request.
    pub request: String,
    /// Ready ubuntu build with a ready and an uploading upload to `sim`.
    pub ubuntu_build: String,
    /// The ready upload.
    pub ready_upload: String,
    /// The uploading upload.
    pub uploading_upload: String,
    /// A building ubuntu build.
    pub building_build: String,
    /// A ready centos build (centos is paused in the store).
    pub centos_build: String,
}

/// A secret a driver stored in `connection_port`: never printed.
pub const SECRET: &str = "s3cret-service-account-token";

/// Seconds ago the fixed records changed state: 2 days, 3 h, 4 min, 5 s.
pub const AGE: f64 = 2.0 * 86_400.0 + 3.0 * 3600.0 + 4.0 * 60.0 + 5.0;

/// Writes nodes, a request, builds, uploads, flags and a pool component.
pub async fn populate(store: &Store) -> Data {
    let t = epoch_now() - AGE;
    let mut ready = Node::new(NodeState::Ready, t, "sim", "main", vec!["small".into()]);
    ready.external_id = Some("srv-ready".into());
    ready.public_ipv4 = Some("203.0.113.5".into());
    ready.private_ipv4 = Some("10.0.0.5".into());
    ready.az = Some("az1".into());
    ready.launcher = Some("host-PoolWorker.sim-main-abc".into());
    let ready_id = store.create_node(&ready).await.expect("create node");

    let mut busy = Node::new(NodeState::InUse, t, "sim", "main", vec!["large".into()]);
    busy.external_id = Some("srv-busy".into());
    busy.public_ipv6 = Some("2001:db8::7".into());
    busy.allocated_to = Some("200-0000000099".into());
    busy.username = Some("ubuntu".into());
    busy.connection_port = Some(Port::Other(
        serde_json::json!({ "token": SECRET, "host": "k8s" }),
    ));
    busy.user_data = Some(
        Json::from_text(r#"{"zuul_system": "zuul-1", "project_name": "org/project"}"#)
            .expect("json"),
    );
    let busy_id = store.create_node(&busy).await.expect("create node");

    let mut held = Node::new(NodeState::Hold, t, "sim", "main", vec!["small".into()]);
    held.external_id = Some("srv-held".into());
    held.hold_job = Some("tenant org/project job-x refs/heads/main".into());
    held.comment = Some("investigating a flaky test".into());
    let held_id = store.create_node(&held).await.expect("create node");

    let mut r = NodeRequest::new(vec!["small".into(), "large".into()], "zuul-1", t);
    r.relative_priority = 4;
    r.event_id = Some("ev-42".into());
    r.declined_by = vec!["launcher-a".into()];
    r.set_state(RequestState::Pending, t);
    let request = store
        .submit_request(&r, "100", false)
        .await
        .expect("submit request");

    let ubuntu_build = "0123456789abcdef0123456789abcdef".to_owned();
    let mut b = ImageBuild::new(t, vec!["qcow2".into(), "raw".into()]);
    b.set_state(BuildState::Ready, t);
    b.builder = Some("builder01.example.org".into());
    store
        .create_build("ubuntu", &ubuntu_build, &b)
        .await
        .expect("build");
    let mut u = ImageUpload::new(t, Some("qcow2".into()));
    u.set_state(UploadState::Ready, t);
    u.external_id = Some("img-ready".into());
    u.external_name = Some("ubuntu-1700000000".into());
    let ready_upload = store
        .create_upload("ubuntu", &ubuntu_build, "sim", &u)
        .await
        .expect("upload");
    let uploading = ImageUpload::new(t, Some("qcow2".into()));
    let uploading_upload = store
        .create_upload("ubuntu", &ubuntu_build, "sim", &uploading)
        .await
        .expect("upload");

    let building_build = "11111111111111111111111111111111".to_owned();
    let mut building = ImageBuild::new(t, vec!["qcow2".into()]);
    building.builder = Some("builder02".into());
    store
        .create_build("ubuntu", &building_build, &building)
        .await
        .expect("build");

    let centos_build = "fedcba9876543210fedcba9876543210".to_owned();
    let mut c = ImageBuild::new(t, vec!["qcow2".into()]);
    c.set_state(BuildState::Ready, t);
    store
        .create_build("centos", &centos_build, &c)
        .await
        .expect("build");
    store.set_image_paused("centos", true).await.expect("pause");
    store
        .request_image_build("ubuntu")
        .await
        .expect("build request");

    let pool = Component::pool(
        "host",
        "test",
        "host-PoolWorker.sim-main-abc",
        "sim",
        "main",
        vec!["small".into(), "large".into()],
        100,
    );
    store
        .register_component(&pool)
        .await
        .expect("register pool");

    Data {
        ready: ready_id,
        busy: busy_id,
        held: held_id,
        request,
        ubuntu_build,
        ready_upload,
        uploading_upload,
        building_build,
        centos_build,
    }
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
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Real SSH servers (the whole-system tests' helper, shared by path): the
/// setup servers of snapshot images answer at one.
#[path = "../../../tests/src/sshd.rs"]
pub mod sshd;

/// A site with a snapshot image (seed 002) for the real builder process:
/// `provider` (a simulated cloud whose servers answer at `sshd`) makes
/// `image` by booting its cloud image `base` and running `setup.sh` on it,
/// which prints the server's name and fails (`setup: no good`, exit 4)
/// while the file `fail` exists in `dir`. Label `image` boots it. The
/// cloud is kept in `dir/cloud.json`, for every process to see. Returns
/// the configuration's body, for [`Fixture::with_body_in`].
pub fn snapshot_body(dir: &Path, sshd: &sshd::Sshd, provider: &str, image: &str) -> String {
    let d = dir.display();
    std::fs::create_dir_all(dir.join("scripts")).expect("scripts dir");
    std::fs::write(
        dir.join("scripts/setup.sh"),
        format!(
            "#!/bin/sh\necho \"setting up $NODEPOOL_NODE_ID\"\n\
             if [ -e {d}/fail ]; then echo 'setup: no good' >&2; exit 4; fi\n"
        ),
    )
    .expect("write the setup script");
    format!(
        r#"images-dir: {d}/images
build-log-dir: {d}/logs
script-dir: {d}/scripts
labels:
  - name: {image}
providers:
  - name: {provider}
    driver: simulated
    simulation: {{skip-nodescan: false, data-plane-host: 127.0.0.1, boot-delay: 0, state-file: cloud.json}}
    cloud-images:
      - {{name: base, connection-port: {port}}}
    images:
      - {{name: {image}, base-image: base, setup: setup.sh, username: {user}, private-key: {key}, min-ram: 1024}}
    pools:
      - name: main
        max-servers: 5
        labels: [{{name: {image}, diskimage: {image}, min-ram: 1024}}]
"#,
        port = sshd.port(),
        user = sshd.user(),
        key = sshd.private_key().display(),
    )
}
