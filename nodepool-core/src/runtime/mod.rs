//! What the three runtimes (the [launcher](crate::launcher), the
//! [builder](crate::builder) and the [consumer runtime](crate::consumers))
//! share: the shape of their main loop and the pieces every one of them
//! is built from.
//!
//! Each runtime is a pure planner plus an executor, run by
//! `run_passes`: read a snapshot, plan, execute, then wait for a
//! reason to look again (a store change, a finished task, a reload, a
//! session change or the periodic tick). Every completed pass is counted
//! by a [`PassCounter`], which the runtimes expose so that tests and
//! embedders can wait for "N more passes" instead of sleeping.
//!
//! - [`Clock`]: where "now" comes from (the system clock, or tokio's
//!   paused clock in tests).
//! - [`ProviderFactory`]: how a runtime gets the cloud of a configured
//!   provider.
//! - [`PassCounter`]: the completed passes of one runtime.
//! - `run_passes` and `Wakeups`: the loop itself (crate-internal).

mod clock;
mod pass_loop;
mod passes;

use std::sync::Arc;

pub use clock::Clock;
pub(crate) use pass_loop::{PassRunner, Passed, Wakeups, run_passes};
pub use passes::{PassCounter, RuntimeStopped};

use crate::config::ProviderConfig;
use crate::provider::Provider;

/// Builds a provider from its configuration (the daemon picks the backend:
/// OpenStack, simulated, ...).
pub type ProviderFactory =
    Arc<dyn Fn(&ProviderConfig) -> Result<Arc<dyn Provider>, String> + Send + Sync>;
