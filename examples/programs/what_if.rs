//! What would Nodepool do with another configuration? `what_if` loads a
//! store export, runs one pass of the pure planners on it (the launcher's
//! `planner::plan` and the builder's `planner::images::plan_images`) with
//! the configuration as it is and as changed — another `max-servers`, a
//! provider removed — and prints the actions each would take, marking
//! what the change adds (`+`) and takes away (`-`). It touches nothing:
//! the export is loaded into an in-memory store, no cloud is called, no
//! action is carried out.
//!
//! On the bundled sample (`examples/what-if-store.json`, configured by
//! `examples/what-if.yaml`), trying `max-servers: 1` for cloud-a and
//! cloud-b removed:
//!
//! ```text
//! cargo run -p nodepool-examples --example what_if
//! ```
//!
//! On an export of your own:
//!
//! ```text
//! cargo run -p nodepool-examples --example what_if -- STORE.json nodepool.yaml \
//!     [--max-servers PROVIDER/POOL=N]... [--remove-provider NAME]... [--now EPOCH]
//! ```
//!
//! A store export is a JSON object from record paths to records: the shape
//! of `nodepool export-image-data`, whose files load as they are. A record
//! is its JSON text (as exported) or a JSON object; lock contenders
//! (`.../lock/<id>__lock__<seq>`) mark what is locked. The planners see the
//! store as of the newest time in it unless `--now` says otherwise, and
//! the clouds as the configuration describes them (simulated quotas and
//! flavors; nothing is known of other clouds' limits or servers). The
//! program plays the launcher that registered the export's pools after it
//! reloaded the changed configuration: pending requests it holds stay its
//! own, and the pools of a removed provider leave the registry.

use std::collections::{BTreeMap, BTreeSet};
use std::error::Error;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use nodepool_core::cloud::choose_flavor;
use nodepool_core::config::{Config, Driver};
use nodepool_core::model::{ComponentKind, RequestState, Resources};
use nodepool_core::planner::images::{BuilderLocal, ImageAction, ImageSnapshot, plan_images};
use nodepool_core::planner::{
    Action, LaunchImage, LocalState, PoolInfo, PoolKey, ProviderView, Snapshot, plan,
};
use nodepool_core::store::{
    CreateMode, ImageState, Listing, MemoryStore, NodeRecord, RequestLockDir, RequestRecord,
    StateStore, Store, StoreError, split_path,
};

type Result<T> = std::result::Result<T, Box<dyn Error>>;

const USAGE: &str = "usage: what_if [STORE.json CONFIG.yaml [--max-servers PROVIDER/POOL=N]... \
                     [--remove-provider NAME]... [--now EPOCH]]";

/// A change to try.
#[derive(Clone, Debug)]
enum Change {
    /// Set one pool's `max-servers`.
    MaxServers {
        provider: String,
        pool: String,
        max: i64,
    },
    /// Take a provider out of the configuration.
    RemoveProvider(String),
}

impl std::fmt::Display for Change {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Change::MaxServers {
                provider,
                pool,
                max,
            } => write!(f, "max-servers {max} for {provider}/{pool}"),
            Change::RemoveProvider(p) => write!(f, "provider {p} removed"),
        }
    }
}

/// What to run: an export, its configuration, the what-ifs.
struct Args {
    store: PathBuf,
    config: PathBuf,
    /// Each entry is one scenario (a set of changes tried together).
    scenarios: Vec<Vec<Change>>,
    now: Option<f64>,
}

fn main() -> ExitCode {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let result = parse_args(&argv).and_then(|args| {
        tokio::runtime::Builder::new_current_thread()
            .build()?
            .block_on(run(args))
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("what_if: {e}");
            ExitCode::FAILURE
        }
    }
}

fn parse_args(argv: &[String]) -> Result<Args> {
    if argv.is_empty() {
        // The bundled sample, with two what-ifs tried one at a time.
        let dir = Path::new(env!("CARGO_MANIFEST_DIR"));
        return Ok(Args {
            store: dir.join("what-if-store.json"),
            config: dir.join("what-if.yaml"),
            scenarios: vec![
                vec![Change::MaxServers {
                    provider: "cloud-a".into(),
                    pool: "main".into(),
                    max: 1,
                }],
                vec![Change::RemoveProvider("cloud-b".into())],
            ],
            now: None,
        });
    }
    let mut paths = Vec::new();
    let mut changes = Vec::new();
    let mut now = None;
    let mut it = argv.iter();
    while let Some(arg) = it.next() {
        let mut value = |flag: &str| {
            it.next()
                .cloned()
                .ok_or_else(|| format!("{flag} needs a value"))
        };
        match arg.as_str() {
            "--max-servers" => {
                let v = value(arg)?;
                let parsed = v.split_once('=').and_then(|(pool, max)| {
                    let (provider, pool) = pool.split_once('/')?;
                    Some((provider, pool, max.parse::<i64>().ok()?))
                });
                let Some((provider, pool, max)) = parsed else {
                    return Err(format!("--max-servers {v:?}: expected PROVIDER/POOL=N").into());
                };
                changes.push(Change::MaxServers {
                    provider: provider.to_owned(),
                    pool: pool.to_owned(),
                    max,
                });
            }
            "--remove-provider" => changes.push(Change::RemoveProvider(value(arg)?)),
            "--now" => {
                let v = value(arg)?;
                now = Some(
                    v.parse::<f64>()
                        .map_err(|_| format!("--now {v:?}: expected epoch seconds"))?,
                );
            }
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            flag if flag.starts_with("--") => return Err(format!("unknown flag {flag}").into()),
            path => paths.push(PathBuf::from(path)),
        }
    }
    let [store, config] = <[PathBuf; 2]>::try_from(paths).map_err(|_| USAGE)?;
    Ok(Args {
        store,
        config,
        scenarios: if changes.is_empty() {
            Vec::new()
        } else {
            vec![changes]
        },
        now,
    })
}

/// The export's records, read once through the typed store.
struct Records {
    nodes: Listing<NodeRecord>,
    requests: Listing<RequestRecord>,
    pools: Vec<PoolInfo>,
    images: ImageState,
    lock_dirs: Vec<RequestLockDir>,
}

async fn run(args: Args) -> Result<()> {
    let config = Config::load(&args.config, None)?;
    // Every change is checked before anything is printed.
    let mut scenarios = Vec::new();
    for changes in &args.scenarios {
        let mut changed = config.clone();
        for c in changes {
            apply(&mut changed, c)?;
        }
        let what: Vec<String> = changes.iter().map(Change::to_string).collect();
        scenarios.push((what.join(", "), changed));
    }
    let store = load_export(&args.store).await?;
    let records = Records {
        nodes: store.list_nodes().await?,
        requests: store.list_requests().await?,
        pools: store
            .list_components(ComponentKind::Pool)
            .await?
            .records
            .iter()
            .filter_map(|(_, c)| PoolInfo::from_component(c))
            .collect(),
        images: store.image_state().await?,
        lock_dirs: store.list_request_lock_dirs().await?,
    };
    let now = args.now.unwrap_or_else(|| newest_time(&records));
    println!(
        "{}: {} nodes, {} requests, {} registered pools, {} builds, {} uploads; planning at {now}",
        shown(&args.store),
        records.nodes.records.len(),
        records.requests.records.len(),
        records.pools.len(),
        records.images.builds.len(),
        records.images.uploads.len(),
    );

    let baseline = describe_plans(&records, &config, now);
    println!("\nAs configured ({}):", shown(&args.config));
    print_lines(&baseline, &[]);
    for (what, changed) in scenarios {
        println!("\nWith {what}:");
        print_lines(&describe_plans(&records, &changed, now), &baseline);
    }
    Ok(())
}

/// A path as the user would type it: the bundled sample's relative to the
/// workspace, others as given.
fn shown(path: &Path) -> String {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).parent();
    workspace
        .and_then(|w| path.strip_prefix(w).ok())
        .unwrap_or(path)
        .display()
        .to_string()
}

/// Loads an export into a fresh in-memory store: a real `StateStore`, so
/// the typed listings decode, skip and lock exactly as on ZooKeeper.
async fn load_export(path: &Path) -> Result<Store> {
    let text =
        std::fs::read_to_string(path).map_err(|e| format!("reading {}: {e}", path.display()))?;
    let doc: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| format!("{}: not a store export: {e}", path.display()))?;
    let Some(records) = doc.as_object() else {
        return Err(format!("{}: not a store export: not a JSON object", path.display()).into());
    };
    let memory = Arc::new(MemoryStore::new());
    // Parents before children, whatever order the file has.
    let sorted: BTreeMap<&String, &serde_json::Value> = records.iter().collect();
    for (record_path, value) in sorted {
        let data = match value {
            serde_json::Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        if !record_path.starts_with("/nodepool/") {
            return Err(format!("{}: {record_path:?} is not a store path", path.display()).into());
        }
        match memory
            .create(record_path, data.as_bytes(), CreateMode::Persistent)
            .await
        {
            Ok(_) => {}
            // Made already as the parent of an earlier record.
            Err(StoreError::Conflict { .. }) => {
                memory.set(record_path, data.as_bytes(), None).await?;
            }
            Err(e) => return Err(format!("{}: {record_path}: {e}", path.display()).into()),
        }
    }
    Ok(Store::new(memory))
}

/// The newest time recorded anywhere in the export.
fn newest_time(r: &Records) -> f64 {
    let nodes = r.nodes.records.iter().map(|n| n.node.state_time);
    let requests = r.requests.records.iter().map(|q| q.request.state_time);
    let builds = r.images.builds.iter().map(|b| b.build.state_time);
    let uploads = r.images.uploads.iter().map(|u| u.upload.state_time);
    nodes
        .chain(requests)
        .chain(builds)
        .chain(uploads)
        .fold(0.0, f64::max)
}

fn apply(config: &mut Config, change: &Change) -> Result<()> {
    match change {
        Change::MaxServers {
            provider,
            pool,
            max,
        } => {
            let p = config
                .providers
                .iter_mut()
                .find(|p| &p.name == provider)
                .ok_or_else(|| format!("{change}: no provider {provider:?}"))?;
            let q = p
                .pools
                .iter_mut()
                .find(|q| &q.name == pool)
                .ok_or_else(|| format!("{change}: no pool {pool:?} in {provider}"))?;
            q.max_servers = Some(*max);
        }
        Change::RemoveProvider(name) => {
            let before = config.providers.len();
            config.providers.retain(|p| &p.name != name);
            if config.providers.len() == before {
                return Err(format!("{change}: no provider {name:?}").into());
            }
        }
    }
    Ok(())
}

/// Both planners' actions (and the builder's notes), one line each.
fn describe_plans(r: &Records, config: &Config, now: f64) -> Vec<String> {
    let (snapshot, local) = launcher_view(r, config);
    let mut lines: Vec<String> = plan(&snapshot, config, now, &local)
        .actions
        .iter()
        .map(|a| format!("launcher: {}", describe(a)))
        .collect();
    let images = ImageSnapshot {
        images: r.images.clone(),
        // A builder's files are on its disk, not in the store.
        local_files: BTreeMap::new(),
        cloud_images: BTreeMap::new(),
    };
    let builder = plan_images(&images, config, now, &BuilderLocal::default());
    lines.extend(
        builder
            .actions
            .iter()
            .map(|a| format!("builder: {}", describe_image(a))),
    );
    lines.extend(builder.notes.iter().map(|n| format!("builder note: {n}")));
    lines
}

/// The snapshot and local state of the launcher that registered the
/// export's pools, running `config`.
fn launcher_view(r: &Records, config: &Config) -> (Snapshot, LocalState) {
    let configured: BTreeSet<PoolKey> = config
        .providers
        .iter()
        .flat_map(|p| p.pools.iter().map(|q| PoolKey::new(&p.name, &q.name)))
        .collect();
    let pools: Vec<PoolInfo> = r
        .pools
        .iter()
        .filter(|p| configured.contains(&PoolKey::new(&p.provider, &p.pool)))
        .cloned()
        .collect();
    let mut local = LocalState::default();
    for key in &configured {
        let id = pools
            .iter()
            .find(|p| p.provider == key.provider && p.pool == key.pool)
            .map(|p| p.id.clone())
            .unwrap_or_else(|| format!("what-if-PoolWorker.{}-{}", key.provider, key.pool));
        local.pool_ids.insert(key.clone(), id);
    }
    // The pending requests whose lock is held: ours, in the pool of the
    // nodes they have.
    for q in &r.requests.records {
        if q.request.state != RequestState::Pending || !q.locked {
            continue;
        }
        let node = r
            .nodes
            .records
            .iter()
            .find(|n| n.node.allocated_to.as_deref() == Some(q.id.as_str()));
        if let Some(n) = node {
            local
                .owned_requests
                .insert(q.id.clone(), PoolKey::new(&n.node.provider, &n.node.pool));
        }
    }
    let providers = config
        .providers
        .iter()
        .map(|p| {
            let mut view = ProviderView::default();
            if let Driver::Simulated(sim) = &p.driver {
                view.limits = sim.quota.clone();
                view.availability_zones = sim.availability_zones.clone();
                for pool in &p.pools {
                    for label in &pool.labels {
                        if let Some(f) = choose_flavor(&sim.flavors, label) {
                            view.label_resources
                                .entry(pool.name.clone())
                                .or_default()
                                .insert(label.name.clone(), Resources::server(f.vcpus, f.ram));
                        }
                    }
                }
            }
            (p.name.clone(), view)
        })
        .collect();
    let snapshot = Snapshot {
        nodes: r.nodes.records.clone(),
        requests: r.requests.records.clone(),
        pools,
        images: r.images.clone(),
        providers,
        request_lock_dirs: r.lock_dirs.clone(),
        empty_nodes: r
            .nodes
            .malformed
            .iter()
            .filter(|m| m.reason == "empty record")
            .map(|m| split_path(&m.path).1.to_owned())
            .collect(),
    };
    (snapshot, local)
}

/// Prints `lines`, marking those not in `baseline` with `+` and listing
/// the baseline's lines missing here with `-` (nothing marked without a
/// baseline).
fn print_lines(lines: &[String], baseline: &[String]) {
    if lines.is_empty() && baseline.is_empty() {
        println!("  nothing to do");
    }
    let here: BTreeSet<&String> = lines.iter().collect();
    let before: BTreeSet<&String> = baseline.iter().collect();
    for l in lines {
        let mark = if baseline.is_empty() || before.contains(l) {
            ' '
        } else {
            '+'
        };
        println!("{mark} {l}");
    }
    for l in baseline {
        if !here.contains(l) {
            println!("- {l}");
        }
    }
}

fn describe(a: &Action) -> String {
    match a {
        Action::Accept { request, pool } => format!("accept request {request} in {pool}"),
        Action::Decline {
            request,
            fail,
            reason,
            ..
        } => format!(
            "decline request {request}{}: {reason}",
            if *fail { " (it fails)" } else { "" }
        ),
        Action::Fail { request, reason } => format!("fail request {request}: {reason}"),
        Action::Allocate { request, node } => {
            format!("hand ready node {node} to request {request}")
        }
        Action::Launch {
            request,
            pool,
            label,
            image,
            ..
        } => {
            let image = match image {
                LaunchImage::Upload { image, build, .. } => format!("{image} build {build}"),
                LaunchImage::Cloud { name } => format!("cloud image {name}"),
            };
            format!("launch a {label} node in {pool} for request {request}, booting {image}")
        }
        Action::Fulfill { request, nodes } => {
            format!("fulfil request {request} with {}", nodes.join(", "))
        }
        Action::HandBack { request, reason } => format!("hand request {request} back: {reason}"),
        Action::Release { request } => format!("let go of request {request}"),
        Action::ResetLost { request } => format!("reset lost request {request}"),
        Action::CreateMinReady { label } => format!("ask for a min-ready {label} node"),
        Action::CompleteMinReady { request } => format!("complete min-ready request {request}"),
        Action::Deallocate { node } => format!("take node {node} back as a spare"),
        Action::DeleteNode { node, reason } => {
            format!("delete node {node} ({})", reason.as_str())
        }
        Action::DeleteRequestLockDir { request } => {
            format!("remove the stale lock directory of request {request}")
        }
        Action::DeleteEmptyNode { node } => format!("remove empty node record {node}"),
        Action::DeleteLeakedInstance {
            provider,
            external_id,
        } => format!("delete leaked server {external_id} in {provider}"),
        Action::DeleteLeakedResource { provider, kind, id } => {
            format!("delete leaked {} {id} in {provider}", kind.metric_name())
        }
    }
}

fn describe_image(a: &ImageAction) -> String {
    match a {
        ImageAction::Build { image, reason, .. } => format!("build {image} ({reason})"),
        ImageAction::Snapshot {
            image,
            provider,
            reason,
            ..
        } => format!("snapshot {image} in {provider} ({reason})"),
        ImageAction::Upload {
            image,
            build,
            provider,
            ..
        } => format!("upload {image} build {build} to {provider}"),
        ImageAction::DeleteUpload {
            image,
            build,
            provider,
            upload,
            reason,
        } => format!("delete upload {upload} of {image} build {build} in {provider} ({reason})"),
        ImageAction::RemoveDeadUpload {
            image,
            build,
            provider,
            upload,
        } => format!("remove dead upload {upload} of {image} build {build} in {provider}"),
        ImageAction::MarkDeadBuild { image, build } => {
            format!("mark dead build {image}-{build}")
        }
        ImageAction::MarkBuildDeleting {
            image,
            build,
            reason,
        } => format!("mark build {image}-{build} deleting ({reason})"),
        ImageAction::RemoveBuild {
            image,
            build,
            reason,
        } => format!("remove build {image}-{build} ({reason})"),
        ImageAction::DeleteLocalFiles {
            image,
            build,
            reason,
            ..
        } => format!("delete local files of {image}-{build} ({reason})"),
        ImageAction::ClearUploadRequest {
            image,
            provider,
            reason,
        } => format!("clear the upload request of {image} to {provider}: {reason}"),
        ImageAction::DeleteLeakedImage {
            provider,
            external_id,
        } => format!("delete leaked image {external_id} in {provider}"),
    }
}
