//! The listings shared by the `nodepool` CLI and the launcher's web app:
//! rows built from store data, rendered as a PrettyTable-style text table
//! or as JSON.
//!
//! This is Python Nodepool's `status.py` in Rust: each listing is a list
//! of objects keyed like the web app's JSON (reference §7.1) plus a header
//! table mapping those keys to column titles. The CLI picks columns
//! (`list` shows 9 of the 21 node columns unless `--detail`), the web app
//! takes `?fields=`. Keeping both on one module is what guarantees that
//! `nodepool list --json` and `GET /node-list` agree key for key.
//!
//! Rendering rules (Python's `_to_pretty_table`): left aligned; `age` and
//! `*_age` columns holding an epoch integer are shown as `DD:HH:MM:SS`
//! (node ages are already formatted strings); lists are comma-joined;
//! null is an empty cell; booleans print as Python does (`True`/`False`);
//! nested JSON (`user_data`, `driver_data`) prints as its stored JSON text
//! (Python prints a dict's repr; JSON is what the record holds and what a
//! reader can paste).

use std::collections::{BTreeMap, BTreeSet};

use nodepool_core::model::{Component, Json, Port, RequestState, format_age};
use nodepool_core::store::{ImageState, Malformed, NodeRecord, RequestRecord, Store, StoreError};
use serde::Serialize;
use serde::ser::{SerializeMap, SerializeSeq, Serializer};

/// One value of a listing: what a JSON object holds for a key.
#[derive(Clone, Debug, PartialEq)]
pub enum Cell {
    /// JSON null; an empty table cell.
    Null,
    /// A string.
    Text(String),
    /// An integer (epoch seconds for build and upload ages).
    Int(i64),
    /// A boolean, shown `True`/`False` in tables as Python does.
    Bool(bool),
    /// A list of strings, comma-joined in tables.
    List(Vec<String>),
    /// Opaque JSON kept as its exact text (`user_data`, `driver_data`).
    Raw(Json),
}

impl Cell {
    /// A string, or null when absent.
    pub fn opt(s: Option<&str>) -> Cell {
        s.map_or(Cell::Null, |s| Cell::Text(s.to_owned()))
    }

    fn text(&self) -> String {
        match self {
            Cell::Null => String::new(),
            Cell::Text(s) => s.clone(),
            Cell::Int(i) => i.to_string(),
            Cell::Bool(true) => "True".into(),
            Cell::Bool(false) => "False".into(),
            Cell::List(l) => l.join(","),
            Cell::Raw(j) if j.is_null() => String::new(),
            Cell::Raw(j) => j.as_text().to_owned(),
        }
    }
}

impl Serialize for Cell {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Cell::Null => s.serialize_none(),
            Cell::Text(t) => s.serialize_str(t),
            Cell::Int(i) => s.serialize_i64(*i),
            Cell::Bool(b) => s.serialize_bool(*b),
            Cell::List(l) => l.serialize(s),
            Cell::Raw(j) => j.serialize(s),
        }
    }
}

/// A column: the JSON key and the table title.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Column {
    /// JSON key and `?fields=` name.
    pub key: &'static str,
    /// Table header.
    pub title: &'static str,
}

const fn col(key: &'static str, title: &'static str) -> Column {
    Column { key, title }
}

/// `nodepool list --detail` and `/node-list`, in Nodepool's order.
pub const NODE_COLUMNS: &[Column] = &[
    col("id", "ID"),
    col("provider", "Provider"),
    col("label", "Label"),
    col("server_id", "Server ID"),
    col("public_ipv4", "Public IPv4"),
    col("ipv6", "IPv6"),
    col("state", "State"),
    col("age", "Age"),
    col("locked", "Locked"),
    col("pool", "Pool"),
    col("hostname", "Hostname"),
    col("private_ipv4", "Private IPv4"),
    col("AZ", "AZ"),
    col("username", "Username"),
    col("connection_port", "Port"),
    col("launcher", "Launcher"),
    col("allocated_to", "Allocated To"),
    col("hold_job", "Hold Job"),
    col("comment", "Comment"),
    col("user_data", "User Data"),
    col("driver_data", "Driver Data"),
];

/// The node columns `nodepool list` shows without `--detail`.
pub const NODE_BRIEF_FIELDS: &[&str] = &[
    "id",
    "provider",
    "label",
    "server_id",
    "public_ipv4",
    "ipv6",
    "state",
    "age",
    "locked",
];

/// `nodepool request-list` and `/request-list`: Python's columns, then
/// ours: for a waiting request, the providers that could serve it but are
/// unavailable (their API failing), why and for how long.
pub const REQUEST_COLUMNS: &[Column] = &[
    col("id", "Request ID"),
    col("relative_priority", "Priority"),
    col("state", "State"),
    col("requestor", "Requestor"),
    col("node_types", "Node Types"),
    col("nodes", "Nodes"),
    col("declined_by", "Declined By"),
    col("event_id", "Event ID"),
    col("unavailable_providers", "Unavailable Providers"),
];

/// `nodepool request-list --detail`: the request columns and why each
/// waiting request waits.
pub const REQUEST_DETAIL_COLUMNS: &[Column] = &[
    col("id", "Request ID"),
    col("relative_priority", "Priority"),
    col("state", "State"),
    col("requestor", "Requestor"),
    col("node_types", "Node Types"),
    col("nodes", "Nodes"),
    col("declined_by", "Declined By"),
    col("event_id", "Event ID"),
    col("unavailable_providers", "Unavailable Providers"),
    col("waiting_because", "Waiting Because"),
];

/// A request listing with the reason each request waits (by request id;
/// none for requests that do not wait) as its last column.
pub fn with_waiting_reasons(l: Listing, reasons: &BTreeMap<String, String>) -> Listing {
    debug_assert_eq!(
        &REQUEST_DETAIL_COLUMNS[..REQUEST_COLUMNS.len()],
        REQUEST_COLUMNS
    );
    let rows = l
        .rows
        .into_iter()
        .map(|mut row| {
            let why = match row.first() {
                Some(Cell::Text(id)) => reasons.get(id).cloned(),
                _ => None,
            };
            row.push(Cell::opt(why.as_deref()));
            row
        })
        .collect();
    Listing {
        columns: REQUEST_DETAIL_COLUMNS,
        rows,
        skipped: l.skipped,
    }
}

/// `nodepool image-list` and `/image-list`.
pub const IMAGE_COLUMNS: &[Column] = &[
    col("id", "Build ID"),
    col("upload_id", "Upload ID"),
    col("provider", "Provider"),
    col("image", "Image"),
    col("external_name", "Provider Image Name"),
    col("external_id", "Provider Image ID"),
    col("state", "State"),
    col("age", "Age"),
];

/// `nodepool dib-image-list` and `/dib-image-list`.
pub const DIB_IMAGE_COLUMNS: &[Column] = &[
    col("id", "ID"),
    col("image", "Image"),
    col("builder", "Builder"),
    col("formats", "Formats"),
    col("state", "State"),
    col("age", "Age"),
];

/// `nodepool image-status` and `/image-status`.
pub const IMAGE_STATUS_COLUMNS: &[Column] = &[
    col("image", "Image"),
    col("paused", "Paused"),
    col("build_request", "Build Request"),
    col("build_request_age", "Build Request Age"),
];

/// `nodepool label-list` and `/label-list`.
pub const LABEL_COLUMNS: &[Column] = &[col("label", "Label")];

/// `nodepool label-list --detail`.
pub const LABEL_DETAIL_COLUMNS: &[Column] = &[
    col("label", "Label"),
    col("min_ready", "Min Ready"),
    col("ready", "Ready"),
    col("short_because", "Short Because"),
];

/// `nodepool label-list --detail`: every configured label's min-ready
/// standing.
pub fn label_readiness(labels: &[nodepool_core::admin::LabelReadiness]) -> Listing {
    Listing {
        columns: LABEL_DETAIL_COLUMNS,
        rows: labels
            .iter()
            .map(|l| {
                vec![
                    Cell::Text(l.label.clone()),
                    Cell::Int(i64::from(l.min_ready)),
                    Cell::Int(i64::try_from(l.ready).unwrap_or(i64::MAX)),
                    Cell::opt(l.short_because.as_deref()),
                ]
            })
            .collect(),
        skipped: Vec::new(),
    }
}

/// `nodepool alien-list` (the columns of the old Nodepool's, seed 002).
pub const ALIEN_COLUMNS: &[Column] = &[
    col("provider", "Provider"),
    col("hostname", "Hostname"),
    col("server_id", "Server ID"),
    col("ip", "IP"),
];

/// `nodepool alien-image-list`.
pub const ALIEN_IMAGE_COLUMNS: &[Column] = &[
    col("provider", "Provider"),
    col("name", "Name"),
    col("image_id", "Image ID"),
];

/// `nodepool info`: the image table.
pub const INFO_IMAGE_COLUMNS: &[Column] = &[
    col("image", "Image Name"),
    col("build_id", "Build ID"),
    col("upload_ids", "Upload IDs"),
];

/// `nodepool info`: the node table.
pub const INFO_NODE_COLUMNS: &[Column] = &[col("id", "ID"), col("server_id", "Server ID")];

/// A listing: objects with the same keys, and how to title them.
///
/// Its JSON is the list of objects only (Python's web API returns a bare
/// list); the records it had to leave out are in `skipped`, which the CLI
/// prints as warnings and the web app sends in the `X-Nodepool-Skipped`
/// header.
#[derive(Clone, Debug, PartialEq)]
pub struct Listing {
    /// Every column, in order.
    pub columns: &'static [Column],
    /// One value per column for each row.
    pub rows: Vec<Vec<Cell>>,
    /// Records that could not be read and are not in `rows`.
    pub skipped: Vec<Malformed>,
}

struct Row<'a>(&'a [Column], &'a [Cell]);

impl Serialize for Row<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(Some(self.0.len()))?;
        for (c, v) in self.0.iter().zip(self.1) {
            m.serialize_entry(c.key, v)?;
        }
        m.end()
    }
}

impl Serialize for Listing {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut seq = s.serialize_seq(Some(self.rows.len()))?;
        for r in &self.rows {
            seq.serialize_element(&Row(self.columns, r))?;
        }
        seq.end()
    }
}

impl Listing {
    /// An empty listing with these columns.
    pub fn new(columns: &'static [Column]) -> Self {
        Listing {
            columns,
            rows: Vec::new(),
            skipped: Vec::new(),
        }
    }

    /// The JSON text: a list of objects keyed by column key, every column
    /// included (`?fields=` applies to tables only, as in Nodepool).
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_else(|_| "[]".into())
    }

    /// The value of `key` in row `i`.
    pub fn get(&self, i: usize, key: &str) -> Option<&Cell> {
        let c = self.columns.iter().position(|c| c.key == key)?;
        self.rows.get(i)?.get(c)
    }

    /// The table, showing `fields` (all columns when `None`; unknown names
    /// are ignored, as Nodepool does), ages relative to `now`. No trailing
    /// newline.
    pub fn to_table(&self, fields: Option<&[&str]>, now: f64) -> String {
        let shown: Vec<usize> = (0..self.columns.len())
            .filter(|&i| fields.is_none_or(|f| f.contains(&self.columns[i].key)))
            .collect();
        let headers: Vec<&str> = shown.iter().map(|&i| self.columns[i].title).collect();
        let rows: Vec<Vec<String>> = self
            .rows
            .iter()
            .map(|r| {
                shown
                    .iter()
                    .map(|&i| render(self.columns[i].key, &r[i], now))
                    .collect()
            })
            .collect();
        pretty_table(&headers, &rows)
    }
}

/// A table cell as Nodepool renders it: epoch integers in `age`/`*_age`
/// columns become `DD:HH:MM:SS`.
fn render(key: &str, cell: &Cell, now: f64) -> String {
    if (key == "age" || key.ends_with("_age"))
        && let Cell::Int(t) = cell
    {
        return format_age(now - *t as f64);
    }
    cell.text()
}

/// Renders a PrettyTable (0.7) table, every column left aligned, one space
/// of padding; cells with newlines span several lines. An empty table is
/// its header between rules, as PrettyTable prints it. No trailing newline.
pub fn pretty_table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let width = |s: &str| s.lines().map(|l| l.chars().count()).max().unwrap_or(0);
    let mut widths: Vec<usize> = headers.iter().map(|h| width(h)).collect();
    for r in rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(width(c));
        }
    }
    let rule: String = {
        let mut s = String::from("+");
        for w in &widths {
            s.push_str(&"-".repeat(w + 2));
            s.push('+');
        }
        s
    };
    let mut out = String::new();
    let line = |cells: Vec<&str>, out: &mut String| {
        let parts: Vec<Vec<&str>> = cells
            .iter()
            .map(|c| {
                let l: Vec<&str> = c.split('\n').collect();
                if l.is_empty() { vec![""] } else { l }
            })
            .collect();
        let height = parts.iter().map(Vec::len).max().unwrap_or(1);
        for k in 0..height {
            out.push('|');
            for (p, w) in parts.iter().zip(&widths) {
                let text = p.get(k).copied().unwrap_or("");
                out.push(' ');
                out.push_str(text);
                out.push_str(&" ".repeat(w - text.chars().count()));
                out.push_str(" |");
            }
            out.push('\n');
        }
    };
    out.push_str(&rule);
    out.push('\n');
    line(headers.to_vec(), &mut out);
    out.push_str(&rule);
    out.push('\n');
    for r in rows {
        line(r.iter().map(String::as_str).collect(), &mut out);
    }
    out.push_str(&rule);
    out
}

/// Nodepool's rule for the port column: an integer (or a string holding
/// one) is shown; anything else may carry credentials (the Kubernetes
/// driver put a service account there) and is shown as `redacted`.
fn port_cell(port: Option<&Port>) -> Cell {
    match port {
        Some(Port::Number(n)) => Cell::Int(*n),
        Some(Port::Other(serde_json::Value::String(s))) if s.trim().parse::<i64>().is_ok() => {
            Cell::Text(s.clone())
        }
        Some(Port::Other(serde_json::Value::Number(n))) if n.as_f64().is_some() => {
            Cell::Text(n.to_string())
        }
        _ => Cell::Text("redacted".into()),
    }
}

fn raw(j: Option<&Json>) -> Cell {
    match j {
        Some(j) if !j.is_null() => Cell::Raw(j.clone()),
        _ => Cell::Null,
    }
}

/// Nodes (all, or the one `node_id`), ages relative to `now`.
pub fn node_list(nodes: &[NodeRecord], node_id: Option<&str>, now: f64) -> Listing {
    let mut l = Listing::new(NODE_COLUMNS);
    for r in nodes {
        if node_id.is_some_and(|id| id != r.id) {
            continue;
        }
        let n = &r.node;
        l.rows.push(vec![
            Cell::Text(r.id.clone()),
            Cell::Text(n.provider.clone()),
            Cell::List(n.node_type.clone()),
            Cell::opt(n.external_id.as_deref()),
            Cell::opt(n.public_ipv4.as_deref()),
            Cell::opt(n.public_ipv6.as_deref()),
            Cell::Text(n.state.as_str().to_owned()),
            Cell::Text(format_age(now - n.state_time)),
            Cell::Text(if r.locked { "locked" } else { "unlocked" }.into()),
            Cell::Text(n.pool.clone()),
            Cell::opt(n.hostname.as_deref()),
            Cell::opt(n.private_ipv4.as_deref()),
            Cell::opt(n.az.as_deref()),
            Cell::opt(n.username.as_deref()),
            port_cell(n.connection_port.as_ref()),
            Cell::opt(n.launcher.as_deref()),
            Cell::opt(n.allocated_to.as_deref()),
            Cell::opt(n.hold_job.as_deref()),
            Cell::opt(n.comment.as_deref()),
            raw(n.user_data.as_ref()),
            raw(n.driver_data.as_ref()),
        ]);
    }
    l
}

/// Node requests; `pools` (the registered pool components) tell which
/// providers a waiting request could go to are unavailable, ages relative
/// to `now`.
pub fn request_list(
    requests: &[RequestRecord],
    pools: &[(String, Component)],
    now: f64,
) -> Listing {
    let mut l = Listing::new(REQUEST_COLUMNS);
    for r in requests {
        let q = &r.request;
        let waiting = matches!(q.state, RequestState::Requested | RequestState::Pending);
        // Per provider: the earliest outage start among its pools that
        // could take the request, and that pool's reason.
        let mut down: BTreeMap<&str, (f64, &str)> = BTreeMap::new();
        for (_, c) in pools.iter().filter(|_| waiting) {
            let (Some(provider), Some(u), Some(labels)) = (
                &c.provider_name,
                &c.provider_unavailable,
                &c.supported_labels,
            ) else {
                continue;
            };
            let serves = q.node_types.iter().all(|t| labels.contains(t));
            let declined = c.id.as_ref().is_some_and(|id| q.declined_by.contains(id));
            if serves && !declined {
                let e = down.entry(provider).or_insert((u.since, &u.reason));
                if u.since < e.0 {
                    *e = (u.since, &u.reason);
                }
            }
        }
        let unavailable = down
            .into_iter()
            .map(|(p, (since, why))| {
                format!("{p}: unavailable for {}: {why}", format_age(now - since))
            })
            .collect();
        l.rows.push(vec![
            Cell::Text(r.id.clone()),
            Cell::Int(q.relative_priority),
            Cell::Text(q.state.as_str().to_owned()),
            Cell::opt(q.requestor.as_deref()),
            Cell::List(q.node_types.clone()),
            Cell::List(q.nodes.clone()),
            Cell::List(q.declined_by.clone()),
            Cell::opt(q.event_id.as_deref()),
            Cell::List(unavailable),
        ]);
    }
    l
}

/// Image uploads.
pub fn image_list(images: &ImageState) -> Listing {
    let mut l = Listing::new(IMAGE_COLUMNS);
    for u in &images.uploads {
        l.rows.push(vec![
            Cell::Text(u.build_id.clone()),
            Cell::Text(u.id.clone()),
            Cell::Text(u.provider.clone()),
            Cell::Text(u.image.clone()),
            Cell::opt(u.upload.external_name.as_deref()),
            Cell::opt(u.upload.external_id.as_deref()),
            Cell::Text(u.upload.state.as_str().to_owned()),
            Cell::Int(u.upload.state_time as i64),
        ]);
    }
    l
}

/// Diskimage builds; the state of a paused image's builds is `paused`.
pub fn dib_image_list(images: &ImageState) -> Listing {
    let mut l = Listing::new(DIB_IMAGE_COLUMNS);
    for b in &images.builds {
        let state = if images.paused.contains(&b.image) {
            "paused"
        } else {
            b.build.state.as_str()
        };
        l.rows.push(vec![
            Cell::Text(format!("{}-{}", b.image, b.id)),
            Cell::Text(b.image.clone()),
            Cell::opt(b.build.builder.as_deref()),
            Cell::List(b.build.formats.clone()),
            Cell::Text(state.to_owned()),
            Cell::Int(b.build.state_time as i64),
        ]);
    }
    l
}

/// Per image: paused, and the manual build request (`pending`, or
/// `building` once a builder holds the image's build lock).
pub fn image_status(images: &ImageState) -> Listing {
    let mut l = Listing::new(IMAGE_STATUS_COLUMNS);
    for image in &images.images {
        let (request, age) = match images.build_requests.get(image) {
            Some(t) => {
                let what = if images.build_locked.contains(image) {
                    "building"
                } else {
                    "pending"
                };
                (Cell::Text(what.into()), Cell::Int(*t as i64))
            }
            None => (Cell::Null, Cell::Null),
        };
        l.rows.push(vec![
            Cell::Text(image.clone()),
            Cell::Bool(images.paused.contains(image)),
            request,
            age,
        ]);
    }
    l
}

/// Labels some registered pool supports, sorted.
pub fn label_list(pools: &[(String, Component)]) -> Listing {
    let labels: BTreeSet<&str> = pools
        .iter()
        .flat_map(|(_, c)| c.supported_labels.iter().flatten())
        .map(String::as_str)
        .collect();
    Listing {
        columns: LABEL_COLUMNS,
        rows: labels
            .into_iter()
            .map(|l| vec![Cell::Text(l.to_owned())])
            .collect(),
        skipped: Vec::new(),
    }
}

/// The listings both the CLI and the web app serve.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    /// Nodes, or one node.
    Nodes {
        /// Only this node.
        node_id: Option<String>,
    },
    /// Node requests.
    Requests,
    /// Image uploads.
    Images,
    /// Diskimage builds.
    DibImages,
    /// Image pause and build-request status.
    ImageStatus,
    /// Labels of registered pools.
    Labels,
}

impl Source {
    /// The web app path of this listing.
    pub fn path(&self) -> &'static str {
        match self {
            Source::Nodes { .. } => "/node-list",
            Source::Requests => "/request-list",
            Source::Images => "/image-list",
            Source::DibImages => "/dib-image-list",
            Source::ImageStatus => "/image-status",
            Source::Labels => "/label-list",
        }
    }

    /// Reads the listing from the store; ages relative to `now`. Records
    /// that cannot be read are left out and listed in
    /// [`Listing::skipped`] (for `/node-list?node_id=`, only the node asked
    /// for).
    pub async fn fetch(&self, store: &Store, now: f64) -> Result<Listing, StoreError> {
        let pools = || store.list_components(nodepool_core::model::ComponentKind::Pool);
        Ok(match self {
            Source::Nodes { node_id } => {
                let nodes = store.list_nodes().await?;
                let mut l = node_list(&nodes.records, node_id.as_deref(), now);
                l.skipped = nodes.malformed;
                if let Some(id) = node_id {
                    l.skipped
                        .retain(|m| m.path.rsplit('/').next() == Some(id.as_str()));
                }
                l
            }
            Source::Requests => {
                let requests = store.list_requests().await?;
                let pools = pools().await?;
                let mut l = request_list(&requests.records, &pools.records, now);
                l.skipped = requests.malformed;
                l.skipped.extend(pools.malformed);
                l
            }
            Source::Images | Source::DibImages | Source::ImageStatus => {
                let images = store.image_state().await?;
                let mut l = match self {
                    Source::Images => image_list(&images),
                    Source::DibImages => dib_image_list(&images),
                    _ => image_status(&images),
                };
                l.skipped = images.malformed;
                l
            }
            Source::Labels => {
                let pools = pools().await?;
                let mut l = label_list(&pools.records);
                l.skipped = pools.malformed;
                l
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_look_like_prettytable() {
        let t = pretty_table(
            &["A", "Bee"],
            &[
                vec!["x".into(), String::new()],
                vec!["longer value".into(), "é ünï".into()],
                vec!["multi\nline".into(), "3".into()],
            ],
        );
        assert_eq!(
            t,
            "+--------------+-------+\n\
             | A            | Bee   |\n\
             +--------------+-------+\n\
             | x            |       |\n\
             | longer value | é ünï |\n\
             | multi        | 3     |\n\
             | line         |       |\n\
             +--------------+-------+"
        );
        assert_eq!(
            pretty_table(&["Provider", "IP"], &[]),
            "+----------+----+\n| Provider | IP |\n+----------+----+\n+----------+----+"
        );
    }

    #[test]
    fn ages_lists_nulls_and_booleans_render_like_nodepool() {
        let l = Listing {
            columns: IMAGE_STATUS_COLUMNS,
            rows: vec![
                vec![
                    Cell::Text("a".into()),
                    Cell::Bool(true),
                    Cell::Text("pending".into()),
                    Cell::Int(1000),
                ],
                vec![
                    Cell::Text("b".into()),
                    Cell::Bool(false),
                    Cell::Null,
                    Cell::Null,
                ],
            ],
            skipped: Vec::new(),
        };
        let t = l.to_table(None, 1000.0 + 86_400.0 + 61.0);
        assert!(
            t.contains("| a     | True   | pending       | 01:00:01:01       |"),
            "{t}"
        );
        assert!(
            t.contains("| b     | False  |               |                   |"),
            "{t}"
        );
        assert_eq!(
            l.to_json(),
            r#"[{"image":"a","paused":true,"build_request":"pending","build_request_age":1000},{"image":"b","paused":false,"build_request":null,"build_request_age":null}]"#
        );
        let only = l.to_table(Some(&["image", "nonsense"]), 0.0);
        assert_eq!(
            only,
            "+-------+\n| Image |\n+-------+\n| a     |\n| b     |\n+-------+"
        );
    }

    #[test]
    fn ports_that_are_not_integers_are_redacted() {
        assert_eq!(port_cell(Some(&Port::Number(22))), Cell::Int(22));
        assert_eq!(
            port_cell(Some(&Port::Other(serde_json::json!("2022")))),
            Cell::Text("2022".into())
        );
        assert_eq!(
            port_cell(Some(&Port::Other(serde_json::json!({"token": "s3cret"})))),
            Cell::Text("redacted".into())
        );
        assert_eq!(port_cell(None), Cell::Text("redacted".into()));
    }
}
