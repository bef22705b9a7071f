//! Every sample configuration in `examples/` validates.

use std::path::{Path, PathBuf};
use std::time::Duration;

use nodepool_core::config::{Config, Driver, ImageSource, StateStoreConfig};

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn every_example_config_validates() {
    let mut checked = 0;
    for entry in std::fs::read_dir(dir()).expect("examples dir") {
        let path = entry.expect("entry").path();
        let is_yaml = path.extension().is_some_and(|e| e == "yaml");
        if !is_yaml || path.file_name().is_some_and(|n| n == "secure.yaml") {
            continue;
        }
        if let Err(e) = Config::load(&path, None) {
            panic!("{e}");
        }
        checked += 1;
    }
    assert!(checked >= 4, "only {checked} example configs found");
}

#[test]
fn the_secure_example_merges_into_the_minimal_one() {
    let cfg = Config::load(
        dir().join("minimal-openstack.yaml"),
        Some(&dir().join("secure.yaml")),
    )
    .expect("valid");
    assert_eq!(cfg.zookeeper_servers.len(), 1);
    assert_eq!(cfg.zookeeper_servers[0].host, "zk-internal.example.org");
    let tls = cfg.zookeeper_tls.as_ref().expect("tls");
    assert_eq!(tls.cert, Path::new("/etc/nodepool/secure/client.pem"));
    let image = cfg.diskimage("ubuntu-jammy").expect("image");
    assert_eq!(image.env_vars["DIB_REPO_PASSWORD"], "not-a-real-password");
    assert_eq!(image.env_vars["DIB_CHECKSUM"], "1");
    assert_eq!(
        cfg.zookeeper_hosts(),
        "zk-internal.example.org:2281/nodepool"
    );
}

#[test]
fn the_quickstart_uses_the_embedded_defaults() {
    let cfg = Config::load(dir().join("quickstart.yaml"), None).expect("valid");
    match &cfg.state_store {
        StateStoreConfig::Sqlite { path, .. } => {
            assert_eq!(path, &dir().join("nodepool-quickstart.db"));
        }
        other => panic!("unexpected store {other:?}"),
    }
    assert!(matches!(cfg.providers[0].driver, Driver::Simulated(_)));
    assert_eq!(cfg.label("ubuntu-jammy").expect("label").min_ready, 2);
}

#[test]
fn the_multi_cloud_example_resolves_inheritance_and_defaults() {
    let cfg = Config::load(dir().join("multi-cloud.yaml"), None).expect("valid");
    assert_eq!(cfg.providers.len(), 6);
    assert_eq!(cfg.labels.len(), 8);
    // abstract images are templates only
    assert!(cfg.diskimage("base").is_none());
    assert!(cfg.diskimage("ubuntu-base").is_none());
    let jammy = cfg.diskimage("ubuntu-jammy").expect("jammy");
    assert_eq!(
        jammy.elements,
        [
            "vm",
            "simple-init",
            "openstack-repos",
            "nodepool-base",
            "cache-devstack",
            "growroot",
            "infra-package-needs",
            "ubuntu-minimal"
        ]
    );
    assert_eq!(jammy.env_vars["TMPDIR"], "/opt/dib_tmp");
    assert_eq!(jammy.env_vars["DIB_APT_LOCAL_CACHE"], "0");
    assert_eq!(jammy.rebuild_age, Duration::from_secs(604_800));
    assert!(jammy.delete_after_upload);
    assert_eq!(jammy.keep_formats, ["qcow2"]);
    let arm = cfg.diskimage("ubuntu-jammy-arm64").expect("arm");
    assert_eq!(arm.rebuild_age, Duration::from_secs(172_800));
    assert_eq!(arm.env_vars["ARCH"], "arm64");
    assert_eq!(cfg.diskimage("fedora-40").expect("fedora").release, "40");
    assert!(cfg.diskimage("fedora-40").expect("fedora").pause);
    // YAML anchors share label lists between regions
    let iad = cfg.provider("rax-iad").expect("iad");
    assert_eq!(iad.pools[0].labels.len(), 6);
    assert!(
        matches!(&iad.pools[0].labels[0].image, ImageSource::DiskImage(d) if d == "ubuntu-noble")
    );
    // the drained region
    assert!(cfg.provider("rax-ord").expect("ord").is_disabled());
    assert!(!iad.is_disabled());
    // defaults from the code column
    assert_eq!(iad.launch_retries, 3);
    assert_eq!(iad.port_cleanup_interval, Some(Duration::from_secs(600)));
    assert_eq!(cfg.provider("ovh-bhs1").expect("ovh").rate, 0.1);
    assert_eq!(
        cfg.tenant_resource_limits["openstack"].get("instances"),
        Some(600)
    );
    assert_eq!(
        cfg.diskimage_formats("ubuntu-jammy")
            .into_iter()
            .collect::<Vec<_>>(),
        ["qcow2"]
    );
}

#[test]
fn the_external_example_runs_the_example_program() {
    let cfg = Config::load(dir().join("external.yaml"), None).expect("valid");
    let Driver::External(program) = &cfg.providers[0].driver else {
        panic!("driver: {:?}", cfg.providers[0].driver);
    };
    assert_eq!(
        Path::new(program.program()),
        dir().join("external_provider/example_cloud.py"),
        "the program path is resolved against the config's directory"
    );
    assert_eq!(program.timeout, Duration::from_secs(30));
}

#[test]
fn the_local_vms_example_boots_a_dib_image_in_qemu() {
    let cfg = Config::load(dir().join("local-vms.yaml"), None).expect("valid");
    let p = &cfg.providers[0];
    let Driver::Qemu(host) = &p.driver else {
        panic!("driver {}", p.driver.name());
    };
    assert_eq!(host.image_dir, Path::new("/var/lib/nodepool/vms"));
    assert_eq!(host.accelerator, nodepool_core::config::Accelerator::Tcg);
    assert_eq!(host.qemu_binary, nodepool_core::config::DEFAULT_QEMU_BINARY);
    assert_eq!(host.flavors.len(), 2);
    assert_eq!(host.quota.get(nodepool_core::model::RAM), Some(8192));
    let label = p.pools[0].label("debian-bookworm").expect("label");
    assert_eq!(
        label.image,
        ImageSource::DiskImage("debian-bookworm".into())
    );
    assert_eq!(
        p.diskimage("debian-bookworm").expect("upload").config_drive,
        Some(true)
    );
    assert!(
        cfg.diskimage("debian-bookworm")
            .expect("diskimage")
            .elements
            .contains(&"simple-init".to_string())
    );
}
