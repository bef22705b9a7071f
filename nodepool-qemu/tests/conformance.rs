//! The qemu provider passes the Provider conformance suite with real VMs
//! (the boot-sector stub under TCG), and its VMs really run: the guest's
//! serial output, the config drive and the forwarded port are checked.

use nodepool_model::conformance::provider::{Harness, random_node_id, spec_for};
use nodepool_model::provider::{ImageRef, InstanceStatus, Provider, ProviderError, SnapshotSpec};

mod support;

use support::{Local, PUBLIC_KEY};

mod conformance {
    use super::Local;
    nodepool_model::provider_conformance_tests!(Local::new());
}

/// ACTIVE means the process runs; the guest really executes: the stub's
/// banner reaches the serial console, served by `console_log`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_guest_runs_and_its_console_is_served() {
    let host = Local::new();
    let p = Harness::provider(&host).await;
    let spec = spec_for(&host, p.as_ref(), &random_node_id(), host.label());
    let id = p.create_instance(&spec).await.expect("create");
    let inst = p.wait_for_instance(&id, &spec).await.expect("wait");
    assert_eq!(inst.status, InstanceStatus::Active);
    assert_eq!(inst.interface_ip.as_deref(), Some("127.0.0.1"));
    let mut console = String::new();
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(60);
    while !console.contains(nodepool_qemu::STUB_BANNER) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the stub's banner never reached the console: {console:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        console = p.console_log(&id).await.expect("console_log");
    }
    p.delete_instance(&id).await.expect("delete");
    let e = p.console_log(&id).await.expect_err("gone");
    assert!(
        matches!(e, nodepool_model::provider::ProviderError::NotFound(_)),
        "{e:?}"
    );
}

/// Each VM gets its own host port forwarded to the guest's SSH port: the
/// node's `connection-port`; QEMU listens on it while the VM runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_vm_forwards_its_own_port() {
    let host = Local::new();
    let p = Harness::provider(&host).await;
    let a = spec_for(&host, p.as_ref(), &random_node_id(), host.label());
    let b = spec_for(&host, p.as_ref(), &random_node_id(), host.label());
    let ida = p.create_instance(&a).await.expect("create a");
    let idb = p.create_instance(&b).await.expect("create b");
    let ia = p.wait_for_instance(&ida, &a).await.expect("wait a");
    let ib = p.wait_for_instance(&idb, &b).await.expect("wait b");
    let pa = p.connection_port(&ia).expect("a has a port");
    let pb = p.connection_port(&ib).expect("b has a port");
    assert_ne!(pa, pb);
    for port in [pa, pb] {
        std::net::TcpStream::connect(("127.0.0.1", port))
            .unwrap_or_else(|e| panic!("qemu listens on {port}: {e}"));
    }
    p.delete_instance(&ida).await.expect("delete a");
    p.delete_instance(&idb).await.expect("delete b");
    assert_eq!(p.get_instance(&ida).await.expect("get"), None);
}

/// The config drive is OpenStack's: label `config-2`,
/// `openstack/latest/meta_data.json` with the public key, the hostname and
/// the node's metadata; the label's user data beside it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_config_drive_carries_key_hostname_and_metadata() {
    let host = Local::new();
    let p = Harness::provider(&host).await;
    let node = random_node_id();
    let spec = spec_for(&host, p.as_ref(), &node, host.label());
    let id = p.create_instance(&spec).await.expect("create");
    let drive = host
        .image_dir
        .join("servers")
        .join(&id)
        .join("config-drive.img");
    let read = |file: &str| {
        let out = std::process::Command::new("mcopy")
            .env("MTOOLS_SKIP_CHECK", "1")
            .arg("-i")
            .arg(&drive)
            .arg(format!("::openstack/latest/{file}"))
            .arg("-")
            .output()
            .expect("mcopy runs");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).expect("utf-8")
    };
    let meta: serde_json::Value = serde_json::from_str(&read("meta_data.json")).expect("json");
    let user_data = read("user_data");
    let label = std::process::Command::new("/sbin/fatlabel")
        .arg(&drive)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned());
    p.delete_instance(&id).await.expect("delete");
    assert_eq!(meta["hostname"], spec.name.as_str());
    assert_eq!(meta["uuid"], id.as_str());
    assert_eq!(meta["public_keys"]["nodepool"], PUBLIC_KEY);
    assert_eq!(meta["meta"]["nodepool_node_id"], node.as_str());
    assert_eq!(meta["meta"]["nodepool_provider_name"], "local");
    assert_eq!(user_data, "echo hello");
    assert_eq!(label.expect("fatlabel runs").to_lowercase(), "config-2");
    assert!(
        !host.image_dir.join("servers").join(&id).exists(),
        "the server directory is removed"
    );
}

/// `accelerator: auto` never picks a KVM that does not run guests: on any
/// host the guest it starts VMs with prints its banner.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_picks_an_accelerator_whose_guests_run() {
    let host = Local::new();
    let yaml = std::fs::read_to_string(&host.config_path)
        .expect("config")
        .replace("accelerator: tcg", "accelerator: auto");
    let cfg = support::config(&yaml);
    let p = nodepool_qemu::QemuProvider::new(&cfg.providers[0]).expect("provider");
    let accel = p.accelerator().await;
    assert!(accel == "kvm" || accel == "tcg", "{accel}");
    eprintln!("accelerator: auto chose {accel} on this host");
    host.stub_image(&p).await;
    let spec = spec_for(&host, &p, &random_node_id(), host.label());
    let id = p.create_instance(&spec).await.expect("create");
    let dir = p.server_dir(&id);
    let cmdline = std::fs::read_to_string(dir.join("qemu.pid"))
        .ok()
        .and_then(|pid| std::fs::read(format!("/proc/{}/cmdline", pid.trim())).ok())
        .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
        .unwrap_or_default();
    let mut console = String::new();
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(60);
    while !console.contains(nodepool_qemu::STUB_BANNER) && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        console = p.console_log(&id).await.expect("console_log");
    }
    p.delete_instance(&id).await.expect("delete");
    assert!(
        cmdline.contains(&format!("-accel {accel}")),
        "the VM runs with the chosen accelerator: {cmdline}"
    );
    assert!(
        console.contains(nodepool_qemu::STUB_BANNER),
        "the guest ran under {accel}: {console:?}"
    );
}

/// A snapshot of a running VM (its overlay, copied while the VM is
/// paused) is an image a new VM boots: the stub's banner reaches the new
/// VM's console; the snapshotted VM runs on; deleting the image removes
/// its directory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_of_a_running_vm_boots_and_deleting_it_removes_its_file() {
    let host = Local::new();
    let p = Harness::provider(&host).await;
    let spec = spec_for(&host, p.as_ref(), &random_node_id(), host.label());
    let id = p.create_instance(&spec).await.expect("create");
    p.wait_for_instance(&id, &spec).await.expect("wait");
    let mut properties = indexmap::IndexMap::new();
    properties.insert("nodepool_provider_name".to_owned(), "local".to_owned());
    let snap = SnapshotSpec {
        name: "snapped".into(),
        properties: properties.clone(),
        timeout: std::time::Duration::from_secs(60),
    };
    let image = p.snapshot_instance(&id, &snap).await.expect("snapshot");
    let disk = host
        .image_dir
        .join("images")
        .join(&image)
        .join("disk.qcow2");
    assert!(disk.is_file(), "{} is written", disk.display());
    let info = p
        .list_images()
        .await
        .expect("list_images")
        .into_iter()
        .find(|i| i.id == image)
        .expect("the snapshot is listed");
    assert_eq!(info.name, "snapped");
    assert_eq!(info.properties, properties);
    let still = p.get_instance(&id).await.expect("get").expect("exists");
    assert_eq!(still.status, InstanceStatus::Active, "the VM runs on");
    p.delete_instance(&id)
        .await
        .expect("delete the snapshotted VM");

    let mut from = spec_for(&host, p.as_ref(), &random_node_id(), host.label());
    from.image = ImageRef::Uploaded {
        external_id: image.clone(),
    };
    let id2 = p.create_instance(&from).await.expect("boot the snapshot");
    p.wait_for_instance(&id2, &from).await.expect("wait");
    let mut console = String::new();
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(60);
    while !console.contains(nodepool_qemu::STUB_BANNER) && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        console = p.console_log(&id2).await.expect("console_log");
    }
    p.delete_instance(&id2).await.expect("delete");
    assert!(
        console.contains(nodepool_qemu::STUB_BANNER),
        "the VM booted from the snapshot runs the stub: {console:?}"
    );
    p.delete_image(&image).await.expect("delete_image");
    assert!(
        !host.image_dir.join("images").join(&image).exists(),
        "deleting the image removes its directory"
    );
    let missing = p
        .snapshot_instance(&id, &snap)
        .await
        .expect_err("a deleted server cannot be snapshotted");
    assert!(matches!(missing, ProviderError::NotFound(_)), "{missing:?}");
}
