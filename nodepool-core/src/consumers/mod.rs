//! The consumer runtime: hands nodes to [`NodeConsumer`]s (Jenkins targets)
//! and takes them back when their job is done. Embeddable; the launcher
//! daemon runs it beside the [launcher](crate::launcher) on the same store.
//!
//! # How a target gets its nodes
//!
//! The runtime is a requestor like Zuul ([`nodepool_requestor`]), with the
//! requestor id `jenkins:<target>`: for each label the target wants, it
//! keeps `min-ready` idle nodes by submitting one-node requests (a label
//! whose request failed, as no launcher serves it, is asked for again only
//! after `failed_request_backoff`). A
//! fulfilled request is accepted (nodes locked, request deleted) and each
//! node is **re-allocated to the target**: `allocated_to =
//! "jenkins:<target>"`, state left `ready`, lock released. Then the
//! consumer's [`node_ready`](NodeConsumer::node_ready) registers it (a
//! Jenkins agent).
//!
//! # Why `ready` + `allocated_to`, and no lock
//!
//! The launcher deletes an *unlocked* `in-use` node, so `in-use` would
//! need the node's lock for the agent's whole life — and locks die with
//! the session, so a restart of the launcher process would delete every
//! node with a job running on it. A `ready` node whose `allocated_to` is
//! not a request id is never touched by the launcher's cleanup (it only
//! deallocates nodes of vanished *requests*), is not a spare for other
//! requests (those take only unallocated nodes) and survives restarts: the
//! next runtime finds its nodes by `allocated_to` and calls `node_ready`
//! again, which the consumer must treat as "adopt". Jenkins, not the store,
//! knows whether an agent is busy; [`NodeConsumer::busy_nodes`] tells the
//! runtime for `min-ready`.
//!
//! # How nodes come back
//!
//! Every pass polls [`finished_nodes`](NodeConsumer::finished_nodes): a
//! node whose job is done becomes `used` (the launcher deletes it), or
//! `hold` when a [job hold rule](crate::store::holds) for its failed job still has room;
//! then [`node_gone`](NodeConsumer::node_gone) removes the agent. Nodes
//! that leave `ready` or vanish under the consumer (an operator's `nodepool
//! delete`, a cloud failure) are `node_gone` too. When a runtime starts
//! serving a target it calls [`reconcile`](NodeConsumer::reconcile) once
//! with the target's nodes, so agents of nodes that went while nobody
//! served the target are removed. Registration failures particular to a
//! node are retried with backoff, then the node is given up
//! (`used`); failures of the whole target (Jenkins unreachable, token
//! refused) are retried without giving nodes up, so a Jenkins outage does
//! not churn the pool.
//!
//! # Several launchers
//!
//! Each target is served by one runtime at a time: the one holding the
//! lock `/nodepool/elections/consumers/<target>` (kazoo's recipe, tied to
//! the session, so another launcher takes over when one dies).
//!
//! # Layout
//!
//! Like the launcher and the builder, each pass of a target is a pure plan
//! ([`plan`]: [`plan_target`] from a [`TargetSnapshot`] and the runtime's
//! [`TargetMemory`]) executed by `execute`, run by the shared
//! [pass loop](crate::runtime); [`ConsumerRuntime::passes`] counts the
//! passes.

mod execute;
pub mod plan;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, Target};
use crate::consumer::NodeConsumer;
use crate::model::Node;
use crate::runtime::{Clock, PassCounter, PassRunner, Passed, Wakeups, run_passes};
use crate::store::{LockGuard, LockWait, Store, StoreError, paths};

pub use crate::store::holds::{JobHold, encode_job, held_for};
pub use plan::{
    Failures, NodeEnd, TargetAction, TargetMemory, TargetSnapshot, plan_give_up, plan_target,
};

/// What `allocated_to` of a consumer's nodes starts with (the targets of
/// `nodepool.yaml` are Jenkins masters); also the requestor id prefix.
pub const ALLOCATION_PREFIX: &str = "jenkins:";

/// The `allocated_to` and requestor id of a target: `jenkins:<target>`.
pub fn allocation_id(target: &str) -> String {
    format!("{ALLOCATION_PREFIX}{target}")
}

pub use crate::consumer::ConsumerFactory;

/// Tunables of the runtime. `Default` gives production values.
#[derive(Clone, Debug)]
pub struct ConsumerSettings {
    /// Time between passes (each polls every consumer once).
    pub poll_interval: Duration,
    /// Registration attempts per node before it is given up (`used`), for
    /// failures particular to the node.
    pub registration_attempts: u32,
    /// Wait after a failed registration; doubled after each further one.
    pub registration_backoff: Duration,
    /// Longest wait between two registration attempts.
    pub max_registration_backoff: Duration,
    /// How long to wait for a node's lock when writing its outcome.
    pub node_lock_timeout: Duration,
    /// After a request of a label failed (no launcher can serve it), no
    /// new request for that label for this long.
    pub failed_request_backoff: Duration,
    /// Where `state_time` comes from (the launcher's clock in tests).
    pub clock: Clock,
}

impl Default for ConsumerSettings {
    fn default() -> Self {
        ConsumerSettings {
            poll_interval: Duration::from_secs(5),
            registration_attempts: 3,
            registration_backoff: Duration::from_secs(10),
            max_registration_backoff: Duration::from_secs(300),
            node_lock_timeout: Duration::from_secs(10),
            failed_request_backoff: Duration::from_secs(60),
            clock: Clock::System,
        }
    }
}

/// The runtime. See the module documentation.
pub struct ConsumerRuntime {
    store: Store,
    factory: ConsumerFactory,
    settings: ConsumerSettings,
    passes: PassCounter,
}

impl std::fmt::Debug for ConsumerRuntime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConsumerRuntime")
            .field("store", &self.store)
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl ConsumerRuntime {
    /// A runtime on a store, building consumers with `factory`.
    pub fn new(store: Store, factory: ConsumerFactory, settings: ConsumerSettings) -> Self {
        ConsumerRuntime {
            store,
            factory,
            settings,
            passes: PassCounter::default(),
        }
    }

    /// The runtime's completed passes (one pass serves every target once,
    /// or finds it served by another runtime); readable while it runs.
    pub fn passes(&self) -> PassCounter {
        self.passes.clone()
    }

    /// Serves the configuration's `targets` until `shutdown` is cancelled.
    /// A new value on `config` is a reload: changed targets get a new
    /// consumer (which adopts the nodes), removed ones give their nodes up.
    /// Store and consumer failures are logged and retried on the next pass;
    /// nothing stops the runtime but `shutdown`.
    pub async fn run(self, mut config: watch::Receiver<Arc<Config>>, shutdown: CancellationToken) {
        let mut runner = Runner {
            ctx: Ctx {
                store: self.store,
                settings: self.settings,
            },
            factory: self.factory,
            served: BTreeMap::new(),
        };
        let cfg = config.borrow_and_update().clone();
        runner.apply_config(&cfg).await;
        // Consumers are polled: store changes do not start a pass.
        let wakeups = Wakeups {
            max_interval: runner.ctx.settings.poll_interval,
            min_interval: Duration::ZERO,
            store: None,
            relevant: Wakeups::any_path,
            wake: None,
        };
        let Ok(()) = run_passes(&mut runner, wakeups, &mut config, &shutdown, &self.passes).await;
        // Nodes and agents stay as they are: the next runtime adopts them.
        for (_, s) in runner.served {
            s.resign().await;
        }
    }
}

/// What every target's pass needs.
struct Ctx {
    store: Store,
    settings: ConsumerSettings,
}

/// The runtime as the pass loop sees it.
struct Runner {
    ctx: Ctx,
    factory: ConsumerFactory,
    served: BTreeMap<String, Served>,
}

impl PassRunner for Runner {
    type Fatal = std::convert::Infallible;

    async fn pass(&mut self) -> Result<Passed, Self::Fatal> {
        for s in self.served.values_mut() {
            if !s.ensure_elected(&self.ctx.store).await {
                continue;
            }
            if let Err(e) = s.pass(&self.ctx).await {
                tracing::warn!(target_name = %s.target.name, error = %e, "consumer pass failed; retrying");
            }
        }
        Ok(Passed::Completed)
    }

    async fn reload(&mut self, config: Arc<Config>) {
        self.apply_config(&config).await;
    }
}

impl Runner {
    /// Brings the served targets in line with a configuration.
    async fn apply_config(&mut self, cfg: &Config) {
        let wanted: BTreeSet<&str> = cfg.targets.iter().map(|t| t.name.as_str()).collect();
        let removed: Vec<String> = self
            .served
            .keys()
            .filter(|k| !wanted.contains(k.as_str()))
            .cloned()
            .collect();
        for name in removed {
            if let Some(mut s) = self.served.remove(&name) {
                tracing::info!(target_name = %name, "target removed from the configuration; giving its nodes up");
                s.give_all_up(&self.ctx).await;
                s.resign().await;
            }
        }
        for t in &cfg.targets {
            if self.served.get(&t.name).is_some_and(|s| s.target == *t) {
                continue;
            }
            let consumer = match (self.factory)(t) {
                Ok(c) => c,
                Err(e) => {
                    tracing::error!(target_name = %t.name, error = %e, "cannot set up the target's consumer");
                    continue;
                }
            };
            match self.served.get_mut(&t.name) {
                Some(s) => {
                    tracing::info!(target_name = %t.name, "target changed; its consumer adopts its nodes again");
                    s.target = t.clone();
                    s.consumer = consumer;
                    // The new consumer knows no agent: node_ready adopts them.
                    s.memory.registered.clear();
                    s.memory.failures.clear();
                    s.memory.reconciled = false;
                }
                None => {
                    self.served
                        .insert(t.name.clone(), Served::new(t.clone(), consumer));
                }
            }
        }
    }
}

/// One target being served.
struct Served {
    target: Target,
    consumer: Arc<dyn NodeConsumer>,
    /// `jenkins:<target>`.
    id: String,
    election: Option<LockGuard>,
    memory: TargetMemory,
    /// Whether "another runtime serves it" was logged.
    told_not_elected: bool,
}

impl Served {
    fn new(target: Target, consumer: Arc<dyn NodeConsumer>) -> Self {
        Served {
            id: allocation_id(&target.name),
            target,
            consumer,
            election: None,
            memory: TargetMemory::default(),
            told_not_elected: false,
        }
    }

    /// Whether this runtime serves the target: takes its lock if free,
    /// notices when a lost session took it away.
    async fn ensure_elected(&mut self, store: &Store) -> bool {
        if let Some(g) = &self.election {
            // Suspended is not lost: the lock comes back with the session.
            if !g.is_lost() {
                return true;
            }
            tracing::warn!(target_name = %self.target.name, "lost the target's lock (session); taking it again");
            self.election = None;
            // Whoever serves it next adopts the nodes; forget ours.
            self.memory.registered.clear();
            self.memory.failures.clear();
        }
        match store
            .lock(
                &paths::consumer_election(&self.target.name),
                LockWait::NonBlocking,
            )
            .await
        {
            Ok(g) => {
                tracing::info!(target_name = %self.target.name, "serving target");
                self.election = Some(g);
                self.told_not_elected = false;
                self.memory.reconciled = false;
                true
            }
            Err(StoreError::Locked { .. }) => {
                if !self.told_not_elected {
                    tracing::info!(target_name = %self.target.name, "another launcher serves this target");
                    self.told_not_elected = true;
                }
                false
            }
            Err(e) => {
                tracing::warn!(target_name = %self.target.name, error = %e, "cannot take the target's lock");
                false
            }
        }
    }

    async fn resign(self) {
        if let Some(g) = self.election
            && let Err(e) = g.release().await
        {
            tracing::warn!(target_name = %self.target.name, error = %e, "cannot release the target's lock");
        }
    }

    /// The target was removed: its nodes become `used` and its agents go.
    async fn give_all_up(&mut self, ctx: &Ctx) {
        let Some(g) = &self.election else {
            return;
        };
        if !g.wait_held().await {
            return;
        }
        let nodes = match ctx.store.list_nodes().await {
            Ok(l) => l.records,
            Err(e) => {
                tracing::warn!(target_name = %self.target.name, error = %e, "cannot list the target's nodes");
                return;
            }
        };
        let snapshot = TargetSnapshot {
            id: self.id.clone(),
            nodes,
            ..TargetSnapshot::default()
        };
        let actions = plan_give_up(&snapshot, &self.memory);
        self.execute(ctx, &snapshot, actions).await;
    }
}

/// Whether a node is allocated to a consumer target rather than a request.
pub fn is_consumer_allocation(node: &Node) -> bool {
    node.allocated_to
        .as_deref()
        .is_some_and(|a| a.starts_with(ALLOCATION_PREFIX))
}
