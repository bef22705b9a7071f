//! The seeds' whole image-to-node pipeline on real VMs (issue 14, part 5;
//! feature `real-vms`, root, ~10 minutes, run by
//! `scripts/test.d/50-vms.sh`):
//!
//! 1. the `nodepool-builder` daemon builds a Debian image with
//!    diskimage-builder (`debian-minimal vm simple-init glean-ssh`), uploads
//!    it to a `driver: qemu` provider and boot-tests it (`validate`): the
//!    upload is ready only after its test VM ran the script and is gone;
//! 2. the `nodepool-launcher` daemon boots the `min-ready` node under TCG
//!    with `host-key-checking: true` (the ed25519 host key it recorded is
//!    the one `ssh-keyscan` gets) and a ready script whose marker the test
//!    reads back over SSH, checking the host key against the recorded one;
//! 3. a setup-script snapshot (issue 14 part 3): the snapshot image, paused
//!    in the store until then, is asked for with the real `nodepool
//!    image-update local debian-snap --wait` as the launcher starts, so the
//!    builder's setup server (`np-setup-…`, booted from the DIB upload)
//!    boots alongside step 2's VMs; the builder runs `setup` on it, which
//!    writes a marker and syncs, snapshots its disk into the provider's
//!    image directory and deletes it. A request of the snapshot's label
//!    gets a node booted from it, on which the test reads the marker (the
//!    setup server's name) over SSH; the node is returned and deleted;
//! 4. a Jenkins target (the fake master of `nodepool-jenkins`' tests) gets
//!    a node as agent;
//! 5. a request of the Zuul-side requestor (`nodepool-requestor`) gets the
//!    min-ready node, runs a command on it over SSH and returns it: it is
//!    deleted;
//! 6. the agent's job ends and its node is deleted;
//! 7. the snapshot is deleted with `nodepool image-delete` (paused first,
//!    or the builder would make another): its image file and records go;
//!    then nothing is left: no qemu process, no server directory (overlay,
//!    setup server's included), no image but the DIB upload (the
//!    provider's current image), no loop device, no mount under the
//!    test's directory.
//!
//! Both daemons are the real binaries on the real ZooKeeper. Each step's
//! time is printed (`--nocapture`) for BENCHMARKS.md ("Real VMs"). Waits
//! have generous limits (a boot under TCG takes 1–2 minutes on a quiet
//! 2-core machine, up to 5 on a loaded one); every wait polls a real
//! condition. A missing tool or variable is a failure, never a skip.

#![cfg(feature = "real-vms")]
// Helpers outside #[test] fns panic on purpose, like the tests themselves.
#![allow(clippy::unwrap_used)]

// nodepool-dib's test helpers (testbed variables, mounts and loop devices
// under a directory) and nodepool-jenkins' fake master, shared rather than
// copied.
#[path = "../../nodepool-dib/tests/common/mod.rs"]
mod common;
#[path = "../../nodepool-jenkins/tests/fake_jenkins/mod.rs"]
mod fake_jenkins;

use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::real::{need, run_ok};
use common::{is_root, loops_under, mounts_under};
use fake_jenkins::{FakeJenkins, TOKEN, USER};
use nodepool_core::model::{BuildState, NodeState, Port, UploadState};
use nodepool_core::store::{NodeRecord, Store};
use nodepool_requestor::{NewRequest, Outcome, Requestor};
use nodepool_tests::{Backend, Daemon, TestEnv, workspace_binary};

/// The image build (cold, debootstrap cache empty, on a loaded machine).
const BUILD_LIMIT: Duration = Duration::from_secs(1500);
/// One VM from start to a finished script (boot + SSH + script), and the
/// upload with its boot test: 1–2 minutes on a quiet machine, 5–8 with two
/// VMs booting at a load average of 15 on 2 cores (measured).
const BOOT_LIMIT: Duration = Duration::from_secs(900);
/// Deleting a node (its VM gets SIGTERM, SIGKILL after 10 s).
const DELETE_LIMIT: Duration = Duration::from_secs(180);
/// A daemon's stop, or its reload.
const DAEMON_LIMIT: Duration = Duration::from_secs(120);

/// Where the ready script leaves its marker on the node.
const MARKER: &str = "/var/tmp/nodepool-ready-marker";
/// Where the snapshot image's setup script leaves its marker (on the setup
/// server, so on every node booted from the snapshot).
const SETUP_MARKER: &str = "/var/tmp/nodepool-setup-marker";
/// The snapshot image (provider `local`'s `images`, base `debian-glean`)
/// and the label booting it.
const SNAPSHOT: &str = "debian-snap";

/// Step timings, printed as they come and as a table at the end.
struct Clock {
    start: Instant,
    step: Instant,
    steps: Vec<(String, f64)>,
}

impl Clock {
    fn new() -> Self {
        let now = Instant::now();
        Clock {
            start: now,
            step: now,
            steps: Vec::new(),
        }
    }

    /// Ends the current step.
    fn lap(&mut self, name: &str) {
        let secs = self.step.elapsed().as_secs_f64();
        self.step = Instant::now();
        println!("vm-pipeline: {name}: {secs:.1} s");
        self.steps.push((name.to_owned(), secs));
    }

    fn report(&self) {
        println!("vm-pipeline: timings (load average now: {})", load());
        for (name, secs) in &self.steps {
            println!("vm-pipeline:   {name:<58} {secs:>7.1} s");
        }
        println!(
            "vm-pipeline:   {:<58} {:>7.1} s",
            "total",
            self.start.elapsed().as_secs_f64()
        );
    }
}

fn load() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

/// Polls `check` every second until it gives a value; fails after `limit`
/// with its last answer (the daemons' logs follow from their drop).
async fn until<T, F, Fut>(what: &str, limit: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        match check().await {
            Ok(v) => return v,
            Err(last) => assert!(
                tokio::time::Instant::now() < deadline,
                "{what}: not within {limit:?}; last look: {last}"
            ),
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// The test's site: configuration, key, scripts, images and VMs under
/// one directory on disk (the image is ~400 MB).
struct Site {
    env: TestEnv,
    dir: tempfile::TempDir,
    jenkins_url: String,
}

impl Site {
    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    fn config_path(&self) -> PathBuf {
        self.path("nodepool.yaml")
    }

    /// The configuration: the label `debian` (min-ready, ready script) and
    /// `debian-agent` (the Jenkins target's), both booting the DIB image
    /// on the qemu provider, and [`SNAPSHOT`], booting the snapshot image
    /// of that name (base: the DIB image, `setup.sh`). `min_ready` is
    /// `debian`'s and the target's.
    fn body(&self, min_ready: u32) -> String {
        let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let repo = repo.canonicalize().unwrap();
        format!(
            r#"images-dir: {site}/images
build-log-dir: {site}/logs
elements-dir: {elements}
script-dir: {site}/scripts
labels:
  - name: debian
    min-ready: {min_ready}
    ready-script: ready.sh
  - name: debian-agent
  - name: {SNAPSHOT}
diskimages:
  - name: debian-glean
    dib-cmd: {cmd}
    elements: [debian-minimal, vm, simple-init, glean-ssh]
    release: bookworm
    formats: [qcow2]
    build-timeout: {build}
    username: root
    private-key: {site}/id_ed25519
    env-vars:
      PATH: "{path}"
      TMP_DIR: "{site}/dib-tmp"
      DIB_DISTRIBUTION_MIRROR: "{mirror}"
      DIB_DEBIAN_SECURITY_MIRROR: "{security}"
      DIB_DEBOOTSTRAP_CACHE: "1"
      DIB_DEBIAN_USE_DEBOOTSTRAP_CACHE: "1"
      DIB_GRUB_TIMEOUT: "0"
      DIB_BOOTLOADER_DEFAULT_CMDLINE: "nofb nomodeset gfxpayload=text quiet"
      DIB_APT_MINIMAL_CREATE_INTERFACES: "0"
      DIB_REPOTYPE_glean: file
      DIB_REPOLOCATION_glean: "file://{repo}/testbed/vm/glean-repo-placeholder"
      GLEAN_SSH_WHEELS: "{wheels}"
providers:
  - name: local
    driver: qemu
    image-dir: {site}/vms
    accelerator: tcg
    public-key: {site}/id_ed25519.pub
    boot-timeout: {boot}
    launch-timeout: {boot}
    launch-retries: 2
    quota: {{instances: 4, cores: 4, ram: 8192}}
    flavors:
      - {{name: small, vcpus: 1, ram: 1024}}
    diskimages:
      - name: debian-glean
        config-drive: true
        validate: {{script: validate.sh, timeout: 120}}
    images:
      - name: {SNAPSHOT}
        base-image: debian-glean
        setup: setup.sh
        setup-timeout: {boot}
        username: root
        private-key: {site}/id_ed25519
        flavor-name: small
    pools:
      - name: main
        max-servers: 3
        host-key-checking: true
        labels:
          - {{name: debian, diskimage: debian-glean, flavor-name: small}}
          - {{name: debian-agent, diskimage: debian-glean, flavor-name: small}}
          - {{name: {SNAPSHOT}, diskimage: {SNAPSHOT}, flavor-name: small}}
targets:
  - name: ci
    jenkins:
      url: {url}
      user: {USER}
      api-token: {TOKEN}
      credentials-id: jenkins-ssh
    labels:
      - name: debian-agent
        min-ready: {min_ready}
"#,
            site = self.dir.path().display(),
            elements = need("NODEPOOL_TEST_DIB_ELEMENTS"),
            cmd = need("NODEPOOL_TEST_DIB_CMD"),
            path = need("NODEPOOL_TEST_DIB_PATH"),
            mirror = need("NODEPOOL_TEST_DIB_MIRROR"),
            security = need("NODEPOOL_TEST_DIB_SECURITY_MIRROR"),
            wheels = need("NODEPOOL_TEST_GLEAN_WHEELS"),
            repo = repo.display(),
            build = BUILD_LIMIT.as_secs(),
            boot = BOOT_LIMIT.as_secs(),
            url = self.jenkins_url,
        )
    }

    fn write_config(&self, min_ready: u32) {
        // Written whole and renamed: a daemon never reads half a file.
        let tmp = self.path("nodepool.yaml.new");
        let yaml = format!("{}{}", self.env.store_yaml(), self.body(min_ready));
        std::fs::write(&tmp, yaml).unwrap();
        std::fs::rename(&tmp, self.config_path()).unwrap();
    }

    fn daemon(&self, bin: &Path, name: &str) -> Daemon {
        let mut cmd = Command::new(bin);
        cmd.arg("-c")
            .arg(self.config_path())
            .arg("--no-webapp")
            .current_dir(self.dir.path())
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            );
        Daemon::spawn(name, cmd, &self.path(&format!("{name}.log")))
    }

    /// Runs the `nodepool` CLI on the site's configuration; its output.
    fn nodepool(&self, bin: &Path, args: &[&str]) -> String {
        let out = Command::new(bin)
            .arg("-c")
            .arg(self.config_path())
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "nodepool {args:?}: {}\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The ids of the images the provider holds (`images/<id>/`), sorted:
    /// uploads and snapshots, and any partial upload (`.partial-…`).
    fn images(&self) -> Vec<String> {
        let Ok(dir) = std::fs::read_dir(self.path("vms/images")) else {
            return Vec::new();
        };
        let mut ids: Vec<String> = dir
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        ids.sort();
        ids
    }

    /// Names of the VMs the provider has now (`servers/<id>/server.json`).
    fn servers(&self) -> Vec<String> {
        let Ok(dir) = std::fs::read_dir(self.path("vms/servers")) else {
            return Vec::new();
        };
        dir.flatten()
            .map(|e| {
                let json =
                    std::fs::read_to_string(e.path().join("server.json")).unwrap_or_default();
                serde_json::from_str::<serde_json::Value>(&json)
                    .ok()
                    .and_then(|v| v["name"].as_str().map(str::to_owned))
                    .unwrap_or_else(|| e.file_name().to_string_lossy().into_owned())
            })
            .collect()
    }

    /// Live qemu processes whose command line names this site.
    fn qemu_processes(&self) -> Vec<String> {
        let site = self.dir.path().to_string_lossy().into_owned();
        let mut out = Vec::new();
        for e in std::fs::read_dir("/proc").unwrap().flatten() {
            if e.file_name().to_string_lossy().parse::<u32>().is_err() {
                continue;
            }
            let Ok(cmd) = std::fs::read(e.path().join("cmdline")) else {
                continue;
            };
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            if cmd.contains("qemu-system") && cmd.contains(&site) {
                out.push(cmd);
            }
        }
        out
    }
}

/// The node's forwarded port.
fn port(node: &nodepool_core::model::Node) -> u16 {
    match &node.connection_port {
        Some(Port::Number(n)) => u16::try_from(*n).unwrap(),
        other => panic!("node has no TCP connection-port: {other:?}"),
    }
}

/// The ed25519 host key `ssh-keyscan` gets from 127.0.0.1:`port`, as
/// `ssh-ed25519 BASE64`.
fn keyscan_ed25519(port: u16) -> String {
    let out = run_ok(
        "ssh-keyscan",
        &[
            "-T",
            "30",
            "-t",
            "ed25519",
            "-p",
            &port.to_string(),
            "127.0.0.1",
        ],
    );
    out.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| {
            let mut f = l.split_whitespace().skip(1);
            let (kind, key) = (f.next()?, f.next()?);
            (kind == "ssh-ed25519").then(|| format!("{kind} {key}"))
        })
        .unwrap_or_else(|| panic!("ssh-keyscan found no ed25519 key: {out:?}"))
}

/// Runs `command` on the node as root with the site's key, accepting only
/// the host keys the launcher recorded (a known_hosts file of them).
fn ssh(site: &Site, node: &nodepool_core::model::Node, command: &str) -> String {
    let port = port(node);
    let known = site.path(&format!("known_hosts-{port}"));
    let lines: Vec<String> = node
        .host_keys
        .iter()
        .map(|k| format!("[127.0.0.1]:{port} {k}"))
        .collect();
    std::fs::write(&known, lines.join("\n") + "\n").unwrap();
    let key = site.path("id_ed25519");
    let out = Command::new("ssh")
        .args(["-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes"])
        .args(["-o", "ConnectTimeout=60", "-o", "LogLevel=ERROR"])
        .arg("-o")
        .arg(format!("UserKnownHostsFile={}", known.display()))
        .arg("-i")
        .arg(&key)
        .args(["-p", &port.to_string(), "root@127.0.0.1", command])
        .output()
        .expect("run ssh (openssh-client)");
    assert!(
        out.status.success(),
        "ssh root@127.0.0.1:{port} {command:?}: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

async fn nodes(store: &Store) -> Vec<NodeRecord> {
    store
        .list_nodes()
        .await
        .map_err(|e| e.to_string())
        .unwrap()
        .records
}

/// The one node of `label`, once it is ready.
async fn ready_node(store: &Store, label: &str) -> Result<NodeRecord, String> {
    let all = nodes(store).await;
    let of: Vec<&NodeRecord> = all
        .iter()
        .filter(|r| r.node.node_type.iter().any(|t| t == label))
        .collect();
    match of.as_slice() {
        [one] if one.node.state == NodeState::Ready => Ok((*one).clone()),
        _ => Err(format!(
            "{label} nodes: {:?}",
            of.iter().map(|r| (&r.id, r.node.state)).collect::<Vec<_>>()
        )),
    }
}

async fn gone(store: &Store, id: &str) -> Result<(), String> {
    match store.get_node(id).await.map_err(|e| e.to_string())? {
        None => Ok(()),
        Some(n) => Err(format!("node {id} is {:?}", n.value.state)),
    }
}

/// The count of "configuration reloaded" lines in a daemon's log.
fn reloads(d: &Daemon) -> usize {
    d.log()
        .lines()
        .filter(|l| l.contains("configuration reloaded"))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_image_goes_from_diskimage_builder_to_nodes_on_real_vms_and_nothing_is_left() {
    assert!(
        is_root(),
        "real VMs need root (diskimage-builder: loop devices, mount, chroot)"
    );
    run_ok("qemu-system-x86_64", &["--version"]);
    let mut clock = Clock::new();
    println!("vm-pipeline: load average at the start: {}", load());

    let jenkins = FakeJenkins::start().await;
    let site = Site {
        env: TestEnv::new(Backend::ZooKeeper),
        dir: tempfile::Builder::new()
            .prefix("nodepool-vms-")
            .tempdir_in("/var/tmp")
            .unwrap(),
        jenkins_url: jenkins.url.clone(),
    };
    std::fs::create_dir_all(site.path("scripts")).unwrap();
    std::fs::create_dir_all(site.path("dib-tmp")).unwrap();
    run_ok(
        "ssh-keygen",
        &[
            "-q",
            "-t",
            "ed25519",
            "-N",
            "",
            "-C",
            "nodepool-vm-pipeline",
            "-f",
            site.path("id_ed25519").to_str().unwrap(),
        ],
    );
    // The boot test: glean installed the key from the config drive and
    // set the hostname from it (the server's name).
    std::fs::write(
        site.path("scripts/validate.sh"),
        "#!/bin/sh\nset -e\ngrep -q nodepool-vm-pipeline /root/.ssh/authorized_keys\n\
         test \"$(hostname)\" = \"$(echo \"$NODEPOOL_NODE_ID\" | tr _ -)\"\necho validated\n",
    )
    .unwrap();
    std::fs::write(
        site.path("scripts/ready.sh"),
        format!("#!/bin/sh\necho \"$NODEPOOL_NODE_ID $NODEPOOL_LABEL\" > {MARKER}\n"),
    )
    .unwrap();
    // The snapshot's setup: its marker names the server it ran on. The
    // snapshot is the disk as a power cut would leave it: sync.
    std::fs::write(
        site.path("scripts/setup.sh"),
        format!("#!/bin/sh\nset -e\necho \"$NODEPOOL_NODE_ID\" > {SETUP_MARKER}\nsync\n"),
    )
    .unwrap();
    site.write_config(1);

    let (builder_bin, launcher_bin, cli_bin) = tokio::task::spawn_blocking(|| {
        (
            workspace_binary("nodepool-cli", "nodepool-builder"),
            workspace_binary("nodepool-cli", "nodepool-launcher"),
            workspace_binary("nodepool-cli", "nodepool"),
        )
    })
    .await
    .unwrap();
    let store = site.env.store(&site.env.config(&site.body(1))).await;
    // The builder makes a snapshot image as soon as its base has a ready
    // upload and none of it is ready. Paused in the store, it waits for
    // the test's `nodepool image-update` (step 3) instead.
    site.nodepool(&cli_bin, &["image-pause", SNAPSHOT]);
    clock.lap("set up (key, config, daemons' binaries)");

    // --- 1. build, upload, boot test --------------------------------------
    let mut builder = site.daemon(&builder_bin, "builder");
    until("the image is built", BUILD_LIMIT, || async {
        let st = store.image_state().await.map_err(|e| e.to_string())?;
        match st.builds.iter().find(|b| b.image == "debian-glean") {
            Some(b) if b.build.state == BuildState::Ready => Ok(()),
            Some(b) if b.build.state == BuildState::Failed => {
                panic!(
                    "the build failed: {b:#?}\nDIB log under {}",
                    site.path("logs").display()
                )
            }
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    clock.lap("diskimage-builder build (builder daemon)");

    // The upload must stay `uploading` while its boot test runs: the test
    // VM (np-validate-…) is seen meanwhile, and is gone once it is ready.
    let mut saw_test_vm = false;
    let upload = until("the upload is validated", BOOT_LIMIT, || {
        let servers = site.servers();
        saw_test_vm |= servers
            .iter()
            .any(|s| s.starts_with("np-validate-debian-glean-"));
        let store = &store;
        async move {
            let st = store.image_state().await.map_err(|e| e.to_string())?;
            match st.uploads.iter().find(|u| u.image == "debian-glean") {
                Some(u) if u.upload.state == UploadState::Ready => Ok(u.clone()),
                Some(u) if u.upload.state == UploadState::Failed => {
                    panic!("the upload failed: {u:#?}")
                }
                other => Err(format!("{other:?}, servers {servers:?}")),
            }
        }
    })
    .await;
    assert!(
        saw_test_vm,
        "no boot-test VM was seen before the upload was ready"
    );
    assert_eq!(
        site.servers(),
        Vec::<String>::new(),
        "the boot-test VM is left"
    );
    assert_eq!(upload.provider, "local");
    clock.lap("upload to the qemu provider + boot test (validate)");

    // --- 2. min-ready node: host keys, ready script ---------------------------
    let mut launcher = site.daemon(&launcher_bin, "launcher");
    // Step 3's snapshot starts now, so that its setup server boots
    // alongside the launcher's two VMs rather than after them. Measured
    // at a load of 5–9 (BENCHMARKS.md, "Real VMs"): the three TCG VMs
    // together were ready in 217 s and the snapshot's node then booted
    // alone in 132 s; in sequence, two VMs, the setup server, then the
    // node would take at least three single boots, 396 s.
    // `image-update --wait` follows the build the request makes; the
    // request is made while the image is paused, so the builder's first
    // snapshot is the requested one.
    let timeout = BOOT_LIMIT.as_secs().to_string();
    let mut update = Command::new(&cli_bin)
        .arg("-c")
        .arg(site.config_path())
        .args(["image-update", "local", SNAPSHOT, "--wait", "--timeout"])
        .arg(&timeout)
        .stdout(std::fs::File::create(site.path("image-update.out")).unwrap())
        .stderr(std::fs::File::create(site.path("image-update.err")).unwrap())
        .spawn()
        .unwrap();
    until("the snapshot is requested", DAEMON_LIMIT, || async {
        let st = store.image_state().await.map_err(|e| e.to_string())?;
        match st.build_requests.contains_key(SNAPSHOT) {
            true => Ok(()),
            false => Err("no build request yet".to_string()),
        }
    })
    .await;
    site.nodepool(&cli_bin, &["image-unpause", SNAPSHOT]);
    let snapshot_asked = Instant::now();
    let mut saw_setup_vm = false;
    let setup_prefix = format!("np-setup-{SNAPSHOT}-");
    let node = until("the min-ready node is ready", BOOT_LIMIT, || {
        saw_setup_vm |= site.servers().iter().any(|s| s.starts_with(&setup_prefix));
        ready_node(&store, "debian")
    })
    .await;
    clock.lap("min-ready node: launcher start to ready (boot, nodescan, ready script; the agent's VM boots alongside)");
    assert_eq!(node.node.provider, "local");
    assert_eq!(node.node.interface_ip.as_deref(), Some("127.0.0.1"));
    assert_eq!(node.node.username.as_deref(), Some("root"));
    // One host key per type; the image's sshd has only ed25519.
    assert_eq!(node.node.host_keys.len(), 1, "{:?}", node.node.host_keys);
    assert_eq!(
        node.node.host_keys[0],
        keyscan_ed25519(port(&node.node)),
        "the recorded host key is not the one the node's sshd presents"
    );
    let marker = ssh(&site, &node.node, &format!("cat {MARKER}"));
    assert_eq!(marker.trim(), format!("{} debian", node.id));
    clock.lap("host key checked with ssh-keyscan, marker read over SSH");

    // --- 3. setup-script snapshot (issue 14 part 3) ---------------------------
    let status = until("nodepool image-update --wait returns", BOOT_LIMIT, || {
        saw_setup_vm |= site.servers().iter().any(|s| s.starts_with(&setup_prefix));
        let done = update.try_wait().unwrap();
        async move { done.ok_or_else(|| "still waiting".to_string()) }
    })
    .await;
    let said = std::fs::read_to_string(site.path("image-update.out")).unwrap();
    assert!(
        status.success(),
        "nodepool image-update --wait: {status}\n{said}{}",
        std::fs::read_to_string(site.path("image-update.err")).unwrap()
    );
    let st = store.image_state().await.unwrap();
    let snaps: Vec<_> = st.uploads.iter().filter(|u| u.image == SNAPSHOT).collect();
    let [snap] = snaps.as_slice() else {
        panic!("one snapshot upload expected: {snaps:#?}");
    };
    assert_eq!(snap.upload.state, UploadState::Ready, "{snap:#?}");
    assert_eq!(snap.provider, "local");
    let snap_image = snap.upload.external_id.clone().unwrap();
    assert_eq!(
        said,
        format!(
            "snapshot of {SNAPSHOT} in local requested\n\
             snapshot {} of {SNAPSHOT} in local ready: upload {}, cloud image {snap_image}\n",
            snap.build_id, snap.id
        )
    );
    assert!(
        !st.build_requests.contains_key(SNAPSHOT),
        "the served request is left"
    );
    assert!(
        site.images().contains(&snap_image),
        "the snapshot {snap_image} is not in the image directory: {:?}",
        site.images()
    );
    assert!(saw_setup_vm, "no setup server was seen");
    let servers = site.servers();
    assert!(
        !servers.iter().any(|s| s.starts_with(&setup_prefix)),
        "the setup server is left: {servers:?}"
    );
    println!(
        "vm-pipeline: snapshot made {:.1} s after image-update (setup server boot, setup, qemu-img convert, deletion)",
        snapshot_asked.elapsed().as_secs_f64()
    );
    clock.lap("setup-script snapshot made (image-update --wait; began with step 2)");

    let zuul = Requestor::new(store.clone(), "5eed000000000000000000000000beef");
    let rid = zuul
        .submit(&NewRequest::new(vec![SNAPSHOT.into()]))
        .await
        .unwrap();
    let request = match zuul.wait(&rid, BOOT_LIMIT).await.unwrap() {
        Outcome::Fulfilled(r) => r,
        Outcome::Failed(r) => panic!("the snapshot's request failed: {r:?}"),
    };
    let mut set = zuul.accept(&rid, &request.value).await.unwrap();
    assert_eq!(set.nodes.len(), 1);
    zuul.use_nodes(&mut set, "example.org/vm-pipeline-snapshot")
        .await
        .unwrap();
    clock.lap("node from the snapshot ready (request to fulfilled)");
    let (snap_node, snap_n) = (set.nodes[0].id.clone(), set.nodes[0].node.clone());
    assert_eq!(snap_n.username.as_deref(), Some("root"));
    // The setup script ran on the setup server of this very snapshot.
    let marker = ssh(&site, &snap_n, &format!("cat {SETUP_MARKER}"));
    assert_eq!(marker.trim(), format!("{setup_prefix}{}", snap.id));
    zuul.return_nodes(set).await.unwrap();
    until("the snapshot's node is deleted", DELETE_LIMIT, || {
        gone(&store, &snap_node)
    })
    .await;
    clock.lap("node from the snapshot: setup marker read over SSH, returned, deleted");

    // --- 4. the Jenkins target's agent, then no more min-ready ----------------
    let agent_node = until("the Jenkins agent's node", BOOT_LIMIT, || async {
        let agents = jenkins.agents();
        let Some((name, agent)) = agents.iter().next() else {
            return Err("no agent yet".to_string());
        };
        let id = name.rsplit('-').next().unwrap().to_owned();
        let n = store
            .get_node(&id)
            .await
            .map_err(|e| e.to_string())?
            .ok_or_else(|| format!("agent {name}: no node {id}"))?
            .value;
        if n.state != NodeState::Ready || !agent.online {
            return Err(format!(
                "agent {name}: node {:?}, online {}",
                n.state, agent.online
            ));
        }
        Ok((name.clone(), id, n))
    })
    .await;
    clock.lap("Jenkins agent registered (after the min-ready node)");
    let (agent, agent_id, agent_n) = agent_node;
    assert_eq!(agent_n.allocated_to.as_deref(), Some("jenkins:ci"));
    assert_eq!(agent_n.node_type, ["debian-agent"]);
    let a = jenkins.agent(&agent).unwrap();
    assert_eq!(a.label(), "debian-agent");
    assert_eq!(a.host(), "127.0.0.1");
    assert_eq!(a.config["launcher"]["port"], u64::from(port(&agent_n)));
    // The agent is a real VM: it answers with the recorded host key.
    assert!(ssh(&site, &agent_n, "hostname").trim().len() > 1);

    // min-ready 0 from here: the nodes given out are not replaced, so that
    // at the end nothing is left.
    let before = reloads(&launcher);
    site.write_config(0);
    until("the launcher reloaded", DAEMON_LIMIT, || async {
        if reloads(&launcher) > before {
            Ok(())
        } else {
            Err("no reload yet".to_string())
        }
    })
    .await;
    clock.lap("agent checked over SSH, min-ready 0 reloaded");

    // --- 5. a Zuul-style request gets the min-ready node ----------------------
    let rid = zuul
        .submit(&NewRequest::new(vec!["debian".into()]))
        .await
        .unwrap();
    let request = match zuul.wait(&rid, BOOT_LIMIT).await.unwrap() {
        Outcome::Fulfilled(r) => r,
        Outcome::Failed(r) => panic!("request failed: {r:?}"),
    };
    let mut set = zuul.accept(&rid, &request.value).await.unwrap();
    assert_eq!(set.nodes.len(), 1);
    assert_eq!(
        set.nodes[0].id, node.id,
        "the request was not served by the min-ready node"
    );
    zuul.use_nodes(&mut set, "example.org/vm-pipeline")
        .await
        .unwrap();
    let out = ssh(
        &site,
        &set.nodes[0].node,
        "uname -s; cat /etc/debian_version",
    );
    assert!(out.starts_with("Linux\n12."), "{out}");
    zuul.return_nodes(set).await.unwrap();
    until("the used node is deleted", DELETE_LIMIT, || {
        gone(&store, &node.id)
    })
    .await;
    clock.lap("requestor: request, command over SSH, return, node deleted");

    // --- 6. the agent's job ends: its node is deleted -------------------------
    jenkins.run_job(&agent, "vm-pipeline", "SUCCESS");
    until("the agent's node is deleted", DELETE_LIMIT, || {
        gone(&store, &agent_id)
    })
    .await;
    until("the agent is removed", DELETE_LIMIT, || async {
        match jenkins.agent(&agent) {
            None => Ok(()),
            Some(_) => Err("still there".to_string()),
        }
    })
    .await;
    clock.lap("Jenkins: job done, node deleted, agent removed");

    // --- 7. the snapshot is deleted, then nothing is left ----------------------
    // Paused first: with no ready snapshot the builder would make one at
    // once. The builder deletes its image (and its build, kept only with
    // it); the DIB image's upload stays, the provider's current image.
    site.nodepool(&cli_bin, &["image-pause", SNAPSHOT]);
    site.nodepool(
        &cli_bin,
        &[
            "image-delete",
            "--provider",
            "local",
            "--image",
            SNAPSHOT,
            "--build-id",
            &snap.build_id,
            "--upload-id",
            &snap.id,
        ],
    );
    until("the snapshot is deleted", DELETE_LIMIT, || async {
        let st = store.image_state().await.map_err(|e| e.to_string())?;
        let builds = st.builds.iter().filter(|b| b.image == SNAPSHOT).count();
        let uploads = st.uploads.iter().filter(|u| u.image == SNAPSHOT).count();
        let images = site.images();
        if builds == 0 && uploads == 0 && !images.contains(&snap_image) {
            Ok(())
        } else {
            Err(format!(
                "{builds} builds, {uploads} uploads of {SNAPSHOT}; images {images:?}"
            ))
        }
    })
    .await;
    let left = nodes(&store).await;
    assert!(left.is_empty(), "nodes left: {left:?}");
    until("no VM is left", DELETE_LIMIT, || async {
        let (servers, qemus) = (site.servers(), site.qemu_processes());
        if servers.is_empty() && qemus.is_empty() {
            Ok(())
        } else {
            Err(format!("servers {servers:?}, qemu {qemus:?}"))
        }
    })
    .await;
    let status = launcher.terminate(DAEMON_LIMIT).await;
    assert!(status.success(), "launcher exited {status}");
    let status = builder.terminate(DAEMON_LIMIT).await;
    assert!(status.success(), "builder exited {status}");
    assert_eq!(site.qemu_processes(), Vec::<String>::new());
    assert_eq!(site.servers(), Vec::<String>::new());
    assert_eq!(
        site.images(),
        [upload.upload.external_id.clone().unwrap()],
        "the provider holds an image besides the DIB upload"
    );
    assert_eq!(mounts_under(site.dir.path()), Vec::<PathBuf>::new());
    assert_eq!(loops_under(site.dir.path()), Vec::<String>::new());
    let dib_left: Vec<_> = std::fs::read_dir(site.path("dib-tmp"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    assert!(dib_left.is_empty(), "DIB left {dib_left:?}");
    clock.lap("daemons stopped, nothing left");
    clock.report();
}
