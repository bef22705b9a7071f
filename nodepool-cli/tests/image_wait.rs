//! `nodepool image-build --wait` and `image-upload --wait` as processes,
//! following the real `nodepool-builder` daemon (another process) through
//! the store: the build's diskimage-builder phases (from a stand-in
//! `disk-image-create` that prints DIB's phase lines and waits at each
//! phase for the test to let it go on, so the CLI sees every phase), the
//! upload's bytes (the simulated cloud counts what it reads), a failing
//! build named with its phase and output, and `--timeout`; and
//! `image-update --wait`, following a snapshot image's setup (over SSH, at
//! a real sshd) to its cloud image or its failure.

mod common;

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{Backend, Fixture};
use nodepool_core::model::UploadState;
use tokio::io::AsyncReadExt;

const NODEPOOL: &str = env!("CARGO_BIN_EXE_nodepool");
const BUILDER: &str = env!("CARGO_BIN_EXE_nodepool-builder");
const LIMIT: Duration = Duration::from_secs(120);

/// A stand-in for `disk-image-create` printing DIB's phase lines, each
/// phase held until the test creates `<gates>/<name>`. Image `bad` fails
/// in its root phase.
fn fake_dib(gates: &Path) -> String {
    format!(
        r#"#!/bin/sh
set -e
[ "$1" = -x ] || {{ echo "unexpected arguments: $*" >&2; exit 2; }}
gate() {{ while [ ! -e "{gates}/$1" ]; do sleep 0.05; done; }}
at="2026-12-04 14:15:36.123 |"
echo "$at Running hooks from /tmp/dib_build.x/hooks/root.d"
if [ "$DIB_IMAGE_NAME" = bad ]; then
  echo "$at dib-run-parts Running /tmp/dib_build.x/hooks/root.d/10-doomed"
  gate bad
  echo "$at ERROR: the doomed element broke"
  exit 3
fi
echo "$at dib-run-parts Running /tmp/dib_build.x/hooks/root.d/10-fake-root"
gate root
echo "$at Running hooks from /tmp/in_target.d/install.d"
echo "$at dib-run-parts Running /tmp/in_target.d/install.d/20-fake-install"
gate install
head -c 65536 /dev/urandom > "$DIB_IMAGE_FILENAME.qcow2"
md5sum "$DIB_IMAGE_FILENAME.qcow2" > "$DIB_IMAGE_FILENAME.qcow2.md5"
sha256sum "$DIB_IMAGE_FILENAME.qcow2" > "$DIB_IMAGE_FILENAME.qcow2.sha256"
echo "$at Build completed successfully"
"#,
        gates = gates.display()
    )
}

fn body(work: &Path) -> String {
    format!(
        r#"images-dir: {w}/images
build-log-dir: {w}/logs
labels:
  - name: small
diskimages:
  - name: deb
    dib-cmd: {w}/fake-dib
    elements: [debian-minimal]
  - name: bad
    dib-cmd: {w}/fake-dib
    elements: [debian-minimal]
providers:
  - name: sim
    driver: simulated
    diskimages: [{{name: deb}}, {{name: bad}}]
    pools:
      - name: main
        max-servers: 2
        labels: [{{name: small, diskimage: deb, flavor-name: "Fake Flavor"}}]
"#,
        w = work.display()
    )
}

/// A running CLI process whose output is collected as it comes.
struct Watched {
    child: tokio::process::Child,
    stdout: Arc<Mutex<String>>,
    stderr: Arc<Mutex<String>>,
}

fn collect(mut r: impl tokio::io::AsyncRead + Unpin + Send + 'static) -> Arc<Mutex<String>> {
    let text = Arc::new(Mutex::new(String::new()));
    let keep = text.clone();
    tokio::spawn(async move {
        let mut buf = [0u8; 4096];
        while let Ok(n) = r.read(&mut buf).await {
            if n == 0 {
                break;
            }
            keep.lock()
                .expect("output")
                .push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    });
    text
}

impl Watched {
    fn start(f: &Fixture, args: &[&str]) -> Self {
        let mut child = tokio::process::Command::new(NODEPOOL)
            .arg("-c")
            .arg(&f.config_path)
            .args(args)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("start nodepool");
        let stdout = collect(child.stdout.take().expect("stdout"));
        let stderr = collect(child.stderr.take().expect("stderr"));
        Watched {
            child,
            stdout,
            stderr,
        }
    }

    fn out(&self) -> String {
        self.stdout.lock().expect("output").clone()
    }

    fn err(&self) -> String {
        self.stderr.lock().expect("output").clone()
    }

    /// Exit code once it exited.
    fn exited(&mut self) -> Option<i32> {
        self.child
            .try_wait()
            .expect("wait")
            .map(|s| s.code().unwrap_or(-1))
    }

    /// Waits for the exit and the end of its output.
    async fn finish(&mut self) -> i32 {
        let status = tokio::time::timeout(LIMIT, self.child.wait())
            .await
            .expect("the command finishes")
            .expect("wait");
        // The readers end at end of file, right after the exit.
        common::eventually(Duration::from_secs(10), "the end of its output", || {
            let done = Arc::strong_count(&self.stdout) == 1 && Arc::strong_count(&self.stderr) == 1;
            async move { done }
        })
        .await;
        status.code().unwrap_or(-1)
    }
}

fn gate(gates: &Path, name: &str) {
    std::fs::write(gates.join(name), "").expect("open the gate");
}

async fn image_wait_follows_the_builder(backend: Backend) {
    use std::os::unix::fs::PermissionsExt;
    let work = tempfile::tempdir().expect("tempdir");
    let w = work.path();
    let gates = w.join("gates");
    std::fs::create_dir(&gates).expect("gates dir");
    let dib = w.join("fake-dib");
    std::fs::write(&dib, fake_dib(&gates)).expect("write fake dib");
    std::fs::set_permissions(&dib, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let f = Fixture::with_body(backend, &body(w)).await;

    // Requested before any builder runs, so the builds the daemon makes
    // are the ones these requests asked for.
    let mut deb = Watched::start(&f, &["image-build", "deb", "--wait"]);
    let mut bad = Watched::start(&f, &["image-build", "bad", "--wait"]);
    common::eventually(LIMIT, "both requests recorded", || {
        let (a, b) = (deb.out(), bad.out());
        async move { a.contains("build of deb requested") && b.contains("build of bad requested") }
    })
    .await;
    let log = w.join("builder.log");
    let mut builder = tokio::process::Command::new(BUILDER)
        .arg("-c")
        .arg(&f.config_path)
        .args(["--log-format", "json", "-d"])
        .args(["--webapp-port", "0", "--webapp-listen-address", "127.0.0.1"])
        .stderr(std::fs::File::create(&log).expect("log file"))
        .kill_on_drop(true)
        .spawn()
        .expect("start nodepool-builder");

    // Each phase is let go only once the CLI showed it; builds may run in
    // either order, so every gate is watched at once.
    let deadline = tokio::time::Instant::now() + LIMIT;
    let (mut deb_code, mut bad_code) = (None, None);
    while deb_code.is_none() || bad_code.is_none() {
        let (de, be) = (deb.err(), bad.err());
        if de.contains("of deb: phase root (10-fake-root)\n") {
            gate(&gates, "root");
        }
        if de.contains("of deb: phase install (20-fake-install)\n") {
            gate(&gates, "install");
        }
        if be.contains("of bad: phase root (10-doomed)\n") {
            gate(&gates, "bad");
        }
        deb_code = deb_code.or_else(|| deb.exited());
        bad_code = bad_code.or_else(|| bad.exited());
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out; deb:\n{de}\nbad:\n{be}\nbuilder log:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // The build: plain lines (no terminal), one per phase, in order.
    assert_eq!(deb.finish().await, 0, "{}\n{}", deb.out(), deb.err());
    let err = deb.err();
    assert!(
        !err.contains('\r'),
        "no redrawing without a terminal: {err:?}"
    );
    let root = err
        .find("phase root (10-fake-root)")
        .expect("root phase shown");
    let install = err
        .find("phase install (20-fake-install)")
        .expect("install phase shown");
    assert!(root < install, "{err}");
    let out = deb.out();
    let ready = out.lines().last().expect("a last line");
    assert!(
        ready.starts_with("build ") && ready.ends_with(" of deb ready"),
        "{out}"
    );

    // The failed build: exit 1, one error naming the phase and the output.
    assert_eq!(bad.finish().await, 1, "{}\n{}", bad.out(), bad.err());
    let err = bad.err();
    let line = err
        .lines()
        .find(|l| l.starts_with("error: "))
        .unwrap_or_else(|| panic!("an error line: {err}"));
    assert!(line.contains("of bad failed in phase root"), "{line}");
    assert!(line.contains("the doomed element broke"), "{line}");

    // The upload: once the builder's own upload of the new build is
    // done, a requested one is followed to its end.
    let store = f.store.clone();
    common::eventually(LIMIT, "the builder's upload of deb", || {
        let store = store.clone();
        async move {
            let st = store.image_state().await.expect("image state");
            st.uploads
                .iter()
                .any(|u| u.image == "deb" && u.upload.state == UploadState::Ready)
        }
    })
    .await;
    let mut up = Watched::start(&f, &["image-upload", "sim", "deb", "--wait"]);
    assert_eq!(up.finish().await, 0, "{}\n{}", up.out(), up.err());
    let out = up.out();
    let last = out.lines().last().expect("a last line");
    assert!(
        last.starts_with("upload ") && last.contains(" to sim ready (64.0 KiB): cloud image "),
        "{out}"
    );
    let id = last.split(' ').nth(1).expect("upload id");
    let st = f.store.image_state().await.expect("image state");
    let rec = st
        .uploads
        .iter()
        .find(|u| u.image == "deb" && u.id == id)
        .unwrap_or_else(|| panic!("upload {id} in {st:#?}"));
    let p = rec.upload.progress().expect("progress in the record");
    assert_eq!((p.bytes_sent, p.total_bytes), (65_536, 65_536));

    builder.start_kill().expect("stop the builder");
    let _ = builder.wait().await;
}
both_stores!(image_wait_follows_the_builder);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_gives_up_at_the_timeout_and_the_request_stays() {
    let work = tempfile::tempdir().expect("tempdir");
    let f = Fixture::with_body(Backend::Sqlite, &body(work.path())).await;
    let mut cmd = tokio::process::Command::new(NODEPOOL);
    cmd.arg("-c")
        .arg(&f.config_path)
        .args(["image-build", "deb", "--wait", "--timeout", "1"]);
    let out = common::run_process(cmd, "").await;
    out.fails_with("gave up waiting for the build of deb after 1 s (--timeout)");
    assert!(
        out.stderr.contains("waiting for a builder to start deb\n"),
        "{}",
        out.stderr
    );
    let st = f.store.image_state().await.expect("image state");
    assert!(st.build_requests.contains_key("deb"), "{st:#?}");

    // --timeout means nothing without --wait.
    let mut cmd = tokio::process::Command::new(NODEPOOL);
    cmd.arg("-c")
        .arg(&f.config_path)
        .args(["image-build", "deb", "--timeout", "1"]);
    let out = common::run_process(cmd, "").await;
    assert!(matches!(out.code, Some(c) if c != 0), "{}", out.stderr);
    assert!(out.stderr.contains("--wait"), "{}", out.stderr);
}

/// On a terminal (a pseudo-terminal made by util-linux `script`) the
/// progress is one line redrawn in place, ended before the error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_terminal_gets_the_progress_redrawn_in_place() {
    let work = tempfile::tempdir().expect("tempdir");
    let f = Fixture::with_body(Backend::Sqlite, &body(work.path())).await;
    let line = format!(
        "{NODEPOOL} -c {} image-build deb --wait --timeout 1",
        f.config_path.display()
    );
    let mut cmd = tokio::process::Command::new("script");
    cmd.args(["-qec", &line, "/dev/null"]);
    let out = common::run_process(cmd, "").await;
    assert_eq!(out.code, Some(1), "{:?}\n{}", out.stdout, out.stderr);
    assert!(
        out.stdout
            .contains("\r\x1b[2Kwaiting for a builder to start deb\r\nerror: gave up waiting"),
        "{:?}",
        out.stdout
    );
}

/// Seed 002's "Manually generate a new snapshot": `image-update PROVIDER
/// IMAGE --wait` follows the snapshot the real `nodepool-builder` process
/// makes (its setup script run over SSH on a simulated server answering at
/// a real sshd) to its cloud image, and a failing setup script to its
/// reason.
async fn image_update_wait_follows_the_snapshot(backend: Backend) {
    let sshd = common::sshd::Sshd::start_with_login();
    let f = Fixture::with_body_in(backend, |d| {
        common::snapshot_body(d, &sshd, "sim", "prepared")
    })
    .await;
    let mut made = Watched::start(&f, &["image-update", "sim", "prepared", "--wait"]);
    common::eventually(LIMIT, "the request recorded", || {
        let out = made.out();
        async move { out.contains("snapshot of prepared in sim requested\n") }
    })
    .await;
    let log = f.dir.path().join("builder.log");
    let mut builder = tokio::process::Command::new(BUILDER)
        .arg("-c")
        .arg(&f.config_path)
        .arg("--no-webapp")
        .stderr(std::fs::File::create(&log).expect("log file"))
        .kill_on_drop(true)
        .spawn()
        .expect("start nodepool-builder");
    let builder_log = || std::fs::read_to_string(&log).unwrap_or_default();

    // Ready: the last line names the build, its upload and cloud image,
    // as the store has them.
    let code = made.finish().await;
    let (out, err) = (made.out(), made.err());
    assert_eq!(code, 0, "{out}\n{err}\nbuilder log:\n{}", builder_log());
    let last = out.lines().last().expect("a last line");
    let (build, upload, ext) = last
        .strip_prefix("snapshot ")
        .and_then(|r| r.split_once(" of prepared in sim ready: upload "))
        .and_then(|(b, r)| r.split_once(", cloud image ").map(|(u, e)| (b, u, e)))
        .unwrap_or_else(|| panic!("the snapshot named: {out}"));
    let st = f.store.image_state().await.expect("image state");
    let rec = st
        .builds
        .iter()
        .find(|b| b.image == "prepared" && b.id == build)
        .unwrap_or_else(|| panic!("build {build} in {st:#?}"));
    assert_eq!(rec.build.state, nodepool_core::model::BuildState::Ready);
    assert!(
        st.uploads.iter().any(|u| u.build_id == build
            && u.id == upload
            && u.provider == "sim"
            && u.upload.state == UploadState::Ready
            && u.upload.external_id.as_deref() == Some(ext)),
        "{last}\n{st:#?}"
    );

    // The builder removes the served request just after the build is
    // ready: a new one is recorded only once it is gone.
    let store = f.store.clone();
    common::eventually(LIMIT, "the served request removed", || {
        let store = store.clone();
        async move {
            let st = store.image_state().await.expect("image state");
            !st.build_requests.contains_key("prepared")
        }
    })
    .await;

    // A failing setup script: exit 1, one error with its status and output.
    std::fs::write(f.dir.path().join("fail"), "").expect("make setup fail");
    let mut failed = Watched::start(&f, &["image-update", "sim", "prepared", "--wait"]);
    let code = failed.finish().await;
    let err = failed.err();
    assert_eq!(
        code,
        1,
        "{}\n{err}\nbuilder log:\n{}",
        failed.out(),
        builder_log()
    );
    let line = err
        .lines()
        .find(|l| l.starts_with("error: "))
        .unwrap_or_else(|| panic!("an error line: {err}"));
    assert!(line.contains(" of prepared failed: "), "{line}");
    assert!(line.contains("exited with status 4"), "{line}");
    assert!(line.contains("setup: no good"), "{line}");

    builder.start_kill().expect("stop the builder");
    let _ = builder.wait().await;
}
both_stores!(image_update_wait_follows_the_snapshot);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_for_a_snapshot_gives_up_at_the_timeout() {
    let sshd = common::sshd::Sshd::start_with_login();
    let f = Fixture::with_body_in(Backend::Sqlite, |d| {
        common::snapshot_body(d, &sshd, "sim", "prepared")
    })
    .await;
    let mut cmd = tokio::process::Command::new(NODEPOOL);
    cmd.arg("-c").arg(&f.config_path).args([
        "image-update",
        "sim",
        "prepared",
        "--wait",
        "--timeout",
        "1",
    ]);
    let out = common::run_process(cmd, "").await;
    assert_eq!(out.stdout, "snapshot of prepared in sim requested\n");
    out.fails_with("gave up waiting for the build of prepared after 1 s (--timeout)");
    let st = f.store.image_state().await.expect("image state");
    assert!(st.build_requests.contains_key("prepared"), "{st:#?}");
}
