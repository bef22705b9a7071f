//! Against a REAL OpenStack: the project's testbed (`testbed/openstack/`,
//! Keystone, Glance, Placement, Nova with the fake virt driver, Neutron, on
//! 127.0.0.1), started by `scripts/test.d/30-openstack.sh`.
//!
//! Feature `testbed` only. When the cloud is not there every test FAILS
//! with a message saying how to start it; nothing is skipped.
//!
//! The clouds.yaml is `$NODEPOOL_TEST_CLOUDS_YAML`, else the one the
//! testbed writes (`/tmp/openstack-peer/clouds.yaml`); cloud `peer` is the
//! admin project (Nova's default quota: 10 instances, 20 cores), cloud
//! `peer-quota` a project whose quota is one instance.
#![cfg(feature = "testbed")]

use std::path::PathBuf;
use std::sync::{Arc, Mutex, Once, OnceLock};
use std::time::Duration;

use async_trait::async_trait;
use indexmap::IndexMap;
use md5::{Digest, Md5};
use nodepool_model::config::{ImageSource, PoolLabel};
use nodepool_model::conformance::provider::{
    Capabilities, Harness, UploadFile, random_node_id, spec_for,
};
use nodepool_model::model::{CORES, INSTANCES};
use nodepool_model::provider::{
    IMAGE_BUILD_ID, ImageRef, ImageUploadSpec, InstanceStatus, Provider, ProviderError,
    ResourceKind, SnapshotSpec,
};
use nodepool_openstack::api::{ApiRequest, Raw, Service};
use nodepool_openstack::{ClientOptions, CloudsLoader, OpenStackProvider, ProviderOptions};
use reqwest::Method;
use serde_json::json;
use sha2::Sha256;

const PROVIDER: &str = "testbed-conformance";

fn clouds_yaml() -> PathBuf {
    let p = std::env::var_os("NODEPOOL_TEST_CLOUDS_YAML")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/tmp/openstack-peer/clouds.yaml"));
    assert!(
        p.is_file(),
        "the OpenStack testbed is not running: {} is missing. Start it with \
         testbed/openstack/install.sh && testbed/openstack/start.sh \
         (scripts/test.d/30-openstack.sh does both), or set NODEPOOL_TEST_CLOUDS_YAML",
        p.display()
    );
    p
}

fn options() -> ProviderOptions {
    ProviderOptions {
        client: ClientOptions {
            // generous: CI machines are shared and Nova's API is slow there
            timeout: Duration::from_secs(180),
            ..ClientOptions::default()
        },
        poll_interval: Duration::from_millis(250),
        delete_timeout: Duration::from_secs(180),
        ..ProviderOptions::default()
    }
}

fn provider_on(cloud: &str, name: &str) -> OpenStackProvider {
    let c = CloudsLoader::file(clouds_yaml())
        .load(Some(cloud), None)
        .unwrap_or_else(|e| panic!("{e}"));
    OpenStackProvider::new(name, c, options()).unwrap_or_else(|e| panic!("{e}"))
}

/// Once per test process, before any test: delete what earlier runs of
/// this file left (their servers would eat the 10-instance quota).
fn sweep_leftovers() {
    captured_logs();
    static SWEEP: Once = Once::new();
    SWEEP.call_once(|| {
        std::thread::spawn(|| {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async {
                for cloud in ["peer", "peer-quota"] {
                    let p = provider_on(cloud, "sweeper");
                    let servers = p
                        .list_instances()
                        .await
                        .expect("list servers (is the testbed up?)");
                    for s in servers {
                        if s.provider_name().is_some_and(|n| n.starts_with("testbed-")) {
                            let _ = p.delete_instance(&s.external_id).await;
                        }
                    }
                }
                let p = provider_on("peer", "sweeper");
                for i in p.list_images().await.expect("list images") {
                    if i.name.starts_with("conformance-") || i.name.starts_with("testbed-") {
                        let _ = p.delete_image(&i.id).await;
                    }
                }
            });
        })
        .join()
        .expect("sweep");
    });
}

fn label() -> PoolLabel {
    PoolLabel {
        name: "tiny".into(),
        image: ImageSource::CloudImage("np-base".into()),
        flavor_name: Some("np.".into()),
        min_ram: Some(64),
        key_name: None,
        console_log: true,
        boot_from_volume: false,
        volume_size: 50,
        instance_properties: IndexMap::new(),
        dynamic_instance_properties: IndexMap::new(),
        userdata: Some("#cloud-config\n".into()),
        networks: vec!["private".into()],
        host_key_checking: false,
    }
}

fn make_file(path: &std::path::Path, mib: usize) -> UploadFile {
    let mut data = Vec::with_capacity(mib << 20);
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    while data.len() < mib << 20 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        data.extend_from_slice(&x.to_le_bytes());
    }
    std::fs::write(path, &data).expect("write image file");
    UploadFile {
        path: path.to_owned(),
        format: "raw".into(),
        md5: hex::encode(Md5::digest(&data)),
        sha256: hex::encode(Sha256::digest(&data)),
    }
}

/// A 3 MiB file, made once per process.
fn small_file() -> UploadFile {
    static FILE: OnceLock<UploadFile> = OnceLock::new();
    FILE.get_or_init(|| {
        let p = std::env::temp_dir().join(format!(
            "nodepool-os-conformance-{}.raw",
            std::process::id()
        ));
        make_file(&p, 3)
    })
    .clone()
}

struct Testbed;

#[async_trait]
impl Harness for Testbed {
    async fn provider(&self) -> Arc<dyn Provider> {
        sweep_leftovers();
        Arc::new(provider_on("peer", PROVIDER))
    }

    fn label(&self) -> PoolLabel {
        label()
    }

    fn image(&self) -> ImageRef {
        ImageRef::Cloud {
            id: None,
            name: "np-base".into(),
        }
    }

    fn upload_file(&self) -> UploadFile {
        small_file()
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            floating_ips: true,
            ports: true,
            console_log: true,
            quota_error: true,
        }
    }

    fn quota_label(&self) -> Option<PoolLabel> {
        // 24 vCPUs: more than the 20-core default quota.
        let mut l = label();
        l.flavor_name = Some("np.huge".into());
        l.min_ram = None;
        Some(l)
    }

    fn floating_ip_label(&self) -> Option<PoolLabel> {
        Some(label())
    }

    fn timeout(&self) -> Duration {
        Duration::from_secs(400)
    }
}

nodepool_model::provider_conformance_tests!(Testbed);

// ------------------------------------------------------------------------
// Real-cloud checks beyond the provider-neutral suite.

async fn raw(p: &OpenStackProvider, req: ApiRequest) -> serde_json::Value {
    let r = p
        .client()
        .execute(&Raw(req))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    if r.body.is_empty() {
        serde_json::Value::Null
    } else {
        r.json().unwrap_or_else(|e| panic!("{e}"))
    }
}

/// Password auth, catalog, discovery with a negotiated microversion; a
/// revoked token is noticed (401) and replaced by a new one, once.
#[tokio::test]
async fn auth_discovery_and_reauthentication_after_revocation() {
    sweep_leftovers();
    let p = provider_on("peer", "testbed-auth");
    let c = p.client().clone();
    let project = c
        .project_id()
        .await
        .expect("token")
        .expect("project-scoped");
    assert!(!project.is_empty());
    let compute = c
        .endpoint(Service::Compute)
        .await
        .expect("compute endpoint");
    assert_eq!(compute.url, "http://127.0.0.1:8774/v2.1");
    assert_eq!(
        compute.microversion,
        Some((2, 96)),
        "negotiated min(ours, Nova's 2.100)"
    );
    assert_eq!(
        c.endpoint(Service::Image).await.expect("image").url,
        "http://127.0.0.1:9292/v2"
    );
    assert_eq!(
        c.endpoint(Service::Network).await.expect("network").url,
        "http://127.0.0.1:9696/v2.0"
    );
    p.quota_limits().await.expect("a call with the token");
    assert_eq!(c.stats().authentications, 1);
    // Revoke our own token in Keystone: the next call gets a 401, the client
    // authenticates again and the call succeeds.
    // (Glance is the testbed service that validates every call in Keystone,
    // so it sees the revocation at once.)
    c.revoke_token().await.expect("revoke");
    p.list_images()
        .await
        .expect("works again after re-authentication");
    assert_eq!(c.stats().authentications, 2, "exactly one new token");
    p.list_images().await.expect("and keeps working");
    assert_eq!(c.stats().authentications, 2);
}

/// Bad credentials are `Unauthenticated`, and the message names the cloud
/// and Keystone but not the password.
#[tokio::test]
async fn wrong_password_is_unauthenticated() {
    let mut c = CloudsLoader::file(clouds_yaml())
        .load(Some("peer"), None)
        .expect("clouds.yaml");
    let wrong = "not-the-password-4711";
    if let nodepool_openstack::clouds::Auth::Password { password, .. } = &mut c.auth {
        *password = nodepool_model::config::Secret::new(wrong);
    }
    let p = OpenStackProvider::new("testbed-badauth", c, options()).expect("provider");
    let e = p.quota_limits().await.expect_err("refused");
    assert!(matches!(e, ProviderError::Unauthenticated(_)), "{e:?}");
    let text = e.to_string();
    assert!(
        text.contains("cloud peer") && text.contains("127.0.0.1:5000"),
        "{text}"
    );
    assert!(!text.contains(wrong), "{text}");
    assert!(!format!("{p:?}").contains(wrong));
}

/// Nova's default quota as the provider reads it.
#[tokio::test]
async fn quota_limits_are_novas_defaults() {
    sweep_leftovers();
    let p = provider_on("peer", "testbed-quota-read");
    let l = p.quota_limits().await.expect("limits");
    assert_eq!(l.get(INSTANCES), Some(10), "{l:?}");
    assert_eq!(l.get(CORES), Some(20), "{l:?}");
    let q = provider_on("peer-quota", "testbed-quota-read");
    assert_eq!(
        q.quota_limits().await.expect("limits").get(INSTANCES),
        Some(1)
    );
}

/// A real instance-quota error: project np-quota may run one server.
#[tokio::test]
async fn second_server_over_instance_quota_is_quota_exceeded() {
    sweep_leftovers();
    let p = Arc::new(provider_on("peer-quota", "testbed-quota"));
    let h = Testbed;
    let first = spec_for(&h, p.as_ref(), &random_node_id(), label());
    let id = p.create_instance(&first).await.expect("the first fits");
    let second = spec_for(&h, p.as_ref(), &random_node_id(), label());
    let r = p.create_instance(&second).await;
    let waited = p.wait_for_instance(&id, &first).await;
    p.delete_instance(&id).await.expect("delete");
    if let Ok(id2) = &r {
        let _ = p.delete_instance(id2).await;
    }
    waited.expect("the first server boots");
    match r {
        Err(ProviderError::QuotaExceeded(m)) => {
            assert!(m.contains("Quota exceeded for instances"), "{m}");
        }
        other => panic!("expected QuotaExceeded, got {other:?}"),
    }
}

/// A multi-megabyte upload: streamed, Glance's checksum and size match, the
/// image is listed with its properties as an alien candidate, and deleted.
#[tokio::test]
async fn multi_megabyte_upload_checksum_and_alien_listing() {
    sweep_leftovers();
    let p = provider_on("peer", "testbed-upload");
    let dir = tempfile::tempdir().expect("tmp");
    let f = make_file(&dir.path().join("img.raw"), 24);
    let build = uuid::Uuid::new_v4().simple().to_string();
    let mut properties = IndexMap::new();
    properties.insert(IMAGE_BUILD_ID.to_owned(), build.clone());
    properties.insert("nodepool_upload_id".to_owned(), "0000000003".to_owned());
    properties.insert(
        "nodepool_provider_name".to_owned(),
        "testbed-upload".to_owned(),
    );
    let spec = ImageUploadSpec {
        name: format!("testbed-{build}"),
        path: f.path.clone(),
        format: "raw".into(),
        properties,
        md5: Some(f.md5.clone()),
        sha256: Some(f.sha256.clone()),
        timeout: Duration::from_secs(120),
        sent: Default::default(),
    };
    let id = p.upload_image(&spec).await.expect("upload");
    let shown = raw(&p, ApiRequest::get(Service::Image, format!("images/{id}"))).await;
    let result = std::panic::catch_unwind(|| {
        assert_eq!(
            shown["checksum"],
            json!(f.md5),
            "Glance's md5 is the file's"
        );
        assert_eq!(shown["size"], json!(24u64 << 20));
        assert_eq!(shown["disk_format"], json!("raw"));
        assert_eq!(shown["visibility"], json!("private"));
        assert_eq!(shown["owner_specified.openstack.sha256"], json!(f.sha256));
    });
    let aliens: Vec<_> = p
        .list_images()
        .await
        .expect("list")
        .into_iter()
        .filter(|i| i.properties.contains_key(IMAGE_BUILD_ID))
        .collect();
    p.delete_image(&id).await.expect("delete");
    result.expect("image fields");
    assert!(
        aliens
            .iter()
            .any(|i| i.id == id && i.properties[IMAGE_BUILD_ID] == build)
    );
    assert!(
        !aliens.iter().any(|i| i.name == "np-base"),
        "images without nodepool_build_id are not alien candidates"
    );
}

/// DOWN ports and unattached floating IPs are listed for cleanup and can be
/// deleted; deleting them twice is fine.
#[tokio::test]
async fn down_ports_and_unattached_floating_ips_listed_and_deleted() {
    sweep_leftovers();
    let p = provider_on("peer", "testbed-leaks");
    let nets = raw(
        &p,
        ApiRequest::get(Service::Network, "networks").query("name", "private"),
    )
    .await;
    let private = nets["networks"][0]["id"]
        .as_str()
        .expect("network private")
        .to_owned();
    let ext = raw(
        &p,
        ApiRequest::get(Service::Network, "networks").query("name", "public"),
    )
    .await;
    let public = ext["networks"][0]["id"]
        .as_str()
        .expect("network public")
        .to_owned();
    let port = raw(
        &p,
        ApiRequest::new(Method::POST, Service::Network, "ports")
            .json(json!({"port": {"network_id": private, "name": "testbed-leaked-port"}}))
            .expect(&[201]),
    )
    .await;
    let port_id = port["port"]["id"].as_str().expect("port id").to_owned();
    let fip = raw(
        &p,
        ApiRequest::new(Method::POST, Service::Network, "floatingips")
            .json(json!({"floatingip": {"floating_network_id": public}}))
            .expect(&[201]),
    )
    .await;
    let fip_id = fip["floatingip"]["id"].as_str().expect("fip id").to_owned();

    let ports = p.list_resources(ResourceKind::Port).await.expect("ports");
    let fips = p
        .list_resources(ResourceKind::FloatingIp)
        .await
        .expect("fips");
    p.delete_resource(ResourceKind::Port, &port_id)
        .await
        .expect("delete port");
    p.delete_resource(ResourceKind::FloatingIp, &fip_id)
        .await
        .expect("delete fip");
    p.delete_resource(ResourceKind::Port, &port_id)
        .await
        .expect("again");
    p.delete_resource(ResourceKind::FloatingIp, &fip_id)
        .await
        .expect("again");

    let leaked_port = ports
        .iter()
        .find(|r| r.id == port_id)
        .expect("the DOWN port is listed");
    assert_eq!(leaked_port.status, "DOWN");
    assert_eq!(leaked_port.device_owner.as_deref(), Some(""));
    assert!(!leaked_port.attached);
    let leaked_fip = fips
        .iter()
        .find(|r| r.id == fip_id)
        .expect("the floating IP is listed");
    assert!(!leaked_fip.attached);
    let after = p.list_resources(ResourceKind::Port).await.expect("ports");
    assert!(!after.iter().any(|r| r.id == port_id));
}

/// Nova shows the floating IP the provider attached (Neutron notifies
/// Nova), and the server's port is on the tenant network.
#[tokio::test]
async fn floating_ip_shows_in_nova_addresses() {
    sweep_leftovers();
    let p = Arc::new(provider_on("peer", "testbed-fip"));
    let mut spec = spec_for(&Testbed, p.as_ref(), &random_node_id(), label());
    spec.auto_floating_ip = true;
    let id = p.create_instance(&spec).await.expect("create");
    let outcome = async {
        let inst = p.wait_for_instance(&id, &spec).await.expect("boot");
        let fip = inst.public_ipv4.clone().expect("floating IP");
        assert!(fip.starts_with("203.0.113."), "{fip}");
        assert!(
            inst.private_ipv4
                .as_deref()
                .is_some_and(|a| a.starts_with("10.20.0.")),
            "{inst:?}"
        );
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            let got = p.get_instance(&id).await.expect("get").expect("exists");
            if got.public_ipv4.as_deref() == Some(fip.as_str()) {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "Nova never showed {fip}: {got:?}"
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    };
    let checked = futures::FutureExt::catch_unwind(std::panic::AssertUnwindSafe(outcome)).await;
    p.delete_instance(&id).await.expect("delete");
    if let Err(e) = checked {
        std::panic::resume_unwind(e);
    }
}

// ------------------------------------------------------------------------
// Snapshots (Nova's createImage). The testbed's compute driver
// (testbed/openstack/nova-peer-virt) uploads the booted image's bytes as
// the snapshot, as a real driver uploads the disk; server metadata
// `testbed_snapshot` = `hold` / `fail` makes it upload nothing / fail.

/// A snapshot spec with nodepool's image properties; `testbed-` names are
/// swept by later runs.
fn snapshot_spec(provider: &str, timeout: Duration) -> SnapshotSpec {
    let build = uuid::Uuid::new_v4().simple().to_string();
    let mut properties = IndexMap::new();
    properties.insert(IMAGE_BUILD_ID.to_owned(), build.clone());
    properties.insert("nodepool_upload_id".to_owned(), "0000000007".to_owned());
    properties.insert("nodepool_provider_name".to_owned(), provider.to_owned());
    SnapshotSpec {
        name: format!("testbed-snap-{build}"),
        properties,
        timeout,
    }
}

/// Boots a server from np-base, with `testbed_snapshot` set when given.
async fn booted(p: &OpenStackProvider, snapshot_mode: Option<&str>) -> String {
    let mut l = label();
    if let Some(m) = snapshot_mode {
        l.instance_properties
            .insert("testbed_snapshot".into(), m.into());
    }
    let spec = spec_for(&Testbed, p, &random_node_id(), l);
    let id = p.create_instance(&spec).await.expect("create");
    if let Err(e) = p.wait_for_instance(&id, &spec).await {
        let _ = p.delete_instance(&id).await;
        panic!("the server did not boot: {e}");
    }
    id
}

/// The images named `name` Glance lists (any status).
async fn images_named(p: &OpenStackProvider, name: &str) -> Vec<String> {
    p.list_images()
        .await
        .expect("list images")
        .into_iter()
        .filter(|i| i.name == name)
        .map(|i| i.id)
        .collect()
}

/// Runs `check`, then deletes the servers and the images named `image`
/// whatever happened, then re-raises a failed check.
async fn with_cleanup(
    p: &OpenStackProvider,
    servers: &Mutex<Vec<String>>,
    image: &str,
    check: impl std::future::Future<Output = ()>,
) {
    let checked = futures::FutureExt::catch_unwind(std::panic::AssertUnwindSafe(check)).await;
    let ids = servers.lock().expect("servers").clone();
    for id in ids {
        p.delete_instance(&id).await.expect("delete server");
    }
    for id in images_named(p, image).await {
        p.delete_image(&id).await.expect("delete image");
    }
    if let Err(e) = checked {
        std::panic::resume_unwind(e);
    }
}

/// A server booted from np-base is snapshotted: the image is active with
/// the base's bytes and nodepool's properties (listed as an upload's), the
/// server is still ACTIVE, a server boots from the snapshot, and the
/// image is deleted.
#[tokio::test]
async fn snapshot_is_active_with_properties_and_boots_a_server() {
    sweep_leftovers();
    let p = provider_on("peer", "testbed-snapshot");
    // generous: on a busy machine the compute host's upload through
    // Glance took 86 s
    let spec = snapshot_spec("testbed-snapshot", Duration::from_secs(600));
    let servers = Mutex::new(Vec::new());
    with_cleanup(&p, &servers, &spec.name, async {
        let server = booted(&p, None).await;
        servers.lock().expect("servers").push(server.clone());
        let id = p.snapshot_instance(&server, &spec).await.expect("snapshot");
        let shown = raw(&p, ApiRequest::get(Service::Image, format!("images/{id}"))).await;
        assert_eq!(shown["status"], json!("active"), "{shown}");
        assert_eq!(shown["name"], json!(spec.name));
        assert_eq!(shown["size"], json!(65536), "np-base's 64 KiB: {shown}");
        let listed = p
            .list_images()
            .await
            .expect("list images")
            .into_iter()
            .find(|i| i.id == id)
            .expect("the snapshot is listed");
        assert_eq!(listed.status, "active");
        for (k, v) in &spec.properties {
            assert_eq!(
                listed.properties.get(k),
                Some(v),
                "property {k}: {listed:?}"
            );
        }
        let after = p.get_instance(&server).await.expect("get").expect("exists");
        assert_eq!(after.status, InstanceStatus::Active, "left as it was");

        let mut from_snapshot = spec_for(&Testbed, &p, &random_node_id(), label());
        from_snapshot.image = ImageRef::Uploaded {
            external_id: id.clone(),
        };
        let second = p.create_instance(&from_snapshot).await.expect("create");
        servers.lock().expect("servers").push(second.clone());
        let inst = p
            .wait_for_instance(&second, &from_snapshot)
            .await
            .expect("a server boots from the snapshot");
        assert_eq!(inst.status, InstanceStatus::Active);
        let nova = raw(
            &p,
            ApiRequest::get(Service::Compute, format!("servers/{second}")),
        )
        .await;
        assert_eq!(nova["server"]["image"]["id"], json!(id), "{nova}");

        p.delete_image(&id).await.expect("delete the snapshot");
        assert!(
            images_named(&p, &spec.name).await.is_empty(),
            "the snapshot is gone"
        );
    })
    .await;
}

/// A snapshot of a server that does not exist is NotFound, and makes no
/// image.
#[tokio::test]
async fn snapshot_of_a_missing_server_is_not_found() {
    sweep_leftovers();
    let p = provider_on("peer", "testbed-snapshot-missing");
    let spec = snapshot_spec("testbed-snapshot-missing", Duration::from_secs(60));
    let missing = uuid::Uuid::new_v4().to_string();
    let r = p.snapshot_instance(&missing, &spec).await;
    assert!(matches!(r, Err(ProviderError::NotFound(_))), "{r:?}");
    assert!(images_named(&p, &spec.name).await.is_empty());
}

/// A snapshot that never becomes active (the compute host uploads
/// nothing: `testbed_snapshot: hold`) times out, and its queued image is
/// deleted.
#[tokio::test]
async fn snapshot_never_active_times_out_and_is_deleted() {
    sweep_leftovers();
    let p = provider_on("peer", "testbed-snapshot-hold");
    let spec = snapshot_spec("testbed-snapshot-hold", Duration::from_secs(5));
    let servers = Mutex::new(Vec::new());
    with_cleanup(&p, &servers, &spec.name, async {
        let server = booted(&p, Some("hold")).await;
        servers.lock().expect("servers").push(server.clone());
        let r = p.snapshot_instance(&server, &spec).await;
        match r {
            Err(ProviderError::Timeout(m)) => {
                assert!(m.contains("not active within 5 s"), "{m}")
            }
            other => panic!("expected Timeout, got {other:?}"),
        }
        assert!(
            images_named(&p, &spec.name).await.is_empty(),
            "the queued image was deleted"
        );
    })
    .await;
}

/// A snapshot the compute host fails (`testbed_snapshot: fail`; Nova then
/// deletes the image) is ServerFailed, and says so.
#[tokio::test]
async fn failed_snapshot_is_server_failed() {
    sweep_leftovers();
    let p = provider_on("peer", "testbed-snapshot-fail");
    let spec = snapshot_spec("testbed-snapshot-fail", Duration::from_secs(300));
    let servers = Mutex::new(Vec::new());
    with_cleanup(&p, &servers, &spec.name, async {
        let server = booted(&p, Some("fail")).await;
        servers.lock().expect("servers").push(server.clone());
        let r = p.snapshot_instance(&server, &spec).await;
        match r {
            Err(ProviderError::ServerFailed(m)) => {
                // Nova 34 records the reason only in nova-compute's log.
                assert!(m.contains("went deleted"), "{m}");
                assert!(m.contains("the compute host's snapshot failed"), "{m}");
            }
            other => panic!("expected ServerFailed, got {other:?}"),
        }
        assert!(images_named(&p, &spec.name).await.is_empty());
    })
    .await;
}

/// Every test of this file logs, at TRACE for this crate and reqwest, into
/// one buffer (a global subscriber: per-thread ones miss events from the
/// runtime's other threads).
fn captured_logs() -> &'static Arc<Mutex<Vec<u8>>> {
    static LOGS: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    LOGS.get_or_init(|| {
        #[derive(Clone)]
        struct Buf(Arc<Mutex<Vec<u8>>>);
        impl std::io::Write for Buf {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                if let Ok(mut v) = self.0.lock() {
                    v.extend_from_slice(b);
                }
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let buf = Buf(Arc::default());
        let writer = buf.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(
                "nodepool_openstack=trace,reqwest=trace,hyper=debug,hyper_util=debug",
            ))
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .finish();
        let _ = tracing::subscriber::set_global_default(subscriber);
        buf.0
    })
}

/// The logs of a launch cycle (and of whatever else ran meanwhile) contain
/// neither the password nor a token.
#[tokio::test]
async fn no_secret_in_logs() {
    sweep_leftovers();
    let logs = captured_logs();
    let p = provider_on("peer", "testbed-logs");
    let spec = spec_for(&Testbed, &p, &random_node_id(), label());
    let id = p.create_instance(&spec).await.expect("create");
    let _ = p.wait_for_instance(&id, &spec).await;
    p.delete_instance(&id).await.expect("delete");
    let text = String::from_utf8_lossy(&logs.lock().expect("logs")).into_owned();
    assert!(
        text.contains("server create accepted"),
        "logs were captured"
    );
    assert!(text.contains("token issued"), "authentication was logged");
    // Keystone's fernet tokens all start with gAAAAA.
    assert!(!text.contains("gAAAAA"), "a token leaked into the logs");
    assert!(
        !text.contains("password"),
        "a password field leaked into the logs"
    );
    assert!(
        !text.contains("secret"),
        "the password (`secret`) leaked into the logs"
    );
    assert!(!format!("{p:?}").contains("secret"));
}
