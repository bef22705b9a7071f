//! Property test of min-ready ownership among launchers sharing a store:
//! a label's min-ready requests are created by exactly one launcher, one
//! with a pool that can boot the label now (enabled, image ready, not
//! paused), whenever any pool can; by none otherwise.

use std::collections::BTreeSet;

use nodepool_core::planner::Action;
use nodepool_core::testing::World;
use proptest::prelude::*;

const LABELS: [&str; 2] = ["l0", "l1"];

#[derive(Clone, Debug)]
struct PoolSpec {
    /// `max-servers: 0`.
    disabled: bool,
    /// Whether the image of each label has a ready upload in its provider.
    ready: [bool; 2],
    /// What its component says.
    paused: bool,
    /// The labels it serves.
    labels: BTreeSet<usize>,
}

impl PoolSpec {
    fn can_boot(&self, label: usize) -> bool {
        self.labels.contains(&label) && !self.disabled && self.ready[label] && !self.paused
    }
}

#[derive(Clone, Debug)]
struct Spec {
    /// Launchers, each with its pools (one provider per pool).
    launchers: Vec<Vec<PoolSpec>>,
    min_ready: [u32; 2],
}

fn pool_spec() -> impl Strategy<Value = PoolSpec> {
    (
        prop::bool::weighted(0.3),
        [prop::bool::weighted(0.7), prop::bool::weighted(0.7)],
        prop::bool::weighted(0.2),
        prop::collection::btree_set(0usize..2, 1..=2),
    )
        .prop_map(|(disabled, ready, paused, labels)| PoolSpec {
            disabled,
            ready,
            paused,
            labels,
        })
}

fn spec() -> impl Strategy<Value = Spec> {
    (
        prop::collection::vec(prop::collection::vec(pool_spec(), 1..=3), 1..=3),
        [1u32..3, 1u32..3],
    )
        .prop_map(|(launchers, min_ready)| Spec {
            launchers,
            min_ready,
        })
}

fn provider_name(launcher: usize, pool: usize) -> String {
    format!("p{launcher}x{pool}")
}

/// The configuration of launcher `k`: every label, its own providers.
fn yaml(s: &Spec, k: usize) -> String {
    let mut y = String::from("labels:\n");
    for (i, l) in LABELS.iter().enumerate() {
        y += &format!("  - name: {l}\n    min-ready: {}\n", s.min_ready[i]);
    }
    y += "diskimages: [{name: d0}, {name: d1}]\nproviders:\n";
    for (j, p) in s.launchers[k].iter().enumerate() {
        y += &format!(
            "  - name: {}\n    driver: simulated\n    diskimages: [{{name: d0}}, {{name: d1}}]\n",
            provider_name(k, j)
        );
        y += "    pools:\n      - name: main\n";
        if p.disabled {
            y += "        max-servers: 0\n";
        }
        y += "        labels:\n";
        for &l in &p.labels {
            y += &format!(
                "          - {{name: {}, diskimage: d{l}, min-ram: 1}}\n",
                LABELS[l]
            );
        }
    }
    y
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 300,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    /// Each launcher plans on the same store: first a pass whose pool
    /// states are published in the components (as the runtime writes
    /// them), then the pass that decides min-ready.
    #[test]
    fn min_ready_is_owned_by_one_launcher_that_can_boot_the_label(s in spec()) {
        let mut worlds: Vec<World> = (0..s.launchers.len())
            .map(|k| World::new(&yaml(&s, k)))
            .collect();
        // The shared store: every launcher's pool components, the uploads.
        let mut shared = worlds[0].clone();
        shared.snapshot.pools = worlds.iter().flat_map(|w| w.snapshot.pools.clone()).collect();
        for (k, pools) in s.launchers.iter().enumerate() {
            for (j, p) in pools.iter().enumerate() {
                for l in 0..2 {
                    if p.ready[l] {
                        let when = shared.now - 3600.0;
                        shared.add_ready_upload(&provider_name(k, j), &format!("d{l}"), "b0", when);
                    }
                }
            }
        }
        for w in &mut worlds {
            w.snapshot.pools = shared.snapshot.pools.clone();
            w.snapshot.images = shared.snapshot.images.clone();
        }
        // Publish: each launcher writes its pools' launchable labels; the
        // paused flag is the generated one.
        let mut published = shared.snapshot.pools.clone();
        for (k, w) in worlds.iter().enumerate() {
            for st in &w.plan().pools {
                let j: usize = st.pool.provider.rsplit('x').next()
                    .and_then(|n| n.parse().ok()).expect("pool index");
                let spec = &s.launchers[k][j];
                let want: Vec<String> = (0..2)
                    .filter(|&l| spec.labels.contains(&l) && !spec.disabled && spec.ready[l])
                    .map(|l| LABELS[l].to_string())
                    .collect();
                prop_assert_eq!(&st.launchable, &want, "{}", st.pool);
                let id = &w.local.pool_ids[&st.pool];
                let c = published.iter_mut().find(|p| &p.id == id).expect("registered");
                c.launchable = Some(st.launchable.clone());
                c.paused = spec.paused;
            }
        }
        for w in &mut worlds {
            w.snapshot.pools = published.clone();
        }
        // Decide.
        let created: Vec<Vec<usize>> = worlds.iter().map(|w| {
            let plan = w.plan();
            (0..2).map(|l| plan.actions.iter()
                .filter(|a| matches!(a, Action::CreateMinReady { label } if label == LABELS[l]))
                .count()).collect()
        }).collect();
        for l in 0..2 {
            let able: Vec<bool> = s.launchers.iter()
                .map(|pools| pools.iter().any(|p| p.can_boot(l)))
                .collect();
            let creators: Vec<usize> = (0..worlds.len()).filter(|&k| created[k][l] > 0).collect();
            if able.iter().any(|&a| a) {
                prop_assert_eq!(creators.len(), 1, "label {}: creators {:?}", LABELS[l], creators);
                let k = creators[0];
                prop_assert!(able[k], "label {}: launcher {} cannot boot it", LABELS[l], k);
                prop_assert_eq!(created[k][l], s.min_ready[l] as usize, "label {}", LABELS[l]);
            } else {
                prop_assert!(creators.is_empty(), "label {}: nobody can boot it, yet {:?} create", LABELS[l], creators);
            }
        }
    }
}
