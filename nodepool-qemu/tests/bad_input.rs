//! Bad input gets one located error: QEMU missing at provider start, an
//! image directory that cannot be written, wrong qemu keys at load.

use nodepool_model::config::Config;
use nodepool_model::provider::ProviderError;
use nodepool_qemu::QemuProvider;

mod support;

use support::{config, config_yaml};

fn start_error(yaml: &str) -> String {
    let cfg = config(yaml);
    match QemuProvider::new(&cfg.providers[0]) {
        Err(ProviderError::InvalidRequest(m)) => m,
        Err(e) => panic!("expected InvalidRequest, got {e:?}"),
        Ok(_) => panic!("the provider started"),
    }
}

#[test]
fn missing_qemu_is_one_located_error_at_provider_start() {
    let dir = tempfile::tempdir().expect("tempdir");
    let m = start_error(&config_yaml(
        &dir.path().join("vms"),
        "    qemu-binary: /nonexistent/qemu-system-x86_64",
    ));
    assert!(
        m.starts_with("providers[name=local].qemu-binary: program \"/nonexistent/qemu-system-x86_64\" does not exist"),
        "{m}"
    );
    assert!(m.contains("scripts/qemu.sh install"), "{m}");
    let m = start_error(&config_yaml(
        &dir.path().join("vms"),
        "    qemu-binary: no-such-qemu-anywhere",
    ));
    assert!(
        m.contains("qemu-binary: program \"no-such-qemu-anywhere\" is not found on PATH"),
        "{m}"
    );
}

#[test]
fn an_image_dir_that_cannot_be_written_is_a_located_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    // A path under a regular file cannot be created, even by root.
    let file = dir.path().join("a-file");
    std::fs::write(&file, b"").expect("write");
    let m = start_error(&config_yaml(&file.join("vms"), ""));
    assert!(m.starts_with("providers[name=local].image-dir: "), "{m}");
    assert!(m.contains("cannot be written"), "{m}");
    assert!(m.contains(&file.display().to_string()), "{m}");
}

#[test]
fn an_unreadable_public_key_is_a_located_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let m = start_error(&config_yaml(
        &dir.path().join("vms"),
        "    public-key: /nonexistent/id.pub",
    ));
    assert!(
        m.starts_with("providers[name=local].public-key: /nonexistent/id.pub"),
        "{m}"
    );
}

#[test]
fn wrong_qemu_keys_are_located_config_errors() {
    let yaml = "labels: [{name: a}]\nproviders:\n  - name: local\n    driver: qemu\n    accelerator: warp\n    flavors: [{name: x, vcpus: 0, ram: 64}]\n    quota: {ram: -1}\n    pools: []\n";
    let text = Config::from_yaml(yaml).expect_err("invalid").to_string();
    for want in [
        "providers[0].image-dir",
        "providers[0].accelerator: unknown accelerator `warp` (one of: auto, kvm, tcg)",
        "providers[0].flavors[0].vcpus: must be at least 1, found 0",
        "providers[0].quota.ram: must not be negative, found -1",
    ] {
        assert!(text.contains(want), "{want:?} in {text}");
    }
    let other = "labels: [{name: a}]\nproviders:\n  - name: sim\n    driver: simulated\n    image-dir: /tmp/x\n    pools: []\n";
    let text = Config::from_yaml(other)
        .expect_err("not a qemu key")
        .to_string();
    assert!(text.contains("providers[0].image-dir"), "{text}");
}

/// A flavor asking for more memory than the host has available is refused
/// as a quota error at launch, even with no configured RAM quota.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_larger_than_the_hosts_memory_is_a_quota_error() {
    use nodepool_model::conformance::provider::{random_node_id, spec_for};
    use nodepool_model::provider::Provider;
    let host = support::Local::new();
    let yaml = std::fs::read_to_string(&host.config_path)
        .expect("config")
        .replace(", ram: 2048}", "}")
        .replace("ram: 4096}", "ram: 1073741824}");
    let cfg = config(&yaml);
    let p = QemuProvider::new(&cfg.providers[0]).expect("provider");
    host.stub_image(&p).await;
    let label = support::pool_label(&cfg.providers[0], "huge");
    let spec = spec_for(&host, &p, &random_node_id(), label);
    match p.create_instance(&spec).await {
        Err(ProviderError::QuotaExceeded(m)) => {
            assert!(m.contains("host memory"), "{m}");
        }
        other => panic!("expected a quota error, got {other:?}"),
    }
    assert!(p.list_instances().await.expect("list").is_empty());
}
