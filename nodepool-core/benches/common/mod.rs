//! The generated installation the planner benchmarks plan for, shared by
//! the criterion bench and the instruction-count harness.

use std::sync::Arc;

use nodepool_core::model::{NodeState, RequestState};
use nodepool_core::testing::World;

pub struct Size {
    pub nodes: usize,
    pub requests: usize,
    pub providers: usize,
    pub labels: usize,
    pub images: usize,
}

/// The three sizes: a tenth of the base, the base, ten times the base.
pub const SIZES: [(&str, Size); 3] = [
    (
        "tenth",
        Size {
            nodes: 1_000,
            requests: 500,
            providers: 5,
            labels: 10,
            images: 2,
        },
    ),
    (
        "base",
        Size {
            nodes: 10_000,
            requests: 5_000,
            providers: 50,
            labels: 100,
            images: 20,
        },
    ),
    (
        "ten_x",
        Size {
            nodes: 100_000,
            requests: 50_000,
            providers: 500,
            labels: 1_000,
            images: 200,
        },
    ),
];

pub fn world(sz: &Size) -> World {
    // Each pool serves a fixed number of labels, so a label has about the
    // same number of pools at every size (as in real installations).
    let labels_per_pool = sz.labels.min(20);
    let mut y = String::from("labels:\n");
    for l in 0..sz.labels {
        y += &format!("  - name: label-{l}\n    min-ready: {}\n", l % 3);
    }
    y += "diskimages:\n";
    for i in 0..sz.images {
        y += &format!("  - name: image-{i}\n");
    }
    y += "providers:\n";
    let servers_per_pool = sz.nodes / (sz.providers * 2) + 1;
    for p in 0..sz.providers {
        y += &format!(
            "  - name: cloud-{p}\n    driver: simulated\n    priority: {}\n    diskimages:\n",
            100 + (p % 3)
        );
        for i in 0..sz.images {
            y += &format!("      - name: image-{i}\n");
        }
        y += "    pools:\n";
        for q in 0..2 {
            y += &format!(
                "      - name: pool-{q}\n        max-servers: {servers_per_pool}\n        labels:\n"
            );
            for k in 0..labels_per_pool {
                let l = (p * 7 + q * 13 + k) % sz.labels;
                y += &format!(
                    "          - {{name: label-{l}, diskimage: image-{}, min-ram: 1024}}\n",
                    l % sz.images
                );
            }
        }
    }
    let mut w = World::new(&y).with_ready_images();
    // Nodes: spread over pools with the pool's own labels.
    let pools: Vec<(String, String, Vec<String>)> = w
        .config
        .providers
        .iter()
        .flat_map(|p| {
            p.pools
                .iter()
                .map(|q| {
                    (
                        p.name.clone(),
                        q.name.clone(),
                        q.labels.iter().map(|l| l.name.clone()).collect(),
                    )
                })
                .collect::<Vec<_>>()
        })
        .collect();
    for i in 0..sz.nodes {
        let (p, q, labels) = &pools[i % pools.len()];
        let label = &labels[i % labels.len()];
        let (state, locked) = match i % 20 {
            0..=11 => (NodeState::InUse, true),
            12..=15 => (NodeState::Ready, false),
            16..=17 => (NodeState::Building, true),
            18 => (NodeState::Used, true),
            _ => (NodeState::Deleting, true),
        };
        w.add_node(p, q, label, state);
        let rec = w.snapshot.nodes.last_mut().expect("node");
        rec.locked = locked;
        Arc::make_mut(&mut rec.node).state_time -= (i % 3600) as f64;
    }
    for i in 0..sz.requests {
        let n = 1 + i % 3;
        let labels: Vec<String> = (0..n)
            .map(|k| format!("label-{}", (i * 31 + k * 17) % sz.labels))
            .collect();
        let refs: Vec<&str> = labels.iter().map(String::as_str).collect();
        w.add_request(&refs, ["100", "200", "300"][i % 3]);
    }
    assert!(
        w.snapshot
            .requests
            .iter()
            .all(|r| r.request.state == RequestState::Requested)
    );
    w
}
