//! The stats election on the real stores (ZooKeeper and a SQLite file):
//! two launchers on one store, each sending statsd lines to its own real
//! UDP socket. The holder of `/nodepool/elections/stats` (identifier
//! `<hostname>-<pid>`, kazoo's `Election`) alone sends the global gauges
//! and exposes the `nodepool_nodes` family; the other takes over when it
//! stops.

use std::net::UdpSocket;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nodepool_core::launcher::metrics::families;
use nodepool_core::launcher::{Launcher, LauncherSettings, Metrics, ObserverIntervals};
use nodepool_core::store::{Store, paths};
use nodepool_tests::{Backend, Clouds, TestEnv, eventually, shared_factory};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

const BODY: &str = r#"
labels:
  - name: small
    min-ready: 1
providers:
  - name: sim
    driver: simulated
    simulation:
      boot-delay: 0.1
    cloud-images: [{name: img}]
    pools:
      - name: main
        max-servers: 4
        labels:
          - {name: small, cloud-image: img, flavor-name: "Fake Flavor"}
"#;

const LIMIT: Duration = Duration::from_secs(60);

/// A statsd server: a real UDP socket read by a thread of its own.
struct StatsdSink {
    addr: String,
    lines: Arc<Mutex<Vec<String>>>,
}

impl StatsdSink {
    fn start() -> Self {
        let socket = UdpSocket::bind("127.0.0.1:0").expect("bind a UDP socket");
        let addr = socket.local_addr().expect("address").to_string();
        let lines: Arc<Mutex<Vec<String>>> = Arc::default();
        let keep = lines.clone();
        // Ends with the test process; it only ever reads.
        std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            while let Ok(n) = socket.recv(&mut buf) {
                let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                if let Ok(mut l) = keep.lock() {
                    l.extend(text.lines().map(str::to_owned));
                }
            }
        });
        StatsdSink { addr, lines }
    }

    fn count(&self, prefix: &str) -> usize {
        self.lines
            .lock()
            .expect("lines")
            .iter()
            .filter(|l| l.starts_with(prefix))
            .count()
    }

    fn global_lines(&self) -> Vec<String> {
        self.lines
            .lock()
            .expect("lines")
            .iter()
            .filter(|l| {
                l.starts_with("nodepool.nodes.")
                    || l.starts_with("nodepool.label.")
                    || l.starts_with("nodepool.requests.")
            })
            .cloned()
            .collect()
    }
}

struct Running {
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<()>,
    metrics: Arc<Metrics>,
}

async fn start(env: &TestEnv, host: &str, sink: &StatsdSink, clouds: &Clouds) -> Running {
    let cfg = env.config(BODY);
    let store = env.store(&cfg).await;
    let metrics = Arc::new(Metrics::with_statsd(&sink.addr).expect("statsd client"));
    let launcher = Launcher::new(
        store.clone(),
        shared_factory(clouds),
        LauncherSettings {
            hostname: host.into(),
            observer: ObserverIntervals {
                instances: Duration::from_secs(1),
                ..ObserverIntervals::default()
            },
            stats_interval: Duration::from_millis(300),
            shutdown_grace: Duration::from_secs(10),
            ..LauncherSettings::default()
        },
    )
    .with_metrics(metrics.clone());
    let status = launcher.status();
    let (tx, rx) = watch::channel(Arc::new(cfg));
    let shutdown = CancellationToken::new();
    let stop = shutdown.clone();
    let task = tokio::spawn(async move {
        let _config = tx;
        launcher.run(rx, stop).await.expect("launcher runs");
        let _ = store.backend().close().await;
    });
    tokio::time::timeout(LIMIT, status.passes().more(1))
        .await
        .expect("a first pass")
        .expect("the launcher runs");
    Running {
        shutdown,
        task,
        metrics,
    }
}

impl Running {
    async fn stop(self) {
        self.shutdown.cancel();
        self.task.await.expect("launcher task");
    }

    fn reports_nodes(&self) -> bool {
        self.metrics
            .value(
                &families::NODES,
                &[("state", "ready"), ("provider", "sim"), ("label", "small")],
            )
            .is_some()
    }
}

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
        .ok()??;
    Some(String::from_utf8_lossy(&data).into_owned())
}

async fn one_launcher_reports_the_global_gauges(backend: Backend) {
    let env = TestEnv::new(backend);
    let clouds = Clouds::default();
    let sink_a = StatsdSink::start();
    let sink_b = StatsdSink::start();
    let a = start(&env, "stats-a", &sink_a, &clouds).await;
    let b = start(&env, "stats-b", &sink_b, &clouds).await;
    let observer = env.store(&env.config(BODY)).await;
    let pid = std::process::id();
    assert_eq!(
        election_holder(&observer).await,
        Some(format!("stats-a-{pid}")),
        "a passed first and holds the election, identified as <hostname>-<pid>"
    );
    // The ready node is reported by a, several times, and never by b,
    // though both send their own gauges all along.
    eventually("a reports the ready node", LIMIT, || async {
        sink_a
            .lines
            .lock()
            .expect("lines")
            .iter()
            .any(|l| l == "nodepool.nodes.ready:1|g")
    })
    .await;
    eventually("three reports from each", LIMIT, || async {
        sink_a.count("nodepool.nodes.ready:") >= 3
            && sink_b.count("nodepool.provider.sim.max_servers:") >= 3
    })
    .await;
    assert_eq!(sink_b.global_lines(), Vec::<String>::new());
    assert!(sink_b.count("nodepool.launcher.stats-b.zk.connected:1|g") >= 1);
    assert!(a.reports_nodes());
    assert!(!b.reports_nodes());
    assert_eq!(a.metrics.value(&families::STATS_LEADER, &[]), Some(1.0));
    assert_eq!(b.metrics.value(&families::STATS_LEADER, &[]), Some(0.0));

    // a stops: b wins the election and reports from its next interval.
    a.stop().await;
    eventually("b takes over the global gauges", LIMIT, || async {
        sink_b.count("nodepool.nodes.ready:") >= 1
    })
    .await;
    assert_eq!(
        election_holder(&observer).await,
        Some(format!("stats-b-{pid}"))
    );
    assert!(b.reports_nodes());
    b.stop().await;
    let _ = observer.backend().close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_launcher_reports_the_global_gauges_zookeeper() {
    one_launcher_reports_the_global_gauges(Backend::ZooKeeper).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_launcher_reports_the_global_gauges_sqlite() {
    one_launcher_reports_the_global_gauges(Backend::Sqlite).await;
}
