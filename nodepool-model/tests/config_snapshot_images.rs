//! Snapshot images in the configuration (seed 002, seed 003's provider
//! `images:`): `name`, `base-image` (a cloud image or diskimage of the
//! provider), `setup` in `script-dir`, the login, the setup server's size,
//! `rebuild-age`, `pause`, `validate`; pool labels boot them with
//! `diskimage: NAME`; each mistake is an error at its place.

use std::path::Path;
use std::time::Duration;

use nodepool_model::config::{
    Config, ConfigErrorKind as K, ConfigErrors, DEFAULT_SETUP_TIMEOUT, ImageSource,
};

/// A config directory with `scripts/setup.sh`, `scripts/check.sh` and
/// `id_test` (a key file).
fn dir() -> tempfile::TempDir {
    let d = tempfile::tempdir().expect("tempdir");
    std::fs::create_dir(d.path().join("scripts")).expect("mkdir");
    for s in ["setup.sh", "check.sh"] {
        std::fs::write(d.path().join("scripts").join(s), "#!/bin/sh\ntrue\n").expect("script");
    }
    std::fs::write(d.path().join("id_test"), "not parsed at load\n").expect("key");
    d
}

/// Provider `cloud1` with cloud image `cirros`, diskimage `jammy` and
/// snapshot images `{images}` (YAML lines indented by six); label `small`
/// boots `{boots}`.
fn yaml(images: &str, boots: &str) -> String {
    format!(
        r#"
script-dir: scripts
labels:
  - name: small
diskimages:
  - name: jammy
    elements: [ubuntu]
providers:
  - name: cloud1
    cloud: mycloud
    diskimages:
      - name: jammy
    cloud-images:
      - name: cirros
        image-name: cirros-0.6
    images:
{images}
    pools:
      - name: main
        labels:
          - name: small
            diskimage: {boots}
            min-ram: 512
  - name: cloud2
    cloud: othercloud
    cloud-images:
      - name: cirros
    images:
      - {{name: other, base-image: cirros, setup: setup.sh, username: u, private-key: id_test, min-ram: 1}}
    pools:
      - name: main
        labels:
          - {{name: small, diskimage: other, min-ram: 1}}
"#
    )
}

const PREPARED: &str = "      - name: prepared
        base-image: cirros
        setup: setup.sh
        username: jenkins
        private-key: id_test
        min-ram: 8192";

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
fn a_snapshot_image_is_read_with_its_defaults_and_labels_boot_it() {
    let d = dir();
    let extra = "      - name: from-dib
        base-image: jammy
        setup: setup.sh
        setup-timeout: 600
        username: root
        private-key: id_test
        flavor-name: big
        rebuild-age: 3600
        pause: true
        validate: {script: check.sh, timeout: 30}";
    let cfg = load(d.path(), &yaml(&format!("{PREPARED}\n{extra}"), "prepared"))
        .unwrap_or_else(|e| panic!("{e}"));
    let p = &cfg.providers[0];
    let img = p.snapshot_image("prepared").expect("snapshot image");
    assert_eq!(img.base_image, "cirros");
    assert_eq!(
        p.snapshot_base(img),
        Some(ImageSource::CloudImage("cirros".into()))
    );
    assert_eq!(img.setup.path, d.path().join("scripts/setup.sh"));
    assert_eq!(img.setup.timeout, DEFAULT_SETUP_TIMEOUT);
    assert_eq!(img.username, "jenkins");
    assert_eq!(img.private_key, d.path().join("id_test"));
    assert_eq!(img.min_ram, Some(8192));
    assert_eq!(img.rebuild_age, Duration::from_secs(86_400));
    assert!(!img.pause);
    assert_eq!(img.validate, None);
    assert_eq!(img.configured_at, "providers[0].images[0]");
    assert_eq!(
        p.pools[0].labels[0].image,
        ImageSource::DiskImage("prepared".into())
    );

    let dib = p.snapshot_image("from-dib").expect("snapshot image");
    assert_eq!(
        p.snapshot_base(dib),
        Some(ImageSource::DiskImage("jammy".into()))
    );
    assert_eq!(dib.setup.timeout, Duration::from_secs(600));
    assert_eq!(dib.flavor_name.as_deref(), Some("big"));
    assert_eq!(dib.rebuild_age, Duration::from_secs(3600));
    assert!(dib.pause);
    let v = dib.validate.as_ref().expect("validate");
    assert_eq!(v.path, d.path().join("scripts/check.sh"));
    assert_eq!(v.timeout, Duration::from_secs(30));
}

#[test]
fn each_mistake_is_named_at_its_place() {
    let d = dir();
    let at = "providers[0].images[0]";
    // The setup script must be in script-dir.
    let m = error_at(
        d.path(),
        &yaml(&PREPARED.replace("setup.sh", "nope.sh"), "prepared"),
        &format!("{at}.setup"),
        K::InvalidValue,
    );
    assert!(m.contains("setup script \"nope.sh\" not found"), "{m}");
    // The login is required.
    for key in ["username", "private-key"] {
        let without: String = PREPARED
            .lines()
            .filter(|l| !l.trim_start().starts_with(&format!("{key}:")))
            .collect::<Vec<_>>()
            .join("\n");
        error_at(
            d.path(),
            &yaml(&without, "prepared"),
            &format!("{at}.{key}"),
            K::MissingKey,
        );
    }
    // The key must be readable.
    let m = error_at(
        d.path(),
        &yaml(&PREPARED.replace("id_test", "missing_key"), "prepared"),
        &format!("{at}.private-key"),
        K::InvalidValue,
    );
    assert!(m.contains("cannot read private key"), "{m}");
    // The base image is one of the provider's.
    let m = error_at(
        d.path(),
        &yaml(
            &PREPARED.replace("base-image: cirros", "base-image: nope"),
            "prepared",
        ),
        &format!("{at}.base-image"),
        K::UnknownReference,
    );
    assert!(m.contains("unknown base image \"nope\""), "{m}");
    // A size is required for the setup server.
    let unsized_image = PREPARED.replace("        min-ram: 8192", "");
    error_at(d.path(), &yaml(&unsized_image, "prepared"), at, K::Conflict);
    // Names are shared with diskimages and other providers' images.
    let m = error_at(
        d.path(),
        &yaml(&PREPARED.replace("name: prepared", "name: jammy"), "jammy"),
        &format!("{at}.name"),
        K::Duplicate,
    );
    assert!(m.contains("is also a diskimage"), "{m}");
    error_at(
        d.path(),
        &yaml(&PREPARED.replace("name: prepared", "name: other"), "other"),
        "providers[1].images[0].name",
        K::Duplicate,
    );
    // A pool label boots its own provider's snapshot images only.
    let m = error_at(
        d.path(),
        &yaml(PREPARED, "other"),
        "providers[0].pools[0].labels[0].diskimage",
        K::UnknownReference,
    );
    assert!(m.contains("snapshot image of another provider"), "{m}");
}

/// A ready script on a label booting a snapshot image logs in with the
/// snapshot image's login.
#[test]
fn ready_scripts_on_snapshot_labels_use_the_images_login() {
    let d = dir();
    let text = yaml(PREPARED, "prepared").replace(
        "            diskimage: prepared\n            min-ram: 512",
        "            diskimage: prepared\n            min-ram: 512\n            ready-script: check.sh",
    );
    let cfg = load(d.path(), &text).unwrap_or_else(|e| panic!("{e}"));
    let rs = cfg.providers[0].pools[0]
        .ready_script("small")
        .expect("ready script");
    assert_eq!(rs.path, d.path().join("scripts/check.sh"));
}

#[test]
fn a_snapshot_boots_with_its_bases_config_drive() {
    let d = dir();
    let extra = "      - {name: from-dib, base-image: jammy, setup: setup.sh, username: root, private-key: id_test, min-ram: 1}";
    let text = yaml(&format!("{PREPARED}\n{extra}"), "prepared")
        .replacen(
            "      - name: jammy\n    cloud-images",
            "      - name: jammy\n        config-drive: true\n    cloud-images",
            1,
        )
        .replacen(
            "image-name: cirros-0.6",
            "image-name: cirros-0.6\n        config-drive: false",
            1,
        );
    let cfg = load(d.path(), &text).unwrap_or_else(|e| panic!("{e}"));
    let p = &cfg.providers[0];
    assert_eq!(p.config_drive_of("jammy"), Some(true));
    assert_eq!(p.config_drive_of("from-dib"), Some(true));
    assert_eq!(p.config_drive_of("cirros"), Some(false));
    assert_eq!(p.config_drive_of("prepared"), Some(false));
    assert_eq!(p.config_drive_of("unknown"), None);
    // Unset on the base: the cloud's default, for the snapshot too.
    assert_eq!(cfg.providers[1].config_drive_of("other"), None);
}
