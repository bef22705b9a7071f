//! Configuration parsing: defaults, inheritance, environment and secure
//! files, and one test per kind of invalid input, each checking the path
//! and the kind of the error.

use std::time::Duration;

use nodepool_model::config::{
    ApiFault, Config, ConfigErrorKind as K, ConfigErrors, ConfigSource, DEFAULT_SQLITE_PATH,
    Driver, ImageSource, StateStoreConfig,
};

const BASE: &str = r#"
labels:
  - name: small
    min-ready: 1
diskimages:
  - name: base
    abstract: true
    elements: [vm]
    env-vars: {A: "1", B: "1"}
  - name: jammy
    parent: base
    elements: [ubuntu]
    env-vars: {B: "2"}
    release: 22
providers:
  - name: cloud1
    cloud: mycloud
    diskimages:
      - name: jammy
    cloud-images:
      - name: cirros
        image-name: cirros-0.6
    pools:
      - name: main
        max-servers: 10
        labels:
          - name: small
            diskimage: jammy
            min-ram: 2048
"#;

fn parse(text: &str) -> Result<Config, ConfigErrors> {
    Config::from_yaml(text)
}

/// Asserts that `text` fails with an error of `kind` at `path`.
#[track_caller]
fn invalid(text: &str, path: &str, kind: K) -> ConfigErrors {
    match parse(text) {
        Ok(_) => panic!("expected an error at {path}"),
        Err(e) => {
            assert!(
                e.has(path, kind),
                "expected {kind:?} at {path}, got:\n{}",
                e.errors
                    .iter()
                    .map(|e| format!("  {e} ({:?})", e.kind))
                    .collect::<Vec<_>>()
                    .join("\n")
            );
            e
        }
    }
}

/// BASE with one substitution applied.
fn base_with(from: &str, to: &str) -> String {
    assert!(BASE.contains(from), "BASE lacks {from:?}");
    BASE.replacen(from, to, 1)
}

// ---------------------------------------------------------------- valid

#[test]
fn base_is_valid_with_code_defaults() {
    let cfg = parse(BASE).expect("valid");
    assert_eq!(
        cfg.state_store,
        StateStoreConfig::Sqlite {
            path: DEFAULT_SQLITE_PATH.into(),
            lease: None,
        }
    );
    assert_eq!(cfg.zookeeper_timeout, Duration::from_secs(10));
    assert_eq!(cfg.webapp.port, 8005);
    assert_eq!(cfg.webapp.listen_address, "0.0.0.0");
    assert_eq!(cfg.build_log_retention, Some(7));
    assert_eq!(cfg.max_hold_age, None);
    let p = &cfg.providers[0];
    assert_eq!(p.driver, Driver::OpenStack);
    assert_eq!(p.boot_timeout, Duration::from_secs(60));
    assert_eq!(p.launch_timeout, Duration::from_secs(3600));
    assert_eq!(p.launch_retries, 3);
    assert_eq!(p.image_upload_timeout, Duration::from_secs(3600));
    assert_eq!(p.rate, 1.0);
    assert!(!p.clean_floating_ips);
    assert_eq!(p.max_concurrency, None);
    assert_eq!(p.priority, 100);
    assert_eq!(p.image_name_format, "{image_name}-{timestamp}");
    let pool = &p.pools[0];
    assert!(pool.auto_floating_ip);
    assert!(pool.host_key_checking);
    assert_eq!(pool.max_cores, None);
    let label = &pool.labels[0];
    assert_eq!(label.volume_size, 50);
    assert!(!label.console_log);
    assert_eq!(p.diskimages[0].connection_port, 22);
    assert_eq!(p.cloud_images[0].python_path, "auto");
    let d = cfg.diskimage("jammy").expect("jammy");
    assert_eq!(d.elements, ["vm", "ubuntu"]);
    assert_eq!(d.env_vars["A"], "1");
    assert_eq!(d.env_vars["B"], "2");
    assert_eq!(d.release, "22");
    assert_eq!(d.rebuild_age, Duration::from_secs(86_400));
    assert_eq!(d.build_timeout, Duration::from_secs(8 * 3600));
    assert_eq!(d.username, "zuul");
    assert_eq!(d.python_path, "auto");
    assert_eq!(d.dib_cmd, "disk-image-create");
    assert!(cfg.diskimage("base").is_none());
}

#[test]
fn zookeeper_servers_select_the_zookeeper_store() {
    let cfg = parse(&format!(
        "zookeeper-servers:\n  - host: zk1\n  - host: '::1'\n    port: 2181\n    chroot: /np\n{BASE}"
    ))
    .expect("valid");
    assert_eq!(cfg.state_store, StateStoreConfig::ZooKeeper);
    assert_eq!(cfg.zookeeper_hosts(), "zk1:2281,[::1]:2181/np");
}

#[test]
fn winrm_images_default_to_port_5986() {
    let cfg = parse(&base_with(
        "      - name: cirros\n",
        "      - name: cirros\n        connection-type: winrm\n",
    ))
    .expect("valid");
    assert_eq!(cfg.providers[0].cloud_images[0].connection_port, 5986);
}

#[test]
fn negative_min_ready_is_zero_and_zero_ages_are_off() {
    let cfg = parse(&base_with(
        "    min-ready: 1",
        "    min-ready: -1\n    max-ready-age: 0",
    ))
    .expect("valid");
    assert_eq!(cfg.labels[0].min_ready, 0);
    assert_eq!(cfg.labels[0].max_ready_age, None);
}

#[test]
fn simulated_provider_knobs() {
    let cfg = parse(
        r#"
labels: [{name: l}]
providers:
  - name: sim
    driver: simulated
    simulation:
      boot-delay: 0.25
      quota: {instances: 3, cores: 12}
      failure-rates: {create: 0.5}
      leaked-servers: 2
      leaked-floating-ips: 3
      leaked-ports: 4
      flavors: [{name: tiny, vcpus: 1, ram: 512}]
    cloud-images: [{name: img}]
    pools:
      - name: p
        labels: [{name: l, cloud-image: img, flavor-name: tiny}]
"#,
    )
    .expect("valid");
    let Driver::Simulated(sim) = &cfg.providers[0].driver else {
        panic!("not simulated")
    };
    assert_eq!(sim.boot_delay, Duration::from_millis(250));
    assert_eq!(sim.quota.get("instances"), Some(3));
    assert_eq!(sim.quota.get("ram"), None);
    assert_eq!(sim.create_failure_rate, 0.5);
    assert_eq!(sim.leaked_servers, 2);
    assert_eq!((sim.leaked_floating_ips, sim.leaked_ports), (3, 4));
    assert_eq!(sim.flavors.len(), 1);
    assert!(cfg.providers[0].cloud.is_none());
    assert_eq!(sim.api_timeout, Duration::from_secs(60), "the default");
    assert_eq!(sim.api_fault, None);
}

#[test]
fn simulated_api_timeout_and_faults() {
    let with = |knobs: &str| {
        let text = base_with(
            "    cloud: mycloud\n",
            &format!("    driver: simulated\n    simulation: {{{knobs}}}\n"),
        );
        let cfg = parse(&text).unwrap_or_else(|e| panic!("{knobs}: {e}"));
        let Driver::Simulated(sim) = cfg.providers[0].driver.clone() else {
            panic!("not simulated")
        };
        sim
    };
    assert_eq!(
        with("api-timeout: 2.5").api_timeout,
        Duration::from_millis(2500)
    );
    assert_eq!(with("api-fault: hang").api_fault, Some(ApiFault::Hang));
    assert_eq!(
        with("api-fault: server-error").api_fault,
        Some(ApiFault::ServerError)
    );
    assert_eq!(
        with("api-fault: rate-limit").api_fault,
        Some(ApiFault::RateLimit { retry_after: None })
    );
    assert_eq!(
        with("api-fault: {mode: rate-limit, retry-after: 30}").api_fault,
        Some(ApiFault::RateLimit {
            retry_after: Some(Duration::from_secs(30))
        })
    );
    assert_eq!(with("api-fault: none").api_fault, None);
    assert_eq!(
        with("api-fault: {mode: hang}").api_fault,
        Some(ApiFault::Hang)
    );
}

#[test]
fn env_substitution_and_secure_file_on_load() {
    let dir = tempfile::tempdir().expect("tempdir");
    let main = dir.path().join("nodepool.yaml");
    let secure = dir.path().join("secure.yaml");
    std::fs::write(
        &main,
        BASE.replace(
            "cloud: mycloud",
            "cloud: '%(NODEPOOL_CLOUD)'\n    region-name: '%(NODEPOOL_UNSET)'",
        )
        .replace(
            "labels:\n  - name: small",
            "state-store: {path: state.db}\nlabels:\n  - name: small",
        ),
    )
    .expect("write");
    std::fs::write(
        &secure,
        "diskimages:\n  - name: jammy\n    env-vars: {SECRET: s3cr3t}\n",
    )
    .expect("write");
    let env = vec![
        ("NODEPOOL_CLOUD".to_string(), "envcloud".to_string()),
        ("HOME".to_string(), "/root".to_string()),
    ];
    let cfg = ConfigSource::new(&main, Some(secure.clone()))
        .with_env(env)
        .load()
        .expect("valid");
    assert_eq!(cfg.providers[0].cloud.as_deref(), Some("envcloud"));
    // Unknown variables stay as written, exactly like Nodepool.
    assert_eq!(
        cfg.providers[0].region_name.as_deref(),
        Some("%(NODEPOOL_UNSET)")
    );
    assert_eq!(
        cfg.diskimage("jammy").expect("jammy").env_vars["SECRET"],
        "s3cr3t"
    );
    assert_eq!(
        cfg.state_store,
        StateStoreConfig::Sqlite {
            path: dir.path().join("state.db"),
            lease: None,
        }
    );
}

#[test]
fn every_error_is_reported_at_once() {
    let e = invalid(
        &base_with("    min-ready: 1", "    min-ready: lots\n    colour: blue")
            .replace("max-servers: 10", "max-servers: ten"),
        "labels[0].min-ready",
        K::WrongType,
    );
    assert!(e.has("labels[0].colour", K::UnknownKey));
    assert!(e.has("providers[0].pools[0].max-servers", K::WrongType));
    assert_eq!(e.errors.len(), 3, "{e}");
}

#[test]
fn error_display_names_path_and_file() {
    let e = invalid(
        &base_with("diskimage: jammy", "diskimage: x"),
        "providers[0].pools[0].labels[0].diskimage",
        K::UnknownReference,
    )
    .in_file("/etc/nodepool/nodepool.yaml");
    let text = e.to_string();
    assert!(
        text.starts_with("/etc/nodepool/nodepool.yaml: 1 configuration error:"),
        "{text}"
    );
    assert!(
        text.contains("providers[0].pools[0].labels[0].diskimage: unknown diskimage \"x\""),
        "{text}"
    );
}

// ---------------------------------------------------------------- invalid

#[test]
fn e01_yaml_syntax() {
    let e = parse("labels: [\n").unwrap_err();
    assert_eq!(e.errors[0].kind, K::Syntax);
    assert!(e.errors[0].path.starts_with("line"));
}

#[test]
fn e02_top_level_not_a_mapping() {
    invalid("- a\n- b\n", "", K::WrongType);
}

#[test]
fn e03_unknown_top_level_key_with_suggestion() {
    let e = invalid(
        &format!("{BASE}diskimage-dir: /x\n"),
        "diskimage-dir",
        K::UnknownKey,
    );
    let _ = e;
    let e = invalid(
        &format!("{BASE}image-dir: /x\n"),
        "image-dir",
        K::UnknownKey,
    );
    assert!(
        e.errors[0].message.contains("did you mean `images-dir`"),
        "{e}"
    );
}

#[test]
fn e04_unknown_pool_key_with_suggestion() {
    let e = invalid(
        &base_with("max-servers: 10", "max_servers: 10"),
        "providers[0].pools[0].max_servers",
        K::UnknownKey,
    );
    assert!(
        e.errors[0].message.contains("did you mean `max-servers`"),
        "{e}"
    );
}

#[test]
fn e05_unknown_label_key() {
    let e = invalid(
        &base_with(
            "min-ram: 2048",
            "min-ram: 2048\n            flavour-name: x",
        ),
        "providers[0].pools[0].labels[0].flavour-name",
        K::UnknownKey,
    );
    assert!(e.errors[0].message.contains("flavor-name"), "{e}");
}

#[test]
fn e06_label_without_name() {
    invalid(
        &base_with("  - name: small\n    min-ready: 1", "  - min-ready: 1"),
        "labels[0].name",
        K::MissingKey,
    );
}

#[test]
fn e07_min_ready_wrong_type() {
    invalid(
        &base_with("min-ready: 1", "min-ready: [1]"),
        "labels[0].min-ready",
        K::WrongType,
    );
}

#[test]
fn e08_duplicate_label() {
    invalid(
        &base_with(
            "  - name: small\n    min-ready: 1",
            "  - name: small\n  - name: small",
        ),
        "labels[1].name",
        K::Duplicate,
    );
}

#[test]
fn e09_provider_without_name() {
    invalid(
        &base_with(
            "  - name: cloud1\n    cloud: mycloud\n",
            "  - cloud: mycloud\n",
        ),
        "providers[0].name",
        K::MissingKey,
    );
}

#[test]
fn e10_openstack_provider_without_cloud() {
    invalid(
        &base_with("    cloud: mycloud\n", ""),
        "providers[0].cloud",
        K::MissingKey,
    );
}

#[test]
fn e11_unsupported_python_driver() {
    let e = invalid(
        &base_with(
            "    cloud: mycloud\n",
            "    cloud: mycloud\n    driver: aws\n",
        ),
        "providers[0].driver",
        K::InvalidValue,
    );
    assert!(e.errors[0].message.contains("not supported"), "{e}");
}

#[test]
fn e12_unknown_driver_with_suggestion() {
    let e = invalid(
        &base_with(
            "    cloud: mycloud\n",
            "    cloud: mycloud\n    driver: openstak\n",
        ),
        "providers[0].driver",
        K::InvalidValue,
    );
    assert!(
        e.errors[0].message.contains("did you mean `openstack`"),
        "{e}"
    );
}

#[test]
fn e13_duplicate_provider() {
    let doubled = BASE.replace(
        "providers:\n",
        "providers:\n  - name: cloud1\n    cloud: c\n",
    );
    invalid(&doubled, "providers[1].name", K::Duplicate);
}

#[test]
fn e14_pool_label_unknown_label() {
    invalid(
        &base_with("          - name: small", "          - name: large"),
        "providers[0].pools[0].labels[0].name",
        K::UnknownReference,
    );
}

#[test]
fn e15_pool_label_unknown_diskimage() {
    invalid(
        &base_with("diskimage: jammy", "diskimage: x"),
        "providers[0].pools[0].labels[0].diskimage",
        K::UnknownReference,
    );
}

#[test]
fn e16_pool_label_abstract_diskimage() {
    invalid(
        &base_with("diskimage: jammy", "diskimage: base"),
        "providers[0].pools[0].labels[0].diskimage",
        K::InvalidValue,
    );
}

#[test]
fn e17_pool_label_diskimage_not_uploaded_to_provider() {
    let text = BASE.replace("    diskimages:\n      - name: jammy\n", "");
    invalid(
        &text,
        "providers[0].pools[0].labels[0].diskimage",
        K::UnknownReference,
    );
}

#[test]
fn e18_pool_label_unknown_cloud_image() {
    invalid(
        &base_with("diskimage: jammy", "cloud-image: nope"),
        "providers[0].pools[0].labels[0].cloud-image",
        K::UnknownReference,
    );
}

#[test]
fn e19_pool_label_both_image_kinds() {
    invalid(
        &base_with(
            "diskimage: jammy",
            "diskimage: jammy\n            cloud-image: cirros",
        ),
        "providers[0].pools[0].labels[0]",
        K::Conflict,
    );
}

#[test]
fn e20_pool_label_no_image() {
    invalid(
        &base_with("            diskimage: jammy\n", ""),
        "providers[0].pools[0].labels[0]",
        K::Conflict,
    );
}

#[test]
fn e21_pool_label_no_flavor_or_min_ram() {
    invalid(
        &base_with("            min-ram: 2048\n", ""),
        "providers[0].pools[0].labels[0]",
        K::Conflict,
    );
}

#[test]
fn e22_provider_diskimage_unknown() {
    invalid(
        &base_with(
            "      - name: jammy\n    cloud-images",
            "      - name: jammy\n      - name: focal\n    cloud-images",
        ),
        "providers[0].diskimages[1].name",
        K::UnknownReference,
    );
}

#[test]
fn e23_provider_diskimage_duplicate() {
    invalid(
        &base_with(
            "      - name: jammy\n    cloud-images",
            "      - name: jammy\n      - name: jammy\n    cloud-images",
        ),
        "providers[0].diskimages[1].name",
        K::Duplicate,
    );
}

#[test]
fn e24_cloud_image_id_and_name() {
    invalid(
        &base_with(
            "image-name: cirros-0.6",
            "image-name: cirros-0.6\n        image-id: abc",
        ),
        "providers[0].cloud-images[0]",
        K::Conflict,
    );
}

#[test]
fn e25_diskimage_unknown_parent() {
    invalid(
        &base_with("parent: base", "parent: bsae"),
        "diskimages[1].parent",
        K::UnknownReference,
    );
}

#[test]
fn e26_diskimage_parent_loop() {
    let text = base_with(
        "    abstract: true\n",
        "    abstract: true\n    parent: jammy\n",
    );
    invalid(&text, "diskimages[0].parent", K::InvalidValue);
}

#[test]
fn e27_duplicate_diskimage() {
    let text = BASE.replace(
        "diskimages:\n  - name: base",
        "diskimages:\n  - name: jammy\n  - name: base",
    );
    invalid(&text, "diskimages[2].name", K::Duplicate);
}

#[test]
fn e28_diskimage_elements_not_a_list() {
    invalid(
        &base_with("elements: [ubuntu]", "elements: ubuntu"),
        "diskimages[1].elements",
        K::WrongType,
    );
}

#[test]
fn e29_diskimage_env_vars_not_a_mapping() {
    invalid(
        &base_with("env-vars: {B: \"2\"}", "env-vars: [B]"),
        "diskimages[1].env-vars",
        K::WrongType,
    );
}

#[test]
fn e30_diskimage_rebuild_age_zero() {
    invalid(
        &base_with("release: 22", "release: 22\n    rebuild-age: 0"),
        "diskimages[1].rebuild-age",
        K::InvalidValue,
    );
}

#[test]
fn e31_boot_timeout_negative() {
    invalid(
        &base_with("cloud: mycloud", "cloud: mycloud\n    boot-timeout: -5"),
        "providers[0].boot-timeout",
        K::InvalidValue,
    );
}

#[test]
fn e32_launch_retries_zero() {
    invalid(
        &base_with("cloud: mycloud", "cloud: mycloud\n    launch-retries: 0"),
        "providers[0].launch-retries",
        K::InvalidValue,
    );
}

#[test]
fn e33_rate_not_a_number() {
    invalid(
        &base_with("cloud: mycloud", "cloud: mycloud\n    rate: fast"),
        "providers[0].rate",
        K::WrongType,
    );
}

#[test]
fn e34_image_name_format_unknown_field() {
    invalid(
        &base_with(
            "cloud: mycloud",
            "cloud: mycloud\n    image-name-format: '{image}-{timestamp}'",
        ),
        "providers[0].image-name-format",
        K::InvalidValue,
    );
}

#[test]
fn e35_instance_property_over_nova_limit() {
    let long = "x".repeat(300);
    invalid(
        &base_with(
            "min-ram: 2048",
            &format!("min-ram: 2048\n            instance-properties: {{owner: {long}}}"),
        ),
        "providers[0].pools[0].labels[0].instance-properties.owner",
        K::InvalidValue,
    );
}

#[test]
fn e36_groups_metadata_over_nova_limit() {
    let long = "l".repeat(250);
    let text = BASE.replace("name: small", &format!("name: {long}"));
    invalid(&text, "providers[0].pools[0].labels[0]", K::InvalidValue);
}

#[test]
fn e37_dynamic_property_unknown_field() {
    invalid(
        &base_with(
            "min-ram: 2048",
            "min-ram: 2048\n            dynamic-instance-properties: {x: '{event.id}'}",
        ),
        "providers[0].pools[0].labels[0].dynamic-instance-properties.x",
        K::InvalidValue,
    );
}

#[test]
fn e38_pool_without_name() {
    invalid(
        &base_with("      - name: main\n", "      - max-cores: 4\n"),
        "providers[0].pools[0].name",
        K::MissingKey,
    );
}

#[test]
fn e39_duplicate_pool() {
    let text = base_with("    pools:\n", "    pools:\n      - name: main\n");
    invalid(&text, "providers[0].pools[1].name", K::Duplicate);
}

#[test]
fn e40_duplicate_label_in_pool() {
    let text = base_with(
        "            min-ram: 2048\n",
        "            min-ram: 2048\n          - name: small\n            diskimage: jammy\n            min-ram: 1\n",
    );
    invalid(&text, "providers[0].pools[0].labels[1].name", K::Duplicate);
}

#[test]
fn e41_zookeeper_server_without_host() {
    invalid(
        &format!("zookeeper-servers: [{{port: 2181}}]\n{BASE}"),
        "zookeeper-servers[0].host",
        K::MissingKey,
    );
}

#[test]
fn e42_zookeeper_port_out_of_range() {
    invalid(
        &format!("zookeeper-servers: [{{host: zk, port: 70000}}]\n{BASE}"),
        "zookeeper-servers[0].port",
        K::InvalidValue,
    );
}

#[test]
fn e43_zookeeper_chroot_relative() {
    invalid(
        &format!("zookeeper-servers: [{{host: zk, chroot: nodepool}}]\n{BASE}"),
        "zookeeper-servers[0].chroot",
        K::InvalidValue,
    );
}

#[test]
fn e44_zookeeper_tls_incomplete() {
    invalid(
        &format!("zookeeper-tls: {{cert: a, key: b}}\n{BASE}"),
        "zookeeper-tls.ca",
        K::MissingKey,
    );
}

#[test]
fn e45_zookeeper_timeout_zero() {
    invalid(
        &format!("zookeeper-timeout: 0\n{BASE}"),
        "zookeeper-timeout",
        K::InvalidValue,
    );
}

#[test]
fn e46_sqlite_store_with_zookeeper_servers() {
    invalid(
        &format!("zookeeper-servers: [{{host: zk}}]\nstate-store: {{driver: sqlite}}\n{BASE}"),
        "state-store.driver",
        K::Conflict,
    );
}

#[test]
fn e47_zookeeper_store_without_servers() {
    invalid(
        &format!("state-store: {{driver: zookeeper}}\n{BASE}"),
        "zookeeper-servers",
        K::MissingKey,
    );
}

#[test]
fn e48_unknown_state_store() {
    invalid(
        &format!("state-store: {{driver: etcd}}\n{BASE}"),
        "state-store.driver",
        K::InvalidValue,
    );
}

#[test]
fn e48b_sqlite_lease_too_short() {
    invalid(
        &format!("state-store: {{driver: sqlite, lease: 0.5}}\n{BASE}"),
        "state-store.lease",
        K::InvalidValue,
    );
}

#[test]
fn e48c_lease_with_the_zookeeper_store() {
    invalid(
        &format!(
            "zookeeper-servers: [{{host: zk}}]\nstate-store: {{driver: zookeeper, lease: 5}}\n{BASE}"
        ),
        "state-store.lease",
        K::Conflict,
    );
}

#[test]
fn sqlite_lease_is_read() {
    let cfg = parse(&format!("state-store: {{path: s.db, lease: 4.5}}\n{BASE}")).expect("valid");
    assert_eq!(
        cfg.state_store,
        StateStoreConfig::Sqlite {
            path: "s.db".into(),
            lease: Some(Duration::from_millis(4500)),
        }
    );
}

#[test]
fn e49_webapp_port_wrong_type() {
    invalid(
        &format!("webapp: {{port: http}}\n{BASE}"),
        "webapp.port",
        K::WrongType,
    );
}

#[test]
fn e50_tenant_limits_without_tenant() {
    invalid(
        &format!("tenant-resource-limits: [{{max-cores: 4}}]\n{BASE}"),
        "tenant-resource-limits[0].tenant-name",
        K::MissingKey,
    );
}

#[test]
fn e51_tenant_limits_duplicate() {
    invalid(
        &format!("tenant-resource-limits: [{{tenant-name: t}}, {{tenant-name: t}}]\n{BASE}"),
        "tenant-resource-limits[1].tenant-name",
        K::Duplicate,
    );
}

#[test]
fn e52_tenant_limit_not_an_int() {
    invalid(
        &format!("tenant-resource-limits: [{{tenant-name: t, max-ram: lots}}]\n{BASE}"),
        "tenant-resource-limits[0].max-ram",
        K::WrongType,
    );
}

#[test]
fn e53_legacy_dburi() {
    let e = invalid(
        &format!("dburi: 'mysql://nodepool@localhost/nodepool'\n{BASE}"),
        "dburi",
        K::Removed,
    );
    assert!(e.errors[0].message.contains("state-store"), "{e}");
}

#[test]
fn e54_legacy_cron_zmq() {
    let e = invalid(
        &format!(
            "cron: {{cleanup: '*/5 * * * *'}}\nzmq-publishers: [tcp://localhost:8888]\n{BASE}"
        ),
        "cron",
        K::Removed,
    );
    assert!(e.has("zmq-publishers", K::Removed));
}

#[test]
fn e55_legacy_provider_images_and_max_servers() {
    let e = invalid(
        &base_with(
            "cloud: mycloud",
            "cloud: mycloud\n    max-servers: 2\n    images: [{name: precise, min-ram: 1}]",
        ),
        // Provider `images` are snapshot images again: one without a
        // setup script is not one.
        "providers[0].images[0].setup",
        K::MissingKey,
    );
    assert!(e.has("providers[0].max-servers", K::Removed));
}

#[test]
fn e56_legacy_provider_credentials() {
    invalid(
        &base_with("cloud: mycloud", "cloud: mycloud\n    password: hunter2"),
        "providers[0].password",
        K::Removed,
    );
}

#[test]
fn e57_target_unknown_label() {
    invalid(
        &format!(
            "{BASE}targets:\n  - name: j\n    jenkins: {{url: 'http://j'}}\n    labels: [{{name: nope}}]\n"
        ),
        "targets[0].labels[0].name",
        K::UnknownReference,
    );
}

#[test]
fn e58_target_without_jenkins_url() {
    invalid(
        &format!("{BASE}targets:\n  - name: j\n    jenkins: {{user: u}}\n"),
        "targets[0].jenkins.url",
        K::MissingKey,
    );
}

#[test]
fn e59_simulation_on_openstack_provider() {
    invalid(
        &base_with(
            "cloud: mycloud",
            "cloud: mycloud\n    simulation: {boot-delay: 1}",
        ),
        "providers[0].simulation",
        K::Conflict,
    );
}

#[test]
fn e60_simulated_failure_rate_out_of_range() {
    let text = base_with(
        "    cloud: mycloud\n",
        "    driver: simulated\n    simulation: {failure-rates: {create: 2}}\n",
    );
    invalid(
        &text,
        "providers[0].simulation.failure-rates.create",
        K::InvalidValue,
    );
}

#[test]
fn e61_secure_file_unknown_diskimage() {
    let e = Config::from_yaml_with_secure(
        BASE,
        Some((
            std::path::Path::new("secure.yaml"),
            "diskimages: [{name: nope, env-vars: {A: b}}]",
        )),
        None,
    )
    .unwrap_err();
    assert!(
        e.has("secure.yaml: diskimages[0].name", K::UnknownReference),
        "{e}"
    );
}

#[test]
fn e62_secure_file_unknown_key() {
    let e = Config::from_yaml_with_secure(
        BASE,
        Some((std::path::Path::new("s.yaml"), "labels: []")),
        None,
    )
    .unwrap_err();
    assert!(e.has("s.yaml: labels", K::UnknownKey), "{e}");
}

#[test]
fn e62b_secure_file_syntax_error_names_the_secure_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let main = dir.path().join("nodepool.yaml");
    let secure = dir.path().join("secure.yaml");
    std::fs::write(&main, BASE).expect("write");
    std::fs::write(&secure, "zookeeper-servers:\n  - host: a\n    port: [\n").expect("write");
    let e = ConfigSource::new(&main, Some(secure.clone()))
        .load()
        .unwrap_err();
    assert_eq!(e.file.as_deref(), Some(secure.as_path()), "{e}");
    assert_eq!(e.errors[0].kind, K::Syntax);
    assert_eq!(e.errors[0].path, "line 4 column 1", "{e}");
}

#[test]
fn e62c_secure_zookeeper_keys_are_located_in_the_secure_file() {
    let e = Config::from_yaml_with_secure(
        BASE,
        Some((
            std::path::Path::new("s.yaml"),
            "zookeeper-servers: [{host: zk, port: many, hots: x}]\nzookeeper-tls: {ca: a}\n",
        )),
        None,
    )
    .unwrap_err();
    assert!(
        e.has("s.yaml: zookeeper-servers[0].port", K::WrongType),
        "{e}"
    );
    assert!(
        e.has("s.yaml: zookeeper-servers[0].hots", K::UnknownKey),
        "{e}"
    );
    assert!(e.has("s.yaml: zookeeper-tls.cert", K::MissingKey), "{e}");
    assert!(
        e.errors.iter().all(|x| x.path.starts_with("s.yaml: ")),
        "nothing blamed on the main file: {e}"
    );
}

#[test]
fn e63_missing_file_is_an_io_error_naming_it() {
    let e = Config::load("/nonexistent/nodepool.yaml", None).unwrap_err();
    assert_eq!(e.errors[0].kind, K::Io);
    assert!(e.to_string().contains("/nonexistent/nodepool.yaml"));
}

#[test]
fn e64_label_in_pool_is_used_even_when_image_source_parses() {
    // a pool label pointing at an image of the right kind still parses
    let cfg = parse(&base_with("diskimage: jammy", "cloud-image: cirros")).expect("valid");
    assert_eq!(
        cfg.providers[0].pools[0].labels[0].image,
        ImageSource::CloudImage("cirros".into())
    );
}

#[test]
fn e65_simulated_api_fault_errors_are_located() {
    let sim = |knobs: &str| {
        base_with(
            "    cloud: mycloud\n",
            &format!("    driver: simulated\n    simulation: {{{knobs}}}\n"),
        )
    };
    let e = invalid(
        &sim("api-fault: hung"),
        "providers[0].simulation.api-fault",
        K::InvalidValue,
    );
    assert!(e.to_string().contains("did you mean `hang`"), "{e}");
    invalid(
        &sim("api-fault: {mode: bogus}"),
        "providers[0].simulation.api-fault.mode",
        K::InvalidValue,
    );
    invalid(
        &sim("api-fault: {retry-after: 3}"),
        "providers[0].simulation.api-fault.mode",
        K::MissingKey,
    );
    invalid(
        &sim("api-fault: {mode: hang, retry-after: 3}"),
        "providers[0].simulation.api-fault.retry-after",
        K::Conflict,
    );
    invalid(
        &sim("api-fault: {mode: rate-limit, retry-afer: 3}"),
        "providers[0].simulation.api-fault.retry-afer",
        K::UnknownKey,
    );
    invalid(
        &sim("api-fault: [hang]"),
        "providers[0].simulation.api-fault",
        K::WrongType,
    );
    invalid(
        &sim("api-timeout: 0"),
        "providers[0].simulation.api-timeout",
        K::InvalidValue,
    );
    invalid(
        &sim("api-timout: 3"),
        "providers[0].simulation.api-timout",
        K::UnknownKey,
    );
}

// ----- seed spellings and warnings ---------------------------------------

const PAUSED_SEED_000: &str = r#"
labels: [{name: small}]
diskimages:
  - name: ubuntu-precise
    paused: True
providers:
  - name: sim
    driver: simulated
    diskimages:
      - name: ubuntu-precise
        paused: true
    pools:
      - name: main
        max-servers: 1
        labels: [{name: small, diskimage: ubuntu-precise, flavor-name: small}]
"#;

#[test]
fn paused_as_seed_000_spells_it_is_pause_with_a_deprecation_warning() {
    let cfg = Config::from_yaml(PAUSED_SEED_000).expect("loads");
    assert!(cfg.diskimage("ubuntu-precise").expect("image").pause);
    assert!(
        cfg.providers[0]
            .diskimage("ubuntu-precise")
            .expect("provider image")
            .pause
    );
    let warned: Vec<(&str, K)> = cfg
        .warnings
        .iter()
        .map(|w| (w.path.as_str(), w.kind))
        .collect();
    assert_eq!(
        warned,
        [
            ("diskimages[0].paused", K::Deprecated),
            ("providers[0].diskimages[0].paused", K::Deprecated),
        ]
    );
    assert!(cfg.warnings[0].message.contains("read as `pause`"));
    assert!(!K::Deprecated.fails_validation());
}

#[test]
fn paused_and_pause_together_are_a_conflict() {
    let yaml = PAUSED_SEED_000.replace("    paused: True", "    paused: true\n    pause: false");
    let e = Config::from_yaml(&yaml).expect_err("conflict");
    assert!(e.has("diskimages[0].paused", K::Conflict), "{e}");
}

#[test]
fn the_modern_spelling_warns_about_nothing() {
    let cfg = Config::from_yaml(BASE).expect("loads");
    assert_eq!(cfg.warnings, []);
}

#[test]
fn an_unset_nodepool_variable_is_kept_as_written_and_reported_by_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("nodepool.yaml");
    let text = BASE.replace(
        "release: 22",
        "release: \"%(NODEPOOL_RELEASE)\"\n    username: \"%(NODEPOOL_USER)\"",
    );
    std::fs::write(&path, &text).expect("write");
    let line = text
        .lines()
        .position(|l| l.contains("NODEPOOL_USER"))
        .expect("line")
        + 1;
    let cfg = ConfigSource::new(&path, None)
        .with_env(vec![("NODEPOOL_RELEASE".into(), "24".into())])
        .load()
        .expect("loads");
    let jammy = cfg.diskimage("jammy").expect("jammy");
    assert_eq!(jammy.release, "24");
    assert_eq!(jammy.username, "%(NODEPOOL_USER)", "kept as written");
    assert_eq!(cfg.warnings.len(), 1, "{:?}", cfg.warnings);
    let w = &cfg.warnings[0];
    assert_eq!(w.kind, K::UnsetVariable);
    assert_eq!(w.path, format!("line {line}"));
    assert!(w.message.contains("%(NODEPOOL_USER)"), "{w}");
    assert!(w.kind.fails_validation());
}

#[test]
fn an_empty_file_loads_with_a_warning() {
    for text in ["", "# nothing yet\n", "{}"] {
        let cfg = Config::from_yaml(text).expect("loads");
        assert_eq!(cfg.warnings.len(), 1, "{text:?}");
        assert_eq!(cfg.warnings[0].kind, K::Empty);
    }
}

#[test]
fn seed_001s_provider_max_servers_minus_one_means_removal() {
    let cfg = Config::from_yaml(&base_with(
        "cloud: mycloud",
        "cloud: mycloud\n    max-servers: -1",
    ))
    .expect("loads");
    let p = &cfg.providers[0];
    assert!(p.removing);
    assert!(p.is_disabled(), "its pools launch nothing");
    assert!(p.pools.iter().all(|q| q.max_servers == Some(0)));
    assert_eq!(cfg.warnings.len(), 1, "{:?}", cfg.warnings);
    let w = &cfg.warnings[0];
    assert_eq!(
        (w.path.as_str(), w.kind),
        ("providers[0].max-servers", K::Deprecated)
    );
    assert!(w.message.contains("`max-servers: 0` on every pool"), "{w}");
    assert!(!Config::from_yaml(BASE).expect("loads").providers[0].removing);
}

#[test]
fn static_provider_hosts_defaults_and_labels() {
    let cfg = parse(
        r#"
labels: [{name: small}, {name: large}]
providers:
  - name: lab
    driver: static
    pools:
      - name: main
        max-servers: 4
        nodes:
          - {name: a.example.org, labels: small large}
          - name: b.example.org
            labels: [large]
            username: ci
            connection-type: network_cli
            connection-port: 2222
            host-key-checking: false
            host-key: ssh-ed25519 AAAA
            max-parallel-jobs: 3
            python-path: /usr/bin/python3
            shell-type: csh
            timeout: 9
"#,
    )
    .expect("valid");
    let p = &cfg.providers[0];
    let Driver::Static(hosts) = &p.driver else {
        panic!("not static")
    };
    assert!(p.cloud.is_none());
    // The pool serves the union of its hosts' labels, in file order, and
    // has nothing to boot for them.
    let pool = &p.pools[0];
    assert_eq!(pool.max_servers, Some(4));
    let names: Vec<&str> = pool.labels.iter().map(|l| l.name.as_str()).collect();
    assert_eq!(names, ["small", "large"]);
    assert!(pool.labels.iter().all(|l| l.image == ImageSource::Static));
    let a = &hosts.hosts("main")[0];
    assert_eq!(a.labels, ["small", "large"], "a string is split on spaces");
    assert_eq!(a.identity(), ("a.example.org", "zuul", 22));
    assert_eq!(a.connection_type, "ssh");
    assert!(a.host_key_checking);
    assert!(a.host_keys.is_empty());
    assert_eq!(a.max_parallel_jobs, 1);
    assert_eq!(a.python_path, "auto");
    assert_eq!(a.shell_type, None);
    assert_eq!(a.timeout, Duration::from_secs(5));
    let b = &hosts.hosts("main")[1];
    assert_eq!(b.identity(), ("b.example.org", "ci", 2222));
    assert_eq!(b.connection_type, "network_cli");
    assert!(!b.host_key_checking);
    assert_eq!(b.host_keys, ["ssh-ed25519 AAAA"]);
    assert_eq!(b.max_parallel_jobs, 3);
    assert_eq!(b.python_path, "/usr/bin/python3");
    assert_eq!(b.shell_type.as_deref(), Some("csh"));
    assert_eq!(b.timeout, Duration::from_secs(9));
    assert_eq!(b.index, 1);
}
