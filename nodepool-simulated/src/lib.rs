//! The built-in simulated cloud (`driver: simulated`): a real [`Provider`]
//! with servers, images, flavors, floating IPs and ports, kept in memory or
//! in a state file that several processes share.
//!
//! It is what tests, benchmarks and the quick start launch into. It is not
//! a mock of the OpenStack APIs: it keeps the same behaviour contract as
//! `nodepool-openstack` and passes the same conformance suite
//! (`nodepool_model::conformance::provider`). Servers carry the
//! metadata the launcher puts in [`InstanceSpec::metadata`] (cut to Nova's
//! 255-byte limit like OpenStack does), so leak detection works the same.
//!
//! Behaviour comes from the provider's [`SimulatedCloud`] knobs:
//!
//! - **Time.** A server is `Building` for `boot-delay` after its create,
//!   then `Active`; a delete takes `delete-delay`. In memory everything is
//!   measured on tokio's clock (`tokio::time`), so tests on a paused clock
//!   are exact; with a state file, on the wall clock (see below). State
//!   changes are computed from the clock when the cloud is next looked at,
//!   not by background tasks, so a cancelled wait or delete never leaves a
//!   server half-way (and neither does a killed process).
//! - **Quota.** A create that would exceed `quota` fails at once with
//!   [`ProviderError::QuotaExceeded`] and Nova's message. Every existing
//!   server counts, including ones in ERROR or being deleted, as in Nova.
//! - **Failures.** Each create, delete and upload rolls a die from its own
//!   splitmix64 stream seeded by `seed`, so the n-th create of a run fails or
//!   not whatever the other operations did. A failed create is accepted and
//!   then goes ERROR with a fault (seen by `wait_for_instance` as
//!   [`ProviderError::ServerFailed`]); a failed delete leaves the server in
//!   ERROR; a failed upload leaves no image.
//! - **Leaks.** `leaked-servers: N` servers exist from the start, tagged for
//!   this provider with node ids (`9000000000` and up) that no store issues.
//! - **API faults.** With an [`ApiFault`] (`api-fault` in the
//!   configuration, or [`set_api_fault`](SimulatedProvider::set_api_fault)
//!   at run time, which with a state file reaches every process) every
//!   API call fails: `hang` gets no answer (each call, and each look a
//!   wait takes, ends with [`ProviderError::Timeout`] after `api-timeout`,
//!   as a client with that timeout would see it), `server-error` answers
//!   500 ([`ProviderError::Transient`]), `rate-limit` answers 429
//!   ([`ProviderError::RateLimited`] with its `Retry-After`). The cloud
//!   itself carries on: accepted deletes complete, booting servers become
//!   ACTIVE. Test hooks are not API calls and work throughout.
//! - **Sharing.** With `state-file: PATH` the cloud (servers with their
//!   times and metadata, images, floating IPs, ports, quota, failure rates,
//!   dice positions) lives in that JSON file, so a launcher, the `nodepool`
//!   CLI and tests in other processes see one cloud, which outlives them
//!   all. Every operation locks `PATH.lock` exclusively, reads the file,
//!   changes it, writes `PATH.tmp` and renames it over `PATH` (a killed
//!   process never leaves half a file), and unlocks. Times in the file are
//!   wall-clock epoch seconds (processes share no tokio clock), and waits
//!   look at the file again every 20 ms (another process's change wakes
//!   nobody). The file is created from the configuration (cloud images,
//!   leaked servers) by the first provider to open it; every provider
//!   that opens it later applies its configuration's quota, failure rates
//!   and any missing cloud images, and keeps everything else. Providers of
//!   different names may share a file (it keeps each by name). Delays,
//!   flavors and availability zones are each process's configuration.
//!
//! Tests reach further with the hooks on [`SimulatedProvider`]
//! (`inject_*`, [`set_failure_rates`](SimulatedProvider::set_failure_rates),
//! [`fail_server`](SimulatedProvider::fail_server), ...).

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions, TryLockError};
use std::io::Read;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use indexmap::IndexMap;
use md5::Md5;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::sync::Notify;
use tokio::sync::futures::OwnedNotified;
use tokio::time::Instant;
use tracing::debug;

use nodepool_model::config::{
    ApiFault, Driver, PoolLabel, ProviderConfig, SimulatedCloud, SimulatedFlavor,
};
use nodepool_model::model::{Limits, Resources, VOLUME_GB, VOLUMES};
use nodepool_model::provider::{
    CloudImageInfo, CloudResource, ImageRef, ImageUploadSpec, Instance, InstanceSpec,
    InstanceStatus, META_GROUPS, META_NODE_ID, META_POOL, META_PROVIDER, Provider, ProviderError,
    ResourceKind,
};

/// First node id of the servers `leaked-servers` creates: far beyond any id
/// a store's sequence reaches, so the store never knows them.
const LEAKED_NODE_ID_BASE: u64 = 9_000_000_000;

/// Hypervisors per availability zone (servers spread over them by host_id).
const HOSTS_PER_AZ: u64 = 4;

/// The fault of a server whose create failed by the dice.
const CREATE_FAULT: &str =
    "simulated create failure: No valid host was found. There are not enough hosts available.";

/// The fault of a server whose delete failed by the dice.
const DELETE_FAULT: &str = "simulated delete failure: error while deleting the server";

/// Picks a flavor the way Nodepool does (reference §3.4,
/// [`nodepool_model::cloud::choose_flavor`]): a simulated flavor's id is
/// its name. `None` when nothing matches.
pub fn resolve_flavor<'f>(
    flavors: &'f [SimulatedFlavor],
    label: &PoolLabel,
) -> Option<&'f SimulatedFlavor> {
    nodepool_model::cloud::choose_flavor(flavors, label)
}

/// Probabilities (0 to 1) that a create, delete or upload fails.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct FailureRates {
    /// A server create: the server goes ERROR instead of ACTIVE.
    pub create: f64,
    /// A server delete: the server goes ERROR instead of away.
    pub delete: f64,
    /// An image upload: no image is left.
    pub upload: f64,
}

impl FailureRates {
    fn clamped(self) -> Self {
        let c = |p: f64| if p.is_nan() { 0.0 } else { p.clamp(0.0, 1.0) };
        FailureRates {
            create: c(self.create),
            delete: c(self.delete),
            upload: c(self.upload),
        }
    }
}

/// splitmix64: tiny, fast and good enough for failure dice; no crate needed.
#[derive(Clone, Debug)]
struct SplitMix64(u64);

impl SplitMix64 {
    /// Stream `stream` of `seed`: streams start far apart, so rolls in one
    /// do not shift the others.
    fn new(seed: u64, stream: u64) -> Self {
        let mut s = SplitMix64(seed ^ stream.wrapping_mul(0xD1B5_4A32_D192_ED03));
        s.next_u64();
        s
    }

    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// True with probability `p`. Always draws, so the n-th roll of a
    /// stream is the same whatever the rates were before it.
    fn roll(&mut self, p: f64) -> bool {
        let u = (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
        u < p
    }

    /// A UUID-shaped id (version 4 layout), as Nova and Glance give.
    fn uuid(&mut self) -> String {
        let hi = u128::from(self.next_u64());
        let lo = u128::from(self.next_u64());
        let bytes = ((hi << 64) | lo).to_be_bytes();
        uuid::Builder::from_random_bytes(bytes)
            .into_uuid()
            .to_string()
    }
}

/// FNV-1a: a stable hash of a name (std's hashers may change between
/// releases, and ids must not).
fn fnv1a(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

use nodepool_model::cloud::{fit_metadata, is_quota_message};

/// How often a file-backed cloud is read again while waiting for a server:
/// another process may fail or delete it, and nothing wakes us then.
const FILE_POLL: Duration = Duration::from_millis(20);

/// How often a hung call looks whether the fault was cleared.
const HANG_POLL: Duration = Duration::from_millis(100);

/// Version of the state file's format.
const FILE_VERSION: u32 = 1;

/// A time on the cloud's clock: how long after the clock's origin.
type Stamp = Duration;

/// Where the cloud's "now" comes from.
#[derive(Clone, Copy, Debug)]
enum Clock {
    /// tokio's clock, counted from when the cloud was made. In memory, so
    /// tests on a paused clock are exact.
    Tokio(Instant),
    /// The wall clock, counted from the Unix epoch. A state file is shared
    /// by processes, and processes share no tokio clock.
    Wall,
}

impl Clock {
    fn now(self) -> Stamp {
        match self {
            Clock::Tokio(origin) => Instant::now().saturating_duration_since(origin),
            // A system clock before 1970 is not worth an error: the cloud's
            // time then stands still at the epoch.
            Clock::Wall => SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default(),
        }
    }

    /// Waits until `until` or `changed` fires. On the wall clock (a state
    /// file) it waits at most [`FILE_POLL`]: changes made by another
    /// process wake nobody, so the caller looks again.
    async fn pause(self, until: Stamp, changed: Option<OwnedNotified>) {
        match self {
            Clock::Tokio(origin) => {
                let sleep = tokio::time::sleep_until(origin + until);
                match changed {
                    Some(changed) => {
                        tokio::select! {
                            _ = sleep => {}
                            _ = changed => {}
                        }
                    }
                    None => sleep.await,
                }
            }
            Clock::Wall => {
                let left = until.saturating_sub(self.now());
                tokio::time::sleep(left.min(FILE_POLL)).await;
            }
        }
    }
}

/// An accepted delete: when it completes and whether it fails.
#[derive(Clone, Copy, Debug)]
struct Deletion {
    at: Stamp,
    fails: bool,
    seq: u64,
}

#[derive(Debug)]
struct Server {
    /// The instance as listed, except `status` (computed from the clock).
    base: Instance,
    /// When it leaves BUILD.
    ready_at: Stamp,
    /// ERROR instead of ACTIVE at `ready_at` (the create die failed).
    boot_fault: Option<String>,
    /// ERROR now (a hook, or a failed delete).
    error: Option<String>,
    deleting: Option<Deletion>,
    /// Wakes `wait_for_instance` when the server changes before `ready_at`
    /// (in memory; a file-backed wait polls instead).
    changed: Arc<Notify>,
}

impl Server {
    fn status(&self, now: Stamp) -> InstanceStatus {
        if self.deleting.is_some() {
            InstanceStatus::Deleting
        } else if let Some(f) = &self.error {
            InstanceStatus::Error(f.clone())
        } else if now < self.ready_at {
            InstanceStatus::Building
        } else if let Some(f) = &self.boot_fault {
            InstanceStatus::Error(f.clone())
        } else {
            InstanceStatus::Active
        }
    }

    fn instance(&self, now: Stamp) -> Instance {
        let mut i = self.base.clone();
        i.status = self.status(now);
        i
    }

    fn resources(&self) -> Option<&Resources> {
        self.base.resources.as_ref()
    }
}

/// Everything mutable: behind the provider's one lock in memory, or read
/// from and written back to the state file around every operation. Never
/// held across an `.await`.
#[derive(Debug)]
struct State {
    servers: IndexMap<String, Server>,
    /// Accepted deletes by completion time, applied by `settle`.
    pending_deletes: BTreeMap<(Stamp, u64), String>,
    /// Quota used by every existing server.
    usage: Resources,
    quota: Limits,
    rates: FailureRates,
    create_dice: SplitMix64,
    delete_dice: SplitMix64,
    upload_dice: SplitMix64,
    ids: SplitMix64,
    images: IndexMap<String, CloudImageInfo>,
    floating_ips: IndexMap<String, CloudResource>,
    ports: IndexMap<String, CloudResource>,
    /// Servers ever created; numbers addresses and spreads hosts.
    created: u64,
    az_cursor: usize,
    seq: u64,
    /// How the API fails now, if it does.
    api_fault: Option<ApiFault>,
}

impl State {
    /// No servers, no images, no quota; dice at zero.
    fn empty() -> Self {
        State {
            servers: IndexMap::new(),
            pending_deletes: BTreeMap::new(),
            usage: Resources::new(),
            quota: Limits::unlimited(),
            rates: FailureRates::default(),
            create_dice: SplitMix64(0),
            delete_dice: SplitMix64(0),
            upload_dice: SplitMix64(0),
            ids: SplitMix64(0),
            images: IndexMap::new(),
            floating_ips: IndexMap::new(),
            ports: IndexMap::new(),
            created: 0,
            az_cursor: 0,
            seq: 0,
            api_fault: None,
        }
    }

    /// Applies every delete whose time has come: the server goes away, or
    /// to ERROR when its delete failed.
    fn settle(&mut self, now: Stamp) {
        while let Some(entry) = self.pending_deletes.first_entry() {
            if entry.key().0 > now {
                break;
            }
            let ((_, seq), id) = entry.remove_entry();
            let Some(s) = self.servers.get_mut(&id) else {
                continue;
            };
            let Some(d) = s.deleting.filter(|d| d.seq == seq) else {
                continue;
            };
            if d.fails {
                s.deleting = None;
                s.error = Some(DELETE_FAULT.to_owned());
                s.changed.notify_waiters();
            } else if let Some(s) = self.servers.shift_remove(&id) {
                if let Some(r) = s.resources() {
                    self.usage.subtract(r);
                }
                s.changed.notify_waiters();
            }
        }
    }

    fn next_seq(&mut self) -> u64 {
        // Wrapping: a state file may hold any number.
        self.seq = self.seq.wrapping_add(1);
        self.seq
    }

    /// Adds the configured cloud images that are missing (by id when the
    /// configuration gives one, else by name): a state file may predate
    /// them.
    fn ensure_cloud_images(&mut self, wanted: &[CloudImageSeed]) {
        for c in wanted {
            let present = match &c.id {
                Some(id) => self.images.contains_key(id),
                None => self.images.values().any(|i| i.name == c.name),
            };
            if !present {
                self.add_cloud_image(c);
            }
        }
    }

    fn add_cloud_image(&mut self, c: &CloudImageSeed) {
        let id = match &c.id {
            Some(id) => id.clone(),
            None => self.ids.uuid(),
        };
        self.images.insert(
            id.clone(),
            CloudImageInfo {
                id,
                name: c.name.clone(),
                status: "active".into(),
                properties: IndexMap::new(),
            },
        );
    }
}

/// What a new server is made of.
struct NewServer {
    name: String,
    metadata: IndexMap<String, String>,
    resources: Resources,
    az: Option<String>,
    ready_at: Stamp,
    boot_fault: Option<String>,
}

/// A `cloud-images` entry: present in the cloud from the start.
#[derive(Clone, Debug)]
struct CloudImageSeed {
    id: Option<String>,
    name: String,
}

/// What a new cloud starts with, from the configuration.
#[derive(Clone, Debug)]
struct Seed {
    quota: Limits,
    rates: FailureRates,
    seed: u64,
    cloud_images: Vec<CloudImageSeed>,
    leaked_servers: u32,
    api_fault: Option<ApiFault>,
}

/// Where the state lives.
// One per provider, behind its `Arc`: boxing the in-memory state would only
// add an indirection to every operation of the hot (benchmark) path.
#[allow(clippy::large_enum_variant)]
enum Backing {
    /// In this process's memory.
    Memory(Mutex<State>),
    /// In a state file shared by processes.
    File(StateFile),
}

/// The files of a file-backed cloud.
struct StateFile {
    /// The state (JSON), replaced by rename so a reader never sees half of
    /// it, even when a writer is killed.
    path: PathBuf,
    /// Locked exclusively around every operation. A separate file because
    /// the rename replaces the state file's inode, and a lock on a replaced
    /// inode excludes nobody.
    lock: PathBuf,
    /// Written, then renamed over `path` (only under the lock, so one name
    /// suffices; a killed writer's leftover is truncated by the next).
    tmp: PathBuf,
    /// Whether this provider applied its configuration (quota, failure
    /// rates, cloud images) to the file yet: done once, by its first
    /// operation.
    opened: AtomicBool,
}

impl StateFile {
    fn new(path: PathBuf) -> Self {
        let beside = |suffix: &str| {
            let mut s = path.as_os_str().to_owned();
            s.push(suffix);
            PathBuf::from(s)
        };
        StateFile {
            lock: beside(".lock"),
            tmp: beside(".tmp"),
            path,
            opened: AtomicBool::new(false),
        }
    }

    fn io_error(&self, what: &str, path: &Path, e: impl std::fmt::Display) -> ProviderError {
        ProviderError::Other(format!(
            "simulated cloud state file {}: {what} {}: {e}",
            self.path.display(),
            path.display()
        ))
    }

    /// Opens the lock file, creating it (and its directory) when missing.
    fn open_lock(&self) -> Result<File, ProviderError> {
        let open = || {
            OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&self.lock)
        };
        match open() {
            Ok(f) => Ok(f),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                if let Some(dir) = self.lock.parent().filter(|d| !d.as_os_str().is_empty()) {
                    std::fs::create_dir_all(dir)
                        .map_err(|e| self.io_error("creating the directory of", &self.lock, e))?;
                }
                open().map_err(|e| self.io_error("opening", &self.lock, e))
            }
            Err(e) => Err(self.io_error("opening", &self.lock, e)),
        }
    }

    /// The exclusive lock, without blocking an async worker while another
    /// process holds it. Released when the returned file is dropped (or
    /// the process dies).
    async fn lock_async(&self) -> Result<File, ProviderError> {
        let file = self.open_lock()?;
        match file.try_lock() {
            Ok(()) => return Ok(file),
            Err(TryLockError::WouldBlock) => {}
            Err(TryLockError::Error(e)) => return Err(self.io_error("locking", &self.lock, e)),
        }
        let locked = tokio::task::spawn_blocking(move || file.lock().map(|()| file))
            .await
            .map_err(|e| self.io_error("waiting for the lock on", &self.lock, e))?;
        locked.map_err(|e| self.io_error("locking", &self.lock, e))
    }

    /// The exclusive lock, blocking the thread (for the synchronous hooks).
    fn lock_blocking(&self) -> Result<File, ProviderError> {
        let file = self.open_lock()?;
        file.lock()
            .map_err(|e| self.io_error("locking", &self.lock, e))?;
        Ok(file)
    }

    /// Reads the file (missing or empty: no cloud yet).
    fn read(&self) -> Result<(Vec<u8>, FileDoc), ProviderError> {
        let bytes = match std::fs::read(&self.path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(self.io_error("reading", &self.path, e)),
        };
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Ok((bytes, FileDoc::default()));
        }
        let doc: FileDoc =
            serde_json::from_slice(&bytes).map_err(|e| self.io_error("parsing", &self.path, e))?;
        if doc.version != FILE_VERSION {
            return Err(self.io_error(
                "reading",
                &self.path,
                format!(
                    "format version {} (this build reads {FILE_VERSION})",
                    doc.version
                ),
            ));
        }
        Ok((bytes, doc))
    }

    /// Replaces the file's contents atomically (temp file + rename). No
    /// fsync: the file must survive killed processes, not power loss.
    fn write(&self, bytes: &[u8]) -> Result<(), ProviderError> {
        std::fs::write(&self.tmp, bytes).map_err(|e| self.io_error("writing", &self.tmp, e))?;
        std::fs::rename(&self.tmp, &self.path)
            .map_err(|e| self.io_error("renaming onto", &self.tmp, e))
    }
}

struct Inner {
    name: String,
    cloud: String,
    region: Option<String>,
    /// Pool name written on injected leaked servers.
    leak_pool: String,
    boot_delay: Duration,
    delete_delay: Duration,
    flavors: Vec<SimulatedFlavor>,
    azs: Vec<String>,
    skip_nodescan: bool,
    /// Each API call's timeout (a hung call ends after it).
    api_timeout: Duration,
    /// Per-provider salt of host ids.
    salt: u64,
    /// What a new cloud is made of.
    seed: Seed,
    clock: Clock,
    backing: Backing,
}

impl Inner {
    /// A new cloud as the configuration describes it: cloud images, then
    /// the leaked servers.
    fn fresh_state(&self, now: Stamp) -> State {
        let seed = self.seed.seed;
        let mut st = State {
            servers: IndexMap::new(),
            pending_deletes: BTreeMap::new(),
            usage: Resources::new(),
            quota: self.seed.quota.clone(),
            rates: self.seed.rates,
            create_dice: SplitMix64::new(seed, 1),
            delete_dice: SplitMix64::new(seed, 2),
            upload_dice: SplitMix64::new(seed, 3),
            // Ids also depend on the provider, so two simulated clouds with
            // one seed never share a server id.
            ids: SplitMix64::new(seed ^ self.salt, 4),
            images: IndexMap::new(),
            floating_ips: IndexMap::new(),
            ports: IndexMap::new(),
            created: 0,
            az_cursor: 0,
            seq: 0,
            api_fault: self.seed.api_fault,
        };
        for c in &self.seed.cloud_images {
            st.add_cloud_image(c);
        }
        for i in 0..u64::from(self.seed.leaked_servers) {
            let server = self.leaked_server(&format!("{:010}", LEAKED_NODE_ID_BASE + i), now);
            self.insert_server(&mut st, server);
        }
        st
    }

    /// An ACTIVE server tagged for this provider (and its first pool) with
    /// `node_id`, as a launcher that died after its create leaves it.
    fn leaked_server(&self, node_id: &str, now: Stamp) -> NewServer {
        let resources = self.flavors.first().map_or_else(
            || Resources::server(0, 0),
            |f| Resources::server(f.vcpus, f.ram),
        );
        let mut metadata = IndexMap::new();
        metadata.insert(
            META_GROUPS.to_owned(),
            format!("{},leaked-image,leaked-label", self.name),
        );
        metadata.insert(META_NODE_ID.to_owned(), node_id.to_owned());
        metadata.insert(META_POOL.to_owned(), self.leak_pool.clone());
        metadata.insert(META_PROVIDER.to_owned(), self.name.clone());
        NewServer {
            name: format!("np{node_id}"),
            metadata,
            resources,
            az: None,
            ready_at: now,
            boot_fault: None,
        }
    }

    /// Adds a server and returns its id. Addresses, host and AZ defaults
    /// are drawn here so every path (launch, leak injection) agrees.
    fn insert_server(&self, st: &mut State, new: NewServer) -> String {
        let id = st.ids.uuid();
        st.created = st.created.wrapping_add(1);
        let n = st.created;
        let az = new.az.or_else(|| {
            if self.azs.is_empty() {
                return None;
            }
            let az = self.azs[st.az_cursor % self.azs.len()].clone();
            st.az_cursor += 1;
            Some(az)
        });
        // 198.18.0.0/15 (RFC 2544, reserved for benchmarks, never routed):
        // the documentation /24s are too small for a 1,000-node burst, and
        // addresses of live servers should not repeat.
        let v4 = (n % 131_070 + 1) as u32;
        let public = Ipv4Addr::from(0xC612_0000 | v4).to_string();
        let private = Ipv4Addr::from(0x0A00_0000 | (n % 0x00FF_FFFF + 1) as u32).to_string();
        let ipv6 =
            Ipv6Addr::new(0x2001, 0x0db8, 0, 0, 0, 0, (n >> 16) as u16, n as u16).to_string();
        let host = n % HOSTS_PER_AZ;
        let mut h = SplitMix64::new(self.salt ^ fnv1a(az.as_deref().unwrap_or("")), 100 + host);
        // Nova's hostId is a SHA-224 hex digest: 56 characters.
        let host_id: String = (0..4)
            .map(|_| format!("{:016x}", h.next_u64()))
            .collect::<String>()[..56]
            .to_owned();
        st.usage.add(&new.resources);
        let base = Instance {
            external_id: id.clone(),
            name: new.name,
            status: InstanceStatus::Building,
            metadata: new.metadata,
            public_ipv4: Some(public.clone()),
            private_ipv4: Some(private),
            public_ipv6: Some(ipv6),
            interface_ip: Some(public),
            az,
            region: self.region.clone(),
            cloud: Some(self.cloud.clone()),
            host_id: Some(host_id),
            resources: Some(new.resources),
        };
        st.servers.insert(
            id.clone(),
            Server {
                base,
                ready_at: new.ready_at,
                boot_fault: new.boot_fault,
                error: None,
                deleting: None,
                changed: Arc::new(Notify::new()),
            },
        );
        id
    }

    /// One operation on a file-backed cloud, the caller holding the file
    /// lock: read, (on this provider's first operation) apply the
    /// configuration, run `f`, write back if anything changed.
    fn run_on_file<R>(
        &self,
        file: &StateFile,
        f: impl FnOnce(&mut State, Stamp) -> R,
    ) -> Result<R, ProviderError> {
        let (before, mut doc) = file.read()?;
        let now = self.clock.now();
        let first = !file.opened.load(Ordering::Acquire);
        let mut st = match doc.providers.get(&self.name) {
            Some(cloud) => {
                let mut st = cloud
                    .to_state()
                    .map_err(|e| file.io_error("reading", &file.path, e))?;
                if first {
                    // The configuration describes the cloud: the latest
                    // one to open the file wins quota and failure rates.
                    st.quota = self.seed.quota.clone();
                    st.rates = self.seed.rates;
                    st.ensure_cloud_images(&self.seed.cloud_images);
                    // Only a configured fault: a process opening the file
                    // must not clear one a drill set at run time.
                    if self.seed.api_fault.is_some() {
                        st.api_fault = self.seed.api_fault;
                    }
                }
                st
            }
            None => self.fresh_state(now),
        };
        let out = f(&mut st, now);
        doc.version = FILE_VERSION;
        doc.providers
            .insert(self.name.clone(), FileCloud::from_state(&st));
        let mut after = serde_json::to_vec_pretty(&doc)
            .map_err(|e| file.io_error("encoding", &file.path, e))?;
        after.push(b'\n');
        if after != before {
            file.write(&after)?;
        }
        file.opened.store(true, Ordering::Release);
        Ok(out)
    }
}

/// The simulated cloud of one provider. Cheap to clone (clones share the
/// cloud); use it as `Arc<dyn Provider>` or keep a clone for the hooks.
///
/// With `state-file` the cloud lives in that file rather than in this
/// value: every provider (in any process) opened on the file shares it.
#[derive(Clone)]
pub struct SimulatedProvider {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for SimulatedProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut d = f.debug_struct("SimulatedProvider");
        d.field("name", &self.inner.name);
        // No file I/O (and no way to fail) in a Debug impl.
        match &self.inner.backing {
            Backing::Memory(m) => {
                let st = m.lock().unwrap_or_else(|e| e.into_inner());
                d.field("servers", &st.servers.len())
            }
            Backing::File(file) => d.field("state_file", &file.path),
        };
        d.finish_non_exhaustive()
    }
}

/// What one look at a booting server found.
enum BootStep {
    /// Boxed: the instance is large and this is the rare outcome.
    Done(Box<Result<Instance, ProviderError>>),
    /// Still building: look again at this time, or when this fires.
    Wait(Stamp, OwnedNotified),
}

impl BootStep {
    fn done(r: Result<Instance, ProviderError>) -> Self {
        BootStep::Done(Box::new(r))
    }
}

impl SimulatedProvider {
    /// The simulated cloud of a `nodepool.yaml` provider, which must have
    /// `driver: simulated` (any other driver is an `InvalidRequest`). With
    /// `state-file`, the file is opened (created when missing) at once, so
    /// an unusable file is an error here.
    pub fn new(provider: &ProviderConfig) -> Result<Self, ProviderError> {
        match &provider.driver {
            Driver::Simulated(knobs) => {
                let p = Self::with_knobs(provider, knobs.clone());
                if let Backing::File(_) = &p.inner.backing {
                    p.with_state_blocking(|_, _| ())?;
                }
                Ok(p)
            }
            other => Err(ProviderError::InvalidRequest(format!(
                "provider {}: driver {} is not the simulated cloud",
                provider.name,
                other.name()
            ))),
        }
    }

    /// The simulated cloud of a provider with explicit knobs (the provider's
    /// own driver is ignored): its name, `cloud`, `region-name`,
    /// `cloud-images` (present from the start) and first pool (written on
    /// leaked servers) are used. With `state_file`, the file is opened by
    /// the first operation.
    pub fn with_knobs(provider: &ProviderConfig, knobs: SimulatedCloud) -> Self {
        let seed = Seed {
            quota: knobs.quota.clone(),
            rates: FailureRates {
                create: knobs.create_failure_rate,
                delete: knobs.delete_failure_rate,
                upload: knobs.upload_failure_rate,
            }
            .clamped(),
            seed: knobs.seed,
            cloud_images: provider
                .cloud_images
                .iter()
                .map(|c| CloudImageSeed {
                    id: c.image_id.clone(),
                    name: c.image_name.clone().unwrap_or_else(|| c.name.clone()),
                })
                .collect(),
            leaked_servers: knobs.leaked_servers,
            api_fault: knobs.api_fault,
        };
        let (clock, file) = match knobs.state_file {
            Some(path) => (Clock::Wall, Some(StateFile::new(path))),
            None => (Clock::Tokio(Instant::now()), None),
        };
        let backing = match file {
            Some(file) => Backing::File(file),
            // Filled below: the fresh state needs the rest of `Inner`.
            None => Backing::Memory(Mutex::new(State::empty())),
        };
        let inner = Inner {
            name: provider.name.clone(),
            cloud: provider
                .cloud
                .clone()
                .unwrap_or_else(|| provider.name.clone()),
            region: provider.region_name.clone(),
            leak_pool: provider
                .pools
                .first()
                .map_or_else(|| "main".to_owned(), |p| p.name.clone()),
            boot_delay: knobs.boot_delay,
            delete_delay: knobs.delete_delay,
            flavors: knobs.flavors,
            azs: knobs.availability_zones,
            skip_nodescan: knobs.skip_nodescan,
            api_timeout: knobs.api_timeout,
            salt: fnv1a(&provider.name),
            seed,
            clock,
            backing,
        };
        if let Backing::Memory(m) = &inner.backing {
            let fresh = inner.fresh_state(clock.now());
            *m.lock().unwrap_or_else(|e| e.into_inner()) = fresh;
        }
        SimulatedProvider {
            inner: Arc::new(inner),
        }
    }

    /// The state file, when the cloud lives in one.
    pub fn state_file(&self) -> Option<&Path> {
        match &self.inner.backing {
            Backing::Memory(_) => None,
            Backing::File(file) => Some(&file.path),
        }
    }

    /// Runs `f` on the state under the cloud's lock (the process's mutex,
    /// or the state file's lock with a read before and a write after).
    async fn with_state<R, F>(&self, f: F) -> Result<R, ProviderError>
    where
        F: FnOnce(&mut State, Stamp) -> R + Send,
    {
        match &self.inner.backing {
            Backing::Memory(m) => {
                let now = self.inner.clock.now();
                // A panic while holding the lock cannot leave the maps
                // inconsistent in a way that matters more than losing the
                // whole cloud would.
                let mut st = m.lock().unwrap_or_else(|e| e.into_inner());
                Ok(f(&mut st, now))
            }
            Backing::File(file) => {
                let _lock = file.lock_async().await?;
                self.inner.run_on_file(file, f)
            }
        }
    }

    /// [`with_state`](Self::with_state) for synchronous callers.
    fn with_state_blocking<R>(
        &self,
        f: impl FnOnce(&mut State, Stamp) -> R,
    ) -> Result<R, ProviderError> {
        match &self.inner.backing {
            Backing::Memory(m) => {
                let now = self.inner.clock.now();
                let mut st = m.lock().unwrap_or_else(|e| e.into_inner());
                Ok(f(&mut st, now))
            }
            Backing::File(file) => {
                let _lock = file.lock_blocking()?;
                self.inner.run_on_file(file, f)
            }
        }
    }

    /// One API call: [`with_state`](Self::with_state) behind the API fault,
    /// if any (see the module documentation). A hung call looks again
    /// every [`HANG_POLL`] and goes through once the fault is cleared,
    /// unless `api-timeout` passed first.
    async fn api<R, F>(&self, what: &str, f: F) -> Result<R, ProviderError>
    where
        F: FnOnce(&mut State, Stamp) -> R + Send,
    {
        /// What one look found.
        enum Gate<R> {
            Done(R),
            Fault(ApiFault),
        }
        let started = Instant::now();
        let mut f = Some(f);
        loop {
            let gate = self
                .with_state(|st, now| match (st.api_fault, f.take()) {
                    (None, Some(f)) => Ok(Gate::Done(f(st, now))),
                    (Some(fault), f_back) => {
                        // Not spent: the next look may go through.
                        f = f_back;
                        Ok(Gate::Fault(fault))
                    }
                    (None, None) => Err(ProviderError::Other(format!(
                        "provider {}: {what}: simulated call made twice",
                        self.inner.name
                    ))),
                })
                .await??;
            let fault = match gate {
                Gate::Done(r) => return Ok(r),
                Gate::Fault(fault) => fault,
            };
            let name = &self.inner.name;
            match fault {
                ApiFault::ServerError => {
                    return Err(ProviderError::Transient(format!(
                        "provider {name}: {what}: HTTP 500 Internal Server Error (simulated API fault)"
                    )));
                }
                ApiFault::RateLimit { retry_after } => {
                    return Err(ProviderError::RateLimited {
                        message: format!(
                            "provider {name}: {what}: HTTP 429 Too Many Requests (simulated API fault{})",
                            retry_after
                                .map(|d| format!(", Retry-After: {}", d.as_secs()))
                                .unwrap_or_default()
                        ),
                        retry_after,
                    });
                }
                ApiFault::Hang => {
                    let limit = self.inner.api_timeout;
                    let left = limit.saturating_sub(started.elapsed());
                    if left.is_zero() {
                        return Err(ProviderError::Timeout(format!(
                            "provider {name}: {what}: no answer within {:.1} s (simulated API hang)",
                            limit.as_secs_f64()
                        )));
                    }
                    tokio::time::sleep(left.min(HANG_POLL)).await;
                }
            }
        }
    }

    /// Makes every API call fail as `fault` says, or work again with
    /// `None`. With a state file, every process's provider of this cloud
    /// sees it at its next call.
    pub fn set_api_fault(&self, fault: Option<ApiFault>) {
        self.hook("set_api_fault", |st, _| st.api_fault = fault);
    }

    /// How the API fails now, if it does.
    pub fn api_fault(&self) -> Option<ApiFault> {
        self.hook("api_fault", |st, _| st.api_fault)
    }

    /// A test hook's operation: a state file that cannot be used fails the
    /// calling test loudly (the hooks have no error to return).
    fn hook<R>(&self, what: &str, f: impl FnOnce(&mut State, Stamp) -> R) -> R {
        match self.with_state_blocking(f) {
            Ok(r) => r,
            Err(e) => panic!("simulated cloud {}: {what}: {e}", self.inner.name),
        }
    }

    fn flavor_for(&self, label: &PoolLabel) -> Result<&SimulatedFlavor, ProviderError> {
        resolve_flavor(&self.inner.flavors, label).ok_or_else(|| {
            let names: Vec<&str> = self.inner.flavors.iter().map(|f| f.name.as_str()).collect();
            ProviderError::InvalidRequest(format!(
                "provider {}: label {}: no flavor matches {} (flavors: {})",
                self.inner.name,
                label.name,
                match (&label.flavor_name, label.min_ram) {
                    (Some(n), Some(r)) => format!("min-ram {r} with a name containing {n:?}"),
                    (None, Some(r)) => format!("min-ram {r}"),
                    (Some(n), None) => format!("flavor-name {n:?}"),
                    (None, None) => "(no flavor-name or min-ram)".to_owned(),
                },
                names.join(", ")
            ))
        })
    }

    fn resources_for(&self, label: &PoolLabel) -> Result<Resources, ProviderError> {
        let f = self.flavor_for(label)?;
        let mut r = Resources::server(f.vcpus, f.ram);
        if label.boot_from_volume {
            r.set(VOLUMES, 1);
            r.set(VOLUME_GB, label.volume_size);
        }
        Ok(r)
    }

    fn image_exists(&self, st: &State, image: &ImageRef) -> Result<(), ProviderError> {
        let active = |i: &&CloudImageInfo| i.status == "active";
        let found = match image {
            ImageRef::Uploaded { external_id } => {
                st.images.get(external_id).filter(active).is_some()
            }
            ImageRef::Cloud { id: Some(id), .. } => st.images.get(id).filter(active).is_some(),
            // Like the OpenStack backend: by name, then a name that is an id.
            ImageRef::Cloud { id: None, name } => {
                st.images
                    .values()
                    .any(|i| &i.name == name && i.status == "active")
                    || st.images.get(name).filter(active).is_some()
            }
        };
        if found {
            Ok(())
        } else {
            Err(ProviderError::InvalidRequest(format!(
                "provider {}: no active image {}",
                self.inner.name,
                match image {
                    ImageRef::Uploaded { external_id } => format!("with id {external_id}"),
                    ImageRef::Cloud { id: Some(id), .. } => format!("with id {id}"),
                    ImageRef::Cloud { id: None, name } => format!("named {name:?}"),
                }
            )))
        }
    }

    // ----- test hooks -----
    //
    // With a state file they read and write the file like any operation,
    // so another process sees what they do. They panic when the file
    // cannot be used.

    /// Adds an ACTIVE server tagged for this provider (and its first pool)
    /// with `node_id`, as a launcher that died after its create would leave
    /// it. Returns its cloud id. It uses quota like any server.
    pub fn inject_leaked_server(&self, node_id: &str) -> String {
        self.hook("inject_leaked_server", |st, now| {
            let server = self.inner.leaked_server(node_id, now);
            self.inner.insert_server(st, server)
        })
    }

    /// Adds a floating IP (attached to a port or not) and returns its id;
    /// for `clean-floating-ips` tests.
    pub fn inject_floating_ip(&self, attached: bool) -> String {
        self.hook("inject_floating_ip", |st, _| {
            let id = st.ids.uuid();
            st.floating_ips.insert(
                id.clone(),
                CloudResource {
                    kind: ResourceKind::FloatingIp,
                    id: id.clone(),
                    status: if attached { "ACTIVE" } else { "DOWN" }.into(),
                    attached,
                    device_owner: None,
                },
            );
            id
        })
    }

    /// Adds a DOWN port with this device owner (`""`, `compute:nova`, ...)
    /// and returns its id; for `port-cleanup-interval` tests.
    pub fn inject_down_port(&self, device_owner: &str) -> String {
        self.hook("inject_down_port", |st, _| {
            let id = st.ids.uuid();
            st.ports.insert(
                id.clone(),
                CloudResource {
                    kind: ResourceKind::Port,
                    id: id.clone(),
                    status: "DOWN".into(),
                    attached: false,
                    device_owner: Some(device_owner.to_owned()),
                },
            );
            id
        })
    }

    /// Replaces the failure rates (each clamped to 0..=1). The dice streams
    /// carry on where they were. With a state file, a provider that opens
    /// the file later applies its configuration's rates again.
    pub fn set_failure_rates(&self, rates: FailureRates) {
        self.hook("set_failure_rates", |st, _| st.rates = rates.clamped());
    }

    /// The current failure rates.
    pub fn failure_rates(&self) -> FailureRates {
        self.hook("failure_rates", |st, _| st.rates)
    }

    /// Replaces the cloud quota (missing names unlimited). Existing servers
    /// stay, even over the new quota, as in Nova. With a state file, a
    /// provider that opens the file later applies its configuration's
    /// quota again.
    pub fn set_quota(&self, quota: Limits) {
        self.hook("set_quota", |st, _| st.quota = quota);
    }

    /// Quota used by every existing server (building, active, in error or
    /// being deleted).
    pub fn usage(&self) -> Resources {
        self.hook("usage", |st, now| {
            st.settle(now);
            st.usage.clone()
        })
    }

    /// Every server that exists now (any status), read past any API
    /// fault: what the cloud really holds, for tests and drills that
    /// count servers while the API is made to fail.
    /// Async, as API calls are: with a state file, the lock is taken on
    /// a blocking thread, never on the caller's runtime worker (whose
    /// peers may be needed by whoever holds the lock).
    pub async fn instances(&self) -> Vec<Instance> {
        match self
            .with_state(|st, now| {
                st.settle(now);
                st.servers.values().map(|s| s.instance(now)).collect()
            })
            .await
        {
            Ok(all) => all,
            Err(e) => panic!("simulated cloud {}: instances: {e}", self.inner.name),
        }
    }

    /// Servers that exist now (any status).
    pub fn server_count(&self) -> usize {
        self.hook("server_count", |st, now| {
            st.settle(now);
            st.servers.len()
        })
    }

    /// The server tagged with `node_id` (the first, if several are).
    pub fn server_for_node(&self, node_id: &str) -> Option<Instance> {
        self.hook("server_for_node", |st, now| {
            st.settle(now);
            st.servers
                .values()
                .find(|s| s.base.node_id().as_deref() == Some(node_id))
                .map(|s| s.instance(now))
        })
    }

    /// Makes a server go ERROR now with `fault` (a fault that reads like a
    /// quota error makes `wait_for_instance` return `QuotaExceeded`, as
    /// from Nova). False when there is no such server or it is being
    /// deleted.
    pub fn fail_server(&self, external_id: &str, fault: &str) -> bool {
        self.hook("fail_server", |st, now| {
            st.settle(now);
            match st.servers.get_mut(external_id) {
                Some(s) if s.deleting.is_none() => {
                    s.error = Some(fault.to_owned());
                    s.changed.notify_waiters();
                    true
                }
                _ => false,
            }
        })
    }
}

#[async_trait]
impl Provider for SimulatedProvider {
    fn name(&self) -> &str {
        &self.inner.name
    }

    async fn quota_limits(&self) -> Result<Limits, ProviderError> {
        self.api("quota limits", |st, _| st.quota.clone()).await
    }

    async fn label_resources(&self, label: &PoolLabel) -> Result<Resources, ProviderError> {
        // The flavor list is an API call in a real cloud.
        self.api("flavor list", |_, _| ()).await?;
        self.resources_for(label)
    }

    async fn create_instance(&self, spec: &InstanceSpec) -> Result<String, ProviderError> {
        let resources = self.resources_for(&spec.label)?;
        if let Some(az) = &spec.availability_zone
            && !self.inner.azs.is_empty()
            && !self.inner.azs.contains(az)
        {
            return Err(ProviderError::InvalidRequest(format!(
                "provider {}: the requested availability zone {az:?} is not available (zones: {})",
                self.inner.name,
                self.inner.azs.join(", ")
            )));
        }
        let metadata = fit_metadata(&spec.name, &spec.metadata);
        let (id, fails) = self
            .api("server create", |st, now| {
                st.settle(now);
                self.image_exists(st, &spec.image)?;
                if let Some(name) = st.quota.first_exceeded(&st.usage, &resources) {
                    // Nova's 403 text, which the OpenStack backend maps to
                    // QuotaExceeded.
                    return Err(ProviderError::QuotaExceeded(format!(
                        "provider {}: Quota exceeded for {name}: Requested {}, but already used {} of {} {name}",
                        self.inner.name,
                        resources.get(name),
                        st.usage.get(name),
                        st.quota.get(name).unwrap_or_default(),
                    )));
                }
                let rate = st.rates.create;
                let fails = st.create_dice.roll(rate);
                let id = self.inner.insert_server(
                    st,
                    NewServer {
                        name: spec.name.clone(),
                        metadata,
                        resources,
                        az: spec.availability_zone.clone(),
                        ready_at: now + self.inner.boot_delay,
                        boot_fault: fails.then(|| CREATE_FAULT.to_owned()),
                    },
                );
                Ok((id, fails))
            })
            .await??;
        debug!(provider = %self.inner.name, server = %spec.name, id = %id, fails, "server create accepted");
        Ok(id)
    }

    async fn wait_for_instance(
        &self,
        external_id: &str,
        _spec: &InstanceSpec,
    ) -> Result<Instance, ProviderError> {
        loop {
            let step = self
                .api("server status", |st, now| {
                    st.settle(now);
                    let Some(s) = st.servers.get(external_id) else {
                        return BootStep::done(Err(ProviderError::ServerFailed(format!(
                            "provider {}: server {external_id} disappeared while booting",
                            self.inner.name
                        ))));
                    };
                    match s.status(now) {
                        InstanceStatus::Active => BootStep::done(Ok(s.instance(now))),
                        InstanceStatus::Error(fault) => {
                            let msg = format!(
                                "provider {}: server {external_id} went ERROR: {fault}",
                                self.inner.name
                            );
                            BootStep::done(Err(if is_quota_message(&fault) {
                                ProviderError::QuotaExceeded(msg)
                            } else {
                                ProviderError::ServerFailed(msg)
                            }))
                        }
                        InstanceStatus::Deleting => {
                            BootStep::done(Err(ProviderError::ServerFailed(format!(
                                "provider {}: server {external_id} was deleted while booting",
                                self.inner.name
                            ))))
                        }
                        InstanceStatus::Building | InstanceStatus::Other(_) => {
                            // Registered before the lock is released, so a
                            // change made right after is not missed.
                            BootStep::Wait(s.ready_at, s.changed.clone().notified_owned())
                        }
                    }
                })
                .await?;
            match step {
                BootStep::Done(r) => return *r,
                BootStep::Wait(ready_at, changed) => {
                    self.inner.clock.pause(ready_at, Some(changed)).await;
                }
            }
        }
    }

    async fn get_instance(&self, external_id: &str) -> Result<Option<Instance>, ProviderError> {
        self.api("server lookup", |st, now| {
            st.settle(now);
            st.servers.get(external_id).map(|s| s.instance(now))
        })
        .await
    }

    async fn list_instances(&self) -> Result<Vec<Instance>, ProviderError> {
        self.api("server list", |st, now| {
            st.settle(now);
            st.servers.values().map(|s| s.instance(now)).collect()
        })
        .await
    }

    async fn delete_instance(&self, external_id: &str) -> Result<(), ProviderError> {
        let accepted = self
            .api("server delete", |st, now| {
                st.settle(now);
                let existing = st.servers.get(external_id).map(|s| s.deleting)?;
                Some(match existing {
                    // Already being deleted: this call ends with that delete.
                    Some(d) => d,
                    None => {
                        let rate = st.rates.delete;
                        let fails = st.delete_dice.roll(rate);
                        let d = Deletion {
                            at: now + self.inner.delete_delay,
                            fails,
                            seq: st.next_seq(),
                        };
                        if let Some(s) = st.servers.get_mut(external_id) {
                            s.deleting = Some(d);
                            s.error = None;
                            s.changed.notify_waiters();
                        }
                        st.pending_deletes
                            .insert((d.at, d.seq), external_id.to_owned());
                        st.settle(now);
                        debug!(provider = %self.inner.name, id = external_id, fails, "server delete accepted");
                        d
                    }
                })
            })
            .await?;
        let Some(deletion) = accepted else {
            return Ok(());
        };
        // Nothing can change an accepted delete, so this only waits for its
        // time (a killed process's delete is completed by whoever looks).
        while deletion.at > self.inner.clock.now() {
            self.inner.clock.pause(deletion.at, None).await;
        }
        self.api("server delete", |st, now| st.settle(now)).await?;
        if deletion.fails {
            Err(ProviderError::ServerFailed(format!(
                "provider {}: server {external_id} went ERROR while being deleted: {DELETE_FAULT}",
                self.inner.name
            )))
        } else {
            Ok(())
        }
    }

    async fn console_log(&self, external_id: &str) -> Result<String, ProviderError> {
        self.api("console log", |st, now| {
            st.settle(now);
            match st.servers.get(external_id) {
                Some(s) => Ok(format!(
                    "[    0.000000] Linux version 6.1.0-simulated\n\
                     [    0.412000] simulated cloud {}: server {} ({})\n\
                     {} login:\n",
                    self.inner.name, s.base.name, external_id, s.base.name
                )),
                None => Err(ProviderError::NotFound(format!(
                    "provider {}: server {external_id}",
                    self.inner.name
                ))),
            }
        })
        .await?
    }

    async fn upload_image(&self, spec: &ImageUploadSpec) -> Result<String, ProviderError> {
        // Rolled first so the n-th upload's fate does not depend on how
        // the file reads.
        let fails = self
            .api("image upload", |st, _| {
                let rate = st.rates.upload;
                st.upload_dice.roll(rate)
            })
            .await?;
        let cancel = CancelOnDrop(Arc::new(AtomicBool::new(false)));
        let (path, stop) = (spec.path.clone(), cancel.0.clone());
        let (want_md5, want_sha256) = (spec.md5.is_some(), spec.sha256.is_some());
        // Hashing gigabytes is blocking work: keep it off the async workers.
        let job =
            tokio::task::spawn_blocking(move || digest_file(&path, want_md5, want_sha256, &stop));
        let digests = match tokio::time::timeout(spec.timeout, job).await {
            Err(_) => {
                return Err(ProviderError::Timeout(format!(
                    "provider {}: image {}: not active within image-upload-timeout {} s",
                    self.inner.name,
                    spec.name,
                    spec.timeout.as_secs()
                )));
            }
            Ok(Err(e)) => {
                return Err(ProviderError::Other(format!(
                    "provider {}: image {}: upload task failed: {e}",
                    self.inner.name, spec.name
                )));
            }
            Ok(Ok(Err(e))) => {
                return Err(ProviderError::Other(format!(
                    "provider {}: cannot read {}: {e}",
                    self.inner.name,
                    spec.path.display()
                )));
            }
            Ok(Ok(Ok(d))) => d,
        };
        for (what, want, got) in [
            ("md5", &spec.md5, &digests.md5),
            ("sha256", &spec.sha256, &digests.sha256),
        ] {
            if let (Some(want), Some(got)) = (want, got)
                && !want.eq_ignore_ascii_case(got)
            {
                return Err(ProviderError::Other(format!(
                    "provider {}: image {} ({}): {what} checksum mismatch: expected {want}, got {got}",
                    self.inner.name,
                    spec.name,
                    spec.path.display()
                )));
            }
        }
        if fails {
            return Err(ProviderError::Other(format!(
                "provider {}: image {}: simulated upload failure: the image went killed during the upload",
                self.inner.name, spec.name
            )));
        }
        let mut properties = spec.properties.clone();
        // What openstacksdk records (and the OpenStack backend mirrors).
        if let Some(md5) = &spec.md5 {
            properties.insert("owner_specified.openstack.md5".into(), md5.clone());
        }
        if let Some(sha) = &spec.sha256 {
            properties.insert("owner_specified.openstack.sha256".into(), sha.clone());
        }
        let id = self
            .api("image upload", |st, _| {
                let id = st.ids.uuid();
                st.images.insert(
                    id.clone(),
                    CloudImageInfo {
                        id: id.clone(),
                        name: spec.name.clone(),
                        status: "active".into(),
                        properties,
                    },
                );
                id
            })
            .await?;
        debug!(provider = %self.inner.name, image = %spec.name, id = %id, bytes = digests.len, "image active");
        Ok(id)
    }

    async fn list_images(&self) -> Result<Vec<CloudImageInfo>, ProviderError> {
        self.api("image list", |st, _| st.images.values().cloned().collect())
            .await
    }

    async fn delete_image(&self, external_id: &str) -> Result<(), ProviderError> {
        self.api("image delete", |st, _| {
            st.images.shift_remove(external_id);
        })
        .await
    }

    async fn list_resources(
        &self,
        kind: ResourceKind,
    ) -> Result<Vec<CloudResource>, ProviderError> {
        self.api("resource list", |st, _| {
            let map = match kind {
                ResourceKind::FloatingIp => &st.floating_ips,
                ResourceKind::Port => &st.ports,
            };
            map.values().cloned().collect()
        })
        .await
    }

    async fn delete_resource(&self, kind: ResourceKind, id: &str) -> Result<(), ProviderError> {
        self.api("resource delete", |st, _| {
            match kind {
                ResourceKind::FloatingIp => st.floating_ips.shift_remove(id),
                ResourceKind::Port => st.ports.shift_remove(id),
            };
        })
        .await
    }

    fn skip_nodescan(&self) -> bool {
        self.inner.skip_nodescan
    }

    fn api_timeout(&self) -> Duration {
        self.inner.api_timeout
    }
}

// ----- the state file's format -----

/// The state file: every simulated cloud kept in it, by provider name
/// (providers may share a file). Times are wall-clock epoch seconds with
/// millisecond precision, as Nodepool writes `state_time`.
#[derive(Debug, Default, Serialize, Deserialize)]
struct FileDoc {
    version: u32,
    providers: IndexMap<String, FileCloud>,
}

#[derive(Debug, Serialize, Deserialize)]
struct FileCloud {
    /// Cloud quota (missing names unlimited).
    quota: BTreeMap<String, i64>,
    failure_rates: FileRates,
    /// Positions of the dice streams.
    dice: FileDice,
    created: u64,
    az_cursor: usize,
    seq: u64,
    servers: Vec<FileServer>,
    images: Vec<FileImage>,
    floating_ips: Vec<FileResource>,
    ports: Vec<FileResource>,
    /// The API fault; absent in files written before faults existed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    api_fault: Option<FileFault>,
}

/// An [`ApiFault`] in the state file.
#[derive(Debug, Serialize, Deserialize)]
struct FileFault {
    /// `hang`, `server-error` or `rate-limit`.
    mode: String,
    /// Seconds of `Retry-After`, for `rate-limit`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    retry_after: Option<f64>,
}

impl FileFault {
    fn from_fault(f: ApiFault) -> Self {
        FileFault {
            mode: f.mode().to_owned(),
            retry_after: match f {
                ApiFault::RateLimit { retry_after } => retry_after.map(|d| d.as_secs_f64()),
                _ => None,
            },
        }
    }

    fn to_fault(&self) -> Result<ApiFault, String> {
        Ok(match self.mode.as_str() {
            "hang" => ApiFault::Hang,
            "server-error" => ApiFault::ServerError,
            "rate-limit" => ApiFault::RateLimit {
                retry_after: match self.retry_after {
                    Some(s) if s.is_finite() && s >= 0.0 => Some(Duration::from_secs_f64(s)),
                    Some(s) => return Err(format!("api fault retry_after {s} is not a duration")),
                    None => None,
                },
            },
            other => return Err(format!("unknown api fault mode {other:?}")),
        })
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct FileRates {
    create: f64,
    delete: f64,
    upload: f64,
}

#[derive(Debug, Serialize, Deserialize)]
struct FileDice {
    create: u64,
    delete: u64,
    upload: u64,
    ids: u64,
}

#[derive(Debug, Serialize, Deserialize)]
struct FileServer {
    id: String,
    name: String,
    metadata: IndexMap<String, String>,
    public_ipv4: Option<String>,
    private_ipv4: Option<String>,
    public_ipv6: Option<String>,
    interface_ip: Option<String>,
    az: Option<String>,
    region: Option<String>,
    cloud: Option<String>,
    host_id: Option<String>,
    resources: Option<Resources>,
    /// When it leaves BUILD (epoch seconds).
    ready_at: f64,
    boot_fault: Option<String>,
    error: Option<String>,
    deleting: Option<FileDeletion>,
}

#[derive(Debug, Serialize, Deserialize)]
struct FileDeletion {
    /// When the delete completes (epoch seconds).
    at: f64,
    fails: bool,
    seq: u64,
}

#[derive(Debug, Serialize, Deserialize)]
struct FileImage {
    id: String,
    name: String,
    status: String,
    properties: IndexMap<String, String>,
}

#[derive(Debug, Serialize, Deserialize)]
struct FileResource {
    id: String,
    status: String,
    attached: bool,
    device_owner: Option<String>,
}

/// Largest resource amount a server in a state file may have (a petabyte
/// of RAM in MiB is 2^30): the sum over millions of servers stays below
/// `i64::MAX`.
const MAX_AMOUNT: i64 = 1 << 40;

/// Epoch seconds, cut to whole milliseconds so that a time read back
/// writes out identically (an unchanged cloud is not rewritten).
fn epoch_secs(t: Stamp) -> f64 {
    t.as_millis() as f64 / 1000.0
}

fn from_epoch_secs(secs: f64) -> Stamp {
    if secs.is_finite() && secs > 0.0 {
        Duration::from_millis((secs * 1000.0).round() as u64)
    } else {
        Duration::ZERO
    }
}

impl FileCloud {
    fn from_state(st: &State) -> Self {
        let resource = |r: &CloudResource| FileResource {
            id: r.id.clone(),
            status: r.status.clone(),
            attached: r.attached,
            device_owner: r.device_owner.clone(),
        };
        FileCloud {
            quota: st.quota.iter().map(|(k, v)| (k.to_owned(), v)).collect(),
            failure_rates: FileRates {
                create: st.rates.create,
                delete: st.rates.delete,
                upload: st.rates.upload,
            },
            dice: FileDice {
                create: st.create_dice.0,
                delete: st.delete_dice.0,
                upload: st.upload_dice.0,
                ids: st.ids.0,
            },
            created: st.created,
            az_cursor: st.az_cursor,
            seq: st.seq,
            servers: st
                .servers
                .values()
                .map(|s| {
                    let b = &s.base;
                    FileServer {
                        id: b.external_id.clone(),
                        name: b.name.clone(),
                        metadata: b.metadata.clone(),
                        public_ipv4: b.public_ipv4.clone(),
                        private_ipv4: b.private_ipv4.clone(),
                        public_ipv6: b.public_ipv6.clone(),
                        interface_ip: b.interface_ip.clone(),
                        az: b.az.clone(),
                        region: b.region.clone(),
                        cloud: b.cloud.clone(),
                        host_id: b.host_id.clone(),
                        resources: b.resources.clone(),
                        ready_at: epoch_secs(s.ready_at),
                        boot_fault: s.boot_fault.clone(),
                        error: s.error.clone(),
                        deleting: s.deleting.map(|d| FileDeletion {
                            at: epoch_secs(d.at),
                            fails: d.fails,
                            seq: d.seq,
                        }),
                    }
                })
                .collect(),
            images: st
                .images
                .values()
                .map(|i| FileImage {
                    id: i.id.clone(),
                    name: i.name.clone(),
                    status: i.status.clone(),
                    properties: i.properties.clone(),
                })
                .collect(),
            floating_ips: st.floating_ips.values().map(resource).collect(),
            ports: st.ports.values().map(resource).collect(),
            api_fault: st.api_fault.map(FileFault::from_fault),
        }
    }

    /// The state, with what the file does not keep (usage, the delete
    /// queue) derived from the servers. A file that no cloud could have
    /// written (a server id twice, amounts no server has) is an error, so
    /// the arithmetic on it cannot overflow.
    fn to_state(&self) -> Result<State, String> {
        let mut quota = Limits::unlimited();
        for (k, v) in &self.quota {
            quota.set(k, *v);
        }
        let mut st = State {
            servers: IndexMap::with_capacity(self.servers.len()),
            pending_deletes: BTreeMap::new(),
            usage: Resources::new(),
            quota,
            rates: FailureRates {
                create: self.failure_rates.create,
                delete: self.failure_rates.delete,
                upload: self.failure_rates.upload,
            }
            .clamped(),
            create_dice: SplitMix64(self.dice.create),
            delete_dice: SplitMix64(self.dice.delete),
            upload_dice: SplitMix64(self.dice.upload),
            ids: SplitMix64(self.dice.ids),
            images: self
                .images
                .iter()
                .map(|i| {
                    (
                        i.id.clone(),
                        CloudImageInfo {
                            id: i.id.clone(),
                            name: i.name.clone(),
                            status: i.status.clone(),
                            properties: i.properties.clone(),
                        },
                    )
                })
                .collect(),
            floating_ips: IndexMap::new(),
            ports: IndexMap::new(),
            created: self.created,
            az_cursor: self.az_cursor,
            seq: self.seq,
            api_fault: self
                .api_fault
                .as_ref()
                .map(FileFault::to_fault)
                .transpose()?,
        };
        for (list, kind) in [
            (&self.floating_ips, ResourceKind::FloatingIp),
            (&self.ports, ResourceKind::Port),
        ] {
            for r in list {
                let res = CloudResource {
                    kind,
                    id: r.id.clone(),
                    status: r.status.clone(),
                    attached: r.attached,
                    device_owner: r.device_owner.clone(),
                };
                match kind {
                    ResourceKind::FloatingIp => st.floating_ips.insert(r.id.clone(), res),
                    ResourceKind::Port => st.ports.insert(r.id.clone(), res),
                };
            }
        }
        for s in &self.servers {
            if st.servers.contains_key(&s.id) {
                return Err(format!("server {} is listed twice", s.id));
            }
            if let Some(r) = &s.resources {
                if let Some((name, v)) = r.iter().find(|(_, v)| !(0..=MAX_AMOUNT).contains(v)) {
                    return Err(format!("server {}: {name} {v} is out of range", s.id));
                }
                st.usage.add(r);
            }
            let deleting = s.deleting.as_ref().map(|d| Deletion {
                at: from_epoch_secs(d.at),
                fails: d.fails,
                seq: d.seq,
            });
            if let Some(d) = deleting {
                st.pending_deletes.insert((d.at, d.seq), s.id.clone());
            }
            st.servers.insert(
                s.id.clone(),
                Server {
                    base: Instance {
                        external_id: s.id.clone(),
                        name: s.name.clone(),
                        status: InstanceStatus::Building,
                        metadata: s.metadata.clone(),
                        public_ipv4: s.public_ipv4.clone(),
                        private_ipv4: s.private_ipv4.clone(),
                        public_ipv6: s.public_ipv6.clone(),
                        interface_ip: s.interface_ip.clone(),
                        az: s.az.clone(),
                        region: s.region.clone(),
                        cloud: s.cloud.clone(),
                        host_id: s.host_id.clone(),
                        resources: s.resources.clone(),
                    },
                    ready_at: from_epoch_secs(s.ready_at),
                    boot_fault: s.boot_fault.clone(),
                    error: s.error.clone(),
                    deleting,
                    changed: Arc::new(Notify::new()),
                },
            );
        }
        Ok(st)
    }
}

/// Stops the blocking file read when the upload is dropped or times out.
struct CancelOnDrop(Arc<AtomicBool>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// What reading an upload's file found.
struct Digests {
    len: u64,
    md5: Option<String>,
    sha256: Option<String>,
}

/// Reads a file in 1 MiB chunks (constant memory), hashing only what was
/// asked for.
fn digest_file(
    path: &Path,
    md5: bool,
    sha256: bool,
    stop: &AtomicBool,
) -> std::io::Result<Digests> {
    let mut file = std::fs::File::open(path)?;
    let mut buf = vec![0u8; 1 << 20];
    let mut m = md5.then(Md5::new);
    let mut s = sha256.then(Sha256::new);
    let mut len = 0u64;
    loop {
        if stop.load(Ordering::Relaxed) {
            return Err(std::io::Error::other("upload cancelled"));
        }
        let n = match file.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        let chunk = &buf[..n];
        if let Some(m) = &mut m {
            m.update(chunk);
        }
        if let Some(s) = &mut s {
            s.update(chunk);
        }
        len += n as u64;
    }
    Ok(Digests {
        len,
        md5: m.map(|m| hex::encode(m.finalize())),
        sha256: s.map(|s| hex::encode(s.finalize())),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn md5(data: &[u8]) -> String {
        hex::encode(Md5::digest(data))
    }

    fn sha256(data: &[u8]) -> String {
        hex::encode(Sha256::digest(data))
    }

    #[test]
    fn md5_vectors() {
        assert_eq!(md5(b""), "d41d8cd98f00b204e9800998ecf8427e");
        assert_eq!(md5(b"abc"), "900150983cd24fb0d6963f7d28e17f72");
        assert_eq!(
            md5(
                b"12345678901234567890123456789012345678901234567890123456789012345678901234567890"
            ),
            "57edf4a22be3c955ac49da2e2107b67a"
        );
        assert_eq!(
            md5(b"The quick brown fox jumps over the lazy dog"),
            "9e107d9d372bb6826bd81d3542a419d6"
        );
    }

    #[test]
    fn sha256_vectors() {
        assert_eq!(
            sha256(b""),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        assert_eq!(
            sha256(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(
            sha256(b"abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq"),
            "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1"
        );
        let million_a = vec![b'a'; 1_000_000];
        assert_eq!(
            sha256(&million_a),
            "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0"
        );
        assert_eq!(md5(&million_a), "7707d6ae4e027c70eea2a935c2296f21");
    }

    #[test]
    fn digest_file_reads_every_chunk() {
        // More than one 1 MiB read, ending in a partial one.
        let data: Vec<u8> = (0..(5u32 << 19) + 13)
            .map(|i| (i * 7 % 251) as u8)
            .collect();
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("image");
        std::fs::write(&path, &data).expect("write");
        let d = digest_file(&path, true, true, &AtomicBool::new(false)).expect("digest");
        assert_eq!(d.len, data.len() as u64);
        assert_eq!(d.md5.as_deref(), Some(md5(&data).as_str()));
        assert_eq!(d.sha256.as_deref(), Some(sha256(&data).as_str()));
        let only = digest_file(&path, false, true, &AtomicBool::new(false)).expect("digest");
        assert_eq!(only.md5, None);
        assert!(digest_file(&path, true, false, &AtomicBool::new(true)).is_err());
    }

    #[test]
    fn dice_are_reproducible_and_fair() {
        let mut a = SplitMix64::new(7, 1);
        let mut b = SplitMix64::new(7, 1);
        let rolls_a: Vec<bool> = (0..100).map(|_| a.roll(0.3)).collect();
        let rolls_b: Vec<bool> = (0..100).map(|_| b.roll(0.3)).collect();
        assert_eq!(rolls_a, rolls_b);
        let mut c = SplitMix64::new(7, 2);
        let hits = (0..10_000).filter(|_| c.roll(0.3)).count();
        assert!((2_700..3_300).contains(&hits), "{hits}");
        assert!((0..1000).all(|_| !c.roll(0.0)));
        assert!((0..1000).all(|_| c.roll(1.0)));
    }
}
