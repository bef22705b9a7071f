//! Component registrations: `/nodepool/components/<kind>/<hostname><seq10>`.
//!
//! These records are ephemeral (they vanish with their owner's session) and
//! are written with sorted keys, as Python Nodepool does.

use serde::{Deserialize, Serialize};

use super::json::{Extra, WireRecord, lenient};

/// The model API version this implementation speaks. A component seeing a
/// newer one registered exits, as Nodepool's do.
pub const MODEL_API: i64 = 0;

/// Kind of component.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ComponentKind {
    /// A launcher process.
    Launcher,
    /// One provider pool of a launcher.
    Pool,
    /// A builder process.
    Builder,
}

impl ComponentKind {
    /// The wire string (also the path segment).
    pub fn as_str(self) -> &'static str {
        match self {
            ComponentKind::Launcher => "launcher",
            ComponentKind::Pool => "pool",
            ComponentKind::Builder => "builder",
        }
    }
}

/// Lifecycle state of a component.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ComponentState {
    /// Starting up.
    Initializing,
    /// Working.
    Running,
    /// Paused (a pool at quota).
    Paused,
    /// Shutting down.
    Stopped,
}

/// A registered component. Pool components also carry the pool fields.
///
/// Fields are declared in alphabetical order so that the JSON comes out
/// with sorted keys like Python's `json.dumps(sort_keys=True)`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Component {
    /// Host name.
    #[serde(default, deserialize_with = "lenient::null_as_default")]
    pub hostname: String,
    /// Launcher-pool id (pool components only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// Component kind.
    pub kind: ComponentKind,
    /// Labels the pool can boot now: it is enabled and each one's image is
    /// ready (pool components only). Our own key, like
    /// `provider_unavailable`; other launchers use it to agree on who
    /// creates a label's min-ready requests. Absent (Python Nodepool's
    /// pools): every supported label is taken to be bootable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub launchable_labels: Option<Vec<String>>,
    /// Model API version.
    #[serde(default)]
    pub model_api: i64,
    /// Pool name (pool components only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Whether the pool is paused (pool components only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub paused: Option<bool>,
    /// Pool priority; lower is preferred (pool components only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<i64>,
    /// Provider name (pool components only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider_name: Option<String>,
    /// Set while the pool's provider is unavailable (its API failing; the
    /// pool is then also `paused`). Our own key: Python Nodepool keeps
    /// unknown component keys in its content dict and never reads them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider_unavailable: Option<ProviderUnavailable>,
    /// Lifecycle state.
    pub state: ComponentState,
    /// Labels the pool can serve (pool components only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub supported_labels: Option<Vec<String>>,
    /// Software version.
    #[serde(default, deserialize_with = "lenient::null_as_default")]
    pub version: String,
    /// Keys other writers added.
    #[serde(flatten, skip_deserializing)]
    pub extra: Extra,
}

/// Why and since when a pool's provider is unavailable, as written in its
/// pool component (so the CLI and other launchers can tell).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ProviderUnavailable {
    /// The latest API failure.
    pub reason: String,
    /// Epoch seconds it was marked unavailable.
    pub since: f64,
}

impl Component {
    /// A launcher or builder registration.
    pub fn new(kind: ComponentKind, hostname: &str, version: &str) -> Self {
        Component {
            hostname: hostname.to_owned(),
            id: None,
            kind,
            launchable_labels: None,
            model_api: MODEL_API,
            name: None,
            paused: None,
            priority: None,
            provider_name: None,
            provider_unavailable: None,
            state: ComponentState::Initializing,
            supported_labels: None,
            version: version.to_owned(),
            extra: Extra::new(),
        }
    }

    /// A pool registration.
    #[allow(clippy::too_many_arguments)]
    pub fn pool(
        hostname: &str,
        version: &str,
        id: &str,
        provider: &str,
        pool: &str,
        labels: Vec<String>,
        priority: i64,
    ) -> Self {
        let mut c = Component::new(ComponentKind::Pool, hostname, version);
        c.id = Some(id.to_owned());
        c.provider_name = Some(provider.to_owned());
        c.name = Some(pool.to_owned());
        c.supported_labels = Some(labels);
        c.priority = Some(priority);
        c.paused = Some(false);
        c
    }
}

impl WireRecord for Component {
    const KNOWN_KEYS: &'static [&'static str] = &[
        "hostname",
        "id",
        "kind",
        "launchable_labels",
        "model_api",
        "name",
        "paused",
        "priority",
        "provider_name",
        "provider_unavailable",
        "state",
        "supported_labels",
        "version",
    ];

    fn extra_mut(&mut self) -> &mut Extra {
        &mut self.extra
    }

    fn to_json(&self) -> Vec<u8> {
        // Keys sorted, extras included, as Python's sort_keys=True does.
        let known = serde_json::to_vec(self).unwrap_or_else(|_| b"{}".to_vec());
        if self.extra.is_empty() {
            return known;
        }
        match serde_json::from_slice::<indexmap::IndexMap<String, super::json::Json>>(&known) {
            Ok(mut all) => {
                all.sort_keys();
                serde_json::to_vec(&all).unwrap_or(known)
            }
            Err(_) => known,
        }
    }
}
