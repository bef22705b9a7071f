//! Programs that misbehave: a line that is not JSON, an exit, a hang past
//! the timeout, an answer to the wrong request. Each fails the call with
//! an error naming the program and the operation, the program is killed
//! (its whole process group), and the next call works with a new one.

use std::path::{Path, PathBuf};
use std::time::Duration;

use nodepool_external::ExternalProvider;
use nodepool_model::provider::{Provider, ProviderError};

mod support;

use support::config_for;

/// A program that answers the handshake, then does `first` for the first
/// request of its first run only (a marker file tells runs apart) and
/// answers `quota_limits` properly otherwise: `{"instances": 7}`.
struct Misbehaving {
    dir: tempfile::TempDir,
    script: PathBuf,
}

impl Misbehaving {
    fn new(first: &str) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let script = dir.path().join("cloud.py");
        let indented: String = first.lines().map(|l| format!("        {l}\n")).collect();
        std::fs::write(
            &script,
            format!(
                r#"import json, os, subprocess, sys, time
marker = sys.argv[1]
first = not os.path.exists(marker)
open(marker, "a").close()
def say(obj):
    print(json.dumps(obj), flush=True)
for line in sys.stdin:
    req = json.loads(line)
    if req["op"] == "hello":
        say({{"ok": True, "version": 1, "capabilities": {{}}}})
        continue
    if first:
        first = False
{indented}
        continue
    if req["op"] == "quota_limits":
        say({{"id": req["id"], "ok": True, "result": {{"instances": 7}}}})
    else:
        say({{"id": req["id"], "ok": False, "error": {{"kind": "quota", "message": "no room"}}}})
"#
            ),
        )
        .expect("write");
        Misbehaving { dir, script }
    }

    fn provider(&self, timeout_secs: f64) -> ExternalProvider {
        let marker = self.dir.path().join("started-once");
        let config = config_for(
            &format!(
                "[python3, {:?}, {:?}]",
                self.script.display().to_string(),
                marker.display().to_string()
            ),
            &format!("    timeout: {timeout_secs}"),
        );
        ExternalProvider::new(&config.providers[0]).expect("provider")
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

/// The message of a failed call, checked to name the program and op.
fn failure(e: &ProviderError, script: &Path) -> String {
    let m = e.to_string();
    assert!(m.contains("op quota_limits"), "{m}");
    assert!(m.contains(&script.display().to_string()), "{m}");
    assert!(m.contains("started again at the next call"), "{m}");
    m
}

/// Whether process `pid` is gone (or a zombie waiting to be reaped).
fn gone(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        // `pid (comm) S ...`: the state follows the last `)`.
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
    }
}

/// Polls until `pid` is gone, failing after 60 s.
async fn wait_gone(pid: u32, what: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while !gone(pid) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what} (pid {pid}) still runs after 60 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The call after a failure works, with a new program.
async fn next_call_works(p: &ExternalProvider, old_pid: u32) {
    let limits = p
        .quota_limits()
        .await
        .expect("the restarted program answers");
    assert_eq!(limits.get("instances"), Some(7));
    let new_pid = p.program_pid().await.expect("a program runs");
    assert_ne!(new_pid, old_pid, "the program was restarted");
    wait_gone(old_pid, "the misbehaving program").await;
}

async fn started(p: &ExternalProvider) -> u32 {
    p.capabilities().await.expect("handshake");
    p.program_pid().await.expect("the program runs")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_line_that_is_not_json_fails_the_call_and_restarts() {
    let m = Misbehaving::new(r#"print("this is not json", flush=True)"#);
    let p = m.provider(30.0);
    let pid = started(&p).await;
    let e = p.quota_limits().await.expect_err("bad JSON");
    assert!(matches!(e, ProviderError::Transient(_)), "{e:?}");
    let msg = failure(&e, &m.script);
    assert!(msg.contains("not JSON"), "{msg}");
    assert!(msg.contains("this is not json"), "{msg}");
    next_call_works(&p, pid).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exit_fails_the_call_with_its_status_and_restarts() {
    let m = Misbehaving::new("sys.exit(3)");
    let p = m.provider(30.0);
    let pid = started(&p).await;
    let e = p.quota_limits().await.expect_err("the program exited");
    assert!(matches!(e, ProviderError::Transient(_)), "{e:?}");
    let msg = failure(&e, &m.script);
    assert!(msg.contains("closed its output without answering"), "{msg}");
    assert!(msg.contains("exit status: 3"), "{msg}");
    next_call_works(&p, pid).await;
}

/// A hang is cut at `timeout`; the program and what it started (its
/// process group) are killed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hang_times_out_and_the_whole_group_is_killed() {
    let m = Misbehaving::new(
        "child = subprocess.Popen([\"sleep\", \"3600\"])\nwith open(os.path.join(os.path.dirname(marker), \"grandchild.pid\"), \"w\") as f:\n    f.write(str(child.pid))\ntime.sleep(3600)",
    );
    let grandchild_file = m.path("grandchild.pid");
    let p = m.provider(3.0);
    let pid = started(&p).await;
    let e = p.quota_limits().await.expect_err("the program hangs");
    assert!(matches!(e, ProviderError::Timeout(_)), "{e:?}");
    let msg = failure(&e, &m.script);
    assert!(msg.contains("no answer within 3.0 s"), "{msg}");
    let grandchild: u32 = std::fs::read_to_string(&grandchild_file)
        .expect("the program started its child before hanging")
        .trim()
        .parse()
        .expect("a pid");
    wait_gone(grandchild, "the program's own child").await;
    next_call_works(&p, pid).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_to_another_request_fails_the_call_and_restarts() {
    let m = Misbehaving::new(
        r#"say({"id": req["id"] + 1000, "ok": True, "result": {"instances": 1}})"#,
    );
    let p = m.provider(30.0);
    let pid = started(&p).await;
    let e = p.quota_limits().await.expect_err("wrong id");
    let msg = failure(&e, &m.script);
    assert!(msg.contains("answered request"), "{msg}");
    assert!(msg.contains("with id"), "{msg}");
    next_call_works(&p, pid).await;
}

/// A refusal is an answer, not a failure: mapped onto the error kinds,
/// and the program keeps running.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusal_maps_to_its_kind_and_keeps_the_program() {
    let m = Misbehaving::new(
        r#"say({"id": req["id"], "ok": False, "error": {"kind": "invalid", "message": "bad flavor"}})"#,
    );
    let p = m.provider(30.0);
    let pid = started(&p).await;
    let e = p.quota_limits().await.expect_err("refused");
    let ProviderError::InvalidRequest(msg) = &e else {
        panic!("{e:?}");
    };
    assert!(msg.contains("op quota_limits: bad flavor"), "{msg}");
    assert_eq!(p.program_pid().await, Some(pid));
    assert_eq!(
        p.quota_limits().await.expect("answers").get("instances"),
        Some(7)
    );
    let e = p.list_images().await.expect_err("refused for quota");
    assert!(matches!(e, ProviderError::QuotaExceeded(_)), "{e:?}");
    assert_eq!(p.program_pid().await, Some(pid), "still the same program");
}

/// The program never outlives its provider.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_the_provider_kills_the_program() {
    let m = Misbehaving::new("pass");
    let p = m.provider(30.0);
    let pid = started(&p).await;
    assert!(!gone(pid));
    drop(p);
    wait_gone(pid, "the program of a dropped provider").await;
}

/// A call its caller gave up on (the launcher bounds calls too) leaves an
/// answer owed; the next call does not read it as its own but starts the
/// program again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_cancelled_by_its_caller_does_not_confuse_the_next() {
    let m = Misbehaving::new("time.sleep(3600)");
    let p = m.provider(30.0);
    let pid = started(&p).await;
    let cancelled = tokio::time::timeout(Duration::from_millis(200), p.quota_limits()).await;
    assert!(
        cancelled.is_err(),
        "the first run never answers: {cancelled:?}"
    );
    next_call_works(&p, pid).await;
}

/// A program of another protocol version is refused at the handshake,
/// each time it is needed, and not kept running.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_protocol_version_is_refused_at_the_handshake() {
    let dir = tempfile::tempdir().expect("tempdir");
    let script = dir.path().join("cloud.py");
    std::fs::write(
        &script,
        "import json, sys\nfor line in sys.stdin:\n    print(json.dumps({\"ok\": True, \"version\": 2, \"capabilities\": {}}), flush=True)\n",
    )
    .expect("write");
    let config = config_for(
        &format!("[python3, {:?}]", script.display().to_string()),
        "",
    );
    let p = ExternalProvider::new(&config.providers[0]).expect("provider");
    for _ in 0..2 {
        let e = p.list_instances().await.expect_err("version 2");
        let m = e.to_string();
        assert!(m.contains("op list_servers"), "{m}");
        assert!(
            m.contains("speaks protocol version 2, the launcher speaks 1"),
            "{m}"
        );
        assert_eq!(p.program_pid().await, None);
    }
}
