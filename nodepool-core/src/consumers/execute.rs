//! Carries out a target's plan: the store writes (under the nodes' locks)
//! and the consumer calls, and what the runtime remembers of how they
//! went.

use std::collections::{BTreeMap, BTreeSet};

use tokio::time::Instant;

use super::plan::{self, Failures, NodeEnd, TargetAction, TargetSnapshot};
use super::{Ctx, Served};
use crate::consumer::{ConsumerError, NodeOutcome};
use crate::model::{Node, NodeState};
use crate::store::{Decision, LockOf, LockWait, RecordKey, StoreError};
use nodepool_requestor::{NewRequest, Requestor};

impl Served {
    /// One pass for the target: snapshot, plan, execute.
    pub(super) async fn pass(&mut self, ctx: &Ctx) -> Result<(), StoreError> {
        let snapshot = self.snapshot(ctx).await?;
        let actions = plan::plan_target(&snapshot, &self.memory, Instant::now());
        self.execute(ctx, &snapshot, actions).await;
        Ok(())
    }

    /// What the pass sees: the store's requests and nodes, then what the
    /// consumer reports (done, busy, wanted) and the hold rules those
    /// reports need.
    async fn snapshot(&self, ctx: &Ctx) -> Result<TargetSnapshot, StoreError> {
        let requests = ctx.store.list_requests().await?.records;
        let nodes = ctx.store.list_nodes().await?.records;
        let finished = match self.consumer.finished_nodes().await {
            Ok(f) => f,
            Err(e) => {
                tracing::warn!(target_name = %self.target.name, error = %e, "cannot ask the target which nodes are done");
                Vec::new()
            }
        };
        let mut hold_rules = BTreeMap::new();
        for job in plan::jobs_to_check(&self.memory, &finished) {
            match ctx.store.get_job_hold(job).await {
                Ok(rule) => {
                    hold_rules.insert(job.to_owned(), rule);
                }
                Err(e) => {
                    tracing::warn!(target_name = %self.target.name, %job, error = %e, "cannot read the job's hold rule; its nodes wait");
                }
            }
        }
        Ok(TargetSnapshot {
            id: self.id.clone(),
            requests,
            nodes,
            finished,
            busy: self.consumer.busy_nodes().into_iter().collect(),
            wants: self.consumer.wants(),
            hold_rules,
        })
    }

    /// Runs the actions in order. Pending outcomes and agent removals are
    /// all in the plan, so they start empty and each action puts back what
    /// is still to do.
    pub(super) async fn execute(
        &mut self,
        ctx: &Ctx,
        snapshot: &TargetSnapshot,
        actions: Vec<TargetAction>,
    ) {
        let requestor = Requestor::new(ctx.store.clone(), self.id.clone())
            .with_node_lock_timeout(ctx.settings.node_lock_timeout);
        let now = Instant::now();
        self.memory.label_backoff.retain(|_, until| *until > now);
        self.memory.outcomes.clear();
        self.memory.gone.clear();
        let mut removed = BTreeSet::new();
        for action in actions {
            match action {
                TargetAction::Take { request } => {
                    self.take(ctx, &requestor, snapshot, &request).await;
                }
                TargetAction::Withdraw { request, labels } => {
                    tracing::warn!(target_name = %self.target.name, %request, ?labels, "node request failed (no launcher can serve it); withdrawing it");
                    let again = Instant::now() + ctx.settings.failed_request_backoff;
                    for l in labels {
                        self.memory.label_backoff.insert(l, again);
                    }
                    if let Err(e) = requestor.cancel(&request).await {
                        tracing::warn!(%request, error = %e, "cannot withdraw the failed request");
                    }
                }
                TargetAction::Forget { node } => {
                    tracing::info!(target_name = %self.target.name, %node, "node left the target (deleted or taken back)");
                    self.memory.registered.remove(&node);
                    self.memory.failures.remove(&node);
                    self.remove_agent(node, &mut removed).await;
                }
                TargetAction::Reconcile { live } => match self.consumer.reconcile(&live).await {
                    Ok(()) => self.memory.reconciled = true,
                    Err(e) => {
                        tracing::warn!(target_name = %self.target.name, error = %e, "cannot reconcile the target with its nodes; retrying")
                    }
                },
                TargetAction::Register { node } => {
                    if let Some(rec) = snapshot.nodes.iter().find(|r| r.id == node) {
                        self.register(ctx, &node, &rec.node).await;
                    }
                }
                TargetAction::Finish {
                    node,
                    reported,
                    end,
                } => match self.finish(ctx, &node, &end).await {
                    Ok(()) => {
                        self.memory.registered.remove(&node);
                        self.remove_agent(node, &mut removed).await;
                    }
                    Err(e) => {
                        tracing::warn!(target_name = %self.target.name, %node, error = %e, "cannot write the node's outcome; retrying");
                        self.memory.outcomes.insert(node, reported);
                    }
                },
                TargetAction::Defer { node, reported } => {
                    self.memory.outcomes.insert(node, reported);
                }
                TargetAction::RemoveAgent { node } => self.remove_agent(node, &mut removed).await,
                TargetAction::Request { label, count } => {
                    for _ in 0..count {
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
            }
        }
    }

    /// Hands a node to the consumer.
    async fn register(&mut self, ctx: &Ctx, id: &str, node: &Node) {
        match self.consumer.node_ready(id, node).await {
            Ok(()) => {
                tracing::info!(target_name = %self.target.name, node = %id, "node handed to the target");
                self.memory.failures.remove(id);
                self.memory.registered.insert(id.to_owned());
            }
            Err(e) => {
                if self.registration_failed(ctx, id, &e) {
                    // Its end (and the removal of a half-made agent) is
                    // the next pass's.
                    self.memory.failures.remove(id);
                    self.memory
                        .outcomes
                        .insert(id.to_owned(), NodeOutcome::Used);
                }
            }
        }
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
        let f = self
            .memory
            .failures
            .entry(id.to_owned())
            .or_insert(Failures {
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

    /// Accepts a fulfilled request, allocates its nodes to the target and
    /// hands them to the consumer.
    async fn take(
        &mut self,
        ctx: &Ctx,
        requestor: &Requestor,
        snapshot: &TargetSnapshot,
        request_id: &str,
    ) {
        let Some(request) = snapshot.requests.iter().find(|r| r.id == request_id) else {
            return;
        };
        let set = match requestor.accept(request_id, &request.request).await {
            Ok(set) => set,
            Err(e) => {
                // accept deleted the request; min-ready asks again.
                tracing::warn!(target_name = %self.target.name, request = %request_id, error = %e, "cannot take the request's nodes");
                return;
            }
        };
        for mut n in set.nodes {
            n.node.allocated_to = Some(self.id.clone());
            let written = ctx
                .store
                .write_locked(&n.lock, &RecordKey::node(&n.id), &n.node, None)
                .await;
            if let Err(e) = n.lock.release().await {
                tracing::warn!(node = %n.id, error = %e, "cannot unlock node");
            }
            match written {
                Ok(_) => {
                    tracing::debug!(target_name = %self.target.name, node = %n.id, "node allocated to the target");
                    self.register(ctx, &n.id, &n.node).await;
                }
                // Still allocated to the deleted request: the launcher
                // deallocates it and min-ready asks again.
                Err(e) => {
                    tracing::warn!(target_name = %self.target.name, node = %n.id, error = %e, "cannot allocate the node to the target")
                }
            }
        }
    }

    /// Writes a node's end under its lock, unless someone else decided
    /// meanwhile (an operator's hold or delete).
    async fn finish(&self, ctx: &Ctx, id: &str, end: &NodeEnd) -> Result<(), StoreError> {
        let now = ctx.settings.clock.now();
        let written = ctx
            .store
            .with_locked(
                LockOf::Node(id),
                LockWait::Timeout(ctx.settings.node_lock_timeout),
                &RecordKey::node(id),
                |cur| {
                    let Some(cur) = cur else {
                        return Decision::Leave(false);
                    };
                    let mut node = cur.value;
                    if node.state != NodeState::Ready
                        || node.allocated_to.as_deref() != Some(&self.id)
                    {
                        return Decision::Leave(false);
                    }
                    match end {
                        NodeEnd::Hold { comment, job } => {
                            node.set_state(NodeState::Hold, now);
                            node.comment = Some(comment.clone());
                            node.hold_job = job.clone();
                        }
                        NodeEnd::Used | NodeEnd::RuleFull { .. } => {
                            node.set_state(NodeState::Used, now)
                        }
                    }
                    Decision::Write(node, true)
                },
            )
            .await?;
        if written {
            match end {
                NodeEnd::Hold { job, .. } => {
                    tracing::info!(target_name = %self.target.name, node = %id, job = ?job, "holding the node")
                }
                NodeEnd::RuleFull { job, held } => {
                    tracing::info!(target_name = %self.target.name, node = %id, %job, held, "the job's hold rule is full; deleting the node")
                }
                NodeEnd::Used => {
                    tracing::info!(target_name = %self.target.name, node = %id, "node used; the launcher deletes it")
                }
            }
        }
        Ok(())
    }

    /// Removes a node's agent, once per pass; a failure is retried next
    /// pass.
    async fn remove_agent(&mut self, node: String, removed: &mut BTreeSet<String>) {
        if !removed.insert(node.clone()) {
            return;
        }
        match self.consumer.node_gone(&node).await {
            Ok(()) | Err(ConsumerError::NotFound(_)) => {}
            Err(e) => {
                tracing::warn!(target_name = %self.target.name, %node, error = %e, "cannot remove the node from the target; retrying");
                self.memory.gone.insert(node);
            }
        }
    }
}
