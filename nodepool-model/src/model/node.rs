//! The node record: `/nodepool/nodes/<seq10>`.

use serde::{Deserialize, Serialize};

use super::json::{Extra, Json, WireRecord, lenient};
use super::resources::Resources;

/// The state of a node. The serialised strings are the wire strings.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum NodeState {
    /// Record created, not yet locked by its launcher.
    Init,
    /// The server is being launched.
    Building,
    /// Legacy, unused.
    Testing,
    /// Ready for use.
    Ready,
    /// Used by a job.
    InUse,
    /// The job finished; delete it.
    Used,
    /// Kept for inspection.
    Hold,
    /// Being deleted.
    Deleting,
    /// The launch failed.
    Failed,
    /// The launch hit the cloud's quota; not counted as a failure.
    Aborted,
    /// Deleted; the record is about to go.
    Deleted,
}

impl NodeState {
    /// Every state, in wire order.
    pub const ALL: [NodeState; 11] = [
        NodeState::Init,
        NodeState::Building,
        NodeState::Testing,
        NodeState::Ready,
        NodeState::InUse,
        NodeState::Used,
        NodeState::Hold,
        NodeState::Deleting,
        NodeState::Failed,
        NodeState::Aborted,
        NodeState::Deleted,
    ];

    /// The wire string.
    pub fn as_str(self) -> &'static str {
        match self {
            NodeState::Init => "init",
            NodeState::Building => "building",
            NodeState::Testing => "testing",
            NodeState::Ready => "ready",
            NodeState::InUse => "in-use",
            NodeState::Used => "used",
            NodeState::Hold => "hold",
            NodeState::Deleting => "deleting",
            NodeState::Failed => "failed",
            NodeState::Aborted => "aborted",
            NodeState::Deleted => "deleted",
        }
    }

    /// States in which an unlocked node is deleted by the launcher's
    /// deleted-node pass (reference §4.1).
    pub fn deletable_when_unlocked(self) -> bool {
        matches!(
            self,
            NodeState::Used
                | NodeState::InUse
                | NodeState::Building
                | NodeState::Failed
                | NodeState::Deleting
                | NodeState::Deleted
                | NodeState::Aborted
        )
    }
}

impl std::fmt::Display for NodeState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for NodeState {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        NodeState::ALL
            .into_iter()
            .find(|st| st.as_str() == s)
            .ok_or_else(|| format!("unknown node state {s:?}"))
    }
}

/// A node's connection port: normally an integer, but some drivers store
/// other values there (the CLI shows those as "redacted").
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Port {
    /// A TCP port.
    Number(i64),
    /// Anything else a driver stored.
    Other(serde_json::Value),
}

impl Default for Port {
    fn default() -> Self {
        Port::Number(22)
    }
}

impl Port {
    /// The port number, if it is one.
    pub fn number(&self) -> Option<i64> {
        match self {
            Port::Number(n) => Some(*n),
            Port::Other(_) => None,
        }
    }
}

/// A node: one machine handed to a job.
///
/// Field names and order follow what Python Nodepool writes; every key is
/// always written (nulls included) because Zuul reads some with `[]`.
/// The node id is the znode name and is not part of the JSON.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Node {
    /// Current state.
    pub state: NodeState,
    /// When `state` last changed (epoch seconds).
    #[serde(deserialize_with = "lenient::float")]
    pub state_time: f64,
    /// clouds.yaml cloud name.
    #[serde(default)]
    pub cloud: Option<String>,
    /// Provider name.
    #[serde(default, deserialize_with = "lenient::null_as_default")]
    pub provider: String,
    /// Pool name within the provider.
    #[serde(default, deserialize_with = "lenient::null_as_default")]
    pub pool: String,
    /// Labels of this node (a list; a legacy single string is accepted).
    #[serde(rename = "type", default, deserialize_with = "lenient::string_or_list")]
    pub node_type: Vec<String>,
    /// Request id this node is allocated to.
    #[serde(default)]
    pub allocated_to: Option<String>,
    /// Availability zone.
    #[serde(default)]
    pub az: Option<String>,
    /// Cloud region.
    #[serde(default)]
    pub region: Option<String>,
    /// Public IPv4 address.
    #[serde(default)]
    pub public_ipv4: Option<String>,
    /// Private IPv4 address.
    #[serde(default)]
    pub private_ipv4: Option<String>,
    /// Public IPv6 address.
    #[serde(default)]
    pub public_ipv6: Option<String>,
    /// Hypervisor host id.
    #[serde(default)]
    pub host_id: Option<String>,
    /// The address jobs connect to.
    #[serde(default)]
    pub interface_ip: Option<String>,
    /// Port jobs connect to.
    #[serde(default = "default_port_opt")]
    pub connection_port: Option<Port>,
    /// Duplicate of `connection_port`, kept for old Zuul.
    #[serde(default)]
    pub ssh_port: Option<Port>,
    /// ZooKeeper path of the image upload used, or the cloud image name.
    #[serde(default)]
    pub image_id: Option<String>,
    /// Launcher (pool worker) id that launched it.
    #[serde(default)]
    pub launcher: Option<String>,
    /// When the record was created (epoch seconds).
    #[serde(default, deserialize_with = "lenient::float_opt")]
    pub created_time: Option<f64>,
    /// Cloud server id.
    #[serde(default)]
    pub external_id: Option<String>,
    /// Host name (static driver only).
    #[serde(default)]
    pub hostname: Option<String>,
    /// Operator comment (hold reason).
    #[serde(default)]
    pub comment: Option<String>,
    /// Set by Zuul: `{zuul_system, project_name}`.
    #[serde(default)]
    pub user_data: Option<Json>,
    /// Set by Zuul on autohold.
    #[serde(default)]
    pub hold_job: Option<String>,
    /// `"<type> <base64>"` per key type offered by the node's SSH server.
    #[serde(default, deserialize_with = "lenient::null_as_default")]
    pub host_keys: Vec<String>,
    /// Login user.
    #[serde(default)]
    pub username: Option<String>,
    /// `ssh`, `winrm`, `network_cli`, ...
    #[serde(default)]
    pub connection_type: Option<String>,
    /// Shell type.
    #[serde(default)]
    pub shell_type: Option<String>,
    /// Epoch seconds after which a held node is deleted (0 = never).
    #[serde(default, deserialize_with = "lenient::coerce_int")]
    pub hold_expiration: Option<i64>,
    /// Quota this node uses.
    #[serde(default)]
    pub resources: Option<Resources>,
    /// Slot (metastatic driver).
    #[serde(default)]
    pub slot: Option<Json>,
    /// The pool's `node-attributes`.
    #[serde(default)]
    pub attributes: Option<Json>,
    /// Python interpreter path on the node.
    #[serde(default)]
    pub python_path: Option<String>,
    /// Tenant the node is counted against.
    #[serde(default)]
    pub tenant_name: Option<String>,
    /// Driver-specific data.
    #[serde(default)]
    pub driver_data: Option<Json>,
    /// Requestor of the request it was launched or allocated for.
    #[serde(default)]
    pub requestor: Option<String>,
    /// Node properties (Nodepool 11 writes `{}`).
    #[serde(default)]
    pub node_properties: Option<Json>,
    /// Keys other writers added (Zuul writes `id`).
    #[serde(flatten, skip_deserializing)]
    pub extra: Extra,
}

fn default_port_opt() -> Option<Port> {
    Some(Port::Number(22))
}

impl Node {
    /// A new node record as a launcher creates it, before launch.
    pub fn new(
        state: NodeState,
        now: f64,
        provider: &str,
        pool: &str,
        labels: Vec<String>,
    ) -> Self {
        Node {
            state,
            state_time: now,
            cloud: None,
            provider: provider.to_owned(),
            pool: pool.to_owned(),
            node_type: labels,
            allocated_to: None,
            az: None,
            region: None,
            public_ipv4: None,
            private_ipv4: None,
            public_ipv6: None,
            host_id: None,
            interface_ip: None,
            connection_port: Some(Port::Number(22)),
            ssh_port: Some(Port::Number(22)),
            image_id: None,
            launcher: None,
            created_time: Some(now),
            external_id: None,
            hostname: None,
            comment: None,
            user_data: None,
            hold_job: None,
            host_keys: Vec::new(),
            username: None,
            connection_type: None,
            shell_type: None,
            hold_expiration: None,
            resources: None,
            slot: None,
            attributes: None,
            python_path: None,
            tenant_name: None,
            driver_data: None,
            requestor: None,
            node_properties: Some(Json::empty_object()),
            extra: Extra::new(),
        }
    }

    /// Sets the state and its timestamp.
    pub fn set_state(&mut self, state: NodeState, now: f64) {
        self.state = state;
        self.state_time = now;
    }

    /// The port jobs connect to: `connection_port`, else `ssh_port`, else 22.
    pub fn port(&self) -> Port {
        self.connection_port
            .clone()
            .or_else(|| self.ssh_port.clone())
            .unwrap_or_default()
    }

    /// Login user (`zuul` when unset, as Zuul reads it).
    pub fn username_or_default(&self) -> &str {
        self.username.as_deref().unwrap_or("zuul")
    }

    /// Whether the node carries this label.
    pub fn has_label(&self, label: &str) -> bool {
        self.node_type.iter().any(|l| l == label)
    }
}

impl WireRecord for Node {
    const KNOWN_KEYS: &'static [&'static str] = &[
        "state",
        "state_time",
        "cloud",
        "provider",
        "pool",
        "type",
        "allocated_to",
        "az",
        "region",
        "public_ipv4",
        "private_ipv4",
        "public_ipv6",
        "host_id",
        "interface_ip",
        "connection_port",
        "ssh_port",
        "image_id",
        "launcher",
        "created_time",
        "external_id",
        "hostname",
        "comment",
        "user_data",
        "hold_job",
        "host_keys",
        "username",
        "connection_type",
        "shell_type",
        "hold_expiration",
        "resources",
        "slot",
        "attributes",
        "python_path",
        "tenant_name",
        "driver_data",
        "requestor",
        "node_properties",
    ];

    fn extra_mut(&mut self) -> &mut Extra {
        &mut self.extra
    }
}
