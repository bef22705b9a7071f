//! Each Jenkins call against the fake master (a real HTTP server): auth,
//! CSRF crumbs, statuses and their meanings, retries.

mod fake_jenkins;

use std::time::Duration;

use fake_jenkins::{FakeJenkins, TOKEN, USER};
use nodepool_core::config::{JenkinsConnection, Secret};
use nodepool_core::consumer::ConsumerError;
use nodepool_jenkins::api::{
    AgentBuilds, AgentSpec, CreateAgent, DeleteAgent, GetBuild, GetComputer, HostKeyCheck,
    ListAgents,
};
use nodepool_jenkins::{ApiError, ClientOptions, JenkinsClient, RetryPolicy};

fn conn(url: &str, token: &str) -> JenkinsConnection {
    JenkinsConnection {
        url: url.into(),
        user: Some(USER.into()),
        api_token: Some(Secret::new(token)),
        api_token_file: None,
        credentials_id: Some("jenkins-ssh".into()),
        remote_fs_root: "/home/jenkins".into(),
    }
}

fn options() -> ClientOptions {
    ClientOptions {
        timeout: Duration::from_secs(10),
        retry: RetryPolicy {
            max_attempts: 4,
            base_delay: Duration::from_millis(5),
            max_delay: Duration::from_millis(20),
        },
    }
}

fn client(j: &FakeJenkins) -> JenkinsClient {
    JenkinsClient::new(&conn(&j.url, TOKEN), options()).expect("client")
}

fn spec(name: &str) -> AgentSpec {
    AgentSpec {
        name: name.into(),
        description: "test".into(),
        label: "small".into(),
        remote_fs_root: "/home/jenkins".into(),
        host: "192.0.2.10".into(),
        port: 22,
        credentials_id: Some("jenkins-ssh".into()),
        host_key: HostKeyCheck::None,
    }
}

#[tokio::test]
async fn agents_are_created_read_and_deleted_with_one_crumb() {
    let j = FakeJenkins::start().await;
    let c = client(&j);
    c.execute(&CreateAgent(spec("a1"))).await.expect("create");
    let agent = j.agent("a1").expect("created");
    assert_eq!(agent.label(), "small");
    assert_eq!(agent.host(), "192.0.2.10");
    assert_eq!(agent.config["launcher"]["credentialsId"], "jenkins-ssh");
    assert_eq!(agent.config["remoteFS"], "/home/jenkins");
    // Jenkins answered 302 and the client did not follow it.
    let log = j.log();
    let create = log
        .iter()
        .find(|l| l.path.ends_with("/computer/doCreateItem"))
        .expect("create logged");
    assert_eq!(create.status, 302);
    assert!(
        !log.iter()
            .any(|l| l.method == "GET" && l.path == "/jenkins/computer/")
    );

    let info = c.execute(&GetComputer("a1".into())).await.expect("get");
    assert_eq!(info.name, "a1");
    assert!(!info.offline && info.idle && !info.temporarily_offline);
    assert!(info.current_builds.is_empty());
    let names = c.execute(&ListAgents).await.expect("list");
    assert_eq!(names, ["Built-In Node", "a1"]);

    c.execute(&DeleteAgent("a1".into())).await.expect("delete");
    assert!(j.agent("a1").is_none());
    assert_eq!(c.stats().crumbs, 1, "one crumb serves every POST");
}

#[tokio::test]
async fn an_expired_crumb_is_replaced_once() {
    let j = FakeJenkins::start().await;
    let c = client(&j);
    c.execute(&CreateAgent(spec("a1"))).await.expect("create");
    j.expire_crumbs();
    c.execute(&DeleteAgent("a1".into())).await.expect("delete");
    assert_eq!(c.stats().crumbs, 2);
    let statuses: Vec<u16> = j
        .log()
        .iter()
        .filter(|l| l.path.ends_with("doDelete"))
        .map(|l| l.status)
        .collect();
    assert_eq!(statuses, [403, 302]);
}

#[tokio::test]
async fn without_a_crumb_a_post_is_refused() {
    // What the client protects against: Jenkins refuses a POST without
    // the session's crumb (here sent by hand without one).
    let j = FakeJenkins::start().await;
    let resp = reqwest::Client::new()
        .post(format!("{}computer/doCreateItem", j.url))
        .basic_auth(USER, Some(TOKEN))
        .header("content-type", "application/x-www-form-urlencoded")
        .body("name=x")
        .send()
        .await
        .expect("send");
    assert_eq!(resp.status().as_u16(), 403);
    assert!(j.agent("x").is_none());
}

#[tokio::test]
async fn without_csrf_protection_no_crumb_is_sent() {
    let j = FakeJenkins::start().await;
    j.set_csrf(false);
    let c = client(&j);
    c.execute(&CreateAgent(spec("a1"))).await.expect("create");
    c.execute(&DeleteAgent("a1".into())).await.expect("delete");
    let issuer: Vec<u16> = j
        .log()
        .iter()
        .filter(|l| l.path.ends_with("crumbIssuer/api/json"))
        .map(|l| l.status)
        .collect();
    assert_eq!(issuer, [404], "asked once, then remembered");
}

#[tokio::test]
async fn a_wrong_token_is_unauthenticated_and_never_shown() {
    let j = FakeJenkins::start().await;
    let wrong = "0000aaaa1111bbbb2222cccc";
    let c = JenkinsClient::new(&conn(&j.url, wrong), options()).expect("client");
    let err = c.execute(&GetComputer("a1".into())).await.expect_err("401");
    assert_eq!(err.status(), Some(401));
    let text = format!("{err} {err:?}");
    assert!(!text.contains(wrong), "{text}");
    assert!(matches!(
        ConsumerError::from(err),
        ConsumerError::Unauthenticated(_)
    ));
    // POSTs fail the same way (at the crumb issuer).
    let err = c.execute(&CreateAgent(spec("a1"))).await.expect_err("401");
    assert_eq!(err.status(), Some(401));
    assert!(j.agent("a1").is_none());
    assert_eq!(c.stats().retries, 0, "401 is not retried");
}

#[tokio::test]
async fn a_rotated_token_file_is_read_again_on_401() {
    let j = FakeJenkins::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("token");
    std::fs::write(&file, "stale-token-value").expect("write");
    let mut cn = conn(&j.url, "unused");
    cn.api_token = None;
    cn.api_token_file = Some(file.clone());
    let c = JenkinsClient::new(&cn, options()).expect("client");
    let err = c.execute(&ListAgents).await.expect_err("stale");
    assert_eq!(err.status(), Some(401));
    std::fs::write(&file, format!("{TOKEN}\n")).expect("rotate");
    c.execute(&ListAgents).await.expect("the new token works");
}

#[tokio::test]
async fn unknown_agents_and_builds_are_not_found() {
    let j = FakeJenkins::start().await;
    let c = client(&j);
    for err in [
        c.execute(&GetComputer("nope".into()))
            .await
            .expect_err("404"),
        c.execute(&DeleteAgent("nope".into()))
            .await
            .expect_err("404"),
        c.execute(&AgentBuilds("nope".into()))
            .await
            .expect_err("404"),
        c.execute(&GetBuild("job/x/1/".into()))
            .await
            .expect_err("404"),
    ] {
        assert!(err.is_not_found(), "{err}");
        assert!(matches!(
            ConsumerError::from(err),
            ConsumerError::NotFound(_)
        ));
    }
}

#[tokio::test]
async fn a_taken_name_is_a_conflict() {
    let j = FakeJenkins::start().await;
    let c = client(&j);
    c.execute(&CreateAgent(spec("a1"))).await.expect("create");
    let err = c
        .execute(&CreateAgent(spec("a1")))
        .await
        .expect_err("exists");
    assert_eq!(err.status(), Some(400));
    assert!(err.to_string().contains("already exists"), "{err}");
    assert!(matches!(
        ConsumerError::from(err),
        ConsumerError::Conflict(_)
    ));
}

#[tokio::test]
async fn server_errors_are_retried_with_backoff_then_given_up() {
    let j = FakeJenkins::start().await;
    let c = client(&j);
    j.fail_next(503, 2);
    c.execute(&ListAgents).await.expect("third attempt works");
    assert_eq!(c.stats().retries, 2);

    j.fail_next(502, 10);
    let before = j.log().len();
    let err = c.execute(&ListAgents).await.expect_err("gives up");
    assert_eq!(err.status(), Some(502));
    assert_eq!(j.log().len() - before, 4, "max_attempts requests");
    assert!(matches!(
        ConsumerError::from(err),
        ConsumerError::Transient(_)
    ));
}

#[tokio::test]
async fn an_unreachable_master_is_transient() {
    // A port nobody listens on: bind, take the port, close.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").port()
    };
    let c = JenkinsClient::new(
        &conn(&format!("http://127.0.0.1:{port}/"), TOKEN),
        options(),
    )
    .expect("client");
    let err = c.execute(&ListAgents).await.expect_err("refused");
    assert!(matches!(err, ApiError::Transport { .. }), "{err}");
    assert_eq!(c.stats().retries, 3, "connection failures are retried");
    assert!(matches!(
        ConsumerError::from(err),
        ConsumerError::Transient(_)
    ));
}

#[tokio::test]
async fn running_and_finished_builds_are_read() {
    let j = FakeJenkins::start().await;
    let c = client(&j);
    c.execute(&CreateAgent(spec("a1"))).await.expect("create");
    let n = j.start_job("a1", "folder/flaky");
    let info = c.execute(&GetComputer("a1".into())).await.expect("get");
    assert!(!info.idle);
    assert_eq!(
        info.current_builds,
        [format!("{}job/folder/job/flaky/{n}/", j.url)]
    );
    let running = c
        .execute(&GetBuild(format!("job/folder/job/flaky/{n}/")))
        .await
        .expect("build");
    assert!(running.building && !running.failed());
    j.finish_job("a1", "FAILURE", true);
    let info = c.execute(&GetComputer("a1".into())).await.expect("get");
    assert!(info.offline && info.temporarily_offline && info.idle);
    assert!(info.offline_cause.is_some());
    let builds = c.execute(&AgentBuilds("a1".into())).await.expect("feed");
    assert_eq!(builds, [format!("job/folder/job/flaky/{n}/")]);
    let done = c
        .execute(&GetBuild(builds[0].clone()))
        .await
        .expect("build");
    assert_eq!(done.job, "folder/flaky");
    assert_eq!(done.result.as_deref(), Some("FAILURE"));
    assert!(done.failed());
}
