//! The launcher driven through faults injected into single calls of a real
//! cloud (the simulated one behind `nodepool_simulated::faults::
//! FaultyProvider`), on the in-memory store and tokio's paused clock: a
//! create that hangs is cut off by `api-timeout` and retried; creates
//! refused with Nova's quota 403 are given up without failing the request;
//! a cloud answering 429 with a `Retry-After` is left alone for as long as
//! it asked, probed once, and serves the request once it recovers. The
//! decorator's counters say which calls reached the cloud.

mod support;

use std::time::Duration;

use nodepool_core::model::RequestState;
use nodepool_simulated::faults::{Fault, Operation};
use support::{Rig, until};
use tokio::time::Instant;

const CONFIG: &str = r#"
labels:
  - name: small
providers:
  - name: sim
    driver: simulated
    simulation:
      api-timeout: 5
      boot-delay: 2
      flavors:
        - {name: s, vcpus: 2, ram: 2048}
    cloud-images: [{name: img}]
    pools:
      - name: main
        max-servers: 5
        labels:
          - {name: small, cloud-image: img, flavor-name: s}
"#;

#[tokio::test(start_paused = true)]
async fn a_hung_create_is_cut_off_by_api_timeout_and_the_launch_retried() {
    let rig = Rig::start(CONFIG).await;
    rig.faulty
        .set_next(Operation::CreateInstance, Fault::Hang, 1);
    let t0 = Instant::now();
    let id = rig.submit().await;
    rig.served(&id).await;
    let took = t0.elapsed();
    // The hung create is given up after api-timeout (not launch-timeout,
    // an hour); the retry's server boots in 2 s.
    assert!(
        took >= Duration::from_secs(7) && took < Duration::from_secs(15),
        "served after {took:?}"
    );
    assert_eq!(rig.faulty.injected(Operation::CreateInstance), 1);
    assert_eq!(rig.faulty.calls(Operation::CreateInstance), 2, "one retry");
    assert_eq!(rig.metrics.counter("nodepool.launch.attempt_failed"), 1);
    assert_eq!(
        rig.metrics.counter("nodepool.provider.sim.outages"),
        0,
        "one timeout is no outage"
    );
    until("the used node's server deleted", || async {
        rig.servers().await.is_empty()
    })
    .await;
    assert_eq!(rig.faulty.in_flight(), 0, "the hung call was dropped");
    rig.stop().await;
}

#[tokio::test(start_paused = true)]
async fn creates_refused_for_quota_do_not_fail_the_request() {
    let rig = Rig::start(CONFIG).await;
    rig.faulty
        .set_next(Operation::CreateInstance, Fault::QuotaExceeded, 2);
    let id = rig.submit().await;
    rig.served(&id).await;
    assert_eq!(rig.faulty.injected(Operation::CreateInstance), 2);
    assert_eq!(rig.faulty.calls(Operation::CreateInstance), 3);
    assert_eq!(
        rig.metrics.counter("nodepool.launch.error.quota"),
        2,
        "each refusal ends its launch as a quota error"
    );
    assert_eq!(
        rig.metrics.counter("nodepool.provider.sim.outages"),
        0,
        "a quota answer is no API failure"
    );
    until("the used node's server deleted", || async {
        rig.servers().await.is_empty()
    })
    .await;
    rig.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_rate_limited_cloud_is_left_alone_for_its_retry_after_then_serves() {
    let rig = Rig::start(CONFIG).await;
    let retry_after = Duration::from_secs(30);
    let healthy = rig.calls();
    rig.faulty.set_all(Fault::RateLimited {
        retry_after: Some(retry_after),
    });
    let id = rig.submit().await;
    until("the provider marked unavailable", || async {
        rig.metrics.counter("nodepool.provider.sim.outages") == 1
    })
    .await;
    let opened = Instant::now();
    let reached = rig.calls();
    assert_eq!(
        rig.faulty.injected_total(),
        reached - healthy,
        "every call since got a 429"
    );
    until("the outage listed", || async {
        !rig.status.unavailable_providers().is_empty()
    })
    .await;
    let outage = &rig.status.unavailable_providers()[0];
    assert_eq!(outage.provider, "sim");
    assert!(outage.reason.contains("429"), "{}", outage.reason);

    // For as long as the cloud asked, nothing reaches it, and the request
    // waits rather than failing.
    tokio::time::sleep(retry_after - Duration::from_secs(1)).await;
    assert_eq!(rig.calls(), reached, "no call before Retry-After");
    assert_ne!(rig.request_state(&id).await, RequestState::Failed);

    // Then one probe, answered 429 again: unavailable for another 30 s.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(rig.calls(), reached + 1, "exactly one probe");
    assert!(rig.faulty.injected(Operation::QuotaLimits) > 0, "the probe");
    rig.faulty.clear_all();
    let cleared = Instant::now();
    rig.served(&id).await;
    // Served only after the next probe, Retry-After after the first.
    assert!(
        opened.elapsed() >= retry_after * 2,
        "served {:?} after the opening",
        opened.elapsed()
    );
    assert!(cleared.elapsed() < retry_after + Duration::from_secs(10));
    assert!(rig.status.unavailable_providers().is_empty());
    assert_eq!(rig.metrics.counter("nodepool.provider.sim.outages"), 1);
    assert_eq!(
        rig.metrics.gauge_value("nodepool.provider.sim.health"),
        Some(1.0)
    );
    until("the used node's server deleted", || async {
        rig.servers().await.is_empty()
    })
    .await;
    rig.stop().await;
}
