//! When a request's nodes are complete: the rule the launcher applies the
//! moment a launch finishes, so a request is fulfilled as soon as its last
//! node is ready instead of at the next planning pass (which, in a burst,
//! may be busy accepting hundreds of other requests).
//!
//! The planner's own `Fulfill` (in `requests.rs`) fills slots the same way:
//! in `node_types` order, each with the first ready node (by id) carrying
//! the slot's label.

use crate::model::{Node, NodeState};

/// The node ids that fulfil a request, in its `node_types` order, when
/// every slot has a ready node allocated to it and none of its nodes is
/// still being built; `None` otherwise.
///
/// `candidates` are the nodes the launcher allocated or launched for the
/// request (in any order, possibly including nodes since given back,
/// which are ignored).
///
/// ```
/// use nodepool_core::model::{Node, NodeState};
/// use nodepool_core::planner::fulfilment::complete_allocation;
///
/// let mut a = Node::new(NodeState::Ready, 0.0, "p", "main", vec!["small".into()]);
/// a.allocated_to = Some("100-0000000001".into());
/// let mut b = Node::new(NodeState::Building, 0.0, "p", "main", vec!["big".into()]);
/// b.allocated_to = Some("100-0000000001".into());
/// let labels = vec!["big".to_owned(), "small".to_owned()];
/// let request = "100-0000000001";
/// assert_eq!(complete_allocation(request, &labels, &[("1", &a), ("2", &b)]), None);
/// b.state = NodeState::Ready;
/// assert_eq!(
///     complete_allocation(request, &labels, &[("1", &a), ("2", &b)]),
///     Some(vec!["2".to_owned(), "1".to_owned()])
/// );
/// ```
pub fn complete_allocation(
    request: &str,
    node_types: &[String],
    candidates: &[(&str, &Node)],
) -> Option<Vec<String>> {
    let mine = |n: &Node| n.allocated_to.as_deref() == Some(request);
    if candidates
        .iter()
        .any(|(_, n)| mine(n) && matches!(n.state, NodeState::Init | NodeState::Building))
    {
        return None;
    }
    let mut ready: Vec<(&str, &Node)> = candidates
        .iter()
        .copied()
        .filter(|(_, n)| mine(n) && n.state == NodeState::Ready)
        .collect();
    ready.sort_by_key(|(id, _)| *id);
    let mut used = vec![false; ready.len()];
    let mut slots = Vec::with_capacity(node_types.len());
    for label in node_types {
        let k = (0..ready.len()).find(|&k| !used[k] && ready[k].1.has_label(label))?;
        used[k] = true;
        slots.push(ready[k].0.to_owned());
    }
    Some(slots)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(state: NodeState, label: &str, to: Option<&str>) -> Node {
        let mut n = Node::new(state, 0.0, "p", "main", vec![label.into()]);
        n.allocated_to = to.map(str::to_owned);
        n
    }

    #[test]
    fn a_slot_without_a_ready_node_leaves_the_request_waiting() {
        let a = node(NodeState::Ready, "x", Some("r"));
        let labels = vec!["x".to_owned(), "x".to_owned()];
        assert_eq!(complete_allocation("r", &labels, &[("1", &a)]), None);
    }

    #[test]
    fn nodes_given_back_or_failed_do_not_fill_slots() {
        let gone = node(NodeState::Ready, "x", None);
        let failed = node(NodeState::Failed, "x", Some("r"));
        let labels = vec!["x".to_owned()];
        assert_eq!(
            complete_allocation("r", &labels, &[("1", &gone), ("2", &failed)]),
            None
        );
        let good = node(NodeState::Ready, "x", Some("r"));
        assert_eq!(
            complete_allocation("r", &labels, &[("1", &gone), ("2", &failed), ("3", &good)]),
            Some(vec!["3".to_owned()])
        );
    }

    #[test]
    fn a_node_still_building_holds_the_request_back_even_with_every_slot_filled() {
        let a = node(NodeState::Ready, "x", Some("r"));
        let b = node(NodeState::Building, "x", Some("r"));
        let labels = vec!["x".to_owned()];
        assert_eq!(
            complete_allocation("r", &labels, &[("1", &a), ("2", &b)]),
            None
        );
    }

    #[test]
    fn slots_take_the_lowest_ready_id_in_label_order() {
        let a = node(NodeState::Ready, "x", Some("r"));
        let b = node(NodeState::Ready, "x", Some("r"));
        let c = node(NodeState::Ready, "y", Some("r"));
        let labels = vec!["y".to_owned(), "x".to_owned()];
        assert_eq!(
            complete_allocation("r", &labels, &[("9", &b), ("5", &a), ("7", &c)]),
            Some(vec!["7".to_owned(), "5".to_owned()])
        );
    }
}
