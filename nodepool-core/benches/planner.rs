//! One planning pass at scale: 10,000 nodes, 5,000 waiting requests,
//! 50 providers × 2 pools, 100 labels, 20 images (and 1/10 and 10× that).
//!
//! `cargo bench -p nodepool-core --features testing --bench planner`

mod common;

use std::hint::black_box;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use nodepool_core::testing::World;

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("plan");
    group.sample_size(20);
    for (name, sz) in common::SIZES {
        // Built on first use, so a filtered run does not pay for the big worlds.
        let cell: std::sync::OnceLock<World> = std::sync::OnceLock::new();
        group.throughput(Throughput::Elements((sz.nodes + sz.requests) as u64));
        group.bench_function(BenchmarkId::from_parameter(name), |b| {
            let w = cell.get_or_init(|| {
                let w = common::world(&sz);
                let p = w.plan();
                eprintln!(
                    "{name}: {} nodes, {} requests, {} pools -> {} actions",
                    w.snapshot.nodes.len(),
                    w.snapshot.requests.len(),
                    w.snapshot.pools.len(),
                    p.actions.len()
                );
                w
            });
            b.iter(|| black_box(w.plan()))
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
