//! Ready scripts in the configuration (seeds 002 and 003): `script-dir`,
//! `labels[].ready-script` (the seed's spelling) and the pool label's own
//! `ready-script` / `ready-script-timeout`, the image's `username` and
//! `private-key`; each mistake is an error at its place.

use std::path::Path;
use std::time::Duration;

use nodepool_model::config::{
    Config, ConfigErrorKind as K, ConfigErrors, DEFAULT_READY_SCRIPT_TIMEOUT,
};

/// A config directory with `scripts/ready.sh` and `id_test` (a key file).
fn dir() -> tempfile::TempDir {
    let d = tempfile::tempdir().expect("tempdir");
    std::fs::create_dir(d.path().join("scripts")).expect("mkdir");
    std::fs::write(d.path().join("scripts/ready.sh"), "#!/bin/sh\ntrue\n").expect("script");
    std::fs::write(d.path().join("id_test"), "not parsed at load\n").expect("key");
    d
}

/// Two labels: `small` (seed spelling: the label's `ready-script`) from a
/// cloud image, `large` (the pool label's own script and timeout) from a
/// diskimage. `{ci}` and `{di}` extend the images' keys.
fn yaml(script_dir: &str, ci: &str, di: &str) -> String {
    format!(
        r#"
{script_dir}
labels:
  - name: small
    ready-script: ready.sh
  - name: large
diskimages:
  - name: jammy
    elements: [ubuntu]
{di}
providers:
  - name: cloud1
    cloud: mycloud
    diskimages:
      - name: jammy
    cloud-images:
      - name: cirros
        image-name: cirros-0.6
{ci}
    pools:
      - name: main
        labels:
          - name: small
            cloud-image: cirros
            min-ram: 512
          - name: large
            diskimage: jammy
            min-ram: 512
            ready-script: ready.sh
            ready-script-timeout: 7
"#
    )
}

const CI_LOGIN: &str = "        username: cirros\n        private-key: id_test";
const DI_LOGIN: &str = "    private-key: id_test";

fn load(d: &Path, text: &str) -> Result<Config, ConfigErrors> {
    Config::from_yaml_with_secure(text, None, Some(d))
}

#[track_caller]
fn error_at(d: &Path, text: &str, path: &str, kind: K) -> String {
    let e = load(d, text).expect_err("the configuration should be refused");
    let found = e.errors.iter().find(|x| x.path == path && x.kind == kind);
    match found {
        Some(x) => x.message.clone(),
        None => panic!("expected {kind:?} at {path}, got:\n{e}"),
    }
}

#[test]
fn ready_scripts_resolve_against_script_dir_and_inherit_from_labels() {
    let d = dir();
    let cfg = load(d.path(), &yaml("script-dir: scripts", CI_LOGIN, DI_LOGIN)).expect("valid");
    assert_eq!(
        cfg.script_dir.as_deref(),
        Some(d.path().join("scripts").as_path())
    );
    assert_eq!(cfg.labels[0].ready_script.as_deref(), Some("ready.sh"));
    let pool = &cfg.providers[0].pools[0];
    let small = pool
        .ready_script("small")
        .expect("inherited from the label");
    assert_eq!(small.path, d.path().join("scripts/ready.sh"));
    assert_eq!(small.timeout, DEFAULT_READY_SCRIPT_TIMEOUT);
    assert_eq!(small.configured_at, "labels[0].ready-script");
    let large = pool.ready_script("large").expect("the pool label's own");
    assert_eq!(large.timeout, Duration::from_secs(7));
    assert_eq!(
        large.configured_at,
        "providers[0].pools[0].labels[1].ready-script"
    );
    let ci = cfg.providers[0].cloud_image("cirros").expect("cloud image");
    assert_eq!(
        ci.private_key.as_deref(),
        Some(d.path().join("id_test").as_path())
    );
    assert_eq!(
        cfg.diskimage("jammy").and_then(|i| i.private_key.clone()),
        Some(d.path().join("id_test"))
    );
}

#[test]
fn a_missing_script_file_is_an_error_where_it_is_named() {
    let d = dir();
    std::fs::remove_file(d.path().join("scripts/ready.sh")).expect("rm");
    let text = yaml("script-dir: scripts", CI_LOGIN, DI_LOGIN);
    let m = error_at(d.path(), &text, "labels[0].ready-script", K::InvalidValue);
    assert!(m.contains("ready.sh") && m.contains("not a file"), "{m}");
    error_at(
        d.path(),
        &text,
        "providers[0].pools[0].labels[1].ready-script",
        K::InvalidValue,
    );
}

#[test]
fn a_ready_script_without_script_dir_is_an_error() {
    let d = dir();
    let m = error_at(
        d.path(),
        &yaml("", CI_LOGIN, DI_LOGIN),
        "labels[0].ready-script",
        K::Conflict,
    );
    assert!(m.contains("script-dir"), "{m}");
}

#[test]
fn a_ready_script_needs_the_images_username_and_private_key() {
    let d = dir();
    let m = error_at(
        d.path(),
        &yaml("script-dir: scripts", "", DI_LOGIN),
        "providers[0].pools[0].labels[0]",
        K::Conflict,
    );
    assert!(
        m.contains("`username` and `private-key`") && m.contains("providers[0].cloud-images[0]"),
        "{m}"
    );
    // A diskimage's user defaults to `zuul`: only the key is missing.
    let m = error_at(
        d.path(),
        &yaml("script-dir: scripts", CI_LOGIN, ""),
        "providers[0].pools[0].labels[1]",
        K::Conflict,
    );
    assert!(
        m.contains("set `private-key` on diskimages[0]") && !m.contains("username"),
        "{m}"
    );
}

#[test]
fn an_unreadable_private_key_is_an_error_at_the_key() {
    let d = dir();
    let ci = "        username: cirros\n        private-key: missing_key";
    let m = error_at(
        d.path(),
        &yaml("script-dir: scripts", ci, DI_LOGIN),
        "providers[0].cloud-images[0].private-key",
        K::InvalidValue,
    );
    assert!(
        m.contains("missing_key") && m.contains("cannot read"),
        "{m}"
    );
}

#[test]
fn keys_without_ready_scripts_are_not_read() {
    // A migrated seed keeps `$HOME/.ssh/id_rsa`; without a ready script
    // the file is never needed.
    let d = dir();
    let text = yaml(
        "script-dir: $HOME/scripts",
        "        username: cirros\n        private-key: $HOME/.ssh/id_rsa",
        "",
    )
    .lines()
    .filter(|l| !l.trim_start().starts_with("ready-script:"))
    .collect::<Vec<_>>()
    .join("\n");
    let cfg = load(d.path(), &text).expect("valid");
    assert!(cfg.providers[0].pools[0].ready_scripts.is_empty());
}
