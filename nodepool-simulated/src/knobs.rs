//! From a `nodepool.yaml` provider to a simulated cloud: its `simulation`
//! knobs ([`SimulatedCloud`], parsed and validated with the rest of the
//! configuration in `nodepool_model::config`) become the cloud's fixed
//! description ([`Nova`]), what a new cloud starts with ([`Seed`]), and
//! where its state lives ([`Storage`]).

use std::sync::Arc;

use nodepool_model::config::{ApiFault, Driver, ProviderConfig, SimulatedCloud};
use nodepool_model::model::Limits;
use nodepool_model::provider::ProviderError;

use crate::dice::FailureRates;
use crate::nova::{Nova, fnv1a};
use crate::provider::{Inner, SimulatedProvider};
use crate::storage::Storage;

/// A `cloud-images` entry: present in the cloud from the start.
#[derive(Clone, Debug)]
pub(crate) struct CloudImageSeed {
    pub(crate) id: Option<String>,
    pub(crate) name: String,
}

/// What a new cloud starts with, from the configuration. With a state
/// file, a provider opening the file applies the quota, the failure rates,
/// a configured API fault and missing cloud images to the cloud it finds.
#[derive(Clone, Debug)]
pub(crate) struct Seed {
    pub(crate) quota: Limits,
    pub(crate) rates: FailureRates,
    pub(crate) seed: u64,
    pub(crate) cloud_images: Vec<CloudImageSeed>,
    pub(crate) leaked_servers: u32,
    pub(crate) leaked_floating_ips: u32,
    pub(crate) leaked_ports: u32,
    pub(crate) api_fault: Option<ApiFault>,
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
                if p.state_file().is_some() {
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
            leaked_floating_ips: knobs.leaked_floating_ips,
            leaked_ports: knobs.leaked_ports,
            api_fault: knobs.api_fault,
        };
        let nova = Nova {
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
            data_plane_host: knobs.data_plane_host,
            salt: fnv1a(&provider.name),
            seed,
        };
        let storage = Storage::new(&nova, knobs.state_file);
        SimulatedProvider {
            inner: Arc::new(Inner {
                nova,
                storage,
                skip_nodescan: knobs.skip_nodescan,
                api_timeout: knobs.api_timeout,
            }),
        }
    }
}
