//! Gauges on tokio's paused clock: two launchers share one in-memory
//! store, each sends statsd lines to its own real UDP socket. Only the
//! holder of the stats election sends the global gauges (nodes by state,
//! provider and label; requests), each sends its own, and gauges go out
//! once per `stats_interval` however fast passes run.

use std::collections::BTreeMap;
use std::net::UdpSocket;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nodepool_core::config::Config;
use nodepool_core::launcher::{Launcher, LauncherSettings, LauncherStatus, Metrics};
use nodepool_core::model::NodeState;
use nodepool_core::provider::Provider;
use nodepool_core::runtime::{Clock, ProviderFactory};
use nodepool_core::store::{Store, paths};
use nodepool_model::store::MemoryStore;
use nodepool_simulated::SimulatedProvider;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

const CONFIG: &str = r#"
labels:
  - name: small
    min-ready: 2
providers:
  - name: sim
    driver: simulated
    simulation:
      boot-delay: 1
    cloud-images: [{name: img}]
    pools:
      - name: main
        max-servers: 10
        labels:
          - {name: small, cloud-image: img, flavor-name: "Fake Flavor"}
"#;

const INTERVAL: Duration = Duration::from_secs(10);

/// A statsd server: a real UDP socket read by a thread of its own (the
/// paused clock does not stop it), keeping every line until `END`.
struct StatsdSink {
    addr: String,
    lines: Arc<Mutex<Vec<String>>>,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl StatsdSink {
    fn start() -> Self {
        let socket = UdpSocket::bind("127.0.0.1:0").expect("bind a UDP socket");
        socket
            .set_read_timeout(Some(Duration::from_secs(60)))
            .expect("read timeout");
        let addr = socket.local_addr().expect("address").to_string();
        let lines: Arc<Mutex<Vec<String>>> = Arc::default();
        let keep = lines.clone();
        let reader = std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            loop {
                let n = socket.recv(&mut buf).expect("a statsd packet within 60 s");
                let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                if text == "END" {
                    return;
                }
                keep.lock()
                    .expect("lines")
                    .extend(text.lines().map(str::to_owned));
            }
        });
        StatsdSink {
            addr,
            lines,
            reader: Some(reader),
        }
    }

    /// Every line received, once everything sent before this call is in
    /// (loopback delivers in order: the marker comes last).
    fn finish(mut self) -> Vec<String> {
        let s = UdpSocket::bind("127.0.0.1:0").expect("bind");
        s.send_to(b"END", &self.addr).expect("send the end marker");
        if let Some(r) = self.reader.take() {
            r.join().expect("reader thread");
        }
        self.lines.lock().expect("lines").clone()
    }

    /// Lines received so far.
    fn lines(&self) -> Vec<String> {
        self.lines.lock().expect("lines").clone()
    }
}

struct Running {
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<()>,
    status: Arc<LauncherStatus>,
    metrics: Arc<Metrics>,
}

fn start(store: Store, host: &str, statsd: &str, cloud: Arc<SimulatedProvider>) -> Running {
    let cfg = Arc::new(Config::from_yaml(CONFIG).expect("valid config"));
    let factory: ProviderFactory = Arc::new(move |_| Ok(cloud.clone() as Arc<dyn Provider>));
    let metrics = Arc::new(Metrics::with_statsd(statsd).expect("statsd client"));
    let launcher = Launcher::new(
        store,
        factory,
        LauncherSettings {
            hostname: host.into(),
            // Passes every 20 ms at least: 500 per gauge interval.
            max_pass_interval: Duration::from_millis(20),
            stats_interval: INTERVAL,
            registry_settle: Duration::from_millis(100),
            clock: Clock::tokio(),
            ..LauncherSettings::default()
        },
    )
    .with_metrics(metrics.clone());
    let status = launcher.status();
    let (tx, rx) = watch::channel(cfg);
    let shutdown = CancellationToken::new();
    let stop = shutdown.clone();
    let task = tokio::spawn(async move {
        // The sender lives as long as the launcher.
        let _config = tx;
        launcher.run(rx, stop).await.expect("launcher runs");
    });
    Running {
        shutdown,
        task,
        status,
        metrics,
    }
}

impl Running {
    async fn stop(self) {
        self.shutdown.cancel();
        self.task.await.expect("launcher task");
    }
}

/// How many times each gauge name was sent.
fn gauge_counts(lines: &[String]) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for l in lines {
        if let Some((name, rest)) = l.split_once(':')
            && rest.ends_with("|g")
        {
            *out.entry(name.to_owned()).or_insert(0) += 1;
        }
    }
    out
}

fn is_global(name: &str) -> bool {
    name.starts_with("nodepool.nodes.")
        || name.starts_with("nodepool.label.")
        || name.starts_with("nodepool.requests.")
        || (name.starts_with("nodepool.provider.") && name.contains(".nodes."))
}

/// Who holds the stats election: the data of its lowest contender.
async fn election_holder(store: &Store) -> Option<String> {
    let backend = store.backend();
    let mut children = backend
        .children(paths::STATS_ELECTION)
        .await
        .unwrap_or_default();
    children.sort_by_key(|c| paths::lock_contender_sequence(c));
    let first = children.first()?;
    let (data, _) = backend
        .get(&format!("{}/{first}", paths::STATS_ELECTION))
        .await
        .expect("read the contender")?;
    Some(String::from_utf8_lossy(&data).into_owned())
}

#[tokio::test(start_paused = true)]
async fn one_launcher_sends_the_global_gauges_once_per_interval() {
    let memory = MemoryStore::new();
    let store_a = Store::new(Arc::new(memory.clone()));
    let store_b = Store::new(Arc::new(memory.new_session()));
    let cfg = Config::from_yaml(CONFIG).expect("valid config");
    let cloud = Arc::new(SimulatedProvider::new(cfg.provider("sim").expect("sim")).expect("cloud"));
    let sink_a = StatsdSink::start();
    let sink_b = StatsdSink::start();
    let a = start(store_a.clone(), "host-a", &sink_a.addr, cloud.clone());
    // A first, so it wins the election.
    a.status.passes().more(2).await.expect("a runs");
    let b = start(store_b, "host-b", &sink_b.addr, cloud.clone());
    b.status.passes().more(2).await.expect("b runs");
    assert_eq!(
        election_holder(&store_a).await,
        Some(format!("host-a-{}", std::process::id())),
        "the election's identifier is <hostname>-<pid>"
    );

    // 35 s on the paused clock: gauges due at about 0, 10, 20 and 30 s.
    let passes_before = a.status.passes().count();
    tokio::time::sleep(Duration::from_secs(35)).await;
    let passes = a.status.passes().count() - passes_before;
    assert!(passes >= 1000, "passes run fast: {passes} in 35 s");
    let ready = store_a
        .list_nodes()
        .await
        .expect("nodes")
        .records
        .iter()
        .filter(|n| n.node.state == NodeState::Ready)
        .count();
    assert_eq!(ready, 2, "min-ready was served");
    a.stop().await;
    b.stop().await;

    let lines_a = sink_a.finish();
    let lines_b = sink_b.finish();
    let counts_a = gauge_counts(&lines_a);
    let counts_b = gauge_counts(&lines_b);
    // The leader: every global gauge once per interval, no more.
    for name in [
        "nodepool.nodes.ready",
        "nodepool.nodes.building",
        "nodepool.provider.sim.nodes.ready",
        "nodepool.label.small.nodes.ready",
        "nodepool.requests.fulfilled",
    ] {
        assert_eq!(counts_a.get(name), Some(&4), "{name} from a: {counts_a:?}");
    }
    assert!(
        lines_a
            .iter()
            .rev()
            .any(|l| l == "nodepool.nodes.ready:2|g"),
        "the last report counts the two ready nodes: {lines_a:?}"
    );
    // The other: none of them, but its own gauges, also once per interval.
    let globals_b: Vec<&String> = counts_b.keys().filter(|n| is_global(n)).collect();
    assert!(globals_b.is_empty(), "b sent global gauges: {globals_b:?}");
    for counts in [&counts_a, &counts_b] {
        assert_eq!(
            counts.get("nodepool.provider.sim.max_servers"),
            Some(&4),
            "{counts:?}"
        );
        assert_eq!(
            counts.get("nodepool.provider.sim.pool.main.addressable_requests"),
            Some(&4),
            "{counts:?}"
        );
    }
    assert_eq!(
        counts_b.get("nodepool.launcher.host-b.zk.client.connection_queue"),
        Some(&4),
        "{counts_b:?}"
    );
    assert_eq!(
        counts_b.get("nodepool.launcher.host-b.zk.connected"),
        Some(&4),
        "{counts_b:?}"
    );
    // Node gauges are zero-filled for every state.
    for st in NodeState::ALL {
        let name = format!("nodepool.label.small.nodes.{}", st.as_str());
        assert!(counts_a.contains_key(&name), "{name} missing: {counts_a:?}");
    }
}

#[tokio::test(start_paused = true)]
async fn the_other_launcher_takes_over_when_the_leader_stops() {
    let memory = MemoryStore::new();
    let store_a = Store::new(Arc::new(memory.clone()));
    let store_b = Store::new(Arc::new(memory.new_session()));
    let cfg = Config::from_yaml(CONFIG).expect("valid config");
    let cloud = Arc::new(SimulatedProvider::new(cfg.provider("sim").expect("sim")).expect("cloud"));
    let sink_a = StatsdSink::start();
    let sink_b = StatsdSink::start();
    let a = start(store_a, "host-a", &sink_a.addr, cloud.clone());
    a.status.passes().more(2).await.expect("a runs");
    let b = start(store_b.clone(), "host-b", &sink_b.addr, cloud.clone());
    b.status.passes().more(2).await.expect("b runs");
    tokio::time::sleep(Duration::from_secs(15)).await;
    assert!(
        !sink_b.lines().iter().any(|l| is_global(l)),
        "b is not the leader yet"
    );
    assert!(
        b.metrics
            .value(
                &nodepool_core::launcher::metrics::families::NODES,
                &[("state", "ready"), ("provider", "sim"), ("label", "small")]
            )
            .is_none(),
        "no node family on the launcher that does not report them"
    );
    a.stop().await;
    // b tries the election when its gauges are next due (within one
    // interval) and reports from then on.
    tokio::time::sleep(INTERVAL + Duration::from_secs(1)).await;
    assert_eq!(
        election_holder(&store_b).await,
        Some(format!("host-b-{}", std::process::id()))
    );
    assert!(
        b.metrics
            .value(
                &nodepool_core::launcher::metrics::families::NODES,
                &[("state", "ready"), ("provider", "sim"), ("label", "small")]
            )
            .is_some()
    );
    b.stop().await;
    let lines_b = sink_b.finish();
    assert!(
        lines_b
            .iter()
            .any(|l| l.starts_with("nodepool.nodes.ready:")),
        "b reports the global gauges after a stopped: {lines_b:?}"
    );
    drop(sink_a.finish());
}
