//! Metrics, two ways: statsd lines with Nodepool's names (reference §7.2),
//! sent when `STATSD_HOST` is set, and labelled Prometheus families for
//! `/metrics` (`nodepool_nodes{state,provider,label}`, histograms of launch
//! and boot times, ...), always kept in memory.
//!
//! The statsd names are Python Nodepool's, component by component; a
//! Prometheus family carries the same information as labels instead of
//! name components, so one query sums over providers or labels. The
//! `*_as` methods send a statsd name and record its labelled family in one
//! call. A statsd name sent without a family (`incr`, `gauge`, `timing`)
//! still reaches `/metrics`, flattened (`nodepool.a.b` → `nodepool_a_b`),
//! so nothing sent is hidden; `nodepool.provider.<p>.leaked.<kind>`
//! counters are recognised and labelled whichever method sent them.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::UdpSocket;
use std::sync::Mutex;
use std::time::Duration;

/// What a Prometheus family is.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum FamilyKind {
    /// A value that goes up and down.
    Gauge,
    /// A count that only goes up (exposed with a `_total` suffix).
    Counter,
    /// Observations in seconds, counted into these bucket upper bounds.
    Histogram(&'static [f64]),
}

/// A labelled Prometheus family.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Family {
    /// Name without the counter's `_total` suffix.
    pub name: &'static str,
    /// The `# HELP` text.
    pub help: &'static str,
    /// Its type.
    pub kind: FamilyKind,
}

/// Bucket bounds (seconds) for launches and boots: seconds to an hour.
const LAUNCH_BUCKETS: &[f64] = &[
    1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0, 3600.0,
];
/// Bucket bounds (seconds) for image builds and uploads: a minute to hours.
const IMAGE_BUCKETS: &[f64] = &[
    10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0, 3600.0, 7200.0, 10800.0, 21600.0,
];

/// The families Nodepool exposes. Their labels are documented in
/// `docs/metrics.md`.
pub mod families {
    use super::{Family, FamilyKind, IMAGE_BUCKETS, LAUNCH_BUCKETS};

    /// Nodes by `state`, `provider`, `label` (stats election winner only).
    pub const NODES: Family = Family {
        name: "nodepool_nodes",
        help: "Nodes in the store by state, provider and label (sent by the stats election winner only).",
        kind: FamilyKind::Gauge,
    };
    /// Node requests by `state` (stats election winner only).
    pub const REQUESTS: Family = Family {
        name: "nodepool_requests",
        help: "Node requests in the store by state (sent by the stats election winner only).",
        kind: FamilyKind::Gauge,
    };
    /// Whether this launcher won the stats election (1) or not (0).
    pub const STATS_LEADER: Family = Family {
        name: "nodepool_stats_leader",
        help: "1 while this launcher holds the stats election and reports the global gauges.",
        kind: FamilyKind::Gauge,
    };
    /// Launches by `provider` and `result`, with their duration.
    pub const LAUNCH: Family = Family {
        name: "nodepool_launch_seconds",
        help: "Time from the start of a launch to its end (ready or failed), by provider and result.",
        kind: FamilyKind::Histogram(LAUNCH_BUCKETS),
    };
    /// Server boots by `provider` and `label`: create call to active.
    pub const BOOT: Family = Family {
        name: "nodepool_boot_seconds",
        help: "Time from the server create call until the cloud reports it active, by provider and label.",
        kind: FamilyKind::Histogram(LAUNCH_BUCKETS),
    };
    /// Failed launch attempts (retried or not) by `provider`.
    pub const LAUNCH_ATTEMPTS_FAILED: Family = Family {
        name: "nodepool_launch_attempts_failed",
        help: "Launch attempts that failed, by provider (each may be retried).",
        kind: FamilyKind::Counter,
    };
    /// The sum of `max-servers` of a `provider`'s pools.
    pub const MAX_SERVERS: Family = Family {
        name: "nodepool_provider_max_servers",
        help: "Sum of max-servers over the provider's pools in this launcher's configuration.",
        kind: FamilyKind::Gauge,
    };
    /// Requests a pool could serve, by `provider`, `pool`.
    pub const ADDRESSABLE_REQUESTS: Family = Family {
        name: "nodepool_pool_addressable_requests",
        help: "Open node requests this launcher's pool could serve, by provider and pool.",
        kind: FamilyKind::Gauge,
    };
    /// Tenant resource limits by `tenant` and `resource`.
    pub const TENANT_LIMITS: Family = Family {
        name: "nodepool_tenant_limit",
        help: "Configured tenant resource limits, by tenant and resource.",
        kind: FamilyKind::Gauge,
    };
    /// Provider availability by `provider` (1 available, 0 not).
    pub const PROVIDER_HEALTH: Family = Family {
        name: "nodepool_provider_health",
        help: "1 while the provider's API answers, 0 while the launcher routes around it.",
        kind: FamilyKind::Gauge,
    };
    /// Times a `provider` was marked unavailable.
    pub const PROVIDER_OUTAGES: Family = Family {
        name: "nodepool_provider_outages",
        help: "Times the provider was marked unavailable because its API kept failing.",
        kind: FamilyKind::Counter,
    };
    /// Leaked cloud resources deleted, by `provider` and `kind`.
    pub const LEAKED: Family = Family {
        name: "nodepool_leaked",
        help: "Leaked cloud resources found and deleted, by provider and kind (instances, floatingips, ports, images).",
        kind: FamilyKind::Counter,
    };
    /// Servers a launch left behind and deleted, by `provider`.
    pub const ORPHANS_DELETED: Family = Family {
        name: "nodepool_orphans_deleted",
        help: "Servers whose launch ended without a node record to keep them, deleted at once, by provider.",
        kind: FamilyKind::Counter,
    };
    /// Whether the state store session is connected (1) or not (0).
    pub const STORE_CONNECTED: Family = Family {
        name: "nodepool_zk_connected",
        help: "1 while the state store (ZooKeeper, SQLite) session is connected.",
        kind: FamilyKind::Gauge,
    };
    /// The state store client's queues by `queue`.
    pub const STORE_QUEUE: Family = Family {
        name: "nodepool_zk_queue",
        help: "State store client queue lengths: connection (requests in flight), event (changes being read into the cache), playback (changes waiting for subscribers), own_writes (the client's writes whose changes the cache has not taken yet).",
        kind: FamilyKind::Gauge,
    };
    /// Records in the state store client's cache.
    pub const STORE_CACHED: Family = Family {
        name: "nodepool_zk_cached_records",
        help: "Records in the state store client's local cache.",
        kind: FamilyKind::Gauge,
    };
    /// Requests the state store client sent, by `op` (write, read), and
    /// watch notifications it received (`op="watch_event"`).
    pub const STORE_OPERATIONS: Family = Family {
        name: "nodepool_zk_operations",
        help: "State store client traffic since it opened: write and read requests sent, watch events received (ZooKeeper; 0 on SQLite).",
        kind: FamilyKind::Counter,
    };
    /// Payload bytes of the state store client, by `direction`.
    pub const STORE_BYTES: Family = Family {
        name: "nodepool_zk_bytes",
        help: "State store client payload bytes (paths and record data, not framing) sent and received since it opened (ZooKeeper; 0 on SQLite).",
        kind: FamilyKind::Counter,
    };
    /// Image builds by `image` and `status`, with their duration.
    pub const IMAGE_BUILD: Family = Family {
        name: "nodepool_image_build_seconds",
        help: "Duration of diskimage-builder runs, by image and status (success, failure).",
        kind: FamilyKind::Histogram(IMAGE_BUCKETS),
    };
    /// Exit status of an `image`'s latest build (0 = success).
    pub const IMAGE_BUILD_RC: Family = Family {
        name: "nodepool_image_build_status_rc",
        help: "Exit status of the image's latest build on this builder (0 success).",
        kind: FamilyKind::Gauge,
    };
    /// Epoch seconds an `image`'s latest build ended.
    pub const IMAGE_BUILD_LAST: Family = Family {
        name: "nodepool_image_build_last_timestamp_seconds",
        help: "When the image's latest build on this builder ended (epoch seconds).",
        kind: FamilyKind::Gauge,
    };
    /// Bytes of an `image`'s latest build in `format`.
    pub const IMAGE_SIZE: Family = Family {
        name: "nodepool_image_build_size_bytes",
        help: "Size on disk of the image's latest build, by image and format.",
        kind: FamilyKind::Gauge,
    };
    /// Uploads by `image`, `provider` and `status`, with their duration.
    pub const IMAGE_UPLOAD: Family = Family {
        name: "nodepool_image_upload_seconds",
        help: "Duration of image uploads, by image, provider and status (success, failure).",
        kind: FamilyKind::Histogram(IMAGE_BUCKETS),
    };
    /// Boot tests of new uploads (`validate`) by `image`, `provider` and
    /// `status` (success, failure), with their duration (boot to deletion).
    pub const IMAGE_VALIDATION: Family = Family {
        name: "nodepool_image_validation_seconds",
        help: "Duration of boot tests of new uploads (validate), by image, provider and status (success, failure).",
        kind: FamilyKind::Histogram(LAUNCH_BUCKETS),
    };
    /// Image build requests waiting, by `image`.
    pub const IMAGE_BUILD_REQUESTS: Family = Family {
        name: "nodepool_image_build_requests",
        help: "Manual build requests (nodepool image-build) waiting, by image.",
        kind: FamilyKind::Gauge,
    };
    /// What the builder does with an `image` (0 idle, 1 building, 3 paused).
    pub const BUILDER_BUILD_STATE: Family = Family {
        name: "nodepool_builder_build_state",
        help: "What this builder does with the image: 0 idle, 1 building, 3 paused.",
        kind: FamilyKind::Gauge,
    };
    /// What the builder does with an `image`'s upload to a `provider` (0 idle, 2 uploading).
    pub const BUILDER_UPLOAD_STATE: Family = Family {
        name: "nodepool_builder_upload_state",
        help: "What this builder does with the image's upload to the provider: 0 idle, 2 uploading.",
        kind: FamilyKind::Gauge,
    };
    /// The builder's running tasks and workers by `kind`.
    pub const BUILDER_WORKERS: Family = Family {
        name: "nodepool_builder_tasks",
        help: "This builder's tasks: current_builds, current_uploads, build_workers, upload_workers.",
        kind: FamilyKind::Gauge,
    };
}

/// A series' labels: names and values, in the family's order.
type LabelSet = Vec<(&'static str, String)>;

#[derive(Clone, Debug)]
enum Series {
    Value(f64),
    Histogram {
        /// Observations at or below each bound (not cumulative).
        buckets: Vec<u64>,
        sum: f64,
        count: u64,
    },
}

#[derive(Debug)]
struct FamilyData {
    def: Family,
    series: BTreeMap<LabelSet, Series>,
}

#[derive(Default)]
struct Registry {
    /// Flat statsd names (`covered`: a family carries it in `/metrics`).
    counters: BTreeMap<String, (u64, bool)>,
    gauges: BTreeMap<String, (f64, bool)>,
    timers: BTreeMap<String, (u64, f64, bool)>,
    families: BTreeMap<&'static str, FamilyData>,
}

impl Registry {
    fn family(&mut self, def: &Family) -> &mut FamilyData {
        self.families.entry(def.name).or_insert_with(|| FamilyData {
            def: *def,
            series: BTreeMap::new(),
        })
    }
}

struct Statsd {
    socket: UdpSocket,
    target: String,
}

/// A metrics sink. Cheap to call from any task.
pub struct Metrics {
    registry: Mutex<Registry>,
    statsd: Option<Statsd>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics")
            .field("statsd", &self.statsd.as_ref().map(|s| s.target.clone()))
            .finish()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::in_memory()
    }
}

/// Statsd names may not contain `.` or `:` inside a component (Nodepool
/// replaces them in requestor names).
pub fn sanitize_component(s: &str) -> String {
    s.replace(['.', ':'], "_")
}

fn labels(pairs: &[(&'static str, &str)]) -> LabelSet {
    pairs.iter().map(|(k, v)| (*k, (*v).to_owned())).collect()
}

/// `nodepool.provider.<p>.leaked.<kind>`, as its labels.
fn leaked_labels(name: &str) -> Option<LabelSet> {
    let rest = name.strip_prefix("nodepool.provider.")?;
    let (provider, kind) = rest.rsplit_once(".leaked.")?;
    (!provider.is_empty() && !kind.is_empty() && !kind.contains('.'))
        .then(|| labels(&[("provider", provider), ("kind", kind)]))
}

impl Metrics {
    /// Only in memory (tests, embedding without statsd).
    pub fn in_memory() -> Self {
        Metrics {
            registry: Mutex::new(Registry::default()),
            statsd: None,
        }
    }

    /// In memory, plus statsd when `STATSD_HOST` (and optionally
    /// `STATSD_PORT`, default 8125) is set, as Nodepool does.
    pub fn from_env() -> Self {
        match std::env::var("STATSD_HOST") {
            Ok(host) => {
                let port = std::env::var("STATSD_PORT").unwrap_or_else(|_| "8125".into());
                let target = format!("{host}:{port}");
                Metrics::with_statsd(&target).unwrap_or_else(|e| {
                    tracing::warn!(%target, error = %e, "cannot open a statsd socket");
                    Metrics::in_memory()
                })
            }
            Err(_) => Metrics::in_memory(),
        }
    }

    /// In memory, plus statsd lines to `target` (`host:port`).
    pub fn with_statsd(target: &str) -> std::io::Result<Self> {
        let socket = UdpSocket::bind("0.0.0.0:0")?;
        socket.set_nonblocking(true)?;
        Ok(Metrics {
            registry: Mutex::new(Registry::default()),
            statsd: Some(Statsd {
                socket,
                target: target.to_owned(),
            }),
        })
    }

    fn send(&self, line: String) {
        if let Some(s) = &self.statsd {
            // Metrics must never block or fail the caller; a lost packet is fine.
            let _ = s.socket.send_to(line.as_bytes(), &s.target);
        }
    }

    fn registry(&self) -> std::sync::MutexGuard<'_, Registry> {
        self.registry.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn count(&self, name: &str, covered: bool) {
        let mut r = self.registry();
        let e = r.counters.entry(name.to_owned()).or_default();
        e.0 += 1;
        e.1 |= covered;
        drop(r);
        self.send(format!("{name}:1|c"));
    }

    /// Adds one to a statsd counter. A `nodepool.provider.<p>.leaked.<kind>`
    /// name also counts in [`families::LEAKED`].
    pub fn incr(&self, name: &str) {
        match leaked_labels(name) {
            Some(l) => {
                self.add_series(&families::LEAKED, l, 1.0);
                self.count(name, true);
            }
            None => self.count(name, false),
        }
    }

    /// Adds one to a statsd counter and to a labelled counter family.
    pub fn incr_as(&self, name: &str, family: &Family, pairs: &[(&'static str, &str)]) {
        self.add_series(family, labels(pairs), 1.0);
        self.count(name, true);
    }

    fn set_gauge(&self, name: &str, value: f64, covered: bool) {
        self.registry()
            .gauges
            .insert(name.to_owned(), (value, covered));
        self.send(format!("{name}:{value}|g"));
    }

    /// Sets a statsd gauge.
    pub fn gauge(&self, name: &str, value: f64) {
        self.set_gauge(name, value, false);
    }

    /// Sets a statsd gauge whose information a labelled family set with
    /// [`Metrics::replace`] or [`Metrics::set`] already carries, so
    /// `/metrics` does not repeat it flattened.
    pub fn gauge_statsd_only(&self, name: &str, value: f64) {
        self.set_gauge(name, value, true);
    }

    /// Sets a statsd gauge and a labelled gauge family's series.
    pub fn gauge_as(
        &self,
        name: &str,
        family: &Family,
        pairs: &[(&'static str, &str)],
        value: f64,
    ) {
        self.set(family, pairs, value);
        self.set_gauge(name, value, true);
    }

    fn time(&self, name: &str, d: Duration, covered: bool, count: bool) {
        let ms = d.as_secs_f64() * 1000.0;
        {
            let mut r = self.registry();
            let t = r.timers.entry(name.to_owned()).or_default();
            t.0 += 1;
            t.1 += ms;
            t.2 |= covered;
        }
        self.send(format!("{name}:{ms:.3}|ms"));
        if count {
            self.count(name, covered);
        }
    }

    /// Records a duration (a statsd timer) and counts it, as Nodepool does.
    pub fn timing(&self, name: &str, d: Duration) {
        self.time(name, d, false, true);
    }

    /// Records a duration under several statsd names (each a timer and a
    /// counter) and once in a histogram family.
    pub fn timing_as(
        &self,
        names: &[String],
        family: &Family,
        pairs: &[(&'static str, &str)],
        d: Duration,
    ) {
        self.observe(family, pairs, d);
        for n in names {
            self.time(n, d, true, true);
        }
    }

    /// Records a duration as a statsd timer only (no counter: Python
    /// Nodepool's `dib_image_build.<image>.status.duration`) and once in a
    /// histogram family.
    pub fn timer_as(
        &self,
        name: &str,
        family: &Family,
        pairs: &[(&'static str, &str)],
        d: Duration,
    ) {
        self.observe(family, pairs, d);
        self.time(name, d, true, false);
    }

    /// Records the state store client's traffic counters
    /// ([`families::STORE_OPERATIONS`], [`families::STORE_BYTES`]) and
    /// the size of its cache ([`families::STORE_CACHED`]) from its health
    /// snapshot: set, not added, as the client counts them itself. Called
    /// on every pass and by `/metrics` before it renders, so a scrape is
    /// current even on an idle launcher.
    pub fn record_store_traffic(&self, h: &crate::store::StoreHealth) {
        use families::{STORE_BYTES, STORE_CACHED, STORE_OPERATIONS};
        self.set(&STORE_CACHED, &[], h.cached_records as f64);
        self.set(&STORE_OPERATIONS, &[("op", "write")], h.writes as f64);
        self.set(&STORE_OPERATIONS, &[("op", "read")], h.reads as f64);
        self.set(
            &STORE_OPERATIONS,
            &[("op", "watch_event")],
            h.watch_events as f64,
        );
        self.set(&STORE_BYTES, &[("direction", "sent")], h.bytes_sent as f64);
        self.set(
            &STORE_BYTES,
            &[("direction", "received")],
            h.bytes_received as f64,
        );
    }

    /// Sets a labelled gauge (Prometheus only).
    pub fn set(&self, family: &Family, pairs: &[(&'static str, &str)], value: f64) {
        self.registry()
            .family(family)
            .series
            .insert(labels(pairs), Series::Value(value));
    }

    fn add_series(&self, family: &Family, l: LabelSet, by: f64) {
        let mut r = self.registry();
        let s = r
            .family(family)
            .series
            .entry(l)
            .or_insert(Series::Value(0.0));
        if let Series::Value(v) = s {
            *v += by;
        }
    }

    /// Records one observation in a histogram family (Prometheus only).
    pub fn observe(&self, family: &Family, pairs: &[(&'static str, &str)], d: Duration) {
        let FamilyKind::Histogram(bounds) = family.kind else {
            return;
        };
        let secs = d.as_secs_f64();
        let mut r = self.registry();
        let s = r
            .family(family)
            .series
            .entry(labels(pairs))
            .or_insert_with(|| Series::Histogram {
                buckets: vec![0; bounds.len()],
                sum: 0.0,
                count: 0,
            });
        if let Series::Histogram {
            buckets,
            sum,
            count,
        } = s
        {
            if let Some(i) = bounds.iter().position(|b| secs <= *b) {
                buckets[i] += 1;
            }
            *sum += secs;
            *count += 1;
        }
    }

    /// Replaces every series of a gauge family (series that are gone must
    /// disappear, e.g. a label removed from the configuration).
    pub fn replace(&self, family: &Family, series: Vec<(LabelSetRef, f64)>) {
        let mut r = self.registry();
        let f = r.family(family);
        f.series = series
            .into_iter()
            .map(|(l, v)| (l.0, Series::Value(v)))
            .collect();
    }

    /// Forgets a family (this process no longer reports it).
    pub fn clear(&self, family: &Family) {
        self.registry().families.remove(family.name);
    }

    /// Forgets the statsd gauges whose names `which` picks (no longer
    /// reported by this process; statsd keeps the last value it got).
    pub fn clear_gauges(&self, which: impl Fn(&str) -> bool) {
        self.registry().gauges.retain(|k, _| !which(k));
    }

    /// A counter's value (tests).
    pub fn counter(&self, name: &str) -> u64 {
        self.registry().counters.get(name).map_or(0, |c| c.0)
    }

    /// Every statsd counter and its value.
    pub fn counters(&self) -> BTreeMap<String, u64> {
        self.registry()
            .counters
            .iter()
            .map(|(k, v)| (k.clone(), v.0))
            .collect()
    }

    /// A gauge's value (tests).
    pub fn gauge_value(&self, name: &str) -> Option<f64> {
        self.registry().gauges.get(name).map(|g| g.0)
    }

    /// A labelled series' value (a gauge's, a counter's, a histogram's
    /// count), e.g. `value(&families::NODES, &[("state", "ready"), ...])`.
    pub fn value(&self, family: &Family, pairs: &[(&'static str, &str)]) -> Option<f64> {
        let r = self.registry();
        match r.families.get(family.name)?.series.get(&labels(pairs))? {
            Series::Value(v) => Some(*v),
            Series::Histogram { count, .. } => Some(*count as f64),
        }
    }

    /// The Prometheus text exposition (format 0.0.4): the labelled
    /// families, then statsd names no family carries, flattened.
    pub fn prometheus(&self) -> String {
        let r = self.registry();
        let mut out = String::new();
        for f in r.families.values() {
            let def = &f.def;
            let (name, kind) = match def.kind {
                FamilyKind::Gauge => (def.name.to_owned(), "gauge"),
                FamilyKind::Counter => (format!("{}_total", def.name), "counter"),
                FamilyKind::Histogram(_) => (def.name.to_owned(), "histogram"),
            };
            let _ = writeln!(out, "# HELP {name} {}", def.help);
            let _ = writeln!(out, "# TYPE {name} {kind}");
            for (l, s) in &f.series {
                match s {
                    Series::Value(v) => {
                        let _ = writeln!(out, "{name}{} {}", render_labels(l, None), num(*v));
                    }
                    Series::Histogram {
                        buckets,
                        sum,
                        count,
                    } => {
                        let FamilyKind::Histogram(bounds) = def.kind else {
                            continue;
                        };
                        let mut cumulative = 0;
                        for (b, n) in bounds.iter().zip(buckets) {
                            cumulative += n;
                            let le = num(*b);
                            let _ = writeln!(
                                out,
                                "{name}_bucket{} {cumulative}",
                                render_labels(l, Some(&le))
                            );
                        }
                        let _ = writeln!(
                            out,
                            "{name}_bucket{} {count}",
                            render_labels(l, Some("+Inf"))
                        );
                        let _ = writeln!(out, "{name}_sum{} {}", render_labels(l, None), num(*sum));
                        let _ = writeln!(out, "{name}_count{} {count}", render_labels(l, None));
                    }
                }
            }
        }
        for (k, (v, covered)) in &r.counters {
            if !covered {
                let n = flat(k);
                let _ = writeln!(out, "# TYPE {n}_total counter\n{n}_total {v}");
            }
        }
        for (k, (v, covered)) in &r.gauges {
            if !covered {
                let n = flat(k);
                let _ = writeln!(out, "# TYPE {n} gauge\n{n} {}", num(*v));
            }
        }
        for (k, (count, sum, covered)) in &r.timers {
            if !covered {
                let n = flat(k);
                let _ = writeln!(
                    out,
                    "# TYPE {n}_ms summary\n{n}_ms_sum {}\n{n}_ms_count {count}",
                    num(*sum)
                );
            }
        }
        out
    }
}

/// Labels for [`Metrics::replace`].
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct LabelSetRef(LabelSet);

impl LabelSetRef {
    /// Labels from names and values.
    pub fn new(pairs: &[(&'static str, &str)]) -> Self {
        LabelSetRef(labels(pairs))
    }
}

/// A statsd name as a Prometheus metric name.
fn flat(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == ':' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// A sample value as Prometheus writes it.
fn num(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v.is_infinite() {
        if v > 0.0 {
            "+Inf".into()
        } else {
            "-Inf".into()
        }
    } else {
        format!("{v}")
    }
}

fn render_labels(l: &LabelSet, le: Option<&str>) -> String {
    if l.is_empty() && le.is_none() {
        return String::new();
    }
    let mut parts: Vec<String> = l
        .iter()
        .map(|(k, v)| format!("{k}=\"{}\"", escape(v)))
        .collect();
    if let Some(le) = le {
        parts.push(format!("le=\"{le}\""));
    }
    format!("{{{}}}", parts.join(","))
}

/// Label values escape `\`, `"` and newlines.
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statsd_lines_reach_a_udp_listener_and_prometheus_text_is_labelled() {
        let listener = UdpSocket::bind("127.0.0.1:0").expect("bind");
        listener
            .set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        let m = Metrics::with_statsd(&listener.local_addr().expect("addr").to_string())
            .expect("statsd socket");
        m.incr("nodepool.launch.attempt_failed");
        let mut buf = [0u8; 256];
        let n = listener.recv(&mut buf).expect("packet");
        assert_eq!(&buf[..n], b"nodepool.launch.attempt_failed:1|c");
        m.gauge_as(
            "nodepool.provider.p.max_servers",
            &families::MAX_SERVERS,
            &[("provider", "p")],
            3.0,
        );
        let n = listener.recv(&mut buf).expect("packet");
        assert_eq!(&buf[..n], b"nodepool.provider.p.max_servers:3|g");
        m.timing_as(
            &["nodepool.launch.ready".into()],
            &families::LAUNCH,
            &[("provider", "p"), ("result", "ready")],
            Duration::from_millis(1500),
        );
        let n = listener.recv(&mut buf).expect("packet");
        assert_eq!(&buf[..n], b"nodepool.launch.ready:1500.000|ms");
        m.incr("nodepool.provider.p.leaked.floatingips");
        let text = m.prometheus();
        // Uncovered names stay visible, flattened.
        assert!(
            text.contains("nodepool_launch_attempt_failed_total 1"),
            "{text}"
        );
        // Covered names appear only as their family.
        assert!(!text.contains("nodepool_provider_p_max_servers"), "{text}");
        assert!(
            text.contains("nodepool_provider_max_servers{provider=\"p\"} 3"),
            "{text}"
        );
        assert!(
            text.contains(
                "nodepool_launch_seconds_bucket{provider=\"p\",result=\"ready\",le=\"2\"} 1"
            ),
            "{text}"
        );
        assert!(
            text.contains(
                "nodepool_launch_seconds_bucket{provider=\"p\",result=\"ready\",le=\"1\"} 0"
            ),
            "{text}"
        );
        assert!(
            text.contains("nodepool_leaked_total{provider=\"p\",kind=\"floatingips\"} 1"),
            "{text}"
        );
        assert_eq!(m.counter("nodepool.launch.ready"), 1);
        assert_eq!(
            sanitize_component("NodePool:min-ready"),
            "NodePool_min-ready"
        );
        assert_eq!(
            leaked_labels("nodepool.provider.a.b.leaked.ports").map(|l| l[0].1.clone()),
            Some("a.b".into())
        );
        assert_eq!(leaked_labels("nodepool.provider.p.outages"), None);
    }
}
