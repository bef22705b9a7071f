//! Node cleanup (reference §4.1, §4.5), min-ready (§4.3) and housekeeping.

use std::collections::BTreeSet;

use super::fast::{FastMap, FastSet, Key};

use super::index::Index;
use super::leaks::{KnownNodes, leaked_ports, leaked_servers, unattached_floating_ips};
use super::registry::Registry;
use super::{
    Action, DeleteReason, INIT_GRACE_SECS, LocalState, Plan, REQUEST_LOCK_CLEANUP_SECS,
    SERVER_GONE_MARGIN_SECS, Snapshot, rendezvous_owner,
};
use crate::config::Config;
use crate::model::{NodeState, RequestState, parse_request_id};
use crate::provider::ResourceKind;

/// Deletions and deallocations of nodes. Returns the indices of nodes this
/// pass deallocates and of nodes it deletes, so the rest of the pass can
/// reuse the former and must not touch the latter.
pub(crate) fn nodes(
    s: &Snapshot,
    cfg: &Config,
    now: f64,
    local: &LocalState,
    idx: &Index<'_>,
    plan: &mut Plan,
) -> (Vec<usize>, FastSet<usize>) {
    let mut freed = Vec::new();
    let mut deleted = FastSet::default();
    let max_hold = cfg.max_hold_age.map(|d| d.as_secs_f64());
    let max_ready_age: FastMap<&str, f64> = cfg
        .labels
        .iter()
        .filter_map(|l| Some((l.name.as_str(), l.max_ready_age?.as_secs_f64())))
        .collect();
    // The index's copy of lock, provider and state first: the records are
    // read only for nodes that may need something.
    for (i, rec) in s.nodes.iter().enumerate() {
        if idx.node_locked(i) || idx.node_provider(i).is_none() {
            continue;
        }
        // A free spare without a max-ready-age needs nothing (most
        // unlocked nodes are spares).
        if idx.node_state(i) == (NodeState::Ready, false) && max_ready_age.is_empty() {
            continue;
        }
        let n = &rec.node;
        let before = plan.actions.len();
        let age = now - n.state_time;
        match n.state {
            st if st.deletable_when_unlocked() => plan.actions.push(Action::DeleteNode {
                node: rec.id.clone(),
                reason: DeleteReason::Unlocked,
            }),
            NodeState::Ready => match &n.allocated_to {
                // Only request allocations are ours to undo; a consumer's
                // (e.g. a Jenkins target's) are not request ids.
                Some(r) if parse_request_id(r).is_some() => {
                    if allocation_lapsed(s, idx, r) {
                        plan.actions.push(Action::Deallocate {
                            node: rec.id.clone(),
                        });
                    }
                }
                Some(_) => {}
                None => {
                    let limit = n
                        .node_type
                        .iter()
                        .filter_map(|l| max_ready_age.get(l.as_str()).copied())
                        .reduce(f64::min);
                    if limit.is_some_and(|limit| age > limit) {
                        plan.actions.push(Action::DeleteNode {
                            node: rec.id.clone(),
                            reason: DeleteReason::MaxReadyAge,
                        });
                    }
                }
            },
            NodeState::Hold => {
                let own = n.hold_expiration.filter(|e| *e > 0).map(|e| e as f64);
                let limit = match (own, max_hold) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                };
                if limit.is_some_and(|l| age > l) {
                    plan.actions.push(Action::DeleteNode {
                        node: rec.id.clone(),
                        reason: DeleteReason::HoldExpired,
                    });
                }
            }
            // Our executor locks an `init` node the moment it created it,
            // before the pass ends: an unlocked one of a request we hold
            // was left by a create whose outcome the store could not
            // report. It would keep the request waiting for ever.
            NodeState::Init
                if n.allocated_to
                    .as_ref()
                    .is_some_and(|r| local.owned_requests.contains_key(r)) =>
            {
                plan.actions.push(Action::DeleteNode {
                    node: rec.id.clone(),
                    reason: DeleteReason::LostInit,
                });
            }
            NodeState::Init if age > INIT_GRACE_SECS => {
                let lost = match n.allocated_to.as_deref() {
                    None => true,
                    Some(r) => idx
                        .request(r)
                        .is_none_or(|i| s.requests[i].request.state != RequestState::Pending),
                };
                if lost {
                    plan.actions.push(Action::DeleteNode {
                        node: rec.id.clone(),
                        reason: DeleteReason::LostInit,
                    });
                }
            }
            _ => {}
        }
        if matches!(plan.actions.get(before), Some(Action::DeleteNode { .. }))
            && idx
                .node_provider(i)
                .is_some_and(|pi| idx.outage[pi].is_some())
        {
            // Its cloud's API is failing and calls to it fail fast: the
            // deletion waits for the provider to recover (retrying it every
            // pass would only fill the log).
            plan.actions.truncate(before);
        }
        match plan.actions.get(before) {
            Some(Action::Deallocate { .. }) => freed.push(i),
            Some(Action::DeleteNode { .. }) => {
                deleted.insert(i);
            }
            _ => {}
        }
    }
    (freed, deleted)
}

/// Whether a ready node's allocation to request `r` no longer holds (the
/// request is gone, failed, or waiting again): the node is a spare once
/// its launcher deallocates it.
fn allocation_lapsed(s: &Snapshot, idx: &Index<'_>, r: &str) -> bool {
    match idx.request(r) {
        None => true,
        Some(i) => matches!(
            s.requests[i].request.state,
            RequestState::Requested | RequestState::Failed
        ),
    }
}

/// Min-ready requests for the labels this launcher owns, and completion of
/// the finished ones it created.
pub(crate) fn min_ready(
    s: &Snapshot,
    cfg: &Config,
    local: &LocalState,
    idx: &Index<'_>,
    reg: &Registry<'_>,
    plan: &mut Plan,
) {
    // Outstanding min-ready requests (a fulfilled one is about to become a
    // ready spare, so it counts too; failed ones do not).
    let mut outstanding: FastMap<Key<'_>, usize> = FastMap::default();
    for &ri in &idx.min_ready_requests {
        let r = &s.requests[ri];
        let req = &r.request;
        if req.state != RequestState::Failed {
            for l in &req.node_types {
                *outstanding.entry(Key(l)).or_default() += 1;
            }
        }
        let mine = r.ephemeral_owner != 0 && r.ephemeral_owner == local.session_id;
        if mine && matches!(req.state, RequestState::Fulfilled | RequestState::Failed) {
            plan.actions.push(Action::CompleteMinReady {
                request: r.id.clone(),
            });
        }
    }
    let wanted: Vec<&crate::config::Label> =
        cfg.labels.iter().filter(|l| l.min_ready > 0).collect();
    if !local.registry_settled || wanted.is_empty() {
        return;
    }
    // Labels some enabled pool of ours could boot now.
    let mut available: FastSet<Key<'_>> = FastSet::default();
    for o in &idx.our_pools {
        if cfg.providers[o.provider].pools[o.pool].is_disabled() {
            continue;
        }
        for (l, info) in &o.labels {
            if info.image.is_some() {
                available.insert(*l);
            }
        }
    }
    // Nodes this pass already deletes or hands to a request are not spares.
    let spoken_for: FastSet<Key<'_>> = plan
        .actions
        .iter()
        .filter_map(|a| match a {
            Action::DeleteNode { node, .. } | Action::Allocate { node, .. } => Some(Key(node)),
            _ => None,
        })
        .collect();
    let mut ready_free: FastMap<Key<'_>, usize> = FastMap::default();
    let mut count_spare = |i: usize| {
        let rec = &s.nodes[i];
        if !spoken_for.contains(&Key(&rec.id)) {
            for l in &rec.node.node_type {
                *ready_free.entry(Key(l)).or_default() += 1;
            }
        }
    };
    for &i in &idx.ready_unallocated {
        count_spare(i);
    }
    // Ready nodes still allocated to a request that is gone (a completed
    // min-ready request whose node could not be deallocated first, by
    // whichever launcher, Python or ours, completed it) are spares as
    // soon as their launcher deallocates them. Counted by nobody, they
    // would be topped up twice. A locked one is not: Zuul locks a node
    // before it deletes the request it accepted.
    for (r, nodes) in &idx.allocations {
        let mut lapsed = None;
        for &i in nodes {
            let rec = &s.nodes[i];
            if rec.locked || rec.node.state != NodeState::Ready {
                continue;
            }
            if *lapsed.get_or_insert_with(|| {
                parse_request_id(r).is_some() && allocation_lapsed(s, idx, r)
            }) {
                count_spare(i);
            }
        }
    }
    for label in wanted {
        let name = Key(&label.name);
        // The registered pools that can boot the label now (ours count
        // before their registration is visible). An owner that cannot
        // (disabled, no image, paused) would leave the label without
        // spares; what each pool can do is read from its component, so
        // every launcher picks the same owner.
        let serving = reg
            .serving(&label.name)
            .filter(|&i| reg.can_launch(i, &label.name));
        let Some(owner) = rendezvous_owner(&label.name, serving.map(|i| reg.id(i))) else {
            continue;
        };
        if !reg.is_ours(owner) || !available.contains(&name) {
            continue;
        }
        let have = ready_free.get(&name).copied().unwrap_or(0)
            + outstanding.get(&name).copied().unwrap_or(0);
        for _ in have..label.min_ready as usize {
            plan.actions.push(Action::CreateMinReady {
                label: label.name.clone(),
            });
        }
    }
}

/// Pending requests nobody holds (their launcher died): reset them. Returns
/// the ready nodes this frees, which the rest of the pass may reuse.
pub(crate) fn lost_requests(s: &Snapshot, idx: &Index<'_>, plan: &mut Plan) -> Vec<usize> {
    let mut freed = Vec::new();
    for &ri in &idx.lost {
        let r = &s.requests[ri];
        plan.actions.push(Action::ResetLost {
            request: r.id.clone(),
        });
        if let Some(nodes) = idx.allocations.get(r.id.as_str()) {
            freed.extend(
                nodes
                    .iter()
                    .copied()
                    .filter(|&i| s.nodes[i].node.state == NodeState::Ready && !s.nodes[i].locked),
            );
        }
    }
    freed
}

/// Unattached floating IPs of providers with `clean-floating-ips` (at
/// once, as Python does: our launches create a floating IP already bound
/// to the server's port, so an unattached one is nobody's) and ports DOWN
/// in two listings `port-cleanup-interval` apart. Providers without a
/// listing this pass keep their recorded DOWN ports.
fn leaked_resources(s: &Snapshot, cfg: &Config, local: &LocalState, plan: &mut Plan) {
    let mut down_ports = local.down_ports.clone();
    // Ports recorded for a provider gone from the configuration (or whose
    // cleanup was turned off) mean nothing any more.
    down_ports.retain(|p, _| {
        cfg.provider(p)
            .is_some_and(|pc| pc.port_cleanup_interval.is_some())
    });
    for p in &cfg.providers {
        let Some(view) = s.providers.get(&p.name) else {
            continue;
        };
        if view.outage.is_some() {
            continue;
        }
        if p.clean_floating_ips
            && let Some(fips) = &view.floating_ips
        {
            for fip in unattached_floating_ips(fips) {
                plan.actions.push(Action::DeleteLeakedResource {
                    provider: p.name.clone(),
                    kind: ResourceKind::FloatingIp,
                    id: fip.id.clone(),
                });
            }
        }
        if let (Some(interval), Some(ports), Some(at)) =
            (p.port_cleanup_interval, &view.ports, view.ports_listed_at)
        {
            let (leaked, next) =
                leaked_ports(ports, at, down_ports.get(&p.name), interval.as_secs_f64());
            for port in leaked {
                plan.actions.push(Action::DeleteLeakedResource {
                    provider: p.name.clone(),
                    kind: ResourceKind::Port,
                    id: port.id.clone(),
                });
            }
            down_ports.insert(p.name.clone(), next);
        }
    }
    plan.down_ports = down_ports;
}

/// Stale lock directories, empty nodes, leaked servers, floating IPs and
/// ports.
pub(crate) fn housekeeping(
    s: &Snapshot,
    cfg: &Config,
    now: f64,
    local: &LocalState,
    idx: &Index<'_>,
    plan: &mut Plan,
) {
    for d in &s.request_lock_dirs {
        if !d.locked
            && idx.request(&d.id).is_none()
            && now - d.mtime_ms as f64 / 1000.0 > REQUEST_LOCK_CLEANUP_SECS
        {
            plan.actions.push(Action::DeleteRequestLockDir {
                request: d.id.clone(),
            });
        }
    }
    for id in &s.empty_nodes {
        plan.actions
            .push(Action::DeleteEmptyNode { node: id.clone() });
    }
    leaked_resources(s, cfg, local, plan);

    // Leaked servers (the leak rule of `leaks`), deleted when the previous
    // check found them leaked too: one listing may race a launch that has
    // not recorded its server yet, or a deletion.
    let mut suspects = BTreeSet::new();
    let checked: FastSet<&str> = s
        .providers
        .iter()
        .filter(|(_, v)| v.instances.is_some())
        .map(|(p, _)| p.as_str())
        .collect();
    if checked.is_empty() && local.leak_suspects.is_empty() {
        return;
    }
    let known = KnownNodes::new(&s.nodes).with_uploads(&s.images.uploads);
    for p in &cfg.providers {
        let Some(instances) = s.providers.get(&p.name).and_then(|v| v.instances.as_ref()) else {
            continue;
        };
        for leak in leaked_servers(&p.name, instances, &known) {
            let key = (p.name.clone(), leak.instance.external_id.clone());
            if local.leak_suspects.contains(&key) {
                plan.actions.push(Action::DeleteLeakedInstance {
                    provider: key.0.clone(),
                    external_id: key.1.clone(),
                });
            }
            suspects.insert(key);
        }
    }
    // Spares whose server is gone from the cloud (deleted out of band, or
    // by a launcher that lost track of it): handing one out would give
    // Zuul a dead node.
    // The index's copy of lock, state and provider first: most nodes are
    // not free spares, and most passes have no listing to compare with.
    for (i, rec) in s.nodes.iter().enumerate() {
        if idx.node_locked(i) || idx.node_state(i) != (NodeState::Ready, false) {
            continue;
        }
        // A node of a provider we have (by name) is one of ours.
        let Some(pi) = idx.node_provider(i) else {
            continue;
        };
        let Some(view) = s.providers.get(&cfg.providers[pi].name) else {
            continue;
        };
        let n = &rec.node;
        let (Some(instances), Some(listed_at), Some(server)) =
            (&view.instances, view.instances_listed_at, &n.external_id)
        else {
            continue;
        };
        // A static host is no server: its provider lists none.
        if matches!(cfg.providers[pi].driver, crate::config::Driver::Static(_))
            || n.state_time > listed_at - SERVER_GONE_MARGIN_SECS
        {
            continue;
        }
        if !instances.iter().any(|inst| &inst.external_id == server) {
            plan.actions.push(Action::DeleteNode {
                node: rec.id.clone(),
                reason: DeleteReason::ServerGone,
            });
        }
    }
    // Providers not checked this pass keep their suspects for next time.
    for key in &local.leak_suspects {
        if !checked.contains(key.0.as_str()) {
            suspects.insert(key.clone());
        }
    }
    plan.leak_suspects = suspects;
}
