//! The `nodepool-builder` binary as a process: it builds with the image's
//! `dib-cmd` (here a small real script standing in for diskimage-builder),
//! uploads to the simulated cloud, records everything in the SQLite file
//! this test reads from another process, reloads its configuration when
//! the file changes, dumps its state on SIGUSR2 and stops on SIGTERM.
//! It sends Nodepool's builder metrics to statsd (a real UDP socket here)
//! and serves them on `/metrics`, with `/ready` and the launcher's listings.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use nodepool_core::model::{BuildState, ComponentKind, UploadState};
use nodepool_core::store::{ImageState, Store};
use nodepool_sqlite::{SqliteOptions, SqliteStore};

mod common;

const BIN: &str = env!("CARGO_BIN_EXE_nodepool-builder");
const LIMIT: Duration = Duration::from_secs(60);

fn config(dir: &Path, providers: &[&str]) -> String {
    let mut y = format!(
        r#"state-store:
  driver: sqlite
  path: {dir}/nodepool.db
images-dir: {dir}/images
build-log-dir: {dir}/logs
labels:
  - name: small
diskimages:
  - name: deb
    dib-cmd: {dir}/fake-dib
    elements: [debian-minimal]
providers:
"#,
        dir = dir.display()
    );
    for p in providers {
        y += &format!(
            "  - name: {p}\n    driver: simulated\n    diskimages: [{{name: deb}}]\n    pools:\n      - name: main\n        max-servers: 2\n        labels: [{{name: small, diskimage: deb, flavor-name: \"Fake Flavor\"}}]\n"
        );
    }
    y
}

fn write_config(path: &Path, text: &str) {
    // Written aside and renamed, so the watcher never reads half a file.
    let tmp = path.with_extension("new");
    std::fs::write(&tmp, text).expect("write config");
    std::fs::rename(&tmp, path).expect("rename config");
}

async fn images(store: &Store) -> ImageState {
    store.image_state().await.expect("image state")
}

async fn until<F: Fn(&ImageState) -> bool>(
    store: &Store,
    what: &str,
    log: &Path,
    f: F,
) -> ImageState {
    let deadline = tokio::time::Instant::now() + LIMIT;
    loop {
        let st = images(store).await;
        if f(&st) {
            return st;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}: {st:#?}\n--- builder log:\n{}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn until_log(log: &Path, needle: &str) {
    let deadline = tokio::time::Instant::now() + LIMIT;
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if text.contains(needle) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {needle:?} in the log:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn ready_upload_to(st: &ImageState, provider: &str) -> bool {
    st.uploads.iter().any(|u| {
        u.provider == provider
            && u.upload.state == UploadState::Ready
            && u.upload.external_id.is_some()
    })
}

/// A statsd server: a real UDP socket read by a thread of its own.
fn statsd_sink() -> (String, Arc<std::sync::Mutex<Vec<String>>>) {
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind a UDP socket");
    let addr = socket.local_addr().expect("address").to_string();
    let lines: Arc<std::sync::Mutex<Vec<String>>> = Arc::default();
    let keep = lines.clone();
    // Ends with the test process; it only ever reads.
    std::thread::spawn(move || {
        let mut buf = [0u8; 2048];
        while let Ok(n) = socket.recv(&mut buf) {
            let text = String::from_utf8_lossy(&buf[..n]).into_owned();
            if let Ok(mut l) = keep.lock() {
                l.extend(text.lines().map(str::to_owned));
            }
        }
    });
    (addr, lines)
}

/// The address the daemon's web app bound, from its JSON log.
async fn webapp_addr(log: &Path) -> std::net::SocketAddr {
    until_log(log, "builder web app listening").await;
    let text = std::fs::read_to_string(log).expect("log");
    text.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| {
            v["fields"]["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("builder web app listening"))
        })
        .and_then(|v| v["fields"]["addr"].as_str().and_then(|a| a.parse().ok()))
        .unwrap_or_else(|| panic!("no web app address in the log:\n{text}"))
}

/// One HTTP/1.1 GET: status and body.
async fn get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .expect("send");
    let mut raw = Vec::new();
    tokio::time::timeout(LIMIT, s.read_to_end(&mut raw))
        .await
        .expect("an answer")
        .expect("read");
    let text = String::from_utf8(raw).expect("utf-8");
    let (head, body) = text.split_once("\r\n\r\n").expect("head and body");
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("status line");
    (status, body.to_owned())
}

fn signal(child: &tokio::process::Child, sig: &str) {
    let pid = child.id().expect("running").to_string();
    let ok = std::process::Command::new("kill")
        .args([&format!("-{sig}"), &pid])
        .status()
        .expect("run kill");
    assert!(ok.success(), "kill -{sig} {pid}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_builder_daemon_builds_uploads_reloads_dumps_and_stops() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    common::install_fake_dib(d);
    let cfg: PathBuf = d.join("nodepool.yaml");
    write_config(&cfg, &config(d, &["p1"]));
    let log = d.join("builder.log");
    let pidfile = d.join("builder.pid");
    let (statsd, statsd_lines) = statsd_sink();
    let (statsd_host, statsd_port) = statsd.rsplit_once(':').expect("host:port");
    let mut child = tokio::process::Command::new(BIN)
        .args(["-c", &cfg.display().to_string()])
        .args(["-p", &pidfile.display().to_string()])
        .args(["--upload-workers", "2", "--log-format", "json", "-d"])
        .args(["--webapp-port", "0", "--webapp-listen-address", "127.0.0.1"])
        .env("STATSD_HOST", statsd_host)
        .env("STATSD_PORT", statsd_port)
        .stderr(std::fs::File::create(&log).expect("log file"))
        .kill_on_drop(true)
        .spawn()
        .expect("start nodepool-builder");

    // The daemon creates the database; open it once it exists.
    let db = d.join("nodepool.db");
    let deadline = tokio::time::Instant::now() + LIMIT;
    while !db.exists() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no database created"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let store = Store::new(Arc::new(
        SqliteStore::open(&db, SqliteOptions::default())
            .await
            .expect("open the daemon's database"),
    ));
    let st = until(&store, "an upload to p1", &log, |st| {
        ready_upload_to(st, "p1")
    })
    .await;
    assert_eq!(st.builds.len(), 1);
    assert_eq!(st.builds[0].build.state, BuildState::Ready);
    assert_eq!(st.builds[0].build.formats, ["qcow2"]);
    let pid: u32 = std::fs::read_to_string(&pidfile)
        .expect("pid file")
        .trim()
        .parse()
        .expect("a pid");
    assert_eq!(Some(pid), child.id());
    let comps = store
        .list_components(ComponentKind::Builder)
        .await
        .expect("components");
    assert_eq!(comps.records.len(), 1);

    // Python's builder metrics went to statsd: the build's size, duration,
    // exit status and time; the upload's timer and counter; the gauges.
    let web = webapp_addr(&log).await;
    let sent = |prefix: &str, kind: &str| {
        statsd_lines
            .lock()
            .expect("lines")
            .iter()
            .any(|l| l.starts_with(prefix) && l.ends_with(kind))
    };
    let deadline = tokio::time::Instant::now() + LIMIT;
    let expected = [
        ("nodepool.dib_image_build.deb.qcow2.size:", "|g"),
        ("nodepool.dib_image_build.deb.status.duration:", "|ms"),
        ("nodepool.dib_image_build.deb.status.rc:0|g", "|g"),
        ("nodepool.dib_image_build.deb.status.last_build:", "|g"),
        ("nodepool.image_update.deb.p1:", "|ms"),
        ("nodepool.image_update.deb.p1:1|c", "|c"),
        ("nodepool.image.deb.image_build_requests:0|g", "|g"),
        ("nodepool.image_build_requests:0|g", "|g"),
    ];
    while !expected.iter().all(|(p, k)| sent(p, k)) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "statsd lines missing: {:?}\nreceived: {:?}",
            expected
                .iter()
                .filter(|(p, k)| !sent(p, k))
                .collect::<Vec<_>>(),
            statsd_lines.lock().expect("lines")
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        !sent("nodepool.dib_image_build.deb.status.duration:", "|c"),
        "a timer only, as Python's"
    );
    assert!(
        statsd_lines
            .lock()
            .expect("lines")
            .iter()
            .any(|l| l.starts_with("nodepool.builder.")
                && l.contains(".image.deb.provider.p1.upload.state:")),
        "upload state gauge"
    );
    // ... and are on /metrics as labelled families.
    let (status, body) = get(web, "/ready").await;
    assert_eq!((status, body.as_str()), (200, "OK"));
    let (status, body) = get(web, "/metrics").await;
    assert_eq!(status, 200);
    let scrape = prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_owned())))
        .unwrap_or_else(|e| panic!("not Prometheus text: {e}\n{body}"));
    let find = |name: &str, labels: &[(&str, &str)]| {
        scrape
            .samples
            .iter()
            .find(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(v)))
            .unwrap_or_else(|| panic!("{name} {labels:?} not in /metrics:\n{body}"))
            .value
            .clone()
    };
    assert!(matches!(
        find("nodepool_image_build_seconds", &[("image", "deb"), ("status", "success")]),
        prometheus_parse::Value::Histogram(b) if b.last().is_some_and(|c| c.count == 1.0)
    ));
    assert!(matches!(
        find("nodepool_image_upload_seconds", &[("image", "deb"), ("provider", "p1"), ("status", "success")]),
        prometheus_parse::Value::Histogram(b) if b.last().is_some_and(|c| c.count == 1.0)
    ));
    assert_eq!(
        find("nodepool_image_build_status_rc", &[("image", "deb")]),
        prometheus_parse::Value::Gauge(0.0)
    );
    assert!(matches!(
        find("nodepool_image_build_size_bytes", &[("image", "deb"), ("format", "qcow2")]),
        prometheus_parse::Value::Gauge(v) if v >= 65536.0
    ));
    assert!(matches!(
        find("nodepool_builder_tasks", &[("kind", "upload_workers")]),
        prometheus_parse::Value::Gauge(v) if v == 2.0
    ));
    find("nodepool_builder_build_state", &[("image", "deb")]);
    assert_eq!(get(web, "/nope").await.0, 404);
    // The launcher's listings, read from the same store.
    let (status, body) = get(web, "/dib-image-list").await;
    assert_eq!(status, 200, "{body}");
    assert!(
        body.lines()
            .any(|l| l.contains("deb-") && l.contains("ready")),
        "the build is listed:\n{body}"
    );
    let (status, body) = get(web, "/image-list").await;
    assert_eq!(status, 200, "{body}");
    assert!(
        body.lines()
            .any(|l| l.contains("| p1 ") && l.contains("deb") && l.contains("ready")),
        "the upload to p1 is listed:\n{body}"
    );
    for path in [
        "/image-status",
        "/node-list",
        "/request-list",
        "/label-list",
    ] {
        assert_eq!(get(web, path).await.0, 200, "{path}");
    }
    let (status, body) = get(web, "/request-explain/100-0000000001").await;
    assert_eq!(status, 404);
    assert!(body.contains("ask a launcher"), "{body}");

    // Hot reload: a second provider gets the image.
    write_config(&cfg, &config(d, &["p1", "p2"]));
    until(&store, "an upload to p2 after the reload", &log, |st| {
        ready_upload_to(st, "p2")
    })
    .await;

    signal(&child, "USR2");
    until_log(&log, "state dump (SIGUSR2)").await;

    signal(&child, "TERM");
    let status = tokio::time::timeout(LIMIT, child.wait())
        .await
        .expect("stops within the limit")
        .expect("wait");
    assert!(status.success(), "{status}");
    assert!(!pidfile.exists(), "pid file removed");
    let comps = store
        .list_components(ComponentKind::Builder)
        .await
        .expect("components");
    assert!(comps.records.is_empty(), "unregistered");
    assert!(d.join("images/builder_id.txt").exists());
    store.backend().close().await.ok();
}

#[tokio::test]
async fn the_builder_daemon_needs_an_images_dir() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = dir.path().join("nodepool.yaml");
    let text = config(dir.path(), &["p1"]).replace(
        &format!("images-dir: {}/images\n", dir.path().display()),
        "",
    );
    write_config(&cfg, &text);
    let out = tokio::process::Command::new(BIN)
        .args(["-c", &cfg.display().to_string()])
        .output()
        .await
        .expect("run");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("images-dir"), "{err}");
}

#[tokio::test]
async fn the_builder_daemon_refuses_a_provider_whose_cloud_cannot_be_loaded() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let cfg = d.join("nodepool.yaml");
    write_config(
        &cfg,
        &format!(
            "{}  - name: os\n    cloud: mycloud\n    diskimages: [{{name: deb}}]\n    pools: [{{name: main, labels: [{{name: small, diskimage: deb, min-ram: 512}}]}}]\n",
            config(d, &["p1"])
        ),
    );
    let clouds = d.join("clouds.yaml");
    std::fs::write(
        &clouds,
        "clouds:\n  mycloud:\n    image_format: [raw]\n    auth: {auth_url: 'http://k/v3', user_id: u, password: pw-never-shown}\n",
    )
    .expect("write clouds.yaml");
    let out = tokio::process::Command::new(BIN)
        .args(["-c", &cfg.display().to_string()])
        .current_dir(d)
        .env("HOME", d)
        .env_remove("XDG_CONFIG_HOME")
        .env_remove("OS_CLOUD")
        .env_remove("OS_CLIENT_SECURE_FILE")
        .env("OS_CLIENT_CONFIG_FILE", &clouds)
        .output()
        .await
        .expect("run");
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        format!(
            "nodepool-builder: 1 cloud configuration error:\n  \
             providers.os (cloud \"mycloud\"): {}: clouds.mycloud.image_format: expected a string, found a list\n",
            clouds.display()
        )
    );
    assert!(!d.join("nodepool.db").exists(), "nothing created");
    assert!(!d.join("images").exists(), "nothing created");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_builders_configuration_and_sigusr1_is_ignored() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    common::install_fake_dib(d);
    let cfg: PathBuf = d.join("nodepool.yaml");
    write_config(&cfg, &config(d, &["p1"]));
    let log = d.join("builder.log");
    let mut child = tokio::process::Command::new(BIN)
        .args(["-c", &cfg.display().to_string()])
        .args(["--log-format", "json"])
        .stderr(std::fs::File::create(&log).expect("log file"))
        .kill_on_drop(true)
        .spawn()
        .expect("start nodepool-builder");
    // Signal handlers are in place before the store is opened.
    until_log(&log, "state store open").await;

    signal(&child, "USR1");
    until_log(&log, "SIGUSR1: ignored").await;
    assert!(
        child.try_wait().expect("poll").is_none(),
        "SIGUSR1 killed it"
    );
    assert!(
        !std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("configuration reloaded"),
        "nothing reloaded yet"
    );

    signal(&child, "HUP");
    until_log(&log, "\"trigger\":\"SIGHUP\"").await;
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        text.lines()
            .any(|l| l.contains("configuration reloaded") && l.contains("\"trigger\":\"SIGHUP\"")),
        "{text}"
    );
    assert!(
        child.try_wait().expect("poll").is_none(),
        "SIGHUP killed it"
    );

    signal(&child, "TERM");
    let status = tokio::time::timeout(LIMIT, child.wait())
        .await
        .expect("stops within the limit")
        .expect("wait");
    assert!(status.success(), "{status}");
}
