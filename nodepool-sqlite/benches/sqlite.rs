//! Benchmarks of the SQLite store (figures in BENCHMARKS.md, "### SQLite"):
//!
//! * listing 10,000 nodes through the typed facade (`Store::list_nodes`),
//!   from the scan cache and straight from the file;
//! * a write + read round trip (compare-and-set of a node, then a get), at
//!   both durability levels;
//! * watch latency: a write committed by one handle until the event arrives
//!   at another handle's subscriber (each handle has its own connections and
//!   poller thread, exactly as another process would);
//! * the in-memory store's listing, as a reference point on the same machine;
//! * the CPU an idle handle costs (lease renewal + feed polling), printed
//!   once before the criterion runs.
//!
//! ```text
//! cargo bench -p nodepool-sqlite --bench sqlite
//! ```

use std::hint::black_box;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use nodepool_core::model::{Node, NodeState};
use nodepool_core::store::{CreateMode, StateStore, Store, StoreEvent, paths};
use nodepool_model::store::MemoryStore;
use nodepool_sqlite::{SqliteOptions, SqliteStore, Synchronous};
use tokio::runtime::Runtime;

const NODES: usize = 10_000;

fn runtime() -> Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

/// A node as a launcher writes it once it is ready: every field Nodepool
/// fills for an OpenStack server (about 1 KiB of JSON).
fn node(i: usize) -> Node {
    let mut n = Node::new(
        NodeState::Ready,
        1_700_000_000.0 + i as f64,
        "rax-dfw",
        "main",
        vec!["ubuntu-jammy".into()],
    );
    n.cloud = Some("rax".into());
    n.region = Some("DFW".into());
    n.az = Some("nova".into());
    n.public_ipv4 = Some(format!("198.51.{}.{}", i / 250, i % 250));
    n.private_ipv4 = Some(format!("10.0.{}.{}", i / 250, i % 250));
    n.interface_ip = n.public_ipv4.clone();
    n.host_id = Some(format!("{:056x}", i));
    n.external_id = Some(format!("{:08x}-0000-4000-8000-{:012x}", i, i));
    n.image_id = Some(
        "/nodepool/images/ubuntu-jammy/builds/8c1f0e6a4b9d4d7e9a3c2b1a0f9e8d7c/providers/rax-dfw/images/0000000007"
            .into(),
    );
    n.launcher = Some("nl01-1234-PoolWorker.rax-dfw-main".into());
    n.username = Some("zuul".into());
    n.host_keys = vec![
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHkq1Fc3w9vAqkQ8E2x0K4g3w9vAqkQ8E2x0K4g3w9vA".into(),
    ];
    n
}

async fn populate(store: &Store) {
    for i in 0..NODES {
        store.create_node(&node(i)).await.expect("create node");
    }
}

async fn populated(path: &Path) {
    // Populating is not what is measured: fsync per commit is off for it.
    let setup = SqliteStore::open(
        path,
        SqliteOptions::default().with_synchronous(Synchronous::Normal),
    )
    .await
    .expect("open");
    populate(&Store::new(Arc::new(setup.clone()))).await;
    setup.close().await.expect("close");
}

fn list_nodes(c: &mut Criterion) {
    let rt = runtime();
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("bench.db");
    rt.block_on(populated(&path));
    let mut group = c.benchmark_group("sqlite/list_nodes_10k");
    group.sample_size(20);
    for (name, cache) in [("scan_cache", true), ("direct", false)] {
        let sqlite = rt
            .block_on(SqliteStore::open(
                &path,
                SqliteOptions::default().with_scan_cache(cache),
            ))
            .expect("open");
        let store = Store::new(Arc::new(sqlite));
        // Warm: what a launcher's planning pass sees after its first one.
        let first = rt.block_on(store.list_nodes()).expect("list");
        assert_eq!(first.records.len(), NODES);
        group.bench_function(name, |b| {
            b.iter(|| black_box(rt.block_on(store.list_nodes()).expect("list")));
        });
        if cache {
            // The store's part alone: catch-up check and copy of the subtree.
            let backend = store.backend().clone();
            group.bench_function("scan_only_scan_cache", |b| {
                b.iter(|| black_box(rt.block_on(backend.scan(paths::NODES)).expect("scan")));
            });
            // A fresh typed facade: every node's JSON is parsed.
            group.bench_function("scan_cache_cold_decode", |b| {
                b.iter(|| {
                    let fresh = Store::new(backend.clone());
                    black_box(rt.block_on(fresh.list_nodes()).expect("list"))
                });
            });
        }
    }
    // What a CLI invocation pays: open, load the tree, list, close.
    group.sample_size(10);
    group.bench_function("open_list_close", |b| {
        b.iter(|| {
            rt.block_on(async {
                let sqlite = SqliteStore::open(&path, SqliteOptions::default())
                    .await
                    .expect("open");
                let listed = Store::new(Arc::new(sqlite.clone()))
                    .list_nodes()
                    .await
                    .expect("list");
                sqlite.close().await.expect("close");
                black_box(listed)
            })
        });
    });
    group.sample_size(20);
    // Reference point: the same listing from the in-memory store.
    let memory = Store::new(Arc::new(MemoryStore::new()));
    rt.block_on(populate(&memory));
    rt.block_on(memory.list_nodes()).expect("list");
    group.bench_function("memory_store_reference", |b| {
        b.iter(|| black_box(rt.block_on(memory.list_nodes()).expect("list")));
    });
    group.finish();
}

fn round_trip(c: &mut Criterion) {
    let rt = runtime();
    let dir = tempfile::tempdir().expect("tempdir");
    let mut group = c.benchmark_group("sqlite/write_read_round_trip");
    group.sample_size(30);
    for (name, sync) in [("full", Synchronous::Full), ("normal", Synchronous::Normal)] {
        let path = dir.path().join(format!("{name}.db"));
        let sqlite = rt
            .block_on(SqliteStore::open(
                &path,
                SqliteOptions::default().with_synchronous(sync),
            ))
            .expect("open");
        let store = Store::new(Arc::new(sqlite));
        let n = node(1);
        let id = rt.block_on(store.create_node(&n)).expect("create");
        let mut version = 0;
        group.bench_function(format!("{name}/create_get"), |b| {
            b.iter(|| {
                rt.block_on(async {
                    let id = store.create_node(&n).await.expect("create");
                    black_box(store.get_node(&id).await.expect("get"))
                })
            });
        });
        group.bench_function(format!("{name}/update_get"), |b| {
            b.iter(|| {
                rt.block_on(async {
                    version = store.update_node(&id, &n, version).await.expect("update");
                    black_box(store.get_node(&id).await.expect("get"))
                })
            });
        });
    }
    group.finish();
}

fn watch_latency(c: &mut Criterion) {
    let rt = runtime();
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("watch.db");
    let mut group = c.benchmark_group("sqlite/watch_latency");
    group.sample_size(20);
    for poll_ms in [20, 5] {
        let options = SqliteOptions::default().with_poll_interval(Duration::from_millis(poll_ms));
        let writer = rt
            .block_on(SqliteStore::open(&path, options.clone()))
            .expect("open");
        let watcher = rt
            .block_on(SqliteStore::open(&path, options))
            .expect("open");
        let target = format!("/nodepool/x/watched-{poll_ms}");
        rt.block_on(writer.create(&target, b"", CreateMode::Persistent))
            .expect("create");
        let mut events = watcher.subscribe();
        // Commit (the write call returned) to delivery in the other handle.
        // Writes start at a pseudo-random phase of the poll cycle (as real
        // writes do): right after a delivery, the next poll is a full
        // interval away, which would measure the worst case only.
        let mut phase: u64 = 0x2545_f491_4f6c_dd1d;
        group.bench_function(format!("poll_{poll_ms}ms"), |b| {
            b.iter_custom(|iters| {
                rt.block_on(async {
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        phase ^= phase << 13;
                        phase ^= phase >> 7;
                        phase ^= phase << 17;
                        tokio::time::sleep(Duration::from_micros(phase % (poll_ms * 1000))).await;
                        writer.set(&target, b"x", None).await.expect("set");
                        let committed = Instant::now();
                        loop {
                            match events.recv().await {
                                Ok(StoreEvent::Changed(p)) if p == target => break,
                                Ok(_) => {}
                                Err(e) => panic!("watch: {e}"),
                            }
                        }
                        total += committed.elapsed();
                    }
                    total
                })
            });
        });
    }
    group.finish();
}

/// User + system CPU time of this process, from /proc (Linux).
fn cpu_time() -> Option<Duration> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name (which is in parentheses).
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    // USER_HZ is 100 on every Linux configuration that matters here.
    Some(Duration::from_millis(ticks * 10))
}

/// Not a criterion benchmark: the background cost of idle handles (runs
/// unless a filter that does not mention `idle` is given).
fn idle_cost(_: &mut Criterion) {
    let filters: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    if !filters.is_empty() && !filters.iter().any(|f| f.contains("idle")) {
        return;
    }
    let rt = runtime();
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("idle.db");
    let handles: Vec<SqliteStore> = (0..10)
        .map(|_| {
            rt.block_on(SqliteStore::open(&path, SqliteOptions::default()))
                .expect("open")
        })
        .collect();
    let window = Duration::from_secs(10);
    if let Some(before) = cpu_time() {
        std::thread::sleep(window);
        if let Some(after) = cpu_time() {
            let per_handle = (after - before).as_secs_f64() / window.as_secs_f64() / 10.0;
            println!(
                "sqlite/idle_handle: {:.3}% of one core per idle handle (10 handles, {window:?}, poll 20 ms, lease 10 s)",
                per_handle * 100.0
            );
        }
    }
    drop(handles);
}

criterion_group!(
    name = benches;
    config = Criterion::default().measurement_time(Duration::from_secs(5));
    targets = idle_cost, list_nodes, round_trip, watch_latency
);
criterion_main!(benches);
