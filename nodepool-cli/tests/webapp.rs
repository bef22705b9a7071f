//! The launcher's web app on 127.0.0.1:0 over a populated store: paths,
//! `Accept` negotiation, `?fields=`, `?node_id=`, caching headers,
//! conditional GET, 404, `/ready` before and after the first pass, and
//! the same JSON as the CLI's `--json`.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use common::{Backend, Fixture, populate};
use nodepool_core::launcher::{Launcher, LauncherSettings, Metrics, ProviderFactory};
use nodepool_core::provider::Provider;
use nodepool_simulated::SimulatedProvider;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

struct Resp {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Resp {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// One HTTP/1.1 GET over a fresh connection.
async fn get(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> Resp {
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let mut req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).await.expect("send");
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), s.read_to_end(&mut raw))
        .await
        .expect("answer within 30 s")
        .expect("read");
    let text = String::from_utf8(raw).expect("utf-8");
    let (head, body) = text.split_once("\r\n\r\n").expect("head and body");
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|c| c.parse().ok())
        .expect("status line");
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect();
    Resp {
        status,
        headers,
        body: body.to_owned(),
    }
}

const JSON: (&str, &str) = ("Accept", "application/json");

struct Web {
    addr: SocketAddr,
    stop: CancellationToken,
    launcher: Option<Launcher>,
    config: Arc<nodepool_core::config::Config>,
}

async fn start(f: &Fixture) -> Web {
    let mut cfg = (*f.config).clone();
    cfg.webapp.port = 0;
    cfg.webapp.listen_address = "127.0.0.1".into();
    let config = Arc::new(cfg);
    let sim = SimulatedProvider::new(config.provider("sim").expect("sim")).expect("cloud");
    let factory: ProviderFactory =
        Arc::new(move |_pc| Ok(Arc::new(sim.clone()) as Arc<dyn Provider>));
    let metrics = Arc::new(Metrics::in_memory());
    let launcher = Launcher::new(f.store.clone(), factory, LauncherSettings::default())
        .with_metrics(metrics.clone());
    let stop = CancellationToken::new();
    let (_tx, rx) = tokio::sync::watch::channel(config.clone());
    let addr = nodepool_cli::webapp::spawn(
        f.store.clone(),
        rx,
        launcher.status(),
        metrics,
        stop.clone(),
    )
    .await
    .expect("web app starts");
    Web {
        addr,
        stop,
        launcher: Some(launcher),
        config,
    }
}

async fn ready_is_503_until_the_first_pass(backend: Backend) {
    let f = Fixture::new(backend).await;
    let mut web = start(&f).await;
    let r = get(web.addr, "/ready", &[]).await;
    assert_eq!(r.status, 503);
    let launcher = web.launcher.take().expect("launcher");
    let (_tx, rx) = tokio::sync::watch::channel(web.config.clone());
    let run = tokio::spawn(launcher.run(rx, web.stop.clone()));
    common::eventually(Duration::from_secs(30), "/ready to say OK", || async {
        let r = get(web.addr, "/ready", &[]).await;
        r.status == 200 && r.body == "OK"
    })
    .await;
    let m = get(web.addr, "/metrics", &[]).await;
    assert_eq!(m.status, 200);
    assert!(
        m.body
            .contains("nodepool_nodes{state=\"ready\",provider=\"sim\",label=\"small\"} 0"),
        "{}",
        m.body
    );
    web.stop.cancel();
    tokio::time::timeout(Duration::from_secs(60), run)
        .await
        .expect("stops")
        .expect("join")
        .expect("clean");
}
both_stores!(ready_is_503_until_the_first_pass);

/// `/ready` lists a provider whose API hangs (still 200: the launcher
/// routes around it), and says 503 with the reason once the store session
/// is gone.
async fn ready_lists_unavailable_providers_and_fails_without_a_store(backend: Backend) {
    let f = Fixture::new(backend).await;
    let mut cfg = (*f.config).clone();
    cfg.webapp.port = 0;
    cfg.webapp.listen_address = "127.0.0.1".into();
    let mut pc = cfg.provider("sim").expect("sim").clone();
    let nodepool_core::config::Driver::Simulated(knobs) = &mut pc.driver else {
        panic!("sim is simulated")
    };
    knobs.api_timeout = Duration::from_millis(200);
    let sim = SimulatedProvider::new(&pc).expect("cloud");
    sim.set_api_fault(Some(nodepool_core::config::ApiFault::Hang))
        .await;
    let config = Arc::new(cfg);
    let factory: ProviderFactory =
        Arc::new(move |_pc| Ok(Arc::new(sim.clone()) as Arc<dyn Provider>));
    let metrics = Arc::new(Metrics::in_memory());
    let launcher = Launcher::new(f.store.clone(), factory, LauncherSettings::default())
        .with_metrics(metrics.clone());
    let stop = CancellationToken::new();
    let (_tx, rx) = tokio::sync::watch::channel(config.clone());
    let addr = nodepool_cli::webapp::spawn(
        f.store.clone(),
        rx.clone(),
        launcher.status(),
        metrics,
        stop.clone(),
    )
    .await
    .expect("web app starts");
    let run = tokio::spawn(launcher.run(rx, stop.clone()));
    common::eventually(
        Duration::from_secs(30),
        "/ready to list sim as unavailable",
        || async {
            let r = get(addr, "/ready", &[]).await;
            r.status == 200 && r.body.contains("\n  sim: for 00:00:00:")
        },
    )
    .await;
    let r = get(addr, "/ready", &[]).await;
    assert!(
        r.body.starts_with("OK\nunavailable providers"),
        "{}",
        r.body
    );
    assert!(r.body.contains("simulated API hang"), "{}", r.body);
    // The store session ends: 503, saying so.
    f.store.backend().close().await.expect("close");
    common::eventually(Duration::from_secs(30), "/ready to say 503", || async {
        let r = get(addr, "/ready", &[]).await;
        r.status == 503
            && r.body
                .contains("state store session is not connected (closed)")
    })
    .await;
    stop.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(60), run).await;
}
both_stores!(ready_lists_unavailable_providers_and_fails_without_a_store);

async fn listings_negotiate_and_carry_cache_headers(backend: Backend) {
    let f = Fixture::new(backend).await;
    let d = populate(&f.store).await;
    let web = start(&f).await;

    // No Accept, or a browser's: the text table.
    for accept in [
        &[][..],
        &[(
            "Accept",
            "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8",
        )][..],
    ] {
        let r = get(web.addr, "/node-list", accept).await;
        assert_eq!(r.status, 200);
        assert_eq!(r.header("content-type"), Some("text/plain; charset=UTF-8"));
        assert_eq!(common::row(&r.body, &d.ready)[6], "ready", "{}", r.body);
        assert_eq!(common::header(&r.body).len(), 21, "every node column");
        assert!(!r.body.contains(common::SECRET));
    }
    let r = get(web.addr, "/node-list", &[JSON]).await;
    assert_eq!(
        r.header("content-type"),
        Some("application/json; charset=UTF-8")
    );
    assert_eq!(r.header("access-control-allow-origin"), Some("*"));
    assert_eq!(r.header("cache-control"), Some("public, max-age=1"));
    let lm = httpdate::parse_http_date(r.header("last-modified").expect("Last-Modified"))
        .expect("an HTTP date");
    let ex = httpdate::parse_http_date(r.header("expires").expect("Expires")).expect("date");
    assert_eq!(
        ex.duration_since(lm).expect("later"),
        Duration::from_secs(1)
    );
    let v: serde_json::Value = serde_json::from_str(&r.body).expect("JSON");
    assert_eq!(v.as_array().map(Vec::len), Some(3));
    assert_eq!(v[0]["AZ"], "az1");
    assert!(!r.body.contains(common::SECRET));

    let r = get(web.addr, &format!("/node-list?node_id={}", d.held), &[JSON]).await;
    let v: serde_json::Value = serde_json::from_str(&r.body).expect("JSON");
    assert_eq!(v.as_array().map(Vec::len), Some(1));
    assert_eq!(v[0]["comment"], "investigating a flaky test");

    let r = get(web.addr, "/node-list?fields=id,state", &[]).await;
    assert_eq!(common::header(&r.body), ["ID", "State"]);
    assert_eq!(common::row(&r.body, &d.busy), [d.busy.as_str(), "in-use"]);
    let r = get(web.addr, "/node-list?fields=id,state", &[JSON]).await;
    let v: serde_json::Value = serde_json::from_str(&r.body).expect("JSON");
    assert_eq!(
        v[0].as_object().map(|o| o.len()),
        Some(21),
        "fields select table columns only"
    );

    // The same JSON as the CLI's --json, for every listing.
    for (path, cmd) in [
        ("/request-list", "request-list"),
        ("/label-list", "label-list"),
        ("/image-list", "image-list"),
        ("/dib-image-list", "dib-image-list"),
        ("/image-status", "image-status"),
    ] {
        let web_json = get(web.addr, path, &[JSON]).await;
        assert_eq!(web_json.status, 200, "{path}");
        let cli_json = f.run(&["--json", cmd]).await;
        let a: serde_json::Value = serde_json::from_str(&web_json.body).expect("JSON");
        let b: serde_json::Value = serde_json::from_str(cli_json.ok()).expect("JSON");
        assert_eq!(a, b, "{path} and `nodepool --json {cmd}` agree");
        let text = get(web.addr, path, &[]).await;
        assert!(text.body.starts_with("+-"), "{path}: {}", text.body);
    }

    let r = get(web.addr, "/no-such-list", &[]).await;
    assert_eq!(r.status, 404);
    let r = get(web.addr, "/node-list.json", &[JSON]).await;
    assert_eq!(r.status, 404, "no format by suffix");
    web.stop.cancel();
}
both_stores!(listings_negotiate_and_carry_cache_headers);

async fn responses_are_cached_for_a_second_and_conditional(backend: Backend) {
    let f = Fixture::new(backend).await;
    let d = populate(&f.store).await;
    let web = start(&f).await;
    let first = get(web.addr, "/request-list", &[JSON]).await;
    let lm = first.header("last-modified").expect("lm").to_owned();

    let r = get(
        web.addr,
        "/request-list",
        &[JSON, ("If-Modified-Since", &lm)],
    )
    .await;
    assert_eq!(r.status, 304);
    assert_eq!(r.body, "");
    let r = get(
        web.addr,
        "/request-list",
        &[JSON, ("If-Modified-Since", "Thu, 01 Jan 1970 00:00:00 GMT")],
    )
    .await;
    assert_eq!(r.status, 200);

    // A change shows once the cached copy expired, not before.
    f.store.delete_request(&d.request).await.expect("delete");
    let again = get(web.addr, "/request-list", &[JSON]).await;
    if again.header("last-modified") == Some(lm.as_str()) {
        assert_eq!(again.body, first.body, "served from the cache");
    }
    common::eventually(Duration::from_secs(10), "the cache to expire", || async {
        get(web.addr, "/request-list", &[JSON]).await.body == "[]"
    })
    .await;
    // Text and JSON are cached apart.
    let text = get(web.addr, "/request-list", &[]).await;
    assert!(text.body.starts_with("+-"));
    web.stop.cancel();
}
both_stores!(responses_are_cached_for_a_second_and_conditional);

async fn unreadable_records_are_named_in_a_header(backend: Backend) {
    let f = Fixture::new(backend).await;
    populate(&f.store).await;
    let web = start(&f).await;
    for path in ["/node-list", "/request-list", "/image-list"] {
        let r = get(web.addr, path, &[JSON]).await;
        assert_eq!(r.status, 200);
        assert_eq!(
            r.header("X-Nodepool-Skipped"),
            None,
            "{path}: nothing skipped"
        );
    }
    let node = nodepool_core::store::paths::node("0000009999");
    f.store
        .backend()
        .create(
            &node,
            "{\"state\": \"caf\u{e9}\"}".as_bytes(),
            nodepool_core::store::CreateMode::Persistent,
        )
        .await
        .expect("create");
    // Past the one-second cache of the earlier answer.
    common::eventually(
        Duration::from_secs(30),
        "the unreadable node to be named",
        || async {
            get(web.addr, "/node-list", &[JSON])
                .await
                .header("X-Nodepool-Skipped")
                .is_some()
        },
    )
    .await;
    for accept in [&[JSON][..], &[][..]] {
        let r = get(web.addr, "/node-list", accept).await;
        assert_eq!(r.status, 200);
        let skipped: serde_json::Value =
            serde_json::from_str(r.header("X-Nodepool-Skipped").expect("header"))
                .expect("a JSON header");
        assert_eq!(skipped.as_array().map(Vec::len), Some(1), "{skipped}");
        assert_eq!(skipped[0]["path"], node.as_str());
        assert!(
            skipped[0]["reason"].as_str().is_some_and(|r| !r.is_empty()),
            "{skipped}"
        );
        if accept.is_empty() {
            assert!(r.body.starts_with("+-"), "the table is unchanged");
        } else {
            // The body is still Python's bare list, of the readable nodes.
            let v: serde_json::Value = serde_json::from_str(&r.body).expect("JSON");
            assert_eq!(v.as_array().map(Vec::len), Some(3), "{v}");
        }
    }
    web.stop.cancel();
}
both_stores!(unreadable_records_are_named_in_a_header);

async fn request_explain_answers_like_the_cli(backend: Backend) {
    let f = Fixture::new(backend).await;
    populate(&f.store).await;
    let web = start(&f).await;
    let zuul = nodepool_requestor::Requestor::new(f.store.clone(), "zuul");
    let id = zuul
        .submit(&nodepool_requestor::NewRequest::new(vec![
            "nonesuch".into(),
        ]))
        .await
        .expect("submit");

    let r = get(web.addr, &format!("/request-explain/{id}"), &[]).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(
        r.body
            .starts_with(&format!("request {id} (nonesuch): requested ")),
        "{}",
        r.body
    );
    assert!(
        r.body
            .contains("\n  sim/main: does not serve label nonesuch\n"),
        "{}",
        r.body
    );
    let r = get(web.addr, &format!("/request-explain/{id}"), &[JSON]).await;
    assert_eq!(r.status, 200);
    assert!(
        r.header("content-type")
            .is_some_and(|t| t.starts_with("application/json"))
    );
    let v: serde_json::Value = serde_json::from_str(&r.body).expect("JSON");
    assert_eq!(v["id"], id.as_str());
    assert_eq!(v["pools"][0]["verdict"], "label-not-served", "{v}");

    let r = get(web.addr, "/request-explain/100-0000099999", &[]).await;
    assert_eq!(r.status, 404);
    assert_eq!(r.body, "request 100-0000099999 not found\n");
    web.stop.cancel();
}
both_stores!(request_explain_answers_like_the_cli);

/// A provider that boots min-ready nodes from a cloud image, so launches
/// (and their histograms) happen.
const LAUNCHING: &str = "\
labels:
  - name: small
    min-ready: 2
providers:
  - name: sim
    driver: simulated
    simulation:
      boot-delay: 0.05
    cloud-images:
      - name: plain
    pools:
      - name: main
        max-servers: 5
        labels:
          - name: small
            cloud-image: plain
            flavor-name: Fake Flavor
";

/// The samples of one family in a scrape, as (labels, value).
fn samples<'a>(
    scrape: &'a prometheus_parse::Scrape,
    name: &str,
) -> Vec<&'a prometheus_parse::Sample> {
    scrape.samples.iter().filter(|s| s.metric == name).collect()
}

fn gauge_or_counter(s: &prometheus_parse::Sample) -> f64 {
    match &s.value {
        prometheus_parse::Value::Gauge(v)
        | prometheus_parse::Value::Counter(v)
        | prometheus_parse::Value::Untyped(v) => *v,
        other => panic!("{}: not a single value: {other:?}", s.metric),
    }
}

/// `/metrics` scraped over HTTP and read by an independent Prometheus
/// text-format parser: labelled families (nodes by state, provider and
/// label; launch and boot histograms; requests; provider health; store
/// connection), not flattened statsd names.
async fn metrics_are_labelled_prometheus_families(backend: Backend) {
    let f = common::Fixture::with_body(backend, LAUNCHING).await;
    let mut cfg = (*f.config).clone();
    cfg.webapp.port = 0;
    cfg.webapp.listen_address = "127.0.0.1".into();
    let config = Arc::new(cfg);
    let sim = SimulatedProvider::new(config.provider("sim").expect("sim")).expect("cloud");
    let factory: ProviderFactory =
        Arc::new(move |_pc| Ok(Arc::new(sim.clone()) as Arc<dyn Provider>));
    let metrics = Arc::new(Metrics::in_memory());
    let launcher = Launcher::new(
        f.store.clone(),
        factory,
        LauncherSettings {
            hostname: "web-test".into(),
            stats_interval: Duration::from_millis(100),
            ..LauncherSettings::default()
        },
    )
    .with_metrics(metrics.clone());
    let stop = CancellationToken::new();
    let (_tx, rx) = tokio::sync::watch::channel(config.clone());
    let addr = nodepool_cli::webapp::spawn(
        f.store.clone(),
        rx.clone(),
        launcher.status(),
        metrics,
        stop.clone(),
    )
    .await
    .expect("web app starts");
    let run = tokio::spawn(launcher.run(rx, stop.clone()));
    let scrape = || async {
        let r = get(addr, "/metrics", &[]).await;
        assert_eq!(r.status, 200);
        assert_eq!(r.header("content-type"), Some("text/plain; version=0.0.4"));
        prometheus_parse::Scrape::parse(r.body.lines().map(|l| Ok(l.to_owned())))
            .unwrap_or_else(|e| panic!("not Prometheus text: {e}\n{}", r.body))
    };
    let ready_nodes = |s: &prometheus_parse::Scrape| {
        samples(s, "nodepool_nodes")
            .into_iter()
            .filter(|x| {
                x.labels.get("state") == Some("ready")
                    && x.labels.get("provider") == Some("sim")
                    && x.labels.get("label") == Some("small")
            })
            .map(gauge_or_counter)
            .sum::<f64>()
    };
    common::eventually(
        Duration::from_secs(60),
        "two ready nodes in /metrics",
        || async { ready_nodes(&scrape().await) == 2.0 },
    )
    .await;
    let s = scrape().await;

    // Nodes: one series per state, provider and label, every state
    // zero-filled, and nothing but those three labels.
    let nodes = samples(&s, "nodepool_nodes");
    assert!(nodes.len() >= 11, "every state: {nodes:?}");
    for n in &nodes {
        let mut keys: Vec<&String> = n.labels.keys().collect();
        keys.sort();
        assert_eq!(keys, ["label", "provider", "state"], "{n:?}");
    }
    assert_eq!(
        s.docs.get("nodepool_nodes").map(String::is_empty),
        Some(false)
    );

    // Launch and boot times are histograms with provider (and result or
    // label) labels; two launches ended ready.
    let launches = samples(&s, "nodepool_launch_seconds");
    let ready_launches: Vec<_> = launches
        .iter()
        .filter(|x| {
            x.labels.get("provider") == Some("sim") && x.labels.get("result") == Some("ready")
        })
        .collect();
    assert_eq!(ready_launches.len(), 1, "{launches:?}");
    match &ready_launches[0].value {
        prometheus_parse::Value::Histogram(buckets) => {
            let inf = buckets
                .iter()
                .find(|b| b.less_than.is_infinite())
                .expect("+Inf bucket");
            assert!(inf.count >= 2.0, "{buckets:?}");
            assert!(
                buckets.windows(2).all(|w| w[0].count <= w[1].count),
                "cumulative: {buckets:?}"
            );
        }
        other => panic!("nodepool_launch_seconds is not a histogram: {other:?}"),
    }
    let boots = samples(&s, "nodepool_boot_seconds");
    assert!(
        boots.iter().any(|x| x.labels.get("provider") == Some("sim")
            && x.labels.get("label") == Some("small")
            && matches!(&x.value, prometheus_parse::Value::Histogram(b) if !b.is_empty())),
        "{boots:?}"
    );

    // Requests by state, this launcher's view of its provider and store.
    let requests = samples(&s, "nodepool_requests");
    let mut states: Vec<&str> = requests
        .iter()
        .filter_map(|x| x.labels.get("state"))
        .collect();
    states.sort();
    assert_eq!(states, ["failed", "fulfilled", "pending", "requested"]);
    let one = |name: &str, key: Option<(&str, &str)>| {
        let v: Vec<f64> = samples(&s, name)
            .into_iter()
            .filter(|x| key.is_none_or(|(k, v)| x.labels.get(k) == Some(v)))
            .map(gauge_or_counter)
            .collect();
        assert_eq!(v.len(), 1, "{name}: {v:?}");
        v[0]
    };
    assert_eq!(
        one("nodepool_provider_health", Some(("provider", "sim"))),
        1.0
    );
    assert_eq!(
        one("nodepool_provider_max_servers", Some(("provider", "sim"))),
        5.0
    );
    assert_eq!(one("nodepool_zk_connected", None), 1.0);
    assert_eq!(one("nodepool_stats_leader", None), 1.0);
    assert!(!samples(&s, "nodepool_zk_queue").is_empty());
    // Our own writes whose events the cache has not taken yet: present on
    // every store (0 where nothing is applied from answers).
    assert!(one("nodepool_zk_queue", Some(("queue", "own_writes"))) >= 0.0);

    // Statsd names a family carries are not repeated flattened.
    let names: std::collections::BTreeSet<&str> =
        s.samples.iter().map(|x| x.metric.as_str()).collect();
    assert!(
        !names.iter().any(|n| n.starts_with("nodepool_nodes_")
            || n.starts_with("nodepool_label_")
            || n.starts_with("nodepool_launch_ready")),
        "{names:?}"
    );

    stop.cancel();
    tokio::time::timeout(Duration::from_secs(60), run)
        .await
        .expect("stops")
        .expect("join")
        .expect("clean");
}
both_stores!(metrics_are_labelled_prometheus_families);
