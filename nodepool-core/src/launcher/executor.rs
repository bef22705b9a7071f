//! Executes a plan's actions against the store and the clouds.
//!
//! Request actions run in plan order; once one action of a request fails
//! (another launcher won the lock, the request changed underneath), the
//! rest of that request's actions are skipped — the next pass re-plans
//! from the new state. Every write is version-checked or made under the
//! record's lock, through the store's lock combinators
//! ([`Store::with_locked`] and its parts). Launches and deletions become
//! tasks holding the node lock.

use super::tasks::{self, LaunchJob};
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};

use futures::stream::{self, StreamExt};
use tokio_util::task::TaskTracker;

use super::providers::ProviderHandle;
use super::{Clock, Owned, Shared};
use crate::config::Config;
use crate::model::{
    ComponentKind, MIN_READY_PRIORITY, MIN_READY_REQUESTOR, Node, NodeRequest, NodeState,
    RequestState, WireRecord,
};
use crate::planner::{self, PoolKey};
use crate::planner::{Action, DeleteReason, LaunchImage, Plan, Snapshot};
use crate::store::{
    Decision, LockGuard, LockOf, LockWait, RecordKey, RequestRecord, Store, StoreError, Versioned,
    paths,
};

/// Why an action was not carried out: mostly, the state moved on since
/// the snapshot (another launcher won a lock, Zuul withdrew a request).
/// Either way the next pass re-plans from the new state.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ActionError {
    /// The store refused or failed.
    #[error("{0}")]
    Store(#[from] StoreError),
    /// The plan named a pool this launcher no longer has.
    #[error("unknown pool {0}")]
    UnknownPool(PoolKey),
    /// The plan named a provider this launcher could not set up.
    #[error("provider {0} is not available")]
    NoProvider(String),
    /// The label is gone from the pool's configuration.
    #[error("label no longer configured")]
    LabelGone,
    /// The request is not held by this launcher.
    #[error("request not held")]
    NotHeld,
    /// The request record is gone.
    #[error("request vanished")]
    RequestVanished,
    /// The request was taken or changed before we could accept or fail it.
    #[error("request no longer waiting")]
    RequestNotWaiting,
    /// The request left `pending` under us.
    #[error("request is not pending")]
    RequestNotPending,
    /// The node record is gone.
    #[error("node vanished")]
    NodeVanished,
    /// The node was allocated or changed state before we could allocate it.
    #[error("node no longer free")]
    NodeTaken,
    /// The node no longer meets the reason it was to be deleted for.
    #[error("node changed")]
    NodeChanged,
}

/// What executing actions needs; cheap to clone, shared by concurrent groups.
pub(crate) struct ExecContext {
    pub shared: Arc<Shared>,
    pub owned: Arc<Mutex<HashMap<String, Owned>>>,
    pub providers: BTreeMap<String, Arc<ProviderHandle>>,
    pub pool_ids: BTreeMap<PoolKey, String>,
    pub config: Arc<Config>,
    pub tasks: TaskTracker,
}

impl ExecContext {
    fn owned(&self) -> std::sync::MutexGuard<'_, HashMap<String, Owned>> {
        self.owned.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Remembers a node allocated or launched for a held request, for
    /// [`fulfil_if_complete`].
    fn note_node(&self, request: &str, node: &str) {
        if let Some(o) = self.owned().get_mut(request) {
            o.nodes.push(node.to_owned());
        }
    }
}

/// Fulfils a request this launcher holds if its nodes are all ready now.
/// Called by a launch task once its node is ready and unlocked, so a
/// request does not wait for the next planning pass (which, in a burst,
/// may be accepting hundreds of other requests). The planner's `Fulfill`
/// stays the rule for everything else (reused ready nodes, a restart);
/// whichever takes the request out of the held map first fulfils it.
///
/// `launched` is the caller's node as it wrote it `ready`: it is not read
/// back (one round trip fewer per request); the request's other nodes are.
pub(crate) async fn fulfil_if_complete(shared: &Shared, request: &str, launched: (&str, &Node)) {
    let (labels, ids) = {
        let owned = shared.owned.lock().unwrap_or_else(|p| p.into_inner());
        let Some(o) = owned.get(request) else {
            return;
        };
        let launching = shared.launching.lock().unwrap_or_else(|p| p.into_inner());
        if o.nodes.len() < o.labels.len() || o.nodes.iter().any(|n| launching.contains(n)) {
            return;
        }
        (o.labels.clone(), o.nodes.clone())
    };
    let store = &shared.store;
    let mut nodes = Vec::with_capacity(ids.len());
    for id in &ids {
        if id == launched.0 {
            nodes.push((id.as_str(), launched.1.clone()));
            continue;
        }
        match store.get_node(id).await {
            Ok(Some(v)) => nodes.push((id.as_str(), v.value)),
            Ok(None) => {}
            // The next pass decides from a fresh snapshot.
            Err(_) => return,
        }
    }
    let candidates: Vec<(&str, &Node)> = nodes.iter().map(|(id, n)| (*id, n)).collect();
    let Some(slots) = planner::fulfilment::complete_allocation(request, &labels, &candidates)
    else {
        return;
    };
    // Taken out first: the map's lock must not be held across an await,
    // and a pass that planned `Fulfill` meanwhile finds it gone.
    let Some(owned) = shared
        .owned
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .remove(request)
    else {
        return;
    };
    let fulfilled = fulfil(store, &owned, request, &slots, shared.settings.clock).await;
    owned.guard.release_logged().await;
    match fulfilled {
        Ok(()) => {
            shared
                .status
                .fulfilled_on_ready
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            tracing::info!(request = %request, nodes = ?slots, "request fulfilled");
        }
        // The next pass re-plans it from the new state.
        Err(e) => tracing::debug!(request = %request, error = %e, "request not fulfilled"),
    }
}

/// Writes a launched node `ready` and, when it is the last node its
/// request waits for, fulfils the request in the same transaction: the
/// node's `ready`, the release of its lock, the request's `fulfilled` (at
/// the version our `pending` write made) and the release of the request's
/// lock, one round trip where there were four. Zuul sees the request
/// fulfilled and its nodes ready and unlocked at once, as Python
/// Nodepool's order (nodes first, then the request) would leave them.
///
/// Returns the node's new version when that was done (both locks are
/// released: the caller forgets its node guard). `None` when the caller is
/// to write `ready` and release as usual, [`fulfil_if_complete`] then
/// deciding about the request: the request is not complete or not ours,
/// the store has no transactions, or the transaction failed (the request
/// changed since we accepted it, the node under us) and nothing was
/// written.
pub(crate) async fn fulfil_with_ready(
    shared: &Shared,
    request: &str,
    launched: (&str, &Node, i32),
    node_guard: &LockGuard,
) -> Option<i32> {
    let (node_id, node, version) = launched;
    let (labels, ids) = {
        let owned = shared.owned.lock().unwrap_or_else(|p| p.into_inner());
        let o = owned.get(request)?;
        let launching = shared.launching.lock().unwrap_or_else(|p| p.into_inner());
        if o.nodes.len() < o.labels.len()
            || o.nodes
                .iter()
                .any(|n| n != node_id && launching.contains(n))
        {
            return None;
        }
        (o.labels.clone(), o.nodes.clone())
    };
    let store = &shared.store;
    let mut nodes = Vec::with_capacity(ids.len());
    for id in &ids {
        if id == node_id {
            nodes.push((id.as_str(), node.clone()));
            continue;
        }
        match store.get_node(id).await {
            Ok(Some(v)) => nodes.push((id.as_str(), v.value)),
            Ok(None) => {}
            Err(_) => return None,
        }
    }
    let candidates: Vec<(&str, &Node)> = nodes.iter().map(|(id, n)| (*id, n)).collect();
    let slots = planner::fulfilment::complete_allocation(request, &labels, &candidates)?;
    // Taken out first, as in `fulfil_if_complete`: whoever takes it fulfils.
    let owned = shared
        .owned
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .remove(request)?;
    let mut req = owned.accepted.value.clone();
    req.nodes = slots.clone();
    req.set_state(RequestState::Fulfilled, shared.now());
    let (node_path, request_path) = (paths::node(node_id), paths::request(request));
    let (node_json, request_json) = (node.to_json(), req.to_json());
    let written = store
        .write_and_release(
            &[
                (&node_path, &node_json, version),
                (&request_path, &request_json, owned.accepted.version),
            ],
            &[node_guard, &owned.guard],
        )
        .await;
    match written {
        Ok(Some(versions)) => {
            owned.guard.forget();
            shared
                .status
                .fulfilled_on_ready
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            tracing::info!(request = %request, nodes = ?slots, "request fulfilled");
            versions.first().copied()
        }
        other => {
            if let Err(e) = other {
                tracing::debug!(request = %request, node = %node_id, error = %e, "ready and fulfilled not written together; one at a time");
            }
            shared
                .owned
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(request.to_owned(), owned);
            None
        }
    }
}

/// Requests handled at once: each costs a few sequential store round trips.
const CONCURRENT_GROUPS: usize = super::REQUESTS_IN_FLIGHT;

/// Runs a plan: first what frees nodes (so requests can reuse them), then
/// every request's actions (concurrently across requests, in order within
/// one), then the rest.
pub(crate) async fn execute(ctx: ExecContext, snapshot: &Snapshot, plan: &Plan) {
    let mut first = Vec::new();
    let mut groups: Vec<(String, Vec<&Action>)> = Vec::new();
    let mut group_of: HashMap<&str, usize> = HashMap::new();
    let mut min_ready = Vec::new();
    let mut last = Vec::new();
    for a in &plan.actions {
        match a {
            Action::ResetLost { .. }
            | Action::Deallocate { .. }
            | Action::CompleteMinReady { .. } => first.push(a),
            Action::CreateMinReady { .. } => min_ready.push(a),
            _ => match a.request() {
                Some(r) => {
                    let i = *group_of.entry(r).or_insert_with(|| {
                        groups.push((r.to_owned(), Vec::new()));
                        groups.len() - 1
                    });
                    groups[i].1.push(a);
                }
                None => last.push(a),
            },
        }
    }
    // Looked up by every request's actions: a backlog's plan has thousands.
    let requests = RequestIndex {
        by_id: snapshot
            .requests
            .iter()
            .map(|r| (r.id.as_str(), r))
            .collect(),
        lock_dirs: snapshot
            .request_lock_dirs
            .iter()
            .map(|d| d.id.as_str())
            .collect(),
    };
    let (ctx, requests) = (&ctx, &requests);
    stream::iter(first)
        .for_each_concurrent(CONCURRENT_GROUPS, |a| async move {
            if let Err(e) = run(ctx, snapshot, requests, a).await {
                tracing::debug!(action = action_name(a), error = %e, "action skipped");
            }
        })
        .await;
    create_min_ready(ctx, snapshot, requests, &min_ready).await;
    stream::iter(groups)
        .for_each_concurrent(CONCURRENT_GROUPS, |(request, actions)| async move {
            // Nodes the accept created for the launches after it.
            let mut created = VecDeque::new();
            for (i, a) in actions.iter().enumerate() {
                let done = match a {
                    Action::Accept { .. } => {
                        let then = actions.get(i + 1..).unwrap_or_default();
                        accept(ctx, requests, a, then).await.map(|c| created = c)
                    }
                    Action::Launch { .. } => launch(ctx, requests, a, created.pop_front()).await,
                    _ => run(ctx, snapshot, requests, a).await,
                };
                if let Err(e) = done {
                    // The next pass re-plans this request from the new state.
                    tracing::debug!(request = %request, action = action_name(a), error = %e, "request action skipped");
                    break;
                }
            }
        })
        .await;
    stream::iter(last)
        .for_each_concurrent(CONCURRENT_GROUPS, |a| async move {
            if let Err(e) = run(ctx, snapshot, requests, a).await {
                tracing::debug!(action = action_name(a), error = %e, "action skipped");
            }
        })
        .await;
}

/// Creates the plan's min-ready requests, a batch at a time, while the
/// registered pools are the ones the plan chose each label's owner from.
/// Once another launcher's pool registers, the label may be its now, and
/// it tops the label up from the requests it can see (after the registry
/// settles): requests of ours still unwritten would come on top of its
/// own (issue 16). So they are written before the pass's request work,
/// which can take seconds in a burst, and not at all after a change; the
/// next pass plans again.
async fn create_min_ready(
    ctx: &ExecContext,
    snapshot: &Snapshot,
    requests: &RequestIndex<'_>,
    actions: &[&Action],
) {
    let mut planned: Vec<&str> = snapshot.pools.iter().map(|p| p.id.as_str()).collect();
    planned.sort_unstable();
    for (done, batch) in actions.chunks(CONCURRENT_GROUPS).enumerate() {
        match registered_pools(&ctx.shared.store).await {
            Ok(now) if now.iter().map(String::as_str).eq(planned.iter().copied()) => {}
            Ok(_) => {
                tracing::info!(
                    skipped = actions.len() - done * CONCURRENT_GROUPS,
                    "min-ready requests not created: the registered pools changed since the pass"
                );
                return;
            }
            Err(e) => {
                tracing::debug!(error = %e, "min-ready requests not created");
                return;
            }
        }
        stream::iter(batch)
            .for_each_concurrent(CONCURRENT_GROUPS, |a| async move {
                if let Err(e) = run(ctx, snapshot, requests, a).await {
                    tracing::debug!(action = action_name(a), error = %e, "action skipped");
                }
            })
            .await;
    }
}

/// The ids of the registered pools, sorted.
async fn registered_pools(store: &Store) -> Result<Vec<String>, StoreError> {
    let mut ids: Vec<String> = store
        .list_components(ComponentKind::Pool)
        .await?
        .records
        .into_iter()
        .filter_map(|(_, c)| c.id)
        .collect();
    ids.sort_unstable();
    Ok(ids)
}

pub(crate) fn action_name(a: &Action) -> &'static str {
    match a {
        Action::Accept { .. } => "accept",
        Action::Decline { .. } => "decline",
        Action::Fail { .. } => "fail",
        Action::Allocate { .. } => "allocate",
        Action::Launch { .. } => "launch",
        Action::Fulfill { .. } => "fulfill",
        Action::Release { .. } => "release",
        Action::HandBack { .. } => "hand-back",
        Action::ResetLost { .. } => "reset-lost",
        Action::CreateMinReady { .. } => "create-min-ready",
        Action::CompleteMinReady { .. } => "complete-min-ready",
        Action::Deallocate { .. } => "deallocate",
        Action::DeleteNode { .. } => "delete-node",
        Action::DeleteRequestLockDir { .. } => "delete-request-lock-dir",
        Action::DeleteEmptyNode { .. } => "delete-empty-node",
        Action::DeleteLeakedInstance { .. } => "delete-leaked-instance",
        Action::DeleteLeakedResource { .. } => "delete-leaked-resource",
    }
}

/// The snapshot's requests by id, and which have a lock directory.
struct RequestIndex<'a> {
    by_id: HashMap<&'a str, &'a RequestRecord>,
    lock_dirs: HashSet<&'a str>,
}

impl<'a> RequestIndex<'a> {
    fn get(&self, id: &str) -> Option<&'a RequestRecord> {
        self.by_id.get(id).copied()
    }
}

async fn run(
    rt: &ExecContext,
    snapshot: &Snapshot,
    requests: &RequestIndex<'_>,
    action: &Action,
) -> Result<(), ActionError> {
    let store = rt.shared.store.clone();
    let clock = rt.shared.settings.clock;
    let now = || clock.now();
    match action {
        Action::Accept { .. } => accept(rt, requests, action, &[]).await.map(drop),
        Action::Decline {
            request,
            by,
            fail,
            deallocate,
            reason,
        } => {
            for n in deallocate {
                if let Err(e) = deallocate_node(&store, n, Some(request), clock).await {
                    tracing::debug!(node = %n, error = %e, "could not give a node back");
                }
            }
            // Take it out first: the map's lock must not be held across an await.
            let held = rt.owned().remove(request);
            let guard = match held {
                Some(o) => o.guard,
                None => store.lock_request(request, LockWait::NonBlocking).await?,
            };
            let declined = update_request(&store, &guard, request, |cur| {
                let Some(cur) = cur.filter(|c| super::is_open(c.value.state)) else {
                    return Decision::Leave(Ok(false));
                };
                let mut req = cur.value;
                for id in by {
                    if !req.declined_by.contains(id) {
                        req.declined_by.push(id.clone());
                    }
                }
                let state = if *fail {
                    RequestState::Failed
                } else {
                    RequestState::Requested
                };
                req.nodes.clear();
                req.set_state(state, now());
                Decision::Write(req, Ok(true))
            })
            .await;
            guard.release_logged().await;
            if declined? {
                if *fail {
                    tracing::info!(request = %request, reason = %reason, "request failed: every pool declined");
                } else {
                    tracing::info!(request = %request, reason = %reason, "request declined");
                }
            }
            Ok(())
        }
        Action::Fail { request, reason } => {
            let failed = store
                .with_locked(
                    LockOf::Request(request),
                    LockWait::NonBlocking,
                    &RecordKey::request(request),
                    |cur| {
                        let Some(cur) = cur else {
                            return Decision::Leave(Ok(false));
                        };
                        let mut req = cur.value;
                        if req.state != RequestState::Requested {
                            return Decision::Leave(Err(ActionError::RequestNotWaiting));
                        }
                        req.set_state(RequestState::Failed, now());
                        Decision::Write(req, Ok(true))
                    },
                )
                .await??;
            if failed {
                tracing::info!(request = %request, reason = %reason, "request failed");
            }
            Ok(())
        }
        Action::Allocate { request, node } => {
            if !rt.owned().contains_key(request) {
                return Err(ActionError::NotHeld);
            }
            let req = requests.get(request.as_str()).map(|r| r.request.clone());
            store
                .with_locked(
                    LockOf::Node(node),
                    LockWait::NonBlocking,
                    &RecordKey::node(node),
                    |cur| {
                        let Some(cur) = cur else {
                            return Decision::Leave(Err(ActionError::NodeVanished));
                        };
                        let mut n = cur.value;
                        if n.state != NodeState::Ready || n.allocated_to.is_some() {
                            return Decision::Leave(Err(ActionError::NodeTaken));
                        }
                        n.allocated_to = Some(request.clone());
                        if let Some(r) = &req {
                            n.tenant_name = r.tenant_name.clone();
                            n.requestor = r.requestor.clone();
                        }
                        Decision::Write(n, Ok(()))
                    },
                )
                .await??;
            tracing::debug!(request = %request, node = %node, "ready node allocated");
            rt.note_node(request, node);
            Ok(())
        }
        Action::Launch { .. } => launch(rt, requests, action, None).await,
        Action::Fulfill { request, nodes } => {
            let Some(owned) = rt.owned().remove(request) else {
                return Err(ActionError::NotHeld);
            };
            let fulfilled = fulfil(&store, &owned, request, nodes, clock).await;
            owned.guard.release_logged().await;
            fulfilled?;
            tracing::info!(request = %request, nodes = ?nodes, "request fulfilled");
            Ok(())
        }
        Action::Release { request } => {
            let held = rt.owned().remove(request);
            if let Some(o) = held {
                o.guard.release_logged().await;
            }
            Ok(())
        }
        Action::HandBack { request, reason } => {
            // Taken out first: the map's lock must not be held across an await.
            let Some(o) = rt.owned().remove(request) else {
                return Err(ActionError::NotHeld);
            };
            tracing::info!(request = %request, pool = %o.pool, %reason, "giving a request back: its provider is unavailable");
            Ok(hand_back(&store, request, o.guard, clock).await?)
        }
        Action::ResetLost { request } => {
            let guard = store.lock_request(request, LockWait::NonBlocking).await?;
            Ok(hand_back(&store, request, guard, clock).await?)
        }
        Action::CreateMinReady { label } => {
            let mut req = NodeRequest::new(vec![label.clone()], MIN_READY_REQUESTOR, now());
            req.reuse = false;
            store.submit_request(&req, MIN_READY_PRIORITY, true).await?;
            Ok(())
        }
        Action::CompleteMinReady { request } => {
            // Nodes first, then the request: other launchers count the
            // request or its nodes as spares, never neither. A ready node
            // not given back (locked) keeps the request for the next pass.
            for rec in &snapshot.nodes {
                if rec.node.allocated_to.as_deref() != Some(request.as_str()) {
                    continue;
                }
                if let Err(e) = deallocate_node(&store, &rec.id, Some(request), clock).await {
                    if rec.node.state == NodeState::Ready {
                        return Err(e);
                    }
                    tracing::debug!(node = %rec.id, error = %e, "could not give a node back");
                }
            }
            Ok(store.delete_request(request).await?)
        }
        Action::Deallocate { node } => deallocate_node(&store, node, None, clock).await,
        Action::DeleteNode { node, reason } => {
            // Re-checked under the lock: the node may have been taken meanwhile.
            let still = |n: &Node| {
                let qualifies = match reason {
                    DeleteReason::MaxReadyAge
                    | DeleteReason::Evicted
                    | DeleteReason::ServerGone => {
                        n.state == NodeState::Ready && n.allocated_to.is_none()
                    }
                    DeleteReason::HoldExpired => n.state == NodeState::Hold,
                    DeleteReason::LostInit => n.state == NodeState::Init,
                    DeleteReason::Unlocked => n.state.deletable_when_unlocked(),
                };
                if qualifies {
                    Ok(())
                } else {
                    Err(ActionError::NodeChanged)
                }
            };
            let Some((guard, cur)) = store
                .lock_if(
                    LockOf::Node(node),
                    LockWait::NonBlocking,
                    &RecordKey::node(node),
                    still,
                )
                .await?
            else {
                return Ok(());
            };
            let provider = rt.providers.get(&cur.value.provider).cloned();
            let shared = rt.shared.clone();
            let id = node.clone();
            let reason = reason.as_str();
            rt.tasks.spawn(async move {
                let _permit = shared.deletes.acquire().await;
                tasks::delete(shared.clone(), provider, id, guard, reason).await;
            });
            Ok(())
        }
        Action::DeleteRequestLockDir { request } => {
            Ok(store.delete_request_lock_dir(request).await?)
        }
        Action::DeleteEmptyNode { node } => {
            let path = paths::node(node);
            match store.backend().get(&path).await? {
                Some((data, stat)) if data.is_empty() => {
                    match store.backend().delete(&path, Some(stat.version)).await {
                        Ok(()) | Err(StoreError::NotFound { .. }) => Ok(()),
                        Err(StoreError::NotEmpty { .. }) => Ok(store.delete_node(node).await?),
                        Err(e) => Err(e.into()),
                    }
                }
                _ => Ok(()),
            }
        }
        Action::DeleteLeakedInstance {
            provider,
            external_id,
        } => {
            let Some(h) = rt.providers.get(provider).cloned() else {
                return Err(ActionError::NoProvider(provider.clone()));
            };
            let shared = rt.shared.clone();
            let ext = external_id.clone();
            let pname = provider.clone();
            rt.tasks.spawn(async move {
                let _permit = shared.deletes.acquire().await;
                match tokio::time::timeout(shared.settings.delete_timeout, h.provider.delete_instance(&ext)).await {
                    Ok(Ok(())) => {
                        tracing::info!(provider = %pname, server = %ext, "leaked server deleted");
                        shared.metrics.incr(&format!("nodepool.provider.{pname}.leaked.instances"));
                    }
                    Ok(Err(e)) => tracing::warn!(provider = %pname, server = %ext, error = %e, "could not delete a leaked server"),
                    Err(_) => tracing::warn!(provider = %pname, server = %ext, "deleting a leaked server timed out"),
                }
            });
            Ok(())
        }
        Action::DeleteLeakedResource { provider, kind, id } => {
            let Some(h) = rt.providers.get(provider).cloned() else {
                return Err(ActionError::NoProvider(provider.clone()));
            };
            let shared = rt.shared.clone();
            let (kind, id, pname) = (*kind, id.clone(), provider.clone());
            let what = kind.metric_name();
            rt.tasks.spawn(async move {
                let _permit = shared.deletes.acquire().await;
                match tokio::time::timeout(shared.settings.delete_timeout, h.provider.delete_resource(kind, &id)).await {
                    Ok(Ok(())) => {
                        tracing::info!(provider = %pname, kind = what, id = %id, "leaked resource deleted");
                        shared.metrics.incr(&format!("nodepool.provider.{pname}.leaked.{what}"));
                    }
                    Ok(Err(e)) => tracing::warn!(provider = %pname, kind = what, id = %id, error = %e, "could not delete a leaked resource"),
                    Err(_) => tracing::warn!(provider = %pname, kind = what, id = %id, "deleting a leaked resource timed out"),
                }
            });
            Ok(())
        }
    }
}

/// Accepts a request: locks it and writes it `pending` at the snapshot's
/// version. `then` are the request's actions after this one in the plan:
/// the nodes its `Launch`es will create are created in the accepting
/// transaction where it is one (see
/// [`Store::lock_new_write_and_create_nodes`]), and returned with their
/// ids, in `then`'s order, for [`launch`] to use instead of creating them.
async fn accept(
    rt: &ExecContext,
    requests: &RequestIndex<'_>,
    action: &Action,
    then: &[&Action],
) -> Result<VecDeque<(String, Node)>, ActionError> {
    let Action::Accept { request, pool } = action else {
        return Ok(VecDeque::new());
    };
    let store = &rt.shared.store;
    let Some(our_id) = rt.pool_ids.get(pool).cloned() else {
        return Err(ActionError::UnknownPool(pool.clone()));
    };
    // Decided on the snapshot and written at its version, without reading
    // the request again under the lock: a request changed since (taken by
    // another launcher, withdrawn) fails the version check and the next
    // pass re-plans it. One round trip fewer per request, which in a
    // backlog bounds accepting.
    let Some(rec) = requests.get(request.as_str()) else {
        return Err(ActionError::RequestVanished);
    };
    let mut req = (*rec.request).clone();
    if req.state != RequestState::Requested || req.declined_by.contains(&our_id) {
        return Err(ActionError::RequestNotWaiting);
    }
    req.set_state(RequestState::Pending, rt.shared.settings.clock.now());
    let key = RecordKey::request(request);
    let refused = |e: StoreError| match e {
        StoreError::NotFound { .. } => ActionError::RequestVanished,
        StoreError::Conflict { .. } => ActionError::RequestNotWaiting,
        e => e.into(),
    };
    // A request nobody has tried to lock has no lock directory yet: the
    // directory, our contender, `pending` and the request's new nodes are
    // written in one transaction, one round trip (kazoo's layout: ours is
    // the only contender). Otherwise, or where the store has no
    // transactions, lock and write one after the other, and each launch
    // creates its node.
    let new = if requests.lock_dirs.contains(request.as_str()) {
        None
    } else {
        // Only the launches right after the accept, as the group runs
        // them: a node is created only where its launch will follow.
        let nodes: Vec<Node> = then
            .iter()
            .map_while(|a| match a {
                Action::Launch { request: r, .. } if r == request => new_node(rt, requests, a).ok(),
                _ => None,
            })
            .collect();
        store
            .lock_new_write_and_create_nodes(
                &paths::request_lock(request),
                &key,
                &req,
                Some(rec.version),
                &nodes,
            )
            .await
            .map_err(refused)?
            .map(|(guard, version, ids)| (guard, version, ids.into_iter().zip(nodes).collect()))
    };
    let (guard, version, created) = match new {
        Some(done) => done,
        None => {
            let guard = if requests.lock_dirs.contains(request.as_str()) {
                store.lock_request(request, LockWait::NonBlocking).await?
            } else {
                store
                    .lock_new_request(request, LockWait::NonBlocking)
                    .await?
            };
            match store
                .write_locked(&guard, &key, &req, Some(rec.version))
                .await
            {
                Ok(v) => (guard, v, VecDeque::new()),
                Err(e) => {
                    guard.release_logged().await;
                    return Err(refused(e));
                }
            }
        }
    };
    let labels = req.node_types.clone();
    tracing::info!(request = %request, pool = %pool, labels = ?labels, "request accepted");
    rt.owned().insert(
        request.clone(),
        Owned {
            pool: pool.clone(),
            guard,
            labels,
            nodes: Vec::new(),
            accepted: Versioned {
                value: req,
                version,
            },
        },
    );
    Ok(created)
}

/// The `init` node a `Launch` creates.
fn new_node(
    rt: &ExecContext,
    requests: &RequestIndex<'_>,
    action: &Action,
) -> Result<Node, ActionError> {
    let Action::Launch {
        request,
        pool,
        label,
        image,
        az,
        resources,
    } = action
    else {
        return Err(ActionError::LabelGone);
    };
    let Some(handle) = rt.providers.get(&pool.provider) else {
        return Err(ActionError::NoProvider(pool.provider.clone()));
    };
    let req = requests.get(request.as_str()).map(|r| &r.request);
    let mut node = Node::new(
        NodeState::Init,
        rt.shared.settings.clock.now(),
        &pool.provider,
        &pool.pool,
        vec![label.clone()],
    );
    node.allocated_to = Some(request.clone());
    node.launcher = rt.pool_ids.get(pool).cloned();
    node.az = az.clone();
    node.resources = Some(resources.clone());
    node.cloud = handle.config.cloud.clone();
    node.region = handle.config.region_name.clone();
    if let Some(r) = req {
        node.tenant_name = r.tenant_name.clone();
        node.requestor = r.requestor.clone();
    }
    if let Some(attrs) = rt
        .config
        .provider(&pool.provider)
        .and_then(|p| p.pool(&pool.pool))
        .and_then(|p| p.node_attributes.as_ref())
    {
        node.attributes = Some(crate::model::Json::encode(attrs));
    }
    fill_image_fields(&rt.config, &pool.provider, image, &mut node);
    Ok(node)
}

/// Launches a node for a held request: creates it (unless `created`, the
/// one its accepting transaction made), locks it, writes it `building` and
/// hands it to a launch task.
async fn launch(
    rt: &ExecContext,
    requests: &RequestIndex<'_>,
    action: &Action,
    created: Option<(String, Node)>,
) -> Result<(), ActionError> {
    let Action::Launch {
        request,
        pool,
        label,
        image,
        az,
        ..
    } = action
    else {
        return Ok(());
    };
    if !rt.owned().contains_key(request) {
        return Err(ActionError::NotHeld);
    }
    let Some(handle) = rt.providers.get(&pool.provider).cloned() else {
        return Err(ActionError::NoProvider(pool.provider.clone()));
    };
    let store = &rt.shared.store;
    let req = requests.get(request.as_str()).map(|r| r.request.clone());
    let (id, mut node) = match created {
        Some(done) => done,
        None => {
            let node = new_node(rt, requests, action)?;
            (store.create_node(&node).await?, node)
        }
    };
    // Create, then lock, then `building`: an unlocked `init` node is left
    // alone by cleanup, an unlocked `building` one is deleted. The lock and
    // `building` go in one transaction where the store has them (the node's
    // lock directory cannot exist yet).
    node.set_state(NodeState::Building, rt.shared.settings.clock.now());
    let key = RecordKey::node(&id);
    let (guard, version) = match store
        .lock_new_and_write(&paths::node_lock(&id), &key, &node, Some(0))
        .await?
    {
        Some(done) => done,
        None => {
            let guard = store.lock_new_node(&id, LockWait::NonBlocking).await?;
            match store.write_locked(&guard, &key, &node, Some(0)).await {
                Ok(v) => (guard, v),
                Err(e) => {
                    guard.release_logged().await;
                    return Err(e.into());
                }
            }
        }
    };
    let cfg = rt.config.clone();
    let Some((spec, host_key_checking, console_log)) = tasks::instance_spec(
        &cfg,
        pool,
        label,
        image,
        az.clone(),
        &id,
        (request, req.as_deref()),
    ) else {
        guard.release_logged().await;
        return Err(ActionError::LabelGone);
    };
    rt.note_node(request, &id);
    rt.shared
        .launching
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(id.clone());
    let job = LaunchJob {
        request: request.clone(),
        node_id: id,
        node,
        version,
        guard,
        provider: handle,
        spec,
        host_key_checking,
        console_log,
        ready_script: super::ready_script::for_launch(&cfg, pool, label, image),
        requestor: req.as_ref().and_then(|r| r.requestor.clone()),
    };
    rt.tasks.spawn(tasks::launch(rt.shared.clone(), job));
    Ok(())
}

/// Copies the login and connection details of the image into the node.
fn fill_image_fields(
    cfg: &crate::config::Config,
    provider: &str,
    image: &LaunchImage,
    node: &mut Node,
) {
    let Some(pc) = cfg.provider(provider) else {
        return;
    };
    match image {
        LaunchImage::Upload {
            image,
            build,
            upload,
            ..
        } => {
            node.image_id = Some(paths::upload(image, build, provider, upload));
            if let Some(d) = cfg.diskimage(image) {
                node.username = Some(d.username.clone());
                node.python_path = Some(d.python_path.clone());
                node.shell_type = d.shell_type.clone();
            } else if let Some(si) = pc.snapshot_image(image) {
                node.username = Some(si.username.clone());
            }
            // A snapshot image answers as its base image.
            if let Some((kind, port)) = pc.connection_of(image) {
                node.connection_type = Some(kind.to_owned());
                let port = crate::model::Port::Number(i64::from(port));
                node.connection_port = Some(port.clone());
                node.ssh_port = Some(port);
            }
        }
        LaunchImage::Cloud { name } => {
            node.image_id = Some(name.clone());
            if let Some(ci) = pc.cloud_image(name) {
                node.username = ci.username.clone();
                node.python_path = Some(ci.python_path.clone());
                node.shell_type = ci.shell_type.clone();
                node.connection_type = Some(ci.connection_type.clone());
                let port = crate::model::Port::Number(i64::from(ci.connection_port));
                node.connection_port = Some(port.clone());
                node.ssh_port = Some(port);
            }
        }
    }
}

/// Gives a ready node back to the spares (under its lock): clears
/// `allocated_to` (only if it still points at `request`, when given) and
/// the tenant charge.
async fn deallocate_node(
    store: &Store,
    node: &str,
    request: Option<&String>,
    clock: Clock,
) -> Result<(), ActionError> {
    store
        .with_locked(
            LockOf::Node(node),
            LockWait::NonBlocking,
            &RecordKey::node(node),
            |cur| {
                let Some(cur) = cur else {
                    return Decision::Leave(());
                };
                let mut n = cur.value;
                if n.allocated_to.is_none()
                    || request.is_some_and(|r| n.allocated_to.as_ref() != Some(r))
                {
                    return Decision::Leave(());
                }
                match n.state {
                    NodeState::Ready => {
                        n.allocated_to = None;
                        n.tenant_name = None;
                    }
                    // A launch that never started: delete it.
                    NodeState::Init => n.set_state(NodeState::Deleting, clock.now()),
                    _ => return Decision::Leave(()),
                }
                Decision::Write(n, ())
            },
        )
        .await?;
    Ok(())
}

/// Reads a request under a lock this launcher holds, lets `decide` check
/// it, and writes what it decided.
/// Sets a held request `fulfilled` with `nodes`. Written at the version
/// our `pending` write made, without reading it first; if it changed since
/// (Zuul touched it), it is read and checked like any other update.
async fn fulfil(
    store: &Store,
    owned: &Owned,
    request: &str,
    nodes: &[String],
    clock: Clock,
) -> Result<(), ActionError> {
    let key = RecordKey::request(request);
    let mut req = owned.accepted.value.clone();
    req.nodes = nodes.to_vec();
    req.set_state(RequestState::Fulfilled, clock.now());
    match store
        .write_locked(&owned.guard, &key, &req, Some(owned.accepted.version))
        .await
    {
        Ok(_) => return Ok(()),
        Err(StoreError::Conflict { .. }) => {}
        Err(StoreError::NotFound { .. }) => return Err(ActionError::RequestVanished),
        Err(e) => return Err(e.into()),
    }
    update_request(store, &owned.guard, request, |cur| {
        let Some(cur) = cur else {
            return Decision::Leave(Err(ActionError::RequestVanished));
        };
        let mut req = cur.value;
        if req.state != RequestState::Pending {
            return Decision::Leave(Err(ActionError::RequestNotPending));
        }
        req.nodes = nodes.to_vec();
        req.set_state(RequestState::Fulfilled, clock.now());
        Decision::Write(req, Ok(()))
    })
    .await
}

async fn update_request<T>(
    store: &Store,
    guard: &LockGuard,
    request: &str,
    decide: impl FnOnce(Option<Versioned<NodeRequest>>) -> Decision<NodeRequest, Result<T, ActionError>>,
) -> Result<T, ActionError> {
    store
        .update_locked(guard, &RecordKey::request(request), decide)
        .await?
}

/// Returns a held (or lost) request to the queue: its ready nodes go back
/// to the spares, its `init` nodes are deleted, the request is set
/// `requested` with no nodes, and the lock is released.
pub(crate) async fn hand_back(
    store: &Store,
    request: &str,
    guard: LockGuard,
    clock: Clock,
) -> Result<(), StoreError> {
    let key = RecordKey::request(request);
    let result = async {
        let Some(cur) = store.read(&key).await? else {
            return Ok(());
        };
        let mut req = cur.value;
        if req.state != RequestState::Pending {
            return Ok(());
        }
        let nodes = store.list_nodes().await?;
        for rec in &nodes.records {
            if rec.node.allocated_to.as_deref() == Some(request) {
                let _ = deallocate_node(store, &rec.id, Some(&request.to_owned()), clock).await;
            }
        }
        req.nodes.clear();
        req.set_state(RequestState::Requested, clock.now());
        store
            .write_locked(&guard, &key, &req, Some(cur.version))
            .await?;
        tracing::info!(request = %request, "request handed back to the queue");
        Ok(())
    }
    .await;
    guard.release_logged().await;
    result
}
