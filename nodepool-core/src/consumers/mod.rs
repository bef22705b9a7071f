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

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use nodepool_requestor::{NewRequest, Requestor};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, Target};
use crate::consumer::{ConsumerError, NodeConsumer, NodeOutcome};
use crate::launcher::Clock;
use crate::model::{Node, NodeState, RequestState};
use crate::store::{LockGuard, LockWait, NodeRecord, Store, StoreError, paths};

pub use crate::store::holds::{JobHold, encode_job, held_for};

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
        }
    }

    /// Serves the configuration's `targets` until `shutdown` is cancelled.
    /// A new value on `config` is a reload: changed targets get a new
    /// consumer (which adopts the nodes), removed ones give their nodes up.
    /// Store and consumer failures are logged and retried on the next pass;
    /// nothing stops the runtime but `shutdown`.
    pub async fn run(self, mut config: watch::Receiver<Arc<Config>>, shutdown: CancellationToken) {
        let ctx = Ctx {
            store: self.store,
            settings: self.settings,
        };
        let mut served: BTreeMap<String, Served> = BTreeMap::new();
        let cfg = config.borrow_and_update().clone();
        apply_config(&ctx, &self.factory, &cfg, &mut served).await;
        loop {
            if shutdown.is_cancelled() {
                break;
            }
            for s in served.values_mut() {
                if !s.ensure_elected(&ctx.store).await {
                    continue;
                }
                if let Err(e) = s.pass(&ctx).await {
                    tracing::warn!(target_name = %s.target.name, error = %e, "consumer pass failed; retrying");
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => {}
                _ = tokio::time::sleep(ctx.settings.poll_interval) => {}
                r = config.changed() => {
                    if r.is_ok() {
                        let cfg = config.borrow_and_update().clone();
                        apply_config(&ctx, &self.factory, &cfg, &mut served).await;
                    }
                }
            }
        }
        // Nodes and agents stay as they are: the next runtime adopts them.
        for (_, s) in served {
            s.resign().await;
        }
    }
}

struct Ctx {
    store: Store,
    settings: ConsumerSettings,
}

/// Brings the served targets in line with a configuration.
async fn apply_config(
    ctx: &Ctx,
    factory: &ConsumerFactory,
    cfg: &Config,
    served: &mut BTreeMap<String, Served>,
) {
    let wanted: BTreeSet<&str> = cfg.targets.iter().map(|t| t.name.as_str()).collect();
    let removed: Vec<String> = served
        .keys()
        .filter(|k| !wanted.contains(k.as_str()))
        .cloned()
        .collect();
    for name in removed {
        if let Some(mut s) = served.remove(&name) {
            tracing::info!(target_name = %name, "target removed from the configuration; giving its nodes up");
            s.give_all_up(ctx).await;
            s.resign().await;
        }
    }
    for t in &cfg.targets {
        if served.get(&t.name).is_some_and(|s| s.target == *t) {
            continue;
        }
        let consumer = match factory(t) {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(target_name = %t.name, error = %e, "cannot set up the target's consumer");
                continue;
            }
        };
        match served.get_mut(&t.name) {
            Some(s) => {
                tracing::info!(target_name = %t.name, "target changed; its consumer adopts its nodes again");
                s.target = t.clone();
                s.consumer = consumer;
                // The new consumer knows no agent: node_ready adopts them.
                s.registered.clear();
                s.failures.clear();
                s.reconciled = false;
            }
            None => {
                served.insert(t.name.clone(), Served::new(t.clone(), consumer));
            }
        }
    }
}

/// Registration failures of one node.
#[derive(Clone, Copy, Debug)]
struct Failures {
    /// Failures that count towards giving the node up.
    counted: u32,
    /// Failures in a row, for the backoff.
    in_a_row: u32,
    /// No attempt before this.
    next_attempt: Instant,
}

/// One target being served.
struct Served {
    target: Target,
    consumer: Arc<dyn NodeConsumer>,
    id: String,
    election: Option<LockGuard>,
    /// Nodes `node_ready` accepted.
    registered: BTreeSet<String>,
    failures: BTreeMap<String, Failures>,
    /// Outcomes reported by the consumer and not yet written.
    outcomes: BTreeMap<String, NodeOutcome>,
    /// Nodes whose `node_gone` is still to be delivered.
    gone: BTreeSet<String>,
    /// Labels whose last request failed, and when to ask again.
    label_backoff: BTreeMap<String, Instant>,
    /// Whether `reconcile` ran since the target was taken or rebuilt.
    reconciled: bool,
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
            registered: BTreeSet::new(),
            failures: BTreeMap::new(),
            outcomes: BTreeMap::new(),
            gone: BTreeSet::new(),
            label_backoff: BTreeMap::new(),
            reconciled: false,
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
            self.registered.clear();
            self.failures.clear();
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
                self.reconciled = false;
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

    /// One pass: take fulfilled requests, register new nodes, collect
    /// finished ones, remove gone agents, top up min-ready.
    async fn pass(&mut self, ctx: &Ctx) -> Result<(), StoreError> {
        let requestor = Requestor::new(ctx.store.clone(), self.id.clone())
            .with_node_lock_timeout(ctx.settings.node_lock_timeout);

        // 1. Our requests: take fulfilled ones, drop failed ones, count the rest.
        let mut outstanding: BTreeMap<String, usize> = BTreeMap::new();
        for r in ctx.store.list_requests().await?.records {
            if r.request.requestor.as_deref() != Some(self.id.as_str()) {
                continue;
            }
            match r.request.state {
                RequestState::Fulfilled => self.take(ctx, &requestor, &r.id, &r.request).await,
                RequestState::Failed => {
                    tracing::warn!(target_name = %self.target.name, request = %r.id, labels = ?r.request.node_types, "node request failed (no launcher can serve it); withdrawing it");
                    let again = Instant::now() + ctx.settings.failed_request_backoff;
                    for l in &r.request.node_types {
                        self.label_backoff.insert(l.clone(), again);
                    }
                    if let Err(e) = requestor.cancel(&r.id).await {
                        tracing::warn!(request = %r.id, error = %e, "cannot withdraw the failed request");
                    }
                }
                _ => {
                    for l in &r.request.node_types {
                        *outstanding.entry(l.clone()).or_default() += 1;
                    }
                }
            }
        }

        // 2. Our nodes, as the store has them now.
        let listing = ctx.store.list_nodes().await?;
        let ours: BTreeMap<&str, &NodeRecord> = listing
            .records
            .iter()
            .filter(|r| {
                r.node.state == NodeState::Ready
                    && r.node.allocated_to.as_deref() == Some(self.id.as_str())
            })
            .map(|r| (r.id.as_str(), r))
            .collect();
        let known: BTreeSet<String> = self
            .registered
            .iter()
            .chain(self.failures.keys())
            .chain(self.outcomes.keys())
            .cloned()
            .collect();
        for id in known {
            if !ours.contains_key(id.as_str()) {
                tracing::info!(target_name = %self.target.name, node = %id, "node left the target (deleted or taken back)");
                self.registered.remove(&id);
                self.failures.remove(&id);
                self.outcomes.remove(&id);
                self.gone.insert(id);
            }
        }

        // Once per election or consumer: drop what belongs to nodes that
        // went while nobody served the target.
        if !self.reconciled {
            let live: Vec<String> = ours.keys().map(|id| (*id).to_owned()).collect();
            match self.consumer.reconcile(&live).await {
                Ok(()) => self.reconciled = true,
                Err(e) => {
                    tracing::warn!(target_name = %self.target.name, error = %e, "cannot reconcile the target with its nodes; retrying")
                }
            }
        }

        // 3. Register new nodes.
        let mut given_up: BTreeSet<String> = BTreeSet::new();
        for (id, rec) in &ours {
            if self.registered.contains(*id) {
                continue;
            }
            if self
                .failures
                .get(*id)
                .is_some_and(|f| Instant::now() < f.next_attempt)
            {
                continue;
            }
            match self.consumer.node_ready(id, &rec.node).await {
                Ok(()) => {
                    tracing::info!(target_name = %self.target.name, node = %id, "node handed to the target");
                    self.failures.remove(*id);
                    self.registered.insert((*id).to_owned());
                }
                Err(e) => {
                    if self.registration_failed(ctx, id, &e) {
                        given_up.insert((*id).to_owned());
                    }
                }
            }
        }
        for id in given_up {
            self.failures.remove(&id);
            self.outcomes.insert(id.clone(), NodeOutcome::Used);
            // A half-made agent may exist.
            self.gone.insert(id);
        }

        // 4. Finished nodes.
        match self.consumer.finished_nodes().await {
            Ok(finished) => {
                for f in finished {
                    self.outcomes.insert(f.node_id, f.outcome);
                }
            }
            Err(e) => {
                tracing::warn!(target_name = %self.target.name, error = %e, "cannot ask the target which nodes are done");
            }
        }

        // 5. Write outcomes.
        let mut held_now: BTreeMap<String, usize> = BTreeMap::new();
        let mut finished_now: BTreeSet<String> = BTreeSet::new();
        let outcomes = std::mem::take(&mut self.outcomes);
        for (id, outcome) in outcomes {
            if !ours.contains_key(id.as_str()) {
                continue;
            }
            match self
                .finish(ctx, &id, &outcome, &listing.records, &mut held_now)
                .await
            {
                Ok(()) => {
                    self.registered.remove(&id);
                    finished_now.insert(id.clone());
                    self.gone.insert(id);
                }
                Err(e) => {
                    tracing::warn!(target_name = %self.target.name, node = %id, error = %e, "cannot write the node's outcome; retrying");
                    self.outcomes.insert(id, outcome);
                }
            }
        }

        // 6. Remove agents of nodes that are gone.
        self.deliver_gone().await;

        // 7. min-ready: idle nodes and outstanding requests per label.
        let busy: BTreeSet<String> = self.consumer.busy_nodes().into_iter().collect();
        let now = Instant::now();
        self.label_backoff.retain(|_, until| *until > now);
        for (label, min_ready) in self.consumer.wants() {
            if self.label_backoff.contains_key(&label) {
                continue;
            }
            let idle = ours
                .iter()
                .filter(|(id, rec)| {
                    rec.node.node_type.contains(&label)
                        && !busy.contains(**id)
                        && !self.outcomes.contains_key(**id)
                        && !finished_now.contains(**id)
                })
                .count()
                + outstanding.get(&label).copied().unwrap_or(0);
            for _ in idle..min_ready as usize {
                match requestor
                    .submit(&NewRequest::new(vec![label.clone()]))
                    .await
                {
                    Ok(rid) => {
                        tracing::debug!(target_name = %self.target.name, %label, request = %rid, "requested a node")
                    }
                    Err(e) => {
                        tracing::warn!(target_name = %self.target.name, %label, error = %e, "cannot request a node");
                        break;
                    }
                }
            }
        }
        Ok(())
    }

    /// Records a failed registration; returns whether to give the node up.
    fn registration_failed(&mut self, ctx: &Ctx, id: &str, e: &ConsumerError) -> bool {
        let s = &ctx.settings;
        // Failures of the whole target do not count against the node: a
        // Jenkins outage or a refused token would otherwise delete the pool.
        let counts = !matches!(
            e,
            ConsumerError::Transient(_) | ConsumerError::Unauthenticated(_)
        );
        let f = self.failures.entry(id.to_owned()).or_insert(Failures {
            counted: 0,
            in_a_row: 0,
            next_attempt: Instant::now(),
        });
        f.in_a_row += 1;
        if counts {
            f.counted += 1;
        }
        if counts && f.counted >= s.registration_attempts {
            tracing::warn!(target_name = %self.target.name, node = %id, error = %e, attempts = f.counted, "cannot register the node; giving it up");
            return true;
        }
        let factor = 2u32.saturating_pow(f.in_a_row.saturating_sub(1).min(16));
        let wait = s
            .registration_backoff
            .saturating_mul(factor)
            .min(s.max_registration_backoff);
        f.next_attempt = Instant::now() + wait;
        tracing::warn!(target_name = %self.target.name, node = %id, error = %e, retry_in = ?wait, "cannot register the node; retrying");
        false
    }

    /// Accepts a fulfilled request and re-allocates its nodes to the target.
    async fn take(
        &mut self,
        ctx: &Ctx,
        requestor: &Requestor,
        request_id: &str,
        request: &crate::model::NodeRequest,
    ) {
        let set = match requestor.accept(request_id, request).await {
            Ok(set) => set,
            Err(e) => {
                // accept deleted the request; min-ready asks again.
                tracing::warn!(target_name = %self.target.name, request = %request_id, error = %e, "cannot take the request's nodes");
                return;
            }
        };
        for mut n in set.nodes {
            n.node.allocated_to = Some(self.id.clone());
            let result = if n.lock.wait_held().await {
                ctx.store.store_node(&n.id, &n.node).await.map(|_| ())
            } else {
                Err(StoreError::SessionLost)
            };
            match result {
                Ok(()) => {
                    tracing::debug!(target_name = %self.target.name, node = %n.id, "node allocated to the target")
                }
                // Still allocated to the deleted request: the launcher
                // deallocates it and min-ready asks again.
                Err(e) => {
                    tracing::warn!(target_name = %self.target.name, node = %n.id, error = %e, "cannot allocate the node to the target")
                }
            }
            if let Err(e) = n.lock.release().await {
                tracing::warn!(node = %n.id, error = %e, "cannot unlock node");
            }
        }
    }

    /// Writes a node's outcome under its lock: `used`, or `hold` if its job
    /// hold rule has room.
    async fn finish(
        &self,
        ctx: &Ctx,
        id: &str,
        outcome: &NodeOutcome,
        all: &[NodeRecord],
        held_now: &mut BTreeMap<String, usize>,
    ) -> Result<(), StoreError> {
        let lock = ctx
            .store
            .lock_node(id, LockWait::Timeout(ctx.settings.node_lock_timeout))
            .await?;
        let result = async {
            let Some(mut current) = ctx.store.get_node(id).await? else {
                return Ok(());
            };
            let node = &mut current.value;
            if node.state != NodeState::Ready || node.allocated_to.as_deref() != Some(&self.id) {
                // Someone else decided (an operator's hold or delete).
                return Ok(());
            }
            let now = ctx.settings.clock.now();
            match self.hold_decision(ctx, outcome, all, held_now).await? {
                Some((comment, job)) => {
                    tracing::info!(target_name = %self.target.name, node = %id, job = ?job, "holding the node");
                    node.set_state(NodeState::Hold, now);
                    node.comment = Some(comment);
                    node.hold_job = job;
                }
                None => {
                    tracing::info!(target_name = %self.target.name, node = %id, "node used; the launcher deletes it");
                    node.set_state(NodeState::Used, now);
                }
            }
            if !lock.wait_held().await {
                return Err(StoreError::SessionLost);
            }
            ctx.store.store_node(id, node).await.map(|_| ())
        }
        .await;
        let _ = lock.release().await;
        result
    }

    /// Whether to hold: the comment and the job, or `None` for `used`.
    async fn hold_decision(
        &self,
        ctx: &Ctx,
        outcome: &NodeOutcome,
        all: &[NodeRecord],
        held_now: &mut BTreeMap<String, usize>,
    ) -> Result<Option<(String, Option<String>)>, StoreError> {
        let NodeOutcome::Hold { comment, job } = outcome else {
            return Ok(None);
        };
        let Some(job) = job else {
            return Ok(Some((comment.clone(), None)));
        };
        let Some(rule) = ctx.store.get_job_hold(job).await? else {
            return Ok(None);
        };
        let held =
            held_for(job, all.iter().map(|r| &*r.node)) + held_now.get(job).copied().unwrap_or(0);
        if held >= rule.hold_on_failure as usize {
            tracing::info!(target_name = %self.target.name, %job, held, "the job's hold rule is full; deleting the node");
            return Ok(None);
        }
        *held_now.entry(job.clone()).or_default() += 1;
        Ok(Some((comment.clone(), Some(job.clone()))))
    }

    async fn deliver_gone(&mut self) {
        for id in std::mem::take(&mut self.gone) {
            match self.consumer.node_gone(&id).await {
                Ok(()) | Err(ConsumerError::NotFound(_)) => {}
                Err(e) => {
                    tracing::warn!(target_name = %self.target.name, node = %id, error = %e, "cannot remove the node from the target; retrying");
                    self.gone.insert(id);
                }
            }
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
        let records = match ctx.store.list_nodes().await {
            Ok(l) => l.records,
            Err(e) => {
                tracing::warn!(target_name = %self.target.name, error = %e, "cannot list the target's nodes");
                return;
            }
        };
        let mut held_now = BTreeMap::new();
        for rec in &records {
            if rec.node.allocated_to.as_deref() != Some(self.id.as_str())
                || rec.node.state != NodeState::Ready
            {
                continue;
            }
            if let Err(e) = self
                .finish(ctx, &rec.id, &NodeOutcome::Used, &records, &mut held_now)
                .await
            {
                tracing::warn!(node = %rec.id, error = %e, "cannot give the node up");
            }
            self.gone.insert(rec.id.clone());
        }
        self.deliver_gone().await;
    }
}

/// Whether a node is allocated to a consumer target rather than a request.
pub fn is_consumer_allocation(node: &Node) -> bool {
    node.allocated_to
        .as_deref()
        .is_some_and(|a| a.starts_with(ALLOCATION_PREFIX))
}
