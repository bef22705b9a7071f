//! The node request record: `/nodepool/requests/<prio>-<seq10>`.

use serde::{Deserialize, Serialize};

use super::json::{DecodeError, Extra, Json, WireRecord, decode_record, lenient};

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
    /// Requested labels; order matters and duplicates are allowed. A
    /// missing or `null` `node_types` reads as empty, as in Python
    /// Nodepool (such a request asks for no nodes and is fulfilled empty).
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
    /// `node_types` as stored, when it is not a list of strings (and the
    /// rest of the record reads): `node_types` is then empty, launchers
    /// fail the request ([`NodeRequest::invalid_reason`]), and the value
    /// is written back unchanged.
    #[serde(skip)]
    pub malformed_node_types: Option<Json>,
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
            malformed_node_types: None,
        }
    }

    /// Sets the state and its timestamp.
    pub fn set_state(&mut self, state: RequestState, now: f64) {
        self.state = state;
        self.state_time = now;
    }

    /// Why no launcher can serve this request whatever its pools, if so:
    /// its `node_types` is not a list of strings. Python Nodepool fails
    /// such a request (every pool declines labels it does not know).
    pub fn invalid_reason(&self) -> Option<String> {
        self.malformed_node_types.as_ref().map(|raw| {
            format!(
                "node_types is not a list of strings: {}",
                truncated(raw.as_text())
            )
        })
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

    /// Decodes a request; one whose only fault is a `node_types` that is
    /// not a list of strings still reads (with
    /// [`NodeRequest::malformed_node_types`] set), so that a launcher can
    /// fail it instead of skipping it as unreadable, leaving it
    /// `requested` forever.
    fn from_json(data: &[u8]) -> Result<Self, DecodeError> {
        let err = match decode_record::<Self>(data) {
            Ok(r) => return Ok(r),
            Err(e) => e,
        };
        let Ok(mut all) = serde_json::from_slice::<indexmap::IndexMap<String, Json>>(data) else {
            return Err(err);
        };
        let Some(raw) = all.shift_remove("node_types") else {
            return Err(err);
        };
        if raw.decode::<Option<Vec<String>>>().is_ok() {
            // node_types is fine: something else is wrong.
            return Err(err);
        }
        let rest = serde_json::to_vec(&all).map_err(|e| DecodeError::new(e.to_string()))?;
        let mut r = decode_record::<Self>(&rest)?;
        r.malformed_node_types = Some(raw);
        Ok(r)
    }

    /// Encodes a request; a malformed `node_types` goes back as it was read.
    fn to_json(&self) -> Vec<u8> {
        let known = serde_json::to_vec(self).unwrap_or_else(|_| b"{}".to_vec());
        let Some(raw) = &self.malformed_node_types else {
            return known;
        };
        match serde_json::from_slice::<indexmap::IndexMap<String, Json>>(&known) {
            Ok(mut all) => {
                // Replaces the value in place: the key order is kept.
                all.insert("node_types".to_owned(), raw.clone());
                serde_json::to_vec(&all).unwrap_or(known)
            }
            Err(_) => known,
        }
    }
}

/// A stored value, shortened for a message.
fn truncated(text: &str) -> String {
    const MAX: usize = 80;
    match text.char_indices().nth(MAX) {
        Some((i, _)) => format!("{}...", &text[..i]),
        None => text.to_owned(),
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
    fn a_request_whose_node_types_is_not_a_list_of_strings_still_reads() {
        for bad in [
            r#""ubuntu""#,
            "5",
            "[1, 2]",
            r#"[{"a": 1}]"#,
            r#"{"a": "b"}"#,
            "true",
        ] {
            let text = format!(
                r#"{{"state": "requested", "node_types": {bad}, "requestor": "zuul", "id": "x"}}"#
            );
            let r =
                NodeRequest::from_json(text.as_bytes()).unwrap_or_else(|e| panic!("{bad}: {e}"));
            assert!(r.node_types.is_empty(), "{bad}");
            assert_eq!(r.requestor.as_deref(), Some("zuul"));
            let reason = r
                .invalid_reason()
                .unwrap_or_else(|| panic!("{bad}: no reason"));
            assert!(
                reason.contains("node_types") && reason.contains(bad),
                "{reason}"
            );
            // Written back, the stored value is unchanged and in its place.
            let mut failed = r.clone();
            failed.set_state(RequestState::Failed, 2.0);
            let out: serde_json::Value = serde_json::from_slice(&failed.to_json()).expect("json");
            let want: serde_json::Value = serde_json::from_str(bad).expect("json");
            assert_eq!(out["node_types"], want);
            assert_eq!(out["state"], "failed");
            assert_eq!(out["id"], "x", "unknown keys are kept");
            let again = NodeRequest::from_json(&failed.to_json()).expect("reads");
            assert_eq!(again.malformed_node_types, r.malformed_node_types);
        }
    }

    #[test]
    fn a_request_without_node_types_asks_for_nothing() {
        // Python reads `d.get('node_types', [])`.
        for text in [
            r#"{"state": "requested"}"#,
            r#"{"state": "requested", "node_types": null}"#,
        ] {
            let r = NodeRequest::from_json(text.as_bytes()).expect("reads");
            assert!(r.node_types.is_empty());
            assert_eq!(r.invalid_reason(), None);
        }
        let ok = NodeRequest::from_json(br#"{"state": "requested", "node_types": ["a", "b"]}"#)
            .expect("reads");
        assert_eq!(ok.node_types, ["a", "b"]);
        assert_eq!(ok.invalid_reason(), None);
    }

    #[test]
    fn other_faults_still_make_a_request_unreadable() {
        for text in [
            r#"{"state": 3, "node_types": "x"}"#,
            r#"{"state": "nonsense", "node_types": ["x"]}"#,
            r#"{"node_types": 5}"#,
            r#"["not", "an", "object"]"#,
            "",
        ] {
            assert!(NodeRequest::from_json(text.as_bytes()).is_err(), "{text}");
        }
    }

    #[test]
    fn request_ids_split_at_the_dash() {
        assert_eq!(
            parse_request_id("200-0000012345"),
            Some(("200", "0000012345"))
        );
        assert_eq!(parse_request_id("0000012345"), None);
    }
}
