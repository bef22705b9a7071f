//! Long-running node work: launching a server (create, wait, nodescan,
//! retries) and deleting one. Each task holds the node's lock for its
//! whole life, so nobody else acts on the node meanwhile; progress is
//! written to the node record, so a crash loses nothing cleanup cannot
//! recover.

use std::sync::Arc;
use std::time::Instant;

use indexmap::IndexMap;

use super::Shared;
use super::metrics::{families, sanitize_component};
use super::nodescan;
use super::providers::ProviderHandle;
use super::ready_script::{self, ReadyScriptRun};
use crate::config::Config;
use crate::model::{Node, NodeState};
use crate::planner::{LaunchImage, PoolKey};
use crate::provider::{
    ImageRef, InstanceSpec, META_GROUPS, META_NODE_ID, META_POOL, META_PROVIDER, ProviderError,
};
use crate::store::{LockGuard, RecordKey, StoreError};

/// Everything a launch needs, prepared by the executor.
pub(crate) struct LaunchJob {
    /// The request the node is for.
    pub request: String,
    pub node_id: String,
    pub node: Node,
    pub version: i32,
    pub guard: LockGuard,
    pub provider: Arc<ProviderHandle>,
    pub spec: InstanceSpec,
    pub host_key_checking: bool,
    pub console_log: bool,
    /// Run on the node after nodescan, before it is `ready`.
    pub ready_script: Option<ReadyScriptRun>,
    pub requestor: Option<String>,
}

/// Builds the server spec for a node: name `np<id>`, Nodepool's metadata
/// tags, the label's instance properties and formatted dynamic ones.
pub(crate) fn instance_spec(
    config: &Config,
    target: &PoolKey,
    label: &str,
    image: &LaunchImage,
    az: Option<String>,
    node_id: &str,
    request: (&str, Option<&crate::model::NodeRequest>),
) -> Option<(InstanceSpec, bool, bool)> {
    let (provider, pool) = (target.provider.as_str(), target.pool.as_str());
    let (request_id, request) = request;
    let pc = config.provider(provider)?;
    let pool_cfg = pc.pool(pool)?;
    let pl = pool_cfg.label(label)?.clone();
    let (image_ref, image_name, config_drive) = match image {
        LaunchImage::Upload {
            image, external_id, ..
        } => (
            ImageRef::Uploaded {
                external_id: external_id.clone(),
            },
            image.clone(),
            pc.config_drive_of(image),
        ),
        LaunchImage::Cloud { name } => {
            let ci = pc.cloud_image(name)?;
            (
                ImageRef::Cloud {
                    id: ci.image_id.clone(),
                    name: ci.image_name.clone().unwrap_or_else(|| ci.name.clone()),
                },
                name.clone(),
                ci.config_drive,
            )
        }
    };
    let mut metadata = IndexMap::new();
    metadata.insert(
        META_GROUPS.to_owned(),
        format!("{provider},{image_name},{label}"),
    );
    for (k, v) in &pl.instance_properties {
        metadata.insert(k.clone(), v.clone());
    }
    for (k, fmt) in &pl.dynamic_instance_properties {
        metadata.insert(k.clone(), format_request_fields(fmt, request, request_id));
    }
    metadata.insert(META_NODE_ID.to_owned(), node_id.to_owned());
    metadata.insert(META_POOL.to_owned(), pool.to_owned());
    metadata.insert(META_PROVIDER.to_owned(), provider.to_owned());
    let host_key_checking = pl.host_key_checking;
    let console_log = pl.console_log;
    Some((
        InstanceSpec {
            name: format!("np{node_id}"),
            node_id: node_id.to_owned(),
            provider: provider.to_owned(),
            pool: pool.to_owned(),
            label: pl,
            image: image_ref,
            availability_zone: az,
            security_groups: pool_cfg.security_groups.clone(),
            config_drive,
            auto_floating_ip: pool_cfg.auto_floating_ip,
            metadata,
        },
        host_key_checking,
        console_log,
    ))
}

/// Formats `{request.<field>}` placeholders of dynamic instance properties.
pub(crate) fn format_request_fields(
    fmt: &str,
    request: Option<&crate::model::NodeRequest>,
    request_id: &str,
) -> String {
    let mut out = String::new();
    let mut rest = fmt;
    while let Some(start) = rest.find('{') {
        out.push_str(&rest[..start]);
        if rest[start..].starts_with("{{") {
            out.push('{');
            rest = &rest[start + 2..];
            continue;
        }
        let Some(end) = rest[start..].find('}') else {
            out.push_str(&rest[start..]);
            return out;
        };
        let field = &rest[start + 1..start + end];
        let value = match (field, request) {
            ("request.id", _) => request_id.to_owned(),
            ("request.labels", Some(r)) => r.node_types.join(","),
            ("request.requestor", Some(r)) => r.requestor.clone().unwrap_or_default(),
            ("request.requestor_data", Some(r)) => r
                .requestor_data
                .as_ref()
                .map(|j| j.as_text().to_owned())
                .unwrap_or_default(),
            ("request.relative_priority", Some(r)) => r.relative_priority.to_string(),
            ("request.event_id", Some(r)) => r.event_id.clone().unwrap_or_default(),
            ("request.created_time", Some(r)) => {
                r.created_time.map(|t| t.to_string()).unwrap_or_default()
            }
            ("request.tenant_name", Some(r)) => r.tenant_name.clone().unwrap_or_default(),
            _ => String::new(),
        };
        out.push_str(&value);
        rest = &rest[start + end + 1..];
    }
    out.push_str(rest.replace("}}", "}").as_str());
    out
}

/// Launch result labels, as in Nodepool's `nodepool.launch.<result>`.
fn result_label(e: &ProviderError) -> &'static str {
    match e {
        ProviderError::QuotaExceeded(_) => "error.quota",
        ProviderError::Timeout(_) => "error.servercreatetimeout",
        ProviderError::ServerFailed(_) => "error.status",
        _ => "error.unknown",
    }
}

enum AttemptError {
    /// The cloud refused for quota; no server was made.
    Quota(ProviderError),
    /// The cloud failed this attempt; another may succeed.
    Retryable(String, &'static str),
    /// The node lock is gone (its session expired or was replaced).
    LockLost,
    /// The store would not take a write (after resolving and retrying):
    /// the launch cannot go on without recording its progress.
    Store(String),
}

/// How a launch ended.
enum Outcome {
    Ready(Finished),
    /// The cloud failed it: `aborted` (quota, or the provider is
    /// unavailable: not the request's fault) or `failed`.
    Failed {
        label: &'static str,
        message: String,
        aborted: bool,
    },
    LockLost,
    Store(String),
}

/// Runs a launch to `ready`, `failed` or `aborted`, then releases the lock.
///
/// Every attempt starts from the node as the executor wrote it
/// (`building`, no server), so nothing of a failed attempt (its server id,
/// addresses, a `ready` that was never written) carries into the next.
/// The lock is checked before each create and right after it; a server
/// made by an attempt that then lost the lock, or could not record it, is
/// deleted at once unless the node record owns it (see [`settle_server`]).
pub(crate) async fn launch(shared: Arc<Shared>, job: LaunchJob) {
    let LaunchJob {
        request,
        node_id,
        node: base,
        mut version,
        guard,
        provider,
        spec,
        host_key_checking,
        console_log,
        ready_script,
        requestor,
    } = job;
    let started = Instant::now();
    let pc = provider.config.clone();
    let retries = pc.launch_retries.max(1);
    let mut attempt = 0;
    let mut node = base.clone();
    let outcome = loop {
        attempt += 1;
        let mut server = None;
        let result = attempt_launch(
            &shared,
            &request,
            &provider,
            &spec,
            &node_id,
            &mut node,
            &mut version,
            &guard,
            &mut server,
            host_key_checking,
            console_log,
            ready_script.as_ref(),
        )
        .await;
        match result {
            Ok(finished) => break Outcome::Ready(finished),
            Err(AttemptError::Quota(e)) => {
                break Outcome::Failed {
                    label: "error.quota",
                    message: e.to_string(),
                    aborted: true,
                };
            }
            Err(AttemptError::LockLost) => {
                if let Some(ext) = server {
                    Box::pin(settle_server(&shared, &provider, &node_id, &ext)).await;
                }
                break Outcome::LockLost;
            }
            Err(AttemptError::Store(msg)) => {
                if let Some(ext) = server {
                    Box::pin(settle_server(&shared, &provider, &node_id, &ext)).await;
                }
                break Outcome::Store(msg);
            }
            Err(AttemptError::Retryable(msg, label)) => {
                tracing::warn!(node = %node_id, provider = %pc.name, attempt, retries, error = %msg, "launch attempt failed");
                shared.metrics.incr_as(
                    "nodepool.launch.attempt_failed",
                    &families::LAUNCH_ATTEMPTS_FAILED,
                    &[("provider", &pc.name)],
                );
                // A provider marked unavailable fails every call fast: no
                // retry, and the failure is the cloud's, not the request's
                // (the node is aborted, so the request is not declined).
                let unavailable = provider.unavailable();
                // The failed server goes before anything else is tried.
                let undeleted = match server {
                    Some(ext) => (!Box::pin(delete_server(&shared, &provider, &node_id, &ext))
                        .await)
                        .then_some(ext),
                    None => None,
                };
                if attempt >= retries || unavailable {
                    // A server that could not be deleted stays on the
                    // failed node: deleting the node deletes it again.
                    node.external_id = undeleted;
                    break Outcome::Failed {
                        label,
                        message: msg,
                        aborted: unavailable,
                    };
                }
                // Start again from `building` with no server.
                node = base.clone();
                node.set_state(NodeState::Building, shared.now());
                let written = Box::pin(write_node(&shared, &guard, &node_id, &node, version)).await;
                if let Some(ext) = undeleted {
                    // The record no longer points to it (or never will):
                    // keep trying to delete it.
                    shared.add_orphan(&pc.name, &node_id, &ext);
                }
                match written {
                    Ok(v) => version = v,
                    Err(AttemptError::LockLost) => break Outcome::LockLost,
                    Err(e) => break Outcome::Store(e.message()),
                }
            }
        }
    };
    let elapsed = started.elapsed();
    let az = node.az.clone().unwrap_or_else(|| "unknown".into());
    let result = match &outcome {
        Outcome::Ready(_) => "ready",
        Outcome::Failed { label, .. } => label,
        Outcome::LockLost | Outcome::Store(_) => "error.zksession",
    };
    let mut names = vec![
        format!("nodepool.launch.{result}"),
        format!("nodepool.launch.provider.{}.{result}", pc.name),
        format!(
            "nodepool.launch.provider.{}.{}.{result}",
            pc.name,
            sanitize_component(&az)
        ),
    ];
    if let Some(r) = &requestor {
        names.push(format!(
            "nodepool.launch.requestor.{}.{result}",
            sanitize_component(r)
        ));
    }
    shared.metrics.timing_as(
        &names,
        &families::LAUNCH,
        &[("provider", &pc.name), ("result", result)],
        elapsed,
    );
    let finished = match outcome {
        Outcome::Ready(f) => Some(f),
        _ => None,
    };
    match outcome {
        Outcome::Ready(_) => {
            tracing::info!(node = %node_id, provider = %pc.name, seconds = elapsed.as_secs_f64(), "node ready");
        }
        Outcome::LockLost => {
            // Nothing more is written: the node is someone else's now.
            tracing::warn!(node = %node_id, provider = %pc.name, "launch abandoned: the node lock was lost");
        }
        Outcome::Store(msg) => {
            // Unlocked and `building`, the node is deleted by the next
            // cleanup pass (with its server, if the record names one).
            tracing::error!(node = %node_id, provider = %pc.name, error = %msg, "launch abandoned: the store refused its progress");
        }
        Outcome::Failed {
            label,
            message,
            aborted,
        } => {
            let state = if aborted {
                NodeState::Aborted
            } else {
                NodeState::Failed
            };
            if aborted && label == "error.quota" {
                provider.invalidate_limits();
                tracing::info!(node = %node_id, provider = %pc.name, error = %message, "launch hit the cloud's quota; node aborted");
            } else if aborted {
                // The outage itself was warned about once, by the breaker.
                tracing::info!(node = %node_id, provider = %pc.name, error = %message, "launch cut short: the provider is unavailable; node aborted");
            } else {
                tracing::error!(node = %node_id, provider = %pc.name, error = %message, "launch failed");
            }
            node.set_state(state, shared.now());
            if let Err(e) = Box::pin(write_node(&shared, &guard, &node_id, &node, version)).await {
                tracing::warn!(node = %node_id, error = %e.message(), "could not record the failed launch; cleanup deletes the node");
            }
        }
    }
    if finished == Some(Finished::Fulfilled) {
        // Released in the transaction that fulfilled the request.
        guard.forget();
    } else {
        guard.release_logged().await;
    }
    shared
        .launching
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .remove(&node_id);
    if finished == Some(Finished::Ready) {
        Box::pin(super::executor::fulfil_if_complete(
            &shared,
            &request,
            (&node_id, &node),
        ))
        .await;
    }
    shared.wake.notify_one();
}

impl AttemptError {
    fn message(&self) -> String {
        match self {
            AttemptError::Quota(e) => e.to_string(),
            AttemptError::Retryable(m, _) | AttemptError::Store(m) => m.clone(),
            AttemptError::LockLost => "lost the node lock".into(),
        }
    }
}

/// Writes the node under its lock: waits while the session is suspended,
/// and lets the store resolve a write whose outcome was unknown.
async fn write_node(
    shared: &Shared,
    guard: &LockGuard,
    node_id: &str,
    node: &Node,
    version: i32,
) -> Result<i32, AttemptError> {
    let written = shared
        .store
        .write_locked(guard, &RecordKey::node(node_id), node, Some(version))
        .await;
    match written {
        Ok(v) => Ok(v),
        Err(_) if guard.is_lost() => Err(AttemptError::LockLost),
        Err(e) => Err(AttemptError::Store(format!(
            "recording node {node_id}: {e}"
        ))),
    }
}

/// Deletes a server of ours within the delete timeout; false when it
/// could not be deleted (the caller keeps track of it).
async fn delete_server(
    shared: &Shared,
    provider: &ProviderHandle,
    node_id: &str,
    external_id: &str,
) -> bool {
    match tokio::time::timeout(
        shared.settings.delete_timeout,
        provider.provider.delete_instance(external_id),
    )
    .await
    {
        Ok(Ok(())) | Ok(Err(ProviderError::NotFound(_))) => true,
        Ok(Err(e)) => {
            tracing::warn!(node = %node_id, server = %external_id, error = %e, "could not delete a server");
            false
        }
        Err(_) => {
            tracing::warn!(node = %node_id, server = %external_id, "deleting a server timed out");
            false
        }
    }
}

/// A server this launcher made whose launch ended without a lock or a
/// record: deleted unless the node record points to it.
///
/// The record decides, because a write whose outcome was unknown may
/// have landed: a server a committed record names (a `ready` node above
/// all) must never be deleted from under it — the node's own deletion
/// removes it. Any other server is deleted now; when that cannot be done
/// (store or cloud unreachable) it is kept on the launcher's list and
/// retried every pass, so it never waits for the leak sweep.
pub(crate) async fn settle_server(
    shared: &Shared,
    provider: &ProviderHandle,
    node_id: &str,
    external_id: &str,
) -> bool {
    let owned = match shared.store.get_node(node_id).await {
        Ok(Some(n)) => n.value.external_id.as_deref() == Some(external_id),
        Ok(None) => false,
        // A malformed record names no server we can trust.
        Err(StoreError::Malformed { .. }) => false,
        Err(e) => {
            tracing::info!(node = %node_id, server = %external_id, error = %e, "cannot read the node yet; its server is checked again next pass");
            shared.add_orphan(&provider.config.name, node_id, external_id);
            return false;
        }
    };
    if owned {
        tracing::info!(node = %node_id, server = %external_id, "the node record owns the server; its cleanup deletes it");
        return true;
    }
    if delete_server(shared, provider, node_id, external_id).await {
        tracing::info!(node = %node_id, server = %external_id, "deleted a server its launch could not keep");
        shared.metrics.incr_as(
            &format!("nodepool.provider.{}.orphans_deleted", provider.config.name),
            &families::ORPHANS_DELETED,
            &[("provider", &provider.config.name)],
        );
        true
    } else {
        shared.add_orphan(&provider.config.name, node_id, external_id);
        false
    }
}

#[allow(clippy::too_many_arguments)]
async fn attempt_launch(
    shared: &Shared,
    request: &str,
    provider: &ProviderHandle,
    spec: &InstanceSpec,
    node_id: &str,
    node: &mut Node,
    version: &mut i32,
    guard: &LockGuard,
    server: &mut Option<String>,
    host_key_checking: bool,
    console_log: bool,
    ready_script: Option<&ReadyScriptRun>,
) -> Result<Finished, AttemptError> {
    let pc = &provider.config;
    // Never create a server for a node that is no longer ours.
    if !guard.wait_held().await {
        return Err(AttemptError::LockLost);
    }
    let deadline = tokio::time::Instant::now() + pc.launch_timeout;
    let classify = |e: ProviderError| match e {
        ProviderError::QuotaExceeded(_) => AttemptError::Quota(e),
        other => {
            let label = result_label(&other);
            AttemptError::Retryable(other.to_string(), label)
        }
    };
    let boot_started = tokio::time::Instant::now();
    let external_id =
        match tokio::time::timeout_at(deadline, provider.provider.create_instance(spec)).await {
            Ok(Ok(id)) => id,
            Ok(Err(e)) => return Err(classify(e)),
            Err(_) => {
                return Err(AttemptError::Retryable(
                    "server create timed out".into(),
                    "error.servercreatetimeout",
                ));
            }
        };
    *server = Some(external_id.clone());
    // Record the server id at once, so a crash from here on cannot leak it.
    node.external_id = Some(external_id.clone());
    *version = Box::pin(write_node(shared, guard, node_id, node, *version)).await?;
    let instance = match tokio::time::timeout_at(
        deadline,
        provider.provider.wait_for_instance(&external_id, spec),
    )
    .await
    {
        Ok(Ok(i)) => i,
        Ok(Err(e)) => return Err(classify(e)),
        Err(_) => {
            return Err(AttemptError::Retryable(
                format!(
                    "server {external_id} not active within launch-timeout {:?}",
                    pc.launch_timeout
                ),
                "error.servercreatetimeout",
            ));
        }
    };
    shared.metrics.observe(
        &families::BOOT,
        &[("provider", &pc.name), ("label", &spec.label.name)],
        boot_started.elapsed(),
    );
    node.cloud = instance.cloud.clone().or_else(|| pc.cloud.clone());
    node.region = instance.region.clone().or_else(|| pc.region_name.clone());
    if instance.az.is_some() {
        node.az = instance.az.clone();
    }
    node.public_ipv4 = instance.public_ipv4.clone();
    node.private_ipv4 = instance.private_ipv4.clone();
    node.public_ipv6 = instance.public_ipv6.clone();
    node.interface_ip = instance.interface_ip.clone();
    if let Some(port) = provider.provider.connection_port(&instance) {
        let port = crate::model::Port::Number(i64::from(port));
        node.connection_port = Some(port.clone());
        node.ssh_port = Some(port);
    }
    node.host_id = instance.host_id.clone();
    if let Some(r) = &instance.resources {
        node.resources = Some(r.clone());
    }
    let skip = !host_key_checking || provider.provider.skip_nodescan();
    if !skip {
        let Some(ip) = node.interface_ip.clone() else {
            return Err(AttemptError::Retryable(
                "server has no address to scan".into(),
                "error.ipadd",
            ));
        };
        let port = node.port().number().unwrap_or(22);
        let conn = node.connection_type.clone().unwrap_or_else(|| "ssh".into());
        // Boxed, as the ready script below: a launch task's future is
        // allocated whole when it is spawned, and these SSH exchanges are
        // most of its size while most launches never run them (a backlog
        // of 1,000 held ~11 MiB of launch futures).
        match Box::pin(nodescan::scan(&ip, port as u16, &conn, pc.boot_timeout)).await {
            Ok(keys) => node.host_keys = keys,
            Err(e) => {
                if console_log {
                    match provider.provider.console_log(&external_id).await {
                        Ok(log) => {
                            tracing::info!(node = %node_id, server = %external_id, console = %log, "console log after a failed nodescan")
                        }
                        Err(e) => tracing::debug!(node = %node_id, error = %e, "no console log"),
                    }
                }
                return Err(AttemptError::Retryable(
                    format!("nodescan of {ip}:{port}: {e}"),
                    "error.keyscan",
                ));
            }
        }
    }
    if let Some(job) = ready_script {
        let Some(ip) = node.interface_ip.clone() else {
            return Err(AttemptError::Retryable(
                "server has no address to run its ready script on".into(),
                "error.readyscript",
            ));
        };
        let port = node.port().number().unwrap_or(22) as u16;
        let target = ready_script::Target {
            node_id,
            label: &spec.label.name,
            host: &ip,
            port,
            host_keys: &node.host_keys,
        };
        if let Err(e) = Box::pin(ready_script::run(job, target)).await {
            return Err(AttemptError::Retryable(e, "error.readyscript"));
        }
        tracing::info!(node = %node_id, script = %job.script.name, "ready script succeeded");
    }
    node.set_state(NodeState::Ready, shared.now());
    // The last node of its request: `ready`, `fulfilled` and both locks'
    // release in one transaction.
    if let Some(v) = Box::pin(super::executor::fulfil_with_ready(
        shared,
        request,
        (node_id, node, *version),
        guard,
    ))
    .await
    {
        *version = v;
        return Ok(Finished::Fulfilled);
    }
    *version = Box::pin(write_node(shared, guard, node_id, node, *version)).await?;
    Ok(Finished::Ready)
}

/// How a launch attempt that worked left the node's lock and request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Finished {
    /// The node is `ready` and still locked.
    Ready,
    /// The node is `ready` and unlocked, and its request fulfilled and
    /// unlocked (see [`super::executor::fulfil_with_ready`]).
    Fulfilled,
}

/// Deletes a node's server and record. Holds the node lock; on failure
/// the node is left `deleting` and unlocked, for the next pass to retry.
pub(crate) async fn delete(
    shared: Arc<Shared>,
    provider: Option<Arc<ProviderHandle>>,
    node_id: String,
    guard: LockGuard,
    reason: &'static str,
) {
    let started = Instant::now();
    let result = delete_inner(&shared, provider.as_deref(), &node_id, &guard).await;
    match result {
        Ok(()) => {
            tracing::info!(node = %node_id, reason, seconds = started.elapsed().as_secs_f64(), "node deleted");
            // The lock directory went with the record.
            guard.forget();
        }
        Err(e) => {
            tracing::warn!(node = %node_id, reason, error = %e, "node deletion failed; will retry");
            if matches!(e, DeleteError::Timeout { .. }) {
                shared
                    .metrics
                    .incr("nodepool.launch.error.serverdeletetimeout");
            }
            guard.release_logged().await;
        }
    }
    shared.wake.notify_one();
}

async fn delete_inner(
    shared: &Shared,
    provider: Option<&ProviderHandle>,
    node_id: &str,
    guard: &LockGuard,
) -> Result<(), DeleteError> {
    let clock = shared.settings.clock;
    delete_locked_node(
        &shared.store,
        provider.map(|p| p.provider.as_ref()),
        node_id,
        guard,
        shared.settings.delete_timeout,
        &move || clock.now(),
    )
    .await
}

/// Why deleting a node did not finish; the node is left `deleting` for
/// the launcher to retry.
#[derive(Debug, thiserror::Error)]
pub enum DeleteError {
    /// The store refused or failed.
    #[error("{0}")]
    Store(#[from] StoreError),
    /// The node's provider is not configured in this process.
    #[error("provider {0} is not configured here")]
    NoProvider(String),
    /// The cloud refused to delete the server.
    #[error("deleting server {server}: {source}")]
    Cloud {
        /// The server.
        server: String,
        /// The cloud's error.
        source: ProviderError,
    },
    /// The cloud did not answer in time.
    #[error("deleting server {server} timed out after {after:?}")]
    Timeout {
        /// The server.
        server: String,
        /// How long it was given.
        after: std::time::Duration,
    },
    /// The node lock went with the session before the record was deleted.
    #[error("lost the node lock")]
    LockLost,
}

/// Deletes a node whose lock the caller holds, as the launcher does:
/// state `deleting`, delete the server (within `timeout`; "not found" is
/// success), state `deleted`, then the record and its lock directory.
/// On error the node is left `deleting` for the launcher to retry; the
/// caller still owns (and must release) the lock. On success the lock
/// directory is gone with the record, so the guard should be forgotten.
///
/// Shared by the launcher's delete task and `nodepool delete --now`, so
/// both delete a node the same way. `provider` is the node's provider;
/// `None` is an error when the node has a server.
pub async fn delete_locked_node(
    store: &crate::store::Store,
    provider: Option<&dyn crate::provider::Provider>,
    node_id: &str,
    guard: &LockGuard,
    timeout: std::time::Duration,
    now: &(dyn Fn() -> f64 + Send + Sync),
) -> Result<(), DeleteError> {
    let Some(current) = store.get_node(node_id).await? else {
        return Ok(());
    };
    let mut node = current.value;
    let mut version = current.version;
    if node.state != NodeState::Deleting {
        node.set_state(NodeState::Deleting, now());
        version = store.update_node(node_id, &node, version).await?;
    }
    if let Some(server) = node.external_id.clone() {
        let Some(p) = provider else {
            return Err(DeleteError::NoProvider(node.provider));
        };
        match tokio::time::timeout(timeout, p.delete_instance(&server)).await {
            Ok(Ok(())) | Ok(Err(ProviderError::NotFound(_))) => {}
            Ok(Err(source)) => return Err(DeleteError::Cloud { server, source }),
            Err(_) => {
                return Err(DeleteError::Timeout {
                    server,
                    after: timeout,
                });
            }
        }
    }
    if !guard.wait_held().await {
        return Err(DeleteError::LockLost);
    }
    // `deleted` first, so whoever takes the lock in the gap finishes the job.
    node.set_state(NodeState::Deleted, now());
    let _ = store.update_node(node_id, &node, version).await;
    Ok(store.delete_node(node_id).await?)
}
