//! Load benchmark of issues 5 and 16, against a real `nodepool-launcher`
//! process with the simulated cloud (0.1 s boot, no quota), on the real
//! ZooKeeper of the test setup or on a SQLite file:
//!
//! - `--mode burst` (default): single-node requests submitted at once, as
//!   Zuul submits them (64 in flight), to a running launcher: wall time,
//!   requests/s, submit→fulfilled percentiles;
//! - `--mode backlog`: the requests are written before the launcher
//!   starts: time from its start to the first and to the last request
//!   fulfilled.
//!
//! Both report the launcher's CPU seconds and peak RSS, then the latency of
//! one request on the idle launcher.
//!
//! `--floor` (ZooKeeper only) then measures, in the same invocation, what
//! the same ZooKeeper writes cost without the launcher: a raw
//! `zookeeper-client` session makes, for each request, the writes the
//! launcher makes for it, in the ZooKeeper requests the launcher sends
//! them in (transactions included; see `floor` below), one after another
//! within a request and [`REQUESTS_IN_FLIGHT`] requests at once, as the
//! launcher pipelines them; and prints the ratio floor/launcher (1 = the
//! launcher is as fast as its writes allow). For comparison it also
//! times the same writes sent one request each, the launcher's requests
//! with the cloud's boot, and those again with a cache of the tree beside
//! them that reads every change (as the run's requestor and Zuul's
//! scheduler do). Each floor is the median of three runs (one run swings
//! 2× on a shared machine). A backlog run also reports when the
//! launcher's first write landed (the floors' clocks start with their
//! connection made), and `--timeline` prints, per 50 ms, the nodes
//! created (requests accepted) and last written (ready), by the server's
//! clock.
//!
//! Every run deletes its ZooKeeper chroot at the end, so runs on a shared
//! server do not grow its tree.
//!
//! ```text
//! cargo build --release -p nodepool-cli -p nodepool-tests
//! eval "$(scripts/zookeeper.sh env)"
//! target/release/burst [--requests 1000] [--mode burst|backlog] [--store zookeeper|sqlite]
//!                      [--floor] [--timeline] [--launcher target/release/nodepool-launcher]
//! ```

use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures::{StreamExt, TryStreamExt};
use nodepool_core::config::Config;
use nodepool_core::launcher::REQUESTS_IN_FLIGHT;
use nodepool_core::model::{NodeRequest, RequestState, WireRecord};
use nodepool_core::store::StoreEvent;
use nodepool_requestor::{NewRequest, Requestor};
use nodepool_tests::scale::{Traffic, scrape};
use tokio::sync::broadcast::error::{RecvError, TryRecvError};

fn arg(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

fn flag(name: &str) -> bool {
    std::env::args().any(|a| a == name)
}

/// utime + stime of a process, in seconds.
fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name, which is in parentheses.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = fields.get(11).and_then(|f| f.parse().ok()).unwrap_or(0.0)
        + fields.get(12).and_then(|f| f.parse().ok()).unwrap_or(0.0);
    Ok(ticks / 100.0)
}

/// Peak resident set size, in MiB.
fn peak_rss_mib(pid: u32) -> anyhow::Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kb: f64 = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    Ok(kb / 1024.0)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let n: usize = arg("--requests")
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    let launcher_bin = arg("--launcher").map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/release/nodepool-launcher")
    });
    if !launcher_bin.exists() {
        bail!(
            "{} not found: cargo build --release -p nodepool-cli",
            launcher_bin.display()
        );
    }
    let backlog = match arg("--mode").as_deref() {
        None | Some("burst") => false,
        Some("backlog") => true,
        Some(other) => bail!("--mode: expected burst or backlog, got {other:?}"),
    };
    let dir = tempfile::tempdir()?;
    let mut zk_server: Option<String> = None;
    let mut zk_chroot: Option<String> = None;
    let (store_yaml, store_name) = match arg("--store").as_deref() {
        None | Some("zookeeper") => {
            let hosts = std::env::var("NODEPOOL_TEST_ZK_HOSTS")
                .context("NODEPOOL_TEST_ZK_HOSTS: start ZooKeeper with scripts/zookeeper.sh")?;
            let (host, port) = hosts
                .rsplit_once(':')
                .context("NODEPOOL_TEST_ZK_HOSTS is host:port")?;
            let chroot = format!("/nodepool-rs-bench/{}", uuid::Uuid::new_v4().simple());
            zk_server = Some(hosts.clone());
            zk_chroot = Some(chroot.clone());
            (
                format!(
                    "zookeeper-servers: [{{host: '{host}', port: {port}, chroot: '{chroot}'}}]"
                ),
                "real ZooKeeper",
            )
        }
        Some("sqlite") => (
            format!(
                "state-store: {{driver: sqlite, path: '{}'}}",
                dir.path().join("state.db").display()
            ),
            "SQLite file",
        ),
        Some(other) => bail!("--store: expected zookeeper or sqlite, got {other:?}"),
    };
    let floor_server = match (flag("--floor"), &zk_server) {
        (false, _) => None,
        (true, Some(s)) => Some(s.clone()),
        (true, None) => bail!("--floor: the floor is ZooKeeper's, use --store zookeeper"),
    };
    // The web app on a free port, for the launcher's own ZooKeeper counters.
    let webapp = {
        let probe = std::net::TcpListener::bind("127.0.0.1:0")?;
        probe.local_addr()?
    };
    let webapp_port = webapp.port();
    let boot = BOOT.as_secs_f64();
    let yaml = format!(
        r#"{store_yaml}
webapp: {{port: {webapp_port}, listen_address: 127.0.0.1}}
labels: [{{name: small}}]
providers:
  - name: sim
    driver: simulated
    simulation:
      boot-delay: {boot}
      delete-delay: 0.01
      flavors: [{{name: s, vcpus: 1, ram: 1024}}]
    cloud-images: [{{name: img}}]
    pools:
      - name: main
        max-servers: 100000
        labels: [{{name: small, cloud-image: img, flavor-name: s}}]
"#
    );
    let cfg_path = dir.path().join("nodepool.yaml");
    std::fs::write(&cfg_path, &yaml)?;
    let cfg = Config::from_yaml(&yaml).map_err(|e| anyhow::anyhow!("{e}"))?;
    let store = nodepool_cli::daemon::open_store(&cfg).await?;
    let zuul = Arc::new(Requestor::new(
        store.clone(),
        "8d0f7c1e6b2a4f3c9e5d7a1b2c3d4e5f",
    ));

    // A backlog is written before the launcher starts.
    let mut submitted: BTreeMap<String, Instant> = BTreeMap::new();
    let mut submit_time = Duration::ZERO;
    if backlog {
        let t = Instant::now();
        for (id, at) in futures_lite_join(n, zuul.clone()).await? {
            submitted.insert(id, at);
        }
        submit_time = t.elapsed();
    }
    let mut events = store.backend().subscribe();
    let launched = Instant::now();
    let launched_epoch_ms = epoch_ms();
    let mut child = Command::new(&launcher_bin)
        .arg("-c")
        .arg(&cfg_path)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| format!("starting {}", launcher_bin.display()))?;
    let pid = child.id();
    // Wait until the launcher registered its pool.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !backlog
        && store
            .list_components(nodepool_core::model::ComponentKind::Pool)
            .await?
            .records
            .is_empty()
    {
        if Instant::now() > deadline {
            bail!("the launcher did not register within 30 s");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let cpu_before = if backlog { 0.0 } else { cpu_seconds(pid)? };

    // The burst (a backlog is already there: its clock is the launcher's start).
    let started = if backlog { launched } else { Instant::now() };
    if !backlog {
        for (id, at) in futures_lite_join(n, zuul.clone()).await? {
            submitted.insert(id, at);
        }
        submit_time = started.elapsed();
    }
    let mut first: Option<Duration> = None;
    let mut latencies = Vec::with_capacity(n);
    let mut done: HashSet<String> = HashSet::new();
    let deadline = Instant::now() + Duration::from_secs(300);
    let check = |id: &str,
                 state: RequestState,
                 done: &mut HashSet<String>,
                 latencies: &mut Vec<Duration>,
                 first: &mut Option<Duration>| {
        if state == RequestState::Fulfilled
            && done.insert(id.to_owned())
            && let Some(at) = submitted.get(id)
        {
            first.get_or_insert_with(|| started.elapsed());
            latencies.push(if backlog {
                started.elapsed()
            } else {
                at.elapsed()
            });
        }
    };
    // The first look lists them all: some may be fulfilled already.
    let mut relist = true;
    while done.len() < n {
        let remaining = deadline.saturating_duration_since(Instant::now());
        if remaining.is_zero() {
            bail!("only {} of {n} requests fulfilled within 300 s", done.len());
        }
        // Like Zuul's scheduler, which answers from its cache of
        // `/nodepool/requests`: the requests that changed together are
        // looked up in the mirror after one sync, not read one by one (a
        // read per change cost this process and ZooKeeper CPU the
        // launcher shares on a small machine), nor listed whole (a
        // listing per change is quadratic in a 5,000 backlog).
        let mut changed: Vec<String> = Vec::new();
        if !relist {
            let take = |ev: StoreEvent, changed: &mut Vec<String>| {
                if let StoreEvent::Changed(path) = ev
                    && changed_request(&path, &done)
                {
                    changed.push(path);
                }
            };
            match tokio::time::timeout(remaining, events.recv()).await {
                Ok(Ok(ev)) => take(ev, &mut changed),
                Ok(Err(RecvError::Lagged(_))) => relist = true,
                Ok(Err(RecvError::Closed)) => bail!("store event stream closed"),
                Err(_) => {}
            }
            loop {
                match events.try_recv() {
                    Ok(ev) => take(ev, &mut changed),
                    Err(TryRecvError::Lagged(_)) => relist = true,
                    Err(_) => break,
                }
            }
        }
        if relist {
            relist = false;
            for r in store.list_requests().await?.records {
                check(
                    &r.id,
                    r.request.state,
                    &mut done,
                    &mut latencies,
                    &mut first,
                );
            }
        } else if !changed.is_empty() {
            let paths: Vec<&str> = changed.iter().map(String::as_str).collect();
            let scans = store.backend().scan_together(&paths).await?;
            for (path, scan) in paths.iter().zip(scans) {
                let Some(entry) = scan.first().filter(|e| e.path == *path) else {
                    continue;
                };
                let Ok(request) = NodeRequest::from_json(&entry.data) else {
                    continue;
                };
                let id = path.trim_start_matches("/nodepool/requests/");
                check(id, request.state, &mut done, &mut latencies, &mut first);
            }
        }
    }
    let wall = started.elapsed();
    let cpu = cpu_seconds(pid)? - cpu_before;
    // Cumulative since the launcher started (its start-up costs a few
    // dozen, noise next to a burst's).
    let traffic = Traffic::from_prometheus(&scrape(&webapp.to_string()).await?);
    let rss = peak_rss_mib(pid)?;
    latencies.sort();
    // A plain client on the run's chroot, for what the server recorded
    // and for deleting the run afterwards.
    let plain = match (&zk_server, &zk_chroot) {
        (Some(server), Some(chroot)) => Some((
            zookeeper_client::Client::connect(server)
                .await
                .with_context(|| format!("connecting to ZooKeeper at {server}"))?,
            chroot,
        )),
        _ => None,
    };
    if flag("--timeline")
        && let Some((client, chroot)) = &plain
    {
        print_timeline(client, chroot, launched_epoch_ms).await?;
    }
    // When the launcher's first write landed (its first accept creates
    // the run's lowest-numbered node), by the server's clock, which is
    // this machine's: what the launcher spent starting (process,
    // connection, reading the backlog) before it wrote at all.
    let first_write = match (backlog, &plain) {
        (true, Some((client, chroot))) => first_node_created_ms(client, chroot)
            .await?
            .map(|ms| Duration::from_millis(ms.saturating_sub(launched_epoch_ms).max(0) as u64)),
        _ => None,
    };

    // Clean up the burst (Zuul deletes fulfilled requests; nodes go used).
    for id in submitted.keys() {
        let _ = store.delete_request(id).await;
    }
    // One request on the (now idle) launcher.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let t = Instant::now();
    let id = zuul.submit(&NewRequest::new(vec!["small".into()])).await?;
    let outcome = zuul.wait(&id, Duration::from_secs(60)).await?;
    let idle = t.elapsed();
    if !matches!(outcome, nodepool_requestor::Outcome::Fulfilled(_)) {
        bail!("the idle request was not fulfilled");
    }

    let _ = Command::new("kill")
        .arg("-INT")
        .arg(pid.to_string())
        .status();
    let _ = child.wait();
    // Leave nothing behind on the shared server: the run's nodes stay
    // (ready, or deleted only partly when the launcher stops), and a tree
    // growing run after run makes the server's snapshots and garbage
    // collection slow down the next runs.
    if let Some((client, chroot)) = &plain {
        delete_tree(client, chroot).await?;
    }

    if backlog {
        println!(
            "backlog of {n} single-node requests written before the launcher started ({store_name}, simulated cloud, 0.1 s boot):"
        );
        println!("  written in          {:.3} s", submit_time.as_secs_f64());
        if let Some(w) = first_write {
            println!(
                "  first write         {:.3} s after the launcher started (connected, backlog read)",
                w.as_secs_f64()
            );
        }
        println!(
            "  first fulfilled     {:.3} s after the launcher started",
            first.unwrap_or_default().as_secs_f64()
        );
    } else {
        println!("burst of {n} single-node requests ({store_name}, simulated cloud, 0.1 s boot):");
        println!("  submitted in        {:.3} s", submit_time.as_secs_f64());
    }
    println!(
        "  all fulfilled after {:.3} s  ({:.0} requests/s)",
        wall.as_secs_f64(),
        n as f64 / wall.as_secs_f64()
    );
    let what = if backlog {
        "start→fulfilled"
    } else {
        "submit→fulfilled"
    };
    println!(
        "  {what:<19} p50 {:.3} s, p95 {:.3} s, max {:.3} s",
        percentile(&latencies, 0.5).as_secs_f64(),
        percentile(&latencies, 0.95).as_secs_f64(),
        latencies.last().copied().unwrap_or_default().as_secs_f64()
    );
    println!("  launcher CPU        {cpu:.2} s");
    println!(
        "  launcher ZooKeeper  {:.1} writes + {:.1} reads per request",
        traffic.writes / n as f64,
        traffic.reads / n as f64
    );
    println!("  launcher peak RSS   {rss:.1} MiB");
    println!(
        "one request on an idle launcher: {:.1} ms",
        idle.as_secs_f64() * 1000.0
    );
    if let Some(server) = floor_server {
        // The floor swings run to run on a shared machine: the median of
        // three.
        let kinds = [
            FloorKind::OneByOne,
            FloorKind::Transactions,
            FloorKind::WithBoot,
            FloorKind::WithBootObserved,
        ];
        let mut runs: [Vec<Duration>; 4] = Default::default();
        for _ in 0..3 {
            for (kind, times) in kinds.iter().zip(&mut runs) {
                times.push(floor(&server, n, *kind).await?);
            }
        }
        let [single, floor, booted, observed] = runs.map(|mut times| {
            times.sort();
            times[1]
        });
        // The floors' clocks start with their connection made and the
        // request ids known; the launcher's from its first write is the
        // same measure.
        let writing = first_write.filter(|w| *w < wall).map(|w| wall - w);
        let from_first_write = |floor: Duration| {
            if let Some(writing) = writing {
                println!(
                    "  floor/launcher      {:.2}  from the launcher's first write (its writing {:.3} s)",
                    floor.as_secs_f64() / writing.as_secs_f64(),
                    writing.as_secs_f64()
                );
            }
        };
        println!(
            "ZooKeeper floor (median of 3): the launcher's {} requests per request ({} writes), {REQUESTS_IN_FLIGHT} requests in flight, raw client:",
            FLOOR_REQUESTS.len(),
            FLOOR_WRITES.len()
        );
        println!(
            "  {n} requests in    {:.3} s  ({:.0} requests/s, {:.0} ZooKeeper requests/s)",
            floor.as_secs_f64(),
            n as f64 / floor.as_secs_f64(),
            (n * FLOOR_REQUESTS.len()) as f64 / floor.as_secs_f64()
        );
        println!(
            "  floor/launcher      {:.2}  (launcher all fulfilled {:.3} s)",
            floor.as_secs_f64() / wall.as_secs_f64(),
            wall.as_secs_f64()
        );
        from_first_write(floor);
        println!(
            "The same {} writes one request each (the floor before transactions):",
            FLOOR_WRITES.len()
        );
        println!(
            "  {n} requests in    {:.3} s  ({:.0} writes/s); floor/launcher {:.2}",
            single.as_secs_f64(),
            (n * FLOOR_WRITES.len()) as f64 / single.as_secs_f64(),
            single.as_secs_f64() / wall.as_secs_f64()
        );
        println!(
            "The launcher's requests with the cloud's {} s boot, pipelined as the launcher does (accepting {REQUESTS_IN_FLIGHT} at a time, launches unbounded):",
            BOOT.as_secs_f64()
        );
        println!(
            "  {n} requests in    {:.3} s; floor/launcher {:.2}",
            booted.as_secs_f64(),
            booted.as_secs_f64() / wall.as_secs_f64()
        );
        from_first_write(booted);
        println!(
            "The same with a Zuul-like cache of the tree reading every change, as during the launcher's run:"
        );
        println!(
            "  {n} requests in    {:.3} s; floor/launcher {:.2}",
            observed.as_secs_f64(),
            observed.as_secs_f64() / wall.as_secs_f64()
        );
        from_first_write(observed);
    }
    Ok(())
}

/// The writes the launcher makes for one single-node request of the
/// backlog, in its order (`launcher::executor`: accept, launch; then the
/// launch task: the server id, ready, fulfil). Reads (the records read
/// before a version-checked write where it must) are not in the floor.
const FLOOR_WRITES: [&str; 12] = [
    "create the request's lock directory (kazoo's makepath)",
    "create the request lock contender",
    "set the request pending",
    "create the node (init)",
    "create the node's lock directory",
    "create the node lock contender",
    "set the node building",
    "set the node's server id",
    "set the node ready",
    "delete the node lock contender",
    "set the request fulfilled",
    "delete the request lock contender",
];

/// How the launcher sends [`FLOOR_WRITES`] on ZooKeeper: four requests,
/// three of them transactions (`multi`), one after another per request.
const FLOOR_REQUESTS: [&str; 4] = [
    "multi: request lock directory, contender, request pending, create the node",
    "multi: node lock directory, contender, node building",
    "set the node's server id",
    "multi: node ready, node unlocked, request fulfilled, request unlocked",
];

/// The simulated cloud's boot time.
const BOOT: Duration = Duration::from_millis(100);

/// How a floor sends [`FLOOR_WRITES`].
#[derive(Clone, Copy, PartialEq)]
enum FloorKind {
    /// Each write its own request.
    OneByOne,
    /// In [`FLOOR_REQUESTS`], one request after another.
    Transactions,
    /// In [`FLOOR_REQUESTS`], as the launcher runs them: the first two
    /// (accepting) [`REQUESTS_IN_FLIGHT`] requests at a time, then the
    /// launch's two around the cloud's [`BOOT`], for every request at
    /// once. The launcher cannot beat the boot: this floor waits for it
    /// too.
    WithBoot,
    /// [`WithBoot`](Self::WithBoot) with a cache of the tree beside it
    /// that reads every change, as the requestor of the launcher's run
    /// does and as Zuul's scheduler does (it caches all of
    /// `/nodepool/requests` and `/nodepool/nodes`): the server serves
    /// those reads and sends those events during the launcher's run too.
    WithBootObserved,
}

/// Time for a raw `zookeeper-client` session to make [`FLOOR_WRITES`] for
/// `n` requests, in a fresh chroot holding `n` request records (written
/// before the clock starts, as the backlog is): as the launcher sends them
/// ([`FLOOR_REQUESTS`]), as [`FloorKind`] says.
async fn floor(server: &str, n: usize, kind: FloorKind) -> anyhow::Result<Duration> {
    use zookeeper_client as zk;
    let root = format!("/nodepool-rs-bench/floor-{}", uuid::Uuid::new_v4().simple());
    let dir = zk::CreateMode::Persistent.with_acls(zk::Acls::anyone_all());
    let plain = zk::Client::connect(server)
        .await
        .with_context(|| format!("connecting to ZooKeeper at {server}"))?;
    plain
        .mkdir(&format!("{root}/nodepool/requests"), &dir)
        .await?;
    plain
        .mkdir(&format!("{root}/nodepool/requests-lock"), &dir)
        .await?;
    plain.mkdir(&format!("{root}/nodepool/nodes"), &dir).await?;
    let client = plain
        .clone()
        .chroot(root.as_str())
        .map_err(|_| anyhow::anyhow!("invalid chroot {root}"))?;
    // Records of the sizes the launcher writes.
    let request = format!(
        r#"{{"state": "requested", "node_types": ["small"], "pad": "{}"}}"#,
        "r".repeat(300)
    );
    let node = format!(r#"{{"state": "building", "pad": "{}"}}"#, "n".repeat(800));
    let seq = zk::CreateMode::PersistentSequential.with_acls(zk::Acls::anyone_all());
    let contender = zk::CreateMode::EphemeralSequential.with_acls(zk::Acls::anyone_all());
    let mut ids = Vec::with_capacity(n);
    for _ in 0..n {
        let (_, s) = client
            .create("/nodepool/requests/100-", request.as_bytes(), &seq)
            .await?;
        ids.push(format!("100-{s}"));
    }
    let single = async |id: String| -> anyhow::Result<()> {
        let c = &client;
        let lock_dir = format!("/nodepool/requests-lock/{id}");
        c.create(&lock_dir, b"", &dir).await?;
        let lock = format!("{lock_dir}/{}__lock__", uuid::Uuid::new_v4().simple());
        let (_, s) = c.create(&lock, b"", &contender).await?;
        let request_lock = format!("{lock}{s}");
        let path = format!("/nodepool/requests/{id}");
        let st = c.set_data(&path, request.as_bytes(), Some(0)).await?;
        let (_, s) = c.create("/nodepool/nodes/", node.as_bytes(), &seq).await?;
        let node_path = format!("/nodepool/nodes/{s}");
        c.create(&format!("{node_path}/lock"), b"", &dir).await?;
        let lock = format!("{node_path}/lock/{}__lock__", uuid::Uuid::new_v4().simple());
        let (_, s) = c.create(&lock, b"", &contender).await?;
        let node_lock = format!("{lock}{s}");
        let ns = c.set_data(&node_path, node.as_bytes(), Some(0)).await?;
        let ns = c
            .set_data(&node_path, node.as_bytes(), Some(ns.version))
            .await?;
        c.set_data(&node_path, node.as_bytes(), Some(ns.version))
            .await?;
        c.delete(&node_lock, None).await?;
        c.set_data(&path, request.as_bytes(), Some(st.version))
            .await?;
        c.delete(&request_lock, None).await?;
        Ok(())
    };
    let created = |r: Option<zk::MultiWriteResult>| match r {
        Some(zk::MultiWriteResult::Create { path, .. }) => Ok(path),
        other => Err(anyhow::anyhow!("unexpected multi result {other:?}")),
    };
    let accept = async |id: String| -> anyhow::Result<(String, String, String, String)> {
        let c = &client;
        let lock_dir = format!("/nodepool/requests-lock/{id}");
        let lock = format!("{lock_dir}/{}__lock__", uuid::Uuid::new_v4().simple());
        let path = format!("/nodepool/requests/{id}");
        let mut m = c.new_multi_writer();
        m.add_create(&lock_dir, b"", &dir)?;
        m.add_create(&lock, b"", &contender)?;
        m.add_set_data(&path, request.as_bytes(), Some(0))?;
        m.add_create("/nodepool/nodes/", node.as_bytes(), &seq)?;
        let mut results = m.commit().await?.into_iter();
        let request_lock = created(results.nth(1))?;
        let node_path = created(results.nth(1))?;
        let node_lock_dir = format!("{node_path}/lock");
        let lock = format!("{node_lock_dir}/{}__lock__", uuid::Uuid::new_v4().simple());
        let mut m = c.new_multi_writer();
        m.add_create(&node_lock_dir, b"", &dir)?;
        m.add_create(&lock, b"", &contender)?;
        m.add_set_data(&node_path, node.as_bytes(), Some(0))?;
        let node_lock = created(m.commit().await?.into_iter().nth(1))?;
        Ok((path, request_lock, node_path, node_lock))
    };
    let launch =
        async |(path, request_lock, node_path, node_lock): (String, String, String, String),
               boot: Duration|
               -> anyhow::Result<()> {
            let c = &client;
            c.set_data(&node_path, node.as_bytes(), Some(1)).await?;
            if !boot.is_zero() {
                tokio::time::sleep(boot).await;
            }
            let mut m = c.new_multi_writer();
            m.add_set_data(&node_path, node.as_bytes(), Some(2))?;
            m.add_delete(&node_lock, None)?;
            m.add_set_data(&path, request.as_bytes(), Some(1))?;
            m.add_delete(&request_lock, None)?;
            m.commit().await?;
            Ok(())
        };
    // The observer loads its mirror (the requests written above) before
    // the clock starts, as the launcher's run's requestor has.
    let observer = if matches!(kind, FloorKind::WithBootObserved) {
        let (host, port) = server
            .rsplit_once(':')
            .context("the ZooKeeper server is host:port")?;
        let yaml = format!(
            "zookeeper-servers: [{{host: '{host}', port: {port}, chroot: '{root}'}}]\nlabels: []\nproviders: []\n"
        );
        let cfg = Config::from_yaml(&yaml).map_err(|e| anyhow::anyhow!("{e}"))?;
        let store = nodepool_cli::daemon::open_store(&cfg).await?;
        let loaded = store.list_requests().await?.records.len();
        if loaded != n {
            bail!("the floor's observer sees {loaded} of {n} requests");
        }
        Some(store)
    } else {
        None
    };
    let t = Instant::now();
    match kind {
        FloorKind::OneByOne => {
            futures::stream::iter(ids)
                .map(single)
                .buffer_unordered(REQUESTS_IN_FLIGHT)
                .try_collect::<()>()
                .await?
        }
        FloorKind::Transactions => {
            futures::stream::iter(ids)
                .map(async |id| launch(accept(id).await?, Duration::ZERO).await)
                .buffer_unordered(REQUESTS_IN_FLIGHT)
                .try_collect::<()>()
                .await?
        }
        FloorKind::WithBoot | FloorKind::WithBootObserved => {
            futures::stream::iter(ids)
                .map(accept)
                .buffer_unordered(REQUESTS_IN_FLIGHT)
                .map(async |accepted| launch(accepted?, BOOT).await)
                .buffer_unordered(n.max(1))
                .try_collect::<()>()
                .await?
        }
    }
    // The launcher's run ends when its requestor has seen the last
    // request fulfilled: this one when the observer has caught up.
    if let Some(o) = &observer {
        o.list_requests().await?;
    }
    let took = t.elapsed();
    drop(observer);
    // Leave nothing behind on the shared server.
    delete_tree(&plain, &root).await?;
    Ok(took)
}

/// Prints, per 50 ms since the launcher started, how many of the run's
/// nodes were created (a request accepted) and last written (ready), by
/// the server's clock: where a run's time goes, without the launcher's
/// own logging in it.
async fn print_timeline(
    client: &zookeeper_client::Client,
    chroot: &str,
    launched_ms: i64,
) -> anyhow::Result<()> {
    let nodes = format!("{chroot}/nodepool/nodes");
    let names = client.list_children(&nodes).await?;
    let stats: Vec<_> = futures::stream::iter(names)
        .map(|n| client.check_stat(&format!("{nodes}/{n}")))
        .buffer_unordered(REQUESTS_IN_FLIGHT)
        .try_collect()
        .await?;
    let bucket = |ms: i64| ((ms - launched_ms).max(0) / 50) as usize;
    let mut created = BTreeMap::<usize, usize>::new();
    let mut written = BTreeMap::<usize, usize>::new();
    for stat in stats.into_iter().flatten() {
        *created.entry(bucket(stat.ctime)).or_default() += 1;
        *written.entry(bucket(stat.mtime)).or_default() += 1;
    }
    let last = created
        .keys()
        .chain(written.keys())
        .max()
        .copied()
        .unwrap_or(0);
    println!("timeline (per 50 ms since the launcher started): nodes created / last written");
    for b in 0..=last {
        println!(
            "  {:>5} ms  {:>5} / {:>5}",
            b * 50,
            created.get(&b).copied().unwrap_or(0),
            written.get(&b).copied().unwrap_or(0)
        );
    }
    Ok(())
}

/// Milliseconds since the epoch, as ZooKeeper stamps a znode's ctime.
fn epoch_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or_default()
}

/// The ctime of the lowest-numbered node under `chroot` (sequential
/// names: the first created), if any.
async fn first_node_created_ms(
    client: &zookeeper_client::Client,
    chroot: &str,
) -> anyhow::Result<Option<i64>> {
    let nodes = format!("{chroot}/nodepool/nodes");
    let Some(first) = client.list_children(&nodes).await?.into_iter().min() else {
        return Ok(None);
    };
    Ok(client
        .check_stat(&format!("{nodes}/{first}"))
        .await?
        .map(|stat| stat.ctime))
}

/// Deletes `path` and everything under it, siblings concurrently.
async fn delete_tree(client: &zookeeper_client::Client, path: &str) -> anyhow::Result<()> {
    let children = client.list_children(path).await?;
    futures::stream::iter(children)
        .map(|c| {
            let child = format!("{path}/{c}");
            async move { Box::pin(delete_tree(client, &child)).await }
        })
        .buffer_unordered(REQUESTS_IN_FLIGHT)
        .try_collect::<()>()
        .await?;
    match client.delete(path, None).await {
        Ok(()) | Err(zookeeper_client::Error::NoNode) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Submits `n` requests with up to 64 in flight, as a busy Zuul does.
async fn futures_lite_join(
    n: usize,
    zuul: Arc<Requestor>,
) -> anyhow::Result<Vec<(String, Instant)>> {
    let mut out = Vec::with_capacity(n);
    let mut set = tokio::task::JoinSet::new();
    let mut next = 0;
    while next < n || !set.is_empty() {
        while next < n && set.len() < 64 {
            let z = zuul.clone();
            set.spawn(async move {
                let at = Instant::now();
                z.submit(&NewRequest::new(vec!["small".into()]))
                    .await
                    .map(|id| (id, at))
            });
            next += 1;
        }
        if let Some(r) = set.join_next().await {
            out.push(r??);
        }
    }
    Ok(out)
}

/// Whether a changed path is a request still waiting to be seen fulfilled.
fn changed_request(path: &str, done: &HashSet<String>) -> bool {
    path.strip_prefix("/nodepool/requests/")
        .is_some_and(|id| !id.contains('/') && !done.contains(id))
}
