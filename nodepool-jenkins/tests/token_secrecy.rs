//! The API token never appears in logs (every level, reqwest and hyper
//! included), errors or Debug output. Its own test binary: it installs the
//! global tracing subscriber.

mod fake_jenkins;

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fake_jenkins::{FakeJenkins, TOKEN, USER};
use nodepool_core::config::{JenkinsConnection, Secret, Target, TargetLabel};
use nodepool_core::consumer::NodeConsumer;
use nodepool_core::consumers::JobHold;
use nodepool_core::model::{Node, NodeState};
use nodepool_core::store::Store;
use nodepool_jenkins::{ClientOptions, JenkinsConsumer, JenkinsOptions, RetryPolicy};
use nodepool_model::store::MemoryStore;

#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("capture").extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn b64(input: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in input.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        out.push(T[(n >> 18) as usize & 63] as char);
        out.push(T[(n >> 12) as usize & 63] as char);
        out.push(if chunk.len() > 1 {
            T[(n >> 6) as usize & 63] as char
        } else {
            '='
        });
        out.push(if chunk.len() > 2 {
            T[n as usize & 63] as char
        } else {
            '='
        });
    }
    out
}

fn target(url: &str, token: &str) -> Target {
    Target {
        name: "ci".into(),
        jenkins: JenkinsConnection {
            url: url.into(),
            user: Some(USER.into()),
            api_token: Some(Secret::new(token)),
            api_token_file: None,
            credentials_id: None,
            remote_fs_root: "/home/jenkins".into(),
        },
        labels: vec![TargetLabel {
            name: "small".into(),
            min_ready: 1,
        }],
    }
}

#[tokio::test]
async fn the_token_never_reaches_logs_errors_or_debug() {
    let capture = Capture::default();
    let writer = capture.clone();
    tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .try_init()
        .expect("first subscriber");

    let j = FakeJenkins::start().await;
    let store = Store::new(Arc::new(MemoryStore::new().new_session()));
    store
        .set_job_hold(&JobHold {
            job: "flaky".into(),
            hold_on_failure: 1,
            created_time: None,
        })
        .await
        .expect("rule");
    let options = JenkinsOptions {
        client: ClientOptions {
            timeout: Duration::from_secs(10),
            retry: RetryPolicy {
                max_attempts: 3,
                base_delay: Duration::from_millis(5),
                max_delay: Duration::from_millis(5),
            },
        },
        ..JenkinsOptions::default()
    };
    let c = JenkinsConsumer::new(&target(&j.url, TOKEN), store.clone(), options.clone())
        .expect("consumer");
    let mut node = Node::new(NodeState::Ready, 0.0, "sim", "main", vec!["small".into()]);
    node.interface_ip = Some("192.0.2.1".into());
    // Registration, retries, an expired crumb, a failed job, removal.
    j.fail_next(503, 1);
    c.node_ready("0000000001", &node).await.expect("ready");
    j.expire_crumbs();
    j.run_job("small-sim-0000000001", "flaky", "FAILURE");
    let f = c.finished_nodes().await.expect("poll");
    assert_eq!(f.len(), 1);
    c.node_gone("0000000001").await.expect("gone");
    // A refused token (the fake's token is right; this one is not).
    let wrong = "9f8e7d6c5b4a39281706f5e4d3c2b1a0";
    let bad = JenkinsConsumer::new(&target(&j.url, wrong), store, options).expect("consumer");
    let err = bad.node_ready("0000000002", &node).await.expect_err("401");

    let logs = String::from_utf8(capture.0.lock().expect("capture").clone()).expect("utf8");
    assert!(
        logs.contains("registered agent") && logs.contains("retrying"),
        "the capture works: {logs}"
    );
    let text = format!("{logs}\n{err}\n{err:?}\n{c:?}\n{bad:?}\n{:?}", c.client());
    for secret in [
        TOKEN.to_owned(),
        wrong.to_owned(),
        b64(format!("{USER}:{TOKEN}").as_bytes()),
        b64(format!("{USER}:{wrong}").as_bytes()),
    ] {
        assert!(!text.contains(&secret), "{secret} leaked:\n{text}");
    }
}
