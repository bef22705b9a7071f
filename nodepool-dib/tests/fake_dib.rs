//! `DibBuilder` end to end against `fake-disk-image-create`, a real program
//! (this crate's binary): command line, environment, log streaming,
//! checksums, failures, timeout, cancel, sweeps and vhd conversion.

// Helpers outside #[test] fns panic on purpose, like the tests themselves.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use nodepool_dib::{DibBuilder, DibOptions};
use nodepool_model::image_builder::{BuildError, BuildSpec, ImageBuilder};
use tokio_util::sync::CancellationToken;

const FAKE: &str = env!("CARGO_BIN_EXE_fake-disk-image-create");

/// A scratch installation: images, logs and elements directories.
struct Site {
    dir: tempfile::TempDir,
}

impl Site {
    fn new() -> Self {
        Site {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn path(&self, p: &str) -> PathBuf {
        self.dir.path().join(p)
    }

    /// A configuration with the given `diskimages:` YAML (indented list
    /// items) and top-level directories inside the site.
    fn config(&self, diskimages: &str) -> nodepool_model::config::Config {
        let yaml = format!(
            "images-dir: {}\nbuild-log-dir: {}\nelements-dir: {}\ndiskimages:\n{diskimages}",
            self.path("images").display(),
            self.path("logs").display(),
            self.path("elements").display(),
        );
        config(&yaml)
    }

    /// One simple image using the fake, with extra `env-vars` lines.
    fn spec(&self, name: &str, formats: &str, env: &[(&str, &str)]) -> BuildSpec {
        let mut env_yaml = String::new();
        for (k, v) in env {
            env_yaml.push_str(&format!("      {k}: {}\n", yaml_str(v)));
        }
        let env_block = if env.is_empty() {
            String::new()
        } else {
            format!("    env-vars:\n{env_yaml}")
        };
        let c = self.config(&format!(
            "  - name: {name}\n    dib-cmd: {FAKE}\n    elements: [debian-minimal, vm]\n    formats: [{formats}]\n    release: bookworm\n{env_block}"
        ));
        spec_from_config(&c, name, "0123abcd")
    }

    fn builder(&self) -> DibBuilder {
        DibBuilder::new(DibOptions::default().with_term_grace(Duration::from_secs(5)))
    }
}

fn yaml_str(s: &str) -> String {
    format!("{s:?}")
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn assert_swept(builder: &DibBuilder, spec: &BuildSpec) {
    let tmp = builder.tmp_dir(spec).unwrap();
    assert!(!tmp.exists(), "{} left behind", tmp.display());
    let parent = spec.output_base.parent().unwrap();
    let partial: Vec<_> = std::fs::read_dir(parent)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with("-new"))
        .collect();
    assert!(partial.is_empty(), "partial outputs left: {partial:?}");
}

#[tokio::test]
async fn command_line_and_environment_reach_dib() {
    let site = Site::new();
    // Inheritance: elements appended, env-vars merged (child wins).
    let c = site.config(&format!(
        r#"  - name: base
    abstract: true
    elements: [debian-minimal]
    env-vars: {{DIB_CHECKSUM: "1", WHO: base, KEEP: kept}}
  - name: deb
    parent: base
    release: bookworm
    dib-cmd: env 'GREETING=hello world' %p/fake-disk-image-create
    elements: [vm, "simple-init growroot"]
    formats: [qcow2, raw]
    env-vars:
      WHO: child
      FAKE_DIB_EXPECT_ARGS: "-x\n-t\nqcow2,raw\n--checksum\n--no-tmpfs\n--qemu-img-options\ncompat=0.10\n-o\n{base}\ndebian-minimal\nvm\nsimple-init\ngrowroot"
      FAKE_DIB_EXPECT_ENV: "DIB_RELEASE=bookworm\nDIB_IMAGE_NAME=deb\nDIB_IMAGE_FILENAME={base}\nELEMENTS_PATH={elements}\nWHO=child\nKEEP=kept\nDIB_CHECKSUM=1\nGREETING=hello world\nHOME={home}\n!NOT_SET_ANYWHERE"
"#,
        base = site.path("images/deb-0123abcd").display(),
        elements = site.path("elements").display(),
        home = std::env::var("HOME").unwrap_or_default(),
    ));
    let spec = spec_from_config(&c, "deb", "0123abcd");
    let fake_dir = Path::new(FAKE).parent().unwrap();
    let builder = DibBuilder::new(DibOptions::default().with_package_dir(fake_dir));
    let cmd = builder.plan(&spec).unwrap();
    assert_eq!(cmd.program, "env");

    let out = builder
        .build(&spec, CancellationToken::new())
        .await
        .unwrap_or_else(|e| panic!("{e:?}\n{}", read(&spec.log_path)));
    let formats: Vec<_> = out.artifacts.iter().map(|a| a.format.as_str()).collect();
    assert_eq!(formats, ["qcow2", "raw"]);
    for a in &out.artifacts {
        assert_eq!(
            a.path,
            site.path(&format!("images/deb-0123abcd.{}", a.format))
        );
        assert_eq!(a.size, 65_536);
        assert_eq!(a.sha256.as_deref(), Some(sha256_of(&a.path).as_str()));
        assert_eq!(a.md5.as_ref().map(String::len), Some(32));
    }
    let args = read(&site.path("images/deb-0123abcd.d/dib-manifests/dib_arguments"));
    assert!(
        args.starts_with("-x -t qcow2,raw --checksum --no-tmpfs"),
        "{args}"
    );
    // The per-build TMP_DIR was under the default work dir and is gone.
    let tmp = builder.tmp_dir(&spec).unwrap();
    assert_eq!(tmp, site.path("images/.dib-tmp/deb-0123abcd"));
    assert_swept(&builder, &spec);
}

#[tokio::test]
async fn the_fake_refuses_a_wrong_environment_loudly() {
    let site = Site::new();
    let spec = site.spec(
        "deb",
        "raw",
        &[("FAKE_DIB_EXPECT_ENV", "DIB_RELEASE=trixie")],
    );
    let e = site
        .builder()
        .build(&spec, CancellationToken::new())
        .await
        .unwrap_err();
    let BuildError::Failed {
        exit_code,
        log_tail,
    } = e
    else {
        panic!("{e:?}")
    };
    assert_eq!(exit_code, Some(2));
    assert!(
        log_tail
            .contains("bad environment: DIB_RELEASE is Some(\"bookworm\"), expected \"trixie\""),
        "{log_tail}"
    );
}

#[tokio::test]
async fn log_streams_every_line_and_ends_with_the_exit_code() {
    let site = Site::new();
    let spec = site.spec(
        "deb",
        "raw",
        &[("FAKE_DIB_LINES", "2000"), ("FAKE_DIB_LONG_LINE", "30000")],
    );
    site.builder()
        .build(&spec, CancellationToken::new())
        .await
        .unwrap();
    let log = read(&spec.log_path);
    for i in [0, 1, 999, 1999] {
        assert!(
            log.contains(&format!("| fake-dib: line {i} of 2000\n")),
            "line {i}"
        );
    }
    let long = format!("| fake-dib: long line {}\n", "x".repeat(30_000));
    assert!(log.contains(&long), "the long line is not whole in the log");
    assert!(
        log.contains("| fake-dib: warning 1975 on stderr\n"),
        "stderr is in the log"
    );
    assert!(log.contains("Build completed successfully\n"));
    assert!(
        log.ends_with("\nExit code: 0\n"),
        "{}",
        &log[log.len() - 200..]
    );
    // Timestamped like DIB: "YYYY-MM-DD HH:MM:SS.mmm | ".
    let first = log.lines().next().unwrap();
    assert_eq!(&first[23..26], " | ", "{first}");
}

#[tokio::test]
async fn a_corrupted_or_missing_file_is_bad_output() {
    let site = Site::new();
    let spec = site.spec("deb", "qcow2, raw", &[("FAKE_DIB_CORRUPT", "raw")]);
    let e = site
        .builder()
        .build(&spec, CancellationToken::new())
        .await
        .unwrap_err();
    let BuildError::BadOutput(msg) = e else {
        panic!("{e:?}")
    };
    assert!(msg.starts_with("diskimage deb: "), "{msg}");
    assert!(msg.contains("deb-0123abcd.raw has sha256"), "{msg}");
    assert!(msg.contains(&format!("says {}", "0".repeat(64))), "{msg}");

    let site = Site::new();
    let spec = site.spec("deb", "qcow2, raw", &[("FAKE_DIB_SKIP", "qcow2")]);
    let e = site
        .builder()
        .build(&spec, CancellationToken::new())
        .await
        .unwrap_err();
    let BuildError::BadOutput(msg) = e else {
        panic!("{e:?}")
    };
    assert!(msg.contains("deb-0123abcd.qcow2 was not written"), "{msg}");
}

#[tokio::test]
async fn tar_has_no_dib_checksums_so_they_are_computed() {
    let site = Site::new();
    let spec = site.spec("deb", "tar", &[]);
    let out = site
        .builder()
        .build(&spec, CancellationToken::new())
        .await
        .unwrap();
    let tar = out.get("tar").unwrap();
    assert_eq!(tar.sha256.as_deref(), Some(sha256_of(&tar.path).as_str()));
    let file = read(&site.path("images/deb-0123abcd.tar.sha256"));
    assert_eq!(
        file,
        format!("{}  {}\n", sha256_of(&tar.path), tar.path.display())
    );
}

#[tokio::test]
async fn a_failed_build_reports_its_exit_code_and_log_tail() {
    let site = Site::new();
    let spec = site.spec(
        "deb",
        "qcow2",
        &[("FAKE_DIB_FAIL", "7"), ("FAKE_DIB_LINES", "300")],
    );
    let builder = site.builder();
    let e = builder
        .build(&spec, CancellationToken::new())
        .await
        .unwrap_err();
    let BuildError::Failed {
        exit_code,
        log_tail,
    } = e
    else {
        panic!("{e:?}")
    };
    assert_eq!(exit_code, Some(7));
    let lines: Vec<_> = log_tail.lines().collect();
    assert_eq!(lines.len(), 50, "{log_tail}");
    assert!(
        lines[49].ends_with("ERROR: something inside the image failed"),
        "{log_tail}"
    );
    assert!(!log_tail.contains("line 0 of"), "only the tail");
    assert!(log_tail.len() < 50 * 1100, "bounded: {}", log_tail.len());
    assert!(read(&spec.log_path).ends_with("failed\nExit code: 7\n"));
    // Manifests stay (for the runtime's cleanup); temp files do not.
    assert!(site.path("images/deb-0123abcd.d/dib-manifests").is_dir());
    assert_swept(&builder, &spec);
}

#[tokio::test]
async fn a_missing_or_unparsable_dib_cmd_fails_with_its_name() {
    let site = Site::new();
    let c = site.config("  - name: deb\n    dib-cmd: /nonexistent/disk-image-create\n    elements: [x]\n    formats: [raw]\n");
    let spec = spec_from_config(&c, "deb", "01");
    let e = site
        .builder()
        .build(&spec, CancellationToken::new())
        .await
        .unwrap_err();
    let BuildError::Failed {
        exit_code: None,
        log_tail,
    } = e
    else {
        panic!("{e:?}")
    };
    assert!(
        log_tail.starts_with("cannot run /nonexistent/disk-image-create: No such file"),
        "{log_tail}"
    );
    assert!(read(&spec.log_path).contains("cannot run /nonexistent/disk-image-create"));

    let c = site.config(
        "  - name: deb\n    dib-cmd: \"dib 'unclosed\"\n    elements: [x]\n    formats: [raw]\n",
    );
    let spec = spec_from_config(&c, "deb", "02");
    let e = site
        .builder()
        .build(&spec, CancellationToken::new())
        .await
        .unwrap_err();
    let BuildError::Failed {
        exit_code: None,
        log_tail,
    } = e
    else {
        panic!("{e:?}")
    };
    assert_eq!(
        log_tail,
        "diskimage deb: dib-cmd \"dib 'unclosed\": no closing single quote"
    );
}

#[tokio::test]
async fn processes_left_by_a_successful_build_are_killed() {
    let site = Site::new();
    let spec = site.spec("deb", "raw", &[("FAKE_DIB_ORPHAN", "1")]);
    site.builder()
        .build(&spec, CancellationToken::new())
        .await
        .unwrap();
    let log = read(&spec.log_path);
    let pgid = fake_pids(&log).0.unwrap();
    let child: i32 = log
        .split("leaving child ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no child in {log}"));
    assert!(!alive(child), "child {child} outlived the build");
    assert_eq!(live_group_members(pgid), Vec::<i32>::new());
}

#[tokio::test]
async fn timeout_kills_the_build_and_everything_in_its_group() {
    let site = Site::new();
    let mut spec = site.spec("deb", "qcow2", &[("FAKE_DIB_HANG", "1")]);
    spec.timeout = Duration::from_secs(3);
    let builder = site.builder();
    let e = builder
        .build(&spec, CancellationToken::new())
        .await
        .unwrap_err();
    assert_eq!(e, BuildError::Timeout(Duration::from_secs(3)));
    let log = read(&spec.log_path);
    let (pgid, child) = fake_pids(&log);
    let (pgid, child) = (
        pgid.unwrap_or_else(|| panic!("no pgid in {log}")),
        child.unwrap_or_else(|| panic!("the fake did not reach its hang in 3 s:\n{log}")),
    );
    // The fake ran its "trap" on SIGTERM; its child ignored nothing but
    // was left by it, and the group kill got it.
    assert!(log.contains("SIGTERM, running the cleanup trap"), "{log}");
    assert!(log.ends_with("Exit code: 143\n"), "{log}");
    assert_eq!(live_group_members(pgid), Vec::<i32>::new());
    assert!(!alive(child), "child {child} survived");
    assert_swept(&builder, &spec);
}

#[tokio::test]
async fn cancel_kills_a_build_that_ignores_sigterm() {
    let site = Site::new();
    let spec = site.spec("deb", "qcow2", &[("FAKE_DIB_HANG", "ignore-term")]);
    let builder =
        DibBuilder::new(DibOptions::default().with_term_grace(Duration::from_millis(300)));
    let cancel = CancellationToken::new();
    let task = {
        let (b, s, c) = (builder.clone(), spec.clone(), cancel.clone());
        tokio::spawn(async move { b.build(&s, c).await })
    };
    let log_path = spec.log_path.clone();
    wait_for("the fake to hang", Duration::from_secs(30), || {
        std::fs::read_to_string(&log_path).is_ok_and(|l| l.contains("hanging"))
    })
    .await;
    let (pgid, child) = fake_pids(&read(&log_path));
    let (pgid, child) = (pgid.unwrap(), child.unwrap());
    assert!(alive(child));
    assert!(site.path("images/deb-0123abcd.qcow2-new").exists());

    cancel.cancel();
    let e = task.await.unwrap().unwrap_err();
    assert_eq!(e, BuildError::Cancelled);
    assert_eq!(live_group_members(pgid), Vec::<i32>::new());
    assert!(!alive(child), "child {child} survived");
    assert!(read(&log_path).ends_with("Exit code: -9\n"));
    assert_swept(&builder, &spec);
}

#[tokio::test]
async fn dropping_a_build_kills_and_sweeps_it() {
    let site = Site::new();
    let spec = site.spec("deb", "qcow2", &[("FAKE_DIB_HANG", "ignore-term")]);
    let builder = site.builder();
    let task = {
        let (b, s) = (builder.clone(), spec.clone());
        tokio::spawn(async move { b.build(&s, CancellationToken::new()).await })
    };
    let log_path = spec.log_path.clone();
    wait_for("the fake to hang", Duration::from_secs(30), || {
        std::fs::read_to_string(&log_path).is_ok_and(|l| l.contains("hanging"))
    })
    .await;
    let (pgid, child) = fake_pids(&read(&log_path));
    let (pgid, child) = (pgid.unwrap(), child.unwrap());
    task.abort();
    assert!(task.await.unwrap_err().is_cancelled());
    let tmp = builder.tmp_dir(&spec).unwrap();
    wait_for(
        "the group to die and the sweep to finish",
        Duration::from_secs(20),
        || live_group_members(pgid).is_empty() && !alive(child) && !tmp.exists(),
    )
    .await;
}

#[tokio::test]
async fn concurrent_builds_are_swept_separately() {
    let site = Site::new();
    let hang = site.spec("hang", "raw", &[("FAKE_DIB_HANG", "1")]);
    let ok = site.spec("ok", "raw", &[("FAKE_DIB_LINES", "5000")]);
    let builder = site.builder();
    let cancel = CancellationToken::new();
    let hung = {
        let (b, s, c) = (builder.clone(), hang.clone(), cancel.clone());
        tokio::spawn(async move { b.build(&s, c).await })
    };
    let log_path = hang.log_path.clone();
    wait_for("the fake to hang", Duration::from_secs(30), || {
        std::fs::read_to_string(&log_path).is_ok_and(|l| l.contains("hanging"))
    })
    .await;
    let ok_task = {
        let (b, s) = (builder.clone(), ok.clone());
        tokio::spawn(async move { b.build(&s, CancellationToken::new()).await })
    };
    cancel.cancel();
    assert_eq!(hung.await.unwrap().unwrap_err(), BuildError::Cancelled);
    let out = ok_task.await.unwrap().unwrap();
    assert_eq!(out.get("raw").unwrap().size, 65_536);
    assert_swept(&builder, &hang);
    assert_swept(&builder, &ok);
}

#[tokio::test]
async fn leaked_mounts_and_loop_devices_are_swept_after_a_kill() {
    assert!(
        is_root(),
        "this test needs root (it mounts tmpfs and attaches a loop device, as DIB does); CI runs as root"
    );
    let site = Site::new();
    let spec = site.spec(
        "deb",
        "qcow2",
        &[("FAKE_DIB_LEAK", "1"), ("FAKE_DIB_HANG", "ignore-term")],
    );
    let builder =
        DibBuilder::new(DibOptions::default().with_term_grace(Duration::from_millis(200)));
    let tmp = builder.tmp_dir(&spec).unwrap();
    let cancel = CancellationToken::new();
    let task = {
        let (b, s, c) = (builder.clone(), spec.clone(), cancel.clone());
        tokio::spawn(async move { b.build(&s, c).await })
    };
    let log_path = spec.log_path.clone();
    wait_for("the fake to leak and hang", Duration::from_secs(30), || {
        std::fs::read_to_string(&log_path).is_ok_and(|l| l.contains("hanging"))
    })
    .await;
    // The leak is real before the kill...
    let log = read(&log_path);
    let loop_dev = log
        .split(" loop /dev/")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .unwrap_or_else(|| panic!("no loop device in {log}"))
        .to_owned();
    assert_eq!(mounts_under(&tmp).len(), 2, "{:?}", mounts_under(&tmp));
    assert_eq!(loops_under(&tmp), std::slice::from_ref(&loop_dev));
    let link = PathBuf::from(format!("/dev/mapper/{loop_dev}p1"));
    assert!(link.symlink_metadata().is_ok());

    cancel.cancel();
    assert_eq!(task.await.unwrap().unwrap_err(), BuildError::Cancelled);
    // ...and gone after it.
    assert_eq!(mounts_under(&tmp), Vec::<PathBuf>::new());
    assert_eq!(loops_under(&tmp), Vec::<String>::new());
    assert!(link.symlink_metadata().is_err(), "{} left", link.display());
    assert_swept(&builder, &spec);
}

#[tokio::test]
async fn leaked_mounts_are_swept_after_a_failure_too() {
    assert!(
        is_root(),
        "this test needs root (mount, losetup); CI runs as root"
    );
    let site = Site::new();
    let spec = site.spec(
        "deb",
        "raw",
        &[("FAKE_DIB_LEAK", "1"), ("FAKE_DIB_FAIL", "100")],
    );
    let builder = site.builder();
    let e = builder
        .build(&spec, CancellationToken::new())
        .await
        .unwrap_err();
    assert!(
        matches!(
            e,
            BuildError::Failed {
                exit_code: Some(100),
                ..
            }
        ),
        "{e:?}"
    );
    let log = read(&spec.log_path);
    assert!(log.contains("fake-dib: leaked mounts"), "{log}");
    let tmp = builder.tmp_dir(&spec).unwrap();
    assert_eq!(mounts_under(&tmp), Vec::<PathBuf>::new());
    assert_eq!(loops_under(&tmp), Vec::<String>::new());
    assert_swept(&builder, &spec);
}

/// `qemu-img info`'s "file format" of a file.
fn qemu_format(p: &Path) -> String {
    let o = std::process::Command::new("qemu-img")
        .arg("info")
        .arg(p)
        .output()
        .expect("qemu-img (qemu-utils) is required");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let text = String::from_utf8_lossy(&o.stdout);
    text.lines()
        .find_map(|l| l.strip_prefix("file format: "))
        .unwrap_or_else(|| panic!("no file format in {text}"))
        .trim()
        .to_owned()
}

#[tokio::test]
async fn vhd_is_converted_with_qemu_img_without_vhd_util() {
    let site = Site::new();
    // PATH without vhd-util: the fake (like DIB) would refuse -t vhd.
    let spec = site.spec(
        "deb",
        "raw, vhd",
        &[("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")],
    );
    let builder = site.builder();
    assert_eq!(builder.plan(&spec).unwrap().dib_formats, ["raw"]);
    let out = builder
        .build(&spec, CancellationToken::new())
        .await
        .unwrap_or_else(|e| panic!("{e:?}\n{}", read(&spec.log_path)));
    let vhd = out.get("vhd").unwrap();
    let raw = out.get("raw").unwrap();
    assert_eq!(qemu_format(&vhd.path), "vpc");
    let same = std::process::Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "vpc"])
        .args([&raw.path, &vhd.path])
        .status()
        .unwrap();
    assert!(same.success(), "vhd content differs from raw");
    assert_eq!(vhd.sha256.as_deref(), Some(sha256_of(&vhd.path).as_str()));
    let sums = read(&site.path("images/deb-0123abcd.vhd.sha256"));
    assert!(sums.starts_with(&sha256_of(&vhd.path)));
    let log = read(&spec.log_path);
    assert!(
        log.contains("--- converting to vhd: qemu-img convert -f raw -O vpc"),
        "{log}"
    );
    assert!(log.ends_with("Exit code: 0\n"));
    assert_swept(&builder, &spec);
}

#[tokio::test]
async fn vhd_conversion_source_is_removed_when_raw_was_not_asked_for() {
    let site = Site::new();
    let spec = site.spec(
        "deb",
        "qcow2, vhd",
        &[("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")],
    );
    let out = site
        .builder()
        .build(&spec, CancellationToken::new())
        .await
        .unwrap();
    let formats: Vec<_> = out.artifacts.iter().map(|a| a.format.as_str()).collect();
    assert_eq!(formats, ["qcow2", "vhd"]);
    assert_eq!(qemu_format(&out.get("vhd").unwrap().path), "vpc");
    for f in ["raw", "raw.md5", "raw.sha256", "vhd-new"] {
        assert!(
            !site.path(&format!("images/deb-0123abcd.{f}")).exists(),
            "{f} left"
        );
    }
}

#[tokio::test]
async fn vhd_is_made_by_dib_when_vhd_util_is_on_its_path() {
    use std::os::unix::fs::PermissionsExt;
    let site = Site::new();
    let bin = site.path("bin");
    std::fs::create_dir(&bin).unwrap();
    std::fs::write(bin.join("vhd-util"), "#!/bin/sh\nexit 0\n").unwrap();
    std::fs::set_permissions(bin.join("vhd-util"), std::fs::Permissions::from_mode(0o755)).unwrap();
    let path = format!("{}:/usr/sbin:/usr/bin:/sbin:/bin", bin.display());
    let spec = site.spec("deb", "qcow2, vhd", &[("PATH", &path)]);
    let builder = site.builder();
    assert_eq!(builder.plan(&spec).unwrap().dib_formats, ["qcow2", "vhd"]);
    let out = builder
        .build(&spec, CancellationToken::new())
        .await
        .unwrap();
    let vhd = out.get("vhd").unwrap();
    // The fake's file, verified against the fake's checksum files.
    assert_eq!(vhd.size, 65_536);
    assert_eq!(vhd.sha256.as_deref(), Some(sha256_of(&vhd.path).as_str()));
    assert!(!read(&spec.log_path).contains("converting to vhd"));
}

#[tokio::test]
async fn startup_sweep_cleans_a_dead_builders_leftovers() {
    let site = Site::new();
    let images = site.path("images");
    let stale = images.join(".dib-tmp/old-99");
    std::fs::create_dir_all(stale.join("dib_build.x/mnt")).unwrap();
    std::fs::write(images.join("old-99.qcow2-new"), "partial").unwrap();
    std::fs::write(images.join("old-98.qcow2"), "a finished build").unwrap();
    let mut sleeper = std::process::Command::new("sleep")
        .arg("600")
        .env("TMP_DIR", &stale)
        .spawn()
        .unwrap();
    let pid = sleeper.id() as i32;
    let reports = DibBuilder::default().sweep_work_dir(&images);
    assert_eq!(reports.len(), 1);
    let (dir, report) = &reports[0];
    assert_eq!(dir, &stale);
    assert_eq!(report.killed, [pid]);
    assert!(
        report.dir_removed && report.problems.is_empty(),
        "{report:?}"
    );
    assert!(!stale.exists());
    assert!(!images.join("old-99.qcow2-new").exists());
    assert!(images.join("old-98.qcow2").exists());
    let status = sleeper.wait().unwrap();
    assert!(!status.success());
}

#[tokio::test]
async fn an_unwritable_log_place_is_an_io_error_naming_it() {
    let site = Site::new();
    let mut spec = site.spec("deb", "raw", &[]);
    std::fs::write(site.path("not-a-dir"), "").unwrap();
    spec.log_path = site.path("not-a-dir/deb-0123abcd.log");
    let e = site
        .builder()
        .build(&spec, CancellationToken::new())
        .await
        .unwrap_err();
    let BuildError::Io(msg) = e else {
        panic!("{e:?}")
    };
    assert!(msg.contains("not-a-dir"), "{msg}");
}
