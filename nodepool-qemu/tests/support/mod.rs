//! What the qemu provider's test files share: a configuration on a fresh
//! image directory, the boot-sector stub image, and the conformance
//! harness. VMs are real QEMU processes (TCG, 64 MiB): a missing QEMU
//! fails the tests with the provider's own error.

#![allow(dead_code)] // Each test file uses its own part.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use md5::Digest as _;
use nodepool_model::config::{Config, PoolLabel, ProviderConfig};
use nodepool_model::conformance::provider::{Capabilities, Harness, UploadFile};
use nodepool_model::provider::{ImageRef, ImageUploadSpec, Provider};
use nodepool_qemu::QemuProvider;

/// The cloud image name every label boots (the stub, uploaded).
pub const STUB_IMAGE: &str = "stub-image";
/// A public key written into config drives.
pub const PUBLIC_KEY: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBogusTestKeyOnlyForTheConfigDrive nodepool@test";

/// A one-provider configuration on `image_dir`, with `extra` provider
/// keys (YAML lines indented by four).
pub fn config_yaml(image_dir: &Path, extra: &str) -> String {
    format!(
        r#"
labels: [{{name: tiny}}, {{name: huge}}]
providers:
  - name: local
    driver: qemu
    image-dir: {image_dir:?}
    accelerator: tcg
    quota: {{instances: 20, cores: 20, ram: 2048}}
    flavors:
      - {{name: tiny, vcpus: 1, ram: 64}}
      - {{name: huge, vcpus: 1, ram: 4096}}
{extra}
    cloud-images: [{{name: stub, image-name: {STUB_IMAGE}}}]
    pools:
      - name: main
        labels:
          - {{name: tiny, cloud-image: stub, flavor-name: tiny, userdata: "echo hello"}}
          - {{name: huge, cloud-image: stub, flavor-name: huge}}
"#,
        image_dir = image_dir.display().to_string()
    )
}

/// Parses a test configuration.
pub fn config(yaml: &str) -> Config {
    Config::from_yaml(yaml).unwrap_or_else(|e| panic!("test config is invalid: {e}\n{yaml}"))
}

/// Label `name` of the provider's first pool.
pub fn pool_label(p: &ProviderConfig, name: &str) -> PoolLabel {
    p.pools[0].label(name).expect("pool label").clone()
}

/// A fresh host: an image directory, a config file naming it, the stub
/// image file and a public key file.
pub struct Local {
    pub dir: tempfile::TempDir,
    pub image_dir: PathBuf,
    pub config_path: PathBuf,
    pub config: Config,
    pub stub: PathBuf,
    uploaded: tokio::sync::OnceCell<String>,
}

impl Local {
    /// A fresh host.
    pub fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let image_dir = dir.path().join("vms");
        let stub = dir.path().join("stub.raw");
        std::fs::write(&stub, nodepool_qemu::stub_disk()).expect("write stub");
        let key = dir.path().join("id.pub");
        std::fs::write(&key, format!("{PUBLIC_KEY}\n")).expect("write key");
        let yaml = config_yaml(
            &image_dir,
            &format!("    public-key: {:?}", key.display().to_string()),
        );
        let config_path = dir.path().join("nodepool.yaml");
        std::fs::write(&config_path, &yaml).expect("write config");
        Local {
            config: config(&yaml),
            dir,
            image_dir,
            config_path,
            stub,
            uploaded: tokio::sync::OnceCell::new(),
        }
    }

    /// A new provider instance on this host (a launcher's).
    pub fn provider(&self) -> QemuProvider {
        QemuProvider::new(&self.config.providers[0]).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Uploads the stub as [`STUB_IMAGE`] once; returns its id.
    pub async fn stub_image(&self, p: &dyn Provider) -> String {
        self.uploaded
            .get_or_init(|| async {
                p.upload_image(&ImageUploadSpec {
                    name: STUB_IMAGE.into(),
                    path: self.stub.clone(),
                    format: "raw".into(),
                    properties: Default::default(),
                    md5: None,
                    sha256: None,
                    timeout: Duration::from_secs(60),
                    sent: Default::default(),
                })
                .await
                .expect("upload the stub")
            })
            .await
            .clone()
    }

    /// The pids of the VMs whose server directories are still there.
    pub fn vm_pids(&self) -> Vec<i32> {
        let Ok(entries) = std::fs::read_dir(self.image_dir.join("servers")) else {
            return Vec::new();
        };
        entries
            .filter_map(Result::ok)
            .filter_map(|e| std::fs::read_to_string(e.path().join("qemu.pid")).ok())
            .filter_map(|s| s.trim().parse().ok())
            .collect()
    }
}

/// A VM started by a separate "launcher" process that was then killed
/// with SIGKILL: its id, tagged for node `node` (unknown to any store).
pub async fn vm_of_a_killed_launcher(host: &Local, node: &str) -> String {
    use std::io::BufRead;
    let p = host.provider();
    let image = host.stub_image(&p).await;
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_nodepool-qemu-test-helper"))
        .arg(&host.config_path)
        .arg(node)
        .arg(&image)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("start the helper launcher");
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("the helper prints the VM id");
    child.kill().expect("kill -9 the helper");
    child.wait().expect("reap the helper");
    let id = line.trim().to_owned();
    assert!(!id.is_empty(), "the helper started a VM");
    id
}

/// Whether `pid` is a live (not zombie) process running QEMU.
pub fn qemu_alive(pid: i32) -> bool {
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    String::from_utf8_lossy(&cmdline).contains("qemu")
}

/// Polls `check` every 100 ms until it holds; panics after 60 s.
pub async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while !check() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: still not true after 60 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

impl Drop for Local {
    /// A failed test may leave VMs: they must not outlive it.
    fn drop(&mut self) {
        for pid in self.vm_pids() {
            if qemu_alive(pid) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
    }
}

#[async_trait]
impl Harness for Local {
    async fn provider(&self) -> Arc<dyn Provider> {
        let p = Local::provider(self);
        self.stub_image(&p).await;
        Arc::new(p)
    }

    fn label(&self) -> PoolLabel {
        pool_label(&self.config.providers[0], "tiny")
    }

    fn image(&self) -> ImageRef {
        ImageRef::Cloud {
            id: None,
            name: STUB_IMAGE.into(),
        }
    }

    fn upload_file(&self) -> UploadFile {
        let bytes = std::fs::read(&self.stub).expect("read stub");
        UploadFile {
            path: self.stub.clone(),
            format: "raw".into(),
            md5: hex::encode(md5::Md5::digest(&bytes)),
            sha256: hex::encode(sha2::Sha256::digest(&bytes)),
        }
    }

    fn capabilities(&self) -> Capabilities {
        QEMU_CAPABILITIES
    }

    fn snapshots(&self) -> bool {
        true
    }

    fn quota_label(&self) -> Option<PoolLabel> {
        Some(pool_label(&self.config.providers[0], "huge"))
    }

    fn timeout(&self) -> Duration {
        Duration::from_secs(60)
    }
}

/// What the qemu provider can do: a serial console, a quota of its own;
/// no floating IPs or ports (user-mode networking has neither).
pub const QEMU_CAPABILITIES: Capabilities = Capabilities {
    floating_ips: false,
    ports: false,
    console_log: true,
    quota_error: true,
};
