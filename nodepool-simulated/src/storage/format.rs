//! The state file's JSON: every simulated cloud kept in it, by provider
//! name, and the conversion from and to a [`State`]. What the file does
//! not keep (usage, the delete queue) is derived from its servers.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use indexmap::IndexMap;
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

use nodepool_model::config::ApiFault;
use nodepool_model::model::{Limits, Resources};
use nodepool_model::provider::{
    CloudImageInfo, CloudResource, Instance, InstanceStatus, ResourceKind,
};

use super::Stamp;
use crate::dice::{FailureRates, SplitMix64};
use crate::nova::{Deletion, Server, State};

/// Version of the state file's format.
pub(super) const FILE_VERSION: u32 = 1;

/// The state file: every simulated cloud kept in it, by provider name
/// (providers may share a file). Times are wall-clock epoch seconds with
/// millisecond precision, as Nodepool writes `state_time`.
#[derive(Debug, Default, Serialize, Deserialize)]
pub(super) struct FileDoc {
    pub(super) version: u32,
    pub(super) providers: IndexMap<String, FileCloud>,
}

#[derive(Debug, Serialize, Deserialize)]
pub(super) struct FileCloud {
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
    pub(super) fn from_state(st: &State) -> Self {
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
    pub(super) fn to_state(&self) -> Result<State, String> {
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
