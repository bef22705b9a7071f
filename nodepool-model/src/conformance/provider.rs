//! The `Provider` conformance suite.
//!
//! Each function is one test body about the [`Provider`] contract, not
//! about any one cloud: the simulated cloud and OpenStack (against a real
//! cloud) both run it with
//! [`provider_conformance_tests!`](crate::provider_conformance_tests),
//! giving a [`Harness`] that knows a label that boots, an image to upload
//! and what the provider can do ([`Capabilities`]). A test whose capability
//! is missing returns at once (it is a statement about the provider, not a
//! skip: the harness says it cannot do that).
//!
//! Tests clean up what they create even when an assertion fails, and give
//! every node a random id, so they can run concurrently on one cloud.

use std::panic::AssertUnwindSafe;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures::FutureExt;
use indexmap::IndexMap;

use crate::config::PoolLabel;
use crate::model::{CORES, INSTANCES, RAM, VOLUME_GB, VOLUMES};
use crate::provider::{
    IMAGE_BUILD_ID, IMAGE_PROVIDER, IMAGE_UPLOAD_ID, ImageRef, ImageUploadSpec, Instance,
    InstanceSpec, InstanceStatus, META_GROUPS, META_LEGACY_JSON, META_NODE_ID, META_POOL,
    META_PROVIDER, Provider, ProviderError, ResourceKind, SnapshotSpec,
};

/// What a provider can do beyond the required surface.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Capabilities {
    /// Attaches floating IPs ([`Harness::floating_ip_label`] is given).
    pub floating_ips: bool,
    /// Lists ports for leak cleanup.
    pub ports: bool,
    /// Returns a console log for a running server.
    pub console_log: bool,
    /// The harness can make a launch fail for quota
    /// ([`Harness::quota_label`] is given).
    pub quota_error: bool,
}

/// A small file to upload as an image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UploadFile {
    /// The file.
    pub path: PathBuf,
    /// Disk format to upload it as.
    pub format: String,
    /// Its MD5 (lowercase hex).
    pub md5: String,
    /// Its SHA-256 (lowercase hex).
    pub sha256: String,
}

/// What a provider's test setup gives the suite.
#[async_trait]
pub trait Harness: Send + Sync {
    /// The provider under test.
    async fn provider(&self) -> Arc<dyn Provider>;

    /// A pool label that boots on this provider.
    fn label(&self) -> PoolLabel;

    /// The image that label boots.
    fn image(&self) -> ImageRef;

    /// The pool name written into server metadata.
    fn pool(&self) -> String {
        "main".into()
    }

    /// A small file to upload.
    fn upload_file(&self) -> UploadFile;

    /// What the provider can do.
    fn capabilities(&self) -> Capabilities;

    /// A label whose launch the cloud refuses for lack of quota.
    fn quota_label(&self) -> Option<PoolLabel> {
        None
    }

    /// A label on a network from which floating IPs can be attached.
    fn floating_ip_label(&self) -> Option<PoolLabel> {
        None
    }

    /// Whether the provider snapshots servers into images
    /// ([`Provider::snapshot_instance`]). A capability, asked of the
    /// harness rather than a [`Capabilities`] field so that harnesses
    /// outside this crate, which build [`Capabilities`] literally, keep
    /// compiling (and keep saying "no" until they opt in).
    fn snapshots(&self) -> bool {
        false
    }

    /// Longest time a server may take to boot, be deleted, or an image to
    /// upload.
    fn timeout(&self) -> Duration {
        Duration::from_secs(180)
    }
}

/// Generates one `#[tokio::test]` per conformance test for a harness
/// expression (evaluated inside each async test, so it may `.await`).
#[macro_export]
macro_rules! provider_conformance_tests {
    ($harness:expr) => {
        $crate::provider_conformance_tests!(@each $harness;
            launch_wait_list_delete,
            missing_things_are_fine,
            quota_limits_readable,
            label_resources_from_flavor,
            unknown_flavor_is_invalid,
            image_upload_list_delete,
            image_checksum_mismatch_fails,
            leaked_servers_recognised,
            quota_exceeded_maps_to_quota_error,
            floating_ip_attached_and_released,
            long_metadata_never_fails_a_launch,
            leak_resources_listable,
            missing_leak_resources_count_as_deleted,
            snapshot_is_an_image_servers_boot
        );
    };
    (@each $harness:expr; $($name:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                let harness = $harness;
                $crate::conformance::provider::$name(&harness).await;
            }
        )*
    };
}

/// A random 10-digit node id, so that concurrent tests never collide.
pub fn random_node_id() -> String {
    let n = uuid::Uuid::new_v4().as_u128() % 10_000_000_000;
    format!("{n:010}")
}

/// The spec the launcher would make for `label` and `node_id`, with the
/// standard metadata tags (reference §4.4).
pub fn spec_for(
    h: &dyn Harness,
    provider: &dyn Provider,
    node_id: &str,
    label: PoolLabel,
) -> InstanceSpec {
    let image = h.image();
    let image_name = match &image {
        ImageRef::Uploaded { external_id } => external_id.clone(),
        ImageRef::Cloud { name, .. } => name.clone(),
    };
    let mut metadata = IndexMap::new();
    metadata.insert(
        META_GROUPS.to_owned(),
        format!("{},{image_name},{}", provider.name(), label.name),
    );
    for (k, v) in &label.instance_properties {
        metadata.insert(k.clone(), v.clone());
    }
    metadata.insert(META_NODE_ID.to_owned(), node_id.to_owned());
    metadata.insert(META_POOL.to_owned(), h.pool());
    metadata.insert(META_PROVIDER.to_owned(), provider.name().to_owned());
    InstanceSpec {
        name: format!("np{node_id}"),
        node_id: node_id.to_owned(),
        provider: provider.name().to_owned(),
        pool: h.pool(),
        label,
        image,
        availability_zone: None,
        security_groups: Vec::new(),
        config_drive: None,
        auto_floating_ip: false,
        metadata,
    }
}

async fn bounded<T>(h: &dyn Harness, what: &str, f: impl Future<Output = T>) -> T {
    match tokio::time::timeout(h.timeout(), f).await {
        Ok(v) => v,
        Err(_) => panic!("{what}: not done within {:?}", h.timeout()),
    }
}

/// Polls `check` until it returns true, failing after the harness timeout.
async fn eventually<F, Fut>(h: &dyn Harness, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + h.timeout();
    loop {
        if check().await {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: still not true after {:?}",
            h.timeout()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Creates a server, runs `checks` on it, and deletes it whatever happened.
async fn with_server<F, Fut>(h: &dyn Harness, p: &Arc<dyn Provider>, spec: &InstanceSpec, checks: F)
where
    F: FnOnce(String) -> Fut,
    Fut: Future<Output = ()>,
{
    let id = bounded(h, "create_instance", p.create_instance(spec))
        .await
        .unwrap_or_else(|e| panic!("create_instance({}): {e}", spec.name));
    let outcome = AssertUnwindSafe(checks(id.clone())).catch_unwind().await;
    let deleted = bounded(h, "delete_instance", p.delete_instance(&id)).await;
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
    deleted.unwrap_or_else(|e| panic!("delete_instance({id}): {e}"));
}

async fn wait(h: &dyn Harness, p: &Arc<dyn Provider>, id: &str, spec: &InstanceSpec) -> Instance {
    bounded(h, "wait_for_instance", p.wait_for_instance(id, spec))
        .await
        .unwrap_or_else(|e| panic!("wait_for_instance({id}): {e}"))
}

/// launch → ACTIVE → our tags read back → listed → delete → gone.
pub async fn launch_wait_list_delete(h: &dyn Harness) {
    let p = h.provider().await;
    let node = random_node_id();
    let mut label = h.label();
    label
        .instance_properties
        .insert("conformance".into(), "yes".into());
    let spec = spec_for(h, p.as_ref(), &node, label);
    let id = bounded(h, "create_instance", p.create_instance(&spec))
        .await
        .unwrap_or_else(|e| panic!("create_instance: {e}"));
    assert!(!id.is_empty(), "a cloud id is returned");
    let checks = AssertUnwindSafe(async {
        let inst = wait(h, &p, &id, &spec).await;
        assert_eq!(inst.external_id, id);
        assert_eq!(inst.name, spec.name);
        assert_eq!(inst.status, InstanceStatus::Active);
        for (k, v) in &spec.metadata {
            assert_eq!(inst.metadata.get(k), Some(v), "metadata {k} read back");
        }
        assert_eq!(
            inst.metadata.get("conformance").map(String::as_str),
            Some("yes")
        );
        assert_eq!(inst.node_id().as_deref(), Some(node.as_str()));
        assert_eq!(inst.provider_name().as_deref(), Some(p.name()));
        let got = p
            .get_instance(&id)
            .await
            .expect("get_instance")
            .expect("the server exists");
        assert_eq!(got.status, InstanceStatus::Active);
        assert_eq!(got.node_id().as_deref(), Some(node.as_str()));
        eventually(h, "the server is listed", || async {
            p.list_instances()
                .await
                .expect("list_instances")
                .iter()
                .any(|i| i.external_id == id && i.node_id().as_deref() == Some(node.as_str()))
        })
        .await;
        if h.capabilities().console_log {
            p.console_log(&id).await.expect("console_log");
        }
    })
    .catch_unwind()
    .await;
    let deleted = bounded(h, "delete_instance", p.delete_instance(&id)).await;
    if let Err(panic) = checks {
        std::panic::resume_unwind(panic);
    }
    deleted.expect("delete_instance");
    assert_eq!(
        p.get_instance(&id)
            .await
            .expect("get_instance after delete"),
        None,
        "delete_instance returns only once the server is gone"
    );
    eventually(h, "the server is no longer listed", || async {
        !p.list_instances()
            .await
            .expect("list_instances")
            .iter()
            .any(|i| i.external_id == id)
    })
    .await;
    // deleting again is fine
    p.delete_instance(&id).await.expect("second delete");
}

/// Servers and images that do not exist: `get` is `None`, deletes succeed.
pub async fn missing_things_are_fine(h: &dyn Harness) {
    let p = h.provider().await;
    let missing = uuid::Uuid::new_v4().to_string();
    assert_eq!(p.get_instance(&missing).await.expect("get missing"), None);
    p.delete_instance(&missing)
        .await
        .expect("deleting a missing server is Ok");
    p.delete_image(&missing)
        .await
        .expect("deleting a missing image is Ok");
}

/// The cloud's limits can be read, and none is negative.
pub async fn quota_limits_readable(h: &dyn Harness) {
    let p = h.provider().await;
    let limits = p.quota_limits().await.expect("quota_limits");
    for (name, v) in limits.iter() {
        assert!(
            v >= 0,
            "limit {name} = {v}: unlimited must be absent, not negative"
        );
    }
    if h.capabilities().quota_error {
        // a cloud that can refuse for quota has some limit
        assert!(!limits.is_unlimited(), "{limits:?}");
    }
}

/// Label quota comes from its flavor: one instance, its cores and RAM;
/// booting from a volume adds one volume of `volume-size` GB.
pub async fn label_resources_from_flavor(h: &dyn Harness) {
    let p = h.provider().await;
    let label = h.label();
    let r = p.label_resources(&label).await.expect("label_resources");
    assert_eq!(r.get(INSTANCES), 1, "{r:?}");
    assert!(r.get(CORES) >= 1, "{r:?}");
    assert!(r.get(RAM) >= label.min_ram.unwrap_or(1), "{r:?}");
    assert_eq!(r.get(VOLUMES), 0, "{r:?}");
    let mut bfv = label.clone();
    bfv.boot_from_volume = true;
    bfv.volume_size = 7;
    let rv = p.label_resources(&bfv).await.expect("label_resources");
    assert_eq!(rv.get(VOLUMES), 1, "{rv:?}");
    assert_eq!(rv.get(VOLUME_GB), 7, "{rv:?}");
    assert_eq!(rv.get(CORES), r.get(CORES));
}

/// A label whose flavor does not exist is a configuration problem.
pub async fn unknown_flavor_is_invalid(h: &dyn Harness) {
    let p = h.provider().await;
    let mut label = h.label();
    label.flavor_name = Some("no-such-flavor-anywhere".into());
    label.min_ram = None;
    let e = p.label_resources(&label).await.expect_err("no such flavor");
    assert!(matches!(e, ProviderError::InvalidRequest(_)), "{e:?}");
    let spec = spec_for(h, p.as_ref(), &random_node_id(), label);
    let e = p.create_instance(&spec).await.expect_err("no such flavor");
    assert!(matches!(e, ProviderError::InvalidRequest(_)), "{e:?}");
}

fn upload_spec(h: &dyn Harness, p: &dyn Provider, build: &str) -> ImageUploadSpec {
    let f = h.upload_file();
    let mut properties = IndexMap::new();
    properties.insert(IMAGE_BUILD_ID.to_owned(), build.to_owned());
    properties.insert(IMAGE_UPLOAD_ID.to_owned(), "0000000001".to_owned());
    properties.insert(IMAGE_PROVIDER.to_owned(), p.name().to_owned());
    properties.insert("conformance_meta".to_owned(), "x".to_owned());
    ImageUploadSpec {
        name: format!("conformance-{build}"),
        path: f.path,
        format: f.format,
        properties,
        md5: Some(f.md5),
        sha256: Some(f.sha256),
        timeout: h.timeout(),
        sent: Default::default(),
    }
}

/// Upload → listed, active, with our properties → delete → not listed.
pub async fn image_upload_list_delete(h: &dyn Harness) {
    let p = h.provider().await;
    let build = uuid::Uuid::new_v4().simple().to_string();
    let spec = upload_spec(h, p.as_ref(), &build);
    let id = bounded(h, "upload_image", p.upload_image(&spec))
        .await
        .unwrap_or_else(|e| panic!("upload_image: {e}"));
    let checks = AssertUnwindSafe(async {
        let images = p.list_images().await.expect("list_images");
        let img = images
            .iter()
            .find(|i| i.id == id)
            .unwrap_or_else(|| panic!("image {id} listed"));
        assert_eq!(img.name, spec.name);
        assert_eq!(img.status, "active");
        for (k, v) in &spec.properties {
            assert_eq!(img.properties.get(k), Some(v), "property {k}");
        }
    })
    .catch_unwind()
    .await;
    let deleted = p.delete_image(&id).await;
    if let Err(panic) = checks {
        std::panic::resume_unwind(panic);
    }
    deleted.expect("delete_image");
    eventually(h, "the image is no longer listed", || async {
        !p.list_images()
            .await
            .expect("list_images")
            .iter()
            .any(|i| i.id == id && i.status == "active")
    })
    .await;
}

/// An upload whose file does not match the expected checksum fails and
/// leaves no image behind.
pub async fn image_checksum_mismatch_fails(h: &dyn Harness) {
    let p = h.provider().await;
    let build = uuid::Uuid::new_v4().simple().to_string();
    let mut spec = upload_spec(h, p.as_ref(), &build);
    spec.md5 = Some("0".repeat(32));
    let r = bounded(h, "upload_image", p.upload_image(&spec)).await;
    assert!(
        r.is_err(),
        "a checksum mismatch must fail the upload: {r:?}"
    );
    let leftovers: Vec<_> = p
        .list_images()
        .await
        .expect("list_images")
        .into_iter()
        .filter(|i| i.properties.get(IMAGE_BUILD_ID) == Some(&build) && i.status != "deleted")
        .collect();
    for i in &leftovers {
        let _ = p.delete_image(&i.id).await;
    }
    assert!(leftovers.is_empty(), "failed upload left {leftovers:?}");
}

/// Servers tagged for this provider are recognised from the listing alone:
/// by the current tags, and by the legacy JSON `nodepool` key.
pub async fn leaked_servers_recognised(h: &dyn Harness) {
    let p = h.provider().await;
    let node = random_node_id();
    let spec = spec_for(h, p.as_ref(), &node, h.label());
    let legacy_node: u64 = random_node_id().parse().unwrap_or(1);
    let mut legacy = spec_for(h, p.as_ref(), &format!("{legacy_node:010}"), h.label());
    legacy.metadata = IndexMap::new();
    legacy.metadata.insert(
        META_LEGACY_JSON.to_owned(),
        format!(
            r#"{{"provider_name": "{}", "node_id": {legacy_node}, "image_name": "x", "label_name": "y"}}"#,
            p.name()
        ),
    );
    let id = bounded(h, "create_instance", p.create_instance(&spec))
        .await
        .unwrap_or_else(|e| panic!("create_instance: {e}"));
    let legacy_id = bounded(h, "create_instance", p.create_instance(&legacy)).await;
    let checks = AssertUnwindSafe(async {
        let legacy_id = legacy_id.as_ref().expect("create_instance (legacy tags)");
        let _ = wait(h, &p, &id, &spec).await;
        let _ = wait(h, &p, legacy_id, &legacy).await;
        let ours: Vec<Instance> = p
            .list_instances()
            .await
            .expect("list_instances")
            .into_iter()
            .filter(|i| i.provider_name().as_deref() == Some(p.name()))
            .collect();
        let found = ours
            .iter()
            .find(|i| i.external_id == id)
            .expect("the tagged server is listed as ours");
        assert_eq!(found.node_id().as_deref(), Some(node.as_str()));
        let old = ours
            .iter()
            .find(|i| &i.external_id == legacy_id)
            .expect("the legacy-tagged server is listed as ours");
        assert_eq!(old.node_id(), Some(format!("{legacy_node:010}")));
    })
    .catch_unwind()
    .await;
    let mut deleted = vec![bounded(h, "delete_instance", p.delete_instance(&id)).await];
    if let Ok(l) = &legacy_id {
        deleted.push(bounded(h, "delete_instance", p.delete_instance(l)).await);
    }
    if let Err(panic) = checks {
        std::panic::resume_unwind(panic);
    }
    for d in deleted {
        d.expect("delete_instance");
    }
}

/// A launch the cloud refuses for quota is `QuotaExceeded`, at create or
/// while waiting.
pub async fn quota_exceeded_maps_to_quota_error(h: &dyn Harness) {
    if !h.capabilities().quota_error {
        return;
    }
    let p = h.provider().await;
    let label = h
        .quota_label()
        .expect("capabilities.quota_error needs quota_label()");
    let spec = spec_for(h, p.as_ref(), &random_node_id(), label);
    match bounded(h, "create_instance", p.create_instance(&spec)).await {
        Err(ProviderError::QuotaExceeded(_)) => {}
        Err(e) => panic!("expected QuotaExceeded, got {e:?}"),
        Ok(id) => {
            let r = bounded(h, "wait_for_instance", p.wait_for_instance(&id, &spec)).await;
            let _ = p.delete_instance(&id).await;
            match r {
                Err(ProviderError::QuotaExceeded(_)) => {}
                other => panic!("expected QuotaExceeded, got {other:?}"),
            }
        }
    }
}

/// With `auto_floating_ip`, a server without a public address gets one,
/// and its floating IP is released with it.
pub async fn floating_ip_attached_and_released(h: &dyn Harness) {
    if !h.capabilities().floating_ips {
        return;
    }
    let p = h.provider().await;
    let label = h
        .floating_ip_label()
        .expect("capabilities.floating_ips needs floating_ip_label()");
    let mut spec = spec_for(h, p.as_ref(), &random_node_id(), label);
    spec.auto_floating_ip = true;
    let attached_before: Vec<String> = p
        .list_resources(ResourceKind::FloatingIp)
        .await
        .expect("list floating IPs")
        .into_iter()
        .map(|r| r.id)
        .collect();
    let new_fips = std::sync::Mutex::new(Vec::<String>::new());
    let pp = p.clone();
    with_server(h, &p, &spec.clone(), |id| {
        let new_fips = &new_fips;
        async move {
            let inst = wait(h, &pp, &id, &spec).await;
            let ip = inst
                .public_ipv4
                .clone()
                .expect("a public IPv4 was attached");
            assert_eq!(inst.interface_ip.as_deref(), Some(ip.as_str()));
            let now: Vec<_> = pp
                .list_resources(ResourceKind::FloatingIp)
                .await
                .expect("list floating IPs")
                .into_iter()
                .filter(|r| !attached_before.contains(&r.id))
                .collect();
            assert!(
                now.iter().any(|r| r.attached),
                "a new attached floating IP exists: {now:?}"
            );
            if let Ok(mut n) = new_fips.lock() {
                n.extend(now.into_iter().map(|r| r.id));
            }
        }
    })
    .await;
    let created = new_fips.lock().map(|v| v.clone()).unwrap_or_default();
    // A floating IP not released with its server stays behind unattached
    // (its port is gone). Attached ones may belong to concurrent tests.
    let left: Vec<_> = p
        .list_resources(ResourceKind::FloatingIp)
        .await
        .expect("list floating IPs")
        .into_iter()
        .filter(|r| created.contains(&r.id) && !r.attached)
        .collect();
    assert!(
        left.is_empty(),
        "floating IPs released with the server: {left:?}"
    );
}

/// Metadata values longer than the cloud allows never fail a launch: the
/// value read back is a prefix of what was asked (Nova: cut at 255 bytes on
/// a character boundary).
pub async fn long_metadata_never_fails_a_launch(h: &dyn Harness) {
    let p = h.provider().await;
    let mut spec = spec_for(h, p.as_ref(), &random_node_id(), h.label());
    let long = format!("{}é{}", "a".repeat(254), "z".repeat(100));
    spec.metadata.insert("long_value".into(), long.clone());
    let pp = p.clone();
    with_server(h, &p, &spec.clone(), |id| async move {
        let inst = wait(h, &pp, &id, &spec).await;
        let got = inst
            .metadata
            .get("long_value")
            .expect("the long value is kept (perhaps shortened)");
        assert!(long.starts_with(got.as_str()), "{got:?} is a prefix");
        assert!(!got.is_empty());
        assert_eq!(inst.node_id(), Some(spec.node_id.clone()));
    })
    .await;
}

/// Floating IPs and ports can be listed for cleanup (empty lists are fine).
pub async fn leak_resources_listable(h: &dyn Harness) {
    let p = h.provider().await;
    let fips = p
        .list_resources(ResourceKind::FloatingIp)
        .await
        .expect("list floating IPs");
    assert!(fips.iter().all(|r| r.kind == ResourceKind::FloatingIp));
    if h.capabilities().ports {
        let ports = p
            .list_resources(ResourceKind::Port)
            .await
            .expect("list ports");
        assert!(ports.iter().all(|r| r.kind == ResourceKind::Port));
    }
}

/// Deleting a floating IP or port that does not exist succeeds (the
/// launcher's cleanup may race a server's own release of its floating IP,
/// or another launcher's cleanup), and changes nothing.
pub async fn missing_leak_resources_count_as_deleted(h: &dyn Harness) {
    let p = h.provider().await;
    let mut kinds = vec![ResourceKind::FloatingIp];
    if h.capabilities().ports {
        kinds.push(ResourceKind::Port);
    }
    for kind in kinds {
        let before = p.list_resources(kind).await.expect("list");
        let missing = uuid::Uuid::new_v4().to_string();
        bounded(h, "delete_resource", p.delete_resource(kind, &missing))
            .await
            .unwrap_or_else(|e| panic!("deleting a missing {kind:?}: {e:?}"));
        let after = p.list_resources(kind).await.expect("list");
        // Resources of concurrent tests may come and go; ours never existed.
        assert!(
            before.iter().all(|r| r.id != missing) && after.iter().all(|r| r.id != missing),
            "{kind:?} {missing} appeared"
        );
    }
}

/// A server's snapshot (seed 002's setup-script images) is an active
/// image listed with the spec's name and properties, a new server boots
/// from it, the snapshotted server is left running, and the image can be
/// deleted; snapshotting a server that does not exist is an error.
pub async fn snapshot_is_an_image_servers_boot(h: &dyn Harness) {
    if !h.snapshots() {
        return;
    }
    let p = h.provider().await;
    let node = random_node_id();
    let spec = spec_for(h, p.as_ref(), &node, h.label());
    let mut properties = IndexMap::new();
    properties.insert(IMAGE_PROVIDER.to_owned(), p.name().to_owned());
    properties.insert(IMAGE_BUILD_ID.to_owned(), node.clone());
    properties.insert(IMAGE_UPLOAD_ID.to_owned(), "0000000001".to_owned());
    let snap = SnapshotSpec {
        name: format!("conformance-snapshot-{node}"),
        properties: properties.clone(),
        timeout: h.timeout(),
    };
    let missing = uuid::Uuid::new_v4().to_string();
    assert!(
        bounded(h, "snapshot_instance", p.snapshot_instance(&missing, &snap))
            .await
            .is_err(),
        "a server that does not exist cannot be snapshotted"
    );
    let image = Arc::new(std::sync::Mutex::new(None::<String>));
    let made = image.clone();
    let pc = p.clone();
    let (spec_ref, snap) = (&spec, &snap);
    let outcome = AssertUnwindSafe(with_server(h, &p, &spec, |id| async move {
        wait(h, &pc, &id, spec_ref).await;
        let image_id = bounded(h, "snapshot_instance", pc.snapshot_instance(&id, snap))
            .await
            .unwrap_or_else(|e| panic!("snapshot_instance({id}): {e}"));
        *made.lock().expect("lock") = Some(image_id.clone());
        let listed = pc.list_images().await.expect("list_images");
        let info = listed
            .iter()
            .find(|i| i.id == image_id)
            .unwrap_or_else(|| panic!("snapshot {image_id} is listed: {listed:?}"));
        assert_eq!(info.name, snap.name);
        assert_eq!(info.status, "active");
        for (k, v) in &snap.properties {
            assert_eq!(info.properties.get(k), Some(v), "property {k} read back");
        }
        let still = pc
            .get_instance(&id)
            .await
            .expect("get_instance")
            .expect("the snapshotted server is left as it was");
        assert_eq!(still.status, InstanceStatus::Active);
        let mut from_snapshot = spec_for(h, pc.as_ref(), &random_node_id(), h.label());
        from_snapshot.image = ImageRef::Uploaded {
            external_id: image_id.clone(),
        };
        with_server(h, &pc, &from_snapshot, |id2| {
            let pc = pc.clone();
            let from_snapshot = from_snapshot.clone();
            async move {
                let inst = wait(h, &pc, &id2, &from_snapshot).await;
                assert_eq!(
                    inst.status,
                    InstanceStatus::Active,
                    "a server boots the snapshot"
                );
            }
        })
        .await;
    }))
    .catch_unwind()
    .await;
    let image_id = image.lock().expect("lock").clone();
    if let Some(image_id) = &image_id {
        p.delete_image(image_id).await.expect("delete_image");
    }
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
    let image_id = image_id.expect("a snapshot was made");
    eventually(h, "the deleted snapshot is no longer listed", || async {
        !p.list_images()
            .await
            .expect("list_images")
            .iter()
            .any(|i| i.id == image_id)
    })
    .await;
}
