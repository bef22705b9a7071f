//! The consumer runtime's planner: what one pass does for one target, as a
//! pure function ([`plan_target`]) of what the pass sees
//! ([`TargetSnapshot`]) and what the runtime remembers of earlier passes
//! ([`TargetMemory`]). The runtime executes the actions in order and
//! updates the memory with how they went.
//!
//! Actions come in this order: the consumer is reconciled (once per
//! election or consumer), fulfilled requests are taken (their nodes
//! allocated to the target and registered at once) and failed ones
//! withdrawn, nodes that left the target are forgotten, new nodes are
//! registered, finished nodes get their outcome written, agents of gone
//! nodes are removed, and min-ready is topped up. A node given up after
//! failed registrations gets its outcome written in the next pass.

use std::collections::{BTreeMap, BTreeSet};

use tokio::time::Instant;

use crate::consumer::{FinishedNode, NodeOutcome};
use crate::model::{NodeState, RequestState};
use crate::store::holds::{JobHold, held_for};
use crate::store::{NodeRecord, RequestRecord};

/// What a pass for one target sees.
#[derive(Clone, Debug, Default)]
pub struct TargetSnapshot {
    /// The target's allocation id (`jenkins:<target>`), which is also its
    /// requestor id.
    pub id: String,
    /// Every node request (the plan picks the target's by requestor).
    pub requests: Vec<RequestRecord>,
    /// Every node (held nodes are counted over all of them).
    pub nodes: Vec<NodeRecord>,
    /// What the consumer reported done since the last pass.
    pub finished: Vec<FinishedNode>,
    /// Nodes running a job now (the consumer knows; the store does not).
    pub busy: BTreeSet<String>,
    /// Labels the target wants, with their min-ready.
    pub wants: Vec<(String, u32)>,
    /// The hold rules of the jobs that pending hold outcomes name; `None`
    /// for a job without a rule. A job missing here had its rule fail to
    /// read: its nodes wait for a pass that reads it.
    pub hold_rules: BTreeMap<String, Option<JobHold>>,
}

/// Registration failures of one node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Failures {
    /// Failures that count towards giving the node up.
    pub counted: u32,
    /// Failures in a row, for the backoff.
    pub in_a_row: u32,
    /// No attempt before this.
    pub next_attempt: Instant,
}

/// What the runtime remembers about a target between passes.
#[derive(Clone, Debug, Default)]
pub struct TargetMemory {
    /// Nodes `node_ready` accepted.
    pub registered: BTreeSet<String>,
    /// Nodes whose registration failed.
    pub failures: BTreeMap<String, Failures>,
    /// Outcomes reported (or decided) and not yet written.
    pub outcomes: BTreeMap<String, NodeOutcome>,
    /// Nodes whose agent is still to be removed.
    pub gone: BTreeSet<String>,
    /// Labels whose last request failed, and when to ask again.
    pub label_backoff: BTreeMap<String, Instant>,
    /// Whether `reconcile` ran since the target was taken or its consumer
    /// rebuilt.
    pub reconciled: bool,
}

/// One thing a pass does for a target.
#[derive(Clone, Debug, PartialEq)]
pub enum TargetAction {
    /// Accept a fulfilled request, allocate its nodes to the target and
    /// hand them to the consumer.
    Take {
        /// Request id.
        request: String,
    },
    /// Withdraw a failed request (no launcher serves its labels); its
    /// labels are not asked for again for a while.
    Withdraw {
        /// Request id.
        request: String,
        /// Its labels.
        labels: Vec<String>,
    },
    /// The node left the target (deleted, or taken back): forget it and
    /// remove its agent.
    Forget {
        /// Node id.
        node: String,
    },
    /// Tell the consumer which nodes the target has, so it drops what
    /// belongs to nodes that went while nobody served the target.
    Reconcile {
        /// The target's nodes.
        live: Vec<String>,
    },
    /// Hand a node to the consumer (`node_ready`).
    Register {
        /// Node id.
        node: String,
    },
    /// Write a finished node's end under its lock, then remove its agent.
    Finish {
        /// Node id.
        node: String,
        /// What the consumer reported (kept for a retry if the write fails).
        reported: NodeOutcome,
        /// What the node becomes.
        end: NodeEnd,
    },
    /// Keep a reported outcome for a later pass (its job's hold rule could
    /// not be read).
    Defer {
        /// Node id.
        node: String,
        /// What the consumer reported.
        reported: NodeOutcome,
    },
    /// Remove the agent of a node that is gone (an earlier removal
    /// failed). An agent already removed in the pass is not removed again.
    RemoveAgent {
        /// Node id.
        node: String,
    },
    /// Ask for more nodes of a label, one request each.
    Request {
        /// The label.
        label: String,
        /// How many.
        count: usize,
    },
}

/// What a finished node becomes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NodeEnd {
    /// `used`: the launcher deletes it.
    Used,
    /// `used`, though its failed job asked for a hold: the job's rule
    /// allows no more held nodes.
    RuleFull {
        /// The job.
        job: String,
        /// Nodes held for it now.
        held: usize,
    },
    /// `hold`.
    Hold {
        /// The node's `comment`.
        comment: String,
        /// The job it counts against (`hold_job`).
        job: Option<String>,
    },
}

impl TargetSnapshot {
    /// The target's nodes: `ready` and allocated to it.
    fn ours(&self) -> BTreeMap<&str, &NodeRecord> {
        self.nodes
            .iter()
            .filter(|r| {
                r.node.state == NodeState::Ready
                    && r.node.allocated_to.as_deref() == Some(self.id.as_str())
            })
            .map(|r| (r.id.as_str(), r))
            .collect()
    }
}

/// Plans one pass for one target. See the module documentation.
pub fn plan_target(
    snapshot: &TargetSnapshot,
    memory: &TargetMemory,
    now: Instant,
) -> Vec<TargetAction> {
    let mut actions = Vec::new();
    let ours = snapshot.ours();

    // Once per election or consumer, before any new node gets an agent:
    // drop what belongs to nodes that went while nobody served the target.
    if !memory.reconciled {
        actions.push(TargetAction::Reconcile {
            live: ours.keys().map(|id| (*id).to_owned()).collect(),
        });
    }

    // Our requests: take fulfilled ones, withdraw failed ones, count the
    // rest. A taken request's nodes are ours from the next pass on, so
    // they count as asked for until then.
    let mut outstanding: BTreeMap<&str, usize> = BTreeMap::new();
    let mut backed_off: BTreeSet<&str> = memory
        .label_backoff
        .iter()
        .filter(|(_, until)| **until > now)
        .map(|(l, _)| l.as_str())
        .collect();
    for r in &snapshot.requests {
        if r.request.requestor.as_deref() != Some(snapshot.id.as_str()) {
            continue;
        }
        match r.request.state {
            RequestState::Failed => {
                backed_off.extend(r.request.node_types.iter().map(String::as_str));
                actions.push(TargetAction::Withdraw {
                    request: r.id.clone(),
                    labels: r.request.node_types.clone(),
                });
            }
            state => {
                if state == RequestState::Fulfilled {
                    actions.push(TargetAction::Take {
                        request: r.id.clone(),
                    });
                }
                for l in &r.request.node_types {
                    *outstanding.entry(l.as_str()).or_default() += 1;
                }
            }
        }
    }

    // Nodes that left the target.
    let known: BTreeSet<&str> = memory
        .registered
        .iter()
        .chain(memory.failures.keys())
        .chain(memory.outcomes.keys())
        .map(String::as_str)
        .collect();
    for id in &known {
        if !ours.contains_key(id) {
            actions.push(TargetAction::Forget {
                node: (*id).to_owned(),
            });
        }
    }

    // Finished nodes: the outcomes still pending and the new reports (a
    // new report of a node replaces its pending one).
    let mut pending: BTreeMap<&str, &NodeOutcome> = memory
        .outcomes
        .iter()
        .map(|(id, o)| (id.as_str(), o))
        .collect();
    for f in &snapshot.finished {
        pending.insert(f.node_id.as_str(), &f.outcome);
    }

    // New nodes, unless a failed registration waits for its backoff or
    // the node's end is decided already (a node given up, a job done).
    for id in ours.keys() {
        let waiting = memory
            .failures
            .get(*id)
            .is_some_and(|f| now < f.next_attempt);
        if !memory.registered.contains(*id) && !waiting && !pending.contains_key(id) {
            actions.push(TargetAction::Register {
                node: (*id).to_owned(),
            });
        }
    }

    let mut held_now: BTreeMap<&str, usize> = BTreeMap::new();
    for (id, reported) in &pending {
        if !ours.contains_key(id) {
            // Not the target's any more: forgotten above, or never known.
            continue;
        }
        let node = (*id).to_owned();
        let end = node_end(snapshot, reported, &mut held_now);
        let reported = (*reported).clone();
        actions.push(match end {
            Some(end) => TargetAction::Finish {
                node,
                reported,
                end,
            },
            None => TargetAction::Defer { node, reported },
        });
    }

    for id in &memory.gone {
        actions.push(TargetAction::RemoveAgent { node: id.clone() });
    }

    // min-ready: idle nodes and outstanding requests per label.
    for (label, min_ready) in &snapshot.wants {
        if backed_off.contains(label.as_str()) {
            continue;
        }
        let idle = ours
            .iter()
            .filter(|(id, rec)| {
                rec.node.node_type.contains(label)
                    && !snapshot.busy.contains(**id)
                    && !pending.contains_key(**id)
            })
            .count()
            + outstanding.get(label.as_str()).copied().unwrap_or(0);
        let missing = (*min_ready as usize).saturating_sub(idle);
        if missing > 0 {
            actions.push(TargetAction::Request {
                label: label.clone(),
                count: missing,
            });
        }
    }
    actions
}

/// What a finished node becomes; `None` while its job's hold rule is
/// unknown. `held_now` counts the holds planned in this pass per job.
fn node_end<'a>(
    snapshot: &TargetSnapshot,
    reported: &'a NodeOutcome,
    held_now: &mut BTreeMap<&'a str, usize>,
) -> Option<NodeEnd> {
    let NodeOutcome::Hold { comment, job } = reported else {
        return Some(NodeEnd::Used);
    };
    let Some(job) = job else {
        return Some(NodeEnd::Hold {
            comment: comment.clone(),
            job: None,
        });
    };
    let Some(rule) = snapshot.hold_rules.get(job)? else {
        return Some(NodeEnd::Used);
    };
    let planned = held_now.entry(job.as_str()).or_default();
    let held = held_for(job, snapshot.nodes.iter().map(|r| &*r.node)) + *planned;
    if held >= rule.hold_on_failure as usize {
        return Some(NodeEnd::RuleFull {
            job: job.clone(),
            held,
        });
    }
    *planned += 1;
    Some(NodeEnd::Hold {
        comment: comment.clone(),
        job: Some(job.clone()),
    })
}

/// The jobs whose hold rules a pass needs: those named by pending hold
/// outcomes and new reports.
pub(crate) fn jobs_to_check<'a>(
    memory: &'a TargetMemory,
    finished: &'a [FinishedNode],
) -> BTreeSet<&'a str> {
    memory
        .outcomes
        .values()
        .chain(finished.iter().map(|f| &f.outcome))
        .filter_map(|o| match o {
            NodeOutcome::Hold { job: Some(job), .. } => Some(job.as_str()),
            _ => None,
        })
        .collect()
}

/// The target was removed from the configuration: every node it has
/// becomes `used`, and every agent goes, those of nodes whose outcome
/// could not be written too (nobody serves the target any more).
pub fn plan_give_up(snapshot: &TargetSnapshot, memory: &TargetMemory) -> Vec<TargetAction> {
    let ours = snapshot.ours();
    let mut actions: Vec<TargetAction> = ours
        .keys()
        .map(|id| TargetAction::Finish {
            node: (*id).to_owned(),
            reported: NodeOutcome::Used,
            end: NodeEnd::Used,
        })
        .collect();
    let agents: BTreeSet<&str> = ours
        .keys()
        .copied()
        .chain(memory.gone.iter().map(String::as_str))
        .collect();
    actions.extend(agents.into_iter().map(|id| TargetAction::RemoveAgent {
        node: id.to_owned(),
    }));
    actions
}
