//! Nova's rules: what a server is and how its status moves (BUILD, then
//! ACTIVE or ERROR; a delete that completes after `delete-delay` or leaves
//! it in ERROR), quota counted over every existing server, flavor choice,
//! image lookup, addresses and host ids, and the servers `leaked-servers`
//! leaves. Everything here is pure: it works on a [`State`] at a [`Stamp`]
//! the caller read from the cloud's clock, and never waits.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::sync::Arc;
use std::time::Duration;

use indexmap::IndexMap;
use tokio::sync::Notify;

use nodepool_model::config::{ApiFault, PoolLabel, SimulatedFlavor};
use nodepool_model::model::{Limits, Resources, VOLUME_GB, VOLUMES};
use nodepool_model::provider::{
    CloudImageInfo, CloudResource, ImageRef, Instance, InstanceStatus, META_GROUPS, META_NODE_ID,
    META_POOL, META_PROVIDER, ProviderError, ResourceKind,
};

use crate::dice::{DELETE_FAULT, FailureRates, SplitMix64};
use crate::knobs::{CloudImageSeed, Seed};
use crate::storage::Stamp;

/// First node id of the servers `leaked-servers` creates: far beyond any id
/// a store's sequence reaches, so the store never knows them.
const LEAKED_NODE_ID_BASE: u64 = 9_000_000_000;

/// Hypervisors per availability zone (servers spread over them by host_id).
const HOSTS_PER_AZ: u64 = 4;

/// Picks a flavor the way Nodepool does (reference §3.4,
/// [`nodepool_model::cloud::choose_flavor`]): a simulated flavor's id is
/// its name. `None` when nothing matches.
pub fn resolve_flavor<'f>(
    flavors: &'f [SimulatedFlavor],
    label: &PoolLabel,
) -> Option<&'f SimulatedFlavor> {
    nodepool_model::cloud::choose_flavor(flavors, label)
}

/// FNV-1a: a stable hash of a name (std's hashers may change between
/// releases, and ids must not).
pub(crate) fn fnv1a(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// An accepted delete: when it completes and whether it fails.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Deletion {
    pub(crate) at: Stamp,
    pub(crate) fails: bool,
    pub(crate) seq: u64,
}

#[derive(Debug)]
pub(crate) struct Server {
    /// The instance as listed, except `status` (computed from the clock).
    pub(crate) base: Instance,
    /// When it leaves BUILD.
    pub(crate) ready_at: Stamp,
    /// ERROR instead of ACTIVE at `ready_at` (the create die failed).
    pub(crate) boot_fault: Option<String>,
    /// ERROR now (a hook, or a failed delete).
    pub(crate) error: Option<String>,
    pub(crate) deleting: Option<Deletion>,
    /// Wakes `wait_for_instance` when the server changes before `ready_at`
    /// (in memory; a file-backed wait polls instead).
    pub(crate) changed: Arc<Notify>,
}

impl Server {
    pub(crate) fn status(&self, now: Stamp) -> InstanceStatus {
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

    pub(crate) fn instance(&self, now: Stamp) -> Instance {
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
pub(crate) struct State {
    pub(crate) servers: IndexMap<String, Server>,
    /// Accepted deletes by completion time, applied by `settle`.
    pub(crate) pending_deletes: BTreeMap<(Stamp, u64), String>,
    /// Quota used by every existing server.
    pub(crate) usage: Resources,
    pub(crate) quota: Limits,
    pub(crate) rates: FailureRates,
    pub(crate) create_dice: SplitMix64,
    pub(crate) delete_dice: SplitMix64,
    pub(crate) upload_dice: SplitMix64,
    pub(crate) ids: SplitMix64,
    pub(crate) images: IndexMap<String, CloudImageInfo>,
    pub(crate) floating_ips: IndexMap<String, CloudResource>,
    pub(crate) ports: IndexMap<String, CloudResource>,
    /// Servers ever created; numbers addresses and spreads hosts.
    pub(crate) created: u64,
    pub(crate) az_cursor: usize,
    pub(crate) seq: u64,
    /// How the API fails now, if it does.
    pub(crate) api_fault: Option<ApiFault>,
}

impl State {
    /// Applies every delete whose time has come: the server goes away, or
    /// to ERROR when its delete failed.
    pub(crate) fn settle(&mut self, now: Stamp) {
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

    pub(crate) fn next_seq(&mut self) -> u64 {
        // Wrapping: a state file may hold any number.
        self.seq = self.seq.wrapping_add(1);
        self.seq
    }

    /// Adds the configured cloud images that are missing (by id when the
    /// configuration gives one, else by name): a state file may predate
    /// them.
    pub(crate) fn ensure_cloud_images(&mut self, wanted: &[CloudImageSeed]) {
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

    /// Adds a floating IP (attached to a port or not); returns its id.
    pub(crate) fn add_floating_ip(&mut self, attached: bool) -> String {
        let id = self.ids.uuid();
        self.floating_ips.insert(
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
    }

    /// Adds a DOWN port with this device owner; returns its id.
    pub(crate) fn add_down_port(&mut self, device_owner: &str) -> String {
        let id = self.ids.uuid();
        self.ports.insert(
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
pub(crate) struct NewServer {
    pub(crate) name: String,
    pub(crate) metadata: IndexMap<String, String>,
    pub(crate) resources: Resources,
    pub(crate) az: Option<String>,
    pub(crate) ready_at: Stamp,
    pub(crate) boot_fault: Option<String>,
}

/// One provider's cloud as the configuration describes it: the fixed
/// part (names, flavors, zones, delays) that every operation's rules read,
/// and the [`Seed`] a new cloud starts from.
pub(crate) struct Nova {
    pub(crate) name: String,
    pub(crate) cloud: String,
    pub(crate) region: Option<String>,
    /// Pool name written on injected leaked servers.
    pub(crate) leak_pool: String,
    pub(crate) boot_delay: Duration,
    pub(crate) delete_delay: Duration,
    pub(crate) flavors: Vec<SimulatedFlavor>,
    pub(crate) azs: Vec<String>,
    /// `data-plane-host`: every server's `interface_ip`, so that a real
    /// SSH server there stands in for the servers' network (tests).
    pub(crate) data_plane_host: Option<String>,
    /// Per-provider salt of host ids.
    pub(crate) salt: u64,
    /// What a new cloud is made of.
    pub(crate) seed: Seed,
}

impl Nova {
    /// A new cloud as the configuration describes it: cloud images, then
    /// the leaked servers, floating IPs and ports.
    pub(crate) fn fresh_state(&self, now: Stamp) -> State {
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
        for _ in 0..self.seed.leaked_floating_ips {
            st.add_floating_ip(false);
        }
        for _ in 0..self.seed.leaked_ports {
            // What Nova leaves when a server's port outlives it.
            st.add_down_port("compute:nova");
        }
        st
    }

    /// An ACTIVE server tagged for this provider (and its first pool) with
    /// `node_id`, as a launcher that died after its create leaves it.
    pub(crate) fn leaked_server(&self, node_id: &str, now: Stamp) -> NewServer {
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
    pub(crate) fn insert_server(&self, st: &mut State, new: NewServer) -> String {
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
            interface_ip: Some(self.data_plane_host.clone().unwrap_or(public)),
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

    fn flavor_for(&self, label: &PoolLabel) -> Result<&SimulatedFlavor, ProviderError> {
        resolve_flavor(&self.flavors, label).ok_or_else(|| {
            let names: Vec<&str> = self.flavors.iter().map(|f| f.name.as_str()).collect();
            ProviderError::InvalidRequest(format!(
                "provider {}: label {}: no flavor matches {} (flavors: {})",
                self.name,
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

    /// Quota one server of `label` uses: its flavor, plus a volume when
    /// it boots from one.
    pub(crate) fn resources_for(&self, label: &PoolLabel) -> Result<Resources, ProviderError> {
        let f = self.flavor_for(label)?;
        let mut r = Resources::server(f.vcpus, f.ram);
        if label.boot_from_volume {
            r.set(VOLUMES, 1);
            r.set(VOLUME_GB, label.volume_size);
        }
        Ok(r)
    }

    /// A requested zone this cloud does not have is an invalid request (a
    /// cloud without zones takes any).
    pub(crate) fn check_az(&self, az: Option<&String>) -> Result<(), ProviderError> {
        match az {
            Some(az) if !self.azs.is_empty() && !self.azs.contains(az) => {
                Err(ProviderError::InvalidRequest(format!(
                    "provider {}: the requested availability zone {az:?} is not available (zones: {})",
                    self.name,
                    self.azs.join(", ")
                )))
            }
            _ => Ok(()),
        }
    }

    /// Refuses a server that would take usage over quota, with Nova's 403
    /// text (which the OpenStack backend maps to `QuotaExceeded`).
    pub(crate) fn check_quota(
        &self,
        st: &State,
        resources: &Resources,
    ) -> Result<(), ProviderError> {
        match st.quota.first_exceeded(&st.usage, resources) {
            Some(name) => Err(ProviderError::QuotaExceeded(format!(
                "provider {}: Quota exceeded for {name}: Requested {}, but already used {} of {} {name}",
                self.name,
                resources.get(name),
                st.usage.get(name),
                st.quota.get(name).unwrap_or_default(),
            ))),
            None => Ok(()),
        }
    }

    /// Whether `image` names an active image, as Glance would find it.
    pub(crate) fn image_exists(&self, st: &State, image: &ImageRef) -> Result<(), ProviderError> {
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
                self.name,
                match image {
                    ImageRef::Uploaded { external_id } => format!("with id {external_id}"),
                    ImageRef::Cloud { id: Some(id), .. } => format!("with id {id}"),
                    ImageRef::Cloud { id: None, name } => format!("named {name:?}"),
                }
            )))
        }
    }
}
