//! `driver: qemu`: a [`Provider`] whose servers are QEMU virtual machines
//! on the launcher's host.
//!
//! Each server is a `qemu-system-x86_64` process (KVM when a probe guest
//! runs under it, TCG otherwise; chosen once and logged) booting a
//! copy-on-write qcow2 overlay over an uploaded image, with user-mode
//! networking forwarding a host port on 127.0.0.1 to the guest's port 22
//! (the node's `connection-port`), its serial console in a file (served by
//! [`Provider::console_log`]) and an OpenStack-format config drive. QEMU
//! daemonizes into its own session, so VMs outlive a killed launcher; the
//! next provider lists them from the image directory and `/proc`, and the
//! launcher's leak rule deletes those no node owns.
//!
//! A server is ACTIVE from the moment QEMU reported a successful start
//! (its device and network setup succeeded) for as long as the process
//! runs: the provider does not look into the guest (nodescan waits for
//! SSH). A server whose process died is in ERROR; one whose start was
//! interrupted (a launcher killed mid-create) is BUILD, and leaks like any
//! other. Layout: `images` (uploads), `vm` (a server's files and process),
//! `drive` (config drive), `host` (programs, KVM probe, memory).

mod drive;
mod host;
mod images;
mod vm;

use std::path::{Path, PathBuf};
use std::time::Duration;

use async_trait::async_trait;
use nodepool_model::config::{Driver, PoolLabel, ProviderConfig, QemuHost, SimulatedFlavor};
use nodepool_model::model::{CORES, INSTANCES, Limits, RAM, Resources, VOLUME_GB, VOLUMES};
use nodepool_model::provider::{
    CloudImageInfo, ImageRef, ImageUploadSpec, Instance, InstanceSpec, InstanceStatus, Provider,
    ProviderError, SnapshotSpec, poll_until_active,
};

pub use host::{STUB_BANNER, stub_disk};

/// The guest port host ports are forwarded to.
pub const GUEST_SSH_PORT: u16 = 22;
/// How many host ports a start tries before giving up: a port found free
/// may be taken by another process before QEMU binds it.
const PORT_ATTEMPTS: usize = 10;
/// How long QEMU may take to start (set up its devices and daemonize).
const START_LIMIT: Duration = Duration::from_secs(60);
/// How long a VM has to exit after SIGTERM before it gets SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(10);
/// How long a delete waits for the process to be gone.
const STOP_LIMIT: Duration = Duration::from_secs(60);
/// How much of the serial console `console_log` returns.
const CONSOLE_MAX: u64 = 256 * 1024;

/// A provider whose servers are VMs on this host.
#[derive(Debug)]
pub struct QemuProvider {
    name: String,
    host: QemuHost,
    qemu: PathBuf,
    qemu_img: PathBuf,
    tools: drive::DriveTools,
    public_key: Option<String>,
    accelerator: tokio::sync::OnceCell<&'static str>,
    /// Launches of this process one at a time, so the quota check counts
    /// every VM started before.
    launches: tokio::sync::Mutex<()>,
}

impl QemuProvider {
    /// A provider for a `driver: qemu` provider configuration. Fails, with
    /// the configuration key at fault, when QEMU, `qemu-img` or the config
    /// drive tools cannot be run, the image directory cannot be written or
    /// the public key file cannot be read.
    pub fn new(pc: &ProviderConfig) -> Result<Self, ProviderError> {
        let Driver::Qemu(host) = &pc.driver else {
            return Err(ProviderError::InvalidRequest(format!(
                "provider {}: driver {} is not qemu",
                pc.name,
                pc.driver.name()
            )));
        };
        let at = |key: &str, why: String| {
            ProviderError::InvalidRequest(format!("providers[name={}].{key}: {why}", pc.name))
        };
        let install = "install QEMU (scripts/qemu.sh install) or set qemu-binary";
        let qemu = host::find_program(&host.qemu_binary)
            .map_err(|why| at("qemu-binary", format!("{why}; {install}")))?;
        let version = host::version_of(&qemu).map_err(|why| at("qemu-binary", why))?;
        // qemu-img comes with QEMU: beside the binary, else on PATH.
        let qemu_img = qemu
            .parent()
            .map(|d| d.join("qemu-img"))
            .filter(|p| p.is_file())
            .map_or_else(|| host::find_program("qemu-img"), Ok)
            .map_err(|why| at("qemu-binary", format!("{why} (qemu-utils); {install}")))?;
        let tool = |name: &str| {
            host::find_program(name).map_err(|why| {
                at(
                    "driver",
                    format!(
                        "{why}: config drives need dosfstools and mtools (scripts/qemu.sh install)"
                    ),
                )
            })
        };
        let tools = drive::DriveTools {
            mkfs_vfat: tool("mkfs.vfat")?,
            mcopy: tool("mcopy")?,
        };
        for sub in ["images", "servers"] {
            let dir = host.image_dir.join(sub);
            std::fs::create_dir_all(&dir)
                .and_then(|()| {
                    let probe = dir.join(format!(".write-test-{}", std::process::id()));
                    std::fs::write(&probe, b"")?;
                    std::fs::remove_file(&probe)
                })
                .map_err(|e| {
                    at(
                        "image-dir",
                        format!("{} cannot be written: {e}", dir.display()),
                    )
                })?;
        }
        // Overlays name their backing file and `/proc` command lines name
        // the server directory: both must not depend on the working directory.
        let mut host = host.clone();
        host.image_dir = std::fs::canonicalize(&host.image_dir)
            .map_err(|e| at("image-dir", format!("{}: {e}", host.image_dir.display())))?;
        let public_key = match &host.public_key {
            Some(p) => Some(
                std::fs::read_to_string(p)
                    .map(|k| k.trim().to_owned())
                    .map_err(|e| at("public-key", format!("{}: {e}", p.display())))?,
            ),
            None => None,
        };
        images::sweep_partials(&host.image_dir.join("images"));
        vm::reap_orphans(&host.image_dir.join("servers"));
        tracing::info!(provider = %pc.name, qemu = %qemu.display(), %version, image_dir = %host.image_dir.display(), "qemu provider ready");
        Ok(QemuProvider {
            name: pc.name.clone(),
            host,
            qemu,
            qemu_img,
            tools,
            public_key,
            accelerator: tokio::sync::OnceCell::new(),
            launches: tokio::sync::Mutex::new(()),
        })
    }

    /// The accelerator VMs use (`kvm` or `tcg`), chosen at the first call
    /// and logged.
    pub async fn accelerator(&self) -> &'static str {
        self.accelerator
            .get_or_init(|| async {
                let (accel, why) = host::choose_accelerator(
                    self.host.accelerator,
                    &self.qemu,
                    &self.host.image_dir,
                )
                .await;
                tracing::info!(provider = %self.name, accelerator = accel, reason = %why, "qemu accelerator chosen");
                accel
            })
            .await
    }

    /// The directory of a server's files (whether or not it exists).
    pub fn server_dir(&self, external_id: &str) -> PathBuf {
        self.servers().join(external_id)
    }

    fn servers(&self) -> PathBuf {
        self.host.image_dir.join("servers")
    }

    fn images(&self) -> PathBuf {
        self.host.image_dir.join("images")
    }

    fn flavor(&self, label: &PoolLabel) -> Result<&SimulatedFlavor, ProviderError> {
        let chosen = if label.flavor_name.is_none() && label.min_ram.is_none() {
            self.host.flavors.first()
        } else {
            nodepool_model::cloud::choose_flavor(&self.host.flavors, label)
        };
        chosen.ok_or_else(|| {
            ProviderError::InvalidRequest(format!(
                "provider {}: no flavor for label {} (flavor-name {:?}, min-ram {:?}; flavors: {})",
                self.name,
                label.name,
                label.flavor_name,
                label.min_ram,
                self.host
                    .flavors
                    .iter()
                    .map(|f| format!("{} ({} vCPU, {} MiB)", f.name, f.vcpus, f.ram))
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
        })
    }

    /// The image a server boots: an upload by id, or by its id or name.
    fn image_for(&self, image: &ImageRef) -> Result<images::ImageRecord, ProviderError> {
        let all = images::list(&self.images());
        let found = match image {
            ImageRef::Uploaded { external_id } => all.into_iter().find(|i| &i.id == external_id),
            ImageRef::Cloud { id, name } => {
                let by_id = id
                    .as_ref()
                    .and_then(|id| all.iter().find(|i| &i.id == id).cloned());
                by_id.or_else(|| all.into_iter().rev().find(|i| &i.name == name))
            }
        };
        found.ok_or_else(|| {
            ProviderError::InvalidRequest(format!(
                "provider {}: image {image:?} is not in {}",
                self.name,
                self.images().display()
            ))
        })
    }

    fn instance_of(&self, dir: &Path) -> Option<Instance> {
        let record = vm::read_record(dir)?;
        let status = match vm::liveness(dir) {
            vm::Liveness::Running { .. } => InstanceStatus::Active,
            vm::Liveness::NotStarted => InstanceStatus::Building,
            vm::Liveness::Gone => InstanceStatus::Error("the qemu process is gone".into()),
        };
        let localhost = Some("127.0.0.1".to_owned());
        Some(Instance {
            external_id: record.id,
            name: record.name,
            status,
            metadata: record.metadata,
            public_ipv4: localhost.clone(),
            // QEMU's user-mode network gives every guest this address.
            private_ipv4: Some("10.0.2.15".into()),
            public_ipv6: None,
            interface_ip: localhost,
            az: None,
            region: None,
            cloud: None,
            host_id: None,
            resources: Some(Resources::server(record.vcpus, record.ram)),
        })
    }

    /// Refuses a launch beyond the configured quota or the host's memory.
    fn check_quota(&self, flavor: &SimulatedFlavor) -> Result<(), ProviderError> {
        let mut used = Resources::default();
        for dir in vm::server_dirs(&self.servers()) {
            if let Some(r) = vm::read_record(&dir)
                && vm::liveness(&dir) != vm::Liveness::Gone
            {
                used.add(&Resources::server(r.vcpus, r.ram));
            }
        }
        let wanted = Resources::server(flavor.vcpus, flavor.ram);
        for name in [INSTANCES, CORES, RAM] {
            if let Some(limit) = self.host.quota.get(name)
                && used.get(name) + wanted.get(name) > limit
            {
                return Err(ProviderError::QuotaExceeded(format!(
                    "provider {}: quota exceeded for {name}: {} in use, {} wanted, limit {limit}",
                    self.name,
                    used.get(name),
                    wanted.get(name)
                )));
            }
        }
        if let Some(free) = host::available_ram_mib()
            && free < flavor.ram
        {
            return Err(ProviderError::QuotaExceeded(format!(
                "provider {}: quota exceeded for host memory: {free} MiB available, flavor {} needs {} MiB",
                self.name, flavor.name, flavor.ram
            )));
        }
        Ok(())
    }

    async fn create_in(
        &self,
        dir: &Path,
        record: &mut vm::ServerRecord,
        disk: &Path,
        spec: &InstanceSpec,
    ) -> Result<(), String> {
        let write_record = |r: &vm::ServerRecord| {
            let json = serde_json::to_vec_pretty(r).map_err(|e| e.to_string())?;
            std::fs::write(dir.join(vm::RECORD), json)
                .map_err(|e| format!("{}: {e}", dir.join(vm::RECORD).display()))
        };
        write_record(record)?;
        let out = tokio::process::Command::new(&self.qemu_img)
            .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"])
            .arg(disk)
            .arg(dir.join(vm::OVERLAY))
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true)
            .output()
            .await
            .map_err(|e| format!("{} cannot be run: {e}", self.qemu_img.display()))?;
        if !out.status.success() {
            return Err(format!(
                "qemu-img create (overlay) failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        let mac = vm::mac_for(&record.id);
        drive::write(
            &self.tools,
            &drive::DriveContents {
                id: &record.id,
                name: &record.name,
                mac: &mac,
                metadata: &record.metadata,
                public_key: self.public_key.as_deref(),
                userdata: spec.label.userdata.as_deref(),
            },
            &dir.join("config-drive"),
            &dir.join(vm::CONFIG_DRIVE),
        )
        .await?;
        let accel = self.accelerator().await;
        let mut last = String::new();
        for _ in 0..PORT_ATTEMPTS {
            let port = free_port().map_err(|e| format!("no free port on 127.0.0.1: {e}"))?;
            record.port = port;
            write_record(record)?;
            match self.start(dir, record, accel, &mac).await {
                Ok(()) => {
                    std::fs::write(dir.join(vm::STARTED), b"").map_err(|e| e.to_string())?;
                    return Ok(());
                }
                Err(why) if why.contains("host forwarding") => {
                    tracing::debug!(provider = %self.name, port, error = %why, "forwarded port taken meanwhile; trying another");
                    last = why;
                }
                Err(why) => return Err(why),
            }
        }
        Err(format!(
            "no forwarded port after {PORT_ATTEMPTS} attempts: {last}"
        ))
    }

    /// Runs QEMU until it daemonizes: success means its devices and port
    /// forwarding are set up and the guest runs.
    async fn start(
        &self,
        dir: &Path,
        record: &vm::ServerRecord,
        accel: &str,
        mac: &str,
    ) -> Result<(), String> {
        let mut cmd = tokio::process::Command::new(&self.qemu);
        cmd.arg("-name")
            .arg(format!("{},process=qemu-{}", record.name, record.name))
            .args(["-accel", accel])
            .args(["-m", &record.ram.to_string()])
            .args(["-smp", &record.vcpus.to_string()]);
        if accel == "kvm" {
            cmd.args(["-cpu", "host"]);
        }
        cmd.args(["-display", "none", "-monitor", "none", "-nodefaults"])
            .arg("-serial")
            .arg(format!("file:{}", dir.join(vm::CONSOLE).display()))
            .arg("-drive")
            .arg(format!(
                "file={},if=none,id=disk0,format=qcow2",
                dir.join(vm::OVERLAY).display()
            ))
            .args(["-device", "virtio-blk-pci,drive=disk0,bootindex=0"])
            .arg("-drive")
            .arg(format!(
                "file={},if=none,id=config2,format=raw,readonly=on",
                dir.join(vm::CONFIG_DRIVE).display()
            ))
            .args(["-device", "virtio-blk-pci,drive=config2"])
            .arg("-netdev")
            .arg(format!(
                "user,id=net0,hostfwd=tcp:127.0.0.1:{}-:{GUEST_SSH_PORT}",
                record.port
            ))
            .arg("-device")
            .arg(format!("virtio-net-pci,netdev=net0,mac={mac},romfile="))
            .arg("-pidfile")
            .arg(dir.join(vm::PIDFILE))
            .arg("-daemonize")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .process_group(0)
            .kill_on_drop(true);
        let child = cmd
            .spawn()
            .map_err(|e| format!("{} cannot be run: {e}", self.qemu.display()))?;
        let out = tokio::time::timeout(START_LIMIT, child.wait_with_output())
            .await
            .map_err(|_| format!("qemu did not start within {} s", START_LIMIT.as_secs()))?
            .map_err(|e| format!("waiting for qemu: {e}"))?;
        let stderr = String::from_utf8_lossy(&out.stderr).trim().to_owned();
        if out.status.success() {
            if !stderr.is_empty() {
                tracing::debug!(provider = %self.name, server = %record.id, %stderr, "qemu started with warnings");
            }
            Ok(())
        } else {
            Err(format!("qemu failed to start ({}): {stderr}", out.status))
        }
    }

    /// Stops a server's VM and removes its files.
    async fn remove_server(&self, dir: &Path) -> Result<(), ProviderError> {
        vm::stop(dir, STOP_GRACE, STOP_LIMIT)
            .await
            .map_err(|why| ProviderError::Other(format!("provider {}: {why}", self.name)))?;
        match std::fs::remove_dir_all(dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(ProviderError::Other(format!(
                "provider {}: removing {}: {e}",
                self.name,
                dir.display()
            ))),
        }
    }
}

/// A port on 127.0.0.1 free right now (it may be taken before QEMU binds
/// it: the caller retries on QEMU's forwarding error).
fn free_port() -> std::io::Result<u16> {
    let l = std::net::TcpListener::bind(("127.0.0.1", 0))?;
    Ok(l.local_addr()?.port())
}

/// Whether a cloud id can name a server directory (never a path).
fn plain_id(id: &str) -> bool {
    !id.is_empty()
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

#[async_trait]
impl Provider for QemuProvider {
    fn name(&self) -> &str {
        &self.name
    }

    async fn quota_limits(&self) -> Result<Limits, ProviderError> {
        Ok(self.host.quota.clone())
    }

    async fn label_resources(&self, label: &PoolLabel) -> Result<Resources, ProviderError> {
        let f = self.flavor(label)?;
        let mut r = Resources::server(f.vcpus, f.ram);
        if label.boot_from_volume {
            r.set(VOLUMES, 1);
            r.set(VOLUME_GB, label.volume_size);
        }
        Ok(r)
    }

    async fn create_instance(&self, spec: &InstanceSpec) -> Result<String, ProviderError> {
        let flavor = self.flavor(&spec.label)?.clone();
        let image = self.image_for(&spec.image)?;
        let _one_at_a_time = self.launches.lock().await;
        self.check_quota(&flavor)?;
        let id = uuid::Uuid::new_v4().to_string();
        let dir = self.server_dir(&id);
        std::fs::create_dir_all(&dir).map_err(|e| {
            ProviderError::Other(format!("provider {}: {}: {e}", self.name, dir.display()))
        })?;
        let mut record = vm::ServerRecord {
            id: id.clone(),
            name: spec.name.clone(),
            metadata: spec.metadata.clone(),
            flavor: flavor.name.clone(),
            vcpus: flavor.vcpus,
            ram: flavor.ram,
            port: 0,
            image: image.id.clone(),
        };
        let disk = self.images().join(&image.id).join(images::DISK);
        match self.create_in(&dir, &mut record, &disk, spec).await {
            Ok(()) => {
                tracing::info!(provider = %self.name, server = %id, name = %spec.name, port = record.port, "qemu VM started");
                Ok(id)
            }
            Err(why) => {
                // Nothing is left of a failed create.
                let _ = self.remove_server(&dir).await;
                Err(ProviderError::Other(format!(
                    "provider {}: server {} ({id}): {why}",
                    self.name, spec.name
                )))
            }
        }
    }

    async fn wait_for_instance(
        &self,
        external_id: &str,
        _spec: &InstanceSpec,
    ) -> Result<Instance, ProviderError> {
        // A VM that failed says why on its serial console.
        poll_until_active(self, external_id, Duration::from_millis(200))
            .await
            .map_err(|e| match e {
                ProviderError::ServerFailed(m) => {
                    let console =
                        vm::console_tail(&self.server_dir(external_id), 2048).unwrap_or_default();
                    ProviderError::ServerFailed(format!("{m}; console: {console}"))
                }
                e => e,
            })
    }

    async fn get_instance(&self, external_id: &str) -> Result<Option<Instance>, ProviderError> {
        if !plain_id(external_id) {
            return Ok(None);
        }
        Ok(self.instance_of(&self.server_dir(external_id)))
    }

    async fn list_instances(&self) -> Result<Vec<Instance>, ProviderError> {
        Ok(vm::server_dirs(&self.servers())
            .iter()
            .filter_map(|d| self.instance_of(d))
            .collect())
    }

    async fn delete_instance(&self, external_id: &str) -> Result<(), ProviderError> {
        if !plain_id(external_id) {
            return Ok(());
        }
        let dir = self.server_dir(external_id);
        self.remove_server(&dir).await?;
        tracing::info!(provider = %self.name, server = %external_id, "qemu VM deleted");
        Ok(())
    }

    async fn console_log(&self, external_id: &str) -> Result<String, ProviderError> {
        let dir = self.server_dir(external_id);
        if !plain_id(external_id) || vm::read_record(&dir).is_none() {
            return Err(ProviderError::NotFound(format!("server {external_id}")));
        }
        match vm::console_tail(&dir, CONSOLE_MAX) {
            Ok(text) => Ok(text),
            // The serial file appears when QEMU starts.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(String::new()),
            Err(e) => Err(ProviderError::Other(format!(
                "provider {}: console of {external_id}: {e}",
                self.name
            ))),
        }
    }

    async fn upload_image(&self, spec: &ImageUploadSpec) -> Result<String, ProviderError> {
        let id = images::upload(&self.name, &self.qemu_img, &self.images(), spec).await?;
        tracing::info!(provider = %self.name, image = %id, name = %spec.name, "image stored");
        Ok(id)
    }

    async fn snapshot_instance(
        &self,
        external_id: &str,
        spec: &SnapshotSpec,
    ) -> Result<String, ProviderError> {
        let dir = self.server_dir(external_id);
        if !plain_id(external_id) || vm::read_record(&dir).is_none() {
            return Err(ProviderError::NotFound(format!(
                "provider {}: server {external_id}",
                self.name
            )));
        }
        let fail = |why: String| {
            ProviderError::Other(format!(
                "provider {}: snapshot {} of server {external_id}: {why}",
                self.name, spec.name
            ))
        };
        // A running guest writes its overlay while `qemu-img` reads it, so
        // a plain copy could mix blocks from before and after a write (a
        // torn filesystem). SIGSTOP freezes every QEMU thread (vCPUs and
        // I/O): the overlay does not change until SIGCONT, so the copy is
        // the disk at one instant, as a power cut would leave it (what the
        // guest had not yet written stays in its page cache: setup scripts
        // end with `sync`). `-U` reads past the write lock QEMU holds. The
        // guard resumes the VM however this ends (error, timeout, a
        // dropped future); a stopped guest's clock jumps, which a server
        // about to be deleted does not mind.
        let paused = match vm::liveness(&dir) {
            vm::Liveness::Running { pid, .. } => {
                Some(vm::Paused::new(pid, STOP_LIMIT).await.map_err(fail)?)
            }
            vm::Liveness::NotStarted | vm::Liveness::Gone => None,
        };
        let made = tokio::time::timeout(
            spec.timeout,
            images::snapshot(&self.qemu_img, &self.images(), &dir.join(vm::OVERLAY), spec),
        )
        .await;
        drop(paused);
        let id = match made {
            Err(_) => {
                return Err(ProviderError::Timeout(format!(
                    "provider {}: snapshot {} of server {external_id}: not done within {} s",
                    self.name,
                    spec.name,
                    spec.timeout.as_secs()
                )));
            }
            Ok(r) => r.map_err(fail)?,
        };
        tracing::info!(provider = %self.name, server = %external_id, image = %id, name = %spec.name, "server snapshot stored");
        Ok(id)
    }

    async fn list_images(&self) -> Result<Vec<CloudImageInfo>, ProviderError> {
        Ok(images::list(&self.images())
            .iter()
            .map(images::ImageRecord::info)
            .collect())
    }

    async fn delete_image(&self, external_id: &str) -> Result<(), ProviderError> {
        if !plain_id(external_id) {
            return Ok(());
        }
        // Running VMs keep their backing file open; new ones cannot use it.
        match std::fs::remove_dir_all(self.images().join(external_id)) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(ProviderError::Other(format!(
                "provider {}: deleting image {external_id}: {e}",
                self.name
            ))),
        }
    }

    fn connection_port(&self, instance: &Instance) -> Option<u16> {
        if !plain_id(&instance.external_id) {
            return None;
        }
        vm::read_record(&self.server_dir(&instance.external_id))
            .map(|r| r.port)
            .filter(|p| *p != 0)
    }
}
