//! "Why is my request waiting?": the planner's own rules asked about one
//! request, pool by pool (`nodepool request-explain`, the web app's
//! `/request-explain/<id>`).
//!
//! Pure, like [`plan`]: every configured pool is looked at
//! through the same index and quota accounting a launcher's pass builds,
//! and whether a pool would take the request now is what a real pass
//! plans. Only the wording is the explanation's own.

use std::collections::HashMap;
use std::fmt;

use super::fast::Key;
use super::index::{Index, node_resources};
use super::quota::{QuotaScope, QuotaState, Shortfall};
use super::{Action, LocalState, PoolKey, Snapshot, plan, request_order};
use crate::config::{Config, ImageSource};
use crate::model::{NodeState, RequestState, Resources};
use crate::store::RequestRecord;

/// What the planner makes of one request.
#[derive(Clone, Debug, PartialEq)]
pub struct RequestExplanation {
    /// Request id.
    pub request: String,
    /// Its state.
    pub state: RequestState,
    /// The labels it asks for.
    pub labels: Vec<String>,
    /// One line on where it stands as a whole.
    pub summary: String,
    /// Per configured pool, why it does (not) serve the request; empty
    /// once the request is fulfilled or failed.
    pub pools: Vec<PoolVerdict>,
}

impl RequestExplanation {
    /// The text `nodepool request-explain` prints: the summary, then one
    /// indented line per pool.
    pub fn to_text(&self) -> String {
        let mut text = format!(
            "request {} ({}): {}",
            self.request,
            self.labels.join(", "),
            self.summary
        );
        for p in &self.pools {
            text.push_str(&format!(
                "\n  {}/{}: {}",
                p.pool.provider, p.pool.pool, p.verdict
            ));
        }
        text
    }

    /// One line on why it waits: the pool that holds it or would take it
    /// (the next pass, else its turn in the queue), else the first pool's
    /// reason, else the summary.
    pub fn one_line(&self) -> String {
        let rank = |v: &Verdict| match v {
            Verdict::Holds { .. } => 0,
            Verdict::WouldTake => 1,
            Verdict::Queued { .. } => 2,
            _ => 3,
        };
        match self.pools.iter().min_by_key(|p| rank(&p.verdict)) {
            Some(p) => format!("{}/{}: {}", p.pool.provider, p.pool.pool, p.verdict),
            None => self.summary.clone(),
        }
    }

    /// The JSON document of `--json` and the web app: `id`, `state`,
    /// `node_types`, `summary` and `pools` (`provider`, `pool`, `verdict`
    /// as [`Verdict::kind`], `reason` as the line of text).
    pub fn to_json(&self) -> serde_json::Value {
        let pools: Vec<serde_json::Value> = self
            .pools
            .iter()
            .map(|p| {
                serde_json::json!({
                    "provider": p.pool.provider,
                    "pool": p.pool.pool,
                    "verdict": p.verdict.kind(),
                    "reason": p.verdict.to_string(),
                })
            })
            .collect();
        serde_json::json!({
            "id": self.request,
            "state": self.state.as_str(),
            "node_types": self.labels,
            "summary": self.summary,
            "pools": pools,
        })
    }
}

/// One pool's answer.
#[derive(Clone, Debug, PartialEq)]
pub struct PoolVerdict {
    /// Which pool.
    pub pool: PoolKey,
    /// Its answer.
    pub verdict: Verdict,
}

/// Why a pool does or does not serve a request, the first reason found
/// in the order the planner checks them.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub enum Verdict {
    /// No running launcher has registered the pool.
    NoLauncher,
    /// The pool's launcher declined it already.
    Declined,
    /// `max-servers` is 0 or less.
    Disabled,
    /// The provider's `max-concurrency` is 0.
    TakesNoRequests,
    /// The pool does not serve one of the labels.
    LabelNotServed {
        /// The label.
        label: String,
    },
    /// The label's diskimage has no ready upload to the provider.
    ImageNotReady {
        /// The label.
        label: String,
        /// Its diskimage.
        image: String,
    },
    /// The label's cloud image is missing from the cloud.
    CloudImageMissing {
        /// The label.
        label: String,
        /// Its cloud image (config name).
        image: String,
    },
    /// The provider's API is failing; its pools take nothing.
    Unavailable {
        /// The latest failure.
        reason: String,
    },
    /// The request's nodes together can never fit a limit.
    NeverFits(Shortfall),
    /// A limit is reached now.
    QuotaFull(Shortfall),
    /// `max-concurrency` launches are in flight already.
    ConcurrencyFull {
        /// Launches in flight.
        in_flight: usize,
        /// The provider's `max-concurrency`.
        limit: u32,
    },
    /// The pool waits for quota for a request it holds, and takes no
    /// other until then.
    Paused,
    /// The pool holds the request and is getting its nodes.
    Holds {
        /// Its nodes that are ready.
        ready: usize,
        /// Its nodes being launched.
        building: usize,
        /// How many it needs.
        total: usize,
    },
    /// The next pass of the pool's launcher takes it.
    WouldTake,
    /// The pool could serve it; requests before it in the queue come
    /// first (another pool may also be preferred).
    Queued {
        /// Waiting requests ahead of it.
        ahead: usize,
    },
}

impl Verdict {
    /// A short stable name for machines (`quota-full`, `would-take`, ...).
    pub fn kind(&self) -> &'static str {
        match self {
            Verdict::NoLauncher => "no-launcher",
            Verdict::Declined => "declined",
            Verdict::Disabled => "disabled",
            Verdict::TakesNoRequests => "takes-no-requests",
            Verdict::LabelNotServed { .. } => "label-not-served",
            Verdict::ImageNotReady { .. } => "image-not-ready",
            Verdict::CloudImageMissing { .. } => "cloud-image-missing",
            Verdict::Unavailable { .. } => "unavailable",
            Verdict::NeverFits(_) => "never-fits",
            Verdict::QuotaFull(_) => "quota-full",
            Verdict::ConcurrencyFull { .. } => "max-concurrency",
            Verdict::Paused => "paused",
            Verdict::Holds { .. } => "holds",
            Verdict::WouldTake => "would-take",
            Verdict::Queued { .. } => "queued",
        }
    }
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Verdict::NoLauncher => f.write_str("no running launcher serves this pool"),
            Verdict::Declined => f.write_str("declined it already"),
            Verdict::Disabled => f.write_str("disabled (max-servers is 0 or less)"),
            Verdict::TakesNoRequests => f.write_str("takes no requests (max-concurrency 0)"),
            Verdict::LabelNotServed { label } => write!(f, "does not serve label {label}"),
            Verdict::ImageNotReady { label, image } => write!(
                f,
                "label {label}: diskimage {image} has no ready upload to this provider"
            ),
            Verdict::CloudImageMissing { label, image } => {
                write!(
                    f,
                    "label {label}: cloud image {image} is missing in the cloud"
                )
            }
            Verdict::Unavailable { reason } => write!(f, "provider unavailable: {reason}"),
            Verdict::NeverFits(s) => write!(
                f,
                "can never fit: needs {} {} of the {}'s limit of {}",
                s.need,
                s.resource,
                scope(&s.scope),
                s.limit
            ),
            Verdict::QuotaFull(s) => write!(
                f,
                "quota full: {} {} is {} of {} in use, {} more needed",
                scope(&s.scope),
                s.resource,
                s.used,
                s.limit,
                (s.used + s.need - s.limit).max(1)
            ),
            Verdict::ConcurrencyFull { in_flight, limit } => write!(
                f,
                "max-concurrency reached: {in_flight} launches in flight (limit {limit})"
            ),
            Verdict::Paused => f.write_str("paused: waiting for quota for a request it holds"),
            Verdict::Holds {
                ready,
                building,
                total,
            } => write!(
                f,
                "holds it: {ready} of {total} nodes ready, {building} being launched"
            ),
            Verdict::WouldTake => f.write_str("takes it in its launcher's next pass"),
            Verdict::Queued { ahead } => write!(
                f,
                "could serve it; {ahead} waiting request{} ahead of it",
                if *ahead == 1 { "" } else { "s" }
            ),
        }
    }
}

fn scope(s: &QuotaScope) -> String {
    match s {
        QuotaScope::Pool => "pool".into(),
        QuotaScope::Cloud => "cloud".into(),
        QuotaScope::Tenant(t) => format!("tenant {t}"),
    }
}

/// Explains request `id` against `snapshot` as launchers running `config`
/// would plan it at `now`; `None` when there is no such request.
///
/// ```no_run
/// # fn example(snapshot: &nodepool_core::planner::Snapshot, config: &nodepool_core::config::Config) {
/// use nodepool_core::planner::explain::explain_request;
///
/// if let Some(why) = explain_request(snapshot, config, 1_800_000_000.0, "100-0000000042") {
///     println!("{}", why.summary);
///     for p in &why.pools {
///         println!("  {}/{}: {}", p.pool.provider, p.pool.pool, p.verdict);
///     }
/// }
/// # }
/// ```
pub fn explain_request(
    snapshot: &Snapshot,
    config: &Config,
    now: f64,
    id: &str,
) -> Option<RequestExplanation> {
    let req = snapshot.requests.iter().find(|r| r.id == id)?;
    if matches!(
        req.request.state,
        RequestState::Fulfilled | RequestState::Failed
    ) {
        return Some(explain_with(None, snapshot, config, now, req));
    }
    let view = PlannerView::new(
        snapshot,
        config,
        now,
        req.request.state == RequestState::Requested,
    );
    Some(explain_with(Some(&view), snapshot, config, now, req))
}

/// One line per request that is neither fulfilled nor failed, in the
/// snapshot's order: its id and why it waits (the pool that holds it or
/// would take it, else the first pool's reason). The planner's view is
/// built once for all of them, so a dashboard can ask this every time it
/// looks at the store.
pub fn explain_waiting(snapshot: &Snapshot, config: &Config, now: f64) -> Vec<(String, String)> {
    let waiting: Vec<&RequestRecord> = snapshot
        .requests
        .iter()
        .filter(|r| {
            !matches!(
                r.request.state,
                RequestState::Fulfilled | RequestState::Failed
            )
        })
        .collect();
    if waiting.is_empty() {
        return Vec::new();
    }
    let planning = waiting
        .iter()
        .any(|r| r.request.state == RequestState::Requested);
    let view = PlannerView::new(snapshot, config, now, planning);
    waiting
        .into_iter()
        .map(|req| {
            let x = explain_with(Some(&view), snapshot, config, now, req);
            (req.id.clone(), x.one_line())
        })
        .collect()
}

/// One configured pool's quota use, as a planning pass counts it.
#[derive(Clone, Debug, PartialEq)]
pub struct PoolUse {
    /// Which pool.
    pub pool: PoolKey,
    /// What its nodes use (every state counts, as for quota).
    pub used: Resources,
    /// Its `max-*` limits.
    pub limits: crate::model::Limits,
}

/// Every configured pool's quota use, in configuration order.
pub fn pool_usage(snapshot: &Snapshot, config: &Config) -> Vec<PoolUse> {
    let index = Index::build(snapshot, config, &registered_pools(snapshot));
    let mut out = Vec::new();
    let mut pos = 0;
    for p in &config.providers {
        for pool in &p.pools {
            out.push(PoolUse {
                pool: PoolKey::new(&p.name, &pool.name),
                used: index.pool_used.get(pos).cloned().unwrap_or_default(),
                limits: pool.limits(),
            });
            pos += 1;
        }
    }
    out
}

/// Every configured pool under the id its launcher registered.
fn registered_pools(snapshot: &Snapshot) -> LocalState {
    let mut local = LocalState::default();
    for info in &snapshot.pools {
        local
            .pool_ids
            .insert(PoolKey::new(&info.provider, &info.pool), info.id.clone());
    }
    local
}

/// What the planner sees of a snapshot, built once for any number of
/// requests: its index, quota accounting and, when asked, which pool a
/// pass would accept each requested request in.
struct PlannerView<'a> {
    index: Index<'a>,
    quota: QuotaState,
    accepted: HashMap<String, PoolKey>,
}

impl<'a> PlannerView<'a> {
    fn new(snapshot: &'a Snapshot, config: &'a Config, now: f64, planning: bool) -> Self {
        let local = registered_pools(snapshot);
        let index = Index::build(snapshot, config, &local);
        let quota = QuotaState::new(
            snapshot,
            config,
            &index.pool_used,
            &index.unpooled_used,
            |i| node_resources(snapshot, i),
        );
        let accepted = if planning {
            plan(snapshot, config, now, &local)
                .actions
                .into_iter()
                .filter_map(|a| match a {
                    Action::Accept { request, pool } => Some((request, pool)),
                    _ => None,
                })
                .collect()
        } else {
            HashMap::new()
        };
        PlannerView {
            index,
            quota,
            accepted,
        }
    }
}

/// Explains `req`; `view` is needed unless it is fulfilled or failed.
fn explain_with(
    view: Option<&PlannerView<'_>>,
    snapshot: &Snapshot,
    config: &Config,
    now: f64,
    req: &RequestRecord,
) -> RequestExplanation {
    let r = &req.request;
    let mut out = RequestExplanation {
        request: req.id.clone(),
        state: r.state,
        labels: r.node_types.clone(),
        summary: String::new(),
        pools: Vec::new(),
    };
    let age = (now - r.state_time).max(0.0);
    match r.state {
        RequestState::Fulfilled => {
            out.summary = format!(
                "fulfilled {age:.0} s ago with nodes {}: its requestor has them",
                r.nodes.join(", ")
            );
            return out;
        }
        RequestState::Failed => {
            out.summary = if r.declined_by.is_empty() {
                format!("failed {age:.0} s ago")
            } else {
                format!(
                    "failed {age:.0} s ago: declined by {}",
                    r.declined_by.join(", ")
                )
            };
            return out;
        }
        _ => {}
    }
    let Some(view) = view else {
        out.summary = format!("{} for {age:.0} s", r.state.as_str());
        return out;
    };
    let accepted_by = view.accepted.get(&req.id);
    let holder = holding_pool(snapshot, req);
    for (pos, ours) in view.index.our_pools.iter().enumerate() {
        let verdict = if holder.as_ref() == Some(&ours.key) {
            holds(snapshot, req)
        } else {
            pool_verdict(
                snapshot,
                config,
                &view.index,
                &view.quota,
                pos,
                req,
                accepted_by,
            )
        };
        out.pools.push(PoolVerdict {
            pool: ours.key.clone(),
            verdict,
        });
    }
    out.summary = match (r.state, &holder) {
        (RequestState::Pending, Some(k)) => format!(
            "pending for {age:.0} s: pool {}/{} holds it",
            k.provider, k.pool
        ),
        (RequestState::Pending, None) => format!(
            "pending for {age:.0} s{}",
            if req.locked {
                ": a launcher holds it and has launched nothing yet"
            } else {
                ": nobody holds it; the next pass puts it back in the queue"
            }
        ),
        _ => {
            let serving = out
                .pools
                .iter()
                .filter(|p| matches!(p.verdict, Verdict::WouldTake | Verdict::Queued { .. }))
                .count();
            format!(
                "requested {age:.0} s ago; {serving} of {} pools could serve it now",
                out.pools.len()
            )
        }
    };
    out
}

/// The pool of the nodes allocated to a pending request, if any.
fn holding_pool(s: &Snapshot, req: &RequestRecord) -> Option<PoolKey> {
    if req.request.state != RequestState::Pending {
        return None;
    }
    s.nodes
        .iter()
        .find(|n| n.node.allocated_to.as_deref() == Some(req.id.as_str()))
        .map(|n| PoolKey::new(&n.node.provider, &n.node.pool))
}

fn holds(s: &Snapshot, req: &RequestRecord) -> Verdict {
    let mut ready = 0;
    let mut building = 0;
    for n in s
        .nodes
        .iter()
        .filter(|n| n.node.allocated_to.as_deref() == Some(req.id.as_str()))
    {
        match n.node.state {
            NodeState::Ready => ready += 1,
            NodeState::Init | NodeState::Building => building += 1,
            _ => {}
        }
    }
    Verdict::Holds {
        ready,
        building,
        total: req.request.node_types.len(),
    }
}

fn pool_verdict(
    s: &Snapshot,
    cfg: &Config,
    index: &Index<'_>,
    quota: &QuotaState,
    pos: usize,
    req: &RequestRecord,
    accepted_by: Option<&PoolKey>,
) -> Verdict {
    let ours = &index.our_pools[pos];
    let provider = &cfg.providers[ours.provider];
    let pool = &provider.pools[ours.pool];
    let r = &req.request;
    let Some(registered) = s
        .pools
        .iter()
        .find(|p| p.provider == ours.key.provider && p.pool == ours.key.pool)
    else {
        return Verdict::NoLauncher;
    };
    if r.declined_by.contains(&registered.id) {
        return Verdict::Declined;
    }
    if pool.is_disabled() {
        return Verdict::Disabled;
    }
    if provider.max_concurrency == Some(0) {
        return Verdict::TakesNoRequests;
    }
    let mut need = Resources::new();
    for label in &r.node_types {
        let Some(info) = ours.labels.get(&Key(label)) else {
            return Verdict::LabelNotServed {
                label: label.clone(),
            };
        };
        if info.image.is_none() {
            let configured = pool.labels.iter().find(|l| &l.name == label);
            return match configured.map(|l| &l.image) {
                Some(ImageSource::CloudImage(image)) => Verdict::CloudImageMissing {
                    label: label.clone(),
                    image: image.clone(),
                },
                Some(ImageSource::DiskImage(image)) => Verdict::ImageNotReady {
                    label: label.clone(),
                    image: image.clone(),
                },
                Some(ImageSource::Static) | None => Verdict::LabelNotServed {
                    label: label.clone(),
                },
            };
        }
        need.add(&info.resources);
    }
    if let Some(outage) = index.outage[ours.provider] {
        return Verdict::Unavailable {
            reason: outage.reason.clone(),
        };
    }
    if registered.unavailable {
        return Verdict::Unavailable {
            reason: "its launcher reports the provider unavailable".into(),
        };
    }
    if let Some(short) = quota.shortfall(pos, None, &need, true) {
        return Verdict::NeverFits(short);
    }
    if let Some(short) = quota.shortfall(pos, r.tenant_name.as_deref(), &need, false) {
        return Verdict::QuotaFull(short);
    }
    if let Some(limit) = provider.max_concurrency
        && index.in_flight[ours.provider] >= limit as usize
    {
        return Verdict::ConcurrencyFull {
            in_flight: index.in_flight[ours.provider],
            limit,
        };
    }
    if registered.paused {
        return Verdict::Paused;
    }
    if accepted_by == Some(&ours.key) {
        return Verdict::WouldTake;
    }
    let mine = request_order(&req.id, r.relative_priority);
    let ahead = s
        .requests
        .iter()
        .filter(|o| {
            o.request.state == RequestState::Requested
                && request_order(&o.id, o.request.relative_priority) < mine
        })
        .count();
    Verdict::Queued { ahead }
}
