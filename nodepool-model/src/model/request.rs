//! The node request record: `/nodepool/requests/<prio>-<seq10>`.

use serde::{Deserialize, Serialize};

use super::json::{Extra, Json, WireRecord, lenient};

/// The state of a node request. The serialised strings are the wire strings.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RequestState {
    /// Waiting for a launcher.
    Requested,
    /// A launcher accepted it and is allocating nodes.
    Pending,
    /// All nodes are ready and listed in `nodes`.
    Fulfilled,
    /// Every registered pool declined it, or a launch failed for good.
    Failed,
}

impl RequestState {
    /// The wire string.
    pub fn as_str(self) -> &'static str {
        match self {
            RequestState::Requested => "requested",
            RequestState::Pending => "pending",
            RequestState::Fulfilled => "fulfilled",
            RequestState::Failed => "failed",
        }
    }
}

impl std::fmt::Display for RequestState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The requestor name Nodepool uses for its own min-ready requests.
pub const MIN_READY_REQUESTOR: &str = "NodePool:min-ready";
/// Priority prefix of min-ready requests.
pub const MIN_READY_PRIORITY: &str = "900";
/// Zuul's priority prefixes by pipeline precedence.
pub const PRIORITY_HIGH: &str = "100";
/// Zuul's normal precedence (check and most pipelines).
pub const PRIORITY_NORMAL: &str = "200";
/// Zuul's low precedence.
pub const PRIORITY_LOW: &str = "300";

/// A request for a set of nodes.
///
/// The request id (`<prio>-<seq10>`) is the znode name and not part of the
/// JSON. Every key Zuul reads with `[]` is always written.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NodeRequest {
    /// Current state.
    pub state: RequestState,
    /// When `state` last changed (epoch seconds).
    #[serde(default, deserialize_with = "lenient::float")]
    pub state_time: f64,
    /// Launcher-pool ids that declined it.
    #[serde(default, deserialize_with = "lenient::null_as_default")]
    pub declined_by: Vec<String>,
    /// Requested labels; order matters and duplicates are allowed.
    #[serde(default, deserialize_with = "lenient::null_as_default")]
    pub node_types: Vec<String>,
    /// Node ids, in `node_types` order, once fulfilled.
    #[serde(default, deserialize_with = "lenient::null_as_default")]
    pub nodes: Vec<String>,
    /// Whether ready nodes may be reused (min-ready requests set false).
    #[serde(default = "default_true", deserialize_with = "bool_default_true")]
    pub reuse: bool,
    /// Who asked: Zuul's system id, or `NodePool:min-ready`.
    #[serde(default)]
    pub requestor: Option<String>,
    /// Opaque data of the requestor, given back exactly.
    #[serde(default)]
    pub requestor_data: Option<Json>,
    /// Preferred provider.
    #[serde(default)]
    pub provider: Option<String>,
    /// Zuul's relative priority; lower is more urgent.
    #[serde(default, deserialize_with = "lenient::null_as_default")]
    pub relative_priority: i64,
    /// Zuul event id.
    #[serde(default)]
    pub event_id: Option<String>,
    /// When the request was created (epoch seconds).
    #[serde(default, deserialize_with = "lenient::float_opt")]
    pub created_time: Option<f64>,
    /// Tenant, for tenant quota.
    #[serde(default)]
    pub tenant_name: Option<String>,
    /// Keys other writers added.
    #[serde(flatten, skip_deserializing)]
    pub extra: Extra,
}

fn default_true() -> bool {
    true
}

fn bool_default_true<'de, D: serde::Deserializer<'de>>(d: D) -> Result<bool, D::Error> {
    Ok(Option::<bool>::deserialize(d)?.unwrap_or(true))
}

impl NodeRequest {
    /// A new request in state `requested`.
    pub fn new(node_types: Vec<String>, requestor: &str, now: f64) -> Self {
        NodeRequest {
            state: RequestState::Requested,
            state_time: now,
            declined_by: Vec::new(),
            node_types,
            nodes: Vec::new(),
            reuse: true,
            requestor: Some(requestor.to_owned()),
            requestor_data: None,
            provider: None,
            relative_priority: 0,
            event_id: Some(uuid::Uuid::new_v4().simple().to_string()),
            created_time: Some(now),
            tenant_name: None,
            extra: Extra::new(),
        }
    }

    /// Sets the state and its timestamp.
    pub fn set_state(&mut self, state: RequestState, now: f64) {
        self.state = state;
        self.state_time = now;
    }

    /// Whether Nodepool created this request itself for min-ready.
    pub fn is_min_ready(&self) -> bool {
        self.requestor.as_deref() == Some(MIN_READY_REQUESTOR)
    }
}

impl WireRecord for NodeRequest {
    const KNOWN_KEYS: &'static [&'static str] = &[
        "state",
        "state_time",
        "declined_by",
        "node_types",
        "nodes",
        "reuse",
        "requestor",
        "requestor_data",
        "provider",
        "relative_priority",
        "event_id",
        "created_time",
        "tenant_name",
    ];

    fn extra_mut(&mut self) -> &mut Extra {
        &mut self.extra
    }
}

/// The priority prefix and sequence of a request id like `200-0000012345`.
///
/// Returns `None` for ids that do not have Nodepool's shape (Zuul recognises
/// a Nodepool request id by the `-` at index 3).
pub fn parse_request_id(id: &str) -> Option<(&str, &str)> {
    if id.len() > 4 && id.as_bytes().get(3) == Some(&b'-') {
        Some((&id[..3], &id[4..]))
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_ids_split_at_the_dash() {
        assert_eq!(
            parse_request_id("200-0000012345"),
            Some(("200", "0000012345"))
        );
        assert_eq!(parse_request_id("0000012345"), None);
    }
}
