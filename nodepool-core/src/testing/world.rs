//! A small model of a Nodepool installation for planner tests and
//! benchmarks: build a [`Snapshot`], plan, apply the plan the way the
//! runtime would (launches finish when told), and plan again.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::cloud::choose_flavor as resolve_flavor;
use crate::config::{Config, Driver, ImageSource, SimulatedFlavor};
use crate::model::{
    BuildState, ImageBuild, ImageUpload, MIN_READY_REQUESTOR, Node, NodeRequest, NodeState,
    RequestState, Resources, UploadState,
};
use crate::planner::{
    Action, LaunchImage, LocalState, Plan, PoolInfo, PoolKey, ProviderOutage, ProviderView,
    Snapshot, plan,
};
use crate::provider::ResourceKind;
use crate::store::{BuildRecord, NodeRecord, RequestRecord, UploadRecord};

/// A modelled installation.
#[derive(Clone, Debug)]
pub struct World {
    /// The configuration.
    pub config: Config,
    /// The state the planner sees.
    pub snapshot: Snapshot,
    /// This launcher's local state.
    pub local: LocalState,
    /// The time.
    pub now: f64,
    next_node: u64,
    next_request: u64,
}

impl World {
    /// A world for a configuration (YAML). Every pool of the configuration
    /// belongs to this launcher and is registered; label resources come
    /// from simulated flavors (4 vCPU / 8 GiB for other drivers); cloud
    /// limits from the simulated quota.
    pub fn new(yaml: &str) -> Self {
        let config = match Config::from_yaml(yaml) {
            Ok(c) => c,
            Err(e) => panic!("test config is invalid: {e}"),
        };
        let mut w = World {
            snapshot: Snapshot::default(),
            local: LocalState {
                session_id: 1,
                ..LocalState::default()
            },
            now: 1_800_000_000.0,
            next_node: 0,
            next_request: 0,
            config,
        };
        for p in &w.config.providers {
            let mut view = ProviderView::default();
            let flavors = match &p.driver {
                Driver::Simulated(sim) => {
                    view.limits = sim.quota.clone();
                    view.availability_zones = sim.availability_zones.clone();
                    sim.flavors.clone()
                }
                Driver::Qemu(host) => {
                    view.limits = host.quota.clone();
                    host.flavors.clone()
                }
                Driver::OpenStack | Driver::External(_) | Driver::Static(_) => {
                    vec![SimulatedFlavor {
                        name: "default".into(),
                        vcpus: 4,
                        ram: 8192,
                    }]
                }
            };
            for pool in &p.pools {
                let key = PoolKey::new(&p.name, &pool.name);
                let id = format!("test-PoolWorker.{}-{}-0", p.name, pool.name);
                w.local.pool_ids.insert(key, id.clone());
                w.snapshot.pools.push(PoolInfo {
                    id,
                    provider: p.name.clone(),
                    pool: pool.name.clone(),
                    labels: pool.labels.iter().map(|l| l.name.clone()).collect(),
                    priority: pool.priority.unwrap_or(p.priority),
                    paused: false,
                    unavailable: false,
                    launchable: None,
                });
                for l in &pool.labels {
                    let res = resolve_flavor(&flavors, l)
                        .or_else(|| flavors.first())
                        .map(|f| Resources::server(f.vcpus, f.ram))
                        .unwrap_or_default();
                    view.label_resources
                        .entry(pool.name.clone())
                        .or_default()
                        .insert(l.name.clone(), res);
                }
            }
            w.snapshot.providers.insert(p.name.clone(), view);
        }
        w
    }

    /// Makes every diskimage used by a pool label available in that
    /// provider (one ready build with one ready upload).
    pub fn with_ready_images(mut self) -> Self {
        let mut wanted = Vec::new();
        for p in &self.config.providers {
            for pool in &p.pools {
                for l in &pool.labels {
                    if let ImageSource::DiskImage(d) = &l.image {
                        wanted.push((p.name.clone(), d.clone()));
                    }
                }
            }
        }
        wanted.sort();
        wanted.dedup();
        for (p, d) in wanted {
            self.add_ready_upload(&p, &d, "build0", self.now - 3600.0);
        }
        self
    }

    /// Adds a ready build (if missing) and a ready upload of it.
    pub fn add_ready_upload(
        &mut self,
        provider: &str,
        image: &str,
        build: &str,
        when: f64,
    ) -> String {
        if !self
            .snapshot
            .images
            .builds
            .iter()
            .any(|b| b.image == image && b.id == build)
        {
            let mut b = ImageBuild::new(when, vec!["qcow2".into()]);
            b.set_state(BuildState::Ready, when);
            self.snapshot.images.builds.push(BuildRecord {
                image: image.into(),
                id: build.into(),
                build: b,
                version: 1,
                locked: false,
            });
        }
        let id = format!("{:010}", self.snapshot.images.uploads.len());
        let mut u = ImageUpload::new(when, Some("qcow2".into()));
        u.set_state(UploadState::Ready, when);
        u.external_id = Some(format!("img-{provider}-{image}-{build}-{id}"));
        self.snapshot.images.uploads.push(UploadRecord {
            image: image.into(),
            build_id: build.into(),
            provider: provider.into(),
            id: id.clone(),
            upload: u,
            version: 1,
            locked: false,
            uploads_locked: false,
        });
        id
    }

    fn label_resources(&self, provider: &str, pool: &str, label: &str) -> Resources {
        self.snapshot
            .providers
            .get(provider)
            .and_then(|v| v.label_resources.get(pool)?.get(label))
            .cloned()
            .unwrap_or_else(|| Resources::server(4, 8192))
    }

    /// Adds a node; returns its id.
    pub fn add_node(
        &mut self,
        provider: &str,
        pool: &str,
        label: &str,
        state: NodeState,
    ) -> String {
        let id = format!("{:010}", self.next_node);
        self.next_node += 1;
        let mut n = Node::new(state, self.now, provider, pool, vec![label.into()]);
        n.resources = Some(self.label_resources(provider, pool, label));
        n.launcher = self
            .local
            .pool_ids
            .get(&PoolKey::new(provider, pool))
            .cloned();
        self.snapshot.nodes.push(NodeRecord {
            id: id.clone(),
            node: Arc::new(n),
            version: 0,
            locked: false,
        });
        id
    }

    /// Changes a node in place.
    pub fn edit_node(&mut self, id: &str, f: impl FnOnce(&mut Node, &mut bool)) {
        if let Some(rec) = self.snapshot.nodes.iter_mut().find(|r| r.id == id) {
            let mut locked = rec.locked;
            f(Arc::make_mut(&mut rec.node), &mut locked);
            rec.locked = locked;
            rec.version += 1;
        }
    }

    /// A node by id.
    pub fn node(&self, id: &str) -> Option<&Node> {
        self.snapshot
            .nodes
            .iter()
            .find(|r| r.id == id)
            .map(|r| &*r.node)
    }

    /// Adds a request like Zuul's; returns its id.
    pub fn add_request(&mut self, labels: &[&str], priority: &str) -> String {
        let req = NodeRequest::new(
            labels.iter().map(|l| l.to_string()).collect(),
            "zuul-system",
            self.now,
        );
        self.push_request(req, priority, 0)
    }

    /// Adds a prepared request; returns its id.
    pub fn push_request(
        &mut self,
        req: NodeRequest,
        priority: &str,
        ephemeral_owner: i64,
    ) -> String {
        let id = format!("{priority}-{:010}", self.next_request);
        self.next_request += 1;
        self.snapshot.requests.push(RequestRecord {
            id: id.clone(),
            request: Arc::new(req),
            version: 0,
            ephemeral: ephemeral_owner != 0,
            ephemeral_owner,
            locked: false,
        });
        id
    }

    /// Changes a request in place.
    pub fn edit_request(&mut self, id: &str, f: impl FnOnce(&mut NodeRequest)) {
        if let Some(rec) = self.snapshot.requests.iter_mut().find(|r| r.id == id) {
            f(Arc::make_mut(&mut rec.request));
            rec.version += 1;
        }
    }

    /// A request by id.
    pub fn request(&self, id: &str) -> Option<&NodeRequest> {
        self.snapshot
            .requests
            .iter()
            .find(|r| r.id == id)
            .map(|r| &*r.request)
    }

    /// Marks a provider unavailable (its API failing) since now, or
    /// available again with `None`, as the launcher's breaker does.
    pub fn set_outage(&mut self, provider: &str, reason: Option<&str>) {
        let now = self.now;
        if let Some(v) = self.snapshot.providers.get_mut(provider) {
            v.outage = reason.map(|r| ProviderOutage {
                since: now,
                reason: r.to_owned(),
            });
        }
    }

    /// Plans one pass.
    pub fn plan(&self) -> Plan {
        plan(&self.snapshot, &self.config, self.now, &self.local)
    }

    /// Applies a plan the way the runtime would, with every action
    /// succeeding; launches stay `building` (locked) until
    /// [`World::finish_launches`].
    pub fn apply(&mut self, plan: &Plan) {
        for a in &plan.actions {
            self.apply_action(a);
        }
        for st in &plan.pools {
            let id = self.local.pool_ids.get(&st.pool).cloned();
            let unavailable = self
                .snapshot
                .providers
                .get(&st.pool.provider)
                .is_some_and(|v| v.outage.is_some());
            if let Some(p) = self
                .snapshot
                .pools
                .iter_mut()
                .find(|p| Some(&p.id) == id.as_ref())
            {
                p.paused = st.paused;
                p.unavailable = unavailable;
                p.launchable = Some(st.launchable.clone());
            }
        }
        self.local.leak_suspects = plan.leak_suspects.clone();
        self.local.down_ports = plan.down_ports.clone();
    }

    fn apply_action(&mut self, a: &Action) {
        let now = self.now;
        match a {
            Action::Accept { request, pool } => {
                self.edit_request(request, |r| r.set_state(RequestState::Pending, now));
                self.local
                    .owned_requests
                    .insert(request.clone(), pool.clone());
                self.set_request_locked(request, true);
            }
            Action::Decline {
                request,
                by,
                fail,
                deallocate,
                ..
            } => {
                for n in deallocate {
                    self.edit_node(n, |n, _| {
                        n.allocated_to = None;
                        n.tenant_name = None;
                    });
                }
                self.edit_request(request, |r| {
                    for b in by {
                        if !r.declined_by.contains(b) {
                            r.declined_by.push(b.clone());
                        }
                    }
                    r.set_state(
                        if *fail {
                            RequestState::Failed
                        } else {
                            RequestState::Requested
                        },
                        now,
                    );
                });
                self.local.owned_requests.remove(request);
                self.set_request_locked(request, false);
            }
            Action::Fail { request, .. } => {
                self.edit_request(request, |r| r.set_state(RequestState::Failed, now));
            }
            Action::Allocate { request, node } => {
                let (tenant, requestor) = self
                    .request(request)
                    .map(|r| (r.tenant_name.clone(), r.requestor.clone()))
                    .unwrap_or_default();
                self.edit_node(node, |n, _| {
                    n.allocated_to = Some(request.clone());
                    n.tenant_name = tenant;
                    n.requestor = requestor;
                });
            }
            Action::Launch {
                request,
                pool,
                label,
                image,
                az,
                resources,
            } => {
                let id = self.add_node(&pool.provider, &pool.pool, label, NodeState::Building);
                let tenant = self.request(request).and_then(|r| r.tenant_name.clone());
                self.edit_node(&id, |n, locked| {
                    n.allocated_to = Some(request.clone());
                    n.az = az.clone();
                    n.resources = Some(resources.clone());
                    n.tenant_name = tenant;
                    n.image_id = Some(match image {
                        LaunchImage::Upload { external_id, .. } => external_id.clone(),
                        LaunchImage::Cloud { name } => name.clone(),
                    });
                    *locked = true;
                });
            }
            Action::Fulfill { request, nodes } => {
                self.edit_request(request, |r| {
                    r.nodes = nodes.clone();
                    r.set_state(RequestState::Fulfilled, now);
                });
                self.local.owned_requests.remove(request);
                self.set_request_locked(request, false);
            }
            Action::Release { request } => {
                self.local.owned_requests.remove(request);
                self.set_request_locked(request, false);
            }
            Action::HandBack { request, .. } => {
                self.reset_request(request);
                self.local.owned_requests.remove(request);
                self.set_request_locked(request, false);
            }
            Action::ResetLost { request } => self.reset_request(request),
            Action::CreateMinReady { label } => {
                let mut r = NodeRequest::new(vec![label.clone()], MIN_READY_REQUESTOR, now);
                r.reuse = false;
                let session = self.local.session_id;
                self.push_request(r, "900", session);
            }
            Action::CompleteMinReady { request } => {
                let ids: Vec<String> = self
                    .snapshot
                    .nodes
                    .iter()
                    .filter(|n| n.node.allocated_to.as_deref() == Some(request))
                    .map(|n| n.id.clone())
                    .collect();
                for id in ids {
                    self.edit_node(&id, |n, _| {
                        n.allocated_to = None;
                        n.tenant_name = None;
                    });
                }
                self.snapshot.requests.retain(|r| &r.id != request);
            }
            Action::Deallocate { node } => self.edit_node(node, |n, _| {
                n.allocated_to = None;
                n.tenant_name = None;
            }),
            Action::DeleteNode { node, .. } => {
                // Deletion runs in the background under the node's lock.
                self.edit_node(node, |n, locked| {
                    n.set_state(NodeState::Deleting, now);
                    *locked = true;
                });
            }
            Action::DeleteEmptyNode { node } => {
                self.snapshot.empty_nodes.retain(|n| n != node);
            }
            Action::DeleteRequestLockDir { request } => {
                self.snapshot.request_lock_dirs.retain(|d| &d.id != request);
            }
            Action::DeleteLeakedInstance {
                provider,
                external_id,
            } => {
                if let Some(v) = self.snapshot.providers.get_mut(provider)
                    && let Some(insts) = v.instances.as_mut()
                {
                    insts.retain(|i| &i.external_id != external_id);
                }
            }
            Action::DeleteLeakedResource { provider, kind, id } => {
                if let Some(v) = self.snapshot.providers.get_mut(provider) {
                    let list = match kind {
                        ResourceKind::FloatingIp => v.floating_ips.as_mut(),
                        ResourceKind::Port => v.ports.as_mut(),
                    };
                    if let Some(list) = list {
                        list.retain(|r| &r.id != id);
                    }
                }
            }
        }
    }

    /// Back to the queue: `requested` with no nodes, ready nodes to the
    /// spares, `init` nodes deleted (their launch never started).
    fn reset_request(&mut self, request: &str) {
        let now = self.now;
        self.edit_request(request, |r| {
            r.nodes.clear();
            r.set_state(RequestState::Requested, now);
        });
        // Ready nodes go back to the spares; init nodes are deleted
        // (their launch never started).
        let ids: Vec<(String, NodeState)> = self
            .snapshot
            .nodes
            .iter()
            .filter(|n| n.node.allocated_to.as_deref() == Some(request) && !n.locked)
            .map(|n| (n.id.clone(), n.node.state))
            .collect();
        for (id, state) in ids {
            match state {
                NodeState::Ready => self.edit_node(&id, |n, _| {
                    n.allocated_to = None;
                    n.tenant_name = None;
                }),
                NodeState::Init => self.edit_node(&id, |n, locked| {
                    n.set_state(NodeState::Deleting, now);
                    *locked = true;
                }),
                _ => {}
            }
        }
    }

    fn set_request_locked(&mut self, id: &str, locked: bool) {
        if let Some(r) = self.snapshot.requests.iter_mut().find(|r| r.id == id) {
            r.locked = locked;
        }
    }

    /// Every `building` node becomes `ready` and unlocked.
    pub fn finish_launches(&mut self) {
        let now = self.now;
        for rec in &mut self.snapshot.nodes {
            if rec.node.state == NodeState::Building && rec.locked {
                Arc::make_mut(&mut rec.node).set_state(NodeState::Ready, now);
                rec.locked = false;
            }
        }
    }

    /// Every node being deleted (`deleting` and locked) is gone.
    pub fn finish_deletes(&mut self) {
        self.snapshot
            .nodes
            .retain(|n| !(n.node.state == NodeState::Deleting && n.locked));
    }

    /// Plans and applies until a pass plans nothing (launches and deletes
    /// finishing between passes); returns the number of passes, at most `max`.
    pub fn run(&mut self, max: usize) -> usize {
        for pass in 1..=max {
            let p = self.plan();
            let idle = p.actions.is_empty();
            self.apply(&p);
            self.finish_launches();
            self.finish_deletes();
            if idle {
                return pass;
            }
        }
        max
    }

    /// Counts nodes by state.
    pub fn count_nodes(&self, state: NodeState) -> usize {
        self.snapshot
            .nodes
            .iter()
            .filter(|n| n.node.state == state)
            .count()
    }

    /// Requests by state.
    pub fn requests_in(&self, state: RequestState) -> Vec<String> {
        self.snapshot
            .requests
            .iter()
            .filter(|r| r.request.state == state)
            .map(|r| r.id.clone())
            .collect()
    }

    /// The resources of every node, summed per pool.
    pub fn usage_by_pool(&self) -> BTreeMap<PoolKey, Resources> {
        let mut out: BTreeMap<PoolKey, Resources> = BTreeMap::new();
        for rec in &self.snapshot.nodes {
            if let Some(r) = &rec.node.resources {
                out.entry(PoolKey::new(&rec.node.provider, &rec.node.pool))
                    .or_default()
                    .add(r);
            }
        }
        out
    }
}
