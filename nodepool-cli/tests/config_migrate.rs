//! `nodepool config-migrate` as a real process on seed 003's legacy
//! sample: the new nodepool.yaml and clouds.yaml pass `nodepool
//! config-validate` (run as a real process too), the report names what was
//! dropped, no password is printed, and files are never overwritten
//! without `--force`.

mod common;

use std::path::{Path, PathBuf};

use common::{Out, run_process};

/// The password seed 003's sample carries (a placeholder, but a password).
const PASSWORD: &str = "$OS_PASSWORD";

fn seed_003() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/seed-003-nodepool.yaml")
}

/// `nodepool ARGS` in `dir`, with `dir` as `HOME` and no cloud settings
/// from the caller except `OS_CLIENT_CONFIG_FILE` when given.
async fn nodepool(dir: &Path, args: &[&str], clouds: Option<&Path>) -> Out {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_nodepool"));
    cmd.args(args)
        .current_dir(dir)
        .env("HOME", dir)
        .env_remove("XDG_CONFIG_HOME")
        .env_remove("OS_CLOUD")
        .env_remove("OS_CLIENT_SECURE_FILE")
        .env_remove("OS_CLIENT_CONFIG_FILE");
    if let Some(c) = clouds {
        cmd.env("OS_CLIENT_CONFIG_FILE", c);
    }
    run_process(cmd, "").await
}

fn s(p: &Path) -> String {
    p.display().to_string()
}

#[tokio::test]
async fn seed_003_migrates_to_a_configuration_that_validates() {
    let dir = tempfile::tempdir().unwrap();
    let new = dir.path().join("nodepool.yaml");
    let clouds = dir.path().join("clouds.yaml");
    let out = nodepool(
        dir.path(),
        &[
            "config-migrate",
            &s(&seed_003()),
            "--output",
            &s(&new),
            "--clouds-output",
            &s(&clouds),
        ],
        None,
    )
    .await;
    out.ok();
    for needle in [
        "dburi: dropped",
        "cron: dropped",
        "zmq-publishers: dropped",
        "targets: dropped",
        "became snapshot image `tripleo-precise`",
        "service-type: dropped",
        "moved to clouds.yaml as cloud `tripleo-test-cloud`",
    ] {
        assert!(
            out.stderr.contains(needle),
            "{needle} not in:\n{}",
            out.stderr
        );
    }
    assert!(!out.stderr.contains(PASSWORD), "{}", out.stderr);
    let config = std::fs::read_to_string(&new).unwrap();
    assert!(!config.contains(PASSWORD), "{config}");
    assert!(config.contains("max-servers: 2"), "{config}");
    assert!(config.contains("min-ready: 2"), "{config}");
    // Seed 002's snapshot image: provider `images` over a cloud image of
    // its base, booted by its labels by name.
    assert!(config.contains("diskimage: tripleo-precise"), "{config}");
    assert!(
        config.contains("setup: prepare_node_tripleo.sh"),
        "{config}"
    );
    assert!(config.contains("name: tripleo-precise-base"), "{config}");
    // The ready scripts' directory and login are carried (seeds 002, 003).
    assert!(config.contains("script-dir:"), "{config}");
    assert!(
        config.contains("private-key: $HOME/.ssh/id_rsa"),
        "{config}"
    );
    let cloud_text = std::fs::read_to_string(&clouds).unwrap();
    assert!(cloud_text.contains(PASSWORD), "{cloud_text}");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&clouds).unwrap().permissions().mode();
    assert_eq!(mode & 0o077, 0, "clouds.yaml is private: {mode:o}");

    assert!(
        out.stderr.contains("keeps the placeholders of"),
        "{}",
        out.stderr
    );

    // The seed's `$HOME` placeholders become this test's files: the
    // setup script and the key it logs in with must exist.
    let home = dir.path().display().to_string();
    let scripts = dir
        .path()
        .join("src/config/modules/openstack_project/files/nodepool/scripts");
    std::fs::create_dir_all(&scripts).unwrap();
    std::fs::write(scripts.join("prepare_node_tripleo.sh"), "#!/bin/sh\n").unwrap();
    std::fs::create_dir_all(dir.path().join(".ssh")).unwrap();
    std::fs::write(dir.path().join(".ssh/id_rsa"), "key\n").unwrap();
    std::fs::write(&new, config.replace("$HOME", &home)).unwrap();
    nodepool(
        dir.path(),
        &["-c", &s(&new), "config-validate", "--no-clouds"],
        None,
    )
    .await
    .ok();
    // The seed says to replace its `$VARS` with real values; the endpoint
    // is the one the clouds check insists on.
    std::fs::write(
        &clouds,
        cloud_text.replace("$CLOUD_ENDPOINT", "https://keystone.example.org:5000/v3"),
    )
    .unwrap();
    let valid = nodepool(
        dir.path(),
        &["-c", &s(&new), "config-validate"],
        Some(&clouds),
    )
    .await;
    valid.ok();
    assert!(!valid.stdout.contains(PASSWORD) && !valid.stderr.contains(PASSWORD));
}

#[tokio::test]
async fn existing_files_are_kept_without_force() {
    let dir = tempfile::tempdir().unwrap();
    let new = dir.path().join("new.yaml");
    std::fs::write(&new, "keep me").unwrap();
    let args = ["config-migrate", &s(&seed_003()), "--output", &s(&new)];
    nodepool(dir.path(), &args, None)
        .await
        .fails_with("pass --force");
    assert_eq!(std::fs::read_to_string(&new).unwrap(), "keep me");
    // Neither file was written: the default clouds.yaml sits beside --output.
    assert!(!dir.path().join("clouds.yaml").exists());

    let mut forced = args.to_vec();
    forced.push("--force");
    nodepool(dir.path(), &forced, None).await.ok();
    assert!(
        std::fs::read_to_string(&new)
            .unwrap()
            .contains("providers:")
    );
    assert!(dir.path().join("clouds.yaml").exists());
}

#[tokio::test]
async fn unparsable_input_is_a_located_error() {
    let dir = tempfile::tempdir().unwrap();
    let old = dir.path().join("old.yaml");
    std::fs::write(&old, "providers:\n  - name: a\n    images: [\n").unwrap();
    let line = nodepool(dir.path(), &["config-migrate", &s(&old)], None)
        .await
        .fails_with("not valid YAML");
    assert!(line.contains(&format!("{}:4:", s(&old))), "{line}");
    assert!(!dir.path().join("clouds.yaml").exists());
}
