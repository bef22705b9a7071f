//! A [`Provider`] whose "servers" are processes on this host: creating one
//! starts a long-lived `sleep`, listing looks at which are still alive,
//! deleting kills it. Quota and flavors come from its [`LocalCloud`]
//! configuration; images are the host itself (cloud images) or files
//! uploaded into a directory, checked against their checksums.
//!
//! Shared by the `custom_provider` example program, which plugs it into an
//! in-process launcher, and by `tests/custom_provider.rs`, which runs the
//! provider conformance suite against it: every provider must pass that
//! suite, whoever wrote it.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use indexmap::IndexMap;
use md5::Md5;
use nodepool_model::cloud::{Flavor, choose_flavor, fit_metadata};
use nodepool_model::config::PoolLabel;
use nodepool_model::model::{Limits, Resources, VOLUME_GB, VOLUMES};
use nodepool_model::provider::{
    CloudImageInfo, ImageRef, ImageUploadSpec, Instance, InstanceSpec, InstanceStatus, Provider,
    ProviderError,
};
use sha2::{Digest, Sha256};
use tokio::process::{Child, Command};

/// How long a server process lives at most: a server outlives a killed
/// program by no more than this.
const SERVER_LIFETIME: &str = "3600";

/// A flavor: what one server of it counts against the quota.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LocalFlavor {
    /// Its name, matched by a label's `flavor-name`.
    pub name: String,
    /// vCPUs it counts as.
    pub vcpus: i64,
    /// RAM (MiB) it counts as.
    pub ram: i64,
}

/// Lets Nodepool's flavor choice (`flavor-name`, `min-ram`) pick ours.
impl Flavor for LocalFlavor {
    fn name(&self) -> &str {
        &self.name
    }
    fn ram(&self) -> i64 {
        self.ram
    }
}

/// The provider's configuration.
#[derive(Clone, Debug)]
pub struct LocalCloud {
    /// The host's quota: `instances`, `cores`, `ram`; missing names are
    /// unlimited.
    pub quota: Limits,
    /// The flavors labels may ask for.
    pub flavors: Vec<LocalFlavor>,
    /// Cloud image names present from the start (servers boot "the host").
    pub cloud_images: Vec<String>,
    /// Where uploaded images are kept.
    pub image_dir: PathBuf,
}

/// One server: its process, and the instance as listed.
#[derive(Debug)]
struct Server {
    process: Child,
    instance: Instance,
}

impl Server {
    /// Active while the process runs, ERROR once it exited.
    fn status(&mut self) -> InstanceStatus {
        match self.process.try_wait() {
            Ok(None) => InstanceStatus::Active,
            Ok(Some(exit)) => InstanceStatus::Error(format!("the process exited: {exit}")),
            Err(e) => InstanceStatus::Other(format!("unknown: {e}")),
        }
    }

    fn listed(&mut self) -> Instance {
        let mut i = self.instance.clone();
        i.status = self.status();
        i
    }
}

#[derive(Debug, Default)]
struct State {
    servers: BTreeMap<String, Server>,
    images: IndexMap<String, CloudImageInfo>,
    /// Numbers server and image ids (with the pid, so ids never repeat).
    created: u64,
}

/// Servers as processes on this host (see the module documentation).
/// Processes are killed when the provider is dropped.
#[derive(Debug)]
pub struct LocalProcesses {
    name: String,
    cloud: LocalCloud,
    state: Mutex<State>,
}

impl LocalProcesses {
    /// The provider `name` (as in `nodepool.yaml`) on `cloud`.
    pub fn new(name: &str, cloud: LocalCloud) -> Self {
        let mut state = State::default();
        for image in &cloud.cloud_images {
            state.images.insert(
                image.clone(),
                CloudImageInfo {
                    id: image.clone(),
                    name: image.clone(),
                    status: "active".into(),
                    properties: IndexMap::new(),
                },
            );
        }
        LocalProcesses {
            name: name.to_owned(),
            cloud,
            state: Mutex::new(state),
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // The maps stay consistent whatever panicked while holding them.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The process id behind a server, while it exists.
    pub fn pid(&self, external_id: &str) -> Option<u32> {
        self.state()
            .servers
            .get(external_id)
            .and_then(|s| s.process.id())
    }

    fn resources(&self, label: &PoolLabel) -> Result<Resources, ProviderError> {
        let flavor = choose_flavor(&self.cloud.flavors, label).ok_or_else(|| {
            ProviderError::InvalidRequest(format!(
                "provider {}: label {}: no flavor matches",
                self.name, label.name
            ))
        })?;
        let mut r = Resources::server(flavor.vcpus, flavor.ram);
        if label.boot_from_volume {
            r.set(VOLUMES, 1);
            r.set(VOLUME_GB, label.volume_size);
        }
        Ok(r)
    }
}

/// Whether `image` names an image we have.
fn has_image(images: &IndexMap<String, CloudImageInfo>, image: &ImageRef) -> bool {
    match image {
        ImageRef::Uploaded { external_id } => images.contains_key(external_id),
        ImageRef::Cloud { id: Some(id), .. } => images.contains_key(id),
        ImageRef::Cloud { id: None, name } => images.values().any(|i| &i.name == name),
    }
}

#[async_trait]
impl Provider for LocalProcesses {
    fn name(&self) -> &str {
        &self.name
    }

    async fn quota_limits(&self) -> Result<Limits, ProviderError> {
        Ok(self.cloud.quota.clone())
    }

    async fn label_resources(&self, label: &PoolLabel) -> Result<Resources, ProviderError> {
        self.resources(label)
    }

    async fn create_instance(&self, spec: &InstanceSpec) -> Result<String, ProviderError> {
        let resources = self.resources(&spec.label)?;
        let mut st = self.state();
        if !has_image(&st.images, &spec.image) {
            return Err(ProviderError::InvalidRequest(format!(
                "provider {}: no image {:?}",
                self.name, spec.image
            )));
        }
        // Checked and started under one lock, so concurrent creates cannot
        // both take the last of the quota.
        let mut used = Resources::new();
        for s in st.servers.values() {
            if let Some(r) = &s.instance.resources {
                used.add(r);
            }
        }
        if let Some(name) = self.cloud.quota.first_exceeded(&used, &resources) {
            return Err(ProviderError::QuotaExceeded(format!(
                "provider {}: Quota exceeded for {name} on this host",
                self.name
            )));
        }
        let process = Command::new("sleep")
            .arg(SERVER_LIFETIME)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| {
                ProviderError::Other(format!(
                    "provider {}: cannot start a process: {e}",
                    self.name
                ))
            })?;
        st.created += 1;
        let pid = process.id().unwrap_or_default();
        let id = format!("proc-{pid}-{}", st.created);
        let instance = Instance {
            external_id: id.clone(),
            name: spec.name.clone(),
            status: InstanceStatus::Active,
            metadata: fit_metadata(&spec.name, &spec.metadata),
            public_ipv4: None,
            private_ipv4: Some("127.0.0.1".into()),
            public_ipv6: None,
            interface_ip: Some("127.0.0.1".into()),
            az: None,
            region: None,
            cloud: Some("localhost".into()),
            host_id: None,
            resources: Some(resources),
        };
        st.servers.insert(id.clone(), Server { process, instance });
        Ok(id)
    }

    async fn wait_for_instance(
        &self,
        external_id: &str,
        _spec: &InstanceSpec,
    ) -> Result<Instance, ProviderError> {
        // A process runs as soon as it is started: nothing to wait for.
        let mut st = self.state();
        let Some(server) = st.servers.get_mut(external_id) else {
            return Err(ProviderError::ServerFailed(format!(
                "provider {}: server {external_id} is gone",
                self.name
            )));
        };
        let instance = server.listed();
        match &instance.status {
            InstanceStatus::Active => Ok(instance),
            other => Err(ProviderError::ServerFailed(format!(
                "provider {}: server {external_id}: {other:?}",
                self.name
            ))),
        }
    }

    async fn get_instance(&self, external_id: &str) -> Result<Option<Instance>, ProviderError> {
        Ok(self
            .state()
            .servers
            .get_mut(external_id)
            .map(Server::listed))
    }

    async fn list_instances(&self) -> Result<Vec<Instance>, ProviderError> {
        Ok(self
            .state()
            .servers
            .values_mut()
            .map(Server::listed)
            .collect())
    }

    async fn delete_instance(&self, external_id: &str) -> Result<(), ProviderError> {
        let Some(mut server) = self.state().servers.remove(external_id) else {
            return Ok(());
        };
        // Killed and reaped outside the lock; an already exited process is
        // fine.
        match server.process.kill().await {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::InvalidInput => Ok(()),
            Err(e) => Err(ProviderError::Other(format!(
                "provider {}: cannot kill server {external_id}: {e}",
                self.name
            ))),
        }
    }

    async fn upload_image(&self, spec: &ImageUploadSpec) -> Result<String, ProviderError> {
        let fail = |what: &str, e: &dyn std::fmt::Display| {
            ProviderError::Other(format!(
                "provider {}: image {}: {what}: {e}",
                self.name, spec.name
            ))
        };
        let upload = async {
            let bytes = tokio::fs::read(&spec.path)
                .await
                .map_err(|e| fail("cannot read the file", &e))?;
            for (what, want, got) in [
                ("md5", &spec.md5, hex::encode(Md5::digest(&bytes))),
                ("sha256", &spec.sha256, hex::encode(Sha256::digest(&bytes))),
            ] {
                if let Some(want) = want
                    && !want.eq_ignore_ascii_case(&got)
                {
                    return Err(fail(
                        &format!("{what} mismatch"),
                        &format!("expected {want}, got {got}"),
                    ));
                }
            }
            let id = {
                let mut st = self.state();
                st.created += 1;
                format!("image-{}-{}", std::process::id(), st.created)
            };
            tokio::fs::create_dir_all(&self.cloud.image_dir)
                .await
                .map_err(|e| fail("cannot create the image directory", &e))?;
            tokio::fs::write(self.cloud.image_dir.join(&id), &bytes)
                .await
                .map_err(|e| fail("cannot store the image", &e))?;
            Ok(id)
        };
        let id = tokio::time::timeout(spec.timeout, upload)
            .await
            .map_err(|_| {
                ProviderError::Timeout(format!("provider {}: image {}", self.name, spec.name))
            })??;
        self.state().images.insert(
            id.clone(),
            CloudImageInfo {
                id: id.clone(),
                name: spec.name.clone(),
                status: "active".into(),
                properties: spec.properties.clone(),
            },
        );
        Ok(id)
    }

    async fn list_images(&self) -> Result<Vec<CloudImageInfo>, ProviderError> {
        Ok(self.state().images.values().cloned().collect())
    }

    async fn delete_image(&self, external_id: &str) -> Result<(), ProviderError> {
        let uploaded = self.state().images.shift_remove(external_id).is_some()
            && !self.cloud.cloud_images.iter().any(|c| c == external_id);
        if uploaded {
            match tokio::fs::remove_file(self.cloud.image_dir.join(external_id)).await {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    return Err(ProviderError::Other(format!(
                        "provider {}: cannot remove image {external_id}: {e}",
                        self.name
                    )));
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// The processes have no SSH server to scan.
    fn skip_nodescan(&self) -> bool {
        true
    }

    /// Every call answers from memory at once.
    fn api_timeout(&self) -> Duration {
        Duration::from_secs(5)
    }
}
