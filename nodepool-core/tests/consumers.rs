//! The consumer runtime beside the launcher, on the in-memory store and the
//! simulated cloud, on tokio's paused clock. The consumer here is a small
//! in-process implementation of `NodeConsumer` whose finished nodes the
//! test decides (the Jenkins one is tested end to end in nodepool-jenkins).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use nodepool_core::config::{Config, Target};
use nodepool_core::consumer::{ConsumerError, FinishedNode, NodeConsumer, NodeOutcome};
use nodepool_core::consumers::{
    ConsumerFactory, ConsumerRuntime, ConsumerSettings, JobHold, allocation_id,
};
use nodepool_core::launcher::{Launcher, LauncherSettings};
use nodepool_core::model::{Node, NodeState};
use nodepool_core::provider::Provider;
use nodepool_core::runtime::{Clock, PassCounter, ProviderFactory};
use nodepool_core::store::{LockWait, Store};
use nodepool_model::store::MemoryStore;
use nodepool_simulated::SimulatedProvider;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

const CONFIG: &str = r#"
labels:
  - name: small
  - name: large
providers:
  - name: sim
    driver: simulated
    simulation:
      boot-delay: 2
      flavors:
        - {name: s, vcpus: 2, ram: 2048}
    cloud-images: [{name: img}]
    pools:
      - name: main
        max-servers: 10
        labels:
          - {name: small, cloud-image: img, flavor-name: s}
          - {name: large, cloud-image: img, flavor-name: s}
targets:
  - name: ci
    jenkins:
      url: https://jenkins.example/
      user: nodepool
      api-token: not-used-here
    labels:
      - name: small
        min-ready: 2
"#;

/// A consumer whose finished nodes the test chooses.
#[derive(Debug, Default)]
struct TestConsumer {
    name: String,
    wants: Vec<(String, u32)>,
    st: Mutex<TestState>,
}

#[derive(Debug, Default)]
struct TestState {
    /// Nodes node_ready accepted.
    ready: BTreeSet<String>,
    /// Every node_ready call, in order.
    ready_calls: Vec<String>,
    /// Every node_gone call.
    gone: Vec<String>,
    /// What finished_nodes reports next.
    finished: Vec<FinishedNode>,
    busy: Vec<String>,
    /// node_ready fails with this.
    fail_ready: Option<ConsumerError>,
    /// Every reconcile call's live nodes.
    reconciled: Vec<Vec<String>>,
}

impl TestConsumer {
    fn st(&self) -> std::sync::MutexGuard<'_, TestState> {
        self.st.lock().expect("state")
    }

    fn finish(&self, node: &str, outcome: NodeOutcome) {
        self.st().finished.push(FinishedNode {
            node_id: node.to_owned(),
            outcome,
        });
    }

    fn ready(&self) -> Vec<String> {
        self.st().ready.iter().cloned().collect()
    }

    fn gone(&self) -> Vec<String> {
        self.st().gone.clone()
    }
}

#[async_trait]
impl NodeConsumer for TestConsumer {
    fn name(&self) -> &str {
        &self.name
    }

    fn wants(&self) -> Vec<(String, u32)> {
        self.wants.clone()
    }

    async fn node_ready(&self, node_id: &str, node: &Node) -> Result<(), ConsumerError> {
        let mut st = self.st();
        st.ready_calls.push(node_id.to_owned());
        assert_eq!(node.state, NodeState::Ready);
        assert_eq!(
            node.allocated_to.as_deref(),
            Some(allocation_id(&self.name).as_str())
        );
        if let Some(e) = &st.fail_ready {
            return Err(e.clone());
        }
        st.ready.insert(node_id.to_owned());
        Ok(())
    }

    async fn finished_nodes(&self) -> Result<Vec<FinishedNode>, ConsumerError> {
        Ok(std::mem::take(&mut self.st().finished))
    }

    async fn node_gone(&self, node_id: &str) -> Result<(), ConsumerError> {
        let mut st = self.st();
        st.ready.remove(node_id);
        st.gone.push(node_id.to_owned());
        Ok(())
    }

    fn busy_nodes(&self) -> Vec<String> {
        self.st().busy.clone()
    }

    async fn reconcile(&self, live: &[String]) -> Result<(), ConsumerError> {
        self.st().reconciled.push(live.to_vec());
        Ok(())
    }
}

/// Consumers made by the factory, by target name (the latest one).
type Made = Arc<Mutex<BTreeMap<String, Arc<TestConsumer>>>>;

struct Running {
    shutdown: CancellationToken,
    config: watch::Sender<Arc<Config>>,
    launcher: tokio::task::JoinHandle<()>,
    consumers: Vec<(
        CancellationToken,
        tokio::task::JoinHandle<()>,
        Made,
        PassCounter,
    )>,
}

fn config(yaml: &str) -> Arc<Config> {
    Arc::new(Config::from_yaml(yaml).expect("valid config"))
}

fn consumer_factory(made: Made) -> ConsumerFactory {
    Arc::new(move |t: &Target| {
        let c = Arc::new(TestConsumer {
            name: t.name.clone(),
            wants: t
                .labels
                .iter()
                .map(|l| (l.name.clone(), l.min_ready))
                .collect(),
            st: Mutex::default(),
        });
        made.lock().expect("made").insert(t.name.clone(), c.clone());
        Ok(c as Arc<dyn NodeConsumer>)
    })
}

fn settings() -> ConsumerSettings {
    ConsumerSettings {
        poll_interval: Duration::from_secs(1),
        registration_backoff: Duration::from_secs(2),
        clock: Clock::tokio(),
        ..ConsumerSettings::default()
    }
}

impl Running {
    fn start(mem: &MemoryStore, yaml: &str) -> Running {
        let cfg = config(yaml);
        let (tx, rx) = watch::channel(cfg);
        let shutdown = CancellationToken::new();
        let factory: ProviderFactory = Arc::new(|pc| {
            Ok(
                Arc::new(SimulatedProvider::new(pc).map_err(|e| e.to_string())?)
                    as Arc<dyn Provider>,
            )
        });
        let launcher = Launcher::new(
            Store::new(Arc::new(mem.new_session())),
            factory,
            LauncherSettings {
                hostname: "l1".into(),
                clock: Clock::tokio(),
                ..LauncherSettings::default()
            },
        );
        let stop = shutdown.clone();
        let launcher = tokio::spawn(async move {
            launcher.run(rx, stop).await.expect("launcher runs");
        });
        let mut r = Running {
            shutdown,
            config: tx,
            launcher,
            consumers: Vec::new(),
        };
        r.add_runtime(mem);
        r
    }

    /// Starts one more consumer runtime on its own session; returns its index.
    fn add_runtime(&mut self, mem: &MemoryStore) -> usize {
        let made: Made = Arc::default();
        let rt = ConsumerRuntime::new(
            Store::new(Arc::new(mem.new_session())),
            consumer_factory(made.clone()),
            settings(),
        );
        let passes = rt.passes();
        let stop = CancellationToken::new();
        let s = stop.clone();
        let rx = self.config.subscribe();
        let task = tokio::spawn(async move { rt.run(rx, s).await });
        self.consumers.push((stop, task, made, passes));
        self.consumers.len() - 1
    }

    /// The consumer of target `ci` made by runtime `i`.
    fn consumer(&self, i: usize) -> Option<Arc<TestConsumer>> {
        self.consumers[i].2.lock().expect("made").get("ci").cloned()
    }

    /// Waits for `n` more passes of runtime `i`.
    async fn passes(&self, i: usize, n: u64) {
        self.consumers[i].3.more(n).await.expect("the runtime runs");
    }

    async fn stop_runtime(&mut self, i: usize) {
        let (stop, task, _, _) = &mut self.consumers[i];
        stop.cancel();
        task.await.expect("runtime task");
    }

    async fn stop(mut self) {
        for i in 0..self.consumers.len() {
            if !self.consumers[i].0.is_cancelled() {
                self.stop_runtime(i).await;
            }
        }
        self.shutdown.cancel();
        self.launcher.await.expect("launcher task");
    }
}

/// Polls `f` on the paused clock until true (bounded in virtual time).
async fn until<F: FnMut() -> Fut, Fut: std::future::Future<Output = bool>>(what: &str, mut f: F) {
    for _ in 0..600 {
        if f().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    panic!("{what}: not reached within 300 s of virtual time");
}

fn store(mem: &MemoryStore) -> Store {
    Store::new(Arc::new(mem.new_session()))
}

async fn nodes(store: &Store) -> Vec<(String, Node)> {
    store
        .list_nodes()
        .await
        .expect("list")
        .records
        .into_iter()
        .map(|r| (r.id, (*r.node).clone()))
        .collect()
}

async fn targets_nodes(store: &Store) -> Vec<(String, Node)> {
    nodes(store)
        .await
        .into_iter()
        .filter(|(_, n)| n.allocated_to.as_deref() == Some("jenkins:ci"))
        .collect()
}

async fn state_of(store: &Store, id: &str) -> Option<NodeState> {
    store
        .get_node(id)
        .await
        .expect("get")
        .map(|v| v.value.state)
}

/// Waits until the target has `n` registered nodes; returns the consumer.
async fn registered(r: &Running, i: usize, n: usize) -> Arc<TestConsumer> {
    until(&format!("{n} nodes registered"), || async {
        r.consumer(i).is_some_and(|c| c.ready().len() == n)
    })
    .await;
    r.consumer(i).expect("consumer")
}

#[tokio::test(start_paused = true)]
async fn min_ready_nodes_are_given_to_the_target_and_kept() {
    let mem = MemoryStore::new();
    let s = store(&mem);
    let r = Running::start(&mem, CONFIG);
    let c = registered(&r, 0, 2).await;
    let ours = targets_nodes(&s).await;
    assert_eq!(ours.len(), 2);
    for (id, n) in &ours {
        assert_eq!(n.state, NodeState::Ready, "{id}");
        assert_eq!(n.node_type, ["small"]);
        assert!(!s.is_node_locked(id).await.expect("locked?"), "{id}");
    }
    assert!(
        s.list_requests()
            .await
            .expect("requests")
            .records
            .is_empty(),
        "requests were accepted and deleted"
    );
    // A long while later: the launcher has neither deallocated nor deleted
    // them, and no more were asked for.
    tokio::time::sleep(Duration::from_secs(600)).await;
    let later = targets_nodes(&s).await;
    assert_eq!(
        later.iter().map(|(id, _)| id).collect::<Vec<_>>(),
        ours.iter().map(|(id, _)| id).collect::<Vec<_>>()
    );
    assert_eq!(nodes(&s).await.len(), 2, "no overshoot");
    assert_eq!(c.st().ready_calls.len(), 2, "registered once each");
    r.stop().await;
}

#[tokio::test(start_paused = true)]
async fn used_nodes_are_deleted_and_replaced() {
    let mem = MemoryStore::new();
    let s = store(&mem);
    let r = Running::start(&mem, CONFIG);
    let c = registered(&r, 0, 2).await;
    let first = c.ready()[0].clone();
    c.finish(&first, NodeOutcome::Used);
    until("node deleted", || async {
        state_of(&s, &first).await.is_none()
    })
    .await;
    assert!(c.gone().contains(&first), "agent removed");
    until("replaced", || async {
        c.ready().len() == 2 && !c.ready().contains(&first)
    })
    .await;
    r.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_busy_node_is_replaced_while_its_job_runs() {
    let mem = MemoryStore::new();
    let s = store(&mem);
    let r = Running::start(&mem, CONFIG);
    let c = registered(&r, 0, 2).await;
    let busy = c.ready()[0].clone();
    c.st().busy = vec![busy.clone()];
    let c2 = registered(&r, 0, 3).await;
    assert!(Arc::ptr_eq(&c, &c2));
    assert_eq!(targets_nodes(&s).await.len(), 3);
    r.stop().await;
}

#[tokio::test(start_paused = true)]
async fn failed_jobs_are_held_within_their_rule() {
    let mem = MemoryStore::new();
    let s = store(&mem);
    s.set_job_hold(&JobHold {
        job: "flaky".into(),
        hold_on_failure: 1,
        created_time: None,
    })
    .await
    .expect("rule");
    let yaml = CONFIG.replace("min-ready: 2", "min-ready: 4");
    let r = Running::start(&mem, &yaml);
    let c = registered(&r, 0, 4).await;
    let ids = c.ready();
    let hold = |job: Option<&str>| NodeOutcome::Hold {
        comment: format!("Automatically held after failing {job:?}"),
        job: job.map(str::to_owned),
    };
    c.finish(&ids[0], hold(Some("flaky")));
    c.finish(&ids[1], hold(Some("flaky")));
    c.finish(&ids[2], hold(Some("no-rule")));
    c.finish(&ids[3], hold(None));
    until("outcomes written", || async {
        let mut done = 0;
        for id in &ids {
            if !matches!(state_of(&s, id).await, Some(NodeState::Ready)) {
                done += 1;
            }
        }
        done == 4
    })
    .await;
    let held = s.get_node(&ids[0]).await.expect("get").expect("kept").value;
    assert_eq!(held.state, NodeState::Hold);
    assert_eq!(held.hold_job.as_deref(), Some("flaky"));
    assert!(held.comment.as_deref().is_some_and(|c| c.contains("flaky")));
    assert_ne!(
        state_of(&s, &ids[1]).await,
        Some(NodeState::Hold),
        "the rule allows one"
    );
    assert_ne!(
        state_of(&s, &ids[2]).await,
        Some(NodeState::Hold),
        "no rule"
    );
    assert_eq!(state_of(&s, &ids[3]).await, Some(NodeState::Hold));
    until("rule-less and over-rule nodes deleted", || async {
        state_of(&s, &ids[1]).await.is_none() && state_of(&s, &ids[2]).await.is_none()
    })
    .await;
    // Held nodes stay (no max-hold-age), and the pool is topped up.
    tokio::time::sleep(Duration::from_secs(60)).await;
    assert_eq!(state_of(&s, &ids[0]).await, Some(NodeState::Hold));
    registered(&r, 0, 4).await;
    r.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_node_that_cannot_be_registered_is_given_up() {
    let mem = MemoryStore::new();
    let s = store(&mem);
    let yaml = CONFIG.replace("min-ready: 2", "min-ready: 1");
    let r = Running::start(&mem, &yaml);
    until("consumer made", || async { r.consumer(0).is_some() }).await;
    let c = r.consumer(0).expect("consumer");
    c.st().fail_ready = Some(ConsumerError::Other("bad node".into()));
    until("a node given up", || async { !c.gone().is_empty() }).await;
    let given_up = c.gone()[0].clone();
    let calls = c
        .st()
        .ready_calls
        .iter()
        .filter(|id| **id == given_up)
        .count();
    assert_eq!(calls, 3, "registration_attempts");
    until("given-up node deleted", || async {
        state_of(&s, &given_up).await.is_none()
    })
    .await;
    // Once registration works again, the replacement is registered.
    c.st().fail_ready = None;
    registered(&r, 0, 1).await;
    r.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_jenkins_outage_does_not_churn_nodes() {
    let mem = MemoryStore::new();
    let s = store(&mem);
    let r = Running::start(&mem, CONFIG);
    until("consumer made", || async { r.consumer(0).is_some() }).await;
    let c = r.consumer(0).expect("consumer");
    c.st().fail_ready = Some(ConsumerError::Transient("jenkins is down".into()));
    until("two nodes allocated", || async {
        targets_nodes(&s).await.len() == 2
    })
    .await;
    tokio::time::sleep(Duration::from_secs(900)).await;
    assert!(c.gone().is_empty(), "no node given up");
    assert_eq!(nodes(&s).await.len(), 2, "no churn");
    let calls = c.st().ready_calls.len();
    assert!(
        (4..60).contains(&calls),
        "retried with a growing backoff: {calls} calls"
    );
    c.st().fail_ready = None;
    registered(&r, 0, 2).await;
    r.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_node_deleted_by_an_operator_loses_its_agent() {
    let mem = MemoryStore::new();
    let s = store(&mem);
    let r = Running::start(&mem, CONFIG);
    let c = registered(&r, 0, 2).await;
    let victim = c.ready()[0].clone();
    // `nodepool delete`: the node goes to `deleting` under its lock.
    let lock = s
        .lock_node(&victim, LockWait::NonBlocking)
        .await
        .expect("lock");
    let mut n = s.get_node(&victim).await.expect("get").expect("exists");
    n.value.set_state(NodeState::Deleting, 0.0);
    s.store_node(&victim, &n.value).await.expect("store");
    lock.release().await.expect("unlock");
    until("agent removed", || async { c.gone().contains(&victim) }).await;
    until("replaced", || async {
        c.ready().len() == 2 && !c.ready().contains(&victim)
    })
    .await;
    r.stop().await;
}

#[tokio::test(start_paused = true)]
async fn one_runtime_serves_a_target_and_another_takes_over() {
    let mem = MemoryStore::new();
    let s = store(&mem);
    let mut r = Running::start(&mem, CONFIG);
    let first = registered(&r, 0, 2).await;
    r.add_runtime(&mem);
    r.passes(1, 10).await;
    let standby = r.consumer(1).expect("the standby has a consumer too");
    assert!(standby.st().ready_calls.is_empty(), "the standby waits");
    assert_eq!(nodes(&s).await.len(), 2);
    let ids = first.ready();
    r.stop_runtime(0).await;
    // The standby adopts the same nodes: no new ones, no node given up.
    let adopted = registered(&r, 1, 2).await;
    assert_eq!(adopted.ready(), ids);
    assert_eq!(
        first.st().reconciled,
        [Vec::<String>::new()],
        "once, at the start"
    );
    assert_eq!(
        adopted.st().reconciled,
        std::slice::from_ref(&ids),
        "the new server reconciles with the nodes it found"
    );
    assert_eq!(nodes(&s).await.len(), 2);
    assert!(first.gone().is_empty() && adopted.gone().is_empty());
    r.stop().await;
}

#[tokio::test(start_paused = true)]
async fn removing_a_target_gives_its_nodes_up() {
    let mem = MemoryStore::new();
    let s = store(&mem);
    let r = Running::start(&mem, CONFIG);
    let c = registered(&r, 0, 2).await;
    let ids = c.ready();
    let without = CONFIG
        .split("targets:")
        .next()
        .expect("config head")
        .to_owned();
    r.config.send(config(&without)).expect("reload");
    until("agents removed", || async { c.gone().len() == 2 }).await;
    until("nodes deleted", || async {
        let mut left = 0;
        for id in &ids {
            if state_of(&s, id).await.is_some() {
                left += 1;
            }
        }
        left == 0
    })
    .await;
    assert!(targets_nodes(&s).await.is_empty());
    r.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_label_nobody_serves_is_asked_for_with_a_backoff() {
    let mem = MemoryStore::new();
    let s = store(&mem);
    // `orphan` is a label, but no pool offers it: every request fails.
    let yaml = CONFIG
        .replace("  - name: large\n", "  - name: large\n  - name: orphan\n")
        .replace(
            "      - name: small\n        min-ready: 2",
            "      - name: orphan\n        min-ready: 1",
        );
    let r = Running::start(&mem, &yaml);
    let seen = Arc::new(Mutex::new(BTreeSet::new()));
    // Watch the requests the target makes for 300 s (virtual).
    for _ in 0..600 {
        for rec in s.list_requests().await.expect("requests").records {
            if rec.request.requestor.as_deref() == Some("jenkins:ci") {
                seen.lock().expect("seen").insert(rec.id.clone());
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let n = seen.lock().expect("seen").len();
    // One at the start, then one a minute (failed_request_backoff).
    assert!((2..=7).contains(&n), "{n} requests in 300 s");
    assert!(nodes(&s).await.is_empty());
    r.stop().await;
}
