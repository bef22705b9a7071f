//! `planner::explain`: why a request waits, pool by pool, on modelled
//! installations — one reason per pool, the first the planner would meet.

use nodepool_core::model::{NodeState, RequestState};
use nodepool_core::planner::PoolKey;
use nodepool_core::planner::explain::{RequestExplanation, Verdict, explain_request};
use nodepool_core::planner::quota::QuotaScope;
use nodepool_core::testing::World;

const THREE_POOLS: &str = r#"
labels:
  - name: small
  - name: built
  - name: arm
diskimages:
  - name: ubuntu
providers:
  - name: east
    driver: simulated
    simulation:
      flavors:
        - {name: s, vcpus: 2, ram: 2048}
      quota: {instances: 3}
    cloud-images: [{name: img}]
    diskimages: [{name: ubuntu}]
    pools:
      - name: main
        max-servers: 2
        labels:
          - {name: small, cloud-image: img, flavor-name: s}
          - {name: built, diskimage: ubuntu, flavor-name: s}
      - name: off
        max-servers: 0
        labels:
          - {name: small, cloud-image: img, flavor-name: s}
  - name: west
    driver: simulated
    simulation:
      flavors:
        - {name: s, vcpus: 2, ram: 2048}
    cloud-images: [{name: img}]
    pools:
      - name: main
        max-servers: 5
        labels:
          - {name: arm, cloud-image: img, flavor-name: s}
"#;

fn verdict<'a>(e: &'a RequestExplanation, provider: &str, pool: &str) -> &'a Verdict {
    let key = PoolKey::new(provider, pool);
    &e.pools
        .iter()
        .find(|p| p.pool == key)
        .unwrap_or_else(|| panic!("no line for {provider}/{pool}: {e:?}"))
        .verdict
}

fn explain(w: &World, id: &str) -> RequestExplanation {
    explain_request(&w.snapshot, &w.config, w.now, id).expect("the request exists")
}

#[test]
fn every_pool_says_why_it_does_or_does_not_serve_a_request() {
    let mut w = World::new(THREE_POOLS);
    let r = w.add_request(&["small"], "200");
    let e = explain(&w, &r);
    assert_eq!(e.state, RequestState::Requested);
    assert_eq!(e.pools.len(), 3, "one line per configured pool");
    assert_eq!(verdict(&e, "east", "main"), &Verdict::WouldTake);
    assert_eq!(verdict(&e, "east", "off"), &Verdict::Disabled);
    assert_eq!(
        verdict(&e, "west", "main"),
        &Verdict::LabelNotServed {
            label: "small".into()
        }
    );
    assert!(
        e.summary.contains("1 of 3 pools could serve it"),
        "{}",
        e.summary
    );
    assert_eq!(
        verdict(&e, "east", "off").to_string(),
        "disabled (max-servers is 0 or less)"
    );
}

#[test]
fn a_full_pool_says_which_limit_and_by_how_much() {
    let mut w = World::new(THREE_POOLS);
    w.add_node("east", "main", "small", NodeState::InUse);
    w.add_node("east", "main", "small", NodeState::InUse);
    let r = w.add_request(&["small"], "200");
    let e = explain(&w, &r);
    let Verdict::QuotaFull(short) = verdict(&e, "east", "main") else {
        panic!("{e:?}");
    };
    assert_eq!(short.scope, QuotaScope::Pool);
    assert_eq!(
        (short.resource.as_str(), short.used, short.limit, short.need),
        ("instances", 2, 2, 1)
    );
    assert_eq!(
        verdict(&e, "east", "main").to_string(),
        "quota full: pool instances is 2 of 2 in use, 1 more needed"
    );
}

#[test]
fn the_clouds_quota_and_sets_that_never_fit_are_told_apart() {
    let mut w = World::new(&THREE_POOLS.replace("max-servers: 2", "max-servers: 10"));
    // Three servers the cloud holds that are not ours: its quota is 3.
    for _ in 0..3 {
        w.add_node("east", "gone-pool", "small", NodeState::InUse);
    }
    let r = w.add_request(&["small"], "200");
    let e = explain(&w, &r);
    let Verdict::QuotaFull(short) = verdict(&e, "east", "main") else {
        panic!("{e:?}");
    };
    assert_eq!(short.scope, QuotaScope::Cloud);
    // Four nodes at once can never fit a cloud of three instances.
    let big = w.add_request(&["small", "small", "small", "small"], "200");
    let e = explain(&w, &big);
    let Verdict::NeverFits(short) = verdict(&e, "east", "main") else {
        panic!("{e:?}");
    };
    assert_eq!(
        (short.scope.clone(), short.need, short.limit),
        (QuotaScope::Cloud, 4, 3)
    );
}

#[test]
fn images_outages_declines_and_missing_launchers_are_named() {
    let mut w = World::new(THREE_POOLS);
    let r = w.add_request(&["built"], "200");
    let e = explain(&w, &r);
    assert_eq!(
        verdict(&e, "east", "main"),
        &Verdict::ImageNotReady {
            label: "built".into(),
            image: "ubuntu".into()
        }
    );
    let mut w = w.with_ready_images();
    assert_eq!(
        verdict(&explain(&w, &r), "east", "main"),
        &Verdict::WouldTake
    );

    w.set_outage("east", Some("HTTP 503 from nova"));
    assert_eq!(
        verdict(&explain(&w, &r), "east", "main"),
        &Verdict::Unavailable {
            reason: "HTTP 503 from nova".into()
        }
    );
    w.set_outage("east", None);

    let id = w
        .local
        .pool_ids
        .get(&PoolKey::new("east", "main"))
        .cloned()
        .expect("registered");
    w.edit_request(&r, |q| q.declined_by.push(id));
    assert_eq!(
        verdict(&explain(&w, &r), "east", "main"),
        &Verdict::Declined
    );

    // Nobody runs west/main: its launcher is not registered.
    let arm = w.add_request(&["arm"], "200");
    w.snapshot.pools.retain(|p| p.provider != "west");
    assert_eq!(
        verdict(&explain(&w, &arm), "west", "main"),
        &Verdict::NoLauncher
    );
}

#[test]
fn a_held_request_shows_its_nodes_and_queued_ones_their_place() {
    let mut w = World::new(THREE_POOLS);
    let first = w.add_request(&["small"], "200");
    let second = w.add_request(&["small"], "200");
    let third = w.add_request(&["small"], "200");
    let p = w.plan();
    w.apply(&p);
    let e = explain(&w, &first);
    assert_eq!(e.state, RequestState::Pending);
    assert_eq!(
        verdict(&e, "east", "main"),
        &Verdict::Holds {
            ready: 0,
            building: 1,
            total: 1
        }
    );
    assert!(
        e.summary.contains("pool east/main holds it"),
        "{}",
        e.summary
    );
    // Two servers of two are launching: the third waits for quota.
    let e = explain(&w, &third);
    assert!(
        matches!(verdict(&e, "east", "main"), Verdict::QuotaFull(_)),
        "{e:?}"
    );
    assert_eq!(
        w.request(&second).map(|r| r.state),
        Some(RequestState::Pending)
    );

    w.finish_launches();
    let p = w.plan();
    w.apply(&p);
    let e = explain(&w, &first);
    assert_eq!(e.state, RequestState::Fulfilled);
    assert!(e.pools.is_empty());
    assert!(e.summary.starts_with("fulfilled"), "{}", e.summary);
    assert_eq!(
        explain_request(&w.snapshot, &w.config, w.now, "200-9999999999"),
        None
    );
}

/// The dashboard's batch: one line per waiting request, the same as the
/// request's own explanation says, and each pool's quota use.
#[test]
fn waiting_requests_are_explained_in_one_batch_with_pool_usage() {
    use nodepool_core::planner::explain::{explain_waiting, pool_usage};
    let mut w = World::new(THREE_POOLS);
    let first = w.add_request(&["small"], "200");
    let second = w.add_request(&["small"], "200");
    let third = w.add_request(&["small"], "200");
    let arm = w.add_request(&["arm"], "200");
    let p = w.plan();
    w.apply(&p);
    let lines = explain_waiting(&w.snapshot, &w.config, w.now);
    let ids: Vec<&str> = lines.iter().map(|(id, _)| id.as_str()).collect();
    assert_eq!(ids.len(), 4, "{lines:?}");
    for id in [&first, &second, &third, &arm] {
        let (_, line) = lines
            .iter()
            .find(|(i, _)| i == id)
            .unwrap_or_else(|| panic!("{id} missing: {lines:?}"));
        assert_eq!(line, &explain(&w, id).one_line(), "{id}");
    }
    let line = |id: &str| lines.iter().find(|(i, _)| i == id).map(|(_, l)| l.clone());
    assert_eq!(
        line(&first).as_deref(),
        Some("east/main: holds it: 0 of 1 nodes ready, 1 being launched")
    );
    assert!(
        line(&third).is_some_and(|l| l.starts_with("east/main: quota full: pool instances")),
        "{lines:?}"
    );

    let usage = pool_usage(&w.snapshot, &w.config);
    let names: Vec<String> = usage
        .iter()
        .map(|u| format!("{}/{}", u.pool.provider, u.pool.pool))
        .collect();
    assert_eq!(names, ["east/main", "east/off", "west/main"]);
    assert_eq!(usage[0].used.get("instances"), 2);
    assert_eq!(usage[0].limits.get("instances"), Some(2));
    assert_eq!(usage[2].used.get("instances"), 1);
    assert_eq!(usage[2].limits.get("instances"), Some(5));

    w.finish_launches();
    let p = w.plan();
    w.apply(&p);
    let lines = explain_waiting(&w.snapshot, &w.config, w.now);
    assert!(
        lines.iter().all(|(id, _)| id != &first),
        "a fulfilled request does not wait: {lines:?}"
    );
}
