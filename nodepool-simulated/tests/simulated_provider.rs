//! The simulated cloud: the whole Provider conformance suite, then every
//! knob (quota, failure dice, delays on tokio's paused clock, leaks,
//! tagging and addresses, uploads, cloud images, leak-cleanup resources).

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use indexmap::IndexMap;
use nodepool_model::config::{ApiFault, Config, PoolLabel, SimulatedCloud};
use nodepool_model::conformance::provider::{Capabilities, Harness, UploadFile};
use nodepool_model::model::{CORES, INSTANCES, Limits, RAM, Resources, VOLUME_GB, VOLUMES};
use nodepool_model::provider::{
    IMAGE_BUILD_ID, ImageRef, ImageUploadSpec, InstanceSpec, InstanceStatus, META_GROUPS,
    META_NODE_ID, META_POOL, META_PROVIDER, Provider, ProviderError, ResourceKind, SnapshotSpec,
};
use nodepool_simulated::resolve_flavor;
use nodepool_simulated::{FailureRates, SimulatedProvider};
use tokio::time::Instant;

mod support;

use support::{CONFORMANCE, IMAGE_BYTES, IMAGE_MD5, IMAGE_SHA256, Sim, config, pool_label};

mod conformance {
    use super::Sim;
    nodepool_model::provider_conformance_tests!(Sim::new());
}

// ----- helpers for the knob tests -----

/// A one-provider configuration with these `simulation` knobs (YAML flow
/// mapping body) and a `small` (2 vCPU, 2 GiB) label.
fn sim_config(knobs: &str) -> Config {
    config(&format!(
        r#"
labels: [{{name: small}}]
providers:
  - name: sim
    driver: simulated
    simulation: {{{knobs}}}
    cloud-images: [{{name: ubuntu, image-name: Ubuntu 22.04}}]
    pools:
      - name: main
        labels:
          - {{name: small, cloud-image: ubuntu, flavor-name: s2}}
"#
    ))
}

const FLAVORS: &str = "flavors: [{name: s2, vcpus: 2, ram: 2048}, {name: m4, vcpus: 4, ram: 4096}]";

struct Cloud {
    provider: SimulatedProvider,
    label: PoolLabel,
}

/// A cloud with these knobs; boot and delete take no time unless the knobs
/// say otherwise (tests with delays run on the paused clock).
fn cloud(knobs: &str) -> Cloud {
    let mut all = FLAVORS.to_owned();
    for delay in ["boot-delay", "delete-delay"] {
        if !knobs.contains(delay) {
            all += &format!(", {delay}: 0");
        }
    }
    let cfg = sim_config(&format!("{all}, {knobs}"));
    Cloud {
        provider: SimulatedProvider::new(&cfg.providers[0]).expect("simulated"),
        label: pool_label(&cfg.providers[0], "small"),
    }
}

fn spec(c: &Cloud, node: u64) -> InstanceSpec {
    let node_id = format!("{node:010}");
    let mut metadata = IndexMap::new();
    metadata.insert(META_GROUPS.to_owned(), "sim,Ubuntu 22.04,small".to_owned());
    metadata.insert(META_NODE_ID.to_owned(), node_id.clone());
    metadata.insert(META_POOL.to_owned(), "main".to_owned());
    metadata.insert(META_PROVIDER.to_owned(), "sim".to_owned());
    InstanceSpec {
        name: format!("np{node_id}"),
        node_id,
        provider: "sim".into(),
        pool: "main".into(),
        label: c.label.clone(),
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

async fn launch(c: &Cloud, node: u64) -> Result<String, ProviderError> {
    let s = spec(c, node);
    let id = c.provider.create_instance(&s).await?;
    c.provider.wait_for_instance(&id, &s).await.map(|_| id)
}

fn upload_spec(path: PathBuf, name: &str) -> ImageUploadSpec {
    let mut properties = IndexMap::new();
    properties.insert(IMAGE_BUILD_ID.to_owned(), name.to_owned());
    ImageUploadSpec {
        name: name.into(),
        path,
        format: "qcow2".into(),
        properties,
        md5: Some(IMAGE_MD5.into()),
        sha256: Some(IMAGE_SHA256.into()),
        timeout: Duration::from_secs(60),
        sent: Default::default(),
    }
}

fn image_file() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("image.qcow2");
    std::fs::write(&path, IMAGE_BYTES).expect("write");
    (dir, path)
}

// ----- construction -----

#[tokio::test]
async fn built_from_config_only_for_the_simulated_driver() {
    let cfg = config(
        r#"
labels: [{name: l}]
providers:
  - name: real
    cloud: mycloud
    cloud-images: [{name: img}]
    pools: [{name: p, labels: [{name: l, cloud-image: img, flavor-name: x}]}]
"#,
    );
    let e = SimulatedProvider::new(&cfg.providers[0]).expect_err("openstack driver");
    assert!(matches!(e, ProviderError::InvalidRequest(_)), "{e:?}");
    assert!(e.to_string().contains("real"), "{e}");

    let c = cloud("quota: {instances: 7, ram: 100000}");
    assert_eq!(c.provider.name(), "sim");
    assert!(
        c.provider.skip_nodescan(),
        "nodescan is skipped by default, as in Python's fake driver"
    );
    let limits = c.provider.quota_limits().await.expect("limits");
    assert_eq!(limits.get(INSTANCES), Some(7));
    assert_eq!(limits.get(RAM), Some(100_000));
    assert_eq!(limits.get(CORES), None, "unlimited names are absent");

    let c = cloud("skip-nodescan: false");
    assert!(!c.provider.skip_nodescan());
    assert!(
        c.provider
            .quota_limits()
            .await
            .expect("limits")
            .is_unlimited()
    );

    // explicit knobs, whatever the provider's driver
    let p = SimulatedProvider::with_knobs(&cfg.providers[0], SimulatedCloud::default());
    assert_eq!(p.name(), "real");
    assert!(p.skip_nodescan());
}

// ----- flavors and label resources -----

#[tokio::test]
async fn label_resources_follow_the_flavor_rule() {
    let c = cloud("");
    let mut label = c.label.clone();
    assert_eq!(
        c.provider.label_resources(&label).await.expect("s2"),
        Resources::server(2, 2048)
    );
    label.flavor_name = None;
    label.min_ram = Some(3000);
    assert_eq!(
        c.provider.label_resources(&label).await.expect("min-ram"),
        Resources::server(4, 4096)
    );
    label.boot_from_volume = true;
    label.volume_size = 80;
    assert_eq!(
        c.provider.label_resources(&label).await.expect("bfv"),
        Resources::server(4, 4096)
            .with(VOLUMES, 1)
            .with(VOLUME_GB, 80)
    );
    label.min_ram = Some(5000);
    label.name = "bigger".into();
    let e = c
        .provider
        .label_resources(&label)
        .await
        .expect_err("too big");
    let ProviderError::InvalidRequest(msg) = &e else {
        panic!("{e:?}")
    };
    assert!(msg.contains("label bigger"), "{msg}");
    assert!(msg.contains("min-ram 5000"), "{msg}");
    assert!(msg.contains("s2, m4"), "{msg}");
}

#[test]
fn flavor_rule_matches_nodepool() {
    use nodepool_model::config::SimulatedFlavor;
    let f = |name: &str, vcpus, ram| SimulatedFlavor {
        name: name.into(),
        vcpus,
        ram,
    };
    let flavors = vec![
        f("m1.large", 4, 8192),
        f("m1.small", 2, 2048),
        f("gpu.small", 8, 2048),
        f("m1.medium", 2, 4096),
    ];
    let mut label = pool_label(&sim_config(FLAVORS).providers[0], "small");
    let mut pick = |name: Option<&str>, min_ram: Option<i64>| {
        label.flavor_name = name.map(str::to_owned);
        label.min_ram = min_ram;
        resolve_flavor(&flavors, &label).map(|f| f.name.clone())
    };
    // smallest RAM, ties by name (not vCPUs), as Python sorts (ram, name)
    assert_eq!(pick(None, Some(1000)).as_deref(), Some("gpu.small"));
    assert_eq!(pick(None, Some(3000)).as_deref(), Some("m1.medium"));
    // with min-ram, flavor-name is a substring filter
    assert_eq!(pick(Some("m1"), Some(1000)).as_deref(), Some("m1.small"));
    assert_eq!(pick(Some("gpu"), Some(4000)), None);
    // flavor-name alone is an exact name
    assert_eq!(pick(Some("m1.large"), None).as_deref(), Some("m1.large"));
    assert_eq!(pick(Some("m1"), None), None);
    assert_eq!(pick(None, None), None);
}

// ----- quota -----

#[tokio::test]
async fn create_over_quota_is_refused_like_nova() {
    let c = cloud("quota: {instances: 2}");
    let a = launch(&c, 1).await.expect("first");
    launch(&c, 2).await.expect("second");
    let e = c
        .provider
        .create_instance(&spec(&c, 3))
        .await
        .expect_err("third is over quota");
    let ProviderError::QuotaExceeded(msg) = &e else {
        panic!("{e:?}")
    };
    assert!(
        msg.contains(
            "Quota exceeded for instances: Requested 1, but already used 2 of 2 instances"
        ),
        "{msg}"
    );
    assert_eq!(e.metric_label(), "quota");
    assert_eq!(
        c.provider.server_count().await,
        2,
        "a refused create leaves nothing"
    );
    c.provider.delete_instance(&a).await.expect("delete");
    launch(&c, 3).await.expect("room again after a delete");

    // cores and RAM count too
    let c = cloud("quota: {cores: 5, ram: 100000}");
    launch(&c, 1).await.expect("2 cores");
    launch(&c, 2).await.expect("4 cores");
    let e = c
        .provider
        .create_instance(&spec(&c, 3))
        .await
        .expect_err("6 cores");
    assert!(
        e.to_string()
            .contains("Quota exceeded for cores: Requested 2, but already used 4 of 5 cores"),
        "{e}"
    );
    let c = cloud("quota: {ram: 5000}");
    launch(&c, 1).await.expect("2 GiB");
    launch(&c, 2).await.expect("4 GiB");
    let e = c
        .provider
        .create_instance(&spec(&c, 3))
        .await
        .expect_err("6 GiB");
    assert!(e.to_string().contains("Quota exceeded for ram"), "{e}");

    // the quota can change under a running cloud
    c.provider.set_quota(Limits::unlimited()).await;
    launch(&c, 3).await.expect("unlimited now");
    assert_eq!(
        c.provider.usage().await,
        Resources::server(6, 6144).with(INSTANCES, 3)
    );
}

#[tokio::test]
async fn failed_servers_use_quota_until_deleted() {
    let c = cloud("quota: {instances: 1}, failure-rates: {create: 1}");
    let s = spec(&c, 1);
    let id = c.provider.create_instance(&s).await.expect("accepted");
    assert!(c.provider.wait_for_instance(&id, &s).await.is_err());
    let e = c
        .provider
        .create_instance(&spec(&c, 2))
        .await
        .expect_err("the ERROR server still counts, as in Nova");
    assert!(matches!(e, ProviderError::QuotaExceeded(_)), "{e:?}");
    c.provider.delete_instance(&id).await.expect("delete");
    assert_eq!(c.provider.usage().await.get(INSTANCES), 0);
}

// ----- failure dice -----

/// Which of `n` launches fail.
async fn failure_pattern(c: &Cloud, n: u64) -> Vec<bool> {
    let mut out = Vec::new();
    for node in 0..n {
        out.push(launch(c, node).await.is_err());
    }
    out
}

#[tokio::test]
async fn create_failures_are_deterministic_from_the_seed() {
    let a = failure_pattern(&cloud("seed: 42, failure-rates: {create: 0.5}"), 64).await;
    let b = failure_pattern(&cloud("seed: 42, failure-rates: {create: 0.5}"), 64).await;
    assert_eq!(a, b, "same seed, same failures");
    let failed = a.iter().filter(|f| **f).count();
    assert!((16..=48).contains(&failed), "about half fail: {failed}/64");
    let other = failure_pattern(&cloud("seed: 43, failure-rates: {create: 0.5}"), 64).await;
    assert_ne!(a, other, "another seed, other failures");

    // deletes and uploads in between do not shift the create dice
    let c = cloud("seed: 42, failure-rates: {create: 0.5, delete: 0.5, upload: 0.5}");
    let (_dir, path) = image_file();
    let mut interleaved = Vec::new();
    for node in 0..64 {
        let r = launch(&c, node).await;
        interleaved.push(r.is_err());
        let _ = c
            .provider
            .upload_image(&upload_spec(path.clone(), "img"))
            .await;
        if let Ok(id) = r {
            let _ = c.provider.delete_instance(&id).await;
        }
    }
    assert_eq!(a, interleaved);
}

#[tokio::test]
async fn a_failed_create_goes_error_with_a_fault() {
    let c = cloud("failure-rates: {create: 1}");
    let s = spec(&c, 1);
    let id = c
        .provider
        .create_instance(&s)
        .await
        .expect("the create is accepted");
    let e = c
        .provider
        .wait_for_instance(&id, &s)
        .await
        .expect_err("it goes ERROR");
    let ProviderError::ServerFailed(msg) = &e else {
        panic!("{e:?}")
    };
    assert!(msg.contains(&id) && msg.contains("No valid host"), "{msg}");
    let got = c
        .provider
        .get_instance(&id)
        .await
        .expect("get")
        .expect("kept");
    assert!(
        matches!(&got.status, InstanceStatus::Error(f) if f.contains("No valid host")),
        "{:?}",
        got.status
    );
    assert_eq!(got.node_id().as_deref(), Some("0000000001"));

    // the rates can be changed while running
    c.provider.set_failure_rates(FailureRates::default()).await;
    assert_eq!(c.provider.failure_rates().await, FailureRates::default());
    launch(&c, 2).await.expect("no failures now");
    c.provider
        .set_failure_rates(FailureRates {
            create: 7.0,
            ..FailureRates::default()
        })
        .await;
    assert_eq!(c.provider.failure_rates().await.create, 1.0, "clamped");
    assert!(launch(&c, 3).await.is_err());
}

#[tokio::test]
async fn a_failed_delete_leaves_the_server_in_error() {
    let c = cloud("failure-rates: {delete: 1}");
    let id = launch(&c, 1).await.expect("launch");
    let e = c
        .provider
        .delete_instance(&id)
        .await
        .expect_err("delete fails");
    assert!(matches!(e, ProviderError::ServerFailed(_)), "{e:?}");
    let got = c
        .provider
        .get_instance(&id)
        .await
        .expect("get")
        .expect("still there");
    assert!(matches!(got.status, InstanceStatus::Error(_)), "{got:?}");
    assert_eq!(c.provider.usage().await.get(INSTANCES), 1);
    c.provider.set_failure_rates(FailureRates::default()).await;
    c.provider.delete_instance(&id).await.expect("retry works");
    assert_eq!(c.provider.get_instance(&id).await.expect("get"), None);
    assert_eq!(c.provider.server_count().await, 0);
}

#[tokio::test]
async fn a_failed_upload_leaves_no_image() {
    let c = cloud("failure-rates: {upload: 1}");
    let (_dir, path) = image_file();
    let before = c.provider.list_images().await.expect("list").len();
    let e = c
        .provider
        .upload_image(&upload_spec(path.clone(), "fails"))
        .await
        .expect_err("upload fails");
    assert!(e.to_string().contains("simulated upload failure"), "{e}");
    assert_eq!(c.provider.list_images().await.expect("list").len(), before);
    c.provider.set_failure_rates(FailureRates::default()).await;
    let works = upload_spec(path.clone(), "works");
    c.provider.upload_image(&works).await.expect("upload");
    let len = std::fs::metadata(&path).expect("image file").len();
    assert_eq!(works.sent.get(), len, "every byte read is counted as sent");
    assert_eq!(
        c.provider.list_images().await.expect("list").len(),
        before + 1
    );
}

/// A snapshot (Nova's `createImage`) is made by Glance like an upload, so
/// the upload failure die decides it: a failed one leaves no image; a
/// server being deleted cannot be snapshotted.
#[tokio::test]
async fn a_failed_snapshot_leaves_no_image() {
    let c = cloud("failure-rates: {upload: 1}");
    let id = launch(&c, 1).await.expect("launch");
    let snap = SnapshotSpec {
        name: "snap".into(),
        properties: IndexMap::new(),
        timeout: Duration::from_secs(60),
    };
    let before = c.provider.list_images().await.expect("list").len();
    let e = c
        .provider
        .snapshot_instance(&id, &snap)
        .await
        .expect_err("snapshot fails");
    assert!(e.to_string().contains("simulated failure"), "{e}");
    assert_eq!(c.provider.list_images().await.expect("list").len(), before);
    c.provider.set_failure_rates(FailureRates::default()).await;
    let image = c
        .provider
        .snapshot_instance(&id, &snap)
        .await
        .expect("snapshot");
    let images = c.provider.list_images().await.expect("list");
    assert_eq!(images.len(), before + 1);
    assert!(images.iter().any(|i| i.id == image && i.name == "snap"));
    c.provider.delete_instance(&id).await.expect("delete");
    let e = c
        .provider
        .snapshot_instance(&id, &snap)
        .await
        .expect_err("a deleted server cannot be snapshotted");
    assert!(matches!(e, ProviderError::NotFound(_)), "{e:?}");
}

// ----- delays on the paused clock -----

#[tokio::test(start_paused = true)]
async fn boot_delay_is_exact_on_the_paused_clock() {
    let c = cloud("boot-delay: 30");
    let s = spec(&c, 1);
    let start = Instant::now();
    let id = c.provider.create_instance(&s).await.expect("create");
    let status = |c: &Cloud, id: &str| {
        let p = c.provider.clone();
        let id = id.to_owned();
        async move {
            p.get_instance(&id)
                .await
                .expect("get")
                .expect("exists")
                .status
        }
    };
    assert_eq!(status(&c, &id).await, InstanceStatus::Building);
    tokio::time::advance(Duration::from_millis(29_999)).await;
    assert_eq!(status(&c, &id).await, InstanceStatus::Building);
    let inst = c.provider.wait_for_instance(&id, &s).await.expect("boots");
    assert_eq!(start.elapsed(), Duration::from_secs(30));
    assert_eq!(inst.status, InstanceStatus::Active);
    assert_eq!(status(&c, &id).await, InstanceStatus::Active);
}

#[tokio::test(start_paused = true)]
async fn delete_delay_is_exact_on_the_paused_clock() {
    let c = cloud("boot-delay: 0, delete-delay: 5");
    let id = launch(&c, 1).await.expect("launch");
    let start = Instant::now();
    let (p1, p2, i1, i2) = (
        c.provider.clone(),
        c.provider.clone(),
        id.clone(),
        id.clone(),
    );
    let first = tokio::spawn(async move {
        p1.delete_instance(&i1).await?;
        Ok::<_, ProviderError>(Instant::now())
    });
    // let the delete start at 0 s
    tokio::task::yield_now().await;
    tokio::time::advance(Duration::from_secs(1)).await;
    let got = c
        .provider
        .get_instance(&id)
        .await
        .expect("get")
        .expect("still there");
    assert_eq!(got.status, InstanceStatus::Deleting);
    assert_eq!(
        c.provider.usage().await.get(INSTANCES),
        1,
        "a server being deleted still uses quota"
    );
    // a second delete of the same server ends with the first
    let second = tokio::spawn(async move {
        p2.delete_instance(&i2).await?;
        Ok::<_, ProviderError>(Instant::now())
    });
    let done1 = first.await.expect("join").expect("delete");
    let done2 = second.await.expect("join").expect("delete");
    assert_eq!(done1 - start, Duration::from_secs(5));
    assert_eq!(done2, done1);
    assert_eq!(c.provider.get_instance(&id).await.expect("get"), None);
    assert!(c.provider.list_instances().await.expect("list").is_empty());
    assert_eq!(c.provider.usage().await.get(INSTANCES), 0);
}

#[tokio::test(start_paused = true)]
async fn fail_server_wakes_a_waiting_launch() {
    let c = cloud("boot-delay: 60");
    let start = Instant::now();
    let mut waits = Vec::new();
    let mut ids = Vec::new();
    for node in [1, 2] {
        let s = spec(&c, node);
        let id = c.provider.create_instance(&s).await.expect("create");
        let p = c.provider.clone();
        let wid = id.clone();
        waits.push(tokio::spawn(async move {
            let r = p.wait_for_instance(&wid, &s).await;
            (r, Instant::now())
        }));
        ids.push(id);
    }
    tokio::time::advance(Duration::from_secs(10)).await;
    assert!(
        c.provider
            .fail_server(
                &ids[0],
                "Quota exceeded for cores: Requested 2, but already used 20 of 20 cores"
            )
            .await
    );
    assert!(c.provider.fail_server(&ids[1], "hypervisor on fire").await);
    assert!(!c.provider.fail_server("no-such-server", "x").await);
    let (r0, t0) = waits.remove(0).await.expect("join");
    let (r1, t1) = waits.remove(0).await.expect("join");
    assert!(
        matches!(r0, Err(ProviderError::QuotaExceeded(_))),
        "a quota fault is a quota error, as from Nova: {r0:?}"
    );
    assert!(
        matches!(&r1, Err(ProviderError::ServerFailed(m)) if m.contains("hypervisor on fire")),
        "{r1:?}"
    );
    assert_eq!(t0 - start, Duration::from_secs(10), "woken at once");
    assert_eq!(t1 - start, Duration::from_secs(10));
}

#[tokio::test(start_paused = true)]
async fn deleting_a_booting_server_fails_its_wait() {
    let c = cloud("boot-delay: 60, delete-delay: 0");
    let s = spec(&c, 1);
    let id = c.provider.create_instance(&s).await.expect("create");
    let p = c.provider.clone();
    let wid = id.clone();
    let wait = tokio::spawn(async move { p.wait_for_instance(&wid, &s).await });
    tokio::time::advance(Duration::from_secs(1)).await;
    c.provider.delete_instance(&id).await.expect("delete");
    let r = wait.await.expect("join");
    assert!(matches!(r, Err(ProviderError::ServerFailed(_))), "{r:?}");
    let missing = c
        .provider
        .wait_for_instance(&id, &spec(&c, 1))
        .await
        .expect_err("gone");
    assert!(missing.to_string().contains("disappeared"), "{missing}");
}

#[tokio::test(start_paused = true)]
async fn a_cancelled_delete_still_completes() {
    let c = cloud("boot-delay: 0, delete-delay: 5");
    let id = launch(&c, 1).await.expect("launch");
    // the caller gives up (e.g. its own timeout) before the delete is done
    let r = tokio::time::timeout(Duration::from_secs(1), c.provider.delete_instance(&id)).await;
    assert!(r.is_err(), "still deleting after 1 s");
    tokio::time::advance(Duration::from_secs(4)).await;
    assert_eq!(c.provider.get_instance(&id).await.expect("get"), None);
    assert_eq!(c.provider.server_count().await, 0);
}

// ----- leaks -----

#[tokio::test]
async fn leaked_servers_exist_from_the_start() {
    let c = cloud("leaked-servers: 3, quota: {instances: 4}");
    let servers = c.provider.list_instances().await.expect("list");
    assert_eq!(servers.len(), 3);
    let mut ids = HashSet::new();
    for s in &servers {
        assert_eq!(s.status, InstanceStatus::Active);
        assert_eq!(s.provider_name().as_deref(), Some("sim"));
        assert_eq!(s.metadata.get(META_POOL).map(String::as_str), Some("main"));
        let node = s.node_id().expect("tagged with a node id");
        assert_eq!(node.len(), 10, "{node}");
        assert!(node.starts_with('9'), "beyond any store sequence: {node}");
        assert_eq!(s.name, format!("np{node}"));
        assert!(ids.insert(node));
    }
    // they use quota like any server
    launch(&c, 1).await.expect("the fourth fits");
    assert!(matches!(
        c.provider.create_instance(&spec(&c, 2)).await,
        Err(ProviderError::QuotaExceeded(_))
    ));

    // and more can be injected
    let c = cloud("");
    assert_eq!(c.provider.server_count().await, 0);
    let id = c.provider.inject_leaked_server("0000000777").await;
    let found = c
        .provider
        .server_for_node("0000000777")
        .await
        .expect("found by node id");
    assert_eq!(found.external_id, id);
    assert_eq!(found.status, InstanceStatus::Active);
    assert_eq!(found.provider_name().as_deref(), Some("sim"));
    assert_eq!(c.provider.server_count().await, 1);
    assert!(c.provider.server_for_node("0000000778").await.is_none());
}

// ----- tagging, addresses, placement -----

#[tokio::test]
async fn servers_carry_the_launchers_metadata_and_sane_addresses() {
    let cfg = config(&format!(
        r#"
labels: [{{name: small}}]
providers:
  - name: sim
    driver: simulated
    cloud: simcloud
    region-name: RegionOne
    simulation: {{{FLAVORS}, boot-delay: 0, delete-delay: 0, availability-zones: [az1, az2, az3]}}
    cloud-images: [{{name: ubuntu, image-name: Ubuntu 22.04}}]
    pools:
      - name: main
        labels:
          - name: small
            cloud-image: ubuntu
            flavor-name: s2
            instance-properties: {{team: ci}}
"#
    ));
    let c = Cloud {
        provider: SimulatedProvider::new(&cfg.providers[0]).expect("simulated"),
        label: pool_label(&cfg.providers[0], "small"),
    };
    let mut s = spec(&c, 1);
    s.metadata.insert("team".into(), "ci".into());
    s.metadata.insert("long".into(), "é".repeat(200));
    let id = c.provider.create_instance(&s).await.expect("create");
    let inst = c.provider.wait_for_instance(&id, &s).await.expect("boot");
    assert_eq!(inst.name, "np0000000001");
    for k in [META_GROUPS, META_NODE_ID, META_POOL, META_PROVIDER, "team"] {
        assert_eq!(inst.metadata.get(k), s.metadata.get(k), "{k}");
    }
    let long = inst.metadata.get("long").expect("long kept");
    assert_eq!(
        long.len(),
        254,
        "cut at Nova's 255 bytes on a char boundary"
    );
    assert_eq!(inst.region.as_deref(), Some("RegionOne"));
    assert_eq!(inst.cloud.as_deref(), Some("simcloud"));
    let host = inst.host_id.clone().expect("host id");
    assert_eq!(host.len(), 56, "{host}");
    assert!(host.chars().all(|ch| ch.is_ascii_hexdigit()), "{host}");
    assert_eq!(inst.resources, Some(Resources::server(2, 2048)));

    // AZs: round robin when the launcher picks none, else its choice
    let mut azs = vec![inst.az.clone()];
    for node in 2..=4 {
        let id = launch(&c, node).await.expect("launch");
        azs.push(
            c.provider
                .get_instance(&id)
                .await
                .expect("get")
                .expect("x")
                .az,
        );
    }
    let azs: Vec<_> = azs.iter().map(|a| a.as_deref().unwrap_or("-")).collect();
    assert_eq!(azs, ["az1", "az2", "az3", "az1"]);
    let mut s = spec(&c, 5);
    s.availability_zone = Some("az3".into());
    let id = c.provider.create_instance(&s).await.expect("create");
    let inst = c.provider.wait_for_instance(&id, &s).await.expect("boot");
    assert_eq!(inst.az.as_deref(), Some("az3"));
    s.availability_zone = Some("az9".into());
    let e = c.provider.create_instance(&s).await.expect_err("no az9");
    assert!(matches!(e, ProviderError::InvalidRequest(_)), "{e:?}");

    // boot from volume counts its volume
    let mut s = spec(&c, 6);
    s.label.boot_from_volume = true;
    s.label.volume_size = 40;
    let id = c.provider.create_instance(&s).await.expect("create");
    let inst = c.provider.wait_for_instance(&id, &s).await.expect("boot");
    assert_eq!(
        inst.resources,
        Some(
            Resources::server(2, 2048)
                .with(VOLUMES, 1)
                .with(VOLUME_GB, 40)
        )
    );

    // addresses: well-formed, public/private as the OpenStack backend
    // classifies them, and never repeated among live servers
    let mut seen = HashSet::new();
    for node in 100..400 {
        launch(&c, node).await.expect("launch");
    }
    for i in c.provider.list_instances().await.expect("list") {
        let public: Ipv4Addr = i.public_ipv4.as_deref().expect("v4").parse().expect("ip");
        let private: Ipv4Addr = i.private_ipv4.as_deref().expect("v4").parse().expect("ip");
        let v6: IpAddr = i.public_ipv6.as_deref().expect("v6").parse().expect("ip");
        assert!(!public.is_private() && !public.is_loopback(), "{public}");
        assert_eq!(private.octets()[0], 10, "{private}");
        assert!(v6.to_string().starts_with("2001:db8:"), "{v6}");
        assert_eq!(i.interface_ip, i.public_ipv4);
        assert!(seen.insert(IpAddr::V4(public)), "{public} repeated");
        assert!(seen.insert(IpAddr::V4(private)), "{private} repeated");
        assert!(seen.insert(v6), "{v6} repeated");
    }
}

#[tokio::test]
async fn the_cloud_name_defaults_to_the_provider_name() {
    let c = cloud("boot-delay: 0");
    let id = launch(&c, 1).await.expect("launch");
    let i = c.provider.get_instance(&id).await.expect("get").expect("x");
    assert_eq!(i.cloud.as_deref(), Some("sim"));
    assert_eq!(i.region, None);
    let log = c.provider.console_log(&id).await.expect("console log");
    assert!(log.contains(&i.name), "{log}");
    let e = c.provider.console_log("nope").await.expect_err("missing");
    assert!(matches!(e, ProviderError::NotFound(_)), "{e:?}");
}

// ----- images -----

#[tokio::test]
async fn uploads_verify_the_given_checksums() {
    let c = cloud("");
    let (_dir, path) = image_file();
    let before = c.provider.list_images().await.expect("list").len();

    let mut bad = upload_spec(path.clone(), "bad-sha");
    bad.sha256 = Some("0".repeat(64));
    let e = c
        .provider
        .upload_image(&bad)
        .await
        .expect_err("sha256 mismatch");
    assert!(e.to_string().contains("sha256 checksum mismatch"), "{e}");
    let mut bad = upload_spec(path.clone(), "bad-md5");
    bad.md5 = Some("f".repeat(32));
    let e = c
        .provider
        .upload_image(&bad)
        .await
        .expect_err("md5 mismatch");
    assert!(e.to_string().contains("md5 checksum mismatch"), "{e}");
    let mut missing = upload_spec(path.with_file_name("nope.qcow2"), "missing");
    missing.md5 = None;
    missing.sha256 = None;
    let e = c
        .provider
        .upload_image(&missing)
        .await
        .expect_err("no file");
    assert!(e.to_string().contains("cannot read"), "{e}");
    assert_eq!(
        c.provider.list_images().await.expect("list").len(),
        before,
        "failed uploads leave no image"
    );

    // upper-case hex matches; either checksum alone is checked
    let mut ok = upload_spec(path.clone(), "upper");
    ok.md5 = Some(IMAGE_MD5.to_uppercase());
    ok.sha256 = None;
    c.provider.upload_image(&ok).await.expect("md5 only");
    let mut ok = upload_spec(path.clone(), "sha-only");
    ok.md5 = None;
    let id = c.provider.upload_image(&ok).await.expect("sha256 only");
    let images = c.provider.list_images().await.expect("list");
    let img = images.iter().find(|i| i.id == id).expect("listed");
    assert_eq!(img.name, "sha-only");
    assert_eq!(img.status, "active");
    assert_eq!(
        img.properties.get(IMAGE_BUILD_ID).map(String::as_str),
        Some("sha-only")
    );
    assert_eq!(
        img.properties
            .get("owner_specified.openstack.sha256")
            .map(String::as_str),
        Some(IMAGE_SHA256),
        "tagged as openstacksdk (and the OpenStack backend) does"
    );
    assert!(!img.properties.contains_key("owner_specified.openstack.md5"));

    // an uploaded image boots; a deleted one does not
    let mut s = spec(&c, 1);
    s.image = ImageRef::Uploaded {
        external_id: id.clone(),
    };
    launch_spec(&c, &s).await.expect("boots the upload");
    c.provider.delete_image(&id).await.expect("delete");
    c.provider.delete_image(&id).await.expect("again");
    let e = c
        .provider
        .create_instance(&s)
        .await
        .expect_err("image gone");
    assert!(matches!(e, ProviderError::InvalidRequest(_)), "{e:?}");
}

async fn launch_spec(c: &Cloud, s: &InstanceSpec) -> Result<String, ProviderError> {
    let id = c.provider.create_instance(s).await?;
    c.provider.wait_for_instance(&id, s).await.map(|_| id)
}

#[tokio::test(start_paused = true)]
async fn uploads_honour_their_timeout() {
    let dir = tempfile::tempdir().expect("tempdir");
    let fifo = dir.path().join("never-written");
    let made = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .expect("run mkfifo");
    assert!(made.success(), "mkfifo failed");
    let c = cloud("");
    let mut up = upload_spec(fifo.clone(), "slow");
    up.timeout = Duration::from_secs(5);
    let p = c.provider.clone();
    let upload = tokio::spawn(async move { p.upload_image(&up).await });
    // The blocking reader keeps the paused clock from advancing by itself:
    // move it by hand, after letting the upload start and arm its timeout.
    tokio::task::yield_now().await;
    let mut waited = 0;
    while !upload.is_finished() && waited < 20 {
        tokio::time::advance(Duration::from_secs(1)).await;
        waited += 1;
    }
    assert!(upload.is_finished(), "not timed out after {waited} s");
    assert!(waited >= 5, "timed out after {waited} s, before its 5 s");
    let e = upload
        .await
        .expect("join")
        .expect_err("the file never ends");
    assert!(matches!(e, ProviderError::Timeout(_)), "{e:?}");
    assert!(
        !c.provider
            .list_images()
            .await
            .expect("list")
            .iter()
            .any(|i| i.name == "slow")
    );
    // let the abandoned reader see the end of the file
    tokio::task::spawn_blocking(move || {
        std::fs::OpenOptions::new()
            .write(true)
            .open(&fifo)
            .map(drop)
    })
    .await
    .expect("join")
    .expect("open the fifo for writing");
}

#[tokio::test]
async fn cloud_images_exist_from_the_start() {
    let cfg = config(&format!(
        r#"
labels: [{{name: a}}, {{name: b}}, {{name: c}}]
providers:
  - name: sim
    driver: simulated
    simulation: {{{FLAVORS}, boot-delay: 0, delete-delay: 0}}
    cloud-images:
      - {{name: jammy, image-name: Ubuntu 22.04}}
      - {{name: fixed, image-id: 5b8c31a0-0000-4000-8000-000000000001}}
      - {{name: plain}}
    pools:
      - name: main
        labels:
          - {{name: a, cloud-image: jammy, flavor-name: s2}}
          - {{name: b, cloud-image: fixed, flavor-name: s2}}
          - {{name: c, cloud-image: plain, flavor-name: s2}}
"#
    ));
    let c = Cloud {
        provider: SimulatedProvider::new(&cfg.providers[0]).expect("simulated"),
        label: pool_label(&cfg.providers[0], "a"),
    };
    let images = c.provider.list_images().await.expect("list");
    let names: Vec<_> = images.iter().map(|i| i.name.as_str()).collect();
    assert_eq!(names, ["Ubuntu 22.04", "fixed", "plain"]);
    assert!(images.iter().all(|i| i.status == "active"));
    assert_eq!(images[1].id, "5b8c31a0-0000-4000-8000-000000000001");

    for image in [
        ImageRef::Cloud {
            id: None,
            name: "Ubuntu 22.04".into(),
        },
        ImageRef::Cloud {
            id: Some("5b8c31a0-0000-4000-8000-000000000001".into()),
            name: "fixed".into(),
        },
        ImageRef::Cloud {
            id: None,
            name: "plain".into(),
        },
        // a name that is really an id, as the OpenStack backend accepts
        ImageRef::Cloud {
            id: None,
            name: images[0].id.clone(),
        },
    ] {
        let mut s = spec(&c, 1);
        s.image = image.clone();
        launch_spec(&c, &s)
            .await
            .unwrap_or_else(|e| panic!("{image:?}: {e}"));
    }
    let mut s = spec(&c, 2);
    s.image = ImageRef::Cloud {
        id: None,
        name: "Windows 95".into(),
    };
    let e = c
        .provider
        .create_instance(&s)
        .await
        .expect_err("no such image");
    assert!(
        matches!(&e, ProviderError::InvalidRequest(m) if m.contains("Windows 95")),
        "{e:?}"
    );
}

// ----- leak-cleanup resources -----

#[tokio::test]
async fn floating_ips_and_ports_can_be_injected_and_deleted() {
    let c = cloud("");
    for kind in [ResourceKind::FloatingIp, ResourceKind::Port] {
        assert!(
            c.provider
                .list_resources(kind)
                .await
                .expect("list")
                .is_empty()
        );
    }
    let free = c.provider.inject_floating_ip(false).await;
    let used = c.provider.inject_floating_ip(true).await;
    let port = c.provider.inject_down_port("compute:nova").await;
    let fips = c
        .provider
        .list_resources(ResourceKind::FloatingIp)
        .await
        .expect("list");
    assert_eq!(fips.len(), 2);
    assert!(fips.iter().all(|r| r.kind == ResourceKind::FloatingIp));
    assert!(fips.iter().any(|r| r.id == free && !r.attached));
    assert!(fips.iter().any(|r| r.id == used && r.attached));
    let ports = c
        .provider
        .list_resources(ResourceKind::Port)
        .await
        .expect("list");
    assert_eq!(ports.len(), 1);
    assert_eq!(ports[0].id, port);
    assert_eq!(ports[0].status, "DOWN");
    assert_eq!(ports[0].device_owner.as_deref(), Some("compute:nova"));

    c.provider
        .delete_resource(ResourceKind::FloatingIp, &free)
        .await
        .expect("delete");
    c.provider
        .delete_resource(ResourceKind::FloatingIp, &free)
        .await
        .expect("missing is fine");
    c.provider
        .delete_resource(ResourceKind::Port, &port)
        .await
        .expect("delete");
    let left: Vec<_> = c
        .provider
        .list_resources(ResourceKind::FloatingIp)
        .await
        .expect("list")
        .into_iter()
        .map(|r| r.id)
        .collect();
    assert_eq!(left, [used]);
    assert!(
        c.provider
            .list_resources(ResourceKind::Port)
            .await
            .expect("list")
            .is_empty()
    );
}

// ----- scale -----

/// The launcher benchmark's shape: 1,000 launches at once with a 0.1 s
/// boot, then 1,000 deletes, on the paused clock. Prints the real time it
/// took (the CPU cost of the simulated cloud itself).
#[tokio::test(start_paused = true)]
async fn a_thousand_launches_and_deletes() {
    let c = Arc::new(cloud("boot-delay: 0.1, delete-delay: 0.01"));
    let real = std::time::Instant::now();
    let start = Instant::now();
    let launches = (0..1000u64).map(|node| {
        let c = c.clone();
        tokio::spawn(async move { launch(&c, node).await })
    });
    let mut ids = Vec::new();
    for l in launches.collect::<Vec<_>>() {
        ids.push(l.await.expect("join").expect("launch"));
    }
    assert_eq!(
        start.elapsed(),
        Duration::from_millis(100),
        "all boot together"
    );
    assert_eq!(c.provider.server_count().await, 1000);
    assert_eq!(c.provider.usage().await.get(CORES), 2000);
    let deletes: Vec<_> = ids
        .into_iter()
        .map(|id| {
            let p = c.provider.clone();
            tokio::spawn(async move { p.delete_instance(&id).await })
        })
        .collect();
    for d in deletes {
        d.await.expect("join").expect("delete");
    }
    assert_eq!(c.provider.server_count().await, 0);
    assert!(c.provider.usage().await.iter().all(|(_, v)| v == 0));
    eprintln!(
        "1,000 create+wait+delete cycles: {:?} real time",
        real.elapsed()
    );
}

// ----- a cloud in a state file, shared by providers and processes -----

/// The conformance configuration with the cloud kept in `file`.
fn conformance_on(file: &Path) -> Config {
    config(&CONFORMANCE.replace(
        "      boot-delay: 0\n",
        &format!(
            "      boot-delay: 0\n      state-file: '{}'\n",
            file.display()
        ),
    ))
}

/// Two providers opened on one state file, as two processes would open
/// it: creates, uploads and deletes go through the first; waits, reads and
/// listings through the second. Nothing is shared but the file.
#[derive(Debug)]
struct TwoOnOneFile {
    first: SimulatedProvider,
    second: SimulatedProvider,
}

#[async_trait]
impl Provider for TwoOnOneFile {
    fn name(&self) -> &str {
        self.first.name()
    }

    async fn quota_limits(&self) -> Result<Limits, ProviderError> {
        self.second.quota_limits().await
    }

    async fn label_resources(&self, label: &PoolLabel) -> Result<Resources, ProviderError> {
        self.second.label_resources(label).await
    }

    async fn create_instance(&self, spec: &InstanceSpec) -> Result<String, ProviderError> {
        self.first.create_instance(spec).await
    }

    async fn wait_for_instance(
        &self,
        external_id: &str,
        spec: &InstanceSpec,
    ) -> Result<nodepool_model::provider::Instance, ProviderError> {
        self.second.wait_for_instance(external_id, spec).await
    }

    async fn get_instance(
        &self,
        external_id: &str,
    ) -> Result<Option<nodepool_model::provider::Instance>, ProviderError> {
        self.second.get_instance(external_id).await
    }

    async fn list_instances(
        &self,
    ) -> Result<Vec<nodepool_model::provider::Instance>, ProviderError> {
        self.second.list_instances().await
    }

    async fn delete_instance(&self, external_id: &str) -> Result<(), ProviderError> {
        self.first.delete_instance(external_id).await
    }

    async fn console_log(&self, external_id: &str) -> Result<String, ProviderError> {
        self.second.console_log(external_id).await
    }

    async fn upload_image(&self, spec: &ImageUploadSpec) -> Result<String, ProviderError> {
        self.first.upload_image(spec).await
    }

    async fn list_images(
        &self,
    ) -> Result<Vec<nodepool_model::provider::CloudImageInfo>, ProviderError> {
        self.second.list_images().await
    }

    async fn delete_image(&self, external_id: &str) -> Result<(), ProviderError> {
        self.first.delete_image(external_id).await
    }

    async fn list_resources(
        &self,
        kind: ResourceKind,
    ) -> Result<Vec<nodepool_model::provider::CloudResource>, ProviderError> {
        self.second.list_resources(kind).await
    }

    async fn delete_resource(&self, kind: ResourceKind, id: &str) -> Result<(), ProviderError> {
        self.first.delete_resource(kind, id).await
    }

    fn skip_nodescan(&self) -> bool {
        self.second.skip_nodescan()
    }
}

/// The conformance harness on a state file (one per test, like [`Sim`]).
struct SharedSim {
    sim: Sim,
    state: PathBuf,
}

impl SharedSim {
    fn new() -> Self {
        let mut sim = Sim::new();
        let state = sim.dir.path().join("cloud.json");
        sim.config = conformance_on(&state);
        SharedSim { sim, state }
    }
}

#[async_trait]
impl Harness for SharedSim {
    async fn provider(&self) -> Arc<dyn Provider> {
        let open = || SimulatedProvider::new(&self.sim.config.providers[0]).expect("simulated");
        let (first, second) = (open(), open());
        assert_eq!(first.state_file(), Some(self.state.as_path()));
        Arc::new(TwoOnOneFile { first, second })
    }

    fn label(&self) -> PoolLabel {
        self.sim.label()
    }

    fn image(&self) -> ImageRef {
        self.sim.image()
    }

    fn upload_file(&self) -> UploadFile {
        self.sim.upload_file()
    }

    fn capabilities(&self) -> Capabilities {
        self.sim.capabilities()
    }

    fn quota_label(&self) -> Option<PoolLabel> {
        self.sim.quota_label()
    }

    fn timeout(&self) -> Duration {
        self.sim.timeout()
    }
}

mod conformance_on_a_state_file {
    use super::SharedSim;
    nodepool_model::provider_conformance_tests!(SharedSim::new());
}

/// A cloud on a state file in `dir` with these knobs (see [`cloud`]).
fn cloud_on(dir: &Path, knobs: &str) -> Cloud {
    let file = format!("state-file: '{}'", dir.join("cloud.json").display());
    if knobs.is_empty() {
        cloud(&file)
    } else {
        cloud(&format!("{file}, {knobs}"))
    }
}

/// Another provider on the same configuration (and so the same file).
fn reopen(c: &Cloud) -> SimulatedProvider {
    let file = c.provider.state_file().expect("file-backed");
    let dir = file.parent().expect("dir");
    cloud_on(dir, "").provider
}

#[tokio::test]
async fn the_state_file_outlives_its_providers() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_img, path) = image_file();
    let a = cloud_on(dir.path(), "");
    let server = launch(&a, 7).await.expect("launch");
    let image = a
        .provider
        .upload_image(&upload_spec(path, "kept"))
        .await
        .expect("upload");
    let fip = a.provider.inject_floating_ip(false).await;
    let port = a.provider.inject_down_port("compute:nova").await;
    let before = a.provider.get_instance(&server).await.expect("get");
    let usage = a.provider.usage().await;
    drop(a);

    // A new provider finds everything as it was.
    let b = cloud_on(dir.path(), "");
    let after = b.provider.get_instance(&server).await.expect("get");
    assert_eq!(after, before);
    assert_eq!(
        after.as_ref().map(|i| i.status.clone()),
        Some(InstanceStatus::Active)
    );
    assert_eq!(b.provider.usage().await, usage);
    assert_eq!(
        b.provider
            .server_for_node("0000000007")
            .await
            .map(|i| i.external_id),
        Some(server.clone())
    );
    let images = b.provider.list_images().await.expect("images");
    assert!(images.iter().any(|i| i.id == image && i.name == "kept"));
    assert!(
        images.iter().any(|i| i.name == "Ubuntu 22.04"),
        "the cloud image was not added twice or lost: {images:?}"
    );
    assert_eq!(
        images.iter().filter(|i| i.name == "Ubuntu 22.04").count(),
        1
    );
    let fips = b
        .provider
        .list_resources(ResourceKind::FloatingIp)
        .await
        .expect("fips");
    assert_eq!(
        fips.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(),
        [fip.as_str()]
    );
    let ports = b
        .provider
        .list_resources(ResourceKind::Port)
        .await
        .expect("ports");
    assert_eq!(ports.len(), 1);
    assert_eq!(ports[0].id, port);
    assert_eq!(ports[0].device_owner.as_deref(), Some("compute:nova"));

    // The file holds wall-clock epoch times, readable by anyone.
    let text = std::fs::read_to_string(dir.path().join("cloud.json")).expect("read");
    let doc: serde_json::Value = serde_json::from_str(&text).expect("JSON");
    assert_eq!(doc["version"], 1);
    let ready_at = doc["providers"]["sim"]["servers"][0]["ready_at"]
        .as_f64()
        .expect("ready_at");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs_f64();
    assert!(
        (now - 600.0..=now).contains(&ready_at),
        "{ready_at} vs {now}"
    );

    b.provider.delete_instance(&server).await.expect("delete");
    assert_eq!(reopen(&b).server_count().await, 0);
}

#[tokio::test]
async fn dice_and_ids_carry_on_across_providers() {
    let knobs = "seed: 42, failure-rates: {create: 0.5}";
    let memory = cloud(knobs);
    let mut expected = Vec::new();
    for node in 0..32 {
        let id = memory
            .provider
            .create_instance(&spec(&memory, node))
            .await
            .expect("create");
        let failed = memory
            .provider
            .wait_for_instance(&id, &spec(&memory, node))
            .await
            .is_err();
        expected.push((id, failed));
    }
    // Two providers on one file, taking turns: one cloud, one stream of
    // dice and ids, exactly as one provider in memory.
    let dir = tempfile::tempdir().expect("tempdir");
    let a = cloud_on(dir.path(), knobs);
    let b = cloud_on(dir.path(), knobs);
    let mut got = Vec::new();
    for node in 0..32 {
        let (creator, waiter) = if node % 2 == 0 { (&a, &b) } else { (&b, &a) };
        let id = creator
            .provider
            .create_instance(&spec(creator, node))
            .await
            .expect("create");
        let failed = waiter
            .provider
            .wait_for_instance(&id, &spec(waiter, node))
            .await
            .is_err();
        got.push((id, failed));
    }
    assert_eq!(got, expected);
}

#[tokio::test]
async fn waits_notice_what_another_provider_does() {
    let dir = tempfile::tempdir().expect("tempdir");
    // Far longer than the test may take: only a change can end the waits.
    let a = cloud_on(dir.path(), "boot-delay: 600");
    let b = reopen(&a);
    let failing = a
        .provider
        .create_instance(&spec(&a, 1))
        .await
        .expect("create");
    let deleted = a
        .provider
        .create_instance(&spec(&a, 2))
        .await
        .expect("create");
    let waits = {
        let b = b.clone();
        let (s1, s2) = (spec(&a, 1), spec(&a, 2));
        let (failing, deleted) = (failing.clone(), deleted.clone());
        tokio::spawn(async move {
            let w1 = b.wait_for_instance(&failing, &s1);
            let w2 = b.wait_for_instance(&deleted, &s2);
            tokio::join!(w1, w2)
        })
    };
    assert_eq!(
        b.get_instance(&failing)
            .await
            .expect("get")
            .map(|i| i.status),
        Some(InstanceStatus::Building)
    );
    assert!(
        a.provider
            .fail_server(&failing, "Quota exceeded for ram")
            .await
    );
    a.provider.delete_instance(&deleted).await.expect("delete");
    let (r1, r2) = tokio::time::timeout(Duration::from_secs(30), waits)
        .await
        .expect("both waits end")
        .expect("join");
    assert!(matches!(r1, Err(ProviderError::QuotaExceeded(_))), "{r1:?}");
    let e = r2.expect_err("deleted while booting");
    assert!(matches!(e, ProviderError::ServerFailed(_)), "{e:?}");
}

#[tokio::test]
async fn delays_run_on_the_wall_clock() {
    let dir = tempfile::tempdir().expect("tempdir");
    let a = cloud_on(dir.path(), "boot-delay: 0.3, delete-delay: 0.2");
    let b = reopen(&a);
    let started = std::time::Instant::now();
    let id = a
        .provider
        .create_instance(&spec(&a, 1))
        .await
        .expect("create");
    assert_eq!(
        b.get_instance(&id).await.expect("get").map(|i| i.status),
        Some(InstanceStatus::Building)
    );
    let inst = b
        .wait_for_instance(&id, &spec(&a, 1))
        .await
        .expect("active");
    assert_eq!(inst.status, InstanceStatus::Active);
    // Times are kept to the millisecond.
    assert!(
        started.elapsed() >= Duration::from_millis(299),
        "{:?}",
        started.elapsed()
    );

    // A delete accepted by a provider that then goes away (its call
    // cancelled, the provider dropped) still completes for everyone.
    let deleting = std::time::Instant::now();
    let cancelled =
        tokio::time::timeout(Duration::from_millis(50), a.provider.delete_instance(&id)).await;
    assert!(cancelled.is_err(), "the delete takes 0.2 s");
    drop(a);
    assert_eq!(
        b.get_instance(&id).await.expect("get").map(|i| i.status),
        Some(InstanceStatus::Deleting)
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while b.get_instance(&id).await.expect("get").is_some() {
        assert!(
            std::time::Instant::now() < deadline,
            "the delete never completed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        deleting.elapsed() >= Duration::from_millis(199),
        "{:?}",
        deleting.elapsed()
    );
    assert_eq!(b.server_count().await, 0);
}

#[tokio::test]
async fn leaked_floating_ips_and_ports_exist_from_the_start_and_can_be_deleted() {
    let c = cloud("leaked-floating-ips: 2, leaked-ports: 3");
    let fips = c
        .provider
        .list_resources(ResourceKind::FloatingIp)
        .await
        .expect("list floating IPs");
    assert_eq!(fips.len(), 2);
    assert!(
        fips.iter()
            .all(|f| !f.attached && f.kind == ResourceKind::FloatingIp)
    );
    let ports = c
        .provider
        .list_resources(ResourceKind::Port)
        .await
        .expect("list ports");
    assert_eq!(ports.len(), 3);
    for p in &ports {
        assert_eq!((p.kind, p.status.as_str()), (ResourceKind::Port, "DOWN"));
        assert_eq!(p.device_owner.as_deref(), Some("compute:nova"));
    }
    c.provider
        .delete_resource(ResourceKind::FloatingIp, &fips[0].id)
        .await
        .expect("delete a floating IP");
    c.provider
        .delete_resource(ResourceKind::Port, &ports[1].id)
        .await
        .expect("delete a port");
    // Deleting again, or with the other kind, is no error and no change.
    c.provider
        .delete_resource(ResourceKind::Port, &fips[1].id)
        .await
        .expect("a port that does not exist counts as deleted");
    let ids = |kind| {
        let p = c.provider.clone();
        async move {
            p.list_resources(kind)
                .await
                .expect("list")
                .into_iter()
                .map(|r| r.id)
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(ids(ResourceKind::FloatingIp).await, [fips[1].id.clone()]);
    assert_eq!(
        ids(ResourceKind::Port).await,
        [ports[0].id.clone(), ports[2].id.clone()]
    );
    // Ids never repeat across kinds or with servers.
    let all: HashSet<&str> = fips.iter().chain(&ports).map(|r| r.id.as_str()).collect();
    assert_eq!(all.len(), 5);
    // None unless asked for.
    let c = cloud("");
    assert!(
        c.provider
            .list_resources(ResourceKind::Port)
            .await
            .expect("list")
            .is_empty()
    );
}

#[tokio::test]
async fn opening_applies_the_configuration_and_keeps_the_cloud() {
    let dir = tempfile::tempdir().expect("tempdir");
    let first = cloud_on(dir.path(), "leaked-servers: 2, quota: {instances: 5}");
    assert_eq!(first.provider.server_count().await, 2);
    // The same configuration again: the leaked servers are not made twice.
    let again = cloud_on(dir.path(), "leaked-servers: 2, quota: {instances: 5}");
    assert_eq!(again.provider.server_count().await, 2);
    // Nor are leaked floating IPs and ports: the file is created once.
    let fips = cloud_on(dir.path(), "leaked-floating-ips: 2, leaked-ports: 1");
    assert!(
        fips.provider
            .list_resources(ResourceKind::FloatingIp)
            .await
            .expect("list")
            .is_empty()
    );
    assert_eq!(first.provider.server_count().await, 2);

    // A hook changes the cloud for every provider...
    first
        .provider
        .set_quota(Limits::unlimited().with(INSTANCES, 3))
        .await;
    first
        .provider
        .set_failure_rates(FailureRates {
            create: 1.0,
            ..FailureRates::default()
        })
        .await;
    assert_eq!(
        again
            .provider
            .quota_limits()
            .await
            .expect("limits")
            .get(INSTANCES),
        Some(3)
    );
    assert_eq!(again.provider.failure_rates().await.create, 1.0);

    // ...until a provider opens the file with another configuration: its
    // quota, rates and cloud images apply; the servers stay.
    let cfg = sim_config(&format!(
        "{FLAVORS}, boot-delay: 0, delete-delay: 0, leaked-servers: 2, quota: {{instances: 9}}, state-file: '{}'",
        dir.path().join("cloud.json").display()
    ));
    let mut pc = cfg.providers[0].clone();
    pc.cloud_images.push(nodepool_model::config::CloudImage {
        name: "debian".into(),
        image_name: Some("Debian 12".into()),
        ..pc.cloud_images[0].clone()
    });
    let reconfigured = SimulatedProvider::new(&pc).expect("open");
    for p in [&first.provider, &again.provider, &reconfigured] {
        assert_eq!(
            p.quota_limits().await.expect("limits").get(INSTANCES),
            Some(9)
        );
        assert_eq!(p.failure_rates().await, FailureRates::default());
        assert_eq!(p.server_count().await, 2);
        let names: Vec<String> = p
            .list_images()
            .await
            .expect("images")
            .into_iter()
            .map(|i| i.name)
            .collect();
        assert_eq!(names, ["Ubuntu 22.04", "Debian 12"]);
    }
}

#[tokio::test]
async fn providers_of_other_names_keep_their_own_cloud_in_a_shared_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("cloud.json");
    let cfg = config(&format!(
        r#"
labels: [{{name: small}}]
providers:
  - name: east
    driver: simulated
    simulation: {{boot-delay: 0, state-file: '{f}', leaked-servers: 1}}
    cloud-images: [{{name: ubuntu}}]
    pools: [{{name: main, labels: [{{name: small, cloud-image: ubuntu, flavor-name: Fake Flavor}}]}}]
  - name: west
    driver: simulated
    simulation: {{boot-delay: 0, state-file: '{f}'}}
    cloud-images: [{{name: ubuntu}}]
    pools: [{{name: main, labels: [{{name: small, cloud-image: ubuntu, flavor-name: Fake Flavor}}]}}]
"#,
        f = file.display()
    ));
    let east = SimulatedProvider::new(&cfg.providers[0]).expect("east");
    let west = SimulatedProvider::new(&cfg.providers[1]).expect("west");
    assert_eq!(east.server_count().await, 1);
    assert_eq!(west.server_count().await, 0);
    let leaked = east.list_instances().await.expect("list");
    assert_eq!(leaked[0].provider_name().as_deref(), Some("east"));
    let doc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&file).expect("read")).expect("JSON");
    let names: Vec<&String> = doc["providers"]
        .as_object()
        .expect("providers")
        .keys()
        .collect();
    assert_eq!(names, ["east", "west"]);
}

#[tokio::test]
async fn an_unusable_state_file_is_an_error_not_a_panic() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("cloud.json");
    std::fs::write(&file, "this is not JSON").expect("write");
    let cfg = sim_config(&format!("{FLAVORS}, state-file: '{}'", file.display()));
    let e = SimulatedProvider::new(&cfg.providers[0]).expect_err("garbage");
    assert!(e.to_string().contains(&file.display().to_string()), "{e}");
    assert!(e.to_string().contains("parsing"), "{e}");

    std::fs::write(&file, r#"{"version": 99, "providers": {}}"#).expect("write");
    let e = SimulatedProvider::new(&cfg.providers[0]).expect_err("future format");
    assert!(e.to_string().contains("version 99"), "{e}");

    // Broken after opening: every operation reports it.
    std::fs::remove_file(&file).expect("remove");
    let c = cloud_on(dir.path(), "");
    launch(&c, 1).await.expect("launch");
    std::fs::write(&file, "{").expect("write");
    let e = c.provider.list_instances().await.expect_err("broken");
    assert!(matches!(e, ProviderError::Other(_)), "{e:?}");
    let e = c
        .provider
        .create_instance(&spec(&c, 2))
        .await
        .expect_err("broken");
    assert!(matches!(e, ProviderError::Other(_)), "{e:?}");
    // A file no cloud could have written: a server twice, absurd amounts.
    std::fs::remove_file(&file).expect("remove");
    launch(&c, 3).await.expect("launch");
    let good: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&file).expect("read")).expect("JSON");
    let mut twice = good.clone();
    let server = twice["providers"]["sim"]["servers"][0].clone();
    twice["providers"]["sim"]["servers"]
        .as_array_mut()
        .expect("servers")
        .push(server);
    let mut huge = good.clone();
    huge["providers"]["sim"]["servers"][0]["resources"]["ram"] = i64::MAX.into();
    for (doc, what) in [(twice, "listed twice"), (huge, "out of range")] {
        std::fs::write(&file, doc.to_string()).expect("write");
        let e = c.provider.list_instances().await.expect_err(what);
        assert!(e.to_string().contains(what), "{e}");
        assert!(e.to_string().contains(&file.display().to_string()), "{e}");
    }
    // A missing file is a new, empty cloud (created again).
    std::fs::remove_file(&file).expect("remove");
    assert!(c.provider.list_instances().await.expect("list").is_empty());
    assert!(file.exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_operations_of_two_providers_lose_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let a = Arc::new(cloud_on(dir.path(), "boot-delay: 0.05"));
    let b = Arc::new(Cloud {
        provider: reopen(&a),
        label: a.label.clone(),
    });
    let tasks: Vec<_> = (0..100u64)
        .map(|node| {
            let c = if node % 2 == 0 { a.clone() } else { b.clone() };
            tokio::spawn(async move { launch(&c, node).await })
        })
        .collect();
    let mut ids = HashSet::new();
    for t in tasks {
        assert!(ids.insert(t.await.expect("join").expect("launch")));
    }
    let listed = a.provider.list_instances().await.expect("list");
    assert_eq!(listed.len(), 100, "no create was lost");
    let addresses: HashSet<_> = listed.iter().map(|i| i.public_ipv4.clone()).collect();
    assert_eq!(addresses.len(), 100, "every server got its own address");
    assert_eq!(b.provider.usage().await.get(INSTANCES), 100);
    let deletes: Vec<_> = ids
        .into_iter()
        .enumerate()
        .map(|(i, id)| {
            let p = if i % 2 == 0 {
                a.provider.clone()
            } else {
                b.provider.clone()
            };
            tokio::spawn(async move { p.delete_instance(&id).await })
        })
        .collect();
    for d in deletes {
        d.await.expect("join").expect("delete");
    }
    assert_eq!(a.provider.server_count().await, 0);
    assert!(b.provider.usage().await.iter().all(|(_, v)| v == 0));
}

/// Set in the copy of this test binary that
/// [`a_second_process_shares_the_cloud`] starts: the state file and the
/// server id the first process made.
const CHILD_ENV: &str = "NODEPOOL_TEST_SIMULATED_CHILD";

#[tokio::test]
async fn a_second_process_shares_the_cloud() {
    if let Ok(arg) = std::env::var(CHILD_ENV) {
        return second_process(&arg).await;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let c = cloud_on(dir.path(), "");
    let ours = launch(&c, 1).await.expect("launch");
    let file = c.provider.state_file().expect("file").to_owned();
    let out_path = dir.path().join("child.out");
    let out = std::fs::File::create(&out_path).expect("child output");
    let err = out.try_clone().expect("dup");
    let mut child = tokio::process::Command::new(std::env::current_exe().expect("test binary"))
        .args([
            "--exact",
            "a_second_process_shares_the_cloud",
            "--nocapture",
            "--test-threads",
            "1",
        ])
        .env(CHILD_ENV, format!("{}\n{ours}", file.display()))
        .stdout(out)
        .stderr(err)
        .kill_on_drop(true)
        .spawn()
        .expect("start the second process");
    let status = tokio::time::timeout(Duration::from_secs(60), child.wait())
        .await
        .expect("the second process ends within 60 s")
        .expect("wait");
    let output = std::fs::read_to_string(&out_path).expect("read");
    assert!(status.success(), "the second process failed:\n{output}");
    let theirs = output
        .lines()
        // The harness prints "test ... " on the same line before it.
        .find_map(|l| l.split_once("CHILD-SERVER ").map(|(_, id)| id.trim()))
        .unwrap_or_else(|| panic!("no server id in:\n{output}"));
    // Its server is ours to see, and ours is gone: it deleted it.
    let inst = c
        .provider
        .get_instance(theirs)
        .await
        .expect("get")
        .expect("its server");
    assert_eq!(inst.status, InstanceStatus::Active);
    assert_eq!(inst.node_id().as_deref(), Some("0000000002"));
    assert_eq!(c.provider.get_instance(&ours).await.expect("get"), None);
    assert_eq!(c.provider.server_count().await, 1);
}

/// The second process: sees the first's server, makes its own, deletes
/// the first's.
async fn second_process(arg: &str) {
    let (file, ours) = arg.split_once('\n').expect("file and server id");
    let dir = Path::new(file).parent().expect("dir");
    let c = cloud_on(dir, "");
    let theirs = c
        .provider
        .get_instance(ours)
        .await
        .expect("get")
        .expect("the first process's server");
    assert_eq!(theirs.status, InstanceStatus::Active);
    assert_eq!(theirs.node_id().as_deref(), Some("0000000001"));
    let mine = launch(&c, 2).await.expect("launch");
    c.provider.delete_instance(ours).await.expect("delete");
    println!("CHILD-SERVER {mine}");
}

#[test]
fn the_state_file_knob_is_parsed_and_resolved_like_the_sqlite_path() {
    let dir = tempfile::tempdir().expect("tempdir");
    let yaml = |file: &str| {
        format!(
            r#"
state-store: {{driver: sqlite, path: state.db}}
labels: [{{name: small}}]
providers:
  - name: sim
    driver: simulated
    simulation: {{state-file: {file}}}
    cloud-images: [{{name: ubuntu}}]
    pools: [{{name: main, labels: [{{name: small, cloud-image: ubuntu, flavor-name: Fake Flavor}}]}}]
"#
        )
    };
    let state_file = |cfg: &Config| match &cfg.providers[0].driver {
        nodepool_model::config::Driver::Simulated(s) => s.state_file.clone(),
        other => panic!("{other:?}"),
    };
    let path = dir.path().join("nodepool.yaml");
    std::fs::write(&path, yaml("clouds/sim.json")).expect("write");
    let cfg = Config::load(&path, None).expect("valid");
    assert_eq!(state_file(&cfg), Some(dir.path().join("clouds/sim.json")));
    std::fs::write(&path, yaml("/srv/sim.json")).expect("write");
    let cfg = Config::load(&path, None).expect("valid");
    assert_eq!(state_file(&cfg), Some(PathBuf::from("/srv/sim.json")));
    // From text alone, relative paths stay relative.
    let cfg = Config::from_yaml(&yaml("sim.json")).expect("valid");
    assert_eq!(state_file(&cfg), Some(PathBuf::from("sim.json")));
    // Without the knob, the cloud is in memory.
    let cfg = config(CONFORMANCE);
    assert_eq!(state_file(&cfg), None);
    assert_eq!(
        SimulatedProvider::new(&cfg.providers[0])
            .expect("sim")
            .state_file(),
        None
    );

    for bad in ["''", "'clouds/'", "[a]"] {
        let e = Config::from_yaml(&yaml(bad)).expect_err(bad).to_string();
        assert!(
            e.contains("providers[0].simulation.state-file"),
            "{bad}: {e}"
        );
    }
}

// ----- API faults -----

#[tokio::test(start_paused = true)]
async fn a_hung_api_times_out_after_api_timeout_and_recovers_when_cleared() {
    let c = cloud("api-timeout: 5, boot-delay: 10");
    assert_eq!(c.provider.api_timeout(), Duration::from_secs(5));
    let s = spec(&c, 1);
    let id = c.provider.create_instance(&s).await.expect("create");
    c.provider.set_api_fault(Some(ApiFault::Hang)).await;
    assert_eq!(c.provider.api_fault().await, Some(ApiFault::Hang));
    let t0 = Instant::now();
    let e = c.provider.list_instances().await.expect_err("hung");
    assert!(matches!(e, ProviderError::Timeout(_)), "{e:?}");
    assert!(e.to_string().contains("server list"), "{e}");
    assert_eq!(t0.elapsed(), Duration::from_secs(5));
    // A wait looks at the server through the API too: it times out.
    let e = c
        .provider
        .wait_for_instance(&id, &s)
        .await
        .expect_err("hung");
    assert!(matches!(e, ProviderError::Timeout(_)), "{e:?}");
    assert!(
        matches!(
            c.provider.label_resources(&c.label).await,
            Err(ProviderError::Timeout(_))
        ),
        "the flavor list is an API call"
    );
    // The cloud itself carries on (the hooks are no API calls): the server
    // booted meanwhile.
    assert_eq!(c.provider.server_count().await, 1);
    // A hung call goes through once the fault is cleared.
    let cloud = c.provider.clone();
    let hung = tokio::spawn(async move { cloud.quota_limits().await });
    tokio::time::sleep(Duration::from_secs(2)).await;
    c.provider.set_api_fault(None).await;
    hung.await.expect("join").expect("answered once cleared");
    let i = c.provider.wait_for_instance(&id, &s).await.expect("active");
    assert_eq!(i.status, InstanceStatus::Active);
}

#[tokio::test]
async fn server_errors_and_rate_limits_answer_at_once() {
    let c = cloud("api-fault: server-error");
    assert_eq!(c.provider.api_fault().await, Some(ApiFault::ServerError));
    let e = launch(&c, 1).await.expect_err("500");
    assert!(matches!(e, ProviderError::Transient(_)), "{e:?}");
    assert!(e.to_string().contains("HTTP 500"), "{e}");
    assert_eq!(c.provider.server_count().await, 0, "nothing was created");
    c.provider
        .set_api_fault(Some(ApiFault::RateLimit {
            retry_after: Some(Duration::from_secs(30)),
        }))
        .await;
    let e = c.provider.quota_limits().await.expect_err("429");
    assert_eq!(e.retry_after(), Some(Duration::from_secs(30)));
    assert!(e.to_string().contains("HTTP 429"), "{e}");
    assert_eq!(e.metric_label(), "ratelimit");
    c.provider.set_api_fault(None).await;
    launch(&c, 2).await.expect("works again");
}

#[tokio::test]
async fn an_api_fault_set_through_the_state_file_reaches_every_process() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = format!("state-file: '{}'", dir.path().join("cloud.json").display());
    let launcher = cloud(&file);
    let drill = cloud(&file);
    launch(&launcher, 1).await.expect("works");
    drill
        .provider
        .set_api_fault(Some(ApiFault::RateLimit { retry_after: None }))
        .await;
    let e = launcher.provider.list_instances().await.expect_err("429");
    assert!(
        matches!(
            e,
            ProviderError::RateLimited {
                retry_after: None,
                ..
            }
        ),
        "{e:?}"
    );
    // A provider opening the file later keeps the fault (its configuration
    // sets none)...
    let late = cloud(&file);
    assert!(late.provider.list_images().await.is_err());
    // ... and clearing it reaches everyone.
    drill.provider.set_api_fault(None).await;
    assert_eq!(
        launcher
            .provider
            .list_instances()
            .await
            .expect("works")
            .len(),
        1
    );
    assert_eq!(late.provider.api_fault().await, None);
    // A configured fault is applied by the provider that opens the file.
    let faulty = cloud(&format!(
        "{file}, api-fault: {{mode: rate-limit, retry-after: 7}}"
    ));
    faulty
        .provider
        .list_images()
        .await
        .expect_err("configured fault");
    assert_eq!(
        launcher.provider.api_fault().await,
        Some(ApiFault::RateLimit {
            retry_after: Some(Duration::from_secs(7))
        })
    );
}
