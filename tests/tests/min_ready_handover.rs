//! Issue 16's min-ready overshoot, on a real ZooKeeper: three launchers,
//! each with its own simulated cloud serving every label, register one
//! after another while the first one's min-ready requests are open and
//! their nodes building. Each registration moves some labels' owner
//! (rendezvous hashing over the registered pools); the new owner counts
//! what the old one already asked for, so the fleet ends with exactly
//! the labels' `min-ready` spares.
//!
//! ```text
//! cargo test -p nodepool-tests --test min_ready_handover
//! ```

use std::time::Duration;

use nodepool_core::launcher::LauncherSettings;
use nodepool_core::model::{ComponentKind, NodeState};
use nodepool_core::store::Store;
use nodepool_tests::{Backend, Clouds, RunningLauncher, TestEnv, eventually, shared_factory};

const LABELS: usize = 6;
const MIN_READY: usize = 4;
const WAIT: Duration = Duration::from_secs(60);
/// The shortest time between two planning passes of a launcher, so that
/// counting passes measures time.
const PASS_SPACING: Duration = Duration::from_millis(500);

/// The labels (each with its `min-ready`) and launcher `l`'s one cloud.
fn body(l: usize) -> String {
    let mut out = String::from("labels:\n");
    let mut pool_labels = Vec::new();
    for i in 0..LABELS {
        out.push_str(&format!(
            "  - {{name: label-{i}, min-ready: {MIN_READY}}}\n"
        ));
        pool_labels.push(format!(
            "{{name: label-{i}, cloud-image: img, flavor-name: s}}"
        ));
    }
    out.push_str(&format!(
        r#"providers:
  - name: cloud-{l}
    driver: simulated
    simulation:
      boot-delay: 1
      delete-delay: 0.01
      flavors: [{{name: s, vcpus: 1, ram: 1024}}]
    cloud-images: [{{name: img}}]
    pools:
      - name: main
        max-servers: 100
        labels: [{}]
"#,
        pool_labels.join(", ")
    ));
    out
}

/// Ready unallocated nodes, min-ready requests, and nodes in any other
/// state (each described).
async fn census(store: &Store) -> (usize, usize, Vec<String>) {
    let nodes = store.list_nodes().await.expect("list nodes").records;
    let requests = store.list_requests().await.expect("list requests").records;
    let mut spares = 0;
    let mut other = Vec::new();
    for n in &nodes {
        if n.node.state == NodeState::Ready && n.node.allocated_to.is_none() && !n.locked {
            spares += 1;
        } else {
            other.push(format!(
                "node {} {:?} {:?}",
                n.id, n.node.state, n.node.allocated_to
            ));
        }
    }
    let min_ready = requests.iter().filter(|r| r.request.is_min_ready()).count();
    other.extend(
        requests
            .iter()
            .filter(|r| !r.request.is_min_ready())
            .map(|r| format!("request {} {:?}", r.id, r.request.state)),
    );
    (spares, min_ready, other)
}

async fn registered_pools(store: &Store) -> usize {
    store
        .list_components(ComponentKind::Pool)
        .await
        .expect("list pools")
        .records
        .len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn launchers_registering_one_after_another_keep_exactly_min_ready() {
    let env = TestEnv::new(Backend::ZooKeeper);
    let want = LABELS * MIN_READY;
    let observer = env.store(&env.config(&body(0))).await;
    let clouds = Clouds::default();
    let mut launchers = Vec::new();
    for l in 0..3 {
        let cfg = env.config(&body(l));
        let settings = LauncherSettings {
            hostname: format!("host{l}"),
            min_pass_interval: PASS_SPACING,
            shutdown_grace: Duration::from_secs(10),
            ..LauncherSettings::default()
        };
        launchers.push(RunningLauncher::start_on(
            env.store(&cfg).await,
            &cfg,
            settings,
            shared_factory(&clouds),
        ));
        eventually("the launcher's pool registered", WAIT, || async {
            registered_pools(&observer).await == l + 1
        })
        .await;
        if l == 0 {
            // The first owner asks for every spare before anyone else
            // registers: its requests are what the next owners must count.
            eventually("the first launcher's min-ready requests", WAIT, || async {
                let (spares, open, _) = census(&observer).await;
                spares + open >= want
            })
            .await;
        }
    }
    eventually("the fleet filled and quiet", WAIT, || async {
        let (spares, open, other) = census(&observer).await;
        spares >= want && open == 0 && other.is_empty()
    })
    .await;
    // Every launcher plans min-ready from the last registration: the
    // second pass from now starts after it was visible, and passes are
    // at least PASS_SPACING apart, so the sixth after that one comes once
    // the registry settled (2 s). A top-up it made would show now.
    let settle = LauncherSettings::default().registry_settle;
    let after = 2 + settle.as_millis().div_ceil(PASS_SPACING.as_millis()) as u64 + 1;
    for l in &launchers {
        l.passes(after, WAIT).await;
    }
    let (spares, open, other) = census(&observer).await;
    assert_eq!(
        (spares, open, other),
        (want, 0, Vec::<String>::new()),
        "exactly min-ready spares, nothing else"
    );
    for l in launchers {
        l.stop().await;
    }
    let _ = observer.backend().delete_tree("/nodepool").await;
    let _ = observer.backend().close().await;
}
