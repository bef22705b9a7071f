//! The launcher's live dashboard in a real headless Chromium, driven
//! through chromedriver's W3C WebDriver HTTP API: the page renders the
//! min-ready nodes as ready, follows a node that `nodepool hold` changes,
//! and a screenshot is saved to `target/test-artifacts/dashboard.png`.
//!
//! Needs Debian's `chromium` and `chromium-driver` (`scripts/chromium.sh
//! install`, which `scripts/test.sh` runs); fails, never skips, without
//! them.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{Backend, Fixture};
use nodepool_core::model::NodeState;
use serde_json::{Value, json};

const LAUNCHER: &str = env!("CARGO_BIN_EXE_nodepool-launcher");
const LIMIT: Duration = Duration::from_secs(60);

const BODY: &str = r#"webapp:
  port: 0
  listen_address: 127.0.0.1
labels:
  - name: small
    min-ready: 2
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
"#;

/// A program the test needs, or a failure naming the script that installs it.
fn program(name: &str) -> PathBuf {
    for dir in ["/usr/bin", "/usr/local/bin", "/usr/lib/chromium"] {
        let p = Path::new(dir).join(name);
        if p.exists() {
            return p;
        }
    }
    panic!("{name} is not installed: run `scripts/chromium.sh install` (scripts/test.sh does)");
}

/// A port nobody listens on now, for chromedriver.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("address")
        .port()
}

/// One WebDriver session on a chromedriver process of its own.
struct Browser {
    http: reqwest::Client,
    base: String,
    session: String,
    _driver: tokio::process::Child,
}

impl Browser {
    async fn start(dir: &Path) -> Browser {
        let chromium = program("chromium");
        let port = free_port();
        let driver = tokio::process::Command::new(program("chromedriver"))
            .arg(format!("--port={port}"))
            .stdout(std::fs::File::create(dir.join("chromedriver.log")).expect("log"))
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("start chromedriver");
        let http = reqwest::Client::new();
        let base = format!("http://127.0.0.1:{port}");
        let status = format!("{base}/status");
        common::eventually(LIMIT, "chromedriver to answer /status", || {
            let (http, status) = (http.clone(), status.clone());
            async move {
                match http.get(&status).send().await {
                    Ok(r) => r
                        .json::<Value>()
                        .await
                        .is_ok_and(|v| v["value"]["ready"] == json!(true)),
                    Err(_) => false,
                }
            }
        })
        .await;
        let profile = dir.join("chromium-profile");
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": chromium,
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                         "--disable-dev-shm-usage", "--window-size=1400,1100",
                         format!("--user-data-dir={}", profile.display())],
            },
        }}});
        let created: Value = http
            .post(format!("{base}/session"))
            .json(&caps)
            .send()
            .await
            .expect("new session")
            .json()
            .await
            .expect("session JSON");
        let session = created["value"]["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no session: {created}"))
            .to_owned();
        Browser {
            http,
            base,
            session,
            _driver: driver,
        }
    }

    async fn command(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
        let url = format!("{}/session/{}{path}", self.base, self.session);
        let mut req = self.http.request(method, &url);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let v: Value = req
            .send()
            .await
            .unwrap_or_else(|e| panic!("{path}: {e}"))
            .json()
            .await
            .unwrap_or_else(|e| panic!("{path}: {e}"));
        assert!(v["value"]["error"].is_null(), "{path}: {v}");
        v["value"].clone()
    }

    async fn open(&self, url: &str) {
        self.command(reqwest::Method::POST, "/url", Some(json!({"url": url})))
            .await;
    }

    /// The text of the element `id` as the page shows it now.
    async fn text(&self, id: &str) -> String {
        let script =
            "const e = document.getElementById(arguments[0]); return e ? e.innerText : '';";
        self.command(
            reqwest::Method::POST,
            "/execute/sync",
            Some(json!({"script": script, "args": [id]})),
        )
        .await
        .as_str()
        .unwrap_or_default()
        .to_owned()
    }

    /// Polls until the element `id`'s text satisfies `f`; returns it.
    async fn until_text(&self, id: &str, what: &str, f: impl Fn(&str) -> bool) -> String {
        let deadline = tokio::time::Instant::now() + LIMIT;
        loop {
            let text = self.text(id).await;
            if f(&text) {
                return text;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out waiting for the page to show {what}; #{id} shows:\n{text}\nstatus: {}",
                self.text("status").await
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    async fn screenshot(&self) -> Vec<u8> {
        let b64 = self
            .command(reqwest::Method::GET, "/screenshot", None)
            .await;
        decode_base64(b64.as_str().expect("base64 text"))
    }
}

impl Drop for Browser {
    /// Ends the session (chromedriver then stops Chromium) before the
    /// driver is killed, also when the test fails half-way: killing
    /// chromedriver alone would leave Chromium running. Blocking and
    /// plain HTTP, as `Drop` cannot await.
    fn drop(&mut self) {
        use std::io::{Read, Write};
        let addr = self.base.trim_start_matches("http://");
        let Ok(mut conn) = std::net::TcpStream::connect(addr) else {
            return;
        };
        conn.set_read_timeout(Some(LIMIT)).ok();
        let request = format!(
            "DELETE /session/{} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n",
            self.session
        );
        if conn.write_all(request.as_bytes()).is_err() {
            return;
        }
        // chromedriver keeps the connection open: read one answer (its
        // head, then Content-Length bytes), which comes once Chromium quit.
        let mut answer = Vec::new();
        let mut chunk = [0u8; 4096];
        while let Ok(n) = conn.read(&mut chunk) {
            if n == 0 {
                return;
            }
            answer.extend_from_slice(&chunk[..n]);
            let text = String::from_utf8_lossy(&answer);
            if let Some((head, body)) = text.split_once("\r\n\r\n") {
                let length = head
                    .lines()
                    .filter_map(|l| l.split_once(':'))
                    .find(|(k, _)| k.trim().eq_ignore_ascii_case("content-length"))
                    .and_then(|(_, v)| v.trim().parse::<usize>().ok())
                    .unwrap_or(0);
                if body.len() >= length {
                    return;
                }
            }
        }
    }
}

fn decode_base64(text: &str) -> Vec<u8> {
    let value = |c: u8| -> u32 {
        match c {
            b'A'..=b'Z' => u32::from(c - b'A'),
            b'a'..=b'z' => u32::from(c - b'a') + 26,
            b'0'..=b'9' => u32::from(c - b'0') + 52,
            b'+' => 62,
            b'/' => 63,
            _ => panic!("not base64: {c}"),
        }
    };
    let clean: Vec<u8> = text.bytes().filter(|c| !c.is_ascii_whitespace()).collect();
    let mut out = Vec::with_capacity(clean.len() / 4 * 3);
    for chunk in clean.chunks(4) {
        let data: Vec<u8> = chunk.iter().copied().filter(|&c| c != b'=').collect();
        let mut acc = 0u32;
        for (i, &c) in data.iter().enumerate() {
            acc |= value(c) << (18 - 6 * i);
        }
        let bytes = acc.to_be_bytes();
        out.extend_from_slice(&bytes[1..data.len()]);
    }
    out
}

/// The address the launcher's web app bound, from its JSON log.
async fn webapp_addr(child: &mut tokio::process::Child, log: &Path) -> SocketAddr {
    let deadline = tokio::time::Instant::now() + LIMIT;
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        let addr = text
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .find(|v| v["fields"]["message"] == json!("web app listening"))
            .and_then(|v| v["fields"]["addr"].as_str().and_then(|a| a.parse().ok()));
        if let Some(addr) = addr {
            return addr;
        }
        if let Some(status) = child.try_wait().expect("poll the launcher") {
            panic!("the launcher exited ({status}):\n{text}");
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no web app address in the log:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_renders_and_follows_a_node_in_chromium() {
    let f = Fixture::with_body(Backend::Sqlite, BODY).await;
    let d = f.dir.path();
    let log = d.join("launcher.log");
    let mut launcher = tokio::process::Command::new(LAUNCHER)
        .arg("-c")
        .arg(&f.config_path)
        .args(["--log-format", "json"])
        .env("HOME", d)
        .stderr(std::fs::File::create(&log).expect("log file"))
        .kill_on_drop(true)
        .spawn()
        .expect("start nodepool-launcher");
    let addr = webapp_addr(&mut launcher, &log).await;
    let browser = Browser::start(d).await;
    browser.open(&format!("http://{addr}/dashboard")).await;

    // The min-ready nodes appear as ready, one row of two.
    let nodes = browser
        .until_text("nodes", "2 ready small nodes", |t| {
            t.lines().any(|l| {
                let cells: Vec<&str> = l.split('\t').map(str::trim).collect();
                cells == ["ready", "sim", "small", "2"]
            })
        })
        .await;
    assert!(nodes.contains("state"), "the header row: {nodes}");
    let quota = browser
        .until_text("quota", "the pool's server use", |t| t.contains("sim/main"))
        .await;
    assert!(quota.contains("/ 10"), "used of max-servers 10: {quota}");
    // The document the page draws.
    let doc: Value = browser
        .http
        .get(format!("http://{addr}/dashboard.json"))
        .send()
        .await
        .expect("GET /dashboard.json")
        .json()
        .await
        .expect("JSON");
    assert_eq!(doc["quota"][0]["pool"], json!("main"), "{doc}");
    assert_eq!(doc["quota"][0]["servers"]["max"], json!(10), "{doc}");
    assert_eq!(
        doc["quota"][0]["cores"]["max"],
        Value::Null,
        "unlimited: {doc}"
    );
    assert!(
        doc["totals"]["ready"].as_u64().is_some_and(|n| n >= 2),
        "{doc}"
    );
    assert!(
        doc["requests"].is_array() && doc["builds"].is_array(),
        "{doc}"
    );
    assert!(
        !doc["history"].as_array().expect("history").is_empty(),
        "{doc}"
    );

    // Hold one: the table and the events strip follow.
    let id = f
        .store
        .list_nodes()
        .await
        .expect("nodes")
        .records
        .iter()
        .find(|r| r.node.state == NodeState::Ready)
        .map(|r| r.id.clone())
        .expect("a ready node");
    f.run(&["hold", &id]).await.ok();
    browser
        .until_text("nodes", "the held node", |t| {
            t.lines().any(|l| {
                let cells: Vec<&str> = l.split('\t').map(str::trim).collect();
                cells == ["hold", "sim", "small", "1"]
            })
        })
        .await;
    // ... and so does the node launched to refill min-ready.
    browser
        .until_text(
            "events",
            "the hold and a new node in the events strip",
            |t| t.contains(&format!("node {id} (small): ready → hold")) && t.contains(": new, "),
        )
        .await;
    let lines = browser
        .command(
            reqwest::Method::POST,
            "/execute/sync",
            Some(json!({
                "script": "return document.querySelectorAll('#chart polyline').length;",
                "args": []
            })),
        )
        .await;
    assert!(
        lines.as_u64().is_some_and(|n| n >= 1),
        "chart lines: {lines}"
    );

    let png = browser.screenshot().await;
    assert!(png.starts_with(b"\x89PNG"), "a PNG screenshot");
    let artifacts = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/test-artifacts");
    std::fs::create_dir_all(&artifacts).expect("artifacts dir");
    std::fs::write(artifacts.join("dashboard.png"), &png).expect("write the screenshot");
    drop(browser);

    launcher.start_kill().ok();
    launcher.wait().await.ok();
}
