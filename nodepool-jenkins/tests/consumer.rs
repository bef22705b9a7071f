//! `JenkinsConsumer` as a `NodeConsumer`, against the fake master.

mod fake_jenkins;

use std::sync::Arc;
use std::time::Duration;

use fake_jenkins::{FakeJenkins, TOKEN, USER};
use nodepool_core::config::{JenkinsConnection, Secret, Target, TargetLabel};
use nodepool_core::consumer::{ConsumerError, NodeConsumer, NodeOutcome};
use nodepool_core::consumers::JobHold;
use nodepool_core::model::{Node, NodeState, Port};
use nodepool_core::store::Store;
use nodepool_jenkins::{ClientOptions, JenkinsConsumer, JenkinsOptions, RetryPolicy};
use nodepool_model::store::MemoryStore;

fn target(url: &str) -> Target {
    Target {
        name: "ci".into(),
        jenkins: JenkinsConnection {
            url: url.into(),
            user: Some(USER.into()),
            api_token: Some(Secret::new(TOKEN)),
            api_token_file: None,
            credentials_id: Some("jenkins-ssh".into()),
            remote_fs_root: "/var/lib/jenkins".into(),
        },
        labels: vec![
            TargetLabel {
                name: "small".into(),
                min_ready: 2,
            },
            TargetLabel {
                name: "large".into(),
                min_ready: 0,
            },
        ],
    }
}

fn options() -> JenkinsOptions {
    JenkinsOptions {
        client: ClientOptions {
            timeout: Duration::from_secs(10),
            retry: RetryPolicy {
                max_attempts: 2,
                base_delay: Duration::from_millis(5),
                max_delay: Duration::from_millis(5),
            },
        },
        connect_timeout: Duration::from_secs(600),
        poll_concurrency: 4,
    }
}

fn store() -> Store {
    Store::new(Arc::new(MemoryStore::new().new_session()))
}

fn node(label: &str) -> Node {
    let mut n = Node::new(NodeState::Ready, 0.0, "sim", "main", vec![label.into()]);
    n.interface_ip = Some("198.51.100.7".into());
    n.connection_port = Some(Port::Number(2022));
    n.host_keys = vec!["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAA".into()];
    n
}

async fn setup() -> (FakeJenkins, Store, JenkinsConsumer) {
    let j = FakeJenkins::start().await;
    let s = store();
    let c = JenkinsConsumer::new(&target(&j.url), s.clone(), options()).expect("consumer");
    (j, s, c)
}

#[tokio::test]
async fn a_ready_node_becomes_an_agent_once() {
    let (j, _s, c) = setup().await;
    assert_eq!(c.name(), "ci");
    assert_eq!(
        c.wants(),
        [("small".to_owned(), 2), ("large".to_owned(), 0)]
    );
    c.node_ready("0000000001", &node("small"))
        .await
        .expect("ready");
    let a = j.agent("small-sim-0000000001").expect("agent");
    assert_eq!(a.label(), "small");
    assert_eq!(a.host(), "198.51.100.7");
    assert_eq!(a.config["launcher"]["port"], 2022);
    assert_eq!(a.config["launcher"]["credentialsId"], "jenkins-ssh");
    assert_eq!(a.config["remoteFS"], "/var/lib/jenkins");
    assert_eq!(a.config["numExecutors"], 1);
    assert_eq!(
        a.config["launcher"]["sshHostKeyVerificationStrategy"]["key"],
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAA"
    );
    let requests = j.log().len();
    c.node_ready("0000000001", &node("small"))
        .await
        .expect("again");
    assert_eq!(j.log().len(), requests, "idempotent without a call");
    assert!(c.finished_nodes().await.expect("poll").is_empty());
    assert!(c.busy_nodes().is_empty());
}

#[tokio::test]
async fn a_restarted_consumer_adopts_its_agents() {
    let (j, s, c) = setup().await;
    c.node_ready("0000000001", &node("small"))
        .await
        .expect("ready");
    drop(c);
    let c = JenkinsConsumer::new(&target(&j.url), s, options()).expect("consumer");
    c.node_ready("0000000001", &node("small"))
        .await
        .expect("adopt");
    assert_eq!(
        j.log()
            .iter()
            .filter(|l| l.path.ends_with("doCreateItem"))
            .count(),
        1,
        "not created twice"
    );
    j.run_job("small-sim-0000000001", "tox", "SUCCESS");
    let f = c.finished_nodes().await.expect("poll");
    assert_eq!(f.len(), 1);
}

#[tokio::test]
async fn a_node_without_an_address_cannot_be_registered() {
    let (j, _s, c) = setup().await;
    let mut n = node("small");
    n.interface_ip = None;
    let err = c
        .node_ready("0000000002", &n)
        .await
        .expect_err("no address");
    assert!(matches!(err, ConsumerError::Other(_)), "{err}");
    assert!(j.agents().is_empty());
}

#[tokio::test]
async fn an_agent_offline_after_its_job_is_finished_once() {
    let (j, _s, c) = setup().await;
    c.node_ready("0000000001", &node("small"))
        .await
        .expect("ready");
    c.node_ready("0000000002", &node("small"))
        .await
        .expect("ready");
    j.start_job("small-sim-0000000001", "tox");
    assert!(c.finished_nodes().await.expect("poll").is_empty());
    assert_eq!(c.busy_nodes(), ["0000000001"]);
    j.finish_job("small-sim-0000000001", "SUCCESS", true);
    let f = c.finished_nodes().await.expect("poll");
    assert_eq!(f.len(), 1);
    assert_eq!(f[0].node_id, "0000000001");
    assert_eq!(f[0].outcome, NodeOutcome::Used);
    assert!(c.busy_nodes().is_empty());
    assert!(
        c.finished_nodes().await.expect("poll").is_empty(),
        "reported once"
    );
    c.node_gone("0000000001").await.expect("gone");
    assert!(j.agent("small-sim-0000000001").is_none());
    assert!(j.agent("small-sim-0000000002").is_some());
}

#[tokio::test]
async fn a_finished_build_ends_the_agent_even_when_it_stays_online() {
    let (j, _s, c) = setup().await;
    c.node_ready("0000000001", &node("small"))
        .await
        .expect("ready");
    j.start_job("small-sim-0000000001", "tox");
    assert!(c.finished_nodes().await.expect("poll").is_empty());
    j.finish_job("small-sim-0000000001", "SUCCESS", false);
    let f = c.finished_nodes().await.expect("poll");
    assert_eq!(f.len(), 1, "the build seen running has finished");
}

#[tokio::test]
async fn a_job_between_two_polls_is_noticed_by_the_offline_flag() {
    let (j, _s, c) = setup().await;
    c.node_ready("0000000001", &node("small"))
        .await
        .expect("ready");
    j.run_job("small-sim-0000000001", "tox", "SUCCESS");
    let f = c.finished_nodes().await.expect("poll");
    assert_eq!(f.len(), 1);
    assert_eq!(f[0].outcome, NodeOutcome::Used);
}

#[tokio::test]
async fn a_failed_job_with_a_hold_rule_is_held() {
    let (j, s, c) = setup().await;
    s.set_job_hold(&JobHold {
        job: "folder/flaky".into(),
        hold_on_failure: 1,
        created_time: None,
    })
    .await
    .expect("rule");
    for id in ["0000000001", "0000000002", "0000000003", "0000000004"] {
        c.node_ready(id, &node("small")).await.expect("ready");
    }
    // Seen running, then failed.
    j.start_job("small-sim-0000000001", "folder/flaky");
    assert!(c.finished_nodes().await.expect("poll").is_empty());
    j.finish_job("small-sim-0000000001", "FAILURE", true);
    // Started and failed between polls: found through the agent's feed.
    j.run_job("small-sim-0000000002", "folder/flaky", "UNSTABLE");
    // Succeeded, and failed without a rule.
    j.run_job("small-sim-0000000003", "folder/flaky", "SUCCESS");
    j.run_job("small-sim-0000000004", "other", "FAILURE");
    let mut f = c.finished_nodes().await.expect("poll");
    f.sort_by(|a, b| a.node_id.cmp(&b.node_id));
    let outcomes: Vec<(&str, &NodeOutcome)> =
        f.iter().map(|f| (f.node_id.as_str(), &f.outcome)).collect();
    assert_eq!(outcomes.len(), 4);
    match outcomes[0].1 {
        NodeOutcome::Hold { comment, job } => {
            assert_eq!(job.as_deref(), Some("folder/flaky"));
            assert!(
                comment.contains("folder/flaky") && comment.contains("#1"),
                "{comment}"
            );
        }
        o => panic!("node 1: {o:?}"),
    }
    assert!(
        matches!(outcomes[1].1, NodeOutcome::Hold { job: Some(j), .. } if j == "folder/flaky"),
        "{:?}",
        outcomes[1]
    );
    assert_eq!(outcomes[2].1, &NodeOutcome::Used);
    assert_eq!(outcomes[3].1, &NodeOutcome::Used);
}

#[tokio::test]
async fn build_results_are_not_fetched_without_hold_rules() {
    let (j, _s, c) = setup().await;
    c.node_ready("0000000001", &node("small"))
        .await
        .expect("ready");
    j.run_job("small-sim-0000000001", "tox", "FAILURE");
    let f = c.finished_nodes().await.expect("poll");
    assert_eq!(f[0].outcome, NodeOutcome::Used);
    assert!(
        !j.log()
            .iter()
            .any(|l| l.path.ends_with("rssAll") || l.path.contains("/job/")),
        "no build lookups"
    );
}

#[tokio::test]
async fn an_agent_deleted_in_jenkins_or_never_online_is_finished() {
    let j = FakeJenkins::start().await;
    let mut o = options();
    o.connect_timeout = Duration::from_millis(300);
    let c = JenkinsConsumer::new(&target(&j.url), store(), o).expect("consumer");
    c.node_ready("0000000001", &node("small"))
        .await
        .expect("ready");
    j.set_connects(false);
    c.node_ready("0000000002", &node("small"))
        .await
        .expect("ready");
    let registered = tokio::time::Instant::now();
    j.remove_agent("small-sim-0000000001");
    let mut done: Vec<String> = c
        .finished_nodes()
        .await
        .expect("poll")
        .into_iter()
        .map(|f| f.node_id)
        .collect();
    assert!(done.contains(&"0000000001".to_owned()), "{done:?}");
    // Poll until the connect timeout has passed (bounded).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !done.contains(&"0000000002".to_owned()) {
        assert!(tokio::time::Instant::now() < deadline, "never given up");
        tokio::time::sleep(Duration::from_millis(20)).await;
        for f in c.finished_nodes().await.expect("poll") {
            assert_eq!(f.outcome, NodeOutcome::Used);
            done.push(f.node_id);
        }
    }
    assert!(
        registered.elapsed() >= Duration::from_millis(250),
        "given up only after connect_timeout"
    );
}

#[tokio::test]
async fn gone_nodes_lose_their_agents_even_when_unknown() {
    let (j, s, c) = setup().await;
    c.node_ready("0000000001", &node("small"))
        .await
        .expect("ready");
    // Another consumer instance (after a reload) never saw the node.
    let other = JenkinsConsumer::new(&target(&j.url), s, options()).expect("consumer");
    other.node_gone("0000000001").await.expect("gone");
    assert!(j.agent("small-sim-0000000001").is_none());
    other
        .node_gone("0000000001")
        .await
        .expect("nothing to remove");
    c.node_gone("0000000001").await.expect("404 is gone");
}

#[tokio::test]
async fn an_unwell_master_is_reported() {
    let (j, _s, c) = setup().await;
    c.node_ready("0000000001", &node("small"))
        .await
        .expect("ready");
    j.fail_next(503, 10);
    let err = c.finished_nodes().await.expect_err("every poll failed");
    assert!(matches!(err, ConsumerError::Transient(_)), "{err}");
    // Later polls work again once the master recovers.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while c.finished_nodes().await.is_err() {
        assert!(tokio::time::Instant::now() < deadline);
    }
    let err = c.node_ready("0000000009", &node("small")).await;
    assert!(err.is_ok(), "{err:?}");
}

#[tokio::test]
async fn a_refused_token_is_unauthenticated_without_showing_it() {
    let j = FakeJenkins::start().await;
    let mut t = target(&j.url);
    let wrong = "ffffeeeeddddccccbbbbaaaa";
    t.jenkins.api_token = Some(Secret::new(wrong));
    let c = JenkinsConsumer::new(&t, store(), options()).expect("consumer");
    let err = c
        .node_ready("0000000001", &node("small"))
        .await
        .expect_err("401");
    assert!(matches!(err, ConsumerError::Unauthenticated(_)), "{err}");
    let text = format!("{err} {err:?} {c:?}");
    assert!(!text.contains(wrong), "{text}");
}

#[tokio::test]
async fn agents_of_vanished_nodes_are_removed_on_reconcile() {
    let (j, s, c) = setup().await;
    for id in ["0000000001", "0000000002"] {
        c.node_ready(id, &node("small")).await.expect("ready");
    }
    // Agents this target did not make: a static one, another target's.
    j.add_agent("static-1", "small", "a static agent");
    j.add_agent(
        "small-sim-0000000099",
        "small",
        "nodepool node 0000000099 of provider sim, target other",
    );
    // After a restart only node 1 is still allocated to the target.
    let c2 = JenkinsConsumer::new(&target(&j.url), s, options()).expect("consumer");
    c2.reconcile(&["0000000001".to_owned()])
        .await
        .expect("reconcile");
    assert_eq!(
        j.agents().keys().cloned().collect::<Vec<_>>(),
        ["small-sim-0000000001", "small-sim-0000000099", "static-1"]
    );
    // A consumer keeps what it registered itself even if not listed.
    c.reconcile(&[]).await.expect("reconcile");
    assert!(j.agent("small-sim-0000000001").is_some());
}
