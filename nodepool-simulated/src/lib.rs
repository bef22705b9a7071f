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
//!   `leaked-floating-ips: N` unattached floating IPs and `leaked-ports: N`
//!   DOWN ports (device owner `compute:nova`, as a server's port that
//!   outlived it) exist from the start too, for the launcher's
//!   `clean-floating-ips` and `port-cleanup-interval` cleanup. Like the
//!   leaked servers they are made once, when the cloud (or its state file)
//!   is created.
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
//!
//! ## Where to start reading
//!
//! [`provider`](crate::SimulatedProvider) (`src/provider.rs`) is the
//! [`Provider`] impl: every method is one or more API calls, each a
//! closure run on the cloud's state behind the API fault (`dice.rs`,
//! `SimulatedProvider::api`), under the cloud's lock (`storage/`), applying
//! Nova's rules (`nova.rs`: the server state machine, quota, flavors,
//! images). `knobs.rs` turns a `nodepool.yaml` provider into a cloud;
//! `hooks.rs` are the test hooks; `glance.rs` hashes uploads.
//!
//! [`faults`] stands apart: [`FaultyProvider`](faults::FaultyProvider), a
//! decorator injecting latency, errors and hangs into the calls of any
//! provider, for tests of what sits above a cloud.

mod dice;
pub mod faults;
mod glance;
mod hooks;
mod knobs;
mod nova;
mod provider;
mod storage;

// The documentation's links.
#[cfg(doc)]
use nodepool_model::config::{ApiFault, SimulatedCloud};
#[cfg(doc)]
use nodepool_model::provider::{InstanceSpec, Provider, ProviderError};

pub use dice::FailureRates;
pub use nova::resolve_flavor;
pub use provider::SimulatedProvider;
