//! Issue 16's scale simulation: a fleet of `nodepool-launcher` processes
//! on one ZooKeeper, and what each fulfilled request costs it.
//!
//! [`run`] starts `launchers` real launcher processes on a fresh chroot of
//! the given ZooKeeper, with `providers` simulated clouds split among them
//! round-robin (each launcher configured with only its own providers, as
//! a real fleet runs one launcher per group of clouds: OpenDev's `nl01`…
//! `nl04`), every provider serving every label. It brings the
//! installation to `ready` nodes through the labels' `min-ready` (spread
//! evenly over the labels), then runs a Zuul-like workload of `requests`
//! single-node requests (`in_flight` at a time, labels in turn): submit,
//! wait, accept (lock the node, delete the request), `in-use`, `used`,
//! unlock. Once the launchers have deleted the used nodes and replaced
//! them (back to `ready` spares, nothing else), it reports per fulfilled
//! request:
//!
//! - each launcher's ZooKeeper writes, reads, watch events and payload
//!   bytes, from its own `/metrics` (`nodepool_zk_operations_total`,
//!   `nodepool_zk_bytes_total`, counted by its ZooKeeper client), and
//!   the same for the Zuul-side client (this process);
//! - the server's view from ZooKeeper's `mntr` (packets received and
//!   sent, watches, znodes, data size): the whole server, so other users
//!   of a shared server count too;
//! - each launcher's CPU time (`/proc/PID/stat`) and peak RSS (`VmHWM`).
//!
//! Correctness is part of the report: requests fulfilled and failed, nodes
//! handed to two requests, and what was left once the fleet was quiet.
//! The `scale` benchmark prints it; `tests/tests/scale.rs` runs it small.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use nodepool_core::config::Config;
use nodepool_core::model::NodeState;
use nodepool_core::store::Store;
use nodepool_requestor::{NewRequest, Outcome, Requestor};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::Daemon;

/// What to simulate.
#[derive(Clone, Debug)]
pub struct Params {
    /// Launcher processes.
    pub launchers: usize,
    /// Simulated providers, split round-robin among the launchers.
    pub providers: usize,
    /// Labels, each served by every provider.
    pub labels: usize,
    /// Ready nodes the installation is brought to (`min-ready`, spread
    /// over the labels) before the workload, and kept at.
    pub ready: usize,
    /// Requests of the workload.
    pub requests: usize,
    /// Requests of the workload in flight at once.
    pub in_flight: usize,
    /// Simulated boot time, seconds.
    pub boot_delay: f64,
    /// The `nodepool-launcher` binary.
    pub launcher_bin: PathBuf,
    /// ZooKeeper `host:port` (plaintext).
    pub zk_hosts: String,
    /// Longest wait for the installation to reach `ready` nodes.
    pub fill_limit: Duration,
    /// Longest wait for the workload, and then for the fleet to be quiet.
    pub workload_limit: Duration,
}

/// A store client's traffic, as its counters report it.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Traffic {
    /// Write requests sent.
    pub writes: f64,
    /// Read requests sent.
    pub reads: f64,
    /// Watch events received.
    pub watch_events: f64,
    /// Payload bytes sent.
    pub bytes_sent: f64,
    /// Payload bytes received.
    pub bytes_received: f64,
}

impl Traffic {
    fn from_health(h: &nodepool_core::store::StoreHealth) -> Self {
        Traffic {
            writes: h.writes as f64,
            reads: h.reads as f64,
            watch_events: h.watch_events as f64,
            bytes_sent: h.bytes_sent as f64,
            bytes_received: h.bytes_received as f64,
        }
    }

    /// Reads the counters from a Prometheus exposition.
    pub fn from_prometheus(text: &str) -> Self {
        let mut t = Traffic::default();
        for line in text.lines() {
            let Some((name, value)) = line.rsplit_once(' ') else {
                continue;
            };
            let Ok(v) = value.parse::<f64>() else {
                continue;
            };
            match name {
                r#"nodepool_zk_operations_total{op="write"}"# => t.writes = v,
                r#"nodepool_zk_operations_total{op="read"}"# => t.reads = v,
                r#"nodepool_zk_operations_total{op="watch_event"}"# => t.watch_events = v,
                r#"nodepool_zk_bytes_total{direction="sent"}"# => t.bytes_sent = v,
                r#"nodepool_zk_bytes_total{direction="received"}"# => t.bytes_received = v,
                _ => {}
            }
        }
        t
    }

    fn minus(&self, before: &Traffic) -> Traffic {
        Traffic {
            writes: self.writes - before.writes,
            reads: self.reads - before.reads,
            watch_events: self.watch_events - before.watch_events,
            bytes_sent: self.bytes_sent - before.bytes_sent,
            bytes_received: self.bytes_received - before.bytes_received,
        }
    }

    fn plus(&self, other: &Traffic) -> Traffic {
        Traffic {
            writes: self.writes + other.writes,
            reads: self.reads + other.reads,
            watch_events: self.watch_events + other.watch_events,
            bytes_sent: self.bytes_sent + other.bytes_sent,
            bytes_received: self.bytes_received + other.bytes_received,
        }
    }

    /// Each figure divided by `n` (per request).
    pub fn per(&self, n: usize) -> Traffic {
        let n = n.max(1) as f64;
        Traffic {
            writes: self.writes / n,
            reads: self.reads / n,
            watch_events: self.watch_events / n,
            bytes_sent: self.bytes_sent / n,
            bytes_received: self.bytes_received / n,
        }
    }
}

/// One launcher's figures.
#[derive(Clone, Debug, Default)]
pub struct LauncherFigures {
    /// Its name (`l1`, ...).
    pub name: String,
    /// Its providers.
    pub providers: Vec<String>,
    /// Its client's traffic during the workload.
    pub workload: Traffic,
    /// Its client's traffic while the installation filled.
    pub fill: Traffic,
    /// CPU seconds during the workload.
    pub workload_cpu: f64,
    /// CPU seconds from its start to the end of the workload.
    pub total_cpu: f64,
    /// Peak resident set size, MiB.
    pub peak_rss_mib: f64,
    /// Records in its mirror at the end.
    pub cached_records: f64,
}

/// ZooKeeper's `mntr` figures (the whole server).
#[derive(Clone, Debug, Default)]
pub struct ServerFigures {
    /// Every `mntr` key with a numeric value.
    pub values: BTreeMap<String, f64>,
}

impl ServerFigures {
    /// A figure, 0 when missing.
    pub fn get(&self, key: &str) -> f64 {
        self.values.get(key).copied().unwrap_or(0.0)
    }
}

/// What a run found.
#[derive(Clone, Debug, Default)]
pub struct Report {
    /// What was simulated.
    pub launchers: usize,
    /// Providers in all.
    pub providers: usize,
    /// Ready nodes kept.
    pub ready: usize,
    /// Requests submitted.
    pub requests: usize,
    /// Requests fulfilled and accepted.
    pub fulfilled: usize,
    /// Requests failed, or errors while handling one (each described).
    pub failures: Vec<String>,
    /// Nodes handed to more than one request.
    pub double_allocations: Vec<String>,
    /// What was left once the fleet should have been quiet (empty when
    /// nothing): requests, nodes not `ready`, ready nodes beyond the spares.
    pub left: Vec<String>,
    /// Ready spares once the filled fleet was quiet (`min-ready` wants
    /// `ready`; more is an overshoot while launchers registered).
    pub spares_filled: usize,
    /// Ready spares once the fleet was quiet after the workload.
    pub spares_after: usize,
    /// Seconds from the first launcher's start to `ready` spares.
    pub fill_seconds: f64,
    /// Seconds of the workload, until every request was handled.
    pub workload_seconds: f64,
    /// Seconds from the end of the workload until the fleet was quiet.
    pub settle_seconds: f64,
    /// Per launcher.
    pub per_launcher: Vec<LauncherFigures>,
    /// The Zuul-side client's traffic during the workload and settling.
    pub client: Traffic,
    /// `mntr` before and after the workload.
    pub server_before: ServerFigures,
    /// `mntr` after the workload and settling.
    pub server_after: ServerFigures,
    /// One-minute load average at the start and the end of the workload.
    pub load_average: (f64, f64),
}

impl Report {
    /// Every launcher's workload traffic added up.
    pub fn launchers_traffic(&self) -> Traffic {
        self.per_launcher
            .iter()
            .fold(Traffic::default(), |acc, l| acc.plus(&l.workload))
    }

    /// Every property that did not hold.
    pub fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        if self.fulfilled != self.requests {
            out.push(format!(
                "{} of {} requests fulfilled",
                self.fulfilled, self.requests
            ));
        }
        out.extend(self.failures.iter().cloned());
        out.extend(
            self.double_allocations
                .iter()
                .map(|d| format!("double allocation: {d}")),
        );
        out.extend(self.left.iter().map(|l| format!("left: {l}")));
        out
    }

    /// The benchmark's table header.
    pub fn table_header() -> &'static str {
        "| launchers | providers each | ready nodes | requests | load avg | workload s | writes / req (launchers + client) | reads / req | watch events / req | KiB sent / req | KiB received / req | server packets in / out per req | CPU ms / req, all launchers | peak RSS MiB per launcher |\n|---:|---:|---:|---:|---|---:|---|---:|---:|---:|---:|---|---:|---|"
    }

    /// This run as a table row.
    pub fn table_row(&self) -> String {
        let n = self.fulfilled.max(1);
        let l = self.launchers_traffic().per(n);
        let c = self.client.per(n);
        let cpu: f64 = self.per_launcher.iter().map(|l| l.workload_cpu).sum();
        let rss: Vec<f64> = self.per_launcher.iter().map(|l| l.peak_rss_mib).collect();
        let (lo, hi) = rss
            .iter()
            .fold((f64::MAX, 0.0_f64), |(a, b), v| (a.min(*v), b.max(*v)));
        let pk = |k: &str| (self.server_after.get(k) - self.server_before.get(k)) / n as f64;
        format!(
            "| {} | {} | {} | {} | {:.1}–{:.1} | {:.1} | {:.1} + {:.1} | {:.1} + {:.1} | {:.1} + {:.1} | {:.2} + {:.2} | {:.1} + {:.1} | {:.0} / {:.0} | {:.1} | {:.1}–{:.1} |",
            self.launchers,
            self.providers / self.launchers.max(1),
            self.ready,
            self.requests,
            self.load_average.0,
            self.load_average.1,
            self.workload_seconds,
            l.writes,
            c.writes,
            l.reads,
            c.reads,
            l.watch_events,
            c.watch_events,
            l.bytes_sent / 1024.0,
            c.bytes_sent / 1024.0,
            l.bytes_received / 1024.0,
            c.bytes_received / 1024.0,
            pk("zk_packets_received"),
            pk("zk_packets_sent"),
            cpu * 1000.0 / n as f64,
            if rss.is_empty() { 0.0 } else { lo },
            hi,
        )
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{} launchers, {} providers, {} ready nodes, {} requests: {} fulfilled",
            self.launchers, self.providers, self.ready, self.requests, self.fulfilled
        )?;
        writeln!(
            f,
            "  fill {:.1} s, workload {:.1} s, settle {:.1} s, load average {:.2} → {:.2}",
            self.fill_seconds,
            self.workload_seconds,
            self.settle_seconds,
            self.load_average.0,
            self.load_average.1
        )?;
        writeln!(
            f,
            "  spares: {} once filled, {} after the workload ({} wanted)",
            self.spares_filled, self.spares_after, self.ready
        )?;
        let n = self.fulfilled.max(1);
        for l in &self.per_launcher {
            let t = l.workload.per(n);
            writeln!(
                f,
                "  {} ({}): per request {:.2} writes, {:.2} reads, {:.2} watch events, {:.0} B sent, {:.0} B received; fill: {:.0} writes, {:.0} reads, {:.0} events; workload CPU {:.2} s (total {:.2} s), peak RSS {:.1} MiB, mirror {:.0} records",
                l.name,
                l.providers.join(","),
                t.writes,
                t.reads,
                t.watch_events,
                t.bytes_sent,
                t.bytes_received,
                l.fill.writes,
                l.fill.reads,
                l.fill.watch_events,
                l.workload_cpu,
                l.total_cpu,
                l.peak_rss_mib,
                l.cached_records
            )?;
        }
        let c = self.client.per(n);
        writeln!(
            f,
            "  client: per request {:.2} writes, {:.2} reads, {:.2} watch events, {:.0} B sent, {:.0} B received",
            c.writes, c.reads, c.watch_events, c.bytes_sent, c.bytes_received
        )?;
        let d = |k: &str| self.server_after.get(k) - self.server_before.get(k);
        writeln!(
            f,
            "  server (mntr, whole server): packets received +{:.0}, sent +{:.0}; watches {:.0} → {:.0}; znodes {:.0} → {:.0}; data {:.1} → {:.1} MiB",
            d("zk_packets_received"),
            d("zk_packets_sent"),
            self.server_before.get("zk_watch_count"),
            self.server_after.get("zk_watch_count"),
            self.server_before.get("zk_znode_count"),
            self.server_after.get("zk_znode_count"),
            self.server_before.get("zk_approximate_data_size") / 1048576.0,
            self.server_after.get("zk_approximate_data_size") / 1048576.0,
        )?;
        for p in self.problems() {
            writeln!(f, "  PROBLEM: {p}")?;
        }
        Ok(())
    }
}

/// The `i`-th label's name (from 0).
fn label_name(i: usize) -> String {
    format!("label-{i}")
}

/// The `i`-th provider's name (from 0).
fn provider_name(i: usize) -> String {
    format!("cloud-{i:02}")
}

/// The providers of launcher `l` (from 0): round-robin.
fn providers_of(p: &Params, l: usize) -> Vec<usize> {
    (0..p.providers).filter(|i| i % p.launchers == l).collect()
}

/// The part of every configuration that is the same everywhere: the store,
/// the labels with their share of `min-ready`, the web app on a free port.
fn common_yaml(p: &Params, chroot: &str) -> anyhow::Result<String> {
    let (host, port) = p
        .zk_hosts
        .rsplit_once(':')
        .context("the ZooKeeper address is host:port")?;
    let mut out = format!(
        "zookeeper-servers: [{{host: '{host}', port: {port}, chroot: '{chroot}'}}]\nwebapp: {{port: 0, listen_address: 127.0.0.1}}\nlabels:\n"
    );
    for i in 0..p.labels {
        // The remainder goes to the first labels.
        let min_ready = p.ready / p.labels + usize::from(i < p.ready % p.labels);
        out.push_str(&format!(
            "  - {{name: {}, min-ready: {min_ready}}}\n",
            label_name(i)
        ));
    }
    Ok(out)
}

/// One launcher's configuration: the common part and its providers.
fn launcher_yaml(p: &Params, common: &str, l: usize) -> String {
    let mut out = format!("{common}providers:\n");
    let labels: Vec<String> = (0..p.labels)
        .map(|i| {
            format!(
                "{{name: {}, cloud-image: img, flavor-name: s}}",
                label_name(i)
            )
        })
        .collect();
    for i in providers_of(p, l) {
        out.push_str(&format!(
            r#"  - name: {name}
    driver: simulated
    simulation:
      boot-delay: {boot}
      delete-delay: 0.01
      seed: {i}
      flavors: [{{name: s, vcpus: 1, ram: 1024}}]
    cloud-images: [{{name: img}}]
    pools:
      - name: main
        max-servers: {max}
        labels: [{labels}]
"#,
            name = provider_name(i),
            boot = p.boot_delay,
            max = p.ready + p.requests + 100,
            labels = labels.join(", "),
        ));
    }
    out
}

/// utime + stime of a process, in seconds.
pub fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("/proc/{pid}/stat"))?;
    // Fields after the command name, which is in parentheses.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |i: usize| -> anyhow::Result<f64> {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .with_context(|| format!("/proc/{pid}/stat: field {}", i + 3))
    };
    // USER_HZ: 100 on every Linux build this runs on.
    Ok((field(11)? + field(12)?) / 100.0)
}

/// Peak resident set size (`VmHWM`), in MiB.
pub fn peak_rss_mib(pid: u32) -> anyhow::Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("/proc/{pid}/status"))?;
    let kb: f64 = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("/proc/{pid}/status: no VmHWM"))?;
    Ok(kb / 1024.0)
}

/// The one-minute load average.
pub fn load_average() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|v| v.parse().ok()))
        .unwrap_or(0.0)
}

/// ZooKeeper's `mntr` four-letter word (it must be whitelisted, as
/// `scripts/zookeeper.sh` does).
pub async fn mntr(hosts: &str) -> anyhow::Result<ServerFigures> {
    let mut conn = tokio::net::TcpStream::connect(hosts)
        .await
        .with_context(|| format!("mntr: connect {hosts}"))?;
    conn.write_all(b"mntr").await?;
    let mut text = String::new();
    conn.read_to_string(&mut text).await?;
    if text.contains("not in the whitelist") {
        bail!("mntr is not whitelisted on {hosts}: {}", text.trim());
    }
    let values = text
        .lines()
        .filter_map(|l| {
            let (k, v) = l.split_once('\t')?;
            Some((k.to_owned(), v.trim().parse().ok()?))
        })
        .collect();
    Ok(ServerFigures { values })
}

/// `GET /metrics` from a launcher's web app (HTTP/1.0, so the server
/// closes the connection after the body).
pub async fn scrape(addr: &str) -> anyhow::Result<String> {
    let mut conn = tokio::net::TcpStream::connect(addr)
        .await
        .with_context(|| format!("connect to the web app at {addr}"))?;
    conn.write_all(format!("GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
        .await?;
    let mut text = String::new();
    conn.read_to_string(&mut text).await?;
    let (head, body) = text
        .split_once("\r\n\r\n")
        .with_context(|| format!("{addr}/metrics: no HTTP response"))?;
    if !head.starts_with("HTTP/1.1 200") && !head.starts_with("HTTP/1.0 200") {
        bail!(
            "{addr}/metrics: {}",
            head.lines().next().unwrap_or_default()
        );
    }
    Ok(body.to_owned())
}

/// The address a launcher's web app logged (`web app listening addr=…`).
fn webapp_address(log: &str) -> Option<String> {
    let line = log.lines().find(|l| l.contains("web app listening"))?;
    let at = line.find("127.0.0.1:")?;
    let port: String = line[at + "127.0.0.1:".len()..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    (!port.is_empty()).then(|| format!("127.0.0.1:{port}"))
}

/// One running launcher.
struct Member {
    name: String,
    providers: Vec<String>,
    daemon: Daemon,
    addr: String,
}

impl Member {
    async fn traffic(&self) -> anyhow::Result<(Traffic, f64)> {
        let text = scrape(&self.addr).await?;
        let cached = text
            .lines()
            .find_map(|l| l.strip_prefix("nodepool_zk_cached_records "))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0.0);
        Ok((Traffic::from_prometheus(&text), cached))
    }
}

/// The installation as the quiet fleet should leave it: at least `ready`
/// unallocated spares, no request, no node in any other state.
async fn quiet(store: &Store, p: &Params) -> Result<(), String> {
    let nodes = store.list_nodes().await.map_err(|e| e.to_string())?;
    let requests = store.list_requests().await.map_err(|e| e.to_string())?;
    let mut other = Vec::new();
    let mut ready = 0;
    for r in &nodes.records {
        if r.node.state == NodeState::Ready && r.node.allocated_to.is_none() && !r.locked {
            ready += 1;
        } else {
            other.push(format!("node {} {:?}", r.id, r.node.state));
        }
    }
    let mut problems: Vec<String> = other.into_iter().take(10).collect();
    // More is not wrong: while launchers register one after another a
    // label's min-ready owner moves, and two owners may top it up.
    if ready < p.ready {
        problems.push(format!("{ready} ready spares, {} wanted", p.ready));
    }
    problems.extend(
        requests
            .records
            .iter()
            .take(10)
            .map(|r| format!("request {} {:?}", r.id, r.request.state)),
    );
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems.join("; "))
    }
}

/// Ready unallocated nodes, and nodes being built.
async fn fill_level(store: &Store) -> Result<(usize, usize), String> {
    let nodes = store.list_nodes().await.map_err(|e| e.to_string())?;
    let ready = nodes
        .records
        .iter()
        .filter(|r| r.node.state == NodeState::Ready && r.node.allocated_to.is_none())
        .count();
    let building = nodes
        .records
        .iter()
        .filter(|r| r.node.state == NodeState::Building)
        .count();
    Ok((ready, building))
}

/// What the workload's tasks share.
#[derive(Default)]
struct Tally {
    fulfilled: usize,
    failures: Vec<String>,
    /// Node id → the request it was handed to.
    handed: BTreeMap<String, String>,
    double: Vec<String>,
}

/// One request as Zuul handles it: submit, wait, accept, in-use, used.
async fn one_request(zuul: &Requestor, label: String, limit: Duration, tally: &Mutex<Tally>) {
    let result: anyhow::Result<()> = async {
        let id = zuul.submit(&NewRequest::new(vec![label])).await?;
        match zuul.wait(&id, limit).await? {
            Outcome::Fulfilled(v) => {
                let mut set = zuul.accept(&id, &v.value).await?;
                {
                    let mut t = tally.lock().unwrap_or_else(|p| p.into_inner());
                    for n in &set.nodes {
                        if let Some(other) = t.handed.insert(n.id.clone(), id.clone()) {
                            t.double.push(format!("node {} to {other} and {id}", n.id));
                        }
                    }
                }
                zuul.use_nodes(&mut set, "scale").await?;
                zuul.return_nodes(set).await?;
                tally.lock().unwrap_or_else(|p| p.into_inner()).fulfilled += 1;
                Ok(())
            }
            Outcome::Failed(_) => {
                let _ = zuul.cancel(&id).await;
                bail!("request {id} failed")
            }
        }
    }
    .await;
    if let Err(e) = result {
        tally
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .failures
            .push(format!("{e:#}"));
    }
}

/// Polls `check` every 200 ms until it is `Ok`, at most `limit`.
async fn poll<F, Fut>(limit: Duration, mut check: F) -> Result<(), String>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(), String>>,
{
    let deadline = Instant::now() + limit;
    loop {
        let last = check().await;
        if last.is_ok() || Instant::now() >= deadline {
            return last;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Runs the simulation (see the module documentation). Errors are the
/// setup's (no ZooKeeper, a launcher that does not start); what the fleet
/// did wrong is in the [`Report`].
pub async fn run(p: &Params, dir: &Path) -> anyhow::Result<Report> {
    if p.launchers == 0 || p.providers < p.launchers || p.labels == 0 {
        bail!(
            "need at least one launcher, a provider per launcher and a label (got {} launchers, {} providers, {} labels)",
            p.launchers,
            p.providers,
            p.labels
        );
    }
    let chroot = format!("/nodepool-rs-scale/{}", uuid::Uuid::new_v4().simple());
    let common = common_yaml(p, &chroot)?;
    let cfg = Config::from_yaml(&common).map_err(|e| anyhow::anyhow!("{e}"))?;
    let store = nodepool_cli::daemon::open_store(&cfg).await?;
    let zuul = Arc::new(
        Requestor::new(store.clone(), "5ca1ab1e5ca1ab1e5ca1ab1e5ca1ab1e")
            .with_node_lock_timeout(Duration::from_secs(30)),
    );

    let started = Instant::now();
    let mut members = Vec::new();
    for l in 0..p.launchers {
        let name = format!("l{}", l + 1);
        let path = dir.join(format!("{name}.yaml"));
        std::fs::write(&path, launcher_yaml(p, &common, l))?;
        let mut cmd = Command::new(&p.launcher_bin);
        cmd.arg("-c")
            .arg(&path)
            .current_dir(dir)
            .env("RUST_LOG", "warn,nodepool_cli::webapp=info");
        let daemon = Daemon::spawn(&name, cmd, &dir.join(format!("{name}.log")));
        members.push(Member {
            name,
            providers: providers_of(p, l).into_iter().map(provider_name).collect(),
            daemon,
            addr: String::new(),
        });
    }
    for m in &mut members {
        let deadline = Instant::now() + Duration::from_secs(60);
        m.addr = loop {
            if let Some(a) = webapp_address(&m.daemon.log()) {
                break a;
            }
            if !m.daemon.running() || Instant::now() > deadline {
                bail!(
                    "launcher {} did not start its web app; its log:\n{}",
                    m.name,
                    m.daemon.log()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
    }

    // Fill: min-ready brings every label to its spares.
    let last_report = Mutex::new(Instant::now());
    let (store_ref, last_report) = (&store, &last_report);
    poll(p.fill_limit, || async move {
        let (ready, building) = fill_level(store_ref).await?;
        let mut last = last_report.lock().unwrap_or_else(|p| p.into_inner());
        if last.elapsed() > Duration::from_secs(10) {
            eprintln!(
                "  fill: {ready} of {} ready, {building} building, {:.0} s",
                p.ready,
                started.elapsed().as_secs_f64()
            );
            *last = Instant::now();
        }
        if ready >= p.ready && building == 0 {
            Ok(())
        } else {
            Err(format!("{ready} of {} ready, {building} building", p.ready))
        }
    })
    .await
    .map_err(|e| anyhow::anyhow!("the installation did not fill: {e}"))?;
    let fill_seconds = started.elapsed().as_secs_f64();
    // Min-ready requests are completed (deleted) after their nodes are
    // ready; start from a quiet fleet.
    poll(p.workload_limit, || quiet(&store, p))
        .await
        .map_err(|e| anyhow::anyhow!("the filled installation did not settle: {e}"))?;
    let spares_filled = fill_level(&store)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?
        .0;

    // The server's window encloses the clients' (mntr first, last), so
    // the server counts at least every packet the clients counted.
    let server_before = mntr(&p.zk_hosts).await?;
    let mut before = Vec::new();
    for m in &members {
        before.push((m.traffic().await?.0, cpu_seconds(m.daemon.pid())?));
    }
    let client_before = Traffic::from_health(&store.backend().health());
    let load_start = load_average();

    // The workload.
    let tally = Arc::new(Mutex::new(Tally::default()));
    let t = Instant::now();
    let mut set = tokio::task::JoinSet::new();
    let limit = p.workload_limit;
    for i in 0..p.requests {
        while set.len() >= p.in_flight.max(1) {
            set.join_next().await;
        }
        let zuul = zuul.clone();
        let tally = tally.clone();
        let label = label_name(i % p.labels);
        set.spawn(async move { one_request(&zuul, label, limit, &tally).await });
    }
    while set.join_next().await.is_some() {}
    let workload_seconds = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let settled = poll(p.workload_limit, || quiet(&store, p)).await;
    let settle_seconds = t.elapsed().as_secs_f64();
    let load_end = load_average();
    let spares_after = fill_level(&store)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?
        .0;

    let client = Traffic::from_health(&store.backend().health()).minus(&client_before);
    let mut per_launcher = Vec::new();
    for (m, (traffic0, cpu0)) in members.iter().zip(&before) {
        let (traffic, cached) = m.traffic().await?;
        let cpu = cpu_seconds(m.daemon.pid())?;
        per_launcher.push(LauncherFigures {
            name: m.name.clone(),
            providers: m.providers.clone(),
            workload: traffic.minus(traffic0),
            fill: *traffic0,
            workload_cpu: cpu - cpu0,
            total_cpu: cpu,
            peak_rss_mib: peak_rss_mib(m.daemon.pid())?,
            cached_records: cached,
        });
    }
    let server_after = mntr(&p.zk_hosts).await?;
    for m in &mut members {
        m.daemon.terminate(Duration::from_secs(60)).await;
    }
    // Leave nothing behind on the shared server: a tree growing run after
    // run slows the next runs (snapshots, garbage collection). A launcher
    // still stopping can add a znode under what is being deleted: again.
    let mut deleted = Err(anyhow::anyhow!("not tried"));
    for _ in 0..5 {
        deleted = store
            .backend()
            .delete_tree("/nodepool")
            .await
            .map_err(|e| anyhow::anyhow!("{e}"));
        if deleted.is_ok() {
            break;
        }
    }
    if let Err(e) = deleted {
        eprintln!("scale: could not delete the run's chroot {chroot}: {e}");
    }
    let _ = store.backend().close().await;

    let tally = std::mem::take(&mut *tally.lock().unwrap_or_else(|p| p.into_inner()));
    Ok(Report {
        launchers: p.launchers,
        providers: p.providers,
        ready: p.ready,
        requests: p.requests,
        fulfilled: tally.fulfilled,
        failures: tally.failures,
        double_allocations: tally.double,
        left: settled.err().into_iter().collect(),
        spares_filled,
        spares_after,
        fill_seconds,
        workload_seconds,
        settle_seconds,
        per_launcher,
        client,
        server_before,
        server_after,
        load_average: (load_start, load_end),
    })
}
