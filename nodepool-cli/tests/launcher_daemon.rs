//! The `nodepool-launcher` binary as a process, the way an operator runs
//! it: on the embedded SQLite store with a simulated cloud it fills
//! min-ready, serves the web app, sends statsd packets to `STATSD_HOST`,
//! dumps its state on SIGUSR2, ignores SIGUSR1, reloads on SIGHUP, rejects a broken configuration on reload
//! (a bad file, or a provider whose clouds.yaml entry cannot be loaded)
//! while keeping the running one, applies a good one, and on SIGTERM stops
//! cleanly: pid file removed, component registration gone.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use nodepool_core::model::{ComponentKind, NodeState};
use nodepool_core::store::Store;
use nodepool_sqlite::{SqliteOptions, SqliteStore};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const BIN: &str = env!("CARGO_BIN_EXE_nodepool-launcher");
const LIMIT: Duration = Duration::from_secs(60);

fn config(dir: &Path, min_ready: u32) -> String {
    format!(
        r#"state-store:
  driver: sqlite
  path: {dir}/nodepool.db
webapp:
  port: 0
  listen_address: 127.0.0.1
labels:
  - name: small
    min-ready: {min_ready}
providers:
  - name: sim
    driver: simulated
    cloud-images:
      - name: debian
    pools:
      - name: main
        max-servers: 10
        labels:
          - name: small
            cloud-image: debian
            flavor-name: "Fake Flavor"
"#,
        dir = dir.display()
    )
}

/// An OpenStack provider (appended to [`config`]'s providers) whose
/// cloud is [`BROKEN_CLOUDS`]'s `mycloud`.
const OPENSTACK_PROVIDER: &str = "  - name: os
    cloud: mycloud
    cloud-images: [{name: cirros}]
    pools:
      - name: main
        max-servers: 1
        labels: [{name: small, cloud-image: cirros, min-ram: 512}]
";

/// A clouds.yaml whose `mycloud` has no `auth_url`.
const BROKEN_CLOUDS: &str = "clouds:
  mycloud:
    auth:
      username: nodepool
      password: pw-never-shown
      user_domain_name: Default
";

/// The launcher command, with clouds.yaml found only at `clouds` (no
/// OS_CLOUD, secure.yaml or user config directory of the caller's).
fn launcher(dir: &Path, clouds: &Path) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(BIN);
    cmd.current_dir(dir)
        .env("HOME", dir)
        .env_remove("XDG_CONFIG_HOME")
        .env_remove("OS_CLOUD")
        .env_remove("OS_CLIENT_SECURE_FILE")
        .env("OS_CLIENT_CONFIG_FILE", clouds);
    cmd
}

fn write_config(path: &Path, text: &str) {
    // Written aside and renamed, so the watcher never reads half a file.
    let tmp = path.with_extension("new");
    std::fs::write(&tmp, text).expect("write config");
    std::fs::rename(&tmp, path).expect("rename config");
}

fn signal(child: &tokio::process::Child, sig: &str) {
    let pid = child.id().expect("running").to_string();
    let ok = std::process::Command::new("kill")
        .args([&format!("-{sig}"), &pid])
        .status()
        .expect("run kill");
    assert!(ok.success(), "kill -{sig} {pid}");
}

/// Waits for a line of the JSON log that satisfies `f`; returns it.
async fn until_log<F: Fn(&serde_json::Value) -> bool>(
    child: &mut tokio::process::Child,
    log: &Path,
    what: &str,
    f: F,
) -> serde_json::Value {
    let deadline = tokio::time::Instant::now() + LIMIT;
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        let hit = text
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .find(|v| f(v));
        if let Some(v) = hit {
            return v;
        }
        if let Some(status) = child.try_wait().expect("poll the launcher") {
            panic!("the launcher exited ({status}) while waiting for {what}:\n{text}");
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what} in the log:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn message(v: &serde_json::Value) -> &str {
    v["fields"]["message"].as_str().unwrap_or_default()
}

async fn ready_nodes(store: &Store) -> usize {
    store
        .list_nodes()
        .await
        .expect("list nodes")
        .records
        .iter()
        .filter(|r| r.node.state == NodeState::Ready)
        .count()
}

async fn until_ready(store: &Store, n: usize, log: &Path) {
    let deadline = tokio::time::Instant::now() + LIMIT;
    loop {
        let have = ready_nodes(store).await;
        if have == n {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {n} ready nodes (have {have}); launcher log:\n{}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nAccept: application/json\r\nConnection: close\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await.expect("send");
    let mut raw = Vec::new();
    tokio::time::timeout(LIMIT, s.read_to_end(&mut raw))
        .await
        .expect("an answer within the limit")
        .expect("read");
    let text = String::from_utf8(raw).expect("utf-8");
    let (head, body) = text.split_once("\r\n\r\n").expect("a header block");
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("a status code");
    (status, body.to_string())
}

async fn open_store(db: &Path) -> Store {
    let deadline = tokio::time::Instant::now() + LIMIT;
    while !db.exists() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no database created"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Store::new(Arc::new(
        SqliteStore::open(db, SqliteOptions::default())
            .await
            .expect("open the daemon's database"),
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_launcher_daemon_serves_reloads_dumps_and_stops() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let cfg: PathBuf = d.join("nodepool.yaml");
    write_config(&cfg, &config(d, 2));
    let log = d.join("launcher.log");
    let pidfile = d.join("launcher.pid");
    let statsd = tokio::net::UdpSocket::bind("127.0.0.1:0")
        .await
        .expect("statsd socket");
    let statsd_port = statsd.local_addr().expect("statsd address").port();
    let clouds = d.join("clouds.yaml");
    std::fs::write(&clouds, BROKEN_CLOUDS).expect("write clouds.yaml");
    let mut child = launcher(d, &clouds)
        .args(["-c", &cfg.display().to_string()])
        .args(["-p", &pidfile.display().to_string()])
        .args(["--log-format", "json"])
        .env("STATSD_HOST", "127.0.0.1")
        .env("STATSD_PORT", statsd_port.to_string())
        .stderr(std::fs::File::create(&log).expect("log file"))
        .kill_on_drop(true)
        .spawn()
        .expect("start nodepool-launcher");

    let listening = until_log(&mut child, &log, "the web app address", |v| {
        message(v) == "web app listening"
    })
    .await;
    let addr: SocketAddr = listening["fields"]["addr"]
        .as_str()
        .and_then(|a| a.parse().ok())
        .expect("the logged address");
    let store = open_store(&d.join("nodepool.db")).await;
    until_ready(&store, 2, &log).await;

    let (status, _) = get(addr, "/ready").await;
    assert_eq!(status, 200, "/ready once the launcher runs");
    let (status, body) = get(addr, "/node-list").await;
    assert_eq!(status, 200);
    let nodes: Vec<serde_json::Value> = serde_json::from_str(&body).expect("JSON node list");
    let ready = nodes
        .iter()
        .filter(|n| {
            n["state"] == "ready"
                && n["label"] == serde_json::json!(["small"])
                && n["provider"] == "sim"
        })
        .count();
    assert_eq!(ready, 2, "{body}");

    // Statsd: Nodepool's metric names, in the statsd line format.
    let mut seen = String::new();
    let mut buf = vec![0u8; 65536];
    let deadline = tokio::time::Instant::now() + LIMIT;
    while !seen.contains("nodepool.label.small.nodes.ready:") {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let n = tokio::time::timeout(left, statsd.recv(&mut buf))
            .await
            .unwrap_or_else(|_| panic!("no label gauge among the statsd packets:\n{seen}"))
            .expect("receive");
        seen.push_str(&String::from_utf8_lossy(&buf[..n]));
        seen.push('\n');
    }
    assert!(
        seen.lines()
            .any(|l| l.starts_with("nodepool.") && l.ends_with("|g")),
        "{seen}"
    );

    signal(&child, "USR2");
    let dump = until_log(&mut child, &log, "the SIGUSR2 state dump", |v| {
        message(v).starts_with("state dump (SIGUSR2)")
    })
    .await;
    assert!(message(&dump).contains("sim"), "{dump}");

    // A broken configuration is refused with its place named; the running
    // one keeps serving.
    write_config(
        &cfg,
        &config(d, 3).replace("max-servers: 10", "max-servers: 10\n        max-srevers: 3"),
    );
    let rejected = until_log(&mut child, &log, "the rejected reload", |v| {
        message(v).starts_with("new configuration rejected")
    })
    .await;
    let why = message(&rejected);
    assert!(
        why.contains("providers[0].pools[0]") && why.contains("max-srevers"),
        "{why}"
    );
    assert!(why.contains("did you mean"), "{why}");
    assert!(child.try_wait().expect("poll").is_none(), "still running");
    assert_eq!(
        ready_nodes(&store).await,
        2,
        "old configuration still in force"
    );

    // So is a provider whose cloud cannot be loaded, with clouds.yaml's
    // file and key named, and no password in the log.
    write_config(&cfg, &format!("{}{OPENSTACK_PROVIDER}", config(d, 3)));
    let rejected = until_log(&mut child, &log, "the rejected cloud", |v| {
        message(v).contains("cloud configuration error")
    })
    .await;
    assert_eq!(
        message(&rejected),
        format!(
            "new configuration rejected, keeping the running one:\n1 cloud configuration error:\n  \
             providers.os (cloud \"mycloud\"): {}: clouds.mycloud.auth.auth_url: missing",
            clouds.display()
        )
    );
    assert!(child.try_wait().expect("poll").is_none(), "still running");
    assert_eq!(
        ready_nodes(&store).await,
        2,
        "old configuration still in force"
    );

    // A good one is applied: min-ready goes up to 3.
    write_config(&cfg, &config(d, 3));
    until_ready(&store, 3, &log).await;
    let comps = store
        .list_components(ComponentKind::Launcher)
        .await
        .expect("components");
    assert_eq!(comps.records.len(), 1, "one launcher registered");
    let pid: u32 = std::fs::read_to_string(&pidfile)
        .expect("pid file")
        .trim()
        .parse()
        .expect("a pid");
    assert_eq!(Some(pid), child.id());

    signal(&child, "TERM");
    let status = tokio::time::timeout(LIMIT, child.wait())
        .await
        .expect("stops within the limit")
        .expect("wait");
    assert!(status.success(), "{status}");
    assert!(!pidfile.exists(), "pid file removed");
    let comps = store
        .list_components(ComponentKind::Launcher)
        .await
        .expect("components");
    assert!(comps.records.is_empty(), "unregistered on shutdown");
    // Ready nodes are the pool's stock: they outlive the process.
    assert_eq!(ready_nodes(&store).await, 3);
    store.backend().close().await.ok();
    let log_text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(!log_text.contains("pw-never-shown"), "{log_text}");
}

#[tokio::test]
async fn a_provider_whose_cloud_cannot_be_loaded_stops_the_start() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let cfg = d.join("nodepool.yaml");
    write_config(&cfg, &format!("{}{OPENSTACK_PROVIDER}", config(d, 1)));
    let clouds = d.join("clouds.yaml");
    std::fs::write(&clouds, BROKEN_CLOUDS).expect("write clouds.yaml");
    let out = tokio::time::timeout(
        LIMIT,
        launcher(d, &clouds)
            .args(["-c", &cfg.display().to_string()])
            .output(),
    )
    .await
    .expect("exits within the limit")
    .expect("run nodepool-launcher");
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        format!(
            "nodepool-launcher: 1 cloud configuration error:\n  \
             providers.os (cloud \"mycloud\"): {}: clouds.mycloud.auth.auth_url: missing\n",
            clouds.display()
        )
    );
    assert!(!d.join("nodepool.db").exists(), "nothing created");
}

#[tokio::test]
async fn a_broken_configuration_at_start_is_an_error_naming_the_place() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let cfg = d.join("nodepool.yaml");
    write_config(
        &cfg,
        &config(d, 1).replace("min-ready: 1", "min-ready: many"),
    );
    let out = tokio::time::timeout(
        LIMIT,
        tokio::process::Command::new(BIN)
            .args(["-c", &cfg.display().to_string()])
            .output(),
    )
    .await
    .expect("exits within the limit")
    .expect("run nodepool-launcher");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("labels[0].min-ready"), "{err}");
    assert!(err.contains(&cfg.display().to_string()), "{err}");
    assert!(!d.join("nodepool.db").exists(), "nothing created");
}

/// The lines of the JSON log whose message is `msg`.
fn log_lines(log: &Path, msg: &str) -> Vec<serde_json::Value> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| message(v) == msg)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_configuration_and_sigusr1_is_ignored() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let cfg: PathBuf = d.join("nodepool.yaml");
    write_config(&cfg, &config(d, 0));
    let log = d.join("launcher.log");
    let clouds = d.join("clouds.yaml");
    std::fs::write(&clouds, "clouds: {}\n").expect("write clouds.yaml");
    let mut child = launcher(d, &clouds)
        .args(["-c", &cfg.display().to_string()])
        .args(["--log-format", "json", "--no-webapp"])
        .stderr(std::fs::File::create(&log).expect("log file"))
        .kill_on_drop(true)
        .spawn()
        .expect("start nodepool-launcher");
    // Signal handlers are in place before the store is opened.
    until_log(&mut child, &log, "the store opened", |v| {
        message(v) == "state store open"
    })
    .await;

    signal(&child, "USR1");
    until_log(&mut child, &log, "SIGUSR1 to be logged", |v| {
        message(v).starts_with("SIGUSR1: ignored")
    })
    .await;
    assert!(
        child.try_wait().expect("poll").is_none(),
        "SIGUSR1 killed it"
    );
    assert!(
        log_lines(&log, "configuration reloaded").is_empty(),
        "nothing reloaded yet"
    );

    // SIGHUP with the files unchanged: reloaded anyway, at once.
    signal(&child, "HUP");
    let reloaded = until_log(&mut child, &log, "a SIGHUP reload", |v| {
        message(v) == "configuration reloaded" && v["fields"]["trigger"] == "SIGHUP"
    })
    .await;
    assert_eq!(
        reloaded["fields"]["file"].as_str(),
        Some(cfg.display().to_string().as_str())
    );
    assert!(
        child.try_wait().expect("poll").is_none(),
        "SIGHUP killed it"
    );

    // And the reloaded configuration is the one applied: min-ready 1.
    write_config(&cfg, &config(d, 1));
    signal(&child, "HUP");
    let store = open_store(&d.join("nodepool.db")).await;
    until_ready(&store, 1, &log).await;

    signal(&child, "TERM");
    let status = tokio::time::timeout(LIMIT, child.wait())
        .await
        .expect("stops within the limit")
        .expect("wait");
    assert!(status.success(), "{status}");
    store.backend().close().await.ok();
}

#[tokio::test]
async fn configuration_warnings_are_logged_and_the_launcher_runs() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let cfg: PathBuf = d.join("nodepool.yaml");
    let text = config(d, 0).replace(
        "      - name: debian\n",
        "      - name: debian\n        username: \"%(NODEPOOL_UNSET_USER)\"\n",
    );
    let line = 1 + text
        .lines()
        .position(|l| l.contains("NODEPOOL_UNSET_USER"))
        .expect("the reference");
    write_config(&cfg, &text);
    let log = d.join("launcher.log");
    let clouds = d.join("clouds.yaml");
    std::fs::write(&clouds, BROKEN_CLOUDS).expect("write clouds.yaml");
    let mut child = launcher(d, &clouds)
        .args(["-c", &cfg.display().to_string()])
        .args(["--log-format", "json"])
        .env_remove("NODEPOOL_UNSET_USER")
        .stderr(std::fs::File::create(&log).expect("log file"))
        .kill_on_drop(true)
        .spawn()
        .expect("start nodepool-launcher");
    let warned = until_log(&mut child, &log, "the unset variable warning", |v| {
        v["level"] == "WARN" && message(v).contains("%(NODEPOOL_UNSET_USER)")
    })
    .await;
    assert!(
        message(&warned).contains(&format!("line {line}:")),
        "located: {}",
        message(&warned)
    );
    until_log(&mut child, &log, "the web app address", |v| {
        message(v) == "web app listening"
    })
    .await;
    signal(&child, "TERM");
    let status = tokio::time::timeout(LIMIT, child.wait())
        .await
        .expect("stops")
        .expect("exit status");
    assert!(status.success(), "{status}");
}
