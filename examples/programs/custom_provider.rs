//! A provider of your own, plugged into the launcher in-process.
//!
//! `LocalProcesses` (in `custom_provider/local_processes.rs`) is a
//! complete `Provider` whose servers are `sleep` processes on this host,
//! with its quota and flavors from its own configuration. This program
//! runs a launcher on the embedded default (a SQLite store in a temporary
//! directory) whose provider factory builds that provider for the
//! `nodepool.yaml` entry named `local`, asks for a node as Zuul would,
//! shows the process the node runs as, gives the node back and waits
//! until the launcher killed the process. The same provider passes the
//! provider conformance suite in `examples/tests/custom_provider.rs`.
//!
//! Run it with:
//!
//! ```sh
//! cargo run -p nodepool-examples --example custom_provider
//! ```

#[path = "custom_provider/local_processes.rs"]
mod local_processes;

use std::error::Error;
use std::sync::Arc;
use std::time::{Duration, Instant};

use local_processes::{LocalCloud, LocalFlavor, LocalProcesses};
use nodepool_core::config::Config;
use nodepool_core::launcher::{Launcher, LauncherSettings};
use nodepool_core::model::Limits;
use nodepool_core::provider::Provider;
use nodepool_core::runtime::ProviderFactory;
use nodepool_core::store::Store;
use nodepool_requestor::{NewRequest, Outcome, Requestor};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// The configuration, with the store's directory filled in. `nodepool.yaml`
/// knows only the `openstack` and `simulated` drivers, so the entry says
/// `simulated` (which needs no other keys); this program's factory builds
/// the provider by name and never looks at the driver.
const CONFIG: &str = r#"
state-store:
  driver: sqlite
  path: {dir}/nodepool.db
labels:
  - name: local-process
providers:
  - name: local
    driver: simulated
    cloud-images: [{name: host}]
    pools:
      - name: main
        max-servers: 4
        labels:
          - {name: local-process, cloud-image: host, flavor-name: small}
"#;

/// Whether process `pid` is alive (not gone, not a zombie), from procfs.
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            let state = s.get(s.rfind(')')? + 1..)?.split_whitespace().next()?;
            Some(state != "Z" && state != "X")
        })
        .unwrap_or(false)
}

/// Polls `f` every 50 ms until it holds, failing after `limit`.
async fn until(what: &str, limit: Duration, mut f: impl FnMut() -> bool) -> Result<(), String> {
    let deadline = Instant::now() + limit;
    while !f() {
        if Instant::now() > deadline {
            return Err(format!("{what}: not within {limit:?}"));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn Error>> {
    let dir = tempfile::tempdir()?;
    let config = Config::from_yaml(&CONFIG.replace("{dir}", &dir.path().display().to_string()))?;

    // The provider: its quota and flavors are its own configuration.
    let mut quota = Limits::unlimited();
    quota.set("instances", 4);
    quota.set("cores", 8);
    let local = Arc::new(LocalProcesses::new(
        "local",
        LocalCloud {
            quota,
            flavors: vec![LocalFlavor {
                name: "small".into(),
                vcpus: 1,
                ram: 512,
            }],
            cloud_images: vec!["host".into()],
            image_dir: dir.path().join("images"),
        },
    ));
    let provider = local.clone();
    let factory: ProviderFactory = Arc::new(move |pc| match pc.name.as_str() {
        "local" => Ok(provider.clone() as Arc<dyn Provider>),
        other => Err(format!("no provider {other} in this program")),
    });

    // The embedded default store, and a launcher in this process.
    let sqlite = nodepool_sqlite::SqliteStore::from_config(&config, Default::default()).await?;
    let store = Store::new(Arc::new(sqlite));
    let launcher = Launcher::new(
        store.clone(),
        factory,
        LauncherSettings {
            hostname: "example".into(),
            ..LauncherSettings::default()
        },
    );
    let (_reload, config_rx) = watch::channel(Arc::new(config));
    let stop = CancellationToken::new();
    let running = tokio::spawn(launcher.run(config_rx, stop.clone()));

    // A node, asked for as Zuul asks.
    let zuul = Requestor::new(store.clone(), "example");
    let started = Instant::now();
    let id = zuul
        .submit(&NewRequest::new(vec!["local-process".into()]))
        .await?;
    let request = match zuul.wait(&id, Duration::from_secs(60)).await? {
        Outcome::Fulfilled(r) => r,
        Outcome::Failed(_) => return Err(format!("request {id} failed").into()),
    };
    let mut nodes = zuul.accept(&id, &request.value).await?;
    let node_id = request.value.nodes.first().ok_or("no node")?.clone();
    let node = store
        .get_node(&node_id)
        .await?
        .ok_or("the node vanished")?
        .value;
    let server = node.external_id.clone().ok_or("the node has no server")?;
    let pid = local.pid(&server).ok_or("the server has no process")?;
    println!(
        "request {id} fulfilled in {:.1} s: node {node_id} on provider {} is server {server}, process {pid} (alive: {})",
        started.elapsed().as_secs_f64(),
        node.provider,
        alive(pid)
    );
    if !alive(pid) {
        return Err(format!("process {pid} of node {node_id} is not running").into());
    }

    // Used and given back: the launcher deletes the node, which kills the
    // process.
    zuul.use_nodes(&mut nodes, "example/project").await?;
    zuul.return_nodes(nodes).await?;
    until(
        "the returned node's process killed",
        Duration::from_secs(60),
        || !alive(pid),
    )
    .await?;
    println!("node {node_id} returned: process {pid} is gone");

    stop.cancel();
    running.await??;
    store.backend().close().await?;
    Ok(())
}
