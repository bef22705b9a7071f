//! Nodescan and ready scripts against a real SSH server (issue 14): the
//! simulated cloud's servers answer at a real Debian sshd on 127.0.0.1
//! (`data-plane-host` and the cloud image's `connection-port`), and a
//! real launcher scans its host keys and runs ready scripts on it as the
//! image's `username` with its `private-key`.
//!
//! The launcher's log is captured (this binary's only subscriber) to see
//! the script output at DEBUG and the failure reasons. Tests run in
//! parallel and node ids repeat across stores, so each script prints its
//! test's own directory and a test only reads lines that carry it.

use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use nodepool_core::model::NodeState;
use nodepool_requestor::{NewRequest, Outcome, Requestor};
use nodepool_tests::sshd::Sshd;
use nodepool_tests::{Backend, Clouds, RunningLauncher, TestEnv, eventually};

const WAIT: Duration = Duration::from_secs(60);

/// Everything the process logged, from the first [`capture_log`] on.
static LOG: Mutex<Vec<u8>> = Mutex::new(Vec::new());

struct LogWriter;

impl Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        LOG.lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Captures the launcher's log at DEBUG (once per process).
fn capture_log() {
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(
                "info,nodepool_core::launcher=debug",
            ))
            .with_ansi(false)
            .with_writer(|| LogWriter)
            .try_init()
            .expect("this test binary's only log subscriber");
    });
}

/// The log lines that contain `needle`.
fn log_lines_with(needle: &str) -> Vec<String> {
    let log = LOG.lock().unwrap_or_else(|p| p.into_inner());
    String::from_utf8_lossy(&log)
        .lines()
        .filter(|l| l.contains(needle))
        .map(str::to_owned)
        .collect()
}

/// The test's scripts and marker files.
struct Scripts {
    dir: tempfile::TempDir,
}

impl Scripts {
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir(dir.path().join("scripts")).expect("mkdir scripts");
        let s = Scripts { dir };
        let d = s.path().display().to_string();
        // Leaves a marker the test reads back: the script ran on the node
        // (this machine), with the node's id and label in its environment.
        s.write(
            "ok.sh",
            &format!(
                "#!/bin/sh\necho \"ready script for $NODEPOOL_LABEL in {d}\"\n\
                 echo \"$NODEPOOL_NODE_ID $NODEPOOL_LABEL\" > {d}/marker-$NODEPOOL_NODE_ID\n"
            ),
        );
        // Fails the first time it runs, then succeeds.
        s.write(
            "flaky.sh",
            &format!(
                "#!/bin/sh\nif [ -e {d}/flaky-tried ]; then\n  echo second try; exit 0\nfi\n\
                 touch {d}/flaky-tried\necho 'flaky: the first attempt fails in {d}'\nexit 1\n"
            ),
        );
        // Always fails, counting its runs.
        s.write(
            "broken.sh",
            &format!(
                "#!/bin/sh\necho run >> {d}/broken-runs\necho 'broken: no good in {d}' >&2\nexit 1\n"
            ),
        );
        // Never ends; records the pid of what it started.
        s.write(
            "hang.sh",
            &format!(
                "#!/bin/sh\necho 'hang: started in {d}'\nsleep 600 &\necho $! > {d}/hang-sleep.pid\nwait\n"
            ),
        );
        s
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn write(&self, name: &str, text: &str) {
        std::fs::write(self.path().join("scripts").join(name), text).expect("write script");
    }

    fn file(&self, name: &str) -> PathBuf {
        self.path().join(name)
    }

    /// What every script prints: this test's directory.
    fn token(&self) -> String {
        self.path().display().to_string()
    }
}

/// `ok` (the seed's spelling: the label's `ready-script`), `flaky` and
/// `broken` on provider `sim` (three attempts per launch); `hang` on
/// `once` (one attempt, a 10 s limit). Both hand out servers at `sshd`.
fn body(sshd: &Sshd, scripts: &Scripts) -> String {
    let image = format!(
        "    cloud-images:\n      - name: local\n        username: {}\n        private-key: {}\n        connection-port: {}\n",
        sshd.user(),
        sshd.private_key().display(),
        sshd.port()
    );
    let simulation =
        "    simulation: {skip-nodescan: false, data-plane-host: 127.0.0.1, boot-delay: 0}\n";
    format!(
        r#"script-dir: {dir}/scripts
labels:
  - name: ok
    ready-script: ok.sh
  - name: flaky
  - name: broken
  - name: hang
providers:
  - name: sim
    driver: simulated
    launch-retries: 3
{simulation}{image}    pools:
      - name: main
        labels:
          - {{name: ok, cloud-image: local, min-ram: 1024}}
          - {{name: flaky, cloud-image: local, min-ram: 1024, ready-script: flaky.sh}}
          - {{name: broken, cloud-image: local, min-ram: 1024, ready-script: broken.sh}}
  - name: once
    driver: simulated
    launch-retries: 1
{simulation}{image}    pools:
      - name: main
        labels:
          - {{name: hang, cloud-image: local, min-ram: 1024, ready-script: hang.sh, ready-script-timeout: 10}}
"#,
        dir = scripts.path().display()
    )
}

struct Rig {
    // Dropped last: the launcher stops before its server goes.
    launcher: Option<RunningLauncher>,
    zuul: Requestor,
    scripts: Scripts,
    sshd: Sshd,
    _env: TestEnv,
}

impl Rig {
    async fn start(backend: Backend) -> Self {
        capture_log();
        let env = TestEnv::new(backend);
        let sshd = Sshd::start_with_login();
        let scripts = Scripts::new();
        let cfg = env.config(&body(&sshd, &scripts));
        let launcher = RunningLauncher::start(&env, &cfg, "ready-l1", &Clouds::default()).await;
        let zuul = Requestor::new(env.store(&cfg).await, "zuul");
        Rig {
            launcher: Some(launcher),
            zuul,
            scripts,
            sshd,
            _env: env,
        }
    }

    async fn request(&self, label: &str) -> Outcome {
        let id = self
            .zuul
            .submit(&NewRequest::new(vec![label.to_owned()]))
            .await
            .expect("submit");
        self.zuul.wait(&id, WAIT).await.expect("wait")
    }

    async fn stop(mut self) {
        if let Some(l) = self.launcher.take() {
            l.stop().await;
        }
    }
}

async fn a_ready_script_runs_before_the_node_is_ready(backend: Backend) {
    let rig = Rig::start(backend).await;
    let Outcome::Fulfilled(req) = rig.request("ok").await else {
        panic!("the request for `ok` was not fulfilled")
    };
    let id = req.value.nodes[0].clone();
    let node = rig
        .zuul
        .store()
        .get_node(&id)
        .await
        .expect("read node")
        .expect("node exists")
        .value;
    assert_eq!(node.state, NodeState::Ready);
    assert_eq!(node.interface_ip.as_deref(), Some("127.0.0.1"));
    // Nodescan recorded the server's keys, one per type.
    assert_eq!(
        node.host_keys.iter().collect::<BTreeSet<_>>(),
        rig.sshd.host_keys().iter().collect::<BTreeSet<_>>()
    );
    // The script ran as the image's login, with the node's id and label.
    let marker = std::fs::read_to_string(rig.scripts.file(&format!("marker-{id}")))
        .expect("the ready script left its marker");
    assert_eq!(marker.trim(), format!("{id} ok"));
    // Its output is in the DEBUG log.
    let lines = log_lines_with(&rig.scripts.token());
    assert!(
        lines.iter().any(|l| l.contains("DEBUG")
            && l.contains(&format!("node={id}"))
            && l.contains("ready script for ok in")),
        "no DEBUG line with the script's output for node {id}:\n{}",
        lines.join("\n")
    );
    rig.stop().await;
}

async fn a_failing_ready_script_fails_the_attempt_and_the_launch_is_retried(backend: Backend) {
    let rig = Rig::start(backend).await;
    let Outcome::Fulfilled(req) = rig.request("flaky").await else {
        panic!(
            "the request for `flaky` was not served by the second attempt:\n{}",
            log_lines_with("flaky.sh").join("\n")
        )
    };
    let id = req.value.nodes[0].clone();
    assert!(rig.scripts.file("flaky-tried").exists());
    let lines = log_lines_with(&rig.scripts.token());
    assert!(
        lines.iter().any(|l| l.contains("launch attempt failed")
            && l.contains(&format!("node={id}"))
            && l.contains("ready script flaky.sh: exited with status 1")
            && l.contains("flaky: the first attempt fails")),
        "no failed attempt with the script's output for node {id}:\n{}",
        lines.join("\n")
    );
    rig.stop().await;
}

async fn a_ready_script_failing_every_attempt_fails_the_request(backend: Backend) {
    let rig = Rig::start(backend).await;
    let Outcome::Failed(_) = rig.request("broken").await else {
        panic!("the request for `broken` was fulfilled")
    };
    // One run per attempt: `launch-retries: 3`.
    let runs = std::fs::read_to_string(rig.scripts.file("broken-runs")).expect("runs");
    assert_eq!(runs.lines().count(), 3, "runs of broken.sh: {runs:?}");
    let failed = log_lines_with(&rig.scripts.token());
    assert!(
        failed.iter().any(|l| l.contains("launch failed")
            && l.contains("ready script broken.sh: exited with status 1")
            && l.contains("broken: no good")),
        "no `launch failed` line with the script's output:\n{}",
        failed.join("\n")
    );
    rig.stop().await;
}

async fn a_hanging_ready_script_fails_the_launch_at_its_timeout(backend: Backend) {
    let rig = Rig::start(backend).await;
    let Outcome::Failed(_) = rig.request("hang").await else {
        panic!("the request for `hang` was fulfilled")
    };
    let lines = log_lines_with(&rig.scripts.token());
    assert!(
        lines.iter().any(|l| l.contains("launch failed")
            && l.contains("ready script hang.sh: did not finish within 10s")
            && l.contains("hang: started")),
        "no `launch failed` line for the timeout:\n{}",
        lines.join("\n")
    );
    // What the script started was stopped with it.
    let pid: i32 = std::fs::read_to_string(rig.scripts.file("hang-sleep.pid"))
        .expect("the script recorded its child")
        .trim()
        .parse()
        .expect("pid");
    // Gone, or a zombie left for a PID 1 that does not reap orphans.
    let gone = || {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let state = stat
            .rsplit_once(") ")
            .and_then(|(_, rest)| rest.chars().next());
        matches!(state, None | Some('Z' | 'X'))
    };
    eventually("the hung script's child is gone", WAIT, || async { gone() }).await;
    rig.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_script_runs_before_the_node_is_ready_on_zookeeper() {
    a_ready_script_runs_before_the_node_is_ready(Backend::ZooKeeper).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_script_runs_before_the_node_is_ready_on_sqlite() {
    a_ready_script_runs_before_the_node_is_ready(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_ready_script_fails_the_attempt_and_the_launch_is_retried() {
    a_failing_ready_script_fails_the_attempt_and_the_launch_is_retried(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_script_failing_every_attempt_fails_the_request() {
    a_ready_script_failing_every_attempt_fails_the_request(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hanging_ready_script_fails_the_launch_at_its_timeout() {
    a_hanging_ready_script_fails_the_launch_at_its_timeout(Backend::Sqlite).await;
}
