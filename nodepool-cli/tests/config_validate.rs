//! `nodepool config-validate` as a real process.

use std::path::PathBuf;
use std::process::Command;

fn nodepool() -> Command {
    Command::new(env!("CARGO_BIN_EXE_nodepool"))
}

fn examples() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples")
}

#[test]
fn a_valid_config_exits_zero() {
    let out = nodepool()
        .args(["config-validate", "-c"])
        .arg(examples().join("multi-cloud.yaml"))
        .output()
        .expect("runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("valid (8 labels, 6 providers"));
}

#[test]
fn a_secure_file_is_merged() {
    let out = nodepool()
        .arg("-c")
        .arg(examples().join("minimal-openstack.yaml"))
        .arg("-s")
        .arg(examples().join("secure.yaml"))
        .arg("config-validate")
        .output()
        .expect("runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn an_invalid_config_exits_one_with_every_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("bad.yaml");
    std::fs::write(
        &file,
        "labels:\n  - name: a\n    min_ready: 1\nproviders:\n  - name: p\n    driver: aws\n",
    )
    .expect("write");
    let out = nodepool()
        .args(["config-validate", "-c"])
        .arg(&file)
        .output()
        .expect("runs");
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("2 configuration errors"), "{err}");
    assert!(
        err.contains("labels[0].min_ready: unknown key `min_ready`; did you mean `min-ready`?"),
        "{err}"
    );
    assert!(
        err.contains("providers[0].driver: driver `aws` is not supported"),
        "{err}"
    );
    assert!(out.stdout.is_empty());
}

#[test]
fn a_missing_file_names_it() {
    let out = nodepool()
        .args(["config-validate", "-c", "/nonexistent/nodepool.yaml"])
        .output()
        .expect("runs");
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/nodepool.yaml"));
}

#[test]
fn no_subcommand_prints_help_and_exits_one() {
    let out = nodepool().output().expect("runs");
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("config-validate"));
}

#[test]
fn version_and_help() {
    let out = nodepool().arg("--version").output().expect("runs");
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("nodepool "));
    let out = nodepool().arg("--help").output().expect("runs");
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("Check the configuration file"));
}
