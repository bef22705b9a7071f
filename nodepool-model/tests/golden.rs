//! Golden tests over the wire samples captured from Python Nodepool 11 and
//! real Zuul 14 (`fixtures/zk-samples`): decode, encode, decode again; every
//! key the Python side needs is written; unknown keys and opaque values come
//! back exactly, compared at full precision.

use std::collections::BTreeMap;
use std::path::PathBuf;

use nodepool_model::model::{
    Component, ComponentKind, Json, Node, NodeRequest, NodeState, RequestState, WireRecord,
};
use serde_json::value::RawValue;

fn fixture_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/zk-samples")
}

/// The raw `data` of a `{path, ephemeral, data}` sample, as exact text.
fn sample_data(name: &str) -> String {
    let text = std::fs::read_to_string(fixture_dir().join(name)).expect("fixture exists");
    let wrapper: BTreeMap<String, Box<RawValue>> =
        serde_json::from_str(&text).expect("sample is JSON");
    wrapper["data"].get().to_owned()
}

/// Compares two JSON texts structurally, with numbers compared as written
/// (so a 128-bit integer that became a float would not compare equal).
fn assert_json_eq(a: &str, b: &str, at: &str) {
    let a = a.trim();
    let b = b.trim();
    match (a.as_bytes().first(), b.as_bytes().first()) {
        (Some(b'{'), Some(b'{')) => {
            let ma: BTreeMap<String, &RawValue> = serde_json::from_str(a).expect("object");
            let mb: BTreeMap<String, &RawValue> = serde_json::from_str(b).expect("object");
            let ka: Vec<_> = ma.keys().collect();
            let kb: Vec<_> = mb.keys().collect();
            assert_eq!(ka, kb, "keys differ at {at}");
            for (k, va) in &ma {
                assert_json_eq(va.get(), mb[k].get(), &format!("{at}.{k}"));
            }
        }
        (Some(b'['), Some(b'[')) => {
            let va: Vec<&RawValue> = serde_json::from_str(a).expect("array");
            let vb: Vec<&RawValue> = serde_json::from_str(b).expect("array");
            assert_eq!(va.len(), vb.len(), "array lengths differ at {at}");
            for (i, (x, y)) in va.iter().zip(vb.iter()).enumerate() {
                assert_json_eq(x.get(), y.get(), &format!("{at}[{i}]"));
            }
        }
        _ => assert_eq!(a, b, "values differ at {at}"),
    }
}

fn round_trip<T: WireRecord + PartialEq + std::fmt::Debug>(name: &str) -> (T, String, String) {
    let original = sample_data(name);
    let decoded = T::from_json(original.as_bytes()).unwrap_or_else(|e| panic!("{name}: {e}"));
    let encoded = String::from_utf8(decoded.to_json()).expect("utf-8");
    let again = T::from_json(encoded.as_bytes()).expect("re-decodes");
    assert_eq!(decoded, again, "{name}: decode(encode(x)) != x");
    (decoded, original, encoded)
}

const NODE_SAMPLES: &[&str] = &[
    "node-building.json",
    "node-ready.json",
    "node-in-use.json",
    "node-used.json",
    "node-deleting.json",
];
const REQUEST_SAMPLES: &[&str] = &[
    "request-requested.json",
    "request-pending.json",
    "request-fulfilled.json",
    "request-from-zuul.json",
];

#[test]
fn every_sample_is_covered() {
    let mut names: Vec<String> = std::fs::read_dir(fixture_dir())
        .expect("fixture dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".json"))
        .collect();
    names.sort();
    let mut covered: Vec<String> = NODE_SAMPLES
        .iter()
        .chain(REQUEST_SAMPLES)
        .chain(&["component-launcher.json", "component-pool.json"])
        .map(|s| s.to_string())
        .collect();
    covered.sort();
    assert_eq!(names, covered);
}

#[test]
fn nodes_round_trip_exactly() {
    for name in NODE_SAMPLES {
        let (node, original, encoded): (Node, _, _) = round_trip(name);
        // Python writes every key; so do we, and Zuul's additions survive.
        assert_json_eq(&original, &encoded, name);
        assert_eq!(node.provider, "fake-provider");
        assert_eq!(node.node_type, vec!["fake-label".to_string()]);
    }
}

#[test]
fn node_states_read_from_samples() {
    let states: Vec<NodeState> = NODE_SAMPLES
        .iter()
        .map(|n| {
            Node::from_json(sample_data(n).as_bytes())
                .expect("decodes")
                .state
        })
        .collect();
    assert_eq!(
        states,
        vec![
            NodeState::Building,
            NodeState::Ready,
            NodeState::InUse,
            NodeState::Used,
            NodeState::Deleting
        ]
    );
}

#[test]
fn zuul_keys_survive_read_modify_write() {
    let original = sample_data("node-in-use.json");
    let mut node = Node::from_json(original.as_bytes()).expect("decodes");
    assert_eq!(
        node.extra.get("id").map(Json::as_text),
        Some("\"0000000000\"")
    );
    node.set_state(NodeState::Used, 1795261400.5);
    let encoded = String::from_utf8(node.to_json()).expect("utf-8");
    let back: BTreeMap<String, &RawValue> = serde_json::from_str(&encoded).expect("object");
    assert_eq!(back["id"].get(), "\"0000000000\"");
    assert_eq!(back["node_properties"].get(), "{}");
    assert_eq!(back["state"].get(), "\"used\"");
    assert_eq!(back["state_time"].get(), "1795261400.5");
    // user_data set by Zuul comes back as written
    let orig: BTreeMap<String, &RawValue> = serde_json::from_str(&original).expect("object");
    assert_json_eq(
        orig["user_data"].get(),
        back["user_data"].get(),
        "user_data",
    );
}

#[test]
fn requests_round_trip_exactly() {
    for name in REQUEST_SAMPLES {
        let (_req, original, encoded): (NodeRequest, _, _) = round_trip(name);
        let orig: BTreeMap<String, &RawValue> = serde_json::from_str(&original).expect("object");
        let enc: BTreeMap<String, &RawValue> = serde_json::from_str(&encoded).expect("object");
        // Every key the original had comes back with the same value...
        for (k, v) in &orig {
            let got = enc
                .get(k)
                .unwrap_or_else(|| panic!("{name}: key {k} dropped"));
            assert_json_eq(v.get(), got.get(), &format!("{name}.{k}"));
        }
        // ...and keys Nodepool always writes are added when Zuul left them out.
        for k in ["declined_by", "nodes", "reuse"] {
            assert!(enc.contains_key(k), "{name}: {k} missing");
        }
    }
}

#[test]
fn zuul_trace_ids_come_back_byte_for_byte() {
    let original = sample_data("request-from-zuul.json");
    let req = NodeRequest::from_json(original.as_bytes()).expect("decodes");
    let data = req.requestor_data.as_ref().expect("requestor_data");
    assert!(
        data.as_text()
            .contains("228016936497163457391215283634950237719")
    );
    assert!(data.as_text().contains("15811829404862412261"));
    assert!(data.as_text().contains("1795262711451234567"));
    let encoded = String::from_utf8(req.to_json()).expect("utf-8");
    let orig: BTreeMap<String, &RawValue> = serde_json::from_str(&original).expect("object");
    let enc: BTreeMap<String, &RawValue> = serde_json::from_str(&encoded).expect("object");
    assert_eq!(orig["requestor_data"].get(), enc["requestor_data"].get());
    assert_eq!(req.node_types.len(), 3);
    assert_eq!(req.state, RequestState::Requested);
}

#[test]
fn requests_always_carry_the_keys_zuul_reads_with_brackets() {
    let fresh = NodeRequest::new(vec!["label".into()], "me", 1.0);
    let mut bare = fresh.clone();
    bare.requestor = None;
    bare.requestor_data = None;
    bare.event_id = None;
    for req in [fresh, bare] {
        let bytes = req.to_json();
        let enc: BTreeMap<String, &RawValue> = serde_json::from_slice(&bytes).expect("object");
        for k in [
            "state",
            "state_time",
            "event_id",
            "requestor",
            "requestor_data",
            "node_types",
            "provider",
        ] {
            assert!(enc.contains_key(k), "request lacks {k}");
        }
    }
}

#[test]
fn nodes_always_carry_every_nodepool_key() {
    let node = Node::new(NodeState::Init, 1.0, "p", "main", vec!["l".into()]);
    let bytes = node.to_json();
    let enc: BTreeMap<String, &RawValue> = serde_json::from_slice(&bytes).expect("object");
    let mut keys: Vec<&str> = enc.keys().map(String::as_str).collect();
    keys.sort();
    let mut known: Vec<&str> = Node::KNOWN_KEYS.to_vec();
    known.sort();
    assert_eq!(keys, known);
}

#[test]
fn components_round_trip_with_sorted_keys() {
    for (name, kind) in [
        ("component-launcher.json", ComponentKind::Launcher),
        ("component-pool.json", ComponentKind::Pool),
    ] {
        let (c, original, encoded): (Component, _, _) = round_trip(name);
        assert_eq!(c.kind, kind);
        assert_json_eq(&original, &encoded, name);
        let keys: Vec<String> =
            serde_json::from_str::<indexmap::IndexMap<String, &RawValue>>(&encoded)
                .expect("object")
                .keys()
                .cloned()
                .collect();
        let mut sorted = keys.clone();
        sorted.sort();
        assert_eq!(keys, sorted, "{name}: keys not sorted");
    }
}

#[test]
fn timeline_records_all_decode() {
    // Every znode version the Python launcher wrote during one request's life.
    let text = std::fs::read_to_string(fixture_dir().join("timeline.jsonl")).expect("timeline");
    let mut nodes = 0;
    let mut requests = 0;
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let rec: BTreeMap<String, Box<RawValue>> = serde_json::from_str(line).expect("line");
        let path: String = serde_json::from_str(rec["path"].get()).expect("path");
        let data = rec["data"].get();
        if data == "null" {
            continue;
        }
        if path.starts_with("/nodepool/nodes/") && path.matches('/').count() == 3 {
            let n = Node::from_json(data.as_bytes()).unwrap_or_else(|e| panic!("{path}: {e}"));
            assert_json_eq(data, &String::from_utf8(n.to_json()).expect("utf-8"), &path);
            nodes += 1;
        } else if path.starts_with("/nodepool/requests/") {
            NodeRequest::from_json(data.as_bytes()).unwrap_or_else(|e| panic!("{path}: {e}"));
            requests += 1;
        } else if path.starts_with("/nodepool/components/") && path.matches('/').count() == 4 {
            Component::from_json(data.as_bytes()).unwrap_or_else(|e| panic!("{path}: {e}"));
        }
    }
    assert!(nodes >= 5, "timeline has node versions");
    assert!(requests >= 3, "timeline has request versions");
}

#[test]
fn malformed_records_are_errors_not_panics() {
    for bad in [
        &b""[..],
        b"not json",
        b"[]",
        b"{\"state\": \"exploded\"}",
        b"{\"state_time\": 1}",
        b"{\"state\": \"ready\", \"type\": 5}",
    ] {
        assert!(
            Node::from_json(bad).is_err(),
            "{:?}",
            String::from_utf8_lossy(bad)
        );
    }
    assert!(NodeRequest::from_json(b"{\"state\": 3}").is_err());
}

#[test]
fn legacy_and_lenient_node_fields() {
    let n = Node::from_json(
        br#"{"state": "ready", "state_time": "12.5", "type": "old-label", "hold_expiration": "soon",
            "connection_port": "secret-ish", "ssh_port": 22}"#,
    )
    .expect("decodes");
    assert_eq!(n.node_type, vec!["old-label".to_string()]);
    assert_eq!(n.state_time, 12.5);
    assert_eq!(n.hold_expiration, Some(0));
    assert_eq!(n.port().number(), None);
}
