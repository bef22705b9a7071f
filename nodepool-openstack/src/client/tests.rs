//! Failure cases a real cloud cannot produce on demand, against wiremock:
//! 429 with Retry-After, 503, quota 413/403, a hung endpoint, token expiry
//! and revocation, refused credentials, secrets in error bodies.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use nodepool_model::config::Secret;
use nodepool_model::provider::{ImageUploadSpec, Provider, ProviderError};
use serde_json::{Value, json};
use wiremock::matchers::{body_partial_json, header, method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

use super::*;
use crate::api::compute::{CreateServer, GetLimits, Networks};
use crate::clouds::{Auth, CloudConfig, DomainRef, ProjectRef, UserRef};
use crate::provider::{OpenStackProvider, ProviderOptions};

const PASSWORD: &str = "pa55-w0rd-xyz";

fn cloud(uri: &str) -> CloudConfig {
    CloudConfig {
        name: "mock".into(),
        source: "test".into(),
        auth: Auth::Password {
            auth_url: format!("{uri}/identity/v3"),
            user: UserRef::Name {
                name: "u".into(),
                domain: DomainRef::Id("default".into()),
            },
            password: Secret::new(PASSWORD),
            project: Some(ProjectRef::Id("p1".into())),
        },
        region_name: Some("R1".into()),
        interface: "public".into(),
        service_interfaces: Default::default(),
        endpoint_overrides: Default::default(),
        image_format: "qcow2".into(),
        api_timeout: None,
        verify: true,
        cacert: None,
    }
}

fn token_body(uri: &str, lifetime_s: i64) -> Value {
    let ep = |path: &str| json!([{"interface": "public", "region_id": "R1", "url": format!("{uri}{path}")}]);
    json!({"token": {
    "issued_at": "2026-01-01T00:00:00.000000Z",
    "expires_at": format!("2026-01-01T{:02}:{:02}:{:02}.000000Z",
        lifetime_s / 3600, lifetime_s / 60 % 60, lifetime_s % 60),
    "project": {"id": "p1"},
    "catalog": [
        {"type": "compute", "endpoints": ep("/compute/v2.1")},
        {"type": "image", "endpoints": ep("/image/v2")},
        {"type": "network", "endpoints": ep("/network/v2.0")}
    ]}})
}

async fn mount_auth(server: &MockServer, token: &str, lifetime_s: i64, times: Option<u64>) {
    let mut m = Mock::given(method("POST"))
        .and(path("/identity/v3/auth/tokens"))
        .respond_with(
            ResponseTemplate::new(201)
                .insert_header("x-subject-token", token)
                .set_body_json(token_body(&server.uri(), lifetime_s)),
        );
    if let Some(n) = times {
        m = m.up_to_n_times(n);
    }
    // earlier mounts win while they last
    m.with_priority(if times.is_some() { 1 } else { 5 })
        .mount(server)
        .await;
}

async fn mount_discovery(server: &MockServer) {
    Mock::given(method("GET"))
        .and(path("/compute/v2.1"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({"version": {
            "id": "v2.1", "status": "CURRENT", "version": "2.100", "min_version": "2.1",
            "links": [{"rel": "self", "href": "http://elsewhere/v2.1/"}]}})))
        .mount(server)
        .await;
}

fn limits_ok() -> ResponseTemplate {
    ResponseTemplate::new(200).set_body_json(json!({"limits": {"absolute": {
        "maxTotalInstances": 10, "maxTotalCores": 20, "maxTotalRAMSize": -1}}}))
}

type Sleeps = Arc<Mutex<Vec<Duration>>>;

/// A client whose backoff waits are recorded instead of slept.
fn client(uri: &str, options: ClientOptions) -> (Client, Sleeps) {
    let mut c = Client::new(cloud(uri), options).expect("client");
    let sleeps: Sleeps = Arc::default();
    let rec = sleeps.clone();
    c.set_sleep(Arc::new(move |d| {
        if let Ok(mut v) = rec.lock() {
            v.push(d);
        }
        Box::pin(async {})
    }));
    (c, sleeps)
}

fn fast() -> ClientOptions {
    ClientOptions {
        timeout: Duration::from_secs(10),
        retry: RetryPolicy {
            max_attempts: 3,
            base_delay: Duration::from_secs(1),
            max_delay: Duration::from_secs(30),
            max_retry_after: Duration::from_secs(60),
        },
        ..ClientOptions::default()
    }
}

async fn server() -> MockServer {
    let s = MockServer::start().await;
    mount_auth(&s, "tok-1", 3600, None).await;
    mount_discovery(&s).await;
    s
}

#[tokio::test]
async fn retry_after_on_429_is_honoured() {
    let s = server().await;
    Mock::given(method("GET"))
        .and(path("/compute/v2.1/limits"))
        .respond_with(
            ResponseTemplate::new(429)
                .insert_header("retry-after", "7")
                .set_body_string("slow down"),
        )
        .up_to_n_times(1)
        .with_priority(1)
        .mount(&s)
        .await;
    Mock::given(method("GET"))
        .and(path("/compute/v2.1/limits"))
        // the negotiated microversion is sent on every compute call
        .and(header("openstack-api-version", "compute 2.96"))
        .and(header("x-auth-token", "tok-1"))
        .respond_with(limits_ok())
        .expect(1)
        .mount(&s)
        .await;
    let (c, sleeps) = client(&s.uri(), fast());
    let l = c.execute(&GetLimits).await.expect("limits after one retry");
    assert_eq!(l.instances, Some(10));
    assert_eq!(l.ram, None, "-1 is unlimited");
    assert_eq!(*sleeps.lock().unwrap(), vec![Duration::from_secs(7)]);
    assert_eq!(c.stats().retries, 1);
    // the endpoint came from the catalog, not from the version document's host
    assert_eq!(
        c.endpoint(Service::Compute).await.unwrap().url,
        format!("{}/compute/v2.1", s.uri())
    );
}

#[tokio::test]
async fn service_unavailable_backs_off_then_is_transient() {
    let s = server().await;
    Mock::given(method("GET"))
        .and(path("/compute/v2.1/limits"))
        .respond_with(
            ResponseTemplate::new(503).set_body_string("<h1>503 Service Unavailable</h1>"),
        )
        .expect(3)
        .mount(&s)
        .await;
    let (c, sleeps) = client(&s.uri(), fast());
    let e = c.execute(&GetLimits).await.expect_err("keeps failing");
    assert_eq!(e.status(), Some(503));
    assert_eq!(
        *sleeps.lock().unwrap(),
        vec![Duration::from_secs(1), Duration::from_secs(2)],
        "exponential backoff between the 3 attempts"
    );
    let pe: ProviderError = e.into();
    assert!(matches!(pe, ProviderError::Transient(_)), "{pe:?}");
    assert!(
        pe.to_string()
            .contains("compute GET limits: HTTP 503: <h1>503 Service Unavailable</h1>"),
        "{pe}"
    );
}

#[tokio::test]
async fn too_long_retry_after_fails_at_once() {
    let s = server().await;
    Mock::given(method("GET"))
        .and(path("/compute/v2.1/limits"))
        .respond_with(ResponseTemplate::new(429).insert_header("retry-after", "3600"))
        .expect(1)
        .mount(&s)
        .await;
    let (c, sleeps) = client(&s.uri(), fast());
    let e: ProviderError = c.execute(&GetLimits).await.expect_err("gives up").into();
    assert_eq!(
        e.retry_after(),
        Some(Duration::from_secs(3600)),
        "rate limited, with the cloud's Retry-After for the breaker: {e:?}"
    );
    assert!(e.to_string().contains("Retry-After: 3600"), "{e}");
    assert!(sleeps.lock().unwrap().is_empty());
}

#[tokio::test]
async fn a_retry_after_longer_than_the_call_timeout_is_not_waited_for() {
    let s = server().await;
    Mock::given(method("GET"))
        .and(path("/compute/v2.1/limits"))
        .respond_with(ResponseTemplate::new(429).insert_header("retry-after", "30"))
        .expect(1)
        .mount(&s)
        .await;
    // 30 s is within the policy's 60 s, but beyond the call's 10 s timeout.
    let (c, sleeps) = client(&s.uri(), fast());
    let e = c.execute(&GetLimits).await.expect_err("gives up at once");
    assert!(
        matches!(&e, ApiError::RateLimited { retry_after: Some(d), .. } if *d == Duration::from_secs(30)),
        "{e:?}"
    );
    assert_eq!(e.status(), Some(429));
    assert!(sleeps.lock().unwrap().is_empty());
    let pe: ProviderError = e.into();
    assert!(matches!(pe, ProviderError::RateLimited { .. }), "{pe:?}");
}

#[tokio::test]
async fn a_hung_keystone_costs_waiting_calls_one_timeout_and_one_request() {
    let s = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/identity/v3/auth/tokens"))
        .respond_with(
            ResponseTemplate::new(201)
                .insert_header("x-subject-token", "tok-1")
                .set_body_json(token_body(&s.uri(), 3600))
                .set_delay(Duration::from_secs(60)),
        )
        .expect(1)
        .mount(&s)
        .await;
    let (c, _) = client(
        &s.uri(),
        ClientOptions {
            timeout: Duration::from_millis(500),
            ..fast()
        },
    );
    let c = Arc::new(c);
    let mut calls = Vec::new();
    for _ in 0..8 {
        let c = c.clone();
        calls.push(tokio::spawn(async move { c.execute(&GetLimits).await }));
    }
    for call in calls {
        let e = call.await.expect("join").expect_err("no token");
        assert!(matches!(e, ApiError::Timeout { .. }), "{e:?}");
        assert!(e.to_string().contains("auth/tokens"), "{e}");
        let pe: ProviderError = e.into();
        assert!(pe.is_api_failure(), "{pe:?}");
    }
    // One token request for all eight (wiremock checks `expect(1)` on
    // drop), not eight in turn.
    assert_eq!(c.stats().requests, 1);
}

#[tokio::test]
async fn a_rate_limited_keystone_is_rate_limited() {
    let s = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/identity/v3/auth/tokens"))
        .respond_with(ResponseTemplate::new(429).insert_header("retry-after", "120"))
        .expect(1)
        .mount(&s)
        .await;
    let (c, _) = client(&s.uri(), fast());
    let e: ProviderError = c.execute(&GetLimits).await.expect_err("429").into();
    assert_eq!(e.retry_after(), Some(Duration::from_secs(120)), "{e:?}");
    assert!(e.to_string().contains("identity"), "{e}");
}

#[tokio::test]
async fn the_provider_call_timeout_is_clouds_yaml_api_timeout() {
    let mut cfg = cloud("http://127.0.0.1:9");
    cfg.api_timeout = Some(Duration::from_secs(7));
    let p = OpenStackProvider::new("mockprov", cfg, ProviderOptions::default()).expect("provider");
    assert_eq!(p.api_timeout(), Duration::from_secs(7));
    assert_eq!(p.client().options().timeout, Duration::from_secs(7));
    let p = OpenStackProvider::new(
        "mockprov",
        cloud("http://127.0.0.1:9"),
        ProviderOptions::default(),
    )
    .expect("provider");
    assert_eq!(p.api_timeout(), Duration::from_secs(60), "the default");
}

fn create() -> CreateServer {
    CreateServer {
        name: "np0000000001".into(),
        flavor_id: "f".into(),
        image_id: "i".into(),
        boot_volume: None,
        metadata: Default::default(),
        networks: Networks::Auto,
        security_groups: vec![],
        key_name: None,
        availability_zone: None,
        config_drive: None,
        user_data: None,
        microversion: (2, 96),
    }
}

#[tokio::test]
async fn quota_refusals_are_quota_exceeded_and_not_retried() {
    let s = server().await;
    Mock::given(method("POST"))
        .and(path("/compute/v2.1/servers"))
        .and(body_partial_json(json!({"server": {"name": "np0000000001"}})))
        .respond_with(
            ResponseTemplate::new(413)
                .insert_header("retry-after", "0")
                .set_body_json(json!({"overLimit": {"code": 413,
                    "message": "Quota exceeded for instances: Requested 1, but already used 10 of 10 instances"}})),
        )
        .expect(1)
        .mount(&s)
        .await;
    let (c, _) = client(&s.uri(), fast());
    let e: ProviderError = c.execute(&create()).await.expect_err("413").into();
    assert!(matches!(e, ProviderError::QuotaExceeded(_)), "{e:?}");
    assert!(e.to_string().contains("already used 10 of 10"), "{e}");

    let s = server().await;
    Mock::given(method("POST"))
        .and(path("/compute/v2.1/servers"))
        .respond_with(
            ResponseTemplate::new(403).set_body_json(json!({"forbidden": {"code": 403,
            "message": "Quota exceeded for cores: Requested 24, but already used 0 of 20 cores"}})),
        )
        .mount(&s)
        .await;
    let (c, _) = client(&s.uri(), fast());
    let e: ProviderError = c.execute(&create()).await.expect_err("403").into();
    assert!(matches!(e, ProviderError::QuotaExceeded(_)), "{e:?}");
}

#[tokio::test]
async fn hung_endpoint_times_out() {
    let s = server().await;
    Mock::given(method("GET"))
        .and(path("/compute/v2.1/limits"))
        .respond_with(limits_ok().set_delay(Duration::from_secs(60)))
        .mount(&s)
        .await;
    let (c, _) = client(
        &s.uri(),
        ClientOptions {
            timeout: Duration::from_millis(300),
            ..fast()
        },
    );
    let e = c.execute(&GetLimits).await.expect_err("no answer");
    assert!(matches!(e, ApiError::Timeout { .. }), "{e:?}");
    let pe: ProviderError = e.into();
    assert!(matches!(pe, ProviderError::Timeout(_)), "{pe:?}");
    assert_eq!(
        pe.to_string(),
        "timed out: compute GET limits: no answer within 0.3 s"
    );
}

#[tokio::test]
async fn expired_token_is_replaced_once() {
    let s = MockServer::start().await;
    mount_auth(&s, "tok-1", 3600, Some(1)).await;
    mount_auth(&s, "tok-2", 3600, None).await;
    mount_discovery(&s).await;
    Mock::given(method("GET"))
        .and(path("/compute/v2.1/limits"))
        .and(header("x-auth-token", "tok-1"))
        .respond_with(ResponseTemplate::new(401).set_body_json(
            json!({"error": {"code": 401, "message": "The request you have made requires authentication."}}),
        ))
        .expect(1)
        .mount(&s)
        .await;
    Mock::given(method("GET"))
        .and(path("/compute/v2.1/limits"))
        .and(header("x-auth-token", "tok-2"))
        .respond_with(limits_ok())
        .expect(2)
        .mount(&s)
        .await;
    let (c, _) = client(&s.uri(), fast());
    c.execute(&GetLimits)
        .await
        .expect("after re-authentication");
    c.execute(&GetLimits).await.expect("the new token is kept");
    assert_eq!(c.stats().authentications, 2);
}

#[tokio::test]
async fn a_fresh_token_refused_too_is_unauthenticated() {
    let s = server().await;
    Mock::given(method("GET"))
        .and(path("/compute/v2.1/limits"))
        .respond_with(ResponseTemplate::new(401))
        .expect(2)
        .mount(&s)
        .await;
    let (c, _) = client(&s.uri(), fast());
    let e: ProviderError = c.execute(&GetLimits).await.expect_err("401 twice").into();
    assert!(matches!(e, ProviderError::Unauthenticated(_)), "{e:?}");
    assert_eq!(c.stats().authentications, 2);
}

#[tokio::test]
async fn tokens_are_renewed_before_they_expire() {
    // A token about to expire (lifetime 0) is renewed before the next call.
    let s = MockServer::start().await;
    mount_auth(&s, "tok-short", 0, None).await;
    mount_discovery(&s).await;
    Mock::given(method("GET"))
        .and(path("/compute/v2.1/limits"))
        .respond_with(limits_ok())
        .mount(&s)
        .await;
    let (c, _) = client(&s.uri(), fast());
    c.execute(&GetLimits).await.unwrap();
    c.execute(&GetLimits).await.unwrap();
    assert!(c.stats().authentications >= 2, "{:?}", c.stats());
    // A long-lived one is reused.
    let s = server().await;
    Mock::given(method("GET"))
        .and(path("/compute/v2.1/limits"))
        .respond_with(limits_ok())
        .mount(&s)
        .await;
    let (c, _) = client(&s.uri(), fast());
    for _ in 0..3 {
        c.execute(&GetLimits).await.unwrap();
    }
    assert_eq!(c.stats().authentications, 1);
}

#[tokio::test(start_paused = true)]
async fn refresh_time_leaves_a_margin() {
    // Pure timing: a 1 h token with a 2 min margin is renewed after 58 min;
    // a 1 min token after 30 s (the margin is at most half the lifetime).
    let now = Instant::now();
    let at = |lifetime: u64, margin: u64| {
        refresh_at(
            now,
            Duration::from_secs(lifetime),
            Duration::from_secs(margin),
        ) - now
    };
    assert_eq!(at(3600, 120), Duration::from_secs(3480));
    assert_eq!(at(60, 120), Duration::from_secs(30));
    assert_eq!(at(0, 120), Duration::ZERO);
}

#[tokio::test]
async fn refused_credentials_never_show_the_password() {
    let s = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/identity/v3/auth/tokens"))
        .respond_with(
            ResponseTemplate::new(401).set_body_json(json!({"error": {"code": 401,
            "message": format!("Invalid password {PASSWORD} for user u")}})),
        )
        .mount(&s)
        .await;
    let (c, _) = client(&s.uri(), fast());
    let e = c.execute(&GetLimits).await.expect_err("refused");
    let text = e.to_string();
    assert!(matches!(e, ApiError::Unauthenticated(_)), "{e:?}");
    assert!(text.contains("cloud mock: Keystone at"), "{text}");
    assert!(!text.contains(PASSWORD), "{text}");
    assert!(text.contains("<redacted>"), "{text}");
    assert!(!format!("{c:?}").contains(PASSWORD));
    assert!(!format!("{:?}", c.cloud()).contains(PASSWORD));
}

#[tokio::test]
async fn tokens_in_error_bodies_are_scrubbed() {
    let s = server().await;
    Mock::given(method("GET"))
        .and(path("/compute/v2.1/limits"))
        .respond_with(ResponseTemplate::new(500).set_body_string("boom: token tok-1 rejected"))
        .mount(&s)
        .await;
    let (c, _) = client(&s.uri(), fast());
    let e = c.execute(&GetLimits).await.expect_err("500");
    assert_eq!(
        e.to_string(),
        "compute GET limits: HTTP 500: boom: token <redacted> rejected"
    );
    // The request's Debug shows neither the password nor header values.
    let auth = crate::api::identity::Authenticate {
        auth: &c.cloud().auth,
    };
    assert!(!format!("{:?}", auth.request()).contains(PASSWORD));
}

#[tokio::test]
async fn connection_refused_is_retried_then_transient() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let s = MockServer::start().await;
    let mut body = token_body(&s.uri(), 3600);
    body["token"]["catalog"][0]["endpoints"][0]["url"] =
        json!(format!("http://127.0.0.1:{port}/v2.1"));
    Mock::given(method("POST"))
        .and(path("/identity/v3/auth/tokens"))
        .respond_with(
            ResponseTemplate::new(201)
                .insert_header("x-subject-token", "tok")
                .set_body_json(body),
        )
        .mount(&s)
        .await;
    let (c, sleeps) = client(&s.uri(), fast());
    let e: ProviderError = c.execute(&GetLimits).await.expect_err("refused").into();
    assert!(matches!(e, ProviderError::Transient(_)), "{e:?}");
    assert_eq!(
        sleeps.lock().unwrap().len(),
        4,
        "the version discovery GET and the limits GET were each tried 3 times"
    );
    // a POST is not repeated: it may have reached the cloud
    sleeps.lock().unwrap().clear();
    let _ = c.execute(&create()).await.expect_err("refused");
    assert!(sleeps.lock().unwrap().is_empty());
}

fn provider(uri: &str, options: ProviderOptions) -> OpenStackProvider {
    OpenStackProvider::new("mockprov", cloud(uri), options).expect("provider")
}

#[tokio::test]
async fn one_server_list_serves_concurrent_callers() {
    let s = server().await;
    Mock::given(method("GET"))
        .and(path("/compute/v2.1/servers/detail"))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(json!({"servers": [
            {"id": "s1", "name": "np0000000001", "status": "ACTIVE",
             "metadata": {"nodepool_node_id": "0000000001", "nodepool_provider_name": "mockprov"},
             "addresses": {}, "flavor": {"vcpus": 1, "ram": 64}}]}))
                .set_delay(Duration::from_millis(200)),
        )
        .expect(1)
        .mount(&s)
        .await;
    Mock::given(method("GET"))
        .and(path("/network/v2.0/networks"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({"networks": []})))
        .mount(&s)
        .await;
    let p = Arc::new(provider(
        &s.uri(),
        ProviderOptions {
            list_ttl: Duration::from_secs(60),
            ..ProviderOptions::default()
        },
    ));
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let p = p.clone();
        tasks.push(tokio::spawn(async move { p.list_instances().await }));
    }
    for t in tasks {
        let list = t.await.unwrap().expect("list");
        assert_eq!(list.len(), 1);
        assert_eq!(list[0].node_id().as_deref(), Some("0000000001"));
    }
}

#[tokio::test]
async fn callers_waiting_for_a_hung_server_list_share_its_timeout() {
    let s = server().await;
    Mock::given(method("GET"))
        .and(path("/compute/v2.1/servers/detail"))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(json!({"servers": []}))
                .set_delay(Duration::from_secs(60)),
        )
        .expect(1)
        .mount(&s)
        .await;
    let p = Arc::new(provider(
        &s.uri(),
        ProviderOptions {
            client: ClientOptions {
                timeout: Duration::from_millis(500),
                ..fast()
            },
            ..ProviderOptions::default()
        },
    ));
    // The token first, so only the list hangs.
    p.client().authenticate().await.expect("token");
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let p = p.clone();
        tasks.push(tokio::spawn(async move { p.list_instances().await }));
    }
    for t in tasks {
        let e = t.await.expect("join").expect_err("hung");
        assert!(matches!(e, ProviderError::Timeout(_)), "{e:?}");
    }
    // One list request for all eight (wiremock checks `expect(1)`).
}

async fn upload_mocks(s: &MockServer, put: ResponseTemplate, checksum: &str) {
    Mock::given(method("POST"))
        .and(path("/image/v2/images"))
        .respond_with(
            ResponseTemplate::new(201).set_body_json(json!({"id": "img-1", "status": "queued"})),
        )
        .mount(s)
        .await;
    Mock::given(method("PUT"))
        .and(path("/image/v2/images/img-1/file"))
        .and(header("content-type", "application/octet-stream"))
        .and(header("content-length", "5"))
        .respond_with(put)
        .mount(s)
        .await;
    Mock::given(method("GET"))
        .and(path("/image/v2/images/img-1"))
        .respond_with(ResponseTemplate::new(200).set_body_json(
            json!({"id": "img-1", "status": "active", "checksum": checksum, "size": 5}),
        ))
        .mount(s)
        .await;
    Mock::given(method("DELETE"))
        .and(path("/image/v2/images/img-1"))
        .respond_with(ResponseTemplate::new(204))
        .expect(1)
        .mount(s)
        .await;
}

fn upload_spec(dir: &std::path::Path, timeout: Duration) -> ImageUploadSpec {
    let p = dir.join("img.qcow2");
    std::fs::write(&p, b"hello").unwrap();
    ImageUploadSpec {
        name: "img".into(),
        path: p,
        format: "qcow2".into(),
        properties: Default::default(),
        md5: None,
        sha256: None,
        timeout,
        sent: Default::default(),
    }
}

#[tokio::test]
async fn glance_checksum_mismatch_fails_and_deletes_the_image() {
    let s = server().await;
    upload_mocks(
        &s,
        ResponseTemplate::new(204),
        "0123456789abcdef0123456789abcdef",
    )
    .await;
    let p = provider(&s.uri(), ProviderOptions::default());
    let dir = tempfile::tempdir().unwrap();
    let mut spec = upload_spec(dir.path(), Duration::from_secs(30));
    // md5("hello"), which the file has; Glance reports something else
    spec.md5 = Some("5d41402abc4b2a76b9719d911017c592".into());
    let e = p.upload_image(&spec).await.expect_err("mismatch");
    assert!(
        e.to_string().contains(
            "md5 (Glance checksum) checksum mismatch: expected 5d41402abc4b2a76b9719d911017c592, got 0123456789abcdef0123456789abcdef"
        ),
        "{e}"
    );
}

#[tokio::test]
async fn upload_timeout_fails_and_deletes_the_image() {
    let s = server().await;
    // md5("hello")
    upload_mocks(
        &s,
        ResponseTemplate::new(204).set_delay(Duration::from_secs(60)),
        "5d41402abc4b2a76b9719d911017c592",
    )
    .await;
    let p = provider(&s.uri(), ProviderOptions::default());
    let dir = tempfile::tempdir().unwrap();
    let e = p
        .upload_image(&upload_spec(dir.path(), Duration::from_millis(500)))
        .await
        .expect_err("timeout");
    assert!(matches!(e, ProviderError::Timeout(_)), "{e:?}");
}

#[tokio::test]
async fn a_lone_sha256_is_checked_on_the_bytes_sent() {
    let s = server().await;
    upload_mocks(
        &s,
        ResponseTemplate::new(204),
        "5d41402abc4b2a76b9719d911017c592",
    )
    .await;
    let p = provider(&s.uri(), ProviderOptions::default());
    let dir = tempfile::tempdir().unwrap();
    let mut spec = upload_spec(dir.path(), Duration::from_secs(30));
    spec.sha256 = Some("00".repeat(32));
    let e = p.upload_image(&spec).await.expect_err("mismatch");
    assert!(
        e.to_string()
            .contains("sha256 (of the file sent) checksum mismatch"),
        "{e}"
    );
}

#[tokio::test]
async fn upload_succeeds_when_checksums_match() {
    let s = server().await;
    Mock::given(method("POST"))
        .and(path("/image/v2/images"))
        .and(body_partial_json(
            json!({"name": "img", "disk_format": "qcow2",
            "container_format": "bare", "visibility": "private",
            "owner_specified.openstack.md5": "5d41402abc4b2a76b9719d911017c592"}),
        ))
        .respond_with(
            ResponseTemplate::new(201).set_body_json(json!({"id": "img-1", "status": "queued"})),
        )
        .mount(&s)
        .await;
    Mock::given(method("PUT"))
        .and(path("/image/v2/images/img-1/file"))
        .respond_with(ResponseTemplate::new(204))
        .expect(1)
        .mount(&s)
        .await;
    Mock::given(method("GET"))
        .and(path("/image/v2/images/img-1"))
        .respond_with(
            ResponseTemplate::new(200).set_body_json(json!({"id": "img-1",
            "status": "active", "checksum": "5d41402abc4b2a76b9719d911017c592", "size": 5,
            "os_hash_algo": "sha256",
            "os_hash_value": "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"})),
        )
        .mount(&s)
        .await;
    let p = provider(&s.uri(), ProviderOptions::default());
    let dir = tempfile::tempdir().unwrap();
    let mut spec = upload_spec(dir.path(), Duration::from_secs(30));
    spec.md5 = Some("5d41402abc4b2a76b9719d911017c592".into());
    spec.sha256 = Some("2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824".into());
    assert_eq!(p.upload_image(&spec).await.expect("upload"), "img-1");
    assert_eq!(spec.sent.get(), 5, "every byte sent is counted");
}
