//! What the simulated cloud's test files share: the image file every
//! upload sends, and the Provider conformance harness ([`Sim`]) for the
//! cloud as it is or behind a decorator.

#![allow(dead_code)] // Each test file uses its own part.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use nodepool_model::config::{Config, PoolLabel, ProviderConfig};
use nodepool_model::conformance::provider::{Capabilities, Harness, UploadFile};
use nodepool_model::provider::{ImageRef, Provider};
use nodepool_simulated::SimulatedProvider;

/// The file every upload test sends, and its digests (from `md5sum` and
/// `sha256sum`).
pub const IMAGE_BYTES: &[u8] = b"nodepool simulated image\n";
pub const IMAGE_MD5: &str = "76e40e14e3d189857637e8bcf0451229";
pub const IMAGE_SHA256: &str = "99709199ffe835543ab605e044495f883cc51d49ce1d1bbeca0b9c519a265420";

/// The conformance suite's cloud: a quota a `huge` server cannot fit,
/// boots and deletes at once (the suite runs on the real clock).
pub const CONFORMANCE: &str = r#"
labels: [{name: small}, {name: huge}]
providers:
  - name: sim
    driver: simulated
    cloud: simcloud
    region-name: RegionOne
    simulation:
      boot-delay: 0
      delete-delay: 0
      quota: {instances: 100, cores: 64, ram: 1000000}
      flavors:
        - {name: small, vcpus: 2, ram: 2048}
        - {name: huge, vcpus: 128, ram: 8192}
    cloud-images: [{name: ubuntu, image-name: Ubuntu 22.04}]
    pools:
      - name: main
        labels:
          - {name: small, cloud-image: ubuntu, min-ram: 1024}
          - {name: huge, cloud-image: ubuntu, flavor-name: huge}
"#;

/// A configuration that must be valid.
pub fn config(yaml: &str) -> Config {
    Config::from_yaml(yaml).unwrap_or_else(|e| panic!("test config is invalid: {e}"))
}

/// Label `name` of the provider's first pool.
pub fn pool_label(p: &ProviderConfig, name: &str) -> PoolLabel {
    p.pools[0].label(name).expect("pool label").clone()
}

/// The conformance harness: a fresh cloud per test, handed to the suite
/// through `wrap` (as it is, or behind a decorator).
pub struct Sim {
    pub config: Config,
    pub dir: tempfile::TempDir,
    pub file: PathBuf,
    wrap: fn(SimulatedProvider) -> Arc<dyn Provider>,
}

impl Sim {
    /// The simulated cloud as it is.
    pub fn new() -> Self {
        Self::wrapped(|c| Arc::new(c))
    }

    /// The simulated cloud behind `wrap`.
    pub fn wrapped(wrap: fn(SimulatedProvider) -> Arc<dyn Provider>) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("image.qcow2");
        std::fs::write(&file, IMAGE_BYTES).expect("write image");
        Sim {
            config: config(CONFORMANCE),
            dir,
            file,
            wrap,
        }
    }
}

#[async_trait]
impl Harness for Sim {
    async fn provider(&self) -> Arc<dyn Provider> {
        let cloud = SimulatedProvider::new(&self.config.providers[0]).expect("simulated");
        (self.wrap)(cloud)
    }

    fn label(&self) -> PoolLabel {
        pool_label(&self.config.providers[0], "small")
    }

    fn image(&self) -> ImageRef {
        ImageRef::Cloud {
            id: None,
            name: "Ubuntu 22.04".into(),
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
            ports: true,
            console_log: true,
            quota_error: true,
        }
    }

    fn snapshots(&self) -> bool {
        true
    }

    fn quota_label(&self) -> Option<PoolLabel> {
        Some(pool_label(&self.config.providers[0], "huge"))
    }

    fn timeout(&self) -> Duration {
        Duration::from_secs(30)
    }
}
