//! A toy CI system with Nodepool embedded: the launcher runs in this
//! process on the default store (a SQLite file in a temporary directory)
//! and the simulated cloud, and the CI gets a node for a job through the
//! requestor (`nodepool-requestor`), exactly as Zuul would: submit a
//! request, wait until it is fulfilled, lock and use the node, "run" the
//! job on it, return it, and wait until the launcher deleted it.
//!
//! Run it with
//!
//! ```sh
//! cargo run -p nodepool-examples --example embedded_ci
//! ```
//!
//! (`RUST_LOG=info` shows the launcher's log too). It exits 0 when the job
//! ran and the node was deleted, and prints why and exits 1 otherwise; it
//! gives up after two minutes rather than waiting forever.
//!
//! A real CI would share the store with launchers in other processes or on
//! other machines (ZooKeeper, or the same SQLite file): only the launcher
//! part below would move out; the requestor code stays the same.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use nodepool_core::config::Config;
use nodepool_core::launcher::{Launcher, LauncherSettings};
use nodepool_core::model::{Json, NodeState, Port};
use nodepool_core::provider::Provider;
use nodepool_core::runtime::ProviderFactory;
use nodepool_core::store::{Store, paths};
use nodepool_requestor::{NewRequest, Outcome, Requestor};
use nodepool_simulated::SimulatedProvider;
use nodepool_sqlite::{SqliteOptions, SqliteStore};
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// The launcher's configuration: one label served by one simulated cloud.
/// The store path is relative to the file, as in any `nodepool.yaml`.
const CONFIG: &str = r#"
state-store:
  driver: sqlite
  path: nodepool.db

labels:
  - name: ubuntu-jammy

providers:
  - name: sim-cloud
    driver: simulated
    simulation:
      boot-delay: 0.2
    cloud-images:
      - name: jammy
        image-name: Ubuntu 22.04
    pools:
      - name: main
        max-servers: 2
        labels:
          - name: ubuntu-jammy
            cloud-image: jammy
            flavor-name: Fake Flavor
"#;

/// The CI's id in requests and on nodes: stable across restarts, so a
/// restarted CI can recognise its own requests (Zuul uses a uuid4 hex).
const SYSTEM_ID: &str = "e1bedded0c1000000000000000000001";
const LABEL: &str = "ubuntu-jammy";
const JOB: &str = "unit-tests";
const PROJECT: &str = "example.org/toy/project";
/// The whole run, bounded so that a broken setup fails instead of hanging.
const OVERALL: Duration = Duration::from_secs(120);
/// How long the job waits for its node (a launch takes well under a second
/// here; on a real cloud, minutes).
const NODE_WAIT: Duration = Duration::from_secs(90);

#[tokio::main]
async fn main() -> ExitCode {
    init_logging();
    match tokio::time::timeout(OVERALL, run()).await {
        Ok(Ok(())) => ExitCode::SUCCESS,
        Ok(Err(e)) => {
            eprintln!("embedded_ci: {e:#}");
            ExitCode::FAILURE
        }
        Err(_) => {
            eprintln!("embedded_ci: not done within {OVERALL:?}");
            ExitCode::FAILURE
        }
    }
}

/// Starts the launcher, runs one job, stops the launcher.
async fn run() -> anyhow::Result<()> {
    let dir = tempfile::tempdir().context("creating a temporary directory")?;
    let config_path = dir.path().join("nodepool.yaml");
    std::fs::write(&config_path, CONFIG).context("writing nodepool.yaml")?;
    let config = Config::load(&config_path, None).map_err(|e| anyhow!("nodepool.yaml: {e}"))?;

    // One store client for the whole process, as the daemon shares one
    // between its parts: a lock is a contender record (kazoo's recipe), not
    // a property of the client, so the CI's and the launcher's node locks
    // exclude each other all the same.
    let sqlite = SqliteStore::from_config(&config, SqliteOptions::default())
        .await
        .context("opening the SQLite store")?;
    let store = Store::new(Arc::new(sqlite));
    println!("store: {}", store.describe());

    // The launcher, as the `nodepool-launcher` daemon builds it, with the
    // simulated cloud as its only driver.
    let factory: ProviderFactory = Arc::new(|pc| {
        SimulatedProvider::new(pc)
            .map(|p| Arc::new(p) as Arc<dyn Provider>)
            .map_err(|e| e.to_string())
    });
    let launcher = Launcher::new(
        store.clone(),
        factory,
        LauncherSettings {
            hostname: "embedded-ci".into(),
            ..LauncherSettings::default()
        },
    );
    // A new value on this channel reloads the launcher. Keep the sender
    // until it stopped: once it is dropped, the launcher's wait for a reload
    // ends at once and it would run pass after pass.
    let (config_tx, config_rx) = watch::channel(Arc::new(config));
    let shutdown = CancellationToken::new();
    let launcher_task = tokio::spawn(launcher.run(config_rx, shutdown.clone()));

    let job = run_job(&store).await;

    shutdown.cancel();
    let stopped = launcher_task.await;
    drop(config_tx);
    // The job's error says more than the launcher's, when both failed.
    job?;
    stopped
        .context("the launcher task panicked")?
        .context("the launcher failed")?;
    store.backend().close().await.context("closing the store")?;
    println!("launcher stopped; done");
    Ok(())
}

/// The CI's side: one job on one node, through the requestor.
async fn run_job(store: &Store) -> anyhow::Result<()> {
    let ci = Requestor::new(store.clone(), SYSTEM_ID);
    let mut new = NewRequest::new(vec![LABEL.into()]);
    // Given back untouched with the request: the CI's own bookkeeping.
    new.requestor_data = Some(Json::encode(&serde_json::json!({ "job": JOB })));
    let id = ci.submit(&new).await.context("submitting the request")?;
    println!("job {JOB}: requested a {LABEL} node (request {id})");

    let request = match ci.wait(&id, NODE_WAIT).await {
        Ok(Outcome::Fulfilled(request)) => request,
        Ok(Outcome::Failed(_)) => {
            ci.cancel(&id).await.context("withdrawing the request")?;
            bail!("request {id} failed: no launcher can serve a {LABEL} node");
        }
        Err(e) => {
            // Withdraw it so that no launcher builds a node nobody takes.
            let _ = ci.cancel(&id).await;
            return Err(e).context("waiting for the node");
        }
    };

    // accept locks the nodes and deletes the request; use_nodes marks them
    // in-use, so the launcher leaves them alone until they are returned.
    let mut nodes = ci.accept(&id, &request.value).await?;
    ci.use_nodes(&mut nodes, PROJECT).await?;
    let ids: Vec<String> = nodes.nodes.iter().map(|n| n.id.clone()).collect();
    for n in &nodes.nodes {
        let port = match &n.node.connection_port {
            Some(Port::Number(p)) => p.to_string(),
            _ => "22".into(),
        };
        println!(
            "job {JOB}: running on node {} (label {}, provider {}) at {}:{port}",
            n.id,
            n.node.node_type.join(","),
            n.node.provider,
            n.node.interface_ip.as_deref().unwrap_or("<no address>"),
        );
    }
    println!("job {JOB}: passed");

    // in-use nodes become `used`: the launcher deletes them.
    ci.return_nodes(nodes).await?;
    println!("job {JOB}: node returned");
    for node_id in &ids {
        let end = node_end(store, node_id).await?;
        println!("node {node_id}: {end}");
    }
    Ok(())
}

/// Waits until a returned node is deleted (or, with a driver that recycles
/// nodes, put back into service), following the store's change stream.
async fn node_end(store: &Store, id: &str) -> anyhow::Result<String> {
    // Subscribe before reading, so that no change between the two is missed.
    let mut events = store.backend().subscribe();
    let path = paths::node(id);
    loop {
        match store.get_node(id).await?.map(|v| v.value.state) {
            // `deleted`: the server is gone, the record goes next.
            None | Some(NodeState::Deleted) => return Ok("deleted by the launcher".into()),
            Some(NodeState::Used | NodeState::Deleting) => {}
            Some(state) => return Ok(format!("reused ({state})")),
        }
        loop {
            match events.recv().await {
                Ok(e) if e.path() == path => break,
                Ok(_) => {}
                // Missed events: read again.
                Err(RecvError::Lagged(_)) => break,
                Err(RecvError::Closed) => bail!("the store's change stream ended"),
            }
        }
    }
}

/// The launcher's log on stderr, when `RUST_LOG` asks for it.
fn init_logging() {
    if std::env::var_os("RUST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_writer(std::io::stderr)
            .try_init();
    }
}
