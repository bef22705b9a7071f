//! Request pickup (reference §2.3), decline (§2.4) and fulfilment (§2.5).

use super::fast::{FastMap, FastSet, Key};
use super::index::{ImageRef, Index, OurPool, node_resources};
use super::queue::sort_queue;
use super::quota::{QuotaBlock, QuotaState};
use super::registry::{PoolSet, Registry, sequence_key, set_key};
use super::rendezvous_owner;
use super::summary::RequestSummary;
use super::{
    Action, DeleteReason, LocalState, Plan, PoolKey, PoolStatus, Snapshot, request_order_key,
};
use crate::config::Config;
use crate::model::{NodeState, RequestState, Resources};
use crate::store::RequestRecord;

/// How long another launcher's preferred request is left to it.
pub const HANDOFF_SECS: f64 = 5.0;

/// Why one of our pools declines a request, if it does.
fn decline_reason(
    cfg: &Config,
    quota: &QuotaState,
    pos: usize,
    ours: &OurPool,
    req: &RequestRecord,
) -> Option<String> {
    let provider = &cfg.providers[ours.provider];
    let pool = &provider.pools[ours.pool];
    if pool.is_disabled() {
        return Some("pool is disabled".into());
    }
    if provider.max_concurrency == Some(0) {
        return Some("provider handles no requests (max-concurrency 0)".into());
    }
    // The quota of the whole node set: borrowed for one node, summed
    // into a copy of the first node's for more.
    let mut one: Option<&Resources> = None;
    let mut total: Option<Resources> = None;
    for label in &req.request.node_types {
        let Some(info) = ours.labels.get(&Key(label)) else {
            return Some(format!("label {label} is not supported"));
        };
        if info.image.is_none() {
            return Some(format!("no image available for label {label}"));
        }
        match (&mut total, one) {
            (Some(t), _) => t.add(&info.resources),
            (None, Some(first)) => {
                let mut t = first.clone();
                t.add(&info.resources);
                total = Some(t);
            }
            (None, None) => one = Some(&info.resources),
        }
    }
    let fit = match (&total, one) {
        (Some(t), _) => quota.could_ever_fit(pos, t),
        (None, Some(r)) => quota.could_ever_fit(pos, r),
        (None, None) => quota.could_ever_fit(pos, &Resources::new()),
    };
    match fit {
        Ok(()) => None,
        Err(QuotaBlock::Pool(q)) => Some(format!("request can never fit the pool's {q} limit")),
        Err(QuotaBlock::Cloud(q)) => Some(format!("request can never fit the cloud's {q} quota")),
        Err(QuotaBlock::Tenant(_)) => None,
    }
}

/// Per-pass mutable state.
struct Pass<'p, 'a, 'r> {
    s: &'a Snapshot,
    cfg: &'p Config,
    idx: &'p Index<'a>,
    reg: &'p Registry<'r>,
    quota: &'p mut QuotaState,
    plan: &'p mut Plan,
    /// Nodes allocated or evicted this pass.
    taken: FastSet<usize>,
    /// Our pools paused this pass (by our-pool position).
    paused: Vec<bool>,
    /// Registered pools that take no requests now: other launchers' paused
    /// pools and our pools paused this pass.
    paused_reg: PoolSet,
    /// Launches planned this pass per provider position.
    launches: Vec<usize>,
    /// Our pools that evicted a node this pass.
    evicted: Vec<bool>,
    addressable: Vec<usize>,
}

enum Progress {
    Done,
    Waiting,
    Paused,
    Declined,
}

impl Pass<'_, '_, '_> {
    fn concurrency_ok(&self, ours: &OurPool) -> bool {
        let provider = &self.cfg.providers[ours.provider];
        match provider.max_concurrency {
            None => true,
            Some(limit) => {
                let now = self.idx.in_flight[ours.provider] + self.launches[ours.provider];
                now < limit as usize
            }
        }
    }

    fn pause(&mut self, pos: usize) {
        self.paused[pos] = true;
        let i = self.reg.ours[pos];
        // The registered pool's state is that of the pool it maps back to.
        if self.reg.our_pos[i] == Some(pos) {
            self.paused_reg.insert(i);
        }
    }

    /// A request we hold on a pool whose provider is unavailable goes back
    /// to the queue once nothing of it is in flight there (the breaker cuts
    /// launches short within seconds). It is not declined: declines by
    /// every pool fail a request, and an outage is not the request's fault.
    /// Another provider may take it, or it waits for this one to recover.
    fn hand_back(&mut self, pos: usize, req: &RequestRecord, outage: &super::ProviderOutage) {
        let ours = &self.idx.our_pools[pos];
        let nodes = &self.s.nodes;
        let in_flight = self
            .idx
            .allocations
            .get(req.id.as_str())
            .into_iter()
            .flatten()
            .any(|&i| {
                let n = &nodes[i].node;
                n.provider == ours.key.provider
                    && n.pool == ours.key.pool
                    && match n.state {
                        NodeState::Init | NodeState::Building => true,
                        NodeState::Ready => nodes[i].locked,
                        _ => false,
                    }
            });
        if in_flight {
            return;
        }
        self.plan.actions.push(Action::HandBack {
            request: req.id.clone(),
            reason: format!(
                "provider {} is unavailable: {}",
                ours.key.provider, outage.reason
            ),
        });
    }

    fn fail_if_all_declined(&self, req: &RequestRecord, extra: &[usize]) -> bool {
        let mut declined = self.reg.declined(req);
        for &i in extra {
            declined.insert(i);
        }
        declined.is_superset(&self.reg.all)
    }

    /// Plans the next steps of a request this launcher holds. A request
    /// accepted in this very pass (`fresh`) has no allocations of its own
    /// yet: nodes still pointing at it are leftovers that cleanup frees.
    fn fulfil(&mut self, pos: usize, req: &RequestRecord, fresh: bool) -> Progress {
        let ours = &self.idx.our_pools[pos];
        let provider = &self.cfg.providers[ours.provider];
        let pool = &provider.pools[ours.pool];
        let r = &req.request;
        let nodes = &self.s.nodes;
        let allocated: Vec<usize> = self
            .idx
            .allocations
            .get(req.id.as_str())
            .filter(|_| !fresh)
            .map(|v| {
                v.iter()
                    .copied()
                    .filter(|&i| {
                        let n = &nodes[i].node;
                        n.provider == ours.key.provider
                            && n.pool == ours.key.pool
                            && !matches!(n.state, NodeState::Deleting | NodeState::Deleted)
                    })
                    .collect()
            })
            .unwrap_or_default();
        // A ready node that is still locked is one our launch task marked
        // ready a moment ago and has not unlocked yet (nobody else locks
        // nodes of a pending request): still in flight, not missing.
        let busy = |i: usize| match nodes[i].node.state {
            NodeState::Init | NodeState::Building => true,
            NodeState::Ready => nodes[i].locked,
            _ => false,
        };
        let in_flight = allocated.iter().any(|&i| busy(i));
        let failed = allocated
            .iter()
            .any(|&i| nodes[i].node.state == NodeState::Failed);
        let mut usable: Vec<usize> = allocated
            .iter()
            .copied()
            .filter(|&i| {
                matches!(
                    nodes[i].node.state,
                    NodeState::Ready | NodeState::Init | NodeState::Building
                )
            })
            .collect();
        // Ready first, so a slot is filled by a finished node when it can be.
        usable.sort_by_key(|&i| (nodes[i].node.state != NodeState::Ready, nodes[i].id.clone()));

        if failed {
            if in_flight {
                return Progress::Waiting;
            }
            let ready: Vec<String> = usable
                .iter()
                .filter(|&&i| nodes[i].node.state == NodeState::Ready)
                .map(|&i| nodes[i].id.clone())
                .collect();
            let reg_idx = self.reg.ours[pos];
            let fail = self.fail_if_all_declined(req, &[reg_idx]);
            self.plan.actions.push(Action::Decline {
                request: req.id.clone(),
                by: vec![ours.id.clone()],
                fail,
                deallocate: ready,
                reason: "a node launch failed".into(),
            });
            return Progress::Declined;
        }

        // Fill slots in node_types order with allocated nodes.
        let mut slots: Vec<Option<usize>> = vec![None; r.node_types.len()];
        let mut used = vec![false; usable.len()];
        for (slot, label) in r.node_types.iter().enumerate() {
            if let Some(k) =
                (0..usable.len()).find(|&k| !used[k] && nodes[usable[k]].node.has_label(label))
            {
                used[k] = true;
                slots[slot] = Some(usable[k]);
            }
        }
        for (k, &i) in usable.iter().enumerate() {
            if !used[k] && nodes[i].node.state == NodeState::Ready {
                self.plan.actions.push(Action::Deallocate {
                    node: nodes[i].id.clone(),
                });
            }
        }
        let mut az: Option<String> = slots
            .iter()
            .flatten()
            .find_map(|&i| nodes[i].node.az.clone());

        for slot in 0..slots.len() {
            if slots[slot].is_some() {
                continue;
            }
            let label = r.node_types[slot].as_str();
            if r.reuse
                && let Some(&i) = self.idx.ready_free.get(&(pos, label)).and_then(|v| {
                    v.iter().find(|&&i| {
                        !self.taken.contains(&i)
                            && (az.is_none()
                                || nodes[i].node.az.is_none()
                                || nodes[i].node.az == az)
                    })
                })
            {
                self.taken.insert(i);
                if az.is_none() {
                    az = nodes[i].node.az.clone();
                }
                slots[slot] = Some(i);
                // A freed node's old tenant was already uncharged.
                let old = if self.idx.freed.contains(&i) {
                    None
                } else {
                    nodes[i].node.tenant_name.as_deref()
                };
                self.quota
                    .retag(old, r.tenant_name.as_deref(), &node_resources(self.s, i));
                self.plan.actions.push(Action::Allocate {
                    request: req.id.clone(),
                    node: nodes[i].id.clone(),
                });
                continue;
            }
            let Some(info) = ours.labels.get(&Key(label)) else {
                return Progress::Waiting;
            };
            let Some(image) = info.image.and_then(ImageRef::to_launch_image) else {
                return Progress::Waiting;
            };
            if !self.concurrency_ok(ours) {
                return Progress::Waiting;
            }
            let need = info.resources.clone().into_owned();
            match self.quota.can_launch(pos, r.tenant_name.as_deref(), &need) {
                Ok(()) => {
                    if az.is_none() {
                        az = choose_az(self.s, pool, &provider.name, &req.id);
                    }
                    self.quota.add(pos, r.tenant_name.as_deref(), &need);
                    self.launches[ours.provider] += 1;
                    tracing::trace!(
                        request = %req.id,
                        fresh,
                        slot,
                        allocated = ?allocated.iter().map(|&i| (&nodes[i].id, nodes[i].node.state)).collect::<Vec<_>>(),
                        "planning a launch"
                    );
                    self.plan.actions.push(Action::Launch {
                        request: req.id.clone(),
                        pool: ours.key.clone(),
                        label: label.to_owned(),
                        image,
                        az: az.clone(),
                        resources: need,
                    });
                }
                Err(block) => {
                    if r.is_min_ready() {
                        if in_flight {
                            return Progress::Waiting;
                        }
                        let ready: Vec<String> = slots
                            .iter()
                            .flatten()
                            .filter(|&&i| nodes[i].node.state == NodeState::Ready)
                            .map(|&i| nodes[i].id.clone())
                            .collect();
                        let reg_idx = self.reg.ours[pos];
                        let fail = self.fail_if_all_declined(req, &[reg_idx]);
                        self.plan.actions.push(Action::Decline {
                            request: req.id.clone(),
                            by: vec![ours.id.clone()],
                            fail,
                            deallocate: ready,
                            reason: format!("min-ready request at quota ({block:?})"),
                        });
                        return Progress::Declined;
                    }
                    self.pause(pos);
                    if !matches!(block, QuotaBlock::Tenant(_)) {
                        self.evict(pos);
                    }
                    return Progress::Paused;
                }
            }
        }
        let all_ready = slots.iter().all(|s| {
            s.is_some_and(|i| nodes[i].node.state == NodeState::Ready && !nodes[i].locked)
        });
        if all_ready && !in_flight {
            self.plan.actions.push(Action::Fulfill {
                request: req.id.clone(),
                nodes: slots
                    .iter()
                    .flatten()
                    .map(|&i| nodes[i].id.clone())
                    .collect(),
            });
            return Progress::Done;
        }
        Progress::Waiting
    }

    /// Frees quota for a waiting request by deleting the oldest unused ready
    /// node of the pool — unless a deletion there is already under way.
    fn evict(&mut self, pos: usize) {
        if self.evicted[pos] || self.idx.deleting_in_pool[pos] > 0 {
            return;
        }
        if let Some(&i) = self.idx.ready_free_in_pool[pos]
            .iter()
            .find(|&&i| !self.taken.contains(&i))
        {
            self.taken.insert(i);
            self.evicted[pos] = true;
            self.plan.actions.push(Action::DeleteNode {
                node: self.s.nodes[i].id.clone(),
                reason: DeleteReason::Evicted,
            });
        }
    }
}

/// A deterministic AZ for a node set: spread by request id over the pool's
/// (or else the cloud's) zones; `None` lets the cloud choose.
fn choose_az(
    s: &Snapshot,
    pool: &crate::config::Pool,
    provider: &str,
    request: &str,
) -> Option<String> {
    let zones: &[String] = if pool.availability_zones.is_empty() {
        s.providers
            .get(provider)
            .map(|v| v.availability_zones.as_slice())
            .unwrap_or(&[])
    } else {
        &pool.availability_zones
    };
    if zones.is_empty() {
        return None;
    }
    let h = super::rendezvous::fnv1a(request.as_bytes());
    Some(zones[(h % zones.len() as u64) as usize].clone())
}

/// `prefix` followed by a request's labels as a set, written like
/// `{"a", "b"}` (the `Debug` of a `BTreeSet`, without building one and
/// formatting it for every unservable request).
fn with_label_set(prefix: &str, labels: &[String]) -> String {
    use std::fmt::Write;
    let mut sorted: Vec<&str> = labels.iter().map(String::as_str).collect();
    sorted.sort_unstable();
    sorted.dedup();
    let len = sorted.iter().map(|l| l.len() + 4).sum::<usize>();
    let mut out = String::with_capacity(prefix.len() + len + 2);
    out.push_str(prefix);
    out.push('{');
    for (k, l) in sorted.iter().enumerate() {
        if k > 0 {
            out.push_str(", ");
        }
        // `Debug` leaves printable ASCII other than quote and backslash as is.
        if l.bytes()
            .all(|b| (b' '..=b'~').contains(&b) && b != b'"' && b != b'\\')
        {
            out.push('"');
            out.push_str(l);
            out.push('"');
        } else {
            // Writing to a String cannot fail.
            let _ = write!(out, "{l:?}");
        }
    }
    out.push('}');
    out
}

/// Plans every request-related action of this pass.
#[allow(clippy::too_many_arguments)]
pub(crate) fn plan_requests<'a>(
    s: &'a Snapshot,
    cfg: &Config,
    now: f64,
    local: &LocalState,
    idx: &Index<'a>,
    reg: &Registry<'_>,
    quota: &mut QuotaState,
    plan: &mut Plan,
) {
    let our_by_key: FastMap<&PoolKey, usize> = idx
        .our_pools
        .iter()
        .enumerate()
        .map(|(i, o)| (&o.key, i))
        .collect();
    let mut pass = Pass {
        s,
        cfg,
        idx,
        reg,
        quota,
        plan,
        taken: FastSet::default(),
        paused: vec![false; idx.our_pools.len()],
        paused_reg: reg.others_paused.clone(),
        launches: vec![0; cfg.providers.len()],
        evicted: vec![false; idx.our_pools.len()],
        addressable: vec![0; idx.our_pools.len()],
    };
    // Pools of an unavailable provider are paused from the start: they
    // take nothing, and other pools (ours, other launchers') take the
    // requests they would have.
    for pos in 0..idx.our_pools.len() {
        if idx.outage[idx.our_pools[pos].provider].is_some() {
            pass.pause(pos);
        }
    }

    // 1. Requests we hold, most urgent first (Nodepool re-runs paused
    //    handlers before taking new requests).
    let mut owned: Vec<(&String, &PoolKey)> = local.owned_requests.iter().collect();
    owned.sort_by_cached_key(|(id, _)| {
        let rp = idx
            .request(id)
            .map(|i| s.requests[i].request.relative_priority)
            .unwrap_or(0);
        request_order_key(id, rp)
    });
    for (id, key) in owned {
        let Some(ri) = idx.request(id) else {
            pass.plan.actions.push(Action::Release {
                request: id.clone(),
            });
            continue;
        };
        let req = &s.requests[ri];
        let Some(&pos) = our_by_key.get(key) else {
            pass.plan.actions.push(Action::Release {
                request: id.clone(),
            });
            continue;
        };
        if req.request.state != RequestState::Pending {
            pass.plan.actions.push(Action::Release {
                request: id.clone(),
            });
            continue;
        }
        if let Some(outage) = idx.outage[idx.our_pools[pos].provider] {
            pass.hand_back(pos, req, outage);
            continue;
        }
        pass.fulfil(pos, req, false);
    }

    // 2. New requests, in priority / relative priority / FIFO order.
    if idx.our_pools.is_empty() {
        return;
    }
    let mut waiting: Vec<(&RequestRecord, &RequestSummary)> = idx
        .waiting
        .iter()
        .zip(&idx.waiting_summaries)
        .map(|(&i, sum)| (&s.requests[i], sum))
        .collect();
    sort_queue(&mut waiting, |(r, sum)| {
        (r.id.as_str(), sum.relative_priority)
    });
    // The registry's number of each label the summaries number.
    let label_numbers: Vec<Option<usize>> =
        idx.request_labels.iter().map(|l| reg.label_id(l)).collect();

    // Scratch space reused for every request: a backlog runs this loop
    // thousands of times per pass.
    let mut declined = reg.none.clone();
    let mut cand = reg.none.clone();
    let mut of_provider = reg.none.clone();
    // Positions of our pools that may take the request, in pickup order
    // (registered pools are numbered so that a set lists ours in that
    // order: sorting them for every waiting request was a tenth of a pass).
    let mut eligible: Vec<usize> = Vec::new();
    let mut unpaused = reg.none.clone();
    let mut others = reg.none.clone();
    let mut ours = reg.none.clone();
    let mut decliners: Vec<(usize, String)> = Vec::new();
    let mut ids: Vec<usize> = Vec::new();
    let mut fail_reasons: FastMap<u128, String> = FastMap::default();
    let mut decline_reasons: FastMap<(usize, u128), Option<String>> = FastMap::default();
    for (req, sum) in waiting {
        // The record is read only where the summary says it matters.
        let r = &req.request;
        if !sum.plain
            && let Some(reason) = r.invalid_reason()
        {
            pass.plan.actions.push(Action::Fail {
                request: req.id.clone(),
                reason,
            });
            continue;
        }
        if sum.plain {
            declined.clear();
        } else {
            reg.declined_into(req, &mut declined);
        }
        if declined.is_superset(&reg.all) {
            pass.plan.actions.push(Action::Fail {
                request: req.id.clone(),
                reason: "every registered pool declined it".into(),
            });
            continue;
        }
        let known = match sum.labels() {
            Some(labels) => {
                ids.clear();
                labels.iter().all(|&k| match label_numbers[k as usize] {
                    Some(id) => {
                        ids.push(id);
                        true
                    }
                    None => false,
                })
            }
            None => reg.label_ids_into(&r.node_types, &mut ids),
        };
        if known {
            reg.candidates_into(&ids, &declined, &mut cand);
        } else {
            cand.clear();
        }
        if cand.is_empty() {
            let why = |labels: &[String]| with_label_set("no registered pool can serve ", labels);
            // A backlog holds many requests for the same unservable set.
            let reason = match set_key(&ids).filter(|_| known) {
                Some(k) => fail_reasons
                    .entry(k)
                    .or_insert_with(|| why(&r.node_types))
                    .clone(),
                None => why(&r.node_types),
            };
            pass.plan.actions.push(Action::Fail {
                request: req.id.clone(),
                reason,
            });
            continue;
        }
        // Whether a pool declines depends only on the pool and the labels
        // in order (not on usage), so it is the same for the whole pass.
        let labels_key = sequence_key(&ids);
        let mut cand = &cand;
        if !sum.plain
            && let Some(p) = &r.provider
        {
            of_provider.clear();
            let mut usable = false;
            for i in cand.iter() {
                if reg.pools[i].provider == p {
                    of_provider.insert(i);
                    usable |= !reg.pools[i].unavailable;
                }
            }
            // The preferred provider is no place to wait while its API is
            // failing: the preference holds only while one of its pools is
            // available.
            if usable {
                cand = &of_provider;
            }
        }
        // The best priority among other launchers' unpaused candidates, and
        // among all unpaused candidates (in a backlog every pool is paused
        // and these sets are empty).
        let any_unpaused = reg.split(
            cand,
            &pass.paused_reg,
            &mut unpaused,
            &mut others,
            &mut ours,
        );
        let best = unpaused.iter().map(|i| reg.pools[i].priority).min();
        let best_other = others.iter().map(|i| reg.pools[i].priority).min();
        eligible.clear();
        eligible.extend(
            ours.iter()
                .filter_map(|i| reg.our_pos[i])
                .filter(|&pos| best_other.is_none_or(|b| idx.our_pools[pos].priority <= b)),
        );
        if eligible.is_empty() {
            continue;
        }
        // Spread requests over the best unpaused candidates, ours and other
        // launchers' alike: each request has one preferred pool
        // (rendezvous hashing on its id), so equal launchers share the load
        // instead of racing for every lock. Another launcher's preferred
        // request is left to it for a short hand-off time, after which
        // anyone may take it (its owner may be stuck or gone).
        let preferred = best.and_then(|best| {
            rendezvous_owner(
                &req.id,
                unpaused
                    .iter()
                    .filter(|&i| reg.pools[i].priority == best)
                    .map(|i| reg.ids[i]),
            )
            .and_then(|id| reg.by_id.get(id).copied())
        });
        if let Some(p) = preferred
            && reg.our_pos[p].is_none()
            && now - sum.state_time < HANDOFF_SECS
        {
            continue;
        }
        let preferred_pos = preferred.and_then(|p| reg.our_pos[p]);
        // The preferred pool first, then by priority and position.
        if let Some(first) = preferred_pos
            && let Some(k) = eligible.iter().position(|&pos| pos == first)
        {
            eligible[..=k].rotate_right(1);
        }
        for &pos in &eligible {
            pass.addressable[pos] += 1;
        }

        // A paused pool is blocked; with none of ours unpaused, nothing
        // after the first wait can take the request.
        decliners.clear();
        let mut taker = None;
        let mut deferred = false;
        for &pos in &eligible {
            if deferred && !any_unpaused {
                break;
            }
            let blocked = pass.paused[pos] || !pass.concurrency_ok(&idx.our_pools[pos]);
            // Once the request waits anyway, a blocked pool's verdict changes
            // nothing: skip it (a backlog would otherwise re-check every
            // paused pool for every waiting request).
            if blocked && deferred {
                continue;
            }
            let verdict =
                |quota: &QuotaState| decline_reason(cfg, quota, pos, &idx.our_pools[pos], req);
            let declines = match labels_key {
                Some(k) => decline_reasons
                    .entry((pos, k))
                    .or_insert_with(|| verdict(pass.quota))
                    .clone(),
                None => verdict(pass.quota),
            };
            if let Some(reason) = declines {
                decliners.push((pos, reason));
                continue;
            }
            if blocked {
                deferred = true;
                continue;
            }
            let tenant_blocked = !sum.plain && r.tenant_name.is_some() && {
                let mut total = Resources::new();
                for l in &r.node_types {
                    if let Some(info) = idx.our_pools[pos].labels.get(&Key(l)) {
                        total.add(&info.resources);
                    }
                }
                pass.quota
                    .tenant_fits(r.tenant_name.as_deref(), &total)
                    .is_err()
            };
            if tenant_blocked {
                deferred = true;
                continue;
            }
            taker = Some(pos);
            break;
        }
        match taker {
            Some(pos) => {
                pass.plan.actions.push(Action::Accept {
                    request: req.id.clone(),
                    pool: idx.our_pools[pos].key.clone(),
                });
                pass.fulfil(pos, req, true);
            }
            None if !deferred && !decliners.is_empty() => {
                let regs: Vec<usize> = decliners.iter().map(|(pos, _)| reg.ours[*pos]).collect();
                let fail = pass.fail_if_all_declined(req, &regs);
                pass.plan.actions.push(Action::Decline {
                    request: req.id.clone(),
                    by: decliners
                        .iter()
                        .map(|(pos, _)| idx.our_pools[*pos].id.clone())
                        .collect(),
                    fail,
                    deallocate: Vec::new(),
                    reason: decliners
                        .iter()
                        .map(|(pos, why)| format!("{}: {why}", idx.our_pools[*pos].key))
                        .collect::<Vec<_>>()
                        .join("; "),
                });
            }
            None => {}
        }
    }

    for (pos, ours) in idx.our_pools.iter().enumerate() {
        pass.plan.pools.push(PoolStatus {
            pool: ours.key.clone(),
            paused: pass.paused[pos],
            addressable_requests: pass.addressable[pos],
            launchable: ours.launchable.iter().map(|l| (*l).to_owned()).collect(),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::with_label_set;
    use std::collections::BTreeSet;

    #[test]
    fn label_sets_read_like_btree_sets() {
        for labels in [
            vec![],
            vec!["b", "a", "b"],
            vec!["quote\"d", "back\\slash", "\u{1f600}", "tab\t", "~ok ok"],
        ] {
            let owned: Vec<String> = labels.iter().map(|l| l.to_string()).collect();
            let set: BTreeSet<&String> = owned.iter().collect();
            assert_eq!(with_label_set("x ", &owned), format!("x {set:?}"));
        }
    }
}
