//! Whole-system scenarios of issue 5, each on a real ZooKeeper and on a
//! real SQLite file: launchers (built as the daemon builds them) serve
//! requests made through the Zuul-side requestor library, on the
//! simulated cloud.

use std::collections::BTreeSet;
use std::time::Duration;

use nodepool_core::model::{NodeState, RequestState};
use nodepool_requestor::{Hold, NewRequest, Outcome, Requestor};
use nodepool_tests::{Backend, Clouds, RunningLauncher, TestEnv, cloud, eventually};

const BODY: &str = r#"
labels:
  - name: small
  - name: large
providers:
  - name: sim
    driver: simulated
    simulation:
      boot-delay: 0.05
      delete-delay: 0.01
      flavors:
        - {name: s, vcpus: 2, ram: 2048}
        - {name: l, vcpus: 8, ram: 16384}
    cloud-images: [{name: img}]
    pools:
      - name: main
        max-servers: 20
        labels:
          - {name: small, cloud-image: img, flavor-name: s}
          - {name: large, cloud-image: img, flavor-name: l}
"#;

const WAIT: Duration = Duration::from_secs(60);

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
    requests_are_fulfilled_and_used_nodes_deleted,
    unknown_labels_fail_once_every_pool_declined,
    two_launchers_share_the_load,
    a_leaked_server_is_deleted,
    held_nodes_are_kept_until_max_hold_age,
    reload_adds_a_label_and_drains_a_provider,
    zuul_unlocked_nodes_are_deallocated_after_the_request_goes,
);

async fn requests_are_fulfilled_and_used_nodes_deleted(backend: Backend) {
    let env = TestEnv::new(backend);
    let cfg = env.config(BODY);
    let clouds = Clouds::default();
    let l = RunningLauncher::start(&env, &cfg, "sys-l1", &clouds).await;
    let zuul = Requestor::new(env.store(&cfg).await, "8d0f7c1e6b2a4f3c9e5d7a1b2c3d4e5f");
    let single = zuul
        .submit(&NewRequest::new(vec!["small".into()]))
        .await
        .expect("submit");
    let multi = zuul
        .submit(&NewRequest::new(vec![
            "large".into(),
            "small".into(),
            "small".into(),
        ]))
        .await
        .expect("submit");
    for id in [&single, &multi] {
        let Outcome::Fulfilled(req) = zuul.wait(id, WAIT).await.expect("wait") else {
            panic!("{id} failed")
        };
        let mut set = zuul.accept(id, &req.value).await.expect("accept");
        assert_eq!(set.nodes.len(), req.value.node_types.len());
        zuul.use_nodes(&mut set, "org/project")
            .await
            .expect("in-use");
        zuul.return_nodes(set).await.expect("used");
    }
    let store = zuul.store().clone();
    eventually("used nodes and their servers deleted", WAIT, || async {
        let nodes = store.list_nodes().await.expect("list").records;
        if !nodes.is_empty() {
            eprintln!(
                "remaining: {:?}",
                nodes
                    .iter()
                    .map(|n| (&n.id, n.node.state, n.locked))
                    .collect::<Vec<_>>()
            );
        }
        let servers = match cloud(&clouds, "sim") {
            Some(c) => c.server_count().await,
            None => 0,
        };
        nodes.is_empty() && servers == 0
    })
    .await;
    l.stop().await;
}

async fn unknown_labels_fail_once_every_pool_declined(backend: Backend) {
    let env = TestEnv::new(backend);
    let cfg = env.config(BODY);
    let clouds = Clouds::default();
    let l = RunningLauncher::start(&env, &cfg, "sys-l1", &clouds).await;
    let zuul = Requestor::new(env.store(&cfg).await, "zuul");
    let id = zuul
        .submit(&NewRequest::new(vec!["small".into(), "gpu".into()]))
        .await
        .expect("submit");
    let Outcome::Failed(_) = zuul.wait(&id, WAIT).await.expect("wait") else {
        panic!("should fail")
    };
    zuul.cancel(&id).await.expect("cancel");
    l.stop().await;
}

async fn two_launchers_share_the_load(backend: Backend) {
    let env = TestEnv::new(backend);
    let body = BODY.replace("  - name: small\n", "  - name: small\n    min-ready: 3\n");
    let cfg = env.config(&body);
    let clouds = Clouds::default();
    let a = RunningLauncher::start(&env, &cfg, "sys-a", &clouds).await;
    let b = RunningLauncher::start(&env, &cfg, "sys-b", &clouds).await;
    let zuul = Requestor::new(env.store(&cfg).await, "zuul");
    let store = zuul.store().clone();
    eventually("both launchers registered", WAIT, || async {
        store
            .list_components(nodepool_core::model::ComponentKind::Pool)
            .await
            .expect("list")
            .records
            .len()
            == 2
    })
    .await;
    let mut ids = Vec::new();
    for i in 0..12 {
        let labels = if i % 3 == 0 {
            vec!["large".into(), "small".into()]
        } else {
            vec!["small".into()]
        };
        ids.push(zuul.submit(&NewRequest::new(labels)).await.expect("submit"));
    }
    let mut seen = BTreeSet::new();
    let mut launchers = BTreeSet::new();
    for id in &ids {
        let Outcome::Fulfilled(req) = zuul.wait(id, WAIT).await.expect("wait") else {
            panic!("{id} failed")
        };
        for n in &req.value.nodes {
            assert!(seen.insert(n.clone()), "node {n} allocated to two requests");
            let node = store.get_node(n).await.expect("get").expect("node");
            launchers.insert(node.value.launcher.clone().unwrap_or_default());
        }
    }
    assert!(
        launchers.iter().any(|l| l.starts_with("sys-a"))
            && launchers.iter().any(|l| l.starts_with("sys-b")),
        "both launchers should have served requests: {launchers:?}"
    );
    eventually("min-ready spares restored", WAIT, || async {
        let nodes = store.list_nodes().await.expect("list").records;
        nodes
            .iter()
            .filter(|n| n.node.state == NodeState::Ready && n.node.allocated_to.is_none())
            .count()
            == 3
    })
    .await;
    // Pass after pass of both launchers, still no overshoot.
    for _ in 0..10 {
        a.passes(1, WAIT).await;
        b.passes(1, WAIT).await;
        let spares = store
            .list_nodes()
            .await
            .expect("list")
            .records
            .iter()
            .filter(|n| n.node.allocated_to.is_none())
            .count();
        assert!(spares <= 3, "min-ready overshot: {spares} spares");
    }
    a.stop().await;
    b.stop().await;
}

async fn a_leaked_server_is_deleted(backend: Backend) {
    let env = TestEnv::new(backend);
    let cfg = env.config(BODY);
    let clouds = Clouds::default();
    let l = RunningLauncher::start(&env, &cfg, "sys-l1", &clouds).await;
    eventually("cloud built", WAIT, || async {
        cloud(&clouds, "sim").is_some()
    })
    .await;
    let sim = cloud(&clouds, "sim").expect("cloud");
    sim.inject_leaked_server("0000777777").await;
    assert_eq!(sim.server_count().await, 1);
    eventually("leaked server deleted after two listings", WAIT, || async {
        sim.server_count().await == 0
    })
    .await;
    l.stop().await;
}

async fn held_nodes_are_kept_until_max_hold_age(backend: Backend) {
    let env = TestEnv::new(backend);
    let cfg = env.config(&format!("max-hold-age: 4\n{BODY}"));
    let clouds = Clouds::default();
    let l = RunningLauncher::start(&env, &cfg, "sys-l1", &clouds).await;
    let zuul = Requestor::new(env.store(&cfg).await, "zuul");
    let id = zuul
        .submit(&NewRequest::new(vec!["small".into()]))
        .await
        .expect("submit");
    let Outcome::Fulfilled(req) = zuul.wait(&id, WAIT).await.expect("wait") else {
        panic!("failed")
    };
    let mut set = zuul.accept(&id, &req.value).await.expect("accept");
    zuul.use_nodes(&mut set, "p").await.expect("use");
    let held = set.nodes[0].id.clone();
    let started = tokio::time::Instant::now();
    zuul.hold(
        set,
        &Hold {
            job: "tenant project job .*".into(),
            comment: "debugging".into(),
            expiration: None,
        },
    )
    .await
    .expect("hold");
    let store = zuul.store().clone();
    eventually("held node deleted after max-hold-age", WAIT, || async {
        store.get_node(&held).await.expect("get").is_none()
    })
    .await;
    assert!(
        started.elapsed() >= Duration::from_secs(4),
        "deleted before max-hold-age"
    );
    l.stop().await;
}

async fn reload_adds_a_label_and_drains_a_provider(backend: Backend) {
    let env = TestEnv::new(backend);
    let cfg = env.config(BODY);
    let clouds = Clouds::default();
    let l = RunningLauncher::start(&env, &cfg, "sys-l1", &clouds).await;
    let zuul = Requestor::new(env.store(&cfg).await, "zuul");
    let with_medium = BODY
        .replace("  - name: large\n", "  - name: large\n  - name: medium\n")
        .replace(
            "          - {name: large, cloud-image: img, flavor-name: l}\n",
            "          - {name: large, cloud-image: img, flavor-name: l}\n          - {name: medium, cloud-image: img, flavor-name: s}\n",
        );
    l.reload(env.config(&with_medium)).await;
    let id = zuul
        .submit(&NewRequest::new(vec!["medium".into()]))
        .await
        .expect("submit");
    let Outcome::Fulfilled(req) = zuul.wait(&id, WAIT).await.expect("wait") else {
        panic!("the new label was not served")
    };
    let mut set = zuul.accept(&id, &req.value).await.expect("accept");
    zuul.use_nodes(&mut set, "p").await.expect("use");
    // Removing the provider (seed 001): max-servers -1.
    l.reload(env.config(&with_medium.replace("max-servers: 20", "max-servers: -1")))
        .await;
    let id2 = zuul
        .submit(&NewRequest::new(vec!["small".into()]))
        .await
        .expect("submit");
    let Outcome::Failed(_) = zuul.wait(&id2, WAIT).await.expect("wait") else {
        panic!("a drained provider launched")
    };
    // Its nodes drain normally.
    zuul.return_nodes(set).await.expect("used");
    let store = zuul.store().clone();
    eventually("the drained provider's node deleted", WAIT, || async {
        store.list_nodes().await.expect("list").records.is_empty()
    })
    .await;
    l.stop().await;
}

async fn zuul_unlocked_nodes_are_deallocated_after_the_request_goes(backend: Backend) {
    let env = TestEnv::new(backend);
    let cfg = env.config(BODY);
    let clouds = Clouds::default();
    let l = RunningLauncher::start(&env, &cfg, "sys-l1", &clouds).await;
    let zuul = Requestor::new(env.store(&cfg).await, "zuul");
    let id = zuul
        .submit(&NewRequest::new(vec!["small".into()]))
        .await
        .expect("submit");
    let Outcome::Fulfilled(req) = zuul.wait(&id, WAIT).await.expect("wait") else {
        panic!("failed")
    };
    // The fulfilled request stays untouched until Zuul deletes it.
    l.passes(3, WAIT).await;
    let still = zuul
        .store()
        .get_request(&id)
        .await
        .expect("get")
        .expect("still there");
    assert_eq!(still.value.state, RequestState::Fulfilled);
    assert_eq!(still.value.requestor_data, req.value.requestor_data);
    // Zuul takes the nodes and gives them back unused: they stay ready.
    let set = zuul.accept(&id, &req.value).await.expect("accept");
    let node = set.nodes[0].id.clone();
    zuul.return_nodes(set).await.expect("return");
    let store = zuul.store().clone();
    eventually("deallocated spare", WAIT, || async {
        store
            .get_node(&node)
            .await
            .expect("get")
            .is_some_and(|n| n.value.state == NodeState::Ready && n.value.allocated_to.is_none())
    })
    .await;
    l.stop().await;
}
