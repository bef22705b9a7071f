//! What the external provider's test files share: configurations running
//! a program through the protocol, and the example cloud's harness.

#![allow(dead_code)] // Each test file uses its own part.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use md5::Digest as _;
use nodepool_external::ExternalProvider;
use nodepool_model::config::{Config, PoolLabel, ProviderConfig};
use nodepool_model::conformance::provider::{Capabilities, Harness, UploadFile};
use nodepool_model::provider::{ImageRef, Provider};

/// The example provider program (`examples/external_provider/`).
pub fn example_program() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../examples/external_provider/example_cloud.py")
        .canonicalize()
        .expect("the example program exists")
}

/// A one-provider configuration running `command` (a YAML flow list) with
/// `extra` provider keys (YAML lines indented by four).
pub fn config_for(command: &str, extra: &str) -> Config {
    let yaml = format!(
        r#"
labels: [{{name: small}}, {{name: huge}}]
providers:
  - name: ext
    driver: external
    command: {command}
{extra}
    cloud-images: [{{name: base, image-name: base-image}}]
    pools:
      - name: main
        labels:
          - {{name: small, cloud-image: base, flavor-name: small}}
          - {{name: huge, cloud-image: base, flavor-name: huge}}
"#
    );
    Config::from_yaml(&yaml).unwrap_or_else(|e| panic!("test config is invalid: {e}\n{yaml}"))
}

/// Label `name` of the provider's first pool.
pub fn pool_label(p: &ProviderConfig, name: &str) -> PoolLabel {
    p.pools[0].label(name).expect("pool label").clone()
}

/// The example cloud with its state in a fresh directory.
pub struct Example {
    pub config: Config,
    pub dir: tempfile::TempDir,
    pub state: PathBuf,
    pub image: PathBuf,
}

/// The bytes every upload sends.
pub const IMAGE_BYTES: &[u8] = b"nodepool external image\n";

impl Example {
    /// A fresh cloud.
    pub fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let state = dir.path().join("cloud.json");
        let image = dir.path().join("image.qcow2");
        std::fs::write(&image, IMAGE_BYTES).expect("write image");
        let config = config_for(
            &format!("[{:?}]", example_program().display().to_string()),
            &format!(
                "    timeout: 30\n    environment: {{EXAMPLE_CLOUD_STATE: {:?}}}",
                state.display().to_string()
            ),
        );
        Example {
            config,
            dir,
            state,
            image,
        }
    }

    /// A provider on this cloud (each runs its own program).
    pub fn provider(&self) -> ExternalProvider {
        ExternalProvider::new(&self.config.providers[0]).expect("external provider")
    }
}

#[async_trait]
impl Harness for Example {
    async fn provider(&self) -> Arc<dyn Provider> {
        Arc::new(Example::provider(self))
    }

    fn label(&self) -> PoolLabel {
        pool_label(&self.config.providers[0], "small")
    }

    fn image(&self) -> ImageRef {
        ImageRef::Cloud {
            id: None,
            name: "base-image".into(),
        }
    }

    fn upload_file(&self) -> UploadFile {
        UploadFile {
            path: self.image.clone(),
            format: "qcow2".into(),
            md5: hex::encode(md5::Md5::digest(IMAGE_BYTES)),
            sha256: hex::encode(sha2::Sha256::digest(IMAGE_BYTES)),
        }
    }

    fn capabilities(&self) -> Capabilities {
        EXAMPLE_CAPABILITIES
    }

    fn quota_label(&self) -> Option<PoolLabel> {
        Some(pool_label(&self.config.providers[0], "huge"))
    }

    fn timeout(&self) -> Duration {
        Duration::from_secs(60)
    }
}

/// What the example cloud says it can do in its handshake (checked by
/// `handshake_capabilities_match_the_harness`); `quota_error` is the
/// harness's own: its `huge` flavor exceeds the cloud's quota.
pub const EXAMPLE_CAPABILITIES: Capabilities = Capabilities {
    floating_ips: false,
    ports: false,
    console_log: true,
    quota_error: true,
};
