//! ZooKeeper store figures for BENCHMARKS.md (not a test):
//!
//! * listing 10,000 nodes from the mirror (`Store::list_nodes`), warm and
//!   with a cold decode cache, and the raw `scan` under it;
//! * the initial load of a 10,000-node mirror (`ZooKeeperStore::connect`);
//! * write + read round trips (create + get, versioned update + get).
//!
//! Needs the test ZooKeeper (`scripts/zookeeper.sh start` and
//! `eval "$(scripts/zookeeper.sh env)"`); runs in its own random chroot.
//!
//! ```text
//! cargo bench -p nodepool-zookeeper --bench zk_store
//! ```

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use nodepool_core::model::{Node, NodeState, WireRecord};
use nodepool_core::store::{StateStore, Store};
use nodepool_zookeeper::{ZooKeeperOptions, ZooKeeperStore};

const NODES: usize = 10_000;

fn summary(name: &str, mut samples: Vec<Duration>) {
    samples.sort();
    let pct = |p: f64| samples[((samples.len() - 1) as f64 * p).round() as usize];
    println!(
        "{name:<44} n={:<5} p50={:>9.3?} p90={:>9.3?} p99={:>9.3?} max={:>9.3?}",
        samples.len(),
        pct(0.5),
        pct(0.9),
        pct(0.99),
        pct(1.0)
    );
}

fn node(i: usize) -> Node {
    let mut n = Node::new(
        NodeState::Ready,
        1_700_000_000.0 + i as f64,
        "cloud1",
        "main",
        vec!["ubuntu-jammy".into()],
    );
    n.external_id = Some(format!("{:032x}", i));
    n.public_ipv4 = Some(format!("203.0.{}.{}", i / 256 % 256, i % 256));
    n.interface_ip = n.public_ipv4.clone();
    n.launcher = Some("launcher01-PoolWorker.cloud1-main-0123456789abcdef".into());
    n.host_keys =
        vec!["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGx3c2VydmVyLWtleS1mb3ItYmVuY2htYXJraW5n".into()];
    n
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let hosts = std::env::var("NODEPOOL_TEST_ZK_HOSTS").expect(
        "NODEPOOL_TEST_ZK_HOSTS: run `scripts/zookeeper.sh start && eval \"$(scripts/zookeeper.sh env)\"`",
    );
    let chroot = format!("/nodepool-rs-bench/{}", uuid::Uuid::new_v4().simple());
    let options = ZooKeeperOptions::from_connect_string(&hosts)
        .expect("hosts parse")
        .with_chroot(&chroot);
    let zk = ZooKeeperStore::connect(options.clone())
        .await
        .expect("connect");
    let store = Store::new(Arc::new(zk.clone()));
    println!(
        "zookeeper {hosts}{chroot}; {} bytes per node record",
        node(1).to_json().len()
    );

    // fill: pipelined creates
    let t = Instant::now();
    let ids: Vec<String> = futures::stream::iter(0..NODES)
        .map(|i| {
            let store = store.clone();
            async move { store.create_node(&node(i)).await.expect("create") }
        })
        .buffer_unordered(256)
        .collect()
        .await;
    let fill = t.elapsed();
    println!(
        "create {NODES} nodes, 256 in flight:            {fill:.2?} ({:.0}/s)",
        NODES as f64 / fill.as_secs_f64()
    );

    // the mirror catches up (list_nodes waits for it)
    let t = Instant::now();
    let listed = store.list_nodes().await.expect("list");
    assert_eq!(listed.records.len(), NODES);
    println!(
        "first list_nodes (catch-up + decode all):      {:.2?}",
        t.elapsed()
    );

    let mut warm = Vec::new();
    for _ in 0..50 {
        let t = Instant::now();
        let l = store.list_nodes().await.expect("list");
        warm.push(t.elapsed());
        assert_eq!(l.records.len(), NODES);
    }
    summary("list_nodes 10k, warm decode cache", warm);

    let mut cold = Vec::new();
    for _ in 0..10 {
        let fresh = Store::new(Arc::new(zk.clone()));
        let t = Instant::now();
        let l = fresh.list_nodes().await.expect("list");
        cold.push(t.elapsed());
        assert_eq!(l.records.len(), NODES);
    }
    summary("list_nodes 10k, cold decode cache", cold);

    let mut scans = Vec::new();
    for _ in 0..50 {
        let t = Instant::now();
        let s = zk.scan("/nodepool/nodes").await.expect("scan");
        scans.push(t.elapsed());
        assert!(s.len() > NODES);
    }
    summary("scan /nodepool/nodes (mirror, sync barrier)", scans);

    // a second client loading the whole mirror
    let mut loads = Vec::new();
    for _ in 0..3 {
        let t = Instant::now();
        let other = ZooKeeperStore::connect(options.clone())
            .await
            .expect("connect");
        loads.push(t.elapsed());
        other.close().await.expect("close");
    }
    summary("connect + load 10k-node mirror", loads);

    // write + read round trips
    let mut create_get = Vec::new();
    for i in 0..1000 {
        let t = Instant::now();
        let id = store.create_node(&node(i)).await.expect("create");
        let got = store.get_node(&id).await.expect("get").expect("exists");
        create_get.push(t.elapsed());
        assert_eq!(got.version, 0);
    }
    summary("create_node + get_node", create_get);

    let mut update_get = Vec::new();
    let id = &ids[0];
    let mut current = store.get_node(id).await.expect("get").expect("exists");
    for i in 0..1000 {
        let t = Instant::now();
        current.value.comment = Some(format!("round {i}"));
        let v = store
            .update_node(id, &current.value, current.version)
            .await
            .expect("update");
        current = store.get_node(id).await.expect("get").expect("exists");
        update_get.push(t.elapsed());
        assert_eq!(current.version, v);
    }
    summary("update_node (CAS) + get_node", update_get);

    let mut update_list = Vec::new();
    for i in 0..20 {
        let t = Instant::now();
        current.value.comment = Some(format!("seen {i}"));
        current.version = store
            .update_node(id, &current.value, current.version)
            .await
            .expect("update");
        let l = store.list_nodes().await.expect("list");
        update_list.push(t.elapsed());
        let seen = l.records.iter().find(|r| &r.id == id).expect("listed");
        assert_eq!(
            seen.node.comment, current.value.comment,
            "the mirror shows our write"
        );
    }
    summary(
        "update_node + list_nodes 10k (read-your-write)",
        update_list,
    );

    // clean up our chroot
    let t = Instant::now();
    let all: Vec<String> = store
        .list_nodes()
        .await
        .expect("list")
        .records
        .into_iter()
        .map(|r| r.id)
        .collect();
    futures::stream::iter(all)
        .map(|id| {
            let store = store.clone();
            async move { store.delete_node(&id).await.expect("delete") }
        })
        .buffer_unordered(256)
        .collect::<Vec<()>>()
        .await;
    println!("cleanup: {:.2?}", t.elapsed());
    zk.close().await.expect("close");
}
