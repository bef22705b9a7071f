//! The launcher's live dashboard: `GET /dashboard` is one self-contained
//! HTML page (no build step, no external URLs) that polls
//! `GET /dashboard.json` every two seconds and redraws in place.
//!
//! The JSON document is built from one snapshot of the store at most every
//! [`REFRESH`], however many pages poll: nodes counted by state, provider
//! and label; the waiting requests with their age and the one line the
//! planner gives for each ([`explain_waiting`]); builds and uploads with
//! age and state; each pool's quota use; node counts by state over the
//! last hour (one sample per [`SAMPLE_EVERY`], [`HISTORY`] kept, then the
//! counts of now); and the
//! last [`EVENTS`] node state changes noticed between snapshots.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use nodepool_core::config::Config;
use nodepool_core::launcher::LauncherStatus;
use nodepool_core::model::{CORES, INSTANCES, NodeState, RAM};
use nodepool_core::planner::Snapshot;
use nodepool_core::planner::explain::{explain_waiting, pool_usage};
use nodepool_core::store::{Store, StoreError};
use serde_json::{Value, json};

/// The page, embedded in the binary.
pub const PAGE: &str = include_str!("dashboard.html");

/// How long one built document is served before the store is read again.
pub const REFRESH: Duration = Duration::from_secs(2);

/// Seconds between two samples of the history.
pub const SAMPLE_EVERY: f64 = 10.0;

/// Samples kept: one hour at [`SAMPLE_EVERY`].
pub const HISTORY: usize = 360;

/// Node state changes kept for the events strip.
pub const EVENTS: usize = 50;

/// The dashboard's memory between snapshots.
#[derive(Default)]
pub struct Dashboard {
    inner: tokio::sync::Mutex<Memory>,
}

#[derive(Default)]
struct Memory {
    /// The last document and when (epoch s) it was built.
    cached: Option<(f64, Arc<String>)>,
    /// Node counts by state, oldest first.
    history: VecDeque<(f64, BTreeMap<String, usize>)>,
    /// Every node's state at the last snapshot; `None` before the first.
    last_states: Option<HashMap<String, NodeState>>,
    /// Recent node state changes, oldest first.
    events: VecDeque<Value>,
}

impl Dashboard {
    /// The JSON document as of at most [`REFRESH`] ago; reads the store
    /// when it is older.
    pub async fn document(
        &self,
        store: &Store,
        config: &Config,
        status: &LauncherStatus,
        now: f64,
    ) -> Result<Arc<String>, StoreError> {
        // One poller reads the store; the others wait for its document.
        let mut memory = self.inner.lock().await;
        if let Some((at, doc)) = &memory.cached
            && now - at < REFRESH.as_secs_f64()
            && now >= *at
        {
            return Ok(doc.clone());
        }
        let mut snapshot = nodepool_core::launcher::read_snapshot(store).await?;
        snapshot.providers = status.provider_views();
        let doc = Arc::new(memory.observe(&snapshot, config, now).to_string());
        memory.cached = Some((now, doc.clone()));
        Ok(doc)
    }
}

impl Memory {
    /// Records what changed since the last snapshot and builds the document.
    fn observe(&mut self, s: &Snapshot, config: &Config, now: f64) -> Value {
        let mut by_state: BTreeMap<String, usize> = BTreeMap::new();
        let mut cells: BTreeMap<(String, String, String), usize> = BTreeMap::new();
        let mut states = HashMap::with_capacity(s.nodes.len());
        for n in &s.nodes {
            let state = n.node.state.as_str().to_owned();
            *by_state.entry(state.clone()).or_default() += 1;
            let label = n.node.node_type.join(",");
            *cells
                .entry((state, n.node.provider.clone(), label))
                .or_default() += 1;
            states.insert(n.id.clone(), n.node.state);
        }
        if let Some(before) = self.last_states.take() {
            for n in &s.nodes {
                let change = match before.get(&n.id) {
                    None => format!("new, {}", n.node.state.as_str()),
                    Some(old) if *old != n.node.state => {
                        format!("{} → {}", old.as_str(), n.node.state.as_str())
                    }
                    Some(_) => continue,
                };
                self.push_event(now, &n.id, &n.node.node_type.join(","), change);
            }
            let mut gone: Vec<&String> = before
                .keys()
                .filter(|id| !states.contains_key(*id))
                .collect();
            gone.sort();
            for id in gone {
                self.push_event(now, id, "", "gone".into());
            }
        }
        self.last_states = Some(states);
        if self
            .history
            .back()
            .is_none_or(|(at, _)| now - at >= SAMPLE_EVERY || now < *at)
        {
            self.history.push_back((now, by_state.clone()));
            while self.history.len() > HISTORY {
                self.history.pop_front();
            }
        }

        let reasons: HashMap<String, String> =
            explain_waiting(s, config, now).into_iter().collect();
        let requests: Vec<Value> = s
            .requests
            .iter()
            .filter_map(|r| {
                let reason = reasons.get(&r.id)?;
                Some(json!({
                    "id": r.id,
                    "state": r.request.state.as_str(),
                    "labels": r.request.node_types,
                    "requestor": r.request.requestor,
                    "age": (now - r.request.state_time).max(0.0),
                    "reason": reason,
                }))
            })
            .collect();
        let builds: Vec<Value> = s
            .images
            .builds
            .iter()
            .map(|b| {
                json!({
                    "image": b.image,
                    "id": b.id,
                    "state": b.build.state.as_str(),
                    "age": (now - b.build.state_time).max(0.0),
                })
            })
            .collect();
        let uploads: Vec<Value> = s
            .images
            .uploads
            .iter()
            .map(|u| {
                json!({
                    "image": u.image,
                    "build": u.build_id,
                    "provider": u.provider,
                    "id": u.id,
                    "state": u.upload.state.as_str(),
                    "age": (now - u.upload.state_time).max(0.0),
                })
            })
            .collect();
        let quota: Vec<Value> = pool_usage(s, config)
            .iter()
            .map(|u| {
                let mut row = json!({"provider": u.pool.provider, "pool": u.pool.pool});
                for (key, name) in [("servers", INSTANCES), ("cores", CORES), ("ram", RAM)] {
                    row[key] = json!({"used": u.used.get(name), "max": u.limits.get(name)});
                }
                row
            })
            .collect();
        let nodes: Vec<Value> = cells
            .into_iter()
            .map(|((state, provider, label), count)| {
                json!({"state": state, "provider": provider, "label": label, "count": count})
            })
            .collect();
        // The samples, then the counts of now: the chart ends at the
        // present however long ago the last sample was.
        let mut history: Vec<Value> = self
            .history
            .iter()
            .map(|(at, counts)| json!({"at": at, "counts": counts}))
            .collect();
        if self.history.back().is_some_and(|(at, _)| *at < now) {
            history.push(json!({"at": now, "counts": &by_state}));
        }
        json!({
            "generated": now,
            "totals": by_state,
            "nodes": nodes,
            "requests": requests,
            "builds": builds,
            "uploads": uploads,
            "quota": quota,
            "history": history,
            "events": self.events.iter().rev().collect::<Vec<_>>(),
        })
    }

    fn push_event(&mut self, at: f64, node: &str, label: &str, change: String) {
        self.events
            .push_back(json!({"at": at, "node": node, "label": label, "change": change}));
        while self.events.len() > EVENTS {
            self.events.pop_front();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nodepool_core::model::Node;
    use nodepool_core::store::NodeRecord;

    const CONFIG: &str = "
labels: [{name: small}]
providers:
  - name: sim
    driver: simulated
    cloud-images: [{name: debian}]
    pools:
      - name: main
        max-servers: 10
        labels: [{name: small, cloud-image: debian, flavor-name: Fake Flavor}]
";

    fn node(id: &str, state: NodeState) -> NodeRecord {
        NodeRecord {
            id: id.into(),
            node: Arc::new(Node::new(state, 0.0, "sim", "main", vec!["small".into()])),
            version: 0,
            locked: false,
        }
    }

    /// Events name each change between two snapshots (none for the
    /// first); the history takes one sample per SAMPLE_EVERY and ends
    /// with now; both stay within their caps however long it runs.
    #[test]
    fn events_and_history_follow_the_snapshots_within_their_caps() {
        let config = Config::from_yaml(CONFIG).expect("config");
        let mut memory = Memory::default();
        let mut s = Snapshot {
            nodes: vec![node("1", NodeState::Ready), node("3", NodeState::Ready)],
            ..Snapshot::default()
        };
        let doc = memory.observe(&s, &config, 1000.0);
        assert_eq!(doc["events"], json!([]));
        assert_eq!(doc["totals"], json!({"ready": 2}));
        assert_eq!(
            doc["quota"][0]["servers"],
            json!({"used": 2, "max": 10}),
            "{doc}"
        );

        s.nodes = vec![node("1", NodeState::Hold), node("2", NodeState::Building)];
        let doc = memory.observe(&s, &config, 1005.0);
        let changes: Vec<(&str, &str)> = doc["events"]
            .as_array()
            .expect("events")
            .iter()
            .map(|e| {
                (
                    e["node"].as_str().unwrap_or_default(),
                    e["change"].as_str().unwrap_or_default(),
                )
            })
            .collect();
        assert_eq!(
            changes,
            [("3", "gone"), ("2", "new, building"), ("1", "ready → hold")],
            "newest first"
        );
        let history = doc["history"].as_array().expect("history");
        assert_eq!(history.len(), 2, "the sample at 1000 s, then now: {doc}");
        assert_eq!(history[0]["counts"], json!({"ready": 2}));
        assert_eq!(history[1]["counts"], json!({"building": 1, "hold": 1}));
        assert_eq!(
            doc["nodes"],
            json!([
                {"state": "building", "provider": "sim", "label": "small", "count": 1},
                {"state": "hold", "provider": "sim", "label": "small", "count": 1},
            ])
        );

        let mut now = 1005.0;
        for i in 0..(2 * HISTORY) {
            now += SAMPLE_EVERY;
            let state = if i % 2 == 0 {
                NodeState::Ready
            } else {
                NodeState::Hold
            };
            s.nodes = vec![node("1", state)];
            memory.observe(&s, &config, now);
        }
        assert_eq!(memory.history.len(), HISTORY);
        assert_eq!(memory.events.len(), EVENTS);
        assert_eq!(memory.history.back().map(|(at, _)| *at), Some(now));
    }
}
