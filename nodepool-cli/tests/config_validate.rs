//! `nodepool config-validate` as a real process: the configuration files,
//! and the clouds.yaml entry of every OpenStack provider, found the way the
//! launcher finds it.
//!
//! Every run is hermetic: its own working directory and `HOME`, no
//! `XDG_CONFIG_HOME`, `OS_CLOUD` or `OS_CLIENT_SECURE_FILE` from the
//! caller, and `OS_CLIENT_CONFIG_FILE` only when a test sets it.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn nodepool() -> Command {
    Command::new(env!("CARGO_BIN_EXE_nodepool"))
}

fn examples() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples")
}

/// Passwords and secrets the files below carry; no output may show them.
const SECRETS: [&str; 4] = [
    "pw-rax-9f2c",
    "pw-ovh-71ad",
    "appcred-secret-5be0",
    "dib-secret-c41d",
];

/// A test's own directory, used as cwd and `HOME` of the command.
struct Sandbox {
    dir: tempfile::TempDir,
}

impl Sandbox {
    fn new() -> Self {
        Sandbox {
            dir: tempfile::tempdir().expect("tempdir"),
        }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn write(&self, name: &str, text: &str) -> PathBuf {
        let p = self.path().join(name);
        std::fs::write(&p, text).expect("write");
        p
    }

    /// `nodepool ARGS` here, with `OS_CLIENT_CONFIG_FILE` when given.
    fn run(&self, args: &[&str], clouds: Option<&Path>) -> Output {
        let mut cmd = nodepool();
        cmd.args(args)
            .current_dir(self.path())
            .env("HOME", self.path())
            .env_remove("XDG_CONFIG_HOME")
            .env_remove("OS_CLOUD")
            .env_remove("OS_CLIENT_SECURE_FILE")
            .env_remove("OS_CLIENT_CONFIG_FILE");
        if let Some(c) = clouds {
            cmd.env("OS_CLIENT_CONFIG_FILE", c);
        }
        cmd.output().expect("runs")
    }

    /// `config-validate` of a one-provider configuration (cloud
    /// `mycloud`, region `RegionOne`) against this clouds.yaml text.
    fn validate_clouds(&self, clouds_yaml: &str) -> (PathBuf, Output) {
        let config = self.write("nodepool.yaml", ONE_PROVIDER);
        let clouds = self.write("clouds.yaml", clouds_yaml);
        let out = self.run(
            &["-c", &config.display().to_string(), "config-validate"],
            Some(&clouds),
        );
        (clouds, out)
    }
}

const ONE_PROVIDER: &str = "zookeeper-servers: [{host: zk.example.org}]
labels: [{name: small}]
providers:
  - name: p1
    cloud: mycloud
    region-name: RegionOne
    cloud-images: [{name: cirros}]
    pools:
      - name: main
        max-servers: 1
        labels: [{name: small, cloud-image: cirros, min-ram: 512}]
";

/// A usable `mycloud` with `extra` lines added to its entry.
fn mycloud(extra: &str) -> String {
    format!(
        "clouds:
  mycloud:
    regions: [RegionOne, RegionTwo]
    auth:
      auth_url: https://keystone.example.org:5000/v3
      username: nodepool
      password: pw-rax-9f2c
      project_name: ci
      user_domain_name: Default
      project_domain_name: Default
{extra}"
    )
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn assert_no_secrets(o: &Output) {
    let all = format!("{}{}", stdout(o), stderr(o));
    for s in SECRETS {
        assert!(!all.contains(s), "secret {s} printed:\n{all}");
    }
}

/// Exit 1, nothing on stdout, exactly this one cloud error on stderr.
fn assert_cloud_error(o: &Output, line: &str) {
    assert_eq!(o.status.code(), Some(1), "{}{}", stdout(o), stderr(o));
    assert_eq!(
        stderr(o),
        format!("1 cloud configuration error:\n  {line}\n")
    );
    assert!(o.stdout.is_empty(), "{}", stdout(o));
    assert_no_secrets(o);
}

#[test]
fn a_good_clouds_yaml_passes_and_names_the_files_used() {
    let sb = Sandbox::new();
    // Found on the standard search path (the working directory), with the
    // passwords in a secure.yaml beside it, as openstacksdk merges them.
    sb.write(
        "clouds.yaml",
        "clouds:
  rax:
    regions: [DFW, IAD, ORD]
    image_format: vhd
    api_timeout: 60
    auth:
      auth_url: https://identity.api.rackspacecloud.com/v3
      username: ci
      user_domain_name: Default
      project_name: ci
      project_domain_name: Default
  ovh:
    regions: [{name: BHS1}, {name: GRA1}]
    verify: true
    auth:
      auth_url: https://auth.cloud.ovh.net/v3
      user_id: abc123
      project_id: def456
  private:
    auth_type: v3applicationcredential
    region_name: RegionOne
    auth:
      auth_url: https://keystone.private.example/
      application_credential_id: 0123abcd
",
    );
    sb.write(
        "secure.yaml",
        "clouds:
  rax: {auth: {password: pw-rax-9f2c}}
  ovh: {auth: {password: pw-ovh-71ad}}
  private: {auth: {application_credential_secret: appcred-secret-5be0}}
",
    );
    let config = examples().join("multi-cloud.yaml");
    let out = sb.run(
        &[
            "-c",
            &config.display().to_string(),
            "--debug",
            "config-validate",
        ],
        None,
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let from = format!(
        "{d}/clouds.yaml (+ {d}/secure.yaml)",
        d = sb.path().display()
    );
    assert_eq!(
        stdout(&out),
        format!(
            "{c}: valid (8 labels, 6 providers, 7 diskimages)
  providers.rax-dfw: cloud \"rax\" region \"DFW\" from {from}
  providers.rax-iad: cloud \"rax\" region \"IAD\" from {from}
  providers.rax-ord: cloud \"rax\" region \"ORD\" from {from}
  providers.ovh-bhs1: cloud \"ovh\" region \"BHS1\" from {from}
  providers.ovh-gra1: cloud \"ovh\" region \"GRA1\" from {from}
  providers.private-arm: cloud \"private\" region \"RegionOne\" from {from}
",
            c = config.display()
        )
    );
    assert_no_secrets(&out);
}

#[test]
fn a_secure_file_is_merged() {
    let sb = Sandbox::new();
    let clouds = sb.write("clouds.yaml", &mycloud(""));
    let config = examples().join("minimal-openstack.yaml");
    let secure = examples().join("secure.yaml");
    let out = sb.run(
        &[
            "-c",
            &config.display().to_string(),
            "-s",
            &secure.display().to_string(),
            "config-validate",
        ],
        Some(&clouds),
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        stdout(&out),
        format!(
            "{} (+ {}): valid (1 labels, 1 providers, 1 diskimages)
  providers.cloud1: cloud \"mycloud\" region \"RegionOne\" from {}
",
            config.display(),
            secure.display(),
            clouds.display()
        )
    );
    // The secure file's diskimage env-var is a secret too.
    assert!(!stdout(&out).contains("not-a-real-password"));
}

#[test]
fn a_missing_cloud_is_named_with_the_clouds_there() {
    let sb = Sandbox::new();
    let (clouds, out) = sb.validate_clouds(&mycloud("").replace("mycloud:", "othercloud:"));
    assert_cloud_error(
        &out,
        &format!(
            "providers.p1 (cloud \"mycloud\"): {}: clouds: no cloud named \"mycloud\" (clouds here: othercloud)",
            clouds.display()
        ),
    );
}

#[test]
fn a_missing_auth_url_is_named() {
    let sb = Sandbox::new();
    let (clouds, out) = sb.validate_clouds(
        &mycloud("").replace("      auth_url: https://keystone.example.org:5000/v3\n", ""),
    );
    assert_cloud_error(
        &out,
        &format!(
            "providers.p1 (cloud \"mycloud\"): {}: clouds.mycloud.auth.auth_url: missing",
            clouds.display()
        ),
    );
}

#[test]
fn a_missing_password_for_the_password_auth_type_is_named() {
    let sb = Sandbox::new();
    let (clouds, out) =
        sb.validate_clouds(&mycloud("").replace("      password: pw-rax-9f2c\n", ""));
    assert_cloud_error(
        &out,
        &format!(
            "providers.p1 (cloud \"mycloud\"): {}: clouds.mycloud.auth.password: missing",
            clouds.display()
        ),
    );
}

#[test]
fn an_unknown_auth_type_is_named() {
    let sb = Sandbox::new();
    let (clouds, out) = sb.validate_clouds(&mycloud("    auth_type: v3oidcpassword\n"));
    assert_cloud_error(
        &out,
        &format!(
            "providers.p1 (cloud \"mycloud\"): {}: clouds.mycloud.auth_type: unsupported auth_type \"v3oidcpassword\" (use password or v3applicationcredential)",
            clouds.display()
        ),
    );
}

#[test]
fn a_wrong_type_api_timeout_is_named() {
    let sb = Sandbox::new();
    let (clouds, out) = sb.validate_clouds(&mycloud("    api_timeout: [30]\n"));
    assert_cloud_error(
        &out,
        &format!(
            "providers.p1 (cloud \"mycloud\"): {}: clouds.mycloud.api_timeout: expected a positive number of seconds, found a list",
            clouds.display()
        ),
    );
}

#[test]
fn a_yaml_syntax_error_names_the_line_and_column() {
    let sb = Sandbox::new();
    // Line 7 is the password line: its value must not be echoed.
    let broken = mycloud("").replace("password: pw-rax-9f2c", "password: pw-rax-9f2c: oops");
    let (clouds, out) = sb.validate_clouds(&broken);
    assert_cloud_error(
        &out,
        &format!(
            "providers.p1 (cloud \"mycloud\"): {}: line 7 column 28: not valid YAML: mapping values are not allowed in this context at line 7 column 28",
            clouds.display()
        ),
    );
}

#[test]
fn an_unknown_region_is_named() {
    let sb = Sandbox::new();
    let config = sb.write(
        "nodepool.yaml",
        &ONE_PROVIDER.replace("region-name: RegionOne", "region-name: RegionNine"),
    );
    let clouds = sb.write("clouds.yaml", &mycloud(""));
    let out = sb.run(
        &["-c", &config.display().to_string(), "config-validate"],
        Some(&clouds),
    );
    assert_cloud_error(
        &out,
        &format!(
            "providers.p1 (cloud \"mycloud\"): {}: clouds.mycloud.regions: region \"RegionNine\" (the provider's region-name) is not one of RegionOne, RegionTwo",
            clouds.display()
        ),
    );
}

#[test]
fn a_missing_ca_file_is_named() {
    let sb = Sandbox::new();
    let ca = sb.path().join("missing-ca.pem");
    let (clouds, out) = sb.validate_clouds(&mycloud(&format!("    cacert: {}\n", ca.display())));
    assert_cloud_error(
        &out,
        &format!(
            "providers.p1 (cloud \"mycloud\"): {}: clouds.mycloud.cacert: cannot read {}: No such file or directory (os error 2)",
            clouds.display(),
            ca.display()
        ),
    );
    // `verify` may be the CA bundle's path, as in requests.
    let (clouds, out) = sb.validate_clouds(&mycloud(&format!("    verify: {}\n", ca.display())));
    assert_cloud_error(
        &out,
        &format!(
            "providers.p1 (cloud \"mycloud\"): {}: clouds.mycloud.verify: cannot read {}: No such file or directory (os error 2)",
            clouds.display(),
            ca.display()
        ),
    );
    // And `verify: maybe` is neither a boolean nor a file.
    let (clouds, out) = sb.validate_clouds(&mycloud("    verify: 3\n"));
    assert_cloud_error(
        &out,
        &format!(
            "providers.p1 (cloud \"mycloud\"): {}: clouds.mycloud.verify: expected true, false or the path of a CA bundle, found a number",
            clouds.display()
        ),
    );
}

#[test]
fn a_missing_clouds_yaml_names_every_path_searched() {
    // The last search directory is the machine's; this test needs it empty.
    for ext in ["yaml", "yml", "json"] {
        let p = format!("/etc/openstack/clouds.{ext}");
        assert!(
            !Path::new(&p).exists(),
            "{p} exists: this test needs a machine without one"
        );
    }
    let sb = Sandbox::new();
    let config = sb.write("nodepool.yaml", ONE_PROVIDER);
    let given = sb.path().join("not-there.yaml");
    let out = sb.run(
        &["-c", &config.display().to_string(), "config-validate"],
        Some(&given),
    );
    let d = sb.path().display();
    let searched = [
        format!("{} (OS_CLIENT_CONFIG_FILE)", given.display()),
        format!("{d}/clouds.yaml, {d}/clouds.yml, {d}/clouds.json"),
        format!(
            "{d}/.config/openstack/clouds.yaml, {d}/.config/openstack/clouds.yml, {d}/.config/openstack/clouds.json"
        ),
        "/etc/openstack/clouds.yaml, /etc/openstack/clouds.yml, /etc/openstack/clouds.json".into(),
    ];
    assert_cloud_error(
        &out,
        &format!(
            "providers.p1 (cloud \"mycloud\"): clouds.yaml: no clouds.yaml found (looked at {})",
            searched.join(", ")
        ),
    );
}

#[test]
fn every_broken_provider_is_reported_at_once_and_no_clouds_skips_the_check() {
    let sb = Sandbox::new();
    let config = sb.write(
        "nodepool.yaml",
        &format!(
            "{ONE_PROVIDER}  - name: p2
    cloud: nosuch
    cloud-images: [{{name: cirros}}]
    pools: [{{name: main, labels: [{{name: small, cloud-image: cirros, min-ram: 512}}]}}]
  - name: sim
    driver: simulated
    cloud-images: [{{name: cirros}}]
    pools: [{{name: main, labels: [{{name: small, cloud-image: cirros, min-ram: 512}}]}}]
"
        ),
    );
    let clouds = sb.write("clouds.yaml", &mycloud("    api_timeout: never\n"));
    let c = config.display().to_string();
    let out = sb.run(&["-c", &c, "config-validate"], Some(&clouds));
    assert_eq!(out.status.code(), Some(1));
    let f = clouds.display();
    assert_eq!(
        stderr(&out),
        format!(
            "2 cloud configuration errors:
  providers.p1 (cloud \"mycloud\"): {f}: clouds.mycloud.api_timeout: expected a positive number of seconds, found a string
  providers.p2 (cloud \"nosuch\"): {f}: clouds: no cloud named \"nosuch\" (clouds here: mycloud)
"
        )
    );
    assert_no_secrets(&out);

    let out = sb.run(&["-c", &c, "config-validate", "--no-clouds"], Some(&clouds));
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        stdout(&out),
        format!("{c}: valid (1 labels, 3 providers, 0 diskimages)\n")
    );
}

#[test]
fn secret_values_are_never_printed() {
    let sb = Sandbox::new();
    let config = sb.write("nodepool.yaml", ONE_PROVIDER);
    let c = config.display().to_string();
    // clouds.yaml's secure.yaml with the password of the wrong type, and
    // then with a broken line: the error names secure.yaml, not the value.
    let clouds = sb.write(
        "clouds.yaml",
        &mycloud("").replace("      password: pw-rax-9f2c\n", ""),
    );
    let secure = sb.write(
        "secure.yaml",
        "clouds:\n  mycloud:\n    auth:\n      password: [pw-rax-9f2c]\n",
    );
    let out = sb.run(&["-c", &c, "--debug", "config-validate"], Some(&clouds));
    assert_cloud_error(
        &out,
        &format!(
            "providers.p1 (cloud \"mycloud\"): {}: clouds.mycloud.auth.password: expected a string, found a list",
            secure.display()
        ),
    );
    sb.write(
        "secure.yaml",
        "clouds:\n  mycloud:\n    auth:\n      password: 'pw-rax-9f2c\n",
    );
    let out = sb.run(&["-c", &c, "config-validate"], Some(&clouds));
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains(&format!("{}: line ", secure.display())),
        "{}",
        stderr(&out)
    );
    assert_no_secrets(&out);

    // Nodepool's own secure file: a secret env-var next to a wrong key.
    let np_secure = sb.write(
        "nodepool-secure.yaml",
        "diskimages: [{name: nope, env-vars: {DIB_PASS: dib-secret-c41d}}]\nzookeeper-pasword: dib-secret-c41d\n",
    );
    let out = sb.run(
        &[
            "-c",
            &c,
            "-s",
            &np_secure.display().to_string(),
            "config-validate",
        ],
        Some(&clouds),
    );
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        stderr(&out),
        format!(
            "{c}: 2 configuration errors:
  {s}: zookeeper-pasword: unknown key `zookeeper-pasword`
  {s}: diskimages[0].name: unknown diskimage \"nope\"
",
            s = np_secure.display()
        )
    );
    assert_no_secrets(&out);
}

#[test]
fn a_nodepool_secure_file_with_a_syntax_error_is_named_with_its_line() {
    let sb = Sandbox::new();
    let config = sb.write("nodepool.yaml", ONE_PROVIDER);
    let secure = sb.write(
        "secure.yaml",
        "zookeeper-servers:\n  - host: zk\n    port: [2281\n",
    );
    let out = sb.run(
        &[
            "-c",
            &config.display().to_string(),
            "-s",
            &secure.display().to_string(),
            "config-validate",
        ],
        None,
    );
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        stderr(&out),
        format!(
            "{}: 1 configuration error:
  line 4 column 1: not valid YAML: did not find expected ',' or ']' at line 4 column 1, while parsing a flow sequence at line 3 column 11
",
            secure.display()
        )
    );
    // A key of the right name but the wrong type is placed in it too.
    std::fs::write(&secure, "zookeeper-servers: [{host: zk, port: high}]\n").expect("write");
    let out = sb.run(
        &[
            "-c",
            &config.display().to_string(),
            "-s",
            &secure.display().to_string(),
            "config-validate",
            "--no-clouds",
        ],
        None,
    );
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        stderr(&out),
        format!(
            "{}: 1 configuration error:\n  {}: zookeeper-servers[0].port: expected an integer, found a string\n",
            config.display(),
            secure.display()
        )
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

#[test]
fn seed_000s_paused_is_valid_with_a_warning_that_names_pause() {
    let sb = Sandbox::new();
    let config = sb.write(
        "nodepool.yaml",
        "labels: [{name: small}]
diskimages:
  - name: ubuntu-precise
    paused: True
providers:
  - name: sim
    driver: simulated
    diskimages: [{name: ubuntu-precise}]
    pools:
      - name: main
        max-servers: 1
        labels: [{name: small, diskimage: ubuntu-precise, flavor-name: small}]
",
    );
    let c = config.display().to_string();
    let out = sb.run(&["-c", &c, "config-validate"], None);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        stderr(&out),
        format!(
            "{c}: warning: diskimages[0].paused: `paused` is the old spelling of `pause`; read as `pause`\n"
        )
    );
    assert_eq!(
        stdout(&out),
        format!("{c}: valid (1 labels, 1 providers, 1 diskimages)\n")
    );
}

#[test]
fn an_unset_variable_and_an_empty_file_fail_validation_with_their_place() {
    let sb = Sandbox::new();
    let config = sb.write(
        "nodepool.yaml",
        "labels: [{name: small}]
providers:
  - name: sim
    driver: simulated
    cloud-images: [{name: img, username: \"%(NODEPOOL_IMAGE_USER)\"}]
    pools:
      - name: main
        max-servers: 1
        labels: [{name: small, cloud-image: img, flavor-name: small}]
",
    );
    let c = config.display().to_string();
    let out = sb.run(&["-c", &c, "config-validate"], None);
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    assert_eq!(
        stderr(&out),
        format!(
            "{c}: error: line 5: `%(NODEPOOL_IMAGE_USER)` names an environment variable that is not set; the text is kept as written
{c}: not valid (1 error; the daemons would run with it, logging the same)
"
        )
    );
    // Set, it is substituted and valid.
    let mut cmd = nodepool();
    let ok = cmd
        .args(["-c", &c, "config-validate"])
        .current_dir(sb.path())
        .env("HOME", sb.path())
        .env("NODEPOOL_IMAGE_USER", "zuul")
        .output()
        .expect("runs");
    assert!(ok.status.success(), "{}", stderr(&ok));

    let empty = sb.write("empty.yaml", "");
    let e = empty.display().to_string();
    let out = sb.run(&["-c", &e, "config-validate"], None);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).starts_with(&format!(
            "{e}: error: the configuration is empty: no labels, providers or diskimages\n"
        )),
        "{}",
        stderr(&out)
    );
}

/// `driver: external`: a missing `command`, a program that does not exist
/// and one that is not executable are each named at their place; a
/// relative program path is found beside the configuration file.
#[test]
fn external_provider_commands_are_checked_where_they_are() {
    let sb = Sandbox::new();
    sb.write("not-executable.sh", "#!/bin/sh\n");
    let runnable = sb.write("cloud.sh", "#!/bin/sh\n");
    let mut perms = std::fs::metadata(&runnable).expect("stat").permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o755);
    std::fs::set_permissions(&runnable, perms).expect("chmod");
    let provider = |name: &str, command: &str| {
        format!(
            "  - name: {name}\n    driver: external\n{command}    cloud-images: [{{name: base}}]\n    pools: [{{name: main, labels: [{{name: small, cloud-image: base, flavor-name: small}}]}}]\n"
        )
    };
    let config = sb.write(
        "nodepool.yaml",
        &format!(
            "labels: [{{name: small}}]\nproviders:\n{}{}{}{}{}",
            provider("no-command", ""),
            provider("missing", "    command: [./no-such-cloud.sh, --flag]\n"),
            provider("not-executable", "    command: ./not-executable.sh\n"),
            provider("not-on-path", "    command: [no-such-program-anywhere]\n"),
            provider("good", "    command: [./cloud.sh]\n    timeout: 5\n"),
        ),
    );
    let out = sb.run(
        &["-c", &config.display().to_string(), "config-validate"],
        None,
    );
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}{}",
        stdout(&out),
        stderr(&out)
    );
    let err = stderr(&out);
    assert!(err.contains("4 configuration errors"), "{err}");
    assert!(
        err.contains("providers[0].command: required key `command` is missing"),
        "{err}"
    );
    let dir = sb.path().display().to_string();
    assert!(
        err.contains(&format!(
            "providers[1].command: program \"{dir}/./no-such-cloud.sh\" does not exist"
        )),
        "{err}"
    );
    assert!(
        err.contains(&format!(
            "providers[2].command: program \"{dir}/./not-executable.sh\" is not executable"
        )),
        "{err}"
    );
    assert!(
        err.contains(
            "providers[3].command: program \"no-such-program-anywhere\" is not found on PATH"
        ),
        "{err}"
    );
    assert!(!err.contains("providers[4]"), "{err}");
}

const STATIC_PROVIDER: &str = "zookeeper-servers: [{host: zk.example.org}]
labels: [{name: small}, {name: large}]
providers:
  - name: lab
    driver: static
    pools:
      - name: main
        nodes:
          - {name: host1.example.org, labels: small large, host-key: 'ssh-ed25519 AAAA'}
          - {name: host2.example.org, labels: [small], username: ci, connection-port: 2222, max-parallel-jobs: 2}
";

#[test]
fn a_static_provider_validates_without_any_clouds_yaml() {
    let sb = Sandbox::new();
    let config = sb.write("nodepool.yaml", STATIC_PROVIDER);
    // No clouds.yaml anywhere: a static provider needs none.
    let out = sb.run(
        &["-c", &config.display().to_string(), "config-validate"],
        None,
    );
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}{}",
        stdout(&out),
        stderr(&out)
    );
    assert!(stderr(&out).is_empty(), "{}", stderr(&out));
}

#[test]
fn static_hosts_errors_are_located() {
    let sb = Sandbox::new();
    let config = sb.write(
        "nodepool.yaml",
        "labels: [{name: small}]
providers:
  - name: lab
    driver: static
    pools:
      - name: main
        nodes:
          - {name: a.example.org, labels: small}
          - {labels: small}
          - {name: a.example.org, labels: [small, gpu], max-parallel-jobs: 0}
          - {name: b.example.org, labels: small, connection-port: 0, flavor-name: x}
      - name: other
        labels: [{name: small}]
        nodes:
          - {name: a.example.org, labels: small, username: zuul}
",
    );
    let c = config.display().to_string();
    let out = sb.run(&["-c", &c, "config-validate"], None);
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    assert_eq!(
        stderr(&out),
        format!(
            "{c}: 8 configuration errors:
  providers[0].pools[0].nodes[1].name: required key `name` is missing
  providers[0].pools[0].nodes[2].max-parallel-jobs: must be at least 1, found 0
  providers[0].pools[0].nodes[3].connection-port: must be a TCP port (1-65535), found 0
  providers[0].pools[0].nodes[3].flavor-name: unknown key `flavor-name`
  providers[0].pools[1].labels: unknown key `labels`
  providers[0].pools[0].nodes[2].labels[1]: unknown label \"gpu\" (not in the top-level `labels`)
  providers[0].pools[0].nodes[2].name: host \"a.example.org\" (user \"zuul\", port 22) is already listed at providers[0].pools[0].nodes[0].name
  providers[0].pools[1].nodes[0].name: host \"a.example.org\" (user \"zuul\", port 22) is already listed at providers[0].pools[0].nodes[0].name
"
        )
    );
}

#[test]
fn ready_scripts_are_found_beside_the_file_and_mistakes_are_named() {
    // Seeds 002 and 003: `script-dir` relative to nodepool.yaml, the
    // label's `ready-script`, the image's `username` and `private-key`.
    let sb = Sandbox::new();
    let config = sb.write(
        "nodepool.yaml",
        "script-dir: scripts
labels:
  - name: small
    ready-script: ready.sh
providers:
  - name: sim
    driver: simulated
    cloud-images:
      - {name: cirros, username: cirros, private-key: keys/id_ed25519}
    pools: [{name: main, labels: [{name: small, cloud-image: cirros, min-ram: 512}]}]
",
    );
    let c = config.display().to_string();
    let out = sb.run(&["-c", &c, "config-validate", "--no-clouds"], None);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let err = stderr(&out);
    let script = sb.path().join("scripts/ready.sh");
    let key = sb.path().join("keys/id_ed25519");
    for line in [
        format!(
            "labels[0].ready-script: ready script \"ready.sh\" not found: {} is not a file",
            script.display()
        ),
        format!(
            "providers[0].cloud-images[0].private-key: cannot read private key {} (ready script \"ready.sh\" logs in with it)",
            key.display()
        ),
    ] {
        assert!(err.contains(&line), "{line:?} not in:\n{err}");
    }

    std::fs::create_dir(sb.path().join("scripts")).expect("mkdir");
    std::fs::create_dir(sb.path().join("keys")).expect("mkdir");
    sb.write("scripts/ready.sh", "#!/bin/sh\ntrue\n");
    sb.write("keys/id_ed25519", "a key\n");
    let out = sb.run(&["-c", &c, "config-validate", "--no-clouds"], None);
    assert!(out.status.success(), "{}", stderr(&out));
}

#[test]
fn a_validate_script_needs_its_file_a_login_and_a_label_that_boots_the_image() {
    // Issue 14: `validate` on a provider diskimage boot-tests each upload
    // with a server of a pool label that uses the image, logged in to as
    // the diskimage's `username` with its `private-key`.
    let sb = Sandbox::new();
    let config = sb.write(
        "nodepool.yaml",
        "script-dir: scripts
labels: [{name: small}]
diskimages:
  - {name: deb, username: zuul}
providers:
  - name: sim
    driver: simulated
    diskimages:
      - {name: deb, validate: {script: check.sh, timeout: 0}}
    pools: [{name: main, labels: []}]
",
    );
    let c = config.display().to_string();
    let out = sb.run(&["-c", &c, "config-validate", "--no-clouds"], None);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let err = stderr(&out);
    let script = sb.path().join("scripts/check.sh");
    for line in [
        "providers[0].diskimages[0].validate.timeout: must be a positive number of seconds, found 0".to_owned(),
        format!(
            "providers[0].diskimages[0].validate.script: validation script \"check.sh\" not found: {} is not a file",
            script.display()
        ),
        "providers[0].diskimages[0].validate: validation script \"check.sh\" runs as the image's login: set `private-key` on diskimages[0]".to_owned(),
        "providers[0].diskimages[0].validate: the test server is booted with a pool label of this provider, but no pool label uses image \"deb\"".to_owned(),
    ] {
        assert!(err.contains(&line), "{line:?} not in:\n{err}");
    }

    std::fs::create_dir(sb.path().join("scripts")).expect("mkdir");
    sb.write("scripts/check.sh", "#!/bin/sh\ntrue\n");
    sb.write("id_ed25519", "a key\n");
    sb.write(
        "nodepool.yaml",
        "script-dir: scripts
labels: [{name: small}]
diskimages:
  - {name: deb, username: zuul, private-key: id_ed25519}
providers:
  - name: sim
    driver: simulated
    diskimages:
      - {name: deb, validate: {script: check.sh, timeout: 60}}
    pools: [{name: main, labels: [{name: small, diskimage: deb, min-ram: 512}]}]
",
    );
    let out = sb.run(&["-c", &c, "config-validate", "--no-clouds"], None);
    assert!(out.status.success(), "{}", stderr(&out));
}
