//! The consumer runtime's planner on its own: what one pass of a target
//! does, as a pure function of a snapshot and the runtime's memory.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use nodepool_core::consumer::{FinishedNode, NodeOutcome};
use nodepool_core::consumers::{
    Failures, JobHold, NodeEnd, TargetAction, TargetMemory, TargetSnapshot, plan_give_up,
    plan_target,
};
use nodepool_core::model::{Node, NodeRequest, NodeState, RequestState};
use nodepool_core::store::{NodeRecord, RequestRecord};
use tokio::time::Instant;

const US: &str = "jenkins:ci";

fn node(id: &str, state: NodeState, allocated_to: Option<&str>, label: &str) -> NodeRecord {
    let mut n = Node::new(state, 0.0, "sim", "main", vec![label.to_owned()]);
    n.allocated_to = allocated_to.map(str::to_owned);
    NodeRecord {
        id: id.to_owned(),
        node: Arc::new(n),
        version: 0,
        locked: false,
    }
}

/// A ready node of ours.
fn ours(id: &str, label: &str) -> NodeRecord {
    node(id, NodeState::Ready, Some(US), label)
}

fn held(id: &str, job: &str) -> NodeRecord {
    let mut n = Node::new(NodeState::Hold, 0.0, "sim", "main", vec!["small".into()]);
    n.hold_job = Some(job.to_owned());
    NodeRecord {
        id: id.to_owned(),
        node: Arc::new(n),
        version: 0,
        locked: false,
    }
}

fn request(id: &str, requestor: &str, state: RequestState, labels: &[&str]) -> RequestRecord {
    let mut r = NodeRequest::new(
        labels.iter().map(|l| (*l).to_owned()).collect(),
        requestor,
        0.0,
    );
    r.state = state;
    RequestRecord {
        id: id.to_owned(),
        request: Arc::new(r),
        version: 0,
        ephemeral: false,
        ephemeral_owner: 0,
        locked: false,
    }
}

fn snapshot(nodes: Vec<NodeRecord>, wants: &[(&str, u32)]) -> TargetSnapshot {
    TargetSnapshot {
        id: US.to_owned(),
        nodes,
        wants: wants.iter().map(|(l, n)| ((*l).to_owned(), *n)).collect(),
        ..TargetSnapshot::default()
    }
}

/// A memory of a target served for a while: reconciled, these registered.
fn served(registered: &[&str]) -> TargetMemory {
    TargetMemory {
        registered: registered.iter().map(|s| (*s).to_owned()).collect(),
        reconciled: true,
        ..TargetMemory::default()
    }
}

fn hold(job: Option<&str>) -> NodeOutcome {
    NodeOutcome::Hold {
        comment: "failed".into(),
        job: job.map(str::to_owned),
    }
}

fn finished(id: &str, outcome: NodeOutcome) -> FinishedNode {
    FinishedNode {
        node_id: id.to_owned(),
        outcome,
    }
}

fn requests_for(actions: &[TargetAction]) -> BTreeMap<String, usize> {
    actions
        .iter()
        .filter_map(|a| match a {
            TargetAction::Request { label, count } => Some((label.clone(), *count)),
            _ => None,
        })
        .collect()
}

#[test]
fn a_new_target_is_reconciled_first_then_its_nodes_registered_and_min_ready_asked_for() {
    let snap = snapshot(vec![ours("1", "small")], &[("small", 3)]);
    let actions = plan_target(&snap, &TargetMemory::default(), Instant::now());
    assert_eq!(
        actions,
        [
            TargetAction::Reconcile {
                live: vec!["1".into()]
            },
            TargetAction::Register { node: "1".into() },
            TargetAction::Request {
                label: "small".into(),
                count: 2
            },
        ]
    );
}

#[test]
fn fulfilled_requests_are_taken_and_count_towards_min_ready() {
    let mut snap = snapshot(vec![ours("1", "small")], &[("small", 4)]);
    snap.requests = vec![
        request("200-1", US, RequestState::Fulfilled, &["small"]),
        request("200-2", US, RequestState::Pending, &["small"]),
        // Someone else's requests are not ours to take or count.
        request("200-3", "zuul", RequestState::Fulfilled, &["small"]),
    ];
    let actions = plan_target(&snap, &served(&["1"]), Instant::now());
    assert_eq!(
        actions,
        [
            TargetAction::Take {
                request: "200-1".into()
            },
            TargetAction::Request {
                label: "small".into(),
                count: 1
            },
        ]
    );
}

#[test]
fn a_failed_request_is_withdrawn_and_its_label_waits() {
    let mut snap = snapshot(Vec::new(), &[("small", 1), ("orphan", 1)]);
    snap.requests = vec![request("200-1", US, RequestState::Failed, &["orphan"])];
    let now = Instant::now();
    let actions = plan_target(&snap, &served(&[]), now);
    assert_eq!(
        actions,
        [
            TargetAction::Withdraw {
                request: "200-1".into(),
                labels: vec!["orphan".into()]
            },
            TargetAction::Request {
                label: "small".into(),
                count: 1
            },
        ],
        "not asked for again in the same pass"
    );
    // Later passes: asked for only once the backoff is over.
    let mut memory = served(&[]);
    memory
        .label_backoff
        .insert("orphan".into(), now + Duration::from_secs(60));
    let snap = snapshot(Vec::new(), &[("orphan", 1)]);
    assert!(requests_for(&plan_target(&snap, &memory, now)).is_empty());
    assert_eq!(
        requests_for(&plan_target(&snap, &memory, now + Duration::from_secs(61))),
        BTreeMap::from([("orphan".to_owned(), 1)])
    );
}

#[test]
fn nodes_that_left_the_target_are_forgotten() {
    let mut memory = served(&["1", "2"]);
    memory.failures.insert(
        "3".into(),
        Failures {
            counted: 1,
            in_a_row: 1,
            next_attempt: Instant::now(),
        },
    );
    memory.outcomes.insert("4".into(), NodeOutcome::Used);
    let snap = snapshot(
        vec![
            ours("1", "small"),
            // Deleted by an operator, held by an operator, deleted.
            node("2", NodeState::Deleting, Some(US), "small"),
            node("3", NodeState::Hold, Some(US), "small"),
        ],
        &[],
    );
    let actions = plan_target(&snap, &memory, Instant::now());
    assert_eq!(
        actions,
        [
            TargetAction::Forget { node: "2".into() },
            TargetAction::Forget { node: "3".into() },
            TargetAction::Forget { node: "4".into() },
        ]
    );
}

#[test]
fn registration_waits_for_its_backoff_and_skips_decided_nodes() {
    let now = Instant::now();
    let mut memory = served(&["1"]);
    memory.failures.insert(
        "2".into(),
        Failures {
            counted: 1,
            in_a_row: 1,
            next_attempt: now + Duration::from_secs(10),
        },
    );
    // Given up after failed registrations: its end is written, not retried.
    memory.outcomes.insert("3".into(), NodeOutcome::Used);
    let snap = snapshot(
        vec![
            ours("1", "small"),
            ours("2", "small"),
            ours("3", "small"),
            ours("4", "small"),
        ],
        &[],
    );
    let registers = |at| -> Vec<String> {
        plan_target(&snap, &memory, at)
            .into_iter()
            .filter_map(|a| match a {
                TargetAction::Register { node } => Some(node),
                _ => None,
            })
            .collect()
    };
    assert_eq!(registers(now), ["4"]);
    assert_eq!(registers(now + Duration::from_secs(10)), ["2", "4"]);
}

#[test]
fn finished_nodes_end_used_or_held_within_their_rule() {
    let mut snap = snapshot(
        vec![
            ours("1", "small"),
            ours("2", "small"),
            ours("3", "small"),
            ours("4", "small"),
            ours("5", "small"),
            ours("6", "small"),
            held("7", "flaky"),
        ],
        &[],
    );
    snap.finished = vec![
        finished("1", NodeOutcome::Used),
        finished("2", hold(None)),
        finished("3", hold(Some("flaky"))),
        finished("4", hold(Some("flaky"))),
        finished("5", hold(Some("no-rule"))),
        finished("6", hold(Some("unreadable"))),
    ];
    // Two held for flaky at once: one is already, one more may be.
    snap.hold_rules.insert(
        "flaky".into(),
        Some(JobHold {
            job: "flaky".into(),
            hold_on_failure: 2,
            created_time: None,
        }),
    );
    snap.hold_rules.insert("no-rule".into(), None);
    let all = ["1", "2", "3", "4", "5", "6"];
    let actions = plan_target(&snap, &served(&all), Instant::now());
    let finish = |node: &str, reported: NodeOutcome, end: NodeEnd| TargetAction::Finish {
        node: node.into(),
        reported,
        end,
    };
    assert_eq!(
        actions,
        [
            finish("1", NodeOutcome::Used, NodeEnd::Used),
            finish(
                "2",
                hold(None),
                NodeEnd::Hold {
                    comment: "failed".into(),
                    job: None
                }
            ),
            finish(
                "3",
                hold(Some("flaky")),
                NodeEnd::Hold {
                    comment: "failed".into(),
                    job: Some("flaky".into())
                }
            ),
            finish(
                "4",
                hold(Some("flaky")),
                NodeEnd::RuleFull {
                    job: "flaky".into(),
                    held: 2
                }
            ),
            finish("5", hold(Some("no-rule")), NodeEnd::Used),
            TargetAction::Defer {
                node: "6".into(),
                reported: hold(Some("unreadable"))
            },
        ]
    );
}

#[test]
fn a_pending_outcome_is_retried_and_a_new_report_replaces_it() {
    let mut memory = served(&["1", "2"]);
    memory.outcomes.insert("1".into(), NodeOutcome::Used);
    memory.outcomes.insert("2".into(), hold(None));
    let mut snap = snapshot(vec![ours("1", "small"), ours("2", "small")], &[]);
    snap.finished = vec![finished("2", NodeOutcome::Used)];
    let actions = plan_target(&snap, &memory, Instant::now());
    assert_eq!(
        actions,
        [
            TargetAction::Finish {
                node: "1".into(),
                reported: NodeOutcome::Used,
                end: NodeEnd::Used
            },
            TargetAction::Finish {
                node: "2".into(),
                reported: NodeOutcome::Used,
                end: NodeEnd::Used
            },
        ]
    );
}

#[test]
fn a_report_of_a_node_that_is_not_the_targets_is_dropped() {
    let mut snap = snapshot(
        vec![node("9", NodeState::Ready, Some("200-1"), "small")],
        &[],
    );
    snap.finished = vec![finished("9", NodeOutcome::Used)];
    assert!(plan_target(&snap, &served(&[]), Instant::now()).is_empty());
}

#[test]
fn busy_and_finished_nodes_are_not_idle_for_min_ready() {
    let mut snap = snapshot(
        vec![
            ours("1", "small"),
            ours("2", "small"),
            ours("3", "small"),
            ours("4", "large"),
        ],
        &[("small", 3), ("large", 1)],
    );
    snap.busy.insert("1".into());
    snap.finished = vec![finished("2", NodeOutcome::Used)];
    let actions = plan_target(&snap, &served(&["1", "2", "3", "4"]), Instant::now());
    assert_eq!(
        requests_for(&actions),
        BTreeMap::from([("small".to_owned(), 2)])
    );
}

#[test]
fn agents_whose_removal_failed_are_removed_again() {
    let mut memory = served(&[]);
    memory.gone.insert("5".into());
    let actions = plan_target(&snapshot(Vec::new(), &[]), &memory, Instant::now());
    assert_eq!(actions, [TargetAction::RemoveAgent { node: "5".into() }]);
}

#[test]
fn giving_a_target_up_ends_every_node_and_removes_every_agent() {
    let snap = snapshot(
        vec![
            ours("1", "small"),
            ours("2", "small"),
            node("3", NodeState::InUse, Some("200-1"), "small"),
        ],
        &[("small", 5)],
    );
    let mut memory = served(&["1", "2"]);
    memory.gone.insert("0".into());
    let used = |node: &str| TargetAction::Finish {
        node: node.into(),
        reported: NodeOutcome::Used,
        end: NodeEnd::Used,
    };
    let gone = |node: &str| TargetAction::RemoveAgent { node: node.into() };
    assert_eq!(
        plan_give_up(&snap, &memory),
        [used("1"), used("2"), gone("0"), gone("1"), gone("2")]
    );
}
