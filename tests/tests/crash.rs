//! Issue 5, crash scenario: `kill -9` of one launcher mid-launch. Two real
//! `nodepool-launcher` processes serve requests from one store (a real
//! ZooKeeper, a real SQLite file) into one simulated cloud, kept in a state
//! file that every process (and this test) opens. Launcher A is killed with
//! SIGKILL while servers it created are still booting; every request must
//! still end fulfilled (by B, once A's session and so its locks expire),
//! and nothing A left may remain: no node stuck in `building`/`init`, no
//! server that no node owns.
//!
//! Waits are for real conditions with deadlines (the store and the cloud
//! are polled); the only fixed delays are the cloud's boot and delete
//! times.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use nodepool_core::config::Config;
use nodepool_core::model::{ComponentKind, NodeState};
use nodepool_core::provider::{InstanceStatus, Provider};
use nodepool_core::store::Store;
use nodepool_requestor::{NewRequest, Outcome, Requestor};
use nodepool_simulated::SimulatedProvider;
use nodepool_tests::{Backend, Daemon, TestEnv, workspace_binary};

/// Servers boot for this long: long enough that A is surely killed while
/// its launches are in flight.
const BOOT_SECS: f64 = 3.0;

/// The cloud lives in `cloud.json` beside the configuration file (a
/// relative `state-file` is resolved against the file's directory).
const BODY: &str = r#"
labels:
  - name: small
providers:
  - name: sim
    driver: simulated
    simulation:
      boot-delay: BOOT
      delete-delay: 0.1
      state-file: cloud.json
      flavors:
        - {name: s, vcpus: 1, ram: 1024}
    cloud-images: [{name: img}]
    pools:
      - name: main
        max-servers: 40
        labels:
          - {name: small, cloud-image: img, flavor-name: s}
"#;

/// A request's fulfilment: A's session must expire first (3 s: ZooKeeper's
/// `zookeeper-timeout`, SQLite's `state-store.lease`), then B boots new
/// servers.
const FULFIL: Duration = Duration::from_secs(120);

/// Cleaning up what A left. Normally seconds (B deletes A's unlocked
/// `building` nodes and their servers); a server A created but had not yet
/// recorded on its node is found only by the leak check, which deletes a
/// server seen unknown at two listings 60 s apart, and a node A left in
/// `init` is deleted after its 60 s grace.
const CLEANUP: Duration = Duration::from_secs(200);

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

on_both_stores!(kill_9_of_a_launcher_mid_launch_leaves_nothing_behind);

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
fn launcher(bin: &Path, env: &TestEnv, config: &Path, name: &str) -> Daemon {
    let mut cmd = Command::new(bin);
    cmd.arg("-c")
        .arg(config)
        .arg("--no-webapp")
        .current_dir(env.dir.path())
        .env(
            "RUST_LOG",
            std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
        );
    Daemon::spawn(
        name,
        cmd,
        &env.dir.path().join(format!("launcher-{name}.log")),
    )
}

/// The ids of the registered pool workers, once there are `n`.
async fn pools(store: &Store, n: usize) -> BTreeSet<String> {
    until(
        "pool workers registered",
        Duration::from_secs(60),
        || async {
            let ids: BTreeSet<String> = store
                .list_components(ComponentKind::Pool)
                .await
                .map_err(|e| e.to_string())?
                .records
                .into_iter()
                .filter_map(|(_, c)| c.id)
                .collect();
            if ids.len() == n {
                Ok(ids)
            } else {
                Err(format!("{ids:?}"))
            }
        },
    )
    .await
}

/// A's launches in flight, once they are settled: every node of A's that
/// is not ready is `building` with its server recorded and in BUILD, and
/// every server made for a node of A's is the one recorded on it. By node
/// id: (server id, request id). `None` while A has no such launch, or one
/// is part-way (a node before its create, a server not yet recorded).
///
/// Killing A then means B's cleanup of unlocked `building` nodes must find
/// and delete every server. A server created but not yet recorded would
/// be found by the leak check too, but only after two cloud listings 60 s
/// apart (the launcher's fixed interval), which would make this test take
/// minutes.
async fn a_in_flight(
    store: &Store,
    cloud: &SimulatedProvider,
    a_pool: &str,
) -> Option<BTreeMap<String, (String, String)>> {
    let nodes = store.list_nodes().await.expect("list nodes").records;
    let live = servers(cloud).await;
    let mut out = BTreeMap::new();
    for n in nodes
        .iter()
        .filter(|n| n.node.launcher.as_deref() == Some(a_pool) && n.node.state != NodeState::Ready)
    {
        let server = n.node.external_id.clone()?;
        let booting = live
            .get(&server)
            .is_some_and(|(_, status)| *status == InstanceStatus::Building);
        if n.node.state != NodeState::Building || !booting {
            return None;
        }
        out.insert(
            n.id.clone(),
            (server, n.node.allocated_to.clone().unwrap_or_default()),
        );
    }
    let unrecorded = live.iter().any(|(id, (node, _))| {
        node.as_ref()
            .and_then(|n| nodes.iter().find(|r| &r.id == n))
            .is_some_and(|r| {
                r.node.launcher.as_deref() == Some(a_pool)
                    && r.node.external_id.as_deref() != Some(id.as_str())
            })
    });
    (!out.is_empty() && !unrecorded).then_some(out)
}

/// Servers of the cloud by id, with their node id and status.
async fn servers(cloud: &SimulatedProvider) -> BTreeMap<String, (Option<String>, InstanceStatus)> {
    cloud
        .list_instances()
        .await
        .expect("the state file reads")
        .into_iter()
        .map(|i| (i.external_id.clone(), (i.node_id(), i.status)))
        .collect()
}

async fn kill_9_of_a_launcher_mid_launch_leaves_nothing_behind(backend: Backend) {
    let env = TestEnv::new(backend);
    let config_path = env.dir.path().join("nodepool.yaml");
    std::fs::write(
        &config_path,
        format!(
            "{}{}",
            env.store_yaml(),
            BODY.replace("BOOT", &BOOT_SECS.to_string())
        ),
    )
    .expect("write the configuration");
    let cfg = Config::load(&config_path, None).expect("valid configuration");
    // The same cloud the launchers open: this process sees what they do.
    let cloud = SimulatedProvider::new(&cfg.providers[0]).expect("the state file opens");
    assert_eq!(
        cloud.state_file(),
        Some(env.dir.path().join("cloud.json").as_path())
    );
    let bin = tokio::task::spawn_blocking(|| workspace_binary("nodepool-cli", "nodepool-launcher"))
        .await
        .expect("build nodepool-launcher");
    let zuul = Requestor::new(env.store(&cfg).await, "crash-test-zuul");
    let store = zuul.store().clone();

    // A first, so its pool worker is told apart from B's (both processes
    // register the machine's host name; pool worker ids end in a UUID).
    let mut a = launcher(&bin, &env, &config_path, "a");
    let a_pool = pools(&store, 1).await.pop_first().expect("A's pool");
    let mut b = launcher(&bin, &env, &config_path, "b");
    let b_pool = pools(&store, 2)
        .await
        .into_iter()
        .find(|p| *p != a_pool)
        .expect("B's pool");

    // Requests are spread over both launchers (by a hash of their id), so
    // batches are submitted until A is booting servers: each batch gives A
    // none with a probability of 1/16.
    let mut requests = Vec::new();
    let mut in_flight = None;
    for _ in 0..6 {
        for i in 0..4 {
            let labels = vec!["small".to_owned(); 1 + i % 2];
            requests.push(zuul.submit(&NewRequest::new(labels)).await.expect("submit"));
        }
        let settled = async {
            let mut previous = None;
            loop {
                let now = a_in_flight(&store, &cloud, &a_pool).await;
                if now.is_some() && now == previous {
                    return now;
                }
                previous = now;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        };
        if let Ok(found) = tokio::time::timeout(Duration::from_secs(2), settled).await {
            in_flight = found;
            break;
        }
    }
    assert!(
        in_flight.is_some(),
        "launcher A never had servers booting for {} requests",
        requests.len()
    );

    // kill -9, with A's servers still in BUILD. Its session (and so its
    // locks) outlives it for a while: what it left is untouched yet.
    a.kill();
    let a_nodes = a_in_flight(&store, &cloud, &a_pool)
        .await
        .expect("A's launches still settled when it was killed");
    let a_servers: BTreeSet<String> = a_nodes.values().map(|(s, _)| s.clone()).collect();
    let a_requests: BTreeSet<String> = a_nodes.values().map(|(_, r)| r.clone()).collect();
    eprintln!(
        "{backend:?}: killed A with {} servers booting for {} of {} requests",
        a_servers.len(),
        a_requests.len(),
        requests.len()
    );

    // Every request ends fulfilled; the ones A held, with nodes B launched.
    let mut fulfilled = Vec::new();
    let mut allocated = BTreeSet::new();
    for id in &requests {
        let Outcome::Fulfilled(req) = zuul.wait(id, FULFIL).await.expect("wait") else {
            panic!("request {id} failed")
        };
        for n in &req.value.nodes {
            assert!(
                allocated.insert(n.clone()),
                "node {n} given to two requests"
            );
            assert!(!a_nodes.contains_key(n), "request {id} got A's node {n}");
            let node = store.get_node(n).await.expect("get").expect("node exists");
            assert_eq!(node.value.state, NodeState::Ready, "node {n}");
            if a_requests.contains(id) {
                assert_eq!(
                    node.value.launcher.as_deref(),
                    Some(b_pool.as_str()),
                    "node {n} of {id}, a request A held"
                );
            }
        }
        fulfilled.push((id.clone(), req.value));
    }

    // What A left is cleaned up: its nodes are gone, and the cloud holds
    // exactly the servers of the live nodes.
    until("A's nodes and servers deleted", CLEANUP, || async {
        let nodes = store.list_nodes().await.map_err(|e| e.to_string())?.records;
        let live = servers(&cloud).await;
        let left: Vec<&String> = nodes
            .iter()
            .map(|n| &n.id)
            .filter(|id| a_nodes.contains_key(*id))
            .collect();
        let not_ready: Vec<(&String, NodeState, bool)> = nodes
            .iter()
            .filter(|n| n.node.state != NodeState::Ready)
            .map(|n| (&n.id, n.node.state, n.locked))
            .collect();
        let owned: BTreeSet<&str> = nodes
            .iter()
            .filter_map(|n| n.node.external_id.as_deref())
            .collect();
        let stray: Vec<&String> = live
            .keys()
            .filter(|s| !owned.contains(s.as_str()))
            .collect();
        let missing: Vec<&&str> = owned.iter().filter(|s| !live.contains_key(**s)).collect();
        if left.is_empty() && not_ready.is_empty() && stray.is_empty() && missing.is_empty() {
            Ok(())
        } else {
            Err(format!(
                "A's nodes left {left:?}; not ready (id, state, locked) {not_ready:?}; \
                 servers without a node {stray:?}; nodes without a server {missing:?}"
            ))
        }
    })
    .await;
    let live = servers(&cloud).await;
    assert!(
        a_servers.iter().all(|s| !live.contains_key(s)),
        "A's servers {a_servers:?} still in {live:?}"
    );

    // Zuul uses the nodes and gives them back; B deletes them all.
    for (id, req) in &fulfilled {
        let mut set = zuul.accept(id, req).await.expect("accept");
        zuul.use_nodes(&mut set, "org/project")
            .await
            .expect("in-use");
        zuul.return_nodes(set).await.expect("used");
    }
    until("every node and server deleted", CLEANUP, || async {
        let nodes = store.list_nodes().await.map_err(|e| e.to_string())?.records;
        let requests = store
            .list_requests()
            .await
            .map_err(|e| e.to_string())?
            .records;
        let live = servers(&cloud).await;
        if nodes.is_empty() && requests.is_empty() && live.is_empty() {
            Ok(())
        } else {
            Err(format!(
                "nodes {:?}; requests {:?}; servers {:?}",
                nodes
                    .iter()
                    .map(|n| (&n.id, n.node.state, n.locked))
                    .collect::<Vec<_>>(),
                requests.iter().map(|r| &r.id).collect::<Vec<_>>(),
                live
            ))
        }
    })
    .await;

    assert!(b.running(), "B died:\n{}", b.log());
    let status = b.terminate(Duration::from_secs(30)).await;
    assert!(
        status.success(),
        "B's exit on SIGTERM: {status}\n{}",
        b.log()
    );
    let _ = store.backend().close().await;
}
