//! The `custom_provider` example's provider (servers as local processes)
//! passes the whole Provider conformance suite, as every provider must,
//! and its servers are real processes.

#[path = "../programs/custom_provider/local_processes.rs"]
mod local_processes;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use local_processes::{LocalCloud, LocalFlavor, LocalProcesses};
use nodepool_model::config::{Config, PoolLabel};
use nodepool_model::conformance::provider::{
    Capabilities, Harness, UploadFile, random_node_id, spec_for,
};
use nodepool_model::model::Limits;
use nodepool_model::provider::{ImageRef, Provider};

/// The file the upload tests send, and its digests (from `md5sum` and
/// `sha256sum`).
const IMAGE_BYTES: &[u8] = b"nodepool simulated image\n";
const IMAGE_MD5: &str = "76e40e14e3d189857637e8bcf0451229";
const IMAGE_SHA256: &str = "99709199ffe835543ab605e044495f883cc51d49ce1d1bbeca0b9c519a265420";

/// `small` fits the host's quota; `huge` (64 cores) never does.
const LABELS: &str = r#"
labels: [{name: small}, {name: huge}]
providers:
  - name: local
    driver: simulated
    cloud-images: [{name: host}]
    pools:
      - name: main
        labels:
          - {name: small, cloud-image: host, flavor-name: small}
          - {name: huge, cloud-image: host, flavor-name: huge}
"#;

/// A fresh provider per test, with its own image directory.
struct Local {
    config: Config,
    dir: tempfile::TempDir,
    file: PathBuf,
}

impl Local {
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("image.qcow2");
        std::fs::write(&file, IMAGE_BYTES).expect("write image");
        Local {
            config: Config::from_yaml(LABELS).unwrap_or_else(|e| panic!("bad test config: {e}")),
            dir,
            file,
        }
    }

    fn local(&self) -> LocalProcesses {
        let mut quota = Limits::unlimited();
        quota.set("instances", 10);
        quota.set("cores", 16);
        let flavor = |name: &str, vcpus| LocalFlavor {
            name: name.into(),
            vcpus,
            ram: 512,
        };
        LocalProcesses::new(
            "local",
            LocalCloud {
                quota,
                flavors: vec![flavor("small", 1), flavor("huge", 64)],
                cloud_images: vec!["host".into()],
                image_dir: self.dir.path().join("images"),
            },
        )
    }

    fn pool_label(&self, name: &str) -> PoolLabel {
        self.config.providers[0].pools[0]
            .label(name)
            .expect("pool label")
            .clone()
    }
}

#[async_trait]
impl Harness for Local {
    async fn provider(&self) -> Arc<dyn Provider> {
        Arc::new(self.local())
    }

    fn label(&self) -> PoolLabel {
        self.pool_label("small")
    }

    fn image(&self) -> ImageRef {
        ImageRef::Cloud {
            id: None,
            name: "host".into(),
        }
    }

    fn upload_file(&self) -> UploadFile {
        UploadFile {
            path: self.file.clone(),
            format: "qcow2".into(),
            md5: IMAGE_MD5.into(),
            sha256: IMAGE_SHA256.into(),
        }
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            floating_ips: false,
            ports: false,
            console_log: false,
            quota_error: true,
        }
    }

    fn quota_label(&self) -> Option<PoolLabel> {
        Some(self.pool_label("huge"))
    }

    fn timeout(&self) -> Duration {
        Duration::from_secs(30)
    }
}

mod conformance {
    use super::Local;
    nodepool_model::provider_conformance_tests!(Local::new());
}

/// Whether process `pid` is alive (not gone, not a zombie), from procfs.
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            let state = s.get(s.rfind(')')? + 1..)?.split_whitespace().next()?;
            Some(state != "Z" && state != "X")
        })
        .unwrap_or(false)
}

#[tokio::test]
async fn a_server_is_a_process_until_deleted() {
    let h = Local::new();
    let p = h.local();
    let spec = spec_for(&h, &p, &random_node_id(), h.label());
    let id = p.create_instance(&spec).await.expect("create");
    let pid = p.pid(&id).expect("a process");
    assert!(alive(pid), "process {pid} runs");
    assert_eq!(
        p.wait_for_instance(&id, &spec)
            .await
            .expect("active")
            .external_id,
        id
    );
    p.delete_instance(&id).await.expect("delete");
    assert!(!alive(pid), "process {pid} killed and reaped");
    assert_eq!(p.pid(&id), None);
}
