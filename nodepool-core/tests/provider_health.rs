//! The launcher's breaker around a real cloud (the simulated one, its API
//! made to hang or fail), on tokio's paused clock: per-call timeouts,
//! failing fast once unavailable, long waits cut short, the probe that
//! brings a provider back, and what does not count as an API failure.

use std::sync::Arc;
use std::time::Duration;

use indexmap::IndexMap;
use nodepool_core::config::{ApiFault, Config};
use nodepool_core::launcher::Metrics;
use nodepool_core::launcher::health::{HealthCheckedProvider, HealthMonitor, HealthPolicy};
use nodepool_core::provider::{ImageRef, InstanceSpec, META_NODE_ID, Provider, ProviderError};
use nodepool_simulated::SimulatedProvider;
use tokio::time::Instant;

const CLOUD: &str = r#"
labels: [{name: small}]
providers:
  - name: sim
    driver: simulated
    simulation:
      api-timeout: 5
      boot-delay: 100
      delete-delay: 0
      quota: {instances: 1}
      flavors: [{name: s, vcpus: 1, ram: 1024}]
    cloud-images: [{name: img}]
    pools:
      - name: main
        labels: [{name: small, cloud-image: img, flavor-name: s}]
"#;

struct Guarded {
    cloud: SimulatedProvider,
    provider: HealthCheckedProvider,
    monitor: Arc<HealthMonitor>,
    metrics: Arc<Metrics>,
    config: Config,
}

fn guarded() -> Guarded {
    let config = Config::from_yaml(CLOUD).expect("valid config");
    let cloud = SimulatedProvider::new(&config.providers[0]).expect("cloud");
    let metrics = Arc::new(Metrics::in_memory());
    let monitor = Arc::new(HealthMonitor::new(
        "sim",
        HealthPolicy {
            failure_threshold: 3,
            initial_backoff: Duration::from_secs(2),
            max_backoff: Duration::from_secs(60),
            max_retry_after: Duration::from_secs(600),
        },
        metrics.clone(),
    ));
    let provider = HealthCheckedProvider::new(Arc::new(cloud.clone()), monitor.clone());
    Guarded {
        cloud,
        provider,
        monitor,
        metrics,
        config,
    }
}

fn spec(g: &Guarded, node: &str) -> InstanceSpec {
    let mut metadata = IndexMap::new();
    metadata.insert(META_NODE_ID.to_owned(), node.to_owned());
    InstanceSpec {
        name: format!("np{node}"),
        node_id: node.to_owned(),
        provider: "sim".into(),
        pool: "main".into(),
        label: g.config.providers[0].pools[0].labels[0].clone(),
        image: ImageRef::Cloud {
            id: None,
            name: "img".into(),
        },
        availability_zone: None,
        security_groups: Vec::new(),
        config_drive: None,
        auto_floating_ip: false,
        metadata,
    }
}

fn is_unavailable<T: std::fmt::Debug>(r: &Result<T, ProviderError>) -> bool {
    matches!(r, Err(ProviderError::Unavailable(_)))
}

#[tokio::test(start_paused = true)]
async fn a_hung_api_is_marked_unavailable_after_three_timeouts_then_calls_fail_fast() {
    let g = guarded();
    assert_eq!(g.provider.api_timeout(), Duration::from_secs(5));
    g.cloud.set_api_fault(Some(ApiFault::Hang)).await;
    let t0 = Instant::now();
    for n in 1..=3 {
        let e = g.provider.list_instances().await.expect_err("hung");
        assert!(matches!(e, ProviderError::Timeout(_)), "{e:?}");
        assert_eq!(
            t0.elapsed(),
            Duration::from_secs(5 * n),
            "each bounded by api-timeout"
        );
    }
    let outage = g
        .monitor
        .outage()
        .expect("unavailable after three timeouts");
    assert!(outage.reason.contains("server list"), "{}", outage.reason);
    assert_eq!(g.metrics.counter("nodepool.provider.sim.outages"), 1);
    assert_eq!(
        g.metrics.gauge_value("nodepool.provider.sim.health"),
        Some(0.0)
    );
    // Fail fast: no time passes, and the cloud is not called.
    let t1 = Instant::now();
    let r = g.provider.create_instance(&spec(&g, "0000000001")).await;
    assert!(is_unavailable(&r), "{r:?}");
    assert!(g.provider.quota_limits().await.is_err());
    assert_eq!(t1.elapsed(), Duration::ZERO);
    assert_eq!(g.cloud.server_count().await, 0);
}

#[tokio::test(start_paused = true)]
async fn a_long_wait_is_cut_short_when_the_provider_becomes_unavailable() {
    let g = guarded();
    let s = spec(&g, "0000000001");
    let id = g.provider.create_instance(&s).await.expect("create");
    // The server boots for 100 s; the API starts answering 500 meanwhile.
    let provider = Arc::new(g.provider);
    let waiting = {
        let (p, id, s) = (provider.clone(), id.clone(), s.clone());
        tokio::spawn(async move { p.wait_for_instance(&id, &s).await })
    };
    tokio::time::sleep(Duration::from_secs(1)).await;
    g.cloud.set_api_fault(Some(ApiFault::ServerError)).await;
    let t0 = Instant::now();
    for _ in 0..3 {
        let e = provider.list_instances().await.expect_err("500");
        assert!(matches!(e, ProviderError::Transient(_)), "{e:?}");
    }
    let r = waiting.await.expect("join");
    assert!(is_unavailable(&r), "{r:?}");
    assert!(
        r.expect_err("cut short").to_string().contains("cut short"),
        "says why"
    );
    assert_eq!(t0.elapsed(), Duration::ZERO, "at once, not after the boot");
    // A new wait (or delete) fails fast, and never probes.
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert!(is_unavailable(&provider.wait_for_instance(&id, &s).await));
    assert!(is_unavailable(&provider.delete_instance(&id).await));
    assert!(g.monitor.probe_due());
}

#[tokio::test(start_paused = true)]
async fn probes_back_off_until_one_succeeds() {
    let g = guarded();
    g.cloud
        .set_api_fault(Some(ApiFault::RateLimit {
            retry_after: Some(Duration::from_secs(1)),
        }))
        .await;
    for _ in 0..3 {
        let e = g.provider.quota_limits().await.expect_err("429");
        assert_eq!(e.retry_after(), Some(Duration::from_secs(1)));
    }
    let since = Instant::now();
    assert!(g.monitor.outage().is_some());
    // The first probe goes after the initial backoff (longer than the
    // cloud's Retry-After); it fails, so the next waits twice as long.
    tokio::time::sleep(Duration::from_millis(1999)).await;
    assert!(!g.monitor.probe_due());
    assert!(is_unavailable(&g.provider.quota_limits().await));
    tokio::time::sleep(Duration::from_millis(1)).await;
    assert!(g.monitor.probe_due());
    let e = g
        .provider
        .quota_limits()
        .await
        .expect_err("probe, still 429");
    assert!(matches!(e, ProviderError::RateLimited { .. }), "{e:?}");
    tokio::time::sleep(Duration::from_millis(3999)).await;
    assert!(is_unavailable(&g.provider.list_images().await));
    tokio::time::sleep(Duration::from_millis(1)).await;
    // The cloud recovers: the next probe closes the breaker.
    g.cloud.set_api_fault(None).await;
    g.provider.list_images().await.expect("the probe answers");
    assert!(g.monitor.outage().is_none());
    assert_eq!(since.elapsed(), Duration::from_secs(6));
    assert_eq!(
        g.metrics.gauge_value("nodepool.provider.sim.health"),
        Some(1.0)
    );
    g.provider
        .create_instance(&spec(&g, "0000000002"))
        .await
        .expect("calls go through again");
}

#[tokio::test(start_paused = true)]
async fn a_probe_that_hangs_counts_as_failed_and_a_cancelled_one_hands_on() {
    let g = guarded();
    g.cloud.set_api_fault(Some(ApiFault::Hang)).await;
    for _ in 0..3 {
        let _ = g.provider.list_instances().await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    // A probe cancelled by its caller: the next call probes instead.
    let cancelled = tokio::time::timeout(Duration::from_secs(1), g.provider.quota_limits()).await;
    assert!(cancelled.is_err());
    assert!(g.monitor.probe_due());
    let t0 = Instant::now();
    let e = g.provider.quota_limits().await.expect_err("hung probe");
    assert!(matches!(e, ProviderError::Timeout(_)), "{e:?}");
    assert_eq!(t0.elapsed(), Duration::from_secs(5));
    assert!(!g.monitor.probe_due(), "reopened with a longer backoff");
    assert!(g.monitor.outage().is_some());
}

#[tokio::test(start_paused = true)]
async fn answers_about_the_request_are_no_api_failures() {
    let g = guarded();
    let s = spec(&g, "0000000001");
    g.provider
        .create_instance(&s)
        .await
        .expect("the one instance");
    for n in 2..8 {
        let e = g
            .provider
            .create_instance(&spec(&g, &format!("{n:010}")))
            .await
            .expect_err("over quota");
        assert!(matches!(e, ProviderError::QuotaExceeded(_)), "{e:?}");
        let e = g
            .provider
            .console_log("no-such-server")
            .await
            .expect_err("not found");
        assert!(matches!(e, ProviderError::NotFound(_)), "{e:?}");
    }
    assert!(g.monitor.outage().is_none());
    // And they reset the count: two timeouts, an answer, two timeouts.
    g.cloud.set_api_fault(Some(ApiFault::Hang)).await;
    let _ = g.provider.list_images().await;
    let _ = g.provider.list_images().await;
    g.cloud.set_api_fault(None).await;
    g.provider.list_images().await.expect("answers");
    g.cloud.set_api_fault(Some(ApiFault::Hang)).await;
    let _ = g.provider.list_images().await;
    let _ = g.provider.list_images().await;
    assert!(g.monitor.outage().is_none());
    assert_eq!(g.metrics.counter("nodepool.provider.sim.outages"), 0);
}
