//! Executes a plan's actions against the store and the clouds.
//!
//! Request actions run in plan order; once one action of a request fails
//! (another launcher won the lock, the request changed underneath), the
//! rest of that request's actions are skipped — the next pass re-plans
//! from the new state. Every write is version-checked or made under the
//! record's lock. Launches and deletions become tasks holding the node
//! lock.

use super::tasks::{self, LaunchJob};
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use futures::stream::{self, StreamExt};
use tokio_util::task::TaskTracker;

use super::providers::ProviderHandle;
use super::{Clock, Owned, Shared};
use crate::config::Config;
use crate::model::{
    MIN_READY_PRIORITY, MIN_READY_REQUESTOR, Node, NodeRequest, NodeState, RequestState,
};
use crate::planner::PoolKey;
use crate::planner::{Action, DeleteReason, LaunchImage, Plan, Snapshot};
use crate::store::{LockGuard, LockWait, Store, StoreError, paths};

type Failure = String;

fn err(e: impl std::fmt::Display) -> Failure {
    e.to_string()
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
}

/// Requests handled at once: each costs a few sequential store round trips.
const CONCURRENT_GROUPS: usize = 64;

/// Runs a plan: first what frees nodes (so requests can reuse them), then
/// every request's actions (concurrently across requests, in order within
/// one), then the rest.
pub(crate) async fn execute(ctx: ExecContext, snapshot: &Snapshot, plan: &Plan) {
    let mut first = Vec::new();
    let mut groups: Vec<(String, Vec<&Action>)> = Vec::new();
    let mut group_of: HashMap<&str, usize> = HashMap::new();
    let mut last = Vec::new();
    for a in &plan.actions {
        match a {
            Action::ResetLost { .. }
            | Action::Deallocate { .. }
            | Action::CompleteMinReady { .. } => first.push(a),
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
    let ctx = &ctx;
    stream::iter(first)
        .for_each_concurrent(CONCURRENT_GROUPS, |a| async move {
            if let Err(e) = run(ctx, snapshot, a).await {
                tracing::debug!(action = action_name(a), error = %e, "action skipped");
            }
        })
        .await;
    stream::iter(groups)
        .for_each_concurrent(CONCURRENT_GROUPS, |(request, actions)| async move {
            for a in actions {
                if let Err(e) = run(ctx, snapshot, a).await {
                    // The next pass re-plans this request from the new state.
                    tracing::debug!(request = %request, action = action_name(a), error = %e, "request action skipped");
                    break;
                }
            }
        })
        .await;
    stream::iter(last)
        .for_each_concurrent(CONCURRENT_GROUPS, |a| async move {
            if let Err(e) = run(ctx, snapshot, a).await {
                tracing::debug!(action = action_name(a), error = %e, "action skipped");
            }
        })
        .await;
}

fn action_name(a: &Action) -> &'static str {
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
    }
}

async fn run(rt: &ExecContext, snapshot: &Snapshot, action: &Action) -> Result<(), Failure> {
    let store = rt.shared.store.clone();
    let clock = rt.shared.settings.clock;
    let now = || clock.now();
    match action {
        Action::Accept { request, pool } => {
            let Some(our_id) = rt.pool_ids.get(pool).cloned() else {
                return Err("unknown pool".into());
            };
            let guard = store
                .lock_request(request, LockWait::NonBlocking)
                .await
                .map_err(err)?;
            let Some(cur) = store.get_request(request).await.map_err(err)? else {
                let _ = guard.release().await;
                return Err("request vanished".into());
            };
            let mut req = cur.value;
            if req.state != RequestState::Requested || req.declined_by.contains(&our_id) {
                let _ = guard.release().await;
                return Err("request no longer waiting".into());
            }
            req.set_state(RequestState::Pending, now());
            if let Err(e) = store.update_request(request, &req, cur.version).await {
                let _ = guard.release().await;
                return Err(err(e));
            }
            tracing::info!(request = %request, pool = %pool, labels = ?req.node_types, "request accepted");
            rt.owned().insert(
                request.clone(),
                Owned {
                    pool: pool.clone(),
                    guard,
                },
            );
            Ok(())
        }
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
                None => store
                    .lock_request(request, LockWait::NonBlocking)
                    .await
                    .map_err(err)?,
            };
            let result = async {
                let Some(cur) = store.get_request(request).await.map_err(err)? else {
                    return Ok(());
                };
                let mut req = cur.value;
                if !super::is_open(req.state) {
                    return Ok(());
                }
                for id in by {
                    if !req.declined_by.contains(id) {
                        req.declined_by.push(id.clone());
                    }
                }
                let state = if *fail { RequestState::Failed } else { RequestState::Requested };
                req.nodes.clear();
                req.set_state(state, now());
                store.update_request(request, &req, cur.version).await.map_err(err)?;
                if *fail {
                    tracing::info!(request = %request, reason = %reason, "request failed: every pool declined");
                } else {
                    tracing::info!(request = %request, reason = %reason, "request declined");
                }
                Ok(())
            }
            .await;
            let _ = guard.release().await;
            result
        }
        Action::Fail { request, reason } => {
            let guard = store
                .lock_request(request, LockWait::NonBlocking)
                .await
                .map_err(err)?;
            let result = async {
                let Some(cur) = store.get_request(request).await.map_err(err)? else {
                    return Ok(());
                };
                let mut req = cur.value;
                if req.state != RequestState::Requested {
                    return Err("request no longer waiting".to_string());
                }
                req.set_state(RequestState::Failed, now());
                store
                    .update_request(request, &req, cur.version)
                    .await
                    .map_err(err)?;
                tracing::info!(request = %request, reason = %reason, "request failed");
                Ok(())
            }
            .await;
            let _ = guard.release().await;
            result
        }
        Action::Allocate { request, node } => {
            if !rt.owned().contains_key(request) {
                return Err("request not held".into());
            }
            let req = snapshot
                .requests
                .iter()
                .find(|r| &r.id == request)
                .map(|r| r.request.clone());
            let guard = store
                .lock_node(node, LockWait::NonBlocking)
                .await
                .map_err(err)?;
            let result = async {
                let cur = store
                    .get_node(node)
                    .await
                    .map_err(err)?
                    .ok_or("node vanished")?;
                let mut n = cur.value;
                if n.state != NodeState::Ready || n.allocated_to.is_some() {
                    return Err("node no longer free".to_string());
                }
                n.allocated_to = Some(request.clone());
                if let Some(r) = &req {
                    n.tenant_name = r.tenant_name.clone();
                    n.requestor = r.requestor.clone();
                }
                store
                    .update_node(node, &n, cur.version)
                    .await
                    .map_err(err)?;
                tracing::debug!(request = %request, node = %node, "ready node allocated");
                Ok(())
            }
            .await;
            let _ = guard.release().await;
            result
        }
        Action::Launch {
            request,
            pool,
            label,
            image,
            az,
            resources,
        } => {
            if !rt.owned().contains_key(request) {
                return Err("request not held".into());
            }
            let Some(handle) = rt.providers.get(&pool.provider).cloned() else {
                return Err(format!("provider {} is not available", pool.provider));
            };
            let req = snapshot
                .requests
                .iter()
                .find(|r| &r.id == request)
                .map(|r| r.request.clone());
            let t = now();
            let mut node = Node::new(
                NodeState::Init,
                t,
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
            if let Some(r) = &req {
                node.tenant_name = r.tenant_name.clone();
                node.requestor = r.requestor.clone();
            }
            let cfg = rt.config.clone();
            if let Some(attrs) = cfg
                .provider(&pool.provider)
                .and_then(|p| p.pool(&pool.pool))
                .and_then(|p| p.node_attributes.as_ref())
            {
                node.attributes = Some(crate::model::Json::encode(attrs));
            }
            fill_image_fields(&cfg, &pool.provider, image, &mut node);
            let id = store.create_node(&node).await.map_err(err)?;
            // Create, then lock, then `building`: an unlocked `init` node is
            // left alone by cleanup, an unlocked `building` one is deleted.
            let guard = store
                .lock_node(&id, LockWait::NonBlocking)
                .await
                .map_err(err)?;
            node.set_state(NodeState::Building, now());
            let version = match store.update_node(&id, &node, 0).await {
                Ok(v) => v,
                Err(e) => {
                    let _ = guard.release().await;
                    return Err(err(e));
                }
            };
            let Some((spec, host_key_checking, console_log)) = tasks::instance_spec(
                &cfg,
                pool,
                label,
                image,
                az.clone(),
                &id,
                (request, req.as_deref()),
            ) else {
                let _ = guard.release().await;
                return Err("label no longer configured".into());
            };
            let job = LaunchJob {
                node_id: id,
                node,
                version,
                guard,
                provider: handle,
                spec,
                host_key_checking,
                console_log,
                requestor: req.as_ref().and_then(|r| r.requestor.clone()),
            };
            rt.tasks.spawn(tasks::launch(rt.shared.clone(), job));
            Ok(())
        }
        Action::Fulfill { request, nodes } => {
            let Some(owned) = rt.owned().remove(request) else {
                return Err("request not held".into());
            };
            let result = async {
                let cur = store
                    .get_request(request)
                    .await
                    .map_err(err)?
                    .ok_or("request vanished")?;
                let mut req = cur.value;
                if req.state != RequestState::Pending {
                    return Err("request is not pending".to_string());
                }
                req.nodes = nodes.clone();
                req.set_state(RequestState::Fulfilled, now());
                store
                    .update_request(request, &req, cur.version)
                    .await
                    .map_err(err)?;
                tracing::info!(request = %request, nodes = ?nodes, "request fulfilled");
                Ok(())
            }
            .await;
            let _ = owned.guard.release().await;
            result
        }
        Action::Release { request } => {
            let held = rt.owned().remove(request);
            if let Some(o) = held {
                let _ = o.guard.release().await;
            }
            Ok(())
        }
        Action::HandBack { request, reason } => {
            // Taken out first: the map's lock must not be held across an await.
            let Some(o) = rt.owned().remove(request) else {
                return Err("request not held".into());
            };
            tracing::info!(request = %request, pool = %o.pool, %reason, "giving a request back: its provider is unavailable");
            hand_back(&store, request, o.guard, clock)
                .await
                .map_err(err)
        }
        Action::ResetLost { request } => {
            let guard = store
                .lock_request(request, LockWait::NonBlocking)
                .await
                .map_err(err)?;
            hand_back(&store, request, guard, clock).await.map_err(err)
        }
        Action::CreateMinReady { label } => {
            let mut req = NodeRequest::new(vec![label.clone()], MIN_READY_REQUESTOR, now());
            req.reuse = false;
            store
                .submit_request(&req, MIN_READY_PRIORITY, true)
                .await
                .map_err(err)?;
            Ok(())
        }
        Action::CompleteMinReady { request } => {
            for rec in &snapshot.nodes {
                if rec.node.allocated_to.as_deref() == Some(request.as_str())
                    && let Err(e) = deallocate_node(&store, &rec.id, Some(request), clock).await
                {
                    tracing::debug!(node = %rec.id, error = %e, "could not give a node back");
                }
            }
            store.delete_request(request).await.map_err(err)
        }
        Action::Deallocate { node } => deallocate_node(&store, node, None, clock).await,
        Action::DeleteNode { node, reason } => {
            let guard = store
                .lock_node(node, LockWait::NonBlocking)
                .await
                .map_err(err)?;
            let Some(cur) = store.get_node(node).await.map_err(err)? else {
                guard.forget();
                return Ok(());
            };
            // Re-check under the lock: the node may have been taken meanwhile.
            let still = match reason {
                DeleteReason::MaxReadyAge | DeleteReason::Evicted | DeleteReason::ServerGone => {
                    cur.value.state == NodeState::Ready && cur.value.allocated_to.is_none()
                }
                DeleteReason::HoldExpired => cur.value.state == NodeState::Hold,
                DeleteReason::LostInit => cur.value.state == NodeState::Init,
                DeleteReason::Unlocked => cur.value.state.deletable_when_unlocked(),
            };
            if !still {
                let _ = guard.release().await;
                return Err("node changed".into());
            }
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
            store.delete_request_lock_dir(request).await.map_err(err)
        }
        Action::DeleteEmptyNode { node } => {
            let path = paths::node(node);
            match store.backend().get(&path).await.map_err(err)? {
                Some((data, stat)) if data.is_empty() => {
                    match store.backend().delete(&path, Some(stat.version)).await {
                        Ok(()) | Err(StoreError::NotFound { .. }) => Ok(()),
                        Err(StoreError::NotEmpty { .. }) => {
                            store.delete_node(node).await.map_err(err)
                        }
                        Err(e) => Err(err(e)),
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
                return Err("provider gone".into());
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
    }
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
            }
            if let Some(pd) = pc.diskimage(image) {
                node.connection_type = Some(pd.connection_type.clone());
                let port = crate::model::Port::Number(i64::from(pd.connection_port));
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
) -> Result<(), Failure> {
    let guard = store
        .lock_node(node, LockWait::NonBlocking)
        .await
        .map_err(err)?;
    let result = async {
        let Some(cur) = store.get_node(node).await.map_err(err)? else {
            return Ok(());
        };
        let mut n = cur.value;
        if n.allocated_to.is_none() || request.is_some_and(|r| n.allocated_to.as_ref() != Some(r)) {
            return Ok(());
        }
        match n.state {
            NodeState::Ready => {
                n.allocated_to = None;
                n.tenant_name = None;
            }
            // A launch that never started: delete it.
            NodeState::Init => n.set_state(NodeState::Deleting, clock.now()),
            _ => return Ok(()),
        }
        store
            .update_node(node, &n, cur.version)
            .await
            .map_err(err)?;
        Ok(())
    }
    .await;
    let _ = guard.release().await;
    result
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
    let result = async {
        let Some(cur) = store.get_request(request).await? else {
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
        store.update_request(request, &req, cur.version).await?;
        tracing::info!(request = %request, "request handed back to the queue");
        Ok(())
    }
    .await;
    let _ = guard.release().await;
    result
}
