//! The launcher under store faults, on the in-memory store and the
//! simulated cloud, on tokio's paused clock: a store outage shorter than
//! the session (suspended, then back), a session lost mid-launch, a server
//! created just as the lock went, and writes whose outcome the store could
//! not report. In every case no launch is stranded, no node is `ready`
//! without a live server, and no server outlives its node — without the
//! leak sweep, which these launchers never run (its interval is a day).

mod support;

use std::time::Duration;

use nodepool_core::model::NodeState;
use nodepool_requestor::Outcome;
use nodepool_simulated::faults::{Fault, Operation};
use support::{Rig, until};

const CONFIG: &str = r#"
labels:
  - name: small
providers:
  - name: sim
    driver: simulated
    simulation:
      boot-delay: 2
      flavors:
        - {name: s, vcpus: 2, ram: 2048}
    cloud-images: [{name: img}]
    pools:
      - name: main
        max-servers: 10
        labels:
          - {name: small, cloud-image: img, flavor-name: s}
"#;

/// Waits until `n` nodes are `building` with their server recorded.
async fn booting(h: &Rig, n: usize) {
    until("servers booting", || async {
        h.nodes()
            .await
            .values()
            .filter(|(st, server, _)| *st == NodeState::Building && server.is_some())
            .count()
            == n
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn a_store_outage_shorter_than_the_session_loses_no_launch() {
    let h = Rig::start(CONFIG).await;
    let ids = h.submit_many(5).await;
    booting(&h, 5).await;
    // Three blips in a row, each while servers boot or become active: the
    // launches wait (their session and locks survive), then go on.
    for _ in 0..3 {
        h.launcher_client.suspend();
        tokio::time::sleep(Duration::from_secs(3)).await;
        h.launcher_client.resume();
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    for id in &ids {
        assert!(matches!(
            h.zuul
                .wait(id, Duration::from_secs(60))
                .await
                .expect("wait"),
            Outcome::Fulfilled(_)
        ));
    }
    h.assert_no_dead_ready_node().await;
    assert_eq!(
        h.servers().await.len(),
        5,
        "no server was deleted and made again"
    );
    assert_eq!(h.metrics.counter("nodepool.launch.attempt_failed"), 0);
    h.finish(&ids).await;
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_session_lost_mid_launch_gives_the_launches_up_and_serves_again() {
    let h = Rig::start(CONFIG).await;
    let ids = h.submit_many(4).await;
    booting(&h, 4).await;
    let first: Vec<String> = h.nodes().await.keys().cloned().collect();
    // The session expires under the launches: their locks are gone. They
    // write nothing more; the nodes (unlocked, `building`) are deleted with
    // their servers, and the requests are served with new nodes.
    h.launcher_client.suspend();
    tokio::time::sleep(Duration::from_secs(1)).await;
    h.launcher_client.expire_session();
    for id in &ids {
        let Outcome::Fulfilled(req) = h
            .zuul
            .wait(id, Duration::from_secs(120))
            .await
            .expect("wait")
        else {
            panic!("request {id} failed");
        };
        for n in &req.value.nodes {
            assert!(
                !first.contains(n),
                "request {id} got node {n} of the lost session"
            );
        }
    }
    until("the lost launches' nodes and servers gone", || async {
        let nodes = h.nodes().await;
        first.iter().all(|n| !nodes.contains_key(n)) && h.servers().await.len() == nodes.len()
    })
    .await;
    h.assert_no_dead_ready_node().await;
    h.finish(&ids).await;
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_server_made_as_the_lock_went_is_deleted_at_once() {
    let h = Rig::start(CONFIG).await;
    // Creates hang until the faults change.
    h.faulty.set(Operation::CreateInstance, Fault::Hang);
    let ids = h.submit_many(1).await;
    until("the create under way", || async {
        h.faulty.in_flight() == 1
    })
    .await;
    // The store goes away while the cloud creates the server; by the time
    // the launch can record it, the session (and the lock) is gone.
    h.launcher_client.suspend();
    h.faulty.clear(Operation::CreateInstance);
    until("the server created", || async {
        h.servers().await.len() == 1
    })
    .await;
    let lost = h.servers().await.into_keys().next().expect("one server");
    h.launcher_client.expire_session();
    until("the unrecorded server deleted", || async {
        !h.servers().await.contains_key(&lost)
    })
    .await;
    assert_eq!(
        h.metrics.counter("nodepool.provider.sim.orphans_deleted"),
        1,
        "deleted by the launch that made it, not by a sweep"
    );
    h.assert_no_dead_ready_node().await;
    h.finish(&ids).await;
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn writes_whose_outcome_is_unknown_never_hand_out_a_dead_node() {
    let h = Rig::start(CONFIG).await;
    // Every write the launcher makes is applied and then reported as a
    // connection reset: each must be resolved by reading the record back.
    h.launcher_client.ambiguous_writes(u32::MAX);
    let ids = h.submit_many(5).await;
    for id in &ids {
        assert!(matches!(
            h.zuul
                .wait(id, Duration::from_secs(120))
                .await
                .expect("wait"),
            Outcome::Fulfilled(_)
        ));
        h.assert_no_dead_ready_node().await;
    }
    assert_eq!(h.servers().await.len(), 5);
    assert_eq!(h.metrics.counter("nodepool.launch.attempt_failed"), 0);
    h.finish(&ids).await;
    h.stop().await;
}
