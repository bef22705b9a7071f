//! The fault-injecting decorator around the simulated cloud: with nothing
//! set it passes the whole Provider conformance suite; each fault answers
//! as documented without reaching the cloud; `set_next` spends itself;
//! hangs wait for a change; latency and the concurrency limit hold on
//! tokio's paused clock; counters count what was injected.

use std::sync::Arc;
use std::time::Duration;

use indexmap::IndexMap;
use nodepool_model::config::{Config, PoolLabel};

use nodepool_model::provider::{ImageRef, InstanceSpec, META_NODE_ID, Provider, ProviderError};
use nodepool_simulated::SimulatedProvider;
use nodepool_simulated::faults::{Fault, FaultyProvider, Operation};
use tokio::time::Instant;

mod support;

const CLOUD: &str = r#"
labels: [{name: small}, {name: huge}]
providers:
  - name: sim
    driver: simulated
    simulation:
      boot-delay: 2
      delete-delay: 0
      api-timeout: 5
      quota: {instances: 100, cores: 64, ram: 1000000}
      flavors:
        - {name: small, vcpus: 2, ram: 2048}
        - {name: huge, vcpus: 128, ram: 8192}
    cloud-images: [{name: ubuntu, image-name: Ubuntu 22.04}]
    pools:
      - name: main
        labels:
          - {name: small, cloud-image: ubuntu, min-ram: 1024}
          - {name: huge, cloud-image: ubuntu, flavor-name: huge}
"#;

fn config() -> Config {
    Config::from_yaml(CLOUD).unwrap_or_else(|e| panic!("test config is invalid: {e}"))
}

fn label(c: &Config, name: &str) -> PoolLabel {
    c.providers[0].pools[0]
        .label(name)
        .expect("pool label")
        .clone()
}

mod conformance_with_no_fault {
    use std::sync::Arc;

    use nodepool_simulated::faults::FaultyProvider;

    use super::support::Sim;
    nodepool_model::provider_conformance_tests!(Sim::wrapped(|cloud| Arc::new(
        FaultyProvider::new(Arc::new(cloud))
    )));
}

/// The simulated cloud (kept for its hooks) behind a decorator.
struct Rig {
    cloud: SimulatedProvider,
    faulty: FaultyProvider,
    config: Config,
}

fn rig() -> Rig {
    let config = config();
    let cloud = SimulatedProvider::new(&config.providers[0]).expect("simulated");
    let faulty = FaultyProvider::new(Arc::new(cloud.clone()));
    Rig {
        cloud,
        faulty,
        config,
    }
}

fn spec(r: &Rig, node: u32) -> InstanceSpec {
    let node = format!("{node:010}");
    let mut metadata = IndexMap::new();
    metadata.insert(META_NODE_ID.to_owned(), node.clone());
    InstanceSpec {
        name: format!("np{node}"),
        node_id: node,
        provider: "sim".into(),
        pool: "main".into(),
        label: label(&r.config, "small"),
        image: ImageRef::Cloud {
            id: None,
            name: "Ubuntu 22.04".into(),
        },
        availability_zone: None,
        security_groups: Vec::new(),
        config_drive: None,
        auto_floating_ip: false,
        metadata,
    }
}

#[tokio::test(start_paused = true)]
async fn each_fault_answers_as_documented_without_reaching_the_cloud() {
    let r = rig();
    let p = &r.faulty;
    assert_eq!(p.name(), "sim");
    assert_eq!(p.api_timeout(), Duration::from_secs(5), "the inner's");
    assert_eq!(p.skip_nodescan(), r.cloud.skip_nodescan(), "the inner's");

    p.set(Operation::CreateInstance, Fault::QuotaExceeded);
    let e = p.create_instance(&spec(&r, 1)).await.expect_err("403");
    assert!(matches!(e, ProviderError::QuotaExceeded(_)), "{e:?}");
    assert!(
        nodepool_model::cloud::is_quota_message(&e.to_string()),
        "reads like Nova's 403: {e}"
    );
    assert!(e.to_string().contains("create_instance"), "{e}");

    p.set(Operation::CreateInstance, Fault::ServerError);
    let e = p.create_instance(&spec(&r, 2)).await.expect_err("500");
    assert!(matches!(e, ProviderError::Transient(_)), "{e:?}");
    assert!(e.is_api_failure());

    let wait = Some(Duration::from_secs(30));
    p.set(
        Operation::CreateInstance,
        Fault::RateLimited { retry_after: wait },
    );
    let e = p.create_instance(&spec(&r, 3)).await.expect_err("429");
    assert_eq!(e.retry_after(), wait);
    assert!(e.to_string().contains("Retry-After: 30"), "{e}");

    p.set(
        Operation::CreateInstance,
        Fault::Error(ProviderError::Unauthenticated("token expired".into())),
    );
    let e = p.create_instance(&spec(&r, 4)).await.expect_err("given");
    assert_eq!(e, ProviderError::Unauthenticated("token expired".into()));

    assert_eq!(
        r.cloud.server_count().await,
        0,
        "no fault reached the cloud"
    );
    assert_eq!(p.calls(Operation::CreateInstance), 4);
    assert_eq!(p.injected(Operation::CreateInstance), 4);
    // Other operations are untouched.
    assert!(p.list_instances().await.expect("list").is_empty());
    assert_eq!(p.injected(Operation::ListInstances), 0);
    assert_eq!(p.injected_total(), 4);

    p.clear(Operation::CreateInstance);
    assert_eq!(p.fault(Operation::CreateInstance), None);
    let id = p.create_instance(&spec(&r, 5)).await.expect("through");
    assert_eq!(r.cloud.server_count().await, 1);
    assert_eq!(
        p.get_instance(&id).await.expect("get").map(|i| i.name),
        Some("np0000000005".into())
    );
    assert_eq!(p.injected_total(), 4);
}

#[tokio::test(start_paused = true)]
async fn set_next_spends_itself_then_calls_go_through() {
    let r = rig();
    let p = &r.faulty;
    p.set_next(Operation::QuotaLimits, Fault::ServerError, 2);
    assert!(p.quota_limits().await.is_err());
    assert_eq!(p.fault(Operation::QuotaLimits), Some(Fault::ServerError));
    assert!(p.quota_limits().await.is_err());
    assert_eq!(p.fault(Operation::QuotaLimits), None, "spent");
    let limits = p.quota_limits().await.expect("the third goes through");
    assert_eq!(limits.get("instances"), Some(100));
    assert_eq!(p.calls(Operation::QuotaLimits), 3);
    assert_eq!(p.injected(Operation::QuotaLimits), 2);
    p.set_next(Operation::QuotaLimits, Fault::ServerError, 0);
    assert_eq!(p.fault(Operation::QuotaLimits), None, "zero times: cleared");
}

#[tokio::test(start_paused = true)]
async fn set_all_fails_every_operation_and_clear_all_restores_them() {
    let r = rig();
    let p = &r.faulty;
    p.set_all(Fault::ServerError);
    assert!(p.quota_limits().await.is_err());
    assert!(p.list_images().await.is_err());
    assert!(p.list_instances().await.is_err());
    assert!(p.delete_instance("nope").await.is_err());
    assert!(p.label_resources(&label(&r.config, "small")).await.is_err());
    for op in Operation::ALL {
        assert_eq!(p.fault(op), Some(Fault::ServerError), "{op}");
    }
    assert_eq!(p.injected_total(), 5);
    p.clear_all();
    p.list_images().await.expect("answers again");
    p.delete_instance("nope")
        .await
        .expect("a missing server is deleted");
}

#[tokio::test(start_paused = true)]
async fn a_hung_call_waits_until_its_fault_is_cleared_then_goes_through() {
    let r = rig();
    let p = r.faulty.clone();
    p.set(Operation::ListInstances, Fault::Hang);
    let t0 = Instant::now();
    let hung = {
        let p = p.clone();
        tokio::spawn(async move { p.list_instances().await })
    };
    // An hour of virtual time: still no answer.
    tokio::time::sleep(Duration::from_secs(3600)).await;
    assert!(!hung.is_finished());
    assert_eq!(p.in_flight(), 1);
    // A change of another operation does not release it.
    p.set(Operation::QuotaLimits, Fault::ServerError);
    tokio::task::yield_now().await;
    assert!(!hung.is_finished());
    p.clear(Operation::ListInstances);
    let listed = hung.await.expect("join").expect("went through");
    assert!(listed.is_empty());
    assert_eq!(t0.elapsed(), Duration::from_secs(3600));
    assert_eq!(p.injected(Operation::ListInstances), 1);
    assert_eq!(p.in_flight(), 0);

    // The caller bounds it, as the launcher does with api_timeout.
    p.set(Operation::ListImages, Fault::Hang);
    let bounded = tokio::time::timeout(Duration::from_secs(5), p.list_images()).await;
    assert!(bounded.is_err(), "still hung after 5 s");
    assert_eq!(p.in_flight(), 0, "a cancelled call is no longer in flight");

    // A hang replaced by an error answers with that error, spending it.
    p.set(Operation::GetInstance, Fault::Hang);
    let hung = {
        let p = p.clone();
        tokio::spawn(async move { p.get_instance("x").await })
    };
    tokio::time::sleep(Duration::from_secs(1)).await;
    p.set_next(
        Operation::GetInstance,
        Fault::RateLimited {
            retry_after: Some(Duration::from_secs(2)),
        },
        1,
    );
    let e = hung.await.expect("join").expect_err("429 now");
    assert_eq!(e.retry_after(), Some(Duration::from_secs(2)));
    assert_eq!(
        p.fault(Operation::GetInstance),
        None,
        "spent by the hung call"
    );
    assert_eq!(p.get_instance("x").await.expect("through"), None);
    assert_eq!(p.injected(Operation::GetInstance), 1, "one call got faults");
    assert_eq!(p.calls(Operation::GetInstance), 2);
}

#[tokio::test(start_paused = true)]
async fn latency_is_added_to_every_call_of_its_operation() {
    let r = rig();
    let p = &r.faulty;
    p.set_latency(Operation::CreateInstance, Duration::from_millis(750));
    let t0 = Instant::now();
    let id = p.create_instance(&spec(&r, 1)).await.expect("create");
    assert_eq!(t0.elapsed(), Duration::from_millis(750));
    let t1 = Instant::now();
    p.list_instances().await.expect("list");
    assert_eq!(t1.elapsed(), Duration::ZERO, "only the named operation");
    // The latency comes first: the 2 s boot runs meanwhile.
    p.set_latency(Operation::WaitForInstance, Duration::from_secs(3));
    let t2 = Instant::now();
    p.wait_for_instance(&id, &spec(&r, 1)).await.expect("boots");
    assert_eq!(t2.elapsed(), Duration::from_secs(3));
    // Latency comes before the fault: a slow 500.
    p.set_latency_all(Duration::from_secs(3));
    p.set(Operation::ListImages, Fault::ServerError);
    let t3 = Instant::now();
    assert!(p.list_images().await.is_err());
    assert_eq!(t3.elapsed(), Duration::from_secs(3));
    p.clear_all();
    let t4 = Instant::now();
    p.list_images().await.expect("list");
    assert_eq!(t4.elapsed(), Duration::ZERO, "clear_all removes latency");
}

#[tokio::test(start_paused = true)]
async fn the_concurrency_limit_queues_single_calls_but_not_waits() {
    let config = config();
    let cloud = SimulatedProvider::new(&config.providers[0]).expect("simulated");
    let p = FaultyProvider::with_concurrency_limit(Arc::new(cloud.clone()), 2);
    assert_eq!(p.concurrency_limit(), Some(2));
    p.set_latency(Operation::ListInstances, Duration::from_secs(1));
    let t0 = Instant::now();
    let calls: Vec<_> = (0..5)
        .map(|_| {
            let p = p.clone();
            tokio::spawn(async move { p.list_instances().await })
        })
        .collect();
    for c in calls {
        c.await.expect("join").expect("list");
    }
    // Five one-second calls, two at a time: three rounds.
    assert_eq!(t0.elapsed(), Duration::from_secs(3));
    assert_eq!(p.peak_in_flight(), 2);

    // Waits hold no permit: five booting servers are waited for at once,
    // and a single call still gets through meanwhile.
    let r = Rig {
        cloud,
        faulty: p.clone(),
        config,
    };
    let mut ids = Vec::new();
    for n in 0..5 {
        ids.push(p.create_instance(&spec(&r, n)).await.expect("create"));
    }
    let t1 = Instant::now();
    let waits: Vec<_> = ids
        .iter()
        .enumerate()
        .map(|(n, id)| {
            let (p, id, s) = (p.clone(), id.clone(), spec(&r, n as u32));
            tokio::spawn(async move { p.wait_for_instance(&id, &s).await })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(p.in_flight(), 5);
    p.quota_limits().await.expect("not queued behind the waits");
    for w in waits {
        w.await.expect("join").expect("active");
    }
    assert_eq!(t1.elapsed(), Duration::from_secs(2), "one boot, not five");
    assert_eq!(r.cloud.server_count().await, 5);
}
