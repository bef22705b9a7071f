//! Issue 12: a failing cloud must not strand work. One real
//! `nodepool-launcher` process serves two simulated clouds from one store
//! (a real ZooKeeper, a real SQLite file); both clouds live in a state file
//! this test opens too, so it can make the preferred cloud's API hang,
//! answer 500 or answer 429 with a `Retry-After` while the launcher runs,
//! and clear the fault again.
//!
//! What must hold: a burst of requests both clouds can serve is served by
//! the healthy one, well within a deadline far below the old failover time
//! (nodes x launch-retries x api-timeout); requests only the failing cloud
//! serves are not failed while it fails, the `nodepool request-list` CLI
//! says why they wait, and they are fulfilled once the fault is cleared;
//! when every node has been returned, neither cloud holds a server.
//!
//! Waits are for real conditions with deadlines; nothing sleeps for an
//! outcome.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use nodepool_core::config::{ApiFault, Config};
use nodepool_core::model::{ComponentKind, RequestState};
use nodepool_core::store::Store;
use nodepool_requestor::{NewRequest, NodeSet, Outcome, Requestor};
use nodepool_simulated::SimulatedProvider;
use nodepool_tests::{Backend, Daemon, TestEnv, workspace_binary};

/// `bad` is preferred (priority 50) and the only one serving `gpu`; its
/// calls are given up after 3 s. Both clouds share `clouds.json` beside
/// the configuration file.
const BODY: &str = r#"
labels:
  - name: small
  - name: gpu
providers:
  - name: bad
    driver: simulated
    priority: 50
    simulation:
      api-timeout: 3
      boot-delay: 0.5
      delete-delay: 0.1
      state-file: clouds.json
      flavors: [{name: s, vcpus: 1, ram: 1024}]
    cloud-images: [{name: img}]
    pools:
      - name: main
        max-servers: 40
        labels:
          - {name: small, cloud-image: img, flavor-name: s}
          - {name: gpu, cloud-image: img, flavor-name: s}
  - name: good
    driver: simulated
    priority: 100
    simulation:
      boot-delay: 0.5
      delete-delay: 0.1
      state-file: clouds.json
      flavors: [{name: s, vcpus: 1, ram: 1024}]
    cloud-images: [{name: img}]
    pools:
      - name: main
        max-servers: 40
        labels:
          - {name: small, cloud-image: img, flavor-name: s}
"#;

/// The burst: requests both clouds serve.
const BURST: usize = 16;

/// Far below the old failover (16 nodes x 3 retries x 3 s = 144 s, and an
/// hour at the default 60 s api-timeout), far above what it takes.
const SERVED: Duration = Duration::from_secs(60);

/// Cleanup after the nodes were returned.
const CLEANUP: Duration = Duration::from_secs(60);

macro_rules! on_both_stores {
    ($($name:ident),* $(,)?) => {
        mod zookeeper {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(nodepool_tests::Backend::ZooKeeper).await;
                }
            )*
        }
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(nodepool_tests::Backend::Sqlite).await;
                }
            )*
        }
    };
}

on_both_stores!(
    a_hung_cloud_is_routed_around,
    a_cloud_answering_500_is_routed_around,
    a_rate_limited_cloud_is_routed_around,
);

async fn a_hung_cloud_is_routed_around(backend: Backend) {
    routed_around(backend, ApiFault::Hang).await;
}

async fn a_cloud_answering_500_is_routed_around(backend: Backend) {
    routed_around(backend, ApiFault::ServerError).await;
}

async fn a_rate_limited_cloud_is_routed_around(backend: Backend) {
    routed_around(
        backend,
        ApiFault::RateLimit {
            retry_after: Some(Duration::from_secs(5)),
        },
    )
    .await;
}

/// Polls `check` every 100 ms until it returns `Ok`; after `limit`, fails
/// with what the last look found.
async fn until<F, Fut, T>(what: &str, limit: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, String>>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        match check().await {
            Ok(v) => return v,
            Err(why) => assert!(
                tokio::time::Instant::now() < deadline,
                "{what}: not reached within {limit:?}; last look: {why}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Starts a `nodepool-launcher` process on the configuration file.
fn launcher(bin: &Path, env: &TestEnv, config: &Path) -> Daemon {
    let mut cmd = Command::new(bin);
    cmd.arg("-c")
        .arg(config)
        .arg("--no-webapp")
        .current_dir(env.dir.path())
        .env(
            "RUST_LOG",
            std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
        );
    Daemon::spawn("launcher", cmd, &env.dir.path().join("launcher.log"))
}

/// Registered pool components by provider, once there are two.
async fn pool_ids(store: &Store) -> BTreeSet<String> {
    until("pools registered", Duration::from_secs(60), || async {
        let pools = store
            .list_components(ComponentKind::Pool)
            .await
            .map_err(|e| e.to_string())?
            .records;
        if pools.len() == 2 {
            Ok(pools.into_iter().filter_map(|(_, c)| c.id).collect())
        } else {
            Err(format!("{} pools", pools.len()))
        }
    })
    .await
}

/// The provider of every node of a fulfilled request.
async fn providers_of(store: &Store, nodes: &[String]) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for n in nodes {
        let node = store.get_node(n).await.expect("get").expect("node exists");
        out.insert(node.value.provider.clone());
    }
    out
}

async fn routed_around(backend: Backend, fault: ApiFault) {
    let env = TestEnv::new(backend);
    let config_path = env.dir.path().join("nodepool.yaml");
    std::fs::write(&config_path, format!("{}{BODY}", env.store_yaml()))
        .expect("write the configuration");
    let cfg = Config::load(&config_path, None).expect("valid configuration");
    // The clouds the launcher opens: this process sees and drives them.
    let bad = SimulatedProvider::new(cfg.provider("bad").expect("bad")).expect("bad's cloud");
    let good = SimulatedProvider::new(cfg.provider("good").expect("good")).expect("good's cloud");
    let (launcher_bin, cli_bin) = tokio::task::spawn_blocking(|| {
        (
            workspace_binary("nodepool-cli", "nodepool-launcher"),
            workspace_binary("nodepool-cli", "nodepool"),
        )
    })
    .await
    .expect("build the binaries");
    let zuul = Requestor::new(env.store(&cfg).await, "cloud-faults-zuul");
    let store = zuul.store().clone();
    let mut daemon = launcher(&launcher_bin, &env, &config_path);
    pool_ids(&store).await;

    // The preferred cloud's API fails, then the burst comes.
    bad.set_api_fault(Some(fault)).await;
    let started = tokio::time::Instant::now();
    let mut small = Vec::new();
    for i in 0..BURST {
        let labels = vec!["small".to_owned(); 1 + i % 2];
        small.push(zuul.submit(&NewRequest::new(labels)).await.expect("submit"));
    }
    let mut gpu = Vec::new();
    for _ in 0..2 {
        gpu.push(
            zuul.submit(&NewRequest::new(vec!["gpu".into()]))
                .await
                .expect("submit"),
        );
    }
    let mut sets: Vec<NodeSet> = Vec::new();
    for id in &small {
        let left = SERVED.saturating_sub(started.elapsed());
        let Outcome::Fulfilled(req) = zuul.wait(id, left).await.unwrap_or_else(|e| {
            panic!(
                "{fault:?}: request {id} not served within {SERVED:?}: {e}\n{}",
                daemon.log()
            )
        }) else {
            panic!("{fault:?}: request {id} failed\n{}", daemon.log())
        };
        assert_eq!(
            providers_of(&store, &req.value.nodes).await,
            BTreeSet::from(["good".to_owned()]),
            "{fault:?}: request {id}"
        );
        sets.push(zuul.accept(id, &req.value).await.expect("accept"));
    }
    eprintln!(
        "{backend:?} {fault:?}: {BURST} requests served by the healthy cloud in {:?}",
        started.elapsed()
    );

    // The gpu requests wait, unfailed, and the CLI says why.
    let notes = until(
        "request-list to name the unavailable provider",
        Duration::from_secs(30),
        || async {
            let out = Command::new(&cli_bin)
                .arg("-c")
                .arg(&config_path)
                .args(["request-list", "--json"])
                .current_dir(env.dir.path())
                .output()
                .map_err(|e| format!("cannot run nodepool: {e}"))?;
            let listing: serde_json::Value = serde_json::from_slice(&out.stdout)
                .map_err(|e| format!("{e}: {}", String::from_utf8_lossy(&out.stderr)))?;
            let rows = listing.as_array().cloned().unwrap_or_default();
            let notes: Vec<String> = rows
                .iter()
                .filter(|r| gpu.iter().any(|id| r["id"] == id.as_str()))
                .filter_map(|r| r["unavailable_providers"][0].as_str().map(str::to_owned))
                .collect();
            if notes.len() == gpu.len() {
                Ok(notes)
            } else {
                Err(format!("{rows:?}"))
            }
        },
    )
    .await;
    for n in &notes {
        assert!(n.starts_with("bad: unavailable for "), "{n}");
    }
    for id in &gpu {
        let r = store.get_request(id).await.expect("get").expect("request");
        assert_eq!(
            r.value.state,
            RequestState::Requested,
            "{fault:?}: {id} waits"
        );
        assert!(r.value.declined_by.is_empty(), "{fault:?}: {id}");
    }

    // The fault is cleared: a probe finds the cloud again, and the waiting
    // requests are served there.
    bad.set_api_fault(None).await;
    for id in &gpu {
        let Outcome::Fulfilled(req) = zuul.wait(id, SERVED).await.unwrap_or_else(|e| {
            panic!("{fault:?}: {id} after the recovery: {e}\n{}", daemon.log())
        }) else {
            panic!("{fault:?}: request {id} failed\n{}", daemon.log())
        };
        assert_eq!(
            providers_of(&store, &req.value.nodes).await,
            BTreeSet::from(["bad".to_owned()])
        );
        sets.push(zuul.accept(id, &req.value).await.expect("accept"));
    }

    // Every node is returned; nothing is left in either cloud.
    for mut set in sets {
        zuul.use_nodes(&mut set, "org/project")
            .await
            .expect("in-use");
        zuul.return_nodes(set).await.expect("used");
    }
    until("every node and server deleted", CLEANUP, || async {
        let nodes = store.list_nodes().await.map_err(|e| e.to_string())?.records;
        let (b, g) = (bad.server_count().await, good.server_count().await);
        if nodes.is_empty() && b == 0 && g == 0 {
            Ok(())
        } else {
            Err(format!(
                "nodes {:?}; servers: bad {b}, good {g}",
                nodes
                    .iter()
                    .map(|n| (&n.id, &n.node.provider, n.node.state))
                    .collect::<Vec<_>>()
            ))
        }
    })
    .await;

    let log = daemon.log();
    assert!(
        log.contains("provider marked unavailable"),
        "the outage is logged:\n{log}"
    );
    assert!(log.contains("provider available again"), "{log}");
    assert!(daemon.running(), "the launcher died:\n{log}");
    let status = daemon.terminate(Duration::from_secs(30)).await;
    assert!(
        status.success(),
        "exit on SIGTERM: {status}\n{}",
        daemon.log()
    );
    let _ = store.backend().close().await;
}
