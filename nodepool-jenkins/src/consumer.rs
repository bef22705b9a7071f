//! [`JenkinsConsumer`]: the `NodeConsumer` of one Jenkins target.
//!
//! A node given to the target becomes a permanent agent named after the
//! node ([`agent_name`]: `<label>-<provider>-<node id>`), with an SSH
//! launcher to the node's address, one executor and the node's label.
//! Every [`finished_nodes`](NodeConsumer::finished_nodes) call looks at
//! each agent (`/computer/NAME/api/json`):
//!
//! - a running build is remembered (its URL) and makes the node busy;
//! - the agent is done when no build runs on it and either it was taken
//!   offline (`temporarilyOffline`: the NODE_OFFLINE_WHEN_COMPLETE flow of
//!   the Gearman plugin, or a person) or a build was seen running on it
//!   before; an agent that never comes online within `connect_timeout`, or
//!   that someone deleted in Jenkins, is done too;
//! - a done node is `Used`, or `Hold` when a job hold rule exists for the
//!   job of its last build and that build did not succeed. The last build
//!   is the one seen running, else the newest of the agent's feed
//!   (`/computer/NAME/rssAll`), for jobs that started and ended between
//!   two polls. Build results are only fetched while hold rules exist.
//!
//! Agents carry the description `nodepool node <id> of provider <p>,
//! target <t>`; [`reconcile`](NodeConsumer::reconcile) removes agents with
//! this target's description whose node is no longer allocated to it
//! (nodes deleted while no runtime served the target). Other agents of the
//! master are never touched.
//!
//! Single use rests on NODE_OFFLINE_WHEN_COMPLETE: without it, Jenkins may
//! start a second job on an idle agent before the next poll notices the
//! first one ended.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;
use nodepool_model::config::Target;
use nodepool_model::consumer::{ConsumerError, FinishedNode, NodeConsumer, NodeOutcome};
use nodepool_model::model::Node;
use nodepool_model::store::Store;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::api::{
    AgentBuilds, AgentSpec, ComputerInfo, CreateAgent, DeleteAgent, GetBuild, GetComputer,
    HostKeyCheck, ListAgentDescriptions, ListAgents, build_path,
};
use crate::client::{ClientOptions, JenkinsClient};
use crate::error::ApiError;

/// Tunables of a [`JenkinsConsumer`]; `Default` gives production values.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JenkinsOptions {
    /// HTTP client settings.
    pub client: ClientOptions,
    /// An agent not online this long after it was created is given up
    /// (its node is deleted): the SSH launcher cannot reach the node.
    pub connect_timeout: Duration,
    /// Agents polled at once.
    pub poll_concurrency: usize,
}

impl Default for JenkinsOptions {
    fn default() -> Self {
        JenkinsOptions {
            client: ClientOptions::default(),
            connect_timeout: Duration::from_secs(600),
            poll_concurrency: 8,
        }
    }
}

/// What we know of one agent.
#[derive(Clone, Debug)]
struct Agent {
    name: String,
    registered_at: Instant,
    seen_online: bool,
    /// Path of the build seen running on it (the last one seen).
    build: Option<String>,
    /// A build is running on it now.
    busy: bool,
    /// Reported by `finished_nodes`; waits for `node_gone`.
    finished: bool,
}

/// The `NodeConsumer` of one Jenkins target. See the module documentation.
pub struct JenkinsConsumer {
    target: Target,
    client: JenkinsClient,
    store: Store,
    options: JenkinsOptions,
    /// Agents by node id.
    agents: Mutex<BTreeMap<String, Agent>>,
}

impl std::fmt::Debug for JenkinsConsumer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JenkinsConsumer")
            .field("target", &self.target.name)
            .field("client", &self.client)
            .finish_non_exhaustive()
    }
}

/// The agent name of a node: `<label>-<provider>-<node id>`, every
/// character Jenkins refuses in names (and anything outside
/// `[A-Za-z0-9._-]`) replaced by `-`. The node id at the end makes it
/// unique and lets an agent be found from its node id alone.
pub fn agent_name(node_id: &str, node: &Node) -> String {
    let label = node.node_type.first().map(String::as_str).unwrap_or("node");
    let raw = format!("{label}-{}-{node_id}", node.provider);
    raw.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '-'
            }
        })
        .collect()
}

/// The address Jenkins should SSH to.
fn node_address(node: &Node) -> Option<&str> {
    [
        &node.interface_ip,
        &node.public_ipv4,
        &node.public_ipv6,
        &node.private_ipv4,
        &node.hostname,
    ]
    .into_iter()
    .find_map(|a| a.as_deref().filter(|a| !a.is_empty()))
}

/// The host key Jenkins should expect: ed25519 first, then whatever
/// nodescan found first.
fn host_key(node: &Node) -> HostKeyCheck {
    node.host_keys
        .iter()
        .find(|k| k.starts_with("ssh-ed25519 "))
        .or_else(|| node.host_keys.first())
        .map_or(HostKeyCheck::None, |k| HostKeyCheck::Manual(k.clone()))
}

impl JenkinsConsumer {
    /// The consumer of a target. `store` is where job hold rules are read.
    /// Fails when the URL is not usable or the token file cannot be read.
    pub fn new(target: &Target, store: Store, options: JenkinsOptions) -> Result<Self, ApiError> {
        Ok(JenkinsConsumer {
            client: JenkinsClient::new(&target.jenkins, options.client.clone())?,
            target: target.clone(),
            store,
            options,
            agents: Mutex::new(BTreeMap::new()),
        })
    }

    /// The HTTP client (for its counters).
    pub fn client(&self) -> &JenkinsClient {
        &self.client
    }

    fn agents(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Agent>> {
        self.agents.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The target label the node serves (the first of its labels the
    /// target takes; its first label otherwise).
    fn label_for(&self, node: &Node) -> String {
        node.node_type
            .iter()
            .find(|l| self.target.labels.iter().any(|t| &t.name == *l))
            .or_else(|| node.node_type.first())
            .cloned()
            .unwrap_or_default()
    }

    /// An agent's description: also how `reconcile` recognises agents of
    /// this target among every agent of the master.
    fn description(&self, node_id: &str, provider: &str) -> String {
        format!(
            "nodepool node {node_id} of provider {provider}, {}",
            self.description_suffix()
        )
    }

    fn description_suffix(&self) -> String {
        format!("target {}", self.target.name)
    }

    /// The node id of an agent this target made, from its description.
    fn described_node<'a>(&self, description: &'a str) -> Option<&'a str> {
        let rest = description.strip_prefix("nodepool node ")?;
        if !description.ends_with(&format!(", {}", self.description_suffix())) {
            return None;
        }
        rest.split(' ').next()
    }

    fn adopt(&self, node_id: &str, name: &str, info: &ComputerInfo) {
        let mut agent = Agent {
            name: name.to_owned(),
            registered_at: Instant::now(),
            seen_online: !info.offline,
            build: None,
            busy: false,
            finished: false,
        };
        if let Some(url) = info.current_builds.first() {
            agent.busy = true;
            agent.build = build_path(url);
        }
        self.agents().insert(node_id.to_owned(), agent);
    }

    /// Decides what to do with a done agent's node.
    async fn outcome(&self, node_id: &str, agent: &Agent) -> NodeOutcome {
        // Build results matter only for job holds.
        let rules = match self.store.list_job_holds().await {
            Ok(l) => l.records,
            Err(e) => {
                warn!(target_name = %self.target.name, error = %e, "cannot read job hold rules; the node is deleted");
                return NodeOutcome::Used;
            }
        };
        if rules.is_empty() {
            return NodeOutcome::Used;
        }
        let path = match &agent.build {
            Some(p) => Some(p.clone()),
            None => match self.client.execute(&AgentBuilds(agent.name.clone())).await {
                Ok(paths) => paths.into_iter().next(),
                Err(e) => {
                    warn!(agent = %agent.name, error = %e, "cannot list the agent's builds");
                    None
                }
            },
        };
        let Some(path) = path else {
            debug!(agent = %agent.name, "no build ran on the agent");
            return NodeOutcome::Used;
        };
        let build = match self.client.execute(&GetBuild(path.clone())).await {
            Ok(b) => b,
            Err(e) => {
                warn!(agent = %agent.name, build = %path, error = %e, "cannot read the build's result");
                return NodeOutcome::Used;
            }
        };
        info!(agent = %agent.name, node = %node_id, job = %build.job, number = build.number, result = ?build.result, "agent's job finished");
        if build.failed() && rules.iter().any(|r| r.job == build.job) {
            NodeOutcome::Hold {
                comment: format!(
                    "Automatically held after failing {} (build #{})",
                    build.job, build.number
                ),
                job: Some(build.job),
            }
        } else {
            NodeOutcome::Used
        }
    }
}

#[async_trait]
impl NodeConsumer for JenkinsConsumer {
    fn name(&self) -> &str {
        &self.target.name
    }

    fn wants(&self) -> Vec<(String, u32)> {
        self.target
            .labels
            .iter()
            .map(|l| (l.name.clone(), l.min_ready))
            .collect()
    }

    async fn node_ready(&self, node_id: &str, node: &Node) -> Result<(), ConsumerError> {
        if self.agents().contains_key(node_id) {
            return Ok(());
        }
        let name = agent_name(node_id, node);
        // An agent of this name is ours from before a restart: adopt it.
        match self.client.execute(&GetComputer(name.clone())).await {
            Ok(info) => {
                info!(agent = %name, node = %node_id, "adopting existing agent");
                self.adopt(node_id, &name, &info);
                return Ok(());
            }
            Err(e) if e.is_not_found() => {}
            Err(e) => return Err(e.into()),
        }
        let host = node_address(node).ok_or_else(|| {
            ConsumerError::Other(format!("node {node_id} has no address to reach it by"))
        })?;
        let port = node
            .port()
            .number()
            .and_then(|p| u16::try_from(p).ok())
            .unwrap_or(22);
        let spec = AgentSpec {
            name: name.clone(),
            description: self.description(node_id, &node.provider),
            label: self.label_for(node),
            remote_fs_root: self.target.jenkins.remote_fs_root.clone(),
            host: host.to_owned(),
            port,
            credentials_id: self.target.jenkins.credentials_id.clone(),
            host_key: host_key(node),
        };
        match self.client.execute(&CreateAgent(spec)).await {
            Ok(()) => {}
            // Made by a retried call whose first answer was lost.
            Err(e) if matches!(ConsumerError::from(e.clone()), ConsumerError::Conflict(_)) => {}
            Err(e) => return Err(e.into()),
        }
        let info = self
            .client
            .execute(&GetComputer(name.clone()))
            .await
            .map_err(ConsumerError::from)?;
        info!(agent = %name, node = %node_id, host, port, "registered agent");
        self.adopt(node_id, &name, &info);
        if let Some(a) = self.agents().get_mut(node_id) {
            a.registered_at = Instant::now();
        }
        Ok(())
    }

    async fn finished_nodes(&self) -> Result<Vec<FinishedNode>, ConsumerError> {
        let polled: Vec<(String, Agent)> = self
            .agents()
            .iter()
            .filter(|(_, a)| !a.finished)
            .map(|(id, a)| (id.clone(), a.clone()))
            .collect();
        let answers: Vec<(String, Agent, Result<ComputerInfo, ApiError>)> =
            futures::stream::iter(polled)
                .map(|(id, agent)| async move {
                    let r = self.client.execute(&GetComputer(agent.name.clone())).await;
                    (id, agent, r)
                })
                .buffer_unordered(self.options.poll_concurrency.max(1))
                .collect()
                .await;
        let mut finished = Vec::new();
        let mut first_error: Option<ApiError> = None;
        let mut answered = 0usize;
        for (id, mut agent, result) in answers {
            let done = match result {
                Ok(info) => {
                    answered += 1;
                    if !info.offline {
                        agent.seen_online = true;
                    }
                    if let Some(url) = info.current_builds.first() {
                        if !agent.busy {
                            debug!(agent = %agent.name, build = %url, "job started on agent");
                        }
                        agent.busy = true;
                        agent.build = build_path(url).or(agent.build);
                        false
                    } else if info.temporarily_offline {
                        debug!(agent = %agent.name, cause = ?info.offline_cause, "agent taken offline");
                        true
                    } else if agent.busy {
                        true
                    } else if !agent.seen_online
                        && agent.registered_at.elapsed() > self.options.connect_timeout
                    {
                        warn!(agent = %agent.name, node = %id, waited = ?self.options.connect_timeout, "agent never came online; giving the node up");
                        true
                    } else {
                        false
                    }
                }
                Err(e) if e.is_not_found() => {
                    info!(agent = %agent.name, node = %id, "agent was removed from Jenkins");
                    answered += 1;
                    true
                }
                Err(e) => {
                    warn!(agent = %agent.name, error = %e, "cannot read the agent's state");
                    first_error.get_or_insert(e);
                    false
                }
            };
            if done {
                let outcome = self.outcome(&id, &agent).await;
                agent.finished = true;
                agent.busy = false;
                finished.push(FinishedNode {
                    node_id: id.clone(),
                    outcome,
                });
            }
            // Write back unless node_gone removed it meanwhile.
            if let Some(slot) = self.agents().get_mut(&id) {
                *slot = agent;
            }
        }
        match first_error {
            // Nothing could be read: say so (the whole master is unwell).
            Some(e) if answered == 0 => Err(e.into()),
            _ => Ok(finished),
        }
    }

    async fn node_gone(&self, node_id: &str) -> Result<(), ConsumerError> {
        let known = self.agents().get(node_id).map(|a| a.name.clone());
        let name = match known {
            Some(n) => n,
            // Not registered by this consumer (made before a reload or a
            // restart): find the agent by its node id suffix.
            None => {
                let suffix = format!("-{node_id}");
                let names = self
                    .client
                    .execute(&ListAgents)
                    .await
                    .map_err(ConsumerError::from)?;
                match names.into_iter().find(|n| n.ends_with(&suffix)) {
                    Some(n) => n,
                    None => return Ok(()),
                }
            }
        };
        match self.client.execute(&DeleteAgent(name.clone())).await {
            Ok(()) => info!(agent = %name, node = %node_id, "removed agent"),
            Err(e) if e.is_not_found() => debug!(agent = %name, "agent already gone"),
            Err(e) => return Err(e.into()),
        }
        self.agents().remove(node_id);
        Ok(())
    }

    async fn reconcile(&self, live: &[String]) -> Result<(), ConsumerError> {
        let agents = self
            .client
            .execute(&ListAgentDescriptions)
            .await
            .map_err(ConsumerError::from)?;
        for (name, description) in agents {
            let Some(node_id) = self.described_node(&description) else {
                continue;
            };
            if live.iter().any(|l| l == node_id) || self.agents().contains_key(node_id) {
                continue;
            }
            info!(agent = %name, node = %node_id, "removing the agent of a node that is gone");
            match self.client.execute(&DeleteAgent(name.clone())).await {
                Ok(()) => {}
                Err(e) if e.is_not_found() => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    fn busy_nodes(&self) -> Vec<String> {
        self.agents()
            .iter()
            .filter(|(_, a)| a.busy && !a.finished)
            .map(|(id, _)| id.clone())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nodepool_model::model::NodeState;

    #[test]
    fn agent_names_are_made_of_the_node() {
        let n = Node::new(
            NodeState::Ready,
            0.0,
            "rax dfw",
            "main",
            vec!["ubuntu/22".into()],
        );
        assert_eq!(agent_name("0000000042", &n), "ubuntu-22-rax-dfw-0000000042");
        let bare = Node::new(NodeState::Ready, 0.0, "p", "main", vec![]);
        assert_eq!(agent_name("0000000001", &bare), "node-p-0000000001");
    }

    #[test]
    fn address_and_host_key_are_chosen() {
        let mut n = Node::new(NodeState::Ready, 0.0, "p", "main", vec!["l".into()]);
        assert_eq!(node_address(&n), None);
        n.private_ipv4 = Some("10.0.0.1".into());
        assert_eq!(node_address(&n), Some("10.0.0.1"));
        n.interface_ip = Some("203.0.113.9".into());
        assert_eq!(node_address(&n), Some("203.0.113.9"));
        assert_eq!(host_key(&n), HostKeyCheck::None);
        n.host_keys = vec!["ssh-rsa AAAAB".into(), "ssh-ed25519 AAAAC".into()];
        assert_eq!(
            host_key(&n),
            HostKeyCheck::Manual("ssh-ed25519 AAAAC".into())
        );
    }
}
