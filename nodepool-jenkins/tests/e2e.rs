//! End to end: the launcher (in-process, memory store, simulated cloud),
//! the consumer runtime and `JenkinsConsumer`, against the fake master.
//! Real time (HTTP cannot run on a paused clock), short intervals, and
//! every wait polls a condition with a deadline.

mod fake_jenkins;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use fake_jenkins::{FakeJenkins, TOKEN, USER};
use nodepool_core::config::Config;
use nodepool_core::consumers::{ConsumerRuntime, ConsumerSettings, JobHold};
use nodepool_core::launcher::{Launcher, LauncherSettings, ProviderFactory};
use nodepool_core::model::{Node, NodeState};
use nodepool_core::provider::Provider;
use nodepool_core::store::Store;
use nodepool_jenkins::{ClientOptions, JenkinsOptions, RetryPolicy, consumer_factory};
use nodepool_model::store::MemoryStore;
use nodepool_simulated::SimulatedProvider;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

fn yaml(url: &str) -> String {
    format!(
        r#"
labels:
  - name: small
providers:
  - name: sim
    driver: simulated
    simulation:
      boot-delay: 0.05
      delete-delay: 0.01
      flavors:
        - {{name: s, vcpus: 2, ram: 2048}}
    cloud-images: [{{name: img}}]
    pools:
      - name: main
        max-servers: 10
        labels:
          - {{name: small, cloud-image: img, flavor-name: s}}
targets:
  - name: ci
    jenkins:
      url: {url}
      user: {USER}
      api-token: {TOKEN}
      credentials-id: jenkins-ssh
    labels:
      - name: small
        min-ready: 2
"#
    )
}

struct System {
    store: Store,
    shutdown: CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl System {
    fn start(mem: &MemoryStore, yaml: &str) -> System {
        let cfg = Arc::new(Config::from_yaml(yaml).expect("valid config"));
        let (_tx, rx) = watch::channel(cfg);
        let shutdown = CancellationToken::new();
        let providers: ProviderFactory = Arc::new(|pc| {
            Ok(
                Arc::new(SimulatedProvider::new(pc).map_err(|e| e.to_string())?)
                    as Arc<dyn Provider>,
            )
        });
        let launcher = Launcher::new(
            Store::new(Arc::new(mem.new_session())),
            providers,
            LauncherSettings {
                hostname: "l1".into(),
                max_pass_interval: Duration::from_millis(100),
                ..LauncherSettings::default()
            },
        );
        let consumer_store = Store::new(Arc::new(mem.new_session()));
        let runtime = ConsumerRuntime::new(
            consumer_store.clone(),
            consumer_factory(
                consumer_store,
                JenkinsOptions {
                    client: ClientOptions {
                        timeout: Duration::from_secs(10),
                        retry: RetryPolicy {
                            max_attempts: 3,
                            base_delay: Duration::from_millis(10),
                            max_delay: Duration::from_millis(50),
                        },
                    },
                    ..JenkinsOptions::default()
                },
            ),
            ConsumerSettings {
                poll_interval: Duration::from_millis(50),
                registration_backoff: Duration::from_millis(100),
                ..ConsumerSettings::default()
            },
        );
        let stop = shutdown.clone();
        let rx2 = rx.clone();
        let l = tokio::spawn(async move {
            launcher.run(rx, stop).await.expect("launcher runs");
        });
        let stop = shutdown.clone();
        let c = tokio::spawn(async move {
            // Keep the config sender alive as long as the runtime.
            let _keep = _tx;
            runtime.run(rx2, stop).await;
        });
        System {
            store: Store::new(Arc::new(mem.new_session())),
            shutdown,
            tasks: vec![l, c],
        }
    }

    async fn stop(self) {
        self.shutdown.cancel();
        for t in self.tasks {
            t.await.expect("task");
        }
    }

    async fn node(&self, id: &str) -> Option<Node> {
        self.store.get_node(id).await.expect("get").map(|v| v.value)
    }
}

/// Polls `f` until true, for at most 20 s of real time.
async fn until<F: FnMut() -> Fut, Fut: Future<Output = bool>>(what: &str, mut f: F) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !f().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: not within 20 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Agent names in the fake whose node is ready and allocated to the target.
async fn ready_agents(sys: &System, j: &FakeJenkins) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for name in j.agents().keys() {
        let id = name.rsplit('-').next().expect("node id").to_owned();
        if let Some(n) = sys.node(&id).await
            && n.state == NodeState::Ready
            && n.allocated_to.as_deref() == Some("jenkins:ci")
        {
            out.push((name.clone(), id));
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_are_single_use_and_failed_jobs_are_held() {
    let j = FakeJenkins::start().await;
    let mem = MemoryStore::new();
    let sys = System::start(&mem, &yaml(&j.url));

    // min-ready nodes appear as agents.
    until("two agents", || async {
        ready_agents(&sys, &j).await.len() == 2
    })
    .await;
    let agents = ready_agents(&sys, &j).await;
    for (name, id) in &agents {
        assert_eq!(name, &format!("small-sim-{id}"));
        let a = j.agent(name).expect("agent");
        assert_eq!(a.label(), "small");
        let node = sys.node(id).await.expect("node");
        assert_eq!(Some(a.host()), node.interface_ip.as_deref());
        assert_eq!(a.config["launcher"]["credentialsId"], "jenkins-ssh");
    }

    // A job takes one offline (NODE_OFFLINE_WHEN_COMPLETE): its node is
    // deleted, its agent removed, and a new node replaces it.
    let (name, id) = agents[0].clone();
    j.start_job(&name, "tox-py3");
    // While it runs, a replacement is launched already (the node is busy).
    until("replacement while busy", || async {
        ready_agents(&sys, &j).await.len() == 3
    })
    .await;
    j.finish_job(&name, "SUCCESS", true);
    until("used node deleted", || async {
        sys.node(&id).await.is_none()
    })
    .await;
    until("agent removed", || async { j.agent(&name).is_none() }).await;
    until("two idle agents again", || async {
        let now = ready_agents(&sys, &j).await;
        now.len() == 2 && now.iter().all(|(_, i)| *i != id)
    })
    .await;

    // A failed job with a hold rule leaves its node held; a second failure
    // beyond the rule's count is deleted.
    sys.store
        .set_job_hold(&JobHold {
            job: "flaky".into(),
            hold_on_failure: 1,
            created_time: None,
        })
        .await
        .expect("rule");
    let agents = ready_agents(&sys, &j).await;
    let (held_name, held_id) = agents[0].clone();
    let (extra_name, extra_id) = agents[1].clone();
    let n = j.run_job(&held_name, "flaky", "FAILURE");
    until("node held", || async {
        sys.node(&held_id)
            .await
            .is_some_and(|n| n.state == NodeState::Hold)
    })
    .await;
    let held = sys.node(&held_id).await.expect("held node");
    assert_eq!(held.hold_job.as_deref(), Some("flaky"));
    assert_eq!(
        held.comment.as_deref(),
        Some(format!("Automatically held after failing flaky (build #{n})").as_str())
    );
    until("held node's agent removed", || async {
        j.agent(&held_name).is_none()
    })
    .await;
    j.run_job(&extra_name, "flaky", "FAILURE");
    until("over-rule node deleted", || async {
        sys.node(&extra_id).await.is_none()
    })
    .await;
    until("pool topped up", || async {
        ready_agents(&sys, &j).await.len() == 2
    })
    .await;
    assert_eq!(
        sys.node(&held_id).await.map(|n| n.state),
        Some(NodeState::Hold),
        "still held"
    );
    sys.stop().await;
}
